//! `outbox consume`: a consumer group that delivers events to a handler
//! exactly once in effect, in order per aggregate, many at once.
//!
//! Fetched records go into lanes by their ordering key (`ordering`: one
//! per aggregate by default, or per partition, or per record). Each round
//! takes every lane that may go on and handles them at once, up to
//! `--max-in-flight` lanes, each in order: decode (writer schema from the
//! registry, resolved to the newest reader schema) -> skip what the
//! processed-events store has (one query per round) -> run the handler ->
//! record what was applied (one bulk write per round; the projection writes
//! its marks in ONE MongoDB transaction with its updates). A partition's
//! offset is stored only below its oldest record not done (committed in the
//! background; `enable.auto.offset.store=false`), so a crash redelivers and
//! never skips.
//!
//! A record that must be tried again holds only its lane: its aggregate's
//! later records queue behind it until its backoff ends, the other lanes
//! keep flowing. Outages are waited out; a rejected record goes, after
//! `--max-attempts`, to the dead-letter topic `<topic><suffix>` with
//! headers saying why and where from, and its lane moves on (the
//! aggregate's later events are parked behind it). A record the
//! dead-letter topic does not take keeps its lane waiting.

pub mod args;
pub mod decode;
pub mod generations;
pub mod handlers;
pub mod metrics;
pub mod ordering;
pub mod parked;
pub mod rebuild;
pub mod report;
pub mod requests;
pub mod webhook;

use std::{
    collections::HashSet,
    sync::Mutex,
    time::{Duration, Instant},
};

use futures::StreamExt;

use prometheus::{IntGaugeVec, Registry};
use rdkafka::{
    ClientConfig, ClientContext, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    message::{Header, Headers, OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};
use tracing::Instrument;

pub use args::{BeyondHorizon, ConsumeAction, ConsumeArgs, ConsumeCommand, HandlerKind};
use decode::{DecodedEvent, Decoder, RecordMeta};
use generations::{Generation, Generations};
use handlers::{Applied, Handler, HandlerError};
pub use metrics::ConsumerMetrics;
use ordering::{Entry, LaneKey, Lanes, Prior, Progress, Run, Tp, reason};
use parked::ParkedAggregates;
use report::{Counters, MemberReport, MemberReports};

use crate::{
    Error, Result,
    backoff::{BackoffPolicy, Retry},
    db::connect,
    kafka::{headers, lag::read_group_lag, producer_config},
    lifecycle::{self, Stop, stopped},
    processed::ProcessedStore,
    telemetry::{self, traces},
};

/// Everything one record needs: decoder, handler, store, dead-letter producer.
pub struct Pipeline {
    decoder: Decoder,
    handler: Handler,
    store: ProcessedStore,
    /// The projection's generations and the one it writes (other handlers: none).
    projection: Option<(Generations, Generation)>,
    db: mongodb::Database,
    reports: MemberReports,
    parked: ParkedAggregates,
    dlq: FutureProducer,
    dlq_suffix: String,
    group: String,
    backoff: BackoffPolicy,
    retention: Duration,
    beyond_horizon: BeyondHorizon,
    /// Lanes handled at once.
    max_in_flight: usize,
    metrics: ConsumerMetrics,
}

/// Why an attempt at a record failed, and what that means for it.
struct Failure {
    message: String,
    /// Transient (the reason, a metric label): retried without limit.
    transient: Option<&'static str>,
    /// Cannot be read at all: dead-lettered at once.
    poison: bool,
    /// The wait the other side asked for, when longer than the backoff.
    retry_after: Option<Duration>,
}

impl Failure {
    fn poison(message: String) -> Self {
        Self { message, transient: None, poison: true, retry_after: None }
    }
}

/// A handler that failed could read the event: transient or rejected.
impl From<HandlerError> for Failure {
    fn from(e: HandlerError) -> Self {
        Self { message: e.message, transient: e.transient, poison: false, retry_after: e.retry_after }
    }
}

/// How one record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    DeadLettered,
    /// Sent to the dead-letter topic behind an earlier dead-lettered event
    /// of its aggregate (not applied out of order).
    Parked,
    /// Shutdown came during its retries (redrive): not done, offset not stored.
    Interrupted,
}

impl Outcome {
    /// Its name in spans.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLettered => "dead-lettered",
            Outcome::Parked => "parked",
            Outcome::Interrupted => "interrupted",
        }
    }
}

impl From<Applied> for Outcome {
    fn from(applied: Applied) -> Self {
        match applied {
            Applied::Applied => Outcome::Applied,
            Applied::Duplicate => Outcome::Duplicate,
        }
    }
}

/// What one try at a record in a batch came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// It reached its end: its offset may be stored.
    Done(Outcome),
    /// It must be tried again: its lane waits.
    Retry(ordering::Retry),
    /// Not tried: an earlier record of its lane waits.
    Skipped,
}

impl Step {
    /// What the lanes' bookkeeping needs of it.
    fn progress(&self) -> Progress {
        match self {
            Step::Done(_) => Progress::Done,
            Step::Retry(r) => Progress::Retry(r.clone()),
            Step::Skipped => Progress::Skipped,
        }
    }
}

/// A record taken from the topics (detached from the consumer: it may
/// wait in its lane across fetches).
pub type Record = OwnedMessage;

/// A record decoded ahead of its try (`None`: decoded when tried).
type Decoded = Option<std::result::Result<DecodedEvent, Failure>>;

/// The events of a run to send in a batch, by their index in the run.
type ToSend = Vec<(usize, DecodedEvent)>;

/// A run handled: how each record came out, and the processed marks to
/// write for those applied.
type Handled = (Run<Record>, Vec<Step>, Vec<mongodb::bson::Document>);

