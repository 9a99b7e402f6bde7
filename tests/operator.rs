//! The operator against the real kube-apiserver + controller-manager, with
//! the real MongoDB, broker and registry behind the status: children with
//! the expected spec, status from the outbox and the consumer group, spec
//! changes rolling the pods, a missing Secret as a condition, garbage
//! collection, and the relay run as a local process from exactly the
//! Deployment and ConfigMap the operator built. The operator runs in-process
//! here (its pods use an image that is not on the node); `tests/pods.rs`
//! runs everything as real pods.

mod common;

use std::time::Duration;

use k8s_openapi::api::{apps::v1::Deployment, batch::v1::Job, core::v1::ConfigMap};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use mongodb::bson::{Document, doc};
use outbox_operator::operator::{
    self,
    crd::{EventConsumer, OutboxRelay},
};

/// How long a deleted OutboxRelay may take to go: its finalizer removes the
/// Lease only once the relay's pods are gone, and on the stack's node pods
/// terminate for real: their grace period, then the 1.20 kubelet reports a
/// pod removed only after its next container garbage collection (measured
/// here: about 50 s for a pod whose container never started).
const POD_TERMINATION: Duration = Duration::from_secs(120);

fn relay_yaml(name: &str, secret: &str, database: &str, topic: &str) -> String {
    format!(
        r#"apiVersion: outbox.dev/v1alpha1
kind: OutboxRelay
metadata: {{name: {name}}}
spec:
  replicas: 1
  mongodb: {{uriSecret: {{name: {secret}, key: uri}}, database: {database}}}
  kafka: {{bootstrapServers: "{}", clientConfig: {{batch.num.messages: "1", client.id: "outbox,relay"}}}}
  schemaRegistry: {{url: "{}"}}
  schemas: {{configMap: session-schemas}}
  routes: [{{aggregateType: Session, topic: {topic}}}]
  pollIntervalMs: 100
"#,
        common::kafka_bootstrap(),
        common::schema_registry_url()
    )
}

fn consumer_yaml(name: &str, database: &str, topic: &str) -> String {
    format!(
        "apiVersion: outbox.dev/v1alpha1\nkind: EventConsumer\nmetadata: {{name: {name}}}\nspec:\n  topics: [{topic}]\n  \
         groupId: {name}\n  handler: {{type: projection}}\n  mongodb: {{uriSecret: {{name: mongodb, key: uri}}, database: {database}}}\n  \
         kafka: {{bootstrapServers: \"{}\"}}\n  schemaRegistry: {{url: \"{}\"}}\n",
        common::kafka_bootstrap(),
        common::schema_registry_url()
    )
}

async fn relay_status(api: &Api<OutboxRelay>, name: &str) -> Option<outbox_operator::operator::crd::OutboxRelayStatus> {
    api.get(name).await.ok()?.status
}

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions.iter().find(|c| c.type_ == t)
}

