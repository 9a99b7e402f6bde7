//! The custom resources, `outbox.dev/v1alpha1`: `OutboxRelay` and
//! `EventConsumer`. Every field's doc comment becomes its description in the
//! CRD (what `kubectl explain` shows). Validation the apiserver enforces
//! (types, enums, minimum/maximum, lengths, patterns, required) is in the
//! schema; cross-field rules are CEL `x-kubernetes-validations` for
//! clusters that evaluate them (1.25+).

mod consumer;
mod generate;
pub mod redrive;
mod relay;
mod rules;
mod shared;

pub use consumer::*;
pub use generate::{crds_yaml, reference_markdown};
pub use relay::*;
pub use rules::*;
pub use shared::*;

pub use crate::{
    avro::ValueLayout, consumer::ordering::EventOrder, consumer::webhook::ContentMode,
    registry_client::SubjectStrategy, relay::schemas::RegistryVersion,
};

pub const GROUP: &str = "outbox.dev";
pub const VERSION: &str = "v1alpha1";

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn the_reference_lists_every_field() {
        let md = reference_markdown();
        assert!(md.contains("| `spec.backoff.maxAttempts` | integer |"), "{md}");
        assert!(md.contains("| `spec.mongodb.uriSecret.name` | string (required) |"), "{md}");
        assert!(md.contains("one of `projection`, `webhook`, `log`"), "{md}");
        assert!(md.contains("| `status.pending` |"), "{md}");
    }

    /// Descriptions say what the code does: published history is deleted
    /// by the relay, no index expires outbox rows; relays share ranges.
    #[test]
    fn relay_descriptions_match_the_code() {
        let expiring = crate::outbox::store::query_indexes()
            .iter()
            .any(|i| i.options.as_ref().is_some_and(|o| o.expire_after.is_some()));
        assert!(!expiring, "an outbox index expires rows: describe retentionSeconds by it");
        let text = serde_json::to_string(&OutboxRelay::crd()).unwrap();
        assert!(!text.contains("TTL"), "retentionSeconds is the relay's cleanup, not a TTL index");
        assert!(!text.contains("one publishes, the others stand by"), "replicas share the shards' ranges");
        assert!(text.contains("deletes its published rows older than this"));
    }

    #[test]
    fn crds_carry_names_columns_and_status() {
        let crd = OutboxRelay::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["orl".to_owned()][..]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, VERSION);
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<&str> =
            v.additional_printer_columns.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            columns,
            [
                "Ready",
                "Shards",
                "Owned",
                "Pending",
                "Failed",
                "Dead",
                "Oldest",
                "Age",
                "Holder",
                "MaxBackoff",
                "LastPublished"
            ]
        );
        let wide: Vec<&str> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .filter(|c| c.priority == Some(1))
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(wide, ["Holder", "MaxBackoff", "LastPublished"], "shown by -o wide only");
        assert_eq!(EventConsumer::crd().spec.names.plural, "eventconsumers");
    }

    #[test]
    fn every_spec_field_has_a_description() {
        fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
                for (name, sub) in props {
                    let p = format!("{path}.{name}");
                    if sub.get("description").is_none() && !["metadata", "apiVersion", "kind"].contains(&name.as_str())
                    {
                        missing.push(p.clone());
                    }
                    // k8s-openapi types bring their own descriptions.
                    if name != "resources" && name != "conditions" {
                        walk(&p, sub, missing);
                    }
                }
            }
            if let Some(items) = schema.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
        }
        for crd in [OutboxRelay::crd(), EventConsumer::crd(), redrive::OutboxRedrive::crd()] {
            let schema =
                serde_json::to_value(&crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema).unwrap();
            let mut missing = Vec::new();
            walk(&crd.spec.names.kind, &schema, &mut missing);
            assert!(missing.is_empty(), "fields without a description: {missing:?}");
        }
    }

    #[test]
    fn a_rebuild_is_for_projections_only() {
        let spec = |handler: &str, rebuild: &str| -> EventConsumerSpec {
            serde_saphyr::from_str(&format!(
                "topics: [t]\ngroupId: g\nhandler: {{type: {handler}, webhookUrl: \"http://h\"}}\n\
                 mongodb: {{uriSecret: {{name: m, key: uri}}, database: d}}\nkafka: {{bootstrapServers: k}}\n\
                 schemaRegistry: {{url: \"http://r\"}}\n{rebuild}"
            ))
            .unwrap()
        };
        assert_eq!(spec("projection", "rebuild: r1").validate(), Ok(()));
        assert_eq!(spec("webhook", "").validate(), Ok(()));
        assert_eq!(spec("webhook", "rebuild: r1").validate(), Err(format!("spec.{REBUILD_RULE}")));
        let crd = serde_json::to_string(&EventConsumer::crd()).unwrap();
        assert!(crd.contains(REBUILD_RULE), "the CRD carries the rule for clusters that evaluate it");
    }

    #[test]
    fn yaml_output_round_trips() {
        let yaml = crds_yaml().unwrap();
        assert!(yaml.contains("outboxrelays.outbox.dev") && yaml.contains("eventconsumers.outbox.dev"));
        assert!(yaml.contains("x-kubernetes-validations"));
    }
}
