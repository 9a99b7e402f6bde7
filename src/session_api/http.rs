//! The session API's HTTP surface.
//!
//! | route | does |
//! |---|---|
//! | `POST /sessions` | create (Idempotency-Key honoured) -> 201 |
//! | `GET /sessions/{id}` | read -> 200, `ETag: "<version>"` |
//! | `GET /sessions?userId=&limit=` | a user's sessions, newest first |
//! | `POST /sessions/{id}/refresh` | extend (`If-Match` optional) -> 200 |
//! | `DELETE /sessions/{id}?reason=logout\|revoked` | end -> 200 |

use std::collections::HashMap;

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use mongodb::bson;
use serde::{Deserialize, Serialize};

use super::{
    AppState,
    problem::{Body, Problem, parse_json},
    repo::{FirstResponse, IdempotencyRecord, RepoError},
};
use crate::domain::{
    event::{EventEnvelope, EventMetadata, new_traceparent, now_millis, valid_traceparent},
    session::{ClientInfo, CreateSession, EndReason, Session, SessionError, SessionStatus},
};
use crate::telemetry::{self, traces};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Longest accepted Idempotency-Key, correlation and causation id.
pub const MAX_HEADER_ID_LEN: usize = 255;
pub const CORRELATION_HEADER: &str = "x-correlation-id";
pub const CAUSATION_HEADER: &str = "x-causation-id";
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/sessions", post(create).get(list))
        .route("/sessions/{id}", get(read).delete(end))
        .route("/sessions/{id}/refresh", post(refresh))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(trace_request))
        .with_state(state)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateSessionRequest {
    user_id: String,
    ttl_seconds: Option<u64>,
    device: Option<String>,
    user_agent: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RefreshRequest {
    ttl_seconds: Option<u64>,
}

/// A session as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionView<'a> {
    id: &'a str,
    user_id: &'a str,
    device: Option<&'a str>,
    user_agent: Option<&'a str>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    status: SessionStatus,
    ended_at: Option<DateTime<Utc>>,
    end_reason: Option<EndReason>,
    refresh_count: u32,
    version: u64,
}

fn view(s: &Session, now: DateTime<Utc>) -> SessionView<'_> {
    SessionView {
        id: &s.id,
        user_id: &s.user_id,
        device: s.client.device.as_deref(),
        user_agent: s.client.user_agent.as_deref(),
        created_at: s.created_at,
        expires_at: s.expires_at,
        status: s.status_at(now),
        ended_at: s.ended_at,
        end_reason: s.end_reason,
        refresh_count: s.refresh_count,
        version: s.version,
    }
}

fn session_response(status: StatusCode, s: &Session, meta: &EventMetadata) -> Response {
    let body = serde_json::to_value(view(s, Utc::now())).unwrap_or_default();
    response_with(status, body, &s.id, s.version, meta)
}

/// A session answer: the body, `ETag` (the version), `Location` (on 201)
/// and the correlation id.
fn response_with(
    status: StatusCode,
    body: serde_json::Value,
    id: &str,
    version: u64,
    meta: &EventMetadata,
) -> Response {
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        headers.insert(header::ETAG, etag);
    }
    if let Some(c) = meta.correlation_id.as_deref().and_then(|c| HeaderValue::from_str(c).ok()) {
        headers.insert(CORRELATION_HEADER, c);
    }
    if status == StatusCode::CREATED
        && let Ok(location) = HeaderValue::from_str(&format!("/sessions/{id}"))
    {
        headers.insert(header::LOCATION, location);
    }
    response
}

impl From<SessionError> for Problem {
    fn from(e: SessionError) -> Self {
        let detail = e.to_string();
        match e {
            SessionError::TtlOutOfRange { min, max, .. } => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "ttl-out-of-range", "TTL out of range", detail)
                    .with_field("ttlSeconds", format!("must be between {min} and {max}"))
            }
            SessionError::InvalidField { field, rule } => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-field", "Invalid field", detail)
                    .with_field(field, format!("must be {rule}"))
            }
            SessionError::RefreshEnded(_) | SessionError::AlreadyEnded(_) => {
                Problem::new(StatusCode::CONFLICT, "session-ended", "Session has ended", detail)
            }
            SessionError::RefreshExpired(..) => {
                Problem::new(StatusCode::CONFLICT, "session-expired", "Session has expired", detail)
            }
        }
    }
}

