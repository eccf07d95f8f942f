//! Labelled evaluation data for `classify` and `bpd`, in batches: webdataset shards (decoded and
//! cropped by the image stream, in reading order) or a precompute cache directory (`manifest.json` +
//! `.fbc` shards: `image` for pixel models, `vae_mean` view 0 for latent models).

use std::path::Path;

use anyhow::{bail, Context};
use stages::cache::{DType, Manifest, ShardReader};
use stages::order::RankSplit;
use tch::{Kind, Tensor};

use crate::evaluate::trained::Trained;

/// One batch in the flow's input space.
pub struct Batch {
    /// Flow input (B, C, H, W) on the model's device.
    pub x: Tensor,
    /// Class index per sample, −1 when the source had none.
    pub labels: Vec<i64>,
    /// `shard/key` per sample.
    pub ids: Vec<String>,
    /// Index of the first sample in the whole data (all ranks' samples in reading order).
    pub first: usize,
}

pub fn is_cache(data: &str) -> bool {
    Path::new(data)
        .join(stages::cache::manifest::MANIFEST_NAME)
        .is_file()
}

/// Calls `f` on consecutive batches of at most `batch` samples, at most `limit` samples in all; returns
/// the number of samples seen. With several ranks, `split.rank` sees only its contiguous run of the
/// batches one process would see (`rank_parts::slice` of the batch list), batched the same way.
pub fn for_each_batch(
    label: &str,
    data: &str,
    trained: &Trained,
    batch: usize,
    limit: Option<usize>,
    split: RankSplit,
    f: &mut dyn FnMut(Batch) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let batch = batch.max(1);
    if split.world > 1 && limit.is_none() && !is_cache(data) {
        // A stream's length is known only at its end, but each rank must know where its slice starts
        // before it reads.
        bail!("{data}: with several ranks a shard spec needs --limit (at least the number of images), or use a precompute cache, whose manifest counts its samples");
    }
    // Known up front for a cache (its manifest) or a --limit; a shard spec is counted as it goes.
    let cached = is_cache(data)
        .then(|| Manifest::load(Path::new(data)).ok().flatten())
        .flatten()
        .map(|m| {
            m.shards
                .values()
                .map(|s| s.summary.samples as u64)
                .sum::<u64>()
        });
    let total = match (limit, cached) {
        (Some(l), Some(c)) => (l as u64).min(c),
        (Some(l), None) => l as u64,
        (None, Some(c)) => c,
        (None, None) => 0,
    };
    // This rank's share for the progress line (close, not exact, for a cache, whose batches restart at
    // every shard).
    let total = if split.world > 1 {
        crate::evaluate::rank_parts::batch_slice(total as usize, batch, split).len() as u64
    } else {
        total
    };
    let limit = limit.unwrap_or(usize::MAX);
    let progress = crate::runtime::progress::Progress::new(label, total);
    // A libtorch exception on a batch is an error naming its first sample, not a panic.
    let mut guarded = |b: Batch| {
        let what = format!(
            "{data}: the batch starting at sample {}",
            b.ids.first().map_or("?", String::as_str)
        );
        let n = b.ids.len() as u64;
        crate::runtime::torch_guard::guard(&what, || f(b))?;
        progress.add(n);
        Ok(())
    };
    let seen = if is_cache(data) {
        from_cache(Path::new(data), trained, batch, limit, split, &mut guarded)
    } else {
        from_shards(data, trained, batch, limit, split, &mut guarded)
    }?;
    progress.finish();
    Ok(seen)
}

fn from_shards(
    spec: &str,
    trained: &Trained,
    batch: usize,
    limit: usize,
    split: RankSplit,
    f: &mut dyn FnMut(Batch) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    // Every rank reads the stream from its start (its order is the reading order) and decodes, but
    // does not evaluate, the images before its slice.
    let mine = if split.world > 1 {
        crate::evaluate::rank_parts::batch_slice(limit, batch, split)
    } else {
        0..limit
    };
    if mine.is_empty() {
        return Ok(0);
    }
    let cfg = trained.data_config(spec)?;
    let size = cfg.image_size;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stream = stages::image_stream::open_image_stream(&cfg, Default::default(), 0)
            .with_context(|| format!("reading {spec}"))?;
        let (mut pixels, mut labels, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        let (mut index, mut seen) = (0, 0);
        let mut flush = |pixels: &mut Vec<u8>,
                         labels: &mut Vec<i64>,
                         ids: &mut Vec<String>,
                         first: usize|
         -> anyhow::Result<()> {
            let n = labels.len() as i64;
            let images = Tensor::from_slice(pixels)
                .view([n, size as i64, size as i64, 3])
                .permute([0, 3, 1, 2]);
            f(Batch {
                x: trained.images_to_flow(&images)?,
                labels: std::mem::take(labels),
                ids: std::mem::take(ids),
                first,
            })?;
            pixels.clear();
            Ok(())
        };
        while index < mine.end {
            let Ok(sample) = stream.samples.recv().await else {
                break;
            };
            index += 1;
            if index <= mine.start {
                continue;
            }
            pixels.extend_from_slice(&sample.image.pixels);
            labels.push(sample.label.map_or(-1, i64::from));
            // Shard file name, as cache manifests record sources: ids agree whichever way the data came.
            let shard = std::path::Path::new(&*sample.shard)
                .file_name()
                .map_or_else(
                    || sample.shard.to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
            ids.push(format!("{shard}/{}", sample.key));
            seen += 1;
            if labels.len() == batch {
                flush(&mut pixels, &mut labels, &mut ids, index - batch)?;
            }
        }
        if !labels.is_empty() {
            let first = index - labels.len();
            flush(&mut pixels, &mut labels, &mut ids, first)?;
        }
        stream
            .finish()
            .await
            .with_context(|| format!("reading {spec}"))?;
        Ok(seen)
    })
}

