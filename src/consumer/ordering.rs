//! Ordered concurrency: which records may be handled at once, which wait,
//! and which offset of each partition may be committed.
//!
//! Records are put in lanes by their ordering key (`EventOrder`): one lane
//! per aggregate (`key`, the default), per partition (`partition`), or per
//! record (`unordered`). A lane is handled in order, one record at a time;
//! different lanes run at once (up to the consumer's `maxInFlight`). A
//! record that must be tried again holds its lane only: the later records
//! of its aggregate (or partition) queue behind it, the other lanes go on.
//!
//! Offsets: a partition's committed offset stays below its oldest record
//! not done yet, wherever the later records are, so a crash or a rebalance
//! redelivers from there (the processed-events store skips what was done)
//! and never skips a record. A partition holding more than `limit` records
//! not done is paused until it is down to half of it, so a held lane cannot
//! fill memory.
//!
//! Pure bookkeeping: the caller fetches, pauses, seeks, handles and stores
//! offsets.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};

/// A topic partition.
pub type Tp = (String, i32);

/// Why a record waits (the `reason` label of `outbox_consumer_waiting`
/// and of the status's waiting partitions).
pub mod reason {
    /// The schema registry is unreachable.
    pub const REGISTRY: &str = "registry";
    /// MongoDB is unreachable or refused for a while.
    pub const MONGODB: &str = "mongodb";
    /// The webhook is unreachable, timed out, or answered 5xx, 408 or 429.
    pub const WEBHOOK: &str = "webhook";
    /// The handler rejected the event; retried up to the attempt budget.
    pub const REJECTED: &str = "rejected";
    /// The event is due for its dead-letter topic, which does not take it.
    pub const DEAD_LETTER: &str = "dead_letter";
    /// The record is older than the processed-events retention: it may
    /// have been applied and forgotten (`--beyond-dedup-horizon wait`).
    pub const BEYOND_DEDUP_HORIZON: &str = "beyond_dedup_horizon";
}

/// Which records keep their order.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum EventOrder {
    /// The events of one aggregate (the record key) in order; many
    /// aggregates at once, within and across partitions.
    #[default]
    Key,
    /// The records of one partition in order; partitions at once.
    Partition,
    /// No order: every record on its own.
    Unordered,
}

/// A record being tried again: the head of its lane.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub offset: i64,
    /// Its aggregate (the record key), if it has one.
    pub aggregate: Option<String>,
    /// Failed attempts at it so far.
    pub attempts: u32,
    pub reason: &'static str,
    pub error: String,
    /// When it first failed.
    pub since: SystemTime,
    /// Its current backoff.
    pub backoff: Duration,
    /// Its lane is not handled before then.
    pub until: Instant,
    /// Set once the record is given up on: the dead-letter error, so that
    /// the next try goes straight to the dead-letter topic.
    pub dead_letter: Option<String>,
}

/// A failed try at a record: how long to wait, why.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    pub offset: i64,
    pub attempts: u32,
    pub reason: &'static str,
    pub error: String,
    pub backoff: Duration,
    pub dead_letter: Option<String>,
}

/// What the previous tries at a record left: attempts and, if it is due
/// for the dead-letter topic, why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prior {
    pub attempts: u32,
    pub dead_letter: Option<String>,
}

/// How handling a record of a run came out, for the bookkeeping.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// It reached its end: it no longer holds its partition's offset.
    Done,
    /// It must be tried again: its lane waits.
    Retry(Retry),
    /// Not tried: an earlier record of its lane waits.
    Skipped,
}

/// A lane's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LaneKey {
    Aggregate(Tp, String),
    Partition(Tp),
    Record(Tp, i64),
}

impl LaneKey {
    /// The partition its records come from.
    pub fn tp(&self) -> &Tp {
        match self {
            LaneKey::Aggregate(tp, _) | LaneKey::Partition(tp) | LaneKey::Record(tp, _) => tp,
        }
    }
}

/// A record in a lane.
#[derive(Debug)]
pub struct Entry<T> {
    pub tp: Tp,
    pub offset: i64,
    pub item: T,
}

/// Records of one lane to handle now, in order; `prior` is what earlier
/// tries left on the first.
#[derive(Debug)]
pub struct Run<T> {
    pub lane: LaneKey,
    pub prior: Prior,
    pub entries: Vec<Entry<T>>,
}

