//! The server API (`/api/v1`): what the app's own backend calls.
//!
//! Every route needs the `x-api-key` header (compared in constant time),
//! except `GET /api/v1/openapi.json`, the OpenAPI 3.1 document of them all
//! ([`openapi`]). Errors are `{"error": {"code", "name", "message",
//! "retryable"}}` with an HTTP status that matches the code.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chorus_actors::room;
use chorus_actors::services::Replier;
use chorus_actors::user::{Notify, NotifySpec};
use chorus_actors::Fail;
use chorus_protocol::{
    valid_id, Channel, EntryKind, ErrorBody, ErrorCode, Priority, RoomInfo, RoomKind,
};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use crate::auth::api_key_matches;
use crate::AppState;

/// Most users one notification or feed call may address.
const MAX_RECIPIENTS: usize = 10_000;

#[path = "openapi.rs"]
pub mod openapi;

/// Declares the routes once: [`routes`] registers them and [`ROUTES`] lists
/// them, so the OpenAPI document's test compares against what is served.
macro_rules! api_routes {
    ($($method:ident $path:literal => $handler:path;)*) => {
        /// `(method, path)` of every route [`routes`] registers, under `/api/v1`.
        pub const ROUTES: &[(&str, &str)] = &[$((stringify!($method), $path)),*];

        pub fn routes(cfg: &mut web::ServiceConfig) {
            cfg.service(web::scope("/api/v1")$(.route($path, web::$method().to($handler)))*);
        }
    };
}

api_routes! {
    post "/rooms" => create_room;
    get "/rooms/{room}" => get_room;
    post "/rooms/{room}/members" => add_member;
    delete "/rooms/{room}/members/{user}" => remove_member;
    post "/rooms/{room}/messages" => post_message;
    get "/rooms/{room}/messages" => room_history;
    post "/notifications" => notify;
    get "/users/{user}/notifications" => list_notifications;
    get "/users/{user}/presence" => presence;
    post "/topics/{topic}/publish" => publish_topic;
    post "/feeds" => publish_feeds;
    post "/docs/{doc}" => crate::api_docs::create_doc;
    get "/docs/{doc}" => crate::api_docs::get_doc;
    post "/docs/{doc}/updates" => crate::api_docs::apply_doc;
    delete "/docs/{doc}" => crate::api_docs::delete_doc;
    get "/openapi.json" => openapi::serve;
}

pub fn status_for(code: ErrorCode) -> StatusCode {
    use ErrorCode::*;
    match code {
        MalformedFrame | UnknownOp | InvalidArgs | InvalidValue | WrongEncoding | BadChannel
        | WrongRoomKind | InvalidUpdate | DocNotOpen => StatusCode::BAD_REQUEST,
        FrameTooLarge | UpdateTooLarge | DocTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        RateLimited | DocRateLimited => StatusCode::TOO_MANY_REQUESTS,
        TokenMissing | TokenMalformed | TokenBadSignature | TokenExpired | TokenAlgorithm
        | TokenMissingClaim | TokenUserMismatch | ApiKeyInvalid => StatusCode::UNAUTHORIZED,
        Forbidden | NotMember | NotAuthor | DocReadOnly => StatusCode::FORBIDDEN,
        RoomNotFound | MessageNotFound | NotificationNotFound | NotSubscribed | DocNotFound => {
            StatusCode::NOT_FOUND
        }
        RoomExists | Conflict | DocExists => StatusCode::CONFLICT,
        Internal => StatusCode::INTERNAL_SERVER_ERROR,
        StoreUnavailable | Overloaded | ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
    }
}

pub fn error_response(status: StatusCode, f: Fail) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header(("x-chorus-error", f.code.code().to_string()))
        .json(json!({"error": ErrorBody::new(f.code, f.message)}))
}

/// A failed API call: rendered as the JSON error body with the matching status.
#[derive(Debug)]
pub struct ApiError(Fail);

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl actix_web::ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        status_for(self.0.code)
    }
    fn error_response(&self) -> HttpResponse {
        error_response(self.status_code(), self.0.clone())
    }
}

pub(crate) fn fail(f: Fail) -> ApiError {
    ApiError(f)
}

pub(crate) type ApiResult = Result<HttpResponse, ApiError>;

