//! Schema-directed encoding of an outbox row straight from its stored BSON
//! bytes into the Avro binary datum, with no document tree, Avro value tree
//! or copy in between: the relay's per-event cost (a perf profile of the
//! relay showed allocation and copying dominating when the row went through
//! a BSON document, an event record and an Avro value).
//!
//! Strict, like a schema should be: every record field must be present (or
//! have a default), no unknown fields, numbers must fit. Timestamps accept
//! BSON dates, epoch numbers and RFC 3339 strings. Errors name the field
//! (`$.payload.expiresAt`).

use std::fmt;

use apache_avro::{
    Schema,
    schema::{RecordField, RecordSchema, UuidSchema},
};
use mongodb::bson::{Bson, RawBsonRef, RawDocument, RawDocumentBuf};

/// A value that does not fit its schema, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConvertError {
    /// JSONPath-like location, e.g. `$.payload.expiresAt`.
    pub path: String,
    pub message: String,
}

/// The event record's fields and where an outbox row keeps them: the row
/// is the record plus relay bookkeeping, with the event id as `_id`. The
/// last three are optional metadata (see [`OPTIONAL_METADATA`]).
const ENVELOPE: [(&str, &str); 10] = [
    ("eventId", "_id"),
    ("aggregateType", "aggregateType"),
    ("aggregateId", "aggregateId"),
    ("eventName", "eventName"),
    ("eventVersion", "eventVersion"),
    ("occurredOn", "occurredOn"),
    ("correlationId", "correlationId"),
    ("causationId", "causationId"),
    ("traceparent", "traceparent"),
    ("payload", "payload"),
];

/// Envelope fields an event schema may leave out: the record headers carry
/// them whatever the schema holds, so a schema without them loses nothing.
const OPTIONAL_METADATA: [&str; 3] = ["correlationId", "causationId", "traceparent"];

/// Append the Avro datum of the event an outbox `row` carries (its
/// envelope fields and payload; bookkeeping such as `status` or `bucket`
/// stays out) to `out`, as `schema` (an event schema) lays it out. On
/// error `out` is left as it was.
pub fn encode_event(row: &RawDocument, schema: &Schema, out: &mut Vec<u8>) -> Result<(), ConvertError> {
    let mark = out.len();
    let result = match schema {
        Schema::Record(r) => Encoder { out }.event_record(row, r),
        other => Err(err(&Path::Root, format!("an event schema is a record, not {}", schema_kind(other)))),
    };
    if result.is_err() {
        out.truncate(mark);
    }
    result
}

/// Append the Avro datum of the row's `payload` alone to `out`, as
/// `schema` (the payload record) lays it out: the value of Debezium's
/// outbox layout, whose envelope travels in headers. On error `out` is
/// left as it was.
pub fn encode_payload(row: &RawDocument, schema: &Schema, out: &mut Vec<u8>) -> Result<(), ConvertError> {
    let mark = out.len();
    let root = Path::Root;
    let path = Path::Field(&root, "payload");
    let result = match (row.get("payload"), schema) {
        (Ok(Some(RawBsonRef::Document(d))), Schema::Record(r)) => Encoder { out }.record(d, r, &path),
        (Ok(Some(other)), Schema::Record(_)) => {
            Err(err(&path, format!("expected a document, found {}", bson_kind(other))))
        }
        (Ok(None), Schema::Record(_)) => Err(err(&path, "missing")),
        (Err(e), _) => Err(invalid(&path, e)),
        (_, other) => Err(err(&path, format!("a payload schema is a record, not {}", schema_kind(other)))),
    };
    if result.is_err() {
        out.truncate(mark);
    }
    result
}

