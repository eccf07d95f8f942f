//! The configuration reference (docs/configuration.md) against the binary: its tables name exactly the
//! keys `pipeline config` accepts, each once, with the defaults the code has.
//!
//! The accepted keys come from the binary itself, not from a list kept here: every section is parsed
//! with `deny_unknown_fields`, so `--set SECTION.<unknown>=1` fails with serde's "unknown field …,
//! expected one of `a`, `b`, …", which names every field the section has, `Option` fields that the
//! printed TOML leaves out while unset included. The keys `pipeline config` prints for the default and
//! every preset must be among them, so a change in that message cannot pass silently.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const REFERENCE: &str = "docs/configuration.md";

/// The names serde lists after "expected" in the error of `pipeline config --set KEY=1`.
fn expected_fields(key: &str) -> Vec<String> {
    let o = pipeline()
        .args(["config", "--set", &format!("{key}=1")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "--set {key}=1 was accepted");
    let line = stderr
        .lines()
        .find(|l| l.contains("unknown field"))
        .unwrap_or_else(|| panic!("--set {key}=1: no `unknown field` error:\n{stderr}"));
    let (_, listed) = line
        .split_once("expected")
        .unwrap_or_else(|| panic!("--set {key}=1: no list of fields:\n{stderr}"));
    listed
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Every `section.key` the configuration accepts, as the binary's own errors list them.
fn accepted_keys() -> BTreeSet<String> {
    let sections = expected_fields("zz_no_such_section.zz");
    assert!(sections.len() >= 5, "sections: {sections:?}");
    let mut keys = BTreeSet::new();
    for section in sections {
        let fields = expected_fields(&format!("{section}.zz_no_such_key"));
        assert!(!fields.is_empty(), "[{section}] lists no fields");
        keys.extend(fields.into_iter().map(|f| format!("{section}.{f}")));
    }
    keys
}

/// The effective configuration `pipeline config` prints, as `section.key` → value.
fn printed(config: Option<&Path>) -> BTreeMap<String, toml::Value> {
    let mut cmd = pipeline();
    cmd.arg("config");
    if let Some(path) = config {
        cmd.arg("--config").arg(path);
    }
    let o = run_ok(&mut cmd);
    let table: toml::Table = toml::from_str(&String::from_utf8_lossy(&o.stdout)).unwrap();
    let mut out = BTreeMap::new();
    for (section, value) in table {
        let fields = value
            .as_table()
            .unwrap_or_else(|| panic!("`{section}` is not a section"));
        for (key, value) in fields {
            out.insert(format!("{section}.{key}"), value.clone());
        }
    }
    out
}

/// One documented key: where it is and the default its table gives (`None` for "unset").
struct Documented {
    line: usize,
    default: Option<String>,
}

/// The rows of the reference's `| key | default | meaning |` tables. A row may document several keys
/// (`train.lr` / `train.min_lr`) with as many defaults, or one default for all of them.
fn documented(text: &str) -> (BTreeMap<String, Documented>, Vec<String>) {
    let (mut keys, mut problems) = (BTreeMap::new(), vec![]);
    let mut in_table = false;
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        if line.starts_with("| key | default |") {
            in_table = true;
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        if !in_table || line.starts_with("|---") {
            continue;
        }
        let cells: Vec<&str> = line.split(" | ").collect();
        if cells.len() < 3 {
            problems.push(format!(
                "{REFERENCE}:{line_no}: not a key | default | meaning row"
            ));
            continue;
        }
        let names: Vec<&str> = cells[0].trim_start_matches('|').split(" / ").collect();
        let defaults: Vec<&str> = cells[1].split(" / ").collect();
        let defaults = match (names.len(), defaults.len()) {
            (n, d) if n == d => defaults,
            (_, 1) => vec![defaults[0]; names.len()],
            (1, _) => vec![cells[1]],
            _ => {
                problems.push(format!(
                    "{REFERENCE}:{line_no}: {} keys but {} defaults",
                    names.len(),
                    defaults.len()
                ));
                continue;
            }
        };
        for (name, default) in names.iter().zip(defaults) {
            let name = name.trim().trim_matches('`').to_string();
            if !name.contains('.') {
                problems.push(format!(
                    "{REFERENCE}:{line_no}: `{name}` is not SECTION.KEY"
                ));
            }
            let default = default.trim();
            let default = (default != "unset").then(|| default.trim_matches('`').to_string());
            let row = Documented {
                line: line_no,
                default,
            };
            if let Some(earlier) = keys.insert(name.clone(), row) {
                problems.push(format!(
                    "{REFERENCE}:{line_no}: `{name}` is documented again (first on line {})",
                    earlier.line
                ));
            }
        }
    }
    (keys, problems)
}

/// TOML values equal, numbers compared as numbers (`-1` documents `-1.0`).
fn same_value(a: &toml::Value, b: &toml::Value) -> bool {
    use toml::Value::*;
    let number = |v: &toml::Value| match v {
        Integer(i) => Some(*i as f64),
        Float(f) => Some(*f),
        _ => None,
    };
    match (a, b) {
        (Array(x), Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        _ => match (number(a), number(b)) {
            (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
            _ => a == b,
        },
    }
}

#[test]
fn the_configuration_reference_documents_exactly_the_accepted_keys_with_their_defaults() {
    let accepted = accepted_keys();

    // The printed configurations name only accepted keys: the error parsing above is sound.
    let mut configs = vec![None];
    let mut presets: Vec<_> = std::fs::read_dir(repo_root().join("configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    presets.sort();
    assert!(!presets.is_empty());
    configs.extend(presets.into_iter().map(Some));
    for config in &configs {
        for key in printed(config.as_deref()).keys() {
            assert!(
                accepted.contains(key),
                "`pipeline config` prints `{key}` ({config:?}), which the error listing does not name: {accepted:?}"
            );
        }
    }

    let text = std::fs::read_to_string(repo_root().join(REFERENCE)).unwrap();
    let (documented, mut problems) = documented(&text);
    for key in &accepted {
        if !documented.contains_key(key) {
            problems.push(format!(
                "`{key}` is accepted by `pipeline config` but missing from {REFERENCE}"
            ));
        }
    }
    for (key, row) in &documented {
        if !accepted.contains(key) {
            problems.push(format!(
                "{REFERENCE}:{}: `{key}` is documented but `pipeline config` does not accept it",
                row.line
            ));
        }
    }

    // The defaults column against the configuration of an empty file (every key at its default).
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let defaults = printed(Some(&empty));
    for (key, row) in documented.iter().filter(|(k, _)| accepted.contains(*k)) {
        let actual = defaults.get(key);
        match (&row.default, actual) {
            (None, None) => {}
            (None, Some(v)) => problems.push(format!(
                "{REFERENCE}:{}: `{key}` is documented as unset but defaults to {v}",
                row.line
            )),
            (Some(doc), actual) => match toml::from_str::<toml::Table>(&format!("v = {doc}")) {
                Err(_) => problems.push(format!(
                    "{REFERENCE}:{}: `{key}`'s default `{doc}` is not a TOML value",
                    row.line
                )),
                Ok(t) => {
                    let doc_value = &t["v"];
                    if !actual.is_some_and(|a| same_value(a, doc_value)) {
                        problems.push(format!(
                                "{REFERENCE}:{}: `{key}` is documented with default {doc} but defaults to {}",
                                row.line,
                                actual.map_or("nothing (unset)".to_string(), |v| v.to_string())
                            ));
                    }
                }
            },
        }
    }
    eprintln!(
        "{} keys accepted, {} documented",
        accepted.len(),
        documented.len()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
