//! The builder's unit tests: what each kind's spec becomes.

use super::*;
use crate::{
    operator::crd::{EventConsumer, OutboxRelay},
    outbox::bucket::{DEFAULT_BUCKETS, split},
};
use serde_json::json;

const RELAY: &str = r#"
apiVersion: outbox.dev/v1alpha1
kind: OutboxRelay
metadata: {name: sessions, namespace: shop, uid: 1234}
spec:
  mongodb: {uriSecret: {name: mongo, key: uri}, database: sessions}
  schemas: {configMap: session-schemas}
  kafka: {bootstrapServers: "kafka:9092", clientConfig: {linger.ms: "10"}}
  schemaRegistry: {url: "http://registry:8081"}
  routes: [{aggregateType: Session, topic: session-events.v1}]
"#;

fn relay(yaml: &str) -> OutboxRelay {
    serde_saphyr::from_str(yaml).expect("fixture parses")
}

fn ctx() -> BuildContext {
    BuildContext { default_image: "outbox-operator:dev".into(), image_pull_policy: "IfNotPresent".into() }
}

fn env_of(ch: &Children) -> BTreeMap<String, String> {
    ch.config_map.data.clone().unwrap()
}

#[test]
fn a_relay_gets_its_deployment_with_config_secrets_by_reference_and_hardening() {
    let ch = relay_children(&relay(RELAY), &ctx());
    let d = serde_json::to_value(&ch.deployment).unwrap();
    assert_eq!(d["metadata"]["name"], "outbox-relay-sessions");
    assert_eq!(d["metadata"]["namespace"], "shop");
    assert_eq!(d["metadata"]["ownerReferences"][0]["kind"], "OutboxRelay");
    assert_eq!(d["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(d["spec"]["replicas"], 2);
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "outbox-operator:dev");
    assert_eq!(c["args"], json!(["relay"]));
    assert_eq!(c["env"][0]["valueFrom"]["secretKeyRef"], json!({"name": "mongo", "key": "uri"}));
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let text = format!("{d}{}", serde_json::to_string(&ch.config_map).unwrap());
    assert!(!text.contains("mongodb://"), "no connection string in any child");
    let env = env_of(&ch);
    assert_eq!(env["OUTBOX_ROUTES"], "Session=session-events.v1");
    assert_eq!(env["KAFKA_PRODUCER_CONFIG"], "linger.ms=10");
    assert_eq!(env["RELAY_LEASE_BACKEND"], "kubernetes");
    assert_eq!(env["RELAY_BACKOFF_MAX_MS"], "300000");
}

#[test]
fn the_schema_configmap_is_mounted_read_only_and_named_to_the_relay() {
    let ch = relay_children(&relay(RELAY), &ctx());
    let d = serde_json::to_value(&ch.deployment).unwrap();
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"], json!([{"name": "schemas", "configMap": {"name": "session-schemas"}}]));
    assert_eq!(
        pod["containers"][0]["volumeMounts"],
        json!([{"name": "schemas", "mountPath": SCHEMAS_MOUNT, "readOnly": true}])
    );
    let env = env_of(&ch);
    assert_eq!(env["SCHEMAS_DIR"], SCHEMAS_MOUNT);
    assert_eq!(
        (env["SUBJECT_NAME_STRATEGY"].as_str(), env["VALUE_LAYOUT"].as_str()),
        ("topic-record-name", "envelope")
    );
    assert!(!env.contains_key("SCHEMAS_FROM_REGISTRY"));

    let yaml = RELAY.replace(
        "schemas: {configMap: session-schemas}",
        "schemas: {fromRegistry: eventVersion, recordNamespace: com.acme, subjectNameStrategy: TopicName, valueLayout: payload}",
    );
    let ch = relay_children(&relay(&yaml), &ctx());
    let d = serde_json::to_value(&ch.deployment).unwrap();
    assert_eq!(d["spec"]["template"]["spec"]["volumes"], json!([]));
    let env = env_of(&ch);
    assert_eq!(env["SCHEMAS_FROM_REGISTRY"], "event-version");
    assert_eq!(env["SCHEMA_RECORD_NAMESPACE"], "com.acme");
    assert_eq!((env["SUBJECT_NAME_STRATEGY"].as_str(), env["VALUE_LAYOUT"].as_str()), ("topic-name", "payload"));
    assert!(!env.contains_key("SCHEMAS_DIR"));
}

#[test]
fn credentials_come_from_secrets_by_reference() {
    let yaml = RELAY
        .replace(
            "kafka: {bootstrapServers: \"kafka:9092\", clientConfig: {linger.ms: \"10\"}}",
            "kafka: {bootstrapServers: \"kafka:9092\", authSecret: kafka-creds}",
        )
        .replace(
            "schemaRegistry: {url: \"http://registry:8081\"}",
            "schemaRegistry: {url: \"http://registry:8081\", authSecret: sr-creds}",
        );
    let ch = relay_children(&relay(&yaml), &ctx());
    let d = serde_json::to_value(&ch.deployment).unwrap();
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["envFrom"][1], json!({"secretRef": {"name": "kafka-creds"}, "prefix": "KAFKA_AUTH_"}));
    let env = c["env"].as_array().unwrap();
    assert!(env.iter().any(|e| e["name"] == "SCHEMA_REGISTRY_PASSWORD"
        && e["valueFrom"]["secretKeyRef"] == json!({"name": "sr-creds", "key": "password"})));
}

