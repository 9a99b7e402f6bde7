//! Benchmark: the relay's CPU per event between the change stream and the
//! producer, step by step, on one core and without I/O:
//!   - reading the row's head (`EventRow::from_raw`), against a walk over
//!     the row's top-level fields (the least any reader of the row does);
//!   - the Avro value (`encode_confluent_as`, straight from the BSON bytes),
//!     against apache-avro writing the same event from a ready-made value
//!     (its own encoder, with the parsing already done);
//!   - the record headers (`event_headers`);
//!   - the route (`EventEncoder::route`: the topic, the schema and its
//!     registry id, kept per kind of event), against working it out afresh
//!     (`EventEncoder::resolve`: the topic name built, the schema and its
//!     registry id from their caches), beside what the bench's own
//!     `block_on` costs for a future that is ready at once;
//!   - all of it as the publishing loop calls it (`EventEncoder::encode`:
//!     the topic, the schema and its registry id, the value, the headers).
//!
//! Two kinds of event: the Session sample's, as the relay bench publishes
//! them, and an order event with nested lines, an enum and optional fields,
//! written as BSON the way an application in any language writes its row,
//! with its schema from a file.
//!
//! Needs the registry of the stack for the registry ids of the last step
//! (`scripts/stack.sh up registry && . .stack/env`); run with
//! `make bench-encode`. Prints a table and writes it to
//! `$CARGO_TARGET_DIR/bench/relay_encode.md`.

mod report;

use report::{Figure, Panel};

use std::{collections::HashMap, fmt::Write, path::Path, sync::Arc, time::Instant};

use apache_avro::{Schema, reader::datum::GenericDatumReader, types::Value, writer::datum::GenericDatumWriter};
use mongodb::bson::{Bson, DateTime, RawBsonRef, RawDocumentBuf, doc};
use outbox_operator::{
    avro::{ValueLayout, catalog::SchemaDir, encode_confluent_as, event_schema},
    domain::{
        event::{EventEnvelope, EventMetadata, now_millis},
        session::{ClientInfo, CreateSession, Session, SessionPolicy},
    },
    kafka::topics::EventTopicMapper,
    outbox::{EventRow, OutboxDocument},
    registry_client::{SubjectStrategy, ids::SchemaIds},
    relay::{
        encoding::{EventEncoder, event_headers},
        schemas::{EventSchemas, SchemaSource},
    },
};

/// Rows per kind of event, and timed passes over them (the median shown).
const ROWS: usize = 20_000;
const PASSES: usize = 7;

const SESSION_SCHEMAS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas");

const ORDER_PLACED: &str = r#"{
  "type": "record", "name": "OrderPlaced", "namespace": "com.example.orders",
  "fields": [
    {"name": "eventId", "type": {"type": "string", "logicalType": "uuid"}},
    {"name": "aggregateType", "type": "string"},
    {"name": "aggregateId", "type": "string"},
    {"name": "eventName", "type": "string"},
    {"name": "eventVersion", "type": "int"},
    {"name": "occurredOn", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "correlationId", "type": ["null", "string"], "default": null},
    {"name": "causationId", "type": ["null", "string"], "default": null},
    {"name": "traceparent", "type": ["null", "string"], "default": null},
    {"name": "payload", "type": {"type": "record", "name": "OrderPlacedPayload", "fields": [
      {"name": "orderId", "type": "string"},
      {"name": "customerId", "type": "string"},
      {"name": "currency", "type": {"type": "enum", "name": "Currency", "symbols": ["EUR", "USD", "GBP"]}},
      {"name": "lines", "type": {"type": "array", "items": {"type": "record", "name": "OrderLine", "fields": [
        {"name": "sku", "type": "string"},
        {"name": "quantity", "type": "int"},
        {"name": "unitPriceCents", "type": "long"}
      ]}}},
      {"name": "totalCents", "type": "long"},
      {"name": "note", "type": ["null", "string"], "default": null},
      {"name": "placedAt", "type": {"type": "long", "logicalType": "timestamp-millis"}}
    ]}}
  ]
}"#;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run `scripts/stack.sh up registry && . .stack/env` (or `make bench-encode`)")
    })
}

/// Session rows as the relay bench writes them (created, then refreshed).
fn session_rows() -> Vec<EventRow> {
    let policy = SessionPolicy::default();
    let meta = EventMetadata { correlation_id: Some("bench".into()), ..Default::default() };
    let mut rows = Vec::with_capacity(ROWS);
    while rows.len() < ROWS {
        let cmd =
            CreateSession { user_id: format!("user-{}", rows.len()), ttl_seconds: None, client: ClientInfo::default() };
        let (mut s, created) = Session::create(cmd, &policy, now_millis()).unwrap();
        rows.push(
            OutboxDocument::new(&EventEnvelope::wrap(&created, now_millis(), &meta), 256).unwrap().to_event_row(),
        );
        let refreshed = s.refresh(None, &policy, now_millis()).unwrap();
        rows.push(
            OutboxDocument::new(&EventEnvelope::wrap(&refreshed, now_millis(), &meta), 256).unwrap().to_event_row(),
        );
    }
    rows
}

