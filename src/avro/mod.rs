//! Avro for events: the catalog of event schemas shipped in `schemas/`
//! (compiled into the binary) and the schema-directed conversion of an
//! outbox event record (BSON) into an Avro value, with errors that name the
//! offending field.

use std::collections::HashMap;

use apache_avro::{
    Schema,
    schema::{RecordSchema, UuidSchema},
    types::Value,
};
use mongodb::bson::Bson;

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

/// Encode `value` in the Confluent wire format: magic byte 0, the schema's
/// registry id (big-endian u32), then the Avro binary datum.
pub fn encode_confluent(schema_id: u32, schema: &Schema, value: Value) -> Result<Vec<u8>, apache_avro::Error> {
    let datum = apache_avro::writer::datum::GenericDatumWriter::builder(schema).build()?.write_value_to_vec(value)?;
    let mut out = Vec::with_capacity(5 + datum.len());
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend(datum);
    Ok(out)
}

/// Split a Confluent-framed message into (schema id, Avro datum).
pub fn split_confluent(bytes: &[u8]) -> Option<(u32, &[u8])> {
    match bytes {
        [0, a, b, c, d, rest @ ..] => Some((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
        _ => None,
    }
}

/// A value that does not fit its schema, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConvertError {
    /// JSONPath-like location, e.g. `$.payload.expiresAt`.
    pub path: String,
    pub message: String,
}

/// Convert `value` into an Avro value of `schema`. Strict: every record
/// field must be present (or have a default), no unknown fields, numbers
/// must fit. Timestamps accept BSON dates, epoch numbers and RFC 3339
/// strings.
pub fn bson_to_avro(value: &Bson, schema: &Schema) -> Result<Value, ConvertError> {
    convert(value, schema, "$")
}

fn err(path: &str, message: impl Into<String>) -> ConvertError {
    ConvertError { path: path.to_owned(), message: message.into() }
}

fn bson_kind(v: &Bson) -> &'static str {
    match v {
        Bson::Null => "null",
        Bson::Boolean(_) => "boolean",
        Bson::Int32(_) => "int32",
        Bson::Int64(_) => "int64",
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Document(_) => "document",
        Bson::Array(_) => "array",
        Bson::DateTime(_) => "date",
        Bson::Binary(_) => "binary",
        _ => "unsupported BSON type",
    }
}

fn integer(v: &Bson) -> Option<i64> {
    match v {
        Bson::Int32(i) => Some(i64::from(*i)),
        Bson::Int64(i) => Some(*i),
        Bson::Double(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(*f as i64),
        _ => None,
    }
}

fn timestamp_millis(v: &Bson, path: &str) -> Result<i64, ConvertError> {
    match v {
        Bson::DateTime(d) => Ok(d.timestamp_millis()),
        Bson::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|d| d.timestamp_millis())
            .map_err(|e| err(path, format!("'{s}' is not an RFC 3339 timestamp ({e})"))),
        other => integer(other).ok_or_else(|| err(path, format!("expected a timestamp, found {}", bson_kind(other)))),
    }
}

