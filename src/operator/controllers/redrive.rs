//! The controller of `OutboxRedrive` requests. A request is checked (a bad
//! one ends `Failed` and changes nothing), started once, and followed to
//! its end; Events on the request mark its start and end. The user who
//! creates a request needs no database or Kafka credentials: the operator
//! reaches MongoDB as the status probes do (the target's Secret), and a
//! consumer's redrive runs in a Job with the consumer's own pod.
//!
//! - OutboxRelay: the selected rows are marked once with the request's uid
//!   (`Pending` -> `Running`) and followed from the rows until the relay
//!   has carried them all out (`Completed`), or some went dead again
//!   (`Failed`).
//! - EventConsumer, redrive: a Job replays the dead-letter topics and saves
//!   its counts under the request's uid; the request ends with the Job.
//! - EventConsumer, discard: the parked aggregates' events are recorded as
//!   processed with who and why, at once.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::batch::v1::Job;
use kube::{
    Api, ResourceExt,
    runtime::{controller::Action, events::EventType},
};
use mongodb::bson::DateTime;

use crate::operator::{
    children::{owner, redrive_job},
    controllers::reconcile::{Context, ReconcileError, create_once, publish_event, write_status_of},
    crd::redrive::{ConsumerRequest, OutboxRedrive, OutboxRedriveStatus, RedrivePhase, RedriveTargetKind},
    crd::{EventConsumer, OutboxRelay},
    status::rfc3339,
};
use crate::{
    consumer::requests::{RequestLog, RequestRecord, RequestState, discard_parked},
    outbox::{Outbox, requests::RequestProgress},
};

/// How often a running request is followed.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(3);

#[tracing::instrument(skip_all, fields(otel.name = "reconcile OutboxRedrive", kind = "OutboxRedrive",
    namespace = r.namespace().as_deref(), name = %r.name_any()))]
pub async fn reconcile_redrive(r: Arc<OutboxRedrive>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let previous = r.status.clone().unwrap_or_default();
    if matches!(previous.phase, Some(RedrivePhase::Completed | RedrivePhase::Failed)) {
        return Ok(Action::await_change());
    }
    let status = match r.spec.target.kind {
        RedriveTargetKind::OutboxRelay => relay_request(&r, &ctx, &previous).await?,
        RedriveTargetKind::EventConsumer => consumer_request(&r, &ctx, &previous).await?,
    };
    let Some(status) = status else { return Ok(Action::requeue(FOLLOW_EVERY * 3)) };
    report(&r, &ctx, &previous, status).await
}

/// Write the request's new status, with an Event when it starts, ends or
/// is refused.
async fn report(
    r: &OutboxRedrive,
    ctx: &Context,
    previous: &OutboxRedriveStatus,
    status: OutboxRedriveStatus,
) -> Result<Action, ReconcileError> {
    let started = previous.start_time.is_none() && status.start_time.is_some();
    if started {
        let target = format!("{:?} {}", r.spec.target.kind, r.spec.target.name);
        let note = match &status.job {
            Some(job) => format!("{:?} of {target}'s dead-lettered events started in Job {job}", r.spec.action),
            None => format!("{:?} of {} event(s) of {target} started", r.spec.action, status.matched),
        };
        publish_event(ctx, r, EventType::Normal, "Started", &note, "Redrive").await;
    }
    let ended = matches!(status.phase, Some(RedrivePhase::Completed | RedrivePhase::Failed));
    if ended {
        let message = status.message.as_deref().unwrap_or_default();
        let (kind, reason) = match (status.phase, status.start_time.is_some()) {
            (Some(RedrivePhase::Completed), _) => (EventType::Normal, "Completed"),
            (_, true) => (EventType::Warning, "Failed"),
            (_, false) => (EventType::Warning, "Invalid"),
        };
        publish_event(ctx, r, kind, reason, message, "Redrive").await;
    }
    write_status_of(ctx, r, serde_json::to_value(&status).expect("status serializes")).await?;
    Ok(if ended { Action::await_change() } else { Action::requeue(FOLLOW_EVERY) })
}

