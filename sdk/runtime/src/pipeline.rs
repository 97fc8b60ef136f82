//! [`Pipeline`]: a loaded model package (vision encoder, decoder, tokenizer, KV cache) and
//! one-shot questions over frames, streamed token by token with final [`Stats`].

use crate::cache::{KvBackend, KvChoice, KvStats};
use crate::device::{DeviceBackend, DeviceDecoding, GpuDecoder};
use crate::prompt::{Part, PromptTemplate};
use crate::tiles::Tiler;
use crate::{RuntimeConfig, RuntimeError, Sampling};
use jetvlm_camera::Frame;
use jetvlm_core::{Device, FrameId};
use jetvlm_decoder::{
    Decode, FinishReason, GenerateOptions, Generation, Input, LoadOptions, Logits, Model, OnCpu,
    Tokenizer,
};
use jetvlm_kvcache::CacheShape;
use jetvlm_vision::package::{Issue, TileSection};
use jetvlm_vision::{Embeddings, ImageView, ModelPackage, OrtEncoder, VisionEncoder};
use serde::Serialize;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Timings and sizes of one answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Tokens in the prompt (text and frame tokens).
    pub prompt_tokens: usize,
    /// Frames encoded for this answer.
    pub frames: usize,
    /// Preprocessing + vision encoder time for those frames.
    pub encoder_ms: f64,
    /// Decoder prefill over the prompt.
    pub prefill_ms: f64,
    /// From the call to the first generated token.
    pub ttft_ms: f64,
    /// Mean time per generated token after the first.
    pub tpot_ms: f64,
    /// Generated tokens.
    pub tokens: usize,
    /// KV cache tokens and bytes by precision at the end of the answer.
    pub kv: KvStats,
    /// The KV policy in effect (its canonical name, or `f32` for the reference cache).
    pub kv_policy: String,
    /// The ONNX Runtime execution provider that ran the encoder.
    pub execution_provider: String,
    /// Where the decoder ran: `cpu`, or `cuda (<GPU name>)`.
    pub decoder_device: String,
    /// Why generation stopped (`None` while the stream runs).
    pub finish_reason: Option<FinishReason>,
}

/// A finished answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Answer {
    /// The generated text.
    pub text: String,
    /// The generated token ids.
    pub token_ids: Vec<u32>,
    /// Timings and sizes (flattened into the answer's JSON).
    #[serde(flatten)]
    pub stats: Stats,
}

/// One streamed token and the text it completes (may be empty).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Token {
    /// The token id.
    pub id: u32,
    /// The text this token completes (may be empty).
    pub text: String,
}

/// A prompt ready for the decoder: text ids and frame embeddings in order.
#[derive(Clone, Debug)]
pub(crate) enum Span {
    Text(Vec<u32>),
    Frame(usize),
    /// Tokens `offset..offset + tokens` of frame `frame`'s embeddings (one encoder run of a
    /// tiled frame), cached under the id at `slot` of the prompt's frame ids (each tile is
    /// a frame of its own in the cache).
    Tile {
        frame: usize,
        offset: usize,
        tokens: usize,
        slot: usize,
    },
}

/// A prompt laid out for the decoder, with its frames encoded.
struct Prepared {
    spans: Vec<Span>,
    embeds: Vec<Embeddings>,
    ids: Vec<FrameId>,
    encoder_ms: f64,
    prompt_tokens: usize,
}

/// The decoder a generation runs on: the CPU decoder over the pipeline's KV cache, or a
/// device session.
pub(crate) type Backend<'a> = Box<dyn Decode<Error = RuntimeError> + 'a>;

/// The CPU decoder as a [`Backend`].
struct CpuBackend<'a>(OnCpu<'a, KvBackend>);

impl Decode for CpuBackend<'_> {
    type Error = RuntimeError;
    fn decode(&mut self, ids: &[u32]) -> Result<Logits, RuntimeError> {
        Ok(self.0.decode(ids)?)
    }
}

/// Where a pipeline's decoder runs: the CPU decoder over the pipeline's KV cache, or a
/// decoder on a device (a CUDA GPU, or the simulated device) with KV pools of its own.
pub(crate) enum DecoderOn {
    Cpu(Box<Model>),
    Device(Box<dyn DeviceDecoding>),
}

