//! Kafka plumbing shared by the relay and the consumers: client
//! configuration, produce-error classification, and the registry ids of
//! event schemas.

pub mod lag;
pub mod schema_ids;

use rdkafka::{ClientConfig, error::KafkaError, types::RDKafkaErrorCode};

/// `key=value` overrides of librdkafka settings, e.g. `linger.ms=10`.
pub fn parse_override(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("'{s}' must look like key=value"))?;
    let (k, v) = (k.trim(), v.trim());
    if k.is_empty() {
        return Err(format!("'{s}': empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// The relay's producer: idempotent, `acks=all`, pipelined. Overrides may
/// tune it but not give up idempotence or full acknowledgement, which the
/// no-loss and ordering guarantees rest on.
pub fn producer_config(bootstrap: &str, overrides: &[(String, String)]) -> Result<ClientConfig, String> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "30000");
    for (k, v) in overrides {
        match (k.as_str(), v.as_str()) {
            ("enable.idempotence", v) if v != "true" => {
                return Err("enable.idempotence=false would allow duplicates and reordering; not supported".into());
            }
            ("acks", v) if v != "all" && v != "-1" => {
                return Err(format!("acks={v} could lose acknowledged events; the relay needs acks=all"));
            }
            _ => {
                c.set(k, v);
            }
        }
    }
    Ok(c)
}

/// How a failed produce is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProduceError {
    /// The local queue is full: wait and retry, not the event's fault.
    BackPressure,
    /// The event itself cannot be produced (too large, unknown topic, ...).
    Permanent,
    /// The broker or network failed: retry later.
    Transient,
}

/// Classify a produce error, with a short label for metrics.
pub fn classify(e: &KafkaError) -> (ProduceError, &'static str) {
    let code = match e {
        KafkaError::MessageProduction(c) => *c,
        _ => return (ProduceError::Transient, "client"),
    };
    match code {
        RDKafkaErrorCode::QueueFull => (ProduceError::BackPressure, "queue_full"),
        RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize => {
            (ProduceError::Permanent, "message_too_large")
        }
        RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
            (ProduceError::Permanent, "unknown_topic")
        }
        RDKafkaErrorCode::TopicAuthorizationFailed => (ProduceError::Permanent, "not_authorized"),
        RDKafkaErrorCode::InvalidMessage | RDKafkaErrorCode::InvalidRecord => {
            (ProduceError::Permanent, "invalid_record")
        }
        RDKafkaErrorCode::MessageTimedOut => (ProduceError::Transient, "timed_out"),
        _ => (ProduceError::Transient, "broker"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_tune_but_cannot_weaken_delivery() {
        let ok = producer_config("b:9092", &[parse_override("linger.ms=20").unwrap()]).unwrap();
        assert_eq!(ok.get("linger.ms"), Some("20"));
        assert_eq!(ok.get("enable.idempotence"), Some("true"));
        assert!(producer_config("b", &[("acks".into(), "1".into())]).unwrap_err().contains("acks=all"));
        assert!(producer_config("b", &[("enable.idempotence".into(), "false".into())]).is_err());
        assert!(producer_config("b", &[("acks".into(), "-1".into())]).is_ok());
        assert!(parse_override("novalue").is_err());
        assert!(parse_override("=x").is_err());
    }

    #[test]
    fn errors_are_classified() {
        let e = |c| KafkaError::MessageProduction(c);
        assert_eq!(classify(&e(RDKafkaErrorCode::QueueFull)).0, ProduceError::BackPressure);
        assert_eq!(classify(&e(RDKafkaErrorCode::MessageSizeTooLarge)), (ProduceError::Permanent, "message_too_large"));
        assert_eq!(classify(&e(RDKafkaErrorCode::UnknownTopicOrPartition)).0, ProduceError::Permanent);
        assert_eq!(classify(&e(RDKafkaErrorCode::MessageTimedOut)), (ProduceError::Transient, "timed_out"));
        assert_eq!(classify(&e(RDKafkaErrorCode::NotLeaderForPartition)).0, ProduceError::Transient);
    }
}
