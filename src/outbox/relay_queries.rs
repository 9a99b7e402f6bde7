//! The relay's queries on the outbox: read the next due rows in event
//! order, skipping aggregates held back by an earlier unpublished event;
//! mark rows published or failed in one round trip; redrive.
//!
//! Rows are not claimed one by one: the relay that reads them holds the
//! outbox lease (one active relay per outbox), which is the claim. A relay
//! that dies loses the lease when it expires, and its unmarked rows are
//! still `pending` (or `failed`) for the next holder: at-least-once, with
//! one write per event instead of two.

use std::collections::{HashMap, HashSet};

use futures::TryStreamExt;
use mongodb::{
    bson::{DateTime, Document, doc},
    options::FindOptions,
};

use super::{Outbox, OutboxDocument, OutboxStatus};

/// The next due rows, in event order.
#[derive(Debug, Default)]
pub struct DueBatch {
    pub rows: Vec<OutboxDocument>,
    /// Due rows left alone because an earlier event of their aggregate is
    /// not yet published.
    pub held_back: usize,
}

/// Rows this relay has produced but not yet marked (its batch being marked
/// while the next is read): not due again, and the aggregates whose
/// publication failed in them hold their later rows back.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    pub ids: Vec<String>,
    pub failed_aggregates: HashSet<String>,
}

/// Rows marked per update statement: each statement looks a row's
/// partition and offset up in arrays of this length, so the cost grows
/// with it; 100 keeps that below the cost of the write itself.
const MARK_CHUNK: usize = 100;

/// Where a published event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    pub partition: i32,
    pub offset: i64,
    /// The row had failed before: its `lastError` and `backoffMs` go.
    pub retried: bool,
}

/// A failed attempt: the row's new attempt count, and when to retry
/// (`None`: out of attempts, the row goes `dead`).
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub id: String,
    pub attempts: i32,
    pub error: String,
    pub retry_at: Option<DateTime>,
    pub backoff_ms: i64,
}

fn status(s: OutboxStatus) -> &'static str {
    match s {
        OutboxStatus::Pending => "pending",
        OutboxStatus::Published => "published",
        OutboxStatus::Failed => "failed",
        OutboxStatus::Dead => "dead",
    }
}

impl Outbox {
    /// Up to `limit` due rows (pending, or failed with `nextAttemptAt` <=
    /// now) in event order, leaving out `in_flight`'s rows. A row is held
    /// back while an earlier event of its aggregate is dead, failed and not
    /// yet due, or failed in a batch still in flight: per-aggregate order
    /// holds.
    pub async fn due_batch(&self, now: DateTime, limit: i64, in_flight: &InFlight) -> mongodb::error::Result<DueBatch> {
        let by_id = FindOptions::builder().sort(doc! {"_id": 1}).limit(limit).build();
        let not_in_flight = doc! {"$nin": &in_flight.ids};
        let pending = doc! {"status": "pending", "_id": not_in_flight.clone()};
        let failed = doc! {"status": "failed", "nextAttemptAt": {"$lte": now}, "_id": not_in_flight};
        let (mut due, retries) = futures::try_join!(
            async { self.collection().find(pending).with_options(by_id.clone()).await?.try_collect::<Vec<_>>().await },
            async { self.collection().find(failed).with_options(by_id.clone()).await?.try_collect::<Vec<_>>().await },
        )?;
        due.extend(retries);
        due.sort_by(|a, b| a.id.cmp(&b.id));
        due.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        if due.is_empty() {
            return Ok(DueBatch::default());
        }

        // The first event of each aggregate that holds its later events back
        // (the `blocking` index holds failed and dead rows only).
        let mut aggregates: Vec<&str> = due.iter().map(|r| r.aggregate_id.as_str()).collect();
        aggregates.sort_unstable();
        aggregates.dedup();
        let mut cursor = self
            .collection()
            .clone_with_type::<Document>()
            .find(doc! {"aggregateId": {"$in": &aggregates}, "status": {"$in": ["failed", "dead"]}})
            .projection(doc! {"_id": 1, "aggregateId": 1, "status": 1, "nextAttemptAt": 1})
            .await?;
        let mut blockers: HashMap<String, String> = HashMap::new();
        while let Some(d) = cursor.try_next().await? {
            let (Ok(agg), Ok(id)) = (d.get_str("aggregateId"), d.get_str("_id")) else { continue };
            let due_now =
                d.get_str("status") == Ok("failed") && d.get_datetime("nextAttemptAt").is_ok_and(|t| *t <= now);
            if !due_now {
                let first = blockers.entry(agg.to_owned()).or_insert_with(|| id.to_owned());
                if id < first.as_str() {
                    *first = id.to_owned();
                }
            }
        }
        let before = due.len();
        due.retain(|r| {
            !in_flight.failed_aggregates.contains(&r.aggregate_id)
                && blockers.get(&r.aggregate_id).is_none_or(|first| r.id <= *first)
        });
        Ok(DueBatch { held_back: before - due.len(), rows: due })
    }

