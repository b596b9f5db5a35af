//! Workers: the processes (or the one in-process task) that hold the connections.
//!
//! A run is split by connection index: worker `w` of `W` owns the units
//! (connections, rooms, groups, users) whose index is `w mod W`. Every worker
//! goes through the same phases, driven by the coordinator:
//!
//! ```text
//! coordinator                         worker
//!   plan ───────────────────────────▶ connect, join, subscribe
//!        ◀─────────────────────────── Ready      (server memory sampled)
//!   Go   ───────────────────────────▶ the load
//!        ◀─────────────────────────── Ran{heads} (each channel's last offset it wrote)
//!   Finish{heads merged} ───────────▶ drain deliveries up to the heads, close
//!        ◀─────────────────────────── Done{snapshot}
//! ```
//!
//! `Progress` events flow every second meanwhile. A worker process receives
//! its plan and commands as JSON lines on stdin and writes events as JSON
//! lines on stdout (stderr is left to humans); an in-process worker uses the
//! same types over channels, so both paths run the same code.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::auth::{Identity, Tokens};
use crate::cli::RunSpec;
use crate::client::{self, ClientConfig, Conn, ConnectError, PushHandler};
use crate::scenarios::{self, SetupData};
use crate::stats::{Counter, Snapshot, Stats};
use crate::sys::{self, CpuTimes};
use crate::target::Placement;

/// Each channel's highest offset written during the run.
pub type Heads = BTreeMap<String, u64>;

/// What one worker is to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerPlan {
    pub spec: RunSpec,
    /// What the coordinator prepared (rooms created, ...).
    pub setup: SetupData,
    pub index: usize,
    pub workers: usize,
    /// Prefix of every user and room name of this run, so runs never collide.
    pub run_id: String,
    pub sources: Vec<Ipv4Addr>,
}

/// Coordinator → worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ToWorker {
    Go,
    Finish { heads: Heads },
    Abort,
}

/// Worker → coordinator.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum FromWorker {
    Progress {
        counters: BTreeMap<String, u64>,
    },
    /// `cpu`: the worker process's CPU time so far, to measure the load phase's share.
    Ready {
        counters: BTreeMap<String, u64>,
        cpu: CpuTimes,
    },
    Ran {
        heads: Heads,
        counters: BTreeMap<String, u64>,
        cpu: CpuTimes,
    },
    Done {
        snapshot: Snapshot,
    },
    Failed {
        error: String,
    },
}

/// Self-test faults: the Nth entry push a worker receives is dropped or
/// doubled before it is counted, to prove loss and duplicates are reported.
#[derive(Debug, Default)]
pub struct Faults {
    drop_nth: Option<u64>,
    dup_nth: Option<u64>,
    seen: AtomicU64,
}

impl Faults {
    pub fn new(drop_nth: Option<u64>, dup_nth: Option<u64>) -> Faults {
        Faults {
            drop_nth,
            dup_nth,
            seen: AtomicU64::new(0),
        }
    }

    /// How many times to count the entry push just received (0, 1 or 2).
    pub fn copies(&self) -> usize {
        if self.drop_nth.is_none() && self.dup_nth.is_none() {
            return 1;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if Some(n) == self.drop_nth {
            0
        } else if Some(n) == self.dup_nth {
            2
        } else {
            1
        }
    }
}

/// What a scenario's worker side works with.
pub struct WorkerCtx {
    pub plan: Arc<WorkerPlan>,
    pub stats: Arc<Stats>,
    pub tokens: Arc<Tokens>,
    pub placement: Arc<Placement>,
    pub client: ClientConfig,
    pub faults: Arc<Faults>,
    events: mpsc::Sender<FromWorker>,
    commands: mpsc::Receiver<ToWorker>,
}

impl WorkerCtx {
    fn new(
        plan: WorkerPlan,
        events: mpsc::Sender<FromWorker>,
        commands: mpsc::Receiver<ToWorker>,
    ) -> anyhow::Result<WorkerCtx> {
        let c = &plan.spec.common;
        let tokens = match &c.tokens_file {
            Some(path) => Tokens::from_file(path)?,
            None => Tokens::Minted {
                secret: c.jwt_secret.clone(),
                ttl: Duration::from_secs_f64(c.max_seconds + 3600.0),
            },
        };
        let placement = Placement::new(&c.targets, plan.sources.clone())?;
        let client = client_config(&plan.spec);
        let faults = Faults::new(c.inject_drop, c.inject_duplicate);
        Ok(WorkerCtx {
            stats: Arc::new(Stats::new()),
            tokens: Arc::new(tokens),
            placement: Arc::new(placement),
            client,
            faults: Arc::new(faults),
            plan: Arc::new(plan),
            events,
            commands,
        })
    }