impl From<RepoError> for Problem {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::Conflict { .. } => {
                Problem::new(StatusCode::CONFLICT, "concurrent-modification", "Concurrent modification", e.to_string())
            }
            RepoError::Mongo(ref m) if is_unavailable(m) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Session store unavailable",
                format!("MongoDB is not reachable: {m}"),
            ),
            other => Problem::internal(other.to_string()),
        }
    }
}

fn is_unavailable(e: &mongodb::error::Error) -> bool {
    matches!(*e.kind, mongodb::error::ErrorKind::ServerSelection { .. } | mongodb::error::ErrorKind::Io(_))
}

fn not_found(id: &str) -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "session-not-found", "Session not found", format!("no session with id {id}"))
}

/// An optional id-like header: visible ASCII, at most 255 characters.
fn id_header(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, Problem> {
    let Some(value) = headers.get(name) else { return Ok(None) };
    let text = value.to_str().ok().map(str::trim).unwrap_or("");
    if text.is_empty() || text.len() > MAX_HEADER_ID_LEN || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Problem::invalid(name, format!("must be 1 to {MAX_HEADER_ID_LEN} visible ASCII characters")));
    }
    Ok(Some(text.to_owned()))
}

/// axum middleware: one span per API request (`otel.kind` server),
/// continuing the caller's `traceparent` when it sends a valid one. The
/// request's `traceparent` header is then replaced by the request span's
/// own context (while exporting traces), or set to a new one when it had
/// none, so the events the handler writes carry the trace on: the relay's
/// publish span becomes a child of this request.
async fn trace_request(mut req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument;
    let route = telemetry::route_of(&req);
    let method = req.method().as_str().to_owned();
    let span = tracing::info_span!("http_request", otel.name = %format!("{method} {route}"), otel.kind = "server",
        http.request.method = %method, http.route = %route, http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty);
    let incoming = req.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(valid_traceparent);
    traces::continue_from(&span, incoming.as_deref());
    let traceparent = match traces::traceparent_of(&span).or(incoming) {
        Some(traceparent) => traceparent,
        None => {
            let new = new_traceparent();
            traces::record_trace_id(&span, &new);
            new
        }
    };
    if let Ok(value) = HeaderValue::from_str(&traceparent) {
        req.headers_mut().insert(TRACEPARENT, value);
    }
    let response = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

const TRACEPARENT: &str = "traceparent";

/// Correlation, causation and trace context of the request, for the events it causes.
fn request_metadata(headers: &HeaderMap) -> Result<EventMetadata, Problem> {
    let correlation_id = id_header(headers, CORRELATION_HEADER)?.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let causation_id = id_header(headers, CAUSATION_HEADER)?;
    let traceparent = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(valid_traceparent)
        .unwrap_or_else(new_traceparent);
    Ok(EventMetadata { correlation_id: Some(correlation_id), causation_id, traceparent: Some(traceparent) })
}

/// The expected version from `If-Match: "<version>"` (weak tags accepted).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, Problem> {
    let Some(value) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let text = value.to_str().unwrap_or("").trim();
    let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    text.parse::<u64>()
        .map(Some)
        .map_err(|_| Problem::invalid("If-Match", "must be the session's ETag, a quoted version number such as \"3\""))
}

fn check_version(session: &Session, expected: Option<u64>) -> Result<u64, Problem> {
    match expected {
        Some(v) if v != session.version => Err(Problem::new(
            StatusCode::CONFLICT,
            "concurrent-modification",
            "Concurrent modification",
            format!("session {} is at version {}, not {v} (If-Match)", session.id, session.version),
        )),
        _ => Ok(session.version),
    }
}

