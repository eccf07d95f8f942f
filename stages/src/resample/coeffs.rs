//! What Pillow computes for an axis before it reads a pixel: the filter kernels, every output pixel's
//! tap window and 22-bit fixed-point weights, and the pass order; then the same weights laid out for
//! the fast kernels, and the per-thread cache that makes all of it once per image size.

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

pub(super) const PRECISION_BITS: u32 = 22;

/// Tap windows and fixed-point weights for one axis: output pixel i reads inputs
/// `start[i] .. start[i] + len[i]` with `weights[i * taps ..]`.
pub(super) struct Coefficients {
    pub(super) start: Vec<usize>,
    pub(super) len: Vec<usize>,
    pub(super) taps: usize,
    pub(super) weights: Vec<i32>,
}

/// The geometry of one axis's resize: the scale, the filter's support in source pixels and the most
/// taps a window can have.
pub(super) struct Geometry {
    scale: f64,
    inv_filter_scale: f64,
    support: f64,
    taps: usize,
    in_size: usize,
}

impl Geometry {
    pub(super) fn new(in_size: usize, out_size: usize, filter: Filter) -> Geometry {
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
    pub(super) fn window(&self, i: usize) -> (f64, usize, usize) {
        let center = (i as f64 + 0.5) * self.scale;
        // C's (int) cast truncates toward zero; both values are ≥ -0.5 + 0.5 here except near 0.
        let lo = ((center - self.support + 0.5) as i64).max(0) as usize;
        let hi = ((center + self.support + 0.5) as i64).min(self.in_size as i64) as usize;
        (center, lo, hi.max(lo))
    }
}

pub(super) fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
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
pub(super) fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

pub(super) const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// One axis's coefficients laid out for the fast kernels: every window padded with zero weights to
/// `padded` taps (even, so the horizontal kernel reads whole 2-pixel groups), and for the horizontal
/// pass each weight repeated over the 4 lanes of an RGB0 pixel. Integer sums do not depend on their
/// order, so splitting them over lanes and accumulators changes no output byte.
pub(super) struct Axis {
    pub(super) c: Coefficients,
    pub(super) padded: usize,
    /// The madd kernels' weights for the one window of output pixels (first, n) they were made
    /// for, kept with a cached axis.
    pub(super) madd: std::cell::OnceCell<Option<(usize, usize, MaddWeights)>>,
    /// The permute kernel's tables, likewise for one window of output pixels.
    pub(super) permute: std::cell::OnceCell<Option<(usize, usize, PermuteTables)>>,
    /// Whether the `vpdpbusd` kernels can take every weight ([`Axis::fits_digits`]).
    digits_fit: std::cell::OnceCell<bool>,
    /// Per output pixel: the first of two source pixels if its window, once zero weights are
    /// dropped, is exactly those two weighted 2^21 each (its fixed-point sum then reduces to
    /// `(a + b + 1) >> 1`, `pavgb`); [`NOT_PAIR`] otherwise. A box shrink by 2 is all pairs, and a box
    /// shrink of an odd size (scale just above 2) is pairs whose start drifts by one pixel across the
    /// axis, plus the odd three-pixel window.
    pub(super) pair: Vec<usize>,
}

pub(super) const NOT_PAIR: usize = usize::MAX;

impl Axis {
    pub(super) fn new(in_size: usize, out_size: usize, filter: Filter) -> Axis {
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
    pub(super) fn mostly_pairs(&self, x0: usize, n: usize) -> bool {
        let pairs = self.pair[x0..x0 + n]
            .iter()
            .filter(|&&s| s != NOT_PAIR)
            .count();
        4 * pairs >= 3 * n
    }

    /// Output pixel i's exact fixed-point sum over the bytes `at(k)` of its window's taps.
    #[inline]
    pub(super) fn weighted(&self, i: usize, at: impl Fn(usize) -> u8) -> u8 {
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
    ///
    /// [`horizontal_madd_avx2`]: super::avx2::horizontal_madd_avx2
    pub(super) fn madd_weights(&self, x0: usize, n: usize) -> Option<MaddWeights> {
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

    pub(super) fn lane_weights(&self) -> Vec<i32> {
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

pub(super) struct MaddWeights {
    pub(super) w: Vec<i16>,
    pub(super) pairs: usize,
}

impl MaddWeights {
    /// The most bytes a row's read reaches from its start for output pixels `x0 .. x0 + out_cols`:
    /// the furthest window start (the last, as starts never decrease, but taken as the maximum so
    /// that no bound rests on that) plus `pairs` pairs of pixels and the 16-byte load's spare bytes.
    pub(super) fn max_read(&self, axis: &Axis, x0: usize, out_cols: usize) -> usize {
        let furthest = axis.c.start[x0..x0 + out_cols]
            .iter()
            .max()
            .map_or(0, |&s| s);
        furthest * 3 + self.pairs * 6 + 4
    }
}

/// The most taps the permute kernel handles, in quads (4 taps per `vpdpbusd` lane).
pub(super) const PERMUTE_MAX_QUADS: usize = 3;

/// Output pixels per group of the permute kernel: 15 of a register's 16 i32 lanes, one per channel.
pub(super) const PERMUTE_GROUP: usize = 5;

/// Tables of [`horizontal_permute_avx512`]: output pixels in groups of five, each group reading the
/// 64 source bytes from its first pixel's window start, which hold every tap of all five windows
/// when the scale is below about 2.5 (so every ADM bicubic step).
///
/// [`horizontal_permute_avx512`]: super::vbmi::horizontal_permute_avx512
pub(super) struct PermuteTables {
    pub(super) quads: usize,
    /// Per group: its first source byte (3 × the first window's start) and its output pixels (1..=5).
    pub(super) groups: Vec<(usize, usize)>,
    /// Per group and quad: the 64-byte `vpermb` index that fills i32 lane 3j + c with taps
    /// 4q .. 4q + 4 of channel c of the group's pixel j.
    pub(super) index: Vec<[u8; 64]>,
    /// Per group and quad: the signed base-256 digits of the weights matching `index` (each
    /// weight k = 2^16·a + 2^8·b + c), the 64 a's, then the b's, then the c's.
    pub(super) digits: Vec<[i8; 192]>,
}

impl PermuteTables {
    /// The most bytes a row's loads reach from its start: 64 from the furthest group's first byte.
    pub(super) fn max_read(&self) -> usize {
        self.groups.iter().map(|g| g.0).max().map_or(0, |b| b) + 64
    }
}

/// k as 2^16·a + 2^8·b + c with every digit in -128..=127, or `None` if a does not fit.
pub(super) fn weight_digits(k: i32) -> Option<[i8; 3]> {
    let c = (k.wrapping_add(128) & 0xff) - 128;
    let k1 = (k - c) >> 8;
    let b = (k1.wrapping_add(128) & 0xff) - 128;
    let a = (k1 - b) >> 8;
    Some([i8::try_from(a).ok()?, b as i8, c as i8])
}

impl Axis {
    /// Whether every weight of the axis has three base-256 digits (only a weight near 2^23 or
    /// beyond, twice Pillow's 2^22 for 1.0, would not); worked out once per axis.
    pub(super) fn fits_digits(&self) -> bool {
        *self
            .digits_fit
            .get_or_init(|| self.c.weights.iter().all(|&w| weight_digits(w).is_some()))
    }

    /// The permute kernel's tables for output pixels `x0 .. x0 + n`, or `None` when a group's taps
    /// do not fit in 64 bytes, there are too many taps, or a weight is too large for three digits.
    pub(super) fn permute_tables(&self, x0: usize, n: usize) -> Option<PermuteTables> {
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

/// Whether `rows` rows, `stride` bytes apart, can each read `max_read` bytes from their start in a
/// buffer of `len` bytes (overflow counts as no).
pub(super) fn rows_fit(len: usize, stride: usize, rows: usize, max_read: usize) -> bool {
    rows == 0
        || (rows - 1)
            .checked_mul(stride)
            .and_then(|n| n.checked_add(max_read))
            .is_some_and(|n| n <= len)
}

/// Pillow 13's choice of pass order (see the [module docs](super)).
pub(super) fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let (shrink_w, shrink_h) = (out_w < in_w, out_h < in_h);
    match (shrink_w, shrink_h) {
        (true, true) => 2 * (in_w - out_w) < in_h - out_h,
        (false, true) => true,
        _ => false,
    }
}

/// The axis of a resize from `in_size` to `out_size` for output pixels `first .. first + n`, its
/// source positions counted from `origin` of a part of `len` pixels ([`Axis::shifted`]), from a
/// per-thread cache: the crop plan and decode region depend on the image size alone, and most of
/// ImageNet comes in a few sizes, so the weights (and the kernels' tables) are mostly made once per
/// size.
pub(super) fn cached_axis(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn weight_digits_rebuild_every_weight_they_can_hold() {
        let rebuild = |d: [i8; 3]| (d[0] as i32) * 65536 + (d[1] as i32) * 256 + d[2] as i32;
        // Three digits of -128..=127 span -128·65793 ..= 127·65793, about ±2^23 (Pillow's 1.0 is 2^22).
        let (min, max) = (-128 * 65793, 127 * 65793);
        let mut rng = SplitMix64::new(0x2545_f491_4f6c_dd1d);
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
        let random = (0..10_000).map(|_| min + rng.below((max - min) as u64 + 1) as i32);
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
}
