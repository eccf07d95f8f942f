//! The two reference crops, on decoded RGB images.
//!
//! * ADM `center_crop_arr` (guided-diffusion, copied by DiT, REPA, MAR, LightningDiT): box-halve while
//!   the short side is ≥ 2×size, one bicubic resize that makes the short side equal size (the long side
//!   rounded half-to-even, as Python's `round`), then a floor-centred square crop.
//! * TARFlow's torchvision `Resize(size)` + `CenterCrop(size)` on a PIL image: bilinear (antialiased)
//!   resize of the short side to size with the long side truncated (`int(size * long / short)`), then
//!   a crop whose offsets are `round((H - size) / 2)` (again half-to-even).

use serde::{Deserialize, Serialize};

use crate::demo::RgbImage;
use crate::resample::{resize_pillow, resize_window_into, source_span, Filter, Placement, Rect};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropMode {
    /// ADM / DiT / REPA `center_crop_arr`.
    Adm,
    /// torchvision `Resize(size)` + `CenterCrop(size)`, as ml-tarflow's training transform.
    ResizeCenterCrop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeImpl {
    /// Bit-exact with Pillow (its resampler's arithmetic in SIMD kernels, on a region decode).
    Pillow,
    /// fast_image_resize for the bicubic/bilinear step: within ~5 levels of Pillow (mean ≈ 0.2).
    Fast,
}

/// Resizes with the chosen implementation.
pub fn resize(
    src: &RgbImage,
    out_w: usize,
    out_h: usize,
    filter: Filter,
    imp: ResizeImpl,
) -> RgbImage {
    match imp {
        ResizeImpl::Pillow => resize_pillow(src, out_w, out_h, filter),
        ResizeImpl::Fast => resize_fast(src, out_w, out_h, filter),
    }
}

fn resize_fast(src: &RgbImage, out_w: usize, out_h: usize, filter: Filter) -> RgbImage {
    use fast_image_resize as fr;
    if out_w == src.width && out_h == src.height {
        return src.clone();
    }
    let filter_type = match filter {
        Filter::Box => fr::FilterType::Box,
        Filter::Bilinear => fr::FilterType::Bilinear,
        // CatmullRom is the a = -0.5 Keys cubic, i.e. PIL BICUBIC (Mitchell is not).
        Filter::Bicubic => fr::FilterType::CatmullRom,
    };
    let src_view = fr::images::ImageRef::new(
        src.width as u32,
        src.height as u32,
        &src.pixels,
        fr::PixelType::U8x3,
    )
    .expect("buffer matches its dimensions");
    let mut dst = fr::images::Image::new(out_w as u32, out_h as u32, fr::PixelType::U8x3);
    let options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(filter_type));
    fr::Resizer::new()
        .resize(&src_view, &mut dst, &options)
        .expect("same pixel type on both sides");
    RgbImage {
        width: out_w,
        height: out_h,
        pixels: dst.into_vec(),
    }
}

/// The square `size` crop at (left, top).
pub fn crop(src: &RgbImage, left: usize, top: usize, size: usize) -> RgbImage {
    let mut pixels = Vec::with_capacity(size * size * 3);
    for y in top..top + size {
        let row = (y * src.width + left) * 3;
        pixels.extend_from_slice(&src.pixels[row..row + size * 3]);
    }
    RgbImage {
        width: size,
        height: size,
        pixels,
    }
}

/// One crop as Pillow runs it on a `width`×`height` image: resizes in turn, then the `size` square
/// at (left, top) of the last one. Walking the steps backwards gives the window of each step's output
/// that the next one reads, and the source rectangle the whole crop reads (all a region decode has to
/// deliver): the exact path computes only those windows, the same bytes as resizing fully.
#[derive(Debug, Clone, PartialEq)]
pub struct CropPlan {
    width: usize,
    height: usize,
    /// (out_w, out_h, filter) of each resize, in order.
    steps: Vec<(usize, usize, Filter)>,
    /// Per step, the window of its output that is computed; the last is the crop itself.
    windows: Vec<Rect>,
    /// The source pixels the crop reads.
    source: Rect,
}

