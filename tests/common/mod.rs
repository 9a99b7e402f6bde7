//! Shared helpers of the integration tests: where the real services are.
//!
//! Every test here runs against the services `scripts/stack.sh up` starts
//! (`make test` does that). A missing or unreachable service fails the test
//! with a message naming it; nothing is skipped.
#![allow(dead_code)]

use std::time::Duration;

/// The value of an environment variable the stack's env file sets, or a
/// failure naming the variable and how to get it.
pub fn stack_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: these tests need the local stack. Run `make test`, or \
             `scripts/stack.sh up` and `. .stack/env` before `cargo test`"
        ),
    }
}

pub fn mongodb_uri() -> String {
    stack_env("MONGODB_URI")
}
pub fn kafka_bootstrap() -> String {
    stack_env("KAFKA_BOOTSTRAP")
}
pub fn schema_registry_url() -> String {
    stack_env("SCHEMA_REGISTRY_URL")
}
pub fn kubeconfig() -> String {
    stack_env("KUBECONFIG")
}

/// A name no other test run uses (topics, databases, subjects, objects).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// A connected MongoDB client, or a failure naming MongoDB.
pub async fn mongo() -> mongodb::Client {
    outbox_operator::telemetry::install_crypto_provider();
    let uri = mongodb_uri();
    let mut opts = mongodb::options::ClientOptions::parse(&uri)
        .await
        .unwrap_or_else(|e| panic!("MONGODB_URI={uri} does not parse: {e}"));
    opts.server_selection_timeout = Some(Duration::from_secs(5));
    let client = mongodb::Client::with_options(opts).expect("MongoDB client options");
    client.database("admin").run_command(mongodb::bson::doc! {"ping": 1}).await.unwrap_or_else(|e| {
        panic!("MongoDB at {uri} is not reachable ({e}); start it with `scripts/stack.sh up mongo`")
    });
    client
}

/// A test's own database, dropped when the test ends, passed or failed
/// (on its own thread and runtime: `Drop` cannot await).
pub struct TestDb(mongodb::Database);

impl TestDb {
    pub fn new(db: mongodb::Database) -> Self {
        Self(db)
    }

    /// Keep the database after the test (to look into a failure).
    pub fn keep(self) {
        eprintln!("test database {} kept", self.0.name());
        std::mem::forget(self);
    }
}

impl std::ops::Deref for TestDb {
    type Target = mongodb::Database;

    fn deref(&self) -> &mongodb::Database {
        &self.0
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.0.name().to_owned();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let client = mongodb::Client::with_uri_str(mongodb_uri()).await.ok()?;
                client.database(&name).drop().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("test database {} was not dropped", self.0.name());
        }
    }
}

/// Start the session API in-process on an ephemeral port, over a fresh
/// database. Returns its base URL and the database.
pub async fn start_session_api() -> (String, TestDb) {
    use outbox_operator::session_api::{self, SessionApiArgs};
    let client = mongo().await;
    let database = unique("sessions");
    let uri = mongodb_uri();
    let flags = ["--mongodb-uri", &uri, "--database", &database, "--max-ttl-seconds", "86400"];
    let args: SessionApiArgs = outbox_operator::cli::args_from(&flags).expect("session API flags");
    let app = session_api::app(client.clone(), &args).await.expect("session API starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), TestDb::new(client.database(&database)))
}

/// An HTTP client for tests (ring installed as the TLS provider first).
pub fn http() -> reqwest::Client {
    outbox_operator::telemetry::install_crypto_provider();
    reqwest::Client::builder().build().unwrap()
}

/// The repository's schema directory: the sample Session events' schemas.
pub const SAMPLE_SCHEMAS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas");

/// Relay settings for tests: fast polling and backoff, its own topic, the
/// sample's schemas.
pub fn relay_args(database: &str, bootstrap: &str, topic: &str, relay_id: &str) -> outbox_operator::relay::RelayArgs {
    let (uri, registry, route) = (mongodb_uri(), schema_registry_url(), format!("Session={topic}"));
    #[rustfmt::skip]
    let flags = [
        "--mongodb-uri", &uri, "--database", database, "--kafka-bootstrap", bootstrap,
        "--schema-registry-url", &registry, "--route", &route, "--relay-id", relay_id,
        "--schemas-dir", SAMPLE_SCHEMAS,
        "--lease-backend", "mongodb", "--batch-size", "200", "--poll-interval-ms", "100",
        "--lease-seconds", "3", "--backoff-initial-ms", "100",
        "--backoff-max-ms", "1000", "--backoff-jitter", "0", "--max-attempts", "100",
        "--retention-seconds", "3600", "--metrics-listen", "127.0.0.1:0",
    ];
    outbox_operator::cli::args_from(&flags).expect("relay flags")
}

/// Run a relay in this process until the returned sender says stop.
pub fn spawn_relay(
    args: outbox_operator::relay::RelayArgs,
) -> (tokio::task::JoinHandle<outbox_operator::Result<()>>, tokio::sync::watch::Sender<bool>) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    (tokio::spawn(outbox_operator::relay::run_until(args, rx)), tx)
}

