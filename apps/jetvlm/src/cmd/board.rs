//! `jetvlm board`: list the known board profiles, show one, or detect the board this runs on.

use anyhow::Result;
use clap::{Args, Subcommand};
use jetvlm_board::BoardProfile;
use jetvlm_board::detect::SystemInfo;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm board list\n  \
    jetvlm board show orin-nano-8gb --json\n  \
    jetvlm board detect\n  \
    jetvlm board detect --root Linux_for_Tegra/rootfs --json")]
pub struct BoardArgs {
    /// Directory of extra board YAML files (board name = file stem).
    #[arg(long, global = true, value_name = "DIR")]
    pub boards_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: BoardCommand,
}

#[derive(Subcommand, Debug)]
pub enum BoardCommand {
    /// Known boards: memory, usable budget, bandwidth, GPU, JetPack.
    List {
        /// Print the profiles as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One board's full profile.
    Show {
        /// Board name or path to a board YAML.
        name: String,
        /// Print the profile as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Detect the board from /proc/device-tree/model, /etc/nv_tegra_release, /proc/meminfo.
    Detect {
        /// Root of the file system to read (/proc, /etc): a copied or mounted Jetson root
        /// file system.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Print what was read and the board as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: BoardArgs) -> Result<()> {
    let reg = super::plan::registry(args.boards_dir.as_deref())?;
    match args.command {
        BoardCommand::List { json } => {
            let boards = reg.all()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&boards)?);
            } else {
                print!("{}", list_table(&boards));
            }
        }
        BoardCommand::Show { name, json } => {
            let b = reg.resolve(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                print!("{}", list_table(std::slice::from_ref(&b)));
                println!(
                    "  CPU {} x {}; GPU {} sm_{} ({} CUDA cores, {} Tensor Cores); L4T {}, CUDA {}, TensorRT {}",
                    b.cpu.cores,
                    b.cpu.model,
                    b.gpu.arch,
                    b.gpu.sm,
                    b.gpu.cuda_cores,
                    b.gpu.tensor_cores,
                    b.software.l4t,
                    b.software.cuda,
                    b.software.tensorrt
                );
            }
        }
        BoardCommand::Detect { root, json } => {
            let info = SystemInfo::read(&root)?;
            let boards = reg.all()?;
            let board = info.board(&boards);
            if json {
                let v = serde_json::json!({
                    "system": info,
                    "board": board.as_ref().ok().map(|b| b.name.clone()),
                    "error": board.as_ref().err().map(|e| e.to_string()),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "device-tree model : {}",
                    info.model.as_deref().unwrap_or("(none)")
                );
                match (info.l4t, &info.jetpack) {
                    (Some(l), Some(jp)) => println!("L4T               : {l} (JetPack {jp})"),
                    (Some(l), None) => println!("L4T               : {l} (JetPack unknown)"),
                    _ => println!("L4T               : (no /etc/nv_tegra_release)"),
                }
                if let Some(m) = info.meminfo {
                    println!(
                        "memory            : MemTotal {:.0} MiB, MemAvailable {:.0} MiB (plans use MemAvailable; MemFree {:.0} MiB is what cuMemGetInfo reports)",
                        m.total_bytes as f64 / 1048576.0,
                        m.available_bytes as f64 / 1048576.0,
                        m.free_bytes as f64 / 1048576.0
                    );
                }
            }
            let b = board?;
            if !json {
                println!("board             : {} ({})", b.name, b.display_name);
            }
        }
    }
    Ok(())
}

fn list_table(boards: &[BoardProfile]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<22} {:<34} {:>9} {:>11} {:>8} {:>7} {:>8}",
        "name", "board", "DRAM MiB", "usable MiB", "GB/s", "GPU", "JetPack"
    );
    for b in boards {
        let _ = writeln!(
            s,
            "{:<22} {:<34} {:>9} {:>11} {:>8.1} {:>7} {:>8}",
            b.name,
            b.display_name,
            b.memory.dram_mib,
            b.usable_bytes() >> 20,
            b.memory.bandwidth_gb_s,
            format!("sm_{}", b.gpu.sm),
            b.software.jetpack
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_shows_every_bundled_board_with_its_budget() {
        let boards = jetvlm_board::BoardRegistry::bundled().all().unwrap();
        let table = list_table(&boards);
        assert_eq!(table.lines().count(), boards.len() + 1);
        let nano = table
            .lines()
            .find(|l| l.starts_with("orin-nano-8gb "))
            .unwrap();
        for field in ["8192", "4960", "68.0", "sm_87", "6.2"] {
            assert!(
                nano.split_whitespace().any(|w| w == field),
                "{field} missing in `{nano}`"
            );
        }
    }
}
