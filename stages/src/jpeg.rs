//! A thin safe layer over libjpeg-turbo's TurboJPEG 3 API (`turbojpeg-sys`), for what the
//! `turbojpeg` crate does not expose: decoding only a region of the image (`tj3SetCroppingRegion`),
//! which skips the inverse DCT, upsampling and colour conversion of the columns left and right of
//! it and all work below it. The pixels inside are the ones a full decode gives (checked in
//! `crate::decode`'s tests), given a margin for the upsampling at the region's edges.
//!
//! The bytes are untrusted (ImageNet holds truncated, corrupt and hostile members), so the output
//! buffer is never sized from state an earlier image could have left behind:
//! - TurboJPEG keeps the decompressor mid-header when `tj3DecompressHeader` fails, and the next
//!   header call then continues that parse: it "succeeds" without reading the new image and leaves
//!   the width and height of whatever came before (issue 14: a 23-byte header without a scan, then
//!   a good JPEG decoded into a zero-byte buffer). Any error therefore replaces the handle.
//! - A tables-only stream also "succeeds" without setting the dimensions; so the frame header's
//!   dimensions are read from the bytes here as well and must agree with TurboJPEG's.
//! - Lossless JPEGs ignore the scaling factor (libjpeg disables DCT scaling for them), so asking for
//!   1/2 would write a full-size image into a half-size buffer: refused.

use std::ffi::{c_int, CStr};

use turbojpeg_sys as raw;

pub use crate::resample::Rect;

/// Progressive scans a JPEG may have. Each scan is another pass over every coefficient, so a small
/// file with thousands of them is a denial of service (libjpeg-turbo's own fuzzers stop at 500; a
/// normal progressive JPEG has about ten).
pub const SCAN_LIMIT: c_int = 500;

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub width: usize,
    pub height: usize,
    /// CMYK or YCCK: decoded as raw ink values (libjpeg-turbo cannot make RGB of them).
    pub four_channel: bool,
    /// Width of one iMCU column in full-size pixels (8, 16 or 32); None when the chroma subsampling
    /// is one TurboJPEG cannot name, in which case no region can be set.
    pub mcu_width: Option<usize>,
    /// A lossless (SOF3) JPEG: decoded only whole and at full size.
    pub lossless: bool,
}

impl Header {
    /// Bytes a pixel in the decoder's output: RGB, or CMYK for four-channel JPEGs.
    pub fn channels(&self) -> usize {
        if self.four_channel {
            4
        } else {
            3
        }
    }

    /// Whether a region of the image can be decoded on its own.
    pub fn croppable(&self) -> bool {
        !self.lossless && self.mcu_width.is_some()
    }
}

/// One TurboJPEG decompressor (not thread-safe). Any libjpeg-turbo error destroys it and the next
/// header read makes a new one, so every image starts from a clean state. It still keeps an image's quantisation and
/// Huffman tables for the next one (libjpeg's abbreviated streams): `crate::decode` makes one per
/// image.
pub struct Jpeg {
    /// Null after an error destroyed it, until [`Jpeg::read_header`] makes the next one.
    handle: raw::tjhandle,
    max_pixels: c_int,
}

/// A header that has just been read: the only way to decode, so that the decode runs on the same
/// bytes, with the dimensions read from them, and nothing in between could change the handle.
pub struct Frame<'a> {
    jpeg: &'a mut Jpeg,
    bytes: &'a [u8],
    header: Header,
}

fn new_handle(max_pixels: c_int) -> Result<raw::tjhandle, String> {
    // SAFETY: plain constructor; a null handle is the error case, checked below.
    let handle = unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as c_int) };
    if handle.is_null() {
        return Err("libjpeg-turbo: cannot create a decompressor".into());
    }
    let params = [
        (raw::TJPARAM_TJPARAM_SCANLIMIT, SCAN_LIMIT),
        (raw::TJPARAM_TJPARAM_MAXPIXELS, max_pixels),
        // Every warning fails the image anyway (TurboJPEG returns -1 after it); stopping at the first
        // one keeps a small corrupt file from costing a full decode of its declared size.
        (raw::TJPARAM_TJPARAM_STOPONWARNING, 1),
        // No ICC profile copies: nothing here uses them.
        (raw::TJPARAM_TJPARAM_SAVEMARKERS, 0),
    ];
    for (param, value) in params {
        // SAFETY: the handle is valid (checked above); setting a parameter has no other precondition.
        if unsafe { raw::tj3Set(handle, param as c_int, value) } != 0 {
            // SAFETY: created above, destroyed once, not used after.
            unsafe { raw::tj3Destroy(handle) };
            return Err(format!(
                "libjpeg-turbo: cannot set parameter {param} to {value}"
            ));
        }
    }
    Ok(handle)
}

