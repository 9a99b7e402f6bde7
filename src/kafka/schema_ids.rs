//! Registry ids of the event schemas, cached: registered on first use when
//! auto-registration is on, looked up otherwise (a schema that is not
//! registered is then a clear failure of the events that need it).
//!
//! Subjects follow the TopicRecordNameStrategy, `<topic>-<record full name>`,
//! because one topic carries several event types (`session-events.v1` has
//! SessionCreated, SessionRefreshed and SessionEnded).

use std::{collections::HashMap, sync::Mutex};

use schema_registry_converter::{
    async_impl::schema_registry::{SrSettings, post_schema},
    schema_registry_common::{SchemaType, SuppliedSchema},
};

/// The subject of an event schema on a topic.
pub fn subject(topic: &str, record_full_name: &str) -> String {
    format!("{topic}-{record_full_name}")
}

pub struct SchemaIds {
    url: String,
    settings: SrSettings,
    http: reqwest::Client,
    auto_register: bool,
    cache: Mutex<HashMap<(String, String), u32>>,
}

impl SchemaIds {
    pub fn new(url: &str, auto_register: bool) -> Self {
        let url = url.trim_end_matches('/').to_owned();
        Self {
            settings: super::registry_settings(&url),
            url,
            http: reqwest::Client::new(),
            auto_register,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, key: &(String, String)) -> Option<u32> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(key).copied()
    }

    /// The id of `schema_text` under `subject`.
    pub async fn id(&self, subject: &str, record_full_name: &str, schema_text: &str) -> Result<u32, String> {
        let key = (subject.to_owned(), schema_text.to_owned());
        if let Some(id) = self.cached(&key) {
            return Ok(id);
        }
        let id = if self.auto_register {
            let supplied =
                SuppliedSchema::new(Some(record_full_name.to_owned()), SchemaType::Avro, schema_text.to_owned());
            post_schema(&self.settings, subject.to_owned(), supplied)
                .await
                .map_err(|e| format!("registering {record_full_name} under subject {subject}: {e}"))?
                .id
        } else {
            self.lookup(subject, record_full_name, schema_text).await?
        };
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, id);
        Ok(id)
    }

    async fn lookup(&self, subject: &str, record_full_name: &str, schema_text: &str) -> Result<u32, String> {
        let url = format!("{}/subjects/{}", self.url, urlencode(subject));
        let mut request = self.http.post(&url);
        if let Some((user, password)) = super::registry_credentials() {
            request = request.basic_auth(user, password);
        }
        let response = request
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .json(&serde_json::json!({"schema": schema_text, "schemaType": "AVRO"}))
            .send()
            .await
            .map_err(|e| format!("schema registry at {} unreachable: {e}", self.url))?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if status.is_success() {
            return body["id"]
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| format!("schema registry lookup of {subject} returned no id: {body}"));
        }
        match body["error_code"].as_u64() {
            Some(40401) | Some(40403) => Err(format!(
                "schema {record_full_name} is not registered under subject {subject} and auto-registration is off \
                 (register it with `outbox schemas register`, or enable auto-registration)"
            )),
            _ => Err(format!("schema registry lookup of {subject} failed with {status}: {body}")),
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
