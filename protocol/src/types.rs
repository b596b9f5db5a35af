//! Domain records shared by the wire protocol and the store.
//!
//! The same structs are stored (MessagePack) and sent to clients, so a history
//! page is served without translating each record.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// The current time in milliseconds since the Unix epoch.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What a channel is: a chat room, a topic or one user's feed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    Room,
    Topic,
    Feed,
}

/// A parsed channel name: `room:<id>`, `topic:<name>` or `feed:<user>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Channel {
    pub kind: ChannelKind,
    pub name: String,
}

/// Longest id a room, topic or user may have.
pub const MAX_ID_LEN: usize = 128;

impl Channel {
    pub fn room(id: &str) -> Channel {
        Channel {
            kind: ChannelKind::Room,
            name: id.to_string(),
        }
    }
    pub fn topic(name: &str) -> Channel {
        Channel {
            kind: ChannelKind::Topic,
            name: name.to_string(),
        }
    }
    pub fn feed(user: &str) -> Channel {
        Channel {
            kind: ChannelKind::Feed,
            name: user.to_string(),
        }
    }

    /// Parses `room:x`, `topic:x`, `feed:x`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Channel> {
        let (prefix, name) = s.split_once(':')?;
        let kind = match prefix {
            "room" => ChannelKind::Room,
            "topic" => ChannelKind::Topic,
            "feed" => ChannelKind::Feed,
            _ => return None,
        };
        valid_id(name).then(|| Channel {
            kind,
            name: name.to_string(),
        })
    }

    /// The key this channel is stored and placed under (`room:42`).
    pub fn key(&self) -> String {
        let prefix = match self.kind {
            ChannelKind::Room => "room",
            ChannelKind::Topic => "topic",
            ChannelKind::Feed => "feed",
        };
        format!("{prefix}:{}", self.name)
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// Ids are 1..=128 bytes of `[A-Za-z0-9_.:@-]`, so they are safe as store keys and in logs.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
}

/// What kind of record an entry of a channel's history is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A chat message (counts toward unread).
    Message,
    /// An edit of the message at `target`.
    Edit,
    /// A deletion of the message at `target`.
    Delete,
    /// `sender` joined the room.
    Joined,
    /// `sender` left, or was removed from, the room (`data.by` says who removed them).
    Left,
    /// A topic or feed publication (`data`).
    Publish,
}

/// One record of a channel's history, at a unique offset.
///
/// `msg_seq` counts the `message` entries up to and including this one, so the
/// unread count after a read marker is `head.msg_seq - marker_entry.msg_seq`
/// without scanning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub offset: u64,
    pub kind: EntryKind,
    pub msg_seq: u64,
    pub ts: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachments: Option<Value>,
    /// The message this one replies to (threads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
    /// The message an edit or delete applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub deleted: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Entry {
    /// A new entry of `kind` with everything optional left empty.
    pub fn new(offset: u64, kind: EntryKind, msg_seq: u64, ts: Millis) -> Entry {
        Entry {
            offset,
            kind,
            msg_seq,
            ts,
            sender: None,
            client_id: None,
            text: None,
            attachments: None,
            reply_to: None,
            target: None,
            data: None,
            edited_at: None,
            deleted: false,
        }
    }
}

/// The newest point of a channel: what a subscriber resumes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelHead {
    /// Changes only when the channel's history was lost; a client holding another epoch cannot resume.
    pub epoch: String,
    /// The last offset written (0 when the channel is empty; offsets start at 1).
    pub offset: u64,
    /// `msg_seq` of the last entry.
    pub msg_seq: u64,
}

/// Direct rooms have exactly two members; group rooms are invite-only; public rooms anyone may join.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomKind {
    Direct,
    Group,
    Public,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomInfo {
    pub id: String,
    pub kind: RoomKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub created_by: String,
    pub created_at: Millis,
    /// Whether joins and leaves are entries of the room (`joined` / `left`,
    /// pushed to every subscriber). Absent in rooms stored before the
    /// setting existed: the kind's default ([`RoomInfo::records_membership`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership_entries: Option<bool>,
}

