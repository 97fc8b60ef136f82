//! The device decoder on the simulated device (every kernel's CPU twin under the device's host
//! logic): the same checks `jetvlm selftest --device cuda` runs on a GPU, on every machine.
//!
//! Gemma 3 and Qwen3-VL on the device path against the CPU decoder on the committed tiny
//! packages (`tests/fixtures/hf_vlms/<family>/pkg/decoder`): the prompt of the family's
//! `expected.json` with its image tokens replaced by one frame of embeddings (Qwen3-VL's with
//! its DeepStack features) gives the CPU's prompt logits and 16 greedy tokens. Gemma 3 with a
//! sliding window shorter than the prompt, its bidirectional frame attention, Qwen3-VL with
//! frame eviction, and what the device still refuses, each with one line. With the `cuda`
//! feature the same runs go through the GPU's kernels when a device is present
//! (`.ci/gpu-check.sh` carries this test executable there and runs `on_a_gpu`).

use jetvlm_core::TokenKind;
use jetvlm_cuda::inputs::Rng;
use jetvlm_cuda::reference::normalized_error;
use jetvlm_cuda::{
    DeviceDecoder, DeviceInput, DeviceKvCache, DevicePolicy, DeviceSession, Gpu, PREFILL_CHUNK,
    PoolMemory, SimDevice, decoder_check,
};
use jetvlm_decoder::{Input, LoadOptions, Model};
use jetvlm_kvcache::{KvPolicy, MixedKvCache};
use std::path::{Path, PathBuf};

/// Greedy tokens compared after the prompt.
const TOKENS: usize = 16;
/// Bound on the normalised error of the device's prompt logits against the CPU's, both with
/// FP16 K/V (measured 5e-6 to 2.5e-5).
const LOGITS_TOLERANCE: f64 = 1e-4;

/// A family's committed fixture: next to this crate in the source tree, else under the
/// working directory (a test executable carried to a GPU machine runs from the repository
/// root).
fn family_dir(family: &str) -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf_vlms");
    let root = if here.is_dir() {
        here
    } else {
        PathBuf::from("tests/fixtures/hf_vlms")
    };
    root.join(family)
}

