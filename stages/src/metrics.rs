//! Per-stage metrics: items and bytes out, time busy, time waiting for input (the stage is starved)
//! and time blocked on a full output queue (the next stage is the bottleneck). Together they show which
//! stage starves the GPU: the slow stage is the one busy all the time while its neighbours wait on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct StageMetrics {
    pub name: &'static str,
    items: AtomicU64,
    bytes: AtomicU64,
    busy_ns: AtomicU64,
    wait_input_ns: AtomicU64,
    blocked_output_ns: AtomicU64,
    /// Workers in this stage, to turn summed busy time into utilisation.
    pub workers: usize,
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl StageMetrics {
    pub fn new(name: &'static str, workers: usize) -> Self {
        StageMetrics {
            name,
            items: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            wait_input_ns: AtomicU64::new(0),
            blocked_output_ns: AtomicU64::new(0),
            workers: workers.max(1),
        }
    }

    pub fn add_item(&self, bytes: u64) {
        self.items.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_busy(&self, d: Duration) {
        self.busy_ns.fetch_add(ns(d), Ordering::Relaxed);
    }

    pub fn add_wait_input(&self, d: Duration) {
        self.wait_input_ns.fetch_add(ns(d), Ordering::Relaxed);
    }

    pub fn add_blocked_output(&self, d: Duration) {
        self.blocked_output_ns.fetch_add(ns(d), Ordering::Relaxed);
    }

    pub fn items(&self) -> u64 {
        self.items.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed))
    }

    pub fn wait_input(&self) -> Duration {
        Duration::from_nanos(self.wait_input_ns.load(Ordering::Relaxed))
    }

    pub fn blocked_output(&self) -> Duration {
        Duration::from_nanos(self.blocked_output_ns.load(Ordering::Relaxed))
    }

    /// Receives one item, timing the wait.
    pub async fn recv<T>(&self, rx: &async_channel::Receiver<T>) -> Option<T> {
        let start = Instant::now();
        let item = rx.recv().await.ok();
        self.add_wait_input(start.elapsed());
        item
    }

    /// Sends one item, timing how long a full queue blocks; false when the receiver is gone.
    pub async fn send<T>(&self, tx: &async_channel::Sender<T>, item: T, bytes: u64) -> bool {
        let start = Instant::now();
        let ok = tx.send(item).await.is_ok();
        self.add_blocked_output(start.elapsed());
        if ok {
            self.add_item(bytes);
        }
        ok
    }

    /// Blocking-thread form of [`StageMetrics::send`].
    pub fn send_blocking<T>(&self, tx: &async_channel::Sender<T>, item: T, bytes: u64) -> bool {
        let start = Instant::now();
        let ok = tx.send_blocking(item).is_ok();
        self.add_blocked_output(start.elapsed());
        if ok {
            self.add_item(bytes);
        }
        ok
    }
}

/// The end-of-run table: one row per stage.
pub fn summary_table(stages: &[std::sync::Arc<StageMetrics>], elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let mut out = format!(
        "{:<10} {:>9} {:>10} {:>9} {:>9} {:>11} {:>11} {:>14}\n",
        "stage", "items", "MB", "items/s", "busy %", "wait-in %", "blocked %", "busy cpu-s"
    );
    for s in stages {
        let pct = |d: Duration, workers: usize| 100.0 * d.as_secs_f64() / (secs * workers as f64);
        out.push_str(&format!(
            "{:<10} {:>9} {:>10.1} {:>9.1} {:>9.1} {:>11.1} {:>11.1} {:>14.2}\n",
            s.name,
            s.items(),
            s.bytes() as f64 / 1e6,
            s.items() as f64 / secs,
            pct(s.busy(), s.workers),
            pct(s.wait_input(), 1),
            pct(s.blocked_output(), 1),
            s.busy().as_secs_f64(),
        ));
    }
    out
}

/// One line for the progress display: `read 1200 w3% b80% | shuffle … | decode 1100 busy97%`.
pub fn live_line(stages: &[std::sync::Arc<StageMetrics>], elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    stages
        .iter()
        .map(|s| {
            format!(
                "{} {} busy{:.0}% wait{:.0}% blocked{:.0}%",
                s.name,
                s.items(),
                100.0 * s.busy().as_secs_f64() / (secs * s.workers as f64),
                100.0 * s.wait_input().as_secs_f64() / secs,
                100.0 * s.blocked_output().as_secs_f64() / secs
            )
        })
        .collect::<Vec<_>>()
        .join(" | ")
}
