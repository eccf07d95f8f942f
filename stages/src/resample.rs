//! Resampling that reproduces Pillow's `Image.resize` exactly for 8-bit RGB (max |Δ| = 0): the same
//! filter kernels, the same per-output-pixel tap windows, the same 22-bit fixed-point weights rounded
//! half away from zero, a horizontal pass over only the rows the vertical pass reads, then the vertical
//! pass, with rounding to u8 in between. Written from the algorithm as described in
//! pipeline-notes §4.1 (Pillow `src/libImaging/Resample.c`), not translated from its source.
//!
//! Pass order: Pillow 13 does not always run the horizontal pass first. Measured against Pillow 13.0
//! on random sizes (every case agreed): when only one axis shrinks, that axis goes first; when both
//! shrink, the vertical pass goes first iff 2·(in_w − out_w) < in_h − out_h; when both grow, horizontal
//! first. The order matters because the intermediate image is rounded to u8.
//!
//! Speed comes from SIMD kernels over the same integer sums (AVX2, AVX-512 VNNI, or VNNI with VBMI's
//! byte permutes for the horizontal pass, chosen at run time; each checked against the scalar port
//! kept in the tests), from computing only the window a crop needs, and from per-thread buffers and
//! weights. fast_image_resize, off by a few levels (its weights are 16-bit), is offered as
//! `data.resize_impl = "fast"` in [`crate::crop`].

use crate::demo::RgbImage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filter {
    /// PIL `Image.BOX`.
    Box,
    /// PIL `Image.BILINEAR` (triangle).
    Bilinear,
    /// PIL `Image.BICUBIC`: Keys cubic with a = -0.5.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 22;

/// Tap windows and fixed-point weights for one axis: output pixel i reads inputs
/// `start[i] .. start[i] + len[i]` with `weights[i * taps ..]`.
struct Coefficients {
    start: Vec<usize>,
    len: Vec<usize>,
    taps: usize,
    weights: Vec<i32>,
}

/// The geometry of one axis's resize: the scale, the filter's support in source pixels and the most
/// taps a window can have.
struct Geometry {
    scale: f64,
    inv_filter_scale: f64,
    support: f64,
    taps: usize,
    in_size: usize,
}

impl Geometry {
    fn new(in_size: usize, out_size: usize, filter: Filter) -> Geometry {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = filter.support() * filter_scale;
        Geometry {
            scale,
            inv_filter_scale: 1.0 / filter_scale,
            support,
            taps: support.ceil() as usize * 2 + 1,
            in_size,
        }
    }

    /// Output pixel i's centre in source coordinates and its window `lo .. hi` of source pixels.
    fn window(&self, i: usize) -> (f64, usize, usize) {
        let center = (i as f64 + 0.5) * self.scale;
        // C's (int) cast truncates toward zero; both values are ≥ -0.5 + 0.5 here except near 0.
        let lo = ((center - self.support + 0.5) as i64).max(0) as usize;
        let hi = ((center + self.support + 0.5) as i64).min(self.in_size as i64) as usize;
        (center, lo, hi.max(lo))
    }
}

/// The source pixels `start .. end` that output pixels `first .. first + n` (n ≥ 1) of a resize of
/// an axis from `in_size` to `out_size` read: windows move monotonically with the output pixel, so
/// this is the first one's start to the last one's end. An axis left at its size is not resampled.
pub fn source_span(
    in_size: usize,
    out_size: usize,
    filter: Filter,
    first: usize,
    n: usize,
) -> (usize, usize) {
    if in_size == out_size {
        return (first, first + n);
    }
    let g = Geometry::new(in_size, out_size, filter);
    (g.window(first).1, g.window(first + n - 1).2)
}

fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let g = Geometry::new(in_size, out_size, filter);
    let taps = g.taps;
    let inv_filter_scale = g.inv_filter_scale;
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * taps];
    let mut float_weights = vec![0f64; taps];
    for i in 0..out_size {
        let (center, lo, hi) = g.window(i);
        let n = (hi - lo).min(taps);
        let mut total = 0.0;
        for (k, w) in float_weights.iter_mut().enumerate().take(n) {
            // Multiplying by the reciprocal, not dividing, matches Pillow's rounding bit for bit.
            *w = filter.weight((k as f64 + lo as f64 - center + 0.5) * inv_filter_scale);
            total += *w;
        }
        for k in 0..n {
            let w = if total != 0.0 {
                float_weights[k] / total
            } else {
                float_weights[k]
            };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[i * taps + k] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        start.push(lo);
        len.push(n);
    }
    Coefficients {
        start,
        len,
        taps,
        weights,
    }
}

#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// One axis's coefficients laid out for the fast kernels: every window padded with zero weights to
/// `padded` taps (even, so the horizontal kernel reads whole 2-pixel groups), and for the horizontal
/// pass each weight repeated over the 4 lanes of an RGB0 pixel. Integer sums do not depend on their
/// order, so splitting them over lanes and accumulators changes no output byte.
struct Axis {
    c: Coefficients,
    padded: usize,
    /// The madd kernels' weights for the one window of output pixels (first, n) they were made
    /// for, kept with a cached axis.
    madd: std::cell::OnceCell<Option<(usize, usize, MaddWeights)>>,
    /// The permute kernel's tables, likewise for one window of output pixels.
    permute: std::cell::OnceCell<Option<(usize, usize, PermuteTables)>>,
    /// Whether the `vpdpbusd` kernels can take every weight ([`Axis::fits_digits`]).
    digits_fit: std::cell::OnceCell<bool>,
    /// Per output pixel: the first of two source pixels if its window, once zero weights are
    /// dropped, is exactly those two weighted 2^21 each (its fixed-point sum then reduces to
    /// `(a + b + 1) >> 1`, `pavgb`); [`NOT_PAIR`] otherwise. A box shrink by 2 is all pairs, and a box
    /// shrink of an odd size (scale just above 2) is pairs whose start drifts by one pixel across the
    /// axis, plus the odd three-pixel window.
    pair: Vec<usize>,
}

const NOT_PAIR: usize = usize::MAX;

impl Axis {
    fn new(in_size: usize, out_size: usize, filter: Filter) -> Axis {
        let c = coefficients(in_size, out_size, filter);
        let padded = c.taps.div_ceil(2) * 2;
        let pair = (0..out_size)
            .map(|i| {
                let w = &c.weights[i * c.taps..i * c.taps + c.len[i]];
                let first = w.iter().position(|&x| x != 0);
                let last = w.iter().rposition(|&x| x != 0);
                match (first, last) {
                    (Some(f), Some(l)) if l == f + 1 && w[f] == 1 << 21 && w[l] == 1 << 21 => {
                        c.start[i] + f
                    }
                    _ => NOT_PAIR,
                }
            })
            .collect();
        Axis {
            c,
            padded,
            madd: std::cell::OnceCell::new(),
            permute: std::cell::OnceCell::new(),
            digits_fit: std::cell::OnceCell::new(),
            pair,
        }
    }

    /// Taps of the longest window among output pixels `x0 .. x0 + n`, rounded up to whole pairs (the
    /// unit of the madd kernel). Often fewer than `padded`: an upscaling bicubic window holds 4 of
    /// its 5 possible taps.
    fn pairs(&self, x0: usize, n: usize) -> usize {
        self.c.len[x0..x0 + n]
            .iter()
            .max()
            .map_or(0, |&l| l.div_ceil(2))
    }

    /// The same axis with source positions counted from `origin` (the first source pixel of a window
    /// of the full image), for output pixels `first .. first + n`, whose windows must lie in
    /// `origin .. origin + len`. Positions of the other output pixels are left meaningless.
    fn shifted(mut self, origin: usize, len: usize, first: usize, n: usize) -> Axis {
        for i in first..first + n {
            let (start, end) = (self.c.start[i], self.c.start[i] + self.c.len[i]);
            assert!(
                start >= origin && end <= origin + len,
                "output pixel {i} reads source pixels {start}..{end}, outside the window {origin}..{}",
                origin + len
            );
        }
        if origin > 0 {
            for s in &mut self.c.start {
                *s = s.saturating_sub(origin);
            }
            for p in self.pair.iter_mut().filter(|p| **p != NOT_PAIR) {
                *p = p.saturating_sub(origin);
            }
        }
        self
    }

    /// Whether at least 3/4 of output pixels `x0 .. x0 + n` are pairs (see [`Axis::pair`]): then the
    /// averaging kernel, computing the rest one by one, beats the multiply-add kernels.
    fn mostly_pairs(&self, x0: usize, n: usize) -> bool {
        let pairs = self.pair[x0..x0 + n]
            .iter()
            .filter(|&&s| s != NOT_PAIR)
            .count();
        4 * pairs >= 3 * n
    }

    /// Output pixel i's exact fixed-point sum over the bytes `at(k)` of its window's taps.
    #[inline]
    fn weighted(&self, i: usize, at: impl Fn(usize) -> u8) -> u8 {
        let c = &self.c;
        let w = &c.weights[i * c.taps..i * c.taps + c.len[i]];
        let acc = w
            .iter()
            .enumerate()
            .fold(HALF, |acc, (k, &wk)| acc + at(c.start[i] + k) as i32 * wk);
        clip8(acc)
    }

    /// Weights for [`horizontal_madd_avx2`]: per output pixel of the window, per pair of taps, the
    /// high and then the low part of w = hi·2^11 + lo, each as the pair (w_k, w_k+1) repeated 4 times.
    /// None when some weight is too large to split into two i16 (never for Pillow's filters, whose
    /// normalised weights stay near ±2^22).
    fn madd_weights(&self, x0: usize, n: usize) -> Option<MaddWeights> {
        let c = &self.c;
        let pairs = self.pairs(x0, n);
        let mut out = Vec::with_capacity(n * pairs * 16);
        for i in x0..x0 + n {
            let w = |k: usize| {
                if k < c.len[i] {
                    c.weights[i * c.taps + k]
                } else {
                    0
                }
            };
            for p in 0..pairs {
                let (a, b) = (w(2 * p), w(2 * p + 1));
                if a.unsigned_abs() >= 1 << 25 || b.unsigned_abs() >= 1 << 25 {
                    return None;
                }
                let (ah, bh) = ((a >> 11) as i16, (b >> 11) as i16);
                let (al, bl) = ((a & 0x7ff) as i16, (b & 0x7ff) as i16);
                for _ in 0..4 {
                    out.extend_from_slice(&[ah, bh]);
                }
                for _ in 0..4 {
                    out.extend_from_slice(&[al, bl]);
                }
            }
        }
        Some(MaddWeights { w: out, pairs })
    }

