//! Running a decoder in Optimum's "with past" layout: one call is a prefill (empty cache) or a
//! decode step, and the `present` outputs stay in ONNX Runtime's memory as the next `past`.

use std::borrow::Cow;
use std::path::Path;

use ndarray::{Array2, Array3, Array4, Ix3, Ix4, s};
use ort::session::{IoBinding, Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, TensorRef, ValueType};

use super::slots::PrefillRows;
use super::{EngineError, SessionOptions, open_session};

/// The key/value cache of a batch: one key and one value tensor
/// `[batch, kv_heads, length, head_dim]` per layer, owned by ONNX Runtime.
pub struct KvCache {
    /// `[key_0, value_0, key_1, value_1, ...]`.
    pub(super) values: Vec<DynValue>,
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

    /// A new cache of `len` positions made of rows of existing caches, in order, in one copy per
    /// tensor. Each part's rows keep their columns from `from` on, right-aligned (rows are
    /// left-padded); what is left of them is zero (masked padding).
    pub fn gather(parts: &[CacheRows<'_>], len: usize) -> Result<Self, EngineError> {
        let Some(first) = parts.first() else {
            return Err(EngineError::Layout("gathering KV caches: no parts".into()));
        };
        let total: usize = parts.iter().map(|p| p.rows.len()).sum();
        let values = (0..first.cache.values.len())
            .map(|i| {
                let mut out: Option<Array4<f32>> = None;
                let mut offset = 0;
                for part in parts {
                    let view = part
                        .cache
                        .values
                        .get(i)
                        .ok_or_else(|| EngineError::Layout("gathering KV caches of different depths".into()))?
                        .try_extract_array::<f32>()?
                        .into_dimensionality::<Ix4>()
                        .map_err(|e| EngineError::Layout(format!("KV cache: {e}")))?;
                    let (_, heads, cols, dim) = view.dim();
                    let kept = cols.saturating_sub(part.from);
                    if kept > len {
                        return Err(EngineError::Layout(format!("gathering {kept} KV positions into {len}")));
                    }
                    let out = out.get_or_insert_with(|| Array4::zeros((total, heads, len, dim)));
                    for (j, &row) in part.rows.iter().enumerate() {
                        out.slice_mut(s![offset + j, .., len - kept.., ..])
                            .assign(&view.slice(s![row, .., part.from.., ..]));
                    }
                    offset += part.rows.len();
                }
                let out = out.unwrap_or_else(|| Array4::zeros((0, 0, len, 0)));
                Ok(Tensor::from_array(out)?.into_dyn())
            })
            .collect::<Result<_, EngineError>>()?;
        Ok(Self { values, len })
    }
}

impl KvCache {
    /// Overwrites rows of this cache in place with rows of `src`: `(src_row, dst_row)` pairs.
    /// The source's positions are right-aligned (rows are left-padded); columns left of them
    /// are zeroed. `src` must hold no more positions than this cache.
    pub fn write_rows(&mut self, src: &KvCache, pairs: &[(usize, usize)]) -> Result<(), EngineError> {
        if src.len > self.len || src.values.len() != self.values.len() {
            return Err(EngineError::Layout(format!(
                "writing a KV cache of {} positions into one of {}",
                src.len, self.len
            )));
        }
        let start = self.len - src.len;
        for (dst, from) in self.values.iter_mut().zip(&src.values) {
            let from = from
                .try_extract_array::<f32>()?
                .into_dimensionality::<Ix4>()
                .map_err(|e| EngineError::Layout(format!("KV cache: {e}")))?;
            let mut dst = dst
                .try_extract_array_mut::<f32>()?
                .into_dimensionality::<Ix4>()
                .map_err(|e| EngineError::Layout(format!("KV cache: {e}")))?;
            for &(s_row, d_row) in pairs {
                dst.slice_mut(s![d_row, .., ..start, ..]).fill(0.0);
                dst.slice_mut(s![d_row, .., start.., ..])
                    .assign(&from.slice(s![s_row, .., .., ..]));
            }
        }
        Ok(())
    }
}

/// Rows of a cache to [`KvCache::gather`]: which rows, and the first column kept.
pub struct CacheRows<'a> {
    pub cache: &'a KvCache,
    pub rows: &'a [usize],
    pub from: usize,
}

