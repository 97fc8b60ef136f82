//! Reads an ONNX model's input/output signature (names, element types, shapes) straight
//! from the protobuf, without loading its weights: the file is memory-mapped and the
//! initializer payloads are skipped, never touched. The package loader uses it to check the
//! encoder against the manifest before anything heavy happens.

use crate::VisionError;
use std::path::Path;

/// ONNX `TensorProto.DataType` values jetvlm cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemType {
    F32,
    U8,
    F16,
    BF16,
    I64,
    Other(i64),
}

impl ElemType {
    fn from_onnx(v: i64) -> Self {
        match v {
            1 => ElemType::F32,
            2 => ElemType::U8,
            10 => ElemType::F16,
            16 => ElemType::BF16,
            7 => ElemType::I64,
            o => ElemType::Other(o),
        }
    }
}

impl std::fmt::Display for ElemType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ElemType::F32 => f.write_str("f32"),
            ElemType::U8 => f.write_str("u8"),
            ElemType::F16 => f.write_str("f16"),
            ElemType::BF16 => f.write_str("bf16"),
            ElemType::I64 => f.write_str("i64"),
            ElemType::Other(v) => write!(f, "onnx type {v}"),
        }
    }
}

/// One dimension: a fixed size, or symbolic/unknown (`None`).
pub type Dim = Option<i64>;

/// A graph input or output.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSig {
    pub name: String,
    pub elem: ElemType,
    pub shape: Vec<Dim>,
}

/// The model's real inputs (initializers excluded) and outputs, in graph order.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxSignature {
    pub inputs: Vec<TensorSig>,
    pub outputs: Vec<TensorSig>,
}

/// Checks that `path` is a regular file before it is read as an ONNX model: a directory is
/// said to be one (opening it would succeed and fail later as "no such device" or a parse
/// error), a missing path is an I/O error naming it.
pub fn check_model_file(path: &Path) -> Result<(), VisionError> {
    let meta = std::fs::metadata(path).map_err(|source| VisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_file() {
        return Ok(());
    }
    let what = if meta.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    Err(VisionError::OnnxFormat {
        path: path.to_path_buf(),
        message: format!("{what}, not an .onnx model file"),
    })
}

/// Reads the signature of the ONNX model at `path`.
pub fn read_signature(path: &Path) -> Result<OnnxSignature, VisionError> {
    check_model_file(path)?;
    let file = std::fs::File::open(path).map_err(|source| VisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the map is read-only and lives only inside this function; a file truncated
    // underneath us is the one hazard, as with any reader of a model file.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| VisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_model(&map).map_err(|message| VisionError::OnnxFormat {
        path: path.to_path_buf(),
        message,
    })
}

/// Parses `ModelProto` bytes.
pub fn parse_model(bytes: &[u8]) -> Result<OnnxSignature, String> {
    let mut graph = None;
    for field in Fields::new(bytes) {
        let (num, value) = field?;
        if num == 7 {
            graph = Some(value.bytes()?);
        }
    }
    let graph = graph.ok_or("no graph in the model")?;
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    let mut initializers = std::collections::HashSet::new();
    for field in Fields::new(graph) {
        let (num, value) = field?;
        match num {
            5 => {
                // TensorProto: only its name (field 8) is read.
                for f in Fields::new(value.bytes()?) {
                    let (n, v) = f?;
                    if n == 8 {
                        initializers.insert(v.string()?);
                    }
                }
            }
            11 => inputs.push(parse_value_info(value.bytes()?)?),
            12 => outputs.push(parse_value_info(value.bytes()?)?),
            _ => {}
        }
    }
    inputs.retain(|i| !initializers.contains(&i.name));
    Ok(OnnxSignature { inputs, outputs })
}

