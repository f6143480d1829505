//! libFuzzer target for the ClientHello parser: owns feeding arbitrary bytes
//! (and their prefixes) to it; must not assert anything beyond "no panic"
//! and "a verdict on a prefix is final".
#![no_main]

use portcullis::proxy::sni::{Parse, parse_client_hello};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let full = parse_client_hello(data);
    // Incrementality: once a prefix gets a verdict, more bytes never change it.
    let half = parse_client_hello(data.get(..data.len() / 2).unwrap_or_default());
    if half != Parse::NeedMore {
        assert_eq!(half, full);
    }
});
