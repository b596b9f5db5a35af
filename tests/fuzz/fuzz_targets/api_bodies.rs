//! The server API's request bodies and query strings (`/api/v1`), decoded
//! as the extractors decode them; `chorus_node::api::decode_inputs` lists
//! every type a route reads.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chorus_node::api::decode_inputs(data);
});
