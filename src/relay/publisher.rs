//! Publishing events in commit order, in two halves so batches pipeline:
//! `enqueue` maps each event to its topic, encodes it as Avro (straight
//! from the row's bytes) with its schema's registry id and hands it to the
//! idempotent producer (or sets it aside); `advance` sends the events that
//! wait for their aggregate's previous event as the broker's answers
//! arrive, across every batch in flight; `settle` sorts a batch whose
//! events are all decided into published events, failed attempts (with
//! their backoff) and events held behind an earlier failure of their
//! aggregate.
//!
//! Per-aggregate order (`ordering`): **an event is handed to the producer
//! only once the previous event of its aggregate is acknowledged.** Events
//! of other aggregates pipeline freely; an aggregate's next event waits
//! (encoded) in its batch, queued behind its aggregate (`ordering`), and
//! is sent by `advance` once its predecessor's acknowledgement is in,
//! whichever batch in flight either is in. So
//! whatever the broker fails, and however late it says so (a record timed
//! out while the broker was away, records purged with a refused producer),
//! no later event of the aggregate can be in Kafka before an earlier one:
//! the first copy of every event is in order, which is the copy a
//! deduplicating consumer applies. An aggregate with a set-aside event is
//! *blocked*: its later events are held (never sent) until the retry path
//! publishes the backlog in order.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;

use mongodb::bson::DateTime;
use rdkafka::{
    ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord, future_producer::DeliveryFuture},
    util::Timeout,
};

use crate::{
    avro::{ConvertError, ValueLayout, encode_confluent_as},
    backoff::{BackoffPolicy, Retry},
    kafka::{ProduceError, classify, headers, producer_refused, topics::EventTopicMapper},
    outbox::{
        EventRow, OutboxStatus,
        document::READABLE_DOC_VERSIONS,
        relay_queries::{Failure, FailureKind, Published, RowChanges},
    },
    relay::{
        ordering::Waiting,
        schemas::{EventSchemas, SchemaError},
        stream::Arrival,
    },
    telemetry::traces,
};

/// An event to publish: its row, its commit-order position (`seq`, which
/// becomes `holdSeq` if it is set aside) and, from the change stream, how
/// it arrived (for the stage latency).
pub struct Outgoing {
    pub row: EventRow,
    pub seq: i64,
    pub arrival: Option<Arrival>,
}

/// One event on its way, and what `enqueue` did with it.
pub struct Item {
    pub row: EventRow,
    pub seq: i64,
    arrival: Option<Arrival>,
    state: ItemState,
}

/// The steps of one published event from the change stream, for the
/// relay's per-stage latency.
#[derive(Debug, Clone, Copy)]
pub struct EventStages {
    pub arrival: Arrival,
    /// Handed to the producer.
    pub sent: Instant,
    /// The broker's answer seen by the relay.
    pub answered: Instant,
}

enum ItemState {
    /// Handed to the producer; `answer` is the broker's, once received.
    Sent {
        topic: String,
        delivery: DeliveryFuture,
        /// When it was handed to the producer.
        sent: Instant,
        answer: Option<DeliveryAnswer>,
        /// When `answer` was seen.
        answered: Option<Instant>,
        /// The event's publish span (while exporting traces), ended when
        /// the batch is settled.
        span: Option<tracing::Span>,
    },
    /// Encoded; sent once the previous event of its aggregate (earlier in
    /// this batch or in an earlier one) is acknowledged.
    Waiting(Encoded),
    Failed {
        error: String,
        label: &'static str,
        kind: FailureKind,
    },
    Held,
}

type DeliveryAnswer = <DeliveryFuture as std::future::Future>::Output;

/// Where a waiting event is: its batch's id and its place in the batch.
pub type WaitingEvents = Waiting<(u64, usize)>;

