//! The run's report: JSON for machines (`--out`), a summary for people, and
//! `compare`, which sets two reports side by side.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::stats::encode_histogram;

/// Version of the report's layout.
pub const REPORT_FORMAT: u32 = 1;

/// Latency percentiles of one kind, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// The harness's own CPU use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientCpu {
    pub user_s: f64,
    pub sys_s: f64,
    /// CPU seconds per wall second, over the whole run.
    pub cores_used: f64,
    /// The same during the load phase only.
    pub cores_used_run: f64,
    /// Cores on this machine.
    pub cores: usize,
    pub processes: usize,
}

/// What was seen of the server process, when its pid was known.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerSample {
    pub pid: u32,
    /// VmRSS before any connection, once all were set up, and when the load ended.
    pub rss_before_kib: u64,
    pub rss_ready_kib: u64,
    pub rss_end_kib: u64,
    /// Connections open at the two later samples.
    pub open_ready: u64,
    pub open_end: u64,
    /// RSS growth per open connection, at the sample with more connections open.
    pub rss_per_connection_bytes: Option<f64>,
    /// Server CPU seconds during the load phase, and in cores.
    pub cpu_run_s: f64,
    pub cores_used_run: f64,
}

impl ServerSample {
    pub fn compute_per_connection(&mut self) {
        let (rss, open) = if self.open_end > self.open_ready {
            (self.rss_end_kib, self.open_end)
        } else {
            (self.rss_ready_kib, self.open_ready)
        };
        self.rss_per_connection_bytes =
            (open > 0).then(|| (rss as f64 - self.rss_before_kib as f64) * 1024.0 / open as f64);
    }
}

/// Seconds spent in each phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    /// Connecting, joining, subscribing.
    pub setup: f64,
    /// The load.
    pub run: f64,
    /// Waiting for the last deliveries, then closing.
    pub drain: f64,
}

/// The whole machine during the load phase (it is shared by harness, server
/// and whatever else runs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineSample {
    pub cores: usize,
    /// Busy cores, all processes and the kernel's network work included.
    pub busy_cores_run: f64,
    /// Busy cores charged neither to the harness nor to the server (when its
    /// pid is known): other processes, and kernel work on their behalf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_cores_run: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub format: u32,
    pub scenario: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub git_revision: String,
    pub started_unix_ms: u64,
    /// The run's parameters (without secrets).
    pub params: serde_json::Value,
    pub targets: Vec<String>,
    pub sources: Vec<String>,
    pub workers: usize,
    pub wall_secs: f64,
    pub phase_secs: Phases,
    pub counts: BTreeMap<String, u64>,
    pub latency_ms: BTreeMap<String, Percentiles>,
    pub throughput_per_sec: BTreeMap<String, f64>,
    /// Errors by cause.
    pub errors: BTreeMap<String, u64>,
    pub client_cpu: ClientCpu,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerSample>,
    #[serde(default)]
    pub machine: MachineSample,
    pub warnings: Vec<String>,
    /// The same scenario against the bundled baseline server, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<Report>>,
    /// This run's figures divided by the baseline's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ratio_to_baseline: BTreeMap<String, f64>,
    /// The merged histograms (HdrHistogram V2, base64, microseconds), to re-merge or re-read.
    #[serde(default)]
    pub histograms: BTreeMap<String, String>,
}

impl Report {
    pub fn set_histograms(&mut self, hists: &BTreeMap<String, Histogram<u64>>) {
        for (k, h) in hists {
            self.latency_ms.insert(k.clone(), Percentiles::of(h));
            if let Ok(text) = encode_histogram(h) {
                self.histograms.insert(k.clone(), text);
            }
        }
    }

