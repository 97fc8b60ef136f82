//! The [`VisionEncoder`] trait and its ONNX Runtime implementation.

use crate::package::ModelPackage;
use crate::preprocess::{
    ImageView, InputDType, InputData, Layout, PreprocessConfig, Preprocessed, Preprocessor,
};
use crate::providers::{self, ExecutionProvider, TensorRtSettings};
use crate::{VisionError, library};
use ort::session::Session;
use ort::value::{Tensor, TensorElementType, ValueType};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Image embeddings of one frame: `tokens x hidden`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    pub tokens: usize,
    pub hidden: usize,
    pub data: Vec<f32>,
    /// DeepStack features `[deepstack_layers, tokens, hidden]` (the encoder's
    /// `deepstack_output`); empty for encoders without them.
    pub deepstack: Vec<f32>,
}

/// Timing and provider facts of an encoder.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EncoderStats {
    /// The execution provider that runs the model (`cpu`, `cuda`, `tensorrt`).
    pub execution_provider: String,
    pub frames: u64,
    pub preprocess_ms_total: f64,
    pub encode_ms_total: f64,
    pub last_preprocess_ms: f64,
    pub last_encode_ms: f64,
}

/// A frame -> embeddings model.
pub trait VisionEncoder: Send {
    fn tokens_per_frame(&self) -> usize;
    fn hidden_size(&self) -> usize;
    /// Runs the model on an already preprocessed frame.
    fn encode_preprocessed(&mut self, input: &Preprocessed) -> Result<Embeddings, VisionError>;
    /// Preprocesses and encodes one RGB8 frame.
    fn encode(&mut self, img: &ImageView) -> Result<Embeddings, VisionError>;
    fn stats(&self) -> EncoderStats;
}

/// How to run ONNX Runtime (the runtime config's `vision` section).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OrtConfig {
    /// Path of `libonnxruntime.so`; overrides `ORT_DYLIB_PATH` and the search.
    #[serde(default)]
    pub ort_library: Option<PathBuf>,
    /// Providers in priority order; empty means every provider this build supports
    /// (TensorRT > CUDA > CPU).
    #[serde(default)]
    pub execution_providers: Vec<ExecutionProvider>,
    /// Fail instead of falling back when the first listed provider cannot be used.
    #[serde(default)]
    pub require: bool,
    /// Intra-op threads (default: ONNX Runtime's choice).
    #[serde(default)]
    pub intra_threads: Option<usize>,
    /// Overrides the package's TensorRT settings.
    #[serde(default)]
    pub tensorrt: Option<crate::package::TensorRtSection>,
}

/// What the encoder must look like, from the manifest.
#[derive(Clone, Debug)]
pub struct EncoderSpec {
    pub model: PathBuf,
    pub preprocess: PreprocessConfig,
    pub tokens_per_frame: usize,
    pub hidden_size: usize,
    pub input_name: Option<String>,
    pub output_name: Option<String>,
    /// The DeepStack output and the decoder's `deepstack_layers` (0: none).
    pub deepstack_output: Option<String>,
    pub deepstack_layers: usize,
    pub tensorrt: TensorRtSettings,
}

impl EncoderSpec {
    pub fn from_package(pkg: &ModelPackage) -> Self {
        let v = &pkg.manifest.vision;
        let tensorrt = match &v.tensorrt {
            Some(t) => trt_settings(t, &pkg.dir),
            None => TensorRtSettings {
                engine_cache: Some(pkg.dir.join("trt-cache")),
                ..TensorRtSettings::default()
            },
        };
        EncoderSpec {
            model: pkg.encoder_path.clone(),
            preprocess: pkg.preprocess_config(),
            tokens_per_frame: v.tokens_per_frame,
            hidden_size: pkg.decoder_config.hidden_size,
            input_name: v.input_name.clone(),
            output_name: v.output_name.clone(),
            deepstack_output: v.deepstack_output.clone(),
            deepstack_layers: pkg.decoder_config.deepstack_layers,
            tensorrt,
        }
    }
}

fn trt_settings(t: &crate::package::TensorRtSection, base: &Path) -> TensorRtSettings {
    TensorRtSettings {
        fp16: t.fp16,
        int8: t.int8,
        engine_cache: Some(
            base.join(
                t.engine_cache
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("trt-cache")),
            ),
        ),
        workspace_mb: t.workspace_mb.unwrap_or(1024),
    }
}

/// A vision encoder run by ONNX Runtime.
pub struct OrtEncoder {
    spec: EncoderSpec,
    session: Session,
    input_name: String,
    output_name: String,
    dynamic_batch: bool,
    preprocessor: Preprocessor,
    provider: ExecutionProvider,
    library: PathBuf,
    stats: EncoderStats,
}

