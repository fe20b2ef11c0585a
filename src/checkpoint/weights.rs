//! Safetensors weights of a checkpoint, single-file or sharded, memory-mapped and read one tensor
//! at a time so a multi-gigabyte student never sits in memory twice.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors, tensor::Metadata};

use super::CheckpointError;

/// Name of the single-file weights.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the index of sharded weights.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// Where one tensor lives and what it looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// Element type as stored.
    pub dtype: Dtype,
    /// Shape as stored.
    pub shape: Vec<usize>,
}

/// All tensors of a checkpoint, by name.
pub struct Weights {
    shards: Vec<Shard>,
    by_name: HashMap<String, usize>,
}

impl Weights {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let index = dir.join(SHARD_INDEX);
        let files: Vec<PathBuf> = if index.exists() {
            shard_files(&index)?.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join(SINGLE_FILE)]
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut by_name = HashMap::new();
        for path in files {
            let shard = open_shard(path)?;
            for name in shard.metadata.tensors().keys() {
                by_name.insert(name.clone(), shards.len());
            }
            shards.push(shard);
        }
        Ok(Self { shards, by_name })
    }

    /// The files the weights were read from.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// The dtype and shape of a tensor.
    pub fn meta(&self, name: &str) -> Result<TensorMeta, CheckpointError> {
        let shard = self.shard(name)?;
        let info = shard.metadata.info(name).ok_or_else(|| missing(name))?;
        Ok(TensorMeta {
            dtype: info.dtype,
            shape: info.shape.clone(),
        })
    }

    /// A tensor converted to `f32`, row-major.
    pub fn f32(&self, name: &str) -> Result<Vec<f32>, CheckpointError> {
        let shard = self.shard(name)?;
        let info = shard.metadata.info(name).ok_or_else(|| missing(name))?;
        let (start, end) = info.data_offsets;
        let base = 8 + shard.header_len;
        let bytes = shard
            .map
            .get(base + start..base + end)
            .ok_or_else(|| CheckpointError::Weights {
                file: shard.path.clone(),
                message: format!("tensor `{name}` points past the end of the file"),
            })?;
        let values = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(CheckpointError::Weights {
                    file: shard.path.clone(),
                    message: format!("tensor `{name}` has dtype {other:?}; supported: F32, F16, BF16"),
                });
            }
        };
        Ok(values)
    }

    fn shard(&self, name: &str) -> Result<&Shard, CheckpointError> {
        self.by_name
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| missing(name))
    }
}

fn missing(name: &str) -> CheckpointError {
    CheckpointError::MissingTensor(name.to_string())
}

fn shard_files(index: &Path) -> Result<Vec<String>, CheckpointError> {
    let bad = |message: String| CheckpointError::Weights {
        file: index.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("field `weight_map` is missing".into()))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("`weight_map.{tensor}` is not a file name")))?;
        if file.contains('/') || file.contains("..") {
            return Err(bad(format!(
                "`weight_map.{tensor}` names a file outside the checkpoint: {file}"
            )));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    files.sort();
    Ok(files)
}

fn open_shard(path: PathBuf) -> Result<Shard, CheckpointError> {
    let bad = |message: String| CheckpointError::Weights {
        file: path.clone(),
        message,
    };
    let file = File::open(&path).map_err(|e| bad(e.to_string()))?;
    // SAFETY: the checkpoint files are only read; a concurrent writer truncating them would be a
    // misuse of the model repository, as with every mmap-based loader (candle, safetensors).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| bad(e.to_string()))?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&map).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    Ok(Shard {
        path,
        map,
        header_len,
        metadata,
    })
}
