//! The relay's per-stage latency as the bench reports it: read from the
//! relay's own `outbox_relay_stage_seconds` histogram on its `/metrics`
//! endpoint, the figure production shows. Percentiles are interpolated
//! within the histogram's buckets (0.5 ms wide at the low end); the mean is
//! exact (`_sum / _count`).

use std::{collections::BTreeMap, net::SocketAddr};

use outbox_operator::relay::metrics::STAGES;

/// One stage: its name and p50, p99 and mean in milliseconds.
pub struct Stage {
    pub name: String,
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
}

/// A free local address for a relay's metrics endpoint.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// The batches the relay took from its change stream: how many, and their
/// mean size (`outbox_relay_batch_size`, summed over ranges).
#[derive(Clone, Copy, Default)]
pub struct Batches {
    pub count: f64,
    pub mean: f64,
}

/// The relay's stages, in the order it reports them, summed over ranges,
/// and its batches.
pub async fn read(metrics: SocketAddr) -> (Vec<Stage>, Batches) {
    let text = reqwest::get(format!("http://{metrics}/metrics")).await.unwrap().text().await.unwrap();
    let (mut sum, mut count) = (0.0, 0.0);
    for (series, value) in samples(&text) {
        if series.starts_with("outbox_relay_batch_size_sum") {
            sum += value;
        } else if series.starts_with("outbox_relay_batch_size_count") {
            count += value;
        }
    }
    let batches = Batches { count, mean: if count > 0.0 { sum / count } else { 0.0 } };
    (stages_of(&text), batches)
}

/// The exposition's samples: each line's series and value.
fn samples(text: &str) -> impl Iterator<Item = (&str, f64)> {
    text.lines().filter_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        Some((series, value.parse().unwrap_or(0.0)))
    })
}

fn stages_of(text: &str) -> Vec<Stage> {
    // stage -> (le -> cumulative count), sum, count
    let mut buckets: BTreeMap<String, BTreeMap<u64, f64>> = BTreeMap::new();
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (series, value) in samples(text).filter(|(series, _)| series.starts_with("outbox_relay_stage_seconds")) {
        let Some(stage) = label(series, "stage") else { continue };
        if series.starts_with("outbox_relay_stage_seconds_bucket") {
            let le = label(series, "le").and_then(|l| l.parse::<f64>().ok()).unwrap_or(f64::INFINITY);
            // Keyed by microseconds so the map sorts by bound.
            let key = if le.is_finite() { (le * 1e6) as u64 } else { u64::MAX };
            *buckets.entry(stage).or_default().entry(key).or_default() += value;
        } else if series.starts_with("outbox_relay_stage_seconds_sum") {
            sums.entry(stage).or_default().0 += value;
        } else if series.starts_with("outbox_relay_stage_seconds_count") {
            sums.entry(stage).or_default().1 += value;
        }
    }
    let mut stages = Vec::new();
    for name in STAGES {
        let (Some(b), Some((sum, count))) = (buckets.get(name), sums.get(name)) else { continue };
        if *count == 0.0 {
            continue;
        }
        stages.push(Stage {
            name: name.to_owned(),
            p50: percentile(b, *count, 0.5),
            p99: percentile(b, *count, 0.99),
            mean: 1000.0 * sum / count,
        });
    }
    stages
}

fn label(series: &str, name: &str) -> Option<String> {
    let start = series.find(&format!("{name}=\""))? + name.len() + 2;
    let end = series[start..].find('"')? + start;
    Some(series[start..end].to_owned())
}

/// The `q` quantile in milliseconds, linear within its bucket.
fn percentile(buckets: &BTreeMap<u64, f64>, count: f64, q: f64) -> f64 {
    let target = q * count;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, cumulative) in buckets {
        let upper = if *le == u64::MAX { lower * 2.0 } else { *le as f64 / 1000.0 };
        if *cumulative >= target {
            let inside = cumulative - below;
            let fraction = if inside > 0.0 { (target - below) / inside } else { 1.0 };
            return lower + fraction * (upper - lower);
        }
        (lower, below) = (upper, *cumulative);
    }
    lower
}

/// Markdown rows: one per stage, the total of the means, then the batches.
pub fn rows(label: &str, stages: &[Stage], batches: Batches) -> String {
    let mut out = String::new();
    for s in stages {
        out.push_str(&format!("| {label} | {} | {:.1} | {:.1} | {:.2} |\n", s.name, s.p50, s.p99, s.mean));
    }
    let total: f64 = stages.iter().map(|s| s.mean).sum();
    out.push_str(&format!("| {label} | **commit to settled (sum of means)** | | | {total:.2} |\n"));
    out.push_str(&format!(
        "| {label} | batches taken from the stream: {:.0}, {:.0} events each on average | | | |\n",
        batches.count, batches.mean
    ));
    out
}
