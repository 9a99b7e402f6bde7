//! Leases: one active holder of a named lease at a time, held by renewing
//! it before it expires; a standby takes it once it has expired or been
//! released. Two stores: a Kubernetes `Lease` object (`kube`, used in a
//! cluster, and by the operator's own leader election) and a MongoDB
//! document (`mongo`, used by relays outside a cluster). `Lease` picks one
//! for a relay.

pub mod kube;
pub mod mongo;

use std::time::Duration;

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

    /// How long the lease lasts without renewal.
    pub fn ttl(&self) -> Duration {
        match self {
            Lease::Mongo(l) => l.ttl(),
            Lease::Kube(l) => l.ttl(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_dns_labels() {
        assert_eq!(lease_name("outbox-relay-Sessions_db.outbox"), "outbox-relay-sessions-db-outbox");
        assert_eq!(lease_name(&"x".repeat(80)).len(), 63);
        assert_eq!(lease_name("-a-"), "a");
    }
}
