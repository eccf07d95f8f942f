//! Streaming webdataset reading: shard bytes (a local file, a `pipe:` command or a URL; plain, gzip or
//! zstd, sniffed by magic) → tar members in order → samples grouped exactly as webdataset's
//! `group_by_keys` does. Nothing is extracted to disk.
//!
//! Grouping rules (webdataset `tariterators.py`): the key is the directory plus the basename up to its
//! first dot, the rest is the extension, lowercased; consecutive members with one key form a sample;
//! `__*__` metadata and names without a dot are skipped. Two divergences, both reported instead of
//! silent: a repeated extension makes that one sample bad (webdataset raises and stops), and a key that
//! reappears later in the same shard is counted as `split_key` rather than yielded as a second sample.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;

use crate::bad_input::{BadKind, RunCounters};
// Re-exported: readers name the limits here, where they are enforced.
pub use crate::limits::{ReadLimits, DEFAULT_MAX_MEMBER_BYTES};
use crate::metrics::{ShardReadStat, SourceStats};
use crate::remote::{self, Kind, SourceTally};

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

/// A shard's bytes, decompressed when gzip or zstd (sniffed by magic bytes, not the name, so a `.tar`
/// that is really gzipped still reads). Kept as an enum rather than a boxed reader so that the source
/// underneath can be had back ([`ShardStream::into_source`]) and read to its end.
enum ShardStream {
    Plain(BufReader<Source>),
    Gzip(flate2::bufread::MultiGzDecoder<BufReader<Source>>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<Source>>),
}

type Source = Box<dyn Read + Send>;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

impl ShardStream {
    fn open(spec: &str, tally: Arc<SourceTally>) -> std::io::Result<Self> {
        let source = remote::open_source(spec, tally)?;
        if !Kind::of(spec).is_remote() {
            // A local file's first read fills the buffer: sniff in place.
            let mut reader = BufReader::with_capacity(1 << 20, source);
            let head: Vec<u8> = reader
                .fill_buf()?
                .iter()
                .take(ZSTD_MAGIC.len())
                .copied()
                .collect();
            return Self::wrap(&head, reader);
        }
        // A network or pipe read may return a byte or two: collect the magic's length first.
        let mut source = source;
        let mut head = Vec::with_capacity(ZSTD_MAGIC.len());
        (&mut source)
            .take(ZSTD_MAGIC.len() as u64)
            .read_to_end(&mut head)?;
        let chained: Source = Box::new(std::io::Cursor::new(head.clone()).chain(source));
        Self::wrap(&head, BufReader::with_capacity(1 << 20, chained))
    }

    fn wrap(head: &[u8], reader: BufReader<Source>) -> std::io::Result<Self> {
        Ok(if head.starts_with(&GZIP_MAGIC) {
            ShardStream::Gzip(flate2::bufread::MultiGzDecoder::new(reader))
        } else if head.starts_with(&ZSTD_MAGIC) {
            ShardStream::Zstd(zstd::stream::read::Decoder::with_buffer(reader)?)
        } else {
            ShardStream::Plain(reader)
        })
    }

    /// The (compressed) source, positioned after whatever the decompressor consumed.
    fn into_source(self) -> BufReader<Source> {
        match self {
            ShardStream::Plain(r) => r,
            ShardStream::Gzip(r) => r.into_inner(),
            ShardStream::Zstd(r) => r.finish(),
        }
    }
}

impl Read for ShardStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            ShardStream::Plain(r) => r.read(buf),
            ShardStream::Gzip(r) => r.read(buf),
            ShardStream::Zstd(r) => r.read(buf),
        }
    }
}

/// Opens a shard (a path, `pipe:` command or URL: [`crate::remote`]), transparently decompressing
/// gzip and zstd.
pub fn open_shard(spec: &str) -> std::io::Result<Box<dyn Read + Send>> {
    Ok(Box::new(ShardStream::open(
        spec,
        Arc::new(SourceTally::new()),
    )?))
}

/// Bytes read after a remote tar's end-of-archive blocks before the source is dropped: a tar is padded
/// to its 10 KiB record, and whatever follows beyond this is not part of the shard.
pub const MAX_TRAILING_BYTES: u64 = 1 << 20;