/// Order rows as an application writes them: the envelope, the payload and
/// the relay's bookkeeping fields, in BSON of its own making.
fn order_rows() -> Vec<EventRow> {
    (0..ROWS)
        .map(|i| {
            let lines: Vec<Bson> = (0..1 + i % 4)
                .map(|l| {
                    Bson::Document(
                        doc! {"sku": format!("sku-{l}"), "quantity": 1 + l as i32, "unitPriceCents": 1299_i64},
                    )
                })
                .collect();
            let d = doc! {
                "_id": uuid::Uuid::now_v7().to_string(), "docVersion": 2, "bucket": (i % 256) as i32,
                "aggregateType": "Order", "aggregateId": format!("order-{i}"), "eventName": "OrderPlaced",
                "eventVersion": 1, "occurredOn": DateTime::now(),
                "correlationId": format!("req-{i}"), "causationId": Bson::Null,
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "payload": {
                    "orderId": format!("order-{i}"), "customerId": format!("customer-{}", i % 100), "currency": "EUR",
                    "lines": lines, "totalCents": 5196_i64,
                    "note": if i % 2 == 0 { Bson::Null } else { Bson::String("leave at the door".into()) },
                    "placedAt": DateTime::now(),
                },
            };
            EventRow::from_raw(RawDocumentBuf::from_document(&d).unwrap()).unwrap()
        })
        .collect()
}

/// The median of `PASSES` timed passes of `step` over `rows`, in ns per row.
fn timed<T>(rows: &[T], step: impl FnMut(&T)) -> f64 {
    let refs: Vec<&T> = rows.iter().collect();
    timed_owned(&refs, step)
}

/// The same, for a step that consumes its input: a fresh copy per pass is
/// made outside the timing.
fn timed_owned<T: Clone>(rows: &[T], mut step: impl FnMut(T)) -> f64 {
    let mut passes: Vec<f64> = (0..PASSES)
        .map(|_| {
            let copies = rows.to_vec();
            let start = Instant::now();
            for row in copies {
                step(row);
            }
            start.elapsed().as_nanos() as f64 / rows.len() as f64
        })
        .collect();
    passes.sort_by(f64::total_cmp);
    passes[PASSES / 2]
}

struct Kind {
    name: &'static str,
    rows: Vec<EventRow>,
    /// The schema each row's event is encoded with, by event name.
    schemas: HashMap<String, Schema>,
    encoder: EventEncoder,
}

/// One kind's figures, ns per event, and its mean Avro datum in bytes.
struct Figures {
    walk: f64,
    head: f64,
    apache_avro: f64,
    avro: f64,
    headers: f64,
    ready: f64,
    resolve: f64,
    route: f64,
    encode: f64,
    bytes: usize,
}

fn measure(kind: &Kind, runtime: &tokio::runtime::Runtime) -> Figures {
    let rows = &kind.rows;
    // One registration per subject before timing: the loop's registry ids
    // come from the cache.
    let first = runtime.block_on(kind.encoder.encode(&rows[0])).unwrap();
    let id = u32::from_be_bytes(first.payload[1..5].try_into().unwrap());
    let schema = |row: &EventRow| &kind.schemas[&row.event_name];

    let raws: Vec<RawDocumentBuf> = rows.iter().map(|r| r.raw.clone()).collect();
    let walk = timed(&raws, |raw| {
        let mut n = 0;
        for element in raw {
            let (key, value) = element.unwrap();
            n += key.len() + usize::from(matches!(value, RawBsonRef::Null));
        }
        std::hint::black_box(n);
    });
    let head = timed_owned(&raws, |raw| {
        std::hint::black_box(EventRow::from_raw(raw).unwrap());
    });
    let avro = timed(rows, |row| {
        std::hint::black_box(encode_confluent_as(ValueLayout::Envelope, id, schema(row), &row.raw).unwrap());
    });
    // The same events as apache-avro values, read back from the encoder's
    // output (so both encode exactly the same data), and the datums' mean
    // size.
    let mut datum_bytes = 0;
    let values: Vec<(&str, Value)> = rows
        .iter()
        .map(|row| {
            let out = encode_confluent_as(ValueLayout::Envelope, id, schema(row), &row.raw).unwrap();
            datum_bytes += out.len() - 5;
            let reader = GenericDatumReader::builder(schema(row)).build().unwrap();
            (row.event_name.as_str(), reader.read_value(&mut &out[5..]).unwrap())
        })
        .collect();
    let bytes = datum_bytes / rows.len();
    // apache-avro's writer as its users make it (values checked against
    // the schema), one per schema, made before timing.
    let writers: HashMap<&str, GenericDatumWriter<'_>> =
        kind.schemas.iter().map(|(name, s)| (name.as_str(), GenericDatumWriter::builder(s).build().unwrap())).collect();
    let apache_avro = timed(&values, |(schema, value)| {
        let mut out = Vec::with_capacity(5 + bytes);
        out.push(0);
        out.extend_from_slice(&id.to_be_bytes());
        writers[schema].write_value_ref(&mut out, value).unwrap();
        std::hint::black_box(out);
    });
    let headers = timed(rows, |row| {
        std::hint::black_box(event_headers(row, None));
    });
    // What the bench's own `block_on` costs, in the two steps after it
    // (the loop awaits inside its task instead).
    let ready = timed(rows, |row| {
        std::hint::black_box(runtime.block_on(async { row.event_version }));
    });
    let resolve = timed(rows, |row| {
        let version = row.event_version as u32;
        let resolved = runtime.block_on(kind.encoder.resolve(&row.aggregate_type, &row.event_name, version));
        let (route, _) = resolved.unwrap();
        std::hint::black_box((route.topic, route.chosen.id()));
    });
    let route = timed(rows, |row| {
        let (route, _) = runtime.block_on(kind.encoder.route(row)).unwrap();
        std::hint::black_box((route.topic, route.chosen.id()));
    });
    let encode = timed(rows, |row| {
        std::hint::black_box(runtime.block_on(kind.encoder.encode(row)).unwrap());
    });
    Figures { walk, head, apache_avro, avro, headers, ready, resolve, route, encode, bytes }
}

