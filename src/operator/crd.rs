//! The custom resources, `outbox.dev/v1alpha1`: `OutboxRelay` and
//! `EventConsumer`. Every field's doc comment becomes its description in the
//! CRD (what `kubectl explain` shows). Validation the apiserver enforces
//! (types, enums, minimum/maximum, lengths, patterns, required) is in the
//! schema; cross-field rules are CEL `x-kubernetes-validations` for
//! clusters that evaluate them (1.25+).

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::core::v1::{EnvVar, ResourceRequirements},
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::{
    avro::ValueLayout, consumer::ordering::EventOrder, consumer::webhook::ContentMode,
    registry_client::SubjectStrategy, relay::schemas::RegistryVersion,
};
use crate::{
    backoff::BackoffPolicy,
    kafka::{producer_config, topics::TopicRule},
};

pub const GROUP: &str = "outbox.dev";
pub const VERSION: &str = "v1alpha1";

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

/// Messages of the schema source rule.
pub const RELAY_SCHEMAS_RULE: &str = "schemas: set exactly one of configMap and fromRegistry";

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

/// Messages of the CRDs' CEL rules, which the operator also checks itself
/// (clusters before 1.25 do not evaluate CEL).
pub const RELAY_BACKOFF_RULE: &str = "backoff.maxMs must be at least backoff.initialMs";
pub const WEBHOOK_URL_RULE: &str = "handler.webhookUrl is required for the webhook handler";
pub const REBUILD_RULE: &str = "rebuild: only the projection handler keeps a read model to rebuild";

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

    /// Check the policy as the pods will (`field`: where it is in the spec).
    fn validate(&self, field: &str) -> Result<(), String> {
        if self.max_ms < self.initial_ms {
            return Err(format!("spec.{field}.maxMs must be at least spec.{field}.initialMs"));
        }
        self.policy(0.2).validate().map_err(|e| format!("spec.{field}: {e}"))
    }
}

impl OutboxRelaySpec {
    /// The rules the schema cannot express, and whatever the relay would
    /// refuse at start: the first violation.
    pub fn validate(&self) -> Result<(), String> {
        if self.schemas.config_map.is_some() == self.schemas.from_registry.is_some() {
            return Err(format!("spec.{RELAY_SCHEMAS_RULE}"));
        }
        self.backoff.validate("backoff")?;
        for r in &self.routes {
            r.rule_text().parse::<TopicRule>().map_err(|e| format!("spec.routes: {e}"))?;
        }
        let overrides: Vec<(String, String)> =
            self.kafka.client_config.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        producer_config(&self.kafka.bootstrap_servers, &overrides)
            .map_err(|e| format!("spec.kafka.clientConfig: {e}"))?;
        Ok(())
    }
}

impl EventConsumerSpec {
    /// The dead-letter topic of each topic (`<topic><deadLetterSuffix>`), in the topics' order.
    pub fn dead_letter_topics(&self) -> Vec<String> {
        self.topics.iter().map(|t| format!("{t}{}", self.dead_letter_suffix)).collect()
    }

