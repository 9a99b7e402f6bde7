//! `outbox consume`: a consumer group that delivers events to a handler
//! exactly once in effect.
//!
//! For each record, in order: decode (writer schema from the registry,
//! resolved to the newest reader schema) -> skip it if the processed-events
//! store has it -> run the handler (which records it as processed; for the
//! projection in the same MongoDB transaction as its writes) -> store the
//! offset (committed in the background; `enable.auto.offset.store=false`).
//! A failure is retried in-process with backoff; after `--max-attempts` the
//! record goes to the dead-letter topic `<topic><suffix>` with headers saying
//! why and where from, and the partition moves on.

pub mod decode;
pub mod handlers;

use std::time::Duration;

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntGaugeVec, Opts, Registry};
use rdkafka::{
    ClientConfig, Message,
    consumer::{CommitMode, Consumer, StreamConsumer},
    message::{BorrowedMessage, Header, Headers, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};
use tokio::sync::watch;

use crate::{
    Error, Result,
    db::connect,
    kafka::{lag::read_group_lag, parse_override, producer_config},
    relay::backoff::{BackoffPolicy, Retry},
    telemetry,
};
use decode::Decoder;
use handlers::{Applied, Handler, ProcessedStore};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HandlerKind {
    /// Read model of sessions per user in MongoDB (exactly-once effect).
    Projection,
    /// HTTP POST of each event (Idempotency-Key = eventId).
    Webhook,
    /// Log each event.
    Log,
}

/// `outbox consume [flags]` runs a consumer; `outbox consume redrive ...`
/// replays a dead-letter topic into the handler.
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
    /// Replay a dead-letter topic into the handler and report the counts.
    Redrive {
        /// The dead-letter topic to replay.
        #[arg(long)]
        dead_letter_topic: String,
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
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u32,
    /// librdkafka consumer overrides `key=value`.
    #[arg(long = "consumer-config", env = "KAFKA_CONSUMER_CONFIG", value_delimiter = ',', value_parser = parse_override)]
    pub consumer_config: Vec<(String, String)>,
    /// Address for /metrics, /healthz, /readyz.
    #[arg(long, env = "METRICS_LISTEN", default_value = "127.0.0.1:9465")]
    pub metrics_listen: std::net::SocketAddr,
    /// How often the group's lag is read for metrics, in seconds.
    #[arg(long, env = "LAG_INTERVAL_SECONDS", default_value_t = 10)]
    pub lag_interval_seconds: u64,
}

impl ConsumeArgs {
    fn backoff(&self) -> Result<BackoffPolicy> {
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

#[derive(Clone)]
pub struct ConsumerMetrics {
    pub processed: IntCounter,
    pub duplicates: IntCounter,
    pub failures: IntCounter,
    pub dead_lettered: IntCounter,
    pub handler_seconds: Histogram,
    pub backoff: Gauge,
    pub lag: IntGaugeVec,
}

impl ConsumerMetrics {
    pub fn register(r: &Registry) -> Result<Self> {
        let m = Self {
            processed: IntCounter::new("outbox_consumer_processed_total", "Events applied by the handler")?,
            duplicates: IntCounter::new("outbox_consumer_duplicates_total", "Events skipped as already processed")?,
            failures: IntCounter::new("outbox_consumer_handler_failures_total", "Failed attempts (decode or handler)")?,
            dead_lettered: IntCounter::new(
                "outbox_consumer_dead_lettered_total",
                "Records sent to a dead-letter topic",
            )?,
            handler_seconds: Histogram::with_opts(
                HistogramOpts::new("outbox_consumer_handler_duration_seconds", "Handler latency per event")
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
            )?,
            backoff: Gauge::new(
                "outbox_consumer_current_backoff_seconds",
                "Backoff of the record being retried, 0 if none",
            )?,
            lag: IntGaugeVec::new(
                Opts::new("outbox_consumer_lag", "Group lag per partition"),
                &["topic", "partition"],
            )?,
        };
        r.register(Box::new(m.processed.clone()))?;
        r.register(Box::new(m.duplicates.clone()))?;
        r.register(Box::new(m.failures.clone()))?;
        r.register(Box::new(m.dead_lettered.clone()))?;
        r.register(Box::new(m.handler_seconds.clone()))?;
        r.register(Box::new(m.backoff.clone()))?;
        r.register(Box::new(m.lag.clone()))?;
        Ok(m)
    }
}

/// Everything one record needs: decoder, handler, store, dead-letter producer.
pub struct Pipeline {
    decoder: Decoder,
    handler: Handler,
    store: ProcessedStore,
    dlq: FutureProducer,
    dlq_suffix: String,
    group: String,
    backoff: BackoffPolicy,
    metrics: ConsumerMetrics,
}

/// How one record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    DeadLettered,
    /// Shutdown came during its retries: not done, offset not stored.
    Interrupted,
}

fn header<'a>(m: &'a BorrowedMessage<'a>, key: &str) -> Option<&'a str> {
    m.headers()?.iter().find(|h| h.key == key).and_then(|h| h.value).and_then(|v| std::str::from_utf8(v).ok())
}

impl Pipeline {
    pub async fn new(args: &ConsumeArgs, metrics: ConsumerMetrics) -> Result<Self> {
        let backoff = args.backoff()?;
        let client = connect(&args.mongodb_uri).await?;
        let db = client.database(&args.database);
        let store = ProcessedStore::new(&db, &args.group_id);
        store
            .ensure_indexes(Duration::from_secs(args.processed_retention_seconds))
            .await
            .map_err(|e| Error::Unavailable { service: "MongoDB", detail: e.to_string() })?;
        let handler = match args.handler {
            HandlerKind::Projection => Handler::projection(client.clone(), &db),
            HandlerKind::Webhook => {
                let url = args
                    .webhook_url
                    .as_deref()
                    .ok_or_else(|| Error::Config("the webhook handler needs --webhook-url (WEBHOOK_URL)".into()))?;
                Handler::webhook(url, Duration::from_millis(args.webhook_timeout_ms)).map_err(Error::Config)?
            }
            HandlerKind::Log => Handler::Log,
        };
        let dlq = producer_config(&args.kafka_bootstrap, &[])
            .map_err(Error::Config)?
            .create()
            .map_err(|e| Error::Config(format!("Kafka producer: {e}")))?;
        Ok(Self {
            decoder: Decoder::new(&args.schema_registry_url),
            handler,
            store,
            dlq,
            dlq_suffix: args.dead_letter_suffix.clone(),
            group: args.group_id.clone(),
            backoff,
            metrics,
        })
    }

    pub fn store(&self) -> &ProcessedStore {
        &self.store
    }

    async fn attempt(&self, m: &BorrowedMessage<'_>) -> std::result::Result<Applied, (String, bool)> {
        let bytes = m.payload().ok_or_else(|| ("record without a value".to_owned(), false))?;
        let event = self.decoder.decode(bytes, header(m, "eventName")).await.map_err(|e| (e.message, e.retryable))?;
        let start = std::time::Instant::now();
        let applied = self.handler.apply(&event, &self.store).await.map_err(|e| (e.0, true))?;
        self.metrics.handler_seconds.observe(start.elapsed().as_secs_f64());
        Ok(applied)
    }

    /// Process one record to its end: applied, duplicate, or dead-lettered.
    pub async fn process(&self, m: &BorrowedMessage<'_>, stop: &watch::Receiver<bool>) -> Outcome {
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let (error, retryable) = match self.attempt(m).await {
                Ok(Applied::Applied) => {
                    self.metrics.processed.inc();
                    self.metrics.backoff.set(0.0);
                    return Outcome::Applied;
                }
                Ok(Applied::Duplicate) => {
                    self.metrics.duplicates.inc();
                    self.metrics.backoff.set(0.0);
                    tracing::debug!(
                        topic = m.topic(),
                        partition = m.partition(),
                        offset = m.offset(),
                        "duplicate skipped"
                    );
                    return Outcome::Duplicate;
                }
                Err(e) => e,
            };
            self.metrics.failures.inc();
            let retry = if retryable { self.backoff.after_failure(attempts, 0.0) } else { Retry::GiveUp };
            match retry {
                Retry::After(delay) => {
                    tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), attempts, error = %error,
                        backoff_ms = delay.as_millis() as u64, "handling failed; retrying");
                    self.metrics.backoff.set(delay.as_secs_f64());
                    let mut stop = stop.clone();
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => {}
                    }
                    if crate::relay::stopped(&stop) {
                        return Outcome::Interrupted;
                    }
                }
                Retry::GiveUp => {
                    self.metrics.backoff.set(0.0);
                    return self.dead_letter(m, &error, attempts, stop).await;
                }
            }
        }
    }

    /// Send the record to its dead-letter topic; retried until the broker
    /// takes it (moving on without it would lose the event).
    async fn dead_letter(
        &self,
        m: &BorrowedMessage<'_>,
        error: &str,
        attempts: u32,
        stop: &watch::Receiver<bool>,
    ) -> Outcome {
        let topic = format!("{}{}", m.topic(), self.dlq_suffix);
        let (partition, offset, attempts_s) = (m.partition().to_string(), m.offset().to_string(), attempts.to_string());
        let mut headers = OwnedHeaders::new();
        if let Some(h) = m.headers() {
            for h in h.iter() {
                headers = headers.insert(Header { key: h.key, value: h.value });
            }
        }
        for (key, value) in [
            ("dlq.error", error),
            ("dlq.original.topic", m.topic()),
            ("dlq.original.partition", partition.as_str()),
            ("dlq.original.offset", offset.as_str()),
            ("dlq.attempts", attempts_s.as_str()),
            ("dlq.consumer.group", self.group.as_str()),
        ] {
            headers = headers.insert(Header { key, value: Some(value) });
        }
        loop {
            let mut record = FutureRecord::to(&topic).headers(headers.clone());
            if let Some(k) = m.key() {
                record = record.key(k);
            }
            if let Some(p) = m.payload() {
                record = record.payload(p);
            }
            match self.dlq.send(record, Timeout::Never).await {
                Ok(_) => {
                    self.metrics.dead_lettered.inc();
                    tracing::error!(topic = m.topic(), partition = m.partition(), offset = m.offset(), dead_letter_topic = %topic,
                        attempts, error, "record dead-lettered");
                    return Outcome::DeadLettered;
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, dead_letter_topic = %topic, "dead-letter produce failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if crate::relay::stopped(stop) {
                        return Outcome::Interrupted;
                    }
                }
            }
        }
    }
}

