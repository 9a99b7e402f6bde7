//! The processed-events store: which events a consumer group has already
//! applied (`processed_events`, `_id` = `<scope>/<eventId>`, the scope
//! being the group's id or a projection generation's, expiring after the
//! retention). Consumers skip what it holds; the operator counts it for
//! `EventConsumer` status.

use std::{collections::HashSet, time::Duration};

use futures::TryStreamExt;

use mongodb::{
    Collection, Database, IndexModel,
    bson::{DateTime, Document, doc},
    error::ErrorKind,
    options::IndexOptions,
};

use crate::db::is_duplicate_key;

/// MongoDB's code for a write refused by a unique index.
const DUPLICATE_KEY: i32 = 11000;

/// Whether every write error of an unordered insert is a duplicate key.
fn only_duplicates(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::InsertMany(failure) => {
            failure.write_concern_error.is_none()
                && failure.write_errors.as_ref().is_some_and(|w| w.iter().all(|w| w.code == DUPLICATE_KEY))
        }
        _ => is_duplicate_key(e),
    }
}

const RETENTION_INDEX: &str = "retention";

/// MongoDB's code for an index that exists by that name with other options.
const INDEX_OPTIONS_CONFLICT: i32 = 85;

/// Processed events, unique per scope and event id, expiring after the
/// retention. The scope is the consumer group's id, or a projection
/// generation's own scope (its marks commit with its writes).
#[derive(Clone)]
pub struct ProcessedStore {
    coll: Collection<Document>,
    scope: String,
}

impl ProcessedStore {
    pub fn new(db: &Database, scope: &str) -> Self {
        Self { coll: db.collection("processed_events"), scope: scope.to_owned() }
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
        format!("{}/{event_id}", self.scope)
    }

    /// The record of one processed event (to insert inside a handler's
    /// own transaction, with `collection()`).
    pub fn mark_document(&self, event_id: &str, event_name: &str) -> Document {
        doc! {"_id": self.key(event_id), "group": &self.scope, "eventId": event_id,
        "eventName": event_name, "processedAt": DateTime::now()}
    }

    pub fn collection(&self) -> &Collection<Document> {
        &self.coll
    }

    pub async fn is_processed(&self, event_id: &str) -> mongodb::error::Result<bool> {
        Ok(self.coll.find_one(doc! {"_id": self.key(event_id)}).await?.is_some())
    }

    /// Which of `event_ids` are processed (one query).
    pub async fn processed_among(&self, event_ids: &[&str]) -> mongodb::error::Result<HashSet<String>> {
        let keys: Vec<String> = event_ids.iter().map(|id| self.key(id)).collect();
        let found: Vec<Document> =
            self.coll.find(doc! {"_id": {"$in": keys}}).projection(doc! {"eventId": 1}).await?.try_collect().await?;
        Ok(found.into_iter().filter_map(|d| d.get_str("eventId").ok().map(str::to_owned)).collect())
    }

    /// Record events as processed with one bulk write (`mark_document`s);
    /// those that already were are left as they are.
    pub async fn insert_marks(&self, marks: Vec<Document>) -> mongodb::error::Result<()> {
        if marks.is_empty() {
            return Ok(());
        }
        match self.coll.insert_many(marks).ordered(false).await {
            Ok(_) => Ok(()),
            Err(e) if only_duplicates(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn count(&self) -> mongodb::error::Result<u64> {
        self.coll.count_documents(doc! {"group": &self.scope}).await
    }
}
