//! The server API's OpenAPI 3.1 document, generated with `utoipa` and served
//! at `GET /api/v1/openapi.json` (no `x-api-key` needed for the document
//! itself).
//!
//! Request bodies and query strings are the handlers' own types (`api.rs`
//! derives their schemas). The handlers answer with `serde_json` values built
//! from `chorus_protocol` types, which this crate cannot derive on: their
//! shapes are mirrored here, and a test serializes the real types to check
//! each mirror has the same fields. Error responses are generated from
//! [`super::status_for`]: one response per HTTP status, whose `code` and
//! `name` are the error codes that map to it. The test in
//! `tests/tests/openapi.rs` checks the document lists exactly
//! [`super::ROUTES`], and `scripts/schemathesis.sh` checks a real node
//! against it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use actix_web::HttpResponse;
use chorus_protocol::ErrorCode;
use serde_json::Value;
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{AllOfBuilder, AnyOfBuilder, ArrayBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use super::status_for;

/// The document, as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// `GET /api/v1/openapi.json`.
pub async fn serve() -> HttpResponse {
    static JSON: OnceLock<String> = OnceLock::new();
    let json = JSON.get_or_init(|| document().to_json().expect("the document serializes"));
    HttpResponse::Ok()
        .content_type("application/json")
        .body(json.as_str())
}

/// The error codes the server API answers with; the others are only ever
/// sent on a WebSocket (requests, tokens, subscriptions, rate limits).
pub const API_ERRORS: &[ErrorCode] = {
    use ErrorCode::*;
    &[
        MalformedFrame,
        InvalidArgs,
        InvalidValue,
        FrameTooLarge,
        ApiKeyInvalid,
        Forbidden,
        RoomNotFound,
        NotMember,
        RoomExists,
        MessageNotFound,
        WrongRoomKind,
        InvalidUpdate,
        UpdateTooLarge,
        DocTooLarge,
        DocNotFound,
        DocExists,
        Internal,
        StoreUnavailable,
        Conflict,
        Overloaded,
        ShuttingDown,
    ]
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Chorus server API",
        description = "What the app's own backend calls (`/api/v1`). Every operation but this \
            document needs the `x-api-key` header (`auth.api_key`). Errors are \
            `{\"error\": {\"code\", \"name\", \"message\", \"retryable\"}}` with the HTTP status \
            of the code, also in the `x-chorus-error` header; see docs/protocol.md."
    ),
    paths(
        create_room,
        get_room,
        add_member,
        remove_member,
        post_message,
        room_history,
        notify,
        list_notifications,
        presence,
        publish_topic,
        publish_feeds,
        create_doc,
        get_doc,
        apply_doc,
        delete_doc,
        cluster,
        openapi_json
    ),
    modifiers(&Errors),
    security(("api_key" = []))
)]
struct ApiDoc;

// ---- schemas: ids and the shapes of `chorus_protocol` types ----

/// An id: 1..=128 bytes of `[A-Za-z0-9_.:@-]` (`chorus_protocol::valid_id`).
#[derive(ToSchema)]
#[schema(value_type = String, pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
#[allow(dead_code)]
pub struct Id(String);

/// An idempotency key, 1..=128 bytes.
#[derive(ToSchema)]
#[schema(value_type = String, min_length = 1, max_length = 128)]
#[allow(dead_code)]
pub struct ClientId(String);

#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum RoomKind {
    Direct,
    Group,
    Public,
}

#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum Priority {
    Low,
    Normal,
    High,
    Urgent,
}

#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum Role {
    Owner,
    Member,
}

#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum EntryKind {
    Message,
    Edit,
    Delete,
    Joined,
    Left,
    Publish,
}

#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum Status {
    Online,
    Idle,
    Offline,
}

