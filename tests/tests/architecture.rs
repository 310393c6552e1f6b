//! The shape of the source tree that ARCHITECTURE.md promises, checked by
//! reading the sources (no PostgreSQL needed):
//! - no import circles between the modules of a crate;
//! - the crates depend on each other only downwards (proto <- repo and
//!   proto <- pg, both under the two binaries; neither binary on the other);
//! - ARCHITECTURE.md's code map names every source file.
//!
//! Modules are files. A reference `crate::a::b::Item` or `super::x::Item` is
//! an edge to the longest module path it names. References from a module to
//! one of its ancestors are not edges: a `mod.rs` or `lib.rs` is a namespace
//! that re-exports its children, so "child uses parent" means "child uses a
//! sibling" and is resolved no further.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

const CRATES: [&str; 5] = ["proto", "repo", "pg", "agent", "restore-tool"];

/// Every `.rs` file under `dir`, sorted.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read source dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// `src/a/b.rs` and `src/a/b/mod.rs` -> ["a", "b"]; `src/lib.rs`, `src/main.rs` -> [].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().expect("file name");
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "lib" | "main" | "mod") {
        parts.push(stem.to_string());
    }
    parts
}

/// The source without comments and string literals, so that a path in a
/// doc comment or a message is not taken for a reference.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if text[i..].starts_with("//") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if text[i..].starts_with("/*") {
            i = text[i..].find("*/").map_or(bytes.len(), |end| i + end + 2);
        } else if bytes[i] == b'"' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            let c = text[i..].chars().next().expect("char");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Paths written after `crate::` or `super::` (as module segments), with
/// `use` groups expanded one level: `use crate::a::{b, c::D}` gives a::b and a::c::D.
fn references(code: &str, here: &[String], is_mod_file: bool) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let tokens: Vec<char> = code.chars().collect();
    let word_at = |from: usize| -> (String, usize) {
        let mut end = from;
        while end < tokens.len() && (tokens[end].is_alphanumeric() || tokens[end] == '_') {
            end += 1;
        }
        (tokens[from..end].iter().collect(), end)
    };
    let mut i = 0;
    while i < tokens.len() {
        let starts_word = i == 0 || !(tokens[i - 1].is_alphanumeric() || tokens[i - 1] == '_' || tokens[i - 1] == ':');
        if !starts_word {
            i += 1;
            continue;
        }
        let (word, end) = word_at(i);
        if word != "crate" && word != "super" {
            i = end.max(i + 1);
            continue;
        }
        // Resolve the start: crate root, or the parent of this module (a
        // mod.rs file is its own directory's module, so super is one up).
        let mut base: Vec<String> = if word == "crate" { Vec::new() } else { here.to_vec() };
        let mut j = end;
        if word == "super" {
            base.pop();
            let _ = is_mod_file;
        }
        let mut path = base;
        loop {
            if tokens.get(j) == Some(&':') && tokens.get(j + 1) == Some(&':') {
                j += 2;
            } else {
                break;
            }
            if tokens.get(j) == Some(&'{') {
                // A group: each member's first segment.
                let close = (j..tokens.len()).find(|&k| tokens[k] == '}').unwrap_or(tokens.len());
                let inner: String = tokens[j + 1..close].iter().collect();
                for member in inner.split(',') {
                    let mut full = path.clone();
                    full.extend(
                        member
                            .trim()
                            .split("::")
                            .map(str::trim)
                            .filter(|s| !s.is_empty() && *s != "self")
                            .map(|s| s.split_whitespace().next().unwrap_or("").to_string()),
                    );
                    out.push(full);
                }
                path.clear();
                j = close;
                break;
            }
            let (segment, next) = word_at(j);
            if segment.is_empty() {
                break;
            }
            if segment == "super" {
                path.pop();
            } else {
                path.push(segment);
            }
            j = next;
        }
        if !path.is_empty() {
            out.push(path);
        }
        i = j.max(i + 1);
    }
    out
}

struct CrateGraph {
    modules: BTreeSet<Vec<String>>,
    edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
}

fn crate_graph(krate: &str) -> CrateGraph {
    let src = workspace().join(krate).join("src");
    let files = sources(&src);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_path(&src, f)).collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for file in &files {
        // Binaries' main.rs is only an entry point; bin/ targets are leaves.
        let here = module_path(&src, file);
        let is_mod = file.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let code = code_only(&std::fs::read_to_string(file).expect("read source"));
        for reference in references(&code, &here, is_mod) {
            // The longest module the reference names.
            let target = (0..=reference.len())
                .rev()
                .map(|n| reference[..n].to_vec())
                .find(|prefix| modules.contains(prefix))
                .unwrap_or_default();
            let is_ancestor = here.starts_with(&target);
            if target != here && !is_ancestor {
                edges.entry(here.clone()).or_default().insert(target);
            }
        }
    }
    CrateGraph { modules, edges }
}

