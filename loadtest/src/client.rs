//! One WebSocket connection to a node, as the scenarios use it.
//!
//! [`connect`] binds the socket to a chosen source address, connects, runs
//! the WebSocket handshake (asking for the JSON or MessagePack subprotocol),
//! and spawns the connection's reader. The reader routes replies to the
//! request that waits for them (or records their round trip directly, for
//! fire-and-forget requests such as pings) and hands every push to the
//! scenario's [`PushHandler`], in arrival order, on the reader's task.
//! Writes go through a lock on the sink, so any task may send.
//!
//! Everything a connection sees is counted in the process's [`Stats`]:
//! handshakes, failures by cause, requests and their errors, connections the
//! server closed (with the close code).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_protocol::{Encoding, ErrorBody, ErrorCode};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::auth::Identity;
use crate::stats::{Counter, Lat, Stats};
use crate::wire::{self, Incoming, Outgoing};

type Ws = WebSocketStream<TcpStream>;

/// How connections are made.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub encoding: Encoding,
    pub read_buffer: usize,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

/// What a scenario does with the pushes one connection receives.
pub trait PushHandler: Send + 'static {
    fn on_push(&mut self, push: &Incoming);
    /// The connection ended (for whatever reason).
    fn on_close(&mut self) {}
}

/// For connections whose pushes nobody looks at.
pub struct IgnorePushes;

impl PushHandler for IgnorePushes {
    fn on_push(&mut self, _: &Incoming) {}
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("http status {0}")]
    Http(u16),
    #[error("handshake: {0}")]
    Handshake(String),
}

