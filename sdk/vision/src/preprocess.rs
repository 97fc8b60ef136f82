//! Frame preprocessing, kept apart from the network: resize (stretch, centre-crop or
//! letterbox), mean/std normalisation, HWC -> NCHW (or NHWC), and the element type the
//! encoder declares (f32, f16 or raw u8).
//!
//! [`Preprocessor`] is the fast path (SIMD resize through `fast_image_resize`, a per-channel
//! lookup table for normalisation). [`preprocess_reference`] is its slow twin written from
//! the definitions (PIL-style separable bilinear resampling in f64, the normalisation
//! formula per pixel); tests compare the two.

use crate::VisionError;
use fast_image_resize as fr;
use half::f16;
use jetvlm_core::ImageLimits;

/// The frame-to-encoder settings a manifest names (`vision.resize`, `vision.interpolation`,
/// `vision.layout`, `vision.input_dtype`), defined with the manifest's schema.
pub use jetvlm_core::manifest::{InputDType, Interpolation, Layout, ResizeMode};

/// The resampling filter of `fast_image_resize` that computes `interp`.
fn filter(interp: Interpolation) -> fr::FilterType {
    match interp {
        Interpolation::Bilinear => fr::FilterType::Bilinear,
        Interpolation::Bicubic => fr::FilterType::CatmullRom,
        Interpolation::Lanczos => fr::FilterType::Lanczos3,
    }
}

/// A borrowed RGB8 image: `width * height * 3` bytes, rows top to bottom, tightly packed.
#[derive(Clone, Copy, Debug)]
pub struct ImageView<'a> {
    width: u32,
    height: u32,
    data: &'a [u8],
}

impl<'a> ImageView<'a> {
    /// Checks that `data` holds exactly `width * height` RGB pixels.
    pub fn new(width: u32, height: u32, data: &'a [u8]) -> Result<Self, VisionError> {
        let bad = |message: &str| VisionError::BadImage {
            width,
            height,
            len: data.len(),
            message: message.to_string(),
        };
        if width == 0 || height == 0 {
            return Err(bad("empty image"));
        }
        let expected = width as usize * height as usize * 3;
        if data.len() != expected {
            return Err(bad(&format!("expected {expected} bytes of RGB8")));
        }
        Ok(ImageView {
            width,
            height,
            data,
        })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    pub fn data(&self) -> &'a [u8] {
        self.data
    }
}

/// An owned RGB8 image (e.g. decoded from a file).
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Decodes a PNG or JPEG file to RGB8 under the default [`ImageLimits`].
    pub fn open(path: &std::path::Path) -> Result<Self, VisionError> {
        Self::open_with_limits(path, &ImageLimits::default())
    }

    /// Decodes a PNG or JPEG file to RGB8; a file whose header declares more pixels than
    /// `limits` allow is refused before any pixel is decoded.
    pub fn open_with_limits(
        path: &std::path::Path,
        limits: &ImageLimits,
    ) -> Result<Self, VisionError> {
        let io = |source| VisionError::Io {
            path: path.to_path_buf(),
            source,
        };
        let decode = |e: image::ImageError| VisionError::Decode {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let reader = || -> Result<_, VisionError> {
            image::ImageReader::open(path)
                .map_err(io)?
                .with_guessed_format()
                .map_err(io)
        };
        let (width, height) = reader()?.into_dimensions().map_err(decode)?;
        if let Some(reason) = limits.refusal(width, height) {
            return Err(VisionError::ImageTooLarge {
                path: path.to_path_buf(),
                reason,
            });
        }
        let mut r = reader()?;
        let mut l = image::Limits::default();
        l.max_alloc = Some(limits.max_alloc_bytes);
        r.limits(l);
        let img = r.decode().map_err(decode)?.to_rgb8();
        Ok(RgbImage {
            width: img.width(),
            height: img.height(),
            data: img.into_raw(),
        })
    }

    pub fn view(&self) -> Result<ImageView<'_>, VisionError> {
        ImageView::new(self.width, self.height, &self.data)
    }
}

