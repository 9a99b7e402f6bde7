//! Relay scale-out against the real stack: several `outbox relay` processes
//! share one outbox split into bucket ranges, each range published by one
//! relay at a time. Ranges move while events flow (a relay SIGKILLed, relays
//! joining and leaving), and every event still reaches Kafka with the first
//! copy of each in commit order within its aggregate.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use mongodb::bson::{Document, doc};
use outbox_operator::{
    lease::range_lease_name,
    outbox::{Outbox, bucket::split, checkpoint::Checkpoints},
};

const SHARDS: u32 = 6;
const LEASE_SECONDS: u64 = 3;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A relay process of the outbox split into `SHARDS` ranges.
fn relay(db: &mongodb::Database, topic: &str, id: &str) -> common::Process {
    relay_of_split(db, topic, id, SHARDS)
}

fn relay_of_split(db: &mongodb::Database, topic: &str, id: &str, shards: u32) -> common::Process {
    let (shards, lease, listen) = (shards.to_string(), LEASE_SECONDS.to_string(), format!("127.0.0.1:{}", free_port()));
    #[rustfmt::skip]
    let args = [
        "--relay-id", id, "--shards", &shards, "--lease-seconds", &lease, "--lease-backend", "mongodb",
        "--metrics-listen", &listen, "--poll-interval-ms", "200",
    ];
    common::relay_process(db, topic, &args)
}

/// The recorded holder of each range's lease.
async fn holders(db: &mongodb::Database) -> Vec<Option<String>> {
    holders_of_split(db, SHARDS).await
}

async fn holders_of_split(db: &mongodb::Database, shards: u32) -> Vec<Option<String>> {
    let leases = db.collection::<Document>("outbox_leases");
    let mut out = Vec::new();
    for range in split(256, shards) {
        let name = range_lease_name(db.name(), "outbox", &range);
        let d = leases.find_one(doc! {"_id": &name}).await.unwrap();
        out.push(d.and_then(|d| d.get_str("holder").ok().filter(|h| !h.is_empty()).map(str::to_owned)));
    }
    out
}

/// How many ranges each relay holds (`None`: a range nobody holds).
async fn shares(db: &mongodb::Database) -> BTreeMap<Option<String>, usize> {
    let mut c = BTreeMap::new();
    for h in holders(db).await {
        *c.entry(h).or_default() += 1;
    }
    c
}

fn share(pairs: &[(&str, usize)]) -> BTreeMap<Option<String>, usize> {
    pairs.iter().map(|(k, v)| (Some((*k).to_owned()), *v)).collect()
}

fn signal(sig: &str, child: &common::Process) {
    let ok = std::process::Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {}", child.id());
}

async fn setup(name: &str) -> (common::TestDb, String) {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique(name)));
    Outbox::new(&db, "outbox").ensure_indexes().await.unwrap();
    let topic = common::unique(&format!("{name}-events"));
    common::create_topic(&topic, 3).await;
    (db, topic)
}

/// A relay that holds all `SHARDS` ranges, alone on the outbox, and
/// follows each range's change stream (its first-start scan is over, so
/// nothing written from now on is published twice by it).
async fn sole_relay(db: &mongodb::Database, topic: &str, id: &str) -> common::Process {
    let r = relay(db, topic, id);
    common::eventually(&format!("{id} holds and streams all {SHARDS} ranges"), Duration::from_secs(30), || async {
        let streaming =
            Checkpoints::all(db, "outbox").await.unwrap().iter().filter(|(_, c)| c.position_time().is_some()).count();
        shares(db).await == share(&[(id, SHARDS as usize)]) && streaming == SHARDS as usize
    })
    .await;
    r
}

/// Sessions refreshed without pause until the returned sender says stop.
type Writer = (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<HashMap<String, Vec<String>>>);

