//! outbox-operator: a Kubernetes-native transactional outbox.
//!
//! Applications write domain data and domain events in one MongoDB
//! transaction; relays publish the events to Kafka (Avro, Confluent-compatible
//! Schema Registry); consumers deliver them to handlers exactly once in effect.
//! The folders show the architecture. One folder per process, each
//! importing only shared modules, never another process's folder:
//! - `session_api/`: the sample bounded context over HTTP (`outbox session-api`);
//! - `relay/`: the outbox-to-Kafka loop (`outbox relay`);
//! - `consumer/`: the event consumers (`outbox consume`);
//! - `operator/`: the custom resources (`crd/`), their controllers
//!   (`controllers/`) and what each resource owns (`children/`)
//!   (`outbox operator`);
//! - `registry/`: the development schema registry (`outbox registry`).
//!
//! Shared by them:
//! - `domain/`: the pure domain model (Session) and the event envelope;
//! - `outbox/`: the outbox collection (document format, queries, stats);
//! - `processed`: the processed-events store (consumers, operator status);
//! - `avro/`: event schemas and BSON -> Avro encoding;
//! - `registry_client/`: the Schema Registry client (ids, subjects,
//!   compatibility) and `outbox schemas check|register`;
//! - `kafka/`: client settings, topic routing, headers, group lag;
//! - `lease/`: one active holder through a Kubernetes Lease or a MongoDB document;
//! - `backoff`: retry schedules; `db`: the MongoDB client;
//! - `lifecycle`: stop signal and admin server; `telemetry`: logs, metrics
//!   and health endpoints; `cli`: the subcommands;
//! - `kubectl/`: the `kubectl outbox` plugin (status, redrive, discard,
//!   pause, resume), the same binary named `kubectl-outbox`.
#![forbid(unsafe_code)]

pub mod avro;
pub mod backoff;
pub mod cli;
pub mod consumer;
pub mod db;
pub mod domain;
pub mod kafka;
pub mod kubectl;
pub mod lease;
pub mod lifecycle;
pub mod operator;
pub mod outbox;
pub mod processed;
pub mod registry;
pub mod registry_client;
pub mod relay;
pub mod session_api;
pub mod telemetry;

/// One allocator for every binary, test and benchmark linking the crate.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Errors of the library, one variant per kind of failure: the operator's
/// `outbox_operator_reconcile_errors_total{reason}` is labelled with
/// `metric_label`, and a process that ends with one prints what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is wrong; the message says which and what to do.
    #[error("configuration: {0}")]
    Config(String),
    #[error("I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{service} is unreachable: {detail}")]
    Unavailable { service: &'static str, detail: String },
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("Kafka, {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Registry(#[from] registry_client::RegistryError),
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    /// This process's lease ran out unrenewed: another replica may act now,
    /// so this one must stop.
    #[error("lost the {0} lease")]
    LeaseLost(&'static str),
    /// A newer holder claimed what this process was writing (its fencing
    /// epoch is stale), or another lease backend holds it: step down.
    #[error("fenced: {0}")]
    Fenced(String),
    #[error("a background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A redrive or discard request ended Failed (its status says why).
    #[error("{0}")]
    RequestFailed(String),
    /// The read model's generations could not be read or changed.
    #[error(transparent)]
    Generation(#[from] consumer::generations::GenerationError),
    /// A projection rebuild failed; nothing was switched.
    #[error("{0}")]
    RebuildFailed(String),
    /// Schemas the registry would refuse as incompatible.
    #[error("{0}")]
    Incompatible(String),
    /// A named resource does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Told to stop before the work was done.
    #[error("{0}")]
    Interrupted(String),
    /// A stored state file in a format this build does not read.
    #[error("{0}")]
    StateFormat(String),
}

impl Error {
    /// A short, stable label for failure metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Io { .. } => "io",
            Error::Unavailable { .. } => "unavailable",
            Error::Mongo(_) => "mongodb",
            Error::Kafka { .. } => "kafka",
            Error::Kube(_) => "kube",
            Error::Registry(_) => "registry",
            Error::Lease(_) => "lease",
            Error::LeaseLost(_) => "lease_lost",
            Error::Fenced(_) => "fenced",
            Error::Task(_) => "task",
            Error::Json(_) => "json",
            Error::Metrics(_) => "metrics",
            Error::RequestFailed(_) => "request_failed",
            Error::Generation(_) => "generation",
            Error::RebuildFailed(_) => "rebuild_failed",
            Error::Incompatible(_) => "incompatible",
            Error::NotFound(_) => "not_found",
            Error::Interrupted(_) => "interrupted",
            Error::StateFormat(_) => "state_format",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<outbox::checkpoint::CheckpointError> for Error {
    fn from(e: outbox::checkpoint::CheckpointError) -> Self {
        use outbox::checkpoint::CheckpointError;
        match e {
            CheckpointError::Mongo(e) => Error::Mongo(e),
            other => Error::Fenced(other.to_string()),
        }
    }
}
