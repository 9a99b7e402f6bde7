//! The processed-events store: which events a consumer group has already
//! applied (`processed_events`, `_id` = `<group>/<eventId>`, expiring after
//! the retention). Consumers skip what it holds; the operator counts it for
//! `EventConsumer` status.

use std::time::Duration;

use mongodb::{
    Collection, Database, IndexModel,
    bson::{DateTime, Document, doc},
    error::ErrorKind,
    options::IndexOptions,
};

use crate::db::is_duplicate_key;

const RETENTION_INDEX: &str = "retention";

/// MongoDB's code for an index that exists by that name with other options.
const INDEX_OPTIONS_CONFLICT: i32 = 85;

/// Processed events, unique per consumer group and event id, expiring after
/// the retention.
#[derive(Clone)]
pub struct ProcessedStore {
    coll: Collection<Document>,
    group: String,
}

impl ProcessedStore {
    pub fn new(db: &Database, group: &str) -> Self {
        Self { coll: db.collection("processed_events"), group: group.to_owned() }
    }

    /// Create the retention (TTL) index, or change its expiry to
    /// `retention` when it exists with another (the setting changed).
    pub async fn ensure_indexes(&self, retention: Duration) -> mongodb::error::Result<()> {
        let ttl = IndexOptions::builder().name(RETENTION_INDEX.to_owned()).expire_after(retention).build();
        match self.coll.create_index(IndexModel::builder().keys(doc! {"processedAt": 1}).options(ttl).build()).await {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind.as_ref(), ErrorKind::Command(c) if c.code == INDEX_OPTIONS_CONFLICT) => {
                let seconds = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
                tracing::info!(retention_seconds = seconds, "changing the processed-events retention");
                self.coll
                    .client()
                    .database(&self.coll.namespace().db)
                    .run_command(doc! {
                        "collMod": self.coll.name(),
                        "index": {"name": RETENTION_INDEX, "expireAfterSeconds": seconds},
                    })
                    .await
                    .map(|_| ())
            }
            Err(e) => Err(e),
        }
    }

    pub fn key(&self, event_id: &str) -> String {
        format!("{}/{event_id}", self.group)
    }

    /// The record of one processed event (to insert inside a handler's
    /// own transaction, with `collection()`).
    pub fn mark_document(&self, event_id: &str, event_name: &str) -> Document {
        doc! {"_id": self.key(event_id), "group": &self.group, "eventId": event_id,
        "eventName": event_name, "processedAt": DateTime::now()}
    }

    pub fn collection(&self) -> &Collection<Document> {
        &self.coll
    }

    pub async fn is_processed(&self, event_id: &str) -> mongodb::error::Result<bool> {
        Ok(self.coll.find_one(doc! {"_id": self.key(event_id)}).await?.is_some())
    }

    /// Record an event as processed outside a transaction; `false` if it already was.
    pub async fn mark(&self, event_id: &str, event_name: &str) -> mongodb::error::Result<bool> {
        match self.coll.insert_one(self.mark_document(event_id, event_name)).await {
            Ok(_) => Ok(true),
            Err(err) if is_duplicate_key(&err) => Ok(false),
            Err(err) => Err(err),
        }
    }

    pub async fn count(&self) -> mongodb::error::Result<u64> {
        self.coll.count_documents(doc! {"group": &self.group}).await
    }
}
