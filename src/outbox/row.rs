//! An outbox row as the relay handles it: the stored bytes, which the
//! publisher encodes straight into Avro, and the few fields the relay
//! routes, orders and records by, read once. Nothing else of the row (its
//! payload above all) is copied.

use std::ops::Deref;

use mongodb::bson::{Bson, DateTime, RawBsonRef, RawDocument, RawDocumentBuf};

use super::OutboxStatus;

/// The fields of a row the relay reads besides the event itself.
#[derive(Debug, Clone, PartialEq)]
pub struct RowHead {
    pub id: String,
    pub doc_version: i32,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_name: String,
    pub event_version: i32,
    pub occurred_on: DateTime,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub traceparent: Option<String>,
    pub status: Option<OutboxStatus>,
    /// Attempts spent toward `maxAttempts`.
    pub attempts: i32,
    /// Failed tries during outages (they spend no attempt).
    pub outage_retries: i32,
    pub next_attempt_at: Option<DateTime>,
    pub hold_seq: Option<i64>,
    /// Set by a discard request: the retry path gives the row up instead
    /// of publishing it.
    discard: bool,
}

impl RowHead {
    /// Whether a discard request marked the row.
    pub fn discard_requested(&self) -> bool {
        self.discard
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
        match read_head(&raw) {
            Ok(head) => Ok(Self { raw, head }),
            Err(reason) => Err(unreadable(&raw, reason)),
        }
    }
}

/// The row's head, read in one pass over its top-level fields (the payload
/// is passed over by its length, not read). A null optional field is an
/// absent one; a head field that appears twice makes the row unreadable.
fn read_head(raw: &RawDocument) -> Result<RowHead, String> {
    let (mut id, mut doc_version, mut aggregate_type, mut aggregate_id) = (None, None, None, None);
    let (mut event_name, mut event_version, mut occurred_on, mut payload) = (None, None, None, false);
    let (mut correlation_id, mut causation_id, mut traceparent, mut status) = (None, None, None, None);
    let (mut attempts, mut outage_retries, mut next_attempt_at, mut hold_seq) = (None, None, None, None);
    let mut discard = false;
    let mut seen = 0_u32;
    for element in raw {
        let (key, value) = element.map_err(|e| format!("the document does not parse: {e}"))?;
        let Some(i) = HEAD_FIELDS.iter().position(|f| *f == key) else { continue };
        if seen & (1 << i) != 0 {
            return Err(format!("field `{key}`: appears twice"));
        }
        seen |= 1 << i;
        let field = |e: String| format!("field `{key}`: {e}");
        let null = matches!(value, RawBsonRef::Null);
        match key {
            "_id" => id = Some(text(value).map_err(field)?),
            "docVersion" => doc_version = Some(int32(value).map_err(field)?),
            "aggregateType" => aggregate_type = Some(text(value).map_err(field)?),
            "aggregateId" => aggregate_id = Some(text(value).map_err(field)?),
            "eventName" => event_name = Some(text(value).map_err(field)?),
            "eventVersion" => event_version = Some(int32(value).map_err(field)?),
            "occurredOn" => occurred_on = Some(date(value).map_err(field)?),
            "payload" => payload = true,
            _ if null => {}
            "correlationId" => correlation_id = Some(text(value).map_err(field)?),
            "causationId" => causation_id = Some(text(value).map_err(field)?),
            "traceparent" => traceparent = Some(text(value).map_err(field)?),
            "status" => status = Some(self::status(value).map_err(field)?),
            "attempts" => attempts = Some(int32(value).map_err(field)?),
            "outageRetries" => outage_retries = Some(int32(value).map_err(field)?),
            "nextAttemptAt" => next_attempt_at = Some(date(value).map_err(field)?),
            "holdSeq" => hold_seq = Some(int64(value).map_err(field)?),
            "discard" => discard = true,
            _ => {}
        }
    }
    let missing = |name: &str| format!("field `{name}`: missing");
    let head = RowHead {
        id: id.ok_or_else(|| missing("_id"))?,
        doc_version: doc_version.ok_or_else(|| missing("docVersion"))?,
        aggregate_type: aggregate_type.ok_or_else(|| missing("aggregateType"))?,
        aggregate_id: aggregate_id.ok_or_else(|| missing("aggregateId"))?,
        event_name: event_name.ok_or_else(|| missing("eventName"))?,
        event_version: event_version.ok_or_else(|| missing("eventVersion"))?,
        occurred_on: occurred_on.ok_or_else(|| missing("occurredOn"))?,
        correlation_id,
        causation_id,
        traceparent,
        status,
        attempts: attempts.unwrap_or(0),
        outage_retries: outage_retries.unwrap_or(0),
        next_attempt_at,
        hold_seq,
        discard,
    };
    if !payload {
        return Err(missing("payload"));
    }
    Ok(head)
}

