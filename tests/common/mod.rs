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

/// Start the session API in-process on an ephemeral port, over a fresh
/// database. Returns its base URL and the database.
pub async fn start_session_api() -> (String, mongodb::Database) {
    use outbox_operator::session_api::{self, SessionApiArgs};
    let client = mongo().await;
    let database = unique("sessions");
    let args = SessionApiArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        mongodb_uri: mongodb_uri(),
        database: database.clone(),
        outbox_collection: "outbox".into(),
        buckets: 256,
        min_ttl_seconds: 60,
        max_ttl_seconds: 86_400,
        default_ttl_seconds: 3600,
    };
    let app = session_api::app(client.clone(), &args).await.expect("session API starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), client.database(&database))
}

/// An HTTP client for tests (ring installed as the TLS provider first).
pub fn http() -> reqwest::Client {
    outbox_operator::telemetry::install_crypto_provider();
    reqwest::Client::builder().build().unwrap()
}