/// A room (`chorus_protocol::RoomInfo`).
#[derive(ToSchema)]
#[allow(dead_code)]
struct RoomInfo {
    id: String,
    kind: RoomKind,
    name: Option<String>,
    created_by: String,
    /// Milliseconds since the Unix epoch.
    created_at: i64,
    /// Whether joins and leaves are `joined` / `left` entries (absent for
    /// rooms created before the setting: true, false for public rooms).
    membership_entries: Option<bool>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct Member {
    user: String,
    role: Role,
    joined_at: i64,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct RoomWithMembers {
    room: RoomInfo,
    members: Vec<Member>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct Invited {
    invited: String,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct Removed {
    removed: String,
}

/// A stored write (`chorus_protocol::ops::Published`): where it is, and
/// whether an earlier write with the same `client_id` already had it.
#[derive(ToSchema)]
#[allow(dead_code)]
struct Published {
    channel: String,
    epoch: String,
    offset: u64,
    duplicate: bool,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct ChannelHead {
    epoch: String,
    offset: u64,
    msg_seq: u64,
}

/// One record of a channel's history (`chorus_protocol::Entry`).
#[derive(ToSchema)]
#[allow(dead_code)]
struct Entry {
    offset: u64,
    kind: EntryKind,
    msg_seq: u64,
    ts: i64,
    sender: Option<String>,
    client_id: Option<String>,
    text: Option<String>,
    attachments: Option<Value>,
    reply_to: Option<u64>,
    target: Option<u64>,
    data: Option<Value>,
    edited_at: Option<i64>,
    /// Present (and true) only for a deleted message.
    deleted: Option<bool>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct HistoryPage {
    channel: String,
    head: ChannelHead,
    /// Oldest first.
    entries: Vec<Entry>,
    more: bool,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct NotificationIds {
    /// One per distinct recipient (a user named twice is notified once),
    /// in the order first given.
    ids: Vec<u64>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct Notification {
    id: u64,
    user: String,
    #[schema(rename = "type")]
    kind: String,
    title: String,
    body: Option<String>,
    data: Option<Value>,
    priority: Priority,
    category: Option<String>,
    room: Option<String>,
    created_at: i64,
    expires_at: Option<i64>,
    read: bool,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct NotifPage {
    items: Vec<Notification>,
    unread: u64,
    more: bool,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct Presence {
    user: String,
    status: Status,
    last_seen: Option<i64>,
    activity: Option<String>,
    devices: u32,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct FeedsPublished {
    /// One per distinct user's feed, in the order first given.
    published: Vec<Published>,
}

/// A member's lifecycle (`chorus_actors::cluster::MemberState`).
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum MemberState {
    Joining,
    Up,
    Leaving,
    Down,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct Load {
    connections: u64,
    rooms: u64,
    users: u64,
}

/// One member as the answering node sees it (`chorus_actors::cluster::Member`).
#[derive(ToSchema)]
#[allow(dead_code)]
struct ClusterMember {
    id: String,
    /// Changes at every start of the node.
    generation: u64,
    state: MemberState,
    /// Its gossip address (`ip:port`).
    gossip: String,
    peer_id: Option<String>,
    transport: Option<String>,
    /// Its HTTP (WebSocket and server API) address.
    http: Option<String>,
    load: Load,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct KeyOwner {
    key: String,
    node: String,
}

/// `crate::api_cluster::ClusterStatus`.
#[derive(ToSchema)]
#[allow(dead_code)]
struct ClusterStatus {
    /// The node that answered.
    node: String,
    generation: u64,
    members: Vec<ClusterMember>,
    /// The members that own keys (`up`), sorted.
    view: Vec<String>,
    /// The owner of `?key=`, when asked.
    owner: Option<KeyOwner>,
    local: Load,
}

// ---- operations (the handlers are in api.rs; error responses are added by `Errors`) ----

#[utoipa::path(post, path = "/api/v1/rooms", request_body = super::CreateRoom,
    responses((status = 200, description = "The room (for a direct room that exists: that one)", body = RoomInfo,
        links(
            ("get_room" = (operation_id = "get_room", parameters(("room" = "$response.body#/id")))),
            ("add_member" = (operation_id = "add_member", parameters(("room" = "$response.body#/id")))),
            ("post_message" = (operation_id = "post_message", parameters(("room" = "$response.body#/id")))),
            ("room_history" = (operation_id = "room_history", parameters(("room" = "$response.body#/id")))),
            ("remove_member" = (operation_id = "remove_member",
                parameters(("room" = "$response.body#/id"), ("user" = "$response.body#/created_by"))))
        ))))]
#[allow(dead_code)]
fn create_room() {}

#[utoipa::path(get, path = "/api/v1/rooms/{room}", params(("room" = Id, Path)),
    responses((status = 200, description = "The room and its members", body = RoomWithMembers)))]
#[allow(dead_code)]
fn get_room() {}

#[utoipa::path(post, path = "/api/v1/rooms/{room}/members", params(("room" = Id, Path)),
    request_body = super::AddMember,
    responses((status = 200, description = "Invited (or already a member)", body = Invited,
        links(("remove_member" = (operation_id = "remove_member",
            parameters(("room" = "$request.path.room"), ("user" = "$response.body#/invited"))))))))]
#[allow(dead_code)]
fn add_member() {}

#[utoipa::path(delete, path = "/api/v1/rooms/{room}/members/{user}",
    params(("room" = Id, Path), ("user" = Id, Path)),
    responses((status = 200, description = "Removed, once the `left` entry is stored", body = Removed)))]
#[allow(dead_code)]
fn remove_member() {}

#[utoipa::path(post, path = "/api/v1/rooms/{room}/messages", params(("room" = Id, Path)),
    request_body = super::PostMessage,
    responses((status = 200, description = "Stored (like `room.send`)", body = Published)))]
#[allow(dead_code)]
fn post_message() {}

#[utoipa::path(get, path = "/api/v1/rooms/{room}/messages",
    params(("room" = Id, Path), super::HistoryQuery),
    responses((status = 200, description = "A page of the room's history (like `history`)", body = HistoryPage)))]
#[allow(dead_code)]
fn room_history() {}

#[utoipa::path(post, path = "/api/v1/notifications", request_body = super::NotifyBody,
    responses((status = 200, description = "Stored for every recipient", body = NotificationIds,
        links(("list_notifications" = (operation_id = "list_notifications",
            parameters(("user" = "$request.body#/user"))))))))]