/// Everything preprocessing needs, taken from the package manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessConfig {
    pub width: u32,
    pub height: u32,
    pub resize: ResizeMode,
    /// The resampling filter of the resize.
    pub interpolation: Interpolation,
    /// Per-channel mean of RGB in [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation of RGB in [0, 1].
    pub std: [f32; 3],
    pub layout: Layout,
    pub dtype: InputDType,
}

impl PreprocessConfig {
    /// The input tensor shape for one frame: `[1, 3, H, W]` or `[1, H, W, 3]`.
    pub fn input_shape(&self) -> [usize; 4] {
        let (h, w) = (self.height as usize, self.width as usize);
        match self.layout {
            Layout::Nchw => [1, 3, h, w],
            Layout::Nhwc => [1, h, w, 3],
        }
    }

    /// The padding colour for letterboxing: the mean, so padded pixels normalise to ~0.
    pub fn pad_rgb(&self) -> [u8; 3] {
        self.mean
            .map(|m| (m * 255.0).round().clamp(0.0, 255.0) as u8)
    }

    fn normalise(&self, channel: usize, pixel: u8) -> f32 {
        (pixel as f32 / 255.0 - self.mean[channel]) / self.std[channel]
    }
}

/// The encoder input of one frame.
#[derive(Clone, Debug, PartialEq)]
pub enum InputData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    U8(Vec<u8>),
}

