//! Publishing one claimed batch: map each row to its topic, encode it as
//! Avro through the registry, produce everything pipelined with the
//! idempotent producer, and sort the outcome into published rows, failed
//! attempts (with their backoff) and rows skipped to keep order.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use mongodb::bson::{Bson, DateTime};
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};

use crate::{
    avro::{CompiledSchema, ConvertError, EVENT_SCHEMAS, bson_to_avro, encode_confluent},
    backoff::{BackoffPolicy, Retry},
    kafka::{ProduceError, classify, headers, topics::EventTopicMapper},
    outbox::{
        OutboxDocument,
        relay_queries::{Failure, Published},
    },
    registry_client::{
        ids::{SchemaIdError, SchemaIds},
        subject,
    },
};

/// The outcome of one batch.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub published: Vec<Published>,
    /// Failed attempts with a short reason label for metrics.
    pub failures: Vec<(Failure, &'static str)>,
    /// Rows not attempted because an earlier row of their aggregate failed
    /// in this batch; they stay due, held back by that failure.
    pub skipped: Vec<String>,
    /// Commit-to-acknowledgement latencies of the published rows, seconds.
    pub latencies: Vec<f64>,
}

impl BatchOutcome {
    /// Aggregates of `rows` (this batch) with a failed or skipped row: their
    /// later rows must wait until the failure is marked and retried.
    pub fn failed_aggregates(&self, rows: &[OutboxDocument]) -> HashSet<String> {
        let ids: HashSet<&str> =
            self.failures.iter().map(|(f, _)| f.id.as_str()).chain(self.skipped.iter().map(String::as_str)).collect();
        rows.iter().filter(|r| ids.contains(r.id.as_str())).map(|r| r.aggregate_id.clone()).collect()
    }
}

/// Why an event could not be encoded for Kafka.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("outbox document format {0} is unknown to this relay")]
    UnknownFormat(i32),
    #[error("bad eventVersion {0}")]
    BadVersion(i32),
    #[error("no schema for {event} v{version} in schemas/")]
    NoSchema { event: String, version: u32 },
    #[error(transparent)]
    SchemaId(#[from] SchemaIdError),
    #[error("event does not match schema {event} v{version}: {source}")]
    Mismatch {
        event: String,
        version: u32,
        #[source]
        source: ConvertError,
    },
    #[error("Avro encoding: {0}")]
    Avro(#[from] apache_avro::Error),
}

impl EncodeError {
    /// The label of the relay's failure metric.
    pub fn label(&self) -> &'static str {
        match self {
            EncodeError::SchemaId(e) if e.is_registry_failure() => "registry",
            _ => "schema",
        }
    }
}

pub struct Publisher {
    producer: FutureProducer,
    mapper: EventTopicMapper,
    schemas: HashMap<(String, u32), CompiledSchema>,
    ids: SchemaIds,
    backoff: BackoffPolicy,
}

struct Encoded {
    row: usize,
    topic: String,
    payload: Vec<u8>,
    headers: OwnedHeaders,
}

/// A random number in [-1, 1] for jitter.
fn unit_random() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() as u64;
    (bits as f64 / u64::MAX as f64) * 2.0 - 1.0
}

fn event_headers(row: &OutboxDocument) -> OwnedHeaders {
    let version = row.event_version.to_string();
    let mut h = OwnedHeaders::new()
        .insert(Header { key: headers::EVENT_ID, value: Some(row.id.as_str()) })
        .insert(Header { key: headers::EVENT_NAME, value: Some(row.event_name.as_str()) })
        .insert(Header { key: headers::EVENT_VERSION, value: Some(version.as_str()) })
        .insert(Header { key: headers::AGGREGATE_TYPE, value: Some(row.aggregate_type.as_str()) });
    for (key, value) in [
        (headers::CORRELATION_ID, &row.correlation_id),
        (headers::CAUSATION_ID, &row.causation_id),
        (headers::TRACEPARENT, &row.traceparent),
    ] {
        if let Some(v) = value {
            h = h.insert(Header { key, value: Some(v.as_str()) });
        }
    }
    h
}

