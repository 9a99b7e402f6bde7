//! The MongoDB client every process builds the same way.

use std::time::Duration;

use crate::{Error, Result};

/// Connect to MongoDB (failing fast, naming it, when unreachable).
pub async fn connect(uri: &str) -> Result<mongodb::Client> {
    let mut options = mongodb::options::ClientOptions::parse(uri)
        .await
        .map_err(|e| Error::Config(format!("MONGODB_URI does not parse: {e}")))?;
    options.server_selection_timeout.get_or_insert(Duration::from_secs(10));
    options.app_name.get_or_insert_with(|| "outbox".to_owned());
    mongodb::Client::with_options(options).map_err(|e| Error::Config(format!("MongoDB client: {e}")))
}

/// Whether a write failed on a unique index (E11000), whatever shape the
/// driver reports it in (single write, insert_many, command).
pub fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::InsertMany(im) => im.write_errors.as_ref().is_some_and(|w| w.iter().any(|w| w.code == 11000)),
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}
