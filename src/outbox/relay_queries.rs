//! The relay's per-row queries on the outbox. The success path writes no
//! row (the checkpoint records progress); these are the exceptions:
//! - set aside: a failed attempt (`failed` with its retry time, or `dead`),
//!   an event held behind a failure of its aggregate (`held`), and rows a
//!   retry published (`published`), all in one transaction that also checks
//!   the relay's fence, so a stale relay cannot write them;
//! - the retry path's reads: due failures, an aggregate's backlog in
//!   `holdSeq` order, the aggregates blocked at start;
//! - retention cleanup, and the recovery scan (redrive and discard
//!   requests: `requests`).
//!
//! Reads here use the majority read concern: a row rolled back by a
//! failover is never acted on.

use std::collections::HashSet;

use futures::TryStreamExt;
use mongodb::{
    ClientSession, SessionCursor,
    bson::{Bson, DateTime, Document, RawDocumentBuf, Timestamp, doc},
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

/// How a failed attempt counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Something the event depends on is away (broker or registry
    /// unreachable, timed out, overloaded): retried without limit, spends
    /// no attempt, only lengthens the backoff.
    Outage,
    /// Not explained as an outage or as the event's own fault: spends one
    /// of the `maxAttempts`, then the row goes dead.
    Unexplained,
    /// The event itself cannot be published as it is (too large, no
    /// schema, does not match its schema, refused): dead at once.
    Permanent,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Outage => "outage",
            FailureKind::Unexplained => "unexplained",
            FailureKind::Permanent => "permanent",
        }
    }
}

/// A failed attempt: the row's new counts, and when to retry (`None`: out
/// of attempts, or a permanent failure: the row goes `dead`).
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The row's `_id` as stored.
    pub id: Bson,
    /// Attempts spent toward `maxAttempts` (failures that were not outages).
    pub attempts: i32,
    /// Failed tries during outages (spend no attempt).
    pub outage_retries: i32,
    pub kind: FailureKind,
    /// A short reason label (the failure metric's).
    pub label: &'static str,
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
    /// Rows a request marked for discarding (`discard`), now given up.
    pub discarded: Vec<String>,
}

