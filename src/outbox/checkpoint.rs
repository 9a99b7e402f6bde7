//! The relay's checkpoint: how far the change stream of one outbox has been
//! published, and the fence that keeps a stale relay from writing.
//!
//! One document per outbox in `outbox_relay_checkpoints` (in the outbox's
//! database, `_id` = the outbox collection), or one per bucket range of a
//! sharded outbox (`<collection>#r<i>of<n>`). A relay that takes the outbox
//! lease bumps `epoch` (a fencing token); every write it makes afterwards
//! (the checkpoint, and the per-row marks of failed and held events) is
//! conditional on that epoch, so once a newer relay has claimed the outbox,
//! the older one's writes are refused and it stops. The document also names
//! the lease its holder holds (store, namespace, name): a relay holding
//! another lease for the same outbox (a MongoDB lease outside the cluster, a
//! Kubernetes Lease in another namespace) cannot claim it while the holder
//! is active, so two leases never mean two publishers.

use std::time::Duration;

use mongodb::{
    ClientSession, Collection, Database,
    bson::{self, DateTime, Document, doc},
    change_stream::event::ResumeToken,
    options::{ReturnDocument, WriteConcern},
};

use super::bucket::BucketRange;

async fn stored(coll: &Collection<Document>, outbox: &str) -> mongodb::error::Result<Vec<(String, Checkpoint)>> {
    use futures::TryStreamExt;
    let pattern = format!("^{}#r[0-9]+of[0-9]+$", regex_escape(outbox));
    let docs: Vec<Document> =
        coll.find(doc! {"$or": [{"_id": outbox}, {"_id": {"$regex": pattern}}]}).await?.try_collect().await?;
    Ok(docs.iter().map(|d| (d.get_str("_id").unwrap_or_default().to_owned(), from_document(d))).collect())
}

/// A resume token's position as a string that sorts like the position
/// (the server's `_data`, hex of an order-preserving key string).
fn token_order(token: &ResumeToken) -> Option<String> {
    match bson::to_bson(token).ok()? {
        bson::Bson::Document(d) => d.get_str("_data").ok().map(str::to_owned),
        _ => None,
    }
}

/// The cluster time a resume token's `_data` starts with: a key-string
/// timestamp (type byte 0x82, then seconds and increment, big-endian).
fn token_time(data: &str) -> Option<bson::Timestamp> {
    let hex = data.get(..18)?;
    if !hex.starts_with("82") {
        return None;
    }
    let time = u32::from_str_radix(&hex[2..10], 16).ok()?;
    let increment = u32::from_str_radix(&hex[10..18], 16).ok()?;
    Some(bson::Timestamp { time, increment })
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// Collection holding one checkpoint per outbox.
pub const CHECKPOINTS: &str = "outbox_relay_checkpoints";

/// A claim on the outbox: the epoch every write of this relay carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub epoch: i64,
    pub holder: String,
}

/// Why the change stream had to be replaced by a scan of the collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryReason {
    /// No checkpoint: the first relay v2 on this outbox (rows may predate it).
    FirstStart,
    /// The stream cannot resume from the checkpoint's token (no longer in
    /// the oplog, or refused by the server).
    HistoryLost,
}

impl RecoveryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryReason::FirstStart => "FirstStart",
            RecoveryReason::HistoryLost => "HistoryLost",
        }
    }
}

/// The checkpoint as stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
    pub epoch: i64,
    pub holder: Option<String>,
    /// The lease the holder holds, e.g. `kubernetes Lease ns/name`.
    pub lease: Option<String>,
    /// Where the change stream resumes; `None` before the first save.
    pub token: Option<ResumeToken>,
    /// Where the stream starts while no token is saved yet: the start of
    /// the last recovery scan, or, for a range first relayed under another
    /// split, that split's oldest position (see `first_document`).
    pub start_at: Option<bson::Timestamp>,
    /// The last event published through the stream.
    pub last_event_id: Option<String>,
    /// Its `occurredOn` (writer clock): bounds what cleanup may delete.
    pub last_occurred_on: Option<DateTime>,
    /// When the checkpoint was last saved (server clock).
    pub saved_at: Option<DateTime>,
    /// Events published since the outbox was first relayed.
    pub published: i64,
    /// The last recovery: reason, when, and how many rows it republished.
    pub recovery: Option<(String, DateTime, i64)>,
}

impl Checkpoint {
    /// The cluster time the checkpoint's position stands at: every outbox
    /// commit before it is published or set aside. `None` before the first
    /// position is saved.
    pub fn position_time(&self) -> Option<bson::Timestamp> {
        match &self.token {
            Some(token) => token_time(&token_order(token)?),
            None => self.start_at,
        }
    }
}