/// An OutboxRelay: its children with the expected spec, status from the
/// outbox itself, a broken schema file named, a spec change rolling the
/// pods, the relay run from exactly the Deployment and ConfigMap built,
/// status following it, and deletion collecting the children and the Lease.
#[tokio::test]
async fn the_operator_builds_a_relays_children_and_reports_its_outbox() {
    outbox_operator::telemetry::init_logging(outbox_operator::telemetry::LogFormat::Text);
    let (client, ns, stop_tx, op) = operator_in_new_namespace("op").await;

    // The outbox: 10 events (5 sessions, created then refreshed), the
    // first of one session dead.
    let mongo = common::mongo().await;
    let db = common::TestDb::new(mongo.database(&common::unique("op-outbox")));
    let ids = common::seed_outbox(&db, 5, 2).await;
    db.collection::<Document>("outbox")
        .update_one(doc! {"_id": &ids[4]}, doc! {"$set": {"status": "dead", "holdSeq": 0_i64}})
        .await
        .unwrap();
    common::create_mongodb_secret(&client, &ns).await;
    common::create_sample_schemas(&client, &ns).await;

    let topic = common::unique("op-events");
    common::create_topic(&topic, 1).await;
    let (ok, out) =
        common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&relay_yaml("sessions", "mongodb", db.name(), &topic)));
    assert!(ok, "{out}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    common::eventually("the relay Deployment", Duration::from_secs(30), || async {
        deployments.get_opt("outbox-relay-sessions").await.unwrap().is_some()
    })
    .await;
    let d = deployments.get("outbox-relay-sessions").await.unwrap();
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    assert_eq!(container.args.as_deref(), Some(&["relay".to_owned()][..]));
    assert_eq!(container.image.as_deref(), Some("outbox-operator:test"));
    let uri_ref = container.env.as_ref().unwrap()[0].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
    assert_eq!((uri_ref.name.as_str(), uri_ref.key.as_str()), ("mongodb", "uri"));
    assert_eq!(d.metadata.owner_references.as_ref().unwrap()[0].kind, "OutboxRelay");
    for kind in ["serviceaccount", "role", "rolebinding", "service", "configmap", "poddisruptionbudget"] {
        common::eventually(&format!("the relay's {kind}"), Duration::from_secs(30), || async {
            common::kubectl(&["get", kind, "outbox-relay-sessions", "-n", &ns], None).0
        })
        .await;
    }

    // Status from the outbox itself (no relay pod runs: there is no kubelet).
    common::eventually("status counts the outbox", Duration::from_secs(30), || async {
        relay_status(&relays, "sessions").await.is_some_and(|s| s.pending == 9 && s.dead == 1)
    })
    .await;
    let status = relay_status(&relays, "sessions").await.unwrap();
    assert_eq!(condition(&status.conditions, "Ready").unwrap().reason, "PodsNotReady");
    assert_eq!(condition(&status.conditions, "Degraded").unwrap().status, "False");
    assert_eq!(condition(&status.conditions, "SchemasCompatible").unwrap().status, "True");
    assert_eq!(status.blocked_aggregates, 1);
    // A schema file that does not parse is named in SchemasCompatible.
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns);
    let broken = serde_json::json!({"data": {"Session.SessionEnded.v2.avsc": "{\"type\": \"record\""}});
    maps.patch("session-schemas", &PatchParams::default(), &Patch::Merge(broken)).await.unwrap();
    relays
        .patch(
            "sessions",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"poke": "1"}}})),
        )
        .await
        .unwrap();
    common::eventually("the broken schema file named in SchemasCompatible", Duration::from_secs(60), || async {
        relay_status(&relays, "sessions").await.is_some_and(|s| {
            condition(&s.conditions, "SchemasCompatible").is_some_and(|c| {
                c.status == "False" && c.reason == "SchemaInvalid" && c.message.contains("Session.SessionEnded.v2.avsc")
            })
        })
    })
    .await;
    let fixed = serde_json::json!({"data": {"Session.SessionEnded.v2.avsc": null}});
    maps.patch("session-schemas", &PatchParams::default(), &Patch::Merge(fixed)).await.unwrap();
    assert!(status.oldest_pending_age.is_some());
    let (_, table) = common::kubectl(&["get", "orl", "-n", &ns], None);
    // NAME READY SHARDS OWNED PENDING ...
    assert!(table.lines().nth(1).unwrap_or_default().split_whitespace().nth(4) == Some("9"), "{table}");

    // A spec change rolls the pods: the config hash on the pod template changes.
    let hash = |d: &Deployment| {
        d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()["outbox.dev/config-hash"].clone()
    };
    let before = hash(&d);
    relays
        .patch("sessions", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"batchSize": 100}})))
        .await
        .unwrap();
    common::eventually("the Deployment follows the spec", Duration::from_secs(30), || async {
        hash(&deployments.get("outbox-relay-sessions").await.unwrap()) != before
    })
    .await;

    // Run the relay exactly as the Deployment says (args, ConfigMap env, Secret env).
    let d = deployments.get("outbox-relay-sessions").await.unwrap();
    let container = d.spec.unwrap().template.spec.unwrap().containers.remove(0);
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let env = cm.get("outbox-relay-sessions").await.unwrap().data.unwrap();
    assert_eq!(env["RELAY_BATCH_SIZE"], "100");
    assert_eq!(env["SCHEMAS_DIR"], outbox_operator::operator::children::SCHEMAS_MOUNT);
    let mut relay = common::Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(container.args.unwrap())
            .envs(&env)
            .env("MONGODB_URI", common::mongodb_uri()) // from the Secret, as the pod gets it
            .env("SCHEMAS_DIR", common::SAMPLE_SCHEMAS) // the pod mounts the ConfigMap's files at SCHEMAS_DIR
            .env("POD_NAMESPACE", &ns) // from the downward API, as the pod gets it
            .env("HOSTNAME", "outbox-relay-sessions-local")
            .env("KUBECONFIG", common::kubeconfig()) // the pod would use its service account
            .env("METRICS_LISTEN", "127.0.0.1:0") // the pod's own network namespace has 9090 free
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("run the relay from the Deployment's spec"),
    );
    let checkpoints = outbox_operator::outbox::checkpoint::Checkpoints::new(&db, "outbox");
    common::eventually(
        "the relay from the operator's spec publishes and checkpoints",
        Duration::from_secs(60),
        || async {
            common::published_count(&db).await >= 8
                && checkpoints.load().await.unwrap().is_some_and(|c| c.position_time().is_some())
        },
    )
    .await;
    relay.kill().unwrap();
    relay.wait().unwrap();
    // Nudge a reconcile (any change to the object is watched) instead of waiting for the requeue.
    relays
        .patch(
            "sessions",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"nudge": "1"}}})),
        )
        .await
        .unwrap();
    common::eventually("status shows the outbox drained", Duration::from_secs(30), || async {
        relay_status(&relays, "sessions").await.is_some_and(|s| {
            (s.pending, s.held, s.dead) == (0, 1, 1)
                && s.last_published_time.is_some()
                && s.active_relay.as_deref() == Some("outbox-relay-sessions-local")
        })
    })
    .await;
    // The first relay on an existing outbox rescanned it, and says so.
    let status = relay_status(&relays, "sessions").await.unwrap();
    let recovered = condition(&status.conditions, "StreamRecovered").expect("StreamRecovered");
    assert_eq!((recovered.status.as_str(), recovered.reason.as_str()), ("True", "FirstStart"), "{recovered:?}");
    assert!(recovered.message.contains("republished 9"), "{recovered:?}");

    // Deleting the resource garbage-collects its children, and the finalizer
    // removes the Lease the relay elected through (not owned, so not collected).
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), &ns);
    // One Lease per outbox (database + collection), not per resource.
    let lease = outbox_operator::lease::outbox_lease_name(db.name(), "outbox");
    assert!(leases.get_opt(&lease).await.unwrap().is_some(), "the local relay took its Lease");
    assert!(
        relays
            .get("sessions")
            .await
            .unwrap()
            .metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"outbox.dev/relay-lease".to_owned())
    );
    relays.delete("sessions", &DeleteParams::default()).await.unwrap();
    common::eventually("children garbage-collected", Duration::from_secs(60), || async {
        deployments.get_opt("outbox-relay-sessions").await.unwrap().is_none()
    })
    .await;
    common::eventually("the relay's Lease deleted and the resources gone", POD_TERMINATION, || async {
        leases.get_opt(&lease).await.unwrap().is_none() && relays.get_opt("sessions").await.unwrap().is_none()
    })
    .await;

    stop_tx.send(true).unwrap();
    op.await.unwrap().unwrap();
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}

