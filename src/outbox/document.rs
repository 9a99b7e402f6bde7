//! One outbox document per event, written in the same transaction as the
//! aggregate. `docVersion` is the format version of these documents: a relay
//! refuses documents of a version it does not know instead of guessing.
//!
//! Format 2 (this build) is written without any relay bookkeeping: the relay
//! publishes from the change stream and records its progress in a
//! checkpoint, so a row it publishes at the first attempt is never written
//! again. Only rows that fail, wait behind a failure of their aggregate, or
//! are redriven get a `status`. Format 1 rows (written `pending` by the
//! first release) are still read and published.

use mongodb::bson::{self, DateTime, Document, doc};
use serde::{Deserialize, Serialize};

use super::bucket::bucket_of;
use crate::domain::event::EventEnvelope;

/// Format version of outbox documents written by this build.
pub const DOC_VERSION: i32 = 2;

/// Format versions this build can publish.
pub const READABLE_DOC_VERSIONS: [i32; 2] = [1, 2];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxStatus {
    /// Format 1 only: waiting for its first publish attempt. (Format 2 rows
    /// carry no status until something goes wrong.)
    Pending,
    /// Published by a retry (rows published at the first attempt keep no
    /// status; the relay's checkpoint says they are published).
    Published,
    /// A publish attempt failed; retried at `nextAttemptAt`.
    Failed,
    /// Waiting behind a failed or dead event of its aggregate; published in
    /// `holdSeq` order once that one is.
    Held,
    /// Gave up after the maximum attempts; redrivable.
    Dead,
    /// Given up by a discard request (`discard`: who, why, when); kept.
    Discarded,
}

impl OutboxStatus {
    pub const ALL: [OutboxStatus; 6] = [
        OutboxStatus::Pending,
        OutboxStatus::Published,
        OutboxStatus::Failed,
        OutboxStatus::Held,
        OutboxStatus::Dead,
        OutboxStatus::Discarded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Published => "published",
            OutboxStatus::Failed => "failed",
            OutboxStatus::Held => "held",
            OutboxStatus::Dead => "dead",
            OutboxStatus::Discarded => "discarded",
        }
    }
}

/// An outbox row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxDocument {
    /// The event id (UUID v7 string). Its time order comes from the
    /// writer's clock, so the relay never orders by it: order is commit
    /// order (the change stream) or `holdSeq`.
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
    /// The aggregate's version after the write that produced the event (its
    /// optimistic-concurrency counter): the order of an aggregate's events
    /// that no clock decides, used by the recovery scan. Events of one
    /// write share it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate_version: Option<i64>,
    /// `bucket_of(aggregateId)`, for sharding relays.
    pub bucket: i32,
    /// Absent while the row is in the change stream's hands (format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<OutboxStatus>,
    /// Publish attempts spent toward `maxAttempts`: failures that were not
    /// outages.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: i32,
    /// Failed tries while the broker or the registry was away: they spend
    /// no attempt, only lengthen the backoff.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub outage_retries: i32,
    /// How the last failure counted: `outage`, `unexplained` or `permanent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_kind: Option<String>,
    /// The last failure's reason label (`timed_out`, `message_too_large`,
    /// `schema`, `registry_unavailable`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// When a failed row is next due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime>,
    /// Order of held and failed rows within their aggregate: the relay
    /// assigns it in commit order when it first sets the row aside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_seq: Option<i64>,
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

fn is_zero(n: &i32) -> bool {
    *n == 0
}

impl OutboxDocument {
    /// A new row for `envelope`, as the writer's transaction inserts it.
    pub fn new(envelope: &EventEnvelope, buckets: u32) -> Result<Self, bson::ser::Error> {
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
            aggregate_version: None,
            bucket: i32::try_from(bucket_of(&envelope.aggregate_id, buckets)).unwrap_or(0),
            status: None,
            attempts: 0,
            outage_retries: 0,
            failure_kind: None,
            failure_reason: None,
            next_attempt_at: None,
            hold_seq: None,
            last_error: None,
            published_at: None,
            partition: None,
            offset: None,
            backoff_ms: None,
            redriven_at: None,
        })
    }

    /// The same row, stamped with the aggregate's version after its write.
    pub fn at_version(mut self, version: u64) -> Self {
        self.aggregate_version = Some(i64::try_from(version).unwrap_or(i64::MAX));
        self
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
    fn a_new_row_has_no_relay_bookkeeping_and_sits_in_its_bucket() {
        let e = envelope();
        let d = OutboxDocument::new(&e, 256).unwrap();
        assert_eq!(d.id, e.event_id.to_string());
        assert_eq!((d.status, d.attempts, d.doc_version), (None, 0, DOC_VERSION));
        assert_eq!(d.bucket, 0x68);
        assert_eq!(d.next_attempt_at, None);
        assert_eq!(d.occurred_on.timestamp_millis(), 1_700_000_000_123);
        assert_eq!(d.payload.get_str("sessionId").unwrap(), "foobar");
    }

    #[test]
    fn stored_form_uses_camel_case_and_omits_empty_bookkeeping() {
        let d = OutboxDocument::new(&envelope(), 256).unwrap();
        let stored = bson::to_document(&d).unwrap();
        for key in ["_id", "docVersion", "aggregateId", "eventName", "bucket"] {
            assert!(stored.contains_key(key), "missing {key}: {stored}");
        }
        for key in ["status", "attempts", "nextAttemptAt", "holdSeq", "lastError", "publishedAt", "offset"] {
            assert!(!stored.contains_key(key), "{key} should be absent: {stored}");
        }
        let back: OutboxDocument = bson::from_document(stored).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn a_row_carries_its_aggregates_version_when_stamped() {
        let d = OutboxDocument::new(&envelope(), 256).unwrap();
        assert!(!bson::to_document(&d).unwrap().contains_key("aggregateVersion"));
        let stamped = bson::to_document(&d.at_version(3)).unwrap();
        assert_eq!(stamped.get_i64("aggregateVersion").unwrap(), 3);
    }

    #[test]
    fn a_first_release_row_still_reads() {
        let mut stored = bson::to_document(&OutboxDocument::new(&envelope(), 256).unwrap()).unwrap();
        stored.insert("docVersion", 1);
        stored.insert("status", "pending");
        stored.insert("attempts", 0);
        stored.insert("nextAttemptAt", DateTime::now());
        let back: OutboxDocument = bson::from_document(stored).unwrap();
        assert_eq!(back.status, Some(OutboxStatus::Pending));
        assert!(READABLE_DOC_VERSIONS.contains(&back.doc_version));
    }
}
