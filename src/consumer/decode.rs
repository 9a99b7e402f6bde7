//! Decoding a consumed record, whatever application wrote it: the writer
//! schema comes from the registry by the id in the Confluent frame. When a
//! reader schema for the event is known (`--schemas-dir`, newest version
//! of the event's name), the value is resolved to it: Avro schema
//! resolution is the upcaster (a v1 SessionCreated reads as v2 with v2's
//! defaults filled in). Otherwise the value is read as its writer wrote it.
//!
//! Handlers see one JSON shape, the envelope: a value that is the whole
//! event (the relay's `envelope` layout) as it is; a value that is the
//! payload alone (the `payload` layout, Debezium's outbox topics, or any
//! other application's records) wrapped as `payload`, with the envelope
//! from the record's headers. The event id is the value's `eventId`, else
//! the `eventId` header, else Debezium's `id` header, else the record's
//! own place (`topic/partition/offset`: a redelivery of the record is then
//! recognised, a second copy produced by its writer is not).

use std::{path::Path, sync::Arc};

use apache_avro::{Schema, reader::datum::GenericDatumReader, types::Value};
use rdkafka::message::Message;
use schema_registry_converter::async_impl::avro::AvroDecoder;

use crate::{
    avro::{
        EVENT_SCHEMAS,
        catalog::{Catalog, SchemaDir},
        split_confluent,
    },
    kafka::headers,
};

/// An event as handlers see it: the envelope and payload as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEvent {
    pub event_id: String,
    pub event_name: String,
    pub aggregate_id: String,
    /// The version of the reader schema the event was resolved to; `None`
    /// when it was read with its writer schema.
    pub reader_version: Option<u32>,
    /// The whole event (envelope fields and `payload`) as JSON.
    pub json: serde_json::Value,
}

/// Why a record could not be decoded; `retryable` when trying again may help
/// (the registry was unreachable), not when the record itself is bad.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    pub message: String,
    pub retryable: bool,
}

fn bad(message: impl Into<String>) -> DecodeError {
    DecodeError { message: message.into(), retryable: false }
}

/// What a record says of itself besides its value: its envelope headers,
/// key and place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordMeta<'a> {
    pub event_id: Option<&'a str>,
    pub event_name: Option<&'a str>,
    pub event_version: Option<&'a str>,
    pub aggregate_type: Option<&'a str>,
    pub aggregate_id: Option<&'a str>,
    pub occurred_on: Option<&'a str>,
    pub key: Option<&'a str>,
    /// `topic/partition/offset`.
    pub place: String,
}

impl<'a> RecordMeta<'a> {
    pub fn of<M: Message>(m: &'a M) -> Self {
        let text = |k| headers::text(m, k);
        Self {
            event_id: text(headers::EVENT_ID).or_else(|| text(headers::DEBEZIUM_ID)),
            event_name: text(headers::EVENT_NAME),
            event_version: text(headers::EVENT_VERSION),
            aggregate_type: text(headers::AGGREGATE_TYPE),
            aggregate_id: text(headers::AGGREGATE_ID),
            occurred_on: text(headers::OCCURRED_ON),
            key: m.key().and_then(|k| std::str::from_utf8(k).ok()),
            place: format!("{}/{}/{}", m.topic(), m.partition(), m.offset()),
        }
    }
}

/// Where reader schemas come from.
pub enum Readers {
    /// None: every event is read with its writer schema.
    None,
    /// A directory, read again every few seconds.
    Dir(Arc<SchemaDir>),
    /// A fixed catalog (the sample's Session schemas for the projection).
    Fixed(Catalog),
}

impl Readers {
    /// The reader schemas of `--schemas-dir`, when given.
    pub fn from_dir(dir: Option<&Path>) -> std::io::Result<Self> {
        Ok(match dir {
            Some(dir) => Readers::Dir(Arc::new(SchemaDir::open(dir)?)),
            None => Readers::None,
        })
    }