    /// Run one `update` command with many statements (one round trip).
    async fn update_each(&self, updates: Vec<Document>) -> mongodb::error::Result<u64> {
        if updates.is_empty() {
            return Ok(0);
        }
        let reply = self
            .database()
            .run_command(doc! {"update": self.collection().name(), "updates": updates, "ordered": false})
            .await?;
        if let Ok(errors) = reply.get_array("writeErrors")
            && !errors.is_empty()
        {
            return Err(mongodb::error::Error::custom(format!("outbox update failed: {errors:?}")));
        }
        Ok(reply.get_i32("nModified").map(|n| n as u64).unwrap_or(0))
    }

    /// Mark rows published, with where they landed, in one round trip: one
    /// aggregation-pipeline update per [`MARK_CHUNK`] rows, each looking a
    /// row's partition and offset up by its id. Rows that are no longer
    /// pending or failed (redriven, or marked by another relay) are left
    /// alone.
    pub async fn mark_published(&self, rows: &[Published], at: DateTime) -> mongodb::error::Result<u64> {
        // First attempts (nearly all rows) have nothing to clear, and
        // `$unset` costs even for absent fields: they get their own chunks.
        let (retried, first): (Vec<&Published>, Vec<&Published>) = rows.iter().partition(|p| p.retried);
        let updates = first
            .chunks(MARK_CHUNK)
            .map(|c| (c, false))
            .chain(retried.chunks(MARK_CHUNK).map(|c| (c, true)))
            .map(|(chunk, clear)| {
                let ids: Vec<&str> = chunk.iter().map(|p| p.id.as_str()).collect();
                let partitions: Vec<i32> = chunk.iter().map(|p| p.partition).collect();
                let offsets: Vec<i64> = chunk.iter().map(|p| p.offset).collect();
                let index = doc! {"$indexOfArray": [{"$literal": &ids}, "$_id"]};
                let mut pipeline = vec![doc! {"$set": {
                    "status": "published",
                    "publishedAt": at,
                    "attempts": {"$add": [{"$ifNull": ["$attempts", 0]}, 1]},
                    "partition": {"$arrayElemAt": [{"$literal": partitions}, index.clone()]},
                    "offset": {"$arrayElemAt": [{"$literal": offsets}, index]},
                }}];
                if clear {
                    pipeline.push(doc! {"$unset": ["lastError", "backoffMs"]});
                }
                doc! {
                    "q": {"_id": {"$in": &ids}, "status": {"$in": ["pending", "failed"]}},
                    "u": pipeline,
                    "multi": true,
                }
            })
            .collect();
        self.update_each(updates).await
    }

    /// Mark failed attempts: `failed` with the next attempt time, or `dead`.
    pub async fn mark_failed(&self, failures: &[Failure]) -> mongodb::error::Result<u64> {
        let updates = failures
            .iter()
            .map(|f| {
                let state = if f.retry_at.is_some() { OutboxStatus::Failed } else { OutboxStatus::Dead };
                let mut set = doc! {"status": status(state), "attempts": f.attempts, "lastError": &f.error,
                "backoffMs": f.backoff_ms};
                if let Some(at) = f.retry_at {
                    set.insert("nextAttemptAt", at);
                }
                doc! {
                    "q": {"_id": &f.id, "status": {"$in": ["pending", "failed"]}},
                    "u": {"$set": set},
                }
            })
            .collect();
        self.update_each(updates).await
    }

    /// Put `dead` or `failed` rows (optionally of one aggregate) back to
    /// `pending` with a fresh attempt budget. Returns how many.
    pub async fn redrive(
        &self,
        from: OutboxStatus,
        aggregate_id: Option<&str>,
        now: DateTime,
    ) -> mongodb::error::Result<u64> {
        let mut filter = doc! {"status": status(from)};
        if let Some(a) = aggregate_id {
            filter.insert("aggregateId", a);
        }
        let r = self
            .collection()
            .update_many(
                filter,
                doc! {
                    "$set": {"status": "pending", "attempts": 0, "nextAttemptAt": now, "redrivenAt": now},
                    "$unset": {"backoffMs": ""},
                },
            )
            .await?;
        Ok(r.modified_count)
    }
}