/// A request that cannot run: Failed, saying why; nothing was changed.
fn refused(previous: &OutboxRedriveStatus, why: String) -> OutboxRedriveStatus {
    OutboxRedriveStatus {
        phase: Some(RedrivePhase::Failed),
        message: Some(format!("{why}; nothing was changed")),
        completion_time: rfc3339(DateTime::now()),
        ..previous.clone()
    }
}

/// Still waiting for the target's MongoDB.
async fn waiting_for_mongodb(
    r: &OutboxRedrive,
    ctx: &Context,
    previous: &OutboxRedriveStatus,
    cause: crate::operator::status::Cause,
) -> Result<Option<OutboxRedriveStatus>, ReconcileError> {
    let status = OutboxRedriveStatus {
        phase: Some(previous.phase.unwrap_or(RedrivePhase::Pending)),
        message: Some(format!("waiting for MongoDB: {}: {}", cause.reason, cause.message)),
        ..previous.clone()
    };
    write_status_of(ctx, r, serde_json::to_value(&status).expect("status serializes")).await?;
    Ok(None)
}

/// An OutboxRelay's events: marked once, followed from the rows.
async fn relay_request(
    r: &OutboxRedrive,
    ctx: &Context,
    previous: &OutboxRedriveStatus,
) -> Result<Option<OutboxRedriveStatus>, ReconcileError> {
    let ns = r.namespace().unwrap_or_default();
    let relays: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(relay) = relays.get_opt(&r.spec.target.name).await? else {
        return Ok(Some(refused(previous, format!("OutboxRelay {ns}/{} not found", r.spec.target.name))));
    };
    let (selection, action) = match r.spec.to_request(&ns, &r.name_any()) {
        Ok(request) => request,
        Err(why) => return Ok(Some(refused(previous, why))),
    };
    let uid = r.uid().unwrap_or_default();
    let collection = relay.spec.mongodb.collection.clone();
    let starting = previous.start_time.is_none();
    let probed = ctx
        .probes
        .mongo(&ctx.client, &ns, &relay.spec.mongodb, |db| async move {
            let outbox = Outbox::new(&db, &collection);
            if starting {
                outbox.mark_for_request(&selection, &action, &uid, DateTime::now()).await?;
            }
            outbox.request_progress(&uid).await
        })
        .await;
    match probed {
        Ok(progress) => Ok(Some(follow(previous, &progress, relay.spec.paused, DateTime::now()))),
        Err(cause) => waiting_for_mongodb(r, ctx, previous, cause).await,
    }
}

/// The request's status from where its rows are.
fn follow(previous: &OutboxRedriveStatus, p: &RequestProgress, paused: bool, now: DateTime) -> OutboxRedriveStatus {
    let phase = match (p.waiting, p.dead) {
        (0, 0) => RedrivePhase::Completed,
        (0, _) => RedrivePhase::Failed,
        _ => RedrivePhase::Running,
    };
    let message = match phase {
        RedrivePhase::Completed if p.matched == 0 => "no event matched the selection".to_owned(),
        RedrivePhase::Completed => format!("{} event(s) carried out", p.done()),
        RedrivePhase::Failed => format!(
            "{} of {} event(s) went dead again (see the OutboxRelay's status.deadEvents); create a new request once \
             the cause is fixed",
            p.dead, p.matched
        ),
        _ if paused => format!("{} event(s) wait: the OutboxRelay is paused", p.waiting),
        _ => format!("{} event(s) wait for the relay", p.waiting),
    };
    let ended = phase != RedrivePhase::Running;
    OutboxRedriveStatus {
        phase: Some(phase),
        matched: p.matched as i64,
        done: p.done() as i64,
        waiting: p.waiting as i64,
        errors: p.dead as i64,
        message: Some(message),
        start_time: previous.start_time.clone().or_else(|| rfc3339(now)),
        completion_time: if ended { rfc3339(now) } else { None },
        job: None,
    }
}

