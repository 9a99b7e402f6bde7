//! The Helm chart and the samples: `helm lint`, `helm template` with every
//! toggle, the alert rules through `promtool check rules` and their unit
//! tests (`tests/alerts/rules_test.yaml`), and server-side dry-run applies
//! of the rendered chart and the samples against the stack's kube-apiserver.

mod common;

use std::process::Command;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/outbox-operator");

/// Run the tool the stack's env file names in `var` (installed by
/// scripts/stack.sh) with `args`; fail with its output unless it succeeds.
/// Returns its standard output and error.
fn tool(var: &str, args: &[&str]) -> (String, String) {
    let path = common::stack_env(var);
    let out = Command::new(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{path} ({var}, installed by scripts/stack.sh) could not run: {e}"));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{path} {args:?} failed:\n{stdout}{stderr}");
    (stdout, stderr.into_owned())
}

fn helm(args: &[&str]) -> String {
    tool("OUTBOX_HELM", args).0
}

const ALL_ON: &str = "serviceMonitor.enabled=true,prometheusRule.enabled=true,grafanaDashboard.enabled=true";

#[test]
fn the_chart_lints_and_renders_every_toggle() {
    helm(&["lint", "--strict", CHART, "--set", ALL_ON]);
    let all = helm(&["template", "outbox", CHART, "--namespace", "ops", "--set", ALL_ON]);
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    ] {
        assert!(all.contains(&format!("kind: {kind}\n")), "{kind} rendered");
    }
    for alert in [
        "OutboxRelayDown",
        "OutboxOldestPendingTooOld",
        "OutboxFailedEvents",
        "OutboxDeadEvents",
        "OutboxConsumerLagHigh",
        "OutboxConsumerDeadLettering",
    ] {
        assert!(all.contains(alert), "alert {alert}");
    }
    // Extra environment (traces, for example) after the operator's own.
    let traced = helm(&[
        "template",
        "outbox",
        CHART,
        "--set",
        "env[0].name=OTEL_EXPORTER_OTLP_ENDPOINT",
        "--set",
        "env[0].value=http://collector:4318",
    ]);
    let pod_name = traced.find("- name: POD_NAME").expect("the operator's env");
    let otel = traced.find("- name: OTEL_EXPORTER_OTLP_ENDPOINT").expect("the extra env rendered");
    assert!(otel > pod_name && traced[otel..].contains("value: http://collector:4318"), "{traced}");
    let namespaced = helm(&["template", "outbox", CHART, "--set", "rbac.clusterWide=false,watchNamespace=shop"]);
    assert!(namespaced.contains("kind: Role\n") && namespaced.contains("namespace: shop"));
    assert!(!namespaced.contains("ClusterRole"));
    let defaults = helm(&["template", "outbox", CHART]);
    assert!(!defaults.contains("ServiceMonitor") && !defaults.contains("PrometheusRule"), "monitoring is opt-in");
    for role in ["name: outbox-outbox-operator-requester", "name: outbox-outbox-operator-editor"] {
        assert!(defaults.contains(role), "the user roles are shipped: {role}");
    }

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{CHART}/dashboards/outbox.json")).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(
        panels.len() >= 8
            && panels.iter().all(|p| p["targets"][0]["expr"].as_str().is_some_and(|e| e.contains("outbox_")))
    );

    let chart_crds = std::fs::read_to_string(format!("{CHART}/crds/outbox.dev.yaml")).unwrap();
    let crds = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/outbox.dev.yaml")).unwrap();
    assert_eq!(chart_crds, crds, "the chart's CRDs are the generated ones: run `make crds`");
}

/// `values.schema.json` refuses a misspelt key and a mistyped value, naming
/// them, and the chart's README lists every value.
#[test]
fn bad_values_fail_with_their_name_and_every_value_is_documented() {
    for (set, says) in [("rbac.clusterwide=false", "clusterwide"), ("replicaCount=two", "replicaCount")] {
        let out = Command::new(common::stack_env("OUTBOX_HELM"))
            .args(["template", "outbox", CHART, "--set", set])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "--set {set}: {stderr}");
    }
    let values: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(format!("{CHART}/values.yaml")).unwrap()).unwrap();
    let readme = std::fs::read_to_string(format!("{CHART}/README.md")).unwrap();
    fn keys(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        match v.as_object() {
            Some(map) if prefix != "resources" => {
                for (k, sub) in map {
                    let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    keys(&path, sub, out);
                }
            }
            _ => out.push(prefix.to_owned()),
        }
    }
    let mut all = Vec::new();
    keys("", &values, &mut all);
    let missing: Vec<&String> = all.iter().filter(|k| !readme.contains(&format!("| `{k}` |"))).collect();
    assert!(missing.is_empty(), "values missing from charts/outbox-operator/README.md: {missing:?}");
}

#[tokio::test]
async fn the_rendered_chart_and_the_samples_pass_a_server_side_dry_run() {
    let client = common::kube_client().await;
    common::apply_crds(&client).await;
    let ns = common::unique("helm");
    assert!(common::kubectl(&["create", "namespace", &ns], None).0);
    for values in ["rbac.clusterWide=true", &format!("rbac.clusterWide=false,watchNamespace={ns}")] {
        let rendered = helm(&["template", "outbox", CHART, "--namespace", &ns, "--set", values]);
        let (ok, out) = common::kubectl(&["apply", "--dry-run=server", "-n", &ns, "-f", "-"], Some(&rendered));
        assert!(ok, "dry-run of the chart with {values}: {out}");
    }
    let samples = concat!(env!("CARGO_MANIFEST_DIR"), "/samples");
    for file in [
        "outboxrelay.yaml",
        "eventconsumer-projection.yaml",
        "eventconsumer-webhook.yaml",
        "eventconsumer-log.yaml",
        "session-app.yaml",
        "dev/stack.yaml",
    ] {
        let path = format!("{samples}/{file}");
        let (ok, out) = common::kubectl(&["apply", "--dry-run=server", "-n", &ns, "-f", &path], None);
        assert!(ok, "dry-run of samples/{file}: {out}");
    }
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}

/// `promtool` (from Debian's prometheus package, unpacked by the stack) on
/// `args`; its output.
fn promtool(args: &[&str]) -> String {
    let (stdout, stderr) = tool("OUTBOX_PROMTOOL", args);
    stdout + &stderr
}

#[test]
fn the_charts_alert_rules_pass_promtool_and_their_unit_tests() {
    // The rules as the chart renders them with its default values.
    let rendered = helm(&[
        "template",
        "outbox",
        CHART,
        "--set",
        "prometheusRule.enabled=true",
        "--show-only",
        "templates/prometheusrule.yaml",
    ]);
    let rule: serde_json::Value = serde_saphyr::from_str(&rendered).expect("the PrometheusRule is YAML");
    let groups = serde_json::json!({"groups": rule["spec"]["groups"]});
    let dir = std::env::temp_dir().join(common::unique("alert-rules"));
    std::fs::create_dir_all(&dir).unwrap();
    // JSON is YAML: promtool reads it as a rule file.
    std::fs::write(dir.join("rules.yaml"), groups.to_string()).unwrap();
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/alerts/rules_test.yaml"), dir.join("rules_test.yaml"))
        .unwrap();
    let checked = promtool(&["check", "rules", dir.join("rules.yaml").to_str().unwrap()]);
    assert!(checked.contains("SUCCESS: 6 rules found"), "{checked}");
    // Each alert fires when it should and stays quiet when it should not.
    let tested = promtool(&["test", "rules", dir.join("rules_test.yaml").to_str().unwrap()]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    std::fs::remove_dir_all(&dir).unwrap();
}
