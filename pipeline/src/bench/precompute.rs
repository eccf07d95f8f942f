//! `pipeline bench precompute`: images/s of each precompute stage on its own (read + decode/crop,
//! encode, compress + write) and of the overlapped pipeline on the same samples, the fraction of time
//! the encode stage waits for input, and cache readback (read + checksum + decompress + assemble a
//! batch) against bare zstd decompression of the same frames. One JSON line; goals: end to end ≥ 0.9×
//! the slowest standalone stage, readback ≥ 0.8× raw decompression.

use std::time::Instant;

use anyhow::Context;
use rayon::prelude::*;
use stages::bad_input::RunCounters;
use stages::cache::{ShardReader, ShardWriter, SourceShard};

use crate::config::ConfigArgs;
use crate::precompute::{self, encode};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Source shards (overrides data.shards); the first one is used
    #[arg(long)]
    shards: Option<String>,
    /// Samples to run through each measurement
    #[arg(long, default_value_t = 256)]
    limit: usize,
    /// Rounds of the stage and end-to-end measurements; each rate is the best round's (a shared
    /// machine's transient load then spoils one round, not the ratio)
    #[arg(long, default_value_t = 1)]
    repeats: usize,
}

/// One round's rates (images per second) and the encode stage's input-wait fraction.
#[derive(Clone, Copy, Default)]
struct Round {
    decode: f64,
    encode: f64,
    write: f64,
    e2e: f64,
    encode_wait: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut loaded = args.config.load()?;
    if let Some(spec) = &args.shards {
        loaded.config.data.shards = spec.clone();
    }
    let config = loaded.config;
    let (p, data) = (&config.precompute, &config.data);
    p.validate()?;
    let settings = precompute::cache_settings(&config)?;
    let first = stages::shardspec::expand_shard_spec(&data.shards)?
        .into_iter()
        .next()
        .context("no source shard")?;
    let pool = precompute::decode_pool(&config)?;
    let workers = pool.current_num_threads();

    let scratch = tempfile::tempdir()?;
    let path = scratch.path().join("bench.fbc");
    let mut best = Round::default();
    let mut n_crops = 0;
    for _ in 0..args.repeats.max(1) {
        // Read + decode/crop alone.
        let counters = RunCounters::new();
        let t = Instant::now();
        let mut samples = Vec::new();
        stages::wds_reader::read_shard(&first, &counters, &mut |raw| {
            samples.extend(stages::image_stream::select_sample(raw, data, &counters));
            samples.len() < args.limit
        });
        let crops: Vec<_> = pool.install(|| {
            samples
                .par_iter()
                .filter_map(|s| stages::image_stream::process_sample(s, data).ok())
                .collect()
        });
        let decode_rate = crops.len() as f64 / t.elapsed().as_secs_f64();
        anyhow::ensure!(!crops.is_empty(), "no decodable sample in {first}");

        // Encode alone, batch by batch, on the same crops.
        let encoders = precompute::load_encoders(p)?;
        let fields = encode::field_specs(p, data.image_size, &encoders);
        let t = Instant::now();
        let mut batches = Vec::new();
        for chunk in crops.chunks(p.batch_size) {
            let images: Vec<&[u8]> = chunk.iter().map(|c| c.image.pixels.as_slice()).collect();
            let labels: Vec<i64> = chunk
                .iter()
                .map(|c| c.label.map(i64::from).unwrap_or(-1))
                .collect();
            batches.push((
                chunk.len(),
                encode::encode_batch(p, &encoders, &images, &labels, data.image_size)?,
            ));
        }
        let encode_rate = crops.len() as f64 / t.elapsed().as_secs_f64();

        // Compress + write alone.
        let t = Instant::now();
        let mut writer = ShardWriter::create(&path, fields.clone(), p.chunk_rows, p.zstd_level)?;
        let mut n = 0usize;
        for (rows, bytes) in &batches {
            for row in 0..*rows {
                let values: Vec<&[u8]> = fields
                    .iter()
                    .zip(bytes)
                    .map(|(f, b)| &b[row * f.row_bytes()..(row + 1) * f.row_bytes()])
                    .collect();
                writer.push(&n.to_string(), &values)?;
                n += 1;
            }
        }
        writer.finish(serde_json::json!({}))?;
        let write_rate = n as f64 / t.elapsed().as_secs_f64();

        // The overlapped pipeline on the same shard and sample count.
        let source = SourceShard {
            name: "bench.tar".into(),
            size: 0,
            content_hash: String::new(),
            remote: None,
        };
        let job = precompute::Job {
            path: first.clone(),
            source,
            file: "e2e.fbc".into(),
        };
        let e2e = precompute::run_graph(
            &config,
            scratch.path(),
            &settings,
            vec![job],
            Some(args.limit),
        )?;
        let e2e_rate = e2e.samples as f64 / e2e.elapsed.as_secs_f64();
        let encode_wait = e2e.metrics[1].wait_input().as_secs_f64() / e2e.elapsed.as_secs_f64();
        n_crops = crops.len();
        let (e2e, wait) = if e2e_rate > best.e2e {
            (e2e_rate, encode_wait)
        } else {
            (best.e2e, best.encode_wait)
        };
        best = Round {
            decode: best.decode.max(decode_rate),
            encode: best.encode.max(encode_rate),
            write: best.write.max(write_rate),
            e2e,
            encode_wait: wait,
        };
    }
    let (decode_rate, encode_rate, write_rate, e2e_rate, encode_wait) = (
        best.decode,
        best.encode,
        best.write,
        best.e2e,
        best.encode_wait,
    );
    let slowest = decode_rate.min(encode_rate).min(write_rate);

