//! Benchmark: the relay's throughput on a backlog of 100k events in its
//! change stream, side by side in one run with
//!   (a) the raw ceiling: the same Avro payloads produced straight to the
//!       broker with the same producer settings, no MongoDB in the path;
//!   (b) a naive relay: claim one row, publish it, mark it, repeat;
//! plus commit-to-consumer latency (p50/p99) at steady 1k and 10k events/s,
//! and a steady-state run of 1M events written while the relay publishes,
//! with retention and history cleanup on. The relay is the real relay loop
//! (`relay::run_until`) in this process. (a) and the relay run in 5 rounds,
//! the median shown, and so does each steady rate (the round with the
//! median p99 shown, every round's p99 beside the broker-alone p99 measured
//! right after it); each path's CPU per event in mongod, the broker and
//! this process is read from /proc. The relay's per-stage latency
//! (`outbox_relay_stage_seconds`, read from its metrics endpoint) is shown
//! for the backlog and both steady rates. `BENCH_ROUNDS` sets the rounds
//! (default 5), `BENCH_STEADY_EVENTS` the size of the steady-state run
//! (default 1M; 0 skips it), and `BENCH_SKIP=hot,scale,latency` skips the
//! hot-aggregate, scale-out and steady-rate latency runs.
//!
//! Needs MongoDB, the broker and the registry of the stack
//! (`scripts/stack.sh up mongo kafka registry && . .stack/env`); run with
//! `make bench-relay`. Prints a table and writes it to
//! `$CARGO_TARGET_DIR/bench/relay_throughput.md`, with its figures drawn in `relay_throughput.svg` beside it.

mod report;
mod stages;

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use mongodb::bson::{DateTime, Document, doc};
use outbox_operator::{
    avro::{ValueLayout, catalog::SchemaDir, encode_confluent, event_schema},
    backoff::BackoffPolicy,
    domain::{
        event::{EventEnvelope, EventMetadata, now_millis},
        session::{ClientInfo, CreateSession, Session, SessionPolicy},
    },
    kafka::{OVERRIDES_DELIMITER, parse_override, topics::EventTopicMapper},
    lease::range_lease_name,
    outbox::checkpoint::{Checkpoint, Checkpoints},
    outbox::{
        Outbox, OutboxDocument,
        bucket::{BucketRange, split},
    },
    registry_client::{SubjectStrategy, ids::SchemaIds},
    relay::{
        self, RelayArgs,
        publisher::{AggregatesInFlight, Outgoing, Publisher, next_answers},
        schemas::{EventSchemas, SchemaSource},
        stream::{OutboxStream, StreamStart},
    },
};
use rdkafka::{
    ClientConfig, Message,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    consumer::{Consumer, StreamConsumer},
    message::OwnedMessage,
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};

/// The repository's schema directory (the sample's Session events).
const SAMPLE_SCHEMAS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas");
const EVENTS: usize = 100_000;
const NAIVE_EVENTS: usize = 2_000;
/// Events of the hot-aggregate runs, and how many aggregates share them.
const HOT_EVENTS: usize = 20_000;
const HOT_AGGREGATES: [usize; 3] = [1, 16, 256];
/// Scale-out rows: relays sharing one outbox split into `SCALE_SHARDS` ranges.
const SCALE_RELAYS: [usize; 3] = [1, 2, 4];
const SCALE_SHARDS: u32 = 4;
const BATCH: u32 = 1000;
const PARTITIONS: i32 = 6;
/// Steady-rate latency runs: events per second, and events per aggregate
/// in each 10 ms tick (4: an aggregate's events queue behind each other's
/// acknowledgements; 1: every event of a tick has an aggregate of its own).
const STEADY_RUNS: [(usize, usize); 4] = [(1000, 4), (1000, 1), (10_000, 4), (10_000, 1)];
/// Write rate of the steady-state run (`BENCH_STEADY_EVENTS` events).
const STEADY_STATE_RATE: usize = 10_000;
const STEADY_SECONDS: usize = 10;
/// Rounds of (a) and the relay, side by side, and of each steady rate
/// (`BENCH_ROUNDS`); the table shows the median round by relay rate and by
/// p99 (MongoDB's checkpoints and the machine's neighbours make single
/// rounds vary).
const ROUNDS: usize = 5;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run `scripts/stack.sh up mongo kafka registry && . .stack/env` (or `make bench-relay`)"
        )
    })
}

/// CPU time (user + system) of the local processes on the path, read from
/// /proc: where each path's time goes. A service not found locally (or a
/// platform without /proc) reads as `None` and prints as "-".
#[derive(Clone, Copy)]
struct CpuSample {
    mongod: Option<f64>,
    broker: Option<f64>,
    relay: Option<f64>,
}

fn process_cpu_seconds(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, in clock ticks (100 per second).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn pid_named(name: &str) -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == name).then_some(pid)
    })
}

impl CpuSample {
    fn now() -> Self {
        let of = |name: &str| pid_named(name).and_then(|pid| process_cpu_seconds(&format!("/proc/{pid}/stat")));
        Self { mongod: of("mongod"), broker: of("tansu"), relay: process_cpu_seconds("/proc/self/stat") }
    }

    /// Microseconds of CPU per event of each process since `before`.
    fn per_event_since(&self, before: &CpuSample, events: usize) -> [Option<f64>; 3] {
        let d = |a: Option<f64>, b: Option<f64>| Some((a? - b?) * 1e6 / events as f64);
        [d(self.mongod, before.mongod), d(self.broker, before.broker), d(self.relay, before.relay)]
    }
}

