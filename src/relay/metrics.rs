//! The relay's metrics. Each counter moves together with the log line of
//! the same event (see `publish_outcome`).

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::{Result, outbox::stats::OutboxStats};

#[derive(Clone)]
pub struct RelayMetrics {
    pub pending: IntGauge,
    pub failed: IntGauge,
    pub held: IntGauge,
    pub dead: IntGauge,
    pub oldest_pending_age: Gauge,
    pub blocked_aggregates: IntGauge,
    pub max_backoff: Gauge,
    pub published: IntCounter,
    pub failures: IntCounterVec,
    pub dead_lettered: IntCounter,
    pub commit_to_ack: Histogram,
    pub batch_size: Histogram,
    pub held_back: IntCounter,
    pub leader: IntGauge,
    pub epoch: IntGauge,
    pub loop_errors: IntCounter,
    pub sent_after_wait: IntCounter,
    pub recoveries: IntCounterVec,
    pub fenced: IntCounter,
    pub cleaned: IntCounter,
    pub checkpoints: IntCounter,
}

impl RelayMetrics {
    pub fn register(r: &Registry) -> Result<Self> {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let m = Self {
            pending: gauge(
                "outbox_relay_pending_events",
                "Events committed after the checkpoint, not yet acknowledged (estimate, see README)",
            )?,
            failed: gauge("outbox_relay_failed_events", "Outbox rows whose last attempt failed (will retry)")?,
            held: gauge(
                "outbox_relay_held_events",
                "Outbox rows waiting behind a failed or dead event of their aggregate",
            )?,
            dead: gauge("outbox_relay_dead_events", "Outbox rows given up after maxAttempts (redrivable)")?,
            oldest_pending_age: Gauge::new(
                "outbox_relay_oldest_pending_age_seconds",
                "Age of the oldest unpublished (pending, failed or held) event",
            )?,
            blocked_aggregates: gauge(
                "outbox_relay_blocked_aggregates",
                "Aggregates with a failed, held or dead event; their later events wait",
            )?,
            max_backoff: Gauge::new("outbox_relay_max_backoff_seconds", "Longest backoff currently scheduled")?,
            published: IntCounter::new("outbox_relay_published_total", "Events published and acknowledged")?,
            failures: IntCounterVec::new(
                Opts::new("outbox_relay_publish_failures_total", "Failed publish attempts, by reason"),
                &["reason"],
            )?,
            dead_lettered: IntCounter::new("outbox_relay_dead_total", "Events that went dead after maxAttempts")?,
            commit_to_ack: Histogram::with_opts(
                HistogramOpts::new(
                    "outbox_relay_commit_to_ack_seconds",
                    "From the event's commit (occurredOn) to the broker's acknowledgement",
                )
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            )?,
            batch_size: Histogram::with_opts(
                HistogramOpts::new("outbox_relay_batch_size", "Events taken from the change stream per batch")
                    .buckets(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0]),
            )?,
            held_back: IntCounter::new(
                "outbox_relay_held_back_total",
                "Events set aside (held) because an earlier event of their aggregate is unpublished",
            )?,
            leader: gauge("outbox_relay_leader", "1 while this relay holds the outbox lease")?,
            epoch: gauge("outbox_relay_epoch", "The fencing epoch of this relay's claim on the outbox (0: none)")?,
            loop_errors: IntCounter::new("outbox_relay_loop_errors_total", "Relay loop iterations that failed")?,
            sent_after_wait: IntCounter::new(
                "outbox_relay_aggregate_waits_total",
                "Events that waited for the acknowledgement of their aggregate's previous event before being sent",
            )?,
            recoveries: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_stream_recoveries_total",
                    "Times the change stream could not resume and the outbox was rescanned, by reason",
                ),
                &["reason"],
            )?,
            fenced: IntCounter::new(
                "outbox_relay_fenced_total",
                "Writes refused because a newer relay claimed the outbox (this relay stepped down)",
            )?,
            cleaned: IntCounter::new(
                "outbox_relay_history_deleted_total",
                "Published rows deleted after the retention period",
            )?,
            checkpoints: IntCounter::new("outbox_relay_checkpoints_total", "Checkpoints saved (one per batch)")?,
        };
        r.register(Box::new(m.pending.clone()))?;
        r.register(Box::new(m.failed.clone()))?;
        r.register(Box::new(m.held.clone()))?;
        r.register(Box::new(m.dead.clone()))?;
        r.register(Box::new(m.oldest_pending_age.clone()))?;
        r.register(Box::new(m.blocked_aggregates.clone()))?;
        r.register(Box::new(m.max_backoff.clone()))?;
        r.register(Box::new(m.published.clone()))?;
        r.register(Box::new(m.failures.clone()))?;
        r.register(Box::new(m.dead_lettered.clone()))?;
        r.register(Box::new(m.commit_to_ack.clone()))?;
        r.register(Box::new(m.batch_size.clone()))?;
        r.register(Box::new(m.held_back.clone()))?;
        r.register(Box::new(m.leader.clone()))?;
        r.register(Box::new(m.epoch.clone()))?;
        r.register(Box::new(m.loop_errors.clone()))?;
        r.register(Box::new(m.sent_after_wait.clone()))?;
        r.register(Box::new(m.recoveries.clone()))?;
        r.register(Box::new(m.fenced.clone()))?;
        r.register(Box::new(m.cleaned.clone()))?;
        r.register(Box::new(m.checkpoints.clone()))?;
        Ok(m)
    }

    pub fn set_stats(&self, s: &OutboxStats) {
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.pending.set(int(s.pending));
        self.failed.set(int(s.failed));
        self.held.set(int(s.held));
        self.dead.set(int(s.dead));
        self.oldest_pending_age.set(s.oldest_pending_age_seconds.unwrap_or(0.0));
        self.blocked_aggregates.set(int(s.blocked_aggregates));
        self.max_backoff.set(s.max_backoff_ms.unwrap_or(0) as f64 / 1000.0);
    }
}
