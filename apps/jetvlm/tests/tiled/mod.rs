//! SmolVLM with image splitting (tests/fixtures/hf_vlms/smolvlm_tiles, built by
//! tests/fixtures/make_hf_vlms.py --only smolvlm_tiles): the processor resizes the 130x80
//! probe to 96x60, then to whole 32x32 tiles (96x64), cuts 2 rows x 3 columns and adds the
//! global image; `jetvlm export --frame-size 130x80` writes that grid as `vision.tiles`.
//! The runtime cuts the frame as the processor does (pixel values of every tile within 1e-4
//! of transformers'), lays out `<fake_token_around_image><row_r_col_c>` + tile, "\n" per
//! row and the global image as the processor's text (as many prompt tokens as its input
//! ids), answers token for token as transformers' `generate` (16 greedy tokens) with
//! first-token logits within 1e-4 on the exact f32 cache; the mixed cache runs. A camera
//! session caches all the tiles of a frame as one frame and evicts them together.

use std::path::{Path, PathBuf};

const FAMILY: &str = "smolvlm_tiles";

use super::{exporter_available, flat_f32, jetvlm};

fn fixture() -> PathBuf {
    super::fixture(FAMILY)
}

fn expected() -> serde_json::Value {
    super::expected(FAMILY)
}

fn ask(pkg: &Path, image: &str, kv: &str) -> serde_json::Value {
    super::ask(FAMILY, pkg, image, kv)
}

