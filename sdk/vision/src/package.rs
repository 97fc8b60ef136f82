//! The model package: a directory with a `jetvlm.yaml` manifest, the vision encoder
//! (`.onnx`) and the decoder in Hugging Face layout.
//!
//! [`ModelPackage::load`] validates everything it can before any weight is read (files
//! exist, shapes agree between the manifest, the decoder's `config.json` and the ONNX
//! signature, prompt template placeholders, normalisation constants) and reports every
//! problem at once in one error naming `jetvlm.yaml`.

use crate::VisionError;
use crate::onnx::{self, ElemType, OnnxSignature};
use crate::preprocess::{InputDType, Interpolation, Layout, PreprocessConfig, ResizeMode};
use jetvlm_core::hf::ModelConfig;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// The manifest file name inside a package directory.
pub const MANIFEST: &str = "jetvlm.yaml";

/// One problem found in a package, with the manifest field it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub field: String,
    pub message: String,
}

impl Issue {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Issue {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "`{}`: {}", self.field, self.message)
        }
    }
}

/// `jetvlm.yaml`, format 1, as written.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub vision: VisionSection,
    pub decoder: DecoderSection,
    pub prompt: PromptSection,
    #[serde(default)]
    pub kv: KvSection,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSize {
    pub height: u32,
    pub width: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VisionSection {
    /// Path of the ONNX encoder, relative to the package.
    pub encoder: PathBuf,
    pub image_size: ImageSize,
    #[serde(default)]
    pub resize: ResizeMode,
    /// The resize's resampling filter (bilinear, bicubic, lanczos): the one the model's
    /// processor uses.
    #[serde(default)]
    pub interpolation: Interpolation,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    #[serde(default)]
    pub layout: Layout,
    #[serde(default)]
    pub input_dtype: InputDType,
    pub tokens_per_frame: usize,
    /// Input tensor name (default: the model's first input).
    #[serde(default)]
    pub input_name: Option<String>,
    /// Output tensor name (default: the model's first output).
    #[serde(default)]
    pub output_name: Option<String>,
    /// DeepStack (Qwen3-VL): the output `[batch, deepstack_layers, tokens_per_frame,
    /// hidden_size]` of the features the decoder adds after its first layers; required when
    /// the decoder's config.json sets `deepstack_layers`.
    #[serde(default)]
    pub deepstack_output: Option<String>,
    /// TensorRT execution provider settings for this encoder.
    #[serde(default)]
    pub tensorrt: Option<TensorRtSection>,
    /// Frames split into tiles (Idefics3/SmolVLM image splitting): the encoder runs once per
    /// tile and once on the global image, each at `image_size`, and `tokens_per_frame` is
    /// per run. Absent: one encoder run per frame.
    #[serde(default)]
    pub tiles: Option<TileSection>,
}

/// Most tiles of a frame (rows x cols); Idefics3's 4096-pixel bound at its smallest tile
/// gives far fewer.
pub const MAX_TILES: u32 = 1024;

/// `vision.tiles`: how a frame is cut into tiles, as the model's processor does it (the
/// Idefics3 image processor with `do_image_splitting`): every frame is resized so its
/// longest edge is `longest_edge` ([`TileSection::scaled`]), then to whole tiles (`cols x
/// rows` tiles of `image_size`), cut row-major; the global image is that whole-tile image
/// resized to one tile. `rows` and `cols` 0: the frame is not split, only its longest-edge
/// resize resized to one tile (the processor without splitting, whose longest-edge resize is
/// not a no-op). All resizes use `vision.interpolation` on 8-bit RGB, as the processor's PIL
/// backend does.
///
/// In a prompt a frame is `prompt.frame_prefix`, then for each row and column
/// `tile_prefix` (`{row}`, `{col}`: 1-based) and the tile's embeddings, `row_suffix` after
/// each row, then `global_prefix`, the global image's embeddings and `prompt.frame_suffix`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TileSection {
    /// The frame size the grid was computed for (`jetvlm export --frame-size`); frames of
    /// another size get the same grid (the processor might pick another for them).
    pub frame: ImageSize,
    /// The processor's `size.longest_edge`: each frame is first resized so its longest edge
    /// is this ([`TileSection::scaled`]); absent: not resized first (`do_resize` off).
    #[serde(default)]
    pub longest_edge: Option<u32>,
    pub rows: u32,
    pub cols: u32,
    /// Whether the whole frame, resized to one tile, follows the tiles.
    #[serde(default = "yes")]
    pub global_image: bool,
    /// Text before each tile's embeddings; `{row}` and `{col}` are its 1-based row and
    /// column.
    #[serde(default)]
    pub tile_prefix: String,
    /// Text after each row of tiles.
    #[serde(default)]
    pub row_suffix: String,
    /// Text before the global image's embeddings.
    #[serde(default)]
    pub global_prefix: String,
}

