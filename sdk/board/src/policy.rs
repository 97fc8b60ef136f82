//! The planner's KV precision policy: text tokens FP16, frame tokens at 16/8/4/2 bits.
//!
//! Byte arithmetic (what the planner charges):
//!
//! - FP16: 2 bytes per element.
//! - b-bit asymmetric quantization, group-wise along `head_dim`, per token: the codes
//!   (`head_dim * b / 8` bytes per K or V vector) plus an FP16 scale and an FP16 zero per
//!   group (4 bytes per group). When the group divides `head_dim` that is `b + 32 / group`
//!   bits per element: INT4 g32 = 5.0, g64 = 4.5, g128 = 4.25; INT8 g64 = 8.5; INT2 g64 = 2.5.
//!   A group that does not divide `head_dim` is lowered to the largest of 128/64/32 that
//!   does, as the KV cache does (INT4 g64 on head dim 96 is charged as g32); with none, the
//!   vector is charged ceil(head_dim / group) groups.
//! - Keys quantized per channel over a frame block (`keys=channel`) are charged the same as
//!   per-token groups: one scale and zero per channel per block of at least `group` tokens
//!   costs no more.
//! - The FP16 budget (`budget`, default 0.10 for the text-centric policies): up to that
//!   fraction of the whole context may stay FP16. Text always does. When text is shorter than
//!   the budget, the cache keeps the sequence's first `sinks` tokens (default 4) FP16, and
//!   with `salient=on` (off by default) also the most attended frame tokens up to the
//!   budget; the planner charges the frame tokens that may take the rest at FP16 (the sinks
//!   as if they were frame tokens: an upper bound).
//!
//! - Per-layer frame formats (`layers=4c64/8t64/...`, from `jetvlm calibrate`): each layer's
//!   frame tokens are charged at that layer's bits and group.
//!
//! Accepted spellings: `fp16`, `mixed` (frames INT4 g64, budget 0.10), `int4-all` (text and
//! frames INT4 g64, no FP16 budget), `int8-frames`, `int2-frames` (frames INT8 / INT2 g64,
//! budget 0.10), and `mixed:bits=4,group=64,budget=0.1,keys=channel,layers=...` with any
//! subset of keys, `sinks=N` and `salient=on|off` included (the cache's `fblock` and
//! `qblock` are accepted and do not change the bytes charged).

use crate::BoardError;
use jetvlm_quant::LayerFormat;
use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// Storage format of one class of cached tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct KvFormat {
    /// 16 (FP16), 8, 4 or 2.
    pub bits: u8,
    /// Elements per scale/zero pair along `head_dim` (ignored for FP16).
    pub group: u32,
}

impl KvFormat {
    pub const FP16: KvFormat = KvFormat { bits: 16, group: 0 };

    pub fn quantized(bits: u8, group: u32) -> Self {
        KvFormat { bits, group }
    }

    pub fn is_fp16(&self) -> bool {
        self.bits == 16
    }

    /// Bytes of one K (or V) vector of `head_dim` elements for one token, one layer, one KV
    /// head: codes plus the FP16 scale and zero of each group.
    pub fn vector_bytes(&self, head_dim: u64) -> u64 {
        if self.is_fp16() {
            return 2 * head_dim;
        }
        let group = jetvlm_quant::fit_group((self.group as usize).max(1), head_dim as usize) as u64;
        let group = group.min(head_dim).max(1);
        let codes = (head_dim * self.bits as u64).div_ceil(8);
        let groups = head_dim.div_ceil(group);
        codes + 4 * groups
    }

    /// Bits stored per element, scales and zeros included.
    pub fn bits_per_element(&self, head_dim: u64) -> f64 {
        self.vector_bytes(head_dim) as f64 * 8.0 / head_dim as f64
    }
}

impl fmt::Display for KvFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_fp16() {
            f.write_str("FP16")
        } else {
            write!(f, "INT{} g{}", self.bits, self.group)
        }
    }
}

/// How frame keys are grouped (kept so the policy string round-trips; both are charged the
/// same, see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyMode {
    Token,
    Channel,
}

