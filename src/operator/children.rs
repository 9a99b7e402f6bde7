//! The objects a custom resource owns, built by a pure function from its
//! spec: ConfigMap (the non-secret settings, as environment), ServiceAccount,
//! Role and RoleBinding (relays only: the Lease they elect through),
//! Deployment (same image, `outbox relay` / `outbox consume`, the MongoDB
//! URI from its Secret, probes, non-root, read-only root filesystem),
//! Service for metrics, PodDisruptionBudget. A spec change changes the
//! ConfigMap hash on the pod template, which rolls the pods.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        batch::v1::Job,
        core::v1::{ConfigMap, Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
        rbac::v1::{Role, RoleBinding},
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use serde_json::{Value, json};

use super::crd::{
    BeyondHorizonPolicy, EventConsumer, HandlerType, KafkaSpec, MongoDbSpec, OutboxRelay, PodSpec, RegistryVersion,
    RouteSpec, SchemaRegistrySpec, SecretKeyRef,
};
use crate::{
    kafka::OVERRIDES_DELIMITER,
    lease::{outbox_lease_name, range_lease_name},
    outbox::bucket::{BucketRange, DEFAULT_BUCKETS, split},
};

/// The command-line name of a setting's value (the pods' environment
/// takes what their flags take).
fn value_name<E: clap::ValueEnum>(value: &E) -> String {
    value.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default()
}

/// The bucket ranges of a relay's outbox (`spec.shards` of the default
/// bucket count, as the relay pods split it).
pub fn relay_ranges(s: &super::crd::OutboxRelaySpec) -> Vec<BucketRange> {
    split(DEFAULT_BUCKETS, u32::try_from(s.shards).unwrap_or(1))
}

/// Port of /metrics, /healthz and /readyz in the pods.
pub const METRICS_PORT: i32 = 9090;
/// The consumer's component name (its children's prefix and name label).
const CONSUMER: &str = "outbox-consumer";

/// Field manager of everything the operator applies.
pub const MANAGER: &str = "outbox-operator";
/// Keys of a `schemaRegistry.authSecret`: what the pods get as
/// `SCHEMA_REGISTRY_USERNAME`/`_PASSWORD`, and what the operator's own
/// compatibility check sends.
pub const REGISTRY_SECRET_USERNAME: &str = "username";
pub const REGISTRY_SECRET_PASSWORD: &str = "password";

/// Everything one custom resource owns.
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    pub config_map: ConfigMap,
    pub service_account: ServiceAccount,
    pub role: Option<Role>,
    pub role_binding: Option<RoleBinding>,
    pub deployment: Deployment,
    pub service: Service,
    pub pdb: PodDisruptionBudget,
    /// The Leases the relay pods elect through, one per bucket range
    /// (relays only).
    pub lease_names: Vec<String>,
    /// The Job of a requested rebuild of the projection (consumers only);
    /// created once, never changed.
    pub rebuild_job: Option<Job>,
    /// Variables of `spec.pod.env` the operator sets itself: refused.
    pub refused_env: Vec<String>,
}

impl Children {
    /// `spec.pod.env` may add variables, not replace the operator's.
    pub fn check_env(&self) -> Result<(), String> {
        if self.refused_env.is_empty() {
            return Ok(());
        }
        Err(format!(
            "spec.pod.env: {} set by the operator from the resource's spec; set the spec's field instead",
            match self.refused_env.as_slice() {
                [one] => format!("{one} is"),
                many => format!("{} are", many.join(", ")),
            }
        ))
    }
}

/// What the builder needs besides the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildContext {
    /// Image when the resource names none: the operator's own.
    pub default_image: String,
    /// `imagePullPolicy` of the pods (the operator's own setting).
    pub image_pull_policy: String,
}

/// Stable 64-bit FNV-1a hash, hex: the config hash annotation.
fn config_hash(data: &BTreeMap<String, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in data {
        for b in k.bytes().chain([0]).chain(v.bytes()).chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

struct Common<'a> {
    kafka_auth_secret: Option<&'a str>,
    registry_auth_secret: Option<&'a str>,
    name: String,
    namespace: String,
    component: &'static str,
    owner: OwnerReference,
    replicas: i32,
    pod: &'a PodSpec,
    mongodb: &'a MongoDbSpec,
    command: &'static str,
    env: BTreeMap<String, String>,
    /// The Leases the pods elect through (relays; none: no API access).
    leases: Vec<String>,
    /// The ConfigMap of event schemas mounted at [`SCHEMAS_MOUNT`].
    schemas_config_map: Option<&'a str>,
    /// Variables read from a Secret key each (the webhook's secrets).
    secret_env: Vec<(&'static str, &'a SecretKeyRef)>,
}

/// Where a resource's schema ConfigMap is mounted in its pods.
pub const SCHEMAS_MOUNT: &str = "/etc/outbox/schemas";

fn labels(c: &Common<'_>) -> Value {
    json!({
        "app.kubernetes.io/name": c.component,
        "app.kubernetes.io/instance": c.name,
        "app.kubernetes.io/managed-by": MANAGER,
    })
}

fn meta(c: &Common<'_>, name: &str) -> Value {
    json!({
        "name": name,
        "namespace": c.namespace,
        "labels": labels(c),
        "ownerReferences": [c.owner],
    })
}

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("children are built from valid JSON")
}

