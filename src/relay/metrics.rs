//! The relay's metrics. Each counter moves together with the log line of
//! the same event (see `publish_outcome`).
//!
//! Every series carries `range`, the bucket range it is about (`0-255` for
//! an unsharded outbox; at most one per range of the split, so the label's
//! cardinality is bounded by `--shards`). A relay process registers the
//! families once ([`RelayMetrics`]) and hands each range it publishes its
//! own handles ([`RangeMetrics`]). `outbox_relay_leader` has a series for
//! every range in every relay (0 where it does not publish), so "a range
//! nobody publishes" is a query; the outbox figures (pending, failed, ...)
//! exist only at the range's current publisher, so sums never count a
//! range twice.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    core::{Collector, GenericCounter, GenericGauge},
};

use tokio::time::Instant;

use super::publisher::EventStages;
use crate::{Result, outbox::stats::OutboxStats};

/// The relay's metric families, registered once per process.
#[derive(Clone)]
pub struct RelayMetrics {
    pending: IntGaugeVec,
    failed: IntGaugeVec,
    failed_by_reason: IntGaugeVec,
    held: IntGaugeVec,
    dead: IntGaugeVec,
    oldest_pending_age: GaugeVec,
    blocked_aggregates: IntGaugeVec,
    max_backoff: GaugeVec,
    published: IntCounterVec,
    failures: IntCounterVec,
    dead_lettered: IntCounterVec,
    commit_to_ack: HistogramVec,
    stages: HistogramVec,
    batch_size: HistogramVec,
    held_back: IntCounterVec,
    leader: IntGaugeVec,
    epoch: IntGaugeVec,
    loop_errors: IntCounterVec,
    sent_after_wait: IntCounterVec,
    recoveries: IntCounterVec,
    fenced: IntCounterVec,
    cleaned: IntCounterVec,
    checkpoints: IntCounterVec,
}

/// The steps of an event from its commit to its settled batch, as the
/// `stage` label of `outbox_relay_stage_seconds`.
pub const STAGES: [&str; 5] = ["stream", "queue", "to_producer", "broker", "settle"];

type Counter = GenericCounter<prometheus::core::AtomicU64>;
type Gauge = GenericGauge<prometheus::core::AtomicI64>;

/// One range's handles, used by the code that publishes it.
#[derive(Clone)]
pub struct RangeMetrics {
    range: String,
    families: RelayMetrics,
    /// Reasons with a `failed_by_reason` series of this range (set to 0,
    /// then removed, once no failed row has them).
    reasons: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    pub published: Counter,
    pub dead_lettered: Counter,
    pub commit_to_ack: prometheus::Histogram,
    /// One histogram per `STAGES` entry, in that order.
    stages: [prometheus::Histogram; 5],
    pub batch_size: prometheus::Histogram,
    pub held_back: Counter,
    pub leader: Gauge,
    pub epoch: Gauge,
    pub loop_errors: Counter,
    pub sent_after_wait: Counter,
    pub fenced: Counter,
    pub cleaned: Counter,
    pub checkpoints: Counter,
}

