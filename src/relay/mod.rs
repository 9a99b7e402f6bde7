//! `outbox relay`: the MongoDB outbox to Kafka.
//!
//! The loop: hold the outbox lease (one active relay per outbox, standbys
//! wait; the lease is the claim on every due row) -> read due rows in event
//! order -> publish
//! them (`publisher`) -> mark published / failed / dead in bulk -> repeat;
//! when nothing is due, sleep until the change stream (`waker`) reports an
//! insert or the poll interval passes. On SIGTERM the in-flight batch is
//! finished and marked, the producer flushed and the lease released.

pub mod backoff;
pub mod kube_lease;
pub mod lease;
pub mod metrics;
pub mod publisher;
pub mod topics;
pub mod waker;

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use mongodb::bson::DateTime;
use prometheus::Registry;
use tokio::sync::{Notify, watch};

use crate::{
    Error, Result,
    db::connect,
    kafka::{parse_override, producer_config, schema_ids::SchemaIds},
    outbox::{Outbox, OutboxStatus, relay_queries::InFlight},
    telemetry,
};
use backoff::BackoffPolicy;
use kube_lease::{KubeLease, lease_name};
use lease::MongoLease;
use metrics::RelayMetrics;
use publisher::Publisher;
use topics::{EventTopicMapper, TopicRule};

/// Where the outbox is.
#[derive(Debug, Clone, clap::Args)]
pub struct MongoArgs {
    /// MongoDB connection string (replica set).
    #[arg(long, env = "MONGODB_URI")]
    pub mongodb_uri: String,
    /// Database holding the outbox.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "sessions")]
    pub database: String,
    /// Outbox collection.
    #[arg(long, env = "OUTBOX_COLLECTION", default_value = "outbox")]
    pub collection: String,
}

