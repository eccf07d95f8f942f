//! Image decoding, Pillow-equivalent: the format is sniffed from the bytes (ImageNet holds a PNG named
//! `.JPEG`), JPEG goes through libjpeg-turbo (bit-identical to Pillow's decoder), PNG through `image`,
//! and everything ends as 8-bit RGB the way Pillow's `convert("RGB")` makes it: grayscale replicated,
//! alpha dropped, 4-channel JPEGs read as Adobe-inverted CMYK. No EXIF rotation, as Pillow applies none.

use crate::bad_input::BadKind;
use crate::demo::RgbImage;
use crate::jpeg::{Header, Jpeg};
use crate::resample::{Placement, Rect};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    Unknown,
}

pub fn sniff(bytes: &[u8]) -> ImageFormat {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        ImageFormat::Jpeg
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        ImageFormat::Png
    } else {
        ImageFormat::Unknown
    }
}

/// Why an image member could not be decoded; maps one-to-one onto a [`BadKind`].
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub kind: BadKind,
    pub detail: String,
}

impl DecodeError {
    fn new(kind: BadKind, detail: impl Into<String>) -> Self {
        DecodeError {
            kind,
            detail: detail.into(),
        }
    }
}

/// Decodes to RGB8. `max_pixels` bounds width × height, checked from the header before allocating.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    decode_rgb_scaled(bytes, max_pixels, 0)
}

/// As [`decode_rgb`], but a JPEG whose short side is at least 2×, 4× or 8× `min_short_side` is decoded
/// at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's `draft()`): faster, not Pillow-exact.
/// `min_short_side` 0 always decodes at full size.
pub fn decode_rgb_scaled(
    bytes: &[u8],
    max_pixels: u64,
    min_short_side: usize,
) -> Result<RgbImage, DecodeError> {
    decode_rgb_window(bytes, max_pixels, min_short_side, |_, _| None).map(|(image, _)| image)
}

/// As [`decode_rgb_scaled`], but only the part of the (scaled) image that `need(width, height)` asks
/// for has to be right: a JPEG is decoded from a region around it (a margin wider than libjpeg-turbo's
/// upsampling reaches, the left edge on an iMCU boundary), which leaves out the inverse DCT,
/// upsampling and colour conversion left and right of it and everything below it. The pixels inside
/// `need` are those of a full decode. The placement says where the decoded part sits. PNGs, CMYK
/// JPEGs and JPEGs without their end marker (so that truncation is still reported) are decoded whole.
pub fn decode_rgb_window(
    bytes: &[u8],
    max_pixels: u64,
    min_short_side: usize,
    need: impl FnOnce(usize, usize) -> Option<Rect>,
) -> Result<(RgbImage, Placement), DecodeError> {
    decode_rgb_window_into(bytes, max_pixels, min_short_side, need, Vec::new())
}

/// [`decode_rgb_window`] into `buf`'s allocation where it can (a JPEG not in CMYK), so that a caller
/// can keep reusing one buffer instead of allocating, and faulting in, a large one per image.
pub fn decode_rgb_window_into(
    bytes: &[u8],
    max_pixels: u64,
    min_short_side: usize,
    need: impl FnOnce(usize, usize) -> Option<Rect>,
    buf: Vec<u8>,
) -> Result<(RgbImage, Placement), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::new(
            BadKind::EmptyImage,
            "image member is empty",
        ));
    }
    match sniff(bytes) {
        ImageFormat::Jpeg => {
            // A decompressor per image (0.2 µs to make): libjpeg keeps the quantisation and Huffman
            // tables of one image for the next (for abbreviated streams), so a reused one decodes a
            // JPEG that lacks its tables with some earlier image's, where Pillow fails.
            let mut jpeg = Jpeg::new(max_pixels).map_err(|e| {
                DecodeError::new(
                    BadKind::UndecodableImage,
                    format!("libjpeg-turbo init: {e}"),
                )
            })?;
            decode_jpeg(&mut jpeg, bytes, max_pixels, min_short_side, need, buf)
        }
        ImageFormat::Png => {
            let image = decode_png(bytes, max_pixels)?;
            let at = Placement::whole(&image);
            Ok((image, at))
        }
        ImageFormat::Unknown => Err(DecodeError::new(
            BadKind::GarbageImage,
            format!(
                "not a JPEG or PNG (first bytes {:02x?})",
                &bytes[..bytes.len().min(8)]
            ),
        )),
    }
}

fn check_bomb(width: usize, height: usize, max_pixels: u64) -> Result<(), DecodeError> {
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(DecodeError::new(
            BadKind::DecompressionBomb,
            format!("{width}x{height} = {pixels} pixels exceeds the limit of {max_pixels} (data.max_pixels)"),
        ));
    }
    Ok(())
}