    /// The sample's Session schemas, compiled in: the projection handler's
    /// reader schemas when no directory is given (it reads only those
    /// events).
    pub fn sample() -> Self {
        Readers::Fixed(Catalog::from_files(
            "the sample Session schemas",
            EVENT_SCHEMAS.iter().map(|s| (s.path(), s.text)),
        ))
    }

    fn latest(&self, aggregate_type: Option<&str>, event_name: &str) -> Option<(u32, Schema)> {
        let found = match self {
            Readers::None => None,
            Readers::Dir(dir) => dir.catalog().latest(aggregate_type, event_name),
            Readers::Fixed(catalog) => catalog.latest(aggregate_type, event_name),
        };
        found.map(|s| (s.key.version, s.schema.clone()))
    }

    /// The directory to watch for changes, if any.
    pub fn watched(&self) -> Option<Arc<SchemaDir>> {
        match self {
            Readers::Dir(dir) => Some(dir.clone()),
            _ => None,
        }
    }
}

pub struct Decoder {
    registry: AvroDecoder,
    readers: Readers,
}

impl Decoder {
    pub fn new(registry_url: &str, readers: Readers) -> Self {
        Self { registry: AvroDecoder::new(crate::registry_client::settings(registry_url)), readers }
    }

    /// Decode `bytes` (a Confluent-framed Avro value) of the record `meta`
    /// describes.
    pub async fn decode(&self, bytes: &[u8], meta: &RecordMeta<'_>) -> Result<DecodedEvent, DecodeError> {
        let (id, mut datum) =
            split_confluent(bytes).ok_or_else(|| bad("not in the Confluent wire format (magic byte 0 + schema id)"))?;
        let writer = match self.registry.get_schema(id).await {
            Ok(w) => w,
            Err(e) => {
                // The decoder caches failures; a retry must ask the registry again.
                self.registry.remove_errors_from_cache();
                return Err(DecodeError {
                    message: format!("writer schema {id} from the registry: {e}"),
                    retryable: e.retriable,
                });
            }
        };
        let name = match (meta.event_name, &writer.parsed) {
            (Some(n), _) => n.to_owned(),
            (None, Schema::Record(r)) => r.name.name().to_owned(),
            (None, _) => return Err(bad(format!("writer schema {id} is not a record and no eventName header"))),
        };
        let reader = self.readers.latest(meta.aggregate_type, &name);
        let read = match &reader {
            Some((_, schema)) => GenericDatumReader::builder(&writer.parsed).reader_schema(schema).build(),
            None => GenericDatumReader::builder(&writer.parsed).build(),
        };
        let value = read.and_then(|r| r.read_value(&mut datum)).map_err(|e| match &reader {
            Some((version, _)) => {
                bad(format!("{name} (writer schema {id}) does not resolve to reader v{version}: {e}"))
            }
            None => bad(format!("{name} does not read as its writer schema {id}: {e}")),
        })?;
        let value = avro_to_json(value).map_err(bad)?;
        envelope(value, name, reader.map(|(v, _)| v), meta)
    }
}

/// The event as handlers see it (see the module's documentation).
fn envelope(
    value: serde_json::Value,
    name: String,
    reader_version: Option<u32>,
    meta: &RecordMeta<'_>,
) -> Result<DecodedEvent, DecodeError> {
    use serde_json::Value as J;
    let is_envelope = value.get("eventId").is_some_and(J::is_string) && value.get("payload").is_some();
    let json = if is_envelope {
        value
    } else {
        let mut e = serde_json::Map::new();
        let event_id = meta.event_id.map(str::to_owned).unwrap_or_else(|| meta.place.clone());
        e.insert("eventId".into(), J::String(event_id));
        e.insert("eventName".into(), J::String(name.clone()));
        let version = meta.event_version.and_then(|v| v.parse::<i64>().ok());
        for (k, v) in [
            ("eventVersion", version.map(J::from)),
            ("aggregateType", meta.aggregate_type.map(J::from)),
            ("aggregateId", meta.aggregate_id.or(meta.key).map(J::from)),
            ("occurredOn", meta.occurred_on.map(J::from)),
        ] {
            if let Some(v) = v {
                e.insert(k.into(), v);
            }
        }
        e.insert("payload".into(), value);
        J::Object(e)
    };
    let text = |k: &str| json.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let event_id = text("eventId").ok_or_else(|| bad("event without an eventId"))?;
    let aggregate_id = text("aggregateId").unwrap_or_else(|| event_id.clone());
    Ok(DecodedEvent { event_name: text("eventName").unwrap_or(name), event_id, aggregate_id, reader_version, json })
}