struct Lane<T> {
    queue: VecDeque<Entry<T>>,
    /// The head is being tried again.
    waiting: Option<Waiting>,
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Self { queue: VecDeque::new(), waiting: None }
    }
}

#[derive(Debug, Default)]
struct PartitionState {
    /// The offset after the newest record taken.
    next: Option<i64>,
    /// The first offset taken since it was assigned.
    first: Option<i64>,
    /// Taken, not done.
    open: BTreeSet<i64>,
    /// The offset last handed out to be stored.
    stored: Option<i64>,
    /// Paused for holding too many records not done.
    paused: bool,
}

/// The lanes and partitions of one consumer.
pub struct Lanes<T> {
    order: EventOrder,
    limit: usize,
    partitions: BTreeMap<Tp, PartitionState>,
    lanes: HashMap<LaneKey, Lane<T>>,
}

impl<T> Lanes<T> {
    /// `limit`: records not done a partition may hold before it is paused.
    pub fn new(order: EventOrder, limit: usize) -> Self {
        Self { order, limit: limit.max(1), partitions: BTreeMap::new(), lanes: HashMap::new() }
    }

    /// Take a fetched record into its lane. `false` (the record is dropped)
    /// when it was taken before (fetched again after a seek) or its
    /// partition is paused (it comes again on resume).
    pub fn accept(&mut self, tp: Tp, offset: i64, key: Option<&str>, item: T) -> bool {
        let p = self.partitions.entry(tp.clone()).or_default();
        if p.paused || p.next.is_some_and(|n| offset < n) {
            return false;
        }
        p.next = Some(offset + 1);
        p.first.get_or_insert(offset);
        p.open.insert(offset);
        let lane = match (self.order, key) {
            (EventOrder::Key, Some(k)) => LaneKey::Aggregate(tp.clone(), k.to_owned()),
            // Without a key, a record keeps its place in the partition.
            (EventOrder::Key | EventOrder::Partition, _) => LaneKey::Partition(tp.clone()),
            (EventOrder::Unordered, _) => LaneKey::Record(tp.clone(), offset),
        };
        self.lanes.entry(lane).or_default().queue.push_back(Entry { tp, offset, item });
        true
    }

    /// Every lane that may go on at `now`, with all its queued records (a
    /// lane whose head waits out a backoff stays). In partition, then
    /// offset order.
    pub fn take_ready(&mut self, now: Instant) -> Vec<Run<T>> {
        let mut runs: Vec<Run<T>> = self
            .lanes
            .iter_mut()
            .filter(|(_, l)| !l.queue.is_empty() && l.waiting.as_ref().is_none_or(|w| w.until <= now))
            .map(|(key, l)| Run {
                lane: key.clone(),
                prior: l
                    .waiting
                    .as_ref()
                    .map(|w| Prior { attempts: w.attempts, dead_letter: w.dead_letter.clone() })
                    .unwrap_or_default(),
                entries: l.queue.drain(..).collect(),
            })
            .collect();
        runs.sort_by(|a, b| (&a.entries[0].tp, a.entries[0].offset).cmp(&(&b.entries[0].tp, b.entries[0].offset)));
        runs
    }

