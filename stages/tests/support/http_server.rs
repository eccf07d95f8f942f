//! A small HTTP/1.1 file server for tests, on 127.0.0.1 with a port of its own: GET and HEAD of the
//! files in one directory, `Range: bytes=N-` and `N-M`, `If-Range`, ETag and Last-Modified; and
//! faults on demand: cut the next bodies half-way, answer the next requests with a status, stay down,
//! or ignore Range. Every request is logged. Shared by `stages/tests/remote_sources.rs` and the
//! end-to-end `tests/remote_shards.rs` (included there by path).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

pub struct TestServer {
    pub addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    root: PathBuf,
    /// GETs of a body still to be cut half-way.
    drops: AtomicU32,
    /// Requests still to be answered with `fail_status` instead.
    fails: AtomicU32,
    fail_status: AtomicU32,
    /// Every request is answered 503.
    down: AtomicBool,
    /// Range headers are ignored (200 with the whole body).
    ignore_range: AtomicBool,
    stop: AtomicBool,
    log: Mutex<Vec<String>>,
}

/// One parsed request: method, path, and the headers a file server cares about.
struct Request {
    method: String,
    path: String,
    range: Option<String>,
    if_range: Option<String>,
}

impl TestServer {
    /// Serves the files directly in `root` until dropped.
    pub fn start(root: &Path) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(State {
            root: root.to_path_buf(),
            drops: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            fail_status: AtomicU32::new(503),
            down: AtomicBool::new(false),
            ignore_range: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
        });
        let serving = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if serving.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let state = serving.clone();
                std::thread::spawn(move || handle(stream, &state));
            }
        });
        TestServer { addr, state }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// The next `n` GETs with a body send half of it and close the connection.
    pub fn drop_bodies(&self, n: u32) {
        self.state.drops.store(n, Ordering::SeqCst);
    }

    /// The next `n` requests are answered `status` with an empty body.
    pub fn fail_requests(&self, n: u32, status: u16) {
        self.state
            .fail_status
            .store(status as u32, Ordering::SeqCst);
        self.state.fails.store(n, Ordering::SeqCst);
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    pub fn set_ignore_range(&self, ignore: bool) {
        self.state.ignore_range.store(ignore, Ordering::SeqCst);
    }

    /// `METHOD /path [range]` for each request so far, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.state.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn handle(mut stream: TcpStream, state: &State) {
    let Some(request) = read_request(&stream) else {
        return;
    };
    if let Ok(mut log) = state.log.lock() {
        log.push(format!(
            "{} {}{}",
            request.method,
            request.path,
            request
                .range
                .as_ref()
                .map(|r| format!(" {r}"))
                .unwrap_or_default()
        ));
    }
    if state.down.load(Ordering::SeqCst) {
        return respond_empty(&mut stream, 503, "Service Unavailable");
    }
    if take_one(&state.fails) {
        let status = state.fail_status.load(Ordering::SeqCst) as u16;
        return respond_empty(&mut stream, status, "Injected Failure");
    }
    let name = request.path.trim_start_matches('/');
    if name.is_empty() || name.contains('/') || name.contains("..") {
        return respond_empty(&mut stream, 404, "Not Found");
    }
    let path = state.root.join(name);
    let Ok(bytes) = std::fs::read(&path) else {
        return respond_empty(&mut stream, 404, "Not Found");
    };
    let (etag, modified) = validators(&path, bytes.len());
    serve(&mut stream, state, &request, &bytes, &etag, &modified);
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut words = line.split_whitespace();
    let (method, path) = (words.next()?.to_string(), words.next()?.to_string());
    let (mut range, mut if_range) = (None, None);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 || header.trim().is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "range" => range = Some(value.trim().to_string()),
            "if-range" => if_range = Some(value.trim().to_string()),
            _ => {}
        }
    }
    Some(Request {
        method,
        path,
        range,
        if_range,
    })
}

fn validators(path: &Path, len: usize) -> (String, String) {
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    (
        format!("\"{len:x}-{:x}\"", modified.as_nanos()),
        http_date(modified.as_secs()),
    )
}

/// The byte range to send, `None` for the whole body, `Err` when it lies past the end.
fn wanted_range(request: &Request, len: u64, etag: &str) -> Result<Option<(u64, u64)>, ()> {
    let Some(range) = &request.range else {
        return Ok(None);
    };
    if request.if_range.as_deref().is_some_and(|v| v != etag) {
        return Ok(None);
    }
    let Some((start, end)) = range.strip_prefix("bytes=").and_then(|r| r.split_once('-')) else {
        return Ok(None);
    };
    let start: u64 = start.trim().parse().map_err(|_| ())?;
    let end: u64 = match end.trim() {
        "" => len.saturating_sub(1),
        e => e.parse::<u64>().map_err(|_| ())?.min(len.saturating_sub(1)),
    };
    if start >= len || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

fn serve(
    stream: &mut TcpStream,
    state: &State,
    request: &Request,
    bytes: &[u8],
    etag: &str,
    modified: &str,
) {
    let len = bytes.len() as u64;
    let range = if state.ignore_range.load(Ordering::SeqCst) {
        Ok(None)
    } else {
        wanted_range(request, len, etag)
    };
    let (status, body, extra) = match range {
        Err(()) => {
            let head = format!(
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(head.as_bytes());
            return;
        }
        Ok(None) => ("200 OK", bytes, String::new()),
        Ok(Some((start, end))) => (
            "206 Partial Content",
            &bytes[start as usize..=end as usize],
            format!("Content-Range: bytes {start}-{end}/{len}\r\n"),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/x-tar\r\nAccept-Ranges: bytes\r\nETag: {etag}\r\nLast-Modified: {modified}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    if stream.write_all(head.as_bytes()).is_err() || request.method == "HEAD" {
        return;
    }
    let body = if take_one(&state.drops) {
        &body[..body.len() / 2]
    } else {
        body
    };
    let _ = stream.write_all(body);
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

fn respond_empty(stream: &mut TcpStream, status: u16, reason: &str) {
    let _ = stream.write_all(
        format!("HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    // Let the client read the answer before the socket closes under it.
    let mut sink = [0u8; 64];
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(1)));
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.read(&mut sink);
}

/// `Thu, 01 Jan 1970 00:00:00 GMT` (RFC 9110's IMF-fixdate) for seconds since the epoch.
fn http_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let rem = secs % 86_400;
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[test]
fn http_dates_are_imf_fixdates() {
    assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
}
