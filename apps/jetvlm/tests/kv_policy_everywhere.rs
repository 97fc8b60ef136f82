//! Every KV policy the README and docs/ show, through every command that takes one: `plan`,
//! `watch`, `ask`, `generate`, `bench decode` (`--kv`) and `bench kv` (`--mixed`) read it with
//! one grammar, so they report the same policy in effect (or refuse it with the same message).
//!
//! The commands on the demo package (`plan --model models/demo`, `watch`, `ask`) report the
//! policy with the package's block sizes where the spelling names none; the commands on its
//! bare decoder (`plan --model models/demo/decoder`, `generate`, `bench`) report the policy
//! as spelled. Both are fitted to the head dim.

use jetvlm_kvcache::KvPolicy;
use std::path::{Path, PathBuf};
use std::process::Command;

const PRESETS: [&str; 5] = ["fp16", "mixed", "int4-all", "int8-frames", "int2-frames"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn demo() -> PathBuf {
    root().join("models/demo")
}

/// Runs `jetvlm args`; (success, stdout, stderr).
fn jetvlm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_jetvlm"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .expect("run the jetvlm binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A policy spelling: a preset name, alone or followed by `:`, with no spaces.
fn policy_like(s: &str) -> bool {
    !s.is_empty()
        && !s.contains(char::is_whitespace)
        && PRESETS
            .iter()
            .any(|p| s == *p || s.starts_with(&format!("{p}:")))
}

/// Policy strings in `text`: inline code spans that are policy spellings, and the value of
/// every `--kv X` / `--kv=X` (`f32`, the exact reference cache of the runtime commands, is
/// not a KV policy and is left out).
fn policies_in(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        for (i, piece) in line.split('`').enumerate() {
            if i % 2 == 1 && policy_like(piece.trim()) {
                found.push(piece.trim().to_string());
            }
        }
    }
    let mut rest = text;
    while let Some(at) = rest.find("--kv") {
        rest = &rest[at + 4..];
        let Some(value) = rest.strip_prefix(' ').or_else(|| rest.strip_prefix('=')) else {
            continue;
        };
        let end = value
            .find(|c: char| c.is_whitespace() || "`|\"')".contains(c))
            .unwrap_or(value.len());
        let v = value[..end].trim_end_matches(['.', ',', ';', ':']);
        if !v.is_empty() && v != "f32" && !v.starts_with('-') {
            found.push(v.to_string());
        }
    }
    found
}

fn documented_policies() -> Vec<(String, String)> {
    let mut files = vec![root().join("README.md")];
    if let Ok(dir) = std::fs::read_dir(root().join("docs")) {
        let mut docs: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "md"))
            .collect();
        docs.sort();
        files.extend(docs);
    }
    let mut all: Vec<(String, String)> = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        for p in policies_in(&text) {
            if !all.iter().any(|(q, _)| *q == p) {
                all.push((p, name.clone()));
            }
        }
    }
    all
}

