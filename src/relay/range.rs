//! Publishing one bucket range of the outbox (the whole outbox when it is
//! not sharded), from taking its lease to giving it up:
//! 1. hold the range's lease (`keep_lease` renews it in the background and
//!    publishes how long it is valid on this process's monotonic clock);
//! 2. claim the range's checkpoint (bump the fencing epoch that every later
//!    write carries);
//! 3. read the range's inserts from the change stream after the checkpoint
//!    (`stream`), publish them in batches (`publisher`: enqueue, then act
//!    on the broker's answers as they arrive, settle each batch once its
//!    events are all decided, several batches in flight), and save the
//!    checkpoint after acknowledged batches: no row is written for an
//!    event published at its first attempt;
//! 4. set aside per row only what went wrong: failed events (retried with
//!    backoff, dead after maxAttempts) and the later events of their
//!    aggregate (held), published in order by the retry path;
//! 5. when the stream cannot resume (first start, history lost), rescan the
//!    range's unconfirmed rows, publish them again, say so, and go on from
//!    the stream.
//!
//! It stops sending before its lease can run out (every record is
//! acknowledged or failed within a third of the lease), and steps down when
//! its epoch is stale. Told to stop (SIGTERM, or the range handed to
//! another relay), it settles the batches in flight, saves the checkpoint,
//! flushes the producer and releases the checkpoint and the lease: the next
//! owner starts where it ended.
//!
//! One file of about 730 lines on purpose: these steps share the range's
//! state and one loop, and reading them top to bottom is how the lease,
//! the fence and at-least-once are checked.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use mongodb::{
    bson::{DateTime, Document, Timestamp},
    change_stream::event::ResumeToken,
};
use tokio::{sync::watch, time::Instant};

use super::{
    RelayArgs, Shared,
    metrics::RangeMetrics,
    publisher::{AggregatesInFlight, Enqueued, Outgoing, Publisher, next_answers, next_check},
    readiness::{RangeReadiness, RangeState},
    stream::{OutboxStream, StreamError, StreamEvent, StreamStart},
};
use crate::{
    Error, Result,
    kafka::topics::EventTopicMapper,
    lease::Lease,
    lifecycle::{self, Stop, stopped},
    outbox::{
        EventRow, Outbox, OutboxStatus,
        bucket::BucketRange,
        checkpoint::{CheckpointError, Checkpoints, Fence, Progress, RecoveryReason},
        relay_queries::{Failure, FailureKind, RowChanges, first_id_of_millisecond},
    },
};

/// The pipeline holds up to this many full batches' worth of events
/// (`--batch-size` each) before the oldest batch is settled. It counts
/// events, not batches: a batch holds what the stream had when it was
/// taken, often a fraction of a full one while the relay keeps up.
const IN_FLIGHT_BATCHES: usize = 4;