    // Readback: every field of every chunk through the reader, appended into one batch buffer, against
    // bare zstd decompression of the same frames already in memory.
    let file = std::fs::read(&path)?;
    let mut reader = ShardReader::open(&path)?;
    let footer = reader.footer().clone();
    let total_raw: usize =
        footer.fields.iter().map(|f| f.row_bytes()).sum::<usize>() * reader.n_samples();
    // Both sides decompress into buffers reused across passes with one zstd context, so the ratio is
    // what reading and checking cost on top of decompression. Best of `repeats` rounds of 5 passes each.
    let reps = 5;
    let mut batch = vec![0u8; total_raw];
    let mut dctx = zstd::bulk::Decompressor::new()?;
    let (mut readback, mut raw) = (0f64, 0f64);
    for _ in 0..args.repeats.max(1) {
        let t = Instant::now();
        for _ in 0..reps {
            let mut at = 0;
            for (c, chunk) in footer.chunks.iter().enumerate() {
                for (f, field) in footer.fields.iter().enumerate() {
                    let len = chunk.rows * field.row_bytes();
                    reader.read_frame_into(c, f, &mut batch[at..at + len])?;
                    at += len;
                }
            }
            std::hint::black_box(&batch);
        }
        readback = readback.max((reps * total_raw) as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..reps {
            let mut at = 0;
            for chunk in &footer.chunks {
                for (i, (offset, len)) in chunk.frames.iter().enumerate() {
                    let cap = chunk.rows * footer.fields[i].row_bytes();
                    dctx.decompress_to_buffer(
                        &file[*offset as usize..(*offset + *len) as usize],
                        &mut batch[at..at + cap],
                    )?;
                    at += cap;
                }
            }
            std::hint::black_box(&batch);
        }
        raw = raw.max((reps * total_raw) as f64 / t.elapsed().as_secs_f64());
    }

    println!(
        "{}",
        serde_json::json!({
            "shard": first, "samples": n_crops, "repeats": args.repeats, "views": p.views(), "batch_size": p.batch_size, "workers": workers,
            "device": p.device, "image_size": data.image_size,
            "decode_images_per_s": decode_rate, "encode_images_per_s": encode_rate, "write_images_per_s": write_rate,
            "end_to_end_images_per_s": e2e_rate, "end_to_end_vs_slowest_stage": e2e_rate / slowest,
            "encode_wait_fraction": encode_wait,
            "readback_mb_per_s": readback / 1e6, "raw_zstd_mb_per_s": raw / 1e6, "readback_vs_raw_zstd": readback / raw,
        })
    );
    Ok(())
}
