//! The Schema Registry, client side: connection settings and credentials,
//! the subject an event schema lives under (`SubjectStrategy`), the
//! registry ids of the event schemas and the versions registered under a
//! subject (`ids`), the one compatibility check that the `schemas` command
//! and the operator share, and `outbox schemas check|register`
//! (`schemas_cli`). The dev registry server is `crate::registry`.

pub mod ids;
pub mod schemas_cli;

use std::time::Duration;

use schema_registry_converter::async_impl::schema_registry::SrSettings;

/// How a schema's subject is named: Confluent's subject name strategies.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub enum SubjectStrategy {
    /// `<topic>-<record full name>` (TopicRecordNameStrategy): one topic
    /// carries several event types, each its own subject (the default:
    /// `session-events.v1` carries SessionCreated, SessionRefreshed and
    /// SessionEnded).
    #[default]
    TopicRecordName,
    /// `<topic>-value` (TopicNameStrategy, Confluent's default): one
    /// schema per topic, every event on it one evolving record.
    TopicName,
    /// `<record full name>` (RecordNameStrategy): one subject per event
    /// type, shared by every topic.
    RecordName,
}

impl SubjectStrategy {
    /// The subject of a value schema named `record_full_name` on `topic`.
    pub fn subject(self, topic: &str, record_full_name: &str) -> String {
        match self {
            SubjectStrategy::TopicRecordName => format!("{topic}-{record_full_name}"),
            SubjectStrategy::TopicName => format!("{topic}-value"),
            SubjectStrategy::RecordName => record_full_name.to_owned(),
        }
    }

    /// The value of `--subject-name-strategy` that chooses it.
    pub fn arg(self) -> &'static str {
        match self {
            SubjectStrategy::TopicRecordName => "topic-record-name",
            SubjectStrategy::TopicName => "topic-name",
            SubjectStrategy::RecordName => "record-name",
        }
    }
}

/// Basic-auth credentials of a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Option<String>,
}

impl Credentials {
    /// From `SCHEMA_REGISTRY_USERNAME` / `SCHEMA_REGISTRY_PASSWORD` (the
    /// operator fills them from `schemaRegistry.authSecret`).
    pub fn from_env() -> Option<Self> {
        let username = std::env::var("SCHEMA_REGISTRY_USERNAME").ok().filter(|u| !u.is_empty())?;
        Some(Self { username, password: std::env::var("SCHEMA_REGISTRY_PASSWORD").ok() })
    }
}

/// schema_registry_converter's settings for `url`, with the process's
/// credentials when set.
pub fn settings(url: &str) -> SrSettings {
    let mut builder = SrSettings::new_builder(url.to_owned());
    builder.set_timeout(REQUEST_TIMEOUT);
    if let Some(c) = Credentials::from_env() {
        builder.set_basic_authorization(&c.username, c.password.as_deref());
    }
    builder.build().unwrap_or_else(|_| SrSettings::new(url.to_owned()))
}

/// Every registry request gives up after this long: a registry that hangs
/// must not stall a relay past its lease.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A registry that could not answer the question.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry at {url} is unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    /// Any answer but success or "subject not found": 401/403 (wrong or
    /// missing credentials) among them, which must never read as compatible.
    #[error("schema registry at {url} answered HTTP {status} for subject {subject}: {body}")]
    Refused { url: String, subject: String, status: u16, body: String },
}

/// How one schema stands against what a subject holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compatibility {
    /// The subject has no versions yet: anything may be registered.
    NewSubject,
    Compatible,
    /// Not compatible; the registry's messages say why.
    Incompatible(String),
}

/// Check `schema_text` against the latest version under `subject`
/// (`POST /compatibility/subjects/{subject}/versions/latest?verbose=true`).
pub async fn check_compatibility(
    http: &reqwest::Client,
    url: &str,
    credentials: Option<&Credentials>,
    subject: &str,
    schema_text: &str,
    timeout: Duration,
) -> Result<Compatibility, RegistryError> {
    let url = url.trim_end_matches('/');
    let mut request = http
        .post(format!("{url}/compatibility/subjects/{}/versions/latest?verbose=true", urlencode(subject)))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .json(&serde_json::json!({"schema": schema_text}))
        .timeout(timeout);
    if let Some(c) = credentials {
        request = request.basic_auth(&c.username, c.password.as_deref());
    }
    let unreachable = |e: reqwest::Error| RegistryError::Unreachable { url: url.to_owned(), detail: e.to_string() };
    let response = request.send().await.map_err(unreachable)?;
    let status = response.status();
    let body = response.text().await.map_err(unreachable)?;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    if status == reqwest::StatusCode::NOT_FOUND && matches!(json["error_code"].as_u64(), Some(40401) | Some(40402)) {
        return Ok(Compatibility::NewSubject);
    }
    if !status.is_success() {
        return Err(RegistryError::Refused {
            url: url.to_owned(),
            subject: subject.to_owned(),
            status: status.as_u16(),
            body,
        });
    }
    match json["is_compatible"].as_bool() {
        Some(true) => Ok(Compatibility::Compatible),
        Some(false) => Ok(Compatibility::Incompatible(json["messages"].to_string())),
        None => Err(RegistryError::Refused {
            url: url.to_owned(),
            subject: subject.to_owned(),
            status: status.as_u16(),
            body,
        }),
    }
}

/// Percent-encoding of a subject in a URL path.
pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::SubjectStrategy;

    #[test]
    fn subjects_follow_confluents_strategies() {
        let name = "com.acme.OrderPlaced";
        assert_eq!(SubjectStrategy::TopicRecordName.subject("orders", name), "orders-com.acme.OrderPlaced");
        assert_eq!(SubjectStrategy::TopicName.subject("orders", name), "orders-value");
        assert_eq!(SubjectStrategy::RecordName.subject("orders", name), "com.acme.OrderPlaced");
        for s in [SubjectStrategy::TopicRecordName, SubjectStrategy::TopicName, SubjectStrategy::RecordName] {
            assert_eq!(<SubjectStrategy as clap::ValueEnum>::from_str(s.arg(), false), Ok(s));
        }
    }
}