impl std::fmt::Debug for OrtEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtEncoder")
            .field("model", &self.spec.model)
            .field("provider", &self.provider)
            .finish()
    }
}

impl OrtEncoder {
    /// Loads the encoder of a validated package.
    pub fn from_package(pkg: &ModelPackage, cfg: &OrtConfig) -> Result<Self, VisionError> {
        Self::load(EncoderSpec::from_package(pkg), cfg)
    }

    /// Loads ONNX Runtime (once per process), creates the session on the best available
    /// provider and checks the model's inputs and outputs against `spec`.
    pub fn load(mut spec: EncoderSpec, cfg: &OrtConfig) -> Result<Self, VisionError> {
        crate::onnx::check_model_file(&spec.model)?;
        if let Some(t) = &cfg.tensorrt {
            let base = spec.model.parent().unwrap_or(Path::new(".")).to_path_buf();
            spec.tensorrt = trt_settings(t, &base);
        }
        let order = if cfg.execution_providers.is_empty() {
            ExecutionProvider::default_order()
        } else {
            cfg.execution_providers.clone()
        };
        // GPU providers this build can register: prefer an ONNX Runtime that has them.
        let gpu: Vec<ExecutionProvider> = order
            .iter()
            .copied()
            .filter(|&ep| ep != ExecutionProvider::Cpu && ep.compiled())
            .collect();
        let (env, library) = library::environment(cfg.ort_library.as_deref(), &gpu)?;
        let model = spec.model.clone();
        let ort_err = |op: &'static str| {
            let model = model.clone();
            move |e: ort::Error<ort::session::builder::SessionBuilder>| VisionError::Ort {
                op,
                model: model.clone(),
                source: Box::new(ort::Error::<()>::from(e)),
            }
        };
        let mut builder = Session::builder(&env).map_err(|e| VisionError::Ort {
            op: "creating a session builder",
            model: model.clone(),
            source: Box::new(e),
        })?;
        if let Some(n) = cfg.intra_threads {
            builder = builder
                .with_intra_threads(n)
                .map_err(ort_err("setting intra-op threads"))?;
        }
        let provider = providers::register(&mut builder, &order, cfg.require, &spec.tensorrt)?;
        let session = builder
            .commit_from_file(&spec.model)
            .map_err(|e| VisionError::Ort {
                op: "loading the encoder",
                model: model.clone(),
                source: Box::new(e),
            })?;
        tracing::info!(
            model = %spec.model.display(),
            provider = %provider,
            library = %library.display(),
            "vision encoder loaded"
        );
        let (input_name, output_name, dynamic_batch) = check_session(&session, &spec)?;
        let preprocessor = Preprocessor::new(spec.preprocess.clone());
        let stats = EncoderStats {
            execution_provider: provider.to_string(),
            ..EncoderStats::default()
        };
        Ok(OrtEncoder {
            spec,
            session,
            input_name,
            output_name,
            dynamic_batch,
            preprocessor,
            provider,
            library,
            stats,
        })
    }

    /// The provider that runs the model.
    pub fn execution_provider(&self) -> ExecutionProvider {
        self.provider
    }

    /// The ONNX Runtime library in use.
    pub fn library(&self) -> &Path {
        &self.library
    }

    pub fn preprocessor(&mut self) -> &mut Preprocessor {
        &mut self.preprocessor
    }

    /// Encodes several frames: in one batch when the model's batch axis is dynamic and a GPU
    /// provider runs it, else one frame per run.
    pub fn encode_batch(&mut self, imgs: &[ImageView]) -> Result<Vec<Embeddings>, VisionError> {
        // On the CPU provider a batch runs no faster than its frames one by one, while ONNX
        // Runtime and the allocator keep the largest batch's activations for the life of
        // the process (about 3 MB per frame of the demo encoder): frames go one per run there.
        if !self.dynamic_batch || imgs.len() <= 1 || self.provider == ExecutionProvider::Cpu {
            return imgs.iter().map(|i| self.encode(i)).collect();
        }
        let t0 = Instant::now();
        let mut pre = Vec::with_capacity(imgs.len());
        for img in imgs {
            pre.push(self.preprocessor.run(img)?);
        }
        let batch = stack(&pre);
        let pre_ms = t0.elapsed().as_secs_f64() * 1e3;
        let out = self.run(&batch, imgs.len())?;
        self.stats.last_preprocess_ms = pre_ms;
        self.stats.preprocess_ms_total += pre_ms;
        Ok(out)
    }

    fn run(&mut self, input: &Preprocessed, batch: usize) -> Result<Vec<Embeddings>, VisionError> {
        let t0 = Instant::now();
        let model = self.spec.model.clone();
        let err = |op: &'static str| {
            let model = model.clone();
            move |e: ort::Error| VisionError::Ort {
                op,
                model: model.clone(),
                source: Box::new(e),
            }
        };
        let shape: Vec<i64> = input.shape.iter().map(|&d| d as i64).collect();
        let value: ort::value::DynValue = match &input.data {
            InputData::F32(v) => Tensor::from_array((shape, v.clone()))
                .map_err(err("creating the input tensor"))?
                .into_dyn(),
            InputData::F16(v) => Tensor::from_array((shape, v.clone()))
                .map_err(err("creating the input tensor"))?
                .into_dyn(),
            InputData::U8(v) => Tensor::from_array((shape, v.clone()))
                .map_err(err("creating the input tensor"))?
                .into_dyn(),
        };
        let outputs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => value])
            .map_err(err("running the encoder"))?;
        let out =
            outputs
                .get(self.output_name.as_str())
                .ok_or_else(|| VisionError::ModelMismatch {
                    model: model.clone(),
                    message: format!("no output `{}` after run", self.output_name),
                })?;
        let (shape, data) = out
            .try_extract_tensor::<f32>()
            .map_err(err("reading the encoder output"))?;
        let dims: Vec<i64> = shape.iter().copied().collect();
        let (t, h) = (self.spec.tokens_per_frame, self.spec.hidden_size);
        if dims != [batch as i64, t as i64, h as i64] {
            return Err(VisionError::BadOutput {
                model,
                shape: dims,
                message: format!(
                    "expected [{batch}, {t}, {h}] (batch, tokens_per_frame, hidden_size)"
                ),
            });
        }
        let per = t * h;
        let deep = deepstack_of(&self.spec, &outputs, batch)?;
        let per_deep = self.spec.deepstack_layers * per;
        let result = (0..batch)
            .map(|b| Embeddings {
                tokens: t,
                hidden: h,
                data: data[b * per..(b + 1) * per].to_vec(),
                deepstack: deep
                    .get(b * per_deep..(b + 1) * per_deep)
                    .unwrap_or_default()
                    .to_vec(),
            })
            .collect();
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        self.stats.frames += batch as u64;
        self.stats.last_encode_ms = ms;
        self.stats.encode_ms_total += ms;
        Ok(result)
    }
}

