//! What one shard may cost to read. Its own module below both `config` (which sets the limits from
//! `[data]`) and `wds_reader` (which enforces them), so neither has to import the other.

use std::time::Duration;

/// `data.max_member_bytes`'s default: far above any image of a real dataset (ImageNet's largest JPEG
/// is ~15 MB), far below what a lying header can claim.
pub const DEFAULT_MAX_MEMBER_BYTES: u64 = 256 << 20;

/// `data.shard_timeout_s`'s default.
pub const DEFAULT_SHARD_TIMEOUT_S: f64 = 3600.0;

/// The bounds on what one shard may cost (`data.max_member_bytes`, `data.shard_timeout_s`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReadLimits {
    pub max_member_bytes: u64,
    /// The whole shard's read, on top of the per-read timeouts.
    pub shard_timeout: Option<Duration>,
}

impl ReadLimits {
    /// The limits of `data.max_member_bytes` and `data.shard_timeout_s` (0 seconds: no limit).
    pub fn from_settings(max_member_bytes: u64, shard_timeout_s: f64) -> Self {
        ReadLimits {
            max_member_bytes,
            shard_timeout: (shard_timeout_s > 0.0)
                .then(|| Duration::try_from_secs_f64(shard_timeout_s).ok())
                .flatten(),
        }
    }
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits::from_settings(DEFAULT_MAX_MEMBER_BYTES, DEFAULT_SHARD_TIMEOUT_S)
    }
}