impl Jpeg {
    /// A decompressor that refuses images of more than `max_pixels` pixels itself too, before it
    /// allocates for them (0 or anything above `c_int::MAX`: no limit of its own).
    pub fn new(max_pixels: u64) -> Result<Jpeg, String> {
        let max_pixels = c_int::try_from(max_pixels).unwrap_or(0);
        Ok(Jpeg {
            handle: new_handle(max_pixels)?,
            max_pixels,
        })
    }

    /// The handle's error message; the handle is then destroyed, since libjpeg-turbo leaves it in
    /// whatever state the error interrupted (see the module docs).
    fn fail(&mut self) -> String {
        if self.handle.is_null() {
            return "libjpeg-turbo: no decompressor".into();
        }
        // SAFETY: the handle is valid; libjpeg-turbo returns a NUL-terminated string it owns, copied
        // here before the handle is destroyed.
        let message = unsafe { CStr::from_ptr(raw::tj3GetErrorStr(self.handle)) }
            .to_string_lossy()
            .into_owned();
        self.discard();
        message
    }

    fn discard(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: the handle came from tj3Init, is destroyed once and nulled right after.
            unsafe { raw::tj3Destroy(self.handle) };
            self.handle = std::ptr::null_mut();
        }
    }

    fn get(&self, handle: raw::tjhandle, param: raw::TJPARAM) -> c_int {
        // SAFETY: `handle` is this decompressor's live handle; reading a parameter has no other
        // precondition.
        unsafe { raw::tj3Get(handle, param as c_int) }
    }

    /// Reads the header of `bytes`; decoding goes through the returned frame.
    pub fn read_header<'a>(&'a mut self, bytes: &'a [u8]) -> Result<Frame<'a>, String> {
        if self.handle.is_null() {
            self.handle = new_handle(self.max_pixels)?;
        }
        let handle = self.handle;
        let frame = frame_header(bytes)?;
        let len = raw::size_t::try_from(bytes.len()).map_err(|_| "image member too large")?;
        // SAFETY: the handle is valid and `bytes` is a live slice of the given length; libjpeg only
        // reads it. What an earlier image left in the handle (tables, parameters; never a half-read
        // header, since errors destroy the handle) can change what is reported, not memory safety,
        // and the dimensions that size a buffer are cross-checked against the bytes below.
        let rc = unsafe { raw::tj3DecompressHeader(handle, bytes.as_ptr(), len) };
        if rc != 0 {
            return Err(self.fail());
        }
        let dim = |param| usize::try_from(self.get(handle, param)).ok();
        let (width, height) = (
            dim(raw::TJPARAM_TJPARAM_JPEGWIDTH),
            dim(raw::TJPARAM_TJPARAM_JPEGHEIGHT),
        );
        let lossless = self.get(handle, raw::TJPARAM_TJPARAM_LOSSLESS) != 0;
        if width != Some(frame.width) || height != Some(frame.height) || lossless != frame.lossless
        {
            // The header call did not read this frame (a tables-only stream, or a state no test has
            // found): nothing it reports can size a buffer.
            self.discard();
            return Err(format!(
                "frame header says {}x{}{}, libjpeg-turbo {width:?}x{height:?}{}",
                frame.width,
                frame.height,
                if frame.lossless { " lossless" } else { "" },
                if lossless { " lossless" } else { "" },
            ));
        }
        let precision = self.get(handle, raw::TJPARAM_TJPARAM_PRECISION);
        if precision != 8 {
            // tj3Decompress8 cannot write other precisions; Pillow's 8-bit libjpeg cannot read them.
            return Err(format!(
                "{precision}-bit samples (only 8-bit JPEGs are decoded)"
            ));
        }
        let colorspace = self.get(handle, raw::TJPARAM_TJPARAM_COLORSPACE) as raw::TJCS;
        let subsamp = self.get(handle, raw::TJPARAM_TJPARAM_SUBSAMP);
        // TurboJPEG's `tjMCUWidth` for 4:4:4, 4:2:2, 4:2:0, gray, 4:4:0, 4:1:1, 4:4:1 (the static
        // array itself is not exported by the static library).
        const MCU_WIDTH: [usize; 7] = [8, 16, 16, 8, 8, 32, 8];
        let mcu_width = usize::try_from(subsamp)
            .ok()
            .and_then(|s| MCU_WIDTH.get(s).copied());
        let header = Header {
            width: frame.width,
            height: frame.height,
            four_channel: colorspace == raw::TJCS_TJCS_CMYK || colorspace == raw::TJCS_TJCS_YCCK,
            mcu_width,
            lossless,
        };
        Ok(Frame {
            jpeg: self,
            bytes,
            header,
        })
    }
}

