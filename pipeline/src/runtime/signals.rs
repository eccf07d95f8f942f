//! SIGTERM, SIGINT and SIGUSR1 as requests to stop cleanly: the first one is recorded (long jobs poll
//! [`requested`] at a safe point, finish what they are doing and exit); a second one ends the process
//! at once. Schedulers send SIGTERM before killing a job (Kubernetes, SLURM at the time limit) or a
//! chosen signal ahead of it (`sbatch --signal=USR1@120`).

use std::sync::atomic::{AtomicI32, Ordering};

/// The first signal received, 0 while none.
static FIRST: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if FIRST
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // SAFETY: _exit is async-signal-safe and takes no lock; whatever the interrupted code was doing
        // (a libtorch call, a half-written checkpoint temporary) is abandoned, which the atomic
        // writes and `cache gc` are built for.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Installs the handlers (idempotent).
pub fn install() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
        // SAFETY: the handler only touches an atomic and calls _exit, both async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// The signal that asked this process to stop, if one did.
pub fn requested() -> Option<i32> {
    match FIRST.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}

/// The exit status after a clean stop on `sig`: 128 + the signal number, what a shell reports for a
/// process that signal ended, so wrappers and schedulers see "preempted", not "failed".
pub fn exit_status(sig: i32) -> i32 {
    128 + sig
}

/// A job that stopped cleanly because of a signal; `main` exits with [`exit_status`].
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub what: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", name(self.signal), self.what)
    }
}

impl std::error::Error for Interrupted {}
