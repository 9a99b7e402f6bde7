//! The outbox's indexes, the relay's checkpoint and its per-row queries
//! against the stack's MongoDB: index migration from earlier versions, the
//! fence on every write, one lease backend per outbox, backlogs in
//! `holdSeq` order, stats without a scan of history, and cleanup that
//! never deletes an unpublished row.

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
    checkpoint::{CheckpointError, Checkpoints, Progress},
    relay_queries::{Failure, FailureKind, Published, RowChanges, first_id_of_millisecond},
};

fn fresh_db(client: &mongodb::Client, name: &str) -> common::TestDb {
    common::TestDb::new(client.database(&format!("outbox-store-{name}-{}", std::process::id())))
}

async fn index_names(db: &mongodb::Database) -> Vec<String> {
    let mut names: Vec<String> = db.collection::<Document>("outbox").list_index_names().await.unwrap();
    names.sort();
    names
}

async fn status_of(db: &mongodb::Database, id: &str) -> Option<String> {
    let d = db.collection::<Document>("outbox").find_one(doc! {"_id": id}).await.unwrap().unwrap();
    d.get_str("status").ok().map(str::to_owned)
}

/// A resume token for tests of the checkpoint (any BSON document).
fn token(n: i32) -> mongodb::change_stream::event::ResumeToken {
    mongodb::bson::from_document(doc! {"_data": format!("{n:08}")}).unwrap()
}

#[tokio::test]
async fn indexes_of_earlier_versions_are_replaced_once() {
    let client = common::mongo().await;
    let db = fresh_db(&client, "migrate");
    let coll = db.collection::<Document>("outbox");
    // What the first release and relay v1 created.
    let named = |keys: Document, name: &str, ttl: Option<u64>| {
        let options = IndexOptions::builder().name(name.to_owned()).expire_after(ttl.map(Duration::from_secs)).build();
        IndexModel::builder().keys(keys).options(options).build()
    };
    coll.create_indexes([
        named(doc! {"status": 1, "nextAttemptAt": 1}, "due", None),
        named(doc! {"status": 1, "_id": 1}, "status_order", None),
        named(doc! {"aggregateId": 1, "_id": 1}, "blocking", None),
        named(doc! {"status": 1, "_id": 1, "x": 1}, "unpublished", None),
        named(doc! {"publishedAt": 1}, "retention", Some(3600)),
    ])
    .await
    .unwrap();
    let outbox = Outbox::new(&db, "outbox");

    let first = outbox.ensure_indexes().await.unwrap();
    let mut dropped = first.dropped.clone();
    dropped.sort();
    assert_eq!(dropped, ["blocking", "due", "retention", "status_order", "unpublished"]);
    assert_eq!(index_names(&db).await, ["_id_", "blocking", "due"]);
    let again = outbox.ensure_indexes().await.unwrap();
    assert!(again.is_empty(), "a second start must change nothing: {again:?}");
}

#[tokio::test]
async fn a_stale_relays_writes_are_refused_and_change_nothing() {
    let client = common::mongo().await;
    let db = fresh_db(&client, "fence");
    let ids = common::seed_outbox(&db, 3, 1).await;
    let outbox = Outbox::new(&db, "outbox");
    let checkpoints = Checkpoints::new(&db, "outbox");
    let old = checkpoints.claim("relay-a", "mongodb", Duration::from_secs(45)).await.unwrap();
    let new = checkpoints.claim("relay-b", "mongodb", Duration::from_secs(45)).await.unwrap();
    assert_eq!(new.epoch, old.epoch + 1, "each claim bumps the epoch");

    let failure = Failure {
        id: ids[0].clone().into(),
        attempts: 1,
        outage_retries: 0,
        kind: FailureKind::Unexplained,
        label: "broker",
        error: "x".into(),
        retry_at: Some(DateTime::now()),
        backoff_ms: 1000,
        hold_seq: 1,
    };
    let changes =
        RowChanges { failed: vec![failure], held: vec![(ids[1].clone(), 2)], published: vec![], discarded: vec![] };
    let refused = outbox.set_aside(&checkpoints, &old, &changes, DateTime::now()).await;
    assert!(matches!(refused, Err(CheckpointError::Fenced { ref holder, .. }) if holder == "relay-b"), "{refused:?}");
    assert_eq!((status_of(&db, &ids[0]).await, status_of(&db, &ids[1]).await), (None, None), "nothing written");
    let progress = Progress { token: token(1), last_event: Some((ids[2].clone(), DateTime::now())), published: 3 };
    assert!(matches!(checkpoints.save(&old, &progress).await, Err(CheckpointError::Fenced { .. })));
    assert_eq!(checkpoints.load().await.unwrap().unwrap().published, 0, "the stale checkpoint is not saved");

    outbox.set_aside(&checkpoints, &new, &changes, DateTime::now()).await.unwrap();
    assert_eq!(status_of(&db, &ids[0]).await.as_deref(), Some("failed"));
    assert_eq!(status_of(&db, &ids[1]).await.as_deref(), Some("held"));
    checkpoints.save(&new, &progress).await.unwrap();
    assert_eq!(checkpoints.load().await.unwrap().unwrap().published, 3);
}

