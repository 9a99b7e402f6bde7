//! The relay's command line: `outbox relay [flags]` and `outbox relay
//! redrive ...`, each flag with its environment variable, and what the
//! relay derives from them (backoff policy, identity, lease).

use std::time::Duration;

use crate::{
    Error, Result,
    avro::catalog::SchemaDir,
    backoff::BackoffPolicy,
    kafka::{OVERRIDES_DELIMITER, parse_override, topics::TopicRule},
    lease::{Lease, kube::KubeLease, mongo::MongoLease, outbox_lease_name, range_lease_name},
    outbox::bucket::{BucketRange, split},
    relay::schemas::SchemaSource,
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
    /// Which events to act on.
    #[arg(long, value_enum)]
    pub status: RedriveFrom,
    /// Only these aggregates' events (repeat the flag for more).
    #[arg(long)]
    pub aggregate: Vec<String>,
    /// Only events of these names (repeat the flag for more).
    #[arg(long)]
    pub event_name: Vec<String>,
    /// Give the events up instead (kept as `discarded`, with this reason and `--by`).
    #[arg(long, value_name = "REASON")]
    pub discard: Option<String>,
    /// Who discards (recorded on each row).
    #[arg(long, env = "USER", default_value = "outbox-cli")]
    pub by: String,
}

impl RedriveArgs {
    pub fn selection(&self) -> crate::outbox::requests::Selection {
        use crate::outbox::{OutboxStatus, requests::Selection};
        let status = match self.status {
            RedriveFrom::Dead => OutboxStatus::Dead,
            RedriveFrom::Failed => OutboxStatus::Failed,
        };
        Selection {
            aggregate_ids: self.aggregate.clone(),
            event_names: self.event_name.clone(),
            ..Selection::all(status)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LeaseBackend {
    Auto,
    Mongodb,
    Kubernetes,
}

#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("schema-source").required(true).args(["schemas_dir", "schemas_from_registry"])))]
pub struct RelayArgs {
    #[command(flatten)]
    pub mongo: MongoArgs,
    /// Directory of the event schemas, `<aggregateType>.<eventName>.v<eventVersion>.avsc`
    /// anywhere below it (a mounted ConfigMap in a pod), read again every 5 s.
    #[arg(long, env = "SCHEMAS_DIR")]
    pub schemas_dir: Option<std::path::PathBuf>,
    /// Take each event's schema from the registry instead: the subject's newest version
    /// (`latest`) or the version numbered as the event's `eventVersion`.
    #[arg(long, env = "SCHEMAS_FROM_REGISTRY", value_enum)]
    pub schemas_from_registry: Option<crate::relay::schemas::RegistryVersion>,
    /// Namespace of the record names the record-name subject strategies use with
    /// schemas from the registry: `<namespace>.<eventName>` (the event name alone when unset).
    #[arg(long, env = "SCHEMA_RECORD_NAMESPACE")]
    pub schema_record_namespace: Option<String>,
    /// How schema subjects are named (Confluent's strategies): `<topic>-<record>`,
    /// `<topic>-value` or `<record>`.
    #[arg(long, env = "SUBJECT_NAME_STRATEGY", value_enum, default_value = "topic-record-name")]
    pub subject_name_strategy: crate::registry_client::SubjectStrategy,
    /// What a record's value holds: the whole event (`envelope`), or its payload alone with
    /// the envelope in headers (`payload`, Debezium's outbox layout).
    #[arg(long, env = "VALUE_LAYOUT", value_enum, default_value = "envelope")]
    pub value_layout: crate::avro::ValueLayout,
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
    /// Bucket ranges the outbox is split into, each published by one relay
    /// at a time (its own lease and checkpoint); the relays of the outbox
    /// share the ranges out. 1: the whole outbox, one active relay. Every
    /// relay of an outbox must run with the same value: one with another
    /// value waits until the relays of the oldest live one's value have left.
    #[arg(long, env = "RELAY_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub shards: u32,
    /// Virtual buckets the writers hash aggregates into (`OUTBOX_BUCKETS` of
    /// the session API); the ranges split these. A writer with another
    /// value still has every row published (the first and last ranges are
    /// open-ended), only less evenly spread.
    #[arg(long, env = "OUTBOX_BUCKETS", default_value_t = crate::outbox::bucket::DEFAULT_BUCKETS, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub buckets: u32,
    /// How long a range lease lasts without renewal, in seconds.
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

    /// Where the event schemas come from; a schema directory that cannot
    /// be read is refused.
    pub fn schema_source(&self) -> Result<SchemaSource> {
        match (&self.schemas_dir, self.schemas_from_registry) {
            (Some(dir), None) => {
                let watched = SchemaDir::open(dir).map_err(|e| {
                    Error::Config(format!("SCHEMAS_DIR {}: cannot read the schema directory: {e}", dir.display()))
                })?;
                Ok(SchemaSource::Files(std::sync::Arc::new(watched)))
            }
            (None, Some(version)) => {
                Ok(SchemaSource::Registry { version, record_namespace: self.schema_record_namespace.clone() })
            }
            _ => Err(Error::Config("give one schema source: SCHEMAS_DIR or SCHEMAS_FROM_REGISTRY".into())),
        }
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

    /// The bucket ranges of the outbox (`--shards` of `--buckets`); more
    /// shards than buckets is refused.
    pub fn ranges(&self) -> Result<Vec<BucketRange>> {
        if self.shards > self.buckets {
            return Err(Error::Config(format!(
                "RELAY_SHARDS {} is more than the outbox's {} buckets: every range needs at least one bucket",
                self.shards, self.buckets
            )));
        }
        Ok(split(self.buckets, self.shards))
    }

    /// The lease of each range, in the store `--lease-backend` picks.
    pub async fn leases(&self, db: &mongodb::Database, relay_id: &str, ranges: &[BucketRange]) -> Result<Vec<Lease>> {
        let ttl = Duration::from_secs(self.lease_seconds);
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        let names: Vec<String> =
            ranges.iter().map(|r| range_lease_name(&self.mongo.database, &self.mongo.collection, r)).collect();
        let kubernetes = match self.lease_backend {
            LeaseBackend::Mongodb => false,
            LeaseBackend::Kubernetes => true,
            LeaseBackend::Auto => in_cluster,
        };
        if !kubernetes {
            return Ok(names.iter().map(|n| Lease::Mongo(MongoLease::new(db, n, relay_id, ttl))).collect());
        }
        let client = kube::Client::try_default().await?;
        let namespace = self.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
        tracing::info!(leases = ?names, namespace = %namespace, "using Kubernetes Leases");
        Ok(names
            .iter()
            .map(|n| Lease::Kube(Box::new(KubeLease::new(client.clone(), &namespace, n, relay_id, ttl))))
            .collect())
    }
}
