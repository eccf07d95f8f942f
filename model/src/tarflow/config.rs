//! The flow's hyper-parameters. Serde so that a run config can nest it as its `[model]` section.

use serde::{Deserialize, Serialize};

use super::error::FlowError;

/// Feed-forward variant of every attention layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// TARFlow: Linear(C → r·C) → exact GELU → Linear(r·C → C), names `mlp.main.{0,2}`.
    Gelu,
    /// Latent variant (spec §1.6): down(act(gate(x)) ⊙ up(x)), names `mlp.{gate,up,down}`.
    Swiglu,
}

/// Gate activation of the SwiGLU MLP. The spec recommends SiLU (LLaMA) [INFER]; STARFlow gates with
/// tanh-approximated GELU [CODE].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateActivation {
    Silu,
    GeluTanh,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Height = width of the flow's input (pixels, or latent cells for the latent model).
    pub img_size: i64,
    /// Input channels (3 for RGB, 4 for SD-VAE latents).
    pub in_channels: i64,
    pub patch_size: i64,
    /// Transformer width C.
    pub channels: i64,
    /// Flow blocks T.
    pub num_blocks: i64,
    /// Attention layers per block L.
    pub layers_per_block: i64,
    /// Number of classes K; 0 makes the model unconditional (no `class_embed`).
    pub num_classes: i64,
    /// Attention head width (heads = channels / head_dim). TARFlow fixes 64.
    pub head_dim: i64,
    /// Learned absolute position embedding `pos_embed`. STARFlow drops it when RoPE is on; whether
    /// FlowBack kept it is [UNKNOWN] (spec §1.6), so it is a separate switch.
    pub pos_embed: bool,
    /// 2-D axial rotary embedding on q and k (spec §1.6).
    pub rope: bool,
    /// RoPE frequency base ("lang" schedule 1/base^(2k/d)).
    pub rope_base: f64,
    pub mlp: MlpKind,
    pub swiglu_gate: GateActivation,
    /// MLP hidden width as a multiple of C (4 for GELU; 4 also for SwiGLU per STARFlow, 8/3 is the
    /// other plausible reading, spec §1.6).
    pub mlp_ratio: f64,
    /// Training noise σ; also the default step size of score denoising (σ² · ∇ log p).
    pub noise_std: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self::preset("in64").expect("built-in preset")
    }
}

/// Names accepted by [`Config::preset`].
pub const PRESETS: &[&str] = &["in64", "latent256", "latent256-p1", "tiny", "tiny-latent"];

impl Config {
    /// The paper's models (spec §1.5) plus tiny CPU configs for tests and demos.
    pub fn preset(name: &str) -> Option<Self> {
        let in64 = Config {
            img_size: 64,
            in_channels: 3,
            patch_size: 4,
            channels: 1024,
            num_blocks: 8,
            layers_per_block: 8,
            num_classes: 1000,
            head_dim: 64,
            pos_embed: true,
            rope: false,
            rope_base: 10000.0,
            mlp: MlpKind::Gelu,
            swiglu_gate: GateActivation::Silu,
            mlp_ratio: 4.0,
            noise_std: 0.05,
        };
        let latent = Config {
            img_size: 32,
            in_channels: 4,
            patch_size: 2,
            pos_embed: false,
            rope: true,
            mlp: MlpKind::Swiglu,
            noise_std: 0.2,
            ..in64.clone()
        };
        Some(match name {
            "in64" => in64,
            "latent256" => latent,
            "latent256-p1" => Config {
                patch_size: 1,
                ..latent
            },
            "tiny" => Config {
                img_size: 16,
                patch_size: 4,
                channels: 64,
                num_blocks: 2,
                layers_per_block: 2,
                num_classes: 10,
                head_dim: 32,
                ..in64
            },
            "tiny-latent" => Config {
                img_size: 8,
                patch_size: 2,
                channels: 64,
                num_blocks: 2,
                layers_per_block: 2,
                num_classes: 10,
                head_dim: 32,
                ..latent
            },
            _ => return None,
        })
    }

