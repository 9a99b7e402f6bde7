//! The outbox's indexes and the relay's queries against the stack's
//! MongoDB: index migration from earlier versions, due rows around a batch
//! in flight, per-aggregate blocking, and marking where each row landed.

mod common;

use std::time::Duration;

use futures::TryStreamExt;
use mongodb::{
    IndexModel,
    bson::{DateTime, Document, doc},
    options::IndexOptions,
};
use outbox_operator::outbox::{
    Outbox,
    relay_queries::{Failure, InFlight, Published},
};

fn fresh_db(client: &mongodb::Client, name: &str) -> mongodb::Database {
    client.database(&format!("outbox-store-{name}-{}", std::process::id()))
}

async fn index_names(db: &mongodb::Database) -> Vec<String> {
    let mut names: Vec<String> = db.collection::<Document>("outbox").list_index_names().await.unwrap();
    names.sort();
    names
}

#[tokio::test]
async fn indexes_of_an_earlier_version_are_replaced_once_and_the_ttl_retuned_in_place() {
    let client = common::mongo().await;
    let db = fresh_db(&client, "migrate");
    let coll = db.collection::<Document>("outbox");
    // What the first release created: full (not partial) indexes.
    let named = |keys: Document, name: &str, ttl: Option<u64>| {
        let options = IndexOptions::builder().name(name.to_owned()).expire_after(ttl.map(Duration::from_secs)).build();
        IndexModel::builder().keys(keys).options(options).build()
    };
    coll.create_indexes([
        named(doc! {"status": 1, "nextAttemptAt": 1}, "due", None),
        named(doc! {"status": 1, "_id": 1}, "status_order", None),
        named(doc! {"aggregateId": 1, "_id": 1}, "aggregate_order", None),
        named(doc! {"publishedAt": 1}, "retention", Some(3600)),
    ])
    .await
    .unwrap();
    let outbox = Outbox::new(&db, "outbox");

    let first = outbox.ensure_indexes(Some(Duration::from_secs(3600))).await.unwrap();
    let mut dropped = first.dropped.clone();
    dropped.sort();
    assert_eq!(dropped, ["aggregate_order", "due", "retention", "status_order"]);
    assert_eq!(index_names(&db).await, ["_id_", "blocking", "due", "retention", "unpublished"]);

    let again = outbox.ensure_indexes(Some(Duration::from_secs(3600))).await.unwrap();
    assert!(again.is_empty(), "a second start must change nothing: {again:?}");

    let retuned = outbox.ensure_indexes(Some(Duration::from_secs(7200))).await.unwrap();
    assert_eq!(
        (retuned.retuned.as_slice(), retuned.created.len(), retuned.dropped.len()),
        (&["retention".to_owned()][..], 0, 0)
    );
    // Without a retention period (the session API) the relay's TTL stays.
    assert!(outbox.ensure_indexes(None).await.unwrap().is_empty());
    let ttl = coll
        .list_indexes()
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.options.as_ref().and_then(|o| o.name.as_deref()) == Some("retention"))
        .and_then(|i| i.options.and_then(|o| o.expire_after));
    assert_eq!(ttl, Some(Duration::from_secs(7200)));
    db.drop().await.unwrap();
}

#[tokio::test]
async fn rows_in_flight_are_not_due_and_aggregates_failed_or_dead_wait() {
    let client = common::mongo().await;
    let db = fresh_db(&client, "due");
    // 3 sessions x 2 events, interleaved: [a1, b1, c1, a2, b2, c2].
    let ids = common::seed_outbox(&db, 3, 2).await;
    let outbox = Outbox::new(&db, "outbox");
    let now = DateTime::now();
    let all = outbox.due_batch(now, 100, &InFlight::default()).await.unwrap();
    assert_eq!(all.rows.iter().map(|r| r.id.clone()).collect::<Vec<_>>(), ids);
    let aggregate = |i: usize| all.rows[i].aggregate_id.clone();

    // a1, b1, c1 are being marked; a1 failed in that batch: a2 waits.
    let in_flight = InFlight { ids: ids[..3].to_vec(), failed_aggregates: std::iter::once(aggregate(0)).collect() };
    let next = outbox.due_batch(now, 100, &in_flight).await.unwrap();
    assert_eq!(next.rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), [&ids[4], &ids[5]]);
    assert_eq!(next.held_back, 1);

    // a1 dead, b1 failed and not yet due: a2 and b2 wait, c1 and c2 flow.
    let failure = |id: &str, retry_at: Option<DateTime>| Failure {
        id: id.to_owned(),
        attempts: 1,
        error: "test".into(),
        retry_at,
        backoff_ms: 60_000,
    };
    let later = DateTime::from_millis(now.timestamp_millis() + 60_000);
    assert_eq!(outbox.mark_failed(&[failure(&ids[0], None), failure(&ids[1], Some(later))]).await.unwrap(), 2);
    let claim = outbox.due_batch(now, 100, &InFlight::default()).await.unwrap();
    assert_eq!(claim.rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), [&ids[2], &ids[5]]);
    assert_eq!(claim.held_back, 2);
    // Once b1 is due again it comes first, and b2 follows it in the batch.
    let claim = outbox.due_batch(DateTime::from_millis(later.timestamp_millis() + 1), 100, &InFlight::default()).await;
    let claim = claim.unwrap();
    assert_eq!(claim.rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), [&ids[1], &ids[2], &ids[4], &ids[5]]);

    let stats = outbox.stats(now).await.unwrap();
    assert_eq!((stats.pending, stats.failed, stats.dead, stats.blocked_aggregates), (4, 1, 1, 2));
    db.drop().await.unwrap();
}

#[tokio::test]
async fn marking_records_each_rows_own_partition_and_offset_across_chunks() {
    let client = common::mongo().await;
    let db = fresh_db(&client, "mark");
    let ids = common::seed_outbox(&db, 250, 1).await;
    let outbox = Outbox::new(&db, "outbox");
    let landed: Vec<Published> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Published {
            id: id.clone(),
            partition: (i % 6) as i32,
            offset: 1000 + i as i64,
            retried: i % 5 == 0,
        })
        .collect();
    // Every fifth row failed once before: its error and backoff must go.
    let retried: Vec<&str> = landed.iter().filter(|p| p.retried).map(|p| p.id.as_str()).collect();
    db.collection::<Document>("outbox")
        .update_many(
            doc! {"_id": {"$in": &retried}},
            doc! {"$set": {"status": "failed", "attempts": 1, "lastError": "broker down", "backoffMs": 100_i64}},
        )
        .await
        .unwrap();
    let at = DateTime::now();
    assert_eq!(outbox.mark_published(&landed, at).await.unwrap(), 250);
    let rows = common::outbox_rows(&db).await;
    for (row, want) in rows.iter().zip(&landed) {
        assert_eq!(row.get_str("_id").unwrap(), want.id);
        assert_eq!(row.get_str("status").unwrap(), "published");
        assert_eq!((row.get_i32("partition").unwrap(), row.get_i64("offset").unwrap()), (want.partition, want.offset));
        assert_eq!(row.get_i32("attempts").unwrap(), if want.retried { 2 } else { 1 });
        assert!(!row.contains_key("lastError") && !row.contains_key("backoffMs"), "{row}");
    }
    // A second mark (a relay that lost its lease) changes nothing.
    assert_eq!(outbox.mark_published(&landed, DateTime::now()).await.unwrap(), 0);
    let stats = outbox.stats(DateTime::now()).await.unwrap();
    assert_eq!((stats.pending, stats.published), (0, 250));
    assert_eq!(stats.last_published_at, Some(at));
    db.drop().await.unwrap();
}
