//! One active relay per outbox through a real Kubernetes Lease on the
//! stack's kube-apiserver.

mod common;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, api::DeleteParams};
use outbox_operator::{lease::kube::KubeLease, relay::LeaseBackend};

#[tokio::test]
async fn one_holder_takeover_after_expiry_and_release() {
    let client = common::kube_client().await;
    let name = common::unique("lease");
    let ttl = Duration::from_secs(2);
    let a = KubeLease::new(client.clone(), "default", &name, "relay-a", ttl);
    let b = KubeLease::new(client.clone(), "default", &name, "relay-b", ttl);
    assert!(a.acquire().await.unwrap(), "the first relay creates and holds the lease");
    assert!(!b.acquire().await.unwrap(), "the second is a standby");
    assert!(a.acquire().await.unwrap(), "the holder renews");
    assert_eq!(b.holder().await.unwrap().as_deref(), Some("relay-a"));
    assert!(!b.acquire().await.unwrap(), "the standby sees the renewed record: its count starts again");

    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    assert!(b.acquire().await.unwrap(), "the standby takes a lease unrenewed for a whole duration on its clock");
    assert!(!a.acquire().await.unwrap(), "the old holder is now the standby");
    let lease = Api::<Lease>::namespaced(client.clone(), "default").get(&name).await.unwrap();
    assert_eq!(lease.spec.unwrap().lease_transitions, Some(1));

    b.release().await.unwrap();
    assert!(a.acquire().await.unwrap(), "a released lease is taken at once");
    Api::<Lease>::namespaced(client, "default").delete(&name, &DeleteParams::default()).await.unwrap();
}

#[tokio::test]
async fn a_holder_whose_clock_runs_behind_keeps_its_lease() {
    use k8s_openapi::{
        api::coordination::v1::LeaseSpec,
        apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
        jiff::{Timestamp, ToSpan},
    };
    use kube::api::{Patch, PatchParams, PostParams};
    let client = common::kube_client().await;
    let api = Api::<Lease>::namespaced(client.clone(), "default");
    let name = common::unique("lease-skew");
    // The holder's clock is an hour behind: every renewTime it writes looks
    // long expired to a reader that trusts its own wall clock.
    let behind = || MicroTime(Timestamp::now() - 1.hour());
    let lease = Lease {
        metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some("slow-clock".into()),
            lease_duration_seconds: Some(2),
            renew_time: Some(behind()),
            ..Default::default()
        }),
    };
    api.create(&PostParams::default(), &lease).await.unwrap();
    let standby = KubeLease::new(client.clone(), "default", &name, "standby", Duration::from_secs(2));
    assert!(!standby.acquire().await.unwrap(), "a live lease is not taken, whatever its renewTime says");
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let renew = serde_json::json!({"spec": {"renewTime": behind()}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(renew)).await.unwrap();
        assert!(!standby.acquire().await.unwrap(), "renewed (its clock behind): still not taken");
    }
    // The holder stops renewing: taken after a whole duration on the standby's clock.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert!(standby.acquire().await.unwrap());
    api.delete(&name, &DeleteParams::default()).await.unwrap();
}

#[tokio::test]
async fn a_relay_elected_through_a_kubernetes_lease_publishes() {
    let client = common::kube_client().await;
    let mongo = common::mongo().await;
    let db = common::TestDb::new(mongo.database(&common::unique("relay-kube")));
    let ids = common::seed_outbox(&db, 10, 2).await;
    let topic = common::unique("kube-lease-events");
    common::create_topic(&topic, 1).await;
    // The outbox's own lease (its database is unique to this test).
    let name = outbox_operator::lease::outbox_lease_name(db.name(), "outbox");
    let mut args = common::relay_args(db.name(), &common::kafka_bootstrap(), &topic, "relay-k");
    args.lease_backend = LeaseBackend::Kubernetes;
    args.lease_namespace = Some("default".into());
    let (relay, stop) = common::spawn_relay(args);
    common::eventually("all published", Duration::from_secs(60), || async {
        common::published_count(&db).await == ids.len() as u64
    })
    .await;
    let observer = KubeLease::new(client.clone(), "default", &name, "observer", Duration::from_secs(2));
    assert_eq!(observer.holder().await.unwrap().as_deref(), Some("relay-k"));
    let checkpoint = outbox_operator::outbox::checkpoint::Checkpoints::new(&db, "outbox").load().await.unwrap();
    assert_eq!(
        checkpoint.unwrap().lease,
        Some(format!("Kubernetes Lease default/{name}")),
        "the claim names its lease"
    );
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    assert_eq!(observer.holder().await.unwrap(), None, "released at shutdown");
    Api::<Lease>::namespaced(client, "default").delete(&name, &DeleteParams::default()).await.unwrap();
}
