//! The `chorus` binary as an operator runs it: a real process, SIGKILLed in the
//! middle of a stream of sends, must come back with every acknowledged message.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "process-test-secret";
const API_KEY: &str = "process-test-api-key";

struct Node {
    child: Child,
    addr: String,
}

impl Node {
    fn start(data: &std::path::Path) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chorus"))
            .args(["start", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .env("CHORUS_AUTH_JWT_SECRET", SECRET)
            .env("CHORUS_AUTH_API_KEY", API_KEY)
            .env("CHORUS_LOG_LEVEL", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chorus");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("node printed its address");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .expect("listening line")
            .to_string();
        Node { child, addr }
    }

    fn kill(mut self) {
        // SIGKILL: no shutdown code runs.
        self.child.kill().expect("kill");
        let _ = self.child.wait();
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        self.child.wait().expect("wait")
    }
}

fn token(user: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["token", "--user", user, "--ttl", "1h"])
        .env("CHORUS_AUTH_JWT_SECRET", SECRET)
        .output()
        .expect("chorus token");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string()
}

async fn history(addr: &str, room: &str) -> Vec<Value> {
    let client = reqwest::Client::new();
    let mut all = Vec::new();
    let mut after = 0u64;
    loop {
        let url = format!("http://{addr}/api/v1/rooms/{room}/messages?after={after}&limit=200");
        let page: Value = client
            .get(url)
            .header("x-api-key", API_KEY)
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("json");
        let entries = page["entries"].as_array().expect("entries").clone();
        if entries.is_empty() {
            return all;
        }
        after = entries
            .last()
            .and_then(|e| e["offset"].as_u64())
            .expect("offset");
        all.extend(entries);
        if page["more"] != json!(true) {
            return all;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(dir.path());
    let url = format!("ws://{}/ws?token={}", node.addr, token("alice"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let send = |id: u64, op: &str, args: Value| {
        Message::Text(json!({"id": id, "op": op, "args": args}).to_string().into())
    };
    ws.send(send(
        1,
        "room.create",
        json!({"room": "crash", "kind": "group"}),
    ))
    .await
    .expect("send");
    // Pipeline sends without waiting, kill the node once some are acknowledged.
    let total = 400u64;
    for i in 0..total {
        ws.send(send(
            100 + i,
            "room.send",
            json!({"room": "crash", "text": format!("m{i}"), "client_id": format!("c{i}")}),
        ))
        .await
        .expect("send");
    }
    let mut acked: HashMap<String, u64> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while acked.len() < 50 {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("acks in time")
            .expect("open")
            .expect("frame");
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(&t).expect("json");
        if let (Some(id), Some(off)) = (v["id"].as_u64(), v["ok"]["offset"].as_u64()) {
            if id >= 100 {
                acked.insert(format!("m{}", id - 100), off);
            }
        }
    }
    node.kill();

    let node = Node::start(dir.path());
    let entries = history(&node.addr, "crash").await;
    let messages: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "message").collect();
    // Every acknowledged message is there, at the offset it was acknowledged with.
    for (text, offset) in &acked {
        let found = messages
            .iter()
            .find(|e| e["text"] == json!(text))
            .unwrap_or_else(|| panic!("acknowledged {text} lost"));
        assert_eq!(found["offset"].as_u64(), Some(*offset), "{text} moved");
    }
    // Offsets are contiguous from 1 and no message is stored twice.
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["offset"].as_u64(), Some(i as u64 + 1));
    }
    let mut texts: Vec<&str> = messages.iter().filter_map(|e| e["text"].as_str()).collect();
    let n = texts.len();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), n, "a message was stored twice");
    assert!(n as u64 <= total);

    // SIGTERM is a clean, bounded shutdown that exits 0.
    let status = node.terminate();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn token_command_mints_a_verifiable_token() {
    let t = token("carol");
    let claims: Value = {
        use base64::Engine;
        let payload = t.split('.').nth(1).expect("payload");
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .expect("b64"),
        )
        .expect("json")
    };
    assert_eq!(claims["sub"], "carol");
    assert!(claims["exp"].as_i64().expect("exp") > claims["iat"].as_i64().expect("iat"));
}
