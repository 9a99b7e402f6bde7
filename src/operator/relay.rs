//! The `OutboxRelay` controller: the shared skeleton (`reconcile`) with the
//! relay's validation, children and observation (the outbox itself in
//! MongoDB, the registry's view of the bundled schemas), plus the
//! finalizer that removes the relay's Lease once its pods are gone.

use std::sync::Arc;

use k8s_openapi::{api::apps::v1::Deployment, apimachinery::pkg::apis::meta::v1::Condition};
use kube::{
    Api, ResourceExt,
    api::DeleteParams,
    runtime::{
        controller::Action,
        finalizer::{Event as Finalizer, finalizer},
    },
};
use mongodb::bson::DateTime;

use super::{
    children::{BuildContext, Children, relay_children},
    crd::{OutboxRelay, OutboxRelayStatus},
    probes,
    reconcile::{Context, Observed, ReconcileError, Reconciled, pods_left, reconcile},
    status::{Cause, age, condition, rfc3339},
};
use crate::{
    kafka::topics::{EventTopicMapper, TopicRule},
    outbox::Outbox,
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

    async fn observe(&self, ctx: &Context, ns: &str) -> Observed<OutboxRelayStatus> {
        let mut status = OutboxRelayStatus::default();
        let mut degraded = None;
        let collection = self.spec.mongodb.collection.clone();
        let stats = ctx
            .probes
            .mongo(&ctx.client, ns, &self.spec.mongodb, |db| async move {
                Outbox::new(&db, &collection).stats(DateTime::now()).await
            })
            .await;
        match stats {
            Ok(s) => {
                status.pending = s.pending as i64;
                status.failed = s.failed as i64;
                status.dead = s.dead as i64;
                status.oldest_pending_age = s.oldest_pending_age_seconds.map(age);
                status.next_retry_time = s.next_retry_at.and_then(rfc3339);
                status.current_max_backoff_seconds = s.max_backoff_ms.map(|ms| ms as f64 / 1000.0);
                status.blocked_aggregates = s.blocked_aggregates as i64;
                status.last_published_time = s.last_published_at.and_then(rfc3339);
            }
            Err(cause) => degraded = Some(cause),
        }
        let schemas = self.schemas_condition(ctx, ns).await;
        Observed { status, degraded, conditions: vec![schemas] }
    }
}

impl OutboxRelay {
    /// `SchemasCompatible`: the bundled schemas against the registry, under
    /// the subjects this relay's routes give them.
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
                ctx.probes.schemas_compatible(&registry.url, &EventTopicMapper::new(rules), auth.as_ref()).await
            }
            Err(cause) => Err(cause),
        };
        match checked {
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
#[tracing::instrument(skip_all, fields(kind = "OutboxRelay", namespace = r.namespace().as_deref(), name = %r.name_any()))]
async fn cleanup(r: Arc<OutboxRelay>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
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
    let name = children.lease_name.clone().unwrap_or_default();
    // The Lease is the outbox's: another OutboxRelay on the same outbox may
    // hold it now. Only a Lease held by nobody or by one of these pods goes.
    let ours = format!("{}-", children.deployment.name_any());
    let holder = leases.get_opt(&name).await?.and_then(|l| l.spec).and_then(|s| s.holder_identity);
    if let Some(h) = holder.filter(|h| !h.is_empty() && !h.starts_with(&ours)) {
        tracing::info!(lease = %name, holder = %h, "the outbox's lease is held by another relay; left in place");
        return Ok(Action::await_change());
    }
    match leases.delete(&name, &Default::default()).await {
        Ok(_) => tracing::info!(lease = %name, "deleted the relay's lease"),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}