impl CropPlan {
    pub fn new(mode: CropMode, width: usize, height: usize, size: usize) -> CropPlan {
        let (mut steps, mut w, mut h) = (Vec::new(), width, height);
        let (left, top) = match mode {
            CropMode::Adm => {
                // Box-halve while the short side is ≥ 2×size, then one bicubic resize that makes the
                // short side equal size, the long side rounded half to even (Python's `round`).
                while w.min(h) >= 2 * size {
                    (w, h) = (w / 2, h / 2);
                    steps.push((w, h, Filter::Box));
                }
                let scale = size as f64 / w.min(h) as f64;
                (w, h) = (
                    (w as f64 * scale).round_ties_even() as usize,
                    (h as f64 * scale).round_ties_even() as usize,
                );
                steps.push((w, h, Filter::Bicubic));
                ((w - size) / 2, (h - size) / 2)
            }
            CropMode::ResizeCenterCrop => {
                // The long side truncated (`int(size * long / short)`), offsets rounded half to even.
                let (short, long) = (w.min(h), w.max(h));
                let new_long = (size as f64 * long as f64 / short as f64) as usize;
                (w, h) = if w <= h {
                    (size, new_long)
                } else {
                    (new_long, size)
                };
                steps.push((w, h, Filter::Bilinear));
                let offset =
                    |extent: usize| ((extent - size) as f64 / 2.0).round_ties_even() as usize;
                (offset(w), offset(h))
            }
        };
        let mut need = Rect {
            x: left,
            y: top,
            width: size,
            height: size,
        };
        let mut windows = vec![need; steps.len()];
        for j in (0..steps.len()).rev() {
            windows[j] = need;
            let (in_w, in_h) = if j == 0 {
                (width, height)
            } else {
                (steps[j - 1].0, steps[j - 1].1)
            };
            let (out_w, out_h, filter) = steps[j];
            let (x0, x1) = source_span(in_w, out_w, filter, need.x, need.width);
            let (y0, y1) = source_span(in_h, out_h, filter, need.y, need.height);
            need = Rect {
                x: x0,
                y: y0,
                width: x1 - x0,
                height: y1 - y0,
            };
        }
        CropPlan {
            width,
            height,
            steps,
            windows,
            source: need,
        }
    }

    /// The source pixels the crop reads.
    pub fn source(&self) -> Rect {
        self.source
    }

    /// Runs the crop, bit-exact with Pillow, on `src` placed by `at` in the image the plan was made
    /// for; `src` must contain [`CropPlan::source`].
    pub fn run(&self, src: &RgbImage, at: Placement) -> RgbImage {
        assert_eq!(
            (at.full_w, at.full_h),
            (self.width, self.height),
            "the plan is for another image size"
        );
        // Intermediate results go to two per-thread buffers used in turn (a large allocation per image
        // costs page faults, which also serialise threads); only the result is a new allocation.
        let mut spare = INTERMEDIATE.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
        let mut cur = std::borrow::Cow::Borrowed(src);
        let mut at = at;
        let last = self.steps.len() - 1;
        for (j, (&(out_w, out_h, filter), &win)) in self.steps.iter().zip(&self.windows).enumerate()
        {
            let buf = if j < last {
                std::mem::take(&mut spare[j % 2])
            } else {
                Vec::new()
            };
            let next = resize_window_into(&cur, at, out_w, out_h, filter, win, buf);
            at = Placement {
                x: win.x,
                y: win.y,
                full_w: out_w,
                full_h: out_h,
            };
            if let std::borrow::Cow::Owned(done) =
                std::mem::replace(&mut cur, std::borrow::Cow::Owned(next))
            {
                // The step before last's output, read by this step: back to its slot.
                spare[(j + 1) % 2] = done.pixels;
            }
        }
        for buf in &mut spare {
            if buf.capacity() > crate::resample::KEEP_BYTES {
                *buf = Vec::new();
            }
        }
        INTERMEDIATE.with(|cell| *cell.borrow_mut() = spare);
        cur.into_owned()
    }
}

