//! The outbox collection: its indexes and the transactional append.

use std::time::Duration;

use mongodb::{
    ClientSession, Collection, Database, IndexModel,
    bson::{Document, doc},
    options::IndexOptions,
};

use super::document::OutboxDocument;

/// Name of the TTL index on `publishedAt` that enforces retention.
pub const RETENTION_INDEX: &str = "retention";

/// The indexes the relay's queries need (besides `_id`):
/// - `due`: failed rows by due time (retries), and status counts;
/// - `status_order`: rows of a status in event-id (= creation) order, the
///   claim query for pending rows;
/// - `aggregate_order`: an aggregate's rows in order (per-aggregate blocking).
pub fn query_indexes() -> Vec<IndexModel> {
    let named = |keys: Document, name: &str| {
        IndexModel::builder().keys(keys).options(IndexOptions::builder().name(name.to_owned()).build()).build()
    };
    vec![
        named(doc! {"status": 1, "nextAttemptAt": 1}, "due"),
        named(doc! {"status": 1, "_id": 1}, "status_order"),
        named(doc! {"aggregateId": 1, "_id": 1}, "aggregate_order"),
    ]
}

/// Handle on one outbox collection.
#[derive(Clone)]
pub struct Outbox {
    db: Database,
    collection: Collection<OutboxDocument>,
}

impl Outbox {
    pub fn new(db: &Database, collection: &str) -> Self {
        Self { db: db.clone(), collection: db.collection(collection) }
    }

    pub fn collection(&self) -> &Collection<OutboxDocument> {
        &self.collection
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Create the collection (so concurrent first transactions do not race
    /// to create it) and the query indexes; with `retention`, also the TTL
    /// index on `publishedAt`, changing its expiry in place if it differs.
    pub async fn ensure_indexes(&self, retention: Option<Duration>) -> mongodb::error::Result<()> {
        let name = self.collection.name().to_owned();
        if !self.db.list_collection_names().filter(doc! {"name": &name}).await?.contains(&name) {
            match self.db.create_collection(&name).await {
                Ok(()) => {}
                // NamespaceExists: another process created it first.
                Err(e) if matches!(*e.kind, mongodb::error::ErrorKind::Command(ref c) if c.code == 48) => {}
                Err(e) => return Err(e),
            }
        }
        self.collection.create_indexes(query_indexes()).await?;
        if let Some(retention) = retention {
            self.ensure_retention(retention).await?;
        }
        Ok(())
    }

    async fn ensure_retention(&self, retention: Duration) -> mongodb::error::Result<()> {
        let seconds = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
        let mut cursor = self.collection.list_indexes().await?;
        let mut existing = None;
        while cursor.advance().await? {
            let index = cursor.deserialize_current()?;
            if index.options.as_ref().and_then(|o| o.name.as_deref()) == Some(RETENTION_INDEX) {
                existing = index.options.and_then(|o| o.expire_after).map(|d| d.as_secs());
            }
        }
        match existing {
            Some(current) if current == retention.as_secs() => Ok(()),
            Some(_) => {
                self.db
                    .run_command(doc! {
                        "collMod": self.collection.name(),
                        "index": {"name": RETENTION_INDEX, "expireAfterSeconds": seconds},
                    })
                    .await?;
                Ok(())
            }
            None => {
                let options = IndexOptions::builder().name(RETENTION_INDEX.to_owned()).expire_after(retention).build();
                let model = IndexModel::builder().keys(doc! {"publishedAt": 1}).options(options).build();
                self.collection.create_index(model).await.map(|_| ())
            }
        }
    }

    /// Append rows inside the caller's transaction: they commit or vanish
    /// together with the caller's own writes.
    pub async fn append(&self, session: &mut ClientSession, rows: &[OutboxDocument]) -> mongodb::error::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.collection.insert_many(rows).session(session).await.map(|_| ())
    }
}
