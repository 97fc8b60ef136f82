//! The format description of a quantized decoder: the `quantization_config` entry of its
//! `config.json` (`quant_method: jetvlm`). One definition, written by `jetvlm quantize` and
//! the AWQ / GPTQ / GGUF conversions, checked against the tensors when a decoder loads, and
//! charged by the memory planner.
//!
//! ```json
//! "quantization_config": {
//!   "quant_method": "jetvlm", "bits": 4, "group_size": 32,
//!   "lm_head_bits": 8, "embed_bits": null, "converted_from": "gguf",
//!   "overrides": {
//!     "layers.*.self_attn.v_proj": {"bits": 8, "group_size": 32, "zero_point": false},
//!     "layers.3.mlp.down_proj":    {"bits": 8, "group_size": 32}
//!   }
//! }
//! ```
//!
//! `bits` / `group_size` is the format of every layer matrix (q/k/v/o, gate/up/down) that no
//! override names. An override key is `layers.<N|*>.<matrix>` (`<matrix>` one of
//! [`MatrixRole::name`]); an entry for one layer wins over a `*` entry. Each override gives
//! the matrix's own `bits` (4 or 8), `group_size` (32, 64, 128) and, optionally,
//! `zero_point` (true for INT4, which stores a zero per group; false for INT8, symmetric).
//! `lm_head_bits` and `embed_bits` give the output head's and the embedding table's bits
//! (null: as stored). Every error names the field (`overrides.layers.3.mlp.down_proj.bits`).

use crate::QuantError;
use crate::weight::WeightFormat;
use serde_json::{Map, Value};

/// One of the seven matrices of a decoder layer, named as in Hugging Face checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatrixRole {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl MatrixRole {
    /// Every role, in the order a layer holds them (q, k, v, o, gate, up, down).
    pub const ALL: [MatrixRole; 7] = [
        MatrixRole::Q,
        MatrixRole::K,
        MatrixRole::V,
        MatrixRole::O,
        MatrixRole::Gate,
        MatrixRole::Up,
        MatrixRole::Down,
    ];

    /// The matrix's name inside a layer (`self_attn.v_proj`, `mlp.down_proj`).
    pub fn name(self) -> &'static str {
        match self {
            MatrixRole::Q => "self_attn.q_proj",
            MatrixRole::K => "self_attn.k_proj",
            MatrixRole::V => "self_attn.v_proj",
            MatrixRole::O => "self_attn.o_proj",
            MatrixRole::Gate => "mlp.gate_proj",
            MatrixRole::Up => "mlp.up_proj",
            MatrixRole::Down => "mlp.down_proj",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == s)
    }
}

/// Which layers an override applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layers {
    All,
    One(usize),
}

/// One entry of `overrides`: a layer matrix (or the same matrix of every layer) held in its
/// own format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatrixOverride {
    pub layers: Layers,
    pub role: MatrixRole,
    pub format: WeightFormat,
}

impl MatrixOverride {
    /// Its key: `layers.<N|*>.<matrix>`.
    pub fn key(&self) -> String {
        match self.layers {
            Layers::All => format!("layers.*.{}", self.role.name()),
            Layers::One(n) => format!("layers.{n}.{}", self.role.name()),
        }
    }

    /// Parses a key (`layers.3.mlp.down_proj`, `layers.*.self_attn.v_proj`).
    pub fn parse_key(key: &str) -> Option<(Layers, MatrixRole)> {
        let rest = key.strip_prefix("layers.")?;
        let (sel, role) = rest.split_once('.')?;
        let layers = match sel {
            "*" => Layers::All,
            n if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                Layers::One(n.parse().ok()?)
            }
            _ => return None,
        };
        Some((layers, MatrixRole::from_name(role)?))
    }
}

impl std::fmt::Display for MatrixOverride {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} int{} g{}",
            self.key(),
            self.format.bits(),
            self.format.group()
        )
    }
}

