//! The rules the schema cannot express: the CEL rules' messages, and the
//! checks the operator runs itself (clusters before 1.25 do not evaluate
//! CEL) along with whatever the pods would refuse at start.

use super::*;
use crate::kafka::{relay_producer_config, topics::TopicRule};

/// Messages of the schema source rule.
pub const RELAY_SCHEMAS_RULE: &str = "schemas: set exactly one of configMap and fromRegistry";

/// Messages of the CRDs' CEL rules, which the operator also checks itself
/// (clusters before 1.25 do not evaluate CEL).
pub const RELAY_BACKOFF_RULE: &str = "backoff.maxMs must be at least backoff.initialMs";
pub const WEBHOOK_URL_RULE: &str = "handler.webhookUrl is required for the webhook handler";
pub const REBUILD_RULE: &str = "rebuild: only the projection handler keeps a read model to rebuild";

impl BackoffSpec {
    /// Check the policy as the pods will (`field`: where it is in the spec).
    fn validate(&self, field: &str) -> Result<(), String> {
        if self.max_ms < self.initial_ms {
            return Err(format!("spec.{field}.maxMs must be at least spec.{field}.initialMs"));
        }
        self.policy(0.2).validate().map_err(|e| format!("spec.{field}: {e}"))
    }
}

impl OutboxRelaySpec {
    /// The rules the schema cannot express, and whatever the relay would
    /// refuse at start: the first violation.
    pub fn validate(&self) -> Result<(), String> {
        if self.schemas.config_map.is_some() == self.schemas.from_registry.is_some() {
            return Err(format!("spec.{RELAY_SCHEMAS_RULE}"));
        }
        self.backoff.validate("backoff")?;
        for r in &self.routes {
            r.rule_text().parse::<TopicRule>().map_err(|e| format!("spec.routes: {e}"))?;
        }
        let overrides: Vec<(String, String)> =
            self.kafka.client_config.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        relay_producer_config(&self.kafka.bootstrap_servers, &overrides)
            .map_err(|e| format!("spec.kafka.clientConfig: {e}"))?;
        Ok(())
    }
}

impl EventConsumerSpec {
    /// The dead-letter topic of each topic (`<topic><deadLetterSuffix>`), in the topics' order.
    pub fn dead_letter_topics(&self) -> Vec<String> {
        self.topics.iter().map(|t| format!("{t}{}", self.dead_letter_suffix)).collect()
    }

    /// The rules the schema cannot express, and whatever the consumer
    /// would refuse at start: the first violation.
    pub fn validate(&self) -> Result<(), String> {
        if self.handler.type_ == HandlerType::Webhook && self.handler.webhook_url.is_none() {
            return Err(format!("spec.{WEBHOOK_URL_RULE}"));
        }
        self.retry.validate("retry")?;
        if self.rebuild.is_some() && self.handler.type_ != HandlerType::Projection {
            return Err(format!("spec.{REBUILD_RULE}"));
        }
        if self.kafka.client_config.get("enable.auto.offset.store").is_some_and(|v| v != "false") {
            return Err("spec.kafka.clientConfig: enable.auto.offset.store must stay false (offsets are stored after the handler)".into());
        }
        Ok(())
    }
}
