//! `outbox consume redrive`: replay dead-letter topics into the handler,
//! one record at a time, keeping each aggregate's order.

use std::{collections::HashSet, time::Duration};

use prometheus::Registry;
use rdkafka::consumer::{CommitMode, Consumer};

use super::{
    ConsumeArgs, ConsumerMetrics,
    dead_letter::PARKED,
    fetch::consumer,
    ordering::Prior,
    pipeline::{Outcome, Pipeline, aggregate_of},
    requests,
};
use crate::{
    Error, Result,
    kafka::headers,
    lifecycle::{self, Stop},
};

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
    pipeline.dead_letters.set_suffix(".redrive");
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
