//! The cache loader: shard order per (seed, epoch) before the rank split, a sample shuffle buffer, one
//! random view per sample with its own features, and all per-batch randomness (latent draw, noise,
//! label drop) from generators keyed by (seed, epoch, rank, batch). Nothing depends on thread timing or
//! on the libtorch RNG, so a resumed run replays exactly the batches an uninterrupted run would see.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand_chacha::ChaCha8Rng;
use rand_core::Rng;
use stages::cache::{DType, ShardReader};
use stages::order::{epoch_shards, keyed_rng, RankSplit, ShuffleBuffer, PURPOSE_SAMPLES};
use tch::{Device, Kind, Tensor};

const PURPOSE_VIEWS: u64 = 10;
/// Per-batch generators use purposes above this, so they never collide with the order streams.
const PURPOSE_BATCH: u64 = 1 << 32;

/// What the loader needs to know; built from the config and the model's shapes.
#[derive(Clone, Debug)]
pub struct LoaderSpec {
    /// Cache shard files in a fixed (sorted) order.
    pub shards: Vec<PathBuf>,
    pub batch: usize,
    pub seed: u64,
    pub split: RankSplit,
    pub shuffle_buffer: usize,
    pub prefetch: usize,
    pub latent: bool,
    pub latent_scaling: f64,
    pub latent_shift: f64,
    pub noise_sigma: f64,
    pub label_drop: f64,
    /// Token count and width (T, D) of the alignment targets, when they are read from the cache.
    pub features: Option<[usize; 2]>,
    /// Hand out each sample's cached crop in its view (mirrored for view 1), for features computed
    /// online.
    pub view_images: bool,
    /// (C, H, W) of the flow input.
    pub input_shape: [usize; 3],
    /// Classes of the model: a cached label outside −1..num_classes is an error (0 = unconditional,
    /// labels unused).
    pub num_classes: i64,
    pub device: Device,
}

/// Where the loader stands: the next batch it hands out is batch `batch` of `epoch`.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Position {
    pub epoch: u64,
    pub batch: u64,
}

pub struct Batch {
    /// Flow input (B, C, H, W) with noise augmentation, on the device.
    pub x: Tensor,
    /// Labels (B,) with dropped ones set to −1.
    pub y: Tensor,
    /// Alignment targets (B, T, D) float, when requested.
    pub features: Option<Tensor>,
    /// The crops (B, 3, S, S) uint8 in each sample's view, when `view_images` is set.
    pub images: Option<Tensor>,
    /// The position after this batch (what a checkpoint taken after it records).
    pub next: Position,
}

/// One sample with the chosen view already cut out.
struct Item {
    label: i64,
    /// Image u8 H×W×3 with the view's flip applied (pixel mode, or online features), and VAE mean
    /// and std (latent mode).
    pixels: Vec<u8>,
    mean: Vec<f32>,
    std: Vec<f32>,
    /// The view's alignment targets as the cache stores them (f16 by default): widened to f32 on the
    /// device, so the host copies and uploads half the bytes.
    features: Vec<u8>,
    features_dtype: Option<DType>,
    /// Per-token scales of int8 targets (`features_scale`), empty otherwise.
    features_scale: Vec<f32>,
}

pub struct Loader {
    rx: Receiver<anyhow::Result<Batch>>,
    _workers: Vec<JoinHandle<()>>,
    /// Time the consumer spent blocked in `next`.
    pub waited: Duration,
}

impl Loader {
    pub fn start(spec: LoaderSpec, from: Position) -> anyhow::Result<Loader> {
        if spec.shards.is_empty() {
            bail!("the cache has no shards");
        }
        for path in &spec.shards {
            check_fields(path, &spec)?;
        }
        let (item_tx, item_rx) =
            sync_channel::<anyhow::Result<(Position, Option<Item>)>>(spec.batch.max(64) * 2);
        let (batch_tx, batch_rx) = sync_channel(spec.prefetch.max(1));
        let reader_spec = spec.clone();
        let reader = std::thread::Builder::new()
            .name("train-read".into())
            .spawn(move || read_items(&reader_spec, from, &item_tx))
            .context("spawning the cache reader thread")?;
        let assembler = std::thread::Builder::new()
            .name("train-batch".into())
            .spawn(move || assemble(&spec, from, item_rx, &batch_tx))
            .context("spawning the batch thread")?;
        Ok(Loader {
            rx: batch_rx,
            _workers: vec![reader, assembler],
            waited: Duration::ZERO,
        })
    }

