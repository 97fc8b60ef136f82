//! V4L2 cameras (`v4l2:///dev/video0?width=640&height=480&fps=30`): memory-mapped streaming,
//! YUYV, MJPG or RGB3 converted to RGB8.

use std::time::Duration;

use v4l::buffer::Type;
use v4l::io::mmap::Stream as MmapStream;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture as _;
use v4l::video::capture::Parameters;
use v4l::{Device, FourCC};

use crate::error::{CameraError, Result};
use crate::frame::{Capture, Frame, FrameSource};
use crate::pixel::yuyv_to_rgb;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pixel {
    Yuyv,
    Mjpg,
    Rgb3,
}

/// A V4L2 capture device.
pub struct V4l2Source {
    device: String,
    stream: MmapStream<'static>,
    // The stream keeps its own handle; the device is kept open alongside it.
    _dev: Device,
    width: u32,
    height: u32,
    stride: u32,
    pixel: Pixel,
    fps: Option<f64>,
    first: Option<Duration>,
    next: u64,
}

impl std::fmt::Debug for V4l2Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("V4l2Source")
            .field("device", &self.device)
            .field("size", &(self.width, self.height))
            .field("pixel", &self.pixel)
            .finish()
    }
}

impl V4l2Source {
    /// Opens `device` (e.g. `/dev/video0`), asking for the given size and rate; the driver
    /// may pick the closest it supports.
    pub fn open(
        device: &str,
        width: Option<u32>,
        height: Option<u32>,
        fps: Option<f64>,
    ) -> Result<Self> {
        let dev_err = |op: &'static str| {
            let device = device.to_string();
            move |source| CameraError::Device { device, op, source }
        };
        let dev = Device::with_path(device).map_err(dev_err("open"))?;
        let mut fmt = dev.format().map_err(dev_err("VIDIOC_G_FMT"))?;
        if let Some(w) = width {
            fmt.width = w;
        }
        if let Some(h) = height {
            fmt.height = h;
        }
        let offered = fmt.fourcc;
        let mut chosen = None;
        let mut refused = None;
        for (code, pixel) in [
            (b"YUYV", Pixel::Yuyv),
            (b"MJPG", Pixel::Mjpg),
            (b"RGB3", Pixel::Rgb3),
        ] {
            fmt.fourcc = FourCC::new(code);
            // A driver may refuse a format outright (EINVAL, or EBUSY while another process
            // streams): try the next one.
            match dev.set_format(&fmt) {
                Ok(got) if got.fourcc == FourCC::new(code) => {
                    chosen = Some((got, pixel));
                    break;
                }
                Ok(_) => {}
                Err(e) => refused = Some(e),
            }
        }
        let Some((fmt, pixel)) = chosen else {
            return Err(CameraError::DeviceFormat {
                device: device.to_string(),
                reason: unsupported_format(&offered, refused.as_ref()),
            });
        };
        let fps = match fps {
            Some(f) => {
                let p = dev
                    .set_params(&Parameters::with_fps(f.round().max(1.0) as u32))
                    .map_err(dev_err("VIDIOC_S_PARM"))?;
                let (n, d) = (p.interval.numerator, p.interval.denominator);
                (n > 0).then(|| d as f64 / n as f64)
            }
            None => None,
        };
        let stream = MmapStream::with_buffers(&dev, Type::VideoCapture, 4)
            .map_err(dev_err("VIDIOC_REQBUFS"))?;
        Ok(Self {
            device: device.to_string(),
            stream,
            _dev: dev,
            width: fmt.width,
            height: fmt.height,
            stride: fmt.stride,
            pixel,
            fps,
            first: None,
            next: 0,
        })
    }
}

