//! Still images as sources: `file://image.png` (one frame, then end of stream) and
//! `dir://frames/?fps=10&loop=0` (every .png/.jpg/.jpeg in name order).

use std::path::{Path, PathBuf};
use std::time::Duration;

use jetvlm_core::ImageLimits;

use crate::error::{CameraError, Result};
use crate::frame::{Capture, Frame, FrameSource};

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        .unwrap_or(false)
}

/// Decodes an image file into an RGB8 frame under the default [`ImageLimits`].
pub fn load_frame(path: &Path, index: u64, timestamp: Duration) -> Result<Frame> {
    load_frame_with_limits(path, index, timestamp, &ImageLimits::default())
}

/// Decodes an image file into an RGB8 frame; a file whose header declares more pixels than
/// `limits` allow is refused before any pixel is decoded.
pub fn load_frame_with_limits(
    path: &Path,
    index: u64,
    timestamp: Duration,
    limits: &ImageLimits,
) -> Result<Frame> {
    if !is_image(path) {
        return Err(CameraError::UnsupportedImage {
            path: path.to_path_buf(),
        });
    }
    let read = |source| CameraError::ReadImage {
        path: path.to_path_buf(),
        source,
    };
    let reader = || -> Result<_> {
        image::ImageReader::open(path)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| read(image::ImageError::IoError(e)))
    };
    let (width, height) = reader()?.into_dimensions().map_err(read)?;
    if let Some(reason) = limits.refusal(width, height) {
        return Err(CameraError::ImageTooLarge {
            path: path.to_path_buf(),
            reason,
        });
    }
    let mut r = reader()?;
    r.limits(decoder_limits(limits));
    let rgb = r.decode().map_err(read)?.to_rgb8();
    Ok(Frame {
        index,
        timestamp,
        width: rgb.width(),
        height: rgb.height(),
        rgb: rgb.into_raw(),
    })
}

/// The `image` crate's limits for `limits` (the allocation cap; the pixel count is checked
/// from the header first).
pub(crate) fn decoder_limits(limits: &ImageLimits) -> image::Limits {
    let mut l = image::Limits::default();
    l.max_alloc = Some(limits.max_alloc_bytes);
    l
}

/// A single image file: one frame, then end of stream.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    done: bool,
    size: Option<(u32, u32)>,
    limits: ImageLimits,
}

impl FileSource {
    /// The image at `path` under the default [`ImageLimits`].
    pub fn new(path: impl Into<PathBuf>) -> Result<Self> {
        Self::with_limits(path, ImageLimits::default())
    }

    /// The image at `path`, decoded under `limits`: a file whose header declares more
    /// pixels is refused here, when the source opens, before any pixel is decoded.
    pub fn with_limits(path: impl Into<PathBuf>, limits: ImageLimits) -> Result<Self> {
        let path = path.into();
        if !is_image(&path) {
            return Err(CameraError::UnsupportedImage { path });
        }
        let (width, height) =
            image::image_dimensions(&path).map_err(|source| CameraError::ReadImage {
                path: path.clone(),
                source,
            })?;
        if let Some(reason) = limits.refusal(width, height) {
            return Err(CameraError::ImageTooLarge { path, reason });
        }
        Ok(Self {
            path,
            done: false,
            size: Some((width, height)),
            limits,
        })
    }
}

impl FrameSource for FileSource {
    fn capture(&mut self, _timeout: Duration) -> Result<Capture> {
        if self.done {
            return Ok(Capture::EndOfStream);
        }
        let frame = load_frame_with_limits(&self.path, 0, Duration::ZERO, &self.limits)?;
        self.done = true;
        Ok(Capture::Frame(frame))
    }

    fn frame_size(&self) -> Option<(u32, u32)> {
        self.size
    }

    fn fps(&self) -> Option<f64> {
        None
    }

    fn describe(&self) -> String {
        format!("file://{}", self.path.display())
    }
}

