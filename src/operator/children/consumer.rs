//! An `EventConsumer`'s settings, as its pods' environment.

use super::jobs::{rebuild_job, rebuild_job_name};
use super::{
    BuildContext, CONSUMER, Children, Common, SCHEMAS_MOUNT, build, child_name, client_config, insert_list, owner,
    shared_env, value_name,
};
use crate::{
    kafka::OVERRIDES_DELIMITER,
    operator::crd::{BeyondHorizonPolicy, EventConsumer, HandlerType, SecretKeyRef},
};

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

/// The Job of an EventConsumer's requested rebuild, if one is requested.
pub fn consumer_rebuild_job_name(c: &EventConsumer) -> Option<String> {
    let deployment = child_name(CONSUMER, c.metadata.name.as_deref().unwrap_or_default());
    c.spec.rebuild.as_deref().map(|r| rebuild_job_name(&deployment, r))
}
