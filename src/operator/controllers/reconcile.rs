//! The one reconcile skeleton both controllers share, as a pipeline:
//! validate the spec -> build the children (pure, `children`) -> apply them
//! with server-side apply under one field manager (skipped, and a condition
//! set, when the spec is invalid) -> observe the sources of truth (each
//! kind's `observe`) -> compute the conditions (`status`) -> record an Event
//! on each Ready transition -> write the status (bounded and counted) ->
//! requeue. A missing Secret or an unreachable MongoDB, Kafka or registry is
//! a condition on the resource, never a crash of the operator.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{apps::v1::Deployment, batch::v1::Job, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
    },
};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

use crate::operator::{
    children::{BuildContext, Children, MANAGER},
    probes::Probes,
    status::{Cause, Health, health_conditions, ready_changed},
};

/// How often a resource's status is refreshed when nothing changes.
pub const REQUEUE: Duration = Duration::from_secs(30);
/// Bound of the status write.
pub const STATUS_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("status write: no answer within {0:?}")]
    StatusWriteTimeout(Duration),
    /// Deleting: the pods are still terminating; the cleanup waits for them.
    #[error("{0} pod(s) still running; waiting before the cleanup")]
    PodsStillRunning(usize),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<ReconcileError>>),
}

impl ReconcileError {
    /// Every `metric_label` counted as an error (a wait is not).
    pub const REASONS: [&'static str; 3] = ["kube", "status_timeout", "finalizer"];

    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::Kube(_) => "kube",
            ReconcileError::StatusWriteTimeout(_) => "status_timeout",
            ReconcileError::PodsStillRunning(_) => "pods_terminating",
            ReconcileError::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => {
                    e.metric_label()
                }
                _ => "finalizer",
            },
        }
    }

    /// A wait rather than a failure: retried soon, not counted as an error.
    fn is_wait(&self) -> bool {
        match self {
            ReconcileError::PodsStillRunning(_) => true,
            ReconcileError::Finalizer(e) => {
                matches!(
                    e.as_ref(),
                    kube::runtime::finalizer::Error::CleanupFailed(ReconcileError::PodsStillRunning(_))
                )
            }
            _ => false,
        }
    }
}

#[derive(Clone)]
pub struct OperatorMetrics {
    pub reconciles: IntCounterVec,
    pub errors: IntCounterVec,
    pub duration: HistogramVec,
    pub status_writes: IntCounterVec,
}

impl OperatorMetrics {
    pub fn register(r: &Registry) -> crate::Result<Self> {
        let m = Self {
            reconciles: IntCounterVec::new(
                Opts::new("outbox_operator_reconciles_total", "Reconciles, by kind"),
                &["kind"],
            )?,
            errors: IntCounterVec::new(
                Opts::new("outbox_operator_reconcile_errors_total", "Failed reconciles, by kind and reason"),
                &["kind", "reason"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new("outbox_operator_reconcile_duration_seconds", "Reconcile duration, by kind")
                    .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                &["kind"],
            )?,
            status_writes: IntCounterVec::new(
                Opts::new(
                    "outbox_operator_status_writes_total",
                    "Status writes, by kind and result (ok, error, timeout)",
                ),
                &["kind", "result"],
            )?,
        };
        r.register(Box::new(m.reconciles.clone()))?;
        r.register(Box::new(m.errors.clone()))?;
        r.register(Box::new(m.duration.clone()))?;
        r.register(Box::new(m.status_writes.clone()))?;
        // Every series at 0 from the start, so rates and the dashboard see
        // the first error, and no panel lacks a series before it.
        for kind in [crate::operator::crd::OutboxRelay::kind(&()), crate::operator::crd::EventConsumer::kind(&())] {
            m.reconciles.with_label_values(&[&kind]);
            m.duration.with_label_values(&[&kind]);
            for reason in ReconcileError::REASONS {
                m.errors.with_label_values(&[&kind, reason]);
            }
            for result in ["ok", "error", "timeout"] {
                m.status_writes.with_label_values(&[&kind, result]);
            }
        }
        Ok(m)
    }
}

pub struct Context {
    pub client: Client,
    pub build: BuildContext,
    pub metrics: OperatorMetrics,
    pub recorder: Recorder,
    pub probes: Probes,
}

impl Context {
    pub fn new(client: Client, build: BuildContext, metrics: OperatorMetrics) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter { controller: MANAGER.into(), instance: None });
        Self { client, build, metrics, recorder, probes: Probes::default() }
    }
}

