//! `jetvlm-analytics` end to end on the bundled demo model and a synthetic scene: the
//! events it prints are exactly the transitions of each rule's answers (recomputed here from
//! `--all`), the answers match the scene's ground truth, and bad input is one line naming
//! the file and what is wrong.

use std::path::{Path, PathBuf};
use std::process::Command;

fn demo_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_jetvlm-analytics"))
        .args(args)
        .env_remove("JETVLM_MODEL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const RULES: &str = "source: synthetic://scene?seed=3&pace=0
frames: 10
rules:
  - {name: left, question: \"how many objects are in the left zone?\", when: changes}
  - {name: crowded, question: \"how many objects are there?\", when: {at_least: 4}}
  - {name: red-square, question: \"is there a red square?\", when: {equals: \"yes\"}}
";

/// Events from a rule's answers, written out independently of the app's monitor.
fn expected_events(condition: &str, answers: &[String]) -> Vec<Option<&'static str>> {
    let holds = |a: &str| match condition {
        "at_least_4" => a.parse::<f64>().is_ok_and(|n| n >= 4.0),
        "equals_yes" => a == "yes",
        _ => unreachable!(),
    };
    let mut out = Vec::new();
    let mut active = false;
    for (i, a) in answers.iter().enumerate() {
        out.push(match condition {
            "changes" if i == 0 => Some("initial"),
            "changes" => (answers[i - 1] != *a).then_some("change"),
            _ => {
                let now = holds(a);
                let e = match (active, now) {
                    (false, true) => Some("alert"),
                    (true, false) => Some("clear"),
                    _ => None,
                };
                active = now;
                e
            }
        });
    }
    out
}

#[test]
fn events_are_the_transitions_of_each_rules_answers() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, RULES).unwrap();
    let model = demo_model();
    let (ok, all, err) = run(&[
        rules.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--all",
    ]);
    assert!(ok, "{err}");
    let records: Vec<serde_json::Value> = all
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 30, "10 frames x 3 rules with --all");
    let (mut judged, mut right) = (0, 0);
    for (name, condition) in [
        ("left", "changes"),
        ("crowded", "at_least_4"),
        ("red-square", "equals_yes"),
    ] {
        let rows: Vec<&serde_json::Value> = records.iter().filter(|r| r["rule"] == name).collect();
        assert_eq!(rows.len(), 10, "{name}");
        let answers: Vec<String> = rows
            .iter()
            .map(|r| r["answer"].as_str().unwrap().to_string())
            .collect();
        let events: Vec<Option<&str>> = rows.iter().map(|r| r["event"].as_str()).collect();
        assert_eq!(
            events,
            expected_events(condition, &answers),
            "{name}: {answers:?}"
        );
        for (i, r) in rows.iter().enumerate().skip(1) {
            assert_eq!(r["previous"].as_str(), Some(answers[i - 1].as_str()));
        }
        for r in &rows {
            if let Some(t) = r["truth"].as_str() {
                judged += 1;
                right += usize::from(r["answer"].as_str() == Some(t));
            }
        }
    }
    assert!(judged >= 25, "{judged} answers with ground truth");
    assert!(
        right * 10 >= judged * 9,
        "{right}/{judged} match the ground truth"
    );
    // Without --all only the answers that make an event are printed, the same ones.
    let (ok, events, _) = run(&[rules.to_str().unwrap(), "--model", model.to_str().unwrap()]);
    assert!(ok);
    let with_event: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r.get("event").is_some())
        .collect();
    assert!(!with_event.is_empty());
    let printed: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(printed.len(), with_event.len());
    for (a, b) in printed.iter().zip(&with_event) {
        for key in ["frame", "rule", "answer", "event"] {
            assert_eq!(a[key], b[key], "{key}");
        }
    }
    assert!(
        err.contains("10 frames") && err.contains("red-square"),
        "{err}"
    );
}

#[test]
fn bad_input_is_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let (ok, out, err) = run(&[missing.to_str().unwrap()]);
    assert!(!ok && out.is_empty());
    assert!(
        err.contains("missing.yaml") && err.lines().count() == 1,
        "{err}"
    );

    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, RULES.replace("changes", "sometimes")).unwrap();
    let (ok, _, err) = run(&[rules.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("rules.yaml") && err.contains("rules[0].when"),
        "{err}"
    );

    // No model anywhere.
    std::fs::write(&rules, RULES).unwrap();
    let (ok, _, err) = run(&[rules.to_str().unwrap()]);
    assert!(!ok && err.contains("no model"), "{err}");
    // A model directory that is not a package.
    let (ok, _, err) = run(&[
        rules.to_str().unwrap(),
        "--model",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!ok && err.contains(dir.path().to_str().unwrap()), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_rule_that_cannot_be_asked_is_reported_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    // A question far longer than the demo model's context.
    let long = "is there a red square? ".repeat(4000);
    std::fs::write(
        &rules,
        format!(
            "source: synthetic://scene?seed=3&pace=0
frames: 3
rules:
  - {{name: too-long, question: \"{long}\", when: changes}}
  - {{name: left, question: \"how many objects are in the left zone?\", when: changes}}
"
        ),
    )
    .unwrap();
    let model = demo_model();
    let (ok, out, err) = run(&[
        rules.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--all",
    ]);
    assert!(ok, "{err}");
    let records: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |name: &str| -> Vec<&serde_json::Value> {
        records.iter().filter(|r| r["rule"] == name).collect()
    };
    // The good rule answered every frame; the long one has an error line per frame.
    assert_eq!(of("left").len(), 3, "{out}");
    assert!(of("left").iter().all(|r| r["answer"].is_string()));
    let bad = of("too-long");
    assert_eq!(bad.len(), 3, "{out}");
    assert!(
        bad.iter()
            .all(|r| r["error"].is_string() && r.get("answer").is_none())
    );
    // Reported on stderr once, naming the rule, and counted in the summary.
    assert_eq!(err.matches("rule too-long: cannot ask").count(), 1, "{err}");
    assert!(err.contains("3 errors"), "{err}");
}
