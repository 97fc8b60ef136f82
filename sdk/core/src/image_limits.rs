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