fn convert(v: &Bson, schema: &Schema, path: &str) -> Result<Value, ConvertError> {
    let mismatch = || err(path, format!("expected {}, found {}", schema_kind(schema), bson_kind(v)));
    let out_of_range = |n: i64| err(path, format!("{n} does not fit {}", schema_kind(schema)));
    Ok(match schema {
        Schema::Null => match v {
            Bson::Null => Value::Null,
            _ => return Err(mismatch()),
        },
        Schema::Boolean => match v {
            Bson::Boolean(b) => Value::Boolean(*b),
            _ => return Err(mismatch()),
        },
        Schema::Int => {
            let n = integer(v).ok_or_else(mismatch)?;
            Value::Int(i32::try_from(n).map_err(|_| out_of_range(n))?)
        }
        Schema::Long => Value::Long(integer(v).ok_or_else(mismatch)?),
        Schema::Float | Schema::Double => {
            let f = match v {
                Bson::Double(f) => *f,
                other => integer(other).ok_or_else(mismatch)? as f64,
            };
            if matches!(schema, Schema::Float) { Value::Float(f as f32) } else { Value::Double(f) }
        }
        Schema::String => match v {
            Bson::String(s) => Value::String(s.clone()),
            _ => return Err(mismatch()),
        },
        Schema::Bytes => match v {
            Bson::Binary(b) => Value::Bytes(b.bytes.clone()),
            _ => return Err(mismatch()),
        },
        Schema::Uuid(UuidSchema::String) => match v {
            Bson::String(s) => {
                Value::Uuid(uuid::Uuid::parse_str(s).map_err(|e| err(path, format!("'{s}' is not a UUID ({e})")))?)
            }
            _ => return Err(mismatch()),
        },
        Schema::TimestampMillis => Value::TimestampMillis(timestamp_millis(v, path)?),
        Schema::TimestampMicros => {
            let ms = timestamp_millis(v, path)?;
            Value::TimestampMicros(ms.checked_mul(1000).ok_or_else(|| out_of_range(ms))?)
        }
        Schema::Enum(e) => match v {
            Bson::String(s) => match e.symbols.iter().position(|sym| sym == s) {
                Some(i) => Value::Enum(i as u32, s.clone()),
                None => return Err(err(path, format!("'{s}' is not one of {:?}", e.symbols))),
            },
            _ => return Err(mismatch()),
        },
        Schema::Array(a) => match v {
            Bson::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| convert(item, &a.items, &format!("{path}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            _ => return Err(mismatch()),
        },
        Schema::Map(m) => match v {
            Bson::Document(d) => Value::Map(
                d.iter()
                    .map(|(k, item)| Ok((k.clone(), convert(item, &m.types, &format!("{path}.{k}"))?)))
                    .collect::<Result<HashMap<_, _>, ConvertError>>()?,
            ),
            _ => return Err(mismatch()),
        },
        Schema::Record(r) => match v {
            Bson::Document(d) => record(d, r, path)?,
            _ => return Err(mismatch()),
        },
        Schema::Union(u) => {
            let mut reasons = Vec::new();
            for (i, variant) in u.variants().iter().enumerate() {
                match convert(v, variant, path) {
                    Ok(value) => return Ok(Value::Union(i as u32, Box::new(value))),
                    Err(e) => reasons.push(e.message),
                }
            }
            return Err(err(path, format!("matches no branch of the union ({})", reasons.join("; "))));
        }
        other => return Err(err(path, format!("schema type {} is not supported for events", schema_kind(other)))),
    })
}

fn record(d: &mongodb::bson::Document, r: &RecordSchema, path: &str) -> Result<Value, ConvertError> {
    if let Some(unknown) = d.keys().find(|k| !r.lookup.contains_key(*k)) {
        return Err(err(path, format!("field '{unknown}' is not in schema {}", r.name.fullname(None))));
    }
    let mut fields = Vec::with_capacity(r.fields.len());
    for field in &r.fields {
        let field_path = format!("{path}.{}", field.name);
        let value = match (d.get(&field.name), &field.default) {
            (Some(v), _) => convert(v, &field.schema, &field_path)?,
            (None, Some(default)) => {
                let v = Bson::try_from(default.clone()).map_err(|e| err(&field_path, e.to_string()))?;
                convert(&v, &field.schema, &field_path)?
            }
            (None, None) => return Err(err(&field_path, "missing (the schema gives no default)")),
        };
        fields.push((field.name.clone(), value));
    }
    Ok(Value::Record(fields))
}

fn schema_kind(s: &Schema) -> String {
    match s {
        Schema::Record(r) => format!("record {}", r.name.fullname(None)),
        Schema::Enum(e) => format!("enum {}", e.name.fullname(None)),
        Schema::Uuid(_) => "uuid".into(),
        Schema::TimestampMillis => "timestamp-millis".into(),
        Schema::TimestampMicros => "timestamp-micros".into(),
        other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)).to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{DateTime, doc};

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

    fn created() -> Schema {
        event_schema("SessionCreated", 1).unwrap().parse().unwrap()
    }

    fn record_doc() -> mongodb::bson::Document {
        doc! {
            "eventId": "0190a4c4-7b5e-7cc0-8f3e-6b1d2f3a4b5c",
            "aggregateType": "Session", "aggregateId": "s-1", "eventName": "SessionCreated", "eventVersion": 1,
            "occurredOn": DateTime::from_millis(1_700_000_000_000),
            "correlationId": "c-1", "causationId": Bson::Null, "traceparent": Bson::Null,
            "payload": {
                "sessionId": "s-1", "userId": "u-1", "device": Bson::Null, "userAgent": "curl",
                "createdAt": "2026-11-22T10:00:00Z", "expiresAt": DateTime::from_millis(1_700_003_600_000),
            },
        }
    }

    #[test]
    fn an_event_record_converts_and_encodes() {
        let schema = created();
        let value = bson_to_avro(&Bson::Document(record_doc()), &schema).unwrap();
        let bytes = encode_confluent(42, &schema, value.clone()).unwrap();
        let (id, mut datum) = split_confluent(&bytes).unwrap();
        assert_eq!(id, 42);
        let back = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut datum)
            .unwrap();
        assert_eq!(back, value);
        assert!(split_confluent(&[1, 0, 0, 0, 1]).is_none() && split_confluent(&[0, 1]).is_none());
        let Value::Record(fields) = value else { panic!() };
        assert_eq!(fields[6], ("correlationId".into(), Value::Union(1, Box::new(Value::String("c-1".into())))));
    }

    #[test]
    fn errors_name_the_field() {
        let schema = created();
        let mut d = record_doc();
        d.get_document_mut("payload").unwrap().insert("expiresAt", "tomorrow");
        let e = bson_to_avro(&Bson::Document(d), &schema).unwrap_err();
        assert_eq!(e.path, "$.payload.expiresAt");

        let mut d = record_doc();
        d.get_document_mut("payload").unwrap().remove("userId");
        assert_eq!(bson_to_avro(&Bson::Document(d), &schema).unwrap_err().path, "$.payload.userId");

        let mut d = record_doc();
        d.get_document_mut("payload").unwrap().insert("surprise", 1);
        let e = bson_to_avro(&Bson::Document(d), &schema).unwrap_err();
        assert!(e.message.contains("'surprise'"), "{e}");

        let mut d = record_doc();
        d.insert("eventVersion", 1_i64 << 40);
        assert!(bson_to_avro(&Bson::Document(d), &schema).unwrap_err().message.contains("does not fit"));

        let mut d = record_doc();
        d.insert("eventId", "not-a-uuid");
        assert_eq!(bson_to_avro(&Bson::Document(d), &schema).unwrap_err().path, "$.eventId");
    }

    #[test]
    fn missing_fields_with_defaults_take_the_default() {
        let schema = created();
        let mut d = record_doc();
        d.remove("traceparent");
        let Value::Record(fields) = bson_to_avro(&Bson::Document(d), &schema).unwrap() else { panic!() };
        assert_eq!(fields[8], ("traceparent".into(), Value::Union(0, Box::new(Value::Null))));
    }

    #[test]
    fn enums_accept_only_their_symbols() {
        let schema = event_schema("SessionEnded", 1).unwrap().parse().unwrap();
        let Schema::Record(r) = &schema else { panic!() };
        let payload = &r.fields[r.lookup["payload"]].schema;
        let ok = doc! {"sessionId": "s", "userId": "u", "reason": "logout", "endedAt": 0_i64};
        assert!(bson_to_avro(&Bson::Document(ok), payload).is_ok());
        let bad = doc! {"sessionId": "s", "userId": "u", "reason": "bored", "endedAt": 0_i64};
        assert!(bson_to_avro(&Bson::Document(bad), payload).unwrap_err().message.contains("bored"));
    }
}