impl ConnectError {
    /// A short, stable cause for the report's error table.
    pub fn cause(&self) -> String {
        match self {
            ConnectError::Timeout => "connect: timeout".into(),
            ConnectError::Io(e) => match e.raw_os_error() {
                Some(libc::EADDRNOTAVAIL) => "connect: no free source port (EADDRNOTAVAIL)".into(),
                Some(libc::EADDRINUSE) => "connect: source address in use (EADDRINUSE)".into(),
                Some(libc::ECONNREFUSED) => "connect: refused".into(),
                Some(libc::ECONNRESET) => "connect: reset by server".into(),
                Some(libc::EMFILE) | Some(libc::ENFILE) => "connect: too many open files".into(),
                _ => format!("connect: {:?}", e.kind()),
            },
            ConnectError::Http(code) => format!("handshake: http {code}"),
            ConnectError::Handshake(m) => format!("handshake: {}", short(m)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{} {} ({})", .0.code.code(), .0.name, .0.message)]
    Server(ErrorBody),
    #[error("connection closed before the reply")]
    Closed,
    #[error("no reply in time")]
    Timeout,
    #[error("send failed: {0}")]
    Send(String),
    #[error("encoding the request: {0}")]
    Encode(String),
    #[error("unexpected reply: {0}")]
    BadReply(String),
}

impl RequestError {
    pub fn cause(&self, op: &str) -> String {
        match self {
            RequestError::Server(b) => format!("{op}: {} {}", b.code.code(), b.name),
            RequestError::Closed => format!("{op}: connection closed"),
            RequestError::Timeout => format!("{op}: timeout"),
            RequestError::Send(_) => format!("{op}: send failed"),
            RequestError::Encode(_) => format!("{op}: encode"),
            RequestError::BadReply(_) => format!("{op}: unexpected reply"),
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            RequestError::Server(b) => Some(b.code),
            _ => None,
        }
    }
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A request in flight.
enum Pending {
    /// Someone awaits the reply.
    Wait(oneshot::Sender<Result<Value, ErrorBody>>),
    /// Nobody awaits it; the reader records the round trip.
    Timed {
        op: &'static str,
        at: Instant,
        lat: Lat,
        ok: Counter,
    },
}

/// How a connection ended.
enum End {
    Closed(Option<u16>),
    Error(WsError),
    Eof,
    Abandoned,
}

/// An open connection.
pub struct Conn {
    /// The connection's number in the run (decides its target and source address).
    pub index: u64,
    pub user: String,
    encoding: Encoding,
    request_timeout: Duration,
    sink: tokio::sync::Mutex<SplitSink<Ws, Message>>,
    pending: parking_lot::Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    stats: Arc<Stats>,
    /// Set when the harness closes it: an end after that is not a drop.
    closing: AtomicBool,
    up: AtomicBool,
    /// The server's close code, if it sent one.
    close_code: parking_lot::Mutex<Option<u16>>,
    reader: parking_lot::Mutex<Option<JoinHandle<()>>>,
    /// Woken when the last request in flight is answered.
    quiet: Notify,
}

/// Opens connection number `index` as `who`, counting the outcome in `stats`.
#[allow(clippy::too_many_arguments)]
pub async fn connect<H: PushHandler>(
    cfg: &ClientConfig,
    target: SocketAddr,
    source: Option<IpAddr>,
    index: u64,
    who: &Identity,
    stats: &Arc<Stats>,
    handler: H,
) -> Result<Arc<Conn>, ConnectError> {
    let started = Instant::now();
    let result = match tokio::time::timeout(
        cfg.connect_timeout,
        handshake(cfg, target, source, &who.token),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout),
    };
    let ws = match result {
        Ok(ws) => ws,
        Err(e) => {
            stats.incr(Counter::ConnFailed);
            stats.error(e.cause());
            return Err(e);
        }
    };
    stats.record(Lat::Handshake, started.elapsed());
    stats.incr(Counter::ConnOpened);
    let (sink, stream) = ws.split();
    let conn = Arc::new(Conn {
        index,
        user: who.user.clone(),
        encoding: cfg.encoding,
        request_timeout: cfg.request_timeout,
        sink: tokio::sync::Mutex::new(sink),
        pending: parking_lot::Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        stats: stats.clone(),
        closing: AtomicBool::new(false),
        up: AtomicBool::new(true),
        close_code: parking_lot::Mutex::new(None),
        reader: parking_lot::Mutex::new(None),
        quiet: Notify::new(),
    });
    let reader = tokio::spawn(read_loop(conn.clone(), stream, handler));
    *conn.reader.lock() = Some(reader);
    Ok(conn)
}

async fn handshake(
    cfg: &ClientConfig,
    target: SocketAddr,
    source: Option<IpAddr>,
    token: &str,
) -> Result<Ws, ConnectError> {
    let socket = TcpSocket::new_v4()?;
    if let Some(src) = source {
        // Let connect() choose the port knowing the whole 4-tuple: a source
        // port may then serve several destinations, and no port search runs
        // at bind() time (which costs seconds of kernel time per thousand
        // connections once earlier runs left ports in TIME_WAIT).
        bind_address_no_port(&socket)?;
        socket.bind(SocketAddr::new(src, 0))?;
    }
    socket.set_nodelay(true)?;
    let stream = socket.connect(target).await?;
    let mut request = format!("ws://{target}/ws?token={token}")
        .into_client_request()
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(cfg.encoding.subprotocol()),
    );
    let config = WebSocketConfig::default().read_buffer_size(cfg.read_buffer);
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((ws, _response)) => Ok(ws),
        Err(WsError::Http(resp)) => Err(ConnectError::Http(resp.status().as_u16())),
        Err(WsError::Io(e)) => Err(ConnectError::Io(e)),
        Err(e) => Err(ConnectError::Handshake(e.to_string())),
    }
}

fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd, and a pointer to a c_int with its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

async fn read_loop<H: PushHandler>(conn: Arc<Conn>, mut stream: SplitStream<Ws>, mut handler: H) {
    let mut close_code = None;
    let end = loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => conn.dispatch(t.as_bytes(), &mut handler),
            Some(Ok(Message::Binary(b))) => conn.dispatch(&b, &mut handler),
            Some(Ok(Message::Close(frame))) => {
                close_code = frame.map(|f| u16::from(f.code));
                // Our close was answered: the closing handshake is complete, and
                // waiting for the server to drop TCP too only slows a run's end.
                if conn.closing.load(Ordering::Acquire) {
                    break End::Closed(close_code);
                }
                // The server's close: keep reading while tungstenite answers it,
                // then the stream ends.
            }
            Some(Ok(_)) => {}
            Some(Err(WsError::ConnectionClosed)) | None => match close_code {
                Some(_) => break End::Closed(close_code),
                None => break End::Eof,
            },
            Some(Err(e)) => match close_code {
                Some(_) => break End::Closed(close_code),
                None => break End::Error(e),
            },
        }
    };
    conn.ended(end);
    handler.on_close();
}

