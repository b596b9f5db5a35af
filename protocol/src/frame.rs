//! The envelope every frame uses, and its two encodings.
//!
//! Client → server: `{"id": 7, "op": "room.send", "args": {...}}`.
//! Server → client: a reply `{"id": 7, "ok": {...}}` / `{"id": 7, "error": {...}}`,
//! or a push `{"push": "entry", "channel": "room:42", "epoch": "…", "offset": 12, "data": {...}}`.
//!
//! JSON goes in text frames; MessagePack (maps with field names, so both
//! encodings carry the same document) in binary frames.

use std::sync::OnceLock;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::codes::ErrorCode;

/// WebSocket subprotocol for JSON text frames (the default when none is asked for).
pub const SUBPROTOCOL_JSON: &str = "chorus.v1.json";
/// WebSocket subprotocol for MessagePack binary frames.
pub const SUBPROTOCOL_MSGPACK: &str = "chorus.v1.msgpack";
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Deepest nesting of arrays and maps a decoded document may have, in either
/// encoding (the limit serde_json applies to JSON).
pub const MAX_DEPTH: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    Json,
    MsgPack,
}

impl Encoding {
    /// The encoding a `Sec-WebSocket-Protocol` value asks for.
    pub fn from_subprotocol(s: &str) -> Option<Encoding> {
        match s.trim() {
            SUBPROTOCOL_JSON => Some(Encoding::Json),
            SUBPROTOCOL_MSGPACK => Some(Encoding::MsgPack),
            _ => None,
        }
    }

    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => SUBPROTOCOL_JSON,
            Encoding::MsgPack => SUBPROTOCOL_MSGPACK,
        }
    }

    /// Serializes any value in this encoding.
    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        match self {
            Encoding::Json => serde_json::to_vec(value).map_err(|e| CodecError(e.to_string())),
            Encoding::MsgPack => {
                rmp_serde::to_vec_named(value).map_err(|e| CodecError(e.to_string()))
            }
        }
    }

    /// Deserializes any value from this encoding.
    ///
    /// Nesting is limited to [`MAX_DEPTH`] in both encodings (serde_json's own
    /// limit), so both accept the same documents and a small frame of deeply
    /// nested arrays cannot exhaust the decoding thread's stack.
    pub fn decode<T: for<'de> Deserialize<'de>>(self, bytes: &[u8]) -> Result<T, CodecError> {
        match self {
            Encoding::Json => serde_json::from_slice(bytes).map_err(|e| CodecError(e.to_string())),
            Encoding::MsgPack => {
                let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
                de.set_max_depth(MAX_DEPTH);
                T::deserialize(&mut de).map_err(|e| CodecError(e.to_string()))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("codec: {0}")]
pub struct CodecError(pub String);

/// A request as read off the wire, before its arguments are checked.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RawRequest {
    pub id: u64,
    pub op: String,
    /// Bytes (a MessagePack `bin`) become their base64 string here.
    #[serde(default, deserialize_with = "crate::doc::lenient_value")]
    pub args: Value,
}

/// The error half of a reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// The code's stable name (`not_member`).
    pub name: String,
    /// Human-readable; never carries server internals.
    pub message: String,
    /// Whether retrying the same request later may succeed.
    pub retryable: bool,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code,
            name: code.name().to_string(),
            message: message.into(),
            retryable: code.retryable(),
        }
    }
}

/// The answer to one request. `id` 0 answers a frame whose id could not be read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Reply {
    pub fn ok(id: u64, value: Value) -> Reply {
        Reply {
            id,
            ok: Some(value),
            error: None,
        }
    }
    pub fn err(id: u64, code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply {
            id,
            ok: None,
            error: Some(ErrorBody::new(code, message)),
        }
    }
}

/// A server-initiated event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Push {
    /// The event name (`entry`, `typing`, `receipt`, `presence`, `notifications`, …).
    pub push: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// True for events that are not stored and cannot be caught up on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
    pub data: Value,
}

impl Push {
    /// An ephemeral event (typing, presence, receipts): not stored, not replayed.
    pub fn ephemeral(event: &str, channel: Option<String>, data: Value) -> Push {
        Push {
            push: event.to_string(),
            channel,
            epoch: None,
            offset: None,
            ephemeral: true,
            data,
        }
    }
}

/// Anything the server sends.
///
/// The document variants come first: a frame that has their shape (a
/// `doc.open` reply, a `doc.update` or `doc.awareness` push) decodes as one,
/// keeping its bytes as bytes; every other frame as a `Reply` or `Push`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerFrame {
    DocReply(crate::doc::DocReply),
    DocPush(crate::doc::DocPush),
    Reply(Reply),
    Push(Push),
}

impl ServerFrame {
    /// The request id, for a reply.
    pub fn reply_id(&self) -> Option<u64> {
        match self {
            ServerFrame::Reply(r) => Some(r.id),
            ServerFrame::DocReply(r) => Some(r.id),
            _ => None,
        }
    }
}