/// A batch handed to the producer, in commit order.
pub struct Enqueued {
    /// Batches in flight are told apart by it (`WaitingEvents`).
    id: u64,
    pub items: Vec<Item>,
    /// Events sent and not answered yet.
    outstanding: usize,
    /// Events waiting for their aggregate's previous event.
    waiting: usize,
    /// Places of the events answered since `advance` last looked.
    answered: Vec<usize>,
}

impl Enqueued {
    /// Take the broker's answers that have arrived (registering `cx` for
    /// the others). Returns whether any arrived, and whether any is still
    /// outstanding.
    pub fn poll_answers(&mut self, cx: &mut Context<'_>) -> (bool, bool) {
        let mut arrived = false;
        if self.outstanding > 0 {
            for (i, item) in self.items.iter_mut().enumerate() {
                if let ItemState::Sent { delivery, answer: answer @ None, answered, .. } = &mut item.state
                    && let Poll::Ready(result) = Pin::new(delivery).poll(cx)
                {
                    *answer = Some(result);
                    *answered = Some(Instant::now());
                    self.outstanding -= 1;
                    self.answered.push(i);
                    arrived = true;
                }
            }
        }
        (arrived, self.outstanding > 0)
    }

    /// Every event is decided (answered, failed or held; none waits), and
    /// `advance` has seen every answer.
    pub fn decided(&self) -> bool {
        self.outstanding == 0 && self.waiting == 0 && self.answered.is_empty()
    }

    /// Aggregates with an event of this batch not yet acknowledged (sent
    /// and unanswered or failed, or waiting): their next events must wait.
    pub fn unacknowledged_aggregates(&self) -> impl Iterator<Item = &str> {
        self.items
            .iter()
            .filter(|item| match &item.state {
                ItemState::Sent { answer: Some(Ok(Ok(_))), .. } | ItemState::Failed { .. } | ItemState::Held => false,
                ItemState::Sent { .. } | ItemState::Waiting(_) => true,
            })
            .map(|item| item.row.aggregate_id.as_str())
    }
}

/// Wait until the broker answers an event of `batches` (at once when none
/// is outstanding). Cancel-safe: answers are kept in their batch.
pub async fn next_answers(batches: &mut [&mut Enqueued]) {
    std::future::poll_fn(|cx| {
        let (mut arrived, mut outstanding) = (false, false);
        for batch in batches.iter_mut() {
            let (a, o) = batch.poll_answers(cx);
            arrived |= a;
            outstanding |= o;
        }
        if arrived || !outstanding { Poll::Ready(()) } else { Poll::Pending }
    })
    .await
}

/// What `advance` did.
#[derive(Debug, Default)]
pub struct Advanced {
    /// Events sent after their aggregate's previous event was acknowledged.
    pub sent: usize,
    /// Aggregates whose waiting events were held because the send window
    /// closed, with nothing failed ahead of them: the retry path publishes
    /// them once sending may resume.
    pub orphaned: Vec<String>,
}

/// What the broker made of a batch.
#[derive(Debug, Default)]
pub struct Settled {
    /// The per-row writes: failures, held events, retried rows now published.
    pub changes: RowChanges,
    /// Events published at their first attempt (no row write).
    pub published_clean: usize,
    /// Commit-to-acknowledgement latencies of the published events, seconds.
    pub latencies: Vec<f64>,
    /// The steps of the published events that came from the change stream.
    pub stages: Vec<EventStages>,
}

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

/// How a produce error counts, with its metric label.
fn produce_failure(error: &KafkaError) -> (FailureKind, &'static str) {
    let (class, label) = classify(error);
    let kind = match class {
        ProduceError::Permanent => FailureKind::Permanent,
        ProduceError::Transient | ProduceError::BackPressure => FailureKind::Outage,
        ProduceError::Unexplained => FailureKind::Unexplained,
    };
    (kind, label)
}

