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

/// Which producer of a relay range an event went to: counted from 0,
/// one more each time the producer is replaced.
pub type Generation = u32;

/// The producer in use, its generation (counted from 0 per relay range:
/// records of two generations share no order), and what it takes to
/// replace it.
pub struct ReplaceableProducer {
    producer: Mutex<(FutureProducer, Generation)>,
    /// Its settings, to make a new one.
    config: ClientConfig,
    /// The broker refused the producer's identity, or the relay gave up
    /// waiting for its answers: make a new producer before the next send.
    refused: AtomicBool,
}

impl ReplaceableProducer {
    pub fn new(config: ClientConfig) -> Result<Self, KafkaError> {
        Ok(Self { producer: Mutex::new((create_producer(&config)?, 0)), config, refused: AtomicBool::new(false) })
    }

    /// The producer for the next send, and its generation. An idempotent
    /// producer whose identity the broker refused (its producer id fenced
    /// or unknown, its epoch or sequence numbers out of step: after a
    /// broker outage the broker may refuse every later record of that
    /// producer), that librdkafka marked as failed for good, or that
    /// `give_up` abandoned, is replaced by a new one (librdkafka's rule
    /// for fatal errors: make a new instance). What the old one had in
    /// flight fails and is retried like any failure, later events of those
    /// aggregates held behind it, and no aggregate has events in flight on
    /// two producers at once (`ordering`), so order holds across the swap.
    pub fn current(&self) -> (FutureProducer, Generation) {
        use rdkafka::producer::Producer;
        let mut current = self.producer.lock().expect("producer lock");
        let fatal = current.0.client().fatal_error();
        if fatal.is_some() || self.refused.swap(false, Ordering::SeqCst) {
            match create_producer(&self.config) {
                Ok(fresh) => {
                    tracing::error!(fatal = ?fatal, "the producer is replaced by a new one");
                    *current = (fresh, current.1.wrapping_add(1));
                }
                Err(e) => tracing::error!(error = %e, "the producer must be replaced; a new one could not be made"),
            }
        }
        current.clone()
    }

    /// Note a produce error that means the producer must be replaced.
    pub fn note(&self, error: &KafkaError) {
        if producer_refused(error) {
            self.refused.store(true, Ordering::SeqCst);
        }
    }

    /// Give up on the answers of producer `generation`: everything it holds
    /// fails at once (librdkafka's purge, so the records it had in flight
    /// are cut short in produce order, never holed), and the next send
    /// goes to a new producer. A generation already replaced is left alone.
    pub fn give_up(&self, generation: Generation) {
        use rdkafka::producer::{Producer, PurgeConfig};
        let current = self.producer.lock().expect("producer lock");
        if current.1 == generation {
            self.refused.store(true, Ordering::SeqCst);
            current.0.purge(PurgeConfig::default().queue().inflight());
        }
    }

    /// The producer in use, not replaced (to flush it at shutdown).
    pub fn in_use(&self) -> FutureProducer {
        self.producer.lock().expect("producer lock").0.clone()
    }
}

/// The bytes of a record's key, value and headers.
pub fn record_size(record: &FutureRecord<'_, str, Vec<u8>>) -> usize {
    use rdkafka::message::Headers;
    let headers: usize =
        record.headers.as_ref().map_or(0, |h| h.iter().map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len)).sum());
    record.key.map_or(0, str::len) + record.payload.map_or(0, Vec::len) + headers
}
