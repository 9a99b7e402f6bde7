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
//!
//! Where each job lives:
//! - `run`: the main loop; `fetch`: the Kafka consumer, batches, pausing;
//! - `ordering`: the lanes (which records may go on, which wait);
//! - `pipeline`: a round of records through decode, dedup, the handler
//!   (`handlers`, `webhook`) and the processed-events store;
//! - `failure`: the per-record retry decision; `dead_letter`: the
//!   dead-letter producer; `parked`: aggregates held behind a dead letter;
//! - `redrive`, `rebuild`, `requests`: the operator-driven jobs;
//! - `report`, `metrics`: status and Prometheus.

pub mod args;
pub mod dead_letter;
pub mod decode;
pub mod failure;
pub mod fetch;
pub mod generations;
pub mod handlers;
pub mod metrics;
pub mod ordering;
pub mod parked;
pub mod pipeline;
pub mod rebuild;
pub mod redrive;
pub mod report;
pub mod requests;
pub mod run;
pub mod webhook;

pub use args::{BeyondHorizon, ConsumeAction, ConsumeArgs, ConsumeCommand, HandlerKind};
pub use fetch::GroupContext;
pub use metrics::ConsumerMetrics;
pub use pipeline::{Outcome, Pipeline, Record, Step, beyond_horizon};
pub use redrive::{RedriveCounts, redrive};
pub use run::run_until;

use crate::{Result, db::connect, lifecycle};

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
