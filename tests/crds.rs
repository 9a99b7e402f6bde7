//! The generated CRDs on the real kube-apiserver: `crds/` matches
//! `outbox crds`, the CRDs apply with kubectl, the apiserver rejects invalid
//! resources naming the field, and printer columns make `kubectl get` a
//! dashboard.

mod common;

use std::process::Command;

use kube::{
    Api,
    api::{Patch, PatchParams},
};
use outbox_operator::operator::crd::{EventConsumer, OutboxRelay};

const CRDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/outbox.dev.yaml");

fn relay_yaml(name: &str, spec_extra: &str) -> String {
    format!(
        r#"apiVersion: outbox.dev/v1alpha1
kind: OutboxRelay
metadata:
  name: {name}
spec:
  mongodb:
    uriSecret: {{name: mongodb, key: uri}}
    database: sessions
  kafka:
    bootstrapServers: kafka:9092
  schemaRegistry:
    url: http://schema-registry:8081
  schemas:
    configMap: session-schemas
{spec_extra}"#
    )
}

fn consumer_yaml(name: &str, handler: &str) -> String {
    format!(
        r#"apiVersion: outbox.dev/v1alpha1
kind: EventConsumer
metadata: {{name: {name}}}
spec:
  topics: [t]
  groupId: g
  handler: {{type: {handler}}}
  mongodb: {{uriSecret: {{name: m, key: uri}}, database: d}}
  kafka: {{bootstrapServers: "k:9092"}}
  schemaRegistry: {{url: "http://r"}}
"#
    )
}

