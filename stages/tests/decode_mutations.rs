//! Broken images decoded in sequences with good ones, the way a shard of real ImageNet members
//! reaches one decode thread. Thousands of variants of a few JPEGs and PNGs made here (truncated,
//! frame, scan, Huffman and quantisation header fields edited, bytes flipped, markers duplicated or
//! dropped, headers spliced onto other scans) are decoded bad, good, bad, good, … on one thread and
//! on several at once. Every result must equal what a fresh decompressor gives for the same bytes
//! (so no state crosses from one image to the next), every good image must come out pixel-exact, and
//! no decode may take longer than a time budget.
//!
//! `FUZZ_DECODE_ROUNDS` multiplies the number of variants (`bench/fuzz_decode.sh` runs it for
//! minutes, and under valgrind).

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stages::decode::{decode_rgb, decode_rgb_window_into, DecodeError};
use stages::demo::{draw_sample, encode_jpeg, encode_jpeg_with, RgbImage, NO_SCAN_JPEG as NO_SCAN};
use stages::resample::{Placement, Rect};
use stages::rng::SplitMix64;

/// Long enough for a debug build under valgrind on a busy 2-core machine; a hang (issue 14's
/// decoder spun for over 10 minutes) still fails the test.
const BUDGET: Duration = Duration::from_secs(60);

/// Every seed still gives the variants it gave before this test used `stages::rng`: `below` stays a
/// plain modulo rather than [`SplitMix64::below`]'s rejection, and `below(0)` is 0.
struct Rng(SplitMix64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(SplitMix64::new(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// Noise over smooth gradients, so that every DCT block and chroma sample matters.
fn picture(width: usize, height: usize, seed: u64) -> RgbImage {
    let mut rng = Rng::new(seed);
    let pixels = (0..width * height * 3)
        .map(|i| {
            let (x, y) = (i / 3 % width, i / 3 / width);
            if (x / 9 + y / 7) % 3 == 0 {
                rng.next() as u8
            } else {
                (x * 5 + y * 3 + i % 3 * 60) as u8
            }
        })
        .collect();
    RgbImage {
        width,
        height,
        pixels,
    }
}

fn compress(
    image: &RgbImage,
    setup: impl FnOnce(&mut turbojpeg::Compressor) -> Result<(), turbojpeg::Error>,
) -> Vec<u8> {
    encode_jpeg_with(image, |c| {
        c.set_quality(88)?;
        setup(c)
    })
    .unwrap()
}

fn png(image: &RgbImage, color: image::ExtendedColorType) -> Vec<u8> {
    let pixels: Vec<u8> = match color {
        image::ExtendedColorType::Rgb8 => image.pixels.clone(),
        image::ExtendedColorType::Rgba8 => image
            .pixels
            .chunks(3)
            .flat_map(|p| [p[0], p[1], p[2], p[0] ^ p[2]])
            .collect(),
        image::ExtendedColorType::L8 => image.pixels.iter().step_by(3).copied().collect(),
        image::ExtendedColorType::Rgb16 => {
            image.pixels.iter().flat_map(|&v| [v, v ^ 0x5a]).collect()
        }
        other => unreachable!("{other:?}"),
    };
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        &pixels,
        image.width as u32,
        image.height as u32,
        color,
    )
    .unwrap();
    out
}

/// The good images every variant starts from: each JPEG kind libjpeg-turbo decodes differently.
fn originals() -> Vec<(&'static str, Vec<u8>)> {
    use turbojpeg::Subsamp::*;
    let a = picture(75, 53, 1);
    let b = picture(130, 97, 2);
    let c = picture(41, 120, 3);
    vec![
        ("baseline-420", compress(&a, |_| Ok(()))),
        ("baseline-444", compress(&b, |c| c.set_subsamp(None))),
        ("baseline-422", compress(&c, |c| c.set_subsamp(Sub2x1))),
        ("baseline-411", compress(&b, |c| c.set_subsamp(Sub4x1))),
        ("gray", compress(&a, |c| c.set_subsamp(Gray))),
        ("progressive-420", compress(&b, |c| c.set_progressive(true))),
        (
            "progressive-444",
            compress(&c, |c| {
                c.set_progressive(true)?;
                c.set_subsamp(None)
            }),
        ),
        ("optimized", compress(&a, |c| c.set_optimize(true))),
        ("arithmetic", compress(&c, |c| c.set_arithmetic(true))),
        ("lossless", compress(&a, |c| c.set_lossless(true))),
        ("cmyk", cmyk_jpeg(&c)),
        (
            "demo",
            encode_jpeg(&draw_sample(0, 3, 1), 90, false).unwrap(),
        ),
        ("png-rgb", png(&a, image::ExtendedColorType::Rgb8)),
        ("png-rgba", png(&c, image::ExtendedColorType::Rgba8)),
        ("png-gray", png(&b, image::ExtendedColorType::L8)),
        ("png-rgb16", png(&a, image::ExtendedColorType::Rgb16)),
    ]
}

fn cmyk_jpeg(image: &RgbImage) -> Vec<u8> {
    let cmyk: Vec<u8> = image
        .pixels
        .chunks(3)
        .flat_map(|p| [p[0], p[1], p[2], p[0] / 2])
        .collect();
    let mut c = turbojpeg::Compressor::new().unwrap();
    c.set_subsamp(turbojpeg::Subsamp::None).unwrap();
    c.compress_to_vec(turbojpeg::Image {
        pixels: cmyk.as_slice(),
        width: image.width,
        pitch: image.width * 4,
        height: image.height,
        format: turbojpeg::PixelFormat::CMYK,
    })
    .unwrap()
}

/// A JPEG's marker segments up to and including the first SOS: (marker, offset of the 0xFF, total
/// length with the marker).
fn segments(jpeg: &[u8]) -> Vec<(u8, usize, usize)> {
    let mut out = Vec::new();
    let mut at = 2;
    while at + 4 <= jpeg.len() && jpeg[at] == 0xFF {
        let marker = jpeg[at + 1];
        let len = u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]) as usize + 2;
        out.push((marker, at, len));
        at += len;
        if marker == 0xDA {
            break;
        }
    }
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut h = flate2::Crc::new();
    h.update(bytes);
    h.sum()
}

