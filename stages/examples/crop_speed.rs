//! Quick timing of the exact (Pillow-identical) decode + ADM crop without building the `pipeline`
//! binary (which links libtorch): per-image µs for decode, crop (split into the box halvings and the
//! final bicubic), and both (the stream's path: region decode, then the crop), at 256 and 64, on one
//! thread and on two.
//!
//! `cargo run --release -p stages --example crop_speed -- '/tmp/demo/demo-{000000..000003}.tar' [limit] [repeats]`

use std::time::Instant;

use stages::bad_input::RunCounters;
use stages::config::DataConfig;
use stages::crop::{center_crop_adm, ResizeImpl};
use stages::decode::decode_rgb;
use stages::demo::RgbImage;
use stages::image_stream::decode_and_crop;
use stages::resample::{resize_pillow, Filter};

fn load(spec: &str, limit: usize) -> Vec<Vec<u8>> {
    let shards = stages::shardspec::expand_shard_spec(spec).expect("shard spec");
    let cfg = DataConfig {
        label: stages::label::LabelSource::None,
        ..Default::default()
    };
    let counters = RunCounters::new();
    let mut images = Vec::new();
    for shard in &shards {
        stages::wds_reader::read_shard(shard, &counters, &mut |raw| {
            if let Some(s) = stages::image_stream::select_sample(raw, &cfg, &counters) {
                if decode_rgb(&s.image, cfg.max_pixels).is_ok() {
                    images.push(s.image);
                }
            }
            images.len() < limit
        });
        if images.len() >= limit {
            break;
        }
    }
    images
}

/// Best-of-`repeats` µs per image of `work` over `0..n` split over `threads` threads (wall time / n,
/// so with 2 threads this is the throughput cost, not the latency).
fn per_image_us(n: usize, threads: usize, repeats: usize, work: &(dyn Fn(usize) + Sync)) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                s.spawn(move || {
                    let mut i = t;
                    while i < n {
                        work(i);
                        i += threads;
                    }
                });
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    best * 1e6 / n as f64
}

/// The ADM box halvings alone (the input the final bicubic reads).
fn halve(src: &RgbImage, size: usize) -> Option<RgbImage> {
    let mut img: Option<RgbImage> = None;
    loop {
        let cur = img.as_ref().unwrap_or(src);
        if cur.width.min(cur.height) < 2 * size {
            return img;
        }
        img = Some(resize_pillow(
            cur,
            cur.width / 2,
            cur.height / 2,
            Filter::Box,
        ));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let spec = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "/tmp/issue3c-demo/demo-{000000..000003}.tar".into());
    let limit = args.get(2).map_or(300, |s| s.parse().unwrap());
    let repeats = args.get(3).map_or(3, |s| s.parse().unwrap());
    let images = load(&spec, limit);
    let n = images.len();
    let decoded: Vec<RgbImage> = images
        .iter()
        .map(|b| decode_rgb(b, u64::MAX).unwrap())
        .collect();
    let mp = decoded
        .iter()
        .map(|d| (d.width * d.height) as f64)
        .sum::<f64>()
        / n as f64
        / 1e6;
    println!("{n} images, mean {mp:.3} MP, best of {repeats}");
    if std::env::var_os("PASSES").is_some() {
        passes(&decoded);
    }
    let dec = |i: usize| drop(decode_rgb(&images[i], u64::MAX).unwrap());
    for size in [256usize, 64] {
        let halved: Vec<Option<RgbImage>> = decoded.iter().map(|d| halve(d, size)).collect();
        let crop = |i: usize| drop(center_crop_adm(&decoded[i], size, ResizeImpl::Pillow));
        let boxes = |i: usize| drop(halve(&decoded[i], size));
        let bicubic = |i: usize| {
            let src = halved[i].as_ref().unwrap_or(&decoded[i]);
            drop(center_crop_adm(src, size, ResizeImpl::Pillow))
        };
        // The stream's exact path: a region decode of what the crop reads, then the crop.
        let cfg = DataConfig {
            image_size: size,
            ..Default::default()
        };
        let e2e = |i: usize| drop(decode_and_crop(&images[i], &cfg, 0).unwrap());
        let t_dec = per_image_us(n, 1, repeats, &dec);
        let t_box = per_image_us(n, 1, repeats, &boxes);
        let t_bic = per_image_us(n, 1, repeats, &bicubic);
        let t_crop = per_image_us(n, 1, repeats, &crop);
        let t_e2e = per_image_us(n, 1, repeats, &e2e);
        let t_e2e2 = per_image_us(n, 2, repeats, &e2e);
        println!(
            "size {size:3}: decode {t_dec:6.1} µs  box {t_box:6.1}  bicubic {t_bic:6.1}  crop {t_crop:6.1}  \
             e2e {t_e2e:6.1} µs = {:6.1} img/s  (e2e/decode-only rate {:.2})  2 threads {:6.1} img/s ({:.2}×)",
            1e6 / t_e2e,
            t_dec / t_e2e,
            1e6 / t_e2e2,
            t_e2e / t_e2e2
        );
    }
}

#[allow(dead_code)]
pub fn passes(decoded: &[RgbImage]) {
    let n = decoded.len();
    let h_only = |i: usize| {
        let d = &decoded[i];
        drop(resize_pillow(d, d.width / 2, d.height, Filter::Box))
    };
    let v_only = |i: usize| {
        let d = &decoded[i];
        drop(resize_pillow(d, d.width, d.height / 2, Filter::Box))
    };
    let both = |i: usize| {
        let d = &decoded[i];
        drop(resize_pillow(d, d.width / 2, d.height / 2, Filter::Box))
    };
    let bic_up_h = |i: usize| {
        let d = &decoded[i];
        drop(resize_pillow(d, d.width * 3 / 2, d.height, Filter::Bicubic))
    };
    let bic_up_v = |i: usize| {
        let d = &decoded[i];
        drop(resize_pillow(d, d.width, d.height * 3 / 2, Filter::Bicubic))
    };
    println!(
        "box halve: h only {:.1} µs, v only {:.1}, both {:.1}; bicubic 1.5x up: h {:.1}, v {:.1}",
        per_image_us(n, 1, 3, &h_only),
        per_image_us(n, 1, 3, &v_only),
        per_image_us(n, 1, 3, &both),
        per_image_us(n, 1, 3, &bic_up_h),
        per_image_us(n, 1, 3, &bic_up_v)
    );
}
