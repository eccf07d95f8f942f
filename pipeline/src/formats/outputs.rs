//! Outputs never replace inputs. A job refuses an output path that is one of its inputs — the same
//! file or directory by device and inode, so a symlink, a hard link or `./x` vs `x` are caught too —
//! and a command that fills a directory (`sample`) refuses one that holds anything but an earlier run
//! of the same command, unless told to overwrite, when it removes that run's files first.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, Context};

/// Fails when `out` is the same file or directory as one of `inputs` (those that exist), naming both.
pub fn refuse_input_as_output(
    flag: &str,
    out: &Path,
    inputs: &[(&str, &Path)],
) -> anyhow::Result<()> {
    let Ok(o) = std::fs::metadata(out) else {
        return Ok(());
    };
    for (input_flag, input) in inputs {
        if let Ok(i) = std::fs::metadata(input) {
            if (i.dev(), i.ino()) == (o.dev(), o.ino()) {
                bail!(
                    "{flag} {} is the input {input_flag} {}: refusing to write an output over an input",
                    out.display(),
                    input.display()
                );
            }
        }
    }
    Ok(())
}

/// The marker a directory-filling command leaves: which command made the directory, and its files.
const MARKER: &str = "output-of.json";

/// Readies `dir` for the outputs `files` (names directly inside it) of `command` (its arguments, which
/// identify the run). An absent or empty directory is created; one holding an earlier run of the same
/// command, or of another when `overwrite`, has that run's files removed first (nothing else); any
/// other content is refused.
pub fn prepare_dir(
    flag: &str,
    dir: &Path,
    command: &[String],
    files: &[&str],
    overwrite: bool,
) -> anyhow::Result<()> {
    let marker = dir.join(MARKER);
    let entries: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {flag} {}", dir.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(e).with_context(|| format!("reading {flag} {}", dir.display())),
    };
    if !entries.is_empty() {
        let earlier: Option<Vec<String>> = std::fs::read(&marker)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| serde_json::from_value(v["command"].clone()).ok());
        let ours = |name: &String| name == MARKER || files.contains(&name.as_str());
        let foreign: Vec<&String> = entries.iter().filter(|n| !ours(n)).collect();
        match (&earlier, overwrite) {
            (_, _) if !foreign.is_empty() => bail!(
                "{flag} {} holds files no earlier run of this command wrote ({}): choose an empty or new directory",
                dir.display(),
                foreign.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
            (Some(earlier), false) if earlier.as_slice() != command => bail!(
                "{flag} {} holds the outputs of another run (`{}`): pass --overwrite to replace them, or choose another directory",
                dir.display(),
                earlier.join(" ")
            ),
            (None, false) => bail!(
                "{flag} {} is not empty and no earlier run of this command wrote it: pass --overwrite to replace its outputs, or choose another directory",
                dir.display()
            ),
            _ => {}
        }
        // The old run's files go first, so a smaller run never leaves a larger one's images behind.
        for name in entries.iter().filter(|n| ours(n)) {
            let path = dir.join(name);
            let removed = if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("removing the earlier {}", path.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {flag} {}", dir.display()))?;
    let body = serde_json::to_vec_pretty(&serde_json::json!({ "command": command }))?;
    stages::atomic::write_bytes_atomic(&marker, &body)
        .with_context(|| format!("writing {}", marker.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_input_is_never_an_output_through_links_either() {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("in.npz");
        std::fs::write(&input, b"x").unwrap();
        let link = tmp.path().join("link.npz");
        std::os::unix::fs::symlink(&input, &link).unwrap();
        let hard = tmp.path().join("hard.npz");
        std::fs::hard_link(&input, &hard).unwrap();
        let dotted = tmp.path().join(".").join("in.npz");
        for out in [&input, &link, &hard, &dotted] {
            let e = refuse_input_as_output("--out", out, &[("--ref", &input)]).unwrap_err();
            assert!(e.to_string().contains("is the input --ref"), "{e}");
        }
        let other = tmp.path().join("other.npz");
        refuse_input_as_output("--out", &other, &[("--ref", &input)]).unwrap();
        std::fs::write(&other, b"y").unwrap();
        refuse_input_as_output("--out", &other, &[("--ref", &input)]).unwrap();
    }

    #[test]
    fn a_directory_holds_one_commands_outputs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("samples");
        let files = ["images", "grid.png"];
        let first = args(&["sample", "--num", "8"]);
        prepare_dir("--out", &dir, &first, &files, false).unwrap();
        std::fs::create_dir(dir.join("images")).unwrap();
        std::fs::write(dir.join("images/000007.png"), b"old").unwrap();
        // The same command again: its old files go, nothing else is asked.
        prepare_dir("--out", &dir, &first, &files, false).unwrap();
        assert!(!dir.join("images").exists());
        std::fs::create_dir(dir.join("images")).unwrap();
        // Another command: only with --overwrite, which removes the old run's files.
        let second = args(&["sample", "--num", "2"]);
        let e = prepare_dir("--out", &dir, &second, &files, false).unwrap_err();
        assert!(e.to_string().contains("--overwrite"), "{e}");
        assert!(dir.join("images").exists(), "a refusal removes nothing");
        prepare_dir("--out", &dir, &second, &files, true).unwrap();
        assert!(!dir.join("images").exists());
        // Anything else in the directory is never removed, overwrite or not.
        std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
        for overwrite in [false, true] {
            let e = prepare_dir("--out", &dir, &second, &files, overwrite).unwrap_err();
            assert!(e.to_string().contains("notes.txt"), "{e}");
        }
        assert!(dir.join("notes.txt").exists());
        // A non-empty directory no command of ours wrote.
        let run = tmp.path().join("run");
        std::fs::create_dir_all(run.join("checkpoints")).unwrap();
        let e = prepare_dir("--out", &run, &first, &files, true).unwrap_err();
        assert!(e.to_string().contains("checkpoints"), "{e}");
        assert!(run.join("checkpoints").exists());
    }
}
