//! Benchmark: events/s through the consumer loop (`consumer::run_until`)
//! with the projection handler and deduplication (processed marks and
//! read-model updates in one MongoDB transaction per batch) against a no-op
//! handler with no deduplication, both decoding every record through the
//! registry, in one run on the same topic of 100k events; and the
//! one-transaction-per-event path of the first release on its first 5k
//! events, for comparison; then the produce -> applied latency through the
//! consumer loop at 1k events/s.
//!
//! Needs MongoDB, the broker and the registry of the stack; run with
//! `make bench-consumer`. Prints a table and writes it to
//! `$CARGO_TARGET_DIR/bench/consumer_throughput.md`, with its figures drawn in `consumer_throughput.svg` beside it.

mod report;
mod session_events;

use std::time::{Duration, Instant};

use futures::TryStreamExt;

use outbox_operator::{
    consumer::{
        self, ConsumeArgs,
        decode::{Decoder, Readers, RecordMeta},
        handlers::{Applied, Handler},
    },
    kafka::producer_config,
    processed::ProcessedStore,
};
use rdkafka::{
    ClientConfig, Message,
    consumer::{Consumer, StreamConsumer},
    util::Timeout,
};
use session_events::{encode, produce, record};

const EVENTS: usize = 100_000;
/// Events the per-event path handles (it is slow: a sample is enough).
const PER_EVENT: usize = 5_000;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run `make bench-consumer`"))
}

/// Consume the first `n` events with a fresh group; `apply` handles each
/// decoded event, one at a time.
async fn run(
    bootstrap: &str,
    registry: &str,
    topic: &str,
    n: usize,
    handler: Option<(&Handler, &ProcessedStore)>,
) -> (Duration, u64) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bench-{}-{}", topic, handler.is_some()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.offset.store", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let decoder = Decoder::new(registry, Readers::sample());
    let mut start = None;
    let mut applied = 0;
    for _ in 0..n {
        let m = consumer.recv().await.unwrap();
        start.get_or_insert_with(Instant::now); // from the first record: group join excluded
        let event = decoder.decode(m.payload().unwrap(), &RecordMeta::of(&m)).await.unwrap();
        if let Some((h, store)) = handler
            && h.apply(&event, store).await.unwrap() == Applied::Applied
        {
            applied += 1;
        }
        consumer.store_offset_from_message(&m).unwrap();
    }
    (start.unwrap().elapsed(), applied)
}

const BATCH: &str = "500";

/// Drop the read model, its generations and their record, so that the
/// next run (another group) lays it out afresh.
async fn reset_read_model(db: &mongodb::Database) {
    for name in ["session_projection", "session_projection.g1", "projection_generations"] {
        db.collection::<mongodb::bson::Document>(name).drop().await.unwrap();
    }
}

/// The consumer loop's settings: the projection in `db`, batches of
/// `BATCH`, on `topic` as `group`, with `extra` flags; `stack` is the
/// MongoDB URI, the bootstrap servers and the registry URL.
fn projection_args(stack: [&str; 3], db: &mongodb::Database, topic: &str, group: &str, extra: &[&str]) -> ConsumeArgs {
    let [uri, bootstrap, registry] = stack;
    #[rustfmt::skip]
    let mut flags = vec![
        "--mongodb-uri", uri, "--database", db.name(), "--kafka-bootstrap", bootstrap,
        "--schema-registry-url", registry, "--topic", topic, "--group-id", group,
        "--handler", "projection", "--batch-size", BATCH, "--metrics-listen", "127.0.0.1:0",
    ];
    flags.extend_from_slice(extra);
    outbox_operator::cli::args_from(&flags).expect("consumer flags")
}

