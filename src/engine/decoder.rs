//! Running a decoder in Optimum's "with past" layout: one call is a prefill (empty cache) or a
//! decode step, and the `present` outputs stay in ONNX Runtime's memory as the next `past`.

use std::borrow::Cow;
use std::path::Path;

use ndarray::{Array2, Array3, Array4, Ix3, Ix4};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorRef, ValueType};

use super::{EngineError, SessionOptions, open_session};

/// The key/value cache of a batch: one key and one value tensor
/// `[batch, kv_heads, length, head_dim]` per layer, owned by ONNX Runtime.
pub struct KvCache {
    /// `[key_0, value_0, key_1, value_1, ...]`.
    values: Vec<DynValue>,
    /// Positions held.
    len: usize,
}

impl KvCache {
    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds no position.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the cache out of ONNX Runtime: `[key_0, value_0, key_1, ...]`, each
    /// `[batch, kv_heads, len, head_dim]`.
    pub fn into_arrays(self) -> Result<Vec<Array4<f32>>, EngineError> {
        self.values
            .iter()
            .map(|v| {
                v.try_extract_array::<f32>()?
                    .into_dimensionality::<Ix4>()
                    .map(|a| a.to_owned())
                    .map_err(|e| EngineError::Layout(format!("KV cache: {e}")))
            })
            .collect()
    }

    /// A cache from arrays laid out as [`KvCache::into_arrays`] returns them.
    pub fn from_arrays(arrays: Vec<Array4<f32>>) -> Result<Self, EngineError> {
        let len = arrays.first().map_or(0, |a| a.dim().2);
        let values = arrays
            .into_iter()
            .map(|a| Ok(Tensor::from_array(a.as_standard_layout().into_owned())?.into_dyn()))
            .collect::<Result<_, EngineError>>()?;
        Ok(Self { values, len })
    }
}

/// A decoder session plus the cache geometry read from its inputs.
pub struct DecoderSession {
    session: Session,
    num_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    has_position_ids: bool,
}

impl DecoderSession {
    /// Opens an exported decoder and checks its layout.
    pub fn open(model: &Path, options: SessionOptions) -> Result<Self, EngineError> {
        let session = open_session(model, options)?;
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for required in ["input_ids", "attention_mask"] {
            if !names.contains(&required) {
                return Err(EngineError::Layout(format!("decoder has no `{required}` input")));
            }
        }
        let num_layers = (0..)
            .take_while(|i| names.contains(&format!("past_key_values.{i}.key").as_str()))
            .count();
        let first = session
            .inputs()
            .iter()
            .find(|i| i.name() == "past_key_values.0.key")
            .ok_or_else(|| EngineError::Layout("decoder has no `past_key_values.0.key` input".into()))?;
        let (kv_heads, head_dim) = match first.dtype() {
            ValueType::Tensor { shape, .. } if shape.len() == 4 && shape[1] > 0 && shape[3] > 0 => {
                (shape[1] as usize, shape[3] as usize)
            }
            other => {
                return Err(EngineError::Layout(format!(
                    "past key has no fixed heads/head_dim: {other:?}"
                )));
            }
        };
        let vocab_size = match session
            .outputs()
            .iter()
            .find(|o| o.name() == "logits")
            .map(|o| o.dtype())
        {
            Some(ValueType::Tensor { shape, .. }) if shape.len() == 3 && shape[2] > 0 => shape[2] as usize,
            _ => {
                return Err(EngineError::Layout(
                    "decoder has no `logits` output [batch, seq, vocab]".into(),
                ));
            }
        };
        let has_position_ids = names.contains(&"position_ids");
        Ok(Self {
            session,
            num_layers,
            kv_heads,
            head_dim,
            vocab_size,
            has_position_ids,
        })
    }

    /// Vocabulary size (last axis of `logits`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// An empty cache for `batch` sequences.
    pub fn empty_cache(&self, batch: usize) -> Result<KvCache, EngineError> {
        let values = (0..self.num_layers * 2)
            .map(|_| {
                let empty = Array4::<f32>::zeros((batch, self.kv_heads, 0, self.head_dim));
                Ok(Tensor::from_array(empty)?.into_dyn())
            })
            .collect::<Result<_, EngineError>>()?;
        Ok(KvCache { values, len: 0 })
    }

    /// Runs `input_ids` (`[batch, seq]`) after the cached positions. `attention_mask` covers
    /// cache + new tokens (`[batch, cache + seq]`); `position_ids` are `[batch, seq]`. Returns
    /// the logits `[batch, seq, vocab]` and the cache extended by `seq`.
    pub fn forward(
        &mut self,
        input_ids: &Array2<i64>,
        attention_mask: &Array2<i64>,
        position_ids: &Array2<i64>,
        cache: KvCache,
    ) -> Result<(Array3<f32>, KvCache), EngineError> {
        let (batch, seq) = input_ids.dim();
        let total = cache.len + seq;
        if attention_mask.dim() != (batch, total) || position_ids.dim() != (batch, seq) {
            return Err(EngineError::Input(format!(
                "input_ids {:?} with a cache of {} needs attention_mask [{batch}, {total}] and position_ids [{batch}, {seq}], got {:?} and {:?}",
                input_ids.dim(),
                cache.len,
                attention_mask.dim(),
                position_ids.dim()
            )));
        }
        // ONNX Runtime needs row-major buffers; views of sliced or grown arrays may not be.
        let input_ids = input_ids.as_standard_layout();
        let attention_mask = attention_mask.as_standard_layout();
        let position_ids = position_ids.as_standard_layout();
        let mut inputs: Vec<(Cow<str>, SessionInputValue)> = vec![
            ("input_ids".into(), TensorRef::from_array_view(input_ids.view())?.into()),
            (
                "attention_mask".into(),
                TensorRef::from_array_view(attention_mask.view())?.into(),
            ),
        ];
        if self.has_position_ids {
            inputs.push((
                "position_ids".into(),
                TensorRef::from_array_view(position_ids.view())?.into(),
            ));
        }
        for (i, value) in cache.values.into_iter().enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            inputs.push((format!("past_key_values.{}.{kind}", i / 2).into(), value.into()));
        }
        let mut outputs = self.session.run(inputs)?;
        let logits = outputs
            .get("logits")
            .ok_or_else(|| EngineError::Layout("no `logits` output".into()))?
            .try_extract_array::<f32>()?
            .into_dimensionality::<Ix3>()
            .map_err(|e| EngineError::Layout(format!("logits: {e}")))?
            .to_owned();
        let mut values = Vec::with_capacity(self.num_layers * 2);
        for layer in 0..self.num_layers {
            for kind in ["key", "value"] {
                let name = format!("present.{layer}.{kind}");
                values.push(
                    outputs
                        .remove(&name)
                        .ok_or_else(|| EngineError::Layout(format!("no `{name}` output")))?,
                );
            }
        }
        Ok((logits, KvCache { values, len: total }))
    }
}