impl Conn {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The close code the server sent, if it closed the connection with one.
    pub fn close_code(&self) -> Option<u16> {
        *self.close_code.lock()
    }

    fn dispatch<H: PushHandler>(&self, bytes: &[u8], handler: &mut H) {
        let frame = match wire::decode(self.encoding, bytes) {
            Ok(f) => f,
            Err(e) => {
                self.stats.error(format!("decode: {}", short(&e.0)));
                return;
            }
        };
        if frame.is_push() {
            handler.on_push(&frame);
            return;
        }
        let id = frame.id.unwrap_or(0);
        let pending = {
            let mut map = self.pending.lock();
            let p = map.remove(&id);
            if map.is_empty() {
                self.quiet.notify_waiters();
            }
            p
        };
        let result = match frame.error {
            Some(body) => Err(body),
            None => Ok(frame.ok.unwrap_or(Value::Null)),
        };
        match pending {
            Some(Pending::Wait(tx)) => {
                // The requester may have given up (timeout); nothing to do then.
                let _ = tx.send(result);
            }
            Some(Pending::Timed { op, at, lat, ok }) => match result {
                Ok(_) => {
                    self.stats.record(lat, at.elapsed());
                    self.stats.incr(ok);
                }
                Err(body) => {
                    self.stats.incr(Counter::RequestErrors);
                    self.stats.error(RequestError::Server(body).cause(op));
                }
            },
            None => match result {
                Err(body) => self.stats.error(format!(
                    "unsolicited error: {} {}",
                    body.code.code(),
                    body.name
                )),
                Ok(_) => self.stats.error("reply to no request"),
            },
        }
    }

    fn ended(&self, end: End) {
        if !self.up.swap(false, Ordering::AcqRel) {
            return;
        }
        let pending: Vec<Pending> = self.pending.lock().drain().map(|(_, p)| p).collect();
        self.quiet.notify_waiters();
        for p in pending {
            // Waiters learn it from their dropped sender; timed requests are counted here.
            if let Pending::Timed { op, .. } = p {
                self.stats.incr(Counter::RequestErrors);
                self.stats.error(RequestError::Closed.cause(op));
            }
        }
        if self.closing.load(Ordering::Acquire) {
            self.stats.incr(Counter::ConnClosed);
            return;
        }
        self.stats.incr(Counter::ConnDropped);
        let cause = match end {
            End::Closed(code) => {
                *self.close_code.lock() = code;
                match code {
                    Some(c) => format!("closed by server: {c}{}", close_name(c)),
                    None => "closed by server".to_string(),
                }
            }
            End::Error(e) => format!("connection lost: {}", short(&e.to_string())),
            End::Eof => "connection lost: eof".to_string(),
            End::Abandoned => "connection abandoned".to_string(),
        };
        self.stats.error(cause);
    }

    async fn send_frame<A: Serialize>(
        &self,
        id: u64,
        op: &str,
        args: &A,
    ) -> Result<(), RequestError> {
        let bytes = self
            .encoding
            .encode(&Outgoing { id, op, args })
            .map_err(|e| RequestError::Encode(e.0))?;
        let msg = match self.encoding {
            Encoding::Json => Message::Text(
                Utf8Bytes::try_from(bytes).map_err(|e| RequestError::Encode(e.to_string()))?,
            ),
            Encoding::MsgPack => Message::Binary(bytes.into()),
        };
        let mut sink = self.sink.lock().await;
        sink.send(msg)
            .await
            .map_err(|e| RequestError::Send(e.to_string()))
    }