/// How [`read_shard_with`] reads.
#[derive(Default, Clone, Copy)]
pub struct ReadOptions<'a> {
    /// Where the shard's source bytes, read time and retries are recorded.
    pub stats: Option<&'a SourceStats>,
    /// Hash a remote source's bytes as they pass (blake3), for the cache's source identity.
    pub hash_remote: bool,
    pub limits: ReadLimits,
}

/// What [`read_shard_with`] came to.
pub struct ShardRead {
    /// False when `emit` asked to stop.
    pub keep_going: bool,
    /// The source's bytes, time, retries, first error and (when hashing) content hash.
    pub tally: Arc<SourceTally>,
}

/// Reads one shard to the end, handing each sample to `emit` (which returns false to stop early).
/// Bad samples and shard failures are counted in `counters`; what was read before a failure is kept.
/// Returns false when `emit` asked to stop.
pub fn read_shard(
    shard: &str,
    counters: &RunCounters,
    emit: &mut dyn FnMut(RawSample) -> bool,
) -> bool {
    read_shard_with(shard, counters, ReadOptions::default(), emit).keep_going
}

/// [`read_shard`], recording source statistics and hashing remote sources as `options` ask.
pub fn read_shard_with(
    shard: &str,
    counters: &RunCounters,
    options: ReadOptions,
    emit: &mut dyn FnMut(RawSample) -> bool,
) -> ShardRead {
    let remote = Kind::of(shard).is_remote();
    let tally = Arc::new(
        if remote && options.hash_remote {
            SourceTally::hashing()
        } else {
            SourceTally::new()
        }
        .with_deadline(options.limits.shard_timeout),
    );
    let keep_going = read_source(shard, remote, counters, &tally, &options.limits, emit);
    if let Some(stats) = options.stats {
        stats.record(ShardReadStat {
            shard: crate::shardspec::shard_name(shard),
            remote,
            bytes: tally.bytes(),
            read_time: tally.read_time(),
            retries: tally.retries(),
        });
    }
    ShardRead { keep_going, tally }
}

fn read_source(
    shard: &str,
    remote: bool,
    counters: &RunCounters,
    tally: &Arc<SourceTally>,
    limits: &ReadLimits,
    emit: &mut dyn FnMut(RawSample) -> bool,
) -> bool {
    let stream = match ShardStream::open(shard, tally.clone()) {
        Ok(s) => s,
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
    let mut archive = tar::Archive::new(EndWatch::new(stream));
    let failure = match read_members(&mut archive, shard, counters, limits, emit) {
        Members::Stopped => return false,
        Members::Done(failure) => failure,
    };
    let stream = archive.into_inner();
    // tar-rs ends its entries at a zero block and at EOF alike; only the first is a whole archive. A
    // source cut at a member boundary (a `pipe:` command that exits 0 after a short read) must never
    // pass for a complete shard.
    let failure = failure.or_else(|| {
        stream.eof.then(|| {
            "the tar ended without its end-of-archive block: the source stopped early".to_string()
        })
    });
    // A remote source is read past the tar's end, also after a corrupt member: that is when a
    // command's exit status is known, and the hash covers every byte (a tar's zero blocks and padding
    // included). Only so far, though: junk or an endless stream after the archive is not the shard.
    let drained = if remote && tally.failure().is_none() {
        drain(stream.inner)
    } else {
        None
    };
    let failure = failure.or(drained);
    match failure {
        Some(detail) => counters.record(BadKind::ShardCorrupt, shard, "-", &explain(detail, tally)),
        None => counters.add_shard(),
    }
    true
}

/// The decompressed shard, noting whether a read ever came back empty (the source's end).
struct EndWatch {
    inner: ShardStream,
    eof: bool,
}

impl EndWatch {
    fn new(inner: ShardStream) -> Self {
        EndWatch { inner, eof: false }
    }
}

impl Read for EndWatch {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        Ok(n)
    }
}