#[test]
fn pod_env_adds_variables_after_the_operators_and_may_not_replace_one() {
    let with_env = |env: &str| RELAY.to_owned() + &format!("  pod: {{env: {env}}}\n");
    let ch = relay_children(
        &relay(&with_env(r#"[{name: OTEL_EXPORTER_OTLP_ENDPOINT, value: "http://collector:4318"}]"#)),
        &ctx(),
    );
    assert_eq!(ch.check_env(), Ok(()));
    let d = serde_json::to_value(&ch.deployment).unwrap();
    let env = d["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap().clone();
    assert_eq!(env.last().unwrap(), &json!({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://collector:4318"}));
    assert_eq!(env[0]["name"], "MONGODB_URI", "the operator's own first");

    // One from the ConfigMap, one of the container's own: both named.
    let ch = relay_children(
        &relay(&with_env(
            "[{name: RELAY_SHARDS, value: \"4\"}, {name: POD_NAME, value: x}, {name: RUST_LOG, value: debug}]",
        )),
        &ctx(),
    );
    assert_eq!(
        ch.check_env(),
        Err("spec.pod.env: RELAY_SHARDS, POD_NAME are set by the operator from the resource's spec; set the \
             spec's field instead"
            .into())
    );
}

#[test]
fn the_relay_role_allows_only_its_lease() {
    let ch = relay_children(&relay(RELAY), &ctx());
    let role = serde_json::to_value(ch.role.unwrap()).unwrap();
    // The outbox's lease (database sessions, collection outbox), not one per resource.
    assert_eq!(role["rules"][1]["resourceNames"], json!([crate::lease::outbox_lease_name("sessions", "outbox")]));
    assert_eq!(role["rules"][1]["verbs"], json!(["get", "update"]));
    assert_eq!(role["rules"].as_array().unwrap().len(), 2);
    let binding = serde_json::to_value(ch.role_binding.unwrap()).unwrap();
    assert_eq!(binding["subjects"][0]["name"], "outbox-relay-sessions");
}

#[test]
fn a_sharded_relay_has_one_lease_per_range_and_tells_its_pods_the_split() {
    let ch = relay_children(&relay(&format!("{RELAY}  shards: 3\n")), &ctx());
    let role = serde_json::to_value(ch.role.unwrap()).unwrap();
    let names: Vec<String> =
        split(DEFAULT_BUCKETS, 3).iter().map(|r| crate::lease::range_lease_name("sessions", "outbox", r)).collect();
    assert_eq!(role["rules"][1]["resourceNames"], json!(names));
    assert_eq!(ch.lease_names, names);
    assert!(names[2].contains("-r2of3-"), "{names:?}");
    assert_eq!(ch.config_map.data.unwrap()["RELAY_SHARDS"], "3");
    // Its pods prefer different nodes.
    let d = serde_json::to_value(&ch.deployment).unwrap();
    let spread = &d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        [0]["podAffinityTerm"];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(spread["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"], "sessions");
}

#[test]
fn a_spec_change_changes_the_config_hash_and_paused_scales_to_zero() {
    let a = relay_children(&relay(RELAY), &ctx());
    let b = relay_children(&relay(&format!("{RELAY}  batchSize: 50\n")), &ctx());
    let hash = |c: &Children| {
        serde_json::to_value(&c.deployment).unwrap()["spec"]["template"]["metadata"]["annotations"]["outbox.dev/config-hash"]
            .clone()
    };
    assert_ne!(hash(&a), hash(&b));
    assert_eq!(hash(&a), hash(&relay_children(&relay(RELAY), &ctx())), "stable");
    let paused = relay_children(&relay(&format!("{RELAY}  paused: true\n")), &ctx());
    assert_eq!(serde_json::to_value(&paused.deployment).unwrap()["spec"]["replicas"], 0);
}

#[test]
fn a_consumer_needs_no_api_access() {
    let c: EventConsumer = serde_saphyr::from_str(
        r#"
apiVersion: outbox.dev/v1alpha1
kind: EventConsumer
metadata: {name: readmodel, namespace: shop, uid: 99}
spec:
  topics: [session-events.v1]
  groupId: readmodel
  handler: {type: webhook, webhookUrl: "http://hook"}
  mongodb: {uriSecret: {name: mongo, key: uri}, database: sessions}
  kafka: {bootstrapServers: "kafka:9092"}
  schemaRegistry: {url: "http://registry:8081"}
"#,
    )
    .unwrap();
    let ch = consumer_children(&c, &ctx());
    assert!(ch.role.is_none() && ch.role_binding.is_none());
    assert_eq!(ch.service_account.automount_service_account_token, Some(false));
    let env = env_of(&ch);
    assert_eq!((env["CONSUMER_HANDLER"].as_str(), env["WEBHOOK_URL"].as_str()), ("webhook", "http://hook"));
    assert_eq!(env["CONSUMER_GROUP"], "readmodel");
    let d = serde_json::to_value(&ch.deployment).unwrap();
    assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["args"], json!(["consume"]));
    assert_eq!(d["spec"]["replicas"], 1);
    assert!(ch.rebuild_job.is_none(), "no rebuild requested");
    let request = OwnerReference { uid: "req-1".into(), ..OwnerReference::default() };
    let job = serde_json::to_value(redrive_job(&c, &ctx(), &request)).unwrap();
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["args"],
        json!(["consume", "redrive", "--request", "req-1", "--dead-letter-topic", "session-events.v1.dlq"])
    );
}

#[test]
fn a_signed_cloudevents_webhook_reads_its_secrets_from_secret_keys() {
    let c: EventConsumer = serde_saphyr::from_str(
        r#"
apiVersion: outbox.dev/v1alpha1
kind: EventConsumer
metadata: {name: orders-hook, namespace: shop, uid: 99}
spec:
  topics: [orders]
  groupId: orders-hook
  handler:
    type: webhook
    webhookUrl: "https://billing/events"
    contentMode: structured
    source: /shop/orders
    signingSecret: {name: hook-secrets, key: signing}
    bearerTokenSecret: {name: hook-secrets, key: token}
  mongodb: {uriSecret: {name: mongo, key: uri}, database: orders}
  kafka: {bootstrapServers: "kafka:9092"}
  schemaRegistry: {url: "http://registry:8081"}
"#,
    )
    .unwrap();
    let ch = consumer_children(&c, &ctx());
    let env = env_of(&ch);
    assert_eq!((env["WEBHOOK_CONTENT_MODE"].as_str(), env["WEBHOOK_SOURCE"].as_str()), ("structured", "/shop/orders"));
    assert!(!env.contains_key("WEBHOOK_SIGNING_SECRET"), "never in the ConfigMap");
    let d = serde_json::to_value(&ch.deployment).unwrap();
    let vars = d["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap().clone();
    let from_secret =
        |name: &str| vars.iter().find(|v| v["name"] == name).map(|v| v["valueFrom"]["secretKeyRef"].clone());
    assert_eq!(from_secret("WEBHOOK_SIGNING_SECRET"), Some(json!({"name": "hook-secrets", "key": "signing"})));
    assert_eq!(from_secret("WEBHOOK_BEARER_TOKEN"), Some(json!({"name": "hook-secrets", "key": "token"})));
}

#[test]
fn a_rebuild_request_gets_one_job_running_the_consumers_pod_with_its_own_labels() {
    let yaml = |extra: &str| {
        format!(
            r#"
apiVersion: outbox.dev/v1alpha1
kind: EventConsumer
metadata: {{name: readmodel, namespace: shop, uid: 99}}
spec:
  topics: [session-events.v1]
  groupId: readmodel
  handler: {{type: projection}}
  mongodb: {{uriSecret: {{name: mongo, key: uri}}, database: sessions}}
  kafka: {{bootstrapServers: "kafka:9092"}}
  schemaRegistry: {{url: "http://registry:8081"}}
  batchSize: 200
{extra}"#
        )
    };
    let c: EventConsumer = serde_saphyr::from_str(&yaml("  rebuild: \"2026-11-23\"")).unwrap();
    let ch = consumer_children(&c, &ctx());
    assert_eq!((env_of(&ch)["CONSUMER_BATCH_SIZE"].as_str(), env_of(&ch)["CONSUMER_LINGER_MS"].as_str()), ("200", "0"));
    let env = env_of(&ch);
    assert_eq!((env["CONSUMER_ORDERING"].as_str(), env["CONSUMER_MAX_IN_FLIGHT"].as_str()), ("key", "16"), "defaults");
    let c: EventConsumer = serde_saphyr::from_str(&yaml("  ordering: partition\n  maxInFlight: 64")).unwrap();
    let env = env_of(&consumer_children(&c, &ctx()));
    assert_eq!((env["CONSUMER_ORDERING"].as_str(), env["CONSUMER_MAX_IN_FLIGHT"].as_str()), ("partition", "64"));
    let job = serde_json::to_value(ch.rebuild_job.as_ref().expect("a job")).unwrap();
    let name = job["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("outbox-consumer-readmodel-rebuild-") && name.len() <= 63, "{name}");
    let pod = &job["spec"]["template"];
    assert_eq!(pod["spec"]["restartPolicy"], "OnFailure");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["args"], json!(["consume", "rebuild"]));
    assert!(container.get("livenessProbe").is_none() && container.get("ports").is_none());
    let d = serde_json::to_value(&ch.deployment).unwrap();
    let consumer = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["envFrom"], consumer["envFrom"], "the consumer's settings");
    assert_eq!(container["env"], consumer["env"]);
    // The consumer's Service and budget select its own pods, not the rebuild's.
    assert_eq!(pod["metadata"]["labels"]["app.kubernetes.io/name"], "outbox-consumer-rebuild");
    assert_eq!(d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"], "outbox-consumer");
    let again = consumer_children(&serde_saphyr::from_str(&yaml("  rebuild: \"2026-11-24\"")).unwrap(), &ctx());
    assert_ne!(again.rebuild_job.unwrap().metadata.name.unwrap(), name, "a new request, a new job");
    let long = rebuild_job_name(&"x".repeat(80), "r");
    assert_eq!(long.len(), 63);
}
