//! `outbox consume rebuild`: rebuild the projection's read model from the
//! start of its topics into a new generation (see `generations`), while
//! the live consumers keep the current one, then switch readers to it.
//!
//! 1. **Replaying**: every partition of the topics is read from its start
//!    (the rebuild is no member of the group: it assigns the partitions
//!    itself and commits nothing) up to its end as it was at the start,
//!    in batches applied like the live projection's (one transaction per
//!    batch with the generation's own processed marks). Progress is saved
//!    every second: status shows it, and a rebuild started again resumes.
//! 2. **CatchingUp**: it goes on until it is at or past the live group's
//!    committed offsets on every partition, then switches: the view
//!    `session_projection` now reads the new generation.
//! 3. **HandingOver**: live members follow the new generation within a
//!    report interval; until every fresh member reports it, and the group's
//!    committed offsets are again behind the rebuild, it keeps applying
//!    every event, so what an old-generation member applied after the
//!    switch (into a collection no reader sees) is in the new generation
//!    too. Events both apply are deduplicated by the generation's marks.
//! 4. **Completed**: parked aggregates whose parked events the rebuild
//!    applied are released.
//!
//! An event the projection cannot take (poison: undecodable, no reader
//! schema, a write MongoDB refuses) stops the rebuild before any switch
//! (phase Failed, with the event's place in the error): a rebuilt read
//! model must hold every event. Outages (registry, MongoDB) are waited out.

use std::time::{Duration, Instant};

use mongodb::bson::DateTime;
use rdkafka::{Message, Offset, TopicPartitionList, consumer::Consumer};

use super::{
    ConsumeArgs, HandlerKind,
    decode::{DecodedEvent, Decoder, RecordMeta},
    fetch::{consumer, next_batch},
    generations::{Generation, Generations, Phase, Position, RebuildState},
    handlers::{Applied, Handler},
    parked::ParkedAggregates,
    pipeline::Record,
    report::MemberReports,
};
use crate::{
    Error, Result,
    db::connect,
    kafka::lag::read_group_lag,
    lifecycle::{self, Stop, stopped},
    processed::ProcessedStore,
};

/// How often progress is saved and the hand-over conditions are checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildSummary {
    pub generation: Generation,
    pub previous: Generation,
    pub phase: Phase,
    pub applied: u64,
    pub duplicates: u64,
}

