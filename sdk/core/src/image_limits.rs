//! Limits on decoding image files: a file is refused from its header's dimensions before any
//! pixel is decoded, so a small file that declares a huge image (a 420 KB PNG declaring
//! 12000x12000 pixels) cannot make the process allocate hundreds of megabytes. Every place
//! that decodes an image file (`jetvlm-vision`'s `RgbImage`, `jetvlm-camera`'s still-image
//! and directory sources and MJPEG frames) applies one [`ImageLimits`].

/// Largest image accepted by default: 40 million pixels (8K UHD, 7680x4320, is 33.2 MP; a
/// camera frame or a photo fits, a decompression bomb does not).
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 40_000_000;

/// Largest single allocation a decoder may make by default: 512 MiB.
pub const DEFAULT_MAX_IMAGE_ALLOC_BYTES: u64 = 512 << 20;

/// How large an image a decoder may accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest `width * height`, checked against the header before decoding.
    pub max_pixels: u64,
    /// Largest single allocation the decoder may make, in bytes.
    pub max_alloc_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            max_alloc_bytes: DEFAULT_MAX_IMAGE_ALLOC_BYTES,
        }
    }
}

impl ImageLimits {
    /// Limits with `max_pixels` pixels (allocation limit unchanged).
    pub fn with_max_pixels(max_pixels: u64) -> Self {
        ImageLimits {
            max_pixels,
            ..ImageLimits::default()
        }
    }

    /// Why an image of `width x height` (from its header) is refused, or `None` when it
    /// is within the limits.
    pub fn refusal(&self, width: u32, height: u32) -> Option<String> {
        let pixels = width as u64 * height as u64;
        (pixels > self.max_pixels).then(|| {
            format!(
                "its header declares {width}x{height} = {pixels} pixels, more than the limit of {} pixels",
                self.max_pixels
            )
        })
    }
}

/// A small, well-formed PNG (one RGB pixel of data) whose header declares `width x height`:
/// the decompression-bomb shape a decoder must refuse from the header. The one generator of
/// such files for the tests of every decoder that applies [`ImageLimits`].
pub fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let crc = crc32(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    chunk(&mut png, b"IHDR", &ihdr);
    // The pixel data: filter byte 0 and one black RGB pixel.
    let raw = [0u8, 0, 0, 0];
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    // zlib header, then a final stored block: LEN and its complement (little-endian).
    let len = raw.len() as u8;
    let mut idat = vec![0x78, 0x01, 0x01, len, 0, !len, 0xff];
    idat.extend_from_slice(&raw);
    idat.extend_from_slice(&((b << 16) | a).to_be_bytes());
    chunk(&mut png, b"IDAT", &idat);
    chunk(&mut png, b"IEND", &[]);
    png
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_only_past_the_pixel_limit() {
        let l = ImageLimits::with_max_pixels(100);
        assert_eq!(l.refusal(10, 10), None);
        let why = l.refusal(11, 10).unwrap();
        assert!(
            why.contains("11x10") && why.contains("110") && why.contains("100"),
            "{why}"
        );
        assert!(ImageLimits::default().refusal(7680, 4320).is_none());
        assert!(ImageLimits::default().refusal(12000, 12000).is_some());
        assert!(ImageLimits::default().refusal(u32::MAX, u32::MAX).is_some());
    }
}
