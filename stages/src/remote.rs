//! Where a shard's bytes come from. A spec is one of webdataset's URL forms:
//!
//! - a local path (the fast path: the file, read as it always was);
//! - `pipe:CMD`: `sh -c CMD`, whose stdout is the shard (`pipe:aws s3 cp s3://bucket/x.tar -`); a
//!   non-zero exit is an error carrying the tail of the command's stderr ([`pipe`]);
//! - `http://…` / `https://…`: one streamed GET, retried with exponential backoff on connection
//!   errors, 5xx and dropped bodies, resumed from the byte already delivered by a `Range` request
//!   ([`http`]; settings in [`retry`]).
//!
//! Every source is read through a [`SourceTally`], which counts bytes, time spent waiting on the
//! source and retries (the stage metrics' per-shard throughput), keeps the first error the source
//! gave, and for remote sources can hash the stream as it passes (the cache's source identity).

pub mod http;
pub mod pipe;
pub mod retry;

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use retry::RetrySettings;

/// What kind of source a (fully expanded) shard spec names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Local,
    Pipe,
    Http,
}

impl Kind {
    pub fn of(spec: &str) -> Kind {
        if spec.starts_with(PIPE_PREFIX) {
            Kind::Pipe
        } else if has_prefix_ignore_case(spec, "http://")
            || has_prefix_ignore_case(spec, "https://")
        {
            Kind::Http
        } else {
            Kind::Local
        }
    }

    pub fn is_remote(self) -> bool {
        self != Kind::Local
    }
}

pub const PIPE_PREFIX: &str = "pipe:";

