//! Avro compatibility rules of the Confluent Schema Registry, decided by
//! apache-avro's schema resolution. Pure: no I/O.

use std::{fmt, str::FromStr};

use apache_avro::{
    Schema,
    schema_compatibility::{Compatibility, SchemaCompatibility},
};
use serde::{Deserialize, Serialize};

/// A subject's (or the registry's global) compatibility level, with the
/// names and meaning the Confluent Schema Registry gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CompatibilityLevel {
    None,
    /// The new schema can read data written with the latest one.
    #[default]
    Backward,
    /// ... with every earlier one.
    BackwardTransitive,
    /// Data written with the new schema can be read with the latest one.
    Forward,
    ForwardTransitive,
    /// Backward and forward.
    Full,
    FullTransitive,
}

impl CompatibilityLevel {
    pub const ALL: [CompatibilityLevel; 7] = [
        Self::None,
        Self::Backward,
        Self::BackwardTransitive,
        Self::Forward,
        Self::ForwardTransitive,
        Self::Full,
        Self::FullTransitive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Backward => "BACKWARD",
            Self::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Self::Forward => "FORWARD",
            Self::ForwardTransitive => "FORWARD_TRANSITIVE",
            Self::Full => "FULL",
            Self::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    fn transitive(self) -> bool {
        matches!(self, Self::BackwardTransitive | Self::ForwardTransitive | Self::FullTransitive)
    }

    /// (new schema must read old data, old schema must read new data)
    fn directions(self) -> (bool, bool) {
        match self {
            Self::None => (false, false),
            Self::Backward | Self::BackwardTransitive => (true, false),
            Self::Forward | Self::ForwardTransitive => (false, true),
            Self::Full | Self::FullTransitive => (true, true),
        }
    }
}

impl fmt::Display for CompatibilityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CompatibilityLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|l| l.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| {
            format!(
                "Invalid compatibility level '{s}'. Valid values are none, backward, forward, full, \
                     backward_transitive, forward_transitive, and full_transitive"
            )
        })
    }
}

/// Whether `reader` can read everything written with `writer`. Avro's
/// "partial" compatibility (only some union branches resolve) counts as
/// incompatible, as in the Confluent registry.
fn readable(writer: &Schema, reader: &Schema) -> Result<(), String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => Ok(()),
        Ok(Compatibility::Partial) => Err("only some branches of a union resolve".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// Check `new` against the `previous` versions of a subject (oldest first)
/// under `level`: against the latest only, or all of them for the
/// transitive levels. Returns the reasons it is incompatible; empty means
/// compatible.
pub fn check(level: CompatibilityLevel, new: &Schema, previous: &[Schema]) -> Vec<String> {
    let against: &[Schema] =
        if level.transitive() { previous } else { previous.last().map(std::slice::from_ref).unwrap_or_default() };
    check_each(level, new, against.iter().enumerate().map(|(i, s)| (i + previous.len() - against.len() + 1, s)))
}

/// Check `new` against specific versions, each given with its version
/// number for the messages, in the directions `level` asks for.
pub fn check_each<'a>(
    level: CompatibilityLevel,
    new: &Schema,
    versions: impl IntoIterator<Item = (usize, &'a Schema)>,
) -> Vec<String> {
    let (backward, forward) = level.directions();
    let mut reasons = Vec::new();
    for (version, old) in versions {
        if backward && let Err(e) = readable(old, new) {
            reasons.push(format!("new schema cannot read data written with version {version} ({level}): {e}"));
        }
        if forward && let Err(e) = readable(new, old) {
            reasons.push(format!("version {version} cannot read data written with the new schema ({level}): {e}"));
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &str) -> Schema {
        Schema::parse_str(&format!(r#"{{"type":"record","name":"E","namespace":"t","fields":[{fields}]}}"#))
            .expect("test schema parses")
    }

    fn v1() -> Schema {
        schema(r#"{"name":"id","type":"string"}"#)
    }
    fn with_defaulted_field() -> Schema {
        schema(r#"{"name":"id","type":"string"},{"name":"n","type":"int","default":0}"#)
    }
    fn with_required_field() -> Schema {
        schema(r#"{"name":"id","type":"string"},{"name":"n","type":"int"}"#)
    }

    #[test]
    fn adding_a_field_with_default_is_backward_and_forward_compatible() {
        assert!(check(CompatibilityLevel::Backward, &with_defaulted_field(), &[v1()]).is_empty());
        assert!(check(CompatibilityLevel::Full, &with_defaulted_field(), &[v1()]).is_empty());
    }

    #[test]
    fn adding_a_required_field_breaks_backward_but_not_forward() {
        let reasons = check(CompatibilityLevel::Backward, &with_required_field(), &[v1()]);
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].contains("version 1"), "{reasons:?}");
        assert!(reasons[0].contains("'n'"), "{reasons:?}");
        assert!(check(CompatibilityLevel::Forward, &with_required_field(), &[v1()]).is_empty());
    }

    #[test]
    fn removing_a_field_without_default_breaks_forward() {
        // Old readers need `n`, which the new writer no longer writes.
        let reasons = check(CompatibilityLevel::Forward, &v1(), &[with_required_field()]);
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(check(CompatibilityLevel::Backward, &v1(), &[with_required_field()]).is_empty());
    }

    #[test]
    fn changing_a_type_incompatibly_is_rejected_and_none_accepts_anything() {
        let changed = schema(r#"{"name":"id","type":"int"}"#);
        assert!(!check(CompatibilityLevel::Backward, &changed, &[v1()]).is_empty());
        assert!(check(CompatibilityLevel::None, &changed, &[v1()]).is_empty());
    }

    #[test]
    fn promotion_int_to_long_is_backward_compatible_only() {
        let int = schema(r#"{"name":"n","type":"int"}"#);
        let long = schema(r#"{"name":"n","type":"long"}"#);
        assert!(check(CompatibilityLevel::Backward, &long, std::slice::from_ref(&int)).is_empty());
        assert!(!check(CompatibilityLevel::Full, &long, &[int]).is_empty());
    }

    #[test]
    fn transitive_levels_check_every_earlier_version() {
        // v1 -> v2 (adds required n: backward-incompatible with v1, but registered under NONE)
        // -> v3 (drops nothing, compatible with v2 only).
        let v2 = with_required_field();
        let v3 =
            schema(r#"{"name":"id","type":"string"},{"name":"n","type":"int"},{"name":"m","type":"int","default":1}"#);
        let history = [v1(), v2];
        assert!(check(CompatibilityLevel::Backward, &v3, &history).is_empty());
        let reasons = check(CompatibilityLevel::BackwardTransitive, &v3, &history);
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].contains("version 1"), "{reasons:?}");
    }

    #[test]
    fn partial_union_compatibility_counts_as_incompatible() {
        let union = schema(r#"{"name":"v","type":["int","string"]}"#);
        let int = schema(r#"{"name":"v","type":"int"}"#);
        assert!(!check(CompatibilityLevel::Backward, &int, &[union]).is_empty());
    }

    #[test]
    fn first_version_is_always_compatible() {
        assert!(check(CompatibilityLevel::FullTransitive, &v1(), &[]).is_empty());
    }

    #[test]
    fn levels_parse_case_insensitively_and_reject_unknown_names() {
        for level in CompatibilityLevel::ALL {
            assert_eq!(level.as_str().to_lowercase().parse::<CompatibilityLevel>(), Ok(level));
        }
        let err = "SIDEWAYS".parse::<CompatibilityLevel>().unwrap_err();
        assert!(err.contains("backward_transitive"), "{err}");
    }
}
