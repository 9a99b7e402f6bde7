//! The relay's per-row queries on the outbox. The success path writes no
//! row (the checkpoint records progress); these are the exceptions:
//! - set aside: a failed attempt (`failed` with its retry time, or `dead`),
//!   an event held behind a failure of its aggregate (`held`), and rows a
//!   retry published (`published`), all in one transaction that also checks
//!   the relay's fence, so a stale relay cannot write them;
//! - the retry path's reads: due failures, an aggregate's backlog in
//!   `holdSeq` order, the aggregates blocked at start;
//! - redrive, retention cleanup, and the recovery scan.
//!
//! Reads here use the majority read concern: a row rolled back by a
//! failover is never acted on.

use std::collections::HashSet;

use futures::TryStreamExt;
use mongodb::{
    Cursor,
    bson::{DateTime, Document, RawDocumentBuf, doc},
    options::ReadConcern,
};

use super::{
    EventRow, Outbox, OutboxStatus,
    checkpoint::{CheckpointError, Checkpoints, Fence},
};

/// Where a retried event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    pub partition: i32,
    pub offset: i64,
}

/// A failed attempt: the row's new attempt count, and when to retry
/// (`None`: out of attempts, or a permanent failure: the row goes `dead`).
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub id: String,
    pub attempts: i32,
    pub error: String,
    pub retry_at: Option<DateTime>,
    pub backoff_ms: i64,
    /// The row's place in its aggregate's backlog (kept if it had one).
    pub hold_seq: i64,
}

/// The per-row writes of one batch.
#[derive(Debug, Default, Clone)]
pub struct RowChanges {
    pub failed: Vec<Failure>,
    /// Rows set aside behind a failure of their aggregate: id and `holdSeq`.
    pub held: Vec<(String, i64)>,
    /// Rows with a status (retried, held, or written by the first release)
    /// that are now published.
    pub published: Vec<Published>,
}

impl RowChanges {
    pub fn is_empty(&self) -> bool {
        self.failed.is_empty() && self.held.is_empty() && self.published.is_empty()
    }
}

/// Statements per `update` command.
const STATEMENTS_PER_COMMAND: usize = 500;

/// The smallest UUID v7 string of millisecond `ms`: every event id created
/// at or after `ms` sorts at or after it.
pub fn first_id_of_millisecond(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0) & 0xffff_ffff_ffff;
    format!("{:08x}-{:04x}-0000-0000-000000000000", ms >> 16, ms & 0xffff)
}

fn majority() -> ReadConcern {
    ReadConcern::majority()
}