/// What one kind's own observation found: its part of the status, the first
/// problem (if any), and conditions of its own (e.g. `SchemasCompatible`).
pub struct Observed<S> {
    pub status: S,
    pub degraded: Option<Cause>,
    pub conditions: Vec<Condition>,
}

/// What a kind of custom resource brings to the shared skeleton.
pub trait Reconciled:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    type Status: Serialize + Send;
    /// "relay" or "consumer", for messages.
    const PODS: &'static str;
    /// The Ready reason while working, e.g. "Publishing".
    const WORKING: &'static str;

    /// The spec's cross-field rules (the CEL rules of the CRD, which
    /// clusters before 1.25 do not evaluate) and whatever the pods would
    /// refuse at start: the first violation, naming the field.
    fn validate(&self) -> Result<(), String>;
    fn children(&self, build: &BuildContext) -> Children;
    fn paused(&self) -> bool;
    fn previous_conditions(&self) -> &[Condition];
    /// Another resource that already owns what this one would run (for a
    /// relay: the same outbox). Like an invalid spec, it stops this one's
    /// children from being applied until it is resolved.
    fn conflict(&self, _ctx: &Context, _ns: &str) -> impl Future<Output = Option<Cause>> + Send {
        std::future::ready(None)
    }
    /// This kind's part of the status, from the sources of truth.
    fn observe(&self, ctx: &Context, ns: &str) -> impl Future<Output = Observed<Self::Status>> + Send;
}

/// The shared reconcile.
#[tracing::instrument(skip_all, fields(otel.name = %format!("reconcile {}", K::kind(&())), kind = %K::kind(&()),
    namespace = obj.namespace().as_deref(), name = %obj.name_any(), generation = obj.meta().generation,
    trace_id = tracing::field::Empty))]
pub async fn reconcile<K: Reconciled>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    crate::telemetry::traces::continue_from(&tracing::Span::current(), None);
    let kind = K::kind(&());
    let start = std::time::Instant::now();
    ctx.metrics.reconciles.with_label_values(&[&kind]).inc();
    let ns = obj.namespace().unwrap_or_default();
    let children = obj.children(&ctx.build);
    let invalid = match obj.validate().and_then(|()| children.check_env()) {
        Err(rule) => Some(Cause::new("InvalidSpec", format!("{rule}; no pods are built or changed until it is fixed"))),
        Ok(()) => obj.conflict(&ctx, &ns).await,
    };
    if invalid.is_none() {
        apply_children(&ctx.client, &ns, &children).await?;
    }
    let (want, ready, rolling) = deployment_replicas(&ctx.client, &ns, &children.deployment.name_any()).await;
    let observed = obj.observe(&ctx, &ns).await;
    let previous = obj.previous_conditions();
    let degraded = invalid.or(observed.degraded);
    let [ready_cond, progressing, degraded_cond] = health_conditions(&Health {
        previous,
        generation: obj.meta().generation,
        degraded,
        paused: obj.paused(),
        want,
        ready,
        rolling,
        pods: K::PODS,
        working: K::WORKING,
    });
    if ready_changed(previous, &ready_cond) {
        record_ready_event(&ctx, obj.as_ref(), &ready_cond).await;
    }
    let mut status = serde_json::to_value(&observed.status).expect("status serializes");
    status["observedGeneration"] = json!(obj.meta().generation);
    status["replicas"] = json!(want);
    status["readyReplicas"] = json!(ready);
    let mut conditions = vec![ready_cond, progressing, degraded_cond];
    conditions.extend(observed.conditions);
    status["conditions"] = json!(conditions);
    write_status(&ctx, obj.as_ref(), status).await?;
    ctx.metrics.duration.with_label_values(&[&kind]).observe(start.elapsed().as_secs_f64());
    Ok(Action::requeue(REQUEUE))
}

pub fn error_policy<K>(obj: Arc<K>, error: &ReconcileError, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&()).into_owned();
    let name = obj.meta().name.clone().unwrap_or_default();
    if error.is_wait() {
        tracing::info!(kind = %kind, name = %name, reason = %error, "waiting");
        return Action::requeue(Duration::from_secs(2));
    }
    ctx.metrics.errors.with_label_values(&[kind.as_str(), error.metric_label()]).inc();
    tracing::warn!(kind = %kind, name = %name, error = %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}

