//! The relay against the real stack: events written through the session
//! API all arrive in Kafka, decodable through the registry, in
//! per-aggregate commit order; outages, crashes, poison events, blocked
//! aggregates, a lost stream position and a second relay lose nothing.

mod common;

use std::{collections::HashMap, time::Duration};

use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use outbox_operator::{
    domain::{
        event::{EventEnvelope, EventMetadata, now_millis},
        session::{ClientInfo, CreateSession, Session, SessionPolicy},
    },
    lease::{mongo::MongoLease, outbox_lease_name},
    outbox::{
        Outbox, OutboxDocument, OutboxStatus,
        checkpoint::{CHECKPOINTS, Checkpoints},
        requests::{RequestAction, Selection},
    },
    relay::metrics::STAGES,
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
        common::published_count(&db).await == expected
    })
    .await;
    assert_eq!(
        db.collection::<Document>("outbox").count_documents(doc! {"status": {"$exists": true}}).await.unwrap(),
        0,
        "nothing written per row on the success path"
    );
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
}

#[tokio::test]
async fn broker_outage_backs_off_and_loses_nothing() {
    use rdkafka::mocking::MockCluster;
    let mock = MockCluster::new(1).expect("librdkafka mock cluster");
    let topic = "outage-events";
    mock.create_topic(topic, 1, 1).unwrap();
    mock.broker_down(1).unwrap();

    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-outage")));
    common::seed_outbox(&db, 5, 2).await;
    let mut args = common::relay_args(db.name(), &mock.bootstrap_servers(), topic, "relay-outage");
    args.producer_config = vec![("message.timeout.ms".into(), "800".into())];
    args.backoff_initial_ms = 200;
    args.backoff_max_ms = 2000;
    let (relay, stop) = common::spawn_relay(args);

    // While the broker is down: failed, retried during the outage without
    // spending attempts, backoff doubling.
    let outbox = db.collection::<Document>("outbox");
    common::eventually("rows failed at least twice", Duration::from_secs(60), || async {
        outbox.count_documents(doc! {"status": "failed", "outageRetries": {"$gte": 2}}).await.unwrap() > 0
    })
    .await;
    let row = outbox.find_one(doc! {"status": "failed", "outageRetries": {"$gte": 2}}).await.unwrap().unwrap();
    let tries = row.get_i32("outageRetries").unwrap();
    assert_eq!(row.get_i32("attempts").unwrap_or(0), 0, "an outage spends no attempt: {row}");
    assert_eq!(row.get_i64("backoffMs").unwrap(), (200 * 2_i64.pow(tries as u32 - 1)).min(2000), "{row}");
    assert!(row.get_str("lastError").unwrap().contains("produce"), "{row}");
    assert_eq!(common::published_count(&db).await, 0);
    assert_eq!(
        common::status_count(&db, "failed").await,
        10,
        "each session's later event went in flight behind its first, on the same producer, and failed with it"
    );

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
}

/// The broker unreachable for a few seconds while the relay publishes (a
/// proxy in front of a broker of the test's own drops every connection):
/// records time out, librdkafka bumps the idempotent producer's epoch, and
/// the broker (tansu) then refuses every later record of that producer as
/// fenced. Found by the chaos suite: the relay retried with the same
/// producer forever. It now replaces the producer, and nothing is lost.
#[tokio::test]
async fn a_broker_outage_that_fences_the_producer_loses_nothing() {
    let broker = common::CuttableBroker::start().await;
    let topic = "cut-events";
    common::create_topic_on(&broker.bootstrap, topic, 1).await;
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-cut")));
    common::seed_outbox(&db, 20, 2).await;
    let mut args = common::relay_args(db.name(), &broker.bootstrap, topic, "relay-cut");
    args.producer_config = vec![("message.timeout.ms".into(), "800".into())];
    args.backoff_initial_ms = 100;
    args.backoff_max_ms = 500;
    let (relay, stop) = common::spawn_relay(args);
    common::consume_all(&broker.bootstrap, topic, 40, Duration::from_secs(30)).await;
    // Cut while more is written and published.
    broker.cut();
    common::seed_outbox(&db, 20, 2).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    broker.restore();
    let records = common::consume_all(&broker.bootstrap, topic, 80, Duration::from_secs(40)).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let ids: std::collections::HashSet<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    assert_eq!(ids.len(), 80, "every event published after the outage ({} records)", records.len());
}

