//! Kafka plumbing shared by the relay, the consumers and the operator:
//! client configuration and credentials, produce-error classification,
//! topic routing (`topics`), record headers (`headers`) and group lag
//! (`lag`).

pub mod headers;
pub mod lag;
pub mod topics;

use std::time::Duration;

use rdkafka::{ClientConfig, error::KafkaError, producer::FutureProducer, types::RDKafkaErrorCode};

/// What separates librdkafka overrides in one environment variable
/// (`KAFKA_PRODUCER_CONFIG`, `KAFKA_CONSUMER_CONFIG`): a newline, because
/// values may contain commas (`sasl.jaas.config`, `client.id`, `debug`).
pub const OVERRIDES_DELIMITER: char = '\n';

/// `key=value` overrides of librdkafka settings, e.g. `linger.ms=10`.
pub fn parse_override(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("'{s}' must look like key=value"))?;
    let (k, v) = (k.trim(), v.trim());
    if k.is_empty() {
        return Err(format!("'{s}': empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// Prefix of environment variables carrying librdkafka security settings,
/// e.g. `KAFKA_AUTH_SASL_USERNAME` -> `sasl.username`. The operator fills
/// them from the resource's `kafka.authSecret` (keys `SASL_USERNAME`,
/// `SASL_PASSWORD`, `SASL_MECHANISM`, `SECURITY_PROTOCOL`, ...), so
/// credentials never appear in a spec, a ConfigMap or a command line.
pub const AUTH_ENV_PREFIX: &str = "KAFKA_AUTH_";

/// librdkafka settings from `KAFKA_AUTH_*` variables (pure over its input).
pub fn auth_settings(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vars
        .into_iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix(AUTH_ENV_PREFIX)?;
            (!key.is_empty()).then(|| (key.to_ascii_lowercase().replace('_', "."), v))
        })
        .collect();
    out.sort();
    out
}

/// Apply the process's `KAFKA_AUTH_*` settings to a client configuration.
pub fn with_auth(c: &mut ClientConfig) -> &mut ClientConfig {
    for (k, v) in auth_settings(std::env::vars()) {
        c.set(k, v);
    }
    c
}

/// The relay's producer: idempotent, `acks=all`, pipelined. Overrides may
/// tune it but not give up idempotence or full acknowledgement, which the
/// no-loss and ordering guarantees rest on.
pub fn producer_config(bootstrap: &str, overrides: &[(String, String)]) -> Result<ClientConfig, String> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "30000");
    with_auth(&mut c);
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

/// The relay's producer: `producer_config`'s, with librdkafka's gap-less
/// guarantee and no message timeout of librdkafka's own. Its records of a
/// partition are then written in produce order with no hole: when one
/// fails, every later one fails too (the series is cut short), which is
/// what lets several events of an aggregate be in flight at once
/// (`relay::ordering`). librdkafka's message timeout is not covered by the
/// guarantee (earlier records timed out, later ones written), so the relay
/// bounds each send itself and gives the whole producer up past it.
pub fn relay_producer_config(bootstrap: &str, overrides: &[(String, String)]) -> Result<ClientConfig, String> {
    if overrides.iter().any(|(k, v)| k == "enable.gapless.guarantee" && v != "true") {
        return Err("enable.gapless.guarantee=false would let a later event of an aggregate reach Kafka before an \
                    earlier one that failed; the relay needs it"
            .into());
    }
    let mut c = producer_config(bootstrap, overrides)?;
    c.remove("delivery.timeout.ms").set("message.timeout.ms", "0").set("enable.gapless.guarantee", "true");
    Ok(c)
}

/// A producer made from `config` (`producer_config`'s), with its producer
/// id asked for at once rather than on librdkafka's timer.
///
/// An idempotent producer sends nothing until a broker has given it a
/// producer id. librdkafka asks for one when a metadata answer arrives or
/// when its 500 ms retry timer fires, and only if a broker connection is up
/// at that moment. On a new producer the first answer comes over the
/// bootstrap connection, which librdkafka closes as it learns the broker's
/// own id, and the broker's own connection comes up just after the check:
/// the first record then waits one or two timer periods, 0.5-1 s, on most
/// starts (a relay claiming a range, a replaced producer). Asking for
/// metadata once the broker is known has the answer arrive over the
/// broker's own connection, and librdkafka asks for the id then. This runs
/// on a thread of its own and changes nothing else: should it fail, the
/// timer still gets the id.
pub fn create_producer(config: &ClientConfig) -> Result<FutureProducer, KafkaError> {
    use rdkafka::producer::Producer;
    let producer: FutureProducer = config.create()?;
    let client = producer.clone();
    let started = std::thread::Builder::new().name("producer-id".into()).spawn(move || {
        // The first answer names the brokers; the second comes from one.
        for _ in 0..2 {
            if let Err(error) = client.client().fetch_metadata(None, Duration::from_secs(5)) {
                tracing::debug!(%error, "asking for metadata on a new producer");
            }
        }
    });
    if let Err(error) = started {
        tracing::debug!(%error, "a new producer's id is left to librdkafka's timer");
    }
    Ok(producer)
}