impl RowChanges {
    pub fn is_empty(&self) -> bool {
        self.failed.is_empty() && self.held.is_empty() && self.published.is_empty() && self.discarded.is_empty()
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
                "status": state.as_str(), "attempts": f.attempts, "outageRetries": f.outage_retries,
                "failureKind": f.kind.as_str(), "failureReason": f.label, "lastError": &f.error,
                "backoffMs": f.backoff_ms, "holdSeq": {"$ifNull": ["$holdSeq", f.hold_seq]},
            };
            match f.retry_at {
                Some(at) => set.insert("nextAttemptAt", at),
                None => set.insert("deadAt", now),
            };
            statements.push(doc! {"q": {"_id": &f.id, "status": {"$ne": "dead"}}, "u": [{"$set": set}]});
        }
        for (id, seq) in &changes.held {
            // Only rows not yet set aside (no status, or `pending` from the
            // first release): a replayed event keeps its place.
            statements.push(doc! {
                "q": {"_id": id, "status": {"$in": [Bson::Null, "pending"]}},
                "u": {"$set": {"status": OutboxStatus::Held.as_str(), "holdSeq": seq}},
            });
        }
        for p in &changes.published {
            statements.push(doc! {
                "q": {"_id": &p.id, "status": {"$in": ["pending", "failed", "held"]}},
                "u": [
                    {"$set": {"status": "published", "publishedAt": now, "partition": p.partition, "offset": p.offset}},
                    {"$unset": ["lastError", "backoffMs", "nextAttemptAt", "holdSeq", "failureKind", "failureReason"]},
                ],
            });
        }
        for id in &changes.discarded {
            statements.push(doc! {
                "q": {"_id": id, "status": {"$in": ["failed", "held"]}, "discard": {"$exists": true}},
                "u": [
                    {"$set": {"status": OutboxStatus::Discarded.as_str()}},
                    {"$unset": ["nextAttemptAt", "backoffMs", "holdSeq"]},
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
                let mut matched = 0;
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
                    matched += reply.get_i32("n").map_or(0, |n| n as usize);
                }
                if matched < statements.len() {
                    // Some matched nothing: fine where the row is already in
                    // that state (a replay), an error where it is not there.
                    self.check_rows_exist(&mut session, &statements).await?;
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

    /// Refuse (an error naming them) when rows that `statements` mark do
    /// not exist: a mark that matches nothing must never pass for done, or
    /// the checkpoint would move past an event that keeps no status.
    async fn check_rows_exist(
        &self,
        session: &mut ClientSession,
        statements: &[Document],
    ) -> mongodb::error::Result<()> {
        let ids: Vec<Bson> = statements.iter().filter_map(|s| s.get_document("q").ok()?.get("_id").cloned()).collect();
        let found: Vec<Document> = self
            .collection()
            .clone_with_type::<Document>()
            .find(doc! {"_id": {"$in": &ids}})
            .projection(doc! {"_id": 1})
            .session(&mut *session)
            .await?
            .stream(session)
            .try_collect()
            .await?;
        let found: Vec<&Bson> = found.iter().filter_map(|d| d.get("_id")).collect();
        let missing: Vec<String> = ids.iter().filter(|id| !found.contains(id)).map(ToString::to_string).collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(mongodb::error::Error::custom(format!(
            "outbox rows {} are not in the outbox (deleted by another writer?): their failure or hold cannot be \
             recorded, so the relay does not move past them",
            missing.join(", ")
        )))
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

    /// Delete published history: rows created before `before_id` (an event
    /// id bound from the retention, see [`first_id_of_millisecond`]) that
    /// were already committed at cluster time `committed_before`, read in a
    /// snapshot at that time. The caller passes a time every commit before
    /// which is published (its checkpoint's position), so a row the relay
    /// has not read yet is never deleted, whatever clock its writer has.
    /// Rows with a status other than `published` (set aside, or `pending`
    /// from the first release) are never deleted. At most `limit` rows.
    /// A time older than the server keeps snapshots for is refused
    /// (SnapshotTooOld): nothing is deleted then.
    pub async fn delete_published(
        &self,
        before_id: &str,
        committed_before: Timestamp,
        limit: i64,
    ) -> mongodb::error::Result<u64> {
        let published = doc! {"$or": [{"status": {"$exists": false}}, {"status": "published"}]};
        let mut filter = self.range().restrict(doc! {"_id": {"$lt": before_id}});
        filter.extend(published.clone());
        let client = self.database().client();
        let mut snapshot = client.start_session().snapshot(true).snapshot_time(committed_before).await?;
        let ids: Vec<Document> = self
            .collection()
            .clone_with_type::<Document>()
            .find(filter)
            .projection(doc! {"_id": 1})
            .limit(limit)
            .session(&mut snapshot)
            .await?
            .stream(&mut snapshot)
            .try_collect()
            .await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&Bson> = ids.iter().filter_map(|d| d.get("_id")).collect();
        // Still published now: a row set aside since is kept.
        let mut now = doc! {"_id": {"$in": ids}};
        now.extend(published);
        Ok(self.collection().delete_many(now).await?.deleted_count)
    }

    /// The recovery scan: rows that may not have been published (no status,
    /// or `pending` from the first release), each aggregate's in its own
    /// order (`aggregateVersion`; the event id only breaks ties and orders
    /// rows written without a version). Read with the majority read concern
    /// in `session`, a causally consistent session whose operation time is
    /// the recovery's start position: the read waits until the majority
    /// snapshot has reached it, so every commit before the position is seen
    /// (the change stream brings every commit from it on).
    pub async fn unconfirmed_rows(
        &self,
        session: &mut ClientSession,
    ) -> mongodb::error::Result<SessionCursor<RawDocumentBuf>> {
        let filter = doc! {"$or": [{"status": {"$exists": false}}, {"status": "pending"}]};
        self.collection()
            .clone_with_type::<RawDocumentBuf>()
            .find(self.range().restrict(filter))
            .sort(doc! {"aggregateId": 1, "aggregateVersion": 1, "_id": 1})
            .allow_disk_use(true)
            .read_concern(majority())
            .session(session)
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
