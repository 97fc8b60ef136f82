//! The memory planner: pure functions of (board profile, model, workload, KV policy,
//! options).
//!
//! What a plan charges, in bytes:
//!
//! - **weights**: language-model parameters at the config's dtype, or at `--weight-bits`.
//!   8 / 4 bits are charged as `jetvlm quantize` writes them and the decoder holds them
//!   ([`weight_bytes`]): every layer matrix in its `jetvlm_quant::WeightFormat` (codes, an
//!   FP16 scale per group and, for 4 bits, an FP16 zero; group 64 unless `--weight-group`),
//!   the embedding table, norms and biases at the config's dtype, the LM head at the
//!   config's dtype or INT8 (`--head-bits 8`, a tied head then an INT8 copy).
//! - **vision encoder**: its parameters at its dtype (see [`crate::model`]; the vision
//!   encoder is not affected by `--weight-bits`).
//! - **KV cache**, text and frame parts: `layers * kv_heads * 2 (K and V)` vectors of
//!   `head_dim` per token, each at its format's bytes (see [`crate::policy`]). Every layer
//!   keeps the whole context, Gemma 3's sliding-window (local) layers too: the cache's blocks
//!   hold every layer's K and V of their tokens, and a local layer's attention skips the
//!   blocks before its window without freeing them.
//! - **frame features**: the encoder output of every frame in the context, kept by the
//!   runtime to prefill it (and, in a session, to prefill it again after a re-base):
//!   `frames * tokens_per_frame * hidden * 4 * (1 + deepstack_layers)` bytes (f32
//!   embeddings and, for Qwen3-VL, one DeepStack feature set per `deepstack_layers`).
//! - **activations / workspace** (an estimate): with `C = min(prefill_chunk, context)`,
//!   decoder buffers `C * (4 h + q_dim + 2 kv_dim + 3 i) * 4` bytes (f32 residual, norm,
//!   attention output, o-proj output, q/k/v, MLP gate/up/act), attention scratch
//!   `C * heads * (head_dim + 2 + 256) * 4` (online-softmax state and one 256-token block of
//!   scores per query head), logits `2 * vocab * 4` (logits and the sampler's copy), and the
//!   vision encoder's per-frame activations `seq * (6 h_v + i_v) * 4 + heads_v * seq^2 * 4`
//!   plus its f32 input and output tensors.
//! - **camera buffers**: a ring of `count` frames of `width * height * channels` bytes
//!   (default 4 x 1280x720 RGB).
//! - **runtime**: CUDA context and libraries, a constant per board family
//!   ([`crate::Family::runtime_overhead_bytes`]).
//!
//! The roofline: every decode step reads the weights (all but the embedding table, plus the
//! LM head) and the whole KV cache once, so
//! `tpot_floor = (weight bytes read + KV bytes) / bandwidth`, taken at the full context (the
//! last answer token).

use crate::model::{ModelSpec, VisionEncoder, VisionSource};
use crate::policy::{KvFormat, KvPrecision};
use crate::{BoardError, BoardProfile};
use jetvlm_core::DType;
use jetvlm_core::hf::ModelConfig;
use serde::Serialize;

const MIB: u64 = 1 << 20;

/// Tokens of attention scores the decoder keeps per query head (one KV block).
pub const ATTENTION_BLOCK_TOKENS: u64 = 256;

/// Frame tokens, named by the flags they come from (for overflow errors).
const FRAME_TOKENS: &str = "frame tokens (--frames x --tokens-per-frame)";
/// Text tokens, named by the flags they come from (for overflow errors).
const TEXT_TOKENS: &str = "text tokens (--prompt-tokens + --answer-tokens)";

/// `terms` multiplied; on overflow, an error naming `quantity` and the largest term (the
/// input at fault).
pub(crate) fn product(quantity: &str, terms: &[(&str, u64)]) -> Result<u64, BoardError> {
    terms
        .iter()
        .try_fold(1u64, |acc, &(_, v)| acc.checked_mul(v))
        .ok_or_else(|| overflow(quantity, terms))
}

/// `terms` added; on overflow, an error naming `quantity` and the largest term.
pub(crate) fn sum(quantity: &str, terms: &[(&str, u64)]) -> Result<u64, BoardError> {
    terms
        .iter()
        .try_fold(0u64, |acc, &(_, v)| acc.checked_add(v))
        .ok_or_else(|| overflow(quantity, terms))
}

fn overflow(quantity: &str, terms: &[(&str, u64)]) -> BoardError {
    let (input, value) = terms
        .iter()
        .copied()
        .max_by_key(|t| t.1)
        .unwrap_or(("an input", 0));
    BoardError::Overflow {
        quantity: quantity.into(),
        input: input.into(),
        value,
    }
}

/// What the model is asked to hold and produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Camera frames kept in the context.
    pub frames: u64,
    pub tokens_per_frame: u64,
    /// Text tokens of the prompt (system prompt, question, frame markers).
    pub prompt_tokens: u64,
    /// Tokens generated for the answer.
    pub answer_tokens: u64,
}

impl Workload {
    /// `frames * tokens_per_frame`, or an overflow error naming the flag at fault.
    pub fn frame_tokens(&self) -> Result<u64, BoardError> {
        product(
            "the frame token count",
            &[
                ("--frames", self.frames),
                ("--tokens-per-frame", self.tokens_per_frame),
            ],
        )
    }
    /// `prompt_tokens + answer_tokens`, or an overflow error naming the flag at fault.
    pub fn text_tokens(&self) -> Result<u64, BoardError> {
        sum(
            "the text token count",
            &[
                ("--prompt-tokens", self.prompt_tokens),
                ("--answer-tokens", self.answer_tokens),
            ],
        )
    }
    /// Frame tokens plus text tokens, or an overflow error naming the flags at fault.
    pub fn context_tokens(&self) -> Result<u64, BoardError> {
        sum(
            "the context length",
            &[
                (FRAME_TOKENS, self.frame_tokens()?),
                (TEXT_TOKENS, self.text_tokens()?),
            ],
        )
    }
    fn with_frames(&self, frames: u64) -> Self {
        Workload { frames, ..*self }
    }
}

