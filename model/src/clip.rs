//! The CLIP vision tower (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
//! Supervision") as a frozen feature extractor, the counterpart of [`crate::dinov2`].
//!
//! Reference: transformers 5.23 `models/clip/modeling_clip.py` (`CLIPVisionModel`). Checkpoints: a folder
//! with `config.json` and `model.safetensors`, either a full `CLIPModel` (`openai/clip-vit-base-patch16`:
//! `vision_model.*` next to `text_model.*`, `visual_projection`, `logit_scale`) or a `CLIPVisionModel`.
//! transformers 5 saves the latter without the `vision_model.` prefix (its vision tower is no longer a
//! submodule) while older saves and the full model carry it; both load. Only the vision tower is kept:
//! every tensor outside `vision_model.*` of a prefixed checkpoint is ignored, as is the `position_ids`
//! buffer older checkpoints saved. Within the tower loading is strict.
//!
//! Features are transformers' `last_hidden_state` with the class token dropped: the last layer's patch
//! tokens *before* `post_layernorm`, which CLIP only applies to the pooled class token. Input preparation
//! follows REPA's `preprocess_raw_image` for CLIP (see [`prepare_input`]).

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use crate::frozen::{self, EncoderError, InputNorm, LayerNorm, Linear, Precision};
use crate::vit::{self, Activation, Block, Mlp, SelfAttention};

pub use crate::frozen::{CONFIG_FILE, WEIGHTS_FILE};

/// OpenAI CLIP normalisation (`OPENAI_CLIP_MEAN` / `_STD` in transformers and open_clip).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Prefix of the vision tower in full `CLIPModel` checkpoints and pre-5 `CLIPVisionModel` saves.
const PREFIX: &str = "vision_model";