/// Where a value sits in the event, built as the encoder descends and
/// printed only for an error.
enum Path<'a> {
    Root,
    Field(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => f.write_str("$"),
            Path::Field(parent, name) => write!(f, "{parent}.{name}"),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

fn err(path: &Path<'_>, message: impl Into<String>) -> ConvertError {
    ConvertError { path: path.to_string(), message: message.into() }
}

fn invalid(path: &Path<'_>, e: mongodb::bson::raw::Error) -> ConvertError {
    err(path, format!("invalid BSON: {e}"))
}

fn bson_kind(v: RawBsonRef<'_>) -> &'static str {
    match v {
        RawBsonRef::Null => "null",
        RawBsonRef::Boolean(_) => "boolean",
        RawBsonRef::Int32(_) => "int32",
        RawBsonRef::Int64(_) => "int64",
        RawBsonRef::Double(_) => "double",
        RawBsonRef::String(_) => "string",
        RawBsonRef::Document(_) => "document",
        RawBsonRef::Array(_) => "array",
        RawBsonRef::DateTime(_) => "date",
        RawBsonRef::Binary(_) => "binary",
        _ => "unsupported BSON type",
    }
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

fn integer(v: RawBsonRef<'_>) -> Option<i64> {
    match v {
        RawBsonRef::Int32(i) => Some(i64::from(i)),
        RawBsonRef::Int64(i) => Some(i),
        RawBsonRef::Double(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i64),
        _ => None,
    }
}

fn timestamp_millis(v: RawBsonRef<'_>, path: &Path<'_>) -> Result<i64, ConvertError> {
    match v {
        RawBsonRef::DateTime(d) => Ok(d.timestamp_millis()),
        RawBsonRef::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|d| d.timestamp_millis())
            .map_err(|e| err(path, format!("'{s}' is not an RFC 3339 timestamp ({e})"))),
        other => integer(other).ok_or_else(|| err(path, format!("expected a timestamp, found {}", bson_kind(other)))),
    }
}

/// Whether a value of `v`'s BSON type can fit `schema` at all: false only
/// where [`Encoder::value`] refuses the type outright.
fn may_fit(v: RawBsonRef<'_>, schema: &Schema) -> bool {
    match schema {
        Schema::Null => matches!(v, RawBsonRef::Null),
        Schema::Boolean => matches!(v, RawBsonRef::Boolean(_)),
        Schema::Int | Schema::Long => integer(v).is_some(),
        Schema::Float | Schema::Double => matches!(v, RawBsonRef::Double(_)) || integer(v).is_some(),
        Schema::String | Schema::Uuid(UuidSchema::String) | Schema::Enum(_) => matches!(v, RawBsonRef::String(_)),
        Schema::Bytes => matches!(v, RawBsonRef::Binary(_)),
        Schema::TimestampMillis | Schema::TimestampMicros => {
            matches!(v, RawBsonRef::DateTime(_) | RawBsonRef::String(_)) || integer(v).is_some()
        }
        Schema::Array(_) => matches!(v, RawBsonRef::Array(_)),
        Schema::Map(_) | Schema::Record(_) => matches!(v, RawBsonRef::Document(_)),
        _ => true,
    }
}

/// A field's default, as BSON (defaults are rare: a field the writer did
/// not know yet).
fn with_default<T>(
    field: &RecordField,
    path: &Path<'_>,
    encode: impl FnOnce(RawBsonRef<'_>) -> Result<T, ConvertError>,
) -> Result<T, ConvertError> {
    let Some(default) = &field.default else {
        return Err(err(path, "missing (the schema gives no default)"));
    };
    let value = Bson::try_from(default.clone()).map_err(|e| err(path, e.to_string()))?;
    let holder =
        RawDocumentBuf::from_document(&mongodb::bson::doc! {"v": value}).map_err(|e| err(path, e.to_string()))?;
    let v = holder.get("v").map_err(|e| invalid(path, e))?.ok_or_else(|| err(path, "default lost"))?;
    encode(v)
}

struct Encoder<'o> {
    out: &'o mut Vec<u8>,
}

impl Encoder<'_> {
    fn long(&mut self, n: i64) {
        // Zig-zag, then base-128 varint, low groups first.
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        while z >= 0x80 {
            self.out.push((z as u8) | 0x80);
            z >>= 7;
        }
        self.out.push(z as u8);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.long(b.len() as i64);
        self.out.extend_from_slice(b);
    }

    /// The outbox row's event record: envelope fields from the row (the
    /// event id from `_id`), bookkeeping ignored. The row is read in one
    /// pass, each envelope value kept at its field's place in the schema.
    fn event_record(&mut self, row: &RawDocument, r: &RecordSchema) -> Result<(), ConvertError> {
        let root = Path::Root;
        let mut required = ENVELOPE.iter().filter(|(name, _)| !OPTIONAL_METADATA.contains(name));
        if let Some((unknown, _)) = required.find(|(name, _)| !r.lookup.contains_key(*name)) {
            return Err(err(&root, format!("field '{unknown}' is not in schema {}", r.name.fullname(None))));
        }
        let mut values: Vec<Option<RawBsonRef<'_>>> = vec![None; r.fields.len()];
        for element in row {
            let (key, value) = element.map_err(|e| invalid(&root, e))?;
            let Some((name, _)) = ENVELOPE.iter().find(|(_, stored)| *stored == key) else { continue };
            if let Some(&i) = r.lookup.get(*name) {
                // The first of a repeated key counts, as a lookup would find.
                values[i].get_or_insert(value);
            }
        }
        for (field, value) in r.fields.iter().zip(values) {
            let path = Path::Field(&root, &field.name);
            if ENVELOPE.iter().any(|(name, _)| *name == field.name) {
                // An envelope field the row lacks is null (optional metadata).
                self.value(value.unwrap_or(RawBsonRef::Null), &field.schema, &path)?;
            } else {
                with_default(field, &path, |v| self.value(v, &field.schema, &path))?;
            }
        }
        Ok(())
    }

    /// A record from a document, read in one pass: each key's value is
    /// kept at its field's place in the schema (a key the schema does not
    /// have is refused), then the fields are written in schema order.
    fn record(&mut self, d: &RawDocument, r: &RecordSchema, path: &Path<'_>) -> Result<(), ConvertError> {
        let mut values: Vec<Option<RawBsonRef<'_>>> = vec![None; r.fields.len()];
        for element in d {
            let (key, value) = element.map_err(|e| invalid(path, e))?;
            match r.lookup.get(key) {
                // The first of a repeated key counts, as a lookup would find.
                Some(&i) => {
                    values[i].get_or_insert(value);
                }
                None => return Err(err(path, format!("field '{key}' is not in schema {}", r.name.fullname(None)))),
            }
        }
        for (field, value) in r.fields.iter().zip(values) {
            let path = Path::Field(path, &field.name);
            match value {
                Some(v) => self.value(v, &field.schema, &path)?,
                None => with_default(field, &path, |v| self.value(v, &field.schema, &path))?,
            }
        }
        Ok(())
    }

    fn value(&mut self, v: RawBsonRef<'_>, schema: &Schema, path: &Path<'_>) -> Result<(), ConvertError> {
        let mismatch = || err(path, format!("expected {}, found {}", schema_kind(schema), bson_kind(v)));
        let out_of_range = |n: i64| err(path, format!("{n} does not fit {}", schema_kind(schema)));
        match schema {
            Schema::Null => match v {
                RawBsonRef::Null => {}
                _ => return Err(mismatch()),
            },
            Schema::Boolean => match v {
                RawBsonRef::Boolean(b) => self.out.push(u8::from(b)),
                _ => return Err(mismatch()),
            },
            Schema::Int => {
                let n = integer(v).ok_or_else(mismatch)?;
                self.long(i64::from(i32::try_from(n).map_err(|_| out_of_range(n))?));
            }
            Schema::Long => self.long(integer(v).ok_or_else(mismatch)?),
            Schema::Float | Schema::Double => {
                let f = match v {
                    RawBsonRef::Double(f) => f,
                    other => integer(other).ok_or_else(mismatch)? as f64,
                };
                if matches!(schema, Schema::Float) {
                    self.out.extend_from_slice(&(f as f32).to_le_bytes());
                } else {
                    self.out.extend_from_slice(&f.to_le_bytes());
                }
            }
            Schema::String => match v {
                RawBsonRef::String(s) => self.bytes(s.as_bytes()),
                _ => return Err(mismatch()),
            },
            Schema::Bytes => match v {
                RawBsonRef::Binary(b) => self.bytes(b.bytes),
                _ => return Err(mismatch()),
            },
            Schema::Uuid(UuidSchema::String) => match v {
                RawBsonRef::String(s) => {
                    let id = uuid::Uuid::parse_str(s).map_err(|e| err(path, format!("'{s}' is not a UUID ({e})")))?;
                    // The canonical (lowercase, hyphenated) form, as readers expect.
                    let mut text = [0_u8; uuid::fmt::Hyphenated::LENGTH];
                    self.bytes(id.hyphenated().encode_lower(&mut text).as_bytes());
                }
                _ => return Err(mismatch()),
            },
            Schema::TimestampMillis => self.long(timestamp_millis(v, path)?),
            Schema::TimestampMicros => {
                let ms = timestamp_millis(v, path)?;
                self.long(ms.checked_mul(1000).ok_or_else(|| out_of_range(ms))?);
            }
            Schema::Enum(e) => match v {
                RawBsonRef::String(s) => match e.symbols.iter().position(|sym| sym == s) {
                    Some(i) => self.long(i as i64),
                    None => return Err(err(path, format!("'{s}' is not one of {:?}", e.symbols))),
                },
                _ => return Err(mismatch()),
            },
            Schema::Array(a) => match v {
                RawBsonRef::Array(items) => {
                    let n = items.into_iter().count();
                    if n > 0 {
                        self.long(n as i64);
                        for (i, item) in items.into_iter().enumerate() {
                            let path = Path::Index(path, i);
                            self.value(item.map_err(|e| invalid(&path, e))?, &a.items, &path)?;
                        }
                    }
                    self.long(0);
                }
                _ => return Err(mismatch()),
            },
            Schema::Map(m) => match v {
                RawBsonRef::Document(d) => {
                    let n = d.into_iter().count();
                    if n > 0 {
                        self.long(n as i64);
                        for entry in d {
                            let (key, item) = entry.map_err(|e| invalid(path, e))?;
                            self.bytes(key.as_bytes());
                            self.value(item, &m.types, &Path::Field(path, key))?;
                        }
                    }
                    self.long(0);
                }
                _ => return Err(mismatch()),
            },
            Schema::Record(r) => match v {
                RawBsonRef::Document(d) => self.record(d, r, path)?,
                _ => return Err(mismatch()),
            },
            Schema::Union(u) => {
                // The first branch the value fits. Branches of another kind
                // are passed over without an error to throw away: a union
                // of null and a type is on most optional fields.
                let mark = self.out.len();
                for (i, variant) in u.variants().iter().enumerate() {
                    if !may_fit(v, variant) {
                        continue;
                    }
                    self.long(i as i64);
                    if self.value(v, variant, path).is_ok() {
                        return Ok(());
                    }
                    self.out.truncate(mark);
                }
                // None fits: why, branch by branch (errors only).
                let reasons: Vec<String> = u
                    .variants()
                    .iter()
                    .filter_map(|variant| Encoder { out: &mut Vec::new() }.value(v, variant, path).err())
                    .map(|e| e.message)
                    .collect();
                return Err(err(path, format!("matches no branch of the union ({})", reasons.join("; "))));
            }
            other => return Err(err(path, format!("schema type {} is not supported for events", schema_kind(other)))),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use apache_avro::{reader::datum::GenericDatumReader, types::Value};
    use mongodb::bson::{DateTime, Document, doc};

    use super::*;
    use crate::avro::event_schema;

    fn created() -> Schema {
        event_schema("SessionCreated", 1).unwrap().parse().unwrap()
    }

    /// An outbox row as stored: the envelope, the payload and bookkeeping.
    fn row() -> Document {
        doc! {
            "_id": "0190A4C4-7B5E-7CC0-8F3E-6B1D2F3A4B5C", "docVersion": 2,
            "aggregateType": "Session", "aggregateId": "s-1", "eventName": "SessionCreated", "eventVersion": 1,
            "occurredOn": DateTime::from_millis(1_700_000_000_000),
            "payload": {
                "sessionId": "s-1", "userId": "u-1", "device": Bson::Null, "userAgent": "curl",
                "createdAt": "2026-11-22T10:00:00Z", "expiresAt": DateTime::from_millis(1_700_003_600_000),
            },
            "correlationId": "c-1", "causationId": Bson::Null, "traceparent": Bson::Null,
            "aggregateVersion": 1_i64, "bucket": 7, "status": "failed", "attempts": 2,
        }
    }

    fn encode(d: &Document, schema: &Schema) -> Result<Vec<u8>, ConvertError> {
        let mut out = vec![0xAA];
        let r = encode_event(&RawDocumentBuf::from_document(d).unwrap(), schema, &mut out);
        if r.is_err() {
            assert_eq!(out, [0xAA], "nothing written on error");
        }
        r.map(|()| out[1..].to_vec())
    }

    fn decode(bytes: &[u8], schema: &Schema) -> Value {
        let mut datum = bytes;
        let v = GenericDatumReader::builder(schema).build().unwrap().read_value(&mut datum).unwrap();
        assert!(datum.is_empty(), "the datum is read to its end");
        v
    }

    fn field<'v>(v: &'v Value, name: &str) -> &'v Value {
        let Value::Record(fields) = v else { panic!("not a record: {v:?}") };
        &fields.iter().find(|(k, _)| k == name).unwrap_or_else(|| panic!("no {name}")).1
    }

    #[test]
    fn a_row_encodes_as_its_event_record_and_apache_avro_reads_it_back() {
        let schema = created();
        let v = decode(&encode(&row(), &schema).unwrap(), &schema);
        let id = uuid::Uuid::parse_str("0190a4c4-7b5e-7cc0-8f3e-6b1d2f3a4b5c").unwrap();
        assert_eq!(field(&v, "eventId"), &Value::Uuid(id), "canonical lowercase uuid");
        assert_eq!(field(&v, "eventVersion"), &Value::Int(1));
        assert_eq!(field(&v, "occurredOn"), &Value::TimestampMillis(1_700_000_000_000));
        assert_eq!(field(&v, "correlationId"), &Value::Union(1, Box::new(Value::String("c-1".into()))));
        assert_eq!(field(&v, "causationId"), &Value::Union(0, Box::new(Value::Null)));
        let payload = field(&v, "payload");
        assert_eq!(field(payload, "createdAt"), &Value::TimestampMillis(1_795_341_600_000));
        assert_eq!(field(payload, "userAgent"), &Value::Union(1, Box::new(Value::String("curl".into()))));
        let Value::Record(fields) = &v else { panic!() };
        assert_eq!(fields.len(), 10, "bookkeeping stays out: {fields:?}");
    }

    #[test]
    fn errors_name_the_field_and_leave_the_output_alone() {
        let schema = created();
        let with = |edit: &dyn Fn(&mut Document)| {
            let mut d = row();
            edit(&mut d);
            encode(&d, &schema).unwrap_err()
        };
        let e = with(&|d| {
            d.get_document_mut("payload").unwrap().insert("expiresAt", "tomorrow");
        });
        assert_eq!(e.path, "$.payload.expiresAt");
        let e = with(&|d| {
            d.get_document_mut("payload").unwrap().remove("userId");
        });
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("$.payload.userId", "missing (the schema gives no default)")
        );
        let e = with(&|d| {
            d.get_document_mut("payload").unwrap().insert("surprise", 1);
        });
        assert!(e.message.contains("'surprise'") && e.path == "$.payload", "{e}");
        let e = with(&|d| {
            d.insert("eventVersion", 1_i64 << 40);
        });
        assert!(e.message.contains("does not fit"), "{e}");
        let e = with(&|d| {
            d.insert("_id", "not-a-uuid");
        });
        assert_eq!(e.path, "$.eventId");
        let e = with(&|d| {
            d.insert("correlationId", 5);
        });
        assert_eq!(e.path, "$.correlationId");
        assert!(e.message.starts_with("matches no branch of the union (expected null, found int32; "), "{e}");
    }

    #[test]
    fn missing_fields_take_their_defaults_and_missing_metadata_is_null() {
        let schema = event_schema("SessionCreated", 2).unwrap().parse().unwrap();
        let mut d = row();
        d.remove("traceparent");
        d.get_document_mut("payload").unwrap().remove("device");
        let v = decode(&encode(&d, &schema).unwrap(), &schema);
        assert_eq!(field(&v, "traceparent"), &Value::Union(0, Box::new(Value::Null)));
        assert_eq!(field(field(&v, "payload"), "authMethod"), &Value::String("password".into()));
        assert_eq!(field(field(&v, "payload"), "device"), &Value::Union(0, Box::new(Value::Null)));
    }

    #[test]
    fn a_union_value_takes_the_first_branch_it_fits_past_one_of_its_type_it_does_not() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "P", "fields": [
                {"name": "kind", "type": ["null", {"type": "enum", "name": "K", "symbols": ["A", "B"]}, "string"]},
                {"name": "n", "type": ["null", "string", "int", "long", "double"]}
            ]}"#,
        )
        .unwrap();
        let encoded = |d: Document| {
            let mut out = Vec::new();
            encode_payload(&RawDocumentBuf::from_document(&doc! {"payload": d}).unwrap(), &schema, &mut out)
                .map(|()| decode(&out, &schema))
        };
        let v = encoded(doc! {"kind": "C", "n": 1_i64 << 40}).unwrap();
        assert_eq!(field(&v, "kind"), &Value::Union(2, Box::new(Value::String("C".into()))), "not a symbol: a string");
        assert_eq!(field(&v, "n"), &Value::Union(3, Box::new(Value::Long(1 << 40))), "too big for int: a long");
        let v = encoded(doc! {"kind": "B", "n": 2.5}).unwrap();
        assert_eq!(field(&v, "kind"), &Value::Union(1, Box::new(Value::Enum(1, "B".into()))));
        assert_eq!(field(&v, "n"), &Value::Union(4, Box::new(Value::Double(2.5))));
        let v = encoded(doc! {"kind": Bson::Null, "n": 7_i32}).unwrap();
        assert_eq!(field(&v, "kind"), &Value::Union(0, Box::new(Value::Null)));
        assert_eq!(field(&v, "n"), &Value::Union(2, Box::new(Value::Int(7))));
        let e = encoded(doc! {"kind": true, "n": 1}).unwrap_err();
        assert_eq!(e.path, "$.payload.kind");
        assert_eq!(
            e.message,
            "matches no branch of the union (expected null, found boolean; expected enum K, found boolean; \
             expected string, found boolean)"
        );
    }

    #[test]
    fn enums_accept_only_their_symbols() {
        let schema = event_schema("SessionEnded", 1).unwrap().parse().unwrap();
        let mut d = row();
        d.insert("eventName", "SessionEnded");
        d.insert("payload", doc! {"sessionId": "s", "userId": "u", "reason": "logout", "endedAt": 0_i64});
        let v = decode(&encode(&d, &schema).unwrap(), &schema);
        assert!(matches!(field(field(&v, "payload"), "reason"), Value::Enum(_, s) if s == "logout"));
        d.insert("payload", doc! {"sessionId": "s", "userId": "u", "reason": "bored", "endedAt": 0_i64});
        assert!(encode(&d, &schema).unwrap_err().message.contains("bored"));
    }

    #[test]
    fn every_avro_type_an_event_may_use_round_trips() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "E", "fields": [
                {"name": "eventId", "type": "string"}, {"name": "aggregateType", "type": "string"},
                {"name": "aggregateId", "type": "string"}, {"name": "eventName", "type": "string"},
                {"name": "eventVersion", "type": "long"}, {"name": "occurredOn", "type": {"type": "long", "logicalType": "timestamp-micros"}},
                {"name": "correlationId", "type": ["null", "string"]}, {"name": "causationId", "type": ["null", "string"]},
                {"name": "traceparent", "type": ["null", "string"]},
                {"name": "payload", "type": {"type": "record", "name": "P", "fields": [
                    {"name": "b", "type": "boolean"}, {"name": "f", "type": "float"}, {"name": "d", "type": "double"},
                    {"name": "bytes", "type": "bytes"}, {"name": "neg", "type": "long"},
                    {"name": "list", "type": {"type": "array", "items": "int"}},
                    {"name": "empty", "type": {"type": "array", "items": "int"}},
                    {"name": "tags", "type": {"type": "map", "values": ["null", "string"]}}
                ]}}
            ]}"#,
        )
        .unwrap();
        let mut d = row();
        d.insert(
            "payload",
            doc! {
                "b": true, "f": 1.5, "d": 2, "bytes": Bson::Binary(mongodb::bson::Binary { subtype: mongodb::bson::spec::BinarySubtype::Generic, bytes: vec![1, 2, 255] }),
                "neg": -1_234_567_890_123_i64, "list": [1, -2, 300], "empty": [], "tags": {"a": "x", "b": Bson::Null},
            },
        );
        let v = decode(&encode(&d, &schema).unwrap(), &schema);
        assert_eq!(field(&v, "occurredOn"), &Value::TimestampMicros(1_700_000_000_000_000));
        let p = field(&v, "payload");
        assert_eq!(field(p, "b"), &Value::Boolean(true));
        assert_eq!(field(p, "f"), &Value::Float(1.5));
        assert_eq!(field(p, "d"), &Value::Double(2.0));
        assert_eq!(field(p, "bytes"), &Value::Bytes(vec![1, 2, 255]));
        assert_eq!(field(p, "neg"), &Value::Long(-1_234_567_890_123));
        assert_eq!(field(p, "list"), &Value::Array(vec![Value::Int(1), Value::Int(-2), Value::Int(300)]));
        assert_eq!(field(p, "empty"), &Value::Array(vec![]));
        let Value::Map(tags) = field(p, "tags") else { panic!() };
        assert_eq!(tags["a"], Value::Union(1, Box::new(Value::String("x".into()))));
        assert_eq!(tags["b"], Value::Union(0, Box::new(Value::Null)));
        let mut bad = d.clone();
        bad.get_document_mut("payload").unwrap().insert("list", vec![Bson::Int32(1), Bson::String("two".into())]);
        assert_eq!(encode(&bad, &schema).unwrap_err().path, "$.payload.list[1]");
    }

    #[test]
    fn the_payload_layout_writes_the_payload_record_alone() {
        let envelope = event_schema("SessionEnded", 1).unwrap().parse().unwrap();
        let Schema::Record(r) = &envelope else { panic!() };
        let payload_schema = r.fields.iter().find(|f| f.name == "payload").unwrap().schema.clone();
        let mut d = row();
        d.insert("payload", doc! {"sessionId": "s", "userId": "u", "reason": "logout", "endedAt": 0_i64});
        let mut out = Vec::new();
        encode_payload(&RawDocumentBuf::from_document(&d).unwrap(), &payload_schema, &mut out).unwrap();
        let v = decode(&out, &payload_schema);
        assert_eq!(field(&v, "userId"), &Value::String("u".into()));
        let Value::Record(fields) = &v else { panic!() };
        assert_eq!(fields.len(), 4, "the payload's fields only: {fields:?}");
        d.insert("payload", "text");
        let mut out = vec![1];
        let e = encode_payload(&RawDocumentBuf::from_document(&d).unwrap(), &payload_schema, &mut out).unwrap_err();
        assert_eq!((e.path.as_str(), out.as_slice()), ("$.payload", [1].as_slice()));
    }

    #[test]
    fn a_schema_may_leave_out_the_optional_metadata_which_travels_in_headers() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "Lean", "fields": [
              {"name": "eventId", "type": "string"}, {"name": "aggregateType", "type": "string"},
              {"name": "aggregateId", "type": "string"}, {"name": "eventName", "type": "string"},
              {"name": "eventVersion", "type": "int"},
              {"name": "occurredOn", "type": {"type": "long", "logicalType": "timestamp-millis"}},
              {"name": "payload", "type": {"type": "record", "name": "P", "fields": [
                {"name": "sessionId", "type": "string"}, {"name": "userId", "type": "string"},
                {"name": "device", "type": ["null", "string"]}, {"name": "userAgent", "type": "string"},
                {"name": "createdAt", "type": "string"},
                {"name": "expiresAt", "type": {"type": "long", "logicalType": "timestamp-millis"}}]}}]}"#,
        )
        .unwrap();
        let v = decode(&encode(&row(), &schema).unwrap(), &schema);
        assert_eq!(field(&v, "aggregateType"), &Value::String("Session".into()));
    }

    #[test]
    fn a_schema_without_an_envelope_field_is_refused() {
        let schema =
            Schema::parse_str(r#"{"type": "record", "name": "X", "fields": [{"name": "eventId", "type": "string"}]}"#)
                .unwrap();
        let e = encode(&row(), &schema).unwrap_err();
        assert!(e.message.contains("'aggregateType' is not in schema X"), "{e}");
    }
}