impl InputData {
    pub fn len(&self) -> usize {
        match self {
            InputData::F32(v) => v.len(),
            InputData::F16(v) => v.len(),
            InputData::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> InputDType {
        match self {
            InputData::F32(_) => InputDType::F32,
            InputData::F16(_) => InputDType::F16,
            InputData::U8(_) => InputDType::U8,
        }
    }

    /// The values as f32 (for comparisons and tests).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            InputData::F32(v) => v.clone(),
            InputData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            InputData::U8(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
}

/// A preprocessed frame: the tensor the encoder takes, with its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessed {
    pub shape: [usize; 4],
    pub data: InputData,
}

/// Source crop and destination placement of a frame on the encoder canvas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// `(x, y, w, h)` of the source region used.
    pub crop: (u32, u32, u32, u32),
    /// `(x, y, w, h)` of the canvas region it is resized into (the rest is padding).
    pub place: (u32, u32, u32, u32),
}

/// Where a `src_w x src_h` frame goes on the canvas for the configured resize mode.
pub fn geometry(cfg: &PreprocessConfig, src_w: u32, src_h: u32) -> Geometry {
    let (tw, th) = (cfg.width, cfg.height);
    let full_src = (0, 0, src_w, src_h);
    let full_dst = (0, 0, tw, th);
    match cfg.resize {
        ResizeMode::Stretch => Geometry {
            crop: full_src,
            place: full_dst,
        },
        ResizeMode::CenterCrop => {
            // Source region with the target's aspect ratio, as large as fits.
            let (cw, ch) = if src_w as u64 * th as u64 > tw as u64 * src_h as u64 {
                let cw = ((src_h as f64 * tw as f64 / th as f64).round() as u32).clamp(1, src_w);
                (cw, src_h)
            } else {
                let ch = ((src_w as f64 * th as f64 / tw as f64).round() as u32).clamp(1, src_h);
                (src_w, ch)
            };
            Geometry {
                crop: ((src_w - cw) / 2, (src_h - ch) / 2, cw, ch),
                place: full_dst,
            }
        }
        ResizeMode::Letterbox => {
            let scale = (tw as f64 / src_w as f64).min(th as f64 / src_h as f64);
            let nw = ((src_w as f64 * scale).round() as u32).clamp(1, tw);
            let nh = ((src_h as f64 * scale).round() as u32).clamp(1, th);
            Geometry {
                crop: full_src,
                place: ((tw - nw) / 2, (th - nh) / 2, nw, nh),
            }
        }
    }
}

/// The fast preprocessing path. Keeps its resizer and lookup tables between frames.
pub struct Preprocessor {
    cfg: PreprocessConfig,
    resizer: fr::Resizer,
    /// `lut[c][v]` = normalised value of channel `c` at pixel value `v`.
    lut: Box<[[f32; 256]; 3]>,
}

impl std::fmt::Debug for Preprocessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preprocessor")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Preprocessor {
    pub fn new(cfg: PreprocessConfig) -> Self {
        let mut lut = Box::new([[0f32; 256]; 3]);
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                *slot = cfg.normalise(c, v as u8);
            }
        }
        Preprocessor {
            cfg,
            resizer: fr::Resizer::new(),
            lut,
        }
    }

    pub fn config(&self) -> &PreprocessConfig {
        &self.cfg
    }

    /// Resizes the frame onto the encoder canvas (RGB8, `height x width`), padding where the
    /// resize mode leaves room.
    pub fn canvas(&mut self, img: &ImageView) -> Result<Vec<u8>, VisionError> {
        let g = geometry(&self.cfg, img.width, img.height);
        let (_, _, pw, ph) = g.place;
        let (cx, cy, cw, ch) = g.crop;
        let resize_err = |e: &dyn std::fmt::Display| VisionError::Resize {
            src_w: img.width,
            src_h: img.height,
            dst_w: pw,
            dst_h: ph,
            message: e.to_string(),
        };
        let resized: Vec<u8> =
            if (cx, cy, cw, ch) == (0, 0, img.width, img.height) && (cw, ch) == (pw, ph) {
                img.data.to_vec()
            } else {
                let src =
                    fr::images::ImageRef::new(img.width, img.height, img.data, fr::PixelType::U8x3)
                        .map_err(|e| resize_err(&e))?;
                let alg = fr::ResizeAlg::Convolution(filter(self.cfg.interpolation));
                let crop = fr::ResizeOptions::new()
                    .resize_alg(alg)
                    .crop(cx as f64, cy as f64, cw as f64, ch as f64);
                let mut dst = fr::images::Image::new(pw, ph, fr::PixelType::U8x3);
                if cw != pw && ch != ph {
                    // Both axes resample: one axis per resize, in PIL's order (the axis that
                    // shrinks more first; fast_image_resize would always go vertical first),
                    // so the 8-bit rounding and clamping between the passes is PIL's. The
                    // first pass keeps the whole source extent of the other axis, so the
                    // second samples past the crop edges as a single resize does.
                    let vertical_first = ch as u64 * pw as u64 > cw as u64 * ph as u64;
                    let (mw, mh, first, second) = if vertical_first {
                        let first = (0.0, cy as f64, img.width as f64, ch as f64);
                        (img.width, ph, first, (cx as f64, 0.0, cw as f64, ph as f64))
                    } else {
                        let first = (cx as f64, 0.0, cw as f64, img.height as f64);
                        (
                            pw,
                            img.height,
                            first,
                            (0.0, cy as f64, pw as f64, ch as f64),
                        )
                    };
                    let pass = |(x, y, w, h): (f64, f64, f64, f64)| {
                        fr::ResizeOptions::new().resize_alg(alg).crop(x, y, w, h)
                    };
                    let mut mid = fr::images::Image::new(mw, mh, fr::PixelType::U8x3);
                    self.resizer
                        .resize(&src, &mut mid, &pass(first))
                        .map_err(|e| resize_err(&e))?;
                    self.resizer
                        .resize(&mid, &mut dst, &pass(second))
                        .map_err(|e| resize_err(&e))?;
                } else {
                    self.resizer
                        .resize(&src, &mut dst, &crop)
                        .map_err(|e| resize_err(&e))?;
                }
                dst.into_vec()
            };
        if (pw, ph) == (self.cfg.width, self.cfg.height) {
            return Ok(resized);
        }
        Ok(paste(&self.cfg, &resized, g.place))
    }

    /// The encoder input for one frame.
    pub fn run(&mut self, img: &ImageView) -> Result<Preprocessed, VisionError> {
        let canvas = self.canvas(img)?;
        Ok(to_tensor(&self.cfg, &canvas, |c, v| {
            self.lut[c][v as usize]
        }))
    }
}

