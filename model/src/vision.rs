//! One type for the frozen vision encoders that REPA alignment targets can come from, chosen by the
//! folder's `config.json`, so that callers need not know the family.

use std::path::{Path, PathBuf};

use tch::{Device, Tensor};

use crate::clip::Clip;
use crate::dinov2::{self, Dinov2};
use crate::dinov3::{self, Dinov3};
use crate::frozen::{self, EncoderError, InputNorm, Precision};
use crate::ijepa::{self, Ijepa};
use crate::mae::{self, Mae};
use crate::siglip::Siglip;

/// The `model_type`s [`VisionEncoder::from_folder`] reads, as named in errors.
pub const SUPPORTED: &str = "dinov2, dinov2_with_registers, clip, clip_vision_model, siglip, \
    siglip_vision_model, vit_mae, ijepa, dinov3_vit";

/// Which family a folder holds, from `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Dinov2,
    Clip,
    Siglip,
    Mae,
    Ijepa,
    Dinov3,
}

impl Family {
    pub const ALL: [Family; 6] = [
        Family::Dinov2,
        Family::Clip,
        Family::Siglip,
        Family::Mae,
        Family::Ijepa,
        Family::Dinov3,
    ];

    /// The family's name in cache settings and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Family::Dinov2 => "dinov2",
            Family::Clip => "clip",
            Family::Siglip => "siglip",
            Family::Mae => "mae",
            Family::Ijepa => "ijepa",
            Family::Dinov3 => "dinov3",
        }
    }

    /// The family as people write it: "DINOv2", "I-JEPA".
    pub fn label(self) -> &'static str {
        match self {
            Family::Dinov2 => "DINOv2",
            Family::Clip => "CLIP",
            Family::Siglip => "SigLIP",
            Family::Mae => "MAE",
            Family::Ijepa => "I-JEPA",
            Family::Dinov3 => "DINOv3",
        }
    }

    /// Reads `dir/config.json` and names its family, without loading weights.
    pub fn of_folder(dir: &Path) -> Result<Self, EncoderError> {
        #[derive(serde::Deserialize)]
        struct ModelType {
            model_type: Option<String>,
        }
        let path = dir.join(frozen::CONFIG_FILE);
        let found: ModelType = frozen::read_json_config(&path)?;
        match found.model_type.as_deref() {
            // Before other families were read, a folder without `model_type` loaded as DINOv2; it still
            // does, so that configs written by hand keep working.
            Some("dinov2" | "dinov2_with_registers") | None => Ok(Family::Dinov2),
            Some("clip" | "clip_vision_model") => Ok(Family::Clip),
            // SigLIP 2's fixed-resolution checkpoints are `siglip` too.
            Some("siglip" | "siglip_vision_model") => Ok(Family::Siglip),
            Some(mae::MODEL_TYPE) => Ok(Family::Mae),
            Some(ijepa::MODEL_TYPE) => Ok(Family::Ijepa),
            Some(dinov3::MODEL_TYPE) => Ok(Family::Dinov3),
            other => Err(EncoderError::Config {
                path,
                message: format!(
                    "model_type `{}` in {} is not a supported vision encoder (supported model_type: {SUPPORTED})",
                    other.unwrap_or_default(),
                    dir.display()
                ),
            }),
        }
    }
}

/// The shape of a folder's encoder, from `config.json` alone (no weights read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub family: Family,
    pub patch_size: i64,
    pub hidden_size: i64,
}

impl Shape {
    pub fn of_folder(dir: &Path) -> Result<Self, EncoderError> {
        let family = Family::of_folder(dir)?;
        let path = dir.join(frozen::CONFIG_FILE);
        let (patch_size, hidden_size) = match family {
            Family::Dinov2 => {
                let c = dinov2::Config::from_file(&path)?;
                (c.patch_size, c.hidden_size)
            }
            Family::Clip => {
                let c = crate::clip::Config::from_file(&path)?;
                (c.patch_size, c.hidden_size)
            }
            Family::Siglip => {
                let c = crate::siglip::Config::from_file(&path)?;
                (c.patch_size, c.hidden_size)
            }
            Family::Mae | Family::Ijepa => {
                let model_type = if family == Family::Mae {
                    mae::MODEL_TYPE
                } else {
                    ijepa::MODEL_TYPE
                };
                let c = crate::vit::HfVitConfig::from_file(&path, model_type)?;
                (c.patch_size, c.hidden_size)
            }
            Family::Dinov3 => {
                let c = dinov3::Config::from_file(&path)?;
                (c.patch_size, c.hidden_size)
            }
        };
        Ok(Shape {
            family,
            patch_size,
            hidden_size,
        })
    }

