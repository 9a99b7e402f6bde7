//! Benchmark: the relay's throughput on 100k pre-written events, side by
//! side in one run with
//!   (a) the raw ceiling: the same Avro payloads produced straight to the
//!       broker with the same producer settings, no MongoDB in the path;
//!   (b) a naive relay: claim one row, publish it, mark it, repeat;
//! plus commit-to-consumer latency (p50/p99) at a steady 1k events/s
//! through the full relay process loop (change-stream wake-up). (a) and the
//! relay run in 3 rounds, the median shown; each path's CPU per event in
//! mongod, the broker and this process is read from /proc.
//!
//! Needs MongoDB, the broker and the registry of the stack
//! (`scripts/stack.sh up mongo kafka registry && . .stack/env`); run with
//! `make bench-relay`. Prints a table and writes it to
//! `$CARGO_TARGET_DIR/bench/relay_throughput.md`.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use mongodb::bson::{Bson, DateTime, Document, doc};
use outbox_operator::{
    avro::{bson_to_avro, encode_confluent, event_schema},
    backoff::BackoffPolicy,
    domain::{
        event::{EventEnvelope, EventMetadata, now_millis},
        session::{ClientInfo, CreateSession, Session, SessionPolicy},
    },
    kafka::{producer_config, topics::EventTopicMapper},
    outbox::{Outbox, OutboxDocument},
    registry_client::ids::SchemaIds,
    relay::{self, RelayArgs, metrics::RelayMetrics, publisher::Publisher},
};
use rdkafka::{
    ClientConfig, Message,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    consumer::{Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};

const EVENTS: usize = 100_000;
const NAIVE_EVENTS: usize = 2_000;
const BATCH: u32 = 1000;
const PARTITIONS: i32 = 6;
const STEADY_RATE: usize = 1000;
const STEADY_SECONDS: usize = 10;
/// Rounds of (a) and the relay, side by side; the table shows the median
/// round by relay rate (MongoDB's checkpoints make single rounds vary).
const ROUNDS: usize = 3;

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

/// `n` events over n/4 sessions (created + 3 refreshes each), in event order.
fn events(n: usize) -> Vec<OutboxDocument> {
    let policy = SessionPolicy::default();
    let meta = EventMetadata { correlation_id: Some("bench".into()), ..Default::default() };
    let mut sessions = Vec::new();
    let mut rows = Vec::with_capacity(n);
    for i in 0..n / 4 {
        let now = now_millis();
        let cmd = CreateSession { user_id: format!("user-{i}"), ttl_seconds: None, client: ClientInfo::default() };
        let (s, created) = Session::create(cmd, &policy, now).unwrap();
        rows.push(OutboxDocument::pending(&EventEnvelope::wrap(&created, now, &meta), 256).unwrap());
        sessions.push(s);
    }
    while rows.len() < n {
        for s in sessions.iter_mut() {
            if rows.len() == n {
                break;
            }
            let now = now_millis();
            let e = s.refresh(None, &policy, now).unwrap();
            rows.push(OutboxDocument::pending(&EventEnvelope::wrap(&e, now, &meta), 256).unwrap());
        }
    }
    rows
}

async fn seed(outbox: &Outbox, rows: &[OutboxDocument]) {
    outbox.ensure_indexes(None).await.unwrap();
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

fn producer(bootstrap: &str) -> FutureProducer {
    producer_config(bootstrap, &[]).unwrap().create().unwrap()
}

fn publisher(bootstrap: &str, topic: &str, registry: &str) -> Publisher {
    Publisher::new(
        producer(bootstrap),
        EventTopicMapper::new(vec![format!("Session={topic}").parse().unwrap()]),
        SchemaIds::new(registry, true),
        BackoffPolicy::default(),
    )
}

/// (a) The raw ceiling: pre-encoded payloads, produced pipelined.
async fn raw_ceiling(bootstrap: &str, registry: &str, rows: &[OutboxDocument], round: usize) -> Duration {
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
        let value = bson_to_avro(&Bson::Document(row.event_record()), &schema).unwrap();
        encoded.push((row.aggregate_id.clone(), encode_confluent(id, &schema, value).unwrap()));
    }
    let p = producer(bootstrap);
    let start = Instant::now();
    for chunk in encoded.chunks(BATCH as usize) {
        let sends = chunk.iter().map(|(key, payload)| {
            p.send(FutureRecord::to(&topic).key(key.as_str()).payload(payload.as_slice()), Timeout::Never)
        });
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| e).unwrap();
        }
    }
    start.elapsed()
}