/// PNG chunks: (offset of the length field, data length).
fn chunks(png: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 8;
    while at + 12 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        out.push((at, len));
        at += 12 + len;
    }
    out
}

const SIZES: [u16; 14] = [0, 1, 2, 7, 8, 9, 15, 16, 17, 255, 256, 4097, 60000, 65535];

/// One variant of `orig` and what was done to it.
fn mutate(orig: &[u8], others: &[&[u8]], rng: &mut Rng) -> (String, Vec<u8>) {
    let mut v = orig.to_vec();
    let n = v.len();
    if orig.starts_with(b"\x89PNG") {
        let cs = chunks(orig);
        return match rng.below(5) {
            0 => {
                let cut = rng.below(n);
                (format!("truncated at {cut}"), v[..cut].to_vec())
            }
            1 => flip(v, rng, 8),
            2 => {
                // IHDR width, height, depth, colour type, interlace, CRC fixed so the edit is read.
                let field = rng.pick(&[8usize, 12, 16, 17, 20]);
                let value = rng.pick(&SIZES) as u32;
                if field < 16 {
                    v[8 + field..12 + field].copy_from_slice(&value.to_be_bytes());
                } else {
                    v[8 + field] = value as u8;
                }
                let crc = crc32(&v[12..29]);
                v[29..33].copy_from_slice(&crc.to_be_bytes());
                (format!("IHDR byte {field} = {value}"), v)
            }
            3 => {
                let (at, _) = cs[rng.below(cs.len())];
                let len = rng.next() as u32 >> rng.below(32);
                v[at..at + 4].copy_from_slice(&len.to_be_bytes());
                (format!("chunk at {at} length {len}"), v)
            }
            _ => {
                let (at, len) = cs[rng.below(cs.len())];
                v.drain(at..(at + 12 + len).min(n));
                (format!("chunk at {at} dropped"), v)
            }
        };
    }
    let segs = segments(orig);
    let find = |m: &[u8]| {
        segs.iter()
            .filter(|s| m.contains(&s.0))
            .copied()
            .collect::<Vec<_>>()
    };
    let sofs = find(&[0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA]);
    let sos = find(&[0xDA]);
    let dht = find(&[0xC4]);
    let dqt = find(&[0xDB]);
    let header_end = sos.first().map_or(n, |s| s.1 + s.2);
    match rng.below(12) {
        0 => {
            let cut = if rng.below(2) == 0 {
                rng.below(header_end + 1)
            } else {
                rng.below(n)
            };
            (format!("truncated at {cut}"), v[..cut].to_vec())
        }
        1 | 2 => {
            let Some(&(_, at, len)) = sofs.first() else {
                return flip(v, rng, 4);
            };
            // len (2), precision, height (2), width (2), components, then 3 bytes per component.
            let what = rng.below(6);
            match what {
                0 => v[at + 5..at + 7].copy_from_slice(&rng.pick(&SIZES).to_be_bytes()),
                1 => v[at + 7..at + 9].copy_from_slice(&rng.pick(&SIZES).to_be_bytes()),
                2 => v[at + 4] = rng.pick(&[0, 1, 2, 7, 9, 12, 16, 255]),
                3 => v[at + 9] = rng.pick(&[0, 1, 2, 3, 4, 5, 10, 255]),
                _ => {
                    let comp = rng.below((len - 10) / 3 + 1);
                    let at = (at + 10 + comp * 3 + 1 + usize::from(what == 5)).min(at + len - 1);
                    v[at] = if what == 4 {
                        rng.next() as u8
                    } else {
                        rng.below(8) as u8
                    };
                }
            }
            (format!("SOF field {what}"), v)
        }
        3 => {
            let Some(&(_, at, len)) = sos.first() else {
                return flip(v, rng, 4);
            };
            let off = 4 + rng.below(len - 4);
            let any = rng.next() as u8;
            let value = rng.pick(&[0u8, 1, 2, 3, 4, 5, 0x11, 0x44, 0x3f, 63, 64, 0xff, any]);
            v[at + off] = value;
            (format!("SOS byte {off} = {value}"), v)
        }
        4 | 5 => {
            let tables = if rng.below(2) == 0 { &dht } else { &dqt };
            let Some(&(marker, at, len)) = tables.get(rng.below(tables.len().max(1))) else {
                return flip(v, rng, 4);
            };
            let off = 4 + rng.below(len - 4);
            let value = if rng.below(2) == 0 {
                rng.next() as u8
            } else {
                rng.pick(&[0, 1, 0x10, 0x13, 0xff])
            };
            v[at + off] = value;
            (format!("0x{marker:02x} byte {off} = {value}"), v)
        }
        6 | 7 => flip(v, rng, 8),
        8 => {
            let (marker, at, len) = segs[rng.below(segs.len())];
            let copy = v[at..at + len].to_vec();
            let to = if rng.below(2) == 0 {
                at + len
            } else {
                segs[rng.below(segs.len())].1
            };
            v.splice(to..to, copy);
            (format!("0x{marker:02x} duplicated at {to}"), v)
        }
        9 => {
            let (marker, at, len) = segs[rng.below(segs.len())];
            v.drain(at..at + len);
            (format!("0x{marker:02x} dropped"), v)
        }
        10 => {
            let marker = rng.pick(&[0xD8u8, 0xD9, 0xD0, 0xD7, 0xC0, 0xC4, 0xDA, 0x00, 0xFF]);
            let at = 2 + rng.below(n - 2);
            v.splice(at..at, [0xFF, marker]);
            (format!("0xff{marker:02x} inserted at {at}"), v)
        }
        _ => {
            // The tables and frame header of this JPEG over another one's scan.
            let other = others[rng.below(others.len())];
            let Some(&(_, at, len)) = segments(other).iter().find(|s| s.0 == 0xDA) else {
                return flip(v, rng, 4);
            };
            v.truncate(header_end);
            v.extend_from_slice(&other[at + len..]);
            ("spliced onto another scan".into(), v)
        }
    }
}