fn parse_value_info(bytes: &[u8]) -> Result<TensorSig, String> {
    let mut sig = TensorSig {
        name: String::new(),
        elem: ElemType::Other(0),
        shape: Vec::new(),
    };
    for field in Fields::new(bytes) {
        let (num, value) = field?;
        match num {
            1 => sig.name = value.string()?,
            2 => {
                for f in Fields::new(value.bytes()?) {
                    let (n, v) = f?;
                    if n == 1 {
                        parse_tensor_type(v.bytes()?, &mut sig)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(sig)
}

fn parse_tensor_type(bytes: &[u8], sig: &mut TensorSig) -> Result<(), String> {
    for field in Fields::new(bytes) {
        let (num, value) = field?;
        match num {
            1 => sig.elem = ElemType::from_onnx(value.varint()? as i64),
            2 => {
                for f in Fields::new(value.bytes()?) {
                    let (n, dim) = f?;
                    if n == 1 {
                        let mut d = None;
                        for g in Fields::new(dim.bytes()?) {
                            let (k, v) = g?;
                            if k == 1 {
                                d = Some(v.varint()? as i64);
                            }
                        }
                        sig.shape.push(d);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

impl<'a> Value<'a> {
    fn bytes(self) -> Result<&'a [u8], String> {
        match self {
            Value::Bytes(b) => Ok(b),
            _ => Err("expected a length-delimited field".into()),
        }
    }
    fn string(self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "name is not UTF-8".to_string())
    }
    fn varint(self) -> Result<u64, String> {
        match self {
            Value::Varint(v) => Ok(v),
            _ => Err("expected a varint field".into()),
        }
    }
}

/// Iterator over the top-level fields of one protobuf message.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fields {
            buf,
            pos: 0,
            failed: false,
        }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn next_field(&mut self) -> Result<(u64, Value<'a>), String> {
        let key = self.varint()?;
        let num = key >> 3;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.skip(8)?;
                Value::Fixed
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
                let start = self.pos;
                self.skip(len)?;
                Value::Bytes(&self.buf[start..start + len])
            }
            5 => {
                self.skip(4)?;
                Value::Fixed
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok((num, value))
    }

    fn skip(&mut self, n: usize) -> Result<(), String> {
        let end = self.pos.checked_add(n).ok_or("length overflow")?;
        if end > self.buf.len() {
            return Err("truncated field".into());
        }
        self.pos = end;
        Ok(())
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), String>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let r = self.next_field();
        self.failed = r.is_err();
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn bytes_field(num: u64, payload: &[u8], out: &mut Vec<u8>) {
        varint(num << 3 | 2, out);
        varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }
    fn varint_field(num: u64, v: u64, out: &mut Vec<u8>) {
        varint(num << 3, out);
        varint(v, out);
    }
    fn value_info(name: &str, elem: u64, dims: &[Option<i64>]) -> Vec<u8> {
        let mut shape = Vec::new();
        for d in dims {
            let mut dim = Vec::new();
            match d {
                Some(v) => varint_field(1, *v as u64, &mut dim),
                None => bytes_field(2, b"batch", &mut dim),
            }
            bytes_field(1, &dim, &mut shape);
        }
        let mut tensor = Vec::new();
        varint_field(1, elem, &mut tensor);
        bytes_field(2, &shape, &mut tensor);
        let mut ty = Vec::new();
        bytes_field(1, &tensor, &mut ty);
        let mut vi = Vec::new();
        bytes_field(1, name.as_bytes(), &mut vi);
        bytes_field(2, &ty, &mut vi);
        vi
    }

    #[test]
    fn parses_hand_built_model() {
        let mut graph = Vec::new();
        let mut init = Vec::new();
        varint_field(2, 1, &mut init);
        bytes_field(8, b"weight", &mut init);
        bytes_field(9, &[0u8; 64], &mut init);
        bytes_field(5, &init, &mut graph);
        bytes_field(
            11,
            &value_info("pixel_values", 1, &[None, Some(3), Some(32), Some(32)]),
            &mut graph,
        );
        bytes_field(11, &value_info("weight", 1, &[Some(16)]), &mut graph);
        bytes_field(
            12,
            &value_info("embeds", 1, &[None, Some(16), Some(64)]),
            &mut graph,
        );
        let mut model = Vec::new();
        varint_field(1, 8, &mut model);
        bytes_field(7, &graph, &mut model);
        let sig = parse_model(&model).unwrap();
        assert_eq!(sig.inputs.len(), 1, "initializer inputs are dropped");
        assert_eq!(sig.inputs[0].name, "pixel_values");
        assert_eq!(sig.inputs[0].shape, vec![None, Some(3), Some(32), Some(32)]);
        assert_eq!(sig.outputs[0].elem, ElemType::F32);
        assert_eq!(sig.outputs[0].shape, vec![None, Some(16), Some(64)]);
        assert!(parse_model(&model[..model.len() - 3]).is_err());
    }
}