/// The top-level fields [`read_head`] reads.
const HEAD_FIELDS: [&str; 17] = [
    "_id",
    "docVersion",
    "aggregateType",
    "aggregateId",
    "eventName",
    "eventVersion",
    "occurredOn",
    "payload",
    "correlationId",
    "causationId",
    "traceparent",
    "status",
    "attempts",
    "outageRetries",
    "nextAttemptAt",
    "holdSeq",
    "discard",
];

fn kind(v: RawBsonRef<'_>) -> String {
    format!("{:?}", v.element_type()).to_lowercase()
}

fn text(v: RawBsonRef<'_>) -> Result<String, String> {
    match v {
        RawBsonRef::String(s) => Ok(s.to_owned()),
        other => Err(format!("expected a string, found {}", kind(other))),
    }
}

fn int64(v: RawBsonRef<'_>) -> Result<i64, String> {
    match v {
        RawBsonRef::Int32(n) => Ok(i64::from(n)),
        RawBsonRef::Int64(n) => Ok(n),
        other => Err(format!("expected an integer, found {}", kind(other))),
    }
}

fn int32(v: RawBsonRef<'_>) -> Result<i32, String> {
    let n = int64(v)?;
    i32::try_from(n).map_err(|_| format!("{n} does not fit a 32-bit integer"))
}

fn date(v: RawBsonRef<'_>) -> Result<DateTime, String> {
    match v {
        RawBsonRef::DateTime(d) => Ok(d),
        other => Err(format!("expected a date, found {}", kind(other))),
    }
}

fn status(v: RawBsonRef<'_>) -> Result<OutboxStatus, String> {
    let name = text(v)?;
    OutboxStatus::ALL.into_iter().find(|s| s.as_str() == name).ok_or_else(|| format!("unknown status '{name}'"))
}

/// Why `raw` is not a row, naming the field, with what of its identity is
/// readable.
fn unreadable(raw: &RawDocumentBuf, reason: String) -> Unreadable {
    let id = raw.get("_id").ok().flatten().map(|v| v.to_raw_bson().try_into().unwrap_or(Bson::Null));
    let aggregate_id = raw.get_str("aggregateId").ok().map(str::to_owned);
    Unreadable { id: Box::new(id.unwrap_or(Bson::Null)), aggregate_id, reason: format!("not an outbox row: {reason}") }
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
        outbox::{OutboxDocument, OutboxStatus},
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
    fn bookkeeping_fields_read_from_their_bson_and_a_null_one_is_absent() {
        let mut d = good();
        let at = DateTime::from_millis(1_700_000_000_000);
        d.extend(doc! {
            "status": "held", "attempts": 3_i64, "outageRetries": 1, "nextAttemptAt": at, "holdSeq": 5,
            "discard": {"by": "ops", "reason": "test"}, "correlationId": Bson::Null, "causationId": "c-0",
        });
        let row = EventRow::from_raw(RawDocumentBuf::from_document(&d).unwrap()).unwrap();
        assert_eq!((row.status, row.attempts, row.outage_retries), (Some(OutboxStatus::Held), 3, 1));
        assert_eq!((row.next_attempt_at, row.hold_seq), (Some(at), Some(5)));
        assert_eq!((row.correlation_id.as_deref(), row.causation_id.as_deref()), (None, Some("c-0")));
        assert!(row.discard_requested());
        d.extend(doc! {"status": Bson::Null, "attempts": Bson::Null, "discard": Bson::Null, "holdSeq": Bson::Null});
        let row = EventRow::from_raw(RawDocumentBuf::from_document(&d).unwrap()).unwrap();
        assert_eq!((row.status, row.attempts, row.hold_seq, row.discard_requested()), (None, 0, None, false));
        d.insert("status", "lost");
        let e = EventRow::from_raw(RawDocumentBuf::from_document(&d).unwrap()).unwrap_err();
        assert_eq!(e.reason, "not an outbox row: field `status`: unknown status 'lost'");
        d.insert("status", "failed");
        d.insert("attempts", 1_i64 << 40);
        let e = EventRow::from_raw(RawDocumentBuf::from_document(&d).unwrap()).unwrap_err();
        assert_eq!(e.reason, "not an outbox row: field `attempts`: 1099511627776 does not fit a 32-bit integer");
    }

    #[test]
    fn a_head_field_written_twice_makes_the_row_unreadable() {
        let mut bytes = RawDocumentBuf::from_document(&good()).unwrap();
        bytes.append("aggregateId", "b");
        let e = EventRow::from_raw(bytes).unwrap_err();
        assert_eq!(e.reason, "not an outbox row: field `aggregateId`: appears twice");
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
