//! The Chorus wire protocol, shared by the node, the load harness and the tests.
//!
//! - [`frame`]: the envelope (request / reply / push) and its two encodings,
//!   JSON text frames and MessagePack binary frames, chosen by WebSocket
//!   subprotocol; [`SharedFrame`] encodes a push once per encoding for any
//!   number of recipients.
//! - [`ops`]: every request with its arguments and result, and the push payloads.
//! - [`types`]: the domain records (entries, rooms, notifications, presence),
//!   which are also what the store keeps.
//! - [`doc`]: collaborative documents' requests, replies and pushes, whose
//!   Yjs payloads are bytes (base64 in JSON, `bin` in MessagePack).
//! - [`codes`]: numeric error codes and WebSocket close codes.
//!
//! `docs/protocol.md` is the reference for clients; this crate is its code.

pub mod codes;
pub mod doc;
pub mod frame;
pub mod ops;
pub mod types;

pub use codes::{close, ErrorCode};
pub use frame::{
    CodecError, Encoding, ErrorBody, Push, RawRequest, Reply, ServerFrame, SharedFrame,
    PROTOCOL_VERSION, SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK,
};
pub use ops::Request;
pub use types::*;
