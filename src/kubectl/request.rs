//! `kubectl outbox redrive|discard`: create an `OutboxRedrive` for a relay
//! or a consumer and follow its status, printing progress, until it ends. The exit status
//! says how it ended (failure: the request failed, or it was not created).

use kube::{
    Api, Client, ResourceExt,
    api::{ObjectMeta, PostParams},
};

use super::{FOLLOW_EVERY, Target};
use crate::{
    Error, Result,
    operator::crd::redrive::{
        OutboxRedrive, OutboxRedriveSpec, RedriveAction, RedrivePhase, RedriveSelection, RedriveTarget, SelectedStatus,
    },
};

#[derive(Debug, Clone, clap::Args)]
pub struct RequestArgs {
    /// `relay/NAME` or `consumer/NAME` (also `orl/`, `ec/`); a bare NAME is a relay if one has
    /// it, else a consumer.
    pub target: String,
    /// Events in this state (relays; a consumer acts on its dead-lettered events).
    #[arg(long, value_enum, default_value = "dead")]
    pub status: SelectedStatus,
    /// Only these aggregates' events (repeat for more; for a consumer, to discard only).
    #[arg(long)]
    pub aggregate: Vec<String>,
    /// Only events of these names (repeat for more).
    #[arg(long)]
    pub event_name: Vec<String>,
    /// Only events that occurred at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Only events that occurred before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    /// Who asks (default: the kubeconfig's user name, else $USER).
    #[arg(long)]
    pub requested_by: Option<String>,
    /// Create the request and return without following it.
    #[arg(long)]
    pub no_wait: bool,
    /// Stop following after this long (the request goes on; `kubectl get outboxredrive NAME -w`).
    #[arg(long, default_value_t = 600)]
    pub timeout_seconds: u64,
}

impl RequestArgs {
    /// Requested by the impersonated user unless `--requested-by` says otherwise.
    pub fn asked_as(mut self, user: Option<String>) -> Self {
        self.requested_by = self.requested_by.or(user);
        self
    }
}

/// The request an invocation creates.
fn spec(args: &RequestArgs, target: RedriveTarget, reason: Option<String>, requested_by: String) -> OutboxRedriveSpec {
    OutboxRedriveSpec {
        target,
        action: if reason.is_some() { RedriveAction::Discard } else { RedriveAction::Redrive },
        reason,
        requested_by: Some(requested_by),
        selection: RedriveSelection {
            status: args.status,
            aggregate_ids: args.aggregate.clone(),
            event_names: args.event_name.clone(),
            occurred_after: args.since.clone(),
            occurred_before: args.until.clone(),
        },
    }
}

/// The kubeconfig's user of the current context, else `$USER`.
fn who() -> String {
    kube::config::Kubeconfig::read()
        .ok()
        .and_then(|k| {
            let current = k.current_context.clone()?;
            let ctx = k.contexts.iter().find(|c| c.name == current)?.context.clone()?;
            ctx.user
        })
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
}

pub async fn run(client: &Client, ns: &str, args: &RequestArgs, reason: Option<String>) -> Result<()> {
    let by = args.requested_by.clone().unwrap_or_else(who);
    let action = if reason.is_some() { "discard" } else { "redrive" };
    let (kind, name) = Target::parse(&args.target).resolve(client, ns).await?;
    let request = OutboxRedrive {
        metadata: ObjectMeta { generate_name: Some(format!("{name}-{action}-")), ..Default::default() },
        spec: spec(args, RedriveTarget { kind, name }, reason, by),
        status: None,
    };
    let api: Api<OutboxRedrive> = Api::namespaced(client.clone(), ns);
    let created = api.create(&PostParams::default(), &request).await?;
    let name = created.name_any();
    println!("outboxredrive/{name} created");
    if args.no_wait {
        return Ok(());
    }
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(args.timeout_seconds);
    loop {
        let r = api.get(&name).await?;
        let s = r.status.unwrap_or_default();
        let line = format!(
            "{:<9} matched {:>6}  done {:>6}  waiting {:>6}  errors {:>4}  {}",
            s.phase.map_or("Pending".to_owned(), |p| format!("{p:?}")),
            s.matched,
            s.done,
            s.waiting,
            s.errors,
            s.message.as_deref().unwrap_or_default()
        );
        if line != last {
            println!("{line}");
            last = line;
        }
        match s.phase {
            Some(RedrivePhase::Completed) => return Ok(()),
            Some(RedrivePhase::Failed) => {
                return Err(Error::RequestFailed(format!(
                    "outboxredrive/{name} failed: {}",
                    s.message.unwrap_or_default()
                )));
            }
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(Error::RequestFailed(format!(
                    "outboxredrive/{name} has not ended after {} s; it goes on: kubectl get outboxredrive {name} -w",
                    args.timeout_seconds
                )));
            }
            _ => tokio::time::sleep(FOLLOW_EVERY).await,
        }
    }
}