/// What the planner needs to know about a KV policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KvPrecision {
    pub text: KvFormat,
    pub frames: KvFormat,
    /// Fraction of the context that may stay FP16 (text first, then sinks and, with
    /// `salient`, the most attended frame tokens).
    pub fp16_budget: f64,
    /// Attention-sink tokens (the sequence's first) kept FP16 within the budget.
    pub sinks: u64,
    /// The most attended frame tokens fill the rest of the budget at FP16 (`salient=on`).
    pub salient: bool,
    pub keys: KeyMode,
    /// Per-layer frame formats and key modes (a calibrated policy); empty: `frames` in
    /// every layer.
    pub frame_layers: Vec<(KvFormat, KeyMode)>,
}

const DEFAULT_GROUP: u32 = 64;
const DEFAULT_BUDGET: f64 = 0.10;
const DEFAULT_SINKS: u64 = 4;

impl KvPrecision {
    /// Every token FP16.
    pub fn fp16() -> Self {
        KvPrecision {
            text: KvFormat::FP16,
            frames: KvFormat::FP16,
            fp16_budget: 1.0,
            sinks: DEFAULT_SINKS,
            salient: false,
            keys: KeyMode::Token,
            frame_layers: Vec::new(),
        }
    }

    /// Text FP16, frames INT4 g64, FP16 budget 10%, per-channel frame keys.
    pub fn mixed() -> Self {
        Self::frames_at(4)
    }

    /// Text FP16, frames at `bits` with group 64, FP16 budget 10%.
    pub fn frames_at(bits: u8) -> Self {
        KvPrecision {
            text: KvFormat::FP16,
            frames: KvFormat::quantized(bits, DEFAULT_GROUP),
            fp16_budget: DEFAULT_BUDGET,
            sinks: DEFAULT_SINKS,
            salient: false,
            keys: KeyMode::Channel,
            frame_layers: Vec::new(),
        }
    }

    /// Text and frames INT4 g64 (per-token keys, no FP16 budget).
    pub fn int4_all() -> Self {
        KvPrecision {
            text: KvFormat::quantized(4, DEFAULT_GROUP),
            frames: KvFormat::quantized(4, DEFAULT_GROUP),
            fp16_budget: 0.0,
            sinks: 0,
            salient: false,
            keys: KeyMode::Token,
            frame_layers: Vec::new(),
        }
    }

    /// The frame format of `layer`.
    pub fn frame_format(&self, layer: usize) -> KvFormat {
        self.frame_layers.get(layer).map_or(self.frames, |l| l.0)
    }

    /// Stored bits per frame element, scales and zeros included, averaged over `layers`
    /// layers.
    pub fn frame_bits_per_element(&self, head_dim: u64, layers: usize) -> f64 {
        if self.frame_layers.is_empty() || layers == 0 {
            return self.frames.bits_per_element(head_dim);
        }
        (0..layers)
            .map(|l| self.frame_format(l).bits_per_element(head_dim))
            .sum::<f64>()
            / layers as f64
    }

    /// True when frame tokens are stored below FP16.
    pub fn quantizes_frames(&self) -> bool {
        !self.frames.is_fp16()
    }

    /// One line for people: `text FP16, frames INT4 g64 (4.50 bits/element), FP16 budget 10%`.
    pub fn describe(&self, head_dim: u64) -> String {
        let fmt = |f: KvFormat| {
            if f.is_fp16() {
                "FP16".to_string()
            } else {
                format!("{f} ({:.2} bits/element)", f.bits_per_element(head_dim))
            }
        };
        let mut s = if self.frame_layers.is_empty() {
            format!("text {}, frames {}", fmt(self.text), fmt(self.frames))
        } else {
            let n = self.frame_layers.len();
            let bits = self.frame_bits_per_element(head_dim, n);
            format!(
                "text {}, frames per layer ({n} layers, {bits:.2} bits/element on average)",
                fmt(self.text)
            )
        };
        if self.quantizes_frames() && self.fp16_budget > 0.0 && self.fp16_budget < 1.0 {
            s.push_str(&format!(
                ", FP16 budget {:.0}% of the context",
                self.fp16_budget * 100.0
            ));
            if self.salient {
                s.push_str(" (salient frame tokens fill it)");
            }
        }
        s
    }

