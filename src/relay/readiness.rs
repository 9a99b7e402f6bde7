//! What a relay's `/readyz` answers: ready when it is publishing or
//! standing by correctly. That is, once it knows its share of the outbox
//! (its first membership round is done) and every range it owns has been
//! claimed and follows its change stream. Not ready while a range waits
//! for its lease, claims, opens its stream or runs a recovery scan, nor
//! while its last iteration failed (the reason is the answer's body). A
//! relay that owns no range (a standby) is ready once it knows that.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

/// Where one range this relay owns stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeState {
    /// Not publishing yet, and what it is doing.
    Starting(&'static str),
    /// Publishing from its change stream.
    Following,
    /// The last iteration failed with this error; it retries.
    Failing(String),
}

/// The relay's readiness, shared by its ranges.
#[derive(Debug, Default)]
pub struct Readiness {
    planned: AtomicBool,
    /// Ranges this relay publishes, by index.
    ranges: Mutex<BTreeMap<u32, RangeState>>,
}

impl Readiness {
    /// The first membership round is done: the relay knows what it owns.
    pub fn planned(&self) {
        self.planned.store(true, Ordering::Relaxed);
    }

    /// `Ok` when ready, otherwise why not.
    pub fn check(&self) -> Result<(), String> {
        if !self.planned.load(Ordering::Relaxed) {
            return Err("starting: the relay has not yet read which ranges it owns".into());
        }
        let ranges = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        let not_ready: Vec<String> = ranges
            .iter()
            .filter_map(|(index, state)| match state {
                RangeState::Following => None,
                RangeState::Starting(what) => Some(format!("range {index}: {what}")),
                RangeState::Failing(error) => Some(format!("range {index}: failing: {error}")),
            })
            .collect();
        if not_ready.is_empty() { Ok(()) } else { Err(not_ready.join("; ")) }
    }
}

/// One range's entry, removed when the range is given up (dropped).
pub struct RangeReadiness {
    all: Arc<Readiness>,
    index: u32,
}

impl RangeReadiness {
    pub fn new(all: Arc<Readiness>, index: u32) -> Self {
        all.ranges.lock().unwrap_or_else(|p| p.into_inner()).insert(index, RangeState::Starting("starting"));
        Self { all, index }
    }

    pub fn set(&self, state: RangeState) {
        let mut ranges = self.all.ranges.lock().unwrap_or_else(|p| p.into_inner());
        if ranges.get(&self.index) != Some(&state) {
            ranges.insert(self.index, state);
        }
    }
}

impl Drop for RangeReadiness {
    fn drop(&mut self) {
        self.all.ranges.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_planned_and_every_owned_range_follows_its_stream() {
        let all = Arc::new(Readiness::default());
        assert!(all.check().unwrap_err().contains("starting"));
        all.planned();
        assert_eq!(all.check(), Ok(()), "a standby that owns nothing is ready");
        let r0 = RangeReadiness::new(all.clone(), 0);
        let r1 = RangeReadiness::new(all.clone(), 1);
        r0.set(RangeState::Following);
        r1.set(RangeState::Starting("recovering"));
        assert!(all.check().unwrap_err().contains("range 1: recovering"));
        r1.set(RangeState::Failing("MongoDB down".into()));
        assert!(all.check().unwrap_err().contains("range 1: failing: MongoDB down"));
        drop(r1);
        assert_eq!(all.check(), Ok(()), "a range handed over no longer counts");
        r0.set(RangeState::Starting("waiting for the range's lease"));
        assert!(all.check().is_err());
    }
}
