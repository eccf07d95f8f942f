//! Logging through `tracing`, filtered by `RUST_LOG` (default `info`), always to stderr so stdout stays
//! clean for data a user may pipe; each line is written with the progress bar cleared around it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| AboveTheBar)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// stderr, written with the active progress bar suspended (one event is one write).
struct AboveTheBar;

impl std::io::Write for AboveTheBar {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::runtime::progress::suspend(|| std::io::stderr().write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