/// Rebuild the read model kept by `args.group_id` (projection handler
/// only) until it completes, fails or `stop` turns true (then it resumes
/// from its saved positions when run again).
pub async fn rebuild(args: &ConsumeArgs, mut stop: Stop) -> Result<RebuildSummary> {
    if args.handler != HandlerKind::Projection {
        return Err(Error::Config("only the projection handler keeps a read model to rebuild".into()));
    }
    let backoff = args.backoff()?;
    let client = connect(&args.mongodb_uri).await?;
    let db = client.database(&args.database);
    let generations = Generations::new(&db);
    let group = args.group_id.as_str();
    let current = generations.ensure(group).await?;
    let lag = read_group_lag(&args.kafka_bootstrap, &[], group, &args.topics, Duration::from_secs(30)).await.map_err(
        |e| Error::Unavailable {
            service: "Kafka",
            detail: format!("reading the topics' partitions and group {group}'s offsets: {e}"),
        },
    )?;
    if lag.partitions.is_empty() {
        return Err(Error::Config(format!("the topics {:?} have no partitions: nothing to rebuild from", args.topics)));
    }
    // Resume a rebuild of the next generation that stopped before its end; otherwise start one.
    let saved = generations.state().await?.and_then(|s| s.rebuild);
    let (previous, mut state) = match saved {
        Some(s) if s.phase.is_running() && s.generation.number == current.number + 1 => {
            tracing::info!(
                generation = s.generation.number,
                phase = s.phase.as_str(),
                percent = s.percent(),
                "resuming the rebuild"
            );
            (current.clone(), s)
        }
        Some(s) if s.phase == Phase::HandingOver && s.generation == current => {
            tracing::info!(generation = s.generation.number, "resuming the rebuild's hand-over");
            (Generation::nth(group, current.number - 1), s)
        }
        _ => {
            let target = current.next(group);
            generations.clear(&target).await?;
            let positions = lag
                .partitions
                .iter()
                .map(|p| Position {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    next: p.low_watermark,
                    start: p.low_watermark,
                    end: p.high_watermark,
                })
                .collect();
            let now = DateTime::now();
            let s = RebuildState {
                generation: target,
                phase: Phase::Replaying,
                started_at: now,
                updated_at: now,
                positions,
                error: None,
            };
            generations.save_rebuild(&s).await?;
            tracing::info!(generation = s.generation.number, collection = %s.generation.collection,
                records = s.progress().1, "rebuilding the read model from the start of the topics");
            (current.clone(), s)
        }
    };
    let target = state.generation.clone();
    let store = ProcessedStore::new(&db, &target.scope);
    store.ensure_indexes(Duration::from_secs(args.processed_retention_seconds)).await?;
    let handler = Handler::projection(client.clone(), &db, &target.collection);
    let decoder = Decoder::new(&args.schema_registry_url, args.readers()?);
    let consumer = consumer(args, &format!("{group}.rebuild"))?;
    let mut assignment = TopicPartitionList::new();
    for p in &state.positions {
        assignment
            .add_partition_offset(&p.topic, p.partition, Offset::Offset(p.next))
            .map_err(|source| Error::Kafka { context: "assigning the partitions".into(), source })?;
    }
    consumer
        .assign(&assignment)
        .map_err(|source| Error::Kafka { context: "assigning the partitions".into(), source })?;

    let (mut applied, mut duplicates) = (0u64, 0u64);
    let max = args.batch_size as usize;
    // Never set: the rebuild assigns its partitions itself, so none is revoked.
    let mut carried = None;
    let mut checked = Instant::now();
    let mut logged = Instant::now();
    loop {
        if stopped(&stop) {
            generations.save_rebuild(&state).await?;
            tracing::info!(
                percent = state.percent(),
                phase = state.phase.as_str(),
                "rebuild stopped; run it again to resume"
            );
            break;
        }
        // What has arrived, up to a batch; after 200 ms without a record, an empty batch.
        let wake = Some(Instant::now() + Duration::from_millis(200));
        let Some(batch) = next_batch(&consumer, max, Duration::ZERO, wake, &mut stop, &mut carried).await else {
            continue; // stopping
        };
        if !batch.is_empty() {
            let events = match decode_all(&decoder, &batch, &backoff, &mut stop).await {
                Ok(Some(events)) => events,
                Ok(None) => continue, // stopping
                Err(poison) => return fail(&generations, state, poison).await,
            };
            let Some(outcome) = apply(&handler, &events, &store, &backoff, &mut stop).await else { continue };
            match outcome {
                Ok(outcomes) => {
                    for a in outcomes {
                        match a {
                            Applied::Applied => applied += 1,
                            Applied::Duplicate => duplicates += 1,
                        }
                    }
                }
                Err(message) => {
                    let first = &batch[0];
                    let error = format!(
                        "the projection refused a batch from {}/{} at offset {}: {message}",
                        first.topic(),
                        first.partition(),
                        first.offset()
                    );
                    return fail(&generations, state, error).await;
                }
            }
            for m in &batch {
                if let Some(p) =
                    state.positions.iter_mut().find(|p| p.partition == m.partition() && p.topic == m.topic())
                {
                    p.next = p.next.max(m.offset() + 1);
                }
            }
        }
        if checked.elapsed() < CHECK_EVERY {
            continue;
        }
        checked = Instant::now();
        if state.phase == Phase::Replaying && state.positions.iter().all(|p| p.next >= p.end) {
            state.phase = Phase::CatchingUp;
        }
        match state.phase {
            Phase::CatchingUp if ahead_of_group(args, &state).await => {
                generations.switch(&previous, &target).await?;
                state.phase = Phase::HandingOver;
                tracing::info!(generation = target.number, collection = %target.collection,
                    "switched: readers now read the rebuilt generation; handing over to the live consumers");
            }
            Phase::HandingOver => {
                // Members first, then offsets: a member reporting the new
                // generation wrote the old one only before the offsets read next.
                let reports = MemberReports::new(&db).fresh(group, DateTime::now()).await?;
                let behind: Vec<&str> =
                    reports.iter().filter(|r| r.generation != Some(target.number)).map(|r| r.member.as_str()).collect();
                if behind.is_empty() && ahead_of_group(args, &state).await {
                    let released = ParkedAggregates::new(&db, group).release_applied(&store).await?;
                    state.phase = Phase::Completed;
                    state.updated_at = DateTime::now();
                    generations.save_rebuild(&state).await?;
                    tracing::info!(
                        generation = target.number,
                        applied,
                        duplicates,
                        released_parked = released,
                        "rebuild completed"
                    );
                    break;
                } else if logged.elapsed() >= Duration::from_secs(5) {
                    tracing::info!(members = ?behind, "waiting for the live members to follow the new generation");
                }
            }
            _ => {}
        }
        state.updated_at = DateTime::now();
        generations.save_rebuild(&state).await?;
        if logged.elapsed() >= Duration::from_secs(5) {
            logged = Instant::now();
            let (done, total) = state.progress();
            tracing::info!(
                phase = state.phase.as_str(),
                percent = state.percent(),
                done,
                total,
                applied,
                duplicates,
                "rebuild progress"
            );
        }
    }
    Ok(RebuildSummary { generation: target, previous, phase: state.phase, applied, duplicates })
}