/// The first JSON value of `stdout` (one pretty object, or the first of JSON lines).
fn json(stdout: &str, what: &str) -> serde_json::Value {
    serde_json::Deserializer::from_str(stdout)
        .into_iter::<serde_json::Value>()
        .next()
        .unwrap_or_else(|| panic!("{what}: no JSON in {stdout:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}: {stdout}"))
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// What each command says about `--kv policy`: Ok(the policy it reports) or Err(stderr).
struct Readings {
    plan_package: Result<serde_json::Value, String>,
    watch: Result<String, String>,
    ask: Result<String, String>,
    plan_decoder: Result<serde_json::Value, String>,
    generate: Result<String, String>,
    bench: Result<String, String>,
    /// `bench decode --model models/demo` (the package).
    bench_package: Result<String, String>,
    /// `bench kv` takes its policy as `--mixed` (compared with FP16).
    bench_kv: Result<String, String>,
}

fn read_everywhere(policy: &str) -> Readings {
    let model = path(&demo());
    let decoder = path(&demo().join("decoder"));
    let image = path(&root().join("tests/fixtures/vlm/image.png"));
    let run_with = |flag: &str, args: &[&str]| -> Result<String, String> {
        let (ok, stdout, stderr) = jetvlm(&[args, &[flag, policy][..]].concat());
        assert!(
            !stderr.contains("panicked"),
            "{args:?} --kv {policy}: {stderr}"
        );
        if ok { Ok(stdout) } else { Err(stderr) }
    };
    let run = |args: &[&str]| run_with("--kv", args);
    let plan = |model: &str, extra: &[&str]| {
        let base = [
            "plan",
            "--board",
            "orin-nano-8gb",
            "--model",
            model,
            "--frames",
            "2",
            "--json",
        ];
        run(&[&base[..], extra].concat()).map(|s| json(&s, "plan"))
    };
    let field = |r: Result<String, String>,
                 what: &str,
                 get: &dyn Fn(&serde_json::Value) -> &serde_json::Value| {
        r.map(|s| {
            let v = json(&s, what);
            get(&v)
                .as_str()
                .unwrap_or_else(|| panic!("{what} --kv {policy}: no policy in {v}"))
                .to_string()
        })
    };
    Readings {
        plan_package: plan(&model, &[]),
        watch: field(
            run(&[
                "watch",
                "synthetic://scene?seed=3&pace=0",
                "--model",
                &model,
                "--frames",
                "1",
                "--window",
                "1",
                "--max-tokens",
                "2",
                "--json",
            ]),
            "watch",
            &|v| &v["kv_policy"],
        ),
        ask: run(&[
            "ask",
            "--model",
            &model,
            "--image",
            &image,
            "--max-tokens",
            "2",
            "--json",
        ])
        .map(|s| {
            json(&s, "ask")["kv_policy"]
                .as_str()
                .unwrap_or_else(|| panic!("ask --kv {policy}: no kv_policy in {s}"))
                .to_string()
        }),
        plan_decoder: plan(&decoder, &["--tokens-per-frame", "16"]),
        generate: field(
            run(&[
                "generate",
                "--model",
                &decoder,
                "--prompt-ids",
                "2,5,6,7",
                "--max-tokens",
                "2",
                "--greedy",
                "--json",
            ]),
            "generate",
            &|v| &v["kv"],
        ),
        bench: field(
            run(&[
                "bench",
                "decode",
                "--model",
                &decoder,
                "--context",
                "48",
                "--frame-tokens",
                "16",
                "--steps",
                "1",
                "--prefill",
                "real",
                "--no-flush",
                "--json",
            ]),
            "bench decode",
            &|v| &v["rows"][0]["kv"],
        ),
        bench_package: field(
            run(&[
                "bench",
                "decode",
                "--model",
                &model,
                "--context",
                "48",
                "--frame-tokens",
                "16",
                "--steps",
                "1",
                "--prefill",
                "real",
                "--no-flush",
                "--json",
            ]),
            "bench decode",
            &|v| &v["rows"][0]["kv"],
        ),
        bench_kv: field(
            run_with(
                "--mixed",
                &[
                    "bench",
                    "kv",
                    "--context",
                    "64",
                    "--layers",
                    "6",
                    "--heads",
                    "3",
                    "--kv-heads",
                    "1",
                    "--head-dim",
                    "64",
                    "--frame-tokens",
                    "16",
                    "--sweeps",
                    "1",
                    "--min-working-set-mib",
                    "1",
                    "--json",
                ],
            ),
            "bench kv",
            &|v| &v["mixed"]["policy"],
        ),
    }
}

#[test]
fn the_docs_show_policies_of_every_form() {
    let all = documented_policies();
    let names: Vec<&str> = all.iter().map(|(p, _)| p.as_str()).collect();
    // The scan finds the presets and the `key=value` forms the docs describe.
    assert!(names.contains(&"mixed"), "{names:?}");
    assert!(names.iter().any(|p| p.contains(':')), "{names:?}");
    // Every one that parses prints a name that parses back to it.
    for (p, file) in &all {
        if let Ok(policy) = p.parse::<KvPolicy>() {
            let back: KvPolicy = policy.name().parse().unwrap();
            assert_eq!(back, policy, "{p} ({file})");
        }
    }
}

#[test]
fn extraction_finds_code_spans_and_flags() {
    let text = "Use `mixed` or `mixed:bits=2,group=32`; not `mixed_policy` nor `fp16 x`.\n\
                jetvlm watch --kv int8-frames --kv-calibration c.yaml, `--kv=mixed:salient=on`\n\
                | `generate --kv f32` | --kv fp16. --kv mixed:sinks=0)\n";
    assert_eq!(
        policies_in(text),
        [
            "mixed",
            "mixed:bits=2,group=32",
            "int8-frames",
            "mixed:salient=on",
            "fp16",
            "mixed:sinks=0"
        ]
    );
}

#[test]
fn every_documented_policy_reads_the_same_in_every_command() {
    let package = jetvlm(&[
        "plan",
        "--board",
        "orin-nano-8gb",
        "--model",
        &path(&demo()),
        "--frames",
        "2",
        "--json",
    ]);
    assert!(package.0, "{}", package.2);
    let package: KvPolicy = json(&package.1, "plan")["kv_policy"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut all = documented_policies();
    assert!(!all.is_empty());
    // Spellings the planner and the cache once read differently, and refusals.
    for extra in [
        "mixed:keys=per-channel",
        "MIXED:Bits=2,Group=32",
        "int4-all:keys=channel",
        "mixed:group=48",
        "int4-frames",
    ] {
        all.push((extra.to_string(), "this test".to_string()));
    }
    for (p, file) in &all {
        eprintln!("{file}: {p}");
    }
    let readings: Vec<(String, String, Readings)> = std::thread::scope(|s| {
        let handles: Vec<_> = all
            .iter()
            .map(|(p, file)| s.spawn(move || (p.clone(), file.clone(), read_everywhere(p))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (spelled, file, r) in &readings {
        let at = format!("--kv {spelled} (from {file})");
        match spelled.parse::<KvPolicy>() {
            Ok(p) => {
                let bare = p.clone().in_effect(spelled, None, 64).name();
                let packaged = p.clone().in_effect(spelled, Some(&package), 64).name();
                let ok = |what: &str, r: &Result<String, String>| -> String {
                    r.clone()
                        .unwrap_or_else(|e| panic!("{at}: {what} refused it: {e}"))
                };
                let plan_pkg = r
                    .plan_package
                    .clone()
                    .unwrap_or_else(|e| panic!("{at}: plan refused it: {e}"));
                let plan_dec = r
                    .plan_decoder
                    .clone()
                    .unwrap_or_else(|e| panic!("{at}: plan (decoder) refused it: {e}"));
                // The package's commands.
                assert_eq!(plan_pkg["kv_policy"], packaged.as_str(), "{at}: plan");
                assert_eq!(ok("watch", &r.watch), packaged, "{at}: watch");
                assert_eq!(ok("ask", &r.ask), packaged, "{at}: ask");
                assert_eq!(
                    ok("bench decode (package)", &r.bench_package),
                    packaged,
                    "{at}: bench decode on the package"
                );
                // The bare decoder's commands.
                assert_eq!(plan_dec["kv_policy"], bare.as_str(), "{at}: plan (decoder)");
                assert_eq!(ok("generate", &r.generate), bare, "{at}: generate");
                assert_eq!(ok("bench decode", &r.bench), bare, "{at}: bench decode");
                assert_eq!(ok("bench kv", &r.bench_kv), bare, "{at}: bench kv");
                // Block sizes do not change what the planner charges.
                assert_eq!(
                    plan_pkg["kv_policy_description"], plan_dec["kv_policy_description"],
                    "{at}"
                );
                assert_eq!(plan_pkg["kv"], plan_dec["kv"], "{at}");
                // The comparison table has the policy in effect as one of its rows.
                for plan in [&plan_pkg, &plan_dec] {
                    let rows = plan["max_frames_by_policy"].as_array().unwrap();
                    assert_eq!(
                        rows.iter()
                            .filter(|row| row["policy"] == plan["kv_policy"])
                            .count(),
                        1,
                        "{at}: {rows:?}"
                    );
                }
            }
            Err(e) => {
                let message = e.to_string();
                assert!(message.contains(spelled.as_str()), "{message}");
                let all = [
                    ("plan", r.plan_package.as_ref().map(|_| ())),
                    ("watch", r.watch.as_ref().map(|_| ())),
                    ("ask", r.ask.as_ref().map(|_| ())),
                    ("plan (decoder)", r.plan_decoder.as_ref().map(|_| ())),
                    ("generate", r.generate.as_ref().map(|_| ())),
                    ("bench decode", r.bench.as_ref().map(|_| ())),
                    ("bench kv", r.bench_kv.as_ref().map(|_| ())),
                    (
                        "bench decode (package)",
                        r.bench_package.as_ref().map(|_| ()),
                    ),
                ];
                for (what, res) in all {
                    match res {
                        Ok(()) => panic!("{at}: {what} accepted what the grammar refuses: {e}"),
                        Err(stderr) => assert!(
                            stderr.contains(&message),
                            "{at}: {what} does not give the grammar's message\n  \
                             want: {message}\n  got: {stderr}"
                        ),
                    }
                }
            }
        }
    }
}