#[tokio::test]
async fn generated_crds_apply_validate_and_print_columns() {
    let generated = Command::new(env!("CARGO_BIN_EXE_outbox")).arg("crds").output().expect("outbox crds");
    assert!(generated.status.success());
    let committed = std::fs::read_to_string(CRDS).expect("crds/outbox.dev.yaml");
    assert_eq!(String::from_utf8(generated.stdout).unwrap(), committed, "crds/ is stale: run `make crds` and commit");
    let reference = Command::new(env!("CARGO_BIN_EXE_outbox")).args(["crds", "--reference"]).output().unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reference/crd-fields.md")).unwrap();
    assert_eq!(
        String::from_utf8(reference.stdout).unwrap(),
        committed,
        "docs/reference/crd-fields.md is stale: run `make crds`"
    );

    let client = common::kube_client().await;
    common::apply_crds(&client).await;

    let ns = common::unique("crds");
    assert!(common::kubectl(&["create", "namespace", &ns], None).0);
    let (ok, out) = common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&relay_yaml("sessions", "")));
    assert!(ok, "a valid OutboxRelay is accepted: {out}");

    // Validation the 1.20 apiserver enforces, each naming the field.
    for (extra, field) in [
        ("  batchSize: 0\n", "spec.batchSize"),
        ("  replicas: 11\n", "spec.replicas"),
        ("  backoff: {multiplier: 0.5}\n", "spec.backoff.multiplier"),
        ("  routes: [{aggregateType: Session, topic: \"bad topic\"}]\n", "spec.routes.topic"),
        ("  pollIntervalMs: soon\n", "spec.pollIntervalMs"),
    ] {
        let (ok, out) = common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&relay_yaml("bad", extra)));
        assert!(!ok, "{extra:?} must be rejected");
        assert!(out.contains(field), "the rejection of {extra:?} names {field}: {out}");
    }
    for (schemas, field) in [
        ("{fromRegistry: sometimes}", "spec.schemas.fromRegistry"),
        ("{configMap: s, subjectNameStrategy: TopicRecordNameStrategy}", "spec.schemas.subjectNameStrategy"),
        ("{configMap: s, valueLayout: avro}", "spec.schemas.valueLayout"),
    ] {
        let yaml = relay_yaml("bad", "")
            .replace("  schemas:\n    configMap: session-schemas\n", &format!("  schemas: {schemas}\n"));
        let (ok, out) = common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&yaml));
        assert!(!ok && out.contains(field), "the rejection of {schemas} names {field}: {out}");
    }
    let missing = relay_yaml("bad", "")
        .replace("  mongodb:\n    uriSecret: {name: mongodb, key: uri}\n    database: sessions\n", "");
    // Past kubectl's own check, the apiserver enforces `required` too.
    let (ok, out) = common::kubectl(&["apply", "--validate=false", "-n", &ns, "-f", "-"], Some(&missing));
    assert!(!ok && out.contains("spec.mongodb: Required value"), "a missing required field is named: {out}");
    let (ok, out) = common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&consumer_yaml("c", "smoke")));
    assert!(!ok && out.contains("spec.handler.type"), "an unknown handler type is named: {out}");

    // Status through the subresource shows in the printer columns.
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    let status = serde_json::json!({"status": {"pending": 3, "failed": 1, "dead": 0, "oldestPendingAge": "42s", "ownedRanges": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Reconciled", "message": "ok",
                        "lastTransitionTime": "2026-11-22T10:00:00Z"}]}});
    relays.patch_status("sessions", &PatchParams::default(), &Patch::Merge(&status)).await.expect("status subresource");
    let (ok, out) = common::kubectl(&["get", "orl", "-n", &ns], None);
    assert!(ok, "{out}");
    let header = out.lines().next().unwrap_or_default();
    for column in ["NAME", "READY", "SHARDS", "OWNED", "PENDING", "FAILED", "DEAD", "OLDEST", "AGE"] {
        assert!(header.contains(column), "column {column} in {out}");
    }
    let row = out.lines().nth(1).unwrap_or_default();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..8], ["sessions", "True", "1", "1", "3", "1", "0", "42s"], "{out}");
    // `-o wide` adds who publishes, the longest backoff and the last publish.
    assert!(!header.contains("HOLDER"), "the narrow view stays narrow: {out}");
    let status = serde_json::json!({"status": {"activeRelay": "relay-0,relay-1", "currentMaxBackoffSeconds": 2.5,
        "lastPublishedTime": "2026-11-22T10:00:00Z"}});
    relays.patch_status("sessions", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    let (ok, out) = common::kubectl(&["get", "orl", "-n", &ns, "-o", "wide"], None);
    assert!(ok, "{out}");
    let header = out.lines().next().unwrap_or_default();
    for column in ["HOLDER", "MAXBACKOFF", "LASTPUBLISHED"] {
        assert!(header.contains(column), "wide column {column} in {out}");
    }
    let cells: Vec<&str> = out.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(cells.get(9..11), Some(&["relay-0,relay-1", "2.5"][..]), "{out}");

    let (ok, out) = common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&consumer_yaml("readmodel", "projection")));
    assert!(ok, "a valid EventConsumer is accepted: {out}");
    let consumers: Api<EventConsumer> = Api::namespaced(client.clone(), &ns);
    let status = serde_json::json!({"status": {"lag": 4, "partitionCount": 6, "currentBackoffSeconds": 1.5,
        "processed": 120}});
    consumers.patch_status("readmodel", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    let (ok, narrow) = common::kubectl(&["get", "ec", "-n", &ns], None);
    assert!(ok && !narrow.contains("PARTITIONS"), "{narrow}");
    let (ok, out) = common::kubectl(&["get", "ec", "-n", &ns, "-o", "wide"], None);
    assert!(ok, "{out}");
    // ... AGE PARTITIONS BACKOFF PROCESSED (READY is empty here: no condition yet)
    let cells: Vec<&str> = out.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(cells[cells.len().saturating_sub(3)..], ["6", "1.5", "120"], "{out}");

    let (_, explain) = common::kubectl(&["explain", "outboxrelays.spec.backoff.maxAttempts"], None);
    assert!(explain.contains("Attempts before an event goes dead"), "kubectl explain shows the doc comment: {explain}");
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}
