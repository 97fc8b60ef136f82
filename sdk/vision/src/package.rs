//! The model package: a directory with a `jetvlm.yaml` manifest, the vision encoder
//! (`.onnx`) and the decoder in Hugging Face layout.
//!
//! [`ModelPackage::load`] validates everything it can before any weight is read (files
//! exist, shapes agree between the manifest, the decoder's `config.json` and the ONNX
//! signature, prompt template placeholders, normalisation constants) and reports every
//! problem at once in one error naming `jetvlm.yaml`.
//!
//! The manifest's schema and its own checks are [`jetvlm_core::manifest`], re-exported here;
//! this module adds what needs the encoder and the decoder: the ONNX signature against the
//! manifest and the decoder's `config.json`, and the decoder directory's files.

use crate::VisionError;
use crate::onnx::{self, ElemType, OnnxSignature};
use crate::preprocess::{InputDType, Layout, PreprocessConfig};
use jetvlm_core::hf::ModelConfig;
pub use jetvlm_core::manifest::{
    DecoderSection, ImageSize, Issue, KvSection, MANIFEST, MAX_TILES, Manifest, PromptSection,
    TensorRtSection, TileSection, VisionSection,
};
use std::path::{Path, PathBuf};

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
        let manifest = Manifest::parse(&manifest_path).map_err(|i| fail(vec![i]))?;
        let mut issues = Vec::new();
        manifest.check(&dir, &mut issues);
        let v = &manifest.vision;

        // A missing encoder is one of the manifest's own issues.
        let encoder_path = dir.join(&v.encoder);
        let mut signature = None;
        if encoder_path.is_file() {
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
    use crate::preprocess::Interpolation;

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