fn start_writing(db: &mongodb::Database) -> Writer {
    let (stop, writing) = tokio::sync::watch::channel(false);
    (stop, tokio::spawn(common::write_refreshing_sessions(db.clone(), 48, writing)))
}

/// Stop writing, read the topic, and check that every event is there with
/// the first copies in commit order per aggregate. Returns the number of
/// events written and the ids of the events read more than once.
async fn stop_writing_and_check(topic: &str, (stop, writer): Writer) -> (usize, Vec<String>) {
    stop.send(true).unwrap();
    let order = writer.await.unwrap();
    let events: usize = order.values().map(Vec::len).sum();
    let mut records = common::consume_all(&common::kafka_bootstrap(), topic, events, Duration::from_secs(60)).await;
    common::assert_first_copies_in_commit_order(&mut records, &order);
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for r in &records {
        *copies.entry(r.headers["eventId"].as_str()).or_default() += 1;
    }
    let duplicated = copies.into_iter().filter(|(_, n)| *n > 1).map(|(id, _)| id.to_string()).collect();
    (events, duplicated)
}

/// Of `ids`, those whose rows were published at the first try: no failed
/// attempt and no outage retry recorded. A second copy of such an event
/// can only come from a replay of the change stream (a range resumed before
/// the old owner's last checkpoint); a retried event may be in Kafka twice
/// on its own (a send that timed out on the relay after the broker wrote
/// it, which librdkafka cannot tell apart from a lost one).
async fn published_at_first_try(db: &mongodb::Database, ids: &[String]) -> Vec<String> {
    let rows = db.collection::<Document>("outbox");
    let filter = doc! {"_id": {"$in": ids}, "attempts": {"$in": [0, null]}, "outageRetries": {"$in": [0, null]}};
    let mut found: Vec<String> = Vec::new();
    let mut cursor = rows.find(filter).await.unwrap();
    while cursor.advance().await.unwrap() {
        found.push(cursor.deserialize_current().unwrap().get_str("_id").unwrap().to_string());
    }
    found
}

