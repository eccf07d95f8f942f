//! The straightforward one-pixel-at-a-time port the fast kernels replaced; kept as their reference.

use super::coeffs::{clip8, coefficients, vertical_first, Coefficients, Filter, HALF};
use crate::demo::RgbImage;

/// Resizes as `PIL.Image.resize((out_w, out_h), filter)` does on an RGB image.
pub(super) fn resize_pillow_scalar(
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
fn resize_vertical(src: &RgbImage, c: &Coefficients, row_first: usize, out_h: usize) -> RgbImage {
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
