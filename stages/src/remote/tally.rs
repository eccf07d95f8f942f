//! What reading one source came to, counted as its bytes pass: bytes, time waiting on the source,
//! retries, the first error, and (for remote sources) the blake3 of the stream.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
pub(super) struct Counted<R> {
    inner: R,
    tally: Arc<SourceTally>,
    hasher: Option<blake3::Hasher>,
}

impl<R: Read> Counted<R> {
    pub(super) fn new(inner: R, tally: Arc<SourceTally>) -> Self {
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
