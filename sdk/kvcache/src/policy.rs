//! The KV precision policy: which tokens stay FP16 and how the others are quantized.

use crate::KvError;
pub use jetvlm_quant::{KeyMode, LayerFormat};
use std::fmt::Write as _;
use std::str::FromStr;

/// KV precision policy (the runtime's `--kv` and the config's `kv.policy`).
///
/// Text tokens are FP16 (unless `quantize_text`); frame tokens are quantized to
/// `frame_bits` (16 = FP16). Inside the FP16 budget (a fraction of all cached tokens, filled
/// first by text), the first `sink_tokens` tokens of the sequence and, with
/// `salient_frame_tokens` (`salient=on`), the frame tokens that receive the most attention
/// during their prefill stay FP16 as well.
#[derive(Clone, Debug, PartialEq)]
pub struct KvPolicy {
    /// 16 (FP16), 8, 4 or 2.
    pub frame_bits: u32,
    /// Quantization group along head_dim: 32, 64 or 128.
    pub group: usize,
    pub key_mode: KeyMode,
    /// Fraction of all cached tokens that may be FP16 (text counts first).
    pub fp16_budget: f32,
    /// Attention-sink tokens (the first tokens of the sequence) kept FP16 within the budget.
    pub sink_tokens: usize,
    /// Keep the most salient frame tokens FP16 within the budget (`salient=on`; off in the
    /// presets). The decoder measures how much attention each frame token receives during
    /// the frame's prefill and keeps the frame's exact keys and values until its last layer,
    /// then the cache re-stores the frame with the most attended tokens FP16. A frame's
    /// blocks are its own (evicted together), so salient tokens fill whole FP16 blocks only
    /// (see the README's measurements).
    pub salient_frame_tokens: bool,
    /// Quantize text too (the `int4-all` baseline).
    pub quantize_text: bool,
    /// Tokens per FP16 block: 16, 32 or 64.
    pub fp16_block_tokens: usize,
    /// Tokens per quantized block (and per-channel key group): 16, 32, 64 or 128 (16 fits
    /// the 16-token frames of small vision encoders without half-empty blocks).
    pub quant_block_tokens: usize,
    /// Per-layer frame formats (from `jetvlm calibrate`), one per decoder layer; empty: every
    /// layer uses `frame_bits`, `key_mode` and `group`. Spelled `layers=4c64/8t64/...`.
    pub layers: Vec<LayerFormat>,
}

pub(crate) const ACCEPTED: &str = "fp16 | mixed | int4-all | int8-frames | int2-frames, \
     optionally followed by `:key=value,...` with keys bits=2|4|8|16, group=32|64|128, \
     keys=channel|token, budget=0..1, sinks=N, salient=on|off, text=fp16|quant, \
     fblock=16|32|64, qblock=16|32|64|128, layers=<bits><c|t><group>/... (one per layer, \
     from `jetvlm calibrate`) (e.g. `mixed:bits=4,group=64,keys=channel,budget=0.1`)";

impl Default for KvPolicy {
    fn default() -> Self {
        Self::mixed()
    }
}

impl KvPolicy {
    /// Everything FP16.
    pub fn fp16() -> Self {
        Self {
            frame_bits: 16,
            ..Self::mixed()
        }
    }
    /// Text FP16, frames INT4 g64 with per-channel keys, FP16 budget 10%, 4 sink tokens.
    pub fn mixed() -> Self {
        Self {
            frame_bits: 4,
            group: 64,
            key_mode: KeyMode::PerChannel,
            fp16_budget: 0.10,
            sink_tokens: 4,
            salient_frame_tokens: false,
            quantize_text: false,
            fp16_block_tokens: 32,
            quant_block_tokens: 64,
            layers: Vec::new(),
        }
    }
    /// Everything INT4 g64 with per-token keys, text too, no FP16 budget.
    pub fn int4_all() -> Self {
        Self {
            key_mode: KeyMode::PerToken,
            fp16_budget: 0.0,
            sink_tokens: 0,
            salient_frame_tokens: false,
            quantize_text: true,
            ..Self::mixed()
        }
    }
    pub fn int8_frames() -> Self {
        Self {
            frame_bits: 8,
            ..Self::mixed()
        }
    }
    pub fn int2_frames() -> Self {
        Self {
            frame_bits: 2,
            ..Self::mixed()
        }
    }

    /// Whether frame tokens (outside the FP16 budget) are quantized.
    pub fn quantizes_frames(&self) -> bool {
        self.frame_bits != 16
    }