/// A directory of images played in file-name order at `fps` (timestamps only; no pacing).
///
/// An image that cannot be decoded (damaged, or over the [`ImageLimits`]) is reported (a
/// `tracing` warning, and [`DirSource::skipped`]) and skipped: the source goes on with the
/// next file, and frame indices and timestamps keep counting files in play order. Only when
/// a whole pass over the directory yields no frame is it an error.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    files: Vec<PathBuf>,
    next: u64,
    fps: f64,
    looping: bool,
    limits: ImageLimits,
    /// Files skipped so far, with the reason (each reported once).
    skipped: Vec<(PathBuf, String)>,
    /// Files tried in a row without a frame.
    failures_in_a_row: usize,
}

impl DirSource {
    pub fn new(dir: impl Into<PathBuf>, fps: f64, looping: bool) -> Result<Self> {
        let dir = dir.into();
        let entries = std::fs::read_dir(&dir).map_err(|source| CameraError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| CameraError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            let path = entry.path();
            if path.is_file() && is_image(&path) {
                files.push(path);
            }
        }
        if files.is_empty() {
            return Err(CameraError::EmptyDir { path: dir });
        }
        files.sort();
        Ok(Self {
            dir,
            files,
            next: 0,
            fps,
            looping,
            limits: ImageLimits::default(),
            skipped: Vec::new(),
            failures_in_a_row: 0,
        })
    }

    /// The same source decoding under `limits`.
    pub fn with_limits(mut self, limits: ImageLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The images in play order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Images skipped so far because they could not be decoded, with the reason.
    pub fn skipped(&self) -> &[(PathBuf, String)] {
        &self.skipped
    }
}

impl FrameSource for DirSource {
    fn capture(&mut self, _timeout: Duration) -> Result<Capture> {
        let n = self.files.len() as u64;
        loop {
            if self.next >= n && !self.looping {
                return Ok(Capture::EndOfStream);
            }
            let path = &self.files[(self.next % n) as usize];
            let loaded = load_frame_with_limits(
                path,
                self.next,
                Duration::from_secs_f64(self.next as f64 / self.fps),
                &self.limits,
            );
            self.next += 1;
            match loaded {
                Ok(frame) => {
                    self.failures_in_a_row = 0;
                    return Ok(Capture::Frame(frame));
                }
                Err(e) => {
                    let reason = e.to_string();
                    if !self.skipped.iter().any(|(p, _)| p == path) {
                        tracing::warn!(source = %self.describe(), image = %path.display(), "skipping an image that cannot be decoded: {reason}");
                        self.skipped.push((path.clone(), reason));
                    }
                    self.failures_in_a_row += 1;
                    if self.failures_in_a_row >= self.files.len() {
                        return Err(CameraError::NoReadableImage {
                            path: self.dir.clone(),
                            count: self.files.len(),
                            first: self.skipped[0].1.clone(),
                        });
                    }
                }
            }
        }
    }

    fn frame_size(&self) -> Option<(u32, u32)> {
        None
    }

    fn fps(&self) -> Option<f64> {
        Some(self.fps)
    }