#[tokio::test]
async fn hot_aggregates_through_broker_cuts_reach_kafka_first_copies_in_order() {
    // Records time out while the broker is away and the broker fences the
    // producer when it returns: whatever fails, and however late, no
    // aggregate's later event may land in Kafka before an earlier one.
    let broker = common::CuttableBroker::start().await;
    let topic = "hot-cut-events";
    common::create_topic_on(&broker.bootstrap, topic, 2).await;
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-hot-cut")));
    Outbox::new(&db, "outbox").ensure_indexes().await.unwrap();
    let mut args = common::relay_args(db.name(), &broker.bootstrap, topic, "relay-hot-cut");
    args.lease_seconds = 6;
    args.producer_config = vec![("message.timeout.ms".into(), "1000".into())];
    args.backoff_initial_ms = 100;
    args.backoff_max_ms = 300;
    let (relay, stop_relay) = common::spawn_relay(args);
    let (stop_writing, writing) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(common::write_refreshing_sessions(db.clone(), 4, writing));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        broker.cut();
        tokio::time::sleep(Duration::from_millis(2000)).await;
        broker.restore();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_writing.send(true).unwrap();
    let order = writer.await.unwrap();
    let events: usize = order.values().map(Vec::len).sum();
    let mut records = common::consume_all(&broker.bootstrap, topic, events, Duration::from_secs(60)).await;
    stop_relay.send(true).unwrap();
    relay.await.unwrap().unwrap();

    common::assert_first_copies_in_commit_order(&mut records, &order);
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
    let mut first = OutboxDocument::new(&EventEnvelope::wrap(&created, now, &EventMetadata::default()), 256).unwrap();
    spoil(&mut first);
    let later = OutboxDocument::new(
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
        common::status_count(db, "dead").await == 1 && common::published_count(db).await == published
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let held = db.collection::<Document>("outbox").find_one(doc! {"_id": &later.id}).await.unwrap().unwrap();
    assert_eq!(held.get_str("status").unwrap(), "held", "the aggregate's later event waits");
    db.collection::<Document>("outbox").find_one(doc! {"status": "dead"}).await.unwrap().unwrap()
}

#[tokio::test]
async fn a_poison_event_goes_dead_and_blocks_only_its_aggregate() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-poison")));
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
    assert_eq!(dead.get_i32("attempts").unwrap(), 1, "a schema mismatch is permanent: dead at once");
    assert!(dead.get_str("lastError").unwrap().contains("$.payload.userId"), "{dead}");
    let stats = outbox.stats(mongodb::bson::DateTime::now()).await.unwrap();
    assert_eq!((stats.dead, stats.held, stats.pending, stats.blocked_aggregates), (1, 1, 0, 1));

    // Redrive reports what it put back.
    let selection = Selection { aggregate_ids: vec![session.clone()], ..Selection::all(OutboxStatus::Dead) };
    let n = outbox.mark_for_request(&selection, &RequestAction::Redrive, "test", mongodb::bson::DateTime::now()).await;
    assert_eq!(n.unwrap(), 1);
}

#[tokio::test]
async fn a_record_the_producer_refuses_fails_alone_and_its_later_event_never_overtakes_it() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-too-large")));
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
}

