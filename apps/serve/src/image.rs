//! Image parts of a request: what an `image_url` may name, and decoding `data:` images.
//!
//! A request names an image by a `data:image/png;base64,...` or `data:image/jpeg;base64,...`
//! URI, or by `camera://latest` / `camera://window` (the server's `--source`). No other URL
//! is ever fetched or opened: `file://`, `http(s)://` and paths are refused with a 400 that
//! names the field.

use crate::error::ApiError;
use base64::Engine;
use jetvlm_camera::Frame;
use jetvlm_core::ImageLimits;
use std::time::Duration;

/// What an `image_url` names.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageRef {
    /// Encoded PNG or JPEG bytes from a `data:` URI; `param` is the field it came from.
    Data { param: String, bytes: Vec<u8> },
    /// The newest frame of the server's frame source.
    CameraLatest,
    /// The frames of the rolling window already in the KV cache.
    CameraWindow,
}

/// The two camera references.
pub const CAMERA_LATEST: &str = "camera://latest";
pub const CAMERA_WINDOW: &str = "camera://window";

/// Bytes of base64 text that encode `n` bytes (padded), `None` on overflow.
pub fn base64_len(n: usize) -> Option<usize> {
    n.checked_add(2)?.checked_div(3)?.checked_mul(4)
}

/// Classifies an `image_url.url` found at `param`; `data:` payloads are base64-decoded
/// (refused with 413 past `max_bytes` decoded bytes, before decoding when the text alone
/// says so).
pub fn parse_url(url: &str, param: &str, max_bytes: usize) -> Result<ImageRef, ApiError> {
    let lower = url.get(..16).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("data:") {
        return parse_data(url, param, max_bytes);
    }
    if lower.starts_with("camera:") {
        return match url {
            CAMERA_LATEST => Ok(ImageRef::CameraLatest),
            CAMERA_WINDOW => Ok(ImageRef::CameraWindow),
            _ => Err(ApiError::invalid(
                param,
                "invalid_image_url",
                format!(
                    "unknown camera reference `{}`: use {CAMERA_LATEST} (the newest frame) or \
                     {CAMERA_WINDOW} (the frames cached in the rolling window)",
                    shorten(url)
                ),
            )),
        };
    }
    let why = if lower.starts_with("file:") {
        "file URLs are refused: the server never opens a path named by a request"
    } else if lower.starts_with("http:") || lower.starts_with("https:") {
        "the server does not fetch URLs"
    } else {
        "not a data: URI or a camera reference"
    };
    Err(ApiError::invalid(
        param,
        "invalid_image_url",
        format!(
            "image URL `{}`: {why}; send the image inline as data:image/png;base64,... or \
             data:image/jpeg;base64,..., or use {CAMERA_LATEST} / {CAMERA_WINDOW}",
            shorten(url)
        ),
    ))
}

/// At most 60 characters of a URL, for messages (a data: URI can be megabytes).
fn shorten(url: &str) -> String {
    match url.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &url[..i]),
        None => url.to_string(),
    }
}

fn parse_data(url: &str, param: &str, max_bytes: usize) -> Result<ImageRef, ApiError> {
    let bad = |why: &str| ApiError::invalid(param, "invalid_image", format!("data: URI: {why}"));
    let (head, payload) = url
        .split_once(',')
        .ok_or_else(|| bad("no `,` between the media type and the data"))?;
    let head = head[5..].to_ascii_lowercase();
    let mut parts = head.split(';');
    let mime = parts.next().unwrap_or("");
    let base64 = parts.any(|p| p == "base64");
    if !matches!(mime, "image/png" | "image/jpeg" | "image/jpg") {
        return Err(bad(&format!(
            "media type `{mime}`: only image/png and image/jpeg are accepted"
        )));
    }
    if !base64 {
        return Err(bad("the data must be base64 (data:image/png;base64,...)"));
    }
    let payload = payload.trim();
    // Decoded size, from the text alone: refuse before decoding.
    let padding = payload
        .bytes()
        .rev()
        .take_while(|b| *b == b'=')
        .count()
        .min(2);
    let decoded = (payload.len() / 4 * 3).saturating_sub(padding);
    if decoded > max_bytes {
        return Err(too_large(param, decoded, max_bytes));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|e| bad(&format!("the base64 data does not decode ({e})")))?;
    if bytes.len() > max_bytes {
        return Err(too_large(param, bytes.len(), max_bytes));
    }
    let png = bytes.starts_with(b"\x89PNG\r\n\x1a\n");
    let jpeg = bytes.starts_with(&[0xFF, 0xD8, 0xFF]);
    match (mime, png, jpeg) {
        ("image/png", true, _) | ("image/jpeg" | "image/jpg", _, true) => {}
        _ => {
            return Err(bad(&format!(
                "the data is not a {} image (its first bytes do not match)",
                if mime == "image/png" { "PNG" } else { "JPEG" }
            )));
        }
    }
    Ok(ImageRef::Data {
        param: param.to_string(),
        bytes,
    })
}