#[tokio::test]
async fn a_relay_holding_another_lease_cannot_claim_an_active_outbox() {
    let client = common::mongo().await;
    let db = fresh_db(&client, "backend");
    let checkpoints = Checkpoints::new(&db, "outbox");
    let in_cluster = "Kubernetes Lease team-a/outbox-relay-sessions-outbox-1234abcd";
    checkpoints.claim("pod-a", in_cluster, Duration::from_secs(45)).await.unwrap();
    let refused = checkpoints
        .claim("laptop", "MongoDB lease outbox-relay-sessions-outbox-1234abcd", Duration::from_secs(45))
        .await;
    assert!(
        matches!(&refused, Err(CheckpointError::OtherLease { holder, lease, .. }) if holder == "pod-a" && lease == in_cluster),
        "{refused:?}"
    );
    // The same Lease name in another namespace is another lease.
    let elsewhere = checkpoints
        .claim("pod-b", "Kubernetes Lease team-b/outbox-relay-sessions-outbox-1234abcd", Duration::from_secs(45))
        .await;
    assert!(matches!(elsewhere, Err(CheckpointError::OtherLease { .. })), "{elsewhere:?}");
    assert_eq!(checkpoints.load().await.unwrap().unwrap().holder.as_deref(), Some("pod-a"), "unchanged");
    // Once the other backend's relay has been silent for the window, it may.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    checkpoints
        .claim("laptop", "MongoDB lease outbox-relay-sessions-outbox-1234abcd", Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn backlogs_come_in_hold_order_and_stats_read_no_history() {
    let client = common::mongo().await;
    let db = fresh_db(&client, "backlog");
    // 3 aggregates x 3 events; ids interleave across aggregates.
    let ids = common::seed_outbox(&db, 3, 3).await;
    let outbox = Outbox::new(&db, "outbox");
    let checkpoints = Checkpoints::new(&db, "outbox");
    let fence = checkpoints.claim("relay-a", "mongodb", Duration::from_secs(45)).await.unwrap();
    // Aggregate of ids[0] (events ids[0], ids[3], ids[6]): the first fails,
    // the others are held with hold positions deliberately not in id order.
    let first = db.collection::<Document>("outbox").find_one(doc! {"_id": &ids[0]}).await.unwrap().unwrap();
    let agg = first.get_str("aggregateId").unwrap().to_owned();
    let changes = RowChanges {
        failed: vec![Failure {
            id: ids[0].clone().into(),
            attempts: 0,
            outage_retries: 1,
            kind: FailureKind::Outage,
            label: "timed_out",
            error: "broker".into(),
            retry_at: Some(DateTime::from_millis(DateTime::now().timestamp_millis() + 60_000)),
            backoff_ms: 60_000,
            hold_seq: 10,
        }],
        held: vec![(ids[6].clone(), 11), (ids[3].clone(), 12)],
        published: vec![],
        discarded: vec![],
    };
    outbox.set_aside(&checkpoints, &fence, &changes, DateTime::now()).await.unwrap();
    let backlog: Vec<String> = outbox.backlog(&agg, 10).await.unwrap().into_iter().map(|r| r.id.clone()).collect();
    assert_eq!(backlog, [ids[0].clone(), ids[6].clone(), ids[3].clone()], "holdSeq order, not id order");
    assert_eq!(outbox.backlog_heads().await.unwrap(), [(agg.clone(), false)], "blocked, headed by its failure");
    assert!(outbox.due_aggregates(DateTime::now(), 10).await.unwrap().is_empty(), "not due for a minute");

    // The relay has published up to ids[5] through the stream.
    let progress = Progress { token: token(1), last_event: Some((ids[5].clone(), DateTime::now())), published: 6 };
    checkpoints.save(&fence, &progress).await.unwrap();
    let stats = outbox.stats(DateTime::now()).await.unwrap();
    assert_eq!((stats.pending, stats.failed, stats.held, stats.dead), (2, 1, 2, 0));
    assert_eq!((stats.published, stats.blocked_aggregates), (6, 1));
    assert_eq!(stats.max_backoff_ms, Some(60_000));
    assert_eq!(stats.failed_by_reason, [("timed_out".to_owned(), 1)].into(), "what the failed event waits for");
    assert!(stats.oldest_pending_age_seconds.is_some());

    // A retry publishes the backlog: rows with a status are marked.
    let published: Vec<Published> = backlog
        .iter()
        .enumerate()
        .map(|(i, id)| Published { id: id.clone(), partition: 0, offset: i as i64 })
        .collect();
    let changes = RowChanges { published, ..Default::default() };
    outbox.set_aside(&checkpoints, &fence, &changes, DateTime::now()).await.unwrap();
    assert!(outbox.backlog(&agg, 10).await.unwrap().is_empty());
    assert_eq!(status_of(&db, &ids[3]).await.as_deref(), Some("published"));
}

/// Cleanup deletes published history only, and only rows committed before
/// the position it is given (the checkpoint's), whatever their ids say: a
/// row whose writer's clock runs days behind, committed after that
/// position, has an id older than the retention and has not been read by
/// the relay yet. Deleting by id alone (the earlier rule) deleted it.
#[tokio::test]
async fn cleanup_deletes_only_published_history_committed_before_the_position() {
    let client = common::mongo().await;
    let db = fresh_db(&client, "cleanup");
    let ids = common::seed_outbox(&db, 4, 1).await;
    let outbox = Outbox::new(&db, "outbox");
    let coll = db.collection::<Document>("outbox");
    coll.update_one(doc! {"_id": &ids[0]}, doc! {"$set": {"status": "dead"}}).await.unwrap();
    coll.update_one(doc! {"_id": &ids[1]}, doc! {"$set": {"status": "published"}}).await.unwrap();
    coll.update_one(doc! {"_id": &ids[2]}, doc! {"$set": {"status": "held"}}).await.unwrap();
    let position = operation_time(&client, &db).await;
    // Committed after the position, by a writer whose clock is 10 days behind.
    let ten_days_ago = DateTime::now().timestamp_millis() - 10 * 86_400_000;
    let late_id = format!("{}-7000-8000-000000000000", &first_id_of_millisecond(ten_days_ago)[..13]);
    let mut late = coll.find_one(doc! {"_id": &ids[3]}).await.unwrap().unwrap();
    late.insert("_id", &late_id);
    coll.insert_one(late).await.unwrap();

    let everything = first_id_of_millisecond(DateTime::now().timestamp_millis() + 1);
    let deleted = outbox.delete_published(&everything, position, 100).await.unwrap();
    assert_eq!(deleted, 2, "the retried-published row and the stream-published one");
    let left = |coll: mongodb::Collection<Document>| async move {
        let mut left: Vec<String> =
            coll.distinct("_id", doc! {}).await.unwrap().iter().map(|b| b.as_str().unwrap().to_owned()).collect();
        left.sort();
        left
    };
    let mut kept = vec![ids[0].clone(), ids[2].clone(), late_id.clone()];
    kept.sort();
    assert_eq!(left(coll.clone()).await, kept, "set-aside rows and the row committed after the position stay");
    assert_eq!(outbox.delete_published(&first_id_of_millisecond(0), position, 100).await.unwrap(), 0);
    // Once the position is past it, it goes too.
    let later = operation_time(&client, &db).await;
    assert_eq!(outbox.delete_published(&everything, later, 100).await.unwrap(), 1);
}

/// A cluster time after every write so far to `db` (a majority write's
/// operation time).
async fn operation_time(client: &mongodb::Client, db: &mongodb::Database) -> mongodb::bson::Timestamp {
    let mut session = client.start_session().await.unwrap();
    db.collection::<Document>("marks").insert_one(doc! {}).session(&mut session).await.unwrap();
    session.operation_time().unwrap()
}

/// Status and metrics are read every few seconds over an outbox that keeps
/// days of published history: no query of `stats` may read that history.
/// MongoDB's profiler records what each query examined.
#[tokio::test]
async fn stats_examine_the_set_aside_rows_only_however_long_the_history() {
    let client = common::mongo().await;
    let db = fresh_db(&client, "stats-plans");
    let ids = common::seed_outbox(&db, 500, 4).await; // 2000 rows of published history
    let outbox = Outbox::new(&db, "outbox");
    let coll = db.collection::<Document>("outbox");
    let later = DateTime::from_millis(DateTime::now().timestamp_millis() + 60_000);
    let set_aside = [(&ids[10], "failed"), (&ids[11], "held"), (&ids[12], "dead")];
    for (seq, (id, status)) in set_aside.iter().enumerate() {
        let set = doc! {"status": *status, "holdSeq": seq as i64, "nextAttemptAt": later, "backoffMs": 1000_i64};
        coll.update_one(doc! {"_id": *id}, doc! {"$set": set}).await.unwrap();
    }
    let checkpoints = Checkpoints::new(&db, "outbox");
    let fence = checkpoints.claim("stats", "test lease", Duration::from_secs(30)).await.unwrap();
    let last = ids.iter().max().unwrap().clone();
    checkpoints
        .save(&fence, &Progress { token: token(1), last_event: Some((last, DateTime::now())), published: 2000 })
        .await
        .unwrap();

    db.run_command(doc! {"profile": 2}).await.unwrap();
    let stats = outbox.stats(DateTime::now()).await.unwrap();
    db.run_command(doc! {"profile": 0}).await.unwrap();
    assert_eq!((stats.pending, stats.failed, stats.held, stats.dead), (0, 1, 1, 1));
    assert_eq!((stats.blocked_aggregates, stats.max_backoff_ms), (3, Some(1000)));

    let profiled: Vec<Document> = db
        .collection::<Document>("system.profile")
        .find(doc! {"ns": format!("{}.outbox", db.name())})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(profiled.len() >= 5, "the profiler saw the stats queries: {profiled:?}");
    for op in &profiled {
        let examined = op.get_i64("docsExamined").or_else(|_| op.get_i32("docsExamined").map(i64::from)).unwrap_or(0);
        assert!(
            examined <= set_aside.len() as i64,
            "a stats query read {examined} rows of history (more than the {} set-aside rows): {}",
            set_aside.len(),
            op.get_document("command").map(|c| c.to_string()).unwrap_or_default()
        );
    }
}

/// A checkpoint deleted by hand (to force a recovery) must not take the
/// epochs back: the positions set-aside rows keep order their aggregate's
/// backlog, and a new claim's positions must sort after them.
#[tokio::test]
async fn a_claim_after_the_checkpoint_was_deleted_hands_out_positions_above_the_stored_ones() {
    let client = common::mongo().await;
    let db = fresh_db(&client, "epoch-floor");
    let ids = common::seed_outbox(&db, 1, 1).await;
    let outbox = Outbox::new(&db, "outbox");
    let checkpoints = Checkpoints::new(&db, "outbox");
    let mut fence = checkpoints.claim("relay-a", "mongodb", Duration::from_secs(45)).await.unwrap();
    for _ in 0..4 {
        fence = checkpoints.claim("relay-a", "mongodb", Duration::from_secs(45)).await.unwrap();
    }
    assert_eq!(fence.epoch, 5);
    let held = RowChanges { held: vec![(ids[0].clone(), (5_i64 << 40) | 7)], ..Default::default() };
    outbox.set_aside(&checkpoints, &fence, &held, DateTime::now()).await.unwrap();
    db.collection::<Document>(outbox_operator::outbox::checkpoint::CHECKPOINTS).delete_many(doc! {}).await.unwrap();
    let next = checkpoints.claim("relay-b", "mongodb", Duration::from_secs(45)).await.unwrap();
    assert_eq!(next.epoch, 6, "the epoch continues above the stored positions' (5), not from 1");
}
