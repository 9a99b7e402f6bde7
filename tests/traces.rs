//! Traces across processes (OpenTelemetry over OTLP/HTTP): the session API,
//! the relay and a consumer run as `outbox` processes exporting to a small
//! OTLP receiver (`tests/python/otlp_receiver.py`, PyPI's
//! opentelemetry-proto), and one session's request, its transaction, the
//! publish of its event and the event's handling form one trace, each span
//! the child of the one before; the session API's log lines carry the trace
//! id. The operator's reconciles are spans too.

mod common;

use std::{path::PathBuf, time::Duration};

use common::{Process, eventually, unique};
use mongodb::bson::doc;
use serde_json::Value;

/// The OTLP receiver, and the file it writes the spans to.
struct Receiver {
    _process: Process,
    endpoint: String,
    spans: PathBuf,
}

fn start_receiver() -> Receiver {
    let spans = std::env::temp_dir().join(format!("{}.jsonl", unique("spans")));
    let (process, port) = common::python_server("otlp_receiver.py", &[spans.to_str().unwrap()], "opentelemetry-proto");
    Receiver { _process: process, endpoint: format!("http://127.0.0.1:{port}"), spans }
}

impl Receiver {
    /// Every span received so far.
    fn spans(&self) -> Vec<Value> {
        common::read_jsonl(&self.spans)
    }

    /// `command` exporting its spans here as `service`, flushed every 100 ms.
    fn exporting<'a>(&self, command: &'a mut std::process::Command, service: &str) -> &'a mut std::process::Command {
        command
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &self.endpoint)
            .env("OTEL_SERVICE_NAME", service)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
    }
}

fn text(span: &Value, key: &str) -> String {
    span[key].as_str().unwrap_or_default().to_owned()
}

/// The span of `trace` from `service` named `name` (prefix), if received.
fn find<'a>(spans: &'a [Value], trace: &str, service: &str, name: &str) -> Option<&'a Value> {
    spans
        .iter()
        .find(|s| text(s, "trace_id") == trace && text(s, "service") == service && text(s, "name").starts_with(name))
}

/// The chain of `trace`: request (server) -> transaction, request ->
/// publish (producer) -> handle (consumer). Returns the request span.
fn assert_chain(spans: &[Value], trace: &str) -> Value {
    let request = find(spans, trace, "session-api", "POST /sessions").expect("the request span");
    let transaction = find(spans, trace, "session-api", "transaction").expect("the transaction span");
    let publish = find(spans, trace, "relay", "publish ").expect("the publish span");
    let handle = find(spans, trace, "consumer", "process ").expect("the handle span");
    assert_eq!(text(request, "kind"), "server");
    assert_eq!(text(publish, "kind"), "producer");
    assert_eq!(text(handle, "kind"), "consumer");
    assert_eq!(text(transaction, "parent_span_id"), text(request, "span_id"), "transaction under the request");
    assert_eq!(text(publish, "parent_span_id"), text(request, "span_id"), "publish under the request");
    assert_eq!(text(handle, "parent_span_id"), text(publish, "span_id"), "handling under the publish");
    assert_eq!(handle["attributes"]["outbox.outcome"], "applied", "{handle}");
    request.clone()
}

