//! The controller of `OutboxRedrive` requests: a request is checked (a bad
//! one ends `Failed` and changes nothing), then its events are marked in
//! the target's outbox once, with the request's uid (`Pending` ->
//! `Running`), and followed from the rows until the relay has carried them
//! all out (`Completed`), or some went dead again (`Failed`). It connects
//! to MongoDB as the status probes do (the target's Secret); the user who
//! creates the request needs no database credentials. Events on the request
//! mark its start and end.

use std::{sync::Arc, time::Duration};

use kube::{
    Api, ResourceExt,
    runtime::{controller::Action, events::EventType},
};
use mongodb::bson::DateTime;

use super::{
    crd::OutboxRelay,
    reconcile::{Context, ReconcileError, publish_event, write_status_of},
    redrive_crd::{OutboxRedrive, OutboxRedriveStatus, RedrivePhase},
    status::rfc3339,
};
use crate::outbox::{Outbox, requests::RequestProgress};

/// How often a running request is followed.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(3);

#[tracing::instrument(skip_all, fields(otel.name = "reconcile OutboxRedrive", kind = "OutboxRedrive",
    namespace = r.namespace().as_deref(), name = %r.name_any()))]
pub async fn reconcile_redrive(r: Arc<OutboxRedrive>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let previous = r.status.clone().unwrap_or_default();
    if matches!(previous.phase, Some(RedrivePhase::Completed | RedrivePhase::Failed)) {
        return Ok(Action::await_change());
    }
    let ns = r.namespace().unwrap_or_default();
    let name = r.name_any();
    let relays: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), &ns);
    let relay = relays.get_opt(&r.spec.target.name).await?;
    let checked = match (&relay, r.spec.to_request(&ns, &name)) {
        (None, _) => Err(format!("OutboxRelay {ns}/{} not found; nothing was changed", r.spec.target.name)),
        (Some(_), Err(why)) => Err(format!("{why}; nothing was changed")),
        (Some(relay), Ok(request)) => Ok((relay, request)),
    };
    let (relay, (selection, action)) = match checked {
        Ok(c) => c,
        Err(message) => {
            let status = OutboxRedriveStatus {
                phase: Some(RedrivePhase::Failed),
                message: Some(message.clone()),
                completion_time: rfc3339(DateTime::now()),
                ..previous
            };
            write_status_of(&ctx, r.as_ref(), serde_json::to_value(&status).expect("status serializes")).await?;
            publish_event(&ctx, r.as_ref(), EventType::Warning, "Invalid", &message, "Redrive").await;
            return Ok(Action::await_change());
        }
    };
    let uid = r.uid().unwrap_or_default();
    let collection = relay.spec.mongodb.collection.clone();
    let starting = previous.phase.is_none() || previous.phase == Some(RedrivePhase::Pending);
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
    let progress = match probed {
        Ok(p) => p,
        Err(cause) => {
            let status = OutboxRedriveStatus {
                phase: Some(previous.phase.unwrap_or(RedrivePhase::Pending)),
                message: Some(format!("waiting for the outbox: {}: {}", cause.reason, cause.message)),
                ..previous
            };
            write_status_of(&ctx, r.as_ref(), serde_json::to_value(&status).expect("status serializes")).await?;
            return Ok(Action::requeue(FOLLOW_EVERY * 3));
        }
    };
    let now = DateTime::now();
    let status = follow(&previous, &progress, relay.spec.paused, now);
    if starting {
        let note =
            format!("{:?} of {} event(s) of OutboxRelay {} started", r.spec.action, progress.matched, relay.name_any());
        publish_event(&ctx, r.as_ref(), EventType::Normal, "Started", &note, "Redrive").await;
    }
    let ended = matches!(status.phase, Some(RedrivePhase::Completed | RedrivePhase::Failed));
    if ended {
        let (kind, reason) = match status.phase {
            Some(RedrivePhase::Completed) => (EventType::Normal, "Completed"),
            _ => (EventType::Warning, "Failed"),
        };
        publish_event(&ctx, r.as_ref(), kind, reason, status.message.as_deref().unwrap_or_default(), "Redrive").await;
    }
    write_status_of(&ctx, r.as_ref(), serde_json::to_value(&status).expect("status serializes")).await?;
    Ok(if ended { Action::await_change() } else { Action::requeue(FOLLOW_EVERY) })
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
}
