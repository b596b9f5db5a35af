//! Reading server frames cheaply, and writing requests.
//!
//! The harness receives far more frames than the server sends distinct
//! messages (fan-out), so it does not build a `serde_json::Value` for each
//! push: [`Incoming`] picks out only the fields some scenario reads and skips
//! the rest. Both encodings decode into it (MessagePack frames are maps with
//! field names, like JSON).

use chorus_protocol::{Encoding, ErrorBody};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A server frame: a reply (`id` with `ok` or `error`) or a push (`push`).
#[derive(Debug, Default, Deserialize)]
pub struct Incoming {
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub ok: Option<Value>,
    #[serde(default)]
    pub error: Option<ErrorBody>,
    #[serde(default)]
    pub push: Option<String>,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub data: Option<PushData>,
}

impl Incoming {
    pub fn is_push(&self) -> bool {
        self.push.is_some()
    }
}

/// The union of the push payload fields the scenarios read; everything else
/// is skipped without being built.
#[derive(Debug, Default, Deserialize)]
pub struct PushData {
    // entry
    #[serde(default)]
    pub sender: Option<String>,
    #[serde(default)]
    pub attachments: Option<Stamp>,
    // typing, receipt
    #[serde(default)]
    pub room: Option<String>,
    #[serde(default)]
    pub users: Option<Vec<String>>,
    #[serde(default)]
    pub offset: Option<u64>,
    // receipt, presence
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    // notifications
    #[serde(default)]
    pub items: Option<Vec<NotificationLite>>,
}

/// The harness's own timestamp, carried in a message's `attachments` or a
/// notification's `data`: wall-clock nanoseconds, so that any process on this
/// machine can measure publish-to-delivery.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stamp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t_ns: Option<u64>,
}

/// The fields of a notification the notify scenario reads.
#[derive(Debug, Deserialize)]
pub struct NotificationLite {
    pub id: u64,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub data: Option<Stamp>,
}

#[derive(Debug, thiserror::Error)]
#[error("decode: {0}")]
pub struct DecodeError(pub String);

/// Decodes one frame's payload.
pub fn decode(encoding: Encoding, bytes: &[u8]) -> Result<Incoming, DecodeError> {
    match encoding {
        Encoding::Json => serde_json::from_slice(bytes).map_err(|e| DecodeError(e.to_string())),
        Encoding::MsgPack => rmp_serde::from_slice(bytes).map_err(|e| DecodeError(e.to_string())),
    }
}

/// A request as sent: `{"id": N, "op": "...", "args": {...}}`.
#[derive(Serialize)]
pub struct Outgoing<'a, A: Serialize> {
    pub id: u64,
    pub op: &'a str,
    pub args: &'a A,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_protocol::{Push, Reply, ServerFrame, SharedFrame};
    use serde_json::json;

    #[test]
    fn pushes_and_replies_decode_from_both_encodings() {
        let entry = ServerFrame::Push(Push {
            push: "entry".into(),
            channel: Some("room:r1".into()),
            epoch: Some("e1".into()),
            offset: Some(42),
            ephemeral: false,
            data: json!({"offset": 42, "kind": "message", "msg_seq": 40, "ts": 1,
                         "sender": "bob", "text": "hi \"there\"", "attachments": {"t_ns": 123}}),
        });
        let notif = ServerFrame::Push(Push::ephemeral(
            "notifications",
            None,
            json!({"items": [{"id": 7, "user": "u", "type": "lt", "title": "t", "priority": "normal",
                              "created_at": 1, "read": false, "data": {"t_ns": 9}}], "unread": 1}),
        ));
        let reply = ServerFrame::Reply(Reply::ok(5, json!({"offset": 3})));
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let e = decode(enc, &SharedFrame::new(entry.clone()).bytes(enc)).unwrap();
            assert_eq!(e.push.as_deref(), Some("entry"));
            assert_eq!(e.channel.as_deref(), Some("room:r1"));
            assert_eq!(e.offset, Some(42));
            let d = e.data.unwrap();
            assert_eq!(d.sender.as_deref(), Some("bob"));
            assert_eq!(d.attachments.unwrap().t_ns, Some(123));

            let n = decode(enc, &SharedFrame::new(notif.clone()).bytes(enc)).unwrap();
            let items = n.data.unwrap().items.unwrap();
            assert_eq!((items[0].id, items[0].kind.as_str()), (7, "lt"));
            assert_eq!(items[0].data.unwrap().t_ns, Some(9));

            let r = decode(enc, &SharedFrame::new(reply.clone()).bytes(enc)).unwrap();
            assert!(!r.is_push());
            assert_eq!(r.id, Some(5));
            assert_eq!(r.ok.unwrap()["offset"], 3);
        }
    }

    #[test]
    fn requests_encode_as_the_protocol_expects() {
        let args = json!({"room": "r"});
        let out = Outgoing {
            id: 3,
            op: "room.join",
            args: &args,
        };
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let raw: chorus_protocol::RawRequest = enc.decode(&enc.encode(&out).unwrap()).unwrap();
            assert_eq!((raw.id, raw.op.as_str()), (3, "room.join"));
            assert!(chorus_protocol::Request::parse(&raw.op, raw.args).is_ok());
        }
    }
}
