//! Test support: real nodes on loopback (port 0) and real WebSocket clients.
//!
//! [`TestNode`] starts a node in-process with fast timings and its own data
//! directory; [`Client`] is a tokio-tungstenite client speaking JSON or
//! MessagePack that buffers pushes while it waits for a reply, and waits on
//! conditions with a timeout, never a fixed sleep.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chorus_node::{Config, NodeHandle};
use chorus_protocol::{
    Encoding, ErrorBody, Push, RawRequest, ServerFrame, SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub const SECRET: &str = "test-secret-0123456789";
pub const API_KEY: &str = "test-api-key-0123";

pub mod cluster;
pub mod store;
pub mod ydoc;

/// How often a test polls a query when there is no push to wait for.
pub const POLL: Duration = Duration::from_millis(50);

/// Generates, for each `async fn name(enc: Encoding)` given, a module `name`
/// with two tests, `json` and `msgpack`, that run it in each encoding.
#[macro_export]
macro_rules! both_encodings {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn json() {
                super::$name(::chorus_protocol::Encoding::Json).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn msgpack() {
                super::$name(::chorus_protocol::Encoding::MsgPack).await
            }
        }
    )*};
}

/// The other encoding: tests mix both between the clients of one test.
pub fn other(enc: Encoding) -> Encoding {
    match enc {
        Encoding::Json => Encoding::MsgPack,
        Encoding::MsgPack => Encoding::Json,
    }
}

/// Polls `f` every [`POLL`] until it returns `Some`, failing after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The value of one sample (`name` with its labels, as printed) in a Prometheus text page.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// A config for tests: loopback port 0, fast timers, data under `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.node.listen = "127.0.0.1:0".into();
    c.node.http_workers = 2;
    c.actors.threads = 2;
    c.auth.jwt_secret = SECRET.into();
    c.auth.api_key = API_KEY.into();
    c.storage.embedded.path = dir.join("data");
    c.chat.typing_ttl_ms = 300;
    c.presence.idle_after_ms = 600;
    c.notifications.coalesce_ms = 100;
    c.notifications.purge_interval_ms = 200;
    c.shutdown.timeout_ms = 5_000;
    c.shutdown.readiness_grace_ms = 0;
    c
}

/// A fresh data directory. On a RAM-backed filesystem when there is one
/// (`/dev/shm`): fsyncs there cost nothing, so nodes start and write fast,
/// and what a test checks (acknowledged means stored, restart and
/// `kill()` keep data) does not depend on the disk.
pub fn test_dir() -> Arc<TempDir> {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("chorus-test-")
            .tempdir_in(shm)
    } else {
        tempfile::tempdir()
    };
    Arc::new(dir.or_else(|_| tempfile::tempdir()).expect("tempdir"))
}

pub struct TestNode {
    handle: Option<NodeHandle>,
    pub addr: std::net::SocketAddr,
    pub dir: Arc<TempDir>,
    pub config: Config,
    /// The other nodes of a spread cluster (`CHORUS_TEST_NODES`).
    peers: Vec<NodeHandle>,
    next: std::sync::atomic::AtomicUsize,
}

impl TestNode {
    pub async fn start() -> TestNode {
        Self::start_with(test_dir(), |_| {}).await
    }

    /// Starts a node on `dir` (reuse a dir to restart on the same data).
    ///
    /// With `CHORUS_TEST_NODES=N` (N > 1) this is a cluster of N nodes in
    /// this process sharing the store in `dir` ([`cluster::spread`]): clients
    /// and server API calls go round-robin to its nodes, so the same test
    /// runs with its clients spread over the cluster.
    pub async fn start_with(dir: Arc<TempDir>, tweak: impl Fn(&mut Config)) -> TestNode {
        let mut config = test_config(dir.path());
        tweak(&mut config);
        if let Some(n) = cluster::spread_nodes() {
            return cluster::spread(n, dir, config, &tweak).await;
        }
        let handle = chorus_node::start(config.clone())
            .await
            .expect("node starts");
        Self::from_handle(handle, dir, config)
    }

    /// Starts a node with `config` and the given dependencies (a shared store).
    pub async fn start_deps(
        dir: Arc<TempDir>,
        config: Config,
        deps: chorus_node::Deps,
    ) -> TestNode {
        let handle = chorus_node::start_with(config.clone(), deps)
            .await
            .expect("node starts");
        Self::from_handle(handle, dir, config)
    }

