//! `outbox session-api`: the sample Session bounded context over HTTP. It
//! writes each session and its domain events in one MongoDB transaction
//! (the transactional outbox), so every relay and consumer has a real
//! producer of events. Runs alone or as a sidecar.

pub mod http;
pub mod problem;
pub mod repo;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::http::StatusCode;
use prometheus::{IntCounter, Registry};

use crate::{Error, Result, domain::session::SessionPolicy, outbox::bucket::DEFAULT_BUCKETS, telemetry};
use problem::Problem;
use repo::SessionRepo;

/// Arguments of `outbox session-api`.
#[derive(Debug, Clone, clap::Args)]
pub struct SessionApiArgs {
    /// Address to listen on (API, /metrics, /healthz, /readyz).
    #[arg(long, env = "SESSION_API_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// MongoDB connection string (a replica set: transactions are required).
    #[arg(long, env = "MONGODB_URI")]
    pub mongodb_uri: String,
    /// Database holding sessions, idempotency keys and the outbox.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "sessions")]
    pub database: String,
    /// Outbox collection name.
    #[arg(long, env = "OUTBOX_COLLECTION", default_value = "outbox")]
    pub outbox_collection: String,
    /// Virtual buckets of the outbox (must match the relays' setting).
    #[arg(long, env = "OUTBOX_BUCKETS", default_value_t = DEFAULT_BUCKETS, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub buckets: u32,
    /// Shortest session TTL a client may ask for, in seconds.
    #[arg(long, env = "SESSION_MIN_TTL_SECONDS", default_value_t = 60)]
    pub min_ttl_seconds: u64,
    /// Longest session TTL, in seconds.
    #[arg(long, env = "SESSION_MAX_TTL_SECONDS", default_value_t = 30 * 24 * 3600)]
    pub max_ttl_seconds: u64,
    /// TTL when a request names none, in seconds.
    #[arg(long, env = "SESSION_DEFAULT_TTL_SECONDS", default_value_t = 3600)]
    pub default_ttl_seconds: u64,
}

impl SessionApiArgs {
    pub fn policy(&self) -> Result<SessionPolicy> {
        let policy = SessionPolicy {
            min_ttl_seconds: self.min_ttl_seconds,
            max_ttl_seconds: self.max_ttl_seconds,
            default_ttl_seconds: self.default_ttl_seconds,
        };
        policy.validate().map_err(Error::Config)?;
        Ok(policy)
    }
}

/// Counters of the session API besides the HTTP ones.
#[derive(Clone)]
pub struct SessionMetrics {
    outbox_rows: IntCounter,
    retries: IntCounter,
}

impl SessionMetrics {
    pub fn register(registry: &Registry) -> Result<Self> {
        let outbox_rows =
            IntCounter::new("outbox_session_outbox_rows_written_total", "Outbox rows committed by the session API")?;
        let retries = IntCounter::new(
            "outbox_session_transaction_retries_total",
            "Transaction attempts retried after a transient MongoDB error",
        )?;
        registry.register(Box::new(outbox_rows.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        Ok(Self { outbox_rows, retries })
    }

    fn written(&self, rows: usize, attempts: u32) {
        self.outbox_rows.inc_by(rows as u64);
        self.retries.inc_by(u64::from(attempts.saturating_sub(1)));
    }
}

#[derive(Clone)]
pub struct AppState {
    pub repo: SessionRepo,
    pub policy: SessionPolicy,
    pub metrics: SessionMetrics,
}

/// The whole application: API routes, admin endpoints and HTTP metrics.
pub async fn app(client: mongodb::Client, args: &SessionApiArgs) -> Result<axum::Router> {
    let policy = args.policy()?;
    let db = client.database(&args.database);
    let repo = SessionRepo::new(client, &db, &args.outbox_collection, args.buckets);
    repo.ensure_indexes()
        .await
        .map_err(|e| Error::Unavailable { service: "MongoDB", detail: format!("creating indexes at start-up: {e}") })?;
    let registry = Registry::new();
    let http_metrics = telemetry::HttpMetrics::register(&registry)?;
    let metrics = SessionMetrics::register(&registry)?;
    let ready_repo = repo.clone();
    let ready: telemetry::ReadyCheck = Arc::new(move || {
        let repo = ready_repo.clone();
        Box::pin(async move {
            match tokio::time::timeout(Duration::from_secs(2), repo.ping()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("MongoDB: {e}")),
                Err(_) => Err("MongoDB: no answer within 2 s".to_owned()),
            }
        })
    });
    Ok(http::router(AppState { repo, policy, metrics })
        .merge(telemetry::admin_router(registry, ready))
        .fallback(|| async {
            Problem::new(
                StatusCode::NOT_FOUND,
                "no-such-route",
                "No such route",
                "see the route table in docs/guide/sample-session-api.md",
            )
        })
        .layer(axum::middleware::from_fn_with_state(http_metrics, telemetry::track_http)))
}

/// Serve until SIGTERM or Ctrl-C.
pub async fn run(args: SessionApiArgs) -> Result<()> {
    let client = crate::db::connect(&args.mongodb_uri).await?;
    let app = app(client, &args).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| Error::Io { path: args.listen.to_string(), source })?;
    tracing::info!(listen = %args.listen, database = %args.database, "session API listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(telemetry::shutdown_signal())
        .await
        .map_err(|source| Error::Io { path: args.listen.to_string(), source })
}
