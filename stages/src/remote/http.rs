//! `http://` and `https://` shards: one GET whose body is handed on as it arrives, never buffered
//! whole. Connection errors, timeouts, 5xx (and 408/429) are retried with exponential backoff
//! ([`RetrySettings`]). A body that breaks off is resumed with `Range: bytes=N-` from the first byte
//! not yet delivered, with `If-Range` naming the version being read, so a shard replaced meanwhile is
//! an error rather than a splice of two versions; a server that answers a resume with the whole body
//! (it ignores `Range`) is an error too, since the bytes already handed on cannot be taken back.
//!
//! [`head`] gives the validators (ETag, Last-Modified, Content-Length) the cache identifies a remote
//! shard by without downloading it.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use ureq::http::{HeaderMap, Response};
use ureq::{Agent, Body, BodyReader};

use super::retry::RetrySettings;
use super::tally::SourceTally;

/// What a HEAD request says about a remote shard's version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub content_length: Option<u64>,
}

/// One attempt's outcome when it is not a response to use.
enum Failed {
    /// Worth another try after a pause.
    Retry(String),
    /// Another try would give the same answer.
    Fatal(String),
}

/// One agent per process (and settings), so HEADs of a thousand shards on one host reuse
/// connections and TLS sessions.
fn agent(settings: &RetrySettings) -> Agent {
    static AGENT: Mutex<Option<(RetrySettings, Agent)>> = Mutex::new(None);
    let mut cached = AGENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((s, agent)) = cached.as_ref() {
        if s == settings {
            return agent.clone();
        }
    }
    let agent = Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(settings.connect_timeout))
        .timeout_recv_response(Some(settings.read_timeout))
        .timeout_per_read(Some(settings.read_timeout))
        .build()
        .new_agent();
    *cached = Some((settings.clone(), agent.clone()));
    agent
}

fn classify(e: ureq::Error) -> Failed {
    match e {
        ureq::Error::Io(_)
        | ureq::Error::Timeout(_)
        | ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed
        | ureq::Error::Protocol(_) => Failed::Retry(e.to_string()),
        other => Failed::Fatal(other.to_string()),
    }
}

/// A status that is not the answer wanted: retry the server's transient ones, give up on the rest.
fn bad_status(status: u16) -> Failed {
    let text = format!(
        "HTTP {status}{}",
        ureq::http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .map(|r| format!(" {r}"))
            .unwrap_or_default()
    );
    if status >= 500 || status == 408 || status == 429 {
        Failed::Retry(text)
    } else {
        Failed::Fatal(text)
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    header(headers, "content-length").and_then(|v| v.parse().ok())
}

/// `Content-Range: bytes START-END/TOTAL` → (START, TOTAL if known).
fn content_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let value = header(headers, "content-range")?;
    let rest = value.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let start = range.split_once('-')?.0.trim().parse().ok()?;
    Some((start, total.trim().parse().ok()))
}

/// Runs `attempt` until it succeeds, fails for good, or `settings.attempts` tries have failed;
/// backs off between tries and counts each retry in `tally`.
fn with_retries<T>(
    url: &str,
    settings: &RetrySettings,
    tally: Option<&SourceTally>,
    failures: &mut u32,
    mut attempt: impl FnMut() -> Result<T, Failed>,
) -> io::Result<T> {
    loop {
        match attempt() {
            Ok(v) => return Ok(v),
            Err(Failed::Fatal(why)) => return Err(io::Error::other(format!("{url}: {why}"))),
            Err(Failed::Retry(why)) => back_off(url, settings, tally, failures, &why)?,
        }
    }
}

/// One more failure: an error once the attempts are spent, else a pause before the next try.
fn back_off(
    url: &str,
    settings: &RetrySettings,
    tally: Option<&SourceTally>,
    failures: &mut u32,
    why: &str,
) -> io::Result<()> {
    *failures += 1;
    if *failures >= settings.attempts {
        return Err(io::Error::other(format!(
            "{url}: giving up after {} attempts: {why}",
            settings.attempts
        )));
    }
    if let Some(tally) = tally {
        tally.add_retry();
    }
    let delay = settings.delay(*failures - 1);
    tracing::warn!(
        "{url}: {why}; retry {} of {} in {:.2} s",
        *failures,
        settings.attempts - 1,
        delay.as_secs_f64()
    );
    std::thread::sleep(delay);
    Ok(())
}

/// The validators of a remote shard, from a HEAD request (retried like a read).
pub fn head(url: &str, settings: &RetrySettings) -> io::Result<Validators> {
    let agent = agent(settings);
    let mut failures = 0;
    with_retries(url, settings, None, &mut failures, || {
        let response = agent.head(url).call().map_err(classify)?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(bad_status(status));
        }
        let headers = response.headers();
        Ok(Validators {
            etag: header(headers, "etag"),
            last_modified: header(headers, "last-modified"),
            content_length: content_length(headers),
        })
    })
}

/// A shard streamed over HTTP, resumed where it broke off.
pub struct HttpReader {
    url: String,
    agent: Agent,
    settings: RetrySettings,
    tally: Arc<SourceTally>,
    body: Option<BodyReader<'static>>,
    /// Bytes handed on so far: where a resume starts.
    delivered: u64,
    /// The shard's full length, when the server said.
    expected: Option<u64>,
    /// The first response's strong ETag, else its Last-Modified: sent as `If-Range` when resuming.
    version: Option<String>,
    /// The first response's validators, which every 206 must repeat where it states them.
    first: Validators,
    /// Failures since bytes last arrived: the retry budget restarts whenever the body makes progress.
    failures: u32,
}

