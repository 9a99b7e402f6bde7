//! Why a try at a record failed, and what comes next for it: the
//! consumer's per-record retry decision. Pure.

use std::time::Duration;

use super::{decode::DecodeError, handlers::HandlerError, ordering::reason};
use crate::backoff::{BackoffPolicy, Retry};

/// Why a try at a record failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// An outage (the registry, MongoDB or the webhook unreachable, a
    /// timeout, 5xx, 408, 429): tried again without limit, never
    /// dead-lettered. `reason` is the metric label of the wait.
    Transient { reason: &'static str, message: String, retry_after: Option<Duration> },
    /// Refused (a webhook's other 4xx, a write MongoDB refuses): tried up
    /// to `--max-attempts`, then dead-lettered.
    Rejected { message: String, retry_after: Option<Duration> },
    /// Cannot be read at all (no value, not Confluent framing, no reader
    /// schema): dead-lettered at once.
    Poison { message: String },
}

/// What comes after a failed try.
#[derive(Debug, Clone, PartialEq)]
pub enum NextTry {
    /// Try again after `backoff`; the lane waits for `reason` (a metric label).
    After { backoff: Duration, reason: &'static str },
    /// Send it to the dead-letter topic.
    DeadLetter,
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Transient { message, .. } | Failure::Rejected { message, .. } | Failure::Poison { message } => {
                message
            }
        }
    }

    pub fn into_message(self) -> String {
        match self {
            Failure::Transient { message, .. } | Failure::Rejected { message, .. } | Failure::Poison { message } => {
                message
            }
        }
    }

    /// What comes after the `attempts`th failed try, under `policy` (no
    /// jitter: a lane's wait is its own). A wait the other side asked for
    /// (`Retry-After`) longer than the backoff is kept.
    pub fn next_try(&self, policy: &BackoffPolicy, attempts: u32) -> NextTry {
        let (retry, reason, asked) = match self {
            Failure::Transient { reason, retry_after, .. } => {
                (policy.without_attempt_limit().after_failure(attempts, 0.0), *reason, *retry_after)
            }
            Failure::Rejected { retry_after, .. } => {
                (policy.after_failure(attempts, 0.0), reason::REJECTED, *retry_after)
            }
            Failure::Poison { .. } => return NextTry::DeadLetter,
        };
        match retry {
            Retry::After(backoff) => NextTry::After { backoff: backoff.max(asked.unwrap_or_default()), reason },
            Retry::GiveUp => NextTry::DeadLetter,
        }
    }
}

/// A handler that failed could read the event: transient or rejected.
impl From<HandlerError> for Failure {
    fn from(e: HandlerError) -> Self {
        match e.transient {
            Some(reason) => Failure::Transient { reason, message: e.message, retry_after: e.retry_after },
            None => Failure::Rejected { message: e.message, retry_after: e.retry_after },
        }
    }
}

/// The registry being unreachable is transient; a record that cannot be
/// read is poison.
impl From<DecodeError> for Failure {
    fn from(e: DecodeError) -> Self {
        if e.retryable {
            Failure::Transient { reason: reason::REGISTRY, message: e.message, retry_after: None }
        } else {
            Failure::Poison { message: e.message }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            max_attempts: 3,
            jitter: 0.2,
        }
    }

    #[test]
    fn a_transient_failure_is_tried_again_past_the_attempt_limit_with_the_backoff_capped() {
        let f = Failure::Transient { reason: reason::MONGODB, message: "down".into(), retry_after: None };
        assert_eq!(
            f.next_try(&policy(), 1),
            NextTry::After { backoff: Duration::from_millis(100), reason: reason::MONGODB }
        );
        assert_eq!(
            f.next_try(&policy(), 50),
            NextTry::After { backoff: Duration::from_secs(10), reason: reason::MONGODB }
        );
    }

    #[test]
    fn a_rejection_is_tried_up_to_the_attempt_limit_then_dead_lettered() {
        let f = Failure::Rejected { message: "400".into(), retry_after: None };
        assert_eq!(
            f.next_try(&policy(), 2),
            NextTry::After { backoff: Duration::from_millis(200), reason: reason::REJECTED }
        );
        assert_eq!(f.next_try(&policy(), 3), NextTry::DeadLetter);
    }

    #[test]
    fn poison_is_dead_lettered_at_once() {
        assert_eq!(Failure::Poison { message: "not Avro".into() }.next_try(&policy(), 1), NextTry::DeadLetter);
    }

    #[test]
    fn a_longer_wait_asked_for_by_the_other_side_is_kept() {
        let asked = Some(Duration::from_secs(30));
        let f = Failure::Transient { reason: reason::WEBHOOK, message: "429".into(), retry_after: asked };
        assert_eq!(
            f.next_try(&policy(), 1),
            NextTry::After { backoff: Duration::from_secs(30), reason: reason::WEBHOOK }
        );
        let short = Failure::Rejected { message: "409".into(), retry_after: Some(Duration::from_millis(1)) };
        assert_eq!(
            short.next_try(&policy(), 1),
            NextTry::After { backoff: Duration::from_millis(100), reason: reason::REJECTED }
        );
    }

    #[test]
    fn decode_and_handler_errors_map_to_their_kind() {
        let unreachable = DecodeError { message: "registry down".into(), retryable: true };
        assert!(matches!(Failure::from(unreachable), Failure::Transient { reason: reason::REGISTRY, .. }));
        assert!(matches!(
            Failure::from(DecodeError { message: "no magic byte".into(), retryable: false }),
            Failure::Poison { .. }
        ));
        let refused = HandlerError { message: "400".into(), transient: None, retry_after: None };
        assert!(matches!(Failure::from(refused), Failure::Rejected { .. }));
        let outage = HandlerError::transient(reason::WEBHOOK, "503".into());
        assert!(matches!(Failure::from(outage), Failure::Transient { reason: reason::WEBHOOK, .. }));
    }
}