    /// Canonical spelling; parses back to the same policy.
    pub fn name(&self) -> String {
        if *self == Self::fp16() {
            return "fp16".into();
        }
        if *self == Self::mixed() {
            return "mixed".into();
        }
        if *self == Self::int4_all() {
            return "int4-all".into();
        }
        if *self == Self::frames_at(8) {
            return "int8-frames".into();
        }
        if *self == Self::frames_at(2) {
            return "int2-frames".into();
        }
        let keys = match self.keys {
            KeyMode::Token => "token",
            KeyMode::Channel => "channel",
        };
        let text = if self.text.is_fp16() {
            String::new()
        } else {
            ",text=quant".into()
        };
        let group = if self.frames.is_fp16() {
            self.text.group
        } else {
            self.frames.group
        };
        let layers = if self.frame_layers.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = self
                .frame_layers
                .iter()
                .map(|(f, k)| {
                    LayerFormat {
                        bits: f.bits.into(),
                        key_mode: match k {
                            KeyMode::Token => jetvlm_quant::KeyMode::PerToken,
                            KeyMode::Channel => jetvlm_quant::KeyMode::PerChannel,
                        },
                        group: f.group as usize,
                    }
                    .to_string()
                })
                .collect();
            format!(",layers={}", list.join("/"))
        };
        let sinks = if self.sinks == DEFAULT_SINKS {
            String::new()
        } else {
            format!(",sinks={}", self.sinks)
        };
        let salient = if self.salient { ",salient=on" } else { "" };
        format!(
            "mixed:bits={},group={},budget={},keys={keys}{text}{sinks}{salient}{layers}",
            self.frames.bits, group, self.fp16_budget
        )
    }
}

impl fmt::Display for KvPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for KvPrecision {
    type Err = BoardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| BoardError::InvalidPolicy {
            given: s.to_string(),
            reason,
        };
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "fp16" => return Ok(Self::fp16()),
            "mixed" => return Ok(Self::mixed()),
            "int4-all" => return Ok(Self::int4_all()),
            "int8-frames" => return Ok(Self::frames_at(8)),
            "int4-frames" => return Ok(Self::frames_at(4)),
            "int2-frames" => return Ok(Self::frames_at(2)),
            _ => {}
        }
        let Some(params) = lower.strip_prefix("mixed:") else {
            return Err(err("unknown policy name".into()));
        };
        let mut p = Self::mixed();
        let mut text_quant = false;
        for kv in params.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (key, value) = kv
                .split_once('=')
                .ok_or_else(|| err(format!("`{kv}` is not key=value")))?;
            match key.trim() {
                "bits" => {
                    let bits: u8 = value
                        .trim()
                        .parse()
                        .map_err(|_| err(format!("bits `{value}` is not a number")))?;
                    if ![2, 4, 8, 16].contains(&bits) {
                        return Err(err(format!("bits must be 2, 4, 8 or 16, got {bits}")));
                    }
                    p.frames.bits = bits;
                }
                "group" => {
                    let group: u32 = value
                        .trim()
                        .parse()
                        .map_err(|_| err(format!("group `{value}` is not a number")))?;
                    if ![32, 64, 128].contains(&group) {
                        return Err(err(format!("group must be 32, 64 or 128, got {group}")));
                    }
                    p.frames.group = group;
                }
                "budget" => {
                    let b: f64 = value
                        .trim()
                        .parse()
                        .map_err(|_| err(format!("budget `{value}` is not a number")))?;
                    if !(0.0..=1.0).contains(&b) {
                        return Err(err(format!("budget must be a fraction in [0, 1], got {b}")));
                    }
                    p.fp16_budget = b;
                }
                "keys" => {
                    p.keys = match value.trim() {
                        "token" => KeyMode::Token,
                        "channel" => KeyMode::Channel,
                        other => {
                            return Err(err(format!(
                                "keys must be token or channel, got `{other}`"
                            )));
                        }
                    }
                }
                "text" => {
                    text_quant = match value.trim() {
                        "fp16" => false,
                        "quant" => true,
                        other => {
                            return Err(err(format!("text must be fp16 or quant, got `{other}`")));
                        }
                    }
                }
                "layers" => {
                    p.frame_layers = value
                        .split('/')
                        .map(|f| parse_layer_format(f.trim()).map_err(&err))
                        .collect::<Result<_, _>>()?;
                }
                "sinks" => {
                    p.sinks = value
                        .trim()
                        .parse()
                        .map_err(|_| err(format!("sinks `{value}` is not a number")))?;
                }
                "salient" => {
                    p.salient = match value.trim() {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        other => {
                            return Err(err(format!("salient must be on or off, got `{other}`")));
                        }
                    }
                }
                // The KV cache's own options that do not change the byte count.
                "fblock" | "qblock" => {}
                other => return Err(err(format!("unknown key `{other}`"))),
            }
        }
        if p.frames.bits == 16 {
            if !p.frame_layers.is_empty() {
                return Err(err(
                    "layers=... needs quantized frames (bits below 16)".into()
                ));
            }
            p.frames = KvFormat::FP16;
        }
        if text_quant {
            p.text = p.frames;
        }
        Ok(p)
    }
}

