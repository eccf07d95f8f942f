//! The image stream: shard spec + `[data]` config → a bounded queue of cropped RGB images with label,
//! shard and key. This is the graph, assembled in one place:
//!
//! ```text
//! read (thread: tar stream, grouping, label)  →  shuffle (task)  →  decode+crop (task → rayon pool)  →  consumer
//! ```
//!
//! Reading is blocking I/O on its own thread; shuffling is a tokio task; decoding and cropping run on a
//! rayon pool sized to the cores, never on tokio's blocking pool. Every queue is a bounded
//! async-channel, so a slow consumer slows everything down instead of growing memory. Decode results
//! are put back in input order, so the output order depends only on (seed, epoch, rank, shards), not on
//! the number of threads.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bad_input::{BadKind, RunCounters};
use crate::config::{DataConfig, DecodeScale};
use crate::crop::{crop_image, hflip, CropPlan, ResizeImpl};
use crate::decode::{decode_rgb_scaled, decode_rgb_window_into, DecodeError};
use crate::demo::RgbImage;
use crate::label::{read_label, LabelError};
use crate::metrics::{live_line, summary_table, StageMetrics};
use crate::order::{epoch_shards, keyed_rng, RankSplit, ShuffleBuffer, PURPOSE_SAMPLES};
use crate::shardspec::expand_shard_spec;
use crate::wds_reader::{read_shard_with, RawSample, ReadOptions};
use crate::{Error, Result};

/// A sample with its image member chosen and its label parsed, not yet decoded.
#[derive(Debug, Clone)]
pub struct Sample {
    pub shard: Arc<str>,
    pub key: String,
    pub image: Vec<u8>,
    pub label: Option<u32>,
}

/// What the stream yields: the crop (`image_size`² RGB, rows top to bottom) and, with `data.flip`,
/// its mirror image.
#[derive(Debug, Clone)]
pub struct CroppedSample {
    pub shard: Arc<str>,
    pub key: String,
    pub label: Option<u32>,
    pub image: RgbImage,
    pub flipped: Option<RgbImage>,
}

/// Picks the image member and the label; counts and logs the sample when either is missing or bad.
pub fn select_sample(raw: RawSample, cfg: &DataConfig, counters: &RunCounters) -> Option<Sample> {
    let Some(image_ext) = cfg.image_keys.iter().find(|k| raw.member(k).is_some()) else {
        let have: Vec<&str> = raw.members.iter().map(|(e, _)| e.as_str()).collect();
        counters.record(
            BadKind::NoImage,
            &raw.shard,
            &raw.key,
            &format!(
                "no image member ({}) among [{}]",
                cfg.image_keys.join(", "),
                have.join(", ")
            ),
        );
        return None;
    };
    let label = match read_label(cfg.label, &cfg.label_json_field, |e| raw.member(e)) {
        Ok(l) => l,
        Err(LabelError::Missing) => {
            counters.record(
                BadKind::MissingLabel,
                &raw.shard,
                &raw.key,
                &format!("no .{} member for the label", label_ext(cfg)),
            );
            return None;
        }
        Err(LabelError::Bad(detail)) => {
            counters.record(BadKind::BadLabel, &raw.shard, &raw.key, &detail);
            return None;
        }
    };
    let RawSample {
        shard,
        key,
        mut members,
    } = raw;
    let pos = members
        .iter()
        .position(|(e, _)| e == image_ext)
        .expect("found above");
    let image = members.swap_remove(pos).1;
    Some(Sample {
        shard,
        key,
        image,
        label,
    })
}

fn label_ext(cfg: &DataConfig) -> &'static str {
    match cfg.label {
        crate::label::LabelSource::Json => "json",
        _ => "cls",
    }
}

