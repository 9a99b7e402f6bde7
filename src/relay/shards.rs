//! Bucket-range shards of one outbox, and which relay owns which.
//!
//! Every outbox row carries `bucket` (a stable hash of its aggregate id into
//! `buckets` virtual buckets), so one aggregate always falls in one shard:
//! relays that each publish their own shards keep per-aggregate order.
//! `bucket::split` cuts the buckets into contiguous ranges; `assign` decides who
//! owns each range from who owns it now and which relays are live. It is a
//! pure function of that shared view, so every relay computes the same plan
//! and acts on its own part (give up what it no longer owns, take what it
//! now owns); it moves as few ranges as it can while keeping every relay
//! within one range of every other.
//!
//! Who is live: every relay heartbeats a document in `outbox_relay_members`
//! (server clock, `$$NOW`) each round; live is "seen within a lease". Who
//! owns what now: the recorded holders of the range leases. Each round
//! (a third of a lease, at most a second) a relay computes the plan, starts
//! publishing the ranges it gains (each waits until its lease is released
//! or has run out) and tells the ranges it loses to stop: they settle what
//! is in flight, save their checkpoint and release checkpoint and lease,
//! so the new owner resumes exactly there. Safety never rests on the plan:
//! a range is published only under its lease and its checkpoint's fencing
//! epoch, so two relays that disagree for a round only wait.
//!
//! Relays of one outbox must agree on the split: a relay whose `--shards`
//! differs from that of the oldest live relay publishes nothing until the
//! relays of the other split have left (a rolling update that changes the
//! split hands over from the old pods to the new ones this way).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use futures::TryStreamExt;
use mongodb::{
    Collection, Database, IndexModel,
    bson::{Document, doc},
    options::IndexOptions,
};
use tokio::sync::watch;

use super::{
    Shared,
    range::{self, AbortOnDrop},
};
use crate::{
    Result,
    lease::Lease,
    lifecycle::{self, Stop, stopped},
    outbox::bucket::BucketRange,
};

/// Collection of the relays' heartbeats, one document per relay and outbox.
pub const MEMBERS: &str = "outbox_relay_members";

/// A live relay of the outbox as its heartbeat says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub relay: String,
    pub shards: u32,
    /// When it first joined (server clock, ms): the oldest decides the split.
    pub since_ms: i64,
}

/// This relay's membership in its outbox's relays.
pub struct Members {
    coll: Collection<Document>,
    outbox: String,
    relay: String,
    shards: u32,
    ttl: Duration,
}

impl Members {
    pub fn new(db: &Database, outbox: &str, relay: &str, shards: u32, ttl: Duration) -> Self {
        Self { coll: db.collection(MEMBERS), outbox: outbox.to_owned(), relay: relay.to_owned(), shards, ttl }
    }

    fn id(&self) -> String {
        format!("{}/{}", self.outbox, self.relay)
    }

    /// Heartbeats of relays gone for a day are deleted (pods get new
    /// names; their documents would otherwise pile up).
    pub async fn ensure_index(&self) -> mongodb::error::Result<()> {
        let ttl = IndexOptions::builder().name("gone".to_owned()).expire_after(Duration::from_secs(86_400)).build();
        self.coll.create_index(IndexModel::builder().keys(doc! {"seen": 1}).options(ttl).build()).await.map(|_| ())
    }

