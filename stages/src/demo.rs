//! The demo dataset: procedurally drawn, class-dependent photographs-to-be, JPEG-encoded at varied
//! non-square sizes and written as webdataset shards (`KEY.jpg` + `KEY.cls`).
//!
//! It stands in for ImageNet in `make demo` and in the end-to-end tests, so it has what ImageNet has
//! that matters to the pipeline: many sizes and aspect ratios, textures that make JPEG work, and (with
//! `odd`) the awkward members ImageNet really contains: CMYK and grayscale JPEGs, progressive files,
//! a PNG named `.jpg`, plus broken members that must be reported and skipped.
//!
//! Every sample is drawn from its own random stream keyed by (seed, sample index), so the output is
//! byte-identical for a seed whatever the number of threads; the streams are [`crate::rng`]'s
//! SplitMix64, so it stays so whatever the dependencies' versions.

use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic;
use crate::rng::SplitMix64;
use crate::wds_writer::TarShardWriter;
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoConfig {
    pub classes: usize,
    pub per_class: usize,
    pub shards: usize,
    pub seed: u64,
    /// Add CMYK, grayscale, progressive, PNG-named-.jpg and broken members.
    pub odd: bool,
    /// Shard file prefix: shards are `{prefix}-{000000..}.tar`.
    pub prefix: String,
}

/// How many of each odd kind `odd` adds.
const ODD_PER_KIND: usize = 2;

impl DemoConfig {
    /// Samples written in all, odd members included.
    pub fn n_samples(&self) -> usize {
        self.classes * self.per_class
            + if self.odd {
                ODD_PER_KIND * OddKind::ALL.len()
            } else {
                0
            }
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            classes: 10,
            per_class: 200,
            shards: 4,
            seed: 0,
            odd: false,
            prefix: "demo".into(),
        }
    }
}

