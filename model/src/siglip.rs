//! The SigLIP vision tower (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training") and the
//! fixed-resolution SigLIP 2 checkpoints, which use the same architecture, as frozen feature extractors.
//!
//! Reference: transformers 5.23 `models/siglip/modeling_siglip.py` (`SiglipVisionModel`). Checkpoints:
//! `google/siglip-base-patch16-224`, `google/siglip2-base-patch16-224` and their siblings are full
//! `SiglipModel`s (`vision_model.*` next to `text_model.*`, `logit_scale`, `logit_bias`); a saved
//! `SiglipVisionModel` has no prefix. Both load; outside the vision tower everything is ignored, and so is
//! the attention-pooling `head.*` (it only pools) and a saved `position_ids` buffer. Within the tower
//! loading is strict. The NaFlex SigLIP 2 variants (`siglip2` model_type: linear patch embedding over
//! variable aspect ratios) are a different network and are not read.
//!
//! Unlike CLIP there is no class token and no pre-norm: the features are transformers'
//! `last_hidden_state`, every token after `post_layernorm`, the tokens SigLIP's pooling head attends to.

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use crate::clip::clip_layer;
use crate::frozen::{self, EncoderError, InputNorm, LayerNorm, Precision};
use crate::vit::{self, Activation, Block};

/// SigLIP's processors scale pixels to [−1, 1]: mean and std 0.5 on every channel.
pub const SIGLIP_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
pub const SIGLIP_STD: [f64; 3] = [0.5, 0.5, 0.5];

/// Prefix of the vision tower in full `SiglipModel` checkpoints.
const PREFIX: &str = "vision_model";

/// The fields of a transformers `SiglipVisionConfig` that change the forward pass; defaults are
/// transformers'. Unknown keys are accepted: the file is Hugging Face's.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Config {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: i64,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "default_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "default_channels")]
    pub num_channels: i64,
    #[serde(default = "default_image_size")]
    pub image_size: i64,
    #[serde(default = "default_patch_size")]
    pub patch_size: i64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

fn default_model_type() -> String {
    "siglip_vision_model".into()
}
fn default_hidden_size() -> i64 {
    768
}
fn default_intermediate_size() -> i64 {
    3072
}
fn default_layers() -> i64 {
    12
}
fn default_heads() -> i64 {
    12
}
fn default_channels() -> i64 {
    3
}
fn default_image_size() -> i64 {
    224
}
fn default_patch_size() -> i64 {
    16
}
fn default_hidden_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-6
}

/// A full `SiglipConfig` nests the vision tower's settings; a `SiglipVisionConfig` is them.
#[derive(serde::Deserialize)]
struct FileConfig {
    vision_config: Option<Config>,
    #[serde(flatten)]
    bare: Config,
}

