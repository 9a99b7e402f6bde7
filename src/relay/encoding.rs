//! Encoding an outbox row for Kafka: its topic and schema (its route, kept
//! per kind of event in `super::routes`), its value as Confluent-framed
//! Avro straight from the row's bytes with its schema's registry id, its
//! headers, and its publish span.

use std::sync::Arc;

use rdkafka::message::{Header, OwnedHeaders};

use crate::{
    avro::{ConvertError, ValueLayout, encode_confluent_as},
    kafka::{headers, topics::EventTopicMapper},
    outbox::{EventRow, document::READABLE_DOC_VERSIONS, relay_queries::FailureKind},
    relay::{
        routes::{Route, Routes},
        schemas::{EventSchemas, SchemaError, Standing},
    },
    telemetry::traces,
};

/// Why an event could not be encoded for Kafka.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(
        "field `docVersion`: outbox document format {0} is unknown to this relay (it reads {READABLE_DOC_VERSIONS:?})"
    )]
    UnknownFormat(i32),
    #[error("field `eventVersion`: {0} is not a schema version (1 or more)")]
    BadVersion(i32),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("event does not match schema {event} v{version}: {source}")]
    Mismatch {
        event: String,
        version: u32,
        #[source]
        source: ConvertError,
    },
}

impl EncodeError {
    /// The label of the relay's failure metric.
    pub fn label(&self) -> &'static str {
        match self {
            EncodeError::Schema(e) if e.is_outage() => "registry_unavailable",
            EncodeError::Schema(e) if e.is_missing() => "no_schema",
            EncodeError::Schema(_) => "registry_refused",
            EncodeError::UnknownFormat(_) | EncodeError::BadVersion(_) => "malformed",
            EncodeError::Mismatch { .. } => "schema",
        }
    }

    /// How the failure counts: a registry that is away is an outage; a
    /// schema that is not there (yet) spends attempts with backoff, time to
    /// add the file or register it; everything else is the event's own (the
    /// same row and schema fail the same way every time).
    pub fn kind(&self) -> FailureKind {
        match self {
            EncodeError::Schema(e) if e.is_outage() => FailureKind::Outage,
            EncodeError::Schema(e) if e.is_missing() => FailureKind::Unexplained,
            _ => FailureKind::Permanent,
        }
    }
}

/// An event ready for the producer.
pub struct Encoded {
    pub topic: Arc<str>,
    /// The Confluent-framed Avro value.
    pub payload: Vec<u8>,
    pub headers: OwnedHeaders,
    /// Its publish span, while exporting traces.
    pub span: Option<tracing::Span>,
}

/// Turns rows into records: routing, schemas and the value layout.
pub struct EventEncoder {
    mapper: EventTopicMapper,
    schemas: Arc<EventSchemas>,
    layout: ValueLayout,
    routes: Routes,
}

impl EventEncoder {
    pub fn new(mapper: EventTopicMapper, schemas: Arc<EventSchemas>, layout: ValueLayout) -> Self {
        Self { mapper, schemas, layout, routes: Routes::default() }
    }

    /// The event's topic, its value encoded with the schema its topic,
    /// name and version select (registry id in the framing), and its
    /// headers.
    pub async fn encode(&self, row: &EventRow) -> Result<Encoded, EncodeError> {
        let (Route { topic, chosen }, version) = self.route(row).await?;
        let payload = encode_confluent_as(self.layout, chosen.id(), chosen.schema(), &row.raw)
            .map_err(|source| EncodeError::Mismatch { event: row.event_name.clone(), version, source })?;
        let span = publish_span(row, &topic);
        let traceparent = span.as_ref().and_then(traces::traceparent_of);
        Ok(Encoded { topic, payload, headers: event_headers(row, traceparent.as_deref()), span })
    }

    /// The event's route (its topic, and the schema it is encoded with,
    /// which its topic, name and version select) and its schema version:
    /// the route kept for its kind of event while that stands, else worked
    /// out and kept.
    pub async fn route(&self, row: &EventRow) -> Result<(Route, u32), EncodeError> {
        if !READABLE_DOC_VERSIONS.contains(&row.doc_version) {
            return Err(EncodeError::UnknownFormat(row.doc_version));
        }
        let version = u32::try_from(row.event_version).map_err(|_| EncodeError::BadVersion(row.event_version))?;
        let (aggregate_type, event_name) = (row.aggregate_type.as_str(), row.event_name.as_str());
        if let Some(route) = self.routes.get(aggregate_type, event_name, version, |s| self.schemas.stands(s)) {
            return Ok((route, version));
        }
        let (route, standing) = self.resolve(aggregate_type, event_name, version).await?;
        self.routes.keep(aggregate_type, event_name, version, route.clone(), standing);
        Ok((route, version))
    }

