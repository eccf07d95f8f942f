//! `pipeline precompute`: source shards → crops and flips → frozen vision encoder tokens (DINOv2 or
//! CLIP) and VAE posterior moments → one zstd cache shard per source shard, reused by every later run
//! (docs/cache-format.md).
//!
//! Three stages on their own threads with bounded queues, so they overlap: read + decode/crop (a rayon
//! pool) → encode (libtorch, the thread that owns the models) → compress + write (`ShardWriter`). Batches
//! never span two source shards: a shard's cache contents then depend only on that shard, so a rerun
//! after a crash, another rank or a superset run writes byte-identical shards.

pub mod encode;
pub mod settings;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rayon::prelude::*;
use stages::bad_input::RunCounters;
use stages::cache::{CacheLock, Manifest, ManifestShard, RemoteSource, ShardWriter, SourceShard};
use stages::metrics::{summary_table, StageMetrics};
use stages::order::RankSplit;
use stages::remote::{Kind, RetrySettings};
use stages::wds_reader::ReadOptions;

pub use settings::{cache_dir, cache_settings};

use crate::config::{ConfigArgs, PrecomputeConfig};
use encode::{field_specs, launch_batch, Encoders};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Source shards (overrides data.shards), e.g. '/data/imagenet/imagenet-train-{000000..001281}.tar'
    #[arg(long)]
    shards: Option<String>,
    /// Cache root (overrides precompute.cache)
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Encode a few batches into a scratch directory and print the projected cache size and time
    #[arg(long)]
    dry_run: bool,
    /// Batches a dry run encodes
    #[arg(long, default_value_t = 4)]
    dry_run_batches: usize,
    /// This process's rank (default RANK, then SLURM_PROCID, else 0): it takes every world-th shard
    #[arg(long)]
    rank: Option<usize>,
    /// Number of ranks (default WORLD_SIZE, then SLURM_NTASKS, else 1)
    #[arg(long)]
    world_size: Option<usize>,
    /// Stream every remote (`pipe:` or URL) source the cache already has and compare its blake3 with
    /// the recorded one before reusing it; a changed source is recomputed. Without it a remote source
    /// is trusted by its spec and, for HTTP, its ETag / Last-Modified / Content-Length
    #[arg(long)]
    recheck: bool,
    /// Test hook: the writer pauses this long after each batch, so a crash test can kill the job
    /// while it is provably still running
    #[arg(long, hide = true, value_name = "MS")]
    slow_write_ms: Option<u64>,
}

/// Milliseconds the write stage pauses after each batch (the `--slow-write-ms` test hook).
static WRITE_PAUSE_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One source shard to compute.
pub(crate) struct Job {
    pub path: String,
    pub source: SourceShard,
    pub file: String,
}

struct DecodedBatch {
    job: usize,
    keys: Vec<String>,
    labels: Vec<i64>,
    images: Vec<Vec<u8>>,
    last: bool,
    /// On a remote source's last batch: its identity completed with the size and hash of the bytes
    /// that were streamed.
    source: Option<SourceShard>,
}

struct EncodedBatch {
    job: usize,
    keys: Vec<String>,
    fields: Vec<Vec<u8>>,
    last: bool,
    source: Option<SourceShard>,
}

/// What a run did, also what `bench precompute` reports.
pub struct Outcome {
    pub computed: usize,
    pub reused: usize,
    pub samples: u64,
    pub encodings: u64,
    pub bytes: u64,
    pub source_bytes: u64,
    pub elapsed: Duration,
    pub metrics: Vec<Arc<StageMetrics>>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut loaded = args.config.load()?;
    if let Some(spec) = &args.shards {
        loaded.config.data.shards = spec.clone();
    }
    loaded.announce();
    if let Some(ms) = args.slow_write_ms {
        WRITE_PAUSE_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
    }
    // SIGTERM, SIGINT and SIGUSR1 stop reading, let finished shards be recorded and drop the one in
    // progress; the exit status is 128 + signal.
    crate::runtime::signals::install();
    let split = RankSplit::resolve(args.rank, args.world_size)?;
    let config = &loaded.config;
    if args.dry_run {
        return dry_run(config, args.dry_run_batches);
    }
    let (dir, settings) = cache_dir(config, args.cache.as_deref())?;
    let out = precompute_with(config, &dir, &settings, split, args.recheck)?;
    println!(
        "precompute: rank {} of {}: computed {} shards ({} samples, {} encodings), reused {} shards; cache {}",
        split.rank,
        split.world,
        out.computed,
        out.samples,
        out.encodings,
        out.reused,
        dir.display()
    );
    Ok(())
}

