//! `jetvlm doctor` on fixture roots: the board-detect fixtures (`tests/fixtures/board/detect`)
//! plus fake library trees (empty `libcuda.so.1.1`, `libnvrtc.so.12.6.77`,
//! `libonnxruntime.so.1.23.2` files, `/dev/video0`), one root per exit status: 0 ready,
//! 6 ready with warnings, 7 not ready, 8 could not check. The JSON report's fields are checked
//! as docs/cli.md documents them.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};

/// The check names, in report order (docs/cli.md).
const CHECKS: [&str; 11] = [
    "config",
    "board",
    "package",
    "memory",
    "cuda-driver",
    "nvrtc",
    "gpu",
    "onnxruntime",
    "tensorrt-cache",
    "cameras",
    "disk",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn demo_model() -> String {
    repo().join("models/demo").display().to_string()
}

/// A Jetson root: a board-detect fixture's files, and whichever of the libraries and the
/// camera the case wants.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn jetson(board: &str) -> Root {
        let dir = tempfile::tempdir().unwrap();
        let src = repo().join("tests/fixtures/board/detect").join(board);
        for rel in [
            "etc/nv_tegra_release",
            "proc/device-tree/model",
            "proc/meminfo",
        ] {
            let from = src.join(rel);
            if from.is_file() {
                let to = dir.path().join(rel);
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::copy(&from, &to).unwrap();
            }
        }
        Root { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(self, rel: &str, text: &str) -> Root {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
        self
    }

    /// libcuda as L4T installs it, and the CUDA 12.6 toolkit's NVRTC.
    fn cuda(self) -> Root {
        self.file("usr/lib/aarch64-linux-gnu/nvidia/libcuda.so.1.1", "")
            .file(
                "usr/local/cuda-12.6/targets/aarch64-linux/lib/libnvrtc.so.12.6.77",
                "",
            )
            .file(
                "usr/local/cuda/version.json",
                r#"{"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}"#,
            )
    }

    /// The JetPack ONNX Runtime build, with its TensorRT and CUDA providers.
    fn onnxruntime(self) -> Root {
        let d = "usr/lib/aarch64-linux-gnu";
        self.file(&format!("{d}/libonnxruntime.so.1.23.2"), "")
            .file(&format!("{d}/libonnxruntime_providers_shared.so"), "")
            .file(&format!("{d}/libonnxruntime_providers_tensorrt.so"), "")
            .file(&format!("{d}/libonnxruntime_providers_cuda.so"), "")
    }

    fn camera(self) -> Root {
        self.file("dev/video0", "")
    }

    fn complete(board: &str) -> Root {
        Root::jetson(board).cuda().onnxruntime().camera()
    }
}

/// Runs doctor with `--json`; returns the exit status, the report and stderr.
fn doctor(root: &Path, extra: &[&str]) -> (i32, Value, String) {
    let root = root.display().to_string();
    let model = demo_model();
    let mut args = vec!["doctor", "--root", &root, "--model", &model, "--json"];
    args.extend_from_slice(extra);
    let run = support::jetvlm(&args);
    let report: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}):\n{}", run.stdout));
    let code = run.code.expect("doctor exited");
    check_fields(&report, code);
    (code, report, run.stderr)
}

/// The documented fields: every check has exactly name, status, detail, fix; the verdict
/// and exit_code agree with each other and with the process's status.
fn check_fields(report: &Value, code: i32) {
    let obj = report.as_object().expect("a JSON object");
    for key in ["root", "model", "config", "checks", "verdict", "exit_code"] {
        assert!(obj.contains_key(key), "report lacks `{key}`: {report:#}");
    }
    assert_eq!(report["exit_code"], code, "exit_code vs the process status");
    let verdict = match code {
        0 => "ready",
        6 => "ready-with-warnings",
        7 => "not-ready",
        8 => "could-not-check",
        other => panic!("doctor exited {other}"),
    };
    assert_eq!(report["verdict"], verdict);
    let checks = report["checks"].as_array().expect("checks[]");
    for c in checks {
        let mut keys: Vec<&str> = c.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["detail", "fix", "name", "status"], "{c}");
        let status = c["status"].as_str().unwrap();
        assert!(
            ["PASS", "WARN", "FAIL", "SKIP", "ERROR"].contains(&status),
            "{c}"
        );
        assert!(!c["detail"].as_str().unwrap().is_empty(), "{c}");
        if matches!(status, "WARN" | "FAIL") {
            assert!(
                !c["fix"].as_str().unwrap().is_empty(),
                "a {status} says how to fix it: {c}"
            );
        }
    }
    if checks.len() > 1 {
        let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, CHECKS);
    }
}

