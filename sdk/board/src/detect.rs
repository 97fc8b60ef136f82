//! Board detection from the files a Jetson exposes. Every function takes file contents or a
//! root directory, so tests run on fixture trees instead of the live machine.
//!
//! - `/proc/device-tree/model`: the product string (`NVIDIA Jetson Orin Nano Developer
//!   Kit`), NUL-terminated.
//! - `/etc/nv_tegra_release`: the L4T release (`# R36 (release), REVISION: 4.3, ...` is
//!   L4T 36.4.3 = JetPack 6.2).
//! - `/proc/meminfo`: `MemTotal` picks the memory variant; `MemAvailable` is the memory a
//!   plan may actually use now. (`cuMemGetInfo` on Jetson reports MemFree, which leaves out
//!   reclaimable page cache and is wrong for planning.)

use crate::{BoardError, BoardProfile};
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// An L4T (Linux for Tegra) release, e.g. 36.4.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct L4tVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for L4tVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The device-tree model string without its trailing NUL and whitespace.
pub(crate) fn parse_device_tree_model(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches(['\0', '\n', ' '])
        .trim()
        .to_string()
}

/// Parses the first line of `/etc/nv_tegra_release`:
/// `# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ...`.
pub(crate) fn parse_nv_tegra_release(text: &str) -> Option<L4tVersion> {
    let line = text.lines().find(|l| l.contains("REVISION"))?;
    let r = line.find('R')?;
    let major: u32 = line[r + 1..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    let rev = line.split("REVISION:").nth(1)?.split(',').next()?.trim();
    let mut parts = rev.split('.');
    let minor = parts.next()?.trim().parse().ok()?;
    let patch = parts
        .next()
        .map(|p| p.trim().parse())
        .transpose()
        .ok()?
        .unwrap_or(0);
    Some(L4tVersion {
        major,
        minor,
        patch,
    })
}

/// The JetPack release an L4T version belongs to (NVIDIA's JetPack archive).
pub(crate) fn jetpack_for_l4t(v: L4tVersion) -> Option<&'static str> {
    Some(match (v.major, v.minor, v.patch) {
        (38, 2, _) => "7.0",
        (36, 4, 4) => "6.2.1",
        (36, 4, 3) => "6.2",
        (36, 4, 0) => "6.1",
        (36, 3, _) => "6.0",
        (35, 6, 1) => "5.1.5",
        (35, 6, 0) => "5.1.4",
        (35, 5, 0) => "5.1.3",
        (35, 4, 1) => "5.1.2",
        (35, 3, 1) => "5.1.1",
        (35, 2, 1) => "5.1",
        (35, 1, 0) => "5.0.2",
        _ => return None,
    })
}

/// The `/proc/meminfo` fields the planner uses, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemInfo {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub free_bytes: u64,
}

/// Parses `/proc/meminfo` (`MemTotal:  7620000 kB` lines).
pub fn parse_meminfo(text: &str) -> Result<MemInfo, String> {
    let field = |name: &str| -> Result<u64, String> {
        let line = text
            .lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .ok_or_else(|| format!("no {name} line"))?;
        let rest = line.split(':').nth(1).unwrap_or("").trim();
        let mut it = rest.split_whitespace();
        let value: u64 = it
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name}: `{rest}` is not a number"))?;
        let scale = match it.next() {
            Some("kB") | Some("KB") | Some("kb") => 1024,
            None => 1,
            Some(unit) => return Err(format!("{name}: unknown unit `{unit}`")),
        };
        Ok(value * scale)
    };
    Ok(MemInfo {
        total_bytes: field("MemTotal")?,
        available_bytes: field("MemAvailable")?,
        free_bytes: field("MemFree")?,
    })
}

/// Product lines by device-tree substring (lower case) and the board-name prefix they map
/// to. L4T 32/35 on AGX Xavier reports just `Jetson-AGX`.
const PRODUCT_LINES: &[(&str, &str)] = &[
    ("thor", "thor-"),
    ("agx orin", "agx-orin-"),
    ("orin nx", "orin-nx-"),
    ("orin nano", "orin-nano-"),
    ("xavier nx", "xavier-nx-"),
    ("agx xavier", "agx-xavier-"),
    ("jetson-agx", "agx-xavier-"),
];

