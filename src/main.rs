//! `outbox`: every process of the system is this one binary (see `outbox --help`).
#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> std::process::ExitCode {
    outbox_operator::cli::main().await
}
