//! The webhook handler's HTTP requests: each event is a CloudEvent (1.0,
//! HTTP protocol binding), optionally signed per the Standard Webhooks
//! specification and carrying a bearer token.
//!
//! - `binary` content mode (default): the body is the event's JSON (the
//!   envelope and `payload`, whatever the event's type) with
//!   `Content-Type: application/json`; the attributes travel as `ce-*`
//!   headers: `ce-id` = eventId, `ce-type` =
//!   `<aggregateType>.<eventName>.v<eventVersion>`, `ce-source` (the
//!   `source` setting, default `/aggregates/<aggregateType>`), `ce-subject`
//!   = aggregateId, `ce-time` = occurredOn, `ce-specversion: 1.0` and the
//!   Kafka `ce-partitionkey` extension = aggregateId;
//! - `structured` content mode: one `application/cloudevents+json` body,
//!   the attributes beside `data` (the event's JSON).
//!
//! Every request carries `Idempotency-Key: <eventId>` and the event's
//! `traceparent` when it has one. With a signing secret, `webhook-id` (the
//! event id, the same on every retry), `webhook-timestamp` (Unix seconds
//! of this try) and `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "<id>.<timestamp>.<body>">`.
//!
//! Request building is pure (`Webhook::request`); `Webhook::deliver` sends
//! and classifies the answer.

use std::time::Duration;

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use sha2::Digest as _;

use super::{decode::DecodedEvent, handlers::HandlerError, ordering::reason};

/// How an event is laid out in the request (CloudEvents content modes).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ContentMode {
    /// Attributes in `ce-*` headers, the event's JSON as the body.
    #[default]
    Binary,
    /// One `application/cloudevents+json` document.
    Structured,
    /// Many events in one request: an `application/cloudevents-batch+json`
    /// array of structured documents, at most `--webhook-batch-max`.
    Batch,
}

/// The webhook's settings, as given on the command line.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub url: String,
    pub timeout: Duration,
    pub mode: ContentMode,
    /// The most events per request in batch mode.
    pub batch_max: usize,
    /// The CloudEvents `source`; `None`: `/aggregates/<aggregateType>`.
    pub source: Option<String>,
    /// A Standard Webhooks secret, `whsec_<base64>` (or the base64 alone).
    pub signing_secret: Option<String>,
    /// Sent as `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
}

/// The longest `Retry-After` honoured; a longer one waits this long.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(3600);

pub struct Webhook {
    http: reqwest::Client,
    url: String,
    mode: ContentMode,
    batch_max: usize,
    source: Option<String>,
    signing_key: Option<Vec<u8>>,
    bearer_token: Option<String>,
    metrics: Option<DeliveryMetrics>,
}

/// The receiver as the deliveries see it: answers by status class, and
/// how long it takes to answer.
#[derive(Clone)]
pub struct DeliveryMetrics {
    /// By `class`: `2xx`, `3xx`, `4xx`, `5xx`, or `error` (no answer: a
    /// timeout, a refused connection).
    pub deliveries: prometheus::IntCounterVec,
    pub seconds: prometheus::Histogram,
}

/// The `class` label of an answer.
pub fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "error",
    }
}

/// One request, before it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRequest {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl DeliveryRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// The key of a Standard Webhooks secret: the base64 after `whsec_`.
pub fn signing_key(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret.trim().strip_prefix("whsec_").unwrap_or(secret.trim());
    let key = base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|e| {
        format!("the webhook signing secret is not base64 ({e}); Standard Webhooks secrets read whsec_<base64>")
    })?;
    if key.is_empty() {
        return Err("the webhook signing secret is empty".into());
    }
    Ok(key)
}

/// `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// How long an answer's `Retry-After` (seconds, or an HTTP date) asks to
/// wait, at most [`RETRY_AFTER_MAX`].
pub fn retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&chrono::Utc) - now).to_std().unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(RETRY_AFTER_MAX))
}