/// How a failed produce is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProduceError {
    /// The local queue is full: wait and retry, not the event's fault.
    BackPressure,
    /// The event itself cannot be produced as it is (too large, refused by
    /// authorization or by the broker as invalid): retrying cannot help.
    Permanent,
    /// The broker, the network or the cluster's state failed (unreachable,
    /// timed out, no leader, not enough replicas, producer refused and
    /// replaced, topic not there yet): retry for as long as it lasts.
    Transient,
    /// An error none of the above explains: retried a bounded number of
    /// times.
    Unexplained,
}

/// Classify a produce error, with a short label for metrics.
pub fn classify(e: &KafkaError) -> (ProduceError, &'static str) {
    use RDKafkaErrorCode as C;
    let code = match e {
        KafkaError::MessageProduction(c) => *c,
        KafkaError::Canceled => return (ProduceError::Transient, "canceled"),
        _ => return (ProduceError::Unexplained, "client"),
    };
    match code {
        C::QueueFull => (ProduceError::BackPressure, "queue_full"),
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => {
            (ProduceError::Permanent, "message_too_large")
        }
        C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => (ProduceError::Permanent, "not_authorized"),
        C::InvalidMessage | C::InvalidRecord | C::PolicyViolation | C::InvalidTopic => {
            (ProduceError::Permanent, "invalid_record")
        }
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => {
            (ProduceError::Transient, "unknown_topic")
        }
        C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut | C::TimedOutQueue => {
            (ProduceError::Transient, "timed_out")
        }
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::NetworkException
        | C::BrokerNotAvailable
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::ReplicaNotAvailable
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::KafkaStorageError
        | C::NotController
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::PreferredLeaderNotAvailable
        | C::ThrottlingQuotaExceeded
        | C::PurgeQueue
        | C::PurgeInflight
        | C::BrokerDestroy
        | C::DestroyBroker
        | C::Retry => (ProduceError::Transient, "broker_unavailable"),
        _ if producer_refused(e) => (ProduceError::Transient, "producer_refused"),
        _ => (ProduceError::Unexplained, "broker"),
    }
}

/// Whether a produce error says the broker refuses this producer's
/// identity, so that no later record of it can succeed.
pub fn producer_refused(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                | RDKafkaErrorCode::InvalidProducerIdMapping
                | RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::GaplessGuarantee
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fenced_or_out_of_step_producer_is_refused_a_timeout_is_not() {
        for code in [RDKafkaErrorCode::ProducerFenced, RDKafkaErrorCode::OutOfOrderSequenceNumber] {
            let e = KafkaError::MessageProduction(code);
            assert!(producer_refused(&e), "{code:?}");
            assert_eq!(classify(&e), (ProduceError::Transient, "producer_refused"));
        }
        assert!(!producer_refused(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)));
        assert!(!producer_refused(&KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)));
    }

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
    fn the_relays_producer_keeps_its_series_gap_less_with_no_timeout_of_librdkafkas() {
        let timeout = [("delivery.timeout.ms".to_owned(), "800".to_owned())];
        let c = relay_producer_config("b:9092", &timeout).unwrap();
        assert_eq!(c.get("enable.gapless.guarantee"), Some("true"));
        assert_eq!(c.get("message.timeout.ms"), Some("0"), "the relay bounds its sends itself");
        assert_eq!(c.get("delivery.timeout.ms"), None, "no alias left to set it back");
        let off = [("enable.gapless.guarantee".to_owned(), "false".to_owned())];
        assert!(relay_producer_config("b", &off).unwrap_err().contains("gapless"));
    }

    #[test]
    fn auth_settings_come_from_prefixed_variables() {
        let vars = [
            ("KAFKA_AUTH_SASL_USERNAME".to_owned(), "u".to_owned()),
            ("KAFKA_AUTH_SECURITY_PROTOCOL".to_owned(), "SASL_SSL".to_owned()),
            ("KAFKA_AUTH_".to_owned(), "ignored".to_owned()),
            ("KAFKA_BOOTSTRAP".to_owned(), "not auth".to_owned()),
        ];
        assert_eq!(
            auth_settings(vars),
            [("sasl.username".to_owned(), "u".to_owned()), ("security.protocol".to_owned(), "SASL_SSL".to_owned())]
        );
    }

    #[test]
    fn errors_are_classified() {
        let e = |c| KafkaError::MessageProduction(c);
        assert_eq!(classify(&e(RDKafkaErrorCode::QueueFull)).0, ProduceError::BackPressure);
        assert_eq!(classify(&e(RDKafkaErrorCode::MessageSizeTooLarge)), (ProduceError::Permanent, "message_too_large"));
        assert_eq!(classify(&e(RDKafkaErrorCode::TopicAuthorizationFailed)).0, ProduceError::Permanent);
        assert_eq!(classify(&e(RDKafkaErrorCode::UnknownTopicOrPartition)), (ProduceError::Transient, "unknown_topic"));
        assert_eq!(classify(&e(RDKafkaErrorCode::MessageTimedOut)), (ProduceError::Transient, "timed_out"));
        assert_eq!(classify(&e(RDKafkaErrorCode::NotLeaderForPartition)).0, ProduceError::Transient);
        assert_eq!(classify(&e(RDKafkaErrorCode::AllBrokersDown)).0, ProduceError::Transient);
        assert_eq!(classify(&e(RDKafkaErrorCode::InvalidRequiredAcks)), (ProduceError::Unexplained, "broker"));
    }
}
