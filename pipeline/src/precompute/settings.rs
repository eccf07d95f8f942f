//! The cache settings a `[precompute]` section implies: the JSON whose fingerprint names a
//! cache directory. Everything that changes a cached number is in it (crop, views, stored fields,
//! encoder and VAE fingerprints, dtypes, format version); nothing that only changes speed is (workers,
//! batch size, device, chunk rows, zstd level), so `pipeline train` finds the cache from the same config
//! whatever machine wrote it.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::Config;

/// The settings JSON of a config's cache (what `stages::cache::fingerprint` hashes and the manifest
/// records). Reads the encoder and VAE folders' `config.json` and weights to fingerprint them (blake3;
/// about a second per GB); loads no network. Stable: `pipeline train` locates its cache with it.
pub fn cache_settings(config: &Config) -> anyhow::Result<serde_json::Value> {
    let p = &config.precompute;
    let d = &config.data;
    let encoder = match p.encoder_dir() {
        Some(dir) => {
            let fp = model::dinov2::fingerprint(dir)
                .with_context(|| format!("fingerprinting encoder {}", dir.display()))?;
            serde_json::json!({
                "kind": "dinov2",
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
}
