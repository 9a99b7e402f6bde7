//! Every event the Session domain emits encodes against its schema in
//! schemas/ through the real Schema Registry, and decodes back unchanged.

mod common;

use apache_avro::types::Value;
use chrono::Utc;
use mongodb::bson::Bson;
use outbox_operator::{
    avro::{encode_confluent, event_schema},
    domain::{
        event::{EventEnvelope, EventMetadata, new_traceparent},
        session::{ClientInfo, CreateSession, EndReason, Session, SessionPolicy},
    },
    outbox::OutboxDocument,
};
use schema_registry_converter::{
    async_impl::{
        avro::AvroDecoder,
        schema_registry::{SrSettings, post_schema},
    },
    schema_registry_common::{SchemaType, SuppliedSchema},
};

#[tokio::test]
async fn every_session_event_encodes_through_the_registry() {
    outbox_operator::telemetry::install_crypto_provider();
    let sr = SrSettings::new(common::schema_registry_url());
    let policy = SessionPolicy::default();
    let now = Utc::now();
    let meta =
        EventMetadata { correlation_id: Some("corr".into()), causation_id: None, traceparent: Some(new_traceparent()) };
    let cmd = CreateSession {
        user_id: "user-1".into(),
        ttl_seconds: Some(600),
        client: ClientInfo { device: Some("phone".into()), user_agent: None },
    };
    let (mut session, created) = Session::create(cmd, &policy, now).unwrap();
    let refreshed = session.refresh(Some(900), &policy, now).unwrap();
    let ended = session.end(EndReason::Logout, now).unwrap();
    let envelopes = [
        EventEnvelope::wrap(&created, now, &meta),
        EventEnvelope::wrap(&refreshed, now, &meta),
        EventEnvelope::wrap(&ended, now, &meta),
    ];
    let topic = common::unique("session-events");
    for envelope in &envelopes {
        let row = OutboxDocument::new(envelope, 256).unwrap();
        let entry = event_schema(&row.event_name, row.event_version as u32)
            .unwrap_or_else(|| panic!("no schema for {} v{}", row.event_name, row.event_version));
        let schema = entry.parse().unwrap();
        let Some(fullname) = (match &schema {
            apache_avro::Schema::Record(r) => Some(r.name.fullname(None)),
            _ => None,
        }) else {
            panic!("{} is not a record", entry.path())
        };
        // TopicRecordNameStrategy: several event types share one topic.
        let subject = format!("{topic}-{fullname}");
        let supplied = SuppliedSchema::new(Some(fullname.clone()), SchemaType::Avro, entry.text.to_owned());
        let registered = post_schema(&sr, subject, supplied).await.unwrap_or_else(|e| {
            panic!("Schema Registry at {} refused {}: {e}", common::schema_registry_url(), entry.path())
        });

        let bytes = encode_confluent(registered.id, &schema, &row.to_event_row().raw)
            .unwrap_or_else(|e| panic!("{} does not fit {}: {e}", row.event_name, entry.path()));

        // Decoded by another implementation (schema_registry_converter,
        // fetching the writer schema by id): the envelope and the payload
        // come back as written.
        let decoded = AvroDecoder::new(SrSettings::new(common::schema_registry_url()))
            .decode(Some(&bytes))
            .await
            .unwrap_or_else(|e| panic!("decoding {}: {e}", row.event_name));
        let Value::Record(fields) = decoded.value else { panic!() };
        let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get("eventId"), Value::Uuid(row.id.parse().unwrap()));
        assert_eq!(get("eventName"), Value::String(row.event_name.clone()));
        assert_eq!(get("aggregateId"), Value::String(row.aggregate_id.clone()));
        assert_eq!(get("occurredOn"), Value::TimestampMillis(row.occurred_on.timestamp_millis()));
        assert_eq!(get("correlationId"), Value::Union(1, Box::new(Value::String("corr".into()))));
        let Value::Record(payload) = get("payload") else { panic!("payload is a record") };
        for (name, value) in &payload {
            let stored = row.payload.get(name);
            match (value, stored) {
                (Value::String(s), Some(Bson::String(w))) => assert_eq!(s, w, "payload.{name}"),
                (Value::TimestampMillis(t), Some(Bson::String(w))) => {
                    assert_eq!(
                        *t,
                        chrono::DateTime::parse_from_rfc3339(w).unwrap().timestamp_millis(),
                        "payload.{name}"
                    )
                }
                _ => {}
            }
        }
        assert_eq!(payload.len(), row.payload.len(), "every payload field, no more");
    }
}
