//! Generations of the projection's read model, so that it can be rebuilt
//! from the topics while the live consumers keep it current (`rebuild`).
//!
//! Readers read `session_projection`, a MongoDB **view** on the current
//! generation's collection `session_projection.g<N>`. Each generation has
//! its own processed-events scope (`<group>` for the first, then
//! `<group>@g<N>`), so a generation's collection and its processed marks
//! always agree: whoever writes generation N (a live consumer, or the
//! rebuild) skips exactly the events already in it. `projection_generations`
//! holds, per read model, the current generation and the state of a
//! rebuild. A switch points the view at the new collection (one atomic
//! `collMod`), then records the new generation; live consumers follow it
//! within a report interval. A consumer still writing the old generation
//! writes a collection no reader sees, and the rebuild keeps applying every
//! event until each live member has moved (see `rebuild`), so nothing it
//! applied there is missing from the new one.
//!
//! A read model created before generations (a plain `session_projection`
//! collection) is generation 1 in place; its first switch renames it to
//! `session_projection.g1` and creates the view, so readers find no
//! `session_projection` for the instant between the two.

use mongodb::{
    Database,
    bson::{DateTime, Document, doc},
    error::ErrorKind,
    results::CollectionType,
};
use serde::{Deserialize, Serialize};

/// What readers read: the view on the current generation.
pub const READ_MODEL: &str = "session_projection";

const GENERATIONS: &str = "projection_generations";

/// MongoDB's code for a namespace that already exists.
const NAMESPACE_EXISTS: i32 = 48;

/// One generation of the read model: where it is written, and the scope of
/// its processed marks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Generation {
    pub number: i32,
    pub collection: String,
    /// The processed-events store's scope (`ProcessedStore::new`).
    pub scope: String,
}

impl Generation {
    /// Generation `n` of `group`'s read model.
    pub fn nth(group: &str, n: i32) -> Self {
        let scope = if n == 1 { group.to_owned() } else { format!("{group}@g{n}") };
        Self { number: n, collection: format!("{READ_MODEL}.g{n}"), scope }
    }

    /// A read model from before generations: the collection readers read.
    fn legacy(group: &str) -> Self {
        Self { collection: READ_MODEL.to_owned(), ..Self::nth(group, 1) }
    }

    pub fn next(&self, group: &str) -> Self {
        Self::nth(group, self.number + 1)
    }
}

/// Where a rebuild is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Applying the topics from their start to their ends as they were
    /// when it began.
    Replaying,
    /// Past those ends; waiting to be at or past the live group's
    /// committed offsets on every partition before switching.
    CatchingUp,
    /// Switched; applying on until every live member follows the new
    /// generation and is behind the rebuild.
    HandingOver,
    Completed,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Replaying => "Replaying",
            Phase::CatchingUp => "CatchingUp",
            Phase::HandingOver => "HandingOver",
            Phase::Completed => "Completed",
            Phase::Failed => "Failed",
        }
    }

    pub fn is_running(self) -> bool {
        matches!(self, Phase::Replaying | Phase::CatchingUp | Phase::HandingOver)
    }
}

/// A partition's place in a rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    /// The next offset the rebuild applies.
    pub next: i64,
    /// Where the partition began and ended when the rebuild started.
    pub start: i64,
    pub end: i64,
}

/// The state of a rebuild, saved as it goes (a rebuild started again
/// resumes from its positions; what it applies twice is skipped by its
/// processed marks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebuildState {
    pub generation: Generation,
    pub phase: Phase,
    pub started_at: DateTime,
    pub updated_at: DateTime,
    pub positions: Vec<Position>,
    pub error: Option<String>,
}

impl RebuildState {
    /// Records replayed and to replay, up to the ends at the start.
    pub fn progress(&self) -> (i64, i64) {
        self.positions.iter().fold((0, 0), |(done, total), p| {
            (done + (p.next.min(p.end) - p.start).max(0), total + (p.end - p.start).max(0))
        })
    }

    /// Progress as a whole percentage (100 when there was nothing to replay).
    pub fn percent(&self) -> i32 {
        match self.progress() {
            (_, 0) => 100,
            (done, total) => (done * 100 / total) as i32,
        }
    }
}

/// The read model's document in `projection_generations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadModelState {
    #[serde(rename = "_id")]
    pub id: String,
    /// The consumer group that keeps it.
    pub group: String,
    pub current: Generation,
    pub switched_at: Option<DateTime>,
    pub rebuild: Option<RebuildState>,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("{0}")]
    Conflict(String),
}

/// The read model's generations in one database.
#[derive(Clone)]
pub struct Generations {
    db: Database,
}

impl Generations {
    pub fn new(db: &Database) -> Self {
        Self { db: db.clone() }
    }

    fn coll(&self) -> mongodb::Collection<ReadModelState> {
        self.db.collection(GENERATIONS)
    }

    /// The read model's state, if it has one yet.
    pub async fn state(&self) -> mongodb::error::Result<Option<ReadModelState>> {
        self.coll().find_one(doc! {"_id": READ_MODEL}).await
    }

