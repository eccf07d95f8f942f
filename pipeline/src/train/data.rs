//! The data a run trains on: the precompute cache it finds or fills, and the loader over its shards.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use model::tarflow::align::AlignMode;
use tch::{Device, Kind};

use super::loader::{Loader, LoaderSpec, Position};
use crate::config::Features;

/// The loader settings of a config over the given cache shards.
pub(super) fn loader_spec(
    cfg: &crate::config::Config,
    shards: Vec<PathBuf>,
    device: Device,
    split: stages::order::RankSplit,
) -> anyhow::Result<LoaderSpec> {
    let (tc, m) = (&cfg.train, &cfg.model);
    Ok(LoaderSpec {
        shards,
        batch: tc.batch,
        seed: tc.seed,
        split,
        shuffle_buffer: tc.shuffle_buffer,
        prefetch: tc.prefetch,
        latent: tc.latent,
        latent_scaling: tc.latent_scaling.unwrap_or(1.0),
        latent_shift: tc.latent_shift.unwrap_or(0.0),
        noise_sigma: if tc.noise_sigma >= 0.0 {
            tc.noise_sigma
        } else {
            m.noise_std
        },
        label_drop: tc.label_drop,
        features: if cfg.align.mode == AlignMode::None || tc.features == Features::Online {
            None
        } else {
            let tokens = cfg.align.target_tokens(m.num_tokens())?;
            Some([tokens as usize, cfg.align.encoder_dim as usize])
        },
        view_images: cfg.align.mode != AlignMode::None && tc.features == Features::Online,
        num_classes: m.num_classes,
        input_shape: [
            m.in_channels as usize,
            m.img_size as usize,
            m.img_size as usize,
        ],
        device,
    })
}

/// The loader alone, as `pipeline bench train` measures it: batches per second handed out after
/// `warmup` batches, over `batches` batches, with nothing consuming them but this loop.
pub fn loader_rate(
    cfg: &crate::config::Config,
    warmup: usize,
    batches: usize,
) -> anyhow::Result<f64> {
    let device = model::device::parse_device(&cfg.train.device)?;
    let cache_dir = prepare_cache(cfg)?;
    let shards = cache_shards(&cache_dir, &cfg.data.shards)?;
    let split = stages::order::RankSplit::resolve(cfg.train.rank, cfg.train.world)?;
    let mut data = Loader::start(
        loader_spec(cfg, shards, device, split)?,
        Position::default(),
    )?;
    for _ in 0..warmup {
        data.next()?;
    }
    let start = Instant::now();
    for _ in 0..batches {
        let batch = data.next()?;
        // A batch counts once its tensors exist on the device.
        let _ = batch.x.sum(Kind::Float).double_value(&[]);
    }
    Ok(batches as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

/// The config whose cache a run trains on: with online features the cache holds the crops (and VAE
/// moments) but no encoder tokens, so its fingerprint is that of `precompute.encoder = ""` and
/// `store_image = true`.
fn cache_config(cfg: &crate::config::Config) -> crate::config::Config {
    let mut c = cfg.clone();
    if c.train.features == Features::Online {
        c.precompute.encoder.clear();
        c.precompute.store_image = true;
    }
    c
}

/// The cache this run trains on. A directory holding a manifest (a fingerprint directory given
/// explicitly) is used as it is. Otherwise, when the config says what to precompute and which shards,
/// the cache is `<train.cache>/<fingerprint of the config's precompute settings>` — the directory
/// `pipeline precompute` writes — and shards missing from it are precomputed first, reusing the rest.
pub(super) fn prepare_cache(cfg: &crate::config::Config) -> anyhow::Result<PathBuf> {
    let cfg = &cache_config(cfg);
    let given = Path::new(&cfg.train.cache);
    let can_precompute = cfg.precompute.validate().is_ok() && !cfg.data.shards.trim().is_empty();
    if stages::cache::Manifest::path(given).exists() || !can_precompute {
        return locate_cache(given);
    }
    let (dir, settings) = crate::precompute::cache_dir(cfg, Some(given))?;
    let split = stages::order::RankSplit::resolve(cfg.train.rank, cfg.train.world)?;
    if split.world > 1 {
        // Ranks would start training before the others finished their share: precompute first.
        if !stages::cache::Manifest::path(&dir).exists() {
            bail!(
                "no cache at {} for this config: run `pipeline precompute` on every rank first",
                dir.display()
            );
        }
        return Ok(dir);
    }
    tracing::info!(
        "cache {}: precomputing the shards it lacks (the rest is reused)",
        dir.display()
    );
    let out = crate::precompute::precompute(cfg, &dir, &settings, split)?;
    println!(
        "train: cache {}: precomputed {} shards ({} samples), reused {}",
        dir.display(),
        out.computed,
        out.samples,
        out.reused
    );
    Ok(dir)
}

/// The cache directory: DIR itself when it holds a manifest, else its only fingerprint directory.
fn locate_cache(dir: &Path) -> anyhow::Result<PathBuf> {
    if stages::cache::Manifest::path(dir).exists() {
        return Ok(dir.to_path_buf());
    }
    let hint = "create it with `pipeline precompute --config C` (DINOv2 features, VAE moments and crops of the source shards), \
                then pass --cache ROOT or --cache ROOT/FINGERPRINT";
    if !dir.exists() {
        bail!("no precompute cache at {}: {hint}", dir.display());
    }
    let found: Vec<PathBuf> = stages::cache::maintenance::fingerprint_dirs(dir)?
        .into_iter()
        .filter(|d| stages::cache::Manifest::path(d).exists())
        .collect();
    match found.len() {
        0 => bail!(
            "{} holds no precompute cache (no manifest.json): {hint}",
            dir.display()
        ),
        1 => Ok(found.into_iter().next().expect("one")),
        _ => bail!(
            "{} holds {} caches ({}); pass the one to train on as --cache ROOT/FINGERPRINT",
            dir.display(),
            found.len(),
            found
                .iter()
                .map(|d| d
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The cache shard files for the configured source shards (all cached ones when `spec` is empty).
pub(super) fn cache_shards(dir: &Path, spec: &str) -> anyhow::Result<Vec<PathBuf>> {
    let manifest = stages::cache::Manifest::load(dir)?
        .with_context(|| format!("{}: no manifest.json", dir.display()))?;
    // The names precompute recorded sources under: a path's or URL's file name, a `pipe:` command's.
    let base = stages::shardspec::shard_name;
    let by_base: std::collections::BTreeMap<String, &stages::cache::ManifestShard> =
        manifest.shards.iter().map(|(k, v)| (base(k), v)).collect();
    let wanted: Vec<String> = if spec.trim().is_empty() {
        by_base.keys().cloned().collect()
    } else {
        stages::shardspec::expand_shard_spec(spec)?
            .iter()
            .map(|s| base(s))
            .collect()
    };
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|w| !by_base.contains_key(*w))
        .collect();
    if !missing.is_empty() {
        let list: Vec<&str> = missing.iter().take(5).map(|s| s.as_str()).collect();
        bail!(
            "cache {} lacks {} of the {} requested shards ({}{}): run `pipeline precompute` for them first",
            dir.display(),
            missing.len(),
            wanted.len(),
            list.join(", "),
            if missing.len() > 5 { ", …" } else { "" }
        );
    }
    let mut files: Vec<PathBuf> = wanted.iter().map(|w| dir.join(&by_base[w].file)).collect();
    files.sort();
    files.dedup();
    for f in &files {
        if !f.exists() {
            bail!("cache shard {} is listed in the manifest but missing; run `pipeline cache verify` and precompute again", f.display());
        }
    }
    Ok(files)
}