fn from_document(d: &Document) -> Checkpoint {
    let string = |k: &str| d.get_str(k).ok().map(str::to_owned);
    let recovery = d.get_document("recovery").ok().and_then(|r| {
        Some((r.get_str("reason").ok()?.to_owned(), *r.get_datetime("at").ok()?, r.get_i64("rows").unwrap_or(0)))
    });
    Checkpoint {
        epoch: d.get_i64("epoch").unwrap_or(0),
        holder: string("holder"),
        lease: string("lease"),
        token: d.get("token").and_then(|t| bson::from_bson(t.clone()).ok()),
        start_at: d.get_timestamp("startAt").ok(),
        last_event_id: string("lastEventId"),
        last_occurred_on: d.get_datetime("lastOccurredOn").ok().copied(),
        saved_at: d.get_datetime("savedAt").ok().copied(),
        published: d.get_i64("published").unwrap_or(0),
        recovery,
    }
}

/// What a batch moved the checkpoint to.
#[derive(Debug, Clone)]
pub struct Progress {
    pub token: ResumeToken,
    /// The batch's last event (none for an idle advance of the token).
    pub last_event: Option<(String, DateTime)>,
    /// Events the batch published.
    pub published: i64,
}

/// Why a claim or a write was refused.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("a newer relay ({holder}, epoch {epoch}) has claimed the outbox; this relay's writes are refused")]
    Fenced { holder: String, epoch: i64 },
    #[error(
        "the outbox is relayed by {holder}, holding the {lease}; this relay holds the {mine} and stays standby \
         (one lease per outbox: run every relay of an outbox with the same lease)"
    )]
    OtherLease { holder: String, lease: String, mine: String },
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
}

/// The checkpoint of one outbox.
#[derive(Clone)]
pub struct Checkpoints {
    coll: Collection<Document>,
    key: String,
    outbox: String,
    /// Ranges of the split this checkpoint belongs to (1: unsharded).
    ranges: u32,
}

impl Checkpoints {
    pub fn new(db: &Database, outbox_collection: &str) -> Self {
        Self::for_range(db, outbox_collection, &BucketRange::whole())
    }

    /// The checkpoint of one bucket range of the outbox (the outbox's own
    /// for the whole range).
    pub fn for_range(db: &Database, outbox_collection: &str, range: &BucketRange) -> Self {
        let key = match range.tag() {
            Some(tag) => format!("{outbox_collection}#{tag}"),
            None => outbox_collection.to_owned(),
        };
        Self { coll: db.collection(CHECKPOINTS), key, outbox: outbox_collection.to_owned(), ranges: range.count.max(1) }
    }

    /// The document a first claim creates. When the outbox was relayed
    /// under another split before (checkpoints of other ranges), it starts
    /// above every epoch of those (the positions it hands out sort after
    /// theirs in a backlog) and, if one earlier split has a token for each
    /// of its ranges, at the cluster time of the oldest of those tokens:
    /// every event from then on is read again (duplicates), none before it
    /// is unpublished. (A time, not the token: the server refuses to resume
    /// a filtered stream after an event its filter drops.) Without such a
    /// split it has neither: a first start, recovered by a scan.
    async fn first_document(&self) -> mongodb::error::Result<Document> {
        let mut d = doc! {"_id": &self.key, "epoch": 0_i64, "published": 0_i64};
        let others = stored(&self.coll, &self.outbox).await?;
        let split_of = |key: &str| -> u32 {
            key.rsplit_once("of").and_then(|(_, n)| n.parse().ok()).filter(|_| key != self.outbox).unwrap_or(1)
        };
        let others: Vec<(u32, Checkpoint)> =
            others.into_iter().map(|(k, c)| (split_of(&k), c)).filter(|(n, _)| *n != self.ranges).collect();
        // Epochs never go back, even when a checkpoint was deleted: the
        // positions set-aside rows keep (`holdSeq`, the epoch in its high
        // bits) order an aggregate's backlog, so a claim must hand out
        // positions above every one stored.
        let stored_epoch = self.highest_stored_epoch().await?;
        if let Some(epoch) = others.iter().map(|(_, c)| c.epoch).chain([stored_epoch]).max() {
            d.insert("epoch", epoch);
        }
        // The oldest position of the splits with a position for every range.
        let mut oldest: Option<bson::Timestamp> = None;
        let splits: std::collections::BTreeSet<u32> = others.iter().map(|(n, _)| *n).collect();
        for n in splits {
            let positions: Vec<bson::Timestamp> =
                others.iter().filter(|(m, _)| *m == n).filter_map(|(_, c)| c.position_time()).collect();
            if u32::try_from(positions.len()).ok() == Some(n) {
                oldest = oldest.into_iter().chain(positions).min();
            }
        }
        if let Some(at) = oldest {
            d.insert("startAt", at);
            if let Some(at) = others.iter().filter_map(|(_, c)| c.last_occurred_on).min() {
                d.insert("lastOccurredOn", at);
            }
            d.insert("seededFrom", "another split's checkpoints");
        }
        Ok(d)
    }

