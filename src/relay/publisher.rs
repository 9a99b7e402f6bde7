//! Publishing events in commit order, in two halves so batches pipeline:
//! `enqueue` maps each event to its topic, encodes it as Avro (straight
//! from the row's bytes) with its schema's registry id and hands it to the
//! idempotent producer (or sets it aside); `advance` acts on the broker's
//! answers as they arrive, across every batch in flight; `settle` sorts a
//! batch whose events are all decided into published events, failed
//! attempts (with their backoff) and events held behind an earlier failure
//! of their aggregate. Encoding a row is `encoding`'s; the producer, and
//! replacing it when the broker refuses its identity or leaves it
//! unanswered, `producer`'s.
//!
//! Per-aggregate order (`ordering`): **an aggregate's events are in flight
//! on one producer and one topic at a time.** The producer keeps their
//! order (same partition, idempotent, gap-less: a failure cuts the series
//! short, never holes it), so they go at once, one behind the other; an
//! event for another topic, or after the producer was replaced, waits
//! (encoded, in its batch) until everything of its aggregate in flight is
//! answered, and `advance` sends it then, whichever batch in flight either
//! is in. So whatever the broker fails, and however late it says so, no
//! later event of an aggregate can be in Kafka before an earlier one: the
//! first copy of every event is in order, which is the copy a
//! deduplicating consumer applies. An aggregate with a set-aside event is
//! *blocked*: its later events are held (never sent) until the retry path
//! publishes the backlog in order.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;

use mongodb::bson::DateTime;
use rdkafka::{
    ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    producer::{FutureProducer, FutureRecord, future_producer::DeliveryFuture},
    util::Timeout,
};

use crate::{
    avro::ValueLayout,
    backoff::{BackoffPolicy, Retry},
    kafka::topics::EventTopicMapper,
    outbox::{
        EventRow, OutboxStatus,
        relay_queries::{Failure, FailureKind, Published, RowChanges},
    },
    relay::{
        encoding::{Encoded, EventEncoder},
        ordering::AggregateOrder,
        producer::{Generation, ReplaceableProducer, produce_failure, record_size},
        schemas::EventSchemas,
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
        topic: Arc<str>,
        /// The producer's generation (`ReplaceableProducer::current`).
        producer: Generation,
        delivery: DeliveryFuture,
        /// When it was handed to the producer.
        sent: Instant,
        answer: Option<Answer>,
        /// When `answer` was seen.
        answered: Option<Instant>,
        /// The event's publish span (while exporting traces), ended when
        /// the batch is settled.
        span: Option<tracing::Span>,
    },
    /// Encoded; sent once its aggregate's events in flight on another
    /// producer or topic (in this batch or an earlier one) are answered.
    Waiting(Encoded),
    Failed {
        error: String,
        label: &'static str,
        kind: FailureKind,
    },
    Held,
}

/// The broker's answer to one record, kept small: where it was written, or
/// why not (the refused record itself is dropped at once).
enum Answer {
    Written {
        partition: i32,
        offset: i64,
    },
    Refused(KafkaError),
    /// The producer shut down before the broker answered.
    Canceled,
}

impl Answer {
    fn of(result: <DeliveryFuture as Future>::Output) -> Self {
        match result {
            Ok(Ok(delivery)) => Answer::Written { partition: delivery.partition, offset: delivery.offset },
            Ok(Err((error, _record))) => Answer::Refused(error),
            Err(_canceled) => Answer::Canceled,
        }
    }
}

/// The aggregates in flight; a waiting event is named by its batch's id and
/// its place in the batch.
pub type AggregatesInFlight = AggregateOrder<(u64, usize)>;

/// A batch handed to the producer, in commit order.
pub struct Enqueued {
    /// Batches in flight are told apart by it (`WaitingEvents`).
    id: u64,
    pub items: Vec<Item>,
    /// Events sent and not answered yet.
    outstanding: usize,
    /// Events waiting for their aggregate's events in flight.
    waiting: usize,
    /// Places of the events answered since `advance` last looked.
    answered: Vec<usize>,
    /// When to look for sends unanswered for too long
    /// (`Publisher::give_up_overdue`).
    check_at: Instant,
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
                    *answer = Some(Answer::of(result));
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
    /// Events sent after waiting for their aggregate's events in flight.
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

/// Publishes batches in commit order, an aggregate's events in flight on
/// one producer and topic at a time (see the module's doc).
pub struct Publisher {
    producer: ReplaceableProducer,
    encoder: EventEncoder,
    backoff: BackoffPolicy,
    /// How long a send may wait for the broker's answer before the
    /// producer is given up (`give_up_overdue`).
    answer_timeout: Duration,
    /// The producer generations given up for want of answers.
    given_up: Mutex<HashSet<Generation>>,
    /// The id of the next batch.
    next_batch: std::sync::atomic::AtomicU64,
}

/// A random number in [-1, 1] for jitter.
fn unit_random() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() as u64;
    (bits as f64 / u64::MAX as f64) * 2.0 - 1.0
}