impl DecoderOn {
    /// Loads the decoder in `dir` on `device`; `kv` is the pipeline's KV choice.
    fn load(device: Device, dir: &Path, kv: &KvChoice) -> Result<Self, RuntimeError> {
        Ok(match device {
            Device::Cpu => DecoderOn::Cpu(Box::new(Model::load(dir, &LoadOptions::default())?)),
            Device::Cuda => DecoderOn::Device(Box::new(GpuDecoder::load(
                jetvlm_cuda::CudaDevice::open(0)?,
                dir,
                kv,
            )?)),
            Device::Sim => DecoderOn::Device(Box::new(GpuDecoder::load(
                jetvlm_cuda::SimDevice::new(),
                dir,
                kv,
            )?)),
        })
    }

    /// The CPU decoder, or an error naming `op` when the decoder runs on a device.
    pub(crate) fn cpu(&self, op: &'static str) -> Result<&Model, RuntimeError> {
        match self {
            DecoderOn::Cpu(m) => Ok(m.as_ref()),
            DecoderOn::Device(d) => Err(RuntimeError::Unsupported {
                op,
                message: format!(
                    "needs the CPU decoder; this pipeline runs its decoder on {}",
                    d.name()
                ),
            }),
        }
    }

    /// Where the decoder runs, for reports.
    fn describe(&self) -> String {
        match self {
            DecoderOn::Cpu(_) => "cpu".into(),
            DecoderOn::Device(d) => d.name(),
        }
    }
}

/// Prefills `prompt` on the CPU decoder and returns the generation after it.
pub(crate) fn start_on_cpu<'a>(
    model: &'a Model,
    cache: &'a mut KvBackend,
    prompt: &[Input<'_>],
    prompt_ids: &[u32],
    tokenizer: &'a Tokenizer,
    opts: GenerateOptions,
) -> Result<Generation<'a, Backend<'a>>, RuntimeError> {
    let logits = model.forward(prompt, cache)?;
    let backend: Backend<'a> = Box::new(CpuBackend(OnCpu { model, cache }));
    Ok(Generation::resume(
        backend,
        logits,
        prompt_ids,
        Some(tokenizer),
        opts,
    ))
}

/// A loaded model package.
pub struct Pipeline {
    pub(crate) package: ModelPackage,
    pub(crate) encoder: OrtEncoder,
    pub(crate) decoder: DecoderOn,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) template: PromptTemplate,
    pub(crate) kv: KvChoice,
    pub(crate) cache: KvBackend,
    pub(crate) capacity: usize,
    pub(crate) cfg: RuntimeConfig,
    pub(crate) bos: Option<u32>,
    pub(crate) stop_tokens: Vec<u32>,
    pub(crate) next_frame: FrameId,
    /// Cuts frames into tiles (a package with `vision.tiles`).
    pub(crate) tiler: Option<Tiler>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("package", &self.package.dir)
            .field("kv", &self.kv.name())
            .finish()
    }
}

/// Tokens of prompt text (BOS, system prompt, the template's text and the question) the
/// default KV capacity of [`Pipeline::load`] leaves room for beside the frames and the answer;
/// a longer prompt grows the cache (unless `capacity_tokens` caps it).
pub(crate) const PROMPT_TEXT_TOKENS: usize = 512;

