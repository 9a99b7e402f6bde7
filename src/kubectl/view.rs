//! `kubectl outbox status`: an OutboxRelay's or EventConsumer's status as
//! a person reads it (the conditions, the figures with their age, each
//! range and its publisher, the dead events with their errors; the lag per
//! partition, waiting partitions and aggregates, parked aggregates).

use std::fmt::Write;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{Api, Client};

use super::Target;
use crate::{
    Error, Result,
    operator::crd::{EventConsumer, EventConsumerStatus, OutboxRelay, OutboxRelayStatus},
};

pub async fn print_status(client: &Client, ns: &str, target: &Target) -> Result<()> {
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), ns);
    let consumers: Api<EventConsumer> = Api::namespaced(client.clone(), ns);
    let relay = match target {
        Target::Relay(n) | Target::Either(n) => relays.get_opt(n).await?,
        Target::Consumer(_) => None,
    };
    if let Some(r) = relay {
        print!("{}", relay_view(&r));
        return Ok(());
    }
    let consumer = match target {
        Target::Consumer(n) | Target::Either(n) => consumers.get_opt(n).await?,
        Target::Relay(_) => None,
    };
    match (consumer, target) {
        (Some(c), _) => {
            print!("{}", consumer_view(&c));
            Ok(())
        }
        (None, Target::Relay(n)) => Err(Error::NotFound(format!("no OutboxRelay {n} in namespace {ns}"))),
        (None, Target::Consumer(n)) => Err(Error::NotFound(format!("no EventConsumer {n} in namespace {ns}"))),
        (None, Target::Either(n)) => {
            Err(Error::NotFound(format!("no OutboxRelay or EventConsumer {n} in namespace {ns}")))
        }
    }
}

fn conditions(out: &mut String, conditions: &[Condition]) {
    for c in conditions {
        let _ = writeln!(out, "  {:<18} {:<6} {:<22} {}", c.type_, c.status, c.reason, c.message);
    }
}

pub fn relay_view(r: &OutboxRelay) -> String {
    let s: OutboxRelayStatus = r.status.clone().unwrap_or_default();
    let name = r.metadata.name.as_deref().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "OutboxRelay {name}  (outbox {}.{})", r.spec.mongodb.database, r.spec.mongodb.collection);
    let _ = writeln!(out, "Read at:    {}", s.observed_time.as_deref().unwrap_or("not yet"));
    let paused = if r.spec.paused { "  PAUSED" } else { "" };
    let _ = writeln!(out, "Pods:       {}/{} ready{paused}", s.ready_replicas, s.replicas);
    let _ = writeln!(out, "Conditions:");
    conditions(&mut out, &s.conditions);
    let _ = writeln!(
        out,
        "Events:     pending {}  failed {}  held {}  dead {}  blocked aggregates {}",
        s.pending, s.failed, s.held, s.dead, s.blocked_aggregates
    );
    let _ = writeln!(out, "Oldest unpublished: {}", s.oldest_pending_age.as_deref().unwrap_or("-"));
    let _ = writeln!(out, "Last published:     {}", s.last_published_time.as_deref().unwrap_or("-"));
    if s.failed > 0 {
        let reasons: Vec<String> = s.failed_by_reason.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            out,
            "Retrying:   {}; next at {}, longest backoff {}s",
            reasons.join(", "),
            s.next_retry_time.as_deref().unwrap_or("-"),
            s.current_max_backoff_seconds.unwrap_or_default()
        );
    }
    let _ = writeln!(out, "Ranges ({} owned of {}):", s.owned_ranges, r.spec.shards);
    let _ = writeln!(out, "  {:<12} {:<40} {:>8} {:>7} {:>8}", "RANGE", "PUBLISHER", "PENDING", "FAILED", "OLDEST");
    for g in &s.ranges {
        let _ = writeln!(
            out,
            "  {:<12} {:<40} {:>8} {:>7} {:>8}",
            g.range,
            g.owner.as_deref().unwrap_or("(none)"),
            g.pending,
            g.failed,
            g.oldest_pending_age.as_deref().unwrap_or("-")
        );
    }
    if !s.dead_events.is_empty() {
        let _ = writeln!(out, "Dead events (newest {} of {}):", s.dead_events.len(), s.dead);
        let _ = writeln!(out, "  {:<36} {:<24} {:<22} {:>3} {:<20} ERROR", "ID", "AGGREGATE", "EVENT", "TRY", "SINCE");
        for d in &s.dead_events {
            let _ = writeln!(
                out,
                "  {:<36} {:<24} {:<22} {:>3} {:<20} {}",
                d.id,
                d.aggregate_id.as_deref().unwrap_or("-"),
                d.event_name.as_deref().unwrap_or("-"),
                d.attempts,
                d.since.as_deref().unwrap_or("-"),
                d.last_error.as_deref().unwrap_or("-")
            );
        }
        let _ = writeln!(
            out,
            "  redrive: kubectl outbox redrive {name}   discard: kubectl outbox discard {name} --reason ..."
        );
    }
    out
}

