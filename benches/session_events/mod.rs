//! Session events for the consumer benchmarks: encoded as the relay
//! encodes them (Confluent framing, the registry's ids) and produced to a
//! topic. Each benchmark uses a part of it.
#![allow(dead_code)]

use outbox_operator::{
    avro::{encode_confluent, event_schema},
    domain::{
        event::{EventEnvelope, EventMetadata, now_millis},
        session::{ClientInfo, CreateSession, Session, SessionPolicy},
    },
    kafka::producer_config,
    outbox::OutboxDocument,
    registry_client::ids::SchemaIds,
};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};

/// One encoded event: key (aggregate id), event name, event id, Confluent-framed Avro.
pub struct Encoded {
    pub key: String,
    pub name: String,
    pub id: String,
    pub payload: Vec<u8>,
}

/// `n` Session events (created, refreshed, ...) encoded for `topic`.
pub async fn encode(registry: &str, topic: &str, n: usize) -> Vec<Encoded> {
    let policy = SessionPolicy::default();
    let meta = EventMetadata::default();
    let ids = SchemaIds::new(registry, true);
    let mut rows = Vec::with_capacity(n);
    for i in 0..n / 2 {
        let now = now_millis();
        let cmd =
            CreateSession { user_id: format!("user-{}", i % 1000), ttl_seconds: None, client: ClientInfo::default() };
        let (mut s, created) = Session::create(cmd, &policy, now).unwrap();
        rows.push(OutboxDocument::new(&EventEnvelope::wrap(&created, now, &meta), 256).unwrap());
        let refreshed = s.refresh(None, &policy, now).unwrap();
        rows.push(OutboxDocument::new(&EventEnvelope::wrap(&refreshed, now, &meta), 256).unwrap());
    }
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let entry = event_schema(&row.event_name, 1).unwrap();
        let schema = entry.parse().unwrap();
        let full = format!("dev.outbox.session.{}", row.event_name);
        let id = ids.id(&format!("{topic}-{full}"), &full, entry.text).await.unwrap();
        out.push(Encoded {
            payload: encode_confluent(id, &schema, &row.to_event_row().raw).unwrap(),
            key: row.aggregate_id.clone(),
            name: row.event_name.clone(),
            id: row.id.clone(),
        });
    }
    out
}

pub fn record<'a>(topic: &'a str, e: &'a Encoded) -> FutureRecord<'a, str, [u8]> {
    let headers = OwnedHeaders::new().insert(Header { key: "eventName", value: Some(e.name.as_str()) });
    FutureRecord::to(topic).key(e.key.as_str()).payload(e.payload.as_slice()).headers(headers)
}

/// Produce `n` encoded Session events to `topic`.
pub async fn produce(bootstrap: &str, registry: &str, topic: &str, n: usize) {
    let producer: FutureProducer = producer_config(bootstrap, &[]).unwrap().create().unwrap();
    let events = encode(registry, topic, n).await;
    for chunk in events.chunks(2000) {
        let sends = chunk.iter().map(|e| producer.send(record(topic, e), Timeout::Never));
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| e).unwrap();
        }
    }
}
