//! The `[precompute]` section: what the precompute job stores and how fast it runs. Which of these
//! settings name a cache (and which only change speed) is `precompute::settings`' business.

use std::path::Path;

use anyhow::bail;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureDType {
    F16,
    Bf16,
    /// int8 with one f32 scale per token (`features_scale`).
    I8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatentDType {
    F16,
    F32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrecomputeConfig {
    /// Cache root; one sub-directory per fingerprint.
    pub cache: String,
    /// DINOv2 folder (Hugging Face layout); empty = no features.
    pub encoder: String,
    /// Side DINOv2 sees, in pixels: 224 gives DINOv2-B/14 16×16 tokens (REPA's); 448 gives 32×32, the
    /// grid of a patch-1 latent flow at 256 px (`align.token_match = "encoder_resize"`). The crop is
    /// resized to it bicubically and the position table interpolated.
    pub encoder_input_size: i64,
    /// AutoencoderKL folder (diffusers layout); empty = no latents.
    pub vae: String,
    /// Images per encoder batch (views count separately: a batch runs batch_size × views images).
    pub batch_size: usize,
    /// auto, cpu, cuda or cuda:N.
    pub device: String,
    /// Also cache the horizontally flipped crop as view 1.
    pub flip: bool,
    pub features_dtype: FeatureDType,
    pub vae_dtype: LatentDType,
    /// Store the uint8 crop (view 0) too: pixel-space training and FID reference statistics.
    pub store_image: bool,
    /// Samples per zstd chunk in a cache shard.
    pub chunk_rows: usize,
    /// 1 by measurement (`pipeline bench writer`): f16 tokens and moments shrink by ~8 % at any level,
    /// and higher levels only cost time.
    pub zstd_level: i32,
    /// Decode/crop threads; 0 = `data.threads` (0 there = one per core).
    pub workers: usize,
    /// libtorch threads of the encode stage; 0 = libtorch's default (every core). On a CPU-only machine,
    /// `workers + encode_threads = cores` keeps decode and encode from competing for the same cores.
    pub encode_threads: usize,
    /// Batches in flight between decode, encode and write.
    pub queue_batches: usize,
}

impl Default for PrecomputeConfig {
    fn default() -> Self {
        PrecomputeConfig {
            cache: "cache".into(),
            encoder: String::new(),
            encoder_input_size: model::dinov2::INPUT_SIZE,
            vae: String::new(),
            batch_size: 32,
            device: "auto".into(),
            flip: true,
            features_dtype: FeatureDType::F16,
            vae_dtype: LatentDType::F16,
            store_image: false,
            chunk_rows: 256,
            zstd_level: 1,
            workers: 0,
            encode_threads: 0,
            queue_batches: 2,
        }
    }
}

impl PrecomputeConfig {
    pub fn views(&self) -> usize {
        if self.flip {
            2
        } else {
            1
        }
    }

    pub fn encoder_dir(&self) -> Option<&Path> {
        (!self.encoder.is_empty()).then(|| Path::new(&self.encoder))
    }

    pub fn vae_dir(&self) -> Option<&Path> {
        (!self.vae.is_empty()).then(|| Path::new(&self.vae))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 || self.chunk_rows == 0 || self.queue_batches == 0 {
            bail!("precompute.batch_size, chunk_rows and queue_batches must be positive");
        }
        if self.encoder_input_size <= 0 {
            bail!(
                "precompute.encoder_input_size must be positive, got {}",
                self.encoder_input_size
            );
        }
        if self.encoder_dir().is_none() && self.vae_dir().is_none() && !self.store_image {
            bail!("precompute would store nothing: set precompute.encoder, precompute.vae or precompute.store_image");
        }
        Ok(())
    }
}
