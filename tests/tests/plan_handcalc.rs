//! `jetvlm plan` numbers for SmolVLM-256M and Qwen2-VL-2B on orin-nano-8gb, checked against a
//! hand calculation written out here from the published shapes (not from the planner's
//! helpers), and the headline property: text FP16 + frames INT4 fits about as many more frames
//! than all-FP16 as a frame token's KV and kept embedding shrink (2.5x and more with BF16
//! weights) when frames dominate the context.

use jetvlm_board::plan::{self, PlanOptions, WeightFormat, Workload};
use jetvlm_board::{BoardRegistry, KvPrecision, ModelSpec};
use std::path::PathBuf;

const MIB: u64 = 1 << 20;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// Shapes of a Llama/Qwen2 decoder, written by hand.
struct Lm {
    hidden: u64,
    layers: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    inter: u64,
    vocab: u64,
    qkv_bias: bool,
    tied: bool,
}

impl Lm {
    fn params(&self) -> u64 {
        let (h, q, kv) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        );
        let attn = h * q + 2 * h * kv + q * h + if self.qkv_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * h * self.inter;
        let layer = attn + mlp + 2 * h;
        // Embedding table, layers, final norm, and an LM head unless tied to the embedding.
        let head = if self.tied { 0 } else { self.vocab * h };
        self.vocab * h + self.layers * layer + h + head
    }
    /// A decode step gathers one embedding row, so it reads everything but the embedding
    /// table, plus the LM head (which is that table when tied).
    fn params_read_per_token(&self) -> u64 {
        if self.tied {
            self.params()
        } else {
            self.params() - self.vocab * self.hidden
        }
    }
    /// K and V, FP16, all layers, one token.
    fn kv_fp16_per_token(&self) -> u64 {
        2 * self.layers * self.kv_heads * self.head_dim * 2
    }
    /// K and V at INT4 with an FP16 scale + zero per 64 elements (4.5 bits/element).
    fn kv_int4_g64_per_token(&self) -> u64 {
        2 * self.layers * self.kv_heads * (self.head_dim * 4 / 8 + (self.head_dim / 64) * 4)
    }
    fn activations(&self, context: u64) -> u64 {
        let chunk = 512u64.min(context);
        let (h, q, kv) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        );
        let decoder = chunk * (4 * h + q + 2 * kv + 3 * self.inter) * 4;
        let attention = chunk * self.heads * (self.head_dim + 2 + 256) * 4;
        let logits = 2 * self.vocab * 4;
        decoder + attention + logits
    }
}

const SMOL_LM: Lm = Lm {
    hidden: 576,
    layers: 30,
    heads: 9,
    kv_heads: 3,
    head_dim: 64,
    inter: 1536,
    vocab: 49280,
    qkv_bias: false,
    tied: false,
};
const QWEN_LM: Lm = Lm {
    hidden: 1536,
    layers: 28,
    heads: 12,
    kv_heads: 2,
    head_dim: 128,
    inter: 8960,
    vocab: 151936,
    qkv_bias: true,
    tied: true,
};

const CAMERA: u64 = 4 * 1280 * 720 * 3;
const RUNTIME_ORIN: u64 = 400 * MIB;
const BUDGET_ORIN_NANO_8GB: u64 = (8192 - 3232) * MIB;
const BW_ORIN_NANO_8GB: f64 = 68e9;

fn smol_vision_params() -> u64 {
    // SigLIP base patch16/512: 12 layers, hidden 768, MLP 3072; 32x32 patches; connector
    // Linear(768 * 4^2 -> 576).
    let (h, i) = (768u64, 3072u64);
    12 * (4 * h * h + 2 * h * i) + 3 * 16 * 16 * h + 32 * 32 * h + h * 16 * 576
}

fn smol_vision_activations() -> u64 {
    // 64 tokens x 16 patches each = 1024 patches of 16x16x3.
    let seq = 1024u64;
    seq * (6 * 768 + 3072) * 4 + 12 * seq * seq * 4 + seq * 3 * 16 * 16 * 4 + 64 * 576 * 4
}

