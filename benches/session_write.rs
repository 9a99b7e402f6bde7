//! Benchmark: POST /sessions per second with the transactional outbox write
//! (session + outbox row in one MongoDB transaction) against a baseline that
//! does the same request handling with a plain insert of the session and no
//! outbox, measured in the same run against the same MongoDB.
//!
//! Needs the stack's MongoDB (`scripts/stack.sh up mongo && . .stack/env`);
//! run with `make bench-session`. Prints a table and writes it to
//! `$CARGO_TARGET_DIR/bench/session_write.md`, with its figures drawn in `session_write.svg` beside it.

mod report;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use chrono::Utc;
use mongodb::bson::{Document, doc};
use outbox_operator::{
    domain::session::{ClientInfo, CreateSession, Session, SessionPolicy},
    session_api::{self, SessionApiArgs, repo::session_document},
};

const CONCURRENCY: usize = 16;
const REQUESTS_PER_ROUND: usize = 2000;
const ROUNDS: usize = 3;

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Req {
    user_id: String,
}

/// The baseline: same parsing and domain logic, one plain insert, no outbox.
async fn baseline_create(
    State(coll): State<Arc<mongodb::Collection<Document>>>,
    Json(req): Json<Req>,
) -> (StatusCode, Json<serde_json::Value>) {
    let now = Utc::now();
    let cmd = CreateSession { user_id: req.user_id, ttl_seconds: None, client: ClientInfo::default() };
    let (session, _event) = Session::create(cmd, &SessionPolicy::default(), now).unwrap();
    coll.insert_one(session_document(&session)).await.unwrap();
    (StatusCode::CREATED, Json(serde_json::to_value(&session).unwrap()))
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/sessions")
}

/// Fire `n` POSTs with `CONCURRENCY` in flight; returns (elapsed, latencies).
async fn load(http: &reqwest::Client, url: &str, n: usize) -> (Duration, Vec<Duration>) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (http, url, next) = (http.clone(), url.to_owned(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    let t = Instant::now();
                    let r = http.post(&url).json(&serde_json::json!({"userId": "bench-user"})).send().await.unwrap();
                    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap_or_default());
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for w in workers {
        all.extend(w.await.unwrap());
    }
    (start.elapsed(), all)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    outbox_operator::telemetry::install_crypto_provider();
    let uri = std::env::var("MONGODB_URI")
        .expect("MONGODB_URI is not set: run `scripts/stack.sh up mongo && . .stack/env` (or `make bench-session`)");
    let client = outbox_operator::db::connect(&uri).await.unwrap();
    client.database("admin").run_command(doc! {"ping": 1}).await.expect("MongoDB reachable at MONGODB_URI");
    let database = format!("bench-sessions-{}", std::process::id());
    let args: SessionApiArgs =
        outbox_operator::cli::args_from(&["--mongodb-uri", &uri, "--database", &database]).expect("session API flags");
    let outbox_url = serve(session_api::app(client.clone(), &args).await.unwrap()).await;
    let db = client.database(&database);
    let plain = Arc::new(db.collection::<Document>("plain_sessions"));
    plain.create_index(mongodb::IndexModel::builder().keys(doc! {"userId": 1, "createdAt": -1}).build()).await.unwrap();
    let baseline_url = serve(Router::new().route("/sessions", post(baseline_create)).with_state(plain)).await;

    let http = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build().unwrap();
    eprintln!("warming up ...");
    load(&http, &baseline_url, 300).await;
    load(&http, &outbox_url, 300).await;

    let mut results: Vec<(&str, Duration, Vec<Duration>)> = vec![
        ("plain insert, no outbox (baseline)", Duration::ZERO, Vec::new()),
        ("session + outbox row, one transaction", Duration::ZERO, Vec::new()),
    ];
    for round in 1..=ROUNDS {
        for (i, url) in [&baseline_url, &outbox_url].into_iter().enumerate() {
            let (elapsed, lat) = load(&http, url, REQUESTS_PER_ROUND).await;
            eprintln!(
                "round {round}/{ROUNDS}: {:<40} {:>8.0} req/s",
                results[i].0,
                REQUESTS_PER_ROUND as f64 / elapsed.as_secs_f64()
            );
            results[i].1 += elapsed;
            results[i].2.extend(lat);
        }
    }

    let base_rate = (REQUESTS_PER_ROUND * ROUNDS) as f64 / results[0].1.as_secs_f64();
    let mut table = format!(
        "POST /sessions, {CONCURRENCY} concurrent clients, {ROUNDS} x {REQUESTS_PER_ROUND} requests each, same MongoDB, same run\n\n\
         | write path | req/s | p50 ms | p99 ms | vs baseline |\n|---|---:|---:|---:|---:|\n"
    );
    let (mut rate_bars, mut latency_series) = (Vec::new(), Vec::new());
    for (name, elapsed, mut lat) in results {
        lat.sort();
        let rate = lat.len() as f64 / elapsed.as_secs_f64();
        rate_bars.push((name.to_owned(), vec![("requests/s".to_owned(), rate)]));
        latency_series.push((name.to_owned(), lat.iter().map(|d| d.as_secs_f64() * 1000.0).collect()));
        table.push_str(&format!(
            "| {name} | {rate:.0} | {:.2} | {:.2} | {:.0}% |\n",
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            100.0 * rate / base_rate
        ));
    }
    let outbox_rows = db.collection::<Document>("outbox").count_documents(doc! {}).await.unwrap();
    let sessions = db.collection::<Document>("sessions").count_documents(doc! {}).await.unwrap();
    table
        .push_str(&format!("\nchecks: {sessions} sessions and {outbox_rows} outbox rows written by the outbox path\n"));
    assert_eq!(sessions, outbox_rows, "every session has its outbox row");
    let figure = report::Figure {
        title: format!("bench-session: POST /sessions, {CONCURRENCY} concurrent clients, same run"),
        panels: vec![
            report::Panel::Bars { title: "Throughput".into(), unit: "requests/s".into(), groups: rate_bars },
            report::Panel::Percentiles { title: "Request latency".into(), series: latency_series },
        ],
    };
    report::write("session_write", &table, &figure);
    db.drop().await.unwrap();
}
