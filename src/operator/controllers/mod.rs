//! The controllers: one reconcile function per kind, on the skeleton they
//! share (`reconcile`: observe, apply the children, write status, publish
//! events). They manage the relay and consumer pods; the processes those
//! pods run are `crate::relay` and `crate::consumer`.

pub mod consumer;
pub mod reconcile;
pub mod redrive;
pub mod relay;