/// The fixture prompt split around its image tokens (the longest run of one repeated id):
/// text before, the frame's token count, text after.
fn prompt(family: &str) -> (Vec<u32>, usize, Vec<u32>) {
    let exp: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(family_dir(family).join("expected.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = exp["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let (mut best, mut start) = ((0, 0), 0);
    for i in 1..=ids.len() {
        if i == ids.len() || ids[i] != ids[start] {
            if i - start > best.1 - best.0 {
                best = (start, i);
            }
            start = i;
        }
    }
    assert!(
        best.1 - best.0 >= 8,
        "{family}: no image token run in {ids:?}"
    );
    (
        ids[..best.0].to_vec(),
        best.1 - best.0,
        ids[best.1..].to_vec(),
    )
}

/// One frame's embeddings and its DeepStack features (`deepstack_layers` x n x hidden; empty
/// without DeepStack), deterministic from `seed`.
fn frame(c: &jetvlm_core::hf::ModelConfig, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let h = c.hidden_size;
    let data = rng.normals(n * h);
    let deepstack = rng
        .normals(c.deepstack_layers * n * h)
        .iter()
        .map(|v| 0.5 * v)
        .collect();
    (data, deepstack)
}

/// A run of spans: text ids, or frame `id`'s embeddings (seeded by the id).
#[derive(Clone, Copy)]
enum Span<'a> {
    Text(&'a [u32]),
    Frame {
        id: u64,
        n: usize,
    },
    /// A frame's embeddings cached as text tokens (causal, no frame blocks).
    FrameAsText {
        id: u64,
        n: usize,
    },
    Evict(u64),
}

/// Prompt logits after `spans` and the greedy tokens after them, on the CPU decoder
/// (`policy`'s mixed cache).
fn cpu_run(dir: &Path, spans: &[Span<'_>], policy: KvPolicy) -> (Vec<f32>, Vec<u32>) {
    let m = Model::load(dir, &LoadOptions::default()).unwrap();
    let c = m.config().model.clone();
    let mut cache = MixedKvCache::new(m.cache_shape(), policy, 512).unwrap();
    let mut logits = Vec::new();
    for s in spans {
        let l = match *s {
            Span::Text(ids) => m.forward(&[Input::text(ids)], &mut cache).unwrap(),
            Span::Frame { id, n } => {
                let (data, ds) = frame(&c, n, id);
                let inp = Input::frame(&data, n, id).with_deepstack(&ds);
                m.forward(&[inp], &mut cache).unwrap()
            }
            Span::FrameAsText { id, n } => {
                let (data, _) = frame(&c, n, id);
                m.forward(&[Input::embeddings(&data, n)], &mut cache)
                    .unwrap()
            }
            Span::Evict(id) => {
                cache.evict_frame(id).unwrap();
                continue;
            }
        };
        logits = l.last().to_vec();
    }
    let first = logits.clone();
    let mut out = Vec::new();
    while out.len() < TOKENS {
        let t = jetvlm_decoder::sampler::argmax(&logits);
        out.push(t);
        logits = m
            .forward(&[Input::text(&[t])], &mut cache)
            .unwrap()
            .last()
            .to_vec();
    }
    (first, out)
}

/// The same on `dev`.
fn device_run<G: Gpu>(
    dev: &G,
    dir: &Path,
    spans: &[Span<'_>],
    policy: KvPolicy,
) -> (Vec<f32>, Vec<u32>) {
    let model = DeviceDecoder::load(dev, dir).unwrap();
    let c = model.config().model.clone();
    let p = DevicePolicy::new(&policy, c.num_key_value_heads, c.head_dim).unwrap();
    let cache = DeviceKvCache::new(
        dev,
        p,
        c.num_hidden_layers,
        256,
        64,
        spans.len() + TOKENS + 1,
        PoolMemory::Device,
    )
    .unwrap();
    let mut s = DeviceSession::new(dev, &model, cache).unwrap();
    fn text(ids: &[u32]) -> DeviceInput<'_> {
        DeviceInput::Ids {
            ids,
            kind: TokenKind::Text,
        }
    }
    let mut logits = Vec::new();
    for span in spans {
        logits = match *span {
            Span::Text(ids) => s.forward(&[text(ids)]).unwrap(),
            Span::Frame { id, n } => {
                let (data, deepstack) = frame(&c, n, id);
                s.forward(&[DeviceInput::Embeddings {
                    data: &data,
                    n,
                    kind: TokenKind::Frame,
                    frame: Some(id),
                    deepstack: &deepstack,
                }])
                .unwrap()
            }
            Span::FrameAsText { id, n } => {
                let (data, _) = frame(&c, n, id);
                s.forward(&[DeviceInput::Embeddings {
                    data: &data,
                    n,
                    kind: TokenKind::Text,
                    frame: None,
                    deepstack: &[],
                }])
                .unwrap()
            }
            Span::Evict(id) => {
                s.cache_mut().evict_frame(id).unwrap();
                continue;
            }
        };
    }
    let first = logits.clone();
    let mut out = Vec::new();
    while out.len() < TOKENS {
        let t = jetvlm_decoder::sampler::argmax(&logits);
        out.push(t);
        logits = s.forward(&[text(&[t])]).unwrap();
    }
    (first, out)
}

/// The simulated device against CPU on `spans` with FP16 K/V: equal greedy tokens, prompt
/// logits within the bound. Returns the device's prompt logits.
fn assert_device_matches_cpu(what: &str, dir: &Path, spans: &[Span<'_>]) -> Vec<f32> {
    assert_matches_cpu_on(&SimDevice::new(), LOGITS_TOLERANCE, what, dir, spans)
}

/// [`assert_device_matches_cpu`] on `dev` with the logits held to `tolerance`.
fn assert_matches_cpu_on<G: Gpu>(
    dev: &G,
    tolerance: f64,
    what: &str,
    dir: &Path,
    spans: &[Span<'_>],
) -> Vec<f32> {
    let (cl, ct) = cpu_run(dir, spans, KvPolicy::fp16());
    let (dl, dt) = device_run(dev, dir, spans, KvPolicy::fp16());
    let err = normalized_error(&dl, &cl);
    eprintln!(
        "{what} on {}: device vs CPU prompt logits {err:.3e}, tokens {dt:?}",
        dev.name()
    );
    assert_eq!(dt, ct, "{what}: device greedy tokens");
    assert!(err <= tolerance, "{what}: logits error {err:e}");
    dl
}

/// Gemma 3 (GeGLU, (1 + w) norms, q/k norms, embedding scaling, local and global layers,
/// bidirectional frame attention) and Qwen3-VL (interleaved M-RoPE, DeepStack, q/k norms):
/// the device gives the CPU's tokens and prompt logits with FP16 K/V; with the mixed policy
/// (frames INT4) the two backends' logits stay close (the figure is printed).
#[test]
fn gemma3_and_qwen3_vl_on_the_simulated_device_give_the_cpu_tokens_and_logits() {
    for family in ["gemma3", "qwen3_vl"] {
        let dir = family_dir(family).join("pkg/decoder");
        let (before, n, after) = prompt(family);
        let spans = [
            Span::Text(&before),
            Span::Frame { id: 1, n },
            Span::Text(&after),
        ];
        assert_device_matches_cpu(family, &dir, &spans);
        let (cl, _) = cpu_run(&dir, &spans, KvPolicy::mixed());
        let (dl, _) = device_run(&SimDevice::new(), &dir, &spans, KvPolicy::mixed());
        let err = normalized_error(&dl, &cl);
        eprintln!("{family}: mixed KV, device vs CPU prompt logits {err:.3e}");
        assert!(err <= 1e-3, "{family} mixed: {err:e}");
    }
}

/// A copy of `family`'s decoder with `edit` applied to its config.json.
fn edited_decoder(tmp: &Path, family: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = family_dir(family).join("pkg/decoder");
    let dir = tmp.join(family);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
    dir
}

/// Gemma 3's masks on the device: with `sliding_window` 8 (the prompt is 51 tokens) the local
/// layer's window starts inside the frame and inside KV blocks, and the device still gives the
/// CPU's tokens and logits, which differ from the full-context ones; the frame's tokens seeing
/// each other both ways is exercised: the same embeddings cached as causal text tokens give
/// other logits on both backends, equal to each other.
#[test]
fn gemma3_sliding_window_and_bidirectional_frames_run_alike_on_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    let (before, n, after) = prompt("gemma3");
    let full = family_dir("gemma3").join("pkg/decoder");
    let windowed = edited_decoder(tmp.path(), "gemma3", |c| c["sliding_window"] = 8.into());
    let spans = [
        Span::Text(&before),
        Span::Frame { id: 1, n },
        Span::Text(&after),
    ];
    let w = assert_device_matches_cpu("gemma3 window 8", &windowed, &spans);
    let f = assert_device_matches_cpu("gemma3 full window", &full, &spans);
    let d = normalized_error(&w, &f);
    eprintln!("gemma3: windowed vs full-context logits {d:.3e}");
    assert!(d > 1e-2, "the window changed nothing: {d:e}");
    let causal = [
        Span::Text(&before),
        Span::FrameAsText { id: 1, n },
        Span::Text(&after),
    ];
    let c = assert_device_matches_cpu("gemma3 frame as causal text", &full, &causal);
    let d = normalized_error(&c, &f);
    eprintln!("gemma3: causal vs bidirectional frame logits {d:.3e}");
    assert!(d > 1e-2, "the bidirectional frame changed nothing: {d:e}");
}

/// Gemma 3's final logit softcapping (`final_logit_softcapping`; the fixture has none, so a
/// copy sets 10): the device's capped logits are the CPU's, all within [-10, 10], and differ
/// from the uncapped ones.
#[test]
fn gemma3_logit_softcapping_runs_alike_on_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    let (before, n, after) = prompt("gemma3");
    let capped = edited_decoder(tmp.path(), "gemma3", |c| {
        c["final_logit_softcapping"] = 10.0.into()
    });
    let spans = [
        Span::Text(&before),
        Span::Frame { id: 1, n },
        Span::Text(&after),
    ];
    let c = assert_device_matches_cpu("gemma3 softcap 10", &capped, &spans);
    assert!(c.iter().all(|v| v.abs() <= 10.0), "{c:?}");
    let (f, _) = device_run(
        &SimDevice::new(),
        &family_dir("gemma3").join("pkg/decoder"),
        &spans,
        KvPolicy::fp16(),
    );
    assert!(normalized_error(&c, &f) > 1e-2);
}

/// Qwen3-VL camera-style session on the device: text, frames 1 and 2 (interleaved M-RoPE
/// grids, DeepStack), frame 1 evicted, frame 3, the question: the device gives the CPU
/// cache's tokens and logits; the evicted frame mattered (the answer without evicting it
/// differs).
#[test]
fn qwen3_vl_frame_eviction_runs_alike_on_the_device() {
    let dir = family_dir("qwen3_vl").join("pkg/decoder");
    let (before, n, after) = prompt("qwen3_vl");
    let evicted = [
        Span::Text(&before),
        Span::Frame { id: 1, n },
        Span::Frame { id: 2, n },
        Span::Evict(1),
        Span::Frame { id: 3, n },
        Span::Text(&after),
    ];
    let e = assert_device_matches_cpu("qwen3_vl eviction", &dir, &evicted);
    let kept = [
        Span::Text(&before),
        Span::Frame { id: 1, n },
        Span::Frame { id: 2, n },
        Span::Frame { id: 3, n },
        Span::Text(&after),
    ];
    let (k, _) = device_run(&SimDevice::new(), &dir, &kept, KvPolicy::fp16());
    assert!(normalized_error(&e, &k) > 1e-3);
}

/// What the device still does not run is refused with one line, before anything is written:
/// a Gemma 3 frame longer than one prefill chunk (its tokens see each other both ways, and
/// the device runs that within a chunk), and a DeepStack frame without its features.
#[test]
fn the_device_refuses_what_it_cannot_run_with_one_line() {
    let dev = SimDevice::new();
    for (family, n, deepstack_ok) in [("gemma3", PREFILL_CHUNK + 1, true), ("qwen3_vl", 15, false)]
    {
        let dir = family_dir(family).join("pkg/decoder");
        let model = DeviceDecoder::load(&dev, &dir).unwrap();
        let c = model.config().model.clone();
        let p = DevicePolicy::new(&KvPolicy::fp16(), c.num_key_value_heads, c.head_dim).unwrap();
        let cache =
            DeviceKvCache::new(&dev, p, c.num_hidden_layers, 8, n, 2, PoolMemory::Device).unwrap();
        let mut s = DeviceSession::new(&dev, &model, cache).unwrap();
        let (data, deepstack) = frame(&c, n, 1);
        let features = if deepstack_ok {
            &deepstack[..]
        } else {
            &[][..]
        };
        let msg = s
            .forward(&[DeviceInput::Embeddings {
                data: &data,
                n,
                kind: TokenKind::Frame,
                frame: Some(1),
                deepstack: features,
            }])
            .unwrap_err()
            .to_string();
        eprintln!("{family}: {msg}");
        assert!(!msg.contains('\n'), "{msg}");
        let needle = if family == "gemma3" {
            "--device cpu"
        } else {
            "deepstack_layers 2"
        };
        assert!(msg.contains(needle), "{msg}");
        assert!(
            s.cache().is_empty(),
            "{family}: the refused span left tokens behind"
        );
    }
}

/// On a GPU (the `cuda` feature and a device present): the same runs through the CUDA
/// kernels (GeGLU, softcapping, scaled embeddings, interleaved M-RoPE, the windowed and
/// bidirectional attention) give the CPU's tokens, the logits within the decoder check's
/// FP16-K/V bound (1e-3); without a device it prints why it skips.
#[cfg(feature = "cuda")]
#[test]
fn gemma3_and_qwen3_vl_on_a_gpu_give_the_cpu_tokens_and_logits() {
    let dev = match jetvlm_cuda::CudaDevice::open(0) {
        Ok(dev) => dev,
        Err(e) => {
            assert!(e.is_unavailable(), "unexpected error: {e}");
            eprintln!("skipped: {e}");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let windowed = edited_decoder(tmp.path(), "gemma3", |c| c["sliding_window"] = 8.into());
    let capped = edited_decoder(&tmp.path().join("capped"), "gemma3", |c| {
        c["final_logit_softcapping"] = 10.0.into()
    });
    for (what, family, dir) in [
        ("gemma3", "gemma3", family_dir("gemma3").join("pkg/decoder")),
        ("gemma3 window 8", "gemma3", windowed),
        ("gemma3 softcap 10", "gemma3", capped),
        (
            "qwen3_vl",
            "qwen3_vl",
            family_dir("qwen3_vl").join("pkg/decoder"),
        ),
    ] {
        let (before, n, after) = prompt(family);
        let spans = [
            Span::Text(&before),
            Span::Frame { id: 1, n },
            Span::Frame { id: 2, n },
            Span::Evict(1),
            Span::Text(&after),
        ];
        assert_matches_cpu_on(&dev, 1e-3, what, &dir, &spans);
    }
}

/// The decoder fixtures next to this crate in the source tree.
fn decoder_fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/decoder")
}

#[test]
fn simulated_device_gives_the_cpu_tokens_on_the_decoder_fixtures() {
    let checks = decoder_check(&SimDevice::new(), &decoder_fixtures(), 32).unwrap();
    for c in &checks {
        eprintln!("{}", c.line());
    }
    assert_eq!(checks.len(), 4, "{checks:?}");
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.line())
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

/// The device decoder loads every family's decoder of the committed packages: Qwen2.5-VL's
/// M-RoPE, Qwen3-VL's interleaved M-RoPE with DeepStack, Gemma 3's recipe (the runs are
/// below).
#[test]
fn the_device_decoder_loads_every_family() {
    let vlms =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf_vlms");
    let dev = SimDevice::new();
    let mut loaded = 0;
    for entry in std::fs::read_dir(&vlms).unwrap() {
        let dir = entry.unwrap().path().join("pkg/decoder");
        if dir.join("config.json").is_file() {
            if let Err(e) = jetvlm_cuda::DeviceDecoder::load(&dev, &dir) {
                panic!("{}: {e}", dir.display());
            }
            loaded += 1;
        }
    }
    assert!(loaded >= 7, "{loaded} families under {}", vlms.display());
}
