//! The webhook handler's requests as receivers written by others read
//! them: PyPI's `cloudevents` SDK parses each request (binary and
//! structured content modes) and PyPI's `standardwebhooks` verifies its
//! signature (`tests/python/webhook_receiver.py`); an answer's
//! `Retry-After` is honoured; with many deliveries in flight, random
//! delays, 503s and a SIGKILL, each aggregate's events are applied in
//! order and none is skipped.

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    time::Duration,
};

use common::{Process, unique};
use outbox_operator::consumer::{HandlerKind, webhook::ContentMode};
use serde_json::Value;

/// A Standard Webhooks secret (the base64 of 24 bytes).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The Python receiver, and the file it writes each request to.
struct Receiver {
    _process: Process,
    url: String,
    requests: PathBuf,
}

/// Start a receiver verifying signatures with `secret`, with the flags of
/// `webhook_receiver.py` (`--retry-after`, `--delay-max-ms`, `--fail-percent`, `--fail-every`).
fn start_receiver(secret: &str, flags: &[&str]) -> Receiver {
    let requests = std::env::temp_dir().join(format!("{}.jsonl", unique("webhook")));
    let mut args = vec![requests.to_str().unwrap(), secret];
    args.extend(flags);
    let (process, port) = common::python_server("webhook_receiver.py", &args, "cloudevents and standardwebhooks");
    Receiver { _process: process, url: format!("http://127.0.0.1:{port}/events"), requests }
}

impl Receiver {
    /// Every request received so far, as the receiver read it.
    fn requests(&self) -> Vec<Value> {
        common::read_jsonl(&self.requests)
    }

    async fn wait_for(&self, what: &str, count: usize) -> Vec<Value> {
        common::eventually(what, Duration::from_secs(60), || async { self.requests().len() >= count }).await;
        self.requests()
    }
}

/// Consume `topic` with the webhook handler posting to `receiver`.
fn consumer(
    db: &mongodb::Database,
    topic: &str,
    receiver: &Receiver,
    mode: ContentMode,
) -> outbox_operator::consumer::ConsumeArgs {
    let mut args = common::consume_args(db.name(), topic, &unique("hook"), HandlerKind::Webhook);
    args.webhook_url = Some(receiver.url.clone());
    args.webhook_content_mode = mode;
    args.webhook_signing_secret = Some(SECRET.into());
    args.webhook_bearer_token = Some("t0ken".into());
    args
}

/// Every event of `ids` was requested exactly once; aggregates are
/// delivered at once, so in any order.
fn assert_each_once(requests: &[Value], ids: &[String]) {
    let mut delivered: Vec<&str> = requests.iter().map(|r| r["id"].as_str().unwrap()).collect();
    delivered.sort();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(delivered, expected, "each once");
}

/// The time of a CloudEvent as epoch milliseconds.
fn millis(time: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(time.as_str().expect("a time")).expect("RFC 3339").timestamp_millis()
}

#[tokio::test]
async fn binary_mode_cloudevents_are_read_by_the_cloudevents_sdk_and_verified_by_standard_webhooks() {
    let db = common::TestDb::new(common::mongo().await.database(&unique("hook-binary")));
    let (topic, ids) = common::publish_sessions(&db, 3, 1, 1).await;
    let receiver = start_receiver(SECRET, &[]);
    let (task, stop) = common::spawn_consumer(consumer(&db, &topic, &receiver, ContentMode::Binary));
    let requests = receiver.wait_for("the three events delivered", 3).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    assert_each_once(&requests, &ids);
    for r in &requests {
        let data = &r["data"];
        assert_eq!(r["verified"], true, "the signature verifies: {r}");
        assert_eq!(r["content_type"], "application/json");
        assert_eq!(r["specversion"], "1.0");
        assert_eq!(data["eventId"], r["id"], "the body is the event's JSON: {r}");
        let kind = format!("Session.{}.v{}", data["eventName"].as_str().unwrap(), data["eventVersion"]);
        assert_eq!(r["type"], kind.as_str());
        assert_eq!(r["source"], "/aggregates/Session");
        assert_eq!(r["subject"], data["aggregateId"]);
        assert_eq!(r["partitionkey"], data["aggregateId"]);
        assert_eq!(millis(&r["time"]), data["occurredOn"].as_i64().unwrap(), "time = occurredOn");
        assert_eq!(r["idempotency_key"], r["id"]);
        assert_eq!(r["authorization"], "Bearer t0ken");
    }
}

