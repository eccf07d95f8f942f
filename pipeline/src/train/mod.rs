//! `pipeline train [--latent]`: TARFlow on a precompute cache with NLL + λ·alignment (spec §2, §4.7),
//! AdamW, EMA, checkpoints that resume exactly, metrics JSONL and EMA sample grids.

mod checkpoint;
mod config;
mod dry_run;
mod fid_eval;
mod launch;
mod loader;
pub(crate) mod optim;
mod replicas;
pub(crate) mod step;
mod tensorboard;
mod trainer;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use model::tarflow::align::AlignMode;
use model::tarflow::{self, Model};
use tch::{nn, Device, Kind, Tensor};

pub use config::TrainConfig;
pub use launch::Launch;
use loader::{Loader, LoaderSpec, Position};
use trainer::Trainer;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: crate::config::ConfigArgs,
    /// Train on cached VAE latents (sets train.latent); without it, pixel space on the cached crops
    #[arg(long)]
    latent: bool,
    /// Source shards to train on (overrides data.shards), e.g. /data/imagenet/imagenet-train-{000000..001281}.tar
    #[arg(long, value_name = "SPEC")]
    shards: Option<String>,
    /// Cache root or fingerprint directory (overrides train.cache)
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Run directory: config.toml, metrics.jsonl, checkpoints/, samples/
    #[arg(long, value_name = "RUN_DIR", default_value = "runs/train")]
    out: PathBuf,
    /// Continue from RUN_DIR/checkpoints/latest
    #[arg(long)]
    resume: bool,
    /// Build the model and print parameters, optimizer-state bytes and an activation estimate per
    /// micro-batch, then exit: no data is read and nothing is written
    #[arg(long)]
    dry_run: bool,
    /// Stop after this many steps (with a checkpoint), as an interrupted run would; continue with --resume
    #[arg(long, value_name = "STEP")]
    stop_at: Option<u64>,
    /// Test hook: make the loss of these steps non-finite (NaN in the batch)
    #[arg(long, hide = true, value_delimiter = ',')]
    inject_nan_at: Vec<u64>,
    /// Test hook: make one gradient element of these steps infinite while the loss stays finite
    #[arg(long, hide = true, value_delimiter = ',')]
    inject_inf_grad_at: Vec<u64>,
    /// Test hook: make libtorch raise an error inside these steps (a shape mismatch)
    #[arg(long, hide = true, value_delimiter = ',')]
    inject_torch_error_at: Vec<u64>,
    /// Test hook: sleep this long before writing each checkpoint
    #[arg(long, hide = true, value_name = "MS")]
    slow_checkpoint_ms: Option<u64>,
    /// Test hook: one process whose every batch is the concatenation of the batches ranks 0..N of an
    /// N-rank job would read (what a data-parallel run averages over)
    #[arg(long, hide = true, value_name = "N")]
    union_of_ranks: Option<usize>,
}

/// The effective config of a training job: the file, `--latent`/`--shards`/`--cache` as overrides, the
/// latent scaling resolved from the VAE when the config leaves it unset and `model.noise_std` set to
/// the trained σ (written into the run's config.toml and the checkpoints' sidecars, so sampling and
/// classification decode and denoise with what the flow was trained with).
pub fn load_config(
    config: &crate::config::ConfigArgs,
    latent: bool,
    shards: &Option<String>,
    cache: &Option<PathBuf>,
) -> anyhow::Result<crate::config::Loaded> {
    load_config_with(config, latent, shards, cache, true)
}

/// `load_config`, optionally without reading the VAE folder (a dry run needs no latent factors).
fn load_config_with(
    config: &crate::config::ConfigArgs,
    latent: bool,
    shards: &Option<String>,
    cache: &Option<PathBuf>,
    resolve_latent: bool,
) -> anyhow::Result<crate::config::Loaded> {
    let mut overrides = config.overrides.clone();
    if latent {
        overrides.push("train.latent=true".into());
    }
    if let Some(spec) = shards {
        overrides.push(format!("data.shards={spec:?}"));
    }
    if let Some(dir) = cache {
        overrides.push(format!("train.cache={:?}", dir.display().to_string()));
    }
    let mut loaded = crate::config::ConfigArgs {
        config: config.config.clone(),
        overrides,
    }
    .load()?;
    let c = &mut loaded.config;
    c.train.validate()?;
    if resolve_latent
        && c.train.latent
        && (c.train.latent_scaling.is_none() || c.train.latent_shift.is_none())
    {
        if c.train.latent_scaling.is_some() && c.precompute.vae.is_empty() {
            // A scale given by hand without a VAE to read: the common VAEs (sd-vae) have no shift.
            c.train.latent_shift.get_or_insert(0.0);
        } else {
            let vae = vae_latent_space(c)?;
            c.train.latent_scaling.get_or_insert(vae.scaling_factor);
            c.train
                .latent_shift
                .get_or_insert(vae.shift_factor.unwrap_or(0.0));
        }
    }
    // The σ the run trains with becomes the model's noise_std, which the checkpoint's sidecar carries
    // and sampling's one-step denoising uses.
    if c.train.noise_sigma >= 0.0 {
        c.model.noise_std = c.train.noise_sigma;
    }
    loaded.effective_toml = toml::to_string_pretty(&loaded.config)?;
    Ok(loaded)
}