thread_local! {
    static DECODED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Decodes and crops one image. The exact path decodes only the source rectangle the crop reads (see
/// [`decode_rgb_window`](crate::decode::decode_rgb_window)); the fast resampler works on whole images.
pub fn decode_and_crop(
    bytes: &[u8],
    cfg: &DataConfig,
    min_short: usize,
) -> std::result::Result<RgbImage, DecodeError> {
    let (mode, size) = (cfg.crop, cfg.image_size);
    match cfg.resize_impl {
        ResizeImpl::Pillow => {
            // One decode buffer per thread, reused image after image.
            let buf = DECODED.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
            // The plan made for the header's size is the one that runs (PNGs never ask for it).
            let mut plan = None;
            let need = |w, h| {
                let p = CropPlan::new(mode, w, h, size);
                let source = p.source();
                plan = Some(p);
                Some(source)
            };
            let (part, at) = decode_rgb_window_into(bytes, cfg.max_pixels, min_short, need, buf)?;
            let plan = plan.unwrap_or_else(|| CropPlan::new(mode, at.full_w, at.full_h, size));
            let out = plan.run(&part, at);
            if part.pixels.capacity() <= crate::resample::KEEP_BYTES {
                DECODED.with(|cell| *cell.borrow_mut() = part.pixels);
            }
            Ok(out)
        }
        ResizeImpl::Fast => {
            let decoded = decode_rgb_scaled(bytes, cfg.max_pixels, min_short)?;
            Ok(crop_image(&decoded, mode, size, ResizeImpl::Fast))
        }
    }
}

/// Decode and crop one sample: the plain function the decode stage runs on the pool.
pub fn process_sample(
    sample: &Sample,
    cfg: &DataConfig,
) -> std::result::Result<CroppedSample, DecodeError> {
    let min_short = match cfg.decode_scale {
        DecodeScale::Exact => 0,
        DecodeScale::Dct => cfg.image_size,
    };
    let image = decode_and_crop(&sample.image, cfg, min_short)?;
    let flipped = cfg.flip.then(|| hflip(&image));
    Ok(CroppedSample {
        shard: sample.shard.clone(),
        key: sample.key.clone(),
        label: sample.label,
        image,
        flipped,
    })
}

/// A running stream. Read `samples` until it closes, then call [`ImageStream::finish`]: it joins the
/// stages, applies `max_bad_fraction` and logs the per-stage summary. A stage that fails (too many bad
/// inputs) closes the queue early; `finish` returns its error.
pub struct ImageStream {
    pub samples: async_channel::Receiver<CroppedSample>,
    pub counters: Arc<RunCounters>,
    pub metrics: Vec<Arc<StageMetrics>>,
    /// The shards this rank reads this epoch, in reading order.
    pub shards: Vec<String>,
    started: Instant,
    max_bad_fraction: f64,
    reader: std::thread::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    monitor: tokio::task::JoinHandle<Result<()>>,
}

/// What a finished stream reports.
#[derive(Debug, Clone)]
pub struct StreamSummary {
    pub good: u64,
    pub bad: u64,
    pub elapsed: Duration,
    pub table: String,
}

/// Builds and starts the graph for one epoch of one rank. Must be called inside a tokio runtime.
pub fn open_image_stream(cfg: &DataConfig, split: RankSplit, epoch: u64) -> Result<ImageStream> {
    cfg.validate()?;
    let all_shards = expand_shard_spec(&cfg.shards)?;
    let shards = epoch_shards(&all_shards, cfg.seed, epoch, cfg.shard_shuffle, split);
    if shards.is_empty() {
        return Err(Error::Invalid(format!(
            "rank {} of {} gets no shard: {} shards for {} ranks",
            split.rank,
            split.world,
            all_shards.len(),
            split.world
        )));
    }
    let cfg = Arc::new(cfg.clone());
    let counters = Arc::new(RunCounters::new());
    let threads = cfg.resolved_threads();
    let read_metrics = Arc::new(StageMetrics::new("read", 1));
    let shuffle_metrics = Arc::new(StageMetrics::new("shuffle", 1));
    let decode_metrics = Arc::new(StageMetrics::new("decode", threads));

    let (raw_tx, raw_rx) = async_channel::bounded::<Sample>(cfg.queue_depth);
    let (shuffled_tx, shuffled_rx) = async_channel::bounded::<Sample>(cfg.queue_depth);
    let (out_tx, out_rx) = async_channel::bounded::<CroppedSample>(cfg.queue_depth);

    let reader = {
        let (cfg, counters, metrics, shards) = (
            cfg.clone(),
            counters.clone(),
            read_metrics.clone(),
            shards.clone(),
        );
        std::thread::Builder::new()
            .name("shard-reader".into())
            .spawn(move || read_stage(&shards, &cfg, &counters, &metrics, raw_tx))
            .map_err(|e| Error::Invalid(format!("spawning the shard reader thread: {e}")))?
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("decode-{i}"))
        .build()
        .map_err(|e| Error::Invalid(format!("building the decode pool: {e}")))?;
    let rng = keyed_rng(cfg.seed, epoch, split.rank as u64, PURPOSE_SAMPLES);
    let shuffle = tokio::spawn(shuffle_stage(
        raw_rx,
        shuffled_tx,
        ShuffleBuffer::new(cfg.shuffle_buffer, cfg.shuffle_initial, rng),
        shuffle_metrics.clone(),
    ));
    let decode_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let decode = {
        let (cfg, counters, metrics, done) = (
            cfg.clone(),
            counters.clone(),
            decode_metrics.clone(),
            decode_done.clone(),
        );
        tokio::spawn(async move {
            let result =
                decode_stage(shuffled_rx, out_tx, cfg, counters, metrics, Arc::new(pool)).await;
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            result
        })
    };
    let metrics = vec![read_metrics, shuffle_metrics, decode_metrics];
    let started = Instant::now();
    // The live line: logged at a fixed interval, so logs under SLURM or CI show which stage starves.
    let monitor = {
        let (metrics, counters, decode_task) =
            (metrics.clone(), counters.clone(), decode_done.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LIVE_LINE_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                if decode_task.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(());
                }
                tracing::info!(
                    "{} | {}",
                    live_line(&metrics, started.elapsed()),
                    counters.summary_line()
                );
            }
        })
    };
    Ok(ImageStream {
        samples: out_rx,
        counters,
        metrics,
        shards,
        started,
        max_bad_fraction: cfg.max_bad_fraction,
        reader,
        tasks: vec![shuffle, decode],
        monitor,
    })
}