#[tokio::test]
async fn a_killed_relay_loses_nothing_and_duplicates_are_counted() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-kill")));
    Outbox::new(&db, "outbox").ensure_indexes().await.unwrap();
    let topic = common::unique("kill-events");
    common::create_topic(&topic, 2).await;
    let bootstrap = common::kafka_bootstrap();
    let spawn = || {
        common::relay_process(
            &db,
            &topic,
            &["--relay-id", "relay-kill", "--lease-seconds", "2", "--metrics-listen", "127.0.0.1:0"],
        )
    };
    // The first relay starts on the empty outbox; the events are written
    // while it starts and runs.
    let mut first = spawn();
    let total = 3000;
    let writer = write_in_rounds(&db, 30, 100, Duration::from_millis(50));
    common::eventually("the first relay publishes some", Duration::from_secs(60), || async {
        common::published_count(&db).await >= 300
    })
    .await;
    first.kill().unwrap(); // SIGKILL, mid-batch
    first.wait().unwrap();
    let at_kill = common::published_count(&db).await;
    assert!(at_kill < total as u64, "killed before the end ({at_kill}/{total})");

    let mut second = spawn();
    writer.await.unwrap();
    let records = common::consume_all(&bootstrap, &topic, total, Duration::from_secs(120)).await;
    second.kill().unwrap();
    second.wait().unwrap();
    let mut ids: Vec<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    ids.sort();
    let delivered = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), total, "every event arrived at least once");
    println!("killed at {at_kill}/{total} published; {} duplicate deliveries after the restart", delivered - total);
}

#[tokio::test]
async fn two_relays_one_active_and_the_standby_takes_over() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-pair")));
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
        common::published_count(&db).await == 100
    })
    .await;
    assert_eq!(lease.holder().await.unwrap().as_deref(), Some("relay-a"), "the standby stays standby");

    // relay-a dies without releasing anything; relay-b takes over once the lease expires.
    a.abort();
    let _still_connected = stop_a;
    common::seed_outbox(&db, 10, 1).await;
    common::eventually("relay-b took over and published the new events", Duration::from_secs(30), || async {
        common::published_count(&db).await >= 110
    })
    .await;
    assert_eq!(lease.holder().await.unwrap().as_deref(), Some("relay-b"));
    stop_b.send(true).unwrap();
    b.await.unwrap().unwrap();
    let records = common::consume_all(&bootstrap, &topic, 110, Duration::from_secs(30)).await;
    let ids: std::collections::HashSet<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    assert_eq!(ids.len(), 110, "none lost across the takeover");
}

/// Write `rounds` x `sessions` new sessions' first events, `pause` apart,
/// while relays run.
fn write_in_rounds(
    db: &mongodb::Database,
    rounds: usize,
    sessions: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let db = db.clone();
    tokio::spawn(async move {
        for _ in 0..rounds {
            common::seed_outbox(&db, sessions, 1).await;
            tokio::time::sleep(pause).await;
        }
    })
}

/// A UUID v7 string for a time `shift_ms` from now: ids as a writer whose
/// clock is off would make them.
fn id_shifted(shift_ms: i64) -> String {
    let ms = now_millis().timestamp_millis() + shift_ms;
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, (ms / 1000) as u64, ((ms % 1000) * 1_000_000) as u32);
    uuid::Uuid::new_v7(ts).to_string()
}

