//! The outbox as it is, read from MongoDB: what the relay exports as
//! metrics and the operator writes into `OutboxRelay` status (for the whole
//! outbox, or for one bucket range of a sharded one, with that range's
//! checkpoint). Needs no relay
//! to be running, and never scans published history:
//! - failed, held and dead rows are counted through their partial indexes;
//! - pending (committed, not yet acknowledged by Kafka) is the number of
//!   rows after the checkpoint's last event in `_id` order (counted on the
//!   `_id` index alone) less the set-aside ones among them: an estimate, since ids come from the writers' clocks (off
//!   by the rows written within the writers' clock skew of the checkpoint);
//! - the published total is the checkpoint's counter.

use futures::TryStreamExt;
use mongodb::{
    bson::{DateTime, Document, doc},
    options::Hint,
};

use super::{Outbox, checkpoint::Checkpoint, store::BLOCKING_INDEX};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxStats {
    /// Committed and not yet acknowledged (estimate, see the module docs).
    pub pending: u64,
    pub failed: u64,
    /// The failed events by their last failure's reason (`timed_out`,
    /// `broker_unavailable`, `registry_unavailable`, `unknown_topic`, ...):
    /// what they wait for.
    pub failed_by_reason: std::collections::BTreeMap<String, u64>,
    /// Waiting behind a failed or dead event of their aggregate.
    pub held: u64,
    pub dead: u64,
    /// Published through the stream since the outbox was first relayed.
    pub published: u64,
    /// Age of the oldest unpublished event (pending, failed or held), seconds.
    pub oldest_pending_age_seconds: Option<f64>,
    /// The earliest `nextAttemptAt` of a failed row.
    pub next_retry_at: Option<DateTime>,
    /// The longest backoff currently scheduled, in milliseconds.
    pub max_backoff_ms: Option<i64>,
    /// Aggregates with a failed, held or dead event: their later events wait.
    pub blocked_aggregates: u64,
    /// When the relay last saved its checkpoint.
    pub last_published_at: Option<DateTime>,
    /// The checkpoint itself (holder, epoch, last recovery).
    pub checkpoint: Option<Checkpoint>,
}

impl Outbox {
    pub async fn stats(&self, now: DateTime) -> mongodb::error::Result<OutboxStats> {
        let coll = self.collection().clone_with_type::<Document>();
        let checkpoint = self.checkpoints().load().await?;
        let range = self.range();
        // Queries on set-aside states go through the partial `blocking`
        // index (every failed, held and dead row, nothing else): without
        // the hint the planner sees no index for `status` alone and reads
        // the whole history.
        let count = |filter: Document, set_aside: bool| {
            let coll = coll.clone();
            async move {
                let mut count = coll.count_documents(range.restrict(filter));
                if set_aside {
                    count = count.hint(Hint::Name(BLOCKING_INDEX.into()));
                }
                count.await
            }
        };
        let after = checkpoint.as_ref().and_then(|c| c.last_event_id.clone());
        // After the checkpoint: every row by the `_id` index alone (a count
        // that reads no document), less the set-aside ones among them (few,
        // through the partial `blocking` index).
        let (unconfirmed, set_aside_after) = match &after {
            Some(id) => (
                doc! {"_id": {"$gt": id}},
                Some(doc! {"_id": {"$gt": id}, "status": {"$in": ["failed", "held", "dead"]}}),
            ),
            None => (doc! {"$or": [{"status": {"$exists": false}}, {"status": "pending"}]}, None),
        };
        let first = |filter: Document, sort: Document, set_aside: bool| {
            let coll = coll.clone();
            async move {
                let mut find = coll.find_one(range.restrict(filter)).sort(sort);
                if set_aside {
                    find = find.hint(Hint::Name(BLOCKING_INDEX.into()));
                }
                find.await
            }
        };
        let (
            after_checkpoint,
            set_aside_after,
            failed,
            held,
            dead,
            oldest_unconfirmed,
            oldest_set_aside,
            next_retry,
            max_backoff,
        ) = futures::try_join!(
            count(unconfirmed.clone(), false),
            async {
                match set_aside_after {
                    Some(filter) => count(filter, true).await,
                    None => Ok(0),
                }
            },
            count(doc! {"status": "failed"}, true),
            count(doc! {"status": "held"}, true),
            count(doc! {"status": "dead"}, true),
            first(unconfirmed, doc! {"_id": 1}, false),
            first(doc! {"status": {"$in": ["failed", "held"]}}, doc! {"holdSeq": 1}, true),
            first(doc! {"status": "failed"}, doc! {"nextAttemptAt": 1}, true),
            first(doc! {"status": "failed"}, doc! {"backoffMs": -1}, true),
        )?;
        let pending = after_checkpoint.saturating_sub(set_aside_after);
        let oldest = [oldest_unconfirmed, oldest_set_aside]
            .into_iter()
            .flatten()
            .filter_map(|d| d.get_datetime("occurredOn").ok().copied())
            .min();
        // The aggregateId bound lets the planner use the `blocking` index.
        let blocked: Vec<Document> = coll
            .aggregate(vec![
                doc! {"$match": range.restrict(
                    doc! {"status": {"$in": ["failed", "held", "dead"]}, "aggregateId": {"$type": "string"}},
                )},
                doc! {"$group": {"_id": "$aggregateId"}},
                doc! {"$count": "n"},
            ])
            .await?
            .try_collect()
            .await?;
        let by_reason: Vec<Document> = coll
            .aggregate(vec![
                doc! {"$match": range.restrict(doc! {"status": "failed", "nextAttemptAt": {"$exists": true}})},
                doc! {"$group": {"_id": {"$ifNull": ["$failureReason", "unknown"]}, "n": {"$sum": 1}}},
            ])
            .hint(Hint::Name("due".into()))
            .await?
            .try_collect()
            .await?;
        let failed_by_reason = by_reason
            .iter()
            .filter_map(|d| Some((d.get_str("_id").ok()?.to_owned(), u64::try_from(d.get_i32("n").ok()?).ok()?)))
            .collect();
        Ok(OutboxStats {
            pending,
            failed,
            failed_by_reason,
            held,
            dead,
            published: checkpoint.as_ref().map_or(0, |c| u64::try_from(c.published).unwrap_or(0)),
            oldest_pending_age_seconds: oldest
                .map(|t| (now.timestamp_millis() - t.timestamp_millis()).max(0) as f64 / 1000.0),
            next_retry_at: next_retry.and_then(|d| d.get_datetime("nextAttemptAt").ok().copied()),
            max_backoff_ms: max_backoff.and_then(|d| d.get_i64("backoffMs").ok()),
            blocked_aggregates: blocked.first().and_then(|d| d.get_i32("n").ok()).map_or(0, |n| n as u64),
            last_published_at: checkpoint.as_ref().and_then(|c| c.saved_at),
            checkpoint,
        })
    }
}
