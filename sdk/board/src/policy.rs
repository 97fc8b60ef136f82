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
//! Spellings: the KV cache's, parsed by [`jetvlm_quant::policy`] (`fp16`, `mixed`,
//! `int4-all`, `int8-frames`, `int2-frames`, `mixed:bits=4,group=64,keys=channel,...`);
//! [`KvPrecision`] is derived from the parsed [`KvPolicy`]. The cache's `fblock` and `qblock`
//! do not change the bytes charged.

use crate::BoardError;
use jetvlm_quant::KvPolicy;
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

    /// The format as the cache stores it on head dim `head_dim`: the group lowered as
    /// [`jetvlm_quant::fit_group`] lowers it (FP16 unchanged).
    pub fn fitted(&self, head_dim: u64) -> KvFormat {
        if self.is_fp16() {
            return *self;
        }
        let group = jetvlm_quant::fit_group((self.group as usize).max(1), head_dim as usize);
        KvFormat {
            group: group as u32,
            ..*self
        }
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

/// What the planner charges for a KV policy: the formats of text and frame tokens and the
/// FP16 budget, derived from a [`KvPolicy`] (the one policy type and grammar, shared with the
/// KV cache and the CLI) by [`KvPrecision::from`]. A read-only view: a different policy is
/// a different [`KvPolicy`] converted again.
#[derive(Clone, Debug, PartialEq)]
pub struct KvPrecision {
    policy: KvPolicy,
    text: KvFormat,
    frames: KvFormat,
    fp16_budget: f64,
    sinks: u64,
    salient: bool,
    frame_layers: Vec<KvFormat>,
}

impl From<KvPolicy> for KvPrecision {
    fn from(policy: KvPolicy) -> Self {
        let quantized = KvFormat::quantized(policy.frame_bits as u8, policy.group as u32);
        let frames = if policy.quantizes_frames() {
            quantized
        } else {
            KvFormat::FP16
        };
        let text = if policy.quantize_text {
            quantized
        } else {
            KvFormat::FP16
        };
        let frame_layers = policy
            .layers
            .iter()
            .map(|f| KvFormat::quantized(f.bits as u8, f.group as u32))
            .collect();
        KvPrecision {
            text,
            frames,
            fp16_budget: decimal(policy.fp16_budget),
            sinks: policy.sink_tokens as u64,
            salient: policy.salient_frame_tokens,
            frame_layers,
            policy,
        }
    }
}

/// The f64 of the decimal an f32 prints as (`0.1f32` -> `0.1`, not 0.10000000149...), so
/// the budget charged is the one the policy spells.
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

impl KvPrecision {
    /// Every token FP16.
    pub fn fp16() -> Self {
        KvPolicy::fp16().into()
    }

    /// Text FP16, frames INT4 g64, FP16 budget 10%, per-channel frame keys.
    pub fn mixed() -> Self {
        KvPolicy::mixed().into()
    }

    /// Text FP16, frames at `bits` with group 64, FP16 budget 10% (the `mixed` preset with
    /// other frame bits).
    pub fn frames_at(bits: u8) -> Self {
        KvPolicy {
            frame_bits: bits.into(),
            ..KvPolicy::mixed()
        }
        .into()
    }

    /// Text and frames INT4 g64 (per-token keys, no FP16 budget).
    pub fn int4_all() -> Self {
        KvPolicy::int4_all().into()
    }

    /// This policy with frames at `bits`: its own group and FP16 budget when it quantizes
    /// frames, else those of `mixed` (what the planner's advice proposes).
    pub fn frames_lowered_to(&self, bits: u8) -> Self {
        let mut p = KvPolicy {
            frame_bits: bits.into(),
            ..KvPolicy::mixed()
        };
        if self.policy.quantizes_frames() {
            p.group = self.policy.group;
            p.fp16_budget = self.policy.fp16_budget;
        }
        p.into()
    }

    /// Whether the planner charges `self` and `other` the same on a model of head dim
    /// `head_dim`: the same formats once their groups are fitted, budget, sinks and
    /// salience (block sizes are not charged). `mixed` and the demo package's
    /// `mixed:fblock=16,qblock=16` do; so do `mixed` and `mixed:group=32` on head dim 96.
    pub fn charges_like(&self, other: &KvPrecision, head_dim: u64) -> bool {
        let fit = |f: KvFormat| f.fitted(head_dim);
        let layers =
            |p: &KvPrecision| -> Vec<KvFormat> { p.frame_layers.iter().map(|f| fit(*f)).collect() };
        fit(self.text) == fit(other.text)
            && fit(self.frames) == fit(other.frames)
            && layers(self) == layers(other)
            && self.fp16_budget == other.fp16_budget
            && self.sinks == other.sinks
            && self.salient == other.salient
    }

    /// The policy this was derived from.
    pub fn policy(&self) -> &KvPolicy {
        &self.policy
    }

    /// The format of text tokens.
    pub fn text(&self) -> KvFormat {
        self.text
    }

    /// The format of frame tokens outside the FP16 budget (every layer's, unless
    /// [`KvPrecision::frame_layers`] gives one per layer).
    pub fn frames(&self) -> KvFormat {
        self.frames
    }

    /// Fraction of the context that may stay FP16 (text first, then sinks and, with
    /// `salient`, the most attended frame tokens).
    pub fn fp16_budget(&self) -> f64 {
        self.fp16_budget
    }

    /// Attention-sink tokens (the sequence's first) kept FP16 within the budget.
    pub fn sinks(&self) -> u64 {
        self.sinks
    }

    /// The most attended frame tokens fill the rest of the budget at FP16 (`salient=on`).
    pub fn salient(&self) -> bool {
        self.salient
    }

    /// Per-layer frame formats (a calibrated policy); empty: [`KvPrecision::frames`] in
    /// every layer.
    pub fn frame_layers(&self) -> &[KvFormat] {
        &self.frame_layers
    }

    /// The frame format of `layer`.
    pub fn frame_format(&self, layer: usize) -> KvFormat {
        self.frame_layers.get(layer).copied().unwrap_or(self.frames)
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

    /// The policy's canonical spelling ([`KvPolicy::name`]); parses back to the same policy.
    pub fn name(&self) -> String {
        self.policy.name()
    }
}

impl fmt::Display for KvPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Parses with [`KvPolicy`]'s grammar (the cache's), then derives the planner's view.
impl FromStr for KvPrecision {
    type Err = BoardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(s.parse::<KvPolicy>()?.into())
    }
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
            let cache = bad.parse::<KvPolicy>().unwrap_err().to_string();
            assert_eq!(e, cache, "{bad}: the planner and the cache say the same");
            assert!(e.contains("accepted forms: fp16 | mixed"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_planner_reads_what_the_cache_reads() {
        for spelled in [
            "fp16",
            "mixed",
            "int4-all",
            "int8-frames",
            "int2-frames",
            "mixed:keys=per-channel",
            "mixed:keys=token,group=32",
            "mixed:fblock=16,qblock=16,layers=2t64/4c64",
            "int4-all:group=128",
            "MIXED:Bits=8,budget=0.2",
        ] {
            let cache: KvPolicy = spelled.parse().unwrap();
            let plan: KvPrecision = spelled.parse().unwrap();
            assert_eq!(plan.policy(), &cache, "{spelled}");
            assert_eq!(plan.name(), cache.name(), "{spelled}");
            assert_eq!(plan, KvPrecision::from(cache), "{spelled}");
        }
        let i4: KvPrecision = "int4-all".parse().unwrap();
        assert_eq!(i4.text, KvFormat::quantized(4, 64));
        assert_eq!((i4.fp16_budget, i4.sinks), (0.0, 0));
        let fp16 = KvPrecision::fp16();
        assert!(fp16.text.is_fp16() && fp16.frames.is_fp16() && !fp16.quantizes_frames());
        // The budget charged is the decimal spelled, not its f32 neighbour.
        assert_eq!(KvPrecision::mixed().fp16_budget, 0.1);
        let cal: KvPrecision = "mixed:layers=2t64/8c32".parse().unwrap();
        assert_eq!(
            cal.frame_layers,
            [KvFormat::quantized(2, 64), KvFormat::quantized(8, 32)]
        );
        assert_eq!(cal.frame_format(5), KvFormat::quantized(4, 64));
    }

    #[test]
    fn policies_that_differ_in_what_is_not_charged_charge_alike() {
        let p = |s: &str| s.parse::<KvPrecision>().unwrap();
        let mixed = KvPrecision::mixed();
        assert!(p("mixed:fblock=16,qblock=16").charges_like(&mixed, 64));
        assert!(p("mixed:group=32").charges_like(&mixed, 96));
        assert!(!p("mixed:group=32").charges_like(&mixed, 64));
        assert!(!p("mixed:salient=on").charges_like(&mixed, 64));
        assert!(!p("mixed:budget=0.2").charges_like(&mixed, 64));
        assert!(!p("int8-frames").charges_like(&mixed, 64));
        assert!(!p("int4-all").charges_like(&mixed, 64));
        assert!(!p("mixed:layers=4c64/4c64").charges_like(&mixed, 64));
        assert!(p("fp16:fblock=16").charges_like(&KvPrecision::fp16(), 80));
    }

    #[test]
    fn lowered_frames_keep_the_group_and_budget_of_a_quantized_policy() {
        let g32: KvPrecision = "mixed:group=32,budget=0.2".parse().unwrap();
        assert_eq!(
            g32.frames_lowered_to(2).name(),
            "mixed:bits=2,group=32,budget=0.2"
        );
        assert_eq!(
            KvPrecision::fp16().frames_lowered_to(8).name(),
            "int8-frames"
        );
        assert_eq!(KvPrecision::frames_at(2).name(), "int2-frames");
    }
}
