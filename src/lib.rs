//! outbox-operator: a Kubernetes-native transactional outbox.
//!
//! Applications write domain data and domain events in one MongoDB
//! transaction; relays publish the events to Kafka (Avro, Confluent-compatible
//! Schema Registry); consumers deliver them to handlers exactly once in effect.
//! The folders show the architecture:
//! - `domain/`: the pure domain model (Session) and the event envelope;
//! - `outbox/`: the outbox collection (document format, queries, stats);
//! - `session_api/`: the sample bounded context over HTTP;
//! - `avro/`: event schemas and BSON -> Avro encoding;
//! - `relay/`: the outbox-to-Kafka loop; `consumer/`: the event consumers;
//! - `kafka/`: client settings, schema ids, group lag;
//! - `operator/`: the custom resources and their controllers;
//! - `registry/`: the development schema registry;
//! - `telemetry`: logs, metrics and health endpoints; `cli`: the subcommands.
#![forbid(unsafe_code)]

pub mod avro;
pub mod cli;
pub mod consumer;
pub mod db;
pub mod domain;
pub mod kafka;
pub mod operator;
pub mod outbox;
pub mod registry;
pub mod relay;
pub mod session_api;
pub mod telemetry;

/// One allocator for every binary, test and benchmark linking the crate.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Errors of the library. Binaries and tests use `anyhow` at the edges.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl Error {
    /// A short, stable label for failure metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Io { .. } => "io",
            Error::Unavailable { .. } => "unavailable",
            Error::Json(_) => "json",
            Error::Metrics(_) => "metrics",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
