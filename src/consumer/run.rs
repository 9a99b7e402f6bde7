//! `outbox consume`'s main loop: fetch, put records in lanes, handle the
//! ready lanes, store offsets below what is not done, pause partitions
//! that hold too much, and report for status and metrics.

use std::time::{Duration, Instant};

use prometheus::{IntGaugeVec, Registry};
use rdkafka::{
    Message,
    consumer::{CommitMode, Consumer},
};

use super::{
    ConsumeArgs, ConsumerMetrics,
    fetch::{consumer, next_batch, pause_at, resume},
    ordering::{Lanes, Tp},
    parked::ParkedAggregates,
    pipeline::{Pipeline, Record, Step, aggregate_of, tp_of},
    report::{self, Counters, MemberReport, MemberReports},
};
use crate::{
    Error, Result,
    kafka::lag::read_group_lag,
    lifecycle::{self, Stop, stopped},
    telemetry,
};

/// Run the consumer until `stop` turns true (tests drive this directly).
pub async fn run_until(args: ConsumeArgs, mut stop: Stop) -> Result<()> {
    let registry = Registry::new();
    let metrics = ConsumerMetrics::register(&registry)?;
    let mut pipeline = Pipeline::new(&args, metrics.clone()).await?;
    let consumer = consumer(&args, &args.group_id)?;
    let topics: Vec<&str> = args.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| Error::Kafka { context: format!("subscribing to {topics:?}"), source })?;

    lifecycle::serve_admin(args.metrics_listen, registry, telemetry::always_ready()).await?;
    tokio::spawn(report_lag(args.clone(), metrics.lag.clone(), stop.clone()));
    tracing::info!(group = %args.group_id, topics = ?args.topics, handler = pipeline.handler.name(), "consumer started");

    let (max, linger) = (args.batch_size as usize, Duration::from_millis(args.linger_ms));
    let mut lanes: Lanes<Record> = Lanes::new(args.ordering, args.buffer_per_partition());
    // A record fetched just after a revocation: taken in the next round, once the revoked partitions are forgotten.
    let mut carried: Option<Record> = None;
    let mut shown = WaitingShown::default();
    let member = args.member();
    let (report_tx, report_rx) = tokio::sync::watch::channel(None);
    let reporter = tokio::spawn(write_reports(
        pipeline.reports.clone(),
        pipeline.parked.clone(),
        pipeline.metrics.parked_aggregates.clone(),
        report_rx,
    ));
    let mut reported: Option<(Instant, Vec<(Tp, &'static str)>)> = None;
    while !stopped(&stop) {
        resume(&consumer, lanes.to_resume());
        // Wake for a waiting lane that is due, or for the next report.
        let report_due = reported.as_ref().map(|(at, _)| *at + report::REPORT_EVERY);
        let wake = lanes.next_due().into_iter().chain(report_due).min();
        let Some(batch) = next_batch(&consumer, max, linger, wake, &mut stop, &mut carried).await else { break };
        for m in batch {
            let (tp, offset) = (tp_of(&m), m.offset());
            let key = aggregate_of(&m).map(str::to_owned);
            lanes.accept(tp, offset, key.as_deref(), m);
        }
        // Revoked partitions (their records of this batch included) come
        // again from the committed offset, to whichever member owns them.
        let revoked = consumer.context().take_revoked();
        if !revoked.is_empty() {
            lanes.revoke(&revoked);
            // A partition paused before and assigned again starts afresh: not paused.
            if let Ok(assigned) = consumer.assignment() {
                let tps: Vec<Tp> = assigned.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
                resume(&consumer, tps.into_iter().filter(|tp| !lanes.is_paused(tp)).collect());
            }
        }
        for (tp, next) in lanes.to_pause() {
            tracing::info!(topic = %tp.0, partition = tp.1, "the partition holds too many records not done; paused");
            pause_at(&consumer, &tp, next);
        }
        let runs = lanes.take_ready(Instant::now());
        if !runs.is_empty() {
            let now = Instant::now();
            for (run, steps) in pipeline.handle(runs).await {
                let results = run.entries.into_iter().zip(steps.iter().map(Step::progress)).collect();
                if let Some(w) = lanes.finish(run.lane, results, now) {
                    tracing::info!(
                        offset = w.offset,
                        aggregate = w.aggregate,
                        reason = w.reason,
                        attempts = w.attempts,
                        "the waiting record is done; its lane flows again"
                    );
                }
            }
            for ((topic, partition), offset) in lanes.committable() {
                if let Err(e) = consumer.store_offset(&topic, partition, offset) {
                    tracing::debug!(error = %e, topic, partition, "storing offset (a partition no longer ours)");
                }
            }
        }
        pipeline.metrics.buffered.set(lanes.open() as i64);
        shown.update(&pipeline.metrics, &lanes);
        // The report for status: every REPORT_EVERY, and at once when a partition starts or stops waiting.
        let waits: Vec<(Tp, &'static str)> = lanes.waiting().into_iter().map(|(tp, w)| (tp, w.reason)).collect();
        if reported.as_ref().is_none_or(|(at, w)| at.elapsed() >= report::REPORT_EVERY || *w != waits) {
            if let Err(e) = pipeline.follow_generation().await {
                tracing::warn!(error = %e, "reading the read model's generation");
            }
            let m = &pipeline.metrics;
            let counters = Counters {
                processed: m.processed.get() as i64,
                duplicates: m.duplicates.get() as i64,
                failures: m.failures.get() as i64,
                dead_lettered: m.dead_lettered.get() as i64,
            };
            let _ = report_tx.send(Some(MemberReport::new(
                &args.group_id,
                &member,
                counters,
                &lanes,
                pipeline.generation(),
            )));
            reported = Some((Instant::now(), waits));
        }
    }
    tracing::info!("consumer stopping: committing stored offsets");
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final commit (nothing new to commit is fine)");
    }
    drop(report_tx);
    let _ = reporter.await;
    if let Err(e) = pipeline.reports.remove(&args.group_id, &member).await {
        tracing::warn!(error = %e, "removing this member's report");
    }
    Ok(())
}

/// Write the newest report whenever there is a new one, in order, until
/// the loop drops its sender; count the group's parked aggregates for the
/// gauge at each.
async fn write_reports(
    reports: MemberReports,
    parked: ParkedAggregates,
    parked_gauge: prometheus::IntGauge,
    mut rx: tokio::sync::watch::Receiver<Option<MemberReport>>,
) {
    while rx.changed().await.is_ok() {
        let report = rx.borrow_and_update().clone();
        if let Some(r) = report
            && let Err(e) = reports.write(&r).await
        {
            tracing::warn!(error = %e, "writing this member's report for status");
        }
        match parked.count().await {
            Ok(n) => parked_gauge.set(n as i64),
            Err(e) => tracing::debug!(error = %e, "counting parked aggregates"),
        }
    }
}

/// The labels of `outbox_consumer_waiting` currently shown, so that a
/// partition that flows again loses its series.
#[derive(Default)]
struct WaitingShown(Vec<[String; 3]>);

impl WaitingShown {
    fn update(&mut self, metrics: &ConsumerMetrics, lanes: &Lanes<Record>) {
        let now: Vec<[String; 3]> =
            lanes.waiting().into_iter().map(|((t, p), w)| [t, p.to_string(), w.reason.to_owned()]).collect();
        for old in &self.0 {
            if !now.contains(old) {
                let _ = metrics.waiting.remove_label_values(&[&old[0], &old[1], &old[2]]);
            }
        }
        for l in &now {
            metrics.waiting.with_label_values(&[&l[0], &l[1], &l[2]]).set(1);
        }
        metrics.backoff.set(lanes.max_backoff().as_secs_f64());
        self.0 = now;
    }
}

async fn report_lag(args: ConsumeArgs, gauge: IntGaugeVec, mut stop: Stop) {
    while !stopped(&stop) {
        match read_group_lag(&args.kafka_bootstrap, &[], &args.group_id, &args.topics, Duration::from_secs(10)).await {
            Ok(lag) => {
                for p in lag.partitions {
                    gauge.with_label_values(&[p.topic.as_str(), &p.partition.to_string()]).set(p.lag);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading group lag"),
        }
        lifecycle::sleep_or_stop(&mut stop, Duration::from_secs(args.lag_interval_seconds.max(1))).await;
    }
}
