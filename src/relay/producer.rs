//! The relay's idempotent producer, replaced by a new one when the broker
//! refuses its identity or librdkafka marks it failed for good; and how a
//! produce error counts.

use std::sync::{
    Mutex,
    atomic::{AtomicBool, Ordering},
};

use rdkafka::{
    ClientConfig,
    error::KafkaError,
    producer::{FutureProducer, FutureRecord},
};

use crate::{
    kafka::{ProduceError, classify, create_producer, producer_refused},
    outbox::relay_queries::FailureKind,
};

/// How a produce error counts, with its metric label.
pub fn produce_failure(error: &KafkaError) -> (FailureKind, &'static str) {
    let (class, label) = classify(error);
    let kind = match class {
        ProduceError::Permanent => FailureKind::Permanent,
        ProduceError::Transient | ProduceError::BackPressure => FailureKind::Outage,
        ProduceError::Unexplained => FailureKind::Unexplained,
    };
    (kind, label)
}

/// The producer in use and what it takes to replace it.
pub struct ReplaceableProducer {
    producer: Mutex<FutureProducer>,
    /// Its settings, to make a new one.
    config: ClientConfig,
    /// The broker refused the producer's identity: make a new producer
    /// before the next batch.
    refused: AtomicBool,
}

impl ReplaceableProducer {
    pub fn new(config: ClientConfig) -> Result<Self, KafkaError> {
        Ok(Self { producer: Mutex::new(create_producer(&config)?), config, refused: AtomicBool::new(false) })
    }

    /// The producer for the next batch. An idempotent producer whose
    /// identity the broker refused (its producer id fenced or unknown, its
    /// epoch or sequence numbers out of step: after a broker outage the
    /// broker may refuse every later record of that producer), or that
    /// librdkafka marked as failed for good, is replaced by a new one
    /// (librdkafka's rule for fatal errors: make a new instance). What the
    /// old one had in flight fails and is retried like any failure, later
    /// events of those aggregates held behind it, so order holds across the
    /// swap.
    pub fn current(&self) -> FutureProducer {
        use rdkafka::producer::Producer;
        let mut producer = self.producer.lock().expect("producer lock");
        let fatal = producer.client().fatal_error();
        if fatal.is_some() || self.refused.swap(false, Ordering::SeqCst) {
            match create_producer(&self.config) {
                Ok(fresh) => {
                    tracing::error!(fatal = ?fatal, "the broker refused the producer's identity; replaced by a new producer");
                    *producer = fresh;
                }
                Err(e) => tracing::error!(error = %e, "the producer must be replaced; a new one could not be made"),
            }
        }
        producer.clone()
    }

    /// Note a produce error that means the producer must be replaced.
    pub fn note(&self, error: &KafkaError) {
        if producer_refused(error) {
            self.refused.store(true, Ordering::SeqCst);
        }
    }

    /// The producer in use, not replaced (to flush it at shutdown).
    pub fn in_use(&self) -> FutureProducer {
        self.producer.lock().expect("producer lock").clone()
    }
}

/// The bytes of a record's key, value and headers.
pub fn record_size(record: &FutureRecord<'_, str, Vec<u8>>) -> usize {
    use rdkafka::message::Headers;
    let headers: usize =
        record.headers.as_ref().map_or(0, |h| h.iter().map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len)).sum());
    record.key.map_or(0, str::len) + record.payload.map_or(0, Vec::len) + headers
}
