//! Error codes and WebSocket close codes.
//!
//! Every rejection a client can see has its own numeric code, so a client can
//! react to it without parsing text. Codes are grouped by the thousand:
//! 1xxx the frame or request itself, 2xxx authentication, 3xxx authorization
//! and domain rules, 5xxx the server side (where a retry may help).

use serde::{Deserialize, Serialize};

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, $name:literal, $retry:literal; )*) => {
        /// A specific, documented error a client can receive.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, in numeric order (used by docs tests and metrics).
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The numeric code sent on the wire.
            pub fn code(self) -> u16 {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// A stable snake_case name, also used as the metrics label.
            pub fn name(self) -> &'static str {
                match self { $(ErrorCode::$variant => $name,)* }
            }

            /// Whether the same request may succeed if retried later.
            pub fn retryable(self) -> bool {
                match self { $(ErrorCode::$variant => $retry,)* }
            }

            /// The code for a numeric value, if it is one of ours.
            pub fn from_code(code: u16) -> Option<ErrorCode> {
                match code { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    /// The frame is not valid JSON / MessagePack, or not a request envelope.
    MalformedFrame = 1001, "malformed_frame", false;
    /// The `op` names no request this server knows.
    UnknownOp = 1002, "unknown_op", false;
    /// The request's arguments are missing a field or have a wrong type.
    InvalidArgs = 1003, "invalid_args", false;
    /// The frame is larger than `limits.max_frame_bytes`.
    FrameTooLarge = 1004, "frame_too_large", false;
    /// The connection sent more requests than `limits.rate_per_sec` allows.
    RateLimited = 1005, "rate_limited", true;
    /// A text frame on a MessagePack connection, or a binary frame on a JSON one.
    WrongEncoding = 1006, "wrong_encoding", false;
    /// A value is out of range (too long a text, too large a page, bad offset).
    InvalidValue = 1007, "invalid_value", false;
    /// The bytes are not a valid Yjs update or y-protocols awareness update.
    InvalidUpdate = 1008, "invalid_update", false;
    /// A document update larger than `docs.max_update_bytes`.
    UpdateTooLarge = 1009, "update_too_large", false;
    /// The connection sent more document updates than `docs.updates_per_sec` allows.
    DocRateLimited = 1010, "doc_rate_limited", true;

    /// No token in the `Authorization` header or the `token` query parameter.
    TokenMissing = 2001, "token_missing", false;
    /// The token is not a well-formed JWT.
    TokenMalformed = 2002, "token_malformed", false;
    /// The token's signature does not verify with the configured key.
    TokenBadSignature = 2003, "token_bad_signature", false;
    /// The token's `exp` is in the past.
    TokenExpired = 2004, "token_expired", false;
    /// The token is signed with an algorithm the server does not accept (including `none`).
    TokenAlgorithm = 2005, "token_algorithm", false;
    /// A required claim (`sub`, `exp`) is missing or has the wrong type.
    TokenMissingClaim = 2006, "token_missing_claim", false;
    /// A refreshed token names another user than the connection's.
    TokenUserMismatch = 2007, "token_user_mismatch", false;
    /// The server API key is missing or wrong.
    ApiKeyInvalid = 2008, "api_key_invalid", false;

    /// The token's claims do not allow this room or topic.
    Forbidden = 3001, "forbidden", false;
    /// The room does not exist.
    RoomNotFound = 3002, "room_not_found", false;
    /// The user is not a member of this (non-public) room.
    NotMember = 3003, "not_member", false;
    /// The room already exists.
    RoomExists = 3004, "room_exists", false;
    /// No message at that offset.
    MessageNotFound = 3005, "message_not_found", false;
    /// Only the author may edit or delete a message.
    NotAuthor = 3006, "not_author", false;
    /// The channel name is not `room:…`, `topic:…` or `feed:…`.
    BadChannel = 3007, "bad_channel", false;
    /// The operation does not apply to this kind of room (for example inviting to a direct room).
    WrongRoomKind = 3008, "wrong_room_kind", false;
    /// The user is not subscribed to this channel.
    NotSubscribed = 3009, "not_subscribed", false;
    /// No notification with that id.
    NotificationNotFound = 3010, "notification_not_found", false;
    /// The document does not exist (server API reads and deletes).
    DocNotFound = 3011, "doc_not_found", false;
    /// The token may open this document but not write it (`doc_write` claim).
    DocReadOnly = 3012, "doc_read_only", false;
    /// `doc.update` / `doc.awareness` on a document this connection has not opened.
    DocNotOpen = 3013, "doc_not_open", false;
    /// The update would make the document larger than `docs.max_doc_bytes`.
    DocTooLarge = 3014, "doc_too_large", false;
    /// The document already exists (server API create).
    DocExists = 3015, "doc_exists", false;

    /// An unexpected server error; the request may or may not have taken effect.
    Internal = 5001, "internal", true;
    /// The store is unavailable or timed out; nothing was acknowledged, retry.
    StoreUnavailable = 5002, "store_unavailable", true;
    /// Another writer took the offset (ownership moved); nothing was acknowledged, retry.
    Conflict = 5003, "conflict", true;
    /// The server is overloaded; retry later.
    Overloaded = 5004, "overloaded", true;
    /// The node is shutting down; reconnect to another node and retry.
    ShuttingDown = 5005, "shutting_down", true;
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.code())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = u16::deserialize(d)?;
        ErrorCode::from_code(code)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error code {code}")))
    }
}

/// WebSocket close codes the server uses (RFC 6455 private range 4000-4999 plus 1001).
pub mod close {
    /// The node is shutting down: reconnect, to another node if there is one.
    pub const GOING_AWAY: u16 = 1001;
    /// The connection's token expired and was not refreshed.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The client did not read fast enough: its outbound queue overflowed.
    pub const SLOW_CONSUMER: u16 = 4002;
    /// The client kept violating the rate limit.
    pub const RATE_LIMITED: u16 = 4003;
    /// The client did not answer pings for `limits.idle_timeout`.
    pub const IDLE_TIMEOUT: u16 = 4004;
    /// `/doc`: a message that is not valid y-protocols (or not a valid Yjs update).
    pub const DOC_INVALID: u16 = 4010;
    /// `/doc`: an update larger than `docs.max_update_bytes`.
    pub const DOC_UPDATE_TOO_LARGE: u16 = 4011;
    /// `/doc`: the update would make the document larger than `docs.max_doc_bytes`.
    pub const DOC_TOO_LARGE: u16 = 4012;
    /// `/doc`: more updates than `docs.updates_per_sec` allows; reconnecting resyncs.
    pub const DOC_RATE_LIMITED: u16 = 4013;
    /// `/doc`: the document moved to another node, was deleted, or could not be
    /// written; reconnect (y-websocket does by itself) and the sync repairs the rest.
    pub const DOC_RECONNECT: u16 = 4014;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.code()), "duplicate code {}", c.code());
            assert_eq!(ErrorCode::from_code(c.code()), Some(*c));
        }
        assert_eq!(ErrorCode::from_code(9999), None);
    }
}