    pub fn spec(&self) -> &RunSpec {
        &self.plan.spec
    }

    pub fn run_id(&self) -> &str {
        &self.plan.run_id
    }

    /// Whether unit `i` (a connection, room, group or user) is this worker's.
    pub fn mine(&self, i: u64) -> bool {
        i % self.plan.workers as u64 == self.plan.index as u64
    }

    /// This worker's share of a rate given for the whole run.
    pub fn share(&self, rate: f64) -> f64 {
        rate / self.plan.workers as f64
    }

    pub fn drain_limit(&self) -> Duration {
        Duration::from_secs_f64(self.spec().common.drain_secs.max(0.0))
    }

    pub fn identity(&self, index: u64, name: &str) -> anyhow::Result<Identity> {
        Ok(self.tokens.identity(index, name)?)
    }

    /// Opens connection `index` to its target from its source address.
    pub async fn connect<H: PushHandler>(
        &self,
        index: u64,
        who: &Identity,
        handler: H,
    ) -> Result<Arc<Conn>, ConnectError> {
        client::connect(
            &self.client,
            self.placement.target(index),
            self.placement.source(index),
            index,
            who,
            &self.stats,
            handler,
        )
        .await
    }

    /// Opens many connections (number, identity, push handler), at most
    /// `--concurrency` handshakes at a time, paced at `rate` per second for
    /// this process when positive, trying none after `until`. Results come
    /// back in the order given (`None`: failed or not tried).
    pub async fn open_many<H: PushHandler>(
        &self,
        items: Vec<(u64, Identity, H)>,
        rate: f64,
        until: Option<tokio::time::Instant>,
        mark_events: bool,
    ) -> Vec<Option<Arc<Conn>>> {
        let start = tokio::time::Instant::now();
        let concurrency = self.spec().common.concurrency.max(1);
        futures_util::stream::iter(items.into_iter().enumerate())
            .map(|(k, (index, who, handler))| async move {
                if rate > 0.0 {
                    tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / rate))
                        .await;
                }
                if until.is_some_and(|u| tokio::time::Instant::now() >= u) {
                    self.stats.incr(Counter::ConnNotTried);
                    return None;
                }
                let conn = self.connect(index, &who, handler).await.ok();
                if mark_events && conn.is_some() {
                    self.stats.mark_event();
                }
                conn
            })
            .buffered(concurrency)
            .collect()
            .await
    }

    async fn next_command(&mut self) -> anyhow::Result<ToWorker> {
        match self.commands.recv().await {
            Some(ToWorker::Abort) => bail!("aborted by the coordinator"),
            Some(cmd) => Ok(cmd),
            None => bail!("the coordinator went away"),
        }
    }

    async fn emit(&self, ev: FromWorker) -> anyhow::Result<()> {
        self.events
            .send(ev)
            .await
            .map_err(|_| anyhow!("the coordinator went away"))
    }

    /// Setup is done: tells the coordinator, and waits for `Go`.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        self.emit(FromWorker::Ready {
            counters: self.stats.counters(),
            cpu: sys::self_cpu(),
        })
        .await?;
        match self.next_command().await? {
            ToWorker::Go => Ok(()),
            other => bail!("expected Go, got {other:?}"),
        }
    }

    /// The load is done: reports the heads this worker wrote, and waits for
    /// every worker's, merged.
    pub async fn ran(&mut self, heads: Heads) -> anyhow::Result<Heads> {
        let counters = self.stats.counters();
        self.emit(FromWorker::Ran {
            heads,
            counters,
            cpu: sys::self_cpu(),
        })
        .await?;
        match self.next_command().await? {
            ToWorker::Finish { heads } => Ok(heads),
            other => bail!("expected Finish, got {other:?}"),
        }
    }
}