/// An EventConsumer: its Deployment, the group's lag, a member's waiting
/// partition and parked aggregates in status, and a rebuild requested
/// through `spec.rebuild` followed to the new generation.
#[tokio::test]
async fn a_consumers_status_shows_lag_waiting_members_and_a_rebuild() {
    let (client, ns, stop_tx, op) = operator_in_new_namespace("op-consumer").await;
    common::create_mongodb_secret(&client, &ns).await;
    // 8 events in the topic: 4 sessions, created then refreshed.
    let db = common::TestDb::new(common::mongo().await.database(&common::unique("op-consumer")));
    common::seed_outbox(&db, 4, 2).await;
    let topic = common::unique("op-consumer-events");
    common::create_topic(&topic, 1).await;
    let mut relay_args = common::relay_args(db.name(), &common::kafka_bootstrap(), &topic, "op-consumer");
    // One record per produce request: the stack's broker (tansu) was seen
    // to advance the high watermark per record batch (8 records
    // acknowledged, 6 offsets), and the lag below counts offsets.
    relay_args.producer_config.push(("batch.num.messages".into(), "1".into()));
    let (relay, stop_relay) = common::spawn_relay(relay_args);
    common::eventually("the 8 events published", Duration::from_secs(60), || async {
        common::published_count(&db).await == 8
    })
    .await;
    stop_relay.send(true).unwrap();
    relay.await.unwrap().unwrap();
    // The records in the topic: the 8, and any a relay's first start
    // published twice (at-least-once).
    let records = || async {
        let topics = std::slice::from_ref(&topic);
        let bootstrap = common::kafka_bootstrap();
        let lag =
            outbox_operator::kafka::lag::read_group_lag(&bootstrap, &[], "readmodel", topics, Duration::from_secs(10));
        lag.await.unwrap().total
    };
    common::eventually("the 8 events in the topic", Duration::from_secs(30), || async { records().await >= 8 }).await;
    let in_topic = records().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);

    // A consumer: its Deployment and the group's lag (nobody consumed yet).
    let consumer = consumer_yaml("readmodel", db.name(), &topic);
    let (ok, out) = common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&consumer));
    assert!(ok, "{out}");
    let consumers: Api<EventConsumer> = Api::namespaced(client.clone(), &ns);
    common::eventually("consumer status with the group's lag", Duration::from_secs(60), || async {
        consumers.get("readmodel").await.ok().and_then(|c| c.status).is_some_and(|s| {
            s.lag == in_topic && s.observed_time.is_some() && s.partitions.len() == 1 && s.partition_count == 1
        })
    })
    .await;
    assert!(deployments.get_opt("outbox-consumer-readmodel").await.unwrap().is_some());

    // A member of the group whose registry is unreachable: its partition
    // waits, and the pods' reports put that in status (the counters too,
    // which were never filled before), with the group's parked aggregates.
    let mut member =
        common::consume_args(db.name(), &topic, "readmodel", outbox_operator::consumer::HandlerKind::Projection);
    member.schema_registry_url = "http://127.0.0.1:9".into();
    member.member_id = Some("member-a".into());
    let (member, stop_member) = common::spawn_consumer(member);
    outbox_operator::consumer::parked::ParkedAggregates::new(&db, "readmodel")
        .park("aggregate-1", "event-1", "webhook answered 422")
        .await
        .unwrap();
    common::eventually("status names the waiting partition and why", Duration::from_secs(60), || async {
        consumers.get("readmodel").await.ok().and_then(|c| c.status).is_some_and(|s| {
            let waiting = condition(&s.conditions, "PartitionsWaiting").is_some_and(|c| {
                c.status == "True" && c.reason == "DependencyUnavailable" && c.message.contains("member-a")
            });
            waiting
                && s.waiting == 1
                && s.waiting_partitions
                    .first()
                    .is_some_and(|w| w.reason == "registry" && w.offset == 0 && w.member == "member-a")
                // Lanes by aggregate (the default ordering): each aggregate's first event waits.
                && s.waiting_aggregates.first().is_some_and(|w| {
                    w.reason == "registry" && w.aggregate.is_some() && w.member == "member-a"
                })
                && s.reporting_members == 1
                && s.parked_aggregates == 1
                && s.failed > 0
                && s.current_backoff_seconds.is_some_and(|b| b > 0.0)
        })
    })
    .await;
    stop_member.send(true).unwrap();
    member.await.unwrap().unwrap();
    common::eventually("a member that stopped no longer reports", Duration::from_secs(60), || async {
        consumers.get("readmodel").await.ok().and_then(|c| c.status).is_some_and(|s| {
            s.reporting_members == 0
                && s.waiting == 0
                && condition(&s.conditions, "PartitionsWaiting").is_some_and(|c| c.status == "False")
        })
    })
    .await;

    // A rebuild of the read model requested through spec.rebuild: one Job
    // running the consumer's pod as `consume rebuild` (its image is not on
    // the node, so the rebuild runs in-process here, as that pod would),
    // and status follows its progress to the new generation.
    let patch = serde_json::json!({"spec": {"rebuild": "2026-11-23"}});
    consumers.patch("readmodel", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let selector = ListParams::default().labels("app.kubernetes.io/name=outbox-consumer-rebuild");
    common::eventually("the rebuild's Job", Duration::from_secs(30), || async {
        jobs.list(&selector).await.unwrap().items.len() == 1
    })
    .await;
    let job = jobs.list(&selector).await.unwrap().items.remove(0);
    let container = &job.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    assert_eq!(container.args.as_deref(), Some(&["consume".to_owned(), "rebuild".to_owned()][..]));
    let args = common::consume_args(db.name(), &topic, "readmodel", outbox_operator::consumer::HandlerKind::Projection);
    let (_keep, no_stop) = tokio::sync::watch::channel(false);
    let rebuilt = outbox_operator::consumer::rebuild::rebuild(&args, no_stop).await.expect("rebuild");
    assert_eq!(rebuilt.generation.number, 2);
    common::eventually("status shows the rebuild completed", Duration::from_secs(60), || async {
        consumers.get("readmodel").await.ok().and_then(|c| c.status).is_some_and(|s| {
            s.projection_generation == Some(2)
                && s.processed == 8
                && s.rebuild.as_ref().is_some_and(|r| {
                    r.phase == "Completed"
                        && r.progress_percent == 100
                        && (r.records_done, r.records_total) == (in_topic, in_topic)
                        && r.job.as_deref() == job.metadata.name.as_deref()
                })
        })
    })
    .await;

    stop_tx.send(true).unwrap();
    op.await.unwrap().unwrap();
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}