#[tokio::test]
async fn events_of_one_aggregate_arrive_in_commit_order_whatever_their_ids() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-commit-order")));
    let topic = common::unique("commit-order-events");
    common::create_topic(&topic, 2).await;
    let bootstrap = common::kafka_bootstrap();
    Outbox::new(&db, "outbox").ensure_indexes().await.unwrap();
    let (relay, stop) = common::spawn_relay(common::relay_args(db.name(), &bootstrap, &topic, "relay-order"));

    // Three sessions; each one's create, refresh and end are committed in
    // that order by writers whose clocks run ever further behind, so every
    // later event has a *smaller* id than the one before it. They carry the
    // aggregate's version, as the outbox format asks: the relay's first-start
    // scan, which may meet them, orders an aggregate's rows by it.
    let policy = SessionPolicy::default();
    let outbox = Outbox::new(&db, "outbox");
    let mut expected = HashMap::new();
    for user in ["u1", "u2", "u3"] {
        let now = now_millis();
        let cmd = CreateSession { user_id: user.into(), ttl_seconds: None, client: ClientInfo::default() };
        let (mut s, created) = Session::create(cmd, &policy, now).unwrap();
        let refreshed = s.refresh(None, &policy, now).unwrap();
        let ended = s.end(outbox_operator::domain::session::EndReason::Logout, now).unwrap();
        let wrap = |e: EventEnvelope, version: u64| {
            let mut row = OutboxDocument::new(&e, 256).unwrap().at_version(version);
            row.id = id_shifted(-60_000 * version as i64);
            row
        };
        let meta = EventMetadata::default();
        let rows = [
            wrap(EventEnvelope::wrap(&created, now, &meta), 1),
            wrap(EventEnvelope::wrap(&refreshed, now, &meta), 2),
            wrap(EventEnvelope::wrap(&ended, now, &meta), 3),
        ];
        for row in &rows {
            outbox.collection().insert_one(row).await.unwrap(); // one commit each, in this order
        }
        expected.insert(s.id.clone(), rows.iter().map(|r| r.id.clone()).collect::<Vec<_>>());
    }
    common::eventually("all 9 published", Duration::from_secs(30), || async {
        common::published_count(&db).await >= 9
    })
    .await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let mut records = common::consume_all(&bootstrap, &topic, 9, Duration::from_secs(30)).await;
    records.sort_by_key(|r| (r.partition, r.offset));
    for (session, ids) in expected {
        // First copies (a row the start-up scan and the stream both met
        // arrives twice).
        let mut arrived: Vec<String> = Vec::new();
        for r in records.iter().filter(|r| r.key == session) {
            if !arrived.contains(&r.headers["eventId"]) {
                arrived.push(r.headers["eventId"].clone());
            }
        }
        assert_eq!(arrived, ids, "{session}: Kafka order is commit order, not id order");
    }
}

#[tokio::test]
async fn blocked_aggregates_at_the_head_do_not_stall_the_others() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-head")));
    let topic = common::unique("head-events");
    common::create_topic(&topic, 2).await;
    let bootstrap = common::kafka_bootstrap();
    // 100 aggregates (ten times the batch size) whose first event is dead.
    let policy = SessionPolicy::default();
    let outbox = Outbox::new(&db, "outbox");
    outbox.ensure_indexes().await.unwrap();
    let meta = EventMetadata::default();
    let (mut blocked, mut later_rows) = (std::collections::HashSet::new(), Vec::new());
    for i in 0..100 {
        let now = now_millis();
        let cmd = CreateSession { user_id: format!("blocked-{i}"), ttl_seconds: None, client: ClientInfo::default() };
        let (mut s, created) = Session::create(cmd, &policy, now).unwrap();
        let mut dead = OutboxDocument::new(&EventEnvelope::wrap(&created, now, &meta), 256).unwrap();
        dead.status = Some(outbox_operator::outbox::OutboxStatus::Dead);
        (dead.attempts, dead.last_error, dead.hold_seq) = (3, Some("poison".into()), Some(0));
        outbox.collection().insert_one(&dead).await.unwrap();
        let refreshed = s.refresh(None, &policy, now).unwrap();
        later_rows.push(OutboxDocument::new(&EventEnvelope::wrap(&refreshed, now, &meta), 256).unwrap());
        blocked.insert(s.id);
    }
    let mut args = common::relay_args(db.name(), &bootstrap, &topic, "relay-head");
    args.batch_size = 10;
    let (relay, stop) = common::spawn_relay(args);

    // At the head of the stream: a later event of each blocked aggregate;
    // behind them, 50 new aggregates (written while the relay starts).
    for row in &later_rows {
        outbox.collection().insert_one(row).await.unwrap();
    }
    let mut fresh = Vec::new();
    for i in 0..50 {
        let now = now_millis();
        let cmd = CreateSession { user_id: format!("free-{i}"), ttl_seconds: None, client: ClientInfo::default() };
        let (s, created) = Session::create(cmd, &policy, now).unwrap();
        let row = OutboxDocument::new(&EventEnvelope::wrap(&created, now, &EventMetadata::default()), 256).unwrap();
        outbox.collection().insert_one(&row).await.unwrap();
        fresh.push(s.id);
    }
    common::eventually("the 50 free aggregates published, the 100 blocked held", Duration::from_secs(20), || async {
        common::published_count(&db).await >= 50 && common::status_count(&db, "held").await == 100
    })
    .await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let records = common::consume_all(&bootstrap, &topic, 50, Duration::from_secs(20)).await;
    let distinct: std::collections::HashSet<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    assert_eq!(distinct.len(), 50);
    assert!(records.iter().all(|r| !blocked.contains(&r.key)), "nothing of a blocked aggregate was published");
}

