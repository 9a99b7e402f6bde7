//! What a benchmark leaves behind: its table (Markdown) and the same
//! figures drawn as an SVG next to it, under `$CARGO_TARGET_DIR/bench/`.
//! People compare runs by eye: bars for rates, and a percentile plot for
//! latency distributions (x: milliseconds; y: the percentile on a
//! log(1/(1-q)) scale, so p50, p90, p99 and p99.9 are evenly spaced and the
//! tail is visible).
#![allow(dead_code)]

use std::{fmt::Write, path::PathBuf};

/// One picture: panels stacked top to bottom.
pub struct Figure {
    pub title: String,
    pub panels: Vec<Panel>,
}

pub enum Panel {
    /// Horizontal bars in groups: (group label, [(series, value)]).
    Bars { title: String, unit: String, groups: Vec<(String, Vec<(String, f64)>)> },
    /// Latency distributions: (series, samples in ms, any order).
    Percentiles { title: String, series: Vec<(String, Vec<f64>)> },
}

const WIDTH: f64 = 900.0;
const LEFT: f64 = 260.0;
const RIGHT: f64 = 90.0;
const COLORS: [&str; 6] = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377"];

/// Write `<name>.md` and `<name>.svg` into the bench directory, print the
/// table and where both went.
pub fn write(name: &str, table: &str, figure: &Figure) {
    println!("{table}");
    let dir = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into())).join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    let (md, svg) = (dir.join(format!("{name}.md")), dir.join(format!("{name}.svg")));
    std::fs::write(&md, table).unwrap();
    std::fs::write(&svg, figure.svg()).unwrap();
    eprintln!("written to {} and {}", md.display(), svg.display());
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A compact number: 12345 -> 12.3k.
fn short(v: f64) -> String {
    match v.abs() {
        a if a >= 1e6 => format!("{:.1}M", v / 1e6),
        a if a >= 1e4 => format!("{:.1}k", v / 1e3),
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

/// The `q` quantile of sorted samples.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// A round step for an axis reaching `max` in about 5 ticks.
fn step(max: f64) -> f64 {
    let raw = (max / 5.0).max(f64::MIN_POSITIVE);
    let base = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * base).find(|s| *s >= raw).unwrap_or(10.0 * base)
}

impl Figure {
    pub fn svg(&self) -> String {
        let mut body = String::new();
        let mut y = 40.0;
        for panel in &self.panels {
            y = panel.draw(&mut body, y) + 30.0;
        }
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{y}\" viewBox=\"0 0 {WIDTH} {y}\" \
             font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"10\" y=\"24\" font-size=\"16\" font-weight=\"bold\">{}</text>\n{body}</svg>\n",
            escape(&self.title)
        )
    }
}

impl Panel {
    /// Draw at `top`; returns the bottom.
    fn draw(&self, out: &mut String, top: f64) -> f64 {
        match self {
            Panel::Bars { title, unit, groups } => bars(out, top, title, unit, groups),
            Panel::Percentiles { title, series } => percentiles(out, top, title, series),
        }
    }
}

fn legend(out: &mut String, y: f64, names: &[&str]) {
    let mut x = LEFT;
    for (i, name) in names.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(out, "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{color}\"/>", y - 10.0);
        let _ = writeln!(out, "<text x=\"{}\" y=\"{y}\">{}</text>", x + 16.0, escape(name));
        x += 26.0 + 7.0 * name.len() as f64;
    }
}

fn bars(out: &mut String, top: f64, title: &str, unit: &str, groups: &[(String, Vec<(String, f64)>)]) -> f64 {
    let mut series: Vec<&str> = Vec::new();
    for (_, bars) in groups {
        for (name, _) in bars {
            if !series.contains(&name.as_str()) {
                series.push(name);
            }
        }
    }
    let max = groups.iter().flat_map(|(_, b)| b.iter().map(|(_, v)| *v)).fold(0.0, f64::max).max(f64::MIN_POSITIVE);
    let plot = WIDTH - LEFT - RIGHT;
    let _ =
        writeln!(out, "<text x=\"10\" y=\"{top}\" font-weight=\"bold\">{} ({})</text>", escape(title), escape(unit));
    let mut y = top + 12.0;
    if series.len() > 1 {
        legend(out, y + 10.0, &series);
        y += 20.0;
    }
    let (bar, gap) = (14.0, 10.0);
    for (label, values) in groups {
        let height = bar * values.len() as f64;
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            LEFT - 8.0,
            y + height / 2.0 + 4.0,
            escape(label)
        );
        for (i, (name, value)) in values.iter().enumerate() {
            let color = COLORS[series.iter().position(|s| s == name).unwrap_or(i) % COLORS.len()];
            let w = (plot * value / max).max(1.0);
            let by = y + bar * i as f64;
            let _ = writeln!(
                out,
                "<rect x=\"{LEFT}\" y=\"{by}\" width=\"{w:.1}\" height=\"{}\" fill=\"{color}\"/>",
                bar - 2.0
            );
            let _ =
                writeln!(out, "<text x=\"{:.1}\" y=\"{}\">{}</text>", LEFT + w + 4.0, by + bar - 4.0, short(*value));
        }
        y += height + gap;
    }
    y
}

/// y of quantile `q` on the log(1/(1-q)) scale, 0 at q = 0, 3 at p99.9.
fn nines(q: f64) -> f64 {
    -(1.0 - q.min(0.999)).log10()
}

fn percentiles(out: &mut String, top: f64, title: &str, series: &[(String, Vec<f64>)]) -> f64 {
    let sorted: Vec<(&str, Vec<f64>)> = series
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(n, v)| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            (n.as_str(), v)
        })
        .collect();
    let _ = writeln!(out, "<text x=\"10\" y=\"{top}\" font-weight=\"bold\">{} (ms)</text>", escape(title));
    let names: Vec<&str> = sorted.iter().map(|(n, _)| *n).collect();
    legend(out, top + 22.0, &names);
    let (x0, y0, w, h) = (LEFT, top + 40.0, WIDTH - LEFT - RIGHT, 220.0);
    let xmax = sorted.iter().map(|(_, v)| quantile(v, 0.999)).fold(0.0, f64::max).max(1.0);
    let xstep = step(xmax);
    let xmax = (xmax / xstep).ceil() * xstep;
    let px = |ms: f64| x0 + w * (ms / xmax).min(1.0);
    let py = |q: f64| y0 + h - h * nines(q) / 3.0;
    let _ = writeln!(out, "<rect x=\"{x0}\" y=\"{y0}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#999\"/>");
    for (q, label) in [(0.0, "p0"), (0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")] {
        let y = py(q);
        let _ = writeln!(out, "<line x1=\"{x0}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/>", x0 + w);
        let _ = writeln!(out, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>", x0 - 6.0, y + 4.0);
    }
    let mut tick = 0.0;
    while tick <= xmax + 1e-9 {
        let x = px(tick);
        let label = if xstep >= 1.0 { format!("{tick:.0}") } else { short(tick) };
        let _ = writeln!(out, "<line x1=\"{x:.1}\" y1=\"{y0}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#eee\"/>", y0 + h);
        let _ = writeln!(out, "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>", y0 + h + 16.0);
        tick += xstep;
    }
    for (i, (_, v)) in sorted.iter().enumerate() {
        let points: Vec<String> = (0..=300)
            .map(|k| {
                let q = 0.999 * k as f64 / 300.0;
                format!("{:.1},{:.1}", px(quantile(v, q)), py(q))
            })
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
            COLORS[i % COLORS.len()],
            points.join(" ")
        );
    }
    y0 + h + 24.0
}