/// The loader settings of a config over the given cache shards.
fn loader_spec(
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
        features: if cfg.align.mode == AlignMode::None || tc.features == config::Features::Online {
            None
        } else {
            let tokens = cfg.align.target_tokens(m.num_tokens())?;
            Some([tokens as usize, cfg.align.encoder_dim as usize])
        },
        view_images: cfg.align.mode != AlignMode::None && tc.features == config::Features::Online,
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

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.dry_run {
        let loaded = load_config_with(&args.config, args.latent, &args.shards, &args.cache, false)?;
        return dry_run::run(&loaded.config);
    }
    let loaded = load_config(&args.config, args.latent, &args.shards, &args.cache)?;
    loaded.announce();
    let tc = loaded.config.train.clone();
    let hooks = trainer::Hooks {
        nan_at: args.inject_nan_at.clone(),
        inf_grad_at: args.inject_inf_grad_at.clone(),
        union_of_ranks: args.union_of_ranks,
        slow_checkpoint: args
            .slow_checkpoint_ms
            .map(std::time::Duration::from_millis),
        torch_error_at: args.inject_torch_error_at.clone(),
    };
    // From here on SIGTERM, SIGINT and SIGUSR1 finish the step, checkpoint and exit 128 + signal.
    crate::signals::install();
    let mut trainer = Trainer::new(&loaded, &args.out, args.resume, hooks)?;
    let stop = args.stop_at.unwrap_or(tc.steps).min(tc.steps);
    let progress = crate::progress::Progress::new("train", tc.steps);
    while trainer.state.step < stop {
        let every = |n: u64| n > 0 && (trainer.state.step + 1).is_multiple_of(n);
        let (metric_step, sample_step, fid_step) = (
            every(tc.metrics_every),
            every(tc.sample_every),
            every(tc.fid_every),
        );
        let checkpoint_step = every(tc.checkpoint_every) || trainer.state.step + 1 == stop;
        let step = trainer.state.step;
        let what = format!("step {step}");
        let prepared = crate::torch_guard::guard(&what, || trainer.prepare(metric_step));
        // Every rank reaches this point once per step, whatever its local part did: the failure of
        // one rank becomes every rank's stop, before any collective of the step.
        let agreed = trainer.agree(prepared.is_err())?;
        let prepared = match prepared {
            Err(e) => return Err(stop_after_failed_step(&mut trainer, e)),
            Ok(_) if !agreed.failed_ranks.is_empty() => {
                let e = anyhow::anyhow!(
                    "step {step} failed on rank(s) {:?} (their logs say why); every rank stops with them",
                    agreed.failed_ranks
                );
                return Err(stop_after_failed_step(&mut trainer, e));
            }
            Ok(p) => p,
        };
        let report = match crate::torch_guard::guard(&what, || trainer.apply(prepared)) {
            Ok(report) => report,
            // With several ranks a failure here leaves the others inside this step's collectives:
            // they end at the group's timeout with an error naming the rank, and no checkpoint is
            // written over the last one.
            Err(e) if trainer.distributed() => {
                return Err(e.context(format!(
                    "step {step} failed while the ranks were exchanging gradients; the last checkpoint stays the one to resume from"
                )))
            }
            Err(e) => return Err(stop_after_failed_step(&mut trainer, e)),
        };
        // The host learns about skipped steps here only: on metric and checkpoint steps.
        if metric_step || checkpoint_step {
            trainer.check_skips()?;
        }
        if metric_step {
            trainer.log(&report)?;
        }
        if sample_step {
            trainer.sample()?;
        }
        if fid_step {
            trainer.fid()?;
        }
        if checkpoint_step {
            trainer.checkpoint()?;
        }
        progress.set(trainer.state.step);
        if let Some(sig) = trainer.stop_requested() {
            if !checkpoint_step {
                trainer.checkpoint()?;
            }
            progress.finish();
            return Err(crate::signals::Interrupted {
                signal: sig,
                what: format!(
                    "checkpoint of step {} written to {}; continue with --resume",
                    trainer.state.step,
                    args.out.join("checkpoints").display()
                ),
            }
            .into());
        }
    }
    progress.finish();
    eprintln!(
        "trained {} steps into {} ({} non-finite steps skipped, {:.1}s waiting for data)",
        trainer.state.step,
        args.out.display(),
        trainer.state.nonfinite_total,
        trainer.data_wait().as_secs_f64()
    );
    Ok(())
}

