//! Memory-mapped safetensors weights: a single `model.safetensors`, a sharded set named by
//! `model.safetensors.index.json`, or every `*.safetensors` in the directory.
//!
//! Tensors stay in their stored type (F32, F16, BF16) inside the mapping; nothing is copied
//! unless a tensor's data is misaligned for its type or a conversion is requested.

use crate::error::{DecoderError, Result};
use half::{bf16, f16};
use jetvlm_core::DType;
use memmap2::Mmap;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes of one tensor: a range of a mapped file, or an owned, 4-byte aligned copy.
#[derive(Clone)]
enum Bytes {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned {
        words: Arc<Vec<u32>>,
        len: usize,
    },
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, start, len } => &map[*start..*start + *len],
            Bytes::Owned { words, len } => &bytemuck::cast_slice::<u32, u8>(words)[..*len],
        }
    }

    fn owned(bytes: &[u8]) -> Self {
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Bytes::Owned {
            words: Arc::new(words),
            len: bytes.len(),
        }
    }
}

/// One tensor in its stored element type, row-major.
#[derive(Clone)]
pub struct Tensor {
    name: String,
    path: PathBuf,
    dtype: DType,
    shape: Vec<usize>,
    bytes: Bytes,
}

/// A typed view of a tensor's elements.
#[derive(Clone, Copy, Debug)]
pub enum TensorData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl TensorData<'_> {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(s) => s.len(),
            TensorData::F16(s) => s.len(),
            TensorData::BF16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            TensorData::F32(s) => s[i],
            TensorData::F16(s) => s[i].to_f32(),
            TensorData::BF16(s) => s[i].to_f32(),
        }
    }

    /// Elements `range` converted to f32 into `out`.
    pub fn to_f32_into(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            TensorData::F32(s) => out.copy_from_slice(&s[start..start + n]),
            TensorData::F16(s) => {
                for (o, v) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = v.to_f32();
                }
            }
            TensorData::BF16(s) => {
                for (o, v) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = v.to_f32();
                }
            }
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
        }
    }
}

impl Tensor {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file the tensor was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the stored elements.
    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size_bytes()
    }

    /// The elements in their stored type. Alignment was checked (or fixed by a copy) when
    /// the tensor was opened.
    pub fn data(&self) -> TensorData<'_> {
        let b = self.bytes.as_slice();
        match self.dtype {
            DType::F16 => TensorData::F16(bytemuck::cast_slice(b)),
            DType::BF16 => TensorData::BF16(bytemuck::cast_slice(b)),
            _ => TensorData::F32(bytemuck::cast_slice(b)),
        }
    }

    /// All elements as f32 (a copy).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.data().to_f32_into(0, &mut out);
        out
    }

    /// The same tensor converted to `dtype` (an owned copy; no-op when already `dtype`).
    pub fn converted(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        let vals = self.to_f32_vec();
        let bytes = match dtype {
            DType::F32 => Bytes::owned(bytemuck::cast_slice(&vals)),
            DType::F16 => {
                let v: Vec<f16> = vals.iter().map(|&x| f16::from_f32(x)).collect();
                Bytes::owned(bytemuck::cast_slice(&v))
            }
            DType::BF16 => {
                let v: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x)).collect();
                Bytes::owned(bytemuck::cast_slice(&v))
            }
            other => {
                return Err(DecoderError::DType {
                    name: self.name.clone(),
                    path: self.path.clone(),
                    dtype: format!("conversion to {other}"),
                });
            }
        };
        Ok(Tensor {
            dtype,
            bytes,
            ..self.clone()
        })
    }

    /// Builds an owned f32 tensor (tests, synthetic weights).
    pub fn from_f32(name: &str, shape: Vec<usize>, values: &[f32]) -> Tensor {
        Tensor {
            name: name.to_string(),
            path: PathBuf::from("<memory>"),
            dtype: DType::F32,
            shape,
            bytes: Bytes::owned(bytemuck::cast_slice(values)),
        }
    }
}

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    len: usize,
}

/// The weight files of one model directory, memory-mapped, with a name -> tensor table.
pub struct Weights {
    dir: PathBuf,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    table: HashMap<String, Entry>,
}

