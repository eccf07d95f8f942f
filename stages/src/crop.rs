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
use crate::resample::{resize_pillow, resize_pillow_crop, Filter};

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
    /// Bit-exact with Pillow (scalar port of its resampler).
    Pillow,
    /// fast_image_resize (SIMD) for the bicubic/bilinear step: within 4 levels of Pillow (mean ≈ 0.2).
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

/// The `size` square at (left, top) of the image resized to `out_w`×`out_h`. The exact path computes
/// only the pixels inside the square (the same bytes as resizing fully, then cropping).
#[allow(clippy::too_many_arguments)]
fn resize_then_crop(
    src: &RgbImage,
    out_w: usize,
    out_h: usize,
    filter: Filter,
    imp: ResizeImpl,
    left: usize,
    top: usize,
    size: usize,
) -> RgbImage {
    match imp {
        ResizeImpl::Pillow => resize_pillow_crop(src, out_w, out_h, filter, left, top, size, size),
        ResizeImpl::Fast => crop(&resize_fast(src, out_w, out_h, filter), left, top, size),
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

/// ADM `center_crop_arr(pil_image, size)`.
pub fn center_crop_adm(src: &RgbImage, size: usize, imp: ResizeImpl) -> RgbImage {
    let mut img = std::borrow::Cow::Borrowed(src);
    while img.width.min(img.height) >= 2 * size {
        // Box halving reads 2-3 taps, so the exact port costs little here; fast_image_resize's 16-bit
        // weights would add their error before the bicubic adds its own.
        let halved = resize_pillow(&img, img.width / 2, img.height / 2, Filter::Box);
        img = std::borrow::Cow::Owned(halved);
    }
    let scale = size as f64 / img.width.min(img.height) as f64;
    let (w, h) = (
        (img.width as f64 * scale).round_ties_even() as usize,
        (img.height as f64 * scale).round_ties_even() as usize,
    );
    let (top, left) = ((h - size) / 2, (w - size) / 2);
    resize_then_crop(&img, w, h, Filter::Bicubic, imp, left, top, size)
}

/// torchvision `CenterCrop(size)(Resize(size)(pil_image))`.
pub fn resize_center_crop(src: &RgbImage, size: usize, imp: ResizeImpl) -> RgbImage {
    let (short, long) = (src.width.min(src.height), src.width.max(src.height));
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    let (w, h) = if src.width <= src.height {
        (size, new_long)
    } else {
        (new_long, size)
    };
    let offset = |extent: usize| ((extent - size) as f64 / 2.0).round_ties_even() as usize;
    resize_then_crop(src, w, h, Filter::Bilinear, imp, offset(w), offset(h), size)
}

pub fn crop_image(src: &RgbImage, mode: CropMode, size: usize, imp: ResizeImpl) -> RgbImage {
    match mode {
        CropMode::Adm => center_crop_adm(src, size, imp),
        CropMode::ResizeCenterCrop => resize_center_crop(src, size, imp),
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