/// Whether the rebuild is at or past the live group's committed offset on
/// every partition (a partition the group never committed: anywhere).
async fn ahead_of_group(args: &ConsumeArgs, state: &RebuildState) -> bool {
    match read_group_lag(&args.kafka_bootstrap, &[], &args.group_id, &args.topics, Duration::from_secs(10)).await {
        Ok(lag) => lag.partitions.iter().all(|p| {
            let next = state.positions.iter().find(|s| s.topic == p.topic && s.partition == p.partition);
            match (p.committed, next) {
                (None, _) => true,
                (Some(c), Some(s)) => s.next >= c,
                // A partition added since the start: not replayed, so not ahead.
                (Some(_), None) => false,
            }
        }),
        Err(e) => {
            tracing::warn!(error = %e, "reading the live group's offsets");
            false
        }
    }
}

async fn fail(generations: &Generations, mut state: RebuildState, error: String) -> Result<RebuildSummary> {
    state.phase = Phase::Failed;
    state.error = Some(error.clone());
    state.updated_at = DateTime::now();
    generations.save_rebuild(&state).await?;
    Err(Error::RebuildFailed(format!(
        "rebuild of generation {} failed, nothing switched: {error}",
        state.generation.number
    )))
}

/// Decode a batch, waiting out the registry; `Err` names a poison record,
/// `Ok(None)` at stop.
async fn decode_all(
    decoder: &Decoder,
    batch: &[Record],
    backoff: &crate::backoff::BackoffPolicy,
    stop: &mut Stop,
) -> std::result::Result<Option<Vec<DecodedEvent>>, String> {
    let mut events = Vec::with_capacity(batch.len());
    for m in batch {
        let place = || format!("{}/{} at offset {}", m.topic(), m.partition(), m.offset());
        let mut attempts = 0;
        loop {
            let Some(bytes) = m.payload() else { return Err(format!("the record at {} has no value", place())) };
            match decoder.decode(bytes, &RecordMeta::of(m)).await {
                Ok(e) => {
                    events.push(e);
                    break;
                }
                Err(e) if e.retryable => {
                    attempts += 1;
                    tracing::warn!(error = %e.message, attempts, "decoding: the registry is away; waiting");
                    if wait(backoff, attempts, stop).await {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(format!("the record at {} cannot be read: {}", place(), e.message)),
            }
        }
    }
    Ok(Some(events))
}

/// Apply a batch, waiting out MongoDB; `Some(Err)` when the projection
/// refuses it, `None` at stop.
async fn apply(
    handler: &Handler,
    events: &[DecodedEvent],
    store: &ProcessedStore,
    backoff: &crate::backoff::BackoffPolicy,
    stop: &mut Stop,
) -> Option<std::result::Result<Vec<Applied>, String>> {
    let mut attempts = 0;
    loop {
        match handler.apply_batch(events, store).await {
            Ok(a) => return Some(Ok(a)),
            Err(e) if e.transient.is_some() => {
                attempts += 1;
                tracing::warn!(error = %e.message, attempts, "applying a batch: waiting for MongoDB");
                if wait(backoff, attempts, stop).await {
                    return None;
                }
            }
            Err(e) => return Some(Err(e.message)),
        }
    }
}

/// Sleep the backoff after `attempts` failures (no attempt limit: outages
/// are waited out); whether stop came first.
async fn wait(backoff: &crate::backoff::BackoffPolicy, attempts: u32, stop: &mut Stop) -> bool {
    lifecycle::sleep_or_stop(stop, backoff.base_delay(attempts)).await
}
