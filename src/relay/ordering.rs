//! The per-aggregate order rule, apart from Kafka: **an aggregate's events
//! are in flight on one producer and one topic at a time**, and nothing
//! after a failed event of an aggregate is sent until the retry path
//! publishes its backlog in order.
//!
//! Events of one aggregate to one topic share a partition (the key is the
//! aggregate id), and the relay's producer is idempotent with librdkafka's
//! gap-less guarantee and no message timeout of its own: it writes a
//! partition's records in the order they were produced, and when one
//! fails, every later one on that producer fails too (the series is cut
//! short, never holed). So several events of an aggregate may be in flight
//! at once, and no later one can reach Kafka before an earlier one. Two
//! producers (the relay replaced one) or two topics (an event routed
//! elsewhere) share no order: an event whose aggregate has events
//! unanswered on another producer or topic waits, in commit order, until
//! they are all answered. When the broker answers, `answered` says whether
//! the aggregate has nothing left unanswered, so its waiting events may
//! go; a failure (`stopped`) gives every waiting event to hold. The work
//! per event and per answer is constant, however many events wait.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use super::producer::Generation;

/// Where an aggregate's unanswered events are: which producer (its
/// generation) and which topic, and how many.
#[derive(Debug)]
struct Unanswered {
    producer: Generation,
    topic: Arc<str>,
    count: usize,
}

/// The aggregates with events in flight: those sent and unanswered, and
/// those waiting, per aggregate, in commit order. `K` says where a waiting
/// event is (its batch and place).
#[derive(Debug)]
pub struct AggregateOrder<K> {
    unanswered: HashMap<String, Unanswered>,
    waiting: HashMap<String, VecDeque<K>>,
}

impl<K> Default for AggregateOrder<K> {
    fn default() -> Self {
        Self { unanswered: HashMap::new(), waiting: HashMap::new() }
    }
}

impl<K: Copy> AggregateOrder<K> {
    /// Whether the next event of `aggregate` may go to `topic` on
    /// `producer` now: nothing of the aggregate waits, and what it has
    /// unanswered is on that producer and topic.
    pub fn may_send(&self, aggregate: &str, topic: &str, producer: Generation) -> bool {
        !self.waiting.contains_key(aggregate) && self.joins_unanswered(aggregate, topic, producer)
    }

    /// Whether an event to `topic` on `producer` would follow the
    /// aggregate's unanswered events in one series (or there are none).
    fn joins_unanswered(&self, aggregate: &str, topic: &str, producer: Generation) -> bool {
        self.unanswered.get(aggregate).is_none_or(|u| u.producer == producer && &*u.topic == topic)
    }

    /// An event of `aggregate` was handed to `producer` for `topic` (which
    /// `may_send` allowed).
    pub fn sent(&mut self, aggregate: &str, topic: &Arc<str>, producer: Generation) {
        match self.unanswered.get_mut(aggregate) {
            Some(u) => {
                debug_assert!(u.producer == producer && u.topic == *topic, "one producer and topic at a time");
                u.count += 1;
            }
            None => {
                self.unanswered.insert(aggregate.to_owned(), Unanswered { producer, topic: topic.clone(), count: 1 });
            }
        }
    }

    /// `event` of `aggregate` waits behind the aggregate's events in flight.
    pub fn wait(&mut self, aggregate: &str, event: K) {
        match self.waiting.get_mut(aggregate) {
            Some(queue) => queue.push_back(event),
            None => {
                self.waiting.insert(aggregate.to_owned(), VecDeque::from([event]));
            }
        }
    }

    /// The broker answered a sent event of `aggregate`. Returns whether
    /// the aggregate now has nothing unanswered and events waiting: they
    /// may go (`next_waiting`).
    pub fn answered(&mut self, aggregate: &str) -> bool {
        if let Some(u) = self.unanswered.get_mut(aggregate) {
            u.count -= 1;
            if u.count > 0 {
                return false;
            }
            self.unanswered.remove(aggregate);
        }
        !self.waiting.is_empty() && self.waiting.contains_key(aggregate)
    }