    fn from_handle(handle: NodeHandle, dir: Arc<TempDir>, config: Config) -> TestNode {
        let addr = handle.http_addr();
        TestNode {
            handle: Some(handle),
            addr,
            dir,
            config,
            peers: Vec::new(),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The HTTP address the next client or API call uses: this node's, or
    /// in a spread cluster each node's in turn.
    fn next_addr(&self) -> std::net::SocketAddr {
        if self.peers.is_empty() {
            return self.addr;
        }
        let i =
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % (self.peers.len() + 1);
        match i {
            0 => self.addr,
            i => self.peers[i - 1].http_addr(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.storage.embedded.path.clone()
    }

    pub fn handle(&self) -> &NodeHandle {
        self.handle.as_ref().expect("node running")
    }

    pub fn token(&self, user: &str) -> String {
        self.token_with(user, Duration::from_secs(3600), None)
    }

    pub fn token_with(&self, user: &str, ttl: Duration, claims: Option<Value>) -> String {
        chorus_node::auth::mint_token(&self.config.auth.jwt_secret, user, ttl, claims)
            .expect("token")
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub async fn connect(&self, user: &str, encoding: Encoding) -> Client {
        self.connect_token(&self.token(user), encoding).await
    }

    /// Connects with a given token (claims, short lifetimes). A retryable
    /// refusal (5004: in a cluster, the user's owner did not answer, as when
    /// the failure detector briefly suspects a loaded node) is retried, as a
    /// client does, until [`WAIT`].
    pub async fn connect_token(&self, token: &str, encoding: Encoding) -> Client {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let url = format!("ws://{}/ws", self.next_addr());
            match Client::connect(&url, token, encoding).await {
                Ok(c) => return c,
                Err(r) if r.code == Some(5004) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(POLL).await;
                }
                Err(r) => panic!("connect: {r:?}"),
            }
        }
    }

    /// `GET /metrics` as text.
    /// In a spread cluster: every node's samples, summed by name and labels.
    pub async fn metrics(&self) -> String {
        let mut addrs = vec![self.addr];
        addrs.extend(self.peers.iter().map(|p| p.http_addr()));
        let mut pages = Vec::new();
        for addr in addrs {
            match api_call(addr, "GET", "/metrics", None, Some(API_KEY)).await {
                (200, Value::String(s)) => pages.push(s),
                other => panic!("/metrics: {other:?}"),
            }
        }
        if pages.len() == 1 {
            return pages.remove(0);
        }
        let mut sums: std::collections::BTreeMap<String, f64> = Default::default();
        for line in pages.iter().flat_map(|p| p.lines()) {
            if line.starts_with('#') {
                continue;
            }
            if let Some((sample, value)) = line.rsplit_once(' ') {
                if let Ok(v) = value.parse::<f64>() {
                    *sums.entry(sample.to_string()).or_insert(0.0) += v;
                }
            }
        }
        sums.into_iter()
            .map(|(k, v)| format!("{k} {v}\n"))
            .collect()
    }

    /// Calls the server API; returns the status and the JSON body.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        api_call(self.next_addr(), method, path, body, Some(API_KEY)).await
    }

    /// Graceful shutdown, as on SIGTERM.
    pub async fn stop(mut self) {
        for peer in std::mem::take(&mut self.peers) {
            peer.shutdown().await.expect("clean shutdown");
        }
        if let Some(h) = self.handle.take() {
            h.shutdown().await.expect("clean shutdown");
        }
    }

    /// Abrupt stop: no close frames, no flush. Returns the data directory, to restart on it.
    pub fn kill(mut self) -> Arc<TempDir> {
        for peer in std::mem::take(&mut self.peers) {
            peer.abort();
        }
        if let Some(h) = self.handle.take() {
            h.abort();
        }
        self.dir.clone()
    }
}

impl Drop for TestNode {
    /// A test that ends without `stop()` aborts its node (a graceful stop
    /// waits for actix's one-second connection check; tests that check
    /// shutdown call `stop()` themselves).
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        for peer in std::mem::take(&mut self.peers) {
            peer.abort();
        }
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

pub async fn api_call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}{path}");
    let mut req = match method {
        "GET" => client.get(url),
        "POST" => client.post(url),
        "DELETE" => client.delete(url),
        other => panic!("method {other}"),
    };
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = tokio::time::timeout(WAIT, req.send())
        .await
        .expect("api timeout")
        .expect("api call");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client of the Chorus protocol.
pub struct Client {
    ws: Ws,
    pub encoding: Encoding,
    next_id: u64,
    pushes: VecDeque<Push>,
    replies: Vec<chorus_protocol::Reply>,
    pub closed: Option<(u16, String)>,
}

/// Why a handshake was refused: the HTTP status and the error body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub code: Option<u16>,
    pub body: String,
}

impl Client {
    pub async fn connect(url: &str, token: &str, encoding: Encoding) -> Result<Client, Refused> {
        let mut req = url.into_client_request().expect("request");
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        let proto = match encoding {
            Encoding::Json => SUBPROTOCOL_JSON,
            Encoding::MsgPack => SUBPROTOCOL_MSGPACK,
        };
        req.headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static(proto));
        Self::connect_request(req, encoding).await
    }