impl Pipeline {
    /// Validates the package (all problems at once), then loads the decoder, the tokenizer
    /// and the vision encoder, and sizes the KV cache.
    pub fn load(dir: &Path, cfg: RuntimeConfig) -> Result<Self, RuntimeError> {
        // A config built or changed in code gets the checks a YAML file gets.
        cfg.validate(Path::new("<runtime config>"))?;
        let package = load_package(dir, &cfg)?;
        let shape = CacheShape::of(&package.decoder_config);
        let kv = resolve_kv(&package, &cfg, shape)?;
        let decoder = DecoderOn::load(cfg.device, &package.decoder_dir, &kv)?;
        let tokenizer = Tokenizer::from_dir(&package.decoder_dir)?;
        let encoder = OrtEncoder::from_package(&package, &cfg.vision)?;
        let hidden = package.decoder_config.hidden_size;
        if encoder.hidden_size() != hidden {
            return Err(prompt_error(
                &package,
                format!(
                    "encoder width {} differs from the decoder hidden size {hidden}",
                    encoder.hidden_size(),
                ),
            ));
        }
        let (bos, stop_tokens) = special_tokens(&package, &tokenizer)?;
        let template = PromptTemplate::new(&package.manifest.prompt)
            .with_tiles(package.manifest.vision.tiles.as_ref());
        let tiler = Tiler::new(&package);
        // The window's frames, the prompt's text and the answer.
        let capacity = cfg.capacity_tokens.unwrap_or(
            cfg.window_frames * package.tokens_per_frame()
                + PROMPT_TEXT_TOKENS
                + cfg.max_new_tokens,
        );
        let cache = KvBackend::new(&kv, shape, capacity)?;
        tracing::info!(
            package = %package.dir.display(),
            kv = %kv.name(),
            capacity,
            provider = %encoder.execution_provider(),
            decoder = %decoder.describe(),
            "pipeline loaded"
        );
        Ok(Pipeline {
            package,
            encoder,
            decoder,
            tokenizer,
            template,
            kv,
            cache,
            capacity,
            cfg,
            bos,
            stop_tokens,
            next_frame: 0,
            tiler,
        })
    }

    /// The loaded model package (manifest, encoder spec, decoder config).
    pub fn package(&self) -> &ModelPackage {
        &self.package
    }

    /// The runtime configuration it was loaded with (its `sampling` as last set by
    /// [`Pipeline::set_sampling`]).
    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// Replaces the sampling of the answers started from here on (questions to the pipeline
    /// and to its sessions), after the checks a runtime config's `sampling` gets
    /// ([`Sampling::validate`]); on an error, naming `sampling.<field>`, nothing changes.
    pub fn set_sampling(&mut self, sampling: Sampling) -> Result<(), RuntimeError> {
        sampling.validate(Path::new("<Pipeline::set_sampling>"))?;
        self.cfg.sampling = sampling;
        Ok(())
    }

    /// The CPU decoder; `None` when the decoder runs on a device (`device: cuda` or `sim`).
    pub fn model(&self) -> Option<&Model> {
        match &self.decoder {
            DecoderOn::Cpu(m) => Some(m.as_ref()),
            DecoderOn::Device(_) => None,
        }
    }

    /// Where the decoder runs, for reports: `cpu`, `cuda (<GPU name>)`, or `sim (...)`.
    pub fn decoder_device(&self) -> String {
        match &self.decoder {
            DecoderOn::Cpu(_) => "cpu".into(),
            DecoderOn::Device(_) => format!("{} ({})", self.cfg.device, self.decoder.describe()),
        }
    }

    pub(crate) fn cache_shape(&self) -> CacheShape {
        CacheShape::of(&self.package.decoder_config)
    }

    /// The decoder's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The KV policy in effect (its canonical name, or `f32` for the reference cache).
    pub fn kv_policy(&self) -> String {
        self.kv.name()
    }

    /// The execution provider running the vision encoder.
    pub fn execution_provider(&self) -> String {
        self.encoder.execution_provider().to_string()
    }

    /// KV bytes by precision of the pipeline's cache now.
    pub fn kv_memory(&self) -> KvStats {
        self.cache.memory()
    }

    /// Encodes frames (one batch when the encoder allows) and returns their embeddings and
    /// the time spent. A tiled package's frame gives all its encoder runs' embeddings in
    /// one, row-major tiles then the global image.
    pub fn encode_frames(
        &mut self,
        frames: &[Frame],
    ) -> Result<(Vec<Embeddings>, f64), RuntimeError> {
        let t0 = Instant::now();
        let mut views = Vec::with_capacity(frames.len());
        for f in frames {
            views.push(frame_view(f)?);
        }
        let out = if self.tiler.is_some() {
            let mut out = Vec::with_capacity(frames.len());
            for (f, view) in frames.iter().zip(&views) {
                out.push(self.encode_view(view, f.index)?);
            }
            out
        } else {
            self.encoder.encode_batch(&views)?
        };
        Ok((out, t0.elapsed().as_secs_f64() * 1e3))
    }

