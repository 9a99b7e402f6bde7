//! The consumer's pipeline: what happens to the records of a round, lane
//! by lane, up to `--max-in-flight` lanes at once: decode, skip what was
//! processed, run the handler, record what was applied, and decide on
//! each failure (`failure`): wait, try again, or dead-letter.
//!
//! - `one_record`: one try at one record (the dedup horizon, a parked
//!   aggregate, the handler) and what a failure leads to: a wait, another
//!   try, or the dead-letter topic;
//! - `one_transaction`: the projection's whole round in one MongoDB
//!   transaction;
//! - `webhook_batches`: the webhook's batch mode, many events to a request.

mod horizon;
mod one_record;
mod one_transaction;
mod webhook_batches;

use std::{collections::HashSet, sync::Mutex, time::Duration};

use futures::StreamExt;
use rdkafka::{Message, message::OwnedMessage};

pub use horizon::beyond_horizon;

use super::{
    BeyondHorizon, ConsumeArgs, ConsumerMetrics, HandlerKind,
    dead_letter::DeadLetterTopics,
    decode::{DecodedEvent, Decoder, RecordMeta},
    failure::Failure,
    generations::{Generation, Generations},
    handlers::{Applied, Handler},
    ordering::{self, Entry, LaneKey, Prior, Progress, Run, Tp},
    parked::ParkedAggregates,
    report::MemberReports,
    webhook,
};
use crate::{
    Error, Result,
    backoff::BackoffPolicy,
    db::connect,
    lifecycle::{self, Stop},
    processed::ProcessedStore,
};

pub struct Pipeline {
    decoder: Decoder,
    pub(super) handler: Handler,
    store: ProcessedStore,
    /// The projection's generations and the one it writes (other handlers: none).
    projection: Option<(Generations, Generation)>,
    db: mongodb::Database,
    pub(super) reports: MemberReports,
    pub(super) parked: ParkedAggregates,
    pub(super) dead_letters: DeadLetterTopics,
    group: String,
    backoff: BackoffPolicy,
    retention: Duration,
    beyond_horizon: BeyondHorizon,
    /// Lanes handled at once.
    max_in_flight: usize,
    pub(super) metrics: ConsumerMetrics,
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
    pub(super) fn progress(&self) -> Progress {
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
        let dead_letters = DeadLetterTopics::new(&args.kafka_bootstrap, &args.dead_letter_suffix, &args.group_id)?;
        Ok(Self {
            decoder: Decoder::new(&args.schema_registry_url, args.readers()?),
            handler,
            store,
            projection,
            db,
            reports,
            parked,
            dead_letters,
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
        let bytes = m.payload().ok_or_else(|| Failure::Poison { message: "record without a value".to_owned() })?;
        self.decoder.decode(bytes, &RecordMeta::of(m)).await.map_err(Failure::from)
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
}

/// The aggregate of a record: its key.
pub(super) fn aggregate_of(m: &Record) -> Option<&str> {
    m.key().and_then(|k| std::str::from_utf8(k).ok())
}

/// The topic partition of a record.
pub(super) fn tp_of(m: &Record) -> Tp {
    (m.topic().to_owned(), m.partition())
}