impl TileSection {
    /// Encoder runs per frame: the tiles and the global image. Validated packages keep it
    /// within [`MAX_TILES`] + 1.
    pub fn runs(&self) -> usize {
        (self.rows as usize).saturating_mul(self.cols as usize) + usize::from(self.global_image)
    }

    /// The size a `width x height` frame is resized to first: the Idefics3 processor's
    /// `_resize_output_size_rescale_to_max_len` (the longest edge to `longest_edge`, the other
    /// side from the aspect ratio, truncated and made even) and
    /// `_resize_output_size_scale_below_upper_bound` (at most 4096 pixels a side); the frame's
    /// own size without `longest_edge`.
    pub fn scaled(&self, width: u32, height: u32) -> (u32, u32) {
        let Some(longest) = self.longest_edge else {
            return (width, height);
        };
        let even = |v: u32| if v % 2 == 1 { v + 1 } else { v };
        let (w, h) = (f64::from(width.max(1)), f64::from(height.max(1)));
        let aspect = w / h;
        let (mut w1, mut h1) = if width >= height {
            (longest, even((f64::from(longest) / aspect) as u32))
        } else {
            (even((f64::from(longest) * aspect) as u32), longest)
        };
        (w1, h1) = (w1.max(1), h1.max(1));
        const MAX_SIDE: u32 = 4096;
        let aspect = f64::from(w1) / f64::from(h1);
        if w1 >= h1 && w1 > MAX_SIDE {
            (w1, h1) = (MAX_SIDE, (f64::from(MAX_SIDE) / aspect) as u32);
        } else if h1 > w1 && h1 > MAX_SIDE {
            (w1, h1) = ((f64::from(MAX_SIDE) * aspect) as u32, MAX_SIDE);
        }
        (w1.max(1), h1.max(1))
    }

    /// `tile_prefix` of the tile at 0-based `row`, `col`.
    pub fn tile_text(&self, row: u32, col: u32) -> String {
        self.tile_prefix
            .replace("{row}", &(row + 1).to_string())
            .replace("{col}", &(col + 1).to_string())
    }
}

impl VisionSection {
    /// Image tokens of one frame: `tokens_per_frame` per encoder run, times the runs of a
    /// tiled frame (saturating; a validated package keeps it small).
    pub fn frame_tokens(&self) -> usize {
        let runs = self.tiles.as_ref().map_or(1, TileSection::runs);
        self.tokens_per_frame.saturating_mul(runs)
    }
}

