//! The import graph of the crates, read from their source: no file imports (directly or round a loop)
//! from a file that imports it back, and in `pipeline/src` no module imports from a layer above its own
//! (ARCHITECTURE.md draws the layers). A new cycle or an upward import fails here with the path of
//! files that makes it.
//!
//! An edge is any path to a sibling file of the crate: `use` lines (brace groups expanded) and paths in
//! code (`crate::…`, `super::…`, `self::…`, or a child module's name), resolved to the file that
//! defines the longest prefix of it. Test modules (`#[cfg(test)] mod …`, at the end of a file) are left
//! out: a test may use anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers of `pipeline/src`, bottom first: a module may import from its own layer and those
/// below, never from one above. Within a layer, imports between modules are allowed as long as they
/// make no cycle (train uses precompute and evaluate; both are jobs).
const PIPELINE_LAYERS: &[&[&str]] = &[
    &["config"],
    &["runtime"],
    &["formats"],
    &[
        "cache_cmd",
        "config_cmd",
        "demo_data",
        "encoders",
        "evaluate",
        "flow",
        "precompute",
    ],
    &["train"],
    &["bench"],
    &[""],
];

/// One source file: its module path from the crate root and what it refers to.
struct File {
    module: Vec<String>,
    children: BTreeSet<String>,
    paths: Vec<Vec<String>>,
    /// `pub use a::b::Item;` → ("Item", its path as written): a path through this file to `Item`
    /// leads on to the file that defines it.
    reexports: BTreeMap<String, Vec<String>>,
}

fn crate_root(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `train/data.rs` → [train, data]; `config/mod.rs` → [config]; `main.rs` / `lib.rs` → [].
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "main" | "lib") {
        parts.push(stem.to_string());
    }
    parts
}

/// The code without comments, string literals and trailing test modules.
fn code_only(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => text,
    };
    let b = text.as_bytes();
    let (mut out, mut i) = (String::with_capacity(b.len()), 0);
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let end = text[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
            i = end;
        } else if b[i] == b'r' && (b[i..].starts_with(b"r\"") || b[i..].starts_with(b"r#")) {
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close = format!("\"{}", "#".repeat(hashes));
            let start = i + 2 + hashes;
            i = text[start..]
                .find(&close)
                .map_or(b.len(), |e| start + e + close.len());
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Every path of a `use` tree: `a::{b, c::{d, e}}` → a::b, a::c::d, a::c::e.
fn expand_use(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let mut base = prefix.to_vec();
        base.extend(segments(&tree[..open]));
        let inner = &tree[open + 1..tree.rfind('}').unwrap()];
        let (mut depth, mut start) = (0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand_use(&inner[start..i], &base, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand_use(&inner[start..], &base, out);
    } else {
        let path = tree.split(" as ").next().unwrap();
        let mut full = prefix.to_vec();
        full.extend(segments(path));
        if !full.is_empty() {
            out.push(full);
        }
    }
}

fn segments(path: &str) -> Vec<String> {
    path.split("::")
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "*")
        .map(String::from)
        .collect()
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn parse(root: &Path, path: &Path) -> File {
    let code = code_only(&std::fs::read_to_string(path).unwrap());
    let mut children = BTreeSet::new();
    let mut paths = vec![];
    let mut reexports = BTreeMap::new();
    let mut rest = String::new();
    for stmt in code.split_inclusive(';') {
        let trimmed = stmt.trim_start();
        let public = trimmed.starts_with("pub");
        let body = trimmed
            .strip_prefix("pub(crate) ")
            .or_else(|| trimmed.strip_prefix("pub(super) "))
            .or_else(|| trimmed.strip_prefix("pub "))
            .unwrap_or(trimmed);
        // Attributes before an item: `#[…] mod x;`.
        let body = match body.rfind("]\n") {
            Some(i) if body.starts_with("#[") => body[i + 2..].trim_start(),
            _ => body,
        };
        let body = body
            .strip_prefix("pub(crate) ")
            .or_else(|| body.strip_prefix("pub "))
            .unwrap_or(body);
        if let Some(name) = body.strip_prefix("mod ").and_then(|m| m.strip_suffix(';')) {
            children.insert(name.trim().to_string());
        } else if let Some(tree) = body.strip_prefix("use ").and_then(|u| u.strip_suffix(';')) {
            let mut used = vec![];
            expand_use(tree, &[], &mut used);
            if public {
                for (p, alias) in used.iter().zip(use_names(tree)) {
                    reexports.insert(alias, p.clone());
                }
            }
            paths.extend(used);
        } else {
            rest.push_str(stmt);
        }
    }
    // Paths in code: identifier (:: identifier)+.
    let chars: Vec<char> = rest.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if is_ident(chars[i]) && (i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':')) {
            let mut segs = vec![];
            let mut j = i;
            loop {
                let start = j;
                while j < chars.len() && is_ident(chars[j]) {
                    j += 1;
                }
                segs.push(chars[start..j].iter().collect::<String>());
                if j + 2 < chars.len()
                    && chars[j] == ':'
                    && chars[j + 1] == ':'
                    && is_ident(chars[j + 2])
                {
                    j += 2;
                } else {
                    break;
                }
            }
            if segs.len() > 1 {
                paths.push(segs);
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    File {
        module: module_of(path.strip_prefix(root).unwrap()),
        children,
        paths,
        reexports,
    }
}

/// The names a `use` tree brings in, in the order `expand_use` lists its paths (`x as y` → y).
fn use_names(tree: &str) -> Vec<String> {
    let mut paths = vec![];
    expand_use(&tree.replace(" as ", "::"), &[], &mut paths);
    paths
        .into_iter()
        .map(|p| p.last().unwrap().clone())
        .collect()
}

/// A path as written in `file`, made absolute (from the crate root); None for other crates.
fn absolute(file: &File, path: &[String]) -> Option<Vec<String>> {
    let mut abs = file.module.clone();
    let mut segs = path;
    match segs[0].as_str() {
        "crate" => {
            abs.clear();
            segs = &segs[1..];
        }
        "self" => segs = &segs[1..],
        "super" => {
            while segs.first().is_some_and(|s| s == "super") {
                abs.pop();
                segs = &segs[1..];
            }
        }
        first if file.children.contains(first) => {}
        _ => return None,
    }
    abs.extend(segs.iter().cloned());
    Some(abs)
}

/// file → the files it refers to, for one crate.
fn graph(name: &str) -> BTreeMap<String, BTreeSet<String>> {
    let root = crate_root(name);
    let mut paths = vec![];
    rust_files(&root, &mut paths);
    let files: Vec<(String, File)> = paths
        .iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (rel, parse(&root, p))
        })
        .collect();
    let by_module: BTreeMap<Vec<String>, usize> = files
        .iter()
        .enumerate()
        .map(|(i, (_, f))| (f.module.clone(), i))
        .collect();
    let mut edges = BTreeMap::new();
    for (rel, f) in &files {
        let mut to = BTreeSet::new();
        for p in &f.paths {
            let Some(abs) = absolute(f, p) else { continue };
            if let Some(target) = resolve(&files, &by_module, abs) {
                if target != rel.as_str() {
                    to.insert(target.to_string());
                }
            }
        }
        edges.insert(rel.clone(), to);
    }
    edges
}

/// The file that defines what an absolute path names: the file of its longest module prefix, or, when
/// that file re-exports the next segment, the file the re-export leads to.
fn resolve<'a>(
    files: &'a [(String, File)],
    by_module: &BTreeMap<Vec<String>, usize>,
    mut abs: Vec<String>,
) -> Option<&'a str> {
    for _ in 0..8 {
        let mut prefix = abs.clone();
        let index = loop {
            if let Some(&i) = by_module.get(&prefix) {
                break i;
            }
            prefix.pop()?;
        };
        let (rel, file) = &files[index];
        let item = abs.get(prefix.len());
        match item.and_then(|item| file.reexports.get(item)) {
            Some(path) => {
                let Some(mut next) = absolute(file, path) else {
                    return Some(rel);
                };
                next.extend(abs[prefix.len() + 1..].iter().cloned());
                abs = next;
            }
            None => return Some(rel),
        }
    }
    None
}