pub fn consumer_view(c: &EventConsumer) -> String {
    let s: EventConsumerStatus = c.status.clone().unwrap_or_default();
    let name = c.metadata.name.as_deref().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "EventConsumer {name}  (group {}, topics {})", c.spec.group_id, c.spec.topics.join(","));
    let paused = if c.spec.paused { "  PAUSED" } else { "" };
    let _ = writeln!(out, "Read at:    {}", s.observed_time.as_deref().unwrap_or("not yet"));
    let _ = writeln!(out, "Pods:       {}/{} ready{paused}", s.ready_replicas, s.replicas);
    let _ = writeln!(out, "Conditions:");
    conditions(&mut out, &s.conditions);
    let _ = writeln!(
        out,
        "Records:    lag {}  processed {}  duplicates skipped {}  failed {}  dead-lettered {}  parked aggregates {}",
        s.lag, s.processed, s.duplicates_skipped, s.failed, s.dead_lettered, s.parked_aggregates
    );
    if let Some(b) = s.current_backoff_seconds {
        let _ = writeln!(out, "Backoff:    {b}s");
    }
    let _ = writeln!(out, "Partitions ({}):", s.partition_count);
    let _ = writeln!(out, "  {:<40} {:>10} {:>12} {:>8}", "TOPIC/PARTITION", "COMMITTED", "HIGH", "LAG");
    for p in &s.partitions {
        let committed = p.committed.map_or("-".to_owned(), |c| c.to_string());
        let _ = writeln!(
            out,
            "  {:<40} {:>10} {:>12} {:>8}",
            format!("{}/{}", p.topic, p.partition),
            committed,
            p.high_watermark,
            p.lag
        );
    }
    for (title, list) in [("Waiting partitions", &s.waiting_partitions), ("Waiting aggregates", &s.waiting_aggregates)]
    {
        if list.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{title}:");
        for w in list {
            let aggregate = w.aggregate.as_deref().map(|a| format!(" aggregate {a} ({} queued)", w.queued));
            let _ = writeln!(
                out,
                "  {}/{}@{}{} {} after {} attempt(s) since {}: {}",
                w.topic,
                w.partition,
                w.offset,
                aggregate.unwrap_or_default(),
                w.reason,
                w.attempts,
                w.since.as_deref().unwrap_or("-"),
                w.error
            );
        }
    }
    if !s.parked.is_empty() {
        let _ = writeln!(out, "Parked aggregates (newest {} of {}):", s.parked.len(), s.parked_aggregates);
        let _ =
            writeln!(out, "  {:<24} {:<36} {:>6} {:<20} ERROR", "AGGREGATE", "DEAD-LETTERED EVENT", "EVENTS", "SINCE");
        for p in &s.parked {
            let _ = writeln!(
                out,
                "  {:<24} {:<36} {:>6} {:<20} {}",
                p.aggregate_id,
                p.event_id.as_deref().unwrap_or("-"),
                p.events,
                p.since.as_deref().unwrap_or("-"),
                p.error.as_deref().unwrap_or("-")
            );
        }
        let _ = writeln!(
            out,
            "  redrive: kubectl outbox redrive consumer/{name}   discard: kubectl outbox discard consumer/{name} \
             --aggregate ID --reason ..."
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relays_view_names_its_dead_events_and_how_to_act() {
        let r: OutboxRelay = serde_saphyr::from_str(
            r#"
apiVersion: outbox.dev/v1alpha1
kind: OutboxRelay
metadata: {name: orders, namespace: shop}
spec:
  mongodb: {uriSecret: {name: mongo, key: uri}, database: shop}
  schemas: {configMap: s}
  kafka: {bootstrapServers: "k:9092"}
  schemaRegistry: {url: "http://r"}
  routes: [{aggregateType: Order, topic: orders}]
status:
  dead: 1
  deadEvents: [{id: e-1, aggregateId: o-1, eventName: OrderPaid, attempts: 1, lastError: "no schema for Order.OrderPaid.v3"}]
  ranges: [{range: all, owner: relay-0, pending: 2, failed: 0}]
"#,
        )
        .unwrap();
        let view = relay_view(&r);
        assert!(view.contains("OutboxRelay orders  (outbox shop.outbox)"), "{view}");
        assert!(view.contains("relay-0"), "{view}");
        assert!(view.contains("o-1") && view.contains("no schema for Order.OrderPaid.v3"), "{view}");
        assert!(view.contains("kubectl outbox redrive orders"), "{view}");
    }

    #[test]
    fn a_consumers_view_names_its_parked_aggregates_and_how_to_act() {
        let c: EventConsumer = serde_saphyr::from_str(
            r#"
apiVersion: outbox.dev/v1alpha1
kind: EventConsumer
metadata: {name: billing, namespace: shop}
spec:
  topics: [orders]
  groupId: billing
  handler: {type: log}
  mongodb: {uriSecret: {name: mongo, key: uri}, database: shop}
  kafka: {bootstrapServers: "k:9092"}
  schemaRegistry: {url: "http://r"}
status:
  parkedAggregates: 1
  parked: [{aggregateId: o-7, eventId: e-9, error: "webhook answered 422", events: 3}]
"#,
        )
        .unwrap();
        let view = consumer_view(&c);
        assert!(view.contains("o-7") && view.contains("e-9") && view.contains("webhook answered 422"), "{view}");
        assert!(view.contains("kubectl outbox redrive consumer/billing"), "{view}");
    }
}
