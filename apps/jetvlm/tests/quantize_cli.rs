//! `jetvlm quantize` through the built binary: INT8 and INT4 decoders that `generate` runs
//! (INT8 with the f32 fixture's greedy tokens), and refusals naming the flag or tensor at fault
//! with nothing written; `jetvlm plan` against what the runtime allocates (quantized
//! decoders, converted GGUF files, and the Gemma 3 / Qwen3-VL packages: [`plan_vs_runtime`]).

mod common;
use common::jetvlm;

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/decoder/llama"
);

fn greedy_ids(model: &str) -> serde_json::Value {
    let (ok, stdout, stderr) = jetvlm(&[
        "generate",
        "--model",
        model,
        "--prompt-ids",
        "1,85,69,342,71,28",
        "--max-tokens",
        "12",
        "--greedy",
        "--ignore-eos",
        "--kv",
        "fp16",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    v["token_ids"].clone()
}

/// INT8 gives f32's greedy tokens; INT4 (g32, INT8 head) runs and, on this prompt, agrees
/// for the first 4 of 12 tokens (measured; then it picks another of the fixture's phrases).
#[test]
fn quantize_writes_decoders_generate_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let want = greedy_ids(MODEL);
    let want = want.as_array().unwrap();
    assert_eq!(want.len(), 12);
    for (bits, agree) in [("8", 12), ("4", 4)] {
        let out = tmp.path().join(format!("q{bits}"));
        let out_s = out.to_str().unwrap();
        let (ok, stdout, stderr) = jetvlm(&[
            "quantize",
            "--model",
            MODEL,
            "--bits",
            bits,
            "--group",
            "32",
            "--head-bits",
            "8",
            "--out",
            out_s,
        ]);
        assert!(ok, "{stderr}");
        assert!(
            stdout.contains(&format!("INT{bits} g32")) && stdout.contains("LM head INT8"),
            "{stdout}"
        );
        let got = greedy_ids(out_s);
        let got = got.as_array().unwrap();
        assert_eq!(got.len(), 12);
        assert_eq!(got[..agree], want[..agree], "INT{bits}");
    }
}

#[test]
fn quantize_refusals_name_the_flag_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let out_s = out.to_str().unwrap();
    let (ok, _, stderr) = jetvlm(&[
        "quantize", "--model", MODEL, "--bits", "4", "--group", "128", "--out", out_s,
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--group 128") && stderr.contains("model.layers.0.self_attn.q_proj.weight"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let (ok, _, stderr) = jetvlm(&["quantize", "--model", MODEL, "--bits", "3", "--out", out_s]);
    assert!(!ok && stderr.contains("--bits"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

/// `jetvlm plan --weight-bits B [--weight-group G] [--head-bits 8]` charges the bytes the
/// decoder holds once `jetvlm quantize` wrote it and the runtime loaded it (measured on the
/// loaded model's buffers), within 2%; `plan` on the quantized directory itself charges the
/// same (its quantization_config).
#[test]
fn plan_weight_bits_agrees_with_the_loaded_quantized_decoder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/decoder/llama_bf16"
    );
    let plan_bytes = common::planned_weight_bytes;
    let native = plan_bytes(model, &[]);
    let bf16 = jetvlm_decoder::Model::load(
        std::path::Path::new(model),
        &jetvlm_decoder::LoadOptions::default(),
    )
    .unwrap()
    .weight_bytes_held();
    for (bits, group, head) in [
        ("4", "32", true),
        ("4", "64", false),
        ("8", "64", true),
        ("8", "32", false),
    ] {
        let out = tmp.path().join(format!("q{bits}g{group}{head}"));
        let out_s = out.to_str().unwrap();
        let mut q = vec![
            "quantize", "--model", model, "--bits", bits, "--group", group, "--out", out_s,
        ];
        let mut p = vec!["--weight-bits", bits, "--weight-group", group];
        if head {
            q.extend(["--head-bits", "8"]);
            p.extend(["--head-bits", "8"]);
        }
        let (ok, _, stderr) = jetvlm(&q);
        assert!(ok, "{stderr}");
        let held = jetvlm_decoder::Model::load(&out, &jetvlm_decoder::LoadOptions::default())
            .unwrap()
            .weight_bytes_held();
        let planned = plan_bytes(model, &p);
        let err = (planned as f64 - held as f64).abs() / held as f64;
        assert!(
            err <= 0.02,
            "int{bits} g{group} head8 {head}: plan {planned} vs runtime {held} ({:.2}%)",
            100.0 * err
        );
        assert_eq!(plan_bytes(out_s, &[]), planned, "plan of the quantized dir");
        // Not vacuous: the quantized decoder is much smaller than the BF16 one.
        assert!(held < bf16 * 7 / 10, "{held} vs {bf16}");
    }
    let err = (native as f64 - bf16 as f64).abs() / bf16 as f64;
    assert!(err <= 0.02, "bf16: plan {native} vs runtime {bf16}");
    // A group that does not divide the rows is one line naming the flag.
    let (ok, _, stderr) = jetvlm(&[
        "plan",
        "--model",
        model,
        "--board",
        "orin-nano-8gb",
        "--tokens-per-frame",
        "1",
        "--weight-bits",
        "4",
        "--weight-group",
        "128",
    ]);
    assert!(!ok && stderr.contains("--weight-group 128"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// `bench decode --weights bf16,q8,q4g32` measures every format in one run: a row per
/// weights x KV policy, each format's bytes as loaded (4 bits read fewer bytes per token than
/// 8, and 8 fewer than BF16), prefill tokens/s; a bad entry is one line naming the flag.
#[test]
fn bench_decode_compares_weight_formats_in_one_run() {
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/decoder/llama_bf16"
    );
    // One decode bench of 2 real steps at context 48, as JSON, with `extra` flags.
    let bench = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "bench",
            "decode",
            "--model",
            model,
            "--context",
            "48",
            "--steps",
            "2",
            "--prefill",
            "real",
            "--json",
        ];
        args.extend_from_slice(extra);
        common::jetvlm_json(&args)
    };
    let v = bench(&[
        "--weights",
        "bf16,q8,q4g32",
        "--frame-tokens",
        "16",
        "--no-flush",
        "--phases",
    ]);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "3 formats x 2 KV policies");
    // --phases: every phase of the steps, in order, within the step's time; without the
    // flush no probe reads were timed.
    for r in rows {
        let ph = r["phases"].as_array().unwrap();
        let names: Vec<&str> = ph.iter().map(|p| p["phase"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "norm",
                "qkv",
                "rope",
                "attention",
                "o",
                "norm2",
                "gate/up",
                "act",
                "down",
                "residual",
                "head"
            ]
        );
        let ms = |n: &str| {
            ph[names.iter().position(|&x| x == n).unwrap()]["ms"]
                .as_f64()
                .unwrap()
        };
        assert!(
            ms("qkv") > 0.0 && ms("attention") > 0.0 && ms("head") > 0.0,
            "{r}"
        );
        let sum: f64 = names.iter().map(|&n| ms(n)).sum();
        assert!(sum <= r["tpot_ms"].as_f64().unwrap() * 1.0001, "{r}");
        assert!(r["bandwidth_during_gbs"].is_null(), "{r}");
    }
    let read = |w: &str| -> u64 {
        let r: Vec<_> = rows.iter().filter(|r| r["weights"] == w).collect();
        assert_eq!(r.len(), 2, "{w}");
        assert!(
            r.iter()
                .all(|r| r["prefill_tokens_per_s"].as_f64().unwrap() > 0.0
                    && r["bandwidth_fraction"].as_f64().unwrap() > 0.0)
        );
        r[0]["weight_bytes_per_token"].as_u64().unwrap()
    };
    let (bf16, q8, q4) = (read("bf16"), read("q8"), read("q4g32"));

    // With the probe read before every step: each row has the bandwidth of its own moments,
    // which no single read beats, so the row's share of the peak is at most its BW %.
    let probed = bench(&["--weights", "q4g32", "--kv", "fp16"]);
    let r = &probed["rows"][0];
    let during = r["bandwidth_during_gbs"].as_f64().unwrap();
    assert!(
        during > 0.0 && during <= probed["bandwidth_gbs"].as_f64().unwrap() * 1.0001,
        "{probed}"
    );
    assert!(
        r["peak_fraction"].as_f64().unwrap() <= r["bandwidth_fraction"].as_f64().unwrap() * 1.0001
    );
    assert!(r["phases"].is_null(), "{r}");
    assert!(q4 < q8 && q8 < bf16, "{q4} {q8} {bf16}");
    let w = v["weights"].as_array().unwrap();
    assert!(
        w[2]["description"]
            .as_str()
            .unwrap()
            .starts_with("int4 g32"),
        "{w:?}"
    );
    assert_eq!(w[1]["bytes_read_per_token"].as_u64(), Some(q8));

    for bad in ["q3", "q4g48", "int4", "bf17"] {
        let (ok, _, stderr) = jetvlm(&[
            "bench",
            "decode",
            "--model",
            model,
            "--weights",
            bad,
            "--context",
            "48",
        ]);
        assert!(
            !ok && stderr.contains(&format!("--weights {bad}")),
            "{bad}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

/// Pre-quantized checkpoints through the CLI: an AWQ directory converts without --bits and
/// `generate` runs it; `plan` on it charges what the converted decoder holds; quantizing
/// flags with a pre-quantized model, an unknown format and a truncated GGUF are one line each.
#[test]
fn prequantized_checkpoints_convert_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
    let awq = format!("{fixtures}/quant/awq");
    let out = tmp.path().join("awq");
    let out_s = out.to_str().unwrap();
    let (ok, stdout, stderr) = jetvlm(&["quantize", "--model", &awq, "--out", out_s]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("21 matrices from awq as INT4 g32"),
        "{stdout}"
    );
    let ids = greedy_ids(out_s);
    assert_eq!(ids.as_array().unwrap().len(), 12);
    let plan = |dir: &str| common::planned_weight_bytes(dir, &[]);
    let held = jetvlm_decoder::Model::load(&out, &jetvlm_decoder::LoadOptions::default())
        .unwrap()
        .weight_bytes_held();
    for dir in [awq.as_str(), out_s] {
        let p = plan(dir);
        assert!(
            (p as f64 - held as f64).abs() <= 0.02 * held as f64,
            "{dir}: plan {p} vs {held}"
        );
    }

    let gguf = format!("{fixtures}/quant/gguf_q8_0/model.gguf");
    let llama = format!("{fixtures}/decoder/llama");
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &std::fs::read(&gguf).unwrap()[..1000]).unwrap();
    let cfg_dir = tmp.path().join("fp8");
    std::fs::create_dir(&cfg_dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(format!("{awq}/{f}"), cfg_dir.join(f)).unwrap();
    }
    let cfg = cfg_dir.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"awq\"", "\"fp8\"");
    std::fs::write(&cfg, text).unwrap();
    let bad = tmp.path().join("bad");
    let bad_s = bad.to_str().unwrap();
    for (args, want) in [
        (vec!["--model", awq.as_str(), "--bits", "4"], "--bits"),
        (vec!["--model", cfg_dir.to_str().unwrap()], "`fp8`"),
        (
            vec!["--model", llama.as_str(), "--from", cut.to_str().unwrap()],
            "truncated",
        ),
        (
            vec!["--model", llama.as_str()],
            "--bits 4 or --bits 8 is required",
        ),
    ] {
        let mut a = vec!["quantize"];
        a.extend(args);
        a.extend(["--out", bad_s]);
        let (ok, _, stderr) = jetvlm(&a);
        assert!(!ok && stderr.contains(want), "{a:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(!bad.exists());
    }
}

/// `jetvlm plan` on the exported Gemma 3 and Qwen3-VL packages (tests/fixtures/hf_vlms)
/// charges what the runtime allocates for the same workload, measured on the loaded model:
///
/// - weights: the decoder's buffers (`Model::weight_bytes_held`), within 2%;
/// - frame features: every frame's encoder output the runtime keeps (f32 embeddings and, for
///   Qwen3-VL, its DeepStack feature sets), exactly;
/// - KV: a camera session's cache after its frames, a question and the answer, exactly, once
///   the cache's block granularity (16-token blocks, a frame's tokens in blocks of their own)
///   is added to the plan's per-token charge. Gemma 3's sliding-window layers keep the whole
///   context (the window is 8 tokens here, the context about 80): the planner charges every
///   layer for every token, as the cache holds them;
/// - the total of the three within 2%.
///
/// And on GGUF files converted by `jetvlm quantize --from` (a tied Q8_0 embedding table, a
/// Q4_K file with a tied Q6_K table, a Q4_0 file with a Q8_0 head): `plan` on the converted
/// directory charges the weights the loaded decoder holds, within 2%.
mod plan_vs_runtime {
    use super::common::jetvlm;
    use std::path::{Path, PathBuf};

    fn fixture(family: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/hf_vlms")
            .join(family)
    }

    /// A copy of `family`'s package in `dir` with its decoder config edited.
    fn edited_package(
        dir: &Path,
        family: &str,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> PathBuf {
        let src = fixture(family).join("pkg");
        let dst = dir.join(family);
        std::fs::create_dir_all(dst.join("decoder")).unwrap();
        for sub in ["", "decoder"] {
            for e in std::fs::read_dir(src.join(sub)).unwrap() {
                let e = e.unwrap();
                if e.path().is_file() {
                    std::fs::copy(e.path(), dst.join(sub).join(e.file_name())).unwrap();
                }
            }
        }
        let cfg_path = dst.join("decoder/config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        edit(&mut cfg);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        dst
    }

    /// Four frames that differ (the probe image, colours shifted by the index).
    fn frames(family: &str) -> Vec<jetvlm_camera::Frame> {
        let img = jetvlm_vision::RgbImage::open(&fixture(family).join("probe.png")).unwrap();
        (0..4u64)
            .map(|i| jetvlm_camera::Frame {
                index: i,
                timestamp: std::time::Duration::ZERO,
                width: img.width,
                height: img.height,
                rgb: img
                    .data
                    .iter()
                    .map(|v| v.wrapping_add(37 * i as u8))
                    .collect(),
            })
            .collect()
    }

    const BLOCK: u64 = 16;

    fn check(family: &str, pkg: &Path) {
        let frames = frames(family);
        let n = frames.len() as u64;
        let cfg = jetvlm_runtime::RuntimeConfig {
            kv_policy: Some(format!("fp16:fblock={BLOCK}")),
            max_new_tokens: 8,
            window_frames: frames.len(),
            ..jetvlm_runtime::RuntimeConfig::default()
        };
        let mut pipe = jetvlm_runtime::Pipeline::load(pkg, cfg).unwrap();
        let weights = pipe.model().unwrap().weight_bytes_held();
        let tpf = pipe.package().tokens_per_frame() as u64;
        let (embeddings, _) = pipe.encode_frames(&frames).unwrap();
        let features: u64 = embeddings
            .iter()
            .map(|e| 4 * (e.data.len() + e.deepstack.len()) as u64)
            .sum();
        drop(embeddings);
        let mut s = pipe.session().unwrap();
        for f in &frames {
            s.push_frame(f).unwrap();
        }
        s.ask("what is in the picture?").unwrap().finish().unwrap();
        let cached = s.cached_tokens() as u64;
        let kv = s.kv_memory().total_bytes;
        drop(s);
        let text = cached - n * tpf;

        let (ok, stdout, stderr) = jetvlm(&[
            "plan",
            "--model",
            pkg.to_str().unwrap(),
            "--board",
            "orin-nano-8gb",
            "--frames",
            &n.to_string(),
            "--prompt-tokens",
            &text.to_string(),
            "--answer-tokens",
            "0",
            "--kv",
            "fp16",
            "--json",
        ]);
        assert!(ok, "{family}: {stderr}");
        let p: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let m = &p["memory"];
        let get = |k: &str| {
            m[k].as_u64()
                .unwrap_or_else(|| panic!("{family}: no {k} in {m}"))
        };
        assert_eq!(p["context_tokens"].as_u64(), Some(cached), "{family}");

        let planned_w = get("weights_bytes");
        let err = (planned_w as f64 - weights as f64).abs() / weights as f64;
        assert!(
            err <= 0.02,
            "{family}: plan {planned_w} B of weights, runtime holds {weights} B"
        );
        assert_eq!(
            get("frame_features_bytes"),
            features,
            "{family}: frame features"
        );

        // The plan's KV per token (all layers, FP16), over the blocks the cache fills.
        let planned_kv = get("kv_text_bytes") + get("kv_frame_bytes");
        assert_eq!(planned_kv % cached, 0, "{family}");
        let per_token = planned_kv / cached;
        let blocks = n * tpf.div_ceil(BLOCK) + text.div_ceil(BLOCK);
        assert_eq!(
            kv,
            per_token * blocks * BLOCK,
            "{family}: the cache holds {kv} B for {cached} tokens; the plan charges {per_token} B a token"
        );
        let planned = planned_w + planned_kv + features;
        let held = weights + kv + features;
        let err = (planned as f64 - held as f64).abs() / held as f64;
        eprintln!(
            "{family}: plan {planned} B (weights {planned_w}, KV {planned_kv}, features {features}) vs runtime {held} B (weights {weights}, KV {kv}): {:.2}%",
            100.0 * err
        );
        assert!(err <= 0.02, "{family}: plan {planned} vs runtime {held}");
    }

    #[test]
    fn gemma3_plan_charges_what_the_runtime_allocates() {
        let tmp = tempfile::tempdir().unwrap();
        // A window far shorter than the context: the local layer's cache still holds it all.
        let pkg = edited_package(tmp.path(), "gemma3", |c| c["sliding_window"] = 8.into());
        // Per token: 2 layers (one local, one global) x 1 KV head x (K + V) x 32 x 2 bytes.
        check("gemma3", &pkg);
    }

    #[test]
    fn qwen3_vl_plan_charges_its_deepstack_features() {
        let pkg = fixture("qwen3_vl").join("pkg");
        let p: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(pkg.join("decoder/config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(p["deepstack_layers"], 2, "the fixture carries DeepStack");
        check("qwen3_vl", &pkg);
    }

    /// `jetvlm quantize --bits 4 --keep-8bit ...`: the named matrices INT8 (every layer's
    /// `mlp.down_proj`, layer 1's `v_proj`), declared per matrix; plan charges each at its
    /// own format and equals what the decoder holds, which the all-INT4 charge would miss by
    /// more than the 2% bound; a matrix that is not a layer matrix is refused naming the flag.
    #[test]
    fn keep_8bit_plans_what_the_decoder_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("q4m");
        let quantize = |extra: &[&str], out: &Path| {
            let mut a = vec![
                "quantize",
                "--model",
                super::MODEL,
                "--bits",
                "4",
                "--group",
                "32",
                "--out",
                out.to_str().unwrap(),
            ];
            a.extend_from_slice(extra);
            jetvlm(&a)
        };
        let (ok, _, stderr) = quantize(
            &[
                "--keep-8bit",
                "mlp.down_proj",
                "--keep-8bit",
                "layers.1.self_attn.v_proj",
            ],
            &out,
        );
        assert!(ok, "{stderr}");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let o = &cfg["quantization_config"]["overrides"];
        assert_eq!(o["layers.*.mlp.down_proj"]["bits"], 8, "{o}");
        assert_eq!(o["layers.1.self_attn.v_proj"]["group_size"], 32, "{o}");
        let plan = |dir: &Path| super::common::planned_weight_bytes(dir.to_str().unwrap(), &[]);
        let planned = plan(&out);
        let m = jetvlm_decoder::Model::load(&out, &jetvlm_decoder::LoadOptions::default()).unwrap();
        let held = m.weight_bytes_held();
        let plain = tmp.path().join("q4");
        assert!(quantize(&[], &plain).0);
        let all_int4 = plan(&plain);
        eprintln!("--keep-8bit: plan {planned} B, held {held} B, all-INT4 plan {all_int4} B");
        assert_eq!(planned, held);
        assert!((planned - all_int4) as f64 > 0.02 * held as f64);

        let bad = tmp.path().join("bad");
        let (ok, _, stderr) = quantize(&["--keep-8bit", "mlp.fc1"], &bad);
        assert!(!ok && stderr.contains("--keep-8bit `mlp.fc1`"), "{stderr}");
        let (ok, _, stderr) = quantize(&["--keep-8bit", "layers.7.mlp.up_proj"], &bad);
        assert!(!ok && stderr.contains("names layer 7"), "{stderr}");
        assert!(!bad.exists());
    }

    #[test]
    fn converted_gguf_plans_what_the_decoder_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        for (name, src) in [
            ("gguf_q8_0_tied", "decoder/llama"),
            ("gguf_q4_k", "quant/gguf_q4_k/hf"),
            // llama.cpp's Q4_K_M mix: its INT8 attn_v / ffn_down charged at their own format
            // (quantization_config.overrides).
            ("gguf_q4_k_m", "quant/gguf_q4_k/hf"),
            ("gguf_q4_0", "decoder/llama"),
        ] {
            let out = tmp.path().join(name);
            let gguf = fixtures.join("quant").join(name).join("model.gguf");
            let (ok, _, stderr) = jetvlm(&[
                "quantize",
                "--model",
                fixtures.join(src).to_str().unwrap(),
                "--from",
                gguf.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(ok, "{name}: {stderr}");
            let planned = super::common::planned_weight_bytes(out.to_str().unwrap(), &[]);
            let held = jetvlm_decoder::Model::load(&out, &jetvlm_decoder::LoadOptions::default())
                .unwrap()
                .weight_bytes_held();
            let err = (planned as f64 - held as f64).abs() / held as f64;
            eprintln!(
                "{name}: plan {planned} B, decoder holds {held} B ({:.2}%)",
                100.0 * err
            );
            assert!(err <= 0.02, "{name}: plan {planned} vs held {held}");
        }
    }
}