fn tensor_of(bytes: &[u8], dtype: DType, shape: &[i64]) -> anyhow::Result<Tensor> {
    let kind = match dtype {
        DType::U8 => Kind::Uint8,
        DType::F16 => Kind::Half,
        DType::F32 => Kind::Float,
        DType::I64 => Kind::Int64,
        other => bail!("unsupported dtype {other:?}"),
    };
    Ok(Tensor::f_from_data_size(bytes, shape, kind)?)
}

fn from_cache(
    dir: &Path,
    trained: &Trained,
    batch: usize,
    limit: usize,
    split: RankSplit,
    f: &mut dyn FnMut(Batch) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let manifest =
        Manifest::load(dir)?.with_context(|| format!("{}: no manifest", dir.display()))?;
    let cfg = &trained.model().cfg;
    // One process batches each shard from its start; a rank takes its slice of that batch list, so
    // it first counts every shard's batches (the shard footers only).
    let mut takes = Vec::new();
    let mut counted = 0;
    for entry in manifest.shards.values() {
        if counted >= limit {
            break;
        }
        let path = dir.join(&entry.file);
        let take = ShardReader::open(&path)?.n_samples().min(limit - counted);
        takes.push(take);
        counted += take;
    }
    let n_batches: usize = takes.iter().map(|t| t.div_ceil(batch)).sum();
    let my_batches = crate::evaluate::rank_parts::slice(n_batches, split);
    let (mut seen, mut first_batch, mut first_sample) = (0, 0, 0);
    for (entry, &take) in manifest.shards.values().zip(&takes) {
        let shard_batches = first_batch..first_batch + take.div_ceil(batch);
        let shard_first = first_sample;
        first_batch = shard_batches.end;
        first_sample += take;
        let wanted =
            shard_batches.start.max(my_batches.start)..shard_batches.end.min(my_batches.end);
        if wanted.is_empty() {
            continue;
        }
        let path = dir.join(&entry.file);
        let mut reader = ShardReader::open(&path)?;
        let n = reader.n_samples();
        let keys = reader.footer().keys.clone();
        let field = if trained.latent { "vae_mean" } else { "image" };
        let spec = reader
            .footer()
            .fields
            .iter()
            .find(|s| s.name == field)
            .cloned()
            .with_context(|| {
                format!(
                    "{}: cache shard has no field `{field}` (a {} model needs it)",
                    path.display(),
                    if trained.latent { "latent" } else { "pixel" }
                )
            })?;
        let label_bytes = reader.read_field("label")?;
        let labels: Vec<i64> = label_bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let bytes = reader.read_field(field)?;
        let mut shape: Vec<i64> = vec![n as i64];
        shape.extend(spec.shape.iter().map(|&d| d as i64));
        let values = tensor_of(&bytes, spec.dtype, &shape)
            .with_context(|| format!("{}: field `{field}`", path.display()))?;
        let x = if trained.latent {
            // (n, V, C, h, w): view 0 is the crop itself.
            if shape.len() != 5 || shape[2..] != [cfg.in_channels, cfg.img_size, cfg.img_size] {
                bail!("{}: field `vae_mean` has per-sample shape {:?}, the flow takes [V, {}, {}, {}]", path.display(), spec.shape, cfg.in_channels, cfg.img_size, cfg.img_size);
            }
            let vae = &trained
                .vae
                .as_ref()
                .context("a latent model needs --vae (its scaling factor)")?
                .model;
            vae.scale_latents(&values.select(1, 0).to_kind(Kind::Float))
        } else {
            let size = trained.pixel_size();
            if shape[1..] != [size, size, 3] {
                bail!("{}: field `image` has per-sample shape {:?}, the flow takes [{size}, {size}, 3]", path.display(), spec.shape);
            }
            values.permute([0, 3, 1, 2]).to_kind(Kind::Float) / 127.5 - 1.0
        };
        if n < take {
            bail!("{}: {n} samples, {take} a moment ago", path.display());
        }
        let local = (wanted.start - shard_batches.start) * batch
            ..((wanted.end - shard_batches.start) * batch).min(take);
        for start in local.clone().step_by(batch) {
            let len = batch.min(local.end - start);
            let source = entry.source.name.as_str();
            f(Batch {
                x: x.narrow(0, start as i64, len as i64)
                    .to_device(trained.device),
                labels: labels[start..start + len].to_vec(),
                ids: keys[start..start + len]
                    .iter()
                    .map(|k| format!("{source}/{k}"))
                    .collect(),
                first: shard_first + start,
            })?;
        }
        seen += local.len();
    }
    Ok(seen)
}