/// A step that failed inside libtorch, on this rank or (agreed) on another: the weights are still those
/// of the last completed step everywhere (no rank had averaged or applied anything), so every rank
/// takes part in saving them before the job stops; CUDA out of memory says which setting to lower.
fn stop_after_failed_step(trainer: &mut Trainer, err: anyhow::Error) -> anyhow::Error {
    let hint = if crate::torch_guard::is_out_of_memory(&err) {
        format!(
            "; lower train.micro_batch (now {}; `pipeline train --dry-run` estimates what fits)",
            trainer.micro_batch()
        )
    } else {
        String::new()
    };
    if trainer.state.step == 0 {
        return err.context(format!("no step completed, nothing saved{hint}"));
    }
    match trainer.checkpoint_after_failure() {
        Ok(true) => err.context(format!(
            "the checkpoint of step {} (the last completed) was written; continue with --resume{hint}",
            trainer.state.step
        )),
        Ok(false) => err.context(format!(
            "saving the last completed step failed on another rank (its log says why){hint}"
        )),
        Err(save) => err.context(format!(
            "and saving the last completed step failed too: {save:#}{hint}"
        )),
    }
}

fn trainable(vs: &nn::VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, t)| (format!("{prefix}{n}"), t))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn sorted(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn restore(
    dir: &Path,
    vs: &mut nn::VarStore,
    ema_vs: &mut nn::VarStore,
    proj_vs: &mut nn::VarStore,
    has_projector: bool,
    adam: &mut optim::AdamW,
) -> anyhow::Result<checkpoint::State> {
    let mask = |n: &str| n.starts_with("blocks.") && n.ends_with(".attn_mask");
    for (file, store) in [
        ("model.safetensors", &mut *vs),
        ("ema.safetensors", &mut *ema_vs),
    ] {
        let path = dir.join(file);
        let tensors = model::weights::read_safetensors(&path)?;
        model::weights::load_into(store, &tensors, &path, &mask)?;
    }
    let proj = dir.join("projector.safetensors");
    match (has_projector, proj.exists()) {
        (true, true) => model::weights::load_strict(proj_vs, &proj, &|_| false)?,
        (true, false) => bail!(
            "{}: the config aligns but the checkpoint has no projector.safetensors",
            dir.display()
        ),
        (false, true) => bail!(
            "{}: the checkpoint has a projector but align.mode = none",
            dir.display()
        ),
        (false, false) => {}
    }
    let path = dir.join("state.safetensors");
    let moments = model::weights::read_safetensors(&path)?;
    tch::no_grad(|| -> anyhow::Result<()> {
        for (name, _, m, v) in &mut adam.slots {
            for (key, dst) in [
                (format!("m.{name}"), &mut *m),
                (format!("v.{name}"), &mut *v),
            ] {
                let src = moments.get(&key).with_context(|| {
                    format!("{}: optimizer moment `{key}` is missing", path.display())
                })?;
                if src.size() != dst.size() {
                    bail!(
                        "{}: `{key}` has shape {:?}, expected {:?}",
                        path.display(),
                        src.size(),
                        dst.size()
                    );
                }
                dst.copy_(src);
            }
        }
        Ok(())
    })?;
    let state = checkpoint::read_state(dir)?;
    adam.set_t(state.adam_t);
    Ok(state)
}

/// Keeps the metric lines up to `step`, so a resumed run's log reads as one run.
fn truncate_metrics(path: &Path, step: u64) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    stages::atomic::write_bytes_atomic(path, kept.as_bytes())?;
    Ok(())
}

