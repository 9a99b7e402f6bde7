//! The domain model: pure types and rules, no I/O. `event` is the envelope
//! every domain event travels in; `session` is the sample Session bounded
//! context that the session API serves.

pub mod event;
pub mod session;
