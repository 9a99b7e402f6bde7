//! `OutboxRelay`: its spec and status.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::*;

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
