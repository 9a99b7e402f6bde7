//! The metrics as the processes expose them, against what names them: every
//! metric an alert rule or a dashboard panel of the chart queries is
//! exposed by a running process, and every metric a process exposes is in
//! the metrics reference (docs/reference/metrics.md) (and the reference names nothing that no
//! process registers). The session API, a relay, a consumer and the
//! operator run as `outbox` processes with events flowing through them; the
//! registry is the stack's.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use common::{Process, unique};

/// Every `outbox_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("outbox_") {
        let tail = &rest[at..];
        let end =
            tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The metric families in a `/metrics` page, with their types.
fn families(page: &str) -> BTreeMap<String, String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
        .collect()
}

/// A queried name as its family: a histogram's `_bucket`, `_sum` and `_count` series are its own.
fn family_of(name: &str, exposed: &BTreeMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && exposed.get(base).is_some_and(|k| k == "histogram")
        {
            return base.to_owned();
        }
    }
    name.to_owned()
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The metrics reference (`docs/reference/metrics.md`).
fn documented() -> BTreeSet<String> {
    metric_names(&repo_file("docs/reference/metrics.md"))
}

#[tokio::test]
async fn every_queried_metric_is_exposed_and_every_exposed_metric_is_documented() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&unique("metrics")));
    let topic = unique("metrics");
    common::create_topic(&topic, 1).await;
    let kube = common::kube_client().await;
    common::apply_crds(&kube).await;
    let ns = unique("metrics");
    assert!(common::kubectl(&["create", "namespace", &ns], None).0);

    let ports: BTreeMap<&str, u16> =
        ["relay", "consumer", "operator"].into_iter().map(|p| (p, common::free_port())).collect();
    let listen = |p: &str| format!("127.0.0.1:{}", ports[p]);
    let pipeline = common::pipeline_processes(&db, &topic, |name, command| {
        if name != "session-api" {
            command.env("METRICS_LISTEN", listen(name));
        }
        if name == "consumer" {
            command.args(["--lag-interval-seconds", "1"]);
        }
    })
    .await;
    let _operator = Process(
        common::outbox_command(&db)
            .env("KUBECONFIG", common::kubeconfig())
            .env("RUST_LOG", "warn")
            .args([
                "operator",
                "--namespace",
                &ns,
                "--leader-election",
                "false",
                "--metrics-listen",
                &listen("operator"),
            ])
            .spawn()
            .unwrap(),
    );
    let (http, api) = (common::http(), &pipeline.api);
    for i in 0..5 {
        let body = serde_json::json!({"userId": format!("u-{i}")});
        let created = http.post(format!("{api}/sessions")).json(&body).send().await.unwrap();
        assert_eq!(created.status(), 201);
    }

    let pages_now = || async {
        let mut out = vec![];
        let mut urls: Vec<(String, String)> =
            ports.keys().map(|p| (p.to_string(), format!("http://{}/metrics", listen(p)))).collect();
        urls.push(("session API".into(), format!("{api}/metrics")));
        urls.push(("registry".into(), format!("{}/metrics", common::schema_registry_url())));
        for (process, url) in urls {
            let page = match http.get(&url).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => format!("# unreachable: {e}"),
            };
            out.push((process, page));
        }
        out
    };
    let queried: BTreeSet<String> = metric_names(&repo_file("charts/outbox-operator/templates/prometheusrule.yaml"))
        .into_iter()
        .chain(metric_names(&repo_file("charts/outbox-operator/dashboards/outbox.json")))
        .collect();
    // The gauges and counters appear once there is something to count:
    // wait until every queried one has (events published and consumed,
    // the lag read).
    let start = Instant::now();
    let (pages, exposed, missing) = loop {
        let pages = pages_now().await;
        let exposed: BTreeMap<String, String> = pages.iter().flat_map(|(_, page)| families(page)).collect();
        let missing: BTreeSet<String> =
            queried.iter().map(|q| family_of(q, &exposed)).filter(|f| !exposed.contains_key(f)).collect();
        if missing.is_empty() || start.elapsed() > Duration::from_secs(60) {
            break (pages, exposed, missing);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let by_process: Vec<String> =
        pages.iter().map(|(p, page)| format!("{p}: {:?}", families(page).keys().collect::<Vec<_>>())).collect();
    assert!(
        missing.is_empty(),
        "queried by the chart's alerts or dashboard but exposed by no process: {missing:?}\nexposed:\n{}",
        by_process.join("\n")
    );
    for (process, page) in &pages {
        assert!(!page.starts_with("# unreachable"), "{process}'s /metrics: {page}");
    }

    let documented = documented();
    let undocumented: Vec<&String> = exposed.keys().filter(|m| !documented.contains(*m)).collect();
    assert!(
        undocumented.is_empty(),
        "exposed but not in the metrics reference (docs/reference/metrics.md): {undocumented:?}"
    );
    // The reverse: a documented name no process registers is a stale doc.
    // Families with labels appear only once a series exists, so this
    // compares with the names in the source, where every family is declared.
    let declared: BTreeSet<String> = ["src"]
        .iter()
        .flat_map(|dir| walk(&format!("{}/{dir}", env!("CARGO_MANIFEST_DIR"))))
        .flat_map(|file| metric_names(&std::fs::read_to_string(file).unwrap()))
        .collect();
    let stale: Vec<&String> = documented.iter().filter(|d| !declared.contains(*d)).collect();
    assert!(
        stale.is_empty(),
        "in the metrics reference (docs/reference/metrics.md) but declared nowhere in src/: {stale:?}"
    );
    common::kubectl(&["delete", "namespace", &ns, "--wait=false"], None);
}

/// Every `.rs` file under `dir`.
fn walk(dir: &str) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(path.to_str().unwrap()));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}