    /// The frame format of `layer`: its own for a calibrated policy, else the policy's.
    pub fn layer_format(&self, layer: usize) -> LayerFormat {
        self.layers.get(layer).copied().unwrap_or(LayerFormat {
            bits: self.frame_bits,
            key_mode: self.key_mode,
            group: self.group,
        })
    }

    /// `self`, spelled `spelled` at run time, with the block sizes of `package` where the
    /// spelling names none (`fblock=`, `qblock=`): block sizes belong to the model package
    /// (they follow its tokens per frame).
    pub fn keeping_blocks_of(mut self, spelled: &str, package: &KvPolicy) -> KvPolicy {
        if !spelled.contains("fblock=") {
            self.fp16_block_tokens = package.fp16_block_tokens;
        }
        if !spelled.contains("qblock=") {
            self.quant_block_tokens = package.quant_block_tokens;
        }
        self
    }

    /// Whether the layers have formats of their own (a calibrated policy).
    pub fn is_per_layer(&self) -> bool {
        !self.layers.is_empty()
    }

    fn presets() -> [(&'static str, KvPolicy); 5] {
        [
            ("fp16", Self::fp16()),
            ("mixed", Self::mixed()),
            ("int4-all", Self::int4_all()),
            ("int8-frames", Self::int8_frames()),
            ("int2-frames", Self::int2_frames()),
        ]
    }

    /// Canonical spelling: a preset name, or `mixed:` followed by every field that differs
    /// from `mixed`. Parses back to an equal policy.
    pub fn name(&self) -> String {
        let presets = Self::presets();
        if let Some((n, _)) = presets.iter().find(|(_, p)| p == self) {
            return (*n).to_string();
        }
        let base = Self::mixed();
        let mut s = String::from("mixed:");
        let mut sep = "";
        let mut field = |s: &mut String, k: &str, v: String| {
            let _ = write!(s, "{sep}{k}={v}");
            sep = ",";
        };
        if self.frame_bits != base.frame_bits {
            field(&mut s, "bits", self.frame_bits.to_string());
        }
        if self.group != base.group {
            field(&mut s, "group", self.group.to_string());
        }
        if self.key_mode != base.key_mode {
            field(&mut s, "keys", key_name(self.key_mode).into());
        }
        if self.fp16_budget != base.fp16_budget {
            field(&mut s, "budget", self.fp16_budget.to_string());
        }
        if self.sink_tokens != base.sink_tokens {
            field(&mut s, "sinks", self.sink_tokens.to_string());
        }
        if self.salient_frame_tokens != base.salient_frame_tokens {
            field(
                &mut s,
                "salient",
                if self.salient_frame_tokens {
                    "on"
                } else {
                    "off"
                }
                .into(),
            );
        }
        if self.quantize_text != base.quantize_text {
            field(
                &mut s,
                "text",
                if self.quantize_text { "quant" } else { "fp16" }.into(),
            );
        }
        if self.fp16_block_tokens != base.fp16_block_tokens {
            field(&mut s, "fblock", self.fp16_block_tokens.to_string());
        }
        if self.quant_block_tokens != base.quant_block_tokens {
            field(&mut s, "qblock", self.quant_block_tokens.to_string());
        }
        if !self.layers.is_empty() {
            let list: Vec<String> = self.layers.iter().map(|f| f.to_string()).collect();
            field(&mut s, "layers", list.join("/"));
        }
        s
    }

    /// Checks every field's range and their combinations.
    /// The policy with its quantization group lowered, where needed, to the largest
    /// supported group (128, 64, 32) that divides `head_dim`: the default group of 64 becomes
    /// 32 for head dim 96 (Phi-3) or 32 (small models). Unchanged when the group already
    /// divides `head_dim`, when nothing is quantized, or when no supported group does (the
    /// cache then reports the mismatch as an error).
    pub fn fitted_to(&self, head_dim: usize) -> KvPolicy {
        let mut p = self.clone();
        if p.quantizes_frames() {
            p.group = jetvlm_quant::fit_group(p.group, head_dim);
            for f in &mut p.layers {
                f.group = jetvlm_quant::fit_group(f.group, head_dim);
            }
        }
        p
    }

    pub fn validate(&self) -> Result<(), KvError> {
        let bad = |reason: String| KvError::InvalidPolicy {
            policy: self.name(),
            reason,
            accepted: ACCEPTED,
        };
        if !matches!(self.frame_bits, 2 | 4 | 8 | 16) {
            return Err(bad(format!(
                "bits={} (expected 2, 4, 8 or 16)",
                self.frame_bits
            )));
        }
        if !matches!(self.group, 32 | 64 | 128) {
            return Err(bad(format!(
                "group={} (expected 32, 64 or 128)",
                self.group
            )));
        }
        if !(0.0..=1.0).contains(&self.fp16_budget) || self.fp16_budget.is_nan() {
            return Err(bad(format!("budget={} (expected 0..1)", self.fp16_budget)));
        }
        if !matches!(self.fp16_block_tokens, 16 | 32 | 64) {
            return Err(bad(format!(
                "fblock={} (expected 16, 32 or 64)",
                self.fp16_block_tokens
            )));
        }
        if !matches!(self.quant_block_tokens, 16 | 32 | 64 | 128) {
            return Err(bad(format!(
                "qblock={} (expected 16, 32, 64 or 128)",
                self.quant_block_tokens
            )));
        }
        if self.quantize_text && self.key_mode == KeyMode::PerChannel {
            return Err(bad(
                "text=quant needs keys=token (text arrives token by token, per-channel key \
                 groups need a whole block at once)"
                    .into(),
            ));
        }
        if self.quantize_text && !self.quantizes_frames() {
            return Err(bad("text=quant needs bits below 16".into()));
        }
        if !self.layers.is_empty() && !self.quantizes_frames() {
            return Err(bad(
                "layers=... needs quantized frames (bits below 16)".into()
            ));
        }
        for f in &self.layers {
            f.check().map_err(bad)?;
            if self.quantize_text && f.key_mode == KeyMode::PerChannel {
                return Err(bad(format!(
                    "text=quant needs per-token keys in every layer (layer format {f})"
                )));
            }
        }
        Ok(())
    }
}

fn key_name(k: KeyMode) -> &'static str {
    match k {
        KeyMode::PerToken => "token",
        KeyMode::PerChannel => "channel",
    }
}