/// The consumer loop with the projection over every event: time from its
/// first applied event (group join excluded) to the last; the read model
/// counts each session created exactly once.
async fn consumer_loop(uri: &str, bootstrap: &str, registry: &str, topic: &str, db: &mongodb::Database) -> Duration {
    let group = format!("bench-loop-{}", std::process::id());
    let args = projection_args([uri, bootstrap, registry], db, topic, &group, &[]);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut task = tokio::spawn(consumer::run_until(args, stop_rx));
    let marks = db.collection::<mongodb::bson::Document>("processed_events");
    let mut start = None;
    loop {
        if task.is_finished() {
            panic!("the consumer stopped early: {:?}", (&mut task).await);
        }
        let n = marks.estimated_document_count().await.unwrap();
        if n > 0 {
            start.get_or_insert_with(Instant::now);
        }
        if n as usize >= EVENTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.unwrap().elapsed();
    stop_tx.send(true).unwrap();
    task.await.unwrap().unwrap();
    let created: Vec<mongodb::bson::Document> = db
        .collection::<mongodb::bson::Document>("session_projection")
        .aggregate([mongodb::bson::doc! {"$group": {"_id": null, "n": {"$sum": "$sessionsCreated"}}}])
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let created = created.first().and_then(|d| d.get_i32("n").ok()).unwrap_or(0);
    assert_eq!(created as usize, EVENTS / 2, "every session created counted once in the read model");
    reset_read_model(db).await;
    marks.delete_many(mongodb::bson::doc! {}).await.unwrap();
    elapsed
}

/// Events per second and seconds of the latency part.
const LATENCY_RATE: usize = 1000;
const LATENCY_SECONDS: usize = 10;

/// Produce -> applied latency at a steady `LATENCY_RATE` events/s: events
/// produced one by one on a schedule to a fresh topic that a running
/// consumer loop (projection, batches up to 500, linger 0) consumes. An
/// event counts as applied when the insert of its processed mark reaches a
/// change stream on the store: committed with the projection's writes, and
/// visible. Both instants are taken in this process. Milliseconds, sorted,
/// in total and split where the time goes: produce -> the processed mark
/// made (its `processedAt`: Kafka delivery, fetch, decode, the dedup
/// query), mark -> committed (the change's `wallTime`: the transaction's
/// writes and commit), committed -> seen by the change stream.
async fn latency(uri: &str, bootstrap: &str, registry: &str, db: &mongodb::Database, fetch_wait_ms: u32) -> Latency {
    let topic = format!("bench-latency-{}-{fetch_wait_ms}", std::process::id());
    let n = LATENCY_RATE * LATENCY_SECONDS;
    let events = encode(registry, &topic, n + 2).await;
    let producer = outbox_operator::kafka::create_producer(&producer_config(bootstrap, &[]).unwrap()).unwrap();
    // Two warm-up events create the topic and see the group joined.
    for e in &events[..2] {
        producer.send(record(&topic, e), Timeout::Never).await.map_err(|(e, _)| e).unwrap();
    }
    let marks = db.collection::<mongodb::bson::Document>("processed_events");
    marks.delete_many(mongodb::bson::doc! {}).await.unwrap();
    reset_read_model(db).await;
    let group = format!("bench-latency-{}-{fetch_wait_ms}", std::process::id());
    let fetch_wait = format!("fetch.wait.max.ms={fetch_wait_ms}");
    let args = projection_args([uri, bootstrap, registry], db, &topic, &group, &["--consumer-config", &fetch_wait]);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(consumer::run_until(args, stop_rx));
    while marks.count_documents(mongodb::bson::doc! {}).await.unwrap() < 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stream = marks.watch().await.unwrap();
    let events = std::sync::Arc::new(events);
    let sender = {
        let (events, topic) = (events.clone(), topic.clone());
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut sent = std::collections::HashMap::with_capacity(n);
            let mut acks = Vec::with_capacity(n);
            for (i, e) in events[2..].iter().enumerate() {
                tokio::time::sleep_until(start + Duration::from_micros((i * 1_000_000 / LATENCY_RATE) as u64)).await;
                sent.insert(e.id.clone(), (Instant::now(), now_ms()));
                acks.push(producer.send_result(record(&topic, e)).map_err(|(e, _)| e).unwrap());
            }
            for a in acks {
                a.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
            sent
        })
    };
    let mut applied = std::collections::HashMap::with_capacity(n);
    let prefix = format!("{group}/");
    while applied.len() < n {
        let change = tokio::time::timeout(Duration::from_secs(60), stream.try_next())
            .await
            .expect("marks keep coming")
            .unwrap()
            .expect("the change stream goes on");
        let seen = (Instant::now(), now_ms());
        let id = change.document_key.as_ref().and_then(|k| k.get_str("_id").ok()).unwrap_or_default();
        let marked = change.full_document.as_ref().and_then(|d| d.get_datetime("processedAt").ok());
        let committed = change.wall_time;
        if let (Some(event), Some(marked), Some(committed)) = (id.strip_prefix(&prefix), marked, committed) {
            applied.insert(event.to_owned(), (seen, marked.timestamp_millis(), committed.timestamp_millis()));
        }
    }
    let sent = sender.await.unwrap();
    stop_tx.send(true).unwrap();
    task.await.unwrap().unwrap();
    let mut l = Latency::default();
    for (id, (sent_at, sent_ms)) in &sent {
        let Some(((seen_at, seen_ms), marked, committed)) = applied.get(id) else { continue };
        l.total.push(seen_at.duration_since(*sent_at).as_secs_f64() * 1000.0);
        l.to_handler.push((marked - sent_ms) as f64);
        l.commit.push((committed - marked) as f64);
        l.observe.push((seen_ms - committed) as f64);
    }
    assert_eq!(l.total.len(), n, "every event applied");
    for v in [&mut l.total, &mut l.to_handler, &mut l.commit, &mut l.observe] {
        v.sort_by(f64::total_cmp);
    }
    l
}

/// Latencies of one run, milliseconds, each sorted (see `latency`).
#[derive(Default)]
struct Latency {
    total: Vec<f64>,
    to_handler: Vec<f64>,
    commit: Vec<f64>,
    observe: Vec<f64>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::main]
