//! The AVX-512 VNNI kernels: the madd horizontal kernel four rows per register with `vpdpwssd`, and
//! the vertical kernel multiplying bytes by the weights' base-256 digits with `vpdpbusd`.

use super::coeffs::{weight_digits, Axis, MaddWeights, HALF, PRECISION_BITS};

/// [`horizontal_madd_avx2`] with four rows per register (one per 128-bit lane) and `vpdpwssd`, which
/// multiplies and adds to the accumulator in one instruction; each lane's 12 output bytes go out with
/// one masked store. The same sums as the AVX2 kernel, so the same bytes.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI; as [`horizontal_madd_avx2`].
///
/// [`horizontal_madd_avx2`]: super::avx2::horizontal_madd_avx2
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn horizontal_madd_avx512(
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

/// The fixed-point sums from the per-digit sums of the `vpdpbusd` kernels (Σp·a, Σp·b, Σp·c for
/// weights 2^16·a + 2^8·b + c), rounded and shifted down to the 8-bit range, not yet clamped. The
/// i32 adds wrap, but the true sum fits an i32, so the result is exact.
///
/// # Safety
/// AVX-512 F.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn digit_sums(
    a: std::arch::x86_64::__m512i,
    b: std::arch::x86_64::__m512i,
    c: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let high = _mm512_add_epi32(_mm512_slli_epi32::<16>(a), _mm512_slli_epi32::<8>(b));
    let acc = _mm512_add_epi32(high, _mm512_add_epi32(c, _mm512_set1_epi32(HALF)));
    _mm512_srai_epi32::<PRECISION_BITS>(acc)
}

/// The vertical pass with `vpdpbusd`: four taps (source rows k .. k + 4) at a time, their bytes
/// interleaved so each i32 lane holds one column's four, multiplied (u8 × i8) by the weights' three
/// signed base-256 digits as in [`horizontal_permute_avx512`]; 64 output bytes per step, the last
/// partial step through masked loads and stores (which never touch bytes outside the mask). Integer
/// sums, exact in any order, so the bytes of the scalar port.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI.
///
/// [`horizontal_permute_avx512`]: super::vbmi::horizontal_permute_avx512
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn vertical_avx512(
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