/// The operator's own probes connect with the resource's credentials, as
/// the pods do.
#[tokio::test]
async fn the_operators_probes_use_the_resources_credentials() {
    let (client, ns, stop_tx, op) = operator_in_new_namespace("op-creds").await;
    common::create_mongodb_secret(&client, &ns).await;
    common::create_sample_schemas(&client, &ns).await;
    let db = common::unique("op-creds");
    let topic = common::unique("op-creds-events");
    let consumers: Api<EventConsumer> = Api::namespaced(client.clone(), &ns);
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    // SASL settings from kafka.authSecret against this
    // plaintext broker fail (without them the probe would succeed), and a
    // missing registry authSecret is named.
    let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: kafka-creds}\nstringData:\n  SECURITY_PROTOCOL: sasl_plaintext\n  \
                  SASL_MECHANISM: PLAIN\n  SASL_USERNAME: someone\n  SASL_PASSWORD: secret\n";
    let (ok, out) = common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(secret));
    assert!(ok, "{out}");
    let secured = consumer_yaml("readmodel", &db, &topic)
        .replace("name: readmodel", "name: secured")
        .replace("kafka: {bootstrapServers:", "kafka: {authSecret: kafka-creds, bootstrapServers:");
    let (ok, out) = common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&secured));
    assert!(ok, "{out}");
    common::eventually("the probe used the SASL settings and failed", Duration::from_secs(40), || async {
        consumers.get("secured").await.ok().and_then(|c| c.status).is_some_and(|s| {
            condition(&s.conditions, "Degraded").is_some_and(|c| c.status == "True" && c.reason == "KafkaUnreachable")
        })
    })
    .await;
    consumers.delete("secured", &DeleteParams::default()).await.unwrap();
    let locked = relay_yaml("locked", "mongodb", &db, &topic)
        .replace("schemaRegistry: {url:", "schemaRegistry: {authSecret: missing-registry-creds, url:");
    assert!(locked.contains("missing-registry-creds"), "{locked}");
    let (ok, out) = common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&locked));
    assert!(ok, "{out}");
    common::eventually("a missing registry Secret named in SchemasCompatible", Duration::from_secs(30), || async {
        relay_status(&relays, "locked").await.is_some_and(|s| {
            condition(&s.conditions, "SchemasCompatible").is_some_and(|c| {
                c.status == "False" && c.reason == "SecretNotFound" && c.message.contains("missing-registry-creds")
            })
        })
    })
    .await;
    relays.delete("locked", &DeleteParams::default()).await.unwrap();

    stop_tx.send(true).unwrap();
    op.await.unwrap().unwrap();
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}

/// A Secret the resource names that does not exist is a condition and an
/// Event, not a crash.
#[tokio::test]
async fn a_missing_secret_is_a_condition_and_an_event() {
    let (client, ns, stop_tx, op) = operator_in_new_namespace("op-orphan").await;
    common::create_sample_schemas(&client, &ns).await;
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    let (db, topic) = (common::unique("op-orphan"), common::unique("op-orphan-events"));
    let (ok, out) =
        common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&relay_yaml("orphan", "missing", &db, &topic)));
    assert!(ok, "{out}");
    common::eventually("SecretNotFound condition", Duration::from_secs(30), || async {
        relay_status(&relays, "orphan").await.is_some_and(|s| {
            condition(&s.conditions, "Ready").is_some_and(|c| c.reason == "SecretNotFound" && c.status == "False")
                && condition(&s.conditions, "Degraded").is_some_and(|c| c.status == "True")
        })
    })
    .await;
    let (_, events) = common::kubectl(&["get", "events.events.k8s.io", "-n", &ns], None);
    assert!(events.contains("SecretNotFound"), "an Event on the transition: {events}");

    relays.delete("orphan", &DeleteParams::default()).await.unwrap();
    common::eventually("the resource gone", POD_TERMINATION, || async {
        relays.get_opt("orphan").await.unwrap().is_none()
    })
    .await;
    stop_tx.send(true).unwrap();
    op.await.unwrap().unwrap();
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}

