//! `pipeline bench decode`: images/s for decode alone, crop alone and decode+crop, on one thread and
//! on N, for the exact (Pillow-identical) path (as the stream runs it: a region decode of what the
//! crop reads; and with a whole-image decode), the fast resampler and DCT-scaled decoding; then the
//! Pillow reference (`bench/pillow_reference.py`) on the same shards in the same invocation, and the
//! ratios the speed goals are stated in. A benchmark, not a test: numbers go to BENCHMARKS.md.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use rayon::prelude::*;
use stages::bad_input::RunCounters;
use stages::config::{DataConfig, DecodeScale};
use stages::crop::{center_crop_adm, ResizeImpl};
use stages::decode::{decode_rgb, decode_rgb_scaled};
use stages::demo::RgbImage;
use stages::image_stream::decode_and_crop;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Shard spec, e.g. '/data/imagenet/imagenet-train-{000000..000003}.tar'
    #[arg(long)]
    shards: String,
    /// Crop size (ADM center_crop_arr)
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Threads for the multi-thread rows (default: all cores)
    #[arg(long)]
    threads: Option<usize>,
    /// Use at most this many images (they are held in memory)
    #[arg(long, default_value_t = 2000)]
    limit: usize,
    /// Timed passes over the images; the best is reported
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Python for the Pillow reference (default: ./.venv/bin/python); `none` skips it
    #[arg(long)]
    python: Option<String>,
}

fn load_images(spec: &str, limit: usize, size: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let shards =
        stages::shardspec::expand_shard_spec(spec).with_context(|| format!("shard spec {spec}"))?;
    let cfg = DataConfig {
        label: stages::label::LabelSource::None,
        ..Default::default()
    };
    let counters = RunCounters::new();
    let mut images = Vec::new();
    'shards: for shard in &shards {
        let mut full = false;
        stages::wds_reader::read_shard(shard, &counters, &mut |raw| {
            // Keep only what decodes both ways, so every row times the same work on the same images.
            if let Some(sample) = stages::image_stream::select_sample(raw, &cfg, &counters) {
                match decode_rgb(&sample.image, cfg.max_pixels)
                    .and_then(|_| decode_rgb_scaled(&sample.image, cfg.max_pixels, size))
                {
                    Ok(_) => {
                        counters.add_good(1);
                        images.push(sample.image);
                    }
                    Err(e) => counters.record(e.kind, &sample.shard, &sample.key, &e.detail),
                }
            }
            full = images.len() >= limit;
            !full
        });
        if full {
            break 'shards;
        }
    }
    // What was left out, so that a run over real shards shows its broken members were met and
    // counted rather than silently dropped.
    println!("bench decode: read {}", counters.summary_line());
    if images.is_empty() {
        bail!("no decodable image in {spec}");
    }
    Ok(images)
}

/// `load_images` kept only images that decode both ways, so this would mean a nondeterministic decoder.
fn undecodable(index: usize, e: stages::decode::DecodeError) -> anyhow::Error {
    anyhow::anyhow!(
        "image {index} decoded while loading but not now: {:?}: {}",
        e.kind,
        e.detail
    )
}

