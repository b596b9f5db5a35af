//! The baseline: a bare tokio-tungstenite server that speaks just enough of
//! Chorus's protocol for `connect`, `idle` and `fanout` (ping, room.create,
//! room.join, subscribe, unsubscribe, room.send), with nothing else: no
//! authentication check, no storage, no actors. Run in the same session as a
//! Chorus measurement, it says what the machine and the client manage by
//! themselves, so Chorus's figures can be given as a ratio to it.
//!
//! It is meant to be as lean as tokio-tungstenite allows, so that it is a
//! fair floor rather than a flattering one:
//!
//! - **One task per connection**, which both reads and writes: it waits on
//!   the WebSocket stream and on the connection's queue at once (no
//!   reader/writer split, no second task, no channel between them). The
//!   wait is a hand-written poll (`Conn::poll`) rather than a `select!`
//!   over nested futures: nothing but the connection's own fields is kept
//!   across a wait, so an open connection's task is the socket (~320 bytes
//!   of tokio-tungstenite stream) plus some 150 bytes.
//! - **Small buffers**: a 1 KiB read buffer (`WebSocketConfig::read_buffer_size`)
//!   and a 4 KiB write buffer (`write_buffer_size`: frames collect up to that
//!   before a write to the socket; a flush writes the rest).
//! - **Shared frames**: a push is encoded once per encoding for all of its
//!   recipients; each recipient's queue holds a clone of the same bytes
//!   (`Bytes` / `Utf8Bytes`, a reference count), not a copy.
//! - **Batched writes**: the task feeds the socket everything already
//!   queued, reads and answers every request already arrived (a reply goes
//!   behind whatever was queued before it), and then flushes once.
//! - **Bounded queues, allocated lazily**: a connection's queue grows from
//!   nothing as pushes arrive and gives memory back after a burst; past
//!   [`QUEUE`] frames the subscriber is a slow consumer: its queue is dropped,
//!   it leaves its rooms and it is closed with code 4002, a close that does
//!   not wait behind a write the client is not reading.
//! - The WebSocket handshake's state lives in a box that is freed once the
//!   connection is open, so it does not size every connection's task.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chorus_protocol::ops::{Published, SendMessage, Subscribed};
use chorus_protocol::{
    close, Encoding, Entry, EntryKind, ErrorCode, Push, RawRequest, Reply, RoomInfo, RoomKind,
    ServerFrame, SharedFrame,
};
use futures_util::task::AtomicWaker;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// Frames queued for one connection before it counts as a slow consumer.
pub const QUEUE: usize = 4096;
/// Read buffer per connection.
const READ_BUFFER: usize = 1024;
/// Bytes of frames collected before a write to the socket (a flush writes
/// whatever is left).
const WRITE_BUFFER: usize = 4096;
/// A queue emptied after a burst gives its memory back if it had grown past this.
const QUEUE_KEEP: usize = 8;
/// How long a slow consumer's close frame may wait for the client to take it.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

type Ws = WebSocketStream<TcpStream>;

/// One connection's outbound queue, filled by publishers (any task) and
/// drained by the connection's own task.
#[derive(Default)]
struct Outbox {
    queue: Mutex<Queue>,
    /// The connection's task, woken when the queue goes from empty to not
    /// empty, or overflows.
    waker: AtomicWaker,
}

#[derive(Default)]
struct Queue {
    /// Grows from nothing: no slot is allocated before the first frame
    /// that cannot go straight to the socket.
    frames: VecDeque<Message>,
    /// Overflowed: the connection is to be closed with 4002.
    slow: bool,
}

/// Why a connection's task stops.
#[derive(Debug, PartialEq)]
enum Stop {
    /// The socket failed or the peer went away.
    Gone,
    /// The queue overflowed.
    Slow,
}

impl Outbox {
    /// Queues `frame`; `false` if `limit` frames are already queued (the
    /// queue is then dropped and the connection marked slow) or were before.
    fn push(&self, frame: Message, limit: usize) -> bool {
        let mut q = self.queue.lock();
        if q.slow {
            return false;
        }
        if q.frames.len() >= limit {
            q.slow = true;
            q.frames = VecDeque::new();
            drop(q);
            self.waker.wake();
            return false;
        }
        let was_empty = q.frames.is_empty();
        q.frames.push_back(frame);
        drop(q);
        // The task drains the queue to empty unless the socket is full (and
        // then the socket wakes it), so one wake per empty-to-not-empty
        // transition is enough.
        if was_empty {
            self.waker.wake();
        }
        true
    }

