//! The `EventConsumer` controller: the shared skeleton (`reconcile`) with
//! the consumer's validation, children and observation (the group's lag
//! and the dead-letter topics in Kafka, the processed-events store and the
//! pods' reports in MongoDB).

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::{controller::Action, events::EventType};
use mongodb::bson::DateTime;

use crate::operator::{
    children::{BuildContext, Children, consumer_children, consumer_rebuild_job_name},
    controllers::reconcile::{Context, Observed, ReconcileError, Reconciled, publish_event, reconcile},
    crd::{
        EventConsumer, EventConsumerStatus, ParkedAggregateStatus, PartitionLagStatus, RebuildStatus,
        WaitingRecordStatus,
    },
    probes,
    status::{condition, rfc3339},
};
use crate::{
    consumer::{
        generations::{Generations, RebuildState},
        parked::{ParkedAggregate, ParkedAggregates},
        report::{GroupReport, MemberReports, WaitingRecord},
    },
    processed::ProcessedStore,
};

impl Reconciled for EventConsumer {
    type Status = EventConsumerStatus;
    const PODS: &'static str = "consumer";
    const WORKING: &'static str = "Consuming";

    fn validate(&self) -> Result<(), String> {
        self.spec.validate()
    }

    fn children(&self, build: &BuildContext) -> Children {
        consumer_children(self, build)
    }

    fn paused(&self) -> bool {
        self.spec.paused
    }

    fn previous_conditions(&self) -> &[Condition] {
        self.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default()
    }

    async fn observe(&self, ctx: &Context, ns: &str) -> Observed<EventConsumerStatus> {
        let spec = &self.spec;
        let mut status = EventConsumerStatus::default();
        let mut degraded = None;
        let bootstrap = &spec.kafka.bootstrap_servers;
        // Records on the dead-letter topics: what a group that never reads them lags by.
        let dlq = spec.dead_letter_topics();
        let lag = match probes::kafka_auth(&ctx.client, ns, spec.kafka.auth_secret.as_deref()).await {
            Ok(auth) => probes::group_lag(bootstrap, &auth, &spec.group_id, &spec.topics, &dlq).await,
            Err(cause) => Err(cause),
        };
        if let Err(cause) = probes::webhook_secrets(&ctx.client, ns, &spec.handler).await {
            degraded = Some(cause);
        }
        match lag {
            Ok((l, dead_lettered)) => {
                status.dead_lettered = dead_lettered;
                status.lag = l.total;
                status.partitions = l
                    .partitions
                    .into_iter()
                    .map(|p| PartitionLagStatus {
                        topic: p.topic,
                        partition: p.partition,
                        committed: p.committed,
                        high_watermark: p.high_watermark,
                        lag: p.lag,
                    })
                    .collect();
                status.partition_count = status.partitions.len() as i32;
                status.observed_time = rfc3339(DateTime::now());
            }
            Err(cause) => {
                // The last good reading stays, with its time: Kafka out of reach is not "no lag".
                let previous = self.status.clone().unwrap_or_default();
                status.lag = previous.lag;
                status.dead_lettered = previous.dead_lettered;
                status.partitions = previous.partitions;
                status.partition_count = previous.partition_count;
                status.observed_time = previous.observed_time;
                degraded = degraded.or(Some(cause));
            }
        }
        let group = spec.group_id.clone();
        let stored = ctx
            .probes
            .mongo(&ctx.client, ns, &spec.mongodb, |db| async move {
                // The projection's marks are scoped by its read model's generation.
                let model = Generations::new(&db).state().await?.filter(|s| s.group == group);
                let scope = model.as_ref().map_or(group.as_str(), |m| m.current.scope.as_str());
                let processed = ProcessedStore::new(&db, scope).count().await?;
                let reports = MemberReports::new(&db).fresh(&group, DateTime::now()).await?;
                let parked = ParkedAggregates::new(&db, &group);
                let listed = parked.newest(&[], PARKED_SHOWN).await?;
                Ok((processed, (parked.count().await?, listed), GroupReport::sum(reports), model))
            })
            .await;
        let mut conditions = Vec::new();
        let previous = self.status.clone().unwrap_or_default();
        match stored {
            Ok((processed, (parked, listed), group, model)) => {
                if let Some(m) = model {
                    status.projection_generation = Some(m.current.number);
                    status.rebuild = m.rebuild.map(|r| rebuild_status(&r, consumer_rebuild_job_name(self)));
                }
                status.processed = processed as i64;
                status.parked_aggregates = parked as i64;
                status.parked = listed.into_iter().map(parked_status).collect();
                status.duplicates_skipped = group.counters.duplicates;
                status.failed = group.counters.failures;
                status.current_backoff_seconds = group.backoff_seconds;
                status.reporting_members = group.members as i32;
                let (waits, reason, message) = group.waiting_condition();
                conditions.push(condition(
                    self.previous_conditions(),
                    "PartitionsWaiting",
                    waits,
                    reason,
                    message,
                    self.metadata.generation,
                ));
                let record = |(member, w): (String, WaitingRecord)| WaitingRecordStatus {
                    topic: w.topic,
                    partition: w.partition,
                    offset: w.offset,
                    reason: w.reason,
                    attempts: w.attempts,
                    since: rfc3339(w.since),
                    error: w.error,
                    member,
                    aggregate: w.aggregate,
                    queued: w.queued,
                };
                status.waiting_partitions = group.waiting.into_iter().map(record).collect();
                status.waiting_aggregates = group.waiting_aggregates.into_iter().map(record).collect();
                status.waiting = status.waiting_partitions.len() as i32;
                self.record_new_parked_aggregates(ctx, &previous, &status).await;
            }
            Err(cause) => {
                // The last good reading stays: an outage of MongoDB is not "nothing parked".
                status.processed = previous.processed;
                status.parked_aggregates = previous.parked_aggregates;
                status.parked = previous.parked;
                degraded = degraded.or(Some(cause));
            }
        }
        Observed { status, degraded, conditions }
    }
}

