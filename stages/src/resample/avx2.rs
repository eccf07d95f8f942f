//! The AVX2 kernels: pair averaging and the madd horizontal kernel in intrinsics, and the portable
//! kernels compiled with AVX2 enabled. Their unchecked loads and stores rest on checks kept next to
//! them, asserted in release builds too ([`MaddWeights::checked_starts`] for both madd kernels, this
//! one and the VNNI one).

use super::coeffs::{rows_fit, Axis, MaddWeights, HALF, NOT_PAIR, PRECISION_BITS};
use super::portable::{horizontal_kernel, vertical_kernel};

/// Rows whose output pixels are mostly pairs (see [`Axis::pair`]): three output pixels per step
/// when their pairs are adjacent (starts s, s + 2, s + 4: bytes j and j + 3 of 18 source bytes are
/// averaged with `pavgb` and bytes 0-2, 6-8, 12-14 kept), any other pixel on its own, a pair as the
/// rounded average and a wider window as its exact fixed-point sum.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn horizontal_pairs_avx2(
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
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn horizontal_madd_avx2(
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

/// One output pixel of the rows at `r0` (lane 0) and `r1` (lane 1): the window starting at byte `s`,
/// weights at `w`; returns the rounded sum shifted down to the 8-bit range (not yet clamped).
///
/// # Safety
/// AVX2; bytes `s .. s + pairs·6 + 4` readable from both rows and `pairs·16` i16 from `w`.
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
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bcast(p: *const i16) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the caller passes a pointer to 8 readable i16.
    _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i))
}

#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn horizontal_avx2(
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

#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn vertical_avx2(
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

impl MaddWeights {
    /// The window starts of output pixels `x0 .. x0 + out_cols`, after the checks the madd kernels'
    /// unchecked reads and writes rest on: every row's widest read (any window plus padding)
    /// inside the source, a weight block per output pixel and pair, room for every output row.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn checked_starts<'a>(
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