/// `outbox relay [flags]` runs the relay; `outbox relay redrive ...` puts
/// dead or failed events back.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RelayCommand {
    #[command(subcommand)]
    pub action: Option<RelayAction>,
    #[command(flatten)]
    pub run: RelayArgs,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum RelayAction {
    /// Put dead or failed events back to pending (fresh attempt budget) and report how many.
    Redrive(RedriveArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RedriveFrom {
    Dead,
    Failed,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RedriveArgs {
    #[command(flatten)]
    pub mongo: MongoArgs,
    /// Which events to put back.
    #[arg(long, value_enum)]
    pub status: RedriveFrom,
    /// Only this aggregate's events.
    #[arg(long)]
    pub aggregate: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LeaseBackend {
    Auto,
    Mongodb,
    Kubernetes,
}

/// The one-active-relay lease, wherever it lives.
pub enum Leader {
    Mongo(MongoLease),
    Kube(Box<KubeLease>),
}

impl Leader {
    pub async fn acquire(&self) -> std::result::Result<bool, String> {
        match self {
            Leader::Mongo(l) => l.acquire().await.map_err(|e| e.to_string()),
            Leader::Kube(l) => l.acquire().await.map_err(|e| e.to_string()),
        }
    }

    pub async fn release(&self) -> std::result::Result<(), String> {
        match self {
            Leader::Mongo(l) => l.release().await.map_err(|e| e.to_string()),
            Leader::Kube(l) => l.release().await.map_err(|e| e.to_string()),
        }
    }

    pub fn ttl(&self) -> Duration {
        match self {
            Leader::Mongo(l) => l.ttl(),
            Leader::Kube(l) => l.ttl(),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub mongo: MongoArgs,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    pub kafka_bootstrap: String,
    /// Confluent-compatible Schema Registry URL.
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: String,
    /// Register event schemas on first use; when off, an unregistered schema fails its events.
    #[arg(long, env = "SCHEMA_AUTO_REGISTER", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_register_schemas: bool,
    /// Routing rules `Aggregate[.Event]=topic` (repeat, or comma-separated in the env var).
    #[arg(long = "route", env = "OUTBOX_ROUTES", value_delimiter = ',')]
    pub routes: Vec<TopicRule>,
    /// librdkafka producer overrides `key=value` (repeat, or comma-separated in the env var).
    #[arg(long = "producer-config", env = "KAFKA_PRODUCER_CONFIG", value_delimiter = ',', value_parser = parse_override)]
    pub producer_config: Vec<(String, String)>,
    /// This relay's identity in the lease (defaults to the host name).
    #[arg(long, env = "RELAY_ID")]
    pub relay_id: Option<String>,
    /// Rows read and published per batch.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// Poll interval when the change stream is quiet, in milliseconds.
    #[arg(long, env = "RELAY_POLL_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub poll_interval_ms: u64,
    /// Where the one-active-relay lease lives: a Kubernetes Lease (in a
    /// cluster), a MongoDB document, or auto (Kubernetes when running in a pod).
    #[arg(long, env = "RELAY_LEASE_BACKEND", value_enum, default_value = "auto")]
    pub lease_backend: LeaseBackend,
    /// Name of the Lease / lease document (default `outbox-relay-<database>-<collection>`).
    #[arg(long, env = "RELAY_LEASE_NAME")]
    pub lease_name: Option<String>,
    /// Namespace of the Kubernetes Lease (default: the pod's / kubeconfig's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long the outbox lease lasts without renewal, in seconds.
    #[arg(long, env = "RELAY_LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub lease_seconds: u64,
    /// First retry delay after a failed publish, in milliseconds.
    #[arg(long, env = "RELAY_BACKOFF_INITIAL_MS", default_value_t = 1000)]
    pub backoff_initial_ms: u64,
    /// Longest retry delay, in milliseconds.
    #[arg(long, env = "RELAY_BACKOFF_MAX_MS", default_value_t = 300_000)]
    pub backoff_max_ms: u64,
    /// Growth of the retry delay per attempt.
    #[arg(long, env = "RELAY_BACKOFF_MULTIPLIER", default_value_t = 2.0)]
    pub backoff_multiplier: f64,
    /// Attempts before an event goes dead.
    #[arg(long, env = "RELAY_MAX_ATTEMPTS", default_value_t = 10)]
    pub max_attempts: u32,
    /// Relative jitter of retry delays, 0..1.
    #[arg(long, env = "RELAY_BACKOFF_JITTER", default_value_t = 0.2)]
    pub backoff_jitter: f64,
    /// Keep published rows this long (TTL index on publishedAt), in seconds.
    #[arg(long, env = "RELAY_RETENTION_SECONDS", default_value_t = 7 * 24 * 3600, value_parser = clap::value_parser!(u64).range(60..))]
    pub retention_seconds: u64,
    /// Address for /metrics, /healthz, /readyz.
    #[arg(long, env = "METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: std::net::SocketAddr,
}

impl RelayArgs {
    pub fn backoff(&self) -> Result<BackoffPolicy> {
        let policy = BackoffPolicy {
            initial: Duration::from_millis(self.backoff_initial_ms),
            max: Duration::from_millis(self.backoff_max_ms),
            multiplier: self.backoff_multiplier,
            max_attempts: self.max_attempts,
            jitter: self.backoff_jitter,
        };
        policy.validate().map_err(Error::Config)?;
        Ok(policy)
    }

    pub fn relay_id(&self) -> String {
        self.relay_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| format!("relay-{}", std::process::id()))
    }
}

pub async fn main(cmd: RelayCommand) -> Result<()> {
    match cmd.action {
        Some(RelayAction::Redrive(args)) => redrive(args).await,
        None => run(cmd.run).await,
    }
}

async fn redrive(args: RedriveArgs) -> Result<()> {
    let client = connect(&args.mongo.mongodb_uri).await?;
    let outbox = Outbox::new(&client.database(&args.mongo.database), &args.mongo.collection);
    let from = match args.status {
        RedriveFrom::Dead => OutboxStatus::Dead,
        RedriveFrom::Failed => OutboxStatus::Failed,
    };
    let n = outbox
        .redrive(from, args.aggregate.as_deref(), DateTime::now())
        .await
        .map_err(|e| Error::Unavailable { service: "MongoDB", detail: e.to_string() })?;
    let scope = args.aggregate.map(|a| format!(" of aggregate {a}")).unwrap_or_default();
    println!("redrove {n} {:?} event(s){scope} back to pending", args.status);
    tracing::info!(count = n, status = ?args.status, "redrive");
    Ok(())
}

fn mongo_err(e: mongodb::error::Error) -> Error {
    Error::Unavailable { service: "MongoDB", detail: e.to_string() }
}

/// Run the relay until SIGTERM or Ctrl-C.
pub async fn run(args: RelayArgs) -> Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        telemetry::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    run_until(args, stop_rx).await
}

/// Run the relay until `stop` turns true (tests drive this directly).
pub async fn run_until(args: RelayArgs, mut stop: watch::Receiver<bool>) -> Result<()> {
    let backoff = args.backoff()?;
    let relay_id = args.relay_id();
    let producer = producer_config(&args.kafka_bootstrap, &args.producer_config)
        .map_err(Error::Config)?
        .create()
        .map_err(|e| Error::Config(format!("Kafka producer: {e}")))?;
    let client = connect(&args.mongo.mongodb_uri).await?;
    let db = client.database(&args.mongo.database);
    let outbox = Outbox::new(&db, &args.mongo.collection);
    outbox.ensure_indexes(Some(Duration::from_secs(args.retention_seconds))).await.map_err(mongo_err)?;

    let registry = Registry::new();
    let metrics = RelayMetrics::register(&registry)?;
    let healthy = Arc::new(AtomicBool::new(true));
    let ready_flag = healthy.clone();
    let ready: telemetry::ReadyCheck = Arc::new(move || {
        let ok = ready_flag.load(Ordering::Relaxed);
        Box::pin(async move { if ok { Ok(()) } else { Err("the last relay iteration failed".to_owned()) } })
    });
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|source| Error::Io { path: args.metrics_listen.to_string(), source })?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, telemetry::admin_router(registry, ready)).await;
    });

    let wake = Arc::new(Notify::new());
    tokio::spawn(waker::watch_inserts(db.clone(), args.mongo.collection.clone(), wake.clone(), stop.clone()));
    tokio::spawn(refresh_stats(outbox.clone(), metrics.clone(), stop.clone()));

    let publisher = Arc::new(Publisher::new(
        producer,
        EventTopicMapper::new(args.routes.clone()),
        SchemaIds::new(&args.schema_registry_url, args.auto_register_schemas),
        backoff,
    ));
    let mut batches = Batches::new(outbox.clone(), publisher.clone(), metrics.clone(), args.batch_size);
    let lease = leader(&args, &db, &relay_id).await?;
    let poll = Duration::from_millis(args.poll_interval_ms);
    tracing::info!(relay_id = %relay_id, collection = %args.mongo.collection, "relay started");

    let mut leader = false;
    let mut renewed = tokio::time::Instant::now();
    while !stopped(&stop) {
        // Hold the lease: renew a third of the way through its life.
        if !leader || renewed.elapsed() >= lease.ttl() / 3 {
            match lease.acquire().await {
                Ok(held) => {
                    if held != leader {
                        tracing::info!(relay_id = %relay_id, leader = held, "outbox lease changed hands");
                    }
                    leader = held;
                    renewed = tokio::time::Instant::now();
                    metrics.leader.set(i64::from(held));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox lease");
                    leader = false;
                    metrics.leader.set(0);
                }
            }
        }
        if !leader {
            // Not the holder (any more): finish the marks, forget what was read ahead.
            if let Err(e) = batches.finish().await {
                tracing::warn!(error = %e, "marking the last batch");
            }
            wait(&mut stop, None, (lease.ttl() / 3).min(Duration::from_secs(1))).await;
            continue;
        }
        match batches.step().await {
            Ok(0) => {
                healthy.store(true, Ordering::Relaxed);
                wait(&mut stop, Some(&wake), poll).await;
            }
            Ok(_) => healthy.store(true, Ordering::Relaxed),
            Err(e) => {
                healthy.store(false, Ordering::Relaxed);
                metrics.loop_errors.inc();
                tracing::warn!(error = %e, "relay iteration failed; retrying");
                wait(&mut stop, None, poll.max(Duration::from_secs(1))).await;
            }
        }
    }
    tracing::info!("relay stopping: finishing the in-flight batch, flushing the producer, releasing the lease");
    if let Err(e) = batches.finish().await {
        tracing::warn!(error = %e, "marking the last batch");
    }
    publisher.flush(Duration::from_secs(10));
    if leader && let Err(e) = lease.release().await {
        tracing::warn!(error = %e, "releasing the outbox lease");
    }
    Ok(())
}