impl serde::Serialize for MatrixOverride {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The format of the matrix `role` of layer `layer`: an override for that layer, else one
/// for every layer, else `base`.
pub fn matrix_format(
    base: WeightFormat,
    overrides: &[MatrixOverride],
    layer: usize,
    role: MatrixRole,
) -> WeightFormat {
    let find = |l: Layers| {
        overrides
            .iter()
            .find(|o| o.role == role && o.layers == l)
            .map(|o| o.format)
    };
    find(Layers::One(layer))
        .or_else(|| find(Layers::All))
        .unwrap_or(base)
}

/// The override that decides the matrix `role` of layer `layer`, if any.
pub fn matrix_override(
    overrides: &[MatrixOverride],
    layer: usize,
    role: MatrixRole,
) -> Option<&MatrixOverride> {
    let find = |l: Layers| overrides.iter().find(|o| o.role == role && o.layers == l);
    find(Layers::One(layer)).or_else(|| find(Layers::All))
}

/// A `jetvlm` `quantization_config`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizationConfig {
    /// Format of the layer matrices no override names (`bits`, `group_size`).
    pub format: WeightFormat,
    /// Bits of a quantized LM head (its group is `group_size`); `None`: as stored.
    pub lm_head_bits: Option<u32>,
    /// Bits of a quantized embedding table (a converted GGUF's); `None`: as stored.
    pub embed_bits: Option<u32>,
    /// What the decoder was converted from (`awq`, `gptq`, `gguf`).
    pub converted_from: Option<String>,
    /// Layer matrices in their own format, sorted by key.
    pub overrides: Vec<MatrixOverride>,
}

fn cfg_err(field: impl Into<String>, msg: impl Into<String>) -> QuantError {
    QuantError::Config {
        field: field.into(),
        msg: msg.into(),
    }
}

/// A whole number field of `obj` (`None` when absent or null), naming `field` when not.
fn number(obj: &Map<String, Value>, key: &str, field: &str) -> Result<Option<u64>, QuantError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| cfg_err(field, format!("{v} is not a whole number"))),
    }
}

/// A format from `bits` / `group_size` fields, errors naming `prefix` + the field.
fn format_of(obj: &Map<String, Value>, prefix: &str) -> Result<WeightFormat, QuantError> {
    let f = |k: &str| format!("{prefix}{k}");
    let bits = number(obj, "bits", &f("bits"))?.ok_or_else(|| cfg_err(f("bits"), "missing"))?;
    let group = number(obj, "group_size", &f("group_size"))?
        .ok_or_else(|| cfg_err(f("group_size"), "missing"))?;
    let bits32 = u32::try_from(bits).map_err(|_| cfg_err(f("bits"), format!("{bits}")))?;
    if !matches!(bits32, 4 | 8) {
        return Err(cfg_err(f("bits"), format!("{bits} (expected 4 or 8)")));
    }
    let group = usize::try_from(group)
        .ok()
        .filter(|g| crate::format::GROUPS.contains(g))
        .ok_or_else(|| cfg_err(f("group_size"), format!("{group} (expected 32, 64 or 128)")))?;
    WeightFormat::new(bits32, group).map_err(|e| cfg_err(f("bits"), e.to_string()))
}

impl QuantizationConfig {
    /// Every layer matrix in `format`, head and table as stored, no overrides.
    pub fn new(format: WeightFormat) -> Self {
        QuantizationConfig {
            format,
            lm_head_bits: None,
            embed_bits: None,
            converted_from: None,
            overrides: Vec::new(),
        }
    }

    /// The format of layer `layer`'s matrix `role`.
    pub fn matrix_format(&self, layer: usize, role: MatrixRole) -> WeightFormat {
        matrix_format(self.format, &self.overrides, layer, role)
    }

    /// Adds (or replaces) the override for `layers` / `role`, keeping them sorted by key.
    pub fn set_override(&mut self, layers: Layers, role: MatrixRole, format: WeightFormat) {
        self.overrides
            .retain(|o| !(o.layers == layers && o.role == role));
        self.overrides.push(MatrixOverride {
            layers,
            role,
            format,
        });
        self.overrides.sort_by_key(|o| o.key());
    }