    pub fn next(&mut self) -> anyhow::Result<Batch> {
        let start = Instant::now();
        let got = self
            .rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the cache loader stopped without an error"))?;
        self.waited += start.elapsed();
        got
    }
}

/// Checks up front that a shard holds the fields of this run in shapes that fit the model.
fn check_fields(path: &Path, spec: &LoaderSpec) -> anyhow::Result<()> {
    let reader =
        ShardReader::open(path).with_context(|| format!("cache shard {}", path.display()))?;
    let footer = reader.footer();
    let field = |name: &str| footer.fields.iter().find(|f| f.name == name);
    let need = |name: &str| {
        field(name).with_context(|| format!("cache shard {}: no field `{name}`", path.display()))
    };
    let [c, h, w] = spec.input_shape;
    let label = need("label")?;
    if label.dtype != DType::I64 || !label.shape.is_empty() {
        bail!(
            "cache shard {}: field `label` is {:?} of shape {:?}, expected one int64 per sample",
            path.display(),
            label.dtype,
            label.shape
        );
    }
    if spec.latent {
        for name in ["vae_mean", "vae_std"] {
            let f = need(name)?;
            if f.shape.len() != 4 || f.shape[1..] != [c, h, w] {
                bail!("cache shard {}: field `{name}` has shape {:?}, the flow needs [V, {c}, {h}, {w}]", path.display(), f.shape);
            }
        }
    }
    if spec.latent && spec.view_images {
        let f = need("image").map_err(|e| {
            e.context("online features need cached crops: precompute with store_image = true")
        })?;
        if f.shape.len() != 3 || f.shape[2] != 3 {
            bail!(
                "cache shard {}: field `image` has shape {:?}, expected [S, S, 3]",
                path.display(),
                f.shape
            );
        }
    } else if !spec.latent {
        let f = need("image").map_err(|e| {
            e.context("pixel training needs cached crops: precompute with store_image = true")
        })?;
        if f.shape != [h, w, c] {
            bail!(
                "cache shard {}: field `image` has shape {:?}, the flow needs [{h}, {w}, {c}]",
                path.display(),
                f.shape
            );
        }
    }
    if let Some([t, d]) = spec.features {
        let f = need("features")?;
        if f.shape.len() != 3 || f.shape[1..] != [t, d] {
            bail!("cache shard {}: field `features` has shape {:?}, the alignment needs [V, {t}, {d}]", path.display(), f.shape);
        }
    }
    Ok(())
}

