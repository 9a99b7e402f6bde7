//! The Session aggregate: a user's login session on one device, with a TTL.
//!
//! Invariants: a TTL lies within the configured bounds; an ended session
//! cannot be refreshed or ended again; an expired session cannot be
//! refreshed. Every change emits a past-tense event and bumps `version`
//! (optimistic concurrency).

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::event::DomainEvent;

pub const AGGREGATE_TYPE: &str = "Session";
/// Longest user id, device and user-agent strings accepted.
pub const MAX_USER_ID_LEN: usize = 128;
pub const MAX_DEVICE_LEN: usize = 128;
pub const MAX_USER_AGENT_LEN: usize = 512;

/// TTL bounds, set by configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    pub min_ttl_seconds: u64,
    pub max_ttl_seconds: u64,
    pub default_ttl_seconds: u64,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        Self { min_ttl_seconds: 60, max_ttl_seconds: 30 * 24 * 3600, default_ttl_seconds: 3600 }
    }
}

/// The longest TTL a policy may allow: 100 years (times stay far inside
/// what dates and BSON can hold).
pub const LONGEST_TTL_SECONDS: u64 = 100 * 365 * 24 * 3600;

impl SessionPolicy {
    /// Check the bounds themselves (configuration errors).
    pub fn validate(&self) -> Result<(), String> {
        if self.min_ttl_seconds == 0 {
            return Err("minimum TTL must be at least 1 second".into());
        }
        if self.min_ttl_seconds > self.max_ttl_seconds {
            return Err(format!(
                "minimum TTL {}s is above maximum TTL {}s",
                self.min_ttl_seconds, self.max_ttl_seconds
            ));
        }
        if self.max_ttl_seconds > LONGEST_TTL_SECONDS {
            return Err(format!(
                "maximum TTL {}s is above the longest supported, {LONGEST_TTL_SECONDS}s (100 years)",
                self.max_ttl_seconds
            ));
        }
        if !(self.min_ttl_seconds..=self.max_ttl_seconds).contains(&self.default_ttl_seconds) {
            return Err(format!(
                "default TTL {}s is outside [{}, {}]",
                self.default_ttl_seconds, self.min_ttl_seconds, self.max_ttl_seconds
            ));
        }
        Ok(())
    }

    fn ttl(&self, requested: Option<u64>) -> Result<Duration, SessionError> {
        let ttl = requested.unwrap_or(self.default_ttl_seconds);
        if !(self.min_ttl_seconds..=self.max_ttl_seconds).contains(&ttl) {
            return Err(SessionError::TtlOutOfRange {
                requested: ttl,
                min: self.min_ttl_seconds,
                max: self.max_ttl_seconds,
            });
        }
        Ok(Duration::seconds(i64::try_from(ttl).unwrap_or(i64::MAX)))
    }
}

/// What a caller did wrong; each names the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("ttlSeconds {requested} is outside the allowed range [{min}, {max}]")]
    TtlOutOfRange { requested: u64, min: u64, max: u64 },
    #[error("{field} must be {rule}")]
    InvalidField { field: &'static str, rule: String },
    #[error("session {0} has ended and cannot be refreshed")]
    RefreshEnded(String),
    #[error("session {0} expired at {1} and cannot be refreshed")]
    RefreshExpired(String, DateTime<Utc>),
    #[error("session {0} has already ended")]
    AlreadyEnded(String),
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndReason {
    /// The user logged out.
    Logout,
    /// An administrator or security system revoked it.
    Revoked,
}

/// Stored status; `Expired` is derived from the clock (see [`Session::status_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    Active,
    Expired,
    Ended,
}

/// What the client told us about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientInfo {
    pub device: Option<String>,
    pub user_agent: Option<String>,
}

/// The aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub id: String,
    pub user_id: String,
    pub client: ClientInfo,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// `Active` or `Ended`; never `Expired` (derived).
    pub status: SessionStatus,
    pub ended_at: Option<DateTime<Utc>>,
    pub end_reason: Option<EndReason>,
    pub refresh_count: u32,
    /// Bumped by every change; starts at 1.
    pub version: u64,
}

/// The command that creates a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSession {
    pub user_id: String,
    pub ttl_seconds: Option<u64>,
    pub client: ClientInfo,
}

/// Events of the Session aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionCreated {
    pub session_id: String,
    pub user_id: String,
    pub device: Option<String>,
    pub user_agent: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionRefreshed {
    pub session_id: String,
    pub user_id: String,
    pub previous_expires_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub refresh_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionEnded {
    pub session_id: String,
    pub user_id: String,
    pub reason: EndReason,
    pub ended_at: DateTime<Utc>,
}

macro_rules! session_event {
    ($ty:ident, $name:literal, $version:literal) => {
        impl DomainEvent for $ty {
            const AGGREGATE_TYPE: &'static str = AGGREGATE_TYPE;
            fn event_name(&self) -> &'static str {
                $name
            }
            fn event_version(&self) -> u32 {
                $version
            }
            fn aggregate_id(&self) -> &str {
                &self.session_id
            }
        }
    };
}
session_event!(SessionCreated, "SessionCreated", 1);
session_event!(SessionRefreshed, "SessionRefreshed", 1);
session_event!(SessionEnded, "SessionEnded", 1);

