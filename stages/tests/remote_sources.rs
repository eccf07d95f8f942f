//! Shards read from where clusters keep them: over HTTP from a server on 127.0.0.1 that drops a
//! connection mid-body and answers 503 (the bytes still equal the local file's), stays down (an error
//! naming the URL after the retries), or ignores Range; and through `pipe:` commands that succeed,
//! fail or end short.

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stages::bad_input::{BadKind, RunCounters};
use stages::demo::{draw_sample, encode_jpeg};
use stages::metrics::SourceStats;
use stages::remote::{self, RetrySettings, SourceTally};
use stages::wds_reader::{read_shard, read_shard_with, ReadOptions};
use stages::wds_writer::TarShardWriter;
use support::http_server::TestServer;

/// Tiny backoffs keep the fault tests fast; four attempts are enough for the faults injected. Tests
/// that read through `read_shard` (which takes its settings from the environment) call `fast_env`;
/// every test sets the same values, so running in parallel changes nothing.
fn fast_env() {
    std::env::set_var(remote::retry::ENV_ATTEMPTS, "4");
    std::env::set_var(remote::retry::ENV_BACKOFF_MS, "2");
    std::env::set_var(remote::retry::ENV_BACKOFF_MAX_MS, "10");
    assert_eq!(RetrySettings::from_env().unwrap().attempts, 4);
}

fn fast_retries() -> RetrySettings {
    RetrySettings {
        attempts: 4,
        backoff: Duration::from_millis(2),
        backoff_max: Duration::from_millis(10),
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
    }
}

/// A tar shard of `n` samples (JPEG + class), a few hundred KB for n = 40.
fn shard_bytes(n: u64) -> Vec<u8> {
    let mut w = TarShardWriter::new(Vec::new());
    for i in 0..n {
        let jpeg = encode_jpeg(&draw_sample(7, i, (i % 3) as usize), 90, false).unwrap();
        let cls = (i % 3).to_string();
        w.write_sample(
            &format!("s{i:04}"),
            &[("jpg", jpeg.as_slice()), ("cls", cls.as_bytes())],
        )
        .unwrap();
    }
    w.finish().unwrap()
}

/// A sample as (key, members by extension).
type Sample = (String, Vec<(String, Vec<u8>)>);

/// Every sample `spec` yields, with the run's counters.
fn samples(spec: &str) -> (Vec<Sample>, RunCounters) {
    let counters = RunCounters::new();
    let mut out = Vec::new();
    read_shard(spec, &counters, &mut |raw| {
        out.push((raw.key, raw.members));
        true
    });
    (out, counters)
}

fn read_all(spec: &str, settings: &RetrySettings) -> (std::io::Result<Vec<u8>>, Arc<SourceTally>) {
    let tally = Arc::new(SourceTally::new());
    let result = remote::open_source_with(spec, settings, tally.clone()).and_then(|mut r| {
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes).map(|_| bytes)
    });
    (result, tally)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn http_bytes_equal_the_local_file_despite_a_503_and_a_dropped_body() {
    let tmp = tempfile::tempdir().unwrap();
    let local = shard_bytes(40);
    write(tmp.path(), "a-000000.tar", &local);
    let server = TestServer::start(tmp.path());
    let url = server.url("a-000000.tar");

    server.fail_requests(1, 503);
    server.drop_bodies(2);
    let (bytes, tally) = read_all(&url, &fast_retries());
    assert!(bytes.unwrap() == local, "bytes differ from the local file");
    assert_eq!(tally.retries(), 3, "one 503 and two dropped bodies");
    assert_eq!(tally.bytes(), local.len() as u64);
    // The 503, the first GET (cut at half), then resumes from where each cut left off.
    let log = server.requests();
    let half = local.len() / 2;
    assert_eq!(log[0], "GET /a-000000.tar");
    assert_eq!(log[1], "GET /a-000000.tar");
    assert_eq!(log[2], format!("GET /a-000000.tar bytes={half}-"));
    let second_cut = half + (local.len() - half) / 2;
    assert_eq!(log[3], format!("GET /a-000000.tar bytes={second_cut}-"));
    assert_eq!(log.len(), 4, "{log:?}");
}

