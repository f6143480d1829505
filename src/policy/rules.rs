//! The rules directory as the user writes it: raw serde structs, one per file kind.
//!
//! Owns reading `rules/agents/*.toml` and `rules/lists/*.toml` and turning TOML errors into
//! [`SourceError`]s that name the file, the line and the key. Must not interpret patterns:
//! that is `compile`'s job, so that nothing past it ever re-checks.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// An error located in a source file, as `check` prints it: `file:line: key: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    pub file: PathBuf,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if !self.key.is_empty() {
            write!(f, "key `{}`: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for SourceError {}

/// A source file's text, kept so that spans can be turned into line numbers.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

impl SourceFile {
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        1 + self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    pub fn error_at(&self, offset: usize, key: &str, message: impl Into<String>) -> SourceError {
        SourceError {
            file: self.path.clone(),
            line: self.line_of(offset),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    /// Deserialize the whole file, mapping TOML errors to file/line/key.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, SourceError> {
        toml::from_str(&self.text).map_err(|e| self.toml_error(&e))
    }

    fn toml_error(&self, e: &toml::de::Error) -> SourceError {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        let line = self.line_of(offset);
        let message = e.message().to_owned();
        // serde names unknown keys in the message; otherwise the key is the text before `=`
        // on the offending line.
        let key = backticked_after(&message, "unknown field ")
            .or_else(|| backticked_after(&message, "missing field "))
            .unwrap_or_else(|| {
                self.text
                    .lines()
                    .nth(line.saturating_sub(1))
                    .and_then(|l| l.split_once('='))
                    .map(|(k, _)| k.trim().to_owned())
                    .unwrap_or_default()
            });
        SourceError {
            file: self.path.clone(),
            line,
            key,
            message,
        }
    }
}

fn backticked_after(message: &str, marker: &str) -> Option<String> {
    let rest = message.split_once(marker)?.1.strip_prefix('`')?;
    Some(rest.split_once('`')?.0.to_owned())
}

/// `rules/agents/<name>.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub name: Spanned<String>,
    #[serde(default)]
    pub sources: Vec<Spanned<RawSource>>,
    #[serde(default)]
    pub include: Vec<Spanned<String>>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
    /// Raw IP destinations (`CONNECT 10.1.2.3:443`, `Host: 10.1.2.3`); names may resolve
    /// into them too.
    #[serde(default)]
    pub allow_cidrs: Vec<Spanned<String>>,
    /// Special ranges that allowed *names* may resolve into; IP literals in them stay denied.
    #[serde(default)]
    pub resolve_cidrs: Vec<Spanned<String>>,
    /// Deny TLS hellos that carry the ECH extension (docs/threat-model.md, "ECH").
    #[serde(default)]
    pub deny_ech: bool,
    /// Allow TLS without SNI inside CONNECT tunnels (default deny; docs/threat-model.md,
    /// "SNI ≠ CONNECT host").
    #[serde(default)]
    pub allow_missing_sni: bool,
    pub limits: Option<RawLimits>,
    pub credentials: Option<Spanned<RawCredentials>>,
}

/// One entry of an agent's `sources`: `"10.66.0.11/32"`, or a table binding the network to
/// where its packets may come from: `{ net = "10.66.0.11/32", interface = "vlan66", mac =
/// "02:00:00:00:00:11" }` (`interface` and `mac` each optional).
#[derive(Debug)]
pub enum RawSource {
    Net(String),
    Bound(RawBoundSource),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBoundSource {
    pub net: Spanned<String>,
    pub interface: Option<Spanned<String>>,
    pub mac: Option<Spanned<String>>,
}

impl<'de> Deserialize<'de> for RawSource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawSource;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address or CIDR, or a table { net, interface, mac }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawSource, E> {
                Ok(RawSource::Net(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawSource, A::Error> {
                RawBoundSource::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawSource::Bound)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub new_connections_per_second: Option<Spanned<u32>>,
    pub burst: Option<Spanned<u32>>,
    pub max_concurrent: Option<Spanned<u32>>,
    pub bandwidth: Option<Spanned<String>>,
    pub daily_bytes: Option<Spanned<String>>,
}

/// Proxy-Authorization credentials: the password is never stored, only a hash of it:
/// `password_hash` (argon2id PHC string) or, from earlier rules files, `password_sha256`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredentials {
    pub username: Spanned<String>,
    pub password_hash: Option<Spanned<String>>,
    pub password_sha256: Option<Spanned<String>>,
}

/// `rules/lists/<name>.toml`, included by agents by file stem.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawList {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
}

/// Every rules file, read but not yet compiled.
#[derive(Debug, Default)]
pub struct RulesSources {
    pub agents: Vec<SourceFile>,
    pub lists: Vec<SourceFile>,
}

/// Read `dir/agents/*.toml` and `dir/lists/*.toml`, sorted by name. Hidden files and editor
/// leftovers (anything not ending in `.toml`) are skipped.
pub fn read_dir(dir: &Path) -> Result<RulesSources, SourceError> {
    let io_err = |path: &Path, e: std::io::Error| SourceError {
        file: path.to_path_buf(),
        line: 0,
        key: String::new(),
        message: e.to_string(),
    };
    if !dir.is_dir() {
        return Err(io_err(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "rules directory not found"),
        ));
    }
    let mut out = RulesSources::default();
    for (sub, target) in [("agents", &mut out.agents), ("lists", &mut out.lists)] {
        let path = dir.join(sub);
        if !path.exists() {
            continue;
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&path).map_err(|e| io_err(&path, e))? {
            let entry = entry.map_err(|e| io_err(&path, e))?;
            let p = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || !name.ends_with(".toml") {
                continue;
            }
            files.push(p);
        }
        files.sort();
        for p in files {
            let text = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
            target.push(SourceFile { path: p, text });
        }
    }
    Ok(out)
}
