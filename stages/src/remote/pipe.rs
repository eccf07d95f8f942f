//! `pipe:CMD` shards, as in webdataset: `sh -c CMD` runs with its stdout streamed as the shard. The
//! command's exit status is checked when its stdout ends, and a failure carries the last
//! [`STDERR_TAIL`] bytes of its stderr, which is where `aws`, `gsutil` or `curl` say what went wrong.

use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::tally::SourceTally;

/// How much of a command's stderr an error quotes.
pub const STDERR_TAIL: usize = 2048;

/// How long an exited command's stderr may take to close.
const STDERR_WAIT: Duration = Duration::from_secs(5);

/// The command, shared with the deadline's watcher.
struct Shared {
    child: Mutex<Child>,
    /// Reaped or killed by the reader: the watcher leaves it alone.
    done: AtomicBool,
}

pub struct PipeReader {
    command: String,
    shared: Arc<Shared>,
    stdout: Option<ChildStdout>,
    stderr: Option<StderrTail>,
    tally: Arc<SourceTally>,
    finished: bool,
}

impl PipeReader {
    pub fn spawn(command: &str, tally: Arc<SourceTally>) -> io::Result<PipeReader> {
        // A process group of its own: `sh -c` forks the command's processes, and stopping the
        // shard must stop all of them (killing `sh` alone leaves its children holding the pipe).
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::other(format!("pipe:{command}: cannot start sh: {e}")))?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take().map(collect_tail);
        let shared = Arc::new(Shared {
            child: Mutex::new(child),
            done: AtomicBool::new(false),
        });
        if let Some((at, limit)) = tally.deadline() {
            watch(shared.clone(), at, limit, tally.clone());
        }
        Ok(PipeReader {
            command: command.to_string(),
            shared,
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
            .wait_exit()
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

    /// Waits for the command to exit without holding the child's lock across the wait, so the
    /// deadline's watcher can still kill a command that closed its stdout but kept running.
    fn wait_exit(&self) -> io::Result<ExitStatus> {
        loop {
            {
                let mut child = self
                    .shared
                    .child
                    .lock()
                    .map_err(|_| io::Error::other("child lock poisoned"))?;
                if let Some(status) = child.try_wait()? {
                    self.shared.done.store(true, Ordering::SeqCst);
                    return Ok(status);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
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

/// Kills the command at the shard's deadline: a command that hangs without writing blocks our read,
/// which no check between reads can end. Reaping and killing share the child's lock, so the kill can
/// never reach a process that was already waited for.
fn watch(shared: Arc<Shared>, at: Instant, limit: Duration, tally: Arc<SourceTally>) {
    std::thread::spawn(move || {
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        if shared.done.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut child) = shared.child.lock() else {
            return;
        };
        // Reaping happens under this lock and sets `done` first: checked again here, `sh` is unreaped.
        if shared.done.load(Ordering::SeqCst) {
            return;
        }
        // Still being read: `sh` may have exited while a process it started holds the pipe open, so
        // the group goes whether or not `sh` is still there.
        tally.set_failure(format!(
            "killed: the shard took longer than data.shard_timeout_s = {} s to read",
            limit.as_secs_f64()
        ));
        kill_group(&mut child);
    });
}

/// SIGKILL to the command's process group (its id is `sh`'s pid), then to `sh` itself.
fn kill_group(child: &mut Child) {
    if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with a negative pid signals a process group; the group is ours (made at
        // spawn) and its id cannot be reused while `sh`, its leader, is unreaped or any member lives.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
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
        self.shared.done.store(true, Ordering::SeqCst);
        if let Ok(mut child) = self.shared.child.lock() {
            kill_group(&mut child);
            let _ = child.wait();
        }
    }
}