impl Pipeline {
    pub async fn new(args: &ConsumeArgs, metrics: ConsumerMetrics) -> Result<Self> {
        let backoff = args.backoff()?;
        let client = connect(&args.mongodb_uri).await?;
        let db = client.database(&args.database);
        let projection = match args.handler {
            HandlerKind::Projection => {
                let generations = Generations::new(&db);
                let current = generations.ensure(&args.group_id).await?;
                Some((generations, current))
            }
            _ => None,
        };
        let scope = projection.as_ref().map_or(args.group_id.as_str(), |(_, g)| g.scope.as_str());
        let store = ProcessedStore::new(&db, scope);
        store.ensure_indexes(Duration::from_secs(args.processed_retention_seconds)).await?;
        let reports = MemberReports::new(&db);
        reports.ensure_indexes().await?;
        let parked = ParkedAggregates::new(&db, &args.group_id);
        parked.ensure_indexes().await?;
        let handler = match args.handler {
            HandlerKind::Projection => {
                let collection = projection.as_ref().map(|(_, g)| g.collection.as_str()).unwrap_or_default();
                Handler::projection(client.clone(), &db, collection)
            }
            HandlerKind::Webhook => {
                let settings = args.webhook_settings().map_err(Error::Config)?;
                let webhook = webhook::Webhook::new(settings).map_err(Error::Config)?;
                Handler::Webhook(webhook.with_metrics(metrics.webhook.clone()))
            }
            HandlerKind::Log => Handler::Log,
        };
        let timeout = [("message.timeout.ms".to_owned(), DEAD_LETTER_TIMEOUT.as_millis().to_string())];
        let dlq = producer_config(&args.kafka_bootstrap, &timeout)
            .map_err(Error::Config)?
            .create()
            .map_err(|source| Error::Kafka { context: "creating the dead-letter producer".into(), source })?;
        Ok(Self {
            decoder: Decoder::new(&args.schema_registry_url, args.readers()?),
            handler,
            store,
            projection,
            db,
            reports,
            parked,
            dlq,
            dlq_suffix: args.dead_letter_suffix.clone(),
            group: args.group_id.clone(),
            backoff,
            retention: Duration::from_secs(args.processed_retention_seconds),
            beyond_horizon: args.beyond_dedup_horizon,
            max_in_flight: args.max_in_flight as usize,
            metrics,
        })
    }

    pub fn store(&self) -> &ProcessedStore {
        &self.store
    }

    /// The projection's generation this pipeline writes.
    pub fn generation(&self) -> Option<i32> {
        self.projection.as_ref().map(|(_, g)| g.number)
    }

    /// Follow the read model to its current generation (a rebuild switched
    /// it): write its collection, deduplicate with its processed marks.
    /// Whether it moved.
    pub async fn follow_generation(&mut self) -> mongodb::error::Result<bool> {
        let Some((generations, mine)) = &self.projection else { return Ok(false) };
        let Some(state) = generations.state().await? else { return Ok(false) };
        if state.current == *mine {
            return Ok(false);
        }
        tracing::info!(from = mine.number, to = state.current.number, collection = %state.current.collection,
            "the read model was rebuilt: following its new generation");
        let Handler::Projection { client, .. } = &self.handler else { return Ok(false) };
        self.handler = Handler::projection(client.clone(), &self.db, &state.current.collection);
        self.store = ProcessedStore::new(&self.db, &state.current.scope);
        self.projection = Some((generations.clone(), state.current));
        Ok(true)
    }

    /// Decode a record. The registry being unreachable is transient; a
    /// record that cannot be read (no value, not Confluent framing, no
    /// reader schema) is poison.
    async fn decode(&self, m: &Record) -> std::result::Result<DecodedEvent, Failure> {
        let bytes = m.payload().ok_or_else(|| Failure::poison("record without a value".to_owned()))?;
        self.decoder.decode(bytes, &RecordMeta::of(m)).await.map_err(|e| Failure {
            message: e.message,
            transient: e.retryable.then_some(reason::REGISTRY),
            poison: !e.retryable,
            retry_after: None,
        })
    }

    /// Apply an event decoded earlier (`decoded`), or decode it now.
    async fn attempt(&self, m: &Record, decoded: Decoded) -> std::result::Result<Applied, Failure> {
        let event = match decoded {
            Some(d) => d?,
            None => self.decode(m).await?,
        };
        let start = std::time::Instant::now();
        self.metrics.in_flight.inc();
        let applied = self.handler.apply(&event, &self.store).await;
        self.metrics.in_flight.dec();
        let applied = applied.map_err(Failure::from)?;
        self.metrics.handler_seconds.observe(start.elapsed().as_secs_f64());
        Ok(applied)
    }

    /// Count how the records of a round ended.
    fn count(&self, steps: &[Step]) {
        for step in steps {
            match step {
                Step::Done(Outcome::Applied) => self.metrics.processed.inc(),
                Step::Done(Outcome::Duplicate) => self.metrics.duplicates.inc(),
                _ => {}
            }
        }
    }

    /// Handle the runs of ready lanes (see `ordering`), each in order, up
    /// to `--max-in-flight` lanes at once, and say how each record came out.
    ///
    /// - The projection applies the whole round in one MongoDB transaction
    ///   when every record decodes and none is a retry or parked
    ///   (`Handler::apply_batch`); otherwise, or when that fails, lane by
    ///   lane, each event in its own transaction.
    /// - The other handlers (an effect outside MongoDB) check the
    ///   processed-events store with one query for the round, skip what it
    ///   has, and record what they applied with one bulk write after the
    ///   deliveries.
    ///
    /// Once a record of a lane must be tried again, the lane's later
    /// records are `Skipped` (they come again behind it); the other lanes go on.
    pub async fn handle(&self, runs: Vec<Run<Record>>) -> Vec<(Run<Record>, Vec<Step>)> {
        let records = runs.iter().map(|r| r.entries.len()).sum::<usize>();
        self.metrics.batch_size.observe(records as f64);
        let aggregates: Vec<&str> =
            runs.iter().flat_map(|r| &r.entries).filter_map(|e| aggregate_of(&e.item)).collect();
        let parked = match self.parked.parked_among(&aggregates).await {
            Ok(p) => p,
            Err(e) => return self.all_wait(runs, format!("reading the parked aggregates: {e}")),
        };
        self.handle_parked(runs, parked).await
    }

    /// `handle`, the aggregates of `parked` parked.
    async fn handle_parked(&self, runs: Vec<Run<Record>>, parked: HashSet<String>) -> Vec<(Run<Record>, Vec<Step>)> {
        let runs = if self.handler.is_transactional() {
            match self.apply_together(runs, &parked).await {
                Ok(done) => return done,
                Err(runs) => runs.into_iter().map(|r| (r, Vec::new())).collect(),
            }
        } else {
            let mut decoded = Vec::with_capacity(runs.len());
            for run in runs {
                let mut events = Vec::with_capacity(run.entries.len());
                for e in &run.entries {
                    events.push(Some(self.decode(&e.item).await));
                }
                decoded.push((run, events));
            }
            decoded
        };
        // The events already processed (for the handlers that do not record it themselves).
        let ids: Vec<&str> =
            runs.iter().flat_map(|(_, d)| d).flatten().flatten().map(|e| e.event_id.as_str()).collect();
        let known = if ids.is_empty() {
            HashSet::new()
        } else {
            match self.store.processed_among(&ids).await {
                Ok(known) => known,
                Err(e) => {
                    let runs = runs.into_iter().map(|(r, _)| r).collect();
                    return self.all_wait(runs, format!("reading the processed events: {e}"));
                }
            }
        };
        let claimed = Mutex::new(known);
        let mut done = match &self.handler {
            Handler::Webhook(webhook) if webhook.batch_max().is_some() => {
                self.deliver_batches(webhook, runs, &parked, &claimed).await
            }
            _ => self.run_lanes(runs, &parked, &claimed).await,
        };
        let marks: Vec<_> = done.iter_mut().flat_map(|(_, _, marks)| std::mem::take(marks)).collect();
        if let Err(e) = self.store.insert_marks(marks).await {
            // Applied but not recorded: tried again (a receiver sees the same event id again).
            for (run, steps, _) in &mut done {
                for (entry, step) in run.entries.iter().zip(steps.iter_mut()) {
                    if *step == Step::Done(Outcome::Applied) {
                        *step = self.mongodb_wait(
                            &entry.item,
                            Prior::default(),
                            format!("recording as processed: {e}"),
                            None,
                        );
                    }
                }
            }
        }
        let done: Vec<_> = done.into_iter().map(|(run, steps, _)| (run, steps)).collect();
        for (_, steps) in &done {
            self.count(steps);
        }
        done
    }