impl EventConsumer {
    /// A Warning Event when more aggregates are parked than at the last
    /// good reading, naming the newest.
    async fn record_new_parked_aggregates(
        &self,
        ctx: &Context,
        previous: &EventConsumerStatus,
        now: &EventConsumerStatus,
    ) {
        if now.parked_aggregates <= previous.parked_aggregates {
            return;
        }
        let newest = now.parked.first().map_or_else(String::new, |p| {
            format!(
                "; newest: {} (event {}): {}",
                p.aggregate_id,
                p.event_id.as_deref().unwrap_or("-"),
                p.error.as_deref().unwrap_or("-")
            )
        });
        let note = format!(
            "{} more aggregate(s) parked behind a dead-lettered event, {} in all{newest}",
            now.parked_aggregates - previous.parked_aggregates,
            now.parked_aggregates
        );
        publish_event(ctx, self, EventType::Warning, "AggregatesParked", &note, "Observe").await;
    }
}

/// Parked aggregates listed in status.
const PARKED_SHOWN: i64 = 10;

fn parked_status(p: ParkedAggregate) -> ParkedAggregateStatus {
    ParkedAggregateStatus {
        aggregate_id: p.aggregate_id,
        event_id: p.first_event_id,
        error: p.error.filter(|e| !e.is_empty()),
        events: p.events.len() as i64,
        since: rfc3339(p.since),
    }
}

/// A rebuild's saved state as status.
fn rebuild_status(r: &RebuildState, job: Option<String>) -> RebuildStatus {
    let (done, total) = r.progress();
    RebuildStatus {
        job,
        generation: r.generation.number,
        phase: r.phase.as_str().to_owned(),
        progress_percent: r.percent(),
        records_done: done,
        records_total: total,
        started_at: rfc3339(r.started_at).unwrap_or_default(),
        updated_at: rfc3339(r.updated_at).unwrap_or_default(),
        error: r.error.clone(),
    }
}

pub async fn reconcile_consumer(c: Arc<EventConsumer>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    reconcile(c, ctx).await
}
