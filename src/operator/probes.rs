//! What the operator reads to compute status, each call bounded by
//! `PROBE_TIMEOUT` and connecting as the pods do (credentials from the
//! resource's Secrets): the resource's Secrets, MongoDB (the outbox, the
//! processed-events store), Kafka (group lag, dead-letter counts) and the
//! Schema Registry (compatibility of a relay's schemas, read from its
//! ConfigMap). Every failure is
//! a `Cause` for a condition, never an error of the reconcile.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};
use tokio::sync::Mutex;

use super::{
    children::{REGISTRY_SECRET_PASSWORD, REGISTRY_SECRET_USERNAME},
    crd::{HandlerSpec, MongoDbSpec, RelaySchemasSpec, SecretKeyRef},
    status::Cause,
};
use crate::{
    avro::catalog::Catalog,
    kafka::{
        AUTH_ENV_PREFIX, auth_settings,
        lag::{GroupLag, read_group_lag_and_retained},
        topics::EventTopicMapper,
    },
    registry_client::{Compatibility, Credentials, check_compatibility},
};

/// Bound of each call to MongoDB, Kafka or the registry while computing status.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Clients the probes share across reconciles and resources: one MongoDB
/// client per connection string (resources on one cluster share it), one
/// HTTP client.
#[derive(Default)]
pub struct Probes {
    mongo: Mutex<BTreeMap<String, mongodb::Client>>,
    http: reqwest::Client,
}

impl Probes {
    async fn mongo_client(&self, uri: &str) -> Result<mongodb::Client, Cause> {
        let mut clients = self.mongo.lock().await;
        if let Some(c) = clients.get(uri) {
            return Ok(c.clone());
        }
        let unreachable = |e: mongodb::error::Error| Cause::new("MongoUnreachable", e.to_string());
        let mut options = mongodb::options::ClientOptions::parse(uri)
            .await
            .map_err(|e| Cause::new("MongoUnreachable", format!("bad MongoDB URI: {e}")))?;
        options.server_selection_timeout = Some(PROBE_TIMEOUT);
        options.app_name = Some("outbox-operator".into());
        // Probes are occasional: a small pool per cluster is plenty.
        options.max_pool_size = Some(4);
        let client = mongodb::Client::with_options(options).map_err(unreachable)?;
        clients.insert(uri.to_owned(), client.clone());
        Ok(client)
    }

    /// A bounded MongoDB probe on the resource's database: the URI from its
    /// Secret, a shared client, `PROBE_TIMEOUT`.
    pub async fn mongo<T, F, Fut>(&self, kube: &Client, ns: &str, spec: &MongoDbSpec, probe: F) -> Result<T, Cause>
    where
        F: FnOnce(mongodb::Database) -> Fut,
        Fut: std::future::Future<Output = mongodb::error::Result<T>>,
    {
        let uri = mongo_uri(kube, ns, spec).await?;
        let client = self.mongo_client(&uri).await?;
        match tokio::time::timeout(PROBE_TIMEOUT, probe(client.database(&spec.database))).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Cause::new("MongoUnreachable", e.to_string())),
            Err(_) => Err(Cause::new("MongoUnreachable", format!("no answer within {PROBE_TIMEOUT:?}"))),
        }
    }

    /// Check a relay's schemas (`spec.schemas`) against the registry under
    /// the subjects the relay will use. `Ok(None)`: compatible (or nothing
    /// registered yet, or the schemas come from the registry itself);
    /// `Ok(Some(why))`: one is not, named by its file.
    pub async fn schemas_compatible(
        &self,
        kube: &Client,
        ns: &str,
        schemas: &RelaySchemasSpec,
        url: &str,
        mapper: &EventTopicMapper,
        credentials: Option<&Credentials>,
    ) -> Result<Option<String>, Cause> {
        let Some(name) = &schemas.config_map else { return Ok(None) };
        let catalog = schema_config_map(kube, ns, name).await?;
        if !catalog.broken().is_empty() {
            let list: Vec<String> = catalog.broken().iter().map(ToString::to_string).collect();
            return Err(Cause::new("SchemaInvalid", format!("ConfigMap {name}: {}", list.join("; "))));
        }
        if catalog.schemas().next().is_none() {
            return Err(Cause::new(
                "SchemasMissing",
                format!("ConfigMap {name} holds no <aggregateType>.<eventName>.v<N>.avsc key"),
            ));
        }
        for s in catalog.schemas() {
            let topic = mapper.topic_for(&s.key.aggregate_type, &s.key.event_name);
            let subject = schemas.subject_name_strategy.subject(&topic, &s.full_name);
            match check_compatibility(&self.http, url, credentials, &subject, &s.text, PROBE_TIMEOUT).await {
                Ok(Compatibility::NewSubject | Compatibility::Compatible) => {}
                Ok(Compatibility::Incompatible(why)) => {
                    return Ok(Some(format!(
                        "{} (ConfigMap {name}) is not compatible with subject {subject}: {why}",
                        s.key.file_name()
                    )));
                }
                Err(e) => return Err(Cause::new("RegistryUnreachable", e.to_string())),
            }
        }
        Ok(None)
    }
}

