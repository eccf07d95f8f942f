//! Shard specs: what a user writes after `--shards` or in `data.shards`, expanded into an ordered list
//! of shards, as webdataset's `expand_urls` does: `::` joins several sources, `${NAME}` takes the
//! environment variable `WDS_NAME`, then braces expand with the semantics of the `braceexpand` package.
//! A shard is a local path or one of webdataset's URL forms, `pipe:CMD` and `http(s)://…`
//! ([`crate::remote`]); braces expand in all of them alike.
//! Two additions webdataset lacks, for local paths only: shell-style globs (`*`, `?`, `[...]`,
//! expanded in sorted order) and `@list.txt`, a file with one path, URL or pattern per line. Globs are
//! never applied to URLs (a presigned URL's `?` is no wildcard) or commands.

use std::path::{Path, PathBuf};

use crate::remote::Kind;
use crate::{Error, Result};

/// Expands a full spec into shards, in spec order. Globs must match at least one file and an
/// `@list` must be readable, so a typo fails here rather than as an empty epoch.
pub fn expand_shard_spec(spec: &str) -> Result<Vec<String>> {
    let mut shards = Vec::new();
    for part in split_sources(spec)
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        if let Some(list_path) = part.strip_prefix('@') {
            let text = std::fs::read_to_string(list_path).map_err(|e| Error::io(list_path, e))?;
            let base = Path::new(list_path).parent().unwrap_or(Path::new(""));
            for line in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                shards.extend(expand_one(&list_entry(base, line))?);
            }
        } else {
            shards.extend(expand_one(part)?);
        }
    }
    if shards.is_empty() {
        return Err(Error::Invalid(format!(
            "shard spec `{spec}` names no shards"
        )));
    }
    Ok(shards)
}

/// Relative paths in a list are relative to the list file, so a list can travel with its shards;
/// URLs, commands and absolute paths stand as written.
fn list_entry(base: &Path, line: &str) -> String {
    if Kind::of(line).is_remote() || Path::new(line).is_absolute() || base.as_os_str().is_empty() {
        line.to_string()
    } else {
        base.join(line).to_string_lossy().into_owned()
    }
}

/// Splits on `::`, webdataset's source separator. A URL's `scheme://` has a single colon, so it never
/// splits; the one place `::` belongs to a URL is an IPv6 host (`http://[::1]:8080/x.tar`), so inside
/// the brackets of a URL it does not split either.
fn split_sources(spec: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut depth) = (0, 0usize);
    let bytes = spec.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let in_url = Kind::of(spec[start..].trim_start()) == Kind::Http;
        match bytes[i] {
            b'[' if in_url => depth += 1,
            b']' if in_url => depth = depth.saturating_sub(1),
            b':' if depth == 0 && bytes.get(i + 1) == Some(&b':') => {
                parts.push(&spec[start..i]);
                start = i + 2;
                i += 2;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&spec[start..]);
    parts
}

/// The name a shard goes by in caches, manifests and logs: a path's file name; a URL's last path
/// segment, without query or fragment; for `pipe:`, the file name in the last word of the command
/// that has one (`pipe:aws s3 cp s3://b/train-000001.tar -` → `train-000001.tar`). A spec with none
/// of these is named by a hash of itself.
pub fn shard_name(spec: &str) -> String {
    let name = match Kind::of(spec) {
        Kind::Local => Path::new(spec)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned()),
        Kind::Http => url_file_name(spec),
        Kind::Pipe => command_file_name(spec),
    };
    name.unwrap_or_else(|| format!("source-{}", &blake3::hash(spec.as_bytes()).to_hex()[..16]))
}

fn url_file_name(url: &str) -> Option<String> {
    let after_scheme = &url[url.find("://")? + 3..];
    let path = &after_scheme[after_scheme.find('/')?..];
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let last = path.rsplit('/').next()?;
    (!last.is_empty()).then(|| last.to_string())
}