/// An EventConsumer's dead-lettered events: a discard at once, a redrive
/// in a Job.
async fn consumer_request(
    r: &OutboxRedrive,
    ctx: &Context,
    previous: &OutboxRedriveStatus,
) -> Result<Option<OutboxRedriveStatus>, ReconcileError> {
    let ns = r.namespace().unwrap_or_default();
    let consumers: Api<EventConsumer> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(consumer) = consumers.get_opt(&r.spec.target.name).await? else {
        return Ok(Some(refused(previous, format!("EventConsumer {ns}/{} not found", r.spec.target.name))));
    };
    let request = match r.spec.to_consumer_request(&ns, &r.name_any()) {
        Ok(request) => request,
        Err(why) => return Ok(Some(refused(previous, why))),
    };
    let now = DateTime::now();
    let group = consumer.spec.group_id.clone();
    match request {
        ConsumerRequest::Discard { by, reason, aggregates } => {
            let discarded = ctx
                .probes
                .mongo(&ctx.client, &ns, &consumer.spec.mongodb, |db| async move {
                    discard_parked(&db, &group, &aggregates, &by, &reason).await
                })
                .await;
            let d = match discarded {
                Ok(d) => d,
                Err(cause) => return waiting_for_mongodb(r, ctx, previous, cause).await,
            };
            let message = if d.aggregates == 0 {
                "no parked aggregate matched the selection".to_owned()
            } else {
                format!("{} event(s) of {} parked aggregate(s) discarded; they flow again", d.events, d.aggregates)
            };
            Ok(Some(OutboxRedriveStatus {
                phase: Some(RedrivePhase::Completed),
                matched: d.events as i64,
                done: d.events as i64,
                message: Some(message),
                start_time: rfc3339(now),
                completion_time: rfc3339(now),
                ..previous.clone()
            }))
        }
        ConsumerRequest::Redrive => {
            let job = redrive_job(&consumer, &ctx.build, &owner(r));
            let job_name = job.name_any();
            if previous.start_time.is_none() {
                create_once(&ctx.client, &ns, &job).await?;
            }
            let uid = r.uid().unwrap_or_default();
            let read = ctx
                .probes
                .mongo(&ctx.client, &ns, &consumer.spec.mongodb, |db| async move { RequestLog::read(&db, &uid).await })
                .await;
            let record = match read {
                Ok(record) => record,
                Err(cause) => return waiting_for_mongodb(r, ctx, previous, cause).await,
            };
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
            let job_state = jobs.get_opt(&job_name).await?.map(|j| job_failure(&j));
            let topics = consumer.spec.dead_letter_topics();
            Ok(Some(follow_job(previous, &job_name, &topics, record.as_ref(), job_state, now)))
        }
    }
}

/// Why a Job failed, if it did (`Some(None)`: it has not).
fn job_failure(job: &Job) -> Option<String> {
    let conditions = job.status.as_ref().and_then(|s| s.conditions.as_ref())?;
    conditions
        .iter()
        .find(|c| c.type_ == "Failed" && c.status == "True")
        .map(|c| format!("{}: {}", c.reason.as_deref().unwrap_or("Failed"), c.message.as_deref().unwrap_or_default()))
}