impl ImageStream {
    /// Joins every stage, checks the bad fraction and logs the summary table and bad-input counts.
    pub async fn finish(self) -> Result<StreamSummary> {
        // Dropping our receiver lets the stages end even if the consumer stopped early.
        drop(self.samples);
        self.monitor.abort();
        let mut first_error = None;
        for task in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(join) => {
                    first_error
                        .get_or_insert(Error::Invalid(format!("a stage task failed: {join}")));
                }
            }
        }
        let reader = self.reader;
        let joined = tokio::task::spawn_blocking(move || reader.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            first_error.get_or_insert(Error::Invalid("the shard reader thread panicked".into()));
        }
        let elapsed = self.started.elapsed();
        let table = summary_table(&self.metrics, elapsed);
        tracing::info!(
            "stage summary after {:.1}s:\n{table}{}",
            elapsed.as_secs_f64(),
            self.counters.summary_line()
        );
        if let Some(e) = first_error {
            return Err(e);
        }
        self.counters.check_bad_fraction(self.max_bad_fraction)?;
        Ok(StreamSummary {
            good: self.counters.good(),
            bad: self.counters.total_bad(),
            elapsed,
            table,
        })
    }
}

fn read_stage(
    shards: &[String],
    cfg: &DataConfig,
    counters: &RunCounters,
    metrics: &StageMetrics,
    tx: async_channel::Sender<Sample>,
) {
    let started = Instant::now();
    'passes: loop {
        let mut emitted_this_pass = 0u64;
        for shard in shards {
            let options = ReadOptions {
                stats: Some(&metrics.source),
                hash_remote: false,
                limits: cfg.read_limits(),
            };
            let read = read_shard_with(shard, counters, options, &mut |raw| {
                let Some(sample) = select_sample(raw, cfg, counters) else {
                    return true;
                };
                emitted_this_pass += 1;
                let bytes = sample.image.len() as u64;
                metrics.send_blocking(&tx, sample, bytes)
            });
            let keep_going = read.keep_going;
            if !keep_going {
                break 'passes;
            }
        }
        // With samples_per_rank the reader starts over on its shards until the consumer has enough;
        // a pass that found nothing usable would loop forever, so it ends the stream instead.
        if cfg.samples_per_rank == 0 || emitted_this_pass == 0 {
            break;
        }
    }
    metrics.add_busy(started.elapsed().saturating_sub(metrics.blocked_output()));
}

