//! A lease as a document in MongoDB (`outbox_leases`, `_id` = the lease
//! name, the same name a Kubernetes Lease would have). The holder renews it
//! by bumping `version` (compare-and-set); a standby takes it once it has
//! seen the same version for the lease duration (see [`super::Observer`]).
//! Relays use it when no Kubernetes cluster is configured.

use std::time::{Duration, Instant};

use mongodb::{
    Collection, Database,
    bson::{DateTime, Document, doc},
};

use super::Observer;
use crate::db::is_duplicate_key;

pub struct MongoLease {
    coll: Collection<Document>,
    name: String,
    holder: String,
    ttl: Duration,
    observer: Observer,
}

impl MongoLease {
    pub fn new(db: &Database, lease_name: &str, holder: &str, ttl: Duration) -> Self {
        Self {
            coll: db.collection("outbox_leases"),
            name: lease_name.to_owned(),
            holder: holder.to_owned(),
            ttl,
            observer: Observer::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// Note `holder`'s record `d` on this lease's observer: true once it has
    /// stood unrenewed (same version) for its duration.
    fn expired(&self, d: &Document, holder: &str) -> bool {
        let version = d.get_i64("version").unwrap_or(0);
        let ttl = d.get_i64("ttlMs").ok().and_then(|ms| u64::try_from(ms).ok()).map_or(self.ttl, Duration::from_millis);
        self.observer.expired(&format!("{holder}/{version}"), Instant::now(), ttl)
    }

    /// Take or renew the lease. `Ok(false)`: another relay holds it. The
    /// caller counts a won lease from the moment it called this.
    pub async fn acquire(&self) -> mongodb::error::Result<bool> {
        let Some(d) = self.coll.find_one(doc! {"_id": &self.name}).await? else {
            let fresh = doc! {"_id": &self.name, "holder": &self.holder, "version": 1_i64, "ttlMs": self.ttl_ms(),
            "renewedAt": DateTime::now()};
            return match self.coll.insert_one(fresh).await {
                Ok(_) => Ok(true),
                Err(e) if is_duplicate_key(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let holder = d.get_str("holder").unwrap_or("");
        let version = d.get_i64("version").unwrap_or(0);
        if holder != self.holder && !holder.is_empty() {
            if !self.expired(&d, holder) {
                return Ok(false);
            }
            tracing::info!(lease = %self.name, previous = holder, "taking over a lease unrenewed for its whole duration");
        }
        let r = self
            .coll
            .update_one(
                doc! {"_id": &self.name, "version": version, "holder": holder},
                doc! {"$set": {"holder": &self.holder, "version": version + 1, "ttlMs": self.ttl_ms(),
                "renewedAt": DateTime::now()}},
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Give the lease up (graceful shutdown), so a standby takes over at once.
    pub async fn release(&self) -> mongodb::error::Result<()> {
        self.coll
            .update_one(
                doc! {"_id": &self.name, "holder": &self.holder},
                doc! {"$set": {"holder": ""}, "$inc": {"version": 1_i64}},
            )
            .await
            .map(|_| ())
    }

    /// The holder as recorded; another holder's record is noted by this
    /// lease's [`Observer`] (see [`super::Lease::note_holder`]).
    pub async fn note_holder(&self) -> mongodb::error::Result<Option<String>> {
        let Some(d) = self.coll.find_one(doc! {"_id": &self.name}).await? else { return Ok(None) };
        let holder = d.get_str("holder").unwrap_or("");
        if holder.is_empty() {
            return Ok(None);
        }
        if holder != self.holder {
            self.expired(&d, holder);
        }
        Ok(Some(holder.to_owned()))
    }

    /// The current holder as recorded (informational: whether it is still
    /// live is for a standby's [`Observer`] to tell).
    pub async fn holder(&self) -> mongodb::error::Result<Option<String>> {
        let Some(d) = self.coll.find_one(doc! {"_id": &self.name}).await? else { return Ok(None) };
        Ok(d.get_str("holder").ok().filter(|h| !h.is_empty()).map(str::to_owned))
    }
}