fn qwen_vision_params() -> u64 {
    // 32 blocks, embed 1280, MLP 5120; Conv3d patch 3x2x14x14; merger (1280*4)^2 + 5120*1536.
    let (e, m) = (1280u64, 5120u64);
    32 * (4 * e * e + 2 * e * m) + 3 * 2 * 14 * 14 * e + 5120 * 5120 + 5120 * 1536
}

fn qwen_vision_activations() -> u64 {
    // 256 tokens x 4 merged patches = 1024 patches of 14x14x3, temporal patch 2.
    let seq = 1024u64;
    seq * (6 * 1280 + 5120) * 4 + 16 * seq * seq * 4 + seq * 3 * 2 * 14 * 14 * 4 + 256 * 1536 * 4
}

/// The plan with default options (what `jetvlm plan` does without flags).
fn plan_default(
    board: &jetvlm_board::BoardProfile,
    model: &ModelSpec,
    w: &Workload,
    kv: KvPrecision,
) -> plan::Plan {
    plan::plan(board, model, w, &kv, &PlanOptions::default()).unwrap()
}

fn workload(tpf: u64, frames: u64) -> Workload {
    Workload {
        frames,
        tokens_per_frame: tpf,
        prompt_tokens: 64,
        answer_tokens: 128,
    }
}

/// Largest frame count whose hand-computed total fits, by walking N upwards.
fn hand_max_frames(
    fixed: u64,
    text_tokens: u64,
    tpf: u64,
    per_frame_token: impl Fn(u64, u64) -> u64,
) -> u64 {
    let mut n = 0u64;
    loop {
        let next = n + 1;
        let kv_frames = per_frame_token(next * tpf, text_tokens + next * tpf);
        if fixed + kv_frames > BUDGET_ORIN_NANO_8GB {
            return n;
        }
        n = next;
    }
}

/// Frame-token KV bytes under `mixed` (INT4 g64, 10% FP16 budget filled by text first,
/// then by the 4 sink tokens, or with `salient=on` by as many frame tokens as it holds).
fn mixed_frame_bytes(lm: &Lm, frame_tokens: u64, context: u64, salient: bool) -> u64 {
    let room = context.div_ceil(10).saturating_sub(192);
    let fp16 = if salient { room } else { room.min(4) }.min(frame_tokens);
    fp16 * lm.kv_fp16_per_token() + (frame_tokens - fp16) * lm.kv_int4_g64_per_token()
}

