//! Collaborative documents on the Chorus socket: the `doc.*` requests, their
//! replies and pushes, whose Yjs payloads are bytes.
//!
//! Bytes are a base64 string (standard alphabet, padded) in JSON and a
//! `bin` in MessagePack ([`Bin`]). A MessagePack request may carry either;
//! the envelope's `args` keep a `bin` as its base64 string ([`lenient_value`])
//! until the op's own arguments decode it.
//!
//! The frames that carry bytes ([`DocReply`], [`DocPush`]) have the shape of
//! every other reply and push (`{"id", "ok"}`, `{"push", "channel", "data"}`),
//! so a client that decodes any frame generically reads them as well.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

/// Bytes on the wire: base64 in JSON (and any human-readable format), `bin`
/// in MessagePack. Decodes from either, whatever the format.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bin(pub Vec<u8>);

impl fmt::Debug for Bin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bin({} bytes)", self.0.len())
    }
}

impl Bin {
    pub fn base64(&self) -> String {
        STANDARD.encode(&self.0)
    }
}

impl From<Vec<u8>> for Bin {
    fn from(v: Vec<u8>) -> Bin {
        Bin(v)
    }
}

impl Serialize for Bin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&STANDARD.encode(&self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

struct BinVisitor;

impl<'de> Visitor<'de> for BinVisitor {
    type Value = Bin;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes, or a base64 string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Bin, E> {
        STANDARD
            .decode(v)
            .map(Bin)
            .map_err(|e| E::custom(format!("not base64: {e}")))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bin, E> {
        Ok(Bin(v.to_vec()))
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bin, E> {
        Ok(Bin(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bin, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(Bin(out))
    }
}

impl<'de> Deserialize<'de> for Bin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bin, D::Error> {
        d.deserialize_any(BinVisitor)
    }
}

/// Deserializes any value as [`serde_json::Value`] would, except that bytes
/// (a MessagePack `bin`) become their base64 string instead of an error.
pub fn lenient_value<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    d.deserialize_any(LenientVisitor)
}

struct Lenient(Value);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Lenient, D::Error> {
        d.deserialize_any(LenientVisitor).map(Lenient)
    }
}

struct LenientVisitor;

impl<'de> Visitor<'de> for LenientVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::String(STANDARD.encode(v)))
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(LenientVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(Lenient(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some((k, Lenient(v))) = map.next_entry::<String, Lenient>()? {
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

// ---- requests ----

/// `doc.open`: join a document; the reply carries its state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DocOpen {
    pub doc: String,
    /// The client's Yjs state vector: the reply then carries only what it
    /// lacks. Absent: the whole document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_vector: Option<Bin>,
}

/// `doc.update`: a Yjs (v1) update to apply; acknowledged once durable.
/// `doc.awareness`: a y-protocols awareness update (ephemeral).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DocBytes {
    pub doc: String,
    pub update: Bin,
}

/// `doc.close`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DocRef {
    pub doc: String,
}

// ---- replies and pushes ----

/// What `doc.open` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DocOpened {
    pub doc: String,
    /// A Yjs update: the whole document, or what the given state vector lacks.
    pub update: Bin,
    /// The document's state vector, for the client's own step 1 later.
    pub state_vector: Bin,
    /// The awareness states of the document's other clients (a y-protocols
    /// awareness update; no clients: zero entries).
    pub awareness: Bin,
    /// True when this token may not write this document.
    pub read_only: bool,
}

/// The reply to a `doc.open`: a reply like every other, with bytes in it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DocReply {
    pub id: u64,
    pub ok: DocOpened,
}

/// The events a document pushes with bytes in them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DocEvent {
    /// Another client's update, durable.
    #[serde(rename = "doc.update")]
    Update,
    /// Another client's awareness change (ephemeral), or clients gone.
    #[serde(rename = "doc.awareness")]
    Awareness,
}