    fn lane_weights(&self) -> Vec<i32> {
        let mut w = Vec::with_capacity(self.c.start.len() * self.padded * 4);
        for i in 0..self.c.start.len() {
            for k in 0..self.padded {
                let wk = if k < self.c.len[i] {
                    self.c.weights[i * self.c.taps + k]
                } else {
                    0
                };
                w.extend_from_slice(&[wk; 4]);
            }
        }
        w
    }
}

struct MaddWeights {
    w: Vec<i16>,
    pairs: usize,
}

impl MaddWeights {
    /// The most bytes a row's read reaches from its start for output pixels `x0 .. x0 + out_cols`:
    /// the furthest window start (the last, as starts never decrease, but taken as the maximum so
    /// that no bound rests on that) plus `pairs` pairs of pixels and the 16-byte load's spare bytes.
    fn max_read(&self, axis: &Axis, x0: usize, out_cols: usize) -> usize {
        let furthest = axis.c.start[x0..x0 + out_cols]
            .iter()
            .max()
            .map_or(0, |&s| s);
        furthest * 3 + self.pairs * 6 + 4
    }

    /// The window starts of output pixels `x0 .. x0 + out_cols`, after the checks the madd kernels'
    /// unchecked reads and writes rest on: every row's widest read (any window plus padding)
    /// inside the source, a weight block per output pixel and pair, room for every output row.
    #[allow(clippy::too_many_arguments)]
    fn checked_starts<'a>(
        &self,
        src_len: usize,
        stride: usize,
        rows: usize,
        axis: &'a Axis,
        x0: usize,
        out_cols: usize,
        out_len: usize,
    ) -> &'a [usize] {
        let max_read = self.max_read(axis, x0, out_cols);
        assert!(rows_fit(src_len, stride, rows, max_read));
        assert!(self.w.len() >= out_cols * self.pairs * 16 && out_len >= rows * out_cols * 3);
        &axis.c.start[x0..x0 + out_cols]
    }
}

/// The most taps the permute kernel handles, in quads (4 taps per `vpdpbusd` lane).
const PERMUTE_MAX_QUADS: usize = 3;

/// Output pixels per group of the permute kernel: 15 of a register's 16 i32 lanes, one per channel.
const PERMUTE_GROUP: usize = 5;

/// Tables of [`horizontal_permute_avx512`]: output pixels in groups of five, each group reading the
/// 64 source bytes from its first pixel's window start, which hold every tap of all five windows
/// when the scale is below about 2.5 (so every ADM bicubic step).
struct PermuteTables {
    quads: usize,
    /// Per group: its first source byte (3 × the first window's start) and its output pixels (1..=5).
    groups: Vec<(usize, usize)>,
    /// Per group and quad: the 64-byte `vpermb` index that fills i32 lane 3j + c with taps
    /// 4q .. 4q + 4 of channel c of the group's pixel j.
    index: Vec<[u8; 64]>,
    /// Per group and quad: the signed base-256 digits of the weights matching `index` (each
    /// weight k = 2^16·a + 2^8·b + c), the 64 a's, then the b's, then the c's.
    digits: Vec<[i8; 192]>,
}

impl PermuteTables {
    /// The most bytes a row's loads reach from its start: 64 from the furthest group's first byte.
    fn max_read(&self) -> usize {
        self.groups.iter().map(|g| g.0).max().map_or(0, |b| b) + 64
    }

    /// Panics unless the tables are laid out as [`permute_rows`] stores them for `out_cols` output
    /// pixels: groups of five (the last 1..=5) at columns 5g, `Q` index and digit tables per group.
    fn check_layout<const Q: usize>(&self, out_cols: usize) {
        assert!(self.quads == Q && self.groups.len() == out_cols.div_ceil(PERMUTE_GROUP));
        assert!(self.index.len() == self.groups.len() * Q && self.digits.len() == self.index.len());
        for (g, &(_, m)) in self.groups.iter().enumerate() {
            assert_eq!(m, (out_cols - PERMUTE_GROUP * g).min(PERMUTE_GROUP));
        }
    }
}

/// k as 2^16·a + 2^8·b + c with every digit in -128..=127, or `None` if a does not fit.
fn weight_digits(k: i32) -> Option<[i8; 3]> {
    let c = (k.wrapping_add(128) & 0xff) - 128;
    let k1 = (k - c) >> 8;
    let b = (k1.wrapping_add(128) & 0xff) - 128;
    let a = (k1 - b) >> 8;
    Some([i8::try_from(a).ok()?, b as i8, c as i8])
}

impl Axis {
    /// Whether every weight of the axis has three base-256 digits (only a weight near 2^23 or
    /// beyond, twice Pillow's 2^22 for 1.0, would not); worked out once per axis.
    fn fits_digits(&self) -> bool {
        *self
            .digits_fit
            .get_or_init(|| self.c.weights.iter().all(|&w| weight_digits(w).is_some()))
    }

    /// The permute kernel's tables for output pixels `x0 .. x0 + n`, or `None` when a group's taps
    /// do not fit in 64 bytes, there are too many taps, or a weight is too large for three digits.
    fn permute_tables(&self, x0: usize, n: usize) -> Option<PermuteTables> {
        let c = &self.c;
        let quads = c.len[x0..x0 + n].iter().max()?.div_ceil(4);
        if quads == 0 || quads > PERMUTE_MAX_QUADS {
            return None;
        }
        let groups = n.div_ceil(PERMUTE_GROUP);
        let mut t = PermuteTables {
            quads,
            groups: Vec::with_capacity(groups),
            index: Vec::with_capacity(groups * quads),
            digits: Vec::with_capacity(groups * quads),
        };
        for g in (x0..x0 + n).step_by(PERMUTE_GROUP) {
            let m = (x0 + n - g).min(PERMUTE_GROUP);
            let base = c.start[g];
            for q in 0..quads {
                let (mut index, mut digits) = ([0u8; 64], [0i8; 192]);
                for j in 0..m {
                    let i = g + j;
                    let off = 3 * c.start[i].checked_sub(base)?;
                    for tap in 0..4 {
                        let k = 4 * q + tap;
                        let wk = if k < c.len[i] {
                            c.weights[i * c.taps + k]
                        } else {
                            0
                        };
                        let d = weight_digits(wk)?;
                        for ch in 0..3 {
                            let byte = 4 * (3 * j + ch) + tap;
                            // A zero weight reads byte 0: any byte in the load will do.
                            if wk != 0 {
                                let at = off + 3 * k + ch;
                                index[byte] = u8::try_from(at).ok().filter(|&a| a < 64)?;
                            }
                            for (digit, &v) in d.iter().enumerate() {
                                digits[64 * digit + byte] = v;
                            }
                        }
                    }
                }
                t.index.push(index);
                t.digits.push(digits);
            }
            t.groups.push((3 * base, m));
        }
        Some(t)
    }
}

/// A rectangle of pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

/// Where an image's pixels sit in a larger one: its top-left pixel is (x, y) of a `full_w`×`full_h`
/// image (a region decode, or the window of an intermediate resize that later steps read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub x: usize,
    pub y: usize,
    pub full_w: usize,
    pub full_h: usize,
}

impl Placement {
    /// The whole image.
    pub fn whole(image: &RgbImage) -> Placement {
        Placement {
            x: 0,
            y: 0,
            full_w: image.width,
            full_h: image.height,
        }
    }
}

/// The axis of a resize from `in_size` to `out_size` for output pixels `first .. first + n`, its
/// source positions counted from `origin` of a part of `len` pixels ([`Axis::shifted`]), from a
/// per-thread cache: the crop plan and decode region depend on the image size alone, and most of
/// ImageNet comes in a few sizes, so the weights (and the kernels' tables) are mostly made once per
/// size.
fn cached_axis(
    in_size: usize,
    out_size: usize,
    filter: Filter,
    (origin, len): (usize, usize),
    (first, n): (usize, usize),
) -> std::rc::Rc<Axis> {
    let key = (in_size, out_size, filter, origin, len, first, n);
    AXES.with(|axes| {
        axes.borrow_mut().get_or_insert_with(key, || {
            Axis::new(in_size, out_size, filter).shifted(origin, len, first, n)
        })
    })
}

type AxisKey = (usize, usize, Filter, usize, usize, usize, usize);

thread_local! {
    static AXES: std::cell::RefCell<AxisCache> = std::cell::RefCell::new(AxisCache::default());
}

/// A small map that keeps what is used again: when full it drops the entries not used since the
/// last time it was full, so the long tail of one-off image sizes (ImageNet has many) cannot
/// push out the few sizes most images have.
#[derive(Default)]
struct AxisCache {
    entries: std::collections::HashMap<AxisKey, (std::rc::Rc<Axis>, bool)>,
}

impl AxisCache {
    /// Entries kept at most (a bicubic axis for a 256 crop with its tables is ~40 KB).
    const KEEP: usize = 64;

    fn get_or_insert_with(
        &mut self,
        key: AxisKey,
        make: impl FnOnce() -> Axis,
    ) -> std::rc::Rc<Axis> {
        if let Some((axis, used)) = self.entries.get_mut(&key) {
            *used = true;
            return axis.clone();
        }
        if self.entries.len() >= Self::KEEP {
            self.entries.retain(|_, (_, used)| std::mem::take(used));
            if self.entries.len() >= Self::KEEP / 2 {
                // Everything was used again: forget half rather than stay full.
                let drop: Vec<AxisKey> =
                    self.entries.keys().copied().take(Self::KEEP / 2).collect();
                for k in drop {
                    self.entries.remove(&k);
                }
            }
        }
        let axis = std::rc::Rc::new(make());
        self.entries.insert(key, (axis.clone(), false));
        axis
    }
}

/// The largest buffer a thread keeps for reuse (5 MP of RGB): a rare huge image is not held on to.
pub const KEEP_BYTES: usize = 16 << 20;