async fn main() {
    outbox_operator::telemetry::install_crypto_provider();
    outbox_operator::telemetry::init_logging(outbox_operator::telemetry::LogFormat::Text);
    let (uri, bootstrap, registry) = (env("MONGODB_URI"), env("KAFKA_BOOTSTRAP"), env("SCHEMA_REGISTRY_URL"));
    let topic = format!("bench-consume-{}", std::process::id());
    eprintln!("producing {EVENTS} events to {topic} ...");
    produce(&bootstrap, &registry, &topic, EVENTS).await;

    let client = outbox_operator::db::connect(&uri).await.unwrap();
    let db = client.database(&format!("bench-consume-{}", std::process::id()));
    let store = ProcessedStore::new(&db, "bench");
    store.ensure_indexes(Duration::from_secs(3600)).await.unwrap();
    let projection = Handler::projection(client.clone(), &db, "per_event_projection");

    eprintln!("no-op handler, no deduplication ...");
    let (noop, _) = run(&bootstrap, &registry, &topic, EVENTS, None).await;
    eprintln!("projection through the consumer loop, batches of {BATCH} ...");
    let batched = consumer_loop(&uri, &bootstrap, &registry, &topic, &db).await;
    eprintln!("projection, one transaction per event, first {PER_EVENT} events ...");
    let (per_event, applied) = run(&bootstrap, &registry, &topic, PER_EVENT, Some((&projection, &store))).await;
    assert_eq!(applied as usize, PER_EVENT);
    eprintln!("latency at {LATENCY_RATE} events/s for {LATENCY_SECONDS} s through the consumer loop ...");
    // librdkafka's default fetch wait (500 ms), then 10 ms as bench-relay's reader uses.
    let mut lat = Vec::new();
    for wait in [500, 10] {
        lat.push((wait, latency(&uri, &bootstrap, &registry, &db, wait).await));
    }
    let pct = |l: &[f64], p: usize| l[(l.len() * p / 100).min(l.len() - 1)];
    let lat_rows: String = lat
        .iter()
        .map(|(wait, Latency { total: l, .. })| {
            format!(
                "| {wait} | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
                l.len(),
                pct(l, 50),
                pct(l, 90),
                pct(l, 99),
                l[l.len() - 1]
            )
        })
        .collect();
    let split_rows: String = lat
        .iter()
        .map(|(wait, l)| {
            let part = |v: &[f64]| format!("{:.0} / {:.0}", pct(v, 50), pct(v, 99));
            format!("| {wait} | {} | {} | {} |\n", part(&l.to_handler), part(&l.commit), part(&l.observe))
        })
        .collect();

    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let table = format!(
        "Consumer throughput, {EVENTS} Session events, one consumer, decode via the registry in all, same run\n\n\
         | handler | events | seconds | events/s | vs no-op |\n|---|---:|---:|---:|---:|\n\
         | no-op, no deduplication (baseline) | {EVENTS} | {:.2} | {:.0} | 100% |\n\
         | projection + processed marks, one transaction per batch (consumer loop, batch {BATCH}) | {EVENTS} | {:.2} | {:.0} | {:.0}% |\n\
         | projection + processed mark, one transaction per event (the first release) | {PER_EVENT} | {:.2} | {:.0} | {:.0}% |\n\n\
         Produce -> applied (processed mark committed and seen by a change stream), projection through the \
         consumer loop, {LATENCY_RATE} events/s for {LATENCY_SECONDS} s\n\n\
         | consumer fetch.wait.max.ms | events | p50 ms | p90 ms | p99 ms | max ms |\n|---:|---:|---:|---:|---:|---:|\n\
         {lat_rows}\n\
         Where the time goes, p50 / p99 ms (wall clocks of this machine, millisecond resolution)\n\n\
         | consumer fetch.wait.max.ms | produce -> mark made (delivery, fetch, decode, dedup query) | \
         mark -> committed (transaction) | committed -> seen (change stream) |\n|---:|---:|---:|---:|\n\
         {split_rows}",
        noop.as_secs_f64(),
        rate(EVENTS, noop),
        batched.as_secs_f64(),
        rate(EVENTS, batched),
        100.0 * rate(EVENTS, batched) / rate(EVENTS, noop),
        per_event.as_secs_f64(),
        rate(PER_EVENT, per_event),
        100.0 * rate(PER_EVENT, per_event) / rate(EVENTS, noop),
    );
    let rates = [
        ("no-op, no deduplication", rate(EVENTS, noop)),
        ("projection, a transaction per batch", rate(EVENTS, batched)),
        ("projection, a transaction per event", rate(PER_EVENT, per_event)),
    ];
    let figure = report::Figure {
        title: format!("bench-consumer: {EVENTS} events, one consumer, same run"),
        panels: vec![
            report::Panel::Bars {
                title: "Throughput by handler".into(),
                unit: "events/s".into(),
                groups: rates.iter().map(|(n, r)| (n.to_string(), vec![("events/s".to_owned(), *r)])).collect(),
            },
            report::Panel::Percentiles {
                title: format!("Produce -> applied, projection, {LATENCY_RATE} events/s for {LATENCY_SECONDS} s"),
                series: lat.iter().map(|(wait, l)| (format!("fetch.wait.max.ms {wait}"), l.total.clone())).collect(),
            },
        ],
    };
    report::write("consumer_throughput", &table, &figure);
    db.drop().await.unwrap();
}