fn consumer(args: &ConsumeArgs, group: &str) -> Result<StreamConsumer> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &args.kafka_bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", args.session_timeout_ms.to_string());
    crate::kafka::with_auth(&mut c);
    for (k, v) in &args.consumer_config {
        if k == "enable.auto.offset.store" && v != "false" {
            return Err(Error::Config(
                "enable.auto.offset.store must stay false: offsets are stored after the handler".into(),
            ));
        }
        c.set(k, v);
    }
    c.create().map_err(|e| Error::Config(format!("Kafka consumer: {e}")))
}

pub async fn main(cmd: ConsumeCommand) -> Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        telemetry::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    match cmd.action {
        Some(ConsumeAction::Redrive { dead_letter_topic, args }) => {
            let counts = redrive(&args, &dead_letter_topic, stop_rx).await?;
            println!(
                "redrive of {dead_letter_topic}: {} record(s), {} applied, {} duplicate(s), {} dead-lettered again",
                counts.records, counts.applied, counts.duplicates, counts.dead_lettered
            );
            Ok(())
        }
        None => run_until(cmd.run, stop_rx).await,
    }
}

/// Run the consumer until `stop` turns true (tests drive this directly).
pub async fn run_until(args: ConsumeArgs, mut stop: watch::Receiver<bool>) -> Result<()> {
    let registry = Registry::new();
    let metrics = ConsumerMetrics::register(&registry)?;
    let pipeline = Pipeline::new(&args, metrics.clone()).await?;
    let consumer = consumer(&args, &args.group_id)?;
    let topics: Vec<&str> = args.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| Error::Config(format!("subscribing to {topics:?}: {e}")))?;

    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|source| Error::Io { path: args.metrics_listen.to_string(), source })?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, telemetry::admin_router(registry, telemetry::always_ready())).await;
    });
    tokio::spawn(report_lag(args.clone(), metrics.lag.clone(), stop.clone()));
    tracing::info!(group = %args.group_id, topics = ?args.topics, handler = pipeline.handler.name(), "consumer started");

    while !crate::relay::stopped(&stop) {
        let message = tokio::select! {
            m = consumer.recv() => m,
            _ = stop.changed() => break,
        };
        let m = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "consume error");
                continue;
            }
        };
        match pipeline.process(&m, &stop).await {
            Outcome::Interrupted => break,
            _ => {
                if let Err(e) = consumer.store_offset_from_message(&m) {
                    tracing::warn!(error = %e, "storing offset");
                }
            }
        }
    }
    tracing::info!("consumer stopping: committing stored offsets");
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final commit (nothing new to commit is fine)");
    }
    Ok(())
}