    /// Every number worth comparing, by a dotted name.
    pub fn figures(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (k, v) in &self.counts {
            out.insert(format!("counts.{k}"), *v as f64);
        }
        for (k, p) in &self.latency_ms {
            for (name, v) in [
                ("p50", p.p50),
                ("p90", p.p90),
                ("p99", p.p99),
                ("p99_9", p.p99_9),
                ("max", p.max),
            ] {
                out.insert(format!("latency_ms.{k}.{name}"), v);
            }
        }
        for (k, v) in &self.throughput_per_sec {
            out.insert(format!("throughput_per_sec.{k}"), *v);
        }
        out.insert("client_cpu.cores_used".into(), self.client_cpu.cores_used);
        out.insert(
            "client_cpu.cores_used_run".into(),
            self.client_cpu.cores_used_run,
        );
        out.insert("machine.busy_cores_run".into(), self.machine.busy_cores_run);
        out.insert(
            "client_cpu.total_s".into(),
            self.client_cpu.user_s + self.client_cpu.sys_s,
        );
        if let Some(s) = &self.server {
            if let Some(b) = s.rss_per_connection_bytes {
                out.insert("server.rss_per_connection_bytes".into(), b);
            }
            out.insert("server.cpu_run_s".into(), s.cpu_run_s);
            out.insert("server.cores_used_run".into(), s.cores_used_run);
        }
        out.insert("wall_secs".into(), self.wall_secs);
        out
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let rev: String = self.git_revision.chars().take(12).collect();
        let _ = writeln!(
            s,
            "chorus-loadtest {} · rev {rev} · {} target(s) · {} source address(es) · {} worker process(es) · {:.1} s",
            self.scenario,
            self.targets.len(),
            self.sources.len(),
            self.workers,
            self.wall_secs
        );
        if let Some(l) = &self.label {
            let _ = writeln!(s, "  label: {l}");
        }
        let p = &self.phase_secs;
        let _ = writeln!(
            s,
            "  phases: setup {:.1} s, run {:.1} s, drain {:.1} s",
            p.setup, p.run, p.drain
        );
        let _ = writeln!(s, "  counts:");
        for (k, v) in &self.counts {
            let _ = writeln!(s, "    {k:<28} {v}");
        }
        if !self.throughput_per_sec.is_empty() {
            let _ = writeln!(s, "  throughput:");
            for (k, v) in &self.throughput_per_sec {
                let _ = writeln!(s, "    {k:<28} {v:.1}");
            }
        }
        if !self.latency_ms.is_empty() {
            let _ = writeln!(
                s,
                "  latency (ms)                    count       p50       p90       p99     p99.9       max"
            );
            for (k, p) in &self.latency_ms {
                let _ = writeln!(
                    s,
                    "    {k:<26} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                    p.count, p.p50, p.p90, p.p99, p.p99_9, p.max
                );
            }
        }
        if self.errors.is_empty() {
            let _ = writeln!(s, "  errors: none");
        } else {
            let _ = writeln!(s, "  errors:");
            for (k, v) in &self.errors {
                let _ = writeln!(s, "    {v:>8}  {k}");
            }
        }
        let c = &self.client_cpu;
        let _ = writeln!(
            s,
            "  client cpu: {:.1} s user + {:.1} s sys = {:.2} of {} cores over the run, {:.2} during the load; {} process(es)",
            c.user_s, c.sys_s, c.cores_used, c.cores, c.cores_used_run, c.processes
        );
        let m = &self.machine;
        let other = m
            .other_cores_run
            .map(|o| format!(", {o:.2} not the harness's nor the server's"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "  machine during the load: {:.2} of {} cores busy{other}",
            m.busy_cores_run, m.cores
        );
        if let Some(sv) = &self.server {
            let per = sv
                .rss_per_connection_bytes
                .map(|b| format!(", {:.1} KiB per open connection", b / 1024.0))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "  server pid {}: rss {:.1} MiB before, {:.1} MiB set up ({} open), {:.1} MiB at end ({} open){per}; \
                 cpu {:.1} s in the run = {:.2} cores",
                sv.pid,
                sv.rss_before_kib as f64 / 1024.0,
                sv.rss_ready_kib as f64 / 1024.0,
                sv.open_ready,
                sv.rss_end_kib as f64 / 1024.0,
                sv.open_end,
                sv.cpu_run_s,
                sv.cores_used_run
            );
        }
        if !self.ratio_to_baseline.is_empty() {
            let _ = writeln!(s, "  ratio to the baseline server (this run / baseline):");
            for (k, v) in &self.ratio_to_baseline {
                let _ = writeln!(s, "    {k:<44} {v:.3}");
            }
        }
        for w in &self.warnings {
            let _ = writeln!(s, "  WARNING: {w}");
        }
        s
    }
}

/// One line of `compare`.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub figure: String,
    pub a: f64,
    pub b: f64,
    /// `b / a`; `None` when `a` is 0.
    pub ratio: Option<f64>,
}

/// Every figure the two reports share, with its ratio B/A.
pub fn compare(a: &Report, b: &Report) -> Vec<Row> {
    let fa = a.figures();
    let fb = b.figures();
    fa.iter()
        .filter_map(|(k, va)| {
            let vb = *fb.get(k)?;
            Some(Row {
                figure: k.clone(),
                a: *va,
                b: vb,
                ratio: (*va != 0.0).then(|| vb / va),
            })
        })
        .collect()
}

/// Parameters that differ between two reports (dotted names).
pub fn param_differences(a: &Report, b: &Report) -> Vec<String> {
    let mut fa = BTreeMap::new();
    let mut fb = BTreeMap::new();
    flatten("", &a.params, &mut fa);
    flatten("", &b.params, &mut fb);
    let keys: std::collections::BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
    keys.into_iter()
        .filter(|k| fa.get(*k) != fb.get(*k))
        .map(|k| {
            let show =
                |m: &BTreeMap<String, String>| m.get(k).cloned().unwrap_or_else(|| "-".into());
            format!("{k}: {} vs {}", show(&fa), show(&fb))
        })
        .collect()
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The `compare` output.
pub fn render_comparison(a: &Report, b: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "A: {} rev {} ({})",
        a.scenario,
        a.git_revision,
        a.label.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        s,
        "B: {} rev {} ({})",
        b.scenario,
        b.git_revision,
        b.label.as_deref().unwrap_or("-")
    );
    if a.scenario != b.scenario {
        let _ = writeln!(
            s,
            "WARNING: different scenarios; only shared figures are compared"
        );
    }
    let diffs = param_differences(a, b);
    if !diffs.is_empty() {
        let _ = writeln!(s, "parameters that differ:");
        for d in diffs {
            let _ = writeln!(s, "  {d}");
        }
    }
    let _ = writeln!(s, "{:<52} {:>14} {:>14} {:>9}", "figure", "A", "B", "B/A");
    for r in compare(a, b) {
        let ratio = r
            .ratio
            .map(|x| format!("{x:.3}"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<52} {:>14.3} {:>14.3} {:>9}",
            r.figure, r.a, r.b, ratio
        );
    }
    s
}