/// Storage of the language model's weights.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// The dtype `config.json` declares.
    #[default]
    Native,
    /// 32 or 16 bits per weight, every parameter; 8 and 4 bits mean
    /// `WeightFormat::Quantized { bits, group: 64, head_int8: false }` (what
    /// `jetvlm quantize --bits B` writes by default).
    Bits(u8),
    /// The layout of `jetvlm quantize --bits B --group G [--head-bits 8]`: layer matrices
    /// weight-only INT8/INT4 in groups of `group`, the rest as stored. `embed_bits`: the
    /// embedding table stored quantized too, at these bits in groups of `group` (a converted
    /// GGUF whose table is quantized; tied, it is the LM head). `overrides`: layer matrices
    /// in their own format (`quantization_config.overrides`, e.g. a llama.cpp Q4_K_M file's
    /// 8-bit `attn_v` / `ffn_down`), charged at it.
    Quantized {
        bits: u8,
        group: u16,
        head_int8: bool,
        embed_bits: Option<u8>,
        overrides: Vec<jetvlm_quant::MatrixOverride>,
    },
}

/// Bytes of a decoder's weights in one [`WeightFormat`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct WeightBytes {
    /// Everything the decoder holds.
    pub total: u64,
    /// What one decode step reads: all but the embedding table, plus the LM head.
    pub read_per_token: u64,
}

/// Group size `jetvlm quantize` uses unless told otherwise.
pub const DEFAULT_WEIGHT_GROUP: u16 = 64;

impl WeightFormat {
    /// Parses `--weight-bits` (8 and 4 with the default group and the LM head as stored).
    pub fn from_bits(bits: u8) -> Result<Self, BoardError> {
        match bits {
            32 | 16 | 8 | 4 => Ok(WeightFormat::Bits(bits)),
            other => Err(BoardError::InvalidWorkload(format!(
                "weight bits must be 32, 16, 8 or 4, got {other}"
            ))),
        }
    }

    /// The quantized layout, when the format is one: layer format and INT8 head.
    pub fn quantized(&self) -> Result<Option<(jetvlm_quant::WeightFormat, bool)>, BoardError> {
        let (bits, group, head) = match *self {
            WeightFormat::Bits(b @ (4 | 8)) => (b, DEFAULT_WEIGHT_GROUP, false),
            WeightFormat::Quantized {
                bits,
                group,
                head_int8,
                ..
            } => (bits, group, head_int8),
            _ => return Ok(None),
        };
        jetvlm_quant::WeightFormat::new(bits as u32, group as usize)
            .map(|f| Some((f, head)))
            .map_err(|e| {
                BoardError::InvalidWorkload(format!("--weight-bits / --weight-group: {e}"))
            })
    }

    /// Bytes of `params` weights, or an overflow error (every parameter at this format's
    /// bits; see [`weight_bytes`] for a whole decoder).
    pub fn bytes(&self, params: u64, native: DType) -> Result<u64, BoardError> {
        let bytes = match (self.quantized()?, self) {
            (Some((f, _)), _) => u64::try_from(
                (params as u128
                    * (f.bits() as u128 * f.group() as u128 + 16 * (1 + f.has_zeros() as u128)))
                    .div_ceil(8 * f.group() as u128),
            )
            .ok(),
            (None, WeightFormat::Bits(b)) => params.checked_mul(*b as u64 / 8),
            (None, _) => params.checked_mul(native.size_bytes() as u64),
        };
        bytes.ok_or_else(|| overflow("the weight bytes", &[("the parameter count", params)]))
    }

    /// The embedding table's quantized format, when it has one (`embed_bits`).
    pub fn embed_format(&self) -> Result<Option<jetvlm_quant::WeightFormat>, BoardError> {
        match *self {
            WeightFormat::Quantized {
                group,
                embed_bits: Some(b),
                ..
            } => jetvlm_quant::WeightFormat::new(b as u32, group as usize)
                .map(Some)
                .map_err(|e| BoardError::InvalidWorkload(format!("embed_bits: {e}"))),
            _ => Ok(None),
        }
    }

    /// Bits per weight of the layer matrices, scales and zeros included.
    /// (The base format: matrices that `overrides` name may hold more.)
    pub fn bits_per_weight(&self, native: DType) -> f64 {
        match (self.quantized(), self) {
            (Ok(Some((f, _))), _) => f.bits_per_weight(),
            (_, WeightFormat::Bits(b)) => *b as f64,
            _ => 8.0 * native.size_bytes() as f64,
        }
    }

    pub fn describe(&self, native: DType) -> String {
        match (self.quantized(), self) {
            (Ok(Some((f, head))), _) => {
                let embed = self.embed_format().ok().flatten();
                let own = match self {
                    WeightFormat::Quantized { overrides, .. } if overrides.is_empty() => {
                        String::new()
                    }
                    WeightFormat::Quantized { overrides, .. } if overrides.len() <= 4 => {
                        let list: Vec<String> = overrides.iter().map(|o| o.to_string()).collect();
                        format!(" (in their own format: {})", list.join(", "))
                    }
                    WeightFormat::Quantized { overrides, .. } => {
                        let mut formats: Vec<String> = overrides
                            .iter()
                            .map(|o| format!("int{} g{}", o.format.bits(), o.format.group()))
                            .collect();
                        formats.sort();
                        formats.dedup();
                        format!(
                            " ({} overrides in their own format: {})",
                            overrides.len(),
                            formats.join(", ")
                        )
                    }
                    _ => String::new(),
                };
                format!(
                    "layer matrices int{} g{} ({} bits/weight){own}, embeddings {}, LM head {}",
                    f.bits(),
                    f.group(),
                    f.bits_per_weight(),
                    embed.map_or_else(
                        || native.to_string(),
                        |e| format!("int{} g{}", e.bits(), e.group())
                    ),
                    if head {
                        format!("int8 g{}", f.group())
                    } else if embed.is_some() {
                        "the embedding table when tied, else as stored".into()
                    } else {
                        native.to_string()
                    }
                )
            }
            (_, WeightFormat::Native) => format!("{native} (from config)"),
            (_, WeightFormat::Bits(b)) => format!("{b}-bit"),
            _ => "invalid".into(),
        }
    }
}

