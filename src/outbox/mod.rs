//! The outbox collection in MongoDB: the document format (`document`, with
//! its format version), the relay's view of a stored row (`row`), the
//! stable bucket hash and the bucket ranges relays shard by (`bucket`),
//! the indexes
//! and writes (`store`), redrive and discard requests (`requests`). Applications append outbox rows inside their own
//! transaction through [`store::Outbox::append`]; nothing else writes raw
//! outbox documents.

pub mod bucket;
pub mod checkpoint;
pub mod document;
pub mod relay_queries;
pub mod requests;
pub mod row;
pub mod stats;
pub mod store;

pub use document::{OutboxDocument, OutboxStatus};
pub use row::{EventRow, Unreadable};
pub use store::Outbox;
