//! The per-aggregate order rule, apart from Kafka: **an event is handed to
//! the producer only once the previous event of its aggregate is
//! acknowledged**, and nothing after a failed or held event of an
//! aggregate is sent until the retry path publishes its backlog in order.
//!
//! `Chains` walks the events in flight in commit order (every batch in
//! flight, oldest first) and tells each waiting event whether its turn has
//! come. The publisher feeds it what it knows of each earlier event: sent
//! and unanswered, acknowledged, or stopped (failed, held).

use std::collections::{HashMap, HashSet};

/// Where an aggregate's chain stands at the point of the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chain {
    /// Its last event so far is acknowledged: the next one may go.
    Free,
    /// An event of it is sent and unanswered, or waits: the next one waits.
    Pending,
    /// An event of it failed or is held: every later one is held.
    Stopped,
}

/// What to do with an event that waits for its aggregate's previous event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Its predecessor is not answered yet.
    Wait,
    /// Its predecessor is acknowledged (or it has none in flight and its
    /// aggregate is not set aside): hand it to the producer.
    Send,
    /// Its predecessor failed or is held, or its aggregate is set aside.
    Hold,
}

/// One walk over the events in flight, in commit order.
#[derive(Debug, Default)]
pub struct Chains {
    chains: HashMap<String, Chain>,
}

impl Chains {
    /// An earlier event of `aggregate` was handed to the producer:
    /// `acknowledged` is `None` while unanswered, `Some(false)` when the
    /// broker (or the client) failed it.
    pub fn sent(&mut self, aggregate: &str, acknowledged: Option<bool>) {
        match acknowledged {
            None => self.set(aggregate, Chain::Pending),
            Some(true) => self.set(aggregate, Chain::Free),
            Some(false) => self.set(aggregate, Chain::Stopped),
        }
    }

    /// An earlier event of `aggregate` failed before it was sent, or is held.
    pub fn stopped(&mut self, aggregate: &str) {
        self.set(aggregate, Chain::Stopped);
    }

    /// The turn of a waiting event of `aggregate`. An aggregate with no
    /// earlier event in this walk goes by `blocked` (set aside before the
    /// events in flight). `Send` counts the event as pending from here on:
    /// if handing it over fails, say so with `stopped`.
    pub fn turn(&mut self, aggregate: &str, blocked: &HashSet<String>) -> Turn {
        let turn = match self.chains.get(aggregate) {
            Some(Chain::Pending) => Turn::Wait,
            Some(Chain::Stopped) => Turn::Hold,
            Some(Chain::Free) => Turn::Send,
            None if blocked.contains(aggregate) => Turn::Hold,
            None => Turn::Send,
        };
        match turn {
            Turn::Wait => {}
            Turn::Send => self.set(aggregate, Chain::Pending),
            Turn::Hold => self.set(aggregate, Chain::Stopped),
        }
        turn
    }

    /// A stopped chain stays stopped: nothing after a failure is sent in
    /// the same walk, whatever is learned of events after it.
    fn set(&mut self, aggregate: &str, chain: Chain) {
        match self.chains.get_mut(aggregate) {
            Some(Chain::Stopped) => {}
            Some(current) => *current = chain,
            None => {
                self.chains.insert(aggregate.to_owned(), chain);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> HashSet<String> {
        HashSet::new()
    }

    #[test]
    fn an_event_waits_while_its_predecessor_is_unanswered() {
        let mut walk = Chains::default();
        walk.sent("a", None);
        assert_eq!(walk.turn("a", &none()), Turn::Wait);
        assert_eq!(walk.turn("b", &none()), Turn::Send, "other aggregates go freely");
    }

    #[test]
    fn an_event_goes_once_its_predecessor_is_acknowledged_and_the_next_one_waits_for_it() {
        let mut walk = Chains::default();
        walk.sent("a", Some(true));
        assert_eq!(walk.turn("a", &none()), Turn::Send);
        assert_eq!(walk.turn("a", &none()), Turn::Wait, "one unacknowledged event per aggregate");
    }

    #[test]
    fn everything_after_a_failure_is_held_even_what_is_learned_later() {
        let mut walk = Chains::default();
        walk.sent("a", Some(false));
        walk.sent("a", Some(true));
        assert_eq!(walk.turn("a", &none()), Turn::Hold);
        let mut walk = Chains::default();
        walk.stopped("a");
        assert_eq!(walk.turn("a", &none()), Turn::Hold);
        assert_eq!(walk.turn("a", &none()), Turn::Hold);
    }

    #[test]
    fn a_set_aside_aggregate_holds_unless_an_earlier_event_in_flight_decides() {
        let blocked: HashSet<String> = ["a".to_owned()].into();
        let mut walk = Chains::default();
        assert_eq!(walk.turn("a", &blocked), Turn::Hold);
        // Set aside because of a *later* event that failed: the earlier
        // acknowledged event decides for the one right after it.
        let mut walk = Chains::default();
        walk.sent("a", Some(true));
        assert_eq!(walk.turn("a", &blocked), Turn::Send);
    }

    #[test]
    fn a_failed_hand_over_stops_the_chain() {
        let mut walk = Chains::default();
        assert_eq!(walk.turn("a", &none()), Turn::Send);
        walk.stopped("a");
        assert_eq!(walk.turn("a", &none()), Turn::Hold);
    }
}
