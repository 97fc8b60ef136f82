//! The analytics app's rules file. `jetvlm-analytics` is a binary crate, so its `rules`
//! module (with the `sinks` module its file's `sinks:` section is read by) is compiled into
//! this target as it stands (`#[path]`) and fuzzed through
//! `RulesFile::load`, `runtime_config` (with a fixed runtime config beside the rules file)
//! and each rule's `Monitor` fed the text after the first NUL, line by line, as answers.

#![no_main]

#[allow(dead_code)]
#[path = "../../../apps/analytics/src/rules.rs"]
mod rules;
#[allow(dead_code)]
#[path = "../../../apps/analytics/src/sinks/mod.rs"]
mod sinks;

use jetvlm_fuzz::{split_nul, write};
use libfuzzer_sys::fuzz_target;
use rules::{Monitor, RulesFile};
use std::sync::Once;

fuzz_target!(|data: &[u8]| {
    static RUNTIME: Once = Once::new();
    RUNTIME.call_once(|| {
        write(
            "rules/runtime.yaml",
            b"max_new_tokens: 16\nwindow_frames: 2\n",
        );
    });
    let (yaml, answers) = split_nul(data);
    let path = write("rules/rules.yaml", yaml);
    let Ok(file) = RulesFile::load(&path) else {
        return;
    };
    assert!(!file.rules.is_empty() && file.window >= 1 && file.every >= 1);
    if let Ok(cfg) = file.runtime_config() {
        assert_eq!(
            (cfg.window_frames, cfg.max_new_tokens),
            (file.window, file.max_tokens)
        );
    }
    let answers = String::from_utf8_lossy(answers);
    for rule in &file.rules {
        let mut m = Monitor::new(rule.when.clone());
        for a in answers.lines() {
            let _ = m.observe(a);
            assert_eq!(m.last(), Some(a.trim()));
        }
    }
});
