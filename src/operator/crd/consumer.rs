//! `EventConsumer`: its spec and status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::*;

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