/// `n` events over `aggregates` sessions (each created, then refreshed in
/// turn), in event order. The main backlog has n/4 sessions (an aggregate
/// rarely has two events in one batch); the hot runs put every batch's
/// events on a few.
fn events(n: usize, aggregates: usize) -> Vec<OutboxDocument> {
    let policy = SessionPolicy::default();
    let meta = EventMetadata { correlation_id: Some("bench".into()), ..Default::default() };
    let mut sessions = Vec::new();
    let mut rows = Vec::with_capacity(n);
    for i in 0..aggregates.max(1).min(n) {
        let cmd = CreateSession { user_id: format!("hot-{i}"), ttl_seconds: None, client: ClientInfo::default() };
        let (s, created) = Session::create(cmd, &policy, now_millis()).unwrap();
        rows.push(OutboxDocument::new(&EventEnvelope::wrap(&created, now_millis(), &meta), 256).unwrap());
        sessions.push(s);
    }
    while rows.len() < n {
        for s in sessions.iter_mut().take(n - rows.len()) {
            let e = s.refresh(None, &policy, now_millis()).unwrap();
            rows.push(OutboxDocument::new(&EventEnvelope::wrap(&e, now_millis(), &meta), 256).unwrap());
        }
    }
    rows
}

async fn seed(outbox: &Outbox, rows: &[OutboxDocument]) {
    outbox.ensure_indexes().await.unwrap();
    for chunk in rows.chunks(5000) {
        outbox.collection().insert_many(chunk).await.unwrap();
    }
}

async fn create_topic(bootstrap: &str, topic: &str) {
    let admin: AdminClient<_> = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    for r in admin
        .create_topics(&[NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
}

/// The relay's producer settings, with the overrides the relay takes from
/// `KAFKA_PRODUCER_CONFIG` (so the baselines produce as the relay does).
fn relay_producer_config(bootstrap: &str) -> ClientConfig {
    let overrides: Vec<(String, String)> = std::env::var("KAFKA_PRODUCER_CONFIG")
        .unwrap_or_default()
        .split(OVERRIDES_DELIMITER)
        .filter(|s| !s.trim().is_empty())
        .map(|s| parse_override(s).expect("KAFKA_PRODUCER_CONFIG"))
        .collect();
    outbox_operator::kafka::relay_producer_config(bootstrap, &overrides).unwrap()
}

/// A producer made as the relay makes its own (`create_producer`), so the
/// baselines do not carry a wait the relay does not have.
fn producer(bootstrap: &str) -> FutureProducer {
    outbox_operator::kafka::create_producer(&relay_producer_config(bootstrap)).unwrap()
}

fn publisher(bootstrap: &str, topic: &str, registry: &str) -> Publisher {
    Publisher::new(
        relay_producer_config(bootstrap),
        EventTopicMapper::new(vec![format!("Session={topic}").parse().unwrap()]),
        Arc::new(EventSchemas::new(
            SchemaSource::Files(Arc::new(SchemaDir::open(Path::new(SAMPLE_SCHEMAS)).unwrap())),
            SubjectStrategy::TopicRecordName,
            SchemaIds::new(registry, true),
        )),
        ValueLayout::Envelope,
        BackoffPolicy::default(),
        Duration::from_secs(5),
    )
    .unwrap()
}

/// (a) The raw ceiling: pre-encoded payloads, produced pipelined.
async fn raw_ceiling(
    bootstrap: &str,
    registry: &str,
    rows: &[OutboxDocument],
    round: usize,
) -> (Duration, [Option<f64>; 3]) {
    let topic = format!("bench-raw-{}-{round}", std::process::id());
    create_topic(bootstrap, &topic).await;
    let ids = SchemaIds::new(registry, true);
    let mut schemas = HashMap::new();
    let mut encoded = Vec::with_capacity(rows.len());
    for row in rows {
        let entry = event_schema(&row.event_name, row.event_version as u32).unwrap();
        let schema = schemas.entry(row.event_name.clone()).or_insert_with(|| entry.parse().unwrap()).clone();
        let full = match &schema {
            apache_avro::Schema::Record(r) => r.name.fullname(None),
            _ => unreachable!(),
        };
        let id = ids.id(&format!("{topic}-{full}"), &full, entry.text).await.unwrap();
        encoded.push((row.aggregate_id.clone(), encode_confluent(id, &schema, &row.to_event_row().raw).unwrap()));
    }
    let p = producer(bootstrap);
    // CPU from here on: the produce alone, not the encoding above.
    let cpu_before = CpuSample::now();
    let start = Instant::now();
    for chunk in encoded.chunks(BATCH as usize) {
        let sends = chunk.iter().map(|(key, payload)| {
            p.send(FutureRecord::to(&topic).key(key.as_str()).payload(payload.as_slice()), Timeout::Never)
        });
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| e).unwrap();
        }
    }
    let elapsed = start.elapsed();
    (elapsed, CpuSample::now().per_event_since(&cpu_before, rows.len()))
}

fn relay_args(uri: &str, database: &str, bootstrap: &str, registry: &str, topic: &str, extra: &[&str]) -> RelayArgs {
    let (route, batch) = (format!("Session={topic}"), BATCH.to_string());
    #[rustfmt::skip]
    let mut flags = vec![
        "--mongodb-uri", uri, "--database", database, "--kafka-bootstrap", bootstrap,
        "--schema-registry-url", registry, "--route", &route, "--schemas-dir", SAMPLE_SCHEMAS,
        "--batch-size", &batch, "--lease-backend", "mongodb",
    ];
    let metrics = stages::free_addr().to_string();
    flags.extend_from_slice(&["--metrics-listen", &metrics]);
    if !extra.contains(&"--relay-id") {
        flags.extend_from_slice(&["--relay-id", "bench"]);
    }
    flags.extend_from_slice(extra);
    outbox_operator::cli::args_from(&flags).expect("relay flags")
}