#[tokio::test]
async fn two_operator_replicas_one_leads_and_the_other_takes_over() {
    use outbox_operator::lease::kube::KubeLease;
    let client = common::kube_client().await;
    common::apply_crds(&client).await;
    let ns = common::unique("op-ha");
    assert!(common::kubectl(&["create", "namespace", &ns], None).0);
    let args = |identity: &str| common::operator_args(&ns, identity);
    let (stop_a, rx_a) = tokio::sync::watch::channel(false);
    let a = tokio::spawn(operator::run_until(args("operator-a"), rx_a));
    let observer = KubeLease::new(client.clone(), &ns, "outbox-operator", "observer", Duration::from_secs(15));
    common::eventually("operator-a leads", Duration::from_secs(30), || async {
        observer.holder().await.unwrap().as_deref() == Some("operator-a")
    })
    .await;
    let (stop_b, rx_b) = tokio::sync::watch::channel(false);
    let b = tokio::spawn(operator::run_until(args("operator-b"), rx_b));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(observer.holder().await.unwrap().as_deref(), Some("operator-a"), "operator-b stands by");

    stop_a.send(true).unwrap();
    a.await.unwrap().unwrap();
    common::eventually("operator-b takes over once operator-a released the lease", Duration::from_secs(30), || async {
        observer.holder().await.unwrap().as_deref() == Some("operator-b")
    })
    .await;
    // And it reconciles: a resource gets its Deployment.
    let (ok, out) =
        common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&relay_yaml("ha", "mongodb", "ha", "ha-events")));
    assert!(ok, "{out}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    common::eventually("operator-b reconciles", Duration::from_secs(30), || async {
        deployments.get_opt("outbox-relay-ha").await.unwrap().is_some()
    })
    .await;
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    relays.delete("ha", &DeleteParams::default()).await.unwrap();
    common::eventually("the finalizer ran", POD_TERMINATION, || async {
        relays.get_opt("ha").await.unwrap().is_none()
    })
    .await;
    stop_b.send(true).unwrap();
    b.await.unwrap().unwrap();
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}

/// A fresh namespace with an in-process operator watching it.
async fn operator_in_new_namespace(
    prefix: &str,
) -> (kube::Client, String, tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<outbox_operator::Result<()>>) {
    let client = common::kube_client().await;
    common::apply_crds(&client).await;
    let ns = common::unique(prefix);
    assert!(common::kubectl(&["create", "namespace", &ns], None).0);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let op = tokio::spawn(operator::run_until(common::operator_args(&ns, &format!("operator-{prefix}")), stop_rx));
    (client, ns, stop_tx, op)
}

/// A relay process run exactly as the Deployment of OutboxRelay `name`
/// says, as pod `pod` (Kubernetes Leases through the test's kubeconfig).
async fn relay_from_deployment(client: &kube::Client, ns: &str, name: &str, pod: &str) -> common::Process {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let d = deployments.get(&format!("outbox-relay-{name}")).await.unwrap();
    let container = d.spec.unwrap().template.spec.unwrap().containers.remove(0);
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let env = cm.get(&format!("outbox-relay-{name}")).await.unwrap().data.unwrap();
    common::Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(container.args.unwrap())
            .envs(&env)
            .env("MONGODB_URI", common::mongodb_uri())
            .env("SCHEMAS_DIR", common::SAMPLE_SCHEMAS)
            .env("POD_NAMESPACE", ns)
            .env("HOSTNAME", pod)
            .env("KUBECONFIG", common::kubeconfig())
            .env("METRICS_LISTEN", "127.0.0.1:0")
            .env("RELAY_LEASE_SECONDS", "3")
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("run the relay from the Deployment's spec"),
    )
}

/// Wait up to a minute for OutboxRelay `name`'s status to satisfy `check`,
/// nudging a reconcile each time instead of waiting for the requeue.
async fn status_becomes(
    relays: &Api<OutboxRelay>,
    name: &str,
    what: &str,
    check: impl Fn(&outbox_operator::operator::crd::OutboxRelayStatus) -> bool,
) {
    let start = std::time::Instant::now();
    for n in 0.. {
        let patch = serde_json::json!({"metadata": {"annotations": {"nudge": n.to_string()}}});
        relays.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
        if relay_status(relays, name).await.as_ref().is_some_and(&check) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "timed out after 60 s waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_sharded_relay_reports_each_range_and_its_publisher() {
    let (client, ns, stop_tx, op) = operator_in_new_namespace("op-shards").await;
    common::create_mongodb_secret(&client, &ns).await;
    common::create_sample_schemas(&client, &ns).await;
    let db = common::TestDb::new(common::mongo().await.database(&common::unique("op-shards")));
    common::seed_outbox(&db, 30, 2).await;
    let topic = common::unique("op-shards-events");
    common::create_topic(&topic, 3).await;
    let yaml = relay_yaml("sharded", "mongodb", db.name(), &topic) + "  shards: 3\n";
    // kubectl validates against the apiserver's published OpenAPI, which
    // takes a moment to show a CRD just updated (a new field).
    common::eventually("kubectl accepts spec.shards", Duration::from_secs(60), || async {
        common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&yaml)).0
    })
    .await;
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    common::eventually("the relay Deployment", Duration::from_secs(30), || async {
        deployments.get_opt("outbox-relay-sharded").await.unwrap().is_some()
    })
    .await;
    // Before any relay runs: three ranges, nobody publishing, everything pending.
    common::eventually("status lists the 3 ranges, none owned", Duration::from_secs(30), || async {
        relay_status(&relays, "sharded")
            .await
            .is_some_and(|s| s.ranges.len() == 3 && s.owned_ranges == 0 && s.pending == 60)
    })
    .await;

    let mut a = relay_from_deployment(&client, &ns, "sharded", "outbox-relay-sharded-a").await;
    let mut b = relay_from_deployment(&client, &ns, "sharded", "outbox-relay-sharded-b").await;
    status_becomes(&relays, "sharded", "both relays publish, every range owned, nothing pending", |s| {
        let owners: std::collections::BTreeSet<_> = s.ranges.iter().filter_map(|r| r.owner.clone()).collect();
        s.owned_ranges == 3 && s.pending == 0 && owners.len() == 2
    })
    .await;
    let status = relay_status(&relays, "sharded").await.unwrap();
    assert_eq!(status.ranges.iter().map(|r| r.range.as_str()).collect::<Vec<_>>(), ["0-85", "86-170", "171-255"]);
    let (_, table) = common::kubectl(&["get", "orl", "sharded", "-n", &ns], None);
    let row: Vec<&str> = table.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(row.get(2..5), Some(&["3", "3", "0"][..]), "SHARDS OWNED PENDING: {table}");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), &ns);
    let names: Vec<String> = outbox_operator::outbox::bucket::split(256, 3)
        .iter()
        .map(|r| outbox_operator::lease::range_lease_name(db.name(), "outbox", r))
        .collect();
    for name in &names {
        assert!(leases.get_opt(name).await.unwrap().is_some(), "a Kubernetes Lease per range: {name}");
    }

    // One relay killed: the other publishes every range once the leases run out.
    a.kill().unwrap();
    a.wait().unwrap();
    status_becomes(&relays, "sharded", "relay b owns all 3 ranges", |s| {
        s.ranges.iter().all(|r| r.owner.as_deref() == Some("outbox-relay-sharded-b"))
            && s.active_relay.as_deref() == Some("outbox-relay-sharded-b")
    })
    .await;
    b.kill().unwrap();
    b.wait().unwrap();
    // Deleting it deletes every range's Lease.
    relays.delete("sharded", &DeleteParams::default()).await.unwrap();
    common::eventually("every range's Lease deleted", POD_TERMINATION, || async {
        let mut gone = true;
        for name in &names {
            gone &= leases.get_opt(name).await.unwrap().is_none();
        }
        gone && relays.get_opt("sharded").await.unwrap().is_none()
    })
    .await;
    stop_tx.send(true).unwrap();
    op.await.unwrap().unwrap();
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}

