//! libFuzzer target for the kill switch's untrusted input: the three Standard Webhooks
//! headers and the body (signature check, replay guard, JSON body). Never panics, and never
//! accepts a signature it did not compute.
#![no_main]

use portcullis::killswitch::Request;
use portcullis::killswitch::webhook::{ReplayGuard, Secret, SignedRequest, verify};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Split the input into id / timestamp / signature header / body at 0xff bytes.
    let mut parts = data.splitn(4, |b| *b == 0xff);
    let id = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let ts = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let sig = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let body = parts.next().unwrap_or_default();
    let Ok(secret) = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw") else {
        return;
    };
    let req = SignedRequest {
        id: &id,
        timestamp: &ts,
        signature_header: &sig,
        body,
    };
    let now = 1_614_265_330;
    if verify(std::slice::from_ref(&secret), &req, now).is_ok() {
        // Only a correct HMAC can pass; fuzzing must never find one by chance.
        let expected =
            portcullis::killswitch::webhook::sign(&secret, &id, ts.parse().unwrap_or(0), body);
        assert!(sig.split_whitespace().any(|s| s == expected));
        let mut guard = ReplayGuard::new(16);
        let _ = guard.check_and_remember(&id, ts.parse().unwrap_or(0), now);
    }
    let _ = serde_json::from_slice::<Request>(body);
});