/// Bytes of a decoder's weights in `format`, as the CPU decoder holds them. Quantized:
/// every layer matrix in its own format (the base one or the override naming it,
/// `jetvlm_quant::qconfig::matrix_format`; `jetvlm_quant::WeightFormat::matrix_bytes`), the
/// embedding table at the config's dtype (or its `embed_bits` format), norms and biases at
/// the config's dtype, the LM head at the config's dtype (tied: none, the table serves) or
/// INT8. An overflow is an error; a group that does not divide a matrix's
/// columns is an error naming `--weight-group`.
pub fn weight_bytes(text: &ModelConfig, format: &WeightFormat) -> Result<WeightBytes, BoardError> {
    let native = text.dtype.size_bytes() as u128;
    let emb = text.vocab_size as u128 * text.hidden_size as u128;
    let Some((f, head_int8)) = format.quantized()? else {
        return Ok(WeightBytes {
            total: format.bytes(text.num_parameters(), text.dtype)?,
            read_per_token: format.bytes(params_read_per_token(text), text.dtype)?,
        });
    };
    let too_big = || {
        overflow(
            "the weight bytes",
            &[("the parameter count", text.num_parameters())],
        )
    };
    let h = text.hidden_size as u128;
    let q = (text.num_attention_heads * text.head_dim) as u128;
    let kv = (text.num_key_value_heads * text.head_dim) as u128;
    let i = text.intermediate_size as u128;
    let group = f.group() as u128;
    let overrides: &[jetvlm_quant::MatrixOverride] = match format {
        WeightFormat::Quantized { overrides, .. } => overrides,
        _ => &[],
    };
    for o in overrides {
        if let jetvlm_quant::Layers::One(n) = o.layers
            && n >= text.num_hidden_layers
        {
            return Err(BoardError::InvalidWorkload(format!(
                "quantization_config.overrides.{} names layer {n} of a decoder with {} layers",
                o.key(),
                text.num_hidden_layers
            )));
        }
    }
    // One matrix in its format `m`; `key` names what set it.
    let matrix = |rows: u128,
                  cols: u128,
                  m: jetvlm_quant::WeightFormat,
                  key: &str|
     -> Result<u128, BoardError> {
        let g = m.group() as u128;
        if cols == 0 || !cols.is_multiple_of(g) {
            return Err(BoardError::InvalidWorkload(format!(
                "{key} {g} does not divide a {cols}-column layer matrix of this model (use a group that divides {cols})"
            )));
        }
        let params = if m.has_zeros() { 4 } else { 2 };
        Ok(rows * (cols * m.bits() as u128 / 8 + cols / g * params))
    };
    let shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)];
    let layers = text.num_hidden_layers as u128;
    let mut layers_matrices = 0u128;
    let mut layer_params = 0u128;
    for (role, (r, c)) in jetvlm_quant::MatrixRole::ALL.into_iter().zip(shapes) {
        layer_params += r * c;
        // The layers an override names for this matrix, then the rest at its `*` format.
        let mut named = 0u128;
        for o in overrides.iter().filter(|o| o.role == role) {
            if let jetvlm_quant::Layers::One(_) = o.layers {
                let key = format!("quantization_config.overrides.{}.group_size", o.key());
                layers_matrices += matrix(r, c, o.format, &key)?;
                named += 1;
            }
        }
        let rest_fmt = overrides
            .iter()
            .find(|o| o.role == role && o.layers == jetvlm_quant::Layers::All);
        let (m, key) = match rest_fmt {
            Some(o) => (
                o.format,
                format!("quantization_config.overrides.{}.group_size", o.key()),
            ),
            None => (f, "--weight-group".to_string()),
        };
        if named < layers {
            layers_matrices += (layers - named) * matrix(r, c, m, &key)?;
        }
    }
    let untied = if text.tie_word_embeddings { 0 } else { emb };
    let table = match format.embed_format()? {
        Some(e) => {
            if !h.is_multiple_of(e.group() as u128) {
                return Err(BoardError::InvalidWorkload(format!(
                    "embed_bits group {} does not divide the embedding table's {h} columns",
                    e.group()
                )));
            }
            text.vocab_size as u128
                * (h * e.bits() as u128 / 8
                    + h / e.group() as u128 * (if e.has_zeros() { 4 } else { 2 }))
        }
        None => emb * native,
    };
    // Norms, biases and whatever else the family holds, as stored.
    let rest = (text.num_parameters() as u128)
        .checked_sub(layers * layer_params + emb + untied)
        .ok_or_else(too_big)?;
    let head = if head_int8 {
        if !h.is_multiple_of(group) {
            return Err(BoardError::InvalidWorkload(format!(
                "--weight-group {group} does not divide the LM head's {h} columns"
            )));
        }
        text.vocab_size as u128 * (h + h / group * 2)
    } else {
        untied * native
    };
    let layers_bytes = layers_matrices + rest * native;
    let total = layers_bytes + table + head;
    let read = layers_bytes
        + if head_int8 || !text.tie_word_embeddings {
            head
        } else {
            table
        };
    Ok(WeightBytes {
        total: u64::try_from(total).map_err(|_| too_big())?,
        read_per_token: u64::try_from(read).map_err(|_| too_big())?,
    })
}

/// The camera's frame ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CameraBuffers {
    pub width: u64,
    pub height: u64,
    pub channels: u64,
    pub count: u64,
}

