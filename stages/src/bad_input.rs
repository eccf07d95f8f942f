//! Bad input, counted by kind. Every bad sample or shard is counted exactly once and logged once, with
//! its shard and key, at the stage that finds it; `--max-bad-fraction` turns too many into an error.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BadKind {
    /// An image member of zero bytes.
    EmptyImage,
    /// A JPEG or PNG that ends before its end marker.
    TruncatedImage,
    /// Bytes in no image format we know (sniffed by content, whatever the extension says).
    GarbageImage,
    /// A JPEG or PNG whose data the decoder rejects.
    UndecodableImage,
    /// Width × height above `data.max_pixels`, rejected from the header before any allocation.
    DecompressionBomb,
    /// A sample with none of the `data.image_keys` members.
    NoImage,
    MissingLabel,
    /// A label member that is not a non-negative integer (or the JSON field is absent / not one).
    BadLabel,
    /// The same extension twice within one key: webdataset raises for this sample.
    DuplicateMember,
    /// A key that reappears after other keys in the same shard: its members were not adjacent.
    SplitKey,
    /// A shard that ended early or holds a corrupt header: what was read before is kept.
    ShardCorrupt,
    /// A shard path that cannot be opened.
    ShardUnreadable,
    /// A tar member larger than `data.max_member_bytes`: skipped without being buffered.
    MemberTooLarge,
}

impl BadKind {
    pub const ALL: [BadKind; 13] = [
        BadKind::EmptyImage,
        BadKind::TruncatedImage,
        BadKind::GarbageImage,
        BadKind::UndecodableImage,
        BadKind::DecompressionBomb,
        BadKind::NoImage,
        BadKind::MissingLabel,
        BadKind::BadLabel,
        BadKind::DuplicateMember,
        BadKind::SplitKey,
        BadKind::ShardCorrupt,
        BadKind::ShardUnreadable,
        BadKind::MemberTooLarge,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BadKind::EmptyImage => "empty_image",
            BadKind::TruncatedImage => "truncated_image",
            BadKind::GarbageImage => "garbage_image",
            BadKind::UndecodableImage => "undecodable_image",
            BadKind::DecompressionBomb => "decompression_bomb",
            BadKind::NoImage => "no_image",
            BadKind::MissingLabel => "missing_label",
            BadKind::BadLabel => "bad_label",
            BadKind::DuplicateMember => "duplicate_member",
            BadKind::SplitKey => "split_key",
            BadKind::ShardCorrupt => "shard_corrupt",
            BadKind::ShardUnreadable => "shard_unreadable",
            BadKind::MemberTooLarge => "member_too_large",
        }
    }

    fn index(self) -> usize {
        BadKind::ALL
            .iter()
            .position(|k| *k == self)
            .expect("every kind is in ALL")
    }
}

/// Counters of one run: good samples, bad ones by kind, shards read. Shared by all stages.
#[derive(Debug, Default)]
pub struct RunCounters {
    good: AtomicU64,
    shards_read: AtomicU64,
    bad: [AtomicU64; BadKind::ALL.len()],
}

impl RunCounters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts and logs one bad sample or shard. `key` is `-` for shard-level problems.
    pub fn record(&self, kind: BadKind, shard: &str, key: &str, detail: &str) {
        self.bad[kind.index()].fetch_add(1, Ordering::Relaxed);
        tracing::warn!(kind = kind.name(), "shard {shard}: key {key}: {detail}");
    }

    pub fn add_good(&self, n: u64) {
        self.good.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_shard(&self) {
        self.shards_read.fetch_add(1, Ordering::Relaxed);
    }

    pub fn good(&self) -> u64 {
        self.good.load(Ordering::Relaxed)
    }

    pub fn bad(&self, kind: BadKind) -> u64 {
        self.bad[kind.index()].load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> CountsSnapshot {
        CountsSnapshot {
            good: self.good(),
            shards_read: self.shards_read.load(Ordering::Relaxed),
            bad: BadKind::ALL
                .iter()
                .map(|k| (k.name().to_string(), self.bad(*k)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }

    pub fn total_bad(&self) -> u64 {
        BadKind::ALL.iter().map(|k| self.bad(*k)).sum()
    }

    /// Bad over (good + bad); a shard-level failure counts as one bad item.
    pub fn bad_fraction(&self) -> f64 {
        let bad = self.total_bad();
        let total = bad + self.good();
        if total == 0 {
            0.0
        } else {
            bad as f64 / total as f64
        }
    }

    /// An error with the whole summary when the bad fraction exceeds `max`.
    pub fn check_bad_fraction(&self, max: f64) -> crate::Result<()> {
        let fraction = self.bad_fraction();
        // Written so that a NaN limit (or fraction) trips the guard instead of silently passing it.
        if fraction.is_nan() || max.is_nan() || fraction > max {
            return Err(crate::Error::Invalid(format!(
                "bad-input fraction {fraction:.4} exceeds the limit {max} ({}); see the warnings above for shard and key of each",
                self.summary_line()
            )));
        }
        Ok(())
    }

    /// `good 1998, bad 6 (truncated_image 2, garbage_image 2, ...)`.
    pub fn summary_line(&self) -> String {
        let kinds: Vec<String> = BadKind::ALL
            .iter()
            .filter(|k| self.bad(**k) > 0)
            .map(|k| format!("{} {}", k.name(), self.bad(*k)))
            .collect();
        format!(
            "good {}, bad {}{}",
            self.good(),
            self.total_bad(),
            if kinds.is_empty() {
                String::new()
            } else {
                format!(" ({})", kinds.join(", "))
            }
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CountsSnapshot {
    pub good: u64,
    pub shards_read: u64,
    pub bad: Vec<(String, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_counts_shard_failures_and_checks_the_limit() {
        let c = RunCounters::new();
        c.add_good(98);
        c.record(BadKind::GarbageImage, "s.tar", "k1", "x");
        c.record(BadKind::ShardUnreadable, "t.tar", "-", "y");
        assert_eq!(c.total_bad(), 2);
        assert!((c.bad_fraction() - 0.02).abs() < 1e-12);
        assert!(c.check_bad_fraction(0.05).is_ok());
        let err = c.check_bad_fraction(0.01).unwrap_err().to_string();
        assert!(
            err.contains("garbage_image 1") && err.contains("shard_unreadable 1"),
            "{err}"
        );
        assert!(
            c.check_bad_fraction(f64::NAN).is_err(),
            "a NaN limit is no limit"
        );
        assert!(RunCounters::new().check_bad_fraction(0.0).is_ok());
    }
}
