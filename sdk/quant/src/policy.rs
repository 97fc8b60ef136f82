//! The KV precision policy and its one grammar: which tokens stay FP16 and how the others
//! are quantized, spelled `fp16`, `mixed`, `int4-all`, `int8-frames`, `int2-frames`, or one
//! of those followed by `:key=value,...` (see [`ACCEPTED`]). The KV cache, the memory
//! planner and the command line all parse and print policies here.

pub use crate::layer::{KeyMode, LayerFormat};
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
    /// (see docs/salience.md for the measurements).
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

/// Every accepted spelling, for error messages.
pub const ACCEPTED: &str = "fp16 | mixed | int4-all | int8-frames | int2-frames, \
     optionally followed by `:key=value,...` with keys bits=2|4|8|16, group=32|64|128, \
     keys=channel|token, budget=0..1, sinks=N, salient=on|off, text=fp16|quant, \
     fblock=16|32|64, qblock=16|32|64|128, layers=<bits><c|t><group>/... (one per layer, \
     from `jetvlm calibrate`) (e.g. `mixed:bits=4,group=64,keys=channel,budget=0.1`)";

/// A KV policy string that does not parse, or a policy whose fields do not go together.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("invalid KV policy `{policy}`: {reason}; accepted forms: {ACCEPTED}")]
pub struct PolicyError {
    /// The policy as given (or, for a policy built in code, its canonical name).
    pub policy: String,
    pub reason: String,
}

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

    /// The named presets and their policies.
    pub fn presets() -> [(&'static str, KvPolicy); 5] {
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

    /// The policy with its quantization group lowered, where needed, to the largest
    /// supported group (128, 64, 32) that divides `head_dim`: the default group of 64 becomes
    /// 32 for head dim 96 (Phi-3) or 32 (small models). Unchanged when the group already
    /// divides `head_dim`, when nothing is quantized, or when no supported group does (the
    /// cache then reports the mismatch as an error).
    pub fn fitted_to(&self, head_dim: usize) -> KvPolicy {
        let mut p = self.clone();
        if p.quantizes_frames() {
            p.group = crate::fit_group(p.group, head_dim);
            for f in &mut p.layers {
                f.group = crate::fit_group(f.group, head_dim);
            }
        }
        p
    }

    /// Why this policy cannot run a model of head dim `head_dim` once its groups are fitted
    /// ([`KvPolicy::fitted_to`]): a quantized group that no supported group size can divide
    /// into (a head dim that is not a multiple of 32). The reason names the head dim and the
    /// policy that runs the model; `None` when this one can.
    pub fn head_dim_problem(&self, head_dim: usize) -> Option<String> {
        let fitted = self.fitted_to(head_dim);
        if !fitted.quantizes_frames() || head_dim == 0 {
            return None;
        }
        let mut groups = (0..fitted.layers.len().max(1)).map(|l| fitted.layer_format(l).group);
        let group = groups.find(|g| !head_dim.is_multiple_of(*g))?;
        Some(format!(
            "head_dim {head_dim} is not a multiple of any quantization group (32, 64 or 128; \
             the policy's {group} cannot be fitted), so `{}` cannot quantize this model's \
             frame tokens; the policy `fp16` (every token FP16) runs it",
            self.name()
        ))
    }

    /// The policy in effect when `spelled` (this policy's spelling, as the user gave it) runs
    /// a model whose package policy is `package` (none for a bare decoder directory) and
    /// whose head dim is `head_dim`: the package's block sizes where the spelling names none
    /// ([`KvPolicy::keeping_blocks_of`]), the group fitted to the head dim
    /// ([`KvPolicy::fitted_to`]). The runtime, the planner and the CLI all report this.
    pub fn in_effect(self, spelled: &str, package: Option<&KvPolicy>, head_dim: usize) -> KvPolicy {
        let p = match package {
            Some(pkg) => self.keeping_blocks_of(spelled, pkg),
            None => self,
        };
        p.fitted_to(head_dim)
    }

    /// Checks every field's range and their combinations.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |reason: String| PolicyError {
            policy: self.name(),
            reason,
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
    type Err = PolicyError;
    fn from_str(text: &str) -> Result<Self, PolicyError> {
        let bad = |reason: String| PolicyError {
            policy: text.to_string(),
            reason,
        };
        // Case does not matter (`MIXED:Bits=4` is `mixed:bits=4`); errors quote the input.
        let trimmed = text.trim();
        let (base, rest) = match trimmed.split_once(':') {
            Some((b, r)) => (b.trim(), Some(r)),
            None => (trimmed, None),
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
            let (key, value) = (k.to_ascii_lowercase(), v.to_ascii_lowercase());
            let v = value.as_str();
            let num = |v: &str| {
                v.parse::<usize>()
                    .map_err(|_| bad(format!("{k}={v} is not a number")))
            };
            let onoff = |v: &str| match v {
                "on" | "true" | "yes" => Ok(true),
                "off" | "false" | "no" => Ok(false),
                _ => Err(bad(format!("{k}={v} (expected on or off)"))),
            };
            match key.as_str() {
                "bits" => {
                    p.frame_bits = v
                        .parse::<u32>()
                        .map_err(|_| bad(format!("bits={v} is not a number")))?
                }
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
        p.validate().map_err(|e| bad(e.reason))?;
        Ok(p)
    }
}

/// Splits a comma-separated list of policies (`fp16,mixed:bits=2,group=32,int8-frames`):
/// a piece with `=` and no `:` continues the policy before it (it is one of its keys), any
/// other piece starts a new policy. Each piece is then parsed on its own.
pub fn split_policies(list: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for piece in list.split(',') {
        let continues = piece.contains('=') && !piece.contains(':');
        match out.last_mut() {
            Some(last) if continues => {
                last.push(',');
                last.push_str(piece);
            }
            _ => out.push(piece.to_string()),
        }
    }
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
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

    fn round_trips(p: &KvPolicy) {
        let name = p.name();
        let back: KvPolicy = name
            .parse()
            .unwrap_or_else(|e| panic!("{name} does not parse back: {e}"));
        assert_eq!(&back, p, "{name}");
        assert_eq!(back.name(), name);
        assert_eq!(p.to_string(), name);
    }

    #[test]
    fn presets_round_trip() {
        for (name, p) in KvPolicy::presets() {
            assert_eq!(p.name(), name);
            assert_eq!(name.parse::<KvPolicy>().unwrap(), p);
            p.validate().unwrap();
            round_trips(&p);
        }
        assert_eq!(KvPolicy::default(), KvPolicy::mixed());
    }

    /// Every valid value of every key, on every preset it may follow: parse(print(p)) == p.
    #[test]
    fn every_variant_round_trips() {
        let values: [(&str, &[&str]); 10] = [
            ("bits", &["2", "4", "8", "16"]),
            ("group", &["32", "64", "128"]),
            ("keys", &["token", "channel", "per-token", "per-channel"]),
            ("budget", &["0", "0.05", "0.1", "0.3333", "1"]),
            ("sinks", &["0", "4", "17"]),
            ("salient", &["on", "off", "yes", "false"]),
            ("text", &["fp16", "quant"]),
            ("fblock", &["16", "32", "64"]),
            ("qblock", &["16", "32", "64", "128"]),
            ("layers", &["4c64", "2t32/8c128/4t64", "8t128/8t128"]),
        ];
        let mut seen = 0;
        for (base, _) in KvPolicy::presets() {
            for (key, vals) in values {
                for v in vals {
                    let spelled = format!("{base}:{key}={v}");
                    match spelled.parse::<KvPolicy>() {
                        Ok(p) => {
                            round_trips(&p);
                            seen += 1;
                        }
                        // Combinations the cache cannot run are refused by validate() with
                        // a reason, never silently changed.
                        Err(e) => assert!(!e.reason.is_empty(), "{spelled}"),
                    }
                }
            }
        }
        assert!(seen > 120, "{seen}");
        // Several keys at once, in any order.
        for spelled in [
            "mixed:bits=4,group=32,keys=token,budget=0.1,sinks=4,salient=on",
            "mixed:salient=on,sinks=4,budget=0.1,keys=token,group=32,bits=4",
            "mixed:fblock=16,qblock=16,layers=2t64/4c64/4c64/4t32/4t32/4t64",
            "int4-all:group=128,fblock=64,qblock=128,budget=0.2,sinks=2",
            "int2-frames:keys=token,budget=0.5,salient=on",
            "fp16:budget=0.2,fblock=16",
        ] {
            round_trips(&spelled.parse().unwrap());
        }
    }

    /// Random policies built field by field (every combination `validate` accepts, budgets
    /// of any f32 in 0..1, per-layer lists of any length): the printed name parses back to
    /// the same policy, and prints the same again.
    #[test]
    fn random_policies_round_trip() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(15);
        let pick = |rng: &mut StdRng, xs: &[usize]| xs[rng.random_range(0..xs.len())];
        let mut checked = 0;
        for _ in 0..5000 {
            let key = |rng: &mut StdRng| {
                if rng.random_bool(0.5) {
                    KeyMode::PerToken
                } else {
                    KeyMode::PerChannel
                }
            };
            let layers = if rng.random_bool(0.3) {
                (0..rng.random_range(1..40))
                    .map(|_| LayerFormat {
                        bits: pick(&mut rng, &[2, 4, 8]) as u32,
                        key_mode: key(&mut rng),
                        group: pick(&mut rng, &[32, 64, 128]),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let p = KvPolicy {
                frame_bits: pick(&mut rng, &[2, 4, 8, 16]) as u32,
                group: pick(&mut rng, &[32, 64, 128]),
                key_mode: key(&mut rng),
                fp16_budget: if rng.random_bool(0.2) {
                    pick(&mut rng, &[0, 1]) as f32
                } else {
                    rng.random_range(0.0f32..=1.0)
                },
                sink_tokens: rng.random_range(0..100),
                salient_frame_tokens: rng.random_bool(0.5),
                quantize_text: rng.random_bool(0.2),
                fp16_block_tokens: pick(&mut rng, &[16, 32, 64]),
                quant_block_tokens: pick(&mut rng, &[16, 32, 64, 128]),
                layers,
            };
            if p.validate().is_err() {
                continue;
            }
            round_trips(&p);
            checked += 1;
        }
        assert!(checked > 1000, "{checked}");
    }

    #[test]
    fn spellings_that_mean_the_same_policy_print_the_same() {
        for (a, b) in [
            ("mixed:bits=4,group=64,keys=channel,budget=0.1", "mixed"),
            ("mixed:keys=per-channel", "mixed"),
            ("mixed:keys=per-token", "mixed:keys=token"),
            ("MIXED:Bits=8", "int8-frames"),
            (" Int4-All ", "int4-all"),
            ("mixed:bits=16", "fp16"),
            ("mixed:salient=off,sinks=4", "mixed"),
            ("mixed:bits=2,", "int2-frames"),
        ] {
            let pa: KvPolicy = a.parse().unwrap();
            let pb: KvPolicy = b.parse().unwrap();
            assert_eq!(pa, pb, "{a} vs {b}");
            assert_eq!(pa.name(), b, "{a}");
        }
    }

    #[test]
    fn custom_forms_set_their_fields() {
        let p: KvPolicy = "mixed:bits=4,group=32,keys=token,budget=0.2,sinks=0"
            .parse()
            .unwrap();
        assert_eq!(p.group, 32);
        assert_eq!(p.key_mode, KeyMode::PerToken);
        assert_eq!(p.fp16_budget, 0.2);
        assert_eq!(p.sink_tokens, 0);
        assert_eq!(p.name(), "mixed:group=32,keys=token,budget=0.2,sinks=0");
        let r: KvPolicy = "int4-all:group=128".parse().unwrap();
        assert_eq!(
            r.name(),
            "mixed:group=128,keys=token,budget=0,sinks=0,text=quant"
        );
    }

    #[test]
    fn bad_forms_name_the_reason_and_the_accepted_ones() {
        for (bad, says) in [
            ("int3", "unknown policy `int3`"),
            ("INT3:bits=4", "unknown policy `INT3`"),
            ("mixed:Foo=1", "unknown key `Foo`"),
            ("int4-frames", "unknown policy"),
            ("mixed:bits=3", "bits=3"),
            ("mixed:bits=4294967300", "bits=4294967300 is not a number"),
            ("mixed:group=48", "group=48"),
            ("mixed:keys=row", "keys=row"),
            ("mixed:budget=2", "budget=2"),
            ("mixed:budget=nan", "budget=NaN"),
            ("mixed:foo=1", "unknown key `foo`"),
            ("mixed:bits", "`bits` is not key=value"),
            ("mixed:sinks=-1", "sinks=-1 is not a number"),
            ("mixed:salient=maybe", "salient=maybe"),
            ("mixed:fblock=8", "fblock=8"),
            ("mixed:qblock=256", "qblock=256"),
            ("int4-all:keys=channel", "text=quant needs keys=token"),
            ("fp16:text=quant", "text=quant needs"),
            (
                "fp16:keys=token,text=quant",
                "text=quant needs bits below 16",
            ),
            ("mixed:bits=..,group=..", "bits=.. is not a number"),
        ] {
            let e = bad.parse::<KvPolicy>().unwrap_err();
            assert_eq!(e.policy, bad);
            assert!(e.reason.contains(says), "{bad}: {}", e.reason);
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("`{bad}`")) && msg.contains("mixed:bits="),
                "{msg}"
            );
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
        round_trips(&p);
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
            "mixed:bits=16,layers=4c64",
            "int4-all:layers=4t64/4c64",
        ] {
            assert!(bad.parse::<KvPolicy>().is_err(), "{bad}");
        }
    }

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
    fn a_head_dim_no_group_divides_is_named_with_the_policy_that_runs_it() {
        for h in [8, 16, 24, 40, 48, 80, 200] {
            for spelled in ["mixed", "int8-frames", "int4-all", "mixed:layers=4c64/8t32"] {
                let p: KvPolicy = spelled.parse().unwrap();
                let why = p
                    .head_dim_problem(h)
                    .unwrap_or_else(|| panic!("{spelled} on head_dim {h}"));
                assert!(why.contains(&format!("head_dim {h} ")), "{why}");
                assert!(why.contains("`fp16`"), "{why}");
                assert!(why.contains(&format!("`{}`", p.name())), "{why}");
            }
            assert_eq!(KvPolicy::fp16().head_dim_problem(h), None);
            assert_eq!(
                "fp16:budget=0.3"
                    .parse::<KvPolicy>()
                    .unwrap()
                    .head_dim_problem(h),
                None
            );
        }
        // Every head dim that is a multiple of 32 runs every quantized policy once fitted.
        for h in (32..=512).step_by(32) {
            for (name, p) in KvPolicy::presets() {
                assert_eq!(p.head_dim_problem(h), None, "{name} on {h}");
            }
            let g128: KvPolicy = "mixed:group=128,layers=2t128/4c64".parse().unwrap();
            assert_eq!(g128.head_dim_problem(h), None, "{h}");
        }
    }

    #[test]
    fn the_policy_in_effect_takes_the_package_blocks_and_fits_the_group() {
        let pkg: KvPolicy = "mixed:fblock=16,qblock=16".parse().unwrap();
        let m = KvPolicy::mixed();
        assert_eq!(m.clone().in_effect("mixed", Some(&pkg), 64), pkg);
        assert_eq!(
            m.clone().in_effect("mixed", Some(&pkg), 96).name(),
            "mixed:group=32,fblock=16,qblock=16"
        );
        assert_eq!(m.clone().in_effect("mixed", None, 64), m);
        // Block sizes the spelling names are kept.
        let q: KvPolicy = "int8-frames:qblock=32".parse().unwrap();
        assert_eq!(
            q.in_effect("int8-frames:qblock=32", Some(&pkg), 64).name(),
            "mixed:bits=8,fblock=16,qblock=32"
        );
    }

    #[test]
    fn lists_split_between_policies_not_inside_them() {
        assert_eq!(split_policies("fp16,mixed"), ["fp16", "mixed"]);
        assert_eq!(
            split_policies("fp16, mixed:bits=2,group=32 ,int8-frames,mixed:salient=on"),
            [
                "fp16",
                "mixed:bits=2,group=32",
                "int8-frames",
                "mixed:salient=on"
            ]
        );
        // A key with no policy before it stays a piece of its own, for the parser to refuse.
        assert_eq!(split_policies("group=32,fp16"), ["group=32", "fp16"]);
        assert!(split_policies(" , ").is_empty());
        for list in ["fp16,mixed:bits=2,group=32", "int4-all:group=128,budget=0"] {
            for p in split_policies(list) {
                p.parse::<KvPolicy>().unwrap();
            }
        }
    }

    #[test]
    fn serde_uses_the_canonical_name() {
        let p: KvPolicy = serde_json::from_str("\"int8-frames\"").unwrap();
        assert_eq!(p, KvPolicy::int8_frames());
        assert!(serde_json::from_str::<KvPolicy>("\"int9\"").is_err());
        assert_eq!(
            serde_json::to_string(&KvPolicy::fp16()).unwrap(),
            "\"fp16\""
        );
    }
}
