//! `EventTopicMapper`: which Kafka topic an event goes to. Pure.
//!
//! Rules are `AggregateType=topic` or `AggregateType.EventName=topic`; the
//! most specific match wins. Unmatched events go to
//! `<aggregate-type-in-kebab-case>-events.v1` (sessions: `session-events.v1`).

/// One routing rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRule {
    pub aggregate_type: String,
    pub event_name: Option<String>,
    pub topic: String,
}

impl std::str::FromStr for TopicRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (selector, topic) =
            s.split_once('=').ok_or_else(|| format!("route '{s}' must look like Aggregate[.Event]=topic"))?;
        let (aggregate_type, event_name) = match selector.split_once('.') {
            Some((a, e)) => (a.trim(), Some(e.trim().to_owned())),
            None => (selector.trim(), None),
        };
        if aggregate_type.is_empty() || event_name.as_deref() == Some("") {
            return Err(format!("route '{s}': the aggregate type and event name must not be empty"));
        }
        let topic = topic.trim();
        validate_topic(topic).map_err(|e| format!("route '{s}': {e}"))?;
        Ok(Self { aggregate_type: aggregate_type.to_owned(), event_name, topic: topic.to_owned() })
    }
}

/// Kafka's topic name rules: 1-249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 249 {
        return Err(format!("topic '{topic}' must have 1 to 249 characters"));
    }
    if topic == "." || topic == ".." {
        return Err(format!("topic '{topic}' is not allowed"));
    }
    if let Some(c) = topic.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("topic '{topic}' contains '{c}'; only letters, digits, '.', '_' and '-' are allowed"));
    }
    Ok(())
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventTopicMapper {
    rules: Vec<TopicRule>,
}

fn kebab(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
            out.push(c);
        } else {
            out.push('-');
        }
    }
    out
}

impl EventTopicMapper {
    pub fn new(rules: Vec<TopicRule>) -> Self {
        Self { rules }
    }

    pub fn topic_for(&self, aggregate_type: &str, event_name: &str) -> String {
        let exact = self
            .rules
            .iter()
            .find(|r| r.aggregate_type == aggregate_type && r.event_name.as_deref() == Some(event_name));
        let by_aggregate = || self.rules.iter().find(|r| r.aggregate_type == aggregate_type && r.event_name.is_none());
        match exact.or_else(by_aggregate) {
            Some(rule) => rule.topic.clone(),
            None => format!("{}-events.v1", kebab(aggregate_type)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_topic_is_the_kebab_aggregate_type() {
        let m = EventTopicMapper::default();
        assert_eq!(m.topic_for("Session", "SessionCreated"), "session-events.v1");
        assert_eq!(m.topic_for("UserAccount", "UserRenamed"), "user-account-events.v1");
    }

    #[test]
    fn the_most_specific_rule_wins() {
        let m = EventTopicMapper::new(vec![
            "Session=sessions.v2".parse().unwrap(),
            "Session.SessionEnded=session-ends.v1".parse().unwrap(),
        ]);
        assert_eq!(m.topic_for("Session", "SessionCreated"), "sessions.v2");
        assert_eq!(m.topic_for("Session", "SessionEnded"), "session-ends.v1");
        assert_eq!(m.topic_for("Order", "OrderPlaced"), "order-events.v1");
    }

    #[test]
    fn bad_rules_are_rejected_with_the_reason() {
        assert!("Session".parse::<TopicRule>().unwrap_err().contains("Aggregate[.Event]=topic"));
        assert!("=t".parse::<TopicRule>().unwrap_err().contains("must not be empty"));
        assert!("Session.=t".parse::<TopicRule>().unwrap_err().contains("must not be empty"));
        assert!("Session=bad topic".parse::<TopicRule>().unwrap_err().contains("' '"));
        assert!("Session=..".parse::<TopicRule>().is_err());
        assert!("Session=".parse::<TopicRule>().is_err());
        assert!(validate_topic(&"t".repeat(250)).is_err());
    }
}