impl Publisher {
    /// A publisher producing with `config` (the producer is made here),
    /// giving up a producer that leaves a send unanswered for
    /// `answer_timeout`.
    pub fn new(
        config: ClientConfig,
        mapper: EventTopicMapper,
        schemas: Arc<EventSchemas>,
        layout: ValueLayout,
        backoff: BackoffPolicy,
        answer_timeout: Duration,
    ) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: ReplaceableProducer::new(config)?,
            encoder: EventEncoder::new(mapper, schemas, layout),
            backoff,
            answer_timeout,
            given_up: Mutex::default(),
            next_batch: Default::default(),
        })
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
    /// aggregate has events in flight on another producer or topic (in this
    /// batch or one still in flight, as `order` has them) waits, encoded,
    /// for `advance` to send it; the others go at once. An event that
    /// cannot be encoded or that the client refuses outright (too large,
    /// unknown topic) fails here and blocks its aggregate, so nothing after
    /// it in the aggregate is sent (the events of it before it still go).
    /// A full local queue is back-pressure: wait, never drop.
    pub async fn enqueue(
        &self,
        rows: Vec<Outgoing>,
        blocked: &mut HashSet<String>,
        order: &mut AggregatesInFlight,
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
                self.encoder.encode(&row).await.map_err(|error| {
                    encoding_failed.insert(row.aggregate_id.clone());
                    ItemState::Failed { error: error.to_string(), label: error.label(), kind: error.kind() }
                })
            };
            encoded.push((row, seq, arrival, state));
        }
        let mut items = Vec::with_capacity(encoded.len());
        let (mut outstanding, mut waits) = (0, 0);
        let (producer, generation) = self.producer.current();
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
                Ok(encoded) if !order.may_send(&row.aggregate_id, &encoded.topic, generation) => {
                    order.wait(&row.aggregate_id, (id, items.len()));
                    waits += 1;
                    ItemState::Waiting(encoded)
                }
                Ok(encoded) => {
                    let topic = encoded.topic.clone();
                    let state = send(&producer, generation, &row, encoded).await;
                    if matches!(state, ItemState::Failed { .. }) {
                        blocked.insert(row.aggregate_id.clone());
                    } else {
                        order.sent(&row.aggregate_id, &topic, generation);
                        outstanding += 1;
                    }
                    state
                }
            };
            items.push(Item { row, seq, arrival, state });
        }
        let check_at = Instant::now() + self.answer_timeout;
        Enqueued { id, items, outstanding, waiting: waits, answered: Vec::new(), check_at }
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
                ItemState::Sent { topic, producer, answer, span, sent, answered, .. } => {
                    let result = answer.expect("every sent event of a settled batch has its answer");
                    let failed = match result {
                        Answer::Written { partition, offset } => {
                            if row.status.is_some() {
                                out.changes.published.push(Published { id: row.id.clone(), partition, offset });
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
                        Answer::Refused(error) if is_purged(&error) && self.given_up(producer) => Some((
                            format!(
                                "produce to {topic}: no answer from the broker within {} ms; the producer was \
                                 replaced",
                                self.answer_timeout.as_millis()
                            ),
                            "timed_out",
                            FailureKind::Outage,
                        )),
                        Answer::Refused(error) => {
                            self.producer.note(&error);
                            let (kind, label) = produce_failure(&error);
                            Some((format!("produce to {topic}: {error}"), label, kind))
                        }
                        Answer::Canceled => Some((
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
    /// in flight): an aggregate with nothing left unanswered sends its
    /// waiting events (as far as they may go); a failed event holds every
    /// waiting event of its aggregate and blocks it. Past `send_until`
    /// nothing more is sent (a standby may take over soon): the waiting
    /// events are held with the rest of their aggregate, reported in
    /// `Advanced::orphaned` for the retry path once sending may resume.
    pub async fn advance(
        &self,
        batches: &mut [&mut Enqueued],
        order: &mut AggregatesInFlight,
        blocked: &mut HashSet<String>,
        send_until: Instant,
    ) -> Advanced {
        let mut out = Advanced::default();
        let may_send = Instant::now() < send_until;
        let mut producer = None;
        for b in 0..batches.len() {
            for i in std::mem::take(&mut batches[b].answered) {
                let item = &batches[b].items[i];
                let acknowledged = matches!(item.state, ItemState::Sent { answer: Some(Answer::Written { .. }), .. });
                let free = order.answered(&item.row.aggregate_id);
                if acknowledged && !free {
                    continue;
                }
                let aggregate = item.row.aggregate_id.clone();
                if !acknowledged {
                    blocked.insert(aggregate.clone());
                    hold(batches, order.stopped(&aggregate));
                    continue;
                }
                if !may_send {
                    if blocked.insert(aggregate.clone()) {
                        out.orphaned.push(aggregate.clone());
                    }
                    hold(batches, order.stopped(&aggregate));
                    continue;
                }
                let (producer, generation) = producer.get_or_insert_with(|| self.producer.current());
                while let Some(next) = order.next_waiting(&aggregate, *generation, |k| topic_of(batches, k)) {
                    let Some((batch, row, encoded)) = take_waiting(batches, next) else { continue };
                    let topic = encoded.topic.clone();
                    let state = send(producer, *generation, row, encoded).await;
                    let failed = matches!(state, ItemState::Failed { .. });
                    place(batches, batch, next.1, state);
                    if failed {
                        blocked.insert(aggregate.clone());
                        hold(batches, order.stopped(&aggregate));
                        break;
                    }
                    order.sent(&aggregate, &topic, *generation);
                    out.sent += 1;
                }
            }
        }
        out
    }

    /// Give up the producer when a send has waited `answer_timeout` for
    /// the broker's answer: everything it holds fails at once as an outage
    /// (retried, in order), and the next send goes to a new producer.
    /// Returns whether it was given up. `next_check` says when to call it.
    ///
    /// The relay bounds sends this way rather than with librdkafka's
    /// `message.timeout.ms`, which it turns off: a record timed out there
    /// can leave a hole in a partition's series (earlier records failed,
    /// later ones written), which would let a later event of an aggregate
    /// reach Kafka before an earlier one. A purge cuts the series short.
    pub fn give_up_overdue(&self, batches: &mut [&mut Enqueued]) -> bool {
        let now = Instant::now();
        let mut overdue = None;
        for batch in batches.iter_mut().filter(|b| b.check_at <= now) {
            let mut next = now + self.answer_timeout;
            for item in &batch.items {
                if let ItemState::Sent { answer: None, sent, producer, .. } = &item.state {
                    let due = *sent + self.answer_timeout;
                    if due <= now {
                        overdue = Some(*producer);
                    } else {
                        next = next.min(due);
                    }
                }
            }
            batch.check_at = next;
        }
        let Some(generation) = overdue else { return false };
        tracing::warn!(
            timeout_ms = self.answer_timeout.as_millis() as u64,
            "the broker left a record unanswered past the answer timeout; the producer is replaced and what it \
             had in flight is retried"
        );
        self.given_up.lock().expect("given-up lock").insert(generation);
        self.producer.give_up(generation);
        true
    }

    /// Whether producer `generation` was given up for want of answers.
    fn given_up(&self, generation: Generation) -> bool {
        self.given_up.lock().expect("given-up lock").contains(&generation)
    }

    /// Wait for in-flight messages (shutdown).
    pub fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer;
        if let Err(e) = self.producer.in_use().flush(Timeout::After(timeout)) {
            tracing::warn!(error = %e, "producer flush at shutdown");
        }
    }
}

/// Hand one record to `producer` (of generation `generation`); a full
/// local queue is waited out.
async fn send(producer: &FutureProducer, generation: Generation, row: &EventRow, encoded: Encoded) -> ItemState {
    let Encoded { topic, payload, headers, span } = encoded;
    let mut record = FutureRecord::to(&topic).key(row.aggregate_id.as_str()).payload(&payload).headers(headers);
    loop {
        match producer.send_result(record) {
            Ok(delivery) => {
                return ItemState::Sent {
                    topic,
                    producer: generation,
                    delivery,
                    sent: Instant::now(),
                    answer: None,
                    answered: None,
                    span,
                };
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

/// Whether a produce error is librdkafka's purge of its queue or of what
/// was in flight (`ReplaceableProducer::give_up`).
fn is_purged(error: &KafkaError) -> bool {
    matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight))
}

/// When `Publisher::give_up_overdue` should look next: the earliest
/// check of a batch with sends unanswered.
pub fn next_check(batches: &[&mut Enqueued]) -> Option<Instant> {
    batches.iter().filter(|b| b.outstanding > 0).map(|b| b.check_at).min()
}

/// The topic of a waiting event.
fn topic_of(batches: &[&mut Enqueued], (id, i): (u64, usize)) -> Arc<str> {
    match batch_of(batches, id).map(|b| &batches[b].items[i].state) {
        Some(ItemState::Waiting(encoded)) => encoded.topic.clone(),
        _ => unreachable!("a queued event waits in a batch in flight"),
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
