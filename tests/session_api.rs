//! The session API against the real MongoDB: every write lands together
//! with its outbox rows or not at all.

mod common;

use mongodb::bson::{Document, doc};
use outbox_operator::{
    domain::{
        event::{EventEnvelope, EventMetadata},
        session::{ClientInfo, CreateSession, Session, SessionPolicy},
    },
    outbox::{OutboxDocument, bucket::bucket_of},
    session_api::repo::{RepoError, SessionRepo},
};
use reqwest::{StatusCode, header};
use serde_json::{Value, json};

async fn counts(db: &mongodb::Database) -> (u64, u64) {
    let sessions = db.collection::<Document>("sessions").count_documents(doc! {}).await.unwrap();
    let outbox = db.collection::<Document>("outbox").count_documents(doc! {}).await.unwrap();
    (sessions, outbox)
}

async fn create(http: &reqwest::Client, base: &str, body: Value) -> reqwest::Response {
    http.post(format!("{base}/sessions")).json(&body).send().await.unwrap()
}

#[tokio::test]
async fn create_read_refresh_end_each_write_their_event_in_the_outbox() {
    let (base, db) = common::start_session_api().await;
    let http = common::http();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = http
        .post(format!("{base}/sessions"))
        .header("x-correlation-id", "corr-1")
        .header("traceparent", traceparent)
        .json(&json!({"userId": "user-1", "ttlSeconds": 600, "device": "phone"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()[header::ETAG], "\"1\"");
    assert_eq!(r.headers()["x-correlation-id"], "corr-1");
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!((created["status"].as_str(), created["version"].as_u64()), (Some("active"), Some(1)));

    let got: Value = http.get(format!("{base}/sessions/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(got, created);

    let rows = common::outbox_rows(&db).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.get_str("aggregateType").unwrap(), "Session");
    assert_eq!(row.get_str("aggregateId").unwrap(), id);
    assert_eq!(row.get_str("eventName").unwrap(), "SessionCreated");
    assert_eq!(row.get_i32("eventVersion").unwrap(), 1);
    assert!(!row.contains_key("status") && !row.contains_key("attempts"), "no relay bookkeeping: {row}");
    assert_eq!(row.get_i64("aggregateVersion").unwrap(), 1, "the session's version after the create");
    assert_eq!(row.get_i32("bucket").unwrap() as u32, bucket_of(&id, 256));
    assert_eq!(row.get_str("correlationId").unwrap(), "corr-1");
    assert_eq!(row.get_str("traceparent").unwrap(), traceparent);
    assert_eq!(row.get_document("payload").unwrap().get_str("device").unwrap(), "phone");
    assert_eq!(uuid::Uuid::parse_str(row.get_str("_id").unwrap()).unwrap().get_version_num(), 7);

    let r = http.post(format!("{base}/sessions/{id}/refresh")).json(&json!({"ttlSeconds": 1200})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 2);
    // An empty body refreshes with the default TTL.
    let r = http.post(format!("{base}/sessions/{id}/refresh")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http.delete(format!("{base}/sessions/{id}?reason=revoked")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let ended: Value = r.json().await.unwrap();
    assert_eq!((ended["status"].as_str(), ended["endReason"].as_str()), (Some("ended"), Some("revoked")));

    // No refresh or second end of an ended session, and nothing written.
    let r = http.post(format!("{base}/sessions/{id}/refresh")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(r.json::<Value>().await.unwrap()["type"], "urn:outbox:problem:session-ended");
    assert_eq!(http.delete(format!("{base}/sessions/{id}")).send().await.unwrap().status(), StatusCode::CONFLICT);

    let names: Vec<String> =
        common::outbox_rows(&db).await.iter().map(|r| r.get_str("eventName").unwrap().to_owned()).collect();
    assert_eq!(names, ["SessionCreated", "SessionRefreshed", "SessionRefreshed", "SessionEnded"]);

    let list: Value = http.get(format!("{base}/sessions?userId=user-1")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);

    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("outbox_session_outbox_rows_written_total 4"), "{metrics}");
    assert!(
        metrics.contains(r#"outbox_http_requests_total{method="POST",route="/sessions",status="201"} 1"#),
        "{metrics}"
    );
    assert_eq!(http.get(format!("{base}/readyz")).send().await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn idempotency_key_makes_a_retried_create_return_the_same_session() {
    let (base, db) = common::start_session_api().await;
    let http = common::http();
    let body = json!({"userId": "user-2"});
    let post = |key: &'static str, body: Value| {
        let http = http.clone();
        let base = base.clone();
        async move { http.post(format!("{base}/sessions")).header("idempotency-key", key).json(&body).send().await.unwrap() }
    };
    let first = post("key-1", body.clone()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    let again = post("key-1", body.clone()).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);
    assert_eq!(counts(&db).await, (1, 1), "a replay writes no second session or event");

    let other = post("key-1", json!({"userId": "someone-else"})).await;
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.json::<Value>().await.unwrap()["errors"][0]["field"], "Idempotency-Key");

    // Concurrent first uses of one key: one session, one event.
    let racers: Vec<_> = (0..6).map(|_| post("key-2", body.clone())).collect();
    let responses = futures::future::join_all(racers).await;
    let mut ids = Vec::new();
    for r in responses {
        assert_eq!(r.status(), StatusCode::CREATED);
        ids.push(r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "all racers got the same session");
    assert_eq!(counts(&db).await, (2, 2));
}

#[tokio::test]
async fn an_idempotent_replay_returns_the_first_response_not_the_current_state() {
    let (base, db) = common::start_session_api().await;
    let http = common::http();
    let post = || {
        http.post(format!("{base}/sessions"))
            .header("idempotency-key", "replay-after-refresh")
            .json(&json!({"userId": "user-3", "ttlSeconds": 600}))
            .send()
    };
    let first = post().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_etag = first.headers()[header::ETAG].clone();
    let first: Value = first.json().await.unwrap();
    let id = first["id"].as_str().unwrap().to_owned();
    // The session moves on: refreshed, then ended.
    let r = http.post(format!("{base}/sessions/{id}/refresh")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http.delete(format!("{base}/sessions/{id}?reason=logout")).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());

    let again = post().await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()[header::ETAG], first_etag, "the first response's version");
    assert_eq!(again.headers()[header::LOCATION].to_str().unwrap(), format!("/sessions/{id}"));
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, first, "the replay is the first response, not the ended session");
    assert_eq!(counts(&db).await, (1, 3), "one session, its three events; the replay wrote nothing");
}

#[tokio::test]
async fn concurrent_refreshes_one_wins_one_conflicts() {
    let (base, db) = common::start_session_api().await;
    let http = common::http();
    let created: Value = create(&http, &base, json!({"userId": "user-3"})).await.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let refresh = || http.post(format!("{base}/sessions/{id}/refresh")).header(header::IF_MATCH, "\"1\"").send();
    let (a, b) = tokio::join!(refresh(), refresh());
    let mut statuses = [a.unwrap().status(), b.unwrap().status()];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::CONFLICT]);
    assert_eq!(counts(&db).await, (1, 2), "only the winner's event is in the outbox");
}

#[tokio::test]
async fn repository_detects_a_lost_update_inside_the_transaction() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("sessions")));
    let repo = SessionRepo::new(client.clone(), &db, "outbox", 256);
    repo.ensure_indexes().await.unwrap();
    let policy = SessionPolicy::default();
    let now = chrono::Utc::now();
    let cmd = CreateSession { user_id: "u".into(), ttl_seconds: None, client: ClientInfo::default() };
    let (session, created) = Session::create(cmd, &policy, now).unwrap();
    let meta = EventMetadata::default();
    repo.insert(&session, &[EventEnvelope::wrap(&created, now, &meta)], None).await.unwrap();

    // Two writers both loaded version 1.
    let (mut a, mut b) = (session.clone(), session.clone());
    let ea = EventEnvelope::wrap(&a.refresh(None, &policy, now).unwrap(), now, &meta);
    let eb = EventEnvelope::wrap(&b.refresh(None, &policy, now).unwrap(), now, &meta);
    let ea = [ea];
    let eb = [eb];
    let (ra, rb) = tokio::join!(repo.update(&a, 1, &ea), repo.update(&b, 1, &eb));
    let conflicts = [&ra, &rb].iter().filter(|r| matches!(r, Err(RepoError::Conflict { .. }))).count();
    assert_eq!((ra.is_ok() as u8 + rb.is_ok() as u8, conflicts), (1, 1), "{ra:?} {rb:?}");
    assert_eq!(counts(&db).await, (1, 2));
}

