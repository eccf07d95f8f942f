//! Progress display: an indicatif bar on a terminal; elsewhere (CI, SLURM logs, pipes) indicatif draws
//! nothing, so a one-line `tracing` report is logged at a fixed interval instead.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

const LOG_INTERVAL: Duration = Duration::from_secs(10);

pub struct Progress {
    label: String,
    total: u64,
    bar: Option<ProgressBar>,
    started: Instant,
    last_log: Mutex<Instant>,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar
        });
        let now = Instant::now();
        Progress {
            label: label.to_string(),
            total,
            bar,
            started: now,
            last_log: Mutex::new(now),
        }
    }

    /// Reports that `done` items of `total` are finished. Safe to call from many threads.
    pub fn set(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let mut last = self.last_log.lock().expect("progress lock");
        if last.elapsed() >= LOG_INTERVAL {
            *last = Instant::now();
            let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!("{}: {done}/{} ({rate:.1}/s)", self.label, self.total);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let secs = self.started.elapsed().as_secs_f64();
        tracing::info!(
            "{}: {} done in {secs:.1}s ({:.1}/s)",
            self.label,
            self.total,
            self.total as f64 / secs.max(1e-9)
        );
    }
}