    fn pop(&self) -> Result<Option<Message>, Stop> {
        let mut q = self.queue.lock();
        if q.slow {
            return Err(Stop::Slow);
        }
        let frame = q.frames.pop_front();
        if frame.is_none() && q.frames.capacity() > QUEUE_KEEP {
            q.frames = VecDeque::new();
        }
        Ok(frame)
    }

    /// Nothing queued (and not overflowed).
    fn is_idle(&self) -> bool {
        let q = self.queue.lock();
        !q.slow && q.frames.is_empty()
    }
}

#[derive(Default)]
struct Room {
    head: u64,
    subscribers: HashMap<u64, (Encoding, Arc<Outbox>)>,
}

struct State {
    rooms: Mutex<HashMap<String, Room>>,
    next_conn: AtomicU64,
    /// Frames queued per connection before it is a slow consumer.
    queue: usize,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_state(listener, shutdown, State::new(QUEUE)).await
}

impl State {
    fn new(queue: usize) -> Arc<State> {
        Arc::new(State {
            rooms: Mutex::default(),
            next_conn: AtomicU64::new(0),
            queue,
        })
    }
}

/// [`serve`] with the given state (the tests' queue bound, a view of the rooms).
async fn serve_state(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
    state: Arc<State>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    // Out of file descriptors and the like: keep serving the others.
                    Err(_) => continue,
                };
                tokio::spawn(connection(state.clone(), stream));
            }
        }
    }
}

/// The `baseline` subcommand: binds, says where, serves for at most `max_seconds`.
pub async fn baseline_main(listen: &str, max_seconds: u64) -> anyhow::Result<()> {
    let addr: SocketAddr = crate::target::parse_target(listen)?;
    crate::sys::raise_nofile_limit();
    let listener = TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let stop = async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return tokio::time::sleep(Duration::from_secs(max_seconds)).await,
            };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(max_seconds)) => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    serve(listener, stop).await
}

/// The WebSocket handshake: the subprotocol picks the encoding, the token's
/// `sub` (not verified) names the user.
async fn handshake(stream: TcpStream) -> Option<(Ws, Encoding, String)> {
    let _ = stream.set_nodelay(true);
    let mut encoding = Encoding::Json;
    let mut user = String::from("anonymous");
    // The error type is tungstenite's Callback contract, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if let Some(p) = req
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
        {
            if let Some(enc) = p.split(',').find_map(Encoding::from_subprotocol) {
                encoding = enc;
                resp.headers_mut().insert(
                    "Sec-WebSocket-Protocol",
                    HeaderValue::from_static(enc.subprotocol()),
                );
            }
        }
        if let Some(token) = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
        {
            if let Ok(claims) = jsonwebtoken::dangerous::insecure_decode_claims::<Value>(token) {
                if let Some(sub) = claims.get("sub").and_then(Value::as_str) {
                    user = sub.to_string();
                }
            }
        }
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER);
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
        .ok()?;
    Some((ws, encoding, user))
}

/// An open connection: everything its task keeps for its whole life.
struct Conn {
    ws: Ws,
    state: Arc<State>,
    outbox: Arc<Outbox>,
    id: u64,
    encoding: Encoding,
    user: String,
    /// Rooms it subscribed to, to leave when it goes.
    joined: Vec<String>,
    /// Frames were handed to the socket since the last flush.
    dirty: bool,
    /// The client sent a close: nothing more is written but its answer.
    closing: bool,
}

async fn connection(state: Arc<State>, stream: TcpStream) {
    // Boxed: the handshake's state is larger than an open connection's and
    // would otherwise size this task for its whole life.
    let Some((ws, encoding, user)) = Box::pin(handshake(stream)).await else {
        return;
    };
    let id = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let mut conn = Conn {
        ws,
        state,
        outbox: Arc::new(Outbox::default()),
        id,
        encoding,
        user,
        joined: Vec::new(),
        dirty: false,
        closing: false,
    };
    // One task reads and writes: a hand-written poll rather than a
    // `select!` over nested futures keeps no future and no frame in flight
    // across a wait, so the task is little more than the socket.
    let stop = poll_fn(|cx| conn.poll(cx)).await;
    {
        let mut rooms = conn.state.rooms.lock();
        for r in &conn.joined {
            if let Some(room) = rooms.get_mut(r) {
                room.subscribers.remove(&conn.id);
            }
        }
    }
    if stop == Stop::Slow {
        // Boxed like the handshake: the timer is only needed here.
        Box::pin(close_slow(&mut conn.ws)).await;
    }
}

