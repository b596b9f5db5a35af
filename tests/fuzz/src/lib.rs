//! Drivers shared by the fuzz targets in `fuzz_targets/`.
//!
//! Each target feeds bytes from outside through the public functions the
//! node itself calls on them, in the order it calls them, so a crash, hang or
//! runaway allocation found here is one the node has on the same input. The
//! socket path is here because three targets share it:
//!
//! - `node/src/ws.rs` `read_loop` decodes a frame into a [`RawRequest`] in the
//!   connection's encoding, or salvages its id for the `malformed_frame` reply;
//! - `actors/src/conn.rs` checks the op's arguments with [`Request::parse`]
//!   and turns the names in them into actor keys;
//! - a refused frame is answered with an error reply encoded as every reply is.

use chorus_actors::conn::{check_not_direct_id, direct_room_id};
use chorus_protocol::ops::{History, RoomCreate, Subscribe, Unsubscribe};
use chorus_protocol::{
    valid_id, Channel, Encoding, ErrorCode, RawRequest, Reply, Request, ServerFrame, SharedFrame,
};
use serde_json::Value;

/// A client frame in `encoding`, as the node reads it off the socket.
pub fn client_frame(encoding: Encoding, bytes: &[u8]) {
    match encoding.decode::<RawRequest>(bytes) {
        Ok(req) => {
            same_in_the_other_encoding(encoding, &req);
            request(encoding, req.id, &req.op, req.args);
        }
        Err(e) => {
            // ws.rs `salvage_id`.
            let id = encoding
                .decode::<Value>(bytes)
                .ok()
                .and_then(|v| v.get("id").and_then(Value::as_u64))
                .unwrap_or(0);
            let message: String = e.0.chars().take(200).collect();
            error_reply(encoding, id, ErrorCode::MalformedFrame, message);
        }
    }
}

/// One request's arguments, checked as the connection actor checks them.
pub fn request(encoding: Encoding, id: u64, op: &str, args: Value) {
    match Request::parse(op, args) {
        Ok(r) => check_names(&r),
        Err((code, message)) => {
            assert!(
                matches!(code, ErrorCode::InvalidArgs | ErrorCode::UnknownOp),
                "{code:?}"
            );
            error_reply(encoding, id, code, message);
        }
    }
}

fn error_reply(encoding: Encoding, id: u64, code: ErrorCode, message: String) {
    let frame = SharedFrame::new(ServerFrame::Reply(Reply::err(id, code, message)));
    let bytes = frame.bytes(encoding);
    // The reply must be a frame the client can read back.
    let back: ServerFrame = encoding
        .decode(&bytes)
        .expect("an error reply decodes in its own encoding");
    assert_eq!(&back, frame.frame());
}

/// `frame.rs` promises that both encodings carry the same documents: a
/// request read in one must read back the same from the other.
fn same_in_the_other_encoding(encoding: Encoding, req: &RawRequest) {
    let other = match encoding {
        Encoding::Json => Encoding::MsgPack,
        Encoding::MsgPack => Encoding::Json,
    };
    let bytes = other
        .encode(req)
        .expect("a decoded request encodes in the other encoding");
    let back: RawRequest = other
        .decode(&bytes)
        .expect("a decoded request reads back from the other encoding");
    assert_eq!((back.id, &back.op), (req.id, &req.op));
    if encoding == Encoding::Json {
        // MessagePack keeps every JSON number exactly; the other way round a
        // float may come back one unit in the last place off (serde_json's
        // default float parser), so only the JSON side compares values.
        assert_eq!(back.args, req.args);
    }
}

/// The names in a parsed request that `conn.rs` turns into actor keys
/// before addressing an actor: a channel reads back as the name it was
/// parsed from, and a direct room's id is the same whoever asks.
fn check_names(r: &Request) {
    match r {
        Request::History(History { channel, .. })
        | Request::Subscribe(Subscribe { channel, .. })
        | Request::Unsubscribe(Unsubscribe { channel }) => {
            if let Some(c) = Channel::parse(channel) {
                assert!(valid_id(&c.name));
                assert_eq!(&c.key(), channel);
            }
        }
        Request::RoomDirect(a) if valid_id(&a.user) => {
            assert_eq!(
                direct_room_id("caller", &a.user),
                direct_room_id(&a.user, "caller")
            );
        }
        Request::RoomCreate(RoomCreate {
            room: Some(room), ..
        }) => {
            let reserved = check_not_direct_id(room).is_err();
            assert_eq!(reserved, room.starts_with("dm:"));
        }
        _ => {}
    }
}
