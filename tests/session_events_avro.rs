//! Every event the Session domain emits encodes against its schema in
//! schemas/ through the real Schema Registry, and decodes back unchanged.

mod common;

use apache_avro::types::Value;
use chrono::Utc;
use mongodb::bson::Bson;
use outbox_operator::{
    avro::{bson_to_avro, encode_confluent, event_schema},
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

        let value = bson_to_avro(&Bson::Document(row.event_record()), &schema)
            .unwrap_or_else(|e| panic!("{} does not fit {}: {e}", row.event_name, entry.path()));
        let bytes = encode_confluent(registered.id, &schema, value.clone()).unwrap();

        let decoded = AvroDecoder::new(SrSettings::new(common::schema_registry_url()))
            .decode(Some(&bytes))
            .await
            .unwrap_or_else(|e| panic!("decoding {}: {e}", row.event_name));
        assert_eq!(decoded.value, value, "{} round-trips through the registry", row.event_name);
        let Value::Record(fields) = decoded.value else { panic!() };
        assert_eq!(fields[3], ("eventName".into(), Value::String(row.event_name.clone())));
    }
}
