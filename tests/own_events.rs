//! Events of an application that is not the sample, end to end against the
//! stack: an "orders" service written in Python (pymongo) writes its outbox,
//! the relay publishes with schemas from a directory or from the registry,
//! Confluent's own Python consumer and deserializer read what it published,
//! and the consumer delivers records that Confluent's serializer produced.

mod common;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, routing::post};
use mongodb::bson::{Document, doc};
use outbox_operator::{
    avro::ValueLayout,
    consumer::HandlerKind,
    kafka::topics::EventTopicMapper,
    outbox::EventRow,
    registry_client::{SubjectStrategy, ids::SchemaIds},
    relay::{
        RelayArgs,
        encoding::EventEncoder,
        schemas::{EventSchemas, RegistryVersion, SchemaSource},
    },
};
use serde_json::{Value, json};

/// The payload record of an OrderPlaced (what the payload layout writes).
const ORDER_PLACED_PAYLOAD: &str = r#"{"type": "record", "name": "OrderPlaced", "namespace": "com.acme.orders",
  "fields": [{"name": "orderId", "type": "string"}, {"name": "amountCents", "type": "long"},
             {"name": "currency", "type": "string"}]}"#;

/// The whole event record of an order event named `name` (the envelope
/// layout), its payload as OrderPlaced's.
fn envelope_schema(name: &str) -> String {
    format!(
        r#"{{"type": "record", "name": "{name}", "namespace": "com.acme.orders", "fields": [
  {{"name": "eventId", "type": {{"type": "string", "logicalType": "uuid"}}}},
  {{"name": "aggregateType", "type": "string"}}, {{"name": "aggregateId", "type": "string"}},
  {{"name": "eventName", "type": "string"}}, {{"name": "eventVersion", "type": "int"}},
  {{"name": "occurredOn", "type": {{"type": "long", "logicalType": "timestamp-millis"}}}},
  {{"name": "correlationId", "type": ["null", "string"], "default": null}},
  {{"name": "causationId", "type": ["null", "string"], "default": null}},
  {{"name": "traceparent", "type": ["null", "string"], "default": null}},
  {{"name": "payload", "type": {}}}]}}"#,
        ORDER_PLACED_PAYLOAD.replace("\"OrderPlaced\"", &format!("\"{name}Payload\""))
    )
}