fn source_name(path: &str) -> String {
    stages::shardspec::shard_name(path)
}

/// Name, size and blake3 of a local source shard: a source that changed under the same name is
/// recomputed. A remote one is identified without reading it ([`identify_remote`]).
fn identify(path: &str) -> anyhow::Result<SourceShard> {
    if Kind::of(path).is_remote() {
        return identify_remote(path);
    }
    let mut hasher = blake3::Hasher::new();
    let file = std::fs::File::open(path).with_context(|| format!("opening source shard {path}"))?;
    let size = std::io::copy(
        &mut std::io::BufReader::with_capacity(1 << 20, file),
        &mut hasher,
    )
    .with_context(|| format!("reading source shard {path}"))?;
    Ok(SourceShard {
        name: source_name(path),
        size,
        content_hash: hasher.finalize().to_hex().to_string(),
        remote: None,
    })
}

/// A URL by the validators of a HEAD request; a `pipe:` command by its text alone (same command,
/// same bytes). Size and hash stay unknown until the source is streamed.
fn identify_remote(spec: &str) -> anyhow::Result<SourceShard> {
    let mut remote = RemoteSource {
        spec: spec.to_string(),
        ..Default::default()
    };
    if Kind::of(spec) == Kind::Http {
        let settings = RetrySettings::from_env().map_err(anyhow::Error::msg)?;
        let v = stages::remote::http::head(spec, &settings)
            .with_context(|| format!("identifying source shard {spec} (HEAD)"))?;
        if v.etag.is_none() && v.last_modified.is_none() {
            tracing::warn!(
                "{spec}: the server sends no ETag or Last-Modified; reuse assumes the same URL gives \
                 the same bytes (--recheck hashes them)"
            );
        }
        (remote.etag, remote.last_modified, remote.content_length) =
            (v.etag, v.last_modified, v.content_length);
    }
    Ok(SourceShard {
        name: source_name(spec),
        size: remote.content_length.unwrap_or(0),
        content_hash: String::new(),
        remote: Some(remote),
    })
}

/// `--recheck`: streams a remote source through blake3 so that [`SourceShard::reuses`] compares
/// bytes, not just the spec and validators.
fn recheck_source(
    mut probe: SourceShard,
    path: &str,
    recorded_size: u64,
) -> anyhow::Result<SourceShard> {
    let settings = RetrySettings::from_env().map_err(anyhow::Error::msg)?;
    let (size, hash) = stages::remote::hash_source(path, &settings, recorded_size)
        .with_context(|| format!("rechecking source shard {path}"))?;
    (probe.size, probe.content_hash) = (size, hash);
    Ok(probe)
}

fn cache_file(source: &str) -> String {
    let stem = source
        .split('.')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or(source);
    format!("{stem}.fbc")
}

fn lock(dir: &Path) -> anyhow::Result<CacheLock> {
    Ok(CacheLock::acquire(
        dir,
        Duration::from_secs(600),
        &|owner| {
            tracing::info!(
                "waiting for the cache lock on {} held by {owner}",
                dir.display()
            )
        },
    )?)
}

/// Computes this rank's missing shards into `dir` and records them in its manifest.
pub fn precompute(
    config: &crate::config::Config,
    dir: &Path,
    settings: &serde_json::Value,
    split: RankSplit,
) -> anyhow::Result<Outcome> {
    precompute_with(config, dir, settings, split, false)
}