/// Strongly connected components with more than one module (Tarjan).
fn circles(graph: &CrateGraph) -> Vec<Vec<Vec<String>>> {
    struct State<'a> {
        graph: &'a CrateGraph,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on_stack: BTreeSet<&'a Vec<String>>,
        next: usize,
        found: Vec<Vec<Vec<String>>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Vec<String>) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.edges.get(v).into_iter().flatten() {
            let Some(w) = graph.modules.get(w) else { continue };
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in &graph.modules {
        if !state.index.contains_key(v) {
            visit(&mut state, v);
        }
    }
    state.found
}

#[test]
fn no_import_circles() {
    let mut report = Vec::new();
    for krate in CRATES {
        for circle in circles(&crate_graph(krate)) {
            let names: Vec<String> = circle.iter().map(|m| format!("{krate}::{}", m.join("::"))).collect();
            report.push(names.join(" <-> "));
        }
    }
    assert!(
        report.is_empty(),
        "import circles (move the shared helper to where both can use it):\n{}",
        report.join("\n")
    );
}

#[test]
fn the_circle_finder_finds_circles() {
    // The checker itself: a two-module circle and a three-module one.
    let module = |s: &str| s.split("::").map(str::to_string).collect::<Vec<_>>();
    let mut graph = CrateGraph { modules: BTreeSet::new(), edges: BTreeMap::new() };
    for (from, to) in [("a", "b"), ("b", "a"), ("w::x", "w::y"), ("w::y", "w::z"), ("w::z", "w::x"), ("c", "a")] {
        graph.modules.insert(module(from));
        graph.modules.insert(module(to));
        graph.edges.entry(module(from)).or_default().insert(module(to));
    }
    let found = circles(&graph);
    assert_eq!(found.len(), 2, "{found:?}");
    let code = code_only("use crate::a::{b, c::D};\n// crate::zz::y\nlet x = super::sib::f(\"crate::q\");");
    let refs = references(&code, &module("w::x"), false);
    assert_eq!(refs, vec![module("a::b"), module("a::c::D"), module("w::sib::f")]);
}

/// What each crate's manifest says it depends on, among ours.
fn internal_dependencies(krate: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(workspace().join(krate).join("Cargo.toml")).expect("Cargo.toml");
    let mut out = BTreeSet::new();
    let mut in_dependencies = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_dependencies = line == "[dependencies]";
            continue;
        }
        if in_dependencies {
            if let Some(name) = line.split(['.', '=', ' ']).next().filter(|n| n.starts_with("tidemark-")) {
                out.insert(name.to_string());
            }
        }
    }
    out
}

#[test]
fn crates_depend_only_downwards() {
    let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(internal_dependencies("proto"), set(&[]));
    assert_eq!(internal_dependencies("repo"), set(&["tidemark-proto"]));
    assert_eq!(internal_dependencies("pg"), set(&["tidemark-proto"]));
    assert_eq!(internal_dependencies("agent"), set(&["tidemark-proto", "tidemark-repo", "tidemark-pg"]));
    assert_eq!(internal_dependencies("restore-tool"), set(&["tidemark-proto", "tidemark-repo", "tidemark-pg"]));
}

#[test]
fn the_code_map_names_every_source_file() {
    let map = std::fs::read_to_string(workspace().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut missing = Vec::new();
    for krate in CRATES.iter().chain(["tests", "fuzz"].iter()) {
        let root = workspace().join(krate);
        for file in sources(&root) {
            if file.components().any(|c| c.as_os_str() == "target") {
                continue;
            }
            let relative = file.strip_prefix(&root).expect("under crate");
            let name = relative.file_name().expect("name").to_string_lossy();
            // lib.rs, main.rs and mod.rs are named by their crate or directory.
            if matches!(name.as_ref(), "lib.rs" | "main.rs" | "mod.rs") {
                continue;
            }
            let shown = relative.to_string_lossy().trim_start_matches("src/").to_string();
            if !map.contains(&format!("`{shown}`")) {
                missing.push(format!("{krate}/{}", relative.display()));
            }
        }
    }
    assert!(missing.is_empty(), "ARCHITECTURE.md's code map does not name:\n{}", missing.join("\n"));
}
