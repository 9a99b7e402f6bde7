//! The dead-letter producer: a record the consumer gives up on goes,
//! unchanged (key, value, headers), to `<topic><suffix>` with headers
//! saying why and where from.

use std::time::Duration;

use rdkafka::{
    Message,
    error::KafkaError,
    message::{Header, Headers, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};

use super::pipeline::Record;
use crate::{
    Error, Result,
    kafka::{create_producer, headers, producer_config},
};

/// How long one dead-letter produce may take (its `message.timeout.ms`).
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(10);

/// The start of `dlq.error` of a parked record.
pub const PARKED: &str = "parked: ";

/// Where a group's dead-lettered records go.
pub struct DeadLetterTopics {
    producer: FutureProducer,
    /// Appended to a record's topic: its dead-letter topic.
    suffix: String,
    group: String,
}

/// The dead-letter topic did not take a record.
#[derive(Debug, thiserror::Error)]
#[error("dead-letter topic {topic}: {source}")]
pub struct NotTaken {
    pub topic: String,
    pub source: KafkaError,
}

impl DeadLetterTopics {
    pub fn new(bootstrap: &str, suffix: &str, group: &str) -> Result<Self> {
        let timeout = [("message.timeout.ms".to_owned(), DEAD_LETTER_TIMEOUT.as_millis().to_string())];
        let config = producer_config(bootstrap, &timeout).map_err(Error::Config)?;
        let producer = create_producer(&config)
            .map_err(|source| Error::Kafka { context: "creating the dead-letter producer".into(), source })?;
        Ok(Self { producer, suffix: suffix.to_owned(), group: group.to_owned() })
    }

    /// Send dead-lettered records to `<topic><suffix>` from now on.
    pub fn set_suffix(&mut self, suffix: &str) {
        suffix.clone_into(&mut self.suffix);
    }

    /// Send `m` to its dead-letter topic, once, bounded by
    /// `message.timeout.ms`: the topic's name, or why it did not take it
    /// (missing, not writable, the record too large with the headers
    /// added, the broker away).
    pub async fn send(&self, m: &Record, error: &str, attempts: u32) -> std::result::Result<String, NotTaken> {
        let topic = format!("{}{}", m.topic(), self.suffix);
        let (partition, offset, attempts) = (m.partition().to_string(), m.offset().to_string(), attempts.to_string());
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
            (headers::dead_letter::ATTEMPTS, attempts.as_str()),
            (headers::dead_letter::CONSUMER_GROUP, self.group.as_str()),
        ] {
            headers = headers.insert(Header { key, value: Some(value) });
        }
        let mut record = FutureRecord::to(&topic).headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(p) = m.payload() {
            record = record.payload(p);
        }
        match self.producer.send(record, Timeout::After(DEAD_LETTER_TIMEOUT)).await {
            Ok(_) => Ok(topic),
            Err((source, _)) => Err(NotTaken { topic, source }),
        }
    }
}
