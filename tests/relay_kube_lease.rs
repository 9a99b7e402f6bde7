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

    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    assert!(b.acquire().await.unwrap(), "the standby takes an expired lease");
    assert!(!a.acquire().await.unwrap(), "the old holder is now the standby");
    let lease = Api::<Lease>::namespaced(client.clone(), "default").get(&name).await.unwrap();
    assert_eq!(lease.spec.unwrap().lease_transitions, Some(1));

    b.release().await.unwrap();
    assert!(a.acquire().await.unwrap(), "a released lease is taken at once");
    Api::<Lease>::namespaced(client, "default").delete(&name, &DeleteParams::default()).await.unwrap();
}

#[tokio::test]
async fn a_relay_elected_through_a_kubernetes_lease_publishes() {
    let client = common::kube_client().await;
    let mongo = common::mongo().await;
    let db = mongo.database(&common::unique("relay-kube"));
    let ids = common::seed_outbox(&db, 10, 2).await;
    let topic = common::unique("kube-lease-events");
    common::create_topic(&topic, 1).await;
    let name = common::unique("lease");
    let mut args = common::relay_args(db.name(), &common::kafka_bootstrap(), &topic, "relay-k");
    args.lease_backend = LeaseBackend::Kubernetes;
    args.lease_name = Some(name.clone());
    args.lease_namespace = Some("default".into());
    let (relay, stop) = common::spawn_relay(args);
    common::eventually("all published", Duration::from_secs(60), || async {
        common::status_count(&db, "published").await == ids.len() as u64
    })
    .await;
    let observer = KubeLease::new(client.clone(), "default", &name, "observer", Duration::from_secs(2));
    assert_eq!(observer.holder().await.unwrap().as_deref(), Some("relay-k"));
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    assert_eq!(observer.holder().await.unwrap(), None, "released at shutdown");
    Api::<Lease>::namespaced(client, "default").delete(&name, &DeleteParams::default()).await.unwrap();
    db.drop().await.unwrap();
}
