//! The consumer's metrics.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntGaugeVec, Opts, Registry};

use crate::Result;

#[derive(Clone)]
pub struct ConsumerMetrics {
    pub processed: IntCounter,
    pub duplicates: IntCounter,
    pub failures: IntCounter,
    pub dead_lettered: IntCounter,
    pub beyond_horizon: IntCounter,
    pub parked: IntCounter,
    pub parked_aggregates: prometheus::IntGauge,
    pub handler_seconds: Histogram,
    pub batch_size: Histogram,
    pub backoff: Gauge,
    pub in_flight: prometheus::IntGauge,
    pub webhook: super::webhook::DeliveryMetrics,
    pub buffered: prometheus::IntGauge,
    pub waiting: IntGaugeVec,
    pub lag: IntGaugeVec,
}

impl ConsumerMetrics {
    pub fn register(r: &Registry) -> Result<Self> {
        let m = Self {
            processed: IntCounter::new("outbox_consumer_processed_total", "Events applied by the handler")?,
            duplicates: IntCounter::new("outbox_consumer_duplicates_total", "Events skipped as already processed")?,
            failures: IntCounter::new("outbox_consumer_handler_failures_total", "Failed attempts (decode or handler)")?,
            dead_lettered: IntCounter::new(
                "outbox_consumer_dead_lettered_total",
                "Records sent to a dead-letter topic",
            )?,
            beyond_horizon: IntCounter::new(
                "outbox_consumer_beyond_dedup_horizon_total",
                "Records older than the processed-events retention applied anyway (--beyond-dedup-horizon apply)",
            )?,
            parked: IntCounter::new(
                "outbox_consumer_parked_total",
                "Records sent to the dead-letter topic behind an earlier dead-lettered event of their aggregate",
            )?,
            parked_aggregates: prometheus::IntGauge::new(
                "outbox_consumer_parked_aggregates",
                "Aggregates of the group whose events wait in dead-letter topics for a redrive",
            )?,
            handler_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "outbox_consumer_handler_duration_seconds",
                    "Handler latency per call: a batch applied together, or one event handled alone",
                )
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
            )?,
            batch_size: Histogram::with_opts(
                HistogramOpts::new("outbox_consumer_batch_size", "Records per batch taken from the topics")
                    .buckets(vec![1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0]),
            )?,
            backoff: Gauge::new(
                "outbox_consumer_current_backoff_seconds",
                "Backoff of the record being retried, 0 if none",
            )?,
            in_flight: prometheus::IntGauge::new(
                "outbox_consumer_in_flight",
                "Handler calls (webhook deliveries) under way at once",
            )?,
            webhook: super::webhook::DeliveryMetrics {
                deliveries: prometheus::IntCounterVec::new(
                    Opts::new(
                        "outbox_consumer_webhook_deliveries_total",
                        "Webhook requests by the receiver's answer: 2xx, 3xx, 4xx, 5xx, or error (no answer)",
                    ),
                    &["class"],
                )?,
                seconds: Histogram::with_opts(
                    HistogramOpts::new(
                        "outbox_consumer_webhook_duration_seconds",
                        "How long the webhook receiver takes to answer a request",
                    )
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                )?,
            },
            buffered: prometheus::IntGauge::new(
                "outbox_consumer_buffered_records",
                "Records taken from the topics and not done yet (in flight, or queued behind a record of their lane)",
            )?,
            waiting: IntGaugeVec::new(
                Opts::new(
                    "outbox_consumer_waiting",
                    "1 while a record of the partition waits out a transient failure (reason: registry, mongodb, webhook)",
                ),
                &["topic", "partition", "reason"],
            )?,
            lag: IntGaugeVec::new(
                Opts::new("outbox_consumer_lag", "Group lag per partition"),
                &["topic", "partition"],
            )?,
        };
        r.register(Box::new(m.processed.clone()))?;
        r.register(Box::new(m.duplicates.clone()))?;
        r.register(Box::new(m.failures.clone()))?;
        r.register(Box::new(m.dead_lettered.clone()))?;
        r.register(Box::new(m.beyond_horizon.clone()))?;
        r.register(Box::new(m.parked.clone()))?;
        r.register(Box::new(m.parked_aggregates.clone()))?;
        r.register(Box::new(m.handler_seconds.clone()))?;
        r.register(Box::new(m.batch_size.clone()))?;
        r.register(Box::new(m.backoff.clone()))?;
        r.register(Box::new(m.in_flight.clone()))?;
        r.register(Box::new(m.buffered.clone()))?;
        r.register(Box::new(m.webhook.deliveries.clone()))?;
        r.register(Box::new(m.webhook.seconds.clone()))?;
        r.register(Box::new(m.waiting.clone()))?;
        r.register(Box::new(m.lag.clone()))?;
        Ok(m)
    }
}