/// The DeepStack output of a run, `[batch, deepstack_layers, tokens, hidden]` flat (empty
/// without DeepStack), its shape checked.
fn deepstack_of(
    spec: &EncoderSpec,
    outputs: &ort::session::SessionOutputs<'_>,
    batch: usize,
) -> Result<Vec<f32>, VisionError> {
    let Some(name) = &spec.deepstack_output else {
        return Ok(Vec::new());
    };
    let model = spec.model.clone();
    let out = outputs
        .get(name.as_str())
        .ok_or_else(|| VisionError::ModelMismatch {
            model: model.clone(),
            message: format!("no output `{name}` (vision.deepstack_output) after run"),
        })?;
    let (shape, data) = out
        .try_extract_tensor::<f32>()
        .map_err(|e| VisionError::Ort {
            op: "reading the encoder's DeepStack output",
            model: model.clone(),
            source: Box::new(e),
        })?;
    let dims: Vec<i64> = shape.iter().copied().collect();
    let (l, t, h) = (
        spec.deepstack_layers,
        spec.tokens_per_frame,
        spec.hidden_size,
    );
    if dims != [batch as i64, l as i64, t as i64, h as i64] {
        return Err(VisionError::BadOutput {
            model,
            shape: dims,
            message: format!(
                "expected [{batch}, {l}, {t}, {h}] (batch, deepstack_layers, \
                     tokens_per_frame, hidden_size) from `{name}`"
            ),
        });
    }
    Ok(data.to_vec())
}

/// Concatenates single-frame inputs along the batch axis.
fn stack(items: &[Preprocessed]) -> Preprocessed {
    let mut shape = items[0].shape;
    shape[0] = items.len();
    let data = match &items[0].data {
        InputData::F32(_) => InputData::F32(
            items
                .iter()
                .flat_map(|p| match &p.data {
                    InputData::F32(v) => v.clone(),
                    other => other.to_f32(),
                })
                .collect(),
        ),
        InputData::F16(_) => InputData::F16(
            items
                .iter()
                .flat_map(|p| match &p.data {
                    InputData::F16(v) => v.clone(),
                    other => other
                        .to_f32()
                        .into_iter()
                        .map(half::f16::from_f32)
                        .collect(),
                })
                .collect(),
        ),
        InputData::U8(_) => InputData::U8(
            items
                .iter()
                .flat_map(|p| match &p.data {
                    InputData::U8(v) => v.clone(),
                    other => other.to_f32().into_iter().map(|x| x as u8).collect(),
                })
                .collect(),
        ),
    };
    Preprocessed { shape, data }
}

impl VisionEncoder for OrtEncoder {
    fn tokens_per_frame(&self) -> usize {
        self.spec.tokens_per_frame
    }