impl HttpReader {
    /// Sends the GET (with retries); errors name the URL.
    pub fn open(url: &str, settings: &RetrySettings, tally: Arc<SourceTally>) -> io::Result<Self> {
        let mut reader = HttpReader {
            url: url.to_string(),
            agent: agent(settings),
            settings: settings.clone(),
            tally,
            body: None,
            delivered: 0,
            expected: None,
            version: None,
            first: Validators::default(),
            failures: 0,
        };
        reader.connect()?;
        Ok(reader)
    }

    fn connect(&mut self) -> io::Result<()> {
        let (url, settings) = (self.url.clone(), self.settings.clone());
        let tally = self.tally.clone();
        let mut failures = self.failures;
        let body = with_retries(&url, &settings, Some(&tally), &mut failures, || {
            self.request()
        });
        self.failures = failures;
        self.body = Some(body?);
        Ok(())
    }

    fn request(&mut self) -> Result<BodyReader<'static>, Failed> {
        let mut request = self.agent.get(&self.url);
        if self.delivered > 0 {
            request = request.header("Range", format!("bytes={}-", self.delivered));
            if let Some(version) = &self.version {
                request = request.header("If-Range", version.as_str());
            }
        }
        let response = request.call().map_err(classify)?;
        match response.status().as_u16() {
            200 if self.delivered == 0 => self.accept_whole(&response),
            200 => {
                return Err(Failed::Fatal(format!(
                    "answered a resume from byte {} with the whole body: the server ignores Range \
                     or the shard changed while it was read; {} bytes were already handed on, so \
                     reading cannot restart",
                    self.delivered, self.delivered
                )))
            }
            206 => self.accept_part(&response)?,
            status => return Err(bad_status(status)),
        }
        Ok(response.into_body().into_reader())
    }

    fn accept_whole(&mut self, response: &Response<Body>) {
        let headers = response.headers();
        self.expected = content_length(headers);
        self.first = Validators {
            etag: header(headers, "etag"),
            last_modified: header(headers, "last-modified"),
            content_length: self.expected,
        };
        // A weak ETag cannot be used in If-Range (RFC 9110 §13.1.5); a date can, and without it a
        // server holding only Last-Modified would splice a replaced file into the old one's start.
        self.version = self
            .first
            .etag
            .clone()
            .filter(|e| !e.starts_with("W/"))
            .or_else(|| self.first.last_modified.clone());
    }

    fn accept_part(&mut self, response: &Response<Body>) -> Result<(), Failed> {
        // A server (or a cache in front of it) that ignores If-Range could still send a part of another
        // version: where the part states a validator, it must be the first response's.
        let headers = response.headers();
        for (name, first) in [
            ("etag", &self.first.etag),
            ("last-modified", &self.first.last_modified),
        ] {
            if let (Some(now), Some(before)) = (header(headers, name), first) {
                if &now != before {
                    return Err(Failed::Fatal(format!(
                        "the shard changed while it was read: the resume at byte {} came with \
                         {name} {now:?}, the first response had {before:?}; {} bytes of the old \
                         version were already handed on",
                        self.delivered, self.delivered
                    )));
                }
            }
        }
        match content_range(headers) {
            Some((start, total)) if start == self.delivered => {
                if let (Some(total), Some(first)) = (total, self.first.content_length) {
                    if total != first {
                        return Err(Failed::Fatal(format!(
                            "the shard changed while it was read: {first} bytes at first, {total} \
                             in the resume's Content-Range"
                        )));
                    }
                }
                self.expected = total.or(self.expected);
                Ok(())
            }
            other => Err(Failed::Fatal(format!(
                "asked to resume at byte {} but got Content-Range {other:?}",
                self.delivered
            ))),
        }
    }

    /// The body broke off: note why, back off (or give up), and reconnect on the next read.
    fn dropped(&mut self, why: String) -> io::Result<()> {
        self.body = None;
        let tally = self.tally.clone();
        back_off(
            &self.url,
            &self.settings,
            Some(&tally),
            &mut self.failures,
            &why,
        )
    }

    fn short(&self) -> bool {
        self.expected.is_some_and(|e| self.delivered < e)
    }
}

impl Read for HttpReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.body.is_none() {
                self.connect()?;
            }
            let Some(body) = self.body.as_mut() else {
                continue;
            };
            match body.read(buf) {
                Ok(0) if self.short() => {
                    let why = format!(
                        "connection closed after {} of {} bytes",
                        self.delivered,
                        self.expected.unwrap_or(0)
                    );
                    self.dropped(why)?;
                }
                Ok(0) => return Ok(0),
                Ok(n) => {
                    self.delivered += n as u64;
                    self.failures = 0;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let why = format!("body broke off after {} bytes: {e}", self.delivered);
                    self.dropped(why)?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn content_range_and_length_parse() {
        let h = headers(&[
            ("content-range", "bytes 100-199/200"),
            ("content-length", "100"),
        ]);
        assert_eq!(content_range(&h), Some((100, Some(200))));
        assert_eq!(content_length(&h), Some(100));
        let h = headers(&[("content-range", "bytes 5-9/*")]);
        assert_eq!(content_range(&h), Some((5, None)));
        assert_eq!(content_range(&headers(&[("content-range", "junk")])), None);
        assert_eq!(content_length(&headers(&[("content-length", "x")])), None);
    }

    #[test]
    fn transient_statuses_are_retried_and_the_rest_are_not() {
        for status in [500, 502, 503, 504, 408, 429] {
            assert!(matches!(bad_status(status), Failed::Retry(_)), "{status}");
        }
        for status in [400, 403, 404, 416] {
            assert!(matches!(bad_status(status), Failed::Fatal(_)), "{status}");
        }
        match bad_status(503) {
            Failed::Retry(text) => assert_eq!(text, "HTTP 503 Service Unavailable"),
            Failed::Fatal(text) => panic!("{text}"),
        }
    }
}