#[test]
fn samples_over_http_equal_local_ones_with_stats_and_a_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let local = shard_bytes(12);
    let path = write(tmp.path(), "b-000000.tar", &local);
    // gzip over HTTP: sniffing works on a stream that arrives in pieces.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&local).unwrap();
    let gz_bytes = gz.finish().unwrap();
    write(tmp.path(), "b-000001.tar.gz", &gz_bytes);
    let server = TestServer::start(tmp.path());
    fast_env();
    let (expected, _) = samples(&path);
    assert_eq!(expected.len(), 12);

    let stats = SourceStats::default();
    for (name, raw) in [("b-000000.tar", &local), ("b-000001.tar.gz", &gz_bytes)] {
        server.drop_bodies(1);
        let counters = RunCounters::new();
        let mut got = Vec::new();
        let options = ReadOptions {
            stats: Some(&stats),
            hash_remote: true,
            ..ReadOptions::default()
        };
        let read = read_shard_with(&server.url(name), &counters, options, &mut |raw| {
            got.push((raw.key, raw.members));
            true
        });
        assert!(read.keep_going);
        assert!(
            got == expected,
            "{name}: samples differ from the local shard's"
        );
        assert_eq!(counters.total_bad(), 0, "{}", counters.summary_line());
        // The hash covers every byte the server has, tar padding included: the stream was drained.
        assert_eq!(
            read.tally.content_hash().unwrap(),
            blake3::hash(raw).to_hex().to_string()
        );
        assert_eq!(read.tally.bytes(), raw.len() as u64);
    }
    let shards = stats.shards();
    assert_eq!(shards.len(), 2);
    assert!(shards.iter().all(|s| s.remote && s.retries == 1));
    assert_eq!(stats.retries(), 2);
    let line = stats.summary("read").unwrap();
    assert!(
        line.contains("2 shard reads (2 remote)") && line.contains("retries 2"),
        "{line}"
    );
}

#[test]
fn a_server_that_stays_down_is_an_error_naming_the_url() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "c-000000.tar", &shard_bytes(2));
    let server = TestServer::start(tmp.path());
    server.set_down(true);
    let url = server.url("c-000000.tar");
    let started = Instant::now();
    let (result, tally) = read_all(&url, &fast_retries());
    let e = result.unwrap_err().to_string();
    assert!(
        e.contains(&url) && e.contains("giving up after 4 attempts") && e.contains("HTTP 503"),
        "{e}"
    );
    assert_eq!(tally.retries(), 3);
    assert_eq!(server.requests().len(), 4);
    assert!(started.elapsed() < Duration::from_secs(5));

    // Through the reader: counted as an unreadable shard, named, nothing else happens.
    fast_env();
    let (got, counters) = samples(&url);
    assert!(got.is_empty());
    assert_eq!(counters.bad(BadKind::ShardUnreadable), 1);

    // Nobody listening at all.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/c-000000.tar", l.local_addr().unwrap())
    };
    let e = read_all(&closed, &fast_retries())
        .0
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&closed) && e.contains("giving up after 4 attempts"),
        "{e}"
    );
}

#[test]
fn client_errors_are_not_retried_and_a_resume_needs_range() {
    let tmp = tempfile::tempdir().unwrap();
    let local = shard_bytes(6);
    write(tmp.path(), "d-000000.tar", &local);
    let server = TestServer::start(tmp.path());

    let missing = server.url("nope-000000.tar");
    let e = read_all(&missing, &fast_retries())
        .0
        .unwrap_err()
        .to_string();
    assert!(e.contains(&missing) && e.contains("HTTP 404"), "{e}");
    assert_eq!(server.requests().len(), 1, "a 404 is final");

    // A server that ignores Range cannot resume a body already handed on.
    server.set_ignore_range(true);
    server.drop_bodies(1);
    let url = server.url("d-000000.tar");
    let e = read_all(&url, &fast_retries()).0.unwrap_err().to_string();
    assert!(e.contains(&url) && e.contains("ignores Range"), "{e}");

    // Nothing delivered yet: a plain restart is fine, Range or not.
    server.fail_requests(1, 502);
    let (bytes, tally) = read_all(&url, &fast_retries());
    assert!(bytes.unwrap() == local);
    assert_eq!(tally.retries(), 1);
}

