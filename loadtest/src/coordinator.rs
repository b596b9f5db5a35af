//! The coordinator: plans a run, starts its workers, walks them through the
//! phases, samples the server, prints progress, and builds the report.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

use crate::auth::Tokens;
use crate::cli::RunSpec;
use crate::report::{
    baseline_ratios, ClientCpu, MachineSample, Phases, Report, ServerSample, REPORT_FORMAT,
};
use crate::scenarios::{self, Window};
use crate::spawn::Spawned;
use crate::stats::{Counter, Merged};
use crate::sys::{self, CpuTimes};
use crate::target::{auto_sources, source_addrs, Placement};
use crate::workers::{client_config, Fleet, FromWorker, Heads, ToWorker, WorkerMode, WorkerPlan};

/// How a run is carried out, beyond its specification.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// The executable that worker processes and the baseline server are
    /// started from (default: this process's own).
    pub exe: Option<PathBuf>,
    /// Print progress lines on stderr.
    pub progress: bool,
}

impl RunOptions {
    fn exe(&self) -> anyhow::Result<PathBuf> {
        match &self.exe {
            Some(p) => Ok(p.clone()),
            None => std::env::current_exe().context("finding this executable to start workers"),
        }
    }
}

/// Runs `spec` (against a node it starts, when asked), then against a
/// baseline server when asked, and returns the report.
pub async fn run(spec: RunSpec, opts: &RunOptions) -> anyhow::Result<Report> {
    spec.scenario.validate()?;
    if spec.common.with_baseline {
        ensure!(
            spec.scenario.supports_baseline(),
            "--with-baseline: the baseline server speaks enough for connect, idle and fanout only"
        );
    }
    let run_id = new_run_id();
    let mut main_spec = spec.clone();
    let spawned = if let Some(bin) = &spec.common.spawn_node {
        Some(
            Spawned::node(
                bin,
                spec.common.node_config.as_deref(),
                &spec.common.jwt_secret,
                &spec.common.api_key,
                &run_id,
            )
            .await?,
        )
    } else if spec.common.spawn_baseline {
        ensure!(
            spec.scenario.supports_baseline(),
            "the baseline server runs connect, idle and fanout only"
        );
        Some(Spawned::baseline(&opts.exe()?).await?)
    } else {
        None
    };
    if let Some(s) = &spawned {
        main_spec.common.targets = vec![s.addr.to_string()];
        main_spec.common.server_pid = Some(s.pid);
    }
    let result = run_once(&main_spec, &run_id, opts).await;
    if let Some(s) = spawned {
        s.stop().await;
    }
    let mut report = result?;

    if spec.common.with_baseline {
        let base_server = Spawned::baseline(&opts.exe()?).await?;
        let mut base_spec = main_spec.clone();
        base_spec.common.targets = vec![base_server.addr.to_string()];
        base_spec.common.server_pid = Some(base_server.pid);
        if opts.progress {
            eprintln!(
                "now the same run against the baseline server (pid {})",
                base_server.pid
            );
        }
        let base = run_once(&base_spec, &new_run_id(), opts).await;
        base_server.stop().await;
        let mut base = base.context("the baseline run")?;
        base.label = Some("baseline".into());
        report.ratio_to_baseline = baseline_ratios(&report, &base);
        report.baseline = Some(Box::new(base));
    }
    Ok(report)
}

fn new_run_id() -> String {
    // Distinct across runs and processes, short enough for ids (<= 128 bytes with suffixes).
    format!(
        "lt{:x}{:03x}",
        sys::now_ns() / 1_000_000,
        std::process::id() & 0xfff
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Setup,
    Run,
    Drain,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Run => "run",
            Phase::Drain => "drain",
        }
    }

    /// Whether `ev` is the event that ends this phase for a worker.
    fn ends_with(self, ev: &FromWorker) -> bool {
        matches!(
            (self, ev),
            (Phase::Setup, FromWorker::Ready { .. })
                | (Phase::Run, FromWorker::Ran { .. })
                | (Phase::Drain, FromWorker::Done { .. })
        )
    }
}

