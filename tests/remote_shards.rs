//! Shards from where clusters keep them, end to end: `pipeline precompute` and `pipeline bench decode`
//! over `http://127.0.0.1:PORT/demo-{…}.tar` (a test server that also drops a body and answers 503
//! once) and over `pipe:cat …` give the same cache contents and the same counts as the local files; a
//! second precompute reuses every shard; `--recheck` finds a command whose bytes changed.

mod common;
#[path = "../stages/tests/support/http_server.rs"]
mod http_server;

use common::*;
use http_server::TestServer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const SHARDS: &str = "demo-{000000..000003}.tar";

/// Tiny backoffs: the injected faults cost milliseconds, not the default half second and up.
fn fast_retries(cmd: &mut Command) -> &mut Command {
    cmd.env("PIPELINE_HTTP_ATTEMPTS", "4")
        .env("PIPELINE_HTTP_BACKOFF_MS", "1")
        .env("PIPELINE_HTTP_BACKOFF_MAX_MS", "5")
}

/// Demo shards (4 shards, 2 samples each), tiny encoders and a config pointing at them.
fn setup(tmp: &Path) -> PathBuf {
    demo_data(&tmp.join("data"), 4, 2, 4, 0, &[]);
    tiny_encoders(&tmp.join("enc"));
    let config = tmp.join("c.toml");
    let text = format!(
        "[data]\nimage_size = 32\n\n[precompute]\nencoder = \"{0}/enc/dinov2\"\nvae = \"{0}/enc/vae\"\n\
         batch_size = 2\nchunk_rows = 2\nstore_image = true\nworkers = 2\n",
        tmp.display()
    );
    std::fs::write(&config, text).unwrap();
    config
}

fn precompute(config: &Path, cache: &Path, shards: &str, extra: &[&str]) -> String {
    let mut cmd = pipeline();
    cmd.arg("precompute")
        .arg("--config")
        .arg(config)
        .arg("--cache")
        .arg(cache)
        .args(["--shards", shards])
        .args(extra);
    let out = run_ok(fast_retries(&mut cmd));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fingerprint_dir(cache: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

/// Cache file → (keys, every field's bytes): what training reads, without the footer's provenance
/// (which names the source, and so differs between a local and a remote one).
fn contents(cache: &Path) -> BTreeMap<String, (Vec<String>, Vec<Vec<u8>>)> {
    let dir = fingerprint_dir(cache);
    let manifest = stages::cache::Manifest::load(&dir).unwrap().unwrap();
    manifest
        .shards
        .values()
        .map(|entry| {
            let mut reader = stages::cache::ShardReader::open(&dir.join(&entry.file)).unwrap();
            let names: Vec<String> = reader
                .footer()
                .fields
                .iter()
                .map(|f| f.name.clone())
                .collect();
            let keys = reader.footer().keys.clone();
            let fields = names
                .iter()
                .map(|n| reader.read_field(n).unwrap())
                .collect();
            (entry.file.clone(), (keys, fields))
        })
        .collect()
}

#[test]
fn precompute_over_http_and_pipe_matches_local_and_reuses() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path());
    let data = tmp.path().join("data");
    let local_spec = format!("{}/{SHARDS}", data.display());
    let out = precompute(&config, &tmp.path().join("local"), &local_spec, &[]);
    assert!(
        out.contains("computed 4 shards (8 samples, 16 encodings), reused 0"),
        "{out}"
    );
    let expected = contents(&tmp.path().join("local"));
    assert_eq!(expected.len(), 4);

    // HTTP, with a 503 (on the first HEAD) and a body cut half-way (the first GET) on the way.
    let server = TestServer::start(&data);
    server.fail_requests(1, 503);
    server.drop_bodies(1);
    let http_spec = server.url(SHARDS);
    let http_cache = tmp.path().join("http");
    let out = precompute(&config, &http_cache, &http_spec, &[]);
    assert!(
        out.contains("computed 4 shards (8 samples, 16 encodings), reused 0"),
        "{out}"
    );
    assert!(
        contents(&http_cache) == expected,
        "HTTP cache differs from the local one"
    );
    assert!(
        server.requests().iter().any(|r| r.contains(" bytes=")),
        "no resume: {:?}",
        server.requests()
    );
    // Identified by HEAD validators, with the hash of the streamed bytes recorded.
    let manifest = stages::cache::Manifest::load(&fingerprint_dir(&http_cache))
        .unwrap()
        .unwrap();
    for entry in manifest.shards.values() {
        let remote = entry.source.remote.as_ref().unwrap();
        assert!(remote.spec.starts_with("http://127.0.0.1:") && remote.etag.is_some());
        let bytes = std::fs::read(data.join(&entry.source.name)).unwrap();
        assert_eq!(
            entry.source.content_hash,
            blake3::hash(&bytes).to_hex().to_string()
        );
        assert_eq!(entry.source.size, bytes.len() as u64);
    }
    let out = precompute(&config, &http_cache, &http_spec, &[]);
    assert!(
        out.contains("computed 0 shards (0 samples, 0 encodings), reused 4"),
        "{out}"
    );
    let gets = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET"))
        .count();
    let out = precompute(&config, &http_cache, &http_spec, &["--recheck"]);
    assert!(out.contains("reused 4"), "{out}");
    assert_eq!(
        server
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET"))
            .count(),
        gets + 4,
        "--recheck streams each reused shard once"
    );
    let verify = run_ok(
        pipeline()
            .args(["cache", "verify", "--cache"])
            .arg(&http_cache),
    );
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(
        text.contains("remote source demo-000002.tar: http://127.0.0.1:")
            && text.contains("4 shards checked, 0 bad, 4 from remote sources"),
        "{text}"
    );

    // pipe:cat: same command, same bytes; --recheck notices when that stops being true.
    let pipe_spec = format!("pipe:cat {}/{SHARDS}", data.display());
    let pipe_cache = tmp.path().join("pipe");
    let out = precompute(&config, &pipe_cache, &pipe_spec, &[]);
    assert!(
        out.contains("computed 4 shards (8 samples, 16 encodings), reused 0"),
        "{out}"
    );
    assert!(
        contents(&pipe_cache) == expected,
        "pipe: cache differs from the local one"
    );
    let out = precompute(&config, &pipe_cache, &pipe_spec, &[]);
    assert!(
        out.contains("computed 0 shards (0 samples, 0 encodings), reused 4"),
        "{out}"
    );
    std::fs::copy(data.join("demo-000002.tar"), data.join("demo-000001.tar")).unwrap();
    let out = precompute(&config, &pipe_cache, &pipe_spec, &[]);
    assert!(
        out.contains("reused 4"),
        "without --recheck the command is trusted: {out}"
    );
    let out = precompute(&config, &pipe_cache, &pipe_spec, &["--recheck"]);
    assert!(
        out.contains("computed 1 shards (2 samples, 4 encodings), reused 3"),
        "{out}"
    );
    let verify = run_ok(
        pipeline()
            .args(["cache", "verify", "--cache"])
            .arg(&pipe_cache),
    );
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(
        text.contains("remote source demo-000001.tar: pipe:cat "),
        "{text}"
    );

    // A local cache says nothing about remote sources, and its manifest has no `remote` key.
    let verify = run_ok(
        pipeline()
            .args(["cache", "verify", "--cache"])
            .arg(tmp.path().join("local")),
    );
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(
        text.contains("0 from remote sources") && !text.contains("remote source "),
        "{text}"
    );
    let raw =
        std::fs::read_to_string(fingerprint_dir(&tmp.path().join("local")).join("manifest.json"))
            .unwrap();
    assert!(!raw.contains("\"remote\""), "{raw}");
}