impl std::fmt::Display for KvPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for KvPolicy {
    type Err = KvError;
    fn from_str(text: &str) -> Result<Self, KvError> {
        let bad = |reason: String| KvError::InvalidPolicy {
            policy: text.to_string(),
            reason,
            accepted: ACCEPTED,
        };
        let text_t = text.trim();
        let (base, rest) = match text_t.split_once(':') {
            Some((b, r)) => (b.trim(), Some(r)),
            None => (text_t, None),
        };
        let mut p = Self::presets()
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(base))
            .map(|(_, p)| p)
            .ok_or_else(|| bad(format!("unknown policy `{base}`")))?;
        for kv in rest
            .into_iter()
            .flat_map(|r| r.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("`{kv}` is not key=value")))?;
            let (k, v) = (k.trim(), v.trim());
            let num = |v: &str| {
                v.parse::<usize>()
                    .map_err(|_| bad(format!("{k}={v} is not a number")))
            };
            let onoff = |v: &str| match v {
                "on" | "true" | "yes" => Ok(true),
                "off" | "false" | "no" => Ok(false),
                _ => Err(bad(format!("{k}={v} (expected on or off)"))),
            };
            match k {
                "bits" => p.frame_bits = num(v)? as u32,
                "group" => p.group = num(v)?,
                "keys" => {
                    p.key_mode = match v {
                        "channel" | "per-channel" => KeyMode::PerChannel,
                        "token" | "per-token" => KeyMode::PerToken,
                        _ => return Err(bad(format!("keys={v} (expected channel or token)"))),
                    }
                }
                "budget" => {
                    p.fp16_budget = v
                        .parse::<f32>()
                        .map_err(|_| bad(format!("budget={v} is not a number")))?
                }
                "sinks" => p.sink_tokens = num(v)?,
                "salient" => p.salient_frame_tokens = onoff(v)?,
                "text" => {
                    p.quantize_text = match v {
                        "fp16" => false,
                        "quant" | "int" => true,
                        _ => return Err(bad(format!("text={v} (expected fp16 or quant)"))),
                    }
                }
                "fblock" => p.fp16_block_tokens = num(v)?,
                "qblock" => p.quant_block_tokens = num(v)?,
                "layers" => {
                    p.layers = v
                        .split('/')
                        .map(str::parse::<LayerFormat>)
                        .collect::<Result<_, _>>()
                        .map_err(bad)?
                }
                _ => return Err(bad(format!("unknown key `{k}`"))),
            }
        }
        p.validate().map_err(|e| match e {
            KvError::InvalidPolicy { reason, .. } => bad(reason),
            other => other,
        })?;
        Ok(p)
    }
}