    /// "DINOv2/14", "CLIP/16".
    pub fn label(&self) -> String {
        format!("{}/{}", self.family.label(), self.patch_size)
    }
}

/// What every family's network offers [`VisionEncoder`].
pub trait Tower: std::fmt::Debug {
    /// Already prepared float input (B, 3, H, W) → patch tokens (B, N, hidden), float32.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor, EncoderError>;
    /// The family's uint8 → float input preparation.
    fn input(&self) -> &InputNorm;
    /// The input side REPA feeds.
    fn default_input_size(&self) -> i64;
    fn hidden_size(&self) -> i64;
    fn patch_size(&self) -> i64;
    fn precision(&self) -> Precision;
    fn set_precision(&mut self, precision: Precision);
    /// One line on the architecture, for `encoders check`.
    fn describe(&self) -> String;
}

/// The fields every tower has under the same names.
macro_rules! tower_common {
    () => {
        fn forward(&self, pixels: &Tensor) -> Result<Tensor, EncoderError> {
            Self::forward(self, pixels)
        }
        fn input(&self) -> &InputNorm {
            &self.input
        }
        fn precision(&self) -> Precision {
            self.precision
        }
        fn set_precision(&mut self, precision: Precision) {
            self.precision = precision;
        }
    };
}

impl Tower for Dinov2 {
    tower_common!();
    /// 224 for DINOv2, whose table is for 518: REPA's choice.
    fn default_input_size(&self) -> i64 {
        dinov2::INPUT_SIZE
    }
    fn hidden_size(&self) -> i64 {
        self.config.hidden_size
    }
    fn patch_size(&self) -> i64 {
        self.config.patch_size
    }
    fn describe(&self) -> String {
        self.config.describe()
    }
}

/// The towers whose default input is the side their position table (or config) was trained for.
macro_rules! tower_at_image_size {
    ($ty:ty, $($config:ident).+, $describe:expr) => {
        impl Tower for $ty {
            tower_common!();
            fn default_input_size(&self) -> i64 {
                self.$($config).+.image_size
            }
            fn hidden_size(&self) -> i64 {
                self.$($config).+.hidden_size
            }
            fn patch_size(&self) -> i64 {
                self.$($config).+.patch_size
            }
            fn describe(&self) -> String {
                $describe(&self.$($config).+)
            }
        }
    };
}

tower_at_image_size!(Clip, config, crate::clip::Config::describe);
tower_at_image_size!(Siglip, config, crate::siglip::Config::describe);
tower_at_image_size!(Dinov3, config, dinov3::Config::describe);
tower_at_image_size!(Mae, vit.config, |c: &crate::vit::HfVitConfig| c
    .describe("MAE"));
tower_at_image_size!(Ijepa, vit.config, |c: &crate::vit::HfVitConfig| c
    .describe("I-JEPA"));

/// A loaded frozen vision encoder.
#[derive(Debug)]
pub struct VisionEncoder {
    family: Family,
    tower: Box<dyn Tower>,
    /// Holds the weights the tower's tensors point into.
    _vs: tch::nn::VarStore,
    parameters: i64,
    dir: PathBuf,
}

impl VisionEncoder {
    /// Loads the encoder in `dir` (`config.json` + `model.safetensors`), its family chosen by
    /// `model_type`.
    pub fn from_folder(dir: &Path, device: Device) -> Result<Self, EncoderError> {
        fn boxed<M: Tower + 'static>(
            l: frozen::Loaded<M>,
        ) -> (Box<dyn Tower>, tch::nn::VarStore, i64) {
            (Box::new(l.model), l.vs, l.parameters)
        }
        let family = Family::of_folder(dir)?;
        let (tower, vs, parameters) = match family {
            Family::Dinov2 => boxed(Dinov2::from_folder(dir, device)?),
            Family::Clip => boxed(Clip::from_folder(dir, device)?),
            Family::Siglip => boxed(Siglip::from_folder(dir, device)?),
            Family::Mae => boxed(Mae::from_folder(dir, device)?),
            Family::Ijepa => boxed(Ijepa::from_folder(dir, device)?),
            Family::Dinov3 => boxed(Dinov3::from_folder(dir, device)?),
        };
        Ok(VisionEncoder {
            family,
            tower,
            _vs: vs,
            parameters,
            dir: dir.to_path_buf(),
        })
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// uint8 images (B, 3, H, W) → patch tokens (B, N, hidden) at `size` × `size`, float32, with
    /// the family's own normalisation and resize.
    pub fn patch_tokens(&self, images: &Tensor, size: i64) -> Result<Tensor, EncoderError> {
        self.tower.forward(&self.prepare_input(images, size)?)
    }

