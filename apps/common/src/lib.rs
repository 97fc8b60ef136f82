//! What the jetvlm binaries (`jetvlm`, `jetvlm-analytics`, `jetvlm-assistant`) share.

use tracing_subscriber::EnvFilter;

/// tracing on stderr: `RUST_LOG` if set, else `filter` (RUST_LOG syntax), else `warn`; text,
/// or JSON lines with `json`. A second call is a no-op.
pub fn init_logging(filter: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Ends the process on an error: `error: ` and the error's causes on one line
/// ([`jetvlm_core::error_line`]) on stderr, exit status 1.
pub fn exit_on_error(result: anyhow::Result<()>) {
    if let Err(e) = result {
        eprintln!("error: {}", jetvlm_core::error_line(e.as_ref()));
        std::process::exit(1);
    }
}