#[tokio::test]
async fn a_later_event_is_not_sent_before_the_earlier_one_of_its_aggregate_is_acknowledged() {
    use rdkafka::mocking::MockCluster;
    // Created events go to a topic whose leader (broker 2) is down, so they
    // fail late (timed out); the later refreshes go to a topic on broker 1,
    // which would acknowledge them at once if they were sent.
    let mock = MockCluster::new(2).expect("librdkafka mock cluster");
    let (down, up) = ("created-events", "later-events");
    mock.create_topic(down, 1, 1).unwrap();
    mock.create_topic(up, 1, 1).unwrap();
    mock.partition_leader(down, 0, Some(2)).unwrap();
    mock.partition_leader(up, 0, Some(1)).unwrap();
    mock.broker_down(2).unwrap();

    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-late-failure")));
    common::seed_outbox(&db, 3, 2).await;
    let mut args = common::relay_args(db.name(), &mock.bootstrap_servers(), up, "relay-late");
    args.routes =
        vec![format!("Session.SessionCreated={down}").parse().unwrap(), format!("Session={up}").parse().unwrap()];
    // A 3 s message timeout (the creates fail late) needs a lease of at
    // least three times that.
    args.lease_seconds = 15;
    args.producer_config = vec![("message.timeout.ms".into(), "3000".into())];
    args.backoff_initial_ms = 1000;
    let (relay, stop) = common::spawn_relay(args);
    common::eventually("creates failed, their later refreshes held", Duration::from_secs(30), || async {
        common::status_count(&db, "failed").await == 3 && common::status_count(&db, "held").await == 3
    })
    .await;
    let coll = db.collection::<Document>("outbox");
    for held in coll.find(doc! {"status": "held"}).await.unwrap().try_collect::<Vec<_>>().await.unwrap() {
        assert_eq!(held.get_str("eventName").unwrap(), "SessionRefreshed", "{held}");
    }
    let reader: rdkafka::consumer::BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", mock.bootstrap_servers()).create().unwrap();
    let (_, overtaking) = rdkafka::consumer::Consumer::fetch_watermarks(&reader, up, 0, Duration::from_secs(10))
        .expect("the live topic's watermarks");
    assert_eq!(overtaking, 0, "no refresh reached Kafka while its create was unacknowledged");

    mock.broker_up(2).unwrap();
    common::eventually("all 6 published in order after the broker returns", Duration::from_secs(60), || async {
        common::status_count(&db, "published").await == 6
    })
    .await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let later = common::consume_all(&mock.bootstrap_servers(), up, 3, Duration::from_secs(20)).await;
    let distinct: std::collections::HashSet<&str> = later.iter().map(|r| r.headers["eventId"].as_str()).collect();
    assert_eq!((later.len(), distinct.len()), (3, 3), "each refresh published once, after its create");
}