    /// The current generation, for `group`; on first use, lays the read
    /// model out (generation 1 and the view, or a legacy collection in
    /// place). Refuses a read model kept by another group: two groups
    /// applying the same events to one read model would apply them twice.
    pub async fn ensure(&self, group: &str) -> Result<Generation, GenerationError> {
        loop {
            if let Some(s) = self.state().await? {
                if s.group != group {
                    return Err(GenerationError::Conflict(format!(
                        "the read model {READ_MODEL} in database {} is kept by consumer group {:?}, not {group:?}: \
                         two groups would apply each event twice (give this group its own database)",
                        self.db.name(),
                        s.group
                    )));
                }
                if s.current.collection != READ_MODEL {
                    self.ensure_view(&s.current.collection).await?;
                }
                return Ok(s.current);
            }
            let first = match self.kind(READ_MODEL).await? {
                Some(CollectionType::Collection) => Generation::legacy(group),
                Some(_) => {
                    return Err(GenerationError::Conflict(format!(
                        "{READ_MODEL} in database {} is a view, but {GENERATIONS} does not say on what: \
                         drop the view, or restore {GENERATIONS}",
                        self.db.name()
                    )));
                }
                None => {
                    let first = Generation::nth(group, 1);
                    self.ensure_view(&first.collection).await?;
                    first
                }
            };
            let doc = ReadModelState {
                id: READ_MODEL.into(),
                group: group.into(),
                current: first,
                switched_at: None,
                rebuild: None,
            };
            // Another member may lay it out at the same time: the first insert wins, and both read it.
            if let Err(e) = self.coll().insert_one(&doc).await
                && !crate::db::is_duplicate_key(&e)
            {
                return Err(e.into());
            }
        }
    }

    async fn kind(&self, name: &str) -> mongodb::error::Result<Option<CollectionType>> {
        let mut specs = self.db.list_collections().filter(doc! {"name": name}).await?;
        use futures::TryStreamExt;
        Ok(specs.try_next().await?.map(|s| s.collection_type))
    }

    /// Make `session_projection` a view on `collection` if it is none yet.
    async fn ensure_view(&self, collection: &str) -> mongodb::error::Result<()> {
        match self
            .db
            .create_collection(READ_MODEL)
            .view_on(collection.to_owned())
            .pipeline(Vec::<Document>::new())
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.kind.as_ref(), ErrorKind::Command(c) if c.code == NAMESPACE_EXISTS) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Save a rebuild's state.
    pub async fn save_rebuild(&self, state: &RebuildState) -> mongodb::error::Result<()> {
        let value = mongodb::bson::to_bson(state).map_err(|e| mongodb::error::Error::custom(e.to_string()))?;
        self.coll().update_one(doc! {"_id": READ_MODEL}, doc! {"$set": {"rebuild": value}}).await.map(|_| ())
    }

    /// Start over a rebuild into `generation`: its collection and its
    /// processed marks, left by an earlier attempt, are dropped.
    pub async fn clear(&self, generation: &Generation) -> mongodb::error::Result<()> {
        self.db.collection::<Document>(&generation.collection).drop().await?;
        self.db.collection::<Document>("processed_events").delete_many(doc! {"group": &generation.scope}).await?;
        Ok(())
    }

    /// Point readers at `to`, then make it current (both idempotent, so a
    /// switch cut short is finished by running it again).
    pub async fn switch(&self, from: &Generation, to: &Generation) -> mongodb::error::Result<()> {
        if self.kind(READ_MODEL).await? == Some(CollectionType::Collection) {
            self.retire_legacy(from).await?;
        }
        self.db.run_command(doc! {"collMod": READ_MODEL, "viewOn": &to.collection, "pipeline": []}).await?;
        let value = mongodb::bson::to_bson(to).map_err(|e| mongodb::error::Error::custom(e.to_string()))?;
        self.coll()
            .update_one(
                doc! {"_id": READ_MODEL, "current.number": {"$in": [from.number, to.number]}},
                doc! {"$set": {"current": value, "switchedAt": DateTime::now()}},
            )
            .await
            .map(|_| ())
    }

    /// A legacy read model: rename it to its generation's collection and
    /// create the view in its place. A live consumer of the old generation
    /// may create the collection again in between: that copy is renamed
    /// aside too (its writes are in the new generation through the rebuild).
    async fn retire_legacy(&self, from: &Generation) -> mongodb::error::Result<()> {
        let db = self.db.name();
        for attempt in 0..5 {
            if self.kind(READ_MODEL).await? != Some(CollectionType::Collection) {
                break;
            }
            let to = if attempt == 0 {
                format!("{READ_MODEL}.g{}", from.number)
            } else {
                format!("{READ_MODEL}.g{}.late{attempt}", from.number)
            };
            self.db
                .client()
                .database("admin")
                .run_command(doc! {"renameCollection": format!("{db}.{READ_MODEL}"), "to": format!("{db}.{to}")})
                .await?;
            self.ensure_view(&to).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_generation_has_its_collection_and_processed_scope() {
        let g1 = Generation::nth("proj", 1);
        assert_eq!((g1.collection.as_str(), g1.scope.as_str()), ("session_projection.g1", "proj"));
        let g2 = g1.next("proj");
        assert_eq!((g2.number, g2.collection.as_str(), g2.scope.as_str()), (2, "session_projection.g2", "proj@g2"));
        assert_eq!(Generation::legacy("proj").collection, READ_MODEL);
        assert_eq!(Generation::legacy("proj").next("proj"), g2);
    }

    #[test]
    fn progress_counts_records_up_to_the_ends_at_the_start() {
        let p = |next, start, end| Position { topic: "t".into(), partition: 0, next, start, end };
        let mut s = RebuildState {
            generation: Generation::nth("g", 2),
            phase: Phase::Replaying,
            started_at: DateTime::now(),
            updated_at: DateTime::now(),
            positions: vec![p(0, 0, 100), p(60, 50, 150)],
            error: None,
        };
        assert_eq!((s.progress(), s.percent()), ((10, 200), 5));
        s.positions = vec![p(120, 0, 100), p(150, 50, 150)];
        assert_eq!((s.progress(), s.percent()), ((200, 200), 100), "records past the end do not count");
        s.positions = vec![p(7, 7, 7)];
        assert_eq!(s.percent(), 100, "nothing to replay");
    }
}
