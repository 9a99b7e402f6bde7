//! The relay against the real stack: events written through the session
//! API all arrive in Kafka, decodable through the registry, in
//! per-aggregate order; outages, crashes, poison events and a second relay
//! lose nothing.

mod common;

use std::{collections::HashMap, time::Duration};

use mongodb::bson::{Document, doc};
use outbox_operator::{
    domain::{
        event::{EventEnvelope, EventMetadata, now_millis},
        session::{ClientInfo, CreateSession, Session, SessionPolicy},
    },
    lease::{mongo::MongoLease, outbox_lease_name},
    outbox::{Outbox, OutboxDocument},
};
use schema_registry_converter::async_impl::{avro::AvroDecoder, schema_registry::SrSettings};
use serde_json::json;

#[tokio::test]
async fn session_api_events_arrive_decodable_and_in_per_aggregate_order() {
    let (base, db) = common::start_session_api().await;
    let http = common::http();
    let mut expected = 0;
    for i in 0..20 {
        let s: serde_json::Value = http
            .post(format!("{base}/sessions"))
            .json(&json!({"userId": format!("u{i}")}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = s["id"].as_str().unwrap();
        http.post(format!("{base}/sessions/{id}/refresh")).send().await.unwrap();
        expected += 2;
        if i % 2 == 0 {
            http.delete(format!("{base}/sessions/{id}")).send().await.unwrap();
            expected += 1;
        }
    }
    let topic = common::unique("session-events");
    common::create_topic(&topic, 3).await;
    let bootstrap = common::kafka_bootstrap();
    let (relay, stop) = common::spawn_relay(common::relay_args(db.name(), &bootstrap, &topic, "relay-e2e"));
    common::eventually("every outbox row published", Duration::from_secs(60), || async {
        common::status_count(&db, "published").await == expected
    })
    .await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();

    let records = common::consume_all(&bootstrap, &topic, expected as usize, Duration::from_secs(60)).await;
    assert_eq!(records.len(), expected as usize, "every event arrived");
    let decoder = AvroDecoder::new(SrSettings::new(common::schema_registry_url()));
    let rows: HashMap<String, Document> =
        common::outbox_rows(&db).await.into_iter().map(|d| (d.get_str("_id").unwrap().to_owned(), d)).collect();
    let mut by_aggregate: HashMap<String, Vec<(i32, i64, String, String)>> = HashMap::new();
    for r in &records {
        let decoded = decoder.decode(Some(&r.payload)).await.expect("decodable through the registry");
        let apache_avro::types::Value::Record(fields) = decoded.value else { panic!("not a record") };
        let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap();
        let event_id = match field("eventId") {
            apache_avro::types::Value::Uuid(u) => u.to_string(),
            other => panic!("eventId {other:?}"),
        };
        assert_eq!(r.headers["eventId"], event_id, "header and body agree");
        assert!(!r.headers["correlationId"].is_empty());
        assert!(r.headers.contains_key("traceparent"));
        let row = &rows[&event_id];
        assert_eq!(row.get_str("aggregateId").unwrap(), r.key, "Kafka key = aggregateId");
        assert_eq!((row.get_i32("partition").unwrap(), row.get_i64("offset").unwrap()), (r.partition, r.offset));
        by_aggregate.entry(r.key.clone()).or_default().push((
            r.partition,
            r.offset,
            event_id,
            r.headers["eventName"].clone(),
        ));
    }
    assert_eq!(by_aggregate.len(), 20);
    for (aggregate, mut events) in by_aggregate {
        events.sort_by_key(|(p, o, _, _)| (*p, *o));
        let ids: Vec<&String> = events.iter().map(|e| &e.2).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "{aggregate}: partition order is event order");
        assert!(events.iter().all(|e| e.0 == events[0].0), "{aggregate}: one partition per aggregate");
        assert_eq!(events[0].3, "SessionCreated", "{aggregate}");
    }
    db.drop().await.unwrap();
}

#[tokio::test]
async fn broker_outage_backs_off_and_loses_nothing() {
    use rdkafka::mocking::MockCluster;
    let mock = MockCluster::new(1).expect("librdkafka mock cluster");
    let topic = "outage-events";
    mock.create_topic(topic, 1, 1).unwrap();
    mock.broker_down(1).unwrap();

    let client = common::mongo().await;
    let db = client.database(&common::unique("relay-outage"));
    common::seed_outbox(&db, 5, 2).await;
    let mut args = common::relay_args(db.name(), &mock.bootstrap_servers(), topic, "relay-outage");
    args.producer_config = vec![("message.timeout.ms".into(), "1000".into())];
    args.backoff_initial_ms = 200;
    args.backoff_max_ms = 2000;
    let (relay, stop) = common::spawn_relay(args);

    // While the broker is down: failed, attempts growing, backoff doubling.
    let outbox = db.collection::<Document>("outbox");
    common::eventually("rows failed at least twice", Duration::from_secs(60), || async {
        outbox.count_documents(doc! {"status": "failed", "attempts": {"$gte": 2}}).await.unwrap() > 0
    })
    .await;
    let row = outbox.find_one(doc! {"status": "failed", "attempts": {"$gte": 2}}).await.unwrap().unwrap();
    let attempts = row.get_i32("attempts").unwrap();
    assert_eq!(row.get_i64("backoffMs").unwrap(), (200 * 2_i64.pow(attempts as u32 - 1)).min(2000), "{row}");
    assert!(row.get_str("lastError").unwrap().contains("produce"), "{row}");
    assert_eq!(common::status_count(&db, "published").await, 0);

    mock.broker_up(1).unwrap();
    common::eventually("all 10 published after the broker returns", Duration::from_secs(60), || async {
        common::status_count(&db, "published").await == 10
    })
    .await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let records = common::consume_all(&mock.bootstrap_servers(), topic, 10, Duration::from_secs(30)).await;
    let mut ids: Vec<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10, "none lost");
    db.drop().await.unwrap();
}

