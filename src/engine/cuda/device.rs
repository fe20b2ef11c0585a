//! The CUDA backend: each [`Backend`] operation launches its kernel of `kernels/decoder.cu` on
//! one stream. Buffers are `cudarc` slices; FP16 values travel as their bit patterns (`u16`).

use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchArgs, LaunchConfig, PushKernelArg};
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

/// f32 rows on the GPU.
pub struct DeviceTensor {
    data: CudaSlice<f32>,
    width: usize,
}

impl DeviceTensor {
    /// The values on the GPU (what [`crate::kernels::sampling::DeviceSampler`] samples from).
    pub fn data(&self) -> &CudaSlice<f32> {
        &self.data
    }

    fn rows(&self) -> usize {
        self.data.len() / self.width.max(1)
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

/// A step's slots and positions on the GPU.
pub struct DeviceRows {
    slots: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    len: usize,
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

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>, NativeError> {
        Ok(self.stream.alloc_zeros::<f32>(len.max(1)).map_err(KernelError::from)?)
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

    fn free_bytes(&self) -> Option<usize> {
        self.device.free_memory().ok()
    }

    fn tensor(&self, values: &[f32], width: usize) -> Result<DeviceTensor, NativeError> {
        Ok(DeviceTensor {
            data: self.upload(values)?,
            width,
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
        let alloc = || {
            self.stream
                .alloc_zeros::<u16>(shape.len().max(1))
                .map_err(KernelError::from)
        };
        Ok(DeviceCache {
            shape,
            k: alloc()?,
            v: alloc()?,
        })
    }

    fn rows(&self, rows: &StepRows) -> Result<DeviceRows, NativeError> {
        Ok(DeviceRows {
            slots: self.upload(&rows.slots)?,
            positions: self.upload(&rows.positions)?,
            len: rows.len(),
        })
    }

    fn embed(&self, table: &DeviceTable, tokens: &[u32]) -> Result<DeviceTensor, NativeError> {
        let ids = self.upload(tokens)?;
        let mut out = self.zeros(tokens.len() * table.width)?;
        let width = table.width as u32;
        let mut args = self.stream.launch_builder(&self.kernels.embed);
        args.arg(&table.data).arg(&ids).arg(&width).arg(&mut out);
        launch(args, grid(tokens.len(), BLOCK))?;
        Ok(DeviceTensor {
            data: out,
            width: table.width,
        })
    }

    fn rms_norm(&self, x: &DeviceTensor, weight: &DeviceTensor, eps: f32) -> Result<DeviceTensor, NativeError> {
        if weight.data.len() != x.width {
            return Err(shape_error(format!(
                "norm of {} for rows of {}",
                weight.data.len(),
                x.width
            )));
        }
        let mut out = self.zeros(x.data.len())?;
        let width = x.width as u32;
        let mut args = self.stream.launch_builder(&self.kernels.rms_norm);
        args.arg(&x.data).arg(&weight.data).arg(&eps).arg(&width).arg(&mut out);
        launch(args, grid(x.rows(), BLOCK))?;
        Ok(DeviceTensor {
            data: out,
            width: x.width,
        })
    }

    fn linear(&self, x: &DeviceTensor, layer: &DeviceLinear) -> Result<DeviceTensor, NativeError> {
        if x.width != layer.inputs {
            return Err(shape_error(format!(
                "rows of {} into a layer of {} inputs",
                x.width, layer.inputs
            )));
        }
        let rows = x.rows();
        let mut out = self.zeros(rows * layer.out)?;
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
        args.arg(&rows_arg).arg(&inputs).arg(&outputs).arg(&mut out);
        launch(args, config)?;
        Ok(DeviceTensor {
            data: out,
            width: layer.out,
        })
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
        if k.width != s.kv_heads * s.head_dim || k.rows() != rows.len || v.data.len() != k.data.len() {
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
    ) -> Result<DeviceTensor, NativeError> {
        let s = cache.shape;
        if q.width != heads * s.head_dim || q.rows() != rows.len || !heads.is_multiple_of(s.kv_heads) {
            return Err(shape_error(format!(
                "attention of {heads} heads over {} kv heads",
                s.kv_heads
            )));
        }
        let mut out = self.zeros(q.data.len())?;
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
            .arg(&mut out);
        launch(args, config)?;
        Ok(DeviceTensor {
            data: out,
            width: q.width,
        })
    }

    fn silu_mul(&self, gate: &DeviceTensor, up: &DeviceTensor) -> Result<DeviceTensor, NativeError> {
        if gate.data.len() != up.data.len() {
            return Err(shape_error("gate and up differ in size".into()));
        }
        let count = gate.data.len();
        let mut out = self.zeros(count)?;
        let count_arg = count as u32;
        let mut args = self.stream.launch_builder(&self.kernels.silu_mul);
        args.arg(&gate.data).arg(&up.data).arg(&count_arg).arg(&mut out);
        launch(args, grid(count.div_ceil(BLOCK as usize), BLOCK))?;
        Ok(DeviceTensor {
            data: out,
            width: gate.width,
        })
    }

    fn add(&self, x: &mut DeviceTensor, y: &DeviceTensor) -> Result<(), NativeError> {
        if x.data.len() != y.data.len() {
            return Err(shape_error("adding tensors of different sizes".into()));
        }
        let count = x.data.len();
        let count_arg = count as u32;
        let mut args = self.stream.launch_builder(&self.kernels.add_in_place);
        args.arg(&mut x.data).arg(&y.data).arg(&count_arg);
        launch(args, grid(count.div_ceil(BLOCK as usize), BLOCK))
    }

    fn gather(&self, x: &DeviceTensor, which: &[u32]) -> Result<DeviceTensor, NativeError> {
        if let Some(bad) = which.iter().find(|&&r| r as usize >= x.rows()) {
            return Err(shape_error(format!("row {bad} of {}", x.rows())));
        }
        let ids = self.upload(which)?;
        let mut out = self.zeros(which.len() * x.width)?;
        let width = x.width as u32;
        let mut args = self.stream.launch_builder(&self.kernels.gather_rows);
        args.arg(&x.data).arg(&ids).arg(&width).arg(&mut out);
        launch(args, grid(which.len(), BLOCK))?;
        Ok(DeviceTensor {
            data: out,
            width: x.width,
        })
    }

    fn to_host(&self, x: &DeviceTensor) -> Result<Vec<f32>, NativeError> {
        let mut values = self.stream.clone_dtoh(&x.data).map_err(KernelError::from)?;
        values.truncate(x.rows() * x.width);
        Ok(values)
    }
}
