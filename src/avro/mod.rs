//! Avro for events: the catalogs of event schemas read from files
//! (`catalog`: a relay's and a consumer's schemas, from a mounted ConfigMap
//! or a directory), the sample Session schemas compiled in (the projection
//! handler's and the tests'), and the encoding of an outbox row's event
//! straight from its BSON bytes into the Confluent wire format (`encode`),
//! with errors that name the offending field.

pub mod catalog;
mod encode;

use apache_avro::Schema;
use mongodb::bson::RawDocument;

pub use catalog::CompiledSchema;
pub use encode::{ConvertError, encode_event, encode_payload};

/// What a record's value holds.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum ValueLayout {
    /// The whole event: the envelope fields (`eventId`, `aggregateType`,
    /// `aggregateId`, `eventName`, `eventVersion`, `occurredOn`,
    /// `correlationId`, `causationId`, `traceparent`) and `payload`; the
    /// schema is the envelope record.
    #[default]
    Envelope,
    /// The payload alone, the envelope in headers (Debezium's outbox event
    /// router's layout); the schema is the payload record.
    Payload,
}

/// One sample event schema compiled in:
/// `schemas/<aggregate>/<AggregateType>.<EventName>.v<version>.avsc`. The
/// relay and consumers read schemas from files (`catalog`); these serve the
/// sample's projection handler and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSchema {
    pub aggregate_type: &'static str,
    pub event_name: &'static str,
    pub version: u32,
    pub text: &'static str,
}

impl EventSchema {
    pub fn parse(&self) -> Result<Schema, apache_avro::Error> {
        Schema::parse_str(self.text)
    }

    /// The schema parsed, with its record's full name.
    pub fn compile(&self) -> Result<CompiledSchema, String> {
        let key = catalog::SchemaKey {
            aggregate_type: self.aggregate_type.to_owned(),
            event_name: self.event_name.to_owned(),
            version: self.version,
        };
        CompiledSchema::parse(key, self.path(), self.text.to_owned())
    }

    /// Path of the file, relative to the repository root.
    pub fn path(&self) -> String {
        format!(
            "schemas/{}/{}.{}.v{}.avsc",
            self.aggregate_type.to_lowercase(),
            self.aggregate_type,
            self.event_name,
            self.version
        )
    }
}

macro_rules! event_schema {
    ($aggregate:literal, $dir:literal, $name:literal, $version:literal) => {
        EventSchema {
            aggregate_type: $aggregate,
            event_name: $name,
            version: $version,
            text: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/schemas/",
                $dir,
                "/",
                $aggregate,
                ".",
                $name,
                ".v",
                $version,
                ".avsc"
            )),
        }
    };
}

/// The sample's event schemas.
pub const EVENT_SCHEMAS: &[EventSchema] = &[
    event_schema!("Session", "session", "SessionCreated", 1),
    event_schema!("Session", "session", "SessionCreated", 2),
    event_schema!("Session", "session", "SessionRefreshed", 1),
    event_schema!("Session", "session", "SessionEnded", 1),
];

/// The schema of `event_name` at `version`.
pub fn event_schema(event_name: &str, version: u32) -> Option<&'static EventSchema> {
    EVENT_SCHEMAS.iter().find(|s| s.event_name == event_name && s.version == version)
}

/// The newest schema of `event_name` (the reader schema for consumers).
pub fn latest_event_schema(event_name: &str) -> Option<&'static EventSchema> {
    EVENT_SCHEMAS.iter().filter(|s| s.event_name == event_name).max_by_key(|s| s.version)
}

/// The Confluent wire format of the event an outbox `row` carries: magic
/// byte 0, the schema's registry id (big-endian u32), then the Avro datum
/// written straight from the row's bytes (see [`encode_event`]).
pub fn encode_confluent(schema_id: u32, schema: &Schema, row: &RawDocument) -> Result<Vec<u8>, ConvertError> {
    encode_confluent_as(ValueLayout::Envelope, schema_id, schema, row)
}

/// [`encode_confluent`] with the value laid out as `layout` says.
pub fn encode_confluent_as(
    layout: ValueLayout,
    schema_id: u32,
    schema: &Schema,
    row: &RawDocument,
) -> Result<Vec<u8>, ConvertError> {
    let mut out = Vec::with_capacity(5 + row.as_bytes().len());
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    match layout {
        ValueLayout::Envelope => encode_event(row, schema, &mut out)?,
        ValueLayout::Payload => encode_payload(row, schema, &mut out)?,
    }
    Ok(out)
}

/// Split a Confluent-framed message into (schema id, Avro datum).
pub fn split_confluent(bytes: &[u8]) -> Option<(u32, &[u8])> {
    match bytes {
        [0, a, b, c, d, rest @ ..] => Some((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{DateTime, RawDocumentBuf, doc};

    #[test]
    fn every_catalog_schema_parses_and_is_named_after_its_event() {
        for s in EVENT_SCHEMAS {
            let parsed = s.parse().unwrap_or_else(|e| panic!("{}: {e}", s.path()));
            let Schema::Record(r) = parsed else { panic!("{} is not a record", s.path()) };
            assert_eq!(r.name.name(), s.event_name, "{}", s.path());
            assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(s.path()).exists(), "{}", s.path());
        }
        assert_eq!(latest_event_schema("SessionCreated").unwrap().version, 2);
        assert_eq!(latest_event_schema("SessionEnded").unwrap().version, 1);
        assert!(event_schema("SessionCreated", 99).is_none());
    }

    #[test]
    fn the_confluent_frame_is_magic_byte_schema_id_and_datum() {
        let schema = event_schema("SessionEnded", 1).unwrap().parse().unwrap();
        let row = RawDocumentBuf::from_document(&doc! {
            "_id": "0190a4c4-7b5e-7cc0-8f3e-6b1d2f3a4b5c", "aggregateType": "Session", "aggregateId": "s-1",
            "eventName": "SessionEnded", "eventVersion": 1, "occurredOn": DateTime::from_millis(0),
            "payload": {"sessionId": "s-1", "userId": "u", "reason": "logout", "endedAt": 0_i64},
        })
        .unwrap();
        let bytes = encode_confluent(42, &schema, &row).unwrap();
        let (id, datum) = split_confluent(&bytes).unwrap();
        assert_eq!(id, 42);
        let mut alone = Vec::new();
        encode_event(&row, &schema, &mut alone).unwrap();
        assert_eq!(datum, alone.as_slice());
        assert!(split_confluent(&[1, 0, 0, 0, 1]).is_none() && split_confluent(&[0, 1]).is_none());
    }
}