/// Seconds for one pass of `work` over `n` items on `pool`.
fn pass(pool: &rayon::ThreadPool, n: usize, work: &(dyn Fn(usize) + Sync)) -> f64 {
    let start = Instant::now();
    pool.install(|| (0..n).into_par_iter().with_min_len(4).for_each(work));
    start.elapsed().as_secs_f64()
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let images = load_images(&a.shards, a.limit, a.size)?;
    let n = images.len();
    let mean_bytes = images.iter().map(Vec::len).sum::<usize>() as f64 / n as f64;
    let decoded: Vec<RgbImage> = images
        .iter()
        .enumerate()
        .map(|(i, b)| decode_rgb(b, u64::MAX).map_err(|e| undecodable(i, e)))
        .collect::<anyhow::Result<_>>()?;
    let mean_mp = decoded
        .iter()
        .map(|d| (d.width * d.height) as f64)
        .sum::<f64>()
        / n as f64
        / 1e6;
    println!("bench decode: {n} images, mean {:.0} KiB, {mean_mp:.3} MP, size {}, threads 1 and {threads}", mean_bytes / 1024.0, a.size);

    let size = a.size;
    let config = |scale: DecodeScale, imp: ResizeImpl| DataConfig {
        image_size: size,
        decode_scale: scale,
        resize_impl: imp,
        ..Default::default()
    };
    let (exact, fast) = (
        config(DecodeScale::Exact, ResizeImpl::Pillow),
        config(DecodeScale::Exact, ResizeImpl::Fast),
    );
    let (dct_exact, dct_fast) = (
        config(DecodeScale::Dct, ResizeImpl::Pillow),
        config(DecodeScale::Dct, ResizeImpl::Fast),
    );
    // What the stream runs per image (`image_stream::decode_and_crop`): the exact path decodes only
    // the source rectangle the crop reads.
    let stream = |cfg: &DataConfig, min_short: usize, i: usize| {
        drop(decode_and_crop(&images[i], cfg, min_short))
    };
    type Row<'a> = (&'static str, Box<dyn Fn(usize) + Sync + 'a>);
    let rows: Vec<Row> = vec![
        (
            "decode (libjpeg-turbo, exact)",
            Box::new(|i| drop(decode_rgb(&images[i], u64::MAX))),
        ),
        (
            "decode at DCT scale",
            Box::new(|i| drop(decode_rgb_scaled(&images[i], u64::MAX, size))),
        ),
        (
            "crop only, exact resampler",
            Box::new(|i| drop(center_crop_adm(&decoded[i], size, ResizeImpl::Pillow))),
        ),
        (
            "crop only, fast resampler",
            Box::new(|i| drop(center_crop_adm(&decoded[i], size, ResizeImpl::Fast))),
        ),
        ("end to end, exact", Box::new(|i| stream(&exact, 0, i))),
        (
            "end to end, exact, whole decode",
            Box::new(|i| {
                if let Ok(img) = decode_rgb(&images[i], u64::MAX) {
                    drop(center_crop_adm(&img, size, ResizeImpl::Pillow))
                }
            }),
        ),
        (
            "end to end, fast resampler",
            Box::new(|i| stream(&fast, 0, i)),
        ),
        (
            "end to end, dct + exact",
            Box::new(|i| stream(&dct_exact, size, i)),
        ),
        (
            "end to end, dct + fast",
            Box::new(|i| stream(&dct_fast, size, i)),
        ),
    ];
    println!(
        "{:<32} {:>12} {:>12} {:>9}",
        "path",
        "1 thread",
        format!("{threads} threads"),
        "scaling"
    );
    let mut results = std::collections::HashMap::new();
    // Round robin: every repeat times every row once on each pool, so a slow phase of a shared
    // machine hits all rows alike and the ratios between rows hold; each row keeps its best pass.
    let pools = [1, threads].map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build());
    let [one_pool, many_pool] = pools;
    let (one_pool, many_pool) = (one_pool?, many_pool?);
    let mut best = vec![(f64::INFINITY, f64::INFINITY); rows.len()];
    for _ in 0..a.repeats.max(1) {
        for ((_, work), (one, many)) in rows.iter().zip(&mut best) {
            *one = one.min(pass(&one_pool, n, work.as_ref()));
            *many = many.min(pass(&many_pool, n, work.as_ref()));
        }
    }
    for ((name, _), (one, many)) in rows.iter().zip(best) {
        let (one, many) = (n as f64 / one, n as f64 / many);
        println!("{name:<32} {one:>12.1} {many:>12.1} {:>8.2}x", many / one);
        results.insert(*name, (one, many));
    }

    // DCT modes against the exact mode, in 8-bit levels.
    for (name, cfg) in [("dct + exact", &dct_exact), ("dct + fast", &dct_fast)] {
        let (mut max, mut sum, mut count) = (0u8, 0u64, 0u64);
        for (i, bytes) in images.iter().enumerate() {
            let reference = decode_and_crop(bytes, &exact, 0).map_err(|e| undecodable(i, e))?;
            let dct = decode_and_crop(bytes, cfg, size).map_err(|e| undecodable(i, e))?;
            for (x, y) in reference.pixels.iter().zip(&dct.pixels) {
                let d = x.abs_diff(*y);
                max = max.max(d);
                sum += d as u64;
            }
            count += reference.pixels.len() as u64;
        }
        println!(
            "{name} vs exact: max |Δ| {max}, mean |Δ| {:.3}",
            sum as f64 / count as f64
        );
    }

    // The stream itself (reader thread, shuffle, decode pool, bounded queues) on the same shards.
    let stream_cfg = DataConfig {
        shards: a.shards.clone(),
        image_size: size,
        threads,
        shuffle_buffer: 0,
        shard_shuffle: false,
        samples_per_rank: n as u64,
        max_bad_fraction: 1.0,
        decode_scale: DecodeScale::Exact,
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let summary = runtime.block_on(async {
        let stream = stages::image_stream::open_image_stream(&stream_cfg, Default::default(), 0)?;
        while stream.samples.recv().await.is_ok() {}
        stream.finish().await
    })?;
    println!(
        "stream (read → shuffle → decode+crop, exact, {threads} threads): {:.1} img/s\n{}",
        summary.good as f64 / summary.elapsed.as_secs_f64(),
        summary.table
    );

    let python = match a.python.as_deref() {
        Some("none") => return Ok(()),
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(".venv/bin/python"),
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/pillow_reference.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args([
            "--shards",
            &a.shards,
            "--size",
            &size.to_string(),
            "--limit",
            &n.to_string(),
            "--repeats",
            &a.repeats.to_string(),
        ])
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let pillow: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or(""))
        .with_context(|| format!("parsing Pillow output: {text}"))?;
    let get = |k: &str| pillow[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "Pillow (1 thread, {} images): decode {:.1}, decode + ADM {:.1}, draft + ADM {:.1} img/s",
        pillow["images"],
        get("decode"),
        get("decode_adm"),
        get("draft_adm")
    );
    let e2e = results["end to end, exact"];
    let whole = results["end to end, exact, whole decode"];
    let fast = results["end to end, fast resampler"];
    let dct_exact = results["end to end, dct + exact"];
    let dct_fast = results["end to end, dct + fast"];
    let decode = results["decode (libjpeg-turbo, exact)"];
    let dct_decode = results["decode at DCT scale"];
    println!(
        "ratios (per core): exact e2e / Pillow e2e {:.2}x; fast e2e / Pillow e2e {:.2}x",
        e2e.0 / get("decode_adm"),
        fast.0 / get("decode_adm")
    );
    println!(
        "ratios (per core): exact e2e / decode-only {:.2} (whole-image decode: {:.2}); fast e2e / decode-only {:.2}",
        e2e.0 / decode.0,
        whole.0 / decode.0,
        fast.0 / decode.0
    );
    println!(
        "ratios (per core): dct+exact e2e / Pillow draft+ADM {:.2}x; dct+fast {:.2}x; DCT-scale decode alone {:.2}x",
        dct_exact.0 / get("draft_adm"),
        dct_fast.0 / get("draft_adm"),
        dct_decode.0 / get("draft_adm")
    );
    println!(
        "scaling {threads} threads / 1: exact e2e {:.2}x, fast e2e {:.2}x, dct+exact e2e {:.2}x",
        e2e.1 / e2e.0,
        fast.1 / fast.0,
        dct_exact.1 / dct_exact.0
    );
    Ok(())
}