#[tokio::test]
async fn a_failing_outbox_insert_leaves_no_session_behind() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("sessions")));
    let repo = SessionRepo::new(client.clone(), &db, "outbox", 256);
    repo.ensure_indexes().await.unwrap();
    let now = chrono::Utc::now();
    let cmd = CreateSession { user_id: "u".into(), ttl_seconds: None, client: ClientInfo::default() };
    let (session, created) = Session::create(cmd, &SessionPolicy::default(), now).unwrap();
    let event = EventEnvelope::wrap(&created, now, &EventMetadata::default());
    // Occupy the event's _id so the outbox insert fails inside the transaction.
    repo.outbox().collection().insert_one(OutboxDocument::new(&event, 256).unwrap()).await.unwrap();

    let err = repo.insert(&session, &[event], None).await.expect_err("duplicate outbox _id fails the write");
    assert!(matches!(err, RepoError::Mongo(_)), "{err:?}");
    assert_eq!(counts(&db).await, (0, 1), "the session write was rolled back with the outbox write");
}

/// One bad request and the problem it must get.
struct Case {
    method: &'static str,
    path: &'static str,
    content_type: &'static str,
    header: Option<(&'static str, String)>,
    body: String,
    status: u16,
    field: Option<&'static str>,
}

fn case(method: &'static str, path: &'static str, body: &str, status: u16, field: Option<&'static str>) -> Case {
    Case { method, path, content_type: "application/json", header: None, body: body.to_owned(), status, field }
}

impl Case {
    fn content_type(mut self, ct: &'static str) -> Self {
        self.content_type = ct;
        self
    }
    fn header(mut self, name: &'static str, value: String) -> Self {
        self.header = Some((name, value));
        self
    }
}

#[tokio::test]
async fn every_bad_request_gets_a_problem_naming_the_field_and_writes_nothing() {
    let (base, db) = common::start_session_api().await;
    let http = common::http();
    let big = format!(r#"{{"userId":"u","userAgent":"{}"}}"#, "a".repeat(20_000));
    let long_id = "c".repeat(300);
    let cases = vec![
        case("POST", "/sessions", r#"{"userId":"#, 400, Some("$")),
        case("POST", "/sessions", r#"{"userId":"u","color":"red"}"#, 400, Some("color")),
        case("POST", "/sessions", r#"{"userId":"u","ttlSeconds":"soon"}"#, 400, Some("ttlSeconds")),
        case("POST", "/sessions", r#"{"userId":7}"#, 400, Some("userId")),
        case("POST", "/sessions", r#"{}"#, 400, Some("userId")),
        case("POST", "/sessions", r#"{"userId":"u","ttlSeconds":5}"#, 422, Some("ttlSeconds")),
        case("POST", "/sessions", r#"{"userId":"u","ttlSeconds":99999999}"#, 422, Some("ttlSeconds")),
        // 2^63 and u64::MAX fit the request type but not BSON: still a 422 naming the field, keyed or not.
        case("POST", "/sessions", r#"{"userId":"u","ttlSeconds":9223372036854775808}"#, 422, Some("ttlSeconds")),
        case("POST", "/sessions", r#"{"userId":"u","ttlSeconds":18446744073709551615}"#, 422, Some("ttlSeconds"))
            .header("idempotency-key", "huge-ttl".into()),
        case("POST", "/sessions", r#"{"userId":"  "}"#, 422, Some("userId")),
        case("POST", "/sessions", &big, 413, None),
        case("POST", "/sessions", r#"{"userId":"u"}"#, 415, Some("Content-Type")).content_type("text/plain"),
        case("POST", "/sessions", r#"{"userId":"u"}"#, 400, Some("x-correlation-id"))
            .header("x-correlation-id", long_id.clone()),
        case("POST", "/sessions", r#"{"userId":"u"}"#, 400, Some("idempotency-key"))
            .header("idempotency-key", long_id.clone()),
        case("GET", "/sessions/nope", "", 404, None),
        case("POST", "/sessions/nope/refresh", "", 404, None),
        case("POST", "/sessions/nope/refresh", r#"{"ttl":1}"#, 400, Some("ttl")),
        case("POST", "/sessions/nope/refresh", "", 400, Some("If-Match")).header("if-match", "yesterday".into()),
        case("DELETE", "/sessions/nope", "", 404, None),
        case("DELETE", "/sessions/nope?reason=bored", "", 400, Some("reason")),
        case("GET", "/sessions", "", 400, Some("userId")),
        case("GET", "/sessions?userId=u&limit=1000", "", 400, Some("limit")),
        case("GET", "/nowhere", "", 404, None),
    ];
    for c in cases {
        let mut req = http
            .request(c.method.parse().unwrap(), format!("{base}{}", c.path))
            .header(header::CONTENT_TYPE, c.content_type)
            .body(c.body.clone());
        if let Some((k, v)) = &c.header {
            req = req.header(*k, v);
        }
        let r = req.send().await.unwrap();
        let what = format!("{} {} {}", c.method, c.path, c.body.chars().take(60).collect::<String>());
        assert_eq!(r.status().as_u16(), c.status, "{what}");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/problem+json", "{what}");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["status"], c.status, "{what}: {problem}");
        assert!(problem["type"].as_str().unwrap().starts_with("urn:outbox:problem:"), "{what}: {problem}");
        assert!(!problem["detail"].as_str().unwrap().is_empty(), "{what}: {problem}");
        if let Some(field) = c.field {
            assert_eq!(problem["errors"][0]["field"], field, "{what}: {problem}");
            assert!(!problem["errors"][0]["rule"].as_str().unwrap().is_empty(), "{what}: {problem}");
        }
    }
    assert_eq!(counts(&db).await, (0, 0), "no rejected request wrote anything");
}