/// Per-thread buffers, reused across images so no pass allocates per row or per call.
#[derive(Default)]
struct Scratch {
    /// One source row widened to i32 RGB0 pixels (plus zero padding) for the horizontal kernel.
    lanes: Vec<i32>,
    /// The u8 image between the two passes.
    between: Vec<u8>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Resizes as `PIL.Image.resize((out_w, out_h), filter)` does on an RGB image.
pub fn resize_pillow(src: &RgbImage, out_w: usize, out_h: usize, filter: Filter) -> RgbImage {
    resize_pillow_crop(src, out_w, out_h, filter, 0, 0, out_w, out_h)
}

/// `crop(resize_pillow(src, out_w, out_h, filter))` to the `crop_w`×`crop_h` window at (left, top),
/// byte for byte, computing only the output pixels in the window (each output pixel of Pillow's
/// separable resize depends on its own row and column coefficients alone).
#[allow(clippy::too_many_arguments)]
pub fn resize_pillow_crop(
    src: &RgbImage,
    out_w: usize,
    out_h: usize,
    filter: Filter,
    left: usize,
    top: usize,
    crop_w: usize,
    crop_h: usize,
) -> RgbImage {
    let at = Placement::whole(src);
    resize_window(src, at, out_w, out_h, filter, left, top, crop_w, crop_h)
}

/// [`resize_pillow_crop`] of the full image when `src` holds only part of it, placed by `at`: the
/// part must contain every source pixel the window reads (see [`source_span`]); it panics otherwise.
#[allow(clippy::too_many_arguments)]
pub fn resize_window(
    src: &RgbImage,
    at: Placement,
    out_w: usize,
    out_h: usize,
    filter: Filter,
    left: usize,
    top: usize,
    crop_w: usize,
    crop_h: usize,
) -> RgbImage {
    let window = Rect {
        x: left,
        y: top,
        width: crop_w,
        height: crop_h,
    };
    resize_window_into(src, at, out_w, out_h, filter, window, Vec::new())
}

/// [`resize_window`] into `buf`'s allocation (its contents do not matter: every byte is written), so
/// that a caller can keep reusing one buffer instead of allocating, and faulting in, a large one
/// per image.
pub fn resize_window_into(
    src: &RgbImage,
    at: Placement,
    out_w: usize,
    out_h: usize,
    filter: Filter,
    window: Rect,
    buf: Vec<u8>,
) -> RgbImage {
    let (left, top, crop_w, crop_h) = (window.x, window.y, window.width, window.height);
    assert!(
        left + crop_w <= out_w && top + crop_h <= out_h,
        "crop window outside the resized image"
    );
    assert!(
        at.x + src.width <= at.full_w && at.y + src.height <= at.full_h,
        "placement outside the full image"
    );
    let mut out = buf;
    out.resize(crop_w * crop_h * 3, 0);
    if crop_w == 0 || crop_h == 0 {
        return RgbImage {
            width: crop_w,
            height: crop_h,
            pixels: out,
        };
    }
    let stride = src.width * 3;
    assert!(
        src.pixels.len() >= src.height * stride,
        "{} bytes of pixels for a {}x{} image",
        src.pixels.len(),
        src.width,
        src.height
    );
    let need_h = out_w != at.full_w;
    let need_v = out_h != at.full_h;
    // An axis left at its size has no `Axis::shifted` to check the part holds the window: output
    // pixels are source pixels, so the window must lie inside the part (else `left - at.x` and the
    // like wrap in release, and the kernels would read outside the part's rows or columns).
    assert!(
        need_h || (at.x <= left && left + crop_w <= at.x + src.width),
        "columns {left}..{} outside the part {}..{}",
        left + crop_w,
        at.x,
        at.x + src.width
    );
    assert!(
        need_v || (at.y <= top && top + crop_h <= at.y + src.height),
        "rows {top}..{} outside the part {}..{}",
        top + crop_h,
        at.y,
        at.y + src.height
    );
    // Axes over the full image, their source positions then counted within `src`.
    let h_axis = || cached_axis(at.full_w, out_w, filter, (at.x, src.width), (left, crop_w));
    let v_axis = || cached_axis(at.full_h, out_h, filter, (at.y, src.height), (top, crop_h));
    SCRATCH.with(|scratch| {
        let scratch = &mut *scratch.borrow_mut();
        if need_h && need_v && vertical_first(at.full_w, at.full_h, out_w, out_h) {
            // Vertical over every source column for the window's rows, then horizontal.
            let v = v_axis();
            let h = h_axis();
            let between = grown(&mut scratch.between, crop_h * stride);
            vertical_pass(&src.pixels, stride, 0, stride, 0, &v, top, crop_h, between);
            horizontal_pass(
                between,
                stride,
                src.width,
                crop_h,
                &h,
                left,
                crop_w,
                &mut scratch.lanes,
                &mut out,
            );
        } else if need_h {
            let h = h_axis();
            if need_v {
                let v = v_axis();
                // Only the source rows some window row reads go through the horizontal pass.
                let last = top + crop_h - 1;
                let (row_first, row_last) = (v.c.start[top], v.c.start[last] + v.c.len[last]);
                let rows = row_last - row_first;
                let between = grown(&mut scratch.between, rows * crop_w * 3);
                // The rest of the image after the rows, so the SIMD kernel's over-reads past the last
                // row's window stay in bounds more often.
                let from = &src.pixels[row_first * stride..];
                horizontal_pass(
                    from,
                    stride,
                    src.width,
                    rows,
                    &h,
                    left,
                    crop_w,
                    &mut scratch.lanes,
                    between,
                );
                vertical_pass(
                    between,
                    crop_w * 3,
                    0,
                    crop_w * 3,
                    row_first,
                    &v,
                    top,
                    crop_h,
                    &mut out,
                );
            } else {
                // No vertical resize: output rows are source rows.
                let from = &src.pixels[(top - at.y) * stride..];
                horizontal_pass(
                    from,
                    stride,
                    src.width,
                    crop_h,
                    &h,
                    left,
                    crop_w,
                    &mut scratch.lanes,
                    &mut out,
                );
            }
        } else if need_v {
            let v = v_axis();
            // No horizontal resize: output columns are source columns.
            vertical_pass(
                &src.pixels,
                stride,
                (left - at.x) * 3,
                crop_w * 3,
                0,
                &v,
                top,
                crop_h,
                &mut out,
            );
        } else {
            for (y, row) in out.chunks_exact_mut(crop_w * 3).enumerate() {
                let from = (top - at.y + y) * stride + (left - at.x) * 3;
                row.copy_from_slice(&src.pixels[from..from + crop_w * 3]);
            }
        }
    });
    RgbImage {
        width: crop_w,
        height: crop_h,
        pixels: out,
    }
}

/// The first `n` bytes of `buf`, growing it if needed. Not cleared: the first pass writes every byte
/// of it before the second reads any, so zeroing each call would only cost a memset per image.
fn grown(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

/// Pillow 13's choice of pass order (see the module docs).
fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let (shrink_w, shrink_h) = (out_w < in_w, out_h < in_h);
    match (shrink_w, shrink_h) {
        (true, true) => 2 * (in_w - out_w) < in_h - out_h,
        (false, true) => true,
        _ => false,
    }
}

/// Horizontal pass over `rows` rows of `src` (row y at `y * stride`, `in_w` pixels), writing output
/// columns `x0 .. x0 + out_cols` densely into `out`.
#[allow(clippy::too_many_arguments)]
fn horizontal_pass(
    src: &[u8],
    stride: usize,
    in_w: usize,
    rows: usize,
    axis: &Axis,
    x0: usize,
    out_cols: usize,
    lanes: &mut Vec<i32>,
    out: &mut [u8],
) {
    // Once per call, so that no kernel relies on the cached axis having been made for this source:
    // `rows` whole rows of `in_w` pixels in `src` (so `in_bounds_rows` pads only over-reads, never
    // pixels), room for the output, and every window of the output pixels inside the row.
    assert!(in_w * 3 <= stride && rows_fit(src.len(), stride, rows, in_w * 3));
    assert!(out_cols > 0 && out.len() >= rows * out_cols * 3);
    let c = &axis.c;
    assert!((x0..x0 + out_cols).all(|i| c.start[i] + c.len[i] <= in_w));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        if axis.mostly_pairs(x0, out_cols) {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { horizontal_pairs_avx2(src, stride, rows, axis, x0, out_cols, out) };
            return;
        }
        if avx512_vbmi() {
            if let Some(tables) = made_for(&axis.permute, (x0, out_cols), || {
                axis.permute_tables(x0, out_cols)
            }) {
                let max_read = tables.max_read();
                in_bounds_rows(
                    src,
                    stride,
                    rows,
                    max_read,
                    out_cols * 3,
                    out,
                    |src, rows, out| {
                        // SAFETY: the CPU has AVX-512 VNNI and VBMI (checked above); the kernel asserts
                        // its reads and writes are in bounds.
                        unsafe {
                            horizontal_permute_avx512(src, stride, rows, tables, out_cols, out)
                        }
                    },
                );
                return;
            }
        }
        if let Some(weights) = made_for(&axis.madd, (x0, out_cols), || {
            axis.madd_weights(x0, out_cols)
        }) {
            let max_read = weights.max_read(axis, x0, out_cols);
            // Four rows per register with fused multiply-adds where the CPU has AVX-512 VNNI.
            let kernel = if avx512_vnni() {
                horizontal_madd_avx512
            } else {
                horizontal_madd_avx2
            };
            in_bounds_rows(
                src,
                stride,
                rows,
                max_read,
                out_cols * 3,
                out,
                |src, rows, out| {
                    // SAFETY: the CPU supports the kernel's features (checked above); every row reads
                    // at most `max_read` bytes from its start, inside `src` (see `in_bounds_rows`).
                    unsafe { kernel(src, stride, rows, axis, weights, x0, out_cols, out) }
                },
            );
            return;
        }
        let weights = axis.lane_weights();
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe {
            horizontal_avx2(
                src, stride, in_w, rows, axis, &weights, x0, out_cols, lanes, out,
            )
        };
        return;
    }
    let weights = axis.lane_weights();
    horizontal_kernel(
        src, stride, in_w, rows, axis, &weights, x0, out_cols, lanes, out,
    );
}

/// A kernel's tables kept with a cached axis, made on first use for one window of output pixels
/// (`x0`, `n`); `None` if they cannot be made, or were made for another window.
fn made_for<T>(
    cell: &std::cell::OnceCell<Option<(usize, usize, T)>>,
    window: (usize, usize),
    make: impl FnOnce() -> Option<T>,
) -> Option<&T> {
    cell.get_or_init(|| make().map(|t| (window.0, window.1, t)))
        .as_ref()
        .filter(|(x0, n, _)| (*x0, *n) == window)
        .map(|(_, _, t)| t)
}

/// Whether `rows` rows, `stride` bytes apart, can each read `max_read` bytes from their start in a
/// buffer of `len` bytes (overflow counts as no).
fn rows_fit(len: usize, stride: usize, rows: usize, max_read: usize) -> bool {
    rows == 0
        || (rows - 1)
            .checked_mul(stride)
            .and_then(|n| n.checked_add(max_read))
            .is_some_and(|n| n <= len)
}

