//! The import graph of `src/` flows one way (docs/architecture.md): the application (cli,
//! gateway with its reload) → the listeners (proxy, dns, admin) and selftest → the services
//! (policy, limits, killswitch, telemetry, nft, config) → the leaves (hash, sys,
//! shutdown). Read from the `crate::` paths of every source file, test modules left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module's layer; a module may import only from its own layer (without a
/// cycle) or below.
const LAYERS: &[(&str, u8)] = &[
    ("cli", 4),
    ("gateway", 4),
    ("proxy", 3),
    ("dns", 3),
    ("admin", 3),
    ("selftest", 3),
    ("cluster", 3),
    ("policy", 1),
    ("limits", 2),
    ("killswitch", 2),
    ("telemetry", 2),
    ("nft", 2),
    ("config", 2),
    ("hash", 0),
    ("sys", 0),
    ("shutdown", 0),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without its test code: a `tests.rs` file is all test code; elsewhere the
/// `#[cfg(test)]` module at the end of a file is cut off.
fn non_test_source(path: &Path) -> String {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match text.find("\n#[cfg(test)]") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// The top-level modules `source` names through `crate::`.
fn imports(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = source;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

/// Top-level module → the top-level modules it imports (itself left out).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap_or(&file);
        let first = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        let Some(first) = first else { continue };
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let entry = graph.entry(module.clone()).or_default();
        for m in imports(&non_test_source(&file)) {
            if m != module && layer(&m).is_some() {
                entry.insert(m);
            }
        }
    }
    graph
}

#[test]
fn every_module_has_a_layer() {
    for module in graph().keys() {
        assert!(
            layer(module).is_some(),
            "src/{module}: give it a layer in LAYERS and in docs/architecture.md"
        );
    }
}

#[test]
fn imports_flow_down_the_layers() {
    let mut wrong = Vec::new();
    for (module, deps) in graph() {
        let Some(own) = layer(&module) else { continue };
        for dep in deps {
            let Some(theirs) = layer(&dep) else { continue };
            if theirs > own {
                wrong.push(format!(
                    "{module} (layer {own}) imports {dep} (layer {theirs})"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn nothing_below_the_application_imports_it() {
    for (module, deps) in graph() {
        if layer(&module) == Some(4) {
            continue;
        }
        for app in ["gateway", "cli"] {
            assert!(!deps.contains(app), "{module} imports {app}");
        }
        if module != "admin" {
            assert!(!deps.contains("admin"), "{module} imports admin");
        }
    }
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = graph();
    // Depth-first search with colours: a grey node met again closes a cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match colour.get(node) {
            Some(1) => {
                let start = path.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            Some(2) => return None,
            _ => {}
        }
        colour.insert(node.to_owned(), 1);
        path.push(node.to_owned());
        for dep in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(dep, graph, colour, path) {
                return Some(cycle);
            }
        }
        path.pop();
        colour.insert(node.to_owned(), 2);
        None
    }
    let mut colour = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut colour, &mut Vec::new()) {
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
}

/// The checker itself: it sees `crate::` paths and skips test modules.
#[test]
fn the_reader_finds_imports_and_skips_tests() {
    let found = imports("use crate::policy::Policy;\nfn f() { crate::sys::x(); }\n");
    assert_eq!(
        found,
        BTreeSet::from(["policy".to_owned(), "sys".to_owned()])
    );
    let dir = std::env::temp_dir().join(format!("layering-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join("m.rs");
    std::fs::write(
        &file,
        "use crate::hash::X;\n#[cfg(test)]\nmod tests { use crate::gateway::Y; }\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        imports(&non_test_source(&file)),
        BTreeSet::from(["hash".to_owned()])
    );
    let _ = std::fs::remove_dir_all(&dir);
}