/// Apply every child with server-side apply.
async fn apply_children(client: &Client, ns: &str, ch: &Children) -> Result<(), kube::Error> {
    apply(client, ns, &ch.config_map).await?;
    apply(client, ns, &ch.service_account).await?;
    if let Some(role) = &ch.role {
        apply(client, ns, role).await?;
    }
    if let Some(binding) = &ch.role_binding {
        apply(client, ns, binding).await?;
    }
    apply(client, ns, &ch.deployment).await?;
    apply(client, ns, &ch.service).await?;
    if let Some(job) = &ch.rebuild_job {
        create_once(client, ns, job).await?;
    }
    match apply(client, ns, &ch.pdb).await {
        // policy/v1 is served from Kubernetes 1.21; older clusters have policy/v1beta1.
        Err(kube::Error::Api(s)) if s.code == 404 => apply_pdb_v1beta1(client, ns, &ch.pdb).await,
        other => other,
    }
}

/// Create a Job unless it exists: a Job's pod template cannot change, and
/// one request runs once whatever the spec becomes after it.
pub async fn create_once(client: &Client, ns: &str, job: &Job) -> Result<(), kube::Error> {
    let api: Api<Job> = Api::namespaced(client.clone(), ns);
    match api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, job).await {
        Ok(_) => {
            tracing::info!(job = %job.name_any(), "job created");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + Clone
        + std::fmt::Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let mut value = serde_json::to_value(obj).expect("children serialize");
    value["apiVersion"] = json!(K::api_version(&()));
    value["kind"] = json!(K::kind(&()));
    api.patch(&obj.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(value)).await.map(|_| ())
}

async fn apply_pdb_v1beta1(
    client: &Client,
    ns: &str,
    pdb: &k8s_openapi::api::policy::v1::PodDisruptionBudget,
) -> Result<(), kube::Error> {
    use kube::{
        api::{ApiResource, DynamicObject},
        core::GroupVersionKind,
    };
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget"));
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    let mut value = serde_json::to_value(pdb).expect("children serialize");
    value["apiVersion"] = json!("policy/v1beta1");
    value["kind"] = json!("PodDisruptionBudget");
    api.patch(&pdb.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(value)).await.map(|_| ())
}

/// Replicas wanted, ready, and whether a rollout is under way.
async fn deployment_replicas(client: &Client, ns: &str, name: &str) -> (i32, i32, bool) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(d)) => {
            let want = d.spec.and_then(|s| s.replicas).unwrap_or(1);
            let st = d.status.unwrap_or_default();
            let updated = st.updated_replicas.unwrap_or(0);
            (want, st.ready_replicas.unwrap_or(0), updated < want)
        }
        _ => (0, 0, false),
    }
}

/// Write the status subresource, bounded by `STATUS_WRITE_TIMEOUT` and
/// counted by result.
async fn write_status<K: Reconciled>(ctx: &Context, obj: &K, status: serde_json::Value) -> Result<(), ReconcileError> {
    write_status_of(ctx, obj, status).await
}

/// Write the status subresource of any namespaced kind of this group,
/// bounded by `STATUS_WRITE_TIMEOUT` and counted by result.
pub async fn write_status_of<K>(ctx: &Context, obj: &K, status: serde_json::Value) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&());
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": K::api_version(&()), "kind": kind, "status": status});
    let (name, params, patch) = (obj.name_any(), PatchParams::apply(MANAGER).force(), Patch::Apply(patch));
    let (result, outcome) =
        match tokio::time::timeout(STATUS_WRITE_TIMEOUT, api.patch_status(&name, &params, &patch)).await {
            Ok(Ok(_)) => ("ok", Ok(())),
            Ok(Err(e)) => ("error", Err(e.into())),
            Err(_) => ("timeout", Err(ReconcileError::StatusWriteTimeout(STATUS_WRITE_TIMEOUT))),
        };
    ctx.metrics.status_writes.with_label_values(&[&kind, result]).inc();
    outcome
}

/// An Event on the resource for a change of Ready.
async fn record_ready_event<K: Resource<DynamicType = ()>>(ctx: &Context, obj: &K, ready: &Condition) {
    let kind = if ready.status == "True" { EventType::Normal } else { EventType::Warning };
    publish_event(ctx, obj, kind, &ready.reason, &ready.message, "Reconcile").await;
}

/// A Kubernetes Event on `obj` (a failure to record it is logged, never an
/// error of the reconcile).
pub async fn publish_event<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: &str,
    action: &str,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, "recording an event");
    }
}

/// Pods with the children's labels still present (deleting: they must be
/// gone before what they hold, such as a Lease, is removed).
pub async fn pods_left(client: &Client, ns: &str, children: &Children) -> Result<usize, kube::Error> {
    let labels = children.deployment.metadata.labels.clone().unwrap_or_default();
    let selector: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(pods.list(&ListParams::default().labels(&selector.join(","))).await?.items.len())
}
