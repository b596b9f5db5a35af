//! Servers the harness starts itself: a `chorus` node (`--spawn-node`) or
//! the bundled baseline (`--spawn-baseline`, `--with-baseline`). Both print
//! `listening on <ip:port>` on stdout once bound; the harness reads it,
//! targets that address, samples the process, and stops it after the run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::target::parse_target;

pub struct Spawned {
    pub addr: SocketAddr,
    pub pid: u32,
    child: Child,
    drain: JoinHandle<()>,
    data_dir: Option<PathBuf>,
}

impl Spawned {
    /// `chorus start [--config FILE] --listen 127.0.0.1:0 --data-dir <fresh dir>`, with the
    /// harness's key and API key in the environment.
    pub async fn node(
        bin: &Path,
        config: Option<&Path>,
        jwt_secret: &str,
        api_key: &str,
        run_id: &str,
    ) -> anyhow::Result<Spawned> {
        let dir = std::env::temp_dir().join(format!("chorus-loadtest-{run_id}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("start");
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&dir)
            .env("CHORUS_AUTH_JWT_SECRET", jwt_secret)
            .env("CHORUS_AUTH_API_KEY", api_key);
        // The node's info lines would bury the progress line; warnings still show.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut s = Spawned::start(cmd, &bin.display().to_string()).await?;
        s.data_dir = Some(dir);
        Ok(s)
    }

    /// `<this executable> baseline --listen 127.0.0.1:0`.
    pub async fn baseline(exe: &Path) -> anyhow::Result<Spawned> {
        let mut cmd = Command::new(exe);
        cmd.arg("baseline").arg("--listen").arg("127.0.0.1:0");
        Spawned::start(cmd, "baseline server").await
    }

    async fn start(mut cmd: Command, what: &str) -> anyhow::Result<Spawned> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let pid = child.id().context("spawned server has no pid")?;
        let stdout = child.stdout.take().context("spawned server stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.trim().strip_prefix("listening on ") {
                    return Ok::<_, anyhow::Error>(Some(parse_target(rest)?));
                }
            }
            Ok(None)
        })
        .await
        .with_context(|| format!("{what} did not say `listening on ...` within 60 s"))??;
        let Some(addr) = addr else {
            bail!("{what} exited before it was listening");
        };
        // Keep reading stdout so the server never blocks on a full pipe.
        let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Spawned {
            addr,
            pid,
            child,
            drain,
            data_dir: None,
        })
    }

    /// SIGTERM, then SIGKILL after 20 s; removes the data directory it was given.
    pub async fn stop(mut self) {
        let pid = self.pid as libc::pid_t;
        // SAFETY: kill has no memory preconditions; pid is our own child's.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        self.drain.abort();
        if let Some(dir) = self.data_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
