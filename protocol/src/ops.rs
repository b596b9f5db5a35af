//! Every request a client can make, with its arguments and its result.
//!
//! `Request::parse(op, args)` turns a [`RawRequest`](crate::RawRequest) into
//! one of these, with a specific error for an unknown op or bad arguments.
//! Clients (the load harness, the tests) build requests from the same structs.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

use crate::codes::ErrorCode;
use crate::types::{
    ChannelHead, Entry, Member, Notification, NotificationPrefs, Presence, RoomInfo, RoomKind,
    Status,
};

/// `auth.refresh`: replace the connection's token before it expires.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuthRefresh {
    pub token: String,
}

/// `room.create`: a group or public room (direct rooms come from `room.direct`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomCreate {
    /// Chosen by the server when absent.
    #[serde(default)]
    pub room: Option<String>,
    pub kind: RoomKind,
    #[serde(default)]
    pub name: Option<String>,
    /// Other users to add at once.
    #[serde(default)]
    pub members: Vec<String>,
    /// Record joins and leaves as entries (default: not for public rooms).
    #[serde(default)]
    pub membership_entries: Option<bool>,
}

/// `room.direct`: the one direct room between the caller and `user`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomDirect {
    pub user: String,
}

/// `room.join`, `room.leave`, `room.members`, `room.typing`, `room.info`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomRef {
    pub room: String,
}

/// `room.invite`, `room.kick`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomUser {
    pub room: String,
    pub user: String,
}

/// `room.send`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SendMessage {
    pub room: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachments: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
    /// Makes a retried send idempotent: the same id in the same room is stored once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// `room.edit`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EditMessage {
    pub room: String,
    pub offset: u64,
    pub text: String,
}

/// `room.delete`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeleteMessage {
    pub room: String,
    pub offset: u64,
}

/// `history`: a page of a room's or topic's entries, backwards from `before`
/// (newest page when both are absent) or forwards from `after`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct History {
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// `room.read`: the caller has read up to and including `offset`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MarkRead {
    pub room: String,
    pub offset: u64,
}

/// `subscribe`: live entries of a channel, after catching up from (`offset`, `epoch`) when given.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Subscribe {
    pub channel: String,
    /// The last offset the client has; missed entries after it come in the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// `unsubscribe`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Unsubscribe {
    pub channel: String,
}

/// `topic.publish`: allowed to clients whose token permits it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopicPublish {
    pub topic: String,
    pub data: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// `notifications.list`: newest first, before `before` (an id) when given.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NotifList {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(default)]
    pub unread_only: bool,
}

/// `notifications.read`: the ids given, or every one with `all: true`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NotifRead {
    #[serde(default)]
    pub ids: Vec<u64>,
    #[serde(default)]
    pub all: bool,
}

/// `presence.set`: declare idle/online explicitly, and/or the activity line.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PresenceSet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// `""` clears the line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<String>,
}

/// `presence.watch` / `presence.unwatch`: users (friends) and/or a room's members.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PresenceWatch {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
}

/// `presence.query`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PresenceQuery {
    pub users: Vec<String>,
}

/// A request, its arguments checked.
#[derive(Clone, Debug)]
pub enum Request {
    Ping,
    AuthRefresh(AuthRefresh),
    RoomCreate(RoomCreate),
    RoomDirect(RoomDirect),
    RoomJoin(RoomRef),
    RoomLeave(RoomRef),
    RoomInvite(RoomUser),
    RoomKick(RoomUser),
    RoomMembers(RoomRef),
    RoomsList,
    Send(SendMessage),
    Edit(EditMessage),
    Delete(DeleteMessage),
    History(History),
    Typing(RoomRef),
    Read(MarkRead),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    TopicPublish(TopicPublish),
    NotifList(NotifList),
    NotifUnread,
    NotifRead(NotifRead),
    PrefsGet,
    PrefsSet(NotificationPrefs),
    PresenceSet(PresenceSet),
    PresenceWatch(PresenceWatch),
    PresenceUnwatch(PresenceWatch),
    PresenceQuery(PresenceQuery),
    DocOpen(crate::doc::DocOpen),
    DocUpdate(crate::doc::DocBytes),
    DocAwareness(crate::doc::DocBytes),
    DocClose(crate::doc::DocRef),
}

/// Every op name, as sent in `op`.
pub const OPS: &[&str] = &[
    "ping",
    "auth.refresh",
    "room.create",
    "room.direct",
    "room.join",
    "room.leave",
    "room.invite",
    "room.kick",
    "room.members",
    "rooms.list",
    "room.send",
    "room.edit",
    "room.delete",
    "history",
    "room.typing",
    "room.read",
    "subscribe",
    "unsubscribe",
    "topic.publish",
    "notifications.list",
    "notifications.unread",
    "notifications.read",
    "notifications.prefs.get",
    "notifications.prefs.set",
    "presence.set",
    "presence.watch",
    "presence.unwatch",
    "presence.query",
    "doc.open",
    "doc.update",
    "doc.awareness",
    "doc.close",
];

fn args<T: DeserializeOwned>(op: &str, args: Value) -> Result<T, (ErrorCode, String)> {
    // Absent args are an empty object, so ops whose fields are all optional need none.
    let args = if args.is_null() {
        Value::Object(Default::default())
    } else {
        args
    };
    // The path names the field of a wrong type; serde names a missing one itself.
    serde_path_to_error::deserialize(args).map_err(|e| {
        let path = e.path().to_string();
        let why = e.into_inner();
        let message = if path == "." {
            format!("{op}: {why}")
        } else {
            format!("{op}: {path}: {why}")
        };
        (ErrorCode::InvalidArgs, message)
    })
}