    /// Sends a request and waits for its reply; errors are also counted.
    pub async fn request_value<A: Serialize>(
        &self,
        op: &'static str,
        args: &A,
    ) -> Result<Value, RequestError> {
        let result = self.request_inner(op, args).await;
        if let Err(e) = &result {
            self.stats.incr(Counter::RequestErrors);
            self.stats.error(e.cause(op));
        }
        result
    }

    async fn request_inner<A: Serialize>(
        &self,
        op: &'static str,
        args: &A,
    ) -> Result<Value, RequestError> {
        if !self.is_up() {
            return Err(RequestError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, Pending::Wait(tx));
        self.stats.incr(Counter::Requests);
        if let Err(e) = self.send_frame(id, op, args).await {
            self.pending.lock().remove(&id);
            return Err(e);
        }
        match tokio::time::timeout(self.request_timeout, rx).await {
            Err(_) => {
                self.pending.lock().remove(&id);
                Err(RequestError::Timeout)
            }
            Ok(Err(_)) => Err(RequestError::Closed),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(body))) => Err(RequestError::Server(body)),
        }
    }

    /// Sends a request, waits for its reply and reads it as `T`.
    pub async fn request<A: Serialize, T: DeserializeOwned>(
        &self,
        op: &'static str,
        args: &A,
    ) -> Result<T, RequestError> {
        let v = self.request_value(op, args).await?;
        serde_json::from_value(v).map_err(|e| {
            let err = RequestError::BadReply(e.to_string());
            self.stats.incr(Counter::RequestErrors);
            self.stats.error(err.cause(op));
            err
        })
    }

    /// Sends a request without waiting: the reader records its round trip
    /// under `lat` and counts `ok` when it succeeds.
    pub async fn send_timed<A: Serialize>(
        &self,
        op: &'static str,
        args: &A,
        lat: Lat,
        ok: Counter,
    ) -> Result<(), RequestError> {
        if !self.is_up() {
            return Err(RequestError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.pending.lock().insert(
            id,
            Pending::Timed {
                op,
                at: Instant::now(),
                lat,
                ok,
            },
        );
        self.stats.incr(Counter::Requests);
        let sent = self.send_frame(id, op, args).await;
        if let Err(e) = &sent {
            self.pending.lock().remove(&id);
            self.stats.incr(Counter::RequestErrors);
            self.stats.error(e.cause(op));
        }
        sent
    }

    /// Waits until every request in flight was answered (or the connection
    /// ended), at most `limit`; returns whether none is left.
    pub async fn quiesce(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.quiet.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.pending.lock().is_empty() || !self.is_up() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.pending.lock().is_empty();
            }
        }
    }

    /// Closes the connection (close frame, then waits briefly for the server's end).
    pub async fn close(&self) {
        if self.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.is_up() {
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: Utf8Bytes::from_static(""),
            };
            let mut sink = self.sink.lock().await;
            // A failure means the connection is already gone; the reader tells that.
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                sink.send(Message::Close(Some(frame))),
            )
            .await;
        }
        let reader = self.reader.lock().take();
        if let Some(mut reader) = reader {
            if tokio::time::timeout(Duration::from_secs(5), &mut reader)
                .await
                .is_err()
            {
                reader.abort();
                self.ended(End::Abandoned);
            }
        }
    }
}

/// The name of a close code Chorus uses, for error causes.
fn close_name(code: u16) -> &'static str {
    use chorus_protocol::close;
    match code {
        close::GOING_AWAY => " going_away",
        close::TOKEN_EXPIRED => " token_expired",
        close::SLOW_CONSUMER => " slow_consumer",
        close::RATE_LIMITED => " rate_limited",
        close::IDLE_TIMEOUT => " idle_timeout",
        1000 => " normal",
        1011 => " internal_error",
        _ => "",
    }
}

/// Closes many connections, a bounded number at a time.
pub async fn close_all(conns: impl IntoIterator<Item = Arc<Conn>>) {
    futures_util::stream::iter(conns)
        .for_each_concurrent(512, |c| async move { c.close().await })
        .await;
}
