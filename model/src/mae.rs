//! The MAE encoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners") as a frozen
//! feature extractor: the ViT-MAE encoder run on every patch, without masking.
//!
//! Reference: transformers 5.23 `models/vit_mae/modeling_vit_mae.py` (`ViTMAEModel`). Checkpoints:
//! `facebook/vit-mae-{base,large,huge}` are `ViTMAEForPreTraining` saves (`vit.*` next to the pixel
//! decoder's `decoder.*`); a saved `ViTMAEModel` has no prefix. Both load; the decoder is ignored.
//! transformers' encoder always shuffles the patches by random noise before dropping `mask_ratio` of
//! them; with nothing dropped the shuffle only reorders tokens, so this port skips both and keeps the
//! grid order (the parity test passes identity noise to transformers to compare).
//!
//! Features are `last_hidden_state` after the final `layernorm`, class token dropped. The position
//! table is MAE's fixed 2-D sin-cos, stored in the checkpoint and interpolated like a learned one.

use std::path::Path;

use tch::{nn, Device, Tensor};

use crate::frozen::{self, EncoderError, InputNorm, Precision};
use crate::vit::{HfVit, HfVitConfig};

pub const MODEL_TYPE: &str = "vit_mae";

/// Prefix of the encoder in `ViTMAEForPreTraining` checkpoints.
const PREFIX: &str = "vit";

/// A frozen MAE encoder.
#[derive(Debug)]
pub struct Mae {
    pub vit: HfVit,
    pub precision: Precision,
    pub input: InputNorm,
}

impl Mae {
    /// `facebook/vit-mae-base`'s encoder: ViT-B/16 at 224 px.
    pub fn base_config() -> HfVitConfig {
        HfVitConfig::base(MODEL_TYPE)
    }

    pub fn new(p: nn::Path, config: &HfVitConfig) -> Self {
        Mae {
            precision: Precision::for_device(p.device()),
            vit: HfVit::new(p, config, true),
            input: InputNorm::imagenet("MAE preprocessing"),
        }
    }

    /// Loads `config.json` + `model.safetensors` from a Hugging Face folder (see the module docs).
    pub fn from_folder(dir: &Path, device: Device) -> Result<LoadedMae, EncoderError> {
        let config = HfVitConfig::from_file(&dir.join(frozen::CONFIG_FILE), MODEL_TYPE)?;
        frozen::load_tower(dir, device, &[PREFIX], &|_| false, |p| Mae::new(p, &config))
    }

    /// Patch tokens (B, N, D) of prepared input (B, 3, H, W), any size, float32, under no_grad.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor, EncoderError> {
        let cfg = &self.vit.config;
        frozen::check_image_batch("MAE", pixels, cfg.num_channels, cfg.patch_size)?;
        Ok(self.vit.forward(pixels, self.precision))
    }
}

/// An MAE encoder read from a folder.
pub type LoadedMae = frozen::Loaded<Mae>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_has_the_published_parameter_count() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Mae::new(vs.root(), &Mae::base_config());
        // ViTMAEModel(facebook/vit-mae-base), the fixed position table included.
        assert_eq!(frozen::parameter_count(&vs), 85_798_656);
    }
}
