//! No committed event is lost by the relay, whatever the timing, the rows
//! other applications write, or the outages: each test here is a way an
//! event could end unpublished, or dead without being poison.
//!
//! Needs the local stack (`make test`, or `scripts/stack.sh up` and
//! `. .stack/env`): MongoDB, the broker, the schema registry, and the
//! stack's `mongod` and broker binaries for servers of the tests' own.

mod common;

use std::time::Duration;

use mongodb::{
    bson::{Bson, DateTime, Document, doc, oid::ObjectId},
    options::{Acknowledgment, ReadConcern, WriteConcern},
};
use outbox_operator::outbox::{
    Outbox, OutboxDocument, OutboxStatus,
    requests::{RequestAction, Selection},
};

fn outbox_rows(db: &mongodb::Database) -> mongodb::Collection<Document> {
    db.collection("outbox")
}

async fn row(db: &mongodb::Database, id: impl Into<Bson>) -> Document {
    outbox_rows(db).find_one(doc! {"_id": id.into()}).await.unwrap().expect("the row is still in the outbox")
}

fn ids_of(records: &[common::Consumed]) -> std::collections::HashSet<String> {
    records.iter().map(|r| r.headers["eventId"].clone()).collect()
}

/// The start-up window: a transaction committed where the majority
/// snapshot has not reached it yet, when a relay starts on a new outbox.
/// The change stream, opened without a position, starts after the last
/// *applied* write, so it never brings that commit; the recovery scan, a
/// majority read, does not see it yet. It must be published all the same.
/// The test's own mongod freezes what majority reads see (fail point
/// `disableSnapshotting`: no newer majority snapshot is taken); the relay
/// connects with `w=1`, so nothing of it waits for the freeze but what
/// must. (Pausing the journal flusher does not hold the majority point
/// back on this build: it advanced within 250 ms.)
#[tokio::test]
async fn an_event_committed_while_the_majority_lags_is_published_by_a_relay_starting_then() {
    let mongod = common::TestMongod::start().await;
    let client = mongod.client().await;
    let db = client.database("window");
    let bootstrap = common::kafka_bootstrap();
    let topic = common::unique("window-events");
    common::create_topic(&topic, 1).await;
    // The relays' own collections and indexes exist before the freeze: a
    // relay on another outbox of the database ran once.
    let mut warmup = common::relay_args(db.name(), &bootstrap, &topic, "relay-warmup");
    warmup.mongo.mongodb_uri = mongod.uri("");
    warmup.mongo.collection = "warmup".into();
    let (relay, stop) = common::spawn_relay(warmup);
    common::eventually("the warm-up relay claimed its outbox", Duration::from_secs(30), || async {
        db.collection::<Document>("outbox_relay_checkpoints").count_documents(doc! {}).await.unwrap() > 0
    })
    .await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let outbox = Outbox::new(&db, "outbox");
    outbox.ensure_indexes().await.unwrap();

    mongod.fail_point("disableSnapshotting", true).await;
    let event = common::session_rows(1, 1).remove(0);
    let mut session = client.start_session().await.unwrap();
    let w1 = WriteConcern::builder().w(Acknowledgment::Nodes(1)).journal(false).build();
    session.start_transaction().write_concern(w1).await.unwrap();
    outbox.collection().insert_one(&event).session(&mut session).await.unwrap();
    session.commit_transaction().await.unwrap();
    let majority_sees =
        outbox_rows(&db).find_one(doc! {"_id": &event.id}).read_concern(ReadConcern::majority()).await.unwrap();
    assert!(majority_sees.is_none(), "precondition: the majority snapshot has not reached the commit");

    let mut args = common::relay_args(db.name(), &bootstrap, &topic, "relay-window");
    args.mongo.mongodb_uri = mongod.uri("&w=1");
    let (relay, stop) = common::spawn_relay(args);
    tokio::time::sleep(Duration::from_secs(3)).await;
    mongod.fail_point("disableSnapshotting", false).await;
    let records = common::consume_all(&bootstrap, &topic, 1, Duration::from_secs(30)).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    assert!(ids_of(&records).contains(&event.id), "the event committed in the window reached Kafka");
}