    /// One frame's embeddings: one encoder run, or (tiled package) a run per tile, the
    /// tiles' embeddings concatenated in prompt order. `index`: the frame's index in its
    /// stream, for errors.
    pub(crate) fn encode_view(
        &mut self,
        view: &ImageView,
        index: u64,
    ) -> Result<Embeddings, RuntimeError> {
        let Some(tiler) = &mut self.tiler else {
            return Ok(VisionEncoder::encode(&mut self.encoder, view)?);
        };
        let frame_err = |source| RuntimeError::Frame {
            index,
            source: Box::new(source),
        };
        let t = tiler.tile();
        let tiles = tiler.cut(view).map_err(frame_err)?;
        let mut views = Vec::with_capacity(tiles.len());
        for tile in &tiles {
            views.push(ImageView::new(t, t, tile).map_err(frame_err)?);
        }
        let runs = self.encoder.encode_batch(&views)?;
        let hidden = self.encoder.hidden_size();
        let mut data = Vec::with_capacity(runs.iter().map(|e| e.data.len()).sum());
        let mut tokens = 0;
        for e in runs {
            tokens += e.tokens;
            data.extend_from_slice(&e.data);
        }
        Ok(Embeddings {
            tokens,
            hidden,
            data,
            deepstack: Vec::new(),
        })
    }

