//! The command line as a whole: every subcommand's `--help` (clap's debug assertions run on
//! each command as it is built, in this debug-assertion build), the flags several commands
//! share (the same value name and the same meaning everywhere they appear), and each exit
//! status of the table in `jetvlm --help` and docs/cli.md produced by the case it documents.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

/// One option as `--help` lists it.
#[derive(Clone, Debug)]
struct Opt {
    /// `None` for a switch.
    value: Option<String>,
    help: String,
}

/// The subcommand names under `Commands:` (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    section(help, "Commands:")
        .iter()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect()
}

/// The lines of a `--help` section (`Options:`), up to the next heading (a line that is not
/// indented); blank lines inside (clap's long help layout) are dropped.
fn section<'a>(help: &'a str, heading: &str) -> Vec<&'a str> {
    let mut lines = help.lines().skip_while(|l| *l != heading);
    if lines.next().is_none() {
        return Vec::new();
    }
    lines
        .take_while(|l| l.trim().is_empty() || l.starts_with(' '))
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// `--name` -> value name and help (continuation lines joined).
fn options(help: &str) -> BTreeMap<String, Opt> {
    let mut out: BTreeMap<String, Opt> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in section(help, "Options:") {
        let t = line.trim_start();
        let indent = line.len() - t.len();
        let flag = if t.starts_with("--") {
            Some(t)
        } else if t.starts_with('-') && t.get(2..4) == Some(", ") {
            t.get(4..)
        } else {
            None
        };
        match flag.filter(|_| indent <= 6) {
            Some(f) => {
                let (spec, help) = match f.find("  ") {
                    Some(i) => (&f[..i], f[i..].trim()),
                    None => (f, ""),
                };
                let mut words = spec.split_whitespace();
                let name = words
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("--")
                    .to_string();
                let value = words.next().map(|v| {
                    v.trim_end_matches("...")
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_string()
                });
                out.insert(
                    name.clone(),
                    Opt {
                        value,
                        help: words_of(help),
                    },
                );
                current = Some(name);
            }
            None => {
                if let Some(o) = current.as_ref().and_then(|c| out.get_mut(c)) {
                    o.help = words_of(&format!("{} {t}", o.help));
                }
            }
        }
    }
    out
}

/// `text` with its whitespace runs made single spaces.
fn words_of(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Every command path (`[]`, `["board"]`, `["board", "list"]`, ...) with its `--help`.
fn all_help() -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let run = support::jetvlm(&args);
        assert_eq!(
            run.code,
            Some(0),
            "jetvlm {args:?} failed (a clap debug assertion?):\n{}",
            run.stderr
        );
        assert!(run.stderr.is_empty(), "{args:?}: {}", run.stderr);
        for sub in subcommands(&run.stdout) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
        out.push((path, run.stdout));
    }
    out.sort();
    out
}

/// The flags that mean one thing wherever they appear: the value name every command uses
/// (`None`: a switch) and words its help must contain (case-insensitive; `a|b`: either).
const SHARED: &[(&str, Option<&str>, &[&str])] = &[
    ("model", Some("MODEL"), &["model package|decoder directory"]),
    ("config", Some("CONFIG"), &["runtime config"]),
    ("kv", Some("KV"), &["kv", "polic"]),
    (
        "kv-calibration",
        Some("KV_CALIBRATION"),
        &["calibration", "jetvlm calibrate"],
    ),
    ("device", Some("DEVICE"), &["cpu", "cuda"]),
    ("json", None, &["json"]),
    ("root", Some("DIR"), &["root"]),
    ("source", Some("SOURCE"), &["source uri"]),
    ("board", Some("BOARD"), &["board"]),
    ("boards-dir", Some("DIR"), &["board yaml"]),
    ("log", Some("LOG"), &["rust_log"]),
    ("log-format", Some("LOG_FORMAT"), &["text, json"]),
    (
        "ep",
        Some("EXECUTION_PROVIDERS"),
        &["execution providers", "tensorrt,cuda,cpu"],
    ),
    ("require-ep", None, &["execution provider"]),
    ("ort-library", Some("ORT_LIBRARY"), &["libonnxruntime.so"]),
];

/// Flags whose name is shared by commands that mean different things by it (each says
/// what it is in its help); every other flag on several commands must have one value name.
const DIFFERENT_MEANINGS: &[&str] = &[
    // A file for calibrate, a directory for synth, export and quantize, either for bundle.
    "out", // calibrate: the error target; bundle: the target triple.
    "target",
];

