//! The README and the pages of docs/ against the binary: every `pipeline …` command line in their code
//! blocks is parsed by the real argument parser (`--help` appended: clap rejects an unknown subcommand,
//! flag or choice before it prints help), every subcommand has an example somewhere, and every
//! `configs/*.toml` they name is a shipped preset.

mod common;
use common::*;

/// Shell words of one command line: quotes group, `#` outside quotes starts a comment.
fn words(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quote, mut started) = (vec![], String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                started = true;
            }
            (None, c) if c.is_whitespace() => {
                if started {
                    out.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            (None, '#') if !started => break,
            (None, c) => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(cur);
    }
    out
}

/// The `pipeline` invocations of a Markdown page's code blocks: continuation lines joined, `&&`/`|`/`;`
/// chains split, launchers (`srun -n 8`, `torchrun … target/release/pipeline`) and `KEY=value` prefixes
/// dropped. Each is (line number, arguments after `pipeline`).
fn readme_commands(text: &str) -> Vec<(usize, Vec<String>)> {
    let (mut commands, mut in_block, mut pending, mut start) = (vec![], false, String::new(), 0);
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        if pending.is_empty() {
            start = i + 1;
        }
        match line.trim_end().strip_suffix('\\') {
            Some(head) => {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            None => pending.push_str(line),
        }
        let joined = std::mem::take(&mut pending);
        let all = words(&joined);
        for segment in all.split(|w| w == "&&" || w == "|" || w == ";") {
            let at = segment
                .iter()
                .position(|w| w == "pipeline" || w.ends_with("/pipeline"));
            let launched = at.is_some_and(|k| {
                segment[..k].iter().all(|w| w.contains('='))
                    || ["srun", "torchrun"].contains(&segment[0].as_str())
            });
            if let (Some(k), true) = (at, launched) {
                commands.push((start, segment[k + 1..].to_vec()));
            }
        }
    }
    commands
}

#[test]
fn the_tokenizer_reads_the_readme_the_way_a_shell_does() {
    assert_eq!(
        words(r#"pipeline a --x '/d/{0..1}.tar' "b c"   # a comment"#),
        ["pipeline", "a", "--x", "/d/{0..1}.tar", "b c"]
    );
    let cmds = readme_commands(
        "```sh\nRUST_LOG=debug pipeline train \\\n    --config c.toml && pipeline sample --num 1\n\
         srun -n 8 pipeline precompute\n# pipeline not-this\npython x.py pipeline\n```\npipeline outside\n",
    );
    let args: Vec<Vec<String>> = cmds.into_iter().map(|(_, a)| a).collect();
    assert_eq!(
        args,
        [
            vec!["train", "--config", "c.toml"],
            vec!["sample", "--num", "1"],
            vec!["precompute"]
        ]
    );
}

/// README.md and every docs/*.md, as (path relative to the repository root, text).
fn pages() -> Vec<(String, String)> {
    let mut names = vec!["README.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(repo_root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    assert!(docs.len() >= 5, "docs/ holds only {docs:?}");
    names.extend(docs);
    names
        .into_iter()
        .map(|name| {
            let text = std::fs::read_to_string(repo_root().join(&name)).unwrap();
            (name, text)
        })
        .collect()
}

#[test]
fn every_documented_command_parses_and_every_preset_named_exists() {
    let (mut failures, mut count) = (vec![], 0);
    let mut subcommands = std::collections::BTreeSet::new();
    for (page, text) in pages() {
        let commands = readme_commands(&text);
        eprintln!("{page}: {} pipeline commands parsed", commands.len());
        count += commands.len();
        for (line, args) in &commands {
            subcommands.insert(args.first().cloned().unwrap_or_default());
            let o = pipeline().args(args).arg("--help").output().unwrap();
            if !o.status.success() {
                failures.push(format!(
                    "{page}:{line}: pipeline {}\n{}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
        }
        // Presets named anywhere on the page exist.
        let mut rest = text.as_str();
        while let Some(at) = rest.find("configs/") {
            let line = text[..text.len() - rest.len() + at].lines().count().max(1);
            rest = &rest[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || "/._-".contains(c)))
                .unwrap_or(rest.len());
            let name = rest[..end].trim_end_matches('.');
            if name.ends_with(".toml") && !repo_root().join(name).exists() {
                failures.push(format!("{page}:{line}: names {name}, which is not shipped"));
            }
            rest = &rest[end..];
        }
    }
    assert!(count > 30, "only {count} commands found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every subcommand the binary has is shown at least once.
    let help = run_ok(pipeline().arg("--help"));
    let help = String::from_utf8_lossy(&help.stdout);
    let listed: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    assert!(listed.len() >= 10, "{help}");
    for name in listed {
        assert!(
            subcommands.contains(name),
            "`pipeline {name}` has no example in README.md or docs/*.md"
        );
    }
}

/// GitHub's anchor of a heading: lower case, punctuation other than `-` and `_` dropped, spaces → `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown page's headings (outside code blocks).
fn anchors(text: &str) -> Vec<String> {
    let mut in_block = false;
    let mut out = vec![];
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
        } else if !in_block && line.starts_with('#') {
            out.push(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn headings_give_githubs_anchors() {
    assert_eq!(
        anchor(" Multi-rank evaluation (`sample`, `classify`, `bpd`, `fid`)"),
        "multi-rank-evaluation-sample-classify-bpd-fid"
    );
    assert_eq!(anchor("`[train]`"), "train");
}

/// Every relative link of README.md and docs/*.md names a file that exists and, with `#anchor`, a
/// heading of that file: a section that moves takes its links along or this fails.
#[test]
fn every_relative_link_resolves() {
    let mut failures = vec![];
    let mut links = 0;
    for (page, text) in pages() {
        let dir = repo_root().join(&page).parent().unwrap().to_path_buf();
        for (n, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find("](") {
                rest = &rest[at + 2..];
                let Some(end) = rest.find(')') else { break };
                let target = &rest[..end];
                rest = &rest[end..];
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                links += 1;
                let (file, fragment) = target.split_once('#').unwrap_or((target, ""));
                let path = if file.is_empty() {
                    repo_root().join(&page)
                } else {
                    dir.join(file)
                };
                if !path.exists() {
                    failures.push(format!("{page}:{}: {target}: no such file", n + 1));
                    continue;
                }
                if !fragment.is_empty() {
                    let target_text = std::fs::read_to_string(&path).unwrap();
                    if !anchors(&target_text).iter().any(|a| a == fragment) {
                        failures.push(format!(
                            "{page}:{}: {target}: no heading with that anchor",
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    eprintln!("{links} relative links checked");
    assert!(links > 10, "only {links} links found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