/// TensorRT build settings; the engine is built once per board and cached.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TensorRtSection {
    #[serde(default = "yes")]
    pub fp16: bool,
    #[serde(default)]
    pub int8: bool,
    /// Engine cache directory, relative to the package (or absolute).
    #[serde(default)]
    pub engine_cache: Option<PathBuf>,
    #[serde(default)]
    pub workspace_mb: Option<usize>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderSection {
    pub dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSection {
    /// `{frames}` and `{question}` placeholders; the rest is literal text.
    pub template: String,
    /// Text before each frame's embeddings; `{i}` is the 1-based frame number.
    #[serde(default)]
    pub frame_prefix: String,
    /// Text after each frame's embeddings.
    #[serde(default)]
    pub frame_suffix: String,
    #[serde(default)]
    pub add_bos: bool,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub default_question: Option<String>,
    /// The model family's image placeholder token (e.g. `<image>`), for reference; the
    /// runtime places embeddings directly and never feeds this token.
    #[serde(default)]
    pub image_token: Option<String>,
    /// System prompt kept at the start of a streaming session's cache.
    #[serde(default)]
    pub system: Option<String>,
    /// Frames per prompt the model was trained with: a question or a session window with
    /// more runs, with a warning naming this limit (answers can get worse past it).
    #[serde(default)]
    pub max_frames: Option<usize>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KvSection {
    pub policy: String,
    /// A calibration file of `jetvlm calibrate` (relative to the package): when set, the
    /// runtime uses its policy (a frame format per layer) unless a runtime config or flag
    /// names a policy or another calibration.
    #[serde(default)]
    pub calibration: Option<PathBuf>,
}

impl Default for KvSection {
    fn default() -> Self {
        KvSection {
            policy: "mixed".into(),
            calibration: None,
        }
    }
}

/// A validated package: the manifest plus resolved paths and the facts read while
/// validating (decoder config, encoder signature).
#[derive(Clone, Debug)]
pub struct ModelPackage {
    pub dir: PathBuf,
    pub manifest_path: PathBuf,
    pub manifest: Manifest,
    pub encoder_path: PathBuf,
    pub decoder_dir: PathBuf,
    pub decoder_config: ModelConfig,
    pub encoder_signature: OnnxSignature,
}

impl ModelPackage {
    /// Loads and validates the package in `dir` (or the manifest file itself).
    pub fn load(dir: &Path) -> Result<Self, VisionError> {
        Self::load_with(dir, |_, _| {})
    }

    /// As [`load`](Self::load), with extra checks from the caller (e.g. that `kv.policy`
    /// parses) whose issues are reported together with the package's own.
    pub fn load_with(
        dir: &Path,
        extra: impl FnOnce(&Manifest, &mut Vec<Issue>),
    ) -> Result<Self, VisionError> {
        let (dir, manifest_path) = if dir.is_file() {
            let parent = dir.parent().unwrap_or(Path::new(".")).to_path_buf();
            (parent, dir.to_path_buf())
        } else {
            (dir.to_path_buf(), dir.join(MANIFEST))
        };
        let fail = |issues: Vec<Issue>| VisionError::Package {
            manifest: manifest_path.clone(),
            issues,
        };
        if !manifest_path.is_file() {
            let message = if dir.is_dir() {
                format!("no {MANIFEST} in {}", dir.display())
            } else {
                format!("package directory {} does not exist", dir.display())
            };
            return Err(fail(vec![Issue::new("", message)]));
        }
        let manifest: Manifest = jetvlm_core::config::load_yaml(&manifest_path).map_err(|e| {
            let field = e.field().unwrap_or("").to_string();
            fail(vec![Issue::new(field, e.to_string())])
        })?;

        let mut issues = Vec::new();
        if let Some(c) = &manifest.kv.calibration
            && !dir.join(c).is_file()
        {
            issues.push(Issue::new(
                "kv.calibration",
                not_a_file(&dir.join(c), "a calibration file"),
            ));
        }
        if manifest.format != 1 {
            issues.push(Issue::new(
                "format",
                format!(
                    "format {} is not supported (this build reads format 1)",
                    manifest.format
                ),
            ));
        }
        let v = &manifest.vision;
        let (h, w) = (v.image_size.height, v.image_size.width);
        if !(1..=8192).contains(&h) || !(1..=8192).contains(&w) {
            issues.push(Issue::new(
                "vision.image_size",
                format!("{w}x{h} is out of range (1..=8192 each side)"),
            ));
        }
        if v.mean.len() != 3 {
            issues.push(Issue::new(
                "vision.mean",
                format!("needs 3 values (R, G, B), got {}", v.mean.len()),
            ));
        } else if v.mean.iter().any(|m| !(0.0..=1.0).contains(m)) {
            issues.push(Issue::new(
                "vision.mean",
                "values apply to RGB in [0, 1]; each must lie in [0, 1]",
            ));
        }
        if v.std.len() != 3 {
            issues.push(Issue::new(
                "vision.std",
                format!("needs 3 values (R, G, B), got {}", v.std.len()),
            ));
        } else if v.std.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
            issues.push(Issue::new("vision.std", "values must be positive"));
        }
        if v.tokens_per_frame == 0 {
            issues.push(Issue::new("vision.tokens_per_frame", "must be at least 1"));
        }

        let encoder_path = dir.join(&v.encoder);
        let mut signature = None;
        if !encoder_path.is_file() {
            issues.push(Issue::new(
                "vision.encoder",
                not_a_file(&encoder_path, "an .onnx file"),
            ));
        } else {
            match onnx::read_signature(&encoder_path) {
                Ok(sig) => signature = Some(sig),
                Err(e) => issues.push(Issue::new("vision.encoder", e.to_string())),
            }
        }

        let decoder_dir = dir.join(&manifest.decoder.dir);
        let mut decoder_config = None;
        if !decoder_dir.is_dir() {
            let message = if decoder_dir.exists() {
                format!(
                    "{} is a file, not a directory of decoder files",
                    decoder_dir.display()
                )
            } else {
                format!("{} does not exist", decoder_dir.display())
            };
            issues.push(Issue::new("decoder.dir", message));
        } else {
            let config = decoder_dir.join("config.json");
            if config.is_file() {
                match ModelConfig::from_file(&config) {
                    Ok(c) => decoder_config = Some(c),
                    Err(e) => issues.push(Issue::new("decoder.dir", e.to_string())),
                }
            } else {
                issues.push(Issue::new(
                    "decoder.dir",
                    format!("{} is missing", config.display()),
                ));
            }
            if !decoder_dir.join("tokenizer.json").is_file() {
                issues.push(Issue::new(
                    "decoder.dir",
                    format!(
                        "{} is missing",
                        decoder_dir.join("tokenizer.json").display()
                    ),
                ));
            }
            let has_weights = decoder_dir.join("model.safetensors").is_file()
                || decoder_dir.join("model.safetensors.index.json").is_file();
            if !has_weights {
                issues.push(Issue::new(
                    "decoder.dir",
                    format!(
                        "no model.safetensors or model.safetensors.index.json in {}",
                        decoder_dir.display()
                    ),
                ));
            }
        }

        if let Some(sig) = &signature {
            check_signature(v, sig, decoder_config.as_ref(), &mut issues);
            check_deepstack(v, sig, decoder_config.as_ref(), &mut issues);
        }

        let p = &manifest.prompt;
        if !p.template.contains("{question}") {
            issues.push(Issue::new("prompt.template", "must contain `{question}`"));
        }
        if p.template.matches("{frames}").count() != 1 {
            issues.push(Issue::new(
                "prompt.template",
                "must contain `{frames}` exactly once",
            ));
        }
        for (field, text) in [
            ("prompt.template", &p.template),
            ("prompt.frame_prefix", &p.frame_prefix),
            ("prompt.frame_suffix", &p.frame_suffix),
        ] {
            let stripped = text
                .replace("{frames}", "")
                .replace("{question}", "")
                .replace("{i}", "");
            if let Some(at) = stripped.find(['{', '}']) {
                issues.push(Issue::new(
                    field,
                    format!(
                        "unknown placeholder near `{}` (known: {{frames}}, {{question}}, {{i}})",
                        stripped[at..].chars().take(12).collect::<String>()
                    ),
                ));
            }
        }
        if p.stop.iter().any(|s| s.is_empty()) {
            issues.push(Issue::new("prompt.stop", "stop strings must not be empty"));
        }
        if p.max_frames == Some(0) {
            issues.push(Issue::new(
                "prompt.max_frames",
                "must be at least 1 (the frames per prompt the model was trained with)",
            ));
        }
        if manifest.kv.policy.trim().is_empty() {
            issues.push(Issue::new(
                "kv.policy",
                "must name a KV policy (e.g. mixed, fp16)",
            ));
        }
        if let Some(t) = &v.tiles {
            check_tiles(v, t, &mut issues);
        }
        if let Some(trt) = &v.tensorrt
            && trt.workspace_mb == Some(0)
        {
            issues.push(Issue::new(
                "vision.tensorrt.workspace_mb",
                "must be positive",
            ));
        }

        extra(&manifest, &mut issues);

        if !issues.is_empty() {
            return Err(fail(issues));
        }
        // Both are Some when no issue was recorded.
        let (Some(decoder_config), Some(encoder_signature)) = (decoder_config, signature) else {
            return Err(fail(vec![Issue::new("", "package incomplete")]));
        };
        Ok(ModelPackage {
            dir,
            manifest_path,
            manifest,
            encoder_path,
            decoder_dir,
            decoder_config,
            encoder_signature,
        })
    }

    /// The preprocessing the encoder expects.
    pub fn preprocess_config(&self) -> PreprocessConfig {
        let v = &self.manifest.vision;
        PreprocessConfig {
            width: v.image_size.width,
            height: v.image_size.height,
            resize: v.resize,
            interpolation: v.interpolation,
            mean: [v.mean[0], v.mean[1], v.mean[2]],
            std: [v.std[0], v.std[1], v.std[2]],
            layout: v.layout,
            dtype: v.input_dtype,
        }
    }

    /// Image tokens of one frame (all its tiles when `vision.tiles` splits frames).
    pub fn tokens_per_frame(&self) -> usize {
        self.manifest.vision.frame_tokens()
    }

    /// The TensorRT engine cache directory, resolved against the package.
    pub fn tensorrt_cache_dir(&self) -> Option<PathBuf> {
        let trt = self.manifest.vision.tensorrt.as_ref()?;
        trt.engine_cache.as_ref().map(|p| self.dir.join(p))
    }
}

/// Why `path`, which should be `what` (a file), is not one: missing, a directory, or another
/// kind of entry.
fn not_a_file(path: &Path, what: &str) -> String {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            format!("{} does not exist", path.display())
        }
        Err(e) => format!("cannot read {}: {e}", path.display()),
        Ok(m) if m.is_dir() => format!("{} is a directory, not {what}", path.display()),
        Ok(_) => format!("{} is not a regular file, not {what}", path.display()),
    }
}