/// `data` of a [`DocPush`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DocPushData {
    pub doc: String,
    pub update: Bin,
}

/// A document's push to its clients: `{"push": "doc.update", "channel":
/// "doc:<name>", "data": {"doc", "update"}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DocPush {
    pub push: DocEvent,
    pub channel: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
    pub data: DocPushData,
}

impl DocPush {
    pub fn new(event: DocEvent, doc: &str, update: Vec<u8>) -> DocPush {
        DocPush {
            push: event,
            channel: doc_channel(doc),
            ephemeral: event == DocEvent::Awareness,
            data: DocPushData {
                doc: doc.to_string(),
                update: Bin(update),
            },
        }
    }
}

/// The channel name of a document's pushes: `doc:<name>`.
pub fn doc_channel(doc: &str) -> String {
    format!("doc:{doc}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Encoding, ServerFrame};

    #[test]
    fn bytes_are_base64_in_json_and_bin_in_msgpack() {
        let push = DocPush::new(DocEvent::Update, "notes", vec![0, 1, 2, 255]);
        let json = Encoding::Json.encode(&push).unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains(r#""update":"AAEC/w==""#), "{text}");
        assert!(text.contains(r#""push":"doc.update""#), "{text}");
        let msgpack = Encoding::MsgPack.encode(&push).unwrap();
        // bin 8 of 4 bytes, then the bytes themselves.
        assert!(msgpack.windows(6).any(|w| w == [0xc4, 4, 0, 1, 2, 255]));
        for (enc, bytes) in [(Encoding::Json, json), (Encoding::MsgPack, msgpack)] {
            let back: DocPush = enc.decode(&bytes).unwrap();
            assert_eq!(back, push, "{enc:?}");
        }
    }

    #[test]
    fn server_frames_with_bytes_decode_as_document_frames() {
        let push = ServerFrame::DocPush(DocPush::new(DocEvent::Awareness, "n", vec![1, 2]));
        let reply = ServerFrame::DocReply(DocReply {
            id: 4,
            ok: DocOpened {
                doc: "n".into(),
                update: Bin(vec![0, 0]),
                state_vector: Bin(vec![0]),
                awareness: Bin(vec![0]),
                read_only: true,
            },
        });
        let other = ServerFrame::Push(crate::Push::ephemeral(
            "doc.closed",
            Some("doc:n".into()),
            serde_json::json!({"doc": "n", "reason": "deleted"}),
        ));
        let plain = ServerFrame::Reply(crate::Reply::ok(
            5,
            serde_json::json!({"doc": "n", "seq": 3}),
        ));
        for f in [push, reply, other, plain] {
            for enc in [Encoding::Json, Encoding::MsgPack] {
                let back: ServerFrame = enc.decode(&enc.encode(&f).unwrap()).unwrap();
                assert_eq!(back, f, "{enc:?}");
            }
        }
    }

    #[test]
    fn lenient_args_keep_bin_as_base64() {
        #[derive(Serialize)]
        struct Args {
            doc: &'static str,
            update: Bin,
            n: u32,
        }
        #[derive(Serialize)]
        struct Req {
            id: u64,
            op: &'static str,
            args: Args,
        }
        let req = Req {
            id: 3,
            op: "doc.update",
            args: Args {
                doc: "d",
                update: Bin(vec![9, 8, 7]),
                n: 1,
            },
        };
        let bytes = Encoding::MsgPack.encode(&req).unwrap();
        let raw: crate::RawRequest = Encoding::MsgPack.decode(&bytes).unwrap();
        assert_eq!(raw.args["update"], "CQgH");
        assert_eq!(raw.args["n"], 1);
        let args: DocBytes = serde_json::from_value(raw.args).unwrap();
        assert_eq!(args.update, Bin(vec![9, 8, 7]));
        assert!(
            serde_json::from_value::<DocBytes>(serde_json::json!({"doc": "d", "update": "*"}))
                .is_err()
        );
    }
}
