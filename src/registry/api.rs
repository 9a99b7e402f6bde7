//! The Confluent Schema Registry REST API (the subset Kafka clients and
//! operators use), over the [`Store`].

use std::{collections::HashMap, sync::Arc};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::json;

use super::{
    compat::CompatibilityLevel,
    store::{RegistryError, Store, VersionRef},
};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

type Shared = State<Arc<Store>>;
type Params = Query<HashMap<String, String>>;
type ApiResult = Result<Response, RegistryError>;

pub fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/", get(|| async { reply(StatusCode::OK, &json!({})) }))
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route("/subjects/{subject}/versions", get(list_versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(get_version).delete(delete_version))
        .route("/subjects/{subject}/versions/{version}/schema", get(get_version_schema))
        .route("/schemas/types", get(|| async { reply(StatusCode::OK, &["AVRO"]) }))
        .route("/schemas/ids/{id}", get(get_schema))
        .route("/schemas/ids/{id}/schema", get(get_schema_raw))
        .route("/schemas/ids/{id}/versions", get(get_schema_versions))
        .route("/schemas/ids/{id}/subjects", get(get_schema_subjects))
        .route("/compatibility/subjects/{subject}/versions", post(compatibility_all))
        .route("/compatibility/subjects/{subject}/versions/{version}", post(compatibility_one))
        .route("/config", get(get_global_config).put(put_global_config))
        .route("/config/{subject}", get(get_subject_config).put(put_subject_config).delete(delete_subject_config))
        .route("/mode", get(|| async { reply(StatusCode::OK, &json!({"mode": "READWRITE"})) }))
        .with_state(store)
}

fn reply<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], bytes).into_response()
}

fn ok<T: Serialize + ?Sized>(body: &T) -> ApiResult {
    Ok(reply(StatusCode::OK, body))
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (status, code) = self.codes();
        if status >= 500 {
            tracing::error!(error = %self, "registry request failed");
        }
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        reply(status, &json!({"error_code": code, "message": self.to_string()}))
    }
}

/// Parse a JSON body whatever its content type (clients send
/// `application/vnd.schemaregistry.v1+json`, `application/json` or none).
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::BadRequest(e.to_string()))
}

fn flag(q: &HashMap<String, String>, name: &str) -> bool {
    q.get(name).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The schema part of register, lookup and compatibility requests.
#[derive(Deserialize)]
struct SchemaRequest {
    schema: Option<String>,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    references: Option<Vec<serde_json::Value>>,
    #[serde(rename = "ruleSet")]
    rule_set: Option<serde_json::Value>,
}

impl SchemaRequest {
    /// The Avro schema text, or an error naming what this registry does not support.
    fn avro(self) -> Result<String, RegistryError> {
        if let Some(t) = self.schema_type.as_deref()
            && !t.eq_ignore_ascii_case("AVRO")
        {
            return Err(RegistryError::InvalidSchema(format!(
                "schemaType {t} is not supported by this development registry (AVRO only)"
            )));
        }
        if self.references.as_ref().is_some_and(|r| !r.is_empty()) {
            return Err(RegistryError::InvalidSchema(
                "schema references are not supported by this development registry".to_owned(),
            ));
        }
        if self.rule_set.as_ref().is_some_and(|r| !r.is_null()) {
            return Err(RegistryError::InvalidSchema(
                "ruleSet (data contract rules) is not supported by this development registry".to_owned(),
            ));
        }
        match self.schema {
            Some(s) if !s.trim().is_empty() => Ok(s),
            _ => Err(RegistryError::InvalidSchema("Empty schema".to_owned())),
        }
    }
}

fn parse_id(id: &str) -> Result<u32, RegistryError> {
    id.parse().map_err(|_| RegistryError::SchemaNotFound(id.to_owned()))
}

async fn list_subjects(State(store): Shared, Query(q): Params) -> ApiResult {
    ok(&store.subjects(flag(&q, "deleted")))
}

async fn list_versions(State(store): Shared, Path(subject): Path<String>, Query(q): Params) -> ApiResult {
    ok(&store.versions(&subject, flag(&q, "deleted"))?)
}

async fn register(State(store): Shared, Path(subject): Path<String>, bytes: Bytes) -> ApiResult {
    let text = body::<SchemaRequest>(&bytes)?.avro()?;
    let id = store.register(&subject, &text)?;
    tracing::info!(subject = %subject, id, "schema registered");
    ok(&json!({ "id": id }))
}

async fn lookup(State(store): Shared, Path(subject): Path<String>, Query(q): Params, bytes: Bytes) -> ApiResult {
    let text = body::<SchemaRequest>(&bytes)?.avro()?;
    ok(&store.lookup(&subject, &text, flag(&q, "deleted"))?)
}

async fn delete_subject(State(store): Shared, Path(subject): Path<String>, Query(q): Params) -> ApiResult {
    ok(&store.delete_subject(&subject, flag(&q, "permanent"))?)
}

async fn get_version(State(store): Shared, Path((subject, v)): Path<(String, String)>, Query(q): Params) -> ApiResult {
    ok(&store.version(&subject, VersionRef::parse(&v)?, flag(&q, "deleted"))?)
}

async fn get_version_schema(State(store): Shared, Path((subject, v)): Path<(String, String)>) -> ApiResult {
    let info = store.version(&subject, VersionRef::parse(&v)?, false)?;
    Ok(raw_schema(info.schema))
}

async fn delete_version(
    State(store): Shared,
    Path((subject, v)): Path<(String, String)>,
    Query(q): Params,
) -> ApiResult {
    ok(&store.delete_version(&subject, VersionRef::parse(&v)?, flag(&q, "permanent"))?)
}

async fn get_schema(State(store): Shared, Path(id): Path<String>) -> ApiResult {
    ok(&json!({ "schema": store.schema_by_id(parse_id(&id)?)? }))
}

async fn get_schema_raw(State(store): Shared, Path(id): Path<String>) -> ApiResult {
    Ok(raw_schema(store.schema_by_id(parse_id(&id)?)?))
}

fn raw_schema(schema: String) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], schema).into_response()
}