#[test]
fn smolvlm_256m_on_orin_nano_8gb_matches_hand_calculation() {
    let board = BoardRegistry::bundled().get("orin-nano-8gb").unwrap();
    let model = ModelSpec::load(&fixture("configs/smolvlm-256m")).unwrap();
    assert_eq!(
        model.tokens_per_frame,
        Some(64),
        "512 px tile, 16x16 patches, pixel shuffle 4"
    );
    let w = workload(64, 16);
    let p = plan_default(&board, &model, &w, KvPrecision::mixed());

    // bf16 weights: SmolLM2-135M's 134,588,736 parameters with the 49,280-token vocabulary,
    // plus SmolVLM's untied LM head (another 49,280 x 576).
    assert_eq!(SMOL_LM.params(), 134_588_736 + 49_280 * 576);
    assert_eq!(p.memory.weights_bytes, SMOL_LM.params() * 2);
    assert_eq!(smol_vision_params(), 93_388_800);
    assert_eq!(p.vision_params, Some(smol_vision_params()));
    assert_eq!(p.memory.vision_encoder_bytes, smol_vision_params() * 2);
    // KV: 23,040 B/token FP16, 6,480 B/token INT4 g64; 192 text tokens, 1024 frame tokens;
    // 10% of 1216 = 122 < 192 text tokens, so no frame token stays FP16.
    assert_eq!(SMOL_LM.kv_fp16_per_token(), 23_040);
    assert_eq!(SMOL_LM.kv_int4_g64_per_token(), 6_480);
    assert_eq!(p.memory.kv_text_bytes, 192 * 23_040);
    assert_eq!(p.memory.kv_frame_bytes, 1024 * 6_480);
    assert_eq!(p.kv_bytes, 192 * 23_040 + 1024 * 6_480);
    let acts = SMOL_LM.activations(1216) + smol_vision_activations();
    assert_eq!(p.memory.activation_bytes, acts);
    // The runtime keeps each frame's f32 embeddings: 1024 tokens x 576 x 4 bytes.
    assert_eq!(p.memory.frame_features_bytes, 1024 * 576 * 4);
    assert_eq!(p.memory.camera_bytes, CAMERA);
    assert_eq!(p.memory.runtime_bytes, RUNTIME_ORIN);
    let total = SMOL_LM.params() * 2
        + smol_vision_params() * 2
        + 192 * 23_040
        + 1024 * 6_480
        + 1024 * 576 * 4
        + acts
        + CAMERA
        + RUNTIME_ORIN;
    assert_eq!(p.total_bytes, total);
    assert_eq!(p.budget_bytes, BUDGET_ORIN_NANO_8GB);
    assert!(p.fits);

    // Roofline: every weight but the embedding table, plus the KV cache, once per token.
    assert_eq!(p.weight_bytes_read_per_token, 134_588_736 * 2);
    let tpot = (SMOL_LM.params_read_per_token() * 2 + p.kv_bytes) as f64 / BW_ORIN_NANO_8GB * 1e3;
    assert!(
        (p.tpot_floor_ms - tpot).abs() < 1e-9,
        "{} vs {tpot}",
        p.tpot_floor_ms
    );

    // Max frames, by walking N with the hand formulas.
    let fixed = total - p.kv_bytes - p.memory.frame_features_bytes + 192 * 23_040;
    let fp16 = hand_max_frames(fixed, 192, 64, |ft, _| {
        ft * (SMOL_LM.kv_fp16_per_token() + 576 * 4)
    });
    let mixed = hand_max_frames(fixed, 192, 64, |ft, ctx| {
        mixed_frame_bytes(&SMOL_LM, ft, ctx, false) + ft * 576 * 4
    });
    assert_eq!(p.max_frames_fp16, fp16);
    assert_eq!(p.max_frames_mixed, mixed);
    assert!(
        mixed as f64 >= 2.5 * fp16 as f64,
        "mixed {mixed} vs fp16 {fp16}"
    );
}