/// Create a topic on the stack's broker.
pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_on(&kafka_bootstrap(), name, partitions).await
}

pub async fn create_topic_on(bootstrap: &str, name: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("admin client");
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(15)));
    let results = admin
        .create_topics(&[NewTopic::new(name, partitions, TopicReplication::Fixed(1))], &opts)
        .await
        .unwrap_or_else(|e| panic!("Kafka broker at {bootstrap} is not reachable ({e})"));
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// Seed `sessions` sessions with `events_per_session` events each (created,
/// then refreshed) straight into the outbox, in event order.
pub async fn seed_outbox(db: &mongodb::Database, sessions: usize, events_per_session: usize) -> Vec<String> {
    use outbox_operator::outbox::Outbox;
    let outbox = Outbox::new(db, "outbox");
    outbox.ensure_indexes().await.unwrap();
    let rows = session_rows(sessions, events_per_session);
    let ids = rows.iter().map(|r| r.id.clone()).collect();
    for chunk in rows.chunks(1000) {
        outbox.collection().insert_many(chunk).await.unwrap();
    }
    ids
}

/// The outbox rows of `sessions` new sessions with `events_per_session`
/// events each (created, then refreshed), later events interleaved across
/// the sessions as real traffic does, in event order.
pub fn session_rows(sessions: usize, events_per_session: usize) -> Vec<outbox_operator::outbox::OutboxDocument> {
    use outbox_operator::{
        domain::{
            event::{EventEnvelope, EventMetadata, now_millis},
            session::{ClientInfo, CreateSession, Session, SessionPolicy},
        },
        outbox::OutboxDocument,
    };
    let policy = SessionPolicy::default();
    let meta = EventMetadata { correlation_id: Some("seed".into()), ..Default::default() };
    let mut rows = Vec::with_capacity(sessions * events_per_session);
    let mut aggregates: Vec<Session> = Vec::new();
    for i in 0..sessions {
        let now = now_millis();
        let cmd = CreateSession { user_id: format!("user-{i}"), ttl_seconds: None, client: ClientInfo::default() };
        let (s, created) = Session::create(cmd, &policy, now).unwrap();
        rows.push(OutboxDocument::new(&EventEnvelope::wrap(&created, now, &meta), 256).unwrap());
        aggregates.push(s);
    }
    for _ in 1..events_per_session {
        for s in aggregates.iter_mut() {
            let now = now_millis();
            let refreshed = s.refresh(None, &policy, now).unwrap();
            rows.push(OutboxDocument::new(&EventEnvelope::wrap(&refreshed, now, &meta), 256).unwrap());
        }
    }
    rows
}

/// Every outbox row, in event-id (= creation) order.
pub async fn outbox_rows(db: &mongodb::Database) -> Vec<mongodb::bson::Document> {
    use futures::TryStreamExt;
    db.collection::<mongodb::bson::Document>("outbox")
        .find(mongodb::bson::doc! {})
        .sort(mongodb::bson::doc! {"_id": 1})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// Count outbox rows by status.
pub async fn status_count(db: &mongodb::Database, status: &str) -> u64 {
    db.collection::<mongodb::bson::Document>("outbox")
        .count_documents(mongodb::bson::doc! {"status": status})
        .await
        .unwrap()
}

/// Events the relay has counted published in its checkpoint (stream,
/// retries and recovery scans; a duplicate after a crash counts again).
pub async fn published_count(db: &mongodb::Database) -> u64 {
    // Summed over the checkpoints of every range, when the outbox is sharded.
    let all = outbox_operator::outbox::checkpoint::Checkpoints::all(db, "outbox").await.unwrap();
    all.iter().map(|(_, c)| u64::try_from(c.published).unwrap_or(0)).sum()
}

/// Wait until `check` holds, polling; fail naming `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub headers: std::collections::HashMap<String, String>,
    pub payload: Vec<u8>,
}

