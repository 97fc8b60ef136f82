//! Frames cut into tiles as an Idefics3/SmolVLM processor splits an image
//! (`do_image_splitting`, the package's `vision.tiles`): the frame resized by its longest
//! edge (`TileSection::scaled`), then to whole tiles, cut row-major, and that whole-tile
//! image resized to one tile (the global image). A package whose frames are not split but
//! whose processor resizes them by their longest edge first (rows and cols 0) gets that
//! resize and then one to the tile.
//!
//! Every resize is PIL's 8-bit resampling, which the processor's PIL backend runs: the
//! filter's taps from `round(center - support)` to `round(center + support)`, coefficients
//! normalised and rounded to 22-bit fixed point, the horizontal pass first, each pass
//! rounded and clamped to 8 bits. Three resizes in a row carry every rounding of the first
//! into the next, so the encoder's usual resize (`fast_image_resize`, within one level of
//! PIL) is not used here: the tiles must be the processor's to the last level.

use jetvlm_vision::package::TileSection;
use jetvlm_vision::{ImageView, Interpolation, ModelPackage, VisionError};

/// PIL's fixed-point precision for 8-bit images (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Cuts frames into a package's tiles; see the module docs.
pub(crate) struct Tiler {
    tiles: TileSection,
    tile: u32,
    interpolation: Interpolation,
}

impl Tiler {
    /// The package's tiler; `None` when its frames are not split.
    pub(crate) fn new(package: &ModelPackage) -> Option<Self> {
        let v = &package.manifest.vision;
        Some(Tiler {
            tiles: v.tiles.clone()?,
            tile: v.image_size.width,
            interpolation: v.interpolation,
        })
    }

    /// Side of a tile (the encoder's input).
    pub(crate) fn tile(&self) -> u32 {
        self.tile
    }

    /// The frame's encoder inputs, RGB8 `tile x tile` each: row-major tiles, then the global
    /// image.
    pub(crate) fn cut(&self, img: &ImageView) -> Result<Vec<Vec<u8>>, VisionError> {
        let t = &self.tiles;
        let (sw, sh) = t.scaled(img.width(), img.height());
        let (gw, gh) = (t.cols * self.tile, t.rows * self.tile);
        let scaled = resize(img, sw, sh, self.interpolation)?;
        if t.rows == 0 || t.cols == 0 {
            // Not split: the scaled frame resized to one tile.
            let view = ImageView::new(sw, sh, &scaled)?;
            return Ok(vec![resize(
                &view,
                self.tile,
                self.tile,
                self.interpolation,
            )?]);
        }
        let grid = resize(
            &ImageView::new(sw, sh, &scaled)?,
            gw,
            gh,
            self.interpolation,
        )?;
        let side = self.tile as usize;
        let row_bytes = gw as usize * 3;
        let mut out = Vec::with_capacity(t.runs());
        for r in 0..t.rows as usize {
            for c in 0..t.cols as usize {
                let mut tile = Vec::with_capacity(side * side * 3);
                for y in r * side..(r + 1) * side {
                    let at = y * row_bytes + c * side * 3;
                    tile.extend_from_slice(&grid[at..at + side * 3]);
                }
                out.push(tile);
            }
        }
        if t.global_image {
            let global = ImageView::new(gw, gh, &grid)?;
            out.push(resize(&global, self.tile, self.tile, self.interpolation)?);
        }
        Ok(out)
    }
}

/// `img` resized to `dst_w x dst_h` as PIL's `Image.resize` does on RGB8 (see the module
/// docs); the same size is a copy, as in PIL.
pub(crate) fn resize(
    img: &ImageView,
    dst_w: u32,
    dst_h: u32,
    interp: Interpolation,
) -> Result<Vec<u8>, VisionError> {
    let (w, h) = (img.width(), img.height());
    if dst_w == 0 || dst_h == 0 {
        return Err(VisionError::Resize {
            src_w: w,
            src_h: h,
            dst_w,
            dst_h,
            message: "the target size is empty".into(),
        });
    }
    let mut data = img.data().to_vec();
    if dst_w != w {
        data = pass(&data, (w, h), dst_w, true, interp);
    }
    if dst_h != h {
        data = pass(&data, (dst_w, h), dst_h, false, interp);
    }
    Ok(data)
}

