//! DINOv2 ViT (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision"), with
//! and without registers (Darcet et al. 2023), as a frozen feature extractor.
//!
//! Reference: transformers 5.23 `models/dinov2/modeling_dinov2.py` and
//! `models/dinov2_with_registers/modeling_dinov2_with_registers.py`. Checkpoints: `facebook/dinov2-{small,
//! base,large,giant}` and `facebook/dinov2-with-registers-*`, read from a folder holding `config.json` and
//! `model.safetensors`. Variable names are the checkpoint's (`encoder.layer.{i}.attention.attention.query`,
//! `encoder.layer.{i}.layer_scale1.lambda1`, `embeddings.patch_embeddings.projection`), so loading is a
//! strict name-for-name copy.
//!
//! The project uses the final-LayerNorm patch tokens (REPA's `x_norm_patchtokens`): CLS and register
//! tokens are dropped. Input preparation follows REPA's `preprocess_raw_image` (see [`prepare_input`]).

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use crate::frozen::{self, Conv2d, EncoderError, InputNorm, LayerNorm, Linear, Precision};
use crate::vit::{Activation, Block, Mlp, SelfAttention};

/// ImageNet normalisation used by DINOv2 and REPA (timm `IMAGENET_DEFAULT_MEAN` / `_STD`,
/// https://github.com/huggingface/pytorch-image-models/blob/main/timm/data/constants.py).
pub use crate::frozen::{IMAGENET_MEAN, IMAGENET_STD};
/// REPA feeds 224 px (16 × 16 patches of 14 px) for 256-px images.
pub const INPUT_SIZE: i64 = 224;

pub use crate::frozen::{CONFIG_FILE, WEIGHTS_FILE};

/// The fields of a transformers `Dinov2Config` / `Dinov2WithRegistersConfig` that change the forward
/// pass; defaults are transformers'. Unknown keys are accepted on purpose: this is Hugging Face's file
/// (it carries `architectures`, `torch_dtype`, backbone settings ...), not one of ours.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Config {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "default_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_image_size")]
    pub image_size: i64,
    #[serde(default = "default_patch_size")]
    pub patch_size: i64,
    #[serde(default = "default_channels")]
    pub num_channels: i64,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub use_swiglu_ffn: bool,
    /// Only meaningful for `dinov2_with_registers`.
    #[serde(default = "default_registers")]
    pub num_register_tokens: i64,
    /// Only `dinov2` has this switch; the registers checkpoints always carry the mask token.
    #[serde(default = "default_true")]
    pub use_mask_token: bool,
}

fn default_model_type() -> String {
    "dinov2".into()
}
fn default_hidden_size() -> i64 {
    768
}
fn default_layers() -> i64 {
    12
}
fn default_heads() -> i64 {
    12
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-6
}
fn default_image_size() -> i64 {
    224
}
fn default_patch_size() -> i64 {
    14
}
fn default_channels() -> i64 {
    3
}
fn default_true() -> bool {
    true
}
fn default_registers() -> i64 {
    4
}

