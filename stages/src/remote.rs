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
mod tally;

use std::io::{self, Read};
use std::sync::Arc;

pub use retry::RetrySettings;
use tally::Counted;
pub use tally::SourceTally;

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