/// One session's two events in the outbox of `db`: its `SessionCreated`,
/// changed by `spoil` before it is written, then a later refresh that must
/// wait for it. Returns the session id and both rows.
async fn spoiled_aggregate(
    db: &mongodb::Database,
    user: &str,
    spoil: impl FnOnce(&mut OutboxDocument),
) -> (String, OutboxDocument, OutboxDocument) {
    let now = now_millis();
    let cmd = CreateSession { user_id: user.into(), ttl_seconds: None, client: ClientInfo::default() };
    let policy = SessionPolicy::default();
    let (mut s, created) = Session::create(cmd, &policy, now).unwrap();
    let mut first =
        OutboxDocument::pending(&EventEnvelope::wrap(&created, now, &EventMetadata::default()), 256).unwrap();
    spoil(&mut first);
    let later = OutboxDocument::pending(
        &EventEnvelope::wrap(&s.refresh(None, &policy, now).unwrap(), now, &EventMetadata::default()),
        256,
    )
    .unwrap();
    Outbox::new(db, "outbox").collection().insert_many([&first, &later]).await.unwrap();
    (s.id, first, later)
}

/// Run a relay with `args` until one row is dead and `published` are
/// published, then stop it; returns the dead row after checking that
/// `later` (of the dead row's aggregate) still waits.
async fn relay_until_one_dead(
    db: &mongodb::Database,
    args: outbox_operator::relay::RelayArgs,
    published: u64,
    later: &OutboxDocument,
) -> Document {
    let (relay, stop) = common::spawn_relay(args);
    let what = format!("one event dead, the other {published} published");
    common::eventually(&what, Duration::from_secs(30), || async {
        common::status_count(db, "dead").await == 1 && common::status_count(db, "published").await == published
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let held = db.collection::<Document>("outbox").find_one(doc! {"_id": &later.id}).await.unwrap().unwrap();
    assert_eq!(held.get_str("status").unwrap(), "pending", "the aggregate's later event waits");
    db.collection::<Document>("outbox").find_one(doc! {"status": "dead"}).await.unwrap().unwrap()
}

#[tokio::test]
async fn a_poison_event_goes_dead_and_blocks_only_its_aggregate() {
    let client = common::mongo().await;
    let db = client.database(&common::unique("relay-poison"));
    common::seed_outbox(&db, 5, 2).await;
    // A poison aggregate: its first event does not match its schema.
    let (session, poison, later) = spoiled_aggregate(&db, "poison", |e| {
        e.payload.remove("userId");
    })
    .await;
    let outbox = Outbox::new(&db, "outbox");

    let topic = common::unique("poison-events");
    common::create_topic(&topic, 1).await;
    let mut args = common::relay_args(db.name(), &common::kafka_bootstrap(), &topic, "relay-poison");
    args.max_attempts = 3;
    args.backoff_initial_ms = 50;
    let dead = relay_until_one_dead(&db, args, 10, &later).await;
    assert_eq!(dead.get_str("_id").unwrap(), poison.id);
    assert_eq!(dead.get_i32("attempts").unwrap(), 3);
    assert!(dead.get_str("lastError").unwrap().contains("$.payload.userId"), "{dead}");
    let stats = outbox.stats(mongodb::bson::DateTime::now()).await.unwrap();
    assert_eq!((stats.dead, stats.pending, stats.blocked_aggregates), (1, 1, 1));

    // Redrive reports what it put back.
    let n = outbox
        .redrive(outbox_operator::outbox::OutboxStatus::Dead, Some(&session), mongodb::bson::DateTime::now())
        .await;
    assert_eq!(n.unwrap(), 1);
    db.drop().await.unwrap();
}

#[tokio::test]
async fn a_record_the_producer_refuses_fails_alone_and_its_later_event_never_overtakes_it() {
    let client = common::mongo().await;
    let db = client.database(&common::unique("relay-too-large"));
    common::seed_outbox(&db, 5, 2).await;
    // Valid for its schema, but larger than the producer's message.max.bytes:
    // librdkafka refuses it at enqueue time, in the middle of a batch.
    let (session, big, later) = spoiled_aggregate(&db, "big", |e| {
        e.payload.insert("userId", "x".repeat(3000));
    })
    .await;

    let topic = common::unique("too-large-events");
    common::create_topic(&topic, 1).await;
    let mut args = common::relay_args(db.name(), &common::kafka_bootstrap(), &topic, "relay-too-large");
    args.max_attempts = 2;
    args.producer_config.push(("message.max.bytes".into(), "2000".into()));
    let dead = relay_until_one_dead(&db, args, 10, &later).await;
    assert_eq!(dead.get_str("_id").unwrap(), big.id);
    assert!(dead.get_str("lastError").unwrap().to_lowercase().contains("too large"), "{dead}");
    let records = common::consume_all(&common::kafka_bootstrap(), &topic, 10, Duration::from_secs(20)).await;
    assert_eq!(records.len(), 10);
    assert!(records.iter().all(|r| r.key != session), "nothing of the refused aggregate reached Kafka");
    db.drop().await.unwrap();
}

#[tokio::test]
async fn a_killed_relay_loses_nothing_and_duplicates_are_counted() {
    let client = common::mongo().await;
    let db = client.database(&common::unique("relay-kill"));
    let total = common::seed_outbox(&db, 1000, 3).await.len();
    let topic = common::unique("kill-events");
    common::create_topic(&topic, 2).await;
    let bootstrap = common::kafka_bootstrap();
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["relay", "--relay-id", "relay-kill", "--batch-size", "100", "--metrics-listen", "127.0.0.1:0"])
            .args(["--route", &format!("Session={topic}"), "--poll-interval-ms", "100", "--lease-seconds", "2"])
            .env("MONGODB_URI", common::mongodb_uri())
            .env("MONGODB_DATABASE", db.name())
            .env("KAFKA_BOOTSTRAP", &bootstrap)
            .env("SCHEMA_REGISTRY_URL", common::schema_registry_url())
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start the outbox binary")
    };
    let mut first = spawn();
    common::eventually("the first relay publishes some", Duration::from_secs(60), || async {
        common::status_count(&db, "published").await >= 300
    })
    .await;
    first.kill().unwrap(); // SIGKILL, mid-batch
    first.wait().unwrap();
    let at_kill = common::status_count(&db, "published").await;
    assert!(at_kill < total as u64, "killed before the end ({at_kill}/{total})");

    let mut second = spawn();
    common::eventually("the restarted relay publishes the rest", Duration::from_secs(120), || async {
        common::status_count(&db, "published").await == total as u64
    })
    .await;
    second.kill().unwrap();
    second.wait().unwrap();

    let records = common::consume_all(&bootstrap, &topic, total, Duration::from_secs(60)).await;
    let mut ids: Vec<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    ids.sort();
    let delivered = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), total, "every event arrived at least once");
    println!("killed at {at_kill}/{total} published; {} duplicate deliveries after the restart", delivered - total);
    db.drop().await.unwrap();
}

