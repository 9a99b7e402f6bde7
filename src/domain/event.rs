//! The event envelope: the one source of truth for "what happened".

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where an event came from: correlation and W3C trace context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventMetadata {
    /// Shared by every event caused by one business request.
    pub correlation_id: Option<String>,
    /// The id of the event or request that caused this one.
    pub causation_id: Option<String>,
    /// W3C `traceparent` of the request that caused this event.
    pub traceparent: Option<String>,
}

/// A past-tense fact about one aggregate, with its typed payload.
pub trait DomainEvent: Serialize {
    /// The aggregate type, e.g. `Session`.
    const AGGREGATE_TYPE: &'static str;
    /// Past tense, e.g. `SessionCreated`.
    fn event_name(&self) -> &'static str;
    /// Version of the payload's schema (`<aggregateType>.<eventName>.v<version>.avsc`, see `avro::catalog`).
    fn event_version(&self) -> u32;
    fn aggregate_id(&self) -> &str;
}

/// A domain event in its envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventEnvelope {
    /// UUID v7: unique and time-ordered.
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_name: String,
    pub event_version: u32,
    pub occurred_on: DateTime<Utc>,
    /// The typed payload, serialized.
    pub payload: serde_json::Value,
    #[serde(flatten)]
    pub metadata: EventMetadata,
}

impl EventEnvelope {
    /// Wrap `event`, giving it a fresh UUID v7.
    pub fn wrap<E: DomainEvent>(event: &E, occurred_on: DateTime<Utc>, metadata: &EventMetadata) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            aggregate_type: E::AGGREGATE_TYPE.to_owned(),
            aggregate_id: event.aggregate_id().to_owned(),
            event_name: event.event_name().to_owned(),
            event_version: event.event_version(),
            occurred_on,
            payload: serde_json::to_value(event).expect("domain events serialize to JSON"),
            metadata: metadata.clone(),
        }
    }
}

/// The current time at the precision events and stores keep (milliseconds:
/// Avro `timestamp-millis`, BSON dates), so an aggregate in memory equals
/// the one read back.
pub fn now_millis() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// A W3C `traceparent` header value if it is well formed (version 00,
/// non-zero trace and parent ids), else `None`: an invalid one is dropped,
/// as the Trace Context spec asks, rather than failing the request.
pub fn valid_traceparent(value: &str) -> Option<String> {
    let parts: Vec<&str> = value.trim().split('-').collect();
    let hex =
        |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    match parts.as_slice() {
        [version, trace, parent, flags]
            if *version == "00"
                && hex(trace, 32)
                && hex(parent, 16)
                && hex(flags, 2)
                && trace.bytes().any(|b| b != b'0')
                && parent.bytes().any(|b| b != b'0') =>
        {
            Some(value.trim().to_owned())
        }
        _ => None,
    }
}

/// A new root `traceparent` (sampled) for requests that arrive without one.
pub fn new_traceparent() -> String {
    let trace = Uuid::new_v4().simple().to_string();
    let span = &Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_validation_follows_w3c() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(valid_traceparent(ok).as_deref(), Some(ok));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(valid_traceparent(bad), None, "{bad:?}");
        }
        assert!(valid_traceparent(&new_traceparent()).is_some());
    }
}