/// The headline ratios of a run to its baseline run.
pub fn baseline_ratios(run: &Report, base: &Report) -> BTreeMap<String, f64> {
    let wanted = |k: &str| {
        k.starts_with("throughput_per_sec.")
            || k.starts_with("server.rss_per_connection_bytes")
            || k.starts_with("server.cores_used_run")
            || (k.starts_with("latency_ms.") && (k.ends_with(".p50") || k.ends_with(".p99")))
    };
    compare(base, run)
        .into_iter()
        .filter(|r| wanted(&r.figure))
        .filter_map(|r| Some((r.figure, r.ratio?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(delivered: u64, p99: f64, rate: f64) -> Report {
        let mut r = Report {
            format: REPORT_FORMAT,
            scenario: "fanout".into(),
            ..Default::default()
        };
        r.counts.insert("deliveries".into(), delivered);
        r.counts.insert("lost".into(), 0);
        r.latency_ms.insert(
            "publish_to_delivery".into(),
            Percentiles {
                count: 10,
                p99,
                ..Default::default()
            },
        );
        r.throughput_per_sec
            .insert("deliveries_per_sec".into(), rate);
        r.params = serde_json::json!({"scenario": {"subscribers": 10, "rooms": 1}});
        r
    }

    #[test]
    fn compare_gives_ratios_of_shared_figures() {
        let a = report(1000, 20.0, 5000.0);
        let mut b = report(2000, 10.0, 12500.0);
        b.params = serde_json::json!({"scenario": {"subscribers": 20, "rooms": 1}});
        b.counts.insert("only_in_b".into(), 3);
        let rows = compare(&a, &b);
        let get = |k: &str| rows.iter().find(|r| r.figure == k).cloned().unwrap();
        assert_eq!(get("counts.deliveries").ratio, Some(2.0));
        assert_eq!(get("latency_ms.publish_to_delivery.p99").ratio, Some(0.5));
        assert_eq!(
            get("throughput_per_sec.deliveries_per_sec").ratio,
            Some(2.5)
        );
        assert_eq!(get("counts.lost").ratio, None, "0 in A has no ratio");
        assert!(rows.iter().all(|r| r.figure != "counts.only_in_b"));
        assert_eq!(
            param_differences(&a, &b),
            vec!["scenario.subscribers: 10 vs 20".to_string()]
        );
        let text = render_comparison(&a, &b);
        assert!(
            text.contains("throughput_per_sec.deliveries_per_sec"),
            "{text}"
        );
        assert!(text.contains("2.500"), "{text}");
    }

    #[test]
    fn reports_survive_json() {
        let mut a = report(5, 1.0, 2.0);
        let mut h = crate::stats::new_histogram();
        for v in [100, 200, 300, 40_000] {
            h.record(v).unwrap();
        }
        a.set_histograms(&BTreeMap::from([("handshake".to_string(), h)]));
        let p = &a.latency_ms["handshake"];
        assert_eq!(p.count, 4);
        assert!((p.max - 40.0).abs() < 0.1, "{p:?}");
        let back: Report = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.latency_ms, a.latency_ms);
        assert_eq!(back.counts, a.counts);
        let h2 = crate::stats::decode_histogram(&back.histograms["handshake"]).unwrap();
        assert_eq!(h2.len(), 4);
    }

    #[test]
    fn baseline_ratios_pick_headline_figures() {
        let base = report(1000, 10.0, 10000.0);
        let run = report(1000, 30.0, 5000.0);
        let r = baseline_ratios(&run, &base);
        assert_eq!(r["throughput_per_sec.deliveries_per_sec"], 0.5);
        assert_eq!(r["latency_ms.publish_to_delivery.p99"], 3.0);
        assert!(!r.contains_key("counts.deliveries"));
    }

    #[test]
    fn memory_per_connection_uses_the_fuller_sample() {
        let mut s = ServerSample {
            rss_before_kib: 1000,
            rss_ready_kib: 3000,
            open_ready: 1024,
            rss_end_kib: 2000,
            open_end: 10,
            ..Default::default()
        };
        s.compute_per_connection();
        assert_eq!(s.rss_per_connection_bytes, Some(2000.0));
    }
}