/// Read the records of `topic` from the beginning until `expected` distinct
/// events (by `eventId` header) have arrived, plus whatever else arrives in
/// the following second (late duplicates), or until `timeout` passes.
pub async fn consume_all(bootstrap: &str, topic: &str, expected: usize, timeout: Duration) -> Vec<Consumed> {
    use rdkafka::{
        Message,
        consumer::{Consumer, StreamConsumer},
        message::Headers,
    };
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("test-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let mut distinct = std::collections::HashSet::new();
    let mut deadline = tokio::time::Instant::now() + timeout;
    let mut draining = false;
    loop {
        if !draining && distinct.len() >= expected {
            draining = true;
            deadline = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
        }
        let Ok(next) = tokio::time::timeout_at(deadline, consumer.recv()).await else { break };
        let m = next.expect("consume");
        let mut headers = std::collections::HashMap::new();
        if let Some(h) = m.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        distinct.insert(headers.get("eventId").cloned().unwrap_or_default());
        out.push(Consumed {
            partition: m.partition(),
            offset: m.offset(),
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            headers,
            payload: m.payload().unwrap_or_default().to_vec(),
        });
    }
    out
}

/// Each aggregate's (record key's) event ids in the order `topic` holds
/// their first copies (the relay publishes at least once).
pub async fn aggregate_order(topic: &str, count: usize) -> std::collections::BTreeMap<String, Vec<String>> {
    let records = consume_all(&kafka_bootstrap(), topic, count, Duration::from_secs(30)).await;
    let mut order: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    for r in records {
        let ids = order.entry(r.key.clone()).or_default();
        if !ids.contains(&r.headers["eventId"]) {
            ids.push(r.headers["eventId"].clone());
        }
    }
    order
}

/// Consumer settings for tests: fast retries, short session timeout.
pub fn consume_args(
    database: &str,
    topic: &str,
    group: &str,
    handler: outbox_operator::consumer::HandlerKind,
) -> outbox_operator::consumer::ConsumeArgs {
    let (uri, bootstrap, registry) = (mongodb_uri(), kafka_bootstrap(), schema_registry_url());
    #[rustfmt::skip]
    let flags = [
        "--mongodb-uri", &uri, "--database", database, "--kafka-bootstrap", &bootstrap,
        "--schema-registry-url", &registry, "--topic", topic, "--group-id", group,
        "--webhook-timeout-ms", "2000", "--max-attempts", "3", "--backoff-initial-ms", "50",
        "--backoff-max-ms", "200", "--processed-retention-seconds", "3600",
        "--session-timeout-ms", "6000", "--metrics-listen", "127.0.0.1:0", "--lag-interval-seconds", "1",
    ];
    let mut args: outbox_operator::consumer::ConsumeArgs =
        outbox_operator::cli::args_from(&flags).expect("consumer flags");
    args.handler = handler;
    args
}

pub fn spawn_consumer(
    args: outbox_operator::consumer::ConsumeArgs,
) -> (tokio::task::JoinHandle<outbox_operator::Result<()>>, tokio::sync::watch::Sender<bool>) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    (tokio::spawn(outbox_operator::consumer::run_until(args, rx)), tx)
}

/// Seed `sessions` x `events_per_session` events and relay them to a new
/// topic of `partitions` partitions, one record per produce batch (exact
/// watermarks on the local broker). Returns the topic and the event ids.
pub async fn publish_sessions(
    db: &mongodb::Database,
    sessions: usize,
    events_per_session: usize,
    partitions: i32,
) -> (String, Vec<String>) {
    let ids = seed_outbox(db, sessions, events_per_session).await;
    let topic = unique("consumer-events");
    create_topic(&topic, partitions).await;
    let mut args = relay_args(db.name(), &kafka_bootstrap(), &topic, &unique("relay"));
    args.producer_config = vec![("batch.num.messages".into(), "1".into())];
    let (relay, stop) = spawn_relay(args);
    eventually("the relay published everything", Duration::from_secs(60), || async {
        published_count(db).await == ids.len() as u64
    })
    .await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    (topic, ids)
}