/// Writers committing transactions without pause across a relay's start,
/// on 20 fresh outboxes: every event of every outbox reaches Kafka.
#[tokio::test]
async fn writers_across_a_relays_start_on_fresh_outboxes_lose_nothing() {
    let client = common::mongo().await;
    let bootstrap = common::kafka_bootstrap();
    let mut missing = Vec::new();
    let mut total = 0;
    for round in 0..20 {
        let db = common::TestDb::new(client.database(&common::unique("relay-start")));
        Outbox::new(&db, "outbox").ensure_indexes().await.unwrap();
        let topic = common::unique("start-events");
        common::create_topic(&topic, 2).await;
        let (stop_writing, writing) = tokio::sync::watch::channel(false);
        let writers: Vec<_> =
            (0..3).map(|_| tokio::spawn(write_transactions(client.clone(), db.clone(), writing.clone()))).collect();
        tokio::time::sleep(Duration::from_millis(150 + 40 * round)).await;
        let (relay, stop) = common::spawn_relay(common::relay_args(db.name(), &bootstrap, &topic, "relay-start"));
        tokio::time::sleep(Duration::from_millis(1200)).await;
        stop_writing.send(true).unwrap();
        let mut written = Vec::new();
        for w in writers {
            written.extend(w.await.unwrap());
        }
        let records = common::consume_all(&bootstrap, &topic, written.len(), Duration::from_secs(30)).await;
        stop.send(true).unwrap();
        relay.await.unwrap().unwrap();
        let arrived = ids_of(&records);
        total += written.len();
        missing.extend(written.into_iter().filter(|id| !arrived.contains(id)).map(|id| format!("{} {id}", db.name())));
        if !missing.is_empty() {
            // Kept for inspection: its outbox holds the rows that never arrived.
            db.keep();
        }
    }
    assert!(missing.is_empty(), "{} of {total} events never reached Kafka: {missing:?}", missing.len());
}

/// Commit transactions of one to three new sessions' events into `db`'s
/// outbox until `stop`; returns the committed event ids.
async fn write_transactions(
    client: mongodb::Client,
    db: mongodb::Database,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<String> {
    let outbox = Outbox::new(&db, "outbox");
    let mut committed = Vec::new();
    let mut n = 0;
    while !*stop.borrow() {
        n += 1;
        let rows = common::session_rows(1 + n % 3, 1);
        let mut session = client.start_session().await.unwrap();
        session.start_transaction().await.unwrap();
        outbox.collection().insert_many(&rows).session(&mut session).await.unwrap();
        session.commit_transaction().await.unwrap();
        committed.extend(rows.into_iter().map(|r| r.id));
    }
    committed
}

/// Rows another application wrote that are not readable outbox rows end
/// `dead`, each with a reason naming the field, and the good rows around
/// them are published.
#[tokio::test]
async fn unreadable_rows_go_dead_naming_the_field_and_the_rows_around_them_are_published() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-unreadable")));
    let before = common::seed_outbox(&db, 3, 1).await;
    let template = mongodb::bson::to_document(&common::session_rows(1, 1).remove(0)).unwrap();
    let spoiled = |id: Bson, spoil: &dyn Fn(&mut Document)| {
        let mut d = template.clone();
        d.insert("_id", id);
        d.insert("aggregateId", format!("bad-{}", uuid::Uuid::now_v7()));
        spoil(&mut d);
        d
    };
    let oid = ObjectId::new();
    let bad: Vec<(Bson, Document, &str)> = vec![
        (Bson::String("no-payload".into()), spoiled("no-payload".into(), &|d| drop(d.remove("payload"))), "payload"),
        (
            Bson::String("no-aggregate".into()),
            spoiled("no-aggregate".into(), &|d| drop(d.remove("aggregateId"))),
            "aggregateId",
        ),
        (
            Bson::String("format-99".into()),
            spoiled("format-99".into(), &|d| drop(d.insert("docVersion", 99))),
            "docVersion",
        ),
        (Bson::ObjectId(oid), spoiled(Bson::ObjectId(oid), &|_| {}), "_id"),
    ];
    outbox_rows(&db).insert_many(bad.iter().map(|(_, d, _)| d)).await.unwrap();
    let after = common::seed_outbox(&db, 3, 1).await;

    let topic = common::unique("unreadable-events");
    common::create_topic(&topic, 1).await;
    let bootstrap = common::kafka_bootstrap();
    let (relay, stop) = common::spawn_relay(common::relay_args(db.name(), &bootstrap, &topic, "relay-unreadable"));
    common::eventually("every unreadable row is dead", Duration::from_secs(30), || async {
        common::status_count(&db, "dead").await == bad.len() as u64
    })
    .await;
    let records = common::consume_all(&bootstrap, &topic, 6, Duration::from_secs(30)).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    for (id, _, field) in &bad {
        let r = row(&db, id.clone()).await;
        assert_eq!(r.get_str("status").unwrap(), OutboxStatus::Dead.as_str(), "{r}");
        let error = r.get_str("lastError").unwrap();
        assert!(error.contains(field), "the reason names `{field}`: {error}");
    }
    let arrived = ids_of(&records);
    for id in before.iter().chain(&after) {
        assert!(arrived.contains(id), "the good row {id} was published");
    }
}