/// One run against the targets in `spec`.
async fn run_once(spec: &RunSpec, run_id: &str, opts: &RunOptions) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    let cpu_t0 = sys::self_cpu();
    let started_unix_ms = sys::now_ns() / 1_000_000;
    let c = &spec.common;
    let conns = spec.scenario.connections();
    let workers = if c.workers > 0 {
        c.workers
    } else {
        conns.div_ceil(c.conns_per_worker.max(1)).max(1) as usize
    };
    let mut warnings = Vec::new();
    let nofile = sys::raise_nofile_limit();
    let per_process = conns.div_ceil(workers as u64);
    if nofile > 0 && per_process + 64 > nofile {
        warnings.push(format!(
            "{per_process} connections per process against an open-files limit of {nofile}: \
             raise --workers or lower --conns-per-worker"
        ));
    }
    let n_sources = if c.sources == 0 {
        auto_sources(conns)
    } else {
        c.sources
    };
    let base: Ipv4Addr = c
        .source_base
        .parse()
        .with_context(|| format!("--source-base {}", c.source_base))?;
    let sources = source_addrs(base, n_sources)?;
    let placement = Placement::new(&c.targets, sources.clone())?;
    let tokens = match &c.tokens_file {
        Some(p) => Tokens::from_file(p)?,
        None => Tokens::Minted {
            secret: c.jwt_secret.clone(),
            ttl: Duration::from_secs(3600),
        },
    };
    tokens.check_distinct(spec.scenario.distinct_users())?;
    let client = client_config(spec);
    let setup = scenarios::prepare(spec, run_id, &placement, &tokens, &client).await?;

    let mut probe = c.server_pid.map(Probe::new);
    let plans: Vec<WorkerPlan> = (0..workers)
        .map(|index| WorkerPlan {
            spec: spec.clone(),
            setup: setup.clone(),
            index,
            workers,
            run_id: run_id.to_string(),
            sources: sources.clone(),
        })
        .collect();
    let mode = if workers == 1 {
        WorkerMode::InProcess
    } else {
        WorkerMode::Processes(opts.exe()?)
    };
    let hard_end = t0 + Duration::from_secs_f64(c.max_seconds);
    let mut fleet = Fleet::start(plans, &mode).await?;
    let mut progress = Progress::new(spec, workers, opts.progress && c.progress_secs > 0.0);
    let mut phase_secs = Phases::default();

    let outcome = async {
        let setup_end =
            hard_end.min(Instant::now() + Duration::from_secs_f64(c.setup_timeout_secs));
        let ready = wait_phase(&mut fleet, Phase::Setup, setup_end, &mut progress).await?;
        phase_secs.setup = t0.elapsed().as_secs_f64();
        let open_ready = open_of(&progress.sum());
        if let Some(p) = &mut probe {
            p.ready(open_ready);
        }
        let go_at = Instant::now();
        let go_ns = sys::now_ns();
        let machine_go = sys::machine_busy_secs();
        fleet.send_all(ToWorker::Go).await;
        let run_end = hard_end.min(go_at + spec.scenario.run_bound(c));
        let ran = wait_phase(&mut fleet, Phase::Run, run_end, &mut progress).await?;
        let run_secs = go_at.elapsed().as_secs_f64();
        let machine_busy = match (machine_go, sys::machine_busy_secs()) {
            (Some(a), Some(b)) if run_secs > 0.0 => (b - a).max(0.0) / run_secs,
            _ => 0.0,
        };
        phase_secs.run = run_secs;
        if let Some(p) = &mut probe {
            p.end(open_of(&progress.sum()), run_secs);
        }
        let mut heads = Heads::new();
        let mut client_run_cpu = CpuTimes::default();
        for (r, d) in ready.iter().zip(&ran) {
            if let (
                FromWorker::Ready { cpu: before, .. },
                FromWorker::Ran {
                    heads: h,
                    cpu: after,
                    ..
                },
            ) = (r, d)
            {
                client_run_cpu = client_run_cpu.plus(after.minus(*before));
                for (ch, off) in h {
                    let e = heads.entry(ch.clone()).or_default();
                    *e = (*e).max(*off);
                }
            }
        }
        let drain_at = Instant::now();
        fleet.send_all(ToWorker::Finish { heads }).await;
        // Draining, then closing every connection.
        let drain_end = hard_end.min(drain_at + Duration::from_secs_f64(c.drain_secs + 120.0));
        let done = wait_phase(&mut fleet, Phase::Drain, drain_end, &mut progress).await?;
        phase_secs.drain = drain_at.elapsed().as_secs_f64();
        anyhow::Ok((done, go_ns, run_secs, client_run_cpu, machine_busy))
    }
    .await;
    let (done, go_ns, run_secs, client_run_cpu, machine_busy) = match outcome {
        Ok(v) => {
            fleet.shutdown(false).await;
            v
        }
        Err(e) => {
            fleet.shutdown(true).await;
            return Err(e);
        }
    };

    let mut merged = Merged::default();
    for ev in &done {
        if let FromWorker::Done { snapshot } = ev {
            merged.add(snapshot)?;
        }
    }
    if matches!(mode, WorkerMode::Processes(_)) {
        // The coordinator's own share.
        let own = sys::self_cpu().minus(cpu_t0);
        merged.cpu = merged.cpu.plus(own);
        merged.process_cpu.push(own);
    }
    let wall_secs = t0.elapsed().as_secs_f64();
    let to_last_event_secs = if merged.last_event_ns > go_ns {
        (merged.last_event_ns - go_ns) as f64 / 1e9
    } else {
        0.0
    };
    let window = Window {
        run_secs,
        to_last_event_secs,
    };

    let mut report = Report {
        format: REPORT_FORMAT,
        scenario: spec.scenario.name().to_string(),
        label: c.label.clone(),
        git_revision: sys::git_revision(&std::env::current_dir().unwrap_or_else(|_| ".".into())),
        started_unix_ms,
        params: spec.params(),
        targets: placement.targets.iter().map(|t| t.to_string()).collect(),
        sources: sources.iter().map(|s| s.to_string()).collect(),
        workers,
        wall_secs,
        phase_secs,
        ..Default::default()
    };
    let keys = spec.scenario.key_counters();
    for (k, v) in &merged.counters {
        if *v > 0 || keys.iter().any(|c| c.name() == k) {
            report.counts.insert(k.clone(), *v);
        }
    }
    report.set_histograms(&merged.histograms);
    report.throughput_per_sec = spec.scenario.throughput(&merged, window);
    report.errors = merged.errors.clone();
    let cores = sys::cores();
    let client_run_cores = if run_secs > 0.0 {
        client_run_cpu.total() / run_secs
    } else {
        0.0
    };
    report.client_cpu = ClientCpu {
        user_s: merged.cpu.user_s,
        sys_s: merged.cpu.sys_s,
        cores_used: if wall_secs > 0.0 {
            merged.cpu.total() / wall_secs
        } else {
            0.0
        },
        cores_used_run: client_run_cores,
        cores,
        processes: merged.process_cpu.len(),
    };
    report.server = probe.map(|p| p.sample);
    report.machine = MachineSample {
        cores,
        busy_cores_run: machine_busy,
        other_cores_run: report
            .server
            .as_ref()
            .map(|s| (machine_busy - client_run_cores - s.cores_used_run).max(0.0)),
    };
    warnings.extend(bottleneck_warnings(
        &merged,
        &report,
        client_run_cpu,
        run_secs,
        cores,
        wall_secs,
    ));
    report.warnings = warnings;
    Ok(report)
}