fn frame(image: &str, index: u64) -> jetvlm_camera::Frame {
    let img = jetvlm_vision::RgbImage::open(&fixture().join(image)).unwrap();
    jetvlm_camera::Frame {
        index,
        timestamp: std::time::Duration::ZERO,
        width: img.width,
        height: img.height,
        rgb: img.data,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn load(pkg: &Path, kv: &str) -> jetvlm_runtime::Pipeline {
    let cfg = jetvlm_runtime::RuntimeConfig {
        kv_policy: Some(kv.to_string()),
        max_new_tokens: 16,
        ..jetvlm_runtime::RuntimeConfig::default()
    };
    jetvlm_runtime::Pipeline::load(pkg, cfg).unwrap()
}

/// The manifest's grid is the processor's, and every tile the runtime feeds the encoder
/// (row-major, the global image last) has transformers' pixel values within 1e-4; tiles in
/// another order or a single resize to one tile would be far off.
#[test]
fn tiles_are_cut_as_the_processor_cuts_them() {
    let exp = expected();
    let pkg = jetvlm_vision::ModelPackage::load(&fixture().join("pkg")).unwrap();
    let tiles = pkg.manifest.vision.tiles.clone().expect("vision.tiles");
    assert_eq!(
        [tiles.rows, tiles.cols],
        [
            exp["tile_grid"][0].as_u64().unwrap() as u32,
            exp["tile_grid"][1].as_u64().unwrap() as u32
        ]
    );
    assert_eq!((tiles.rows, tiles.cols), (2, 3), "a non-square grid");
    assert_eq!(tiles.runs(), 7);
    assert_eq!(
        pkg.tokens_per_frame(),
        7 * pkg.manifest.vision.tokens_per_frame
    );

    let shape: Vec<usize> = exp["tile_pixels_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let bytes = std::fs::read(fixture().join(exp["tile_pixels"].as_str().unwrap())).unwrap();
    let want: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(want.len(), shape.iter().product::<usize>());
    let per_tile = shape[1] * shape[2] * shape[3];

    let mut p = load(&fixture().join("pkg"), "f32");
    let got = p
        .encoder_inputs(&frame(exp["image"].as_str().unwrap(), 0))
        .unwrap();
    assert_eq!(got.len(), shape[0]);
    for (i, tile) in got.iter().enumerate() {
        let d = max_diff(tile, &want[i * per_tile..(i + 1) * per_tile]);
        eprintln!("tile {i}: pixel values max |diff| vs transformers = {d:e}");
        assert!(d < 1e-4, "tile {i}: {d}");
    }
    // The tiles differ from one another (a wrong crop offset would repeat one).
    assert!(max_diff(&got[0], &got[5]) > 0.1);
}

/// `jetvlm ask` on the tiled package: transformers' 16 greedy tokens with the exact f32
/// cache and fp16, as many prompt tokens as the processor's input ids (the tile text laid
/// out as the processor's); the large probe (260x160, resized to the same 96x60) too, and
/// the simulated device; the mixed cache runs.
#[test]
fn tiled_package_answers_like_transformers() {
    let exp = expected();
    let pkg = fixture().join("pkg");
    for kv in ["f32", "fp16"] {
        let v = ask(&pkg, exp["image"].as_str().unwrap(), kv);
        assert_eq!(v["token_ids"], exp["greedy_tokens"], "kv {kv}");
        assert_eq!(
            v["prompt_tokens"].as_u64().unwrap() as usize,
            exp["input_ids"].as_array().unwrap().len(),
            "prompt length vs the processor's input ids"
        );
        assert_eq!(v["frames"], 1);
    }
    let large = ask(&pkg, exp["large_image"].as_str().unwrap(), "fp16");
    assert_eq!(large["token_ids"], exp["large_greedy_tokens"]);
    // The device path (the simulated device: the CUDA host logic over its kernels' CPU
    // twins) takes the tiles as frame spans of their own too.
    let out = jetvlm()
        .arg("ask")
        .arg("--model")
        .arg(&pkg)
        .arg("--image")
        .arg(fixture().join(exp["image"].as_str().unwrap()))
        .arg(exp["question"].as_str().unwrap())
        .args([
            "--max-tokens",
            "16",
            "--json",
            "--kv",
            "fp16",
            "--device",
            "sim",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sim["token_ids"], exp["greedy_tokens"], "device sim");
    let mixed = ask(&pkg, exp["image"].as_str().unwrap(), "mixed");
    assert_eq!(
        mixed["token_ids"].as_array().unwrap().len(),
        exp["max_new_tokens"].as_u64().unwrap() as usize
    );
}

/// The prompt's token ids with a placeholder at each image token are the processor's input
/// ids exactly (the tile text, "\n" per row, the global image's text).
#[test]
fn tiled_prompt_ids_are_the_processors() {
    let exp = expected();
    let p = load(&fixture().join("pkg"), "f32");
    let want: Vec<u32> = exp["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let image = p.tokenizer().token_to_id("<image>").unwrap();
    let got = p
        .prompt_ids(1, exp["question"].as_str().unwrap(), image)
        .unwrap();
    assert_eq!(got, want);
    assert_eq!(got.iter().filter(|&&t| t == image).count(), 28);
}

/// First-token logits within 1e-4 of transformers' with the exact f32 cache; the mixed cache
/// (INT4 frame K/V) reported, below 1 (a bound that catches a broken layout).
#[test]
fn tiled_first_token_logits_match_transformers() {
    let exp = expected();
    let want: Vec<f32> = flat_f32(&exp["first_token_logits"]);
    let q = exp["question"].as_str().unwrap();
    let probe = frame(exp["image"].as_str().unwrap(), 0);
    let d = max_diff(
        &load(&fixture().join("pkg"), "f32")
            .first_token_logits(std::slice::from_ref(&probe), q)
            .unwrap(),
        &want,
    );
    eprintln!("{FAMILY}: kv f32: first-token logits max |diff| vs transformers = {d:e}");
    assert!(d < 1e-4, "kv f32: {d}");
    let m = max_diff(
        &load(&fixture().join("pkg"), "mixed")
            .first_token_logits(std::slice::from_ref(&probe), q)
            .unwrap(),
        &want,
    );
    eprintln!("{FAMILY}: kv mixed: first-token logits max |diff| vs transformers = {m:e}");
    assert!(m.is_finite() && m < 1.0, "kv mixed: {m}");
}

/// A camera session caches each frame's 7 encoder runs (28 tokens) as one frame: the cache
/// holds the prefix plus 28 tokens per kept frame, pushing past the window evicts a whole
/// frame, and with a position limit that re-bases every push the answer equals a fresh
/// session's over the kept frames, on the CPU and on the simulated device.
#[test]
fn tiled_session_evicts_whole_frames() {
    let exp = expected();
    let q = exp["question"].as_str().unwrap();
    let pkg = fixture().join("pkg");
    let window = 2;
    let base = jetvlm_runtime::RuntimeConfig {
        kv_policy: Some("fp16".into()),
        max_new_tokens: 16,
        window_frames: window,
        ..jetvlm_runtime::RuntimeConfig::default()
    };
    let frames: Vec<jetvlm_camera::Frame> = (0..4u64)
        .map(|i| {
            let mut f = frame(exp["image"].as_str().unwrap(), i);
            f.rgb
                .iter_mut()
                .for_each(|v| *v = v.wrapping_add(37 * i as u8));
            f
        })
        .collect();
    let tpf = jetvlm_vision::ModelPackage::load(&pkg)
        .unwrap()
        .tokens_per_frame();
    assert_eq!(tpf, 28);

    let mut fresh_pipe = jetvlm_runtime::Pipeline::load(&pkg, base.clone()).unwrap();
    let mut fresh = fresh_pipe.session().unwrap();
    for f in &frames[frames.len() - window..] {
        fresh.push_frame(f).unwrap();
    }
    let prefix = fresh.prefix_tokens();
    assert_eq!(fresh.cached_tokens(), prefix + window * tpf);
    let want = fresh.ask(q).unwrap().finish().unwrap().token_ids;
    drop(fresh);

    // On the CPU and on the simulated device (device KV pools sized from the package's
    // tokens per frame).
    let limit = prefix + tpf + tpf + 64 + base.max_new_tokens;
    for device in [jetvlm_core::Device::Cpu, jetvlm_core::Device::Sim] {
        let mut p = jetvlm_runtime::Pipeline::load(
            &pkg,
            jetvlm_runtime::RuntimeConfig {
                session_max_position: Some(limit),
                device,
                ..base.clone()
            },
        )
        .unwrap();
        let mut s = p.session().unwrap();
        let mut answers = Vec::new();
        for f in &frames {
            s.push_frame(f).unwrap();
            assert_eq!(
                s.cached_tokens(),
                prefix + s.frames().len() * tpf,
                "{device}: frame {}",
                f.index
            );
            answers.push(s.ask(q).unwrap().finish().unwrap().token_ids);
        }
        assert_eq!(s.frames().len(), window);
        assert_eq!(s.rebases(), frames.len() as u64 - window as u64, "{device}");
        assert_eq!(answers.last().unwrap(), &want, "{device}");
        assert_ne!(answers[1], want, "{device}: the frames matter");
    }
}

fn f32_file(name: &str) -> Vec<f32> {
    std::fs::read(fixture().join(name))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The same checkpoint exported without `--frame-size` (`unsplit/jetvlm.yaml`, sharing
/// pkg/'s encoder and decoder: `vision.tiles` with rows and cols 0): the processor without
/// splitting resizes the 130x80 frame by its longest edge to 96x60, then to one 32x32 tile,
/// and so does the runtime (pixel values equal; one resize straight to 32x32 would differ);
/// `ask` gives transformers' 16 greedy tokens and prompt length without splitting, and the
/// first-token logits are within 1e-4.
#[test]
fn unsplit_package_resizes_like_the_processor_without_splitting() {
    let exp = expected();
    let pkg = fixture().join(exp["unsplit_package"].as_str().unwrap());
    let tiles = jetvlm_vision::ModelPackage::load(&pkg)
        .unwrap()
        .manifest
        .vision
        .tiles
        .unwrap();
    assert_eq!((tiles.rows, tiles.cols, tiles.runs()), (0, 0, 1));
    let probe = frame(exp["image"].as_str().unwrap(), 0);
    let mut p = load(&pkg, "f32");
    let got = p.encoder_inputs(&probe).unwrap();
    assert_eq!(got.len(), 1);
    let want = f32_file(exp["unsplit_pixels"].as_str().unwrap());
    let d = max_diff(&got[0], &want);
    eprintln!("unsplit: pixel values max |diff| vs transformers = {d:e}");
    assert!(d < 1e-4, "{d}");
    // One resize straight to the tile is not what the processor does: it is off by whole
    // 8-bit levels (2/255 after normalisation by std 0.5 per level).
    let img = jetvlm_vision::RgbImage::open(&fixture().join("probe.png")).unwrap();
    let cfg = jetvlm_vision::ModelPackage::load(&pkg)
        .unwrap()
        .preprocess_config();
    let once = jetvlm_vision::preprocess::preprocess_reference(&cfg, &img.view().unwrap());
    let off = max_diff(&once.data.to_f32(), &want);
    eprintln!("unsplit: one resize straight to the tile: max |diff| = {off:e}");
    assert!(off > 7e-3, "{off}");

    let logits: Vec<f32> = flat_f32(&exp["unsplit_first_token_logits"]);
    let q = exp["question"].as_str().unwrap();
    let d = max_diff(
        &p.first_token_logits(std::slice::from_ref(&probe), q)
            .unwrap(),
        &logits,
    );
    eprintln!("unsplit: kv f32: first-token logits max |diff| vs transformers = {d:e}");
    assert!(d < 1e-4, "{d}");
    let v = ask(&pkg, exp["image"].as_str().unwrap(), "f32");
    assert_eq!(v["token_ids"], exp["unsplit_greedy_tokens"]);
    assert_eq!(
        v["prompt_tokens"].as_u64().unwrap() as usize,
        exp["unsplit_input_ids"].as_array().unwrap().len()
    );
    let mixed = ask(&pkg, exp["image"].as_str().unwrap(), "mixed");
    assert_eq!(mixed["token_ids"].as_array().unwrap().len(), 16);
}

/// A copy of the tiled package in `dir` with its manifest edited.
fn edited(dir: &Path, edit: impl FnOnce(String) -> String) -> PathBuf {
    let src = fixture().join("pkg");
    let dst = dir.join("pkg");
    for sub in ["", "decoder"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.path().is_file() {
                std::fs::copy(e.path(), dst.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    let yaml = std::fs::read_to_string(dst.join("jetvlm.yaml")).unwrap();
    let new = edit(yaml.clone());
    assert_ne!(new, yaml, "the edit changed nothing");
    std::fs::write(dst.join("jetvlm.yaml"), new).unwrap();
    dst
}

/// A bad `vision.tiles` is refused at load with an error naming the field, never run.
#[test]
fn bad_tiles_are_refused_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (from, to, field, needle)) in [
        (
            "    rows: 2\n",
            "    rows: 0\n",
            "vision.tiles.rows",
            "both 0 (the frame is not split) or both at least 1",
        ),
        (
            "    rows: 2\n    cols: 3\n    global_image: true\n",
            "    rows: 0\n    cols: 0\n    global_image: false\n",
            "vision.tiles.global_image",
            "must be true",
        ),
        (
            "    cols: 3\n",
            "    cols: 300\n",
            "vision.tiles.cols",
            "8192 pixels",
        ),
        (
            "    rows: 2\n    cols: 3\n",
            "    rows: 100\n    cols: 100\n",
            "vision.tiles",
            "more than 1024",
        ),
        (
            "    longest_edge: 96\n",
            "    longest_edge: 0\n",
            "vision.tiles.longest_edge",
            "out of range",
        ),
        (
            "<row_{row}_col_{col}>",
            "<row_{row}_col_{column}>",
            "vision.tiles.tile_prefix",
            "unknown placeholder",
        ),
        (
            "  resize: stretch\n",
            "  resize: letterbox\n",
            "vision.resize",
            "must be stretch",
        ),
        (
            "    global_image: true\n",
            "    global_image: true\n    overlap: 2\n",
            "overlap",
            "unknown field",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let pkg = edited(&tmp.path().join(i.to_string()), |m| m.replace(from, to));
        let e = jetvlm_vision::ModelPackage::load(&pkg)
            .unwrap_err()
            .to_string();
        assert!(e.contains(field) && e.contains(needle), "{field}: {e}");
        // `jetvlm ask` refuses it with the same words.
        let out = jetvlm()
            .arg("ask")
            .arg("--model")
            .arg(&pkg)
            .arg("--image")
            .arg(fixture().join("probe.png"))
            .arg("q")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(field),
            "{field}: {err}"
        );
    }
}

/// `jetvlm export --frame-size 130x80` on the checkpoint writes the committed manifest (the
/// grid, the sizes and the tile text checked by the exporter against the processor) and
/// reports the tiling; without `--frame-size` it writes the unsplit manifest.
#[test]
fn export_writes_the_processors_tile_grid() {
    if !exporter_available("export_writes_the_processors_tile_grid") {
        return;
    }
    let exp = expected();
    let tmp = tempfile::tempdir().unwrap();
    let body = |pkg: &Path| -> Vec<String> {
        std::fs::read_to_string(pkg.join("jetvlm.yaml"))
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    let export = |out: &Path, extra: &[&str]| {
        let res = jetvlm()
            .arg("export")
            .arg(fixture().join("hf"))
            .arg("--out")
            .arg(out)
            .args(["--name", "tiny-random-smolvlm_tiles"])
            .args(["--question", exp["question"].as_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&res.stdout).into_owned();
        assert!(
            res.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&res.stderr)
        );
        stdout
    };
    let tiled = tmp.path().join("tiled");
    let stdout = export(&tiled, &["--frame-size", "130x80"]);
    assert!(
        stdout.contains("2 rows x 3 columns of 32x32 tiles + the global image: 7 encoder runs, 28 image tokens per frame"),
        "{stdout}"
    );
    assert!(
        stdout.contains("46 tokens per frame as the processor's"),
        "{stdout}"
    );
    assert_eq!(body(&tiled), body(&fixture().join("pkg")));
    // Without --frame-size: one image per frame, the committed unsplit manifest (which names
    // pkg/'s files).
    let plain = tmp.path().join("plain");
    let stdout = export(&plain, &[]);
    assert!(
        stdout.contains("one image per frame: a 32x32 frame resized to 96x96, then to 32x32"),
        "{stdout}"
    );
    let shared = |lines: Vec<String>| -> Vec<String> {
        lines
            .into_iter()
            .map(|l| l.replace("../pkg/", ""))
            .filter(|l| !l.starts_with("name:"))
            .collect()
    };
    assert_eq!(
        shared(body(&plain)),
        shared(body(&fixture().join("unsplit")))
    );
}

/// `jetvlm plan` on the tiled package charges a frame's 28 tokens (7 encoder runs of 4), not
/// one tile's 4: ten frames need 280 frame tokens.
#[test]
fn plan_charges_every_tile_of_a_frame() {
    let out = jetvlm()
        .arg("plan")
        .args(["--board", "orin-nano-8gb", "--frames", "10", "--json"])
        .arg("--model")
        .arg(fixture().join("pkg"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = plan.to_string();
    assert!(
        text.contains("\"tokens_per_frame\":28"),
        "{}",
        serde_json::to_string_pretty(&plan).unwrap()
    );
}
