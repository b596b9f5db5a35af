//! The WebSocket gateway's handshake: it authenticates (before upgrading, so
//! a rejected client costs no socket state), picks the encoding from the
//! subprotocol, registers the connection with its user, then hands the
//! socket to its task ([`crate::socket`]).

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, ProtocolError, Session};
use chorus_actors::conn::{ConnActor, ConnArgs};
use chorus_actors::hub::outbound;
use chorus_actors::{Fail, Metrics};
use chorus_protocol::{Encoding, ErrorCode, SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK};
use kameo::actor::Spawn;
use kameo::mailbox;

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
    actix_web::rt::spawn(crate::socket::run(crate::socket::Socket {
        stream,
        session,
        conn,
        sink,
        outbox,
        encoding,
        limits,
        metrics: svc.metrics.clone(),
    }));
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

/// Closes a socket whose stream broke with the code [`protocol_close`]
/// gives, counting the error: nothing more can be read from it safely.
pub(crate) async fn close_broken(session: &Session, e: &ProtocolError, metrics: &Metrics) {
    tracing::debug!(error = %e, "websocket protocol error");
    let (code, error, why) = protocol_close(e);
    metrics.error(error);
    let reason = CloseReason {
        code,
        description: Some(why.into()),
    };
    let _ = session.clone().close(Some(reason)).await;
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