    /// The route of a kind of event worked out afresh (the topic name
    /// built, the schema and its registry id looked up), and how long it
    /// stands: what [`Self::route`] does when it has none kept.
    pub async fn resolve(
        &self,
        aggregate_type: &str,
        event_name: &str,
        version: u32,
    ) -> Result<(Route, Standing), SchemaError> {
        let topic = self.mapper.topic_for(aggregate_type, event_name);
        let (chosen, standing) = self.schemas.choose(&topic, aggregate_type, event_name, version).await?;
        Ok((Route { topic: topic.into(), chosen }, standing))
    }
}

/// The event's publish span, a child of the request that wrote the event
/// (its `traceparent`), made only while exporting traces: one span per
/// event costs more than the rest of the relay's work for it otherwise.
/// It lasts from encoding to the broker's answer, waits for the previous
/// event of its aggregate included.
fn publish_span(row: &EventRow, topic: &str) -> Option<tracing::Span> {
    if !traces::exporting() {
        return None;
    }
    let span = tracing::info_span!("publish", otel.name = %format!("publish {topic}"), otel.kind = "producer",
        messaging.system = "kafka", messaging.operation.type = "send", messaging.destination.name = %topic,
        messaging.message.id = %row.id, messaging.kafka.message.key = %row.aggregate_id,
        outbox.event_name = %row.event_name, trace_id = tracing::field::Empty,
        otel.status_code = tracing::field::Empty, otel.status_description = tracing::field::Empty);
    traces::continue_from(&span, row.traceparent.as_deref());
    Some(span)
}

/// The record's headers. Its `traceparent` is the publish span's, so the
/// consumer's span is the publish span's child; without one, the event's.
pub fn event_headers(row: &EventRow, traceparent: Option<&str>) -> OwnedHeaders {
    let version = row.event_version.to_string();
    let occurred_on = row.occurred_on.try_to_rfc3339_string().unwrap_or_default();
    // Room for every header at once: librdkafka grows its list by
    // reallocating.
    let mut h = OwnedHeaders::new_with_capacity(9)
        .insert(Header { key: headers::EVENT_ID, value: Some(row.id.as_str()) })
        .insert(Header { key: headers::EVENT_NAME, value: Some(row.event_name.as_str()) })
        .insert(Header { key: headers::EVENT_VERSION, value: Some(version.as_str()) })
        .insert(Header { key: headers::AGGREGATE_TYPE, value: Some(row.aggregate_type.as_str()) })
        .insert(Header { key: headers::AGGREGATE_ID, value: Some(row.aggregate_id.as_str()) })
        .insert(Header { key: headers::OCCURRED_ON, value: Some(occurred_on.as_str()) });
    for (key, value) in [
        (headers::CORRELATION_ID, row.correlation_id.as_deref()),
        (headers::CAUSATION_ID, row.causation_id.as_deref()),
        (headers::TRACEPARENT, traceparent.or(row.traceparent.as_deref())),
    ] {
        if let Some(v) = value {
            h = h.insert(Header { key, value: Some(v.as_bytes()) });
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn row() -> EventRow {
        let doc = mongodb::bson::doc! {
            "_id": "evt-1", "docVersion": 1, "aggregateType": "Order", "aggregateId": "o-1",
            "aggregateVersion": 1_i64, "eventName": "OrderPlaced", "eventVersion": 2,
            "occurredOn": mongodb::bson::DateTime::from_millis(0), "payload": {}, "status": "pending",
            "attempts": 0, "correlationId": "c-1", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        };
        let raw = mongodb::bson::RawDocumentBuf::from_document(&doc).expect("a document");
        EventRow::from_raw(raw).expect("a row")
    }

    fn header<'a>(h: &'a OwnedHeaders, key: &str) -> Option<&'a str> {
        h.iter().find(|x| x.key == key).and_then(|x| x.value).map(|v| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn headers_carry_the_envelope_and_the_publish_span_replaces_the_writers_traceparent() {
        let row = row();
        let h = event_headers(&row, None);
        assert_eq!(header(&h, headers::EVENT_ID), Some("evt-1"));
        assert_eq!(header(&h, headers::EVENT_NAME), Some("OrderPlaced"));
        assert_eq!(header(&h, headers::EVENT_VERSION), Some("2"));
        assert_eq!(header(&h, headers::AGGREGATE_ID), Some("o-1"));
        assert_eq!(header(&h, headers::CORRELATION_ID), Some("c-1"));
        assert_eq!(header(&h, headers::CAUSATION_ID), None, "absent, not empty");
        assert_eq!(header(&h, headers::TRACEPARENT), row.traceparent.as_deref());
        let span = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01";
        assert_eq!(header(&event_headers(&row, Some(span)), headers::TRACEPARENT), Some(span));
    }
}
