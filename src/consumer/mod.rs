//! `outbox consume`: a consumer group that delivers events to a handler
//! exactly once in effect.
//!
//! Records come in batches (what has arrived, up to `--batch-size`): decode
//! each (writer schema from the registry, resolved to the newest reader
//! schema) -> skip those the processed-events store has (one query) -> run
//! the handler (which records them as processed; for the projection in ONE
//! MongoDB transaction with its writes, per batch) -> store the offsets
//! (committed in the background; `enable.auto.offset.store=false`).
//! When a record of a batch cannot be decoded or the batch fails, its
//! records are handled one by one: a failure is retried in-process with
//! backoff; after `--max-attempts` the record goes to the dead-letter topic
//! `<topic><suffix>` with headers saying why and where from, and the
//! partition moves on.

pub mod args;
pub mod decode;
pub mod handlers;
pub mod metrics;

use std::time::Duration;

use prometheus::{IntGaugeVec, Registry};
use rdkafka::{
    ClientConfig, Message,
    consumer::{CommitMode, Consumer, StreamConsumer},
    message::{BorrowedMessage, Header, Headers, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};

pub use args::{ConsumeAction, ConsumeArgs, ConsumeCommand, HandlerKind};
use decode::{DecodedEvent, Decoder};
use handlers::{Applied, Handler};
pub use metrics::ConsumerMetrics;

use crate::{
    Error, Result,
    backoff::{BackoffPolicy, Retry},
    db::connect,
    kafka::{headers, lag::read_group_lag, producer_config},
    lifecycle::{self, Stop, stopped},
    processed::ProcessedStore,
    telemetry,
};

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

/// Why an attempt at a record failed, and what that means for it.
struct Failure {
    message: String,
    /// Transient (the reason, a metric label): retried without limit.
    transient: Option<&'static str>,
    /// Cannot be read at all: dead-lettered at once.
    poison: bool,
}

impl Failure {
    fn poison(message: String) -> Self {
        Self { message, transient: None, poison: true }
    }
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

impl Pipeline {
    pub async fn new(args: &ConsumeArgs, metrics: ConsumerMetrics) -> Result<Self> {
        let backoff = args.backoff()?;
        let client = connect(&args.mongodb_uri).await?;
        let db = client.database(&args.database);
        let store = ProcessedStore::new(&db, &args.group_id);
        store.ensure_indexes(Duration::from_secs(args.processed_retention_seconds)).await?;
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
            .map_err(|source| Error::Kafka { context: "creating the dead-letter producer".into(), source })?;
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

    /// Decode a record. The registry being unreachable is transient; a
    /// record that cannot be read (no value, not Confluent framing, no
    /// reader schema) is poison.
    async fn decode(&self, m: &BorrowedMessage<'_>) -> std::result::Result<DecodedEvent, Failure> {
        let bytes = m.payload().ok_or_else(|| Failure::poison("record without a value".to_owned()))?;
        self.decoder.decode(bytes, headers::text(m, headers::EVENT_NAME)).await.map_err(|e| Failure {
            message: e.message,
            transient: e.retryable.then_some("registry"),
            poison: !e.retryable,
        })
    }

    async fn attempt(&self, m: &BorrowedMessage<'_>) -> std::result::Result<Applied, Failure> {
        let event = self.decode(m).await?;
        let start = std::time::Instant::now();
        let applied = self.handler.apply(&event, &self.store).await.map_err(|e| Failure {
            message: e.message,
            transient: e.transient,
            poison: false,
        })?;
        self.metrics.handler_seconds.observe(start.elapsed().as_secs_f64());
        Ok(applied)
    }

    /// Process a batch of records, in order. When the handler applies
    /// batches and every record decodes, the batch is applied together
    /// (`Handler::apply_batch`); otherwise, or when the batch fails, record
    /// by record (`process`: retries,
    /// dead-lettering), which isolates the record at fault. Ends early
    /// (shorter output) when shutdown interrupts a record.
    pub async fn process_batch(&self, batch: &[BorrowedMessage<'_>], stop: &Stop) -> Vec<Outcome> {
        self.metrics.batch_size.observe(batch.len() as f64);
        if batch.len() > 1 && self.handler.applies_batches() {
            let mut events = Vec::with_capacity(batch.len());
            for m in batch {
                match self.decode(m).await {
                    Ok(e) => events.push(e),
                    Err(_) => break,
                }
            }
            if events.len() == batch.len() {
                let start = std::time::Instant::now();
                match self.handler.apply_batch(&events, &self.store).await {
                    Ok(applied) => {
                        self.metrics.handler_seconds.observe(start.elapsed().as_secs_f64());
                        self.metrics.backoff.set(0.0);
                        return applied
                            .into_iter()
                            .map(|a| match a {
                                Applied::Applied => {
                                    self.metrics.processed.inc();
                                    Outcome::Applied
                                }
                                Applied::Duplicate => {
                                    self.metrics.duplicates.inc();
                                    Outcome::Duplicate
                                }
                            })
                            .collect();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, records = batch.len(), "the batch failed; handling its records one by one");
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(batch.len());
        for m in batch {
            let outcome = self.process(m, stop).await;
            out.push(outcome);
            if outcome == Outcome::Interrupted {
                break;
            }
        }
        out
    }

    /// Process one record to its end: applied, duplicate, or dead-lettered.
    /// A transient failure (registry, MongoDB or webhook unreachable, a
    /// timeout, 5xx, 408, 429) is retried without limit, with the backoff
    /// capped at its maximum, and never dead-lettered: the record waits
    /// for the outage to end, and `outbox_consumer_waiting` says which
    /// partition waits and why. A rejection (a webhook's other 4xx, a write
    /// MongoDB refuses) is retried up to `--max-attempts`, then
    /// dead-lettered; a record that cannot be read at once.
    pub async fn process(&self, m: &BorrowedMessage<'_>, stop: &Stop) -> Outcome {
        let mut attempts = 0u32;
        let mut waiting: Option<&'static str> = None;
        let waiting_gauge = |reason: &str, v: i64| {
            let partition = m.partition().to_string();
            self.metrics.waiting.with_label_values(&[m.topic(), partition.as_str(), reason]).set(v);
        };
        loop {
            attempts += 1;
            let failure = match self.attempt(m).await {
                Ok(applied) => {
                    if let Some(reason) = waiting {
                        waiting_gauge(reason, 0);
                    }
                    self.metrics.backoff.set(0.0);
                    return match applied {
                        Applied::Applied => {
                            self.metrics.processed.inc();
                            Outcome::Applied
                        }
                        Applied::Duplicate => {
                            self.metrics.duplicates.inc();
                            tracing::debug!(
                                topic = m.topic(),
                                partition = m.partition(),
                                offset = m.offset(),
                                "duplicate skipped"
                            );
                            Outcome::Duplicate
                        }
                    };
                }
                Err(f) => f,
            };
            self.metrics.failures.inc();
            if waiting != failure.transient {
                if let Some(reason) = waiting {
                    waiting_gauge(reason, 0);
                }
                if let Some(reason) = failure.transient {
                    waiting_gauge(reason, 1);
                }
                waiting = failure.transient;
            }
            let retry = match (failure.transient, failure.poison) {
                (Some(_), _) => self.backoff.without_attempt_limit().after_failure(attempts, 0.0),
                (None, true) => Retry::GiveUp,
                (None, false) => self.backoff.after_failure(attempts, 0.0),
            };
            match retry {
                Retry::After(delay) => {
                    tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), attempts,
                        error = %failure.message, transient = failure.transient.unwrap_or("no"),
                        backoff_ms = delay.as_millis() as u64, "handling failed; retrying");
                    self.metrics.backoff.set(delay.as_secs_f64());
                    if lifecycle::sleep_or_stop(&mut stop.clone(), delay).await {
                        return Outcome::Interrupted;
                    }
                }
                Retry::GiveUp => {
                    self.metrics.backoff.set(0.0);
                    return self.dead_letter(m, &failure.message, attempts, stop).await;
                }
            }
        }
    }

    /// Send the record to its dead-letter topic; retried until the broker
    /// takes it (moving on without it would lose the event).
    async fn dead_letter(&self, m: &BorrowedMessage<'_>, error: &str, attempts: u32, stop: &Stop) -> Outcome {
        let topic = format!("{}{}", m.topic(), self.dlq_suffix);
        let (partition, offset, attempts_s) = (m.partition().to_string(), m.offset().to_string(), attempts.to_string());
        let mut headers = OwnedHeaders::new();
        if let Some(h) = m.headers() {
            for h in h.iter() {
                headers = headers.insert(Header { key: h.key, value: h.value });
            }
        }
        for (key, value) in [
            (headers::dead_letter::ERROR, error),
            (headers::dead_letter::ORIGINAL_TOPIC, m.topic()),
            (headers::dead_letter::ORIGINAL_PARTITION, partition.as_str()),
            (headers::dead_letter::ORIGINAL_OFFSET, offset.as_str()),
            (headers::dead_letter::ATTEMPTS, attempts_s.as_str()),
            (headers::dead_letter::CONSUMER_GROUP, self.group.as_str()),
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
                    if stopped(stop) {
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
    c.create().map_err(|source| Error::Kafka { context: "creating the consumer".into(), source })
}

pub async fn main(cmd: ConsumeCommand) -> Result<()> {
    let stop_rx = lifecycle::stop_on_signal();
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
pub async fn run_until(args: ConsumeArgs, mut stop: Stop) -> Result<()> {
    let registry = Registry::new();
    let metrics = ConsumerMetrics::register(&registry)?;
    let pipeline = Pipeline::new(&args, metrics.clone()).await?;
    let consumer = consumer(&args, &args.group_id)?;
    let topics: Vec<&str> = args.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| Error::Kafka { context: format!("subscribing to {topics:?}"), source })?;

    lifecycle::serve_admin(args.metrics_listen, registry, telemetry::always_ready()).await?;
    tokio::spawn(report_lag(args.clone(), metrics.lag.clone(), stop.clone()));
    tracing::info!(group = %args.group_id, topics = ?args.topics, handler = pipeline.handler.name(), "consumer started");

    let (max, linger) = (args.batch_size as usize, Duration::from_millis(args.linger_ms));
    while !stopped(&stop) {
        let Some(batch) = next_batch(&consumer, max, linger, &mut stop).await else { break };
        let outcomes = pipeline.process_batch(&batch, &stop).await;
        // Offsets only for records that reached their end, in order.
        for (m, outcome) in batch.iter().zip(&outcomes) {
            if *outcome == Outcome::Interrupted {
                break;
            }
            if let Err(e) = consumer.store_offset_from_message(m) {
                tracing::warn!(error = %e, "storing offset");
            }
        }
        if outcomes.len() < batch.len() || outcomes.last() == Some(&Outcome::Interrupted) {
            break;
        }
    }
    tracing::info!("consumer stopping: committing stored offsets");
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final commit (nothing new to commit is fine)");
    }
    Ok(())
}

/// The next batch: waits for a first record (`None` at stop), then takes
/// what has arrived, waiting up to `linger` more for a fuller batch, up to
/// `max` records.
async fn next_batch<'c>(
    consumer: &'c StreamConsumer,
    max: usize,
    linger: Duration,
    stop: &mut Stop,
) -> Option<Vec<BorrowedMessage<'c>>> {
    let mut batch = Vec::new();
    while batch.is_empty() {
        let received = tokio::select! {
            m = consumer.recv() => m,
            _ = stop.changed() => return None,
        };
        match received {
            Ok(m) => batch.push(m),
            Err(e) => tracing::warn!(error = %e, "consume error"),
        }
    }
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        // A zero wait polls once: what librdkafka has already fetched.
        match tokio::time::timeout_at(deadline.max(tokio::time::Instant::now()), consumer.recv()).await {
            Ok(Ok(m)) => batch.push(m),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "consume error");
                break;
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

async fn report_lag(args: ConsumeArgs, gauge: IntGaugeVec, mut stop: Stop) {
    while !stopped(&stop) {
        match read_group_lag(&args.kafka_bootstrap, &[], &args.group_id, &args.topics, Duration::from_secs(10)).await {
            Ok(lag) => {
                for p in lag.partitions {
                    gauge.with_label_values(&[p.topic.as_str(), &p.partition.to_string()]).set(p.lag);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading group lag"),
        }
        lifecycle::sleep_or_stop(&mut stop, Duration::from_secs(args.lag_interval_seconds.max(1))).await;
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
pub async fn redrive(args: &ConsumeArgs, dead_letter_topic: &str, stop: Stop) -> Result<RedriveCounts> {
    let metrics = ConsumerMetrics::register(&Registry::new())?;
    let mut pipeline = Pipeline::new(args, metrics).await?;
    // Records that fail again go to `<dlq>.redrive` rather than back into the topic being replayed.
    pipeline.dlq_suffix = ".redrive".into();
    let consumer = consumer(args, &format!("{}.redrive", args.group_id))?;
    consumer
        .subscribe(&[dead_letter_topic])
        .map_err(|source| Error::Kafka { context: format!("subscribing to {dead_letter_topic}"), source })?;
    let mut counts = RedriveCounts::default();
    let idle = Duration::from_secs(3);
    let mut waited_for_first = false;
    loop {
        // The first record may wait for the group join.
        let wait = if waited_for_first { idle } else { Duration::from_secs(30) };
        let Ok(next) = tokio::time::timeout(wait, consumer.recv()).await else { break };
        waited_for_first = true;
        let m = next.map_err(|source| Error::Kafka { context: format!("consuming {dead_letter_topic}"), source })?;
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
