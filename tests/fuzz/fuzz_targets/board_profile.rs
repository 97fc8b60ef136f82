//! Board profile YAML (`BoardProfile::from_yaml_str`, what `--boards-dir` and a board path
//! load) and board detection from system files. Input: the profile, then after NUL bytes the
//! `/proc/device-tree/model`, `/etc/nv_tegra_release` and `/proc/meminfo` of a fake root.
//! A profile that validates is planned against a fixed model (SmolVLM-256M's config) for
//! every KV preset: the planner returns a plan or an error, never overflows.

#![no_main]

use jetvlm_board::detect::SystemInfo;
use jetvlm_board::plan::{self, PlanOptions, Workload};
use jetvlm_board::{BoardProfile, BoardRegistry, KvPrecision, ModelSpec};
use jetvlm_fuzz::{scratch, split_nul, write};
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;

const MODEL: &[u8] = include_bytes!("../../fixtures/configs/smolvlm-256m/config.json");

fuzz_target!(|data: &[u8]| {
    static SPEC: OnceLock<ModelSpec> = OnceLock::new();
    let spec = SPEC.get_or_init(|| {
        let path = write("board/model/config.json", MODEL);
        ModelSpec::from_hf_config(&path).expect("the SmolVLM fixture config loads")
    });
    let (yaml, system) = split_nul(data);
    let (model, rest) = split_nul(system);
    let (release, meminfo) = split_nul(rest);

    let profile = std::str::from_utf8(yaml)
        .ok()
        .and_then(|t| BoardProfile::from_yaml_str(t, Path::new("board.yaml")).ok());
    if let Some(board) = &profile {
        let w = Workload {
            frames: 8,
            tokens_per_frame: spec.tokens_per_frame.unwrap_or(64),
            prompt_tokens: 64,
            answer_tokens: 128,
        };
        for kv in [
            KvPrecision::fp16(),
            KvPrecision::mixed(),
            KvPrecision::int4_all(),
        ] {
            let _ = plan::plan(board, spec, &w, &kv, &PlanOptions::default())
                .map(|p| p.fits)
                .map_err(|e| e.to_string());
        }
    }

    let root = scratch().join("board/root");
    write("board/root/proc/device-tree/model", model);
    write("board/root/etc/nv_tegra_release", release);
    write("board/root/proc/meminfo", meminfo);
    if let Ok(info) = SystemInfo::read(&root) {
        let mut boards = BoardRegistry::bundled().all().unwrap_or_default();
        boards.extend(profile);
        let _ = info.board(&boards).map(|b| b.name.clone());
    }
});
