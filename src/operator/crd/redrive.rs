//! The `OutboxRedrive` custom resource: one object per action on an
//! outbox's dead or failed events, or on a consumer group's dead-lettered
//! ones (redrive them, or discard them with a reason), like a one-off Job. Creating one is its own RBAC permission,
//! apart from editing the OutboxRelay; the object stays as the record of
//! who asked what, and its status follows the action to its end.

use chrono::{DateTime as ChronoTime, Utc};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::outbox::{
    OutboxStatus,
    requests::{RequestAction, Selection},
};

/// A one-off action on set-aside events. Of an OutboxRelay: `redrive` puts the selected events
/// back in line for a retry now (fresh attempt budget, each aggregate's order kept), `discard`
/// gives them up (each row kept as `discarded` with who and why) so their aggregates flow again;
/// the operator marks the rows once, the relay carries them out. Of an EventConsumer: `redrive`
/// replays its dead-letter topics, in order, in a Job with the consumer's pod and settings,
/// releasing the parked aggregates as their events are applied; `discard` records the parked
/// aggregates' events as processed with who and why (they stay in the dead-letter topics, and a
/// later redrive skips them) so the aggregates flow again. Status follows until the end. The
/// spec is read once, when the request starts: create a new request to act again.
// The print columns repeat `type_ = ...`, which clippy takes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "outbox.dev",
    version = "v1alpha1",
    kind = "OutboxRedrive",
    namespaced,
    status = "OutboxRedriveStatus",
    shortname = "ordr",
    category = "outbox",
    doc = "A one-off redrive or discard of an OutboxRelay's dead or failed events or an EventConsumer's dead-lettered ones.",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.target.name"),
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Matched", type_ = "integer", json_path = ".status.matched"),
    printcolumn(name = "Done", type_ = "integer", json_path = ".status.done"),
    printcolumn(name = "Errors", type_ = "integer", json_path = ".status.errors"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "RequestedBy", type_ = "string", json_path = ".spec.requestedBy", priority = 1),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1)
)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRedriveSpec {
    /// The OutboxRelay or EventConsumer (in this namespace) whose events to act on.
    pub target: RedriveTarget,
    /// `redrive` (default) or `discard`.
    #[serde(default)]
    pub action: RedriveAction,
    /// Why. Required to discard: recorded on every discarded row with `requestedBy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who asks, recorded on discarded rows (`kubectl outbox` sets the kubeconfig's user). The
    /// apiserver's audit log records who created the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// Which events: all of `status` by default; every list given narrows it. An EventConsumer's
    /// events are selected by aggregate only, and only to discard: a redrive replays its
    /// dead-letter topics whole, in order.
    #[serde(default)]
    pub selection: RedriveSelection,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedriveTarget {
    /// `OutboxRelay` or `EventConsumer`.
    pub kind: RedriveTargetKind,
    /// Its name.
    #[schemars(length(min = 1))]
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RedriveTargetKind {
    OutboxRelay,
    EventConsumer,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RedriveAction {
    #[default]
    Redrive,
    Discard,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedriveSelection {
    /// Events in this state: `dead` (default) or `failed` (waiting for a retry).
    #[serde(default)]
    pub status: SelectedStatus,
    /// Only these aggregates' events.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aggregate_ids: Vec<String>,
    /// Only events of these names (`eventName`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_names: Vec<String>,
    /// Only events that occurred at or after this time (RFC 3339, the event's `occurredOn`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_after: Option<String>,
    /// Only events that occurred before this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_before: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SelectedStatus {
    #[default]
    Dead,
    Failed,
}

/// Where a request is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RedrivePhase {
    /// Not started (the outbox could not be reached yet).
    Pending,
    /// Rows marked and the relay carrying them out, or the consumer's redrive Job running.
    Running,
    /// Every matched event is published or applied (redrive), or discarded.
    Completed,
    /// The request is invalid (nothing changed), events went dead (or were dead-lettered)
    /// again, or the redrive Job failed.
    Failed,
}

/// Where the request is, from the outbox rows it marked.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRedriveStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RedrivePhase>,
    /// Events the request marked (an EventConsumer's redrive: records read so far).
    #[serde(default)]
    pub matched: i64,
    /// Carried out: published or applied again (or found applied already), or discarded.
    #[serde(default)]
    pub done: i64,
    /// Marked and not carried out yet.
    #[serde(default)]
    pub waiting: i64,
    /// Redriven events that went dead again (an EventConsumer's: dead-lettered again, to
    /// `<dead-letter topic>.redrive`).
    #[serde(default)]
    pub errors: i64,
    /// The Job carrying out an EventConsumer's redrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// What happened, in a sentence (why it failed, what it waits for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the events were marked (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// When the request ended, Completed or Failed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
}

impl OutboxRedriveSpec {
    /// The outbox selection and action, or why the request cannot run.
    pub fn to_request(&self, namespace: &str, name: &str) -> Result<(Selection, RequestAction), String> {
        let time = |field: &str, v: &Option<String>| -> Result<Option<mongodb::bson::DateTime>, String> {
            v.as_deref()
                .map(|s| {
                    ChronoTime::parse_from_rfc3339(s)
                        .map(|t| mongodb::bson::DateTime::from_millis(t.with_timezone(&Utc).timestamp_millis()))
                        .map_err(|e| format!("selection.{field} {s:?} is not an RFC 3339 time: {e}"))
                })
                .transpose()
        };
        let s = &self.selection;
        let selection = Selection {
            status: match s.status {
                SelectedStatus::Dead => OutboxStatus::Dead,
                SelectedStatus::Failed => OutboxStatus::Failed,
            },
            aggregate_ids: s.aggregate_ids.clone(),
            event_names: s.event_names.clone(),
            occurred_after: time("occurredAfter", &s.occurred_after)?,
            occurred_before: time("occurredBefore", &s.occurred_before)?,
        };
        let action = match self.action {
            RedriveAction::Redrive => RequestAction::Redrive,
            RedriveAction::Discard => {
                let (by, reason) = self.who_and_why(namespace, name)?;
                RequestAction::Discard { by, reason }
            }
        };
        Ok((selection, action))
    }

    /// What to do to an EventConsumer's dead-lettered events, or why the
    /// request cannot run: its events are acted on by aggregate, whole, so
    /// each aggregate's order is kept.
    pub fn to_consumer_request(&self, namespace: &str, name: &str) -> Result<ConsumerRequest, String> {
        let s = &self.selection;
        if s.status != SelectedStatus::Dead {
            return Err("an EventConsumer retries failed records itself: only its dead-lettered events \
                        (selection.status dead) can be redriven or discarded"
                .into());
        }
        let by_event = [
            ("eventNames", !s.event_names.is_empty()),
            ("occurredAfter", s.occurred_after.is_some()),
            ("occurredBefore", s.occurred_before.is_some()),
        ];
        if let Some((field, _)) = by_event.iter().find(|(_, set)| *set) {
            return Err(format!(
                "selection.{field} applies to OutboxRelay targets: an EventConsumer's dead-lettered events are \
                 acted on by aggregate, whole, so each aggregate's order is kept"
            ));
        }
        match self.action {
            RedriveAction::Redrive if !s.aggregate_ids.is_empty() => Err(
                "a redrive of an EventConsumer replays its dead-letter topics whole, in order; selection.aggregateIds \
                 applies to discard"
                    .into(),
            ),
            RedriveAction::Redrive => Ok(ConsumerRequest::Redrive),
            RedriveAction::Discard => {
                let (by, reason) = self.who_and_why(namespace, name)?;
                Ok(ConsumerRequest::Discard { by, reason, aggregates: s.aggregate_ids.clone() })
            }
        }
    }

    /// Who discards (as recorded) and why; a discard needs a reason.
    fn who_and_why(&self, namespace: &str, name: &str) -> Result<(String, String), String> {
        let reason = self.reason.as_deref().map(str::trim).unwrap_or_default();
        if reason.is_empty() {
            return Err("discard needs spec.reason: it is recorded on every discarded event".into());
        }
        let who = self.requested_by.as_deref().unwrap_or("unknown");
        Ok((format!("{who} (OutboxRedrive {namespace}/{name})"), reason.to_owned()))
    }
}

/// A request on an EventConsumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerRequest {
    /// Replay the dead-letter topics in a Job.
    Redrive,
    /// Record the parked events of `aggregates` (all when empty) as processed.
    Discard { by: String, reason: String, aggregates: Vec<String> },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> OutboxRedriveSpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn a_request_defaults_to_redriving_every_dead_event() {
        let (selection, action) = spec("target: {kind: OutboxRelay, name: orders}").to_request("shop", "r1").unwrap();
        assert_eq!((selection, action), (Selection::all(OutboxStatus::Dead), RequestAction::Redrive));
    }

    #[test]
    fn a_discard_names_who_and_why_and_needs_a_reason() {
        let s =
            spec("target: {kind: OutboxRelay, name: orders}\naction: discard\nrequestedBy: alice\nreason: bad data");
        let (_, action) = s.to_request("shop", "r1").unwrap();
        assert_eq!(
            action,
            RequestAction::Discard { by: "alice (OutboxRedrive shop/r1)".into(), reason: "bad data".into() }
        );
        let err = spec("target: {kind: OutboxRelay, name: orders}\naction: discard").to_request("shop", "r1");
        assert!(err.unwrap_err().contains("spec.reason"));
    }

    #[test]
    fn a_consumer_request_acts_on_whole_aggregates_and_only_discards_by_aggregate() {
        let consumer = |rest: &str| spec(&format!("target: {{kind: EventConsumer, name: billing}}\n{rest}"));
        assert_eq!(consumer("").to_consumer_request("ns", "r"), Ok(ConsumerRequest::Redrive));
        let discard = consumer("action: discard\nreason: bad\nrequestedBy: bob\nselection: {aggregateIds: [a1]}");
        assert_eq!(
            discard.to_consumer_request("ns", "r"),
            Ok(ConsumerRequest::Discard {
                by: "bob (OutboxRedrive ns/r)".into(),
                reason: "bad".into(),
                aggregates: vec!["a1".into()]
            })
        );
        for (rest, says) in [
            ("selection: {aggregateIds: [a1]}", "applies to discard"),
            ("selection: {status: failed}", "selection.status dead"),
            ("selection: {eventNames: [OrderPaid]}", "selection.eventNames"),
            (
                "action: discard\nreason: x\nselection: {occurredAfter: '2026-01-01T00:00:00Z'}",
                "selection.occurredAfter",
            ),
            ("action: discard", "spec.reason"),
        ] {
            let err = consumer(rest).to_consumer_request("ns", "r").unwrap_err();
            assert!(err.contains(says), "{rest}: {err}");
        }
    }

    #[test]
    fn a_window_must_be_rfc3339_and_narrows_the_selection() {
        let s = spec(
            "target: {kind: OutboxRelay, name: o}\nselection: {status: failed, eventNames: [OrderPaid], \
             occurredAfter: '2026-01-02T03:04:05Z'}",
        );
        let (selection, _) = s.to_request("ns", "r").unwrap();
        assert_eq!(selection.status, OutboxStatus::Failed);
        assert_eq!(selection.event_names, ["OrderPaid"]);
        assert_eq!(selection.occurred_after.unwrap().timestamp_millis(), 1_767_323_045_000);
        let bad = spec("target: {kind: OutboxRelay, name: o}\nselection: {occurredBefore: yesterday}");
        assert!(bad.to_request("ns", "r").unwrap_err().contains("occurredBefore"));
    }
}