/// The checkpoint is saved at most this often while events flow: the
/// acknowledged batches in between are folded into one write (a crash
/// republishes at most this much, never loses it).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Publish `range` until `stop` turns true: claim it whenever this relay
/// holds its lease, step down when the lease or the claim is lost, and at
/// the end hand it over cleanly.
pub async fn publish(shared: Arc<Shared>, range: BucketRange, lease: Arc<Lease>, mut stop: Stop) -> Result<()> {
    let args = &shared.args;
    let outbox = shared.outbox.in_range(range);
    let checkpoints = outbox.checkpoints();
    let metrics = shared.metrics.range(&range.label());
    let (lease_ttl, send_window) = (shared.lease_ttl, shared.send_window);
    // Background tasks end with this call, even when it is dropped mid-way
    // (a test aborting a relay): nothing renews a lease for a dead relay.
    let stats = AbortOnDrop(tokio::spawn(refresh_stats(outbox.clone(), metrics.clone(), stop.clone())));
    let publisher = Publisher::new(
        shared.producer_config.clone(),
        EventTopicMapper::new(args.routes.clone()),
        shared.schemas.clone(),
        args.value_layout,
        shared.backoff,
        shared.answer_timeout,
    )
    .map_err(|source| Error::Kafka { context: "creating the producer".into(), source })?;
    let (lease_tx, mut lease_rx) = watch::channel(None);
    let mut keeper = AbortOnDrop(tokio::spawn(keep_lease(lease.clone(), lease_tx, stop.clone(), metrics.clone())));
    let _cleanup = AbortOnDrop(tokio::spawn(clean_history(
        outbox.clone(),
        checkpoints.clone(),
        lease_rx.clone(),
        Duration::from_secs(args.retention_seconds),
        metrics.clone(),
        stop.clone(),
    )));
    let relay_id = &shared.relay_id;
    tracing::info!(relay_id = %relay_id, range = %range.label(), lease = %lease.identity(), "publishing a range when its lease is ours");
    let readiness = RangeReadiness::new(shared.readiness.clone(), range.index);

    let mut last_fence = None;
    while !stopped(&stop) {
        if room(&lease_rx) <= send_window {
            readiness.set(RangeState::Starting("waiting for the range's lease"));
            tokio::select! {
                _ = lease_rx.changed() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let fence = match checkpoints.claim(relay_id, &lease.identity(), lease_ttl * 3).await {
            Ok(f) => f,
            Err(e @ CheckpointError::OtherLease { .. }) => {
                tracing::error!(error = %e, range = %range.label(), "not publishing");
                readiness.set(RangeState::Failing(e.to_string()));
                lifecycle::sleep_or_stop(&mut stop, lease_ttl).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, range = %range.label(), "claiming the range's checkpoint");
                lifecycle::sleep_or_stop(&mut stop, Duration::from_secs(1)).await;
                continue;
            }
        };
        tracing::info!(relay_id = %relay_id, range = %range.label(), epoch = fence.epoch, "claimed the range; publishing from the change stream");
        metrics.epoch.set(fence.epoch);
        last_fence = Some(fence.clone());
        let mut active = Active {
            args,
            outbox: &outbox,
            checkpoints: &checkpoints,
            publisher: &publisher,
            metrics: &metrics,
            fence,
            blocked: HashSet::new(),
            lease: lease_rx.clone(),
            in_flight: VecDeque::new(),
            order: AggregatesInFlight::default(),
            position: 0,
            send_window,
            last_retry_check: Instant::now(),
            last_save: Instant::now(),
            unsaved: None,
            orphans: HashSet::new(),
        };
        match active.run(&mut stop, &readiness).await {
            Ok(()) => {}
            Err(e @ (Error::Fenced(_) | Error::LeaseLost(_))) => {
                metrics.fenced.inc();
                tracing::warn!(error = %e, range = %range.label(), "stepping down: another relay may be publishing the range now");
            }
            Err(e) => {
                readiness.set(RangeState::Failing(e.to_string()));
                metrics.loop_errors.inc();
                tracing::warn!(error = %e, range = %range.label(), "relay failed; resuming from the checkpoint");
                lifecycle::sleep_or_stop(&mut stop, Duration::from_secs(1)).await;
            }
        }
        metrics.epoch.set(0);
    }
    tracing::info!(range = %range.label(), "giving the range up: flushing the producer, releasing the checkpoint and the lease");
    publisher.flush(Duration::from_secs(10));
    let _ = (&mut keeper.0).await;
    stats.0.abort();
    metrics.forget();
    if let Some(fence) = last_fence
        && room(&lease_rx) > Duration::ZERO
    {
        if let Err(e) = checkpoints.release(&fence).await {
            tracing::warn!(error = %e, "releasing the range's checkpoint");
        }
        if let Err(e) = lease.release().await {
            tracing::warn!(error = %e, "releasing the range's lease");
        }
    }
    Ok(())
}

/// A task that ends when its handle is dropped.
pub(super) struct AbortOnDrop<T>(pub(super) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long this relay may still act on its lease (zero: not held).
fn room(lease: &watch::Receiver<Option<Instant>>) -> Duration {
    lease.borrow().map_or(Duration::ZERO, |until| until.saturating_duration_since(Instant::now()))
}

/// Take and renew the lease every third of its life until `stop`. A won
/// lease is valid from the moment its request was *sent*, for its
/// duration, on this process's monotonic clock; a failed renewal leaves
/// the last deadline to run out.
async fn keep_lease(lease: Arc<Lease>, tx: watch::Sender<Option<Instant>>, mut stop: Stop, metrics: RangeMetrics) {
    let ttl = lease.ttl();
    let mut held = false;
    while !stopped(&stop) {
        let sent = Instant::now();
        match tokio::time::timeout(ttl / 3, lease.acquire()).await {
            Ok(Ok(won)) => {
                if won != held {
                    tracing::info!(holding = won, "outbox lease changed hands");
                }
                held = won;
                tx.send_replace(won.then_some(sent + ttl));
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing the outbox lease; the current one runs out unrenewed"),
            Err(_) => tracing::warn!("renewing the outbox lease timed out; the current one runs out unrenewed"),
        }
        metrics.leader.set(i64::from(held && room(&tx.subscribe()) > Duration::ZERO));
        let pause = if held { ttl / 3 } else { (ttl / 3).min(Duration::from_secs(1)) };
        lifecycle::sleep_or_stop(&mut stop, pause).await;
    }
}

/// A stored document the relay cannot read as an outbox row goes dead at
/// once, in its place (a retry would read the same bytes); when its
/// aggregate is readable, that aggregate's later events wait behind it.
fn unreadable_goes_dead(row: crate::outbox::Unreadable, position: i64, blocked: &mut HashSet<String>) -> Failure {
    tracing::error!(event_id = %row.id, error = %row.reason, "an outbox row the relay cannot read goes dead");
    if let Some(aggregate) = row.aggregate_id {
        blocked.insert(aggregate);
    }
    Failure {
        id: *row.id,
        attempts: 0,
        outage_retries: 0,
        kind: FailureKind::Permanent,
        label: "malformed",
        error: row.reason,
        retry_at: None,
        backoff_ms: 0,
        hold_seq: position,
    }
}

/// A batch handed to the producer, with what its checkpoint will say.
struct InFlight {
    batch: Enqueued,
    /// The stream position after the batch (`None`: a recovery scan batch).
    token: Option<ResumeToken>,
    last_event: Option<(String, DateTime)>,
    /// Rows that are not readable outbox rows: they go dead at once.
    malformed: Vec<Failure>,
}

/// The batches in flight, oldest first, as the publisher takes them.
fn batches(in_flight: &mut VecDeque<InFlight>) -> Vec<&mut Enqueued> {
    in_flight.iter_mut().map(|f| &mut f.batch).collect()
}

/// One claim on the outbox: from the claim until stop, lease loss or fence.
struct Active<'a> {
    args: &'a RelayArgs,
    outbox: &'a Outbox,
    checkpoints: &'a Checkpoints,
    publisher: &'a Publisher,
    metrics: &'a RangeMetrics,
    fence: Fence,
    /// Aggregates with a set-aside event: their later events are held.
    blocked: HashSet<String>,
    /// The lease's deadline (nothing is sent within `send_window` of it).
    lease: watch::Receiver<Option<Instant>>,
    in_flight: VecDeque<InFlight>,
    /// The aggregates with events in flight, and the events waiting for
    /// them (`ordering`).
    order: AggregatesInFlight,
    /// Commit-order positions handed out in this claim (see `next_position`).
    position: i64,
    send_window: Duration,
    last_retry_check: Instant,
    /// When the checkpoint was last saved.
    last_save: Instant,
    /// Acknowledged stream progress not yet in the checkpoint (saved at
    /// most every `CHECKPOINT_EVERY`, and before anything else is written).
    unsaved: Option<Progress>,
    /// Aggregates to retry at the first round whatever their head's due
    /// time says: backlogs headed by a held row (found at the claim, or
    /// held when the send window closed).
    orphans: HashSet<String>,
}

impl Active<'_> {
    /// The next commit-order position: the epoch in the high bits, so
    /// positions of a later claim always sort after an earlier claim's.
    fn next_position(&mut self) -> i64 {
        self.position += 1;
        (self.fence.epoch << 40) | (self.position & ((1 << 40) - 1))
    }

    fn batch_size(&self) -> usize {
        self.args.batch_size as usize
    }

    /// Whether the pipeline holds as many events as it may
    /// (`IN_FLIGHT_BATCHES`).
    fn pipeline_full(&self) -> bool {
        let events: usize = self.in_flight.iter().map(|f| f.batch.items.len()).sum();
        events >= IN_FLIGHT_BATCHES * self.batch_size()
    }

    async fn run(&mut self, stop: &mut Stop, readiness: &RangeReadiness) -> Result<()> {
        readiness.set(RangeState::Starting("claimed; opening its change stream"));
        let heads = self.outbox.backlog_heads().await?;
        self.orphans = heads.iter().filter(|(_, held)| *held).map(|(a, _)| a.clone()).collect();
        self.blocked = heads.into_iter().map(|(a, _)| a).collect();
        let checkpoint = self.checkpoints.load().await?.unwrap_or_default();
        let coll = self.outbox.collection().clone_with_type::<Document>();
        let start = match (checkpoint.token.clone(), checkpoint.start_at) {
            (Some(token), _) => Some(StreamStart::After(token)),
            (None, Some(at)) => Some(StreamStart::At(at)),
            (None, None) => None,
        };
        let mut stream = match start {
            None => self.recover(RecoveryReason::FirstStart, readiness).await?,
            Some(start) => match OutboxStream::open(coll, start, self.batch_size(), self.outbox.range()).await {
                Ok(s) => s,
                Err(StreamError::HistoryLost(why)) => {
                    tracing::warn!(reason = %why, "the checkpoint's position is gone from the oplog");
                    self.recover(RecoveryReason::HistoryLost, readiness).await?
                }
                Err(StreamError::Mongo(e)) => return Err(e.into()),
            },
        };
        readiness.set(RangeState::Following);
        let linger = Duration::from_millis(self.args.linger_ms);
        let retry_every = Duration::from_millis(self.args.poll_interval_ms);
        loop {
            if stopped(stop) {
                return self.drain().await;
            }
            if room(&self.lease) <= self.send_window {
                // No new sends; what is in flight finishes inside the window.
                self.drain().await?;
                return Err(Error::LeaseLost("range"));
            }
            if self.last_retry_check.elapsed() >= retry_every {
                self.last_retry_check = Instant::now();
                // Only an aggregate set aside can be due: with none, nothing
                // to ask MongoDB and no reason to empty the pipeline.
                if !self.blocked.is_empty() || !self.orphans.is_empty() {
                    self.drain().await?;
                    self.retry_due().await?;
                }
            }
            self.advance().await;
            if self.settle_decided().await? {
                readiness.set(RangeState::Following);
            }
            if self.in_flight.is_empty() && self.unsaved.is_some() && self.last_save.elapsed() >= CHECKPOINT_EVERY {
                self.save_progress().await?;
            }
            if self.pipeline_full() {
                self.next_answers().await;
                continue;
            }
            if !self.in_flight.is_empty() {
                // Read what the stream brings while the broker answers,
                // instead of after it.
                tokio::select! {
                    () = self.next_answers() => {}
                    () = stream.ready() => {}
                }
            }
            let wait = match (self.in_flight.is_empty(), self.unsaved.is_some()) {
                (false, _) => Duration::ZERO,
                (true, false) => Duration::from_millis(250),
                (true, true) => CHECKPOINT_EVERY.saturating_sub(self.last_save.elapsed()),
            };
            let batch = match stream.next_batch(self.batch_size(), wait, linger).await {
                Ok(b) => b,
                Err(StreamError::HistoryLost(why)) => {
                    tracing::warn!(reason = %why, "the change stream fell out of the oplog");
                    self.drain().await?;
                    stream = self.recover(RecoveryReason::HistoryLost, readiness).await?;
                    readiness.set(RangeState::Following);
                    continue;
                }
                Err(StreamError::Mongo(e)) => return Err(e.into()),
            };
            if !batch.events.is_empty() {
                self.send(batch.events).await;
                continue;
            }
            if let Some(token) = batch.idle_token
                && self.in_flight.is_empty()
                && self.unsaved.is_none()
                && self.last_save.elapsed() >= Duration::from_secs(10)
            {
                // Keep the checkpoint inside the oplog while nothing happens.
                let progress = Progress { token, last_event: None, published: 0 };
                self.checkpoints.save(&self.fence, &progress).await?;
                self.last_save = Instant::now();
            }
        }
    }

    /// Hand a batch of stream events to the producer.
    async fn send(&mut self, events: Vec<StreamEvent>) {
        let token = events.last().map(|e| e.token.clone());
        let mut rows = Vec::with_capacity(events.len());
        let mut malformed = Vec::new();
        for StreamEvent { row, arrival, .. } in events {
            let seq = self.next_position();
            match row {
                Ok(row) => rows.push(Outgoing { row, seq, arrival: Some(arrival) }),
                Err(unreadable) => malformed.push(unreadable_goes_dead(unreadable, seq, &mut self.blocked)),
            }
        }
        self.metrics.batch_size.observe((rows.len() + malformed.len()) as f64);
        let last_event = rows.last().map(|o| (o.row.id.clone(), o.row.occurred_on));
        self.enqueue(rows, token, last_event, malformed).await;
    }

    /// Hand rows to the producer behind the batches in flight, after
    /// acting on the answers already in (an aggregate with a failure there
    /// is blocked before its next event could be sent).
    async fn enqueue(
        &mut self,
        rows: Vec<Outgoing>,
        token: Option<ResumeToken>,
        last_event: Option<(String, DateTime)>,
        malformed: Vec<Failure>,
    ) {
        self.advance().await;
        let batch = self.publisher.enqueue(rows, &mut self.blocked, &mut self.order).await;
        self.in_flight.push_back(InFlight { batch, token, last_event, malformed });
    }

    /// Wait until the broker answers an event in flight, giving the
    /// producer up if a send waits past the answer timeout (its events
    /// then fail at once and are retried).
    async fn next_answers(&mut self) {
        let mut batches = batches(&mut self.in_flight);
        let Some(check_at) = next_check(&batches) else { return next_answers(&mut batches).await };
        tokio::select! {
            () = next_answers(&mut batches) => {}
            () = tokio::time::sleep_until(check_at) => {
                self.publisher.give_up_overdue(&mut batches);
            }
        }
    }

    /// Act on the broker's answers: send the waiting events whose
    /// aggregate has nothing left in flight, hold those behind a failure
    /// (nothing is sent once the send window is closing).
    async fn advance(&mut self) {
        let send_until = Instant::now() + room(&self.lease).saturating_sub(self.send_window);
        let mut batches = batches(&mut self.in_flight);
        let advanced = self.publisher.advance(&mut batches, &mut self.order, &mut self.blocked, send_until).await;
        self.metrics.sent_after_wait.inc_by(advanced.sent as u64);
        self.orphans.extend(advanced.orphaned);
    }

    /// Settle the oldest batches whose events are all decided, in order.
    /// Returns whether any was settled.
    async fn settle_decided(&mut self) -> Result<bool> {
        let mut any = false;
        while self.in_flight.front().is_some_and(|f| f.batch.decided()) {
            self.settle_oldest().await?;
            any = true;
        }
        Ok(any)
    }

    /// Wait for the broker's next answers, advance, and settle what is
    /// decided: one step of emptying the pipeline.
    async fn step(&mut self) -> Result<()> {
        self.next_answers().await;
        self.advance().await;
        self.settle_decided().await?;
        Ok(())
    }

    /// Write the oldest batch's exceptions and fold it into the checkpoint
    /// (saved when due). The batch is decided.
    async fn settle_oldest(&mut self) -> Result<()> {
        let Some(f) = self.in_flight.pop_front() else { return Ok(()) };
        let now = DateTime::now();
        let mut settled = self.publisher.settle(f.batch, &mut self.blocked, now);
        settled.changes.failed.extend(f.malformed);
        self.outbox.set_aside(self.checkpoints, &self.fence, &settled.changes, now).await?;
        let published = settled.published_clean + settled.changes.published.len();
        if let Some(token) = f.token {
            let progress =
                self.unsaved.get_or_insert_with(|| Progress { token: token.clone(), last_event: None, published: 0 });
            progress.token = token;
            if f.last_event.is_some() {
                progress.last_event = f.last_event;
            }
            progress.published += published as i64;
            if self.last_save.elapsed() >= CHECKPOINT_EVERY {
                self.save_progress().await?;
            }
        } else if published > 0 {
            self.checkpoints.count_published(&self.fence, published as i64).await?;
        }
        self.metrics.observe_stages(&settled.stages, Instant::now());
        self.metrics.published.inc_by(published as u64);
        self.metrics.held_back.inc_by(settled.changes.held.len() as u64);
        for latency in &settled.latencies {
            self.metrics.commit_to_ack.observe(*latency);
        }
        for f in &settled.changes.failed {
            self.metrics.failure(f.label);
            if f.retry_at.is_none() {
                self.metrics.dead_lettered.inc();
                tracing::error!(event_id = %f.id, attempts = f.attempts, kind = f.kind.as_str(), reason = f.label,
                    error = %f.error, "event is dead: a permanent failure, or its attempts are spent");
            } else {
                tracing::warn!(event_id = %f.id, attempts = f.attempts, outage_retries = f.outage_retries,
                    backoff_ms = f.backoff_ms, kind = f.kind.as_str(), reason = f.label, error = %f.error,
                    "publish failed; will retry");
            }
        }
        Ok(())
    }

    /// Write the acknowledged progress to the checkpoint (fenced).
    async fn save_progress(&mut self) -> Result<()> {
        if let Some(progress) = self.unsaved.take() {
            self.checkpoints.save(&self.fence, &progress).await?;
            self.metrics.checkpoints.inc();
            self.last_save = Instant::now();
        }
        Ok(())
    }

    /// Settle everything in flight and save the checkpoint.
    async fn drain(&mut self) -> Result<()> {
        self.advance().await;
        self.settle_decided().await?;
        while !self.in_flight.is_empty() {
            self.step().await?;
        }
        self.save_progress().await
    }

    /// Publish the backlogs of aggregates whose first failure is due: the
    /// failed event, then its held successors, in `holdSeq` order, until the
    /// backlog is empty (the aggregate flows from the stream again) or an
    /// event fails again. Every due aggregate's backlog goes out in one
    /// batch, each backlog's events one behind the other on the producer.
    /// Runs with nothing in flight.
    async fn retry_due(&mut self) -> Result<()> {
        let limit = i64::from(self.args.batch_size);
        let now = DateTime::now();
        let mut aggregates = std::mem::take(&mut self.orphans);
        aggregates.extend(self.outbox.due_aggregates(now, limit).await?);
        let mut first_round = true;
        while !aggregates.is_empty() {
            let mut rows = Vec::new();
            let mut discards = Vec::new();
            let mut retrying = Vec::new();
            for aggregate in aggregates {
                let backlog = self.outbox.backlog(&aggregate, limit).await?;
                let ready: Vec<EventRow> =
                    backlog.iter().take_while(|r| r.status != Some(OutboxStatus::Dead)).cloned().collect();
                if ready.is_empty() {
                    if backlog.is_empty() {
                        self.blocked.remove(&aggregate);
                    }
                    continue;
                }
                // A held head has nothing ahead of it any more.
                let head_due = ready[0].status == Some(OutboxStatus::Held)
                    || ready[0].next_attempt_at.is_none_or(|at| at <= DateTime::now());
                if first_round && !head_due {
                    continue;
                }
                for r in ready {
                    if r.discard_requested() {
                        // Given up, not published: its successors keep their order.
                        discards.push(r.id.clone());
                        continue;
                    }
                    let seq = r.hold_seq.unwrap_or_else(|| self.next_position());
                    rows.push(Outgoing { row: r, seq, arrival: None });
                }
                self.blocked.remove(&aggregate);
                retrying.push(aggregate);
            }
            first_round = false;
            if rows.is_empty() && discards.is_empty() {
                break;
            }
            if !discards.is_empty() {
                tracing::info!(events = ?discards, "discarding events as requested");
                let changes = RowChanges { discarded: discards, ..RowChanges::default() };
                self.outbox.set_aside(self.checkpoints, &self.fence, &changes, now).await?;
            }
            if !rows.is_empty() {
                self.enqueue(rows, None, None, Vec::new()).await;
                self.drain().await?;
            }
            // Published so far: held until its backlog is read empty; an
            // aggregate that failed again waits for its next retry.
            aggregates = retrying.into_iter().filter(|a| !self.blocked.contains(a)).collect();
            self.blocked.extend(aggregates.iter().cloned());
        }
        Ok(())
    }

    /// The stream cannot resume from a checkpoint (first start, history
    /// lost): republish every row that may not have been published (no
    /// status, or `pending` from the first release), then go on from the
    /// change stream, and record the recovery. The scan and the stream meet
    /// at one majority-committed cluster time (`Checkpoints::
    /// recovery_start`): the scan sees every commit before it, the stream
    /// every commit from it on. Rows on both sides of it are published
    /// twice, and rows published before are published again: duplicates,
    /// never a gap. Without a commit time on the rows, the scan cannot be
    /// bounded below (a writer's clock says nothing about commit order), so
    /// it reads the whole unconfirmed history the retention keeps.
    async fn recover(&mut self, reason: RecoveryReason, readiness: &RangeReadiness) -> Result<OutboxStream> {
        readiness.set(RangeState::Starting("recovering: republishing unconfirmed rows"));
        let (mut session, start_at) = self.checkpoints.recovery_start(&self.fence, reason).await?;
        tracing::warn!(
            reason = reason.as_str(),
            start_at = %start_at,
            "the change stream cannot resume from a checkpoint: republishing every unconfirmed row from the outbox, \
             then following the stream from the scan's start (events may be published twice, none is lost)"
        );
        self.metrics.recovery(reason.as_str());
        let mut cursor = self.outbox.unconfirmed_rows(&mut session).await?;
        let mut rows = 0_i64;
        let mut last_event = None;
        let mut chunk = Vec::with_capacity(self.batch_size());
        let mut malformed = Vec::new();
        loop {
            let next = cursor.next(&mut session).await.transpose()?;
            let done = next.is_none();
            if let Some(raw) = next {
                let p = self.next_position();
                match EventRow::from_raw(raw) {
                    Ok(row) => {
                        if last_event.as_ref().is_none_or(|(id, _): &(String, DateTime)| *id < row.id) {
                            last_event = Some((row.id.clone(), row.occurred_on));
                        }
                        chunk.push(Outgoing { row, seq: p, arrival: None });
                    }
                    Err(unreadable) => malformed.push(unreadable_goes_dead(unreadable, p, &mut self.blocked)),
                }
            }
            if chunk.len() + malformed.len() >= self.batch_size() || (done && chunk.len() + malformed.len() > 0) {
                if room(&self.lease) <= self.send_window {
                    self.drain().await?;
                    return Err(Error::LeaseLost("range"));
                }
                rows += (chunk.len() + malformed.len()) as i64;
                let (chunk, malformed) = (std::mem::take(&mut chunk), std::mem::take(&mut malformed));
                self.enqueue(chunk, None, None, malformed).await;
                self.advance().await;
                self.settle_decided().await?;
                while self.pipeline_full() {
                    self.step().await?;
                }
            }
            if done {
                break;
            }
        }
        self.drain().await?;
        let coll = self.outbox.collection().clone_with_type::<Document>();
        let stream = OutboxStream::open(coll, StreamStart::At(start_at), self.batch_size(), self.outbox.range())
            .await
            .map_err(|e| match e {
                StreamError::Mongo(e) => Error::Mongo(e),
                StreamError::HistoryLost(why) => Error::Mongo(mongodb::error::Error::custom(why)),
            })?;
        self.checkpoints.save_recovery(&self.fence, reason, rows, last_event, start_at).await?;
        tracing::warn!(reason = reason.as_str(), rows, "recovery scan done; publishing from the change stream again");
        Ok(stream)
    }
}

/// Rows deleted per cleanup query (one snapshot read, one delete).
const CLEANUP_CHUNK: i64 = 5_000;

/// Delete published history older than the retention, every half minute,
/// while this relay holds the lease. Only rows committed before the
/// checkpoint's position are deleted (read in a snapshot at that cluster
/// time), so a row the relay has not published is never deleted, whatever
/// its writer's clock says; the retention itself counts from the event ids
/// (the writers' clocks).
async fn clean_history(
    outbox: Outbox,
    checkpoints: Checkpoints,
    lease: watch::Receiver<Option<Instant>>,
    retention: Duration,
    metrics: RangeMetrics,
    mut stop: Stop,
) {
    let every = Duration::from_secs(30).min(retention / 4);
    while !stopped(&stop) {
        lifecycle::sleep_or_stop(&mut stop, every).await;
        if room(&lease) == Duration::ZERO || stopped(&stop) {
            continue;
        }
        let Ok(Some(checkpoint)) = checkpoints.load().await else { continue };
        let Some(position) = checkpoint.position_time() else { continue };
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let cutoff = DateTime::now().timestamp_millis().saturating_sub(ms(retention));
        let started = std::time::Instant::now();
        let mut deleted = 0;
        loop {
            match outbox.delete_published(&first_id_of_millisecond(cutoff), before(position), CLEANUP_CHUNK).await {
                Ok(n) => {
                    deleted += n;
                    metrics.cleaned.inc_by(n);
                    if n < CLEANUP_CHUNK as u64 || stopped(&stop) || room(&lease) == Duration::ZERO {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cleaning published history (nothing deleted by this query)");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::debug!(deleted, ms = started.elapsed().as_millis() as u64, "published history cleaned");
        }
    }
}

/// The cluster time just before `t`: the commits of a transaction share
/// one time, and a checkpoint may stand between two events of it.
fn before(t: Timestamp) -> Timestamp {
    match t.increment {
        0 => Timestamp { time: t.time.saturating_sub(1), increment: u32::MAX },
        i => Timestamp { time: t.time, increment: i - 1 },
    }
}

async fn refresh_stats(outbox: Outbox, metrics: RangeMetrics, mut stop: Stop) {
    while !stopped(&stop) {
        match outbox.stats(DateTime::now()).await {
            Ok(s) => metrics.set_stats(&s),
            Err(e) => tracing::warn!(error = %e, "reading outbox stats"),
        }
        lifecycle::sleep_or_stop(&mut stop, Duration::from_secs(5)).await;
    }
}
