//! Sources a hostile or broken party hands us, each bounded in memory and time and each followed by a
//! good shard that must still read: a gzip bomb behind a member header, `pipe:` commands that never
//! end, end short with status 0, hang silently or append junk to a valid tar, and HTTP servers that
//! stream forever, trickle, or splice a replaced file into a resumed download. The cases run in
//! sequence in one test so that the process's peak RSS (VmHWM) is theirs alone.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stages::bad_input::{BadKind, RunCounters};
use stages::demo::{draw_sample, encode_jpeg};
use stages::rng::SplitMix64;
use stages::wds_reader::{read_shard_with, ReadLimits, ReadOptions};
use stages::wds_writer::TarShardWriter;

fn shard_bytes(n: u64) -> Vec<u8> {
    let mut w = TarShardWriter::new(Vec::new());
    for i in 0..n {
        let jpeg = encode_jpeg(&draw_sample(3, i, (i % 3) as usize), 90, false).unwrap();
        w.write_sample(
            &format!("s{i:04}"),
            &[("jpg", jpeg.as_slice()), ("cls", b"1")],
        )
        .unwrap();
    }
    w.finish().unwrap()
}

/// Peak resident set of this process so far, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

struct Outcome {
    keys: Vec<String>,
    counters: RunCounters,
    took: Duration,
    /// What the source itself said went wrong.
    failure: Option<String>,
}

fn read(spec: &str, limits: ReadLimits) -> Outcome {
    let counters = RunCounters::new();
    let mut keys = Vec::new();
    let start = Instant::now();
    let options = ReadOptions {
        limits,
        ..ReadOptions::default()
    };
    let read = read_shard_with(spec, &counters, options, &mut |raw| {
        keys.push(raw.key);
        true
    });
    Outcome {
        keys,
        counters,
        took: start.elapsed(),
        failure: read.tally.failure(),
    }
}

/// Serves every connection with `respond(request head, stream)` until the test ends.
fn serve(respond: impl Fn(&str, &mut TcpStream) + Send + Sync + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let respond = Arc::new(respond);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let respond = respond.clone();
            std::thread::spawn(move || {
                let mut head = String::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                respond(&head, &mut stream);
            });
        }
    });
    format!("http://{addr}/shard.tar")
}

