//! The relay's command line: `outbox relay [flags]` and `outbox relay
//! redrive ...`, each flag with its environment variable, and what the
//! relay derives from them (backoff policy, identity, lease).

use std::time::Duration;

use crate::{
    Error, Result,
    backoff::BackoffPolicy,
    kafka::{OVERRIDES_DELIMITER, parse_override, topics::TopicRule},
    lease::{Lease, kube::KubeLease, mongo::MongoLease, outbox_lease_name},
};

/// Where the outbox is.
#[derive(Debug, Clone, clap::Args)]
pub struct MongoArgs {
    /// MongoDB connection string (replica set).
    #[arg(long, env = "MONGODB_URI")]
    pub mongodb_uri: String,
    /// Database holding the outbox.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "sessions")]
    pub database: String,
    /// Outbox collection.
    #[arg(long, env = "OUTBOX_COLLECTION", default_value = "outbox")]
    pub collection: String,
}

/// `outbox relay [flags]` runs the relay; `outbox relay redrive ...` puts
/// dead or failed events back.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RelayCommand {
    #[command(subcommand)]
    pub action: Option<RelayAction>,
    #[command(flatten)]
    pub run: RelayArgs,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum RelayAction {
    /// Put dead or failed events back to pending (fresh attempt budget) and report how many.
    Redrive(RedriveArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RedriveFrom {
    Dead,
    Failed,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RedriveArgs {
    #[command(flatten)]
    pub mongo: MongoArgs,
    /// Which events to put back.
    #[arg(long, value_enum)]
    pub status: RedriveFrom,
    /// Only this aggregate's events.
    #[arg(long)]
    pub aggregate: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LeaseBackend {
    Auto,
    Mongodb,
    Kubernetes,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub mongo: MongoArgs,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    pub kafka_bootstrap: String,
    /// Confluent-compatible Schema Registry URL.
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: String,
    /// Register event schemas on first use; when off, an unregistered schema fails its events.
    #[arg(long, env = "SCHEMA_AUTO_REGISTER", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_register_schemas: bool,
    /// Routing rules `Aggregate[.Event]=topic` (repeat, or comma-separated in the env var).
    #[arg(long = "route", env = "OUTBOX_ROUTES", value_delimiter = ',')]
    pub routes: Vec<TopicRule>,
    /// librdkafka producer overrides `key=value` (repeat, or one per line in the env var: values may hold commas).
    #[arg(long = "producer-config", env = "KAFKA_PRODUCER_CONFIG", value_delimiter = OVERRIDES_DELIMITER, value_parser = parse_override)]
    pub producer_config: Vec<(String, String)>,
    /// This relay's identity in the lease (defaults to the pod's name, `POD_NAME`,
    /// then the host name).
    #[arg(long, env = "RELAY_ID")]
    pub relay_id: Option<String>,
    /// Events taken from the change stream and published per batch (one
    /// checkpoint write each).
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// How often to look for failed rows due for a retry (and redriven
    /// ones), in milliseconds.
    #[arg(long, env = "RELAY_POLL_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub poll_interval_ms: u64,
    /// How long a batch may wait for more events after its first (0: take
    /// what has arrived; latency first).
    #[arg(long, env = "RELAY_LINGER_MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub linger_ms: u64,
    /// How far the writers' clocks may lag: cleanup keeps, and a recovery
    /// scan rereads, this much before the checkpoint's last event.
    #[arg(long, env = "RELAY_CLOCK_SKEW_MARGIN_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub clock_skew_margin_seconds: u64,
    /// Where the one-active-relay lease lives: a Kubernetes Lease (in a
    /// cluster), a MongoDB document, or auto (Kubernetes when running in a pod).
    #[arg(long, env = "RELAY_LEASE_BACKEND", value_enum, default_value = "auto")]
    pub lease_backend: LeaseBackend,
    /// Name of the Lease / lease document. Always the outbox's,
    /// `outbox-relay-<database>-<collection>-<hash>` (one lease per outbox);
    /// a different name is refused.
    #[arg(long, env = "RELAY_LEASE_NAME")]
    pub lease_name: Option<String>,
    /// Namespace of the Kubernetes Lease (default: the pod's / kubeconfig's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long the outbox lease lasts without renewal, in seconds.
    #[arg(long, env = "RELAY_LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub lease_seconds: u64,
    /// First retry delay after a failed publish, in milliseconds.
    #[arg(long, env = "RELAY_BACKOFF_INITIAL_MS", default_value_t = 1000)]
    pub backoff_initial_ms: u64,
    /// Longest retry delay, in milliseconds.
    #[arg(long, env = "RELAY_BACKOFF_MAX_MS", default_value_t = 300_000)]
    pub backoff_max_ms: u64,
    /// Growth of the retry delay per attempt.
    #[arg(long, env = "RELAY_BACKOFF_MULTIPLIER", default_value_t = 2.0)]
    pub backoff_multiplier: f64,
    /// Attempts before an event goes dead.
    #[arg(long, env = "RELAY_MAX_ATTEMPTS", default_value_t = 10)]
    pub max_attempts: u32,
    /// Relative jitter of retry delays, 0..1.
    #[arg(long, env = "RELAY_BACKOFF_JITTER", default_value_t = 0.2)]
    pub backoff_jitter: f64,
    /// Keep published rows this long, in seconds (for replay); the active
    /// relay deletes older published history.
    #[arg(long, env = "RELAY_RETENTION_SECONDS", default_value_t = 7 * 24 * 3600, value_parser = clap::value_parser!(u64).range(60..))]
    pub retention_seconds: u64,
    /// Address for /metrics, /healthz, /readyz.
    #[arg(long, env = "METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: std::net::SocketAddr,
}

impl RelayArgs {
    pub fn backoff(&self) -> Result<BackoffPolicy> {
        let policy = BackoffPolicy {
            initial: Duration::from_millis(self.backoff_initial_ms),
            max: Duration::from_millis(self.backoff_max_ms),
            multiplier: self.backoff_multiplier,
            max_attempts: self.max_attempts,
            jitter: self.backoff_jitter,
        };
        policy.validate().map_err(Error::Config)?;
        Ok(policy)
    }

    pub fn relay_id(&self) -> String {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        self.relay_id
            .clone()
            .or_else(|| var("POD_NAME"))
            .or_else(|| var("HOSTNAME"))
            .unwrap_or_else(|| format!("relay-{}", std::process::id()))
    }

    /// The name of the outbox's lease; a `--lease-name` other than it is
    /// refused (checked before anything is connected or written).
    pub fn outbox_lease(&self) -> Result<String> {
        let name = outbox_lease_name(&self.mongo.database, &self.mongo.collection);
        if let Some(other) = self.lease_name.as_ref().filter(|n| **n != name) {
            return Err(Error::Config(format!(
                "RELAY_LEASE_NAME {other} is not this outbox's lease {name}: one lease per outbox (database and \
                 collection), so relays of one outbox can never hold two"
            )));
        }
        Ok(name)
    }

    /// The outbox lease of this relay, in the store `--lease-backend` picks.
    pub async fn lease(&self, db: &mongodb::Database, relay_id: &str) -> Result<Lease> {
        let ttl = Duration::from_secs(self.lease_seconds);
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        let name = self.outbox_lease()?;
        match self.lease_backend {
            LeaseBackend::Mongodb => Ok(Lease::Mongo(MongoLease::new(db, &name, relay_id, ttl))),
            LeaseBackend::Auto if !in_cluster => Ok(Lease::Mongo(MongoLease::new(db, &name, relay_id, ttl))),
            LeaseBackend::Auto | LeaseBackend::Kubernetes => {
                let client = kube::Client::try_default().await?;
                let namespace = self.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
                tracing::info!(lease = %name, namespace = %namespace, "using a Kubernetes Lease");
                Ok(Lease::Kube(Box::new(KubeLease::new(client, &namespace, &name, relay_id, ttl))))
            }
        }
    }
}
