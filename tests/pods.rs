//! Real pods on the stack's node: the operator installed with Helm from the
//! image built here (`scripts/image.sh`, `imagePullPolicy: Never`), with only
//! the chart's RBAC; the relay and consumer pods it builds; a session API
//! pod. Sessions are driven through the session API pod, every event is
//! consumed exactly once, status reads READY True with the right counts,
//! the pods run as their Deployments declare (non-root, read-only root,
//! no privilege escalation, no token on consumer pods), the active relay's
//! pod is killed and the standby takes over within the lease time with
//! nothing lost, a deleted Secret is named in the condition, pause scales
//! to zero and resume brings the pods back, and a second OutboxRelay on one
//! outbox is refused with no pods. An event of another application waits
//! for its schema, and is published once the schema is added to the
//! relay's ConfigMap, with no pod restarted. An EventConsumer with the
//! webhook handler delivers signed CloudEvents, each aggregate in order, to
//! a receiver its pod reaches over the network.

mod common;

use std::{collections::BTreeMap, process::Command, time::Duration};

use k8s_openapi::api::{
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{ConfigMap, Pod, Secret},
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use mongodb::bson::{Document, doc};
use outbox_operator::{
    lease::outbox_lease_name,
    operator::crd::{EventConsumer, OutboxRelay},
};
use serde_json::{Value, json};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/outbox-operator");
const IMAGE: &str = "outbox-operator:dev";
/// Pods on the stack's node take a while to be gone once deleted: their
/// grace period, then the 1.20 kubelet reports them removed only after its
/// next container garbage collection (about a minute).
const POD_TERMINATION: Duration = Duration::from_secs(120);

fn docker(args: &[&str]) -> (bool, String) {
    let host = common::stack_env("OUTBOX_DOCKER");
    let out = Command::new("/usr/bin/docker")
        .args(["-H", &host])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("the stack's docker CLI could not run ({e}); `scripts/stack.sh up node`"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn helm(args: &[&str]) -> String {
    let helm = common::stack_env("OUTBOX_HELM");
    let out = Command::new(&helm)
        .args(args)
        .env("KUBECONFIG", common::kubeconfig())
        .output()
        .unwrap_or_else(|e| panic!("helm at {helm} could not run: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "helm {args:?} failed: {text}");
    text
}

/// The node is Ready and the image is on it, or a failure saying what to run.
async fn node_and_image() {
    let (ok, out) = common::kubectl(
        &["get", "node", "outbox-node", "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"],
        None,
    );
    assert!(
        ok && out.trim() == "True",
        "the stack's node is not Ready ({out}); start it with `scripts/stack.sh up node`"
    );
    let (ok, out) = docker(&["image", "inspect", IMAGE]);
    assert!(ok, "{IMAGE} is not on the node ({out}); build it with `make image`");
}

/// The operator as users install it, in a new namespace `ns`: Helm, the
/// chart's RBAC only (a Role in this namespace), the image built here. The
/// release name.
fn install_operator(ns: &str) -> String {
    let release = format!("o{}", &ns[ns.len() - 12..]);
    helm(&[
        "install",
        &release,
        CHART,
        "--namespace",
        ns,
        "--create-namespace",
        "--set",
        &format!(
            "image.repository=outbox-operator,image.tag=dev,image.pullPolicy=Never,watchNamespace={ns},rbac.clusterWide=false"
        ),
        "--wait",
        "--timeout",
        "180s",
    ]);
    release
}

fn workload(ns: &str, db: &str, group: &str, topic: &str) -> String {
    let (uri_kafka, registry) = (common::kafka_bootstrap(), common::schema_registry_url());
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: session-api, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: session-api}}}}
  template:
    metadata: {{labels: {{app: session-api}}}}
    spec:
      automountServiceAccountToken: false
      securityContext: {{runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532}}
      containers:
        - name: session-api
          image: {IMAGE}
          imagePullPolicy: Never
          args: ["session-api"]
          env:
            - {{name: SESSION_API_LISTEN, value: "0.0.0.0:8080"}}
            - {{name: MONGODB_DATABASE, value: {db}}}
            - name: MONGODB_URI
              valueFrom: {{secretKeyRef: {{name: mongodb, key: uri}}}}
          ports: [{{name: http, containerPort: 8080, protocol: TCP}}]
          readinessProbe: {{httpGet: {{path: /readyz, port: http}}, periodSeconds: 2}}
          securityContext: {{readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {{drop: ["ALL"]}}}}
---
apiVersion: outbox.dev/v1alpha1
kind: OutboxRelay
metadata: {{name: sessions, namespace: {ns}}}
spec:
  replicas: 2
  mongodb: {{uriSecret: {{name: mongodb, key: uri}}, database: {db}}}
  kafka: {{bootstrapServers: "{uri_kafka}"}}
  schemaRegistry: {{url: "{registry}"}}
  schemas: {{configMap: session-schemas}}
  routes: [{{aggregateType: Session, topic: {topic}}}, {{aggregateType: Order, topic: {topic}-orders}}]
  backoff: {{initialMs: 2000, maxMs: 30000}}
  pollIntervalMs: 200
---
apiVersion: outbox.dev/v1alpha1
kind: EventConsumer
metadata: {{name: readmodel, namespace: {ns}}}
spec:
  topics: [{topic}]
  groupId: {group}
  handler: {{type: projection}}
  mongodb: {{uriSecret: {{name: mongodb, key: uri}}, database: {db}}}
  kafka: {{bootstrapServers: "{uri_kafka}", clientConfig: {{session.timeout.ms: "6000"}}}}
  schemaRegistry: {{url: "{registry}"}}
"#
    )
}