async fn leader(args: &RelayArgs, db: &mongodb::Database, relay_id: &str) -> Result<Leader> {
    let ttl = Duration::from_secs(args.lease_seconds);
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let name = args
        .lease_name
        .clone()
        .unwrap_or_else(|| lease_name(&format!("outbox-relay-{}-{}", args.mongo.database, args.mongo.collection)));
    match args.lease_backend {
        LeaseBackend::Mongodb => Ok(Leader::Mongo(MongoLease::new(db, &name, relay_id, ttl))),
        LeaseBackend::Auto if !in_cluster => Ok(Leader::Mongo(MongoLease::new(db, &name, relay_id, ttl))),
        LeaseBackend::Auto | LeaseBackend::Kubernetes => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| Error::Unavailable { service: "the Kubernetes API", detail: e.to_string() })?;
            let namespace = args.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
            tracing::info!(lease = %name, namespace = %namespace, "using a Kubernetes Lease");
            Ok(Leader::Kube(Box::new(KubeLease::new(client, &namespace, &name, relay_id, ttl))))
        }
    }
}

/// Stop when told, or when whoever could tell us is gone.
pub(crate) fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

async fn wait(stop: &mut watch::Receiver<bool>, wake: Option<&Notify>, timeout: Duration) {
    let woken = async {
        match wake {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = tokio::time::sleep(timeout) => {}
        () = woken => {}
        _ = stop.changed() => {}
    }
}

/// Batches whose marks may be in flight at once while the next batch is
/// read and published.
const MARKS_IN_FLIGHT: usize = 2;

/// The batch loop of a relay that holds the lease: read due rows -> publish
/// -> mark, with the marks of earlier batches (up to [`MARKS_IN_FLIGHT`])
/// written while the next batch is read and published. Publishes stay
/// strictly one batch after another, so Kafka sees events in event order;
/// rows of batches not yet marked are never read again. (Reading the next
/// batch while publishing was tried too: contention in MongoDB made it
/// slower.)
pub struct Batches {
    outbox: Outbox,
    publisher: Arc<Publisher>,
    metrics: RelayMetrics,
    batch_size: u32,
    /// The batches being marked, oldest first.
    marking: VecDeque<(InFlight, tokio::task::JoinHandle<Result<()>>)>,
}

impl Batches {
    pub fn new(outbox: Outbox, publisher: Arc<Publisher>, metrics: RelayMetrics, batch_size: u32) -> Self {
        Self { outbox, publisher, metrics, batch_size, marking: VecDeque::new() }
    }

    /// Wait for the oldest batches being marked until at most `keep` are
    /// left; all of them are awaited, and the first failure is returned.
    async fn finish_down_to(&mut self, keep: usize) -> Result<()> {
        let mut first = Ok(());
        while self.marking.len() > keep {
            let Some((_, h)) = self.marking.pop_front() else { break };
            let r = h.await.map_err(|e| Error::Config(format!("marking task failed: {e}"))).and_then(|r| r);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Wait for every batch being marked (shutdown, lease lost, nothing
    /// due); the first failure is returned.
    pub async fn finish(&mut self) -> Result<()> {
        self.finish_down_to(0).await
    }

    /// The rows of the batches being marked, and the aggregates that failed in them.
    fn in_flight(&self) -> InFlight {
        let mut all = InFlight::default();
        for (batch, _) in &self.marking {
            all.ids.extend(batch.ids.iter().cloned());
            all.failed_aggregates.extend(batch.failed_aggregates.iter().cloned());
        }
        all
    }

    /// One batch. Returns how many rows it published or failed (0: nothing due).
    pub async fn step(&mut self) -> Result<usize> {
        let started = std::time::Instant::now();
        let now = DateTime::now();
        let due = match self.outbox.due_batch(now, i64::from(self.batch_size), &self.in_flight()).await {
            Ok(c) => c,
            Err(e) => {
                self.finish().await?;
                return Err(mongo_err(e));
            }
        };
        self.metrics.held_back.inc_by(due.held_back as u64);
        if due.rows.is_empty() {
            self.finish().await?;
            return Ok(0);
        }
        let read = started.elapsed();
        self.metrics.batch_size.observe(due.rows.len() as f64);

        let outcome = self.publisher.publish(&due.rows, now).await;
        let produced = started.elapsed();
        let batch = InFlight {
            ids: due.rows.iter().map(|r| r.id.clone()).collect(),
            failed_aggregates: outcome.failed_aggregates(&due.rows),
        };

        // Make room; this batch is marked even if an earlier marking failed
        // (then that batch is published again: duplicates).
        let earlier = self.finish_down_to(MARKS_IN_FLIGHT - 1).await;
        tracing::debug!(
            published = outcome.published.len(),
            failed = outcome.failures.len(),
            skipped = outcome.skipped.len(),
            read_ms = read.as_millis() as u64,
            publish_ms = (produced - read).as_millis() as u64,
            "batch produced"
        );
        let (outbox, metrics) = (self.outbox.clone(), self.metrics.clone());
        self.marking.push_back((batch, tokio::spawn(async move { mark(&outbox, &metrics, outcome).await })));
        earlier?;
        Ok(due.rows.len())
    }
}

/// Record a batch's outcome: published first (what Kafka acknowledged must
/// never be retried for lack of a mark; a crash before this means
/// duplicates, not loss), then failures. Skipped rows stay as they are.
async fn mark(outbox: &Outbox, metrics: &RelayMetrics, outcome: publisher::BatchOutcome) -> Result<()> {
    let started = std::time::Instant::now();
    outbox.mark_published(&outcome.published, DateTime::now()).await.map_err(mongo_err)?;
    let failures: Vec<_> = outcome.failures.iter().map(|(f, _)| f.clone()).collect();
    outbox.mark_failed(&failures).await.map_err(mongo_err)?;
    tracing::debug!(
        published = outcome.published.len(),
        failed = failures.len(),
        mark_ms = started.elapsed().as_millis() as u64,
        "batch marked"
    );

    metrics.published.inc_by(outcome.published.len() as u64);
    for latency in &outcome.latencies {
        metrics.commit_to_ack.observe(*latency);
    }
    for (f, reason) in &outcome.failures {
        metrics.failures.with_label_values(&[reason]).inc();
        if f.retry_at.is_none() {
            metrics.dead_lettered.inc();
            tracing::error!(event_id = %f.id, attempts = f.attempts, error = %f.error, "event is dead after max attempts");
        } else {
            tracing::warn!(event_id = %f.id, attempts = f.attempts, backoff_ms = f.backoff_ms, reason, error = %f.error,
                "publish failed; will retry");
        }
    }
    Ok(())
}

async fn refresh_stats(outbox: Outbox, metrics: RelayMetrics, mut stop: watch::Receiver<bool>) {
    while !stopped(&stop) {
        match outbox.stats(DateTime::now()).await {
            Ok(s) => metrics.set_stats(&s),
            Err(e) => tracing::warn!(error = %e, "reading outbox stats"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.changed() => {}
        }
    }
}
