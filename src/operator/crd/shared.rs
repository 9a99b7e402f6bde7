//! The parts both kinds share: the connections (MongoDB, Kafka, the
//! Schema Registry), schema sources, routes, backoff and pod settings.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::*;
use crate::backoff::BackoffPolicy;

/// A key in a Secret in the resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// Where the data lives in MongoDB.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MongoDbSpec {
    /// Secret key holding the MongoDB connection string (a replica set: transactions and change streams are needed).
    pub uri_secret: SecretKeyRef,
    /// Database of the application (and of the outbox / processed-events store).
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
    /// Outbox collection.
    #[serde(default = "default_collection")]
    #[schemars(length(min = 1, max = 120))]
    pub collection: String,
}

fn default_collection() -> String {
    "outbox".into()
}

/// How to reach Kafka.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// Bootstrap servers, `host:port[,host:port...]`.
    #[schemars(length(min = 1))]
    pub bootstrap_servers: String,
    /// Secret whose keys are librdkafka security settings in environment form (`SASL_USERNAME`,
    /// `SASL_PASSWORD`, `SASL_MECHANISM`, `SECURITY_PROTOCOL`, ...: the setting upper-cased with `_`
    /// for `.`); passed to the pods as environment from the Secret, never in plain text, and read
    /// by the operator for its own status probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret: Option<String>,
    /// librdkafka client overrides (`linger.ms`, `compression.type`, ...). The relay refuses settings
    /// that weaken idempotence or `acks=all`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub client_config: BTreeMap<String, String>,
}

/// The Confluent-compatible Schema Registry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaRegistrySpec {
    /// Base URL, e.g. `http://schema-registry:8081`.
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
    /// Secret with `username` and `password` for HTTP basic auth (the pods and the operator's
    /// compatibility check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret: Option<String>,
    /// Register event schemas on first use; when off, an event whose schema is not registered fails.
    #[serde(default = "default_true")]
    pub auto_register: bool,
}

fn default_true() -> bool {
    true
}

/// Where a relay's event schemas come from: a ConfigMap of `.avsc` files, or the Schema
/// Registry itself (exactly one).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelaySchemasSpec {
    /// ConfigMap (in the resource's namespace) whose keys are schema files named
    /// `<aggregateType>.<eventName>.v<eventVersion>.avsc` after the outbox row's fields, e.g.
    /// `Order.OrderPlaced.v1.avsc`. Mounted read-only into the relay pods, which read it
    /// again every 5 s: a change reaches running pods as soon as the kubelet updates the
    /// volume (about a minute), no restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub config_map: Option<String>,
    /// Take each event's schema from the Schema Registry instead, under the event's
    /// subject: its newest version (`latest`, Confluent's `use.latest.version`) or the version
    /// numbered as the row's `eventVersion` (`eventVersion`). Needs no file; pairs with
    /// `schemaRegistry.autoRegister: false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_registry: Option<RegistryVersion>,
    /// With `fromRegistry` and a record-name subject strategy: the namespace of the record
    /// names, which are `<recordNamespace>.<eventName>` (the event name alone when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_namespace: Option<String>,
    /// How subjects are named (Confluent's strategies): `TopicRecordName`
    /// (`<topic>-<record full name>`, several event types per topic), `TopicName`
    /// (`<topic>-value`, one evolving record per topic) or `RecordName` (`<record full name>`).
    #[serde(default)]
    pub subject_name_strategy: SubjectStrategy,
    /// What a record's value holds: `envelope` (the whole event: eventId, aggregateType,
    /// aggregateId, eventName, eventVersion, occurredOn, correlationId, causationId,
    /// traceparent and payload; the schema is that record) or `payload` (the payload alone,
    /// the envelope in headers and the aggregate id as key: Debezium's outbox event router
    /// layout; the schema is the payload record).
    #[serde(default)]
    pub value_layout: ValueLayout,
}

/// Where a consumer's reader schemas come from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerSchemasSpec {
    /// ConfigMap of reader schemas, named as a relay's (`<aggregateType>.<eventName>.v<N>.avsc`):
    /// an event is read as the newest version of its event name found there (Avro schema
    /// resolution fills the defaults of fields its writer did not know). Events without a
    /// reader schema are read as their writer wrote them (the writer schema from the registry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub config_map: Option<String>,
}

/// A routing rule: events of an aggregate type (and optionally one event name) go to a topic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// Aggregate type, e.g. `Session`.
    #[schemars(length(min = 1))]
    pub aggregate_type: String,
    /// Only this event (e.g. `SessionEnded`); all events of the aggregate type when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_name: Option<String>,
    /// Kafka topic.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"))]
    pub topic: String,
}

/// Exponential backoff of failed attempts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackoffSpec {
    /// First retry delay, milliseconds.
    #[serde(default = "default_initial_ms")]
    #[schemars(range(min = 1))]
    pub initial_ms: i64,
    /// Longest retry delay, milliseconds.
    #[serde(default = "default_max_ms")]
    #[schemars(range(min = 1))]
    pub max_ms: i64,
    /// Growth of the delay per attempt.
    #[serde(default = "default_multiplier")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub multiplier: f64,
    /// Attempts before an event goes dead (relay), or before a record its handler rejects goes to the dead-letter topic (consumer: transient failures are retried without limit).
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_attempts: i32,
}

fn default_initial_ms() -> i64 {
    1000
}
fn default_max_ms() -> i64 {
    300_000
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_max_attempts() -> i32 {
    10
}

impl RouteSpec {
    /// The rule as the relay's `--route` flag (`OUTBOX_ROUTES`) takes it:
    /// `Aggregate[.Event]=topic`.
    pub fn rule_text(&self) -> String {
        match &self.event_name {
            Some(e) => format!("{}.{e}={}", self.aggregate_type, self.topic),
            None => format!("{}={}", self.aggregate_type, self.topic),
        }
    }
}

impl BackoffSpec {
    /// The retry policy this spec describes.
    pub fn policy(&self, jitter: f64) -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_millis(u64::try_from(self.initial_ms).unwrap_or(0)),
            max: Duration::from_millis(u64::try_from(self.max_ms).unwrap_or(0)),
            multiplier: self.multiplier,
            max_attempts: u32::try_from(self.max_attempts).unwrap_or(0),
            jitter,
        }
    }
}

impl Default for BackoffSpec {
    fn default() -> Self {
        Self {
            initial_ms: default_initial_ms(),
            max_ms: default_max_ms(),
            multiplier: default_multiplier(),
            max_attempts: default_max_attempts(),
        }
    }
}

/// Pod settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// Container image (the operator's own image when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment of the container, after the operator's own: for example
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (and `OTEL_SERVICE_NAME`) to export traces, or `RUST_LOG`. A
    /// variable the operator sets from the resource's spec is refused (the resource reports
    /// InvalidSpec and nothing changes): set that field instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
}

/// A week: how long published rows (relay) and processed marks (consumer) are kept.
pub(super) fn default_retention() -> i64 {
    7 * 24 * 3600
}
