//! `outbox operator` and its custom resources:
//! - `crd`: the `OutboxRelay`, `EventConsumer` and `OutboxRedrive` types
//!   (the source of `crds/`), their rules and what is generated from them;
//! - `controllers`: one per kind (`relay`, `consumer`, `redrive`) on the
//!   skeleton they share (`reconcile`);
//! - `children`: what each resource owns, built from its spec (pure);
//! - `status`: conditions from plain values (pure); `probes`: reads the
//!   sources of truth (MongoDB, Kafka, the pods' reports).
//!
//! The controllers manage pods; what runs in them is `crate::relay` and
//! `crate::consumer`. Two operator replicas can run: one leads through a Kubernetes
//! Lease, the other waits; a leader that cannot renew its Lease within the
//! Lease's duration stops.

pub mod children;
pub mod controllers;
pub mod crd;
pub mod probes;
pub mod status;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api, Client,
    runtime::{Controller, watcher},
};
use prometheus::Registry;

use crate::{
    Error, Result,
    lease::kube::KubeLease,
    lifecycle::{self, Stop},
    telemetry,
};
use children::BuildContext;
use controllers::{
    consumer::reconcile_consumer,
    reconcile::{Context, OperatorMetrics, error_policy},
    redrive::reconcile_redrive,
    relay::reconcile_relay,
};
use crd::{EventConsumer, OutboxRelay, redrive::OutboxRedrive};

/// How long the operator's Lease lasts unrenewed, and how often it is renewed.
pub const OPERATOR_LEASE: Duration = Duration::from_secs(15);
const OPERATOR_LEASE_RENEW: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, clap::Args)]
pub struct OperatorArgs {
    /// Watch only this namespace (all namespaces when absent).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Image of the relay and consumer pods when a resource names none.
    #[arg(long, env = "OUTBOX_IMAGE", default_value = "outbox-operator:latest")]
    pub image: String,
    /// `imagePullPolicy` of the relay and consumer pods (`Never` for images
    /// loaded straight into the node, as on the local stack).
    #[arg(long, env = "OUTBOX_IMAGE_PULL_POLICY", default_value = "IfNotPresent",
          value_parser = ["Always", "IfNotPresent", "Never"])]
    pub image_pull_policy: String,
    /// Address for /metrics, /healthz, /readyz.
    #[arg(long, env = "METRICS_LISTEN", default_value = "127.0.0.1:9466")]
    pub metrics_listen: std::net::SocketAddr,
    /// Reconciles run at once, per kind. Bounded: each holds connections to
    /// the apiserver and, for consumers, short-lived Kafka clients, so an
    /// unbounded burst (every resource at start-up or at a requeue) costs
    /// memory that is not given back.
    #[arg(long, env = "OPERATOR_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// Elect one active operator through a Lease (run two replicas safely).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the operator's Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease: the pod's name (`POD_NAME`,
    /// from the downward API), or the host name outside a pod.
    #[arg(long, env = "POD_NAME", default_value_t = default_identity())]
    pub identity: String,
}

pub async fn main(args: OperatorArgs) -> Result<()> {
    run_until(args, lifecycle::stop_on_signal()).await
}

/// Run the controllers until `stop` turns true or leadership is lost.
pub async fn run_until(args: OperatorArgs, mut stop: Stop) -> Result<()> {
    let client = Client::try_default().await?;
    let registry = Registry::new();
    let metrics = OperatorMetrics::register(&registry)?;
    lifecycle::serve_admin(args.metrics_listen, registry, telemetry::always_ready()).await?;

    let lease =
        KubeLease::new(client.clone(), &args.lease_namespace, "outbox-operator", &args.identity, OPERATOR_LEASE);
    if args.leader_election {
        loop {
            match lease.acquire().await {
                Ok(true) => break,
                Ok(false) => tracing::info!("another operator leads; standing by"),
                Err(e) => tracing::warn!(error = %e, "operator lease"),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
        tracing::info!(identity = %args.identity, "leading");
    }

    let ctx = Arc::new(Context::new(
        client.clone(),
        BuildContext { default_image: args.image.clone(), image_pull_policy: args.image_pull_policy.clone() },
        metrics,
    ));
    let (relays, consumers, deployments): (Api<OutboxRelay>, Api<EventConsumer>, Api<Deployment>) =
        match &args.namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone())),
        };
    let requests: Api<OutboxRedrive> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let shutdown = lifecycle::stopping(stop.clone());
    let shutdown2 = lifecycle::stopping(stop.clone());
    let shutdown3 = lifecycle::stopping(stop.clone());
    let redrive_ctl = controller_for(requests)
        .with_config(kube::runtime::controller::Config::default().concurrency(args.concurrency))
        .graceful_shutdown_on(shutdown3)
        .run(reconcile_redrive, error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "redrive controller");
            }
        });
    let config = kube::runtime::controller::Config::default().concurrency(args.concurrency);
    let relay_ctl = controller_for(relays)
        .with_config(config.clone())
        .owns(deployments.clone(), watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile_relay, error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "relay controller");
            }
        });
    let consumer_ctl = controller_for(consumers)
        .with_config(config)
        .owns(deployments, watcher::Config::default())
        .graceful_shutdown_on(shutdown2)
        .run(reconcile_consumer, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "consumer controller");
            }
        });
    let renew = async {
        if !args.leader_election {
            return std::future::pending::<Result<()>>().await;
        }
        renew_until_lost(&lease).await
    };
    tokio::select! {
        _ = futures::future::join3(relay_ctl, consumer_ctl, redrive_ctl) => {}
        r = renew => {
            tracing::error!("stopping: this replica no longer holds the operator lease");
            return r;
        }
    }
    if args.leader_election {
        let _ = lease.release().await;
    }
    Ok(())
}

/// Renew the operator's Lease until it is lost. Deadlines run on this
/// process's monotonic clock, as client-go's leader election does: once
/// `OPERATOR_LEASE` has passed since the last successful renewal (failed
/// or hanging calls included), another replica may already lead, so this
/// one returns `Error::LeaseLost` and the process stops reconciling.
async fn renew_until_lost(lease: &KubeLease) -> Result<()> {
    let mut renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(OPERATOR_LEASE_RENEW).await;
        let deadline = renewed + OPERATOR_LEASE;
        match tokio::time::timeout_at(deadline, lease.acquire()).await {
            Ok(Ok(true)) => renewed = tokio::time::Instant::now(),
            Ok(Ok(false)) => {
                tracing::error!("another operator replica took the lease");
                return Err(Error::LeaseLost("operator"));
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing the operator lease failed; retrying"),
            Err(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::error!(lease_seconds = OPERATOR_LEASE.as_secs(), "the operator lease was not renewed in time");
            return Err(Error::LeaseLost("operator"));
        }
    }
}

fn default_identity() -> String {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "outbox-operator".into())
}

/// A controller whose cache keeps each resource without what reconciles never
/// read: `managedFields` and kubectl's last-applied annotation are often
/// larger than the spec and status together, and the cache holds every
/// resource for the operator's lifetime (`make bench-operator-memory`).
fn controller_for<K>(api: Api<K>) -> Controller<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    use kube::runtime::{WatchStreamExt, reflector};
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|obj: &mut K| {
            obj.meta_mut().managed_fields = None;
            if let Some(a) = obj.meta_mut().annotations.as_mut() {
                a.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
        })
        .reflect(writer)
        .applied_objects();
    Controller::for_stream(stream, reader)
}