    /// Book how a run's records came out (in the run's order). The first
    /// `Retry` and every record after it go back to the head of the lane.
    /// Returns what the lane had waited for, when its waiting record is now
    /// done.
    pub fn finish(&mut self, lane: LaneKey, results: Vec<(Entry<T>, Progress)>, now: Instant) -> Option<Waiting> {
        let mut flowed = None;
        let mut back = Vec::new();
        let mut retry = None;
        for (entry, progress) in results {
            match progress {
                Progress::Done if back.is_empty() => {
                    if let Some(p) = self.partitions.get_mut(&entry.tp) {
                        p.open.remove(&entry.offset);
                    }
                    if let Some(l) = self.lanes.get_mut(&lane)
                        && l.waiting.as_ref().is_some_and(|w| w.offset == entry.offset)
                    {
                        flowed = l.waiting.take();
                    }
                }
                Progress::Retry(r) if back.is_empty() => {
                    retry = Some(r);
                    back.push(entry);
                }
                // After the record that waits: it comes again behind it.
                _ => back.push(entry),
            }
        }
        // The partition was revoked while the run was handled: nothing to keep.
        if back.first().is_some_and(|e| !self.partitions.contains_key(&e.tp)) {
            back.clear();
        }
        let aggregate = match &lane {
            LaneKey::Aggregate(_, a) => Some(a.clone()),
            _ => None,
        };
        if let Some(first) = back.first() {
            let l = self.lanes.entry(lane.clone()).or_default();
            if let Some(r) = retry {
                let since = match &l.waiting {
                    Some(w) if w.offset == r.offset => w.since,
                    _ => SystemTime::now(),
                };
                l.waiting = Some(Waiting {
                    offset: r.offset,
                    aggregate,
                    attempts: r.attempts,
                    reason: r.reason,
                    error: r.error,
                    since,
                    backoff: r.backoff,
                    until: now + r.backoff,
                    dead_letter: r.dead_letter,
                });
            } else if l.waiting.as_ref().is_some_and(|w| w.offset != first.offset) {
                l.waiting = None;
            }
            for e in back.into_iter().rev() {
                l.queue.push_front(e);
            }
        }
        if self.lanes.get(&lane).is_some_and(|l| l.queue.is_empty()) {
            self.lanes.remove(&lane);
        }
        flowed
    }