/// Runs a SIMD row kernel that reads up to `max_read` bytes from each row's start: rows whose read
/// stays inside `src` are read in place; only the last row or two of the buffer can miss that, and
/// they go through a copy with zero padding (cheaper than a portable kernel for the whole axis).
fn in_bounds_rows(
    src: &[u8],
    stride: usize,
    rows: usize,
    max_read: usize,
    out_row_bytes: usize,
    out: &mut [u8],
    kernel: impl Fn(&[u8], usize, &mut [u8]),
) {
    let safe = (0..rows)
        .take_while(|&y| y * stride + max_read <= src.len())
        .count();
    kernel(src, safe, out);
    if safe < rows {
        let tail = &src[safe * stride..];
        let mut padded = vec![0u8; (rows - safe - 1) * stride + max_read.max(stride)];
        let n = tail.len().min(padded.len());
        padded[..n].copy_from_slice(&tail[..n]);
        kernel(&padded, rows - safe, &mut out[safe * out_row_bytes..]);
    }
}

/// Rows whose output pixels are mostly pairs (see [`Axis::pair`]): three output pixels per step
/// when their pairs are adjacent (starts s, s + 2, s + 4: bytes j and j + 3 of 18 source bytes are
/// averaged with `pavgb` and bytes 0-2, 6-8, 12-14 kept), any other pixel on its own, a pair as the
/// rounded average and a wider window as its exact fixed-point sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_pairs_avx2(
    src: &[u8],
    stride: usize,
    rows: usize,
    axis: &Axis,
    x0: usize,
    out_cols: usize,
    out: &mut [u8],
) {
    use std::arch::x86_64::*;
    let keep = _mm_setr_epi8(0, 1, 2, 6, 7, 8, 12, 13, 14, -1, -1, -1, -1, -1, -1, -1);
    let pair = &axis.pair[x0..x0 + out_cols];
    let row_bytes = out_cols * 3;
    for y in 0..rows {
        let from = &src[y * stride..];
        // The 16-byte store may run into the pixels after the three (written next, in this row or
        // the next one).
        let to = &mut out[y * row_bytes..];
        let mut x = 0;
        while x < out_cols {
            let s = pair[x];
            if s != NOT_PAIR
                && x + 3 <= out_cols
                && pair[x + 1] == s + 2
                && pair[x + 2] == s + 4
                && s * 3 + 19 <= from.len()
                && x * 3 + 16 <= to.len()
            {
                // SAFETY: the condition keeps the two 16-byte loads (bytes s·3 .. s·3 + 19) inside
                // `from` and the 16-byte store inside `to`; unaligned loads and stores are allowed.
                let a = _mm_loadu_si128(from.as_ptr().add(s * 3) as *const __m128i);
                let b = _mm_loadu_si128(from.as_ptr().add(s * 3 + 3) as *const __m128i);
                let avg = _mm_shuffle_epi8(_mm_avg_epu8(a, b), keep);
                _mm_storeu_si128(to.as_mut_ptr().add(x * 3) as *mut __m128i, avg);
                x += 3;
                continue;
            }
            for ch in 0..3 {
                to[x * 3 + ch] = if s != NOT_PAIR {
                    let (a, b) = (from[s * 3 + ch] as u16, from[s * 3 + 3 + ch] as u16);
                    ((a + b + 1) >> 1) as u8
                } else {
                    axis.weighted(x0 + x, |k| from[k * 3 + ch])
                };
            }
            x += 1;
        }
    }
}

/// Two rows per register (one in each 128-bit lane, sharing the weights), one output pixel at a time:
/// pairs of taps are shuffled from RGB bytes into i16 `(p_k, p_k+1)` per channel and multiplied with
/// `_mm256_madd_epi16` against the weight split w = hi·2^11 + lo (both fit i16). The sum
/// 2^11·Σp·hi + Σp·lo is the exact Σp·w: i32 adds wrap, and the true sum fits an i32 (Pillow's own
/// accumulator is an i32), so the result mod 2^32 is the result.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn horizontal_madd_avx2(
    src: &[u8],
    stride: usize,
    rows: usize,
    axis: &Axis,
    weights: &MaddWeights,
    x0: usize,
    out_cols: usize,
    out: &mut [u8],
) {
    use std::arch::x86_64::*;
    let pairs = weights.pairs;
    let starts = weights.checked_starts(src.len(), stride, rows, axis, x0, out_cols, out.len());
    #[rustfmt::skip]
    let compact = _mm256_setr_epi8(
        0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,
        0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,
    );
    let row_bytes = out_cols * 3;
    let mut y = 0;
    while y < rows {
        // An odd last row rides in both lanes; only lane 0 is stored.
        let y1 = (y + 1).min(rows - 1);
        // SAFETY (the kernel calls): every read is at most `max_read` bytes past the start of row
        // y or y1 < rows, inside `src` by the assert above; `weights.w` holds `pairs` blocks of
        // 16 i16 per output pixel (assert above).
        let r0 = src.as_ptr().add(y * stride);
        let r1 = src.as_ptr().add(y1 * stride);
        let w = weights.w.as_ptr();
        let px = |x: usize| madd_pixel(r0, r1, starts[x] * 3, w.add(x * pairs * 16), pairs);
        let mut x = 0;
        // Four output pixels per step, packed together so each row gets one 12-byte copy instead of
        // four 3-byte ones.
        while x + 4 <= out_cols {
            let (q0, q1, q2, q3) = (px(x), px(x + 1), px(x + 2), px(x + 3));
            // Saturating packs clamp to 0..=255 exactly as `clip8` (|q| < 2^15 here).
            let b = _mm256_packus_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
            let mut tmp = [0u8; 32];
            _mm256_storeu_si256(
                tmp.as_mut_ptr() as *mut __m256i,
                _mm256_shuffle_epi8(b, compact),
            );
            let at = y * row_bytes + x * 3;
            out[at..at + 12].copy_from_slice(&tmp[..12]);
            if y1 != y {
                out[at + row_bytes..at + row_bytes + 12].copy_from_slice(&tmp[16..28]);
            }
            x += 4;
        }
        while x < out_cols {
            let q = px(x);
            let q = _mm256_packus_epi16(_mm256_packs_epi32(q, q), _mm256_setzero_si256());
            let px0 = (_mm256_cvtsi256_si32(q) as u32).to_le_bytes();
            let px1 = (_mm256_extract_epi32::<4>(q) as u32).to_le_bytes();
            let at = y * row_bytes + x * 3;
            out[at..at + 3].copy_from_slice(&px0[..3]);
            if y1 != y {
                out[at + row_bytes..at + row_bytes + 3].copy_from_slice(&px1[..3]);
            }
            x += 1;
        }
        y += 2;
    }
}

#[cfg(test)]
#[cfg(test)]
thread_local! {
    /// Lets a test run the older kernels on a machine that has newer ones: 0 every kernel the CPU
    /// has, 1 no `vpermb` kernel, 2 AVX2 only.
    static KERNEL_LIMIT: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

#[cfg(target_arch = "x86_64")]
fn avx512_vnni() -> bool {
    #[cfg(test)]
    if KERNEL_LIMIT.with(|c| c.get()) >= 2 {
        return false;
    }
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// AVX-512 VNNI and VBMI (`vpermb`, any byte of a register to any position).
#[cfg(target_arch = "x86_64")]
fn avx512_vbmi() -> bool {
    #[cfg(test)]
    if KERNEL_LIMIT.with(|c| c.get()) >= 1 {
        return false;
    }
    avx512_vnni() && std::arch::is_x86_feature_detected!("avx512vbmi")
}

/// [`horizontal_madd_avx2`] with four rows per register (one per 128-bit lane) and `vpdpwssd`, which
/// multiplies and adds to the accumulator in one instruction; each lane's 12 output bytes go out with
/// one masked store. The same sums as the AVX2 kernel, so the same bytes.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI; as [`horizontal_madd_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn horizontal_madd_avx512(
    src: &[u8],
    stride: usize,
    rows: usize,
    axis: &Axis,
    weights: &MaddWeights,
    x0: usize,
    out_cols: usize,
    out: &mut [u8],
) {
    use std::arch::x86_64::*;
    let pairs = weights.pairs;
    let starts = weights.checked_starts(src.len(), stride, rows, axis, x0, out_cols, out.len());
    let compact = _mm512_broadcast_i32x4(_mm_setr_epi8(
        0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,
    ));
    let first = _mm512_broadcast_i32x4(_mm_setr_epi8(
        0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,
    ));
    let second = _mm512_broadcast_i32x4(_mm_setr_epi8(
        6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1,
    ));
    let half = _mm512_set1_epi32(HALF);
    let row_bytes = out_cols * 3;
    let mut y = 0;
    while y < rows {
        // Rows past the end repeat the last one in the spare lanes; only distinct rows are stored.
        let ys = [
            y,
            (y + 1).min(rows - 1),
            (y + 2).min(rows - 1),
            (y + 3).min(rows - 1),
        ];
        let distinct = 1 + (1..4).filter(|&j| ys[j] != ys[j - 1]).count();
        // SAFETY (below): every read is at most `max_read` bytes past the start of a row < rows,
        // inside `src` by the assert above; `weights.w` holds `pairs` blocks of 16 i16 per output
        // pixel; stores stay inside `out` (rows < rows, columns < out_cols).
        let r = ys.map(|yy| src.as_ptr().add(yy * stride));
        let load16 = |at: usize| {
            let v = _mm512_castsi128_si512(_mm_loadu_si128(r[0].add(at) as *const __m128i));
            let v = _mm512_inserti32x4::<1>(v, _mm_loadu_si128(r[1].add(at) as *const __m128i));
            let v = _mm512_inserti32x4::<2>(v, _mm_loadu_si128(r[2].add(at) as *const __m128i));
            _mm512_inserti32x4::<3>(v, _mm_loadu_si128(r[3].add(at) as *const __m128i))
        };
        let load8 = |at: usize| {
            let v = _mm512_castsi128_si512(_mm_loadl_epi64(r[0].add(at) as *const __m128i));
            let v = _mm512_inserti32x4::<1>(v, _mm_loadl_epi64(r[1].add(at) as *const __m128i));
            let v = _mm512_inserti32x4::<2>(v, _mm_loadl_epi64(r[2].add(at) as *const __m128i));
            _mm512_inserti32x4::<3>(v, _mm_loadl_epi64(r[3].add(at) as *const __m128i))
        };
        let bcast = |p: *const i16| _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i));
        let px = |x: usize| {
            let s = starts[x] * 3;
            let w = weights.w.as_ptr().add(x * pairs * 16);
            let (mut hi, mut lo) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            let mut p = 0;
            while p + 2 <= pairs {
                let v = load16(s + p * 6);
                let (a, b) = (
                    _mm512_shuffle_epi8(v, first),
                    _mm512_shuffle_epi8(v, second),
                );
                let (wa, wb) = (w.add(p * 16), w.add(p * 16 + 16));
                hi = _mm512_dpwssd_epi32(hi, a, bcast(wa));
                lo = _mm512_dpwssd_epi32(lo, a, bcast(wa.add(8)));
                hi = _mm512_dpwssd_epi32(hi, b, bcast(wb));
                lo = _mm512_dpwssd_epi32(lo, b, bcast(wb.add(8)));
                p += 2;
            }
            if p < pairs {
                let a = _mm512_shuffle_epi8(load8(s + p * 6), first);
                let wa = w.add(p * 16);
                hi = _mm512_dpwssd_epi32(hi, a, bcast(wa));
                lo = _mm512_dpwssd_epi32(lo, a, bcast(wa.add(8)));
            }
            let acc = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32::<11>(hi), lo), half);
            _mm512_srai_epi32::<PRECISION_BITS>(acc)
        };
        let out = out.as_mut_ptr();
        let store = |b: __m512i, at: usize, mask: u16| {
            _mm_mask_storeu_epi8(out.add(at) as *mut i8, mask, _mm512_castsi512_si128(b));
            if distinct > 1 {
                let lane = _mm512_extracti32x4_epi32::<1>(b);
                _mm_mask_storeu_epi8(out.add(at + row_bytes) as *mut i8, mask, lane);
            }
            if distinct > 2 {
                let lane = _mm512_extracti32x4_epi32::<2>(b);
                _mm_mask_storeu_epi8(out.add(at + 2 * row_bytes) as *mut i8, mask, lane);
            }
            if distinct > 3 {
                let lane = _mm512_extracti32x4_epi32::<3>(b);
                _mm_mask_storeu_epi8(out.add(at + 3 * row_bytes) as *mut i8, mask, lane);
            }
        };
        let mut x = 0;
        while x + 4 <= out_cols {
            let (q0, q1, q2, q3) = (px(x), px(x + 1), px(x + 2), px(x + 3));
            // Saturating packs clamp to 0..=255 exactly as `clip8` (|q| < 2^15 here).
            let b = _mm512_packus_epi16(_mm512_packs_epi32(q0, q1), _mm512_packs_epi32(q2, q3));
            store(
                _mm512_shuffle_epi8(b, compact),
                y * row_bytes + x * 3,
                0x0fff,
            );
            x += 4;
        }
        while x < out_cols {
            let q = px(x);
            let b = _mm512_packus_epi16(_mm512_packs_epi32(q, q), _mm512_setzero_si512());
            store(b, y * row_bytes + x * 3, 0x0007);
            x += 1;
        }
        y += 4;
    }
}