/// Pads a resized block into a full canvas filled with the mean colour.
fn paste(cfg: &PreprocessConfig, resized: &[u8], place: (u32, u32, u32, u32)) -> Vec<u8> {
    let (tw, th) = (cfg.width as usize, cfg.height as usize);
    let (px, py, pw, ph) = (
        place.0 as usize,
        place.1 as usize,
        place.2 as usize,
        place.3 as usize,
    );
    let pad = cfg.pad_rgb();
    let mut canvas: Vec<u8> = pad.iter().copied().cycle().take(tw * th * 3).collect();
    for y in 0..ph {
        let dst = ((py + y) * tw + px) * 3;
        canvas[dst..dst + pw * 3].copy_from_slice(&resized[y * pw * 3..(y + 1) * pw * 3]);
    }
    canvas
}

/// RGB8 canvas (HWC) -> the model's layout and dtype.
fn to_tensor(
    cfg: &PreprocessConfig,
    canvas: &[u8],
    norm: impl Fn(usize, u8) -> f32,
) -> Preprocessed {
    let (h, w) = (cfg.height as usize, cfg.width as usize);
    let plane = h * w;
    let shape = cfg.input_shape();
    // Index of (channel, pixel) in the output.
    let index = |c: usize, p: usize| match cfg.layout {
        Layout::Nchw => c * plane + p,
        Layout::Nhwc => p * 3 + c,
    };
    let data = match cfg.dtype {
        InputDType::U8 => {
            let mut out = vec![0u8; plane * 3];
            for p in 0..plane {
                for c in 0..3 {
                    out[index(c, p)] = canvas[p * 3 + c];
                }
            }
            InputData::U8(out)
        }
        InputDType::F32 | InputDType::F16 => {
            let mut out = vec![0f32; plane * 3];
            match cfg.layout {
                Layout::Nchw => {
                    let (r, rest) = out.split_at_mut(plane);
                    let (g, b) = rest.split_at_mut(plane);
                    for (p, px) in canvas.chunks_exact(3).enumerate() {
                        r[p] = norm(0, px[0]);
                        g[p] = norm(1, px[1]);
                        b[p] = norm(2, px[2]);
                    }
                }
                Layout::Nhwc => {
                    for (o, (i, &v)) in out.iter_mut().zip(canvas.iter().enumerate()) {
                        *o = norm(i % 3, v);
                    }
                }
            }
            if cfg.dtype == InputDType::F16 {
                InputData::F16(out.iter().map(|&x| f16::from_f32(x)).collect())
            } else {
                InputData::F32(out)
            }
        }
    };
    Preprocessed { shape, data }
}

/// Reference bilinear resampling of the `crop` region of `img` to `dst_w x dst_h` (see
/// [`resize_reference_with`]).
pub fn resize_reference(
    img: &ImageView,
    crop: (u32, u32, u32, u32),
    dst_w: u32,
    dst_h: u32,
) -> Vec<u8> {
    resize_reference_with(img, crop, dst_w, dst_h, Interpolation::Bilinear)
}

/// Reference resampling of the `crop` region of `img` to `dst_w x dst_h`: the separable
/// filter `interp` with support widened by the scale factor when shrinking (as PIL and
/// `fast_image_resize` define it): two separable passes, each computed in f64 and rounded
/// to 8 bits, in PIL's order.
pub fn resize_reference_with(
    img: &ImageView,
    crop: (u32, u32, u32, u32),
    dst_w: u32,
    dst_h: u32,
    interp: Interpolation,
) -> Vec<u8> {
    let (cx, cy, cw, ch) = crop;
    let wx = filter_weights(
        img.width as usize,
        cx as f64,
        cw as f64,
        dst_w as usize,
        interp,
    );
    let wy = filter_weights(
        img.height as usize,
        cy as f64,
        ch as f64,
        dst_h as usize,
        interp,
    );
    let (w, h) = (img.width as usize, img.height as usize);
    let src: Vec<f64> = img.data.iter().map(|&v| v as f64).collect();
    // Each pass's values are rounded and clamped to 8 bits, as PIL stores its intermediate
    // image (with the negative lobes of bicubic and Lanczos, the clamp between passes shows),
    // and the axis that shrinks more goes first, as PIL orders the passes.
    let vertical_first = ch as u64 * dst_w as u64 > cw as u64 * dst_h as u64;
    let out = if vertical_first {
        let t = resample_axis(&src, w, h, &wy, false);
        resample_axis(&t, w, dst_h as usize, &wx, true)
    } else {
        let t = resample_axis(&src, w, h, &wx, true);
        resample_axis(&t, dst_w as usize, h, &wy, false)
    };
    out.into_iter().map(|v| v as u8).collect()
}

