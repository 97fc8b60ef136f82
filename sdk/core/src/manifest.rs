//! The model package manifest, `jetvlm.yaml`: its one schema ([`Manifest`] and its
//! sections) and the checks that need nothing but the manifest and the package directory
//! ([`Manifest::check`]). Every reader of a package goes through it: the vision crate's
//! `ModelPackage` (which adds the ONNX and decoder checks), the memory planner and the CLI.
//!
//! [`Manifest::load`] reads and checks a manifest and reports every problem at once in one
//! [`ConfigError::Manifest`] naming the file and each field ([`describe`] prints it).

use crate::ConfigError;
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

impl Manifest {
    /// Reads and deserializes the manifest at `path` (the file itself); a file that cannot be
    /// read or parsed is one [`Issue`] naming the field at fault, when known.
    pub fn parse(path: &Path) -> Result<Manifest, Issue> {
        crate::config::load_yaml(path).map_err(|e| {
            let field = e.field().unwrap_or("").to_string();
            Issue::new(field, e.to_string())
        })
    }

    /// Reads the manifest at `path` (the file itself) and runs [`check`](Self::check) against
    /// the directory holding it: the manifest, or every problem found in one
    /// [`ConfigError::Manifest`].
    pub fn load(path: &Path) -> Result<Manifest, ConfigError> {
        let fail = |issues| ConfigError::Manifest {
            path: path.to_path_buf(),
            issues,
        };
        let manifest = Self::parse(path).map_err(|i| fail(vec![i]))?;
        let mut issues = Vec::new();
        manifest.check(path.parent().unwrap_or(Path::new(".")), &mut issues);
        if issues.is_empty() {
            Ok(manifest)
        } else {
            Err(fail(issues))
        }
    }

    /// Every check that needs only the manifest and the package directory `dir` (the files it
    /// names exist; values in range; placeholders known; the tile grid), each problem pushed
    /// onto `issues` with the field it concerns. The encoder's ONNX signature and the
    /// decoder directory's contents are the vision crate's `ModelPackage` checks.
    pub fn check(&self, dir: &Path, issues: &mut Vec<Issue>) {
        if let Some(c) = &self.kv.calibration
            && !dir.join(c).is_file()
        {
            issues.push(Issue::new(
                "kv.calibration",
                not_a_file(&dir.join(c), "a calibration file"),
            ));
        }
        if self.format != 1 {
            issues.push(Issue::new(
                "format",
                format!(
                    "format {} is not supported (this build reads format 1)",
                    self.format
                ),
            ));
        }
        let v = &self.vision;
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
        let encoder = dir.join(&v.encoder);
        if !encoder.is_file() {
            issues.push(Issue::new(
                "vision.encoder",
                not_a_file(&encoder, "an .onnx file"),
            ));
        }

        let p = &self.prompt;
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
        if self.kv.policy.trim().is_empty() {
            issues.push(Issue::new(
                "kv.policy",
                "must name a KV policy (e.g. mixed, fp16)",
            ));
        }
        if let Some(t) = &v.tiles {
            check_tiles(v, t, issues);
        }
        if let Some(trt) = &v.tensorrt
            && trt.workspace_mb == Some(0)
        {
            issues.push(Issue::new(
                "vision.tensorrt.workspace_mb",
                "must be positive",
            ));
        }
    }
}

/// A manifest's problems as printed: the file, the count, then one `- `field`: message`
/// line per issue. The vision crate's package error prints the same.
pub fn describe(manifest: &Path, issues: &[Issue]) -> String {
    let lines: Vec<String> = issues.iter().map(|i| format!("  - {i}")).collect();
    format!(
        "{}: {} problem(s):\n{}",
        manifest.display(),
        issues.len(),
        lines.join("\n")
    )
}

/// How a frame of another aspect ratio is fitted to the encoder's input size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Scale each axis independently to the target size.
    #[default]
    Stretch,
    /// Scale so the target is covered, then cut the centre.
    CenterCrop,
    /// Scale so the frame fits inside, then pad (with the mean colour, i.e. zero after
    /// normalisation).
    Letterbox,
}

/// The resampling filter of the resize, defined as PIL defines it (the model's processor
/// names one: CLIP's bicubic, Idefics3's Lanczos); the filter widens by the scale factor when
/// shrinking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// Triangle filter, support 1.
    #[default]
    Bilinear,
    /// Keys cubic with a = -0.5 (Catmull-Rom), support 2.
    Bicubic,
    /// Lanczos, 3 lobes, support 3.
    Lanczos,
}

