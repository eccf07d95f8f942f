//! The kernels in plain Rust. The multiply-add ones are the fallback where the CPU has no AVX2, and
//! are compiled a second time with AVX2 enabled (the wrappers in `avx2.rs`) so that the compiler can
//! vectorise their fixed-size inner loops with it; the pair-row average needs no intrinsics on any CPU.

use super::coeffs::{clip8, Axis, HALF};

/// Each source pixel is widened once per row to 4 i32 lanes (R, G, B, 0); an output pixel is then a
/// multiply-add of `padded` such pixels with their lane-repeated weights, two pixels (8 lanes, one
/// AVX2 register) per step, with no per-channel or per-tap branching.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn horizontal_kernel(
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

/// Pair rows (see [`Axis::pair`]): each output byte is the rounded average of the two source
/// bytes above each other, a pattern the compiler turns into `pavgb` on any x86_64.
#[allow(clippy::too_many_arguments)]
pub(super) fn vertical_pairs(
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

/// Works on 32-byte column blocks so the 32 accumulators stay in registers across all taps, instead of
/// a whole accumulator row going through memory once per tap.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn vertical_kernel(
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