#[test]
fn hostile_sources_end_within_their_budgets() {
    std::env::set_var("PIPELINE_HTTP_ATTEMPTS", "2");
    std::env::set_var("PIPELINE_HTTP_BACKOFF_MS", "2");
    std::env::set_var("PIPELINE_HTTP_READ_TIMEOUT_S", "5");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let good = shard_bytes(6);
    let good_path = dir.join("good.tar");
    std::fs::write(&good_path, &good).unwrap();
    let good_spec = good_path.to_str().unwrap().to_string();
    let tight = ReadLimits {
        max_member_bytes: 1 << 20,
        shard_timeout: Some(Duration::from_secs(2)),
    };
    let baseline = peak_rss();
    let budget = Duration::from_secs(20);
    let check_good_still_reads = |case: &str| {
        let o = read(&good_spec, tight);
        assert_eq!(o.keys.len(), 6, "{case}: the good shard after it");
        assert_eq!(o.counters.total_bad(), 0, "{case}: the good shard after it");
    };

    // 1. A gzip bomb: a member whose header says (and whose bytes are) 300 MB of zeros, ~300 KB on
    // disk, between two good samples. It is counted and skipped without being buffered.
    // Streamed into the compressor: the test itself never holds the 300 MB.
    let bomb = {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        let mut add = |name: &str, data: &mut dyn Read, size: u64| {
            let mut h = tar::Header::new_gnu();
            h.set_size(size);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        let jpeg = encode_jpeg(&draw_sample(3, 0, 0), 90, false).unwrap();
        add("a.jpg", &mut jpeg.as_slice(), jpeg.len() as u64);
        add("a.cls", &mut &b"0"[..], 1);
        add("b.jpg", &mut std::io::repeat(0).take(300 << 20), 300 << 20);
        add("c.jpg", &mut jpeg.as_slice(), jpeg.len() as u64);
        add("c.cls", &mut &b"2"[..], 1);
        b.into_inner().unwrap().finish().unwrap()
    };
    assert!(bomb.len() < 2 << 20, "{} bytes on disk", bomb.len());
    let bomb_path = dir.join("bomb.tar.gz");
    std::fs::write(&bomb_path, &bomb).unwrap();
    for spec in [
        bomb_path.to_str().unwrap().to_string(),
        format!("pipe:cat {}", bomb_path.display()),
    ] {
        let o = read(&spec, tight);
        assert_eq!(o.counters.bad(BadKind::MemberTooLarge), 1, "{spec}");
        assert_eq!(o.keys, ["a", "c"], "{spec}: the samples around the bomb");
        assert!(o.took < budget, "{spec}: {:?}", o.took);
        check_good_still_reads("gzip bomb");
    }

    // 2. Commands that never end, or never stop after a valid archive.
    for (spec, emitted) in [
        ("pipe:yes".to_string(), 0),
        (format!("pipe:cat {} && yes", good_path.display()), 6),
        (
            format!(
                "pipe:cat {} && head -c 50000000 /dev/zero | tr '\\0' x",
                good_path.display()
            ),
            6,
        ),
    ] {
        let o = read(&spec, ReadLimits::default());
        assert_eq!(o.keys.len(), emitted, "{spec}");
        assert_eq!(o.counters.bad(BadKind::ShardCorrupt), 1, "{spec}");
        assert_eq!(
            o.counters.snapshot().shards_read,
            0,
            "{spec}: never a complete shard"
        );
        assert!(o.took < budget, "{spec}: {:?}", o.took);
        check_good_still_reads(&spec);
    }

    // 3. A command that stops at a member boundary and exits 0: what it gave is read, the shard is
    // not complete.
    let boundary = 512
        + good[124..135].iter().fold(0usize, |acc, c| {
            if (b'0'..=b'7').contains(c) {
                acc * 8 + (c - b'0') as usize
            } else {
                acc
            }
        });
    let boundary = boundary.div_ceil(512) * 512;
    let short = format!("pipe:head -c {boundary} {}", good_path.display());
    let o = read(&short, ReadLimits::default());
    assert_eq!(o.counters.bad(BadKind::ShardCorrupt), 1, "{short}");
    assert_eq!(o.counters.snapshot().shards_read, 0, "{short}");
    check_good_still_reads("short pipe");

    // 4. A command that hangs without writing is killed at data.shard_timeout_s.
    let o = read("pipe:sleep 60", tight);
    assert!(o.took < Duration::from_secs(10), "{:?}", o.took);
    assert_eq!(o.counters.total_bad(), 1);
    assert_eq!(o.counters.snapshot().shards_read, 0);
    check_good_still_reads("silent pipe");

    // 5. HTTP: an endless random body, and a valid shard trickled a byte at a time.
    let endless = serve(|_, s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let mut rng = SplitMix64::new(5);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            for word in buf.chunks_exact_mut(8) {
                word.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            if s.write_all(&buf).is_err() {
                return;
            }
        }
    });
    let o = read(&endless, ReadLimits::default());
    assert_eq!(o.counters.bad(BadKind::ShardCorrupt), 1);
    assert!(o.took < budget, "{:?}", o.took);
    check_good_still_reads("endless body");
    let body = good.clone();
    let trickle = serve(move |_, s| {
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(head.as_bytes());
        for b in &body {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let o = read(&trickle, tight);
    assert!(o.took < Duration::from_secs(10), "{:?}", o.took);
    assert_eq!(o.counters.total_bad(), 1);
    assert_eq!(o.counters.snapshot().shards_read, 0);
    check_good_still_reads("trickle");

    // 6. A resume that would splice two versions: the server knows only Last-Modified, the file is
    // replaced after the first body broke off, and the server ignores If-Range. The resume is
    // refused; the request carried If-Range with the date.
    let requests = Arc::new(Mutex::new(Vec::<String>::new()));
    let (old, new) = (
        good.clone(),
        shard_bytes(6).iter().map(|b| b ^ 1).collect::<Vec<_>>(),
    );
    let log = requests.clone();
    let splice = serve(move |head, s| {
        let mut log = log.lock().unwrap();
        log.push(head.to_string());
        let first = log.len() == 1;
        drop(log);
        if first {
            let h = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\nConnection: close\r\n\r\n",
                old.len()
            );
            let _ = s.write_all(h.as_bytes());
            let _ = s.write_all(&old[..old.len() / 2]);
            return;
        }
        let start: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("range: bytes=")
                    .map(str::to_string)
            })
            .and_then(|r| r.trim().trim_end_matches('-').parse().ok())
            .unwrap_or(0);
        let h = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nLast-Modified: Mon, 07 Dec 2026 10:00:00 GMT\r\nConnection: close\r\n\r\n",
            new.len() - start,
            new.len() - 1,
            new.len()
        );
        let _ = s.write_all(h.as_bytes());
        let _ = s.write_all(&new[start..]);
    });
    let o = read(&splice, ReadLimits::default());
    assert_eq!(
        o.counters.snapshot().shards_read,
        0,
        "a spliced shard must not count as read"
    );
    assert_eq!(o.counters.total_bad(), 1);
    let failure = o.failure.unwrap_or_default();
    assert!(failure.contains("changed while it was read"), "{failure}");
    let log = requests.lock().unwrap();
    assert!(
        log.iter().any(|r| r
            .to_ascii_lowercase()
            .contains("if-range: sun, 06 nov 1994 08:49:37 gmt")),
        "{log:?}"
    );
    drop(log);
    check_good_still_reads("splice");

    let grew = peak_rss().saturating_sub(baseline);
    assert!(grew < 200 << 20, "peak RSS grew by {} MB", grew >> 20);
}