/// Run tests/python/own_events.py with the stack's Python; its output lines.
/// Awaited, not blocking: the relay and consumers under test run on the
/// same runtime meanwhile.
async fn python(args: &[&str]) -> Vec<String> {
    let python = common::stack_env("OUTBOX_PYTHON");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/own_events.py");
    let out = tokio::process::Command::new(&python)
        .arg(script)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {python} (the stack's venv, scripts/stack.sh install): {e}"));
    assert!(
        out.status.success(),
        "own_events.py {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// The Python orders service writes `count` events named `event` into `db`'s outbox.
async fn write_orders(db: &mongodb::Database, event: &str, count: usize) -> Vec<String> {
    python(&["write", &common::mongodb_uri(), db.name(), event, &count.to_string()]).await
}

/// Confluent's consumer and deserializer read `count` records of `topic`.
async fn confluent_read(topic: &str, count: usize) -> Vec<Value> {
    let lines =
        python(&["read", &common::kafka_bootstrap(), &common::schema_registry_url(), topic, &count.to_string()]).await;
    lines.iter().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// A schema directory of its own, removed when dropped.
struct SchemaFolder(PathBuf);

impl SchemaFolder {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(common::unique("schemas"));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn add(&self, file: &str, text: &str) {
        std::fs::write(self.0.join(file), text).unwrap();
    }
}

impl Drop for SchemaFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Relay settings for the orders outbox of `db`: Order events to `topic`.
fn orders_relay(db: &mongodb::Database, topic: &str, schemas: Option<&Path>) -> RelayArgs {
    let mut args = common::relay_args(db.name(), &common::kafka_bootstrap(), topic, &common::unique("relay"));
    args.routes = vec![format!("Order={topic}").parse().unwrap()];
    args.schemas_dir = schemas.map(Path::to_owned);
    args
}

/// Wait until the relay follows the outbox's change stream (its first-start
/// recovery is done). Rows written during that recovery are published by its
/// scan, which goes aggregate by aggregate and may publish a row twice: per
/// aggregate order and at-least-once, not commit order across aggregates,
/// which the assertions below read.
async fn relay_follows(db: &mongodb::Database) {
    let checkpoints = outbox_operator::outbox::checkpoint::Checkpoints::new(db, "outbox");
    common::eventually("the relay follows the change stream", Duration::from_secs(30), || async {
        checkpoints.load().await.unwrap().is_some_and(|c| c.token.is_some() || c.recovery.is_some())
    })
    .await;
}

async fn outbox_row(db: &mongodb::Database, id: &str) -> Document {
    db.collection::<Document>("outbox").find_one(doc! {"_id": id}).await.unwrap().unwrap_or_default()
}

#[tokio::test]
async fn another_applications_events_are_published_with_schemas_from_a_directory() {
    let db = common::TestDb::new(common::mongo().await.database(&common::unique("orders")));
    let topic = common::unique("orders");
    common::create_topic(&topic, 1).await;
    let schemas = SchemaFolder::new();
    schemas.add("Order.OrderPlaced.v1.avsc", &envelope_schema("OrderPlaced"));
    let (task, stop) = common::spawn_relay(orders_relay(&db, &topic, Some(&schemas.0)));
    relay_follows(&db).await;

    let placed = write_orders(&db, "OrderPlaced", 5).await;
    let shipped = write_orders(&db, "OrderShipped", 2).await;
    let records = confluent_read(&topic, 5).await;
    let ids: Vec<&str> = records.iter().map(|r| r["value"]["eventId"].as_str().unwrap()).collect();
    assert_eq!(ids, placed.iter().map(String::as_str).collect::<Vec<_>>(), "in commit order");
    let first = &records[0];
    assert_eq!(first["value"]["eventName"], "OrderPlaced");
    assert_eq!(first["value"]["payload"]["currency"], "EUR");
    assert_eq!(first["key"], first["value"]["aggregateId"]);
    assert_eq!(first["headers"]["aggregateType"], "Order");

    // OrderShipped has no schema yet: its rows wait (failed, attempts
    // spent with backoff), named by the file they need; never dead.
    for id in &shipped {
        common::eventually("the event without a schema names its file", Duration::from_secs(30), || async {
            let row = outbox_row(&db, id).await;
            row.get_str("status") == Ok("failed")
                && row.get_str("failureReason") == Ok("no_schema")
                && row.get_str("lastError").is_ok_and(|e| e.contains("Order.OrderShipped.v1.avsc"))
        })
        .await;
    }
    // The file arrives (a ConfigMap update, in a pod): no restart needed.
    schemas.add("Order.OrderShipped.v1.avsc", &envelope_schema("OrderShipped"));
    let records = confluent_read(&topic, 7).await;
    // Two orders, two aggregates: no order is promised between them.
    let mut late: Vec<&str> = records[5..].iter().map(|r| r["value"]["eventId"].as_str().unwrap()).collect();
    let mut expected: Vec<&str> = shipped.iter().map(String::as_str).collect();
    late.sort_unstable();
    expected.sort_unstable();
    assert_eq!(late, expected);
    assert!(records[5..].iter().all(|r| r["value"]["eventName"] == "OrderShipped"));

    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

/// Collects the bodies a webhook receives.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Value>>>);

async fn receive(State(r): State<Receiver>, Json(body): Json<Value>) -> axum::http::StatusCode {
    r.0.lock().unwrap().push(body);
    axum::http::StatusCode::OK
}

impl Receiver {
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let app = Router::new().route("/events", post(receive)).with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    fn bodies(&self) -> Vec<Value> {
        self.0.lock().unwrap().clone()
    }
}

async fn webhook_consumer(
    db: &mongodb::Database,
    topic: &str,
) -> (Receiver, tokio::task::JoinHandle<outbox_operator::Result<()>>, tokio::sync::watch::Sender<bool>) {
    let receiver = Receiver::default();
    let mut args = common::consume_args(db.name(), topic, &common::unique("hook"), HandlerKind::Webhook);
    args.webhook_url = Some(receiver.serve().await);
    let (task, stop) = common::spawn_consumer(args);
    (receiver, task, stop)
}

#[tokio::test]
async fn with_schemas_from_the_registry_the_payload_layout_reads_as_debeziums_and_any_consumer_delivers_it() {
    let db = common::TestDb::new(common::mongo().await.database(&common::unique("orders-registry")));
    let topic = common::unique("orders-payload");
    common::create_topic(&topic, 1).await;
    // The team registers its schema itself (TopicNameStrategy: `<topic>-value`).
    register_value_schema(&topic, ORDER_PLACED_PAYLOAD).await;
    let mut args = orders_relay(&db, &topic, None);
    args.schemas_from_registry = Some(RegistryVersion::Latest);
    args.subject_name_strategy = SubjectStrategy::TopicName;
    args.value_layout = ValueLayout::Payload;
    args.auto_register_schemas = false;
    let (task, stop) = common::spawn_relay(args);
    relay_follows(&db).await;

    let ids = write_orders(&db, "OrderPlaced", 3).await;
    let records = confluent_read(&topic, 3).await;
    for (record, id) in records.iter().zip(&ids) {
        assert_eq!(record["value"]["currency"], "EUR", "the value is the payload record: {record}");
        assert!(record["value"].get("eventId").is_none(), "{record}");
        let headers = &record["headers"];
        assert_eq!(headers["eventId"], id.as_str());
        assert_eq!(
            (headers["eventName"].as_str(), headers["aggregateType"].as_str()),
            (Some("OrderPlaced"), Some("Order"))
        );
        assert_eq!(headers["aggregateId"], record["key"]);
        assert_eq!(headers["eventVersion"], "1");
        assert!(headers["occurredOn"].as_str().is_some_and(|t| t.ends_with('Z')), "{headers}");
    }

    // A consumer with no schema of its own delivers them as the event's JSON.
    let (receiver, consumer, stop_consumer) = webhook_consumer(&db, &topic).await;
    common::eventually("the webhook received the three orders", Duration::from_secs(60), || async {
        receiver.bodies().len() >= 3
    })
    .await;
    let bodies = receiver.bodies();
    let delivered: Vec<&str> = bodies.iter().map(|b| b["eventId"].as_str().unwrap()).collect();
    assert_eq!(delivered, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(bodies[0]["eventName"], "OrderPlaced");
    assert_eq!(bodies[0]["aggregateType"], "Order");
    assert_eq!(bodies[0]["payload"]["orderId"], records[0]["key"]);

    stop_consumer.send(true).unwrap();
    consumer.await.unwrap().unwrap();
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn records_produced_by_confluents_serializer_are_delivered_not_dead_lettered() {
    let db = common::TestDb::new(common::mongo().await.database(&common::unique("foreign")));
    let topic = common::unique("foreign-orders");
    common::create_topic(&topic, 1).await;
    let orders = python(&["produce", &common::kafka_bootstrap(), &common::schema_registry_url(), &topic, "4"]).await;
    let (receiver, consumer, stop) = webhook_consumer(&db, &topic).await;
    common::eventually("the webhook received the four records", Duration::from_secs(60), || async {
        receiver.bodies().len() >= 4
    })
    .await;
    let bodies = receiver.bodies();
    for (i, (body, order)) in bodies.iter().zip(&orders).enumerate() {
        assert_eq!(body["payload"]["orderId"], order.as_str());
        assert_eq!(body["eventName"], "OrderPlaced", "the writer's record name");
        assert_eq!(body["aggregateId"], order.as_str(), "the record's key");
        assert_eq!(body["eventId"], format!("{topic}/0/{i}"), "no id header: the record's place");
    }
    stop.send(true).unwrap();
    consumer.await.unwrap().unwrap();
}

/// `envelope_schema(name)` with one more field, optional: a team's fix to
/// a schema file, read from the next event on.
fn envelope_schema_with_channel(name: &str) -> String {
    let schema = envelope_schema(name);
    let at = schema.rfind("]}").expect("the record's closing");
    format!(r#"{}, {{"name": "channel", "type": ["null", "string"], "default": null}}]}}"#, &schema[..at])
}

#[tokio::test]
async fn a_changed_schema_file_encodes_the_events_after_it_without_a_restart() {
    let db = common::TestDb::new(common::mongo().await.database(&common::unique("orders-change")));
    let topic = common::unique("orders-change");
    common::create_topic(&topic, 1).await;
    let schemas = SchemaFolder::new();
    schemas.add("Order.OrderPlaced.v1.avsc", &envelope_schema("OrderPlaced"));
    let (task, stop) = common::spawn_relay(orders_relay(&db, &topic, Some(&schemas.0)));
    relay_follows(&db).await;
    write_orders(&db, "OrderPlaced", 2).await;
    let before = confluent_read(&topic, 2).await;
    assert!(before.iter().all(|r| r["value"].get("channel").is_none()), "{before:?}");

    // The same file, changed: the relay reads it again within seconds and
    // encodes the next events with it (its route for OrderPlaced v1 no
    // longer stands).
    schemas.add("Order.OrderPlaced.v1.avsc", &envelope_schema_with_channel("OrderPlaced"));
    tokio::time::sleep(outbox_operator::avro::catalog::RELOAD_INTERVAL + Duration::from_secs(2)).await;
    let after = write_orders(&db, "OrderPlaced", 2).await;
    let records = confluent_read(&topic, 4).await;
    for (record, id) in records[2..].iter().zip(&after) {
        assert_eq!(record["value"]["eventId"], id.as_str());
        assert!(record["value"].get("channel").is_some_and(Value::is_null), "written with the changed file: {record}");
    }
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

/// Register `schema` under `<topic>-value` (TopicNameStrategy); its id.
async fn register_value_schema(topic: &str, schema: &str) -> u64 {
    let url = common::schema_registry_url();
    let r = common::http()
        .post(format!("{url}/subjects/{topic}-value/versions"))
        .json(&json!({ "schema": schema }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{r:?}");
    r.json::<Value>().await.unwrap()["id"].as_u64().unwrap()
}

/// The relay's encoder for Order events to `topic`, payload layout, with
/// the newest version registered under `<topic>-value` at `registry`,
/// asked again every `refresh`.
fn latest_version_encoder(registry: &str, topic: &str, refresh: Duration) -> EventEncoder {
    EventEncoder::new(
        EventTopicMapper::new(vec![format!("Order={topic}").parse().unwrap()]),
        Arc::new(EventSchemas::new(
            SchemaSource::Registry { version: RegistryVersion::Latest, record_namespace: None },
            SubjectStrategy::TopicName,
            SchemaIds::new(registry, false).with_latest_refresh(refresh),
        )),
        ValueLayout::Payload,
    )
}

/// One OrderPlaced written by the Python orders service, as the relay reads its row.
async fn one_order_row(db: &mongodb::Database) -> EventRow {
    let id = write_orders(db, "OrderPlaced", 1).await.remove(0);
    let raw = db.collection::<mongodb::bson::RawDocumentBuf>("outbox").find_one(doc! {"_id": &id}).await.unwrap();
    EventRow::from_raw(raw.expect("the order's outbox row")).unwrap()
}

#[tokio::test]
async fn a_newly_registered_version_encodes_the_events_after_the_latest_refresh() {
    let db = common::TestDb::new(common::mongo().await.database(&common::unique("orders-latest")));
    let topic = common::unique("orders-latest");
    let refresh = Duration::from_secs(1);
    let encoder = latest_version_encoder(&common::schema_registry_url(), &topic, refresh);
    let first = register_value_schema(&topic, ORDER_PLACED_PAYLOAD).await;
    let row = one_order_row(&db).await;
    let schema_id = |payload: &[u8]| u64::from(u32::from_be_bytes(payload[1..5].try_into().unwrap()));
    assert_eq!(schema_id(&encoder.encode(&row).await.unwrap().payload), first);

    let with_note = ORDER_PLACED_PAYLOAD.replace(
        r#"{"name": "currency", "type": "string"}]"#,
        r#"{"name": "currency", "type": "string"}, {"name": "note", "type": "string", "default": ""}]"#,
    );
    let second = register_value_schema(&topic, &with_note).await;
    assert_ne!(first, second);
    assert_eq!(schema_id(&encoder.encode(&row).await.unwrap().payload), first, "the newest version read before");
    tokio::time::sleep(refresh + Duration::from_millis(200)).await;
    assert_eq!(schema_id(&encoder.encode(&row).await.unwrap().payload), second, "asked again after the refresh");
}

#[tokio::test]
async fn while_the_registry_is_away_the_newest_version_read_before_is_asked_again_once_per_refresh() {
    let db = common::TestDb::new(common::mongo().await.database(&common::unique("orders-away")));
    let topic = common::unique("orders-away");
    register_value_schema(&topic, ORDER_PLACED_PAYLOAD).await;
    let url = common::schema_registry_url();
    let proxy = common::CuttableProxy::start(url.trim_start_matches("http://"), 0).await;
    let refresh = Duration::from_secs(1);
    let encoder = latest_version_encoder(&format!("http://{}", proxy.address), &topic, refresh);
    let row = one_order_row(&db).await;
    let first = encoder.encode(&row).await.unwrap().payload;

    proxy.cut();
    tokio::time::sleep(refresh + Duration::from_millis(200)).await;
    let opened = proxy.opened();
    for _ in 0..20 {
        assert_eq!(encoder.encode(&row).await.unwrap().payload[..5], first[..5], "the version read before");
    }
    let asked = proxy.opened() - opened;
    assert!(asked <= 1, "20 events while the registry is away: asked {asked} times, not once per refresh");
}
