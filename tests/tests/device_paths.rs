//! The runtime's device path end to end against its CPU path on the bundled demo model:
//! one-shot questions, and camera sessions that evict frames, roll questions back and re-base
//! positions, under the default, FP16, attention-sink and per-layer (calibrated) KV policies.
//! Every test runs on the simulated device (the CUDA backend's host logic with each kernel's
//! CPU twin) and, where a GPU is usable, on the GPU's kernels; either must give the CPU's
//! tokens.

use std::path::PathBuf;
use std::time::Duration;

use jetvlm_camera::{Capture, Frame};
use jetvlm_core::Device;
use jetvlm_runtime::{Pipeline, RuntimeConfig};

/// The demo package: beside this crate in the source tree, else under the working directory
/// (the test executable carried to a GPU machine runs from the repository root).
fn package() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo");
    if here.join("jetvlm.yaml").is_file() {
        here
    } else {
        PathBuf::from("models/demo")
    }
}

fn frames(n: usize, seed: u64) -> Vec<Frame> {
    let mut src = jetvlm_camera::open(&format!("synthetic://scene?seed={seed}&pace=0")).unwrap();
    (0..n)
        .map(|_| match src.capture(Duration::from_secs(5)).unwrap() {
            Capture::Frame(f) => f,
            other => panic!("synthetic source: {other:?}"),
        })
        .collect()
}

/// The devices to check against the CPU: the simulated device always, the GPU when one is
/// usable (otherwise the reason is printed).
fn devices() -> Vec<Device> {
    let mut out = vec![Device::Sim];
    match jetvlm_cuda::CudaDevice::open(0) {
        Ok(_) => out.push(Device::Cuda),
        Err(e) => eprintln!("GPU not checked: {e}"),
    }
    out
}

fn config(device: Device, kv: &Kv) -> RuntimeConfig {
    let mut cfg = RuntimeConfig {
        max_new_tokens: 6,
        window_frames: 3,
        device,
        ..RuntimeConfig::default()
    };
    match kv {
        Kv::Policy(p) => cfg.kv_policy = Some(p.to_string()),
        Kv::Calibration => {
            cfg.kv_calibration = Some(package().join("kv-calibration.yaml"));
        }
    }
    cfg
}

#[derive(Debug)]
enum Kv {
    Policy(&'static str),
    Calibration,
}

const POLICIES: &[Kv] = &[
    Kv::Policy("mixed"),
    Kv::Policy("fp16"),
    Kv::Policy("mixed:sinks=8,budget=0.5,fblock=16,qblock=16"),
    Kv::Policy("int8-frames"),
    Kv::Calibration,
];

const QUESTIONS: &[&str] = &[
    "how many objects are there?",
    "is there a red square?",
    "how many objects are in the left zone?",
];

/// Token ids of one-shot answers about 1 to 3 frames.
fn asks(device: Device, kv: &Kv, clips: &[Vec<Frame>]) -> Vec<Vec<u32>> {
    let mut p = Pipeline::load(&package(), config(device, kv)).unwrap();
    let mut out = Vec::new();
    for (i, clip) in clips.iter().enumerate() {
        let a = p
            .ask(clip, QUESTIONS[i % QUESTIONS.len()])
            .unwrap()
            .finish()
            .unwrap();
        assert!(!a.token_ids.is_empty(), "{device} {kv:?}: empty answer");
        out.push(a.token_ids);
    }
    out
}

#[test]
fn one_shot_answers_on_the_device_equal_the_cpu() {
    let all = frames(6, 11);
    let clips: Vec<Vec<Frame>> = vec![all[..1].to_vec(), all[1..3].to_vec(), all[3..6].to_vec()];
    for kv in POLICIES {
        let cpu = asks(Device::Cpu, kv, &clips);
        for device in devices() {
            assert_eq!(asks(device, kv, &clips), cpu, "{device} {kv:?}");
        }
    }
}

/// A camera session of `n` frames in a window of 3 (frames evicted), two questions after each
/// frame (the first rolled back before the second), positions capped at `max_position` (re-
/// bases): every answer's tokens, the re-bases and the cached tokens at the end.
fn session(
    device: Device,
    kv: &Kv,
    frames: &[Frame],
    max_position: Option<usize>,
) -> (Vec<Vec<u32>>, u64, usize) {
    let mut cfg = config(device, kv);
    cfg.session_max_position = max_position;
    let mut p = Pipeline::load(&package(), cfg).unwrap();
    let mut s = p.session().unwrap();
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        s.push_frame(f).unwrap();
        for q in [QUESTIONS[i % 3], QUESTIONS[(i + 1) % 3]] {
            out.push(s.ask(q).unwrap().finish().unwrap().token_ids);
        }
    }
    assert_eq!(s.frames().len(), 3.min(frames.len()));
    let cached = s.cached_tokens();
    (out, s.rebases(), cached)
}

#[test]
fn camera_sessions_on_the_device_equal_the_cpu() {
    let frames = frames(7, 5);
    for kv in POLICIES {
        let cpu = session(Device::Cpu, kv, &frames, None);
        for device in devices() {
            assert_eq!(session(device, kv, &frames, None), cpu, "{device} {kv:?}");
        }
    }
}

#[test]
fn camera_sessions_rebasing_positions_on_the_device_equal_the_cpu() {
    let frames = frames(8, 9);
    // Room for the prefix, the window and a question, but not for eight frames' positions.
    let max = Some(120);
    for kv in [&POLICIES[0], &POLICIES[4]] {
        let cpu = session(Device::Cpu, kv, &frames, max);
        assert!(cpu.1 > 0, "no re-base happened on the CPU: {cpu:?}");
        for device in devices() {
            assert_eq!(session(device, kv, &frames, max), cpu, "{device} {kv:?}");
        }
    }
}