/// Maps a device-tree model string and MemTotal to a board name from `boards`: the product
/// line from the string, then the smallest DRAM size that holds MemTotal (MemTotal is a bit
/// below DRAM: firmware carveouts). A model string with "Super" picks the Super profile.
pub fn board_for_model(
    model: &str,
    mem_total_bytes: u64,
    boards: &[BoardProfile],
) -> Option<String> {
    let lower = model.to_ascii_lowercase();
    let (_, prefix) = PRODUCT_LINES.iter().find(|(key, _)| lower.contains(key))?;
    let want_super = lower.contains("super");
    let line: Vec<&BoardProfile> = boards
        .iter()
        .filter(|b| b.name.starts_with(prefix))
        .collect();
    let pick = |super_mode: bool| -> Option<&BoardProfile> {
        let mut c: Vec<&&BoardProfile> = line
            .iter()
            .filter(|b| b.name.ends_with("-super") == super_mode)
            .collect();
        c.sort_by_key(|b| b.memory.dram_mib);
        c.iter()
            .find(|b| b.dram_bytes() >= mem_total_bytes)
            .or(c.last())
            .map(|b| **b)
    };
    let chosen = if want_super {
        pick(true).or_else(|| pick(false))
    } else {
        pick(false)
    };
    chosen.map(|b| b.name.clone())
}

/// What the system files say.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SystemInfo {
    /// `/proc/device-tree/model`, when present.
    pub model: Option<String>,
    pub l4t: Option<L4tVersion>,
    pub jetpack: Option<String>,
    pub meminfo: Option<MemInfo>,
    /// The root the files were read under (`/` on a live system).
    pub root: PathBuf,
}

impl SystemInfo {
    /// Reads the files under `root` (`/` for the live system). Missing files are `None`;
    /// files that exist but cannot be parsed are errors naming them.
    pub fn read(root: &Path) -> Result<Self, BoardError> {
        let model_path = root.join("proc/device-tree/model");
        let model = std::fs::read(&model_path)
            .ok()
            .map(|b| parse_device_tree_model(&b));
        let release_path = root.join("etc/nv_tegra_release");
        let l4t = match std::fs::read_to_string(&release_path) {
            Ok(text) => {
                Some(
                    parse_nv_tegra_release(&text).ok_or_else(|| BoardError::SystemFile {
                        path: release_path.clone(),
                        message: "no `# R<major> (release), REVISION: <minor>.<patch>` line".into(),
                    })?,
                )
            }
            Err(_) => None,
        };
        let meminfo_path = root.join("proc/meminfo");
        let meminfo = match std::fs::read_to_string(&meminfo_path) {
            Ok(text) => Some(
                parse_meminfo(&text).map_err(|message| BoardError::SystemFile {
                    path: meminfo_path.clone(),
                    message,
                })?,
            ),
            Err(_) => None,
        };
        Ok(SystemInfo {
            model,
            jetpack: l4t.and_then(jetpack_for_l4t).map(str::to_string),
            l4t,
            meminfo,
            root: root.to_path_buf(),
        })
    }

    /// The board this system is, from `boards`.
    pub fn board<'a>(&self, boards: &'a [BoardProfile]) -> Result<&'a BoardProfile, BoardError> {
        let known = || boards.iter().map(|b| b.name.clone()).collect::<Vec<_>>();
        let model_path = self.root.join("proc/device-tree/model");
        let Some(model) = &self.model else {
            return Err(BoardError::NotAJetson {
                path: model_path,
                known: known(),
            });
        };
        let total = self.meminfo.map(|m| m.total_bytes).unwrap_or(0);
        board_for_model(model, total, boards)
            .and_then(|name| boards.iter().find(|b| b.name == name))
            .ok_or_else(|| BoardError::UnrecognisedBoard {
                model: model.clone(),
                path: model_path,
                known: known(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_line() {
        let v = parse_nv_tegra_release(
            "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n",
        )
        .unwrap();
        assert_eq!(
            v,
            L4tVersion {
                major: 36,
                minor: 4,
                patch: 3
            }
        );
        assert_eq!(jetpack_for_l4t(v), Some("6.2"));
        let x = parse_nv_tegra_release("# R35 (release), REVISION: 6.0, GCID: 1, BOARD: t186ref")
            .unwrap();
        assert_eq!(x.to_string(), "35.6.0");
        assert_eq!(jetpack_for_l4t(x), Some("5.1.4"));
        assert_eq!(parse_nv_tegra_release("garbage"), None);
    }

    #[test]
    fn meminfo_in_bytes() {
        let m = parse_meminfo("MemTotal:        7620000 kB\nMemFree:          500000 kB\nMemAvailable:    5000000 kB\n").unwrap();
        assert_eq!(m.total_bytes, 7_620_000 * 1024);
        assert_eq!(m.available_bytes, 5_000_000 * 1024);
        assert_eq!(m.free_bytes, 500_000 * 1024);
        assert!(
            parse_meminfo("MemTotal: 1 kB\nMemFree: 1 kB\n")
                .unwrap_err()
                .contains("MemAvailable")
        );
    }

    #[test]
    fn model_string_trims_nul() {
        assert_eq!(
            parse_device_tree_model(b"NVIDIA Jetson Orin Nano Developer Kit\0"),
            "NVIDIA Jetson Orin Nano Developer Kit"
        );
    }
}
