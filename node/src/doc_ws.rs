//! `/doc/<name>`: collaborative documents for stock Yjs clients.
//!
//! A y-websocket `WebsocketProvider('ws://host:port/doc', name, ydoc)`
//! connects to `/doc/<name>` and speaks y-protocols in binary frames (sync
//! step 1 / step 2 / update, awareness, query awareness). The handshake
//! authenticates as `/ws` does (`?token=` or `Authorization: Bearer`) and
//! checks the token's `docs` claim before upgrading: a refused client gets
//! the HTTP status and JSON error body of `/ws` (403 and `forbidden`, 3001,
//! for a document the claim does not allow). After that,
//! [`chorus_actors::doc::session`] handles each message; the writer sends
//! the y-protocols bytes of what the document queued for this socket and
//! closes it with the code the server chose (`4010`–`4014`, or the
//! gateway's own `4002`, `4004`, `1001`).

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, Session};
use chorus_actors::doc::session::DocSession;
use chorus_actors::hub::{outbound, ConnOutbox};
use chorus_actors::{Fail, Metrics};
use chorus_protocol::{close, valid_id, ErrorCode, SharedFrame};
use tokio::sync::mpsc::Receiver;

use crate::api::error_response;
use crate::ws::{close_broken, token, GatewayLimits};
use crate::AppState;

pub async fn handshake(
    req: HttpRequest,
    body: web::Payload,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let svc = state.services.clone();
    let reject = |f: Fail, status| {
        svc.metrics.error(f.code);
        error_response(status, f)
    };
    use actix_web::http::StatusCode;
    if svc.is_stopping() {
        let f = Fail::new(
            ErrorCode::ShuttingDown,
            "node is shutting down, connect to another node",
        );
        return reject(f, StatusCode::SERVICE_UNAVAILABLE);
    }
    let doc = path.into_inner();
    if !valid_id(&doc) {
        return reject(
            Fail::new(ErrorCode::InvalidValue, "invalid document name"),
            StatusCode::BAD_REQUEST,
        );
    }
    let Some(token) = token(&req) else {
        let f = Fail::new(
            ErrorCode::TokenMissing,
            "send a token in `Authorization: Bearer` or `?token=`",
        );
        return reject(f, StatusCode::UNAUTHORIZED);
    };
    let claims = match svc.verifier.verify(&token) {
        Ok(c) => c,
        Err(f) => return reject(f, StatusCode::UNAUTHORIZED),
    };
    if !claims.may_open_doc(&doc) {
        let f = Fail::new(
            ErrorCode::Forbidden,
            "your token does not allow this document",
        );
        return reject(f, StatusCode::FORBIDDEN);
    }
    let (response, session, stream) = match actix_ws::handle(&req, body) {
        Ok(parts) => parts,
        Err(e) => return e.error_response(),
    };
    let (sink, outbox) = outbound(svc.config.outbound_queue);
    let doc_session = match DocSession::start(svc.clone(), doc, &claims, sink.clone()).await {
        Ok(s) => s,
        Err(f) => return reject(f.clone(), crate::api::status_for(f.code)),
    };
    let limits = state.limits.clone();
    actix_web::rt::spawn(write_loop(
        session.clone(),
        outbox,
        svc.metrics.clone(),
        limits.ping_interval,
    ));
    actix_web::rt::spawn(read_loop(
        stream,
        session,
        doc_session,
        sink,
        limits,
        svc.metrics.clone(),
    ));
    response
}

async fn read_loop(
    stream: actix_ws::MessageStream,
    session: Session,
    mut doc: DocSession,
    sink: chorus_actors::ConnSink,
    limits: GatewayLimits,
    metrics: Arc<Metrics>,
) {
    let mut stream = stream
        .max_frame_size(limits.hard_max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(limits.hard_max_frame_bytes);
    let closed = sink.clone();
    loop {
        let msg = tokio::select! {
            m = tokio::time::timeout(limits.idle_timeout, stream.recv()) => m,
            _ = closed.closed() => break,
        };
        let bytes = match msg {
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
                let _ = session.clone().close(reason).await;
                break;
            }
            Ok(Some(Ok(AggregatedMessage::Ping(p)))) => {
                let _ = session.clone().pong(&p).await;
                continue;
            }
            Ok(Some(Ok(AggregatedMessage::Pong(_)))) => continue,
            Ok(Some(Ok(AggregatedMessage::Text(_)))) => {
                metrics.error(ErrorCode::WrongEncoding);
                sink.close(close::DOC_INVALID, "y-protocols messages are binary frames");
                break;
            }
            Ok(Some(Ok(AggregatedMessage::Binary(b)))) => b,
            Ok(Some(Err(e))) => {
                close_broken(&session, &e, &metrics).await;
                break;
            }
        };
        metrics.frames_in.inc();
        if let Err((code, why)) = doc.on_frame(&bytes).await {
            sink.close(code, &why);
            break;
        }
    }
    doc.end().await;
}

/// How long a closing writer waits for a socket that does not take data.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

async fn write_loop(
    mut session: Session,
    outbox: ConnOutbox,
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
                let flush_and_close = async {
                    if code != close::SLOW_CONSUMER {
                        while let Ok(f) = rx.try_recv() {
                            if send(&mut session, &f, &metrics).await.is_err() {
                                return;
                            }
                        }
                    }
                    let reason = CloseReason { code: CloseCode::Other(code), description: Some(reason) };
                    let _ = session.close(Some(reason)).await;
                };
                let _ = tokio::time::timeout(CLOSE_GRACE, flush_and_close).await;
                return;
            }
            frame = rx.recv() => {
                let Some(frame) = frame else { return };
                let sent = tokio::select! {
                    biased;
                    _ = close_watch.closed() => continue,
                    r = send_queued(&mut session, &frame, &mut rx, &metrics) => r,
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

async fn send_queued(
    session: &mut Session,
    first: &SharedFrame,
    rx: &mut Receiver<Arc<SharedFrame>>,
    metrics: &Metrics,
) -> Result<(), actix_ws::Closed> {
    send(session, first, metrics).await?;
    while let Ok(f) = rx.try_recv() {
        send(session, &f, metrics).await?;
    }
    Ok(())
}

/// Sends a frame's y-protocols bytes; frames without them (a Chorus reply
/// the hub answers for every connection, say) mean nothing to a Yjs client.
async fn send(
    session: &mut Session,
    frame: &SharedFrame,
    metrics: &Metrics,
) -> Result<(), actix_ws::Closed> {
    let Some(bytes) = frame.yjs() else {
        return Ok(());
    };
    metrics.frames_out.inc();
    session.binary(bytes.clone()).await
}