/// libjpeg-turbo reports a file cut short as a warning-turned-error; without the EOI marker we call it
/// truncated, everything else undecodable.
fn jpeg_failure(bytes: &[u8], e: String) -> DecodeError {
    if ends_with_eoi(bytes) {
        DecodeError::new(BadKind::UndecodableImage, format!("jpeg: {e}"))
    } else {
        DecodeError::new(
            BadKind::TruncatedImage,
            format!("jpeg ends before its EOI marker: {e}"),
        )
    }
}

fn ends_with_eoi(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && bytes[bytes.len() - 2..] == [0xFF, 0xD9]
}

/// The region to decode for `need` in a `width`×`height` (scaled) image, or None for all of it.
fn decode_region(
    header: &Header,
    denom: usize,
    width: usize,
    height: usize,
    need: Rect,
) -> Option<Rect> {
    // Fancy upsampling reads the chroma samples next to a pixel's own (up to 4 pixels away for 4:1:1)
    // and treats the region's edges as the image's. 8 pixels of margin keeps that away (2 are
    // enough on the test's images); the left edge then moves down to an iMCU boundary.
    let mcu = header.mcu_width?.div_ceil(denom).max(1);
    let margin = 8;
    let x = need.x.saturating_sub(margin) / mcu * mcu;
    let y = need.y.saturating_sub(margin);
    let right = need
        .x
        .saturating_add(need.width)
        .saturating_add(margin)
        .min(width);
    let bottom = need
        .y
        .saturating_add(need.height)
        .saturating_add(margin)
        .min(height);
    // A need outside the image (a caller's mistake) decodes all of it rather than nothing.
    if right <= x || bottom <= y {
        return None;
    }
    let region = Rect {
        x,
        y,
        width: right - x,
        height: bottom - y,
    };
    (region.width < width || region.height < height).then_some(region)
}

fn decode_jpeg(
    jpeg: &mut Jpeg,
    bytes: &[u8],
    max_pixels: u64,
    min_short_side: usize,
    need: impl FnOnce(usize, usize) -> Option<Rect>,
    buf: Vec<u8>,
) -> Result<(RgbImage, Placement), DecodeError> {
    let frame = jpeg
        .read_header(bytes)
        .map_err(|e| jpeg_failure(bytes, e))?;
    let header = *frame.header();
    check_bomb(header.width, header.height, max_pixels)?;
    let short = header.width.min(header.height);
    // libjpeg ignores the scaling factor of a lossless JPEG: those are decoded at full size.
    let denom = [8usize, 4, 2]
        .into_iter()
        .find(|&d| !header.lossless && min_short_side > 0 && short >= d * min_short_side)
        .unwrap_or(1);
    let (full_w, full_h) = (header.width.div_ceil(denom), header.height.div_ceil(denom));
    let region = match need(full_w, full_h) {
        Some(need) if header.croppable() && !header.four_channel && ends_with_eoi(bytes) => {
            decode_region(&header, denom, full_w, full_h, need)
        }
        _ => None,
    };
    let mut pixels = buf;
    let r = match frame.decode(denom, region, &mut pixels) {
        Ok(r) => r,
        Err(e) if region.is_none() => return Err(jpeg_failure(bytes, e)),
        // A sampling libjpeg-turbo names but cannot crop: the whole image, as Pillow would decode
        // it; a broken one fails again and is reported from the full decode.
        Err(_) => jpeg
            .read_header(bytes)
            .and_then(|frame| frame.decode(denom, None, &mut pixels))
            .map_err(|e| jpeg_failure(bytes, e))?,
    };
    if header.four_channel {
        // libjpeg-turbo cannot convert CMYK to RGB; it gave the raw ink values, converted as Pillow does.
        pixels = adobe_cmyk_to_rgb(&pixels);
    }
    let image = RgbImage {
        width: r.width,
        height: r.height,
        pixels,
    };
    let at = Placement {
        x: r.x,
        y: r.y,
        full_w,
        full_h,
    };
    Ok((image, at))
}

/// Pillow opens every 4-channel JPEG with raw mode `CMYK;I` (Adobe's inverted storage) and converts
/// CMYK→RGB as `r = 255 - k' - c·(255 - k')/255` with its rounding `MULDIV255`. With the stored
/// (inverted) values s = 255 - x that becomes the formula below.
pub fn adobe_cmyk_to_rgb(stored: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut out = Vec::with_capacity(stored.len() / 4 * 3);
    for px in stored.chunks_exact(4) {
        let nk = px[3] as i32; // 255 - (255 - stored k)
        for &s in &px[..3] {
            let c = 255 - s as i32;
            out.push((nk - muldiv255(c, nk)).clamp(0, 255) as u8);
        }
    }
    out
}