/// A consumer redrive's status from its Job's record and the Job.
/// `job`: None when the Job is gone, Some(Some(why)) when it failed.
fn follow_job(
    previous: &OutboxRedriveStatus,
    job_name: &str,
    topics: &[String],
    record: Option<&RequestRecord>,
    job: Option<Option<String>>,
    now: DateTime,
) -> OutboxRedriveStatus {
    let (phase, message) = match (record.map(|r| r.state), &job) {
        (Some(RequestState::Completed), _) => {
            let r = record.expect("a record");
            if r.dead_lettered > 0 {
                let again: Vec<String> = topics.iter().map(|t| format!("{t}.redrive")).collect();
                (
                    RedrivePhase::Failed,
                    format!(
                        "{} of {} record(s) failed again and were dead-lettered to {} (their aggregates stay parked)",
                        r.dead_lettered,
                        r.records,
                        again.join(", ")
                    ),
                )
            } else if r.records == 0 {
                (RedrivePhase::Completed, format!("no record to replay on {}", topics.join(", ")))
            } else {
                (
                    RedrivePhase::Completed,
                    format!(
                        "{} record(s) replayed: {} applied, {} applied already",
                        r.records, r.applied, r.duplicates
                    ),
                )
            }
        }
        (_, Some(Some(why))) => (RedrivePhase::Failed, format!("Job {job_name} failed ({why}); see its pods' logs")),
        (_, None) if previous.start_time.is_some() => {
            (RedrivePhase::Failed, format!("Job {job_name} is gone before the redrive ended"))
        }
        (Some(_), _) => (RedrivePhase::Running, format!("replaying {} in Job {job_name}", topics.join(", "))),
        (None, _) => (RedrivePhase::Running, format!("Job {job_name} is starting")),
    };
    let ended = phase != RedrivePhase::Running;
    OutboxRedriveStatus {
        phase: Some(phase),
        matched: record.map_or(0, |r| r.records),
        done: record.map_or(0, RequestRecord::done),
        waiting: 0,
        errors: record.map_or(0, |r| r.dead_lettered),
        message: Some(message),
        start_time: previous.start_time.clone().or_else(|| rfc3339(now)),
        completion_time: if ended { rfc3339(now) } else { None },
        job: Some(job_name.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(matched: u64, waiting: u64, dead: u64) -> RequestProgress {
        RequestProgress { matched, waiting, dead, discarded: 0 }
    }

    #[test]
    fn a_request_runs_while_events_wait_and_ends_by_what_became_of_them() {
        let now = DateTime::from_millis(1_700_000_000_000);
        let start = OutboxRedriveStatus::default();
        let running = follow(&start, &progress(5, 2, 0), false, now);
        assert_eq!((running.phase, running.done, running.waiting), (Some(RedrivePhase::Running), 3, 2));
        assert!(running.start_time.is_some() && running.completion_time.is_none());
        let later = DateTime::from_millis(1_700_000_060_000);
        let done = follow(&running, &progress(5, 0, 0), false, later);
        assert_eq!((done.phase, done.done), (Some(RedrivePhase::Completed), 5));
        assert_eq!(done.start_time, running.start_time, "the start is kept");
        assert!(done.completion_time.is_some());
        let failed = follow(&running, &progress(5, 0, 1), false, later);
        assert_eq!((failed.phase, failed.errors, failed.done), (Some(RedrivePhase::Failed), 1, 4));
        let nothing = follow(&start, &progress(0, 0, 0), false, now);
        assert_eq!(nothing.phase, Some(RedrivePhase::Completed));
        assert!(follow(&start, &progress(2, 2, 0), true, now).message.unwrap().contains("paused"));
    }

    fn record(state: RequestState, records: i64, applied: i64, dead_lettered: i64) -> RequestRecord {
        RequestRecord {
            id: "uid".into(),
            group: "g".into(),
            state,
            records,
            applied,
            duplicates: records - applied - dead_lettered,
            dead_lettered,
            error: None,
            updated_at: DateTime::from_millis(0),
        }
    }

    #[test]
    fn a_consumer_redrive_follows_its_job_and_ends_with_it() {
        let now = DateTime::from_millis(1_700_000_000_000);
        let topics = ["orders.dlq".to_owned()];
        let start = OutboxRedriveStatus::default();
        let starting = follow_job(&start, "j", &topics, None, Some(None), now);
        assert_eq!(starting.phase, Some(RedrivePhase::Running));
        assert_eq!(starting.job.as_deref(), Some("j"));
        let running = record(RequestState::Running, 4, 3, 0);
        let going = follow_job(&starting, "j", &topics, Some(&running), Some(None), now);
        assert_eq!((going.phase, going.matched, going.done), (Some(RedrivePhase::Running), 4, 4));
        assert_eq!(going.start_time, starting.start_time);
        let done = follow_job(&going, "j", &topics, Some(&record(RequestState::Completed, 6, 6, 0)), Some(None), now);
        assert_eq!((done.phase, done.done, done.errors), (Some(RedrivePhase::Completed), 6, 0));
        assert!(done.completion_time.is_some());
        let again = follow_job(&going, "j", &topics, Some(&record(RequestState::Completed, 6, 4, 2)), Some(None), now);
        assert_eq!((again.phase, again.errors), (Some(RedrivePhase::Failed), 2));
        assert!(again.message.unwrap().contains("orders.dlq.redrive"));
        let failed =
            follow_job(&going, "j", &topics, Some(&running), Some(Some("BackoffLimitExceeded: x".into())), now);
        assert_eq!(failed.phase, Some(RedrivePhase::Failed));
        let gone = follow_job(&going, "j", &topics, Some(&running), None, now);
        assert!(gone.message.unwrap().contains("gone"));
    }
}
