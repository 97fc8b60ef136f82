//! `jetvlm bench ...`: side-by-side performance measurements (FP16 vs mixed KV), always with
//! the machine's measured memory bandwidth in the same run.

pub mod decode;
#[cfg(feature = "cuda")]
pub mod decode_cuda;
pub mod kv;
#[cfg(feature = "cuda")]
pub mod kv_cuda;

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm bench kv --json\n  \
    jetvlm bench decode --model models/gen/smollm2-135m-random --context 1024,8192 --steps 32")]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Decoder TTFT/TPOT at a context length, FP16 vs mixed KV, against measured bandwidth.
    Decode(decode::DecodeArgs),
    /// One decode step's attention over N cached tokens, FP16 vs mixed KV, against measured
    /// memory read bandwidth.
    Kv(kv::KvArgs),
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.which {
        BenchCommand::Decode(a) => decode::run(a),
        BenchCommand::Kv(a) => kv::run(a),
    }
}