fn open_of(counters: &BTreeMap<String, u64>) -> u64 {
    let get = |c: Counter| counters.get(c.name()).copied().unwrap_or(0);
    get(Counter::ConnOpened).saturating_sub(get(Counter::ConnClosed) + get(Counter::ConnDropped))
}

/// When the harness, not the server, may be what limited the figures.
fn bottleneck_warnings(
    merged: &Merged,
    report: &Report,
    client_run_cpu: CpuTimes,
    run_secs: f64,
    cores: usize,
    wall_secs: f64,
) -> Vec<String> {
    let mut w = Vec::new();
    let client_run_cores = if run_secs > 0.0 {
        client_run_cpu.total() / run_secs
    } else {
        0.0
    };
    if run_secs >= 0.5 && client_run_cores >= 0.5 * cores as f64 {
        w.push(format!(
            "during the load the harness used {client_run_cores:.2} of this machine's {cores} cores, \
             which it shares with the server: the figures may be bounded by the harness"
        ));
    }
    if let Some(s) = &report.server {
        if run_secs >= 0.5 && client_run_cpu.total() > s.cpu_run_s && client_run_cores > 0.25 {
            w.push(format!(
                "during the load the harness used more CPU ({client_run_cores:.2} cores) than the server \
                 ({:.2} cores): the harness is likely the bottleneck",
                s.cores_used_run
            ));
        }
    }
    for (i, p) in merged.process_cpu.iter().enumerate() {
        // A process whose every runtime thread was busy the whole time could not keep up.
        if wall_secs >= 1.0 && p.total() / wall_secs >= 0.9 * cores as f64 {
            w.push(format!(
                "harness process {i} was CPU-saturated ({:.2} cores)",
                p.total() / wall_secs
            ));
        }
    }
    let m = &report.machine;
    if run_secs >= 0.5 && m.busy_cores_run >= 0.9 * cores as f64 {
        w.push(format!(
            "the machine was saturated during the load ({:.2} of {cores} cores busy): latency includes \
             waiting for a core",
            m.busy_cores_run
        ));
    }
    if let Some(other) = m.other_cores_run {
        if run_secs >= 0.5 && other >= 0.25 {
            w.push(format!(
                "{other:.2} cores were busy with neither the harness nor the server (other processes, or \
                 kernel network work): the figures are disturbed unless that is loopback traffic"
            ));
        }
    }
    let late = merged.count(Counter::LateSends);
    let sent = merged.count(Counter::Sent);
    if sent > 0 && late * 100 > sent {
        w.push(format!(
            "{late} of {sent} sends left more than 10 ms behind their schedule: the publishers could not \
             keep the rate (latency is still measured from the schedule)"
        ));
    }
    let failed = merged.count(Counter::ConnFailed);
    if failed > 0 {
        w.push(format!("{failed} connection attempts failed (see errors)"));
    }
    w
}

