//! Consumers against the real stack: exactly-once effect through the
//! processed-events store, upcasting by schema resolution, retries and
//! dead-lettering, crash and rebalance safety, and lag.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use outbox_operator::{
    consumer::{
        self, HandlerKind,
        decode::{Decoder, Readers, RecordMeta},
        ordering::EventOrder,
    },
    kafka::lag::read_group_lag,
};
use rdkafka::{
    ClientConfig,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};

async fn read_model(db: &mongodb::Database) -> (i64, i64, i64, usize) {
    let docs: Vec<Document> =
        db.collection::<Document>("session_projection").find(doc! {}).await.unwrap().try_collect().await.unwrap();
    let sum = |k: &str| docs.iter().map(|d| d.get_i32(k).map(i64::from).unwrap_or(0)).sum::<i64>();
    (sum("activeSessions"), sum("sessionsCreated"), sum("refreshes"), docs.len())
}

async fn lag(topic: &str, group: &str) -> i64 {
    read_group_lag(&common::kafka_bootstrap(), &[], group, &[topic.to_owned()], Duration::from_secs(10))
        .await
        .expect("group lag")
        .total
}

#[tokio::test]
async fn the_same_event_delivered_twice_is_applied_once() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-dedup")));
    let (topic, ids) = common::publish_sessions(&db, 10, 2, 2).await;
    let group = common::unique("projection");
    assert_eq!(lag(&topic, &group).await, 20, "a group that never ran lags by everything");
    let (task, stop) = common::spawn_consumer(common::consume_args(db.name(), &topic, &group, HandlerKind::Projection));
    common::eventually("all 20 processed", Duration::from_secs(60), || async {
        common::processed(&db, &group).await == 20
    })
    .await;
    assert_eq!(read_model(&db).await, (10, 10, 10, 10));

    // Deliver every record a second time.
    let records = common::consume_all(&common::kafka_bootstrap(), &topic, ids.len(), Duration::from_secs(30)).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", common::kafka_bootstrap())
        .set("batch.num.messages", "1")
        .create()
        .unwrap();
    for r in &records {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header { key: k, value: Some(v.as_str()) });
        }
        let record = FutureRecord::to(&topic).key(&r.key).payload(&r.payload).headers(headers).partition(r.partition);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
    common::eventually("the group caught up with the duplicates", Duration::from_secs(60), || async {
        lag(&topic, &group).await == 0
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(common::processed(&db, &group).await, 20, "no second processed record");
    assert_eq!(read_model(&db).await, (10, 10, 10, 10), "no second effect");
}

/// Records that arrive twice before the consumer starts land in one batch:
/// the batch's one dedup query cannot see the second copy, the batch itself
/// must.
#[tokio::test]
async fn a_batch_holding_the_same_event_twice_applies_it_once() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-batch-dup")));
    let (topic, ids) = common::publish_sessions(&db, 10, 2, 1).await;
    let records = common::consume_all(&common::kafka_bootstrap(), &topic, ids.len(), Duration::from_secs(30)).await;
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", common::kafka_bootstrap()).create().unwrap();
    for r in &records {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header { key: k, value: Some(v.as_str()) });
        }
        let record = FutureRecord::to(&topic).key(&r.key).payload(&r.payload).headers(headers).partition(r.partition);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
    let group = common::unique("projection-batch");
    let mut args = common::consume_args(db.name(), &topic, &group, HandlerKind::Projection);
    args.linger_ms = 500; // one batch of all 40 records
    let (task, stop) = common::spawn_consumer(args);
    common::eventually("the group read all 40 records", Duration::from_secs(60), || async {
        lag(&topic, &group).await == 0
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(common::processed(&db, &group).await, 20);
    assert_eq!(read_model(&db).await, (10, 10, 10, 10), "each event applied once");
}

#[tokio::test]
async fn v1_events_are_read_as_v2_and_the_registry_checks_backward_compatibility() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-upcast")));
    let (topic, _) = common::publish_sessions(&db, 1, 1, 1).await;
    let records = common::consume_all(&common::kafka_bootstrap(), &topic, 1, Duration::from_secs(30)).await;
    let r = &records[0];
    assert_eq!(r.headers["eventVersion"], "1", "the producer wrote v1");
    let meta = RecordMeta { event_name: Some("SessionCreated"), ..Default::default() };
    let readers = Readers::from_dir(Some(std::path::Path::new(common::SAMPLE_SCHEMAS))).unwrap();
    let event = Decoder::new(&common::schema_registry_url(), readers).decode(&r.payload, &meta).await.unwrap();
    assert_eq!(event.reader_version, Some(2));
    assert_eq!(event.json["payload"]["authMethod"], "password", "v2's default fills the field v1 lacks");
    assert_eq!(event.json["eventVersion"], 1, "the envelope still says what was written");

    // The registry's BACKWARD check: v2 passes against v1, an incompatible change fails.
    let http = common::http();
    let subject = format!("{topic}-dev.outbox.session.SessionCreated");
    let check = |schema: String| {
        let (http, url, subject) = (http.clone(), common::schema_registry_url(), subject.clone());
        async move {
            let r = http
                .post(format!("{url}/compatibility/subjects/{subject}/versions/latest"))
                .json(&serde_json::json!({"schema": schema}))
                .send()
                .await
                .unwrap();
            r.json::<serde_json::Value>().await.unwrap()["is_compatible"].as_bool().unwrap()
        }
    };
    let v2 = outbox_operator::avro::event_schema("SessionCreated", 2).unwrap().text.to_owned();
    assert!(check(v2.clone()).await, "v2 adds a field with a default: BACKWARD compatible");
    let broken = v2.replace(r#""default": "password","#, "");
    assert_ne!(broken, v2);
    assert!(!check(broken).await, "a new field without a default is not");
}

#[derive(Clone, Default)]
struct Hook {
    calls: Arc<Mutex<Vec<(String, String, String)>>>,
    fail_user: Arc<Mutex<Option<String>>>,
    /// The answer to the failing user's SessionCreated (default 422).
    fail_status: Arc<Mutex<Option<u16>>>,
    /// Fail only this many times, then answer 200.
    fail_times: Arc<Mutex<Option<usize>>>,
    /// Fail this event id (Idempotency-Key), whatever its name, with
    /// `fail_status` (default 503).
    fail_event: Arc<Mutex<Option<String>>>,
}

async fn hook(State(h): State<Hook>, headers: HeaderMap, Json(body): Json<serde_json::Value>) -> StatusCode {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let user = body["payload"]["userId"].as_str().unwrap_or_default().to_owned();
    let name = body["eventName"].as_str().unwrap_or_default().to_owned();
    h.calls.lock().unwrap().push((key.clone(), name.clone(), user.clone()));
    if h.fail_event.lock().unwrap().as_deref() == Some(key.as_str()) {
        return StatusCode::from_u16(h.fail_status.lock().unwrap().unwrap_or(503)).unwrap();
    }
    let failing = h.fail_user.lock().unwrap().clone();
    let mut times = h.fail_times.lock().unwrap();
    let fails = failing.as_deref() == Some(user.as_str()) && name == "SessionCreated" && *times != Some(0);
    if fails {
        if let Some(n) = times.as_mut() {
            *n -= 1;
        }
        StatusCode::from_u16(h.fail_status.lock().unwrap().unwrap_or(422)).unwrap()
    } else {
        StatusCode::OK
    }
}

impl Hook {
    /// Serve this hook on a local port; its URL.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let app = Router::new().route("/events", post(hook)).with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }
}

/// Test consumer settings with the webhook handler posting to `url`.
fn webhook_args(db: &mongodb::Database, topic: &str, group: &str, url: String) -> consumer::ConsumeArgs {
    let mut args = common::consume_args(db.name(), topic, group, HandlerKind::Webhook);
    args.webhook_url = Some(url);
    args
}

/// Sessions published to a new one-partition topic, with the user id of
/// the `n`th event (whose webhook call the tests make fail).
async fn webhook_scene(
    db: &mongodb::Database,
    sessions: usize,
    n: usize,
) -> (String, Vec<String>, Vec<Document>, String) {
    let (topic, ids) = common::publish_sessions(db, sessions, 1, 1).await;
    let rows = common::outbox_rows(db).await;
    let user = rows[n].get_document("payload").unwrap().get_str("userId").unwrap().to_owned();
    (topic, ids, rows, user)
}

#[tokio::test]
async fn a_failing_webhook_retries_then_dead_letters_and_the_rest_flows() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-webhook")));
    let (topic, ids, rows, poison_user) = webhook_scene(&db, 6, 2).await;
    let state = Hook::default();
    *state.fail_user.lock().unwrap() = Some(poison_user.clone());
    let url = state.serve().await;

    let group = common::unique("webhook");
    let args = webhook_args(&db, &topic, &group, url);
    let (task, stop) = common::spawn_consumer(args.clone());
    common::eventually("5 delivered, 1 dead-lettered", Duration::from_secs(60), || async {
        common::processed(&db, &group).await == 5 && lag(&topic, &group).await == 0
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    let calls = state.calls.lock().unwrap().clone();
    let poison_calls = calls.iter().filter(|c| c.2 == poison_user).count();
    assert_eq!(poison_calls, 3, "the failing event was tried max-attempts times: {calls:?}");
    let mut keys: Vec<&String> = calls.iter().map(|c| &c.0).collect();
    keys.sort();
    keys.dedup();
    let mut expected: Vec<&String> = ids.iter().collect();
    expected.sort();
    assert_eq!(keys, expected, "Idempotency-Key is the event id");

    let dlq =
        common::consume_all(&common::kafka_bootstrap(), &format!("{topic}.dlq"), 1, Duration::from_secs(30)).await;
    assert_eq!(dlq.len(), 1);
    let h = &dlq[0].headers;
    assert!(h["dlq.error"].contains("422"), "{h:?}");
    assert_eq!((h["dlq.original.topic"].as_str(), h["dlq.attempts"].as_str()), (topic.as_str(), "3"));
    assert_eq!(h["dlq.original.partition"], "0");
    assert_eq!(h["eventId"], rows[2].get_str("_id").unwrap(), "original headers kept");

    // Fixed downstream: replaying the dead-letter topic applies it.
    *state.fail_user.lock().unwrap() = None;
    let (_keep, rx) = tokio::sync::watch::channel(false);
    let counts = consumer::redrive(&args, &[format!("{topic}.dlq")], rx, None).await.unwrap();
    assert_eq!((counts.records, counts.applied, counts.dead_lettered), (1, 1, 0));
    assert_eq!(common::processed(&db, &group).await, 6);
}

/// A webhook that answers 503 for longer than the whole retry budget
/// (3 attempts) is an outage, not a poison event: the record waits and is
/// delivered once the webhook is back; nothing is dead-lettered.
#[tokio::test]
async fn an_outage_longer_than_the_retry_budget_is_waited_out_not_dead_lettered() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-outage")));
    let (topic, ids, _, user) = webhook_scene(&db, 3, 1).await;
    let state = Hook::default();
    *state.fail_user.lock().unwrap() = Some(user.clone());
    *state.fail_status.lock().unwrap() = Some(503);
    *state.fail_times.lock().unwrap() = Some(8);
    let url = state.serve().await;

    let group = common::unique("webhook-outage");
    let args = webhook_args(&db, &topic, &group, url);
    let (task, stop) = common::spawn_consumer(args);
    common::eventually("all 3 delivered after the outage", Duration::from_secs(60), || async {
        common::processed(&db, &group).await == ids.len() as u64 && lag(&topic, &group).await == 0
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let calls = state.calls.lock().unwrap().clone();
    assert_eq!(calls.iter().filter(|c| c.2 == user).count(), 9, "8 answers 503, then delivered: {calls:?}");
}

/// Seed `sessions` more sessions (one event each) into the outbox of `db`
/// and relay them to `topic`, which holds `before` events; the new event
/// ids and where every event of the topic is (event id -> partition, offset).
async fn publish_more(
    db: &mongodb::Database,
    topic: &str,
    sessions: usize,
    before: usize,
) -> (Vec<String>, std::collections::HashMap<String, (i32, i64)>) {
    let bootstrap = common::kafka_bootstrap();
    let ids = common::seed_outbox(db, sessions, 1).await;
    let mut relay = common::relay_args(db.name(), &bootstrap, topic, &common::unique("relay"));
    relay.producer_config = vec![("batch.num.messages".into(), "1".into())];
    let (relay, stop_relay) = common::spawn_relay(relay);
    let total = before + ids.len();
    common::eventually("the new events are published", Duration::from_secs(60), || async {
        common::published_count(db).await == total as u64
    })
    .await;
    stop_relay.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let all = common::consume_all(&bootstrap, topic, total, Duration::from_secs(30)).await;
    (ids, all.iter().map(|r| (r.headers["eventId"].clone(), (r.partition, r.offset))).collect())
}

/// Sessions (one event each) on a new two-partition topic, and a hook that
/// fails the first event of one partition with `status`. Returns the
/// topic, the event ids, the failing record and the hook.
async fn one_failing_partition(db: &mongodb::Database, status: u16) -> (String, Vec<String>, common::Consumed, Hook) {
    let (topic, ids) = common::publish_sessions(db, 6, 1, 2).await;
    let records = common::consume_all(&common::kafka_bootstrap(), &topic, ids.len(), Duration::from_secs(30)).await;
    let held = records[0].partition;
    let failing = records.iter().filter(|r| r.partition == held).min_by_key(|r| r.offset).unwrap().clone();
    let state = Hook::default();
    *state.fail_event.lock().unwrap() = Some(failing.headers["eventId"].clone());
    *state.fail_status.lock().unwrap() = Some(status);
    (topic, ids, failing, state)
}

impl Hook {
    fn calls_of(&self, id: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|c| c.0 == id).count()
    }

    /// Calls for records of `partition` after `offset`.
    fn behind(
        &self,
        place: &std::collections::HashMap<String, (i32, i64)>,
        partition: i32,
        offset: i64,
    ) -> Vec<(String, String, String)> {
        let calls = self.calls.lock().unwrap().clone();
        calls.into_iter().filter(|c| place[&c.0].0 == partition && place[&c.0].1 > offset).collect()
    }
}

/// With `ordering: partition`, a record waiting out an outage holds only
/// its own partition: events published to the other partition while it
/// waits are delivered; once the webhook is back, the waiting partition
/// resumes at its record and delivers the rest, in order.
#[tokio::test]
async fn a_waiting_record_holds_only_its_own_partition() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-isolation")));
    let (topic, first, failing, state) = one_failing_partition(&db, 503).await;
    let (held, failing_id) = (failing.partition, failing.headers["eventId"].clone());
    let url = state.serve().await;
    let group = common::unique("isolation");
    let mut args = webhook_args(&db, &topic, &group, url);
    args.ordering = EventOrder::Partition;
    let (task, stop) = common::spawn_consumer(args);
    let calls_of = |id: &str| state.calls_of(id);
    common::eventually("the failing event is being retried", Duration::from_secs(60), || async {
        calls_of(&failing_id) >= 2
    })
    .await;

    // A second wave, published while the partition waits.
    let (second, place) = publish_more(&db, &topic, 16, first.len()).await;
    let total = first.len() + second.len();
    let flowing: Vec<&String> = second.iter().filter(|id| place[*id].0 != held).collect();
    assert!(!flowing.is_empty(), "some of the second wave went to the other partition: {place:?} held {held}");
    common::eventually(
        "the other partition's new events are delivered while one waits",
        Duration::from_secs(30),
        || async { flowing.iter().all(|id| calls_of(id) > 0) },
    )
    .await;
    let behind = state.behind(&place, held, failing.offset);
    assert!(behind.is_empty(), "nothing behind the waiting record was delivered: {behind:?}");

    // The outage ends: the waiting partition delivers the rest, in order.
    *state.fail_event.lock().unwrap() = None;
    common::eventually("everything delivered", Duration::from_secs(60), || async {
        common::processed(&db, &group).await == total as u64 && lag(&topic, &group).await == 0
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let calls = state.calls.lock().unwrap().clone();
    for p in [0, 1] {
        let mut firsts: Vec<i64> = Vec::new();
        for c in &calls {
            let (partition, offset) = place[&c.0];
            if partition == p && !firsts.contains(&offset) {
                firsts.push(offset);
            }
        }
        assert!(firsts.is_sorted(), "partition {p} delivered in offset order: {firsts:?}");
    }
}

/// With the default `ordering: key`, a record waiting out an outage holds
/// only its own aggregate: the other aggregates' events of the same
/// partition are delivered past it, its aggregate's later event waits
/// behind it, and the group's committed offset stays at it. A consumer
/// stopped while it waits starts again from it, delivers nothing twice,
/// and once the webhook is back delivers the aggregate's events in order.
#[tokio::test]
async fn a_waiting_record_holds_only_its_own_aggregate() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-key")));
    let (topic, ids) = common::publish_sessions(&db, 6, 2, 1).await;
    let records = common::consume_all(&common::kafka_bootstrap(), &topic, ids.len(), Duration::from_secs(30)).await;
    // The first event of the third aggregate fails.
    let failing = records.iter().filter(|r| r.headers["eventName"] == "SessionCreated").nth(2).unwrap().clone();
    let of_aggregate: Vec<String> =
        records.iter().filter(|r| r.key == failing.key).map(|r| r.headers["eventId"].clone()).collect();
    assert_eq!(of_aggregate.len(), 2);
    let state = Hook::default();
    *state.fail_event.lock().unwrap() = Some(of_aggregate[0].clone());
    let url = state.serve().await;
    let group = common::unique("key");
    let args = webhook_args(&db, &topic, &group, url);
    assert_eq!(args.ordering, EventOrder::Key, "the default");
    let others: Vec<&String> = ids.iter().filter(|id| !of_aggregate.contains(id)).collect();
    for round in ["first", "after a restart"] {
        let tried = state.calls_of(&of_aggregate[0]);
        let (task, stop) = common::spawn_consumer(args.clone());
        common::eventually(
            &format!("{round}: the other aggregates flow past the waiting record"),
            Duration::from_secs(60),
            || async {
                state.calls_of(&of_aggregate[0]) >= tried + 2 && others.iter().all(|id| state.calls_of(id) > 0)
            },
        )
        .await;
        assert_eq!(state.calls_of(&of_aggregate[1]), 0, "{round}: the aggregate's later event waits behind it");
        let reports = outbox_operator::consumer::report::MemberReports::new(&db);
        common::eventually(
            &format!("{round}: the report names the waiting aggregate"),
            Duration::from_secs(30),
            || async {
                let fresh = reports.fresh(&group, mongodb::bson::DateTime::now()).await.unwrap();
                fresh.iter().flat_map(|r| &r.waiting_aggregates).any(|w| {
                    w.aggregate.as_deref() == Some(failing.key.as_str()) && w.offset == failing.offset && w.queued == 1
                })
            },
        )
        .await;
        common::eventually(
            &format!("{round}: the committed offset stays at the waiting record"),
            Duration::from_secs(30),
            || async { lag(&topic, &group).await == ids.len() as i64 - failing.offset },
        )
        .await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
    }
    assert!(
        others.iter().all(|id| state.calls_of(id) == 1),
        "redelivered records were found processed, not sent again"
    );

    *state.fail_event.lock().unwrap() = None;
    let (task, stop) = common::spawn_consumer(args);
    common::eventually("everything delivered", Duration::from_secs(60), || async {
        common::processed(&db, &group).await == ids.len() as u64 && lag(&topic, &group).await == 0
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let calls = state.calls.lock().unwrap().clone();
    let last_failure = calls.iter().rposition(|c| c.0 == of_aggregate[0]).unwrap();
    let later = calls.iter().position(|c| c.0 == of_aggregate[1]).unwrap();
    assert!(later > last_failure, "the aggregate's events in order: {calls:?}");
}

/// A record due for a dead-letter topic that refuses it (here an invalid
/// topic name) is not skipped: its partition waits, the other partition
/// flows, and once the topic takes it (restart with a valid suffix) it is
/// dead-lettered and its partition delivers the rest.
#[tokio::test]
async fn a_dead_letter_topic_that_refuses_the_record_holds_only_its_partition() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-dlq-down")));
    let (topic, first, failing, state) = one_failing_partition(&db, 422).await;
    let (held, failing_id) = (failing.partition, failing.headers["eventId"].clone());
    let url = state.serve().await;
    let group = common::unique("dlq-down");
    let mut args = webhook_args(&db, &topic, &group, url);
    args.ordering = EventOrder::Partition;
    args.dead_letter_suffix = ".dlq/unwritable".into();
    let (task, stop) = common::spawn_consumer(args.clone());
    common::eventually("the rejected event used its attempts", Duration::from_secs(60), || async {
        state.calls_of(&failing_id) >= 3
    })
    .await;
    let (second, place) = publish_more(&db, &topic, 16, first.len()).await;
    let total = first.len() + second.len();
    let flowing: Vec<&String> = second.iter().filter(|id| place[*id].0 != held).collect();
    assert!(!flowing.is_empty(), "some of the second wave went to the other partition: {place:?} held {held}");
    common::eventually("the other partition flows", Duration::from_secs(30), || async {
        flowing.iter().all(|id| state.calls_of(id) > 0)
    })
    .await;
    let behind = state.behind(&place, held, failing.offset);
    assert!(behind.is_empty(), "nothing behind the record was delivered or skipped: {behind:?}");
    assert_eq!(state.calls_of(&failing_id), 3, "given up on: only the dead-letter produce is retried");
    // The member's report for status names the partition and why it waits.
    let reports = outbox_operator::consumer::report::MemberReports::new(&db);
    common::eventually(
        "the report says the partition waits on its dead-letter topic",
        Duration::from_secs(30),
        || async {
            let fresh = reports.fresh(&group, mongodb::bson::DateTime::now()).await.unwrap();
            fresh.len() == 1
                && fresh[0].waiting.iter().map(|w| (w.partition, w.offset, w.reason.as_str())).eq([(
                    held,
                    failing.offset,
                    "dead_letter",
                )])
        },
    )
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert!(reports.fresh(&group, mongodb::bson::DateTime::now()).await.unwrap().is_empty(), "removed at stop");
    let committed =
        read_group_lag(&common::kafka_bootstrap(), &[], &group, std::slice::from_ref(&topic), Duration::from_secs(10))
            .await
            .unwrap()
            .partitions
            .into_iter()
            .find(|p| p.partition == held)
            .and_then(|p| p.committed);
    assert!(committed.unwrap_or(0) <= failing.offset, "no offset past the record: {committed:?}");

    // The dead-letter topic can be written: the record goes there, the rest follows.
    args.dead_letter_suffix = ".dlq".into();
    let (task, stop) = common::spawn_consumer(args);
    common::eventually("all but the rejected one delivered", Duration::from_secs(60), || async {
        common::processed(&db, &group).await == total as u64 - 1 && lag(&topic, &group).await == 0
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let dlq =
        common::consume_all(&common::kafka_bootstrap(), &format!("{topic}.dlq"), 1, Duration::from_secs(30)).await;
    assert_eq!(dlq.iter().map(|r| r.headers["eventId"].as_str()).collect::<Vec<_>>(), [failing_id.as_str()]);
}

/// A record older than the processed-events retention may have been applied
/// and its mark expired: by default its partition waits (nothing behind it
/// is applied) and the member's report says why; with
/// `--beyond-dedup-horizon apply` it is applied.
#[tokio::test]
async fn a_record_older_than_the_dedup_window_waits_unless_told_to_apply() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-horizon")));
    let bootstrap = common::kafka_bootstrap();
    let (source, ids) = common::publish_sessions(&db, 2, 1, 1).await;
    let records = common::consume_all(&bootstrap, &source, ids.len(), Duration::from_secs(30)).await;
    // The same records on a new topic: the first stamped two hours ago
    // (the tests' retention is one hour), the second now.
    let topic = common::unique("consumer-old");
    common::create_topic(&topic, 1).await;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    for (r, ts) in records.iter().zip([now - 2 * 3600 * 1000, now]) {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header { key: k.as_str(), value: Some(v.as_str()) });
        }
        let record = FutureRecord::to(&topic).key(&r.key).payload(&r.payload).headers(headers).timestamp(ts);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
    let group = common::unique("horizon");
    let mut args = common::consume_args(db.name(), &topic, &group, HandlerKind::Projection);
    args.ordering = EventOrder::Partition;
    let (task, stop) = common::spawn_consumer(args.clone());
    let reports = outbox_operator::consumer::report::MemberReports::new(&db);
    common::eventually("the partition waits beyond the dedup horizon", Duration::from_secs(60), || async {
        let fresh = reports.fresh(&group, mongodb::bson::DateTime::now()).await.unwrap();
        fresh.iter().flat_map(|r| &r.waiting).any(|w| w.reason == "beyond_dedup_horizon" && w.offset == 0)
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(common::processed(&db, &group).await, 0, "neither the old record nor the one behind it applied");

    args.beyond_dedup_horizon = consumer::BeyondHorizon::Apply;
    let (task, stop) = common::spawn_consumer(args);
    common::eventually("both applied when told to", Duration::from_secs(60), || async {
        common::processed(&db, &group).await == 2 && lag(&topic, &group).await == 0
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

/// Once an event of an aggregate is dead-lettered, the aggregate's later
/// events are parked behind it in the dead-letter topic, not applied out of
/// order; a redrive replays them in order and releases the aggregate.
#[tokio::test]
async fn later_events_of_a_dead_lettered_aggregate_are_parked_until_a_redrive() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-parked")));
    let (topic, ids) = common::publish_sessions(&db, 3, 2, 1).await;
    let rows = common::outbox_rows(&db).await;
    let aggregate = rows[1].get_str("aggregateId").unwrap().to_owned();
    let of_aggregate: Vec<String> = rows
        .iter()
        .filter(|r| r.get_str("aggregateId").unwrap() == aggregate)
        .map(|r| r.get_str("_id").unwrap().to_owned())
        .collect();
    assert_eq!(of_aggregate.len(), 2, "created, then refreshed");
    let state = Hook::default();
    *state.fail_event.lock().unwrap() = Some(of_aggregate[0].clone());
    *state.fail_status.lock().unwrap() = Some(422);
    let url = state.serve().await;
    let group = common::unique("parked");
    let args = webhook_args(&db, &topic, &group, url);
    let (task, stop) = common::spawn_consumer(args.clone());
    common::eventually("the other aggregates' events delivered", Duration::from_secs(60), || async {
        common::processed(&db, &group).await == ids.len() as u64 - 2 && lag(&topic, &group).await == 0
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(state.calls_of(&of_aggregate[0]), 3, "the rejected event used its attempts");
    assert_eq!(state.calls_of(&of_aggregate[1]), 0, "the later event of its aggregate is not applied before it");
    let dlq =
        common::consume_all(&common::kafka_bootstrap(), &format!("{topic}.dlq"), 2, Duration::from_secs(30)).await;
    let order: Vec<&str> = dlq.iter().map(|r| r.headers["eventId"].as_str()).collect();
    assert_eq!(order, [of_aggregate[0].as_str(), of_aggregate[1].as_str()], "parked behind it, in order");
    assert!(dlq[1].headers["dlq.error"].starts_with("parked: "), "{:?}", dlq[1].headers);
    let parked = outbox_operator::consumer::parked::ParkedAggregates::new(&db, &group);
    assert_eq!(parked.count().await.unwrap(), 1);

    // Fixed downstream: the redrive applies both, in order, and releases the aggregate.
    *state.fail_event.lock().unwrap() = None;
    let (_keep, rx) = tokio::sync::watch::channel(false);
    let counts = consumer::redrive(&args, &[format!("{topic}.dlq")], rx, None).await.unwrap();
    assert_eq!((counts.records, counts.applied, counts.dead_lettered), (2, 2, 0));
    let calls = state.calls.lock().unwrap().clone();
    let delivered: Vec<&str> =
        calls.iter().filter(|c| of_aggregate.contains(&c.0)).map(|c| c.0.as_str()).skip(3).collect();
    assert_eq!(delivered, [of_aggregate[0].as_str(), of_aggregate[1].as_str()]);
    assert_eq!(parked.count().await.unwrap(), 0, "released");
    assert_eq!(common::processed(&db, &group).await, ids.len() as u64);
}

#[tokio::test]
async fn a_killed_consumer_restarts_without_loss_or_double_effect() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-kill")));
    let (topic, ids) = common::publish_sessions(&db, 300, 2, 2).await;
    let group = common::unique("projection-kill");
    let spawn = || {
        common::Process(
            std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
                .args(["consume", "--handler", "projection", "--group-id", &group, "--topic", &topic])
                .args(["--metrics-listen", "127.0.0.1:0", "--session-timeout-ms", "6000"])
                // Small batches: the kill lands between and inside transactions.
                .args(["--batch-size", "20"])
                .env("MONGODB_URI", common::mongodb_uri())
                .env("MONGODB_DATABASE", db.name())
                .env("KAFKA_BOOTSTRAP", common::kafka_bootstrap())
                .env("SCHEMA_REGISTRY_URL", common::schema_registry_url())
                .env("RUST_LOG", "warn")
                .spawn()
                .expect("start the outbox binary"),
        )
    };
    let mut first = spawn();
    common::eventually("the first consumer processes some", Duration::from_secs(60), || async {
        common::processed(&db, &group).await >= 150
    })
    .await;
    first.kill().unwrap(); // SIGKILL: stored offsets not committed, maybe mid-transaction
    first.wait().unwrap();
    let at_kill = common::processed(&db, &group).await;

    let mut second = spawn();
    common::eventually("the restarted consumer finishes", Duration::from_secs(120), || async {
        common::processed(&db, &group).await == ids.len() as u64 && lag(&topic, &group).await == 0
    })
    .await;
    second.kill().unwrap();
    second.wait().unwrap();
    assert!(at_kill < ids.len() as u64);
    assert_eq!(read_model(&db).await, (300, 300, 300, 300), "every event applied exactly once");
}

#[tokio::test]
async fn two_consumers_share_the_partitions_and_survive_a_rebalance() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-pair")));
    let (topic, ids) = common::publish_sessions(&db, 100, 2, 4).await;
    let group = common::unique("pair");
    let args = common::consume_args(db.name(), &topic, &group, HandlerKind::Projection);
    let (a, stop_a) = common::spawn_consumer(args.clone());
    let (b, stop_b) = common::spawn_consumer(args);
    let members = || {
        let group = group.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                use rdkafka::consumer::{BaseConsumer, Consumer};
                let c: BaseConsumer =
                    ClientConfig::new().set("bootstrap.servers", common::kafka_bootstrap()).create().unwrap();
                let list = c.fetch_group_list(Some(&group), Duration::from_secs(5)).unwrap();
                list.groups().first().map(|g| g.members().len()).unwrap_or(0)
            })
            .await
            .unwrap()
        }
    };
    common::eventually("both consumers joined the group", Duration::from_secs(60), || async { members().await == 2 })
        .await;
    common::eventually("some processed", Duration::from_secs(60), || async {
        common::processed(&db, &group).await > 0
    })
    .await;
    // One leaves: the other takes its partitions over.
    stop_a.send(true).unwrap();
    a.await.unwrap().unwrap();
    common::eventually("everything processed after the rebalance", Duration::from_secs(90), || async {
        common::processed(&db, &group).await == ids.len() as u64 && lag(&topic, &group).await == 0
    })
    .await;
    stop_b.send(true).unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(read_model(&db).await, (100, 100, 100, 100));
}

/// `--processed-retention-seconds` changed between two starts: the TTL
/// index takes the new expiry instead of the consumer failing to start
/// (IndexOptionsConflict, a crash loop).
#[tokio::test]
async fn a_changed_processed_retention_updates_the_ttl_index() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-retention")));
    let store = outbox_operator::processed::ProcessedStore::new(&db, "g");
    store.ensure_indexes(Duration::from_secs(3600)).await.unwrap();
    store.ensure_indexes(Duration::from_secs(7200)).await.expect("a new retention is applied, not refused");
    store.ensure_indexes(Duration::from_secs(7200)).await.unwrap();
    let indexes: Vec<mongodb::IndexModel> =
        db.collection::<Document>("processed_events").list_indexes().await.unwrap().try_collect().await.unwrap();
    let ttl = indexes.iter().find_map(|i| {
        i.options.as_ref().filter(|o| o.name.as_deref() == Some("retention")).and_then(|o| o.expire_after)
    });
    assert_eq!(ttl, Some(Duration::from_secs(7200)));
}

/// Every document of the read model readers read, by id.
async fn read_model_docs(db: &mongodb::Database) -> Vec<Document> {
    let docs: Vec<Document> = db
        .collection::<Document>(consumer::generations::READ_MODEL)
        .find(doc! {})
        .sort(doc! {"_id": 1})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    docs
}

/// A read model rebuilt from the topic, while its live consumer runs and
/// new events arrive, equals one that a second group kept from the start;
/// readers switch to it, the live consumer follows it, and nothing of the
/// live model is copied (its damage is gone).
#[tokio::test]
async fn a_projection_rebuilt_from_the_topic_equals_the_live_one() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-rebuild")));
    let reference = common::TestDb::new(client.database(&common::unique("consume-rebuild-ref")));
    let (topic, ids) = common::publish_sessions(&db, 30, 3, 2).await;
    let group = common::unique("projection");
    let args = common::consume_args(db.name(), &topic, &group, HandlerKind::Projection);
    let (live, stop_live) = common::spawn_consumer(args.clone());
    let ref_group = common::unique("projection-ref");
    let (kept, stop_kept) =
        common::spawn_consumer(common::consume_args(reference.name(), &topic, &ref_group, HandlerKind::Projection));
    common::eventually("both groups applied every event", Duration::from_secs(60), || async {
        common::processed(&db, &group).await == ids.len() as u64
            && common::processed(&reference, &ref_group).await == ids.len() as u64
    })
    .await;
    assert_eq!(read_model_docs(&db).await, read_model_docs(&reference).await);
    // A projection bug damaged the live model: a rebuild replays the topic, it copies nothing.
    db.collection::<Document>("session_projection.g1")
        .update_many(doc! {}, doc! {"$inc": {"refreshes": 1000}})
        .await
        .unwrap();
    assert_ne!(read_model_docs(&db).await, read_model_docs(&reference).await);

    let (stop_rebuild_tx, stop_rebuild) = tokio::sync::watch::channel(false);
    let rebuild_args = args.clone();
    let rebuild = tokio::spawn(async move { consumer::rebuild::rebuild(&rebuild_args, stop_rebuild).await });
    // New events while it rebuilds and hands over.
    let (more, _) = publish_more(&db, &topic, 20, ids.len()).await;
    let total = (ids.len() + more.len()) as u64;
    let summary = tokio::time::timeout(Duration::from_secs(120), rebuild)
        .await
        .expect("the rebuild completes within 120 s")
        .unwrap()
        .expect("rebuild");
    drop(stop_rebuild_tx);
    assert_eq!((summary.generation.number, summary.phase), (2, consumer::generations::Phase::Completed));
    assert!(summary.applied >= ids.len() as u64, "{summary:?}");

    let scope = &summary.generation.scope;
    common::eventually("every event is in the new generation and the reference", Duration::from_secs(60), || async {
        common::processed(&db, scope).await == total
            && common::processed(&reference, &ref_group).await == total
            && lag(&topic, &group).await == 0
    })
    .await;
    assert_eq!(read_model_docs(&db).await, read_model_docs(&reference).await, "rebuilt = kept from the start");
    let state = consumer::generations::Generations::new(&db).state().await.unwrap().unwrap();
    assert_eq!(state.current, summary.generation);
    let members: Vec<Document> = db
        .collection::<Document>("consumer_members")
        .find(doc! {"group": &group})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(
        !members.is_empty() && members.iter().all(|m| m.get_i32("generation") == Ok(2)),
        "the live member follows the new generation: {members:?}"
    );
    for (stop, task) in [(stop_live, live), (stop_kept, kept)] {
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
    }
}

/// A record the projection cannot read stops the rebuild before any
/// switch: readers keep the current generation, status says why and where.
#[tokio::test]
async fn a_rebuild_that_meets_an_unreadable_record_fails_and_switches_nothing() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-rebuild-poison")));
    let (topic, ids) = common::publish_sessions(&db, 5, 1, 1).await;
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", common::kafka_bootstrap()).create().unwrap();
    let poison = FutureRecord::to(&topic).key("s-poison").payload("not avro");
    producer.send(poison, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    let group = common::unique("projection");
    let args = common::consume_args(db.name(), &topic, &group, HandlerKind::Projection);
    let (live, stop_live) = common::spawn_consumer(args.clone());
    common::eventually("the live group applied every event", Duration::from_secs(60), || async {
        common::processed(&db, &group).await == ids.len() as u64
    })
    .await;
    let before = read_model_docs(&db).await;
    let (_keep, no_stop) = tokio::sync::watch::channel(false);
    let err = consumer::rebuild::rebuild(&args, no_stop).await.expect_err("the rebuild fails");
    assert!(err.to_string().contains(&format!("{topic}/0 at offset 5")), "{err}");
    let state = consumer::generations::Generations::new(&db).state().await.unwrap().unwrap();
    assert_eq!(state.current.number, 1, "nothing switched");
    let rebuild = state.rebuild.unwrap();
    assert_eq!(rebuild.phase, consumer::generations::Phase::Failed);
    assert!(rebuild.error.unwrap().contains("cannot be read"));
    assert_eq!(read_model_docs(&db).await, before, "readers still read the live model");
    stop_live.send(true).unwrap();
    live.await.unwrap().unwrap();
}

/// A rebuild killed midway (its task dropped, as a SIGKILLed Job pod)
/// resumes from its saved positions when started again; what it applied
/// twice is skipped by its marks, so the model equals the live one.
#[tokio::test]
async fn a_rebuild_killed_midway_resumes_and_applies_each_event_once() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("consume-rebuild-resume")));
    let (topic, ids) = common::publish_sessions(&db, 500, 3, 2).await;
    let group = common::unique("projection");
    let args = common::consume_args(db.name(), &topic, &group, HandlerKind::Projection);
    let (live, stop_live) = common::spawn_consumer(args.clone());
    common::eventually("the live group applied every event", Duration::from_secs(60), || async {
        common::processed(&db, &group).await == ids.len() as u64
    })
    .await;
    let live_model = read_model_docs(&db).await;
    let generations = consumer::generations::Generations::new(&db);
    let mut slow = args.clone();
    slow.batch_size = 1;
    let (_keep, no_stop) = tokio::sync::watch::channel(false);
    let first = tokio::spawn({
        let slow = slow.clone();
        async move { consumer::rebuild::rebuild(&slow, no_stop).await }
    });
    common::eventually("the rebuild saved some progress", Duration::from_secs(60), || async {
        generations.state().await.unwrap().and_then(|s| s.rebuild).is_some_and(|r| {
            let (done, total) = r.progress();
            done > 0 && done < total
        })
    })
    .await;
    first.abort();
    let _ = first.await;
    let (_keep2, no_stop) = tokio::sync::watch::channel(false);
    let summary = consumer::rebuild::rebuild(&args, no_stop).await.expect("the resumed rebuild");
    assert_eq!((summary.generation.number, summary.phase), (2, consumer::generations::Phase::Completed));
    assert!(summary.applied < ids.len() as u64, "it resumed rather than starting over: {summary:?}");
    assert_eq!(common::processed(&db, &summary.generation.scope).await, ids.len() as u64);
    assert_eq!(read_model_docs(&db).await, live_model, "each event applied once");
    stop_live.send(true).unwrap();
    live.await.unwrap().unwrap();
}
