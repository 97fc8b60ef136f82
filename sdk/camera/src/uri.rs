//! Source URIs and [`open`].
//!
//! - `synthetic://scene?fps=10&seed=7&width=128&height=128&frames=100&pace=1&objects=5`
//! - `file://path/to/image.png` (also `file:///abs/path.jpg`)
//! - `dir://path/to/frames?fps=10&loop=0`
//! - `v4l2:///dev/video0?width=640&height=480&fps=30` (feature `v4l`)
//!
//! A bare path (no `scheme://`) opens as `dir://` when it is a directory, else `file://`.

use std::path::Path;

use crate::error::{CameraError, Result};
use crate::frame::FrameSource;
use crate::scene::SceneConfig;
use crate::still::{DirSource, FileSource};
use crate::synthetic::{SyntheticOptions, SyntheticSource};
use crate::v4l2::V4l2Source;

/// Kinds of source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Synthetic,
    File,
    Dir,
    V4l2,
}

/// A parsed source URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceUri {
    pub scheme: Scheme,
    /// The part after `scheme://` and before `?` (scene name, file, directory or device).
    pub path: String,
    pub params: Vec<(String, String)>,
    pub raw: String,
}

impl SourceUri {
    pub fn parse(uri: &str) -> Result<Self> {
        let invalid = |reason: &str| CameraError::InvalidUri {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = match uri.split_once("://") {
            Some((s, rest)) => {
                let scheme = match s {
                    "synthetic" => Scheme::Synthetic,
                    "file" => Scheme::File,
                    "dir" => Scheme::Dir,
                    "v4l2" => Scheme::V4l2,
                    other => {
                        return Err(CameraError::UnsupportedScheme {
                            uri: uri.to_string(),
                            scheme: other.to_string(),
                        });
                    }
                };
                (scheme, rest)
            }
            None if Path::new(uri).is_dir() => (Scheme::Dir, uri),
            None => (Scheme::File, uri),
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err(invalid("empty path"));
        }
        let mut params = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| invalid(&format!("parameter `{pair}` is not key=value")))?;
            params.push((k.to_string(), v.to_string()));
        }
        Ok(Self {
            scheme,
            path: path.to_string(),
            params,
            raw: uri.to_string(),
        })
    }

    /// The last value of parameter `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn parsed<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>> {
        match self.param(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| CameraError::InvalidUri {
                uri: self.raw.clone(),
                reason: format!(
                    "parameter `{key}={v}` is not a valid {}",
                    std::any::type_name::<T>()
                ),
            }),
        }
    }

    fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.param(key) {
            None => Ok(default),
            Some("1" | "true" | "yes" | "on") => Ok(true),
            Some("0" | "false" | "no" | "off") => Ok(false),
            Some(v) => Err(CameraError::InvalidUri {
                uri: self.raw.clone(),
                reason: format!("parameter `{key}={v}` is not a boolean"),
            }),
        }
    }

    fn check_keys(&self, allowed: &[&str]) -> Result<()> {
        match self
            .params
            .iter()
            .find(|(k, _)| !allowed.contains(&k.as_str()))
        {
            None => Ok(()),
            Some((k, _)) => Err(CameraError::InvalidUri {
                uri: self.raw.clone(),
                reason: format!(
                    "unknown parameter `{k}` (expected one of: {})",
                    allowed.join(", ")
                ),
            }),
        }
    }

    fn fps(&self, default: f64) -> Result<f64> {
        let fps = self.parsed::<f64>("fps")?.unwrap_or(default);
        if !(fps.is_finite() && fps > 0.0 && fps <= 1000.0) {
            return Err(CameraError::InvalidUri {
                uri: self.raw.clone(),
                reason: format!("fps {fps} outside (0, 1000]"),
            });
        }
        Ok(fps)
    }

    /// Options of a `synthetic://` URI.
    pub fn synthetic_options(&self) -> Result<SyntheticOptions> {
        self.check_keys(&[
            "fps", "seed", "width", "height", "frames", "pace", "objects",
        ])?;
        if !matches!(self.path.as_str(), "scene" | "shapes") {
            return Err(CameraError::InvalidUri {
                uri: self.raw.clone(),
                reason: format!("unknown synthetic scene `{}` (expected `scene`)", self.path),
            });
        }
        let mut scene = SceneConfig::default();
        scene.width = self.parsed("width")?.unwrap_or(scene.width);
        scene.height = self.parsed("height")?.unwrap_or(scene.height);
        scene.max_objects = self.parsed("objects")?.unwrap_or(scene.max_objects);
        scene.validate()?;
        Ok(SyntheticOptions {
            scene,
            seed: self.parsed("seed")?.unwrap_or(0),
            fps: self.fps(10.0)?,
            frames: self.parsed("frames")?,
            pace: self.flag("pace", true)?,
        })
    }
}

/// Opens the source a URI names.
pub fn open(uri: &str) -> Result<Box<dyn FrameSource>> {
    let u = SourceUri::parse(uri)?;
    Ok(match u.scheme {
        Scheme::Synthetic => Box::new(SyntheticSource::new(u.synthetic_options()?, uri)?),
        Scheme::File => {
            u.check_keys(&[])?;
            Box::new(FileSource::new(&u.path)?)
        }
        Scheme::Dir => {
            u.check_keys(&["fps", "loop"])?;
            Box::new(DirSource::new(
                &u.path,
                u.fps(10.0)?,
                u.flag("loop", false)?,
            )?)
        }
        Scheme::V4l2 => {
            u.check_keys(&["width", "height", "fps"])?;
            let fps = match u.param("fps") {
                Some(_) => Some(u.fps(30.0)?),
                None => None,
            };
            Box::new(V4l2Source::open(
                &u.path,
                u.parsed("width")?,
                u.parsed("height")?,
                fps,
            )?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_synthetic_options() {
        let u =
            SourceUri::parse("synthetic://scene?fps=5&seed=7&width=64&height=48&frames=3&pace=0")
                .unwrap();
        assert_eq!(u.scheme, Scheme::Synthetic);
        let o = u.synthetic_options().unwrap();
        assert_eq!(
            (o.scene.width, o.scene.height, o.seed, o.frames, o.pace),
            (64, 48, 7, Some(3), false)
        );
        assert_eq!(o.fps, 5.0);
        let d = SourceUri::parse("synthetic://scene")
            .unwrap()
            .synthetic_options()
            .unwrap();
        assert_eq!((d.fps, d.seed, d.frames, d.pace), (10.0, 0, None, true));
    }

    #[test]
    fn rejects_bad_uris_with_the_reason() {
        let err = |u: &str| open(u).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err("rtsp://cam/1").contains("unsupported source scheme `rtsp`"));
        assert!(err("synthetic://scene?fps=abc").contains("fps=abc"));
        assert!(err("synthetic://scene?fps=0").contains("fps 0"));
        assert!(err("synthetic://scene?colour=red").contains("unknown parameter `colour`"));
        assert!(err("synthetic://movie").contains("unknown synthetic scene"));
        assert!(err("synthetic://scene?seed").contains("not key=value"));
        assert!(err("file://clip.mp4").contains("expected .png, .jpg or .jpeg"));
        assert!(err("dir:///nonexistent/frames").contains("listing directory /nonexistent/frames"));
    }

    #[cfg(not(feature = "v4l"))]
    #[test]
    fn v4l2_without_the_feature_is_a_typed_error() {
        assert!(matches!(
            open("v4l2:///dev/video0"),
            Err(CameraError::NotCompiledWithV4l { .. })
        ));
    }
}
