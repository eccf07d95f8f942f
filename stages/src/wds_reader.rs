//! Streaming webdataset reading: shard bytes (plain, gzip or zstd, sniffed by magic) → tar members in
//! order → samples grouped exactly as webdataset's `group_by_keys` does. Nothing is extracted to disk.
//!
//! Grouping rules (webdataset `tariterators.py`): the key is the directory plus the basename up to its
//! first dot, the rest is the extension, lowercased; consecutive members with one key form a sample;
//! `__*__` metadata and names without a dot are skipped. Two divergences, both reported instead of
//! silent: a repeated extension makes that one sample bad (webdataset raises and stops), and a key that
//! reappears later in the same shard is counted as `split_key` rather than yielded as a second sample.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;

use crate::bad_input::{BadKind, RunCounters};

/// One sample as read from a shard: its members by lowercased extension, in tar order.
#[derive(Debug, Clone)]
pub struct RawSample {
    pub shard: Arc<str>,
    pub key: String,
    pub members: Vec<(String, Vec<u8>)>,
}

impl RawSample {
    pub fn member(&self, ext: &str) -> Option<&[u8]> {
        self.members
            .iter()
            .find(|(e, _)| e == ext)
            .map(|(_, d)| d.as_slice())
    }

    pub fn n_bytes(&self) -> u64 {
        self.members.iter().map(|(_, d)| d.len() as u64).sum()
    }
}

/// Splits a member name into (key, extension) as webdataset's `base_plus_ext` regex
/// `^((?:.*/|)[^.]+)[.]([^/]*)$` does; `None` for names it skips.
pub fn split_key_ext(name: &str) -> Option<(&str, String)> {
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    let base = &name[slash..];
    let dot = base.find('.')?;
    if dot == 0 {
        return None;
    }
    Some((&name[..slash + dot], base[dot + 1..].to_lowercase()))
}

/// webdataset's `skip_meta = r"__[^/]*__($|/)"`, matched at the start of the name.
pub fn is_meta(name: &str) -> bool {
    let first = name.split('/').next().unwrap_or("");
    first.len() >= 4 && first.starts_with("__") && first.ends_with("__")
}

/// What the grouper hands on: a complete sample, or a sample it had to reject.
#[derive(Debug)]
pub enum Grouped {
    Sample(String, Vec<(String, Vec<u8>)>),
    Bad(BadKind, String, String),
}

/// Groups consecutive members of one shard into samples. One per shard, so keys never merge across
/// shards (webdataset's end-of-shard marker).
#[derive(Default)]
pub struct Grouper {
    current: Option<Pending>,
    seen_keys: HashSet<String>,
}

struct Pending {
    key: String,
    members: Vec<(String, Vec<u8>)>,
    problem: Option<(BadKind, String)>,
}

impl Grouper {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one member; returns the previous sample when this member starts a new key.
    pub fn push(&mut self, name: &str, data: Vec<u8>) -> Option<Grouped> {
        if is_meta(name) {
            return None;
        }
        let (key, ext) = split_key_ext(name)?;
        if let Some(pending) = &mut self.current {
            if pending.key == key {
                if pending.members.iter().any(|(e, _)| *e == ext) && pending.problem.is_none() {
                    pending.problem =
                        Some((BadKind::DuplicateMember, format!("duplicate member .{ext}")));
                }
                pending.members.push((ext, data));
                return None;
            }
        }
        let finished = self.finish();
        let problem = (!self.seen_keys.insert(key.to_string())).then(|| {
            (
                BadKind::SplitKey,
                "key appears again after other keys: its members are not adjacent in the tar"
                    .to_string(),
            )
        });
        self.current = Some(Pending {
            key: key.to_string(),
            members: vec![(ext, data)],
            problem,
        });
        finished
    }

    /// The last sample of the shard.
    pub fn finish(&mut self) -> Option<Grouped> {
        let pending = self.current.take()?;
        Some(match pending.problem {
            Some((kind, detail)) => Grouped::Bad(kind, pending.key, detail),
            None => Grouped::Sample(pending.key, pending.members),
        })
    }
}

/// Opens a shard, transparently decompressing gzip and zstd by their magic bytes (not the name, so a
/// `.tar` that is really gzipped still reads).
pub fn open_shard(path: &str) -> std::io::Result<Box<dyn Read + Send>> {
    let file = File::open(path)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let head = reader.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(reader)?)
    } else {
        Box::new(reader)
    })
}

