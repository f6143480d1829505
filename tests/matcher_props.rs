//! Property tests: the label-keyed matcher agrees with a naive reference implementation of
//! docs/configuration.md's pattern semantics on random names and patterns (dots, case, trailing dots, unicode).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use portcullis::policy::{DomainName, DomainPattern, DomainSet, Rule};
use proptest::prelude::*;

const LABELS: &[&str] = &[
    "a",
    "b",
    "wild",
    "test",
    "xn--bcher-kva",
    "bücher",
    "B",
    "WILD",
    "Test",
    "ex-1",
    "Ünï",
];

fn name_strategy(max_labels: usize) -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop::sample::select(LABELS), 1..=max_labels),
        any::<bool>(),
    )
        .prop_map(|(labels, dot)| labels.join(".") + if dot { "." } else { "" })
}

#[derive(Debug, Clone, Copy)]
enum RefScope {
    Exact,
    Sub,
    Apex,
}

#[derive(Debug, Clone)]
struct RefPattern {
    text: String,
    scope: RefScope,
    base: String,
    port: Option<u16>,
}

fn pattern_strategy() -> impl Strategy<Value = RefPattern> {
    (
        prop::sample::select(vec![RefScope::Exact, RefScope::Sub, RefScope::Apex]),
        name_strategy(3),
        prop::option::of(prop::sample::select(vec![80u16, 8443])),
    )
        .prop_map(|(scope, base, port)| {
            let prefix = match scope {
                RefScope::Exact => "",
                RefScope::Sub => "*.",
                RefScope::Apex => ".",
            };
            let base = base.trim_end_matches('.').to_owned();
            let text = match port {
                Some(p) => format!("{prefix}{base}:{p}"),
                None => format!("{prefix}{base}"),
            };
            RefPattern {
                text,
                scope,
                base,
                port,
            }
        })
}

/// The reference: normalise, split into labels, compare label lists.
fn labels(name: &str) -> Vec<String> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    idna::domain_to_ascii(trimmed)
        .unwrap()
        .to_ascii_lowercase()
        .split('.')
        .map(str::to_owned)
        .collect()
}

fn reference_match(p: &RefPattern, name: &str, port: u16) -> bool {
    let port_ok = match p.port {
        Some(pp) => pp == port,
        None => port == 80 || port == 443,
    };
    let n = labels(name);
    let b = labels(&p.base);
    let under = n.len() > b.len() && n.ends_with(&b);
    let same = n == b;
    port_ok
        && match p.scope {
            RefScope::Exact => same,
            RefScope::Sub => under,
            RefScope::Apex => same || under,
        }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn matcher_agrees_with_reference(
        patterns in prop::collection::vec(pattern_strategy(), 1..5),
        name in name_strategy(5),
        port in prop::sample::select(vec![80u16, 443, 8443]),
    ) {
        let mut set = DomainSet::default();
        let mut valid = Vec::new();
        for p in &patterns {
            match DomainPattern::parse(&p.text) {
                Ok(parsed) => {
                    set.insert(&parsed, Rule { name: Arc::from(p.text.as_str()) });
                    valid.push(p.clone());
                }
                // Only wildcards over a public suffix (here: single-label bases) are refused.
                Err(_) => prop_assert!(
                    !matches!(p.scope, RefScope::Exact) && labels(&p.base).len() == 1,
                    "valid pattern refused: {}", p.text
                ),
            }
        }
        let observed = DomainName::parse(&name).unwrap();
        let got = set.find(&observed, port, |p| p == 80 || p == 443);
        let expected = valid.iter().any(|p| reference_match(p, &name, port));
        prop_assert_eq!(got.is_some(), expected, "name {} port {} patterns {:?}", name, port, valid);
        if let Some(rule) = got {
            let p = valid.iter().find(|p| *p.text == *rule.name).unwrap();
            prop_assert!(reference_match(p, &name, port), "reported rule {} does not match", rule.name);
        }
    }

    #[test]
    fn normalisation_is_idempotent(name in name_strategy(5)) {
        let once = DomainName::parse(&name).unwrap();
        let twice = DomainName::parse(once.as_str()).unwrap();
        prop_assert_eq!(once, twice);
    }
}