    /// The highest epoch in the positions (`holdSeq`) the outbox's
    /// set-aside rows keep (0 without any), through the partial `blocking`
    /// index (set-aside rows only).
    async fn highest_stored_epoch(&self) -> mongodb::error::Result<i64> {
        let outbox = self.coll.client().database(&self.coll.namespace().db).collection::<Document>(&self.outbox);
        let highest = outbox
            .find_one(doc! {"status": {"$in": ["failed", "held", "dead"]}, "holdSeq": {"$type": "long"}})
            .sort(doc! {"holdSeq": -1})
            .projection(doc! {"holdSeq": 1})
            .hint(mongodb::options::Hint::Name(super::store::BLOCKING_INDEX.into()))
            .await?;
        Ok(highest.and_then(|d| d.get_i64("holdSeq").ok()).map_or(0, |seq| seq >> 40))
    }

    /// Every checkpoint of the outbox: the unsharded one and those of each
    /// range of any split, as stored.
    pub async fn all(db: &Database, outbox_collection: &str) -> mongodb::error::Result<Vec<(String, Checkpoint)>> {
        stored(&db.collection(CHECKPOINTS), outbox_collection).await
    }

    pub async fn load(&self) -> mongodb::error::Result<Option<Checkpoint>> {
        Ok(self.coll.find_one(doc! {"_id": &self.key}).await?.as_ref().map(from_document))
    }

    async fn refusal(&self, fence_epoch: i64) -> CheckpointError {
        match self.load().await {
            Ok(Some(c)) => CheckpointError::Fenced { holder: c.holder.unwrap_or_default(), epoch: c.epoch },
            Ok(None) => CheckpointError::Fenced { holder: "nobody".into(), epoch: fence_epoch },
            Err(e) => e.into(),
        }
    }

    /// Claim the outbox for `holder` (just after taking `lease`): bump the
    /// epoch. Refused while a relay holding another lease has saved within
    /// `active_window` (server clock on both sides of the compare).
    pub async fn claim(&self, holder: &str, lease: &str, active_window: Duration) -> Result<Fence, CheckpointError> {
        let window_ms = i64::try_from(active_window.as_millis()).unwrap_or(i64::MAX);
        let filter = doc! {"_id": &self.key, "$or": [
            {"lease": lease},
            {"lease": {"$exists": false}},
            {"$expr": {"$lt": ["$savedAt", {"$subtract": ["$$NOW", window_ms]}]}},
        ]};
        let update = vec![doc! {"$set": {
            "epoch": {"$add": [{"$ifNull": ["$epoch", 0_i64]}, 1_i64]},
            "holder": holder,
            "lease": lease,
            "savedAt": "$$NOW",
            "claimedAt": "$$NOW",
        }}];
        // The document first (an upsert cannot carry the `$expr` above).
        if self.load().await?.is_none() {
            match self.coll.insert_one(self.first_document().await?).await {
                Err(e) if !crate::db::is_duplicate_key(&e) => return Err(e.into()),
                _ => {}
            }
        }
        let claimed = self.coll.find_one_and_update(filter, update).return_document(ReturnDocument::After).await?;
        match claimed {
            Some(d) => Ok(Fence { epoch: d.get_i64("epoch").unwrap_or(1), holder: holder.to_owned() }),
            // The filter refused it: a relay holding another lease is active.
            None => {
                let c = self.load().await?.unwrap_or_default();
                Err(CheckpointError::OtherLease {
                    holder: c.holder.unwrap_or_default(),
                    lease: c.lease.unwrap_or_default(),
                    mine: lease.to_owned(),
                })
            }
        }
    }

    /// Save a batch's progress, if `fence` is still the current claim.
    pub async fn save(&self, fence: &Fence, progress: &Progress) -> Result<(), CheckpointError> {
        let token = bson::to_bson(&progress.token).map_err(mongodb::error::Error::custom)?;
        let mut set = doc! {"token": token, "savedAt": DateTime::now()};
        if let Some((id, occurred_on)) = &progress.last_event {
            set.insert("lastEventId", id);
            set.insert("lastOccurredOn", *occurred_on);
        }
        let r = self
            .coll
            .update_one(
                doc! {"_id": &self.key, "epoch": fence.epoch},
                doc! {"$set": set, "$inc": {"published": progress.published}},
            )
            .await?;
        if r.matched_count == 0 {
            return Err(self.refusal(fence.epoch).await);
        }
        Ok(())
    }