/// One separable pass over a `w x h` RGB image (f64 values in [0, 255]) along x
/// (`horizontal`) or y, with per-output `(first source index, weights)`; values rounded to
/// 8 bits.
fn resample_axis(
    src: &[f64],
    w: usize,
    h: usize,
    weights: &[(usize, Vec<f64>)],
    horizontal: bool,
) -> Vec<f64> {
    let (ow, oh) = if horizontal {
        (weights.len(), h)
    } else {
        (w, weights.len())
    };
    let mut out = vec![0f64; ow * oh * 3];
    for y in 0..oh {
        for x in 0..ow {
            let (start, ws) = &weights[if horizontal { x } else { y }];
            for c in 0..3 {
                let mut acc = 0.0;
                for (k, wt) in ws.iter().enumerate() {
                    let (sx, sy) = if horizontal {
                        (start + k, y)
                    } else {
                        (x, start + k)
                    };
                    acc += wt * src[(sy * w + sx) * 3 + c];
                }
                out[(y * ow + x) * 3 + c] = acc.round().clamp(0.0, 255.0);
            }
        }
    }
    out
}

/// For each output index: the first source index and the normalised filter weights.
fn filter_weights(
    in_size: usize,
    start: f64,
    len: f64,
    out_size: usize,
    interp: Interpolation,
) -> Vec<(usize, Vec<f64>)> {
    let scale = len / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = interp.support() * filter_scale;
    (0..out_size)
        .map(|i| {
            let center = start + (i as f64 + 0.5) * scale;
            let lo = ((center - support).floor().max(0.0)) as usize;
            let hi = ((center + support).ceil() as usize).min(in_size);
            let mut weights: Vec<f64> = (lo..hi)
                .map(|s| interp.kernel((s as f64 + 0.5 - center) / filter_scale))
                .collect();
            let sum: f64 = weights.iter().sum();
            if sum > 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            (lo, weights)
        })
        .collect()
}