type RelayTask = (tokio::task::JoinHandle<outbox_operator::Result<()>>, tokio::sync::watch::Sender<bool>);

fn spawn_relay(args: RelayArgs) -> RelayTask {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    (tokio::spawn(relay::run_until(args, stop_rx)), stop_tx)
}

async fn stop_relay((task, stop): RelayTask) {
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

/// Poll the checkpoint until `done` says so.
async fn until_checkpoint(db: &mongodb::Database, what: &str, done: impl Fn(&Checkpoint) -> bool) {
    let checkpoints = Checkpoints::new(db, "outbox");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(c) = checkpoints.load().await.unwrap()
            && done(&c)
        {
            return;
        }
        assert!(Instant::now() < deadline, "relay did not get to: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The relay catching up on `rows` written while it was stopped: a first
/// run claims the empty outbox and checkpoints the stream's position, the
/// rows are written, and a second run is timed from its start until its
/// checkpoint counts every row published.
async fn relay_backlog(
    client: &mongodb::Client,
    uri: &str,
    bootstrap: &str,
    registry: &str,
    database: &str,
    topic: &str,
    rows: &[OutboxDocument],
) -> (Duration, [Option<f64>; 3], (Vec<stages::Stage>, stages::Batches)) {
    let db = client.database(database);
    let outbox = Outbox::new(&db, "outbox");
    outbox.ensure_indexes().await.unwrap();
    let first = spawn_relay(relay_args(uri, database, bootstrap, registry, topic, &[]));
    until_checkpoint(&db, "a first checkpoint", |c| c.token.is_some()).await;
    stop_relay(first).await;
    seed(&outbox, rows).await;
    // Flush the seeded rows first, so the relay's CPU figures do not carry
    // the WiredTiger checkpoint of the writes that made its backlog.
    client.database("admin").run_command(doc! {"fsync": 1}).await.unwrap();
    let cpu_before = CpuSample::now();
    let start = Instant::now();
    let args = relay_args(uri, database, bootstrap, registry, topic, &[]);
    let metrics = args.metrics_listen;
    let relay = spawn_relay(args);
    let n = rows.len() as i64;
    until_checkpoint(&db, "every event published", |c| c.published >= n).await;
    let elapsed = start.elapsed();
    let cpu = CpuSample::now().per_event_since(&cpu_before, rows.len());
    let stages = stages::read(metrics).await;
    stop_relay(relay).await;
    (elapsed, cpu, stages)
}

/// Relays sharing one outbox (`shards` ranges; 1: the unsharded relay):
/// they start on an empty outbox and share its ranges out, then `rows` are
/// written while they run. Timed from the first write until the ranges'
/// checkpoints count every row published; also returns how long the
/// writes took (while the relays ran: each range's stream adds to it).
async fn relays_sharing(
    client: &mongodb::Client,
    (uri, bootstrap, registry): (&str, &str, &str),
    database: &str,
    topic: &str,
    rows: &[OutboxDocument],
    (relays, shards): (usize, u32),
) -> (Duration, Duration) {
    let db = client.database(database);
    let outbox = Outbox::new(&db, "outbox");
    outbox.ensure_indexes().await.unwrap();
    let shards_flag = shards.to_string();
    let tasks: Vec<RelayTask> = (0..relays)
        .map(|i| {
            let id = format!("bench-{i}");
            let extra = ["--relay-id", &id, "--shards", &shards_flag];
            spawn_relay(relay_args(uri, database, bootstrap, registry, topic, &extra))
        })
        .collect();
    // Every range claimed, its stream open, and the ranges shared out.
    let ranges = split(256, shards);
    let leases = db.collection::<Document>("outbox_leases");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let all = Checkpoints::all(&db, "outbox").await.unwrap();
        let streaming = all.iter().filter(|(_, c)| c.token.is_some()).count() == ranges.len();
        let mut holders = std::collections::HashSet::new();
        for r in &ranges {
            let name = range_lease_name(database, "outbox", r);
            if let Some(d) = leases.find_one(doc! {"_id": &name}).await.unwrap() {
                holders.insert(d.get_str("holder").unwrap_or_default().to_owned());
            }
        }
        holders.remove("");
        if streaming && holders.len() == relays.min(ranges.len()) {
            break;
        }
        assert!(Instant::now() < deadline, "{relays} relays did not share {shards} ranges");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = Instant::now();
    seed(&outbox, rows).await;
    let written = start.elapsed();
    let n = rows.len() as i64;
    loop {
        let all = Checkpoints::all(&db, "outbox").await.unwrap();
        if all.iter().map(|(_, c)| c.published).sum::<i64>() >= n {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(600), "{relays} relays did not publish the backlog");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = start.elapsed();
    for t in tasks {
        stop_relay(t).await;
    }
    db.drop().await.unwrap();
    (took, written)
}

/// The change stream's own ceiling: the relay's reader alone (the same
/// stream, batch size and read-ahead) catching up on `rows`, publishing
/// nothing. MongoDB serves one change stream cursor one reply at a time,
/// so this bounds any relay that reads one stream.
async fn stream_alone(
    client: &mongodb::Client,
    database: &str,
    rows: &[OutboxDocument],
) -> (Duration, [Option<f64>; 3]) {
    let db = client.database(database);
    let outbox = Outbox::new(&db, "outbox");
    outbox.ensure_indexes().await.unwrap();
    let coll = outbox.collection().clone_with_type::<Document>();
    // The stream starts at a cluster time taken before the rows are written.
    let mut session = client.start_session().await.unwrap();
    db.collection::<Document>("start_marker").insert_one(doc! {}).session(&mut session).await.unwrap();
    let start = session.operation_time().expect("a write has an operation time");
    seed(&outbox, rows).await;
    client.database("admin").run_command(doc! {"fsync": 1}).await.unwrap();
    let cpu_before = CpuSample::now();
    let started = Instant::now();
    let mut stream =
        OutboxStream::open(coll, StreamStart::At(start), BATCH as usize, BucketRange::whole()).await.unwrap();
    let mut read = 0;
    while read < rows.len() {
        let batch = stream.next_batch(BATCH as usize, Duration::from_secs(10), Duration::ZERO).await.unwrap();
        assert!(!batch.events.is_empty() || batch.idle_token.is_some(), "the stream went quiet at {read} events");
        read += batch.events.len();
    }
    let elapsed = started.elapsed();
    let cpu = CpuSample::now().per_event_since(&cpu_before, rows.len());
    db.drop().await.unwrap();
    (elapsed, cpu)
}

/// One round's measurements.
#[derive(Clone, Copy)]
struct Round {
    raw: Duration,
    raw_cpu: [Option<f64>; 3],
    relayed: Duration,
    relay_cpu: [Option<f64>; 3],
    streamed: Duration,
    stream_cpu: [Option<f64>; 3],
}

/// (b) Claim one, publish one, mark one.
async fn naive(outbox: &Outbox, bootstrap: &str, topic: &str, registry: &str, n: usize) -> Duration {
    let p = publisher(bootstrap, topic, registry);
    let coll = outbox.collection().clone_with_type::<Document>();
    coll.update_many(doc! {}, doc! {"$set": {"status": "pending"}}).await.unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let now = DateTime::now();
        let claimed = coll
            .find_one_and_update(
                doc! {"status": "pending"},
                doc! {"$set": {"claimedBy": "naive", "claimedUntil": DateTime::from_millis(now.timestamp_millis() + 30_000)}},
            )
            .sort(doc! {"_id": 1})
            .await
            .unwrap()
            .expect("a pending row");
        let row = outbox_operator::outbox::EventRow::from_raw(
            mongodb::bson::RawDocumentBuf::from_document(&claimed).unwrap(),
        )
        .unwrap();
        let outgoing = Outgoing { row: row.clone(), seq: 0, arrival: None };
        let (mut order, mut blocked) = (AggregatesInFlight::default(), HashSet::new());
        let mut batch = p.enqueue(vec![outgoing], &mut blocked, &mut order).await;
        next_answers(&mut [&mut batch]).await;
        let forever = tokio::time::Instant::now() + Duration::from_secs(3600);
        p.advance(&mut [&mut batch], &mut order, &mut blocked, forever).await;
        let out = p.settle(batch, &mut blocked, now);
        assert_eq!(out.changes.published.len(), 1, "published");
        let published = &out.changes.published[0];
        coll.update_one(
            doc! {"_id": &row.id},
            doc! {"$set": {"status": "published", "publishedAt": DateTime::now(), "partition": published.partition,
            "offset": published.offset}, "$unset": {"claimedBy": "", "claimedUntil": ""}},
        )
        .await
        .unwrap();
    }
    start.elapsed()
}

/// A consumer of `topic` from its start, as a downstream service would run
/// one (fetch wait 10 ms), joined to its group.
async fn latency_consumer(bootstrap: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{topic}-reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await; // group join
    consumer
}

/// Receive up to `total` messages, each giving its latency in ms through
/// `sent_at` (the send or commit time it carries); sorted. Messages are
/// only taken while receiving and read afterwards, so the receipt time of
/// one never includes reading the ones before it.
async fn receive_latencies(
    consumer: &StreamConsumer,
    total: usize,
    sent_at: impl Fn(&OwnedMessage) -> Option<i64>,
) -> Vec<f64> {
    let mut received = Vec::with_capacity(total);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(STEADY_SECONDS as u64 + 30);
    while received.len() < total {
        let Ok(m) = tokio::time::timeout_at(deadline, consumer.recv()).await else { break };
        let m = m.unwrap();
        received.push((DateTime::now().timestamp_millis(), m.detach()));
    }
    let mut latencies: Vec<f64> = received.iter().filter_map(|(at, m)| sent_at(m).map(|t| (at - t) as f64)).collect();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    latencies
}

fn percentiles(latencies: &[f64]) -> (f64, f64, usize) {
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    (pct(0.5), pct(0.99), latencies.len())
}

/// The floor under commit-to-consumer latency: the broker and the consumer
/// alone. Messages carrying their send time are produced at `rate` with
/// the relay's producer settings and received by the same kind of consumer.
async fn broker_latency(bootstrap: &str, rate: usize, topic: &str) -> Vec<f64> {
    create_topic(bootstrap, topic).await;
    let consumer = latency_consumer(bootstrap, topic).await;
    let total = rate * STEADY_SECONDS;
    let per_tick = rate / 100;
    let p = producer(bootstrap);
    let writer = tokio::spawn({
        let topic = topic.to_owned();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for i in 0..total / per_tick {
                tick.tick().await;
                let sent = DateTime::now().timestamp_millis().to_be_bytes();
                let key = format!("k-{i}");
                let sends = (0..per_tick).map(|_| {
                    p.send(FutureRecord::to(&topic).key(key.as_str()).payload(sent.as_slice()), Timeout::Never)
                });
                for r in futures::future::join_all(sends).await {
                    r.map_err(|(e, _)| e).unwrap();
                }
            }
        }
    });
    let latencies = receive_latencies(&consumer, total, |m| {
        m.payload().and_then(|b| <[u8; 8]>::try_from(b).ok()).map(i64::from_be_bytes)
    })
    .await;
    writer.await.unwrap();
    latencies
}

/// Commit-to-consumer latency at a steady `rate` through the relay loop,
/// with the relay's own per-stage figures.
async fn steady_latency(
    uri: &str,
    bootstrap: &str,
    registry: &str,
    database: &str,
    (rate, per_aggregate): (usize, usize),
) -> (Vec<f64>, Vec<f64>, (Vec<stages::Stage>, stages::Batches)) {
    let topic = format!("{database}-topic");
    create_topic(bootstrap, &topic).await;
    let client = outbox_operator::db::connect(uri).await.unwrap();
    let outbox = Outbox::new(&client.database(database), "outbox");
    outbox.ensure_indexes().await.unwrap();
    let args = relay_args(uri, database, bootstrap, registry, &topic, &[]);
    let metrics = args.metrics_listen;
    let relay = spawn_relay(args);
    let consumer = latency_consumer(bootstrap, &topic).await;

    let total = rate * STEADY_SECONDS;
    let per_tick = rate / 100;
    let writer = tokio::spawn({
        let outbox = outbox.clone();
        async move {
            // rate/100 events every 10 ms, each stamped (occurredOn) just
            // before its write; how long each write took, in ms.
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut writes = Vec::with_capacity(total / per_tick);
            for _ in 0..total / per_tick {
                tick.tick().await;
                let rows = events(per_tick, per_tick.div_ceil(per_aggregate));
                let started = std::time::Instant::now();
                outbox.collection().insert_many(&rows).await.unwrap();
                writes.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            writes.sort_by(|a, b| a.partial_cmp(b).unwrap());
            writes
        }
    });
    let latencies = receive_latencies(&consumer, total, |m| {
        // occurredOn (stamped just before the write) is in the record: decode it.
        use rdkafka::message::Headers;
        let (_, mut datum) = outbox_operator::avro::split_confluent(m.payload()?)?;
        let name = m.headers()?.iter().find(|x| x.key == "eventName")?.value?;
        let schema = event_schema(std::str::from_utf8(name).ok()?, 1)?.parse().ok()?;
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .ok()?
            .read_value(&mut datum)
            .ok()?;
        match value {
            apache_avro::types::Value::Record(fields) => match fields.iter().find(|(k, _)| k == "occurredOn")? {
                (_, apache_avro::types::Value::TimestampMillis(t)) => Some(*t),
                _ => None,
            },
            _ => None,
        }
    })
    .await;
    let writes = writer.await.unwrap();
    let stages = stages::read(metrics).await;
    stop_relay(relay).await;
    client.database(database).drop().await.unwrap();
    (latencies, writes, stages)
}

/// One round of a steady rate: the relay's latencies, the writer's insert
/// times, the relay's stages, and the broker-alone floor right after it.
struct LatencyRound {
    latencies: Vec<f64>,
    writes: Vec<f64>,
    stages: (Vec<stages::Stage>, stages::Batches),
    floor: Vec<f64>,
}

/// What the steady-state run measured.
struct SteadyState {
    events: usize,
    rate: usize,
    wall: Duration,
    /// From the last write until the checkpoint counted every event.
    drain: Duration,
    deleted: u64,
    cpu: [Option<f64>; 3],
}

/// `n` events written at `rate` while the relay publishes, with a 60 s
/// retention and history cleanup on: does the relay keep up, and what do
/// publishing and cleanup cost per event.
async fn steady_state(
    client: &mongodb::Client,
    (uri, bootstrap, registry): (&str, &str, &str),
    database: &str,
    n: usize,
    rate: usize,
) -> SteadyState {
    let topic = format!("{database}-topic");
    create_topic(bootstrap, &topic).await;
    let db = client.database(database);
    let outbox = Outbox::new(&db, "outbox");
    outbox.ensure_indexes().await.unwrap();
    eprintln!("steady state: preparing {n} events ...");
    let rows = events(n, n / 4);
    let extra = ["--retention-seconds", "60", "--clock-skew-margin-seconds", "5"];
    let relay = spawn_relay(relay_args(uri, database, bootstrap, registry, &topic, &extra));
    until_checkpoint(&db, "a first checkpoint", |c| c.token.is_some()).await;
    eprintln!("steady state: writing {n} events at {rate}/s while the relay publishes ...");
    let cpu_before = CpuSample::now();
    let start = Instant::now();
    let per_tick = (rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for chunk in rows.chunks(per_tick) {
        tick.tick().await;
        outbox.collection().insert_many(chunk).await.unwrap();
    }
    let written = Instant::now();
    until_checkpoint(&db, "every event published", |c| c.published >= n as i64).await;
    let drain = written.elapsed();
    let wall = start.elapsed();
    let cpu = CpuSample::now().per_event_since(&cpu_before, n);
    stop_relay(relay).await;
    let left = db.collection::<Document>("outbox").estimated_document_count().await.unwrap();
    db.drop().await.unwrap();
    SteadyState { events: n, rate, wall, drain, deleted: (n as u64).saturating_sub(left), cpu }
}

#[tokio::main]
async fn main() {
    outbox_operator::telemetry::install_crypto_provider();
    outbox_operator::telemetry::init_logging(outbox_operator::telemetry::LogFormat::Text);
    let (uri, bootstrap, registry) = (env("MONGODB_URI"), env("KAFKA_BOOTSTRAP"), env("SCHEMA_REGISTRY_URL"));
    let client = outbox_operator::db::connect(&uri).await.unwrap();
    let pid = std::process::id();

    eprintln!("preparing {EVENTS} events ...");
    let rows = events(EVENTS, EVENTS / 4);
    let rounds_wanted: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(ROUNDS).max(1);
    let skip = std::env::var("BENCH_SKIP").unwrap_or_default();
    let skipped = |part: &str| skip.split(',').any(|p| p.trim() == part);
    let mut rounds = Vec::with_capacity(rounds_wanted);
    let mut backlog_stages = Vec::with_capacity(rounds_wanted);
    for round in 1..=rounds_wanted {
        eprintln!("round {round}/{rounds_wanted}: (a) raw ceiling, producing {EVENTS} pre-encoded payloads ...");
        let (raw, raw_cpu) = raw_ceiling(&bootstrap, &registry, &rows, round).await;

        let database = format!("bench-relay-{pid}-{round}");
        let topic = format!("bench-relay-{pid}-{round}");
        create_topic(&bootstrap, &topic).await;
        eprintln!(
            "round {round}/{rounds_wanted}: relay, publishing a backlog of {EVENTS} events from the change stream ..."
        );
        let (relayed, relay_cpu, stages) =
            relay_backlog(&client, &uri, &bootstrap, &registry, &database, &topic, &rows).await;
        backlog_stages.push((relayed, stages));
        let db = client.database(&database);
        let marked = db.collection::<Document>("outbox").count_documents(doc! {"status": {"$exists": true}}).await;
        assert_eq!(marked.unwrap(), 0, "no row written on the success path");
        db.drop().await.unwrap();
        eprintln!("round {round}/{rounds_wanted}: (c) the change stream alone, reading the same backlog ...");
        let (streamed, stream_cpu) = stream_alone(&client, &format!("bench-stream-{pid}-{round}"), &rows).await;
        rounds.push(Round { raw, raw_cpu, relayed, relay_cpu, streamed, stream_cpu });
    }
    let per_second = |d: Duration| EVENTS as f64 / d.as_secs_f64();
    let round_bars: Vec<(String, Vec<(String, f64)>)> = rounds
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let bars = [("(a) raw ceiling", r.raw), ("(c) the change stream alone", r.streamed), ("relay", r.relayed)];
            (format!("round {}", i + 1), bars.into_iter().map(|(n, d)| (n.to_owned(), per_second(d))).collect())
        })
        .collect();
    let per_round: Vec<String> = rounds
        .iter()
        .map(|r| {
            format!(
                "{:.0}% / {:.0}%",
                100.0 * r.raw.as_secs_f64() / r.relayed.as_secs_f64(),
                100.0 * r.streamed.as_secs_f64() / r.relayed.as_secs_f64()
            )
        })
        .collect();
    rounds.sort_by_key(|r| r.relayed);
    let Round { raw, raw_cpu, relayed, relay_cpu, streamed, stream_cpu } = rounds[rounds.len() / 2];
    let mut stage_rows = String::new();
    if let Some((_, (stages, batches))) = backlog_stages.iter().find(|(took, _)| *took == relayed) {
        stage_rows.push_str(&stages::rows(&format!("backlog of {EVENTS} (median round)"), stages, *batches));
    }
    let mut hot_rows = String::new();
    let mut hot_bars = Vec::new();
    for aggregates in HOT_AGGREGATES.into_iter().filter(|_| !skipped("hot")) {
        eprintln!("hot aggregates: a backlog of {HOT_EVENTS} events over {aggregates} aggregate(s) ...");
        let (database, topic) = (format!("bench-hot-{pid}-{aggregates}"), format!("bench-hot-{pid}-{aggregates}"));
        create_topic(&bootstrap, &topic).await;
        let hot = events(HOT_EVENTS, aggregates);
        let (took, ..) = relay_backlog(&client, &uri, &bootstrap, &registry, &database, &topic, &hot).await;
        client.database(&database).drop().await.unwrap();
        let per_second = HOT_EVENTS as f64 / took.as_secs_f64();
        hot_bars.push((format!("{aggregates} aggregate(s)"), vec![("events/s".to_owned(), per_second)]));
        hot_rows.push_str(&format!(
            "| {aggregates} | {HOT_EVENTS} | {:.2} | {per_second:.0} | {:.0} | {:.0}% |\n",
            took.as_secs_f64(),
            per_second / aggregates as f64,
            100.0 * per_second * relayed.as_secs_f64() / EVENTS as f64,
        ));
    }
    let mut scale_rows = String::new();
    let mut scale_bars = Vec::new();
    let mut scale_base = None;
    let scale_runs = std::iter::once((1, 1)).chain(SCALE_RELAYS.iter().map(|r| (*r, SCALE_SHARDS)));
    for (relays, shards) in scale_runs.filter(|_| !skipped("scale")) {
        eprintln!("scale-out: {relays} relay(s) sharing one outbox of {shards} range(s), {EVENTS} events written ...");
        let name = format!("bench-scale-{pid}-{relays}-{shards}");
        create_topic(&bootstrap, &name).await;
        let services = (uri.as_str(), bootstrap.as_str(), registry.as_str());
        let (took, written) = relays_sharing(&client, services, &name, &name, &rows, (relays, shards)).await;
        let per_second = EVENTS as f64 / took.as_secs_f64();
        let base = *scale_base.get_or_insert(per_second);
        scale_bars.push((format!("{relays} relay(s), {shards} range(s)"), vec![("events/s".to_owned(), per_second)]));
        scale_rows.push_str(&format!(
            "| {relays} | {shards} | {EVENTS} | {:.2} | {:.2} | {per_second:.0} | {:.2}x |\n",
            written.as_secs_f64(),
            took.as_secs_f64(),
            per_second / base,
        ));
    }
    let topic = format!("bench-relay-{pid}-naive");
    create_topic(&bootstrap, &topic).await;

    let naive_db = client.database(&format!("bench-naive-{pid}"));
    let naive_outbox = Outbox::new(&naive_db, "outbox");
    seed(&naive_outbox, &rows[..NAIVE_EVENTS]).await;
    eprintln!("(b) naive relay: {NAIVE_EVENTS} events one at a time ...");
    let naive_time = naive(&naive_outbox, &bootstrap, &topic, &registry, NAIVE_EVENTS).await;

    // Each steady rate runs once per round, with the broker-alone floor
    // measured right after it: the row is the round with the median p99,
    // and every round's p99 is shown against its own floor.
    let mut latency_rows = String::new();
    let mut distributions = Vec::new();
    let mut floors_drawn = HashSet::new();
    for (steady_rate, per_aggregate) in STEADY_RUNS.into_iter().filter(|_| !skipped("latency")) {
        let mut runs = Vec::with_capacity(rounds_wanted);
        for round in 1..=rounds_wanted {
            eprintln!(
                "latency, round {round}/{rounds_wanted}: {steady_rate} events/s, {per_aggregate} per aggregate per \
                 tick, for {STEADY_SECONDS}s, then the broker alone ..."
            );
            let steady_db = format!("bench-steady-{pid}-{steady_rate}-{per_aggregate}-{round}");
            let (latencies, writes, stages) =
                steady_latency(&uri, &bootstrap, &registry, &steady_db, (steady_rate, per_aggregate)).await;
            let floor = broker_latency(&bootstrap, steady_rate, &format!("{steady_db}-floor")).await;
            runs.push(LatencyRound { latencies, writes, stages, floor });
        }
        let p99_of = |latencies: &[f64]| percentiles(latencies).1;
        let per_round: Vec<String> =
            runs.iter().map(|r| format!("{:.0} / {:.0}", p99_of(&r.latencies), p99_of(&r.floor))).collect();
        runs.sort_by(|a, b| p99_of(&a.latencies).total_cmp(&p99_of(&b.latencies)));
        let LatencyRound { latencies, writes, stages: (stages, batches), floor } = runs.swap_remove(runs.len() / 2);
        let label = format!("{steady_rate}/s, {per_aggregate} per aggregate");
        stage_rows.push_str(&stages::rows(&format!("{label} (median round)"), &stages, batches));
        let ((p50, p99, measured), (floor50, floor99, _), (write50, write99, _)) =
            (percentiles(&latencies), percentiles(&floor), percentiles(&writes));
        latency_rows.push_str(&format!(
            "| {steady_rate} | {per_aggregate} | {measured} | {p50:.0} | {p99:.0} | {write50:.1} / {write99:.1} | \
             {floor50:.0} | {floor99:.0} | {} |\n",
            per_round.join(", ")
        ));
        if floors_drawn.insert(steady_rate) {
            distributions.push((format!("broker alone, {steady_rate}/s"), floor));
        }
        distributions.push((format!("relay, {label}"), latencies));
    }
    let steady_events: usize =
        std::env::var("BENCH_STEADY_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let steady = if steady_events > 0 {
        let database = format!("bench-steady-state-{pid}");
        Some(steady_state(&client, (&uri, &bootstrap, &registry), &database, steady_events, STEADY_STATE_RATE).await)
    } else {
        None
    };

    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let (raw_rate, relay_rate, naive_rate) = (rate(EVENTS, raw), rate(EVENTS, relayed), rate(NAIVE_EVENTS, naive_time));
    let stream_rate = rate(EVENTS, streamed);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let table = format!(
        "Relay throughput, {EVENTS} pre-written Session events, {PARTITIONS} partitions, batch {BATCH}, same run, same stack; \
         median of {rounds_wanted} rounds (relay vs raw ceiling / vs the change stream alone, per round: {})\n\n\
         | path | events | seconds | events/s | relay vs it |\n|---|---:|---:|---:|---:|\n\
         | (a) raw ceiling: pre-encoded, straight to the broker | {EVENTS} | {:.2} | {raw_rate:.0} | {:.0}% |\n\
         | (c) the change stream alone: the relay's reader, publishing nothing | {EVENTS} | {:.2} | {stream_rate:.0} | {:.0}% |\n\
         | relay: change stream, encode via registry, pipelined produce, checkpoint every 100 ms | {EVENTS} | {:.2} | {relay_rate:.0} | - |\n\
         | (b) naive: claim one, publish one, mark one | {NAIVE_EVENTS} | {:.2} | {naive_rate:.0} | {:.1}x |\n\n\
         Commit-to-consumer latency at steady rates for {STEADY_SECONDS}s each, {rounds_wanted} round(s) each \
         (relay loop, change stream; the round with the median p99 shown):\n\n\
         | events/s | events per aggregate per 10 ms | events | p50 ms | p99 ms | the write itself p50 / p99 ms | broker alone p50 ms | broker alone p99 ms | p99 / broker alone p99 per round |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---|\n{latency_rows}\n\
         (latency from the event's occurredOn, stamped just before its write, to its receipt by a consumer; the \
         write itself: the writer's insert of one tick's events, which the latency includes; broker alone: the \
         floor, produced straight to the broker with the relay's producer settings and read by the same consumer, \
         right after the relay's run in the same round)\n\n\
         Where an event's time goes inside the relay, per stage, from the relay's own \
         `outbox_relay_stage_seconds` (p50/p99 interpolated within its buckets, mean exact): stream = commit to \
         read by the relay (majority commit point and the stream's await), queue = read to taken into a batch, \
         to_producer = taken to handed to the producer (encoding, and any wait for the aggregate's events \
         in flight on another producer or topic), broker = handed to acknowledged, settle = acknowledged to its batch settled (row writes, \
         checkpoint). For the backlog, `stream` counts from the seeding, not a live commit.\n\n\
         | run | stage | p50 ms | p99 ms | mean ms |\n|---|---|---:|---:|---:|\n{stage_rows}\n\
         Hot aggregates: the same relay on a backlog whose events share a few aggregates (an aggregate's events go to \
         the producer one behind the other, in one partition):\n\n\
         | aggregates | events | seconds | events/s | per aggregate events/s | vs the relay row above |\n\
         |---:|---:|---:|---:|---:|---:|\n{hot_rows}\n\
         Scale-out: relays sharing one outbox split into bucket ranges, each range with its own lease, checkpoint and \
         change stream; the relays run and have shared the ranges out before the events are written, and the time \
         runs from the first write until every event is published (one machine, {cores} cores: the relays, mongod, \
         the broker and the writer share them; the first row is the unsharded relay, measured the same way):\n\n\
         | relays | shards | events | writes took s | seconds | events/s | vs the first row |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n{scale_rows}",
        per_round.join(", "),
        raw.as_secs_f64(),
        100.0 * relay_rate / raw_rate,
        streamed.as_secs_f64(),
        100.0 * relay_rate / stream_rate,
        relayed.as_secs_f64(),
        naive_time.as_secs_f64(),
        relay_rate / naive_rate,
    );
    let cell = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    let cpu_row = |name: &str, c: [Option<f64>; 3], rate: f64| {
        let total: Option<f64> = c.iter().copied().sum();
        let bound = total.map_or("-".to_owned(), |t| format!("{:.0}", cores as f64 * 1e6 / t));
        let busy = total.map_or("-".to_owned(), |t| format!("{:.2}", t * rate / 1e6));
        format!("| {name} | {} | {} | {} | {} | {bound} | {busy} |\n", cell(c[0]), cell(c[1]), cell(c[2]), cell(total))
    };
    // What the relay's target rate (85% of the stream alone) would take at
    // the relay path's measured cost per event.
    let relay_total: Option<f64> = relay_cpu.iter().copied().sum();
    let target_cores = relay_total.map_or("-".to_owned(), |t| format!("{:.2}", t * 0.85 * stream_rate / 1e6));
    let table = format!(
        "{table}\nCPU per event, microseconds (from /proc; the bench process includes its producer), \
         the rate {cores} cores could sustain at that cost if nothing else ran, and the cores the path kept busy \
         at its measured rate (median round):\n\n\
         | path | mongod | broker | bench process | total | CPU-bound events/s | cores busy |\n\
         |---|---:|---:|---:|---:|---:|---:|\n{}{}{}\n\
         At the relay path's cost per event, 85% of the stream alone ({:.0} events/s) would keep {target_cores} of \
         the {cores} cores busy.\n",
        cpu_row("(a) raw ceiling", raw_cpu, raw_rate),
        cpu_row("(c) the change stream alone", stream_cpu, stream_rate),
        cpu_row("relay (backlog from the change stream)", relay_cpu, relay_rate),
        0.85 * stream_rate,
    );
    let table = match &steady {
        None => table,
        Some(s) => format!(
            "{table}{}\nSteady state: {} events written at {}/s while the relay published them, retention 60 s with \
             history cleanup on: {:.1} s wall, {:.0} events/s published, drained {:.2} s after the last write, {} \
             published rows deleted by cleanup during the run (CPU per event above includes writing and cleanup; the \
             bench process includes the writer).\n",
            cpu_row("steady state (write + publish + cleanup)", s.cpu, s.events as f64 / s.wall.as_secs_f64()),
            s.events,
            s.rate,
            s.wall.as_secs_f64(),
            s.events as f64 / s.wall.as_secs_f64(),
            s.drain.as_secs_f64(),
            s.deleted,
        ),
    };
    let figure = report::Figure {
        title: format!("bench-relay: {EVENTS} events, {cores} cores, same run"),
        panels: vec![
            report::Panel::Bars { title: "Throughput per round".into(), unit: "events/s".into(), groups: round_bars },
            report::Panel::Percentiles {
                title: format!("Commit-to-consumer latency, {STEADY_SECONDS} s at each steady rate"),
                series: distributions,
            },
            report::Panel::Bars { title: "Hot aggregates".into(), unit: "events/s".into(), groups: hot_bars },
            report::Panel::Bars {
                title: "Scale-out: relays sharing one outbox".into(),
                unit: "events/s".into(),
                groups: scale_bars,
            },
        ],
    };
    report::write("relay_throughput", &table, &figure);
    naive_db.drop().await.unwrap();
}