fn status<'a>(report: &'a Value, name: &str) -> (&'a str, &'a str, &'a str) {
    let c = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check `{name}`"));
    (
        c["status"].as_str().unwrap(),
        c["detail"].as_str().unwrap(),
        c["fix"].as_str().unwrap(),
    )
}

#[test]
fn a_complete_orin_root_is_ready() {
    let root = Root::complete("orin-nano-8gb");
    // The service reads a synthetic scene: no camera needed.
    let (code, report, stderr) = doctor(root.path(), &["--source", "synthetic://scene"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let (s, detail, _) = status(&report, "board");
    assert_eq!(s, "PASS");
    assert!(
        detail.contains("orin-nano-8gb") && detail.contains("L4T 36.4.3") && detail.contains("6.2"),
        "{detail}"
    );
    let (s, detail, _) = status(&report, "memory");
    assert_eq!(s, "PASS");
    // Planned against the fixture's MemAvailable (5123456 kB).
    assert!(detail.contains("fits in MemAvailable 5003 MiB"), "{detail}");
    let (s, detail, _) = status(&report, "nvrtc");
    assert_eq!(s, "PASS");
    assert!(
        detail.contains("/usr/local/cuda-12.6/targets/aarch64-linux/lib/libnvrtc.so.12.6.77")
            && detail.contains("NVRTC 12.6.77"),
        "{detail}"
    );
    let (s, detail, _) = status(&report, "cuda-driver");
    assert_eq!(s, "PASS");
    assert!(
        detail.contains("libcuda.so.1.1") && detail.contains("CUDA 12.6.68"),
        "{detail}"
    );
    let (s, detail, _) = status(&report, "onnxruntime");
    assert_eq!(s, "PASS");
    assert!(
        detail.contains("ONNX Runtime 1.23.2") && detail.contains("offers tensorrt,cuda,cpu"),
        "{detail}"
    );
    assert_eq!(
        status(&report, "gpu").0,
        "SKIP",
        "never run off the live system"
    );
    assert_eq!(status(&report, "cameras").0, "SKIP");
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn a_v4l2_source_needs_its_device_and_a_v4l2_build() {
    let root = Root::complete("orin-nano-8gb");
    let (code, report, _) = doctor(root.path(), &["--source", "v4l2:///dev/video0"]);
    let (s, detail, fix) = status(&report, "cameras");
    if cfg!(feature = "v4l") {
        assert_eq!((code, s), (0, "PASS"), "{detail}");
    } else {
        assert_eq!((code, s), (7, "FAIL"), "{detail}");
        assert!(
            detail.contains("/dev/video0 exists, but this build has no V4L2"),
            "{detail}"
        );
        assert!(fix.contains("--features v4l"), "{fix}");
    }
    let (code, report, _) = doctor(root.path(), &["--source", "v4l2:///dev/video3"]);
    assert_eq!(code, 7);
    let (s, detail, _) = status(&report, "cameras");
    assert_eq!(s, "FAIL");
    assert!(detail.contains("/dev/video3 does not exist"), "{detail}");
}

#[test]
fn a_root_without_a_camera_is_ready_with_warnings() {
    let root = Root::jetson("orin-nano-8gb").cuda().onnxruntime();
    let (code, report, stderr) = doctor(root.path(), &[]);
    assert_eq!(code, 6, "{report:#}");
    let (s, detail, fix) = status(&report, "cameras");
    assert_eq!(s, "WARN");
    assert!(detail.contains("no video devices in /dev"), "{detail}");
    assert!(fix.contains("v4l2loopback"), "{fix}");
    assert!(
        stderr.starts_with("warning: ready with warnings: ") && stderr.contains("cameras"),
        "{stderr}"
    );
    // Every other check passes or does not apply.
    for c in report["checks"].as_array().unwrap() {
        if c["name"] != "cameras" {
            assert!(c["status"] == "PASS" || c["status"] == "SKIP", "{c}");
        }
    }
}

#[test]
fn a_provider_this_build_lacks_falls_back_with_a_warning_or_fails_when_required() {
    let root = Root::complete("orin-nano-8gb");
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        cfg.path(),
        "vision:\n  execution_providers: [tensorrt, cpu]\n",
    )
    .unwrap();
    let cfg_path = cfg.path().display().to_string();
    let (code, report, _) = doctor(root.path(), &["--config", &cfg_path]);
    let (s, detail, fix) = status(&report, "onnxruntime");
    if cfg!(feature = "tensorrt") {
        assert_eq!((code, s), (0, "PASS"), "{detail}");
        return;
    }
    assert_eq!(code, 6, "{report:#}");
    assert_eq!(s, "WARN");
    assert!(
        detail.contains("built without the `tensorrt` provider")
            && detail.contains("falls back to cpu"),
        "{detail}"
    );
    assert!(fix.contains("--features jetson"), "{fix}");

    std::fs::write(
        cfg.path(),
        "vision:\n  execution_providers: [tensorrt, cpu]\n  require: true\n",
    )
    .unwrap();
    let (code, report, _) = doctor(root.path(), &["--config", &cfg_path]);
    assert_eq!(code, 7, "{report:#}");
    assert_eq!(status(&report, "onnxruntime").0, "FAIL");
}

#[test]
fn missing_onnxruntime_is_not_ready_and_says_how_to_fix_it() {
    let root = Root::jetson("orin-nano-8gb").cuda().camera();
    let (code, report, stderr) = doctor(root.path(), &[]);
    assert_eq!(code, 7, "{report:#}");
    let (s, detail, fix) = status(&report, "onnxruntime");
    assert_eq!(s, "FAIL");
    assert!(detail.contains("no libonnxruntime.so*"), "{detail}");
    assert!(fix.contains("vision.ort_library"), "{fix}");
    assert!(
        stderr.starts_with("error: not ready: onnxruntime failed"),
        "{stderr}"
    );
}

#[test]
fn a_gpu_config_without_the_cuda_driver_is_not_ready() {
    let root = Root::jetson("orin-nano-8gb").onnxruntime().camera();
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "device: cuda\n").unwrap();
    let cfg_path = cfg.path().display().to_string();
    let (code, report, _) = doctor(root.path(), &["--config", &cfg_path]);
    assert_eq!(code, 7, "{report:#}");
    for name in ["cuda-driver", "nvrtc"] {
        let (s, detail, _) = status(&report, name);
        assert_eq!(s, "FAIL", "{name}: {detail}");
    }
    // Without the GPU in the config the same root only warns.
    let (code, report, _) = doctor(root.path(), &[]);
    assert_eq!(code, 6, "{report:#}");
    assert_eq!(status(&report, "cuda-driver").0, "WARN");
}

#[test]
fn a_plan_over_mem_available_is_not_ready_with_the_planners_advice() {
    let root = Root::complete("orin-nano-8gb").file(
        "proc/meminfo",
        "MemTotal:        7620000 kB\nMemFree:           50000 kB\nMemAvailable:     100000 kB\n",
    );
    let (code, report, _) = doctor(root.path(), &[]);
    assert_eq!(code, 7, "{report:#}");
    let (s, detail, fix) = status(&report, "memory");
    assert_eq!(s, "FAIL");
    assert!(
        detail.contains("does not fit in MemAvailable 97 MiB"),
        "{detail}"
    );
    assert!(!fix.is_empty());
}

#[test]
fn a_root_that_is_not_a_jetson_or_an_old_jetpack_is_not_ready() {
    let root = Root::complete("x86-workstation");
    let (code, report, _) = doctor(root.path(), &[]);
    assert_eq!(code, 7, "{report:#}");
    let (s, detail, fix) = status(&report, "board");
    assert_eq!(s, "FAIL");
    assert!(detail.contains("not a Jetson"), "{detail}");
    assert!(fix.contains("--board"), "{fix}");
    assert_eq!(status(&report, "memory").0, "SKIP");

    let root = Root::complete("orin-nano-8gb").file(
        "etc/nv_tegra_release",
        "# R32 (release), REVISION: 7.4, GCID: 1, BOARD: t210ref, EABI: aarch64\n",
    );
    let (code, report, _) = doctor(root.path(), &[]);
    assert_eq!(code, 7, "{report:#}");
    let (s, detail, _) = status(&report, "board");
    assert_eq!(s, "FAIL");
    assert!(detail.contains("L4T 32.7.4"), "{detail}");
}

#[test]
fn an_invalid_config_or_package_is_not_ready() {
    let root = Root::complete("orin-nano-8gb");
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "window_frames: 0\n").unwrap();
    let cfg_path = cfg.path().display().to_string();
    let (code, report, _) = doctor(root.path(), &["--config", &cfg_path]);
    assert_eq!(code, 7, "{report:#}");
    let (s, detail, _) = status(&report, "config");
    assert_eq!(s, "FAIL");
    assert!(detail.contains("window_frames"), "{detail}");

    // A package whose decoder lost its tokenizer.
    let pkg = tempfile::tempdir().unwrap();
    let demo = repo().join("models/demo");
    for f in ["jetvlm.yaml", "vision.onnx"] {
        std::fs::copy(demo.join(f), pkg.path().join(f)).unwrap();
    }
    std::fs::create_dir(pkg.path().join("decoder")).unwrap();
    for e in std::fs::read_dir(demo.join("decoder")).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "tokenizer.json" && e.path().is_file() {
            std::fs::copy(e.path(), pkg.path().join("decoder").join(e.file_name())).unwrap();
        }
    }
    let root_s = root.path().display().to_string();
    let pkg_s = pkg.path().display().to_string();
    let run = support::jetvlm(&["doctor", "--root", &root_s, "--model", &pkg_s, "--json"]);
    assert_eq!(run.code, Some(7), "{}", run.stdout);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    let (s, detail, _) = status(&report, "package");
    assert_eq!(s, "FAIL");
    assert!(detail.contains("tokenizer.json"), "{detail}");
    assert_eq!(status(&report, "memory").0, "SKIP");
}

