//! The Kafka side of the consumer: the group's librdkafka consumer and
//! its settings, the rebalance context, fetching a batch, pausing and
//! resuming partitions.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, ClientContext, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer},
};

use super::{ConsumeArgs, ordering::Tp, pipeline::Record};
use crate::{Error, Result, lifecycle::Stop};

/// The consumer's librdkafka context: collects the partitions revoked
/// (served inside `recv`), which the loop then forgets.
#[derive(Default)]
pub struct GroupContext {
    revoked: Mutex<Vec<Tp>>,
}

impl GroupContext {
    /// The partitions revoked since the last call.
    pub(super) fn take_revoked(&self) -> Vec<Tp> {
        std::mem::take(&mut *self.revoked.lock().expect("revoked partitions"))
    }

    fn has_revoked(&self) -> bool {
        !self.revoked.lock().expect("revoked partitions").is_empty()
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        tracing::info!(?rebalance, "rebalance");
        if let Rebalance::Revoke(list) = rebalance {
            let tps = list.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect::<Vec<_>>();
            self.revoked.lock().expect("revoked partitions").extend(tps);
        }
    }
}

pub type GroupConsumer = StreamConsumer<GroupContext>;

/// The group's librdkafka consumer: offsets stored by the loop once
/// records are done (`enable.auto.offset.store=false`), committed in the
/// background.
pub fn consumer(args: &ConsumeArgs, group: &str) -> Result<GroupConsumer> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &args.kafka_bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", args.session_timeout_ms.to_string());
    crate::kafka::with_auth(&mut c);
    for (k, v) in &args.consumer_config {
        if k == "enable.auto.offset.store" && v != "false" {
            return Err(Error::Config(
                "enable.auto.offset.store must stay false: offsets are stored after the handler".into(),
            ));
        }
        c.set(k, v);
    }
    c.create_with_context(GroupContext::default())
        .map_err(|source| Error::Kafka { context: "creating the consumer".into(), source })
}

/// Pause a partition and rewind it to `offset`: librdkafka drops what it
/// had fetched past it and, once resumed, fetches from there.
pub(super) fn pause_at(consumer: &GroupConsumer, tp: &Tp, offset: i64) {
    let mut list = TopicPartitionList::new();
    list.add_partition(&tp.0, tp.1);
    if let Err(e) = consumer.pause(&list) {
        tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "pausing the partition");
    }
    if let Err(e) = consumer.seek(&tp.0, tp.1, Offset::Offset(offset), Duration::from_secs(5)) {
        tracing::warn!(topic = %tp.0, partition = tp.1, offset, error = %e, "rewinding the partition");
    }
}

/// Resume the partitions `tps`.
pub(super) fn resume(consumer: &GroupConsumer, tps: Vec<Tp>) {
    if tps.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for (topic, partition) in &tps {
        list.add_partition(topic, *partition);
    }
    // A partition no longer assigned cannot be resumed, and needs not be.
    if let Err(e) = consumer.resume(&list) {
        tracing::debug!(error = %e, ?tps, "resuming partitions");
    }
}

/// The next batch: waits for a first record (`None` at stop; an empty
/// batch at `wake`, when a waiting lane is due), then takes what has
/// arrived, waiting up to `linger` more for a fuller batch, up to `max`
/// records. A batch ends before a record fetched after a revocation: that
/// one is `carried` into the next batch, so the caller can forget the
/// revoked partitions in between.
pub(super) async fn next_batch(
    consumer: &GroupConsumer,
    max: usize,
    linger: Duration,
    wake: Option<Instant>,
    stop: &mut Stop,
    carried: &mut Option<Record>,
) -> Option<Vec<Record>> {
    let mut batch: Vec<Record> = carried.take().into_iter().collect();
    // Whether a revocation came during this `recv`, and its record is to be carried.
    let take = |m: rdkafka::message::BorrowedMessage<'_>, batch: &mut Vec<Record>, carried: &mut Option<Record>| {
        if consumer.context().has_revoked() {
            *carried = Some(m.detach());
            false
        } else {
            batch.push(m.detach());
            true
        }
    };
    let wake = async {
        match wake {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(wake);
    while batch.is_empty() {
        let received = tokio::select! {
            m = consumer.recv() => m,
            _ = stop.changed() => return None,
            _ = &mut wake => return Some(batch),
        };
        match received {
            Ok(m) => {
                if !take(m, &mut batch, carried) {
                    return Some(batch);
                }
            }
            Err(e) => tracing::warn!(error = %e, "consume error"),
        }
    }
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        // A zero wait polls once: what librdkafka has already fetched.
        match tokio::time::timeout_at(deadline.max(tokio::time::Instant::now()), consumer.recv()).await {
            Ok(Ok(m)) => {
                if !take(m, &mut batch, carried) {
                    break;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "consume error");
                break;
            }
            Err(_) => break,
        }
    }
    Some(batch)
}