fn flip(mut v: Vec<u8>, rng: &mut Rng, max: usize) -> (String, Vec<u8>) {
    let count = 1 + rng.below(max);
    for _ in 0..count {
        let at = rng.below(v.len());
        v[at] ^= 1 << rng.below(8);
    }
    (format!("{count} bits flipped"), v)
}

/// The hand-made cases: the header without a scan (and its relatives), and a progressive
/// JPEG whose scans repeat far past the scan limit.
fn crafted(originals: &[(&str, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![(
        "issue 14: SOF 60000x60000, no SOS".to_string(),
        NO_SCAN.to_vec(),
    )];
    for (w, h) in [(1u16, 1u16), (64, 64), (0, 10), (60000, 1), (65535, 65535)] {
        let mut v = NO_SCAN.to_vec();
        v[5..7].copy_from_slice(&h.to_be_bytes());
        v[7..9].copy_from_slice(&w.to_be_bytes());
        out.push((format!("SOF {w}x{h}, no SOS"), v));
    }
    out.push(("SOI EOI".into(), vec![0xff, 0xd8, 0xff, 0xd9]));
    out.push(("SOI only".into(), vec![0xff, 0xd8, 0xff]));
    let base = &originals.iter().find(|o| o.0 == "baseline-420").unwrap().1;
    let segs = segments(base);
    // Tables only: every segment before the frame header, then EOI (TurboJPEG's header call
    // "succeeds" on it without reading a frame).
    let sof = segs.iter().find(|s| s.0 == 0xC0).unwrap().1;
    let mut tables = base[..sof].to_vec();
    tables.extend_from_slice(&[0xff, 0xd9]);
    out.push(("tables only".into(), tables));
    out.push(("progressive, 2080 scans".into(), many_scans(originals)));
    out
}

/// A valid progressive JPEG with 2,080 scans: the DC scan of a real one, then every AC coefficient
/// of every component sent on its own, one bit at a time from bit 10 down (scan k of coefficient c
/// refines what scan k − 1 sent). Each AC scan is all zeros: one end-of-band run over all blocks.
fn many_scans(originals: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let prog = &originals
        .iter()
        .find(|o| o.0 == "progressive-444")
        .unwrap()
        .1;
    let segs = segments(prog);
    let &(_, sos, _) = segs.last().unwrap();
    let &(_, sof, _) = segs.iter().find(|s| s.0 == 0xC2).unwrap();
    let height = u16::from_be_bytes([prog[sof + 5], prog[sof + 6]]) as usize;
    let width = u16::from_be_bytes([prog[sof + 7], prog[sof + 8]]) as usize;
    let ids: Vec<u8> = (0..prog[sof + 9] as usize)
        .map(|c| prog[sof + 10 + 3 * c])
        .collect();
    // 4:4:4, so every component has the same blocks; one EOBRUN code of 2^6 + extra covers them.
    let blocks = width.div_ceil(8) * height.div_ceil(8);
    assert!((64..128).contains(&blocks), "{blocks} blocks");
    let dc_end = (sos + 2..prog.len() - 1)
        .find(|&i| prog[i] == 0xFF && prog[i + 1] != 0 && !(0xD0..=0xD7).contains(&prog[i + 1]))
        .unwrap();
    let mut out = prog[..dc_end].to_vec();
    // AC table 1: the single symbol 0x60 (EOBRUN of 2^6 + 6 extra bits), code "0".
    out.extend_from_slice(&[0xFF, 0xC4, 0x00, 0x14, 0x11, 1]);
    out.extend_from_slice(&[0; 15]);
    out.push(0x60);
    let data = (((blocks - 64) << 1) | 1) as u8;
    for al in (0..=10u8).rev() {
        let ah = if al == 10 { 0 } else { al + 1 };
        for k in 1..=63u8 {
            for &id in &ids {
                out.extend_from_slice(&[
                    0xFF,
                    0xDA,
                    0x00,
                    0x08,
                    1,
                    id,
                    0x01,
                    k,
                    k,
                    ah << 4 | al,
                    data,
                ]);
            }
        }
    }
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

/// What one decode gave, comparable across decoders.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Image(usize, usize, Placement, Vec<u8>),
    Error(DecodeError),
}

/// The ways a stream decodes: whole, scaled in the DCT domain, a region, both.
#[derive(Debug, Clone, Copy)]
struct Call {
    max_pixels: u64,
    min_short: usize,
    need: Option<(usize, usize, usize, usize)>,
}

const CALLS: [Call; 5] = [
    Call {
        max_pixels: 64_000_000,
        min_short: 0,
        need: None,
    },
    Call {
        max_pixels: 1 << 22,
        min_short: 12,
        need: None,
    },
    Call {
        max_pixels: 64_000_000,
        min_short: 0,
        need: Some((17, 9, 20, 30)),
    },
    Call {
        max_pixels: 1 << 22,
        min_short: 20,
        need: Some((3, 1, 9, 9)),
    },
    Call {
        max_pixels: 10_000,
        min_short: 0,
        need: Some((0, 0, 40, 40)),
    },
];

fn run(bytes: &[u8], call: Call) -> Outcome {
    let need = |w: usize, h: usize| {
        call.need.map(|(x, y, rw, rh)| {
            let (x, y) = (x.min(w.saturating_sub(1)), y.min(h.saturating_sub(1)));
            Rect {
                x,
                y,
                width: rw.min(w - x),
                height: rh.min(h - y),
            }
        })
    };
    match decode_rgb_window_into(bytes, call.max_pixels, call.min_short, need, Vec::new()) {
        Ok((image, at)) => Outcome::Image(image.width, image.height, at, image.pixels),
        Err(e) => Outcome::Error(e),
    }
}

/// The same decode on a new thread, whose decompressor has seen nothing before.
fn fresh(bytes: &[u8], call: Call) -> Outcome {
    std::thread::scope(|s| s.spawn(|| run(bytes, call)).join().unwrap())
}

struct Case {
    name: String,
    bytes: Vec<u8>,
    call: Call,
    expected: Outcome,
}

/// Runs `cases` in order on one new thread, each followed by a good image; fails if any result
/// differs from the expected one or any decode outlives the budget. Returns the slowest decode.
fn sequence(
    cases: Vec<Case>,
    goods: std::sync::Arc<Vec<Case>>,
) -> std::thread::JoinHandle<Duration> {
    std::thread::spawn(move || {
        let (tx, rx) = mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            let mut slowest = Duration::ZERO;
            for (i, case) in cases.iter().enumerate() {
                for c in [case, &goods[i % goods.len()]] {
                    let start = Instant::now();
                    let got = run(&c.bytes, c.call);
                    slowest = slowest.max(start.elapsed());
                    assert!(
                        got == c.expected,
                        "{} ({:?}) after {} cases: got {}, a fresh decoder gives {}",
                        c.name,
                        c.call,
                        i,
                        describe(&got),
                        describe(&c.expected)
                    );
                    tx.send(()).unwrap();
                }
            }
            slowest
        });
        loop {
            match rx.recv_timeout(BUDGET) {
                Ok(()) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("a decode took longer than {BUDGET:?}")
                }
            }
        }
        worker
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Image(w, h, at, _) => format!("a {w}x{h} image at {at:?}"),
        Outcome::Error(e) => format!("{:?}: {}", e.kind, e.detail),
    }
}

