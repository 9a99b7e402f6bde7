//! What every long-running process does around its work: a stop signal
//! (SIGTERM or Ctrl-C turns it on; tests turn it on by hand) and the admin
//! server (`/metrics`, `/healthz`, `/readyz`) on its own address.

use std::{net::SocketAddr, time::Duration};

use prometheus::Registry;
use tokio::sync::watch;

use crate::{Error, Result, telemetry};

/// The stop signal a process's loops watch: `true` (or a dropped sender)
/// means stop. Tests hold the sender and drive it themselves.
pub type Stop = watch::Receiver<bool>;

/// A stop signal that turns on at SIGTERM or Ctrl-C.
pub fn stop_on_signal() -> Stop {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        telemetry::shutdown_signal().await;
        let _ = tx.send(true);
    });
    rx
}

/// Whether to stop: told to, or whoever could tell us is gone.
pub fn stopped(stop: &Stop) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Sleep for `duration`, or less if the stop signal changes. Returns
/// whether the process should stop.
pub async fn sleep_or_stop(stop: &mut Stop, duration: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        _ = stop.changed() => {}
    }
    stopped(stop)
}

/// Resolves once the stop signal turns on (for graceful shutdowns).
pub async fn stopping(mut stop: Stop) {
    while !stopped(&stop) {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Bind `listen` and serve the admin endpoints on it in the background.
/// Binding happens before this returns, so a taken port is an error of
/// the process's start, naming the address.
pub async fn serve_admin(listen: SocketAddr, registry: Registry, ready: telemetry::ReadyCheck) -> Result<()> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|source| Error::Io { path: listen.to_string(), source })?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, telemetry::admin_router(registry, ready)).await {
            tracing::error!(error = %e, listen = %listen, "admin server stopped");
        }
    });
    Ok(())
}
