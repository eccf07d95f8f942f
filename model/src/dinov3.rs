//! DINOv3 ViT (Siméoni et al. 2025, "DINOv3") as a frozen feature extractor: no position table but
//! rotary embeddings over patch-centre coordinates, register tokens, layer scale, optional gated MLP.
//!
//! Reference: transformers 5.23 `models/dinov3_vit/modeling_dinov3_vit.py` (`DINOv3ViTModel`, eval mode:
//! the RoPE coordinate jitter is a training augmentation). Checkpoints: `facebook/dinov3-vit{s16,b16,
//! l16,h16plus,7b16}-pretrain-lvd1689m` and the satellite `-sat493m` ones, saved with the names
//! `embeddings.{cls_token,mask_token,register_tokens,patch_embeddings}`, `layer.{i}.*`, `norm` (transformers
//! 5 nests the layers under `model.` in memory only and writes the published names back). Loading is
//! strict; the mask token is held, unused, so that it is.
//!
//! Features are `last_hidden_state` after the final `norm`, class and register tokens dropped. RoPE needs
//! no interpolation: any input size gives its own grid. The input normalisation is ImageNet's, as for the
//! web-image (LVD) models; the satellite models were trained with other statistics, which a folder does
//! not record.

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use crate::frozen::{self, EncoderError, InputNorm, LayerNorm, Linear, Precision};
use crate::vit::{self, Activation, Block, Mlp, Rope, SelfAttention};

pub const MODEL_TYPE: &str = "dinov3_vit";

/// The fields of a transformers `DINOv3ViTConfig` that change the eval forward pass; defaults are
/// transformers'. Unknown keys (the training-time `pos_embed_*` augmentations, backbone settings) are
/// accepted: the file is Hugging Face's.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Config {
    #[serde(default)]
    pub model_type: String,
    #[serde(default = "default_patch_size")]
    pub patch_size: i64,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: i64,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "default_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_image_size")]
    pub image_size: i64,
    #[serde(default = "default_channels")]
    pub num_channels: i64,
    #[serde(default = "yes")]
    pub query_bias: bool,
    #[serde(default)]
    pub key_bias: bool,
    #[serde(default = "yes")]
    pub value_bias: bool,
    #[serde(default = "yes")]
    pub proj_bias: bool,
    #[serde(default = "yes")]
    pub mlp_bias: bool,
    #[serde(default)]
    pub use_gated_mlp: bool,
    #[serde(default)]
    pub num_register_tokens: i64,
}

fn default_patch_size() -> i64 {
    16
}
fn default_hidden_size() -> i64 {
    384
}
fn default_intermediate_size() -> i64 {
    1536
}
fn default_layers() -> i64 {
    12
}
fn default_heads() -> i64 {
    6
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    100.0
}
fn default_image_size() -> i64 {
    224
}
fn default_channels() -> i64 {
    3
}
fn yes() -> bool {
    true
}

