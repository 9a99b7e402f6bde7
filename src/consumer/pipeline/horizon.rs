//! The dedup horizon: a record older than the processed-events retention
//! may have been applied and its mark forgotten. Pure.

use std::time::Duration;

/// Allowance for clock skew between the producer of a record and this
/// consumer when telling its age.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The age of a record whose timestamp (`ts_ms`) is older than the
/// processed-events `retention`, less the clock-skew allowance: its
/// processed mark, written after it was produced, may have expired.
/// `None` for a younger record or one without a timestamp.
pub fn beyond_horizon(ts_ms: Option<i64>, now_ms: i64, retention: Duration) -> Option<Duration> {
    let age = Duration::from_millis(u64::try_from(now_ms - ts_ms?).ok()?);
    (age + CLOCK_SKEW > retention).then_some(age)
}

pub(super) fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_older_than_the_retention_less_the_skew_allowance_is_beyond_the_horizon() {
        let hour = Duration::from_secs(3600);
        let now = 10_000_000_000;
        assert_eq!(beyond_horizon(Some(now - 1000), now, hour), None);
        assert_eq!(beyond_horizon(Some(now - 3_539_000), now, hour), None, "59 min: inside");
        assert_eq!(beyond_horizon(Some(now - 3_541_000), now, hour), Some(Duration::from_secs(3541)));
        assert_eq!(beyond_horizon(Some(now + 5000), now, hour), None, "from the future: young");
        assert_eq!(beyond_horizon(None, now, hour), None, "no timestamp: cannot tell");
    }
}
