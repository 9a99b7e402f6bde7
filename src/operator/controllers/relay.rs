//! The `OutboxRelay` controller: the shared skeleton (`reconcile`) with the
//! relay's validation, children and observation (the outbox itself in
//! MongoDB, the registry's view of the relay's schemas), plus the
//! finalizer that removes the relay's Lease once its pods are gone.

use std::sync::Arc;

use k8s_openapi::{api::apps::v1::Deployment, apimachinery::pkg::apis::meta::v1::Condition};
use kube::{
    Api, ResourceExt,
    api::DeleteParams,
    runtime::{
        controller::Action,
        events::EventType,
        finalizer::{Event as Finalizer, finalizer},
    },
};
use mongodb::bson::DateTime;

use crate::operator::{
    children::{BuildContext, Children, relay_children, relay_ranges},
    controllers::reconcile::{Context, Observed, ReconcileError, Reconciled, pods_left, publish_event, reconcile},
    crd::{DeadEventStatus, OutboxRelay, OutboxRelayStatus, RangeStatus},
    probes,
    status::{Cause, age, condition, condition_of, rfc3339},
};
use crate::{
    kafka::topics::{EventTopicMapper, TopicRule},
    lease::range_lease_name,
    outbox::{Outbox, bucket::BucketRange, checkpoint::Checkpoint, requests::DeadEvent, stats::OutboxStats},
};

/// Held on an `OutboxRelay` until the relay's Lease (which it does not own,
/// so garbage collection would leave it) is deleted.
pub const RELAY_FINALIZER: &str = "outbox.dev/relay-lease";

impl Reconciled for OutboxRelay {
    type Status = OutboxRelayStatus;
    const PODS: &'static str = "relay";
    const WORKING: &'static str = "Publishing";

    fn validate(&self) -> Result<(), String> {
        self.spec.validate()
    }

    fn children(&self, build: &BuildContext) -> Children {
        relay_children(self, build)
    }

    fn paused(&self) -> bool {
        self.spec.paused
    }

    fn previous_conditions(&self) -> &[Condition] {
        self.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default()
    }

    /// One OutboxRelay per outbox: an older one in this namespace on the same
    /// MongoDB Secret, database and collection keeps it; this one builds no
    /// pods and says which. (Across namespaces the relays' checkpoint claim
    /// refuses a second lease; `observe` reports that.)
    async fn conflict(&self, ctx: &Context, ns: &str) -> Option<Cause> {
        let api: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), ns);
        let others = match api.list(&Default::default()).await {
            Ok(list) => list.items,
            Err(e) => {
                tracing::warn!(error = %e, "listing OutboxRelays for the one-per-outbox check");
                return None;
            }
        };
        let key = |r: &OutboxRelay| (r.metadata.creation_timestamp.clone().map(|t| t.0), r.name_any());
        let m = &self.spec.mongodb;
        let first = others
            .iter()
            .filter(|o| o.name_any() != self.name_any() && o.metadata.deletion_timestamp.is_none())
            .filter(|o| {
                let om = &o.spec.mongodb;
                om.database == m.database && om.collection == m.collection && om.uri_secret == m.uri_secret
            })
            .filter(|o| key(o) < key(self))
            .min_by_key(|o| key(o))?;
        Some(Cause::new(
            "OutboxInUse",
            format!(
                "outbox {}.{} (Secret {}) is already relayed by OutboxRelay {}; one OutboxRelay per outbox, so this \
                 one builds no pods until that one is deleted or this one points elsewhere",
                m.database,
                m.collection,
                m.uri_secret.name,
                first.name_any()
            ),
        ))
    }

    async fn observe(&self, ctx: &Context, ns: &str) -> Observed<OutboxRelayStatus> {
        let mut status: OutboxRelayStatus;
        let mut stream = None;
        let collection = self.spec.mongodb.collection.clone();
        let ranges = relay_ranges(&self.spec);
        let probed = ranges.clone();
        let now = DateTime::now();
        let stats = ctx
            .probes
            .mongo(&ctx.client, ns, &self.spec.mongodb, |db| async move {
                let outbox = Outbox::new(&db, &collection);
                let stats = futures::future::try_join_all(probed.iter().map(|r| {
                    let outbox = outbox.in_range(*r);
                    async move { outbox.stats(now).await }
                }));
                futures::try_join!(stats, outbox.newest_dead(DEAD_EVENTS_SHOWN))
            })
            .await;
        let previous = self.status.clone().unwrap_or_default();
        let degraded = match stats {
            Ok((stats, dead)) => {
                status = totals(&ranges, &stats);
                status.dead_events = dead.into_iter().map(dead_event_status).collect();
                status.observed_time = rfc3339(now);
                self.record_new_dead_events(ctx, &previous, &status).await;
                // The latest recovery of any range, else any range's checkpoint.
                let checkpoints = || stats.iter().filter_map(|s| s.checkpoint.as_ref());
                let latest = checkpoints()
                    .filter(|c| c.recovery.is_some())
                    .max_by_key(|c| c.recovery.as_ref().map(|r| r.1))
                    .or(checkpoints().next());
                stream = latest.and_then(|c| stream_condition(self.previous_conditions(), c, self.metadata.generation));
                ranges.iter().zip(&stats).find_map(|(range, s)| self.other_lease(ns, range, s.checkpoint.as_ref()?))
            }
            Err(cause) => {
                // The last good reading stays, dated by its observedTime.
                status = OutboxRelayStatus { conditions: Vec::new(), ..previous };
                Some(cause)
            }
        };
        let schemas = self.schemas_condition(ctx, ns).await;
        let mut conditions = vec![schemas];
        if let Some(c) = stream.as_ref().filter(|c| c.status == "True")
            && condition_of(self.previous_conditions(), "StreamRecovered").is_none_or(|p| p.message != c.message)
        {
            publish_event(ctx, self, EventType::Warning, "StreamRecovered", &c.message, "Observe").await;
        }
        conditions.extend(stream);
        Observed { status, degraded, conditions }
    }
}

