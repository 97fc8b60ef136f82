//! Still images as sources: `file://image.png` (one frame, then end of stream) and
//! `dir://frames/?fps=10&loop=0` (every .png/.jpg/.jpeg in name order).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{CameraError, Result};
use crate::frame::{Capture, Frame, FrameSource};

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        .unwrap_or(false)
}

/// Decodes an image file into an RGB8 frame.
pub fn load_frame(path: &Path, index: u64, timestamp: Duration) -> Result<Frame> {
    if !is_image(path) {
        return Err(CameraError::UnsupportedImage {
            path: path.to_path_buf(),
        });
    }
    let img = image::open(path).map_err(|source| CameraError::ReadImage {
        path: path.to_path_buf(),
        source,
    })?;
    let rgb = img.to_rgb8();
    Ok(Frame {
        index,
        timestamp,
        width: rgb.width(),
        height: rgb.height(),
        rgb: rgb.into_raw(),
    })
}

/// A single image file: one frame, then end of stream.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    done: bool,
    size: Option<(u32, u32)>,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        if !is_image(&path) {
            return Err(CameraError::UnsupportedImage { path });
        }
        let size = image::image_dimensions(&path).map_err(|source| CameraError::ReadImage {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            path,
            done: false,
            size: Some(size),
        })
    }
}

impl FrameSource for FileSource {
    fn capture(&mut self, _timeout: Duration) -> Result<Capture> {
        if self.done {
            return Ok(Capture::EndOfStream);
        }
        let frame = load_frame(&self.path, 0, Duration::ZERO)?;
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
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    files: Vec<PathBuf>,
    next: u64,
    fps: f64,
    looping: bool,
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
        })
    }

    /// The images in play order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

impl FrameSource for DirSource {
    fn capture(&mut self, _timeout: Duration) -> Result<Capture> {
        let n = self.files.len() as u64;
        if self.next >= n && !self.looping {
            return Ok(Capture::EndOfStream);
        }
        let path = &self.files[(self.next % n) as usize];
        let frame = load_frame(
            path,
            self.next,
            Duration::from_secs_f64(self.next as f64 / self.fps),
        )?;
        self.next += 1;
        Ok(Capture::Frame(frame))
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
