//! The README against the binary: every `pipeline …` command line in its code blocks is parsed by the
//! real argument parser (`--help` appended: clap rejects an unknown subcommand, flag or choice before it
//! prints help), and every `configs/*.toml` it names is a shipped preset.

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

/// The `pipeline` invocations of the README's code blocks: continuation lines joined, `&&`/`|`/`;`
/// chains split, launchers (`srun -n 8`, `torchrun … target/release/pipeline`) and `KEY=value` prefixes
/// dropped. Each is (README line number, arguments after `pipeline`).
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

#[test]
fn every_readme_command_parses_and_every_preset_it_names_exists() {
    let text = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let commands = readme_commands(&text);
    assert!(
        commands.len() > 30,
        "only {} commands found",
        commands.len()
    );
    let mut failures = vec![];
    let mut subcommands = std::collections::BTreeSet::new();
    for (line, args) in &commands {
        subcommands.insert(args.first().cloned().unwrap_or_default());
        let o = pipeline().args(args).arg("--help").output().unwrap();
        if !o.status.success() {
            failures.push(format!(
                "README.md:{line}: pipeline {}\n{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    }
    eprintln!("README: {} pipeline commands parsed", commands.len());
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
            "`pipeline {name}` has no example in the README"
        );
    }
    // Presets named anywhere in the README exist.
    let mut rest = text.as_str();
    while let Some(at) = rest.find("configs/") {
        rest = &rest[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || "/._-".contains(c)))
            .unwrap_or(rest.len());
        let name = rest[..end].trim_end_matches('.');
        if name.ends_with(".toml") {
            assert!(
                repo_root().join(name).exists(),
                "README names {name}, which is not shipped"
            );
        }
        rest = &rest[end..];
    }
}
