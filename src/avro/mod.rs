//! Avro for events: the catalog of event schemas shipped in `schemas/`
//! (compiled into the binary), and the encoding of an outbox row's event
//! straight from its BSON bytes into the Confluent wire format (`encode`),
//! with errors that name the offending field.

mod encode;

use apache_avro::Schema;
use mongodb::bson::RawDocument;

pub use encode::{ConvertError, encode_event};

/// One event schema file: `schemas/<aggregate>/<EventName>.v<version>.avsc`.
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

    /// The schema parsed, with its record's full name (what registry
    /// subjects are named after).
    pub fn compile(&'static self) -> Result<CompiledSchema, apache_avro::Error> {
        let schema = self.parse()?;
        let full_name = match &schema {
            Schema::Record(r) => r.name.fullname(None),
            _ => self.event_name.to_owned(),
        };
        Ok(CompiledSchema { source: self, schema, full_name })
    }

    /// Path of the file, relative to the repository root.
    pub fn path(&self) -> String {
        format!("schemas/{}/{}.v{}.avsc", self.aggregate_type.to_lowercase(), self.event_name, self.version)
    }
}

/// A bundled event schema, parsed.
#[derive(Debug, Clone)]
pub struct CompiledSchema {
    pub source: &'static EventSchema,
    pub schema: Schema,
    /// The record's full name, e.g. `dev.outbox.session.SessionCreated`.
    pub full_name: String,
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
                $name,
                ".v",
                $version,
                ".avsc"
            )),
        }
    };
}

/// Every event schema this build knows.
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
    let mut out = Vec::with_capacity(5 + row.as_bytes().len());
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    encode_event(row, schema, &mut out)?;
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
