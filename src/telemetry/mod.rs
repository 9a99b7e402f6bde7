//! What every process serves and emits: structured logs, `/metrics`
//! (Prometheus text format), `/healthz` and `/readyz`, and graceful shutdown.

use std::{future::Future, pin::Pin, sync::Arc, time::Instant};

use axum::{
    Router,
    extract::{MatchedPath, Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

use crate::Result;

pub mod traces;

/// Log output format of every subcommand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What [`init`] installed; [`Telemetry::shutdown`] at exit sends the spans
/// still buffered.
#[must_use = "call shutdown() at exit, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Send the spans still buffered (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "sending the last spans at exit");
        }
    }
}

/// Install the global tracing subscriber: logs on stderr in `format`, the
/// filter from `RUST_LOG` (default `info`), and OpenTelemetry traces when
/// an OTLP endpoint is configured (see [`traces`]), named `service` unless
/// `OTEL_SERVICE_NAME` says otherwise.
pub fn init(format: LogFormat, service: &str) -> Telemetry {
    let (provider, problem) = match traces::provider(service) {
        Ok(p) => (p, None),
        Err(e) => (None, Some(e)),
    };
    install(format, provider.as_ref());
    if let Some(e) = problem {
        tracing::error!(error = %e, "traces are not exported: check the OTEL_EXPORTER_OTLP_* variables");
    }
    Telemetry { provider }
}

/// Logs only (tests and benchmarks).
pub fn init_logging(format: LogFormat) {
    install(format, None);
}

fn install(format: LogFormat, provider: Option<&opentelemetry_sdk::trace::SdkTracerProvider>) {
    use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: never in a pod's log or a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    // RUST_LOG filters the logs only: the project's spans are exported
    // whatever the log level (a relay logging warnings still traces).
    let logs = match format {
        LogFormat::Text => logs.with_filter(filter).boxed(),
        LogFormat::Json => logs.json().with_filter(filter).boxed(),
    };
    let spans = provider.map(|p| traces::layer(p).with_filter(traces::exported_spans()));
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = tracing_subscriber::registry().with(logs).with(spans).try_init();
}

/// Install ring as the process-wide rustls crypto provider, so kube, mongodb
/// and reqwest never disagree about which one to use.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// HTTP request metrics shared by every HTTP server of the project.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl HttpMetrics {
    pub fn register(registry: &Registry) -> Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new("outbox_http_requests_total", "HTTP requests served, by route, method and status"),
            &["route", "method", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new("outbox_http_request_duration_seconds", "HTTP request latency, by route")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            &["route", "method"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self { requests, duration })
    }
}

/// axum middleware: count and time each request by its route template.
pub async fn track_http(State(metrics): State<HttpMetrics>, req: Request, next: Next) -> Response {
    let route = route_of(&req);
    let method = req.method().as_str().to_owned();
    let start = Instant::now();
    let response = next.run(req).await;
    metrics.duration.with_label_values(&[route.as_str(), method.as_str()]).observe(start.elapsed().as_secs_f64());
    metrics.requests.with_label_values(&[route.as_str(), method.as_str(), response.status().as_str()]).inc();
    response
}

/// The route template that matched `req` (`/sessions/{id}`), or
/// `unmatched`: a label of bounded cardinality, unlike the path.
pub fn route_of(req: &Request) -> String {
    req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned())
}

/// An asynchronous readiness probe: `Ok` when the process can do its work,
/// `Err(reason)` otherwise.
pub type ReadyCheck = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A readiness probe that is always ready.
pub fn always_ready() -> ReadyCheck {
    Arc::new(|| Box::pin(async { Ok(()) }))
}

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    ready: ReadyCheck,
}

/// `/metrics`, `/healthz` and `/readyz`, to be merged into a process's router.
pub fn admin_router(registry: Registry, ready: ReadyCheck) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(AdminState { registry, ready })
}

async fn metrics_handler(State(state): State<AdminState>) -> Response {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], buf).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn ready_handler(State(state): State<AdminState>) -> Response {
    match (state.ready)().await {
        Ok(()) => "ready".into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}")).into_response(),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}
