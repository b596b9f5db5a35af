//! The WebSocket gateway: handshake, reader, writer.
//!
//! The handshake authenticates (before upgrading, so a rejected client costs
//! no socket state) and picks the encoding from the subprotocol. Then:
//! - the **reader** runs on the actix worker (the `MessageStream` is `!Send`):
//!   it enforces the frame size limit, decodes the envelope and tells the
//!   connection actor, waiting when its mailbox is full (backpressure to TCP);
//! - the **writer** drains the connection's bounded outbound queue: it takes
//!   every frame already queued before yielding, so under load many pushes
//!   leave together, and closes the socket with the code the server chose
//!   (slow consumer, token expired, shutdown) when asked to.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError, Session};
use bytestring::ByteString;
use chorus_actors::conn::{ConnActor, ConnArgs, Inbound};
use chorus_actors::hub::{outbound, ConnOutbox};
use chorus_actors::{ConnSink, Fail, Metrics};
use chorus_protocol::{
    close, Encoding, ErrorCode, RawRequest, Reply, ServerFrame, SharedFrame, SUBPROTOCOL_JSON,
    SUBPROTOCOL_MSGPACK,
};
use kameo::actor::{ActorRef, Spawn};
use kameo::mailbox;
use serde_json::Value;

use crate::api::error_response;
use crate::AppState;

/// How many requests may wait for a connection actor before the reader stops reading.
const CONN_MAILBOX: usize = 64;

/// The token from `Authorization: Bearer …` or `?token=…`.
pub(crate) fn token(req: &HttpRequest) -> Option<String> {
    if let Some(h) = req.headers().get(actix_web::http::header::AUTHORIZATION) {
        // The scheme is case-insensitive (RFC 9110 §11.1): `bearer` is as good as `Bearer`.
        let bearer = h
            .to_str()
            .ok()
            .and_then(|s| s.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"));
        if let Some((_, t)) = bearer {
            return Some(t.trim().to_string());
        }
    }
    web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.get("token").cloned())
}

/// The encoding the client asked for: the first subprotocol it offers that we
/// speak (the same rule actix-ws uses to answer the handshake).
fn negotiate(req: &HttpRequest) -> Result<Encoding, Fail> {
    let mut offered = false;
    for value in req
        .headers()
        .get_all(actix_web::http::header::SEC_WEBSOCKET_PROTOCOL)
    {
        let Ok(list) = value.to_str() else { continue };
        for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            offered = true;
            if let Some(e) = Encoding::from_subprotocol(p) {
                return Ok(e);
            }
        }
    }
    if offered {
        Err(Fail::new(
            ErrorCode::WrongEncoding,
            format!("supported subprotocols: {SUBPROTOCOL_JSON}, {SUBPROTOCOL_MSGPACK}"),
        ))
    } else {
        Ok(Encoding::Json)
    }
}

pub async fn handshake(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let svc = state.services.clone();
    let reject = |f: Fail, status| {
        svc.metrics.error(f.code);
        error_response(status, f)
    };
    if svc.is_stopping() {
        return reject(
            Fail::new(
                ErrorCode::ShuttingDown,
                "node is shutting down, connect to another node",
            ),
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
        );
    }
    let Some(token) = token(&req) else {
        return reject(
            Fail::new(
                ErrorCode::TokenMissing,
                "send a token in `Authorization: Bearer` or `?token=`",
            ),
            actix_web::http::StatusCode::UNAUTHORIZED,
        );
    };
    let claims = match svc.verifier.verify(&token) {
        Ok(c) => c,
        Err(f) => return reject(f, actix_web::http::StatusCode::UNAUTHORIZED),
    };
    let encoding = match negotiate(&req) {
        Ok(e) => e,
        Err(f) => return reject(f, actix_web::http::StatusCode::BAD_REQUEST),
    };
    let (response, session, stream) =
        match actix_ws::handle_with_protocols(&req, body, &[SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK])
        {
            Ok(parts) => parts,
            Err(e) => return e.error_response(),
        };
    let (sink, outbox) = outbound(svc.config.outbound_queue);
    let id = svc.next_conn_id();
    let conn = {
        let _guard = svc.runtime().enter();
        ConnActor::spawn_with_mailbox(
            ConnArgs {
                svc: svc.clone(),
                id,
                claims,
                sink: sink.clone(),
            },
            mailbox::bounded(CONN_MAILBOX),
        )
    };
    // The handshake completes once the connection is registered with its
    // user (on the user's owner, maybe another node): from then on it gets
    // every push for that user.
    if let Err(e) = conn.wait_for_startup_result().await {
        let f = match e {
            kameo::error::HookError::Error(f) => f,
            _ => Fail::new(ErrorCode::Internal, "connection could not start"),
        };
        let status = crate::api::status_for(f.code);
        return reject(f, status);
    }
    let limits = state.limits.clone();
    actix_web::rt::spawn(write_loop(
        session.clone(),
        outbox,
        encoding,
        svc.metrics.clone(),
        limits.ping_interval,
    ));
    actix_web::rt::spawn(read_loop(
        stream,
        session,
        conn,
        sink,
        encoding,
        limits,
        svc.metrics.clone(),
    ));
    response
}