#[tokio::test]
async fn a_lost_stream_position_is_recovered_by_a_scan_that_loses_nothing() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-recovery")));
    let topic = common::unique("recovery-events");
    common::create_topic(&topic, 1).await;
    let bootstrap = common::kafka_bootstrap();
    // An outbox with rows before any relay v2: the first start rescans it.
    common::seed_outbox(&db, 10, 2).await;
    let args = common::relay_args(db.name(), &bootstrap, &topic, "relay-recovery");
    let (relay, stop) = common::spawn_relay(args.clone());
    common::eventually("the first start republishes the existing rows", Duration::from_secs(30), || async {
        common::published_count(&db).await == 20
    })
    .await;
    // One more through the stream, so the checkpoint names an event.
    common::seed_outbox(&db, 1, 1).await;
    common::eventually("the stream publishes the next", Duration::from_secs(30), || async {
        common::published_count(&db).await == 21
    })
    .await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let checkpoints = Checkpoints::new(&db, "outbox");
    let first = checkpoints.load().await.unwrap().unwrap();
    assert_eq!(first.recovery.as_ref().map(|r| r.0.as_str()), Some("FirstStart"));

    // While no relay runs, 20 more events; and the checkpoint's position is
    // made one the oplog does not have (its event moved a second back), as
    // when the oplog has rolled past it.
    common::seed_outbox(&db, 10, 2).await;
    let mut stored = db.collection::<Document>(CHECKPOINTS).find_one(doc! {"_id": "outbox"}).await.unwrap().unwrap();
    let data = stored.get_document("token").unwrap().get_str("_data").unwrap().to_owned();
    let seconds = u32::from_str_radix(&data[2..10], 16).unwrap();
    let forged = format!("{}{:08X}{}", &data[..2], seconds - 1, &data[10..]);
    stored.get_document_mut("token").unwrap().insert("_data", forged);
    db.collection::<Document>(CHECKPOINTS).replace_one(doc! {"_id": "outbox"}, stored).await.unwrap();

    let (relay, stop) = common::spawn_relay(args);
    common::eventually("a recovery scan publishes the 20 new events", Duration::from_secs(30), || async {
        checkpoints.load().await.unwrap().and_then(|c| c.recovery).is_some_and(|r| r.0 == "HistoryLost")
    })
    .await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let records = common::consume_all(&bootstrap, &topic, 41, Duration::from_secs(30)).await;
    let ids: std::collections::HashSet<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    assert_eq!(ids.len(), 41, "none lost");
}

#[tokio::test]
async fn a_mongodb_lease_holder_whose_clock_runs_behind_keeps_its_lease() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("lease-skew")));
    let leases = db.collection::<Document>("outbox_leases");
    let name = outbox_lease_name(db.name(), "outbox");
    // The holder's clock is an hour behind: the times it writes look long
    // expired to a reader that trusts its own wall clock.
    let behind = || mongodb::bson::DateTime::from_millis(now_millis().timestamp_millis() - 3_600_000);
    leases
        .insert_one(doc! {"_id": &name, "holder": "slow-clock", "until": behind(), "renewedAt": behind(),
        "version": 1_i64, "ttlMs": 2000_i64})
        .await
        .unwrap();
    let standby = MongoLease::new(&db, &name, "standby", Duration::from_secs(2));
    assert!(!standby.acquire().await.unwrap(), "a live lease is not taken, whatever its times say");
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        leases
            .update_one(
                doc! {"_id": &name},
                doc! {"$set": {"until": behind(), "renewedAt": behind()}, "$inc": {"version": 1_i64}},
            )
            .await
            .unwrap();
        assert!(!standby.acquire().await.unwrap(), "renewed (its clock behind): still not taken");
    }
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert!(standby.acquire().await.unwrap(), "unrenewed for a whole duration on the standby's clock: taken");
}