/// A decoder session plus the cache geometry read from its inputs.
pub struct DecoderSession {
    session: Session,
    num_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    has_position_ids: bool,
    /// Exported with `--attention gqa`: right-padded rows, a cache shared through I/O binding.
    fused: bool,
    /// The cache's element type: FP32, or FP16 for a GPU-form graph.
    kv_type: TensorElementType,
    /// Where it runs (a slot cache goes to the GPU's memory on a GPU provider).
    options: SessionOptions,
    precision: String,
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
        let (kv_heads, head_dim, kv_type) = match first.dtype() {
            ValueType::Tensor { shape, ty, .. }
                if shape.len() == 4
                    && shape[1] > 0
                    && shape[3] > 0
                    && matches!(ty, TensorElementType::Float32 | TensorElementType::Float16) =>
            {
                (shape[1] as usize, shape[3] as usize, *ty)
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
        // distill-serve's exports say what they hold; files made elsewhere may not.
        let (attention, precision) = match session.metadata() {
            Ok(m) => (m.custom("distill_serve.attention"), m.custom("distill_serve.precision")),
            Err(_) => (None, None),
        };
        let fused = attention.as_deref() == Some(crate::export::FUSED_ATTENTION_LABEL);
        let precision = precision.unwrap_or_else(|| "unrecorded".into());
        Ok(Self {
            precision,
            session,
            num_layers,
            kv_heads,
            head_dim,
            vocab_size,
            has_position_ids,
            fused,
            kv_type,
            options,
        })
    }

    /// Whether the graph has fused attention (`--attention gqa`): it runs right-padded rows,
    /// through [`DecoderSession::prefill_rows`] and a [`super::SlotCache`].
    pub fn fused_attention(&self) -> bool {
        self.fused
    }

    /// The cache's element type (FP32, or FP16 for a GPU-form graph).
    pub fn kv_type(&self) -> TensorElementType {
        self.kv_type
    }

    /// KV heads and head size of the cache.
    pub fn kv_geometry(&self) -> (usize, usize) {
        (self.kv_heads, self.head_dim)
    }

    pub(super) fn allocator(&self) -> &ort::memory::Allocator {
        self.session.allocator()
    }

    /// An allocator in the GPU's memory on a GPU provider; `None` on the CPU.
    pub(super) fn device_allocator(&self) -> Result<Option<ort::memory::Allocator>, EngineError> {
        use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
        if self.options.execution_provider == super::ExecutionProvider::Cpu {
            return Ok(None);
        }
        let device = i32::try_from(self.options.device_id)
            .map_err(|_| EngineError::Input(format!("device_id {} is out of range", self.options.device_id)))?;
        let info = MemoryInfo::new(
            AllocationDevice::CUDA,
            device,
            AllocatorType::Device,
            MemoryType::Default,
        )?;
        Ok(Some(Allocator::new(&self.session, info)?))
    }

    pub(super) fn create_binding(&self) -> Result<IoBinding, EngineError> {
        Ok(self.session.create_binding()?)
    }

    /// The precision the exporter recorded (`fp32`, `int8-matmul-integer`, ...), or
    /// `unrecorded` for a file exported elsewhere.
    pub fn precision(&self) -> &str {
        &self.precision
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
        self.zeroed_cache(batch, 0)
    }

    /// A cache of `len` zeroed positions for `batch` sequences (benchmarks replay shapes with it).
    pub fn zeroed_cache(&self, batch: usize, len: usize) -> Result<KvCache, EngineError> {
        let shape = (batch, self.kv_heads, len, self.head_dim);
        let values = (0..self.num_layers * 2)
            .map(|_| {
                Ok(match self.kv_type {
                    TensorElementType::Float16 => Tensor::from_array(Array4::<half::f16>::zeros(shape))?.into_dyn(),
                    _ => Tensor::from_array(Array4::<f32>::zeros(shape))?.into_dyn(),
                })
            })
            .collect::<Result<_, EngineError>>()?;
        Ok(KvCache { values, len })
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
        self.run(input_ids, attention_mask, position_ids, cache, false)
    }

    /// As [`DecoderSession::forward`], but copies out only the logits of the last position
    /// (`[batch, 1, vocab]`): what generation needs, without copying a prefill's
    /// `seq x vocab` rows (150k-token vocabularies make those hundreds of megabytes).
    pub fn forward_last(
        &mut self,
        input_ids: &Array2<i64>,
        attention_mask: &Array2<i64>,
        position_ids: &Array2<i64>,
        cache: KvCache,
    ) -> Result<(Array3<f32>, KvCache), EngineError> {
        self.run(input_ids, attention_mask, position_ids, cache, true)
    }

    fn run(
        &mut self,
        input_ids: &Array2<i64>,
        attention_mask: &Array2<i64>,
        position_ids: &Array2<i64>,
        cache: KvCache,
        last_only: bool,
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
        let past = cache.len;
        for (i, value) in cache.values.into_iter().enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            inputs.push((format!("past_key_values.{}.{kind}", i / 2).into(), value.into()));
        }
        let started = std::time::Instant::now();
        let mut outputs = self.session.run(inputs)?;
        log_run(batch, seq, past, started);
        let logits = logits_of(&outputs)?;
        let logits = if last_only {
            logits.slice(s![.., -1.., ..]).to_owned()
        } else {
            logits.to_owned()
        };
        let values = take_presents(&mut outputs, self.num_layers)?;
        Ok((logits, KvCache { values, len: total }))
    }