/// [`precompute`]; with `recheck`, remote sources the cache has are streamed and hashed before reuse.
pub fn precompute_with(
    config: &crate::config::Config,
    dir: &Path,
    settings: &serde_json::Value,
    split: RankSplit,
    recheck: bool,
) -> anyhow::Result<Outcome> {
    config.precompute.validate()?;
    config.data.validate()?;
    let all = stages::shardspec::expand_shard_spec(&config.data.shards)?;
    if all.is_empty() {
        bail!("no source shards in `{}`", config.data.shards);
    }
    let manifest = {
        let _guard = lock(dir)?;
        let mut m = Manifest::load(dir)?.unwrap_or_else(|| Manifest::new(settings.clone()));
        if m.fingerprint != stages::cache::fingerprint(settings) {
            bail!(
                "{}: manifest fingerprint {} does not match the settings",
                dir.display(),
                m.fingerprint
            );
        }
        m.requested.extend(all.iter().map(|p| source_name(p)));
        m.save(dir)?;
        m
    };
    // A fixed split by position (no shuffle): rank r owns shards r, r+W, …, whatever the seed.
    let mine: Vec<&String> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| i % split.world == split.rank)
        .map(|(_, p)| p)
        .collect();
    let (jobs, reused) = plan_jobs(&manifest, dir, &mine, recheck)?;
    tracing::info!(
        "{}: {} shards for this rank, {reused} reused, {} to compute",
        dir.display(),
        mine.len(),
        jobs.len()
    );
    let mut out = run_graph(config, dir, settings, jobs, None)?;
    out.reused = reused;
    if let Some(sig) = crate::runtime::signals::requested() {
        return Err(crate::runtime::signals::Interrupted {
            signal: sig,
            what: format!(
                "{} shards finished and recorded in {}, the one in progress dropped; run again to compute the rest",
                out.computed,
                dir.display()
            ),
        }
        .into());
    }
    Ok(out)
}

/// Splits this rank's shards into jobs to compute and a count of shards the cache already has.
fn plan_jobs(
    manifest: &Manifest,
    dir: &Path,
    mine: &[&String],
    recheck: bool,
) -> anyhow::Result<(Vec<Job>, usize)> {
    let identities: Vec<anyhow::Result<SourceShard>> =
        mine.par_iter().map(|p| identify(p)).collect();
    let cached = |source: &SourceShard| {
        manifest.shards.get(&source.name).is_some_and(|e| {
            source.reuses(&e.source)
                && std::fs::metadata(dir.join(&e.file)).is_ok_and(|m| m.len() == e.summary.bytes)
        })
    };
    // Only sources that would be reused are rechecked: the others are streamed anyway.
    let checked: Vec<anyhow::Result<(SourceShard, bool)>> = mine
        .par_iter()
        .zip(identities)
        .map(|(path, probe)| {
            let probe = probe?;
            let done = cached(&probe);
            if !(done && recheck && probe.remote.is_some()) {
                return Ok((probe, done));
            }
            // The recorded size bounds the stream: a source longer than that changed, and one that
            // never ends (`pipe:yes`) must not be hashed forever.
            let recorded = manifest
                .shards
                .get(&probe.name)
                .map(|e| e.source.size)
                .filter(|&n| n > 0)
                .unwrap_or(u64::MAX);
            let hashed = recheck_source(probe, path, recorded)?;
            let done = cached(&hashed);
            if !done {
                tracing::warn!("source shard {path} changed under the same spec: recomputing it");
            }
            Ok((hashed, done))
        })
        .collect();
    let mut jobs = Vec::new();
    let mut reused = 0;
    for (path, result) in mine.iter().zip(checked) {
        let (source, done) = result?;
        if done {
            reused += 1;
            continue;
        }
        jobs.push(Job {
            path: path.to_string(),
            file: cache_file(&source.name),
            // What a remote job records is completed from the stream it reads.
            source: SourceShard {
                content_hash: if source.remote.is_some() {
                    String::new()
                } else {
                    source.content_hash.clone()
                },
                ..source
            },
        });
    }
    Ok((jobs, reused))
}

