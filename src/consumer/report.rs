//! What each consumer process reports for `EventConsumer` status: one
//! document per member of the group in `consumer_members` (`_id` =
//! `<group>/<member>`), rewritten every few seconds and when a partition
//! starts or stops waiting, removed when the member stops, and expiring an
//! hour after its last write (a member SIGKILLed). The operator reads the
//! group's fresh documents: counters summed, waiting partitions listed, and
//! the `PartitionsWaiting` condition.

use std::time::{Duration, SystemTime};

use futures::TryStreamExt;
use mongodb::{
    Collection, Database, IndexModel,
    bson::{DateTime, doc},
    options::{IndexOptions, ReplaceOptions},
};
use serde::{Deserialize, Serialize};

use super::ordering::{Lanes, Tp, Waiting, reason};

/// How often a member rewrites its report (also at once when a partition
/// starts or stops waiting).
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

/// A report older than this is a member that is gone.
pub const FRESH_FOR: Duration = Duration::from_secs(30);

/// One member's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberReport {
    #[serde(rename = "_id")]
    pub id: String,
    pub group: String,
    pub member: String,
    pub updated_at: DateTime,
    pub processed: i64,
    pub duplicates: i64,
    pub failures: i64,
    pub dead_lettered: i64,
    /// The largest backoff of its waiting partitions, seconds.
    pub backoff_seconds: f64,
    pub waiting: Vec<WaitingRecord>,
    /// The aggregates waiting longest (key ordering), at most
    /// `WAITING_AGGREGATES`, with the records queued behind each.
    #[serde(default)]
    pub waiting_aggregates: Vec<WaitingRecord>,
    /// The projection's generation it writes (other handlers: none); a
    /// rebuild hands over once every member writes the new one.
    #[serde(default)]
    pub generation: Option<i32>,
}

/// How many waiting aggregates a member reports, and status shows.
pub const WAITING_AGGREGATES: usize = 10;

/// A record being tried again: the oldest of its partition, or the head of
/// its aggregate's lane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaitingRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// `registry`, `mongodb`, `webhook`, `rejected`, `dead_letter`,
    /// `beyond_dedup_horizon`.
    pub reason: String,
    pub attempts: u32,
    pub since: DateTime,
    pub error: String,
    /// Its aggregate (the record key), when lanes are by key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<String>,
    /// Records of its lane queued behind it.
    #[serde(default)]
    pub queued: u64,
}

/// Counters of a member, from its metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub processed: i64,
    pub duplicates: i64,
    pub failures: i64,
    pub dead_lettered: i64,
}

impl MemberReport {
    pub fn new<T>(group: &str, member: &str, counters: Counters, lanes: &Lanes<T>, generation: Option<i32>) -> Self {
        let record = |(topic, partition): Tp, w: &Waiting, queued: usize| WaitingRecord {
            topic,
            partition,
            offset: w.offset,
            reason: w.reason.to_owned(),
            attempts: w.attempts,
            since: DateTime::from_system_time(w.since),
            error: w.error.clone(),
            aggregate: w.aggregate.clone(),
            queued: queued as u64,
        };
        let waiting = lanes.waiting().into_iter().map(|(tp, w)| record(tp, w, 0)).collect();
        let waiting_aggregates = lanes
            .longest_waiting(WAITING_AGGREGATES)
            .into_iter()
            .map(|(tp, w, queued)| record(tp, w, queued))
            .collect();
        Self {
            id: format!("{group}/{member}"),
            group: group.to_owned(),
            member: member.to_owned(),
            updated_at: DateTime::from_system_time(SystemTime::now()),
            processed: counters.processed,
            duplicates: counters.duplicates,
            failures: counters.failures,
            dead_lettered: counters.dead_lettered,
            backoff_seconds: lanes.max_backoff().as_secs_f64(),
            waiting,
            waiting_aggregates,
            generation,
        }
    }
}

/// The members' reports of every group in a database.
#[derive(Clone)]
pub struct MemberReports {
    coll: Collection<MemberReport>,
}

impl MemberReports {
    pub fn new(db: &Database) -> Self {
        Self { coll: db.collection("consumer_members") }
    }

    /// Expire a report an hour after its last write.
    pub async fn ensure_indexes(&self) -> mongodb::error::Result<()> {
        let ttl = IndexOptions::builder().name("expiry".to_owned()).expire_after(Duration::from_secs(3600)).build();
        self.coll.create_index(IndexModel::builder().keys(doc! {"updatedAt": 1}).options(ttl).build()).await?;
        Ok(())
    }

    pub async fn write(&self, report: &MemberReport) -> mongodb::error::Result<()> {
        self.coll
            .replace_one(doc! {"_id": &report.id}, report)
            .with_options(ReplaceOptions::builder().upsert(true).build())
            .await
            .map(|_| ())
    }

    pub async fn remove(&self, group: &str, member: &str) -> mongodb::error::Result<()> {
        self.coll.delete_one(doc! {"_id": format!("{group}/{member}")}).await.map(|_| ())
    }