impl Config {
    /// `google/siglip-base-patch16-224`'s (and `google/siglip2-base-patch16-224`'s) vision tower.
    pub fn base_patch16_224() -> Self {
        Config {
            model_type: default_model_type(),
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 16,
            hidden_act: default_hidden_act(),
            layer_norm_eps: 1e-6,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, EncoderError> {
        let file: FileConfig = frozen::read_json_config(path)?;
        let cfg = if file.bare.model_type == "siglip" {
            file.vision_config.unwrap_or_else(|| Config {
                model_type: default_model_type(),
                ..file.bare
            })
        } else {
            file.bare
        };
        cfg.validate().map_err(|message| EncoderError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.model_type != "siglip_vision_model" {
            return Err(format!(
                "model_type `{}` is not siglip or siglip_vision_model",
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
        Ok(())
    }

    /// Side of the square grid the position table was trained for (14 at 224 px with patch 16).
    pub fn position_grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// "SigLIP ViT-B/16, 12 layers, ...": what `encoders check` prints.
    pub fn describe(&self) -> String {
        format!(
            "SigLIP ViT-{}/{}, {} layers, hidden {}, {} heads, {} MLP hidden {}, position grid {g}x{g} ({} px), no class token",
            vit::size_name(self.hidden_size),
            self.patch_size,
            self.num_hidden_layers,
            self.hidden_size,
            self.num_attention_heads,
            self.hidden_act,
            self.intermediate_size,
            self.image_size,
            g = self.position_grid(),
        )
    }
}

/// x / 255, SigLIP's [−1, 1] scaling, then the torch bicubic resize; float32.
pub fn input_norm() -> InputNorm {
    InputNorm::new("SigLIP preprocessing", SIGLIP_MEAN, SIGLIP_STD, false)
}

/// A frozen SigLIP vision tower.
#[derive(Debug)]
pub struct Siglip {
    pub config: Config,
    patch_weight: Tensor,
    patch_bias: Tensor,
    /// (grid², D), an `nn.Embedding` in transformers.
    position_embedding: Tensor,
    layers: Vec<Block>,
    post_layernorm: LayerNorm,
    pub precision: Precision,
    pub input: InputNorm,
}

impl Siglip {
    /// Builds the network with zero-initialised variables under `p` (`SiglipVisionModel` names).
    pub fn new(p: nn::Path, config: &Config) -> Self {
        let (d, eps) = (config.hidden_size, config.layer_norm_eps);
        let zeros = nn::Init::Const(0.);
        let emb = &p / "embeddings";
        let patch = &emb / "patch_embedding";
        let grid = config.position_grid();
        let activation = Activation::parse(&config.hidden_act).unwrap_or(Activation::GeluTanh);
        Siglip {
            config: config.clone(),
            patch_weight: patch.var(
                "weight",
                &[d, config.num_channels, config.patch_size, config.patch_size],
                zeros,
            ),
            patch_bias: patch.var("bias", &[d], zeros),
            position_embedding: (&emb / "position_embedding").var(
                "weight",
                &[grid * grid, d],
                zeros,
            ),
            layers: (0..config.num_hidden_layers)
                .map(|i| {
                    clip_layer(
                        &p / "encoder" / "layers" / i,
                        d,
                        config.intermediate_size,
                        config.num_attention_heads,
                        eps,
                        activation,
                    )
                })
                .collect(),
            post_layernorm: LayerNorm::new(&p / "post_layernorm", d, eps),
            precision: Precision::for_device(p.device()),
            input: input_norm(),
        }
    }

    /// Loads `config.json` + `model.safetensors` from a Hugging Face folder (see the module docs for
    /// which tensors are ignored).
    pub fn from_folder(dir: &Path, device: Device) -> Result<LoadedSiglip, EncoderError> {
        let config = Config::from_file(&dir.join(frozen::CONFIG_FILE))?;
        frozen::load_tower(
            dir,
            device,
            &[PREFIX],
            &|name| name.starts_with("head.") || name == "embeddings.position_ids",
            |p| Siglip::new(p, &config),
        )
    }

    /// All tokens (B, N, D) after `post_layernorm`, N = (H/p)·(W/p), float32. `pixels` is prepared
    /// input (B, 3, H, W); any size is accepted, the position table interpolated as transformers does
    /// with `interpolate_pos_encoding=True`. Runs under no_grad.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor, EncoderError> {
        let cfg = &self.config;
        frozen::check_image_batch("SigLIP", pixels, cfg.num_channels, cfg.patch_size)?;
        let tokens = tch::no_grad(|| {
            let (h, w) = (pixels.size()[2], pixels.size()[3]);
            let patches = vit::embed_patches(
                pixels,
                &self.patch_weight,
                Some(&self.patch_bias),
                cfg.patch_size,
                self.precision,
            );
            let positions = vit::interpolate_positions(
                &self.position_embedding.unsqueeze(0),
                h / cfg.patch_size,
                w / cfg.patch_size,
                h == w,
            );
            let mut x = patches.to_kind(Kind::Float) + positions;
            for layer in &self.layers {
                x = layer.forward(&x, None, self.precision);
            }
            self.post_layernorm.forward(&x)
        });
        Ok(tokens)
    }
}

/// A SigLIP vision tower read from a folder.
pub type LoadedSiglip = frozen::Loaded<Siglip>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_vision_section_of_a_full_siglip_config() {
        let path = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            path.path(),
            r#"{"architectures": ["SiglipModel"], "model_type": "siglip",
                "text_config": {"hidden_size": 768, "model_type": "siglip_text_model"},
                "vision_config": {"model_type": "siglip_vision_model", "patch_size": 16,
                    "image_size": 256}}"#,
        )
        .unwrap();
        let cfg = Config::from_file(path.path()).unwrap();
        assert_eq!(
            (cfg.position_grid(), cfg.hidden_act.as_str()),
            (16, "gelu_pytorch_tanh")
        );
        assert!(
            cfg.describe().starts_with("SigLIP ViT-B/16"),
            "{}",
            cfg.describe()
        );
    }

    #[test]
    fn base_has_the_published_parameter_count_without_its_head() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Siglip::new(vs.root(), &Config::base_patch16_224());
        // SiglipVisionModel(google/siglip-base-patch16-224): 92,884,224 parameters, of which the
        // attention-pooling head holds 7,087,104.
        assert_eq!(frozen::parameter_count(&vs), 92_884_224 - 7_087_104);
    }
}
