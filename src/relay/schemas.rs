//! Which schema, and which registry id, each event is encoded with: from
//! schema files (a mounted ConfigMap or a directory, read again every few
//! seconds), or from the Schema Registry itself (the version registered
//! under the event's subject), with the subject named by the configured
//! strategy. Nothing here knows any application's events.

use std::{sync::Arc, time::Instant};

use apache_avro::Schema;

use crate::{
    avro::{
        CompiledSchema,
        catalog::{Catalog, MissingSchema, SchemaDir},
    },
    registry_client::{
        SubjectStrategy,
        ids::{Registered, SchemaIdError, SchemaIds, SubjectVersion},
    },
};

/// Which registered version encodes an event, when schemas come from the
/// registry.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum RegistryVersion {
    /// The subject's newest version (Confluent's `use.latest.version`).
    Latest,
    /// The version numbered as the row's `eventVersion`.
    EventVersion,
}

/// Where the schemas come from.
pub enum SchemaSource {
    /// Files named `<aggregateType>.<eventName>.v<eventVersion>.avsc`.
    Files(Arc<SchemaDir>),
    /// The registry, under each event's subject; `record_namespace` makes
    /// the record name `<namespace>.<eventName>` that the record-name
    /// strategies name subjects after (the event name alone without it).
    Registry { version: RegistryVersion, record_namespace: Option<String> },
}

/// Why an event has no schema to be encoded with.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(transparent)]
    Missing(#[from] Box<MissingSchema>),
    #[error(transparent)]
    Registry(#[from] SchemaIdError),
}

impl SchemaError {
    /// Whether the registry is away (retrying later will do).
    pub fn is_outage(&self) -> bool {
        matches!(self, SchemaError::Registry(e) if e.is_outage())
    }

    /// Whether the schema is not there (yet): a file or a registration is
    /// what the event waits for.
    pub fn is_missing(&self) -> bool {
        match self {
            SchemaError::Missing(_) => true,
            SchemaError::Registry(e) => e.is_missing(),
        }
    }
}

/// The schema an event is encoded with, and its registry id.
#[derive(Clone)]
pub enum Chosen {
    File { id: u32, schema: Arc<CompiledSchema> },
    Registered(Arc<Registered>),
}

impl Chosen {
    pub fn id(&self) -> u32 {
        match self {
            Chosen::File { id, .. } => *id,
            Chosen::Registered(r) => r.id,
        }
    }

    pub fn schema(&self) -> &Schema {
        match self {
            Chosen::File { schema, .. } => &schema.schema,
            Chosen::Registered(r) => &r.schema,
        }
    }
}

/// How long a choice stands: every event of the same aggregate type, name
/// and version gets the same answer meanwhile.
#[derive(Clone)]
pub enum Standing {
    /// While the schema directory's catalog is this one (until it is read
    /// again with a change).
    Catalog(Arc<Catalog>),
    /// Until then, when the registry's newest version is asked again.
    Until(Instant),
    /// For good: a registered version number names one schema.
    ForGood,
}

pub struct EventSchemas {
    source: SchemaSource,
    strategy: SubjectStrategy,
    ids: SchemaIds,
}

impl EventSchemas {
    pub fn new(source: SchemaSource, strategy: SubjectStrategy, ids: SchemaIds) -> Self {
        Self { source, strategy, ids }
    }

    /// The schema and id of an event of `aggregate_type`/`event_name` at
    /// `version`, published to `topic`, and how long that choice stands
    /// (a registry id, once known, is known for good).
    pub async fn choose(
        &self,
        topic: &str,
        aggregate_type: &str,
        event_name: &str,
        version: u32,
    ) -> Result<(Chosen, Standing), SchemaError> {
        match &self.source {
            SchemaSource::Files(dir) => {
                let catalog = dir.catalog();
                let schema = catalog.get(aggregate_type, event_name, version)?;
                let subject = self.strategy.subject(topic, &schema.full_name);
                let id = self.ids.id(&subject, &schema.full_name, &schema.text).await?;
                Ok((Chosen::File { id, schema }, Standing::Catalog(catalog)))
            }
            SchemaSource::Registry { version: which, record_namespace } => {
                let record = match record_namespace {
                    Some(ns) => format!("{ns}.{event_name}"),
                    None => event_name.to_owned(),
                };
                let subject = self.strategy.subject(topic, &record);
                let wanted = match which {
                    RegistryVersion::Latest => SubjectVersion::Latest,
                    RegistryVersion::EventVersion => SubjectVersion::Number(version),
                };
                let (registered, until) = self.ids.registered(&subject, wanted).await?;
                Ok((Chosen::Registered(registered), until.map_or(Standing::ForGood, Standing::Until)))
            }
        }
    }

    /// Whether a choice made before still stands.
    pub fn stands(&self, standing: &Standing) -> bool {
        match (standing, &self.source) {
            (Standing::Catalog(catalog), SchemaSource::Files(dir)) => dir.is_current(catalog),
            (Standing::Until(until), _) => Instant::now() < *until,
            (Standing::ForGood, _) => true,
            (Standing::Catalog(_), SchemaSource::Registry { .. }) => false,
        }
    }
}