/// The schemas of a ConfigMap (its `data` keys), as a catalog.
async fn schema_config_map(client: &Client, ns: &str, name: &str) -> Result<Catalog, Cause> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let map = maps
        .get_opt(name)
        .await
        .map_err(|e| Cause::new("KubernetesApiError", e.to_string()))?
        .ok_or_else(|| Cause::new("SchemasNotFound", format!("ConfigMap {name} not found in namespace {ns}")))?;
    let data = map.data.unwrap_or_default();
    Ok(Catalog::from_files(&format!("ConfigMap {name}"), data.iter().map(|(k, v)| (k.clone(), v.as_str()))))
}

/// A group's lag on `topics` and the records held by `dead_letter_topics`,
/// connecting with `auth` (one Kafka client for both).
pub async fn group_lag(
    bootstrap: &str,
    auth: &[(String, String)],
    group: &str,
    topics: &[String],
    dead_letter_topics: &[String],
) -> Result<(GroupLag, i64), Cause> {
    read_group_lag_and_retained(bootstrap, auth, group, topics, dead_letter_topics, PROBE_TIMEOUT)
        .await
        .map_err(|e| Cause::new("KafkaUnreachable", e.to_string()))
}

/// A Secret's keys and values (`data` and `stringData`).
async fn secret_data(client: &Client, ns: &str, name: &str) -> Result<BTreeMap<String, Vec<u8>>, Cause> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|e| Cause::new("KubernetesApiError", e.to_string()))?
        .ok_or_else(|| Cause::new("SecretNotFound", format!("Secret {name} not found in namespace {ns}")))?;
    let mut out: BTreeMap<String, Vec<u8>> =
        secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    out.extend(secret.string_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())));
    Ok(out)
}

/// One value of a Secret's data as text.
fn secret_text(secret: &str, key: &str, value: Vec<u8>) -> Result<String, Cause> {
    String::from_utf8(value)
        .map_err(|_| Cause::new("SecretKeyNotFound", format!("Secret {secret}: the value of {key} is not UTF-8")))
}

/// The text under a Secret key the resource names.
pub async fn secret_key(client: &Client, ns: &str, r: &SecretKeyRef) -> Result<String, Cause> {
    let (name, key) = (&r.name, &r.key);
    let value = secret_data(client, ns, name)
        .await?
        .remove(key)
        .ok_or_else(|| Cause::new("SecretKeyNotFound", format!("Secret {name} has no key {key}")))?;
    secret_text(name, key, value)
}

/// The MongoDB URI from the resource's Secret.
async fn mongo_uri(client: &Client, ns: &str, m: &MongoDbSpec) -> Result<String, Cause> {
    secret_key(client, ns, &m.uri_secret).await
}

/// The webhook's Secrets exist, and the signing secret is one (a
/// Standard Webhooks `whsec_<base64>`): the pods would refuse to start.
pub async fn webhook_secrets(client: &Client, ns: &str, h: &HandlerSpec) -> Result<(), Cause> {
    if let Some(r) = &h.signing_secret {
        let secret = secret_key(client, ns, r).await?;
        crate::consumer::webhook::signing_key(&secret)
            .map_err(|e| Cause::new("SecretInvalid", format!("Secret {} key {}: {e}", r.name, r.key)))?;
    }
    if let Some(r) = &h.bearer_token_secret {
        secret_key(client, ns, r).await?;
    }
    Ok(())
}

/// librdkafka security settings from `kafka.authSecret` (the keys the pods
/// get as `KAFKA_AUTH_*`, e.g. `SASL_USERNAME` -> `sasl.username`), so the
/// operator's own status probes connect as the pods do.
pub async fn kafka_auth(client: &Client, ns: &str, secret: Option<&str>) -> Result<Vec<(String, String)>, Cause> {
    let Some(name) = secret else { return Ok(Vec::new()) };
    let mut vars = Vec::new();
    for (key, value) in secret_data(client, ns, name).await? {
        let text = secret_text(name, &key, value)?;
        vars.push((format!("{AUTH_ENV_PREFIX}{key}"), text));
    }
    Ok(auth_settings(vars))
}

/// Registry basic-auth credentials from `schemaRegistry.authSecret` (keys
/// `username` and `password`, as the pods get them).
pub async fn registry_auth(client: &Client, ns: &str, secret: Option<&str>) -> Result<Option<Credentials>, Cause> {
    let Some(name) = secret else { return Ok(None) };
    let mut data = secret_data(client, ns, name).await?;
    let (user_key, password_key) = (REGISTRY_SECRET_USERNAME, REGISTRY_SECRET_PASSWORD);
    let user = data
        .remove(user_key)
        .ok_or_else(|| Cause::new("SecretKeyNotFound", format!("Secret {name} has no key {user_key}")))?;
    let password = data.remove(password_key).map(|p| secret_text(name, password_key, p)).transpose()?;
    Ok(Some(Credentials { username: secret_text(name, user_key, user)?, password: Some(password.unwrap_or_default()) }))
}
