//! Progress display for every long job: an indicatif bar on a terminal; elsewhere (CI, SLURM logs,
//! pipes) indicatif draws nothing, so a one-line `tracing` report is logged every
//! `PIPELINE_PROGRESS_SECS` seconds (default 10) instead. While a bar is shown, log lines are printed
//! above it ([`suspend`], used by the logging writer), so the two never tear each other.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// The bar on screen, if any: log lines clear it, print, and redraw it.
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Runs `f` (a write to the terminal) with the active bar, if any, cleared around it.
pub fn suspend<T>(f: impl FnOnce() -> T) -> T {
    let bar = ACTIVE.lock().ok().and_then(|a| a.clone());
    match bar {
        Some(bar) => bar.suspend(f),
        None => f(),
    }
}

fn log_interval() -> Duration {
    std::env::var("PIPELINE_PROGRESS_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(10), Duration::from_secs_f64)
}

pub struct Progress {
    label: String,
    /// 0 when the total is not known up front.
    total: u64,
    bar: Option<ProgressBar>,
    started: Instant,
    last_log: Mutex<Instant>,
    done: std::sync::atomic::AtomicU64,
    interval: Duration,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let (bar, template) = if total > 0 {
                (
                    ProgressBar::new(total),
                    "{msg} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
                )
            } else {
                (
                    ProgressBar::new_spinner(),
                    "{msg} {spinner} {pos} {per_sec}",
                )
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            if let Ok(mut active) = ACTIVE.lock() {
                *active = Some(bar.clone());
            }
            bar
        });
        let now = Instant::now();
        Progress {
            label: label.to_string(),
            total,
            bar,
            started: now,
            last_log: Mutex::new(now),
            done: std::sync::atomic::AtomicU64::new(0),
            interval: log_interval(),
        }
    }

    /// Reports that `done` items are finished. Safe to call from many threads.
    pub fn set(&self, done: u64) {
        self.done.store(done, std::sync::atomic::Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let mut last = self.last_log.lock().expect("progress lock");
        if last.elapsed() >= self.interval {
            *last = Instant::now();
            let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            if self.total > 0 {
                tracing::info!("{}: {done}/{} ({rate:.1}/s)", self.label, self.total);
            } else {
                tracing::info!("{}: {done} ({rate:.1}/s)", self.label);
            }
        }
    }

    /// Adds `n` finished items.
    pub fn add(&self, n: u64) {
        let done = self.done.load(std::sync::atomic::Ordering::Relaxed) + n;
        self.set(done);
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            if let Ok(mut active) = ACTIVE.lock() {
                *active = None;
            }
        }
        let secs = self.started.elapsed().as_secs_f64();
        let done = self
            .done
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(self.total);
        tracing::info!(
            "{}: {done} done in {secs:.1}s ({:.1}/s)",
            self.label,
            done as f64 / secs.max(1e-9)
        );
    }
}
