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

/// A column's alignment in a [`Table`].
#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}
use Align::{Left, Right};

/// A table of fixed-width columns, indented two spaces: each column's
/// title, width and alignment (the last one, width 0, takes the rest of
/// the line).
struct Table(&'static [(&'static str, usize, Align)]);

impl Table {
    fn header(&self, out: &mut String) {
        let titles: Vec<&str> = self.0.iter().map(|(title, _, _)| *title).collect();
        self.row(out, &titles);
    }

    fn row(&self, out: &mut String, cells: &[&str]) {
        out.push(' ');
        for ((_, width, align), cell) in self.0.iter().zip(cells) {
            let _ = match align {
                Left => write!(out, " {cell:<width$}"),
                Right => write!(out, " {cell:>width$}"),
            };
        }
        out.push('\n');
    }
}

const CONDITIONS: Table = Table(&[("TYPE", 18, Left), ("STATUS", 6, Left), ("REASON", 22, Left), ("MESSAGE", 0, Left)]);
const RANGES: Table = Table(&[
    ("RANGE", 12, Left),
    ("PUBLISHER", 40, Left),
    ("PENDING", 8, Right),
    ("FAILED", 7, Right),
    ("OLDEST", 8, Right),
]);
const DEAD_EVENTS: Table = Table(&[
    ("ID", 36, Left),
    ("AGGREGATE", 24, Left),
    ("EVENT", 22, Left),
    ("TRY", 3, Right),
    ("SINCE", 20, Left),
    ("ERROR", 0, Left),
]);
const PARTITIONS: Table =
    Table(&[("TOPIC/PARTITION", 40, Left), ("COMMITTED", 10, Right), ("HIGH", 12, Right), ("LAG", 8, Right)]);
const PARKED: Table = Table(&[
    ("AGGREGATE", 24, Left),
    ("DEAD-LETTERED EVENT", 36, Left),
    ("EVENTS", 6, Right),
    ("SINCE", 20, Left),
    ("ERROR", 0, Left),
]);

/// A cell's text, `-` when there is none.
fn or_dash(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

fn conditions(out: &mut String, conditions: &[Condition]) {
    for c in conditions {
        CONDITIONS.row(out, &[&c.type_, &c.status, &c.reason, &c.message]);
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
    let _ = writeln!(out, "Oldest unpublished: {}", or_dash(&s.oldest_pending_age));
    let _ = writeln!(out, "Last published:     {}", or_dash(&s.last_published_time));
    if s.failed > 0 {
        let reasons: Vec<String> = s.failed_by_reason.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            out,
            "Retrying:   {}; next at {}, longest backoff {}s",
            reasons.join(", "),
            or_dash(&s.next_retry_time),
            s.current_max_backoff_seconds.unwrap_or_default()
        );
    }
    let _ = writeln!(out, "Ranges ({} owned of {}):", s.owned_ranges, r.spec.shards);
    RANGES.header(&mut out);
    for g in &s.ranges {
        let (pending, failed) = (g.pending.to_string(), g.failed.to_string());
        let owner = g.owner.as_deref().unwrap_or("(none)");
        RANGES.row(&mut out, &[&g.range, owner, &pending, &failed, or_dash(&g.oldest_pending_age)]);
    }
    if !s.dead_events.is_empty() {
        let _ = writeln!(out, "Dead events (newest {} of {}):", s.dead_events.len(), s.dead);
        DEAD_EVENTS.header(&mut out);
        for d in &s.dead_events {
            let attempts = d.attempts.to_string();
            let (aggregate, event) = (or_dash(&d.aggregate_id), or_dash(&d.event_name));
            DEAD_EVENTS.row(&mut out, &[&d.id, aggregate, event, &attempts, or_dash(&d.since), or_dash(&d.last_error)]);
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
    PARTITIONS.header(&mut out);
    for p in &s.partitions {
        let committed = p.committed.map_or("-".to_owned(), |c| c.to_string());
        let place = format!("{}/{}", p.topic, p.partition);
        PARTITIONS.row(&mut out, &[&place, &committed, &p.high_watermark.to_string(), &p.lag.to_string()]);
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
                or_dash(&w.since),
                w.error
            );
        }
    }
    if !s.parked.is_empty() {
        let _ = writeln!(out, "Parked aggregates (newest {} of {}):", s.parked.len(), s.parked_aggregates);
        PARKED.header(&mut out);
        for p in &s.parked {
            let events = p.events.to_string();
            PARKED
                .row(&mut out, &[&p.aggregate_id, or_dash(&p.event_id), &events, or_dash(&p.since), or_dash(&p.error)]);
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