pub(crate) fn check_key(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let presented = req
        .headers()
        .get("x-api-key")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if api_key_matches(presented, &state.api_key) {
        if state.services.is_stopping() {
            // Draining: the caller retries on another node.
            return Err(fail(Fail::new(
                ErrorCode::ShuttingDown,
                "node is shutting down, retry on another node",
            )));
        }
        Ok(())
    } else {
        state.services.metrics.error(ErrorCode::ApiKeyInvalid);
        Err(fail(Fail::new(
            ErrorCode::ApiKeyInvalid,
            "missing or wrong x-api-key",
        )))
    }
}

/// A body the JSON extractor refused, as the documented `{"error": …}` body.
/// Extractors run before a handler: the key is checked here first, so a
/// caller without it gets 401, not a description of what it sent.
pub fn json_error(err: actix_web::error::JsonPayloadError, req: &HttpRequest) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as E;
    let f = match &err {
        E::OverflowKnownLength { .. } | E::Overflow { .. } => {
            Fail::new(ErrorCode::FrameTooLarge, err.to_string())
        }
        E::ContentType => Fail::new(
            ErrorCode::MalformedFrame,
            "send `content-type: application/json`",
        ),
        E::Deserialize(e) if e.is_data() => Fail::new(ErrorCode::InvalidArgs, e.to_string()),
        E::Deserialize(e) => Fail::new(
            ErrorCode::MalformedFrame,
            format!("the body is not JSON: {e}"),
        ),
        _ => Fail::new(ErrorCode::MalformedFrame, "the body could not be read"),
    };
    extractor_error(req, f)
}

/// A query string the extractor refused (say, `?limit=ten`), like [`json_error`].
pub fn query_error(
    err: actix_web::error::QueryPayloadError,
    req: &HttpRequest,
) -> actix_web::Error {
    extractor_error(
        req,
        Fail::new(ErrorCode::InvalidArgs, format!("query string: {err}")),
    )
}

fn extractor_error(req: &HttpRequest, f: Fail) -> actix_web::Error {
    if let Some(state) = req.app_data::<web::Data<AppState>>() {
        if let Err(e) = check_key(req, state) {
            return e.into();
        }
        state.services.metrics.error(f.code);
    }
    fail(f).into()
}

/// A request body: a JSON object read into `T`. serde's derive also reads a
/// struct from an array, positionally (`[null, "k"]` as `{"data": null,
/// "client_id": "k"}`); the API documents objects, so anything else is
/// `invalid_args`.
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData))
            .map(Object)
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    fail(Fail::new(ErrorCode::InvalidValue, msg))
}

fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(bad(format!("invalid {what} id")))
    }
}

/// `users` without repeats, in the order first given: a user named twice
/// is notified (or fed) once, not once per mention.
fn distinct(users: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::with_capacity(users.len());
    users
        .into_iter()
        .filter(|u| seen.insert(u.clone()))
        .collect()
}

/// How long the API waits for an actor's reply, so a request never hangs forever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

async fn wait_value(
    rx: tokio::sync::oneshot::Receiver<Result<Value, Fail>>,
) -> Result<Value, ApiError> {
    match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(f))) => Err(fail(f)),
        Ok(Err(_)) => Err(fail(Fail::new(ErrorCode::Internal, "request dropped"))),
        Err(_) => Err(fail(Fail::new(ErrorCode::Overloaded, "timed out, retry"))),
    }
}

pub(crate) async fn wait_reply(
    rx: tokio::sync::oneshot::Receiver<Result<Value, Fail>>,
) -> ApiResult {
    wait(rx).await
}

async fn wait(rx: tokio::sync::oneshot::Receiver<Result<Value, Fail>>) -> ApiResult {
    wait_value(rx).await.map(|v| HttpResponse::Ok().json(v))
}

/// A new room. Without `room` the node picks an id; a direct room's id is
/// derived from its two users.
#[derive(Deserialize, ToSchema)]
struct CreateRoom {
    /// Not starting with `dm:` (reserved for direct rooms).
    #[serde(default)]
    #[schema(value_type = Option<openapi::Id>)]
    room: Option<String>,
    #[schema(value_type = openapi::RoomKind)]
    kind: RoomKind,
    #[serde(default)]
    name: Option<String>,
    /// The room's owner (for direct rooms: one of the two users).
    #[schema(value_type = openapi::Id)]
    created_by: String,
    /// The other members (for a direct room: exactly one).
    #[serde(default)]
    #[schema(value_type = Vec<openapi::Id>)]
    members: Vec<String>,
    /// Record joins and leaves as `joined` / `left` entries pushed to every
    /// subscriber (default: true, false for public rooms).
    #[serde(default)]
    membership_entries: Option<bool>,
}