#[allow(dead_code)]
fn notify() {}

#[utoipa::path(get, path = "/api/v1/users/{user}/notifications",
    params(("user" = Id, Path), super::ListQuery),
    responses((status = 200, description = "A page of the inbox, newest first (like `notifications.list`)", body = NotifPage)))]
#[allow(dead_code)]
fn list_notifications() {}

#[utoipa::path(get, path = "/api/v1/users/{user}/presence", params(("user" = Id, Path)),
    responses((status = 200, description = "The user's presence", body = Presence)))]
#[allow(dead_code)]
fn presence() {}

#[utoipa::path(post, path = "/api/v1/topics/{topic}/publish", params(("topic" = Id, Path)),
    request_body = super::PublishBody,
    responses((status = 200, description = "Stored (like `topic.publish`)", body = Published)))]
#[allow(dead_code)]
fn publish_topic() {}

#[utoipa::path(post, path = "/api/v1/feeds", request_body = super::FeedsBody,
    responses((status = 200, description = "Stored in every feed", body = FeedsPublished)))]
#[allow(dead_code)]
fn publish_feeds() {}

/// `{doc, seq}`: the update is durable as update `seq` of the document.
#[derive(ToSchema)]
#[allow(dead_code)]
struct DocWritten {
    doc: String,
    seq: u64,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct DocDeleted {
    doc: String,
    deleted: bool,
}

/// A document's committed state.
#[derive(ToSchema)]
#[allow(dead_code)]
struct DocState {
    doc: String,
    /// The whole state as one Yjs (v1) update, base64.
    #[schema(content_encoding = "base64")]
    update: String,
    /// Its Yjs state vector, base64.
    #[schema(content_encoding = "base64")]
    state_vector: String,
    /// The last durable update.
    seq: u64,
    /// The update the stored snapshot covers (0: never compacted).
    snapshot_seq: u64,
    /// Updates stored after the snapshot.
    tail: u64,
    /// Bytes stored: snapshot plus tail.
    stored_bytes: u64,
    /// Connections that have it open.
    clients: u64,
    /// Each root as JSON: a root with keys is an object (Y.Map), a root of
    /// other values an array (Y.Array), any other a string (Y.Text).
    #[schema(value_type = Object)]
    json: Value,
}

#[utoipa::path(post, path = "/api/v1/docs/{doc}", params(("doc" = Id, Path)),
    request_body = crate::api_docs::CreateDoc,
    responses((status = 200, description = "Created: its initial state is update 1", body = DocWritten,
        links(("get_doc" = (operation_id = "get_doc", parameters(("doc" = "$request.path.doc"))))))))]
#[allow(dead_code)]
fn create_doc() {}

#[utoipa::path(get, path = "/api/v1/docs/{doc}", params(("doc" = Id, Path)),
    responses((status = 200, description = "The document's state", body = DocState)))]
#[allow(dead_code)]
fn get_doc() {}

#[utoipa::path(post, path = "/api/v1/docs/{doc}/updates", params(("doc" = Id, Path)),
    request_body = crate::api_docs::ApplyDoc,
    responses((status = 200, description = "Durable, and sent to the document's clients", body = DocWritten)))]
#[allow(dead_code)]
fn apply_doc() {}

