//! The CUDA backend: each [`Backend`] operation launches its kernel of `kernels/decoder.cu` on
//! one stream, and a recorded step is a CUDA graph of those launches. Buffers are `cudarc`
//! slices; FP16 values travel as their bit patterns (`u16`).

use std::path::Path;
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, LaunchArgs, LaunchConfig, PushKernelArg,
};
use half::f16;

use super::NativeError;
use super::backend::{Backend, CacheShape, HostWeight, StepRows};
use crate::kernels::device::CudaDevice;
use crate::kernels::{KernelError, source};

/// Threads of the row-wise kernels.
const BLOCK: u32 = 256;
/// Output channels and rows a `linear_*` block covers (LINEAR_WARPS, LINEAR_ROWS).
const LINEAR_WARPS: u32 = 8;
const LINEAR_ROWS: u32 = 8;
/// Threads of an attention block (ATTN_WARPS warps).
const ATTENTION_THREADS: u32 = 128;

/// f32 rows on the GPU: a buffer for some number of rows of `width`, of which the last
/// operation that wrote it filled `rows`.
pub struct DeviceTensor {
    data: CudaSlice<f32>,
    width: usize,
    rows: usize,
}

impl DeviceTensor {
    /// The values on the GPU (what [`crate::kernels::sampling::DeviceSampler`] samples from).
    pub fn data(&self) -> &CudaSlice<f32> {
        &self.data
    }

    fn rows(&self) -> usize {
        self.rows
    }

    /// Takes `rows` rows of `width` as this operation's output, if the buffer holds them.
    fn fill(&mut self, rows: usize, width: usize) -> Result<(), NativeError> {
        if self.width != width || self.data.len() < rows * width {
            return Err(shape_error(format!(
                "{rows} rows of {width} into a buffer of {} values in rows of {}",
                self.data.len(),
                self.width
            )));
        }
        self.rows = rows;
        Ok(())
    }
}

enum DeviceWeight {
    Fp16(CudaSlice<u16>),
    Bf16(CudaSlice<u16>),
    Int8 {
        values: CudaSlice<i8>,
        scales: CudaSlice<f32>,
    },
}

/// A linear layer on the GPU.
pub struct DeviceLinear {
    weight: DeviceWeight,
    bias: Option<CudaSlice<f32>>,
    out: usize,
    inputs: usize,
}

/// An FP16 embedding table on the GPU.
pub struct DeviceTable {
    data: CudaSlice<u16>,
    width: usize,
}

/// One layer's FP16 caches on the GPU.
pub struct DeviceCache {
    shape: CacheShape,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
}

/// A step's tokens, slots, positions and rows to take logits of, on the GPU.
pub struct DeviceRows {
    tokens: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    logits_of: CudaSlice<u32>,
    len: usize,
    logits_len: usize,
}

struct Kernels {
    embed: CudaFunction,
    rms_norm: CudaFunction,
    linear_f16: CudaFunction,
    linear_bf16: CudaFunction,
    linear_i8: CudaFunction,
    rope: CudaFunction,
    kv_append: CudaFunction,
    attention: CudaFunction,
    silu_mul: CudaFunction,
    add_in_place: CudaFunction,
    gather_rows: CudaFunction,
}

/// A CUDA graph of a step's launches.
pub struct DeviceGraph(CudaGraph);

// SAFETY: a graph may be launched from any thread as long as calls on it are serialised (CUDA's
// graph thread-safety rules); it is only reached through `&mut NativeDecoder`, one thread at a
// time, and its stream is cudarc's `Send` `Arc<CudaStream>`.
unsafe impl Send for DeviceGraph {}

/// The decoder kernels loaded on one GPU.
pub struct CudaBackend {
    device: CudaDevice,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    kernels: Kernels,
}

