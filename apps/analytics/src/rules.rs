//! The rules file and what a rule does with each answer.
//!
//! ```yaml
//! model: ../../../models/demo        # relative to this file
//! source: synthetic://scene?seed=3&pace=0   # one camera (named `camera`), or:
//! # sources:                          # several cameras, one loaded model
//! #   - { name: gate, uri: "rtsp://10.0.0.5/stream" }
//! #   - { name: dock, uri: "synthetic://scene?seed=4" }
//! # schedule: round_robin             # or oldest_first
//! # kv_budget: { per_source_mib: 8, total_mib: 32 }
//! # sinks: { mqtt: { url: "mqtt://127.0.0.1:1883" } }   # see sinks.rs
//! window: 4                          # frames kept in the KV cache
//! every: 1                           # ask the rules after every Nth frame
//! frames: 24                         # stop after this many frames (0: until the source ends)
//! max_tokens: 8
//! kv: mixed                          # optional KV policy; default: the package's
//! config: runtime.yaml               # optional runtime config, relative to this file
//! rules:
//!   - name: circle-colour
//!     question: what colour is the circle?
//!     when: changes                  # an event whenever the answer changes
//!   - name: red-square-left
//!     question: where is the red square?
//!     when: { equals: left }         # alert when the answer is `left`, clear when not
//!   - name: crowd
//!     question: how many objects are there?
//!     when: { at_least: 3 }          # numeric answers: at_least / at_most
//! ```

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A rules file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    /// Model package directory, relative to the rules file.
    pub model: Option<PathBuf>,
    /// One frame source URI (see `jetvlm watch --help`), named [`DEFAULT_SOURCE_NAME`].
    pub source: Option<String>,
    /// Several named frame sources, each with its own window (instead of `source`).
    #[serde(default)]
    pub sources: Vec<SourceSpec>,
    /// The order in which sources with a frame waiting are served.
    #[serde(default)]
    pub schedule: Schedule,
    /// KV cache bounds, checked at start with the planner's arithmetic.
    pub kv_budget: Option<KvBudget>,
    /// Where events go besides stdout.
    #[serde(default)]
    pub sinks: crate::sinks::SinksConfig,
    #[serde(default = "default_window")]
    pub window: usize,
    #[serde(default = "default_every")]
    pub every: u64,
    /// Frames to process; 0: until the source ends.
    #[serde(default)]
    pub frames: u64,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// KV cache policy (`fp16`, `mixed`, ...); default: the package's.
    pub kv: Option<String>,
    /// Runtime config YAML, relative to the rules file.
    pub config: Option<PathBuf>,
    pub rules: Vec<Rule>,
}

/// The name of the one source of a rules file's `source`.
pub const DEFAULT_SOURCE_NAME: &str = "camera";

/// Sources a rules file may name (each keeps a window of frames in its own KV cache).
pub const MAX_SOURCES: usize = 64;

/// A named frame source.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Carried by every event and used in MQTT topics: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// The frame source URI (see `jetvlm watch --help`).
    pub uri: String,
}

/// How the one model is shared between sources that have a frame waiting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Each source in turn (the next one after the last served that has a frame).
    #[default]
    RoundRobin,
    /// The source whose waiting frame was captured first.
    OldestFirst,
}

/// KV cache bounds in MiB: each source's window and the sum over all sources.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvBudget {
    pub per_source_mib: Option<f64>,
    pub total_mib: Option<f64>,
}

/// Whether `name` may name a source (it goes into MQTT topics and file names).
pub fn valid_source_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn default_window() -> usize {
    4
}
fn default_every() -> u64 {
    1
}
fn default_max_tokens() -> usize {
    8
}

/// A standing question and when its answers make an event.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub question: String,
    pub when: Condition,
}

/// When a rule's answers make events.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    /// Every change of the answer (the first answer is reported as `initial`).
    Changes,
    /// The answer equals the text (case and surrounding spaces ignored).
    Equals(String),
    /// The answer differs from the text.
    NotEquals(String),
    /// The answer contains the text (case ignored).
    Contains(String),
    /// The answer is a number at least this large.
    AtLeast(f64),
    /// The answer is a number at most this large.
    AtMost(f64),
}