fn decode_png(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    use image::ImageDecoder;
    let truncated_or_bad = |e: image::ImageError| {
        let text = e.to_string();
        let has_iend = bytes.windows(4).rev().take(64).any(|w| w == b"IEND");
        if has_iend {
            DecodeError::new(BadKind::UndecodableImage, format!("png: {text}"))
        } else {
            DecodeError::new(
                BadKind::TruncatedImage,
                format!("png ends before IEND: {text}"),
            )
        }
    };
    let decoder = image::codecs::png::PngDecoder::new(std::io::Cursor::new(bytes))
        .map_err(truncated_or_bad)?;
    let (w, h) = decoder.dimensions();
    check_bomb(w as usize, h as usize, max_pixels)?;
    let color = decoder.color_type();
    let mut raw = vec![0u8; decoder.total_bytes() as usize];
    decoder.read_image(&mut raw).map_err(truncated_or_bad)?;
    let (width, height) = (w as usize, h as usize);
    use image::ColorType as C;
    // 16-bit samples: Pillow keeps the most significant byte (raw modes `RGB;16B`, `RGBA;16B`);
    // `image` hands them over in native byte order.
    let hi = |chunk: &[u8]| u16::from_ne_bytes([chunk[0], chunk[1]]) >> 8;
    let pixels: Vec<u8> = match color {
        C::Rgb8 => raw,
        C::Rgba8 => raw
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        C::L8 => raw.iter().flat_map(|&v| [v, v, v]).collect(),
        C::La8 => raw
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        C::Rgb16 => raw.chunks_exact(2).map(|c| hi(c) as u8).collect(),
        // Pillow opens 16-bit grayscale as mode `I;16`, whose RGB conversion clips at 255 instead of
        // scaling; 16-bit gray+alpha opens as `LA` from the most significant byte.
        C::L16 => raw
            .chunks_exact(2)
            .flat_map(|c| {
                let v = u16::from_ne_bytes([c[0], c[1]]).min(255) as u8;
                [v, v, v]
            })
            .collect(),
        C::La16 => raw
            .chunks_exact(4)
            .flat_map(|p| {
                let v = hi(&p[0..2]) as u8;
                [v, v, v]
            })
            .collect(),
        C::Rgba16 => raw
            .chunks_exact(8)
            .flat_map(|p| [hi(&p[0..2]) as u8, hi(&p[2..4]) as u8, hi(&p[4..6]) as u8])
            .collect(),
        other => {
            return Err(DecodeError::new(
                BadKind::UndecodableImage,
                format!("png colour type {other:?} is not supported"),
            ));
        }
    };
    Ok(RgbImage {
        width,
        height,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{draw_sample, encode_jpeg};
    use crate::rng::SplitMix64;

    #[test]
    fn sniffs_by_content_not_name() {
        let img = draw_sample(0, 1, 0);
        let jpeg = encode_jpeg(&img, 90, false).unwrap();
        assert_eq!(sniff(&jpeg), ImageFormat::Jpeg);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest"), ImageFormat::Png);
        assert_eq!(sniff(b"GIF89a"), ImageFormat::Unknown);
        let decoded = decode_rgb(&jpeg, 64_000_000).unwrap();
        assert_eq!((decoded.width, decoded.height), (img.width, img.height));
    }

    #[test]
    fn bad_bytes_map_to_their_kind() {
        let jpeg = encode_jpeg(&draw_sample(0, 2, 1), 90, false).unwrap();
        assert_eq!(
            decode_rgb(&[], 1 << 30).unwrap_err().kind,
            BadKind::EmptyImage
        );
        assert_eq!(
            decode_rgb(b"hello world", 1 << 30).unwrap_err().kind,
            BadKind::GarbageImage
        );
        assert_eq!(
            decode_rgb(&jpeg[..jpeg.len() / 2], 1 << 30)
                .unwrap_err()
                .kind,
            BadKind::TruncatedImage
        );
        assert_eq!(
            decode_rgb(&jpeg, 1000).unwrap_err().kind,
            BadKind::DecompressionBomb
        );
        let mut corrupt = jpeg[..40].to_vec();
        corrupt.extend_from_slice(&[0xFF, 0xD9]);
        assert_eq!(
            decode_rgb(&corrupt, 1 << 30).unwrap_err().kind,
            BadKind::UndecodableImage
        );
    }

    /// Noise with some smooth areas: every chroma sample differs from its neighbours, so any pixel the
    /// upsampling near a region edge gets wrong shows.
    fn noisy_jpeg(
        width: usize,
        height: usize,
        subsamp: turbojpeg::Subsamp,
        progressive: bool,
    ) -> Vec<u8> {
        let mut rng = SplitMix64::new((width * 31 + height) as u64);
        let pixels = (0..width * height * 3)
            .map(|i| {
                if (i / 3 / width) % 40 < 20 {
                    rng.next_u64() as u8
                } else {
                    (i / 3 % width) as u8
                }
            })
            .collect::<Vec<u8>>();
        let mut c = turbojpeg::Compressor::new().unwrap();
        c.set_quality(92).unwrap();
        c.set_subsamp(subsamp).unwrap();
        c.set_progressive(progressive).unwrap();
        c.compress_to_vec(turbojpeg::Image {
            pixels: pixels.as_slice(),
            width,
            pitch: width * 3,
            height,
            format: turbojpeg::PixelFormat::RGB,
        })
        .unwrap()
    }

    #[test]
    fn a_region_decode_equals_the_full_decode_inside_the_needed_rectangle() {
        use turbojpeg::Subsamp::*;
        let mut cropped = 0;
        for (case, subsamp) in [Sub2x2, Sub2x1, Sub1x2, None, Sub4x1, Gray]
            .into_iter()
            .enumerate()
        {
            for progressive in [false, true] {
                let (w, h) = (301 + 37 * case, 203 + 29 * case);
                let jpeg = noisy_jpeg(w, h, subsamp, progressive);
                for min_short in [0, 50, 100] {
                    let full = decode_rgb_scaled(&jpeg, u64::MAX, min_short).unwrap();
                    let (fw, fh) = (full.width, full.height);
                    let needs = [
                        (fw / 4, fh / 5, fw / 2, fh / 2),
                        (0, 0, fw / 3, fh / 3),
                        (fw - fw / 3, fh - fh / 4, fw / 3, fh / 4),
                        (fw / 2 + 3, 1, 5, fh - 2),
                        (17, fh / 2, fw - 30, 7),
                    ];
                    for (x, y, rw, rh) in needs {
                        let need = Rect {
                            x,
                            y,
                            width: rw,
                            height: rh,
                        };
                        let (part, at) =
                            decode_rgb_window(&jpeg, u64::MAX, min_short, |_, _| Some(need))
                                .unwrap();
                        assert_eq!((at.full_w, at.full_h), (fw, fh));
                        assert!(at.x <= x && at.y <= y);
                        assert!(at.x + part.width >= x + rw && at.y + part.height >= y + rh);
                        cropped += usize::from(part.width * part.height < fw * fh);
                        for row in y..y + rh {
                            let a = (row * fw + x) * 3;
                            let b = ((row - at.y) * part.width + x - at.x) * 3;
                            assert!(
                                full.pixels[a..a + rw * 3] == part.pixels[b..b + rw * 3],
                                "{subsamp:?} progressive {progressive} 1/{} need {need:?} from {at:?}: row {row} differs",
                                w / fw
                            );
                        }
                    }
                }
            }
        }
        assert!(cropped > 100, "only {cropped} decodes were of a region");
    }

    #[test]
    fn a_jpeg_that_cannot_be_cropped_is_decoded_whole() {
        // libjpeg-turbo decodes lossless JPEGs but cannot crop them.
        let img = draw_sample(0, 4, 1);
        let mut c = turbojpeg::Compressor::new().unwrap();
        c.set_lossless(true).unwrap();
        let jpeg = c
            .compress_to_vec(turbojpeg::Image {
                pixels: img.pixels.as_slice(),
                width: img.width,
                pitch: img.width * 3,
                height: img.height,
                format: turbojpeg::PixelFormat::RGB,
            })
            .unwrap();
        let need = Rect {
            x: img.width / 3,
            y: img.height / 3,
            width: img.width / 3,
            height: img.height / 3,
        };
        let (part, at) = decode_rgb_window(&jpeg, u64::MAX, 0, |_, _| Some(need)).unwrap();
        assert_eq!(
            (at.x, at.y, part.width, part.height),
            (0, 0, img.width, img.height)
        );
        assert_eq!(part, decode_rgb(&jpeg, u64::MAX).unwrap());
    }

    #[test]
    fn dct_scaling_applies_only_when_the_source_is_large_enough() {
        let img = draw_sample(0, 3, 2);
        let jpeg = encode_jpeg(&img, 90, false).unwrap();
        let short = img.width.min(img.height);
        let full = decode_rgb_scaled(&jpeg, 1 << 30, short).unwrap();
        assert_eq!(full.width, img.width);
        let half = decode_rgb_scaled(&jpeg, 1 << 30, short / 2).unwrap();
        assert_eq!(half.width, img.width.div_ceil(2));
    }
}