/// Waits until every worker ended `phase`, printing progress meanwhile.
async fn wait_phase(
    fleet: &mut Fleet,
    phase: Phase,
    deadline: Instant,
    progress: &mut Progress,
) -> anyhow::Result<Vec<FromWorker>> {
    let n = fleet.len();
    let mut got: Vec<Option<FromWorker>> = (0..n).map(|_| None).collect();
    let mut tick = tokio::time::interval(progress.every);
    tick.tick().await;
    while got.iter().any(Option::is_none) {
        tokio::select! {
            ev = fleet.next() => match ev {
                None => bail!("the workers went away during {}", phase.name()),
                Some((i, FromWorker::Progress { counters })) => progress.update(i, counters),
                Some((i, FromWorker::Failed { error })) => bail!("worker {i} failed: {error}"),
                Some((i, ev)) if phase.ends_with(&ev) => {
                    match &ev {
                        FromWorker::Ready { counters, .. } | FromWorker::Ran { counters, .. } => {
                            progress.update(i, counters.clone())
                        }
                        FromWorker::Done { snapshot } => progress.update(i, snapshot.counters.clone()),
                        _ => {}
                    }
                    if let Some(slot) = got.get_mut(i) {
                        *slot = Some(ev);
                    }
                }
                Some((i, other)) => bail!("worker {i}: unexpected {other:?} during {}", phase.name()),
            },
            _ = tokio::time::sleep_until(deadline.into()) => {
                let missing = got.iter().filter(|g| g.is_none()).count();
                bail!(
                    "{missing} of {n} workers did not finish the {} phase in time (the run is bounded; \
                     see --setup-timeout-secs, --drain-secs, --max-seconds)",
                    phase.name()
                );
            }
            _ = tick.tick() => progress.print(phase),
        }
    }
    Ok(got.into_iter().flatten().collect())
}