/// A row of the first release's format (`pending`) whose aggregate is
/// blocked behind a dead event is held in its place, not left pending
/// unrecorded, and is published after its predecessor once that is
/// redriven.
#[tokio::test]
async fn a_first_release_pending_row_behind_a_dead_event_is_held_then_published_in_order() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-format1")));
    let outbox = Outbox::new(&db, "outbox");
    outbox.ensure_indexes().await.unwrap();
    let mut rows = common::session_rows(1, 2);
    let (mut first, later) = (rows.remove(0), rows.remove(0));
    first.event_version = 99; // no schema: dead at its only attempt
    let mut pending = mongodb::bson::to_document(&later).unwrap();
    pending.insert("docVersion", 1);
    pending.insert("status", "pending");
    pending.insert("nextAttemptAt", DateTime::now());
    outbox_rows(&db).insert_one(mongodb::bson::to_document(&first).unwrap()).await.unwrap();
    outbox_rows(&db).insert_one(pending).await.unwrap();

    let topic = common::unique("format1-events");
    common::create_topic(&topic, 1).await;
    let bootstrap = common::kafka_bootstrap();
    let mut args = common::relay_args(db.name(), &bootstrap, &topic, "relay-format1");
    args.max_attempts = 1;
    let (relay, stop) = common::spawn_relay(args);
    common::eventually("the first event is dead", Duration::from_secs(30), || async {
        common::status_count(&db, "dead").await == 1
    })
    .await;
    common::eventually("the pending row waits behind it, held", Duration::from_secs(10), || async {
        row(&db, later.id.as_str()).await.get_str("status") == Ok("held")
    })
    .await;
    assert!(row(&db, later.id.as_str()).await.get_i64("holdSeq").is_ok(), "it has its place in the backlog");
    // The cause is fixed and the dead event redriven: both go, in order.
    outbox_rows(&db).update_one(doc! {"_id": &first.id}, doc! {"$set": {"eventVersion": 1}}).await.unwrap();
    outbox
        .mark_for_request(&Selection::all(OutboxStatus::Dead), &RequestAction::Redrive, "test", DateTime::now())
        .await
        .unwrap();
    let records = common::consume_all(&bootstrap, &topic, 2, Duration::from_secs(30)).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let order: Vec<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    assert_eq!(order, [first.id.as_str(), later.id.as_str()], "published, in the aggregate's order");
}

