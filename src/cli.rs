//! The `outbox` command line: one binary, one subcommand per process kind.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{Error, consumer, registry, relay, session_api, telemetry};

#[derive(Debug, Parser)]
#[command(name = "outbox", version, about = "Transactional outbox for Kubernetes: MongoDB -> Kafka (Avro)")]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "OUTBOX_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: telemetry::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controllers for OutboxRelay and EventConsumer.
    Operator(crate::operator::OperatorArgs),
    /// Run one relay process: outbox -> Kafka (or `relay redrive`).
    Relay(Box<relay::RelayCommand>),
    /// Run one consumer process: Kafka -> handler (or `consume redrive`).
    Consume(Box<consumer::ConsumeCommand>),
    /// Run the sample Session bounded context over HTTP.
    SessionApi(session_api::SessionApiArgs),
    /// Print the CRD YAML generated from the Rust types (or, with --reference, a Markdown reference).
    Crds {
        /// Print the field reference (Markdown) instead of the YAML.
        #[arg(long)]
        reference: bool,
    },
    /// Check or register a directory of event schemas (`--schemas-dir`) against the Schema Registry.
    Schemas(crate::registry_client::schemas_cli::SchemasArgs),
    /// Serve a small Confluent-API schema registry (local/dev stacks only).
    Registry(registry::RegistryArgs),
    /// The `kubectl outbox` plugin (status, redrive, discard, pause, resume); also run as
    /// `kubectl-outbox`, a link to this binary by that name.
    #[command(disable_help_flag = true)]
    Kubectl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub async fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let program = argv.first().map(std::path::Path::new).and_then(|p| p.file_stem()).and_then(|p| p.to_str());
    if program.is_some_and(|p| p.starts_with("kubectl-outbox")) {
        return plugin(argv[1..].to_vec()).await;
    }
    let cli = Cli::parse();
    if let Command::Kubectl { args } = cli.command {
        return plugin(args).await;
    }
    // First: the trace exporter's HTTP client needs it.
    telemetry::install_crypto_provider();
    let telemetry = telemetry::init(cli.log_format, cli.command.service_name());
    let result = match cli.command {
        Command::Registry(args) => registry::run(args).await,
        Command::Operator(args) => crate::operator::main(args).await,
        Command::Relay(cmd) => relay::main(*cmd).await,
        Command::Consume(cmd) => consumer::main(*cmd).await,
        Command::SessionApi(args) => session_api::run(args).await,
        Command::Crds { reference: true } => {
            print!("{}", crate::operator::crd::reference_markdown());
            Ok(())
        }
        Command::Crds { reference: false } => {
            crate::operator::crd::crds_yaml().map(|y| print!("{y}")).map_err(Error::Config)
        }
        Command::Schemas(args) => crate::registry_client::schemas_cli::run(args).await,
        Command::Kubectl { .. } => unreachable!("run before the telemetry"),
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "exiting");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}

/// The kubectl plugin: its errors on stderr as one line, no logs.
async fn plugin(args: Vec<String>) -> ExitCode {
    telemetry::install_crypto_provider();
    let argv = std::iter::once("kubectl outbox".to_owned()).chain(args).collect();
    match crate::kubectl::main(argv).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

impl Command {
    /// The default `service.name` of this process's spans.
    fn service_name(&self) -> &'static str {
        match self {
            Command::Operator(_) => "outbox-operator",
            Command::Relay(_) => "outbox-relay",
            Command::Consume(_) => "outbox-consumer",
            Command::SessionApi(_) => "outbox-session-api",
            Command::Registry(_) => "outbox-registry",
            Command::Crds { .. } | Command::Schemas(_) | Command::Kubectl { .. } => "outbox",
        }
    }
}

/// Parse one subcommand's arguments from flags, with exactly the defaults
/// and environment fallbacks of the command line (tests and benchmarks use
/// this instead of repeating the defaults).
pub fn args_from<A: clap::Args>(flags: &[&str]) -> Result<A, clap::Error> {
    #[derive(clap::Parser)]
    struct Wrapper<A: clap::Args> {
        #[command(flatten)]
        inner: A,
    }
    let argv = std::iter::once("outbox").chain(flags.iter().copied());
    <Wrapper<A> as clap::Parser>::try_parse_from(argv).map(|w| w.inner)
}
