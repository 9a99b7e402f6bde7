//! The objects a custom resource owns, built by a pure function from its
//! spec: ConfigMap (the non-secret settings, as environment), ServiceAccount,
//! Role and RoleBinding (relays only: the Lease they elect through),
//! Deployment (same image, `outbox relay` / `outbox consume`, the MongoDB
//! URI from its Secret, probes, non-root, read-only root filesystem),
//! Service for metrics, PodDisruptionBudget. A spec change changes the
//! ConfigMap hash on the pod template, which rolls the pods.
//!
//! `relay` and `consumer` turn each kind's spec into settings; `build`
//! here makes the objects both share; `jobs` the consumer's one-off Jobs
//! (rebuild, redrive).

mod consumer;
mod jobs;
mod relay;

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        batch::v1::Job,
        core::v1::{
            Affinity, Capabilities, ConfigMap, ConfigMapEnvSource, ConfigMapVolumeSource, Container, ContainerPort,
            EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity,
            PodSecurityContext, PodSpec as K8sPodSpec, PodTemplateSpec, Probe, SecretEnvSource, SecretKeySelector,
            SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
            WeightedPodAffinityTerm,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};

pub use consumer::{consumer_children, consumer_rebuild_job_name};
pub use jobs::{rebuild_job_name, redrive_job};
pub use relay::{relay_children, relay_ranges};

use super::crd::{KafkaSpec, MongoDbSpec, PodSpec, SchemaRegistrySpec, SecretKeyRef};

/// The command-line name of a setting's value (the pods' environment
/// takes what their flags take).
fn value_name<E: clap::ValueEnum>(value: &E) -> String {
    value.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default()
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

/// The labels of every child and of the pods: the selector too.
fn labels(c: &Common<'_>) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), c.component.to_owned()),
        ("app.kubernetes.io/instance".to_owned(), c.name.clone()),
        ("app.kubernetes.io/managed-by".to_owned(), MANAGER.to_owned()),
    ])
}