    /// Every run's lane, up to `--max-in-flight` at once.
    async fn run_lanes(
        &self,
        runs: Vec<(Run<Record>, Vec<Decoded>)>,
        parked: &HashSet<String>,
        claimed: &Mutex<HashSet<String>>,
    ) -> Vec<Handled> {
        futures::stream::iter(runs)
            .map(|(run, decoded)| self.run_lane(run, decoded, parked, claimed))
            .buffer_unordered(self.max_in_flight)
            .collect()
            .await
    }

    /// Batch mode: the runs that need nothing but a delivery go many to a
    /// request (whole runs, in order, up to the batch size; a longer run
    /// sends its first ones and the rest come next round), up to
    /// `--max-in-flight` requests at once. A request's answer is each of its
    /// events': on a failure, the first event of each of its runs is tried
    /// again (or dead-lettered once its attempts are spent) as if sent
    /// alone, and the rest of its run waits behind it. Runs that need more
    /// (a record to retry from the dead-letter path, one that does not
    /// decode, a parked aggregate, one beyond the dedup horizon) go lane by
    /// lane, in batches of one.
    async fn deliver_batches(
        &self,
        webhook: &webhook::Webhook,
        runs: Vec<(Run<Record>, Vec<Decoded>)>,
        parked: &HashSet<String>,
        claimed: &Mutex<HashSet<String>>,
    ) -> Vec<Handled> {
        let max = webhook.batch_max().unwrap_or(1);
        let plain = |(run, decoded): &(Run<Record>, Vec<Decoded>)| {
            run.prior.dead_letter.is_none()
                && decoded.iter().all(|d| matches!(d, Some(Ok(_))))
                && run.entries.iter().all(|e| {
                    aggregate_of(&e.item).is_none_or(|a| !parked.contains(a)) && self.beyond_horizon(&e.item).is_none()
                })
        };
        let (plain, alone): (Vec<_>, Vec<_>) = runs.into_iter().partition(plain);
        let mut done = self.run_lanes(alone, parked, claimed).await;
        // Per run: its steps (Skipped until decided) and the events to send, by index in the run.
        let mut pending: Vec<(Run<Record>, Vec<Step>, ToSend)> = Vec::with_capacity(plain.len());
        for (run, decoded) in plain {
            let mut steps = vec![Step::Skipped; run.entries.len()];
            let mut events = Vec::new();
            for (i, d) in decoded.into_iter().enumerate() {
                let Some(Ok(e)) = d else { continue };
                if !claimed.lock().expect("claimed ids").insert(e.event_id.clone()) {
                    steps[i] = Step::Done(Outcome::Duplicate);
                } else if events.len() < max {
                    events.push((i, e));
                }
            }
            pending.push((run, steps, events));
        }
        // Whole runs to a request, up to `max` events.
        let mut requests: Vec<Vec<usize>> = Vec::new();
        let mut size = 0;
        for (r, (_, _, events)) in pending.iter().enumerate() {
            if events.is_empty() {
                continue;
            }
            if requests.is_empty() || size + events.len() > max {
                requests.push(Vec::new());
                size = 0;
            }
            requests.last_mut().expect("a request").push(r);
            size += events.len();
        }
        let answers: Vec<(Vec<usize>, std::result::Result<(), HandlerError>)> = futures::stream::iter(requests)
            .map(|request| {
                let events: Vec<&DecodedEvent> =
                    request.iter().flat_map(|r| pending[*r].2.iter().map(|(_, e)| e)).collect();
                async move {
                    let start = Instant::now();
                    self.metrics.in_flight.inc();
                    let answer = webhook.deliver_batch(&events).await;
                    self.metrics.in_flight.dec();
                    self.metrics.handler_seconds.observe(start.elapsed().as_secs_f64());
                    (request, answer)
                }
            })
            .buffer_unordered(self.max_in_flight)
            .collect()
            .await;
        let mut marks: Vec<Vec<mongodb::bson::Document>> = vec![Vec::new(); pending.len()];
        for (request, answer) in answers {
            for r in request {
                let (run, steps, events) = &mut pending[r];
                match &answer {
                    Ok(()) => {
                        for (i, e) in events.iter() {
                            steps[*i] = Step::Done(Outcome::Applied);
                            marks[r].push(self.store.mark_document(&e.event_id, &e.event_name));
                        }
                    }
                    Err(e) => {
                        let (first, _) = events[0];
                        let attempts = if first == 0 { run.prior.attempts } else { 0 } + 1;
                        let failure = Failure::from(e.clone());
                        steps[first] = self.after_failure(&run.entries[first].item, attempts, failure).await;
                    }
                }
            }
        }
        done.extend(pending.into_iter().zip(marks).map(|((run, steps, _), marks)| (run, steps, marks)));
        done
    }

