//! `outbox registry`: a small schema registry speaking the Confluent REST
//! API, for local and development stacks where no Confluent-compatible
//! registry can be installed. Production deployments point the relays and
//! consumers at their own registry; nothing in the project depends on this
//! one beyond the API it shares with the real thing.
//!
//! Avro only; compatibility is decided by apache-avro's schema resolution
//! (`compat`), state is one JSON file (`store`), the HTTP surface is `api`.

pub mod api;
pub mod compat;
pub mod store;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use crate::{Error, Result, telemetry};

/// Arguments of `outbox registry`.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Address to listen on (REST API, /metrics, /healthz, /readyz).
    #[arg(long, env = "REGISTRY_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// File the registry keeps its schemas in; without it, schemas live in
    /// memory and are gone when the process stops.
    #[arg(long, env = "REGISTRY_DATA_FILE")]
    pub data_file: Option<PathBuf>,
}

/// Build the registry's HTTP application over `store`.
pub fn app(store: Arc<store::Store>) -> Result<axum::Router> {
    let metrics = prometheus::Registry::new();
    let http = telemetry::HttpMetrics::register(&metrics)?;
    Ok(api::router(store)
        .merge(telemetry::admin_router(metrics, telemetry::always_ready()))
        .layer(axum::middleware::from_fn_with_state(http, telemetry::track_http)))
}

/// Serve the registry until SIGTERM or Ctrl-C.
pub async fn run(args: RegistryArgs) -> Result<()> {
    let store = match &args.data_file {
        Some(path) => store::Store::open(path)?,
        None => store::Store::in_memory(),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| Error::Io { path: args.listen.to_string(), source })?;
    tracing::info!(listen = %args.listen, data_file = ?args.data_file, "schema registry listening");
    axum::serve(listener, app(Arc::new(store))?)
        .with_graceful_shutdown(telemetry::shutdown_signal())
        .await
        .map_err(|source| Error::Io { path: args.listen.to_string(), source })
}