#[test]
fn every_subcommand_has_help_and_shared_flags_agree() {
    let helps = all_help();
    let names: Vec<String> = helps.iter().map(|(p, _)| p.join(" ")).collect();
    for expected in [
        "plan",
        "board detect",
        "bench kv",
        "doctor",
        "selftest",
        "ask",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "no `{expected}` in {names:?}"
        );
    }
    for (path, help) in &helps {
        if path.len() == 1 {
            assert!(
                help.contains("\nExamples:\n"),
                "`jetvlm {} --help` has no examples",
                path[0]
            );
        }
    }
    // Every option of every command, by flag.
    let mut by_flag: BTreeMap<String, Vec<(String, Opt)>> = BTreeMap::new();
    let mut problems = Vec::new();
    for (path, help) in &helps {
        let cmd = if path.is_empty() {
            "jetvlm".to_string()
        } else {
            path.join(" ")
        };
        for (flag, opt) in options(help) {
            if flag == "help" || flag == "version" {
                continue;
            }
            if opt.help.is_empty() || opt.help.starts_with('[') {
                problems.push(format!("{cmd} --{flag}: no help text"));
            }
            by_flag.entry(flag).or_default().push((cmd.clone(), opt));
        }
    }
    assert!(
        by_flag.get("log").map_or(0, Vec::len) == helps.len(),
        "--log is global: every command lists it"
    );
    for (flag, value, words) in SHARED {
        let Some(uses) = by_flag.get(*flag) else {
            problems.push(format!("--{flag}: no command has it"));
            continue;
        };
        for (cmd, opt) in uses {
            if opt.value.as_deref() != *value {
                problems.push(format!(
                    "{cmd} --{flag}: value name {:?}, the other commands use {value:?}",
                    opt.value
                ));
            }
            let help = opt.help.to_lowercase();
            for w in *words {
                if !w.split('|').any(|alt| help.contains(alt)) {
                    problems.push(format!(
                        "{cmd} --{flag}: help does not say `{w}`: {}",
                        opt.help
                    ));
                }
            }
        }
    }
    // Flattened from one definition: the same help everywhere.
    for flag in [
        "log",
        "log-format",
        "ep",
        "require-ep",
        "ort-library",
        "boards-dir",
    ] {
        let uses = &by_flag[flag];
        let first = &uses[0].1.help;
        for (cmd, opt) in uses {
            if opt.help != *first {
                problems.push(format!(
                    "{cmd} --{flag}: help `{}` differs from `{first}`",
                    opt.help
                ));
            }
        }
    }
    for (flag, uses) in &by_flag {
        if DIFFERENT_MEANINGS.contains(&flag.as_str()) {
            continue;
        }
        let mut values: Vec<&Option<String>> = uses.iter().map(|(_, o)| &o.value).collect();
        values.sort();
        values.dedup();
        if values.len() > 1 {
            let list: Vec<String> = uses
                .iter()
                .map(|(c, o)| format!("{c}: {:?}", o.value))
                .collect();
            problems.push(format!(
                "--{flag} has different value names: {}",
                list.join(", ")
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_exit_status_table_is_in_the_top_level_help() {
    let run = support::jetvlm(&["--help"]);
    let table: Vec<&str> = section(&run.stdout, "Exit status:");
    let codes: Vec<i32> = table
        .iter()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(codes, (0..=8).collect::<Vec<_>>(), "{}", run.stdout);
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/cli.md"))
            .unwrap();
    for line in table {
        let (code, meaning) = line.trim().split_once("  ").unwrap();
        let row = format!("| {code} | {} |", meaning.trim());
        assert!(docs.contains(&row), "docs/cli.md lacks the row `{row}`");
    }
}

fn fixture(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
        .display()
        .to_string()
}

/// Each status of the table (doctor's 6, 7 and 8 are tested in tests/doctor.rs), run on
/// the case it documents; the one error line on stderr for each failure.
#[test]
fn each_documented_exit_status_comes_from_its_case() {
    let smol = fixture("configs/smolvlm-256m");
    let qwen = fixture("configs/qwen2-vl-2b");
    let dir = tempfile::tempdir().unwrap();
    let bad_cfg = dir.path().join("runtime.yaml");
    std::fs::write(&bad_cfg, "window_frames: 0\n").unwrap();
    let bad_cfg = bad_cfg.display().to_string();
    let missing_ort = dir.path().join("libonnxruntime.so").display().to_string();
    let image = fixture("hf_vlms/smolvlm/probe.png");
    let missing_image = dir.path().join("frame.png").display().to_string();
    let cases: Vec<(i32, Vec<&str>, &str)> = vec![
        (0, vec!["board", "list"], ""),
        (
            0,
            vec!["plan", "--board", "orin-nano-8gb", "--model", &smol],
            "",
        ),
        // A library the command needs is not there.
        (
            1,
            vec![
                "ask",
                "--image",
                &image,
                "--ort-library",
                &missing_ort,
                "what is there?",
            ],
            "ONNX Runtime",
        ),
        (2, vec!["plan", "--frobnicate"], "unexpected argument"),
        (2, vec!["plan", "--board", "orin-nano-8gb"], "--model"),
        (
            2,
            vec![
                "ask",
                "--image",
                &image,
                "--kv",
                "fp16",
                "--kv-calibration",
                "c.yaml",
                "q",
            ],
            "cannot be used with",
        ),
        (
            3,
            vec!["plan", "--board", "orin-pico", "--model", &smol],
            "unknown board `orin-pico`",
        ),
        (
            3,
            vec!["ask", "--image", &image, "--config", &bad_cfg, "q"],
            "window_frames",
        ),
        (3, vec!["ask", "--image", &missing_image, "q"], "frame.png"),
        (
            3,
            vec![
                "plan",
                "--board",
                "orin-nano-8gb",
                "--model",
                "/nonexistent/model",
            ],
            "/nonexistent/model",
        ),
        (
            4,
            vec![
                "plan",
                "--board",
                "orin-nano-8gb",
                "--model",
                &qwen,
                "--frames",
                "400",
                "--kv",
                "fp16",
            ],
            "does not fit",
        ),
    ];
    for (code, args, needle) in &cases {
        let run = support::jetvlm(args);
        assert_eq!(
            run.code,
            Some(*code),
            "jetvlm {args:?}: stdout {}\nstderr {}",
            run.stdout,
            run.stderr
        );
        assert!(
            run.stderr.contains(needle),
            "jetvlm {args:?}: {}",
            run.stderr
        );
        if *code == 0 {
            assert!(run.stderr.is_empty(), "jetvlm {args:?}: {}", run.stderr);
        } else if *code != 2 {
            let lines: Vec<&str> = run.stderr.lines().filter(|l| !l.is_empty()).collect();
            assert_eq!(lines.len(), 1, "one error line: {}", run.stderr);
            assert!(lines[0].starts_with("error: "), "{}", run.stderr);
        }
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// A package's `jetvlm.yaml` is read through one schema: `jetvlm plan` refuses a bad field
/// with the error line `jetvlm ask` gives (the file, the count, each field and its problem),
/// including a field the planner itself never uses (`vision.mean`).
#[test]
fn plan_and_ask_refuse_a_bad_manifest_with_the_same_fields() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(Path::new(&fixture("vlm")), dir.path());
    let manifest = dir.path().join("jetvlm.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let broken = text
        .replace(
            "mean: [0.48145466, 0.4578275, 0.40821073]",
            "mean: [0.48145466, 0.4578275]",
        )
        .replace(
            "  tokens_per_frame: 16\n",
            "  tokens_per_frame: 16\n  tiles: {frame: {height: 64, width: 64}, rows: 0, cols: 2}\n",
        );
    assert_eq!(
        broken.matches("tiles:").count(),
        1 + text.matches("tiles:").count()
    );
    assert!(!broken.contains("0.40821073"));
    std::fs::write(&manifest, broken).unwrap();
    let pkg = dir.path().display().to_string();
    let image = fixture("vlm/image.png");
    let plan = support::jetvlm(&["plan", "--board", "orin-nano-8gb", "--model", &pkg]);
    let ask = support::jetvlm(&["ask", "--model", &pkg, "--image", &image, "what is there?"]);
    for (name, run) in [("plan", &plan), ("ask", &ask)] {
        assert_eq!(run.code, Some(3), "{name}: {}", run.stderr);
    }
    let line = plan.stderr.trim().strip_prefix("error: ").unwrap_or("");
    assert!(
        line.starts_with(&format!("{}: 2 problem(s); ", manifest.display()))
            && line.contains("`vision.mean`: needs 3 values (R, G, B), got 2")
            && line.contains("`vision.tiles.rows`: rows 0 and cols 2"),
        "plan: {}",
        plan.stderr
    );
    assert!(
        ask.stderr.trim().ends_with(line),
        "ask: {}\nplan: {}",
        ask.stderr,
        plan.stderr
    );
}

/// A closed stdout ends a command as it ends a Unix tool (`jetvlm plan ... | head -1`): killed
/// by SIGPIPE, nothing on stderr; not a panic (status 101) nor an error line.
#[test]
fn a_closed_stdout_ends_commands_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let smol = fixture("configs/smolvlm-256m");
    let commands: [&[&str]; 3] = [
        &["plan", "--board", "orin-nano-8gb", "--model", &smol],
        &[
            "plan",
            "--board",
            "orin-nano-8gb",
            "--model",
            &smol,
            "--json",
        ],
        &["board", "list", "--json"],
    ];
    for args in commands {
        // The reading end is closed before the command writes its first line.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut child = Command::new(env!("CARGO_BIN_EXE_jetvlm"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("jetvlm {args:?} ran past 60 s with its stdout closed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(
            (status.code(), status.signal()),
            (None, Some(13)),
            "jetvlm {args:?}: {status:?}, stderr: {stderr}"
        );
        assert!(stderr.is_empty(), "jetvlm {args:?}: {stderr}");
    }
}
