//! Peak memory of quantized decoders, measured in child processes (this test binary run
//! again with `JETVLM_MEM_CHILD` set, its peak resident set read from `/proc/self/status`
//! `VmHWM`): loading a quantized model and decoding a token never materialises a dense copy
//! of the weights (peak about the quantized file plus one layer), and `quantize_dir` streams
//! (peak about the source weights it reads, mapped, plus one matrix; not the whole output).
//!
//! Converting a pre-quantized checkpoint streams too: `import_checkpoint` on a random AWQ
//! (GEMM) checkpoint of the same shapes peaks at about the source it reads (mapped) plus one
//! matrix, not the whole converted output.
//!
//! The model is a random BF16 Llama of 77 MB written into the test's temporary directory
//! (12 layers, hidden 512, MLP 1536, vocabulary 4096, tied embeddings): one layer is 6 MB
//! in BF16, so a dense BF16 copy (72 MB more) or a whole INT8 output held in memory (41 MB)
//! would cross the bounds.

#![cfg(target_os = "linux")]

use jetvlm_decoder::quantize::{QuantizeOptions, quantize_dir};
use jetvlm_decoder::{F32KvCache, Input, LoadOptions, Model};
use jetvlm_quant::WeightFormat;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const LAYERS: usize = 12;
const HIDDEN: usize = 512;
const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const MLP: usize = 1536;
const VOCAB: usize = 4096;
const CHILD_ENV: &str = "JETVLM_MEM_CHILD";
const MB: f64 = 1024.0 * 1024.0;

/// BF16 bytes of one decoder layer's matrices.
fn layer_bf16_bytes() -> u64 {
    let attn = 2 * HIDDEN * HEADS * HEAD_DIM + 2 * HIDDEN * KV_HEADS * HEAD_DIM;
    (2 * (attn + 3 * HIDDEN * MLP)) as u64
}