fn build(c: Common<'_>, ctx: &BuildContext) -> Children {
    let child = child_name(c.component, &c.name);
    let hash = config_hash(&c.env);
    let image = c.pod.image.clone().unwrap_or_else(|| ctx.default_image.clone());
    let config_map = from(json!({"metadata": meta(&c, &child), "data": c.env}));
    let needs_api = !c.leases.is_empty();
    let service_account = from(json!({"metadata": meta(&c, &child), "automountServiceAccountToken": needs_api}));
    let (role, role_binding) = if needs_api {
        (
            Some(from(json!({
                "metadata": meta(&c, &child),
                "rules": [
                    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
                    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": c.leases,
                     "verbs": ["get", "update"]},
                ],
            }))),
            Some(from(json!({
                "metadata": meta(&c, &child),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": child},
                "subjects": [{"kind": "ServiceAccount", "name": child, "namespace": c.namespace}],
            }))),
        )
    } else {
        (None, None)
    };
    let probe =
        |path: &str| json!({"httpGet": {"path": path, "port": "metrics"}, "periodSeconds": 10, "failureThreshold": 3});
    let mut container = json!({
        "name": c.component,
        "image": image,
        "imagePullPolicy": ctx.image_pull_policy,
        "args": [c.command],
        "envFrom": [{"configMapRef": {"name": child}}],
        "env": [
            {"name": "MONGODB_URI", "valueFrom": {"secretKeyRef": {"name": c.mongodb.uri_secret.name, "key": c.mongodb.uri_secret.key}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            // The pod's identity (the relay's Lease holder): its own name, never
            // HOSTNAME, which host-network pods share with the machine.
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        // `protocol` spelled out: server-side apply keys these lists by it.
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "livenessProbe": probe("/healthz"),
        "readinessProbe": probe("/readyz"),
        "securityContext": {
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
        },
    });
    if let Some(secret) = c.kafka_auth_secret {
        // Keys like SASL_USERNAME become KAFKA_AUTH_SASL_USERNAME -> sasl.username.
        container["envFrom"]
            .as_array_mut()
            .expect("envFrom")
            .push(json!({"secretRef": {"name": secret}, "prefix": "KAFKA_AUTH_"}));
    }
    if let Some(secret) = c.registry_auth_secret {
        let env = container["env"].as_array_mut().expect("env");
        for (var, key) in [
            ("SCHEMA_REGISTRY_USERNAME", REGISTRY_SECRET_USERNAME),
            ("SCHEMA_REGISTRY_PASSWORD", REGISTRY_SECRET_PASSWORD),
        ] {
            env.push(json!({"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}));
        }
    }
    for (var, secret) in &c.secret_env {
        container["env"]
            .as_array_mut()
            .expect("env")
            .push(json!({"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}}));
    }
    let mut volumes = Vec::new();
    if let Some(config_map) = c.schemas_config_map {
        container["volumeMounts"] = json!([{"name": "schemas", "mountPath": SCHEMAS_MOUNT, "readOnly": true}]);
        volumes.push(json!({"name": "schemas", "configMap": {"name": config_map}}));
    }
    if let Some(resources) = &c.pod.resources {
        container["resources"] = serde_json::to_value(resources).expect("resources serialize");
    }
    // The operator's variables: its env entries, the ConfigMap's keys, and
    // the Kafka credentials' prefix when a Secret supplies them.
    let env = container["env"].as_array_mut().expect("env");
    let refused_env: Vec<String> = c
        .pod
        .env
        .iter()
        .map(|v| v.name.clone())
        .filter(|name| {
            env.iter().any(|e| e["name"] == name.as_str())
                || c.env.contains_key(name)
                || (c.kafka_auth_secret.is_some() && name.starts_with("KAFKA_AUTH_"))
        })
        .collect();
    env.extend(c.pod.env.iter().map(|v| serde_json::to_value(v).expect("env serializes")));
    let deployment = from(json!({
        "metadata": meta(&c, &child),
        "spec": {
            "replicas": c.replicas,
            "selector": {"matchLabels": labels(&c)},
            "template": {
                "metadata": {"labels": labels(&c), "annotations": {"outbox.dev/config-hash": hash}},
                "spec": {
                    "serviceAccountName": child,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532},
                    // Replicas on different nodes where there are several:
                    // relays publishing ranges side by side, consumers
                    // sharing partitions, a standby that outlives a node.
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {"labelSelector": {"matchLabels": labels(&c)}, "topologyKey": "kubernetes.io/hostname"},
                    }]}},
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }));
    let service = from(json!({
        "metadata": meta(&c, &child),
        "spec": {"selector": labels(&c), "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}]},
    }));
    let pdb = from(json!({
        "metadata": meta(&c, &child),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(&c)}},
    }));
    Children {
        config_map,
        service_account,
        role,
        role_binding,
        deployment,
        service,
        pdb,
        lease_names: c.leases.clone(),
        rebuild_job: None,
        refused_env,
    }
}

pub fn owner<K: kube::Resource<DynamicType = ()>>(obj: &K) -> OwnerReference {
    let meta = obj.meta();
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The settings relays and consumers share: MongoDB database and collection,
/// Kafka bootstrap servers, registry URL, metrics address, log format.
fn shared_env(m: &MongoDbSpec, kafka: &KafkaSpec, registry: &SchemaRegistrySpec) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("MONGODB_DATABASE".to_owned(), m.database.clone()),
        ("OUTBOX_COLLECTION".to_owned(), m.collection.clone()),
        ("KAFKA_BOOTSTRAP".to_owned(), kafka.bootstrap_servers.clone()),
        ("SCHEMA_REGISTRY_URL".to_owned(), registry.url.clone()),
        ("METRICS_LISTEN".to_owned(), format!("0.0.0.0:{METRICS_PORT}")),
        ("OUTBOX_LOG_FORMAT".to_owned(), "json".to_owned()),
    ])
}

/// Set a list-valued variable only when the list is not empty (an empty
/// value would be parsed as one empty item), its items joined by the
/// delimiter its flag splits on.
fn insert_list(env: &mut BTreeMap<String, String>, key: &str, items: Vec<String>, delimiter: char) {
    if !items.is_empty() {
        env.insert(key.into(), items.join(&delimiter.to_string()));
    }
}

fn client_config(config: &BTreeMap<String, String>) -> Vec<String> {
    config.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The children of an `OutboxRelay`.
pub fn relay_children(r: &OutboxRelay, ctx: &BuildContext) -> Children {
    let s = &r.spec;
    let name = r.metadata.name.clone().unwrap_or_default();
    let mut env = shared_env(&s.mongodb, &s.kafka, &s.schema_registry);
    insert_list(&mut env, "KAFKA_PRODUCER_CONFIG", client_config(&s.kafka.client_config), OVERRIDES_DELIMITER);
    env.insert("SCHEMA_AUTO_REGISTER".into(), s.schema_registry.auto_register.to_string());
    if s.schemas.config_map.is_some() {
        env.insert("SCHEMAS_DIR".into(), SCHEMAS_MOUNT.into());
    }
    if let Some(version) = s.schemas.from_registry {
        let arg = match version {
            RegistryVersion::Latest => "latest",
            RegistryVersion::EventVersion => "event-version",
        };
        env.insert("SCHEMAS_FROM_REGISTRY".into(), arg.into());
    }
    if let Some(ns) = &s.schemas.record_namespace {
        env.insert("SCHEMA_RECORD_NAMESPACE".into(), ns.clone());
    }
    env.insert("SUBJECT_NAME_STRATEGY".into(), s.schemas.subject_name_strategy.arg().into());
    env.insert("VALUE_LAYOUT".into(), value_name(&s.schemas.value_layout));
    let routes: Vec<String> = s.routes.iter().map(RouteSpec::rule_text).collect();
    insert_list(&mut env, "OUTBOX_ROUTES", routes, ',');
    env.insert("RELAY_BATCH_SIZE".into(), s.batch_size.to_string());
    env.insert("RELAY_POLL_INTERVAL_MS".into(), s.poll_interval_ms.to_string());
    env.insert("RELAY_BACKOFF_INITIAL_MS".into(), s.backoff.initial_ms.to_string());
    env.insert("RELAY_BACKOFF_MAX_MS".into(), s.backoff.max_ms.to_string());
    env.insert("RELAY_BACKOFF_MULTIPLIER".into(), s.backoff.multiplier.to_string());
    env.insert("RELAY_MAX_ATTEMPTS".into(), s.backoff.max_attempts.to_string());
    env.insert("RELAY_RETENTION_SECONDS".into(), s.retention_seconds.to_string());
    env.insert("RELAY_LEASE_BACKEND".into(), "kubernetes".into());
    // One lease per outbox (per range of it), not per resource: two
    // OutboxRelays on one outbox (in one namespace) never publish at once.
    env.insert("RELAY_LEASE_NAME".into(), outbox_lease_name(&s.mongodb.database, &s.mongodb.collection));
    env.insert("RELAY_SHARDS".into(), s.shards.to_string());
    let leases = relay_ranges(s)
        .iter()
        .map(|range| range_lease_name(&s.mongodb.database, &s.mongodb.collection, range))
        .collect();
    build(
        Common {
            kafka_auth_secret: s.kafka.auth_secret.as_deref(),
            registry_auth_secret: s.schema_registry.auth_secret.as_deref(),
            namespace: r.metadata.namespace.clone().unwrap_or_default(),
            name,
            component: "outbox-relay",
            owner: owner(r),
            replicas: if s.paused { 0 } else { s.replicas },
            pod: &s.pod,
            mongodb: &s.mongodb,
            command: "relay",
            env,
            leases,
            schemas_config_map: s.schemas.config_map.as_deref(),
            secret_env: Vec::new(),
        },
        ctx,
    )
}

/// The children of an `EventConsumer`.
pub fn consumer_children(c: &EventConsumer, ctx: &BuildContext) -> Children {
    let s = &c.spec;
    let mut env = shared_env(&s.mongodb, &s.kafka, &s.schema_registry);
    insert_list(&mut env, "KAFKA_CONSUMER_CONFIG", client_config(&s.kafka.client_config), OVERRIDES_DELIMITER);
    env.insert("CONSUMER_TOPICS".into(), s.topics.join(","));
    env.insert("CONSUMER_GROUP".into(), s.group_id.clone());
    let handler = match s.handler.type_ {
        HandlerType::Projection => "projection",
        HandlerType::Webhook => "webhook",
        HandlerType::Log => "log",
    };
    env.insert("CONSUMER_HANDLER".into(), handler.into());
    if let Some(url) = &s.handler.webhook_url {
        env.insert("WEBHOOK_URL".into(), url.clone());
    }
    if let Some(ms) = s.handler.webhook_timeout_ms {
        env.insert("WEBHOOK_TIMEOUT_MS".into(), ms.to_string());
    }
    if let Some(mode) = &s.handler.content_mode {
        env.insert("WEBHOOK_CONTENT_MODE".into(), value_name(mode));
    }
    if let Some(max) = s.handler.batch_max_events {
        env.insert("WEBHOOK_BATCH_MAX".into(), max.to_string());
    }
    if let Some(source) = &s.handler.source {
        env.insert("WEBHOOK_SOURCE".into(), source.clone());
    }
    let secret_env: Vec<(&'static str, &SecretKeyRef)> = [
        ("WEBHOOK_SIGNING_SECRET", s.handler.signing_secret.as_ref()),
        ("WEBHOOK_BEARER_TOKEN", s.handler.bearer_token_secret.as_ref()),
    ]
    .into_iter()
    .filter_map(|(var, secret)| Some((var, secret?)))
    .collect();
    env.insert("CONSUMER_MAX_ATTEMPTS".into(), s.retry.max_attempts.to_string());
    env.insert("CONSUMER_BACKOFF_INITIAL_MS".into(), s.retry.initial_ms.to_string());
    env.insert("CONSUMER_BACKOFF_MAX_MS".into(), s.retry.max_ms.to_string());
    env.insert("CONSUMER_BACKOFF_MULTIPLIER".into(), s.retry.multiplier.to_string());
    env.insert("DEAD_LETTER_SUFFIX".into(), s.dead_letter_suffix.clone());
    env.insert("PROCESSED_RETENTION_SECONDS".into(), s.processed_retention_seconds.to_string());
    let horizon = match s.beyond_dedup_horizon {
        BeyondHorizonPolicy::Wait => "wait",
        BeyondHorizonPolicy::Apply => "apply",
    };
    env.insert("CONSUMER_BEYOND_DEDUP_HORIZON".into(), horizon.into());
    env.insert("CONSUMER_BATCH_SIZE".into(), s.batch_size.to_string());
    env.insert("CONSUMER_LINGER_MS".into(), s.linger_ms.to_string());
    env.insert("CONSUMER_ORDERING".into(), value_name(&s.ordering));
    env.insert("CONSUMER_MAX_IN_FLIGHT".into(), s.max_in_flight.to_string());
    if s.schemas.config_map.is_some() {
        env.insert("SCHEMAS_DIR".into(), SCHEMAS_MOUNT.into());
    }
    let mut children = build(
        Common {
            kafka_auth_secret: s.kafka.auth_secret.as_deref(),
            registry_auth_secret: s.schema_registry.auth_secret.as_deref(),
            name: c.metadata.name.clone().unwrap_or_default(),
            namespace: c.metadata.namespace.clone().unwrap_or_default(),
            component: CONSUMER,
            owner: owner(c),
            replicas: if s.paused { 0 } else { s.replicas },
            pod: &s.pod,
            mongodb: &s.mongodb,
            command: "consume",
            env,
            leases: Vec::new(),
            schemas_config_map: s.schemas.config_map.as_deref(),
            secret_env,
        },
        ctx,
    );
    children.rebuild_job = s.rebuild.as_deref().map(|request| rebuild_job(&children.deployment, request));
    children
}

/// The name of every child of a resource: `<component>-<resource name>`.
fn child_name(component: &str, name: &str) -> String {
    format!("{component}-{name}")
}

/// The Job of an EventConsumer's requested rebuild, if one is requested.
pub fn consumer_rebuild_job_name(c: &EventConsumer) -> Option<String> {
    let deployment = child_name(CONSUMER, c.metadata.name.as_deref().unwrap_or_default());
    c.spec.rebuild.as_deref().map(|r| rebuild_job_name(&deployment, r))
}

/// The Job name of a rebuild request: the consumer's, `-rebuild-`, and a
/// hash of the request (a new request, a new Job).
pub fn rebuild_job_name(deployment: &str, request: &str) -> String {
    one_off_job_name(deployment, "rebuild", request)
}

/// A one-off Job's name: the consumer's, `-<what>-`, and a hash of the
/// request (a new request, a new Job).
fn one_off_job_name(deployment: &str, what: &str, request: &str) -> String {
    let hash = config_hash(&BTreeMap::from([(what.to_owned(), request.to_owned())]));
    // A Job's name is also a label value: 63 characters at most.
    let base: String = deployment.chars().take(63 - what.len() - 2 - 8).collect();
    format!("{}-{what}-{}", base.trim_end_matches('-'), &hash[..8])
}

/// The Job of a rebuild request: the consumer's pod and settings running
/// `outbox consume rebuild` until it completes (a pod that fails is
/// started again and resumes from the saved positions).
fn rebuild_job(deployment: &Deployment, request: &str) -> Job {
    let name = rebuild_job_name(deployment.metadata.name.as_deref().unwrap_or_default(), request);
    let mut job = one_off_job(deployment, &name, "outbox-consumer-rebuild", &["consume", "rebuild"]);
    job.metadata.annotations = Some(BTreeMap::from([("outbox.dev/rebuild".to_owned(), request.to_owned())]));
    job
}

/// The Job of an `OutboxRedrive` of an EventConsumer (`request`, its uid):
/// the consumer's pod and settings running `outbox consume redrive` over
/// its dead-letter topics, owned by the request.
pub fn redrive_job(c: &EventConsumer, ctx: &BuildContext, request: &OwnerReference) -> Job {
    let deployment = consumer_children(c, ctx).deployment;
    let name = one_off_job_name(deployment.metadata.name.as_deref().unwrap_or_default(), "redrive", &request.uid);
    let mut args = vec!["consume".to_owned(), "redrive".to_owned(), "--request".to_owned(), request.uid.clone()];
    for topic in c.spec.dead_letter_topics() {
        args.extend(["--dead-letter-topic".to_owned(), topic]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut job = one_off_job(&deployment, &name, "outbox-consumer-redrive", &args);
    job.metadata.owner_references = Some(vec![request.clone()]);
    job.metadata.annotations = Some(BTreeMap::from([("outbox.dev/request".to_owned(), request.name.clone())]));
    job
}

/// A Job running the Deployment's pod with `args` until it completes (a pod
/// that fails is started again). Its pods carry their own name label
/// (`component`), so the consumer's Service, budget and Deployment do not
/// count them.
fn one_off_job(deployment: &Deployment, name: &str, component: &str, args: &[&str]) -> Job {
    let mut meta = serde_json::to_value(&deployment.metadata).expect("metadata serializes");
    meta["name"] = json!(name);
    meta["labels"]["app.kubernetes.io/name"] = json!(component);
    let mut template = serde_json::to_value(&deployment.spec.as_ref().expect("deployment spec").template)
        .expect("template serializes");
    template["metadata"]["labels"]["app.kubernetes.io/name"] = json!(component);
    template["spec"]["restartPolicy"] = json!("OnFailure");
    let container = &mut template["spec"]["containers"][0];
    container["args"] = json!(args);
    let c = container.as_object_mut().expect("container");
    for field in ["livenessProbe", "readinessProbe", "ports"] {
        c.remove(field);
    }
    from(json!({"metadata": meta, "spec": {"backoffLimit": 10, "template": template}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELAY: &str = r#"
apiVersion: outbox.dev/v1alpha1
kind: OutboxRelay
metadata: {name: sessions, namespace: shop, uid: 1234}
spec:
  mongodb: {uriSecret: {name: mongo, key: uri}, database: sessions}
  schemas: {configMap: session-schemas}
  kafka: {bootstrapServers: "kafka:9092", clientConfig: {linger.ms: "10"}}
  schemaRegistry: {url: "http://registry:8081"}
  routes: [{aggregateType: Session, topic: session-events.v1}]
"#;

    fn relay(yaml: &str) -> OutboxRelay {
        serde_saphyr::from_str(yaml).expect("fixture parses")
    }

    fn ctx() -> BuildContext {
        BuildContext { default_image: "outbox-operator:dev".into(), image_pull_policy: "IfNotPresent".into() }
    }

    fn env_of(ch: &Children) -> BTreeMap<String, String> {
        ch.config_map.data.clone().unwrap()
    }

    #[test]
    fn a_relay_gets_its_deployment_with_config_secrets_by_reference_and_hardening() {
        let ch = relay_children(&relay(RELAY), &ctx());
        let d = serde_json::to_value(&ch.deployment).unwrap();
        assert_eq!(d["metadata"]["name"], "outbox-relay-sessions");
        assert_eq!(d["metadata"]["namespace"], "shop");
        assert_eq!(d["metadata"]["ownerReferences"][0]["kind"], "OutboxRelay");
        assert_eq!(d["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(d["spec"]["replicas"], 2);
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "outbox-operator:dev");
        assert_eq!(c["args"], json!(["relay"]));
        assert_eq!(c["env"][0]["valueFrom"]["secretKeyRef"], json!({"name": "mongo", "key": "uri"}));
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        let text = format!("{d}{}", serde_json::to_string(&ch.config_map).unwrap());
        assert!(!text.contains("mongodb://"), "no connection string in any child");
        let env = env_of(&ch);
        assert_eq!(env["OUTBOX_ROUTES"], "Session=session-events.v1");
        assert_eq!(env["KAFKA_PRODUCER_CONFIG"], "linger.ms=10");
        assert_eq!(env["RELAY_LEASE_BACKEND"], "kubernetes");
        assert_eq!(env["RELAY_BACKOFF_MAX_MS"], "300000");
    }

    #[test]
    fn the_schema_configmap_is_mounted_read_only_and_named_to_the_relay() {
        let ch = relay_children(&relay(RELAY), &ctx());
        let d = serde_json::to_value(&ch.deployment).unwrap();
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["volumes"], json!([{"name": "schemas", "configMap": {"name": "session-schemas"}}]));
        assert_eq!(
            pod["containers"][0]["volumeMounts"],
            json!([{"name": "schemas", "mountPath": SCHEMAS_MOUNT, "readOnly": true}])
        );
        let env = env_of(&ch);
        assert_eq!(env["SCHEMAS_DIR"], SCHEMAS_MOUNT);
        assert_eq!(
            (env["SUBJECT_NAME_STRATEGY"].as_str(), env["VALUE_LAYOUT"].as_str()),
            ("topic-record-name", "envelope")
        );
        assert!(!env.contains_key("SCHEMAS_FROM_REGISTRY"));

        let yaml = RELAY.replace(
            "schemas: {configMap: session-schemas}",
            "schemas: {fromRegistry: eventVersion, recordNamespace: com.acme, subjectNameStrategy: TopicName, valueLayout: payload}",
        );
        let ch = relay_children(&relay(&yaml), &ctx());
        let d = serde_json::to_value(&ch.deployment).unwrap();
        assert_eq!(d["spec"]["template"]["spec"]["volumes"], json!([]));
        let env = env_of(&ch);
        assert_eq!(env["SCHEMAS_FROM_REGISTRY"], "event-version");
        assert_eq!(env["SCHEMA_RECORD_NAMESPACE"], "com.acme");
        assert_eq!((env["SUBJECT_NAME_STRATEGY"].as_str(), env["VALUE_LAYOUT"].as_str()), ("topic-name", "payload"));
        assert!(!env.contains_key("SCHEMAS_DIR"));
    }

    #[test]
    fn credentials_come_from_secrets_by_reference() {
        let yaml = RELAY
            .replace(
                "kafka: {bootstrapServers: \"kafka:9092\", clientConfig: {linger.ms: \"10\"}}",
                "kafka: {bootstrapServers: \"kafka:9092\", authSecret: kafka-creds}",
            )
            .replace(
                "schemaRegistry: {url: \"http://registry:8081\"}",
                "schemaRegistry: {url: \"http://registry:8081\", authSecret: sr-creds}",
            );
        let ch = relay_children(&relay(&yaml), &ctx());
        let d = serde_json::to_value(&ch.deployment).unwrap();
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["envFrom"][1], json!({"secretRef": {"name": "kafka-creds"}, "prefix": "KAFKA_AUTH_"}));
        let env = c["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "SCHEMA_REGISTRY_PASSWORD"
            && e["valueFrom"]["secretKeyRef"] == json!({"name": "sr-creds", "key": "password"})));
    }

    #[test]
    fn pod_env_adds_variables_after_the_operators_and_may_not_replace_one() {
        let with_env = |env: &str| RELAY.to_owned() + &format!("  pod: {{env: {env}}}\n");
        let ch = relay_children(
            &relay(&with_env(r#"[{name: OTEL_EXPORTER_OTLP_ENDPOINT, value: "http://collector:4318"}]"#)),
            &ctx(),
        );
        assert_eq!(ch.check_env(), Ok(()));
        let d = serde_json::to_value(&ch.deployment).unwrap();
        let env = d["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap().clone();
        assert_eq!(
            env.last().unwrap(),
            &json!({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://collector:4318"})
        );
        assert_eq!(env[0]["name"], "MONGODB_URI", "the operator's own first");

        // One from the ConfigMap, one of the container's own: both named.
        let ch = relay_children(
            &relay(&with_env(
                "[{name: RELAY_SHARDS, value: \"4\"}, {name: POD_NAME, value: x}, {name: RUST_LOG, value: debug}]",
            )),
            &ctx(),
        );
        assert_eq!(
            ch.check_env(),
            Err("spec.pod.env: RELAY_SHARDS, POD_NAME are set by the operator from the resource's spec; set the \
                 spec's field instead"
                .into())
        );
    }

    #[test]
    fn the_relay_role_allows_only_its_lease() {
        let ch = relay_children(&relay(RELAY), &ctx());
        let role = serde_json::to_value(ch.role.unwrap()).unwrap();
        // The outbox's lease (database sessions, collection outbox), not one per resource.
        assert_eq!(role["rules"][1]["resourceNames"], json!([crate::lease::outbox_lease_name("sessions", "outbox")]));
        assert_eq!(role["rules"][1]["verbs"], json!(["get", "update"]));
        assert_eq!(role["rules"].as_array().unwrap().len(), 2);
        let binding = serde_json::to_value(ch.role_binding.unwrap()).unwrap();
        assert_eq!(binding["subjects"][0]["name"], "outbox-relay-sessions");
    }

    #[test]
    fn a_sharded_relay_has_one_lease_per_range_and_tells_its_pods_the_split() {
        let ch = relay_children(&relay(&format!("{RELAY}  shards: 3\n")), &ctx());
        let role = serde_json::to_value(ch.role.unwrap()).unwrap();
        let names: Vec<String> =
            split(DEFAULT_BUCKETS, 3).iter().map(|r| crate::lease::range_lease_name("sessions", "outbox", r)).collect();
        assert_eq!(role["rules"][1]["resourceNames"], json!(names));
        assert_eq!(ch.lease_names, names);
        assert!(names[2].contains("-r2of3-"), "{names:?}");
        assert_eq!(ch.config_map.data.unwrap()["RELAY_SHARDS"], "3");
        // Its pods prefer different nodes.
        let d = serde_json::to_value(&ch.deployment).unwrap();
        let spread = &d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            [0]["podAffinityTerm"];
        assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
        assert_eq!(spread["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"], "sessions");
    }

    #[test]
    fn a_spec_change_changes_the_config_hash_and_paused_scales_to_zero() {
        let a = relay_children(&relay(RELAY), &ctx());
        let b = relay_children(&relay(&format!("{RELAY}  batchSize: 50\n")), &ctx());
        let hash = |c: &Children| {
            serde_json::to_value(&c.deployment).unwrap()["spec"]["template"]["metadata"]["annotations"]["outbox.dev/config-hash"]
                .clone()
        };
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(hash(&a), hash(&relay_children(&relay(RELAY), &ctx())), "stable");
        let paused = relay_children(&relay(&format!("{RELAY}  paused: true\n")), &ctx());
        assert_eq!(serde_json::to_value(&paused.deployment).unwrap()["spec"]["replicas"], 0);
    }

    #[test]
    fn a_consumer_needs_no_api_access() {
        let c: EventConsumer = serde_saphyr::from_str(
            r#"
apiVersion: outbox.dev/v1alpha1
kind: EventConsumer
metadata: {name: readmodel, namespace: shop, uid: 99}
spec:
  topics: [session-events.v1]
  groupId: readmodel
  handler: {type: webhook, webhookUrl: "http://hook"}
  mongodb: {uriSecret: {name: mongo, key: uri}, database: sessions}
  kafka: {bootstrapServers: "kafka:9092"}
  schemaRegistry: {url: "http://registry:8081"}
"#,
        )
        .unwrap();
        let ch = consumer_children(&c, &ctx());
        assert!(ch.role.is_none() && ch.role_binding.is_none());
        assert_eq!(ch.service_account.automount_service_account_token, Some(false));
        let env = env_of(&ch);
        assert_eq!((env["CONSUMER_HANDLER"].as_str(), env["WEBHOOK_URL"].as_str()), ("webhook", "http://hook"));
        assert_eq!(env["CONSUMER_GROUP"], "readmodel");
        let d = serde_json::to_value(&ch.deployment).unwrap();
        assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["args"], json!(["consume"]));
        assert_eq!(d["spec"]["replicas"], 1);
        assert!(ch.rebuild_job.is_none(), "no rebuild requested");
        let request = OwnerReference { uid: "req-1".into(), ..OwnerReference::default() };
        let job = serde_json::to_value(redrive_job(&c, &ctx(), &request)).unwrap();
        assert_eq!(
            job["spec"]["template"]["spec"]["containers"][0]["args"],
            json!(["consume", "redrive", "--request", "req-1", "--dead-letter-topic", "session-events.v1.dlq"])
        );
    }

    #[test]
    fn a_signed_cloudevents_webhook_reads_its_secrets_from_secret_keys() {
        let c: EventConsumer = serde_saphyr::from_str(
            r#"
apiVersion: outbox.dev/v1alpha1
kind: EventConsumer
metadata: {name: orders-hook, namespace: shop, uid: 99}
spec:
  topics: [orders]
  groupId: orders-hook
  handler:
    type: webhook
    webhookUrl: "https://billing/events"
    contentMode: structured
    source: /shop/orders
    signingSecret: {name: hook-secrets, key: signing}
    bearerTokenSecret: {name: hook-secrets, key: token}
  mongodb: {uriSecret: {name: mongo, key: uri}, database: orders}
  kafka: {bootstrapServers: "kafka:9092"}
  schemaRegistry: {url: "http://registry:8081"}
"#,
        )
        .unwrap();
        let ch = consumer_children(&c, &ctx());
        let env = env_of(&ch);
        assert_eq!(
            (env["WEBHOOK_CONTENT_MODE"].as_str(), env["WEBHOOK_SOURCE"].as_str()),
            ("structured", "/shop/orders")
        );
        assert!(!env.contains_key("WEBHOOK_SIGNING_SECRET"), "never in the ConfigMap");
        let d = serde_json::to_value(&ch.deployment).unwrap();
        let vars = d["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap().clone();
        let from_secret =
            |name: &str| vars.iter().find(|v| v["name"] == name).map(|v| v["valueFrom"]["secretKeyRef"].clone());
        assert_eq!(from_secret("WEBHOOK_SIGNING_SECRET"), Some(json!({"name": "hook-secrets", "key": "signing"})));
        assert_eq!(from_secret("WEBHOOK_BEARER_TOKEN"), Some(json!({"name": "hook-secrets", "key": "token"})));
    }

    #[test]
    fn a_rebuild_request_gets_one_job_running_the_consumers_pod_with_its_own_labels() {
        let yaml = |extra: &str| {
            format!(
                r#"
apiVersion: outbox.dev/v1alpha1
kind: EventConsumer
metadata: {{name: readmodel, namespace: shop, uid: 99}}
spec:
  topics: [session-events.v1]
  groupId: readmodel
  handler: {{type: projection}}
  mongodb: {{uriSecret: {{name: mongo, key: uri}}, database: sessions}}
  kafka: {{bootstrapServers: "kafka:9092"}}
  schemaRegistry: {{url: "http://registry:8081"}}
  batchSize: 200
{extra}"#
            )
        };
        let c: EventConsumer = serde_saphyr::from_str(&yaml("  rebuild: \"2026-11-23\"")).unwrap();
        let ch = consumer_children(&c, &ctx());
        assert_eq!(
            (env_of(&ch)["CONSUMER_BATCH_SIZE"].as_str(), env_of(&ch)["CONSUMER_LINGER_MS"].as_str()),
            ("200", "0")
        );
        let env = env_of(&ch);
        assert_eq!(
            (env["CONSUMER_ORDERING"].as_str(), env["CONSUMER_MAX_IN_FLIGHT"].as_str()),
            ("key", "16"),
            "defaults"
        );
        let c: EventConsumer = serde_saphyr::from_str(&yaml("  ordering: partition\n  maxInFlight: 64")).unwrap();
        let env = env_of(&consumer_children(&c, &ctx()));
        assert_eq!((env["CONSUMER_ORDERING"].as_str(), env["CONSUMER_MAX_IN_FLIGHT"].as_str()), ("partition", "64"));
        let job = serde_json::to_value(ch.rebuild_job.as_ref().expect("a job")).unwrap();
        let name = job["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with("outbox-consumer-readmodel-rebuild-") && name.len() <= 63, "{name}");
        let pod = &job["spec"]["template"];
        assert_eq!(pod["spec"]["restartPolicy"], "OnFailure");
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["args"], json!(["consume", "rebuild"]));
        assert!(container.get("livenessProbe").is_none() && container.get("ports").is_none());
        let d = serde_json::to_value(&ch.deployment).unwrap();
        let consumer = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["envFrom"], consumer["envFrom"], "the consumer's settings");
        assert_eq!(container["env"], consumer["env"]);
        // The consumer's Service and budget select its own pods, not the rebuild's.
        assert_eq!(pod["metadata"]["labels"]["app.kubernetes.io/name"], "outbox-consumer-rebuild");
        assert_eq!(d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"], "outbox-consumer");
        let again = consumer_children(&serde_saphyr::from_str(&yaml("  rebuild: \"2026-11-24\"")).unwrap(), &ctx());
        assert_ne!(again.rebuild_job.unwrap().metadata.name.unwrap(), name, "a new request, a new job");
        let long = rebuild_job_name(&"x".repeat(80), "r");
        assert_eq!(long.len(), 63);
    }
}