/// An event that goes dead holds back only the events after it: the
/// earlier events of its aggregate read in the same batch (sent one behind
/// the other) are published, not held behind it.
#[tokio::test]
async fn the_earlier_events_in_the_batch_of_an_event_that_goes_dead_are_published() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-earlier")));
    // The first two events are sent; the third has no schema: dead at its
    // only attempt.
    let mut rows = common::session_rows(1, 4);
    rows[2].event_version = 99;
    for r in &rows {
        outbox_rows(&db).insert_one(mongodb::bson::to_document(r).unwrap()).await.unwrap();
    }
    let topic = common::unique("earlier-events");
    common::create_topic(&topic, 1).await;
    let bootstrap = common::kafka_bootstrap();
    let mut args = common::relay_args(db.name(), &bootstrap, &topic, "relay-earlier");
    args.max_attempts = 1;
    let (relay, stop) = common::spawn_relay(args);
    common::eventually("the second event is dead", Duration::from_secs(30), || async {
        common::status_count(&db, "dead").await == 1
    })
    .await;
    let records = common::consume_all(&bootstrap, &topic, 2, Duration::from_secs(30)).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let order: Vec<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    assert_eq!(order, [rows[0].id.as_str(), rows[1].id.as_str()], "the events before the dead one are published");
    for r in &rows[..2] {
        let r = row(&db, r.id.as_str()).await;
        assert!(r.get_str("status").is_err(), "and not set aside: {r}");
    }
    assert_eq!(row(&db, rows[3].id.as_str()).await.get_str("status").unwrap(), "held", "the fourth waits");
}

/// A discard request gives a dead event up: the row is kept, marked
/// `discarded` with who and why, and its aggregate's held and later events
/// are published in order. A dead event the selection does not name stays
/// dead, and its aggregate stays blocked.
#[tokio::test]
async fn a_discarded_dead_event_is_kept_with_who_and_why_and_its_aggregate_flows_again() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-discard")));
    let outbox = Outbox::new(&db, "outbox");
    outbox.ensure_indexes().await.unwrap();
    // Two aggregates: their first events have no schema (dead at once), then
    // a good event each; a third event of the first arrives after the discard.
    let mut rows = common::session_rows(2, 3);
    rows[0].event_version = 99;
    rows[1].event_version = 99;
    let (discarded, kept_dead, later) = (rows[0].clone(), rows[1].clone(), rows[4].clone());
    for r in &rows[..4] {
        outbox_rows(&db).insert_one(mongodb::bson::to_document(r).unwrap()).await.unwrap();
    }
    let topic = common::unique("discard-events");
    common::create_topic(&topic, 1).await;
    let bootstrap = common::kafka_bootstrap();
    let mut args = common::relay_args(db.name(), &bootstrap, &topic, "relay-discard");
    args.max_attempts = 1;
    let (relay, stop) = common::spawn_relay(args);
    common::eventually("both first events dead, their successors held", Duration::from_secs(30), || async {
        common::status_count(&db, "dead").await == 2 && common::status_count(&db, "held").await == 2
    })
    .await;

    let selection =
        Selection { aggregate_ids: vec![discarded.aggregate_id.clone()], ..Selection::all(OutboxStatus::Dead) };
    let action = RequestAction::Discard { by: "alice".into(), reason: "bad data, fixed by hand".into() };
    let marked = outbox.mark_for_request(&selection, &action, "req-1", DateTime::now()).await.unwrap();
    assert_eq!(marked, 1, "only the named aggregate's dead event");
    common::eventually("the discard is carried out", Duration::from_secs(30), || async {
        outbox.request_progress("req-1").await.unwrap().discarded == 1
    })
    .await;
    outbox_rows(&db).insert_one(mongodb::bson::to_document(&later).unwrap()).await.unwrap();
    let records = common::consume_all(&bootstrap, &topic, 2, Duration::from_secs(30)).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();

    let order: Vec<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    assert_eq!(order, [rows[2].id.as_str(), later.id.as_str()], "the aggregate flows again, in order");
    let r = row(&db, discarded.id.as_str()).await;
    assert_eq!(r.get_str("status").unwrap(), "discarded", "{r}");
    let mark = r.get_document("discard").unwrap();
    assert_eq!((mark.get_str("by").unwrap(), mark.get_str("reason").unwrap()), ("alice", "bad data, fixed by hand"));
    assert!(r.get_str("lastError").is_ok(), "the last error is kept");
    let progress = outbox.request_progress("req-1").await.unwrap();
    assert_eq!((progress.matched, progress.done(), progress.waiting, progress.dead), (1, 1, 0, 0));
    assert_eq!(row(&db, kept_dead.id.as_str()).await.get_str("status").unwrap(), "dead");
    assert_eq!(row(&db, rows[3].id.as_str()).await.get_str("status").unwrap(), "held", "still behind its dead event");
}