#[tokio::test]
async fn an_invalid_spec_is_a_condition_and_builds_no_pods() {
    // A 1.20 apiserver does not evaluate the CRD's CEL rule maxMs >= initialMs,
    // so the operator must catch it itself instead of building pods that crash-loop.
    let (client, ns, stop_tx, op) = operator_in_new_namespace("op-invalid").await;
    let yaml = relay_yaml("bad-backoff", "mongodb", "invalid", "invalid-events")
        + "  backoff: {initialMs: 5000, maxMs: 1000}\n";
    let (ok, out) = common::kubectl(&["apply", "--validate=false", "-n", &ns, "-f", "-"], Some(&yaml));
    assert!(ok, "the 1.20 apiserver accepts it (no CEL): {out}");
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    common::eventually("Ready=False, reason InvalidSpec, naming the rule", Duration::from_secs(30), || async {
        relay_status(&relays, "bad-backoff").await.is_some_and(|s| {
            condition(&s.conditions, "Ready").is_some_and(|c| {
                c.status == "False" && c.reason == "InvalidSpec" && c.message.contains("backoff.maxMs")
            })
        })
    })
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    assert!(deployments.get_opt("outbox-relay-bad-backoff").await.unwrap().is_none(), "no pods for an invalid spec");
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(configmaps.get_opt("outbox-relay-bad-backoff").await.unwrap().is_none(), "no children at all");

    // Two schema sources at once: refused the same way, naming the rule.
    let both = relay_yaml("two-sources", "mongodb", "invalid", "invalid-events").replace(
        "schemas: {configMap: session-schemas}",
        "schemas: {configMap: session-schemas, fromRegistry: latest}",
    );
    assert!(common::kubectl(&["apply", "--validate=false", "-n", &ns, "-f", "-"], Some(&both)).0);
    common::eventually("InvalidSpec naming the schema source rule", Duration::from_secs(30), || async {
        relay_status(&relays, "two-sources").await.is_some_and(|s| {
            condition(&s.conditions, "Ready").is_some_and(|c| {
                c.reason == "InvalidSpec" && c.message.contains(outbox_operator::operator::crd::RELAY_SCHEMAS_RULE)
            })
        })
    })
    .await;
    assert!(deployments.get_opt("outbox-relay-two-sources").await.unwrap().is_none(), "no pods for an invalid spec");

    // Fixed: the children appear.
    let fixed = relay_yaml("bad-backoff", "mongodb", "invalid", "invalid-events")
        + "  backoff: {initialMs: 500, maxMs: 1000}\n";
    assert!(common::kubectl(&["apply", "--validate=false", "-n", &ns, "-f", "-"], Some(&fixed)).0);
    common::eventually("the Deployment once the spec is valid", Duration::from_secs(30), || async {
        deployments.get_opt("outbox-relay-bad-backoff").await.unwrap().is_some()
    })
    .await;

    // spec.pod.env adds variables (traces here) but may not replace one the
    // operator sets: refused by name, and the Deployment keeps what it had.
    let container_env = || async {
        let d = deployments.get("outbox-relay-bad-backoff").await.unwrap();
        let env = d.spec.unwrap().template.spec.unwrap().containers.remove(0).env.unwrap_or_default();
        env.into_iter().map(|e| (e.name, e.value)).collect::<Vec<_>>()
    };
    let with_env = |env: &str| fixed.clone() + &format!("  pod: {{env: {env}}}\n");
    let refused = with_env("[{name: RELAY_SHARDS, value: \"8\"}]");
    assert!(common::kubectl(&["apply", "--validate=false", "-n", &ns, "-f", "-"], Some(&refused)).0);
    common::eventually("InvalidSpec naming RELAY_SHARDS", Duration::from_secs(30), || async {
        relay_status(&relays, "bad-backoff").await.is_some_and(|s| {
            condition(&s.conditions, "Ready")
                .is_some_and(|c| c.reason == "InvalidSpec" && c.message.contains("RELAY_SHARDS"))
        })
    })
    .await;
    assert!(!container_env().await.iter().any(|(n, _)| n == "RELAY_SHARDS"), "the refused variable is not applied");
    let traced = with_env("[{name: OTEL_EXPORTER_OTLP_ENDPOINT, value: \"http://collector:4318\"}]");
    assert!(common::kubectl(&["apply", "--validate=false", "-n", &ns, "-f", "-"], Some(&traced)).0);
    common::eventually("the extra variable on the relay's container", Duration::from_secs(30), || async {
        container_env().await.contains(&("OTEL_EXPORTER_OTLP_ENDPOINT".into(), Some("http://collector:4318".into())))
    })
    .await;
    relays.delete("bad-backoff", &DeleteParams::default()).await.unwrap();
    common::eventually("deleted", POD_TERMINATION, || async { relays.get_opt("bad-backoff").await.unwrap().is_none() })
        .await;
    stop_tx.send(true).unwrap();
    op.await.unwrap().unwrap();
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}

