//! The consumer's command line: `outbox consume [flags]` and `outbox
//! consume redrive ...`, each flag with its environment variable.

use std::time::Duration;

use crate::{
    Error, Result,
    backoff::BackoffPolicy,
    consumer::{
        decode::Readers,
        ordering::EventOrder,
        webhook::{ContentMode, WebhookSettings},
    },
    kafka::{OVERRIDES_DELIMITER, parse_override},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HandlerKind {
    /// Read model of sessions per user in MongoDB (exactly-once effect).
    Projection,
    /// HTTP POST of each event as a CloudEvent (Idempotency-Key = eventId).
    Webhook,
    /// Log each event.
    Log,
}

/// What is done with a record older than the processed-events retention:
/// its processed mark may have expired, so applying it could apply it twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BeyondHorizon {
    /// It waits, holding its lane (reason `beyond_dedup_horizon`, condition
    /// `PartitionsWaiting` / BeyondDedupHorizon) until the retention is
    /// raised or the group's offsets are moved past it.
    Wait,
    /// Apply it anyway (duplicates of events older than the retention are
    /// possible); counted in `outbox_consumer_beyond_dedup_horizon_total`.
    Apply,
}

/// `outbox consume [flags]` runs a consumer; `outbox consume redrive ...`
/// replays a dead-letter topic into the handler; `outbox consume rebuild
/// ...` rebuilds the projection's read model.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ConsumeCommand {
    #[command(subcommand)]
    pub action: Option<ConsumeAction>,
    #[command(flatten)]
    pub run: ConsumeArgs,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ConsumeAction {
    /// Replay dead-letter topics into the handler and report the counts.
    Redrive {
        /// A dead-letter topic to replay (repeat for more).
        #[arg(long, required = true)]
        dead_letter_topic: Vec<String>,
        /// The uid of the OutboxRedrive this carries out: progress and the
        /// end are saved in MongoDB for the operator to show.
        #[arg(long)]
        request: Option<String>,
        #[command(flatten)]
        args: ConsumeArgs,
    },
    /// Rebuild the projection's read model from the start of the topics
    /// into a new generation while the live consumers run, then switch
    /// readers to it (resumes when run again after a stop).
    Rebuild {
        #[command(flatten)]
        args: ConsumeArgs,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct ConsumeArgs {
    /// MongoDB connection string: processed-events store and the projection.
    #[arg(long, env = "MONGODB_URI")]
    pub mongodb_uri: String,
    /// Database for the processed-events store and the projection.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "sessions")]
    pub database: String,
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    pub kafka_bootstrap: String,
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: String,
    /// Directory of reader schemas (`<aggregateType>.<eventName>.v<N>.avsc`, read again every 5 s):
    /// an event is read as the newest version of its name found there. Without it, events are
    /// read with their writer schema (the projection handler reads the sample's Session schemas).
    #[arg(long, env = "SCHEMAS_DIR")]
    pub schemas_dir: Option<std::path::PathBuf>,
    /// Topics to consume (repeat, or comma-separated in the env var).
    #[arg(long = "topic", env = "CONSUMER_TOPICS", value_delimiter = ',', default_value = "session-events.v1")]
    pub topics: Vec<String>,
    /// Consumer group id; also scopes the processed-events store.
    #[arg(long, env = "CONSUMER_GROUP")]
    pub group_id: String,
    #[arg(long, env = "CONSUMER_HANDLER", value_enum, default_value = "log")]
    pub handler: HandlerKind,
    /// Target of the webhook handler.
    #[arg(long, env = "WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    #[arg(long, env = "WEBHOOK_TIMEOUT_MS", default_value_t = 5000)]
    pub webhook_timeout_ms: u64,
    /// CloudEvents content mode of the webhook's requests.
    #[arg(long, env = "WEBHOOK_CONTENT_MODE", value_enum, default_value = "binary")]
    pub webhook_content_mode: ContentMode,
    /// The most events per request in the `batch` content mode.
    #[arg(long, env = "WEBHOOK_BATCH_MAX", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub webhook_batch_max: u32,
    /// CloudEvents `source` of the webhook's events (default
    /// `/aggregates/<aggregateType>`).
    #[arg(long, env = "WEBHOOK_SOURCE")]
    pub webhook_source: Option<String>,
    /// Standard Webhooks secret (`whsec_<base64>`): each request is signed.
    #[arg(long, env = "WEBHOOK_SIGNING_SECRET", hide_env_values = true)]
    pub webhook_signing_secret: Option<String>,
    /// Sent as `Authorization: Bearer <token>` on each request.
    #[arg(long, env = "WEBHOOK_BEARER_TOKEN", hide_env_values = true)]
    pub webhook_bearer_token: Option<String>,
    /// Records taken per batch: decoded together, and for the projection
    /// deduplicated with one query and applied in one MongoDB transaction.
    #[arg(long, env = "CONSUMER_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// How long a batch may wait for more records after its first, in
    /// milliseconds (0: take what has arrived; latency first).
    #[arg(long, env = "CONSUMER_LINGER_MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub linger_ms: u64,
    /// Which records keep their order: `key` (the events of one aggregate,
    /// many aggregates at once), `partition`, or `unordered`.
    #[arg(long, env = "CONSUMER_ORDERING", value_enum, default_value = "key")]
    pub ordering: EventOrder,
    /// Lanes (aggregates, partitions or records, see `--ordering`) handled
    /// at once: the most handler calls in flight.
    #[arg(long, env = "CONSUMER_MAX_IN_FLIGHT", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_in_flight: u32,
    /// Attempts per record before it is dead-lettered.
    #[arg(long, env = "CONSUMER_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    #[arg(long, env = "CONSUMER_BACKOFF_INITIAL_MS", default_value_t = 200)]
    pub backoff_initial_ms: u64,
    #[arg(long, env = "CONSUMER_BACKOFF_MAX_MS", default_value_t = 10_000)]
    pub backoff_max_ms: u64,
    #[arg(long, env = "CONSUMER_BACKOFF_MULTIPLIER", default_value_t = 2.0)]
    pub backoff_multiplier: f64,
    /// Dead-letter topic of `<topic>` is `<topic><suffix>`.
    #[arg(long, env = "DEAD_LETTER_SUFFIX", default_value = ".dlq")]
    pub dead_letter_suffix: String,
    /// Keep processed-event records this long, in seconds (dedup window).
    #[arg(long, env = "PROCESSED_RETENTION_SECONDS", default_value_t = 7 * 24 * 3600)]
    pub processed_retention_seconds: u64,
    /// A record older than the retention (by its Kafka timestamp, with a
    /// minute's allowance for clock skew): wait or apply.
    #[arg(long, env = "CONSUMER_BEYOND_DEDUP_HORIZON", value_enum, default_value = "wait")]
    pub beyond_dedup_horizon: BeyondHorizon,
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u32,
    /// librdkafka consumer overrides `key=value` (repeat, or one per line in the env var: values may hold commas).
    #[arg(long = "consumer-config", env = "KAFKA_CONSUMER_CONFIG", value_delimiter = OVERRIDES_DELIMITER, value_parser = parse_override)]
    pub consumer_config: Vec<(String, String)>,
    /// This member's name in the group's reports for status (defaults to
    /// the pod's name, `POD_NAME`, else the host name and a random suffix).
    #[arg(long, env = "POD_NAME")]
    pub member_id: Option<String>,
    /// Address for /metrics, /healthz, /readyz.
    #[arg(long, env = "METRICS_LISTEN", default_value = "127.0.0.1:9465")]
    pub metrics_listen: std::net::SocketAddr,
    /// How often the group's lag is read for metrics, in seconds.
    #[arg(long, env = "LAG_INTERVAL_SECONDS", default_value_t = 10)]
    pub lag_interval_seconds: u64,
}

impl ConsumeArgs {
    /// The webhook handler's settings; the URL is required.
    pub fn webhook_settings(&self) -> std::result::Result<WebhookSettings, String> {
        let url = self.webhook_url.clone().ok_or("the webhook handler needs --webhook-url (WEBHOOK_URL)")?;
        Ok(WebhookSettings {
            url,
            timeout: Duration::from_millis(self.webhook_timeout_ms),
            mode: self.webhook_content_mode,
            batch_max: self.webhook_batch_max as usize,
            source: self.webhook_source.clone(),
            signing_secret: self.webhook_signing_secret.clone(),
            bearer_token: self.webhook_bearer_token.clone(),
        })
    }

    /// The decoder's reader schemas (see `--schemas-dir`); a directory
    /// that is watched for changes is watched from here on.
    pub fn readers(&self) -> Result<Readers> {
        let readers = match (&self.schemas_dir, self.handler) {
            (None, HandlerKind::Projection) => Readers::sample(),
            (dir, _) => Readers::from_dir(dir.as_deref()).map_err(|e| {
                Error::Config(format!("SCHEMAS_DIR {:?}: cannot read the schema directory: {e}", self.schemas_dir))
            })?,
        };
        if let Some(dir) = readers.watched() {
            tokio::spawn(dir.watch(std::future::pending()));
        }
        Ok(readers)
    }

    /// Records not done a partition may hold (in flight or queued behind a
    /// waiting record of their lane) before it is paused.
    pub fn buffer_per_partition(&self) -> usize {
        (self.batch_size as usize * 4).max(1000)
    }

    /// This member's name: `--member-id`, or `<hostname>-<random>`.
    pub fn member(&self) -> String {
        self.member_id.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "consumer".into());
            format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
        })
    }

    pub fn backoff(&self) -> Result<BackoffPolicy> {
        let p = BackoffPolicy {
            initial: Duration::from_millis(self.backoff_initial_ms),
            max: Duration::from_millis(self.backoff_max_ms),
            multiplier: self.backoff_multiplier,
            max_attempts: self.max_attempts,
            jitter: 0.2,
        };
        p.validate().map_err(Error::Config)?;
        Ok(p)
    }
}