fn too_large(param: &str, bytes: usize, max: usize) -> ApiError {
    ApiError::too_large(
        Some(param.to_string()),
        format!("image of {bytes} bytes is over the limit of {max} bytes (--max-image-bytes)"),
    )
}

/// Decodes PNG/JPEG bytes to an RGB frame (index 0, as `jetvlm ask` numbers a single image);
/// an image whose header declares more pixels than `limits` allow is refused (413) before
/// any pixel is decoded, and decoding may not allocate past the limits.
pub fn decode(
    bytes: &[u8],
    param: &str,
    limits: &ImageLimits,
    index: u64,
) -> Result<Frame, ApiError> {
    let bad = |e: image::ImageError| {
        ApiError::invalid(
            param,
            "invalid_image",
            format!("the image does not decode: {e}"),
        )
    };
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| bad(image::ImageError::IoError(e)))
    };
    let (w, h) = reader()?.into_dimensions().map_err(bad)?;
    if let Some(reason) = limits.refusal(w, h) {
        return Err(ApiError::too_large(
            Some(param.to_string()),
            format!("image refused: {reason}"),
        ));
    }
    let mut r = reader()?;
    let mut l = image::Limits::default();
    l.max_alloc = Some(limits.max_alloc_bytes);
    r.limits(l);
    let rgb = r.decode().map_err(bad)?.to_rgb8();
    Ok(Frame {
        index,
        timestamp: Duration::ZERO,
        width: rgb.width(),
        height: rgb.height(),
        rgb: rgb.into_raw(),
    })
}

/// JPEG bytes of a frame (the web view's live frame).
pub fn jpeg(frame: &Frame, quality: u8) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
    enc.encode(
        &frame.rgb,
        frame.width,
        frame.height,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([200, 10, 10]));
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn data_uri(mime: &str, bytes: &[u8]) -> String {
        format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    #[test]
    fn data_uris_decode_and_keep_their_param() {
        let bytes = png(3, 2);
        let r = parse_url(&data_uri("image/png", &bytes), "p", 1 << 20).unwrap();
        let ImageRef::Data { param, bytes: got } = r else {
            panic!("not data")
        };
        assert_eq!((param.as_str(), got.as_slice()), ("p", bytes.as_slice()));
        let f = decode(&got, "p", &ImageLimits::default(), 0).unwrap();
        assert_eq!((f.width, f.height, f.rgb.len()), (3, 2, 18));
        assert_eq!(f.pixel(0, 0), Some([200, 10, 10]));
    }

    #[test]
    fn urls_other_than_data_and_camera_are_refused_naming_the_param() {
        for url in [
            "file:///etc/passwd",
            "FILE:///etc/passwd",
            "http://127.0.0.1/x.png",
            "https://example.invalid/a.jpg",
            "/etc/passwd",
            "camera://other",
        ] {
            let e = parse_url(url, "messages[0].content[1].image_url.url", 100).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{url}");
            assert_eq!(
                e.param.as_deref(),
                Some("messages[0].content[1].image_url.url")
            );
            assert_eq!(e.code, Some("invalid_image_url"));
        }
        assert_eq!(parse_url(CAMERA_LATEST, "p", 1), Ok(ImageRef::CameraLatest));
        assert_eq!(parse_url(CAMERA_WINDOW, "p", 1), Ok(ImageRef::CameraWindow));
    }

    #[test]
    fn bad_data_is_400_and_oversize_is_413() {
        let bytes = png(4, 4);
        // Wrong media type, not base64, bad base64, bytes that are not the type named.
        for url in [
            data_uri("image/gif", &bytes),
            format!("data:image/png,{}", "abc"),
            "data:image/png;base64,@@@@".to_string(),
            data_uri("image/jpeg", &bytes),
            data_uri("image/png", b"not a png at all"),
        ] {
            let e = parse_url(&url, "p", 1 << 20).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.code),
                (400, Some("invalid_image")),
                "{url}"
            );
        }
        let e = parse_url(&data_uri("image/png", &bytes), "p", bytes.len() - 1).unwrap_err();
        assert_eq!(e.status.as_u16(), 413);
        assert!(parse_url(&data_uri("image/png", &bytes), "p", bytes.len()).is_ok());
        // A PNG header that decodes to garbage after the signature: 400, not a panic.
        let mut broken = bytes.clone();
        broken.truncate(30);
        let e = decode(&broken, "p", &ImageLimits::default(), 0).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        // Over the pixel limit: 413 from the header.
        let e = decode(&bytes, "p", &ImageLimits::with_max_pixels(15), 0).unwrap_err();
        assert_eq!(e.status.as_u16(), 413);
        assert!(e.message.contains("4x4"), "{}", e.message);
    }

    #[test]
    fn base64_len_matches_the_encoder() {
        for n in [0usize, 1, 2, 3, 4, 100, 1001] {
            let s = base64::engine::general_purpose::STANDARD.encode(vec![0u8; n]);
            assert_eq!(base64_len(n), Some(s.len()));
        }
        assert_eq!(base64_len(usize::MAX), None);
    }
}