/// The server process, sampled around the load.
struct Probe {
    sample: ServerSample,
    cpu_ready: Option<CpuTimes>,
}

impl Probe {
    fn new(pid: u32) -> Probe {
        let sample = ServerSample {
            pid,
            rss_before_kib: sys::rss_kib(pid).unwrap_or(0),
            ..Default::default()
        };
        Probe {
            sample,
            cpu_ready: None,
        }
    }

    fn ready(&mut self, open: u64) {
        self.sample.rss_ready_kib = sys::rss_kib(self.sample.pid).unwrap_or(0);
        self.sample.open_ready = open;
        self.cpu_ready = sys::process_cpu(self.sample.pid);
    }

    fn end(&mut self, open: u64, run_secs: f64) {
        self.sample.rss_end_kib = sys::rss_kib(self.sample.pid).unwrap_or(0);
        self.sample.open_end = open;
        if let (Some(a), Some(b)) = (self.cpu_ready, sys::process_cpu(self.sample.pid)) {
            self.sample.cpu_run_s = b.minus(a).total();
            self.sample.cores_used_run = if run_secs > 0.0 {
                self.sample.cpu_run_s / run_secs
            } else {
                0.0
            };
        }
        self.sample.compute_per_connection();
    }
}

/// The progress line.
struct Progress {
    enabled: bool,
    tty: bool,
    every: Duration,
    scenario: &'static str,
    fields: &'static [Counter],
    latest: Vec<BTreeMap<String, u64>>,
    started: Instant,
    last: Option<(Instant, BTreeMap<String, u64>)>,
}

impl Progress {
    fn new(spec: &RunSpec, workers: usize, enabled: bool) -> Progress {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            every: if enabled {
                Duration::from_secs_f64(spec.common.progress_secs.max(0.05))
            } else {
                Duration::from_secs(3600)
            },
            scenario: spec.scenario.name(),
            fields: spec.scenario.progress_counters(),
            latest: vec![BTreeMap::new(); workers],
            started: Instant::now(),
            last: None,
        }
    }

    fn update(&mut self, worker: usize, counters: BTreeMap<String, u64>) {
        if let Some(slot) = self.latest.get_mut(worker) {
            *slot = counters;
        }
    }

    fn sum(&self) -> BTreeMap<String, u64> {
        let mut sum = BTreeMap::new();
        for m in &self.latest {
            for (k, v) in m {
                *sum.entry(k.clone()).or_default() += v;
            }
        }
        sum
    }

    fn print(&mut self, phase: Phase) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let sum = self.sum();
        let get = |m: &BTreeMap<String, u64>, c: Counter| m.get(c.name()).copied().unwrap_or(0);
        let mut line = format!(
            "[{} {:<5} {:>6.1}s] open {}",
            self.scenario,
            phase.name(),
            self.started.elapsed().as_secs_f64(),
            open_of(&sum)
        );
        for c in self.fields {
            let v = get(&sum, *c);
            line.push_str(&format!(" | {} {v}", c.name()));
            if let Some((at, prev)) = &self.last {
                let dt = now.duration_since(*at).as_secs_f64();
                if dt > 0.0 {
                    let rate = v.saturating_sub(get(prev, *c)) as f64 / dt;
                    line.push_str(&format!(" ({rate:.0}/s)"));
                }
            }
        }
        line.push_str(&format!(" | errors {}", get(&sum, Counter::Errors)));
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
        self.last = Some((now, sum));
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.enabled && self.tty && self.last.is_some() {
            eprintln!();
        }
    }
}
