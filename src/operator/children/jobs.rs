//! The consumer's one-off Jobs: a rebuild of its read model, a redrive of
//! its dead-letter topics. Each runs the consumer's pod and settings.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        batch::v1::{Job, JobSpec},
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};

use super::{BuildContext, config_hash, consumer_children};
use crate::operator::crd::EventConsumer;

/// The Job name of a rebuild request: the consumer's, `-rebuild-`, and a
/// hash of the request (a new request, a new Job).
pub fn rebuild_job_name(deployment: &str, request: &str) -> String {
    one_off_job_name(deployment, "rebuild", request)
}

/// A one-off Job's name: the consumer's, `-<what>-`, and a hash of the
/// request (a new request, a new Job).
fn one_off_job_name(deployment: &str, what: &str, request: &str) -> String {
    let hash = config_hash(&BTreeMap::from([(what.to_owned(), request.to_owned())]));
    // A Job's name is also a label value: 63 characters at most.
    let base: String = deployment.chars().take(63 - what.len() - 2 - 8).collect();
    format!("{}-{what}-{}", base.trim_end_matches('-'), &hash[..8])
}

/// The Job of a rebuild request: the consumer's pod and settings running
/// `outbox consume rebuild` until it completes (a pod that fails is
/// started again and resumes from the saved positions).
pub(super) fn rebuild_job(deployment: &Deployment, request: &str) -> Job {
    let name = rebuild_job_name(deployment.metadata.name.as_deref().unwrap_or_default(), request);
    let mut job = one_off_job(deployment, &name, "outbox-consumer-rebuild", &["consume", "rebuild"]);
    job.metadata.annotations = Some(BTreeMap::from([("outbox.dev/rebuild".to_owned(), request.to_owned())]));
    job
}

/// The Job of an `OutboxRedrive` of an EventConsumer (`request`, its uid):
/// the consumer's pod and settings running `outbox consume redrive` over
/// its dead-letter topics, owned by the request.
pub fn redrive_job(c: &EventConsumer, ctx: &BuildContext, request: &OwnerReference) -> Job {
    let deployment = consumer_children(c, ctx).deployment;
    let name = one_off_job_name(deployment.metadata.name.as_deref().unwrap_or_default(), "redrive", &request.uid);
    let mut args = vec!["consume".to_owned(), "redrive".to_owned(), "--request".to_owned(), request.uid.clone()];
    for topic in c.spec.dead_letter_topics() {
        args.extend(["--dead-letter-topic".to_owned(), topic]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut job = one_off_job(&deployment, &name, "outbox-consumer-redrive", &args);
    job.metadata.owner_references = Some(vec![request.clone()]);
    job.metadata.annotations = Some(BTreeMap::from([("outbox.dev/request".to_owned(), request.name.clone())]));
    job
}

/// A Job running the Deployment's pod with `args` until it completes (a pod
/// that fails is started again). Its pods carry their own name label
/// (`component`), so the consumer's Service, budget and Deployment do not
/// count them.
fn one_off_job(deployment: &Deployment, name: &str, component: &str, args: &[&str]) -> Job {
    let name_label = |labels: &mut Option<BTreeMap<String, String>>| {
        labels.get_or_insert_default().insert("app.kubernetes.io/name".to_owned(), component.to_owned());
    };
    let mut metadata = deployment.metadata.clone();
    metadata.name = Some(name.to_owned());
    name_label(&mut metadata.labels);
    let mut template = deployment.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
    name_label(&mut template.metadata.get_or_insert_default().labels);
    if let Some(pod) = template.spec.as_mut() {
        pod.restart_policy = Some("OnFailure".to_owned());
        for container in &mut pod.containers {
            container.args = Some(args.iter().map(|a| (*a).to_owned()).collect());
            container.liveness_probe = None;
            container.readiness_probe = None;
            container.ports = None;
        }
    }
    Job { metadata, spec: Some(JobSpec { backoff_limit: Some(10), template, ..JobSpec::default() }), ..Job::default() }
}