#[tokio::test]
async fn structured_mode_is_one_cloudevents_document_and_a_wrong_secret_does_not_verify() {
    let db = common::TestDb::new(common::mongo().await.database(&unique("hook-structured")));
    let (topic, ids) = common::publish_sessions(&db, 2, 1, 1).await;
    // The receiver holds another secret: the signature must not verify
    // (the receiver checks it for real).
    let receiver = start_receiver("whsec_c2VjcmV0LW9mLXNvbWVib2R5LWVsc2U=", &[]);
    let (task, stop) = common::spawn_consumer(consumer(&db, &topic, &receiver, ContentMode::Structured));
    let requests = receiver.wait_for("the two events delivered", 2).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    assert_each_once(&requests, &ids);
    for r in &requests {
        assert_eq!(r["content_type"], "application/cloudevents+json");
        assert_eq!(r["data"]["eventId"], r["id"], "data is the event's JSON: {r}");
        assert_eq!(r["subject"], r["data"]["aggregateId"]);
        assert_eq!(r["verified"], false, "signed with another secret: {r}");
    }
}

#[tokio::test]
async fn a_retry_after_answer_is_honoured_before_the_next_try() {
    let db = common::TestDb::new(common::mongo().await.database(&unique("hook-retry-after")));
    let (topic, ids) = common::publish_sessions(&db, 1, 1, 1).await;
    // The consumer's own backoff is 50-200 ms; the receiver asks for 2 s.
    let receiver = start_receiver(SECRET, &["--retry-after", "2"]);
    let (task, stop) = common::spawn_consumer(consumer(&db, &topic, &receiver, ContentMode::Binary));
    let requests = receiver.wait_for("the event tried twice", 2).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    assert_eq!(
        (requests[0]["id"].as_str(), requests[1]["id"].as_str()),
        (Some(ids[0].as_str()), Some(ids[0].as_str()))
    );
    assert_eq!((requests[0]["status"].as_u64(), requests[1]["status"].as_u64()), (Some(429), Some(200)));
    let waited = requests[1]["arrived"].as_f64().unwrap() - requests[0]["arrived"].as_f64().unwrap();
    assert!(waited >= 1.9, "tried again after {waited:.2}s, not after the 2 s asked for");
}

/// Check the receiver's answers against each aggregate's order: in the
/// order of the answers, an event never arrives before its predecessor was
/// answered 200 or sits before it in the same batch (so every event of an
/// aggregate is first applied in order), and every event got a 200.
/// Returns how many events got more than one 200 (redeliveries, which a
/// receiver deduplicates by `ce-id`).
fn check_in_order(requests: &[Value], order: &BTreeMap<String, Vec<String>>) -> usize {
    let place: HashMap<&str, (&str, usize)> = order
        .iter()
        .flat_map(|(aggregate, ids)| ids.iter().enumerate().map(move |(i, id)| (id.as_str(), (aggregate.as_str(), i))))
        .collect();
    // Per aggregate: the number of its events answered 200 so far, in order.
    let mut applied: HashMap<&str, usize> = HashMap::new();
    let mut oks: HashMap<&str, usize> = HashMap::new();
    // The events of one request are consecutive lines with its key and arrival.
    let same_request =
        |a: &Value, b: &Value| a["idempotency_key"] == b["idempotency_key"] && a["arrived"] == b["arrived"];
    for request in requests.chunk_by(same_request) {
        let mut ahead: HashMap<&str, usize> = HashMap::new();
        for r in request {
            let id = r["id"].as_str().expect("ce-id");
            if r["batch"] == 1 {
                assert_eq!(r["idempotency_key"].as_str(), Some(id), "Idempotency-Key is the ce-id: {r}");
            }
            let (aggregate, index) = *place.get(id).unwrap_or_else(|| panic!("a request for an unknown event: {r}"));
            let done = applied.get(aggregate).copied().unwrap_or(0);
            let before = ahead.entry(aggregate).or_insert(done);
            assert!(
                index <= *before,
                "event {index} of aggregate {aggregate} was sent before event {before} was applied: {r}"
            );
            *before = (*before).max(index + 1);
            if r["status"] == 200 {
                *oks.entry(id).or_default() += 1;
                let done = applied.entry(aggregate).or_default();
                if index == *done {
                    *done += 1;
                }
            }
        }
    }
    for (aggregate, ids) in order {
        assert_eq!(applied.get(aggregate.as_str()), Some(&ids.len()), "every event of {aggregate} applied");
    }
    oks.values().filter(|n| **n > 1).count()
}

