//! The `EventConsumer` controller: the shared skeleton (`reconcile`) with
//! the consumer's validation, children and observation (the group's lag
//! and the dead-letter topics in Kafka, the processed-events store in
//! MongoDB).

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::controller::Action;

use super::{
    children::{BuildContext, Children, consumer_children},
    crd::{EventConsumer, EventConsumerStatus, PartitionLagStatus},
    probes,
    reconcile::{Context, Observed, ReconcileError, Reconciled, reconcile},
};
use crate::processed::ProcessedStore;

impl Reconciled for EventConsumer {
    type Status = EventConsumerStatus;
    const PODS: &'static str = "consumer";
    const WORKING: &'static str = "Consuming";

    fn validate(&self) -> Result<(), String> {
        self.spec.validate()
    }

    fn children(&self, build: &BuildContext) -> Children {
        consumer_children(self, build)
    }

    fn paused(&self) -> bool {
        self.spec.paused
    }

    fn previous_conditions(&self) -> &[Condition] {
        self.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default()
    }

    async fn observe(&self, ctx: &Context, ns: &str) -> Observed<EventConsumerStatus> {
        let spec = &self.spec;
        let mut status = EventConsumerStatus::default();
        let mut degraded = None;
        let bootstrap = &spec.kafka.bootstrap_servers;
        // Records on the dead-letter topics: what a group that never reads them lags by.
        let dlq: Vec<String> = spec.topics.iter().map(|t| format!("{t}{}", spec.dead_letter_suffix)).collect();
        let lag = match probes::kafka_auth(&ctx.client, ns, spec.kafka.auth_secret.as_deref()).await {
            Ok(auth) => probes::group_lag(bootstrap, &auth, &spec.group_id, &spec.topics, &dlq).await,
            Err(cause) => Err(cause),
        };
        match lag {
            Ok((l, dead_lettered)) => {
                status.dead_lettered = dead_lettered;
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
            Err(cause) => degraded = Some(cause),
        }
        let group = spec.group_id.clone();
        let processed = ctx
            .probes
            .mongo(&ctx.client, ns, &spec.mongodb, |db| async move { ProcessedStore::new(&db, &group).count().await })
            .await;
        match processed {
            Ok(n) => status.processed = n as i64,
            Err(cause) => degraded = degraded.or(Some(cause)),
        }
        Observed { status, degraded, conditions: Vec::new() }
    }
}

pub async fn reconcile_consumer(c: Arc<EventConsumer>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    reconcile(c, ctx).await
}