    /// The encoder's input for each of the frame's encoder runs (a tiled package: row-major
    /// tiles, then the global image; else the one preprocessed frame), as f32 NCHW: what the
    /// encoder is fed, for checking against the model's processor.
    pub fn encoder_inputs(&mut self, frame: &Frame) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let view = frame_view(frame)?;
        let frame_err = |source| RuntimeError::Frame {
            index: frame.index,
            source: Box::new(source),
        };
        let images = match &mut self.tiler {
            Some(tiler) => {
                let t = tiler.tile();
                let tiles = tiler.cut(&view).map_err(frame_err)?;
                tiles.into_iter().map(|rgb| (t, t, rgb)).collect()
            }
            None => vec![(view.width(), view.height(), view.data().to_vec())],
        };
        let pre = self.encoder.preprocessor();
        let mut out = Vec::with_capacity(images.len());
        for (w, h, rgb) in &images {
            let v = ImageView::new(*w, *h, rgb).map_err(frame_err)?;
            out.push(pre.run(&v).map_err(frame_err)?.data.to_f32());
        }
        Ok(out)
    }

    /// Tokenizes text (no special tokens added).
    pub(crate) fn encode_text(&self, text: &str) -> Result<Vec<u32>, RuntimeError> {
        Ok(self.tokenizer.encode(text, false)?)
    }

    /// The prompt for `n_frames` frames and a question, as spans.
    pub(crate) fn prompt_spans(
        &self,
        n_frames: usize,
        question: &str,
    ) -> Result<Vec<Span>, RuntimeError> {
        let mut spans = Vec::new();
        let mut pending: Vec<u32> = self.bos.into_iter().collect();
        for part in self.template.layout(n_frames, question) {
            match part {
                Part::Text(t) => pending.extend(self.encode_text(&t)?),
                Part::Frame(i) => {
                    if !pending.is_empty() {
                        spans.push(Span::Text(std::mem::take(&mut pending)));
                    }
                    spans.push(Span::Frame(i));
                }
                Part::Tile { frame, tile } => {
                    if !pending.is_empty() {
                        spans.push(Span::Text(std::mem::take(&mut pending)));
                    }
                    let v = &self.package.manifest.vision;
                    let runs = v.tiles.as_ref().map_or(1, TileSection::runs);
                    spans.push(Span::Tile {
                        frame,
                        offset: tile * v.tokens_per_frame,
                        tokens: v.tokens_per_frame,
                        slot: frame * runs + tile,
                    });
                }
            }
        }
        if !pending.is_empty() {
            spans.push(Span::Text(pending));
        }
        Ok(spans)
    }

    /// The prompt's token ids, with `placeholder` at each frame token (what a reference
    /// implementation that substitutes image features at a placeholder token is fed).
    pub fn prompt_ids(
        &self,
        n_frames: usize,
        question: &str,
        placeholder: u32,
    ) -> Result<Vec<u32>, RuntimeError> {
        let tpf = self.package.tokens_per_frame();
        Ok(self
            .prompt_spans(n_frames, question)?
            .into_iter()
            .flat_map(|s| match s {
                Span::Text(ids) => ids,
                Span::Frame(_) => vec![placeholder; tpf],
                Span::Tile { tokens, .. } => vec![placeholder; tokens],
            })
            .collect())
    }

    fn ensure_capacity(&mut self, needed: usize) -> Result<(), RuntimeError> {
        if needed <= self.capacity {
            return Ok(());
        }
        if let Some(limit) = self.cfg.capacity_tokens {
            return Err(RuntimeError::ContextTooLong {
                needed,
                limit,
                what: "capacity_tokens of the runtime config",
            });
        }
        self.capacity = needed.next_multiple_of(crate::session::CAPACITY_STEP);
        self.cache = KvBackend::new(&self.kv, self.cache_shape(), self.capacity)?;
        Ok(())
    }

    /// Encodes the frames, lays out the prompt and clears the cache for it.
    fn prepare(&mut self, frames: &[Frame], question: &str) -> Result<Prepared, RuntimeError> {
        let (embeds, encoder_ms) = self.encode_frames(frames)?;
        let spans = self.prompt_spans(frames.len(), question)?;
        let tpf = self.package.tokens_per_frame();
        let prompt_tokens: usize = spans
            .iter()
            .map(|s| match s {
                Span::Text(ids) => ids.len(),
                Span::Frame(_) => tpf,
                Span::Tile { tokens, .. } => *tokens,
            })
            .sum();
        warn_past_trained_frames(&self.package, frames.len(), "a question");
        if let Some(w) = self.package.decoder_config.positions_warning(
            prompt_tokens + self.cfg.max_new_tokens,
            &format!(
                "the prompt ({prompt_tokens} tokens) with max_new_tokens {}",
                self.cfg.max_new_tokens
            ),
        ) {
            tracing::warn!("{w}");
        }
        self.ensure_capacity(prompt_tokens + self.cfg.max_new_tokens)?;
        self.cache.clear();
        // A cache id per frame, or per encoder run of a tiled frame (each tile is cached as a
        // frame of its own).
        let runs = self
            .package
            .manifest
            .vision
            .tiles
            .as_ref()
            .map_or(1, TileSection::runs);
        let n_ids = (frames.len() * runs) as u64;
        let ids: Vec<FrameId> = (0..n_ids).map(|i| self.next_frame + i).collect();
        self.next_frame += n_ids;
        Ok(Prepared {
            spans,
            embeds,
            ids,
            encoder_ms,
            prompt_tokens,
        })
    }

    /// The decoder's logits for the token after the prompt (frames + question), on a fresh
    /// cache. For checking against reference implementations.
    pub fn first_token_logits(
        &mut self,
        frames: &[Frame],
        question: &str,
    ) -> Result<Vec<f32>, RuntimeError> {
        let p = self.prepare(frames, question)?;
        let inputs = inputs(&p.spans, &p.embeds, &p.ids);
        let model = self.decoder.cpu("first_token_logits")?;
        let logits = model.forward(&inputs, &mut self.cache)?;
        Ok(logits.last().to_vec())
    }

    /// Runs the prompt for `frames` and `question` through the CPU decoder into `store` (any
    /// KV store, e.g. the calibration recorder) and returns the logits of the token after it.
    pub fn forward_prompt<C: jetvlm_decoder::KvStore>(
        &mut self,
        frames: &[Frame],
        question: &str,
        store: &mut C,
    ) -> Result<Vec<f32>, RuntimeError> {
        let p = self.prepare(frames, question)?;
        let inputs = inputs(&p.spans, &p.embeds, &p.ids);
        let model = self.decoder.cpu("forward_prompt")?;
        let logits = model.forward(&inputs, store)?;
        Ok(logits.last().to_vec())
    }

    /// Asks a question about frames (oldest first) on a fresh cache and streams the answer.
    pub fn ask(
        &mut self,
        frames: &[Frame],
        question: &str,
    ) -> Result<TokenStream<'_>, RuntimeError> {
        let started = Instant::now();
        let Prepared {
            spans,
            embeds,
            ids,
            encoder_ms,
            prompt_tokens,
        } = self.prepare(frames, question)?;
        let text_ids: Vec<u32> = spans
            .iter()
            .flat_map(|s| match s {
                Span::Text(ids) => ids.clone(),
                Span::Frame(_) | Span::Tile { .. } => Vec::new(),
            })
            .collect();
        let stats = Stats {
            prompt_tokens,
            frames: frames.len(),
            encoder_ms,
            kv_policy: self.kv.name(),
            execution_provider: self.encoder.execution_provider().to_string(),
            decoder_device: self.decoder_device(),
            ..Stats::default()
        };
        let inputs = inputs(&spans, &embeds, &ids);
        self.answer(&inputs, &text_ids, started, stats)
    }

    /// Prefills `prompt` after what the cache holds (on a GPU: on fresh device pools) and
    /// returns the answer's stream; `prompt_ids` feed the repetition penalty, `stats` are
    /// completed with the prefill time.
    pub(crate) fn answer(
        &mut self,
        prompt: &[Input<'_>],
        prompt_ids: &[u32],
        started: Instant,
        stats: Stats,
    ) -> Result<TokenStream<'_>, RuntimeError> {
        if let DecoderOn::Device(gpu) = &self.decoder {
            let tap = self.cache.tap();
            let t_prefill = Instant::now();
            let (backend, logits) = gpu.prefill(prompt, self.cfg.max_new_tokens, tap.clone())?;
            return Ok(self.stream_on_device(
                backend,
                logits,
                prompt_ids,
                (started, t_prefill),
                tap,
                stats,
            ));
        }
        let opts = self.generate_options();
        let tap = self.cache.tap();
        let t_prefill = Instant::now();
        let generation = start_on_cpu(
            self.decoder.cpu("ask")?,
            &mut self.cache,
            prompt,
            prompt_ids,
            &self.tokenizer,
            opts,
        )?;
        Ok(TokenStream::new(generation, tap, started, t_prefill, stats))
    }

    /// The answer's stream on a device backend whose prompt has run (from `times.1`; the
    /// question came at `times.0`).
    pub(crate) fn stream_on_device<'a>(
        &'a self,
        backend: DeviceBackend<'a>,
        logits: Logits,
        prompt_ids: &[u32],
        (started, t_prefill): (Instant, Instant),
        tap: Arc<Mutex<KvStats>>,
        stats: Stats,
    ) -> TokenStream<'a> {
        let generation = Generation::resume(
            backend,
            logits,
            prompt_ids,
            Some(&self.tokenizer),
            self.generate_options(),
        );
        TokenStream::new(generation, tap, started, t_prefill, stats)
    }

    pub(crate) fn generate_options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: self.cfg.max_new_tokens,
            sampler: self.cfg.sampling.to_sampler(),
            stop_tokens: self.stop_tokens.clone(),
            stop_strings: self.package.manifest.prompt.stop.clone(),
            skip_special: true,
        }
    }
}