impl Default for CameraBuffers {
    fn default() -> Self {
        CameraBuffers {
            width: 1280,
            height: 720,
            channels: 3,
            count: 4,
        }
    }
}

impl CameraBuffers {
    /// Bytes of the ring, or an overflow error naming the flag at fault.
    pub fn bytes(&self) -> Result<u64, BoardError> {
        product(
            "the camera buffer bytes",
            &[
                ("--camera width", self.width),
                ("--camera height", self.height),
                ("camera channels", self.channels),
                ("--camera-buffers", self.count),
            ],
        )
    }
}

/// Planner knobs that are not the workload itself.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanOptions {
    pub weights: WeightFormat,
    pub camera: CameraBuffers,
    /// Tokens the decoder processes at once during prefill.
    pub prefill_chunk: u64,
    /// Replaces the board's usable memory (e.g. MemAvailable read on the board).
    pub budget_bytes: Option<u64>,
    /// Says where `budget_bytes` came from, for display.
    pub budget_source: Option<String>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            weights: WeightFormat::Native,
            camera: CameraBuffers::default(),
            prefill_chunk: 512,
            budget_bytes: None,
            budget_source: None,
        }
    }
}

/// KV cache bytes split by token kind.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct KvUsage {
    pub text_tokens: u64,
    pub frame_tokens: u64,
    /// Frame tokens kept FP16 inside the policy's FP16 budget.
    pub fp16_frame_tokens: u64,
    pub text_bytes: u64,
    pub frame_bytes: u64,
    pub total_bytes: u64,
    /// The same tokens, all FP16.
    pub fp16_equivalent_bytes: u64,
}

/// Bytes of one token's K and V across all layers in `format`.
pub fn kv_bytes_per_token(text: &ModelConfig, format: KvFormat) -> u64 {
    let vectors = 2 * (text.num_hidden_layers * text.num_key_value_heads) as u64;
    vectors * format.vector_bytes(text.head_dim as u64)
}

/// Bytes of one frame token's K and V across all layers, each layer in its own format.
pub fn frame_kv_bytes_per_token(text: &ModelConfig, kv: &KvPrecision) -> u64 {
    if kv.frame_layers().is_empty() {
        return kv_bytes_per_token(text, kv.frames());
    }
    let per_layer = 2 * text.num_key_value_heads as u64;
    (0..text.num_hidden_layers)
        .map(|l| per_layer * kv.frame_format(l).vector_bytes(text.head_dim as u64))
        .sum()
}

/// KV cache of `workload` under `kv` (pure arithmetic, see [`crate::policy`]); an overflow
/// error names the flags at fault.
pub fn kv_usage(
    text: &ModelConfig,
    workload: &Workload,
    kv: &KvPrecision,
) -> Result<KvUsage, BoardError> {
    let text_tokens = workload.text_tokens()?;
    let frame_tokens = workload.frame_tokens()?;
    let context = workload.context_tokens()?;
    let fp16 = kv_bytes_per_token(text, KvFormat::FP16);
    // Frame tokens the budget may keep FP16 once text has taken its share: every one with
    // `salient=on`, else the sinks (the sequence's first tokens; charged as frame tokens).
    let fp16_frame_tokens = if kv.quantizes_frames() && kv.fp16_budget() > 0.0 {
        let cap = ((context as f64) * kv.fp16_budget() - 1e-9).ceil().max(0.0) as u64;
        let room = cap.saturating_sub(text_tokens);
        let room = if kv.salient() {
            room
        } else {
            room.min(kv.sinks())
        };
        room.min(frame_tokens)
    } else {
        0
    };
    let per_token = "KV bytes per token";
    let text_bytes = product(
        "the text KV bytes",
        &[
            (TEXT_TOKENS, text_tokens),
            (per_token, kv_bytes_per_token(text, kv.text())),
        ],
    )?;
    let frame_bytes = sum(
        "the frame KV bytes",
        &[
            (
                FRAME_TOKENS,
                product(
                    "the frame KV bytes",
                    &[(FRAME_TOKENS, fp16_frame_tokens), (per_token, fp16)],
                )?,
            ),
            (
                FRAME_TOKENS,
                product(
                    "the frame KV bytes",
                    &[
                        (FRAME_TOKENS, frame_tokens - fp16_frame_tokens),
                        (per_token, frame_kv_bytes_per_token(text, kv)),
                    ],
                )?,
            ),
        ],
    )?;
    Ok(KvUsage {
        text_tokens,
        frame_tokens,
        fp16_frame_tokens,
        text_bytes,
        frame_bytes,
        total_bytes: sum(
            "the KV cache bytes",
            &[(TEXT_TOKENS, text_bytes), (FRAME_TOKENS, frame_bytes)],
        )?,
        fp16_equivalent_bytes: product(
            "the FP16 KV cache bytes",
            &[
                (
                    "the context length (frame tokens + text tokens, from --frames, --tokens-per-frame, --prompt-tokens, --answer-tokens)",
                    context,
                ),
                (per_token, fp16),
            ],
        )?,
    })
}

/// Bytes of the encoder outputs the runtime keeps for the workload's frames: per frame token
/// its f32 embedding and, with DeepStack (`deepstack_layers`), one f32 feature vector per
/// DeepStack layer (`jetvlm_vision::Embeddings::data` and `deepstack`, held for every frame
/// of a prompt and of a session's window). An overflow error names the flags at fault.
pub fn frame_feature_bytes(text: &ModelConfig, workload: &Workload) -> Result<u64, BoardError> {
    product(
        "the frame feature bytes",
        &[
            (FRAME_TOKENS, workload.frame_tokens()?),
            ("hidden_size", text.hidden_size as u64),
            ("deepstack_layers", 1 + text.deepstack_layers as u64),
            ("f32 bytes", 4),
        ],
    )
}

