//! The manifest of one fingerprint directory: the settings that produced it and one entry per cache
//! shard. It is rewritten atomically under the directory lock, re-reading the file first, so ranks
//! that finish shards at the same time merge instead of overwriting each other.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::shard::{ShardSummary, FORMAT_VERSION};
use crate::atomic::write_bytes_atomic;
use crate::{Error, Result};

pub const MANIFEST_NAME: &str = "manifest.json";

/// Identity of the source shard a cache shard was computed from: a changed source is recomputed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceShard {
    pub name: String,
    pub size: u64,
    /// blake3 of the source shard's bytes, hex. For a remote source, of the bytes streamed while its
    /// cache shard was computed (empty in a probe that has not read the source).
    pub content_hash: String,
    /// Where a remote source (`pipe:` or `http(s)://`) came from and what identified it; absent for
    /// a local file, so manifests of local sources read and write as they always did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteSource>,
}

/// A remote source's identity without downloading it: for HTTP the validators of a HEAD request,
/// for `pipe:` the expanded command alone ("same command, same bytes"; `precompute --recheck`
/// verifies by hashing the stream against [`SourceShard::content_hash`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteSource {
    /// The expanded spec: the URL, or `pipe:` and the command.
    pub spec: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_length: Option<u64>,
}

impl RemoteSource {
    /// `http://h/x.tar (ETag "abc", Last-Modified …, 1234 bytes)` or `pipe:cmd (same command, same
    /// bytes)`: what `cache verify` prints.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(etag) = &self.etag {
            parts.push(format!("ETag {etag}"));
        }
        if let Some(modified) = &self.last_modified {
            parts.push(format!("Last-Modified {modified}"));
        }
        if let Some(length) = self.content_length {
            parts.push(format!("{length} bytes"));
        }
        if parts.is_empty() {
            parts.push("same spec, same bytes".to_string());
        }
        format!("{} ({})", self.spec, parts.join(", "))
    }
}