    /// The projection's round in one transaction: `Err` gives the runs back
    /// when it cannot be (a record does not decode, is a retry, is parked or
    /// beyond the dedup horizon) or the transaction fails.
    async fn apply_together(
        &self,
        runs: Vec<Run<Record>>,
        parked: &HashSet<String>,
    ) -> std::result::Result<Vec<(Run<Record>, Vec<Step>)>, Vec<Run<Record>>> {
        let records: Vec<&Record> = runs.iter().flat_map(|r| r.entries.iter().map(|e| &e.item)).collect();
        // Records older than the dedup window take the lane path, which decides on them.
        if records.len() < 2
            || !parked.is_empty()
            || runs.iter().any(|r| r.prior != Prior::default())
            || records.iter().any(|m| self.beyond_horizon(m).is_some())
        {
            return Err(runs);
        }
        let mut events = Vec::with_capacity(records.len());
        for m in &records {
            match self.decode(m).await {
                Ok(e) => events.push(e),
                Err(_) => return Err(runs),
            }
        }
        // One handle span per record (while exporting), each lasting the batch's apply.
        let spans: Vec<_> = records.iter().filter_map(|m| self.handle_span(m)).collect();
        let start = std::time::Instant::now();
        match self.handler.apply_batch(&events, &self.store).await {
            Ok(applied) => {
                self.metrics.handler_seconds.observe(start.elapsed().as_secs_f64());
                for (span, a) in spans.iter().zip(&applied) {
                    span.record("outbox.outcome", Outcome::from(*a).label());
                }
                let mut applied = applied.into_iter();
                let done: Vec<(Run<Record>, Vec<Step>)> = runs
                    .into_iter()
                    .map(|run| {
                        let steps: Vec<Step> =
                            run.entries.iter().filter_map(|_| applied.next()).map(|a| Step::Done(a.into())).collect();
                        (run, steps)
                    })
                    .collect();
                for (_, steps) in &done {
                    self.count(steps);
                }
                Ok(done)
            }
            Err(e) => {
                for span in &spans {
                    traces::record_error(span, "the batch failed; handled record by record");
                }
                tracing::warn!(error = %e, records = records.len(), "the batch failed; handling its records lane by lane");
                Err(runs)
            }
        }
    }

    /// One lane's records, in order, until one must be tried again. For
    /// the handlers that do not record it themselves: an event in
    /// `claimed` (processed, or taken by another lane of this round) is a
    /// duplicate, and the marks of those applied are returned to be written.
    async fn run_lane(
        &self,
        run: Run<Record>,
        decoded: Vec<Decoded>,
        parked: &HashSet<String>,
        claimed: &Mutex<HashSet<String>>,
    ) -> Handled {
        let mut steps = Vec::with_capacity(run.entries.len());
        let mut marks = Vec::new();
        let mut prior = run.prior.clone();
        // Aggregates that went to the dead-letter topic in this lane: their later events are parked behind.
        let mut parked_here: Vec<String> = Vec::new();
        let mut decoded = decoded.into_iter();
        for entry in &run.entries {
            let m = &entry.item;
            if matches!(steps.last(), Some(Step::Retry(_) | Step::Skipped)) {
                steps.push(Step::Skipped);
                continue;
            }
            let event = decoded.next().flatten();
            let mark = match &event {
                Some(Ok(e)) if prior.dead_letter.is_none() => {
                    if !claimed.lock().expect("claimed ids").insert(e.event_id.clone()) {
                        steps.push(Step::Done(Outcome::Duplicate));
                        prior = Prior::default();
                        continue;
                    }
                    Some(self.store.mark_document(&e.event_id, &e.event_name))
                }
                _ => None,
            };
            let aggregate = aggregate_of(m);
            let is_parked = aggregate.is_some_and(|a| parked.contains(a) || parked_here.iter().any(|p| p == a));
            let step = self.try_once(m, std::mem::take(&mut prior), is_parked, event).await;
            match &step {
                Step::Done(Outcome::Applied) => marks.extend(mark),
                Step::Done(Outcome::DeadLettered | Outcome::Parked) => parked_here.extend(aggregate.map(str::to_owned)),
                _ => {}
            }
            steps.push(step);
        }
        (run, steps, marks)
    }

    /// The age of a record older than the dedup window, if it is.
    fn beyond_horizon(&self, m: &Record) -> Option<Duration> {
        beyond_horizon(m.timestamp().to_millis(), now_millis(), self.retention)
    }

    /// MongoDB did not answer for the whole round: the first record of each
    /// lane waits (transient), the rest are left for later.
    fn all_wait(&self, runs: Vec<Run<Record>>, error: String) -> Vec<(Run<Record>, Vec<Step>)> {
        runs.into_iter()
            .map(|run| {
                let mut prior = run.prior.clone();
                let dead_letter = prior.dead_letter.take();
                let first = self.mongodb_wait(&run.entries[0].item, prior, error.clone(), dead_letter);
                let steps = std::iter::once(first).chain((1..run.entries.len()).map(|_| Step::Skipped)).collect();
                (run, steps)
            })
            .collect()
    }

    /// One try at a record, after the `prior` ones. Ends it (applied,
    /// duplicate, dead-lettered) or says when to try again and why:
    /// - a transient failure (registry, MongoDB or webhook unreachable, a
    ///   timeout, 5xx, 408, 429) is tried again without limit, the backoff
    ///   capped at its maximum, and never dead-lettered: the record waits
    ///   for the outage to end;
    /// - a rejection (a webhook's other 4xx, a write MongoDB refuses) is
    ///   tried up to `--max-attempts`, then dead-lettered;
    /// - a record that cannot be read is dead-lettered at once;
    /// - a record due for the dead-letter topic that the topic did not take
    ///   is tried there again (it is never skipped);
    /// - a record whose aggregate is parked (`parked`, as read for its
    ///   batch, confirmed atomically here) goes to the dead-letter topic
    ///   behind the aggregate's earlier events, unapplied.
    async fn try_once(&self, m: &Record, prior: Prior, parked: bool, decoded: Decoded) -> Step {
        let Some(span) = self.handle_span(m) else { return self.try_once_untraced(m, prior, parked, decoded).await };
        let step = self.try_once_untraced(m, prior, parked, decoded).instrument(span.clone()).await;
        match &step {
            Step::Done(outcome) => {
                span.record("outbox.outcome", outcome.label());
            }
            Step::Retry(r) => traces::record_error(&span, &r.error),
            Step::Skipped => {}
        }
        step
    }

    /// The span handling `m`, a child of the span that published it (its
    /// `traceparent` header), while exporting traces.
    fn handle_span(&self, m: &Record) -> Option<tracing::Span> {
        if !traces::exporting() {
            return None;
        }
        let span = tracing::info_span!("handle", otel.name = %format!("process {}", m.topic()), otel.kind = "consumer",
            messaging.system = "kafka", messaging.operation.type = "process", messaging.destination.name = m.topic(),
            messaging.destination.partition.id = m.partition(), messaging.kafka.offset = m.offset(),
            messaging.message.id = headers::text(m, headers::EVENT_ID), messaging.consumer.group.name = %self.group,
            outbox.outcome = tracing::field::Empty, trace_id = tracing::field::Empty,
            otel.status_code = tracing::field::Empty, otel.status_description = tracing::field::Empty);
        traces::continue_from(&span, headers::text(m, headers::TRACEPARENT));
        Some(span)
    }