/// Dead events listed in status.
const DEAD_EVENTS_SHOWN: i64 = 10;

fn dead_event_status(d: DeadEvent) -> DeadEventStatus {
    DeadEventStatus {
        id: d.id,
        aggregate_id: Some(d.aggregate_id).filter(|a| !a.is_empty()),
        event_name: Some(d.event_name).filter(|e| !e.is_empty()),
        attempts: d.attempts,
        last_error: Some(d.last_error.chars().take(300).collect::<String>()).filter(|e| !e.is_empty()),
        since: d.since.and_then(rfc3339),
    }
}

impl OutboxRelay {
    /// A Warning Event when more events are dead than at the last good
    /// reading (a failed reading keeps the one before, so an outage of
    /// MongoDB never passes for new dead events), naming the newest.
    async fn record_new_dead_events(&self, ctx: &Context, previous: &OutboxRelayStatus, now: &OutboxRelayStatus) {
        if now.dead <= previous.dead {
            return;
        }
        let newest = now.dead_events.first().map_or_else(String::new, |d| {
            let text = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            format!(
                "; newest: {} ({} of aggregate {}): {}",
                d.id,
                text(&d.event_name),
                text(&d.aggregate_id),
                text(&d.last_error)
            )
        });
        let note = format!("{} more event(s) dead, {} in all{newest}", now.dead - previous.dead, now.dead);
        publish_event(ctx, self, EventType::Warning, "EventsDead", &note, "Observe").await;
    }
}