/// Encodes `limit` batches into a scratch directory and projects the full run's size and time.
fn dry_run(config: &crate::config::Config, batches: usize) -> anyhow::Result<()> {
    config.precompute.validate()?;
    let settings = cache_settings(config)?;
    let all = stages::shardspec::expand_shard_spec(&config.data.shards)?;
    let first = all
        .first()
        .with_context(|| format!("no source shards in `{}`", config.data.shards))?;
    let total_source: u64 = all.iter().map(|p| source_size(p)).sum();
    let scratch = tempfile::tempdir()?;
    let source = SourceShard {
        name: source_name(first),
        size: 0,
        content_hash: String::new(),
        remote: None,
    };
    let job = Job {
        path: first.clone(),
        file: cache_file(&source.name),
        source,
    };
    let out = run_graph(
        config,
        scratch.path(),
        &settings,
        vec![job],
        Some(batches * config.precompute.batch_size),
    )?;
    if out.samples == 0 {
        bail!("dry run read no good sample from {first}");
    }
    let per_sample = out.bytes as f64 / out.samples as f64;
    let source_per_sample = out.source_bytes as f64 / out.samples as f64;
    let projected_samples = total_source as f64 / source_per_sample.max(1.0);
    let rate = out.samples as f64 / out.elapsed.as_secs_f64().max(1e-9);
    println!(
        "dry run: {} samples from {first} in {:.1} s ({rate:.1} images/s)",
        out.samples,
        out.elapsed.as_secs_f64()
    );
    println!("  fingerprint {}", stages::cache::fingerprint(&settings));
    println!("  cache bytes per sample: {per_sample:.0}");
    println!(
        "  projected for {} shards ({:.1} GB of source, ~{projected_samples:.0} samples): cache {:.2} GB, {:.1} h on this machine",
        all.len(),
        total_source as f64 / 1e9,
        per_sample * projected_samples / 1e9,
        projected_samples / rate / 3600.0
    );
    let unsized_sources = all.iter().filter(|p| Kind::of(p) == Kind::Pipe).count();
    if unsized_sources > 0 {
        println!(
            "  ({unsized_sources} pipe: sources have no size before they are read: the projection leaves them out)"
        );
    }
    Ok(())
}

/// A source's size for a dry run's projection: a file's length, a URL's Content-Length (HEAD), 0 for
/// what cannot say (a `pipe:` command) or cannot be reached.
fn source_size(path: &str) -> u64 {
    match Kind::of(path) {
        Kind::Local => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        Kind::Http => RetrySettings::from_env()
            .ok()
            .and_then(|s| stages::remote::http::head(path, &s).ok())
            .and_then(|v| v.content_length)
            .unwrap_or(0),
        Kind::Pipe => 0,
    }
}

/// The decode/crop thread pool: `precompute.workers` threads, or `data.threads` when that is 0.
pub(crate) fn decode_pool(config: &crate::config::Config) -> anyhow::Result<rayon::ThreadPool> {
    let (p, data) = (&config.precompute, &config.data);
    let workers = if p.workers > 0 {
        p.workers
    } else {
        data.resolved_threads()
    };
    Ok(rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .build()?)
}

