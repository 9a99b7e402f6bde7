//! The relay's queries on the outbox: claim due rows in event order with a
//! lease, skipping aggregates held back by an earlier unpublished event;
//! mark rows published or failed in one round trip; release claims; redrive.

use std::collections::HashMap;

use futures::TryStreamExt;
use mongodb::{
    bson::{DateTime, Document, doc},
    options::FindOptions,
};

use super::{Outbox, OutboxDocument, OutboxStatus};

/// Rows claimed for one batch, in event order.
#[derive(Debug, Default)]
pub struct Claim {
    pub rows: Vec<OutboxDocument>,
    /// Due rows left alone because an earlier event of their aggregate is
    /// not yet published.
    pub held_back: usize,
}

/// Where a published event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    pub partition: i32,
    pub offset: i64,
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

/// Rows nobody holds, or whose claim has expired. A relay's own live
/// claims are its batches in flight: not claimable again. (A restarted
/// relay drops its stale claims at once with [`Outbox::release_all`].)
fn claimable(now: DateTime) -> Document {
    doc! {"$or": [
        {"claimedUntil": {"$exists": false}},
        {"claimedUntil": {"$lte": now}},
    ]}
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
    /// Claim up to `limit` due rows (pending, or failed with `nextAttemptAt`
    /// <= now) in event order for `relay` until `until`. A row is skipped
    /// while an earlier event of its aggregate is dead, failed and not yet
    /// due, or claimed (by another relay, or in one of this relay's batches
    /// still in flight): per-aggregate order holds.
    pub async fn claim_due(
        &self,
        relay: &str,
        now: DateTime,
        until: DateTime,
        limit: i64,
    ) -> mongodb::error::Result<Claim> {
        let by_id = FindOptions::builder().sort(doc! {"_id": 1}).limit(limit).build();
        let mut pending_filter = doc! {"status": "pending"};
        pending_filter.extend(claimable(now));
        let mut failed_filter = doc! {"status": "failed", "nextAttemptAt": {"$lte": now}};
        failed_filter.extend(claimable(now));
        let mut due: Vec<OutboxDocument> =
            self.collection().find(pending_filter).with_options(by_id.clone()).await?.try_collect().await?;
        due.extend(self.collection().find(failed_filter).with_options(by_id).await?.try_collect::<Vec<_>>().await?);
        due.sort_by(|a, b| a.id.cmp(&b.id));
        due.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        if due.is_empty() {
            return Ok(Claim::default());
        }

        // The first event of each aggregate that holds its later events back.
        let mut aggregates: Vec<&str> = due.iter().map(|r| r.aggregate_id.as_str()).collect();
        aggregates.sort_unstable();
        aggregates.dedup();
        let pipeline = vec![
            doc! {"$match": {
                "aggregateId": {"$in": &aggregates},
                "$or": [
                    {"status": "dead"},
                    {"status": "failed", "nextAttemptAt": {"$gt": now}},
                    {"status": {"$in": ["pending", "failed"]}, "claimedUntil": {"$gt": now}},
                ],
            }},
            doc! {"$group": {"_id": "$aggregateId", "first": {"$min": "$_id"}}},
        ];
        let mut blockers: HashMap<String, String> = HashMap::new();
        let mut cursor = self.collection().clone_with_type::<Document>().aggregate(pipeline).await?;
        while let Some(d) = cursor.try_next().await? {
            if let (Ok(agg), Ok(first)) = (d.get_str("_id"), d.get_str("first")) {
                blockers.insert(agg.to_owned(), first.to_owned());
            }
        }
        let before = due.len();
        due.retain(|r| blockers.get(&r.aggregate_id).is_none_or(|first| r.id <= *first));
        let held_back = before - due.len();
        if due.is_empty() {
            return Ok(Claim { rows: due, held_back });
        }

        let ids: Vec<&str> = due.iter().map(|r| r.id.as_str()).collect();
        let mut filter = doc! {"_id": {"$in": &ids}, "status": {"$in": ["pending", "failed"]}};
        filter.extend(claimable(now));
        let result =
            self.collection().update_many(filter, doc! {"$set": {"claimedBy": relay, "claimedUntil": until}}).await?;
        if result.modified_count as usize != due.len() {
            // Someone else claimed some of them in between: keep only ours.
            let mine: Vec<String> = self
                .collection()
                .find(doc! {"_id": {"$in": &ids}, "claimedBy": relay, "claimedUntil": until})
                .projection(doc! {"_id": 1})
                .await?
                .try_collect::<Vec<_>>()
                .await?
                .into_iter()
                .map(|r| r.id)
                .collect();
            due.retain(|r| mine.contains(&r.id));
        }
        for row in &mut due {
            row.claimed_by = Some(relay.to_owned());
            row.claimed_until = Some(until);
        }
        Ok(Claim { rows: due, held_back })
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

    /// Mark rows published, with where they landed: one update statement
    /// for the whole batch (an aggregation-pipeline update looks each row's
    /// partition and offset up by its id), far cheaper than one per row.
    pub async fn mark_published(&self, relay: &str, rows: &[Published], at: DateTime) -> mongodb::error::Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&str> = rows.iter().map(|p| p.id.as_str()).collect();
        let partitions: Vec<i32> = rows.iter().map(|p| p.partition).collect();
        let offsets: Vec<i64> = rows.iter().map(|p| p.offset).collect();
        let index = doc! {"$indexOfArray": [{"$literal": &ids}, "$_id"]};
        let pipeline = vec![
            doc! {"$set": {
                "status": "published",
                "publishedAt": at,
                "attempts": {"$add": [{"$ifNull": ["$attempts", 0]}, 1]},
                "partition": {"$arrayElemAt": [{"$literal": partitions}, index.clone()]},
                "offset": {"$arrayElemAt": [{"$literal": offsets}, index]},
            }},
            doc! {"$unset": ["claimedBy", "claimedUntil", "lastError", "backoffMs"]},
        ];
        let r = self.collection().update_many(doc! {"_id": {"$in": &ids}, "claimedBy": relay}, pipeline).await?;
        Ok(r.modified_count)
    }

    /// Mark failed attempts: `failed` with the next attempt time, or `dead`.
    pub async fn mark_failed(&self, relay: &str, failures: &[Failure]) -> mongodb::error::Result<u64> {
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
                    "q": {"_id": &f.id, "claimedBy": relay},
                    "u": {"$set": set, "$unset": {"claimedBy": "", "claimedUntil": ""}},
                }
            })
            .collect();
        self.update_each(updates).await
    }

    /// Give claimed rows back untouched (shutdown, or skipped in a batch).
    pub async fn release(&self, relay: &str, ids: &[String]) -> mongodb::error::Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let r = self
            .collection()
            .update_many(
                doc! {"_id": {"$in": ids}, "claimedBy": relay},
                doc! {"$unset": {"claimedBy": "", "claimedUntil": ""}},
            )
            .await?;
        Ok(r.modified_count)
    }

    /// Drop every claim `relay` holds: its batches from before a restart.
    pub async fn release_all(&self, relay: &str) -> mongodb::error::Result<u64> {
        let r = self
            .collection()
            .update_many(doc! {"claimedBy": relay}, doc! {"$unset": {"claimedBy": "", "claimedUntil": ""}})
            .await?;
        Ok(r.modified_count)
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
                    "$unset": {"claimedBy": "", "claimedUntil": "", "backoffMs": ""},
                },
            )
            .await?;
        Ok(r.modified_count)
    }
}
