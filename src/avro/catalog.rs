//! A catalog of event schemas read from files, so that a relay and its
//! consumers work with any application's events without a new image: a
//! directory (a mounted ConfigMap in a pod, `schemas/` in the repository)
//! or a set of named texts (a ConfigMap read by the operator).
//!
//! The rule mapping an outbox row to its file: the row's `aggregateType`,
//! `eventName` and `eventVersion` name the file
//! `<aggregateType>.<eventName>.v<eventVersion>.avsc`, anywhere below the
//! directory (`Order.OrderPlaced.v1.avsc`; an aggregate type may hold dots,
//! an event name may not). Files and folders whose names start with a dot
//! are skipped (a ConfigMap volume's `..data` links), other files that do
//! not end in `.avsc` are ignored. A file named against the rule or holding
//! a schema that does not parse is reported by [`Catalog::broken`] and
//! stops nothing else.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use apache_avro::Schema;

/// Which event a schema is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SchemaKey {
    pub aggregate_type: String,
    pub event_name: String,
    pub version: u32,
}

impl SchemaKey {
    /// The key a file name states, or why it states none.
    pub fn from_file_name(name: &str) -> Result<Self, String> {
        let rule = "not named <aggregateType>.<eventName>.v<version>.avsc";
        let stem = name.strip_suffix(".avsc").ok_or_else(|| rule.to_owned())?;
        let (rest, version) = stem.rsplit_once('.').ok_or_else(|| rule.to_owned())?;
        let version: u32 = version
            .strip_prefix('v')
            .and_then(|v| v.parse().ok())
            .filter(|v| *v >= 1)
            .ok_or_else(|| format!("{rule} (the version is v1, v2, ...)"))?;
        let (aggregate_type, event_name) = rest.rsplit_once('.').ok_or_else(|| rule.to_owned())?;
        if aggregate_type.is_empty() || event_name.is_empty() {
            return Err(rule.to_owned());
        }
        Ok(Self { aggregate_type: aggregate_type.to_owned(), event_name: event_name.to_owned(), version })
    }

    /// The file this key reads from.
    pub fn file_name(&self) -> String {
        format!("{}.{}.v{}.avsc", self.aggregate_type, self.event_name, self.version)
    }
}

impl fmt::Display for SchemaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{} v{}", self.aggregate_type, self.event_name, self.version)
    }
}

/// One event schema, parsed.
#[derive(Debug, Clone)]
pub struct CompiledSchema {
    pub key: SchemaKey,
    /// Where it was read from (a path, or a ConfigMap key).
    pub file: String,
    /// The text as written: what is registered.
    pub text: String,
    pub schema: Schema,
    /// The record's full name, e.g. `com.acme.orders.OrderPlaced` (what
    /// the record-name subject strategies name subjects after).
    pub full_name: String,
}

impl CompiledSchema {
    /// Parse `text`, read from `file`, as the schema of `key`.
    pub fn parse(key: SchemaKey, file: String, text: String) -> Result<Self, String> {
        let schema = Schema::parse_str(&text).map_err(|e| format!("does not parse as Avro: {e}"))?;
        let full_name = match &schema {
            Schema::Record(r) => r.name.fullname(None),
            _ => return Err("is not an Avro record schema (an event is a record)".into()),
        };
        Ok(Self { key, file, text, schema, full_name })
    }
}

/// A file that gives no schema, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenFile {
    pub file: String,
    pub reason: String,
}

impl fmt::Display for BrokenFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.reason)
    }
}

/// An event that has no schema in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no schema for {key}: expected a file {file} in {source_name}{broken}")]
pub struct MissingSchema {
    pub key: SchemaKey,
    pub file: String,
    pub source_name: String,
    /// Why the file, when it exists, gives no schema.
    pub broken: String,
}

/// The schemas of a directory or a ConfigMap at one moment.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Where the schemas come from, for messages.
    source_name: String,
    schemas: BTreeMap<SchemaKey, Arc<CompiledSchema>>,
    /// The same schemas by aggregate type, event name and version: looked
    /// up per event with the row's own strings, nothing allocated.
    index: HashMap<String, HashMap<String, BTreeMap<u32, Arc<CompiledSchema>>>>,
    broken: Vec<BrokenFile>,
}

