//! The controllers. Each reconcile is a pipeline: build the children from
//! the spec (pure, `children`) -> apply them with server-side apply under
//! one field manager -> compute the status from the sources of truth (the
//! Deployment; for a relay the outbox itself in MongoDB and the registry;
//! for a consumer the group's offsets in Kafka and the processed-events
//! store) -> write the status, record an Event on each Ready transition,
//! requeue. A missing Secret or an unreachable MongoDB, Kafka or registry is
//! a condition on the resource, never a crash of the operator.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
    },
};
use mongodb::bson::DateTime;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Mutex;

use super::{
    children::{
        BuildContext, Children, MANAGER, REGISTRY_SECRET_PASSWORD, REGISTRY_SECRET_USERNAME, consumer_children,
        relay_children,
    },
    crd::{EventConsumer, EventConsumerStatus, MongoDbSpec, OutboxRelay, OutboxRelayStatus, PartitionLagStatus},
};
use crate::{
    avro::EVENT_SCHEMAS,
    consumer::handlers::ProcessedStore,
    kafka::{AUTH_ENV_PREFIX, auth_settings, lag::read_group_lag, schema_ids::subject},
    outbox::Outbox,
    relay::topics::{EventTopicMapper, TopicRule},
};

/// How often a resource's status is refreshed when nothing changes.
pub const REQUEUE: Duration = Duration::from_secs(30);
/// Bound of each call to MongoDB, Kafka or the registry while computing status.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<ReconcileError>>),
}

impl ReconcileError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::Kube(_) => "kube",
            ReconcileError::Finalizer(_) => "finalizer",
        }
    }
}

/// Held on an `OutboxRelay` until the relay's Lease (which it does not own,
/// so garbage collection would leave it) is deleted.
pub const RELAY_FINALIZER: &str = "outbox.dev/relay-lease";

#[derive(Clone)]
pub struct OperatorMetrics {
    pub reconciles: IntCounterVec,
    pub errors: IntCounterVec,
    pub duration: HistogramVec,
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
        };
        r.register(Box::new(m.reconciles.clone()))?;
        r.register(Box::new(m.errors.clone()))?;
        r.register(Box::new(m.duration.clone()))?;
        Ok(m)
    }
}

pub struct Context {
    pub client: Client,
    pub build: BuildContext,
    pub metrics: OperatorMetrics,
    pub recorder: Recorder,
    /// MongoDB clients by connection string, reused across reconciles.
    mongo: Mutex<HashMap<String, mongodb::Client>>,
    http: reqwest::Client,
}

impl Context {
    pub fn new(client: Client, build: BuildContext, metrics: OperatorMetrics) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter { controller: MANAGER.into(), instance: None });
        Self { client, build, metrics, recorder, mongo: Mutex::default(), http: reqwest::Client::new() }
    }

    async fn mongo(&self, uri: &str) -> Result<mongodb::Client, String> {
        let mut clients = self.mongo.lock().await;
        if let Some(c) = clients.get(uri) {
            return Ok(c.clone());
        }
        let mut options =
            mongodb::options::ClientOptions::parse(uri).await.map_err(|e| format!("bad MongoDB URI: {e}"))?;
        options.server_selection_timeout = Some(PROBE_TIMEOUT);
        options.app_name = Some("outbox-operator".into());
        let client = mongodb::Client::with_options(options).map_err(|e| e.to_string())?;
        clients.insert(uri.to_owned(), client.clone());
        Ok(client)
    }
}

/// Apply every child with server-side apply.
async fn apply_children(client: &Client, ns: &str, ch: &Children) -> Result<(), kube::Error> {
    async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<(), kube::Error>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Serialize
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
    {
        let api: Api<K> = Api::namespaced(client.clone(), ns);
        let mut value = serde_json::to_value(obj).expect("children serialize");
        value["apiVersion"] = json!(K::api_version(&()));
        value["kind"] = json!(K::kind(&()));
        api.patch(&obj.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(value)).await.map(|_| ())
    }
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
    match apply(client, ns, &ch.pdb).await {
        // policy/v1 is served from Kubernetes 1.21; older clusters have policy/v1beta1.
        Err(kube::Error::Api(s)) if s.code == 404 => apply_pdb_v1beta1(client, ns, &ch.pdb).await,
        other => other,
    }
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

/// A condition, keeping its transition time while its status is unchanged.
fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: if message.is_empty() { reason.into() } else { message },
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// A Secret's keys and values (`data` and `stringData`), or the condition
/// reason and message.
async fn secret_data(client: &Client, ns: &str, name: &str) -> Result<BTreeMap<String, Vec<u8>>, Problem> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|e| ("KubernetesApiError", e.to_string()))?
        .ok_or_else(|| ("SecretNotFound", format!("Secret {name} not found in namespace {ns}")))?;
    let mut out: BTreeMap<String, Vec<u8>> =
        secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    out.extend(secret.string_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())));
    Ok(out)
}

