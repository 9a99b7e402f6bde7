//! Kafka record headers: the event envelope the relay writes on every
//! record (whatever the value layout: with the payload layout, they are the
//! envelope, as Debezium's outbox event router writes it), and the
//! dead-letter headers a consumer adds.

use rdkafka::message::{Headers, Message};

pub const EVENT_ID: &str = "eventId";
/// The event id header of Debezium's outbox event router (read, not written).
pub const DEBEZIUM_ID: &str = "id";
pub const EVENT_NAME: &str = "eventName";
pub const EVENT_VERSION: &str = "eventVersion";
pub const AGGREGATE_TYPE: &str = "aggregateType";
pub const AGGREGATE_ID: &str = "aggregateId";
/// When the event happened, RFC 3339 (`2026-12-04T10:00:00Z`).
pub const OCCURRED_ON: &str = "occurredOn";
pub const CORRELATION_ID: &str = "correlationId";
pub const CAUSATION_ID: &str = "causationId";
pub const TRACEPARENT: &str = "traceparent";

/// Added to a dead-lettered record: why, and where it came from.
pub mod dead_letter {
    pub const ERROR: &str = "dlq.error";
    pub const ORIGINAL_TOPIC: &str = "dlq.original.topic";
    pub const ORIGINAL_PARTITION: &str = "dlq.original.partition";
    pub const ORIGINAL_OFFSET: &str = "dlq.original.offset";
    pub const ATTEMPTS: &str = "dlq.attempts";
    pub const CONSUMER_GROUP: &str = "dlq.consumer.group";
}

/// The first header named `key`, as text.
pub fn text<'a, M: Message>(m: &'a M, key: &str) -> Option<&'a str> {
    m.headers()?.iter().find(|h| h.key == key).and_then(|h| h.value).and_then(|v| std::str::from_utf8(v).ok())
}