#[test]
fn qwen2_vl_2b_on_orin_nano_8gb_matches_hand_calculation() {
    let board = BoardRegistry::bundled().get("orin-nano-8gb").unwrap();
    let model = ModelSpec::load(&fixture("configs/qwen2-vl-2b/config.json")).unwrap();
    assert_eq!(
        model.tokens_per_frame,
        Some(256),
        "448x448 frame, 14 px patches, 2x2 merge"
    );
    let w = workload(256, 16);
    let p = plan_default(&board, &model, &w, KvPrecision::mixed());

    assert_eq!(QWEN_LM.params(), 1_543_714_304);
    assert_eq!(p.memory.weights_bytes, QWEN_LM.params() * 2);
    assert_eq!(qwen_vision_params(), 664_729_600);
    assert_eq!(p.memory.vision_encoder_bytes, qwen_vision_params() * 2);
    // KV: 28,672 B/token FP16, 8,064 B/token INT4 g64 (head_dim 128: 64 B codes + 8 B scales).
    assert_eq!(QWEN_LM.kv_fp16_per_token(), 28_672);
    assert_eq!(QWEN_LM.kv_int4_g64_per_token(), 8_064);
    // Context 4288: the 10% FP16 budget is 429 tokens, 192 of them text; the 4 sinks are
    // charged FP16 (as if frame tokens) and 4092 frame tokens are INT4.
    assert_eq!(p.kv.fp16_frame_tokens, 4);
    assert_eq!(p.memory.kv_text_bytes, 192 * 28_672);
    assert_eq!(p.memory.kv_frame_bytes, 4 * 28_672 + 4092 * 8_064);
    // With salient frame tokens the budget's other 237 - 4 frame tokens are FP16 too.
    let salient: KvPrecision = "mixed:salient=on".parse().unwrap();
    let ps = plan_default(&board, &model, &w, salient);
    assert_eq!(ps.kv.fp16_frame_tokens, 237);
    assert_eq!(ps.memory.kv_frame_bytes, 237 * 28_672 + 3859 * 8_064);
    assert_eq!(
        ps.memory.kv_frame_bytes,
        mixed_frame_bytes(&QWEN_LM, 4096, 4288, true)
    );
    let acts = QWEN_LM.activations(4288) + qwen_vision_activations();
    assert_eq!(p.memory.activation_bytes, acts);
    // Each frame's f32 embeddings: 4096 tokens x 1536 x 4 bytes.
    let features = 4096 * 1536 * 4;
    assert_eq!(p.memory.frame_features_bytes, features);
    let total = QWEN_LM.params() * 2
        + qwen_vision_params() * 2
        + p.kv_bytes
        + features
        + acts
        + CAMERA
        + RUNTIME_ORIN;
    assert_eq!(p.total_bytes, total);
    assert!(
        p.fits,
        "bf16 Qwen2-VL-2B with 16 frames fits 5.2 GB: {} bytes",
        p.total_bytes
    );

    assert_eq!(
        QWEN_LM.params_read_per_token(),
        QWEN_LM.params(),
        "tied: the LM head is the embedding"
    );
    let tpot = (QWEN_LM.params_read_per_token() * 2 + p.kv_bytes) as f64 / BW_ORIN_NANO_8GB * 1e3;
    assert!((p.tpot_floor_ms - tpot).abs() < 1e-9);

    let fixed = total - p.kv_bytes - features + 192 * 28_672;
    let fp16 = hand_max_frames(fixed, 192, 256, |ft, _| {
        ft * (QWEN_LM.kv_fp16_per_token() + 1536 * 4)
    });
    let mixed = hand_max_frames(fixed, 192, 256, |ft, ctx| {
        mixed_frame_bytes(&QWEN_LM, ft, ctx, false) + ft * 1536 * 4
    });
    assert_eq!(p.max_frames_fp16, fp16);
    assert_eq!(p.max_frames_mixed, mixed);
    assert!(fp16 > 0);
    assert!(
        mixed as f64 >= 2.5 * fp16 as f64,
        "mixed {mixed} vs fp16 {fp16}"
    );
}

#[test]
fn four_bit_weights_match_hand_calculation_and_leave_room_for_more_frames() {
    let board = BoardRegistry::bundled().get("orin-nano-8gb").unwrap();
    let model = ModelSpec::load(&fixture("configs/qwen2-vl-2b")).unwrap();
    let w = workload(256, 16);
    let bf16 = plan_default(&board, &model, &w, KvPrecision::mixed());
    let opts = PlanOptions {
        weights: WeightFormat::Bits(4),
        ..PlanOptions::default()
    };
    let q4 = plan::plan(&board, &model, &w, &KvPrecision::mixed(), &opts).unwrap();
    // `jetvlm quantize --bits 4` layout: layer matrices 4 bits + an FP16 scale and zero per
    // 64 weights (4.5 bits per weight); the tied embedding table (the LM head), norms and
    // q/k/v biases stay BF16.
    let (h, q, kv, i) = (1536u64, 12 * 128, 2 * 128, 8960);
    let matrices = 28 * (h * q + 2 * h * kv + q * h + 3 * h * i);
    let rest = QWEN_LM.params() - matrices;
    let hand = matrices * 9 / 16 + rest * 2;
    assert_eq!(q4.memory.weights_bytes, hand);
    assert!(q4.max_frames_mixed > bf16.max_frames_mixed);
    // Each frame token costs its KV and its f32 embedding (1536 x 4 bytes, the same under
    // every policy), so the gain approaches (28,672 + 6,144) / (8,064 + 6,144) = 2.45x.
    let bound = (28_672.0 + 6_144.0) / (8_064.0 + 6_144.0);
    let gain = q4.max_frames_mixed as f64 / q4.max_frames_fp16 as f64;
    assert!(gain >= 0.98 * bound, "{gain} vs {bound}");
    // A decode step reads all of it (the tied head is the embedding table).
    let tpot = (hand + q4.kv_bytes) as f64 / BW_ORIN_NANO_8GB * 1e3;
    assert!((q4.tpot_floor_ms - tpot).abs() < 1e-9);
}

