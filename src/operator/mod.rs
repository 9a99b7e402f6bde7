//! `outbox operator` and its custom resources. `crd` holds the
//! `OutboxRelay` and `EventConsumer` types (the source of the CRD YAML in
//! `crds/`); the controllers that reconcile them are not built yet.

pub mod children;
pub mod crd;