pub(crate) fn load_encoders(p: &PrecomputeConfig) -> anyhow::Result<Encoders> {
    // One rank per GPU: LOCAL_RANK (torchrun) or SLURM_LOCALID picks this process's device, as in
    // training, and it becomes the current CUDA device.
    let device = crate::runtime::launch::Launch::from_env()?.device(&p.device)?;
    if p.encode_threads > 0 {
        tch::set_num_threads(p.encode_threads as i32);
    }
    if device.is_cuda() {
        // Not cuDNN's benchmark mode: it picks convolution algorithms by timing them in each process,
        // so two ranks (or a rerun) could encode the same crops into different bytes. Deterministic
        // algorithms keep a cache shard a function of its source shard on a given GPU model.
        torch_ext::cuda::cudnn_deterministic(true);
    }
    let mut stores = Vec::new();
    // Any vision family, as the folder's config.json says; the encoder keeps its own var store.
    let encoder = match p.encoder_dir() {
        Some(dir) => Some(
            model::vision::VisionEncoder::from_folder(dir, device)
                .with_context(|| format!("loading encoder {}", dir.display()))?,
        ),
        None => None,
    };
    let vae = match p.vae_dir() {
        Some(dir) => {
            let l = model::vae::AutoencoderKl::from_folder(dir, device)
                .with_context(|| format!("loading VAE {}", dir.display()))?;
            stores.push(l.vs);
            Some(l.model)
        }
        None => None,
    };
    Ok(Encoders {
        encoder,
        vae,
        device,
        _stores: stores,
    })
}

