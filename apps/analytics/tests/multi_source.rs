//! Several synthetic cameras in one `jetvlm-analytics` process: each source's answers are
//! exactly those of a single-source run on the same scene (its own window and KV cache;
//! the demo model serves all), so its accuracy against the scene's ground truth is the
//! same; the schedule keeps the sources level; the KV budget is checked at start; a source
//! that ends or fails is reported and the others go on.

mod common;

use common::{demo_model, run};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(240);

const RULES: &str =
    "  - {name: left, question: \"how many objects are in the left zone?\", when: changes}
  - {name: crowded, question: \"how many objects are there?\", when: {at_least: 4}}
";

fn scene(seed: u64) -> String {
    format!("synthetic://scene?seed={seed}&pace=0")
}

fn write_rules(dir: &Path, file: &str, sources: &[(String, String)], extra: &str) -> String {
    let mut text = String::from("frames: 8\nwindow: 3\n");
    text += extra;
    text += "sources:\n";
    for (name, uri) in sources {
        text += &format!("  - {{name: {name}, uri: \"{uri}\"}}\n");
    }
    text += "rules:\n";
    text += RULES;
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// (source, frame, rule) -> (answer, truth) from a `--all` run.
type Answers = BTreeMap<(String, u64, String), (String, Option<String>)>;

fn answers(records: &[Value]) -> Answers {
    records
        .iter()
        .filter(|r| r["answer"].is_string())
        .map(|r| {
            (
                (
                    r["source"].as_str().unwrap().to_string(),
                    r["frame"].as_u64().unwrap(),
                    r["rule"].as_str().unwrap().to_string(),
                ),
                (
                    r["answer"].as_str().unwrap().to_string(),
                    r["truth"].as_str().map(str::to_string),
                ),
            )
        })
        .collect()
}

/// Right and judged answers of one source.
fn accuracy(a: &Answers, source: &str) -> (usize, usize) {
    let judged: Vec<_> = a
        .iter()
        .filter(|((s, _, _), (_, t))| s == source && t.is_some())
        .collect();
    let right = judged
        .iter()
        .filter(|(_, (ans, t))| t.as_deref() == Some(ans.as_str()))
        .count();
    (right, judged.len())
}

fn run_all(rules: &str) -> (Answers, Vec<Value>, String) {
    let model = demo_model();
    let out = run(&[rules, "--model", model.to_str().unwrap(), "--all"], LIMIT);
    assert!(out.ok, "{}", out.stderr);
    let records = out.records();
    (answers(&records), records, out.stderr)
}

#[test]
fn two_and_four_sources_answer_as_each_does_alone() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = [3u64, 5, 7, 11];
    // Each scene alone.
    let mut alone = Answers::new();
    for &seed in &seeds {
        let name = format!("cam{seed}");
        let rules = write_rules(
            dir.path(),
            &format!("one-{seed}.yaml"),
            &[(name, scene(seed))],
            "",
        );
        let (a, _, _) = run_all(&rules);
        assert_eq!(a.len(), 16, "8 frames x 2 rules");
        alone.extend(a);
    }
    for (n, schedule) in [
        (2usize, "round_robin"),
        (4, "round_robin"),
        (4, "oldest_first"),
    ] {
        let sources: Vec<(String, String)> = seeds[..n]
            .iter()
            .map(|&s| (format!("cam{s}"), scene(s)))
            .collect();
        let rules = write_rules(
            dir.path(),
            &format!("many-{n}-{schedule}.yaml"),
            &sources,
            &format!("schedule: {schedule}\n"),
        );
        let (together, records, stderr) = run_all(&rules);
        assert_eq!(together.len(), 16 * n, "{stderr}");
        for (name, _) in &sources {
            let mine = |a: &Answers| -> Answers {
                a.iter()
                    .filter(|((s, _, _), _)| s == name)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            };
            // The same answers on the same frames as the source alone: its own window.
            assert_eq!(
                mine(&together),
                mine(&alone),
                "{name} with {n} sources ({schedule})"
            );
            let (right, judged) = accuracy(&together, name);
            assert_eq!((right, judged), accuracy(&alone, name), "{name}");
            assert!(
                judged >= 12 && right * 10 >= judged * 8,
                "{name}: {right}/{judged}"
            );
        }
        // Fair: while all run, no source gets more than two frames ahead of another. Counted
        // from the answer that brought every source in: before its first frame exists (its
        // capture thread not yet scheduled on a loaded machine) a source cannot be served, and
        // `oldest_first` rightly serves the others meanwhile.
        let mut done: BTreeMap<&str, u64> = sources.iter().map(|(s, _)| (s.as_str(), 0)).collect();
        let mut last: BTreeMap<&str, u64> = BTreeMap::new();
        let mut base: Option<BTreeMap<&str, u64>> = None;
        for r in records.iter().filter(|r| r["answer"].is_string()) {
            let (s, f) = (r["source"].as_str().unwrap(), r["frame"].as_u64().unwrap());
            if last.insert(s, f) != Some(f) {
                *done.get_mut(s).unwrap() += 1;
            }
            if base.is_none() && done.values().all(|&n| n > 0) {
                base = Some(done.clone());
            }
            if let Some(b) = &base {
                let since: Vec<u64> = done.iter().map(|(k, n)| n - b[k]).collect();
                let (lo, hi) = (since.iter().min().unwrap(), since.iter().max().unwrap());
                assert!(
                    hi - lo <= 2,
                    "{schedule}: {done:?} (all running from {b:?})"
                );
            }
        }
        assert!(
            base.is_some(),
            "{schedule}: a source never answered: {done:?}"
        );
        // Every event names its source and carries a run-wide sequence number.
        let seqs: Vec<u64> = records.iter().filter_map(|r| r["seq"].as_u64()).collect();
        assert!(!seqs.is_empty());
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        // The summary reports each source's KV, within what the planner charged.
        for (name, _) in &sources {
            let line = stderr
                .lines()
                .find(|l| l.contains(&format!("source {name}: 8 frames")))
                .unwrap_or_else(|| panic!("{stderr}"));
            let num = |after: &str| -> u64 {
                let rest = &line[line.find(after).unwrap() + after.len()..];
                rest.split(' ').next().unwrap().parse().unwrap()
            };
            let (used, planned) = (num("KV at most "), num("(planned "));
            assert!(used > 0 && used <= planned, "{line}");
        }
    }
}

#[test]
fn the_kv_budget_is_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let sources: Vec<(String, String)> = [3u64, 5, 7, 11]
        .iter()
        .map(|&s| (format!("cam{s}"), scene(s)))
        .collect();
    let model = demo_model();
    // What one window costs, from the start line.
    let probe = write_rules(dir.path(), "probe.yaml", &sources[..1], "");
    let out = run(
        &[&probe, "--model", model.to_str().unwrap(), "--frames", "1"],
        LIMIT,
    );
    assert!(out.ok, "{}", out.stderr);
    let per_bytes: f64 = out
        .stderr
        .split("KV ")
        .find_map(|s| s.split(" B per source").next()?.parse().ok())
        .unwrap_or_else(|| panic!("{}", out.stderr));
    let per_mib = per_bytes / (1u64 << 20) as f64;
    // Room for three windows, not four: refused, one line naming the file and the field.
    let tight = write_rules(
        dir.path(),
        "tight.yaml",
        &sources,
        &format!("kv_budget: {{total_mib: {}}}\n", per_mib * 3.5),
    );
    let out = run(&[&tight, "--model", model.to_str().unwrap()], LIMIT);
    assert!(!out.ok && out.stdout.is_empty());
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("tight.yaml") && out.stderr.contains("kv_budget.total_mib: 4 sources"),
        "{}",
        out.stderr
    );
    let small = write_rules(
        dir.path(),
        "small.yaml",
        &sources[..1],
        &format!("kv_budget: {{per_source_mib: {}}}\n", per_mib * 0.5),
    );
    let out = run(&[&small, "--model", model.to_str().unwrap()], LIMIT);
    assert!(
        !out.ok && out.stderr.contains("kv_budget.per_source_mib"),
        "{}",
        out.stderr
    );
    // Enough for four: runs.
    let fits = write_rules(
        dir.path(),
        "fits.yaml",
        &sources,
        &format!(
            "kv_budget: {{per_source_mib: {}, total_mib: {}}}\n",
            per_mib * 1.01,
            per_mib * 4.1
        ),
    );
    let out = run(
        &[&fits, "--model", model.to_str().unwrap(), "--frames", "1"],
        LIMIT,
    );
    assert!(out.ok, "{}", out.stderr);
}