    /// Say this relay is alive now (server clock).
    pub async fn heartbeat(&self) -> mongodb::error::Result<()> {
        let update = vec![doc! {"$set": {
            "outbox": &self.outbox,
            "relay": &self.relay,
            "shards": i64::from(self.shards),
            // A relay seen again after it was not live joins anew.
            "since": {"$cond": [
                {"$gte": [{"$ifNull": ["$seen", 0_i64]}, {"$subtract": ["$$NOW", self.ttl_ms()]}]},
                "$since",
                "$$NOW",
            ]},
            "seen": "$$NOW",
        }}];
        self.coll.update_one(doc! {"_id": self.id()}, update).upsert(true).await.map(|_| ())
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// The relays of the outbox seen within a lease.
    pub async fn live(&self) -> mongodb::error::Result<Vec<Member>> {
        let docs: Vec<Document> = self
            .coll
            .find(doc! {
                "outbox": &self.outbox,
                "$expr": {"$gte": ["$seen", {"$subtract": ["$$NOW", self.ttl_ms()]}]},
            })
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some(Member {
                    relay: d.get_str("relay").ok()?.to_owned(),
                    shards: u32::try_from(d.get_i64("shards").ok()?).ok()?,
                    since_ms: d.get_datetime("since").ok()?.timestamp_millis(),
                })
            })
            .collect())
    }

    /// Leave at a clean shutdown, before giving the ranges up, so the
    /// others plan without this relay at once.
    pub async fn leave(&self) -> mongodb::error::Result<()> {
        self.coll.delete_one(doc! {"_id": self.id()}).await.map(|_| ())
    }
}

/// The relays whose split is the one in force: that of the oldest live
/// relay (ties: the smaller name); `Err` with that split's number of
/// ranges when `mine` is not it.
pub fn peers(live: &[Member], me: &str, mine: u32) -> std::result::Result<Vec<String>, u32> {
    let oldest = live.iter().min_by(|a, b| a.since_ms.cmp(&b.since_ms).then(a.relay.cmp(&b.relay)));
    match oldest {
        Some(o) if o.shards != mine => Err(o.shards),
        _ => {
            let mut same: Vec<String> = live.iter().filter(|m| m.shards == mine).map(|m| m.relay.clone()).collect();
            if !same.iter().any(|m| m == me) {
                same.push(me.to_owned());
            }
            Ok(same)
        }
    }
}

/// A range this relay publishes: the task, and the switch that tells it to
/// hand the range over.
struct Publishing {
    stop: watch::Sender<bool>,
    task: AbortOnDrop<Result<()>>,
}