/// The three overlapping stages over `jobs`. With `limit`, stops after that many samples and records
/// nothing (dry run).
pub(crate) fn run_graph(
    config: &crate::config::Config,
    dir: &Path,
    settings: &serde_json::Value,
    jobs: Vec<Job>,
    limit: Option<usize>,
) -> anyhow::Result<Outcome> {
    let p = config.precompute.clone();
    let data = config.data.clone();
    let decode_m = Arc::new(StageMetrics::new("decode", 1));
    let encode_m = Arc::new(StageMetrics::new("encode", 1));
    let write_m = Arc::new(StageMetrics::new("write", 1));
    let metrics = vec![decode_m.clone(), encode_m.clone(), write_m.clone()];
    let mut out = Outcome {
        computed: 0,
        reused: 0,
        samples: 0,
        encodings: 0,
        bytes: 0,
        source_bytes: 0,
        elapsed: Duration::ZERO,
        metrics: metrics.clone(),
    };
    if jobs.is_empty() {
        return Ok(out);
    }
    let encoders = load_encoders(&p)?;
    // Rates count from here: loading weights is a fixed cost, not throughput.
    let started = Instant::now();
    let fields = field_specs(&p, data.image_size, &encoders);
    let counters = Arc::new(RunCounters::new());
    let pool = decode_pool(config)?;
    let (dtx, drx) = sync_channel::<DecodedBatch>(p.queue_batches);
    let (etx, erx) = sync_channel::<EncodedBatch>(p.queue_batches);
    let jobs = Arc::new(jobs);
    let source_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));

    let decoder = {
        let (jobs, counters, data, decode_m, source_bytes) = (
            jobs.clone(),
            counters.clone(),
            data.clone(),
            decode_m.clone(),
            source_bytes.clone(),
        );
        let batch_size = p.batch_size;
        std::thread::Builder::new()
            .name("decode".into())
            .spawn(move || {
                decode_stage(
                    &jobs,
                    &data,
                    &counters,
                    &pool,
                    batch_size,
                    limit,
                    &dtx,
                    &decode_m,
                    &source_bytes,
                )
            })?
    };
    let writer = {
        let (jobs, dir, settings, write_m) = (
            jobs.clone(),
            dir.to_path_buf(),
            settings.clone(),
            write_m.clone(),
        );
        let (fields, chunk_rows, level, record) =
            (fields.clone(), p.chunk_rows, p.zstd_level, limit.is_none());
        std::thread::Builder::new()
            .name("write".into())
            .spawn(move || {
                write_stage(
                    &jobs, &dir, &settings, fields, chunk_rows, level, record, erx, &write_m,
                )
            })?
    };

    // Images encoded (the sources' sample counts are not known before they are read).
    let progress = crate::runtime::progress::Progress::new(
        &format!("precompute ({} shards): images", jobs.len()),
        limit.unwrap_or(0) as u64,
    );
    // The encode stage runs here: the models stay on the thread that loaded them. One batch stays in
    // flight: batch k+1 is launched before batch k's results are waited for, so on CUDA the device
    // has the next batch queued while the host reads the previous one back and hands it on.
    let encode_result = (|| -> anyhow::Result<()> {
        let mut in_flight: Option<(encode::Launched, DecodedBatch)> = None;
        // Hands a launched batch to the writer; false when the writer is gone.
        let mut hand_on =
            |launched: encode::Launched, batch: DecodedBatch| -> anyhow::Result<bool> {
                let busy = Instant::now();
                let encoded = launched
                    .collect()
                    .with_context(|| format!("encoding a batch of {}", jobs[batch.job].path))?;
                encode_m.add_busy(busy.elapsed());
                out.encodings += (batch.images.len() * p.views()) as u64;
                let n = batch.keys.len() as u64;
                let blocked = Instant::now();
                let sent = etx
                    .send(EncodedBatch {
                        job: batch.job,
                        keys: batch.keys,
                        fields: encoded,
                        last: batch.last,
                        source: batch.source,
                    })
                    .is_ok();
                encode_m.add_blocked_output(blocked.elapsed());
                if sent {
                    for _ in 0..n {
                        encode_m.add_item(0);
                    }
                    progress.add(n);
                }
                Ok(sent)
            };
        loop {
            let wait = Instant::now();
            let Ok(mut batch) = drx.recv() else { break };
            encode_m.add_wait_input(wait.elapsed());
            let busy = Instant::now();
            let launched = if batch.images.is_empty() {
                Ok(encode::Launched::empty(fields.len()))
            } else {
                let refs: Vec<&[u8]> = batch.images.iter().map(Vec::as_slice).collect();
                launch_batch(&p, &encoders, &refs, &batch.labels, data.image_size)
                    .with_context(|| format!("encoding a batch of {}", jobs[batch.job].path))
            };
            let launched = match launched {
                Ok(launched) => launched,
                Err(e) => {
                    // The batch before it is complete: it still reaches the writer, so a shard it
                    // finishes is kept.
                    if let Some((prev, prev_batch)) = in_flight.take() {
                        hand_on(prev, prev_batch)?;
                    }
                    return Err(e);
                }
            };
            encode_m.add_busy(busy.elapsed());
            // The crops' bytes are in the launched batch now (or on the device).
            batch.images.iter_mut().for_each(|i| *i = Vec::new());
            if let Some((prev, prev_batch)) = in_flight.replace((launched, batch)) {
                if !hand_on(prev, prev_batch)? {
                    return Ok(());
                }
            }
        }
        if let Some((last, batch)) = in_flight.take() {
            hand_on(last, batch)?;
        }
        Ok(())
    })();
    progress.finish();
    drop(etx);
    drop(drx);
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the write thread panicked"))?;
    let decoded = decoder
        .join()
        .map_err(|_| anyhow::anyhow!("the decode thread panicked"))?;
    encode_result?;
    let (computed, samples, bytes) = written?;
    decoded?;
    counters.check_bad_fraction(data.max_bad_fraction)?;
    out.elapsed = started.elapsed();
    out.computed = computed;
    out.samples = samples;
    out.bytes = bytes;
    out.source_bytes = source_bytes.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!("{}", counters.summary_line());
    tracing::info!("stages:\n{}", summary_table(&metrics, out.elapsed));
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn decode_stage(
    jobs: &[Job],
    data: &stages::config::DataConfig,
    counters: &RunCounters,
    pool: &rayon::ThreadPool,
    batch_size: usize,
    limit: Option<usize>,
    tx: &SyncSender<DecodedBatch>,
    m: &StageMetrics,
    source_bytes: &std::sync::atomic::AtomicU64,
) -> anyhow::Result<()> {
    let mut total = 0usize;
    // Decodes and crops `pending` on the pool (order kept) and sends it; false when the encoder is gone.
    let flush = |job: usize,
                 pending: &mut Vec<stages::image_stream::Sample>,
                 last: bool,
                 source: Option<SourceShard>|
     -> bool {
        let busy = Instant::now();
        let cropped: Vec<_> = pool.install(|| {
            pending
                .par_iter()
                .map(|s| (s, stages::image_stream::process_sample(s, data)))
                .collect()
        });
        let mut batch = DecodedBatch {
            job,
            keys: Vec::new(),
            labels: Vec::new(),
            images: Vec::new(),
            last,
            source,
        };
        for (sample, result) in cropped {
            match result {
                Ok(c) => {
                    batch.keys.push(c.key);
                    batch.labels.push(c.label.map(i64::from).unwrap_or(-1));
                    batch.images.push(c.image.pixels);
                }
                Err(e) => counters.record(e.kind, &sample.shard, &sample.key, &e.detail),
            }
        }
        counters.add_good(batch.keys.len() as u64);
        pending.clear();
        m.add_busy(busy.elapsed());
        let n = batch.keys.len() as u64;
        let blocked = Instant::now();
        let ok = tx.send(batch).is_ok();
        m.add_blocked_output(blocked.elapsed());
        for _ in 0..n {
            m.add_item(0);
        }
        ok
    };
    for (j, job) in jobs.iter().enumerate() {
        let mut pending = Vec::with_capacity(batch_size);
        let mut alive = true;
        let mut stop = false;
        let before = total;
        let options = ReadOptions {
            stats: Some(&m.source),
            hash_remote: true,
            limits: data.read_limits(),
        };
        let read = stages::wds_reader::read_shard_with(&job.path, counters, options, &mut |raw| {
            source_bytes.fetch_add(raw.n_bytes(), std::sync::atomic::Ordering::Relaxed);
            if let Some(sample) = stages::image_stream::select_sample(raw, data, counters) {
                pending.push(sample);
                total += 1;
            }
            if pending.len() == batch_size {
                alive = flush(j, &mut pending, false, None);
            }
            stop = limit.is_some_and(|l| total >= l);
            alive && !stop && crate::runtime::signals::requested().is_none()
        });
        if total == before && alive && !stop {
            // An empty source shard is more often a failed copy than an empty split: say so.
            tracing::warn!(
                "source shard {}: no samples (empty, or nothing in it could be read)",
                job.path
            );
        }
        // On a signal the shard in progress is left unfinished: it never gets its last batch, so the
        // writer drops it (no file, no manifest entry) and the cache stays verifiable.
        if crate::runtime::signals::requested().is_some() {
            break;
        }
        counters.add_shard();
        if !alive {
            break;
        }
        // A dry run stops early on purpose and records nothing: its job keeps the probe's identity.
        let source = match streamed_source(job, &read.tally) {
            _ if stop => None,
            Streamed::Local => None,
            Streamed::Complete(source) => Some(source),
            // Never sent its last batch, so the writer drops it: the next run reads it again
            // instead of reusing what a broken connection or command left.
            Streamed::Failed(why) => {
                tracing::warn!(
                    "source shard {}: {why}; its cache shard is not recorded, a rerun reads it again",
                    job.path
                );
                pending.clear();
                continue;
            }
        };
        if !flush(j, &mut pending, true, source) || stop {
            break;
        }
    }
    Ok(())
}