/// Avro value to JSON: records as objects, unions unwrapped, timestamps as
/// epoch milliseconds, UUIDs as strings.
pub fn avro_to_json(v: Value) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    Ok(match v {
        Value::Record(fields) => J::Object(
            fields
                .into_iter()
                .map(|(k, v)| Ok((k, avro_to_json(v)?)))
                .collect::<Result<serde_json::Map<_, _>, String>>()?,
        ),
        Value::Union(_, inner) => avro_to_json(*inner)?,
        Value::Uuid(u) => J::String(u.to_string()),
        Value::Enum(_, symbol) => J::String(symbol),
        Value::Array(items) => J::Array(items.into_iter().map(avro_to_json).collect::<Result<_, _>>()?),
        Value::Map(m) => {
            J::Object(m.into_iter().map(|(k, v)| Ok((k, avro_to_json(v)?))).collect::<Result<_, String>>()?)
        }
        other => J::try_from(other).map_err(|e| e.to_string())?,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_whole_event_is_taken_as_it_is() {
        let value = json!({"eventId": "e-1", "eventName": "SessionEnded", "aggregateId": "s-1", "payload": {"a": 1}});
        let e = envelope(value.clone(), "SessionEnded".into(), Some(1), &RecordMeta::default()).unwrap();
        assert_eq!((e.event_id.as_str(), e.aggregate_id.as_str(), e.json), ("e-1", "s-1", value));
    }

    #[test]
    fn a_payload_alone_is_wrapped_with_the_envelope_from_its_headers() {
        let meta = RecordMeta {
            event_id: Some("e-9"),
            event_version: Some("3"),
            aggregate_type: Some("Order"),
            aggregate_id: Some("o-1"),
            occurred_on: Some("2026-12-04T10:00:00Z"),
            key: Some("o-1"),
            place: "orders/0/7".into(),
            ..Default::default()
        };
        let e = envelope(json!({"orderId": "o-1"}), "OrderPlaced".into(), None, &meta).unwrap();
        assert_eq!(
            e.json,
            json!({"eventId": "e-9", "eventName": "OrderPlaced", "eventVersion": 3, "aggregateType": "Order",
                   "aggregateId": "o-1", "occurredOn": "2026-12-04T10:00:00Z", "payload": {"orderId": "o-1"}})
        );
        assert_eq!((e.event_id.as_str(), e.aggregate_id.as_str(), e.reader_version), ("e-9", "o-1", None));
    }

    #[test]
    fn a_record_without_ids_is_known_by_its_place_and_key() {
        let meta = RecordMeta { key: Some("o-2"), place: "orders/1/42".into(), ..Default::default() };
        let e = envelope(json!({"orderId": "o-2"}), "OrderPlaced".into(), None, &meta).unwrap();
        assert_eq!((e.event_id.as_str(), e.aggregate_id.as_str()), ("orders/1/42", "o-2"));
        let alone = RecordMeta { place: "orders/1/43".into(), ..Default::default() };
        let e = envelope(json!({}), "X".into(), None, &alone).unwrap();
        assert_eq!(e.aggregate_id, "orders/1/43", "no key: the event is its own aggregate");
    }
}
