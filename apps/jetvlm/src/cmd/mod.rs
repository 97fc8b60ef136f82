//! One module per subcommand.

pub mod plan;
pub mod ask;
pub mod board;
pub mod bench;
pub mod generate;
pub mod synth;
pub mod selftest;