/// A row of the table: its label and its figure.
type Step = (&'static str, fn(&Figures) -> f64);

fn encoder(schemas: SchemaDir, registry: &str) -> EventEncoder {
    EventEncoder::new(
        EventTopicMapper::default(),
        Arc::new(EventSchemas::new(
            SchemaSource::Files(Arc::new(schemas)),
            SubjectStrategy::TopicRecordName,
            SchemaIds::new(registry, true),
        )),
        ValueLayout::Envelope,
    )
}

fn main() {
    outbox_operator::telemetry::install_crypto_provider();
    let registry = env("SCHEMA_REGISTRY_URL");
    // Every step runs on this thread, the encoder's calls included (a
    // cached registry id does not wait).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let orders_dir = std::env::temp_dir().join(format!("bench-encode-{}", std::process::id()));
    std::fs::create_dir_all(&orders_dir).unwrap();
    std::fs::write(orders_dir.join("Order.OrderPlaced.v1.avsc"), ORDER_PLACED).unwrap();

    eprintln!("preparing {ROWS} rows of each kind ...");
    let session_schemas = ["SessionCreated", "SessionRefreshed"]
        .map(|name| (name.to_owned(), event_schema(name, 1).unwrap().parse().unwrap()));
    let kinds = [
        Kind {
            name: "Session sample",
            rows: session_rows(),
            schemas: session_schemas.into_iter().collect(),
            encoder: encoder(SchemaDir::open(Path::new(SESSION_SCHEMAS)).unwrap(), &registry),
        },
        Kind {
            name: "order (own schema file)",
            rows: order_rows(),
            schemas: [("OrderPlaced".to_owned(), Schema::parse_str(ORDER_PLACED).unwrap())].into_iter().collect(),
            encoder: encoder(SchemaDir::open(&orders_dir).unwrap(), &registry),
        },
    ];
    let figures: Vec<Figures> = kinds
        .iter()
        .map(|kind| {
            eprintln!("{}: {PASSES} passes of each step ...", kind.name);
            measure(kind, &runtime)
        })
        .collect();
    std::fs::remove_dir_all(&orders_dir).ok();

    let steps: [Step; 10] = [
        ("baseline: a walk over the row's fields", |f| f.walk),
        ("row head (`EventRow::from_raw`)", |f| f.head),
        ("baseline: apache-avro from a ready value", |f| f.apache_avro),
        ("Avro from the row's bytes (`encode_confluent_as`)", |f| f.avro),
        ("headers (`event_headers`)", |f| f.headers),
        ("the bench's `block_on` of a ready future (in the three rows below)", |f| f.ready),
        ("baseline: the route worked out afresh (`EventEncoder::resolve`)", |f| f.resolve),
        ("the route, kept per kind of event (`EventEncoder::route`)", |f| f.route),
        ("as the loop calls it (`EventEncoder::encode`)", |f| f.encode),
        ("row head + `encode`", |f| f.head + f.encode),
    ];
    let mut table = format!(
        "CPU per event, ns (median of {PASSES} passes over {ROWS} rows, one thread)\n\n| step | {} | {} |\n|---|---:|---:|\n",
        kinds[0].name, kinds[1].name
    );
    for (label, of) in steps {
        let _ = writeln!(table, "| {label} | {:.0} | {:.0} |", of(&figures[0]), of(&figures[1]));
    }
    let _ = writeln!(table, "| Avro datum, mean bytes | {} | {} |", figures[0].bytes, figures[1].bytes);
    let figure = Figure {
        title: "The relay's CPU per event between the stream and the producer".into(),
        panels: vec![Panel::Bars {
            title: "ns per event, one thread".into(),
            unit: "ns".into(),
            groups: steps
                .iter()
                .map(|(label, of)| {
                    (label.to_string(), kinds.iter().zip(&figures).map(|(k, f)| (k.name.to_owned(), of(f))).collect())
                })
                .collect(),
        }],
    };
    report::write("relay_encode", &table, &figure);
}