#[test]
fn head_gives_validators_and_hash_source_hashes_the_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let local = shard_bytes(3);
    let path = write(tmp.path(), "e-000000.tar", &local);
    let server = TestServer::start(tmp.path());
    let url = server.url("e-000000.tar");
    server.fail_requests(1, 503);
    let v = remote::http::head(&url, &fast_retries()).unwrap();
    assert_eq!(v.content_length, Some(local.len() as u64));
    assert!(
        v.etag.as_deref().is_some_and(|e| e.starts_with('"')),
        "{v:?}"
    );
    assert!(
        v.last_modified
            .as_deref()
            .is_some_and(|m| m.ends_with(" GMT")),
        "{v:?}"
    );
    assert_eq!(
        server.requests(),
        ["HEAD /e-000000.tar", "HEAD /e-000000.tar"]
    );

    let want = (
        local.len() as u64,
        blake3::hash(&local).to_hex().to_string(),
    );
    let n = want.0;
    assert_eq!(remote::hash_source(&url, &fast_retries(), n).unwrap(), want);
    // A stream longer than the size it had is a change, known without reading it all.
    assert_eq!(
        remote::hash_source("pipe:yes", &fast_retries(), n).unwrap(),
        (n + 1, "longer than recorded".to_string())
    );
    let cat = format!("pipe:cat '{path}'");
    assert_eq!(remote::hash_source(&cat, &fast_retries(), n).unwrap(), want);
    assert!(remote::hash_source("pipe:cat /nonexistent/x.tar", &fast_retries(), n).is_err());
}

#[test]
fn pipe_cat_equals_the_local_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), "f-000000.tar", &shard_bytes(8));
    let (expected, _) = samples(&path);
    let (got, counters) = samples(&format!("pipe:cat {path}"));
    assert!(got == expected, "samples differ");
    assert_eq!(counters.total_bad(), 0, "{}", counters.summary_line());
    // Braces and `::` work on commands as on paths.
    let spec = format!(
        "pipe:cat {}/f-{{000000..000000}}.tar :: {path}",
        tmp.path().display()
    );
    let shards = stages::shardspec::expand_shard_spec(&spec).unwrap();
    assert_eq!(shards, [format!("pipe:cat {path}"), path.clone()]);
}

#[test]
fn failing_and_short_commands_name_the_shard_and_quote_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = shard_bytes(8);
    let path = write(tmp.path(), "g-000000.tar", &bytes);

    // Fails before any byte: the shard cannot be opened; the error is the command's.
    let (result, tally) = read_all("pipe:false", &fast_retries());
    let e = result.unwrap_err().to_string();
    assert!(
        e.contains("pipe:false") && e.contains("exit status: 1"),
        "{e}"
    );
    assert_eq!(tally.failure().as_deref(), Some(e.as_str()));

    // Delivers the whole shard, then fails: the exit status is still seen (the stream is drained).
    let spec = format!("pipe:cat {path}; echo 'upload quota exceeded' >&2; exit 3");
    let (got, counters) = samples(&spec);
    assert_eq!(got.len(), 8, "samples read before the failure are kept");
    assert_eq!(counters.bad(BadKind::ShardCorrupt), 1);

    // A long stderr is quoted by its tail.
    let noisy = "pipe:for i in $(seq 1 2000); do echo line-$i >&2; done; exit 2";
    let e = read_all(noisy, &fast_retries()).0.unwrap_err().to_string();
    assert!(
        e.contains("line-2000") && !e.contains("line-1\n") && e.contains('…'),
        "{e}"
    );
    assert!(
        e.len() < remote::pipe::STDERR_TAIL + 200,
        "{} bytes",
        e.len()
    );

    // Ends short with exit 0: a truncated member, reported with the command's stderr.
    let short = format!(
        "pipe:head -c {} {path}; echo 'connection reset' >&2",
        bytes.len() / 2
    );
    let counters = RunCounters::new();
    let read = read_shard_with(&short, &counters, ReadOptions::default(), &mut |_| true);
    assert_eq!(counters.bad(BadKind::ShardCorrupt), 1);
    let note = read.tally.note().unwrap();
    assert!(
        note.contains("exited 0") && note.contains("connection reset"),
        "{note}"
    );
}

#[test]
fn a_command_stopped_early_is_killed_not_waited_for() {
    let counters = RunCounters::new();
    let started = Instant::now();
    // `yes` never ends: the reader must stop it when the consumer stops.
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), "h-000000.tar", &shard_bytes(4));
    let spec = format!("pipe:cat {path}; exec yes");
    let mut seen = 0;
    let keep_going = read_shard(&spec, &counters, &mut |_| {
        seen += 1;
        seen < 2
    });
    assert!(!keep_going);
    assert_eq!(seen, 2);
    assert!(started.elapsed() < Duration::from_secs(10));
}