impl Config {
    /// `facebook/dinov2-base` as published: ViT-B/14, 518-px position table, no registers.
    pub fn vit_base() -> Self {
        Config {
            model_type: default_model_type(),
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            mlp_ratio: 4.0,
            hidden_act: default_hidden_act(),
            layer_norm_eps: 1e-6,
            image_size: 518,
            patch_size: 14,
            num_channels: 3,
            qkv_bias: true,
            use_swiglu_ffn: false,
            num_register_tokens: 0,
            use_mask_token: true,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, EncoderError> {
        let cfg: Config = frozen::read_json_config(path)?;
        cfg.validate().map_err(|message| EncoderError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if !matches!(self.model_type.as_str(), "dinov2" | "dinov2_with_registers") {
            return Err(format!(
                "model_type `{}` is not dinov2 or dinov2_with_registers",
                self.model_type
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(format!(
                "hidden_act `{}` is not supported (DINOv2 uses gelu)",
                self.hidden_act
            ));
        }
        crate::vit::check_grid(
            self.hidden_size,
            self.num_attention_heads,
            self.patch_size,
            self.image_size,
        )?;
        Ok(())
    }

    pub fn registers(&self) -> i64 {
        if self.model_type == "dinov2_with_registers" {
            self.num_register_tokens
        } else {
            0
        }
    }

    /// Side of the square grid the position table was trained for (37 for the published 518 px).
    pub fn position_grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    fn mlp_hidden(&self) -> i64 {
        // transformers: int(hidden_size * mlp_ratio), truncating.
        let hidden = (self.hidden_size as f64 * self.mlp_ratio) as i64;
        if self.use_swiglu_ffn {
            // SwiGLU keeps two thirds of it, rounded up to a multiple of 8 (transformers Dinov2SwiGLUFFN).
            ((hidden as f64 * 2.0 / 3.0) as i64 + 7) / 8 * 8
        } else {
            hidden
        }
    }

    /// "ViT-B/14 (dinov2), 12 layers, ...": what `encoders check` prints.
    pub fn describe(&self) -> String {
        let size = crate::vit::size_name(self.hidden_size);
        format!(
            "DINOv2 ViT-{size}/{} ({}), {} layers, hidden {}, {} heads, {} MLP hidden {}, {} registers, position grid {g}x{g} ({} px)",
            self.patch_size,
            self.model_type,
            self.num_hidden_layers,
            self.hidden_size,
            self.num_attention_heads,
            if self.use_swiglu_ffn { "SwiGLU" } else { "GELU" },
            self.mlp_hidden(),
            self.registers(),
            self.image_size,
            g = self.position_grid(),
        )
    }
}

/// Turns uint8 images (B, 3, H, W) into DINOv2 input exactly as REPA's `preprocess_raw_image` does:
/// x / 255, ImageNet mean/std, then torch bicubic resize (a = −0.75, no antialias, align_corners false)
/// to `size` × `size`. Normalising before resizing matters: bicubic overshoot happens in normalised
/// units. 64-px training images go through the same path (64 → 224 upsampling). Always float32.
pub fn prepare_input(images: &Tensor, size: i64) -> Result<Tensor, EncoderError> {
    input_norm().prepare(images, size)
}

fn input_norm() -> InputNorm {
    InputNorm::imagenet("DINOv2 preprocessing")
}

/// A frozen DINOv2 backbone.
#[derive(Debug)]
pub struct Dinov2 {
    pub config: Config,
    embeddings: Embeddings,
    layers: Vec<Block>,
    layernorm: LayerNorm,
    pub precision: Precision,
    pub input: InputNorm,
}

impl Dinov2 {
    /// Builds the network with zero-initialised variables under `p` (checkpoint names below it).
    pub fn new(p: nn::Path, config: &Config) -> Self {
        let embeddings = Embeddings::new(&p / "embeddings", config);
        let layers = (0..config.num_hidden_layers)
            .map(|i| layer(&p / "encoder" / "layer" / i, config))
            .collect();
        let layernorm = LayerNorm::new(&p / "layernorm", config.hidden_size, config.layer_norm_eps);
        let precision = Precision::for_device(p.device());
        Dinov2 {
            config: config.clone(),
            embeddings,
            layers,
            layernorm,
            precision,
            input: input_norm(),
        }
    }

    /// Loads `config.json` + `model.safetensors` from a Hugging Face folder, strictly.
    pub fn from_folder(dir: &Path, device: Device) -> Result<LoadedDinov2, EncoderError> {
        let config = Config::from_file(&dir.join(CONFIG_FILE))?;
        frozen::load_tower(dir, device, &[], &|_| false, |p| Dinov2::new(p, &config))
    }

    /// Final-LayerNorm patch tokens (B, N, D), N = (H/14)·(W/14), CLS and registers excluded, float32.
    /// `pixels` is prepared input (B, 3, H, W) float (see [`prepare_input`]). Runs under no_grad.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor, EncoderError> {
        frozen::check_image_batch(
            "DINOv2",
            pixels,
            self.config.num_channels,
            self.config.patch_size,
        )?;
        let tokens = tch::no_grad(|| {
            let mut x = self
                .embeddings
                .forward(pixels, &self.config, self.precision); // (b, 1 + r + n, d)
            for layer in &self.layers {
                x = layer.forward(&x, None, self.precision);
            }
            let x = self.layernorm.forward(&x);
            x.narrow(
                1,
                1 + self.config.registers(),
                x.size()[1] - 1 - self.config.registers(),
            )
        });
        Ok(tokens)
    }

    /// uint8 images (B, 3, H, W) → patch tokens at `size` × `size` ([`INPUT_SIZE`] for REPA's 16×16):
    /// [`prepare_input`] then [`Self::forward`], the position table interpolated to the grid.
    pub fn patch_tokens(&self, images: &Tensor, size: i64) -> Result<Tensor, EncoderError> {
        self.forward(&self.input.prepare(images, size)?)
    }
}

/// A DINOv2 read from a folder.
pub type LoadedDinov2 = frozen::Loaded<Dinov2>;

/// The fingerprint of a DINOv2 folder, without loading it.
pub fn fingerprint(dir: &Path) -> Result<String, EncoderError> {
    frozen::fingerprint_folder(dir)
}

#[derive(Debug)]
struct Embeddings {
    cls_token: Tensor,
    // Unused at inference but part of every published checkpoint; holding it keeps loading strict.
    _mask_token: Option<Tensor>,
    register_tokens: Option<Tensor>,
    position_embeddings: Tensor,
    projection: Conv2d,
}

impl Embeddings {
    fn new(p: nn::Path, cfg: &Config) -> Self {
        let d = cfg.hidden_size;
        let zeros = nn::Init::Const(0.);
        let cls_token = p.var("cls_token", &[1, 1, d], zeros);
        let has_mask = cfg.use_mask_token || cfg.registers() > 0;
        let _mask_token = has_mask.then(|| p.var("mask_token", &[1, d], zeros));
        let register_tokens = (cfg.registers() > 0)
            .then(|| p.var("register_tokens", &[1, cfg.registers(), d], zeros));
        let grid = cfg.position_grid();
        let position_embeddings = p.var("position_embeddings", &[1, grid * grid + 1, d], zeros);
        let projection = Conv2d::new(
            &p / "patch_embeddings" / "projection",
            cfg.num_channels,
            d,
            cfg.patch_size,
            cfg.patch_size,
            0,
        );
        Embeddings {
            cls_token,
            _mask_token,
            register_tokens,
            position_embeddings,
            projection,
        }
    }

    /// Position table for an input of `height` × `width` pixels, interpolated as transformers does:
    /// bicubic, align_corners false, in float32; the registers model also antialiases. Unlike REPA
    /// (timm `resample_abs_pos_embed`, antialiased, done once at load) the plain model does not
    /// antialias when shrinking 37×37 → 16×16; we follow transformers, whose outputs the tests compare.
    fn positions(&self, n_patches: i64, height: i64, width: i64, cfg: &Config) -> Tensor {
        let n_positions = self.position_embeddings.size()[1] - 1;
        if n_patches == n_positions && height == width {
            return self.position_embeddings.shallow_clone();
        }
        let d = cfg.hidden_size;
        let (new_h, new_w) = (height / cfg.patch_size, width / cfg.patch_size);
        let side = (n_positions as f64).sqrt() as i64;
        let cls = self.position_embeddings.narrow(1, 0, 1);
        // (1, s·s, d) -> (1, d, s, s)
        let grid = self
            .position_embeddings
            .narrow(1, 1, n_positions)
            .reshape([1, side, side, d])
            .permute([0, 3, 1, 2]);
        let grid = grid.to_kind(Kind::Float);
        let resized = if cfg.registers() > 0 {
            grid.internal_upsample_bicubic2d_aa([new_h, new_w], false, None, None)
        } else {
            grid.upsample_bicubic2d([new_h, new_w], false, None, None)
        };
        // (1, d, h, w) -> (1, h·w, d)
        let resized = resized.permute([0, 2, 3, 1]).reshape([1, new_h * new_w, d]);
        Tensor::cat(&[cls, resized], 1)
    }

    fn forward(&self, pixels: &Tensor, cfg: &Config, precision: Precision) -> Tensor {
        let (b, h, w) = (pixels.size()[0], pixels.size()[2], pixels.size()[3]);
        // (b, 3, h, w) -> (b, d, h/14, w/14) -> (b, n, d)
        let patches = self
            .projection
            .forward(pixels, precision)
            .flatten(2, 3)
            .transpose(1, 2);
        let n = patches.size()[1];
        let cls = self.cls_token.expand([b, 1, cfg.hidden_size], true);
        // Under bf16 the patch embedding is bf16; autocast's `cat` promotes it to the fp32 of the CLS
        // token, and the position table is fp32 too.
        let x = Tensor::cat(&[cls, patches.to_kind(Kind::Float)], 1) + self.positions(n, h, w, cfg);
        match &self.register_tokens {
            // Registers go between CLS and the patches, after the position embedding (they have none).
            Some(registers) => {
                let registers = registers
                    .expand([b, cfg.registers(), cfg.hidden_size], true)
                    .to_kind(x.kind());
                Tensor::cat(&[x.narrow(1, 0, 1), registers, x.narrow(1, 1, n)], 1)
            }
            None => x,
        }
    }
}

/// One block under the checkpoint's names: `norm1`, `attention.attention.{query,key,value}`,
/// `attention.output.dense`, `layer_scale1.lambda1`, `norm2`, `mlp.{fc1,fc2}` (exact GELU) or, for
/// ViT-g, `mlp.{weights_in,weights_out}` (fused SwiGLU), `layer_scale2.lambda1`.
fn layer(p: nn::Path, cfg: &Config) -> Block {
    let (d, hidden, eps) = (cfg.hidden_size, cfg.mlp_hidden(), cfg.layer_norm_eps);
    let mlp = &p / "mlp";
    let (mlp, activation) = if cfg.use_swiglu_ffn {
        let mlp = Mlp::FusedGated {
            gate_up: Linear::new(&mlp / "weights_in", d, 2 * hidden, true),
            down: Linear::new(&mlp / "weights_out", hidden, d, true),
        };
        (mlp, Activation::Silu)
    } else {
        let mlp = Mlp::Plain {
            up: Linear::new(&mlp / "fc1", d, hidden, true),
            down: Linear::new(&mlp / "fc2", hidden, d, true),
        };
        (mlp, Activation::Gelu)
    };
    let scale = |name: &str| Some((&p / name).var("lambda1", &[d], nn::Init::Const(1.)));
    Block {
        norm1: LayerNorm::new(&p / "norm1", d, eps),
        attention: SelfAttention::vit_names(
            &(&p / "attention"),
            d,
            cfg.num_attention_heads,
            cfg.qkv_bias,
        ),
        scale1: scale("layer_scale1"),
        norm2: LayerNorm::new(&p / "norm2", d, eps),
        mlp,
        scale2: scale("layer_scale2"),
        activation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// facebook/dinov2-giant's config.json as published (the fields that matter plus a foreign one).
    const GIANT: &str = r#"{"architectures": ["Dinov2Model"], "hidden_size": 1536, "image_size": 518,
        "layerscale_value": 1.0, "mlp_ratio": 4, "model_type": "dinov2", "num_attention_heads": 24,
        "num_hidden_layers": 40, "patch_size": 14, "qkv_bias": true, "torch_dtype": "float32",
        "use_swiglu_ffn": true}"#;

    #[test]
    fn reads_published_config_and_sizes_swiglu_like_transformers() {
        let cfg: Config = serde_json::from_str(GIANT).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.position_grid(), 37);
        assert_eq!(cfg.registers(), 0);
        // int(int(1536 * 4) * 2 / 3) = 4096, already a multiple of 8: weights_in is (8192, 1536).
        assert_eq!(cfg.mlp_hidden(), 4096);
        assert!(
            cfg.describe()
                .starts_with("DINOv2 ViT-g/14 (dinov2), 40 layers"),
            "{}",
            cfg.describe()
        );
        assert_eq!(Config::vit_base().mlp_hidden(), 3072);
    }

    #[test]
    fn rejects_configs_it_cannot_run() {
        let cfg: Config = serde_json::from_str(r#"{"model_type": "vit"}"#).unwrap();
        assert!(cfg.validate().unwrap_err().contains("model_type `vit`"));
        let cfg: Config =
            serde_json::from_str(r#"{"hidden_size": 100, "num_attention_heads": 12}"#).unwrap();
        assert!(cfg.validate().unwrap_err().contains("not a multiple"));
    }

    #[test]
    fn vit_base_has_the_published_parameter_count() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Dinov2::new(vs.root(), &Config::vit_base());
        // facebook/dinov2-base: 86,580,480 parameters including the mask token.
        assert_eq!(frozen::parameter_count(&vs), 86_580_480);
    }
}