impl Frame<'_> {
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Decodes `region` (in pixels of the image scaled by 1/`denom`, 1, 2, 4 or 8; None = all of
    /// it) into `out` ([`Header::channels`] bytes a pixel, rows packed), replacing its contents.
    /// `region.x` must be a multiple of the scaled iMCU width. Returns the rectangle decoded.
    pub fn decode(
        self,
        denom: usize,
        region: Option<Rect>,
        out: &mut Vec<u8>,
    ) -> Result<Rect, String> {
        let Frame {
            jpeg,
            bytes,
            header,
        } = self;
        // Non-null: `read_header` made or kept it and returned this frame without an error since.
        let handle = jpeg.handle;
        if ![1, 2, 4, 8].contains(&denom) {
            return Err(format!("scaling 1/{denom} is not one libjpeg-turbo offers"));
        }
        if header.lossless && denom != 1 {
            return Err("a lossless JPEG cannot be decoded scaled".into());
        }
        let (full_w, full_h) = (header.width.div_ceil(denom), header.height.div_ceil(denom));
        let whole = Rect {
            x: 0,
            y: 0,
            width: full_w,
            height: full_h,
        };
        let r = region.unwrap_or(whole);
        if r.width == 0
            || r.height == 0
            || r.x.checked_add(r.width).is_none_or(|right| right > full_w)
            || r.y
                .checked_add(r.height)
                .is_none_or(|bottom| bottom > full_h)
        {
            return Err(format!(
                "region {r:?} is not inside the {full_w}x{full_h} image"
            ));
        }
        let cropped = r != whole;
        if cropped {
            let Some(mcu) = header.mcu_width.filter(|_| !header.lossless) else {
                return Err("this JPEG cannot be decoded in part".into());
            };
            let mcu = mcu.div_ceil(denom);
            if !r.x.is_multiple_of(mcu) {
                return Err(format!(
                    "region x {} is not a multiple of the iMCU width {mcu}",
                    r.x
                ));
            }
        }
        let as_int = |n: usize| c_int::try_from(n).map_err(|_| format!("{n} does not fit a C int"));
        // A zero region means "the whole image" to TurboJPEG, and a zero width or height "up to the
        // edge": the region is only ever set non-empty and inside the image (checked above).
        let crop = if cropped {
            raw::tjregion {
                x: as_int(r.x)?,
                y: as_int(r.y)?,
                w: as_int(r.width)?,
                h: as_int(r.height)?,
            }
        } else {
            raw::tjregion {
                x: 0,
                y: 0,
                w: 0,
                h: 0,
            }
        };
        let channels = header.channels();
        let format = if header.four_channel {
            raw::TJPF_TJPF_CMYK
        } else {
            raw::TJPF_TJPF_RGB
        };
        let pitch = r.width * channels;
        let n = pitch
            .checked_mul(r.height)
            .ok_or_else(|| format!("{}x{} pixels overflow", r.width, r.height))?;
        // A zero pitch would mean "work it out yourself" to TurboJPEG.
        let pitch = as_int(pitch)?;
        let len = raw::size_t::try_from(bytes.len()).map_err(|_| "image member too large")?;
        // Written by libjpeg-turbo through a raw pointer before anything reads it: no zeroing.
        out.clear();
        out.reserve(n);
        let factor = raw::tjscalingfactor {
            num: 1,
            denom: denom as c_int,
        };
        // SAFETY: the handle is live and, by `Frame`'s construction, has just read the header of
        // exactly `bytes` (so scaling and region are checked against these dimensions), and every
        // error since replaced it; tj3Decompress8 parses the header again from the same clean
        // state, so it sees the same frame, `header.width` × `header.height` (cross-checked against
        // the SOF bytes in `read_header`). It then writes `r.height` rows of `r.width · channels`
        // bytes, `pitch` apart: exactly `n` bytes, the capacity `out` has. DCT scaling gives
        // ⌈size/denom⌉ (libjpeg's jdiv_round_up, like `full_w` above), and the scaled size is the
        // true output size because lossless JPEGs (where libjpeg ignores the factor) are held at
        // denom 1 above; the region is non-empty and inside it, so TurboJPEG keeps it as given.
        let rc = unsafe {
            if raw::tj3SetScalingFactor(handle, factor) != 0
                || raw::tj3SetCroppingRegion(handle, crop) != 0
            {
                -1
            } else {
                raw::tj3Decompress8(
                    handle,
                    bytes.as_ptr(),
                    len,
                    out.as_mut_ptr(),
                    pitch,
                    format as c_int,
                )
            }
        };
        if rc != 0 {
            return Err(jpeg.fail());
        }
        // SAFETY: on success every one of the `n` bytes has been written (every pixel of every row).
        unsafe { out.set_len(n) };
        Ok(r)
    }
}

