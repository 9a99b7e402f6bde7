//! A lease as a Kubernetes `Lease` (coordination.k8s.io/v1), the same
//! object Kubernetes' own leader election uses: the holder renews
//! `renewTime`; a standby takes the lease once it has seen the same
//! `resourceVersion` for `leaseDurationSeconds` on its own monotonic clock
//! (never by comparing `renewTime` with its wall clock). Updates carry the
//! `resourceVersion`, so two standbys cannot both win.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};

use super::Observer;

pub struct KubeLease {
    api: Api<Lease>,
    namespace: String,
    name: String,
    holder: String,
    ttl: Duration,
    observer: Observer,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl KubeLease {
    pub fn new(client: Client, namespace: &str, name: &str, holder: &str, ttl: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            holder: holder.to_owned(),
            ttl,
            observer: Observer::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn live_holder(spec: &LeaseSpec, now: Timestamp) -> Option<&str> {
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty())?;
        let renewed = spec.renew_time.as_ref()?.0;
        let ttl_ms = i64::from(spec.lease_duration_seconds.unwrap_or(0)) * 1000;
        (renewed.as_millisecond() + ttl_ms > now.as_millisecond()).then_some(holder)
    }

    /// Note `holder`'s record (`spec` at `version`) on this lease's
    /// observer: true once it has stood unrenewed for its duration.
    fn expired(&self, spec: &LeaseSpec, holder: &str, version: &str) -> bool {
        let ttl = spec.lease_duration_seconds.and_then(|s| u64::try_from(s).ok()).map_or(self.ttl, Duration::from_secs);
        self.observer.expired(&format!("{holder}/{version}"), Instant::now(), ttl)
    }

    /// Take or renew the lease. `Ok(false)`: another relay holds it.
    pub async fn acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let seconds = i32::try_from(self.ttl.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.holder.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let current = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if current.as_deref() != Some(self.holder.as_str()) {
            if let Some(other) = &current
                && !self.expired(spec, other, &version)
            {
                return Ok(false);
            }
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.acquire_time = Some(MicroTime(now));
        }
        spec.holder_identity = Some(self.holder.clone());
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(MicroTime(now));
        // `replace` sends the resourceVersion we read: a concurrent writer makes it 409.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up so a standby takes over at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The holder as recorded; another holder's record is noted by this
    /// lease's [`Observer`] (see [`super::Lease::note_holder`]).
    pub async fn note_holder(&self) -> Result<Option<String>, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else { return Ok(None) };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let Some(spec) = lease.spec else { return Ok(None) };
        let Some(holder) = spec.holder_identity.clone().filter(|h| !h.is_empty()) else { return Ok(None) };
        if holder != self.holder {
            self.expired(&spec, &holder, &version);
        }
        Ok(Some(holder))
    }

    /// The current holder, if the lease looks live by this reader's wall
    /// clock (informational only: takeover never relies on it).
    pub async fn holder(&self) -> Result<Option<String>, kube::Error> {
        let lease = self.api.get_opt(&self.name).await?;
        Ok(lease.and_then(|l| l.spec).and_then(|s| Self::live_holder(&s, Timestamp::now()).map(str::to_owned)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_live_until_renew_time_plus_duration() {
        let renewed = Timestamp::from_millisecond(1_000_000).unwrap();
        let spec = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(10),
            renew_time: Some(MicroTime(renewed)),
            ..Default::default()
        };
        let at = |ms: i64| Timestamp::from_millisecond(ms).unwrap();
        assert_eq!(KubeLease::live_holder(&spec, at(1_009_999)), Some("a"));
        assert_eq!(KubeLease::live_holder(&spec, at(1_010_000)), None);
        let released = LeaseSpec { holder_identity: None, ..spec };
        assert_eq!(KubeLease::live_holder(&released, at(1_000_001)), None);
    }
}