/// The status figures of an outbox from its ranges' stats: each range with
/// its publisher (the holder of its checkpoint's claim) and figures, and
/// the totals (sums; the oldest age and the longest backoff over all).
fn totals(ranges: &[BucketRange], stats: &[OutboxStats]) -> OutboxRelayStatus {
    let mut status = OutboxRelayStatus::default();
    let owner = |s: &OutboxStats| s.checkpoint.as_ref().and_then(|c| c.holder.clone()).filter(|h| !h.is_empty());
    for (range, s) in ranges.iter().zip(stats) {
        status.pending += s.pending as i64;
        status.failed += s.failed as i64;
        for (reason, n) in &s.failed_by_reason {
            *status.failed_by_reason.entry(reason.clone()).or_default() += *n as i64;
        }
        status.held += s.held as i64;
        status.dead += s.dead as i64;
        status.blocked_aggregates += s.blocked_aggregates as i64;
        status.ranges.push(RangeStatus {
            range: range.label(),
            owner: owner(s),
            pending: s.pending as i64,
            failed: s.failed as i64,
            oldest_pending_age: s.oldest_pending_age_seconds.map(age),
        });
    }
    let oldest = stats.iter().filter_map(|s| s.oldest_pending_age_seconds).reduce(f64::max);
    status.oldest_pending_age = oldest.map(age);
    status.next_retry_time = stats.iter().filter_map(|s| s.next_retry_at).min().and_then(rfc3339);
    status.current_max_backoff_seconds =
        stats.iter().filter_map(|s| s.max_backoff_ms).max().map(|ms| ms as f64 / 1000.0);
    status.last_published_time = stats.iter().filter_map(|s| s.last_published_at).max().and_then(rfc3339);
    status.owned_ranges = status.ranges.iter().filter(|r| r.owner.is_some()).count() as i32;
    let mut owners: Vec<String> = status.ranges.iter().filter_map(|r| r.owner.clone()).collect();
    owners.sort();
    owners.dedup();
    status.active_relay = (!owners.is_empty()).then(|| owners.join(","));
    status
}

/// `StreamRecovered`: whether the relay ever had to replace the change
/// stream by a rescan of the outbox (first start on an outbox, or a resume
/// position gone from the oplog), when, and how many rows it republished.
fn stream_condition(previous: &[Condition], c: &Checkpoint, generation: Option<i64>) -> Option<Condition> {
    c.position_time()?;
    Some(match &c.recovery {
        Some((reason, at, rows)) => condition(
            previous,
            "StreamRecovered",
            true,
            reason,
            format!(
                "at {} the relay could not resume the change stream ({reason}) and republished {rows} unconfirmed \
                 row(s) from the outbox: duplicates are possible, nothing was lost",
                rfc3339(*at).unwrap_or_default()
            ),
            generation,
        ),
        None => condition(
            previous,
            "StreamRecovered",
            false,
            "Resumed",
            "the relay has resumed the change stream from its checkpoint".into(),
            generation,
        ),
    })
}

impl OutboxRelay {
    /// Whether a range of the outbox is claimed by a relay holding another
    /// lease than this resource's pods (another namespace, or a relay outside the
    /// cluster): those pods then stay standby.
    fn other_lease(&self, ns: &str, range: &BucketRange, c: &Checkpoint) -> Option<Cause> {
        let ours = format!(
            "Kubernetes Lease {ns}/{}",
            range_lease_name(&self.spec.mongodb.database, &self.spec.mongodb.collection, range)
        );
        let theirs = c.lease.as_deref().filter(|l| *l != ours)?;
        // The relay's claim window: three of its default 15 s leases.
        let active_ms = 45_000;
        let recent = c.saved_at.is_some_and(|t| DateTime::now().timestamp_millis() - t.timestamp_millis() < active_ms);
        recent.then(|| {
            Cause::new(
                "OutboxInUse",
                format!(
                    "the outbox is being published by {} holding the {theirs}; this resource's relays hold the \
                     {ours} and stay standby (one lease per outbox)",
                    c.holder.clone().unwrap_or_default()
                ),
            )
        })
    }

    /// `SchemasCompatible`: the relay's schemas (its ConfigMap's) against
    /// the registry, under the subjects its routes and subject name strategy
    /// give them.
    async fn schemas_condition(&self, ctx: &Context, ns: &str) -> Condition {
        let previous = self.previous_conditions();
        let generation = self.metadata.generation;
        let rules: Vec<TopicRule> = self
            .spec
            .routes
            .iter()
            .map(|x| TopicRule {
                aggregate_type: x.aggregate_type.clone(),
                event_name: x.event_name.clone(),
                topic: x.topic.clone(),
            })
            .collect();
        let registry = &self.spec.schema_registry;
        let checked = match probes::registry_auth(&ctx.client, ns, registry.auth_secret.as_deref()).await {
            Ok(auth) => {
                let mapper = EventTopicMapper::new(rules);
                ctx.probes
                    .schemas_compatible(&ctx.client, ns, &self.spec.schemas, &registry.url, &mapper, auth.as_ref())
                    .await
            }
            Err(cause) => Err(cause),
        };
        match checked {
            Ok(None) if self.spec.schemas.from_registry.is_some() => {
                let message = "the relay encodes with the versions registered under each subject".to_owned();
                condition(previous, "SchemasCompatible", true, "FromRegistry", message, generation)
            }
            Ok(None) => condition(previous, "SchemasCompatible", true, "Compatible", String::new(), generation),
            Ok(Some(why)) => condition(previous, "SchemasCompatible", false, "SchemaIncompatible", why, generation),
            Err(Cause { reason, message }) => {
                condition(previous, "SchemasCompatible", false, reason, message, generation)
            }
        }
    }
}

