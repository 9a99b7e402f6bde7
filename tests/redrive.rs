//! Day-2 operations through the Kubernetes API: dead events listed in an
//! OutboxRelay's status and announced by Events, and `OutboxRedrive`
//! requests (redrive, discard) run by an in-process operator against the
//! stack's kube-apiserver, created by a user bound only to the chart's
//! requester role, carried out by a relay publishing to the stack's broker.

mod common;

use std::{path::PathBuf, time::Duration};

use k8s_openapi::api::core::v1::Event;
use kube::{Api, api::ListParams};
use mongodb::bson::{Document, doc};
use outbox_operator::operator::{
    self, OperatorArgs,
    crd::OutboxRelay,
    crd::redrive::{OutboxRedrive, RedrivePhase},
};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/outbox-operator");

struct Namespace {
    client: kube::Client,
    ns: String,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = common::kubectl(&["delete", "namespace", &self.ns, "--wait=false"], None);
    }
}

/// A fresh namespace with an in-process operator watching it, the MongoDB
/// Secret, and user `user` bound to the chart's requester role there.
async fn namespace_with_operator(prefix: &str, user: &str) -> Namespace {
    let client = common::kube_client().await;
    common::apply_crds(&client).await;
    let ns = common::unique(prefix);
    assert!(common::kubectl(&["create", "namespace", &ns], None).0);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let args = OperatorArgs { leader_election: false, ..common::operator_args(&ns, &format!("operator-{prefix}")) };
    tokio::spawn(operator::run_until(args, stop_rx));
    common::create_mongodb_secret(&client, &ns).await;
    // The chart's user roles, as `helm install` creates them (release `outbox-roles`).
    let helm = common::stack_env("OUTBOX_HELM");
    let rendered = std::process::Command::new(&helm)
        .args(["template", "outbox-roles", CHART, "--show-only", "templates/user-roles.yaml"])
        .output()
        .unwrap_or_else(|e| panic!("{helm} (OUTBOX_HELM, installed by scripts/stack.sh) could not run: {e}"));
    assert!(rendered.status.success(), "helm template: {}", String::from_utf8_lossy(&rendered.stderr));
    // The tests of this file apply the same cluster roles at once: applied
    // on the server, a create that another test's create beat is an update.
    let roles = String::from_utf8_lossy(&rendered.stdout);
    let (ok, out) = common::kubectl(&["apply", "--server-side", "-f", "-"], Some(&roles));
    assert!(ok, "{out}");
    let (ok, out) = common::kubectl(
        &["create", "rolebinding", "requester", "-n", &ns, "--clusterrole", "outbox-roles-outbox-operator-requester"]
            .into_iter()
            .chain(["--user", user])
            .collect::<Vec<_>>(),
        None,
    );
    assert!(ok, "{out}");
    Namespace { client, ns, stop }
}

fn relay_yaml(name: &str, database: &str, topic: &str) -> String {
    format!(
        r#"apiVersion: outbox.dev/v1alpha1
kind: OutboxRelay
metadata: {{name: {name}}}
spec:
  replicas: 0
  mongodb: {{uriSecret: {{name: mongodb, key: uri}}, database: {database}}}
  kafka: {{bootstrapServers: "{}"}}
  schemaRegistry: {{url: "{}"}}
  schemas: {{configMap: session-schemas}}
  routes: [{{aggregateType: Session, topic: {topic}}}]
"#,
        common::kafka_bootstrap(),
        common::schema_registry_url()
    )
}

