//! A KV layer's frame format as users spell it (`<bits><c|t><group>`, e.g. `4c64`): bit
//! width, key grouping and group size. One parser for the KV cache's policies and the
//! memory planner's.

use std::str::FromStr;

/// How frame keys are grouped for quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyMode {
    /// Groups of `group` channels along head_dim, one scale/zero per token and group.
    PerToken,
    /// One scale/zero per channel over a whole frame block of tokens (KIVI-style). Handles
    /// the few key channels that are 20-50x larger than the rest far better.
    PerChannel,
}

/// One layer's frame format: bits, key grouping and group size. A calibrated KV policy
/// gives every layer its own; spelled `<bits><c|t><group>`, e.g.
/// `4c64` (INT4, per-channel keys, group 64) or `8t32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerFormat {
    /// 8, 4 or 2.
    pub bits: u32,
    pub key_mode: KeyMode,
    /// 32, 64 or 128.
    pub group: usize,
}

impl std::fmt::Display for LayerFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = match self.key_mode {
            KeyMode::PerChannel => 'c',
            KeyMode::PerToken => 't',
        };
        write!(f, "{}{k}{}", self.bits, self.group)
    }
}

impl FromStr for LayerFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || format!("layer format `{s}` (expected <bits><c|t><group>, e.g. 4c64)");
        let i = s.find(['c', 't']).ok_or_else(bad)?;
        let key_mode = if s.as_bytes()[i] == b'c' {
            KeyMode::PerChannel
        } else {
            KeyMode::PerToken
        };
        let bits = s[..i].parse().map_err(|_| bad())?;
        let group = s[i + 1..].parse().map_err(|_| bad())?;
        let f = LayerFormat {
            bits,
            key_mode,
            group,
        };
        f.check()?;
        Ok(f)
    }
}

impl LayerFormat {
    /// Whether the bits and group are ones the block formats have.
    pub fn check(&self) -> Result<(), String> {
        if !matches!(self.bits, 2 | 4 | 8) {
            return Err(format!(
                "layer format {self}: bits {} (expected 2, 4 or 8)",
                self.bits
            ));
        }
        if !matches!(self.group, 32 | 64 | 128) {
            return Err(format!(
                "layer format {self}: group {} (expected 32, 64 or 128)",
                self.group
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_formats_round_trip_and_refuse_what_no_block_has() {
        for s in ["4c64", "8t32", "2t128", "4t64"] {
            let f: LayerFormat = s.parse().unwrap();
            assert_eq!(f.to_string(), s);
        }
        let f: LayerFormat = " 4c64 ".parse().unwrap();
        assert_eq!((f.bits, f.key_mode, f.group), (4, KeyMode::PerChannel, 64));
        for (s, says) in [
            ("4x64", "expected <bits><c|t><group>"),
            ("c64", "expected <bits><c|t><group>"),
            ("4c", "expected <bits><c|t><group>"),
            ("3c64", "bits 3"),
            ("4t48", "group 48"),
        ] {
            let e = s.parse::<LayerFormat>().unwrap_err();
            assert!(e.contains(says), "{s}: {e}");
        }
    }
}
