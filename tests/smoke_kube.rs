//! The Kubernetes control plane is real: a CRD is applied and becomes
//! Established, a custom resource is created, validated by the apiserver,
//! and its status subresource is patched.

mod common;

use std::time::Duration;

use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, CustomResource, CustomResourceExt, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::wait::{await_condition, conditions},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(group = "smoke.outbox.dev", version = "v1", kind = "Widget", namespaced, status = "WidgetStatus")]
struct WidgetSpec {
    size: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
struct WidgetStatus {
    observed_size: i32,
}

#[tokio::test]
async fn crd_custom_resource_and_status_subresource() {
    let client = common::kube_client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = Widget::crd();
    let name = crd.name_any();
    crds.patch(&name, &PatchParams::apply("outbox-smoke").force(), &Patch::Apply(&crd)).await.expect("apply CRD");
    tokio::time::timeout(Duration::from_secs(30), await_condition(crds, &name, conditions::is_crd_established()))
        .await
        .expect("CRD Established within 30 s")
        .unwrap();

    let ns_name = common::unique("smoke");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": ns_name}})).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.expect("create namespace");

    let widgets: Api<Widget> = Api::namespaced(client.clone(), &ns_name);
    let w = Widget::new("w1", WidgetSpec { size: 3 });
    widgets.create(&PostParams::default(), &w).await.expect("create custom resource");

    // The apiserver validates against the CRD's OpenAPI schema.
    let bad = serde_json::json!({
        "apiVersion": "smoke.outbox.dev/v1", "kind": "Widget",
        "metadata": {"name": "w2"}, "spec": {"size": "big"}
    });
    let err = widgets
        .patch("w2", &PatchParams::apply("outbox-smoke"), &Patch::Apply(&bad))
        .await
        .expect_err("a string for an integer field is rejected");
    assert!(err.to_string().contains("spec.size"), "the rejection names the field: {err}");

    let status = serde_json::json!({"status": {"observed_size": 3}});
    widgets.patch_status("w1", &PatchParams::default(), &Patch::Merge(&status)).await.expect("patch status");
    let got = widgets.get("w1").await.unwrap();
    assert_eq!(got.status.expect("status set").observed_size, 3);
    assert_eq!(got.spec.size, 3, "a status patch leaves the spec alone");

    namespaces.delete(&ns_name, &DeleteParams::default()).await.expect("delete namespace");
}