impl RelayMetrics {
    pub fn register(r: &Registry) -> Result<Self> {
        let ranged = |name: &str, help: &str| Opts::new(name, help);
        let igauge = |name: &str, help: &str| IntGaugeVec::new(ranged(name, help), &["range"]);
        let counter = |name: &str, help: &str| IntCounterVec::new(ranged(name, help), &["range"]);
        let m = Self {
            pending: igauge(
                "outbox_relay_pending_events",
                "Events committed after the checkpoint, not yet acknowledged (estimate, see docs/reference/metrics.md)",
            )?,
            failed: igauge("outbox_relay_failed_events", "Outbox rows whose last attempt failed (will retry)")?,
            failed_by_reason: IntGaugeVec::new(
                ranged(
                    "outbox_relay_failed_events_by_reason",
                    "Failed outbox rows by their last failure's reason: what they wait for",
                ),
                &["range", "reason"],
            )?,
            held: igauge(
                "outbox_relay_held_events",
                "Outbox rows waiting behind a failed or dead event of their aggregate",
            )?,
            dead: igauge("outbox_relay_dead_events", "Outbox rows given up after maxAttempts (redrivable)")?,
            oldest_pending_age: GaugeVec::new(
                ranged(
                    "outbox_relay_oldest_pending_age_seconds",
                    "Age of the oldest unpublished (pending, failed or held) event",
                ),
                &["range"],
            )?,
            blocked_aggregates: igauge(
                "outbox_relay_blocked_aggregates",
                "Aggregates with a failed, held or dead event; their later events wait",
            )?,
            max_backoff: GaugeVec::new(
                ranged("outbox_relay_max_backoff_seconds", "Longest backoff currently scheduled"),
                &["range"],
            )?,
            published: counter("outbox_relay_published_total", "Events published and acknowledged")?,
            failures: IntCounterVec::new(
                ranged("outbox_relay_publish_failures_total", "Failed publish attempts, by reason"),
                &["range", "reason"],
            )?,
            dead_lettered: counter("outbox_relay_dead_total", "Events that went dead after maxAttempts")?,
            commit_to_ack: HistogramVec::new(
                HistogramOpts::new(
                    "outbox_relay_commit_to_ack_seconds",
                    "From the event's commit (occurredOn) to the broker's acknowledgement",
                )
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
                &["range"],
            )?,
            stages: HistogramVec::new(
                HistogramOpts::new(
                    "outbox_relay_stage_seconds",
                    "Time an event from the change stream spent in each step, by stage: stream (commit to read by the \
                     relay), queue (read to taken into a batch), to_producer (taken to handed to the producer, \
                     encoding and any wait for its aggregate's events in flight included), broker (handed to \
                     acknowledged), settle (acknowledged to its batch settled: row writes, and the checkpoint when due)",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
                    0.3, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["range", "stage"],
            )?,
            batch_size: HistogramVec::new(
                HistogramOpts::new("outbox_relay_batch_size", "Events taken from the change stream per batch")
                    .buckets(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0]),
                &["range"],
            )?,
            held_back: counter(
                "outbox_relay_held_back_total",
                "Events set aside (held) because an earlier event of their aggregate is unpublished",
            )?,
            leader: igauge("outbox_relay_leader", "1 while this relay holds the range's lease")?,
            epoch: igauge("outbox_relay_epoch", "The fencing epoch of this relay's claim on the range (0: none)")?,
            loop_errors: counter("outbox_relay_loop_errors_total", "Relay loop iterations that failed")?,
            sent_after_wait: counter(
                "outbox_relay_aggregate_waits_total",
                "Events that waited for their aggregate's events in flight on another producer or topic before being sent",
            )?,
            recoveries: IntCounterVec::new(
                ranged(
                    "outbox_relay_stream_recoveries_total",
                    "Times the change stream could not resume and the outbox was rescanned, by reason",
                ),
                &["range", "reason"],
            )?,
            fenced: counter(
                "outbox_relay_fenced_total",
                "Writes refused because a newer relay claimed the range (this relay stepped down)",
            )?,
            cleaned: counter(
                "outbox_relay_history_deleted_total",
                "Published rows deleted after the retention period",
            )?,
            checkpoints: counter("outbox_relay_checkpoints_total", "Checkpoints saved")?,
        };
        let collectors: [Box<dyn Collector>; 23] = [
            Box::new(m.pending.clone()),
            Box::new(m.failed.clone()),
            Box::new(m.failed_by_reason.clone()),
            Box::new(m.held.clone()),
            Box::new(m.dead.clone()),
            Box::new(m.oldest_pending_age.clone()),
            Box::new(m.blocked_aggregates.clone()),
            Box::new(m.max_backoff.clone()),
            Box::new(m.published.clone()),
            Box::new(m.failures.clone()),
            Box::new(m.dead_lettered.clone()),
            Box::new(m.commit_to_ack.clone()),
            Box::new(m.stages.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.held_back.clone()),
            Box::new(m.leader.clone()),
            Box::new(m.epoch.clone()),
            Box::new(m.loop_errors.clone()),
            Box::new(m.sent_after_wait.clone()),
            Box::new(m.recoveries.clone()),
            Box::new(m.fenced.clone()),
            Box::new(m.cleaned.clone()),
            Box::new(m.checkpoints.clone()),
        ];
        for c in collectors {
            r.register(c)?;
        }
        Ok(m)
    }

