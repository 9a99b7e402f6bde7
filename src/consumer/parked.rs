//! Parked aggregates. Once an event of an aggregate is dead-lettered, the
//! later events of that aggregate must not be applied before it: each is
//! **parked**, that is sent to the dead-letter topic behind it (same key,
//! so the same dead-letter partition, in order), and a redrive replays them
//! all in order. `parked_aggregates` holds one document per parked
//! aggregate of a group (`_id` = `<group>/<aggregateId>`) listing the ids
//! of its events in dead-letter topics that are not applied yet. Parking
//! and releasing are idempotent (by event id), so a crash between a
//! dead-letter produce and its bookkeeping, and the retry after it, leave
//! the right list. The aggregate flows again when the list is empty.

use std::collections::HashSet;

use futures::TryStreamExt;
use mongodb::{
    Collection, Database, IndexModel,
    bson::{DateTime, Document, doc},
    options::UpdateOptions,
};
use serde::Deserialize;

/// A parked aggregate as listed in status: the event that was
/// dead-lettered first, why, and how many of its events are parked.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParkedAggregate {
    pub aggregate_id: String,
    /// The dead-lettered event that parked it (absent on documents parked
    /// before it was recorded).
    #[serde(default)]
    pub first_event_id: Option<String>,
    /// Why that event was dead-lettered.
    #[serde(default)]
    pub error: Option<String>,
    pub since: DateTime,
    /// Its events in dead-letter topics, not applied yet.
    #[serde(default)]
    pub events: Vec<String>,
}

/// The longest an error is kept on a parked aggregate.
const ERROR_KEPT: usize = 300;

#[derive(Clone)]
pub struct ParkedAggregates {
    coll: Collection<Document>,
    group: String,
}

impl ParkedAggregates {
    pub fn new(db: &Database, group: &str) -> Self {
        Self { coll: db.collection("parked_aggregates"), group: group.to_owned() }
    }

    pub async fn ensure_indexes(&self) -> mongodb::error::Result<()> {
        self.coll.create_index(IndexModel::builder().keys(doc! {"group": 1}).build()).await.map(|_| ())
    }

    fn key(&self, aggregate: &str) -> String {
        format!("{}/{aggregate}", self.group)
    }

    /// An event of `aggregate` is being dead-lettered for `error`: park the
    /// aggregate (the first event and its error are kept).
    pub async fn park(&self, aggregate: &str, event_id: &str, error: &str) -> mongodb::error::Result<()> {
        let error: String = error.chars().take(ERROR_KEPT).collect();
        self.coll
            .update_one(
                doc! {"_id": self.key(aggregate)},
                doc! {
                    "$addToSet": {"events": event_id},
                    "$setOnInsert": {
                        "group": &self.group, "aggregateId": aggregate, "since": DateTime::now(),
                        "firstEventId": event_id, "error": error,
                    },
                },
            )
            .with_options(UpdateOptions::builder().upsert(true).build())
            .await
            .map(|_| ())
    }

    /// Park `event_id` behind its aggregate if the aggregate is parked now
    /// (atomically: an aggregate released meanwhile is not parked again);
    /// whether it was.
    pub async fn park_if_parked(&self, aggregate: &str, event_id: &str) -> mongodb::error::Result<bool> {
        let r = self
            .coll
            .update_one(
                doc! {"_id": self.key(aggregate), "events.0": {"$exists": true}},
                doc! {"$addToSet": {"events": event_id}},
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Which of `aggregates` are parked (one query).
    pub async fn parked_among(&self, aggregates: &[&str]) -> mongodb::error::Result<HashSet<String>> {
        let keys: Vec<String> = aggregates.iter().map(|a| self.key(a)).collect();
        let docs: Vec<Document> = self
            .coll
            .find(doc! {"_id": {"$in": keys}, "events.0": {"$exists": true}})
            .projection(doc! {"aggregateId": 1})
            .await?
            .try_collect()
            .await?;
        Ok(docs.iter().filter_map(|d| d.get_str("aggregateId").ok().map(str::to_owned)).collect())
    }

    /// A redrive applied `event_id`: it is no longer parked; the aggregate
    /// flows again once none of its events is.
    pub async fn applied(&self, aggregate: &str, event_id: &str) -> mongodb::error::Result<()> {
        let id = self.key(aggregate);
        self.coll.update_one(doc! {"_id": &id}, doc! {"$pull": {"events": event_id}}).await?;
        self.coll.delete_one(doc! {"_id": &id, "events": {"$size": 0}}).await.map(|_| ())
    }

    /// Release the parked events `store` has as processed (a rebuild
    /// applied them); the number of aggregates that flow again.
    pub async fn release_applied(&self, store: &crate::processed::ProcessedStore) -> mongodb::error::Result<u64> {
        let docs: Vec<Document> = self.coll.find(doc! {"group": &self.group}).await?.try_collect().await?;
        let mut released = 0;
        for d in docs {
            let (Ok(aggregate), Ok(events)) = (d.get_str("aggregateId"), d.get_array("events")) else { continue };
            for id in events.iter().filter_map(|e| e.as_str()) {
                if store.is_processed(id).await? {
                    self.applied(aggregate, id).await?;
                }
            }
            if self.coll.count_documents(doc! {"_id": self.key(aggregate)}).await? == 0 {
                released += 1;
            }
        }
        Ok(released)
    }

    /// Parked aggregates of the group.
    pub async fn count(&self) -> mongodb::error::Result<u64> {
        self.coll.count_documents(doc! {"group": &self.group}).await
    }

    /// The group's most recently parked aggregates, newest first, at most
    /// `limit`; only those of `aggregates` when it is not empty.
    pub async fn newest(&self, aggregates: &[String], limit: i64) -> mongodb::error::Result<Vec<ParkedAggregate>> {
        let mut filter = doc! {"group": &self.group};
        if !aggregates.is_empty() {
            filter.insert("aggregateId", doc! {"$in": aggregates});
        }
        let docs: Vec<Document> =
            self.coll.find(filter).sort(doc! {"since": -1}).limit(limit).await?.try_collect().await?;
        Ok(docs.into_iter().filter_map(|d| mongodb::bson::from_document(d).ok()).collect())
    }
}
