//! Registry ids of the event schemas, cached: registered on first use when
//! auto-registration is on, looked up otherwise (a schema that is not
//! registered is then a clear failure of the events that need it); and the
//! schemas registered under a subject, for relays that take their schemas
//! from the registry itself (`SchemaIds::registered`). Subjects:
//! `super::SubjectStrategy`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use apache_avro::Schema;

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
    #[error("no schema registered under subject {subject} at version {version}")]
    NoVersion { subject: String, version: String },
    #[error("the schema registered under subject {subject} (id {id}) {reason}")]
    Unusable { subject: String, id: u32, reason: String },
}

impl SchemaIdError {
    /// Whether the registry is away (unreachable, timed out, 5xx, 408,
    /// 429), rather than refusing the schema: retrying later will do.
    pub fn is_outage(&self) -> bool {
        match self {
            SchemaIdError::Unreachable { .. } => true,
            SchemaIdError::Register { outage, .. } => *outage,
            SchemaIdError::Lookup { status, .. } => outage_status(*status),
            SchemaIdError::NotRegistered { .. } | SchemaIdError::NoVersion { .. } | SchemaIdError::Unusable { .. } => {
                false
            }
        }
    }

    /// Whether the schema is simply not there (yet): registering it, or
    /// fixing the subject, is what it waits for.
    pub fn is_missing(&self) -> bool {
        matches!(self, SchemaIdError::NotRegistered { .. } | SchemaIdError::NoVersion { .. })
    }
}

/// Which version of a subject a relay encodes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubjectVersion {
    /// The newest version (Confluent's `use.latest.version`), asked again
    /// every [`LATEST_REFRESH`] (by default).
    Latest,
    /// This version number.
    Number(u32),
}

impl std::fmt::Display for SubjectVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubjectVersion::Latest => f.write_str("latest"),
            SubjectVersion::Number(n) => write!(f, "{n}"),
        }
    }
}

/// How long the newest version of a subject is taken as known, unless
/// [`SchemaIds::with_latest_refresh`] says otherwise.
pub const LATEST_REFRESH: Duration = Duration::from_secs(30);

/// A schema registered under a subject.
#[derive(Debug)]
pub struct Registered {
    pub id: u32,
    pub schema: Schema,
}

/// A registered version as the cache gives it, and until when it is taken
/// as known: `None` for good (a numbered version never changes), else the
/// moment the newest version is asked again.
pub type KnownVersion = (Arc<Registered>, Option<Instant>);

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
    /// How long a subject's newest version is taken as known.
    latest_refresh: Duration,
    /// Ids by subject, then by schema text: looked up per event without
    /// copying or hashing the schema text (kilobytes).
    cache: Mutex<HashMap<String, Vec<(String, u32)>>>,
    /// Registered versions by subject and version, with when they were read.
    versions: Mutex<HashMap<(String, SubjectVersion), ReadVersion>>,
}

/// A registered version and when it was read from the registry.
type ReadVersion = (Instant, Arc<Registered>);

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
            latest_refresh: LATEST_REFRESH,
            cache: Mutex::new(HashMap::new()),
            versions: Mutex::new(HashMap::new()),
        }
    }

    /// Take a subject's newest version as known for `refresh` instead of
    /// [`LATEST_REFRESH`].
    pub fn with_latest_refresh(mut self, refresh: Duration) -> Self {
        self.latest_refresh = refresh;
        self
    }

    /// The schema registered under `subject` at `version`, cached (the
    /// newest version for the latest refresh; a numbered one for good),
    /// and until when it is taken as known. While the registry cannot be
    /// reached, a newest version read before is used, and the registry is
    /// asked again after another refresh.
    pub async fn registered(&self, subject: &str, version: SubjectVersion) -> Result<KnownVersion, SchemaIdError> {
        let key = (subject.to_owned(), version);
        let known = self.versions.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        let until = |read: Instant| (version == SubjectVersion::Latest).then(|| read + self.latest_refresh);
        if let Some((read, r)) = &known
            && until(*read).is_none_or(|t| Instant::now() < t)
        {
            return Ok((r.clone(), until(*read)));
        }
        match self.fetch_version(subject, version).await {
            Ok(r) => {
                let (read, r) = (Instant::now(), Arc::new(r));
                self.versions.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (read, r.clone()));
                Ok((r, until(read)))
            }
            Err(e) if e.is_outage() && known.is_some() => {
                // Taken as known for another refresh: asked again then, not
                // for every event while the registry is away.
                tracing::warn!(subject, error = %e, "the registry is away; encoding with the version read before");
                let (read, r) = (Instant::now(), known.expect("checked").1);
                self.versions.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (read, r.clone()));
                Ok((r, until(read)))
            }
            Err(e) => Err(e),
        }
    }

    async fn fetch_version(&self, subject: &str, version: SubjectVersion) -> Result<Registered, SchemaIdError> {
        let url = format!("{}/subjects/{}/versions/{version}", self.url, super::urlencode(subject));
        let mut request = self.http.get(&url);
        if let Some(c) = super::Credentials::from_env() {
            request = request.basic_auth(c.username, c.password);
        }
        let response = request
            .send()
            .await
            .map_err(|e| SchemaIdError::Unreachable { url: self.url.clone(), detail: e.to_string() })?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if !status.is_success() {
            return match body["error_code"].as_u64() {
                Some(40401) | Some(40402) => {
                    Err(SchemaIdError::NoVersion { subject: subject.to_owned(), version: version.to_string() })
                }
                _ => Err(SchemaIdError::Lookup {
                    subject: subject.to_owned(),
                    status: status.as_u16(),
                    body: body.to_string(),
                }),
            };
        }
        let lookup_failed =
            || SchemaIdError::Lookup { subject: subject.to_owned(), status: status.as_u16(), body: body.to_string() };
        let id = body["id"].as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(lookup_failed)?;
        let unusable = |reason: String| SchemaIdError::Unusable { subject: subject.to_owned(), id, reason };
        if body["schemaType"].as_str().is_some_and(|t| t != "AVRO") {
            return Err(unusable(format!("is of type {}, not AVRO", body["schemaType"])));
        }
        let text = body["schema"].as_str().ok_or_else(lookup_failed)?;
        let schema = Schema::parse_str(text).map_err(|e| unusable(format!("does not parse: {e}")))?;
        Ok(Registered { id, schema })
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