impl Outbox {
    /// Write `changes` in one transaction, refused (nothing written) unless
    /// `fence` is still the outbox's current claim.
    pub async fn set_aside(
        &self,
        checkpoints: &Checkpoints,
        fence: &Fence,
        changes: &RowChanges,
        now: DateTime,
    ) -> Result<(), CheckpointError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut statements: Vec<Document> = Vec::new();
        for f in &changes.failed {
            let state = if f.retry_at.is_some() { OutboxStatus::Failed } else { OutboxStatus::Dead };
            let mut set = doc! {
                "status": state.as_str(), "attempts": f.attempts, "lastError": &f.error, "backoffMs": f.backoff_ms,
                "holdSeq": {"$ifNull": ["$holdSeq", f.hold_seq]},
            };
            if let Some(at) = f.retry_at {
                set.insert("nextAttemptAt", at);
            }
            statements.push(doc! {"q": {"_id": &f.id, "status": {"$ne": "dead"}}, "u": [{"$set": set}]});
        }
        for (id, seq) in &changes.held {
            // Only rows not yet set aside: a replayed event keeps its place.
            statements.push(doc! {
                "q": {"_id": id, "status": {"$exists": false}},
                "u": {"$set": {"status": OutboxStatus::Held.as_str(), "holdSeq": seq}},
            });
        }
        for p in &changes.published {
            statements.push(doc! {
                "q": {"_id": &p.id, "status": {"$in": ["pending", "failed", "held"]}},
                "u": [
                    {"$set": {"status": "published", "publishedAt": now, "partition": p.partition, "offset": p.offset,
                        "attempts": {"$add": [{"$ifNull": ["$attempts", 0]}, 1]}}},
                    {"$unset": ["lastError", "backoffMs", "nextAttemptAt", "holdSeq"]},
                ],
            });
        }
        let client = self.database().client();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut session = client.start_session().await?;
            session.start_transaction().await?;
            let result: Result<(), CheckpointError> = async {
                checkpoints.check_in(&mut session, fence).await?;
                for chunk in statements.chunks(STATEMENTS_PER_COMMAND) {
                    let reply = self
                        .database()
                        .run_command(doc! {"update": self.collection().name(), "updates": chunk, "ordered": true})
                        .session(&mut session)
                        .await?;
                    if let Ok(errors) = reply.get_array("writeErrors")
                        && !errors.is_empty()
                    {
                        return Err(mongodb::error::Error::custom(format!("outbox update failed: {errors:?}")).into());
                    }
                }
                session.commit_transaction().await?;
                Ok(())
            }
            .await;
            match result {
                Err(CheckpointError::Mongo(e))
                    if attempt < 5
                        && (e.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR)
                            || e.contains_label(mongodb::error::UNKNOWN_TRANSACTION_COMMIT_RESULT)) =>
                {
                    continue;
                }
                other => return other,
            }
        }
    }

    /// Every aggregate with a failed, held or dead row (the stream holds
    /// their later events), each with whether its backlog starts with a held
    /// row (its blocker was published, then the relay stopped before the
    /// rest: the retry path publishes it without waiting for a failure to
    /// come due). One pass over the set-aside rows, when a relay takes the
    /// outbox.
    pub async fn backlog_heads(&self) -> mongodb::error::Result<Vec<(String, bool)>> {
        let rows: Vec<Document> = self
            .collection()
            .clone_with_type::<Document>()
            .aggregate(vec![
                doc! {"$match": self.range().restrict(
                    doc! {"status": {"$in": ["failed", "held", "dead"]}, "aggregateId": {"$type": "string"}},
                )},
                doc! {"$sort": {"aggregateId": 1, "holdSeq": 1, "_id": 1}},
                doc! {"$group": {"_id": "$aggregateId", "head": {"$first": "$status"}}},
            ])
            .read_concern(majority())
            .await?
            .try_collect()
            .await?;
        Ok(rows
            .iter()
            .filter_map(|d| Some((d.get_str("_id").ok()?.to_owned(), d.get_str("head") == Ok("held"))))
            .collect())
    }

    /// Aggregates whose first backlog row is a failure due by `now`, at
    /// most `limit`, the longest-waiting first.
    pub async fn due_aggregates(&self, now: DateTime, limit: i64) -> mongodb::error::Result<Vec<String>> {
        let rows: Vec<Document> = self
            .collection()
            .clone_with_type::<Document>()
            .find(self.range().restrict(doc! {"status": "failed", "nextAttemptAt": {"$lte": now}}))
            .sort(doc! {"nextAttemptAt": 1})
            .projection(doc! {"aggregateId": 1})
            .limit(limit)
            .read_concern(majority())
            .await?
            .try_collect()
            .await?;
        let mut seen = HashSet::new();
        Ok(rows
            .iter()
            .filter_map(|d| d.get_str("aggregateId").ok())
            .filter(|a| seen.insert(a.to_string()))
            .map(str::to_owned)
            .collect())
    }

    /// An aggregate's set-aside rows (failed, held, dead) in `holdSeq`
    /// order: the order they must be published in. It ends before a row
    /// that cannot be read (one the relay set dead as unreadable): nothing
    /// after it can be published before it is.
    pub async fn backlog(&self, aggregate_id: &str, limit: i64) -> mongodb::error::Result<Vec<EventRow>> {
        let raw: Vec<RawDocumentBuf> = self
            .collection()
            .clone_with_type::<RawDocumentBuf>()
            .find(doc! {"aggregateId": aggregate_id, "status": {"$in": ["failed", "held", "dead"]}})
            .sort(doc! {"holdSeq": 1, "_id": 1})
            .limit(limit)
            .read_concern(majority())
            .await?
            .try_collect()
            .await?;
        Ok(raw.into_iter().map_while(|r| EventRow::from_raw(r).ok()).collect())
    }

    /// The earliest retry time of a failed row.
    pub async fn next_retry_at(&self) -> mongodb::error::Result<Option<DateTime>> {
        let first = self
            .collection()
            .clone_with_type::<Document>()
            .find_one(self.range().restrict(doc! {"status": "failed"}))
            .sort(doc! {"nextAttemptAt": 1})
            .projection(doc! {"nextAttemptAt": 1})
            .await?;
        Ok(first.and_then(|d| d.get_datetime("nextAttemptAt").ok().copied()))
    }

    /// Put `dead` (or `failed`) rows, optionally of one aggregate, back in
    /// line for a retry now with a fresh attempt budget. They keep their
    /// place (`holdSeq`) in their aggregate's backlog. Returns how many.
    pub async fn redrive(
        &self,
        from: OutboxStatus,
        aggregate_id: Option<&str>,
        now: DateTime,
    ) -> mongodb::error::Result<u64> {
        let mut filter = doc! {"status": from.as_str()};
        if let Some(a) = aggregate_id {
            filter.insert("aggregateId", a);
        }
        let r = self
            .collection()
            .update_many(
                filter,
                doc! {
                    "$set": {"status": "failed", "attempts": 0, "nextAttemptAt": now, "redrivenAt": now},
                    "$unset": {"backoffMs": ""},
                },
            )
            .hint(mongodb::options::Hint::Name(super::store::BLOCKING_INDEX.into()))
            .await?;
        Ok(r.modified_count)
    }

    /// Delete published history created before `before_id` (an event id
    /// bound, see [`first_id_of_millisecond`]): rows published from the
    /// stream (no status) or by a retry. Set-aside rows are never deleted.
    pub async fn delete_published_before(&self, before_id: &str) -> mongodb::error::Result<u64> {
        let r = self
            .collection()
            .delete_many(self.range().restrict(doc! {
                "_id": {"$lt": before_id},
                "$or": [{"status": {"$exists": false}}, {"status": "published"}],
            }))
            .await?;
        Ok(r.deleted_count)
    }

    /// The recovery scan: rows that may not have been published (no status,
    /// or `pending` from the first release) with ids from `from_id` on, each
    /// aggregate's in its own order (`aggregateVersion`; the event id only
    /// breaks ties and orders rows written without a version).
    pub async fn unconfirmed_rows(&self, from_id: Option<&str>) -> mongodb::error::Result<Cursor<RawDocumentBuf>> {
        let mut filter = doc! {"$or": [{"status": {"$exists": false}}, {"status": "pending"}]};
        if let Some(from) = from_id {
            filter.insert("_id", doc! {"$gte": from});
        }
        self.collection()
            .clone_with_type::<RawDocumentBuf>()
            .find(self.range().restrict(filter))
            .sort(doc! {"aggregateId": 1, "aggregateVersion": 1, "_id": 1})
            .allow_disk_use(true)
            .read_concern(majority())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_id_of_a_millisecond_sorts_before_every_v7_id_of_it() {
        let ms = 1_700_000_000_123_i64;
        let bound = first_id_of_millisecond(ms);
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, (ms / 1000) as u64, ((ms % 1000) * 1_000_000) as u32);
        let id = uuid::Uuid::new_v7(ts).to_string();
        assert!(bound.as_str() <= id.as_str(), "{bound} vs {id}");
        assert!(first_id_of_millisecond(ms + 1).as_str() > id.as_str());
        assert_eq!(&bound[..13], &id[..13]);
    }
}