/// One layer's frame format, `<bits><c|t><group>` (e.g. `4c64`, parsed as the KV cache
/// parses it); the key mode does not change the bytes charged.
fn parse_layer_format(s: &str) -> Result<(KvFormat, KeyMode), String> {
    let f: LayerFormat = s.parse()?;
    let keys = match f.key_mode {
        jetvlm_quant::KeyMode::PerChannel => KeyMode::Channel,
        jetvlm_quant::KeyMode::PerToken => KeyMode::Token,
    };
    Ok((KvFormat::quantized(f.bits as u8, f.group as u32), keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_per_element_match_the_design_table() {
        for (bits, group, expect) in [
            (4, 32, 5.0),
            (4, 64, 4.5),
            (4, 128, 4.25),
            (8, 64, 8.5),
            (2, 64, 2.5),
        ] {
            let f = KvFormat::quantized(bits, group);
            assert_eq!(f.bits_per_element(128), expect, "int{bits} g{group}");
        }
        assert_eq!(KvFormat::FP16.bits_per_element(64), 16.0);
        // g128 on head_dim 64 is one group per vector.
        assert_eq!(KvFormat::quantized(4, 128).vector_bytes(64), 32 + 4);
        // The cache fits g64 to head_dim 96 as g32: three scale/zero pairs.
        assert_eq!(KvFormat::quantized(4, 64).vector_bytes(96), 48 + 3 * 4);
        // No supported group divides 80: ceil(80 / 64) = 2 pairs are charged.
        assert_eq!(KvFormat::quantized(4, 64).vector_bytes(80), 40 + 2 * 4);
    }

    #[test]
    fn names_round_trip() {
        for name in ["fp16", "mixed", "int4-all", "int8-frames", "int2-frames"] {
            let p: KvPrecision = name.parse().unwrap();
            assert_eq!(p.name(), name);
        }
        let p: KvPrecision = "mixed:bits=2,group=32,budget=0.05,keys=token"
            .parse()
            .unwrap();
        assert_eq!(p.frames, KvFormat::quantized(2, 32));
        assert_eq!(p.fp16_budget, 0.05);
        assert_eq!(p.name().parse::<KvPrecision>().unwrap(), p);
        let q: KvPrecision = "mixed:bits=4,group=64".parse().unwrap();
        assert_eq!(q, KvPrecision::mixed());
        let r: KvPrecision = "mixed:sinks=0,salient=on,fblock=16".parse().unwrap();
        assert_eq!((r.sinks, r.salient), (0, true));
        assert_eq!(r.name().parse::<KvPrecision>().unwrap(), r);
        assert!(r.describe(64).contains("salient frame tokens"));
        let off: KvPrecision = "mixed:salient=off,sinks=4".parse().unwrap();
        assert_eq!(off, KvPrecision::mixed());
    }

    #[test]
    fn bad_policies_name_the_accepted_forms() {
        for bad in [
            "int3",
            "mixed:bits=3",
            "mixed:group=48",
            "mixed:budget=2",
            "mixed:foo=1",
            "mixed:salient=maybe",
            "mixed:sinks=-1",
            "mixed:bits",
        ] {
            let e = bad.parse::<KvPrecision>().unwrap_err().to_string();
            assert!(e.contains("Accepted: fp16, mixed"), "{bad}: {e}");
        }
    }
}
