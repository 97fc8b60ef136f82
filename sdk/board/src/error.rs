use jetvlm_core::ConfigError;
use std::path::PathBuf;

/// Everything that can go wrong while loading a board or a model description, planning, or
/// detecting the board.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BoardError {
    /// A board YAML, `config.json` or `jetvlm.yaml` that could not be read or understood
    /// (names the file, line and field).
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// A board name that is neither bundled, nor in `--boards-dir`, nor a path to a YAML file.
    #[error("unknown board `{name}`; known boards: {}. Pass a board name from that list or a path to a board YAML", known.join(", "))]
    UnknownBoard { name: String, known: Vec<String> },

    /// `--model` points at something that is neither a Hugging Face `config.json` nor a
    /// directory holding one (or a jetvlm package with `jetvlm.yaml`).
    #[error("cannot find a model config at {}: expected a directory with config.json or jetvlm.yaml, or a path to config.json", path.display())]
    ModelNotFound { path: PathBuf },

    /// A workload or planner option that cannot be planned (zero tokens per frame, ...).
    #[error("invalid workload: {0}")]
    InvalidWorkload(String),

    /// A workload, option or model size so large that the planner's token or byte
    /// arithmetic would overflow 64 bits; names the input at fault and the quantity it
    /// made overflow.
    #[error("cannot plan: {quantity} overflows 64 bits; {input} = {value} is too large")]
    Overflow {
        quantity: String,
        input: String,
        value: u64,
    },

    /// A KV policy string that does not parse (the KV cache's grammar and message).
    #[error(transparent)]
    InvalidPolicy(#[from] jetvlm_quant::PolicyError),

    /// Detection found no Jetson device-tree model under the given root.
    #[error("not a Jetson: {} is missing, so the board cannot be detected; pass --board with one of: {}", path.display(), known.join(", "))]
    NotAJetson { path: PathBuf, known: Vec<String> },

    /// A Jetson whose device-tree model string matches no known product line.
    #[error("unrecognised Jetson model `{model}` (from {}); pass --board with one of: {}", path.display(), known.join(", "))]
    UnrecognisedBoard {
        model: String,
        path: PathBuf,
        known: Vec<String>,
    },

    /// A system file (`/proc/meminfo`, `/etc/nv_tegra_release`) that exists but could not
    /// be read or parsed.
    #[error("cannot read {}: {message}", path.display())]
    SystemFile { path: PathBuf, message: String },
}