pub fn client_config(spec: &RunSpec) -> ClientConfig {
    let c = &spec.common;
    ClientConfig {
        encoding: c.encoding.encoding(),
        read_buffer: c.read_buffer.max(256),
        connect_timeout: Duration::from_secs_f64(c.connect_timeout_secs.max(0.001)),
        request_timeout: Duration::from_secs_f64(c.request_timeout_secs.max(0.001)),
    }
}

/// Runs one worker to its end; the last event is `Done` or `Failed`.
pub async fn run_worker(
    plan: WorkerPlan,
    events: mpsc::Sender<FromWorker>,
    commands: mpsc::Receiver<ToWorker>,
) {
    // This worker's CPU, not the process's so far (an in-process worker
    // shares its process with earlier runs).
    let cpu_start = sys::self_cpu();
    let progress_every = plan.spec.common.progress_secs;
    let ctx = match WorkerCtx::new(plan, events.clone(), commands) {
        Ok(c) => c,
        Err(e) => {
            let _ = events
                .send(FromWorker::Failed {
                    error: format!("{e:#}"),
                })
                .await;
            return;
        }
    };
    let stats = ctx.stats.clone();
    let progress = (progress_every > 0.0).then(|| {
        let events = events.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(progress_every));
            tick.tick().await;
            loop {
                tick.tick().await;
                if events
                    .send(FromWorker::Progress {
                        counters: stats.counters(),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    });
    let result = scenarios::run_worker(ctx).await;
    if let Some(p) = progress {
        p.abort();
    }
    let last = match result.and_then(|()| Ok(stats.snapshot(sys::self_cpu().minus(cpu_start))?)) {
        Ok(snapshot) => FromWorker::Done { snapshot },
        Err(e) => FromWorker::Failed {
            error: format!("{e:#}"),
        },
    };
    // If the coordinator is gone there is nobody left to tell.
    let _ = events.send(last).await;
}

/// The `worker` subcommand: plan and commands on stdin, events on stdout.
pub async fn worker_main() -> anyhow::Result<()> {
    sys::raise_nofile_limit();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines.next_line().await?.context("no plan on stdin")?;
    let plan: WorkerPlan = serde_json::from_str(&first).context("reading the plan")?;
    let index = plan.index;
    let (ev_tx, mut ev_rx) = mpsc::channel(64);
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let stdin_task = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<ToWorker>(&line) {
                Ok(cmd) => {
                    if cmd_tx.send(cmd).await.is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("worker {index}: unreadable command: {e}"),
            }
        }
        // End of stdin drops cmd_tx: the worker's next wait fails and it stops.
    });
    let worker = tokio::spawn(run_worker(plan, ev_tx, cmd_rx));
    let mut out = tokio::io::stdout();
    while let Some(ev) = ev_rx.recv().await {
        let last = matches!(ev, FromWorker::Done { .. } | FromWorker::Failed { .. });
        let mut line = serde_json::to_vec(&ev)?;
        line.push(b'\n');
        out.write_all(&line).await?;
        out.flush().await?;
        if last {
            break;
        }
    }
    stdin_task.abort();
    worker.await?;
    Ok(())
}

/// How the coordinator runs its workers.
#[derive(Clone, Debug)]
pub enum WorkerMode {
    /// One worker, as a task of this process.
    InProcess,
    /// Processes of this executable (`<exe> worker`).
    Processes(PathBuf),
}