/// One value of a Secret's data as text.
fn secret_text(secret: &str, key: &str, value: Vec<u8>) -> Result<String, Problem> {
    String::from_utf8(value)
        .map_err(|_| ("SecretKeyNotFound", format!("Secret {secret}: the value of {key} is not UTF-8")))
}

/// The MongoDB URI from the resource's Secret, or the condition reason and message.
async fn mongo_uri(client: &Client, ns: &str, m: &MongoDbSpec) -> Result<String, Problem> {
    let (name, key) = (&m.uri_secret.name, &m.uri_secret.key);
    let value = secret_data(client, ns, name)
        .await?
        .remove(key)
        .ok_or_else(|| ("SecretKeyNotFound", format!("Secret {name} has no key {key}")))?;
    secret_text(name, key, value)
}

/// librdkafka security settings from `kafka.authSecret` (the keys the pods
/// get as `KAFKA_AUTH_*`, e.g. `SASL_USERNAME` -> `sasl.username`), so the
/// operator's own status probes connect as the pods do.
async fn kafka_auth(client: &Client, ns: &str, secret: Option<&str>) -> Result<Vec<(String, String)>, Problem> {
    let Some(name) = secret else { return Ok(Vec::new()) };
    let mut vars = Vec::new();
    for (key, value) in secret_data(client, ns, name).await? {
        let text = secret_text(name, &key, value)?;
        vars.push((format!("{AUTH_ENV_PREFIX}{key}"), text));
    }
    Ok(auth_settings(vars))
}

/// Registry basic-auth credentials from `schemaRegistry.authSecret` (keys
/// `username` and `password`, as the pods get them).
async fn registry_auth(client: &Client, ns: &str, secret: Option<&str>) -> Result<Option<(String, String)>, Problem> {
    let Some(name) = secret else { return Ok(None) };
    let mut data = secret_data(client, ns, name).await?;
    let (user_key, password_key) = (REGISTRY_SECRET_USERNAME, REGISTRY_SECRET_PASSWORD);
    let user =
        data.remove(user_key).ok_or_else(|| ("SecretKeyNotFound", format!("Secret {name} has no key {user_key}")))?;
    let password = data.remove(password_key).map(|p| secret_text(name, password_key, p)).transpose()?;
    Ok(Some((secret_text(name, user_key, user)?, password.unwrap_or_default())))
}

async fn deployment_replicas(client: &Client, ns: &str, name: &str) -> (i32, i32, bool) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(d)) => {
            let want = d.spec.and_then(|s| s.replicas).unwrap_or(1);
            let st = d.status.unwrap_or_default();
            let updated = st.updated_replicas.unwrap_or(0);
            (want, st.ready_replicas.unwrap_or(0), updated < want)
        }
        _ => (0, 0, true),
    }
}

fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn rfc3339(t: DateTime) -> Option<String> {
    t.try_to_rfc3339_string().ok()
}

async fn write_status<K>(client: &Client, obj: &K, status: serde_json::Value) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status});
    api.patch_status(&obj.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await.map(|_| ())
}

/// Record an Event when Ready changes.
async fn record_transition<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    previous: &[Condition],
    ready: &Condition,
) {
    let before = previous.iter().find(|c| c.type_ == "Ready").map(|c| c.status.as_str());
    if before == Some(ready.status.as_str()) {
        return;
    }
    let event = Event {
        type_: if ready.status == "True" { EventType::Normal } else { EventType::Warning },
        reason: ready.reason.clone(),
        note: Some(ready.message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, "recording an event");
    }
}

/// Check the bundled schemas against the registry under the subjects the
/// relay will use. `Ok(None)`: compatible (or nothing registered yet).
async fn schemas_compatible(
    ctx: &Context,
    r: &OutboxRelay,
    auth: Option<&(String, String)>,
) -> Result<Option<String>, String> {
    let rules: Vec<TopicRule> = r
        .spec
        .routes
        .iter()
        .map(|x| TopicRule {
            aggregate_type: x.aggregate_type.clone(),
            event_name: x.event_name.clone(),
            topic: x.topic.clone(),
        })
        .collect();
    let mapper = EventTopicMapper::new(rules);
    let url = r.spec.schema_registry.url.trim_end_matches('/');
    for s in EVENT_SCHEMAS {
        let full = format!("dev.outbox.{}.{}", s.aggregate_type.to_lowercase(), s.event_name);
        let subject = subject(&mapper.topic_for(s.aggregate_type, s.event_name), &full);
        let mut request = ctx
            .http
            .post(format!("{url}/compatibility/subjects/{subject}/versions/latest"))
            .json(&json!({"schema": s.text}))
            .timeout(PROBE_TIMEOUT);
        if let Some((user, password)) = auth {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await.map_err(|e| format!("schema registry at {url}: {e}"))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            continue; // nothing registered under the subject yet
        }
        if !response.status().is_success() {
            // 401/403 among them: a wrong authSecret must not read as compatible.
            return Err(format!("schema registry at {url}: HTTP {} for subject {subject}", response.status()));
        }
        let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
        if body["is_compatible"] == json!(false) {
            return Ok(Some(format!("{} v{} is not compatible with subject {subject}", s.event_name, s.version)));
        }
    }
    Ok(None)
}