async fn create(State(st): State<AppState>, headers: HeaderMap, Body(body): Body) -> Result<Response, Problem> {
    let meta = request_metadata(&headers)?;
    let key = id_header(&headers, IDEMPOTENCY_HEADER)?;
    let req: CreateSessionRequest = parse_json(&headers, &body, None)?;
    // A request BSON cannot hold (a ttlSeconds of 2^63 or more) was never
    // stored under a key; the domain rejects it below with a 422.
    let request_doc = bson::to_document(&req);
    if let (Some(key), Ok(request_doc)) = (&key, &request_doc)
        && let Some(record) = st.repo.find_idempotency(key).await?
    {
        return replay(&st, &record, request_doc, &meta).await;
    }
    let now = now_millis();
    let cmd = CreateSession {
        user_id: req.user_id,
        ttl_seconds: req.ttl_seconds,
        client: ClientInfo { device: req.device, user_agent: req.user_agent },
    };
    let (session, event) = Session::create(cmd, &st.policy, now)?;
    let request_doc = request_doc.map_err(|e| Problem::internal(e.to_string()))?;
    let events = [EventEnvelope::wrap(&event, now, &meta)];
    let body = serde_json::to_value(view(&session, Utc::now())).map_err(|e| Problem::internal(e.to_string()))?;
    let record = key.map(|key| IdempotencyRecord {
        key,
        request: request_doc.clone(),
        session_id: session.id.clone(),
        response: Some(FirstResponse { body: body.to_string(), version: session.version }),
    });
    match st.repo.insert(&session, &events, record.as_ref()).await {
        Ok(attempts) => {
            st.metrics.written(events.len(), attempts);
            tracing::info!(session_id = %session.id, user_id = %session.user_id, "session created");
            Ok(response_with(StatusCode::CREATED, body, &session.id, session.version, &meta))
        }
        Err(RepoError::DuplicateIdempotencyKey) => {
            let record = record.expect("only keyed inserts report a duplicate key");
            match st.repo.find_idempotency(&record.key).await? {
                Some(stored) => replay(&st, &stored, &request_doc, &meta).await,
                None => Err(Problem::internal("idempotency key vanished during replay")),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Answer a retried create with its first response (body, version),
/// writing nothing. Records kept by releases before the first response was
/// stored answer with the session as it is now.
async fn replay(
    st: &AppState,
    record: &IdempotencyRecord,
    request: &bson::Document,
    meta: &EventMetadata,
) -> Result<Response, Problem> {
    if &record.request != request {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            format!("Idempotency-Key {} was first used with a different request body", record.key),
        )
        .with_field("Idempotency-Key", "must not be reused for a different request"));
    }
    let first = record.response.as_ref().and_then(|r| Some((serde_json::from_str(&r.body).ok()?, r.version)));
    let mut response = match first {
        Some((body, version)) => response_with(StatusCode::CREATED, body, &record.session_id, version, meta),
        None => {
            let session = st.repo.get(&record.session_id).await?.ok_or_else(|| not_found(&record.session_id))?;
            session_response(StatusCode::CREATED, &session, meta)
        }
    };
    response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(response)
}

async fn read(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, Problem> {
    let session = st.repo.get(&id).await?.ok_or_else(|| not_found(&id))?;
    Ok(session_response(StatusCode::OK, &session, &EventMetadata::default()))
}

/// Most sessions returned by one list call.
pub const MAX_LIST_LIMIT: i64 = 100;

async fn list(State(st): State<AppState>, Query(q): Query<HashMap<String, String>>) -> Result<Response, Problem> {
    let user_id = q
        .get("userId")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| Problem::invalid("userId", "is a required query parameter (GET /sessions?userId=...)"))?;
    let limit = match q.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
            .ok_or_else(|| Problem::invalid("limit", format!("must be an integer from 1 to {MAX_LIST_LIMIT}")))?,
    };
    let sessions = st.repo.by_user(user_id, limit).await?;
    let now = now_millis();
    let items: Vec<SessionView<'_>> = sessions.iter().map(|s| view(s, now)).collect();
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

async fn refresh(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, Problem> {
    let meta = request_metadata(&headers)?;
    let expected = if_match(&headers)?;
    let req: RefreshRequest = parse_json(&headers, &body, Some(RefreshRequest::default()))?;
    let mut session = st.repo.get(&id).await?.ok_or_else(|| not_found(&id))?;
    let loaded = check_version(&session, expected)?;
    let now = now_millis();
    let event = session.refresh(req.ttl_seconds, &st.policy, now)?;
    let events = [EventEnvelope::wrap(&event, now, &meta)];
    let attempts = st.repo.update(&session, loaded, &events).await?;
    st.metrics.written(events.len(), attempts);
    Ok(session_response(StatusCode::OK, &session, &meta))
}

async fn end(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let meta = request_metadata(&headers)?;
    let expected = if_match(&headers)?;
    let reason = match q.get("reason").map(String::as_str) {
        None | Some("logout") => EndReason::Logout,
        Some("revoked") => EndReason::Revoked,
        Some(_) => return Err(Problem::invalid("reason", "must be logout or revoked")),
    };
    let mut session = st.repo.get(&id).await?.ok_or_else(|| not_found(&id))?;
    let loaded = check_version(&session, expected)?;
    let now = now_millis();
    let event = session.end(reason, now)?;
    let events = [EventEnvelope::wrap(&event, now, &meta)];
    let attempts = st.repo.update(&session, loaded, &events).await?;
    st.metrics.written(events.len(), attempts);
    tracing::info!(session_id = %session.id, ?reason, "session ended");
    Ok(session_response(StatusCode::OK, &session, &meta))
}
