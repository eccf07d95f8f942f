//! Image decoding, Pillow-equivalent: the format is sniffed from the bytes (ImageNet holds a PNG named
//! `.JPEG`), JPEG goes through libjpeg-turbo (bit-identical to Pillow's decoder), PNG through `image`,
//! and everything ends as 8-bit RGB the way Pillow's `convert("RGB")` makes it: grayscale replicated,
//! alpha dropped, 4-channel JPEGs read as Adobe-inverted CMYK. No EXIF rotation, as Pillow applies none.

use std::cell::RefCell;

use crate::bad_input::BadKind;
use crate::demo::RgbImage;

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

thread_local! {
    // One libjpeg-turbo handle per thread: creating one per image costs more than a small decode.
    static DECOMPRESSOR: RefCell<Option<turbojpeg::Decompressor>> = const { RefCell::new(None) };
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
    if bytes.is_empty() {
        return Err(DecodeError::new(
            BadKind::EmptyImage,
            "image member is empty",
        ));
    }
    match sniff(bytes) {
        ImageFormat::Jpeg => DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(turbojpeg::Decompressor::new().map_err(|e| {
                    DecodeError::new(
                        BadKind::UndecodableImage,
                        format!("libjpeg-turbo init: {e}"),
                    )
                })?);
            }
            decode_jpeg(
                slot.as_mut().expect("just set"),
                bytes,
                max_pixels,
                min_short_side,
            )
        }),
        ImageFormat::Png => decode_png(bytes, max_pixels),
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
fn jpeg_failure(bytes: &[u8], e: turbojpeg::Error) -> DecodeError {
    let ends_with_eoi = bytes.len() >= 2 && bytes[bytes.len() - 2..] == [0xFF, 0xD9];
    if ends_with_eoi {
        DecodeError::new(BadKind::UndecodableImage, format!("jpeg: {e}"))
    } else {
        DecodeError::new(
            BadKind::TruncatedImage,
            format!("jpeg ends before its EOI marker: {e}"),
        )
    }
}

fn decode_jpeg(
    decompressor: &mut turbojpeg::Decompressor,
    bytes: &[u8],
    max_pixels: u64,
    min_short_side: usize,
) -> Result<RgbImage, DecodeError> {
    decompressor
        .set_scaling_factor(turbojpeg::ScalingFactor::ONE)
        .map_err(|e| jpeg_failure(bytes, e))?;
    let header = decompressor
        .read_header(bytes)
        .map_err(|e| jpeg_failure(bytes, e))?;
    check_bomb(header.width, header.height, max_pixels)?;
    let mut header = header;
    if min_short_side > 0 {
        let short = header.width.min(header.height);
        for denom in [8usize, 4, 2] {
            if short >= denom * min_short_side {
                let factor = turbojpeg::ScalingFactor::new(1, denom);
                decompressor
                    .set_scaling_factor(factor)
                    .map_err(|e| jpeg_failure(bytes, e))?;
                header = header.scaled(factor);
                break;
            }
        }
    }
    let (width, height) = (header.width, header.height);
    let four_channel = matches!(
        header.colorspace,
        turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
    );
    if !four_channel {
        let mut pixels = vec![0u8; width * height * 3];
        let image = turbojpeg::Image {
            pixels: pixels.as_mut_slice(),
            width,
            pitch: width * 3,
            height,
            format: turbojpeg::PixelFormat::RGB,
        };
        decompressor
            .decompress(bytes, image)
            .map_err(|e| jpeg_failure(bytes, e))?;
        return Ok(RgbImage {
            width,
            height,
            pixels,
        });
    }
    // libjpeg-turbo cannot convert CMYK to RGB; decode the raw ink values and convert as Pillow does.
    let mut cmyk = vec![0u8; width * height * 4];
    let image = turbojpeg::Image {
        pixels: cmyk.as_mut_slice(),
        width,
        pitch: width * 4,
        height,
        format: turbojpeg::PixelFormat::CMYK,
    };
    decompressor
        .decompress(bytes, image)
        .map_err(|e| jpeg_failure(bytes, e))?;
    Ok(RgbImage {
        width,
        height,
        pixels: adobe_cmyk_to_rgb(&cmyk),
    })
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
