//! libFuzzer target for the HTTP request-head parser and `split_host_port`:
//! owns feeding arbitrary bytes to them; must not assert anything beyond
//! "no panic" and "a verdict on a prefix is final".
#![no_main]

use portcullis::proxy::http_head::{HeadParse, parse_request_head, split_host_port};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let full = parse_request_head(data);
    let half = parse_request_head(data.get(..data.len() / 2).unwrap_or_default());
    if half != HeadParse::NeedMore {
        assert_eq!(half, full);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = split_host_port(text);
    }
});
