//! Leases: one active holder of a named lease at a time, held by renewing
//! it before it expires; a standby takes it once it has expired or been
//! released.
//!
//! No clock is compared across processes (as in client-go's leader
//! election): the holder counts its lease from the moment it *sent* the
//! renewal, on its own monotonic clock, and must stop acting before that
//! plus the lease duration; a standby takes over only after it has seen the
//! same record, unrenewed, for the lease duration on *its* monotonic clock
//! ([`Observer`]). Clock skew between hosts therefore never hands a live
//! lease to a standby. Two stores: a Kubernetes `Lease` object (`kube`, used in a
//! cluster, and by the operator's own leader election) and a MongoDB
//! document (`mongo`, used by relays outside a cluster). `Lease` picks one
//! for a relay.

pub mod kube;
pub mod mongo;

use crate::outbox::bucket::BucketRange;

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Why a lease could not be read or written (not: "someone else holds it",
/// which is `Ok(false)` from `acquire`).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("Kubernetes Lease: {0}")]
    Kube(#[from] ::kube::Error),
    #[error("MongoDB lease document: {0}")]
    Mongo(#[from] mongodb::error::Error),
}

/// A lease in one of the two stores.
pub enum Lease {
    Mongo(mongo::MongoLease),
    Kube(Box<kube::KubeLease>),
}

impl Lease {
    /// Take or renew the lease. `Ok(false)`: another holder has it.
    pub async fn acquire(&self) -> Result<bool, LeaseError> {
        match self {
            Lease::Mongo(l) => Ok(l.acquire().await?),
            Lease::Kube(l) => Ok(l.acquire().await?),
        }
    }

    /// Give the lease up, so a standby takes over at once.
    pub async fn release(&self) -> Result<(), LeaseError> {
        match self {
            Lease::Mongo(l) => Ok(l.release().await?),
            Lease::Kube(l) => Ok(l.release().await?),
        }
    }

    /// Read the lease's record and note it: its holder as recorded (`None`:
    /// released or never taken), whether or not it is still live. Seeing another
    /// holder's record starts this process's count towards its expiry, as
    /// `acquire` would, so a range this relay is about to take over is
    /// taken one lease after its holder's last renewal was first seen here,
    /// not one lease after the takeover began.
    pub async fn note_holder(&self) -> Result<Option<String>, LeaseError> {
        match self {
            Lease::Mongo(l) => Ok(l.note_holder().await?),
            Lease::Kube(l) => Ok(l.note_holder().await?),
        }
    }

    /// Which lease this is (store, namespace, name), as the outbox
    /// checkpoint records it: one lease per outbox.
    pub fn identity(&self) -> String {
        match self {
            Lease::Mongo(l) => format!("MongoDB lease {}", l.name()),
            Lease::Kube(l) => format!("Kubernetes Lease {}/{}", l.namespace(), l.name()),
        }
    }

    /// How long the lease lasts without renewal.
    pub fn ttl(&self) -> Duration {
        match self {
            Lease::Mongo(l) => l.ttl(),
            Lease::Kube(l) => l.ttl(),
        }
    }
}

/// What a standby has seen of another holder's lease record, on its own
/// monotonic clock.
#[derive(Debug, Default)]
pub struct Observer {
    seen: Mutex<Option<(String, Instant)>>,
}

impl Observer {
    /// Note that the record identified by `key` (holder and version) is
    /// current at `now`. True once the same record has stood unrenewed for
    /// `ttl` since this observer first saw it.
    pub fn expired(&self, key: &str, now: Instant, ttl: Duration) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match &*seen {
            Some((k, since)) if k == key => now.saturating_duration_since(*since) >= ttl,
            _ => {
                *seen = Some((key.to_owned(), now));
                false
            }
        }
    }
}

/// A lease name from any text: lowercase DNS-1123, at most 63 characters
/// (valid as a Kubernetes object name and as a document id).
pub fn lease_name(text: &str) -> String {
    let mut name: String = text
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .collect();
    name.truncate(63);
    name.trim_matches('-').to_owned()
}

/// The lease of an outbox: one per database and collection, whichever
/// resource or process publishes it, the same name in both stores. Readable
/// (`outbox-relay-<database>-<collection>`, cut to fit) and made unique by a
/// hash of the exact pair, so outboxes whose names differ only in cut or
/// replaced characters never share a lease.
pub fn outbox_lease_name(database: &str, collection: &str) -> String {
    range_lease_name(database, collection, &BucketRange::whole())
}

/// The lease of one bucket range of an outbox: the outbox's own for the
/// whole range, else `outbox-relay-<database>-<collection>-r<i>of<n>-<hash>`.
pub fn range_lease_name(database: &str, collection: &str, range: &BucketRange) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in database.bytes().chain([0]).chain(collection.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let tag = range.tag().map(|t| format!("-{t}")).unwrap_or_default();
    let mut readable = lease_name(&format!("outbox-relay-{database}-{collection}"));
    readable.truncate(63 - 9 - tag.len());
    format!("{}{tag}-{h:08x}", readable.trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outbox_has_its_own_lease_name() {
        let name = outbox_lease_name("sessions", "outbox");
        assert!(name.starts_with("outbox-relay-sessions-outbox-"), "{name}");
        assert_eq!(name, outbox_lease_name("sessions", "outbox"), "stable");
        assert!(name.len() <= 63);
        // Names that the DNS rules would merge stay apart.
        assert_ne!(outbox_lease_name("a.b", "outbox"), outbox_lease_name("a-b", "outbox"));
        assert_ne!(outbox_lease_name("a", "b-c"), outbox_lease_name("a-b", "c"));
        let long = "x".repeat(60);
        assert_ne!(outbox_lease_name(&long, "one"), outbox_lease_name(&long, "two"));
        assert!(outbox_lease_name(&long, "one").len() <= 63);
    }

    #[test]
    fn each_range_of_a_split_has_its_own_lease_name_and_the_whole_keeps_the_outboxs() {
        let whole = crate::outbox::bucket::BucketRange::whole();
        assert_eq!(range_lease_name("sessions", "outbox", &whole), outbox_lease_name("sessions", "outbox"));
        let ranges = crate::outbox::bucket::split(256, 16);
        let long = "x".repeat(60);
        let names: std::collections::HashSet<String> =
            ranges.iter().map(|r| range_lease_name(&long, "outbox", r)).collect();
        assert_eq!(names.len(), 16);
        assert!(names.iter().all(|n| n.len() <= 63 && n.contains("of16-")), "{names:?}");
        assert!(range_lease_name("sessions", "outbox", &ranges[3]).starts_with("outbox-relay-sessions-outbox-r3of16-"));
    }

    #[test]
    fn a_standby_counts_expiry_on_its_own_clock_from_when_it_saw_the_record() {
        let o = Observer::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        assert!(!o.expired("a/1", t0, ttl), "first sight starts the count");
        assert!(!o.expired("a/1", t0 + Duration::from_millis(9_999), ttl));
        assert!(o.expired("a/1", t0 + ttl, ttl), "unrenewed for a full lease");
        assert!(!o.expired("a/2", t0 + ttl, ttl), "a renewal starts the count again");
        assert!(!o.expired("a/2", t0 + Duration::from_secs(19), ttl));
        assert!(o.expired("a/2", t0 + Duration::from_secs(20), ttl));
    }

    #[test]
    fn lease_names_are_dns_labels() {
        assert_eq!(lease_name("outbox-relay-Sessions_db.outbox"), "outbox-relay-sessions-db-outbox");
        assert_eq!(lease_name(&"x".repeat(80)).len(), 63);
        assert_eq!(lease_name("-a-"), "a");
    }
}
