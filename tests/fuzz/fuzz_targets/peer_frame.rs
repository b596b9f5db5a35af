//! What another node sends over a peer link: a frame body (Hello, Data,
//! Ack), and the `PeerMsg` a Data frame carries, decoded as the node decodes
//! them. The first byte picks which; a Data frame's payload is decoded too.
#![no_main]

use chorus_actors::cluster::link::{decode_frame, Frame};
use chorus_actors::remote;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        if let Ok(Frame::Data { payload, .. }) = decode_frame(rest) {
            let _ = remote::decode(&payload);
        }
    } else {
        let _ = remote::decode(rest);
    }
});