/// An order service's event schema (the envelope layout).
const ORDER_PLACED_SCHEMA: &str = r#"{"type": "record", "name": "OrderPlaced", "namespace": "com.acme.orders", "fields": [
  {"name": "eventId", "type": "string"}, {"name": "aggregateType", "type": "string"},
  {"name": "aggregateId", "type": "string"}, {"name": "eventName", "type": "string"},
  {"name": "eventVersion", "type": "int"},
  {"name": "occurredOn", "type": {"type": "long", "logicalType": "timestamp-millis"}},
  {"name": "payload", "type": {"type": "record", "name": "OrderPlacedPayload",
    "fields": [{"name": "orderId", "type": "string"}, {"name": "amountCents", "type": "long"}]}}]}"#;

/// An outbox row of that event, as an order service writes it.
fn order_placed_row() -> Document {
    let order_id = common::unique("order");
    doc! {
        "_id": uuid::Uuid::new_v4().to_string(), "docVersion": 2, "aggregateType": "Order",
        "aggregateId": &order_id, "eventName": "OrderPlaced", "eventVersion": 1,
        "occurredOn": mongodb::bson::DateTime::now(),
        "payload": {"orderId": &order_id, "amountCents": 1250_i64},
    }
}

fn ready(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> Option<(String, String, String)> {
    conditions.iter().find(|c| c.type_ == "Ready").map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn pods_of(pods: &Api<Pod>, selector: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(selector)).await.unwrap().items
}

fn running_and_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Create, refresh and (every other one) end `n` sessions through the
/// session API pod; returns how many events that wrote.
async fn drive(base: &str, n: usize, tag: &str) -> usize {
    let http = common::http();
    let mut events = 0;
    for i in 0..n {
        let r = http
            .post(format!("{base}/sessions"))
            .json(&json!({"userId": format!("user-{}", i % 7), "ttlSeconds": 600, "device": tag}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::CREATED);
        let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
        let r = http.post(format!("{base}/sessions/{id}/refresh")).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::OK);
        events += 2;
        if i % 2 == 0 {
            let r = http.delete(format!("{base}/sessions/{id}?reason=logout")).send().await.unwrap();
            assert!(r.status().is_success());
            events += 1;
        }
    }
    events
}

/// Every event of the outbox processed once, and the read model equal to
/// one computed from the sessions collection.
async fn consumed_exactly_once(db: &mongodb::Database, group: &str) -> bool {
    // The Session events: the consumer reads their topic, not the orders'.
    let outbox = db.collection::<Document>("outbox").count_documents(doc! {"aggregateType": "Session"}).await.unwrap();
    if common::processed(db, group).await != outbox {
        return false;
    }
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut sessions = db.collection::<Document>("sessions").find(doc! {}).await.unwrap();
    use futures::TryStreamExt;
    while let Some(s) = sessions.try_next().await.unwrap() {
        let e = expected.entry(s.get_str("userId").unwrap().to_owned()).or_default();
        e.0 += i64::from(matches!(s.get("endedAt"), None | Some(mongodb::bson::Bson::Null)));
        e.1 += 1;
    }
    let mut model = db.collection::<Document>("session_projection").find(doc! {}).await.unwrap();
    let mut actual: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    while let Some(m) = model.try_next().await.unwrap() {
        let n = |k: &str| m.get_i32(k).map(i64::from).or_else(|_| m.get_i64(k)).unwrap_or(0);
        actual.insert(m.get_str("_id").unwrap().to_owned(), (n("activeSessions"), n("sessionsCreated")));
    }
    actual == expected
}

/// Scrape a pod's /metrics for one gauge.
async fn gauge(pod_ip: &str, name: &str) -> Option<f64> {
    let text = common::http().get(format!("http://{pod_ip}:9090/metrics")).send().await.ok()?.text().await.ok()?;
    // Summed over the metric's series (every relay metric carries `range`).
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The Sessions workload (`workload`) running in a namespace of its own:
/// the operator installed with Helm, two relay pods, a consumer pod and the
/// session API pod, all ready.
struct Running {
    client: kube::Client,
    ns: String,
    release: String,
    db: common::TestDb,
    group: String,
    topic: String,
    relays: Api<OutboxRelay>,
    consumers: Api<EventConsumer>,
    pods: Api<Pod>,
}

/// The relay pods of the `sessions` OutboxRelay.
const RELAY_PODS: &str = "app.kubernetes.io/name=outbox-relay,app.kubernetes.io/instance=sessions";

/// Install the operator and the workload in a new namespace named after
/// `name`, and wait until every pod is running and ready.
async fn running_workload(name: &str) -> Running {
    let client = common::kube_client().await;
    node_and_image().await;
    let ns = common::unique(name);
    let release = install_operator(&ns);
    let mongo = common::mongo().await;
    let db = common::TestDb::new(mongo.database(&common::unique(&format!("{name}-db"))));
    let group = common::unique(&format!("{name}-group"));
    let topic = common::unique(&format!("{name}-events"));
    common::create_topic(&topic, 3).await;
    common::create_topic(&format!("{topic}-orders"), 1).await;
    common::create_mongodb_secret(&client, &ns).await;
    common::create_sample_schemas(&client, &ns).await;
    let (ok, out) = common::kubectl(&["apply", "-f", "-"], Some(&workload(&ns, db.name(), &group, &topic)));
    assert!(ok, "{out}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    common::eventually(
        "2 relay pods, 1 consumer pod and the session API running and ready",
        Duration::from_secs(120),
        || async {
            pods_of(&pods, RELAY_PODS).await.iter().filter(|p| running_and_ready(p)).count() == 2
                && pods_of(&pods, "app.kubernetes.io/name=outbox-consumer").await.iter().any(running_and_ready)
                && pods_of(&pods, "app=session-api").await.iter().any(running_and_ready)
        },
    )
    .await;
    Running {
        relays: Api::namespaced(client.clone(), &ns),
        consumers: Api::namespaced(client.clone(), &ns),
        pods,
        client,
        ns,
        release,
        db,
        group,
        topic,
    }
}

impl Running {
    /// The session API pod's address.
    async fn session_api(&self) -> String {
        let ip = pods_of(&self.pods, "app=session-api").await[0].status.as_ref().unwrap().pod_ip.clone().unwrap();
        format!("http://{ip}:8080")
    }

    /// Delete both resources (the OutboxRelay's finalizer runs), uninstall
    /// the operator and delete the namespace.
    async fn remove(self) {
        self.relays.delete("sessions", &DeleteParams::default()).await.unwrap();
        self.consumers.delete("readmodel", &DeleteParams::default()).await.unwrap();
        common::eventually("the OutboxRelay's finalizer ran", POD_TERMINATION, || async {
            self.relays.get_opt("sessions").await.unwrap().is_none()
        })
        .await;
        helm(&["uninstall", &self.release, "--namespace", &self.ns]);
        assert!(common::kubectl(&["delete", "namespace", &self.ns, "--wait=false"], None).0);
    }
}

/// A change that makes the controller reconcile at once.
fn nudge(n: u32) -> Value {
    json!({"metadata": {"annotations": {"test/nudge": n.to_string()}}})
}

/// The holder of the outbox's Lease, "" when none.
async fn lease_holder(client: &kube::Client, ns: &str, database: &str) -> String {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let lease = outbox_lease_name(database, "outbox");
    leases.get_opt(&lease).await.unwrap().and_then(|l| l.spec).and_then(|s| s.holder_identity).unwrap_or_default()
}

/// The data path on real pods: the relay's Lease, the pods' security,
/// sessions consumed exactly once, Prometheus, status, another
/// application's schema added while running, a killed active relay, and a
/// rebuild of the read model.
#[tokio::test]
async fn helm_installed_operator_runs_relay_and_consumer_pods_end_to_end() {
    let w = running_workload("pods").await;
    let (client, ns, db, group, topic) = (w.client.clone(), w.ns.clone(), &w.db, w.group.clone(), w.topic.clone());
    let (relays, consumers, pods) = (w.relays.clone(), w.consumers.clone(), w.pods.clone());
    let holder = || lease_holder(&client, &ns, db.name());
    // The relay elected itself through the outbox's Lease, with its own token.
    common::eventually("a relay pod holds the outbox's Lease", Duration::from_secs(60), || async {
        holder().await.starts_with("outbox-relay-sessions-")
    })
    .await;
    let first_holder = holder().await;
    assert!(
        pods_of(&pods, RELAY_PODS).await.iter().any(|p| p.metadata.name.as_deref() == Some(first_holder.as_str())),
        "the holder is a pod name (downward API), not a host name: {first_holder}"
    );

    // Pod security as the Deployments declare it, checked on the running containers.
    let (ok, ids) = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=io.kubernetes.pod.namespace={ns}"),
        "--filter",
        "label=io.kubernetes.docker.type=container",
    ]);
    assert!(ok, "{ids}");
    let ids: Vec<&str> = ids.split_whitespace().collect();
    assert!(ids.len() >= 5, "operator, 2 relays, consumer, session API: {ids:?}");
    for id in ids {
        let (_, inspect) = docker(&["inspect", id]);
        let c: Value = serde_json::from_str::<Vec<Value>>(&inspect).unwrap().remove(0);
        let name = c["Config"]["Labels"]["io.kubernetes.container.name"].as_str().unwrap().to_owned();
        assert_eq!(c["HostConfig"]["ReadonlyRootfs"], true, "{name}: read-only root filesystem");
        assert_eq!(c["HostConfig"]["Privileged"], false, "{name}");
        assert!(
            c["HostConfig"]["SecurityOpt"].to_string().contains("no-new-privileges"),
            "{name}: no privilege escalation"
        );
        let pid = c["State"]["Pid"].as_i64().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_owned();
        assert!(uid.split_whitespace().skip(1).all(|u| u == "65532"), "{name} runs as 65532: {uid}");
        let token_mounted = c["Mounts"].to_string().contains("serviceaccount");
        match name.as_str() {
            "outbox-relay" | "operator" => assert!(token_mounted, "{name} needs its token for the Lease"),
            _ => assert!(!token_mounted, "{name} must not get a service account token"),
        }
    }

    // Sessions through the session API pod; every event consumed exactly once.
    let base = w.session_api().await;
    let written = drive(&base, 40, "before").await;
    common::eventually("every event consumed exactly once", Duration::from_secs(90), || async {
        consumed_exactly_once(db, &group).await
    })
    .await;
    assert_eq!(common::processed(db, &group).await, written as u64);
    // The stack's Prometheus scrapes the pods the operator made.
    let scraped = |metric: &'static str| {
        let query = format!("sum({metric}{{namespace=\"{ns}\"}})");
        async move { common::prometheus_query(&query).await.is_some_and(|v| v >= written as f64) }
    };
    common::eventually("Prometheus has every publish and every handling", Duration::from_secs(30), || async {
        scraped("outbox_relay_published_total").await && scraped("outbox_consumer_processed_total").await
    })
    .await;
    let (ok, logs) = common::kubectl(&["logs", "-n", &ns, &first_holder, "--tail", "50"], None);
    assert!(ok && logs.contains("relay started"), "kubectl logs reaches the node: {logs}");

    // Status from the sources of truth: READY True, nothing pending, no lag.
    let mut n = 0;
    common::eventually("READY True, pending 0 and lag 0 in status", Duration::from_secs(60), || {
        n += 1;
        let (relays, consumers, patch) = (relays.clone(), consumers.clone(), nudge(n));
        async move {
            let _ = relays.patch("sessions", &PatchParams::default(), &Patch::Merge(&patch)).await;
            let _ = consumers.patch("readmodel", &PatchParams::default(), &Patch::Merge(&patch)).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let r = relays.get("sessions").await.unwrap().status.unwrap_or_default();
            let c = consumers.get("readmodel").await.unwrap().status.unwrap_or_default();
            ready(&r.conditions).is_some_and(|(s, ..)| s == "True")
                && ready(&c.conditions).is_some_and(|(s, ..)| s == "True")
                && r.pending == 0
                && r.ready_replicas == 2
                && c.lag == 0
                && c.processed == written as i64
        }
    })
    .await;
    let (_, table) = common::kubectl(&["get", "orl,ec", "-n", &ns], None);
    assert!(table.lines().filter(|l| l.contains("True")).count() == 2, "{table}");

    // Another application's event, whose schema is not in the ConfigMap yet:
    // it waits, named by the file it needs; the file added to the ConfigMap
    // reaches the running relay pods (the kubelet updates the mounted
    // volume) and the event is published, with no restart.
    let order = order_placed_row();
    let order_id = order.get_str("_id").unwrap().to_owned();
    db.collection::<Document>("outbox").insert_one(order).await.unwrap();
    common::eventually("the event without a schema waits, naming its file", Duration::from_secs(60), || async {
        let row = db
            .collection::<mongodb::bson::Document>("outbox")
            .find_one(doc! {"_id": &order_id})
            .await
            .unwrap()
            .unwrap_or_default();
        row.get_str("status") == Ok("failed")
            && row.get_str("lastError").is_ok_and(|e| e.contains("Order.OrderPlaced.v1.avsc"))
    })
    .await;
    let restarts = |ps: Vec<Pod>| -> i32 {
        ps.iter()
            .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
            .flatten()
            .map(|c| c.restart_count)
            .sum()
    };
    let restarts_before = restarts(pods_of(&pods, RELAY_PODS).await);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"data": {"Order.OrderPlaced.v1.avsc": ORDER_PLACED_SCHEMA}});
    maps.patch("session-schemas", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let records =
        common::consume_all(&common::kafka_bootstrap(), &format!("{topic}-orders"), 1, Duration::from_secs(180)).await;
    assert!(
        records.iter().any(|r| r.headers.get("eventId") == Some(&order_id)),
        "the Order event published once its schema reached the pods: {} record(s)",
        records.len()
    );
    assert_eq!(restarts(pods_of(&pods, RELAY_PODS).await), restarts_before, "no relay pod restarted");

    // Kill the active relay's pod outright: the standby takes over within the
    // lease time (15 s) and publishes what is written meanwhile, nothing lost.
    let killed_at = std::time::Instant::now();
    pods.delete(&first_holder, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    let more = drive(&base, 20, "during-failover").await;
    common::eventually("another relay pod holds the Lease", Duration::from_secs(30), || async {
        let h = holder().await;
        h.starts_with("outbox-relay-sessions-") && h != first_holder
    })
    .await;
    let takeover = killed_at.elapsed();
    assert!(takeover <= Duration::from_secs(15 + 5), "takeover took {takeover:?}");
    common::eventually(
        "everything written around the failover consumed exactly once",
        Duration::from_secs(90),
        || async { consumed_exactly_once(db, &group).await },
    )
    .await;
    assert_eq!(common::processed(db, &group).await, (written + more) as u64, "nothing lost");

    // A rebuild of the read model as users request it: spec.rebuild gets
    // one Job, whose pod runs `consume rebuild` on the node; status follows
    // it to Completed, the live consumer pod follows the new generation, and
    // the model readers read, rebuilt from the topic, equals the sessions.
    let patch = json!({"spec": {"rebuild": "pods-test"}});
    consumers.patch("readmodel", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let mut n = 50;
    common::eventually("the rebuild Job completed, as status says", Duration::from_secs(180), || {
        n += 1;
        let (consumers, patch) = (consumers.clone(), nudge(n));
        async move {
            let _ = consumers.patch("readmodel", &PatchParams::default(), &Patch::Merge(&patch)).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let c = consumers.get("readmodel").await.unwrap().status.unwrap_or_default();
            c.projection_generation == Some(2)
                && c.rebuild.is_some_and(|r| r.phase == "Completed" && r.progress_percent == 100)
        }
    })
    .await;
    // Status says Completed as the rebuild saves it, just before its process exits.
    common::eventually("the rebuild ran as a pod on the node, to Succeeded", Duration::from_secs(60), || async {
        pods_of(&pods, "app.kubernetes.io/name=outbox-consumer-rebuild")
            .await
            .iter()
            .any(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
    })
    .await;
    let scope = format!("{group}@g2");
    common::eventually("the rebuilt model holds every event once", Duration::from_secs(60), || async {
        consumed_exactly_once(db, &scope).await
    })
    .await;

    w.remove().await;
}

/// Day-2 operations on a running OutboxRelay: a second OutboxRelay on its
/// outbox is refused and never publishes, a deleted Secret is named in the
/// condition, and pause scales the relay to zero and resume brings it back
/// with nothing lost.
#[tokio::test]
async fn a_running_outbox_relay_refuses_its_twin_names_a_missing_secret_and_pauses() {
    let w = running_workload("pods-ops").await;
    let (client, ns, db, group, topic) = (w.client.clone(), w.ns.clone(), &w.db, w.group.clone(), w.topic.clone());
    let (relays, pods) = (w.relays.clone(), w.pods.clone());
    let holder = || lease_holder(&client, &ns, db.name());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let base = w.session_api().await;
    common::eventually("a relay pod holds the outbox's Lease", Duration::from_secs(60), || async {
        holder().await.starts_with("outbox-relay-sessions-")
    })
    .await;
    // Two OutboxRelays on one outbox: both run pods, only one ever publishes.
    let twin = workload(&ns, db.name(), &group, &topic)
        .split("---")
        .find(|d| d.contains("kind: OutboxRelay"))
        .unwrap()
        .replace("name: sessions,", "name: sessions-twin,")
        .replace("replicas: 2", "replicas: 1");
    assert!(common::kubectl(&["apply", "-f", "-"], Some(&twin)).0);
    // One OutboxRelay per outbox: the twin is refused, naming the first, and
    // gets no pods.
    common::eventually("the twin refused with OutboxInUse naming sessions", Duration::from_secs(60), || async {
        let r = relays.get("sessions-twin").await.unwrap().status.unwrap_or_default();
        ready(&r.conditions)
            .is_some_and(|(s, reason, m)| s == "False" && reason == "OutboxInUse" && m.contains("sessions"))
    })
    .await;
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), &ns);
    assert!(deployments.get_opt("outbox-relay-sessions-twin").await.unwrap().is_none(), "no Deployment for the twin");
    for _ in 0..5 {
        let mut leaders = Vec::new();
        for p in pods_of(&pods, "app.kubernetes.io/name=outbox-relay").await.iter().filter(|p| running_and_ready(p)) {
            let ip = p.status.as_ref().unwrap().pod_ip.clone().unwrap();
            if gauge(&ip, "outbox_relay_leader").await == Some(1.0) {
                leaders.push(p.metadata.name.clone().unwrap());
            }
        }
        assert!(leaders.len() <= 1, "more than one relay publishes the outbox: {leaders:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    relays.delete("sessions-twin", &DeleteParams::default()).await.unwrap();
    common::eventually("the twin and its pods gone", POD_TERMINATION, || async {
        relays.get_opt("sessions-twin").await.unwrap().is_none()
    })
    .await;
    assert!(holder().await.starts_with("outbox-relay-sessions-"), "the twin's cleanup left the live Lease alone");

    // A deleted Secret is named in the condition.
    secrets.delete("mongodb", &DeleteParams::default()).await.unwrap();
    let mut n = 100;
    common::eventually("Ready=False naming the missing Secret", Duration::from_secs(60), || {
        n += 1;
        let (relays, patch) = (relays.clone(), nudge(n));
        async move {
            let _ = relays.patch("sessions", &PatchParams::default(), &Patch::Merge(&patch)).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let r = relays.get("sessions").await.unwrap().status.unwrap_or_default();
            ready(&r.conditions)
                .is_some_and(|(s, reason, m)| s == "False" && reason == "SecretNotFound" && m.contains("mongodb"))
        }
    })
    .await;
    common::create_mongodb_secret(&client, &ns).await;

    // Pause scales the relay to zero; resume brings its pods back.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    relays.patch("sessions", &PatchParams::default(), &Patch::Merge(json!({"spec": {"paused": true}}))).await.unwrap();
    common::eventually("paused: no relay pod left", POD_TERMINATION, || async {
        deployments.get("outbox-relay-sessions").await.unwrap().spec.unwrap().replicas == Some(0)
            && pods_of(&pods, RELAY_PODS).await.is_empty()
    })
    .await;
    relays.patch("sessions", &PatchParams::default(), &Patch::Merge(json!({"spec": {"paused": false}}))).await.unwrap();
    common::eventually("resumed: 2 relay pods ready again", Duration::from_secs(90), || async {
        pods_of(&pods, RELAY_PODS).await.iter().filter(|p| running_and_ready(p)).count() == 2
    })
    .await;
    let last = drive(&base, 10, "after-resume").await;
    common::eventually("events written after resume consumed", Duration::from_secs(90), || async {
        consumed_exactly_once(db, &group).await
    })
    .await;
    assert_eq!(common::processed(db, &group).await, last as u64);

    w.remove().await;
}

/// A Standard Webhooks secret (the base64 of 24 bytes).
const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// An EventConsumer with the webhook handler, its consumer pod on the
/// node, delivers every event as a signed CloudEvent, each aggregate in
/// order, to a receiver the pod reaches over the network (PyPI's
/// `cloudevents` and `standardwebhooks` read and verify each request), and
/// its status counts them.
#[tokio::test]
async fn a_webhook_event_consumer_pod_delivers_signed_cloudevents_in_order() {
    let client = common::kube_client().await;
    node_and_image().await;
    let ns = common::unique("pods-hook");
    let release = install_operator(&ns);
    let db = common::TestDb::new(common::mongo().await.database(&common::unique("pods-hook-db")));
    let (topic, ids) = common::publish_sessions(&db, 50, 2, 2).await;
    let order = common::aggregate_order(&topic, ids.len()).await;
    // The receiver listens where the node's pods reach this machine: the broker's address.
    let host = common::kafka_bootstrap().rsplit_once(':').expect("host:port").0.to_owned();
    let requests = std::env::temp_dir().join(format!("{}.jsonl", common::unique("pods-hook")));
    let (_receiver, port) = common::python_server(
        "webhook_receiver.py",
        &[requests.to_str().unwrap(), SIGNING_SECRET, "--host", &host],
        "cloudevents and standardwebhooks",
    );
    common::create_mongodb_secret(&client, &ns).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "hook"}, "stringData": {"signing": SIGNING_SECRET}
    }))
    .unwrap();
    secrets.create(&Default::default(), &secret).await.unwrap();
    let group = common::unique("pods-hook-group");
    let handler = format!(
        "\n    type: webhook\n    webhookUrl: \"http://{host}:{port}/events\"\n    signingSecret: {{name: hook, key: signing}}"
    );
    apply_webhook_consumer(&ns, &topic, &group, &db, &handler, "maxInFlight: 8");

    let read = || common::read_jsonl(&requests);
    common::eventually("every event delivered by the consumer pod", Duration::from_secs(180), || async {
        let delivered: std::collections::HashSet<String> =
            read().iter().filter(|r| r["status"] == 200).map(|r| r["id"].as_str().unwrap().to_owned()).collect();
        delivered.len() == ids.len()
    })
    .await;
    let delivered = read();
    for r in &delivered {
        assert_eq!(r["verified"], true, "signed with the Secret's key: {r}");
        assert_eq!(r["subject"], r["data"]["aggregateId"]);
    }
    for (aggregate, events) in &order {
        let mut first: Vec<&str> = Vec::new();
        for r in delivered.iter().filter(|r| r["subject"] == aggregate.as_str()) {
            let id = r["id"].as_str().unwrap();
            if !first.contains(&id) {
                first.push(id);
            }
        }
        assert_eq!(&first, events, "aggregate {aggregate}'s events in order");
    }
    let consumers: Api<EventConsumer> = Api::namespaced(client.clone(), &ns);
    common::eventually("status counts the deliveries", Duration::from_secs(60), || async {
        consumers.get("orders-hook").await.unwrap().status.is_some_and(|s| s.processed == ids.len() as i64)
    })
    .await;

    consumers.delete("orders-hook", &DeleteParams::default()).await.unwrap();
    helm(&["uninstall", &release, "--namespace", &ns]);
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}

