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
