//! The outbox as it is, read from MongoDB: what the relay exports as
//! metrics and the operator writes into `OutboxRelay` status. Needs no relay
//! to be running.

use futures::TryStreamExt;
use mongodb::{
    bson::{DateTime, Document, doc},
    options::FindOneOptions,
};

use super::Outbox;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxStats {
    pub pending: u64,
    pub failed: u64,
    pub dead: u64,
    pub published: u64,
    /// Age of the oldest pending or failed event, in seconds.
    pub oldest_pending_age_seconds: Option<f64>,
    /// The earliest `nextAttemptAt` of a failed row.
    pub next_retry_at: Option<DateTime>,
    /// The longest backoff currently scheduled, in milliseconds.
    pub max_backoff_ms: Option<i64>,
    /// Aggregates with a failed or dead event: their later events wait.
    pub blocked_aggregates: u64,
    pub last_published_at: Option<DateTime>,
}

impl Outbox {
    pub async fn stats(&self, now: DateTime) -> mongodb::error::Result<OutboxStats> {
        let coll = self.collection().clone_with_type::<Document>();
        let count = |s: &'static str| {
            let coll = coll.clone();
            async move { coll.count_documents(doc! {"status": s}).await }
        };
        // Published is what is left: counting it would scan the collection
        // (no index holds published rows but `_id`); the estimate is the
        // collection's metadata count, so the figure can lag a little.
        let (pending, failed, dead, total) =
            futures::try_join!(count("pending"), count("failed"), count("dead"), async {
                coll.estimated_document_count().await
            })?;
        let published = total.saturating_sub(pending + failed + dead);
        let first = |filter: Document, sort: Document| {
            let coll = coll.clone();
            async move { coll.find_one(filter).with_options(FindOneOptions::builder().sort(sort).build()).await }
        };
        let (oldest_pending, oldest_failed, next_retry, max_backoff, last_published) = futures::try_join!(
            first(doc! {"status": "pending"}, doc! {"_id": 1}),
            first(doc! {"status": "failed"}, doc! {"_id": 1}),
            first(doc! {"status": "failed"}, doc! {"nextAttemptAt": 1}),
            first(doc! {"status": "failed"}, doc! {"backoffMs": -1}),
            first(doc! {"publishedAt": {"$exists": true}}, doc! {"publishedAt": -1}),
        )?;
        let oldest = [oldest_pending, oldest_failed]
            .into_iter()
            .flatten()
            .filter_map(|d| d.get_datetime("occurredOn").ok().copied())
            .min();
        // The aggregateId bound lets the planner use the `blocking` index.
        let blocked: Vec<Document> = coll
            .aggregate(vec![
                doc! {"$match": {"status": {"$in": ["failed", "dead"]}, "aggregateId": {"$type": "string"}}},
                doc! {"$group": {"_id": "$aggregateId"}},
                doc! {"$count": "n"},
            ])
            .await?
            .try_collect()
            .await?;
        Ok(OutboxStats {
            pending,
            failed,
            dead,
            published,
            oldest_pending_age_seconds: oldest
                .map(|t| (now.timestamp_millis() - t.timestamp_millis()).max(0) as f64 / 1000.0),
            next_retry_at: next_retry.and_then(|d| d.get_datetime("nextAttemptAt").ok().copied()),
            max_backoff_ms: max_backoff.and_then(|d| d.get_i64("backoffMs").ok()),
            blocked_aggregates: blocked.first().and_then(|d| d.get_i32("n").ok()).map_or(0, |n| n as u64),
            last_published_at: last_published.and_then(|d| d.get_datetime("publishedAt").ok().copied()),
        })
    }
}
