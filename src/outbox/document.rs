//! One outbox document per event, written in the same transaction as the
//! aggregate. `docVersion` is the format version of these documents: a relay
//! refuses documents of a version it does not know instead of guessing.

use mongodb::bson::{self, DateTime, Document, doc};
use serde::{Deserialize, Serialize};

use super::bucket::bucket_of;
use crate::domain::event::EventEnvelope;

/// Format version of outbox documents written by this build.
pub const DOC_VERSION: i32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxStatus {
    /// Waiting for its first publish attempt.
    Pending,
    /// Published and acknowledged by Kafka.
    Published,
    /// A publish attempt failed; retried at `nextAttemptAt`.
    Failed,
    /// Gave up after the maximum attempts; redrivable.
    Dead,
}

/// An outbox row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxDocument {
    /// The event id (UUID v7 string): time-ordered, so `_id` order is
    /// creation order.
    #[serde(rename = "_id")]
    pub id: String,
    pub doc_version: i32,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_name: String,
    pub event_version: i32,
    pub occurred_on: DateTime,
    pub payload: Document,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub causation_id: Option<String>,
    #[serde(default)]
    pub traceparent: Option<String>,
    /// `bucket_of(aggregateId)`, for sharding relays.
    pub bucket: i32,
    pub status: OutboxStatus,
    pub attempts: i32,
    /// When the row is next due (creation time for new rows).
    pub next_attempt_at: DateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    /// The delay chosen before the next attempt of a failed row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<i64>,
    /// When the row was last put back to pending by a redrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redriven_at: Option<DateTime>,
}

impl OutboxDocument {
    /// A pending row for `envelope`, due immediately.
    pub fn pending(envelope: &EventEnvelope, buckets: u32) -> Result<Self, bson::ser::Error> {
        let payload = bson::to_document(&envelope.payload)?;
        let occurred_on = DateTime::from_millis(envelope.occurred_on.timestamp_millis());
        Ok(Self {
            id: envelope.event_id.to_string(),
            doc_version: DOC_VERSION,
            aggregate_type: envelope.aggregate_type.clone(),
            aggregate_id: envelope.aggregate_id.clone(),
            event_name: envelope.event_name.clone(),
            event_version: i32::try_from(envelope.event_version).unwrap_or(i32::MAX),
            occurred_on,
            payload,
            correlation_id: envelope.metadata.correlation_id.clone(),
            causation_id: envelope.metadata.causation_id.clone(),
            traceparent: envelope.metadata.traceparent.clone(),
            bucket: i32::try_from(bucket_of(&envelope.aggregate_id, buckets)).unwrap_or(0),
            status: OutboxStatus::Pending,
            attempts: 0,
            next_attempt_at: occurred_on,
            last_error: None,
            published_at: None,
            partition: None,
            offset: None,
            backoff_ms: None,
            redriven_at: None,
        })
    }

    /// The event as published: the envelope fields and the payload, the
    /// shape every event schema in `schemas/` describes. Outbox bookkeeping
    /// (status, attempts, publication) stays out.
    pub fn event_record(&self) -> Document {
        doc! {
            "eventId": &self.id,
            "aggregateType": &self.aggregate_type,
            "aggregateId": &self.aggregate_id,
            "eventName": &self.event_name,
            "eventVersion": self.event_version,
            "occurredOn": self.occurred_on,
            "correlationId": self.correlation_id.clone(),
            "causationId": self.causation_id.clone(),
            "traceparent": self.traceparent.clone(),
            "payload": self.payload.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::EventMetadata;

    fn envelope() -> EventEnvelope {
        EventEnvelope {
            event_id: uuid::Uuid::now_v7(),
            aggregate_type: "Session".into(),
            aggregate_id: "foobar".into(),
            event_name: "SessionCreated".into(),
            event_version: 1,
            occurred_on: chrono::DateTime::from_timestamp_millis(1_700_000_000_123).unwrap(),
            payload: serde_json::json!({"sessionId": "foobar", "n": 1}),
            metadata: EventMetadata { correlation_id: Some("c-1".into()), causation_id: None, traceparent: None },
        }
    }

    #[test]
    fn a_new_row_is_pending_due_now_in_its_bucket() {
        let e = envelope();
        let d = OutboxDocument::pending(&e, 256).unwrap();
        assert_eq!(d.id, e.event_id.to_string());
        assert_eq!((d.status, d.attempts, d.doc_version), (OutboxStatus::Pending, 0, DOC_VERSION));
        assert_eq!(d.bucket, 0x68);
        assert_eq!(d.next_attempt_at, d.occurred_on);
        assert_eq!(d.occurred_on.timestamp_millis(), 1_700_000_000_123);
        assert_eq!(d.payload.get_str("sessionId").unwrap(), "foobar");
    }

    #[test]
    fn stored_form_uses_camel_case_and_omits_empty_bookkeeping() {
        let d = OutboxDocument::pending(&envelope(), 256).unwrap();
        let stored = bson::to_document(&d).unwrap();
        for key in ["_id", "docVersion", "aggregateId", "eventName", "nextAttemptAt", "bucket", "status"] {
            assert!(stored.contains_key(key), "missing {key}: {stored}");
        }
        assert_eq!(stored.get_str("status").unwrap(), "pending");
        for key in ["lastError", "publishedAt", "offset"] {
            assert!(!stored.contains_key(key), "{key} should be absent: {stored}");
        }
        let back: OutboxDocument = bson::from_document(stored).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn the_event_record_carries_envelope_and_payload_only() {
        let d = OutboxDocument::pending(&envelope(), 256).unwrap();
        let r = d.event_record();
        assert_eq!(r.get_str("correlationId").unwrap(), "c-1");
        assert!(r.get("causationId").unwrap().as_null().is_some());
        assert!(!r.contains_key("status") && !r.contains_key("bucket"));
    }
}