/// A broker outage longer than the whole attempt budget (3 attempts at
/// 100-500 ms) turns no event dead: outages spend no attempt; every event
/// is published once the broker is back.
#[tokio::test]
async fn a_broker_cut_longer_than_the_attempt_budget_ends_with_every_event_published_and_none_dead() {
    let broker = common::CuttableBroker::start().await;
    let topic = "budget-events";
    common::create_topic_on(&broker.bootstrap, topic, 1).await;
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-budget")));
    let mut ids = common::seed_outbox(&db, 10, 1).await;
    let mut args = common::relay_args(db.name(), &broker.bootstrap, topic, "relay-budget");
    // The relay gives its producer up after 800 ms without an answer; the
    // new one tries to reconnect at most a second apart (10 s by default).
    args.producer_config =
        vec![("message.timeout.ms".into(), "800".into()), ("reconnect.backoff.max.ms".into(), "1000".into())];
    args.max_attempts = 3;
    args.backoff_initial_ms = 100;
    args.backoff_max_ms = 500;
    let (relay, stop) = common::spawn_relay(args);
    common::consume_all(&broker.bootstrap, topic, 10, Duration::from_secs(30)).await;
    broker.cut();
    ids.extend(common::seed_outbox(&db, 10, 2).await);
    common::eventually("events retried well past the attempt budget", Duration::from_secs(30), || async {
        outbox_rows(&db).count_documents(doc! {"outageRetries": {"$gte": 6}}).await.unwrap() > 0
    })
    .await;
    assert_eq!(common::status_count(&db, "dead").await, 0, "an outage turns nothing dead");
    let waiting = row(
        &db,
        outbox_rows(&db).find_one(doc! {"status": "failed"}).await.unwrap().unwrap().get("_id").unwrap().clone(),
    )
    .await;
    assert_eq!(
        (waiting.get_i32("attempts").unwrap_or(0), waiting.get_str("failureKind").unwrap()),
        (0, "outage"),
        "{waiting}"
    );
    let stats = Outbox::new(&db, "outbox").stats(DateTime::now()).await.unwrap();
    assert!(
        stats
            .failed_by_reason
            .keys()
            .all(|r| ["timed_out", "broker_unavailable", "producer_refused"].contains(&r.as_str())),
        "{:?}",
        stats.failed_by_reason
    );
    broker.restore();
    let records = common::consume_all(&broker.bootstrap, topic, ids.len(), Duration::from_secs(60)).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let arrived = ids_of(&records);
    assert!(ids.iter().all(|id| arrived.contains(id)), "{} of {} events published", arrived.len(), ids.len());
    assert_eq!(common::status_count(&db, "dead").await, 0);
}

/// The schema registry unreachable for longer than the attempt budget:
/// the events wait (reason `registry_unavailable`) and none goes dead.
#[tokio::test]
async fn a_registry_outage_longer_than_the_attempt_budget_turns_nothing_dead() {
    let registry = common::schema_registry_url();
    let upstream = registry.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let proxy = common::CuttableProxy::start(&upstream, 0).await;
    proxy.cut();
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-registry-cut")));
    let ids = common::seed_outbox(&db, 5, 2).await;
    let topic = common::unique("registry-cut-events");
    common::create_topic(&topic, 1).await;
    let bootstrap = common::kafka_bootstrap();
    let mut args = common::relay_args(db.name(), &bootstrap, &topic, "relay-registry-cut");
    args.schema_registry_url = format!("http://{}", proxy.address);
    args.max_attempts = 2;
    args.backoff_initial_ms = 100;
    args.backoff_max_ms = 300;
    let (relay, stop) = common::spawn_relay(args);
    common::eventually("events retried past the attempt budget", Duration::from_secs(30), || async {
        outbox_rows(&db).count_documents(doc! {"outageRetries": {"$gte": 4}}).await.unwrap() > 0
    })
    .await;
    assert_eq!(common::status_count(&db, "dead").await, 0, "a registry outage turns nothing dead");
    let stats = Outbox::new(&db, "outbox").stats(DateTime::now()).await.unwrap();
    assert_eq!(stats.failed_by_reason.keys().collect::<Vec<_>>(), ["registry_unavailable"]);
    proxy.restore();
    let records = common::consume_all(&bootstrap, &topic, ids.len(), Duration::from_secs(60)).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    assert_eq!(ids_of(&records).len(), ids.len(), "every event published once the registry is back");
}

