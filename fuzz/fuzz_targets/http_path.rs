//! libFuzzer target for inspect mode's path normaliser and `[[http]]` path patterns: owns
//! feeding arbitrary paths to them; asserts that an accepted path's normal form is a fixed
//! point and carries none of what the normaliser refuses (encoded separators or dots, `;`,
//! `//`, dot segments, double encoding, non-ASCII).
#![no_main]

use portcullis::policy::http::PathPattern;
use portcullis::policy::path::normalize;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A pattern and a path, split on the first newline: matching must not panic either.
    let (pattern, path) = text.split_once('\n').unwrap_or(("/*", text));
    let Ok(normal) = normalize(path) else {
        return;
    };
    let s = normal.as_str();
    assert_eq!(
        normalize(s).as_ref(),
        Ok(&normal),
        "not a fixed point: {path:?}"
    );
    assert!(s.is_ascii() && s.starts_with('/'));
    assert!(!s.contains("//") && !s.contains(';') && !s.contains('\\'));
    assert!(s.split('/').all(|seg| seg != "." && seg != ".."));
    let lower = s.to_ascii_lowercase();
    for refused in ["%2f", "%5c", "%2e", "%00"] {
        assert!(!lower.contains(refused), "{refused} in {s:?} from {path:?}");
    }
    // No double encoding: `%25` is never followed by two hex digits.
    let b = s.as_bytes();
    assert!(
        !b.windows(5)
            .any(|w| &w[..3] == b"%25" && w[3].is_ascii_hexdigit() && w[4].is_ascii_hexdigit()),
        "double encoding in {s:?} from {path:?}"
    );
    if let Ok(p) = PathPattern::parse(pattern) {
        let _ = p.matches(&normal);
    }
});