async fn create_room(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Object<CreateRoom>>,
) -> ApiResult {
    check_key(&req, &state)?;
    let b = body.into_inner().0;
    check_id("user", &b.created_by)?;
    for m in &b.members {
        check_id("member", m)?;
    }
    let id = match (b.kind, b.room) {
        (RoomKind::Direct, _) => {
            let [other] = b.members.as_slice() else {
                return Err(bad(
                    "a direct room has `created_by` and exactly one other member",
                ));
            };
            if *other == b.created_by {
                return Err(bad("a direct room needs two different users"));
            }
            chorus_actors::conn::direct_room_id(&b.created_by, other)
        }
        (_, Some(id)) => {
            chorus_actors::conn::check_not_direct_id(&id).map_err(fail)?;
            id
        }
        (_, None) => format!("r{}", chorus_actors::room::new_epoch()),
    };
    check_id("room", &id)?;
    let info = RoomInfo::new(
        id.clone(),
        b.kind,
        b.name,
        b.created_by,
        b.membership_entries,
    );
    let (replier, rx) = Replier::waiter();
    state
        .services
        .tell_room(
            &Channel::room(&id).key(),
            room::Create {
                info,
                members: b.members,
                replier,
            },
        )
        .await
        .map_err(fail)?;
    wait(rx).await
}

