//! `pipe:CMD` shards, as in webdataset: `sh -c CMD` runs with its stdout streamed as the shard. The
//! command's exit status is checked when its stdout ends, and a failure carries the last
//! [`STDERR_TAIL`] bytes of its stderr, which is where `aws`, `gsutil` or `curl` say what went wrong.

use std::io::{self, Read};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::SourceTally;

/// How much of a command's stderr an error quotes.
pub const STDERR_TAIL: usize = 2048;

/// How long an exited command's stderr may take to close.
const STDERR_WAIT: Duration = Duration::from_secs(5);

pub struct PipeReader {
    command: String,
    child: Child,
    stdout: Option<ChildStdout>,
    stderr: Option<StderrTail>,
    tally: Arc<SourceTally>,
    finished: bool,
}

impl PipeReader {
    pub fn spawn(command: &str, tally: Arc<SourceTally>) -> io::Result<PipeReader> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::other(format!("pipe:{command}: cannot start sh: {e}")))?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take().map(collect_tail);
        Ok(PipeReader {
            command: command.to_string(),
            child,
            stdout,
            stderr,
            tally,
            finished: false,
        })
    }

    /// The command closed its stdout: wait for it and turn a failure into the read's error.
    fn finish(&mut self) -> io::Result<()> {
        self.finished = true;
        self.stdout = None;
        let status = self
            .child
            .wait()
            .map_err(|e| io::Error::other(format!("pipe:{}: waiting for it: {e}", self.command)))?;
        let tail = self.stderr_tail();
        if status.success() {
            self.tally.set_note(format!(
                "pipe:{} exited 0{}",
                self.command,
                describe_tail(&tail)
            ));
            return Ok(());
        }
        Err(io::Error::other(format!(
            "pipe:{}: {status}{}",
            self.command,
            describe_tail(&tail)
        )))
    }

    fn stderr_tail(&mut self) -> String {
        // A background process the command left behind may hold stderr open after the command
        // itself exited: quote what arrived rather than wait for it.
        let Some(stderr) = self.stderr.take() else {
            return String::new();
        };
        let _ = stderr.closed.recv_timeout(STDERR_WAIT);
        let (bytes, cut) = stderr
            .tail
            .lock()
            .map(|t| (t.bytes.clone(), t.cut))
            .unwrap_or_default();
        let start = bytes.len().saturating_sub(STDERR_TAIL);
        let text = String::from_utf8_lossy(&bytes[start..]).trim().to_string();
        if cut || start > 0 {
            format!("…{text}")
        } else {
            text
        }
    }
}

/// The last bytes of a command's stderr, collected on a thread of its own: a command that fills the
/// stderr pipe while we wait on stdout would otherwise block forever.
struct StderrTail {
    tail: Arc<Mutex<Tail>>,
    closed: Receiver<()>,
}

#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    /// Earlier bytes were dropped.
    cut: bool,
}

fn collect_tail(mut err: ChildStderr) -> StderrTail {
    let tail = Arc::new(Mutex::new(Tail::default()));
    let (done, closed) = std::sync::mpsc::channel();
    let sink = tail.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            let Ok(mut tail) = sink.lock() else { break };
            tail.bytes.extend_from_slice(&buf[..n]);
            if tail.bytes.len() > 2 * STDERR_TAIL {
                let excess = tail.bytes.len() - STDERR_TAIL;
                tail.bytes.drain(..excess);
                tail.cut = true;
            }
        }
        let _ = done.send(());
    });
    StderrTail { tail, closed }
}

fn describe_tail(tail: &str) -> String {
    if tail.is_empty() {
        ", stderr empty".to_string()
    } else {
        format!(", stderr: {tail}")
    }
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(stdout) = self.stdout.as_mut() else {
            return Ok(0);
        };
        match stdout.read(buf) {
            Ok(0) if !buf.is_empty() => self.finish().map(|()| 0),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => Err(io::Error::other(format!(
                "pipe:{}: reading its stdout: {e}",
                self.command
            ))),
        }
    }
}

impl Drop for PipeReader {
    /// A reader dropped before the end (the consumer had enough, or a signal) stops the command
    /// rather than leaving it blocked on a full pipe; its stderr thread ends with it and is not
    /// waited for, since a grandchild holding stderr open could outlive the kill.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.stdout = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
