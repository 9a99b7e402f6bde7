//! Consumer-group lag read from the broker, without joining the group: per
//! partition, the high watermark minus the group's committed offset. The
//! operator calls this for `EventConsumer` status, so it works while no
//! consumer runs.

use std::time::Duration;

use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
    types::RDKafkaRespErr,
};
use serde::Serialize;

/// Why a group's lag could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LagError {
    /// A call to the broker failed (`what`: which).
    #[error("Kafka, {what}: {source}")]
    Kafka {
        what: String,
        #[source]
        source: KafkaError,
    },
    /// The broker answered with an error for the topic (missing, not authorized).
    #[error("topic {topic}: {code:?}")]
    Topic { topic: String, code: RDKafkaRespErr },
    /// The blocking reader did not finish (panicked or cancelled).
    #[error("the lag reader did not finish: {0}")]
    Reader(#[from] tokio::task::JoinError),
}

fn kafka(what: impl Into<String>) -> impl FnOnce(KafkaError) -> LagError {
    let what = what.into();
    move |source| LagError::Kafka { what, source }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// Next offset the group will read; `None` if it never committed.
    pub committed: Option<i64>,
    pub high_watermark: i64,
    pub low_watermark: i64,
    pub lag: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GroupLag {
    pub total: i64,
    pub partitions: Vec<PartitionLag>,
}

/// The lag of one partition. A group that never committed is behind by
/// everything still retained (from the low watermark).
pub fn partition_lag(committed: Option<i64>, low: i64, high: i64) -> i64 {
    let position = committed.unwrap_or(low).max(low);
    (high - position).max(0)
}

/// Read `group`'s lag on `topics` (blocking librdkafka calls: run it on a
/// blocking thread). `auth`: librdkafka security settings on top of the
/// process's own `KAFKA_AUTH_*` (the operator reads them from a resource's
/// `kafka.authSecret`).
pub fn group_lag(
    bootstrap: &str,
    auth: &[(String, String)],
    group: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<GroupLag, LagError> {
    group_lag_and_retained(bootstrap, auth, group, topics, &[], timeout).map(|(lag, _)| lag)
}

/// [`group_lag`], plus how many records `retained_topics` hold (high minus
/// low watermark; a topic that does not exist holds none), read through the
/// same client: the operator counts dead-letter topics this way, with one
/// Kafka client per probe instead of two.
pub fn group_lag_and_retained(
    bootstrap: &str,
    auth: &[(String, String)],
    group: &str,
    topics: &[String],
    retained_topics: &[String],
    timeout: Duration,
) -> Result<(GroupLag, i64), LagError> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap).set("group.id", group).set("enable.auto.commit", "false");
    super::with_auth(&mut config);
    for (k, v) in auth {
        config.set(k, v);
    }
    let reader: BaseConsumer = config.create().map_err(kafka("creating the client"))?;
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let md = reader.fetch_metadata(Some(topic), timeout).map_err(kafka(format!("metadata of {topic}")))?;
        for t in md.topics() {
            if let Some(err) = t.error() {
                return Err(LagError::Topic { topic: topic.clone(), code: err });
            }
            for p in t.partitions() {
                tpl.add_partition(topic, p.id());
            }
        }
    }
    let committed = reader.committed_offsets(tpl, timeout).map_err(kafka(format!("committed offsets of {group}")))?;
    let mut out = GroupLag::default();
    for el in committed.elements() {
        let (low, high) = reader.fetch_watermarks(el.topic(), el.partition(), timeout).map_err(kafka(format!(
            "watermarks of {}/{}",
            el.topic(),
            el.partition()
        )))?;
        let committed = match el.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        let lag = partition_lag(committed, low, high);
        out.total += lag;
        out.partitions.push(PartitionLag {
            topic: el.topic().to_owned(),
            partition: el.partition(),
            committed,
            high_watermark: high,
            low_watermark: low,
            lag,
        });
    }
    out.partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    let mut retained = 0;
    for topic in retained_topics {
        let Ok(md) = reader.fetch_metadata(Some(topic), timeout) else { continue };
        for t in md.topics().iter().filter(|t| t.error().is_none()) {
            for p in t.partitions() {
                if let Ok((low, high)) = reader.fetch_watermarks(topic, p.id(), timeout) {
                    retained += (high - low).max(0);
                }
            }
        }
    }
    Ok((out, retained))
}

/// [`group_lag_and_retained`] on a blocking thread, for async callers.
pub async fn read_group_lag_and_retained(
    bootstrap: &str,
    auth: &[(String, String)],
    group: &str,
    topics: &[String],
    retained_topics: &[String],
    timeout: Duration,
) -> Result<(GroupLag, i64), LagError> {
    let (b, a, g, t, r) =
        (bootstrap.to_owned(), auth.to_vec(), group.to_owned(), topics.to_vec(), retained_topics.to_vec());
    tokio::task::spawn_blocking(move || group_lag_and_retained(&b, &a, &g, &t, &r, timeout)).await?
}

/// [`group_lag`] on a blocking thread, for async callers.
pub async fn read_group_lag(
    bootstrap: &str,
    auth: &[(String, String)],
    group: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<GroupLag, LagError> {
    read_group_lag_and_retained(bootstrap, auth, group, topics, &[], timeout).await.map(|(lag, _)| lag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_high_watermark_minus_position() {
        assert_eq!(partition_lag(Some(3), 0, 5), 2);
        assert_eq!(partition_lag(Some(5), 0, 5), 0);
        assert_eq!(partition_lag(None, 0, 5), 5, "never committed: everything retained");
        assert_eq!(partition_lag(None, 4, 5), 1, "retention moved the low watermark");
        assert_eq!(partition_lag(Some(1), 4, 9), 5, "a committed offset below the low watermark counts from it");
        assert_eq!(partition_lag(Some(7), 0, 5), 0, "never negative");
    }
}