impl Conn {
    /// Writes what is queued, reads and answers what has arrived, and when
    /// there is nothing more to read, flushes once.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Stop> {
        self.outbox.waker.register(cx.waker());
        loop {
            if let Err(stop) = self.feed_queued(cx) {
                return Poll::Ready(stop);
            }
            match self.ws.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(msg))) => {
                    if let Err(stop) = self.on_message(msg, cx) {
                        return Poll::Ready(stop);
                    }
                }
                Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(Stop::Gone),
                Poll::Pending => break,
            }
        }
        // Nothing more to read for now: one flush for everything fed. A
        // push from here on wakes the task (the queue was left empty, or the
        // socket is full and wakes it itself).
        if self.dirty {
            match self.ws.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => self.dirty = false,
                Poll::Ready(Err(_)) => return Poll::Ready(Stop::Gone),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    /// Hands the socket every queued frame it takes without waiting.
    fn feed_queued(&mut self, cx: &mut Context<'_>) -> Result<(), Stop> {
        while !self.closing {
            match self.ws.poll_ready_unpin(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Err(Stop::Gone),
                // The socket is full and wakes the task when it is not, but
                // an overflow must not wait for that.
                Poll::Pending if self.outbox.queue.lock().slow => return Err(Stop::Slow),
                Poll::Pending => return Ok(()),
            }
            let Some(frame) = self.outbox.pop()? else {
                return Ok(());
            };
            self.ws.start_send_unpin(frame).map_err(|_| Stop::Gone)?;
            self.dirty = true;
        }
        Ok(())
    }

    /// Answers one frame from the client. The reply goes straight to the
    /// socket when nothing is queued before it, else behind what is.
    fn on_message(&mut self, msg: Message, cx: &mut Context<'_>) -> Result<(), Stop> {
        let bytes = match &msg {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b.as_ref(),
            // tungstenite answers a close itself: the next read sends the
            // answer and ends the stream.
            Message::Close(_) => {
                self.closing = true;
                return Ok(());
            }
            // Pings are answered by tungstenite too.
            _ => return Ok(()),
        };
        let reply = match self.encoding.decode::<RawRequest>(bytes) {
            Ok(req) => handle(
                &self.state,
                self.id,
                &self.user,
                self.encoding,
                &self.outbox,
                &mut self.joined,
                req,
            ),
            Err(e) => Reply::err(0, ErrorCode::MalformedFrame, e.0),
        };
        // Frees the read buffer's space before the next read.
        drop(msg);
        let Some(frame) = encode(self.encoding, &ServerFrame::Reply(reply)) else {
            return Err(Stop::Gone);
        };
        if self.outbox.is_idle() && matches!(self.ws.poll_ready_unpin(cx), Poll::Ready(Ok(()))) {
            self.ws.start_send_unpin(frame).map_err(|_| Stop::Gone)?;
            self.dirty = true;
            Ok(())
        } else if self.outbox.push(frame, self.state.queue) {
            Ok(())
        } else {
            // A client that does not read its replies is a slow consumer too.
            Err(Stop::Slow)
        }
    }
}

/// Closes a slow consumer with 4002, waiting at most [`CLOSE_GRACE`] for it.
async fn close_slow(ws: &mut Ws) {
    let frame = CloseFrame {
        code: CloseCode::from(close::SLOW_CONSUMER),
        reason: "slow consumer: outbound queue full".into(),
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, ws.close(Some(frame))).await;
}

fn encode(encoding: Encoding, frame: &ServerFrame) -> Option<Message> {
    let bytes = encoding.encode(frame).ok()?;
    Some(match encoding {
        Encoding::Json => Message::Text(Utf8Bytes::try_from(bytes).ok()?),
        Encoding::MsgPack => Message::Binary(bytes.into()),
    })
}

fn room_of(args: &Value) -> Option<String> {
    if let Some(r) = args.get("room").and_then(Value::as_str) {
        return Some(r.to_string());
    }
    args.get("channel")
        .and_then(Value::as_str)
        .and_then(|c| c.strip_prefix("room:"))
        .map(str::to_string)
}