impl FrameSource for V4l2Source {
    fn capture(&mut self, timeout: Duration) -> Result<Capture> {
        self.stream
            .set_timeout(timeout.max(Duration::from_millis(1)));
        let (buf, meta) = match self.stream.next() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Ok(Capture::Timeout),
            Err(source) => {
                return Err(CameraError::Device {
                    device: self.device.clone(),
                    op: "VIDIOC_DQBUF",
                    source,
                });
            }
        };
        let used = (meta.bytesused as usize).min(buf.len());
        let data = &buf[..used];
        let rgb = match self.pixel {
            Pixel::Yuyv => yuyv_to_rgb(data, self.width, self.height, self.stride, &self.device)?,
            Pixel::Rgb3 => {
                let row = self.width as usize * 3;
                let stride = (self.stride as usize).max(row);
                if data.len() < stride * (self.height as usize - 1) + row {
                    return Err(CameraError::DeviceFormat {
                        device: self.device.clone(),
                        reason: format!("RGB3 buffer of {} bytes too small", data.len()),
                    });
                }
                (0..self.height as usize)
                    .flat_map(|y| data[y * stride..y * stride + row].iter().copied())
                    .collect()
            }
            Pixel::Mjpg => {
                let bad = |reason: String| CameraError::DeviceFormat {
                    device: self.device.clone(),
                    reason: format!("MJPG frame: {reason}"),
                };
                let reader = || {
                    image::ImageReader::with_format(
                        std::io::Cursor::new(data),
                        image::ImageFormat::Jpeg,
                    )
                };
                // The frame's own header is checked before decoding: a corrupt frame that
                // declares a huge image is refused, not decoded.
                let (w, h) = reader().into_dimensions().map_err(|e| bad(e.to_string()))?;
                if let Some(reason) = jetvlm_core::ImageLimits::default().refusal(w, h) {
                    return Err(bad(reason));
                }
                let mut r = reader();
                r.limits(crate::still::decoder_limits(
                    &jetvlm_core::ImageLimits::default(),
                ));
                let img = r.decode().map_err(|e| bad(e.to_string()))?;
                img.to_rgb8().into_raw()
            }
        };
        let ts = Duration::from_secs(meta.timestamp.sec.max(0) as u64)
            + Duration::from_micros(meta.timestamp.usec.max(0) as u64);
        let first = *self.first.get_or_insert(ts);
        let frame = Frame {
            index: self.next,
            timestamp: ts.saturating_sub(first),
            width: self.width,
            height: self.height,
            rgb,
        };
        self.next += 1;
        Ok(Capture::Frame(frame))
    }

    fn frame_size(&self) -> Option<(u32, u32)> {
        Some((self.width, self.height))
    }

    fn fps(&self) -> Option<f64> {
        self.fps
    }

    fn describe(&self) -> String {
        format!("v4l2://{}", self.device)
    }
}

/// Why no capture format fits: what the device offers, the last refusal, and the usual cause
/// on a Jetson (a CSI sensor's raw Bayer node, read through Argus rather than V4L2).
fn unsupported_format(offered: &FourCC, refused: Option<&std::io::Error>) -> String {
    let name = offered
        .str()
        .map_or_else(|_| format!("{:?}", offered.repr), str::to_string);
    let mut reason = format!("supports none of YUYV, MJPG, RGB3 (it offers {name})");
    if let Some(e) = refused {
        reason.push_str(&format!("; setting a format failed: {e}"));
    }
    reason.push_str(
        "; USB (UVC) cameras offer YUYV or MJPG. A Jetson CSI sensor gives raw Bayer frames: \
         read it with nvarguscamerasrc into a v4l2loopback device and open that one",
    );
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_formats_name_the_offer_and_the_csi_route() {
        let refused = std::io::Error::from_raw_os_error(16);
        let r = unsupported_format(&FourCC::new(b"RG10"), Some(&refused));
        assert!(r.contains("it offers RG10"), "{r}");
        assert!(r.contains("setting a format failed"), "{r}");
        assert!(r.contains("nvarguscamerasrc"), "{r}");
    }
}
