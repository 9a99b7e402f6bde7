//! Stable hash of an aggregate id into a fixed number of virtual buckets,
//! and the bucket ranges relays shard an outbox by. All events of one
//! aggregate share a bucket, so sharding never breaks per-aggregate order.
//! The hash is 32-bit FNV-1a over the UTF-8 bytes: fixed forever, because
//! stored rows carry its value.

use mongodb::bson::{Document, doc};

/// Virtual buckets per outbox unless configured otherwise.
pub const DEFAULT_BUCKETS: u32 = 256;

fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in bytes {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The bucket of `aggregate_id` among `buckets` (which must be >= 1).
pub fn bucket_of(aggregate_id: &str, buckets: u32) -> u32 {
    assert!(buckets >= 1, "bucket count must be at least 1");
    fnv1a32(aggregate_id.as_bytes()) % buckets
}

/// One shard of an outbox: range `index` of `count`, the buckets
/// `first..=last`. The first range also takes rows whose `bucket` is
/// missing, negative or not a number, and the last every bucket past
/// `last` (rows written with more buckets than the relays split): the
/// ranges of one split cover every row exactly once, whatever its writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketRange {
    /// The range's number, 0-based, in bucket order.
    pub index: u32,
    /// How many ranges the buckets are split into.
    pub count: u32,
    pub first: u32,
    pub last: u32,
}

impl BucketRange {
    /// The whole outbox as one range (an unsharded relay).
    pub fn whole() -> Self {
        split(DEFAULT_BUCKETS, 1)[0]
    }

    pub fn is_whole(&self) -> bool {
        self.count <= 1
    }

    /// Whether a row with this `bucket` belongs to the range.
    pub fn contains(&self, bucket: u32) -> bool {
        let after_first = self.index == 0 || bucket >= self.first;
        let before_last = self.index + 1 >= self.count || bucket <= self.last;
        after_first && before_last
    }

    /// A short label for metrics and status: `0-63`.
    pub fn label(&self) -> String {
        format!("{}-{}", self.first, self.last)
    }

    /// What names this range's lease and checkpoint apart from the other
    /// ranges' (`r1of4`); `None` for the whole outbox, whose names are the
    /// outbox's own.
    pub fn tag(&self) -> Option<String> {
        (!self.is_whole()).then(|| format!("r{}of{}", self.index, self.count))
    }

    /// The query condition on `field` (`bucket`, or `fullDocument.bucket`
    /// in a change stream) that selects the range's rows; `None` for the
    /// whole outbox.
    pub fn filter(&self, field: &str) -> Option<Document> {
        if self.is_whole() {
            return None;
        }
        let (first, last) = (i64::from(self.first), i64::from(self.last));
        Some(if self.index == 0 {
            // `$not` also matches a missing or non-numeric bucket.
            doc! {field: {"$not": {"$gt": last}}}
        } else if self.index + 1 == self.count {
            doc! {field: {"$gte": first}}
        } else {
            doc! {field: {"$gte": first, "$lte": last}}
        })
    }

    /// `filter` merged into an existing query.
    pub fn restrict(&self, mut query: Document) -> Document {
        if let Some(f) = self.filter("bucket") {
            query.extend(f);
        }
        query
    }
}

/// Cut `buckets` buckets into `shards` contiguous ranges whose sizes differ
/// by at most one (the first ranges take the remainder). `shards` is
/// clamped to 1..=buckets.
pub fn split(buckets: u32, shards: u32) -> Vec<BucketRange> {
    let buckets = buckets.max(1);
    let count = shards.clamp(1, buckets);
    let (size, extra) = (buckets / count, buckets % count);
    let mut first = 0;
    (0..count)
        .map(|index| {
            let len = size + u32::from(index < extra);
            let range = BucketRange { index, count, first, last: first + len - 1 };
            first += len;
            range
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            // Past the split's buckets too (a writer with more buckets).
            for b in 0..buckets * 2 {
                assert_eq!(ranges.iter().filter(|r| r.contains(b)).count(), 1, "bucket {b}");
            }
        }
        assert_eq!(split(256, 0).len(), 1, "at least one shard");
        assert_eq!(split(4, 9).len(), 4, "no more shards than buckets");
        assert_eq!(split(256, 4)[1].label(), "64-127");
        assert_eq!(split(256, 4)[1].tag().as_deref(), Some("r1of4"));
        assert_eq!(BucketRange::whole().tag(), None);
        assert!(BucketRange::whole().filter("bucket").is_none());
    }

    #[test]
    fn range_filters_cover_every_row_once_and_agree_with_contains() {
        let ranges = split(256, 3);
        assert_eq!(ranges[0].filter("bucket"), Some(doc! {"bucket": {"$not": {"$gt": 85_i64}}}));
        assert_eq!(ranges[1].filter("bucket"), Some(doc! {"bucket": {"$gte": 86_i64, "$lte": 170_i64}}));
        assert_eq!(ranges[2].filter("fullDocument.bucket"), Some(doc! {"fullDocument.bucket": {"$gte": 171_i64}}));
        assert_eq!(
            ranges[1].restrict(doc! {"status": "failed"}),
            doc! {"status": "failed", "bucket": {"$gte": 86_i64, "$lte": 170_i64}}
        );
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn buckets_are_stable_and_in_range() {
        // Pinned values: changing them would re-shard stored rows.
        assert_eq!(bucket_of("a", 256), 0x2c);
        assert_eq!(bucket_of("foobar", 256), 0x68);
        assert_eq!(bucket_of("anything", 1), 0);
        for i in 0..1000 {
            assert!(bucket_of(&format!("agg-{i}"), 7) < 7);
        }
    }

    #[test]
    fn buckets_spread_uuid_like_ids() {
        let mut counts = [0u32; 16];
        for _ in 0..16_000 {
            counts[bucket_of(&uuid::Uuid::now_v7().to_string(), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (700..1300).contains(&c)), "{counts:?}");
    }
}
