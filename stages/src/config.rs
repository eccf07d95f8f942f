//! The `[data]` section of a run's configuration: where samples come from and how they are read.

use serde::{Deserialize, Serialize};

use crate::crop::{CropMode, ResizeImpl};
use crate::label::LabelSource;
use crate::limits::{ReadLimits, DEFAULT_MAX_MEMBER_BYTES, DEFAULT_SHARD_TIMEOUT_S};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Shard spec: brace patterns, globs, `::`-joined lists or `@list.txt`.
    pub shards: String,
    /// Seed of every shuffle; the same seed and shards give the same sample order.
    pub seed: u64,
    /// Output side length of the square crop.
    pub image_size: usize,
    pub crop: CropMode,
    /// `pillow` is bit-exact with Pillow 13 (and the fastest: region decode, SIMD kernels); `fast`
    /// (fast_image_resize on whole images) is within ~5 levels, kept for comparison.
    pub resize_impl: ResizeImpl,
    /// `exact` decodes at full size; `dct` decodes JPEGs at 1/2, 1/4 or 1/8 scale when the source is
    /// that much larger than needed (Pillow's `draft()`): faster, not reference-exact.
    pub decode_scale: DecodeScale,
    /// Also emit the horizontally flipped crop as a second view.
    pub flip: bool,
    /// Members tried for the image, first present wins (webdataset's `"jpg;png"`).
    pub image_keys: Vec<String>,
    pub label: LabelSource,
    /// Field of the `.json` member holding the class index when `label = "json"`.
    pub label_json_field: String,
    /// Shuffle the shard list per (seed, epoch) before splitting it across ranks.
    pub shard_shuffle: bool,
    /// Sample shuffle buffer size (0 = no sample shuffle) and the fill before the first output.
    pub shuffle_buffer: usize,
    pub shuffle_initial: usize,
    /// When > 0 every rank yields exactly this many samples per epoch (DDP needs equal counts): it stops
    /// early or starts over on its shards.
    pub samples_per_rank: u64,
    /// Decompression-bomb limit: images with more pixels are rejected from their header.
    pub max_pixels: u64,
    /// Tar members larger than this (bytes, as their header says) are counted as
    /// `member_too_large` and skipped without being buffered.
    pub max_member_bytes: u64,
    /// Seconds one shard may take to read, on top of the per-read timeouts (a source that trickles
    /// bytes forever ends here); 0 = no limit.
    pub shard_timeout_s: f64,
    /// Abort when bad samples / all samples exceeds this.
    pub max_bad_fraction: f64,
    /// Decode/crop threads; 0 = one per core.
    pub threads: usize,
    /// Capacity of every queue between stages.
    pub queue_depth: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodeScale {
    Exact,
    Dct,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            shards: String::new(),
            seed: 0,
            image_size: 256,
            crop: CropMode::Adm,
            resize_impl: ResizeImpl::Pillow,
            decode_scale: DecodeScale::Exact,
            flip: false,
            image_keys: vec!["jpg".into(), "jpeg".into(), "png".into()],
            label: LabelSource::Cls,
            label_json_field: "label".into(),
            shard_shuffle: true,
            shuffle_buffer: 1000,
            shuffle_initial: 100,
            samples_per_rank: 0,
            max_pixels: 64_000_000,
            max_member_bytes: DEFAULT_MAX_MEMBER_BYTES,
            shard_timeout_s: DEFAULT_SHARD_TIMEOUT_S,
            max_bad_fraction: 0.01,
            threads: 0,
            queue_depth: 64,
        }
    }
}

impl DataConfig {
    /// How the data stages read a shard under these settings.
    pub fn read_limits(&self) -> ReadLimits {
        ReadLimits::from_settings(self.max_member_bytes, self.shard_timeout_s)
    }

    pub fn resolved_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }

    pub fn validate(&self) -> crate::Result<()> {
        let fail = |m: String| Err(crate::Error::Invalid(m));
        if self.image_size == 0 {
            return fail("data.image_size must be positive".into());
        }
        if self.image_keys.is_empty() {
            return fail("data.image_keys must name at least one extension".into());
        }
        if self.max_member_bytes == 0 {
            return fail("data.max_member_bytes must be positive".into());
        }
        if !(self.shard_timeout_s.is_finite() && self.shard_timeout_s >= 0.0) {
            return fail(format!(
                "data.shard_timeout_s {} is not a number of seconds >= 0",
                self.shard_timeout_s
            ));
        }
        if !(0.0..=1.0).contains(&self.max_bad_fraction) {
            return fail(format!(
                "data.max_bad_fraction {} is not in [0, 1]",
                self.max_bad_fraction
            ));
        }
        if self.queue_depth == 0 {
            return fail("data.queue_depth must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_read_limits_are_those_of_the_default_data_section() {
        assert_eq!(DataConfig::default().read_limits(), ReadLimits::default());
        assert_eq!(
            ReadLimits::default().shard_timeout,
            Some(std::time::Duration::from_secs(3600))
        );
    }
}
