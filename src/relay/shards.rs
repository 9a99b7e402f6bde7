//! Bucket-range shards of one outbox, and which relay owns which.
//!
//! Every outbox row carries `bucket` (a stable hash of its aggregate id into
//! `buckets` virtual buckets), so one aggregate always falls in one shard:
//! relays that each publish their own shards keep per-aggregate order.
//! `split` cuts the buckets into contiguous ranges; `assign` decides who
//! owns each range from who owns it now and which relays are live. It is a
//! pure function of that shared view, so every relay computes the same plan
//! and acts on its own part (give up what it no longer owns, take what it
//! now owns); it moves as few ranges as it can while keeping every relay
//! within one range of every other.

use std::collections::BTreeMap;

/// One shard: the buckets `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketRange {
    /// The shard's number, 0-based, in bucket order.
    pub index: u32,
    pub first: u32,
    pub last: u32,
}

impl BucketRange {
    pub fn contains(&self, bucket: u32) -> bool {
        (self.first..=self.last).contains(&bucket)
    }

    /// A short label for metrics and status: `0-63`.
    pub fn label(&self) -> String {
        format!("{}-{}", self.first, self.last)
    }
}

/// Cut `buckets` buckets into `shards` contiguous ranges whose sizes differ
/// by at most one (the first ranges take the remainder). `shards` is
/// clamped to 1..=buckets.
pub fn split(buckets: u32, shards: u32) -> Vec<BucketRange> {
    let buckets = buckets.max(1);
    let shards = shards.clamp(1, buckets);
    let (size, extra) = (buckets / shards, buckets % shards);
    let mut first = 0;
    (0..shards)
        .map(|index| {
            let len = size + u32::from(index < extra);
            let range = BucketRange { index, first, last: first + len - 1 };
            first += len;
            range
        })
        .collect()
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
    fn split_covers_every_bucket_once_in_near_equal_ranges() {
        for (buckets, shards) in [(256, 1), (256, 3), (256, 8), (256, 256), (7, 3), (10, 4)] {
            let ranges = split(buckets, shards);
            assert_eq!(ranges.len(), shards as usize);
            assert_eq!(ranges[0].first, 0);
            assert_eq!(ranges.last().unwrap().last, buckets - 1);
            for w in ranges.windows(2) {
                assert_eq!(w[1].first, w[0].last + 1, "contiguous");
            }
            let sizes: Vec<u32> = ranges.iter().map(|r| r.last - r.first + 1).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
            for b in 0..buckets {
                assert_eq!(ranges.iter().filter(|r| r.contains(b)).count(), 1, "bucket {b}");
            }
        }
        assert_eq!(split(256, 0).len(), 1, "at least one shard");
        assert_eq!(split(4, 9).len(), 4, "no more shards than buckets");
        assert_eq!(split(256, 4)[1].label(), "64-127");
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
    fn no_live_relay_means_no_owner() {
        assert_eq!(assign(&[Some("a".to_owned())], &[]), vec![None]);
    }
}