fn check_text(field: &'static str, value: &str, max: usize, required: bool) -> Result<(), SessionError> {
    let rule = |rule: String| Err(SessionError::InvalidField { field, rule });
    if required && value.trim().is_empty() {
        return rule("a non-empty string".into());
    }
    if value.chars().count() > max {
        return rule(format!("at most {max} characters"));
    }
    if value.chars().any(char::is_control) {
        return rule("free of control characters".into());
    }
    Ok(())
}

impl Session {
    /// Create a session: validates the command and returns the new aggregate
    /// with its `SessionCreated` event.
    pub fn create(
        cmd: CreateSession,
        policy: &SessionPolicy,
        now: DateTime<Utc>,
    ) -> Result<(Session, SessionCreated), SessionError> {
        check_text("userId", &cmd.user_id, MAX_USER_ID_LEN, true)?;
        if let Some(d) = &cmd.client.device {
            check_text("device", d, MAX_DEVICE_LEN, false)?;
        }
        if let Some(ua) = &cmd.client.user_agent {
            check_text("userAgent", ua, MAX_USER_AGENT_LEN, false)?;
        }
        let ttl = policy.ttl(cmd.ttl_seconds)?;
        let session = Session {
            id: Uuid::now_v7().to_string(),
            user_id: cmd.user_id,
            client: cmd.client,
            created_at: now,
            expires_at: now + ttl,
            status: SessionStatus::Active,
            ended_at: None,
            end_reason: None,
            refresh_count: 0,
            version: 1,
        };
        let event = SessionCreated {
            session_id: session.id.clone(),
            user_id: session.user_id.clone(),
            device: session.client.device.clone(),
            user_agent: session.client.user_agent.clone(),
            created_at: session.created_at,
            expires_at: session.expires_at,
        };
        Ok((session, event))
    }

    /// The status as of `now`: an active session past its expiry is `Expired`.
    pub fn status_at(&self, now: DateTime<Utc>) -> SessionStatus {
        match self.status {
            SessionStatus::Active if now >= self.expires_at => SessionStatus::Expired,
            s => s,
        }
    }

    /// Extend the session to `now + ttl`.
    pub fn refresh(
        &mut self,
        ttl_seconds: Option<u64>,
        policy: &SessionPolicy,
        now: DateTime<Utc>,
    ) -> Result<SessionRefreshed, SessionError> {
        match self.status_at(now) {
            SessionStatus::Ended => return Err(SessionError::RefreshEnded(self.id.clone())),
            SessionStatus::Expired => return Err(SessionError::RefreshExpired(self.id.clone(), self.expires_at)),
            SessionStatus::Active => {}
        }
        let ttl = policy.ttl(ttl_seconds)?;
        let previous = self.expires_at;
        self.expires_at = now + ttl;
        self.refresh_count += 1;
        self.version += 1;
        Ok(SessionRefreshed {
            session_id: self.id.clone(),
            user_id: self.user_id.clone(),
            previous_expires_at: previous,
            expires_at: self.expires_at,
            refresh_count: self.refresh_count,
        })
    }

    /// End the session (logout or revocation). An expired session can still
    /// be ended, so the end is recorded; an ended one cannot end twice.
    pub fn end(&mut self, reason: EndReason, now: DateTime<Utc>) -> Result<SessionEnded, SessionError> {
        if self.status == SessionStatus::Ended {
            return Err(SessionError::AlreadyEnded(self.id.clone()));
        }
        self.status = SessionStatus::Ended;
        self.ended_at = Some(now);
        self.end_reason = Some(reason);
        self.version += 1;
        Ok(SessionEnded { session_id: self.id.clone(), user_id: self.user_id.clone(), reason, ended_at: now })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z").unwrap().with_timezone(&Utc)
    }

    fn create(ttl: Option<u64>) -> Result<(Session, SessionCreated), SessionError> {
        Session::create(
            CreateSession {
                user_id: "user-1".into(),
                ttl_seconds: ttl,
                client: ClientInfo { device: Some("phone".into()), user_agent: None },
            },
            &SessionPolicy::default(),
            now(),
        )
    }

