//! The registry's state: schemas by id, subjects with their versions, and
//! compatibility settings, persisted to one JSON file (rewritten atomically
//! after every change). Deletion follows the Confluent semantics: a soft
//! delete hides a subject or version, a permanent delete (only after a soft
//! one) removes it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use apache_avro::Schema;
use serde::{Deserialize, Serialize};

use super::compat::{self, CompatibilityLevel};

/// An error with the HTTP status and `error_code` the Confluent registry uses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("Subject '{0}' not found.")]
    SubjectNotFound(String),
    #[error("Version {0} not found.")]
    VersionNotFound(String),
    #[error("Schema {0} not found")]
    SchemaNotFound(String),
    #[error("Subject '{0}' was soft deleted. Set permanent=true to delete permanently")]
    SubjectSoftDeleted(String),
    #[error("Subject '{0}' was not deleted first before being permanently deleted")]
    SubjectNotSoftDeleted(String),
    #[error("Version {1} of subject '{0}' was not deleted first before being permanently deleted")]
    VersionNotSoftDeleted(String, u32),
    #[error("Subject '{0}' does not have subject-level compatibility configured")]
    SubjectCompatibilityNotConfigured(String),
    #[error("Invalid schema: {0}")]
    InvalidSchema(String),
    #[error(
        "The specified version '{0}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
    )]
    InvalidVersion(String),
    #[error("{0}")]
    InvalidCompatibilityLevel(String),
    #[error("Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{}]", .reasons.join("; "))]
    Incompatible { subject: String, reasons: Vec<String> },
    #[error("Invalid request body: {0}")]
    BadRequest(String),
    #[error("Error in the backend data store: {0}")]
    Storage(String),
}

impl RegistryError {
    /// (HTTP status, Confluent `error_code`)
    pub fn codes(&self) -> (u16, u32) {
        match self {
            Self::SubjectNotFound(_) => (404, 40401),
            Self::VersionNotFound(_) => (404, 40402),
            Self::SchemaNotFound(_) => (404, 40403),
            Self::SubjectSoftDeleted(_) => (404, 40404),
            Self::SubjectNotSoftDeleted(_) => (404, 40405),
            Self::VersionNotSoftDeleted(..) => (404, 40407),
            Self::SubjectCompatibilityNotConfigured(_) => (404, 40408),
            Self::InvalidSchema(_) => (422, 42201),
            Self::InvalidVersion(_) => (422, 42202),
            Self::InvalidCompatibilityLevel(_) => (422, 42203),
            Self::Incompatible { .. } => (409, 409),
            Self::BadRequest(_) => (400, 400),
            Self::Storage(_) => (500, 50001),
        }
    }
}

type RResult<T> = std::result::Result<T, RegistryError>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSchema {
    /// The schema text as first registered.
    schema: String,
    /// Identity of the schema: its full parsed form (defaults and docs
    /// included, unlike Avro's parsing canonical form) serialized as JSON.
    normalized: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SubjectVersion {
    version: u32,
    id: u32,
    #[serde(default)]
    deleted: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    /// File format version of this state file.
    format: u32,
    schemas: BTreeMap<u32, StoredSchema>,
    subjects: BTreeMap<String, Vec<SubjectVersion>>,
    #[serde(default)]
    compatibility: CompatibilityLevel,
    #[serde(default)]
    subject_compatibility: BTreeMap<String, CompatibilityLevel>,
}

const STATE_FORMAT: u32 = 1;

/// One registered version of a subject, as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    pub subject: String,
    pub version: u32,
    pub id: u32,
    pub schema: String,
}

/// Which version of a subject a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRef {
    Latest,
    Number(u32),
}

impl VersionRef {
    pub fn parse(s: &str) -> RResult<Self> {
        if s == "latest" || s == "-1" {
            return Ok(Self::Latest);
        }
        match s.parse::<u32>() {
            Ok(n) if (1..=i32::MAX as u32).contains(&n) => Ok(Self::Number(n)),
            _ => Err(RegistryError::InvalidVersion(s.to_owned())),
        }
    }
}

