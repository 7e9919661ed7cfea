//! A Hugging Face model folder: `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`) plus `config.json`; tensors are memory-mapped, not copied.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::quant::GgmlType;
use crate::tensor::{QTensor, Storage};
use crate::weights::WeightSource;

struct Entry {
    file: usize,
    dtype: GgmlType,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

/// An opened model folder.
pub struct SafetensorsDir {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub config_json: serde_json::Value,
    files: Vec<(PathBuf, Arc<memmap2::Mmap>)>,
    entries: HashMap<String, Entry>,
    /// Tensors of other element types (name → dtype).
    unsupported: HashMap<String, String>,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config_json: serde_json::Value = read_json(&config_path)?;
        let config = ModelConfig::from_hf_config(&config_path, &config_json)?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if single.exists() {
            vec!["model.safetensors".into()]
        } else if index.exists() {
            let json = read_json(&index)?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| EngineError::format(&index, "`weight_map`: expected an object"))?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names
        } else {
            return Err(EngineError::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in the folder",
            ));
        };
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        let mut unsupported = HashMap::new();
        for name in shard_names {
            let path = dir.join(&name);
            let file = File::open(&path).map_err(|e| EngineError::io(&path, e))?;
            // SAFETY: the mapping is read-only; a model file changing under a running server is
            // outside what the engine can guard against (as with every mmap-based loader).
            let map =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io(&path, e))?;
            let parsed = SafeTensors::deserialize(&map)
                .map_err(|e| EngineError::format(&path, format!("safetensors header: {e}")))?;
            for (tensor_name, view) in parsed.tensors() {
                let dtype = match view.dtype() {
                    Dtype::F32 => GgmlType::F32,
                    Dtype::F16 => GgmlType::F16,
                    Dtype::BF16 => GgmlType::BF16,
                    // Buffers such as BERT's `position_ids` (I64) are not weights; only an
                    // attempt to use one is an error.
                    other => {
                        unsupported.insert(tensor_name, format!("{other:?}"));
                        continue;
                    }
                };
                let data = view.data();
                let offset = data.as_ptr() as usize - map.as_ptr() as usize;
                entries.insert(
                    tensor_name,
                    Entry {
                        file: files.len(),
                        dtype,
                        shape: view.shape().to_vec(),
                        offset,
                        len: data.len(),
                    },
                );
            }
            files.push((path, Arc::new(map)));
        }
        Ok(SafetensorsDir {
            dir: dir.to_path_buf(),
            config,
            config_json,
            files,
            entries,
            unsupported,
        })
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
}

impl WeightSource for SafetensorsDir {
    fn tensor(&self, name: &str) -> Result<QTensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| match self.unsupported.get(name) {
                Some(dtype) => EngineError::format(
                    &self.dir,
                    format!("tensor `{name}`: dtype {dtype} is not supported (F32, F16, BF16)"),
                ),
                None => EngineError::format(&self.dir, format!("tensor `{name}` is missing")),
            })?;
        Ok(QTensor {
            name: name.to_string(),
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            storage: Storage::Mapped {
                map: self.files[entry.file].1.clone(),
                offset: entry.offset,
                len: entry.len,
            },
        })
    }
    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::format(path, format!("invalid JSON: {e}")))
}

/// Write a safetensors file of f32 tensors (synthetic models in tests).
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            (
                name.clone(),
                shape.clone(),
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(name, shape, data)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .map_err(|e| EngineError::format(path, format!("tensor `{name}`: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| EngineError::format(path, format!("writing safetensors: {e}")))
}