    pub fn grid(&self) -> i64 {
        self.img_size / self.patch_size
    }
    /// Tokens per image N.
    pub fn num_tokens(&self) -> i64 {
        self.grid() * self.grid()
    }
    /// Features per token D = C_in · p².
    pub fn token_dim(&self) -> i64 {
        self.in_channels * self.patch_size * self.patch_size
    }
    /// Dimensions per sample (C_in · H · W), the denominator of per-dimension quantities.
    pub fn sample_dim(&self) -> i64 {
        self.in_channels * self.img_size * self.img_size
    }
    pub fn num_heads(&self) -> i64 {
        self.channels / self.head_dim
    }
    pub fn mlp_hidden(&self) -> i64 {
        (self.mlp_ratio * self.channels as f64).round() as i64
    }

    /// Refuses values the model cannot be built or run with, naming the key (`model.<key>`), before
    /// anything is allocated: every width in a range, and the parameter count, computed with checked
    /// arithmetic, at most [`MAX_PARAMETERS`]. A sidecar or config file is untrusted input: a width of
    /// 10⁹ must be an error here, not an allocation (or an abort) in libtorch.
    pub fn validate(&self) -> Result<(), FlowError> {
        let bad = |m: String| Err(FlowError::Config(m));
        let range = |key: &str, v: i64, lo: i64, hi: i64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                bad(format!("model.{key} = {v}: must be in {lo}..={hi}"))
            }
        };
        range("img_size", self.img_size, 1, 1 << 14)?;
        range("patch_size", self.patch_size, 1, self.img_size)?;
        if self.img_size % self.patch_size != 0 {
            return bad(format!(
                "img_size {} is not a positive multiple of patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        range("in_channels", self.in_channels, 1, 1 << 12)?;
        range("channels", self.channels, 1, 1 << 16)?;
        range("head_dim", self.head_dim, 1, self.channels)?;
        if self.channels % self.head_dim != 0 {
            return bad(format!(
                "channels {} is not a multiple of head_dim {}",
                self.channels, self.head_dim
            ));
        }
        if self.rope && self.head_dim % 4 != 0 {
            return bad(format!(
                "2-D RoPE needs head_dim divisible by 4, got {}",
                self.head_dim
            ));
        }
        range("num_blocks", self.num_blocks, 1, 1 << 10)?;
        range("layers_per_block", self.layers_per_block, 1, 1 << 10)?;
        range("num_classes", self.num_classes, 0, 1 << 24)?;
        // Attention over N tokens holds N × N scores per head.
        let tokens = self.num_tokens();
        if tokens > MAX_TOKENS {
            return bad(format!(
                "model.img_size = {} with model.patch_size = {} makes {tokens} tokens, more than {MAX_TOKENS}",
                self.img_size, self.patch_size
            ));
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0 && self.mlp_ratio <= 64.0) {
            return bad(format!(
                "model.mlp_ratio = {}: must be a number in (0, 64]",
                self.mlp_ratio
            ));
        }
        if self.mlp_hidden() < 1 {
            return bad(format!(
                "model.mlp_ratio = {} with model.channels = {} gives an MLP of width 0",
                self.mlp_ratio, self.channels
            ));
        }
        if self.rope && !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            return bad(format!(
                "model.rope_base = {}: must be a number above 1",
                self.rope_base
            ));
        }
        // NaN would pass every comparison: samples denoised with it are NaN (all black) and a
        // negative σ is no noise level at all.
        if !(self.noise_std.is_finite() && self.noise_std >= 0.0) {
            return bad(format!(
                "model.noise_std = {}: must be a finite σ ≥ 0",
                self.noise_std
            ));
        }
        match self.parameter_count() {
            Some(n) if n <= MAX_PARAMETERS => Ok(()),
            n => bad(format!(
                "model.channels = {}, num_blocks = {}, layers_per_block = {} (img_size {}, patch_size {}, \
                 {} classes, mlp_ratio {}) make {} parameters, more than {MAX_PARAMETERS}",
                self.channels,
                self.num_blocks,
                self.layers_per_block,
                self.img_size,
                self.patch_size,
                self.num_classes,
                self.mlp_ratio,
                n.map_or("overflowing i64".to_string(), |n| n.to_string())
            )),
        }
    }

    /// The number of parameters (and the `var` buffer) [`super::Model::new`] allocates, or None when it
    /// overflows i64. Call after the per-field checks of [`Self::validate`] (a positive width each).
    pub fn parameter_count(&self) -> Option<i64> {
        let (c, d, n, k) = (
            self.channels,
            self.token_dim(),
            self.num_tokens(),
            self.num_classes,
        );
        let h = self.mlp_hidden();
        let linear = |i: i64, o: i64| i.checked_mul(o)?.checked_add(o);
        let norm = c.checked_mul(2)?;
        let attention = norm
            .checked_add(linear(c, c.checked_mul(3)?)?)?
            .checked_add(linear(c, c)?)?;
        let mlp = match self.mlp {
            MlpKind::Gelu => linear(c, h)?.checked_add(linear(h, c)?)?,
            MlpKind::Swiglu => linear(c, h)?.checked_mul(2)?.checked_add(linear(h, c)?)?,
        };
        let layer = attention.checked_add(norm)?.checked_add(mlp)?;
        let mut block = linear(d, c)?
            .checked_add(linear(c, d.checked_mul(2)?)?)?
            .checked_add(layer.checked_mul(self.layers_per_block)?)?
            .checked_add(k.checked_mul(c)?)?;
        if self.pos_embed {
            block = block.checked_add(n.checked_mul(c)?)?;
        }
        block
            .checked_mul(self.num_blocks)?
            .checked_add(n.checked_mul(d)?)
    }
}