#[utoipa::path(delete, path = "/api/v1/docs/{doc}", params(("doc" = Id, Path)),
    responses((status = 200, description = "Deleted; its clients are told", body = DocDeleted)))]
#[allow(dead_code)]
fn delete_doc() {}

/// The cluster as this node sees it (what `chorus status` prints); the
/// handler is `crate::api_cluster`.
#[utoipa::path(get, path = "/api/v1/cluster",
    params(("key" = Option<String>, Query, description = "A placement key (`room:lobby`, `user:alice`): its owner is in `owner`")),
    responses((status = 200, description = "Members, view, and this node's counts", body = ClusterStatus)))]
#[allow(dead_code)]
fn cluster() {}

/// This document; no `x-api-key` needed.
#[utoipa::path(get, path = "/api/v1/openapi.json", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
#[allow(dead_code)]
fn openapi_json() {}

// ---- error responses and the security scheme ----

/// The error codes of [`API_ERRORS`] by the HTTP status [`status_for`] gives them.
pub fn error_statuses() -> BTreeMap<u16, Vec<ErrorCode>> {
    let mut by_status: BTreeMap<u16, Vec<ErrorCode>> = BTreeMap::new();
    for &code in API_ERRORS {
        by_status
            .entry(status_for(code).as_u16())
            .or_default()
            .push(code);
    }
    by_status
}

fn error_response(codes: &[ErrorCode]) -> utoipa::openapi::Response {
    let listed: Vec<String> = codes
        .iter()
        .map(|c| format!("{} `{}`", c.code(), c.name()))
        .collect();
    let body = ObjectBuilder::new()
        .property(
            "code",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .enum_values(Some(codes.iter().map(|c| c.code()))),
        )
        .required("code")
        .property(
            "name",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(codes.iter().map(|c| c.name()))),
        )
        .required("name")
        .property(
            "message",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("Human-readable; never carries server internals.")),
        )
        .required("message")
        .property(
            "retryable",
            ObjectBuilder::new()
                .schema_type(Type::Boolean)
                .description(Some("Whether the same request may succeed later.")),
        )
        .required("retryable");
    let schema = ObjectBuilder::new()
        .property("error", body)
        .required("error");
    ResponseBuilder::new()
        .description(format!("An error: {}", listed.join(", ")))
        .header(
            "x-chorus-error",
            HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .description(Some("The numeric error code"))
                .build(),
        )
        .content(
            "application/json",
            ContentBuilder::new().schema(Some(schema)).build(),
        )
        .build()
}

struct Errors;

impl Modify for Errors {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let statuses = error_statuses();
        let components = doc.components.get_or_insert_with(Default::default);
        for (status, codes) in &statuses {
            components
                .responses
                .insert(format!("Error{status}"), error_response(codes).into());
        }
        components.security_schemes.insert(
            "api_key".into(),
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "x-api-key",
                "The node's `auth.api_key`",
            )))
            .into(),
        );
        // `user` and `users` are both optional, but one of them must name someone.
        if let Some(RefOr::T(notify)) = components.schemas.remove("NotifyBody") {
            let one_of_them = AnyOfBuilder::new()
                .item(
                    ObjectBuilder::new()
                        .property("user", ObjectBuilder::new().schema_type(Type::String))
                        .required("user"),
                )
                .item(
                    ObjectBuilder::new()
                        .property(
                            "users",
                            ArrayBuilder::new()
                                .items(ObjectBuilder::new().schema_type(Type::String))
                                .min_items(Some(1)),
                        )
                        .required("users"),
                );
            let schema = AllOfBuilder::new()
                .item(notify)
                .item(one_of_them)
                .description(Some(
                    "A notification for `user`, `users` or both (1..=10,000 recipients in all).",
                ))
                .build();
            components
                .schemas
                .insert("NotifyBody".into(), RefOr::T(schema.into()));
        }
        for (path, item) in doc.paths.paths.iter_mut() {
            if path == "/api/v1/openapi.json" {
                continue;
            }
            for op in [&mut item.get, &mut item.post, &mut item.delete]
                .into_iter()
                .flatten()
            {
                add_errors(op, &statuses);
            }
        }
    }
}

fn add_errors(op: &mut Operation, statuses: &BTreeMap<u16, Vec<ErrorCode>>) {
    for &status in statuses.keys() {
        // Only a request body can be too large.
        if status == 413 && op.request_body.is_none() {
            continue;
        }
        op.responses.responses.insert(
            status.to_string(),
            RefOr::Ref(Ref::from_response_name(format!("Error{status}"))),
        );
    }
}
