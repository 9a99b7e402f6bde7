//! A lease as a document in MongoDB (`outbox_leases`, `_id` = the lease
//! name, the same name a Kubernetes Lease would have). The holder renews
//! it; a standby takes it once it has expired. Relays use it when no
//! Kubernetes cluster is configured.

use crate::db::is_duplicate_key;
use std::time::Duration;

use mongodb::{
    Collection, Database,
    bson::{DateTime, Document, doc},
};

pub struct MongoLease {
    coll: Collection<Document>,
    name: String,
    holder: String,
    ttl: Duration,
}

impl MongoLease {
    pub fn new(db: &Database, lease_name: &str, holder: &str, ttl: Duration) -> Self {
        Self { coll: db.collection("outbox_leases"), name: lease_name.to_owned(), holder: holder.to_owned(), ttl }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Take or renew the lease. `Ok(false)`: another relay holds it.
    pub async fn acquire(&self) -> mongodb::error::Result<bool> {
        let now = DateTime::now();
        let until = DateTime::from_millis(now.timestamp_millis() + self.ttl.as_millis() as i64);
        let filter = doc! {"_id": &self.name, "$or": [{"holder": &self.holder}, {"until": {"$lte": now}}]};
        let update = doc! {"$set": {"holder": &self.holder, "until": until, "renewedAt": now}};
        match self.coll.update_one(filter, update).upsert(true).await {
            Ok(_) => Ok(true),
            // The lease exists, held by someone else: the upsert collides on _id.
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up (graceful shutdown), so a standby takes over at once.
    pub async fn release(&self) -> mongodb::error::Result<()> {
        self.coll
            .update_one(doc! {"_id": &self.name, "holder": &self.holder}, doc! {"$set": {"until": DateTime::now()}})
            .await
            .map(|_| ())
    }

    /// The current holder, if the lease is live.
    pub async fn holder(&self) -> mongodb::error::Result<Option<String>> {
        let Some(d) = self.coll.find_one(doc! {"_id": &self.name}).await? else { return Ok(None) };
        let live = d.get_datetime("until").map(|u| *u > DateTime::now()).unwrap_or(false);
        Ok(if live { d.get_str("holder").ok().map(str::to_owned) } else { None })
    }
}