    /// Add events published off the stream (retries, recovery scans) to
    /// the published total (fenced like `save`).
    pub async fn count_published(&self, fence: &Fence, n: i64) -> Result<(), CheckpointError> {
        let r = self
            .coll
            .update_one(doc! {"_id": &self.key, "epoch": fence.epoch}, doc! {"$inc": {"published": n}})
            .await?;
        if r.matched_count == 0 {
            return Err(self.refusal(fence.epoch).await);
        }
        Ok(())
    }

    /// The start of a recovery: a fenced majority write on the checkpoint
    /// in a new causally consistent session, whose operation time is
    /// returned with it. That time is majority-committed, so a change
    /// stream started at it and a majority read in the session (which waits
    /// for the majority snapshot to reach it) together see every commit:
    /// the read those before, the stream those from it on.
    pub async fn recovery_start(
        &self,
        fence: &Fence,
        reason: RecoveryReason,
    ) -> Result<(ClientSession, bson::Timestamp), CheckpointError> {
        let mut session = self.coll.client().start_session().causal_consistency(true).await?;
        let r = self
            .coll
            .update_one(
                doc! {"_id": &self.key, "epoch": fence.epoch},
                doc! {"$set": {"recoveryStarted": {"reason": reason.as_str(), "at": DateTime::now()}}},
            )
            .write_concern(WriteConcern::majority())
            .session(&mut session)
            .await?;
        if r.matched_count == 0 {
            return Err(self.refusal(fence.epoch).await);
        }
        let at = session
            .operation_time()
            .ok_or_else(|| mongodb::error::Error::custom("the server returned no operation time for a write"))?;
        Ok((session, at))
    }

    /// Record a recovery scan that republished `rows` rows, the last
    /// (highest id) being `last_event`: the stream goes on from `start_at`,
    /// the recovery's start (fenced like `save`).
    pub async fn save_recovery(
        &self,
        fence: &Fence,
        reason: RecoveryReason,
        rows: i64,
        last_event: Option<(String, DateTime)>,
        start_at: bson::Timestamp,
    ) -> Result<(), CheckpointError> {
        let mut set = doc! {
            "startAt": start_at,
            "savedAt": DateTime::now(),
            "recovery": {"reason": reason.as_str(), "at": DateTime::now(), "rows": rows},
        };
        if let Some((id, occurred_on)) = last_event {
            set.insert("lastEventId", id);
            set.insert("lastOccurredOn", occurred_on);
        }
        let r = self
            .coll
            .update_one(
                doc! {"_id": &self.key, "epoch": fence.epoch},
                doc! {"$set": set, "$unset": {"token": "", "recoveryStarted": ""}},
            )
            .await?;
        if r.matched_count == 0 {
            return Err(self.refusal(fence.epoch).await);
        }
        Ok(())
    }

    /// Inside `session`'s transaction: refuse the transaction unless
    /// `fence` is still the current claim. Touching the checkpoint makes a
    /// concurrent claim conflict with this transaction, so the two cannot
    /// both commit.
    pub async fn check_in(&self, session: &mut ClientSession, fence: &Fence) -> Result<(), CheckpointError> {
        let r = self
            .coll
            .update_one(
                doc! {"_id": &self.key, "epoch": fence.epoch},
                doc! {"$set": {"fencedWriteAt": DateTime::now()}},
            )
            .session(session)
            .await?;
        if r.matched_count == 0 {
            return Err(self.refusal(fence.epoch).await);
        }
        Ok(())
    }

    /// Give the claim up at a clean shutdown (the epoch stays: the next
    /// claim bumps it).
    pub async fn release(&self, fence: &Fence) -> mongodb::error::Result<()> {
        self.coll
            .update_one(doc! {"_id": &self.key, "epoch": fence.epoch}, doc! {"$set": {"holder": ""}})
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_tokens_cluster_time_is_read_from_its_data() {
        // A token as MongoDB 8 wrote it in this project's tests.
        let data = "826B04CC9E0000028E2B022C0100296E5A100420CE16C992284CDF8D1C12BB7E6B04EC463C5F6964003C30";
        assert_eq!(token_time(data), Some(bson::Timestamp { time: 0x6B04_CC9E, increment: 0x28E }));
        assert_eq!(token_time("00"), None);
        assert_eq!(token_time("99000000000000000000"), None, "not a timestamp first");
    }

    #[test]
    fn outbox_names_are_matched_literally() {
        assert_eq!(regex_escape("out.box$1"), "out\\.box\\$1");
    }
}