#[tokio::test]
async fn a_lease_name_other_than_the_outboxs_is_refused() {
    let mut args = common::relay_args("refused-lease", &common::kafka_bootstrap(), "t", "relay-x");
    args.lease_name = Some("my-own-lease".into());
    let (relay, _stop) = common::spawn_relay(args);
    let err = relay.await.unwrap().expect_err("a lease name of its own splits the outbox's single lease");
    assert!(err.to_string().contains("one lease per outbox"), "{err}");
}

/// A metric of the relay serving /metrics on `port`.
async fn relay_metric(port: u16, name: &str) -> Option<f64> {
    relay_series_sum(port, name, "").await
}

/// `name` summed over the series whose line contains `label` (every relay
/// metric carries `range`); `None` when there is no such series.
async fn relay_series_sum(port: u16, name: &str, label: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.ok()?.text().await.ok()?;
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{')))
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[tokio::test]
async fn a_relay_paused_past_its_lease_is_fenced_and_the_standby_publishes_everything() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-paused")));
    Outbox::new(&db, "outbox").ensure_indexes().await.unwrap();
    let topic = common::unique("paused-events");
    common::create_topic(&topic, 1).await;
    let bootstrap = common::kafka_bootstrap();
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let spawn = |id: &str, port: u16| {
        let listen = format!("127.0.0.1:{port}");
        common::relay_process(&db, &topic, &["--relay-id", id, "--lease-seconds", "3", "--metrics-listen", &listen])
    };
    let port_a = free_port();
    let a = spawn("relay-a", port_a);
    let writer = write_in_rounds(&db, 40, 50, Duration::from_millis(150));
    common::eventually("relay-a publishes", Duration::from_secs(30), || async {
        common::published_count(&db).await >= 200
    })
    .await;
    // Frozen longer than its lease (SIGSTOP): a stale leader in waiting.
    let signal = |sig: &str, pid: u32| {
        assert!(std::process::Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
    };
    signal("-STOP", a.id());
    let b = spawn("relay-b", free_port());
    let checkpoints = Checkpoints::new(&db, "outbox");
    common::eventually("relay-b claims the outbox", Duration::from_secs(20), || async {
        checkpoints.load().await.unwrap().is_some_and(|c| c.holder.as_deref() == Some("relay-b"))
    })
    .await;
    let b_epoch = checkpoints.load().await.unwrap().unwrap().epoch;
    signal("-CONT", a.id());
    // Awake, relay-a finds its lease gone on its own clock and its writes refused.
    common::eventually("relay-a knows it is not the leader", Duration::from_secs(15), || async {
        relay_metric(port_a, "outbox_relay_leader").await == Some(0.0)
            && relay_metric(port_a, "outbox_relay_epoch").await == Some(0.0)
    })
    .await;
    writer.await.unwrap();
    let records = common::consume_all(&bootstrap, &topic, 2000, Duration::from_secs(60)).await;
    let checkpoint = checkpoints.load().await.unwrap().unwrap();
    assert_eq!(
        (checkpoint.holder.as_deref(), checkpoint.epoch),
        (Some("relay-b"), b_epoch),
        "relay-a never wrote again"
    );
    let ids: std::collections::HashSet<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    assert_eq!(ids.len(), 2000, "none lost");
    for mut p in [a, b] {
        p.kill().unwrap();
        p.wait().unwrap();
    }
}

/// A relay process on a new outbox and topic (named after `name`), serving
/// its metrics on a free port, once it follows the change stream.
async fn relay_following(name: &str) -> (common::TestDb, String, u16, common::Process) {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique(&format!("relay-{name}"))));
    Outbox::new(&db, "outbox").ensure_indexes().await.unwrap();
    let topic = common::unique(&format!("{name}-events"));
    common::create_topic(&topic, 1).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let relay = common::relay_process(&db, &topic, &["--metrics-listen", &listen]);
    let checkpoints = Checkpoints::new(&db, "outbox");
    common::eventually("the relay follows the change stream", Duration::from_secs(30), || async {
        checkpoints.load().await.unwrap().is_some_and(|c| c.token.is_some())
    })
    .await;
    (db, topic, port, relay)
}