impl Request {
    /// Checks `args` against `op`.
    pub fn parse(op: &str, a: Value) -> Result<Request, (ErrorCode, String)> {
        Ok(match op {
            "ping" => Request::Ping,
            "auth.refresh" => Request::AuthRefresh(args(op, a)?),
            "room.create" => Request::RoomCreate(args(op, a)?),
            "room.direct" => Request::RoomDirect(args(op, a)?),
            "room.join" => Request::RoomJoin(args(op, a)?),
            "room.leave" => Request::RoomLeave(args(op, a)?),
            "room.invite" => Request::RoomInvite(args(op, a)?),
            "room.kick" => Request::RoomKick(args(op, a)?),
            "room.members" => Request::RoomMembers(args(op, a)?),
            "rooms.list" => Request::RoomsList,
            "room.send" => Request::Send(args(op, a)?),
            "room.edit" => Request::Edit(args(op, a)?),
            "room.delete" => Request::Delete(args(op, a)?),
            "history" => Request::History(args(op, a)?),
            "room.typing" => Request::Typing(args(op, a)?),
            "room.read" => Request::Read(args(op, a)?),
            "subscribe" => Request::Subscribe(args(op, a)?),
            "unsubscribe" => Request::Unsubscribe(args(op, a)?),
            "topic.publish" => Request::TopicPublish(args(op, a)?),
            "notifications.list" => Request::NotifList(args(op, a)?),
            "notifications.unread" => Request::NotifUnread,
            "notifications.read" => Request::NotifRead(args(op, a)?),
            "notifications.prefs.get" => Request::PrefsGet,
            "notifications.prefs.set" => Request::PrefsSet(args(op, a)?),
            "presence.set" => Request::PresenceSet(args(op, a)?),
            "presence.watch" => Request::PresenceWatch(args(op, a)?),
            "presence.unwatch" => Request::PresenceUnwatch(args(op, a)?),
            "presence.query" => Request::PresenceQuery(args(op, a)?),
            "doc.open" => Request::DocOpen(args(op, a)?),
            "doc.update" => Request::DocUpdate(args(op, a)?),
            "doc.awareness" => Request::DocAwareness(args(op, a)?),
            "doc.close" => Request::DocClose(args(op, a)?),
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err((ErrorCode::UnknownOp, format!("unknown op `{shown}`")));
            }
        })
    }
}

// ---- results ----

/// Result of `room.send` and `topic.publish`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Published {
    pub channel: String,
    pub epoch: String,
    pub offset: u64,
    /// True when `client_id` was already stored: nothing new was written.
    pub duplicate: bool,
}

/// Result of `subscribe` (and of `room.join`, which subscribes too).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Subscribed {
    pub channel: String,
    pub epoch: String,
    /// The channel's head when the subscription started: live pushes follow it.
    pub offset: u64,
    /// Whether every entry after the client's offset is in `missed`.
    pub recovered: bool,
    /// Why `recovered` is false: one of the tokens in `docs/protocol.md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A human-readable explanation beside `reason`, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Entries after the client's offset, oldest first.
    #[serde(default)]
    pub missed: Vec<Entry>,
}

/// Result of `history`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    pub channel: String,
    pub head: ChannelHead,
    /// Oldest first.
    pub entries: Vec<Entry>,
    /// Whether there are more entries in the direction asked.
    pub more: bool,
}

/// One room in `rooms.list`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomSummary {
    pub room: RoomInfo,
    pub head: ChannelHead,
    pub read_offset: u64,
    pub unread: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomsList {
    pub rooms: Vec<RoomSummary>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Members {
    pub room: String,
    pub members: Vec<Member>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NotifPage {
    pub items: Vec<Notification>,
    pub unread: u64,
    pub more: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PresenceList {
    pub users: Vec<Presence>,
}

// ---- push payloads ----

/// `notifications` push: one or more new notifications (a burst is batched).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NotificationsPush {
    pub items: Vec<Notification>,
    pub unread: u64,
}

/// `notifications.read` push: sent to every connection of the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NotificationsReadPush {
    pub ids: Vec<u64>,
    pub all: bool,
    pub unread: u64,
}

/// `typing` push (ephemeral): who is typing in the room now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TypingPush {
    pub room: String,
    pub users: Vec<String>,
}

/// `receipt` push (ephemeral): a member's read marker moved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReceiptPush {
    pub room: String,
    pub user: String,
    pub offset: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_parses_or_reports_bad_args() {
        for op in OPS {
            match Request::parse(op, Value::Null) {
                Ok(_) => {}
                Err((code, _)) => assert_eq!(code, ErrorCode::InvalidArgs, "{op}"),
            }
        }
        let (code, _) = Request::parse("nope", Value::Null).unwrap_err();
        assert_eq!(code, ErrorCode::UnknownOp);
        let (code, msg) =
            Request::parse("room.send", serde_json::json!({"room": "r"})).unwrap_err();
        assert_eq!(code, ErrorCode::InvalidArgs);
        assert!(msg.contains("text"), "{msg}");
        // A wrong type is named too, nested ones by their path.
        let (code, msg) =
            Request::parse("room.send", serde_json::json!({"room": "r", "text": 5})).unwrap_err();
        assert_eq!(code, ErrorCode::InvalidArgs);
        assert!(msg.starts_with("room.send: text: invalid type"), "{msg}");
        let (_, msg) =
            Request::parse("presence.watch", serde_json::json!({"users": ["a", 7]})).unwrap_err();
        assert!(
            msg.starts_with("presence.watch: users[1]: invalid type"),
            "{msg}"
        );
    }
}