/// The relay's batch loop until every row is published.
async fn relay_batches(outbox: &Outbox, publisher: Publisher, n: usize) -> Duration {
    let metrics = RelayMetrics::register(&prometheus::Registry::new()).unwrap();
    let mut batches = relay::Batches::new(outbox.clone(), std::sync::Arc::new(publisher), metrics, BATCH);
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let handled = batches.step().await.unwrap();
        assert!(handled > 0, "relay stalled at {done}/{n}");
        done += handled;
    }
    batches.finish().await.unwrap();
    start.elapsed()
}

/// (b) Claim one, publish one, mark one.
async fn naive(outbox: &Outbox, bootstrap: &str, topic: &str, registry: &str, n: usize) -> Duration {
    let p = publisher(bootstrap, topic, registry);
    let coll = outbox.collection().clone_with_type::<Document>();
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
        let row: OutboxDocument = mongodb::bson::from_document(claimed).unwrap();
        let out = p.publish(std::slice::from_ref(&row), now).await;
        let published = out.published.first().expect("published");
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

/// Commit-to-consumer latency at a steady rate through the relay process loop.
async fn steady_latency(uri: &str, bootstrap: &str, registry: &str, database: &str) -> (f64, f64, usize) {
    let topic = format!("bench-steady-{}", std::process::id());
    create_topic(bootstrap, &topic).await;
    let client = outbox_operator::db::connect(uri).await.unwrap();
    let outbox = Outbox::new(&client.database(database), "outbox");
    outbox.ensure_indexes(None).await.unwrap();
    let (route, batch) = (format!("Session={topic}"), BATCH.to_string());
    #[rustfmt::skip]
    let flags = [
        "--mongodb-uri", uri, "--database", database, "--kafka-bootstrap", bootstrap,
        "--schema-registry-url", registry, "--route", &route, "--relay-id", "bench-steady",
        "--batch-size", &batch, "--lease-backend", "mongodb", "--metrics-listen", "127.0.0.1:0",
    ];
    let args: RelayArgs = outbox_operator::cli::args_from(&flags).expect("relay flags");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let relay = tokio::spawn(relay::run_until(args, stop_rx));

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bench-steady-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await; // group join

    let total = STEADY_RATE * STEADY_SECONDS;
    let writer = tokio::spawn({
        let outbox = outbox.clone();
        async move {
            // 10 events every 10 ms, each written at its own commit time.
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for _ in 0..total / 10 {
                tick.tick().await;
                let rows = events(12).into_iter().take(10).collect::<Vec<_>>();
                outbox.collection().insert_many(&rows).await.unwrap();
            }
        }
    });
    let mut latencies = Vec::with_capacity(total);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(STEADY_SECONDS as u64 + 30);
    while latencies.len() < total {
        let Ok(m) = tokio::time::timeout_at(deadline, consumer.recv()).await else { break };
        let m = m.unwrap();
        let received = DateTime::now().timestamp_millis();
        let payload = m.payload().unwrap();
        // occurredOn is the 6th field: decode the record to read it.
        let (_, mut datum) = outbox_operator::avro::split_confluent(payload).unwrap();
        let name = m
            .headers()
            .and_then(|h| {
                use rdkafka::message::Headers;
                h.iter()
                    .find(|x| x.key == "eventName")
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .unwrap();
        let schema = event_schema(&name, 1).unwrap().parse().unwrap();
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut datum)
            .unwrap();
        if let apache_avro::types::Value::Record(fields) = value
            && let Some((_, apache_avro::types::Value::TimestampMillis(t))) =
                fields.iter().find(|(k, _)| k == "occurredOn")
        {
            latencies.push((received - t) as f64);
        }
    }
    writer.await.unwrap();
    stop_tx.send(true).unwrap();
    relay.await.unwrap().unwrap();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    (pct(0.5), pct(0.99), latencies.len())
}

#[tokio::main]
async fn main() {
    outbox_operator::telemetry::install_crypto_provider();
    outbox_operator::telemetry::init_logging(outbox_operator::telemetry::LogFormat::Text);
    let (uri, bootstrap, registry) = (env("MONGODB_URI"), env("KAFKA_BOOTSTRAP"), env("SCHEMA_REGISTRY_URL"));
    let client = outbox_operator::db::connect(&uri).await.unwrap();
    let pid = std::process::id();

    eprintln!("preparing {EVENTS} events ...");
    let rows = events(EVENTS);
    let mut rounds = Vec::with_capacity(ROUNDS);
    for round in 1..=ROUNDS {
        eprintln!("round {round}/{ROUNDS}: (a) raw ceiling, producing {EVENTS} pre-encoded payloads ...");
        let cpu_before = CpuSample::now();
        let raw = raw_ceiling(&bootstrap, &registry, &rows, round).await;
        let raw_cpu = CpuSample::now().per_event_since(&cpu_before, EVENTS);

        let db = client.database(&format!("bench-relay-{pid}-{round}"));
        let outbox = Outbox::new(&db, "outbox");
        eprintln!("round {round}/{ROUNDS}: seeding the outbox with {EVENTS} events ...");
        seed(&outbox, &rows).await;
        let topic = format!("bench-relay-{pid}-{round}");
        create_topic(&bootstrap, &topic).await;
        eprintln!("round {round}/{ROUNDS}: relay, publishing {EVENTS} events in batches of {BATCH} ...");
        let cpu_before = CpuSample::now();
        let relayed = relay_batches(&outbox, publisher(&bootstrap, &topic, &registry), EVENTS).await;
        let relay_cpu = CpuSample::now().per_event_since(&cpu_before, EVENTS);
        assert_eq!(
            db.collection::<Document>("outbox").count_documents(doc! {"status": "published"}).await.unwrap(),
            EVENTS as u64
        );
        db.drop().await.unwrap();
        rounds.push((raw, raw_cpu, relayed, relay_cpu));
    }
    let per_round: Vec<String> = rounds
        .iter()
        .map(|(raw, _, relayed, _)| format!("{:.0}%", 100.0 * raw.as_secs_f64() / relayed.as_secs_f64()))
        .collect();
    rounds.sort_by_key(|r| r.2);
    let (raw, raw_cpu, relayed, relay_cpu) = rounds[ROUNDS / 2];
    let topic = format!("bench-relay-{pid}-naive");
    create_topic(&bootstrap, &topic).await;

    let naive_db = client.database(&format!("bench-naive-{pid}"));
    let naive_outbox = Outbox::new(&naive_db, "outbox");
    seed(&naive_outbox, &rows[..NAIVE_EVENTS]).await;
    eprintln!("(b) naive relay: {NAIVE_EVENTS} events one at a time ...");
    let naive_time = naive(&naive_outbox, &bootstrap, &topic, &registry, NAIVE_EVENTS).await;

    eprintln!("latency: {STEADY_RATE} events/s for {STEADY_SECONDS}s through the relay loop ...");
    let steady_db = format!("bench-steady-{pid}");
    let (p50, p99, measured) = steady_latency(&uri, &bootstrap, &registry, &steady_db).await;

    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let (raw_rate, relay_rate, naive_rate) = (rate(EVENTS, raw), rate(EVENTS, relayed), rate(NAIVE_EVENTS, naive_time));
    let table = format!(
        "Relay throughput, {EVENTS} pre-written Session events, {PARTITIONS} partitions, batch {BATCH}, same run, same stack; \
         median of {ROUNDS} rounds (relay vs raw ceiling per round: {})\n\n\
         | path | events | seconds | events/s | relay vs it |\n|---|---:|---:|---:|---:|\n\
         | (a) raw ceiling: pre-encoded, straight to the broker | {EVENTS} | {:.2} | {raw_rate:.0} | {:.0}% |\n\
         | relay: read batch, encode via registry, pipelined produce, bulk mark | {EVENTS} | {:.2} | {relay_rate:.0} | - |\n\
         | (b) naive: claim one, publish one, mark one | {NAIVE_EVENTS} | {:.2} | {naive_rate:.0} | {:.1}x |\n\n\
         Commit-to-consumer latency at a steady {STEADY_RATE} events/s for {STEADY_SECONDS}s (relay loop, change-stream wake-up): \
         p50 {p50:.0} ms, p99 {p99:.0} ms over {measured} events\n",
        per_round.join(", "),
        raw.as_secs_f64(),
        100.0 * relay_rate / raw_rate,
        relayed.as_secs_f64(),
        naive_time.as_secs_f64(),
        relay_rate / naive_rate,
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cell = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    let cpu_row = |name: &str, c: [Option<f64>; 3]| {
        let total: Option<f64> = c.iter().copied().sum();
        let bound = total.map_or("-".to_owned(), |t| format!("{:.0}", cores as f64 * 1e6 / t));
        format!("| {name} | {} | {} | {} | {} | {bound} |\n", cell(c[0]), cell(c[1]), cell(c[2]), cell(total))
    };
    let table = format!(
        "{table}\nCPU per event, microseconds (from /proc; the bench process includes its producer), \
         and the rate {cores} cores could sustain at that cost if nothing else ran:\n\n\
         | path | mongod | broker | bench process | total | CPU-bound events/s |\n|---|---:|---:|---:|---:|---:|\n{}{}",
        cpu_row("(a) raw ceiling", raw_cpu),
        cpu_row("relay", relay_cpu),
    );
    println!("{table}");
    let dir =
        std::path::PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into())).join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("relay_throughput.md"), &table).unwrap();
    for name in [naive_db.name().to_owned(), steady_db] {
        client.database(&name).drop().await.unwrap();
    }
}