/// The sample's schemas copied to a directory of their own, so a test can
/// add the one that is missing.
fn schemas_copy() -> PathBuf {
    let dir = std::env::temp_dir().join(common::unique("schemas"));
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(PathBuf::from(common::SAMPLE_SCHEMAS).join("session")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    dir
}

/// Run `kubectl` as `user` (impersonated: the stack's kubeconfig is an admin's).
fn kubectl_as(user: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut all = vec!["--as", user];
    all.extend_from_slice(args);
    common::kubectl(&all, stdin)
}

async fn request_ends(api: &Api<OutboxRedrive>, name: &str) -> OutboxRedrive {
    let mut last = None;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let r = api.get(name).await.unwrap();
        if matches!(r.status.as_ref().and_then(|s| s.phase), Some(RedrivePhase::Completed | RedrivePhase::Failed)) {
            return r;
        }
        last = r.status;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("OutboxRedrive {name} did not end within 60 s; last status: {last:?}");
}

async fn events_with_reason(client: &kube::Client, ns: &str, reason: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

/// Events made dead on purpose (no schema for their version) show in the
/// relay's status with their error and as an Event; a user who may only
/// create requests cannot edit the relay, but can redrive them once the
/// schema is there: the request ends Completed and every event is published
/// in its aggregate's order.
#[tokio::test]
async fn dead_events_are_listed_and_a_requested_redrive_publishes_them_in_order() {
    let t = namespace_with_operator("redrive", "alice").await;
    let mongo = common::mongo().await;
    let db = common::TestDb::new(mongo.database(&common::unique("redrive-outbox")));
    // Three sessions, three events each; the second event of sessions 0 and 1
    // names a version with no schema: dead, and the third held behind it.
    let mut rows = common::session_rows(3, 3);
    rows[3].event_version = 7;
    rows[4].event_version = 7;
    let outbox = db.collection::<Document>("outbox");
    for r in &rows {
        outbox.insert_one(mongodb::bson::to_document(r).unwrap()).await.unwrap();
    }
    let topic = common::unique("redrive-events");
    common::create_topic(&topic, 1).await;
    let bootstrap = common::kafka_bootstrap();
    let schemas = schemas_copy();
    let mut args = common::relay_args(db.name(), &bootstrap, &topic, "relay-redrive");
    args.schemas_dir = Some(schemas.clone());
    args.max_attempts = 1;
    let (relay, stop_relay) = common::spawn_relay(args);
    let (ok, out) = common::kubectl(&["apply", "-n", &t.ns, "-f", "-"], Some(&relay_yaml("orders", db.name(), &topic)));
    assert!(ok, "{out}");

    let relays: Api<OutboxRelay> = Api::namespaced(t.client.clone(), &t.ns);
    common::eventually("status lists both dead events", Duration::from_secs(60), || async {
        relays.get("orders").await.unwrap().status.is_some_and(|s| s.dead == 2 && s.dead_events.len() == 2)
    })
    .await;
    let status = relays.get("orders").await.unwrap().status.unwrap();
    let mut listed: Vec<&str> = status.dead_events.iter().map(|d| d.id.as_str()).collect();
    listed.sort();
    let mut dead = vec![rows[3].id.as_str(), rows[4].id.as_str()];
    dead.sort();
    assert_eq!(listed, dead);
    for d in &status.dead_events {
        assert_eq!((d.event_name.as_deref(), d.attempts), (Some("SessionRefreshed"), 1));
        let error = d.last_error.as_deref().unwrap_or_default();
        assert!(error.contains("v7"), "the error names the missing schema: {error}");
        assert!(d.since.is_some());
    }
    assert!(status.observed_time.is_some());
    common::eventually("an EventsDead Event on the relay", Duration::from_secs(30), || async {
        !events_with_reason(&t.client, &t.ns, "EventsDead").await.is_empty()
    })
    .await;

    // The requester role: no edits of the relay, but requests.
    let (ok, out) = kubectl_as(
        "alice",
        &["patch", "outboxrelay", "orders", "-n", &t.ns, "--type", "merge", "-p", r#"{"spec":{"paused":true}}"#],
        None,
    );
    assert!(!ok && out.contains("forbidden"), "alice may not edit the relay: {out}");

    // The cause is fixed (the schema of v7 is added; the relay reads its directory every 5 s).
    std::fs::copy(schemas.join("Session.SessionRefreshed.v1.avsc"), schemas.join("Session.SessionRefreshed.v7.avsc"))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let request = r#"apiVersion: outbox.dev/v1alpha1
kind: OutboxRedrive
metadata: {name: redrive-dead}
spec:
  target: {kind: OutboxRelay, name: orders}
  requestedBy: alice
"#;
    let (ok, out) = kubectl_as("alice", &["create", "-n", &t.ns, "-f", "-"], Some(request));
    assert!(ok, "alice may create a request: {out}");
    let requests: Api<OutboxRedrive> = Api::namespaced(t.client.clone(), &t.ns);
    let done = request_ends(&requests, "redrive-dead").await.status.unwrap();
    assert_eq!(
        (done.phase, done.matched, done.done, done.errors, done.waiting),
        (Some(RedrivePhase::Completed), 2, 2, 0, 0),
        "{done:?}"
    );
    assert!(done.start_time.is_some() && done.completion_time.is_some());
    let records = common::consume_all(&bootstrap, &topic, rows.len(), Duration::from_secs(30)).await;
    stop_relay.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let published: Vec<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    for aggregate in 0..3 {
        let expected: Vec<&str> =
            [aggregate, aggregate + 3, aggregate + 6].iter().map(|&i| rows[i].id.as_str()).collect();
        let got: Vec<&str> = published.iter().copied().filter(|id| expected.contains(id)).collect();
        assert_eq!(got, expected, "aggregate {aggregate}'s events, once each, in order");
    }
    assert!(!events_with_reason(&t.client, &t.ns, "Completed").await.is_empty(), "an Event marks the end");

    // `kubectl outbox`: status, and pause/resume (refused to the requester).
    let (ok, view) = common::kubectl_outbox(&["status", "orders", "-n", &t.ns]).await;
    assert!(ok && view.contains("OutboxRelay orders") && view.contains("Ranges"), "{view}");
    println!("{view}");
    let (ok, out) = common::kubectl_outbox(&["pause", "relay/orders", "-n", &t.ns, "--as", "alice"]).await;
    assert!(!ok && out.contains("forbidden"), "the requester may not pause: {out}");
    let (ok, out) = common::kubectl_outbox(&["pause", "relay/orders", "-n", &t.ns]).await;
    assert!(ok, "{out}");
    assert!(relays.get("orders").await.unwrap().spec.paused);
    let (ok, out) = common::kubectl_outbox(&["resume", "orders", "-n", &t.ns]).await;
    assert!(ok, "{out}");
    assert!(!relays.get("orders").await.unwrap().spec.paused);
    let _ = std::fs::remove_dir_all(schemas);
}

/// A discard request gives the selected dead event up: its row is kept,
/// marked with who asked and why, and its aggregate's later events flow;
/// the other aggregate's dead event stays. A request that cannot run (no
/// reason for a discard, no such relay) ends Failed and changes nothing.
#[tokio::test]
async fn a_requested_discard_keeps_the_row_with_who_and_why_and_unblocks_its_aggregate() {
    let t = namespace_with_operator("discard", "bob").await;
    let mongo = common::mongo().await;
    let db = common::TestDb::new(mongo.database(&common::unique("discard-outbox")));
    let mut rows = common::session_rows(2, 3);
    rows[2].event_version = 7;
    rows[3].event_version = 7;
    let outbox = db.collection::<Document>("outbox");
    for r in &rows {
        outbox.insert_one(mongodb::bson::to_document(r).unwrap()).await.unwrap();
    }
    let topic = common::unique("discard-events");
    common::create_topic(&topic, 1).await;
    let bootstrap = common::kafka_bootstrap();
    let mut args = common::relay_args(db.name(), &bootstrap, &topic, "relay-discard");
    args.max_attempts = 1;
    let (relay, stop_relay) = common::spawn_relay(args);
    let (ok, out) = common::kubectl(&["apply", "-n", &t.ns, "-f", "-"], Some(&relay_yaml("orders", db.name(), &topic)));
    assert!(ok, "{out}");
    let relays: Api<OutboxRelay> = Api::namespaced(t.client.clone(), &t.ns);
    common::eventually("both events dead", Duration::from_secs(60), || async {
        relays.get("orders").await.unwrap().status.is_some_and(|s| s.dead == 2 && s.held == 2)
    })
    .await;
    let requests: Api<OutboxRedrive> = Api::namespaced(t.client.clone(), &t.ns);

    // Requests that cannot run: Failed, saying why, nothing changed.
    let no_reason = "apiVersion: outbox.dev/v1alpha1\nkind: OutboxRedrive\nmetadata: {name: no-reason}\n\
                     spec: {target: {kind: OutboxRelay, name: orders}, action: discard}\n";
    let no_relay = "apiVersion: outbox.dev/v1alpha1\nkind: OutboxRedrive\nmetadata: {name: no-relay}\n\
                    spec: {target: {kind: OutboxRelay, name: payments}}\n";
    for (name, yaml, says) in [("no-reason", no_reason, "spec.reason"), ("no-relay", no_relay, "not found")] {
        let (ok, out) = kubectl_as("bob", &["create", "-n", &t.ns, "-f", "-"], Some(yaml));
        assert!(ok, "{out}");
        let r = request_ends(&requests, name).await.status.unwrap();
        assert_eq!(r.phase, Some(RedrivePhase::Failed));
        let message = r.message.unwrap();
        assert!(message.contains(says) && message.contains("nothing was changed"), "{message}");
    }
    assert_eq!(outbox.count_documents(doc! {"status": "dead"}).await.unwrap(), 2, "nothing changed");

    // `kubectl outbox discard` as bob creates the request and follows it to its end.
    let (ok, out) = common::kubectl_outbox(&[
        "discard",
        "orders",
        "-n",
        &t.ns,
        "--as",
        "bob",
        "--aggregate",
        &rows[2].aggregate_id,
        "--reason",
        "refund issued by hand",
        "--timeout-seconds",
        "60",
    ])
    .await;
    assert!(ok && out.contains("Completed"), "{out}");
    let done = requests.list(&ListParams::default()).await.unwrap().items;
    let done = done.iter().find(|r| r.metadata.name.as_deref().is_some_and(|n| n.starts_with("orders-discard-")));
    let done = done.expect("the plugin's request").status.clone().unwrap();
    assert_eq!((done.phase, done.matched, done.done), (Some(RedrivePhase::Completed), 1, 1), "{done:?}");
    let records = common::consume_all(&bootstrap, &topic, 3, Duration::from_secs(30)).await;
    stop_relay.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let published: Vec<&str> = records.iter().map(|r| r.headers["eventId"].as_str()).collect();
    assert_eq!(published, [rows[0].id.as_str(), rows[1].id.as_str(), rows[4].id.as_str()]);
    let row = outbox.find_one(doc! {"_id": &rows[2].id}).await.unwrap().unwrap();
    assert_eq!(row.get_str("status").unwrap(), "discarded");
    let mark = row.get_document("discard").unwrap();
    let by = mark.get_str("by").unwrap();
    assert!(by.contains("bob") && by.contains("orders-discard-"), "who: {by}");
    assert_eq!(mark.get_str("reason").unwrap(), "refund issued by hand");
    let other = outbox.find_one(doc! {"_id": &rows[3].id}).await.unwrap().unwrap();
    assert_eq!(other.get_str("status").unwrap(), "dead", "not selected: still dead");
}

/// An EventConsumer's parked aggregates (parked in its store as its pods
/// park them; the consumer is paused, no pod runs) are listed in its status
/// and announced by an `AggregatesParked` Event; a request acting on them
/// by event name is refused; `kubectl outbox discard consumer/NAME
/// --aggregate A` as a requester records A's events as processed with who
/// and why and releases A, leaving the other aggregate parked.
#[tokio::test]
async fn a_consumers_parked_aggregates_are_listed_and_a_requested_discard_releases_one() {
    use outbox_operator::{consumer::parked::ParkedAggregates, operator::crd::EventConsumer};
    let t = namespace_with_operator("consumer-discard", "dave").await;
    let db = common::TestDb::new(common::mongo().await.database(&common::unique("consumer-discard-db")));
    let group = common::unique("discard-group");
    let parked = ParkedAggregates::new(&db, &group);
    parked.park("order-1", "e-1", "webhook http://billing/events answered 422 Unprocessable Entity").await.unwrap();
    parked.park("order-1", "e-2", "parked: behind e-1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    parked.park("order-2", "e-3", "webhook http://billing/events answered 400 Bad Request").await.unwrap();
    let consumer = format!(
        r#"apiVersion: outbox.dev/v1alpha1
kind: EventConsumer
metadata: {{name: billing}}
spec:
  paused: true
  topics: [{topic}]
  groupId: {group}
  handler: {{type: log}}
  mongodb: {{uriSecret: {{name: mongodb, key: uri}}, database: {db}}}
  kafka: {{bootstrapServers: "{bootstrap}"}}
  schemaRegistry: {{url: "{registry}"}}
"#,
        topic = common::unique("billing-events"),
        db = db.name(),
        bootstrap = common::kafka_bootstrap(),
        registry = common::schema_registry_url(),
    );
    let (ok, out) = common::kubectl(&["apply", "-n", &t.ns, "-f", "-"], Some(&consumer));
    assert!(ok, "{out}");
    let consumers: Api<EventConsumer> = Api::namespaced(t.client.clone(), &t.ns);
    common::eventually("status lists both parked aggregates, newest first", Duration::from_secs(60), || async {
        consumers.get("billing").await.unwrap().status.is_some_and(|s| {
            s.parked_aggregates == 2
                && s.parked.len() == 2
                && s.parked[0].aggregate_id == "order-2"
                && s.parked[1].aggregate_id == "order-1"
                && s.parked[1].event_id.as_deref() == Some("e-1")
                && s.parked[1].events == 2
                && s.parked[1].error.as_deref().is_some_and(|e| e.contains("422"))
        })
    })
    .await;
    common::eventually("an AggregatesParked Event on the consumer", Duration::from_secs(30), || async {
        events_with_reason(&t.client, &t.ns, "AggregatesParked")
            .await
            .iter()
            .any(|e| e.message.as_deref().is_some_and(|m| m.contains("2 in all") && m.contains("order-2")))
    })
    .await;
    let (ok, view) = common::kubectl_outbox(&["status", "consumer/billing", "-n", &t.ns]).await;
    assert!(ok && view.contains("Parked aggregates") && view.contains("e-1"), "{view}");

    // By event name: refused, nothing changed.
    let by_name = "apiVersion: outbox.dev/v1alpha1\nkind: OutboxRedrive\nmetadata: {name: by-name}\n\
                   spec: {target: {kind: EventConsumer, name: billing}, action: discard, reason: x, \
                   selection: {eventNames: [OrderPaid]}}\n";
    let (ok, out) = kubectl_as("dave", &["create", "-n", &t.ns, "-f", "-"], Some(by_name));
    assert!(ok, "{out}");
    let requests: Api<OutboxRedrive> = Api::namespaced(t.client.clone(), &t.ns);
    let refused = request_ends(&requests, "by-name").await.status.unwrap();
    let message = refused.message.unwrap_or_default();
    assert_eq!(refused.phase, Some(RedrivePhase::Failed));
    assert!(message.contains("selection.eventNames") && message.contains("nothing was changed"), "{message}");
    assert_eq!(parked.count().await.unwrap(), 2);

    let (ok, out) = common::kubectl_outbox(&[
        "discard",
        "consumer/billing",
        "-n",
        &t.ns,
        "--as",
        "dave",
        "--aggregate",
        "order-1",
        "--reason",
        "order cancelled by support",
        "--timeout-seconds",
        "60",
    ])
    .await;
    assert!(ok && out.contains("Completed"), "{out}");
    let done = requests.list(&ListParams::default()).await.unwrap().items;
    let done = done.iter().find(|r| r.metadata.name.as_deref().is_some_and(|n| n.starts_with("billing-discard-")));
    let done = done.expect("the plugin's request").status.clone().unwrap();
    assert_eq!((done.phase, done.matched, done.done), (Some(RedrivePhase::Completed), 2, 2), "{done:?}");
    let left = parked.newest(&[], 10).await.unwrap();
    assert_eq!(left.iter().map(|p| p.aggregate_id.as_str()).collect::<Vec<_>>(), ["order-2"], "the other stays parked");
    let marks: Vec<Document> = {
        use futures::TryStreamExt;
        db.collection::<Document>("processed_events")
            .find(doc! {"group": &group})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    };
    let mut ids: Vec<&str> = marks.iter().map(|m| m.get_str("eventId").unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["e-1", "e-2"], "the discarded events are recorded as processed");
    for m in &marks {
        let discard = m.get_document("discard").unwrap();
        assert_eq!(discard.get_str("reason").unwrap(), "order cancelled by support");
        assert!(discard.get_str("by").unwrap().starts_with("dave (OutboxRedrive "), "{discard}");
    }
}
