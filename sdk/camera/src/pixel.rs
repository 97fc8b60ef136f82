//! Camera pixel formats to RGB8 (used by the V4L2 source; pure Rust so it is tested in every
//! build).

use crate::error::{CameraError, Result};

/// Converts packed YUYV 4:2:2 (BT.601, limited range) to RGB8. `stride` is the byte length of
/// one source row (at least `2 * width`).
pub fn yuyv_to_rgb(
    src: &[u8],
    width: u32,
    height: u32,
    stride: u32,
    device: &str,
) -> Result<Vec<u8>> {
    let (w, h, stride) = (width as usize, height as usize, stride as usize);
    if w % 2 != 0 || stride < 2 * w || src.len() < stride * h.saturating_sub(1) + 2 * w {
        return Err(CameraError::DeviceFormat {
            device: device.to_string(),
            reason: format!(
                "YUYV buffer of {} bytes too small for {width}x{height} (stride {stride})",
                src.len()
            ),
        });
    }
    let mut out = vec![0u8; w * h * 3];
    for y in 0..h {
        let row = &src[y * stride..y * stride + 2 * w];
        let dst = &mut out[y * w * 3..(y + 1) * w * 3];
        for (pair, px) in row.chunks_exact(4).zip(dst.chunks_exact_mut(6)) {
            let (y0, u, y1, v) = (pair[0], pair[1], pair[2], pair[3]);
            px[..3].copy_from_slice(&ycbcr_to_rgb(y0, u, v));
            px[3..].copy_from_slice(&ycbcr_to_rgb(y1, u, v));
        }
    }
    Ok(out)
}

/// One BT.601 limited-range YCbCr sample to RGB8.
pub fn ycbcr_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    let c = (y as f32 - 16.0) * 1.164_383;
    let d = cb as f32 - 128.0;
    let e = cr as f32 - 128.0;
    let r = c + 1.596_027 * e;
    let g = c - 0.391_762 * d - 0.812_968 * e;
    let b = c + 2.017_232 * d;
    [
        r.round().clamp(0.0, 255.0) as u8,
        g.round().clamp(0.0, 255.0) as u8,
        b.round().clamp(0.0, 255.0) as u8,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_colours() {
        assert_eq!(ycbcr_to_rgb(16, 128, 128), [0, 0, 0]);
        assert_eq!(ycbcr_to_rgb(235, 128, 128), [255, 255, 255]);
        // BT.601 red: Y=81, Cb=90, Cr=240.
        let [r, g, b] = ycbcr_to_rgb(81, 90, 240);
        assert!(r >= 253 && g <= 2 && b <= 2, "{r} {g} {b}");
    }

    #[test]
    fn yuyv_rows_respect_stride_and_size() {
        // 2x2 image, stride 6 (2 padding bytes per row): white pair then black pair.
        let src = [235, 128, 235, 128, 0, 0, 16, 128, 16, 128];
        let rgb = yuyv_to_rgb(&src, 2, 2, 6, "/dev/video9").unwrap();
        assert_eq!(rgb, vec![255, 255, 255, 255, 255, 255, 0, 0, 0, 0, 0, 0]);
        let err = yuyv_to_rgb(&src[..6], 2, 2, 6, "/dev/video9")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/dev/video9") && err.contains("too small"),
            "{err}"
        );
    }
}
