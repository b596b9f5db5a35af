//! The arguments of every op, in both encodings. The first byte picks the op
//! from `OPS`, the second the encoding (low bit: 0 JSON, 1 MessagePack); the
//! rest is the `args` document. The frame targets reach the same code, but a
//! mutated op name rarely stays a real one: here every op's argument parser
//! gets the same attention.
#![no_main]

use chorus_protocol::ops::OPS;
use chorus_protocol::Encoding;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let [op, enc, args @ ..] = data else { return };
    let op = OPS[usize::from(*op) % OPS.len()];
    let encoding = if enc & 1 == 0 {
        Encoding::Json
    } else {
        Encoding::MsgPack
    };
    // `args` is decoded as part of the envelope, into a `Value`, with the
    // same decoder and limits.
    if let Ok(args) = encoding.decode::<Value>(args) {
        chorus_fuzz::request(encoding, 1, op, args);
    }
});