/// Processed-event records of a group.
pub async fn processed(db: &mongodb::Database, group: &str) -> u64 {
    db.collection::<mongodb::bson::Document>("processed_events")
        .count_documents(mongodb::bson::doc! {"group": group})
        .await
        .unwrap()
}

/// A kube client from the stack's KUBECONFIG, or a failure naming the apiserver.
pub async fn kube_client() -> kube::Client {
    outbox_operator::telemetry::install_crypto_provider();
    let kubeconfig = kubeconfig();
    let client =
        kube::Client::try_default().await.unwrap_or_else(|e| panic!("kube client from KUBECONFIG={kubeconfig}: {e}"));
    client.apiserver_version().await.unwrap_or_else(|e| {
        panic!("kube-apiserver from KUBECONFIG={kubeconfig} is not reachable ({e}); start it with `scripts/stack.sh up kube`")
    });
    client
}

/// Run kubectl against the stack's apiserver: (succeeded, stdout + stderr).
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig()])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("kubectl is needed for this test and could not run: {e}"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Apply the generated CRDs and wait until both are Established.
/// An in-process operator's settings as the tests run it: watching `ns`,
/// its Lease there, the test image, metrics on a free port.
#[allow(dead_code)]
pub fn operator_args(ns: &str, identity: &str) -> outbox_operator::operator::OperatorArgs {
    outbox_operator::operator::OperatorArgs {
        namespace: Some(ns.to_owned()),
        image: "outbox-operator:test".into(),
        image_pull_policy: "Never".into(),
        concurrency: 4,
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        leader_election: true,
        lease_namespace: ns.to_owned(),
        identity: identity.into(),
    }
}

pub async fn apply_crds(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::runtime::wait::{await_condition, conditions};
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/outbox.dev.yaml");
    // A 1.20 apiserver does not know CEL rules (`x-kubernetes-validations`, 1.25+): kubectl's
    // client-side check would refuse the CRDs, the apiserver itself drops the unknown field.
    let (ok, out) = kubectl(&["apply", "--validate=false", "-f", crds], None);
    assert!(ok, "kubectl apply of the CRDs: {out}");
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    for name in ["outboxrelays.outbox.dev", "eventconsumers.outbox.dev", "outboxredrives.outbox.dev"] {
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD Established within 30 s")
        .unwrap();
    }
}

/// The Secret `mongodb` (key `uri`: the stack's MongoDB URI) in `ns`, as the
/// resources of the tests reference it.
pub async fn create_mongodb_secret(client: &kube::Client, ns: &str) -> k8s_openapi::api::core::v1::Secret {
    use k8s_openapi::{ByteString, api::core::v1::Secret};
    let secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some("mongodb".into()), ..Default::default() },
        data: Some(std::collections::BTreeMap::from([("uri".to_owned(), ByteString(mongodb_uri().into_bytes()))])),
        ..Default::default()
    };
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), ns);
    secrets.create(&Default::default(), &secret).await.unwrap()
}

/// The ConfigMap `session-schemas` in `ns`: the sample's event schemas
/// (`schemas/session/`), as the tests' OutboxRelays name it.
pub async fn create_sample_schemas(client: &kube::Client, ns: &str) -> k8s_openapi::api::core::v1::ConfigMap {
    use k8s_openapi::api::core::v1::ConfigMap;
    let dir = std::path::Path::new(SAMPLE_SCHEMAS).join("session");
    let data = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&path).unwrap())
        })
        .collect();
    let map = ConfigMap {
        metadata: kube::api::ObjectMeta { name: Some("session-schemas".into()), ..Default::default() },
        data: Some(data),
        ..Default::default()
    };
    let maps: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), ns);
    maps.create(&Default::default(), &map).await.unwrap()
}

/// A TCP proxy in front of `upstream` that the test can cut: every
/// connection dropped and new ones refused until it is restored.
pub struct CuttableProxy {
    /// The proxy's address, `127.0.0.1:port`.
    pub address: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Connections opened to it, refused ones included.
    opened: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    /// A proxy listening on `port` (0: any free port).
    pub async fn start(upstream: &str, port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c, n, o, upstream) = (cut.clone(), conns.clone(), opened.clone(), upstream.to_owned());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                o.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                // Forward each request and reply at once (Nagle's algorithm
                // would hold small writes for the peer's delayed ACK).
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let task = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                n.lock().unwrap().push(task);
            }
        });
        Self { address, cut, opened, conns, accept }
    }

    /// How many connections were opened to it, refused ones included.
    pub fn opened(&self) -> usize {
        self.opened.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Drop every connection and refuse new ones until `restore`.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A broker of the test's own (the stack's tansu binary, in memory),