enum Streamed {
    Local,
    /// A remote source read to its end: its identity with the size and hash of what was read.
    Complete(SourceShard),
    /// A remote source that failed or was not read to its end, and why.
    Failed(String),
}

fn streamed_source(job: &Job, tally: &stages::remote::SourceTally) -> Streamed {
    if job.source.remote.is_none() {
        return Streamed::Local;
    }
    match (tally.failure(), tally.content_hash()) {
        (Some(failure), _) => Streamed::Failed(failure),
        (None, None) => Streamed::Failed("the stream was not read to its end".into()),
        (None, Some(hash)) => Streamed::Complete(SourceShard {
            size: tally.bytes(),
            content_hash: hash,
            ..job.source.clone()
        }),
    }
}

/// Compresses and writes each shard's rows; on a shard's last batch renames it into place and records
/// it in the manifest under the lock. Returns (shards written, samples, bytes).
#[allow(clippy::too_many_arguments)]
fn write_stage(
    jobs: &[Job],
    dir: &Path,
    settings: &serde_json::Value,
    fields: Vec<stages::cache::FieldSpec>,
    chunk_rows: usize,
    level: i32,
    record: bool,
    rx: Receiver<EncodedBatch>,
    m: &StageMetrics,
) -> anyhow::Result<(usize, u64, u64)> {
    // A finished shard's footer, fsync, rename and manifest entry happen on a thread of their own, so
    // that closing a ~0.7 GB shard never holds up the next shard's batches (and through them the
    // encoder).
    let (done_tx, done_rx) = sync_channel::<(usize, ShardWriter, SourceShard)>(1);
    std::thread::scope(|scope| {
        let finisher = scope.spawn(move || -> anyhow::Result<(usize, u64, u64)> {
            let (mut shards, mut samples, mut bytes) = (0usize, 0u64, 0u64);
            for (j, writer, source) in done_rx {
                let job = &jobs[j];
                let meta = serde_json::json!({ "source": source, "settings_fingerprint": stages::cache::fingerprint(settings) });
                let summary = writer
                    .finish(meta)
                    .with_context(|| format!("finishing cache shard for {}", job.path))?;
                samples += summary.samples as u64;
                bytes += summary.bytes;
                shards += 1;
                if record {
                    let _guard = lock(dir)?;
                    let entry = ManifestShard {
                        file: job.file.clone(),
                        source,
                        summary,
                    };
                    Manifest::record(dir, settings, vec![entry])?;
                    tracing::info!("cache shard {} written ({})", job.file, job.path);
                }
            }
            Ok((shards, samples, bytes))
        });
        let written = (|| -> anyhow::Result<()> {
            let mut current: Option<(usize, ShardWriter)> = None;
            loop {
                let wait = Instant::now();
                let Ok(batch) = rx.recv() else { break };
                m.add_wait_input(wait.elapsed());
                let busy = Instant::now();
                let job = &jobs[batch.job];
                if current.as_ref().is_none_or(|(j, _)| *j != batch.job) {
                    let w = ShardWriter::create(
                        &dir.join(&job.file),
                        fields.clone(),
                        chunk_rows,
                        level,
                    )?;
                    current = Some((batch.job, w));
                }
                let (_, writer) = current.as_mut().expect("opened above");
                for (row, key) in batch.keys.iter().enumerate() {
                    let values: Vec<&[u8]> = fields
                        .iter()
                        .zip(&batch.fields)
                        .map(|(f, b)| &b[row * f.row_bytes()..(row + 1) * f.row_bytes()])
                        .collect();
                    writer.push(key, &values)?;
                    m.add_item(0);
                }
                if batch.last {
                    let (j, writer) = current.take().expect("open");
                    let source = batch.source.unwrap_or_else(|| job.source.clone());
                    if done_tx.send((j, writer, source)).is_err() {
                        // The finisher stopped on an error; it is reported below.
                        break;
                    }
                }
                m.add_busy(busy.elapsed());
                let pause = WRITE_PAUSE_MS.load(std::sync::atomic::Ordering::Relaxed);
                if pause > 0 {
                    std::thread::sleep(Duration::from_millis(pause));
                }
                if crate::runtime::signals::requested().is_some() {
                    // Stop here: shards already complete are being finished; the one in progress is
                    // dropped with its writer (its temporary removed), and the stages upstream stop
                    // when their next send finds no receiver.
                    break;
                }
            }
            Ok(())
        })();
        drop(done_tx);
        let finished = finisher
            .join()
            .map_err(|_| anyhow::anyhow!("the shard finishing thread panicked"))?;
        written?;
        finished
    })
}