impl Condition {
    /// Whether `answer` meets a predicate condition (`None` for [`Condition::Changes`]).
    pub fn holds(&self, answer: &str) -> Option<bool> {
        let a = answer.trim().to_lowercase();
        // "nan" and "inf" parse as floats but are not numbers an answer can compare as.
        let number = || a.parse::<f64>().ok().filter(|n| n.is_finite());
        Some(match self {
            Condition::Changes => return None,
            Condition::Equals(t) => a == t.trim().to_lowercase(),
            Condition::NotEquals(t) => a != t.trim().to_lowercase(),
            Condition::Contains(t) => a.contains(&t.trim().to_lowercase()),
            Condition::AtLeast(x) => number().is_some_and(|n| n >= *x),
            Condition::AtMost(x) => number().is_some_and(|n| n <= *x),
        })
    }

    /// Checks the condition's threshold: `at_least` and `at_most` need a finite number (a
    /// NaN threshold would never alert, an infinite one always or never). Returns the
    /// field and the reason.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        match self {
            Condition::AtLeast(x) if !x.is_finite() => {
                Err(("at_least", format!("must be a finite number, got {x}")))
            }
            Condition::AtMost(x) if !x.is_finite() => {
                Err(("at_most", format!("must be a finite number, got {x}")))
            }
            _ => Ok(()),
        }
    }
}