/// A frame encoded at most once per encoding, however many connections it goes to.
///
/// Fan-out hands the same `Arc<SharedFrame>` to every recipient; each
/// connection asks for the bytes in its own encoding and gets a cheap clone.
#[derive(Debug)]
pub struct SharedFrame {
    frame: ServerFrame,
    json: OnceLock<Bytes>,
    msgpack: OnceLock<Bytes>,
    /// The same event in y-protocols framing, for `/doc` (y-websocket)
    /// connections: built once by the document that sends it.
    yjs: Option<Bytes>,
}

impl SharedFrame {
    pub fn new(frame: ServerFrame) -> SharedFrame {
        SharedFrame {
            frame,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
            yjs: None,
        }
    }

    /// A frame that also has a y-protocols encoding (`yjs`), which `/doc`
    /// connections send instead of the Chorus envelope.
    pub fn with_yjs(frame: ServerFrame, yjs: Bytes) -> SharedFrame {
        SharedFrame {
            yjs: Some(yjs),
            ..SharedFrame::new(frame)
        }
    }

    /// The y-protocols message, if this frame has one.
    pub fn yjs(&self) -> Option<&Bytes> {
        self.yjs.as_ref()
    }

    pub fn frame(&self) -> &ServerFrame {
        &self.frame
    }

    /// The encoded bytes; encoding cannot fail for these types, but if it did
    /// the client gets an `internal` error frame instead of nothing.
    pub fn bytes(&self, encoding: Encoding) -> Bytes {
        let cell = match encoding {
            Encoding::Json => &self.json,
            Encoding::MsgPack => &self.msgpack,
        };
        cell.get_or_init(|| match encoding.encode(&self.frame) {
            Ok(v) => Bytes::from(v),
            Err(e) => {
                let fallback = ServerFrame::Reply(Reply::err(0, ErrorCode::Internal, e.0));
                Bytes::from(encoding.encode(&fallback).unwrap_or_default())
            }
        })
        .clone()
    }
}

impl From<ServerFrame> for SharedFrame {
    fn from(f: ServerFrame) -> Self {
        SharedFrame::new(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_encodings_carry_the_same_document() {
        let frames = vec![
            ServerFrame::Reply(Reply::ok(3, serde_json::json!({"offset": 5}))),
            ServerFrame::Reply(Reply::err(4, ErrorCode::NotMember, "no")),
            ServerFrame::Push(Push {
                push: "entry".into(),
                channel: Some("room:1".into()),
                epoch: Some("e".into()),
                offset: Some(9),
                ephemeral: false,
                data: serde_json::json!({"text": "hi"}),
            }),
            ServerFrame::Push(Push::ephemeral(
                "typing",
                None,
                serde_json::json!({"users": []}),
            )),
        ];
        for f in frames {
            let shared = SharedFrame::new(f.clone());
            for enc in [Encoding::Json, Encoding::MsgPack] {
                let back: ServerFrame = enc.decode(&shared.bytes(enc)).unwrap();
                assert_eq!(back, f, "{enc:?}");
            }
        }
    }

    #[test]
    fn deep_nesting_is_refused_in_both_encodings() {
        let mut deep = serde_json::json!(null);
        for _ in 0..200 {
            deep = serde_json::json!([deep]);
        }
        let json = format!(
            "{{\"id\":1,\"op\":\"ping\",\"args\":{}}}",
            serde_json::to_string(&deep).unwrap()
        );
        assert!(Encoding::Json
            .decode::<RawRequest>(json.as_bytes())
            .is_err());
        // Built by hand: encoding a 200-deep value would itself recurse.
        let mut msgpack = vec![
            0x83, 0xa2, b'i', b'd', 0x01, 0xa2, b'o', b'p', 0xa4, b'p', b'i', b'n', b'g',
        ];
        msgpack.extend([0xa4, b'a', b'r', b'g', b's']);
        msgpack.extend(std::iter::repeat_n(0x91, 100_000));
        msgpack.push(0xc0);
        assert!(Encoding::MsgPack.decode::<RawRequest>(&msgpack).is_err());
        // Shallow documents still decode.
        let mut ok = vec![
            0x83, 0xa2, b'i', b'd', 0x01, 0xa2, b'o', b'p', 0xa4, b'p', b'i', b'n', b'g',
        ];
        ok.extend([0xa4, b'a', b'r', b'g', b's']);
        ok.extend(std::iter::repeat_n(0x91, 100));
        ok.push(0xc0);
        assert_eq!(
            Encoding::MsgPack.decode::<RawRequest>(&ok).unwrap().op,
            "ping"
        );
    }

    #[test]
    fn raw_request_decodes_from_both() {
        let req = RawRequest {
            id: 1,
            op: "ping".into(),
            args: serde_json::json!({"a": [1, "x"]}),
        };
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let bytes = enc.encode(&req).unwrap();
            let back: RawRequest = enc.decode(&bytes).unwrap();
            assert_eq!(back.id, 1);
            assert_eq!(back.args, req.args);
        }
    }
}