#[tokio::test]
async fn two_relays_one_active_and_the_standby_takes_over() {
    let client = common::mongo().await;
    let db = client.database(&common::unique("relay-pair"));
    common::seed_outbox(&db, 50, 2).await;
    let topic = common::unique("pair-events");
    common::create_topic(&topic, 1).await;
    let bootstrap = common::kafka_bootstrap();
    let (a, stop_a) = common::spawn_relay(common::relay_args(db.name(), &bootstrap, &topic, "relay-a"));
    let name = outbox_lease_name(db.name(), "outbox");
    let lease = MongoLease::new(&db, &name, "observer", Duration::from_secs(2));
    common::eventually("relay-a holds the lease", Duration::from_secs(10), || async {
        lease.holder().await.unwrap().as_deref() == Some("relay-a")
    })
    .await;
    let (b, stop_b) = common::spawn_relay(common::relay_args(db.name(), &bootstrap, &topic, "relay-b"));
    common::eventually("first 100 published", Duration::from_secs(30), || async {
        common::status_count(&db, "published").await == 100
    })
    .await;
    assert_eq!(lease.holder().await.unwrap().as_deref(), Some("relay-a"), "the standby stays standby");

    // relay-a dies without releasing anything; relay-b takes over once the lease expires.
    a.abort();
    let _still_connected = stop_a;
    common::seed_outbox(&db, 10, 1).await;
    common::eventually("relay-b took over and published the new events", Duration::from_secs(30), || async {
        common::status_count(&db, "published").await == 110
    })
    .await;
    assert_eq!(lease.holder().await.unwrap().as_deref(), Some("relay-b"));
    stop_b.send(true).unwrap();
    b.await.unwrap().unwrap();
    db.drop().await.unwrap();
}