    /// The prefill of a fused-attention graph: `prompts` as one right-padded batch over an
    /// empty cache. Returns each row's logits at its last position (`[rows, vocab]`) and the
    /// rows' cache, to be written into a [`super::SlotCache`].
    pub fn prefill_rows(&mut self, prompts: &[&[u32]]) -> Result<(Array2<f32>, PrefillRows), EngineError> {
        if !self.fused {
            return Err(EngineError::Layout("prefill_rows needs a fused-attention graph".into()));
        }
        let lengths: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let (rows, width) = (prompts.len(), lengths.iter().copied().max().unwrap_or(0));
        if rows == 0 || lengths.contains(&0) {
            return Err(EngineError::Input("a prefill needs rows of at least one token".into()));
        }
        let ids = Array2::from_shape_fn((rows, width), |(b, i)| prompts[b].get(i).map_or(0, |&t| i64::from(t)));
        let mask = Array2::from_shape_fn((rows, width), |(b, i)| i64::from(i < lengths[b]));
        let mut inputs: Vec<(Cow<str>, SessionInputValue)> = vec![
            ("input_ids".into(), Tensor::from_array(ids)?.into()),
            ("attention_mask".into(), Tensor::from_array(mask)?.into()),
        ];
        for (i, value) in self.empty_cache(rows)?.values.into_iter().enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            inputs.push((format!("past_key_values.{}.{kind}", i / 2).into(), value.into()));
        }
        let started = std::time::Instant::now();
        let mut outputs = self.session.run(inputs)?;
        log_run(rows, width, 0, started);
        let all = logits_of(&outputs)?;
        // A graph may give every position's logits or only each row's last.
        let last = |b: usize| if all.dim().1 == 1 { 0 } else { lengths[b] - 1 };
        let logits = Array2::from_shape_fn((rows, all.dim().2), |(b, v)| all[[b, last(b), v]]);
        let presents = take_presents(&mut outputs, self.num_layers)?
            .into_iter()
            .map(|v| v.downcast::<ort::value::DynTensorValueType>())
            .collect::<Result<_, _>>()?;
        Ok((logits, PrefillRows { presents, lengths }))
    }

    /// Runs `binding` (the cache bound by a [`super::SlotCache`]) with one token a row and its
    /// mask; returns the logits `[rows, vocab]`.
    pub(super) fn run_bound(
        &mut self,
        binding: &mut IoBinding,
        ids: Array2<i64>,
        mask: Array2<i64>,
    ) -> Result<Array2<f32>, EngineError> {
        // Rows hold different lengths: `past` is their mean (a free slot's is 0), what a replay
        // of this step with rows of one length costs alike.
        let rows = ids.nrows();
        let past = (mask.sum().max(0) as usize).saturating_sub(rows) / rows.max(1);
        binding.bind_input("input_ids", &Tensor::from_array(ids)?)?;
        binding.bind_input("attention_mask", &Tensor::from_array(mask)?)?;
        binding.bind_output_to_device("logits", self.session.allocator().memory_info())?;
        let started = std::time::Instant::now();
        let outputs = self.session.run_binding(binding)?;
        log_run(rows, 1, past, started);
        let logits = logits_of(&outputs)?;
        Ok(logits.slice(s![.., -1, ..]).to_owned())
    }
}

/// The shape and time of a run, for `cargo bench --bench serve` to replay on the bare engine
/// and to split the server's time.
fn log_run(rows: usize, tokens: usize, past: usize, started: std::time::Instant) {
    let micros = started.elapsed().as_micros() as u64;
    tracing::debug!(rows, tokens, past, micros, "forward");
}

/// The `logits` output of a run, `[rows, positions, vocab]`.
fn logits_of<'a>(outputs: &'a ort::session::SessionOutputs<'_>) -> Result<ndarray::ArrayView3<'a, f32>, EngineError> {
    outputs
        .get("logits")
        .ok_or_else(|| EngineError::Layout("no `logits` output".into()))?
        .try_extract_array::<f32>()?
        .into_dimensionality::<Ix3>()
        .map_err(|e| EngineError::Layout(format!("logits: {e}")))
}

/// The `present.{i}.key|value` outputs of a run, in layer order.
fn take_presents(outputs: &mut ort::session::SessionOutputs<'_>, layers: usize) -> Result<Vec<DynValue>, EngineError> {
    let mut values = Vec::with_capacity(layers * 2);
    for layer in 0..layers {
        for kind in ["key", "value"] {
            let name = format!("present.{layer}.{kind}");
            values.push(
                outputs
                    .remove(&name)
                    .ok_or_else(|| EngineError::Layout(format!("no `{name}` output")))?,
            );
        }
    }
    Ok(values)
}