/// The activation / workspace estimate, by part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Activations {
    pub decoder_bytes: u64,
    pub attention_bytes: u64,
    pub logits_bytes: u64,
    pub vision_bytes: u64,
}

impl Activations {
    /// The sum of the parts, or an overflow error.
    pub fn total(&self) -> Result<u64, BoardError> {
        sum(
            "the activation bytes",
            &[
                (
                    "the decoder activations (--prefill-chunk)",
                    self.decoder_bytes,
                ),
                (
                    "the attention scratch (--prefill-chunk)",
                    self.attention_bytes,
                ),
                ("the logits (vocab_size)", self.logits_bytes),
                (
                    "the vision activations (--tokens-per-frame)",
                    self.vision_bytes,
                ),
            ],
        )
    }
}

/// Estimates activations and workspace (formulas in the module docs); an overflow error
/// names the input at fault.
pub fn activations(
    model: &ModelSpec,
    workload: &Workload,
    opts: &PlanOptions,
) -> Result<Activations, BoardError> {
    let t = &model.text;
    let h = t.hidden_size as u64;
    let heads = t.num_attention_heads as u64;
    let head_dim = t.head_dim as u64;
    let kv_heads = t.num_key_value_heads as u64;
    let i = t.intermediate_size as u64;
    let chunk = opts.prefill_chunk.min(workload.context_tokens()?).max(1);
    let q_dim = product(
        "the query width",
        &[("num_attention_heads", heads), ("head_dim", head_dim)],
    )?;
    let kv_dim = product(
        "the KV width",
        &[("num_key_value_heads", kv_heads), ("head_dim", head_dim)],
    )?;
    let width = sum(
        "the decoder activation width",
        &[
            (
                "hidden_size",
                product(
                    "the decoder activation width",
                    &[("hidden_size", h), ("", 4)],
                )?,
            ),
            ("the query width", q_dim),
            (
                "the KV width",
                product(
                    "the decoder activation width",
                    &[("the KV width", kv_dim), ("", 2)],
                )?,
            ),
            (
                "intermediate_size",
                product(
                    "the decoder activation width",
                    &[("intermediate_size", i), ("", 3)],
                )?,
            ),
        ],
    )?;
    let decoder_bytes = product(
        "the decoder activation bytes",
        &[
            ("--prefill-chunk", chunk),
            ("the decoder activation width", width),
            ("", 4),
        ],
    )?;
    let attention_bytes = product(
        "the attention scratch bytes",
        &[
            ("--prefill-chunk", chunk),
            ("num_attention_heads", heads),
            (
                "head_dim",
                head_dim.saturating_add(2 + ATTENTION_BLOCK_TOKENS),
            ),
            ("", 4),
        ],
    )?;
    let logits_bytes = product(
        "the logits bytes",
        &[("vocab_size", t.vocab_size as u64), ("", 8)],
    )?;
    let vision_bytes = match &model.vision {
        Some(v) if workload.frames > 0 => vision_activation_bytes(v, workload.tokens_per_frame, h)?,
        _ => 0,
    };
    Ok(Activations {
        decoder_bytes,
        attention_bytes,
        logits_bytes,
        vision_bytes,
    })
}

fn vision_activation_bytes(
    v: &VisionEncoder,
    tokens_per_frame: u64,
    text_hidden: u64,
) -> Result<u64, BoardError> {
    let q = "the vision activation bytes";
    let tpf = "--tokens-per-frame";
    let output = product(
        q,
        &[
            (tpf, tokens_per_frame),
            ("hidden_size", text_hidden),
            ("", 4),
        ],
    )?;
    match &v.shape {
        Some(s) => {
            let seq = product(
                q,
                &[
                    (tpf, tokens_per_frame),
                    ("vision patches per token", s.patches_per_token),
                ],
            )?;
            let width = sum(
                q,
                &[
                    (
                        "vision_config.hidden_size",
                        product(q, &[("vision_config.hidden_size", s.hidden), ("", 6)])?,
                    ),
                    ("vision_config.intermediate_size", s.intermediate),
                ],
            )?;
            let hidden = product(q, &[(tpf, seq), ("vision width", width), ("", 4)])?;
            let scores = product(
                q,
                &[("vision heads", s.heads), (tpf, seq), (tpf, seq), ("", 4)],
            )?;
            let input = product(
                q,
                &[
                    (tpf, seq),
                    ("vision channels", s.channels),
                    ("vision temporal patch", s.temporal_patch),
                    ("vision patch size", s.patch_size),
                    ("vision patch size", s.patch_size),
                    ("", 4),
                ],
            )?;
            sum(
                q,
                &[(tpf, hidden), (tpf, scores), (tpf, input), (tpf, output)],
            )
        }
        // Shapes unknown (an .onnx encoder): at least its output, twice (output + copy into
        // the decoder's input).
        None => product(q, &[(tpf, output), ("", 2)]),
    }
}

/// Bytes by component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryBreakdown {
    pub weights_bytes: u64,
    pub vision_encoder_bytes: u64,
    pub kv_text_bytes: u64,
    pub kv_frame_bytes: u64,
    /// The frames' encoder outputs the runtime keeps (see [`frame_feature_bytes`]).
    pub frame_features_bytes: u64,
    pub activation_bytes: u64,
    pub camera_bytes: u64,
    pub runtime_bytes: u64,
}

impl MemoryBreakdown {
    /// Text plus frame KV bytes, or an overflow error.
    pub fn kv_bytes(&self) -> Result<u64, BoardError> {
        sum(
            "the KV cache bytes",
            &[
                (TEXT_TOKENS, self.kv_text_bytes),
                (FRAME_TOKENS, self.kv_frame_bytes),
            ],
        )
    }
    /// Every component added, or an overflow error naming the largest component's input.
    pub fn total(&self) -> Result<u64, BoardError> {
        sum(
            "the total memory",
            &[
                ("the weights", self.weights_bytes),
                (
                    "the vision encoder (--vision-bytes or --vision-params)",
                    self.vision_encoder_bytes,
                ),
                (TEXT_TOKENS, self.kv_text_bytes),
                (FRAME_TOKENS, self.kv_frame_bytes),
                (FRAME_TOKENS, self.frame_features_bytes),
                ("the activations (--prefill-chunk)", self.activation_bytes),
                (
                    "the camera buffers (--camera, --camera-buffers)",
                    self.camera_bytes,
                ),
                ("the runtime", self.runtime_bytes),
            ],
        )
    }
}