    /// The rules the schema cannot express, and whatever the consumer
    /// would refuse at start: the first violation.
    pub fn validate(&self) -> Result<(), String> {
        if self.handler.type_ == HandlerType::Webhook && self.handler.webhook_url.is_none() {
            return Err(format!("spec.{WEBHOOK_URL_RULE}"));
        }
        self.retry.validate("retry")?;
        if self.rebuild.is_some() && self.handler.type_ != HandlerType::Projection {
            return Err(format!("spec.{REBUILD_RULE}"));
        }
        if self.kafka.client_config.get("enable.auto.offset.store").is_some_and(|v| v != "false") {
            return Err("spec.kafka.clientConfig: enable.auto.offset.store must stay false (offsets are stored after the handler)".into());
        }
        Ok(())
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

/// Runs relay pods that publish an outbox collection to Kafka: one active relay per bucket range
/// of the outbox (`shards` ranges, each with its Kubernetes Lease; the other pods stand by), Avro
/// through the Schema Registry, exponential backoff, dead events after `backoff.maxAttempts`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "outbox.dev",
    version = "v1alpha1",
    kind = "OutboxRelay",
    namespaced,
    status = "OutboxRelayStatus",
    shortname = "orl",
    category = "outbox",
    doc = "An outbox relay: MongoDB outbox collection -> Kafka (Avro).",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Shards", type_ = "integer", json_path = ".spec.shards", description = "Bucket ranges the outbox is split into"),
    printcolumn(name = "Owned", type_ = "integer", json_path = ".status.ownedRanges", description = "Ranges a relay publishes now"),
    printcolumn(name = "Pending", type_ = "integer", json_path = ".status.pending"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
    printcolumn(name = "Dead", type_ = "integer", json_path = ".status.dead"),
    printcolumn(name = "Oldest", type_ = "string", json_path = ".status.oldestPendingAge", description = "Age of the oldest unpublished event"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Holder", type_ = "string", json_path = ".status.activeRelay", priority = 1, description = "Relay pods publishing now (holders of the range Leases)"),
    printcolumn(name = "MaxBackoff", type_ = "number", json_path = ".status.currentMaxBackoffSeconds", priority = 1, description = "Longest retry delay scheduled, seconds"),
    printcolumn(name = "LastPublished", type_ = "date", json_path = ".status.lastPublishedTime", priority = 1, description = "When a relay last saved its checkpoint"),
    validation = kube::core::Rule::new("self.spec.backoff.maxMs >= self.spec.backoff.initialMs")
        .message(RELAY_BACKOFF_RULE),
    validation = kube::core::Rule::new("has(self.spec.schemas.configMap) != has(self.spec.schemas.fromRegistry)")
        .message(RELAY_SCHEMAS_RULE),
)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelaySpec {
    /// Relay pods. They share the `shards` ranges: up to `shards` publish at
    /// once (one per range), the others stand by to take over a range whose
    /// publisher is gone.
    #[serde(default = "default_relay_replicas")]
    #[schemars(range(min = 0, max = 10))]
    pub replicas: i32,
    /// Scale to zero and stop publishing; status keeps reporting the outbox.
    #[serde(default)]
    pub paused: bool,
    /// The outbox: connection Secret, database, collection.
    pub mongodb: MongoDbSpec,
    /// The Kafka cluster events are published to.
    pub kafka: KafkaSpec,
    /// The registry the Avro schemas are registered in.
    pub schema_registry: SchemaRegistrySpec,
    /// The event schemas the relay encodes with, the subjects they live under and the layout
    /// of a record's value.
    pub schemas: RelaySchemasSpec,
    /// Routing rules; unmatched events go to `<aggregate-type-kebab>-events.v1`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    /// Bucket ranges the outbox is split into. Each range is published by
    /// one relay pod at a time (its own Lease and checkpoint) and the pods
    /// share the ranges out, so `replicas` pods up to `shards` publish at
    /// once; per-aggregate order holds (an aggregate is always in one
    /// range). 1: one pod publishes, the others stand by. Changing it rolls
    /// the pods: the new split starts where the old one's checkpoints are,
    /// once the old pods are gone (publishing pauses for the rollout).
    #[serde(default = "default_shards")]
    #[schemars(range(min = 1, max = 64))]
    pub shards: i32,
    /// Rows read and published per batch.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: i32,
    /// Poll interval when the change stream is quiet, milliseconds.
    #[serde(default = "default_poll_ms")]
    #[schemars(range(min = 10, max = 600000))]
    pub poll_interval_ms: i64,
    /// Retry schedule of failed publishes.
    #[serde(default)]
    pub backoff: BackoffSpec,
    /// How long published rows are kept for replay, seconds: the relay
    /// publishing a range deletes its published rows older than this (by
    /// the time in their event ids, every 30 s), and only rows committed
    /// before its checkpoint, so an unpublished row is never deleted.
    #[serde(default = "default_retention")]
    #[schemars(range(min = 60))]
    pub retention_seconds: i64,
    /// Pod image, resources and extra environment.
    #[serde(default)]
    pub pod: PodSpec,
}

fn default_relay_replicas() -> i32 {
    2
}
fn default_shards() -> i32 {
    1
}
fn default_batch_size() -> i32 {
    500
}
fn default_poll_ms() -> i64 {
    1000
}
fn default_retention() -> i64 {
    7 * 24 * 3600
}

/// The outbox as it is, read by the operator from MongoDB itself (true while pods are down).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelayStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded, SchemasCompatible.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Relay pods wanted.
    #[serde(default)]
    pub replicas: i32,
    /// Relay pods ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Events committed and not yet acknowledged by Kafka (an estimate, off
    /// by the events written within the writers' clock skew of the checkpoint).
    #[serde(default)]
    pub pending: i64,
    /// Events whose last attempt failed; retried with backoff.
    #[serde(default)]
    pub failed: i64,
    /// The failed events by what they wait for: their last failure's reason
    /// (`timed_out`, `broker_unavailable`, `registry_unavailable`,
    /// `unknown_topic`: an outage, retried without limit; others spend
    /// attempts).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed_by_reason: BTreeMap<String, i64>,
    /// Events waiting behind a failed or dead event of their aggregate.
    #[serde(default)]
    pub held: i64,
    /// Events given up: a permanent failure (too large, no schema, does not
    /// match its schema, unreadable row) or maxAttempts spent on unexplained
    /// failures; redrive or discard them with an OutboxRedrive request
    /// (`kubectl outbox redrive|discard`).
    #[serde(default)]
    pub dead: i64,
    /// The newest dead events, at most 10: which, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dead_events: Vec<DeadEventStatus>,
    /// When the figures above were read from the outbox (RFC 3339). The operator reads them at
    /// every reconcile, at least every 30 s; while the outbox cannot be read (Degraded), the last
    /// reading is kept and this time says how old it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_time: Option<String>,
    /// The relay publishing the outbox now (the checkpoint's holder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_relay: Option<String>,
    /// Age of the oldest unpublished event, e.g. `42s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age: Option<String>,
    /// When the next failed event is retried (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_time: Option<String>,
    /// The longest backoff currently scheduled, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_max_backoff_seconds: Option<f64>,
    /// Aggregates whose later events wait behind a failed or dead one.
    #[serde(default)]
    pub blocked_aggregates: i64,
    /// When the relay last saved its checkpoint, i.e. last published (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_published_time: Option<String>,
    /// Ranges of `spec.shards` a relay publishes now (holds the claim of).
    #[serde(default)]
    pub owned_ranges: i32,
    /// Each bucket range: its publisher and its own figures (the totals
    /// above add them up).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<RangeStatus>,
}

/// A dead event.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadEventStatus {
    /// The event id.
    pub id: String,
    /// Its aggregate: the aggregate's later events wait behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate_id: Option<String>,
    /// `eventName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_name: Option<String>,
    /// Attempts spent (a permanent failure goes dead at its first).
    #[serde(default)]
    pub attempts: i32,
    /// The last failure, at most 300 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it went dead (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// One bucket range of a sharded outbox.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RangeStatus {
    /// Its buckets, `first-last`.
    pub range: String,
    /// The relay pod publishing it now (none: waiting for one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Its events committed and not yet acknowledged (estimate).
    #[serde(default)]
    pub pending: i64,
    /// Its events whose last attempt failed.
    #[serde(default)]
    pub failed: i64,
    /// Age of its oldest unpublished event, e.g. `42s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age: Option<String>,
}

/// What a consumer does with a record older than its deduplication window.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BeyondHorizonPolicy {
    /// It waits, holding its lane, until the retention is raised or the offsets move.
    #[default]
    Wait,
    /// Apply it anyway: a duplicate older than the window is possible.
    Apply,
}