/// Reads one shard to the end, handing each sample to `emit` (which returns false to stop early).
/// Bad samples and shard failures are counted in `counters`; what was read before a failure is kept.
/// Returns false when `emit` asked to stop.
pub fn read_shard(
    shard: &str,
    counters: &RunCounters,
    emit: &mut dyn FnMut(RawSample) -> bool,
) -> bool {
    let shard_name: Arc<str> = Arc::from(shard);
    let reader = match open_shard(shard) {
        Ok(r) => r,
        Err(e) => {
            counters.record(
                BadKind::ShardUnreadable,
                shard,
                "-",
                &format!("cannot open: {e}"),
            );
            return true;
        }
    };
    let mut grouper = Grouper::new();
    let mut handle = |grouped: Grouped| -> bool {
        match grouped {
            Grouped::Sample(key, members) => emit(RawSample {
                shard: shard_name.clone(),
                key,
                members,
            }),
            Grouped::Bad(kind, key, detail) => {
                counters.record(kind, shard, &key, &detail);
                true
            }
        }
    };
    let mut archive = tar::Archive::new(reader);
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => {
            counters.record(
                BadKind::ShardCorrupt,
                shard,
                "-",
                &format!("not a tar stream: {e}"),
            );
            return true;
        }
    };
    let mut failure = None;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                failure = Some(format!("corrupt tar header: {e}"));
                break;
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => {
                failure = Some(format!("unreadable member name: {e}"));
                break;
            }
        };
        let size = entry.size();
        let mut data = Vec::with_capacity(size.min(1 << 28) as usize);
        if let Err(e) = entry.read_to_end(&mut data) {
            failure = Some(format!("member {name}: {e}"));
            break;
        }
        // tar reads a member through `take(size)`, so a cut-off shard shows up as a short member.
        if data.len() as u64 != size {
            failure = Some(format!(
                "member {name} truncated: {} of {size} bytes",
                data.len()
            ));
            break;
        }
        if let Some(grouped) = grouper.push(&name, data) {
            if !handle(grouped) {
                return false;
            }
        }
    }
    // Members read in full before a failure still form a sample: keep what was read.
    if let Some(grouped) = grouper.finish() {
        if !handle(grouped) {
            return false;
        }
    }
    if let Some(detail) = failure {
        counters.record(BadKind::ShardCorrupt, shard, "-", &detail);
    } else {
        counters.add_shard();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(names: &[&str]) -> Vec<String> {
        let mut g = Grouper::new();
        let mut out = Vec::new();
        let show = |x: Grouped| match x {
            Grouped::Sample(k, m) => format!(
                "{k}:{}",
                m.iter()
                    .map(|(e, _)| e.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Grouped::Bad(kind, k, _) => format!("{k}!{}", kind.name()),
        };
        for n in names {
            if let Some(x) = g.push(n, Vec::new()) {
                out.push(show(x));
            }
        }
        if let Some(x) = g.finish() {
            out.push(show(x));
        }
        out
    }

    #[test]
    fn splits_key_at_first_dot_of_the_basename() {
        assert_eq!(
            split_key_ext("train/n01440764_10026.JPEG"),
            Some(("train/n01440764_10026", "jpeg".into()))
        );
        assert_eq!(
            split_key_ext("a/b.seg.jpg"),
            Some(("a/b", "seg.jpg".into()))
        );
        assert_eq!(
            split_key_ext("dir.v2/x.cls"),
            Some(("dir.v2/x", "cls".into()))
        );
        assert_eq!(split_key_ext("Key.Cls"), Some(("Key", "cls".into())));
        assert_eq!(split_key_ext("nodot"), None);
        assert_eq!(split_key_ext("a/.hidden"), None);
        assert_eq!(split_key_ext("a/b.c/d"), None);
    }

    #[test]
    fn groups_consecutive_members_and_skips_metadata() {
        assert_eq!(
            group(&[
                "__meta__",
                "a.jpg",
                "a.CLS",
                "__x__/y.txt",
                "b.jpg",
                "noext",
                "b.cls",
                "c.png"
            ]),
            ["a:jpg,cls", "b:jpg,cls", "c:png"]
        );
    }

    #[test]
    fn duplicate_extension_rejects_that_sample_only() {
        assert_eq!(
            group(&["a.jpg", "a.JPG", "a.cls", "b.jpg"]),
            ["a!duplicate_member", "b:jpg"]
        );
    }

    #[test]
    fn split_key_is_reported_not_merged() {
        assert_eq!(
            group(&["a.jpg", "b.jpg", "a.cls", "c.jpg"]),
            ["a:jpg", "b:jpg", "a!split_key", "c:jpg"]
        );
    }

    #[test]
    fn keys_keep_case_and_directories() {
        assert_eq!(
            group(&["d1/K.jpg", "d2/K.jpg", "d2/K.json"]),
            ["d1/K:jpg", "d2/K:jpg,json"]
        );
    }
}