/// The package in `dir`, validated; its own KV policy is checked with its other problems
/// when no runtime config policy replaces it (a config's policy was checked with the config:
/// [`RuntimeConfig::validate`]; a calibration's when its file loads: [`resolve_kv`]).
fn load_package(dir: &Path, cfg: &RuntimeConfig) -> Result<ModelPackage, RuntimeError> {
    Ok(ModelPackage::load_with(dir, |m, issues| {
        if cfg.kv_policy.is_none()
            && let Err(e) = KvChoice::parse(&m.kv.policy)
        {
            issues.push(Issue::new("kv.policy", e.to_string()));
        }
    })?)
}

/// The KV policy in effect: a calibration file's (the config's or a flag's, else the
/// package's own when no policy is named; it must have been measured on this model's shape),
/// else the config's policy, else the package's; a policy given at run time keeps the
/// package's block sizes where it names none; the group is fitted to the head dim as the
/// cache fits it, so the name reported is the policy that runs.
fn resolve_kv(
    package: &ModelPackage,
    cfg: &RuntimeConfig,
    shape: CacheShape,
) -> Result<KvChoice, RuntimeError> {
    let calibration = match (
        &cfg.kv_calibration,
        &cfg.kv_policy,
        &package.manifest.kv.calibration,
    ) {
        (Some(path), ..) => Some(path.clone()),
        (None, None, Some(rel)) => Some(package.dir.join(rel)),
        _ => None,
    };
    let kv_override = match calibration {
        Some(path) => {
            let c = jetvlm_calibration::Calibration::load(&path)?;
            c.policy_for(&path, shape)?;
            Some(c.policy)
        }
        None => cfg.kv_policy.clone(),
    };
    let mut kv = KvChoice::parse(
        kv_override
            .as_deref()
            .unwrap_or(&package.manifest.kv.policy),
    )?;
    if let (Some(name), KvChoice::Policy(p), Ok(KvChoice::Policy(pkg))) = (
        kv_override.as_deref(),
        &mut kv,
        KvChoice::parse(&package.manifest.kv.policy),
    ) {
        *p = p.clone().keeping_blocks_of(name, &pkg);
    }
    if let KvChoice::Policy(p) = &mut kv {
        *p = p.fitted_to(shape.head_dim);
    }
    Ok(kv)
}