/// Handler kinds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HandlerType {
    /// Read model in MongoDB; its writes and the processed mark commit in one transaction.
    Projection,
    /// HTTP POST of each event as a CloudEvent, with `Idempotency-Key: <eventId>`.
    Webhook,
    /// Log each event.
    Log,
}

/// What the consumer does with each event.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HandlerSpec {
    /// projection, webhook or log.
    #[serde(rename = "type")]
    pub type_: HandlerType,
    /// Webhook target (type webhook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub webhook_url: Option<String>,
    /// Webhook timeout, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 300000))]
    pub webhook_timeout_ms: Option<i64>,
    /// CloudEvents content mode of the webhook's requests: binary (attributes in `ce-*` headers, default), structured (one `application/cloudevents+json` document) or batch (an `application/cloudevents-batch+json` array of up to batchMaxEvents documents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_mode: Option<ContentMode>,
    /// The most events in one request in the batch content mode (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_max_events: Option<i32>,
    /// CloudEvents `source` of the events (default `/aggregates/<aggregateType>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub source: Option<String>,
    /// Secret key holding a Standard Webhooks secret (`whsec_<base64>`): each request is signed (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<SecretKeyRef>,
    /// Secret key holding a token sent as `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_secret: Option<SecretKeyRef>,
}

