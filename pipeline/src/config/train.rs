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
    /// Activation checkpointing per flow block: a block keeps only its input for backward and runs its
    /// forward again there (about one more forward pass per step for a fraction of the memory), so a
    /// larger micro-batch fits. Blocks whose hidden states F-REPA reads are never checkpointed.
    pub checkpoint_blocks: bool,
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
    /// FID and Inception Score of `fid_samples` EMA samples every this many steps; 0 disables.
    pub fid_every: u64,
    pub fid_samples: i64,
    /// Samples per sampling and Inception batch.
    pub fid_batch: i64,
    /// Reference statistics (`pipeline fid-stats` output or an ADM reference batch).
    pub fid_ref: String,
    /// Inception weights; empty: the converted published file where `pipeline fid` looks by default.
    pub fid_weights: String,
    /// Sample the FID images in bf16, the training precision on CUDA. Off, they are sampled in fp32 as
    /// `pipeline sample` samples a checkpoint, so both FIDs of one checkpoint agree.
    pub fid_bf16: bool,
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
            checkpoint_blocks: false,
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
            fid_every: 0,
            fid_samples: 5000,
            fid_batch: 50,
            fid_ref: String::new(),
            fid_weights: String::new(),
            fid_bf16: false,
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
    /// Refuses values that cannot train, naming the key (`train.<key>`) and the allowed range.
    pub fn validate(&self) -> anyhow::Result<()> {
        let check = |ok: bool, key: &str, value: String, want: &str| -> anyhow::Result<()> {
            if ok {
                Ok(())
            } else {
                anyhow::bail!("train.{key} = {value}: {want}")
            }
        };
        let finite = |v: f64| v.is_finite();
        check(
            self.steps > 0,
            "steps",
            self.steps.to_string(),
            "must be at least 1",
        )?;
        check(
            self.batch > 0,
            "batch",
            self.batch.to_string(),
            "must be at least 1",
        )?;
        check(
            self.micro_batch <= self.batch,
            "micro_batch",
            self.micro_batch.to_string(),
            "must be 0 (the whole batch) or at most train.batch",
        )?;
        check(
            finite(self.lr) && self.lr > 0.0,
            "lr",
            self.lr.to_string(),
            "must be a positive number",
        )?;
        check(
            finite(self.min_lr) && (0.0..=self.lr).contains(&self.min_lr),
            "min_lr",
            self.min_lr.to_string(),
            "must be in [0, train.lr]",
        )?;
        for (key, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            check(
                (0.0..1.0).contains(&v),
                key,
                v.to_string(),
                "must be in [0, 1)",
            )?;
        }
        check(
            finite(self.eps) && self.eps > 0.0,
            "eps",
            self.eps.to_string(),
            "must be positive",
        )?;
        for (key, v) in [
            ("weight_decay", self.weight_decay),
            ("clip_grad", self.clip_grad),
        ] {
            check(finite(v) && v >= 0.0, key, v.to_string(), "must be ≥ 0")?;
        }
        check(
            (0.0..=1.0).contains(&self.ema_decay),
            "ema_decay",
            self.ema_decay.to_string(),
            "must be in [0, 1]",
        )?;
        check(
            finite(self.noise_sigma),
            "noise_sigma",
            self.noise_sigma.to_string(),
            "must be a number (negative = the model's noise_std)",
        )?;
        check(
            (0.0..=1.0).contains(&self.label_drop),
            "label_drop",
            self.label_drop.to_string(),
            "must be in [0, 1]",
        )?;
        if let Some(s) = self.latent_scaling {
            check(
                finite(s) && s > 0.0,
                "latent_scaling",
                s.to_string(),
                "must be positive",
            )?;
        }
        if let Some(s) = self.latent_shift {
            check(finite(s), "latent_shift", s.to_string(), "must be a number")?;
        }
        check(
            self.prefetch > 0,
            "prefetch",
            self.prefetch.to_string(),
            "must be at least 1",
        )?;
        check(
            self.keep_last > 0,
            "keep_last",
            self.keep_last.to_string(),
            "must be at least 1",
        )?;
        check(
            self.sample_every == 0 || self.sample_count > 0,
            "sample_count",
            self.sample_count.to_string(),
            "must be at least 1 when train.sample_every is set",
        )?;
        if self.fid_every > 0 {
            check(
                self.fid_samples >= 2,
                "fid_samples",
                self.fid_samples.to_string(),
                "must be at least 2 when train.fid_every is set (a covariance needs two samples)",
            )?;
            check(
                self.fid_batch > 0,
                "fid_batch",
                self.fid_batch.to_string(),
                "must be at least 1",
            )?;
            check(
                !self.fid_ref.is_empty(),
                "fid_ref",
                "\"\"".to_string(),
                "must name reference statistics when train.fid_every is set (pipeline fid-stats writes them)",
            )?;
        }
        check(
            self.max_nonfinite_in_row > 0,
            "max_nonfinite_in_row",
            self.max_nonfinite_in_row.to_string(),
            "must be at least 1",
        )?;
        check(
            ["auto", "nccl", "gloo"].contains(&self.backend.as_str()),
            "backend",
            format!("{:?}", self.backend),
            "must be \"auto\", \"nccl\" or \"gloo\"",
        )?;
        check(
            self.dist_timeout_s > 0,
            "dist_timeout_s",
            self.dist_timeout_s.to_string(),
            "must be at least 1",
        )?;
        Ok(())
    }

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
    fn values_that_cannot_train_are_refused_by_key() {
        TrainConfig::default().validate().unwrap();
        let refused = |edit: &dyn Fn(&mut TrainConfig), key: &str| {
            let mut c = TrainConfig::default();
            edit(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with(&format!("train.{key} = ")), "{key}: {e}");
        };
        refused(&|c| c.ema_decay = 1.5, "ema_decay");
        refused(&|c| c.label_drop = -0.1, "label_drop");
        refused(&|c| c.batch = 0, "batch");
        refused(&|c| c.micro_batch = 512, "micro_batch");
        refused(&|c| c.lr = f64::NAN, "lr");
        refused(&|c| c.beta2 = 1.0, "beta2");
        refused(&|c| c.min_lr = 1.0, "min_lr");
        refused(&|c| c.backend = "mpi".into(), "backend");
    }

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