/// The fields of a transformers `CLIPVisionConfig` that change the forward pass; defaults are
/// transformers'. Unknown keys are accepted: the file is Hugging Face's, not ours.
#[derive(Debug, Clone, serde::Deserialize)]
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
    "clip_vision_model".into()
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
    32
}
fn default_hidden_act() -> String {
    "quick_gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}

/// A full `CLIPConfig` nests the vision tower's settings; a `CLIPVisionConfig` is them.
#[derive(serde::Deserialize)]
struct FileConfig {
    vision_config: Option<Config>,
    #[serde(flatten)]
    bare: Config,
}

impl Config {
    /// `openai/clip-vit-base-patch16`'s vision tower: ViT-B/16 at 224 px.
    pub fn vit_base_patch16() -> Self {
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
            layer_norm_eps: 1e-5,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, EncoderError> {
        let file: FileConfig = frozen::read_json_config(path)?;
        let cfg = Self::from_parsed(file);
        cfg.validate().map_err(|message| EncoderError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn from_parsed(file: FileConfig) -> Self {
        if file.bare.model_type == "clip" {
            // A `CLIPConfig` without `vision_config` means transformers' default vision tower.
            file.vision_config.unwrap_or_else(|| Config {
                model_type: default_model_type(),
                ..file.bare
            })
        } else {
            file.bare
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.model_type != "clip_vision_model" {
            return Err(format!(
                "model_type `{}` is not clip or clip_vision_model",
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

    /// Side of the square grid the position table was trained for (14 for ViT-B/16 at 224 px).
    pub fn position_grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// "CLIP ViT-B/16, 12 layers, ...": what `encoders check` prints.
    pub fn describe(&self) -> String {
        let size = crate::vit::size_name(self.hidden_size);
        format!(
            "CLIP ViT-{size}/{}, {} layers, hidden {}, {} heads, {} MLP hidden {}, position grid {g}x{g} ({} px)",
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

/// Turns uint8 images (B, 3, H, W) into CLIP input as REPA's `preprocess_raw_image` does for CLIP:
/// x / 255, torch bicubic resize (a = −0.75, no antialias, align_corners false) to `size` × `size`, then
/// the CLIP mean/std. REPA resizes before normalising here and after it for DINOv2; the order is kept
/// so that both match REPA to the last bit. Always float32.
pub fn prepare_input(images: &Tensor, size: i64) -> Result<Tensor, EncoderError> {
    input_norm().prepare(images, size)
}

fn input_norm() -> InputNorm {
    InputNorm::new("CLIP preprocessing", CLIP_MEAN, CLIP_STD, true)
}

/// A frozen CLIP vision tower.
#[derive(Debug)]
pub struct Clip {
    pub config: Config,
    embeddings: Embeddings,
    pre_layrnorm: LayerNorm,
    layers: Vec<Block>,
    // Only the pooled class token goes through it; holding it keeps loading strict.
    _post_layernorm: LayerNorm,
    pub precision: Precision,
    pub input: InputNorm,
}

impl Clip {
    /// Builds the network with zero-initialised variables under `p` (`CLIPVisionModel` names below it:
    /// pass `root / "vision_model"` for a full `CLIPModel` layout).
    pub fn new(p: nn::Path, config: &Config) -> Self {
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        Clip {
            config: config.clone(),
            embeddings: Embeddings::new(&p / "embeddings", config),
            pre_layrnorm: LayerNorm::new(&p / "pre_layrnorm", d, eps),
            layers: (0..config.num_hidden_layers)
                .map(|i| {
                    clip_layer(
                        &p / "encoder" / "layers" / i,
                        d,
                        config.intermediate_size,
                        config.num_attention_heads,
                        eps,
                        Activation::parse(&config.hidden_act).unwrap_or(Activation::QuickGelu),
                    )
                })
                .collect(),
            _post_layernorm: LayerNorm::new(&p / "post_layernorm", d, eps),
            precision: Precision::for_device(p.device()),
            input: input_norm(),
        }
    }

    /// Loads `config.json` + `model.safetensors` from a Hugging Face folder (see the module docs for
    /// which tensors are ignored).
    pub fn from_folder(dir: &Path, device: Device) -> Result<LoadedClip, EncoderError> {
        let config = Config::from_file(&dir.join(CONFIG_FILE))?;
        frozen::load_tower(
            dir,
            device,
            &[PREFIX],
            &|name| name == "embeddings.position_ids",
            |p| Clip::new(p, &config),
        )
    }

    /// The input side the position table was trained for (`image_size`, 224 for ViT-B/16).
    pub fn input_size(&self) -> i64 {
        self.config.image_size
    }

    /// Last-layer patch tokens (B, N, D) before `post_layernorm`, N = (H/p)·(W/p), class token
    /// excluded, float32: `last_hidden_state[:, 1:]`. `pixels` is prepared input (B, 3, H, W) float (see
    /// [`prepare_input`]); any size is accepted, the position table interpolated as transformers does
    /// with `interpolate_pos_encoding=True`. Runs under no_grad.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor, EncoderError> {
        frozen::check_image_batch(
            "CLIP",
            pixels,
            self.config.num_channels,
            self.config.patch_size,
        )?;
        let tokens = tch::no_grad(|| {
            let x = self
                .embeddings
                .forward(pixels, &self.config, self.precision);
            let mut x = self.pre_layrnorm.forward(&x);
            for layer in &self.layers {
                x = layer.forward(&x, None, self.precision);
            }
            x.narrow(1, 1, x.size()[1] - 1).to_kind(Kind::Float)
        });
        Ok(tokens)
    }

    /// uint8 images (B, 3, H, W) → patch tokens at `size` × `size`: [`prepare_input`] then
    /// [`Self::forward`].
    pub fn patch_tokens(&self, images: &Tensor, size: i64) -> Result<Tensor, EncoderError> {
        self.forward(&self.input.prepare(images, size)?)
    }
}

/// A CLIP vision tower read from a folder.
pub type LoadedClip = frozen::Loaded<Clip>;

/// The fingerprint of a CLIP folder, without loading it.
pub fn fingerprint(dir: &Path) -> Result<String, EncoderError> {
    frozen::fingerprint_folder(dir)
}

#[derive(Debug)]
struct Embeddings {
    class_embedding: Tensor,
    /// Conv weight (D, C, p, p); CLIP's patch embedding has no bias, unlike [`frozen::Conv2d`].
    patch_embedding: Tensor,
    /// (1 + grid², D), an `nn.Embedding` in transformers.
    position_embedding: Tensor,
}

impl Embeddings {
    fn new(p: nn::Path, cfg: &Config) -> Self {
        let d = cfg.hidden_size;
        let zeros = nn::Init::Const(0.);
        let grid = cfg.position_grid();
        Embeddings {
            class_embedding: p.var("class_embedding", &[d], zeros),
            patch_embedding: (&p / "patch_embedding").var(
                "weight",
                &[d, cfg.num_channels, cfg.patch_size, cfg.patch_size],
                zeros,
            ),
            position_embedding: (&p / "position_embedding").var(
                "weight",
                &[grid * grid + 1, d],
                zeros,
            ),
        }
    }

    /// Position table for an input of `height` × `width` pixels: `interpolate_pos_encoding` of
    /// transformers' `CLIPVisionEmbeddings`, including when it leaves the table as is (patch count
    /// unchanged and a square input) and its bicubic without antialiasing.
    fn positions(&self, height: i64, width: i64, cfg: &Config) -> Tensor {
        let table = self.position_embedding.unsqueeze(0);
        let n_positions = table.size()[1] - 1;
        let patches = vit::interpolate_positions(
            &table.narrow(1, 1, n_positions),
            height / cfg.patch_size,
            width / cfg.patch_size,
            height == width,
        );
        Tensor::cat(&[table.narrow(1, 0, 1), patches], 1)
    }

    fn forward(&self, pixels: &Tensor, cfg: &Config, precision: Precision) -> Tensor {
        let (b, h, w) = (pixels.size()[0], pixels.size()[2], pixels.size()[3]);
        let patches = vit::embed_patches(
            pixels,
            &self.patch_embedding,
            None,
            cfg.patch_size,
            precision,
        );
        let cls = self
            .class_embedding
            .view([1, 1, cfg.hidden_size])
            .expand([b, 1, cfg.hidden_size], true);
        // As under autocast: `cat` promotes the bf16 patches to the class token's fp32.
        Tensor::cat(&[cls, patches.to_kind(Kind::Float)], 1) + self.positions(h, w, cfg)
    }
}

/// One block under CLIP's names: `layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`,
/// `mlp.{fc1,fc2}` (SigLIP's are the same).
pub(crate) fn clip_layer(
    p: nn::Path,
    d: i64,
    intermediate: i64,
    heads: i64,
    eps: f64,
    activation: Activation,
) -> Block {
    let mlp = &p / "mlp";
    Block {
        norm1: LayerNorm::new(&p / "layer_norm1", d, eps),
        attention: SelfAttention::clip_names(&(&p / "self_attn"), d, heads),
        scale1: None,
        norm2: LayerNorm::new(&p / "layer_norm2", d, eps),
        mlp: Mlp::Plain {
            up: Linear::new(&mlp / "fc1", d, intermediate, true),
            down: Linear::new(&mlp / "fc2", intermediate, d, true),
        },
        scale2: None,
        activation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of `openai/clip-vit-base-patch16`'s config.json: a `CLIPConfig` whose text settings
    /// and top-level keys must not leak into the vision tower.
    const FULL: &str = r#"{"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512,
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "model_type": "clip_text_model",
            "num_attention_heads": 8},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "model_type": "clip_vision_model",
            "num_attention_heads": 12, "num_hidden_layers": 12, "patch_size": 16, "image_size": 224,
            "projection_dim": 512, "dropout": 0.0},
        "torch_dtype": "float32", "transformers_version": null}"#;

    fn parse(text: &str) -> Config {
        Config::from_parsed(serde_json::from_str(text).unwrap())
    }

    #[test]
    fn reads_the_vision_section_of_a_full_clip_config() {
        let cfg = parse(FULL);
        cfg.validate().unwrap();
        assert_eq!(cfg.patch_size, 16);
        assert_eq!(cfg.position_grid(), 14);
        assert_eq!(cfg.hidden_act, "quick_gelu");
        assert!(
            cfg.describe().starts_with("CLIP ViT-B/16, 12 layers"),
            "{}",
            cfg.describe()
        );
    }

    #[test]
    fn reads_a_bare_vision_config_and_rejects_what_it_cannot_run() {
        let cfg =
            parse(r#"{"model_type": "clip_vision_model", "patch_size": 14, "image_size": 336}"#);
        cfg.validate().unwrap();
        assert_eq!(cfg.position_grid(), 24);
        let cfg = parse(r#"{"model_type": "clip_text_model"}"#);
        assert!(cfg
            .validate()
            .unwrap_err()
            .contains("model_type `clip_text_model`"));
        let cfg = parse(r#"{"hidden_act": "relu"}"#);
        assert!(cfg.validate().unwrap_err().contains("hidden_act `relu`"));
    }

    #[test]
    fn vit_b16_has_the_published_parameter_count() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Clip::new(vs.root(), &Config::vit_base_patch16());
        // CLIPVisionModel.from_pretrained("openai/clip-vit-base-patch16"): 85,799,424 parameters.
        assert_eq!(frozen::parameter_count(&vs), 85_799_424);
    }
}
