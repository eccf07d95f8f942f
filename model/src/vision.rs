//! One type for the frozen vision encoders that REPA alignment targets can come from, chosen by the
//! folder's `config.json`, so that callers need not know the family.

use std::path::Path;

use tch::{Device, Tensor};

use crate::clip::{self, Clip, LoadedClip};
use crate::dinov2::{self, Dinov2, LoadedDinov2};
use crate::frozen::{self, EncoderError, Precision};

/// The families [`VisionEncoder::from_folder`] reads, as named in errors.
pub const SUPPORTED: &str = "dinov2, dinov2_with_registers, clip, clip_vision_model";

/// A loaded frozen vision encoder.
#[derive(Debug)]
pub enum VisionEncoder {
    Dinov2(LoadedDinov2),
    Clip(LoadedClip),
}

/// Which family a folder holds, from `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Dinov2,
    Clip,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Dinov2 => "dinov2",
            Family::Clip => "clip",
        }
    }

    /// Reads `dir/config.json` and names its family, without loading weights.
    pub fn of_folder(dir: &Path) -> Result<Self, EncoderError> {
        #[derive(serde::Deserialize)]
        struct ModelType {
            model_type: Option<String>,
        }
        let path = dir.join(dinov2::CONFIG_FILE);
        let found: ModelType = frozen::read_json_config(&path)?;
        match found.model_type.as_deref() {
            // Before other families were read, a folder without `model_type` loaded as DINOv2; it still
            // does, so that configs written by hand keep working.
            Some("dinov2" | "dinov2_with_registers") | None => Ok(Family::Dinov2),
            Some("clip" | "clip_vision_model") => Ok(Family::Clip),
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

impl VisionEncoder {
    /// Loads the encoder in `dir` (`config.json` + `model.safetensors`), its family chosen by
    /// `model_type`.
    pub fn from_folder(dir: &Path, device: Device) -> Result<Self, EncoderError> {
        Ok(match Family::of_folder(dir)? {
            Family::Dinov2 => VisionEncoder::Dinov2(Dinov2::from_folder(dir, device)?),
            Family::Clip => VisionEncoder::Clip(Clip::from_folder(dir, device)?),
        })
    }

    pub fn family(&self) -> Family {
        match self {
            VisionEncoder::Dinov2(_) => Family::Dinov2,
            VisionEncoder::Clip(_) => Family::Clip,
        }
    }

    /// uint8 images (B, 3, H, W) → patch tokens (B, N, hidden) at `size` × `size`, float32, with
    /// the family's own normalisation and resize ([`dinov2::prepare_input`], [`clip::prepare_input`]).
    pub fn patch_tokens(&self, images: &Tensor, size: i64) -> Result<Tensor, EncoderError> {
        match self {
            VisionEncoder::Dinov2(l) => l.model.patch_tokens(images, size),
            VisionEncoder::Clip(l) => l.model.patch_tokens(images, size),
        }
    }

    /// uint8 images → the float input [`Self::forward`] takes.
    pub fn prepare_input(&self, images: &Tensor, size: i64) -> Result<Tensor, EncoderError> {
        match self {
            VisionEncoder::Dinov2(_) => dinov2::prepare_input(images, size),
            VisionEncoder::Clip(_) => clip::prepare_input(images, size),
        }
    }

    /// Already prepared float input (B, 3, H, W) → patch tokens (B, N, hidden), float32.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor, EncoderError> {
        match self {
            VisionEncoder::Dinov2(l) => l.model.forward(pixels),
            VisionEncoder::Clip(l) => l.model.forward(pixels),
        }
    }

    /// The input side REPA feeds: 224 for DINOv2 (whose table is for 518), the trained side for CLIP.
    pub fn default_input_size(&self) -> i64 {
        match self {
            VisionEncoder::Dinov2(_) => dinov2::INPUT_SIZE,
            VisionEncoder::Clip(l) => l.model.input_size(),
        }
    }

    pub fn hidden_size(&self) -> i64 {
        match self {
            VisionEncoder::Dinov2(l) => l.model.config.hidden_size,
            VisionEncoder::Clip(l) => l.model.config.hidden_size,
        }
    }

    pub fn patch_size(&self) -> i64 {
        match self {
            VisionEncoder::Dinov2(l) => l.model.config.patch_size,
            VisionEncoder::Clip(l) => l.model.config.patch_size,
        }
    }

    /// Patches per side for a `size` × `size` input; the token count is its square.
    pub fn grid(&self, size: i64) -> i64 {
        size / self.patch_size()
    }

    pub fn precision(&self) -> Precision {
        match self {
            VisionEncoder::Dinov2(l) => l.model.precision,
            VisionEncoder::Clip(l) => l.model.precision,
        }
    }

    pub fn set_precision(&mut self, precision: Precision) {
        match self {
            VisionEncoder::Dinov2(l) => l.model.precision = precision,
            VisionEncoder::Clip(l) => l.model.precision = precision,
        }
    }

    pub fn parameters(&self) -> i64 {
        match self {
            VisionEncoder::Dinov2(l) => l.parameters,
            VisionEncoder::Clip(l) => l.parameters,
        }
    }

    /// blake3 of the folder's `config.json` and `model.safetensors`.
    pub fn fingerprint(&self) -> Result<String, EncoderError> {
        match self {
            VisionEncoder::Dinov2(l) => l.fingerprint(),
            VisionEncoder::Clip(l) => l.fingerprint(),
        }
    }

    /// One line on the architecture, for `encoders check`.
    pub fn describe(&self) -> String {
        match self {
            VisionEncoder::Dinov2(l) => l.model.config.describe(),
            VisionEncoder::Clip(l) => l.model.config.describe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_model_type_names_the_folder_and_the_families() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "siglip"}"#,
        )
        .unwrap();
        let msg = Family::of_folder(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("model_type `siglip`"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains(SUPPORTED), "{msg}");
    }
}