fn expected_elem(dtype: InputDType) -> ElemType {
    match dtype {
        InputDType::F32 => ElemType::F32,
        InputDType::F16 => ElemType::F16,
        InputDType::U8 => ElemType::U8,
    }
}

/// Checks the encoder's declared input/output against the manifest and decoder config.
fn check_signature(
    v: &VisionSection,
    sig: &OnnxSignature,
    decoder: Option<&ModelConfig>,
    issues: &mut Vec<Issue>,
) {
    let input = match &v.input_name {
        Some(name) => sig.inputs.iter().find(|i| &i.name == name),
        None => sig.inputs.first(),
    };
    let names = |l: &[onnx::TensorSig]| {
        l.iter()
            .map(|t| t.name.clone())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match input {
        None => issues.push(Issue::new(
            "vision.input_name",
            format!(
                "encoder has no input {} (inputs: [{}])",
                v.input_name.as_deref().unwrap_or("at all"),
                names(&sig.inputs)
            ),
        )),
        Some(input) => {
            if input.elem != expected_elem(v.input_dtype) {
                issues.push(Issue::new(
                    "vision.input_dtype",
                    format!(
                        "manifest says {} but encoder input `{}` is {}",
                        v.input_dtype, input.name, input.elem
                    ),
                ));
            }
            let (h, w) = (v.image_size.height as i64, v.image_size.width as i64);
            let expected: [Option<i64>; 4] = match v.layout {
                Layout::Nchw => [None, Some(3), Some(h), Some(w)],
                Layout::Nhwc => [None, Some(h), Some(w), Some(3)],
            };
            if input.shape.len() != 4 {
                issues.push(Issue::new(
                    "vision.layout",
                    format!(
                        "encoder input `{}` has rank {}, expected 4",
                        input.name,
                        input.shape.len()
                    ),
                ));
            } else {
                if let Some(b) = input.shape[0]
                    && b != 1
                {
                    issues.push(Issue::new(
                        "vision.encoder",
                        format!(
                            "encoder input `{}` has fixed batch {b}; need 1 or dynamic",
                            input.name
                        ),
                    ));
                }
                for (axis, (got, want)) in input.shape.iter().zip(expected).enumerate().skip(1) {
                    if let (Some(g), Some(w)) = (got, want)
                        && *g != w
                    {
                        issues.push(Issue::new(
                            if axis == 1 || (axis == 3 && v.layout == Layout::Nhwc) {
                                "vision.layout"
                            } else {
                                "vision.image_size"
                            },
                            format!(
                                "encoder input `{}` shape {} disagrees with the manifest ({:?} layout, {}x{}): axis {axis} is {g}, expected {w}",
                                input.name,
                                fmt_shape(&input.shape),
                                v.layout,
                                v.image_size.width,
                                v.image_size.height
                            ),
                        ));
                    }
                }
            }
        }
    }
    let output = match &v.output_name {
        Some(name) => sig.outputs.iter().find(|o| &o.name == name),
        None => sig.outputs.first(),
    };
    match output {
        None => issues.push(Issue::new(
            "vision.output_name",
            format!(
                "encoder has no output {} (outputs: [{}])",
                v.output_name.as_deref().unwrap_or("at all"),
                names(&sig.outputs)
            ),
        )),
        Some(out) => {
            if out.elem != ElemType::F32 {
                issues.push(Issue::new(
                    "vision.encoder",
                    format!(
                        "encoder output `{}` is {}, expected f32",
                        out.name, out.elem
                    ),
                ));
            }
            if out.shape.len() != 3 {
                issues.push(Issue::new(
                    "vision.encoder",
                    format!(
                        "encoder output `{}` has shape {}, expected [batch, tokens_per_frame, hidden_size]",
                        out.name,
                        fmt_shape(&out.shape)
                    ),
                ));
            } else {
                if let Some(t) = out.shape[1]
                    && t as usize != v.tokens_per_frame
                {
                    issues.push(Issue::new(
                        "vision.tokens_per_frame",
                        format!(
                            "manifest says {} but encoder output `{}` has {t} tokens per frame",
                            v.tokens_per_frame, out.name
                        ),
                    ));
                }
                if let (Some(hidden), Some(cfg)) = (out.shape[2], decoder)
                    && hidden as usize != cfg.hidden_size
                {
                    issues.push(Issue::new(
                        "vision.encoder",
                        format!(
                            "encoder output `{}` width {hidden} differs from the decoder hidden_size {}",
                            out.name, cfg.hidden_size
                        ),
                    ));
                }
            }
        }
    }
}

/// `vision.tiles` against the rest of the vision section: square tiles of `image_size`
/// stretched to (the processor cuts them), a grid of at most [`MAX_TILES`] (or none: rows
/// and cols 0, the global image only), sizes in range, placeholders known, no DeepStack.
fn check_tiles(v: &VisionSection, t: &TileSection, issues: &mut Vec<Issue>) {
    let (tw, th) = (v.image_size.width, v.image_size.height);
    if tw != th {
        issues.push(Issue::new(
            "vision.tiles",
            format!("tiles are square: vision.image_size is {tw}x{th}"),
        ));
    }
    if v.resize != ResizeMode::Stretch {
        issues.push(Issue::new(
            "vision.resize",
            "must be stretch with vision.tiles (the tiles are cut at the encoder's size)",
        ));
    }
    if v.deepstack_output.is_some() {
        issues.push(Issue::new(
            "vision.tiles",
            "a DeepStack encoder (vision.deepstack_output) cannot run on tiles",
        ));
    }
    if !(1..=8192).contains(&t.frame.width) || !(1..=8192).contains(&t.frame.height) {
        issues.push(Issue::new(
            "vision.tiles.frame",
            format!(
                "{}x{} is out of range (1..=8192 each side)",
                t.frame.width, t.frame.height
            ),
        ));
    }
    if let Some(l) = t.longest_edge
        && !(1..=8192).contains(&l)
    {
        issues.push(Issue::new(
            "vision.tiles.longest_edge",
            format!("{l} is out of range (1..=8192)"),
        ));
    }
    if (t.rows == 0) != (t.cols == 0) {
        issues.push(Issue::new(
            "vision.tiles.rows",
            format!(
                "rows {} and cols {}: both 0 (the frame is not split) or both at least 1",
                t.rows, t.cols
            ),
        ));
    }
    if t.rows == 0 && t.cols == 0 && !t.global_image {
        issues.push(Issue::new(
            "vision.tiles.global_image",
            "must be true when rows and cols are 0 (the frame is one image)",
        ));
    }
    // The whole-tile image the tiles are cut from (the processor keeps images within 4096
    // pixels a side before rounding up to whole tiles).
    for (field, n) in [("vision.tiles.rows", t.rows), ("vision.tiles.cols", t.cols)] {
        if u64::from(n) * u64::from(tw.max(th)) > 8192 {
            issues.push(Issue::new(
                field,
                format!("{n} tiles of {tw} pixels pass 8192 pixels"),
            ));
        }
    }
    if u64::from(t.rows) * u64::from(t.cols) > u64::from(MAX_TILES) {
        issues.push(Issue::new(
            "vision.tiles",
            format!("{} x {} tiles is more than {MAX_TILES}", t.rows, t.cols),
        ));
    }
    for (field, text, known) in [
        (
            "vision.tiles.tile_prefix",
            &t.tile_prefix,
            &["{row}", "{col}"][..],
        ),
        ("vision.tiles.row_suffix", &t.row_suffix, &[][..]),
        ("vision.tiles.global_prefix", &t.global_prefix, &[][..]),
    ] {
        let stripped = known.iter().fold(text.clone(), |s, k| s.replace(k, ""));
        if let Some(at) = stripped.find(['{', '}']) {
            let names = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            issues.push(Issue::new(
                field,
                format!(
                    "unknown placeholder near `{}` (known: {names})",
                    stripped[at..].chars().take(12).collect::<String>()
                ),
            ));
        }
    }
}

/// The DeepStack output against the decoder's `deepstack_layers`: named exactly when the
/// decoder takes the features, `[batch, layers, tokens_per_frame, hidden_size]` f32.
fn check_deepstack(
    v: &VisionSection,
    sig: &OnnxSignature,
    decoder: Option<&ModelConfig>,
    issues: &mut Vec<Issue>,
) {
    let Some(cfg) = decoder else { return };
    let layers = cfg.deepstack_layers;
    let field = "vision.deepstack_output";
    let name = match (&v.deepstack_output, layers) {
        (None, 0) => return,
        (None, n) => {
            issues.push(Issue::new(
                field,
                format!(
                    "missing: the decoder adds DeepStack features after its first {n} layers \
                     (deepstack_layers), which the encoder output named here gives"
                ),
            ));
            return;
        }
        (Some(name), 0) => {
            issues.push(Issue::new(
                field,
                format!("`{name}` is named but the decoder's config.json has no deepstack_layers"),
            ));
            return;
        }
        (Some(name), _) => name,
    };
    let Some(out) = sig.outputs.iter().find(|o| &o.name == name) else {
        let names: Vec<&str> = sig.outputs.iter().map(|o| o.name.as_str()).collect();
        issues.push(Issue::new(
            field,
            format!(
                "encoder has no output `{name}` (outputs: [{}])",
                names.join(", ")
            ),
        ));
        return;
    };
    let want = [
        None,
        Some(layers as i64),
        Some(v.tokens_per_frame as i64),
        Some(cfg.hidden_size as i64),
    ];
    let fits = out.shape.len() == 4
        && out
            .shape
            .iter()
            .zip(want)
            .all(|(got, want)| !matches!((got, want), (Some(g), Some(w)) if *g != w));
    if out.elem != ElemType::F32 || !fits {
        issues.push(Issue::new(
            field,
            format!(
                "encoder output `{name}` is {} {}, expected f32 [batch, {layers}, {}, {}] \
                 (deepstack_layers, tokens_per_frame, hidden_size)",
                out.elem,
                fmt_shape(&out.shape),
                v.tokens_per_frame,
                cfg.hidden_size
            ),
        ));
    }
}

fn fmt_shape(shape: &[Option<i64>]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
        .collect();
    format!("[{}]", dims.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test fixture package copied into a temp dir (files only one level deep, plus
    /// the decoder directory).
    fn copy_fixture() -> tempfile::TempDir {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vlm");
        let dir = tempfile::tempdir().unwrap();
        fn copy(src: &Path, dst: &Path) {
            std::fs::create_dir_all(dst).unwrap();
            for e in std::fs::read_dir(src).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    copy(&e.path(), &dst.join(e.file_name()));
                } else {
                    std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
                }
            }
        }
        copy(&src, dir.path());
        dir
    }

    fn issues(dir: &Path) -> Vec<(String, String)> {
        match ModelPackage::load(dir) {
            Err(VisionError::Package { issues, .. }) => {
                issues.into_iter().map(|i| (i.field, i.message)).collect()
            }
            Err(e) => panic!("expected package issues, got {e}"),
            Ok(_) => panic!("a broken package loaded"),
        }
    }

    /// The text quoted after an unknown placeholder was cut at byte 12, inside a multi-byte
    /// character here, and panicked (reproduced by the `package_manifest` fuzz target).
    #[test]
    fn unknown_placeholder_before_multibyte_text_is_an_issue_not_a_panic() {
        let dir = copy_fixture();
        let manifest = dir.path().join(MANIFEST);
        let text = std::fs::read_to_string(&manifest).unwrap();
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("template:"))
            .unwrap();
        let bad = "  template: \"{frames}{question}{aaaaaaaaaaéé\"";
        std::fs::write(&manifest, text.replace(line, bad)).unwrap();
        let got = issues(dir.path());
        assert!(
            got.iter().any(|(f, m)| f == "prompt.template"
                && m.contains("unknown placeholder near `{aaaaaaaaaaé`")),
            "{got:?}"
        );
    }

    #[test]
    fn an_encoder_path_that_is_a_directory_is_said_to_be_one() {
        let dir = copy_fixture();
        let encoder = dir.path().join("vision.onnx");
        std::fs::remove_file(&encoder).unwrap();
        std::fs::create_dir(&encoder).unwrap();
        let got = issues(dir.path());
        let (_, msg) = got
            .iter()
            .find(|(f, _)| f == "vision.encoder")
            .unwrap_or_else(|| panic!("{got:?}"));
        assert!(
            msg.contains("is a directory") && !msg.contains("does not exist"),
            "{msg}"
        );
        // Read directly, the ONNX reader says the same.
        let e = onnx::read_signature(&encoder).unwrap_err().to_string();
        assert!(
            e.contains("a directory") && e.contains("vision.onnx"),
            "{e}"
        );
        // A missing encoder is still reported as missing.
        std::fs::remove_dir(&encoder).unwrap();
        let got = issues(dir.path());
        assert!(
            got.iter()
                .any(|(f, m)| f == "vision.encoder" && m.contains("does not exist")),
            "{got:?}"
        );
    }

    #[test]
    fn interpolation_is_read_and_checked() {
        let dir = copy_fixture();
        let manifest = dir.path().join(MANIFEST);
        let text = std::fs::read_to_string(&manifest).unwrap();
        assert!(text.contains("  resize: stretch\n"));
        // Default: bilinear.
        let pkg = ModelPackage::load(dir.path()).unwrap();
        assert_eq!(
            pkg.preprocess_config().interpolation,
            Interpolation::Bilinear
        );
        let with = |value: &str| {
            text.replace(
                "  resize: stretch\n",
                &format!("  resize: stretch\n  interpolation: {value}\n"),
            )
        };
        std::fs::write(&manifest, with("bicubic")).unwrap();
        let pkg = ModelPackage::load(dir.path()).unwrap();
        assert_eq!(
            pkg.preprocess_config().interpolation,
            Interpolation::Bicubic
        );
        std::fs::write(&manifest, with("cubic")).unwrap();
        let got = issues(dir.path());
        assert!(
            got.iter().any(|(f, m)| f.contains("interpolation")
                && m.contains("bilinear")
                && m.contains("lanczos")),
            "{got:?}"
        );
    }

    #[test]
    fn a_decoder_dir_that_is_a_file_is_said_to_be_one() {
        let dir = copy_fixture();
        let decoder = dir.path().join("decoder");
        std::fs::remove_dir_all(&decoder).unwrap();
        std::fs::write(&decoder, b"").unwrap();
        let got = issues(dir.path());
        assert!(
            got.iter()
                .any(|(f, m)| f == "decoder.dir" && m.contains("is a file")),
            "{got:?}"
        );
    }
}