/// Share the outbox's ranges with the other relays until `stop`, then leave
/// and hand every range over.
pub(crate) async fn run(shared: Arc<Shared>, ranges: Vec<BucketRange>, mut stop: Stop) -> Result<()> {
    let args = &shared.args;
    let leases: Vec<Arc<Lease>> =
        args.leases(&shared.db, &shared.relay_id, &ranges).await?.into_iter().map(Arc::new).collect();
    for r in &ranges {
        shared.metrics.range(&r.label()).leader.set(0);
    }
    let shards = u32::try_from(ranges.len()).unwrap_or(u32::MAX);
    let members = Members::new(&shared.db, &args.outbox_lease()?, &shared.relay_id, shards, shared.lease_ttl);
    members.ensure_index().await?;
    let every = (shared.lease_ttl / 3).min(Duration::from_secs(1));
    let me = shared.relay_id.as_str();
    let mut publishing: HashMap<u32, Publishing> = HashMap::new();
    let mut waiting_for: Option<u32> = None;
    while !stopped(&stop) {
        // Ranges that ended on their own (an error) start again below.
        publishing.retain(|_, p| !p.task.0.is_finished());
        match plan(&members, &leases, me, shards).await {
            Ok(Ok(plan)) => {
                shared.readiness.planned();
                waiting_for = None;
                for (range, owner) in ranges.iter().zip(&plan) {
                    let mine = owner.as_deref() == Some(me);
                    match publishing.get(&range.index) {
                        None if mine => {
                            let (tx, rx) = watch::channel(false);
                            let lease = leases[range.index as usize].clone();
                            let task = tokio::spawn(range::publish(shared.clone(), *range, lease, rx));
                            publishing.insert(range.index, Publishing { stop: tx, task: AbortOnDrop(task) });
                        }
                        Some(p) if !mine && !*p.stop.borrow() => {
                            tracing::info!(range = %range.label(), to = owner.as_deref().unwrap_or("nobody"),
                                "handing the range over");
                            p.stop.send_replace(true);
                        }
                        _ => {}
                    }
                }
            }
            Ok(Err(other)) => {
                shared.readiness.planned();
                if waiting_for != Some(other) {
                    tracing::warn!(
                        mine = shards,
                        theirs = other,
                        "the oldest live relay of this outbox splits it into another number of ranges: publishing \
                         nothing until the relays of that split have left"
                    );
                    waiting_for = Some(other);
                }
                for p in publishing.values() {
                    p.stop.send_replace(true);
                }
            }
            // Keep what is running: a range is safe under its lease whatever
            // the plan says.
            Err(e) => tracing::warn!(error = %e, "reading the relays of the outbox; the ranges stay as they are"),
        }
        lifecycle::sleep_or_stop(&mut stop, every).await;
    }
    if let Err(e) = members.leave().await {
        tracing::warn!(error = %e, "leaving the outbox's relays");
    }
    for p in publishing.values() {
        p.stop.send_replace(true);
    }
    for (_, mut p) in publishing.drain() {
        match (&mut p.task.0).await {
            Ok(Err(e)) => tracing::warn!(error = %e, "a range ended with an error"),
            Err(e) => tracing::warn!(error = %e, "a range's task failed"),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}

/// One round: heartbeat, who is live, who holds each range, and the plan
/// (`Err(shards)`: another split is in force).
async fn plan(
    members: &Members,
    leases: &[Arc<Lease>],
    me: &str,
    shards: u32,
) -> Result<std::result::Result<Vec<Option<String>>, u32>> {
    members.heartbeat().await?;
    let live = members.live().await?;
    let peers = match peers(&live, me, shards) {
        Ok(p) => p,
        Err(other) => return Ok(Err(other)),
    };
    let mut current = Vec::with_capacity(leases.len());
    for lease in leases {
        current.push(lease.note_holder().await?);
    }
    Ok(Ok(assign(&current, &peers)))
}

/// The owner of each of `current.len()` ranges after the change to `live`
/// (the relays alive now, in any order). `current[i]` is range i's owner
/// now (`None`: free, or its owner's lease ran out).
///
/// Each live relay ends with ⌊R/M⌋ or ⌈R/M⌉ of the R ranges (the larger
/// share goes to the relays already holding the most, so fewer move). A
/// relay keeps the ranges it holds, lowest index first, up to its share;
/// the rest, and the ranges of relays no longer live, go in index order to
/// the relay with the most room left (ties: the smaller name). Nothing
/// moves that does not have to.
pub fn assign(current: &[Option<String>], live: &[String]) -> Vec<Option<String>> {
    let mut members: Vec<&str> = live.iter().map(String::as_str).collect();
    members.sort_unstable();
    members.dedup();
    if members.is_empty() {
        return vec![None; current.len()];
    }
    let ranges = current.len();
    let held = |m: &str| current.iter().filter(|o| o.as_deref() == Some(m)).count();
    // Who gets the larger share: those holding the most now.
    let mut by_holding = members.clone();
    by_holding.sort_by(|a, b| held(b).cmp(&held(a)).then(a.cmp(b)));
    let (share, extra) = (ranges / members.len(), ranges % members.len());
    let mut room: BTreeMap<&str, usize> =
        by_holding.iter().enumerate().map(|(i, m)| (*m, share + usize::from(i < extra))).collect();

    let mut next = vec![None; ranges];
    for (i, owner) in current.iter().enumerate() {
        if let Some(owner) = owner.as_deref()
            && let Some(left) = room.get_mut(owner)
            && *left > 0
        {
            *left -= 1;
            next[i] = Some(owner.to_owned());
        }
    }
    for slot in next.iter_mut().filter(|s| s.is_none()) {
        let (member, left) =
            room.iter_mut().max_by(|(a, x), (b, y)| x.cmp(y).then(b.cmp(a))).expect("at least one member");
        debug_assert!(*left > 0, "the shares add up to the ranges");
        *left -= 1;
        *slot = Some((*member).to_owned());
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("relay-{i}")).collect()
    }

    fn counts(plan: &[Option<String>]) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for o in plan.iter().flatten() {
            *c.entry(o.clone()).or_default() += 1;
        }
        c
    }

    fn moved(before: &[Option<String>], after: &[Option<String>]) -> usize {
        before.iter().zip(after).filter(|(b, a)| b.is_some() && b != a).count()
    }

    #[test]
    fn a_first_relay_takes_every_range() {
        let plan = assign(&[None, None, None, None], &names(1));
        assert!(plan.iter().all(|o| o.as_deref() == Some("relay-0")));
    }

    #[test]
    fn scaling_out_moves_only_the_newcomers_share_and_balances() {
        let one = assign(&vec![None; 12], &names(1));
        let two = assign(&one, &names(2));
        assert_eq!(moved(&one, &two), 6);
        assert_eq!(counts(&two).values().copied().collect::<Vec<_>>(), vec![6, 6]);
        let three = assign(&two, &names(3));
        assert_eq!(moved(&two, &three), 4, "only the third relay's share moves");
        assert_eq!(counts(&three).values().copied().collect::<Vec<_>>(), vec![4, 4, 4]);
        // Ranges that stay keep their owner.
        for (before, after) in two.iter().zip(&three) {
            assert!(before == after || after.as_deref() == Some("relay-2"));
        }
    }

    #[test]
    fn a_relay_leaving_hands_over_only_its_own_ranges() {
        let three = assign(&vec![None; 8], &names(3));
        let shares: Vec<usize> = counts(&three).values().copied().collect();
        assert_eq!(shares.iter().sum::<usize>(), 8);
        assert!(shares.iter().all(|&s| s == 2 || s == 3), "{shares:?}");
        let gone = "relay-1";
        let left: Vec<String> = names(3).into_iter().filter(|n| n != gone).collect();
        // Its lease ran out: its ranges show as free.
        let current: Vec<Option<String>> = three.iter().map(|o| o.clone().filter(|o| o != gone)).collect();
        let two = assign(&current, &left);
        for (before, after) in three.iter().zip(&two) {
            if before.as_deref() != Some(gone) {
                assert_eq!(before, after, "a survivor keeps its ranges");
            }
        }
        assert_eq!(counts(&two).values().copied().collect::<Vec<_>>(), vec![4, 4]);
    }

    #[test]
    fn the_plan_is_the_same_whatever_order_relays_see_each_other_in() {
        let current = vec![Some("b".to_owned()), None, Some("a".to_owned()), Some("gone".to_owned()), None];
        let x = assign(&current, &["a".to_owned(), "b".to_owned(), "c".to_owned()]);
        let y = assign(&current, &["c".to_owned(), "a".to_owned(), "b".to_owned(), "a".to_owned()]);
        assert_eq!(x, y);
        assert!(x.iter().all(Option::is_some));
    }

    #[test]
    fn with_more_relays_than_ranges_some_relays_own_nothing() {
        let plan = assign(&[Some("relay-3".to_owned()), None], &names(4));
        assert_eq!(plan[0].as_deref(), Some("relay-3"), "kept");
        assert!(plan[1].is_some());
        assert_eq!(counts(&plan).len(), 2);
    }

    #[test]
    fn the_oldest_live_relays_split_is_in_force() {
        let m = |relay: &str, shards: u32, since_ms: i64| Member { relay: relay.into(), shards, since_ms };
        let live = vec![m("old-a", 1, 10), m("old-b", 1, 20), m("new", 4, 30)];
        assert_eq!(peers(&live, "new", 4), Err(1), "the newcomer waits");
        assert_eq!(peers(&live, "old-a", 1), Ok(vec!["old-a".to_owned(), "old-b".to_owned()]));
        // The old split's relays left: the new one is in force.
        assert_eq!(peers(&live[2..], "new", 4), Ok(vec!["new".to_owned()]));
        // A relay not yet in the list (its first heartbeat unseen) counts itself.
        assert_eq!(peers(&[], "me", 2), Ok(vec!["me".to_owned()]));
    }

    #[test]
    fn no_live_relay_means_no_owner() {
        assert_eq!(assign(&[Some("a".to_owned())], &[]), vec![None]);
    }
}