fn rounds() -> usize {
    std::env::var("FUZZ_DECODE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

#[test]
fn mutated_images_decode_as_a_fresh_decoder_decodes_them_in_any_sequence() {
    let originals = originals();
    let all: Vec<&[u8]> = originals
        .iter()
        .filter(|o| !o.0.starts_with("png"))
        .map(|o| o.1.as_slice())
        .collect();
    let mut rng = Rng::new(14);
    // Good images, with their pixels from a fresh decoder; the full decode must agree with Pillow's
    // decoder, which `pillow_parity` checks, so here only "the same as fresh" is asked.
    let goods: Vec<Case> = originals
        .iter()
        .flat_map(|(name, bytes)| {
            CALLS.iter().map(move |&call| Case {
                name: format!("good {name}"),
                bytes: bytes.clone(),
                call,
                expected: fresh(bytes, call),
            })
        })
        .filter(|c| c.call.max_pixels > 10_000)
        .collect();
    for g in &goods {
        assert!(
            matches!(g.expected, Outcome::Image(..)),
            "{} does not decode: {}",
            g.name,
            describe(&g.expected)
        );
    }
    let per_original = 190 * rounds();
    let mut bad = Vec::new();
    for (name, bytes) in
        crafted(&originals)
            .into_iter()
            .chain(originals.iter().enumerate().flat_map(|(k, (name, orig))| {
                let mut rng = Rng::new(1000 + k as u64);
                let all = &all;
                (0..per_original).map(move |_| {
                    let (what, v) = mutate(orig, all, &mut rng);
                    (format!("{name}: {what}"), v)
                })
            }))
    {
        let call = CALLS[rng.below(CALLS.len())];
        let expected = fresh(&bytes, call);
        bad.push(Case {
            name,
            bytes,
            call,
            expected,
        });
    }
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for c in &bad {
        let key = match &c.expected {
            Outcome::Image(..) => "decoded".to_string(),
            Outcome::Error(e) => e.kind.name().to_string(),
        };
        *tally.entry(key).or_default() += 1;
    }
    eprintln!("{} variants: {tally:?}", bad.len());
    // The mutations must reach past the first check: many fail, many still decode, and several
    // kinds of failure show up.
    assert!(
        tally.get("decoded").copied().unwrap_or(0) > bad.len() / 10,
        "{tally:?}"
    );
    assert!(tally.len() >= 4, "{tally:?}");

    if let Some(dir) = std::env::var_os("FUZZ_DECODE_SHARDS") {
        write_shards(std::path::Path::new(&dir), &bad);
    }
    let goods = std::sync::Arc::new(goods);
    let start = Instant::now();
    // One thread through everything in order, and three more at the same time in other orders.
    let mut handles = vec![sequence(
        bad.iter().map(clone_case).collect(),
        goods.clone(),
    )];
    for t in 0..3u64 {
        let mut order: Vec<Case> = bad.iter().map(clone_case).collect();
        let mut rng = Rng::new(100 + t);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        handles.push(sequence(order, goods.clone()));
    }
    let slowest = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .max()
        .unwrap();
    eprintln!(
        "{} decodes in {:.1?}, slowest {slowest:.1?}",
        bad.len() * 8,
        start.elapsed()
    );
}

fn clone_case(c: &Case) -> Case {
    Case {
        name: c.name.clone(),
        bytes: c.bytes.clone(),
        call: c.call,
        expected: c.expected.clone(),
    }
}

#[test]
fn a_header_without_a_scan_leaves_the_next_decode_intact() {
    let good = encode_jpeg(&draw_sample(0, 1, 0), 90, false).unwrap();
    let reference = fresh(&good, CALLS[0]);
    for _ in 0..3 {
        let err = decode_rgb(&NO_SCAN, 64_000_000).unwrap_err();
        assert!(err.detail.contains("SOS"), "{err:?}");
        assert_eq!(run(&good, CALLS[0]), reference);
    }
}

#[test]
fn a_lossless_jpeg_is_never_decoded_scaled() {
    let image = picture(120, 90, 7);
    let jpeg = compress(&image, |c| c.set_lossless(true));
    // libjpeg ignores the scaling factor of a lossless JPEG: asking for 1/8 must give full size
    // (once, it gave a full-size image written into a buffer of 1/64 the size).
    let call = Call {
        max_pixels: u64::MAX,
        min_short: 10,
        need: Some((30, 30, 20, 20)),
    };
    let Outcome::Image(w, h, at, pixels) = run(&jpeg, call) else {
        panic!("lossless JPEG not decoded")
    };
    assert_eq!((w, h, at.full_w, at.full_h), (120, 90, 120, 90));
    let Outcome::Image(_, _, _, whole) = run(&jpeg, CALLS[0]) else {
        panic!("lossless JPEG not decoded")
    };
    assert_eq!(pixels, whole);
}

#[test]
fn a_progressive_jpeg_with_more_scans_than_the_limit_is_refused() {
    let many = many_scans(&originals());
    // Valid: a decoder without the limit reads all of it.
    let image = turbojpeg::decompress(&many, turbojpeg::PixelFormat::RGB).unwrap();
    assert_eq!((image.width, image.height), (41, 120));
    let err = decode_rgb(&many, 64_000_000).unwrap_err();
    assert!(err.detail.contains("more than 500 scans"), "{err:?}");
}

/// For `bench/fuzz_decode.sh --shards`: every variant, each followed by a good demo image, in
/// webdataset shards of 1000 samples, and `expected.json` with how many of them `bench decode
/// --size 64` and `precompute` (`image_size = 32`, exact decode) must count as good and bad.
fn write_shards(dir: &std::path::Path, bad: &[Case]) {
    use stages::config::DataConfig;
    use stages::image_stream::decode_and_crop;
    std::fs::create_dir_all(dir).unwrap();
    let mut samples = Vec::new();
    for (i, case) in bad.iter().enumerate() {
        samples.push((format!("bad{i:05}"), case.bytes.clone()));
        let good = encode_jpeg(&draw_sample(7, i as u64, i % 10), 85, i % 3 == 0).unwrap();
        samples.push((format!("good{i:05}"), good));
    }
    let cfg = DataConfig {
        image_size: 32,
        ..Default::default()
    };
    let (mut bench_good, mut precompute_good) = (0, 0);
    for (_, bytes) in &samples {
        let (b, p) = std::thread::scope(|s| {
            s.spawn(|| {
                let bench = decode_rgb(bytes, cfg.max_pixels).is_ok()
                    && stages::decode::decode_rgb_scaled(bytes, cfg.max_pixels, 64).is_ok();
                (bench, decode_and_crop(bytes, &cfg, 0).is_ok())
            })
            .join()
            .unwrap()
        });
        bench_good += usize::from(b);
        precompute_good += usize::from(p);
    }
    let shards = samples.chunks(1000).count();
    for (n, chunk) in samples.chunks(1000).enumerate() {
        let mut w = stages::wds_writer::TarShardWriter::new(Vec::new());
        for (i, (key, bytes)) in chunk.iter().enumerate() {
            let label = ((n * 1000 + i) % 10).to_string();
            w.write_sample(key, &[("jpg", bytes.as_slice()), ("cls", label.as_bytes())])
                .unwrap();
        }
        std::fs::write(dir.join(format!("fuzz-{n:06}.tar")), w.finish().unwrap()).unwrap();
    }
    let expected = serde_json::json!({
        "shards": format!("fuzz-{{000000..{:06}}}.tar", shards - 1),
        "samples": samples.len(),
        "bench_decode_good": bench_good,
        "precompute_good": precompute_good,
    });
    std::fs::write(dir.join("expected.json"), expected.to_string()).unwrap();
    eprintln!("wrote {shards} shards to {}: {expected}", dir.display());
}