    /// The group's reports written within `FRESH_FOR` of `now`.
    pub async fn fresh(&self, group: &str, now: DateTime) -> mongodb::error::Result<Vec<MemberReport>> {
        let since = DateTime::from_millis(now.timestamp_millis() - FRESH_FOR.as_millis() as i64);
        self.coll.find(doc! {"group": group, "updatedAt": {"$gte": since}}).await?.try_collect().await
    }
}

/// What a group's members report, summed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupReport {
    pub members: usize,
    pub counters: Counters,
    /// The largest backoff, seconds (`None` without a member).
    pub backoff_seconds: Option<f64>,
    /// Waiting partitions, with the member holding each, by topic and partition.
    pub waiting: Vec<(String, WaitingRecord)>,
    /// The aggregates waiting longest, with the member holding each.
    pub waiting_aggregates: Vec<(String, WaitingRecord)>,
}

impl GroupReport {
    pub fn sum(reports: Vec<MemberReport>) -> Self {
        let mut g = GroupReport { members: reports.len(), ..Default::default() };
        for r in reports {
            g.counters.processed += r.processed;
            g.counters.duplicates += r.duplicates;
            g.counters.failures += r.failures;
            g.counters.dead_lettered += r.dead_lettered;
            g.backoff_seconds = Some(g.backoff_seconds.unwrap_or(0.0).max(r.backoff_seconds));
            g.waiting.extend(r.waiting.into_iter().map(|w| (r.member.clone(), w)));
            g.waiting_aggregates.extend(r.waiting_aggregates.into_iter().map(|w| (r.member.clone(), w)));
        }
        g.waiting.sort_by(|a, b| (&a.1.topic, a.1.partition).cmp(&(&b.1.topic, b.1.partition)));
        g.waiting_aggregates.sort_by_key(|(_, w)| w.since);
        g.waiting_aggregates.truncate(WAITING_AGGREGATES);
        g
    }

    /// The `PartitionsWaiting` condition: whether any partition waits, the
    /// reason (the worst first: `DeadLetterUnavailable`, then
    /// `DependencyUnavailable` for an outage, then `RetryingRejectedEvent`)
    /// and a message naming each waiting partition.
    pub fn waiting_condition(&self) -> (bool, &'static str, String) {
        if self.waiting.is_empty() {
            return (false, "AllPartitionsFlowing", "no partition waits".to_owned());
        }
        let has = |r: &str| self.waiting.iter().any(|(_, w)| w.reason == r);
        let why = if has(reason::DEAD_LETTER) {
            "DeadLetterUnavailable"
        } else if has(reason::BEYOND_DEDUP_HORIZON) {
            "BeyondDedupHorizon"
        } else if has(reason::REGISTRY) || has(reason::MONGODB) || has(reason::WEBHOOK) {
            "DependencyUnavailable"
        } else {
            "RetryingRejectedEvent"
        };
        let parts: Vec<String> = self
            .waiting
            .iter()
            .map(|(member, w)| {
                format!(
                    "{}[{}] at offset {} ({}, {} attempt(s), on {member}): {}",
                    w.topic, w.partition, w.offset, w.reason, w.attempts, w.error
                )
            })
            .collect();
        (true, why, format!("{} partition(s) wait: {}", parts.len(), parts.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::consumer::ordering::{EventOrder, Progress, Retry};

    fn report(member: &str, reason: &'static str, partition: i32) -> MemberReport {
        let mut lanes = Lanes::new(EventOrder::Key, 10);
        let tp = ("t".to_owned(), partition);
        lanes.accept(tp, 4, Some("a"), ());
        let run = lanes.take_ready(Instant::now()).pop().unwrap();
        let retry = Retry {
            offset: 4,
            attempts: 2,
            reason,
            error: "e".into(),
            backoff: Duration::from_secs(partition as u64 + 1),
            dead_letter: None,
        };
        let results = run.entries.into_iter().map(|e| (e, Progress::Retry(retry.clone()))).collect();
        lanes.finish(run.lane, results, Instant::now());
        let counters = Counters { processed: 10, duplicates: 1, failures: 2, dead_lettered: 0 };
        MemberReport::new("g", member, counters, &lanes, None)
    }

    #[test]
    fn a_group_sums_its_members_and_names_the_worst_wait() {
        let g = GroupReport::sum(vec![report("b", reason::DEAD_LETTER, 3), report("a", reason::WEBHOOK, 1)]);
        assert_eq!((g.members, g.counters.processed, g.counters.failures), (2, 20, 4));
        assert_eq!(g.backoff_seconds, Some(4.0));
        assert_eq!(g.waiting.iter().map(|(m, w)| (m.as_str(), w.partition)).collect::<Vec<_>>(), [("a", 1), ("b", 3)]);
        let (waits, why, message) = g.waiting_condition();
        assert!(waits);
        assert_eq!(why, "DeadLetterUnavailable");
        assert!(
            message.starts_with("2 partition(s) wait: t[1] at offset 4 (webhook, 2 attempt(s), on a)"),
            "{message}"
        );
        let one = GroupReport::sum(vec![report("a", reason::REJECTED, 0)]);
        assert_eq!(one.waiting_condition().1, "RetryingRejectedEvent");
        let none = GroupReport::sum(vec![]);
        assert_eq!((none.waiting_condition().0, none.backoff_seconds), (false, None));
    }
}