    async fn try_once_untraced(&self, m: &Record, prior: Prior, parked: bool, decoded: Decoded) -> Step {
        if let Some(error) = prior.dead_letter {
            return self.dead_letter(m, error, prior.attempts).await;
        }
        if let Some(age) = self.beyond_horizon(m) {
            match self.beyond_horizon {
                BeyondHorizon::Apply => self.metrics.beyond_horizon.inc(),
                BeyondHorizon::Wait => {
                    let error = format!(
                        "the record is {}s old, older than the processed-events retention ({}s): it may have been \
                         applied and forgotten; raise --processed-retention-seconds, move the group's offsets past \
                         it, or set --beyond-dedup-horizon apply",
                        age.as_secs(),
                        self.retention.as_secs()
                    );
                    tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), %error,
                        "the record waits");
                    return Step::Retry(ordering::Retry {
                        offset: m.offset(),
                        attempts: prior.attempts,
                        reason: reason::BEYOND_DEDUP_HORIZON,
                        error,
                        backoff: self.backoff.max,
                        dead_letter: None,
                    });
                }
            }
        }
        if parked && let (Some(aggregate), Some(event_id)) = (aggregate_of(m), headers::text(m, headers::EVENT_ID)) {
            match self.parked.park_if_parked(aggregate, event_id).await {
                Ok(true) => {
                    let why = format!("{PARKED}behind an earlier dead-lettered event of aggregate {aggregate}");
                    return self.dead_letter(m, why, prior.attempts).await;
                }
                Ok(false) => {} // released since the batch was read
                Err(e) => return self.mongodb_wait(m, prior, format!("parking the record: {e}"), None),
            }
        }
        let attempts = prior.attempts + 1;
        match self.attempt(m, decoded).await {
            Ok(applied) => Step::Done(applied.into()),
            Err(failure) => self.after_failure(m, attempts, failure).await,
        }
    }

    /// The `attempts`th try at a record failed: when to try again, or to
    /// the dead-letter topic.
    async fn after_failure(&self, m: &Record, attempts: u32, failure: Failure) -> Step {
        self.metrics.failures.inc();
        let retry = match (failure.transient, failure.poison) {
            (Some(_), _) => self.backoff.without_attempt_limit().after_failure(attempts, 0.0),
            (None, true) => Retry::GiveUp,
            (None, false) => self.backoff.after_failure(attempts, 0.0),
        };
        match retry {
            Retry::After(backoff) => {
                let backoff = backoff.max(failure.retry_after.unwrap_or_default());
                let reason = failure.transient.unwrap_or(reason::REJECTED);
                tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), attempts,
                    error = %failure.message, reason, backoff_ms = backoff.as_millis() as u64,
                    "handling failed; its lane waits to try again");
                Step::Retry(ordering::Retry {
                    offset: m.offset(),
                    attempts,
                    reason,
                    error: failure.message,
                    backoff,
                    dead_letter: None,
                })
            }
            Retry::GiveUp => self.dead_letter(m, failure.message, attempts).await,
        }
    }

    /// Try a record until it ends (redrive: one record at a time, so its
    /// waits hold nothing else), starting after `prior`. `Interrupted` if
    /// shutdown comes first.
    pub async fn process(&self, m: Record, prior: Prior, stop: &Stop) -> Outcome {
        let tp = tp_of(&m);
        let mut run = Run {
            lane: LaneKey::Record(tp.clone(), m.offset()),
            prior,
            entries: vec![Entry { tp, offset: m.offset(), item: m }],
        };
        loop {
            // A redriven event is what releases its parked aggregate: it is not parked itself.
            let Some((back, mut steps)) = self.handle_parked(vec![run], HashSet::new()).await.pop() else {
                return Outcome::Interrupted;
            };
            run = back;
            match steps.pop() {
                Some(Step::Done(outcome)) => return outcome,
                Some(Step::Retry(r)) => {
                    if lifecycle::sleep_or_stop(&mut stop.clone(), r.backoff).await {
                        return Outcome::Interrupted;
                    }
                    run.prior = Prior { attempts: r.attempts, dead_letter: r.dead_letter };
                }
                Some(Step::Skipped) | None => unreachable!("a record alone is tried"),
            }
        }
    }

    /// A MongoDB failure on the way: the record waits (transient).
    fn mongodb_wait(&self, m: &Record, prior: Prior, error: String, dead_letter: Option<String>) -> Step {
        self.metrics.failures.inc();
        let attempts = prior.attempts + 1;
        // Without an attempt limit and without jitter: the base delay, capped.
        let backoff = self.backoff.base_delay(attempts);
        tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), %error, "the record waits");
        Step::Retry(ordering::Retry {
            offset: m.offset(),
            attempts,
            reason: reason::MONGODB,
            error,
            backoff,
            dead_letter,
        })
    }

    /// Send the record to its dead-letter topic, once, bounded by the
    /// dead-letter producer's `message.timeout.ms`. When the topic does not
    /// take it (missing, not writable, the record too large with the
    /// headers added, the broker away), the record is not skipped: its
    /// lane waits (`dead_letter`) and it is sent again after the
    /// maximum backoff.
    async fn dead_letter(&self, m: &Record, error: String, attempts: u32) -> Step {
        // Park the aggregate first (idempotent): its later events must not overtake this one.
        if let (Some(aggregate), Some(event_id)) = (aggregate_of(m), headers::text(m, headers::EVENT_ID))
            && let Err(e) = self.parked.park(aggregate, event_id, &error).await
        {
            let prior = Prior { attempts, dead_letter: None };
            return self.mongodb_wait(m, prior, format!("parking its aggregate: {e}"), Some(error));
        }
        let topic = format!("{}{}", m.topic(), self.dlq_suffix);
        let (partition, offset, attempts_s) = (m.partition().to_string(), m.offset().to_string(), attempts.to_string());
        let mut headers = OwnedHeaders::new();
        if let Some(h) = m.headers() {
            for h in h.iter() {
                headers = headers.insert(Header { key: h.key, value: h.value });
            }
        }
        for (key, value) in [
            (headers::dead_letter::ERROR, error.as_str()),
            (headers::dead_letter::ORIGINAL_TOPIC, m.topic()),
            (headers::dead_letter::ORIGINAL_PARTITION, partition.as_str()),
            (headers::dead_letter::ORIGINAL_OFFSET, offset.as_str()),
            (headers::dead_letter::ATTEMPTS, attempts_s.as_str()),
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
        match self.dlq.send(record, Timeout::After(DEAD_LETTER_TIMEOUT)).await {
            Ok(_) if error.starts_with(PARKED) => {
                self.metrics.parked.inc();
                tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), dead_letter_topic = %topic,
                    error, "record parked");
                Step::Done(Outcome::Parked)
            }
            Ok(_) => {
                self.metrics.dead_lettered.inc();
                tracing::error!(topic = m.topic(), partition = m.partition(), offset = m.offset(), dead_letter_topic = %topic,
                    attempts, error, "record dead-lettered");
                Step::Done(Outcome::DeadLettered)
            }
            Err((e, _)) => {
                let backoff = self.backoff.max;
                tracing::error!(topic = m.topic(), partition = m.partition(), offset = m.offset(), dead_letter_topic = %topic,
                    error = %e, backoff_ms = backoff.as_millis() as u64,
                    "the dead-letter topic did not take the record; its lane waits");
                Step::Retry(ordering::Retry {
                    offset: m.offset(),
                    attempts,
                    reason: reason::DEAD_LETTER,
                    error: format!("dead-letter topic {topic}: {e}"),
                    backoff,
                    dead_letter: Some(error),
                })
            }
        }
    }
}

