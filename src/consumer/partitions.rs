//! Per-partition isolation: a record that must be tried again holds only
//! its own partition. The consumer pauses that partition and rewinds it to
//! the record (librdkafka drops what it had fetched past it), keeps the
//! others flowing, and resumes it when the record's backoff ends; the
//! record then comes back and is tried again. This module is the
//! bookkeeping of which partitions wait, for what, until when, and how
//! many attempts each waiting record has had. Pure: the caller pauses,
//! seeks and resumes.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime},
};

/// A topic partition.
pub type Tp = (String, i32);

/// Why a partition waits (the `reason` label of `outbox_consumer_waiting`
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

/// A record of a partition that is being retried.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub offset: i64,
    /// Failed attempts at it so far.
    pub attempts: u32,
    pub reason: &'static str,
    pub error: String,
    /// When it first failed.
    pub since: SystemTime,
    /// Its current backoff.
    pub backoff: Duration,
    /// Paused until then; `None` once resumed (the record is on its way back).
    pub paused_until: Option<Instant>,
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

/// The waiting partitions of one consumer.
#[derive(Debug, Default)]
pub struct Partitions {
    waiting: BTreeMap<Tp, Waiting>,
}

impl Partitions {
    /// Whether records of `tp` are to be dropped (paused and rewound: they
    /// will come again).
    pub fn is_paused(&self, tp: &Tp) -> bool {
        self.waiting.get(tp).is_some_and(|w| w.paused_until.is_some())
    }

    /// The earlier tries at the record at `offset` of `tp`.
    pub fn prior(&self, tp: &Tp, offset: i64) -> Prior {
        match self.waiting.get(tp) {
            Some(w) if w.offset == offset => Prior { attempts: w.attempts, dead_letter: w.dead_letter.clone() },
            _ => Prior::default(),
        }
    }

    /// The record failed: its partition is paused until `now + backoff`.
    pub fn hold(&mut self, tp: Tp, r: Retry, now: Instant) {
        let since = match self.waiting.get(&tp) {
            Some(w) if w.offset == r.offset => w.since,
            _ => SystemTime::now(),
        };
        self.waiting.insert(
            tp,
            Waiting {
                offset: r.offset,
                attempts: r.attempts,
                reason: r.reason,
                error: r.error,
                since,
                backoff: r.backoff,
                paused_until: Some(now + r.backoff),
                dead_letter: r.dead_letter,
            },
        );
    }

    /// A record of `tp` reached its end: the partition no longer waits.
    /// Returns what it waited for, if it did.
    pub fn done(&mut self, tp: &Tp) -> Option<Waiting> {
        self.waiting.remove(tp)
    }

    /// Partitions whose pause has ended by `now`: to resume. They stay
    /// waiting (for the metric and the status) until their record is done.
    pub fn due(&mut self, now: Instant) -> Vec<Tp> {
        let mut out = Vec::new();
        for (tp, w) in &mut self.waiting {
            if w.paused_until.is_some_and(|t| t <= now) {
                w.paused_until = None;
                out.push(tp.clone());
            }
        }
        out
    }

    /// When the next pause ends.
    pub fn next_due(&self) -> Option<Instant> {
        self.waiting.values().filter_map(|w| w.paused_until).min()
    }

    /// After a rebalance every paused partition is resumed at once (its
    /// assignment may have changed; a partition still ours restarts from
    /// the committed offset, which is at or before its waiting record).
    /// Attempt counts are kept.
    pub fn rebalanced(&mut self) -> Vec<Tp> {
        let mut out = Vec::new();
        for (tp, w) in &mut self.waiting {
            if w.paused_until.take().is_some() {
                out.push(tp.clone());
            }
        }
        out
    }

    /// The largest current backoff, zero if none waits.
    pub fn max_backoff(&self) -> Duration {
        self.waiting.values().map(|w| w.backoff).max().unwrap_or_default()
    }

    pub fn waiting(&self) -> impl Iterator<Item = (&Tp, &Waiting)> {
        self.waiting.iter()
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

    #[test]
    fn a_held_partition_pauses_alone_until_its_backoff_ends() {
        let mut p = Partitions::default();
        let t0 = Instant::now();
        p.hold(tp(1), retry(7, 1, 100), t0);
        assert!(p.is_paused(&tp(1)));
        assert!(!p.is_paused(&tp(0)), "other partitions flow");
        assert_eq!(p.next_due(), Some(t0 + Duration::from_millis(100)));
        assert!(p.due(t0 + Duration::from_millis(50)).is_empty());
        assert_eq!(p.due(t0 + Duration::from_millis(100)), vec![tp(1)]);
        assert!(!p.is_paused(&tp(1)), "resumed: the record comes back");
        assert_eq!(p.waiting().count(), 1, "still waiting until the record is done");
        assert_eq!(p.prior(&tp(1), 7).attempts, 1);
        assert_eq!(p.prior(&tp(1), 8), Prior::default(), "another offset starts afresh");
        assert_eq!(p.done(&tp(1)).map(|w| w.offset), Some(7));
        assert_eq!(p.waiting().count(), 0);
        assert_eq!(p.max_backoff(), Duration::ZERO);
    }

    #[test]
    fn retries_of_one_record_keep_their_first_failure_time_and_count() {
        let mut p = Partitions::default();
        let t0 = Instant::now();
        p.hold(tp(0), retry(3, 1, 10), t0);
        let since = p.waiting().next().unwrap().1.since;
        p.due(t0 + Duration::from_millis(10));
        let mut r = retry(3, 2, 20);
        r.dead_letter = Some("too large".into());
        p.hold(tp(0), r, t0);
        let (_, w) = p.waiting().next().unwrap();
        assert_eq!((w.attempts, w.since, w.backoff), (2, since, Duration::from_millis(20)));
        assert_eq!(p.prior(&tp(0), 3), Prior { attempts: 2, dead_letter: Some("too large".into()) });
    }

    #[test]
    fn a_rebalance_resumes_every_paused_partition_and_keeps_attempts() {
        let mut p = Partitions::default();
        let t0 = Instant::now();
        p.hold(tp(0), retry(1, 2, 1000), t0);
        p.hold(tp(1), retry(5, 1, 1000), t0);
        assert_eq!(p.max_backoff(), Duration::from_secs(1));
        assert_eq!(p.rebalanced(), vec![tp(0), tp(1)]);
        assert!(p.next_due().is_none());
        assert_eq!(p.prior(&tp(0), 1).attempts, 2);
    }
}
