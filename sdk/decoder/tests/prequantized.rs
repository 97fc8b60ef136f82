//! Pre-quantized checkpoints (`tests/fixtures/quant`, made by
//! `tests/fixtures/make_quant_fixtures.py` with the reference formats: the `gguf` package's
//! Q4_0 / Q8_0, AWQ's GEMM packing, GPTQ's packing with and without act-order) converted by
//! `jetvlm_decoder::import` and run: logits against the same weights dequantized in Python
//! (transformers, f32), and bad input refused with an error naming what is wrong.

use jetvlm_decoder::import::{import_checkpoint, import_gguf};
use jetvlm_decoder::{F32KvCache, Input, LoadOptions, LogitsMode, Model};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The prompt and the expected logits of its last positions.
fn expected(dir: &Path) -> (Vec<u32>, Vec<Vec<f32>>) {
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = v["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    (ids, logits)
}

/// Converts fixture `name` into a temporary directory and loads it.
fn convert(name: &str) -> (tempfile::TempDir, Model) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let dir = fixtures().join("quant").join(name);
    if name.starts_with("gguf") {
        import_gguf(
            &fixtures().join("decoder/llama"),
            &dir.join("model.gguf"),
            &out,
        )
        .unwrap();
    } else {
        import_checkpoint(&dir, &out).unwrap();
    }
    let m = Model::load(&out, &LoadOptions::default()).unwrap();
    (tmp, m)
}

/// Largest |a - b| over the last rows, relative to the largest |expected logit|.
fn rel_err(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    let scale = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let mut err = 0f32;
    for (g, w) in got.iter().zip(want) {
        for (a, b) in g.iter().zip(w) {
            err = err.max((a - b).abs());
        }
    }
    err / scale
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

/// Prefill logits (dequantized tiles, f32 gemm) and token-by-token decode logits (the
/// quantized matrix-vector kernels) of the last positions.
fn logits(m: &Model, ids: &[u32], last: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut c = F32KvCache::new(m.cache_shape(), 64);
    let all = m
        .forward_with(&[Input::text(ids)], &mut c, LogitsMode::All)
        .unwrap();
    let prefill = (ids.len() - last..ids.len())
        .map(|i| all.row(i).to_vec())
        .collect();
    let mut c = F32KvCache::new(m.cache_shape(), 64);
    let mut decode = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let l = m.forward(&[Input::text(&[*id])], &mut c).unwrap();
        if i >= ids.len() - last {
            decode.push(l.last().to_vec());
        }
    }
    (prefill, decode)
}

#[test]
fn converted_checkpoints_match_python_dequantized_logits() {
    // (fixture, prefill bound, decode bound) relative to the largest logit. Exact conversions
    // differ from the Python reference only by f32 summation order (and AWQ/GPTQ zeros
    // rounded to FP16). Decode quantizes each matrix's input to INT8 per block of 32 (every
    // activation within 1/254 of its block's largest): 0.6-1.7% of the largest logit on these
    // fixtures, bound 3%. GPTQ act-order is quantized again in contiguous groups: INT4
    // round-to-nearest error.
    for (name, pre_tol, dec_tol) in [
        ("gguf_q8_0", 1e-4, 3e-2),
        ("gguf_q4_0", 1e-4, 3e-2),
        ("awq", 2e-3, 3e-2),
        ("gptq", 2e-3, 3e-2),
        ("gptq_actorder", 0.08, 0.08),
    ] {
        let (ids, want) = expected(&fixtures().join("quant").join(name));
        let (_tmp, m) = convert(name);
        let (pre, dec) = logits(&m, &ids, want.len());
        let (ep, ed) = (rel_err(&pre, &want), rel_err(&dec, &want));
        eprintln!("{name}: prefill {ep:.2e}, decode {ed:.2e}");
        assert!(
            ep <= pre_tol,
            "{name}: prefill logits off by {ep} of the largest"
        );
        assert!(
            ed <= dec_tol,
            "{name}: decode logits off by {ed} of the largest"
        );
        for (g, w) in pre.iter().zip(&want) {
            assert_eq!(argmax(g), argmax(w), "{name}: top-1");
        }
    }
}

/// A copy of fixture `name` with its config's quantization_config fields replaced.
fn with_config(name: &str, set: &[(&str, serde_json::Value)]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("quant").join(name);
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let p = tmp.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    for (k, x) in set {
        v["quantization_config"][*k] = x.clone();
    }
    std::fs::write(&p, v.to_string()).unwrap();
    tmp
}

fn one_line_error(
    r: jetvlm_decoder::Result<jetvlm_decoder::import::ImportReport>,
    out: &Path,
    want: &[&str],
) {
    let msg = match r {
        Ok(_) => panic!("converted; expected an error containing {want:?}"),
        Err(e) => e.to_string(),
    };
    for w in want {
        assert!(msg.contains(w), "{msg:?} lacks {w:?}");
    }
    assert!(!msg.contains('\n'), "{msg:?}");
    assert!(!out.exists(), "nothing written on error");
}

#[test]
fn bad_prequantized_input_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let llama = fixtures().join("decoder/llama");
    // A truncated GGUF file: every cut is an error naming the file, never a panic.
    let gguf = std::fs::read(fixtures().join("quant/gguf_q4_0/model.gguf")).unwrap();
    let cut = tmp.path().join("cut.gguf");
    for len in [0, 3, 20, 200, gguf.len() / 2, gguf.len() - 1] {
        std::fs::write(&cut, &gguf[..len]).unwrap();
        let want = if len < 4 { "truncated" } else { "GGUF" };
        one_line_error(import_gguf(&llama, &cut, &out), &out, &[want, "cut.gguf"]);
    }
    // A GGUF of another model than --model's config.
    one_line_error(
        import_gguf(
            &fixtures().join("decoder/qwen2"),
            &fixtures().join("quant/gguf_q4_0/model.gguf"),
            &out,
        ),
        &out,
        &["not this model"],
    );
    // An unknown format, an unsupported layout, bits, a group that does not divide the rows,
    // a group that disagrees with the tensors (inconsistent sizes).
    for (name, set, want) in [
        (
            "awq",
            vec![("quant_method", "fp8".into())],
            vec!["`fp8`", "quant_method"],
        ),
        ("awq", vec![("version", "gemv".into())], vec!["gemv"]),
        ("gptq", vec![("bits", 3.into())], vec!["bits"]),
        (
            "gptq",
            vec![("checkpoint_format", "gptq_v2".into())],
            vec!["gptq_v2"],
        ),
        (
            "awq",
            vec![("group_size", 128.into())],
            vec![
                "group size 128",
                "does not divide its 64",
                "gate_proj.qweight",
            ],
        ),
        (
            "awq",
            vec![("group_size", 48.into())],
            vec!["group_size", "48"],
        ),
        (
            "gptq",
            vec![("group_size", 32.into())],
            vec!["qzeros holds 16 values, expected 32", "down_proj.qweight"],
        ),
    ] {
        let d = with_config(name, &set);
        one_line_error(import_checkpoint(d.path(), &out), &out, &want);
    }
    // A checkpoint whose weight file is truncated.
    let d = with_config("awq", &[]);
    let st = d.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    one_line_error(
        import_checkpoint(d.path(), &out),
        &out,
        &["model.safetensors", "truncated"],
    );
}