    fn hidden_size(&self) -> usize {
        self.spec.hidden_size
    }

    fn encode_preprocessed(&mut self, input: &Preprocessed) -> Result<Embeddings, VisionError> {
        let mut out = self.run(input, 1)?;
        out.pop().ok_or_else(|| VisionError::BadOutput {
            model: self.spec.model.clone(),
            shape: vec![],
            message: "no embeddings returned".into(),
        })
    }

    fn encode(&mut self, img: &ImageView) -> Result<Embeddings, VisionError> {
        let t0 = Instant::now();
        let input = self.preprocessor.run(img)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        self.stats.last_preprocess_ms = ms;
        self.stats.preprocess_ms_total += ms;
        self.encode_preprocessed(&input)
    }

    fn stats(&self) -> EncoderStats {
        self.stats.clone()
    }
}

fn elem_of(dtype: InputDType) -> TensorElementType {
    match dtype {
        InputDType::F32 => TensorElementType::Float32,
        InputDType::F16 => TensorElementType::Float16,
        InputDType::U8 => TensorElementType::Uint8,
    }
}

/// Checks the session's input and output (as ONNX Runtime reads them) against the spec.
/// Returns (input name, output name, whether the batch axis is dynamic).
fn check_session(
    session: &Session,
    spec: &EncoderSpec,
) -> Result<(String, String, bool), VisionError> {
    let mismatch = |message: String| VisionError::ModelMismatch {
        model: spec.model.clone(),
        message,
    };
    let list = |outlets: &[ort::value::Outlet]| {
        outlets
            .iter()
            .map(|o| format!("{}: {:?}", o.name(), o.dtype()))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let input = match &spec.input_name {
        Some(n) => session.inputs().iter().find(|i| i.name() == n),
        None => session.inputs().first(),
    }
    .ok_or_else(|| {
        mismatch(format!(
            "input not found (inputs: {})",
            list(session.inputs())
        ))
    })?;
    let output = match &spec.output_name {
        Some(n) => session.outputs().iter().find(|o| o.name() == n),
        None => session.outputs().first(),
    }
    .ok_or_else(|| {
        mismatch(format!(
            "output not found (outputs: {})",
            list(session.outputs())
        ))
    })?;

    let ValueType::Tensor { ty, shape, .. } = input.dtype() else {
        return Err(mismatch(format!(
            "input `{}` is not a tensor",
            input.name()
        )));
    };
    let want = elem_of(spec.preprocess.dtype);
    if *ty != want {
        return Err(mismatch(format!(
            "input `{}` is {ty:?} but the manifest declares input_dtype {} ({want:?})",
            input.name(),
            spec.preprocess.dtype
        )));
    }
    let in_dims: Vec<i64> = shape.iter().copied().collect();
    let expected = spec.preprocess.input_shape();
    if in_dims.len() != 4 {
        return Err(mismatch(format!(
            "input `{}` has shape {in_dims:?}; expected rank 4 {expected:?} ({:?})",
            input.name(),
            spec.preprocess.layout
        )));
    }
    for axis in 1..4 {
        if in_dims[axis] >= 0 && in_dims[axis] as usize != expected[axis] {
            return Err(mismatch(format!(
                "input `{}` has shape {in_dims:?} but the manifest gives {expected:?} ({} layout, image_size {}x{})",
                input.name(),
                match spec.preprocess.layout {
                    Layout::Nchw => "nchw",
                    Layout::Nhwc => "nhwc",
                },
                spec.preprocess.width,
                spec.preprocess.height
            )));
        }
    }
    if in_dims[0] > 1 {
        return Err(mismatch(format!(
            "input `{}` has a fixed batch of {}; need 1 or dynamic",
            input.name(),
            in_dims[0]
        )));
    }
    let ValueType::Tensor { ty, shape, .. } = output.dtype() else {
        return Err(mismatch(format!(
            "output `{}` is not a tensor",
            output.name()
        )));
    };
    if *ty != TensorElementType::Float32 {
        return Err(mismatch(format!(
            "output `{}` is {ty:?}, expected Float32",
            output.name()
        )));
    }
    let out_dims: Vec<i64> = shape.iter().copied().collect();
    let want_out = [spec.tokens_per_frame as i64, spec.hidden_size as i64];
    if out_dims.len() != 3
        || out_dims[1..]
            .iter()
            .zip(want_out)
            .any(|(&got, want)| got >= 0 && got != want)
    {
        return Err(mismatch(format!(
            "output `{}` has shape {out_dims:?}; the manifest and decoder need [batch, {}, {}] (tokens_per_frame, hidden_size)",
            output.name(),
            spec.tokens_per_frame,
            spec.hidden_size
        )));
    }
    Ok((
        input.name().to_string(),
        output.name().to_string(),
        in_dims[0] < 0,
    ))
}
