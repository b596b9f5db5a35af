//! One task per Chorus socket, after the handshake: it reads requests,
//! writes what is queued, pings, enforces the idle timeout and closes the
//! socket when the server asks (slow consumer, token expired, shutdown).
//!
//! - **Reading**: frames over `limits.max_frame_bytes` are answered with an
//!   error, over the hard limit the socket closes (RFC 6455 codes); each
//!   envelope is told to the connection actor, waiting while its mailbox is
//!   full (backpressure to TCP).
//! - **Writing**: every frame already queued leaves before the task looks
//!   at anything else, so under load many pushes leave together; a send that
//!   waits for a client that does not read still gives way to a close.
//!
//! One task instead of a reader and a writer: a connection costs one task
//! and one close future, made once for its whole life.

use std::sync::Arc;

use actix_ws::{AggregatedMessage, CloseCode, CloseReason, Session};
use bytestring::ByteString;
use chorus_actors::conn::{ConnActor, Inbound};
use chorus_actors::hub::ConnOutbox;
use chorus_actors::{ConnSink, Metrics};
use chorus_protocol::{close, Encoding, ErrorCode, RawRequest, Reply, ServerFrame, SharedFrame};
use kameo::actor::ActorRef;
use serde_json::Value;
use tokio::sync::mpsc::Receiver;
use tokio::time::{Duration, Instant};

use crate::ws::{close_broken, GatewayLimits};

/// How long a closing socket waits for a client that does not take data.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Everything the socket's task owns.
pub struct Socket {
    pub stream: actix_ws::MessageStream,
    pub session: Session,
    pub conn: ActorRef<ConnActor>,
    pub sink: ConnSink,
    pub outbox: ConnOutbox,
    pub encoding: Encoding,
    pub limits: GatewayLimits,
    pub metrics: Arc<Metrics>,
}

/// What a frame read from the client leads to.
enum Step {
    Request(RawRequest),
    Next,
    Stop,
}

/// Serves the socket until it closes, then stops the connection actor.
pub async fn run(s: Socket) {
    let Socket {
        stream,
        mut session,
        conn,
        sink,
        outbox,
        encoding,
        limits,
        metrics,
    } = s;
    let mut stream = stream
        .max_frame_size(limits.hard_max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(limits.hard_max_frame_bytes);
    let (mut rx, close_watch) = outbox.split();
    let closed = close_watch.closed();
    tokio::pin!(closed);
    let idle = tokio::time::sleep(limits.idle_timeout);
    tokio::pin!(idle);
    let mut ping =
        tokio::time::interval_at(Instant::now() + limits.ping_interval, limits.ping_interval);
    loop {
        tokio::select! {
            biased;
            (code, reason) = &mut closed => {
                close_socket(session, &mut rx, code, reason, encoding, &metrics).await;
                break;
            }
            frame = rx.recv() => {
                let Some(frame) = frame else { break };
                // A send waits while the client does not read; a close request
                // (a slow consumer above all) must not wait behind it.
                let sent = tokio::select! {
                    biased;
                    (code, reason) = &mut closed => {
                        close_socket(session, &mut rx, code, reason, encoding, &metrics).await;
                        break;
                    }
                    r = send_queued(&mut session, &frame, &mut rx, encoding, &metrics) => r,
                };
                if sent.is_err() {
                    break;
                }
            }
            msg = stream.recv() => {
                idle.as_mut().reset(Instant::now() + limits.idle_timeout);
                match read(msg, &mut session, &sink, encoding, &limits, &metrics).await {
                    Step::Request(req) => {
                        if conn.tell(Inbound(req)).await.is_err() {
                            break;
                        }
                    }
                    Step::Next => {}
                    Step::Stop => break,
                }
            }
            _ = &mut idle => {
                metrics.idle_disconnects.inc();
                sink.close(close::IDLE_TIMEOUT, "no frames received within the idle timeout");
                // The close branch sends the close frame on the next turn.
                idle.as_mut().reset(Instant::now() + CLOSE_GRACE);
            }
            _ = ping.tick() => {
                if session.ping(b"").await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = conn.stop_gracefully().await;
}

/// Checks one frame from the client: limits, encoding, envelope.
async fn read(
    msg: Option<Result<AggregatedMessage, actix_ws::ProtocolError>>,
    session: &mut Session,
    sink: &ConnSink,
    encoding: Encoding,
    limits: &GatewayLimits,
    metrics: &Metrics,
) -> Step {
    let reply_error = |id: u64, code: ErrorCode, msg: String| {
        metrics.error(code);
        // A full queue here means the client is not reading: the hub's rule applies.
        if sink.push(error_frame(id, code, msg)).is_err() {
            sink.close(close::SLOW_CONSUMER, "slow consumer: outbound queue full");
        }
        Step::Next
    };
    let (bytes, frame_encoding) = match msg {
        None => return Step::Stop,
        Some(Ok(AggregatedMessage::Close(reason))) => {
            // Answer the client's close frame, as the protocol asks.
            let _ = session.clone().close(reason).await;
            return Step::Stop;
        }
        Some(Ok(AggregatedMessage::Ping(p))) => {
            let _ = session.pong(&p).await;
            return Step::Next;
        }
        Some(Ok(AggregatedMessage::Pong(_))) => return Step::Next,
        Some(Ok(AggregatedMessage::Text(t))) => (t.into_bytes(), Encoding::Json),
        Some(Ok(AggregatedMessage::Binary(b))) => (b, Encoding::MsgPack),
        Some(Err(e)) => {
            close_broken(session, &e, metrics).await;
            return Step::Stop;
        }
    };
    metrics.frames_in.inc();
    if bytes.len() > limits.max_frame_bytes {
        return reply_error(
            0,
            ErrorCode::FrameTooLarge,
            format!(
                "frame of {} bytes exceeds the {} byte limit",
                bytes.len(),
                limits.max_frame_bytes
            ),
        );
    }
    if frame_encoding != encoding {
        let want = if encoding == Encoding::Json {
            "text (JSON)"
        } else {
            "binary (MessagePack)"
        };
        return reply_error(
            0,
            ErrorCode::WrongEncoding,
            format!("this connection uses {want} frames"),
        );
    }
    match encoding.decode(&bytes) {
        Ok(r) => Step::Request(r),
        Err(e) => reply_error(
            salvage_id(&bytes, encoding),
            ErrorCode::MalformedFrame,
            format!(
                "not a request envelope: {}",
                e.0.chars().take(200).collect::<String>()
            ),
        ),
    }
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

/// Sends `first` and everything already queued behind it before yielding:
/// under load many pushes leave in one flush.
async fn send_queued(
    session: &mut Session,
    first: &SharedFrame,
    rx: &mut Receiver<Arc<SharedFrame>>,
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
/// cannot hold the task. Dropping the session then ends the connection.
async fn close_socket(
    mut session: Session,
    rx: &mut Receiver<Arc<SharedFrame>>,
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