/// Runs consumer pods: a consumer group that decodes events, skips duplicates through the
/// processed-events store, runs the handler, and dead-letters poison events.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "outbox.dev",
    version = "v1alpha1",
    kind = "EventConsumer",
    namespaced,
    status = "EventConsumerStatus",
    shortname = "ec",
    category = "outbox",
    doc = "An event consumer: Kafka topics -> handler, exactly once in effect.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Handler", type_ = "string", json_path = ".spec.handler.type"),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.lag"),
    printcolumn(name = "DeadLettered", type_ = "integer", json_path = ".status.deadLettered"),
    printcolumn(name = "Waiting", type_ = "integer", json_path = ".status.waiting"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Partitions", type_ = "integer", json_path = ".status.partitionCount", priority = 1, description = "Partitions of the group's topics"),
    printcolumn(name = "Backoff", type_ = "number", json_path = ".status.currentBackoffSeconds", priority = 1, description = "Largest backoff of a record being retried, seconds"),
    printcolumn(name = "Processed", type_ = "integer", json_path = ".status.processed", priority = 1, description = "Events recorded as processed by the group"),
    validation = kube::core::Rule::new("self.spec.handler.type != 'webhook' || has(self.spec.handler.webhookUrl)")
        .message(WEBHOOK_URL_RULE),
    validation = kube::core::Rule::new("!has(self.spec.rebuild) || self.spec.handler.type == 'projection'")
        .message(REBUILD_RULE),
)]
#[serde(rename_all = "camelCase")]
pub struct EventConsumerSpec {
    /// Topics to consume.
    #[schemars(length(min = 1))]
    pub topics: Vec<String>,
    /// Consumer group id; also scopes the processed-events store.
    #[schemars(length(min = 1, max = 249))]
    pub group_id: String,
    /// What is done with each event.
    pub handler: HandlerSpec,
    /// Consumer pods (at most one per partition does work).
    #[serde(default = "default_consumer_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// Scale to zero; status keeps reporting the group's lag.
    #[serde(default)]
    pub paused: bool,
    /// The processed-events store and the projection's database.
    pub mongodb: MongoDbSpec,
    /// The Kafka cluster to consume from (and to dead-letter to).
    pub kafka: KafkaSpec,
    /// The registry the writer schemas are fetched from.
    pub schema_registry: SchemaRegistrySpec,
    /// Reader schemas, when events should be read as a newer version than they were written
    /// with; without them each event is read with its writer schema.
    #[serde(default)]
    pub schemas: ConsumerSchemasSpec,
    /// In-process retries of a failing event before it is dead-lettered.
    #[serde(default)]
    pub retry: BackoffSpec,
    /// Dead-letter topic of `<topic>` is `<topic><suffix>`.
    #[serde(default = "default_dlq_suffix")]
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,40}$"))]
    pub dead_letter_suffix: String,
    /// How long processed-event records are kept (the deduplication window), seconds.
    #[serde(default = "default_retention")]
    #[schemars(range(min = 60))]
    pub processed_retention_seconds: i64,
    /// A record older than processedRetentionSeconds may have been applied
    /// and its processed mark expired: `wait` (it waits, holding its lane: see ordering;
    /// PartitionsWaiting reason BeyondDedupHorizon) or `apply` anyway.
    #[serde(default)]
    pub beyond_dedup_horizon: BeyondHorizonPolicy,
    /// Records per batch: decoded together; for the projection, found
    /// duplicates with one query and applied in one transaction.
    #[serde(default = "default_consumer_batch_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: i32,
    /// How long a batch may wait for more records after its first,
    /// milliseconds (0: take what has arrived, latency first).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub linger_ms: i32,
    /// Which records keep their order: `key` (the events of one aggregate
    /// in order, many aggregates at once, within and across partitions),
    /// `partition` (one record of a partition at a time), or `unordered`.
    /// A record being tried again holds its aggregate, its partition or
    /// only itself, respectively; the committed offset of a partition stays
    /// below its oldest record not done.
    #[serde(default)]
    pub ordering: EventOrder,
    /// Aggregates (or partitions, or records: see `ordering`) handled at
    /// once per pod: the most webhook calls in flight.
    #[serde(default = "default_max_in_flight")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_in_flight: i32,
    /// Rebuild the projection's read model from the start of the topics
    /// into a new generation, while the consumers run, then switch readers
    /// to it: set to a new value (a date, a ticket) to request one rebuild;
    /// status.rebuild shows its progress. Projection handler only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub rebuild: Option<String>,
    /// Pod image, resources and extra environment.
    #[serde(default)]
    pub pod: PodSpec,
}

