//! The Kafka-protocol broker is real: idempotent produce, a consumer group
//! with a committed offset, and the group's lag read back without joining it.

mod common;

use std::time::Duration;

use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};

fn config() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", common::kafka_bootstrap());
    c
}

async fn create_topic(name: &str) {
    let admin: AdminClient<DefaultClientContext> = config().create().expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(name, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(15))),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Kafka broker at {} is not reachable ({e}); start it with `scripts/stack.sh up kafka`",
                common::kafka_bootstrap()
            )
        });
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

#[tokio::test]
async fn idempotent_produce_group_commit_and_lag() {
    let topic = common::unique("smoke-topic");
    let group = common::unique("smoke-group");
    create_topic(&topic).await;

    // One record per batch: the local broker's high watermark is exact then
    // (the local broker reports the last batch's base offset + 1).
    let producer: FutureProducer = config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("batch.num.messages", "1")
        .create()
        .expect("producer");
    for i in 0..5 {
        let payload = format!("event-{i}");
        let delivery = producer
            .send(FutureRecord::to(&topic).key("agg-1").payload(&payload), Duration::from_secs(10))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
        assert_eq!(delivery.offset, i, "offsets are dense and ordered");
    }

    let consumer: StreamConsumer = config()
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).unwrap();
    for i in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("a record within 30 s (group join included)")
            .expect("consume");
        assert_eq!(m.payload_view::<str>().unwrap().unwrap(), format!("event-{i}"));
        assert_eq!(m.key(), Some(&b"agg-1"[..]));
        if i == 2 {
            consumer.commit_message(&m, CommitMode::Sync).expect("commit");
        }
    }
    drop(consumer);

    // Read the group's position and the log end from outside the group.
    let reader: BaseConsumer = config().set("group.id", &group).create().expect("lag reader");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&topic, 0);
    let committed = reader.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
    let committed = committed.find_partition(&topic, 0).expect("partition 0").offset();
    assert_eq!(committed, Offset::Offset(3), "committed offset is the next record to read");
    let (low, high) = reader.fetch_watermarks(&topic, 0, Duration::from_secs(10)).expect("watermarks");
    assert_eq!((low, high), (0, 5));
    let Offset::Offset(c) = committed else { unreachable!() };
    assert_eq!(high - c, 2, "lag = high watermark - committed offset");
}