pub async fn reconcile_relay(r: Arc<OutboxRelay>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let api: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), &r.namespace().unwrap_or_default());
    finalizer(&api, RELAY_FINALIZER, r, |event| async {
        match event {
            Finalizer::Apply(r) => reconcile(r, ctx.clone()).await,
            Finalizer::Cleanup(r) => cleanup(r, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| ReconcileError::Finalizer(Box::new(e)))
}

/// On deletion: stop the relay pods, wait until none is left, then delete
/// the relay's Lease (the one thing it leaves behind that is not
/// garbage-collected with it). Deleting the Lease while a pod still runs
/// would let that pod, or a standby, take it again.
#[tracing::instrument(skip_all, fields(otel.name = "clean up OutboxRelay", kind = "OutboxRelay",
    namespace = r.namespace().as_deref(), name = %r.name_any(), trace_id = tracing::field::Empty))]
async fn cleanup(r: Arc<OutboxRelay>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    crate::telemetry::traces::continue_from(&tracing::Span::current(), None);
    let ns = r.namespace().unwrap_or_default();
    let children = relay_children(&r, &ctx.build);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    match deployments.delete(&children.deployment.name_any(), &DeleteParams::background()).await {
        Ok(_) => tracing::info!(deployment = %children.deployment.name_any(), "deleted the relay Deployment"),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let left = pods_left(&ctx.client, &ns, &children).await?;
    if left > 0 {
        return Err(ReconcileError::PodsStillRunning(left));
    }
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(ctx.client.clone(), &ns);
    // The Leases are the outbox's: another OutboxRelay on the same outbox
    // may hold one now. Only a Lease held by nobody or by one of these pods
    // goes.
    let ours = format!("{}-", children.deployment.name_any());
    for name in &children.lease_names {
        let holder = leases.get_opt(name).await?.and_then(|l| l.spec).and_then(|s| s.holder_identity);
        if let Some(h) = holder.filter(|h| !h.is_empty() && !h.starts_with(&ours)) {
            tracing::info!(lease = %name, holder = %h, "the outbox's lease is held by another relay; left in place");
            continue;
        }
        match leases.delete(name, &Default::default()).await {
            Ok(_) => tracing::info!(lease = %name, "deleted the relay's lease"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::bucket::split;

    #[test]
    fn the_status_adds_up_the_ranges_and_names_each_ones_publisher() {
        let ranges = split(256, 3);
        let range = |holder: &str, pending: u64, failed: u64, age: Option<f64>, backoff: Option<i64>| OutboxStats {
            pending,
            failed,
            oldest_pending_age_seconds: age,
            max_backoff_ms: backoff,
            checkpoint: Some(Checkpoint { holder: Some(holder.into()), ..Default::default() }),
            ..Default::default()
        };
        let stats = vec![
            range("relay-0", 5, 1, Some(3.0), Some(2000)),
            range("", 7, 0, Some(40.0), None),
            range("relay-1", 0, 2, None, Some(500)),
        ];
        let s = totals(&ranges, &stats);
        assert_eq!((s.pending, s.failed, s.owned_ranges), (12, 3, 2));
        assert_eq!(s.oldest_pending_age.as_deref(), Some(age(40.0).as_str()));
        assert_eq!(s.current_max_backoff_seconds, Some(2.0));
        assert_eq!(s.active_relay.as_deref(), Some("relay-0,relay-1"));
        assert_eq!(s.ranges.len(), 3);
        assert_eq!(s.ranges[1].range, "86-170");
        assert_eq!(s.ranges[1].owner, None, "a released range waits for a publisher");
        assert_eq!((s.ranges[2].owner.as_deref(), s.ranges[2].failed), (Some("relay-1"), 2));
    }
}