impl Config {
    /// `facebook/dinov3-vitb16-pretrain-lvd1689m`: ViT-B/16, 4 registers, 224 px.
    pub fn vit_base() -> Self {
        Config {
            model_type: MODEL_TYPE.into(),
            patch_size: 16,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            hidden_act: default_hidden_act(),
            layer_norm_eps: 1e-5,
            rope_theta: 100.0,
            image_size: 224,
            num_channels: 3,
            query_bias: true,
            key_bias: false,
            value_bias: true,
            proj_bias: true,
            mlp_bias: true,
            use_gated_mlp: false,
            num_register_tokens: 4,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, EncoderError> {
        let cfg: Self = frozen::read_json_config(path)?;
        cfg.validate().map_err(|message| EncoderError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.model_type != MODEL_TYPE {
            return Err(format!(
                "model_type `{}` is not {MODEL_TYPE}",
                self.model_type
            ));
        }
        Activation::check(&self.hidden_act)?;
        crate::vit::check_grid(
            self.hidden_size,
            self.num_attention_heads,
            self.patch_size,
            self.image_size,
        )?;
        // The rotary frequencies cover head_dim / 4 per axis, twice (sin and cos halves).
        if (self.hidden_size / self.num_attention_heads) % 4 != 0 {
            return Err(format!(
                "head size {} is not a multiple of 4, which DINOv3's 2-D RoPE needs",
                self.hidden_size / self.num_attention_heads
            ));
        }
        if self.num_register_tokens < 0 {
            return Err(format!(
                "num_register_tokens {} is negative",
                self.num_register_tokens
            ));
        }
        Ok(())
    }

    /// "DINOv3 ViT-B/16, 12 layers, ...": what `encoders check` prints.
    pub fn describe(&self) -> String {
        format!(
            "DINOv3 ViT-{}/{}, {} layers, hidden {}, {} heads, {} {} MLP hidden {}, {} registers, RoPE θ {} ({} px)",
            vit::size_name(self.hidden_size),
            self.patch_size,
            self.num_hidden_layers,
            self.hidden_size,
            self.num_attention_heads,
            if self.use_gated_mlp { "gated" } else { "plain" },
            self.hidden_act,
            self.intermediate_size,
            self.num_register_tokens,
            self.rope_theta,
            self.image_size,
        )
    }
}

/// A frozen DINOv3 ViT.
#[derive(Debug)]
pub struct Dinov3 {
    pub config: Config,
    cls_token: Tensor,
    _mask_token: Tensor,
    register_tokens: Tensor,
    patch_weight: Tensor,
    patch_bias: Tensor,
    layers: Vec<Block>,
    norm: LayerNorm,
    pub precision: Precision,
    pub input: InputNorm,
}

impl Dinov3 {
    /// Builds the network with zero-initialised variables under `p` (checkpoint names below it).
    pub fn new(p: nn::Path, config: &Config) -> Self {
        let (d, eps) = (config.hidden_size, config.layer_norm_eps);
        let zeros = nn::Init::Const(0.);
        let emb = &p / "embeddings";
        let patch = &emb / "patch_embeddings";
        Dinov3 {
            config: config.clone(),
            cls_token: emb.var("cls_token", &[1, 1, d], zeros),
            _mask_token: emb.var("mask_token", &[1, 1, d], zeros),
            register_tokens: emb.var(
                "register_tokens",
                &[1, config.num_register_tokens, d],
                zeros,
            ),
            patch_weight: patch.var(
                "weight",
                &[d, config.num_channels, config.patch_size, config.patch_size],
                zeros,
            ),
            patch_bias: patch.var("bias", &[d], zeros),
            layers: (0..config.num_hidden_layers)
                .map(|i| layer(&p / "layer" / i, config))
                .collect(),
            norm: LayerNorm::new(&p / "norm", d, eps),
            precision: Precision::for_device(p.device()),
            input: InputNorm::imagenet("DINOv3 preprocessing"),
        }
    }

    /// Loads `config.json` + `model.safetensors` from a Hugging Face folder, strictly.
    pub fn from_folder(dir: &Path, device: Device) -> Result<LoadedDinov3, EncoderError> {
        let config = Config::from_file(&dir.join(frozen::CONFIG_FILE))?;
        frozen::load_tower(dir, device, &[], &|_| false, |p| Dinov3::new(p, &config))
    }

    /// The rotary tables for a `grid_h` × `grid_w` grid: patch centres in [−1, 1] per axis, angles
    /// 2π·coordinate·θ^(−4k/head_dim) for k < head_dim/4, (y-angles ‖ x-angles) repeated twice. Computed in
    /// float32 as transformers does.
    fn rope(&self, grid_h: i64, grid_w: i64, device: Device) -> Rope {
        let cfg = &self.config;
        let head_dim = cfg.hidden_size / cfg.num_attention_heads;
        let float = (Kind::Float, device);
        let inv_freq = (Tensor::arange_start_step(0.0, 1.0, 4.0 / head_dim as f64, float)
            * -cfg.rope_theta.ln())
        .exp();
        let centres = |n: i64| Tensor::arange_start_step(0.5, n as f64, 1.0, float) / n as f64;
        let ys = centres(grid_h)
            .view([grid_h, 1])
            .expand([grid_h, grid_w], false);
        let xs = centres(grid_w)
            .view([1, grid_w])
            .expand([grid_h, grid_w], false);
        let coords = Tensor::stack(&[ys, xs], -1).reshape([grid_h * grid_w, 2]) * 2.0 - 1.0;
        let angles =
            (coords.unsqueeze(-1) * inv_freq.view([1, 1, -1]) * (2.0 * std::f64::consts::PI))
                .flatten(1, 2)
                .repeat([1, 2]);
        Rope {
            cos: angles.cos(),
            sin: angles.sin(),
        }
    }

    /// Final-norm patch tokens (B, N, D), N = (H/p)·(W/p), class and register tokens dropped, float32.
    /// `pixels` is prepared input (B, 3, H, W) of any size. Runs under no_grad.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor, EncoderError> {
        let cfg = &self.config;
        frozen::check_image_batch("DINOv3", pixels, cfg.num_channels, cfg.patch_size)?;
        let tokens = tch::no_grad(|| {
            let (b, h, w) = (pixels.size()[0], pixels.size()[2], pixels.size()[3]);
            let d = cfg.hidden_size;
            let patches = vit::embed_patches(
                pixels,
                &self.patch_weight,
                Some(&self.patch_bias),
                cfg.patch_size,
                self.precision,
            );
            let prefix = 1 + cfg.num_register_tokens;
            let mut x = Tensor::cat(
                &[
                    self.cls_token.expand([b, 1, d], true),
                    self.register_tokens
                        .expand([b, cfg.num_register_tokens, d], true),
                    patches.to_kind(Kind::Float),
                ],
                1,
            );
            let rope = self.rope(h / cfg.patch_size, w / cfg.patch_size, pixels.device());
            for layer in &self.layers {
                x = layer.forward(&x, Some(&rope), self.precision);
            }
            let x = self.norm.forward(&x);
            x.narrow(1, prefix, x.size()[1] - prefix)
        });
        Ok(tokens)
    }
}

/// A DINOv3 read from a folder.
pub type LoadedDinov3 = frozen::Loaded<Dinov3>;

/// One block under the checkpoint's names: `norm1`, `attention.{q,k,v,o}_proj`, `layer_scale1.lambda1`,
/// `norm2`, `mlp.{up,down}_proj` (or `mlp.{gate,up,down}_proj`), `layer_scale2.lambda1`.
fn layer(p: nn::Path, cfg: &Config) -> Block {
    let (d, hidden, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
    let att = &p / "attention";
    let mlp = &p / "mlp";
    let linear = |name: &str, i: i64, o: i64, bias: bool| Linear::new(&mlp / name, i, o, bias);
    let mlp = if cfg.use_gated_mlp {
        Mlp::Gated {
            gate: linear("gate_proj", d, hidden, cfg.mlp_bias),
            up: linear("up_proj", d, hidden, cfg.mlp_bias),
            down: linear("down_proj", hidden, d, cfg.mlp_bias),
        }
    } else {
        Mlp::Plain {
            up: linear("up_proj", d, hidden, cfg.mlp_bias),
            down: linear("down_proj", hidden, d, cfg.mlp_bias),
        }
    };
    let scale = |name: &str| Some((&p / name).var("lambda1", &[d], nn::Init::Const(1.)));
    Block {
        norm1: LayerNorm::new(&p / "norm1", d, eps),
        attention: SelfAttention {
            q: Linear::new(&att / "q_proj", d, d, cfg.query_bias),
            k: Linear::new(&att / "k_proj", d, d, cfg.key_bias),
            v: Linear::new(&att / "v_proj", d, d, cfg.value_bias),
            o: Linear::new(&att / "o_proj", d, d, cfg.proj_bias),
            heads: cfg.num_attention_heads,
        },
        scale1: scale("layer_scale1"),
        norm2: LayerNorm::new(&p / "norm2", d, eps),
        mlp,
        scale2: scale("layer_scale2"),
        activation: Activation::parse(&cfg.hidden_act).unwrap_or(Activation::Gelu),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_has_the_published_parameter_count() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Dinov3::new(vs.root(), &Config::vit_base());
        // DINOv3ViTModel(facebook/dinov3-vitb16-pretrain-lvd1689m).
        assert_eq!(frozen::parameter_count(&vs), 85_660_416);
        assert!(Config::vit_base()
            .describe()
            .starts_with("DINOv3 ViT-B/16, 12 layers"));
    }

    #[test]
    fn rejects_a_head_size_the_rope_cannot_split() {
        let cfg: Config = serde_json::from_str(
            r#"{"model_type": "dinov3_vit", "hidden_size": 60, "num_attention_heads": 6}"#,
        )
        .unwrap();
        assert!(
            cfg.validate().unwrap_err().contains("multiple of 4"),
            "{:?}",
            cfg.validate()
        );
    }
}