#[test]
fn a_source_that_ends_or_fails_is_reported_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let sources = vec![
        ("steady".to_string(), scene(3)),
        (
            "short".to_string(),
            "synthetic://scene?seed=5&pace=0&frames=3".to_string(),
        ),
        ("broken".to_string(), format!("dir://{}", missing.display())),
    ];
    let rules = write_rules(dir.path(), "mixed.yaml", &sources, "");
    let model = demo_model();
    let out = run(&[&rules, "--model", model.to_str().unwrap()], LIMIT);
    assert!(out.ok, "{}", out.stderr);
    let records = out.records();
    let of = |source: &str, event: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["source"] == source && r["event"] == event)
            .collect()
    };
    let failed = of("broken", "source_failed");
    assert_eq!(failed.len(), 1, "{}", out.stdout);
    assert!(
        failed[0]["error"].as_str().unwrap().contains("no-such-dir"),
        "{failed:?}"
    );
    let ended = of("short", "source_ended");
    assert_eq!(ended.len(), 1, "{}", out.stdout);
    assert_eq!(ended[0]["frames"].as_u64(), Some(3));
    // The steady source ran its 8 frames.
    assert!(
        out.stderr.contains("source steady: 8 frames, 8 analysed"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("source short: 3 frames, 3 analysed (ended)"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("source broken: 0 frames"),
        "{}",
        out.stderr
    );

    // When no source opens: one line naming each.
    let all_bad = write_rules(
        dir.path(),
        "bad.yaml",
        &[
            ("a".into(), "rtsp-ish://x".into()),
            ("b".into(), format!("dir://{}", missing.display())),
        ],
        "",
    );
    let out = run(&[&all_bad, "--model", model.to_str().unwrap()], LIMIT);
    assert!(!out.ok);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("source a: opening rtsp-ish://x") && out.stderr.contains("source b:"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"));
}

#[test]
fn bad_sources_sections_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    for (text, want) in [
        (
            "sources: [{name: a, uri: x}]\nsource: y\n",
            "either `source` or `sources`",
        ),
        ("frames: 1\n", "no frame source"),
        (
            "sources: [{name: a, uri: x}, {name: a, uri: y}]\n",
            "sources[1].name: `a` is used twice",
        ),
        ("sources: [{name: \"a/b\", uri: x}]\n", "sources[0].name"),
        ("sources: [{name: a, uri: \"\"}]\n", "sources[0].uri"),
        ("sources: [{name: a, url: x}]\n", "url"),
        ("source: x\nschedule: fastest\n", "schedule"),
        (
            "source: x\nkv_budget: {total_mib: -1}\n",
            "kv_budget.total_mib",
        ),
        (
            "source: x\nsinks: {mqtt: {url: \"http://h\"}}\n",
            "sinks.mqtt.url",
        ),
        (
            "source: x\nsinks: {mqtt: {url: \"mqtt://h\", qos: 2}}\n",
            "sinks.mqtt.qos",
        ),
        (
            "source: x\nsinks: {webhook: {url: \"http://h/x\", retries: 1000}}\n",
            "sinks.webhook.retries",
        ),
        ("source: x\nsinks: {kafka: {}}\n", "kafka"),
    ] {
        std::fs::write(&path, format!("{text}rules:\n{RULES}")).unwrap();
        let out = run(&[path.to_str().unwrap()], Duration::from_secs(30));
        assert!(!out.ok, "{text}");
        assert_eq!(out.stderr.lines().count(), 1, "{text}: {}", out.stderr);
        assert!(
            out.stderr.contains("rules.yaml") && out.stderr.contains(want),
            "{text}: {}",
            out.stderr
        );
    }
}