/// Allowance for clock skew between the producer of a record and this
/// consumer when telling its age.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The age of a record whose timestamp (`ts_ms`) is older than the
/// processed-events `retention`, less the clock-skew allowance: its
/// processed mark, written after it was produced, may have expired.
/// `None` for a younger record or one without a timestamp.
pub fn beyond_horizon(ts_ms: Option<i64>, now_ms: i64, retention: Duration) -> Option<Duration> {
    let age = Duration::from_millis(u64::try_from(now_ms - ts_ms?).ok()?);
    (age + CLOCK_SKEW > retention).then_some(age)
}

fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// How long one dead-letter produce may take (its `message.timeout.ms`).
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(10);

/// The start of `dlq.error` of a parked record.
const PARKED: &str = "parked: ";

/// The aggregate of a record: its key.
fn aggregate_of(m: &Record) -> Option<&str> {
    m.key().and_then(|k| std::str::from_utf8(k).ok())
}

/// The topic partition of a record.
fn tp_of(m: &Record) -> Tp {
    (m.topic().to_owned(), m.partition())
}

/// The consumer's librdkafka context: collects the partitions revoked
/// (served inside `recv`), which the loop then forgets.
#[derive(Default)]
pub struct GroupContext {
    revoked: Mutex<Vec<Tp>>,
}

impl GroupContext {
    /// The partitions revoked since the last call.
    fn take_revoked(&self) -> Vec<Tp> {
        std::mem::take(&mut *self.revoked.lock().expect("revoked partitions"))
    }

    fn has_revoked(&self) -> bool {
        !self.revoked.lock().expect("revoked partitions").is_empty()
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        tracing::info!(?rebalance, "rebalance");
        if let Rebalance::Revoke(list) = rebalance {
            let tps = list.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect::<Vec<_>>();
            self.revoked.lock().expect("revoked partitions").extend(tps);
        }
    }
}

type GroupConsumer = StreamConsumer<GroupContext>;

fn consumer(args: &ConsumeArgs, group: &str) -> Result<GroupConsumer> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &args.kafka_bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", args.session_timeout_ms.to_string());
    crate::kafka::with_auth(&mut c);
    for (k, v) in &args.consumer_config {
        if k == "enable.auto.offset.store" && v != "false" {
            return Err(Error::Config(
                "enable.auto.offset.store must stay false: offsets are stored after the handler".into(),
            ));
        }
        c.set(k, v);
    }
    c.create_with_context(GroupContext::default())
        .map_err(|source| Error::Kafka { context: "creating the consumer".into(), source })
}

pub async fn main(cmd: ConsumeCommand) -> Result<()> {
    let stop_rx = lifecycle::stop_on_signal();
    match cmd.action {
        Some(ConsumeAction::Redrive { dead_letter_topic, request, args }) => {
            let log = match &request {
                Some(id) => {
                    let db = connect(&args.mongodb_uri).await?.database(&args.database);
                    Some(requests::RequestLog::open(&db, id, &args.group_id).await?)
                }
                None => None,
            };
            let counts = redrive(&args, &dead_letter_topic, stop_rx, log.as_ref()).await;
            if let Some(log) = &log {
                let (state, error) = match &counts {
                    Ok(_) => (requests::RequestState::Completed, None),
                    Err(e) => (requests::RequestState::Failed, Some(e.to_string())),
                };
                let saved = counts.as_ref().cloned().unwrap_or_default();
                log.save(&saved, state, error).await?;
            }
            let counts = counts?;
            println!(
                "redrive of {}: {} record(s), {} applied, {} duplicate(s), {} dead-lettered again",
                dead_letter_topic.join(", "),
                counts.records,
                counts.applied,
                counts.duplicates,
                counts.dead_lettered
            );
            Ok(())
        }
        Some(ConsumeAction::Rebuild { args }) => {
            let s = rebuild::rebuild(&args, stop_rx).await?;
            println!(
                "rebuild of {}: generation {} ({}) {}, {} event(s) applied, {} duplicate(s) skipped; generation {} \
                 ({}) is kept for comparison: drop it when done",
                generations::READ_MODEL,
                s.generation.number,
                s.generation.collection,
                s.phase.as_str(),
                s.applied,
                s.duplicates,
                s.previous.number,
                s.previous.collection,
            );
            Ok(())
        }
        None => run_until(cmd.run, stop_rx).await,
    }
}

