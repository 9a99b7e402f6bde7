//! What an operator asks of an outbox's set-aside events: **redrive**
//! (put dead or failed events back in line for a retry now, with a fresh
//! attempt budget) or **discard** (give them up, with who and why). Both
//! only mark rows; the relay that owns the range carries them out in its
//! retry path, under its lease and fence, in each aggregate's `holdSeq`
//! order: a redriven row is published before its held successors, and a
//! discarded row is set `discarded` (kept, never deleted by the cleanup)
//! and its successors flow. Each marked row carries the request's id
//! (`request`), so a request's progress is read from the rows themselves
//! ([`Outbox::request_progress`]), whoever asked again or crashed between.
//!
//! Also the newest dead events, as `OutboxRelay` status lists them.

use futures::TryStreamExt;
use mongodb::{
    bson::{DateTime, Document, doc},
    options::Hint,
};

use super::{Outbox, OutboxStatus, store::BLOCKING_INDEX};

/// Which set-aside events a request acts on. Every list that is not empty
/// narrows it; the window is on the event's `occurredOn`.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// `Dead` or `Failed`.
    pub status: OutboxStatus,
    pub aggregate_ids: Vec<String>,
    pub event_names: Vec<String>,
    pub occurred_after: Option<DateTime>,
    pub occurred_before: Option<DateTime>,
}

impl Selection {
    /// Every event of `status`.
    pub fn all(status: OutboxStatus) -> Self {
        Self { status, aggregate_ids: Vec::new(), event_names: Vec::new(), occurred_after: None, occurred_before: None }
    }

    /// The MongoDB filter of the selection.
    pub fn filter(&self) -> Document {
        let mut filter = doc! {"status": self.status.as_str()};
        if !self.aggregate_ids.is_empty() {
            filter.insert("aggregateId", doc! {"$in": &self.aggregate_ids});
        }
        if !self.event_names.is_empty() {
            filter.insert("eventName", doc! {"$in": &self.event_names});
        }
        let mut window = Document::new();
        if let Some(t) = self.occurred_after {
            window.insert("$gte", t);
        }
        if let Some(t) = self.occurred_before {
            window.insert("$lt", t);
        }
        if !window.is_empty() {
            filter.insert("occurredOn", window);
        }
        filter
    }
}

/// What to do with the selected events.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestAction {
    Redrive,
    /// Recorded on each row as `discard: {by, reason, at}`, kept after the
    /// relay sets it `discarded`.
    Discard {
        by: String,
        reason: String,
    },
}

/// How far a request has got, read from the rows it marked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestProgress {
    /// Rows the request marked.
    pub matched: u64,
    /// Marked and not carried out yet (failed or held, waiting for the relay).
    pub waiting: u64,
    /// Redriven and dead again.
    pub dead: u64,
    /// Discarded by the relay.
    pub discarded: u64,
}

impl RequestProgress {
    /// Carried out: published (a published row may since have been deleted
    /// by the retention cleanup, which deletes nothing else) or discarded.
    pub fn done(&self) -> u64 {
        self.matched.saturating_sub(self.waiting + self.dead)
    }
}

/// One dead event, as status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadEvent {
    pub id: String,
    pub aggregate_id: String,
    pub event_name: String,
    pub attempts: i32,
    pub last_error: String,
    /// When it went dead (rows dead before that was recorded: when the event occurred).
    pub since: Option<DateTime>,
}

impl Outbox {
    /// Mark the events of `selection` for `action`, tagged with
    /// `request_id`, due now; returns how many it marked. Running it again
    /// marks nothing new (the rows left the selected status).
    pub async fn mark_for_request(
        &self,
        selection: &Selection,
        action: &RequestAction,
        request_id: &str,
        now: DateTime,
    ) -> mongodb::error::Result<u64> {
        let update = match action {
            RequestAction::Redrive => doc! {
                "$set": {"status": "failed", "attempts": 0, "outageRetries": 0, "nextAttemptAt": now,
                         "redrivenAt": now, "request": request_id},
                "$unset": {"backoffMs": "", "discard": ""},
            },
            RequestAction::Discard { by, reason } => doc! {
                "$set": {"status": "failed", "nextAttemptAt": now, "request": request_id,
                         "discard": {"by": by, "reason": reason, "at": now}},
            },
        };
        let r = self
            .collection()
            .update_many(self.range().restrict(selection.filter()), update)
            .hint(Hint::Name(BLOCKING_INDEX.into()))
            .await?;
        Ok(r.modified_count)
    }