#[test]
fn an_unreadable_system_file_is_could_not_check() {
    let root = Root::complete("orin-nano-8gb").file(
        "proc/meminfo",
        "MemTotal:        lots\nMemFree: 1 kB\nMemAvailable: 1 kB\n",
    );
    let (code, report, stderr) = doctor(root.path(), &[]);
    assert_eq!(code, 8, "{report:#}");
    let (s, detail, _) = status(&report, "board");
    assert_eq!(s, "ERROR");
    assert!(
        detail.contains("proc/meminfo") && detail.contains("lots"),
        "{detail}"
    );
    assert!(
        stderr.starts_with("error: could not check: board"),
        "{stderr}"
    );

    let missing = root.path().join("no-such-root");
    let (code, report, _) = doctor(&missing, &[]);
    assert_eq!(code, 8, "{report:#}");
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0]["name"], "root");
    assert_eq!(checks[0]["status"], "ERROR");
}

#[test]
fn the_text_report_has_a_line_per_check_and_the_verdict() {
    let root = Root::jetson("orin-nano-8gb").cuda().onnxruntime();
    let root_s = root.path().display().to_string();
    let model = demo_model();
    let run = support::jetvlm(&["doctor", "--root", &root_s, "--model", &model]);
    assert_eq!(run.code, Some(6));
    for name in CHECKS {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(name)),
            "no line for {name}:\n{}",
            run.stdout
        );
    }
    assert!(run.stdout.contains("  WARN  cameras"), "{}", run.stdout);
    assert!(run.stdout.contains("fix: connect a USB"), "{}", run.stdout);
    assert!(
        run.stdout
            .trim_end()
            .ends_with("verdict: ready-with-warnings (exit 6)"),
        "{}",
        run.stdout
    );
}
