//! The training job as one object: the flow, its EMA and the projector, the optimizer, the loader and
//! the run directory, with a step, a log line, a sample grid and a checkpoint as methods. Micro-batching
//! lives in `step`, and gradient synchronisation across ranks will too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use model::tarflow::align::{AlignHead, AlignMode};
use model::tarflow::{Model, Precision};
use tch::{nn, Device, Tensor};

use super::loader::{Batch, Loader, Position};
use super::replicas::Replicas;
use super::{checkpoint, optim, step};
use crate::runtime::launch::Launch;

/// Test hooks: steps whose batch is made NaN, or whose gradient gets an infinite element.
#[derive(Default)]
pub struct Hooks {
    pub nan_at: Vec<u64>,
    pub inf_grad_at: Vec<u64>,
    /// One process reading what ranks 0..N of an N-rank job would, concatenated into each batch.
    pub union_of_ranks: Option<usize>,
    /// A pause before each checkpoint is written.
    pub slow_checkpoint: Option<Duration>,
    /// Steps in which libtorch is made to raise an error.
    pub torch_error_at: Vec<u64>,
}

/// What one step produced, on the device until it is logged.
pub struct Report {
    totals: step::Totals,
    grad_norm: Tensor,
    lr: f64,
    step_s: f64,
    /// Forward, backward and optimizer seconds, measured (with device synchronisation) on timed steps.
    phases: Option<step::Phases>,
}

/// A step's local part, done: gradients in `.grad`, nothing averaged or applied yet.
pub struct Prepared {
    totals: step::Totals,
    phases: Option<step::Phases>,
    next: Position,
    started: Instant,
}

pub use super::replicas::Agreement;

pub struct Trainer {
    cfg: crate::config::Config,
    device: Device,
    vs: nn::VarStore,
    flow: Model,
    ema_vs: nn::VarStore,
    ema: Model,
    proj_vs: nn::VarStore,
    head: Option<AlignHead>,
    adam: optim::AdamW,
    skips: optim::Skips,
    /// (EMA, parameter) in one order: the two lists the multi-tensor lerp takes.
    ema_list: Vec<Tensor>,
    param_list: Vec<Tensor>,
    /// This rank's loader (several with the `union_of_ranks` hook), and where each stands.
    data: Vec<Loader>,
    cursors: Vec<Position>,
    launch: Launch,
    replicas: Option<Replicas>,
    pub state: checkpoint::State,
    out: PathBuf,
    ckpt_root: PathBuf,
    /// Rank 0 writes the metrics (JSON lines and TensorBoard scalars), checkpoints and samples; the
    /// other ranks write nothing.
    metrics: Option<std::fs::File>,
    tensorboard: Option<crate::formats::tensorboard::EventWriter>,
    model_toml: String,
    sample_vae: Option<model::vae::LoadedVae>,
    /// `train.fid_every`'s network and reference statistics (every rank scores its share).
    fid: Option<super::fid_eval::FidEval>,
    /// The frozen encoder of `train.features = "online"`, run on each batch's crops.
    online: Option<model::vision::VisionEncoder>,
    /// The last checkpoint saved while no non-finite streak was running: what a user resumes from
    /// after a blow-up, so pruning never removes it.
    last_good: Option<PathBuf>,
    reported_skips: u64,
    window: (Instant, Duration),
    hooks: Hooks,
    /// The stop signal the last agreement carried (any rank's).
    agreed_signal: Option<i32>,
}