    /// Partitions whose committable offset moved: `(tp, offset)` where
    /// `offset` is the newest record below which every record is done
    /// (store it; the group then resumes after it).
    pub fn committable(&mut self) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.partitions {
            let (Some(first), Some(next)) = (p.first, p.next) else { continue };
            let done_through = p.open.first().map_or(next - 1, |oldest| oldest - 1);
            if done_through >= first && p.stored.is_none_or(|s| s < done_through) {
                p.stored = Some(done_through);
                out.push((tp.clone(), done_through));
            }
        }
        out
    }

    /// Forget revoked partitions: their records come again, to whichever
    /// member is assigned them, from the committed offset.
    pub fn revoke(&mut self, tps: &[Tp]) {
        for tp in tps {
            self.partitions.remove(tp);
        }
        self.lanes.retain(|k, _| !tps.contains(k.tp()));
    }

    /// Partitions to pause now, each with the offset to fetch from when
    /// resumed: they hold `limit` records or more not done.
    pub fn to_pause(&mut self) -> Vec<(Tp, i64)> {
        let limit = self.limit;
        self.partitions
            .iter_mut()
            .filter(|(_, p)| !p.paused && p.open.len() >= limit)
            .filter_map(|(tp, p)| {
                p.paused = true;
                p.next.map(|n| (tp.clone(), n))
            })
            .collect()
    }

    /// Paused partitions to resume now: down to half the limit.
    pub fn to_resume(&mut self) -> Vec<Tp> {
        let half = self.limit / 2;
        self.partitions
            .iter_mut()
            .filter(|(_, p)| p.paused && p.open.len() <= half)
            .map(|(tp, p)| {
                p.paused = false;
                tp.clone()
            })
            .collect()
    }

    /// Whether `tp` is paused for holding too many records.
    pub fn is_paused(&self, tp: &Tp) -> bool {
        self.partitions.get(tp).is_some_and(|p| p.paused)
    }

    /// When the next waiting lane may go on.
    pub fn next_due(&self) -> Option<Instant> {
        self.lanes.values().filter_map(|l| l.waiting.as_ref().map(|w| w.until)).min()
    }

    /// The waiting record of each partition that has one (its oldest), in
    /// partition order.
    pub fn waiting(&self) -> Vec<(Tp, &Waiting)> {
        let mut oldest: BTreeMap<&Tp, &Waiting> = BTreeMap::new();
        for (k, l) in &self.lanes {
            let Some(w) = &l.waiting else { continue };
            let tp = k.tp();
            if oldest.get(tp).is_none_or(|o| w.offset < o.offset) {
                oldest.insert(tp, w);
            }
        }
        oldest.into_iter().map(|(tp, w)| (tp.clone(), w)).collect()
    }

    /// Waiting records of aggregates (key ordering), longest waiting
    /// first, at most `n`, with the records queued behind each.
    pub fn longest_waiting(&self, n: usize) -> Vec<(Tp, &Waiting, usize)> {
        let mut all: Vec<(Tp, &Waiting, usize)> = self
            .lanes
            .iter()
            .filter_map(|(k, l)| match (k, &l.waiting) {
                (LaneKey::Aggregate(tp, _), Some(w)) => Some((tp.clone(), w, l.queue.len().saturating_sub(1))),
                _ => None,
            })
            .collect();
        all.sort_by_key(|(_, w, _)| w.since);
        all.truncate(n);
        all
    }

    /// The largest current backoff, zero if none waits.
    pub fn max_backoff(&self) -> Duration {
        self.lanes.values().filter_map(|l| l.waiting.as_ref().map(|w| w.backoff)).max().unwrap_or_default()
    }

    /// Records taken and not done yet.
    pub fn open(&self) -> usize {
        self.partitions.values().map(|p| p.open.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("t".to_owned(), p)
    }

    fn retry(offset: i64, attempts: u32, ms: u64) -> Retry {
        Retry {
            offset,
            attempts,
            reason: reason::WEBHOOK,
            error: "503".into(),
            backoff: Duration::from_millis(ms),
            dead_letter: None,
        }
    }

    /// Take `(partition, offset, key)` records.
    fn lanes(order: EventOrder, records: &[(i32, i64, &str)]) -> Lanes<()> {
        let mut l = Lanes::new(order, 100);
        for (p, o, k) in records {
            assert!(l.accept(tp(*p), *o, Some(k), ()));
        }
        l
    }

    /// Finish every run, the record at `(partition, offset)` of `failing` failing.
    fn finish_all(l: &mut Lanes<()>, runs: Vec<Run<()>>, failing: Option<(i32, i64)>, now: Instant) {
        for run in runs {
            let mut failed = false;
            let results = run
                .entries
                .into_iter()
                .map(|e| {
                    let progress = if failed {
                        Progress::Skipped
                    } else if failing == Some((e.tp.1, e.offset)) {
                        failed = true;
                        Progress::Retry(retry(e.offset, 1, 100))
                    } else {
                        Progress::Done
                    };
                    (e, progress)
                })
                .collect();
            l.finish(run.lane, results, now);
        }
    }

    fn offsets(run: &Run<()>) -> Vec<i64> {
        run.entries.iter().map(|e| e.offset).collect()
    }

    #[test]
    fn key_order_makes_a_lane_per_aggregate_within_and_across_partitions() {
        let mut l = lanes(EventOrder::Key, &[(0, 0, "a"), (0, 1, "b"), (0, 2, "a"), (1, 0, "a"), (1, 1, "c")]);
        let runs = l.take_ready(Instant::now());
        let got: Vec<Vec<i64>> = runs.iter().map(offsets).collect();
        assert_eq!(got, [vec![0, 2], vec![1], vec![0], vec![1]], "a@p0, b@p0, a@p1, c@p1");
        let mut p = lanes(EventOrder::Partition, &[(0, 0, "a"), (0, 1, "b"), (1, 0, "a")]);
        assert_eq!(p.take_ready(Instant::now()).iter().map(offsets).collect::<Vec<_>>(), [vec![0, 1], vec![0]]);
        let mut u = lanes(EventOrder::Unordered, &[(0, 0, "a"), (0, 1, "a")]);
        assert_eq!(u.take_ready(Instant::now()).len(), 2, "every record on its own");
    }

    #[test]
    fn a_retry_holds_its_aggregate_and_the_partitions_offset_but_not_the_other_aggregates() {
        let t0 = Instant::now();
        let mut l = lanes(EventOrder::Key, &[(0, 0, "a"), (0, 1, "b"), (0, 2, "a"), (0, 3, "b")]);
        let runs = l.take_ready(t0);
        finish_all(&mut l, runs, Some((0, 0)), t0);
        assert!(l.committable().is_empty(), "offset 0 is not done: nothing may be committed");
        assert!(l.accept(tp(0), 4, Some("b"), ()));
        assert!(l.accept(tp(0), 5, Some("a"), ()));
        let runs = l.take_ready(t0 + Duration::from_millis(50));
        assert_eq!(runs.iter().map(offsets).collect::<Vec<_>>(), [vec![4]], "b flows; a waits with 0, 2, 5 behind");
        finish_all(&mut l, runs, None, t0);
        assert!(l.committable().is_empty());
        let waits = l.waiting();
        assert_eq!((waits.len(), waits[0].1.offset, waits[0].1.aggregate.as_deref()), (1, 0, Some("a")));
        assert_eq!(l.longest_waiting(5)[0].2, 2, "two records queue behind it");
        assert_eq!(l.next_due(), Some(t0 + Duration::from_millis(100)));
        let runs = l.take_ready(t0 + Duration::from_millis(100));
        assert_eq!(runs.iter().map(offsets).collect::<Vec<_>>(), [vec![0, 2, 5]], "in order, after the backoff");
        assert_eq!(runs[0].prior.attempts, 1);
        let run = runs.into_iter().next().unwrap();
        let results = run.entries.into_iter().map(|e| (e, Progress::Done)).collect();
        let flowed = l.finish(run.lane, results, t0);
        assert_eq!(flowed.map(|w| w.offset), Some(0));
        assert_eq!(l.committable(), [(tp(0), 5)], "everything done through 5");
        assert!(l.waiting().is_empty() && l.open() == 0);
    }

    #[test]
    fn the_committable_offset_stays_below_the_oldest_record_not_done() {
        let t0 = Instant::now();
        let mut l = lanes(EventOrder::Unordered, &[(0, 10, "a"), (0, 11, "b"), (0, 12, "c")]);
        let runs = l.take_ready(t0);
        finish_all(&mut l, runs, Some((0, 11)), t0);
        assert_eq!(l.committable(), [(tp(0), 10)], "10 done, 11 waits, 12 done");
        assert!(l.committable().is_empty(), "handed out once");
        assert!(!l.accept(tp(0), 11, Some("b"), ()), "fetched again after a seek: already taken");
        assert!(l.accept(tp(0), 14, Some("d"), ()), "a gap in offsets is fine");
    }

    #[test]
    fn a_partition_holding_too_many_records_pauses_and_resumes_at_half() {
        let t0 = Instant::now();
        let mut l = Lanes::new(EventOrder::Key, 4);
        for o in 0..4 {
            assert!(l.accept(tp(0), o, Some("a"), ()));
        }
        assert_eq!(l.to_pause(), [(tp(0), 4)]);
        assert!(!l.accept(tp(0), 4, Some("a"), ()), "paused: it comes again on resume");
        assert!(l.to_resume().is_empty());
        let runs = l.take_ready(t0);
        finish_all(&mut l, runs, Some((0, 1)), t0);
        assert_eq!(l.open(), 3);
        assert!(l.to_resume().is_empty(), "3 > 2");
        let runs = l.take_ready(t0 + Duration::from_secs(1));
        finish_all(&mut l, runs, Some((0, 3)), t0);
        assert_eq!(l.to_resume(), [tp(0)]);
        assert!(l.accept(tp(0), 4, Some("a"), ()));
    }

    #[test]
    fn a_revoked_partition_is_forgotten_and_starts_afresh() {
        let t0 = Instant::now();
        let mut l = lanes(EventOrder::Key, &[(0, 5, "a"), (1, 5, "b")]);
        let runs = l.take_ready(t0);
        finish_all(&mut l, runs, Some((0, 5)), t0);
        l.revoke(&[tp(0)]);
        assert!(l.waiting().iter().all(|(t, _)| *t != tp(0)));
        assert!(l.accept(tp(0), 3, Some("a"), ()), "from the committed offset again");
        assert_eq!(l.committable(), [(tp(1), 5)]);
    }

    #[test]
    fn retries_of_one_record_keep_their_first_failure_time() {
        let t0 = Instant::now();
        let mut l = lanes(EventOrder::Key, &[(0, 3, "a")]);
        let runs = l.take_ready(t0);
        finish_all(&mut l, runs, Some((0, 3)), t0);
        let since = l.waiting()[0].1.since;
        let runs = l.take_ready(t0 + Duration::from_secs(1));
        finish_all(&mut l, runs, Some((0, 3)), t0);
        assert_eq!(l.waiting()[0].1.since, since);
    }
}
