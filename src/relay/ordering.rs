//! The per-aggregate order rule, apart from Kafka: **an event is handed to
//! the producer only once the previous event of its aggregate is
//! acknowledged**, and nothing after a failed event of an aggregate is
//! sent until the retry path publishes its backlog in order.
//!
//! So an aggregate has at most one event sent and unanswered, and its later
//! events in flight wait in `Waiting`, in commit order, whichever batch
//! they are in. When the broker answers the sent one, `acknowledged` gives
//! the next event to send, or `stopped` (a failure) every waiting event to
//! hold. The work per answer is constant, however many events wait.

use std::collections::{HashMap, VecDeque};

/// The events waiting for their aggregate's previous event, per aggregate,
/// in commit order. `K` says where an event is (its batch and place).
#[derive(Debug)]
pub struct Waiting<K> {
    queues: HashMap<String, VecDeque<K>>,
}

impl<K> Default for Waiting<K> {
    fn default() -> Self {
        Self { queues: HashMap::new() }
    }
}

impl<K> Waiting<K> {
    /// `event` of `aggregate` waits behind the aggregate's events in flight.
    pub fn push(&mut self, aggregate: &str, event: K) {
        match self.queues.get_mut(aggregate) {
            Some(queue) => queue.push_back(event),
            None => {
                self.queues.insert(aggregate.to_owned(), VecDeque::from([event]));
            }
        }
    }

    /// The aggregate's previous event is acknowledged: its next event to
    /// send, if one waits.
    pub fn acknowledged(&mut self, aggregate: &str) -> Option<K> {
        let queue = self.queues.get_mut(aggregate)?;
        let next = queue.pop_front();
        if queue.is_empty() {
            self.queues.remove(aggregate);
        }
        next
    }

    /// The aggregate's previous event failed (or its next one could not be
    /// sent): every event of it waiting, to hold.
    pub fn stopped(&mut self, aggregate: &str) -> VecDeque<K> {
        self.queues.remove(aggregate).unwrap_or_default()
    }

    /// Events waiting, over every aggregate.
    pub fn len(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_acknowledgement_releases_the_next_event_of_its_aggregate_only() {
        let mut waiting = Waiting::default();
        for (aggregate, event) in [("a", 2), ("b", 12), ("a", 3)] {
            waiting.push(aggregate, event);
        }
        assert_eq!(waiting.acknowledged("a"), Some(2));
        assert_eq!(waiting.len(), 2, "one event per acknowledgement");
        assert_eq!(waiting.acknowledged("a"), Some(3));
        assert_eq!(waiting.acknowledged("a"), None, "nothing waits behind the last one");
        assert_eq!(waiting.acknowledged("b"), Some(12));
        assert!(waiting.is_empty());
    }

    #[test]
    fn a_failure_holds_every_waiting_event_of_its_aggregate_in_order() {
        let mut waiting = Waiting::default();
        for (aggregate, event) in [("a", 2), ("b", 12), ("a", 3), ("a", 4)] {
            waiting.push(aggregate, event);
        }
        assert_eq!(Vec::from(waiting.stopped("a")), vec![2, 3, 4]);
        assert_eq!(waiting.acknowledged("a"), None, "nothing of it is sent after the failure");
        assert_eq!(waiting.acknowledged("b"), Some(12), "other aggregates go on");
    }

    #[test]
    fn an_aggregate_with_nothing_waiting_has_nothing_to_release_or_hold() {
        let mut waiting: Waiting<u32> = Waiting::default();
        assert_eq!(waiting.acknowledged("a"), None);
        assert!(waiting.stopped("a").is_empty());
    }
}
