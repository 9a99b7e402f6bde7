//! An `OutboxRelay`'s settings, as its pods' environment.

use super::{
    BuildContext, Children, Common, SCHEMAS_MOUNT, build, client_config, insert_list, owner, shared_env, value_name,
};
use crate::{
    kafka::OVERRIDES_DELIMITER,
    lease::{outbox_lease_name, range_lease_name},
    operator::crd::{OutboxRelay, OutboxRelaySpec, RegistryVersion, RouteSpec},
    outbox::bucket::{BucketRange, DEFAULT_BUCKETS, split},
};

/// The bucket ranges of a relay's outbox (`spec.shards` of the default
/// bucket count, as the relay pods split it).
pub fn relay_ranges(s: &OutboxRelaySpec) -> Vec<BucketRange> {
    split(DEFAULT_BUCKETS, u32::try_from(s.shards).unwrap_or(1))
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