fn check(workload: &Workload, opts: &PlanOptions) -> Result<(), BoardError> {
    if workload.tokens_per_frame == 0 {
        return Err(BoardError::InvalidWorkload(
            "tokens per frame must be greater than zero".into(),
        ));
    }
    if opts.prefill_chunk == 0 {
        return Err(BoardError::InvalidWorkload(
            "prefill chunk must be greater than zero".into(),
        ));
    }
    Ok(())
}

/// The memory the workload needs on `board`; an overflow anywhere is an error naming the
/// input at fault, so a breakdown returned always has a total.
pub fn memory(
    board: &BoardProfile,
    model: &ModelSpec,
    workload: &Workload,
    kv: &KvPrecision,
    opts: &PlanOptions,
) -> Result<MemoryBreakdown, BoardError> {
    check(workload, opts)?;
    let usage = kv_usage(&model.text, workload, kv)?;
    let mem = MemoryBreakdown {
        weights_bytes: weight_bytes(&model.text, &opts.weights)?.total,
        vision_encoder_bytes: model.vision.as_ref().map_or(0, |v| v.bytes),
        kv_text_bytes: usage.text_bytes,
        kv_frame_bytes: usage.frame_bytes,
        frame_features_bytes: frame_feature_bytes(&model.text, workload)?,
        activation_bytes: activations(model, workload, opts)?.total()?,
        camera_bytes: if workload.frames > 0 {
            opts.camera.bytes()?
        } else {
            0
        },
        runtime_bytes: board.runtime_overhead_bytes(),
    };
    mem.total()?;
    Ok(mem)
}

/// The memory budget: the override, else the board's usable memory.
pub fn budget_bytes(board: &BoardProfile, opts: &PlanOptions) -> u64 {
    opts.budget_bytes.unwrap_or_else(|| board.usable_bytes())
}

