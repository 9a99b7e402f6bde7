//! An outbox row as the relay handles it: the stored bytes, which the
//! publisher encodes straight into Avro, and the few fields the relay
//! routes, orders and records by, read once. Nothing else of the row (its
//! payload above all) is copied.

use std::ops::Deref;

use mongodb::bson::{DateTime, RawDocumentBuf, de::Error as DecodeError};
use serde::Deserialize;

use super::OutboxStatus;

/// The fields of a row the relay reads besides the event itself.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RowHead {
    #[serde(rename = "_id")]
    pub id: String,
    pub doc_version: i32,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_name: String,
    pub event_version: i32,
    pub occurred_on: DateTime,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub causation_id: Option<String>,
    #[serde(default)]
    pub traceparent: Option<String>,
    /// Required, but not read here: the encoder reads it from the bytes.
    #[allow(dead_code)]
    payload: serde::de::IgnoredAny,
    #[serde(default)]
    pub status: Option<OutboxStatus>,
    #[serde(default)]
    pub attempts: i32,
    #[serde(default)]
    pub next_attempt_at: Option<DateTime>,
    #[serde(default)]
    pub hold_seq: Option<i64>,
}

/// A readable outbox row: its bytes and its head.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub raw: RawDocumentBuf,
    head: RowHead,
}

/// A stored document that is not a readable outbox row: its id (when it
/// has one) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub id: String,
    pub reason: String,
}

impl EventRow {
    pub fn from_raw(raw: RawDocumentBuf) -> Result<Self, Unreadable> {
        match mongodb::bson::from_slice::<RowHead>(raw.as_bytes()) {
            Ok(head) => Ok(Self { raw, head }),
            Err(e) => Err(unreadable(&raw, &e)),
        }
    }
}

fn unreadable(raw: &RawDocumentBuf, e: &DecodeError) -> Unreadable {
    let id = raw.get("_id").ok().flatten().map(|v| format!("{v:?}")).unwrap_or_default();
    Unreadable { id, reason: format!("not an outbox row: {e}") }
}

impl Deref for EventRow {
    type Target = RowHead;

    fn deref(&self) -> &RowHead {
        &self.head
    }
}

impl super::OutboxDocument {
    /// The row as stored, read the way the relay reads it (tests, benches).
    pub fn to_event_row(&self) -> EventRow {
        let raw = RawDocumentBuf::from_document(&mongodb::bson::to_document(self).expect("an outbox row serializes"))
            .expect("an outbox row is a valid document");
        EventRow::from_raw(raw).expect("an outbox row reads back")
    }
}

#[cfg(test)]
mod tests {
    use mongodb::bson::doc;

    use super::*;
    use crate::{
        domain::event::{EventEnvelope, EventMetadata},
        outbox::OutboxDocument,
    };

    #[test]
    fn a_written_row_reads_with_its_head_and_keeps_its_bytes() {
        let envelope = EventEnvelope {
            event_id: uuid::Uuid::now_v7(),
            aggregate_type: "Session".into(),
            aggregate_id: "s-1".into(),
            event_name: "SessionCreated".into(),
            event_version: 1,
            occurred_on: chrono::DateTime::from_timestamp_millis(1_700_000_000_123).unwrap(),
            payload: serde_json::json!({"sessionId": "s-1"}),
            metadata: EventMetadata { traceparent: Some("00-ab-cd-01".into()), ..Default::default() },
        };
        let doc = OutboxDocument::new(&envelope, 256).unwrap();
        let row = doc.to_event_row();
        assert_eq!((row.id.as_str(), row.aggregate_id.as_str(), row.event_version), (doc.id.as_str(), "s-1", 1));
        assert_eq!((row.status, row.attempts, row.hold_seq), (None, 0, None));
        assert_eq!(row.traceparent.as_deref(), Some("00-ab-cd-01"));
        assert_eq!(row.raw.get_document("payload").unwrap().get_str("sessionId").unwrap(), "s-1");
    }

    #[test]
    fn a_document_that_is_not_a_row_is_unreadable_with_its_id() {
        let raw = RawDocumentBuf::from_document(&doc! {"_id": "x-1", "aggregateId": "a"}).unwrap();
        let e = EventRow::from_raw(raw).unwrap_err();
        assert!(e.id.contains("x-1") && e.reason.starts_with("not an outbox row"), "{e:?}");
        let no_payload = doc! {"_id": "x-2", "docVersion": 2, "aggregateType": "S", "aggregateId": "a",
        "eventName": "E", "eventVersion": 1, "occurredOn": DateTime::now()};
        let e = EventRow::from_raw(RawDocumentBuf::from_document(&no_payload).unwrap()).unwrap_err();
        assert!(e.reason.contains("payload"), "{e:?}");
    }
}