/// Warns when `frames` frames in one context (`what`: a question, a session window) pass the
/// frames per prompt the package says its model was trained with (`prompt.max_frames`).
pub(crate) fn warn_past_trained_frames(package: &ModelPackage, frames: usize, what: &str) {
    if let Some(max) = package.manifest.prompt.max_frames
        && frames > max
    {
        tracing::warn!(
            frames,
            max_frames = max,
            "{what} with {frames} frames: the model was trained with at most {max} per prompt \
             (prompt.max_frames in {}); answers can get worse past it",
            package.manifest_path.display()
        );
    }
}

/// A frame as an image view (its size checked against its pixels).
fn frame_view(f: &Frame) -> Result<ImageView<'_>, RuntimeError> {
    ImageView::new(f.width, f.height, &f.rgb).map_err(|source| RuntimeError::Frame {
        index: f.index,
        source: Box::new(source),
    })
}

fn prompt_error(package: &ModelPackage, message: String) -> RuntimeError {
    RuntimeError::Prompt {
        manifest: package.manifest_path.clone(),
        message,
    }
}

/// The BOS token the prompt starts with (when the manifest asks for one) and the tokens that
/// end an answer (the tokenizer's and config.json's).
fn special_tokens(
    package: &ModelPackage,
    tokenizer: &Tokenizer,
) -> Result<(Option<u32>, Vec<u32>), RuntimeError> {
    let bos = if package.manifest.prompt.add_bos {
        let id = tokenizer
            .bos_token()
            .and_then(|t| tokenizer.token_to_id(t))
            .or(package.decoder_config.bos_token_id);
        Some(id.ok_or_else(|| {
            prompt_error(
                package,
                "add_bos is set but neither the tokenizer nor config.json names a BOS token".into(),
            )
        })?)
    } else {
        None
    };
    let mut stop_tokens: Vec<u32> = tokenizer.stop_token_ids().to_vec();
    stop_tokens.extend(&package.decoder_config.eos_token_ids);
    stop_tokens.sort_unstable();
    stop_tokens.dedup();
    Ok((bos, stop_tokens))
}

/// Decoder inputs for spans (frames borrow their embeddings).
pub(crate) fn inputs<'a>(
    spans: &'a [Span],
    embeds: &'a [Embeddings],
    ids: &[FrameId],
) -> Vec<Input<'a>> {
    spans
        .iter()
        .map(|s| match s {
            Span::Text(t) => Input::text(t),
            Span::Frame(i) => Input::frame(&embeds[*i].data, embeds[*i].tokens, ids[*i])
                .with_deepstack(&embeds[*i].deepstack),
            Span::Tile {
                frame,
                offset,
                tokens,
                slot,
            } => {
                let h = embeds[*frame].hidden;
                Input::frame(
                    &embeds[*frame].data[offset * h..(offset + tokens) * h],
                    *tokens,
                    ids[*slot],
                )
            }
        })
        .collect()
}

