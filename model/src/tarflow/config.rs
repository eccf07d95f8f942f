//! The flow's hyper-parameters. Serde so that a run config can nest it as its `[model]` section.

use serde::{Deserialize, Serialize};

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

    pub fn validate(&self) -> Result<(), super::FlowError> {
        let bad = |m: String| Err(super::FlowError::Config(m));
        if self.img_size <= 0 || self.patch_size <= 0 || self.img_size % self.patch_size != 0 {
            return bad(format!(
                "img_size {} is not a positive multiple of patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        if self.head_dim <= 0 || self.channels % self.head_dim != 0 {
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
        if self.in_channels <= 0
            || self.num_blocks <= 0
            || self.layers_per_block <= 0
            || self.num_classes < 0
        {
            return bad(
                "in_channels, num_blocks and layers_per_block must be positive, num_classes ≥ 0"
                    .into(),
            );
        }
        if self.mlp_ratio <= 0.0 {
            return bad(format!(
                "mlp_ratio must be positive, got {}",
                self.mlp_ratio
            ));
        }
        Ok(())
    }
}