/// A cycle of files, if there is one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let at = stack.iter().position(|s| s == next).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if !state.contains_key(node.as_str()) {
            if let Some(c) = visit(node, edges, &mut state, &mut vec![]) {
                return Some(c);
            }
        }
    }
    None
}

fn top_module(file: &str) -> String {
    let top = file.split('/').next().unwrap();
    match top.strip_suffix(".rs") {
        Some("main") => String::new(),
        Some(stem) => stem.to_string(),
        None => top.to_string(),
    }
}

fn layer_of(top: &str) -> usize {
    PIPELINE_LAYERS
        .iter()
        .position(|l| l.contains(&top))
        .unwrap_or_else(|| {
            panic!("pipeline/src/{top}: a top-level module in no layer; add it to PIPELINE_LAYERS and ARCHITECTURE.md")
        })
}

#[test]
fn no_file_imports_round_a_cycle() {
    for name in ["pipeline", "model", "stages", "ext"] {
        let edges = graph(name);
        assert!(
            edges.values().map(BTreeSet::len).sum::<usize>() > 0 || name == "ext",
            "{name}: no import edge read at all; the parser is broken"
        );
        if let Some(cycle) = find_cycle(&edges) {
            panic!("{name}/src: import cycle {}", cycle.join(" → "));
        }
    }
}

#[test]
fn no_pipeline_module_imports_from_a_layer_above() {
    let edges = graph("pipeline");
    let mut up = vec![];
    for (from, tos) in &edges {
        let lf = layer_of(&top_module(from));
        for to in tos {
            let lt = layer_of(&top_module(to));
            if lt > lf {
                up.push(format!("{from} (layer {lf}) → {to} (layer {lt})"));
            }
        }
    }
    assert!(up.is_empty(), "imports that point up:\n{}", up.join("\n"));
}

#[test]
fn the_reader_sees_the_edges_it_must() {
    // Guards the parser: known edges of each kind (use group, super path, inline crate path, child
    // module path) are found.
    let edges = graph("pipeline");
    for (from, to) in [
        ("train/trainer.rs", "train/data.rs"),
        ("train/trainer.rs", "runtime/launch.rs"),
        ("train/mod.rs", "train/trainer.rs"),
        ("main.rs", "evaluate/sample.rs"),
        ("evaluate/sample.rs", "evaluate/fid.rs"),
        ("config/mod.rs", "config/train.rs"),
    ] {
        assert!(
            edges[from].contains(to),
            "{from} → {to} not read; {from} reads as → {:?}",
            edges[from]
        );
    }
}