    /// Connects over a socket whose receive buffer is `recv_buffer` bytes, so a
    /// client that stops reading backs the server up quickly (slow-consumer tests).
    pub async fn connect_small_buffer(
        url: &str,
        token: &str,
        encoding: Encoding,
        recv_buffer: u32,
    ) -> Client {
        let mut req = url.into_client_request().expect("request");
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        req.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(encoding.subprotocol()),
        );
        let host = req.uri().authority().expect("authority").to_string();
        let addr: std::net::SocketAddr = host.parse().expect("ip:port");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(recv_buffer).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("tcp connect");
        let (ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream)),
        )
        .await
        .expect("handshake timeout")
        .expect("handshake");
        Client {
            ws,
            encoding,
            next_id: 1,
            pushes: VecDeque::new(),
            replies: Vec::new(),
            closed: None,
        }
    }

    pub async fn connect_request(
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
        encoding: Encoding,
    ) -> Result<Client, Refused> {
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("handshake timeout")
        {
            Ok((ws, _)) => Ok(Client {
                ws,
                encoding,
                next_id: 1,
                pushes: VecDeque::new(),
                replies: Vec::new(),
                closed: None,
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).to_string())
                    .unwrap_or_default();
                let code = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["error"]["code"].as_u64())
                    .map(|c| c as u16);
                Err(Refused {
                    status: resp.status().as_u16(),
                    code,
                    body,
                })
            }
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    /// Sends a request and returns its id without waiting.
    pub async fn send(&mut self, op: &str, args: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let req = RawRequest {
            id,
            op: op.to_string(),
            args,
        };
        let bytes = self.encoding.encode(&req).expect("encode");
        self.send_bytes(bytes).await;
        id
    }

    /// Sends already-encoded bytes as a frame of this connection's kind.
    pub async fn send_bytes(&mut self, bytes: Vec<u8>) {
        let msg = match self.encoding {
            Encoding::Json => Message::Text(String::from_utf8(bytes).expect("utf8").into()),
            Encoding::MsgPack => Message::Binary(bytes.into()),
        };
        self.ws.send(msg).await.expect("send");
    }

    pub async fn send_message(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send");
    }

    /// Sends a request and waits for its reply.
    pub async fn request(&mut self, op: &str, args: Value) -> Result<Value, ErrorBody> {
        let id = self.send(op, args).await;
        self.reply(id).await
    }

    /// Like [`request`](Self::request), panicking with the error on failure.
    pub async fn ok(&mut self, op: &str, args: Value) -> Value {
        match self.request(op, args).await {
            Ok(v) => v,
            Err(e) => panic!("{op} failed: {e:?}"),
        }
    }

    /// The error code of a request that must fail.
    pub async fn err(&mut self, op: &str, args: Value) -> u16 {
        match self.request(op, args).await {
            Ok(v) => panic!("{op} should fail, got {v}"),
            Err(e) => e.code.code(),
        }
    }

    pub async fn reply(&mut self, id: u64) -> Result<Value, ErrorBody> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(pos) = self.replies.iter().position(|r| r.id == id) {
                let r = self.replies.remove(pos);
                return match (r.ok, r.error) {
                    (_, Some(e)) => Err(e),
                    (Some(v), None) => Ok(v),
                    (None, None) => Ok(Value::Null),
                };
            }
            if !self.read_one(deadline).await {
                panic!(
                    "connection closed while waiting for reply {id}: {:?}",
                    self.closed
                );
            }
        }
    }

    /// The reply to `id` if it has already been read (say, before the socket
    /// closed), without reading more.
    pub fn take_reply(&mut self, id: u64) -> Option<Result<Value, ErrorBody>> {
        let pos = self.replies.iter().position(|r| r.id == id)?;
        let r = self.replies.remove(pos);
        Some(match (r.ok, r.error) {
            (_, Some(e)) => Err(e),
            (Some(v), None) => Ok(v),
            (None, None) => Ok(Value::Null),
        })
    }

    /// Reads one frame into the buffers; false when the socket is closed.
    async fn read_one(&mut self, deadline: tokio::time::Instant) -> bool {
        let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
            Err(_) => panic!("timed out waiting for a frame"),
            Ok(None) => return false,
            Ok(Some(Err(_))) => return false,
            Ok(Some(Ok(m))) => m,
        };
        let frame: ServerFrame = match msg {
            Message::Text(t) => serde_json::from_str(&t).expect("server sent bad JSON"),
            Message::Binary(b) => rmp_serde::from_slice(&b).expect("server sent bad MessagePack"),
            Message::Close(c) => {
                self.closed = Some(
                    c.map(|c| (u16::from(c.code), c.reason.to_string()))
                        .unwrap_or((1005, String::new())),
                );
                return false;
            }
            _ => return true,
        };
        match frame {
            ServerFrame::Reply(r) => self.replies.push(r),
            ServerFrame::Push(p) => self.pushes.push_back(p),
            // Document frames carry bytes (MessagePack `bin`); tests read
            // them as JSON, bytes as base64 strings, in either encoding.
            ServerFrame::DocReply(r) => self.replies.push(chorus_protocol::Reply::ok(
                r.id,
                serde_json::to_value(&r.ok).expect("doc reply as JSON"),
            )),
            ServerFrame::DocPush(p) => self.pushes.push_back(Push {
                push: serde_json::to_value(p.push)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                channel: Some(p.channel),
                epoch: None,
                offset: None,
                ephemeral: p.ephemeral,
                data: serde_json::to_value(&p.data).expect("doc push as JSON"),
            }),
        }
        true
    }

    /// The first push (buffered or new) matching `pred`; earlier non-matching ones stay buffered.
    pub async fn push_where(&mut self, pred: impl Fn(&Push) -> bool) -> Push {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(pos) = self.pushes.iter().position(&pred) {
                return self.pushes.remove(pos).expect("present");
            }
            if !self.read_one(deadline).await {
                panic!(
                    "connection closed while waiting for a push: {:?}",
                    self.closed
                );
            }
        }
    }

    /// The next push of `event` on `channel` (any channel when `None`).
    pub async fn push(&mut self, event: &str, channel: Option<&str>) -> Push {
        self.push_where(|p| {
            p.push == event && channel.is_none_or(|c| p.channel.as_deref() == Some(c))
        })
        .await
    }

    /// Every push buffered so far, without reading more.
    pub fn buffered(&mut self) -> Vec<Push> {
        self.pushes.drain(..).collect()
    }

    /// Waits until the server closes the socket; returns the close code and reason.
    pub async fn closed_by_server(&mut self) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.read_one(deadline).await {}
        self.closed.clone().expect("closed without a close frame")
    }

    /// The next `entry` push on `channel` whose entry kind is `kind` (`message`, `edit`, …).
    pub async fn entry(&mut self, channel: &str, kind: &str) -> Push {
        self.push_where(|p| {
            p.push == "entry" && p.channel.as_deref() == Some(channel) && p.data["kind"] == kind
        })
        .await
    }

    /// Whether a push matching `pred` is buffered (without reading more).
    pub fn has_buffered(&self, pred: impl Fn(&Push) -> bool) -> bool {
        self.pushes.iter().any(pred)
    }

    /// Sends a request and waits for its error, panicking if it succeeds.
    pub async fn err_body(&mut self, op: &str, args: Value) -> ErrorBody {
        match self.request(op, args).await {
            Ok(v) => panic!("{op} should fail, got {v}"),
            Err(e) => e,
        }
    }

    /// Waits for the reply to a request that the node answers through its hub
    /// (a read marker on a room that does not exist): every push the hub
    /// queued for this connection before it has then been read into the
    /// buffer, so a test can assert that something was *not* pushed.
    pub async fn hub_barrier(&mut self) {
        assert_eq!(
            self.err(
                "room.read",
                json!({"room": "no-such-room.barrier", "offset": 0})
            )
            .await,
            3002
        );
    }

    /// Round-trips a ping: proves the connection is still usable.
    pub async fn alive(&mut self) {
        let v = self.ok("ping", json!({})).await;
        assert!(v["pong"].is_i64(), "{v}");
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