fn default_consumer_replicas() -> i32 {
    1
}
fn default_max_in_flight() -> i32 {
    16
}
fn default_consumer_batch_size() -> i32 {
    500
}
fn default_dlq_suffix() -> String {
    ".dlq".into()
}

/// Lag of one partition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionLagStatus {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
    /// Next offset the group will read; absent if it never committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<i64>,
    /// Offset after the last record in the partition.
    pub high_watermark: i64,
    /// Records the group has still to read.
    pub lag: i64,
}

/// A partition whose record is being tried again: nothing behind it is
/// applied until it is done.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WaitingRecordStatus {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
    /// Offset of the record being tried again.
    pub offset: i64,
    /// registry, mongodb or webhook (an outage, waited out), rejected
    /// (tried up to maxAttempts, then dead-lettered), dead_letter (the
    /// dead-letter topic does not take it).
    pub reason: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When it first failed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The last error.
    pub error: String,
    /// The consumer pod holding the partition.
    pub member: String,
    /// Its aggregate (the record key), when the consumer orders by key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<String>,
    /// Records of its aggregate queued behind it.
    #[serde(default)]
    pub queued: u64,
}

/// The consumer as it is: the group's lag from Kafka, counts from the
/// processed-events store, what its pods report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventConsumerStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// When the group's lag and the dead-letter counts were read from Kafka (RFC 3339). The
    /// operator reads them at every reconcile, at least every 30 s; while Kafka cannot be read
    /// (Degraded), the last reading is kept and this time says how old it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_time: Option<String>,
    /// Consumer pods wanted.
    #[serde(default)]
    pub replicas: i32,
    /// Consumer pods ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Total lag of the group over its topics.
    #[serde(default)]
    pub lag: i64,
    /// Partitions of the group's topics (the most pods that do work).
    #[serde(default)]
    pub partition_count: i32,
    /// Lag per partition.
    #[serde(default)]
    pub partitions: Vec<PartitionLagStatus>,
    /// Events recorded as processed by this group (within the retention).
    #[serde(default)]
    pub processed: i64,
    /// Duplicates skipped, as reported by the pods.
    #[serde(default)]
    pub duplicates_skipped: i64,
    /// Failed attempts, as reported by the pods.
    #[serde(default)]
    pub failed: i64,
    /// Records on the dead-letter topics.
    #[serde(default)]
    pub dead_lettered: i64,
    /// The largest backoff of a record being tried again, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_backoff_seconds: Option<f64>,
    /// Consumer pods that reported in the last 30 s.
    #[serde(default)]
    pub reporting_members: i32,
    /// Partitions waiting on a record (count).
    #[serde(default)]
    pub waiting: i32,
    /// Partitions waiting on a record (their committed offset stays at
    /// it): which, why, since when.
    #[serde(default)]
    pub waiting_partitions: Vec<WaitingRecordStatus>,
    /// The aggregates waiting longest on a record being tried again (at
    /// most 10; `ordering: key`), with the records queued behind each.
    #[serde(default)]
    pub waiting_aggregates: Vec<WaitingRecordStatus>,
    /// Aggregates with an event dead-lettered: their later events are
    /// parked in the dead-letter topics, unapplied, until a redrive replays
    /// them in order.
    #[serde(default)]
    pub parked_aggregates: i64,
    /// The most recently parked aggregates, newest first (at most 10): the
    /// dead-lettered event that parked each, why, and how many of its
    /// events wait in the dead-letter topics. An `OutboxRedrive` with
    /// target EventConsumer replays them in order or discards them.
    #[serde(default)]
    pub parked: Vec<ParkedAggregateStatus>,
    /// The projection's read-model generation readers read (a rebuild
    /// makes a new one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection_generation: Option<i32>,
    /// The latest rebuild of the projection's read model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildStatus>,
}