impl SourceShard {
    /// Whether a cache shard recorded for `recorded` stands for the source this probe identifies. A
    /// local file: same name, size and hash. A remote source: same name and same [`RemoteSource`]
    /// (spec and validators); when the probe carries a hash (`--recheck` streamed the source) the
    /// hash and size must match the recorded ones too. Local and remote never stand for each other.
    pub fn reuses(&self, recorded: &SourceShard) -> bool {
        if self.name != recorded.name || self.remote != recorded.remote {
            return false;
        }
        if self.remote.is_some() && self.content_hash.is_empty() {
            return true;
        }
        self.size == recorded.size && self.content_hash == recorded.content_hash
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestShard {
    /// File name inside the fingerprint directory.
    pub file: String,
    pub source: SourceShard,
    #[serde(flatten)]
    pub summary: ShardSummary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub fingerprint: String,
    /// Everything that changes the cached numbers (what the fingerprint hashes).
    pub settings: serde_json::Value,
    /// Keyed by source shard name.
    pub shards: BTreeMap<String, ManifestShard>,
    /// Source shard names the runs on this directory were asked for; complete when all are in `shards`.
    #[serde(default)]
    pub requested: std::collections::BTreeSet<String>,
}

/// The fingerprint of a settings value: blake3 of its canonical JSON (serde_json sorts object keys),
/// 16 hex digits.
pub fn fingerprint(settings: &serde_json::Value) -> String {
    let canonical = serde_json::to_vec(settings).expect("json value serialises");
    blake3::hash(&canonical).to_hex()[..16].to_string()
}

impl Manifest {
    pub fn new(settings: serde_json::Value) -> Self {
        Manifest {
            format_version: FORMAT_VERSION,
            fingerprint: fingerprint(&settings),
            settings,
            shards: BTreeMap::new(),
            requested: Default::default(),
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_NAME)
    }

    /// Reads `dir/manifest.json`; `Ok(None)` when there is none yet.
    pub fn load(dir: &Path) -> Result<Option<Manifest>> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Invalid(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("manifest serialises");
        write_bytes_atomic(&Self::path(dir), &json)
    }

    /// Records finished shards: under the caller's [`super::CacheLock`], re-reads the manifest on disk
    /// (another rank may have added shards), adds `entries` and writes it back atomically.
    pub fn record(
        dir: &Path,
        settings: &serde_json::Value,
        entries: Vec<ManifestShard>,
    ) -> Result<Manifest> {
        let mut manifest = Self::load(dir)?.unwrap_or_else(|| Manifest::new(settings.clone()));
        if manifest.fingerprint != fingerprint(settings) {
            return Err(Error::Invalid(format!(
                "{}: manifest fingerprint {} does not match settings {}",
                dir.display(),
                manifest.fingerprint,
                fingerprint(settings)
            )));
        }
        for entry in entries {
            manifest.shards.insert(entry.source.name.clone(), entry);
        }
        manifest.save(dir)?;
        Ok(manifest)
    }

    /// Requested source shards that have no cache shard yet.
    pub fn missing(&self) -> Vec<&str> {
        self.requested
            .iter()
            .filter(|r| !self.shards.contains_key(*r))
            .map(String::as_str)
            .collect()
    }

    pub fn total_samples(&self) -> usize {
        self.shards.values().map(|s| s.summary.samples).sum()
    }

    pub fn total_bytes(&self) -> u64 {
        self.shards.values().map(|s| s.summary.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> ManifestShard {
        ManifestShard {
            file: format!("{name}.fbc"),
            source: SourceShard {
                name: name.into(),
                size: 1,
                content_hash: "h".into(),
                remote: None,
            },
            summary: ShardSummary {
                samples: 3,
                bytes: 10,
                blake3: "b".into(),
            },
        }
    }

    #[test]
    fn fingerprint_ignores_key_order_and_sees_values() {
        let a = serde_json::json!({"crop": 256, "views": 2});
        let b: serde_json::Value = serde_json::from_str(r#"{"views": 2, "crop": 256}"#).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(
            fingerprint(&a),
            fingerprint(&serde_json::json!({"crop": 64, "views": 2}))
        );
    }

    #[test]
    fn local_manifests_read_and_write_as_before() {
        let old = r#"{"name": "a.tar", "size": 5, "content_hash": "h"}"#;
        let source: SourceShard = serde_json::from_str(old).unwrap();
        assert_eq!(source.remote, None);
        let written = serde_json::to_value(&source).unwrap();
        assert_eq!(
            written,
            serde_json::from_str::<serde_json::Value>(old).unwrap()
        );
    }

    #[test]
    fn remote_sources_reuse_by_spec_and_validators_and_rechecks_by_hash() {
        let remote = |etag: &str| RemoteSource {
            spec: "http://h/a.tar".into(),
            etag: Some(etag.into()),
            content_length: Some(10),
            ..Default::default()
        };
        let recorded = SourceShard {
            name: "a.tar".into(),
            size: 10,
            content_hash: "h1".into(),
            remote: Some(remote("\"v1\"")),
        };
        let json = serde_json::to_string(&recorded).unwrap();
        assert_eq!(
            serde_json::from_str::<SourceShard>(&json).unwrap(),
            recorded
        );
        let probe = SourceShard {
            content_hash: String::new(),
            ..recorded.clone()
        };
        assert!(probe.reuses(&recorded));
        let changed = SourceShard {
            remote: Some(remote("\"v2\"")),
            ..probe.clone()
        };
        assert!(!changed.reuses(&recorded));
        let rechecked = SourceShard {
            content_hash: "h2".into(),
            ..probe.clone()
        };
        assert!(!rechecked.reuses(&recorded));
        assert!(SourceShard {
            content_hash: "h1".into(),
            ..probe.clone()
        }
        .reuses(&recorded));
        // The same bytes read locally are another source.
        let local = SourceShard {
            remote: None,
            ..recorded.clone()
        };
        assert!(!local.reuses(&recorded) && !recorded.reuses(&local));
        assert!(local.reuses(&local.clone()));
        assert_eq!(
            recorded.remote.as_ref().unwrap().describe(),
            "http://h/a.tar (ETag \"v1\", 10 bytes)"
        );
    }

    #[test]
    fn records_from_two_writers_merge() {
        let dir = tempfile::tempdir().unwrap();
        let settings = serde_json::json!({"crop": 256});
        Manifest::record(dir.path(), &settings, vec![entry("a")]).unwrap();
        let m = Manifest::record(dir.path(), &settings, vec![entry("b")]).unwrap();
        assert_eq!(m.shards.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(Manifest::load(dir.path()).unwrap().unwrap(), m);
        assert!(Manifest::record(dir.path(), &serde_json::json!({"crop": 64}), vec![]).is_err());
    }
}