impl Interpolation {
    /// The kernel's support radius at scale 1.
    pub fn support(self) -> f64 {
        match self {
            Interpolation::Bilinear => 1.0,
            Interpolation::Bicubic => 2.0,
            Interpolation::Lanczos => 3.0,
        }
    }

    /// The kernel at distance `x` (in source pixels at scale 1).
    pub fn kernel(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Interpolation::Bilinear => (1.0 - x).max(0.0),
            Interpolation::Bicubic => {
                let a = -0.5;
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Interpolation::Lanczos => {
                let sinc = |t: f64| {
                    if t == 0.0 {
                        1.0
                    } else {
                        let p = std::f64::consts::PI * t;
                        p.sin() / p
                    }
                };
                if x < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

impl std::fmt::Display for Interpolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Interpolation::Bilinear => "bilinear",
            Interpolation::Bicubic => "bicubic",
            Interpolation::Lanczos => "lanczos",
        })
    }
}

/// Memory layout of the encoder input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    #[default]
    Nchw,
    Nhwc,
}

/// Element type of the encoder input. `U8` feeds raw pixels (the model normalises inside).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputDType {
    #[default]
    F32,
    F16,
    U8,
}

impl std::fmt::Display for InputDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InputDType::F32 => "f32",
            InputDType::F16 => "f16",
            InputDType::U8 => "u8",
        })
    }
}

/// `vision.tiles` against the rest of the vision section: square tiles of `image_size`
/// stretched to (the processor cuts them), a grid of at most [`MAX_TILES`] (or none: rows
/// and cols 0, the global image only), sizes in range, placeholders known, no DeepStack, and
/// a frame's tokens (`tokens_per_frame` per run) within `usize`.
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
    } else if v.tokens_per_frame.checked_mul(t.runs()).is_none() {
        issues.push(Issue::new(
            "vision.tokens_per_frame",
            format!(
                "{} tokens per run x {} runs of a tiled frame overflows",
                v.tokens_per_frame,
                t.runs()
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel)
    }

    #[test]
    fn the_repository_packages_pass_the_manifest_checks() {
        for rel in [
            "models/demo",
            "tests/fixtures/vlm",
            "tests/fixtures/configs/package-demo",
        ] {
            let m = Manifest::load(&repo(rel).join(MANIFEST)).unwrap_or_else(|e| panic!("{e}"));
            assert!(m.vision.tiles.is_none(), "{rel}");
            assert_eq!(m.vision.frame_tokens(), m.vision.tokens_per_frame, "{rel}");
        }
        // 2 rows x 3 columns of tiles and the global image, 4 tokens each.
        let tiled = repo("tests/fixtures/hf_vlms/smolvlm_tiles/pkg").join(MANIFEST);
        let m = Manifest::load(&tiled).unwrap_or_else(|e| panic!("{e}"));
        let t = m.vision.tiles.as_ref().unwrap();
        assert_eq!((t.rows, t.cols, t.global_image), (2, 3, true));
        assert_eq!(m.vision.frame_tokens(), 4 * 7);
    }

    #[test]
    fn problems_are_listed_with_their_fields_and_a_frame_that_overflows_is_one() {
        let dir = tempfile::tempdir().unwrap();
        let src = repo("tests/fixtures/configs/package-demo");
        std::fs::copy(src.join("vision.onnx"), dir.path().join("vision.onnx")).unwrap();
        let text = std::fs::read_to_string(src.join(MANIFEST)).unwrap();
        let huge = usize::MAX / 2 + 1;
        let broken = text
            .replace("format: 1", "format: 2")
            .replace(
                "  tokens_per_frame: 16\n",
                &format!(
                    "  tokens_per_frame: {huge}\n  tiles: {{frame: {{height: 128, width: 128}}, rows: 1, cols: 1}}\n"
                ),
            )
            .replace("policy: mixed", "policy: \" \"");
        let path = dir.path().join(MANIFEST);
        std::fs::write(&path, broken).unwrap();
        let err = Manifest::load(&path).unwrap_err();
        let ConfigError::Manifest { issues, .. } = &err else {
            panic!("{err}");
        };
        let fields: Vec<&str> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(
            fields,
            ["format", "kv.policy", "vision.tokens_per_frame"],
            "{err}"
        );
        assert_eq!(err.field(), Some("format"));
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "{}: 3 problem(s):\n  - `format`: ",
                path.display()
            )),
            "{text}"
        );
        assert!(text.contains("2 runs of a tiled frame overflows"), "{text}");
    }
}
