//! The outbox collection: its indexes and the transactional append.

use mongodb::{
    ClientSession, Collection, Database, IndexModel,
    bson::{Document, doc},
    options::IndexOptions,
};

use super::{bucket::BucketRange, checkpoint::Checkpoints, document::OutboxDocument};

/// Index names earlier versions created and this one replaces: the first
/// release's, and relay v1's `unpublished` (every row enters it now that
/// new rows carry no status) and `retention` TTL on `publishedAt` (rows
/// published from the stream have none; the relay deletes history itself).
const OBSOLETE_INDEXES: [&str; 4] = ["status_order", "aggregate_order", "unpublished", "retention"];

/// The partial index of every set-aside (failed, held, dead) row: queries
/// on those states name it, since `status` alone has no index.
pub const BLOCKING_INDEX: &str = "blocking";

/// The indexes the relay's queries need (besides `_id`). Both are partial
/// on set-aside rows, so a row published at its first attempt enters no
/// index but `_id`:
/// - `due`: failed rows by retry time;
/// - `blocking`: an aggregate's failed, held and dead rows in `holdSeq`
///   order (its backlog, and the blocked aggregates).
pub fn query_indexes() -> Vec<IndexModel> {
    let partial = |keys: Document, name: &str, filter: Document| {
        let options = IndexOptions::builder().name(name.to_owned()).partial_filter_expression(filter).build();
        IndexModel::builder().keys(keys).options(options).build()
    };
    vec![
        partial(doc! {"nextAttemptAt": 1}, "due", doc! {"status": "failed"}),
        partial(
            doc! {"aggregateId": 1, "holdSeq": 1},
            BLOCKING_INDEX,
            doc! {"status": {"$in": ["failed", "held", "dead"]}},
        ),
    ]
}

/// What [`Outbox::ensure_indexes`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IndexChanges {
    pub created: Vec<String>,
    /// Dropped: obsolete, or replaced because the definition changed.
    pub dropped: Vec<String>,
}

impl IndexChanges {
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.dropped.is_empty()
    }
}

fn name_of(index: &IndexModel) -> String {
    index.options.as_ref().and_then(|o| o.name.clone()).unwrap_or_default()
}

/// Same keys, partial filter and TTL-ness: the index can stay.
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

/// Handle on one outbox collection, or on one bucket range of it: the
/// relay's queries (`relay_queries`, `stats`) see only the range's rows.
#[derive(Clone)]
pub struct Outbox {
    db: Database,
    collection: Collection<OutboxDocument>,
    range: BucketRange,
}

impl Outbox {
    pub fn new(db: &Database, collection: &str) -> Self {
        Self { db: db.clone(), collection: db.collection(collection), range: BucketRange::whole() }
    }

    /// The same outbox, seen through one bucket range.
    pub fn in_range(&self, range: BucketRange) -> Self {
        Self { range, ..self.clone() }
    }

    pub fn range(&self) -> BucketRange {
        self.range
    }

    /// The checkpoint of this outbox (of its range, for a range).
    pub fn checkpoints(&self) -> Checkpoints {
        Checkpoints::for_range(&self.db, self.collection.name(), &self.range)
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
    /// and drop obsolete ones.
    pub async fn ensure_indexes(&self) -> mongodb::error::Result<IndexChanges> {
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
        for wanted in query_indexes() {
            let wanted_name = name_of(&wanted);
            match existing.iter().find(|i| name_of(i) == wanted_name) {
                Some(current) if same_definition(current, &wanted) => {}
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
            tracing::info!(collection = %name, created = ?changes.created, dropped = ?changes.dropped, "outbox indexes brought up to date");
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