async fn report_lag(args: ConsumeArgs, gauge: IntGaugeVec, mut stop: watch::Receiver<bool>) {
    while !crate::relay::stopped(&stop) {
        match read_group_lag(&args.kafka_bootstrap, &[], &args.group_id, &args.topics, Duration::from_secs(10)).await {
            Ok(lag) => {
                for p in lag.partitions {
                    gauge.with_label_values(&[p.topic.as_str(), &p.partition.to_string()]).set(p.lag);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading group lag"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(args.lag_interval_seconds.max(1))) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Counts of a redrive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveCounts {
    pub records: u64,
    pub applied: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
}

/// Replay `dead_letter_topic` from its start into the handler (group
/// `<group>.redrive`), until it has been idle for 3 s.
pub async fn redrive(
    args: &ConsumeArgs,
    dead_letter_topic: &str,
    stop: watch::Receiver<bool>,
) -> Result<RedriveCounts> {
    let metrics = ConsumerMetrics::register(&Registry::new())?;
    let mut pipeline = Pipeline::new(args, metrics).await?;
    // Records that fail again go to `<dlq>.redrive` rather than back into the topic being replayed.
    pipeline.dlq_suffix = ".redrive".into();
    let consumer = consumer(args, &format!("{}.redrive", args.group_id))?;
    consumer
        .subscribe(&[dead_letter_topic])
        .map_err(|e| Error::Config(format!("subscribing to {dead_letter_topic}: {e}")))?;
    let mut counts = RedriveCounts::default();
    let idle = Duration::from_secs(3);
    let mut waited_for_first = false;
    loop {
        // The first record may wait for the group join.
        let wait = if waited_for_first { idle } else { Duration::from_secs(30) };
        let Ok(next) = tokio::time::timeout(wait, consumer.recv()).await else { break };
        waited_for_first = true;
        let m = next.map_err(|e| Error::Config(format!("consuming {dead_letter_topic}: {e}")))?;
        counts.records += 1;
        match pipeline.process(&m, &stop).await {
            Outcome::Applied => counts.applied += 1,
            Outcome::Duplicate => counts.duplicates += 1,
            Outcome::DeadLettered => counts.dead_lettered += 1,
            Outcome::Interrupted => break,
        }
        let _ = consumer.store_offset_from_message(&m);
    }
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    Ok(counts)
}