/// The coordinator's handle on its workers.
pub struct Fleet {
    senders: Vec<mpsc::Sender<ToWorker>>,
    events: mpsc::Receiver<(usize, FromWorker)>,
    children: Vec<tokio::process::Child>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    pub async fn start(plans: Vec<WorkerPlan>, mode: &WorkerMode) -> anyhow::Result<Fleet> {
        let (ev_tx, events) = mpsc::channel(256);
        let mut fleet = Fleet {
            senders: Vec::new(),
            events,
            children: Vec::new(),
            tasks: Vec::new(),
        };
        for plan in plans {
            let index = plan.index;
            let (cmd_tx, cmd_rx) = mpsc::channel(8);
            fleet.senders.push(cmd_tx);
            match mode {
                WorkerMode::InProcess => {
                    let (wtx, mut wrx) = mpsc::channel(64);
                    fleet
                        .tasks
                        .push(tokio::spawn(run_worker(plan, wtx, cmd_rx)));
                    let ev_tx = ev_tx.clone();
                    fleet.tasks.push(tokio::spawn(async move {
                        while let Some(ev) = wrx.recv().await {
                            if ev_tx.send((index, ev)).await.is_err() {
                                break;
                            }
                        }
                    }));
                }
                WorkerMode::Processes(exe) => {
                    fleet
                        .spawn_process(exe, plan, cmd_rx, ev_tx.clone())
                        .await?;
                }
            }
        }
        Ok(fleet)
    }

    async fn spawn_process(
        &mut self,
        exe: &Path,
        plan: WorkerPlan,
        mut commands: mpsc::Receiver<ToWorker>,
        events: mpsc::Sender<(usize, FromWorker)>,
    ) -> anyhow::Result<()> {
        let index = plan.index;
        let mut child = tokio::process::Command::new(exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker process {}", exe.display()))?;
        let mut stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut first = serde_json::to_vec(&plan)?;
        first.push(b'\n');
        stdin
            .write_all(&first)
            .await
            .context("sending the plan to a worker")?;
        stdin.flush().await?;
        self.tasks.push(tokio::spawn(async move {
            while let Some(cmd) = commands.recv().await {
                let Ok(mut line) = serde_json::to_vec(&cmd) else {
                    break;
                };
                line.push(b'\n');
                if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                    break;
                }
            }
        }));
        self.tasks.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut finished = false;
            while let Ok(Some(line)) = lines.next_line().await {
                let ev = match serde_json::from_str::<FromWorker>(&line) {
                    Ok(ev) => ev,
                    Err(e) => FromWorker::Failed {
                        error: format!("unreadable worker output: {e}"),
                    },
                };
                finished = matches!(ev, FromWorker::Done { .. } | FromWorker::Failed { .. });
                if events.send((index, ev)).await.is_err() || finished {
                    break;
                }
            }
            if !finished {
                let error = "worker process exited before finishing".to_string();
                let _ = events.send((index, FromWorker::Failed { error })).await;
            }
        }));
        self.children.push(child);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    pub async fn send_all(&self, cmd: ToWorker) {
        for s in &self.senders {
            // A worker that is gone reports it through its events.
            let _ = s.send(cmd.clone()).await;
        }
    }

    pub async fn next(&mut self) -> Option<(usize, FromWorker)> {
        self.events.recv().await
    }

    /// Aborts whatever still runs and reaps the worker processes.
    pub async fn shutdown(mut self, abort: bool) {
        if abort {
            self.send_all(ToWorker::Abort).await;
        }
        self.senders.clear();
        for mut child in self.children.drain(..) {
            match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    // Our own child, by its handle.
                    let _ = child.kill().await;
                }
            }
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_hit_the_nth_push_only() {
        let f = Faults::new(Some(2), Some(4));
        let copies: Vec<usize> = (0..6).map(|_| f.copies()).collect();
        assert_eq!(copies, vec![1, 0, 1, 2, 1, 1]);
        let none = Faults::default();
        assert!((0..10).all(|_| none.copies() == 1));
    }

    #[test]
    fn protocol_lines_round_trip() {
        let cmd = ToWorker::Finish {
            heads: Heads::from([("room:a".to_string(), 7)]),
        };
        let back: ToWorker = serde_json::from_str(&serde_json::to_string(&cmd).unwrap()).unwrap();
        assert!(matches!(back, ToWorker::Finish { heads } if heads["room:a"] == 7));
        let ev = FromWorker::Failed { error: "x".into() };
        let text = serde_json::to_string(&ev).unwrap();
        assert!(text.contains("\"event\":\"failed\""), "{text}");
    }
}
