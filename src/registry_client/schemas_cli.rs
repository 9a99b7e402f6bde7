//! `outbox schemas check|register`: the bundled event schemas (`schemas/`)
//! against a Schema Registry, under the subjects the relay uses
//! (`<topic>-<record full name>`, topics from the same routing rules).

use std::time::Duration;

use schema_registry_converter::{
    async_impl::schema_registry::post_schema,
    schema_registry_common::{SchemaType, SuppliedSchema},
};

use super::{Compatibility, Credentials, check_compatibility, settings, subject};
use crate::{
    Error, Result,
    avro::EVENT_SCHEMAS,
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
    /// Routing rules `Aggregate[.Event]=topic`, as the relay's.
    #[arg(long = "route", env = "OUTBOX_ROUTES", value_delimiter = ',')]
    pub routes: Vec<TopicRule>,
}

pub async fn run(args: SchemasArgs) -> Result<()> {
    let mapper = EventTopicMapper::new(args.routes.clone());
    let url = args.schema_registry_url.trim_end_matches('/').to_owned();
    let credentials = Credentials::from_env();
    let http = reqwest::Client::new();
    let mut schemas: Vec<_> = EVENT_SCHEMAS.iter().collect();
    schemas.sort_by_key(|s| (s.event_name, s.version));
    let mut incompatible = Vec::new();
    for s in schemas {
        let compiled = s.compile().map_err(|e| Error::Config(format!("{}: {e}", s.path())))?;
        let full = compiled.full_name;
        let subject = subject(&mapper.topic_for(s.aggregate_type, s.event_name), &full);
        match args.action {
            SchemasAction::Register => {
                let supplied = SuppliedSchema::new(Some(full.clone()), SchemaType::Avro, s.text.to_owned());
                let registered =
                    post_schema(&settings(&url), subject.clone(), supplied).await.map_err(|e| Error::Unavailable {
                        service: "the schema registry",
                        detail: format!("registering {} under {subject}: {e}", s.path()),
                    })?;
                println!("registered {} as id {} under {subject}", s.path(), registered.id);
            }
            SchemasAction::Check => {
                let timeout = Duration::from_secs(10);
                match check_compatibility(&http, &url, credentials.as_ref(), &subject, s.text, timeout).await? {
                    Compatibility::NewSubject => {
                        println!("new        {} (subject {subject} has no versions yet)", s.path())
                    }
                    Compatibility::Compatible => println!("compatible {} with subject {subject}", s.path()),
                    Compatibility::Incompatible(why) => {
                        println!("INCOMPATIBLE {} with subject {subject}: {why}", s.path());
                        incompatible.push(s.path());
                    }
                }
            }
        }
    }
    if incompatible.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(format!("incompatible with the registry: {}", incompatible.join(", "))))
    }
}