/// Run a consumer with `args` until `receiver` has answered 200 for
/// `count` events; every request it received.
async fn deliver_all(args: outbox_operator::consumer::ConsumeArgs, receiver: &Receiver, count: usize) -> Vec<Value> {
    let (task, stop) = common::spawn_consumer(args);
    common::eventually("every event applied by the receiver", Duration::from_secs(180), || async {
        applied(&receiver.requests()).len() == count
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    receiver.requests()
}

/// The receiver's 200s, by event.
fn applied(requests: &[Value]) -> HashSet<String> {
    requests.iter().filter(|r| r["status"] == 200).map(|r| r["id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn many_aggregates_in_flight_each_delivered_in_order_through_random_delays_and_503s() {
    let db = common::TestDb::new(common::mongo().await.database(&unique("hook-key-order")));
    let (topic, ids) = common::publish_sessions(&db, 1000, 3, 4).await;
    let order = common::aggregate_order(&topic, ids.len()).await;
    assert_eq!(order.len(), 1000);
    let receiver = start_receiver(SECRET, &["--delay-max-ms", "20", "--fail-percent", "5"]);
    let mut args = consumer(&db, &topic, &receiver, ContentMode::Binary);
    args.max_in_flight = 64;
    let requests = deliver_all(args, &receiver, ids.len()).await;
    let redelivered = check_in_order(&requests, &order);
    assert_eq!(redelivered, 0, "without a crash, nothing applied twice");
    let refused = requests.iter().filter(|r| r["status"] == 503).count();
    let peak = requests.iter().filter_map(|r| r["in_flight"].as_u64()).max().unwrap();
    assert!(refused > 0, "some deliveries were answered 503 and tried again");
    assert!(peak >= 16, "many requests in flight at once: the peak was {peak}");
    eprintln!("{} requests for {} events, {refused} answered 503, peak in flight {peak}", requests.len(), ids.len());
}

#[tokio::test]
async fn a_consumer_killed_mid_delivery_skips_nothing_and_redelivers_with_the_same_ce_id() {
    let db = common::TestDb::new(common::mongo().await.database(&unique("hook-kill")));
    let (topic, ids) = common::publish_sessions(&db, 300, 3, 2).await;
    let order = common::aggregate_order(&topic, ids.len()).await;
    let receiver = start_receiver(SECRET, &["--delay-max-ms", "20"]);
    let group = unique("hook-kill");
    let spawn = || {
        #[rustfmt::skip]
        let flags = [
            "consume", "--handler", "webhook", "--webhook-url", &receiver.url, "--group-id", &group,
            "--topic", &topic, "--max-in-flight", "32", "--batch-size", "50",
            "--metrics-listen", "127.0.0.1:0", "--session-timeout-ms", "6000",
        ];
        common::outbox_command(&db).args(flags).env("RUST_LOG", "warn").spawn().expect("start the outbox binary")
    };
    let mut first = spawn();
    common::eventually("the first consumer delivers some", Duration::from_secs(60), || async {
        applied(&receiver.requests()).len() >= ids.len() / 3
    })
    .await;
    first.kill().unwrap(); // SIGKILL: deliveries in flight, marks and offsets not written
    first.wait().unwrap();
    let at_kill = applied(&receiver.requests()).len();
    assert!(at_kill < ids.len(), "killed mid-run");

    let mut second = spawn();
    common::eventually("the restarted consumer delivers the rest", Duration::from_secs(120), || async {
        applied(&receiver.requests()).len() == ids.len()
    })
    .await;
    second.kill().unwrap();
    second.wait().unwrap();
    let requests = receiver.requests();
    let redelivered = check_in_order(&requests, &order);
    eprintln!("{at_kill} of {} applied at the kill; {redelivered} redelivered after it", ids.len());
    // Marks are written once per round (at most a batch): only the round
    // in flight at the kill is delivered again, the rest is found processed.
    assert!(redelivered <= 50, "{redelivered} redelivered: more than the round in flight");
}

#[tokio::test]
async fn batch_mode_sends_many_events_per_signed_request_each_aggregate_in_order() {
    let db = common::TestDb::new(common::mongo().await.database(&unique("hook-batch")));
    let (topic, ids) = common::publish_sessions(&db, 200, 3, 2).await;
    let order = common::aggregate_order(&topic, ids.len()).await;
    let receiver = start_receiver(SECRET, &["--delay-max-ms", "10", "--fail-every", "4"]);
    let mut args = consumer(&db, &topic, &receiver, ContentMode::Batch);
    args.webhook_batch_max = 50;
    let requests = deliver_all(args, &receiver, ids.len()).await;
    assert_eq!(check_in_order(&requests, &order), 0, "without a crash, nothing applied twice");
    for r in &requests {
        assert_eq!(r["content_type"], "application/cloudevents-batch+json");
        assert_eq!(r["verified"], true, "the batch's signature verifies: {r}");
        assert_eq!(r["data"]["eventId"], r["id"], "each document's data is the event's JSON: {r}");
    }
    let sent: HashSet<&str> = requests.iter().map(|r| r["idempotency_key"].as_str().unwrap()).collect();
    let largest = requests.iter().filter_map(|r| r["batch"].as_u64()).max().unwrap();
    assert!(largest > 1 && largest <= 50, "requests carry many events, at most 50: the largest held {largest}");
    assert!(sent.len() < ids.len() / 2, "{} requests for {} events", sent.len(), ids.len());
    assert!(requests.iter().any(|r| r["status"] == 503), "some requests were refused and sent again");
}
