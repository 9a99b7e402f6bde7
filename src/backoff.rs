//! Exponential backoff with jitter for failed publishes. Pure.

use std::time::Duration;

/// When a failed event is retried, and when it is given up on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// Attempts before an event goes `dead` (>= 1).
    pub max_attempts: u32,
    /// Relative jitter: the delay is scaled by a factor in [1 - jitter, 1 + jitter].
    pub jitter: f64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            multiplier: 2.0,
            max_attempts: 10,
            jitter: 0.2,
        }
    }
}

/// What happens to an event after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Retry {
    /// Retry after this delay.
    After(Duration),
    /// Out of attempts: the event goes `dead`.
    GiveUp,
}

impl BackoffPolicy {
    pub fn validate(&self) -> Result<(), String> {
        if self.initial.is_zero() {
            return Err("backoff initial delay must be positive".into());
        }
        if self.max < self.initial {
            return Err(format!("backoff max {:?} is below initial {:?}", self.max, self.initial));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(format!("backoff multiplier {} must be a finite number >= 1", self.multiplier));
        }
        if self.max_attempts == 0 {
            return Err("maxAttempts must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!("jitter {} must lie in [0, 1]", self.jitter));
        }
        Ok(())
    }

    /// The delay before attempt `attempts + 1` without jitter, where
    /// `attempts` failed attempts have been made (>= 1):
    /// `min(initial * multiplier^(attempts-1), max)`.
    pub fn base_delay(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(1024) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() { self.max } else { Duration::from_secs_f64(secs) }
    }

    /// After `attempts` failed attempts: retry after the base delay scaled by
    /// `1 + jitter * unit` (`unit` in [-1, 1], from the caller's randomness),
    /// capped at `max`, or give up once `attempts >= max_attempts`.
    pub fn after_failure(&self, attempts: u32, unit: f64) -> Retry {
        if attempts >= self.max_attempts {
            return Retry::GiveUp;
        }
        let scaled = self.base_delay(attempts).as_secs_f64() * (1.0 + self.jitter * unit.clamp(-1.0, 1.0));
        Retry::After(Duration::from_secs_f64(scaled.max(0.0)).min(self.max))
    }

    /// The same delays, never giving up (for failures that only time
    /// cures: the delay stays at `max` once it gets there).
    pub fn without_attempt_limit(&self) -> Self {
        Self { max_attempts: u32::MAX, ..*self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_attempt_limit_the_delay_stays_capped() {
        let p = policy().without_attempt_limit();
        assert_eq!(p.after_failure(1_000_000, 0.0), Retry::After(Duration::from_secs(1)));
        assert_eq!(policy().after_failure(6, 0.0), Retry::GiveUp);
    }

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            max_attempts: 6,
            jitter: 0.5,
        }
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let p = policy();
        let ms: Vec<u128> = (1..=6).map(|a| p.base_delay(a).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.base_delay(u32::MAX), p.max);
    }

    #[test]
    fn jitter_scales_within_bounds_and_never_exceeds_max() {
        let p = policy();
        assert_eq!(p.after_failure(1, -1.0), Retry::After(Duration::from_millis(50)));
        assert_eq!(p.after_failure(1, 1.0), Retry::After(Duration::from_millis(150)));
        assert_eq!(p.after_failure(1, 0.0), Retry::After(Duration::from_millis(100)));
        assert_eq!(p.after_failure(5, 1.0), Retry::After(Duration::from_secs(1)));
        assert_eq!(p.after_failure(1, 7.0), Retry::After(Duration::from_millis(150)), "unit is clamped");
    }

    #[test]
    fn gives_up_at_max_attempts() {
        let p = policy();
        assert!(matches!(p.after_failure(5, 0.0), Retry::After(_)));
        assert_eq!(p.after_failure(6, 0.0), Retry::GiveUp);
        let once = BackoffPolicy { max_attempts: 1, ..p };
        assert_eq!(once.after_failure(1, 0.0), Retry::GiveUp);
    }

    #[test]
    fn validation_names_the_bad_setting() {
        assert!(BackoffPolicy::default().validate().is_ok());
        let p = policy();
        assert!(BackoffPolicy { initial: Duration::ZERO, ..p }.validate().unwrap_err().contains("initial"));
        assert!(BackoffPolicy { max: Duration::from_millis(1), ..p }.validate().unwrap_err().contains("max"));
        assert!(BackoffPolicy { multiplier: 0.5, ..p }.validate().unwrap_err().contains("multiplier"));
        assert!(BackoffPolicy { max_attempts: 0, ..p }.validate().unwrap_err().contains("maxAttempts"));
        assert!(BackoffPolicy { jitter: 2.0, ..p }.validate().unwrap_err().contains("jitter"));
    }
}