#[tokio::test]
async fn a_second_outbox_relay_on_the_same_outbox_is_refused_and_builds_no_pods() {
    let (client, ns, stop_tx, op) = operator_in_new_namespace("op-twin").await;
    let (ok, out) =
        common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&relay_yaml("first", "mongodb", "twin", "twin-events")));
    assert!(ok, "{out}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    common::eventually("the first relay's Deployment", Duration::from_secs(30), || async {
        deployments.get_opt("outbox-relay-first").await.unwrap().is_some()
    })
    .await;
    // Same Secret, database and collection: the same outbox.
    let (ok, out) = common::kubectl(
        &["apply", "-n", &ns, "-f", "-"],
        Some(&relay_yaml("second", "mongodb", "twin", "other-events")),
    );
    assert!(ok, "{out}");
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    common::eventually("Ready=False, reason OutboxInUse, naming the first", Duration::from_secs(30), || async {
        relay_status(&relays, "second").await.is_some_and(|s| {
            condition(&s.conditions, "Ready").is_some_and(|c| {
                c.status == "False" && c.reason == "OutboxInUse" && c.message.contains("OutboxRelay first")
            })
        })
    })
    .await;
    assert!(deployments.get_opt("outbox-relay-second").await.unwrap().is_none(), "no pods for the second");
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(configmaps.get_opt("outbox-relay-second").await.unwrap().is_none(), "no children at all");
    // The first keeps its pods and its Ready state is not the conflict's.
    let first = relay_status(&relays, "first").await.unwrap_or_default();
    assert!(condition(&first.conditions, "Ready").is_none_or(|c| c.reason != "OutboxInUse"));

    // The first deleted: the second takes the outbox.
    relays.delete("first", &DeleteParams::default()).await.unwrap();
    common::eventually("the second's Deployment once the first is gone", POD_TERMINATION, || async {
        deployments.get_opt("outbox-relay-second").await.unwrap().is_some()
    })
    .await;
    relays.delete("second", &DeleteParams::default()).await.unwrap();
    common::eventually("deleted", POD_TERMINATION, || async { relays.get_opt("second").await.unwrap().is_none() })
        .await;
    stop_tx.send(true).unwrap();
    op.await.unwrap().unwrap();
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}

