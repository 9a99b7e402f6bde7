//! `outbox operator` and its custom resources: `crd` holds the
//! `OutboxRelay` and `EventConsumer` types (the source of `crds/`),
//! `children` builds what each resource owns (pure), `controller`
//! reconciles them. Two operator replicas can run: one leads through a
//! Kubernetes Lease, the other waits.

pub mod children;
pub mod controller;
pub mod crd;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api, Client,
    runtime::{Controller, watcher},
};
use prometheus::Registry;
use tokio::sync::watch;

use crate::{Error, Result, relay::kube_lease::KubeLease, telemetry};
use children::BuildContext;
use controller::{Context, OperatorMetrics, error_policy, reconcile_consumer, reconcile_relay};
use crd::{EventConsumer, OutboxRelay};

#[derive(Debug, Clone, clap::Args)]
pub struct OperatorArgs {
    /// Watch only this namespace (all namespaces when absent).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Image of the relay and consumer pods when a resource names none.
    #[arg(long, env = "OUTBOX_IMAGE", default_value = "outbox-operator:latest")]
    pub image: String,
    /// Address for /metrics, /healthz, /readyz.
    #[arg(long, env = "METRICS_LISTEN", default_value = "127.0.0.1:9466")]
    pub metrics_listen: std::net::SocketAddr,
    /// Elect one active operator through a Lease (run two replicas safely).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the operator's Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease (defaults to the host name).
    #[arg(long, env = "HOSTNAME", default_value = "outbox-operator")]
    pub identity: String,
}

pub async fn main(args: OperatorArgs) -> Result<()> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        telemetry::shutdown_signal().await;
        let _ = tx.send(true);
    });
    run_until(args, rx).await
}

/// Run the controllers until `stop` turns true or leadership is lost.
pub async fn run_until(args: OperatorArgs, mut stop: watch::Receiver<bool>) -> Result<()> {
    let client = Client::try_default()
        .await
        .map_err(|e| Error::Unavailable { service: "the Kubernetes API", detail: e.to_string() })?;
    let registry = Registry::new();
    let metrics = OperatorMetrics::register(&registry)?;
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|source| Error::Io { path: args.metrics_listen.to_string(), source })?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, telemetry::admin_router(registry, telemetry::always_ready())).await;
    });

    let lease = KubeLease::new(
        client.clone(),
        &args.lease_namespace,
        "outbox-operator",
        &args.identity,
        Duration::from_secs(15),
    );
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

    let ctx = Arc::new(Context::new(client.clone(), BuildContext { default_image: args.image.clone() }, metrics));
    let (relays, consumers, deployments): (Api<OutboxRelay>, Api<EventConsumer>, Api<Deployment>) =
        match &args.namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone())),
        };
    let shutdown = {
        let mut stop = stop.clone();
        async move {
            let _ = stop.changed().await;
        }
    };
    let shutdown2 = {
        let mut stop = stop.clone();
        async move {
            let _ = stop.changed().await;
        }
    };
    let relay_ctl = Controller::new(relays, watcher::Config::default())
        .owns(deployments.clone(), watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile_relay, error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "relay controller");
            }
        });
    let consumer_ctl = Controller::new(consumers, watcher::Config::default())
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
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            match lease.acquire().await {
                Ok(true) => {}
                Ok(false) => return Err(Error::Config("lost the operator lease to another replica".into())),
                Err(e) => tracing::warn!(error = %e, "renewing the operator lease"),
            }
        }
    };
    tokio::select! {
        _ = futures::future::join(relay_ctl, consumer_ctl) => {}
        r = renew => return r,
    }
    if args.leader_election {
        let _ = lease.release().await;
    }
    Ok(())
}