/// The cache directory: DIR itself when it holds a manifest, else its only fingerprint directory.
/// The cache this run trains on. A directory holding a manifest (a fingerprint directory given
/// explicitly) is used as it is. Otherwise, when the config says what to precompute and which shards,
/// the cache is `<train.cache>/<fingerprint of the config's precompute settings>` — the directory
/// `pipeline precompute` writes — and shards missing from it are precomputed first, reusing the rest.
/// The config whose cache a run trains on: with online features the cache holds the crops (and VAE
/// moments) but no encoder tokens, so its fingerprint is that of `precompute.encoder = ""` and
/// `store_image = true`.
fn cache_config(cfg: &crate::config::Config) -> crate::config::Config {
    let mut c = cfg.clone();
    if c.train.features == config::Features::Online {
        c.precompute.encoder.clear();
        c.precompute.store_image = true;
    }
    c
}

fn prepare_cache(cfg: &crate::config::Config) -> anyhow::Result<PathBuf> {
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
fn cache_shards(dir: &Path, spec: &str) -> anyhow::Result<Vec<PathBuf>> {
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

/// A grid of EMA samples: a PNG in pixel space, the raw latents (safetensors) in latent space.
/// The EMA sample grid of a step: `step-N.png`; latent runs decode with the VAE of `[precompute] vae`
/// (and, without one, save `step-N.safetensors` with the latents).
fn write_samples(
    ema: &Model,
    vae: Option<&model::vae::LoadedVae>,
    dir: &Path,
    step: u64,
    tc: &TrainConfig,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let n = tc.sample_count.max(1);
    let classes = ema.cfg.num_classes.max(1);
    let y = Tensor::arange(n, (Kind::Int64, ema.device())).remainder(classes);
    let y = (ema.cfg.num_classes > 0).then_some(y);
    let out = tch::no_grad(|| {
        tarflow::sample::sample(ema, n, y.as_ref(), &Default::default(), tc.seed, 10)
    });
    let x = match out {
        Ok(s) => s.x.to_kind(Kind::Float),
        Err(e) => {
            tracing::warn!("step {step}: sample grid skipped: {e}");
            return Ok(());
        }
    };
    let name = format!("step-{step:08}");
    let Some(pixels) = decode_samples(x.shallow_clone(), vae, tc, ema.cfg.in_channels)? else {
        model::weights::save_atomic(
            &[("latents".to_string(), x.to_device(Device::Cpu))],
            &dir.join(format!("{name}.safetensors")),
        )?;
        return Ok(());
    };
    let images = crate::trained::to_uint8(&pixels);
    let size = images.size()[1] as usize;
    let bytes = Vec::<u8>::try_from(images.flatten(0, -1))?;
    let mut grid = crate::grid::Grid::new(n as usize, None, size);
    for (i, image) in bytes.chunks_exact(size * size * 3).enumerate() {
        grid.put(i, image);
    }
    stages::atomic::write_bytes_atomic(&dir.join(format!("{name}.png")), &grid.png()?)?;
    Ok(())
}

/// Flow samples → images in [−1, 1]: pixel models as they are, latent models through the VAE (the run's
/// scaling and shift); None for a latent model without a VAE.
fn decode_samples(
    x: Tensor,
    vae: Option<&model::vae::LoadedVae>,
    tc: &TrainConfig,
    in_channels: i64,
) -> anyhow::Result<Option<Tensor>> {
    let x = x.to_kind(Kind::Float);
    if !tc.latent && in_channels == 3 {
        return Ok(Some(x));
    }
    let Some(vae) = vae else {
        return Ok(None);
    };
    let scale = tc.latent_scaling.unwrap_or(vae.model.config.scaling_factor);
    let shift = tc.latent_shift.unwrap_or(0.0);
    Ok(Some(vae.model.decode(&(x / scale + shift))?))
}

/// The config (scaling and shift factors) of the VAE that produced the cache (`[precompute] vae`).
fn vae_latent_space(cfg: &crate::config::Config) -> anyhow::Result<model::vae::Config> {
    if cfg.precompute.vae.is_empty() {
        bail!("latent training needs train.latent_scaling (and train.latent_shift when not 0), or [precompute] vae (whose config.json has both factors)");
    }
    let path = PathBuf::from(&cfg.precompute.vae).join(model::vae::CONFIG_FILE);
    model::vae::Config::from_file(&path).with_context(|| {
        format!(
            "reading the VAE scaling and shift factors from {}",
            path.display()
        )
    })
}