fn command_file_name(spec: &str) -> Option<String> {
    spec.split_whitespace().rev().find_map(|word| {
        let word = word.trim_matches(|c| matches!(c, '\'' | '"' | ';' | '|' | '&' | '(' | ')'));
        if word.starts_with('-') {
            return None;
        }
        let word = word.split(['?', '#']).next().unwrap_or(word);
        let base = word.rsplit('/').next()?;
        let dot = base.find('.')?;
        (dot > 0 && dot + 1 < base.len()).then(|| base.to_string())
    })
}

fn expand_one(pattern: &str) -> Result<Vec<String>> {
    let substituted = substitute_env(pattern)?;
    let mut out = Vec::new();
    for path in brace_expand(&substituted)? {
        let path = check_scheme(path)?;
        if Kind::of(&path).is_remote() {
            out.push(path);
        } else if has_glob(&path) {
            let matches = glob_paths(&path)?;
            if matches.is_empty() {
                return Err(Error::Invalid(format!(
                    "shard glob `{path}` matches no file"
                )));
            }
            out.extend(matches);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

/// `file://PATH` is the local PATH; `pipe:` needs a command; another `scheme://` is an error that
/// says how to read it, rather than "no such file".
fn check_scheme(name: String) -> Result<String> {
    if let Some(path) = name.strip_prefix("file://") {
        return Ok(path.to_string());
    }
    match Kind::of(&name) {
        Kind::Pipe if name[crate::remote::PIPE_PREFIX.len()..].trim().is_empty() => Err(
            Error::Invalid(format!("shard `{name}`: pipe: without a command")),
        ),
        Kind::Local => match name.split_once("://") {
            Some((scheme, _))
                if !scheme.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
            {
                Err(Error::Invalid(format!(
                    "shard `{name}`: {scheme}:// is not read directly; use http(s):// or a pipe: \
                     command, e.g. `pipe:aws s3 cp s3://bucket/shard.tar -`"
                )))
            }
            _ => Ok(name),
        },
        _ => Ok(name),
    }
}

/// `${NAME}` → the value of `WDS_NAME` (webdataset's convention), an error when unset.
fn substitute_env(pattern: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| Error::Invalid(format!("unclosed ${{ in shard spec `{pattern}`")))?;
        let name = &after[..end];
        let var = format!("WDS_{name}");
        let value = std::env::var(&var).map_err(|_| {
            Error::Invalid(format!(
                "shard spec `{pattern}` uses ${{{name}}} but {var} is not set"
            ))
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Brace expansion as `braceexpand` 0.1.7 does it: comma lists (nested), integer ranges whose output
/// is zero-padded to the width of a bound written with a leading zero (`{1..010}` → `001`…`010`),
/// character ranges, optional steps and descending ranges; several groups give their cartesian
/// product, leftmost varying slowest. `\{` escapes a brace.
pub fn brace_expand(pattern: &str) -> Result<Vec<String>> {
    let chars: Vec<char> = pattern.chars().collect();
    let Some((open, close)) = find_group(&chars)? else {
        return Ok(vec![unescape(pattern)]);
    };
    let prefix: String = chars[..open].iter().collect();
    let body: String = chars[open + 1..close].iter().collect();
    let suffix: String = chars[close + 1..].iter().collect();
    let alternatives = match expand_range(&body) {
        Some(items) if items.is_empty() => return Err(too_many(pattern)),
        Some(items) => items,
        None => {
            let parts = split_top_level_commas(&body);
            if parts.len() < 2 {
                // `{x}` without a comma or range stays literal, as in braceexpand and bash.
                let literal = format!("{}{{{}}}", prefix, body);
                return brace_expand(&format!("{}{}", escape_braces(&literal), suffix));
            }
            let mut items = Vec::new();
            for part in parts {
                items.extend(brace_expand(&part)?);
                if items.len() > MAX_EXPANDED {
                    return Err(too_many(pattern));
                }
            }
            items
        }
    };
    let prefix = unescape(&prefix);
    let suffixes = brace_expand(&suffix)?;
    if alternatives.len().saturating_mul(suffixes.len()) > MAX_EXPANDED {
        return Err(too_many(pattern));
    }
    let mut out = Vec::with_capacity(alternatives.len() * suffixes.len());
    for alt in &alternatives {
        for s in &suffixes {
            out.push(format!("{prefix}{alt}{s}"));
        }
    }
    Ok(out)
}

fn escape_braces(s: &str) -> String {
    s.replace('{', "\\{").replace('}', "\\}")
}

fn unescape(s: &str) -> String {
    s.replace("\\{", "{").replace("\\}", "}")
}

/// The first top-level `{...}` group (unescaped), as (open, close) indices.
fn find_group(chars: &[char]) -> Result<Option<(usize, usize)>> {
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '{' => {
                let mut depth = 0;
                let mut j = i;
                while j < chars.len() {
                    match chars[j] {
                        '\\' => j += 1,
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                return Ok(Some((i, j)));
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                let text: String = chars.iter().collect();
                return Err(Error::Invalid(format!(
                    "unbalanced brace in shard spec `{text}`"
                )));
            }
            _ => i += 1,
        }
    }
    Ok(None)
}

fn split_top_level_commas(body: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut depth = 0;
    let mut escaped = false;
    for c in body.chars() {
        if escaped {
            parts.last_mut().expect("non-empty").push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(String::new());
                continue;
            }
            _ => {}
        }
        // A backslash stays with what it escapes: each part is brace-expanded again, which unescapes.
        parts.last_mut().expect("non-empty").push(c);
    }
    parts
}

/// Most names one shard spec may expand to: ImageNet-scale specs are about a thousand shards, and
/// `{0..99999999999}` must be an error, not an allocation without bound.
pub const MAX_EXPANDED: usize = 1_000_000;

fn too_many(pattern: &str) -> crate::Error {
    crate::Error::Invalid(format!(
        "shard spec `{pattern}` expands to more than {MAX_EXPANDED} names"
    ))
}

/// `a..b[..step]` with integer or single-letter bounds; `None` when `body` is not a range (or it
/// would expand to more than [`MAX_EXPANDED`] names, which the caller reports).
fn expand_range(body: &str) -> Option<Vec<String>> {
    let fields: Vec<&str> = body.split("..").collect();
    if !(fields.len() == 2 || fields.len() == 3) {
        return None;
    }
    let step: i64 = match fields.get(2) {
        Some(s) => s.parse::<i64>().ok()?.checked_abs()?.max(1),
        None => 1,
    };
    let (a, b) = (fields[0], fields[1]);
    let is_int = |s: &str| {
        let digits = s.strip_prefix('-').unwrap_or(s);
        !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
    };
    if is_int(a) && is_int(b) {
        let (start, end): (i64, i64) = (a.parse().ok()?, b.parse().ok()?);
        if (start.abs_diff(end) / step as u64) >= MAX_EXPANDED as u64 {
            return Some(vec![]);
        }
        // braceexpand pads to the longer bound's width when either bound is written with a leading
        // zero (`{1..010}`), and not at all otherwise (`{0..10}`).
        let padded = |s: &str| {
            let digits = s.strip_prefix('-').unwrap_or(s);
            digits.len() > 1 && digits.starts_with('0')
        };
        let width = if padded(a) || padded(b) {
            a.len().max(b.len())
        } else {
            0
        };
        let values = stepped(start, end, step);
        return Some(values.into_iter().map(|v| format!("{v:0width$}")).collect());
    }
    let single = |s: &str| {
        let mut it = s.chars();
        match (it.next(), it.next()) {
            (Some(c), None) if c.is_ascii_alphabetic() => Some(c),
            _ => None,
        }
    };
    let (ca, cb) = (single(a)?, single(b)?);
    let values = stepped(ca as i64, cb as i64, step);
    Some(
        values
            .into_iter()
            .map(|v| char::from(v as u8).to_string())
            .collect(),
    )
}

fn stepped(start: i64, end: i64, step: i64) -> Vec<i64> {
    if start <= end {
        (start..=end).step_by(step as usize).collect()
    } else {
        let mut v = Vec::new();
        let mut x = start;
        while x >= end {
            v.push(x);
            x -= step;
        }
        v
    }
}

fn has_glob(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

/// Expands a glob component by component; matches come back sorted, so the order is stable.
fn glob_paths(pattern: &str) -> Result<Vec<String>> {
    let absolute = pattern.starts_with('/');
    let components: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    let mut current: Vec<PathBuf> = vec![if absolute {
        PathBuf::from("/")
    } else {
        PathBuf::from("")
    }];
    for (i, component) in components.iter().enumerate() {
        let last = i + 1 == components.len();
        let mut next = Vec::new();
        for dir in &current {
            if !has_glob(component) {
                let candidate = dir.join(component);
                if last || candidate.is_dir() {
                    next.push(candidate);
                }
                continue;
            }
            let listing = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir.as_path()
            };
            let Ok(entries) = std::fs::read_dir(listing) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| !name.starts_with('.') || component.starts_with('.'))
                .filter(|name| wildcard_match(component, name))
                .collect();
            names.sort();
            for name in names {
                let candidate = dir.join(&name);
                if (last && candidate.is_file()) || (!last && candidate.is_dir()) {
                    next.push(candidate);
                }
            }
        }
        current = next;
    }
    Ok(current
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
        .collect())
}

/// Shell wildcard match of one path component: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    fn class_len_and_match(p: &[char], c: char) -> Option<(usize, bool)> {
        // p[0] == '['
        let mut i = 1;
        let negate = matches!(p.get(1), Some('!') | Some('^'));
        if negate {
            i += 1;
        }
        let mut matched = false;
        let mut first = true;
        while i < p.len() {
            if p[i] == ']' && !first {
                return Some((i + 1, matched != negate));
            }
            if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
                if p[i] <= c && c <= p[i + 2] {
                    matched = true;
                }
                i += 3;
            } else {
                if p[i] == c {
                    matched = true;
                }
                i += 1;
            }
            first = false;
        }
        None
    }
    // Greedy with one backtrack point (the last `*`): at most |p|·|n| steps, where trying every split
    // of every `*` recursively is exponential on patterns like `*a*a*a*b`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            let advanced = match p[pi] {
                '*' => {
                    star = Some((pi + 1, ni));
                    pi += 1;
                    continue;
                }
                '?' => Some(1),
                '[' => match class_len_and_match(&p[pi..], n[ni]) {
                    Some((len, true)) => Some(len),
                    Some((_, false)) => None,
                    None => (n[ni] == '[').then_some(1),
                },
                c => (c == n[ni]).then_some(1),
            };
            if let Some(len) = advanced {
                pi += len;
                ni += 1;
                continue;
            }
        }
        // Mismatch: let the last `*` swallow one more character, or fail without one.
        match star {
            Some((sp, sn)) => {
                star = Some((sp, sn + 1));
                pi = sp;
                ni = sn + 1;
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(s: &str) -> Vec<String> {
        brace_expand(s).unwrap()
    }

    #[test]
    fn expansion_is_bounded_and_wildcards_do_not_backtrack_exponentially() {
        for spec in ["/d/s-{0..99999999999}.tar", "/d/{0..999}-{0..9999}.tar"] {
            let e = brace_expand(spec).unwrap_err().to_string();
            assert!(e.contains("expands to more than"), "{spec}: {e}");
        }
        assert_eq!(brace_expand("{0..999999}").unwrap().len(), 1_000_000);
        // Exponential for a recursive matcher; a handful of steps here.
        let a60 = "a".repeat(60);
        assert!(!wildcard_match("*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b", &a60));
        assert!(wildcard_match("*a*a*a*a*a*a*a*a*a*a*a*a*a*a*", &a60));
        assert!(wildcard_match("s-*[0-9].t?r", "s-00012.tar"));
        assert!(!wildcard_match("s-*[!0-9].tar", "s-00012.tar"));
        assert!(wildcard_match("[a", "[a"));
        assert!(wildcard_match("**", ""));
    }

    #[test]
    fn zero_padded_bound_sets_the_width() {
        assert_eq!(ex("{000..003}"), ["000", "001", "002", "003"]);
        assert_eq!(ex("{1..010}")[0], "001");
        assert_eq!(ex("{1..010}").len(), 10);
        assert_eq!(ex("{0..10}")[..3], ["0", "1", "2"]);
        assert_eq!(ex("{0..10}")[10], "10");
    }

    #[test]
    fn imagenet_train_pattern_has_1282_shards() {
        let shards = ex("/data/imagenet/imagenet-train-{000000..001281}.tar");
        assert_eq!(shards.len(), 1282);
        assert_eq!(shards[0], "/data/imagenet/imagenet-train-000000.tar");
        assert_eq!(shards[1281], "/data/imagenet/imagenet-train-001281.tar");
    }

    #[test]
    fn steps_descending_letters_lists_and_products() {
        assert_eq!(ex("{0..6..3}"), ["0", "3", "6"]);
        assert_eq!(ex("{3..1}"), ["3", "2", "1"]);
        assert_eq!(ex("{6..0..3}"), ["6", "3", "0"]);
        assert_eq!(ex("{a..c}"), ["a", "b", "c"]);
        assert_eq!(ex("{a,b}-{0..1}"), ["a-0", "a-1", "b-0", "b-1"]);
        assert_eq!(ex("x{a,{b,c}d}y"), ["xay", "xbdy", "xcdy"]);
        assert_eq!(ex("{-1..1}"), ["-1", "0", "1"]);
    }

    #[test]
    fn literal_and_escaped_braces_stay() {
        assert_eq!(ex("plain.tar"), ["plain.tar"]);
        assert_eq!(ex("{x}.tar"), ["{x}.tar"]);
        assert_eq!(ex("\\{0..1\\}"), ["{0..1}"]);
        assert!(brace_expand("{0..1").is_err());
    }

    #[test]
    fn double_colon_joins_sources_and_env_substitutes() {
        std::env::set_var("WDS_SHARDSPEC_TEST_ROOT", "/mnt/x");
        let shards = expand_shard_spec("${SHARDSPEC_TEST_ROOT}/a-{0..1}.tar :: /b/c.tar").unwrap();
        assert_eq!(shards, ["/mnt/x/a-0.tar", "/mnt/x/a-1.tar", "/b/c.tar"]);
        assert!(expand_shard_spec("${SHARDSPEC_TEST_UNSET}/a.tar").is_err());
        assert!(expand_shard_spec(" :: ").is_err());
    }

    #[test]
    fn globs_and_list_files_expand_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        for name in ["s-2.tar", "s-1.tar", "s-10.tar", "other.txt"] {
            std::fs::write(tmp.path().join(name), b"").unwrap();
        }
        let root = tmp.path().to_string_lossy().into_owned();
        let found = expand_shard_spec(&format!("{root}/s-*.tar")).unwrap();
        let names: Vec<_> = found
            .iter()
            .map(|p| p.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(names, ["s-1.tar", "s-10.tar", "s-2.tar"]);
        let found = expand_shard_spec(&format!("{root}/s-?.tar")).unwrap();
        assert_eq!(found.len(), 2);
        let found = expand_shard_spec(&format!("{root}/s-[!1].tar")).unwrap();
        assert_eq!(found.len(), 1);
        assert!(expand_shard_spec(&format!("{root}/none-*.tar")).is_err());

        let list = tmp.path().join("list.txt");
        std::fs::write(&list, "# shards\ns-2.tar\n\n/abs/z.tar\ns-{1..2}.tar\n").unwrap();
        let found = expand_shard_spec(&format!("@{}", list.display())).unwrap();
        assert_eq!(
            found,
            [
                format!("{root}/s-2.tar"),
                "/abs/z.tar".into(),
                format!("{root}/s-1.tar"),
                format!("{root}/s-2.tar")
            ]
        );
        assert!(expand_shard_spec("@/nonexistent/list.txt").is_err());
    }

    #[test]
    fn urls_expand_braces_but_never_globs_or_splits() {
        let shards =
            expand_shard_spec("https://host:8443/in/imagenet-train-{000000..001281}.tar?x=1&y=*")
                .unwrap();
        assert_eq!(shards.len(), 1282);
        assert_eq!(
            shards[1281],
            "https://host:8443/in/imagenet-train-001281.tar?x=1&y=*"
        );
        // `::` joins sources; `http://` has a single colon and the brackets of an IPv6 host keep
        // theirs.
        let shards = expand_shard_spec(
            "http://[::1]:8080/a-{0..1}.tar :: https://h/b.tar::http://[fe80::2]/c.tar",
        )
        .unwrap();
        assert_eq!(
            shards,
            [
                "http://[::1]:8080/a-0.tar",
                "http://[::1]:8080/a-1.tar",
                "https://h/b.tar",
                "http://[fe80::2]/c.tar"
            ]
        );
        // A glob character in a URL is not a pattern: nothing is listed, nothing fails.
        assert_eq!(
            expand_shard_spec("http://h/s-[01].tar").unwrap(),
            ["http://h/s-[01].tar"]
        );
    }

    #[test]
    fn pipe_commands_expand_braces_and_keep_their_words() {
        let shards = expand_shard_spec(
            "pipe:aws s3 cp s3://bucket/train-{000000..000002}.tar - :: /l/x.tar",
        )
        .unwrap();
        assert_eq!(
            shards,
            [
                "pipe:aws s3 cp s3://bucket/train-000000.tar -",
                "pipe:aws s3 cp s3://bucket/train-000001.tar -",
                "pipe:aws s3 cp s3://bucket/train-000002.tar -",
                "/l/x.tar"
            ]
        );
        // Shell wildcards and awk braces reach the shell untouched.
        assert_eq!(
            expand_shard_spec("pipe:cat /d/*.tar | awk '{print}'").unwrap(),
            ["pipe:cat /d/*.tar | awk '{print}'"]
        );
        assert!(expand_shard_spec("pipe:  ").is_err());
    }

    #[test]
    fn other_schemes_say_how_to_read_them_and_file_urls_are_paths() {
        let e = expand_shard_spec("s3://bucket/a-{0..1}.tar")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s3://bucket/a-0.tar") && e.contains("pipe:aws s3 cp"),
            "{e}"
        );
        assert_eq!(
            expand_shard_spec("file:///d/a-{0..1}.tar").unwrap(),
            ["/d/a-0.tar", "/d/a-1.tar"]
        );
    }

    #[test]
    fn lists_hold_urls_and_commands_as_written() {
        let tmp = tempfile::tempdir().unwrap();
        let list = tmp.path().join("list.txt");
        std::fs::write(
            &list,
            "rel-{0..1}.tar\nhttps://h/u-{0..1}.tar\npipe:cat rel.tar\n",
        )
        .unwrap();
        let root = tmp.path().display();
        assert_eq!(
            expand_shard_spec(&format!("@{}", list.display())).unwrap(),
            [
                format!("{root}/rel-0.tar"),
                format!("{root}/rel-1.tar"),
                "https://h/u-0.tar".into(),
                "https://h/u-1.tar".into(),
                "pipe:cat rel.tar".into()
            ]
        );
    }

    #[test]
    fn shard_names_come_from_the_file_a_spec_reads() {
        for (spec, name) in [
            (
                "/data/imagenet-train-000001.tar",
                "imagenet-train-000001.tar",
            ),
            (
                "https://h:1/p/x-000001.tar?X-Amz-Signature=ab/cd",
                "x-000001.tar",
            ),
            ("http://[::1]:80/d/x.tar.gz#frag", "x.tar.gz"),
            (
                "pipe:aws s3 cp s3://b/train-000002.tar -",
                "train-000002.tar",
            ),
            ("pipe:cat /d/demo-000000.tar", "demo-000000.tar"),
            ("pipe:curl -sL 'https://h/a/b.tar' 2>/dev/null", "b.tar"),
            ("pipe:gsutil cat gs://b/y.tar | zstd -d", "y.tar"),
        ] {
            assert_eq!(shard_name(spec), name, "{spec}");
        }
        let odd = shard_name("pipe:generate-shard --seed 3");
        assert!(odd.starts_with("source-") && odd.len() == 23, "{odd}");
        assert_ne!(odd, shard_name("pipe:generate-shard --seed 4"));
        assert!(shard_name("https://h/").starts_with("source-"));
    }

    #[test]
    fn wildcards_match_like_a_shell() {
        assert!(wildcard_match("a*c", "abbc"));
        assert!(wildcard_match("a*c", "ac"));
        assert!(!wildcard_match("a*c", "acb"));
        assert!(wildcard_match("[a-c]x", "bx"));
        assert!(!wildcard_match("[!a-c]x", "bx"));
    }
}