/// reached only through a TCP proxy that the test can cut: every
/// connection dropped and new ones refused, the broker and its data kept.
pub struct CuttableBroker {
    /// Bootstrap servers: the proxy, which the broker advertises.
    pub bootstrap: String,
    broker: std::process::Child,
    proxy: CuttableProxy,
}

impl CuttableBroker {
    pub async fn start() -> Self {
        let (broker_port, proxy_port) = (free_port(), free_port());
        let tansu = stack_env("OUTBOX_TANSU");
        let broker = std::process::Command::new(&tansu)
            .args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{broker_port}")])
            .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{proxy_port}")])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the broker {tansu}: {e}"));
        let upstream = format!("127.0.0.1:{broker_port}");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(&upstream).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let proxy = CuttableProxy::start(&upstream, proxy_port).await;
        Self { bootstrap: proxy.address.clone(), broker, proxy }
    }

    /// Drop every connection and refuse new ones until `restore`.
    pub fn cut(&self) {
        self.proxy.cut();
    }

    pub fn restore(&self) {
        self.proxy.restore();
    }
}

impl Drop for CuttableBroker {
    fn drop(&mut self) {
        let _ = self.broker.kill();
        let _ = self.broker.wait();
    }
}

/// A single-node replica set of the test's own (the stack's mongod, test
/// commands enabled, so the test can set fail points), removed when
/// dropped.
pub struct TestMongod {
    pub port: u16,
    process: Process,
    dir: std::path::PathBuf,
}

impl TestMongod {
    pub async fn start() -> Self {
        let mongod = stack_env("OUTBOX_MONGOD");
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("test-mongod"));
        std::fs::create_dir_all(&dir).unwrap();
        let process = Process(
            std::process::Command::new(&mongod)
                .args(["--replSet", "rs0", "--bind_ip", "127.0.0.1", "--port", &port.to_string()])
                .arg("--dbpath")
                .arg(&dir)
                .args(["--wiredTigerCacheSizeGB", "0.25", "--setParameter", "enableTestCommands=1"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting mongod {mongod}: {e}")),
        );
        let me = Self { port, process, dir };
        let admin = me.client().await.database("admin");
        let members = mongodb::bson::doc! {"_id": "rs0", "members": [{"_id": 0, "host": format!("127.0.0.1:{port}")}]};
        eventually("the test's mongod accepts replSetInitiate", Duration::from_secs(30), || async {
            admin.run_command(mongodb::bson::doc! {"replSetInitiate": members.clone()}).await.is_ok()
        })
        .await;
        eventually("the test's mongod is primary", Duration::from_secs(30), || async {
            admin
                .run_command(mongodb::bson::doc! {"hello": 1})
                .await
                .is_ok_and(|h| h.get_bool("isWritablePrimary").unwrap_or(false))
        })
        .await;
        me
    }

    /// Its connection string, with `extra` options (`&w=1`, ...).
    pub fn uri(&self, extra: &str) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true{extra}", self.port)
    }

    pub async fn client(&self) -> mongodb::Client {
        outbox_operator::telemetry::install_crypto_provider();
        let mut opts = mongodb::options::ClientOptions::parse(self.uri("")).await.unwrap();
        opts.server_selection_timeout = Some(Duration::from_secs(5));
        mongodb::Client::with_options(opts).unwrap()
    }

    /// Turn a fail point on (`alwaysOn`) or off.
    pub async fn fail_point(&self, name: &str, on: bool) {
        let mode = if on { "alwaysOn" } else { "off" };
        self.client()
            .await
            .database("admin")
            .run_command(mongodb::bson::doc! {"configureFailPoint": name, "mode": mode})
            .await
            .unwrap_or_else(|e| panic!("configureFailPoint {name} {mode}: {e}"));
    }
}