    /// The handles of one range (labelled `range`); its `leader` series
    /// exists from here on.
    pub fn range(&self, range: &str) -> RangeMetrics {
        let l = [range];
        RangeMetrics {
            range: range.to_owned(),
            families: self.clone(),
            reasons: Default::default(),
            published: self.published.with_label_values(&l),
            dead_lettered: self.dead_lettered.with_label_values(&l),
            commit_to_ack: self.commit_to_ack.with_label_values(&l),
            stages: STAGES.map(|stage| self.stages.with_label_values(&[range, stage])),
            batch_size: self.batch_size.with_label_values(&l),
            held_back: self.held_back.with_label_values(&l),
            leader: self.leader.with_label_values(&l),
            epoch: self.epoch.with_label_values(&l),
            loop_errors: self.loop_errors.with_label_values(&l),
            sent_after_wait: self.sent_after_wait.with_label_values(&l),
            fenced: self.fenced.with_label_values(&l),
            cleaned: self.cleaned.with_label_values(&l),
            checkpoints: self.checkpoints.with_label_values(&l),
        }
    }
}

impl RangeMetrics {
    /// Record the steps of events whose batch was settled at `settled`.
    pub fn observe_stages(&self, events: &[EventStages], settled: Instant) {
        let [stream, queue, to_producer, broker, settle] = &self.stages;
        for e in events {
            let a = &e.arrival;
            if let Some(s) = a.commit_to_read {
                stream.observe(s);
            }
            queue.observe(a.taken.saturating_duration_since(a.read).as_secs_f64());
            to_producer.observe(e.sent.saturating_duration_since(a.taken).as_secs_f64());
            broker.observe(e.answered.saturating_duration_since(e.sent).as_secs_f64());
            settle.observe(settled.saturating_duration_since(e.answered).as_secs_f64());
        }
    }

    pub fn failure(&self, reason: &str) {
        self.families.failures.with_label_values(&[&self.range, reason]).inc();
    }

    pub fn recovery(&self, reason: &str) {
        self.families.recoveries.with_label_values(&[&self.range, reason]).inc();
    }

    pub fn set_stats(&self, s: &OutboxStats) {
        let f = &self.families;
        let l = [self.range.as_str()];
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        f.pending.with_label_values(&l).set(int(s.pending));
        f.failed.with_label_values(&l).set(int(s.failed));
        let mut reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        for gone in reasons.iter().filter(|r| !s.failed_by_reason.contains_key(*r)) {
            let _ = f.failed_by_reason.remove_label_values(&[self.range.as_str(), gone]);
        }
        reasons.clear();
        for (reason, n) in &s.failed_by_reason {
            f.failed_by_reason.with_label_values(&[self.range.as_str(), reason]).set(int(*n));
            reasons.insert(reason.clone());
        }
        f.held.with_label_values(&l).set(int(s.held));
        f.dead.with_label_values(&l).set(int(s.dead));
        f.oldest_pending_age.with_label_values(&l).set(s.oldest_pending_age_seconds.unwrap_or(0.0));
        f.blocked_aggregates.with_label_values(&l).set(int(s.blocked_aggregates));
        f.max_backoff.with_label_values(&l).set(s.max_backoff_ms.unwrap_or(0) as f64 / 1000.0);
    }

    /// This relay no longer publishes the range: its outbox figures go (the
    /// new publisher reports them), its leader and epoch read 0. Counters
    /// stay, as counters do.
    pub fn forget(&self) {
        let f = &self.families;
        let l = [self.range.as_str()];
        let _ = f.pending.remove_label_values(&l);
        let _ = f.failed.remove_label_values(&l);
        for reason in self.reasons.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = f.failed_by_reason.remove_label_values(&[self.range.as_str(), reason]);
        }
        let _ = f.held.remove_label_values(&l);
        let _ = f.dead.remove_label_values(&l);
        let _ = f.oldest_pending_age.remove_label_values(&l);
        let _ = f.blocked_aggregates.remove_label_values(&l);
        let _ = f.max_backoff.remove_label_values(&l);
        self.leader.set(0);
        self.epoch.set(0);
    }
}