/// Horizontal pass with one 64-byte load per row and group of five output pixels: `vpermb` moves
/// each pixel's taps, four at a time, into the i32 lane of its channel, and `vpdpbusd` multiplies
/// them by the weights' three signed base-256 digits (u8 × i8, four products per lane), so no
/// widening, per-pixel loads or inserts are needed; a group's tables stay in registers while the loop
/// walks down a block of rows. Integer sums are exact in any order (and modulo 2^32 on the way), so
/// the bytes are those of the other kernels.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI/VBMI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn horizontal_permute_avx512(
    src: &[u8],
    stride: usize,
    rows: usize,
    t: &PermuteTables,
    out_cols: usize,
    out: &mut [u8],
) {
    match t.quads {
        1 => permute_rows::<1>(src, stride, rows, t, out_cols, out),
        2 => permute_rows::<2>(src, stride, rows, t, out_cols, out),
        3 => permute_rows::<3>(src, stride, rows, t, out_cols, out),
        _ => unreachable!("permute tables have 1..={PERMUTE_MAX_QUADS} quads"),
    }
}

/// The fixed-point sums from the per-digit sums of the `vpdpbusd` kernels (Σp·a, Σp·b, Σp·c for
/// weights 2^16·a + 2^8·b + c), rounded and shifted down to the 8-bit range, not yet clamped. The
/// i32 adds wrap, but the true sum fits an i32, so the result is exact.
///
/// # Safety
/// AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn digit_sums(
    a: std::arch::x86_64::__m512i,
    b: std::arch::x86_64::__m512i,
    c: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let high = _mm512_add_epi32(_mm512_slli_epi32::<16>(a), _mm512_slli_epi32::<8>(b));
    let acc = _mm512_add_epi32(high, _mm512_add_epi32(c, _mm512_set1_epi32(HALF)));
    _mm512_srai_epi32::<PRECISION_BITS>(acc)
}

/// [`horizontal_permute_avx512`] for `Q` quads of taps (a constant, so the tables live in
/// registers).
///
/// # Safety
/// As [`horizontal_permute_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn permute_rows<const Q: usize>(
    src: &[u8],
    stride: usize,
    rows: usize,
    t: &PermuteTables,
    out_cols: usize,
    out: &mut [u8],
) {
    use std::arch::x86_64::*;
    let row_bytes = out_cols * 3;
    t.check_layout::<Q>(out_cols);
    assert!(rows_fit(src.len(), stride, rows, t.max_read()));
    assert!(out.len() >= rows * row_bytes);
    let zero = _mm512_setzero_si512();
    let max = _mm512_set1_epi32(255);
    // Hidden from the optimiser, which would otherwise turn the permute and store into a
    // `vpmovdb` to memory, several times slower on Zen 4.
    let low_bytes = std::hint::black_box(_mm512_set_epi32(
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0x3c38_3430,
        0x2c28_2420,
        0x1c18_1410,
        0x0c08_0400,
    ));
    // Blocks of rows, so the rows' source and output bytes stay in L1 while every group passes
    // over them (a group's tables are a few loads per block).
    const BLOCK: usize = 16;
    for y0 in (0..rows).step_by(BLOCK) {
        let block = (rows - y0).min(BLOCK);
        for (g, &(base, m)) in t.groups.iter().enumerate() {
            let table = |q: usize, digit: usize| {
                _mm512_loadu_si512(t.digits[g * Q + q].as_ptr().add(64 * digit) as *const _)
            };
            let index: [__m512i; Q] =
                std::array::from_fn(
                    |q| _mm512_loadu_si512(t.index[g * Q + q].as_ptr() as *const _),
                );
            let a: [__m512i; Q] = std::array::from_fn(|q| table(q, 0));
            let b: [__m512i; Q] = std::array::from_fn(|q| table(q, 1));
            let c: [__m512i; Q] = std::array::from_fn(|q| table(q, 2));
            let last = g + 1 == t.groups.len();
            let store_mask: __mmask16 = (1 << (3 * m)) - 1;
            // SAFETY (below): row y's load is `base + 64 ≤ max_read` bytes from its start, inside
            // `src` by the assert above; the store is 16 bytes at column 5g of an output row, inside
            // it as a later group follows (`check_layout`: five pixels in every group but the
            // last), the last group's masked to its 3·m, so inside `out`.
            let from = src.as_ptr().add(base + y0 * stride);
            let to = out.as_mut_ptr().add(3 * PERMUTE_GROUP * g + y0 * row_bytes);
            for y in 0..block {
                let v = _mm512_loadu_si512(from.add(y * stride) as *const _);
                let (mut sa, mut sb, mut sc) = (zero, zero, zero);
                for q in 0..Q {
                    let taps = _mm512_permutexvar_epi8(index[q], v);
                    sa = _mm512_dpbusd_epi32(sa, taps, a[q]);
                    sb = _mm512_dpbusd_epi32(sb, taps, b[q]);
                    sc = _mm512_dpbusd_epi32(sc, taps, c[q]);
                }
                // Clamped to 0..=255 as `clip8`, then the low byte of each lane: lane 3j + c lands
                // on byte 3j + c of the output.
                let q = _mm512_min_epi32(_mm512_max_epi32(digit_sums(sa, sb, sc), zero), max);
                let bytes = _mm512_castsi512_si128(_mm512_permutexvar_epi8(low_bytes, q));
                let at = to.add(y * row_bytes);
                if last {
                    _mm_mask_storeu_epi8(at as *mut i8, store_mask, bytes);
                } else {
                    // The byte past the group's 15 is the next group's, written after this one.
                    _mm_storeu_si128(at as *mut __m128i, bytes);
                }
            }
        }
    }
}

/// One output pixel of the rows at `r0` (lane 0) and `r1` (lane 1): the window starting at byte `s`,
/// weights at `w`; returns the rounded sum shifted down to the 8-bit range (not yet clamped).
///
/// # Safety
/// AVX2; bytes `s .. s + pairs·6 + 4` readable from both rows and `pairs·16` i16 from `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn madd_pixel(
    r0: *const u8,
    r1: *const u8,
    s: usize,
    w: *const i16,
    pairs: usize,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    #[rustfmt::skip]
    let first = _mm256_setr_epi8(
        0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,
        0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,
    );
    #[rustfmt::skip]
    let second = _mm256_setr_epi8(
        6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1,
        6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1,
    );
    let (mut hi, mut lo) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut p = 0;
    while p + 2 <= pairs {
        let at = s + p * 6;
        let v = _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(r0.add(at) as *const __m128i)),
            _mm_loadu_si128(r1.add(at) as *const __m128i),
        );
        let (a, b) = (
            _mm256_shuffle_epi8(v, first),
            _mm256_shuffle_epi8(v, second),
        );
        let wa = w.add(p * 16);
        let wb = w.add(p * 16 + 16);
        hi = _mm256_add_epi32(hi, _mm256_madd_epi16(a, bcast(wa)));
        lo = _mm256_add_epi32(lo, _mm256_madd_epi16(a, bcast(wa.add(8))));
        hi = _mm256_add_epi32(hi, _mm256_madd_epi16(b, bcast(wb)));
        lo = _mm256_add_epi32(lo, _mm256_madd_epi16(b, bcast(wb.add(8))));
        p += 2;
    }
    if p < pairs {
        let at = s + p * 6;
        let v = _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadl_epi64(r0.add(at) as *const __m128i)),
            _mm_loadl_epi64(r1.add(at) as *const __m128i),
        );
        let a = _mm256_shuffle_epi8(v, first);
        let wa = w.add(p * 16);
        hi = _mm256_add_epi32(hi, _mm256_madd_epi16(a, bcast(wa)));
        lo = _mm256_add_epi32(lo, _mm256_madd_epi16(a, bcast(wa.add(8))));
    }
    let acc = _mm256_add_epi32(
        _mm256_add_epi32(_mm256_slli_epi32::<11>(hi), lo),
        _mm256_set1_epi32(HALF),
    );
    _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(acc)
}