async fn get_room(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> ApiResult {
    check_key(&req, &state)?;
    let id = path.into_inner();
    check_id("room", &id)?;
    let store = &state.services.store;
    let room = store.get_room(&id).await.map_err(|e| fail(e.into()))?;
    let Some(room) = room else {
        return Err(fail(Fail::new(ErrorCode::RoomNotFound, "no such room")));
    };
    let members = state
        .services
        .ask_room(&Channel::room(&id).key(), room::Members { user: None })
        .await
        .map_err(fail)?;
    Ok(HttpResponse::Ok().json(json!({"room": room, "members": members})))
}

#[derive(Deserialize, ToSchema)]
struct AddMember {
    #[schema(value_type = openapi::Id)]
    user: String,
}

async fn add_member(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<Object<AddMember>>,
) -> ApiResult {
    check_key(&req, &state)?;
    let id = path.into_inner();
    check_id("room", &id)?;
    let (replier, rx) = Replier::waiter();
    let msg = room::Invite {
        by: None,
        user: body.into_inner().0.user,
        replier,
    };
    state
        .services
        .tell_room(&Channel::room(&id).key(), msg)
        .await
        .map_err(fail)?;
    wait(rx).await
}

async fn remove_member(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> ApiResult {
    check_key(&req, &state)?;
    let (id, user) = path.into_inner();
    check_id("room", &id)?;
    check_id("user", &user)?;
    let (replier, rx) = Replier::waiter();
    state
        .services
        .tell_room(
            &Channel::room(&id).key(),
            room::Kick {
                by: None,
                user,
                replier,
            },
        )
        .await
        .map_err(fail)?;
    wait(rx).await
}

#[derive(Deserialize, ToSchema)]
struct PostMessage {
    /// The author shown to clients (the server API may post as any user, or as nobody).
    #[serde(default)]
    #[schema(value_type = Option<openapi::Id>)]
    sender: Option<String>,
    /// At most `limits.max_text_bytes` bytes (UTF-8).
    text: String,
    #[serde(default)]
    attachments: Option<Value>,
    /// The offset of the message this one answers.
    #[serde(default)]
    reply_to: Option<u64>,
    /// Idempotency key, per sender: the same one again stores nothing new.
    #[serde(default)]
    #[schema(value_type = Option<openapi::ClientId>)]
    client_id: Option<String>,
}

async fn post_message(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<Object<PostMessage>>,
) -> ApiResult {
    check_key(&req, &state)?;
    let id = path.into_inner();
    check_id("room", &id)?;
    let b = body.into_inner().0;
    if let Some(s) = &b.sender {
        check_id("sender", s)?;
    }
    if b.text.len() > state.services.config.max_text_bytes {
        return Err(bad("text too long"));
    }
    let (replier, rx) = Replier::waiter();
    let msg = room::Publish {
        sender: b.sender,
        as_client: false,
        kind: EntryKind::Message,
        text: Some(b.text),
        attachments: b.attachments,
        reply_to: b.reply_to,
        data: None,
        client_id: b.client_id,
        replier,
    };
    state
        .services
        .tell_room(&Channel::room(&id).key(), msg)
        .await
        .map_err(fail)?;
    wait(rx).await
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct HistoryQuery {
    /// Entries before this offset (newest first page when absent).
    before: Option<u64>,
    /// Entries after this offset, oldest first (wins over `before`).
    after: Option<u64>,
    /// Page size, clamped to 1..=`limits.max_page` (default 50).
    limit: Option<usize>,
}

async fn room_history(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    q: web::Query<HistoryQuery>,
) -> ApiResult {
    check_key(&req, &state)?;
    let id = path.into_inner();
    check_id("room", &id)?;
    let key = Channel::room(&id).key();
    let page = state
        .services
        .history_page(&key, None, q.before, q.after, q.limit)
        .await
        .map_err(fail)?;
    Ok(HttpResponse::Ok().json(page))
}

/// A notification for `user`, `users` or both (1..=10,000 recipients in all).
#[derive(Deserialize, ToSchema)]
struct NotifyBody {
    #[serde(default)]
    #[schema(value_type = Option<openapi::Id>)]
    user: Option<String>,
    #[serde(default)]
    #[schema(value_type = Vec<openapi::Id>, max_items = 10_000)]
    users: Vec<String>,
    /// 1..=128 bytes.
    #[serde(rename = "type")]
    #[schema(min_length = 1, max_length = 128)]
    kind: String,
    /// At most 1024 bytes.
    #[schema(max_length = 1024)]
    title: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default = "normal")]
    #[schema(value_type = openapi::Priority)]
    priority: Priority,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    room: Option<String>,
    /// Lifetime in milliseconds; the notification disappears after it.
    #[serde(default)]
    ttl_ms: Option<u64>,
}

fn normal() -> Priority {
    Priority::Normal
}

async fn notify(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Object<NotifyBody>>,
) -> ApiResult {
    check_key(&req, &state)?;
    let b = body.into_inner().0;
    let mut users = b.users;
    users.extend(b.user);
    if users.is_empty() || users.len() > MAX_RECIPIENTS {
        return Err(bad(format!(
            "give `user` or `users` (1..={MAX_RECIPIENTS})"
        )));
    }
    for u in &users {
        check_id("user", u)?;
    }
    let users = distinct(users);
    if b.title.len() > 1024 || b.kind.is_empty() || b.kind.len() > 128 {
        return Err(bad("`type` must be 1..=128 bytes and `title` at most 1024"));
    }
    // The user's actor turns `ttl_ms` into `expires_at` when it creates the
    // notification (saturating: a huge `ttl_ms` means "practically never").
    let spec = NotifySpec {
        kind: b.kind,
        title: b.title,
        body: b.body,
        data: b.data,
        priority: b.priority,
        category: b.category,
        room: b.room,
        expires_at: None,
        ttl_ms: b.ttl_ms,
    };
    let mut waits = Vec::with_capacity(users.len());
    for u in &users {
        let (replier, rx) = Replier::waiter();
        state
            .services
            .tell_user(
                u,
                Notify {
                    spec: spec.clone(),
                    replier,
                },
            )
            .await
            .map_err(fail)?;
        waits.push(rx);
    }
    let mut ids = Vec::with_capacity(waits.len());
    for rx in waits {
        let v = wait_value(rx).await?;
        ids.push(v.get("id").cloned().unwrap_or(Value::Null));
    }
    Ok(HttpResponse::Ok().json(json!({"ids": ids})))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Notifications older than this id.
    before: Option<u64>,
    /// Page size, clamped to 1..=999 (default 50).
    limit: Option<usize>,
    #[serde(default)]
    unread_only: bool,
}

async fn list_notifications(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    q: web::Query<ListQuery>,
) -> ApiResult {
    check_key(&req, &state)?;
    let user = path.into_inner();
    check_id("user", &user)?;
    let page = state
        .services
        .notification_page(&user, q.before, q.limit, q.unread_only)
        .await
        .map_err(fail)?;
    Ok(HttpResponse::Ok().json(page))
}

async fn presence(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> ApiResult {
    check_key(&req, &state)?;
    let user = path.into_inner();
    check_id("user", &user)?;
    let p = state.services.presence_of(&user).await.map_err(fail)?;
    Ok(HttpResponse::Ok().json(p))
}

#[derive(Deserialize, ToSchema)]
struct PublishBody {
    /// Any JSON value (`null` included); it must be present.
    data: Value,
    /// Idempotency key: the same one again stores nothing new.
    #[serde(default)]
    #[schema(value_type = Option<openapi::ClientId>)]
    client_id: Option<String>,
}

fn publish_msg(data: Value, client_id: Option<String>, replier: Replier) -> room::Publish {
    room::Publish {
        sender: None,
        as_client: false,
        kind: EntryKind::Publish,
        text: None,
        attachments: None,
        reply_to: None,
        data: Some(data),
        client_id,
        replier,
    }
}

async fn publish_topic(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<Object<PublishBody>>,
) -> ApiResult {
    check_key(&req, &state)?;
    let topic = path.into_inner();
    check_id("topic", &topic)?;
    let b = body.into_inner().0;
    let (replier, rx) = Replier::waiter();
    state
        .services
        .tell_room(
            &Channel::topic(&topic).key(),
            publish_msg(b.data, b.client_id, replier),
        )
        .await
        .map_err(fail)?;
    wait(rx).await
}

#[derive(Deserialize, ToSchema)]
struct FeedsBody {
    #[schema(value_type = Vec<openapi::Id>, min_items = 1, max_items = 10_000)]
    users: Vec<String>,
    data: Value,
}

async fn publish_feeds(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Object<FeedsBody>>,
) -> ApiResult {
    check_key(&req, &state)?;
    let b = body.into_inner().0;
    if b.users.is_empty() || b.users.len() > MAX_RECIPIENTS {
        return Err(bad(format!("`users` must name 1..={MAX_RECIPIENTS} users")));
    }
    for u in &b.users {
        check_id("user", u)?;
    }
    let users = distinct(b.users);
    let mut waits = Vec::with_capacity(users.len());
    for u in &users {
        let (replier, rx) = Replier::waiter();
        state
            .services
            .tell_room(
                &Channel::feed(u).key(),
                publish_msg(b.data.clone(), None, replier),
            )
            .await
            .map_err(fail)?;
        waits.push(rx);
    }
    let mut published = Vec::with_capacity(waits.len());
    for rx in waits {
        published.push(wait_value(rx).await?);
    }
    Ok(HttpResponse::Ok().json(json!({"published": published})))
}

/// Decodes `input` as every request body of the server API, the way the
/// `web::Json` extractor does (serde_json), and, when it is UTF-8, as every
/// query string, the way `web::Query` does; returns the names of the types
/// that accepted it. The fuzz targets (`tests/fuzz`) call this, so a route
/// that reads a new body or query type adds it here.
#[doc(hidden)]
pub fn decode_inputs(input: &[u8]) -> Vec<&'static str> {
    fn body<T: serde::de::DeserializeOwned>(b: &[u8]) -> bool {
        serde_json::from_slice::<T>(b).is_ok()
    }
    fn query<T: serde::de::DeserializeOwned>(q: Option<&str>) -> bool {
        q.is_some_and(|q| web::Query::<T>::from_query(q).is_ok())
    }
    let q = std::str::from_utf8(input).ok();
    [
        ("CreateRoom", body::<Object<CreateRoom>>(input)),
        ("AddMember", body::<Object<AddMember>>(input)),
        ("PostMessage", body::<Object<PostMessage>>(input)),
        ("NotifyBody", body::<Object<NotifyBody>>(input)),
        ("PublishBody", body::<Object<PublishBody>>(input)),
        ("FeedsBody", body::<Object<FeedsBody>>(input)),
        ("HistoryQuery", query::<HistoryQuery>(q)),
        ("ListQuery", query::<ListQuery>(q)),
    ]
    .into_iter()
    .filter_map(|(name, ok)| ok.then_some(name))
    .collect()
}
