//! The I-JEPA context encoder (Assran et al. 2023, "Self-Supervised Learning from Images with a
//! Joint-Embedding Predictive Architecture") as a frozen feature extractor.
//!
//! Reference: transformers 5.23 `models/ijepa/modeling_ijepa.py` (`IJepaModel`). Checkpoints:
//! `facebook/ijepa_vith14_1k`, `facebook/ijepa_vith14_22k`, `facebook/ijepa_vith16_1k` (448 px) and
//! `facebook/ijepa_vitg16_22k`, saved as `IJepaModel` without prefix. A pooler (`pooler.*`, only in models
//! built with `add_pooling_layer=True`) is ignored; otherwise loading is strict.
//!
//! I-JEPA has no class token: the features are every token of `last_hidden_state`, after the final
//! `layernorm`, with the learned position table interpolated for other grids.

use std::path::Path;

use tch::{nn, Device, Tensor};

use crate::frozen::{self, EncoderError, InputNorm, Precision};
use crate::vit::{HfVit, HfVitConfig};

pub const MODEL_TYPE: &str = "ijepa";

/// A frozen I-JEPA encoder.
#[derive(Debug)]
pub struct Ijepa {
    pub vit: HfVit,
    pub precision: Precision,
    pub input: InputNorm,
}

impl Ijepa {
    /// `facebook/ijepa_vith14_1k`: ViT-H/14 at 224 px, the smallest published I-JEPA.
    pub fn huge14_config() -> HfVitConfig {
        HfVitConfig {
            hidden_size: 1280,
            num_hidden_layers: 32,
            num_attention_heads: 16,
            intermediate_size: 5120,
            layer_norm_eps: 1e-6,
            patch_size: 14,
            ..HfVitConfig::base(MODEL_TYPE)
        }
    }

    pub fn new(p: nn::Path, config: &HfVitConfig) -> Self {
        Ijepa {
            precision: Precision::for_device(p.device()),
            vit: HfVit::new(p, config, false),
            input: InputNorm::imagenet("I-JEPA preprocessing"),
        }
    }

    /// Loads `config.json` + `model.safetensors` from a Hugging Face folder (see the module docs).
    pub fn from_folder(dir: &Path, device: Device) -> Result<LoadedIjepa, EncoderError> {
        let config = HfVitConfig::from_file(&dir.join(frozen::CONFIG_FILE), MODEL_TYPE)?;
        frozen::load_tower(dir, device, &[], &|name| name.starts_with("pooler."), |p| {
            Ijepa::new(p, &config)
        })
    }

    /// Patch tokens (B, N, D) of prepared input (B, 3, H, W), any size, float32, under no_grad.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor, EncoderError> {
        let cfg = &self.vit.config;
        frozen::check_image_batch("I-JEPA", pixels, cfg.num_channels, cfg.patch_size)?;
        Ok(self.vit.forward(pixels, self.precision))
    }
}

/// An I-JEPA encoder read from a folder.
pub type LoadedIjepa = frozen::Loaded<Ijepa>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge14_has_the_published_parameter_count() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Ijepa::new(vs.root(), &Ijepa::huge14_config());
        // IJepaModel(facebook/ijepa_vith14_1k).
        assert_eq!(frozen::parameter_count(&vs), 630_762_240);
    }
}
