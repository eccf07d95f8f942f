//! Per-stage metrics: items and bytes out, time busy, time waiting for input (the stage is starved)
//! and time blocked on a full output queue (the next stage is the bottleneck). Together they show which
//! stage starves the GPU: the slow stage is the one busy all the time while its neighbours wait on it.
//! A stage that reads shards also keeps, per shard, the bytes its source delivered, the time spent
//! waiting on the source and the retries it took ([`SourceStats`]), which is what tells a slow bucket
//! or a flaky link from a slow decoder.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
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
    /// Per-shard source reading, for a stage that reads shards; empty otherwise.
    pub source: SourceStats,
}

/// One shard's source reading.
#[derive(Debug, Clone)]
pub struct ShardReadStat {
    pub shard: String,
    pub remote: bool,
    pub bytes: u64,
    /// Time spent inside the source's reads (network, command, disk, retry backoff).
    pub read_time: Duration,
    pub retries: u64,
}

impl ShardReadStat {
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.read_time.as_secs_f64().max(1e-9)
    }
}

/// The shards a stage read, one entry each (a thousand shards are a few tens of KB).
#[derive(Debug, Default)]
pub struct SourceStats {
    shards: Mutex<Vec<ShardReadStat>>,
}

impl SourceStats {
    pub fn record(&self, stat: ShardReadStat) {
        self.lock().push(stat);
    }

    pub fn shards(&self) -> Vec<ShardReadStat> {
        self.lock().clone()
    }

    pub fn retries(&self) -> u64 {
        self.lock().iter().map(|s| s.retries).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ShardReadStat>> {
        self.shards.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `read: 4 shard reads (4 remote), 12.3 MB, 45.6 MB/s; per shard MB/s min 10.1 (x.tar) median 20.0
    /// max 30.5; retries 2 (x.tar 2)`, or `None` when no shard was read.
    pub fn summary(&self, stage: &str) -> Option<String> {
        let mut shards = self.shards();
        if shards.is_empty() {
            return None;
        }
        let bytes: u64 = shards.iter().map(|s| s.bytes).sum();
        let time: f64 = shards.iter().map(|s| s.read_time.as_secs_f64()).sum();
        let remote = shards.iter().filter(|s| s.remote).count();
        let retries: u64 = shards.iter().map(|s| s.retries).sum();
        shards.sort_by(|a, b| a.mb_per_s().total_cmp(&b.mb_per_s()));
        let (slowest, fastest) = (&shards[0], &shards[shards.len() - 1]);
        let median = shards[shards.len() / 2].mb_per_s();
        let mut retried: Vec<&ShardReadStat> = shards.iter().filter(|s| s.retries > 0).collect();
        retried.sort_by_key(|s| std::cmp::Reverse(s.retries));
        let worst: Vec<String> = retried
            .iter()
            .take(3)
            .map(|s| format!("{} {}", s.shard, s.retries))
            .collect();
        Some(format!(
            "{stage}: {} shard reads ({remote} remote), {:.1} MB, {:.1} MB/s; per shard MB/s min {:.1} ({}) \
             median {median:.1} max {:.1}; retries {retries}{}",
            shards.len(),
            bytes as f64 / 1e6,
            bytes as f64 / 1e6 / time.max(1e-9),
            slowest.mb_per_s(),
            slowest.shard,
            fastest.mb_per_s(),
            if worst.is_empty() {
                String::new()
            } else {
                format!(" ({})", worst.join(", "))
            }
        ))
    }
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
            source: SourceStats::default(),
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
    let sources: Vec<String> = stages
        .iter()
        .filter_map(|s| s.source.summary(s.name))
        .collect();
    if !sources.is_empty() {
        out.push_str("source reading (bytes as delivered, time waiting on the source):\n");
        for line in sources {
            out.push_str(&format!("  {line}\n"));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_reports_source_throughput_per_shard_and_retries() {
        let read = std::sync::Arc::new(StageMetrics::new("read", 1));
        let decode = std::sync::Arc::new(StageMetrics::new("decode", 2));
        for (shard, mb, secs, retries) in [
            ("a.tar", 10, 1.0, 0),
            ("b.tar", 10, 4.0, 3),
            ("c.tar", 30, 1.0, 1),
        ] {
            read.source.record(ShardReadStat {
                shard: shard.into(),
                remote: shard != "c.tar",
                bytes: mb * 1_000_000,
                read_time: Duration::from_secs_f64(secs),
                retries,
            });
        }
        let table = summary_table(&[read, decode], Duration::from_secs(10));
        assert!(
            table.contains(
                "read: 3 shard reads (2 remote), 50.0 MB, 8.3 MB/s; per shard MB/s min 2.5 (b.tar) median 10.0 max 30.0; retries 4 (b.tar 3, c.tar 1)"
            ),
            "{table}"
        );
        assert!(!table.contains("decode: "), "{table}");
    }
}