/// A condition reason and message.
type Problem = (&'static str, String);

/// A bounded MongoDB probe on the resource's database: the URI from its
/// Secret, a cached client, `PROBE_TIMEOUT`.
async fn probe_mongo<T, F, Fut>(ctx: &Context, ns: &str, spec: &MongoDbSpec, probe: F) -> Result<T, Problem>
where
    F: FnOnce(mongodb::Database) -> Fut,
    Fut: std::future::Future<Output = mongodb::error::Result<T>>,
{
    let uri = mongo_uri(&ctx.client, ns, spec).await?;
    let client = ctx.mongo(&uri).await.map_err(|e| ("MongoUnreachable", e))?;
    match tokio::time::timeout(PROBE_TIMEOUT, probe(client.database(&spec.database))).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(("MongoUnreachable", e.to_string())),
        Err(_) => Err(("MongoUnreachable", format!("no answer within {PROBE_TIMEOUT:?}"))),
    }
}

/// What the status conditions are computed from.
struct Health<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    degraded: Option<Problem>,
    paused: bool,
    want: i32,
    ready: i32,
    rolling: bool,
    /// "relay" or "consumer", for messages.
    pods: &'static str,
    /// Ready reason while working, e.g. "Publishing".
    working: &'static str,
}

/// Ready, Progressing and Degraded, from the probes and the Deployment.
fn health_conditions(h: Health<'_>) -> [Condition; 3] {
    let c =
        |t: &str, ok: bool, reason: &str, message: String| condition(h.previous, t, ok, reason, message, h.generation);
    let healthy = || c("Degraded", false, "Healthy", String::new());
    let (ready, degraded) = match &h.degraded {
        Some((reason, message)) => {
            (c("Ready", false, reason, message.clone()), c("Degraded", true, reason, message.clone()))
        }
        None if h.paused => (c("Ready", true, "Paused", "paused: scaled to zero".into()), healthy()),
        None if h.ready == 0 => {
            (c("Ready", false, "PodsNotReady", format!("0/{} {} pods ready", h.want, h.pods)), healthy())
        }
        None => (c("Ready", true, h.working, format!("{}/{} {} pods ready", h.ready, h.want, h.pods)), healthy()),
    };
    let progressing = c("Progressing", h.rolling, if h.rolling { "RollingOut" } else { "Stable" }, String::new());
    [ready, progressing, degraded]
}

