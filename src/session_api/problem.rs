//! RFC 9457 problem details (`application/problem+json`) and the strict JSON
//! body parsing whose failures become them. Every rejected request gets a
//! problem naming the field and the rule, and changes nothing.

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Serialize, de::DeserializeOwned};

/// One violated rule of one field (a JSON path, a header or a query parameter).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldViolation {
    pub field: String,
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: StatusCode,
    /// Short problem type, published as `urn:outbox:problem:<kind>`.
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub errors: Vec<FieldViolation>,
}

impl Problem {
    pub fn new(status: StatusCode, kind: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Self { status, kind, title, detail: detail.into(), errors: Vec::new() }
    }

    /// A 400 for one field breaking one rule.
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        let (field, rule) = (field.into(), rule.into());
        Self::new(StatusCode::BAD_REQUEST, "invalid-request", "Invalid request", format!("{field}: {rule}"))
            .with_field(field, rule)
    }

    pub fn with_field(mut self, field: impl Into<String>, rule: impl Into<String>) -> Self {
        self.errors.push(FieldViolation { field: field.into(), rule: rule.into() });
        self
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", detail)
    }
}

#[derive(Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    errors: &'a [FieldViolation],
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(kind = self.kind, detail = %self.detail, "request failed");
        }
        let body = ProblemBody {
            kind: format!("urn:outbox:problem:{}", self.kind),
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
            errors: &self.errors,
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        (self.status, [(header::CONTENT_TYPE, "application/problem+json")], bytes).into_response()
    }
}

/// The raw request body, with size-limit and read failures as problems.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state).await.map(Body).map_err(|rejection| {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(status, "body-too-large", "Request body too large", rejection.body_text())
            } else {
                Problem::new(status, "unreadable-body", "Request body could not be read", rejection.body_text())
            }
        })
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Parse a JSON body strictly: JSON content type, valid JSON, the right
/// types, no unknown or missing fields. An empty body parses as `empty`
/// when given (for optional bodies).
pub fn parse_json<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes, empty: Option<T>) -> Result<T, Problem> {
    if body.is_empty()
        && let Some(default) = empty
    {
        return Ok(default);
    }
    if !is_json(headers) {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            "the body must be JSON, sent with Content-Type: application/json",
        )
        .with_field("Content-Type", "must be application/json"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.inner();
        if inner.is_syntax() || inner.is_eof() {
            return malformed(inner);
        }
        let rule = without_position(inner);
        let path = e.path().to_string();
        // Missing and unknown fields are reported at the enclosing object;
        // name the field itself, which the message quotes.
        let field = if path == "." {
            rule.split('`').nth(1).map(str::to_owned).unwrap_or_else(|| "$".to_owned())
        } else {
            path
        };
        Problem::invalid(field, rule)
    })?;
    de.end().map_err(|e| malformed(&e))?;
    Ok(value)
}

fn without_position(e: &serde_json::Error) -> String {
    let message = e.to_string();
    message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m).to_owned()
}

fn malformed(e: &serde_json::Error) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "malformed-json",
        "Malformed JSON",
        format!("the body is not valid JSON: {e}"),
    )
    .with_field("$", without_position(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Req {
        user_id: String,
        ttl_seconds: Option<u64>,
    }

    fn json() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        h
    }

    fn parse(body: &str) -> Result<Req, Problem> {
        parse_json(&json(), &Bytes::from(body.to_owned()), None)
    }

    #[test]
    fn valid_body_parses() {
        assert_eq!(
            parse(r#"{"userId":"u","ttlSeconds":60}"#).unwrap(),
            Req { user_id: "u".into(), ttl_seconds: Some(60) }
        );
    }

    #[test]
    fn each_bad_input_class_names_the_field_and_rule() {
        let p = parse(r#"{"userId":"u","#).unwrap_err();
        assert_eq!((p.status, p.kind), (StatusCode::BAD_REQUEST, "malformed-json"));

        let p = parse(r#"{"userId":"u","color":"red"}"#).unwrap_err();
        assert_eq!(p.errors[0].field, "color");
        assert!(p.errors[0].rule.starts_with("unknown field"), "{p:?}");

        let p = parse(r#"{"userId":"u","ttlSeconds":"soon"}"#).unwrap_err();
        assert_eq!(p.errors[0].field, "ttlSeconds");
        assert!(p.errors[0].rule.contains("invalid type"), "{p:?}");

        let p = parse(r#"{"userId":"u","ttlSeconds":-5}"#).unwrap_err();
        assert_eq!(p.errors[0].field, "ttlSeconds");

        let p = parse(r#"{}"#).unwrap_err();
        assert_eq!(p.errors[0].field, "userId");
        assert!(p.errors[0].rule.starts_with("missing field"), "{p:?}");

        let p = parse(r#"{"userId":"u"} trailing"#).unwrap_err();
        assert_eq!(p.kind, "malformed-json");
    }

    #[test]
    fn content_type_must_be_json_and_empty_optional_bodies_default() {
        let p = parse_json::<Req>(&HeaderMap::new(), &Bytes::from_static(b"{}"), None).unwrap_err();
        assert_eq!(p.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/merge-patch+json"));
        assert!(parse_json::<Req>(&h, &Bytes::from_static(br#"{"userId":"u"}"#), None).is_ok());
        let d = parse_json::<Req>(&HeaderMap::new(), &Bytes::new(), Some(Req::default())).unwrap();
        assert_eq!(d, Req::default());
    }
}