/// Frame limits and timings the gateway enforces.
#[derive(Clone, Debug)]
pub struct GatewayLimits {
    pub max_frame_bytes: usize,
    pub hard_max_frame_bytes: usize,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
}

fn error_frame(id: u64, code: ErrorCode, message: impl Into<String>) -> Arc<SharedFrame> {
    Arc::new(SharedFrame::new(ServerFrame::Reply(Reply::err(
        id, code, message,
    ))))
}

/// Reads the request id of a frame that is not a valid request, when it has one.
fn salvage_id(bytes: &[u8], encoding: Encoding) -> u64 {
    encoding
        .decode::<Value>(bytes)
        .ok()
        .and_then(|v| v.get("id").and_then(Value::as_u64))
        .unwrap_or(0)
}

async fn read_loop(
    stream: actix_ws::MessageStream,
    mut session: Session,
    conn: ActorRef<ConnActor>,
    sink: ConnSink,
    encoding: Encoding,
    limits: GatewayLimits,
    metrics: Arc<Metrics>,
) {
    let mut stream = stream
        .max_frame_size(limits.hard_max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(limits.hard_max_frame_bytes);
    let reply_error = |id: u64, code: ErrorCode, msg: String| {
        metrics.error(code);
        // A full queue here means the client is not reading: the hub's rule applies.
        if sink.push(error_frame(id, code, msg)).is_err() {
            sink.close(close::SLOW_CONSUMER, "slow consumer: outbound queue full");
        }
    };
    let closed = sink.clone();
    loop {
        let msg = tokio::select! {
            m = tokio::time::timeout(limits.idle_timeout, stream.recv()) => m,
            _ = closed_signal(&closed) => break,
        };
        let (bytes, frame_encoding) = match msg {
            Err(_) => {
                metrics.idle_disconnects.inc();
                sink.close(
                    close::IDLE_TIMEOUT,
                    "no frames received within the idle timeout",
                );
                break;
            }
            Ok(None) => break,
            Ok(Some(Ok(AggregatedMessage::Close(reason)))) => {
                // Answer the client's close frame, as the protocol asks.
                let _ = session.clone().close(reason).await;
                break;
            }
            Ok(Some(Ok(AggregatedMessage::Ping(p)))) => {
                let _ = session.pong(&p).await;
                continue;
            }
            Ok(Some(Ok(AggregatedMessage::Pong(_)))) => continue,
            Ok(Some(Ok(AggregatedMessage::Text(t)))) => (t.into_bytes(), Encoding::Json),
            Ok(Some(Ok(AggregatedMessage::Binary(b)))) => (b, Encoding::MsgPack),
            Ok(Some(Err(e))) => {
                // Nothing more can be read safely: close with the RFC 6455 code.
                tracing::debug!(error = %e, "websocket protocol error");
                let (code, error, why) = protocol_close(&e);
                metrics.error(error);
                let _ = session
                    .clone()
                    .close(Some(CloseReason {
                        code,
                        description: Some(why.into()),
                    }))
                    .await;
                break;
            }
        };
        metrics.frames_in.inc();
        if bytes.len() > limits.max_frame_bytes {
            reply_error(
                0,
                ErrorCode::FrameTooLarge,
                format!(
                    "frame of {} bytes exceeds the {} byte limit",
                    bytes.len(),
                    limits.max_frame_bytes
                ),
            );
            continue;
        }
        if frame_encoding != encoding {
            let want = if encoding == Encoding::Json {
                "text (JSON)"
            } else {
                "binary (MessagePack)"
            };
            reply_error(
                0,
                ErrorCode::WrongEncoding,
                format!("this connection uses {want} frames"),
            );
            continue;
        }
        let req: RawRequest = match encoding.decode(&bytes) {
            Ok(r) => r,
            Err(e) => {
                let id = salvage_id(&bytes, encoding);
                reply_error(
                    id,
                    ErrorCode::MalformedFrame,
                    format!(
                        "not a request envelope: {}",
                        e.0.chars().take(200).collect::<String>()
                    ),
                );
                continue;
            }
        };
        if conn.tell(Inbound(req)).await.is_err() {
            break;
        }
    }
    let _ = conn.stop_gracefully().await;
}

async fn closed_signal(sink: &ConnSink) {
    // The outbox owns the close signal; the sink's clone observes the same token.
    sink.closed().await
}

/// How long a closing writer waits for a socket that does not take data.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

async fn write_loop(
    mut session: Session,
    outbox: ConnOutbox,
    encoding: Encoding,
    metrics: Arc<Metrics>,
    ping_every: Duration,
) {
    let (mut rx, close_watch) = outbox.split();
    let mut ping = tokio::time::interval(ping_every);
    ping.tick().await;
    loop {
        tokio::select! {
            biased;
            (code, reason) = close_watch.closed() => {
                close_socket(session, &mut rx, code, reason, encoding, &metrics).await;
                return;
            }
            frame = rx.recv() => {
                let Some(frame) = frame else { return };
                // A send waits while the client does not read; a close request
                // (a slow consumer above all) must not wait behind it.
                let sent = tokio::select! {
                    biased;
                    _ = close_watch.closed() => continue,
                    r = send_queued(&mut session, &frame, &mut rx, encoding, &metrics) => r,
                };
                if sent.is_err() {
                    return;
                }
            }
            _ = ping.tick() => {
                if session.ping(b"").await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends `first` and everything already queued behind it before yielding:
/// under load many pushes leave in one flush.
async fn send_queued(
    session: &mut Session,
    first: &SharedFrame,
    rx: &mut tokio::sync::mpsc::Receiver<Arc<SharedFrame>>,
    encoding: Encoding,
    metrics: &Metrics,
) -> Result<(), actix_ws::Closed> {
    send(session, first, encoding, metrics).await?;
    while let Ok(f) = rx.try_recv() {
        send(session, &f, encoding, metrics).await?;
    }
    Ok(())
}

/// Sends what is queued (a final error reply, say) unless the queue is the
/// problem, then the close frame; bounded, so a client that reads nothing
/// cannot hold the writer. Dropping the session then ends the connection.
async fn close_socket(
    mut session: Session,
    rx: &mut tokio::sync::mpsc::Receiver<Arc<SharedFrame>>,
    code: u16,
    reason: String,
    encoding: Encoding,
    metrics: &Metrics,
) {
    let flush_and_close = async {
        if code != close::SLOW_CONSUMER {
            while let Ok(f) = rx.try_recv() {
                if send(&mut session, &f, encoding, metrics).await.is_err() {
                    return;
                }
            }
        }
        let reason = CloseReason {
            code: CloseCode::Other(code),
            description: Some(reason),
        };
        let _ = session.close(Some(reason)).await;
    };
    if tokio::time::timeout(CLOSE_GRACE, flush_and_close)
        .await
        .is_err()
    {
        tracing::debug!(
            code,
            "client did not take the close frame in time; dropping the socket"
        );
    }
}

async fn send(
    session: &mut Session,
    frame: &SharedFrame,
    encoding: Encoding,
    metrics: &Metrics,
) -> Result<(), actix_ws::Closed> {
    let bytes = frame.bytes(encoding);
    metrics.frames_out.inc();
    match encoding {
        Encoding::Json => match ByteString::try_from(bytes) {
            Ok(text) => session.text(text).await,
            Err(_) => {
                tracing::error!("encoded JSON frame is not UTF-8");
                Ok(())
            }
        },
        Encoding::MsgPack => session.binary(bytes).await,
    }
}

/// The close a broken WebSocket stream gets (RFC 6455 section 7.4.1): 1009
/// for a frame over the hard limit, 1007 for a text frame that is not UTF-8,
/// 1002 for anything else that is not valid WebSocket.
pub(crate) fn protocol_close(e: &ProtocolError) -> (CloseCode, ErrorCode, &'static str) {
    match e {
        ProtocolError::Overflow => (
            CloseCode::Size,
            ErrorCode::FrameTooLarge,
            "frame over the hard size limit",
        ),
        ProtocolError::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => (
            CloseCode::Invalid,
            ErrorCode::MalformedFrame,
            "text frame is not valid UTF-8",
        ),
        _ => (
            CloseCode::Protocol,
            ErrorCode::MalformedFrame,
            "invalid WebSocket framing",
        ),
    }
}