/// Parse an Avro schema and give its identity key.
pub fn parse_avro(text: &str) -> RResult<(Schema, String)> {
    let schema = Schema::parse_str(text).map_err(|e| RegistryError::InvalidSchema(e.to_string()))?;
    let normalized = serde_json::to_string(&schema).map_err(|e| RegistryError::InvalidSchema(e.to_string()))?;
    Ok((schema, normalized))
}

pub struct Store {
    path: Option<PathBuf>,
    state: Mutex<State>,
}

impl Store {
    /// A store kept in memory only.
    pub fn in_memory() -> Self {
        Self { path: None, state: Mutex::new(State { format: STATE_FORMAT, ..State::default() }) }
    }

    /// Open (or create) the store persisted at `path`.
    pub fn open(path: &Path) -> crate::Result<Self> {
        let state = match std::fs::read(path) {
            Ok(bytes) => {
                let state: State = serde_json::from_slice(&bytes)?;
                if state.format != STATE_FORMAT {
                    return Err(crate::Error::StateFormat(format!(
                        "{} has registry state format {}, this build reads format {STATE_FORMAT}",
                        path.display(),
                        state.format
                    )));
                }
                state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State { format: STATE_FORMAT, ..State::default() },
            Err(source) => return Err(crate::Error::Io { path: path.display().to_string(), source }),
        };
        Ok(Self { path: Some(path.to_owned()), state: Mutex::new(state) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-changed:
        // every mutation is applied to a clone first (see `mutate`).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Apply `f` to a copy of the state; persist and swap it in only if `f`
    /// succeeds and the file is written, so a failure changes nothing.
    fn mutate<T>(&self, f: impl FnOnce(&mut State) -> RResult<T>) -> RResult<T> {
        let mut guard = self.lock();
        let mut next = guard.clone();
        let out = f(&mut next)?;
        if let Some(path) = &self.path {
            persist(path, &next).map_err(|e| RegistryError::Storage(e.to_string()))?;
        }
        *guard = next;
        Ok(out)
    }

    pub fn subjects(&self, include_deleted: bool) -> Vec<String> {
        let st = self.lock();
        st.subjects
            .iter()
            .filter(|(_, vs)| vs.iter().any(|v| include_deleted || !v.deleted))
            .map(|(s, _)| s.clone())
            .collect()
    }

    pub fn versions(&self, subject: &str, include_deleted: bool) -> RResult<Vec<u32>> {
        let st = self.lock();
        let versions: Vec<u32> = live(&st, subject, include_deleted).map(|v| v.version).collect();
        if versions.is_empty() {
            return Err(RegistryError::SubjectNotFound(subject.to_owned()));
        }
        Ok(versions)
    }

    pub fn version(&self, subject: &str, version: VersionRef, include_deleted: bool) -> RResult<VersionInfo> {
        let st = self.lock();
        find_version(&st, subject, version, include_deleted)
    }

    pub fn schema_by_id(&self, id: u32) -> RResult<String> {
        let st = self.lock();
        st.schemas.get(&id).map(|s| s.schema.clone()).ok_or_else(|| RegistryError::SchemaNotFound(id.to_string()))
    }

    /// (subject, version) pairs that use schema `id`.
    pub fn id_usages(&self, id: u32) -> RResult<Vec<(String, u32)>> {
        let st = self.lock();
        if !st.schemas.contains_key(&id) {
            return Err(RegistryError::SchemaNotFound(id.to_string()));
        }
        Ok(st
            .subjects
            .iter()
            .flat_map(|(s, vs)| vs.iter().filter(|v| v.id == id && !v.deleted).map(move |v| (s.clone(), v.version)))
            .collect())
    }

    /// Register `text` under `subject`: returns the existing id when the
    /// subject already has this schema, otherwise checks compatibility and
    /// adds a version (reusing the id of an identical schema elsewhere).
    pub fn register(&self, subject: &str, text: &str) -> RResult<u32> {
        let (schema, normalized) = parse_avro(text)?;
        self.mutate(|st| {
            if let Some(v) = live(st, subject, false).find(|v| st.schemas[&v.id].normalized == normalized) {
                return Ok(v.id);
            }
            let previous = parsed_versions(st, subject)?;
            let level = effective_level(st, subject);
            let reasons = compat::check(level, &schema, &previous);
            if !reasons.is_empty() {
                return Err(RegistryError::Incompatible { subject: subject.to_owned(), reasons });
            }
            let id = match st.schemas.iter().find(|(_, s)| s.normalized == normalized) {
                Some((id, _)) => *id,
                None => {
                    let id = st.schemas.keys().next_back().map_or(1, |m| m + 1);
                    st.schemas.insert(id, StoredSchema { schema: text.to_owned(), normalized: normalized.clone() });
                    id
                }
            };
            let versions = st.subjects.entry(subject.to_owned()).or_default();
            let version = versions.iter().map(|v| v.version).max().map_or(1, |m| m + 1);
            versions.push(SubjectVersion { version, id, deleted: false });
            Ok(id)
        })
    }

    /// Find `text` among the versions of `subject`.
    pub fn lookup(&self, subject: &str, text: &str, include_deleted: bool) -> RResult<VersionInfo> {
        let (_, normalized) = parse_avro(text)?;
        let st = self.lock();
        let mut versions = live(&st, subject, include_deleted).peekable();
        if versions.peek().is_none() {
            return Err(RegistryError::SubjectNotFound(subject.to_owned()));
        }
        versions
            .find(|v| st.schemas[&v.id].normalized == normalized)
            .map(|v| VersionInfo {
                subject: subject.to_owned(),
                version: v.version,
                id: v.id,
                schema: st.schemas[&v.id].schema.clone(),
            })
            .ok_or_else(|| RegistryError::SchemaNotFound(format!("under subject '{subject}'")))
    }

    /// Compatibility of `text` with one version of `subject`, or (`None`)
    /// with the versions the subject's level asks for. Returns the reasons
    /// it is incompatible; empty means compatible.
    pub fn check_compatibility(&self, subject: &str, version: Option<VersionRef>, text: &str) -> RResult<Vec<String>> {
        let (schema, _) = parse_avro(text)?;
        let st = self.lock();
        let level = effective_level(&st, subject);
        match version {
            Some(v) => {
                let info = find_version(&st, subject, v, false)?;
                let (old, _) = parse_avro(&info.schema)?;
                Ok(compat::check_each(level, &schema, [(info.version as usize, &old)]))
            }
            None => {
                let previous = parsed_versions(&st, subject)?;
                Ok(compat::check(level, &schema, &previous))
            }
        }
    }

    /// Delete a subject: soft (hide its versions) or permanent (only after soft).
    pub fn delete_subject(&self, subject: &str, permanent: bool) -> RResult<Vec<u32>> {
        self.mutate(|st| {
            let versions =
                st.subjects.get_mut(subject).ok_or_else(|| RegistryError::SubjectNotFound(subject.into()))?;
            if permanent {
                if versions.iter().any(|v| !v.deleted) {
                    return Err(RegistryError::SubjectNotSoftDeleted(subject.to_owned()));
                }
                let removed = versions.iter().map(|v| v.version).collect();
                st.subjects.remove(subject);
                st.subject_compatibility.remove(subject);
                return Ok(removed);
            }
            let live: Vec<u32> = versions.iter().filter(|v| !v.deleted).map(|v| v.version).collect();
            if live.is_empty() {
                return Err(RegistryError::SubjectSoftDeleted(subject.to_owned()));
            }
            versions.iter_mut().for_each(|v| v.deleted = true);
            Ok(live)
        })
    }

    /// Delete one version: soft, or permanent (only after soft).
    pub fn delete_version(&self, subject: &str, version: VersionRef, permanent: bool) -> RResult<u32> {
        self.mutate(|st| {
            let info = find_version(st, subject, version, permanent)?;
            let versions = st.subjects.get_mut(subject).expect("find_version found the subject");
            let pos = versions.iter().position(|v| v.version == info.version).expect("version exists");
            if permanent {
                if !versions[pos].deleted {
                    return Err(RegistryError::VersionNotSoftDeleted(subject.to_owned(), info.version));
                }
                versions.remove(pos);
                if versions.is_empty() {
                    st.subjects.remove(subject);
                }
            } else {
                versions[pos].deleted = true;
            }
            Ok(info.version)
        })
    }

    pub fn global_level(&self) -> CompatibilityLevel {
        self.lock().compatibility
    }

    pub fn subject_level(&self, subject: &str, default_to_global: bool) -> RResult<CompatibilityLevel> {
        let st = self.lock();
        match st.subject_compatibility.get(subject) {
            Some(level) => Ok(*level),
            None if default_to_global => Ok(st.compatibility),
            None => Err(RegistryError::SubjectCompatibilityNotConfigured(subject.to_owned())),
        }
    }

    pub fn set_level(&self, subject: Option<&str>, level: CompatibilityLevel) -> RResult<()> {
        self.mutate(|st| {
            match subject {
                Some(s) => {
                    st.subject_compatibility.insert(s.to_owned(), level);
                }
                None => st.compatibility = level,
            }
            Ok(())
        })
    }

    pub fn delete_subject_level(&self, subject: &str) -> RResult<CompatibilityLevel> {
        self.mutate(|st| {
            st.subject_compatibility
                .remove(subject)
                .ok_or_else(|| RegistryError::SubjectCompatibilityNotConfigured(subject.to_owned()))
        })
    }
}

fn live<'a>(st: &'a State, subject: &str, include_deleted: bool) -> impl Iterator<Item = &'a SubjectVersion> {
    st.subjects.get(subject).into_iter().flatten().filter(move |v| include_deleted || !v.deleted)
}

fn find_version(st: &State, subject: &str, version: VersionRef, include_deleted: bool) -> RResult<VersionInfo> {
    let mut versions = live(st, subject, include_deleted).peekable();
    if versions.peek().is_none() {
        return Err(RegistryError::SubjectNotFound(subject.to_owned()));
    }
    let found = match version {
        VersionRef::Latest => versions.max_by_key(|v| v.version),
        VersionRef::Number(n) => versions.find(|v| v.version == n),
    };
    let v = found.ok_or_else(|| {
        RegistryError::VersionNotFound(match version {
            VersionRef::Latest => "latest".to_owned(),
            VersionRef::Number(n) => n.to_string(),
        })
    })?;
    Ok(VersionInfo {
        subject: subject.to_owned(),
        version: v.version,
        id: v.id,
        schema: st.schemas[&v.id].schema.clone(),
    })
}

/// The live versions of a subject, oldest first, parsed.
fn parsed_versions(st: &State, subject: &str) -> RResult<Vec<Schema>> {
    live(st, subject, false)
        .map(|v| {
            parse_avro(&st.schemas[&v.id].schema)
                .map(|(s, _)| s)
                .map_err(|e| RegistryError::Storage(format!("stored schema {} no longer parses: {e}", v.id)))
        })
        .collect()
}

fn effective_level(st: &State, subject: &str) -> CompatibilityLevel {
    st.subject_compatibility.get(subject).copied().unwrap_or(st.compatibility)
}

fn persist(path: &Path, state: &State) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"{"type":"record","name":"E","fields":[{"name":"id","type":"string"}]}"#;
    const V2: &str = r#"{"type":"record","name":"E","fields":[{"name":"id","type":"string"},{"name":"n","type":"int","default":0}]}"#;
    const BAD: &str = r#"{"type":"record","name":"E","fields":[{"name":"id","type":"int"}]}"#;

    #[test]
    fn registering_twice_returns_the_same_id_and_version() {
        let s = Store::in_memory();
        let id = s.register("a-value", V1).unwrap();
        assert_eq!(s.register("a-value", V1).unwrap(), id);
        assert_eq!(s.versions("a-value", false).unwrap(), vec![1]);
        // Whitespace does not make a different schema.
        assert_eq!(s.register("a-value", &V1.replace(',', " , ")).unwrap(), id);
    }

    #[test]
    fn the_same_schema_under_two_subjects_shares_its_id() {
        let s = Store::in_memory();
        assert_eq!(s.register("a-value", V1).unwrap(), s.register("b-value", V1).unwrap());
    }

    #[test]
    fn a_default_makes_a_different_schema() {
        let s = Store::in_memory();
        let with_default = r#"{"type":"record","name":"E","fields":[{"name":"id","type":"string","default":"x"}]}"#;
        assert_ne!(s.register("a", V1).unwrap(), s.register("a", with_default).unwrap());
    }

    #[test]
    fn incompatible_change_is_rejected_and_changes_nothing() {
        let s = Store::in_memory();
        s.register("a", V1).unwrap();
        let err = s.register("a", BAD).unwrap_err();
        assert_eq!(err.codes(), (409, 409));
        assert_eq!(s.versions("a", false).unwrap(), vec![1]);
        assert_eq!(s.register("a", V2).unwrap(), 2);
        s.set_level(Some("a"), CompatibilityLevel::None).unwrap();
        assert_eq!(s.register("a", BAD).unwrap(), 3);
    }

    #[test]
    fn invalid_schema_is_42201() {
        let s = Store::in_memory();
        assert_eq!(s.register("a", "{not json").unwrap_err().codes(), (422, 42201));
        assert_eq!(s.register("a", r#"{"type":"recordz"}"#).unwrap_err().codes(), (422, 42201));
        assert!(s.subjects(true).is_empty());
    }

    #[test]
    fn lookup_distinguishes_missing_subject_from_missing_schema() {
        let s = Store::in_memory();
        assert_eq!(s.lookup("a", V1, false).unwrap_err().codes().1, 40401);
        s.register("a", V1).unwrap();
        assert_eq!(s.lookup("a", V2, false).unwrap_err().codes().1, 40403);
        let info = s.lookup("a", V1, false).unwrap();
        assert_eq!((info.version, info.id), (1, 1));
    }

    #[test]
    fn versions_resolve_latest_and_reject_invalid_numbers() {
        let s = Store::in_memory();
        s.register("a", V1).unwrap();
        s.register("a", V2).unwrap();
        assert_eq!(s.version("a", VersionRef::Latest, false).unwrap().version, 2);
        assert_eq!(s.version("a", VersionRef::Number(3), false).unwrap_err().codes().1, 40402);
        assert_eq!(VersionRef::parse("0").unwrap_err().codes().1, 42202);
        assert_eq!(VersionRef::parse("x").unwrap_err().codes().1, 42202);
        assert_eq!(VersionRef::parse("-1").unwrap(), VersionRef::Latest);
    }

    #[test]
    fn soft_then_permanent_delete() {
        let s = Store::in_memory();
        s.register("a", V1).unwrap();
        assert_eq!(s.delete_subject("a", true).unwrap_err().codes().1, 40405);
        assert_eq!(s.delete_subject("a", false).unwrap(), vec![1]);
        assert!(s.subjects(false).is_empty());
        assert_eq!(s.subjects(true), vec!["a".to_owned()]);
        assert_eq!(s.delete_subject("a", false).unwrap_err().codes().1, 40404);
        // Re-registering after a soft delete continues the version numbers.
        s.register("a", V1).unwrap();
        assert_eq!(s.versions("a", false).unwrap(), vec![2]);
        s.delete_subject("a", false).unwrap();
        assert_eq!(s.delete_subject("a", true).unwrap(), vec![1, 2]);
        assert!(s.subjects(true).is_empty());
        // The schema itself stays addressable by id.
        assert_eq!(s.schema_by_id(1).unwrap(), V1);
    }

    #[test]
    fn subject_level_config_defaults_to_global_only_when_asked() {
        let s = Store::in_memory();
        assert_eq!(s.subject_level("a", false).unwrap_err().codes().1, 40408);
        assert_eq!(s.subject_level("a", true).unwrap(), CompatibilityLevel::Backward);
        s.set_level(None, CompatibilityLevel::Full).unwrap();
        s.set_level(Some("a"), CompatibilityLevel::None).unwrap();
        assert_eq!(s.subject_level("a", false).unwrap(), CompatibilityLevel::None);
        assert_eq!(s.delete_subject_level("a").unwrap(), CompatibilityLevel::None);
        assert_eq!(s.subject_level("a", true).unwrap(), CompatibilityLevel::Full);
    }

    #[test]
    fn state_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("outbox-registry-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("schemas.json");
        let _ = std::fs::remove_file(&path);
        {
            let s = Store::open(&path).unwrap();
            s.register("a", V1).unwrap();
            s.set_level(Some("a"), CompatibilityLevel::Full).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.lookup("a", V1, false).unwrap().id, 1);
        assert_eq!(s.subject_level("a", false).unwrap(), CompatibilityLevel::Full);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
