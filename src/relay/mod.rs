//! `outbox relay`: the MongoDB outbox to Kafka, in commit order per
//! aggregate.
//!
//! The outbox is split into `--shards` bucket ranges (one, the whole
//! outbox, by default). Each range is published by one relay at a time,
//! the holder of the range's lease; the relays of an outbox share the
//! ranges out among themselves (`shards`: who is live, who owns what, and
//! the hand-overs), and a relay publishes each range it owns on its own
//! (`range`: lease, checkpoint, change stream, batches, retries). This file
//! sets up what a relay process shares between its ranges: the MongoDB
//! client, the producer settings, the event schemas (`schemas`), the
//! metrics and the admin server. Flags: `args`; metrics: `metrics`.

pub mod args;
pub mod encoding;
pub mod metrics;
pub mod ordering;
pub mod producer;
pub mod publisher;
mod range;
pub mod readiness;
pub mod routes;
pub mod schemas;
pub mod shards;
pub mod stream;

use std::{sync::Arc, time::Duration};

use mongodb::bson::DateTime;
use prometheus::Registry;
use rdkafka::ClientConfig;

pub use args::{LeaseBackend, MongoArgs, RedriveArgs, RedriveFrom, RelayAction, RelayArgs, RelayCommand};
use metrics::RelayMetrics;

use crate::{
    Error, Result,
    backoff::BackoffPolicy,
    db::connect,
    kafka::relay_producer_config,
    lifecycle::{self, Stop},
    outbox::{Outbox, requests::RequestAction},
    registry_client::ids::SchemaIds,
    telemetry,
};

pub async fn main(cmd: RelayCommand) -> Result<()> {
    match cmd.action {
        Some(RelayAction::Redrive(args)) => redrive(args).await,
        None => run_until(cmd.run, lifecycle::stop_on_signal()).await,
    }
}

async fn redrive(args: RedriveArgs) -> Result<()> {
    let client = connect(&args.mongo.mongodb_uri).await?;
    let outbox = Outbox::new(&client.database(&args.mongo.database), &args.mongo.collection);
    let action = match &args.discard {
        Some(reason) => RequestAction::Discard { by: args.by.clone(), reason: reason.clone() },
        None => RequestAction::Redrive,
    };
    let request = format!("cli-{}", uuid::Uuid::now_v7());
    let n = outbox.mark_for_request(&args.selection(), &action, &request, DateTime::now()).await?;
    let verb = if args.discard.is_some() { "marked for discarding" } else { "redrove" };
    println!(
        "{verb} {n} {:?} event(s) (request {request}): the relay carries them out in their aggregate's order",
        args.status
    );
    tracing::info!(count = n, status = ?args.status, request, "redrive");
    Ok(())
}

/// What a relay process shares between the ranges it publishes.
pub(crate) struct Shared {
    args: RelayArgs,
    relay_id: String,
    db: mongodb::Database,
    outbox: Outbox,
    producer_config: ClientConfig,
    schemas: Arc<schemas::EventSchemas>,
    backoff: BackoffPolicy,
    metrics: RelayMetrics,
    /// What `/readyz` answers (see `readiness`).
    readiness: Arc<readiness::Readiness>,
    lease_ttl: Duration,
    /// Nothing is sent within this much of a lease's end.
    send_window: Duration,
    /// How long a send may wait for the broker's answer before the
    /// producer is given up: `message.timeout.ms` if set, else
    /// `send_window`.
    answer_timeout: Duration,
}

/// How long a send may wait for the broker's answer: the producer setting
/// `message.timeout.ms` if given (at most `send_window`, so everything sent
/// is answered or failed before a standby may take over), else
/// `send_window`.
fn answer_timeout(overrides: &[(String, String)], send_window: Duration) -> Result<Duration> {
    let window_ms = send_window.as_millis().max(1);
    let Some((_, value)) =
        overrides.iter().rev().find(|(k, _)| k == "message.timeout.ms" || k == "delivery.timeout.ms")
    else {
        return Ok(send_window.max(Duration::from_millis(1)));
    };
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 && u128::from(ms) <= window_ms => Ok(Duration::from_millis(ms)),
        Ok(ms) if ms > 0 => Err(Error::Config(format!(
            "message.timeout.ms {ms} is longer than a third of the relay lease ({window_ms} ms): a record could \
             still be in flight when a standby takes over; lower it or raise RELAY_LEASE_SECONDS"
        ))),
        _ => Err(Error::Config(format!(
            "message.timeout.ms {value:?}: give a number of milliseconds from 1 to a third of the relay lease \
             ({window_ms} ms)"
        ))),
    }
}

/// Run the relay until `stop` turns true (SIGTERM in the binary; tests
/// drive it directly).
pub async fn run_until(args: RelayArgs, stop: Stop) -> Result<()> {
    let backoff = args.backoff()?;
    args.outbox_lease()?;
    let ranges = args.ranges()?;
    let source = args.schema_source()?;
    if let schemas::SchemaSource::Files(dir) = &source {
        let mut stop = stop.clone();
        tokio::spawn(dir.clone().watch(async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
    }
    let schemas = Arc::new(schemas::EventSchemas::new(
        source,
        args.subject_name_strategy,
        SchemaIds::new(&args.schema_registry_url, args.auto_register_schemas),
    ));
    let relay_id = args.relay_id();
    let lease_ttl = Duration::from_secs(args.lease_seconds);
    // Every record is acknowledged or failed well inside the lease, so a
    // relay that stops sending at its deadline has nothing left in flight
    // when another may take over.
    let send_window = lease_ttl / 3;
    let config = relay_producer_config(&args.kafka_bootstrap, &args.producer_config).map_err(Error::Config)?;
    let answer_timeout = answer_timeout(&args.producer_config, send_window)?;
    let client = connect(&args.mongo.mongodb_uri).await?;
    let db = client.database(&args.mongo.database);
    let outbox = Outbox::new(&db, &args.mongo.collection);
    outbox.ensure_indexes().await?;

    let registry = Registry::new();
    let metrics = RelayMetrics::register(&registry)?;
    let readiness = Arc::new(readiness::Readiness::default());
    let answer = readiness.clone();
    let ready: telemetry::ReadyCheck = Arc::new(move || {
        let state = answer.check();
        Box::pin(async move { state })
    });
    lifecycle::serve_admin(args.metrics_listen, registry, ready).await?;
    tracing::info!(relay_id = %relay_id, collection = %args.mongo.collection, shards = ranges.len(), "relay started");
    let shared = Arc::new(Shared {
        args,
        relay_id,
        db,
        outbox,
        producer_config: config,
        schemas,
        backoff,
        metrics,
        readiness,
        lease_ttl,
        send_window,
        answer_timeout,
    });
    shards::run(shared, ranges, stop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_waits_for_its_answer_at_most_a_third_of_the_lease() {
        let window = Duration::from_secs(5);
        let setting = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        assert_eq!(answer_timeout(&[], window).unwrap(), window);
        assert_eq!(answer_timeout(&setting("message.timeout.ms", "800"), window).unwrap(), Duration::from_millis(800));
        assert_eq!(answer_timeout(&setting("delivery.timeout.ms", "900"), window).unwrap(), Duration::from_millis(900));
        let long = answer_timeout(&setting("message.timeout.ms", "6000"), window).unwrap_err().to_string();
        assert!(long.contains("longer than a third of the relay lease"), "{long}");
        assert!(answer_timeout(&setting("message.timeout.ms", "0"), window).is_err(), "no send waits forever");
        assert!(answer_timeout(&setting("message.timeout.ms", "soon"), window).is_err());
    }
}
