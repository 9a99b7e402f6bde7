//! The webhook handler's requests as receivers written by others read
//! them: PyPI's `cloudevents` SDK parses each request (binary and
//! structured content modes) and PyPI's `standardwebhooks` verifies its
//! signature (`tests/python/webhook_receiver.py`); an answer's
//! `Retry-After` is honoured.

mod common;

use std::{path::PathBuf, time::Duration};

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

/// Start a receiver verifying signatures with `secret`; with
/// `retry_after`, it answers each event's first request 429 with that
/// Retry-After (seconds).
fn start_receiver(secret: &str, retry_after: Option<u64>) -> Receiver {
    let requests = std::env::temp_dir().join(format!("{}.jsonl", unique("webhook")));
    let retry_after = retry_after.map(|s| s.to_string());
    let mut args = vec![requests.to_str().unwrap(), secret];
    args.extend(retry_after.as_deref());
    let (process, port) = common::python_server("webhook_receiver.py", &args, "cloudevents and standardwebhooks");
    Receiver { _process: process, url: format!("http://127.0.0.1:{port}/events"), requests }
}

impl Receiver {
    /// Every request received so far, as the receiver read it.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.requests)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a request as JSON"))
            .collect()
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

/// The time of a CloudEvent as epoch milliseconds.
fn millis(time: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(time.as_str().expect("a time")).expect("RFC 3339").timestamp_millis()
}

#[tokio::test]
async fn binary_mode_cloudevents_are_read_by_the_cloudevents_sdk_and_verified_by_standard_webhooks() {
    let db = common::mongo().await.database(&unique("hook-binary"));
    let (topic, ids) = common::publish_sessions(&db, 3, 1, 1).await;
    let receiver = start_receiver(SECRET, None);
    let (task, stop) = common::spawn_consumer(consumer(&db, &topic, &receiver, ContentMode::Binary));
    let requests = receiver.wait_for("the three events delivered", 3).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    let delivered: Vec<&str> = requests.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(delivered, ids.iter().map(String::as_str).collect::<Vec<_>>(), "each once, in order");
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
    db.drop().await.unwrap();
}

#[tokio::test]
async fn structured_mode_is_one_cloudevents_document_and_a_wrong_secret_does_not_verify() {
    let db = common::mongo().await.database(&unique("hook-structured"));
    let (topic, ids) = common::publish_sessions(&db, 2, 1, 1).await;
    // The receiver holds another secret: the signature must not verify
    // (the receiver checks it for real).
    let receiver = start_receiver("whsec_c2VjcmV0LW9mLXNvbWVib2R5LWVsc2U=", None);
    let (task, stop) = common::spawn_consumer(consumer(&db, &topic, &receiver, ContentMode::Structured));
    let requests = receiver.wait_for("the two events delivered", 2).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    for (r, id) in requests.iter().zip(&ids) {
        assert_eq!(r["content_type"], "application/cloudevents+json");
        assert_eq!(r["id"], id.as_str());
        assert_eq!(r["data"]["eventId"], id.as_str(), "data is the event's JSON: {r}");
        assert_eq!(r["subject"], r["data"]["aggregateId"]);
        assert_eq!(r["verified"], false, "signed with another secret: {r}");
    }
    db.drop().await.unwrap();
}

#[tokio::test]
async fn a_retry_after_answer_is_honoured_before_the_next_try() {
    let db = common::mongo().await.database(&unique("hook-retry-after"));
    let (topic, ids) = common::publish_sessions(&db, 1, 1, 1).await;
    // The consumer's own backoff is 50-200 ms; the receiver asks for 2 s.
    let receiver = start_receiver(SECRET, Some(2));
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
    db.drop().await.unwrap();
}