/// The 8 i16 at `p` in both 128-bit lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bcast(p: *const i16) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the caller passes a pointer to 8 readable i16.
    _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn horizontal_avx2(
    src: &[u8],
    stride: usize,
    in_w: usize,
    rows: usize,
    axis: &Axis,
    weights: &[i32],
    x0: usize,
    out_cols: usize,
    lanes: &mut Vec<i32>,
    out: &mut [u8],
) {
    horizontal_kernel(
        src, stride, in_w, rows, axis, weights, x0, out_cols, lanes, out,
    )
}

/// Each source pixel is widened once per row to 4 i32 lanes (R, G, B, 0); an output pixel is then a
/// multiply-add of `padded` such pixels with their lane-repeated weights, two pixels (8 lanes, one
/// AVX2 register) per step, with no per-channel or per-tap branching.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn horizontal_kernel(
    src: &[u8],
    stride: usize,
    in_w: usize,
    rows: usize,
    axis: &Axis,
    weights: &[i32],
    x0: usize,
    out_cols: usize,
    lanes: &mut Vec<i32>,
    out: &mut [u8],
) {
    let c = &axis.c;
    let padded = axis.padded;
    let last = x0 + out_cols - 1;
    let (sx0, sx1) = (c.start[x0], c.start[last] + padded);
    let real_end = sx1.min(in_w);
    lanes.clear();
    // The padding past the image stays zero and meets only zero weights.
    lanes.resize((sx1 - sx0) * 4, 0);
    for y in 0..rows {
        let row = &src[y * stride + sx0 * 3..y * stride + real_end * 3];
        for (l, p) in lanes.chunks_exact_mut(4).zip(row.chunks_exact(3)) {
            l[0] = p[0] as i32;
            l[1] = p[1] as i32;
            l[2] = p[2] as i32;
        }
        let out_row = &mut out[y * out_cols * 3..(y + 1) * out_cols * 3];
        for (x, px) in out_row.chunks_exact_mut(3).enumerate() {
            let i = x0 + x;
            let s = (c.start[i] - sx0) * 4;
            let taps = &lanes[s..s + padded * 4];
            let w = &weights[i * padded * 4..(i + 1) * padded * 4];
            let mut acc = [0i32; 8];
            for (t, wt) in taps.chunks_exact(8).zip(w.chunks_exact(8)) {
                for j in 0..8 {
                    acc[j] += t[j] * wt[j];
                }
            }
            px[0] = clip8(HALF + acc[0] + acc[4]);
            px[1] = clip8(HALF + acc[1] + acc[5]);
            px[2] = clip8(HALF + acc[2] + acc[6]);
        }
    }
}

/// Vertical pass: output rows `y0 .. y0 + out_rows` into `out` (dense, `width` bytes a row), reading
/// bytes `col .. col + width` of source rows; `src` starts at row `row_base` of the axis's source positions.
#[allow(clippy::too_many_arguments)]
fn vertical_pass(
    src: &[u8],
    stride: usize,
    col: usize,
    width: usize,
    row_base: usize,
    axis: &Axis,
    y0: usize,
    out_rows: usize,
    out: &mut [u8],
) {
    // Runs of pair rows are averaged, runs of other rows go through the multiply-add kernel.
    let mut y = 0;
    while y < out_rows {
        let is_pair = axis.pair[y0 + y] != NOT_PAIR;
        let run = axis.pair[y0 + y..y0 + out_rows]
            .iter()
            .take_while(|&&s| (s != NOT_PAIR) == is_pair)
            .count();
        let out = &mut out[y * width..(y + run) * width];
        if is_pair {
            vertical_pairs(src, stride, col, width, row_base, axis, y0 + y, run, out);
        } else {
            vertical_weighted(src, stride, col, width, row_base, axis, y0 + y, run, out);
        }
        y += run;
    }
}