/// For each output index along an axis of `in_size` pixels resized to `out_size`: the first
/// source index and the fixed-point coefficients (PIL's `precompute_coeffs` and
/// `normalize_coeffs_8bpc`).
fn coefficients(in_size: u32, out_size: u32, interp: Interpolation) -> Vec<(usize, Vec<i64>)> {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filter_scale = scale.max(1.0);
    let support = interp.support() * filter_scale;
    let one = f64::from(1u32 << PRECISION_BITS);
    (0..out_size)
        .map(|i| {
            let center = (f64::from(i) + 0.5) * scale;
            // C's (int) truncation of a value that may be negative, then the bounds.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(i64::from(in_size)) as usize;
            let k: Vec<f64> = (lo..hi.max(lo))
                .map(|x| interp.kernel((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let sum: f64 = k.iter().sum();
            let fixed = k
                .iter()
                .map(|&v| {
                    let v = if sum != 0.0 { v / sum } else { v };
                    if v < 0.0 {
                        (-0.5 + v * one) as i64
                    } else {
                        (0.5 + v * one) as i64
                    }
                })
                .collect();
            (lo, fixed)
        })
        .collect()
}

/// One 8-bit pass over a `w x h` RGB8 image along x (`horizontal`) or y to `out` pixels.
fn pass(
    src: &[u8],
    (w, h): (u32, u32),
    out: u32,
    horizontal: bool,
    interp: Interpolation,
) -> Vec<u8> {
    let coeffs = coefficients(if horizontal { w } else { h }, out, interp);
    let (w, h) = (w as usize, h as usize);
    let (ow, oh) = if horizontal {
        (out as usize, h)
    } else {
        (w, out as usize)
    };
    let mut dst = vec![0u8; ow * oh * 3];
    for y in 0..oh {
        for x in 0..ow {
            let (start, k) = &coeffs[if horizontal { x } else { y }];
            for c in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (j, &kj) in k.iter().enumerate() {
                    let (sx, sy) = if horizontal {
                        (start + j, y)
                    } else {
                        (x, start + j)
                    };
                    acc += kj * i64::from(src[(sy * w + sx) * 3 + c]);
                }
                dst[(y * ow + x) * 3 + c] = (acc >> PRECISION_BITS).clamp(0, 255) as u8;
            }
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> Vec<u8> {
        (0..h)
            .flat_map(|y| {
                (0..w).flat_map(move |x| {
                    [
                        (x * 7 % 256) as u8,
                        (y * 11 % 256) as u8,
                        ((x + y) * 3 % 256) as u8,
                    ]
                })
            })
            .collect()
    }

    /// A flat colour stays that colour at every scale and filter (the coefficients of every
    /// output pixel sum to one in fixed point, within rounding), and the same size is a copy.
    #[test]
    fn flat_colour_stays_flat_and_same_size_is_a_copy() {
        let flat: Vec<u8> = [200u8, 13, 97].repeat(37 * 23);
        let img = ImageView::new(37, 23, &flat).unwrap();
        for interp in [
            Interpolation::Bilinear,
            Interpolation::Bicubic,
            Interpolation::Lanczos,
        ] {
            for (w, h) in [(12, 9), (80, 51), (37, 60), (5, 23)] {
                let out = resize(&img, w, h, interp).unwrap();
                assert_eq!(out.len(), (w * h * 3) as usize);
                assert!(
                    out.chunks(3).all(|p| p == [200, 13, 97]),
                    "{interp} {w}x{h}"
                );
            }
        }
        let g = gradient(30, 20);
        let img = ImageView::new(30, 20, &g).unwrap();
        assert_eq!(resize(&img, 30, 20, Interpolation::Lanczos).unwrap(), g);
        assert!(resize(&img, 0, 20, Interpolation::Lanczos).is_err());
    }

    /// `TileSection::scaled` gives what the processor's two functions give (values printed by
    /// `_resize_output_size_rescale_to_max_len` and `_resize_output_size_scale_below_upper_bound`
    /// of transformers' SmolVLM image processor): truncation, the even side, the 4096 bound.
    #[test]
    fn longest_edge_resize_is_the_processors() {
        let tiles = |longest| TileSection {
            frame: jetvlm_vision::package::ImageSize {
                width: 1,
                height: 1,
            },
            longest_edge: Some(longest),
            rows: 1,
            cols: 1,
            global_image: true,
            tile_prefix: String::new(),
            row_suffix: String::new(),
            global_prefix: String::new(),
        };
        for ((w, h, l), want) in [
            ((130, 80, 96), (96, 60)),
            ((260, 160, 96), (96, 60)),
            ((32, 32, 96), (96, 96)),
            ((1280, 720, 2048), (2048, 1152)),
            ((80, 130, 96), (60, 96)),
            ((1000, 3, 8000), (4096, 12)),
            ((3, 1000, 8000), (12, 4096)),
            ((641, 479, 2048), (2048, 1530)),
        ] {
            assert_eq!(tiles(l).scaled(w, h), want, "{w}x{h} to {l}");
        }
        let none = TileSection {
            longest_edge: None,
            ..tiles(1)
        };
        assert_eq!(none.scaled(130, 80), (130, 80));
    }

    /// The windows are PIL's: taps from round(center - support) to round(center + support),
    /// clamped to the image; at 2x downscale with bilinear each output pixel reads 4 pixels
    /// around its centre with weights 1, 3, 3, 1 (PIL's triangle at scale 2).
    #[test]
    fn coefficient_windows_are_pils() {
        let c = coefficients(8, 4, Interpolation::Bilinear);
        assert_eq!(c.len(), 4);
        // Output 1: center 3.0, support 2: taps 1..5.
        assert_eq!(c[1].0, 1);
        let one = 1i64 << PRECISION_BITS;
        let want = [1.0 / 8.0, 3.0 / 8.0, 3.0 / 8.0, 1.0 / 8.0];
        for (k, w) in c[1].1.iter().zip(want) {
            assert!((*k - (w * one as f64) as i64).abs() <= 1, "{c:?}");
        }
        // Output 0 is clamped at the left edge: taps 0..3, renormalised.
        assert_eq!(c[0].0, 0);
        assert_eq!(c[0].1.len(), 3);
        assert!((c[0].1.iter().sum::<i64>() - one).abs() <= 3);
    }
}