/// Writes a random BF16 Llama decoder (config.json + model.safetensors) into `dir`.
fn write_random_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": MLP,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |n: usize, scale: f32| -> Vec<u8> {
        let mut v = Vec::with_capacity(n * 2);
        for _ in 0..n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            v.extend_from_slice(&half::bf16::from_f32(u * scale).to_le_bytes());
        }
        v
    };
    let ones = |n: usize| -> Vec<u8> {
        std::iter::repeat_n(half::bf16::ONE.to_le_bytes(), n)
            .flatten()
            .collect()
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![VOCAB, HIDDEN],
            random(VOCAB * HIDDEN, 0.1),
        ),
        ("model.norm.weight".into(), vec![HIDDEN], ones(HIDDEN)),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let q = HEADS * HEAD_DIM;
        let kv = KV_HEADS * HEAD_DIM;
        for (name, rows, cols) in [
            ("self_attn.q_proj", q, HIDDEN),
            ("self_attn.k_proj", kv, HIDDEN),
            ("self_attn.v_proj", kv, HIDDEN),
            ("self_attn.o_proj", HIDDEN, q),
            ("mlp.gate_proj", MLP, HIDDEN),
            ("mlp.up_proj", MLP, HIDDEN),
            ("mlp.down_proj", HIDDEN, MLP),
        ] {
            tensors.push((
                format!("{p}.{name}.weight"),
                vec![rows, cols],
                random(rows * cols, 0.08),
            ));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((format!("{p}.{norm}.weight"), vec![HIDDEN], ones(HIDDEN)));
        }
    }
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Writes a random AWQ (GEMM, 4 bits, group 64) checkpoint of the same shapes into `dir`:
/// per layer matrix `qweight` I32 `[in, out / 8]`, `qzeros` I32 `[in / 64, out / 8]`,
/// `scales` F16 `[in / 64, out]`; the embedding table and norms F16. Returns the largest
/// matrix's parameter count.
fn write_random_awq(dir: &Path) -> usize {
    const GROUP: usize = 64;
    std::fs::create_dir_all(dir).unwrap();
    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": MLP,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "torch_dtype": "float16",
        "bos_token_id": 1,
        "eos_token_id": 2
    });
    config["quantization_config"] = serde_json::json!({
        "quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": true,
        "version": "gemm"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut ints =
        |n: usize| -> Vec<u8> { (0..n).flat_map(|_| (next() as u32).to_le_bytes()).collect() };
    let halves = |n: usize, v: f32| -> Vec<u8> {
        std::iter::repeat_n(half::f16::from_f32(v).to_le_bytes(), n)
            .flatten()
            .collect()
    };
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = vec![
        (
            "model.embed_tokens.weight".into(),
            safetensors::Dtype::F16,
            vec![VOCAB, HIDDEN],
            halves(VOCAB * HIDDEN, 0.01),
        ),
        (
            "model.norm.weight".into(),
            safetensors::Dtype::F16,
            vec![HIDDEN],
            halves(HIDDEN, 1.0),
        ),
    ];
    let mut largest = 0;
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let q = HEADS * HEAD_DIM;
        let kv = KV_HEADS * HEAD_DIM;
        for (name, out_f, in_f) in [
            ("self_attn.q_proj", q, HIDDEN),
            ("self_attn.k_proj", kv, HIDDEN),
            ("self_attn.v_proj", kv, HIDDEN),
            ("self_attn.o_proj", HIDDEN, q),
            ("mlp.gate_proj", MLP, HIDDEN),
            ("mlp.up_proj", MLP, HIDDEN),
            ("mlp.down_proj", HIDDEN, MLP),
        ] {
            largest = largest.max(out_f * in_f);
            let i32s = safetensors::Dtype::I32;
            tensors.push((
                format!("{p}.{name}.qweight"),
                i32s,
                vec![in_f, out_f / 8],
                ints(in_f * out_f / 8),
            ));
            tensors.push((
                format!("{p}.{name}.qzeros"),
                i32s,
                vec![in_f / GROUP, out_f / 8],
                ints(in_f / GROUP * out_f / 8),
            ));
            tensors.push((
                format!("{p}.{name}.scales"),
                safetensors::Dtype::F16,
                vec![in_f / GROUP, out_f],
                halves(in_f / GROUP * out_f, 0.002),
            ));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((
                format!("{p}.{norm}.weight"),
                safetensors::Dtype::F16,
                vec![HIDDEN],
                halves(HIDDEN, 1.0),
            ));
        }
    }
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    largest
}

/// This process's peak resident set (`VmHWM`), bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmHWM value");
    kb * 1024
}

/// The child's work (`JETVLM_MEM_CHILD` = `idle`, `load:DIR` or `quantize:SRC:DST`); prints
/// `peak_rss=<bytes>`. Without the variable this test does nothing.
#[test]
fn child() {
    let Ok(task) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = task.split(':');
    match parts.next() {
        Some("idle") => {}
        Some("load") => {
            let dir = parts.next().unwrap();
            let m = Model::load(Path::new(dir), &LoadOptions::default()).unwrap();
            // Decoding reads every matrix (and the tied embedding table as the head).
            let mut cache = F32KvCache::new(m.cache_shape(), 16);
            let logits = m
                .forward(&[Input::text(&[1, 5, 9, 300])], &mut cache)
                .unwrap();
            assert!(logits.last().iter().all(|x| x.is_finite()));
        }
        Some("quantize") => {
            let (src, dst) = (parts.next().unwrap(), parts.next().unwrap());
            let opts = QuantizeOptions {
                format: WeightFormat::new(8, 64).unwrap(),
                head_int8: false,
            };
            quantize_dir(Path::new(src), Path::new(dst), &opts).unwrap();
        }
        Some("import") => {
            let (src, dst) = (parts.next().unwrap(), parts.next().unwrap());
            jetvlm_decoder::import::import_checkpoint(Path::new(src), Path::new(dst)).unwrap();
        }
        other => panic!("unknown {CHILD_ENV} task {other:?}"),
    }
    println!("peak_rss={}", peak_rss());
}