impl Catalog {
    /// The catalog of named texts (`file name -> schema`), e.g. a
    /// ConfigMap's data; `source_name` says where they come from.
    pub fn from_files<'a>(source_name: &str, files: impl IntoIterator<Item = (String, &'a str)>) -> Self {
        let mut catalog = Catalog { source_name: source_name.to_owned(), ..Default::default() };
        for (file, text) in files {
            let name = file.rsplit('/').next().unwrap_or(&file).to_owned();
            if name.starts_with('.') || !name.ends_with(".avsc") {
                continue;
            }
            let parsed = SchemaKey::from_file_name(&name)
                .and_then(|key| CompiledSchema::parse(key, file.clone(), text.to_owned()));
            match parsed {
                Ok(s) => match catalog.schemas.get(&s.key) {
                    Some(first) => catalog.broken.push(BrokenFile {
                        file,
                        reason: format!("a second file for {} (the first is {})", s.key, first.file),
                    }),
                    None => {
                        let s = Arc::new(s);
                        let events = catalog.index.entry(s.key.aggregate_type.clone()).or_default();
                        events.entry(s.key.event_name.clone()).or_default().insert(s.key.version, s.clone());
                        catalog.schemas.insert(s.key.clone(), s);
                    }
                },
                Err(reason) => catalog.broken.push(BrokenFile { file, reason }),
            }
        }
        catalog
    }

    /// The catalog of every `.avsc` file below `dir`.
    pub fn load(dir: &Path) -> std::io::Result<Self> {
        let mut files = Vec::new();
        read_tree(dir, &mut files)?;
        files.sort();
        let texts: Vec<(String, String)> = files
            .into_iter()
            .map(|path| {
                let text = std::fs::read_to_string(&path)?;
                Ok((path.display().to_string(), text))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Self::from_files(&dir.display().to_string(), texts.iter().map(|(f, t)| (f.clone(), t.as_str()))))
    }

    /// The schema of one event version.
    pub fn get(
        &self,
        aggregate_type: &str,
        event_name: &str,
        version: u32,
    ) -> Result<Arc<CompiledSchema>, Box<MissingSchema>> {
        let found = self.index.get(aggregate_type).and_then(|events| events.get(event_name)?.get(&version));
        if let Some(s) = found {
            return Ok(s.clone());
        }
        let key = SchemaKey { aggregate_type: aggregate_type.to_owned(), event_name: event_name.to_owned(), version };
        let file = key.file_name();
        let broken = self
            .broken
            .iter()
            .find(|b| b.file.rsplit('/').next() == Some(file.as_str()))
            .map(|b| format!(" ({})", b.reason))
            .unwrap_or_default();
        Err(Box::new(MissingSchema { key, file, source_name: self.source_name.clone(), broken }))
    }

    /// The newest schema of an event (a consumer's reader schema): of
    /// `aggregate_type` when given, else of any aggregate type.
    pub fn latest(&self, aggregate_type: Option<&str>, event_name: &str) -> Option<Arc<CompiledSchema>> {
        self.schemas
            .values()
            .filter(|s| s.key.event_name == event_name && aggregate_type.is_none_or(|a| s.key.aggregate_type == a))
            .max_by_key(|s| s.key.version)
            .cloned()
    }

    /// Every schema, in key order (oldest version of an event first).
    pub fn schemas(&self) -> impl Iterator<Item = &Arc<CompiledSchema>> {
        self.schemas.values()
    }

    /// The files that give no schema.
    pub fn broken(&self) -> &[BrokenFile] {
        &self.broken
    }

    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// What changes when a file changes: its name and text.
    fn fingerprint(&self) -> Vec<(String, usize, u64)> {
        use std::hash::{Hash, Hasher};
        let mut all: Vec<(String, usize, u64)> = self
            .schemas
            .values()
            .map(|s| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                s.text.hash(&mut h);
                (s.file.clone(), s.text.len(), h.finish())
            })
            .collect();
        all.extend(self.broken.iter().map(|b| (b.file.clone(), b.reason.len(), 0)));
        all
    }
}

fn read_tree(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // `metadata` follows links: a ConfigMap volume's files are links.
        if std::fs::metadata(&path)?.is_dir() {
            read_tree(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "avsc") {
            out.push(path);
        }
    }
    Ok(())
}

/// A directory of schemas kept current: [`SchemaDir::watch`] reads it again
/// every few seconds, so a changed ConfigMap reaches a running pod (the
/// kubelet updates the mounted files within about a minute) without a
/// restart. Events already encoded keep the schema they were encoded with.
pub struct SchemaDir {
    dir: PathBuf,
    current: RwLock<Arc<Catalog>>,
}

/// How often a schema directory is read again.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

impl SchemaDir {
    /// Read `dir`; a directory that cannot be read is an error (at start,
    /// a missing mount is a configuration error worth stopping for).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let catalog = Catalog::load(dir)?;
        report(&catalog);
        Ok(Self { dir: dir.to_owned(), current: RwLock::new(Arc::new(catalog)) })
    }

    /// The catalog as last read.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `catalog` is the catalog as last read (what was chosen from
    /// it still stands).
    pub fn is_current(&self, catalog: &Arc<Catalog>) -> bool {
        Arc::ptr_eq(&self.current.read().unwrap_or_else(|p| p.into_inner()), catalog)
    }

    /// Read the directory again; true when something changed. A directory
    /// that cannot be read now keeps the last catalog.
    pub fn reload(&self) -> bool {
        match Catalog::load(&self.dir) {
            Ok(fresh) => {
                if fresh.fingerprint() == self.catalog().fingerprint() {
                    return false;
                }
                report(&fresh);
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
                true
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the schema directory; keeping the schemas read before");
                false
            }
        }
    }

    /// Reload every [`RELOAD_INTERVAL`] until `stop` resolves.
    pub async fn watch(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(RELOAD_INTERVAL) => {
                    let this = self.clone();
                    let _ = tokio::task::spawn_blocking(move || this.reload()).await;
                }
            }
        }
    }
}