/// The most parameters a flow config may describe: 20 · 10⁹ (80 GB of fp32 weights), far above the
/// paper's models (~0.5 · 10⁹) and below what a sidecar could make the process try to allocate.
pub const MAX_PARAMETERS: i64 = 20_000_000_000;
/// The most tokens per image (a 256 × 256 grid).
pub const MAX_TOKENS: i64 = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parameter_count_is_what_the_model_allocates() {
        for name in PRESETS {
            let cfg = Config::preset(name).unwrap();
            cfg.validate().unwrap();
            if cfg.channels > 64 {
                continue;
            }
            for mlp in [MlpKind::Gelu, MlpKind::Swiglu] {
                let cfg = Config { mlp, ..cfg.clone() };
                let vs = tch::nn::VarStore::new(tch::Device::Cpu);
                let _model = super::super::Model::new(vs.root(), &cfg).unwrap();
                let allocated: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
                assert_eq!(cfg.parameter_count(), Some(allocated), "{name} {mlp:?}");
            }
        }
        // The paper's ImageNet 64 model: 8 blocks × 8 layers of width 1024, ~0.8 · 10⁹.
        let big = Config::preset("in64").unwrap();
        assert!((700_000_000..900_000_000).contains(&big.parameter_count().unwrap()));
    }

    #[test]
    fn absurd_or_meaningless_values_are_refused_with_the_key() {
        let base = Config::preset("tiny").unwrap();
        let refused = |cfg: Config, key: &str| {
            let msg = cfg.validate().unwrap_err().to_string();
            assert!(msg.contains(key), "{key}: {msg}");
        };
        refused(
            Config {
                channels: 0,
                ..base.clone()
            },
            "model.channels = 0",
        );
        refused(
            Config {
                mlp_ratio: f64::NAN,
                ..base.clone()
            },
            "model.mlp_ratio = NaN",
        );
        refused(
            Config {
                mlp_ratio: 1e-9,
                ..base.clone()
            },
            "model.mlp_ratio",
        );
        refused(
            Config {
                noise_std: f64::NAN,
                ..base.clone()
            },
            "model.noise_std = NaN",
        );
        refused(
            Config {
                noise_std: -1.0,
                ..base.clone()
            },
            "model.noise_std = -1",
        );
        refused(
            Config {
                noise_std: f64::INFINITY,
                ..base.clone()
            },
            "model.noise_std = inf",
        );
        refused(
            Config {
                num_blocks: 1_000_000,
                ..base.clone()
            },
            "model.num_blocks = 1000000",
        );
        refused(
            Config {
                layers_per_block: 1_000_000_000,
                ..base.clone()
            },
            "model.layers_per_block",
        );
        refused(
            Config {
                channels: 1_000_000_000,
                ..base.clone()
            },
            "model.channels = 1000000000",
        );
        // Each width in range, the product not.
        refused(
            Config {
                channels: 1 << 16,
                num_blocks: 1 << 10,
                ..base.clone()
            },
            "parameters, more than 20000000000",
        );
        refused(
            Config {
                img_size: 4096,
                patch_size: 1,
                ..base.clone()
            },
            "tokens",
        );
        refused(
            Config {
                rope: true,
                rope_base: f64::NAN,
                head_dim: 32,
                ..base.clone()
            },
            "model.rope_base",
        );
        Config {
            noise_std: 0.0,
            ..base
        }
        .validate()
        .unwrap();
    }
}
