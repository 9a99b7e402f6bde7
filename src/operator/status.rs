//! Status computed from plain values: conditions (keeping their transition
//! time while unchanged), the Ready / Progressing / Degraded decision, and
//! the human forms of ages and times. Pure: no client, no clock but the one
//! passed in for a new transition.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use mongodb::bson::DateTime;

/// Why a resource is not healthy: a condition's reason (CamelCase, e.g.
/// `SecretNotFound`) and a message a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub reason: &'static str,
    pub message: String,
}

impl Cause {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

/// A condition, keeping its transition time while its status is unchanged.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: if message.is_empty() { reason.into() } else { message },
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// What the health conditions are computed from.
#[derive(Debug, Clone)]
pub struct Health<'a> {
    pub previous: &'a [Condition],
    pub generation: Option<i64>,
    /// The first thing found wrong (a missing Secret, an unreachable
    /// dependency, an invalid spec), if any.
    pub degraded: Option<Cause>,
    pub paused: bool,
    /// Replicas wanted, ready, and whether a rollout is under way.
    pub want: i32,
    pub ready: i32,
    pub rolling: bool,
    /// "relay" or "consumer", for messages.
    pub pods: &'static str,
    /// Ready reason while working, e.g. "Publishing".
    pub working: &'static str,
}

/// Ready, Progressing and Degraded.
pub fn health_conditions(h: &Health<'_>) -> [Condition; 3] {
    let c =
        |t: &str, ok: bool, reason: &str, message: String| condition(h.previous, t, ok, reason, message, h.generation);
    let healthy = || c("Degraded", false, "Healthy", String::new());
    let (ready, degraded) = match &h.degraded {
        Some(cause) => (
            c("Ready", false, cause.reason, cause.message.clone()),
            c("Degraded", true, cause.reason, cause.message.clone()),
        ),
        None if h.paused => (c("Ready", true, "Paused", "paused: scaled to zero".into()), healthy()),
        None if h.ready == 0 => {
            (c("Ready", false, "PodsNotReady", format!("0/{} {} pods ready", h.want, h.pods)), healthy())
        }
        None => (c("Ready", true, h.working, format!("{}/{} {} pods ready", h.ready, h.want, h.pods)), healthy()),
    };
    let progressing = c("Progressing", h.rolling, if h.rolling { "RollingOut" } else { "Stable" }, String::new());
    [ready, progressing, degraded]
}

/// Whether `ready` is a change of the Ready condition from `previous` (an
/// Event is recorded for each).
pub fn ready_changed(previous: &[Condition], ready: &Condition) -> bool {
    condition_of(previous, "Ready").map(|c| c.status.as_str()) != Some(ready.status.as_str())
}

/// The condition of type `type_` among `conditions`.
pub fn condition_of<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// An age as `kubectl` prints them: 42s, 5m, 3h, 2d.
pub fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

pub fn rfc3339(t: DateTime) -> Option<String> {
    t.try_to_rfc3339_string().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(degraded: Option<Cause>, paused: bool, want: i32, ready: i32) -> Health<'static> {
        Health {
            previous: &[],
            generation: Some(3),
            degraded,
            paused,
            want,
            ready,
            rolling: false,
            pods: "relay",
            working: "Publishing",
        }
    }

    fn brief(c: &Condition) -> (&str, &str, &str) {
        (c.type_.as_str(), c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn ready_follows_the_pods_unless_something_is_wrong() {
        let [ready, progressing, degraded] = health_conditions(&health(None, false, 2, 1));
        assert_eq!(brief(&ready), ("Ready", "True", "Publishing"));
        assert_eq!(ready.message, "1/2 relay pods ready");
        assert_eq!(brief(&progressing), ("Progressing", "False", "Stable"));
        assert_eq!(brief(&degraded), ("Degraded", "False", "Healthy"));
        assert_eq!(ready.observed_generation, Some(3));

        let [ready, ..] = health_conditions(&health(None, false, 2, 0));
        assert_eq!(brief(&ready), ("Ready", "False", "PodsNotReady"));

        let [ready, ..] = health_conditions(&health(None, true, 0, 0));
        assert_eq!(brief(&ready), ("Ready", "True", "Paused"));
    }

    #[test]
    fn a_cause_makes_the_resource_not_ready_and_degraded_even_when_paused() {
        let cause = Cause::new("SecretNotFound", "Secret mongo not found in namespace shop");
        let [ready, _, degraded] = health_conditions(&health(Some(cause), true, 2, 2));
        assert_eq!(brief(&ready), ("Ready", "False", "SecretNotFound"));
        assert_eq!(brief(&degraded), ("Degraded", "True", "SecretNotFound"));
        assert_eq!(ready.message, "Secret mongo not found in namespace shop");
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let first = condition(&[], "Ready", true, "Publishing", String::new(), None);
        assert_eq!(first.message, "Publishing", "an empty message is replaced by the reason");
        let earlier = Condition { last_transition_time: Time(Timestamp::from_second(1_000).unwrap()), ..first };
        let same = condition(std::slice::from_ref(&earlier), "Ready", true, "Publishing", "x".into(), None);
        assert_eq!(same.last_transition_time, earlier.last_transition_time);
        let flipped = condition(std::slice::from_ref(&earlier), "Ready", false, "PodsNotReady", "x".into(), None);
        assert_ne!(flipped.last_transition_time, earlier.last_transition_time);
        assert!(ready_changed(std::slice::from_ref(&earlier), &flipped));
        assert!(!ready_changed(std::slice::from_ref(&earlier), &same));
        assert!(ready_changed(&[], &same));
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(age(-3.0), "0s");
        assert_eq!(age(119.9), "119s");
        assert_eq!(age(120.0), "2m");
        assert_eq!(age(7200.0), "2h");
        assert_eq!(age(172_800.0), "2d");
    }
}
