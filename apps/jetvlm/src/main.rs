//! `jetvlm`: the command line of the jetvlm SDK.
//!
//! Each subcommand lives in its own module under `cmd/`, with its clap arguments and a
//! `run` function; this file only parses, sets up logging and dispatches.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser, Debug)]
#[command(
    name = "jetvlm",
    version,
    about = "Vision-language models on NVIDIA Jetson boards",
    after_help = jetvlm_app::ExitCode::help_table()
)]
struct Cli {
    #[command(flatten)]
    log: jetvlm_app::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Watch a camera: answer a standing question per frame over a rolling window of cached
    /// frames (default: the bundled demo model on a synthetic scene).
    Watch(cmd::watch::WatchArgs),
    /// Accuracy study: the same held-out synthetic clips under each KV policy (accuracy,
    /// answers changed and KL vs FP16, KV bytes, TTFT, TPOT).
    Eval(cmd::eval::EvalArgs),
    /// Plan memory for a model and workload on a Jetson board.
    Plan(cmd::plan::PlanArgs),
    /// Calibrate the KV cache: a frame format per decoder layer, from the model's own keys,
    /// values and queries on sample frames (writes a file for --kv-calibration).
    Calibrate(cmd::calibrate::CalibrateArgs),
    /// Ask a question about images with a model package (vision encoder + decoder).
    Ask(cmd::ask::AskArgs),
    /// Board profiles: list, show, detect the board this runs on.
    Board(cmd::board::BoardArgs),
    /// Benchmarks: KV attention and decode, FP16 vs mixed KV, against measured bandwidth.
    Bench(cmd::bench::BenchArgs),
    /// Generate text with a Hugging Face decoder (Llama/Mistral/Qwen2) on the mixed KV cache.
    Generate(cmd::generate::GenerateArgs),
    /// Write a synthetic camera-scene question/answer dataset (images + qa.jsonl).
    Synth(cmd::synth::SynthArgs),
    /// Export a Hugging Face vision-language checkpoint (LLaVA-1.5, Idefics3/SmolVLM) to a
    /// model package (vision.onnx, decoder/, jetvlm.yaml); needs .ci/setup --dev.
    Export(cmd::export::ExportArgs),
    /// Write a decoder's layer matrices weight-only INT8 or INT4 (round-to-nearest, FP16
    /// scales per group), for the CPU decoder.
    Quantize(cmd::quantize::QuantizeArgs),
    /// Check every CUDA kernel against its CPU reference (PASS/FAIL per kernel).
    Selftest(cmd::selftest::SelftestArgs),
    /// Serve a model package: an OpenAI-compatible API (chat completions with images and the
    /// live camera), /metrics, /health and a live web view.
    Serve(cmd::serve::ServeArgs),
    /// Can this board (or a root file system) run the model package with the config? Board,
    /// JetPack, memory plan, CUDA, NVRTC, ONNX Runtime providers, caches, cameras, disk; the
    /// exit status is the verdict.
    Doctor(cmd::doctor::DoctorArgs),
    /// A deployable bundle for a target (binaries, model package, runtime config, systemd
    /// unit, env file, manifest.json with SHA-256 of every file); `bundle verify` checks one.
    Bundle(cmd::bundle::BundleArgs),
    /// Install a bundle into a root filesystem (/opt/jetvlm, /etc/jetvlm, the systemd unit,
    /// enabled) without running anything from it; --uninstall reverses it.
    Install(cmd::install::InstallArgs),
}

fn main() {
    jetvlm_app::pipe::init();
    let cli = Cli::parse();
    cli.log.init();
    jetvlm_app::exit_on_error(run(cli.command));
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Watch(args) => cmd::watch::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Plan(args) => cmd::plan::run(args),
        Command::Calibrate(args) => cmd::calibrate::run(args),
        Command::Ask(args) => cmd::ask::run(args),
        Command::Board(args) => cmd::board::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Synth(args) => cmd::synth::run(args),
        Command::Export(args) => cmd::export::run(args),
        Command::Quantize(args) => cmd::quantize::run(args),
        Command::Selftest(args) => cmd::selftest::run(args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Doctor(args) => cmd::doctor::run(args),
        Command::Bundle(args) => cmd::bundle::run(args),
        Command::Install(args) => cmd::install::run(args),
    }
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks on every subcommand (names, conflicts, defaults).
    #[test]
    fn the_command_line_passes_clap_debug_asserts() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