/// An EventConsumer whose webhook rejects one aggregate's events: the
/// first is dead-lettered after its attempts and the aggregate's later
/// events are parked behind it; status lists the parked aggregate with the
/// dead-lettered event and its error, and an `AggregatesParked` Event says
/// so. Once the receiver takes them, a user bound only to the chart's
/// requester role runs `kubectl outbox redrive consumer/NAME`: the request
/// runs a Job from the consumer's pod on the node, ends Completed with
/// every parked event applied in its aggregate's order, and the aggregate
/// is no longer parked.
#[tokio::test]
async fn a_requested_consumer_redrive_runs_a_job_that_releases_the_parked_aggregate_in_order() {
    let client = common::kube_client().await;
    node_and_image().await;
    let ns = common::unique("pods-redrive");
    let release = install_operator(&ns);
    let db = common::TestDb::new(common::mongo().await.database(&common::unique("pods-redrive-db")));
    let (topic, ids) = common::publish_sessions(&db, 4, 3, 1).await;
    let order = common::aggregate_order(&topic, ids.len()).await;
    let (rejected, rejected_events) = order.iter().next().map(|(a, e)| (a.clone(), e.clone())).expect("an aggregate");
    let host = common::kafka_bootstrap().rsplit_once(':').expect("host:port").0.to_owned();
    let requests = std::env::temp_dir().join(format!("{}.jsonl", common::unique("pods-redrive")));
    let flag = std::env::temp_dir().join(common::unique("pods-redrive-reject"));
    std::fs::write(&flag, "reject").unwrap();
    let (_receiver, port) = common::python_server(
        "webhook_receiver.py",
        &[
            requests.to_str().unwrap(),
            SIGNING_SECRET,
            "--host",
            &host,
            "--reject-subject",
            &rejected,
            "--reject-while",
            flag.to_str().unwrap(),
        ],
        "cloudevents and standardwebhooks",
    );
    common::create_mongodb_secret(&client, &ns).await;
    let group = common::unique("pods-redrive-group");
    let handler = format!("\n    type: webhook\n    webhookUrl: \"http://{host}:{port}/events\"");
    apply_webhook_consumer(&ns, &topic, &group, &db, &handler, "retry: {initialMs: 100, maxMs: 500, maxAttempts: 2}");

    let delivered = || -> Vec<String> {
        let mut seen = Vec::new();
        for r in common::read_jsonl(&requests).iter().filter(|r| r["status"] == 200) {
            let id = r["id"].as_str().unwrap().to_owned();
            if !seen.contains(&id) {
                seen.push(id);
            }
        }
        seen
    };
    let others = ids.len() - rejected_events.len();
    let consumers: Api<EventConsumer> = Api::namespaced(client.clone(), &ns);
    common::eventually(
        "the other aggregates delivered, the rejected one parked and listed in status",
        Duration::from_secs(180),
        || async {
            let status = consumers.get("orders-hook").await.unwrap().status.unwrap_or_default();
            delivered().len() == others
                && status.parked_aggregates == 1
                && status.parked.first().is_some_and(|p| {
                    p.aggregate_id == rejected
                        && p.event_id.as_deref() == Some(rejected_events[0].as_str())
                        && p.error.as_deref().is_some_and(|e| e.contains("422"))
                        && p.events == rejected_events.len() as i64
                })
        },
    )
    .await;
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns);
    let parked_event = events.list(&ListParams::default()).await.unwrap().items.into_iter().find(|e| {
        e.reason.as_deref() == Some("AggregatesParked")
            && e.message.as_deref().is_some_and(|m| m.contains(rejected.as_str()))
    });
    assert!(parked_event.is_some(), "an AggregatesParked Event names the aggregate");

    // The receiver takes the aggregate's events again; carol may only create requests.
    std::fs::remove_file(&flag).unwrap();
    let (ok, out) = common::kubectl(
        &[
            "create",
            "rolebinding",
            "requester",
            "-n",
            &ns,
            "--role",
            &format!("{release}-outbox-operator-requester"),
            "--user",
            "carol",
        ],
        None,
    );
    assert!(ok, "{out}");
    let (ok, out) = common::kubectl_outbox(&[
        "redrive",
        "consumer/orders-hook",
        "-n",
        &ns,
        "--as",
        "carol",
        "--timeout-seconds",
        "240",
    ])
    .await;
    assert!(ok && out.contains("Completed"), "{out}");
    let redrives: Api<outbox_operator::operator::crd::redrive::OutboxRedrive> = Api::namespaced(client.clone(), &ns);
    let request = redrives.list(&ListParams::default()).await.unwrap().items.pop().expect("the plugin's request");
    let status = request.status.unwrap();
    let n = rejected_events.len() as i64;
    assert_eq!((status.matched, status.done, status.errors), (n, n, 0), "{status:?}");
    assert!(status.job.as_deref().is_some_and(|j| j.starts_with("outbox-consumer-orders-hook-redrive-")), "{status:?}");
    assert_eq!(request.spec.requested_by.as_deref(), Some("carol"));

    let all = delivered();
    let applied: Vec<&String> = all.iter().filter(|id| rejected_events.contains(id)).collect();
    assert_eq!(applied, rejected_events.iter().collect::<Vec<_>>(), "the parked aggregate's events in order");
    assert_eq!(all.len(), ids.len(), "every event delivered");
    common::eventually("the aggregate is no longer parked", Duration::from_secs(60), || async {
        consumers
            .get("orders-hook")
            .await
            .unwrap()
            .status
            .is_some_and(|s| s.parked_aggregates == 0 && s.parked.is_empty())
    })
    .await;

    consumers.delete("orders-hook", &DeleteParams::default()).await.unwrap();
    helm(&["uninstall", &release, "--namespace", &ns]);
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}

/// `kubectl apply` an EventConsumer `orders-hook` with `ordering: key`, the
/// given handler block and one more spec line, on the stack's services.
fn apply_webhook_consumer(ns: &str, topic: &str, group: &str, db: &mongodb::Database, handler: &str, extra: &str) {
    let consumer = format!(
        r#"apiVersion: outbox.dev/v1alpha1
kind: EventConsumer
metadata: {{name: orders-hook, namespace: {ns}}}
spec:
  topics: [{topic}]
  groupId: {group}
  handler:{handler}
  ordering: key
  {extra}
  mongodb: {{uriSecret: {{name: mongodb, key: uri}}, database: {db}}}
  kafka: {{bootstrapServers: "{bootstrap}", clientConfig: {{session.timeout.ms: "6000"}}}}
  schemaRegistry: {{url: "{registry}"}}
"#,
        db = db.name(),
        bootstrap = common::kafka_bootstrap(),
        registry = common::schema_registry_url(),
    );
    let (ok, out) = common::kubectl(&["apply", "-f", "-"], Some(&consumer));
    assert!(ok, "{out}");
}
