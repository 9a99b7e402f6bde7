//! Benchmark: events/s that the consumer loop (`consumer::run_until`)
//! delivers with the webhook handler to a receiver that answers at once,
//! and one that answers after 5 ms: one delivery at a time
//! (`--max-in-flight 1`), the default 16 lanes, 64 lanes, and the batch
//! content mode; against the `log` handler on the same topic in the same run (the
//! loop and its processed-events bookkeeping without HTTP: the baseline).
//!
//! Needs MongoDB, the broker and the registry of the stack; run with
//! `make bench-webhook`. Prints a table and writes it to
//! `$CARGO_TARGET_DIR/bench/webhook_delivery.md` (figure beside it).

mod report;
mod session_events;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::HeaderMap, routing::post};
use outbox_operator::{consumer, processed::ProcessedStore};
use report::{Figure, Panel};

const EVENTS: usize = 10_000;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run `make bench-webhook`"))
}

/// The event ids a receiver has answered 2xx for.
#[derive(Clone)]
struct Receiver {
    delay: Duration,
    seen: Arc<Mutex<HashSet<String>>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: axum::body::Bytes) -> axum::http::StatusCode {
    if !r.delay.is_zero() {
        tokio::time::sleep(r.delay).await;
    }
    let batch = headers.get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"application/cloudevents-batch"));
    let ids: Vec<String> = if batch {
        let docs: Vec<serde_json::Value> = serde_json::from_slice(&body).expect("a batch");
        docs.iter().map(|d| d["id"].as_str().unwrap_or_default().to_owned()).collect()
    } else {
        vec![headers.get("ce-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()]
    };
    r.seen.lock().unwrap().extend(ids);
    axum::http::StatusCode::NO_CONTENT
}

/// Serve a receiver answering after `delay`; its URL and the ids it saw.
async fn serve(delay: Duration) -> (String, Arc<Mutex<HashSet<String>>>) {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let app = Router::new().route("/events", post(receive)).with_state(Receiver { delay, seen: seen.clone() });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// Run the consumer loop with `handler` (and `extra` flags) on `topic` as a
/// fresh group until `done` says every event went through: the time from
/// the first event through (group join excluded) to the last.
async fn run<F, Fut>(topic: &str, db: &mongodb::Database, group: &str, handler_flags: &[&str], done: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let (uri, bootstrap, registry) = (env("MONGODB_URI"), env("KAFKA_BOOTSTRAP"), env("SCHEMA_REGISTRY_URL"));
    #[rustfmt::skip]
    let mut flags = vec![
        "--mongodb-uri", &uri, "--database", db.name(), "--kafka-bootstrap", &bootstrap,
        "--schema-registry-url", &registry, "--topic", topic, "--group-id", group,
        "--batch-size", "500", "--metrics-listen", "127.0.0.1:0",
    ];
    flags.extend_from_slice(handler_flags);
    let args = outbox_operator::cli::args_from(&flags).expect("consumer flags");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut task = tokio::spawn(consumer::run_until(args, stop_rx));
    let mut start = None;
    loop {
        if task.is_finished() {
            panic!("the consumer stopped early: {:?}", (&mut task).await);
        }
        let n = done().await;
        if n > 0 {
            start.get_or_insert_with(Instant::now);
        }
        if n >= EVENTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.unwrap().elapsed();
    stop_tx.send(true).unwrap();
    task.await.unwrap().unwrap();
    elapsed
}

#[tokio::main]
async fn main() {
    outbox_operator::telemetry::install_crypto_provider();
    let (bootstrap, registry) = (env("KAFKA_BOOTSTRAP"), env("SCHEMA_REGISTRY_URL"));
    let client = mongodb::Client::with_uri_str(env("MONGODB_URI")).await.unwrap();
    let db = client.database(&format!("bench-webhook-{}", std::process::id()));
    let topic = format!("bench-webhook-{}", std::process::id());
    session_events::produce(&bootstrap, &registry, &topic, EVENTS).await;

    let mut rows: Vec<(String, Duration)> = Vec::new();
    let group = format!("{topic}-log");
    let store = ProcessedStore::new(&db, &group);
    let log = run(&topic, &db, &group, &["--handler", "log"], || async { store.count().await.unwrap() as usize }).await;
    rows.push(("log handler (baseline: the loop and its bookkeeping, no HTTP)".into(), log));
    let ways: [(&str, &[&str]); 4] = [
        ("one at a time (--max-in-flight 1)", &["--max-in-flight", "1"]),
        ("16 aggregates in flight (default)", &[]),
        ("64 aggregates in flight", &["--max-in-flight", "64"]),
        ("batch mode, 100 per request, 16 in flight", &["--webhook-content-mode", "batch"]),
    ];
    for delay_ms in [0, 5] {
        for (way, extra) in ways {
            let (url, seen) = serve(Duration::from_millis(delay_ms)).await;
            let group = format!("{topic}-webhook-{delay_ms}-{}", rows.len());
            let mut flags = vec!["--handler", "webhook", "--webhook-url", url.as_str()];
            flags.extend_from_slice(extra);
            let took = run(&topic, &db, &group, &flags, || async { seen.lock().unwrap().len() }).await;
            rows.push((format!("webhook, receiver answers after {delay_ms} ms: {way}"), took));
        }
    }
    db.drop().await.unwrap();

    let rate = |d: &Duration| EVENTS as f64 / d.as_secs_f64();
    let mut table = format!(
        "## Webhook delivery, {EVENTS} events, one consumer\n\n\
         | handler | seconds | events/s | of baseline |\n|---|---:|---:|---:|\n"
    );
    for (name, took) in &rows {
        table += &format!(
            "| {name} | {:.2} | {:.0} | {:.0}% |\n",
            took.as_secs_f64(),
            rate(took),
            100.0 * rate(took) / rate(&rows[0].1)
        );
    }
    let figure = Figure {
        title: format!("Webhook delivery, {EVENTS} events"),
        panels: vec![Panel::Bars {
            title: "throughput".into(),
            unit: "events/s".into(),
            groups: rows.iter().map(|(n, d)| (n.clone(), vec![("events/s".into(), rate(d))])).collect(),
        }],
    };
    report::write("webhook_delivery", &table, &figure);
}