    /// The aggregate's first waiting event, taken if it may go to `topic`
    /// on `producer` now (`topic` says where a waiting event goes).
    pub fn next_waiting(&mut self, aggregate: &str, producer: Generation, topic: impl Fn(K) -> Arc<str>) -> Option<K> {
        let next = *self.waiting.get(aggregate)?.front()?;
        if !self.joins_unanswered(aggregate, &topic(next), producer) {
            return None;
        }
        let queue = self.waiting.get_mut(aggregate)?;
        queue.pop_front();
        if queue.is_empty() {
            self.waiting.remove(aggregate);
        }
        Some(next)
    }

    /// The aggregate stopped (an event of it failed, or its next one could
    /// not be sent): every event of it waiting, to hold.
    pub fn stopped(&mut self, aggregate: &str) -> VecDeque<K> {
        self.waiting.remove(aggregate).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    /// Events waiting, over every aggregate.
    fn waiting<K>(order: &AggregateOrder<K>) -> usize {
        order.waiting.values().map(VecDeque::len).sum()
    }

    #[test]
    fn an_aggregates_events_to_one_topic_go_together_on_one_producer() {
        let mut order: AggregateOrder<u32> = AggregateOrder::default();
        let t = topic("t");
        for _ in 0..3 {
            assert!(order.may_send("a", "t", 1));
            order.sent("a", &t, 1);
        }
        assert!(!order.answered("a"), "two still unanswered");
        assert!(!order.answered("a"));
        assert!(!order.answered("a"), "nothing waits");
        assert!(order.may_send("a", "t", 2), "nothing unanswered: any producer");
    }

    #[test]
    fn another_producer_or_topic_waits_until_the_aggregate_has_nothing_unanswered() {
        let mut order = AggregateOrder::default();
        let (t, u) = (topic("t"), topic("u"));
        order.sent("a", &t, 1);
        order.sent("a", &t, 1);
        assert!(!order.may_send("a", "t", 2), "a new producer shares no order with the old one");
        assert!(!order.may_send("a", "u", 1), "another topic shares no order with this one");
        assert!(order.may_send("b", "u", 2), "other aggregates go on");
        order.wait("a", 10);
        assert!(!order.may_send("a", "t", 1), "behind a waiting event, even on the same producer and topic");
        order.wait("a", 11);
        assert!(!order.answered("a"), "one still unanswered on the old producer");
        assert!(order.answered("a"), "all answered: the waiting events may go");
        let to = |k: u32| if k == 10 { u.clone() } else { t.clone() };
        assert_eq!(order.next_waiting("a", 2, to), Some(10));
        order.sent("a", &u, 2);
        assert_eq!(order.next_waiting("a", 2, to), None, "the next one goes to another topic: it waits again");
        assert_eq!(waiting(&order), 1);
        assert!(order.answered("a"));
        assert_eq!(order.next_waiting("a", 2, to), Some(11));
        assert_eq!(waiting(&order), 0);
    }

    #[test]
    fn a_failure_holds_every_waiting_event_of_its_aggregate_in_order() {
        let mut order = AggregateOrder::default();
        let t = topic("t");
        order.sent("a", &t, 1);
        for (aggregate, event) in [("a", 2), ("b", 12), ("a", 3), ("a", 4)] {
            order.wait(aggregate, event);
        }
        assert_eq!(Vec::from(order.stopped("a")), vec![2, 3, 4]);
        assert!(!order.answered("a"), "nothing of it waits after the failure");
        assert_eq!(order.next_waiting("b", 1, |_| t.clone()), Some(12), "other aggregates go on");
    }

    #[test]
    fn an_aggregate_with_nothing_in_flight_has_nothing_to_release_or_hold() {
        let mut order: AggregateOrder<u32> = AggregateOrder::default();
        assert!(!order.answered("a"));
        assert_eq!(order.next_waiting("a", 1, |_| topic("t")), None);
        assert!(order.stopped("a").is_empty());
    }
}
