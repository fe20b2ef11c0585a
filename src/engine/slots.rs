//! The KV cache of a fused-attention decoder (exported with `--attention gqa`): one buffer per
//! layer's key and value, `[slots, kv_heads, capacity, head_dim]`, allocated once and bound as
//! both the `past` input and the `present` output of every decode step (ONNX Runtime's I/O
//! binding), so `GroupQueryAttention` writes each new position in place: no per-step copy of
//! the cache, and each row attends over its own length only.
//!
//! Rows are right-aligned at position 0 of their slot. A prefill runs apart (its own rows,
//! empty past) and its rows are copied into free slots; the buffer is re-laid (one copy) only
//! when rows outgrow its capacity, newcomers find no free slot, or the scheduler compacts it.
//!
//! On a GPU provider the buffers are allocated in the GPU's memory and stay there: only the
//! logits come back to the host each step; rows are copied into them with the CUDA runtime.

use ndarray::Array2;
use ort::memory::Allocator;
use ort::session::IoBinding;
use ort::value::{DynTensor, PrimitiveTensorElementType, Shape, TensorElementType};

use super::{DecoderSession, EngineError};

/// The shared cache of a decode batch of fused-attention rows.
pub struct SlotCache {
    /// `[key_0, value_0, key_1, value_1, ...]`, each `[slots, kv_heads, capacity, head_dim]`.
    buffers: Vec<DynTensor>,
    /// FP32, or FP16 for a GPU-form graph.
    elem: TensorElementType,
    binding: IoBinding,
    /// The GPU memory the buffers live in (`None`: host memory); declared after the buffers and
    /// the binding, so it outlives them.
    _device: Option<Allocator>,
    /// Positions each slot holds; 0 is a free slot.
    lengths: Vec<usize>,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// Rows of a finished prefill, their positions left-aligned from 0 in each layer's key and
/// value (`[rows, kv_heads, width, head_dim]`).
pub struct PrefillRows {
    pub(super) presents: Vec<DynTensor>,
    pub(super) lengths: Vec<usize>,
}

impl PrefillRows {
    /// The positions each row holds.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }
}

/// Where a row of the cache comes from when it is re-laid.
#[derive(Debug, Clone, Copy)]
pub enum SlotSource {
    /// A slot of the current buffer.
    Slot(usize),
    /// A row of a prefill.
    Prefill(usize),
}

impl SlotCache {
    /// A buffer of `slots` free slots of `capacity` positions.
    pub fn new(session: &DecoderSession, slots: usize, capacity: usize) -> Result<Self, EngineError> {
        let (kv_heads, head_dim) = session.kv_geometry();
        let elem = session.kv_type();
        let device = session.device_allocator()?;
        let allocator = device.as_ref().unwrap_or(session.allocator());
        let buffers = (0..session.num_layers() * 2)
            .map(|_| {
                let mut buffer = DynTensor::new(allocator, elem, [slots, kv_heads, capacity, head_dim])?;
                if !buffer.memory_info().is_cpu_accessible() {
                    return Ok(buffer);
                }
                // Positions past a row's length are never read; zero them anyway, so what a
                // host buffer holds never depends on the allocator's leftovers.
                match elem {
                    TensorElementType::Float16 => buffer.try_extract_tensor_mut::<half::f16>()?.1.fill(half::f16::ZERO),
                    _ => buffer.try_extract_tensor_mut::<f32>()?.1.fill(0.0),
                }
                Ok(buffer)
            })
            .collect::<Result<_, EngineError>>()?;
        let binding = session.create_binding()?;
        let mut cache = Self {
            buffers,
            elem,
            binding,
            _device: device,
            lengths: vec![0; slots],
            capacity,
            kv_heads,
            head_dim,
        };
        cache.bind()?;
        Ok(cache)
    }

    /// A buffer whose slots hold `lengths` zeroed positions each (benchmarks replay a server's
    /// steps with it).
    pub fn with_lengths(session: &DecoderSession, lengths: &[usize], capacity: usize) -> Result<Self, EngineError> {
        if lengths.iter().any(|&l| l > capacity) {
            return Err(EngineError::Input(format!(
                "rows of {lengths:?} positions in a capacity of {capacity}"
            )));
        }
        let mut cache = Self::new(session, lengths.len(), capacity)?;
        cache.lengths = lengths.to_vec();
        Ok(cache)
    }