pub struct Publisher {
    /// The idempotent producer, replaced when the broker refuses its
    /// identity or librdkafka marks it fatal (`current_producer`).
    producer: std::sync::Mutex<FutureProducer>,
    /// Its settings, to make a new one.
    config: ClientConfig,
    /// The broker refused the producer's identity: make a new producer
    /// before the next batch.
    refused: std::sync::atomic::AtomicBool,
    mapper: EventTopicMapper,
    schemas: Arc<EventSchemas>,
    layout: ValueLayout,
    backoff: BackoffPolicy,
    /// The id of the next batch.
    next_batch: std::sync::atomic::AtomicU64,
}

struct Encoded {
    topic: String,
    payload: Vec<u8>,
    headers: OwnedHeaders,
    span: Option<tracing::Span>,
}

/// A random number in [-1, 1] for jitter.
fn unit_random() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() as u64;
    (bits as f64 / u64::MAX as f64) * 2.0 - 1.0
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
fn event_headers(row: &EventRow, traceparent: Option<&str>) -> OwnedHeaders {
    let version = row.event_version.to_string();
    let occurred_on = row.occurred_on.try_to_rfc3339_string().unwrap_or_default();
    let mut h = OwnedHeaders::new()
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

impl Publisher {
    /// A publisher producing with `config` (the producer is made here).
    pub fn new(
        config: ClientConfig,
        mapper: EventTopicMapper,
        schemas: Arc<EventSchemas>,
        layout: ValueLayout,
        backoff: BackoffPolicy,
    ) -> Result<Self, KafkaError> {
        let producer = std::sync::Mutex::new(config.create()?);
        Ok(Self {
            producer,
            config,
            refused: Default::default(),
            mapper,
            schemas,
            layout,
            backoff,
            next_batch: Default::default(),
        })
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
    fn current_producer(&self) -> FutureProducer {
        use rdkafka::producer::Producer;
        let mut producer = self.producer.lock().expect("producer lock");
        let fatal = producer.client().fatal_error();
        if fatal.is_some() || self.refused.swap(false, std::sync::atomic::Ordering::SeqCst) {
            match self.config.create() {
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
    fn note(&self, error: &KafkaError) {
        if producer_refused(error) {
            self.refused.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    async fn encode(&self, row: &EventRow) -> Result<Encoded, EncodeError> {
        if !READABLE_DOC_VERSIONS.contains(&row.doc_version) {
            return Err(EncodeError::UnknownFormat(row.doc_version));
        }
        let version = u32::try_from(row.event_version).map_err(|_| EncodeError::BadVersion(row.event_version))?;
        let topic = self.mapper.topic_for(&row.aggregate_type, &row.event_name);
        let chosen = self.schemas.choose(&topic, &row.aggregate_type, &row.event_name, version).await?;
        let payload = encode_confluent_as(self.layout, chosen.id(), chosen.schema(), &row.raw)
            .map_err(|source| EncodeError::Mismatch { event: row.event_name.clone(), version, source })?;
        let span = publish_span(row, &topic);
        let traceparent = span.as_ref().and_then(traces::traceparent_of);
        Ok(Encoded { topic, payload, headers: event_headers(row, traceparent.as_deref()), span })
    }

    /// A failed attempt: an outage is retried after its backoff without
    /// limit and spends no attempt; an unexplained failure spends one, and
    /// the row goes dead once `maxAttempts` are spent; a permanent failure
    /// goes dead at once (the same bytes fail the same way every time).
    /// The backoff grows with every failed try of either kind.
    fn failure(
        &self,
        row: &EventRow,
        seq: i64,
        error: String,
        label: &'static str,
        kind: FailureKind,
        now: DateTime,
    ) -> Failure {
        let (mut attempts, mut outage_retries) = (row.attempts, row.outage_retries);
        match kind {
            FailureKind::Outage => outage_retries = outage_retries.saturating_add(1),
            FailureKind::Unexplained | FailureKind::Permanent => attempts = attempts.saturating_add(1),
        }
        let tries = u32::try_from(attempts.saturating_add(outage_retries)).unwrap_or(u32::MAX);
        let retry = match kind {
            FailureKind::Permanent => Retry::GiveUp,
            FailureKind::Outage => self.backoff.without_attempt_limit().after_failure(tries, unit_random()),
            FailureKind::Unexplained if u32::try_from(attempts).unwrap_or(u32::MAX) >= self.backoff.max_attempts => {
                Retry::GiveUp
            }
            FailureKind::Unexplained => self.backoff.without_attempt_limit().after_failure(tries, unit_random()),
        };
        let (retry_at, backoff_ms) = match retry {
            Retry::After(delay) => {
                let ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                (Some(DateTime::from_millis(now.timestamp_millis().saturating_add(ms))), ms)
            }
            Retry::GiveUp => (None, 0),
        };
        Failure {
            id: row.id.clone().into(),
            attempts,
            outage_retries,
            kind,
            label,
            error,
            retry_at,
            backoff_ms,
            hold_seq: row.hold_seq.unwrap_or(seq),
        }
    }

    /// Hand `rows` (in commit order, each with its position) to the
    /// producer. Events of `blocked` aggregates are held. An event whose
    /// aggregate has an unacknowledged event (earlier in this batch, or in
    /// `unacknowledged`: the batches still in flight) waits, encoded, in
    /// `waiting` for `advance` to send it. An event that cannot be encoded
    /// or that the client refuses outright (too large, unknown topic) fails
    /// here and blocks its aggregate, so nothing after it in the aggregate
    /// is sent (the events of it waiting before it still go, in turn).
    /// A full local queue is back-pressure: wait, never drop.
    pub async fn enqueue(
        &self,
        rows: Vec<Outgoing>,
        blocked: &mut HashSet<String>,
        unacknowledged: &HashSet<&str>,
        waiting: &mut WaitingEvents,
    ) -> Enqueued {
        let id = self.next_batch.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Encode the whole batch first, then hand it to the producer in one
        // go: the producer's batches fill within its short linger, so
        // latency stays low without small requests at high rates.
        // An event that cannot be encoded blocks its aggregate from its own
        // place on: the events after it are held here, those before it are
        // still sent (`blocked` is updated at its place in the pass below).
        let mut encoding_failed: HashSet<String> = HashSet::new();
        let mut encoded = Vec::with_capacity(rows.len());
        for Outgoing { row, seq, arrival } in rows {
            let state = if blocked.contains(&row.aggregate_id) || encoding_failed.contains(&row.aggregate_id) {
                Err(ItemState::Held)
            } else {
                self.encode(&row).await.map_err(|error| {
                    encoding_failed.insert(row.aggregate_id.clone());
                    ItemState::Failed { error: error.to_string(), label: error.label(), kind: error.kind() }
                })
            };
            encoded.push((row, seq, arrival, state));
        }
        // Aggregates with an event sent from this batch: their later events
        // wait for its acknowledgement.
        let mut sent = HashSet::new();
        let mut items = Vec::with_capacity(encoded.len());
        let (mut outstanding, mut waits) = (0, 0);
        let producer = self.current_producer();
        for (row, seq, arrival, state) in encoded {
            let state = match state {
                Err(state) => {
                    if matches!(state, ItemState::Failed { .. }) {
                        blocked.insert(row.aggregate_id.clone());
                    }
                    state
                }
                // Refused by the producer, or not encoded, earlier in this pass.
                Ok(_) if blocked.contains(&row.aggregate_id) => ItemState::Held,
                Ok(encoded)
                    if unacknowledged.contains(row.aggregate_id.as_str()) || sent.contains(&row.aggregate_id) =>
                {
                    waiting.push(&row.aggregate_id, (id, items.len()));
                    waits += 1;
                    ItemState::Waiting(encoded)
                }
                Ok(encoded) => {
                    let state = send(&producer, &row, encoded).await;
                    if matches!(state, ItemState::Failed { .. }) {
                        blocked.insert(row.aggregate_id.clone());
                    } else {
                        sent.insert(row.aggregate_id.clone());
                        outstanding += 1;
                    }
                    state
                }
            };
            items.push(Item { row, seq, arrival, state });
        }
        Enqueued { id, items, outstanding, waiting: waits, answered: Vec::new() }
    }

    /// Sort a decided batch (`Enqueued::decided`) into published, failed
    /// and held, in commit order.
    pub fn settle(&self, batch: Enqueued, blocked: &mut HashSet<String>, now: DateTime) -> Settled {
        debug_assert!(batch.decided(), "only a batch whose events are all decided is settled");
        let mut out = Settled::default();
        for item in batch.items {
            let Item { row, seq, arrival, state } = item;
            match state {
                ItemState::Held | ItemState::Waiting(_) => {
                    // Not set aside yet (no status, or `pending` from the
                    // first release): it waits in its aggregate's backlog.
                    if matches!(row.status, None | Some(OutboxStatus::Pending)) {
                        out.changes.held.push((row.id.clone(), seq));
                    }
                }
                ItemState::Failed { error, label, kind } => {
                    out.changes.failed.push(self.failure(&row, seq, error, label, kind, now));
                }
                ItemState::Sent { topic, answer, span, sent, answered, .. } => {
                    let result = answer.expect("every sent event of a settled batch has its answer");
                    let failed = match result {
                        Ok(Ok(delivery)) => {
                            if row.status.is_some() {
                                out.changes.published.push(Published {
                                    id: row.id.clone(),
                                    partition: delivery.partition,
                                    offset: delivery.offset,
                                });
                            } else {
                                out.published_clean += 1;
                            }
                            let acked_at = DateTime::now().timestamp_millis();
                            out.latencies.push((acked_at - row.occurred_on.timestamp_millis()).max(0) as f64 / 1000.0);
                            if let (Some(arrival), Some(answered)) = (arrival, answered) {
                                out.stages.push(EventStages { arrival, sent, answered });
                            }
                            None
                        }
                        Ok(Err((error, _))) => {
                            self.note(&error);
                            let (kind, label) = produce_failure(&error);
                            Some((format!("produce to {topic}: {error}"), label, kind))
                        }
                        Err(_canceled) => Some((
                            format!("produce to {topic}: the producer shut down before the broker answered"),
                            "canceled",
                            FailureKind::Outage,
                        )),
                    };
                    if let (Some(span), Some((error, ..))) = (&span, &failed) {
                        traces::record_error(span, error);
                    }
                    if let Some((error, label, kind)) = failed {
                        blocked.insert(row.aggregate_id.clone());
                        out.changes.failed.push(self.failure(&row, seq, error, label, kind, now));
                    }
                }
            }
        }
        out
    }

    /// Act on the broker's answers that arrived in `batches` (every batch
    /// in flight): an acknowledged event releases the next waiting event of
    /// its aggregate, which is sent; a failed one holds every waiting event
    /// of its aggregate and blocks it. Past `send_until` nothing more is
    /// sent (a standby may take over soon): a released event is held with
    /// the rest of its aggregate, reported in `Advanced::orphaned` for the
    /// retry path once sending may resume.
    pub async fn advance(
        &self,
        batches: &mut [&mut Enqueued],
        waiting: &mut WaitingEvents,
        blocked: &mut HashSet<String>,
        send_until: Instant,
    ) -> Advanced {
        let mut out = Advanced::default();
        let may_send = Instant::now() < send_until;
        let mut producer = None;
        for b in 0..batches.len() {
            for i in std::mem::take(&mut batches[b].answered) {
                let item = &batches[b].items[i];
                let acknowledged = matches!(item.state, ItemState::Sent { answer: Some(Ok(Ok(_))), .. });
                if acknowledged && waiting.is_empty() {
                    continue;
                }
                let aggregate = item.row.aggregate_id.clone();
                if !acknowledged {
                    blocked.insert(aggregate.clone());
                    hold(batches, waiting.stopped(&aggregate));
                    continue;
                }
                let Some(next) = waiting.acknowledged(&aggregate) else { continue };
                if !may_send {
                    if blocked.insert(aggregate.clone()) {
                        out.orphaned.push(aggregate.clone());
                    }
                    hold(batches, std::iter::once(next).chain(waiting.stopped(&aggregate)));
                    continue;
                }
                let Some((batch, row, encoded)) = take_waiting(batches, next) else { continue };
                let producer = producer.get_or_insert_with(|| self.current_producer());
                let state = send(producer, row, encoded).await;
                let failed = matches!(state, ItemState::Failed { .. });
                place(batches, batch, next.1, state);
                if failed {
                    blocked.insert(aggregate.clone());
                    hold(batches, waiting.stopped(&aggregate));
                } else {
                    out.sent += 1;
                }
            }
        }
        out
    }

    /// Wait for in-flight messages (shutdown).
    pub fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer;
        let producer = self.producer.lock().expect("producer lock").clone();
        if let Err(e) = producer.flush(Timeout::After(timeout)) {
            tracing::warn!(error = %e, "producer flush at shutdown");
        }
    }
}

/// The bytes of a record's key, value and headers.
fn record_size(record: &FutureRecord<'_, str, Vec<u8>>) -> usize {
    use rdkafka::message::Headers;
    let headers: usize =
        record.headers.as_ref().map_or(0, |h| h.iter().map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len)).sum());
    record.key.map_or(0, str::len) + record.payload.map_or(0, Vec::len) + headers
}

/// Hand one record to `producer`; a full local queue is waited out.
async fn send(producer: &FutureProducer, row: &EventRow, encoded: Encoded) -> ItemState {
    let Encoded { topic, payload, headers, span } = encoded;
    let mut record = FutureRecord::to(&topic).key(row.aggregate_id.as_str()).payload(&payload).headers(headers);
    loop {
        match producer.send_result(record) {
            Ok(delivery) => {
                return ItemState::Sent { topic, delivery, sent: Instant::now(), answer: None, answered: None, span };
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((error, refused)) => {
                let (kind, label) = produce_failure(&error);
                let size = if label == "message_too_large" {
                    format!(
                        " (a record of {} bytes with key and headers, its value {} bytes)",
                        record_size(&refused),
                        payload.len()
                    )
                } else {
                    String::new()
                };
                return ItemState::Failed { error: format!("produce to {topic}: {error}{size}"), label, kind };
            }
        }
    }
}

/// The batch of `batches` with id `id`.
fn batch_of(batches: &[&mut Enqueued], id: u64) -> Option<usize> {
    batches.iter().position(|b| b.id == id)
}

/// Take a waiting event out of its batch to send it: its batch's place in
/// `batches`, its row and its encoded record (the item is left held until
/// `place` puts its new state).
fn take_waiting<'a>(batches: &'a mut [&mut Enqueued], (id, i): (u64, usize)) -> Option<(usize, &'a EventRow, Encoded)> {
    let b = batch_of(batches, id)?;
    let batch = &mut *batches[b];
    let item = &mut batch.items[i];
    let ItemState::Waiting(encoded) = std::mem::replace(&mut item.state, ItemState::Held) else {
        debug_assert!(false, "a queued event is waiting");
        return None;
    };
    batch.waiting -= 1;
    Some((b, &item.row, encoded))
}

/// Put the state of an event taken by `take_waiting`.
fn place(batches: &mut [&mut Enqueued], b: usize, i: usize, state: ItemState) {
    let batch = &mut *batches[b];
    if matches!(state, ItemState::Sent { .. }) {
        batch.outstanding += 1;
    }
    batch.items[i].state = state;
}

/// Hold waiting events: their aggregate stopped.
fn hold(batches: &mut [&mut Enqueued], events: impl IntoIterator<Item = (u64, usize)>) {
    for (id, i) in events {
        let Some(b) = batch_of(batches, id) else { continue };
        let batch = &mut *batches[b];
        if matches!(batch.items[i].state, ItemState::Waiting(_)) {
            batch.items[i].state = ItemState::Held;
            batch.waiting -= 1;
        }
    }
}