#[test]
fn newer_config_keys_plan_the_same() {
    let board = BoardRegistry::bundled().get("orin-nano-8gb").unwrap();
    let old = ModelSpec::load(&fixture("configs/qwen2-vl-2b")).unwrap();
    let new = ModelSpec::load(&fixture("configs/qwen2-vl-2b-newer-keys")).unwrap();
    assert_eq!(new.text.rope_theta, 1_000_000.0);
    assert_eq!(new.text.dtype, old.text.dtype);
    let w = workload(256, 16);
    let a = plan_default(&board, &old, &w, KvPrecision::mixed());
    let b = plan_default(&board, &new, &w, KvPrecision::mixed());
    assert_eq!(a.memory, b.memory);
    assert_eq!(a.max_frames_mixed, b.max_frames_mixed);
}

#[test]
fn plan_that_does_not_fit_says_by_how_much_and_what_to_change() {
    let board = BoardRegistry::bundled().get("orin-nano-8gb").unwrap();
    let model = ModelSpec::load(&fixture("configs/qwen2-vl-2b")).unwrap();
    let w = workload(256, 60);
    let p = plan_default(&board, &model, &w, KvPrecision::fp16());
    assert!(!p.fits);
    assert!(p.headroom_bytes < 0);
    let advice = p.advice.clone().unwrap();
    let over_mib = format!(
        "{:.0} MiB",
        (p.total_bytes - p.budget_bytes) as f64 / MIB as f64
    );
    assert!(advice.contains(&over_mib), "{advice} lacks {over_mib}");
    assert!(
        advice.contains(&format!("--frames {}", p.max_frames_fp16)),
        "{advice}"
    );
    assert!(advice.contains("--kv"), "{advice}");
    assert!(advice.contains("--weight-bits 4"), "{advice}");
    assert!(advice.contains("smaller model"), "{advice}");
    // The suggested frame count does fit, one more does not.
    let fits = |n: u64| plan_default(&board, &model, &workload(256, n), KvPrecision::fp16()).fits;
    assert!(fits(p.max_frames_fp16));
    assert!(!fits(p.max_frames_fp16 + 1));
}

#[test]
fn fp16_budget_is_spent_on_text_first() {
    // A workload where the frames dominate: mixed stores far fewer bytes per frame than FP16.
    // Text and the 4 sinks are FP16, every other frame token INT4: the saving approaches
    // 16 / 4.5 = 3.56x. With salient frame tokens filling the 10% budget it approaches
    // 16 / (0.1 * 16 + 0.9 * 4.5) = 2.83x.
    let model = ModelSpec::load(&fixture("configs/smolvlm-256m")).unwrap();
    let w = workload(64, 1000);
    let fp16 = plan::kv_usage(&model.text, &w, &KvPrecision::fp16()).unwrap();
    let mixed = plan::kv_usage(&model.text, &w, &KvPrecision::mixed()).unwrap();
    assert_eq!(fp16.total_bytes, 64_192 * 23_040);
    assert_eq!(mixed.fp16_frame_tokens, 4);
    let ratio = fp16.total_bytes as f64 / mixed.total_bytes as f64;
    assert!((3.5..3.56).contains(&ratio), "{ratio}");
    let salient: KvPrecision = "mixed:salient=on".parse().unwrap();
    let salient = plan::kv_usage(&model.text, &w, &salient).unwrap();
    let ratio = fp16.total_bytes as f64 / salient.total_bytes as f64;
    assert!((2.75..2.84).contains(&ratio), "{ratio}");
    assert_eq!(salient.fp16_frame_tokens, 64_192u64.div_ceil(10) - 192);
}