    /// Number of slots (free or not): the batch size of a step.
    pub fn slots(&self) -> usize {
        self.lengths.len()
    }

    /// Positions a slot can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions held by `slot` (0: free).
    pub fn len_of(&self, slot: usize) -> usize {
        self.lengths.get(slot).copied().unwrap_or(0)
    }

    /// Frees a slot; its positions are left where they are and overwritten by the next row.
    pub fn free(&mut self, slot: usize) {
        if let Some(len) = self.lengths.get_mut(slot) {
            *len = 0;
        }
    }

    /// Copies row `row` of `prefill` into free slot `slot`.
    pub fn write(&mut self, slot: usize, prefill: &PrefillRows, row: usize) -> Result<(), EngineError> {
        let len = *prefill
            .lengths
            .get(row)
            .ok_or_else(|| EngineError::Layout(format!("prefill has no row {row}")))?;
        // The present's own length (ONNX Runtime sizes it; the mask's width in practice).
        let src_cap = match prefill.presents.first().map(|v| v.dtype()) {
            Some(ort::value::ValueType::Tensor { shape, .. }) if shape.len() == 4 => {
                usize::try_from(shape[2]).unwrap_or(0)
            }
            _ => {
                return Err(EngineError::Layout(
                    "a prefill cache without [rows, heads, len, dim] tensors".into(),
                ));
            }
        };
        self.copy_row(&prefill.presents, (row, src_cap), slot, len)
    }

    /// A new buffer of `capacity` positions whose slots are `sources`, in order: one copy of
    /// each kept row.
    pub fn relayout(
        &self,
        session: &DecoderSession,
        sources: &[SlotSource],
        prefill: Option<&PrefillRows>,
        capacity: usize,
    ) -> Result<Self, EngineError> {
        let mut out = Self::new(session, sources.len(), capacity)?;
        for (slot, source) in sources.iter().enumerate() {
            match *source {
                SlotSource::Prefill(row) => {
                    let prefill = prefill
                        .ok_or_else(|| EngineError::Layout("re-laying a prefill row without a prefill".into()))?;
                    out.write(slot, prefill, row)?;
                }
                SlotSource::Slot(from) => out.copy_slot(self, from, slot)?,
            }
        }
        Ok(out)
    }

    fn copy_slot(&mut self, src: &SlotCache, from: usize, slot: usize) -> Result<(), EngineError> {
        self.copy_row(&src.buffers, (from, src.capacity), slot, src.len_of(from))
    }

    /// Copies the first `len` positions of row `src_row` of `sources` (each layer's key and
    /// value, `src_cap` positions a row) into `slot`.
    fn copy_row(
        &mut self,
        sources: &[DynTensor],
        (src_row, src_cap): (usize, usize),
        slot: usize,
        len: usize,
    ) -> Result<(), EngineError> {
        if slot >= self.slots() || len > self.capacity {
            return Err(EngineError::Layout(format!(
                "a row of {len} positions does not fit slot {slot} of {} x {}",
                self.slots(),
                self.capacity
            )));
        }
        let (heads, dim, cap) = (self.kv_heads, self.head_dim, self.capacity);
        // Head h of the row: `len` positions at the start of its block.
        let spans: Vec<Span> = (0..heads)
            .map(|h| Span {
                from: (src_row * heads + h) * src_cap * dim,
                to: (slot * heads + h) * cap * dim,
                count: len * dim,
            })
            .collect();
        for (buffer, source) in self.buffers.iter_mut().zip(sources) {
            copy_spans(self.elem, buffer, source, &spans)?;
        }
        self.lengths[slot] = len;
        Ok(())
    }

    /// The width a step needs: the longest row plus the new position.
    pub fn step_width(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(0) + 1
    }

