//! The cache settings a `[precompute]` section implies: the JSON whose fingerprint names a
//! cache directory. Everything that changes a cached number is in it (crop, views, stored fields,
//! encoder family, encoder and VAE fingerprints, dtypes, format version); nothing that only changes
//! speed is (workers, batch size, device, chunk rows, zstd level), so `pipeline train` finds the cache
//! from the same config whatever machine wrote it.

use std::path::{Path, PathBuf};

use anyhow::Context;

use model::vision::Family;

use crate::config::Config;

/// The settings JSON of a config's cache (what `stages::cache::fingerprint` hashes and the manifest
/// records). Reads the encoder and VAE folders' `config.json` and weights to fingerprint them (blake3;
/// about a second per GB); loads no network. Stable: `pipeline train` locates its cache with it.
pub fn cache_settings(config: &Config) -> anyhow::Result<serde_json::Value> {
    let p = &config.precompute;
    let d = &config.data;
    let encoder = match p.encoder_dir() {
        Some(dir) => {
            let fingerprint = || -> Result<_, model::frozen::EncoderError> {
                Ok((Family::of_folder(dir)?, model::vision::fingerprint(dir)?))
            };
            let (family, fp) = fingerprint()
                .with_context(|| format!("fingerprinting encoder {}", dir.display()))?;
            // "kind" is the family ("dinov2", "clip"): a DINOv2 folder gives the JSON it always has, so
            // its caches keep their fingerprint; "preprocess": "repa" is REPA's input preparation for
            // that family (`model::vision::VisionEncoder::prepare_input`).
            serde_json::json!({
                "kind": family.name(),
                "fingerprint": fp,
                "input_size": p.encoder_input_size,
                "preprocess": "repa",
                "dtype": p.features_dtype,
            })
        }
        None => serde_json::Value::Null,
    };
    let vae = match p.vae_dir() {
        Some(dir) => {
            let fp = model::vae::fingerprint(dir)
                .with_context(|| format!("fingerprinting VAE {}", dir.display()))?;
            serde_json::json!({ "kind": "autoencoder_kl", "fingerprint": fp, "moments": "mean_std", "dtype": p.vae_dtype })
        }
        None => serde_json::Value::Null,
    };
    Ok(serde_json::json!({
        "format_version": stages::cache::shard::FORMAT_VERSION,
        "crop": {
            "image_size": d.image_size,
            "mode": d.crop,
            "resize_impl": d.resize_impl,
            "decode_scale": d.decode_scale,
        },
        "input": {
            "image_keys": d.image_keys,
            "label": d.label,
            "label_json_field": d.label_json_field,
        },
        "views": if p.flip { vec!["crop", "hflip"] } else { vec!["crop"] },
        "store_image": p.store_image,
        "encoder": encoder,
        "vae": vae,
    }))
}

/// `<cache root>/<fingerprint>` for a config, with its settings. `root` overrides `precompute.cache`.
pub fn cache_dir(
    config: &Config,
    root: Option<&Path>,
) -> anyhow::Result<(PathBuf, serde_json::Value)> {
    let settings = cache_settings(config)?;
    let root = root
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(&config.precompute.cache));
    Ok((root.join(stages::cache::fingerprint(&settings)), settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(sets: &[&str]) -> serde_json::Value {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let loaded =
            crate::config::load_str("[precompute]\nstore_image = true\n", "t.toml", &sets).unwrap();
        cache_settings(&loaded.config).unwrap()
    }

    #[test]
    fn fingerprint_sees_numbers_not_speed() {
        let fp = |s: &[&str]| stages::cache::fingerprint(&with(s));
        let base = fp(&[]);
        assert_eq!(
            base,
            fp(&[
                "precompute.workers=7",
                "precompute.encode_threads=3",
                "precompute.batch_size=3",
                "precompute.device=cpu"
            ])
        );
        assert_eq!(
            base,
            fp(&[
                "precompute.chunk_rows=5",
                "precompute.zstd_level=19",
                "data.threads=9"
            ])
        );
        assert_ne!(base, fp(&["data.image_size=64"]));
        assert_ne!(base, fp(&["precompute.flip=false"]));
        assert_ne!(base, fp(&["data.crop=\"resize_center_crop\""]));
        assert_ne!(base, fp(&["data.resize_impl=\"fast\""]));
    }

    /// A folder with `config.json` of `model_type` and fixed stand-in weights: the settings hash the
    /// files, they do not load them.
    fn encoder_folder(model_type: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(r#"{{"model_type": "{model_type}"}}"#);
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"stand-in weights").unwrap();
        dir
    }

    fn encoder_section(dir: &Path) -> serde_json::Value {
        let set = format!("precompute.encoder={:?}", dir.display().to_string());
        with(&[&set])["encoder"].clone()
    }

    /// The encoder section a DINOv2 folder gave before CLIP was accepted, key for key: caches made
    /// then keep their fingerprint directory.
    #[test]
    fn dinov2_encoder_settings_are_unchanged() {
        let dir = encoder_folder("dinov2");
        assert_eq!(
            encoder_section(dir.path()),
            serde_json::json!({
                "kind": "dinov2",
                "fingerprint": "2635eae3f0b2e2dd36eb329e08436bf0e2ca9d6cab7b80c7a50c5ca2b59fd0ee",
                "input_size": 224,
                "preprocess": "repa",
                "dtype": "f16",
            })
        );
    }

    /// Every family's folder names its family, so its cache never shares a directory with another
    /// family's; a model_type no family reads is an error naming it.
    #[test]
    fn encoder_settings_name_the_family() {
        let dir = encoder_folder("clip_vision_model");
        let clip = encoder_section(dir.path());
        assert_eq!(clip["kind"], "clip");
        assert_eq!(clip["input_size"], 224);
        let dino = encoder_folder("dinov2");
        assert_ne!(clip, encoder_section(dino.path()));
        for (model_type, kind) in [
            ("siglip", "siglip"),
            ("siglip_vision_model", "siglip"),
            ("vit_mae", "mae"),
            ("ijepa", "ijepa"),
            ("dinov3_vit", "dinov3"),
        ] {
            let dir = encoder_folder(model_type);
            assert_eq!(encoder_section(dir.path())["kind"], kind, "{model_type}");
        }
        let other = encoder_folder("siglip2");
        let set = format!(
            "precompute.encoder={:?}",
            other.path().display().to_string()
        );
        let loaded = crate::config::load_str("[precompute]\n", "t.toml", &[set]).unwrap();
        let err = format!("{:#}", cache_settings(&loaded.config).unwrap_err());
        assert!(err.contains("model_type `siglip2`"), "{err}");
    }
}