/// A `ce-*` header value: printable ASCII but space, `"` and `%` as is, the
/// rest percent-encoded as UTF-8 (the HTTP binding's rule).
fn header_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The event's time as RFC 3339: `occurredOn` is epoch milliseconds (an
/// Avro timestamp) or already a timestamp string (a header).
fn time_of(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Number(n) => chrono::DateTime::from_timestamp_millis(n.as_i64()?)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        serde_json::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

impl Webhook {
    pub fn new(settings: WebhookSettings) -> Result<Self, String> {
        let http =
            reqwest::Client::builder().timeout(settings.timeout).build().map_err(|e| format!("webhook client: {e}"))?;
        let signing_key = settings.signing_secret.as_deref().map(signing_key).transpose()?;
        Ok(Self {
            http,
            url: settings.url,
            mode: settings.mode,
            batch_max: settings.batch_max.max(1),
            source: settings.source,
            signing_key,
            bearer_token: settings.bearer_token,
            metrics: None,
        })
    }

    /// Count deliveries and time the receiver in `metrics`.
    pub fn with_metrics(self, metrics: DeliveryMetrics) -> Self {
        Self { metrics: Some(metrics), ..self }
    }

    /// The CloudEvents attributes of `e` (required ones always; optional
    /// ones when the event has them), in header order.
    fn attributes(&self, e: &DecodedEvent) -> Vec<(&'static str, String)> {
        let text = |k: &str| e.json.get(k).and_then(|v| v.as_str());
        let aggregate_type = text("aggregateType");
        let version = e.json.get("eventVersion").and_then(|v| v.as_i64());
        let kind = match (aggregate_type, version) {
            (Some(t), Some(v)) => format!("{t}.{}.v{v}", e.event_name),
            (Some(t), None) => format!("{t}.{}", e.event_name),
            _ => e.event_name.clone(),
        };
        let source =
            self.source.clone().unwrap_or_else(|| format!("/aggregates/{}", aggregate_type.unwrap_or("unknown")));
        let mut attributes =
            vec![("specversion", "1.0".to_owned()), ("id", e.event_id.clone()), ("source", source), ("type", kind)];
        attributes.push(("subject", e.aggregate_id.clone()));
        if let Some(time) = e.json.get("occurredOn").and_then(time_of) {
            attributes.push(("time", time));
        }
        attributes.push(("partitionkey", e.aggregate_id.clone()));
        attributes
    }

    /// The request for `e`, at Unix time `now` (the signature's timestamp);
    /// in batch mode, a batch of one.
    pub fn request(&self, e: &DecodedEvent, now: i64) -> DeliveryRequest {
        let mut headers: Vec<(String, String)> = Vec::new();
        let body = match self.mode {
            ContentMode::Binary => {
                headers.push(("content-type".into(), "application/json".into()));
                for (name, value) in &self.attributes(e) {
                    headers.push((format!("ce-{name}"), header_value(value)));
                }
                serde_json::to_vec(&e.json).expect("JSON values serialize")
            }
            ContentMode::Structured => {
                headers.push(("content-type".into(), "application/cloudevents+json".into()));
                serde_json::to_vec(&self.structured(e)).expect("JSON values serialize")
            }
            ContentMode::Batch => return self.batch_request(&[e], now),
        };
        if let Some(traceparent) = e.json.get("traceparent").and_then(|v| v.as_str()) {
            headers.push(("traceparent".into(), traceparent.to_owned()));
        }
        self.finish(headers, body, &e.event_id, now)
    }

    /// One request for `events` (batch mode): an array of structured
    /// documents. Its id (`Idempotency-Key`, `webhook-id`) is the event's
    /// for one event, else `batch-` and a digest of the events' ids, the
    /// same for the same events on every try.
    pub fn batch_request(&self, events: &[&DecodedEvent], now: i64) -> DeliveryRequest {
        let docs: Vec<serde_json::Value> = events.iter().map(|e| self.structured(e).into()).collect();
        let body = serde_json::to_vec(&docs).expect("JSON values serialize");
        let id = match events {
            [one] => one.event_id.clone(),
            _ => {
                let mut digest = sha2::Sha256::new();
                for e in events {
                    digest.update(e.event_id.as_bytes());
                    digest.update(b",");
                }
                let hex: String = digest.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
                format!("batch-{hex}")
            }
        };
        let headers = vec![("content-type".to_owned(), "application/cloudevents-batch+json".to_owned())];
        self.finish(headers, body, &id, now)
    }

    /// `e` as a structured-mode document: its attributes beside `data`.
    fn structured(&self, e: &DecodedEvent) -> serde_json::Map<String, serde_json::Value> {
        let mut doc: serde_json::Map<String, serde_json::Value> =
            self.attributes(e).into_iter().map(|(k, v)| (k.to_owned(), serde_json::Value::String(v))).collect();
        doc.insert("datacontenttype".into(), "application/json".into());
        doc.insert("data".into(), e.json.clone());
        doc
    }

    /// The headers every request carries: its id, the bearer token, the
    /// Standard Webhooks signature of `body`.
    fn finish(&self, mut headers: Vec<(String, String)>, body: Vec<u8>, id: &str, now: i64) -> DeliveryRequest {
        headers.push(("idempotency-key".into(), id.to_owned()));
        if let Some(token) = &self.bearer_token {
            headers.push(("authorization".into(), format!("Bearer {token}")));
        }
        if let Some(key) = &self.signing_key {
            headers.push(("webhook-id".into(), id.to_owned()));
            headers.push(("webhook-timestamp".into(), now.to_string()));
            headers.push(("webhook-signature".into(), signature(key, id, now, &body)));
        }
        DeliveryRequest { headers, body }
    }

    /// The most events per request, in batch mode.
    pub fn batch_max(&self) -> Option<usize> {
        (self.mode == ContentMode::Batch).then_some(self.batch_max)
    }

    /// Send `events` in one request (batch mode), as `deliver` does one.
    pub async fn deliver_batch(&self, events: &[&DecodedEvent]) -> Result<(), HandlerError> {
        self.send(self.batch_request(events, chrono::Utc::now().timestamp())).await
    }

    /// Send `e`: a 2xx answer is success; a timeout, no answer, 5xx, 408 or
    /// 429 is transient (with the answer's `Retry-After`, when it has one);
    /// any other answer rejects the event.
    pub async fn deliver(&self, e: &DecodedEvent) -> Result<(), HandlerError> {
        self.send(self.request(e, chrono::Utc::now().timestamp())).await
    }

    async fn send(&self, request: DeliveryRequest) -> Result<(), HandlerError> {
        let mut builder = self.http.post(&self.url);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        let url = &self.url;
        let start = std::time::Instant::now();
        let response = builder.body(request.body).send().await;
        if let Some(m) = &self.metrics {
            m.seconds.observe(start.elapsed().as_secs_f64());
            m.deliveries.with_label_values(&[status_class(response.as_ref().ok().map(|r| r.status().as_u16()))]).inc();
        }
        let response =
            response.map_err(|err| HandlerError::transient(reason::WEBHOOK, format!("webhook {url}: {err}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let message = format!("webhook {url} answered {status}");
        if !status_is_transient(status.as_u16()) {
            return Err(HandlerError::rejected(message));
        }
        let wait = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, chrono::Utc::now()));
        Err(HandlerError::transient(reason::WEBHOOK, message).with_retry_after(wait))
    }
}

/// Whether a webhook's answer says "try again later" rather than "no".
pub fn status_is_transient(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_one_signed_array_of_structured_documents_with_a_stable_id() {
        let hook = webhook(ContentMode::Batch, Some(SPEC_SECRET));
        let (a, b) = (event_with_id("e1"), event_with_id("e2"));
        let request = hook.batch_request(&[&a, &b], 1_700_000_000);
        assert_eq!(request.header("content-type"), Some("application/cloudevents-batch+json"));
        let docs: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(docs.as_array().map(Vec::len), Some(2));
        assert_eq!((docs[0]["id"].as_str(), docs[1]["id"].as_str()), (Some("e1"), Some("e2")));
        assert_eq!(docs[0]["data"], a.json);
        let id = request.header("webhook-id").unwrap().to_owned();
        assert!(id.starts_with("batch-") && request.header("idempotency-key") == Some(id.as_str()));
        assert_eq!(hook.batch_request(&[&a, &b], 1_700_000_999).header("webhook-id"), Some(id.as_str()), "stable");
        assert_ne!(hook.batch_request(&[&b, &a], 1_700_000_000).header("webhook-id"), Some(id.as_str()));
        let key = signing_key(SPEC_SECRET).unwrap();
        assert_eq!(
            request.header("webhook-signature"),
            Some(signature(&key, &id, 1_700_000_000, &request.body).as_str())
        );
        let one = hook.request(&a, 1_700_000_000);
        assert_eq!(
            (one.header("idempotency-key"), one.header("content-type")),
            (Some("e1"), Some("application/cloudevents-batch+json")),
            "a batch of one"
        );
    }

    #[test]
    fn answers_are_counted_by_status_class() {
        let classes: Vec<&str> = [Some(204), Some(301), Some(429), Some(503), None].map(status_class).to_vec();
        assert_eq!(classes, ["2xx", "3xx", "4xx", "5xx", "error"]);
    }
    use serde_json::json;

    fn event() -> DecodedEvent {
        DecodedEvent {
            event_id: "e-1".into(),
            event_name: "OrderPlaced".into(),
            aggregate_id: "o-1".into(),
            reader_version: None,
            json: json!({
                "eventId": "e-1", "aggregateType": "Order", "aggregateId": "o-1", "eventName": "OrderPlaced",
                "eventVersion": 2, "occurredOn": 1_700_000_000_123_i64,
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "payload": {"orderId": "o-1", "note": "crème brûlée"},
            }),
        }
    }

    /// The Standard Webhooks spec's example secret.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn event_with_id(id: &str) -> DecodedEvent {
        let mut e = event();
        e.event_id = id.into();
        e.json["eventId"] = id.into();
        e
    }

    fn webhook(mode: ContentMode, secret: Option<&str>) -> Webhook {
        crate::telemetry::install_crypto_provider(); // as `outbox` does at start
        Webhook::new(WebhookSettings {
            url: "http://hook".into(),
            timeout: Duration::from_secs(1),
            mode,
            batch_max: 100,
            source: None,
            signing_secret: secret.map(str::to_owned),
            bearer_token: Some("t0ken".into()),
        })
        .unwrap()
    }

    #[test]
    fn binary_mode_puts_the_attributes_in_headers_and_the_event_in_the_body() {
        let r = webhook(ContentMode::Binary, None).request(&event(), 0);
        let expected = [
            ("content-type", "application/json"),
            ("ce-specversion", "1.0"),
            ("ce-id", "e-1"),
            ("ce-source", "/aggregates/Order"),
            ("ce-type", "Order.OrderPlaced.v2"),
            ("ce-subject", "o-1"),
            ("ce-time", "2023-11-14T22:13:20.123Z"),
            ("ce-partitionkey", "o-1"),
            ("idempotency-key", "e-1"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("authorization", "Bearer t0ken"),
        ];
        for (name, value) in expected {
            assert_eq!(r.header(name), Some(value), "{name}");
        }
        assert_eq!(r.header("webhook-signature"), None, "unsigned without a secret");
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body, event().json);
    }

    #[test]
    fn structured_mode_is_one_cloudevents_document() {
        let r = webhook(ContentMode::Structured, None).request(&event(), 0);
        assert_eq!(r.header("content-type"), Some("application/cloudevents+json"));
        assert_eq!(r.header("ce-id"), None);
        let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!((doc["specversion"].as_str(), doc["id"].as_str()), (Some("1.0"), Some("e-1")));
        assert_eq!(doc["type"], "Order.OrderPlaced.v2");
        assert_eq!(doc["datacontenttype"], "application/json");
        assert_eq!(doc["data"], event().json);
    }

    #[test]
    fn header_values_outside_printable_ascii_are_percent_encoded() {
        assert_eq!(header_value("a b\"%é"), "a%20b%22%25%C3%A9");
        assert_eq!(header_value("/aggregates/Order"), "/aggregates/Order");
    }

    #[test]
    fn the_signature_is_the_standard_webhooks_one() {
        // The Standard Webhooks specification's own example.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let r = webhook(ContentMode::Binary, Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).request(&event(), 42);
        assert_eq!((r.header("webhook-id"), r.header("webhook-timestamp")), (Some("e-1"), Some("42")));
        assert_eq!(r.header("webhook-signature").unwrap(), signature(&key, "e-1", 42, &r.body));
    }

    #[test]
    fn a_secret_that_is_not_base64_is_refused_by_name() {
        let e = signing_key("whsec_not base64!").unwrap_err();
        assert!(e.contains("not base64"), "{e}");
        assert!(signing_key("whsec_").is_err());
    }

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_capped() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z").unwrap().to_utc();
        assert_eq!(retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(retry_after("999999", now), Some(RETRY_AFTER_MAX));
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn answers_that_mean_later_are_transient() {
        for status in [500, 502, 503, 504, 408, 429] {
            assert!(status_is_transient(status), "{status}");
        }
        for status in [400, 401, 403, 404, 409, 422] {
            assert!(!status_is_transient(status), "{status}");
        }
    }
}
