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

/// Index names earlier versions created and this one replaces.
const OBSOLETE_INDEXES: [&str; 2] = ["status_order", "aggregate_order"];

/// The indexes the relay's queries need (besides `_id`). All but `_id` are
/// partial: a row that is published (nearly all of them, once the relay
/// keeps up) sits in `_id` and `retention` only, so marking it published
/// removes one index entry instead of rewriting three.
/// - `unpublished`: pending, failed and dead rows in event-id (= creation)
///   order: the claim query and the status counts;
/// - `due`: failed rows by retry time;
/// - `blocking`: an aggregate's failed and dead rows (per-aggregate order);
/// - `retention` (with a retention period): TTL on `publishedAt`, which is
///   also how the newest publication is found.
pub fn query_indexes(retention: Option<Duration>) -> Vec<IndexModel> {
    let partial = |keys: Document, name: &str, filter: Document| {
        let options = IndexOptions::builder().name(name.to_owned()).partial_filter_expression(filter).build();
        IndexModel::builder().keys(keys).options(options).build()
    };
    let mut indexes = vec![
        partial(doc! {"status": 1, "_id": 1}, "unpublished", doc! {"status": {"$in": ["pending", "failed", "dead"]}}),
        partial(doc! {"nextAttemptAt": 1}, "due", doc! {"status": "failed"}),
        partial(doc! {"aggregateId": 1, "_id": 1}, "blocking", doc! {"status": {"$in": ["failed", "dead"]}}),
    ];
    if let Some(retention) = retention {
        let options = IndexOptions::builder()
            .name(RETENTION_INDEX.to_owned())
            .expire_after(retention)
            .partial_filter_expression(doc! {"publishedAt": {"$exists": true}})
            .build();
        indexes.push(IndexModel::builder().keys(doc! {"publishedAt": 1}).options(options).build());
    }
    indexes
}

/// What [`Outbox::ensure_indexes`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IndexChanges {
    pub created: Vec<String>,
    /// Dropped: obsolete, or replaced because the definition changed.
    pub dropped: Vec<String>,
    /// TTL changed in place.
    pub retuned: Vec<String>,
}

impl IndexChanges {
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.dropped.is_empty() && self.retuned.is_empty()
    }
}

fn name_of(index: &IndexModel) -> String {
    index.options.as_ref().and_then(|o| o.name.clone()).unwrap_or_default()
}

/// Same keys and partial filter: the index can stay (its TTL may still
/// need retuning).
fn same_definition(a: &IndexModel, b: &IndexModel) -> bool {
    let partial = |i: &IndexModel| i.options.as_ref().and_then(|o| o.partial_filter_expression.clone());
    let ttl = |i: &IndexModel| i.options.as_ref().and_then(|o| o.expire_after).is_some();
    a.keys == b.keys && partial(a) == partial(b) && ttl(a) == ttl(b)
}

fn ignore_code(result: mongodb::error::Result<()>, code: i32) -> mongodb::error::Result<()> {
    match result {
        Err(e) if matches!(*e.kind, mongodb::error::ErrorKind::Command(ref c) if c.code == code) => Ok(()),
        other => other,
    }
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
    /// to create it) and bring its indexes to [`query_indexes`]: create the
    /// missing ones, replace those defined differently (earlier versions),
    /// drop obsolete ones, and retune the TTL in place. Without `retention`
    /// an existing retention index is left alone (the relay owns it).
    pub async fn ensure_indexes(&self, retention: Option<Duration>) -> mongodb::error::Result<IndexChanges> {
        let name = self.collection.name().to_owned();
        if !self.db.list_collection_names().filter(doc! {"name": &name}).await?.contains(&name) {
            // NamespaceExists (48): another process created it first.
            ignore_code(self.db.create_collection(&name).await, 48)?;
        }
        let mut existing = Vec::new();
        let mut cursor = self.collection.list_indexes().await?;
        while cursor.advance().await? {
            existing.push(cursor.deserialize_current()?);
        }
        let mut changes = IndexChanges::default();
        let mut missing = Vec::new();
        for wanted in query_indexes(retention) {
            let wanted_name = name_of(&wanted);
            match existing.iter().find(|i| name_of(i) == wanted_name) {
                Some(current) if same_definition(current, &wanted) => {
                    let ttl = |i: &IndexModel| i.options.as_ref().and_then(|o| o.expire_after).map(|d| d.as_secs());
                    if let Some(seconds) = ttl(&wanted).filter(|s| ttl(current) != Some(*s)) {
                        self.db
                            .run_command(doc! {
                                "collMod": &name,
                                "index": {"name": &wanted_name, "expireAfterSeconds": i64::try_from(seconds).unwrap_or(i64::MAX)},
                            })
                            .await?;
                        changes.retuned.push(wanted_name);
                    }
                }
                Some(_) => {
                    // IndexNotFound (27): another process dropped it first.
                    ignore_code(self.collection.drop_index(&wanted_name).await, 27)?;
                    changes.dropped.push(wanted_name.clone());
                    missing.push(wanted);
                }
                None => missing.push(wanted),
            }
        }
        for obsolete in OBSOLETE_INDEXES {
            if existing.iter().any(|i| name_of(i) == obsolete) {
                ignore_code(self.collection.drop_index(obsolete).await, 27)?;
                changes.dropped.push(obsolete.to_owned());
            }
        }
        if !missing.is_empty() {
            changes.created.extend(missing.iter().map(name_of));
            self.collection.create_indexes(missing).await?;
        }
        if !changes.is_empty() {
            tracing::info!(collection = %name, created = ?changes.created, dropped = ?changes.dropped,
                retuned = ?changes.retuned, "outbox indexes brought up to date");
        }
        Ok(changes)
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