/// What was written, also saved as `{prefix}-index.json` next to the shards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoIndex {
    pub config: DemoConfig,
    pub shards: Vec<ShardSummary>,
    /// Odd members by kind, with the key they were written under.
    pub odd: Vec<OddMember>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardSummary {
    pub file: String,
    pub samples: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OddKind {
    /// A 4-channel (YCCK) JPEG, as the 22 CMYK files in ImageNet train.
    Cmyk,
    Grayscale,
    Progressive,
    /// PNG bytes under a `.jpg` name (ImageNet's n02105855_2933.JPEG).
    PngNamedJpg,
    /// A JPEG cut off halfway.
    Truncated,
    /// Bytes that are no image at all.
    Garbage,
    /// An image without its `.cls` member.
    MissingLabel,
    /// A `.cls` that is not an integer.
    BadLabel,
}

impl OddKind {
    pub const ALL: [OddKind; 8] = [
        OddKind::Cmyk,
        OddKind::Grayscale,
        OddKind::Progressive,
        OddKind::PngNamedJpg,
        OddKind::Truncated,
        OddKind::Garbage,
        OddKind::MissingLabel,
        OddKind::BadLabel,
    ];

    /// Whether a correct reader yields a usable, labelled image for this member.
    pub fn is_valid(self) -> bool {
        matches!(
            self,
            OddKind::Cmyk | OddKind::Grayscale | OddKind::Progressive | OddKind::PngNamedJpg
        )
    }

    fn name(self) -> &'static str {
        match self {
            OddKind::Cmyk => "cmyk",
            OddKind::Grayscale => "gray",
            OddKind::Progressive => "progressive",
            OddKind::PngNamedJpg => "png",
            OddKind::Truncated => "truncated",
            OddKind::Garbage => "garbage",
            OddKind::MissingLabel => "nolabel",
            OddKind::BadLabel => "badlabel",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OddMember {
    pub key: String,
    pub kind: OddKind,
    pub label: usize,
}

/// The file names of the shards `config` produces, in order.
pub fn shard_names(config: &DemoConfig) -> Vec<String> {
    (0..config.shards)
        .map(|i| format!("{}-{i:06}.tar", config.prefix))
        .collect()
}

/// One sample ready to be written: its key and tar members.
struct Encoded {
    key: String,
    members: Vec<(&'static str, Vec<u8>)>,
}

/// Writes the whole dataset under `out`. `progress` is called with the number of samples encoded so far.
pub fn write_demo_dataset(
    out: &Path,
    config: &DemoConfig,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<DemoIndex> {
    if config.classes == 0 || config.per_class == 0 || config.shards == 0 {
        return Err(Error::Invalid(
            "demo data needs at least one class, one sample per class and one shard".into(),
        ));
    }
    fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    let n_regular = config.classes * config.per_class;
    let odd: Vec<OddMember> = if config.odd {
        // Labels spread over the classes.
        (0..ODD_PER_KIND * OddKind::ALL.len())
            .map(|i| {
                let kind = OddKind::ALL[i % OddKind::ALL.len()];
                OddMember {
                    key: format!("odd-{}-{}", kind.name(), i / OddKind::ALL.len()),
                    kind,
                    label: i % config.classes,
                }
            })
            .collect()
    } else {
        Vec::new()
    };

    // The write order mixes classes, as ImageNet converters shuffle before writing: a shard holding one
    // class would make the shuffle buffer's job impossible.
    let mut order: Vec<usize> = (0..n_regular + odd.len()).collect();
    SplitMix64::new(config.seed ^ 0x005E_ED0F_DA7A).shuffle(&mut order);

    let done = std::sync::atomic::AtomicUsize::new(0);
    let encoded: Vec<Encoded> = order
        .par_iter()
        .map(|&index| {
            let sample = if index < n_regular {
                let label = index / config.per_class;
                let image = draw_sample(config.seed, index as u64, label);
                let quality =
                    75 + (SplitMix64::new(mix(config.seed, index as u64, 7)).below(21) as i32);
                let jpeg =
                    encode_jpeg(&image, quality, false).map_err(|source| Error::JpegEncode {
                        key: sample_key(index),
                        source,
                    })?;
                Encoded {
                    key: sample_key(index),
                    members: vec![("jpg", jpeg), ("cls", label.to_string().into_bytes())],
                }
            } else {
                encode_odd(config, &odd[index - n_regular], index as u64)?
            };
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress(n);
            Ok(sample)
        })
        .collect::<Result<_>>()?;

    let names = shard_names(config);
    let per_shard = encoded.len().div_ceil(config.shards);
    let mut shards = Vec::with_capacity(config.shards);
    for (shard_idx, name) in names.iter().enumerate() {
        let start = (shard_idx * per_shard).min(encoded.len());
        let end = ((shard_idx + 1) * per_shard).min(encoded.len());
        let path = out.join(name);
        write_atomic(&path, |file| {
            let mut writer = TarShardWriter::new(file);
            for sample in &encoded[start..end] {
                let members: Vec<(&str, &[u8])> = sample
                    .members
                    .iter()
                    .map(|(e, d)| (*e, d.as_slice()))
                    .collect();
                writer.write_sample(&sample.key, &members)?;
            }
            writer.finish().map(|_| ())
        })?;
        let bytes = fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        shards.push(ShardSummary {
            file: name.clone(),
            samples: end - start,
            bytes,
        });
    }

    let index = DemoIndex {
        config: config.clone(),
        shards,
        odd,
    };
    let index_path: PathBuf = out.join(format!("{}-index.json", config.prefix));
    let json = serde_json::to_vec_pretty(&index).expect("demo index serialises");
    crate::atomic::write_bytes_atomic(&index_path, &json)?;
    Ok(index)
}

/// Keys as the common ImageNet converters write them: a zero-padded running number.
pub fn sample_key(index: usize) -> String {
    format!("{index:08}")
}

fn encode_odd(config: &DemoConfig, member: &OddMember, stream: u64) -> Result<Encoded> {
    let image = draw_sample(config.seed, stream, member.label);
    let key = member.key.clone();
    let jpeg_err = |source| Error::JpegEncode {
        key: key.clone(),
        source,
    };
    let label = member.label.to_string().into_bytes();
    let image_bytes = match member.kind {
        OddKind::Cmyk => encode_cmyk_jpeg(&image).map_err(jpeg_err)?,
        OddKind::Grayscale => encode_gray_jpeg(&image).map_err(jpeg_err)?,
        OddKind::Progressive | OddKind::MissingLabel | OddKind::BadLabel => {
            encode_jpeg(&image, 90, member.kind == OddKind::Progressive).map_err(jpeg_err)?
        }
        OddKind::PngNamedJpg => encode_png(&image).map_err(|e| Error::Sample {
            shard: "-".into(),
            key: key.clone(),
            message: format!("png encoding: {e}"),
        })?,
        OddKind::Truncated => {
            let mut jpeg = encode_jpeg(&image, 90, false).map_err(jpeg_err)?;
            jpeg.truncate(jpeg.len() / 2);
            jpeg
        }
        OddKind::Garbage => {
            let mut rng = SplitMix64::new(mix(config.seed, stream, 11));
            (0..2048).map(|_| rng.next_u64() as u8).collect()
        }
    };
    let members = match member.kind {
        OddKind::MissingLabel => vec![("jpg", image_bytes)],
        OddKind::BadLabel => vec![("jpg", image_bytes), ("cls", b"not-a-number".to_vec())],
        _ => vec![("jpg", image_bytes), ("cls", label)],
    };
    Ok(Encoded { key, members })
}

/// An RGB image, rows top to bottom, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// SOI, a baseline frame header declaring 60000 × 60000 pixels in three components, EOI: no scan.
/// Once it left the thread's reused decompressor mid-header and the next good JPEG was decoded
/// into a zero-byte buffer (issue 14); the regression tests put it before a good image.
pub const NO_SCAN_JPEG: [u8; 23] = [
    0xff, 0xd8, 0xff, 0xc0, 0x00, 0x11, 0x08, 0xea, 0x60, 0xea, 0x60, 0x03, 0x01, 0x22, 0x00, 0x02,
    0x11, 0x01, 0x03, 0x11, 0x01, 0xff, 0xd9,
];

/// A shard of two samples, `noscan` ([`NO_SCAN_JPEG`]) then `good` (a normal JPEG), both labelled.
pub fn no_scan_then_good_shard() -> Vec<u8> {
    let good = encode_jpeg(&draw_sample(0, 1, 0), 90, false).expect("encodes");
    let mut w = crate::wds_writer::TarShardWriter::new(Vec::new());
    w.write_sample("noscan", &[("jpg", &NO_SCAN_JPEG[..]), ("cls", b"0")])
        .and_then(|()| w.write_sample("good", &[("jpg", &good), ("cls", b"1")]))
        .expect("writes to memory");
    w.finish().expect("writes to memory")
}

pub fn encode_jpeg(
    image: &RgbImage,
    quality: i32,
    progressive: bool,
) -> Result<Vec<u8>, turbojpeg::Error> {
    let format = turbojpeg::PixelFormat::RGB;
    compress(
        &image.pixels,
        image,
        format,
        turbojpeg::Subsamp::Sub2x2,
        quality,
        progressive,
    )
}

fn encode_gray_jpeg(image: &RgbImage) -> Result<Vec<u8>, turbojpeg::Error> {
    let gray: Vec<u8> = image
        .pixels
        .chunks_exact(3)
        .map(|p| ((299 * p[0] as u32 + 587 * p[1] as u32 + 114 * p[2] as u32 + 500) / 1000) as u8)
        .collect();
    compress(
        &gray,
        image,
        turbojpeg::PixelFormat::GRAY,
        turbojpeg::Subsamp::Gray,
        90,
        false,
    )
}

/// Writes inverted CMYK as Adobe Photoshop does (the convention Pillow assumes for every 4-channel JPEG).
fn encode_cmyk_jpeg(image: &RgbImage) -> Result<Vec<u8>, turbojpeg::Error> {
    let cmyk: Vec<u8> = image
        .pixels
        .chunks_exact(3)
        .flat_map(|p| {
            let k = 255 - p[0].max(p[1]).max(p[2]);
            // Inverted storage: 255 means no ink.
            let ink = |c: u8| 255 - (255 - c - k);
            [ink(p[0]), ink(p[1]), ink(p[2]), 255 - k]
        })
        .collect();
    compress(
        &cmyk,
        image,
        turbojpeg::PixelFormat::CMYK,
        turbojpeg::Subsamp::None,
        90,
        false,
    )
}

/// `image` as a JPEG from a compressor `setup` configured (quality, subsampling, progressive, …).
pub fn encode_jpeg_with(
    image: &RgbImage,
    setup: impl FnOnce(&mut turbojpeg::Compressor) -> Result<(), turbojpeg::Error>,
) -> Result<Vec<u8>, turbojpeg::Error> {
    let mut compressor = turbojpeg::Compressor::new()?;
    setup(&mut compressor)?;
    compressor.compress_to_vec(turbojpeg::Image {
        pixels: image.pixels.as_slice(),
        width: image.width,
        pitch: image.width * 3,
        height: image.height,
        format: turbojpeg::PixelFormat::RGB,
    })
}

/// Compresses `pixels` (laid out in `format`) at the size of `like`.
fn compress(
    pixels: &[u8],
    like: &RgbImage,
    format: turbojpeg::PixelFormat,
    subsamp: turbojpeg::Subsamp,
    quality: i32,
    progressive: bool,
) -> Result<Vec<u8>, turbojpeg::Error> {
    let mut compressor = turbojpeg::Compressor::new()?;
    compressor.set_quality(quality)?;
    compressor.set_subsamp(subsamp)?;
    compressor.set_progressive(progressive)?;
    let pitch = like.width * format.size();
    compressor.compress_to_vec(turbojpeg::Image {
        pixels,
        width: like.width,
        pitch,
        height: like.height,
        format,
    })
}

fn encode_png(image: &RgbImage) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new(&mut out);
    image::ImageEncoder::write_image(
        encoder,
        &image.pixels,
        image.width as u32,
        image.height as u32,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

/// Draws sample `index` of class `label`. The class decides the shape, its colour family and its inner
/// texture; the sample decides size, aspect, position, scale, rotation, background and noise, so a
/// classifier has to look at the object, not at the frame.
pub fn draw_sample(seed: u64, index: u64, label: usize) -> RgbImage {
    let mut rng = SplitMix64::new(mix(seed, index, 1));
    let short = 96 + rng.below(512 - 96 + 1) as usize;
    let aspect = 1.0 + rng.next_f64() * 0.7;
    let long = ((short as f64) * aspect).round() as usize;
    let (width, height) = if rng.below(2) == 0 {
        (long, short)
    } else {
        (short, long)
    };

    let shape = Shape::ALL[label % Shape::ALL.len()];
    let texture = (label / Shape::ALL.len()) % 3;
    // Hues spread by the golden ratio keep neighbouring class ids far apart in colour.
    // The class look must not depend on the dataset seed: held-out shards (another seed) share classes.
    let hue = (label as f64 * 0.618_033_988_75).fract();
    let fg = hsv_to_rgb(
        (hue + (rng.next_f64() - 0.5) * 0.06).rem_euclid(1.0),
        0.65 + 0.3 * rng.next_f64(),
        0.6 + 0.4 * rng.next_f64(),
    );
    let fg2 = fg.map(|c| c * 0.45);
    let bg_a = hsv_to_rgb(
        rng.next_f64(),
        0.25 * rng.next_f64(),
        0.3 + 0.6 * rng.next_f64(),
    );
    let bg_b = hsv_to_rgb(
        rng.next_f64(),
        0.25 * rng.next_f64(),
        0.3 + 0.6 * rng.next_f64(),
    );
    let bg_angle = rng.next_f64() * std::f64::consts::TAU;
    let (bg_dx, bg_dy) = (bg_angle.cos(), bg_angle.sin());

    let min_side = width.min(height) as f64;
    let radius = min_side * (0.2 + 0.25 * rng.next_f64());
    let cx = radius + rng.next_f64() * (width as f64 - 2.0 * radius).max(0.0);
    let cy = radius + rng.next_f64() * (height as f64 - 2.0 * radius).max(0.0);
    let rot = rng.next_f64() * std::f64::consts::TAU;
    let (rot_c, rot_s) = (rot.cos(), rot.sin());
    let stripe_freq = 3.0 + 3.0 * rng.next_f64();
    let noise_amp = 4 + rng.below(12) as i32;
    let mut noise = SplitMix64::new(mix(seed, index, 2));

    let mut pixels = vec![0u8; width * height * 3];
    for y in 0..height {
        for x in 0..width {
            let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
            // Background: a two-colour linear gradient in a random direction.
            let t = (((fx / width as f64 - 0.5) * bg_dx + (fy / height as f64 - 0.5) * bg_dy)
                + 0.5)
                .clamp(0.0, 1.0);
            let mut rgb = [0.0f64; 3];
            for c in 0..3 {
                rgb[c] = bg_a[c] * (1.0 - t) + bg_b[c] * t;
            }
            let (dx, dy) = ((fx - cx) / radius, (fy - cy) / radius);
            let (u, v) = (dx * rot_c + dy * rot_s, -dx * rot_s + dy * rot_c);
            if shape.contains(u, v) {
                let dark = match texture {
                    0 => false,
                    1 => ((u * stripe_freq).floor() as i64).rem_euclid(2) == 0,
                    _ => {
                        let (gu, gv) = (
                            (u * stripe_freq).fract() - 0.5,
                            (v * stripe_freq).fract() - 0.5,
                        );
                        gu * gu + gv * gv < 0.09
                    }
                };
                rgb = if dark { fg2 } else { fg };
            }
            let n = (noise.below(2 * noise_amp as u64 + 1) as i32) - noise_amp;
            let offset = (y * width + x) * 3;
            for c in 0..3 {
                pixels[offset + c] = ((rgb[c] * 255.0).round() as i32 + n).clamp(0, 255) as u8;
            }
        }
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    Disk,
    Square,
    Triangle,
    Ring,
    Cross,
    Diamond,
    Star,
    Ellipse,
}

impl Shape {
    const ALL: [Shape; 8] = [
        Shape::Disk,
        Shape::Square,
        Shape::Triangle,
        Shape::Ring,
        Shape::Cross,
        Shape::Diamond,
        Shape::Star,
        Shape::Ellipse,
    ];

    /// Whether (u, v), in units of the shape's radius around its centre, lies inside.
    fn contains(self, u: f64, v: f64) -> bool {
        let r2 = u * u + v * v;
        match self {
            Shape::Disk => r2 <= 1.0,
            Shape::Square => u.abs().max(v.abs()) <= 0.8,
            Shape::Triangle => (-0.9..=0.7).contains(&v) && u.abs() <= (v + 0.9) * 0.6,
            Shape::Ring => (0.36..=1.0).contains(&r2),
            Shape::Cross => (u.abs() < 0.3 && v.abs() < 1.0) || (v.abs() < 0.3 && u.abs() < 1.0),
            Shape::Diamond => u.abs() + v.abs() <= 1.0,
            Shape::Star => r2.sqrt() <= 0.6 + 0.35 * (5.0 * v.atan2(u)).cos(),
            Shape::Ellipse => u * u + 4.0 * v * v <= 1.0,
        }
    }
}

fn hsv_to_rgb(h: f64, s: f64, v: f64) -> [f64; 3] {
    let h6 = h * 6.0;
    let i = h6.floor() as i64;
    let f = h6 - i as f64;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match i.rem_euclid(6) {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// Seeds for independent streams: (dataset seed, sample, purpose) → one well-mixed u64.
fn mix(seed: u64, index: u64, purpose: u64) -> u64 {
    let mut s = SplitMix64::new(seed ^ index.rotate_left(21) ^ purpose.rotate_left(42));
    s.next_u64() ^ s.next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_identical_images_and_sizes_vary() {
        let a = draw_sample(3, 17, 4);
        let b = draw_sample(3, 17, 4);
        assert_eq!(a, b);
        let sizes: std::collections::HashSet<_> = (0..20)
            .map(|i| {
                let img = draw_sample(3, i, 1);
                assert!((96..=512).contains(&img.width.min(img.height)));
                assert_ne!(img.width, img.height);
                (img.width, img.height)
            })
            .collect();
        assert!(sizes.len() > 15);
    }

    #[test]
    fn classes_differ_in_mean_colour() {
        // Average over samples: the class colour must dominate the random background.
        let mean = |label| {
            let mut acc = [0f64; 3];
            for i in 0..8 {
                let img = draw_sample(0, 1000 + i, label);
                for p in img.pixels.chunks_exact(3) {
                    for c in 0..3 {
                        acc[c] += p[c] as f64 / img.pixels.len() as f64 * 3.0;
                    }
                }
            }
            acc
        };
        let (a, b) = (mean(0), mean(5));
        let dist: f64 = (0..3).map(|c| (a[c] - b[c]).powi(2)).sum::<f64>().sqrt();
        assert!(dist > 5.0, "{a:?} {b:?}");
    }

    #[test]
    fn odd_members_are_what_they_claim() {
        let config = DemoConfig {
            classes: 3,
            per_class: 1,
            shards: 1,
            odd: true,
            ..Default::default()
        };
        let cmyk = encode_odd(
            &config,
            &OddMember {
                key: "k".into(),
                kind: OddKind::Cmyk,
                label: 0,
            },
            99,
        )
        .unwrap();
        let header = turbojpeg::read_header(&cmyk.members[0].1).unwrap();
        assert_eq!(header.colorspace, turbojpeg::Colorspace::YCCK);
        let prog = encode_odd(
            &config,
            &OddMember {
                key: "k".into(),
                kind: OddKind::Progressive,
                label: 0,
            },
            99,
        )
        .unwrap();
        assert!(
            turbojpeg::read_header(&prog.members[0].1)
                .unwrap()
                .is_progressive
        );
        let png = encode_odd(
            &config,
            &OddMember {
                key: "k".into(),
                kind: OddKind::PngNamedJpg,
                label: 0,
            },
            99,
        )
        .unwrap();
        assert_eq!(&png.members[0].1[..4], b"\x89PNG");
        let nolabel = encode_odd(
            &config,
            &OddMember {
                key: "k".into(),
                kind: OddKind::MissingLabel,
                label: 0,
            },
            99,
        )
        .unwrap();
        assert_eq!(nolabel.members.len(), 1);
    }
}