/// A record larger than the producer allows goes dead at once (no attempt
/// can succeed), and its error names the size.
#[tokio::test]
async fn an_oversized_record_goes_dead_at_once_naming_its_size() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-oversized")));
    let mut rows = common::session_rows(2, 1);
    rows[0].payload.insert("userId", "x".repeat(3000));
    let big: &OutboxDocument = &rows[0];
    Outbox::new(&db, "outbox").ensure_indexes().await.unwrap();
    outbox_rows(&db).insert_many(rows.iter().map(|r| mongodb::bson::to_document(r).unwrap())).await.unwrap();
    let topic = common::unique("oversized-events");
    common::create_topic(&topic, 1).await;
    let bootstrap = common::kafka_bootstrap();
    let mut args = common::relay_args(db.name(), &bootstrap, &topic, "relay-oversized");
    args.producer_config.push(("message.max.bytes".into(), "2000".into()));
    let (relay, stop) = common::spawn_relay(args);
    common::eventually("the oversized event is dead", Duration::from_secs(30), || async {
        common::status_count(&db, "dead").await == 1
    })
    .await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let dead = row(&db, big.id.as_str()).await;
    let error = dead.get_str("lastError").unwrap();
    assert_eq!(dead.get_i32("attempts").unwrap(), 1, "dead at its first attempt: {dead}");
    assert!(error.contains("bytes") && error.contains("too large"), "names the size: {error}");
    assert_eq!(dead.get_str("failureKind").unwrap(), "permanent");
}

/// `/readyz` of a relay says ready only once it publishes or stands by
/// correctly: not while the outbox's lease is held by another relay whose
/// range this one was given, and yes once it has claimed the range and
/// follows its change stream.
#[tokio::test]
async fn a_relay_is_ready_only_once_it_follows_its_ranges() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("relay-ready")));
    Outbox::new(&db, "outbox").ensure_indexes().await.unwrap();
    let name = outbox_operator::lease::outbox_lease_name(db.name(), "outbox");
    // A holder that is not a live relay of the outbox, with a long lease.
    let until = DateTime::from_millis(DateTime::now().timestamp_millis() + 600_000);
    db.collection::<Document>("outbox_leases")
        .insert_one(doc! {"_id": &name, "holder": "gone", "until": until, "renewedAt": DateTime::now(),
        "version": 1_i64, "ttlMs": 600_000_i64})
        .await
        .unwrap();
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let topic = common::unique("ready-events");
    common::create_topic(&topic, 1).await;
    let _relay = common::relay_process(&db, &topic, &["--lease-backend", "mongodb", "--metrics-listen", &listen]);
    let http = common::http();
    let readyz =
        || async { http.get(format!("http://{listen}/readyz")).send().await.ok().map(|r| r.status().as_u16()) };
    common::eventually("the relay serves /readyz", Duration::from_secs(30), || async { readyz().await.is_some() })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(readyz().await, Some(503), "not ready while its range's lease is another's");
    db.collection::<Document>("outbox_leases").delete_one(doc! {"_id": &name}).await.unwrap();
    common::eventually("ready once it follows the range's stream", Duration::from_secs(30), || async {
        readyz().await == Some(200)
    })
    .await;
    let checkpoint =
        outbox_operator::outbox::checkpoint::Checkpoints::new(&db, "outbox").load().await.unwrap().unwrap();
    assert!(checkpoint.recovery.is_some(), "its first-start recovery was over when it said ready");
}
