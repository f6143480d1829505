//! libFuzzer target for the rules compiler: arbitrary bytes as an agent file and as a list
//! file must compile or fail with located errors, never panic.
#![no_main]

use std::path::PathBuf;

use portcullis::policy::compile;
use portcullis::policy::rules::{RulesSources, SourceFile};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let sources = RulesSources {
        agents: vec![SourceFile {
            path: PathBuf::from("rules/agents/fuzz.toml"),
            text: text.clone(),
        }],
        lists: vec![SourceFile {
            path: PathBuf::from("rules/lists/fuzz.toml"),
            text,
        }],
    };
    if let Err(errors) = compile(&sources, &[80, 443], 1) {
        assert!(!errors.0.is_empty());
    }
});
