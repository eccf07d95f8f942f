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
//!
//! Where things are: `coeffs.rs` has the arithmetic Pillow defines (filters, tap windows, fixed-point
//! weights, pass order) and the layouts of those weights for the kernels; `portable.rs`, `avx2.rs`,
//! `vnni.rs` and `vbmi.rs` the kernels, each with the asserts its unchecked memory accesses rest on;
//! `scalar.rs` the plain port the tests hold them to; this file the public API and the choice of
//! kernel for the CPU at hand.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod coeffs;
mod portable;
#[cfg(test)]
mod scalar;
#[cfg(target_arch = "x86_64")]
mod vbmi;
#[cfg(target_arch = "x86_64")]
mod vnni;

pub use coeffs::Filter;

use crate::demo::RgbImage;
use coeffs::{cached_axis, rows_fit, vertical_first, Axis, Geometry, NOT_PAIR};
use portable::{horizontal_kernel, vertical_kernel, vertical_pairs};
#[cfg(target_arch = "x86_64")]
use {
    avx2::{horizontal_avx2, horizontal_madd_avx2, horizontal_pairs_avx2, vertical_avx2},
    vbmi::horizontal_permute_avx512,
    vnni::{horizontal_madd_avx512, vertical_avx512},
};

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

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use crate::resample::coeffs::MaddWeights;
    use crate::rng::SplitMix64;

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

    /// Reproducible random sizes and pixels, drawn in the `usize` sizes are counted in.
    struct Rng(SplitMix64);
    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(SplitMix64::new(seed))
        }
        fn next(&mut self) -> u64 {
            self.0.next_u64()
        }
        fn below(&mut self, n: usize) -> usize {
            self.0.below(n as u64) as usize
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
        let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
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
        let mut rng = Rng::new(0x51ed_2701_a3c4_9b17);
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
    fn odd_box_halving_is_mostly_pairs_and_exact() {
        // 375 → 187: scale 2.005, so the pairs' starts drift from 2i to 2i + 1 across the axis.
        let axis = Axis::new(375, 187, Filter::Box);
        assert!(axis.mostly_pairs(0, 187));
        assert_eq!(axis.pair[0], 0);
        assert_eq!(axis.pair[186], 373);
        assert!(axis.pair.contains(&NOT_PAIR));
        let mut rng = Rng::new(7);
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
        let mut rng = Rng::new(11);
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
            // SAFETY: the CPU has each kernel's features (only detected kernels are listed); the
            // planted start makes the kernel's release-mode check fail before any load, and the
            // 4 KiB behind `src` keeps even an unchecked overrun inside this allocation.
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
        let mut rng = Rng::new(0x0dd5_1e5e);
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