fn grid(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn launch(mut args: LaunchArgs<'_>, config: LaunchConfig) -> Result<(), NativeError> {
    // SAFETY: each caller pushes the arguments of its kernel in order and with the kernel's
    // types, and checks beforehand (in `NativeDecoder::check` and the shape checks below) that
    // every buffer holds what the grid indexes.
    unsafe { args.launch(config) }.map_err(KernelError::from)?;
    Ok(())
}

fn shape_error(what: String) -> NativeError {
    NativeError::Shape(what)
}

impl CudaBackend {
    /// Compiles (or takes from `ptx_cache`) and loads the decoder kernels on `device`.
    pub fn new(device: CudaDevice, ptx_cache: Option<&Path>) -> Result<Self, NativeError> {
        let module = device.load(source("decoder")?, ptx_cache)?;
        let function = |name: &str| module.load_function(name).map_err(KernelError::from);
        let kernels = Kernels {
            embed: function("embed")?,
            rms_norm: function("rms_norm")?,
            linear_f16: function("linear_f16")?,
            linear_bf16: function("linear_bf16")?,
            linear_i8: function("linear_i8")?,
            rope: function("rope")?,
            kv_append: function("kv_append")?,
            attention: function("attention")?,
            silu_mul: function("silu_mul")?,
            add_in_place: function("add_in_place")?,
            gather_rows: function("gather_rows")?,
        };
        let stream = device.stream().clone();
        Ok(Self {
            device,
            stream,
            _module: module,
            kernels,
        })
    }

    /// The GPU.
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, NativeError> {
        Ok(self.stream.alloc_zeros::<T>(len.max(1)).map_err(KernelError::from)?)
    }

    /// Copies `values` to the start of `into`.
    fn write<T: cudarc::driver::DeviceRepr>(&self, values: &[T], into: &mut CudaSlice<T>) -> Result<(), NativeError> {
        let Some(mut head) = into.try_slice_mut(..values.len()) else {
            return Err(shape_error(format!(
                "{} values into a buffer of {}",
                values.len(),
                into.len()
            )));
        };
        self.stream.memcpy_htod(values, &mut head).map_err(KernelError::from)?;
        Ok(())
    }

    fn upload<T: cudarc::driver::DeviceRepr>(&self, values: &[T]) -> Result<CudaSlice<T>, NativeError> {
        Ok(self.stream.clone_htod(values).map_err(KernelError::from)?)
    }
}

impl Backend for CudaBackend {
    type Tensor = DeviceTensor;
    type Linear = DeviceLinear;
    type Table = DeviceTable;
    type Cache = DeviceCache;
    type Rows = DeviceRows;
    type Graph = DeviceGraph;

    fn free_bytes(&self) -> Option<usize> {
        self.device.free_memory().ok()
    }

    fn tensor(&self, values: &[f32], width: usize) -> Result<DeviceTensor, NativeError> {
        if width == 0 || !values.len().is_multiple_of(width) {
            return Err(shape_error(format!("{} values in rows of {width}", values.len())));
        }
        Ok(DeviceTensor {
            data: self.upload(values)?,
            width,
            rows: values.len() / width,
        })
    }

    fn zeros(&self, rows: usize, width: usize) -> Result<DeviceTensor, NativeError> {
        Ok(DeviceTensor {
            data: self.alloc(rows * width)?,
            width,
            rows: 0,
        })
    }

    fn linear_weight(
        &self,
        weight: HostWeight,
        bias: Option<&[f32]>,
        out: usize,
        inputs: usize,
    ) -> Result<DeviceLinear, NativeError> {
        let weight = match weight {
            HostWeight::Fp16(values) => {
                DeviceWeight::Fp16(self.upload(&values.iter().map(|v| v.to_bits()).collect::<Vec<_>>())?)
            }
            HostWeight::Bf16(values) => {
                DeviceWeight::Bf16(self.upload(&values.iter().map(|v| v.to_bits()).collect::<Vec<_>>())?)
            }
            HostWeight::Int8 { values, scales } => DeviceWeight::Int8 {
                values: self.upload(&values)?,
                scales: self.upload(&scales)?,
            },
        };
        Ok(DeviceLinear {
            weight,
            bias: bias.map(|b| self.upload(b)).transpose()?,
            out,
            inputs,
        })
    }

    fn table(&self, values: &[f32], width: usize) -> Result<DeviceTable, NativeError> {
        let bits: Vec<u16> = values.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
        Ok(DeviceTable {
            data: self.upload(&bits)?,
            width,
        })
    }

    fn cache(&self, shape: CacheShape) -> Result<DeviceCache, NativeError> {
        Ok(DeviceCache {
            shape,
            k: self.alloc(shape.len())?,
            v: self.alloc(shape.len())?,
        })
    }

    fn step_inputs(&self, rows: usize, logit_rows: usize) -> Result<DeviceRows, NativeError> {
        Ok(DeviceRows {
            tokens: self.alloc(rows)?,
            slots: self.alloc(rows)?,
            positions: self.alloc(rows)?,
            logits_of: self.alloc(logit_rows)?,
            len: 0,
            logits_len: 0,
        })
    }

    fn write_rows(&self, rows: &StepRows, logits_of: &[u32], into: &mut DeviceRows) -> Result<(), NativeError> {
        if rows.slots.len() != rows.len() || rows.positions.len() != rows.len() {
            return Err(shape_error(format!(
                "{} tokens, {} slots, {} positions",
                rows.len(),
                rows.slots.len(),
                rows.positions.len()
            )));
        }
        self.write(&rows.tokens, &mut into.tokens)?;
        self.write(&rows.slots, &mut into.slots)?;
        self.write(&rows.positions, &mut into.positions)?;
        self.write(logits_of, &mut into.logits_of)?;
        into.len = rows.len();
        into.logits_len = logits_of.len();
        Ok(())
    }

    fn embed(&self, table: &DeviceTable, rows: &DeviceRows, out: &mut DeviceTensor) -> Result<(), NativeError> {
        out.fill(rows.len, table.width)?;
        let width = table.width as u32;
        let mut args = self.stream.launch_builder(&self.kernels.embed);
        args.arg(&table.data).arg(&rows.tokens).arg(&width).arg(&mut out.data);
        launch(args, grid(rows.len, BLOCK))
    }

    fn rms_norm(
        &self,
        x: &DeviceTensor,
        weight: &DeviceTensor,
        eps: f32,
        out: &mut DeviceTensor,
    ) -> Result<(), NativeError> {
        if weight.data.len() != x.width {
            return Err(shape_error(format!(
                "norm of {} for rows of {}",
                weight.data.len(),
                x.width
            )));
        }
        out.fill(x.rows(), x.width)?;
        let width = x.width as u32;
        let mut args = self.stream.launch_builder(&self.kernels.rms_norm);
        args.arg(&x.data)
            .arg(&weight.data)
            .arg(&eps)
            .arg(&width)
            .arg(&mut out.data);
        launch(args, grid(x.rows(), BLOCK))
    }

    fn linear(&self, x: &DeviceTensor, layer: &DeviceLinear, out: &mut DeviceTensor) -> Result<(), NativeError> {
        if x.width != layer.inputs {
            return Err(shape_error(format!(
                "rows of {} into a layer of {} inputs",
                x.width, layer.inputs
            )));
        }
        let rows = x.rows();
        out.fill(rows, layer.out)?;
        let (rows_arg, inputs, outputs) = (rows as u32, layer.inputs as u32, layer.out as u32);
        let no_bias = 0u64;
        let config = LaunchConfig {
            grid_dim: (outputs.div_ceil(LINEAR_WARPS), rows_arg.div_ceil(LINEAR_ROWS), 1),
            block_dim: (LINEAR_WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args;
        match &layer.weight {
            DeviceWeight::Fp16(w) => {
                args = self.stream.launch_builder(&self.kernels.linear_f16);
                args.arg(&x.data).arg(w);
            }
            DeviceWeight::Bf16(w) => {
                args = self.stream.launch_builder(&self.kernels.linear_bf16);
                args.arg(&x.data).arg(w);
            }
            DeviceWeight::Int8 { values, scales } => {
                args = self.stream.launch_builder(&self.kernels.linear_i8);
                args.arg(&x.data).arg(values).arg(scales);
            }
        }
        match &layer.bias {
            Some(bias) => args.arg(bias),
            None => args.arg(&no_bias),
        };
        args.arg(&rows_arg).arg(&inputs).arg(&outputs).arg(&mut out.data);
        launch(args, config)
    }

    fn rope(
        &self,
        x: &mut DeviceTensor,
        rows: &DeviceRows,
        inv_freq: &DeviceTensor,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), NativeError> {
        if x.width != heads * head_dim || x.rows() != rows.len {
            return Err(shape_error(format!(
                "rope of {heads}x{head_dim} on {} rows of {}",
                x.rows(),
                x.width
            )));
        }
        let (heads, dim) = (heads as u32, head_dim as u32);
        let mut args = self.stream.launch_builder(&self.kernels.rope);
        args.arg(&mut x.data)
            .arg(&rows.positions)
            .arg(&inv_freq.data)
            .arg(&heads)
            .arg(&dim);
        launch(args, grid(rows.len, BLOCK))
    }

    fn kv_append(
        &self,
        cache: &mut DeviceCache,
        k: &DeviceTensor,
        v: &DeviceTensor,
        rows: &DeviceRows,
    ) -> Result<(), NativeError> {
        let s = cache.shape;
        if k.width != s.kv_heads * s.head_dim || k.rows() != rows.len || v.rows() != k.rows() || v.width != k.width {
            return Err(shape_error(format!(
                "K/V rows of {} for {} kv heads of {}",
                k.width, s.kv_heads, s.head_dim
            )));
        }
        let (kv_heads, dim, capacity) = (s.kv_heads as u32, s.head_dim as u32, s.capacity as u32);
        let mut args = self.stream.launch_builder(&self.kernels.kv_append);
        args.arg(&k.data)
            .arg(&v.data)
            .arg(&rows.slots)
            .arg(&rows.positions)
            .arg(&kv_heads)
            .arg(&dim)
            .arg(&capacity)
            .arg(&mut cache.k)
            .arg(&mut cache.v);
        launch(args, grid(rows.len, BLOCK))
    }

    fn attention(
        &self,
        q: &DeviceTensor,
        cache: &DeviceCache,
        rows: &DeviceRows,
        heads: usize,
        out: &mut DeviceTensor,
    ) -> Result<(), NativeError> {
        let s = cache.shape;
        if q.width != heads * s.head_dim || q.rows() != rows.len || !heads.is_multiple_of(s.kv_heads) {
            return Err(shape_error(format!(
                "attention of {heads} heads over {} kv heads",
                s.kv_heads
            )));
        }
        out.fill(rows.len, q.width)?;
        let (heads_arg, kv_heads, dim, capacity) =
            (heads as u32, s.kv_heads as u32, s.head_dim as u32, s.capacity as u32);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let config = LaunchConfig {
            grid_dim: (rows.len as u32, heads_arg, 1),
            block_dim: (ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = self.stream.launch_builder(&self.kernels.attention);
        args.arg(&q.data)
            .arg(&cache.k)
            .arg(&cache.v)
            .arg(&rows.slots)
            .arg(&rows.positions)
            .arg(&heads_arg)
            .arg(&kv_heads)
            .arg(&dim)
            .arg(&capacity)
            .arg(&scale)
            .arg(&mut out.data);
        launch(args, config)
    }

    fn silu_mul(&self, gate: &DeviceTensor, up: &DeviceTensor, out: &mut DeviceTensor) -> Result<(), NativeError> {
        if gate.width != up.width || gate.rows() != up.rows() {
            return Err(shape_error("gate and up differ in size".into()));
        }
        out.fill(gate.rows(), gate.width)?;
        let count = gate.rows() * gate.width;
        let count_arg = count as u32;
        let mut args = self.stream.launch_builder(&self.kernels.silu_mul);
        args.arg(&gate.data).arg(&up.data).arg(&count_arg).arg(&mut out.data);
        launch(args, grid(count.div_ceil(BLOCK as usize), BLOCK))
    }

    fn add(&self, x: &mut DeviceTensor, y: &DeviceTensor) -> Result<(), NativeError> {
        if x.width != y.width || x.rows() != y.rows() {
            return Err(shape_error("adding tensors of different sizes".into()));
        }
        let count = x.rows() * x.width;
        let count_arg = count as u32;
        let mut args = self.stream.launch_builder(&self.kernels.add_in_place);
        args.arg(&mut x.data).arg(&y.data).arg(&count_arg);
        launch(args, grid(count.div_ceil(BLOCK as usize), BLOCK))
    }

    fn gather(&self, x: &DeviceTensor, rows: &DeviceRows, out: &mut DeviceTensor) -> Result<(), NativeError> {
        // The rows' indices were checked against the step (`NativeDecoder::check`), whose rows
        // `x` holds.
        if x.rows() != rows.len {
            return Err(shape_error(format!(
                "logits of a step of {} rows from {}",
                rows.len,
                x.rows()
            )));
        }
        out.fill(rows.logits_len, x.width)?;
        let width = x.width as u32;
        let mut args = self.stream.launch_builder(&self.kernels.gather_rows);
        args.arg(&x.data).arg(&rows.logits_of).arg(&width).arg(&mut out.data);
        launch(args, grid(rows.logits_len, BLOCK))
    }

    fn to_host(&self, x: &DeviceTensor, rows: usize) -> Result<Vec<f32>, NativeError> {
        let Some(head) = x.data.try_slice(..rows * x.width) else {
            return Err(shape_error(format!("{rows} rows of a buffer of {}", x.data.len())));
        };
        Ok(self.stream.clone_dtoh(&head).map_err(KernelError::from)?)
    }

    fn record(
        &self,
        launches: &mut dyn FnMut() -> Result<(), NativeError>,
    ) -> Result<Option<DeviceGraph>, NativeError> {
        // Thread-local: only this thread's calls must keep to what a capture allows; another
        // model's work on another thread goes on.
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(KernelError::from)?;
        let recorded = launches();
        // The capture ends whatever happened, so the stream is usable again.
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        recorded?;
        match graph.map_err(KernelError::from)? {
            Some(graph) => Ok(Some(DeviceGraph(graph))),
            None => Err(KernelError::Invalid("the capture recorded no graph".into()).into()),
        }
    }

    fn replay(&self, graph: &DeviceGraph) -> Result<(), NativeError> {
        graph.0.launch().map_err(KernelError::from)?;
        Ok(())
    }
}