/// Run the consumer until `stop` turns true (tests drive this directly).
pub async fn run_until(args: ConsumeArgs, mut stop: Stop) -> Result<()> {
    let registry = Registry::new();
    let metrics = ConsumerMetrics::register(&registry)?;
    let mut pipeline = Pipeline::new(&args, metrics.clone()).await?;
    let consumer = consumer(&args, &args.group_id)?;
    let topics: Vec<&str> = args.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| Error::Kafka { context: format!("subscribing to {topics:?}"), source })?;

    lifecycle::serve_admin(args.metrics_listen, registry, telemetry::always_ready()).await?;
    tokio::spawn(report_lag(args.clone(), metrics.lag.clone(), stop.clone()));
    tracing::info!(group = %args.group_id, topics = ?args.topics, handler = pipeline.handler.name(), "consumer started");

    let (max, linger) = (args.batch_size as usize, Duration::from_millis(args.linger_ms));
    let mut lanes: Lanes<Record> = Lanes::new(args.ordering, args.buffer_per_partition());
    // A record fetched just after a revocation: taken in the next round, once the revoked partitions are forgotten.
    let mut carried: Option<Record> = None;
    let mut shown = WaitingShown::default();
    let member = args.member();
    let (report_tx, report_rx) = tokio::sync::watch::channel(None);
    let reporter = tokio::spawn(write_reports(
        pipeline.reports.clone(),
        pipeline.parked.clone(),
        pipeline.metrics.parked_aggregates.clone(),
        report_rx,
    ));
    let mut reported: Option<(Instant, Vec<(Tp, &'static str)>)> = None;
    while !stopped(&stop) {
        resume(&consumer, lanes.to_resume());
        // Wake for a waiting lane that is due, or for the next report.
        let report_due = reported.as_ref().map(|(at, _)| *at + report::REPORT_EVERY);
        let wake = lanes.next_due().into_iter().chain(report_due).min();
        let Some(batch) = next_batch(&consumer, max, linger, wake, &mut stop, &mut carried).await else { break };
        for m in batch {
            let (tp, offset) = (tp_of(&m), m.offset());
            let key = aggregate_of(&m).map(str::to_owned);
            lanes.accept(tp, offset, key.as_deref(), m);
        }
        // Revoked partitions (their records of this batch included) come
        // again from the committed offset, to whichever member owns them.
        let revoked = consumer.context().take_revoked();
        if !revoked.is_empty() {
            lanes.revoke(&revoked);
            // A partition paused before and assigned again starts afresh: not paused.
            if let Ok(assigned) = consumer.assignment() {
                let tps: Vec<Tp> = assigned.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
                resume(&consumer, tps.into_iter().filter(|tp| !lanes.is_paused(tp)).collect());
            }
        }
        for (tp, next) in lanes.to_pause() {
            tracing::info!(topic = %tp.0, partition = tp.1, "the partition holds too many records not done; paused");
            pause_at(&consumer, &tp, next);
        }
        let runs = lanes.take_ready(Instant::now());
        if !runs.is_empty() {
            let now = Instant::now();
            for (run, steps) in pipeline.handle(runs).await {
                let results = run.entries.into_iter().zip(steps.iter().map(Step::progress)).collect();
                if let Some(w) = lanes.finish(run.lane, results, now) {
                    tracing::info!(
                        offset = w.offset,
                        aggregate = w.aggregate,
                        reason = w.reason,
                        attempts = w.attempts,
                        "the waiting record is done; its lane flows again"
                    );
                }
            }
            for ((topic, partition), offset) in lanes.committable() {
                if let Err(e) = consumer.store_offset(&topic, partition, offset) {
                    tracing::debug!(error = %e, topic, partition, "storing offset (a partition no longer ours)");
                }
            }
        }
        pipeline.metrics.buffered.set(lanes.open() as i64);
        shown.update(&pipeline.metrics, &lanes);
        // The report for status: every REPORT_EVERY, and at once when a partition starts or stops waiting.
        let waits: Vec<(Tp, &'static str)> = lanes.waiting().into_iter().map(|(tp, w)| (tp, w.reason)).collect();
        if reported.as_ref().is_none_or(|(at, w)| at.elapsed() >= report::REPORT_EVERY || *w != waits) {
            if let Err(e) = pipeline.follow_generation().await {
                tracing::warn!(error = %e, "reading the read model's generation");
            }
            let m = &pipeline.metrics;
            let counters = Counters {
                processed: m.processed.get() as i64,
                duplicates: m.duplicates.get() as i64,
                failures: m.failures.get() as i64,
                dead_lettered: m.dead_lettered.get() as i64,
            };
            let _ = report_tx.send(Some(MemberReport::new(
                &args.group_id,
                &member,
                counters,
                &lanes,
                pipeline.generation(),
            )));
            reported = Some((Instant::now(), waits));
        }
    }
    tracing::info!("consumer stopping: committing stored offsets");
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final commit (nothing new to commit is fine)");
    }
    drop(report_tx);
    let _ = reporter.await;
    if let Err(e) = pipeline.reports.remove(&args.group_id, &member).await {
        tracing::warn!(error = %e, "removing this member's report");
    }
    Ok(())
}

/// Write the newest report whenever there is a new one, in order, until
/// the loop drops its sender; count the group's parked aggregates for the
/// gauge at each.
async fn write_reports(
    reports: MemberReports,
    parked: ParkedAggregates,
    parked_gauge: prometheus::IntGauge,
    mut rx: tokio::sync::watch::Receiver<Option<MemberReport>>,
) {
    while rx.changed().await.is_ok() {
        let report = rx.borrow_and_update().clone();
        if let Some(r) = report
            && let Err(e) = reports.write(&r).await
        {
            tracing::warn!(error = %e, "writing this member's report for status");
        }
        match parked.count().await {
            Ok(n) => parked_gauge.set(n as i64),
            Err(e) => tracing::debug!(error = %e, "counting parked aggregates"),
        }
    }
}

/// Pause a partition and rewind it to `offset`: librdkafka drops what it
/// had fetched past it and, once resumed, fetches from there.
fn pause_at(consumer: &GroupConsumer, tp: &Tp, offset: i64) {
    let mut list = TopicPartitionList::new();
    list.add_partition(&tp.0, tp.1);
    if let Err(e) = consumer.pause(&list) {
        tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "pausing the partition");
    }
    if let Err(e) = consumer.seek(&tp.0, tp.1, Offset::Offset(offset), Duration::from_secs(5)) {
        tracing::warn!(topic = %tp.0, partition = tp.1, offset, error = %e, "rewinding the partition");
    }
}

fn resume(consumer: &GroupConsumer, tps: Vec<Tp>) {
    if tps.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for (topic, partition) in &tps {
        list.add_partition(topic, *partition);
    }
    // A partition no longer assigned cannot be resumed, and needs not be.
    if let Err(e) = consumer.resume(&list) {
        tracing::debug!(error = %e, ?tps, "resuming partitions");
    }
}

/// The labels of `outbox_consumer_waiting` currently shown, so that a
/// partition that flows again loses its series.
#[derive(Default)]
struct WaitingShown(Vec<[String; 3]>);

impl WaitingShown {
    fn update(&mut self, metrics: &ConsumerMetrics, lanes: &Lanes<Record>) {
        let now: Vec<[String; 3]> =
            lanes.waiting().into_iter().map(|((t, p), w)| [t, p.to_string(), w.reason.to_owned()]).collect();
        for old in &self.0 {
            if !now.contains(old) {
                let _ = metrics.waiting.remove_label_values(&[&old[0], &old[1], &old[2]]);
            }
        }
        for l in &now {
            metrics.waiting.with_label_values(&[&l[0], &l[1], &l[2]]).set(1);
        }
        metrics.backoff.set(lanes.max_backoff().as_secs_f64());
        self.0 = now;
    }
}

