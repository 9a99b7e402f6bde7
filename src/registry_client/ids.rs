//! Registry ids of the event schemas, cached: registered on first use when
//! auto-registration is on, looked up otherwise (a schema that is not
//! registered is then a clear failure of the events that need it).
//! Subjects: `super::subject`.

use std::{collections::HashMap, sync::Mutex};

use schema_registry_converter::{
    async_impl::schema_registry::{SrSettings, post_schema},
    schema_registry_common::{SchemaType, SuppliedSchema},
};

/// Why an event schema has no registry id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaIdError {
    #[error("registering {record} under subject {subject}: {detail}")]
    Register {
        record: String,
        subject: String,
        detail: String,
        /// The registry was unreachable or answered 5xx, 408 or 429.
        outage: bool,
    },
    #[error("schema registry at {url} unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    #[error(
        "schema {record} is not registered under subject {subject} and auto-registration is off \
         (register it with `outbox schemas register`, or enable auto-registration)"
    )]
    NotRegistered { record: String, subject: String },
    #[error("schema registry lookup of {subject} failed with HTTP {status}: {body}")]
    Lookup { subject: String, status: u16, body: String },
}

impl SchemaIdError {
    /// Whether the registry is away (unreachable, timed out, 5xx, 408,
    /// 429), rather than refusing the schema: retrying later will do.
    pub fn is_outage(&self) -> bool {
        match self {
            SchemaIdError::Unreachable { .. } => true,
            SchemaIdError::Register { outage, .. } => *outage,
            SchemaIdError::Lookup { status, .. } => outage_status(*status),
            SchemaIdError::NotRegistered { .. } => false,
        }
    }
}

/// HTTP statuses that say the registry is away or overloaded, not that it
/// refuses the request.
fn outage_status(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

pub struct SchemaIds {
    url: String,
    settings: SrSettings,
    http: reqwest::Client,
    auto_register: bool,
    /// Ids by subject, then by schema text: looked up per event without
    /// copying or hashing the schema text (kilobytes).
    cache: Mutex<HashMap<String, Vec<(String, u32)>>>,
}

impl SchemaIds {
    pub fn new(url: &str, auto_register: bool) -> Self {
        let url = url.trim_end_matches('/').to_owned();
        Self {
            settings: super::settings(&url),
            url,
            http: reqwest::Client::builder()
                .timeout(super::REQUEST_TIMEOUT)
                .build()
                .unwrap_or_else(|_| reqwest::Client::new()),
            auto_register,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, subject: &str, schema_text: &str) -> Option<u32> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(subject)?.iter().find(|(text, _)| text == schema_text).map(|(_, id)| *id)
    }

    /// The id of `schema_text` under `subject`.
    pub async fn id(&self, subject: &str, record_full_name: &str, schema_text: &str) -> Result<u32, SchemaIdError> {
        if let Some(id) = self.cached(subject, schema_text) {
            return Ok(id);
        }
        let id = if self.auto_register {
            let supplied =
                SuppliedSchema::new(Some(record_full_name.to_owned()), SchemaType::Avro, schema_text.to_owned());
            post_schema(&self.settings, subject.to_owned(), supplied)
                .await
                .map_err(|e| SchemaIdError::Register {
                    record: record_full_name.to_owned(),
                    subject: subject.to_owned(),
                    outage: e.retriable
                        || e.error
                            .rsplit_once("status ")
                            .and_then(|(_, code)| code.get(..3)?.parse().ok())
                            .is_some_and(outage_status),
                    detail: e.to_string(),
                })?
                .id
        } else {
            self.lookup(subject, record_full_name, schema_text).await?
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.entry(subject.to_owned()).or_default().push((schema_text.to_owned(), id));
        Ok(id)
    }

    async fn lookup(&self, subject: &str, record_full_name: &str, schema_text: &str) -> Result<u32, SchemaIdError> {
        let url = format!("{}/subjects/{}", self.url, super::urlencode(subject));
        let mut request = self.http.post(&url);
        if let Some(c) = super::Credentials::from_env() {
            request = request.basic_auth(c.username, c.password);
        }
        let response = request
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .json(&serde_json::json!({"schema": schema_text, "schemaType": "AVRO"}))
            .send()
            .await
            .map_err(|e| SchemaIdError::Unreachable { url: self.url.clone(), detail: e.to_string() })?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let lookup_failed =
            || SchemaIdError::Lookup { subject: subject.to_owned(), status: status.as_u16(), body: body.to_string() };
        if status.is_success() {
            return body["id"].as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(lookup_failed);
        }
        match body["error_code"].as_u64() {
            Some(40401) | Some(40403) => {
                Err(SchemaIdError::NotRegistered { record: record_full_name.to_owned(), subject: subject.to_owned() })
            }
            _ => Err(lookup_failed()),
        }
    }
}