pub async fn reconcile_relay(r: Arc<OutboxRelay>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    use kube::runtime::finalizer::{Event as Finalizer, finalizer};
    let api: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), &r.namespace().unwrap_or_default());
    finalizer(&api, RELAY_FINALIZER, r, |event| async {
        match event {
            Finalizer::Apply(r) => apply_relay(r, ctx.clone()).await,
            Finalizer::Cleanup(r) => cleanup_relay(r, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| ReconcileError::Finalizer(Box::new(e)))
}

/// Delete the relay's Lease: the one thing it leaves behind that is not
/// garbage-collected with it.
async fn cleanup_relay(r: Arc<OutboxRelay>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(ctx.client.clone(), &r.namespace().unwrap_or_default());
    let name = crate::relay::kube_lease::lease_name(&format!("outbox-relay-{}", r.name_any()));
    match leases.delete(&name, &Default::default()).await {
        Ok(_) => tracing::info!(lease = %name, "deleted the relay's lease"),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

async fn apply_relay(r: Arc<OutboxRelay>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let start = std::time::Instant::now();
    ctx.metrics.reconciles.with_label_values(&["OutboxRelay"]).inc();
    let ns = r.namespace().unwrap_or_default();
    let children = relay_children(&r, &ctx.build);
    apply_children(&ctx.client, &ns, &children).await?;
    let previous = r.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let generation = r.metadata.generation;
    let mut status = OutboxRelayStatus { observed_generation: generation, ..Default::default() };
    let (want, ready, rolling) = deployment_replicas(&ctx.client, &ns, &children.deployment.name_any()).await;
    status.replicas = want;
    status.ready_replicas = ready;

    let mut degraded: Option<Problem> = None;
    let collection = r.spec.mongodb.collection.clone();
    let stats = probe_mongo(&ctx, &ns, &r.spec.mongodb, |db| async move {
        Outbox::new(&db, &collection).stats(DateTime::now()).await
    });
    match stats.await {
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
        Err(problem) => degraded = Some(problem),
    }
    let checked = match registry_auth(&ctx.client, &ns, r.spec.schema_registry.auth_secret.as_deref()).await {
        Ok(auth) => schemas_compatible(&ctx, &r, auth.as_ref()).await.map_err(|e| ("RegistryUnreachable", e)),
        Err(problem) => Err(problem),
    };
    let schemas = match checked {
        Ok(None) => condition(&previous, "SchemasCompatible", true, "Compatible", String::new(), generation),
        Ok(Some(why)) => condition(&previous, "SchemasCompatible", false, "SchemaIncompatible", why, generation),
        Err((reason, e)) => condition(&previous, "SchemasCompatible", false, reason, e, generation),
    };
    let [ready_cond, progressing, degraded_cond] = health_conditions(Health {
        previous: &previous,
        generation,
        degraded,
        paused: r.spec.paused,
        want,
        ready,
        rolling,
        pods: "relay",
        working: "Publishing",
    });
    record_transition(&ctx, r.as_ref(), &previous, &ready_cond).await;
    status.conditions = vec![ready_cond, progressing, degraded_cond, schemas];
    write_status(&ctx.client, r.as_ref(), serde_json::to_value(&status).expect("status serializes")).await?;
    ctx.metrics.duration.with_label_values(&["OutboxRelay"]).observe(start.elapsed().as_secs_f64());
    Ok(Action::requeue(REQUEUE))
}

pub async fn reconcile_consumer(c: Arc<EventConsumer>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let start = std::time::Instant::now();
    ctx.metrics.reconciles.with_label_values(&["EventConsumer"]).inc();
    let ns = c.namespace().unwrap_or_default();
    let children = consumer_children(&c, &ctx.build);
    apply_children(&ctx.client, &ns, &children).await?;
    let previous = c.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let generation = c.metadata.generation;
    let mut status = EventConsumerStatus { observed_generation: generation, ..Default::default() };
    let (want, ready, rolling) = deployment_replicas(&ctx.client, &ns, &children.deployment.name_any()).await;
    status.replicas = want;
    status.ready_replicas = ready;
    let mut degraded: Option<Problem> = None;

    let bootstrap = &c.spec.kafka.bootstrap_servers;
    let auth = kafka_auth(&ctx.client, &ns, c.spec.kafka.auth_secret.as_deref()).await;
    let lag = match &auth {
        Ok(auth) => read_group_lag(bootstrap, auth, &c.spec.group_id, &c.spec.topics, PROBE_TIMEOUT)
            .await
            .map_err(|e| ("KafkaUnreachable", e)),
        Err(problem) => Err(problem.clone()),
    };
    match lag {
        Ok(l) => {
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
        }
        Err(problem) => degraded = Some(problem),
    }
    // Records on the dead-letter topics: what a group that never reads them lags by.
    let dlq: Vec<String> = c.spec.topics.iter().map(|t| format!("{t}{}", c.spec.dead_letter_suffix)).collect();
    if let Ok(auth) = &auth
        && let Ok(l) = read_group_lag(bootstrap, auth, "outbox-operator-dlq-counter", &dlq, PROBE_TIMEOUT).await
    {
        status.dead_lettered = l.total;
    }
    let group = c.spec.group_id.clone();
    match probe_mongo(&ctx, &ns, &c.spec.mongodb, |db| async move { ProcessedStore::new(&db, &group).count().await })
        .await
    {
        Ok(n) => status.processed = n as i64,
        Err(problem) => degraded = degraded.or(Some(problem)),
    }
    let [ready_cond, progressing, degraded_cond] = health_conditions(Health {
        previous: &previous,
        generation,
        degraded,
        paused: c.spec.paused,
        want,
        ready,
        rolling,
        pods: "consumer",
        working: "Consuming",
    });
    record_transition(&ctx, c.as_ref(), &previous, &ready_cond).await;
    status.conditions = vec![ready_cond, progressing, degraded_cond];
    write_status(&ctx.client, c.as_ref(), serde_json::to_value(&status).expect("status serializes")).await?;
    ctx.metrics.duration.with_label_values(&["EventConsumer"]).observe(start.elapsed().as_secs_f64());
    Ok(Action::requeue(REQUEUE))
}

pub fn error_policy<K>(obj: Arc<K>, error: &ReconcileError, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&()).into_owned();
    ctx.metrics.errors.with_label_values(&[kind.as_str(), error.metric_label()]).inc();
    tracing::warn!(kind = %kind, name = %obj.meta().name.clone().unwrap_or_default(), error = %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}