    #[test]
    fn create_uses_the_default_ttl_and_emits_session_created() {
        let (s, e) = create(None).unwrap();
        assert_eq!(s.expires_at, now() + Duration::seconds(3600));
        assert_eq!((s.version, s.status, s.refresh_count), (1, SessionStatus::Active, 0));
        assert_eq!(e.session_id, s.id);
        assert_eq!(e.device.as_deref(), Some("phone"));
        assert_eq!((e.event_name(), e.event_version(), e.aggregate_id()), ("SessionCreated", 1, s.id.as_str()));
        assert_eq!(Uuid::parse_str(&s.id).unwrap().get_version_num(), 7);
    }

    #[test]
    fn ttl_must_lie_within_the_policy_bounds() {
        assert!(create(Some(60)).is_ok());
        assert!(create(Some(30 * 24 * 3600)).is_ok());
        assert_eq!(
            create(Some(59)).unwrap_err(),
            SessionError::TtlOutOfRange { requested: 59, min: 60, max: 30 * 24 * 3600 }
        );
        assert!(matches!(create(Some(30 * 24 * 3600 + 1)), Err(SessionError::TtlOutOfRange { .. })));
    }

    #[test]
    fn user_id_device_and_user_agent_are_checked() {
        let policy = SessionPolicy::default();
        let mk = |user: &str, device: Option<String>, ua: Option<String>| {
            Session::create(
                CreateSession {
                    user_id: user.into(),
                    ttl_seconds: None,
                    client: ClientInfo { device, user_agent: ua },
                },
                &policy,
                now(),
            )
        };
        let field = |r: Result<(Session, SessionCreated), SessionError>| match r {
            Err(SessionError::InvalidField { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        };
        assert_eq!(field(mk("  ", None, None)), "userId");
        assert_eq!(field(mk(&"u".repeat(MAX_USER_ID_LEN + 1), None, None)), "userId");
        assert_eq!(field(mk("u\n1", None, None)), "userId");
        assert_eq!(field(mk("u", Some("d".repeat(MAX_DEVICE_LEN + 1)), None)), "device");
        assert_eq!(field(mk("u", None, Some("a".repeat(MAX_USER_AGENT_LEN + 1)))), "userAgent");
        assert!(mk(&"u".repeat(MAX_USER_ID_LEN), None, None).is_ok());
    }

    #[test]
    fn refresh_extends_from_now_and_bumps_version() {
        let (mut s, _) = create(Some(600)).unwrap();
        let later = now() + Duration::seconds(300);
        let e = s.refresh(Some(1200), &SessionPolicy::default(), later).unwrap();
        assert_eq!(s.expires_at, later + Duration::seconds(1200));
        assert_eq!(e.previous_expires_at, now() + Duration::seconds(600));
        assert_eq!((s.version, s.refresh_count, e.refresh_count), (2, 1, 1));
    }

    #[test]
    fn refresh_rejects_out_of_range_ttl_without_changing_anything() {
        let (mut s, _) = create(None).unwrap();
        let before = s.clone();
        assert!(matches!(
            s.refresh(Some(1), &SessionPolicy::default(), now()),
            Err(SessionError::TtlOutOfRange { .. })
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn an_expired_session_cannot_be_refreshed() {
        let (mut s, _) = create(Some(60)).unwrap();
        let after = now() + Duration::seconds(60);
        assert_eq!(s.status_at(after), SessionStatus::Expired);
        let before = s.clone();
        assert!(matches!(s.refresh(None, &SessionPolicy::default(), after), Err(SessionError::RefreshExpired(..))));
        assert_eq!(s, before);
    }

    #[test]
    fn an_ended_session_cannot_be_refreshed_or_ended_again() {
        let (mut s, _) = create(None).unwrap();
        let e = s.end(EndReason::Logout, now()).unwrap();
        assert_eq!((e.reason, s.status, s.version), (EndReason::Logout, SessionStatus::Ended, 2));
        let before = s.clone();
        assert!(matches!(s.refresh(None, &SessionPolicy::default(), now()), Err(SessionError::RefreshEnded(_))));
        assert!(matches!(s.end(EndReason::Revoked, now()), Err(SessionError::AlreadyEnded(_))));
        assert_eq!(s, before);
    }

    #[test]
    fn an_expired_session_can_still_be_ended() {
        let (mut s, _) = create(Some(60)).unwrap();
        let e = s.end(EndReason::Revoked, now() + Duration::hours(1)).unwrap();
        assert_eq!(e.reason, EndReason::Revoked);
        assert_eq!(s.status_at(now() + Duration::hours(2)), SessionStatus::Ended);
    }

    #[test]
    fn policy_validation() {
        assert!(SessionPolicy::default().validate().is_ok());
        let bad = SessionPolicy { min_ttl_seconds: 10, max_ttl_seconds: 5, default_ttl_seconds: 7 };
        assert!(bad.validate().unwrap_err().contains("above maximum"));
        let bad = SessionPolicy { min_ttl_seconds: 10, max_ttl_seconds: 50, default_ttl_seconds: 70 };
        assert!(bad.validate().unwrap_err().contains("default TTL"));
    }
}