/// The slow twin of [`Preprocessor::run`]: reference resize, padding, then the
/// normalisation formula per element.
pub fn preprocess_reference(cfg: &PreprocessConfig, img: &ImageView) -> Preprocessed {
    let g = geometry(cfg, img.width, img.height);
    let resized = resize_reference_with(img, g.crop, g.place.2, g.place.3, cfg.interpolation);
    let canvas = if (g.place.2, g.place.3) == (cfg.width, cfg.height) {
        resized
    } else {
        paste(cfg, &resized, g.place)
    };
    to_tensor(cfg, &canvas, |c, v| cfg.normalise(c, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(
        w: u32,
        h: u32,
        resize: ResizeMode,
        layout: Layout,
        dtype: InputDType,
    ) -> PreprocessConfig {
        PreprocessConfig {
            width: w,
            height: h,
            resize,
            interpolation: Interpolation::Bilinear,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            layout,
            dtype,
        }
    }

    /// A deterministic image with gradients and a sharp edge.
    fn test_image(w: u32, h: u32) -> Vec<u8> {
        let mut v = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                v.push(((x * 255) / w.max(1)) as u8);
                v.push(((y * 255) / h.max(1)) as u8);
                v.push(if (x / 5 + y / 3) % 2 == 0 { 230 } else { 20 });
            }
        }
        v
    }

    #[test]
    fn known_pixels_nchw_f32() {
        // 2x1 image at the target size: no resize; check each element by hand.
        let data = [255u8, 0, 128, 0, 255, 64];
        let img = ImageView::new(2, 1, &data).unwrap();
        let c = cfg(2, 1, ResizeMode::Stretch, Layout::Nchw, InputDType::F32);
        let out = Preprocessor::new(c.clone()).run(&img).unwrap();
        assert_eq!(out.shape, [1, 3, 1, 2]);
        let v = out.data.to_f32();
        let expect = [
            (1.0 - 0.485) / 0.229,
            (0.0 - 0.485) / 0.229,
            (0.0 - 0.456) / 0.224,
            (1.0 - 0.456) / 0.224,
            (128.0 / 255.0 - 0.406) / 0.225,
            (64.0 / 255.0 - 0.406) / 0.225,
        ];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn layouts_and_dtypes() {
        let data = [10u8, 20, 30, 40, 50, 60];
        let img = ImageView::new(2, 1, &data).unwrap();
        let u8_nhwc =
            Preprocessor::new(cfg(2, 1, ResizeMode::Stretch, Layout::Nhwc, InputDType::U8))
                .run(&img)
                .unwrap();
        assert_eq!(u8_nhwc.shape, [1, 1, 2, 3]);
        assert_eq!(u8_nhwc.data, InputData::U8(data.to_vec()));
        let u8_nchw =
            Preprocessor::new(cfg(2, 1, ResizeMode::Stretch, Layout::Nchw, InputDType::U8))
                .run(&img)
                .unwrap();
        assert_eq!(u8_nchw.data, InputData::U8(vec![10, 40, 20, 50, 30, 60]));
        let f32_out = Preprocessor::new(cfg(
            2,
            1,
            ResizeMode::Stretch,
            Layout::Nchw,
            InputDType::F32,
        ))
        .run(&img)
        .unwrap();
        let f16_out = Preprocessor::new(cfg(
            2,
            1,
            ResizeMode::Stretch,
            Layout::Nchw,
            InputDType::F16,
        ))
        .run(&img)
        .unwrap();
        assert_eq!(f16_out.data.dtype(), InputDType::F16);
        for (a, b) in f32_out.data.to_f32().iter().zip(f16_out.data.to_f32()) {
            assert!((a - b).abs() <= a.abs() * 1e-3 + 1e-3);
        }
    }

    #[test]
    fn geometry_modes() {
        let c = cfg(
            64,
            32,
            ResizeMode::CenterCrop,
            Layout::Nchw,
            InputDType::F32,
        );
        // 100x100 source, 2:1 target: crop 100x50 from the middle.
        assert_eq!(geometry(&c, 100, 100).crop, (0, 25, 100, 50));
        let c = cfg(64, 32, ResizeMode::Letterbox, Layout::Nchw, InputDType::F32);
        // 100x100 source fits as 32x32, centred horizontally.
        assert_eq!(geometry(&c, 100, 100).place, (16, 0, 32, 32));
        let c = cfg(64, 32, ResizeMode::Stretch, Layout::Nchw, InputDType::F32);
        assert_eq!(geometry(&c, 100, 100).place, (0, 0, 64, 32));
    }

    #[test]
    fn letterbox_pads_to_zero_after_normalisation() {
        let data = test_image(40, 20);
        let img = ImageView::new(40, 20, &data).unwrap();
        let c = cfg(16, 16, ResizeMode::Letterbox, Layout::Nchw, InputDType::F32);
        let out = Preprocessor::new(c).run(&img).unwrap().data.to_f32();
        // Top-left pixel is padding (image is 16x8 centred vertically): |value| < 1/255/std.
        for ch in 0..3 {
            assert!(out[ch * 256].abs() < 0.02, "pad value {}", out[ch * 256]);
        }
    }

    #[test]
    fn fast_matches_reference() {
        for &(sw, sh) in &[(64u32, 48u32), (200, 120), (31, 77), (16, 16), (10, 6)] {
            let data = test_image(sw, sh);
            let img = ImageView::new(sw, sh, &data).unwrap();
            for (mode, interp) in [
                ResizeMode::Stretch,
                ResizeMode::CenterCrop,
                ResizeMode::Letterbox,
            ]
            .into_iter()
            .flat_map(|m| {
                [
                    Interpolation::Bilinear,
                    Interpolation::Bicubic,
                    Interpolation::Lanczos,
                ]
                .map(|i| (m, i))
            }) {
                let mut c = cfg(32, 24, mode, Layout::Nchw, InputDType::U8);
                c.interpolation = interp;
                let fast = Preprocessor::new(c.clone()).run(&img).unwrap();
                let slow = preprocess_reference(&c, &img);
                let (InputData::U8(a), InputData::U8(b)) = (&fast.data, &slow.data) else {
                    panic!("u8 expected");
                };
                let max = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
                assert!(max <= 2, "{sw}x{sh} {mode:?} {interp}: max diff {max}");
                let mut c = cfg(32, 24, mode, Layout::Nhwc, InputDType::F32);
                c.interpolation = interp;
                let fast = Preprocessor::new(c.clone())
                    .run(&img)
                    .unwrap()
                    .data
                    .to_f32();
                let slow = preprocess_reference(&c, &img).data.to_f32();
                let max = fast
                    .iter()
                    .zip(&slow)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                // Two 8-bit levels divided by the smallest std.
                assert!(
                    max <= 2.0 / 255.0 / 0.224 + 1e-5,
                    "{sw}x{sh} {mode:?} {interp}: {max}"
                );
            }
        }
    }

    #[test]
    fn reference_filters_are_pils() {
        // PIL 13's `Image.resize((4, 3), f)` of test_image(10, 6), for each filter.
        let pil: [(Interpolation, [u8; 36]); 3] = [
            (
                Interpolation::Bilinear,
                [
                    25, 30, 230, 82, 30, 205, 147, 30, 45, 204, 30, 20, 25, 106, 125, 82, 106, 125,
                    147, 106, 125, 204, 106, 125, 25, 182, 20, 82, 182, 45, 147, 182, 205, 204,
                    182, 230,
                ],
            ),
            (
                Interpolation::Bicubic,
                [
                    20, 23, 244, 82, 23, 224, 147, 23, 26, 209, 23, 6, 20, 106, 125, 82, 106, 125,
                    147, 106, 125, 209, 106, 125, 20, 189, 6, 82, 189, 26, 147, 189, 224, 209, 189,
                    244,
                ],
            ),
            (
                Interpolation::Lanczos,
                [
                    19, 20, 254, 81, 20, 236, 148, 20, 14, 210, 20, 0, 19, 106, 125, 81, 106, 125,
                    148, 106, 125, 210, 106, 125, 19, 192, 0, 81, 192, 14, 148, 192, 236, 210, 192,
                    254,
                ],
            ),
        ];
        let data = test_image(10, 6);
        let img = ImageView::new(10, 6, &data).unwrap();
        for (interp, want) in pil {
            let got = resize_reference_with(&img, (0, 0, 10, 6), 4, 3, interp);
            let max = got.iter().zip(want).map(|(a, b)| a.abs_diff(b)).max();
            assert!(max <= Some(1), "{interp}: {got:?} vs PIL {want:?}");
        }
    }

    #[test]
    fn bad_image_is_an_error() {
        assert!(ImageView::new(2, 2, &[0u8; 11]).is_err());
        assert!(ImageView::new(0, 2, &[]).is_err());
    }

    /// A valid 1x1 PNG whose IHDR is rewritten to declare `width x height` (CRC fixed): a
    /// file of a few dozen bytes that claims a huge image.
    #[test]
    fn an_image_declaring_huge_dimensions_is_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bomb.png");
        let png = jetvlm_core::image_limits::png_declaring(12000, 12000);
        assert!(png.len() < 100);
        std::fs::write(&path, &png).unwrap();
        match RgbImage::open(&path) {
            Err(e @ VisionError::ImageTooLarge { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("12000x12000") && msg.contains("bomb.png"),
                    "{msg}"
                );
            }
            other => panic!("expected ImageTooLarge, got {other:?}"),
        }
        // The limit is configurable: a 2x2 image passes 4 pixels and is refused at 3.
        let small = dir.path().join("small.png");
        image::RgbImage::new(2, 2).save(&small).unwrap();
        let ok = RgbImage::open_with_limits(&small, &ImageLimits::with_max_pixels(4)).unwrap();
        assert_eq!((ok.width, ok.height, ok.data.len()), (2, 2, 12));
        assert!(matches!(
            RgbImage::open_with_limits(&small, &ImageLimits::with_max_pixels(3)),
            Err(VisionError::ImageTooLarge { .. })
        ));
    }
}
