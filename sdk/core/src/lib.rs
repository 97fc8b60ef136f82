//! jetvlm-core: the vocabulary every jetvlm crate shares.
//!
//! - [`TokenKind`]: whether a cached token came from text or from a camera frame; the KV
//!   cache picks its precision from this tag.
//! - [`DType`], [`Device`]: storage types and where computation runs.
//! - [`hf`]: Hugging Face `config.json` schema -> validated [`hf::ModelConfig`].
//! - [`manifest`]: the model package manifest `jetvlm.yaml`, its one schema and the checks
//!   that need no other file.
//! - [`image_limits`]: how large an image file a decoder accepts (checked from the header).
//! - [`sysinfo`]: last-level cache size and measured memory read bandwidth.
//! - [`mem`]: [`mem::PageBuffer`], zeroed page-backed memory (2 MiB huge pages when large)
//!   for the KV cache pools and bandwidth probes.
//! - [`par`]: the decode step's team of threads ([`par::with_team`]) and the parallel loop
//!   that runs on it ([`par::for_each_mut`]).
//! - [`config`]: YAML (serde-saphyr) and JSON loading with errors that name the file, the
//!   line and the field.

pub mod config;
pub mod hf;
pub mod image_limits;
pub mod manifest;
pub mod mem;
pub mod par;
pub mod sysinfo;
mod types;

pub use config::ConfigError;
pub use image_limits::ImageLimits;
pub use types::{DType, Device, FrameId, TokenKind};

/// The entries of `dir` whose file name starts with `prefix`, sorted by path (empty when
/// `dir` cannot be read): versioned installs (`cuda-12.6`, `python3.12`, `libfoo.so.1.2`).
pub fn entries_starting_with(dir: &std::path::Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<std::path::PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    found.sort();
    found
}

/// An error and its causes as one line for a terminal: causes joined with `: `, a cause whose
/// text the line already holds left out (errors often embed their source's message), and
/// line breaks inside a message (lists of problems) folded into `; `.
pub fn error_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    for cause in std::iter::successors(Some(err), |e| e.source()) {
        let message = cause.to_string();
        let text = message
            .lines()
            .map(|l| l.trim().trim_start_matches("- ").trim_end_matches(':'))
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn errors_fold_into_one_line_without_repeats() {
        let inner = E("No such file", None);
        let mid = E("cannot read a.yaml: No such file", Some(Box::new(inner)));
        let top = E("loading pkg", Some(Box::new(mid)));
        assert_eq!(
            super::error_line(&top),
            "loading pkg: cannot read a.yaml: No such file"
        );
        let list = E(
            "pkg/jetvlm.yaml: 2 problem(s):\n  - no weights\n  - bad prompt\n",
            None,
        );
        assert_eq!(
            super::error_line(&list),
            "pkg/jetvlm.yaml: 2 problem(s); no weights; bad prompt"
        );
    }
}
