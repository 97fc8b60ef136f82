//! PNG and JPEG decoding on the two paths that read image files, each under its
//! `ImageLimits`: `jetvlm_vision::RgbImage::open_with_limits` (then the preprocessor that
//! feeds the encoder) and `jetvlm_camera::still::load_frame_with_limits` (`file://` and
//! `dir://` sources). The limits here are tighter than the defaults (4 Mpixel, 256 MiB) so
//! each input decodes quickly; the refusal logic is the same. Both paths must agree on what
//! decodes and on its pixels, and never return an image past the limit.

#![no_main]

use jetvlm_core::ImageLimits;
use jetvlm_fuzz::write;
use jetvlm_vision::RgbImage;
use jetvlm_vision::preprocess::{InputDType, Layout, PreprocessConfig, Preprocessor, ResizeMode};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

const LIMITS: ImageLimits = ImageLimits {
    max_pixels: 4_000_000,
    max_alloc_bytes: 256 << 20,
};

fuzz_target!(|data: &[u8]| {
    // The extension only admits the file to the camera's reader; the format is guessed
    // from the bytes on both paths.
    let path = write("image/frame.png", data);
    let vision = RgbImage::open_with_limits(&path, &LIMITS);
    let camera = jetvlm_camera::still::load_frame_with_limits(&path, 0, Duration::ZERO, &LIMITS);
    match (&vision, &camera) {
        (Ok(img), Ok(frame)) => {
            assert_eq!((img.width, img.height), (frame.width, frame.height));
            assert_eq!(img.data, frame.rgb);
        }
        (Err(_), Err(_)) => return,
        _ => panic!(
            "the vision and camera decoders disagree: {:?} vs {:?}",
            vision.as_ref().map(|i| (i.width, i.height)),
            camera.as_ref().map(|f| (f.width, f.height))
        ),
    }
    let Ok(img) = vision else { return };
    assert!(img.width as u64 * img.height as u64 <= LIMITS.max_pixels);
    assert_eq!(img.data.len(), img.width as usize * img.height as usize * 3);
    let Ok(view) = img.view() else { return };
    let resize = [
        ResizeMode::Stretch,
        ResizeMode::CenterCrop,
        ResizeMode::Letterbox,
    ][data.len() % 3];
    let cfg = PreprocessConfig {
        width: 24,
        height: 16,
        resize,
        interpolation: Default::default(),
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        layout: Layout::Nchw,
        dtype: InputDType::F32,
    };
    let shape = cfg.input_shape();
    let out = Preprocessor::new(cfg)
        .run(&view)
        .expect("a decoded image preprocesses");
    assert_eq!(out.shape, shape);
    assert_eq!(out.data.len(), shape.iter().product::<usize>());
});