    /// The rows `request_id` marked, by where they are now.
    pub async fn request_progress(&self, request_id: &str) -> mongodb::error::Result<RequestProgress> {
        let rows: Vec<Document> = self
            .collection()
            .clone_with_type::<Document>()
            .aggregate(vec![
                doc! {"$match": self.range().restrict(doc! {"request": request_id})},
                doc! {"$group": {"_id": "$status", "n": {"$sum": 1}}},
            ])
            .await?
            .try_collect()
            .await?;
        let mut p = RequestProgress::default();
        for r in rows {
            let n = r.get_i32("n").map(i64::from).or_else(|_| r.get_i64("n")).unwrap_or(0).max(0) as u64;
            p.matched += n;
            match r.get_str("_id").unwrap_or("published") {
                "failed" | "held" => p.waiting += n,
                "dead" => p.dead += n,
                "discarded" => p.discarded += n,
                _ => {}
            }
        }
        Ok(p)
    }

    /// The newest dead events (by when they went dead), at most `limit`.
    pub async fn newest_dead(&self, limit: i64) -> mongodb::error::Result<Vec<DeadEvent>> {
        let rows: Vec<Document> = self
            .collection()
            .clone_with_type::<Document>()
            .find(self.range().restrict(doc! {"status": "dead"}))
            .hint(Hint::Name(BLOCKING_INDEX.into()))
            .sort(doc! {"deadAt": -1, "_id": -1})
            .projection(doc! {
                "aggregateId": 1, "eventName": 1, "attempts": 1, "lastError": 1, "deadAt": 1, "occurredOn": 1,
            })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        Ok(rows
            .iter()
            .map(|d| DeadEvent {
                id: d
                    .get("_id")
                    .map(|id| id.as_str().map_or_else(|| id.to_string(), str::to_owned))
                    .unwrap_or_default(),
                aggregate_id: d.get_str("aggregateId").unwrap_or_default().to_owned(),
                event_name: d.get_str("eventName").unwrap_or_default().to_owned(),
                attempts: d.get_i32("attempts").unwrap_or(0),
                last_error: d.get_str("lastError").unwrap_or_default().to_owned(),
                since: d.get_datetime("deadAt").or_else(|_| d.get_datetime("occurredOn")).ok().copied(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selection_narrows_by_every_list_given_and_the_window() {
        assert_eq!(Selection::all(OutboxStatus::Dead).filter(), doc! {"status": "dead"});
        let from = DateTime::from_millis(1_000);
        let to = DateTime::from_millis(2_000);
        let s = Selection {
            status: OutboxStatus::Failed,
            aggregate_ids: vec!["o-1".into()],
            event_names: vec!["OrderPlaced".into(), "OrderPaid".into()],
            occurred_after: Some(from),
            occurred_before: Some(to),
        };
        assert_eq!(
            s.filter(),
            doc! {
                "status": "failed", "aggregateId": {"$in": ["o-1"]},
                "eventName": {"$in": ["OrderPlaced", "OrderPaid"]}, "occurredOn": {"$gte": from, "$lt": to},
            }
        );
    }

    #[test]
    fn done_is_what_left_the_backlog_other_than_dead_again() {
        let p = RequestProgress { matched: 10, waiting: 3, dead: 2, discarded: 0 };
        assert_eq!(p.done(), 5);
        assert_eq!(RequestProgress { matched: 4, waiting: 0, dead: 0, discarded: 4 }.done(), 4);
    }
}