#[test]
fn parameter_counts_agree_with_transformers() {
    // `tests/fixtures/configs/count_params.py` builds both fixtures with transformers on the
    // meta device: SmolVLM-256M has 162,974,016 text + 93,510,912 vision parameters (256.5M,
    // the model's name), Qwen2-VL-2B 1,543,714,304 text + 665,271,296 vision.
    for (dir, text, vision) in [
        ("smolvlm-256m", 162_974_016u64, 93_510_912u64),
        ("qwen2-vl-2b", 1_543_714_304, 665_271_296),
    ] {
        let m = ModelSpec::load(&fixture(&format!("configs/{dir}"))).unwrap();
        assert_eq!(m.text.num_parameters(), text, "{dir}");
        let est = m.vision.unwrap().params.unwrap();
        let err = (est as f64 - vision as f64).abs() / vision as f64;
        assert!(
            err < 0.005,
            "{dir}: vision estimate {est} vs {vision} ({:.3}%)",
            err * 100.0
        );
    }
}

#[test]
fn per_layer_frame_formats_are_charged_layer_by_layer() {
    // SmolVLM-256M: 30 layers, 3 KV heads, head dim 64. Half the layers INT8 g64 (64 code
    // bytes + one group's FP16 scale and zero = 68 per vector), half INT2 g64 (16 + 4 = 20):
    // 15 * 2 * 3 * 68 + 15 * 2 * 3 * 20 = 6120 + 1800 = 7920 bytes per frame token.
    let model = ModelSpec::load(&fixture("configs/smolvlm-256m")).unwrap();
    let layers = vec!["8c64"; 15]
        .into_iter()
        .chain(vec!["2t64"; 15])
        .collect::<Vec<_>>()
        .join("/");
    let kv: KvPrecision = format!("mixed:fblock=16,qblock=16,layers={layers}")
        .parse()
        .unwrap();
    assert_eq!(plan::frame_kv_bytes_per_token(&model.text, &kv), 7920);
    assert_eq!(
        plan::frame_kv_bytes_per_token(&model.text, &KvPrecision::mixed()),
        30 * 2 * 3 * (32 + 4)
    );
    // Average bits per element: (8.5 + 2.5) / 2.
    assert_eq!(kv.frame_bits_per_element(64, 30), 5.5);
    // The name keeps every layer's format and key mode, and parses back.
    assert!(
        kv.name().ends_with(&format!(",layers={layers}")),
        "{}",
        kv.name()
    );
    assert_eq!(kv.name().parse::<KvPrecision>().unwrap(), kv);
    assert!("mixed:layers=3c64".parse::<KvPrecision>().is_err());
    assert!("fp16:layers=4c64".parse::<KvPrecision>().is_err());
    assert!("mixed:bits=16,layers=4c64".parse::<KvPrecision>().is_err());
}

#[test]
fn qwen3_vl_frames_are_charged_their_deepstack_features() {
    // Qwen3-VL-2B: the text hidden size is 2048 and vision_config lists three DeepStack
    // layers, so the runtime keeps 1 + 3 f32 vectors of 2048 per frame token (the embedding
    // and the three feature sets); 16 frames of 196 tokens.
    let board = BoardRegistry::bundled().get("orin-nano-8gb").unwrap();
    let model = ModelSpec::load(&fixture("configs/qwen3-vl-2b")).unwrap();
    assert_eq!(model.text.deepstack_layers, 3);
    let w = workload(196, 16);
    let p = plan_default(&board, &model, &w, KvPrecision::mixed());
    assert_eq!(p.deepstack_layers, 3);
    assert_eq!(p.memory.frame_features_bytes, 16 * 196 * 2048 * 4 * 4);
    // Every frame costs them: one frame fewer frees its KV and its features.
    let less = plan_default(&board, &model, &workload(196, 15), KvPrecision::mixed());
    assert_eq!(
        p.total_bytes - less.total_bytes,
        (p.kv_bytes - less.kv_bytes) + 196 * 2048 * 4 * 4
    );
    // Qwen2.5-VL has no DeepStack: its frames keep their embeddings only.
    let q25 = ModelSpec::load(&fixture("configs/qwen2.5-vl-3b")).unwrap();
    assert_eq!(q25.text.deepstack_layers, 0);
    let p25 = plan_default(&board, &q25, &workload(256, 16), KvPrecision::mixed());
    assert_eq!(
        p25.memory.frame_features_bytes,
        16 * 256 * q25.text.hidden_size as u64 * 4
    );
}