    fn describe(&self) -> String {
        format!("dir://{}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use jetvlm_core::image_limits::png_declaring;

    fn frames(src: &mut DirSource) -> Result<Vec<Frame>> {
        let mut out = Vec::new();
        loop {
            match src.capture(Duration::ZERO)? {
                Capture::Frame(f) => out.push(f),
                Capture::EndOfStream => return Ok(out),
                Capture::Timeout => panic!("a directory does not time out"),
            }
        }
    }

    #[test]
    fn an_image_declaring_huge_dimensions_is_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bomb.png");
        std::fs::write(&path, png_declaring(12000, 12000)).unwrap();
        match load_frame(&path, 0, Duration::ZERO) {
            Err(e @ CameraError::ImageTooLarge { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("12000x12000") && msg.contains("bomb.png"),
                    "{msg}"
                );
            }
            other => panic!("expected ImageTooLarge, got {other:?}"),
        }
        let small = dir.path().join("small.png");
        image::RgbImage::new(3, 2).save(&small).unwrap();
        let f = load_frame_with_limits(&small, 0, Duration::ZERO, &ImageLimits::with_max_pixels(6))
            .unwrap();
        assert_eq!((f.width, f.height, f.rgb.len()), (3, 2, 18));
        assert!(matches!(
            load_frame_with_limits(&small, 0, Duration::ZERO, &ImageLimits::with_max_pixels(5)),
            Err(CameraError::ImageTooLarge { .. })
        ));
    }

    #[test]
    fn a_dir_source_reports_and_skips_images_it_cannot_decode() {
        let dir = tempfile::tempdir().unwrap();
        image::RgbImage::new(4, 4)
            .save(dir.path().join("a.png"))
            .unwrap();
        std::fs::write(dir.path().join("b.png"), b"not a png at all").unwrap();
        std::fs::write(dir.path().join("c.png"), png_declaring(12000, 12000)).unwrap();
        image::RgbImage::new(4, 4)
            .save(dir.path().join("d.jpg"))
            .unwrap();
        let mut src = DirSource::new(dir.path(), 10.0, false).unwrap();
        let got = frames(&mut src).unwrap();
        // a and d play with their play-order indices; b and c are reported and skipped.
        assert_eq!(got.iter().map(|f| f.index).collect::<Vec<_>>(), vec![0, 3]);
        assert_eq!(got[1].timestamp, Duration::from_millis(300));
        let skipped: Vec<_> = src
            .skipped()
            .iter()
            .map(|(p, why)| {
                (
                    p.file_name().unwrap().to_str().unwrap().to_string(),
                    why.clone(),
                )
            })
            .collect();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert_eq!(skipped[0].0, "b.png");
        assert_eq!(skipped[1].0, "c.png");
        assert!(skipped[1].1.contains("12000x12000"), "{skipped:?}");
    }

    #[test]
    fn the_shared_generator_makes_a_png_that_decodes_at_its_declared_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.png");
        std::fs::write(&path, png_declaring(1, 1)).unwrap();
        let f = load_frame(&path, 0, Duration::ZERO).unwrap();
        assert_eq!(
            (f.width, f.height, f.rgb.as_slice()),
            (1, 1, &[0u8, 0, 0][..])
        );
        std::fs::write(&path, png_declaring(300, 200)).unwrap();
        assert_eq!(image::image_dimensions(&path).unwrap(), (300, 200));
    }

    #[test]
    fn a_file_source_applies_its_limits_when_it_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("photo.png");
        image::RgbImage::new(4, 3).save(&path).unwrap();
        let mut src = FileSource::with_limits(&path, ImageLimits::with_max_pixels(12)).unwrap();
        match src.capture(Duration::ZERO).unwrap() {
            Capture::Frame(f) => assert_eq!((f.width, f.height), (4, 3)),
            other => panic!("expected a frame, got {other:?}"),
        }
        match FileSource::with_limits(&path, ImageLimits::with_max_pixels(11)) {
            Err(e @ CameraError::ImageTooLarge { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("photo.png") && msg.contains("4x3"), "{msg}");
            }
            other => panic!("expected ImageTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn a_dir_where_no_image_decodes_is_an_error_not_a_spin() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"junk").unwrap();
        std::fs::write(dir.path().join("b.jpg"), b"junk").unwrap();
        for looping in [false, true] {
            let mut src = DirSource::new(dir.path(), 10.0, looping).unwrap();
            match frames(&mut src) {
                Err(e @ CameraError::NoReadableImage { count: 2, .. }) => {
                    assert!(e.to_string().contains("a.png"), "{e}")
                }
                other => panic!("loop={looping}: expected NoReadableImage, got {other:?}"),
            }
        }
    }
}