#[tokio::test]
async fn the_relay_lease_is_deleted_only_after_the_relay_pods_are_gone() {
    use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
    let (client, ns, stop_tx, op) = operator_in_new_namespace("op-fin").await;
    let (ok, out) =
        common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&relay_yaml("held", "mongodb", "fin", "fin-events")));
    assert!(ok, "{out}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    common::eventually("the relay Deployment", Duration::from_secs(30), || async {
        deployments.get_opt("outbox-relay-held").await.unwrap().is_some()
    })
    .await;
    // A relay pod that is still running (a finalizer keeps it while the test
    // wants), holding the relay's Lease.
    let labels = deployments.get("outbox-relay-held").await.unwrap().metadata.labels.unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "outbox-relay-held-running", "labels": labels, "finalizers": ["outbox.dev/test-hold"]},
        "spec": {"containers": [{"name": "relay", "image": "outbox-operator:test"}]},
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease = outbox_operator::lease::outbox_lease_name("fin", "outbox");
    let holder = outbox_operator::lease::kube::KubeLease::new(
        client.clone(),
        &ns,
        &lease,
        "outbox-relay-held-running",
        Duration::from_secs(15),
    );
    assert!(holder.acquire().await.unwrap());

    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    relays.delete("held", &DeleteParams::default()).await.unwrap();
    pods.delete("outbox-relay-held-running", &DeleteParams::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(leases.get_opt(&lease).await.unwrap().is_some(), "the Lease stays while a relay pod runs");
    assert!(relays.get_opt("held").await.unwrap().is_some(), "the finalizer waits for the pods");

    // The pod finishes terminating: now the Lease goes, and the resource with it.
    pods.patch(
        "outbox-relay-held-running",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    common::eventually("the Lease deleted and the resource gone", POD_TERMINATION, || async {
        leases.get_opt(&lease).await.unwrap().is_none() && relays.get_opt("held").await.unwrap().is_none()
    })
    .await;
    stop_tx.send(true).unwrap();
    op.await.unwrap().unwrap();
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}

/// A TCP proxy in front of the apiserver that the test can cut: every
/// connection through it is dropped and new ones are refused.
struct CuttableProxy {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { port, task }
    }

    /// Drop the listener and every connection (the JoinSet aborts them).
    fn cut(&self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn an_operator_that_cannot_renew_its_lease_stops_within_the_lease_time() {
    use outbox_operator::{lease::kube::KubeLease, operator::OPERATOR_LEASE};
    let client = common::kube_client().await;
    common::apply_crds(&client).await;
    let ns = common::unique("op-cut");
    assert!(common::kubectl(&["create", "namespace", &ns], None).0);

    // The operator binary talks to the apiserver through a proxy the test cuts.
    let kubeconfig = std::fs::read_to_string(common::kubeconfig()).unwrap();
    let server = kubeconfig.lines().find_map(|l| l.trim().strip_prefix("server: https://")).unwrap().to_owned();
    let proxy = CuttableProxy::start(server.clone()).await;
    let dir = std::env::temp_dir().join(common::unique("op-cut"));
    std::fs::create_dir_all(&dir).unwrap();
    let proxied = dir.join("kubeconfig");
    std::fs::write(&proxied, kubeconfig.replace(&server, &format!("127.0.0.1:{}", proxy.port))).unwrap();
    let mut operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["operator", "--namespace", &ns, "--lease-namespace", &ns, "--identity", "operator-cut"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("KUBECONFIG", &proxied)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let observer = KubeLease::new(client.clone(), &ns, "outbox-operator", "observer", OPERATOR_LEASE);
    common::eventually("the operator leads", Duration::from_secs(30), || async {
        observer.holder().await.unwrap().as_deref() == Some("operator-cut")
    })
    .await;

    // The apiserver becomes unreachable for it: renewals fail. Once the lease
    // time has passed unrenewed, another replica may lead: it must be gone.
    let cut_at = std::time::Instant::now();
    proxy.cut();
    let limit = OPERATOR_LEASE + Duration::from_secs(10);
    let exited = tokio::time::timeout(limit, operator.wait()).await;
    let status =
        exited.unwrap_or_else(|_| panic!("the operator still runs {limit:?} after its lease renewals began failing"));
    assert!(!status.unwrap().success(), "losing the lease is a failure exit (the pod restarts as a standby)");
    assert!(cut_at.elapsed() >= OPERATOR_LEASE / 3, "it did not stop at the first failed renewal");
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
    let _ = std::fs::remove_dir_all(dir);
}

/// A webhook consumer's signing Secret: missing, then not a Standard
/// Webhooks secret, each named in Ready; a good one clears it, and the
/// pods read it from the Secret, never from the ConfigMap.
#[tokio::test]
async fn a_webhook_consumers_signing_secret_is_checked_and_named_in_ready() {
    let (client, ns, stop_tx, op) = operator_in_new_namespace("op-hook").await;
    common::create_mongodb_secret(&client, &ns).await;
    let consumer = format!(
        "apiVersion: outbox.dev/v1alpha1\nkind: EventConsumer\nmetadata: {{name: billing}}\nspec:\n  topics: [orders]\n  \
         groupId: billing\n  handler: {{type: webhook, webhookUrl: \"http://billing/events\", \
         signingSecret: {{name: hook, key: signing}}}}\n  mongodb: {{uriSecret: {{name: mongodb, key: uri}}, database: \
         hook}}\n  kafka: {{bootstrapServers: \"{}\"}}\n  schemaRegistry: {{url: \"{}\"}}\n",
        common::kafka_bootstrap(),
        common::schema_registry_url()
    );
    let (ok, out) = common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&consumer));
    assert!(ok, "{out}");
    let consumers: Api<EventConsumer> = Api::namespaced(client.clone(), &ns);
    let ready_is = |reason: &'static str, names: &'static str| {
        let consumers = consumers.clone();
        async move {
            let c = consumers.get("billing").await.ok();
            let conditions = c.and_then(|c| c.status).map(|s| s.conditions).unwrap_or_default();
            condition(&conditions, "Ready").is_some_and(|c| c.reason == reason && c.message.contains(names))
        }
    };
    common::eventually("Ready names the missing Secret", Duration::from_secs(30), || {
        ready_is("SecretNotFound", "hook")
    })
    .await;
    let secret = |value: &str| {
        format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: hook}}\nstringData: {{signing: \"{value}\"}}\n")
    };
    assert!(common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&secret("not base64!"))).0);
    common::eventually("Ready says the secret is not base64", Duration::from_secs(60), || {
        ready_is("SecretInvalid", "not base64")
    })
    .await;
    assert!(common::kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&secret("whsec_c2VjcmV0"))).0);
    common::eventually("a good secret clears it", Duration::from_secs(60), || async {
        let c = consumers.get("billing").await.ok();
        let conditions = c.and_then(|c| c.status).map(|s| s.conditions).unwrap_or_default();
        condition(&conditions, "Ready").is_some_and(|c| !c.reason.starts_with("Secret"))
    })
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d = deployments.get("outbox-consumer-billing").await.unwrap();
    let env = d.spec.unwrap().template.spec.unwrap().containers.remove(0).env.unwrap_or_default();
    let signing = env.iter().find(|e| e.name == "WEBHOOK_SIGNING_SECRET").expect("the signing secret variable");
    let from = signing.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).expect("from the Secret");
    assert_eq!((from.name.as_str(), from.key.as_str()), ("hook", "signing"));
    stop_tx.send(true).unwrap();
    op.await.unwrap().unwrap();
    assert!(common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None).0);
}
