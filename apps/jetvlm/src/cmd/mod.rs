//! One module per subcommand.

pub mod plan;
pub mod board;
pub mod bench;
pub mod synth;
pub mod selftest;