#[test]
fn a_remote_shard_that_fails_is_not_recorded_and_is_read_again() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path());
    let data = tmp.path().join("data");
    let server = TestServer::start(&data);
    let cache = tmp.path().join("cache");
    // Shard 3 is a command that delivers the shard and then fails.
    let spec = format!(
        "{} :: pipe:cat {}/demo-000003.tar; exit 7",
        server.url("demo-{000000..000002}.tar"),
        data.display()
    );
    let mut cmd = pipeline();
    cmd.arg("precompute")
        .arg("--config")
        .arg(&config)
        .arg("--cache")
        .arg(&cache)
        .args(["--shards", &spec, "--set", "data.max_bad_fraction=0.5"]);
    let out = fast_retries(&mut cmd).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("computed 3 shards"), "{stdout}");
    assert!(
        stderr.contains("exit status: 7") && stderr.contains("not recorded"),
        "{stderr}"
    );
    let manifest = stages::cache::Manifest::load(&fingerprint_dir(&cache))
        .unwrap()
        .unwrap();
    assert_eq!(manifest.missing(), ["demo-000003.tar"]);
    // The rerun reuses the three and reads the failed one again.
    let out = precompute(
        &config,
        &cache,
        &spec,
        &["--set", "data.max_bad_fraction=0.5"],
    );
    // (The failing shard is encoded again and dropped again, so only the counts of shards say it.)
    assert!(
        out.contains("computed 0 shards") && out.contains("reused 3"),
        "{out}"
    );
}

/// `bench decode: read good …` and `bench decode: N images` lines of one run.
fn bench_counts(spec: &str) -> (Vec<String>, String) {
    let mut cmd = pipeline();
    cmd.current_dir(repo_root()).args([
        "bench",
        "decode",
        "--shards",
        spec,
        "--size",
        "32",
        "--threads",
        "2",
        "--repeats",
        "1",
        "--python",
        "none",
    ]);
    let out = run_ok(fast_retries(&mut cmd));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let counts = text
        .lines()
        .filter(|l| l.starts_with("bench decode: "))
        .map(|l| l.split(", mean").next().unwrap_or(l).to_string())
        .collect();
    (counts, text)
}

#[test]
fn bench_decode_over_http_and_pipe_counts_like_local() {
    let tmp = tempfile::tempdir().unwrap();
    demo_data(tmp.path(), 2, 6, 2, 0, &["--odd"]);
    let spec = |prefix: &str| format!("{prefix}demo-{{000000..000001}}.tar");
    let (local, _) = bench_counts(&spec(&format!("{}/", tmp.path().display())));
    assert_eq!(local.len(), 2, "{local:?}");
    assert!(
        local[0].contains("bad "),
        "the odd members are counted: {local:?}"
    );

    let server = TestServer::start(tmp.path());
    server.drop_bodies(1);
    let (http, text) = bench_counts(&spec(&format!("http://{}/", server.addr)));
    assert_eq!(http, local);
    // The stream's source line: every shard read was remote (the stream may pass over the shards
    // more than once to fill its sample count).
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("read: "))
        .unwrap_or_else(|| panic!("no source line in:\n{text}"));
    let reads = line.split_whitespace().nth(1).unwrap();
    assert!(
        text.contains("source reading") && line.contains(&format!("shard reads ({reads} remote)")),
        "{text}"
    );

    let (pipe, _) = bench_counts(&spec(&format!("pipe:cat {}/", tmp.path().display())));
    assert_eq!(pipe, local);
}