async fn get_schema_versions(State(store): Shared, Path(id): Path<String>) -> ApiResult {
    let usages = store.id_usages(parse_id(&id)?)?;
    ok(&usages
        .into_iter()
        .map(|(subject, version)| json!({"subject": subject, "version": version}))
        .collect::<Vec<_>>())
}

async fn get_schema_subjects(State(store): Shared, Path(id): Path<String>) -> ApiResult {
    let mut subjects: Vec<String> = store.id_usages(parse_id(&id)?)?.into_iter().map(|(s, _)| s).collect();
    subjects.dedup();
    ok(&subjects)
}

fn compatibility_reply(reasons: Vec<String>, verbose: bool) -> ApiResult {
    let mut out = json!({ "is_compatible": reasons.is_empty() });
    if verbose {
        out["messages"] = json!(reasons);
    }
    ok(&out)
}

async fn compatibility_all(
    State(store): Shared,
    Path(subject): Path<String>,
    Query(q): Params,
    bytes: Bytes,
) -> ApiResult {
    let text = body::<SchemaRequest>(&bytes)?.avro()?;
    compatibility_reply(store.check_compatibility(&subject, None, &text)?, flag(&q, "verbose"))
}

async fn compatibility_one(
    State(store): Shared,
    Path((subject, v)): Path<(String, String)>,
    Query(q): Params,
    bytes: Bytes,
) -> ApiResult {
    let text = body::<SchemaRequest>(&bytes)?.avro()?;
    let version = VersionRef::parse(&v)?;
    compatibility_reply(store.check_compatibility(&subject, Some(version), &text)?, flag(&q, "verbose"))
}

#[derive(Deserialize)]
struct ConfigRequest {
    compatibility: Option<String>,
}

fn parse_level(bytes: &Bytes) -> Result<CompatibilityLevel, RegistryError> {
    let req: ConfigRequest = body(bytes)?;
    let text = req.compatibility.ok_or_else(|| RegistryError::BadRequest("missing field `compatibility`".into()))?;
    text.parse().map_err(RegistryError::InvalidCompatibilityLevel)
}

async fn get_global_config(State(store): Shared) -> ApiResult {
    ok(&json!({ "compatibilityLevel": store.global_level() }))
}

async fn put_global_config(State(store): Shared, bytes: Bytes) -> ApiResult {
    let level = parse_level(&bytes)?;
    store.set_level(None, level)?;
    ok(&json!({ "compatibility": level }))
}

async fn get_subject_config(State(store): Shared, Path(subject): Path<String>, Query(q): Params) -> ApiResult {
    ok(&json!({ "compatibilityLevel": store.subject_level(&subject, flag(&q, "defaultToGlobal"))? }))
}

async fn put_subject_config(State(store): Shared, Path(subject): Path<String>, bytes: Bytes) -> ApiResult {
    let level = parse_level(&bytes)?;
    store.set_level(Some(&subject), level)?;
    ok(&json!({ "compatibility": level }))
}

async fn delete_subject_config(State(store): Shared, Path(subject): Path<String>) -> ApiResult {
    ok(&json!({ "compatibilityLevel": store.delete_subject_level(&subject)? }))
}
