//! What `pipeline cache ls|verify|gc` do, as plain functions over a cache root.

use std::path::{Path, PathBuf};

use super::manifest::{Manifest, MANIFEST_NAME};
use super::shard::{file_blake3, ShardReader};
use crate::{Error, Result};

/// Every fingerprint directory under `root` that holds a manifest, sorted by name.
pub fn fingerprint_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(dirs),
        Err(e) => return Err(Error::io(root, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| Error::io(root, e))?.path();
        if path.join(MANIFEST_NAME).is_file() {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub checked: usize,
    /// (file, what is wrong), one line per bad shard.
    pub problems: Vec<(String, String)>,
    /// (source name, where it came from and what identified it) for each cache shard computed from a
    /// remote source: those can only be recomputed while that URL or command still works.
    pub remote: Vec<(String, String)>,
}

/// Recomputes every shard's checksum against the manifest and opens it; reports missing, resized,
/// corrupt and unrecorded shards and requested-but-absent sources.
pub fn verify(dir: &Path) -> Result<VerifyReport> {
    let manifest = Manifest::load(dir)?
        .ok_or_else(|| Error::Invalid(format!("{}: no manifest", dir.display())))?;
    let mut report = VerifyReport::default();
    for entry in manifest.shards.values() {
        report.checked += 1;
        if let Some(remote) = &entry.source.remote {
            report
                .remote
                .push((entry.source.name.clone(), remote.describe()));
        }
        let path = dir.join(&entry.file);
        let problem = match std::fs::metadata(&path) {
            Err(_) => Some("missing".to_string()),
            Ok(meta) if meta.len() != entry.summary.bytes => Some(format!(
                "size {} but the manifest says {}",
                meta.len(),
                entry.summary.bytes
            )),
            Ok(_) => match file_blake3(&path) {
                Err(e) => Some(e.to_string()),
                Ok(hash) if hash != entry.summary.blake3 => {
                    Some("checksum mismatch (corrupt)".to_string())
                }
                Ok(_) => match ShardReader::open(&path) {
                    Err(e) => Some(e.to_string()),
                    Ok(reader) if reader.n_samples() != entry.summary.samples => Some(format!(
                        "{} samples but the manifest says {}",
                        reader.n_samples(),
                        entry.summary.samples
                    )),
                    Ok(_) => None,
                },
            },
        };
        if let Some(problem) = problem {
            report.problems.push((entry.file.clone(), problem));
        }
    }
    for missing in manifest.missing() {
        report.problems.push((
            missing.to_string(),
            "requested source shard has no cache shard".to_string(),
        ));
    }
    Ok(report)
}

/// How long a temporary or unrecorded shard must have been left untouched before `gc` removes it. A
/// writer appends to its temporary continuously and records a renamed shard within seconds, on any
/// node of a shared filesystem, so an hour without a change means nobody is writing it; a local
/// process id says nothing about writers on other nodes.
pub const DEFAULT_LEASE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Temporaries (`.*.tmp-*`) and cache shards the manifest does not record (a crash between rename and
/// manifest update) that have not been modified for `lease`; removed unless `dry_run`. Run under the
/// directory's lock (see `cache gc`). Returns what was (or would be) removed.
pub fn remove_partial(
    dir: &Path,
    lease: std::time::Duration,
    dry_run: bool,
) -> Result<Vec<PathBuf>> {
    let manifest = Manifest::load(dir)?;
    let recorded: std::collections::HashSet<String> = manifest
        .iter()
        .flat_map(|m| m.shards.values().map(|s| s.file.clone()))
        .collect();
    let now = std::time::SystemTime::now();
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let temporary = name.starts_with('.') && name.contains(".tmp-");
        let orphan = name.ends_with(".fbc") && !name.starts_with('.') && !recorded.contains(&name);
        if !(temporary || orphan) {
            continue;
        }
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .map_err(|e| Error::io(&path, e))?;
        let idle = now.duration_since(modified).unwrap_or_default();
        if idle < lease {
            continue;
        }
        if !dry_run {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
        removed.push(path);
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{DType, FieldSpec, ManifestShard, ShardWriter, SourceShard};

    pub(crate) fn make_cache(dir: &Path, names: &[&str]) -> serde_json::Value {
        let settings = serde_json::json!({"crop": 64});
        let mut entries = Vec::new();
        for name in names {
            let file = format!("{name}.fbc");
            let mut w = ShardWriter::create(
                &dir.join(&file),
                vec![FieldSpec::new("label", DType::I64, &[])],
                2,
                1,
            )
            .unwrap();
            for i in 0..3i64 {
                w.push(&format!("{i}"), &[&i.to_le_bytes()]).unwrap();
            }
            let summary = w.finish(serde_json::json!({})).unwrap();
            let source = SourceShard {
                name: format!("{name}.tar"),
                size: 1,
                content_hash: "h".into(),
                remote: None,
            };
            entries.push(ManifestShard {
                file,
                source,
                summary,
            });
        }
        Manifest::record(dir, &settings, entries).unwrap();
        settings
    }

    #[test]
    fn verify_names_corrupt_and_missing_shards() {
        let dir = tempfile::tempdir().unwrap();
        make_cache(dir.path(), &["a", "b", "c"]);
        assert!(verify(dir.path()).unwrap().problems.is_empty());
        let b = dir.path().join("b.fbc");
        let mut bytes = std::fs::read(&b).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&b, bytes).unwrap();
        std::fs::remove_file(dir.path().join("c.fbc")).unwrap();
        let report = verify(dir.path()).unwrap();
        let files: Vec<_> = report.problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(files, ["b.fbc", "c.fbc"], "{:?}", report.problems);
    }

    #[test]
    fn verify_says_which_sources_were_remote() {
        let dir = tempfile::tempdir().unwrap();
        let settings = make_cache(dir.path(), &["a", "b"]);
        let mut manifest = Manifest::load(dir.path()).unwrap().unwrap();
        let mut entry = manifest.shards["b.tar"].clone();
        entry.source.remote = Some(crate::cache::RemoteSource {
            spec: "pipe:cat /d/b.tar".into(),
            ..Default::default()
        });
        manifest.shards.insert("b.tar".into(), entry.clone());
        manifest.save(dir.path()).unwrap();
        Manifest::record(dir.path(), &settings, vec![entry]).unwrap();
        let report = verify(dir.path()).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(
            report.remote,
            [(
                "b.tar".to_string(),
                "pipe:cat /d/b.tar (same spec, same bytes)".to_string()
            )]
        );
    }

    #[test]
    fn gc_removes_only_what_has_been_left_for_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        make_cache(dir.path(), &["a"]);
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        let touch = |name: &str, when: Option<std::time::SystemTime>| {
            let path = dir.path().join(name);
            std::fs::write(&path, b"x").unwrap();
            if let Some(t) = when {
                std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_modified(t)
                    .unwrap();
            }
        };
        // Another node's writer (a pid this machine does not have) still writing: kept.
        touch(".x.fbc.tmp-4000000000", None);
        touch(".y.fbc.tmp-4000000001", Some(old));
        touch("orphan.fbc", Some(old));
        touch("fresh.fbc", None);
        let would = remove_partial(dir.path(), DEFAULT_LEASE, true).unwrap();
        let names: Vec<String> = would
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [".y.fbc.tmp-4000000001", "orphan.fbc"]);
        assert!(
            would.iter().all(|p| p.exists()),
            "a dry run removed something"
        );
        assert_eq!(
            remove_partial(dir.path(), DEFAULT_LEASE, false).unwrap(),
            would
        );
        for kept in [
            ".x.fbc.tmp-4000000000",
            "fresh.fbc",
            "a.fbc",
            "manifest.json",
        ] {
            assert!(dir.path().join(kept).exists(), "{kept}");
        }
    }
}