/// The largest number of frames whose plan fits the budget (0 when even none fit).
pub fn max_frames(
    board: &BoardProfile,
    model: &ModelSpec,
    workload: &Workload,
    kv: &KvPrecision,
    opts: &PlanOptions,
) -> Result<u64, BoardError> {
    let budget = budget_bytes(board, opts);
    // A frame count whose bytes overflow 64 bits needs more than any budget.
    let fits = |n: u64| -> Result<bool, BoardError> {
        match memory(board, model, &workload.with_frames(n), kv, opts) {
            Ok(m) => Ok(m.total()? <= budget),
            Err(BoardError::Overflow { .. }) if n > 0 => Ok(false),
            Err(e) => Err(e),
        }
    };
    if !fits(0)? {
        return Ok(0);
    }
    // Grow until it does not fit, then bisect: the total never shrinks as frames grow.
    let (mut lo, mut hi) = (0u64, 1u64);
    while fits(hi)? {
        lo = hi;
        hi *= 2;
        if hi > 1 << 40 {
            return Ok(lo);
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Parameters a decode step reads: all but the embedding table, plus the LM head (the tied
/// embedding when tied).
pub fn params_read_per_token(text: &ModelConfig) -> u64 {
    let emb = text.vocab_size as u64 * text.hidden_size as u64;
    text.num_parameters() - emb + if text.tie_word_embeddings { emb } else { 0 }
}

/// The roofline lower bound on time per output token, in milliseconds, at the workload's
/// full context.
pub fn tpot_floor_ms(
    board: &BoardProfile,
    model: &ModelSpec,
    workload: &Workload,
    kv: &KvPrecision,
    opts: &PlanOptions,
) -> Result<f64, BoardError> {
    let weights = weight_bytes(&model.text, &opts.weights)?.read_per_token;
    let kv_bytes = kv_usage(&model.text, workload, kv)?.total_bytes;
    Ok((weights as f64 + kv_bytes as f64) / board.bandwidth_bytes_per_s() * 1e3)
}

/// Maximum frames under one policy, for the comparison table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyFrames {
    pub policy: String,
    pub frame_bits_per_element: f64,
    pub max_frames: u64,
    pub kv_bytes: u64,
    pub tpot_floor_ms: f64,
}

/// A complete plan: what it takes, whether it fits, how far it could go, how fast it can be.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub board: String,
    pub board_display: String,
    pub model: String,
    pub config_path: String,
    pub kv_policy: String,
    pub kv_policy_description: String,
    pub weights_format: String,
    pub workload: Workload,
    pub context_tokens: u64,
    pub memory: MemoryBreakdown,
    pub activations: Activations,
    pub kv: KvUsage,
    pub vision_params: Option<u64>,
    pub vision_source: Option<VisionSource>,
    /// DeepStack feature sets a frame token carries besides its embedding (Qwen3-VL).
    pub deepstack_layers: usize,
    pub total_bytes: u64,
    pub budget_bytes: u64,
    pub budget_source: String,
    pub fits: bool,
    /// Budget minus total (negative when it does not fit).
    pub headroom_bytes: i64,
    pub kv_bytes: u64,
    pub max_frames_fp16: u64,
    /// Max frames under the requested policy when it quantizes frames, else under `mixed`.
    pub max_frames_mixed: u64,
    pub mixed_policy: String,
    pub max_frames_by_policy: Vec<PolicyFrames>,
    /// Frames that fit inside the model's `max_position_embeddings`.
    pub max_frames_context: u64,
    pub max_position_embeddings: u64,
    pub bandwidth_gb_s: f64,
    pub weight_bytes_read_per_token: u64,
    pub kv_bytes_read_per_token: u64,
    pub tpot_floor_ms: f64,
    pub tpot_floor_fp16_ms: f64,
    /// When it does not fit: by how much, and what to change.
    pub advice: Option<String>,
    /// Estimates and caveats worth reading.
    pub notes: Vec<String>,
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / MIB as f64)
}

/// Plans `workload` on `board`.
pub fn plan(
    board: &BoardProfile,
    model: &ModelSpec,
    workload: &Workload,
    kv: &KvPrecision,
    opts: &PlanOptions,
) -> Result<Plan, BoardError> {
    let mem = memory(board, model, workload, kv, opts)?;
    let acts = activations(model, workload, opts)?;
    let usage = kv_usage(&model.text, workload, kv)?;
    let budget = budget_bytes(board, opts);
    let total = mem.total()?;
    let context_tokens = workload.context_tokens()?;
    let fits = total <= budget;
    let mixed = if kv.quantizes_frames() {
        kv.clone()
    } else {
        KvPrecision::mixed()
    };
    let max_frames_fp16 = max_frames(board, model, workload, &KvPrecision::fp16(), opts)?;
    let max_frames_mixed = max_frames(board, model, workload, &mixed, opts)?;

    let mut by_policy = Vec::new();
    let mut policies = vec![
        KvPrecision::fp16(),
        KvPrecision::frames_at(8),
        KvPrecision::mixed(),
        KvPrecision::frames_at(2),
    ];
    // The requested policy takes the place of the preset it charges like (under its own
    // name: the policy in effect), else gets a row of its own.
    let head_dim = model.text.head_dim as u64;
    match policies.iter_mut().find(|p| p.charges_like(kv, head_dim)) {
        Some(p) => *p = kv.clone(),
        None => policies.push(kv.clone()),
    }
    for p in &policies {
        by_policy.push(PolicyFrames {
            policy: p.name(),
            frame_bits_per_element: p
                .frame_bits_per_element(model.text.head_dim as u64, model.text.num_hidden_layers),
            max_frames: max_frames(board, model, workload, p, opts)?,
            kv_bytes: kv_usage(&model.text, workload, p)?.total_bytes,
            tpot_floor_ms: tpot_floor_ms(board, model, workload, p, opts)?,
        });
    }

    let max_pos = model.text.max_position_embeddings as u64;
    let max_frames_context = max_pos.saturating_sub(usage.text_tokens) / workload.tokens_per_frame;
    let weight_read = weight_bytes(&model.text, &opts.weights)?.read_per_token;

    let mut notes = Vec::new();
    if let Some(v) = &model.vision {
        match &v.source {
            VisionSource::Estimated { family } => notes.push(format!(
                "vision encoder size is an estimate from vision_config ({family} formula, {:.1}M params); \
                 pass --vision-params or --vision-bytes for the exact figure",
                v.params.unwrap_or(0) as f64 / 1e6
            )),
            VisionSource::OnnxFile { path } => notes.push(format!("vision encoder size is the size of {}", path.display())),
            VisionSource::UserParams | VisionSource::UserBytes => {}
        }
    } else if workload.frames > 0 {
        notes.push("the model has no vision_config: the vision encoder is not counted (pass --vision-params or --vision-bytes)".into());
    }
    notes.push(format!(
        "activations/workspace are an estimate (prefill chunk {} tokens); runtime is a per-family constant ({})",
        opts.prefill_chunk,
        mib(board.runtime_overhead_bytes())
    ));
    if context_tokens > max_pos {
        notes.push(format!(
            "context of {context_tokens} tokens exceeds the model's max_position_embeddings {max_pos}: at most {max_frames_context} frames fit its positions"
        ));
    }

    let budget_source = opts.budget_source.clone().unwrap_or_else(|| {
        format!(
            "{}: {} MiB DRAM - {} MiB reserved for OS/desktop",
            board.name, board.memory.dram_mib, board.memory.os_reserved_mib
        )
    });
    let mut p = Plan {
        board: board.name.clone(),
        board_display: board.display_name.clone(),
        model: model.name.clone(),
        config_path: model.config_path.display().to_string(),
        kv_policy: kv.name(),
        kv_policy_description: kv.describe(model.text.head_dim as u64),
        weights_format: opts.weights.describe(model.text.dtype),
        workload: *workload,
        context_tokens,
        memory: mem,
        activations: acts,
        kv: usage,
        vision_params: model.vision.as_ref().and_then(|v| v.params),
        vision_source: model.vision.as_ref().map(|v| v.source.clone()),
        deepstack_layers: model.text.deepstack_layers,
        total_bytes: total,
        budget_bytes: budget,
        budget_source,
        fits,
        headroom_bytes: (budget as i128 - total as i128).clamp(i64::MIN as i128, i64::MAX as i128)
            as i64,
        kv_bytes: usage.total_bytes,
        max_frames_fp16,
        max_frames_mixed,
        mixed_policy: mixed.name(),
        max_frames_by_policy: by_policy,
        max_frames_context,
        max_position_embeddings: max_pos,
        bandwidth_gb_s: board.memory.bandwidth_gb_s,
        weight_bytes_read_per_token: weight_read,
        kv_bytes_read_per_token: usage.total_bytes,
        tpot_floor_ms: tpot_floor_ms(board, model, workload, kv, opts)?,
        tpot_floor_fp16_ms: tpot_floor_ms(board, model, workload, &KvPrecision::fp16(), opts)?,
        advice: None,
        notes,
    };
    if !fits {
        p.advice = Some(advice(board, model, workload, kv, opts, &p)?);
    }
    Ok(p)
}

fn advice(
    board: &BoardProfile,
    model: &ModelSpec,
    workload: &Workload,
    kv: &KvPrecision,
    opts: &PlanOptions,
    p: &Plan,
) -> Result<String, BoardError> {
    let over = p.total_bytes - p.budget_bytes;
    let mut msg = format!(
        "the plan needs {} but {} has {} usable: {} ({:.1} MB) over budget.",
        mib(p.total_bytes),
        board.name,
        mib(p.budget_bytes),
        mib(over),
        over as f64 / 1e6
    );
    let mut fixes = Vec::new();
    let fixed = memory(board, model, &workload.with_frames(0), kv, opts)?;
    let model_alone_fits = fixed.total()? <= p.budget_bytes;
    if !model_alone_fits {
        msg.push_str(&format!(
            " The model alone (weights {}, vision encoder {}, runtime {}) exceeds the budget with no frames.",
            mib(fixed.weights_bytes),
            mib(fixed.vision_encoder_bytes),
            mib(fixed.runtime_bytes)
        ));
    }
    if workload.frames > 0 && model_alone_fits {
        let now = max_frames(board, model, workload, kv, opts)?;
        if now > 0 {
            fixes.push(format!("use at most {now} frames (--frames {now})"));
        }
        let lower: Vec<u8> = [8u8, 4, 2]
            .into_iter()
            .filter(|b| *b < kv.frames().bits)
            .collect();
        let mut found = false;
        for bits in &lower {
            let q = kv.frames_lowered_to(*bits);
            let m = max_frames(board, model, workload, &q, opts)?;
            if m >= workload.frames {
                fixes.push(format!(
                    "store frames at fewer bits: --kv {} fits {} frames (up to {m})",
                    q.name(),
                    workload.frames
                ));
                found = true;
                break;
            }
        }
        if !found && let Some(bits) = lower.last() {
            let q = KvPrecision::frames_at(*bits);
            let m = max_frames(board, model, workload, &q, opts)?;
            fixes.push(format!(
                "lower frame bits help only so far: --kv {} fits {m} frames",
                q.name()
            ));
        }
    }
    if opts.weights.bits_per_weight(model.text.dtype) > 4.5 {
        let o4 = PlanOptions {
            weights: WeightFormat::Bits(4),
            ..opts.clone()
        };
        let total4 = memory(board, model, workload, kv, &o4)?.total()?;
        if total4 <= p.budget_bytes {
            fixes.push(format!(
                "4-bit weights (--weight-bits 4) fit this workload ({} total)",
                mib(total4)
            ));
        } else {
            let m = max_frames(board, model, workload, kv, &o4)?;
            if m > 0 {
                fixes.push(format!("4-bit weights (--weight-bits 4) fit {m} frames"));
            }
        }
    }
    fixes.push(
        "use a smaller model (fewer parameters or KV heads) or a board with more memory".into(),
    );
    msg.push_str(" To fit: ");
    msg.push_str(&fixes.join("; or "));
    msg.push('.');
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetvlm_quant::{Layers, MatrixOverride, MatrixRole};

    fn fmt(bits: u32, group: usize) -> jetvlm_quant::WeightFormat {
        jetvlm_quant::WeightFormat::new(bits, group).unwrap()
    }

    /// Each layer matrix is charged at its own format: an override for every layer, one for
    /// a single layer (which wins over `*`), the base format for the rest.
    #[test]
    fn overridden_matrices_are_charged_at_their_own_format() {
        let raw = serde_json::json!({
            "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "num_hidden_layers": 3, "vocab_size": 1000, "tie_word_embeddings": false,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "torch_dtype": "float16",
        });
        let text = ModelConfig::from_value(&raw, std::path::Path::new("config.json")).unwrap();
        let with = |overrides: Vec<MatrixOverride>| WeightFormat::Quantized {
            bits: 4,
            group: 32,
            head_int8: false,
            embed_bits: None,
            overrides,
        };
        let o = |layers, role, format| MatrixOverride {
            layers,
            role,
            format,
        };
        let base = weight_bytes(&text, &with(vec![])).unwrap();
        let mixed = weight_bytes(
            &text,
            &with(vec![
                o(Layers::All, MatrixRole::Down, fmt(8, 32)),
                o(Layers::One(1), MatrixRole::Down, fmt(8, 128)),
                o(Layers::One(2), MatrixRole::V, fmt(8, 64)),
            ]),
        )
        .unwrap();
        let (i4, h, kv) = (fmt(4, 32), 256, 2 * 64);
        let more = 2 * (fmt(8, 32).matrix_bytes(h, 512) - i4.matrix_bytes(h, 512))
            + (fmt(8, 128).matrix_bytes(h, 512) - i4.matrix_bytes(h, 512))
            + (fmt(8, 64).matrix_bytes(kv, h) - i4.matrix_bytes(kv, h));
        assert_eq!(mixed.total - base.total, more as u64);
        assert_eq!(mixed.read_per_token - base.read_per_token, more as u64);
        assert!(
            with(vec![o(Layers::All, MatrixRole::V, fmt(8, 32))])
                .describe(DType::F16)
                .contains("layers.*.self_attn.v_proj int8 g32")
        );

        // A layer the decoder lacks; a group that does not divide the matrix, named.
        let e = weight_bytes(
            &text,
            &with(vec![o(Layers::One(3), MatrixRole::Up, fmt(8, 32))]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("overrides.layers.3.mlp.up_proj") && e.contains("3 layers"),
            "{e}"
        );
        let narrow = ModelConfig::from_value(
            &serde_json::json!({
                "model_type": "llama", "hidden_size": 256, "intermediate_size": 480,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                "num_hidden_layers": 3, "vocab_size": 1000, "rms_norm_eps": 1e-5,
                "max_position_embeddings": 256, "torch_dtype": "float16",
            }),
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let e = weight_bytes(
            &narrow,
            &with(vec![o(Layers::All, MatrixRole::Down, fmt(8, 64))]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("overrides.layers.*.mlp.down_proj.group_size 64") && e.contains("480"),
            "{e}"
        );
    }
}