    /// Runs one decode step: `tokens[slot]` after each held row (free slots compute a
    /// throw-away row of their own). Returns the logits `[slots, vocab]`; every held row grows
    /// by one position. The caller keeps `step_width() <= capacity()`.
    pub fn step(&mut self, session: &mut DecoderSession, tokens: &[i64]) -> Result<Array2<f32>, EngineError> {
        let slots = self.slots();
        let width = self.step_width();
        if tokens.len() != slots || width > self.capacity {
            return Err(EngineError::Input(format!(
                "a step of {} tokens over {slots} slots, {width} positions wide in {}",
                tokens.len(),
                self.capacity
            )));
        }
        let ids = Array2::from_shape_fn((slots, 1), |(b, _)| tokens[b]);
        // A free slot is a row of one position (length 0 would be an invalid sequence length).
        let mask = Array2::from_shape_fn((slots, width), |(b, i)| i64::from(i <= self.lengths[b]));
        let logits = session.run_bound(&mut self.binding, ids, mask)?;
        for len in self.lengths.iter_mut().filter(|l| **l > 0) {
            *len += 1;
        }
        Ok(logits)
    }

    /// Binds every buffer as its layer's past and present, once: the buffers live where the
    /// session runs (host or GPU memory), so ONNX Runtime reads and writes them in place and a
    /// row copied in later needs no rebinding.
    fn bind(&mut self) -> Result<(), EngineError> {
        for (i, buffer) in self.buffers.iter_mut().enumerate() {
            let (layer, kind) = (i / 2, if i % 2 == 0 { "key" } else { "value" });
            self.binding
                .bind_input(format!("past_key_values.{layer}.{kind}"), buffer)?;
            self.binding
                .bind_output(format!("present.{layer}.{kind}"), &mut *buffer)?;
        }
        Ok(())
    }
}

/// A run of elements copied from one cache tensor to another.
struct Span {
    from: usize,
    to: usize,
    count: usize,
}

/// Copies `spans` of `src` into `dst`, both of element type `elem`: by slices in host memory,
/// by the CUDA runtime otherwise.
fn copy_spans(
    elem: TensorElementType,
    dst: &mut DynTensor,
    src: &DynTensor,
    spans: &[Span],
) -> Result<(), EngineError> {
    if dst.memory_info().is_cpu_accessible() && src.memory_info().is_cpu_accessible() {
        match elem {
            TensorElementType::Float16 => copy_on_host::<half::f16>(dst, src, spans),
            _ => copy_on_host::<f32>(dst, src, spans),
        }
    } else {
        copy_on_device(elem, dst, src, spans)
    }
}

fn copy_on_host<T: PrimitiveTensorElementType + Copy>(
    dst: &mut DynTensor,
    src: &DynTensor,
    spans: &[Span],
) -> Result<(), EngineError> {
    let src = src.try_extract_tensor::<T>()?.1;
    let dst = dst.try_extract_tensor_mut::<T>()?.1;
    for span in spans {
        let (Some(from), Some(to)) = (
            src.get(span.from..span.from + span.count),
            dst.get_mut(span.to..span.to + span.count),
        ) else {
            return Err(EngineError::Layout("a KV cache copy out of bounds".into()));
        };
        to.copy_from_slice(from);
    }
    Ok(())
}

/// [`copy_spans`] for memory the host cannot read (a GPU's), with the CUDA runtime.
fn copy_on_device(
    elem: TensorElementType,
    dst: &mut DynTensor,
    src: &DynTensor,
    spans: &[Span],
) -> Result<(), EngineError> {
    let size = match elem {
        TensorElementType::Float16 => 2,
        _ => 4,
    };
    let elements = |shape: &Shape| usize::try_from(shape.iter().product::<i64>()).unwrap_or(0);
    let (src_len, dst_len) = (elements(src.shape()), elements(dst.shape()));
    let (src_ptr, dst_ptr) = (src.data_ptr().cast::<u8>(), dst.data_ptr_mut().cast::<u8>());
    for span in spans {
        if span.from + span.count > src_len || span.to + span.count > dst_len {
            return Err(EngineError::Layout("a KV cache copy out of bounds".into()));
        }
        // SAFETY: both spans lie inside their tensors (checked above), of `size`-byte elements.
        unsafe {
            super::gpu::copy_memory(
                dst_ptr.add(span.to * size).cast(),
                src_ptr.add(span.from * size).cast(),
                span.count * size,
            )?;
        }
    }
    Ok(())
}
