//! `kubectl outbox`: the `outbox` binary installed as the kubectl plugin
//! `kubectl-outbox` (a link or copy of it by that name on the PATH, Krew's
//! convention). It talks to the Kubernetes API only, with the kubeconfig's
//! credentials: never to MongoDB or Kafka. `status` reads a resource's
//! status (`view`); `redrive` and `discard` create an `OutboxRedrive` and
//! follow it to its end (`request`); `pause` and `resume` set
//! `spec.paused`.

mod request;
mod view;

use std::time::Duration;

use clap::{Parser, Subcommand};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use crate::{
    Error, Result,
    operator::{
        crd::redrive::RedriveTargetKind,
        crd::{EventConsumer, OutboxRelay},
    },
};

#[derive(Debug, Parser)]
#[command(name = "kubectl outbox", version, about = "Operate outbox relays and event consumers from kubectl")]
pub struct PluginCli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,
    /// Kubeconfig context (default: the current one).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Act as this user (impersonation, as kubectl's --as; kubectl does not pass its own flags
    /// to plugins).
    #[arg(long = "as", global = true)]
    pub as_user: Option<String>,
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// A readable view of an OutboxRelay or EventConsumer: ranges and publishers, pending,
    /// failed, dead events with their errors, backoff; lag, waiting partitions, parked aggregates.
    Status {
        /// `relay/NAME` (or `orl/NAME`) or `consumer/NAME` (or `ec/NAME`); a bare NAME is looked
        /// up as a relay, then as a consumer.
        target: String,
    },
    /// Redrive an OutboxRelay's dead (or failed) events, or replay an EventConsumer's
    /// dead-letter topics: create an OutboxRedrive and follow it.
    Redrive(request::RequestArgs),
    /// Discard an OutboxRelay's dead (or failed) events, or an EventConsumer's parked aggregates,
    /// with a reason: create an OutboxRedrive and follow it.
    Discard {
        #[command(flatten)]
        request: request::RequestArgs,
        /// Why (recorded on every discarded event).
        #[arg(long)]
        reason: String,
    },
    /// Scale a relay or consumer to zero (`spec.paused: true`).
    Pause { target: String },
    /// Undo `pause`.
    Resume { target: String },
}

/// A resource named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Relay(String),
    Consumer(String),
    /// No kind given: a relay if one has the name, else a consumer.
    Either(String),
}

impl Target {
    pub fn parse(s: &str) -> Target {
        match s.split_once('/') {
            Some(("relay" | "orl" | "outboxrelay" | "outboxrelays", n)) => Target::Relay(n.to_owned()),
            Some(("consumer" | "ec" | "eventconsumer" | "eventconsumers", n)) => Target::Consumer(n.to_owned()),
            _ => Target::Either(s.to_owned()),
        }
    }

    /// Its kind and name; a bare name is a relay if one has it, else a consumer.
    pub async fn resolve(&self, client: &Client, ns: &str) -> Result<(RedriveTargetKind, String)> {
        Ok(match self {
            Target::Relay(n) => (RedriveTargetKind::OutboxRelay, n.clone()),
            Target::Consumer(n) => (RedriveTargetKind::EventConsumer, n.clone()),
            Target::Either(n) => {
                let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), ns);
                match relays.get_opt(n).await? {
                    Some(_) => (RedriveTargetKind::OutboxRelay, n.clone()),
                    None => (RedriveTargetKind::EventConsumer, n.clone()),
                }
            }
        })
    }
}

/// Run the plugin with `args` (the first is the program name).
pub async fn main(args: Vec<String>) -> Result<()> {
    let cli = PluginCli::parse_from(args);
    let (client, default_ns) = connect(cli.context.as_deref(), cli.as_user.clone()).await?;
    let ns = cli.namespace.unwrap_or(default_ns);
    match cli.command {
        PluginCommand::Status { target } => view::print_status(&client, &ns, &Target::parse(&target)).await,
        PluginCommand::Redrive(args) => request::run(&client, &ns, &args.asked_as(cli.as_user), None).await,
        PluginCommand::Discard { request, reason } => {
            request::run(&client, &ns, &request.asked_as(cli.as_user), Some(reason)).await
        }
        PluginCommand::Pause { target } => set_paused(&client, &ns, &Target::parse(&target), true).await,
        PluginCommand::Resume { target } => set_paused(&client, &ns, &Target::parse(&target), false).await,
    }
}

async fn connect(context: Option<&str>, as_user: Option<String>) -> Result<(Client, String)> {
    let options = kube::config::KubeConfigOptions { context: context.map(str::to_owned), ..Default::default() };
    let mut config = match kube::Config::from_kubeconfig(&options).await {
        Ok(c) => c,
        Err(_) if context.is_none() => kube::Config::infer().await.map_err(|e| Error::Config(e.to_string()))?,
        Err(e) => return Err(Error::Config(format!("kubeconfig context {context:?}: {e}"))),
    };
    if as_user.is_some() {
        config.auth_info.impersonate = as_user;
    }
    let ns = config.default_namespace.clone();
    Ok((Client::try_from(config)?, ns))
}

async fn set_paused(client: &Client, ns: &str, target: &Target, paused: bool) -> Result<()> {
    let patch = Patch::Merge(serde_json::json!({"spec": {"paused": paused}}));
    let params = PatchParams::default();
    let word = if paused { "paused" } else { "resumed" };
    match target.resolve(client, ns).await? {
        (RedriveTargetKind::OutboxRelay, n) => {
            let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), ns);
            relays.patch(&n, &params, &patch).await.map(|_| println!("outboxrelay/{n} {word}"))?
        }
        (RedriveTargetKind::EventConsumer, n) => {
            let consumers: Api<EventConsumer> = Api::namespaced(client.clone(), ns);
            consumers.patch(&n, &params, &patch).await.map(|_| println!("eventconsumer/{n} {word}"))?
        }
    }
    Ok(())
}

/// How often a followed request is read.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_names_its_kind_or_leaves_it_to_lookup() {
        assert_eq!(Target::parse("relay/orders"), Target::Relay("orders".into()));
        assert_eq!(Target::parse("orl/orders"), Target::Relay("orders".into()));
        assert_eq!(Target::parse("ec/billing"), Target::Consumer("billing".into()));
        assert_eq!(Target::parse("orders"), Target::Either("orders".into()));
    }
}
