//! Helpers shared by the tests that run real `chorus` processes on the shared
//! store (`cluster_processes.rs`, `chaos.rs`): the config, starting, stopping
//! and killing nodes, `chorus status`, tokens, the server API and WebSockets.
//!
//! Each test file includes this module (`mod procs;`) and uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

pub const SECRET: &str = "cluster-process-jwt-secret";
pub const API_KEY: &str = "cluster-process-api-key";
pub const CLUSTER_SECRET: &str = "cluster-process-shared-secret-0123";
pub const WAIT: Duration = Duration::from_secs(30);

/// A client WebSocket to a node.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub fn cql() -> Option<String> {
    match std::env::var("CHORUS_CQL") {
        Ok(addr) => Some(addr),
        Err(_) => {
            assert_ne!(
                std::env::var("CHORUS_REQUIRE_CQL").as_deref(),
                Ok("1"),
                "CHORUS_REQUIRE_CQL=1 but CHORUS_CQL is not set"
            );
            eprintln!("skipped: set CHORUS_CQL=127.0.0.1:9042 (scripts/cassandra.sh start) to run");
            None
        }
    }
}

pub fn keyspace() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!(
        "chorus_t{}_{:012x}",
        now.as_secs(),
        now.subsec_nanos() as u64 ^ (std::process::id() as u64) << 20
    )
}

/// The config every node of the test cluster reads (fast membership timings).
pub fn write_config(dir: &Path, cql: &str, keyspace: &str) -> std::path::PathBuf {
    write_config_with_log(dir, cql, keyspace, "warn")
}

/// [`write_config`] with another `[log] level` (for diagnosis).
pub fn write_config_with_log(
    dir: &Path,
    cql: &str,
    keyspace: &str,
    level: &str,
) -> std::path::PathBuf {
    let path = dir.join("cluster.toml");
    let text = format!(
        r#"
[auth]
jwt_secret = "{SECRET}"
api_key = "{API_KEY}"

[shutdown]
timeout_ms = 5000
readiness_grace_ms = 0

[cluster]
secret = "{CLUSTER_SECRET}"
listen = "127.0.0.1:0"
transport_listen = "127.0.0.1:0"
gossip_interval_ms = 50
max_heartbeat_interval_ms = 500
join_timeout_ms = 10000

[storage]
backend = "scylla"

[storage.scylla]
contact_points = ["{cql}"]
keyspace = "{keyspace}"
request_timeout_ms = 20000

[log]
level = "{level}"
"#
    );
    std::fs::write(&path, text).expect("write config");
    path
}

pub fn chorus() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chorus"))
}

pub struct Node {
    pub child: Child,
    pub addr: String,
}

impl Node {
    pub fn start(config: &Path, id: &str, seed: Option<&str>) -> Node {
        Node::start_as(chorus(), config, id, "127.0.0.1:0", seed)
    }

    /// [`Node::start`] with `cmd` as the `chorus` command (e.g. run in a
    /// network namespace, with environment overrides) and HTTP on `listen`.
    pub fn start_as(
        mut cmd: Command,
        config: &Path,
        id: &str,
        listen: &str,
        seed: Option<&str>,
    ) -> Node {
        cmd.args(["start", "--listen", listen, "--node-id", id, "--config"])
            .arg(config);
        if let Some(s) = seed {
            cmd.args(["--seed", s]);
        }
        // `CHORUS_TEST_NODE_LOGS=<dir>`: each node's log in its own file.
        let stderr = match std::env::var_os("CHORUS_TEST_NODE_LOGS") {
            Some(dir) => {
                let at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis();
                let path = Path::new(&dir).join(format!("{id}-{at}.log"));
                Stdio::from(std::fs::File::create(path).expect("node log file"))
            }
            None => Stdio::inherit(),
        };
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn chorus");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(WAIT).expect("node printed its address");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{id} printed {line:?}, not its address"))
            .to_string();
        Node { child, addr }
    }

    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        self.child.wait().expect("wait")
    }

    /// SIGKILL, then reap the process.
    pub fn kill(mut self) -> std::process::ExitStatus {
        self.child.kill().expect("kill -KILL");
        self.child.wait().expect("wait")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `chorus status --json` against `target`, or why it failed.
pub fn try_status(config: &Path, target: &str, key: Option<&str>) -> Result<Value, String> {
    let mut cmd = chorus();
    cmd.args(["status", "--json", "--target", target, "--config"])
        .arg(config);
    if let Some(k) = key {
        cmd.args(["--key", k]);
    }
    let out = cmd.output().map_err(|e| format!("chorus status: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("status JSON: {e}"))
}

/// `chorus status --json` against `target`.
pub fn status(config: &Path, target: &str, key: Option<&str>) -> Value {
    match try_status(config, target, key) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn up_members(s: &Value) -> Vec<String> {
    let mut ids: Vec<String> = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "up")
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

pub async fn api(addr: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}{path}");
    let req = match method {
        "POST" => client.post(url).json(&body.unwrap_or(Value::Null)),
        _ => client.get(url),
    };
    let resp = req
        .header("x-api-key", API_KEY)
        .timeout(WAIT)
        .send()
        .await
        .expect("api call");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

pub fn token(config: &Path, user: &str) -> String {
    let out = chorus()
        .args(["token", "--user", user, "--config"])
        .arg(config)
        .output()
        .expect("chorus token");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A WebSocket request to `addr` (JSON encoding) with the bearer token.
pub fn ws_request(
    addr: &str,
    token: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    req
}

/// Connect a WebSocket to `addr`, within `timeout`.
pub async fn connect_ws(addr: &str, token: &str, timeout: Duration) -> Result<Ws, String> {
    match tokio::time::timeout(
        timeout,
        tokio_tungstenite::connect_async(ws_request(addr, token)),
    )
    .await
    {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
        Err(_) => Err(format!("connect {addr}: timed out")),
    }
}