/// A streaming answer: iterate for [`Token`]s, then [`finish`](TokenStream::finish) for the
/// full [`Answer`] with its [`Stats`].
pub struct TokenStream<'a> {
    generation: Generation<'a, Backend<'a>>,
    tap: Arc<Mutex<KvStats>>,
    started: Instant,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    stats: Stats,
    ids: Vec<u32>,
    text: String,
}

impl<'a> TokenStream<'a> {
    /// A stream over `generation`, whose prompt's prefill ran from `t_prefill` until now.
    pub(crate) fn new(
        generation: Generation<'a, Backend<'a>>,
        tap: Arc<Mutex<KvStats>>,
        started: Instant,
        t_prefill: Instant,
        stats: Stats,
    ) -> Self {
        let prefill_ms = t_prefill.elapsed().as_secs_f64() * 1e3;
        TokenStream {
            generation,
            tap,
            started,
            first_at: None,
            last_at: None,
            stats: Stats {
                prefill_ms,
                ..stats
            },
            ids: Vec::new(),
            text: String::new(),
        }
    }

    /// Stats so far (complete once the stream is exhausted).
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.tokens = self.ids.len();
        if let Some(first) = self.first_at {
            s.ttft_ms = (first - self.started).as_secs_f64() * 1e3;
            if let Some(last) = self.last_at
                && self.ids.len() > 1
            {
                s.tpot_ms = (last - first).as_secs_f64() * 1e3 / (self.ids.len() - 1) as f64;
            }
        }
        if let Ok(kv) = self.tap.lock() {
            s.kv = *kv;
        }
        s.finish_reason = self.generation.finish_reason();
        s
    }

    /// Runs the stream to its end and returns the answer.
    pub fn finish(mut self) -> Result<Answer, RuntimeError> {
        for t in self.by_ref() {
            t?;
        }
        Ok(Answer {
            text: self.text.clone(),
            token_ids: self.ids.clone(),
            stats: self.stats(),
        })
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<Token, RuntimeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let step = self.generation.next()?;
        let now = Instant::now();
        if self.first_at.is_none() {
            self.first_at = Some(now);
        }
        self.last_at = Some(now);
        Some(match step {
            Ok(s) => {
                self.ids.push(s.token);
                self.text.push_str(&s.text);
                Ok(Token {
                    id: s.token,
                    text: s.text,
                })
            }
            Err(e) => Err(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_sampling_checks_like_the_config_and_reaches_the_sampler() {
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo");
        let mut p = Pipeline::load(&demo, RuntimeConfig::default()).unwrap();
        let greedy = Sampling::default();
        for (bad, field) in [
            (
                Sampling {
                    temperature: f32::NAN,
                    ..Sampling::default()
                },
                "sampling.temperature",
            ),
            (
                Sampling {
                    temperature: -1.0,
                    ..Sampling::default()
                },
                "sampling.temperature",
            ),
            (
                Sampling {
                    top_p: 0.0,
                    ..Sampling::default()
                },
                "sampling.top_p",
            ),
            (
                Sampling {
                    top_p: 1.5,
                    ..Sampling::default()
                },
                "sampling.top_p",
            ),
            (
                Sampling {
                    repetition_penalty: f32::INFINITY,
                    ..Sampling::default()
                },
                "sampling.repetition_penalty",
            ),
        ] {
            let err = p.set_sampling(bad.clone()).unwrap_err();
            assert!(
                matches!(&err, RuntimeError::Config(jetvlm_core::ConfigError::Invalid { field: f, .. }) if f == field),
                "{bad:?}: {err}"
            );
            // A refused sampling changes nothing.
            assert_eq!(p.config().sampling, greedy);
            assert_eq!(p.generate_options().sampler, greedy.to_sampler());
        }
        let sampled = Sampling {
            temperature: 1.0,
            top_p: 0.9,
            seed: 7,
            ..Sampling::default()
        };
        p.set_sampling(sampled.clone()).unwrap();
        assert_eq!(p.config().sampling, sampled);
        assert_eq!(p.generate_options().sampler, sampled.to_sampler());
        p.set_sampling(greedy.clone()).unwrap();
        assert_eq!(p.generate_options().sampler, greedy.to_sampler());
    }
}
