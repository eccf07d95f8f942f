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
}

/// Recomputes every shard's checksum against the manifest and opens it; reports missing, resized,
/// corrupt and unrecorded shards and requested-but-absent sources.
pub fn verify(dir: &Path) -> Result<VerifyReport> {
    let manifest = Manifest::load(dir)?
        .ok_or_else(|| Error::Invalid(format!("{}: no manifest", dir.display())))?;
    let mut report = VerifyReport::default();
    for entry in manifest.shards.values() {
        report.checked += 1;
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

/// Removes temporaries of processes that are gone and cache shards the manifest does not record (a
/// crash between rename and manifest update); returns what was removed.
pub fn remove_partial(dir: &Path) -> Result<Vec<PathBuf>> {
    let manifest = Manifest::load(dir)?;
    let recorded: std::collections::HashSet<String> = manifest
        .iter()
        .flat_map(|m| m.shards.values().map(|s| s.file.clone()))
        .collect();
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stale_temp = name
            .rsplit_once(".tmp-")
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        let orphan = name.ends_with(".fbc") && !recorded.contains(&name);
        if stale_temp || orphan {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            removed.push(path);
        }
    }
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
    fn gc_removes_dead_temporaries_and_orphans_only() {
        let dir = tempfile::tempdir().unwrap();
        make_cache(dir.path(), &["a"]);
        std::fs::write(dir.path().join(".x.fbc.tmp-4000000000"), b"partial").unwrap();
        let live = format!(".y.fbc.tmp-{}", std::process::id());
        std::fs::write(dir.path().join(&live), b"in progress").unwrap();
        std::fs::write(dir.path().join("orphan.fbc"), b"x").unwrap();
        let removed = remove_partial(dir.path()).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(dir.path().join(&live).exists() && dir.path().join("a.fbc").exists());
    }
}
