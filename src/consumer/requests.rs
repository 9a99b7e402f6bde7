//! Requested actions on a consumer group's dead-lettered events (an
//! `OutboxRedrive` with target EventConsumer):
//! - a **redrive** runs in a Job with the consumer's pod and settings
//!   (`outbox consume redrive --request UID`), which records where it is in
//!   `consumer_requests` (`_id` = the request's uid) for the operator to
//!   show: records read, applied, duplicates, dead-lettered again, and
//!   whether it ended. A Job pod started again adds to the counts saved.
//! - a **discard** gives up the parked aggregates' events: each is recorded
//!   as processed with who and why (so a later redrive skips it as a
//!   duplicate; the record stays in its dead-letter topic) and the
//!   aggregate flows again. It needs only MongoDB, so the operator does it.

use futures::TryStreamExt;
use mongodb::{
    Collection, Database,
    bson::{DateTime, Document, doc},
    options::ReplaceOptions,
};
use serde::{Deserialize, Serialize};

use super::{RedriveCounts, generations::Generations, parked::ParkedAggregates};
use crate::processed::ProcessedStore;

/// Where a redrive Job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestState {
    Running,
    Completed,
    Failed,
}

/// A redrive Job's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    #[serde(rename = "_id")]
    pub id: String,
    pub group: String,
    pub state: RequestState,
    pub records: i64,
    pub applied: i64,
    pub duplicates: i64,
    pub dead_lettered: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub updated_at: DateTime,
}

impl RequestRecord {
    /// Records carried out: applied, or found applied already.
    pub fn done(&self) -> i64 {
        self.applied + self.duplicates
    }
}

/// The record of one request, written by the Job that carries it out.
#[derive(Clone)]
pub struct RequestLog {
    coll: Collection<RequestRecord>,
    id: String,
    group: String,
    /// What earlier runs of the same request saved (a pod started again).
    before: RedriveCounts,
}

impl RequestLog {
    /// The log of request `id`, carrying on from what an earlier run saved.
    pub async fn open(db: &Database, id: &str, group: &str) -> mongodb::error::Result<Self> {
        let coll = db.collection::<RequestRecord>("consumer_requests");
        let before = coll.find_one(doc! {"_id": id}).await?.map_or_else(RedriveCounts::default, |r| RedriveCounts {
            records: r.records as u64,
            applied: r.applied as u64,
            duplicates: r.duplicates as u64,
            dead_lettered: r.dead_lettered as u64,
        });
        Ok(Self { coll, id: id.to_owned(), group: group.to_owned(), before })
    }

    /// Save this run's `counts` (added to the earlier runs') and the state.
    pub async fn save(
        &self,
        counts: &RedriveCounts,
        state: RequestState,
        error: Option<String>,
    ) -> mongodb::error::Result<()> {
        let b = &self.before;
        let record = RequestRecord {
            id: self.id.clone(),
            group: self.group.clone(),
            state,
            records: (b.records + counts.records) as i64,
            applied: (b.applied + counts.applied) as i64,
            duplicates: (b.duplicates + counts.duplicates) as i64,
            dead_lettered: (b.dead_lettered + counts.dead_lettered) as i64,
            error,
            updated_at: DateTime::now(),
        };
        self.coll
            .replace_one(doc! {"_id": &self.id}, record)
            .with_options(ReplaceOptions::builder().upsert(true).build())
            .await
            .map(|_| ())
    }

    /// The record of request `id`, if its Job has written one.
    pub async fn read(db: &Database, id: &str) -> mongodb::error::Result<Option<RequestRecord>> {
        db.collection::<RequestRecord>("consumer_requests").find_one(doc! {"_id": id}).await
    }
}

/// What a discard did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Discarded {
    pub aggregates: u64,
    pub events: u64,
}

/// Discard the parked events of `group` (of `aggregates` only, when not
/// empty): each recorded as processed with `discard: {by, reason, at}`,
/// then its aggregate released. Idempotent: what was discarded is no
/// longer parked.
pub async fn discard_parked(
    db: &Database,
    group: &str,
    aggregates: &[String],
    by: &str,
    reason: &str,
) -> mongodb::error::Result<Discarded> {
    // A projection's marks are scoped by its read model's generation.
    let model = Generations::new(db).state().await?.filter(|s| s.group == group);
    let scope = model.as_ref().map_or(group, |m| m.current.scope.as_str());
    let store = ProcessedStore::new(db, scope);
    let parked = ParkedAggregates::new(db, group);
    let mut filter = doc! {"group": group};
    if !aggregates.is_empty() {
        filter.insert("aggregateId", doc! {"$in": aggregates});
    }
    let docs: Vec<Document> = db.collection::<Document>("parked_aggregates").find(filter).await?.try_collect().await?;
    let mut out = Discarded::default();
    let now = DateTime::now();
    for d in docs {
        let (Ok(aggregate), Ok(events)) = (d.get_str("aggregateId"), d.get_array("events")) else { continue };
        let ids: Vec<&str> = events.iter().filter_map(|e| e.as_str()).collect();
        let marks = ids
            .iter()
            .map(|id| {
                let mut mark = store.mark_document(id, "");
                mark.remove("eventName");
                mark.insert("discard", doc! {"by": by, "reason": reason, "at": now});
                mark
            })
            .collect();
        store.insert_marks(marks).await?;
        for id in &ids {
            parked.applied(aggregate, id).await?;
        }
        out.aggregates += 1;
        out.events += ids.len() as u64;
    }
    Ok(out)
}
