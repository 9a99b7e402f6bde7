//! An outbox row as the relay handles it: the stored bytes, which the
//! publisher encodes straight into Avro, and the few fields the relay
//! routes, orders and records by, read once. Nothing else of the row (its
//! payload above all) is copied.

use std::ops::Deref;

use mongodb::bson::{Bson, DateTime, RawDocumentBuf};
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
    /// Attempts spent toward `maxAttempts`.
    #[serde(default)]
    pub attempts: i32,
    /// Failed tries during outages (they spend no attempt).
    #[serde(default)]
    pub outage_retries: i32,
    #[serde(default)]
    pub next_attempt_at: Option<DateTime>,
    #[serde(default)]
    pub hold_seq: Option<i64>,
    /// Set by a discard request: the retry path gives the row up instead
    /// of publishing it.
    #[serde(default)]
    discard: Option<serde::de::IgnoredAny>,
}

impl RowHead {
    /// Whether a discard request marked the row.
    pub fn discard_requested(&self) -> bool {
        self.discard.is_some()
    }
}

/// A readable outbox row: its bytes and its head.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub raw: RawDocumentBuf,
    head: RowHead,
}

/// A stored document that is not a readable outbox row: its `_id` as
/// stored (any BSON type: the relay marks the row by it), its aggregate
/// when that much is readable (its later events wait behind it), and why,
/// naming the field.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    pub id: Box<Bson>,
    pub aggregate_id: Option<String>,
    pub reason: String,
}

impl EventRow {
    pub fn from_raw(raw: RawDocumentBuf) -> Result<Self, Unreadable> {
        match mongodb::bson::from_slice::<RowHead>(raw.as_bytes()) {
            Ok(head) => Ok(Self { raw, head }),
            Err(_) => Err(unreadable(&raw)),
        }
    }
}

/// Why `raw` is not a row, naming the field (read again on this slow path
/// only, through a deserializer that tracks where it failed).
fn unreadable(raw: &RawDocumentBuf) -> Unreadable {
    let id = raw.get("_id").ok().flatten().map(|v| v.to_raw_bson().try_into().unwrap_or(Bson::Null));
    let aggregate_id = raw.get_str("aggregateId").ok().map(str::to_owned);
    let reason = match raw.to_document() {
        Err(e) => format!("not an outbox row: the document does not parse: {e}"),
        Ok(doc) => {
            let de = mongodb::bson::Deserializer::new(Bson::Document(doc));
            match serde_path_to_error::deserialize::<_, RowHead>(de) {
                Ok(_) => "not an outbox row".to_owned(),
                Err(e) if e.path().to_string() == "." => format!("not an outbox row: {}", e.inner()),
                Err(e) => format!("not an outbox row: field `{}`: {}", e.path(), e.inner()),
            }
        }
    };
    Unreadable { id: Box::new(id.unwrap_or(Bson::Null)), aggregate_id, reason }
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

    fn good() -> mongodb::bson::Document {
        doc! {"_id": "x-2", "docVersion": 2, "aggregateType": "S", "aggregateId": "a",
        "eventName": "E", "eventVersion": 1, "occurredOn": DateTime::now(), "payload": {}}
    }

    fn unreadable_without(field: &str) -> Unreadable {
        let mut d = good();
        d.remove(field);
        EventRow::from_raw(RawDocumentBuf::from_document(&d).unwrap()).unwrap_err()
    }

    #[test]
    fn a_document_that_is_not_a_row_is_unreadable_with_its_stored_id() {
        let raw = RawDocumentBuf::from_document(&doc! {"_id": "x-1", "aggregateId": "a"}).unwrap();
        let e = EventRow::from_raw(raw).unwrap_err();
        assert_eq!(*e.id, Bson::String("x-1".into()), "the id as stored, to update the row by");
        assert_eq!(e.aggregate_id.as_deref(), Some("a"));
        assert!(e.reason.starts_with("not an outbox row"), "{e:?}");
        assert!(EventRow::from_raw(RawDocumentBuf::from_document(&good()).unwrap()).is_ok());
    }

    #[test]
    fn the_reason_names_the_missing_or_mistyped_field() {
        let e = unreadable_without("payload");
        assert!(e.reason.contains("payload"), "{e:?}");
        let e = unreadable_without("aggregateId");
        assert!(e.reason.contains("aggregateId") && e.aggregate_id.is_none(), "{e:?}");
        let mut d = good();
        let oid = mongodb::bson::oid::ObjectId::new();
        d.insert("_id", oid);
        let e = EventRow::from_raw(RawDocumentBuf::from_document(&d).unwrap()).unwrap_err();
        assert_eq!(*e.id, Bson::ObjectId(oid));
        assert!(e.reason.contains("`_id`"), "{e:?}");
        d.insert("_id", "x-3");
        d.insert("eventVersion", "one");
        let e = EventRow::from_raw(RawDocumentBuf::from_document(&d).unwrap()).unwrap_err();
        assert!(e.reason.contains("`eventVersion`"), "{e:?}");
    }
}