impl<'de> serde::Deserialize<'de> for KvPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for KvPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_is_fitted_to_the_head_dim() {
        let m = KvPolicy::mixed();
        assert_eq!(m.fitted_to(64), m);
        assert_eq!(m.fitted_to(128), m);
        assert_eq!(m.fitted_to(96).group, 32);
        assert_eq!(m.fitted_to(32).group, 32);
        // Nothing supported divides 40: left for the cache to report.
        assert_eq!(m.fitted_to(40), m);
        // Only ever lowered.
        let g32: KvPolicy = "mixed:group=32".parse().unwrap();
        assert_eq!(g32.fitted_to(128), g32);
        let g128: KvPolicy = "mixed:group=128".parse().unwrap();
        assert_eq!(g128.fitted_to(192).group, 64);
        // FP16 keeps its (unused) group.
        assert_eq!(KvPolicy::fp16().fitted_to(96), KvPolicy::fp16());
        assert_eq!(m.fitted_to(96).name(), "mixed:group=32");
    }

    #[test]
    fn presets_round_trip() {
        for (name, p) in KvPolicy::presets() {
            assert_eq!(p.name(), name);
            assert_eq!(name.parse::<KvPolicy>().unwrap(), p);
            p.validate().unwrap();
        }
    }

    #[test]
    fn custom_forms_round_trip() {
        let p: KvPolicy = "mixed:bits=4,group=32,keys=token,budget=0.2,sinks=0"
            .parse()
            .unwrap();
        assert_eq!(p.group, 32);
        assert_eq!(p.key_mode, KeyMode::PerToken);
        assert_eq!(p.fp16_budget, 0.2);
        assert_eq!(p.sink_tokens, 0);
        assert_eq!(p.name().parse::<KvPolicy>().unwrap(), p);
        let q: KvPolicy = "mixed:bits=4,group=64,keys=channel,budget=0.1"
            .parse()
            .unwrap();
        assert_eq!(q, KvPolicy::mixed());
        let r: KvPolicy = "int4-all:group=128".parse().unwrap();
        assert_eq!(r.name().parse::<KvPolicy>().unwrap(), r);
    }

    #[test]
    fn bad_forms_name_the_accepted_ones() {
        for bad in [
            "int3",
            "mixed:bits=3",
            "mixed:group=48",
            "mixed:keys=row",
            "mixed:budget=2",
            "mixed:foo=1",
            "mixed:bits",
            "int4-all:keys=channel",
            "fp16:text=quant",
        ] {
            match bad.parse::<KvPolicy>() {
                Err(KvError::InvalidPolicy { accepted, .. }) => {
                    assert!(accepted.contains("int4-all"))
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn per_layer_formats_round_trip_and_are_checked() {
        let p: KvPolicy = "mixed:layers=4c64/8t32/2c128".parse().unwrap();
        assert_eq!(p.layers.len(), 3);
        assert_eq!(
            p.layer_format(1),
            LayerFormat {
                bits: 8,
                key_mode: KeyMode::PerToken,
                group: 32
            }
        );
        // Past the list (never for a cache of the right depth): the policy's own format.
        assert_eq!(p.layer_format(7), KvPolicy::mixed().layer_format(0));
        assert_eq!(p.name(), "mixed:layers=4c64/8t32/2c128");
        assert_eq!(p.name().parse::<KvPolicy>().unwrap(), p);
        // Groups are fitted per layer.
        assert_eq!(
            p.fitted_to(96).name(),
            "mixed:group=32,layers=4c32/8t32/2c32"
        );
        for bad in [
            "mixed:layers=3c64",
            "mixed:layers=4c48",
            "mixed:layers=4x64",
            "mixed:layers=",
            "fp16:layers=4c64",
            "int4-all:layers=4t64/4c64",
        ] {
            assert!(
                matches!(bad.parse::<KvPolicy>(), Err(KvError::InvalidPolicy { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn deserializes_from_string() {
        let p: KvPolicy = serde_json::from_str("\"int8-frames\"").unwrap();
        assert_eq!(p, KvPolicy::int8_frames());
        assert!(serde_json::from_str::<KvPolicy>("\"int9\"").is_err());
        assert_eq!(
            serde_json::to_string(&KvPolicy::fp16()).unwrap(),
            "\"fp16\""
        );
    }
}
