//! Decoding a consumed record: the writer schema comes from the registry by
//! the id in the Confluent frame; the value is resolved to the reader
//! schema, the newest version of the event in `schemas/`. Avro schema
//! resolution is the upcaster: a v1 SessionCreated reads as v2 with v2's
//! defaults filled in.

use std::collections::HashMap;

use apache_avro::{Schema, reader::datum::GenericDatumReader, types::Value};
use schema_registry_converter::async_impl::avro::AvroDecoder;

use crate::avro::{EVENT_SCHEMAS, split_confluent};

/// An event as handlers see it: the envelope and payload as JSON, shaped by
/// the reader schema.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEvent {
    pub event_id: String,
    pub event_name: String,
    pub aggregate_id: String,
    /// The version of the reader schema the event was resolved to.
    pub reader_version: u32,
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

pub struct Decoder {
    registry: AvroDecoder,
    /// Newest schema per event name.
    readers: HashMap<String, (u32, Schema)>,
}

impl Decoder {
    pub fn new(registry_url: &str) -> Self {
        let mut readers: HashMap<String, (u32, Schema)> = HashMap::new();
        for s in EVENT_SCHEMAS {
            if readers.get(s.event_name).is_none_or(|(v, _)| *v < s.version) {
                let schema = s.parse().unwrap_or_else(|e| panic!("bundled schema {} does not parse: {e}", s.path()));
                readers.insert(s.event_name.to_owned(), (s.version, schema));
            }
        }
        Self { registry: AvroDecoder::new(crate::registry_client::settings(registry_url)), readers }
    }

    /// Decode `bytes` (a Confluent-framed Avro record) of event `event_name`
    /// (from the `eventName` header; falls back to the writer's record name).
    pub async fn decode(&self, bytes: &[u8], event_name: Option<&str>) -> Result<DecodedEvent, DecodeError> {
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
        let name = match (event_name, &writer.parsed) {
            (Some(n), _) => n.to_owned(),
            (None, Schema::Record(r)) => r.name.name().to_owned(),
            (None, _) => return Err(bad(format!("writer schema {id} is not a record"))),
        };
        let (version, reader) =
            self.readers.get(&name).ok_or_else(|| bad(format!("no reader schema for event {name} in schemas/")))?;
        let value = GenericDatumReader::builder(&writer.parsed)
            .reader_schema(reader)
            .build()
            .and_then(|r| r.read_value(&mut datum))
            .map_err(|e| bad(format!("{name} (writer schema {id}) does not resolve to reader v{version}: {e}")))?;
        let json = avro_to_json(value).map_err(bad)?;
        let text = |k: &str| json.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        Ok(DecodedEvent {
            event_id: text("eventId").ok_or_else(|| bad("event without eventId"))?,
            event_name: text("eventName").unwrap_or(name),
            aggregate_id: text("aggregateId").ok_or_else(|| bad("event without aggregateId"))?,
            reader_version: *version,
            json,
        })
    }
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
