//! The schema registry speaks the Confluent REST API: used through
//! schema_registry_converter here, and through Confluent's own Python client
//! (tests/python/confluent_client_check.py), unchanged.

mod common;

use apache_avro::types::Value;
use schema_registry_converter::{
    async_impl::{
        avro::{AvroDecoder, AvroEncoder},
        schema_registry::{SrSettings, get_schema_by_id, is_compatible_schema, post_schema},
    },
    schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema},
};

const V1: &str = r#"{"type":"record","name":"SessionCreated","namespace":"smoke","fields":[
  {"name":"sessionId","type":"string"},{"name":"ttlSeconds","type":"int"}]}"#;
const V2_COMPATIBLE: &str = r#"{"type":"record","name":"SessionCreated","namespace":"smoke","fields":[
  {"name":"sessionId","type":"string"},{"name":"ttlSeconds","type":"int"},
  {"name":"device","type":["null","string"],"default":null}]}"#;
const V2_INCOMPATIBLE: &str = r#"{"type":"record","name":"SessionCreated","namespace":"smoke","fields":[
  {"name":"sessionId","type":"string"},{"name":"ttlSeconds","type":"int"},{"name":"device","type":"string"}]}"#;

fn avro(schema: &str) -> SuppliedSchema {
    SuppliedSchema::new(Some("smoke.SessionCreated".into()), SchemaType::Avro, schema.into())
}

fn settings() -> SrSettings {
    SrSettings::new(common::schema_registry_url())
}

fn record() -> Vec<(&'static str, Value)> {
    vec![("sessionId", Value::String("s-1".into())), ("ttlSeconds", Value::Int(3600))]
}

#[tokio::test]
async fn register_fetch_encode_decode_and_check_compatibility() {
    outbox_operator::telemetry::install_crypto_provider();
    let sr = settings();
    let topic = common::unique("smoke-sessions");
    let subject = format!("{topic}-value");

    let registered = post_schema(&sr, subject.clone(), avro(V1)).await.unwrap_or_else(|e| {
        panic!(
            "Schema Registry at {} is not usable ({e}); start it with `scripts/stack.sh up registry`",
            common::schema_registry_url()
        )
    });
    let again = post_schema(&sr, subject.clone(), avro(V1)).await.unwrap();
    assert_eq!(again.id, registered.id, "registering the same schema is idempotent");

    let fetched = get_schema_by_id(registered.id, &sr).await.unwrap();
    let a = apache_avro::Schema::parse_str(&fetched.schema).unwrap();
    let b = apache_avro::Schema::parse_str(V1).unwrap();
    assert_eq!(a.canonical_form(), b.canonical_form());

    let encoder = AvroEncoder::new(settings());
    let bytes = encoder.encode(record(), SubjectNameStrategy::TopicNameStrategy(topic.clone(), false)).await.unwrap();
    assert_eq!(bytes[0], 0, "Confluent wire format: magic byte");
    assert_eq!(u32::from_be_bytes(bytes[1..5].try_into().unwrap()), registered.id, "then the schema id");
    let decoded = AvroDecoder::new(settings()).decode(Some(&bytes)).await.unwrap();
    assert_eq!(decoded.value, Value::Record(record().into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));

    assert!(is_compatible_schema(&sr, subject.clone(), avro(V2_COMPATIBLE)).await.unwrap());
    assert!(!is_compatible_schema(&sr, subject.clone(), avro(V2_INCOMPATIBLE)).await.unwrap());
    let err = post_schema(&sr, subject.clone(), avro(V2_INCOMPATIBLE)).await.unwrap_err();
    assert!(err.error.contains("409"), "incompatible registration is refused with 409: {err:?}");
    let v2 = post_schema(&sr, subject.clone(), avro(V2_COMPATIBLE)).await.unwrap();
    assert_ne!(v2.id, registered.id);
}

#[tokio::test]
async fn confluent_python_client_works_unchanged_and_decodes_rust_encoded_records() {
    outbox_operator::telemetry::install_crypto_provider();
    let python = common::stack_env("OUTBOX_PYTHON");
    let url = common::schema_registry_url();
    let prefix = common::unique("py");

    // A record encoded by the Rust side, for Confluent's deserializer.
    let topic = common::unique("rust-encoded");
    post_schema(&settings(), format!("{topic}-value"), avro(V1)).await.expect("register for the cross check");
    let bytes = AvroEncoder::new(settings())
        .encode(record(), SubjectNameStrategy::TopicNameStrategy(topic.clone(), false))
        .await
        .unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/confluent_client_check.py");
    let out = std::process::Command::new(&python)
        .args([script, &url, &prefix, &topic, &hex])
        .output()
        .unwrap_or_else(|e| panic!("running {python} (confluent-kafka venv from scripts/stack.sh): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Confluent client check failed:\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON from the check script");
    assert_eq!(result["decoded"], serde_json::json!({"sessionId": "s-1", "ttlSeconds": 3600}));
}

#[tokio::test]
async fn errors_carry_confluent_error_codes() {
    outbox_operator::telemetry::install_crypto_provider();
    let url = common::schema_registry_url();
    let http = reqwest::Client::builder().build().unwrap();
    let get = |path: String| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http.get(format!("{url}{path}")).send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let missing = common::unique("missing");
    let (status, body) = get(format!("/subjects/{missing}/versions")).await;
    assert_eq!((status, body["error_code"].as_u64()), (404, Some(40401)), "{body}");
    let (status, body) = get("/subjects/x/versions/zero".into()).await;
    assert_eq!((status, body["error_code"].as_u64()), (422, Some(42202)), "{body}");
    let r = http
        .put(format!("{url}/config/{missing}"))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(r#"{"compatibility":"SIDEWAYS"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error_code"], 42203, "{body}");
    let (status, _) = get(format!("/config/{missing}")).await;
    assert_eq!(status, 404, "nothing was configured by the rejected request");
}
