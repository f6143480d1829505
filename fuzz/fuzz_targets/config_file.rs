//! libFuzzer target for `portcullis.toml` parsing: never panics, errors name a line.
#![no_main]

use std::path::PathBuf;

use portcullis::config::Config;
use portcullis::policy::rules::SourceFile;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let file = SourceFile {
        path: PathBuf::from("/etc/portcullis/portcullis.toml"),
        text: String::from_utf8_lossy(data).into_owned(),
    };
    let _ = Config::from_source(&file);
});