    /// uint8 images → the float input [`Self::forward`] takes.
    pub fn prepare_input(&self, images: &Tensor, size: i64) -> Result<Tensor, EncoderError> {
        self.tower.input().prepare(images, size)
    }

    /// Already prepared float input (B, 3, H, W) → patch tokens (B, N, hidden), float32.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor, EncoderError> {
        self.tower.forward(pixels)
    }

    /// The input side REPA feeds: 224 for DINOv2 (whose table is for 518), the trained side otherwise.
    pub fn default_input_size(&self) -> i64 {
        self.tower.default_input_size()
    }

    pub fn hidden_size(&self) -> i64 {
        self.tower.hidden_size()
    }

    pub fn patch_size(&self) -> i64 {
        self.tower.patch_size()
    }

    /// Patches per side for a `size` × `size` input; the token count is its square.
    pub fn grid(&self, size: i64) -> i64 {
        size / self.patch_size()
    }

    pub fn precision(&self) -> Precision {
        self.tower.precision()
    }

    pub fn set_precision(&mut self, precision: Precision) {
        self.tower.set_precision(precision);
    }

    pub fn parameters(&self) -> i64 {
        self.parameters
    }

    /// blake3 of the folder's `config.json` and `model.safetensors`.
    pub fn fingerprint(&self) -> Result<String, EncoderError> {
        fingerprint(&self.dir)
    }

    /// One line on the architecture, for `encoders check`.
    pub fn describe(&self) -> String {
        self.tower.describe()
    }
}

/// A family's architecture, to build a tower without a folder: random-init presets and benchmarks.
#[derive(Debug, Clone)]
pub enum TowerConfig {
    Dinov2(dinov2::Config),
    Clip(crate::clip::Config),
    Siglip(crate::siglip::Config),
    Mae(crate::vit::HfVitConfig),
    Ijepa(crate::vit::HfVitConfig),
    Dinov3(dinov3::Config),
}

impl TowerConfig {
    /// The published base-size tower of each family (I-JEPA's smallest published is ViT-H/14).
    pub fn base(family: Family) -> Self {
        match family {
            Family::Dinov2 => TowerConfig::Dinov2(dinov2::Config::vit_base()),
            Family::Clip => TowerConfig::Clip(crate::clip::Config::vit_base_patch16()),
            Family::Siglip => TowerConfig::Siglip(crate::siglip::Config::base_patch16_224()),
            Family::Mae => TowerConfig::Mae(Mae::base_config()),
            Family::Ijepa => TowerConfig::Ijepa(Ijepa::huge14_config()),
            Family::Dinov3 => TowerConfig::Dinov3(dinov3::Config::vit_base()),
        }
    }

    pub fn family(&self) -> Family {
        match self {
            TowerConfig::Dinov2(_) => Family::Dinov2,
            TowerConfig::Clip(_) => Family::Clip,
            TowerConfig::Siglip(_) => Family::Siglip,
            TowerConfig::Mae(_) => Family::Mae,
            TowerConfig::Ijepa(_) => Family::Ijepa,
            TowerConfig::Dinov3(_) => Family::Dinov3,
        }
    }

    /// One line on the architecture, as [`VisionEncoder::describe`] gives it once loaded.
    pub fn describe(&self) -> String {
        match self {
            TowerConfig::Dinov2(c) => c.describe(),
            TowerConfig::Clip(c) => c.describe(),
            TowerConfig::Siglip(c) => c.describe(),
            TowerConfig::Mae(c) => c.describe("MAE"),
            TowerConfig::Ijepa(c) => c.describe("I-JEPA"),
            TowerConfig::Dinov3(c) => c.describe(),
        }
    }