impl Trainer {
    /// Builds (or, with `resume`, restores) everything a run needs; creates the run directory.
    pub fn new(
        loaded: &crate::config::Loaded,
        out: &Path,
        resume: bool,
        hooks: Hooks,
    ) -> anyhow::Result<Self> {
        let cfg = loaded.config.clone();
        let tc = &cfg.train;
        let launch = Launch::resolve(tc)?;
        let root = launch.rank == 0;
        let device = launch.device(&tc.device)?;
        if tc.threads > 0 {
            tch::set_num_threads(tc.threads as i32);
        }
        let cache_dir = super::data::prepare_cache(&cfg)?;
        let shards = super::data::cache_shards(&cache_dir, &cfg.data.shards)?;
        if root {
            std::fs::create_dir_all(out)
                .with_context(|| format!("creating run directory {}", out.display()))?;
        }
        let ckpt_root = out.join("checkpoints");
        let resume_from = if resume {
            Some(checkpoint::latest(&ckpt_root)?)
        } else {
            if ckpt_root.join("latest").exists() {
                bail!("{} already holds checkpoints: pass --resume to continue it, or choose another --out", out.display());
            }
            None
        };
        if root {
            loaded.write_next_to(out)?;
        }
        let replicas = Replicas::join(
            &launch,
            &tc.backend,
            device,
            Duration::from_secs(tc.dist_timeout_s.max(1)),
        )?;

        // Model, EMA copy and projector. Initialisation draws from the libtorch RNG once, here.
        tch::manual_seed(tc.seed as i64);
        let mut vs = nn::VarStore::new(device);
        let mut flow = Model::new(vs.root(), &cfg.model)?;
        let mut ema_vs = nn::VarStore::new(device);
        let mut ema = Model::new(ema_vs.root(), &cfg.model)?;
        let precision = if device.is_cuda() {
            Precision::Bf16
        } else {
            Precision::Fp32
        };
        flow.precision = precision;
        flow.checkpoint_blocks = tc.checkpoint_blocks;
        ema.precision = precision;
        let mut proj_vs = nn::VarStore::new(device);
        let head = match cfg.align.mode {
            AlignMode::None => None,
            _ => Some(AlignHead::new(proj_vs.root(), &cfg.align, &flow)?),
        };
        tch::no_grad(|| ema_vs.copy(&vs)).context("initialising the EMA")?;
        ema_vs.freeze();

        let mut params: Vec<(String, Tensor)> = super::resume::trainable(&vs, "model.");
        if head.is_some() {
            params.extend(super::resume::trainable(&proj_vs, "projector."));
        }
        let mut adam = optim::AdamW::new(params);
        let mut state = checkpoint::State {
            step: 0,
            adam_t: 0,
            position: Position::default(),
            nonfinite_total: 0,
            nonfinite_in_row: 0,
            positions: vec![],
            seed: tc.seed,
        };
        let metrics_path = out.join("metrics.jsonl");
        let mut positions = vec![];
        if let Some(dir) = &resume_from {
            state = super::resume::restore(
                dir,
                &mut vs,
                &mut ema_vs,
                &mut proj_vs,
                head.is_some(),
                &mut adam,
            )?;
            if state.seed != tc.seed {
                bail!(
                    "{}: checkpoint was trained with seed {}, the config says {}",
                    dir.display(),
                    state.seed,
                    tc.seed
                );
            }
            tracing::info!("resuming from {} at step {}", dir.display(), state.step);
            if root {
                super::resume::truncate_metrics(&metrics_path, state.step)?;
            }
            positions = state.positions.clone();
        } else if root && metrics_path.exists() {
            std::fs::remove_file(&metrics_path)
                .context("removing the metrics of an earlier run")?;
        }
        let (ema_list, param_list): (Vec<Tensor>, Vec<Tensor>) = {
            let ev = ema_vs.variables();
            vs.variables()
                .into_iter()
                .map(|(n, p)| (ev[&n].shallow_clone(), p))
                .unzip()
        };
        // Each rank continues where it was; after a change of world size the ranks' splits differ from
        // the checkpoint's, so each starts the recorded epoch of its new split from its beginning.
        let ranks: Vec<usize> = match hooks.union_of_ranks {
            Some(n) => (0..n).collect(),
            None => vec![launch.rank],
        };
        let world = hooks.union_of_ranks.unwrap_or(launch.world);
        let mut data = Vec::with_capacity(ranks.len());
        for &r in &ranks {
            let start = match positions.get(r) {
                Some(p) if positions.len() == world => *p,
                _ if resume_from.is_some() && positions.len() != world => {
                    if r == ranks[0] {
                        tracing::warn!(
                            "resuming {} ranks from a checkpoint of {}: each rank restarts epoch {} of its new shard split",
                            world,
                            positions.len().max(1),
                            state.position.epoch
                        );
                    }
                    Position {
                        epoch: state.position.epoch,
                        batch: 0,
                    }
                }
                _ => state.position,
            };
            let split = stages::order::RankSplit { rank: r, world };
            data.push(Loader::start(
                super::data::loader_spec(&cfg, shards.clone(), device, split)?,
                start,
            )?);
        }
        if let Some(rep) = &replicas {
            // DDP's rule: every replica starts from rank 0's weights, EMA, projector and optimizer
            // state. (Each step gives a parameter it missed a zero gradient before averaging, so the
            // buckets are the same on every rank.)
            let mut all: Vec<Tensor> = sorted_values(&vs);
            all.extend(sorted_values(&ema_vs));
            all.extend(sorted_values(&proj_vs));
            for (_, p, m, v) in &adam.slots {
                all.extend([p.shallow_clone(), m.shallow_clone(), v.shallow_clone()]);
            }
            all.push(adam.t.shallow_clone());
            rep.broadcast(&all)?;
        }
        // FID needs pixels: a latent run's VAE must load, where a sample grid can stay latents.
        let fid = if tc.fid_every > 0 {
            if tc.latent && cfg.precompute.vae.is_empty() {
                bail!(
                    "train.fid_every on a latent run needs [precompute] vae to decode the samples"
                );
            }
            if tc.latent {
                model::vae::AutoencoderKl::from_folder(Path::new(&cfg.precompute.vae), device)
                    .with_context(|| {
                        format!("train.fid_every: loading the VAE {}", cfg.precompute.vae)
                    })?;
            }
            Some(super::fid_eval::FidEval::load(tc, device)?)
        } else {
            None
        };
        // Latent sample grids are decoded by the VAE that made the cache, when it can be loaded.
        let sample_vae = if tc.latent
            && (tc.sample_every > 0 || tc.fid_every > 0)
            && !cfg.precompute.vae.is_empty()
        {
            match model::vae::AutoencoderKl::from_folder(Path::new(&cfg.precompute.vae), device) {
                Ok(vae) => Some(vae),
                Err(e) => {
                    tracing::warn!(
                        "sample grids stay latents: loading the VAE {}: {e}",
                        cfg.precompute.vae
                    );
                    None
                }
            }
        } else {
            None
        };
        let online = match (tc.features, &head) {
            (crate::config::Features::Online, Some(_)) => {
                let dir = cfg.precompute.encoder_dir().context(
                    "train.features = \"online\" runs the encoder of precompute.encoder: set it",
                )?;
                // The precision `from_folder` picks for the device, as precompute's encode stage uses.
                let enc = model::vision::VisionEncoder::from_folder(dir, device)
                    .with_context(|| format!("loading the online encoder {}", dir.display()))?;
                if enc.hidden_size() != cfg.align.encoder_dim {
                    bail!(
                        "the online encoder {} ({}) gives {}-wide tokens, align.encoder_dim is {}",
                        dir.display(),
                        enc.family().name(),
                        enc.hidden_size(),
                        cfg.align.encoder_dim
                    );
                }
                Some(enc)
            }
            _ => None,
        };
        let manifest = stages::cache::Manifest::load(&cache_dir)?
            .with_context(|| format!("{}: no manifest", cache_dir.display()))?;
        let space =
            crate::formats::space::Space::of_run(&cfg, &manifest.fingerprint, &manifest.settings);
        let model_toml = crate::formats::space::sidecar_text(&cfg.model, Some(&space))?;
        let metrics = match root {
            true => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&metrics_path)
                    .with_context(|| format!("opening {}", metrics_path.display()))?,
            ),
            false => None,
        };
        let tensorboard = match root {
            true => Some(crate::formats::tensorboard::EventWriter::create(
                &out.join("tb"),
            )?),
            false => None,
        };
        let skips = optim::Skips::new(device, state.nonfinite_total, state.nonfinite_in_row);
        let window = (Instant::now(), Duration::ZERO);
        Ok(Trainer {
            reported_skips: state.nonfinite_total,
            cfg,
            device,
            vs,
            flow,
            ema_vs,
            ema,
            proj_vs,
            head,
            adam,
            skips,
            ema_list,
            param_list,
            cursors: vec![state.position; data.len()],
            data,
            launch,
            replicas,
            state,
            out: out.to_path_buf(),
            ckpt_root,
            metrics,
            tensorboard,
            model_toml,
            sample_vae,
            fid,
            online,
            last_good: resume_from,
            window,
            hooks,
            agreed_signal: None,
        })
    }

    pub fn micro_batch(&self) -> usize {
        self.cfg.train.micro_batch
    }

    /// Time spent waiting for the loader so far.
    pub fn data_wait(&self) -> Duration {
        self.data.iter().map(|d| d.waited).sum()
    }

    /// The next batch; with the `union_of_ranks` hook, every rank's batch concatenated.
    fn next_batch(&mut self) -> anyhow::Result<Batch> {
        if self.data.len() == 1 {
            let batch = self.data[0].next()?;
            self.cursors[0] = batch.next;
            return Ok(batch);
        }
        let parts = self
            .data
            .iter_mut()
            .map(Loader::next)
            .collect::<anyhow::Result<Vec<Batch>>>()?;
        self.cursors = parts.iter().map(|b| b.next).collect();
        let cat =
            |f: &dyn Fn(&Batch) -> Tensor| Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0);
        Ok(Batch {
            x: cat(&|b| b.x.shallow_clone()),
            y: cat(&|b| b.y.shallow_clone()),
            features: parts[0]
                .features
                .is_some()
                .then(|| cat(&|b| b.features.as_ref().unwrap().shallow_clone())),
            images: parts[0]
                .images
                .is_some()
                .then(|| cat(&|b| b.images.as_ref().unwrap().shallow_clone())),
            next: parts[0].next,
        })
    }

    /// The part of a step each rank does alone: the next batch forward and backward in micro-batches.
    /// No collective runs here, so a rank that fails in it (CUDA out of memory, a libtorch error)
    /// still meets the others at [`Trainer::agree`], before any gradient is averaged.
    /// Reads nothing back to the host unless `timed`, when it synchronises around each phase.
    pub fn prepare(&mut self, timed: bool) -> anyhow::Result<Prepared> {
        let step_start = Instant::now();
        let batch = self.next_batch()?;
        let tc = &self.cfg.train;
        let x = if self.hooks.nan_at.contains(&self.state.step) {
            batch.x.full_like(f64::NAN)
        } else {
            batch.x.shallow_clone()
        };
        // Online alignment targets: the frozen encoder on the batch's crops, as precompute would.
        let features = match (&self.online, &batch.images) {
            (Some(enc), Some(images)) => Some(
                tch::no_grad(|| enc.patch_tokens(images, self.cfg.precompute.encoder_input_size))
                    .with_context(|| format!("step {}: online features", self.state.step))?
                    .to_kind(tch::Kind::Float),
            ),
            _ => batch.features.as_ref().map(Tensor::shallow_clone),
        };
        self.adam
            .zero_grad()
            .with_context(|| format!("step {}: clearing gradients", self.state.step))?;
        let mut phases = timed.then(|| {
            step::sync(self.device);
            step::Phases::default()
        });
        let totals = step::accumulate(
            &self.flow,
            self.head.as_ref(),
            &x,
            &batch.y,
            features.as_ref(),
            tc.micro_batch,
            self.cfg.align.lambda,
            phases.as_mut(),
        )
        .with_context(|| format!("step {}", self.state.step))?;
        if self.hooks.torch_error_at.contains(&self.state.step) {
            let _ = x
                .f_matmul(&x.view([-1]).unsqueeze(0))
                .with_context(|| format!("step {}: libtorch", self.state.step))?;
        }
        Ok(Prepared {
            totals,
            phases,
            next: batch.next,
            started: step_start,
        })
    }

    /// Where the ranks meet once per step, after each one's [`Trainer::prepare`]: every rank learns
    /// which ranks failed it and whether a signal asked any of them to stop, from one all-reduce of a
    /// few integers on the control channel (host memory, no device synchronisation). One process
    /// agrees with itself.
    pub fn agree(&mut self, failed: bool) -> anyhow::Result<Agreement> {
        let signal = crate::runtime::signals::requested();
        let agreement = match &self.replicas {
            None => Agreement {
                failed_ranks: if failed {
                    vec![self.launch.rank]
                } else {
                    vec![]
                },
                signal,
            },
            Some(rep) => rep.agree(failed, signal).with_context(|| {
                format!("step {}: agreeing with the other ranks", self.state.step)
            })?,
        };
        self.agreed_signal = agreement.signal;
        Ok(agreement)
    }

    /// The rest of the step, once every rank has prepared it: gradients averaged over ranks, the
    /// gradient norm, clipping and a fused AdamW update that skips itself when anything is not
    /// finite, then the EMA.
    pub fn apply(&mut self, prepared: Prepared) -> anyhow::Result<Report> {
        let Prepared {
            totals,
            mut phases,
            next,
            started: step_start,
        } = prepared;
        let tc = &self.cfg.train;
        if let Some(rep) = &self.replicas {
            // The buckets need the same gradients on every rank, also for a parameter this step missed.
            let params: Vec<Tensor> = self
                .adam
                .slots
                .iter()
                .map(|s| s.1.shallow_clone())
                .collect();
            torch_ext::zero_missing_grads(&params)?;
            let grads: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
            rep.average_grads(&grads).with_context(|| {
                format!("step {}: averaging gradients over ranks", self.state.step)
            })?;
        }
        if self.hooks.inf_grad_at.contains(&self.state.step) {
            if let Some((_, p, _, _)) = self.adam.slots.first() {
                let _ = p.grad().view([-1]).get(0).fill_(f64::INFINITY);
            }
        }
        let optimizer_start = Instant::now();
        let lr = tc.lr_at(self.state.step);
        let grad_norm = self.adam.grad_norm()?;
        self.skips.record(&totals.loss, &grad_norm);
        self.adam.clip(&grad_norm, tc.clip_grad)?;
        self.adam
            .step(
                &self.skips.ok,
                lr,
                tc.beta1,
                tc.beta2,
                tc.eps,
                tc.weight_decay,
            )
            .with_context(|| format!("step {}: optimizer", self.state.step))?;
        optim::ema_update(
            &self.ema_list,
            &self.param_list,
            tc.ema_decay,
            &self.skips.ok,
        )?;
        if let Some(p) = phases.as_mut() {
            step::sync(self.device);
            p.optimizer_s = optimizer_start.elapsed().as_secs_f64();
        }
        self.state.step += 1;
        self.state.position = next;
        Ok(Report {
            totals,
            grad_norm,
            lr,
            step_s: step_start.elapsed().as_secs_f64(),
            phases,
        })
    }

    /// Whether this process is one rank of several.
    pub fn distributed(&self) -> bool {
        self.replicas.is_some()
    }

    /// Reads the skip counters back, warns about new skips and stops a run whose streak is too long,
    /// pointing `latest` at the last good checkpoint first.
    pub fn check_skips(&mut self) -> anyhow::Result<()> {
        let state = &mut self.state;
        state.nonfinite_total = self.skips.total.int64_value(&[]) as u64;
        state.nonfinite_in_row = self.skips.in_row.int64_value(&[]) as u64;
        if state.nonfinite_total > self.reported_skips {
            tracing::warn!(
                "step {}: {} non-finite steps skipped since the last report ({} in a row now)",
                state.step,
                state.nonfinite_total - self.reported_skips,
                state.nonfinite_in_row
            );
            self.reported_skips = state.nonfinite_total;
        }
        if state.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row {
            // `--resume` continues from what `latest` names: make that the last good checkpoint
            // (rank 0 writes it; every rank stops here, at the same step).
            let name = self.last_good.as_ref().and_then(|p| p.file_name());
            if let Some(name) = name.filter(|_| self.launch.rank == 0) {
                stages::atomic::write_bytes_atomic(
                    &self.ckpt_root.join("latest"),
                    format!("{}\n", name.to_string_lossy()).as_bytes(),
                )?;
            }
            let good = self
                .last_good
                .as_ref()
                .map_or("none yet".to_string(), |p| p.display().to_string());
            bail!(
                "{} non-finite steps in a row (last at step {}); stopping. The last good checkpoint is {good}; \
                 resume from it with --resume after lowering train.lr or setting train.clip_grad",
                state.nonfinite_in_row,
                state.step - 1
            );
        }
        Ok(())
    }

    /// One line of `metrics.jsonl`: the step's values read back, rates over the window since the last.
    pub fn log(&mut self, r: &Report) -> anyhow::Result<()> {
        let tc = &self.cfg.train;
        let (start, wait0) = self.window;
        let window = start.elapsed().as_secs_f64().max(1e-9);
        let mut wait_frac = (self.data_wait() - wait0).as_secs_f64() / window;
        // The inputs carry the Gaussian noise augmentation, so this is the NLL of the noised data in
        // nats/dim with the ½·ln 2π the objective leaves out, never bits/dim of the data (`pipeline
        // bpd` measures that on dequantised images).
        let half_log_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
        let norm = r.grad_norm.double_value(&[]);
        let t = &r.totals;
        // The values of the whole job: losses averaged over ranks, throughput summed (every rank
        // takes a batch per step), the data wait of the rank that waited most.
        let mut scalars: Vec<&Tensor> = vec![&t.loss, &t.nll, &t.prior, &t.logdet];
        scalars.extend(t.align.as_ref());
        scalars.extend(t.cosines.iter());
        let values = match &self.replicas {
            Some(rep) => {
                wait_frac = rep.max(wait_frac)?;
                rep.mean(&scalars)?
            }
            None => scalars.iter().map(|v| v.double_value(&[])).collect(),
        };
        let cuda_peak_gib = self.cuda_peak_gib();
        let Some(metrics) = self.metrics.as_mut() else {
            self.window = (Instant::now(), self.data_wait());
            return Ok(());
        };
        let ranks = self.replicas.as_ref().map_or(1, Replicas::world);
        let samples_per_s = (tc.batch as u64 * tc.metrics_every) as f64 / window * ranks as f64;
        let align = t.align.as_ref().map(|_| values[4]);
        let cos = &values[4 + usize::from(align.is_some())..];
        let line = serde_json::json!({
            "step": self.state.step,
            "epoch": self.state.position.epoch,
            "loss": values[0],
            "nll_noised": values[1] + half_log_2pi,
            "prior": values[2],
            "logdet": values[3],
            "align_loss": align,
            "cos": cos,
            "lr": r.lr,
            "grad_norm": if norm.is_finite() { Some(norm) } else { None },
            "samples_per_s": samples_per_s,
            "tokens_per_s": samples_per_s * self.cfg.model.num_tokens() as f64,
            "step_s": r.step_s,
            "forward_s": r.phases.as_ref().map(|p| p.forward_s),
            "backward_s": r.phases.as_ref().map(|p| p.backward_s),
            "optimizer_s": r.phases.as_ref().map(|p| p.optimizer_s),
            "data_wait_frac": wait_frac,
            "skipped_nonfinite": self.state.nonfinite_total,
            "cuda_peak_gib": cuda_peak_gib,
        });
        writeln!(metrics, "{line}").context("writing metrics.jsonl")?;
        metrics.flush().context("writing metrics.jsonl")?;
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.scalars(
                self.state.step as i64,
                &crate::formats::tensorboard::scalars_of(&line),
            )?;
        }
        self.window = (Instant::now(), self.data_wait());
        Ok(())
    }

    /// The most memory the CUDA caching allocator handed out since the last metric line (GiB), its
    /// peak then restarted; None on the CPU. A metric-step read, never a per-step one.
    fn cuda_peak_gib(&self) -> Option<f64> {
        let Device::Cuda(index) = self.device else {
            return None;
        };
        let peak = torch_ext::memory::cuda_memory(index).ok()?.peak;
        let _ = torch_ext::memory::reset_cuda_peak(index);
        Some(peak as f64 / (1u64 << 30) as f64)
    }

    /// An EMA sample grid under `RUN_DIR/samples/` (rank 0; the EMA is the same on every rank).
    pub fn sample(&self) -> anyhow::Result<()> {
        if self.launch.rank != 0 {
            return Ok(());
        }
        super::samples::write_samples(
            &self.ema,
            self.sample_vae.as_ref(),
            &self.out.join("samples"),
            self.state.step,
            &self.cfg.train,
        )
    }

    /// FID and IS of EMA samples (`train.fid_every`), one line in metrics.jsonl and TensorBoard.
    pub fn fid(&mut self) -> anyhow::Result<()> {
        let Some(fid) = &self.fid else {
            return Ok(());
        };
        let started = Instant::now();
        let tc = &self.cfg.train;
        let step = self.state.step;
        let replicas = self.replicas.as_ref().map(|r| (r, r.split()));
        let scores = fid
            .evaluate(&self.ema, self.sample_vae.as_ref(), tc, replicas)
            .with_context(|| format!("step {step}: FID of {} EMA samples", tc.fid_samples))?;
        let Some(scores) = scores else {
            // Another rank reports; this one's evaluation time is not training time either.
            self.window.0 += started.elapsed();
            return Ok(());
        };
        tracing::info!(
            step,
            fid = scores.fid,
            sfid = scores.sfid,
            kid = scores.kid,
            inception_score = scores.inception_score,
            samples = scores.samples,
            seconds = started.elapsed().as_secs_f64(),
            "fid"
        );
        let mut line = serde_json::json!({
            "step": step,
            "fid": scores.fid,
            "sfid": scores.sfid,
            "inception_score": scores.inception_score,
            "inception_score_std": scores.inception_score_std,
            "kid": scores.kid,
            "kid_std": scores.kid_std,
            "fid_samples": scores.samples,
            "fid_s": started.elapsed().as_secs_f64(),
        });
        if !scores.skipped.is_empty() {
            // Why sFID or KID is missing (the reference lacks their arrays), in the line itself.
            line["fid_skipped"] = scores.skipped.clone().into();
        }
        if let Some(metrics) = self.metrics.as_mut() {
            writeln!(metrics, "{line}").context("writing metrics.jsonl")?;
            metrics.flush().context("writing metrics.jsonl")?;
        }
        if let Some(tb) = self.tensorboard.as_mut() {
            let scalars: Vec<(String, f64)> = crate::formats::tensorboard::scalars_of(&line)
                .into_iter()
                .map(|(k, v)| (k.replacen("train/", "eval/", 1), v))
                .collect();
            tb.scalars(step as i64, &scalars)?;
        }
        // Evaluation time is not training time: the next metric line's rates start after it.
        self.window.0 += started.elapsed();
        Ok(())
    }

    /// Whether the job should stop now because a signal asked it to: with several ranks, the signal
    /// any rank got, as this step's agreement carried it, so every rank stops after the same step and
    /// the last checkpoint is collective.
    pub fn stop_requested(&self) -> Option<i32> {
        match self.replicas {
            None => crate::runtime::signals::requested(),
            Some(_) => self.agreed_signal,
        }
    }

    /// A complete checkpoint directory, written by rank 0 after every replica's weights are checked
    /// against its own and every rank's loader position is collected; it becomes the last good one
    /// unless a streak is running.
    pub fn checkpoint(&mut self) -> anyhow::Result<()> {
        self.write_checkpoint(true)
    }

    /// The checkpoint of the last completed step after a step failed on some rank: every rank calls
    /// it at the same point (after the agreement), the loader positions travel on the control channel
    /// only and the replicas are not compared (a rank whose device failed may not run a kernel), so it
    /// needs nothing of a failed rank but its host. Returns whether rank 0 wrote it, as every rank
    /// learns from one more agreement.
    pub fn checkpoint_after_failure(&mut self) -> anyhow::Result<bool> {
        let written = crate::runtime::torch_guard::guard("saving after the failure", || {
            self.write_checkpoint(false)
        });
        let failed_here = match &written {
            Ok(()) => false,
            Err(e) => {
                tracing::error!("rank {}: {e:#}", self.launch.rank);
                true
            }
        };
        match &self.replicas {
            None => written.map(|()| true),
            Some(rep) => {
                let agreed = rep.agree(failed_here, None)?;
                match written {
                    Err(e) => Err(e),
                    Ok(()) if agreed.failed_ranks.is_empty() => Ok(true),
                    Ok(()) => Ok(false),
                }
            }
        }
    }

    fn write_checkpoint(&mut self, compare_replicas: bool) -> anyhow::Result<()> {
        // Host values first (the loader cursors), so a rank whose device fails below has already
        // taken part in the gather the others wait in.
        self.state.positions = match &self.replicas {
            Some(rep) => {
                let p = self.cursors[0];
                let positions = rep
                    .gather(&[p.epoch as f64, p.batch as f64])?
                    .iter()
                    .map(|v| Position {
                        epoch: v[0] as u64,
                        batch: v[1] as u64,
                    })
                    .collect();
                if compare_replicas {
                    let mut weights = sorted_values(&self.vs);
                    weights.extend(sorted_values(&self.proj_vs));
                    rep.check_in_sync(&weights)?;
                }
                positions
            }
            None => self.cursors.clone(),
        };
        self.state.adam_t = self.adam.t.f_double_value(&[])? as u64;
        if self.launch.rank != 0 {
            return Ok(());
        }
        if let Some(pause) = self.hooks.slow_checkpoint {
            std::thread::sleep(pause);
        }
        let contents = checkpoint::Contents {
            model: self.flow.named_tensors(&self.vs),
            ema: self.ema.named_tensors(&self.ema_vs),
            projector: self
                .head
                .as_ref()
                .map(|_| super::resume::sorted(&self.proj_vs)),
            moments: self
                .adam
                .slots
                .iter()
                .flat_map(|(n, _, m, v)| {
                    [
                        (format!("m.{n}"), m.shallow_clone()),
                        (format!("v.{n}"), v.shallow_clone()),
                    ]
                })
                .collect(),
            model_toml: &self.model_toml,
            state: &self.state,
        };
        let saved = checkpoint::write(
            &self.ckpt_root,
            &contents,
            self.cfg.train.keep_last,
            self.last_good.as_deref(),
        )?;
        if self.state.nonfinite_in_row == 0 {
            self.last_good = Some(saved);
        }
        // The picture of the curves so far; a failure to draw it never fails the run.
        let metrics = self.out.join("metrics.jsonl");
        if metrics.exists() {
            if let Err(e) = crate::formats::curves::write(&metrics, &self.out.join("curves.png")) {
                tracing::warn!("step {}: curves.png not drawn: {e:#}", self.state.step);
            }
        }
        Ok(())
    }
}

/// A store's tensors in name order (the same order on every rank).
fn sorted_values(vs: &nn::VarStore) -> Vec<Tensor> {
    super::resume::sorted(vs)
        .into_iter()
        .map(|(_, t)| t)
        .collect()
}
