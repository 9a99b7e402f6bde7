//! The relay's checkpoint: how far the change stream of one outbox has been
//! published, and the fence that keeps a stale relay from writing.
//!
//! One document per outbox in `outbox_relay_checkpoints` (in the outbox's
//! database, `_id` = the outbox collection). A relay that takes the outbox
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
    options::ReturnDocument,
};

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
}

impl Checkpoints {
    pub fn new(db: &Database, outbox_collection: &str) -> Self {
        Self { coll: db.collection(CHECKPOINTS), key: outbox_collection.to_owned() }
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
        match self.coll.insert_one(doc! {"_id": &self.key, "epoch": 0_i64, "published": 0_i64}).await {
            Err(e) if !crate::db::is_duplicate_key(&e) => return Err(e.into()),
            _ => {}
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

    /// Record a recovery scan that republished `rows` rows, the last
    /// (highest id) being `last_event`, and resumes the stream at `token`
    /// (fenced like `save`).
    pub async fn save_recovery(
        &self,
        fence: &Fence,
        reason: RecoveryReason,
        rows: i64,
        last_event: Option<(String, DateTime)>,
        token: &ResumeToken,
    ) -> Result<(), CheckpointError> {
        let token = bson::to_bson(token).map_err(mongodb::error::Error::custom)?;
        let mut set = doc! {
            "token": token,
            "savedAt": DateTime::now(),
            "recovery": {"reason": reason.as_str(), "at": DateTime::now(), "rows": rows},
        };
        if let Some((id, occurred_on)) = last_event {
            set.insert("lastEventId", id);
            set.insert("lastOccurredOn", occurred_on);
        }
        let r = self.coll.update_one(doc! {"_id": &self.key, "epoch": fence.epoch}, doc! {"$set": set}).await?;
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
