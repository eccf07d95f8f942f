//! The `[train]` section. Defaults are the paper's recipe (spec §2.6): AdamW β (0.9, 0.95), wd 1e-4,
//! lr 1e-4 with one epoch-like warmup then cosine, EMA 0.9999, label drop 0.1.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warmup from `min_lr` to `lr`, then cosine down to `min_lr` at `steps` (TARFlow's).
    Cosine,
    /// `lr` throughout (REPA's).
    Constant,
}

/// Where the alignment targets come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Features {
    /// DINOv2 tokens precomputed into the cache (`features` field).
    Cache,
    /// The frozen DINOv2 of `precompute.encoder` run by the trainer on each batch's cached crops (the
    /// cache holds crops and VAE moments, no features: about 0.8 MB less per image).
    Online,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimiser steps of the whole run.
    pub steps: u64,
    /// Samples per step (per rank).
    pub batch: usize,
    /// Alignment targets from the cache or computed by the trainer (`"cache"` | `"online"`).
    pub features: Features,
    /// Samples per forward/backward pass: the batch runs in ⌈batch / micro_batch⌉ passes whose
    /// gradients accumulate into the same update (0 = the whole batch at once).
    pub micro_batch: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Gradient max-norm; 0 disables clipping.
    pub clip_grad: f64,
    pub ema_decay: f64,
    /// Gaussian noise σ added to the (scaled) latent or the [-1, 1] image; negative = model.noise_std.
    pub noise_sigma: f64,
    /// Probability of replacing a label by the null class (−1 → mean embedding) for guidance.
    pub label_drop: f64,
    /// Multiplies the sampled VAE posterior. Unset: the VAE's own `scaling_factor` (config.json of
    /// `[precompute] vae`; sd-vae: 0.18215), which is also what `sample`/`classify`/`bpd` use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latent_scaling: Option<f64>,
    /// Subtracted from the VAE posterior before scaling. Unset: the VAE's `shift_factor` (0 when it has
    /// none, as sd-vae; SD3/FLUX VAEs have one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latent_shift: Option<f64>,
    /// Train on cached VAE latents rather than cached crops (`--latent` sets it).
    pub latent: bool,
    pub seed: u64,
    /// `auto`, `cpu`, `cuda`, `cuda:N`; bf16 autocast is used on CUDA only.
    pub device: String,
    /// Cache root (one sub-directory per fingerprint) or one fingerprint directory.
    pub cache: String,
    pub shuffle_buffer: usize,
    /// Batches the loader keeps ready ahead of the step.
    pub prefetch: usize,
    pub metrics_every: u64,
    pub checkpoint_every: u64,
    /// Checkpoints kept; older ones are removed after a newer one is complete.
    pub keep_last: usize,
    /// Sample grid from the EMA model every this many steps; 0 disables.
    pub sample_every: u64,
    pub sample_count: i64,
    /// Non-finite losses in a row that abort the run.
    pub max_nonfinite_in_row: u64,
    pub rank: Option<usize>,
    pub world: Option<usize>,
    /// Process-group backend with several ranks: `auto` (NCCL on CUDA, Gloo on the CPU), `nccl`, `gloo`.
    pub backend: String,
    /// Seconds a rendezvous or a collective may wait for the other ranks before the job fails.
    pub dist_timeout_s: u64,
    /// libtorch intra-op threads on the CPU; 0 keeps libtorch's default (one per core). Tiny models on
    /// a busy machine run many times faster with 1, because spinning worker threads contend.
    pub threads: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 400_000,
            batch: 256,
            micro_batch: 0,
            features: Features::Cache,
            lr: 1e-4,
            min_lr: 1e-6,
            warmup_steps: 5004,
            schedule: Schedule::Cosine,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 1e-4,
            clip_grad: 0.0,
            ema_decay: 0.9999,
            noise_sigma: -1.0,
            label_drop: 0.1,
            latent_scaling: None,
            latent_shift: None,
            latent: false,
            seed: 0,
            device: "auto".into(),
            cache: "cache".into(),
            shuffle_buffer: 1000,
            prefetch: 4,
            metrics_every: 100,
            checkpoint_every: 10_000,
            keep_last: 3,
            sample_every: 0,
            sample_count: 16,
            max_nonfinite_in_row: 20,
            rank: None,
            world: None,
            backend: "auto".into(),
            dist_timeout_s: 600,
            threads: 0,
        }
    }
}

impl TrainConfig {
    /// The learning rate applied at 0-based step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                if step < self.warmup_steps {
                    self.min_lr + (self.lr - self.min_lr) * step as f64 / self.warmup_steps as f64
                } else {
                    let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
                    let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                    self.min_lr
                        + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_warms_up_then_decays_to_min() {
        let c = TrainConfig {
            steps: 100,
            warmup_steps: 10,
            ..Default::default()
        };
        assert_eq!(c.lr_at(0), c.min_lr);
        assert!((c.lr_at(10) - c.lr).abs() < 1e-15);
        assert!(c.lr_at(50) < c.lr && c.lr_at(50) > c.min_lr);
        assert!((c.lr_at(100) - c.min_lr).abs() < 1e-15);
        let k = TrainConfig {
            schedule: Schedule::Constant,
            ..c
        };
        assert_eq!(k.lr_at(3), k.lr);
    }
}