/// A hot aggregate's events go to the producer one behind the other, none
/// waiting for the acknowledgement of the one before (the idempotent,
/// gap-less producer keeps their order), and reach Kafka in commit order.
/// One event per aggregate in flight had made each wait a broker round
/// trip: a single aggregate advanced at about 2k events/s.
#[tokio::test]
async fn a_hot_aggregates_events_are_in_flight_together_and_reach_kafka_in_commit_order() {
    let (db, topic, port, mut relay) = relay_following("hot").await;
    let ids = common::seed_outbox(&db, 1, 300).await;
    let records = common::consume_all(&common::kafka_bootstrap(), &topic, 300, Duration::from_secs(30)).await;
    let waits = relay_metric(port, "outbox_relay_aggregate_waits_total").await;
    relay.kill().unwrap();
    relay.wait().unwrap();
    let order: Vec<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    assert_eq!(order, ids.iter().map(String::as_str).collect::<Vec<_>>(), "one copy each, in commit order");
    assert_eq!(waits, Some(0.0), "no event of the aggregate waited for the one before it");
}

/// The sum of `name{..., stage="<stage>"}` on the relay serving `port` (0
/// when it has no such series).
async fn stage_metric(port: u16, name: &str, stage: &str) -> f64 {
    relay_series_sum(port, name, &format!("stage=\"{stage}\"")).await.unwrap_or(0.0)
}

#[tokio::test]
async fn every_event_from_the_stream_is_timed_through_each_stage() {
    let (db, _topic, port, mut relay) = relay_following("stages").await;
    write_in_rounds(&db, 10, 20, Duration::from_millis(50)).await.unwrap();
    common::eventually("all 200 events published", Duration::from_secs(30), || async {
        common::published_count(&db).await >= 200
    })
    .await;
    for stage in STAGES {
        let count = stage_metric(port, "outbox_relay_stage_seconds_count", stage).await;
        assert_eq!(count, 200.0, "every event from the change stream is timed in stage {stage}");
    }
    let sums = STAGES.map(|s| stage_metric(port, "outbox_relay_stage_seconds_sum", s));
    let total: f64 = futures::future::join_all(sums).await.iter().sum();
    assert!(total > 0.0 && total < 200.0 * 5.0, "the stages add up to a plausible time: {total} s for 200 events");
    relay.kill().unwrap();
    relay.wait().unwrap();
}

/// A new producer (a relay claiming a range, a producer replaced after the
/// broker refused it) sends at once. librdkafka asks for an idempotent
/// producer's id on a 500 ms timer unless a metadata answer arrives over a
/// broker connection that is up, and left to the timer the first record
/// waited 0.5-1 s on most starts.
#[tokio::test]
async fn a_new_producer_sends_its_first_record_without_waiting_for_librdkafkas_timer() {
    use rdkafka::{producer::FutureRecord, util::Timeout};
    let topic = common::unique("first-record");
    common::create_topic(&topic, 1).await;
    let config = outbox_operator::kafka::producer_config(&common::kafka_bootstrap(), &[]).unwrap();
    for producer_no in 1..=3 {
        let started = std::time::Instant::now();
        let producer = outbox_operator::kafka::create_producer(&config).unwrap();
        producer
            .send(FutureRecord::to(&topic).key("k").payload("v"), Timeout::Never)
            .await
            .map_err(|(e, _)| e)
            .expect("the record is acknowledged");
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_millis(450),
            "new producer {producer_no}: its first record was acknowledged {waited:?} after the producer was made; \
             it waited for librdkafka's 500 ms producer-id timer"
        );
    }
}