#[tokio::test]
async fn three_relays_share_the_ranges_and_a_killed_ones_are_taken_over_once_its_lease_runs_out() {
    let (db, topic) = setup("shards-kill").await;
    let relays: Vec<common::Process> =
        ["relay-a", "relay-b", "relay-c"].iter().map(|id| relay(&db, &topic, id)).collect();
    common::eventually("the 6 ranges shared 2/2/2 by the three relays", Duration::from_secs(30), || async {
        shares(&db).await == share(&[("relay-a", 2), ("relay-b", 2), ("relay-c", 2)])
    })
    .await;
    let writer = start_writing(&db);
    tokio::time::sleep(Duration::from_secs(3)).await;

    signal("-KILL", &relays[1]);
    let killed = Instant::now();
    common::eventually("relay-b's ranges taken over by the others", Duration::from_secs(20), || async {
        holders(&db).await.iter().all(|h| h.as_deref().is_some_and(|h| h != "relay-b"))
    })
    .await;
    let takeover = killed.elapsed();
    println!("relay-b's ranges taken over {takeover:?} after its SIGKILL (lease {LEASE_SECONDS} s)");
    // The survivors may take a range once its lease has run out unrenewed
    // for a whole lease on their own clock: one lease after the last
    // renewal they saw, plus a round of the plan (a second) and a claim.
    assert!(
        takeover <= Duration::from_secs(LEASE_SECONDS + 3),
        "ranges taken over {takeover:?} after the kill, more than the lease ({LEASE_SECONDS} s) plus 3 s"
    );
    common::eventually("the survivors hold 3 ranges each", Duration::from_secs(10), || async {
        shares(&db).await == share(&[("relay-a", 3), ("relay-c", 3)])
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (events, duplicated) = stop_writing_and_check(&topic, writer).await;
    println!("{events} events, {} in Kafka twice (relay-b's unsaved progress, republished)", duplicated.len());
    drop(relays);
}

#[tokio::test]
async fn scaling_from_one_relay_to_three_and_back_while_events_flow_keeps_every_event_in_order() {
    let (db, topic) = setup("shards-scale").await;
    let a = sole_relay(&db, &topic, "relay-a").await;
    let writer = start_writing(&db);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Scale out: two relays join, and two ranges each are handed to them.
    let joined = Instant::now();
    let mut others: Vec<common::Process> = ["relay-b", "relay-c"].iter().map(|id| relay(&db, &topic, id)).collect();
    common::eventually("the ranges shared 2/2/2", Duration::from_secs(30), || async {
        shares(&db).await == share(&[("relay-a", 2), ("relay-b", 2), ("relay-c", 2)])
    })
    .await;
    println!("scaled out 1 -> 3 in {:?}", joined.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Scale in: SIGTERM, as a Deployment does; each hands its ranges back
    // after settling and checkpointing what it sent.
    let left = Instant::now();
    for r in &others {
        signal("-TERM", r);
    }
    for r in others.iter_mut() {
        let status = r.wait().unwrap();
        assert!(status.success(), "a relay leaving on SIGTERM exits cleanly: {status}");
    }
    common::eventually("relay-a holds all 6 ranges again", Duration::from_secs(30), || async {
        shares(&db).await == share(&[("relay-a", 6)])
    })
    .await;
    println!("scaled in 3 -> 1 in {:?}", left.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (events, duplicated) = stop_writing_and_check(&topic, writer).await;
    let replayed = published_at_first_try(&db, &duplicated).await;
    println!(
        "{events} events through 8 hand-overs, {} in Kafka twice, {} of them published at the first try",
        duplicated.len(),
        replayed.len()
    );
    assert_eq!(
        replayed,
        Vec::<String>::new(),
        "a clean hand-over resumes exactly at the checkpoint the old owner saved: only a retried send may be in \
         Kafka twice"
    );
    drop(a);
}

#[tokio::test]
async fn a_new_split_waits_for_the_old_splits_relays_then_resumes_from_their_checkpoints() {
    let (db, topic) = setup("shards-resplit").await;
    let mut old = sole_relay(&db, &topic, "relay-old").await;
    let writer = start_writing(&db);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A relay of another split (a rolling update changing the split) takes
    // nothing while a relay of the split in force is live.
    let new = relay_of_split(&db, &topic, "relay-new", 2);
    tokio::time::sleep(Duration::from_secs(2 * LEASE_SECONDS)).await;
    assert_eq!(holders_of_split(&db, 2).await, vec![None, None], "the new split waits");
    assert_eq!(shares(&db).await, share(&[("relay-old", 6)]), "the old split keeps publishing");

    signal("-TERM", &old);
    assert!(old.wait().unwrap().success());
    common::eventually("relay-new holds both ranges of its split", Duration::from_secs(30), || async {
        holders_of_split(&db, 2).await.iter().all(|h| h.as_deref() == Some("relay-new"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (events, duplicated) = stop_writing_and_check(&topic, writer).await;
    println!("{events} events across the change of split, {} in Kafka twice", duplicated.len());
    // Resumed from the old split's oldest token: no rescan of the outbox.
    let all = Checkpoints::all(&db, "outbox").await.unwrap();
    for (key, c) in all.iter().filter(|(k, _)| k.ends_with("of2")) {
        assert!(c.position_time().is_some(), "{key} has a stream position");
        assert_eq!(c.recovery, None, "{key} resumed from the old split's checkpoints, without a rescan");
    }
    let old_epoch = all.iter().filter(|(k, _)| k.ends_with("of6")).map(|(_, c)| c.epoch).max().unwrap();
    let new_epoch = all.iter().filter(|(k, _)| k.ends_with("of2")).map(|(_, c)| c.epoch).min().unwrap();
    assert!(new_epoch > old_epoch, "the new split's positions sort after the old one's ({new_epoch} vs {old_epoch})");
    drop(new);
}