impl RoomInfo {
    /// A room created now; `membership_entries` defaults by kind.
    pub fn new(
        id: String,
        kind: RoomKind,
        name: Option<String>,
        created_by: String,
        membership_entries: Option<bool>,
    ) -> RoomInfo {
        RoomInfo {
            id,
            kind,
            name,
            created_by,
            created_at: now_ms(),
            membership_entries: Some(membership_entries.unwrap_or(kind != RoomKind::Public)),
        }
    }

    /// Are joins and leaves stored as entries? Off by default for public
    /// rooms: there every join would be pushed to every subscriber, so a
    /// room joined by n viewers would cost n² pushes. A kick is always an
    /// entry (the removed user is told, and history shows it).
    pub fn records_membership(&self) -> bool {
        self.membership_entries
            .unwrap_or(self.kind != RoomKind::Public)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Member,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub user: String,
    pub role: Role,
    pub joined_at: Millis,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    Normal,
    High,
    Urgent,
}

/// One entry of a user's notification inbox. `id` is time-ordered (newer is larger).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub id: u64,
    pub user: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// The room this notification is about, if any (lets a user mute a room).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    pub created_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Millis>,
    pub read: bool,
}

impl Notification {
    pub fn expired(&self, now: Millis) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

/// A user's notification preferences. Urgent notifications are never muted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationPrefs {
    #[serde(default)]
    pub muted_categories: Vec<String>,
    #[serde(default)]
    pub muted_rooms: Vec<String>,
}

impl NotificationPrefs {
    /// Whether `n` is pushed live (muted ones are stored and listed, not pushed).
    pub fn pushes(&self, n: &Notification) -> bool {
        if n.priority == Priority::Urgent {
            return true;
        }
        let cat_muted = n
            .category
            .as_ref()
            .is_some_and(|c| self.muted_categories.contains(c));
        let room_muted = n
            .room
            .as_ref()
            .is_some_and(|r| self.muted_rooms.contains(r));
        !(cat_muted || room_muted)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Online,
    Idle,
    Offline,
}

/// A user's presence, merged across all of their connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub user: String,
    pub status: Status,
    /// When the user was last active (for offline users: when their last connection ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<String>,
    /// How many connections (devices) the user has open.
    pub devices: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_parse() {
        assert_eq!(Channel::parse("room:42"), Some(Channel::room("42")));
        assert_eq!(
            Channel::parse("topic:post:1"),
            Some(Channel::topic("post:1"))
        );
        assert_eq!(Channel::parse("feed:alice"), Some(Channel::feed("alice")));
        assert_eq!(Channel::parse("room:"), None);
        assert_eq!(Channel::parse("chat:1"), None);
        assert_eq!(Channel::parse("room:a b"), None);
        assert_eq!(Channel::room("x").key(), "room:x");
    }

    #[test]
    fn rooms_stored_before_the_setting_keep_the_default_of_their_kind() {
        #[derive(Serialize)]
        struct OldRoom<'a> {
            id: &'a str,
            kind: RoomKind,
            created_by: &'a str,
            created_at: Millis,
        }
        for (kind, records) in [
            (RoomKind::Public, false),
            (RoomKind::Group, true),
            (RoomKind::Direct, true),
        ] {
            let old = OldRoom {
                id: "r",
                kind,
                created_by: "ann",
                created_at: 1,
            };
            let bytes = rmp_serde::to_vec_named(&old).unwrap();
            let room: RoomInfo = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(room.membership_entries, None);
            assert_eq!(room.records_membership(), records, "{kind:?}");
            let new = RoomInfo::new("r".into(), kind, None, "ann".into(), None);
            assert_eq!(new.membership_entries, Some(records));
            let chosen = RoomInfo::new("r".into(), kind, None, "ann".into(), Some(!records));
            assert_eq!(chosen.records_membership(), !records);
        }
    }

    #[test]
    fn urgent_is_never_muted() {
        let prefs = NotificationPrefs {
            muted_categories: vec!["social".into()],
            muted_rooms: vec![],
        };
        let mut n = Notification {
            id: 1,
            user: "a".into(),
            kind: "like".into(),
            title: "t".into(),
            body: None,
            data: None,
            priority: Priority::Normal,
            category: Some("social".into()),
            room: None,
            created_at: 0,
            expires_at: None,
            read: false,
        };
        assert!(!prefs.pushes(&n));
        n.priority = Priority::Urgent;
        assert!(prefs.pushes(&n));
    }
}