fn handle(
    state: &State,
    conn: u64,
    user: &str,
    encoding: Encoding,
    outbox: &Arc<Outbox>,
    joined: &mut Vec<String>,
    req: RawRequest,
) -> Reply {
    let id = req.id;
    let ok = |v: Value| Reply::ok(id, v);
    match req.op.as_str() {
        "ping" => ok(json!({})),
        "room.create" => {
            let room = room_of(&req.args).unwrap_or_else(|| format!("b{conn}"));
            state.rooms.lock().entry(room.clone()).or_default();
            let info = RoomInfo {
                id: room,
                kind: RoomKind::Public,
                name: None,
                created_by: user.to_string(),
                created_at: chorus_protocol::now_ms(),
                membership_entries: None,
            };
            ok(serde_json::to_value(info).unwrap_or(Value::Null))
        }
        "room.join" | "subscribe" => {
            let Some(room) = room_of(&req.args) else {
                return Reply::err(id, ErrorCode::InvalidArgs, "room or channel required");
            };
            let mut rooms = state.rooms.lock();
            let r = rooms.entry(room.clone()).or_default();
            r.subscribers.insert(conn, (encoding, outbox.clone()));
            if !joined.contains(&room) {
                joined.push(room.clone());
            }
            let s = Subscribed {
                channel: format!("room:{room}"),
                epoch: "baseline".into(),
                offset: r.head,
                recovered: true,
                reason: None,
                detail: None,
                missed: Vec::new(),
            };
            ok(serde_json::to_value(s).unwrap_or(Value::Null))
        }
        "unsubscribe" => {
            if let Some(room) = room_of(&req.args) {
                if let Some(r) = state.rooms.lock().get_mut(&room) {
                    r.subscribers.remove(&conn);
                }
            }
            ok(json!({}))
        }
        "room.send" => {
            let send: SendMessage = match serde_json::from_value(req.args) {
                Ok(s) => s,
                Err(e) => return Reply::err(id, ErrorCode::InvalidArgs, e.to_string()),
            };
            publish(state, user, send, id)
        }
        other => Reply::err(
            id,
            ErrorCode::UnknownOp,
            format!("the baseline has no `{other}`"),
        ),
    }
}

fn publish(state: &State, user: &str, send: SendMessage, id: u64) -> Reply {
    let mut rooms = state.rooms.lock();
    let Some(room) = rooms.get_mut(&send.room) else {
        return Reply::err(id, ErrorCode::RoomNotFound, "no such room");
    };
    room.head += 1;
    let offset = room.head;
    let channel = format!("room:{}", send.room);
    let mut entry = Entry::new(
        offset,
        EntryKind::Message,
        offset,
        chorus_protocol::now_ms(),
    );
    entry.sender = Some(user.to_string());
    entry.text = Some(send.text);
    entry.attachments = send.attachments;
    let push = Push {
        push: "entry".into(),
        channel: Some(channel.clone()),
        epoch: Some("baseline".into()),
        offset: Some(offset),
        ephemeral: false,
        data: serde_json::to_value(&entry).unwrap_or(Value::Null),
    };
    // Encoded once per encoding, whatever the number of subscribers; every
    // queue gets a clone of the same bytes.
    let shared = SharedFrame::new(ServerFrame::Push(push));
    let limit = state.queue;
    let mut json_msg = None;
    let mut msgpack_msg = None;
    room.subscribers.retain(|_, (enc, outbox)| {
        let slot = match enc {
            Encoding::Json => &mut json_msg,
            Encoding::MsgPack => &mut msgpack_msg,
        };
        let msg = slot.get_or_insert_with(|| match enc {
            Encoding::Json => Utf8Bytes::try_from(shared.bytes(*enc))
                .ok()
                .map(Message::Text),
            Encoding::MsgPack => Some(Message::Binary(shared.bytes(*enc))),
        });
        match msg {
            // A slow consumer leaves the room; its task closes it with 4002.
            Some(msg) => outbox.push(msg.clone(), limit),
            None => true,
        }
    });
    let p = Published {
        channel,
        epoch: "baseline".into(),
        offset,
        duplicate: false,
    };
    Reply::ok(id, serde_json::to_value(p).unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests;