impl RulesFile {
    /// Reads and checks a rules file; paths in it become relative to its directory.
    pub fn load(path: &Path) -> Result<Self> {
        let mut f: RulesFile = jetvlm_core::config::load_yaml(path)?;
        let bad = |msg: String| anyhow::anyhow!("{}: {msg}", path.display());
        match (&f.source, f.sources.is_empty()) {
            (Some(_), false) => {
                return Err(bad("give either `source` or `sources`, not both".into()));
            }
            (None, true) => {
                return Err(bad(
                    "no frame source: give `source: URI` or `sources: [{name, uri}, ...]`".into(),
                ));
            }
            _ => {}
        }
        if f.sources.len() > MAX_SOURCES {
            return Err(bad(format!(
                "`sources` names {} sources, at most {MAX_SOURCES}",
                f.sources.len()
            )));
        }
        for (i, s) in f.sources.iter().enumerate() {
            if !valid_source_name(&s.name) {
                return Err(bad(format!(
                    "sources[{i}].name: `{}` must be 1-64 letters, digits, `-`, `_` or `.`",
                    s.name
                )));
            }
            if s.uri.trim().is_empty() {
                return Err(bad(format!("sources[{i}].uri must not be empty")));
            }
            if f.sources[..i].iter().any(|o| o.name == s.name) {
                return Err(bad(format!(
                    "sources[{i}].name: `{}` is used twice",
                    s.name
                )));
            }
        }
        if let Some(b) = &f.kv_budget {
            for (field, v) in [
                ("per_source_mib", b.per_source_mib),
                ("total_mib", b.total_mib),
            ] {
                if let Some(v) = v
                    && !(v.is_finite() && v > 0.0 && v < 1e12)
                {
                    return Err(bad(format!(
                        "kv_budget.{field}: must be a positive number of MiB, got {v}"
                    )));
                }
            }
        }
        f.sinks
            .validate()
            .map_err(|(field, msg)| bad(format!("sinks.{field}: {msg}")))?;
        if f.rules.is_empty() {
            return Err(bad("`rules` is empty: give at least one rule".into()));
        }
        if f.window == 0 {
            return Err(bad("`window` must be at least 1".into()));
        }
        if f.every == 0 {
            return Err(bad("`every` must be at least 1".into()));
        }
        if f.max_tokens == 0 {
            return Err(bad("`max_tokens` must be at least 1".into()));
        }
        let (max_tokens, max_window) = (
            jetvlm_runtime::RuntimeConfig::MAX_NEW_TOKENS,
            jetvlm_runtime::RuntimeConfig::MAX_WINDOW_FRAMES,
        );
        if f.max_tokens > max_tokens {
            return Err(bad(format!("`max_tokens` must be at most {max_tokens}")));
        }
        if f.window > max_window {
            return Err(bad(format!("`window` must be at most {max_window}")));
        }
        for (i, r) in f.rules.iter().enumerate() {
            if r.name.trim().is_empty() || r.question.trim().is_empty() {
                return Err(bad(format!(
                    "rules[{i}]: `name` and `question` must not be empty"
                )));
            }
            if let Err((field, msg)) = r.when.validate() {
                return Err(bad(format!("rules[{i}].when.{field}: {msg}")));
            }
            if f.rules[..i].iter().any(|o| o.name == r.name) {
                return Err(bad(format!(
                    "rules[{i}]: the name `{}` is used twice",
                    r.name
                )));
            }
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [&mut f.model, &mut f.config].into_iter().flatten() {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        f.sinks.resolve_paths(dir);
        Ok(f)
    }

    /// The sources to run: `override_uri` (`--source`) as the one source, else the file's.
    pub fn source_specs(&self, override_uri: Option<&str>) -> Vec<SourceSpec> {
        let one = |uri: &str| {
            vec![SourceSpec {
                name: DEFAULT_SOURCE_NAME.into(),
                uri: uri.into(),
            }]
        };
        match (override_uri, self.source.as_deref()) {
            (Some(uri), _) | (None, Some(uri)) => one(uri),
            (None, None) => self.sources.clone(),
        }
    }

    /// The model package: `--model`, else the file's `model`, else `$JETVLM_MODEL`.
    pub fn model_dir(&self, flag: Option<&Path>) -> Result<PathBuf> {
        if let Some(p) = flag {
            return Ok(p.to_path_buf());
        }
        if let Some(p) = &self.model {
            return Ok(p.clone());
        }
        match std::env::var_os("JETVLM_MODEL") {
            Some(p) => Ok(PathBuf::from(p)),
            None => {
                bail!("no model: set `model:` in the rules file, pass --model or set JETVLM_MODEL")
            }
        }
    }

    /// The runtime config: the file's `config` (if any) with its `kv`, `window` and
    /// `max_tokens` applied.
    pub fn runtime_config(&self) -> Result<jetvlm_runtime::RuntimeConfig> {
        let mut cfg = match &self.config {
            Some(p) => jetvlm_runtime::RuntimeConfig::from_yaml(p)
                .with_context(|| format!("runtime config {}", p.display()))?,
            None => jetvlm_runtime::RuntimeConfig::default(),
        };
        jetvlm_app::apply_kv(&mut cfg, self.kv.clone(), None);
        cfg.window_frames = self.window;
        cfg.max_new_tokens = self.max_tokens;
        Ok(cfg)
    }
}

/// What a rule reports about one answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// `changes`: the first answer.
    Initial,
    /// `changes`: the answer differs from the previous one.
    Change,
    /// A predicate became true (or is true on the first answer).
    Alert,
    /// A predicate became false.
    Clear,
}

/// A rule's state over the stream of its answers.
#[derive(Clone, Debug)]
pub struct Monitor {
    pub condition: Condition,
    last: Option<String>,
    active: bool,
}

impl Monitor {
    pub fn new(condition: Condition) -> Self {
        Monitor {
            condition,
            last: None,
            active: false,
        }
    }

    /// The previous answer, if any.
    pub fn last(&self) -> Option<&str> {
        self.last.as_deref()
    }