fn read_items(
    spec: &LoaderSpec,
    from: Position,
    tx: &SyncSender<anyhow::Result<(Position, Option<Item>)>>,
) {
    let names: Vec<String> = spec
        .shards
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mut epoch = from.epoch;
    loop {
        let order = epoch_shards(&names, spec.seed, epoch, true, spec.split);
        if order.is_empty() {
            let _ = tx.send(Err(anyhow::anyhow!(
                "rank {} of {} gets no cache shard ({} in all)",
                spec.split.rank,
                spec.split.world,
                names.len()
            )));
            return;
        }
        let mut views = keyed_rng(spec.seed, epoch, spec.split.rank as u64, PURPOSE_VIEWS);
        let mut buffer = ShuffleBuffer::new(
            spec.shuffle_buffer,
            spec.shuffle_buffer,
            keyed_rng(spec.seed, epoch, spec.split.rank as u64, PURPOSE_SAMPLES),
        );
        let pos = Position { epoch, batch: 0 };
        for name in &order {
            let result = read_shard(Path::new(name), spec, &mut views, &mut |item| {
                buffer.push(item);
                if let Some(ready) = buffer.pop_ready() {
                    tx.send(Ok((pos, Some(ready)))).is_ok()
                } else {
                    true
                }
            });
            match result {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        while let Some(item) = buffer.drain_one() {
            if tx.send(Ok((pos, Some(item)))).is_err() {
                return;
            }
        }
        // End of epoch marker: a partial last batch is dropped so every batch index is well defined.
        if tx.send(Ok((pos, None))).is_err() {
            return;
        }
        epoch += 1;
    }
}

/// Streams one shard chunk by chunk; `emit` returns false when the consumer is gone.
fn read_shard(
    path: &Path,
    spec: &LoaderSpec,
    views: &mut ChaCha8Rng,
    emit: &mut dyn FnMut(Item) -> bool,
) -> anyhow::Result<bool> {
    let ctx = || format!("cache shard {}", path.display());
    let mut reader = ShardReader::open(path).with_context(ctx)?;
    let fields = reader.footer().fields.clone();
    let idx = |name: &str| fields.iter().position(|f| f.name == name);
    let label_i = idx("label").with_context(ctx)?;
    let chunks = reader.footer().chunks.clone();
    for (ci, chunk) in chunks.iter().enumerate() {
        let labels = reader.read_frame(ci, label_i).with_context(ctx)?;
        let mut cols: Vec<(usize, Vec<u8>)> = vec![];
        let mut wanted = vec![];
        if spec.latent {
            wanted.extend(["vae_mean", "vae_std"]);
        }
        if !spec.latent || spec.view_images {
            wanted.push("image");
        }
        if spec.features.is_some() {
            wanted.push("features");
            if idx("features_scale").is_some() {
                wanted.push("features_scale");
            }
        }
        for name in &wanted {
            let i = idx(name).with_context(|| format!("{}: no field `{name}`", ctx()))?;
            cols.push((i, reader.read_frame(ci, i).with_context(ctx)?));
        }
        let row0: usize = chunks[..ci].iter().map(|c| c.rows).sum();
        for row in 0..chunk.rows {
            let label =
                i64::from_le_bytes(labels[row * 8..row * 8 + 8].try_into().expect("8 bytes"));
            if spec.num_classes > 0 && !(-1..spec.num_classes).contains(&label) {
                let key = reader
                    .footer()
                    .keys
                    .get(row0 + row)
                    .cloned()
                    .unwrap_or_default();
                bail!(
                    "cache shard {}, row {} (key {key}): label {label} is outside the model's {} classes",
                    path.display(),
                    row0 + row,
                    spec.num_classes
                );
            }
            let mut item = Item {
                label,
                pixels: vec![],
                mean: vec![],
                std: vec![],
                features: vec![],
                features_dtype: None,
                features_scale: vec![],
            };
            // View count comes from the per-view fields; the image's view 1 is its mirror.
            let n_views = cols
                .iter()
                .find(|(i, _)| fields[*i].name != "image")
                .map(|(i, _)| fields[*i].shape[0])
                .unwrap_or(2)
                .max(1);
            let view = stages::order::below(views, n_views);
            for (i, bytes) in &cols {
                let f = &fields[*i];
                let rb = f.row_bytes();
                let row_bytes = &bytes[row * rb..(row + 1) * rb];
                let per_view = rb / f.shape[0].max(1);
                match f.name.as_str() {
                    "image" => {
                        item.pixels = if view == 1 {
                            mirror(row_bytes, f.shape[0], f.shape[1])
                        } else {
                            row_bytes.to_vec()
                        }
                    }
                    "vae_mean" => {
                        item.mean = to_f32(
                            &row_bytes[view * per_view..(view + 1) * per_view],
                            f.dtype,
                            path,
                            "vae_mean",
                        )?
                    }
                    "vae_std" => {
                        item.std = to_f32(
                            &row_bytes[view * per_view..(view + 1) * per_view],
                            f.dtype,
                            path,
                            "vae_std",
                        )?
                    }
                    "features" => {
                        host_kind(f.dtype, path, "features")?;
                        item.features = row_bytes[view * per_view..(view + 1) * per_view].to_vec();
                        item.features_dtype = Some(f.dtype);
                    }
                    "features_scale" => {
                        item.features_scale = to_f32(
                            &row_bytes[view * per_view..(view + 1) * per_view],
                            f.dtype,
                            path,
                            "features_scale",
                        )?
                    }
                    _ => {}
                }
            }
            if !emit(item) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

fn mirror(hwc: &[u8], h: usize, w: usize) -> Vec<u8> {
    let mut out = vec![0u8; hwc.len()];
    for y in 0..h {
        for x in 0..w {
            let (src, dst) = ((y * w + x) * 3, (y * w + (w - 1 - x)) * 3);
            out[dst..dst + 3].copy_from_slice(&hwc[src..src + 3]);
        }
    }
    out
}

/// The tensor kind holding a float field's bytes as stored (bf16 is the upper half of an f32, which is
/// what libtorch's bfloat16 is).
fn host_kind(dtype: DType, path: &Path, field: &str) -> anyhow::Result<Kind> {
    Ok(match dtype {
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::Bf16 => Kind::BFloat16,
        DType::I8 => Kind::Int8,
        other => bail!(
            "cache shard {}: field `{field}` has dtype {other:?}, expected a float type",
            path.display()
        ),
    })
}

fn to_f32(bytes: &[u8], dtype: DType, path: &Path, field: &str) -> anyhow::Result<Vec<f32>> {
    Ok(match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        DType::I8 => bytes.iter().map(|&b| b as i8 as f32).collect(),
        other => bail!(
            "cache shard {}: field `{field}` has dtype {other:?}, expected a float type",
            path.display()
        ),
    })
}

/// Rows of equal length, one after the other, in a new host tensor of `size` and `kind`: the only
/// host copy a batch field gets before the pinned staging copy.
fn packed(rows: &[&[u8]], size: &[i64], kind: Kind) -> anyhow::Result<Tensor> {
    let row = rows.first().map_or(0, |r| r.len());
    let total: i64 = size.iter().product();
    if rows.iter().any(|r| r.len() != row)
        || (row * rows.len()) as i64 != total * kind.elt_size_in_bytes() as i64
    {
        bail!("rows of unequal or wrong size for {size:?} {kind:?}");
    }
    let t = Tensor::f_empty(size, (kind, Device::Cpu))?;
    let dst = t.data_ptr().cast::<u8>();
    for (k, r) in rows.iter().enumerate() {
        // SAFETY: `t` is a fresh contiguous CPU tensor of exactly rows × row bytes (checked above),
        // owned here and not yet shared; the rows are distinct Rust slices, not libtorch memory.
        unsafe { std::ptr::copy_nonoverlapping(r.as_ptr(), dst.add(k * row), row) };
    }
    Ok(t)
}

/// A host tensor on the loader's device. On CUDA one copy into pinned memory, then a non-blocking
/// upload: this thread queues the copy and goes on assembling the next batch. tch cannot pick a
/// stream, so the copy runs on the device's default stream, between the training step's kernels,
/// not beside them; overlapping it with them needs a side stream (torch-ext does not offer one).
fn upload(t: Tensor, device: Device) -> anyhow::Result<Tensor> {
    if !device.is_cuda() {
        return Ok(t);
    }
    let pinned = t.f_pin_memory(device)?;
    Ok(pinned.f_to_device_(device, pinned.kind(), true, false)?)
}

/// The batch's alignment targets (B, T, D) float32 on `device`: packed and uploaded in the cache's
/// dtype, widened (and int8 ones scaled per token) there.
fn features_on_device(
    items: &[Item],
    t: usize,
    d: usize,
    device: Device,
) -> anyhow::Result<Tensor> {
    let dtype = items.first().and_then(|it| it.features_dtype);
    let Some(dtype) = dtype else {
        bail!("no features in the batch");
    };
    let kind = host_kind(dtype, Path::new("(batch)"), "features")?;
    if items
        .iter()
        .any(|it| it.features_dtype != Some(dtype) || it.features.len() != t * d * dtype.size())
    {
        bail!("not {t}×{d} {dtype:?} values per sample");
    }
    let b = items.len() as i64;
    let rows: Vec<&[u8]> = items.iter().map(|it| it.features.as_slice()).collect();
    let host = packed(&rows, &[b, t as i64, d as i64], kind)?;
    let mut features = upload(host, device)?.f_to_kind(Kind::Float)?;
    let scaled = items
        .iter()
        .filter(|it| !it.features_scale.is_empty())
        .count();
    if scaled > 0 {
        if scaled != items.len() || items.iter().any(|it| it.features_scale.len() != t) {
            bail!("int8 features without one scale per token");
        }
        let scale: Vec<f32> = items
            .iter()
            .flat_map(|it| it.features_scale.iter().copied())
            .collect();
        let scale = upload(Tensor::from_slice(&scale).view([b, t as i64, 1]), device)?;
        features = features.f_mul(&scale)?;
    }
    Ok(features)
}

/// Standard normal draws (Box–Muller on 53-bit uniforms), so the stream is fixed by the generator alone.
pub fn normals(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn assemble(
    spec: &LoaderSpec,
    from: Position,
    rx: Receiver<anyhow::Result<(Position, Option<Item>)>>,
    tx: &SyncSender<anyhow::Result<Batch>>,
) {
    let mut pending: Vec<Item> = Vec::with_capacity(spec.batch);
    let mut current_epoch = None;
    let mut batch_index = 0u64;
    for msg in rx {
        let (pos, item) = match msg {
            Ok(m) => m,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        if current_epoch != Some(pos.epoch) {
            current_epoch = Some(pos.epoch);
            batch_index = 0;
            pending.clear();
        }
        let Some(item) = item else {
            pending.clear();
            continue;
        };
        pending.push(item);
        if pending.len() < spec.batch {
            continue;
        }
        let items = std::mem::take(&mut pending);
        let here = Position {
            epoch: pos.epoch,
            batch: batch_index,
        };
        batch_index += 1;
        // Resuming replays the epoch's order and drops what the run already consumed.
        if here < from {
            continue;
        }
        let next = Position {
            epoch: pos.epoch,
            batch: batch_index,
        };
        let batch = build(spec, here, next, items);
        if tx.send(batch).is_err() {
            return;
        }
    }
}

fn build(
    spec: &LoaderSpec,
    here: Position,
    next: Position,
    items: Vec<Item>,
) -> anyhow::Result<Batch> {
    let mut rng = keyed_rng(
        spec.seed,
        here.epoch,
        spec.split.rank as u64,
        PURPOSE_BATCH + here.batch,
    );
    let [c, h, w] = spec.input_shape;
    let dim = c * h * w;
    let b = items.len();
    let mut x = Vec::with_capacity(b * dim);
    if spec.latent {
        let eps = normals(&mut rng, b * dim);
        let (scale, shift) = (spec.latent_scaling as f32, spec.latent_shift as f32);
        for (k, item) in items.iter().enumerate() {
            for j in 0..dim {
                x.push((item.mean[j] + item.std[j] * eps[k * dim + j] - shift) * scale);
            }
        }
    } else {
        // Cached crops are H×W×3 u8; the flow takes C×H×W in [-1, 1].
        for item in &items {
            for ch in 0..c {
                for p in 0..h * w {
                    x.push(item.pixels[p * c + ch] as f32 / 127.5 - 1.0);
                }
            }
        }
    }
    let noise = normals(&mut rng, b * dim);
    let sigma = spec.noise_sigma as f32;
    for (v, n) in x.iter_mut().zip(&noise) {
        *v += sigma * n;
    }
    let y: Vec<i64> = items
        .iter()
        .map(|it| {
            if uniform(&mut rng) < spec.label_drop {
                -1
            } else {
                it.label
            }
        })
        .collect();
    let what = || format!("epoch {} batch {}", here.epoch, here.batch);
    let x = upload(
        Tensor::from_slice(&x).view([b as i64, c as i64, h as i64, w as i64]),
        spec.device,
    )
    .with_context(|| format!("flow input of {}", what()))?;
    let y = upload(Tensor::from_slice(&y), spec.device)
        .with_context(|| format!("labels of {}", what()))?;
    let features = match spec.features {
        Some([t, d]) => Some(
            features_on_device(&items, t, d, spec.device)
                .with_context(|| format!("cache features of {}", what()))?,
        ),
        None => None,
    };
    let images = if spec.view_images {
        let side = (items[0].pixels.len() / 3) as f64;
        let s = side.sqrt() as i64;
        if items.iter().any(|it| it.pixels.len() as i64 != s * s * 3) {
            bail!(
                "cached crops of epoch {} batch {} are not square RGB",
                here.epoch,
                here.batch
            );
        }
        let rows: Vec<&[u8]> = items.iter().map(|it| it.pixels.as_slice()).collect();
        let hwc = packed(&rows, &[b as i64, s, s, 3], Kind::Uint8)?;
        // Uploaded as stored, made (B, 3, S, S) on the device: no host-side transpose copy.
        let images = upload(hwc, spec.device)
            .and_then(|t| Ok(t.f_permute([0, 3, 1, 2])?.f_contiguous()?))
            .with_context(|| format!("cached crops of {}", what()))?;
        Some(images)
    } else {
        None
    };
    Ok(Batch {
        x,
        y,
        features,
        images,
        next,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(features: Vec<u8>, dtype: DType, scale: Vec<f32>) -> Item {
        Item {
            label: 0,
            pixels: vec![],
            mean: vec![],
            std: vec![],
            features,
            features_dtype: Some(dtype),
            features_scale: scale,
        }
    }

    /// f16 targets stay f16 until they reach the device (half the bytes packed, pinned and uploaded)
    /// and come out as the f32 values the cache holds; int8 ones are scaled per token there, with the
    /// same f32 products as widening on the host.
    #[test]
    fn features_keep_the_cache_dtype_until_the_device() {
        let (t, d) = (2usize, 3usize);
        let values: Vec<Vec<f32>> = vec![
            vec![0.5, -1.25, 3.0, 1e-3, 65504.0, -0.0],
            vec![2.0, 0.1, -7.5, 0.333, 1.0, 4.0],
        ];
        let f16 = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect()
        };
        let items: Vec<Item> = values
            .iter()
            .map(|v| item(f16(v), DType::F16, vec![]))
            .collect();
        let rows: Vec<&[u8]> = items.iter().map(|it| it.features.as_slice()).collect();
        let host = packed(&rows, &[2, t as i64, d as i64], Kind::Half).unwrap();
        assert_eq!(host.kind(), Kind::Half, "widened on the host");
        let got = features_on_device(&items, t, d, Device::Cpu).unwrap();
        assert_eq!(got.kind(), Kind::Float);
        assert_eq!(got.size(), [2, t as i64, d as i64]);
        let want: Vec<f32> = values
            .iter()
            .flatten()
            .map(|x| half::f16::from_f32(*x).to_f32())
            .collect();
        let got: Vec<f32> = Vec::try_from(got.flatten(0, -1)).unwrap();
        assert_eq!(got, want);

        let q: Vec<i8> = vec![-128, -1, 0, 1, 64, 127];
        let scale = vec![0.013f32, 7.1];
        let bytes: Vec<u8> = q.iter().map(|&v| v as u8).collect();
        let items = vec![item(bytes, DType::I8, scale.clone())];
        let got = features_on_device(&items, t, d, Device::Cpu).unwrap();
        let want: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(k, &v)| v as f32 * scale[k / d])
            .collect();
        let got: Vec<f32> = Vec::try_from(got.flatten(0, -1)).unwrap();
        assert_eq!(got, want);

        // A sample of another shape or dtype is an error, not a panic.
        let bad = vec![
            item(f16(&values[0]), DType::F16, vec![]),
            item(vec![0; 4], DType::F16, vec![]),
        ];
        assert!(features_on_device(&bad, t, d, Device::Cpu).is_err());
    }
}