fn meta(c: &Common<'_>, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(c.namespace.clone()),
        labels: Some(labels(c)),
        owner_references: Some(vec![c.owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn selector(c: &Common<'_>) -> LabelSelector {
    LabelSelector { match_labels: Some(labels(c)), ..LabelSelector::default() }
}

/// A variable read from a Secret's key.
fn from_secret(var: &str, secret: &str, key: &str) -> EnvVar {
    let selector = SecretKeySelector { name: secret.to_owned(), key: key.to_owned(), optional: None };
    EnvVar {
        name: var.to_owned(),
        value_from: Some(EnvVarSource { secret_key_ref: Some(selector), ..EnvVarSource::default() }),
        ..EnvVar::default()
    }
}

/// A variable read from a field of the pod.
fn from_field(var: &str, field_path: &str) -> EnvVar {
    let field = ObjectFieldSelector { field_path: field_path.to_owned(), api_version: None };
    EnvVar {
        name: var.to_owned(),
        value_from: Some(EnvVarSource { field_ref: Some(field), ..EnvVarSource::default() }),
        ..EnvVar::default()
    }
}

fn probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("metrics".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(10),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The Role and RoleBinding of pods that elect through `leases`: create
/// Leases, read and renew only those.
fn lease_access(c: &Common<'_>, child: &str) -> (Role, RoleBinding) {
    let leases = |verbs: &[&str], names: Option<Vec<String>>| PolicyRule {
        api_groups: Some(strings(&["coordination.k8s.io"])),
        resources: Some(strings(&["leases"])),
        resource_names: names,
        verbs: strings(verbs),
        ..PolicyRule::default()
    };
    let role = Role {
        metadata: meta(c, child),
        rules: Some(vec![leases(&["create"], None), leases(&["get", "update"], Some(c.leases.clone()))]),
    };
    let binding = RoleBinding {
        metadata: meta(c, child),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: child.to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: child.to_owned(),
            namespace: Some(c.namespace.clone()),
            ..Subject::default()
        }]),
    };
    (role, binding)
}

/// The variables the operator sets on the container itself: the MongoDB
/// URI, the pod's identity, and credentials, each from its Secret.
fn operator_env(c: &Common<'_>) -> Vec<EnvVar> {
    let mut env = vec![
        from_secret("MONGODB_URI", &c.mongodb.uri_secret.name, &c.mongodb.uri_secret.key),
        from_field("POD_NAMESPACE", "metadata.namespace"),
        // The pod's identity (the relay's Lease holder): its own name, never
        // HOSTNAME, which host-network pods share with the machine.
        from_field("POD_NAME", "metadata.name"),
    ];
    if let Some(secret) = c.registry_auth_secret {
        env.push(from_secret("SCHEMA_REGISTRY_USERNAME", secret, REGISTRY_SECRET_USERNAME));
        env.push(from_secret("SCHEMA_REGISTRY_PASSWORD", secret, REGISTRY_SECRET_PASSWORD));
    }
    for (var, secret) in &c.secret_env {
        env.push(from_secret(var, &secret.name, &secret.key));
    }
    env
}

/// The pod's one container: the operator's variables (`env`), then
/// `spec.pod.env`'s.
fn container(c: &Common<'_>, ctx: &BuildContext, child: &str, mut env: Vec<EnvVar>) -> Container {
    let mut env_from = vec![EnvFromSource {
        config_map_ref: Some(ConfigMapEnvSource { name: child.to_owned(), optional: None }),
        ..EnvFromSource::default()
    }];
    if let Some(secret) = c.kafka_auth_secret {
        // Keys like SASL_USERNAME become KAFKA_AUTH_SASL_USERNAME -> sasl.username.
        env_from.push(EnvFromSource {
            secret_ref: Some(SecretEnvSource { name: secret.to_owned(), optional: None }),
            prefix: Some("KAFKA_AUTH_".to_owned()),
            ..EnvFromSource::default()
        });
    }
    env.extend(c.pod.env.iter().cloned());
    let volume_mounts = c.schemas_config_map.map(|_| {
        vec![VolumeMount {
            name: "schemas".to_owned(),
            mount_path: SCHEMAS_MOUNT.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]
    });
    Container {
        name: c.component.to_owned(),
        image: Some(c.pod.image.clone().unwrap_or_else(|| ctx.default_image.clone())),
        image_pull_policy: Some(ctx.image_pull_policy.clone()),
        args: Some(vec![c.command.to_owned()]),
        env_from: Some(env_from),
        env: Some(env),
        // `protocol` spelled out: server-side apply keys these lists by it.
        ports: Some(vec![ContainerPort {
            name: Some("metrics".to_owned()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(probe("/healthz")),
        readiness_probe: Some(probe("/readyz")),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(strings(&["ALL"])), add: None }),
            ..SecurityContext::default()
        }),
        volume_mounts,
        resources: c.pod.resources.clone(),
        ..Container::default()
    }
}

/// The variables of `spec.pod.env` the operator sets itself: its env
/// entries (`own`), the ConfigMap's keys, and the Kafka credentials'
/// prefix when a Secret supplies them.
fn refused_env(c: &Common<'_>, own: &[EnvVar]) -> Vec<String> {
    c.pod
        .env
        .iter()
        .map(|v| v.name.clone())
        .filter(|name| {
            own.iter().any(|e| e.name == *name)
                || c.env.contains_key(name)
                || (c.kafka_auth_secret.is_some() && name.starts_with("KAFKA_AUTH_"))
        })
        .collect()
}

fn build(c: Common<'_>, ctx: &BuildContext) -> Children {
    let child = child_name(c.component, &c.name);
    let hash = config_hash(&c.env);
    let config_map = ConfigMap { metadata: meta(&c, &child), data: Some(c.env.clone()), ..ConfigMap::default() };
    let needs_api = !c.leases.is_empty();
    let service_account = ServiceAccount {
        metadata: meta(&c, &child),
        automount_service_account_token: Some(needs_api),
        ..ServiceAccount::default()
    };
    let (role, role_binding) = if needs_api {
        let (role, binding) = lease_access(&c, &child);
        (Some(role), Some(binding))
    } else {
        (None, None)
    };
    let own_env = operator_env(&c);
    let refused_env = refused_env(&c, &own_env);
    let container = container(&c, ctx, &child, own_env);
    let volumes = c
        .schemas_config_map
        .map(|name| Volume {
            name: "schemas".to_owned(),
            config_map: Some(ConfigMapVolumeSource { name: name.to_owned(), ..ConfigMapVolumeSource::default() }),
            ..Volume::default()
        })
        .into_iter()
        .collect();
    // Replicas on different nodes where there are several: relays
    // publishing ranges side by side, consumers sharing partitions, a
    // standby that outlives a node.
    let spread = Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(selector(&c)),
                    topology_key: "kubernetes.io/hostname".to_owned(),
                    ..PodAffinityTerm::default()
                },
            }]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    };
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(&c)),
            annotations: Some(BTreeMap::from([("outbox.dev/config-hash".to_owned(), hash)])),
            ..ObjectMeta::default()
        }),
        spec: Some(K8sPodSpec {
            service_account_name: Some(child.clone()),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                ..PodSecurityContext::default()
            }),
            affinity: Some(spread),
            containers: vec![container],
            volumes: Some(volumes),
            ..K8sPodSpec::default()
        }),
    };
    let deployment = Deployment {
        metadata: meta(&c, &child),
        spec: Some(DeploymentSpec {
            replicas: Some(c.replicas),
            selector: selector(&c),
            template,
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let service = Service {
        metadata: meta(&c, &child),
        spec: Some(ServiceSpec {
            selector: Some(labels(&c)),
            ports: Some(vec![ServicePort {
                name: Some("metrics".to_owned()),
                port: METRICS_PORT,
                target_port: Some(IntOrString::String("metrics".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let pdb = PodDisruptionBudget {
        metadata: meta(&c, &child),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(selector(&c)),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };
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

/// The name of every child of a resource: `<component>-<resource name>`.
fn child_name(component: &str, name: &str) -> String {
    format!("{component}-{name}")
}

#[cfg(test)]
mod tests;
