//! The AVX-512 VBMI horizontal kernel: `vpermb` gathers every tap of five output pixels from one
//! 64-byte load, `vpdpbusd` (VNNI) weighs them.

use super::coeffs::{rows_fit, PermuteTables, PERMUTE_GROUP, PERMUTE_MAX_QUADS};
use super::vnni::digit_sums;

/// Horizontal pass with one 64-byte load per row and group of five output pixels: `vpermb` moves
/// each pixel's taps, four at a time, into the i32 lane of its channel, and `vpdpbusd` multiplies
/// them by the weights' three signed base-256 digits (u8 × i8, four products per lane), so no
/// widening, per-pixel loads or inserts are needed; a group's tables stay in registers while the loop
/// walks down a block of rows. Integer sums are exact in any order (and modulo 2^32 on the way), so
/// the bytes are those of the other kernels.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI/VBMI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(super) unsafe fn horizontal_permute_avx512(
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

/// [`horizontal_permute_avx512`] for `Q` quads of taps (a constant, so the tables live in
/// registers).
///
/// # Safety
/// As [`horizontal_permute_avx512`].
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

impl PermuteTables {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resample::coeffs::{Axis, Filter};

    /// `permute_rows` stores whole 16-byte groups at column 15g, so every group but the last must
    /// hold five pixels; a count that only sums to `out_cols` is not enough.
    #[test]
    fn the_permute_kernel_checks_its_group_layout() {
        // Runs only where the kernel can: on a CPU with every feature it is compiled for.
        let vbmi = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vbmi");
        if !vbmi {
            return;
        }
        let axis = Axis::new(20, 12, Filter::Bicubic);
        let mut t = axis.permute_tables(0, 6).expect("tables for 20 -> 12");
        assert_eq!(t.groups.iter().map(|g| g.1).collect::<Vec<_>>(), [5, 1]);
        (t.groups[0].1, t.groups[1].1) = (1, 5);
        // Room past the one output row, so the old kernel's overrun stays inside the buffer.
        let (src, mut out) = (vec![7u8; 256], vec![0u8; 64]);
        // SAFETY: only reached where VBMI is detected (above); the swapped group sizes trip the
        // layout check before any load, and the buffers hold the old overrun besides.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            horizontal_permute_avx512(&src, 60, 1, &t, 6, &mut out)
        }));
        assert!(r.is_err(), "a 1-then-5 layout was run");
        assert!(out[18..].iter().all(|&b| b == 0), "stored past the row");
    }
}