thread_local! {
    static INTERMEDIATE: std::cell::RefCell<[Vec<u8>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// ADM `center_crop_arr(pil_image, size)`.
pub fn center_crop_adm(src: &RgbImage, size: usize, imp: ResizeImpl) -> RgbImage {
    crop_image(src, CropMode::Adm, size, imp)
}

/// torchvision `CenterCrop(size)(Resize(size)(pil_image))`.
pub fn resize_center_crop(src: &RgbImage, size: usize, imp: ResizeImpl) -> RgbImage {
    crop_image(src, CropMode::ResizeCenterCrop, size, imp)
}

pub fn crop_image(src: &RgbImage, mode: CropMode, size: usize, imp: ResizeImpl) -> RgbImage {
    let plan = CropPlan::new(mode, src.width, src.height, size);
    match imp {
        ResizeImpl::Pillow => plan.run(src, Placement::whole(src)),
        ResizeImpl::Fast => plan.run_fast(src),
    }
}

impl CropPlan {
    /// The crop with fast_image_resize for the last (bicubic or bilinear) step on the whole image.
    /// Box halvings stay on the exact port: they read 2-3 taps, so it costs little there, and
    /// fast_image_resize's 16-bit weights would add their error before the last step adds its own.
    fn run_fast(&self, src: &RgbImage) -> RgbImage {
        let mut img = std::borrow::Cow::Borrowed(src);
        let (last, halvings) = self.steps.split_last().expect("a plan has a last resize");
        for &(w, h, filter) in halvings {
            img = std::borrow::Cow::Owned(resize_pillow(&img, w, h, filter));
        }
        let win = self.windows[self.windows.len() - 1];
        crop(
            &resize_fast(&img, last.0, last.1, last.2),
            win.x,
            win.y,
            win.width,
        )
    }
}

/// The horizontal mirror image (the flip view).
pub fn hflip(src: &RgbImage) -> RgbImage {
    let mut pixels = Vec::with_capacity(src.pixels.len());
    for row in src.pixels.chunks_exact(src.width * 3) {
        for px in row.chunks_exact(3).rev() {
            pixels.extend_from_slice(px);
        }
    }
    RgbImage {
        width: src.width,
        height: src.height,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::draw_sample;

    #[test]
    fn adm_crop_geometry_for_imagenet_like_sizes() {
        let img = RgbImage {
            width: 500,
            height: 375,
            pixels: vec![77; 500 * 375 * 3],
        };
        for size in [256, 64] {
            for imp in [ResizeImpl::Pillow, ResizeImpl::Fast] {
                let out = center_crop_adm(&img, size, imp);
                assert_eq!((out.width, out.height), (size, size));
                assert!(out.pixels.iter().all(|&p| p == 77));
            }
        }
    }

    #[test]
    fn a_plan_run_on_its_source_rectangle_alone_gives_the_whole_image_crop() {
        for (i, (w, h)) in [
            (500, 375),
            (375, 500),
            (333, 500),
            (1024, 683),
            (97, 300),
            (64, 64),
        ]
        .into_iter()
        .enumerate()
        {
            let mut img = draw_sample(1, i as u64, i);
            img = resize_pillow(&img, w, h, Filter::Bilinear);
            for (mode, size) in [
                (CropMode::Adm, 256),
                (CropMode::Adm, 64),
                (CropMode::ResizeCenterCrop, 64),
            ] {
                let plan = CropPlan::new(mode, w, h, size);
                let r = plan.source();
                assert!(r.x + r.width <= w && r.y + r.height <= h);
                let part = RgbImage {
                    width: r.width,
                    height: r.height,
                    pixels: (r.y..r.y + r.height)
                        .flat_map(|y| {
                            img.pixels[(y * w + r.x) * 3..(y * w + r.x + r.width) * 3].to_vec()
                        })
                        .collect(),
                };
                let at = Placement {
                    x: r.x,
                    y: r.y,
                    full_w: w,
                    full_h: h,
                };
                assert_eq!(
                    plan.run(&part, at),
                    crop_image(&img, mode, size, ResizeImpl::Pillow),
                    "{mode:?} {size} of {w}x{h} from {r:?}"
                );
            }
        }
    }

    #[test]
    fn fast_resize_stays_within_a_few_levels_of_exact() {
        let img = draw_sample(0, 5, 3);
        let exact = center_crop_adm(&img, 64, ResizeImpl::Pillow);
        let fast = center_crop_adm(&img, 64, ResizeImpl::Fast);
        let max = exact
            .pixels
            .iter()
            .zip(&fast.pixels)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(max <= 3, "max |Δ| {max}");
    }

    #[test]
    fn resize_center_crop_and_flip_shapes() {
        let img = draw_sample(0, 6, 1);
        let out = resize_center_crop(&img, 48, ResizeImpl::Pillow);
        assert_eq!((out.width, out.height), (48, 48));
        let flipped = hflip(&out);
        assert_eq!(&flipped.pixels[0..3], &out.pixels[47 * 3..48 * 3]);
        assert_eq!(hflip(&flipped), out);
    }
}