fn report(catalog: &Catalog) {
    tracing::info!(source = %catalog.source_name(), schemas = catalog.schemas.len(), broken = catalog.broken.len(), "event schemas read");
    for b in catalog.broken() {
        tracing::error!(file = %b.file, reason = %b.reason, "a schema file gives no schema; its events fail until it is fixed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: &str = r#"{"type": "record", "name": "OrderPlaced", "namespace": "com.acme", "fields": [{"name": "orderId", "type": "string"}]}"#;

    #[test]
    fn a_file_name_states_aggregate_event_and_version() {
        let k = SchemaKey::from_file_name("Order.OrderPlaced.v3.avsc").unwrap();
        assert_eq!((k.aggregate_type.as_str(), k.event_name.as_str(), k.version), ("Order", "OrderPlaced", 3));
        let k = SchemaKey::from_file_name("com.acme.Order.OrderPlaced.v1.avsc").unwrap();
        assert_eq!(k.aggregate_type, "com.acme.Order");
        assert_eq!(k.file_name(), "com.acme.Order.OrderPlaced.v1.avsc");
        for bad in [
            "OrderPlaced.v1.avsc",
            "Order.OrderPlaced.avsc",
            "Order.OrderPlaced.v0.avsc",
            "Order.X.vx.avsc",
            ".X.v1.avsc",
        ] {
            assert!(SchemaKey::from_file_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_broken_file_is_named_and_stops_nothing_else() {
        let c = Catalog::from_files(
            "ConfigMap orders-schemas",
            [
                ("Order.OrderPlaced.v1.avsc".to_owned(), ORDER),
                ("Order.OrderShipped.v1.avsc".to_owned(), "{not json"),
                ("orders.avsc".to_owned(), ORDER),
                ("README.md".to_owned(), "ignored"),
                ("..data".to_owned(), "ignored"),
            ],
        );
        assert_eq!(c.get("Order", "OrderPlaced", 1).unwrap().full_name, "com.acme.OrderPlaced");
        let broken: Vec<_> = c.broken().iter().map(|b| b.file.as_str()).collect();
        assert_eq!(broken, ["Order.OrderShipped.v1.avsc", "orders.avsc"]);
        let missing = c.get("Order", "OrderShipped", 1).unwrap_err().to_string();
        assert!(
            missing.starts_with("no schema for Order.OrderShipped v1: expected a file Order.OrderShipped.v1.avsc in ConfigMap orders-schemas (does not parse as Avro"),
            "{missing}"
        );
        let missing = c.get("Order", "OrderPlaced", 2).unwrap_err().to_string();
        assert_eq!(
            missing,
            "no schema for Order.OrderPlaced v2: expected a file Order.OrderPlaced.v2.avsc in ConfigMap orders-schemas"
        );
    }

    #[test]
    fn the_latest_version_is_the_reader_schema() {
        let v2 = ORDER.replace(r#"}]}"#, r#"}, {"name": "note", "type": "string", "default": ""}]}"#);
        let c = Catalog::from_files(
            "test",
            [("Order.OrderPlaced.v1.avsc".to_owned(), ORDER), ("Order.OrderPlaced.v2.avsc".to_owned(), v2.as_str())],
        );
        assert_eq!(c.latest(None, "OrderPlaced").unwrap().key.version, 2);
        assert_eq!(c.latest(Some("Order"), "OrderPlaced").unwrap().key.version, 2);
        assert!(c.latest(Some("Invoice"), "OrderPlaced").is_none());
    }

    #[test]
    fn a_directory_is_read_below_its_folders_and_again_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("outbox-catalog-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("orders")).unwrap();
        std::fs::create_dir_all(dir.join(".hidden")).unwrap();
        std::fs::write(dir.join("orders/Order.OrderPlaced.v1.avsc"), ORDER).unwrap();
        std::fs::write(dir.join(".hidden/Order.OrderPlaced.v2.avsc"), "{").unwrap();
        let watched = SchemaDir::open(&dir).unwrap();
        assert_eq!(watched.catalog().schemas().count(), 1);
        assert!(watched.catalog().broken().is_empty());
        let first = watched.catalog();
        assert!(!watched.reload(), "nothing changed");
        assert!(watched.is_current(&first), "a read without a change keeps the catalog");
        std::fs::write(dir.join("Order.OrderPlaced.v2.avsc"), ORDER).unwrap();
        assert!(watched.reload());
        assert!(!watched.is_current(&first));
        assert!(watched.catalog().get("Order", "OrderPlaced", 2).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!watched.reload(), "an unreadable directory keeps the last catalog");
        assert_eq!(watched.catalog().schemas().count(), 2);
        assert!(SchemaDir::open(&dir).is_err());
    }

    #[test]
    fn the_repositorys_sample_schemas_follow_the_rule() {
        let c = Catalog::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")).unwrap();
        assert!(c.broken().is_empty(), "{:?}", c.broken());
        assert_eq!(c.schemas().count(), crate::avro::EVENT_SCHEMAS.len());
    }
}