/// The next batch: waits for a first record (`None` at stop; an empty
/// batch at `wake`, when a waiting lane is due), then takes what has
/// arrived, waiting up to `linger` more for a fuller batch, up to `max`
/// records. A batch ends before a record fetched after a revocation: that
/// one is `carried` into the next batch, so the caller can forget the
/// revoked partitions in between.
async fn next_batch(
    consumer: &GroupConsumer,
    max: usize,
    linger: Duration,
    wake: Option<Instant>,
    stop: &mut Stop,
    carried: &mut Option<Record>,
) -> Option<Vec<Record>> {
    let mut batch: Vec<Record> = carried.take().into_iter().collect();
    // Whether a revocation came during this `recv`, and its record is to be carried.
    let take = |m: rdkafka::message::BorrowedMessage<'_>, batch: &mut Vec<Record>, carried: &mut Option<Record>| {
        if consumer.context().has_revoked() {
            *carried = Some(m.detach());
            false
        } else {
            batch.push(m.detach());
            true
        }
    };
    let wake = async {
        match wake {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(wake);
    while batch.is_empty() {
        let received = tokio::select! {
            m = consumer.recv() => m,
            _ = stop.changed() => return None,
            _ = &mut wake => return Some(batch),
        };
        match received {
            Ok(m) => {
                if !take(m, &mut batch, carried) {
                    return Some(batch);
                }
            }
            Err(e) => tracing::warn!(error = %e, "consume error"),
        }
    }
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        // A zero wait polls once: what librdkafka has already fetched.
        match tokio::time::timeout_at(deadline.max(tokio::time::Instant::now()), consumer.recv()).await {
            Ok(Ok(m)) => {
                if !take(m, &mut batch, carried) {
                    break;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "consume error");
                break;
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

async fn report_lag(args: ConsumeArgs, gauge: IntGaugeVec, mut stop: Stop) {
    while !stopped(&stop) {
        match read_group_lag(&args.kafka_bootstrap, &[], &args.group_id, &args.topics, Duration::from_secs(10)).await {
            Ok(lag) => {
                for p in lag.partitions {
                    gauge.with_label_values(&[p.topic.as_str(), &p.partition.to_string()]).set(p.lag);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading group lag"),
        }
        lifecycle::sleep_or_stop(&mut stop, Duration::from_secs(args.lag_interval_seconds.max(1))).await;
    }
}

/// Counts of a redrive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveCounts {
    pub records: u64,
    pub applied: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
}

/// Replay `dead_letter_topics` from where the group `<group>.redrive` left
/// them into the handler, until they have been idle for 3 s; with `log`,
/// the counts are saved there every second (the request's record).
pub async fn redrive(
    args: &ConsumeArgs,
    dead_letter_topics: &[String],
    stop: Stop,
    log: Option<&requests::RequestLog>,
) -> Result<RedriveCounts> {
    let metrics = ConsumerMetrics::register(&Registry::new())?;
    let mut pipeline = Pipeline::new(args, metrics).await?;
    // Records that fail again go to `<dlq>.redrive` rather than back into the topic being replayed.
    pipeline.dlq_suffix = ".redrive".into();
    let consumer = consumer(args, &format!("{}.redrive", args.group_id))?;
    let topics: Vec<&str> = dead_letter_topics.iter().map(String::as_str).collect();
    let named = dead_letter_topics.join(", ");
    consumer
        .subscribe(&topics)
        .map_err(|source| Error::Kafka { context: format!("subscribing to {named}"), source })?;
    let mut saved_at = std::time::Instant::now();
    let mut counts = RedriveCounts::default();
    let idle = Duration::from_secs(3);
    let mut waited_for_first = false;
    // Aggregates whose event failed again in this redrive: their later
    // events follow it to `<dlq>.redrive`, unapplied, to keep their order.
    let mut failed_again: HashSet<String> = HashSet::new();
    loop {
        // The first record may wait for the group join.
        let wait = if waited_for_first { idle } else { Duration::from_secs(30) };
        let Ok(next) = tokio::time::timeout(wait, consumer.recv()).await else { break };
        waited_for_first = true;
        let m = next.map_err(|source| Error::Kafka { context: format!("consuming {named}"), source })?;
        let record = m.detach();
        counts.records += 1;
        let aggregate = aggregate_of(&record).map(str::to_owned);
        let event_id = headers::text(&record, headers::EVENT_ID).map(str::to_owned);
        let prior = match &aggregate {
            Some(a) if failed_again.contains(a) => Prior {
                attempts: 0,
                dead_letter: Some(format!("{PARKED}behind an event of aggregate {a} that failed again in a redrive")),
            },
            _ => Prior::default(),
        };
        let outcome = pipeline.process(record, prior, &stop).await;
        match outcome {
            Outcome::Applied => counts.applied += 1,
            Outcome::Duplicate => counts.duplicates += 1,
            Outcome::DeadLettered | Outcome::Parked => {
                counts.dead_lettered += 1;
                failed_again.extend(aggregate.clone());
            }
            Outcome::Interrupted => break,
        }
        if matches!(outcome, Outcome::Applied | Outcome::Duplicate)
            && let (Some(a), Some(id)) = (&aggregate, &event_id)
        {
            // Released from the parked list, retried until MongoDB takes it:
            // a listed event that is no longer in any dead-letter topic would park its aggregate for good.
            while let Err(e) = pipeline.parked.applied(a, id).await {
                tracing::warn!(error = %e, aggregate = %a, "releasing a parked event; retrying");
                if lifecycle::sleep_or_stop(&mut stop.clone(), Duration::from_secs(1)).await {
                    return Err(Error::Interrupted(format!(
                        "stopped before releasing event {id} of parked aggregate {a}"
                    )));
                }
            }
        }
        let _ = consumer.store_offset_from_message(&m);
        if let Some(log) = log
            && saved_at.elapsed() >= Duration::from_secs(1)
        {
            saved_at = std::time::Instant::now();
            if let Err(e) = log.save(&counts, requests::RequestState::Running, None).await {
                tracing::warn!(error = %e, "saving the redrive's progress");
            }
        }
    }
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_older_than_the_retention_less_the_skew_allowance_is_beyond_the_horizon() {
        let hour = Duration::from_secs(3600);
        let now = 10_000_000_000;
        assert_eq!(beyond_horizon(Some(now - 1000), now, hour), None);
        assert_eq!(beyond_horizon(Some(now - 3_539_000), now, hour), None, "59 min: inside");
        assert_eq!(beyond_horizon(Some(now - 3_541_000), now, hour), Some(Duration::from_secs(3541)));
        assert_eq!(beyond_horizon(Some(now + 5000), now, hour), None, "from the future: young");
        assert_eq!(beyond_horizon(None, now, hour), None, "no timestamp: cannot tell");
    }
}
