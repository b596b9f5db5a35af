//! The server API's collaborative documents (`/api/v1/docs/{doc}`): create
//! one from an initial state, read its state (a Yjs update, and JSON of its
//! roots), apply an update from the app's backend, delete it. Bytes are
//! base64 strings (standard alphabet, padded), as on the JSON socket.

use actix_web::{web, HttpRequest, HttpResponse};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chorus_actors::doc::{DocApply, DocCreate, DocDelete, DocRead, DocSnapshot};
use chorus_actors::services::Replier;
use chorus_actors::Fail;
use chorus_protocol::{valid_id, ErrorCode};
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;

use crate::api::{check_key, fail, ApiError, ApiResult, Object};
use crate::AppState;

/// `POST /api/v1/docs/{doc}`: a new document.
#[derive(Deserialize, ToSchema)]
pub(crate) struct CreateDoc {
    /// Its initial state, a Yjs (v1) update in base64; absent: an empty document.
    #[serde(default)]
    #[schema(content_encoding = "base64")]
    update: Option<String>,
}

/// `POST /api/v1/docs/{doc}/updates`: an update from the app's backend.
#[derive(Deserialize, ToSchema)]
pub(crate) struct ApplyDoc {
    /// A Yjs (v1) update in base64.
    #[schema(content_encoding = "base64")]
    update: String,
}

fn check_doc(doc: &str) -> Result<(), ApiError> {
    if valid_id(doc) {
        Ok(())
    } else {
        Err(fail(Fail::new(
            ErrorCode::InvalidValue,
            "invalid document name",
        )))
    }
}

fn decode(b64: &str) -> Result<Vec<u8>, ApiError> {
    STANDARD.decode(b64).map_err(|e| {
        fail(Fail::new(
            ErrorCode::InvalidArgs,
            format!("update: not base64: {e}"),
        ))
    })
}

pub(crate) async fn create_doc(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<Object<CreateDoc>>,
) -> ApiResult {
    check_key(&req, &state)?;
    let doc = path.into_inner();
    check_doc(&doc)?;
    let initial = match &body.0 .0.update {
        Some(b) => decode(b)?,
        None => Vec::new(),
    };
    let (replier, rx) = Replier::waiter();
    state
        .services
        .tell_doc(&doc, DocCreate { initial, replier })
        .await
        .map_err(fail)?;
    crate::api::wait_reply(rx).await
}

pub(crate) async fn get_doc(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> ApiResult {
    check_key(&req, &state)?;
    let doc = path.into_inner();
    check_doc(&doc)?;
    let s: DocSnapshot = state.services.ask_doc(&doc, DocRead).await.map_err(fail)?;
    Ok(HttpResponse::Ok().json(json!({
        "doc": doc,
        "update": STANDARD.encode(&s.update),
        "state_vector": STANDARD.encode(&s.state_vector),
        "seq": s.seq,
        "snapshot_seq": s.snapshot_seq,
        "tail": s.tail,
        "stored_bytes": s.stored_bytes,
        "clients": s.clients,
        "json": s.json,
    })))
}

pub(crate) async fn apply_doc(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<Object<ApplyDoc>>,
) -> ApiResult {
    check_key(&req, &state)?;
    let doc = path.into_inner();
    check_doc(&doc)?;
    let update = decode(&body.0 .0.update)?;
    let max = state.services.config.docs.max_update_bytes;
    if update.len() > max {
        return Err(fail(Fail::new(
            ErrorCode::UpdateTooLarge,
            format!("update of {} bytes over the {max} byte limit", update.len()),
        )));
    }
    let (replier, rx) = Replier::waiter();
    let msg = DocApply {
        origin: None,
        update,
        replier,
        close_origin: false,
    };
    state.services.tell_doc(&doc, msg).await.map_err(fail)?;
    crate::api::wait_reply(rx).await
}

pub(crate) async fn delete_doc(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> ApiResult {
    check_key(&req, &state)?;
    let doc = path.into_inner();
    check_doc(&doc)?;
    let (replier, rx) = Replier::waiter();
    state
        .services
        .tell_doc(&doc, DocDelete { replier })
        .await
        .map_err(fail)?;
    crate::api::wait_reply(rx).await
}
