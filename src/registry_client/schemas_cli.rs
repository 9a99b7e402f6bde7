//! `outbox schemas check|register`: a directory of event schemas (what a
//! relay's ConfigMap holds) against a Schema Registry, under the subjects
//! the relay uses (the same routing rules and subject name strategy), so a
//! CI pipeline can check and register before deploying.

use std::{path::PathBuf, time::Duration};

use schema_registry_converter::{
    async_impl::schema_registry::post_schema,
    schema_registry_common::{SchemaType, SuppliedSchema},
};

use super::{Compatibility, Credentials, SubjectStrategy, check_compatibility, settings};
use crate::{
    Error, Result,
    avro::catalog::Catalog,
    kafka::topics::{EventTopicMapper, TopicRule},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemasAction {
    /// Check every schema is compatible with what the registry holds (exit 1 if not).
    Check,
    /// Register every schema, oldest version first.
    Register,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SchemasArgs {
    /// check or register.
    #[arg(value_enum)]
    pub action: SchemasAction,
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: String,
    /// Directory of the event schemas, named as the relay reads them
    /// (`<aggregateType>.<eventName>.v<eventVersion>.avsc` anywhere below it).
    #[arg(long, env = "SCHEMAS_DIR")]
    pub schemas_dir: PathBuf,
    /// Routing rules `Aggregate[.Event]=topic`, as the relay's.
    #[arg(long = "route", env = "OUTBOX_ROUTES", value_delimiter = ',')]
    pub routes: Vec<TopicRule>,
    /// How subjects are named, as the relay's.
    #[arg(long, env = "SUBJECT_NAME_STRATEGY", value_enum, default_value = "topic-record-name")]
    pub subject_name_strategy: SubjectStrategy,
}

pub async fn run(args: SchemasArgs) -> Result<()> {
    let mapper = EventTopicMapper::new(args.routes.clone());
    let url = args.schema_registry_url.trim_end_matches('/').to_owned();
    let credentials = Credentials::from_env();
    let http = reqwest::Client::new();
    let catalog = Catalog::load(&args.schemas_dir).map_err(|e| {
        Error::Config(format!("SCHEMAS_DIR {}: cannot read the schema directory: {e}", args.schemas_dir.display()))
    })?;
    if !catalog.broken().is_empty() {
        let list: Vec<String> = catalog.broken().iter().map(ToString::to_string).collect();
        return Err(Error::Config(format!("schema files that give no schema: {}", list.join("; "))));
    }
    if catalog.schemas().next().is_none() {
        return Err(Error::Config(format!("no .avsc files in {}", args.schemas_dir.display())));
    }
    let mut incompatible = Vec::new();
    // Oldest version of each event first: what registering in order needs.
    for s in catalog.schemas() {
        let topic = mapper.topic_for(&s.key.aggregate_type, &s.key.event_name);
        let subject = args.subject_name_strategy.subject(&topic, &s.full_name);
        match args.action {
            SchemasAction::Register => {
                let supplied = SuppliedSchema::new(Some(s.full_name.clone()), SchemaType::Avro, s.text.clone());
                let registered =
                    post_schema(&settings(&url), subject.clone(), supplied).await.map_err(|e| Error::Unavailable {
                        service: "the schema registry",
                        detail: format!("registering {} under {subject}: {e}", s.file),
                    })?;
                println!("registered {} as id {} under {subject}", s.file, registered.id);
            }
            SchemasAction::Check => {
                let timeout = Duration::from_secs(10);
                match check_compatibility(&http, &url, credentials.as_ref(), &subject, &s.text, timeout).await? {
                    Compatibility::NewSubject => {
                        println!("new        {} (subject {subject} has no versions yet)", s.file)
                    }
                    Compatibility::Compatible => println!("compatible {} with subject {subject}", s.file),
                    Compatibility::Incompatible(why) => {
                        println!("INCOMPATIBLE {} with subject {subject}: {why}", s.file);
                        incompatible.push(s.file.clone());
                    }
                }
            }
        }
    }
    if incompatible.is_empty() {
        Ok(())
    } else {
        Err(Error::Incompatible(format!("incompatible with the registry: {}", incompatible.join(", "))))
    }
}
