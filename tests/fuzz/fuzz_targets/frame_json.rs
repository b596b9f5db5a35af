//! A WebSocket text frame on a JSON connection: the envelope, then the op's
//! arguments, as the node reads them (see `chorus_fuzz`).
#![no_main]

use chorus_protocol::Encoding;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // actix-ws hands the reader only text frames that are valid UTF-8.
    if std::str::from_utf8(data).is_ok() {
        chorus_fuzz::client_frame(Encoding::Json, data);
    }
});
