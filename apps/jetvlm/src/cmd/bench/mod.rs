//! `jetvlm bench ...`: side-by-side performance measurements (FP16 vs mixed KV), always with
//! the machine's measured memory bandwidth in the same run.

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.which {}
}
