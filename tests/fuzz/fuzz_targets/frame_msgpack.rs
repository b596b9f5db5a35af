//! A WebSocket binary frame on a MessagePack connection: the envelope, then
//! the op's arguments, as the node reads them (see `chorus_fuzz`).
#![no_main]

use chorus_protocol::Encoding;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chorus_fuzz::client_frame(Encoding::MsgPack, data);
});
