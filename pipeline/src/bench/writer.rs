//! `pipeline bench writer`: the cache writer alone on ImageNet-256 latent-size fields, per zstd level —
//! what the compress + hash + write stage sustains per image, and what each level buys in bytes. The
//! fields are those of `precompute` with both flips: the 256² crop, VAE moments 2×4×32×32 and DINOv2-B
//! tokens 2×256×768 (f16 or int8 + scales). Values are synthetic but shaped like the real ones: smooth
//! crops with grain, and near-Gaussian moments and tokens, which f16 stores with little redundancy.

use std::time::Instant;

use stages::cache::{DType, FieldSpec, ShardReader, ShardWriter};

#[derive(clap::Args)]
pub struct Args {
    /// Samples written per level (each one distinct, generated before the clock starts)
    #[arg(long, default_value_t = 256)]
    rows: usize,
    /// zstd levels to compare
    #[arg(long, value_delimiter = ',', default_value = "1,3,6")]
    levels: Vec<i32>,
    /// Feature dtype: f16 or i8 (int8 with one f32 scale per token)
    #[arg(long, default_value = "f16", value_parser = ["f16", "i8"])]
    features: String,
    /// Samples per zstd chunk (precompute.chunk_rows)
    #[arg(long, default_value_t = 256)]
    chunk_rows: usize,
    /// Writer threads (the rayon pool that compresses a chunk's frames); 0 = one per core
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn f16_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values
        .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
        .collect()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()?;
    let threads = pool.current_num_threads();
    let i8 = args.features == "i8";
    let mut fields = vec![
        FieldSpec::new("label", DType::I64, &[]),
        FieldSpec::new("image", DType::U8, &[256, 256, 3]),
        FieldSpec::new("vae_mean", DType::F16, &[2, 4, 32, 32]),
        FieldSpec::new("vae_std", DType::F16, &[2, 4, 32, 32]),
    ];
    if i8 {
        fields.push(FieldSpec::new("features", DType::I8, &[2, 256, 768]));
        fields.push(FieldSpec::new("features_scale", DType::F32, &[2, 256]));
    } else {
        fields.push(FieldSpec::new("features", DType::F16, &[2, 256, 768]));
    }
    // Every sample distinct (a repeated one would let zstd find it again within the window), generated
    // before the clock starts.
    let mut rng = stages::rng::SplitMix64::new(7);
    let samples: Vec<Vec<Vec<u8>>> = (0..args.rows)
        .map(|k| {
            let image: Vec<u8> = (0..256 * 256 * 3)
                .map(|i| {
                    let (y, x, c) = (i / 768, (i / 3) % 256, i % 3);
                    let smooth = (x + 2 * y + 40 * c + 13 * k) % 256;
                    (smooth as f64 * 0.8 + rng.next_f64() * 20.0) as u8
                })
                .collect();
            let mean = f16_bytes((0..2 * 4 * 32 * 32).map(|_| rng.approx_normal() as f32));
            let std = f16_bytes((0..2 * 4 * 32 * 32).map(|_| 0.05 + 0.02 * rng.next_f64() as f32));
            let tokens: Vec<f32> = (0..2 * 256 * 768)
                .map(|_| 2.0 * rng.approx_normal() as f32)
                .collect();
            let mut row = vec![(k as i64).to_le_bytes().to_vec(), image, mean, std];
            if i8 {
                let mut q = Vec::with_capacity(tokens.len());
                let mut scales = Vec::with_capacity(2 * 256 * 4);
                for token in tokens.chunks(768) {
                    let s = token.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                    q.extend(
                        token
                            .iter()
                            .map(|v| (v / s).round().clamp(-127.0, 127.0) as i8 as u8),
                    );
                    scales.extend_from_slice(&s.to_le_bytes());
                }
                row.push(q);
                row.push(scales);
            } else {
                row.push(f16_bytes(tokens.into_iter()));
            }
            row
        })
        .collect();
    let raw_per_image: usize = fields.iter().map(FieldSpec::row_bytes).sum();
    let dir = tempfile::tempdir()?;
    for &level in &args.levels {
        let path = dir.path().join(format!("level{level}.fbc"));
        let start = Instant::now();
        pool.install(|| -> anyhow::Result<()> {
            let mut w = ShardWriter::create(&path, fields.clone(), args.chunk_rows, level)?;
            for (i, row) in samples.iter().enumerate().take(args.rows) {
                let values: Vec<&[u8]> = row.iter().map(Vec::as_slice).collect();
                w.push(&format!("{i:08}"), &values)?;
            }
            w.finish(serde_json::json!({}))?;
            Ok(())
        })?;
        let seconds = start.elapsed().as_secs_f64();
        let bytes = std::fs::metadata(&path)?.len() as f64;
        ShardReader::open(&path)?; // the trailer and footer check out
        let per_field: serde_json::Map<String, serde_json::Value> = {
            let reader = ShardReader::open(&path)?;
            let footer = reader.footer();
            fields
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let compressed: u64 = footer.chunks.iter().map(|c| c.frames[i].1).sum();
                    let raw = (f.row_bytes() * args.rows) as f64;
                    (f.name.clone(), serde_json::json!(compressed as f64 / raw))
                })
                .collect()
        };
        println!(
            "{}",
            serde_json::json!({
                "level": level, "features": args.features, "rows": args.rows, "threads": threads,
                "images_per_s": args.rows as f64 / seconds,
                "images_per_s_per_thread": args.rows as f64 / seconds / threads as f64,
                "raw_mb_per_image": raw_per_image as f64 / 1e6,
                "stored_mb_per_image": bytes / args.rows as f64 / 1e6,
                "ratio": bytes / (raw_per_image * args.rows) as f64,
                "ratio_per_field": per_field,
                "imagenet_tb": bytes / args.rows as f64 * 1_281_167.0 / 1e12,
            })
        );
    }
    Ok(())
}