impl Weights {
    /// Opens the weights of a Hugging Face model directory. Headers are validated here (a
    /// truncated file or a shard missing from the index is an error naming the file); the
    /// tensor data is touched only when the model reads it.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut shard_names: Vec<PathBuf> = Vec::new();
        let mut expected: HashMap<String, PathBuf> = HashMap::new();
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|source| DecoderError::Io {
                path: index.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| DecoderError::Index {
                    path: index.clone(),
                    msg: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| DecoderError::Index {
                    path: index.clone(),
                    msg: "no `weight_map` object".into(),
                })?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| DecoderError::Index {
                    path: index.clone(),
                    msg: format!("weight_map[`{name}`] is not a file name"),
                })?;
                let p = dir.join(file);
                if !shard_names.contains(&p) {
                    shard_names.push(p.clone());
                }
                expected.insert(name.clone(), p);
            }
            for p in &shard_names {
                if !p.is_file() {
                    let tensor = expected
                        .iter()
                        .find(|(_, f)| *f == p)
                        .map(|(n, _)| n.clone())
                        .unwrap_or_default();
                    return Err(DecoderError::Index {
                        path: index.clone(),
                        msg: format!(
                            "shard {} (holding `{tensor}` among others) does not exist",
                            p.display()
                        ),
                    });
                }
            }
        } else if single.is_file() {
            shard_names.push(single);
        } else {
            let rd = std::fs::read_dir(dir).map_err(|source| DecoderError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "safetensors") {
                    shard_names.push(p);
                }
            }
            shard_names.sort();
        }
        if shard_names.is_empty() {
            return Err(DecoderError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }

        let mut files = Vec::new();
        let mut table = HashMap::new();
        for (fi, path) in shard_names.into_iter().enumerate() {
            let file = File::open(&path).map_err(|source| DecoderError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the mapping is read-only; a file modified while mapped is outside the
            // contract of model directories (the same as every mmap-based loader).
            let map = unsafe { Mmap::map(&file) }.map_err(|source| DecoderError::Io {
                path: path.clone(),
                source,
            })?;
            let st = SafeTensors::deserialize(&map).map_err(|e| DecoderError::Safetensors {
                path: path.clone(),
                msg: describe(&e),
            })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    other => {
                        // Recorded as unsupported; an error only if the model reads it.
                        tracing::debug!(
                            tensor = name,
                            ?other,
                            "skipping tensor of unsupported dtype"
                        );
                        table.insert(
                            name,
                            Entry {
                                file: fi,
                                dtype: DType::U8,
                                shape: view.shape().to_vec(),
                                start: 0,
                                len: 0,
                            },
                        );
                        continue;
                    }
                };
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                table.insert(
                    name,
                    Entry {
                        file: fi,
                        dtype,
                        shape: view.shape().to_vec(),
                        start,
                        len: data.len(),
                    },
                );
            }
            drop(st);
            files.push((path, Arc::new(map)));
        }
        for (name, p) in &expected {
            if !table.contains_key(name) {
                return Err(DecoderError::Index {
                    path: index.clone(),
                    msg: format!(
                        "tensor `{name}` is listed in shard {} but absent from it",
                        p.display()
                    ),
                });
            }
        }
        Ok(Weights {
            dir: dir.to_path_buf(),
            files,
            table,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.table.contains_key(name)
    }

    /// Total bytes of the mapped files.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|(_, m)| m.len() as u64).sum()
    }

    /// The tensor `name`, checked against `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self
            .table
            .get(name)
            .ok_or_else(|| DecoderError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })?;
        let (path, map) = &self.files[e.file];
        if e.dtype == DType::U8 {
            return Err(DecoderError::DType {
                name: name.to_string(),
                path: path.clone(),
                dtype: "non-float".into(),
            });
        }
        if e.shape != shape {
            return Err(DecoderError::Shape {
                name: name.to_string(),
                path: path.clone(),
                expected: shape.to_vec(),
                actual: e.shape.clone(),
            });
        }
        let align = e.dtype.size_bytes();
        let bytes = if (map.as_ptr() as usize + e.start).is_multiple_of(align) {
            Bytes::Mapped {
                map: map.clone(),
                start: e.start,
                len: e.len,
            }
        } else {
            Bytes::owned(&map[e.start..e.start + e.len])
        };
        Ok(Tensor {
            name: name.to_string(),
            path: path.clone(),
            dtype: e.dtype,
            shape: e.shape.clone(),
            bytes,
        })
    }
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            "truncated: the header's tensors do not fit the file's data".into()
        }
        E::InvalidOffset(t) => {
            format!("truncated or corrupt: offsets of tensor `{t}` fall outside the file")
        }
        E::HeaderTooSmall | E::InvalidHeaderLength => {
            "truncated or not a safetensors file (bad header length)".into()
        }
        E::InvalidTensorView(d, s, n) => {
            format!("tensor data of {n} bytes does not match {d:?} {s:?}")
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_bytes_are_aligned_and_round_trip() {
        let t = Tensor::from_f32("w", vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(t.to_f32_vec(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let h = t.converted(DType::BF16).unwrap();
        assert_eq!(h.dtype(), DType::BF16);
        assert_eq!(h.to_f32_vec(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let f = t.converted(DType::F16).unwrap();
        assert_eq!(f.data().get(5), 6.0);
    }

    #[test]
    fn empty_dir_has_no_weights() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            Weights::open(d.path()),
            Err(DecoderError::NoWeights { .. })
        ));
    }
}
