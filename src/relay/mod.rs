//! `outbox relay`: the MongoDB outbox to Kafka.
//!
//! The loop, top to bottom in this file: hold the outbox lease (one active
//! relay per outbox, standbys wait; the lease is the claim on every due
//! row) -> read due rows in event order -> publish them (`publisher`) ->
//! mark published / failed / dead in bulk -> repeat; when nothing is due,
//! sleep until the change stream (`waker`) reports an insert or the poll
//! interval passes. On SIGTERM the in-flight batch is finished and marked,
//! the producer flushed and the lease released. Flags: `args`; metrics:
//! `metrics`.

pub mod args;
pub mod metrics;
pub mod publisher;
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
use tokio::sync::Notify;

pub use args::{LeaseBackend, MongoArgs, RedriveArgs, RedriveFrom, RelayAction, RelayArgs, RelayCommand};
use metrics::RelayMetrics;
use publisher::Publisher;

use crate::{
    Error, Result,
    db::connect,
    kafka::{producer_config, topics::EventTopicMapper},
    lifecycle::{self, Stop, stopped},
    outbox::{Outbox, OutboxStatus, relay_queries::InFlight},
    registry_client::ids::SchemaIds,
    telemetry,
};

pub async fn main(cmd: RelayCommand) -> Result<()> {
    match cmd.action {
        Some(RelayAction::Redrive(args)) => redrive(args).await,
        None => run_until(cmd.run, lifecycle::stop_on_signal()).await,
    }
}

async fn redrive(args: RedriveArgs) -> Result<()> {
    let client = connect(&args.mongo.mongodb_uri).await?;
    let outbox = Outbox::new(&client.database(&args.mongo.database), &args.mongo.collection);
    let from = match args.status {
        RedriveFrom::Dead => OutboxStatus::Dead,
        RedriveFrom::Failed => OutboxStatus::Failed,
    };
    let n = outbox.redrive(from, args.aggregate.as_deref(), DateTime::now()).await?;
    let scope = args.aggregate.map(|a| format!(" of aggregate {a}")).unwrap_or_default();
    println!("redrove {n} {:?} event(s){scope} back to pending", args.status);
    tracing::info!(count = n, status = ?args.status, "redrive");
    Ok(())
}

/// Run the relay until `stop` turns true (SIGTERM in the binary; tests
/// drive it directly).
pub async fn run_until(args: RelayArgs, mut stop: Stop) -> Result<()> {
    let backoff = args.backoff()?;
    let relay_id = args.relay_id();
    let producer = producer_config(&args.kafka_bootstrap, &args.producer_config)
        .map_err(Error::Config)?
        .create()
        .map_err(|source| Error::Kafka { context: "creating the producer".into(), source })?;
    let client = connect(&args.mongo.mongodb_uri).await?;
    let db = client.database(&args.mongo.database);
    let outbox = Outbox::new(&db, &args.mongo.collection);
    outbox.ensure_indexes(Some(Duration::from_secs(args.retention_seconds))).await?;

    let registry = Registry::new();
    let metrics = RelayMetrics::register(&registry)?;
    let healthy = Arc::new(AtomicBool::new(true));
    let ready_flag = healthy.clone();
    let ready: telemetry::ReadyCheck = Arc::new(move || {
        let ok = ready_flag.load(Ordering::Relaxed);
        Box::pin(async move { if ok { Ok(()) } else { Err("the last relay iteration failed".to_owned()) } })
    });
    lifecycle::serve_admin(args.metrics_listen, registry, ready).await?;

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
    let lease = args.lease(&db, &relay_id).await?;
    let poll = Duration::from_millis(args.poll_interval_ms);
    tracing::info!(relay_id = %relay_id, collection = %args.mongo.collection, "relay started");

    let mut holding = false;
    let mut renewed = tokio::time::Instant::now();
    while !stopped(&stop) {
        // Hold the lease: renew a third of the way through its life.
        if !holding || renewed.elapsed() >= lease.ttl() / 3 {
            match lease.acquire().await {
                Ok(held) => {
                    if held != holding {
                        tracing::info!(relay_id = %relay_id, holding = held, "outbox lease changed hands");
                    }
                    holding = held;
                    renewed = tokio::time::Instant::now();
                    metrics.leader.set(i64::from(held));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox lease");
                    holding = false;
                    metrics.leader.set(0);
                }
            }
        }
        if !holding {
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
    if holding && let Err(e) = lease.release().await {
        tracing::warn!(error = %e, "releasing the outbox lease");
    }
    Ok(())
}

/// Sleep until `timeout`, a wake-up (if any) or the stop signal.
async fn wait(stop: &mut Stop, wake: Option<&Notify>, timeout: Duration) {
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
            let r = h.await.map_err(Error::from).and_then(|r| r);
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
                return Err(e.into());
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
    outbox.mark_published(&outcome.published, DateTime::now()).await?;
    let failures: Vec<_> = outcome.failures.iter().map(|(f, _)| f.clone()).collect();
    outbox.mark_failed(&failures).await?;
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
            tracing::error!(event_id = %f.id, attempts = f.attempts, error = %f.error, "event is dead: attempts spent or a permanent failure");
        } else {
            tracing::warn!(event_id = %f.id, attempts = f.attempts, backoff_ms = f.backoff_ms, reason, error = %f.error,
                "publish failed; will retry");
        }
    }
    Ok(())
}

async fn refresh_stats(outbox: Outbox, metrics: RelayMetrics, mut stop: Stop) {
    while !stopped(&stop) {
        match outbox.stats(DateTime::now()).await {
            Ok(s) => metrics.set_stats(&s),
            Err(e) => tracing::warn!(error = %e, "reading outbox stats"),
        }
        lifecycle::sleep_or_stop(&mut stop, Duration::from_secs(5)).await;
    }
}