impl Drop for Jpeg {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: the handle came from tj3Init and is destroyed once.
            unsafe { raw::tj3Destroy(self.handle) }
        }
    }
}

/// The frame header (SOF) as the marker segments before the first scan give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sof {
    width: usize,
    height: usize,
    lossless: bool,
}

/// Walks the marker segments from SOI to the first SOF, the way libjpeg reads them when it raises
/// no warning (fill bytes allowed, nothing else between segments).
fn frame_header(bytes: &[u8]) -> Result<Sof, String> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Err("no SOI marker".into());
    }
    let mut at = 2;
    loop {
        if bytes.get(at) != Some(&0xFF) {
            return Err(format!("no marker at byte {at} before the frame header"));
        }
        while bytes.get(at) == Some(&0xFF) {
            at += 1;
        }
        let marker = *bytes
            .get(at)
            .ok_or("the data ends before the frame header")?;
        at += 1;
        match marker {
            // Markers without a segment: TEM and RSTn.
            0x01 | 0xD0..=0xD7 => continue,
            0xD9 | 0xDA => return Err("no frame header (SOF) before the first scan".into()),
            _ => {}
        }
        let field = |offset: usize| -> Result<usize, String> {
            let b = bytes
                .get(at + offset..at + offset + 2)
                .ok_or("the data ends inside a marker segment")?;
            Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
        };
        let len = field(0)?;
        // SOF0..SOF15 but DHT (C4), JPG (C8) and DAC (CC).
        if (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            return Ok(Sof {
                height: field(3)?,
                width: field(5)?,
                lossless: matches!(marker, 0xC3 | 0xC7 | 0xCB | 0xCF),
            });
        }
        if len < 2 {
            return Err(format!("marker segment 0x{marker:02x} length {len}"));
        }
        at += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_header_is_read_from_the_bytes() {
        let sof = [
            0xff, 0xd8, 0xff, 0xe0, 0x00, 0x04, 0x4a, 0x46, 0xff, 0xff, 0xc0, 0x00, 0x11, 0x08,
            0x01, 0x02, 0x03, 0x04, 0x03,
        ];
        assert_eq!(
            frame_header(&sof),
            Ok(Sof {
                width: 0x0304,
                height: 0x0102,
                lossless: false
            })
        );
        let mut lossless = sof;
        lossless[10] = 0xc3;
        assert!(frame_header(&lossless).unwrap().lossless);
        assert!(frame_header(&[0xff, 0xd8, 0xff, 0xd9]).is_err());
        assert!(frame_header(&[0xff, 0xd8, 0x00, 0xff, 0xc0]).is_err());
        assert!(frame_header(&sof[..15]).is_err());
        let mut zero_len = sof;
        zero_len[5] = 0x00;
        assert!(frame_header(&zero_len).is_err());
    }
}