fn has_prefix_ignore_case(s: &str, prefix: &str) -> bool {
    s.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// What reading one source came to. Shared between the reader (which may sit under a decompressor,
/// out of reach) and whoever reads the shard, who looks at it afterwards.
#[derive(Debug, Default)]
pub struct SourceTally {
    hashing: bool,
    bytes: AtomicU64,
    read_ns: AtomicU64,
    retries: AtomicU64,
    end: Mutex<End>,
    /// When the whole read must be over (`data.shard_timeout_s`), and the limit it came from.
    deadline: Option<(Instant, Duration)>,
}

#[derive(Debug, Default)]
struct End {
    content_hash: Option<String>,
    failure: Option<String>,
    note: Option<String>,
}

impl SourceTally {
    pub fn new() -> Self {
        Self::default()
    }

    /// A tally that also hashes the stream (blake3); the hash exists once the source was read to its
    /// end without an error.
    pub fn hashing() -> Self {
        SourceTally {
            hashing: true,
            ..Self::default()
        }
    }

    /// The same tally with an overall time limit from now: a read after it fails, and a `pipe:`
    /// command still running then is killed.
    pub fn with_deadline(mut self, limit: Option<Duration>) -> Self {
        self.deadline = limit.and_then(|l| Instant::now().checked_add(l).map(|at| (at, l)));
        self
    }

    /// When reading must be over, and the limit it came from.
    pub fn deadline(&self) -> Option<(Instant, Duration)> {
        self.deadline
    }

    /// Bytes the source delivered (before any decompression).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Time spent inside the source's reads: network or command waits and retry backoffs, not the
    /// time the consumer spent between reads.
    pub fn read_time(&self) -> Duration {
        Duration::from_nanos(self.read_ns.load(Ordering::Relaxed))
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    pub fn add_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// blake3 (hex) of every byte, when hashing and the source was read to its end.
    pub fn content_hash(&self) -> Option<String> {
        self.lock().content_hash.clone()
    }

    /// The first error the source itself gave (not a tar or decode problem).
    pub fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    /// Something the source could only say at its end, e.g. a command's stderr after it exited 0:
    /// worth showing next to a shard that turned out short.
    pub fn note(&self) -> Option<String> {
        self.lock().note.clone()
    }

    pub fn set_note(&self, note: String) {
        self.lock().note = Some(note);
    }

    /// Records a failure of the source found outside its reads (a deadline's kill); the first one
    /// stays.
    pub fn set_failure(&self, failure: String) {
        self.lock().failure.get_or_insert(failure);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, End> {
        // The guarded values are plain strings, valid whatever a panicking holder was doing.
        self.end.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts (and optionally hashes) what a source delivers into its tally.
struct Counted<R> {
    inner: R,
    tally: Arc<SourceTally>,
    hasher: Option<blake3::Hasher>,
}

impl<R: Read> Counted<R> {
    fn new(inner: R, tally: Arc<SourceTally>) -> Self {
        let hasher = tally.hashing.then(blake3::Hasher::new);
        Counted {
            inner,
            tally,
            hasher,
        }
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let start = Instant::now();
        // A source that delivers a byte at a time never trips a per-read timeout; the shard's overall
        // limit ends it.
        let result = match self.tally.deadline {
            Some((at, limit)) if start >= at => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the shard took longer than data.shard_timeout_s = {} s to read",
                    limit.as_secs_f64()
                ),
            )),
            _ => self.inner.read(buf),
        };
        let ns = start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.tally.read_ns.fetch_add(ns, Ordering::Relaxed);
        match &result {
            Ok(0) if !buf.is_empty() => {
                if let Some(hasher) = self.hasher.take() {
                    self.tally.lock().content_hash = Some(hasher.finalize().to_hex().to_string());
                }
            }
            Ok(n) => {
                self.tally.bytes.fetch_add(*n as u64, Ordering::Relaxed);
                if let Some(hasher) = &mut self.hasher {
                    hasher.update(&buf[..*n]);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // A failed source never gets a hash: its bytes are not the whole shard.
                self.hasher = None;
                self.tally
                    .lock()
                    .failure
                    .get_or_insert_with(|| e.to_string());
            }
        }
        result
    }
}

/// Opens the bytes of one expanded shard spec, reading retry settings from the environment
/// ([`RetrySettings::from_env`]). Local files are opened directly.
pub fn open_source(spec: &str, tally: Arc<SourceTally>) -> io::Result<Box<dyn Read + Send>> {
    let settings = match Kind::of(spec) {
        Kind::Http => RetrySettings::from_env().map_err(io::Error::other)?,
        _ => RetrySettings::default(),
    };
    open_source_with(spec, &settings, tally)
}

/// [`open_source`] with explicit retry settings.
pub fn open_source_with(
    spec: &str,
    settings: &RetrySettings,
    tally: Arc<SourceTally>,
) -> io::Result<Box<dyn Read + Send>> {
    Ok(match Kind::of(spec) {
        Kind::Local => Box::new(Counted::new(std::fs::File::open(spec)?, tally)),
        Kind::Pipe => {
            let command = &spec[PIPE_PREFIX.len()..];
            let reader = pipe::PipeReader::spawn(command, tally.clone())?;
            Box::new(Counted::new(reader, tally))
        }
        Kind::Http => {
            let reader = http::HttpReader::open(spec, settings, tally.clone())?;
            Box::new(Counted::new(reader, tally))
        }
    })
}

/// Streams a whole source through blake3 without keeping it: (bytes, hex hash). `pipeline precompute
/// --recheck` uses it to verify that a `pipe:` command or URL still gives the bytes it gave, so the
/// size it gave (`expected`) bounds the read: past it the answer is "changed" already, and a source
/// that never ends is dropped there instead of read forever.
pub fn hash_source(
    spec: &str,
    settings: &RetrySettings,
    expected: u64,
) -> io::Result<(u64, String)> {
    let tally = Arc::new(SourceTally::hashing());
    let reader = open_source_with(spec, settings, tally.clone())?;
    let bytes = io::copy(
        &mut reader.take(expected.saturating_add(1)),
        &mut io::sink(),
    )?;
    if bytes > expected {
        // Dropping the reader stops a `pipe:` command.
        return Ok((bytes, "longer than recorded".to_string()));
    }
    let hash = tally
        .content_hash()
        .ok_or_else(|| io::Error::other(format!("{spec}: the stream ended without its end")))?;
    Ok((bytes, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_by_prefix() {
        assert_eq!(Kind::of("/data/a.tar"), Kind::Local);
        assert_eq!(Kind::of("a.tar"), Kind::Local);
        assert_eq!(Kind::of("pipe:cat a.tar"), Kind::Pipe);
        assert_eq!(Kind::of("http://h/a.tar"), Kind::Http);
        assert_eq!(Kind::of("HTTPS://h/a.tar"), Kind::Http);
        assert_eq!(Kind::of("httpx://h/a.tar"), Kind::Local);
        assert!(!Kind::of("/x").is_remote());
    }

    #[test]
    fn counted_reads_count_hash_and_keep_the_first_failure() {
        let data = vec![7u8; 3000];
        let tally = Arc::new(SourceTally::hashing());
        let mut r = Counted::new(&data[..], tally.clone());
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(tally.bytes(), 3000);
        assert_eq!(
            tally.content_hash().unwrap(),
            blake3::hash(&data).to_hex().to_string()
        );

        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("wire cut"))
            }
        }
        let tally = Arc::new(SourceTally::hashing());
        let mut r = Counted::new(Broken, tally.clone());
        assert!(r.read(&mut [0; 8]).is_err());
        assert!(r.read(&mut [0; 8]).is_err());
        assert_eq!(tally.failure().as_deref(), Some("wire cut"));
        assert_eq!(tally.content_hash(), None);
    }
}