impl Drop for TestMongod {
    fn drop(&mut self) {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `outbox relay` binary on `db`'s outbox, batches of 100, publishing
/// to `topic`, with `args` (which must include `--metrics-listen`). Its log
/// filter is `DEBUG_RELAY_LOG` (default `warn`); when that is set, the order
/// check below also prints every duplicated record's places.
pub fn relay_process(db: &mongodb::Database, topic: &str, args: &[&str]) -> Process {
    let child = outbox_command(db)
        .args(["relay", "--batch-size", "100", "--route", &format!("Session={topic}")])
        .args(args)
        .env("RUST_LOG", std::env::var("DEBUG_RELAY_LOG").unwrap_or("warn".into()))
        .spawn()
        .expect("start the outbox binary");
    Process(child)
}

/// The `outbox` binary, pointed at the stack's services, at `db` and at the
/// sample's schemas.
pub fn outbox_command(db: &mongodb::Database) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_outbox"));
    command
        .env("SCHEMAS_DIR", SAMPLE_SCHEMAS)
        .env("MONGODB_URI", mongodb_uri())
        .env("MONGODB_DATABASE", db.name())
        .env("KAFKA_BOOTSTRAP", kafka_bootstrap())
        .env("SCHEMA_REGISTRY_URL", schema_registry_url());
    command
}

/// The value of an instant PromQL query on the stack's Prometheus
/// (`PROMETHEUS_URL`), `None` when it has no series.
pub async fn prometheus_query(query: &str) -> Option<f64> {
    let url = stack_env("PROMETHEUS_URL");
    let endpoint = reqwest::Url::parse_with_params(&format!("{url}/api/v1/query"), [("query", query)]).unwrap();
    let response =
        http().get(endpoint).send().await.unwrap_or_else(|e| {
            panic!("Prometheus at {url} is not reachable ({e}); start it with `scripts/stack.sh up`")
        });
    let body: serde_json::Value = response.json().await.expect("a Prometheus answer");
    body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// The pipeline as `outbox` processes, killed when dropped.
pub struct Pipeline {
    /// The session API's base URL (it serves its /metrics there too).
    pub api: String,
    pub processes: Vec<Process>,
}

/// The session API (on a free port), a relay publishing `db`'s Session
/// events to `topic` (MongoDB lease) and a projection consumer of `topic`
/// (a group of its own), as `outbox` processes, with `RUST_LOG=warn` and
/// metrics on any free port. `each(name, command)` adds to each command
/// before it starts; `name` is `session-api`, `relay` or `consumer`.
/// Returns once the session API is ready; the relay may still be starting
/// (events written meanwhile are published all the same).
pub async fn pipeline_processes(
    db: &mongodb::Database,
    topic: &str,
    mut each: impl FnMut(&str, &mut std::process::Command),
) -> Pipeline {
    let api = format!("127.0.0.1:{}", free_port());
    let route = format!("Session={topic}");
    let group = unique("pipeline");
    #[rustfmt::skip]
    let commands: [(&str, Vec<&str>); 3] = [
        ("session-api", vec!["session-api", "--listen", &api]),
        ("relay", vec!["relay", "--route", &route, "--lease-backend", "mongodb", "--poll-interval-ms", "100"]),
        ("consumer", vec!["consume", "--topic", topic, "--group-id", &group, "--handler", "projection",
            "--session-timeout-ms", "6000"]),
    ];
    let processes = commands
        .into_iter()
        .map(|(name, args)| {
            let mut command = outbox_command(db);
            command.args(args).env("RUST_LOG", "warn").env("METRICS_LISTEN", "127.0.0.1:0");
            each(name, &mut command);
            Process(command.spawn().unwrap_or_else(|e| panic!("start the outbox binary ({name}): {e}")))
        })
        .collect();
    let (http, api) = (http(), format!("http://{api}"));
    eventually("the session API is ready", Duration::from_secs(30), || async {
        http.get(format!("{api}/readyz")).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    Pipeline { api, processes }
}

/// A free TCP port on 127.0.0.1 (for a process that takes its listen address as a flag).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed when dropped, so a failing test leaves none
/// running (a relay left behind keeps loading the stack's mongod).
/// Start `tests/python/<script>` with the stack's Python and `args`; the
/// port it prints on its first line. `packages` names what it imports, for
/// the message when it does not start.
pub fn python_server(script: &str, args: &[&str], packages: &str) -> (Process, u16) {
    use std::io::BufRead;
    let python = stack_env("OUTBOX_PYTHON");
    let path = format!("{}/tests/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = std::process::Command::new(&python)
        .arg(&path)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python} does not run ({e}): run `scripts/stack.sh install`"));
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.trim().parse().unwrap_or_else(|_| {
        panic!("{script} did not start (is {packages} in {python}? `scripts/stack.sh install` puts it there)")
    });
    (Process(child), port)
}

/// The JSON lines a test server has written to `path` so far (none when
/// the file is not there yet). A last line still being written (no newline
/// yet) is left for the next read.
pub fn read_jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: a line that is not JSON ({e}): {l}", path.display()))
        })
        .collect()
}

pub struct Process(pub std::process::Child);

impl std::ops::Deref for Process {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Process {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Create `sessions` sessions, then refresh each in turn until `stop`, one
/// insert (one commit) per event, straight into `db`'s outbox. Returns each
/// aggregate's event ids in commit order.
pub async fn write_refreshing_sessions(
    db: mongodb::Database,
    sessions: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::collections::HashMap<String, Vec<String>> {
    use outbox_operator::{
        domain::{
            event::{EventEnvelope, EventMetadata, now_millis},
            session::{ClientInfo, CreateSession, Session, SessionPolicy},
        },
        outbox::{Outbox, OutboxDocument},
    };
    let outbox = Outbox::new(&db, "outbox");
    let policy = SessionPolicy::default();
    let meta = EventMetadata::default();
    let mut order: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
    let mut live = Vec::new();
    for i in 0..sessions {
        let cmd = CreateSession { user_id: format!("hot-{i}"), ttl_seconds: None, client: ClientInfo::default() };
        let (s, created) = Session::create(cmd, &policy, now_millis()).unwrap();
        let row = OutboxDocument::new(&EventEnvelope::wrap(&created, now_millis(), &meta), 256).unwrap();
        outbox.collection().insert_one(&row).await.unwrap();
        order.entry(s.id.clone()).or_default().push(row.id);
        live.push(s);
    }
    while !*stop.borrow() {
        for s in live.iter_mut() {
            let refreshed = s.refresh(None, &policy, now_millis()).unwrap();
            let row = OutboxDocument::new(&EventEnvelope::wrap(&refreshed, now_millis(), &meta), 256).unwrap();
            outbox.collection().insert_one(&row).await.unwrap();
            order.entry(s.id.clone()).or_default().push(row.id);
        }
    }
    order
}

/// Every event of `order` (aggregate -> ids in commit order) is in
/// `records`, and the first copy of each is in commit order within its
/// aggregate. Returns how many records were later copies (duplicates).
pub fn assert_first_copies_in_commit_order(
    records: &mut [Consumed],
    order: &std::collections::HashMap<String, Vec<String>>,
) -> usize {
    let events: usize = order.values().map(Vec::len).sum();
    // The first copy of each event, in the order the partition holds them.
    records.sort_by_key(|r| (r.partition, r.offset));
    let mut seen = std::collections::HashSet::new();
    let first: Vec<&Consumed> = records.iter().filter(|r| seen.insert(&r.headers["eventId"])).collect();
    assert_eq!(first.len(), events, "every one of the {events} events published ({} records)", records.len());
    for (aggregate, ids) in order {
        let arrived: Vec<&String> =
            first.iter().filter(|r| &r.key == aggregate).map(|r| &r.headers["eventId"]).collect();
        let overtaken = ids.iter().zip(&arrived).position(|(id, got)| id != *got);
        assert_eq!(
            overtaken, None,
            "{aggregate}: first copies in Kafka out of commit order from its event {overtaken:?} (0-based)"
        );
    }
    if std::env::var("DEBUG_RELAY_LOG").is_ok() {
        let mut by_id: std::collections::HashMap<&str, Vec<(i32, i64)>> = Default::default();
        for r in records.iter() {
            by_id.entry(r.headers["eventId"].as_str()).or_default().push((r.partition, r.offset));
        }
        for (id, copies) in by_id.iter().filter(|(_, c)| c.len() > 1) {
            eprintln!("DUP {id} {copies:?}");
        }
    }
    records.len() - first.len()
}

/// Run `kubectl outbox ...`: the test binary linked as `kubectl-outbox` on
/// the PATH, found by kubectl's plugin lookup (kubectl passes its own flags
/// to no plugin, so the kubeconfig is in the environment). Awaited, not
/// blocking: the operator under test runs on this test's runtime.
pub async fn kubectl_outbox(args: &[&str]) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("outbox-plugin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("kubectl-outbox");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_outbox"), &link).unwrap();
    }
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = tokio::process::Command::new("kubectl")
        .arg("outbox")
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", kubeconfig())
        .output()
        .await
        .expect("kubectl runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}