#[allow(clippy::too_many_arguments)]
fn vertical_weighted(
    src: &[u8],
    stride: usize,
    col: usize,
    width: usize,
    row_base: usize,
    axis: &Axis,
    y0: usize,
    out_rows: usize,
    out: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if avx512_vnni() && axis.fits_digits() {
        // SAFETY: the CPU supports the kernel's features (checked just above).
        unsafe { vertical_avx512(src, stride, col, width, row_base, axis, y0, out_rows, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { vertical_avx2(src, stride, col, width, row_base, axis, y0, out_rows, out) };
        return;
    }
    vertical_kernel(src, stride, col, width, row_base, axis, y0, out_rows, out);
}

/// The vertical pass with `vpdpbusd`: four taps (source rows k .. k + 4) at a time, their bytes
/// interleaved so each i32 lane holds one column's four, multiplied (u8 × i8) by the weights' three
/// signed base-256 digits as in [`horizontal_permute_avx512`]; 64 output bytes per step, the last
/// partial step through masked loads and stores (which never touch bytes outside the mask). Integer
/// sums, exact in any order, so the bytes of the scalar port.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn vertical_avx512(
    src: &[u8],
    stride: usize,
    col: usize,
    width: usize,
    row_base: usize,
    axis: &Axis,
    y0: usize,
    out_rows: usize,
    out: &mut [u8],
) {
    use std::arch::x86_64::*;
    let c = &axis.c;
    assert!(out.len() >= out_rows * width);
    // Per quad of taps: the a, b and c digits of its four weights (one byte per tap, broadcast)
    // and the byte offsets of its four rows.
    let mut quads: Vec<([__m512i; 3], [usize; 4])> = Vec::new();
    for y in 0..out_rows {
        let i = y0 + y;
        // Checked arithmetic: a wrapped `first` or row offset would pass a plain comparison and
        // send the unchecked loads below before or far past `src` in release builds.
        let n = c.len[i];
        let first = c.start[i].checked_sub(row_base);
        let last_end = first
            .and_then(|f| (f + n.max(1) - 1).checked_mul(stride))
            .and_then(|at| at.checked_add(col + width));
        assert!(
            col + width <= stride && last_end.is_some_and(|end| end <= src.len()),
            "output row {i} reads source rows outside `src`"
        );
        let first = first.unwrap_or_default();
        quads.clear();
        for q in 0..n.div_ceil(4) {
            // Taps past the window read its last row, with weight 0.
            let rows = std::array::from_fn(|t| (first + (4 * q + t).min(n - 1)) * stride + col);
            let taps: [[i8; 3]; 4] = std::array::from_fn(|t| {
                let k = 4 * q + t;
                let w = if k < n { c.weights[i * c.taps + k] } else { 0 };
                weight_digits(w).expect("checked by the caller (`Axis::fits_digits`)")
            });
            let digit =
                |d: usize| _mm512_set1_epi32(i32::from_le_bytes(taps.map(|tap| tap[d] as u8)));
            quads.push(([digit(0), digit(1), digit(2)], rows));
        }
        let out_row = out.as_mut_ptr().add(y * width);
        let mut bx = 0;
        while bx < width {
            let mask: __mmask64 = if width - bx >= 64 {
                u64::MAX
            } else {
                (1u64 << (width - bx)) - 1
            };
            let zero = _mm512_setzero_si512();
            let mut acc = [[zero; 4]; 3];
            for (digits, rows) in &quads {
                // SAFETY: rows `first .. first + n` hold bytes `col .. col + width` (asserts above);
                // masked loads read only the bytes below `width`.
                let r = rows.map(|at| {
                    _mm512_maskz_loadu_epi8(mask, src.as_ptr().add(at + bx) as *const i8)
                });
                // Within each 128-bit lane: columns 0-7 and 8-15 as row pairs, then as row quads:
                // v[0] holds columns 0-3 of every lane, v[1] 4-7, v[2] 8-11, v[3] 12-15.
                let (lo01, hi01) = (
                    _mm512_unpacklo_epi8(r[0], r[1]),
                    _mm512_unpackhi_epi8(r[0], r[1]),
                );
                let (lo23, hi23) = (
                    _mm512_unpacklo_epi8(r[2], r[3]),
                    _mm512_unpackhi_epi8(r[2], r[3]),
                );
                let v = [
                    _mm512_unpacklo_epi16(lo01, lo23),
                    _mm512_unpackhi_epi16(lo01, lo23),
                    _mm512_unpacklo_epi16(hi01, hi23),
                    _mm512_unpackhi_epi16(hi01, hi23),
                ];
                for d in 0..3 {
                    for k in 0..4 {
                        acc[d][k] = _mm512_dpbusd_epi32(acc[d][k], v[k], digits[d]);
                    }
                }
            }
            let sum = |k: usize| digit_sums(acc[0][k], acc[1][k], acc[2][k]);
            // The packs work within 128-bit lanes, undoing the interleave: columns 0-3 and 4-7,
            // then 8-15, then all 16 in order; saturation clamps to 0..=255 as `clip8`.
            let bytes = _mm512_packus_epi16(
                _mm512_packs_epi32(sum(0), sum(1)),
                _mm512_packs_epi32(sum(2), sum(3)),
            );
            _mm512_mask_storeu_epi8(out_row.add(bx) as *mut i8, mask, bytes);
            bx += 64;
        }
    }
}

/// Pair rows (see [`Axis::pair`]): each output byte is the rounded average of the two source
/// bytes above each other, a pattern the compiler turns into `pavgb` on any x86_64.
#[allow(clippy::too_many_arguments)]
fn vertical_pairs(
    src: &[u8],
    stride: usize,
    col: usize,
    width: usize,
    row_base: usize,
    axis: &Axis,
    y0: usize,
    out_rows: usize,
    out: &mut [u8],
) {
    for (y, out_row) in out[..out_rows * width].chunks_exact_mut(width).enumerate() {
        let a = (axis.pair[y0 + y] - row_base) * stride + col;
        let (top, bottom) = (&src[a..a + width], &src[a + stride..a + stride + width]);
        for ((o, &t), &b) in out_row.iter_mut().zip(top).zip(bottom) {
            *o = ((t as u16 + b as u16 + 1) >> 1) as u8;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn vertical_avx2(
    src: &[u8],
    stride: usize,
    col: usize,
    width: usize,
    row_base: usize,
    axis: &Axis,
    y0: usize,
    out_rows: usize,
    out: &mut [u8],
) {
    vertical_kernel(src, stride, col, width, row_base, axis, y0, out_rows, out)
}

/// Works on 32-byte column blocks so the 32 accumulators stay in registers across all taps, instead of
/// a whole accumulator row going through memory once per tap.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn vertical_kernel(
    src: &[u8],
    stride: usize,
    col: usize,
    width: usize,
    row_base: usize,
    axis: &Axis,
    y0: usize,
    out_rows: usize,
    out: &mut [u8],
) {
    const BLOCK: usize = 32;
    let c = &axis.c;
    for y in 0..out_rows {
        let i = y0 + y;
        let w = &c.weights[i * c.taps..i * c.taps + c.len[i]];
        let first = (c.start[i] - row_base) * stride + col;
        let out_row = &mut out[y * width..(y + 1) * width];
        let full = width / BLOCK * BLOCK;
        for bx in (0..full).step_by(BLOCK) {
            let mut acc = [HALF; BLOCK];
            for (k, &wk) in w.iter().enumerate() {
                let at = first + k * stride + bx;
                let row: &[u8; BLOCK] = src[at..at + BLOCK].try_into().unwrap();
                for j in 0..BLOCK {
                    acc[j] += row[j] as i32 * wk;
                }
            }
            for (o, &a) in out_row[bx..bx + BLOCK].iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
        if full < width {
            let tail = width - full;
            let mut acc = [HALF; BLOCK];
            for (k, &wk) in w.iter().enumerate() {
                let at = first + k * stride + full;
                for (a, &p) in acc[..tail].iter_mut().zip(&src[at..at + tail]) {
                    *a += p as i32 * wk;
                }
            }
            for (o, &a) in out_row[full..].iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
    }
}

/// The straightforward one-pixel-at-a-time port the fast kernels replaced; kept as their reference.
#[cfg(test)]
mod scalar {
    use super::{clip8, coefficients, vertical_first, Coefficients, Filter, HALF};
    use crate::demo::RgbImage;

    /// Resizes as `PIL.Image.resize((out_w, out_h), filter)` does on an RGB image.
    pub fn resize_pillow_scalar(
        src: &RgbImage,
        out_w: usize,
        out_h: usize,
        filter: Filter,
    ) -> RgbImage {
        if out_w == src.width && out_h == src.height {
            return src.clone();
        }
        let need_h = out_w != src.width;
        let need_v = out_h != src.height;
        if need_h && need_v && vertical_first(src.width, src.height, out_w, out_h) {
            let c = coefficients(src.height, out_h, filter);
            let after_v = resize_vertical(src, &c, 0, out_h);
            return resize_horizontal(&after_v, 0, out_h, out_w, filter);
        }
        let vertical = need_v.then(|| coefficients(src.height, out_h, filter));
        // Only the source rows some output row reads go through the horizontal pass.
        let (row_first, row_last) = match &vertical {
            Some(c) => (c.start[0], c.start[out_h - 1] + c.len[out_h - 1]),
            None => (0, src.height),
        };
        let horizontal_rows;
        let after_h: &RgbImage = if need_h {
            horizontal_rows = resize_horizontal(src, row_first, row_last, out_w, filter);
            &horizontal_rows
        } else {
            horizontal_rows = RgbImage {
                width: src.width,
                height: row_last - row_first,
                pixels: src.pixels[row_first * src.width * 3..row_last * src.width * 3].to_vec(),
            };
            &horizontal_rows
        };
        match vertical {
            Some(c) => resize_vertical(after_h, &c, row_first, out_h),
            None => after_h.clone(),
        }
    }

    fn resize_horizontal(
        src: &RgbImage,
        row_first: usize,
        row_last: usize,
        out_w: usize,
        filter: Filter,
    ) -> RgbImage {
        let c = coefficients(src.width, out_w, filter);
        let rows = row_last - row_first;
        let mut out = vec![0u8; rows * out_w * 3];
        for (y, out_row) in out.chunks_exact_mut(out_w * 3).enumerate() {
            let in_row =
                &src.pixels[(row_first + y) * src.width * 3..(row_first + y + 1) * src.width * 3];
            for (x, out_px) in out_row.chunks_exact_mut(3).enumerate() {
                let n = c.len[x];
                let w = &c.weights[x * c.taps..x * c.taps + n];
                // Zipped iterators instead of indexing: no bounds check in the inner loop.
                let taps = in_row[c.start[x] * 3..(c.start[x] + n) * 3].chunks_exact(3);
                let (mut r, mut g, mut b) = (HALF, HALF, HALF);
                for (p, &wk) in taps.zip(w) {
                    r += p[0] as i32 * wk;
                    g += p[1] as i32 * wk;
                    b += p[2] as i32 * wk;
                }
                out_px[0] = clip8(r);
                out_px[1] = clip8(g);
                out_px[2] = clip8(b);
            }
        }
        RgbImage {
            width: out_w,
            height: rows,
            pixels: out,
        }
    }

    /// `src` holds source rows from `row_first` on; the coefficients index full-image rows.
    fn resize_vertical(
        src: &RgbImage,
        c: &Coefficients,
        row_first: usize,
        out_h: usize,
    ) -> RgbImage {
        let stride = src.width * 3;
        let mut out = vec![0u8; out_h * stride];
        let mut acc = vec![0i32; stride];
        for (y, out_row) in out.chunks_exact_mut(stride).enumerate() {
            acc.fill(HALF);
            let w = &c.weights[y * c.taps..y * c.taps + c.len[y]];
            for (k, &wk) in w.iter().enumerate() {
                let row = c.start[y] + k - row_first;
                let in_row = &src.pixels[row * stride..(row + 1) * stride];
                for (a, &p) in acc.iter_mut().zip(in_row) {
                    *a += p as i32 * wk;
                }
            }
            for (o, &a) in out_row.iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
        RgbImage {
            width: src.width,
            height: out_h,
            pixels: out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_halving_averages_pairs() {
        let src = RgbImage {
            width: 4,
            height: 2,
            pixels: vec![
                0, 0, 0, 10, 20, 30, 100, 100, 100, 200, 200, 200, 0, 0, 0, 10, 20, 30, 100, 100,
                100, 200, 200, 200,
            ],
        };
        let out = resize_pillow(&src, 2, 1, Filter::Box);
        assert_eq!(out.pixels, [5, 10, 15, 150, 150, 150]);
    }

    /// xorshift64*: deterministic random sizes and pixels without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn random_image(rng: &mut Rng, width: usize, height: usize) -> RgbImage {
        // Mostly noise, with some flat runs so clamping at 0 and 255 after overshoot is exercised.
        let pixels = (0..width * height * 3)
            .map(|_| match rng.below(8) {
                0 => 0,
                1 => 255,
                _ => rng.next() as u8,
            })
            .collect();
        RgbImage {
            width,
            height,
            pixels,
        }
    }

    #[test]
    fn fast_kernels_match_the_scalar_port_byte_for_byte() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let filters = [Filter::Box, Filter::Bilinear, Filter::Bicubic];
        for case in 0..300 {
            let (w, h) = (1 + rng.below(90), 1 + rng.below(90));
            let img = random_image(&mut rng, w, h);
            // Shrinks by up to ~6×, enlargements, one axis unchanged, and the ADM box halving.
            let pick = |rng: &mut Rng, n: usize| match rng.below(5) {
                0 => n,
                1 => (n / 2).max(1),
                2 => 1 + rng.below(n),
                _ => 1 + rng.below(2 * n + 8),
            };
            let (ow, oh) = (pick(&mut rng, w), pick(&mut rng, h));
            let filter = filters[case % 3];
            let (cw, ch) = (1 + rng.below(ow), 1 + rng.below(oh));
            let (left, top) = (rng.below(ow - cw + 1), rng.below(oh - ch + 1));
            check_against_scalar(&img, ow, oh, filter, (left, top, cw, ch));
        }
    }

    /// The full resize equals the scalar port byte for byte, and a window of it computed alone
    /// (`resize_pillow_crop`) equals the same window cut from the scalar result.
    fn check_against_scalar(
        img: &RgbImage,
        ow: usize,
        oh: usize,
        filter: Filter,
        window: (usize, usize, usize, usize),
    ) {
        // Every kernel this CPU can run: with AVX-512 VBMI, the VNNI and AVX2 ones too.
        for limit in 0..3 {
            KERNEL_LIMIT.with(|c| c.set(limit));
            check_kernels_against_scalar(img, ow, oh, filter, window);
        }
        KERNEL_LIMIT.with(|c| c.set(0));
    }

    fn check_kernels_against_scalar(
        img: &RgbImage,
        ow: usize,
        oh: usize,
        filter: Filter,
        (left, top, cw, ch): (usize, usize, usize, usize),
    ) {
        let (w, h) = (img.width, img.height);
        let reference = scalar::resize_pillow_scalar(img, ow, oh, filter);
        let fast = resize_pillow(img, ow, oh, filter);
        assert_eq!((fast.width, fast.height), (ow, oh));
        assert!(
            fast.pixels == reference.pixels,
            "{filter:?} {w}x{h} -> {ow}x{oh}"
        );
        let window = resize_pillow_crop(img, ow, oh, filter, left, top, cw, ch);
        let cut: Vec<u8> = (top..top + ch)
            .flat_map(|y| reference.pixels[(y * ow + left) * 3..(y * ow + left + cw) * 3].to_vec())
            .collect();
        assert!(
            window.pixels == cut,
            "{filter:?} {w}x{h} -> {ow}x{oh} window {cw}x{ch} at ({left}, {top})"
        );
    }

    /// ADM-like sizes: wide rows (many 4-pixel groups and every tail length), 2:1 and odd box
    /// halvings, integer upscales (a weight of exactly 2^22), and crop windows touching the last row.
    #[test]
    fn simd_kernels_match_the_scalar_port_on_adm_like_sizes() {
        let mut rng = Rng(0x51ed_2701_a3c4_9b17);
        let filters = [Filter::Box, Filter::Bilinear, Filter::Bicubic];
        for case in 0..60 {
            let (w, h) = (40 + rng.below(360), 40 + rng.below(360));
            let img = random_image(&mut rng, w, h);
            let (ow, oh) = match case % 4 {
                0 => (w / 2, h / 2),
                1 => (3 * w / (2 + rng.below(4)), 3 * h / (2 + rng.below(4))),
                2 => (w * 3, h * 3),
                _ => (1 + rng.below(w + 100), 1 + rng.below(h + 100)),
            };
            // Every other halving is the ADM box halving (odd sizes: pairs with drifting starts).
            let filter = if case % 8 == 0 {
                Filter::Box
            } else {
                filters[rng.below(3)]
            };
            let (cw, ch) = (1 + rng.below(ow), 1 + rng.below(oh));
            let (left, top) = (rng.below(ow - cw + 1), oh - ch - rng.below(2).min(oh - ch));
            check_against_scalar(&img, ow, oh, filter, (left, top, cw, ch));
        }
    }

    #[test]
    fn weight_digits_rebuild_every_weight_they_can_hold() {
        let rebuild = |d: [i8; 3]| (d[0] as i32) * 65536 + (d[1] as i32) * 256 + d[2] as i32;
        // Three digits of -128..=127 span -128·65793 ..= 127·65793, about ±2^23 (Pillow's 1.0 is 2^22).
        let (min, max) = (-128 * 65793, 127 * 65793);
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let edges = [
            0,
            1,
            -1,
            127,
            128,
            -128,
            -129,
            1 << 22,
            -(1 << 22),
            min,
            max,
        ];
        let random = (0..10_000).map(|_| min + rng.below((max - min) as usize + 1) as i32);
        for k in edges.into_iter().chain(random) {
            let d = weight_digits(k).unwrap_or_else(|| panic!("{k} has no digits"));
            assert_eq!(rebuild(d), k);
        }
        assert_eq!(weight_digits(max + 1), None);
        assert_eq!(weight_digits(min - 1), None);
    }

    #[test]
    fn the_axis_cache_keeps_sizes_used_again_through_a_tail_of_one_off_sizes() {
        let mut cache = AxisCache::default();
        let key = |n: usize| (n, 256, Filter::Bicubic, 0, n, 0, 256);
        let make = |n: usize| move || Axis::new(n, 256, Filter::Bicubic);
        let hot = cache.get_or_insert_with(key(500), make(500));
        for one_off in 1000..1000 + 10 * AxisCache::KEEP {
            cache.get_or_insert_with(key(one_off), make(one_off));
            // The common size comes back every few images.
            if one_off % 4 == 0 {
                let again = cache.get_or_insert_with(key(500), make(500));
                assert!(
                    std::rc::Rc::ptr_eq(&hot, &again),
                    "recomputed after {one_off}"
                );
            }
            assert!(cache.entries.len() <= AxisCache::KEEP);
        }
    }

    #[test]
    fn odd_box_halving_is_mostly_pairs_and_exact() {
        // 375 → 187: scale 2.005, so the pairs' starts drift from 2i to 2i + 1 across the axis.
        let axis = Axis::new(375, 187, Filter::Box);
        assert!(axis.mostly_pairs(0, 187));
        assert_eq!(axis.pair[0], 0);
        assert_eq!(axis.pair[186], 373);
        assert!(axis.pair.contains(&NOT_PAIR));
        let mut rng = Rng(7);
        for (w, h) in [(501, 375), (375, 501), (333, 77)] {
            let img = random_image(&mut rng, w, h);
            check_against_scalar(
                &img,
                w / 2,
                h / 2,
                Filter::Box,
                (1, 2, w / 2 - 3, h / 2 - 2),
            );
        }
    }

    #[test]
    fn constant_image_stays_constant_under_every_filter() {
        let src = RgbImage {
            width: 37,
            height: 23,
            pixels: [9u8, 128, 251].repeat(37 * 23),
        };
        for filter in [Filter::Box, Filter::Bilinear, Filter::Bicubic] {
            for (w, h) in [(16, 10), (50, 40), (37, 11)] {
                let out = resize_pillow(&src, w, h, filter);
                assert_eq!((out.width, out.height), (w, h));
                assert!(
                    out.pixels.chunks_exact(3).all(|p| p == [9, 128, 251]),
                    "{filter:?} {w}x{h}"
                );
            }
        }
    }

    /// Resizes `src` placed by `at` under every kernel limit, returning for each whether it panicked.
    fn panics_under_every_kernel(
        src: &RgbImage,
        at: Placement,
        (out_w, out_h): (usize, usize),
        window: Rect,
    ) -> Vec<bool> {
        let r = (0..3)
            .map(|limit| {
                KERNEL_LIMIT.with(|c| c.set(limit));
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    resize_window_into(src, at, out_w, out_h, Filter::Bicubic, window, Vec::new())
                }))
                .is_err()
            })
            .collect();
        KERNEL_LIMIT.with(|c| c.set(0));
        r
    }

    /// An axis left at its size gets no `Axis::shifted` check, so the window must be checked against
    /// the source part directly: rows below it were zero-padded by `in_bounds_rows`, columns right of
    /// it read from the next row, and (release only) columns left of it wrapped `left - at.x` into an
    /// unchecked read before the buffer in `vertical_avx512`.
    #[test]
    fn a_window_outside_the_source_part_panics_on_an_unresized_axis() {
        let mut rng = Rng(11);
        let rect = |x, y, width, height| Rect {
            x,
            y,
            width,
            height,
        };
        // Horizontal only: output rows 2..6 of a part holding rows 0..4.
        let wide = random_image(&mut rng, 40, 4);
        let at = Placement {
            x: 0,
            y: 0,
            full_w: 40,
            full_h: 8,
        };
        let r = panics_under_every_kernel(&wide, at, (23, 8), rect(0, 2, 23, 4));
        assert_eq!(r, [true; 3], "rows past the part");
        // Vertical only: output columns 2..6 of a part holding columns 0..4, rows well inside.
        let tall = random_image(&mut rng, 4, 40);
        let at = Placement {
            x: 0,
            y: 0,
            full_w: 8,
            full_h: 40,
        };
        let r = panics_under_every_kernel(&tall, at, (8, 23), rect(2, 0, 4, 1));
        assert_eq!(r, [true; 3], "columns past the part");
        // Vertical only: columns 0..4 of a part holding columns 4..8.
        let at = Placement {
            x: 4,
            y: 0,
            full_w: 8,
            full_h: 40,
        };
        let r = panics_under_every_kernel(&tall, at, (8, 23), rect(0, 0, 4, 1));
        assert_eq!(r, [true; 3], "columns before the part");
        // Neither axis resized: a window reaching past the part's last column.
        let at = Placement {
            x: 0,
            y: 0,
            full_w: 8,
            full_h: 40,
        };
        let r = panics_under_every_kernel(&tall, at, (8, 40), rect(1, 0, 4, 2));
        assert_eq!(r, [true; 3], "copy past the part");
        // A part shorter than its size says.
        let mut short = random_image(&mut rng, 40, 6);
        short.pixels.truncate(40 * 5 * 3 + 7);
        let r =
            panics_under_every_kernel(&short, Placement::whole(&short), (23, 6), rect(0, 0, 23, 6));
        assert_eq!(r, [true; 3], "pixels shorter than width × height");
    }

    /// `permute_rows` stores whole 16-byte groups at column 15g, so every group but the last must
    /// hold five pixels; a count that only sums to `out_cols` is not enough.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_permute_kernel_checks_its_group_layout() {
        if !avx512_vbmi() {
            return;
        }
        let axis = Axis::new(20, 12, Filter::Bicubic);
        let mut t = axis.permute_tables(0, 6).expect("tables for 20 -> 12");
        assert_eq!(t.groups.iter().map(|g| g.1).collect::<Vec<_>>(), [5, 1]);
        (t.groups[0].1, t.groups[1].1) = (1, 5);
        // Room past the one output row, so the old kernel's overrun stays inside the buffer.
        let (src, mut out) = (vec![7u8; 256], vec![0u8; 64]);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            horizontal_permute_avx512(&src, 60, 1, &t, 6, &mut out)
        }));
        assert!(r.is_err(), "a 1-then-5 layout was run");
        assert!(out[18..].iter().all(|&b| b == 0), "stored past the row");
    }

    #[cfg(target_arch = "x86_64")]
    type MaddKernel = unsafe fn(&[u8], usize, usize, &Axis, &MaddWeights, usize, usize, &mut [u8]);

    /// The madd kernels' bounds check must cover the widest read of every output pixel, not only
    /// the last one's (window starts are monotonic by construction, but nothing enforced it).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_madd_kernels_check_every_window_start() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut axis = Axis::new(40, 23, Filter::Bicubic);
        let weights = axis.madd_weights(0, 4).expect("madd weights");
        let stride = 40 * 3;
        let max_read = axis.c.start[3] * 3 + weights.pairs * 6 + 4;
        axis.c.start[0] = 38;
        // `src` is exactly what the last start needs; the buffer behind it keeps an overrun defined.
        let backing = vec![1u8; 4096];
        let src = &backing[..max_read];
        let mut kernels: Vec<(&str, MaddKernel)> = vec![("avx2", horizontal_madd_avx2)];
        if avx512_vnni() {
            kernels.push(("avx512", horizontal_madd_avx512));
        }
        for (name, kernel) in kernels {
            let mut out = vec![0u8; 12];
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
                kernel(src, stride, 1, &axis, &weights, 0, 4, &mut out)
            }));
            assert!(
                r.is_err(),
                "{name}: read past `src` for a start before the last"
            );
        }
    }

    /// A vertical window above the rows `src` starts at wrapped `start - row_base` in release.
    #[test]
    fn the_vertical_kernels_reject_a_window_above_the_source_rows() {
        let axis = Axis::new(40, 23, Filter::Bicubic);
        let src = vec![0u8; 40 * 12];
        for limit in 0..3 {
            KERNEL_LIMIT.with(|c| c.set(limit));
            let mut out = vec![0u8; 12];
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                vertical_pass(&src, 12, 0, 12, axis.c.start[5] + 1, &axis, 5, 1, &mut out)
            }));
            assert!(r.is_err(), "limit {limit}");
        }
        KERNEL_LIMIT.with(|c| c.set(0));
    }

    /// One thread resizing sizes of 1..=3 pixels and larger ones in turn, with every window, so each
    /// cached axis (and its madd/permute tables, made for one window) meets the cases after it.
    #[test]
    fn tiny_and_mixed_sizes_on_one_thread_match_the_scalar_port() {
        let mut rng = Rng(0x0dd5_1e5e);
        let filters = [Filter::Box, Filter::Bilinear, Filter::Bicubic];
        let sizes = [1, 2, 3, 7, 64];
        for round in 0..2 {
            for &w in &sizes {
                for &h in &[1, 2, 3, 9] {
                    let img = random_image(&mut rng, w, h);
                    for &ow in &[1, 2, 3, 5, w] {
                        for (f, &filter) in filters.iter().enumerate() {
                            let oh = [1, 2, 3, h + 1][(w + f + round) % 4];
                            let (cw, ch) = (1 + rng.below(ow), 1 + rng.below(oh));
                            let (left, top) = (rng.below(ow - cw + 1), rng.below(oh - ch + 1));
                            check_against_scalar(&img, ow, oh, filter, (left, top, cw, ch));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn kernel_tables_are_used_only_for_the_window_they_were_made_for() {
        let cell = std::cell::OnceCell::new();
        assert_eq!(made_for(&cell, (3, 4), || Some(7)), Some(&7));
        assert_eq!(made_for(&cell, (3, 4), || Some(8)), Some(&7));
        assert_eq!(made_for(&cell, (3, 5), || Some(9)), None);
        assert_eq!(made_for(&cell, (0, 4), || Some(9)), None);
    }
}
