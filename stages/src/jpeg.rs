//! A thin safe layer over libjpeg-turbo's TurboJPEG 3 API (`turbojpeg-sys`), for what the
//! `turbojpeg` crate does not expose: decoding only a region of the image (`tj3SetCroppingRegion`),
//! which skips the inverse DCT, upsampling and colour conversion of the columns left and right of
//! it and all work below it. The pixels inside are the ones a full decode gives (checked in
//! `crate::decode`'s tests), given a margin for the upsampling at the region's edges.

use std::ffi::{c_int, CStr};

use turbojpeg_sys as raw;

pub use crate::resample::Rect;

/// What the header says.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub width: usize,
    pub height: usize,
    /// CMYK or YCCK: decoded as raw ink values (libjpeg-turbo cannot make RGB of them).
    pub four_channel: bool,
    /// Width of one iMCU column in full-size pixels (8, 16 or 32); None when the chroma subsampling
    /// is one TurboJPEG cannot name, in which case no region can be set.
    pub mcu_width: Option<usize>,
}

/// One TurboJPEG decompressor (not thread-safe: keep one per thread).
pub struct Jpeg {
    handle: raw::tjhandle,
}

impl Jpeg {
    pub fn new() -> Result<Jpeg, String> {
        // SAFETY: plain constructor; a null handle is the error case, checked below.
        let handle = unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if handle.is_null() {
            return Err("libjpeg-turbo: cannot create a decompressor".into());
        }
        Ok(Jpeg { handle })
    }

    fn error(&self) -> String {
        // SAFETY: the handle is valid; libjpeg-turbo returns a NUL-terminated string it owns.
        unsafe { CStr::from_ptr(raw::tj3GetErrorStr(self.handle)) }
            .to_string_lossy()
            .into_owned()
    }

    fn get(&self, param: raw::TJPARAM) -> c_int {
        // SAFETY: the handle is valid; reading a parameter has no other precondition.
        unsafe { raw::tj3Get(self.handle, param as c_int) }
    }

    pub fn header(&mut self, bytes: &[u8]) -> Result<Header, String> {
        // SAFETY: the handle is valid and `bytes` is a live slice of the given length.
        let rc = unsafe {
            raw::tj3DecompressHeader(self.handle, bytes.as_ptr(), bytes.len() as raw::size_t)
        };
        if rc != 0 {
            return Err(self.error());
        }
        let colorspace = self.get(raw::TJPARAM_TJPARAM_COLORSPACE) as raw::TJCS;
        let subsamp = self.get(raw::TJPARAM_TJPARAM_SUBSAMP);
        // TurboJPEG's `tjMCUWidth` for 4:4:4, 4:2:2, 4:2:0, gray, 4:4:0, 4:1:1, 4:4:1 (the static
        // array itself is not exported by the static library).
        const MCU_WIDTH: [usize; 7] = [8, 16, 16, 8, 8, 32, 8];
        let mcu_width = usize::try_from(subsamp)
            .ok()
            .and_then(|s| MCU_WIDTH.get(s).copied());
        Ok(Header {
            width: self.get(raw::TJPARAM_TJPARAM_JPEGWIDTH).max(0) as usize,
            height: self.get(raw::TJPARAM_TJPARAM_JPEGHEIGHT).max(0) as usize,
            four_channel: colorspace == raw::TJCS_TJCS_CMYK || colorspace == raw::TJCS_TJCS_YCCK,
            mcu_width,
        })
    }

    /// Decodes `region` (in pixels of the image scaled by 1/`denom`; None = all of it) into `out`,
    /// right after [`Jpeg::header`] read the same bytes (which sets what the scaling factor and the
    /// region are checked against),
    /// `channels` bytes a pixel (3: RGB, 4: CMYK), rows packed. `region.x` must be a multiple of the
    /// scaled iMCU width. `out` is replaced by the pixels.
    pub fn decode(
        &mut self,
        bytes: &[u8],
        denom: usize,
        region: Option<Rect>,
        channels: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        let factor = raw::tjscalingfactor {
            num: 1,
            denom: denom as c_int,
        };
        let crop = region.map_or(
            raw::tjregion {
                x: 0,
                y: 0,
                w: 0,
                h: 0,
            },
            |r| raw::tjregion {
                x: r.x as c_int,
                y: r.y as c_int,
                w: r.width as c_int,
                h: r.height as c_int,
            },
        );
        let format = match channels {
            3 => raw::TJPF_TJPF_RGB,
            4 => raw::TJPF_TJPF_CMYK,
            _ => return Err(format!("{channels} channels: not RGB or CMYK")),
        };
        let scaled = |n: usize| n.div_ceil(denom);
        let (w, h) = match region {
            Some(r) => (r.width, r.height),
            None => (
                scaled(self.get(raw::TJPARAM_TJPARAM_JPEGWIDTH).max(0) as usize),
                scaled(self.get(raw::TJPARAM_TJPARAM_JPEGHEIGHT).max(0) as usize),
            ),
        };
        // Written by libjpeg-turbo through a raw pointer before anything reads it: no zeroing.
        let n = w * h * channels;
        out.clear();
        out.reserve(n);
        // SAFETY: the handle is valid; `out` has room for `h` rows of `w * channels` bytes, which is
        // what tj3Decompress8 writes for this scaling factor and region, through the raw pointer.
        let rc = unsafe {
            if raw::tj3SetScalingFactor(self.handle, factor) != 0
                || raw::tj3SetCroppingRegion(self.handle, crop) != 0
            {
                -1
            } else {
                raw::tj3Decompress8(
                    self.handle,
                    bytes.as_ptr(),
                    bytes.len() as raw::size_t,
                    out.as_mut_ptr(),
                    (w * channels) as c_int,
                    format as c_int,
                )
            }
        };
        if rc != 0 {
            return Err(self.error());
        }
        // SAFETY: on success every one of the `n` bytes has been written (every pixel of every row).
        unsafe { out.set_len(n) };
        Ok(())
    }
}

impl Drop for Jpeg {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { raw::tj3Destroy(self.handle) }
    }
}