    /// Reads a `quantization_config` whose `quant_method` is `jetvlm`. Errors name the field
    /// (relative to `quantization_config`).
    pub fn from_json(q: &Value) -> Result<Self, QuantError> {
        let obj = q
            .as_object()
            .ok_or_else(|| cfg_err("(entry)", format!("{q} is not a JSON object")))?;
        match obj.get("quant_method").and_then(|m| m.as_str()) {
            Some("jetvlm") => {}
            other => {
                return Err(cfg_err(
                    "quant_method",
                    format!(
                        "{} (expected `jetvlm`)",
                        other.map_or_else(|| "(missing)".into(), |m| format!("`{m}`"))
                    ),
                ));
            }
        }
        let format = format_of(obj, "")?;
        let bits_field = |key: &str| -> Result<Option<u32>, QuantError> {
            match number(obj, key, key)? {
                None => Ok(None),
                Some(b @ (4 | 8)) => Ok(Some(b as u32)),
                Some(b) => Err(cfg_err(key, format!("{b} (expected 4, 8 or null)"))),
            }
        };
        let lm_head_bits = bits_field("lm_head_bits")?;
        let embed_bits = bits_field("embed_bits")?;
        let converted_from = match obj.get("converted_from") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => return Err(cfg_err("converted_from", format!("{v} is not a string"))),
        };
        let mut cfg = QuantizationConfig {
            format,
            lm_head_bits,
            embed_bits,
            converted_from,
            overrides: Vec::new(),
        };
        match obj.get("overrides") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (key, v) in m {
                    let field = format!("overrides.{key}");
                    let (layers, role) = MatrixOverride::parse_key(key).ok_or_else(|| {
                        cfg_err(
                            &field,
                            format!(
                                "not a layer matrix: expected layers.<N|*>.<matrix>, <matrix> one of {}",
                                MatrixRole::ALL.map(|r| r.name()).join(", ")
                            ),
                        )
                    })?;
                    let e = v.as_object().ok_or_else(|| {
                        cfg_err(
                            &field,
                            format!("{v} is not an object with bits and group_size"),
                        )
                    })?;
                    let fmt = format_of(e, &format!("{field}."))?;
                    match e.get("zero_point") {
                        None | Some(Value::Null) => {}
                        Some(Value::Bool(z)) if *z == fmt.has_zeros() => {}
                        Some(v) => {
                            return Err(cfg_err(
                                format!("{field}.zero_point"),
                                format!(
                                    "{v}: INT{} weights are {}",
                                    fmt.bits(),
                                    if fmt.has_zeros() {
                                        "asymmetric (a zero per group, zero_point true)"
                                    } else {
                                        "symmetric (no zero point, zero_point false)"
                                    }
                                ),
                            ));
                        }
                    }
                    cfg.set_override(layers, role, fmt);
                }
            }
            Some(v) => {
                return Err(cfg_err(
                    "overrides",
                    format!("{v} is not an object of layers.<N|*>.<matrix> entries"),
                ));
            }
        }
        Ok(cfg)
    }

    /// The JSON entry (`overrides` only when there are some).
    pub fn to_json(&self) -> Value {
        let mut q = serde_json::json!({
            "quant_method": "jetvlm",
            "bits": self.format.bits(),
            "group_size": self.format.group(),
            "lm_head_bits": self.lm_head_bits,
        });
        if let Some(obj) = q.as_object_mut() {
            if let Some(from) = &self.converted_from {
                obj.insert("converted_from".into(), from.as_str().into());
            }
            if self.embed_bits.is_some() || self.converted_from.as_deref() == Some("gguf") {
                obj.insert("embed_bits".into(), self.embed_bits.into());
            }
            if !self.overrides.is_empty() {
                let m: Map<String, Value> = self
                    .overrides
                    .iter()
                    .map(|o| {
                        (
                            o.key(),
                            serde_json::json!({
                                "bits": o.format.bits(),
                                "group_size": o.format.group(),
                                "zero_point": o.format.has_zeros(),
                            }),
                        )
                    })
                    .collect();
                obj.insert("overrides".into(), m.into());
            }
        }
        q
    }

    /// Checks that every override names a layer of a `layers`-layer decoder.
    pub fn check_layers(&self, layers: usize) -> Result<(), QuantError> {
        for o in &self.overrides {
            if let Layers::One(n) = o.layers
                && n >= layers
            {
                return Err(cfg_err(
                    format!("overrides.{}", o.key()),
                    format!("names layer {n} of a decoder with {layers} layers"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(bits: u32, group: usize) -> WeightFormat {
        WeightFormat::new(bits, group).unwrap()
    }

    #[test]
    fn round_trips_and_resolves_per_matrix() {
        let mut c = QuantizationConfig::new(fmt(4, 32));
        c.lm_head_bits = Some(8);
        c.converted_from = Some("gguf".into());
        c.set_override(Layers::All, MatrixRole::V, fmt(8, 32));
        c.set_override(Layers::One(2), MatrixRole::V, fmt(4, 64));
        c.set_override(Layers::One(0), MatrixRole::Down, fmt(8, 128));
        let j = c.to_json();
        assert_eq!(j["overrides"]["layers.*.self_attn.v_proj"]["bits"], 8);
        assert_eq!(
            j["overrides"]["layers.0.mlp.down_proj"]["zero_point"],
            false
        );
        assert_eq!(j["embed_bits"], Value::Null);
        let back = QuantizationConfig::from_json(&j).unwrap();
        assert_eq!(back, c);
        // One layer's entry wins over `*`; no entry: the base format.
        assert_eq!(c.matrix_format(1, MatrixRole::V), fmt(8, 32));
        assert_eq!(c.matrix_format(2, MatrixRole::V), fmt(4, 64));
        assert_eq!(c.matrix_format(0, MatrixRole::Down), fmt(8, 128));
        assert_eq!(c.matrix_format(1, MatrixRole::Down), fmt(4, 32));
        assert_eq!(c.matrix_format(0, MatrixRole::Q), fmt(4, 32));
        assert!(c.check_layers(3).is_ok());
        let e = c.check_layers(2).unwrap_err().to_string();
        assert!(e.contains("overrides.layers.2.self_attn.v_proj") && e.contains("2 layers"));
        // Without overrides the entry is what it was before overrides existed.
        let plain = QuantizationConfig::new(fmt(8, 64)).to_json();
        assert_eq!(
            plain,
            serde_json::json!({"quant_method": "jetvlm", "bits": 8, "group_size": 64, "lm_head_bits": null})
        );
    }

    #[test]
    fn bad_entries_name_the_field() {
        let base = serde_json::json!({"quant_method": "jetvlm", "bits": 4, "group_size": 32});
        let with = |k: &str, v: Value| {
            let mut j = base.clone();
            j[k] = v;
            j
        };
        for (j, field, says) in [
            (
                with("bits", 3.into()),
                "quantization_config.bits",
                "expected 4 or 8",
            ),
            (with("group_size", 48.into()), "group_size", "48"),
            (with("bits", "4".into()), "bits", "not a whole number"),
            (with("lm_head_bits", 6.into()), "lm_head_bits", "6"),
            (with("quant_method", "awq".into()), "quant_method", "`awq`"),
            (with("overrides", 3.into()), "overrides", "not an object"),
            (
                with(
                    "overrides",
                    serde_json::json!({"layers.0.mlp.fc1": {"bits": 8, "group_size": 32}}),
                ),
                "overrides.layers.0.mlp.fc1",
                "mlp.down_proj",
            ),
            (
                with(
                    "overrides",
                    serde_json::json!({"blk.0.ffn_down": {"bits": 8, "group_size": 32}}),
                ),
                "overrides.blk.0.ffn_down",
                "layers.<N|*>",
            ),
            (
                with(
                    "overrides",
                    serde_json::json!({"layers.x.mlp.down_proj": {"bits": 8, "group_size": 32}}),
                ),
                "overrides.layers.x.mlp.down_proj",
                "layers.<N|*>",
            ),
            (
                with(
                    "overrides",
                    serde_json::json!({"layers.1.mlp.down_proj": {"bits": 6, "group_size": 32}}),
                ),
                "overrides.layers.1.mlp.down_proj.bits",
                "6",
            ),
            (
                with(
                    "overrides",
                    serde_json::json!({"layers.1.mlp.down_proj": {"bits": 8}}),
                ),
                "overrides.layers.1.mlp.down_proj.group_size",
                "missing",
            ),
            (
                with(
                    "overrides",
                    serde_json::json!({"layers.1.mlp.down_proj": {"bits": 8, "group_size": 32, "zero_point": true}}),
                ),
                "overrides.layers.1.mlp.down_proj.zero_point",
                "symmetric",
            ),
            (
                with(
                    "overrides",
                    serde_json::json!({"layers.1.mlp.down_proj": 8}),
                ),
                "overrides.layers.1.mlp.down_proj",
                "not an object",
            ),
        ] {
            let e = QuantizationConfig::from_json(&j).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(says), "{j}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}