    /// Takes the next answer; returns the event it makes, if any.
    pub fn observe(&mut self, answer: &str) -> Option<EventKind> {
        let answer = answer.trim().to_string();
        let event = match self.condition.holds(&answer) {
            None => match &self.last {
                None => Some(EventKind::Initial),
                Some(prev) if *prev != answer => Some(EventKind::Change),
                Some(_) => None,
            },
            Some(now) => {
                let was = std::mem::replace(&mut self.active, now);
                match (was, now) {
                    (false, true) => Some(EventKind::Alert),
                    (true, false) => Some(EventKind::Clear),
                    _ => None,
                }
            }
        };
        self.last = Some(answer);
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_reports_the_first_answer_and_every_change() {
        let mut m = Monitor::new(Condition::Changes);
        let got: Vec<_> = ["red", "red", " blue", "blue", "red"]
            .iter()
            .map(|a| m.observe(a))
            .collect();
        use EventKind::*;
        assert_eq!(
            got,
            vec![Some(Initial), None, Some(Change), None, Some(Change)]
        );
        assert_eq!(m.last(), Some("red"));
    }

    #[test]
    fn predicates_alert_on_rising_and_clear_on_falling() {
        use EventKind::*;
        let mut m = Monitor::new(Condition::Equals("Left".into()));
        let got: Vec<_> = ["left", "left", "right", "LEFT "]
            .iter()
            .map(|a| m.observe(a))
            .collect();
        assert_eq!(got, vec![Some(Alert), None, Some(Clear), Some(Alert)]);
        let mut m = Monitor::new(Condition::AtLeast(3.0));
        let got: Vec<_> = ["2", "3", "4", "many", "1"]
            .iter()
            .map(|a| m.observe(a))
            .collect();
        // A non-numeric answer does not meet a numeric condition.
        assert_eq!(got, vec![None, Some(Alert), None, Some(Clear), None]);
        assert_eq!(Condition::AtMost(1.0).holds("1"), Some(true));
        // "inf" and "nan" parse as floats but are no numeric answer.
        assert_eq!(Condition::AtLeast(3.0).holds("inf"), Some(false));
        assert_eq!(Condition::AtMost(3.0).holds("-inf"), Some(false));
        assert_eq!(Condition::AtMost(3.0).holds("NaN"), Some(false));
        assert_eq!(
            Condition::Contains("RED".into()).holds("a red car"),
            Some(true)
        );
        assert_eq!(Condition::NotEquals("0".into()).holds(" 0"), Some(false));
        assert_eq!(Condition::Changes.holds("x"), None);
    }

    #[test]
    fn rules_files_parse_and_bad_ones_name_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.yaml");
        std::fs::write(
            &path,
            "model: pkg\nsource: synthetic://scene\nrules:\n  - name: a\n    question: q?\n    when: changes\n  - name: b\n    question: n?\n    when: { at_least: 2 }\n",
        )
        .unwrap();
        let f = RulesFile::load(&path).unwrap();
        assert_eq!(f.model.as_deref(), Some(dir.path().join("pkg").as_path()));
        assert_eq!((f.window, f.every, f.frames, f.max_tokens), (4, 1, 0, 8));
        assert_eq!(f.rules[1].when, Condition::AtLeast(2.0));
        for (text, want) in [
            ("source: s\nrules: []\n", "`rules` is empty"),
            (
                "source: s\nwindow: 0\nrules: [{name: a, question: q, when: changes}]\n",
                "`window`",
            ),
            (
                "source: s\nrules: [{name: a, question: q, when: changes}, {name: a, question: r, when: changes}]\n",
                "used twice",
            ),
            (
                "source: s\nrules: [{name: a, question: q, when: sometimes}]\n",
                "rules[0].when",
            ),
            (
                "source: s\nrules: [{name: a, question: q, when: changes}]\nextra: 1\n",
                "extra",
            ),
            (
                "source: s\nrules: [{name: a, question: q, when: {at_least: .nan}}]\n",
                "rules[0].when.at_least",
            ),
            (
                "source: s\nmax_tokens: 18446744073709551615\nrules: [{name: a, question: q, when: changes}]\n",
                "`max_tokens` must be at most",
            ),
            (
                "source: s\nwindow: 18446744073709551615\nrules: [{name: a, question: q, when: changes}]\n",
                "`window` must be at most",
            ),
            (
                "source: s\nrules: [{name: a, question: q, when: {at_most: -.inf}}]\n",
                "rules[0].when.at_most",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = format!("{:#}", RulesFile::load(&path).unwrap_err());
            assert!(
                e.contains("rules.yaml") && e.contains(want),
                "{text:?}: {e}"
            );
        }
    }
}