impl Publisher {
    pub fn new(producer: FutureProducer, mapper: EventTopicMapper, ids: SchemaIds, backoff: BackoffPolicy) -> Self {
        let schemas = EVENT_SCHEMAS
            .iter()
            .map(|s| {
                let compiled =
                    s.compile().unwrap_or_else(|e| panic!("bundled schema {} does not parse: {e}", s.path()));
                ((s.event_name.to_owned(), s.version), compiled)
            })
            .collect();
        Self { producer, mapper, schemas, ids, backoff }
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    async fn encode(&self, row: &OutboxDocument) -> Result<Encoded, EncodeError> {
        if row.doc_version != crate::outbox::document::DOC_VERSION {
            return Err(EncodeError::UnknownFormat(row.doc_version));
        }
        let version = u32::try_from(row.event_version).map_err(|_| EncodeError::BadVersion(row.event_version))?;
        let compiled = self
            .schemas
            .get(&(row.event_name.clone(), version))
            .ok_or_else(|| EncodeError::NoSchema { event: row.event_name.clone(), version })?;
        let topic = self.mapper.topic_for(&row.aggregate_type, &row.event_name);
        let full_name = &compiled.full_name;
        let id = self.ids.id(&subject(&topic, full_name), full_name, compiled.source.text).await?;
        let value = bson_to_avro(&Bson::Document(row.event_record()), &compiled.schema)
            .map_err(|source| EncodeError::Mismatch { event: row.event_name.clone(), version, source })?;
        let payload = encode_confluent(id, &compiled.schema, value)?;
        Ok(Encoded { row: 0, topic, payload, headers: event_headers(row) })
    }

    /// A failed attempt: retried after its backoff, or dead once the
    /// attempts are spent, or dead at once when the failure is permanent
    /// (the broker will refuse these same bytes every time).
    fn failure(&self, row: &OutboxDocument, error: String, now: DateTime, permanent: bool) -> Failure {
        let attempts = row.attempts.saturating_add(1);
        let retry = if permanent {
            Retry::GiveUp
        } else {
            self.backoff.after_failure(u32::try_from(attempts).unwrap_or(u32::MAX), unit_random())
        };
        match retry {
            Retry::After(delay) => {
                let ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                Failure {
                    id: row.id.clone(),
                    attempts,
                    error,
                    retry_at: Some(DateTime::from_millis(now.timestamp_millis().saturating_add(ms))),
                    backoff_ms: ms,
                }
            }
            Retry::GiveUp => Failure { id: row.id.clone(), attempts, error, retry_at: None, backoff_ms: 0 },
        }
    }

    /// Publish `rows` (one claimed batch, in event order).
    pub async fn publish(&self, rows: &[OutboxDocument], now: DateTime) -> BatchOutcome {
        let mut out = BatchOutcome::default();
        let mut failed_aggregates: HashSet<&str> = HashSet::new();
        let mut encoded = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            if failed_aggregates.contains(row.aggregate_id.as_str()) {
                out.skipped.push(row.id.clone());
                continue;
            }
            match self.encode(row).await {
                Ok(e) => encoded.push(Encoded { row: i, ..e }),
                Err(error) => {
                    let label = error.label();
                    out.failures.push((self.failure(row, error.to_string(), now, false), label));
                    failed_aggregates.insert(row.aggregate_id.as_str());
                }
            }
        }
        // Enqueue in event order. A record the client refuses outright (too
        // large, unknown topic) fails here, before anything after it is
        // enqueued, so the rest of its aggregate is skipped and never
        // overtakes it. A full local queue is back-pressure: wait, never drop.
        let mut deliveries = Vec::with_capacity(encoded.len());
        for e in &encoded {
            let row = &rows[e.row];
            if failed_aggregates.contains(row.aggregate_id.as_str()) {
                out.skipped.push(row.id.clone());
                continue;
            }
            let mut record = FutureRecord::to(&e.topic)
                .key(row.aggregate_id.as_str())
                .payload(e.payload.as_slice())
                .headers(e.headers.clone());
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push((row, e.topic.as_str(), delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => {
                        let (class, label) = classify(&error);
                        let failure = self.failure(
                            row,
                            format!("produce to {}: {error}", e.topic),
                            now,
                            class == ProduceError::Permanent,
                        );
                        out.failures.push((failure, label));
                        failed_aggregates.insert(row.aggregate_id.as_str());
                        break;
                    }
                }
            }
        }
        let results = futures::future::join_all(deliveries.iter_mut().map(|(_, _, d)| d)).await;
        let acked_at = DateTime::now().timestamp_millis();
        for ((row, topic, _), result) in deliveries.iter().zip(results) {
            match result {
                Ok(Ok(delivery)) => {
                    out.published.push(Published {
                        id: row.id.clone(),
                        partition: delivery.partition,
                        offset: delivery.offset,
                        retried: row.last_error.is_some() || row.backoff_ms.is_some(),
                    });
                    out.latencies.push((acked_at - row.occurred_on.timestamp_millis()).max(0) as f64 / 1000.0);
                }
                Ok(Err((error, _))) => {
                    let (class, label) = classify(&error);
                    let failure = self.failure(
                        row,
                        format!("produce to {topic}: {error}"),
                        now,
                        class == ProduceError::Permanent,
                    );
                    out.failures.push((failure, label));
                }
                Err(_canceled) => {
                    let error = format!("produce to {topic}: the producer shut down before the broker answered");
                    out.failures.push((self.failure(row, error, now, false), "client"));
                }
            }
        }
        out
    }

    /// Wait for in-flight messages (shutdown).
    pub fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer;
        if let Err(e) = self.producer.flush(Timeout::After(timeout)) {
            tracing::warn!(error = %e, "producer flush at shutdown");
        }
    }
}