/// Runs `task` in a child process (this test binary, test `child` only); its peak RSS.
fn measure(task: &str) -> u64 {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", "child", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, task)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("child {task} did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child {task} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.split("peak_rss=").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak_rss in the output of child {task}: {text}"))
}

#[test]
fn quantized_loading_and_quantizing_keep_memory_near_the_quantized_size() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("bf16");
    write_random_model(&src);
    let src_bytes = std::fs::metadata(src.join("model.safetensors"))
        .unwrap()
        .len();
    let layer = layer_bf16_bytes();

    let idle = measure("idle");

    // Quantizing: the source is read through a mapping (its pages count), the output is
    // streamed to disk.
    let q8 = tmp.path().join("q8");
    let quantize_peak = measure(&format!("quantize:{}:{}", src.display(), q8.display()));
    let q8_bytes = std::fs::metadata(q8.join("model.safetensors"))
        .unwrap()
        .len();
    let quantize_bound = idle + src_bytes + 2 * layer + (8 << 20);
    println!(
        "quantize_dir INT8 g64: peak RSS {:.1} MB (idle child {:.1} MB, BF16 source {:.1} MB, output {:.1} MB, one layer {:.1} MB); bound {:.1} MB",
        quantize_peak as f64 / MB,
        idle as f64 / MB,
        src_bytes as f64 / MB,
        q8_bytes as f64 / MB,
        layer as f64 / MB,
        quantize_bound as f64 / MB
    );
    assert!(
        quantize_peak <= quantize_bound,
        "quantize_dir peaked at {quantize_peak} bytes > {quantize_bound}"
    );

    // Loading and decoding a token: the quantized file (mapped) plus one layer.
    let q4 = tmp.path().join("q4");
    quantize_dir(
        &src,
        &q4,
        &QuantizeOptions {
            format: WeightFormat::new(4, 64).unwrap(),
            head_int8: false,
        },
    )
    .unwrap();
    for (dir, what) in [(&q4, "INT4 g64"), (&q8, "INT8 g64")] {
        let q_bytes = std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len();
        let peak = measure(&format!("load:{}", dir.display()));
        let bound = idle + q_bytes + layer + (8 << 20);
        println!(
            "load + one decode step, {what}: peak RSS {:.1} MB (idle child {:.1} MB, quantized file {:.1} MB, BF16 source {:.1} MB); bound {:.1} MB",
            peak as f64 / MB,
            idle as f64 / MB,
            q_bytes as f64 / MB,
            src_bytes as f64 / MB,
            bound as f64 / MB
        );
        assert!(
            peak <= bound,
            "{what}: load peaked at {peak} bytes > {bound}"
        );
        // The bound separates: the dense BF16 model alone would not fit under it.
        assert!(src_bytes > bound - idle);
    }
}

#[test]
fn converting_an_awq_checkpoint_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("awq");
    let largest = write_random_awq(&src) as u64;
    let src_bytes = std::fs::metadata(src.join("model.safetensors"))
        .unwrap()
        .len();
    let idle = measure("idle");
    let out = tmp.path().join("int4");
    let peak = measure(&format!("import:{}:{}", src.display(), out.display()));
    let out_bytes = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    // One matrix converting: its source unpacked to i32 codes and f16 scales / zeros
    // (about 4.3 bytes a weight, all three parts), and the converted part (under one byte a
    // weight).
    let matrix = largest * 6;
    let bound = idle + src_bytes + matrix + (8 << 20);
    println!(
        "import_checkpoint AWQ -> INT4 g64: peak RSS {:.1} MB (idle child {:.1} MB, source {:.1} MB, output {:.1} MB, largest matrix {:.1} M weights); bound {:.1} MB",
        peak as f64 / MB,
        idle as f64 / MB,
        src_bytes as f64 / MB,
        out_bytes as f64 / MB,
        largest as f64 / 1e6,
        bound as f64 / MB
    );
    assert!(peak <= bound, "import peaked at {peak} bytes > {bound}");
    // The bound separates: holding the whole converted output as well would cross it.
    assert!(
        out_bytes > bound - idle - src_bytes,
        "{out_bytes} vs the bound's slack"
    );
}
