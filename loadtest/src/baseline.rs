//! The baseline: a bare tokio-tungstenite server that speaks just enough of
//! Chorus's protocol for `connect`, `idle` and `fanout` (ping, room.create,
//! room.join, subscribe, unsubscribe, room.send), with nothing else: no
//! authentication check, no storage, no actors. Run in the same session as a
//! Chorus measurement, it says what the machine and the client manage by
//! themselves, so Chorus's figures can be given as a ratio to it.
//!
//! It follows the design's performance principles so that it is a fair
//! floor: a push is encoded once for all recipients; each connection's
//! writer drains everything queued into one flush; queues are bounded and a
//! subscriber that falls behind is dropped with close code 4002; read
//! buffers are small.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chorus_protocol::ops::{Published, SendMessage, Subscribed};
use chorus_protocol::{
    close, Encoding, Entry, EntryKind, ErrorCode, Push, RawRequest, Reply, RoomInfo, RoomKind,
    ServerFrame, SharedFrame,
};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Frames queued for one connection before it counts as a slow consumer.
const QUEUE: usize = 4096;
/// Read buffer per connection.
const READ_BUFFER: usize = 4096;

type Tx = mpsc::Sender<Message>;

#[derive(Default)]
struct Room {
    head: u64,
    subscribers: HashMap<u64, (Encoding, Tx)>,
}

#[derive(Default)]
struct State {
    rooms: Mutex<HashMap<String, Room>>,
    next_conn: AtomicU64,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let state = Arc::new(State::default());
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
                let state = state.clone();
                tokio::spawn(async move { connection(state, stream).await });
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

async fn connection(state: Arc<State>, stream: TcpStream) {
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
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
    let Ok(ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    else {
        return;
    };
    let id = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(QUEUE);
    // The writer drains whatever is queued into one flush.
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let closing = matches!(first, Message::Close(_));
            if sink.feed(first).await.is_err() {
                return;
            }
            if !closing {
                while let Ok(more) = rx.try_recv() {
                    let closing = matches!(more, Message::Close(_));
                    if sink.feed(more).await.is_err() {
                        return;
                    }
                    if closing {
                        break;
                    }
                }
            }
            if sink.flush().await.is_err() || closing {
                return;
            }
        }
    });
    let mut joined: Vec<String> = Vec::new();
    while let Some(Ok(msg)) = source.next().await {
        let bytes = match &msg {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b.as_ref(),
            Message::Close(_) => break,
            _ => continue,
        };
        let reply = match encoding.decode::<RawRequest>(bytes) {
            Ok(req) => handle(&state, id, &user, encoding, &tx, &mut joined, req),
            Err(e) => Reply::err(0, ErrorCode::MalformedFrame, e.0),
        };
        let Some(frame) = encode(encoding, &ServerFrame::Reply(reply)) else {
            break;
        };
        if tx.send(frame).await.is_err() {
            break;
        }
    }
    {
        let mut rooms = state.rooms.lock();
        for r in &joined {
            if let Some(room) = rooms.get_mut(r) {
                room.subscribers.remove(&id);
            }
        }
    }
    drop(tx);
    let _ = writer.await;
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
    tx: &Tx,
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
            r.subscribers.insert(conn, (encoding, tx.clone()));
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
    // Encoded once per encoding, whatever the number of subscribers.
    let shared = SharedFrame::new(ServerFrame::Push(push));
    let mut json_msg = None;
    let mut msgpack_msg = None;
    let mut slow = Vec::new();
    for (sub, (enc, tx)) in &room.subscribers {
        let slot = match enc {
            Encoding::Json => &mut json_msg,
            Encoding::MsgPack => &mut msgpack_msg,
        };
        let msg = slot
            .get_or_insert_with(|| match enc {
                Encoding::Json => Utf8Bytes::try_from(shared.bytes(*enc))
                    .ok()
                    .map(Message::Text),
                Encoding::MsgPack => Some(Message::Binary(shared.bytes(*enc))),
            })
            .clone();
        let Some(msg) = msg else { continue };
        if tx.try_send(msg).is_err() {
            slow.push(*sub);
        }
    }
    for sub in slow {
        if let Some((_, tx)) = room.subscribers.remove(&sub) {
            let frame = CloseFrame {
                code: CloseCode::from(close::SLOW_CONSUMER),
                reason: "slow consumer".into(),
            };
            // Its queue is full; the close goes when there is room, or never if it is gone.
            let _ = tx.try_send(Message::Close(Some(frame)));
        }
    }
    let p = Published {
        channel,
        epoch: "baseline".into(),
        offset,
        duplicate: false,
    };
    Reply::ok(id, serde_json::to_value(p).unwrap_or(Value::Null))
}