#[tokio::test]
async fn one_sessions_request_publish_and_handling_share_one_trace() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&unique("traces")));
    let topic = unique("traces");
    common::create_topic(&topic, 1).await;
    let receiver = start_receiver();
    let api_log = std::env::temp_dir().join(format!("{}.log", unique("session-api")));
    // Each process exports as its name; the session API's log is kept.
    let pipeline = common::pipeline_processes(&db, &topic, |name, command| {
        receiver.exporting(command, name);
        if name == "session-api" {
            command.env("RUST_LOG", "info").stderr(std::fs::File::create(&api_log).unwrap());
        }
    })
    .await;
    let (http, base) = (common::http(), &pipeline.api);

    // A caller with a trace of its own, and one without.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut sessions = Vec::new();
    for traceparent in [Some(format!("00-{caller_trace}-{caller_span}-01")), None] {
        let mut request = http.post(format!("{base}/sessions")).json(&serde_json::json!({"userId": "u-traces"}));
        if let Some(tp) = &traceparent {
            request = request.header("traceparent", tp);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        sessions.push(body["id"].as_str().unwrap().to_owned());
    }
    // The second request's trace is the one its event carries.
    let row = db
        .collection::<mongodb::bson::Document>("outbox")
        .find_one(doc! {"aggregateId": &sessions[1]})
        .await
        .unwrap()
        .expect("the second session's outbox row");
    let own_trace = row.get_str("traceparent").expect("a traceparent on the event")[3..35].to_owned();
    assert_ne!(own_trace, caller_trace);

    eventually("both traces reach the handler", Duration::from_secs(60), || async {
        let spans = receiver.spans();
        [caller_trace, own_trace.as_str()].iter().all(|t| find(&spans, t, "consumer", "process ").is_some())
    })
    .await;
    let spans = receiver.spans();
    let continued = assert_chain(&spans, caller_trace);
    assert_eq!(text(&continued, "parent_span_id"), caller_span, "the request continues the caller's span");
    let started = assert_chain(&spans, &own_trace);
    assert_eq!(text(&started, "parent_span_id"), "", "a request without a traceparent starts a trace");

    let log = std::fs::read_to_string(&api_log).unwrap();
    for trace in [caller_trace, own_trace.as_str()] {
        assert!(
            log.lines().any(|l| l.contains(&format!("trace_id={trace}")) && l.contains("session created")),
            "no log line of the session API with trace_id={trace}:\n{log}"
        );
    }
}

#[tokio::test]
async fn the_operators_reconciles_are_spans() {
    let client = common::kube_client().await;
    common::apply_crds(&client).await;
    let ns = unique("traces-op");
    assert!(common::kubectl(&["create", "namespace", &ns], None).0);
    let receiver = start_receiver();
    let _operator = Process(
        receiver
            .exporting(&mut std::process::Command::new(env!("CARGO_BIN_EXE_outbox")), "operator")
            .args(["operator", "--namespace", &ns, "--leader-election", "false", "--metrics-listen", "127.0.0.1:0"])
            .env("KUBECONFIG", common::kubeconfig())
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let relay = format!(
        "apiVersion: outbox.dev/v1alpha1\nkind: OutboxRelay\nmetadata: {{name: traced, namespace: {ns}}}\nspec:\n  \
         mongodb: {{uriSecret: {{name: mongodb, key: uri}}, database: traced}}\n  kafka: {{bootstrapServers: \"{}\"}}\n  \
         schemaRegistry: {{url: \"{}\"}}\n  schemas: {{configMap: session-schemas}}\n  \
         routes: [{{aggregateType: Session, topic: traced}}]\n",
        common::kafka_bootstrap(),
        common::schema_registry_url()
    );
    let (ok, out) = common::kubectl(&["apply", "-f", "-"], Some(&relay));
    assert!(ok, "kubectl apply: {out}");
    eventually("a reconcile span of the OutboxRelay", Duration::from_secs(60), || async {
        receiver.spans().iter().any(|s| {
            text(s, "service") == "operator"
                && text(s, "name") == "reconcile OutboxRelay"
                && s["attributes"]["name"] == "traced"
                && s["attributes"]["namespace"] == ns.as_str()
        })
    })
    .await;
    // Its trace id is in its `trace_id` field, so every log line within a
    // reconcile carries it (the field is exported as an attribute too).
    let spans = receiver.spans();
    let reconcile = spans.iter().find(|s| text(s, "name") == "reconcile OutboxRelay").unwrap();
    assert_eq!(reconcile["attributes"]["trace_id"], text(reconcile, "trace_id"), "{reconcile}");
    assert_eq!(reconcile["attributes"]["kind"], "OutboxRelay");
    common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None);
}