async fn shuffle_stage(
    rx: async_channel::Receiver<Sample>,
    tx: async_channel::Sender<Sample>,
    mut buffer: ShuffleBuffer<Sample>,
    metrics: Arc<StageMetrics>,
) -> Result<()> {
    while let Some(item) = metrics.recv(&rx).await {
        buffer.push(item);
        if buffer.wants_extra() {
            if let Some(extra) = metrics.recv(&rx).await {
                buffer.push(extra);
            }
        }
        if let Some(ready) = buffer.pop_ready() {
            let bytes = ready.image.len() as u64;
            if !metrics.send(&tx, ready, bytes).await {
                return Ok(());
            }
        }
    }
    while let Some(item) = buffer.drain_one() {
        let bytes = item.image.len() as u64;
        if !metrics.send(&tx, item, bytes).await {
            break;
        }
    }
    Ok(())
}

type Processed = (Sample, std::result::Result<CroppedSample, DecodeError>);

async fn decode_stage(
    rx: async_channel::Receiver<Sample>,
    tx: async_channel::Sender<CroppedSample>,
    cfg: Arc<DataConfig>,
    counters: Arc<RunCounters>,
    metrics: Arc<StageMetrics>,
    pool: Arc<rayon::ThreadPool>,
) -> Result<()> {
    // Enough work in flight to keep every pool thread busy while the head of the line finishes.
    let max_in_flight = 2 * pool.current_num_threads() + 2;
    let mut in_flight: VecDeque<tokio::sync::oneshot::Receiver<Processed>> = VecDeque::new();
    let mut input_open = true;
    let mut emitted = 0u64;
    let limit = cfg.samples_per_rank;
    let submit = |sample: Sample, in_flight: &mut VecDeque<_>| {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let (cfg, metrics) = (cfg.clone(), metrics.clone());
        pool.spawn(move || {
            let start = Instant::now();
            let result = process_sample(&sample, &cfg);
            metrics.add_busy(start.elapsed());
            let _ = done_tx.send((sample, result));
        });
        in_flight.push_back(done_rx);
    };
    loop {
        // Wait for input only when nothing is in flight; otherwise take what is already queued.
        while input_open && in_flight.len() < max_in_flight {
            let next = if in_flight.is_empty() {
                metrics.recv(&rx).await
            } else {
                match rx.try_recv() {
                    Ok(s) => Some(s),
                    Err(async_channel::TryRecvError::Empty) => break,
                    Err(async_channel::TryRecvError::Closed) => None,
                }
            };
            match next {
                Some(sample) => submit(sample, &mut in_flight),
                None => input_open = false,
            }
        }
        let Some(head) = in_flight.pop_front() else {
            break;
        };
        let (sample, result) = head
            .await
            .map_err(|_| Error::Invalid("a decode worker panicked".into()))?;
        match result {
            Ok(cropped) => {
                counters.add_good(1);
                let bytes = (cropped.image.pixels.len()
                    + cropped.flipped.as_ref().map_or(0, |f| f.pixels.len()))
                    as u64;
                if !metrics.send(&tx, cropped, bytes).await {
                    break;
                }
                emitted += 1;
                if limit > 0 && emitted >= limit {
                    break;
                }
            }
            Err(e) => {
                counters.record(e.kind, &sample.shard, &sample.key, &e.detail);
                // Abort early on a flood of bad input instead of reading a whole broken dataset.
                let seen = counters.good() + counters.total_bad();
                if seen >= EARLY_ABORT_MIN_SEEN {
                    counters.check_bad_fraction(cfg.max_bad_fraction)?;
                }
            }
        }
    }
    Ok(())
}

const LIVE_LINE_INTERVAL: Duration = Duration::from_secs(10);

/// The bad fraction is only judged mid-run after this many samples, so a few early bad ones among the
/// first dozen do not abort a run that would end well under the limit.
const EARLY_ABORT_MIN_SEEN: u64 = 2000;