/// A parked aggregate of an EventConsumer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParkedAggregateStatus {
    /// The aggregate (the record key).
    pub aggregate_id: String,
    /// The id of its event that was dead-lettered first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// Why that event was dead-lettered (at most 300 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its events in the dead-letter topics, not applied yet (that one and
    /// those parked behind it).
    pub events: i64,
    /// When it was parked (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// A rebuild of the projection's read model, as it saves its state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebuildStatus {
    /// The Job running the requested rebuild (spec.rebuild).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The generation it builds.
    pub generation: i32,
    /// Replaying, CatchingUp, HandingOver, Completed or Failed.
    pub phase: String,
    /// Records replayed of those on the topics when it started, percent.
    pub progress_percent: i32,
    /// Records replayed so far.
    pub records_done: i64,
    /// Records on the topics when it started.
    pub records_total: i64,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339: its last saved state.
    pub updated_at: String,
    /// Why it failed (nothing was switched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The CRD YAML of both kinds, as `outbox crds` prints it and `crds/` holds it.
pub fn crds_yaml() -> Result<String, String> {
    use kube::CustomResourceExt;
    let mut out = String::from("# Generated by `outbox crds` from src/operator/crd.rs. Do not edit.\n");
    for crd in [OutboxRelay::crd(), EventConsumer::crd(), super::redrive_crd::OutboxRedrive::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// A Markdown reference of the CRDs generated from their schemas: every
/// field with its type, constraints and description (`docs/reference/crd-fields.md`).
pub fn reference_markdown() -> String {
    use kube::CustomResourceExt;
    fn constraints(s: &serde_json::Value) -> String {
        let mut out = Vec::new();
        for (key, label) in [
            ("minimum", "min"),
            ("maximum", "max"),
            ("minLength", "min length"),
            ("maxLength", "max length"),
            ("minItems", "min items"),
            ("pattern", "pattern"),
        ] {
            if let Some(v) = s.get(key) {
                let text = match (v.as_str(), v.as_f64()) {
                    (Some(s), _) => s.to_owned(),
                    (None, Some(f)) if f.fract() == 0.0 => format!("{}", f as i64),
                    _ => v.to_string(),
                };
                out.push(format!("{label} `{text}`"));
            }
        }
        if let Some(e) = s.get("enum").and_then(|e| e.as_array()) {
            out.push(format!(
                "one of {}",
                e.iter().map(|v| format!("`{}`", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(", ")
            ));
        }
        if let Some(d) = s.get("default") {
            out.push(format!("default `{d}`"));
        }
        out.join("; ")
    }
    fn walk(path: &str, s: &serde_json::Value, required: bool, rows: &mut Vec<String>) {
        let ty = s.get("type").and_then(|t| t.as_str()).unwrap_or("object");
        let desc = s.get("description").and_then(|d| d.as_str()).unwrap_or("").replace('\n', " ").replace('|', "\\|");
        if !path.is_empty() {
            let req = if required { " (required)" } else { "" };
            rows.push(format!("| `{path}` | {ty}{req} | {} | {desc} |", constraints(s)));
        }
        // k8s-openapi types keep their upstream documentation.
        if path.ends_with(".resources") || path.ends_with(".conditions") {
            return;
        }
        let required: Vec<&str> = s
            .get("required")
            .and_then(|r| r.as_array())
            .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        if let Some(props) = s.get("properties").and_then(|p| p.as_object()) {
            for (name, sub) in props {
                let p = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
                walk(&p, sub, required.contains(&name.as_str()), rows);
            }
        }
        if let Some(items) = s.get("items") {
            walk(&format!("{path}[]"), items, false, rows);
        }
    }
    let mut out = String::from(
        "# Custom resource reference\n\nGenerated by `outbox crds --reference` from src/operator/crd.rs. Do not edit.\n",
    );
    for crd in [OutboxRelay::crd(), EventConsumer::crd(), super::redrive_crd::OutboxRedrive::crd()] {
        let v = &crd.spec.versions[0];
        let schema = serde_json::to_value(&v.schema.as_ref().expect("schema").open_api_v3_schema).expect("schema JSON");
        out.push_str(&format!(
            "\n## {} (`{}/{}`)\n\n{}\n\n| field | type | constraints | description |\n|---|---|---|---|\n",
            crd.spec.names.kind,
            crd.spec.group,
            v.name,
            schema.get("description").and_then(|d| d.as_str()).unwrap_or("")
        ));
        let mut rows = Vec::new();
        for part in ["spec", "status"] {
            if let Some(sub) = schema.get("properties").and_then(|p| p.get(part)) {
                walk(part, sub, part == "spec", &mut rows);
            }
        }
        out.push_str(&rows.join("\n"));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn the_reference_lists_every_field() {
        let md = reference_markdown();
        assert!(md.contains("| `spec.backoff.maxAttempts` | integer |"), "{md}");
        assert!(md.contains("| `spec.mongodb.uriSecret.name` | string (required) |"), "{md}");
        assert!(md.contains("one of `projection`, `webhook`, `log`"), "{md}");
        assert!(md.contains("| `status.pending` |"), "{md}");
    }

    /// Descriptions say what the code does: published history is deleted
    /// by the relay, no index expires outbox rows; relays share ranges.
    #[test]
    fn relay_descriptions_match_the_code() {
        let expiring = crate::outbox::store::query_indexes()
            .iter()
            .any(|i| i.options.as_ref().is_some_and(|o| o.expire_after.is_some()));
        assert!(!expiring, "an outbox index expires rows: describe retentionSeconds by it");
        let text = serde_json::to_string(&OutboxRelay::crd()).unwrap();
        assert!(!text.contains("TTL"), "retentionSeconds is the relay's cleanup, not a TTL index");
        assert!(!text.contains("one publishes, the others stand by"), "replicas share the shards' ranges");
        assert!(text.contains("deletes its published rows older than this"));
    }

    #[test]
    fn crds_carry_names_columns_and_status() {
        let crd = OutboxRelay::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["orl".to_owned()][..]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, VERSION);
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<&str> =
            v.additional_printer_columns.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            columns,
            [
                "Ready",
                "Shards",
                "Owned",
                "Pending",
                "Failed",
                "Dead",
                "Oldest",
                "Age",
                "Holder",
                "MaxBackoff",
                "LastPublished"
            ]
        );
        let wide: Vec<&str> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .filter(|c| c.priority == Some(1))
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(wide, ["Holder", "MaxBackoff", "LastPublished"], "shown by -o wide only");
        assert_eq!(EventConsumer::crd().spec.names.plural, "eventconsumers");
    }

    #[test]
    fn every_spec_field_has_a_description() {
        fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
                for (name, sub) in props {
                    let p = format!("{path}.{name}");
                    if sub.get("description").is_none() && !["metadata", "apiVersion", "kind"].contains(&name.as_str())
                    {
                        missing.push(p.clone());
                    }
                    // k8s-openapi types bring their own descriptions.
                    if name != "resources" && name != "conditions" {
                        walk(&p, sub, missing);
                    }
                }
            }
            if let Some(items) = schema.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
        }
        for crd in [OutboxRelay::crd(), EventConsumer::crd(), super::super::redrive_crd::OutboxRedrive::crd()] {
            let schema =
                serde_json::to_value(&crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema).unwrap();
            let mut missing = Vec::new();
            walk(&crd.spec.names.kind, &schema, &mut missing);
            assert!(missing.is_empty(), "fields without a description: {missing:?}");
        }
    }

    #[test]
    fn a_rebuild_is_for_projections_only() {
        let spec = |handler: &str, rebuild: &str| -> EventConsumerSpec {
            serde_saphyr::from_str(&format!(
                "topics: [t]\ngroupId: g\nhandler: {{type: {handler}, webhookUrl: \"http://h\"}}\n\
                 mongodb: {{uriSecret: {{name: m, key: uri}}, database: d}}\nkafka: {{bootstrapServers: k}}\n\
                 schemaRegistry: {{url: \"http://r\"}}\n{rebuild}"
            ))
            .unwrap()
        };
        assert_eq!(spec("projection", "rebuild: r1").validate(), Ok(()));
        assert_eq!(spec("webhook", "").validate(), Ok(()));
        assert_eq!(spec("webhook", "rebuild: r1").validate(), Err(format!("spec.{REBUILD_RULE}")));
        let crd = serde_json::to_string(&EventConsumer::crd()).unwrap();
        assert!(crd.contains(REBUILD_RULE), "the CRD carries the rule for clusters that evaluate it");
    }

    #[test]
    fn yaml_output_round_trips() {
        let yaml = crds_yaml().unwrap();
        assert!(yaml.contains("outboxrelays.outbox.dev") && yaml.contains("eventconsumers.outbox.dev"));
        assert!(yaml.contains("x-kubernetes-validations"));
    }
}