/// Reads what is left of a source after the tar's end, up to [`MAX_TRAILING_BYTES`]; the error, if
/// any. Dropping the source afterwards stops a `pipe:` command and closes a connection.
fn drain(stream: ShardStream) -> Option<String> {
    let mut rest = stream.into_source().take(MAX_TRAILING_BYTES + 1);
    match std::io::copy(&mut rest, &mut std::io::sink()) {
        Err(e) => Some(format!("after the end of the tar: {e}")),
        Ok(n) if n > MAX_TRAILING_BYTES => Some(format!(
            "more than {MAX_TRAILING_BYTES} bytes follow the end of the tar: the source is not one \
             archive (read no further)"
        )),
        Ok(_) => None,
    }
}

/// A shard failure in the source's own words when the source failed (the URL after its retries, the
/// command's exit and stderr), else the tar's, with what the source said at its end.
fn explain(detail: String, tally: &SourceTally) -> String {
    match (tally.failure(), tally.note()) {
        (Some(failure), _) if !detail.contains(&failure) => format!("{detail}: {failure}"),
        (None, Some(note)) => format!("{detail} ({note})"),
        _ => detail,
    }
}

enum Members {
    /// `emit` asked to stop.
    Stopped,
    /// The shard's end, or the failure that ended it early.
    Done(Option<String>),
}

/// Groups the tar's members into samples and hands them on; members read in full before a failure
/// still form a sample.
fn read_members(
    archive: &mut tar::Archive<EndWatch>,
    shard: &str,
    counters: &RunCounters,
    limits: &ReadLimits,
    emit: &mut dyn FnMut(RawSample) -> bool,
) -> Members {
    let shard_name: Arc<str> = Arc::from(shard);
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
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => return Members::Done(Some(format!("not a tar stream: {e}"))),
    };
    let mut failure = None;
    for entry in entries {
        let (name, data) = match read_member(entry, limits.max_member_bytes) {
            Ok(Member::Read(name, data)) => (name, data),
            Ok(Member::Other) => continue,
            Ok(Member::TooLarge(name, size)) => {
                // The sample this member belongs to loses it (and so may lack its image or label);
                // tar-rs reads past the member's bytes without keeping them.
                let key = split_key_ext(&name).map_or(name.as_str(), |(k, _)| k);
                counters.record(
                    BadKind::MemberTooLarge,
                    shard,
                    key,
                    &format!(
                        "member {name} claims {size} bytes, above data.max_member_bytes = {}",
                        limits.max_member_bytes
                    ),
                );
                continue;
            }
            Err(detail) => {
                failure = Some(detail);
                break;
            }
        };
        if let Some(grouped) = grouper.push(&name, data) {
            if !handle(grouped) {
                return Members::Stopped;
            }
        }
    }
    if let Some(grouped) = grouper.finish() {
        if !handle(grouped) {
            return Members::Stopped;
        }
    }
    Members::Done(failure)
}

enum Member {
    Read(String, Vec<u8>),
    /// Not a regular file.
    Other,
    /// Its header claims more than the cap: (name, claimed size).
    TooLarge(String, u64),
}

/// One regular member's name and bytes; the failure that ends the shard. The bytes are read as they
/// arrive: the header's size is a cap on the read, never an allocation.
fn read_member<R: Read>(
    entry: std::io::Result<tar::Entry<'_, R>>,
    max_bytes: u64,
) -> Result<Member, String> {
    let mut entry = entry.map_err(|e| format!("corrupt tar header: {e}"))?;
    if !entry.header().entry_type().is_file() {
        return Ok(Member::Other);
    }
    let name = entry
        .path()
        .map_err(|e| format!("unreadable member name: {e}"))?
        .to_string_lossy()
        .into_owned();
    let size = entry.size();
    if size > max_bytes {
        return Ok(Member::TooLarge(name, size));
    }
    let mut data = Vec::with_capacity(size.min(1 << 20) as usize);
    entry
        .read_to_end(&mut data)
        .map_err(|e| format!("member {name}: {e}"))?;
    // tar reads a member through `take(size)`, so a cut-off shard shows up as a short member.
    if data.len() as u64 != size {
        return Err(format!(
            "member {name} truncated: {} of {size} bytes",
            data.len()
        ));
    }
    Ok(Member::Read(name, data))
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