    /// Builds the tower with zero-initialised variables under `p`, under the names a saved
    /// single-tower model of the family has (no `vision_model.` / `vit.` prefix).
    pub fn build(&self, p: tch::nn::Path) -> Box<dyn Tower> {
        match self {
            TowerConfig::Dinov2(c) => Box::new(Dinov2::new(p, c)),
            TowerConfig::Clip(c) => Box::new(Clip::new(p, c)),
            TowerConfig::Siglip(c) => Box::new(Siglip::new(p, c)),
            TowerConfig::Mae(c) => Box::new(Mae::new(p, c)),
            TowerConfig::Ijepa(c) => Box::new(Ijepa::new(p, c)),
            TowerConfig::Dinov3(c) => Box::new(Dinov3::new(p, c)),
        }
    }

    /// The `config.json` transformers writes for that tower, so that both transformers and
    /// [`VisionEncoder::from_folder`] read the folder.
    pub fn config_json(&self) -> serde_json::Value {
        let with = |config: serde_json::Value, architecture: &str, extra: serde_json::Value| {
            let mut config = config;
            let map = config
                .as_object_mut()
                .expect("a config serialises to an object");
            map.insert("architectures".into(), serde_json::json!([architecture]));
            if let serde_json::Value::Object(extra) = extra {
                map.extend(extra);
            }
            config
        };
        let value = |c: &dyn erased::Serialize| c.to_json();
        match self {
            TowerConfig::Dinov2(c) => serde_json::json!({
                "architectures": ["Dinov2Model"],
                "model_type": "dinov2",
                "hidden_size": c.hidden_size,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                // transformers 5 types it as an int and rejects 4.0.
                "mlp_ratio": if c.mlp_ratio.fract() == 0.0 {
                    serde_json::json!(c.mlp_ratio as i64)
                } else {
                    serde_json::json!(c.mlp_ratio)
                },
                "hidden_act": c.hidden_act,
                "layer_norm_eps": c.layer_norm_eps,
                "image_size": c.image_size,
                "patch_size": c.patch_size,
                "num_channels": c.num_channels,
                "qkv_bias": c.qkv_bias,
                "use_swiglu_ffn": c.use_swiglu_ffn,
                "use_mask_token": c.use_mask_token,
                "layerscale_value": 1.0,
                "drop_path_rate": 0.0,
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
                "initializer_range": 0.02,
            }),
            TowerConfig::Clip(c) => serde_json::json!({
                "architectures": ["CLIPVisionModel"],
                "model_type": "clip_vision_model",
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                "num_channels": c.num_channels,
                "image_size": c.image_size,
                "patch_size": c.patch_size,
                "hidden_act": c.hidden_act,
                "layer_norm_eps": c.layer_norm_eps,
                "attention_dropout": 0.0,
                "initializer_range": 0.02,
                "initializer_factor": 1.0,
                "projection_dim": 512,
            }),
            // No pooling head is written, and the config says so.
            TowerConfig::Siglip(c) => with(
                value(c),
                "SiglipVisionModel",
                serde_json::json!({"vision_use_head": false}),
            ),
            // An encoder without masking: transformers would otherwise drop 75 % of the patches.
            TowerConfig::Mae(c) => with(
                value(c),
                "ViTMAEModel",
                serde_json::json!({"mask_ratio": 0.0}),
            ),
            TowerConfig::Ijepa(c) => with(value(c), "IJepaModel", serde_json::Value::Null),
            TowerConfig::Dinov3(c) => with(value(c), "DINOv3ViTModel", serde_json::Value::Null),
        }
    }
}

mod erased {
    /// serde's `Serialize` is not object safe; this is all `config_json` needs of it.
    pub trait Serialize {
        fn to_json(&self) -> serde_json::Value;
    }

    impl<T: serde::Serialize> Serialize for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("configs serialise")
        }
    }
}

/// The fingerprint of an encoder folder of any family, without loading it.
pub fn fingerprint(dir: &Path) -> Result<String, EncoderError> {
    frozen::fingerprint_folder(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_model_type_names_the_folder_and_the_families() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "siglip2"}"#,
        )
        .unwrap();
        let msg = Family::of_folder(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("model_type `siglip2`"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains(SUPPORTED), "{msg}");
    }
}
