//! The CPU reference of each kernel of `kernels/decoder.cu`: the same storage (FP16 tables and
//! caches, FP16 or INT8 weights) and the same arithmetic, in plain Rust. The native engine runs
//! on it where there is no GPU, which is how its step logic is tested here; on a GPU the CUDA
//! backend must agree with it.

use half::f16;
use rayon::prelude::*;

use super::NativeError;
use super::backend::{Backend, CacheShape, HostWeight, StepRows};

/// f32 rows on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Row-major values.
    pub values: Vec<f32>,
    /// Values a row.
    pub width: usize,
}

impl HostTensor {
    fn rows(&self) -> usize {
        self.values.len() / self.width.max(1)
    }
}

/// A linear layer on the host: its stored values widened to f32 once (exactly: FP16 and INT8
/// values are f32 values), with the INT8 scales.
pub struct HostLinear {
    weight: Vec<f32>,
    scales: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    out: usize,
    inputs: usize,
}

/// A step's rows and the rows whose logits are wanted.
#[derive(Debug, Clone, Default)]
pub struct HostRows {
    step: StepRows,
    logits_of: Vec<u32>,
}

/// One layer's FP16 caches on the host.
pub struct HostCache {
    shape: CacheShape,
    k: Vec<f16>,
    v: Vec<f16>,
}

/// The kernels' CPU reference.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), NativeError> {
    if ok { Ok(()) } else { Err(NativeError::Shape(what())) }
}

impl Backend for CpuBackend {
    type Tensor = HostTensor;
    type Linear = HostLinear;
    type Table = HostTensor;
    type Cache = HostCache;
    type Rows = HostRows;
    type Graph = std::convert::Infallible;

    fn tensor(&self, values: &[f32], width: usize) -> Result<HostTensor, NativeError> {
        check(width > 0 && values.len().is_multiple_of(width), || {
            format!("{} values in rows of {width}", values.len())
        })?;
        Ok(HostTensor {
            values: values.to_vec(),
            width,
        })
    }

    fn zeros(&self, rows: usize, width: usize) -> Result<HostTensor, NativeError> {
        Ok(HostTensor {
            values: Vec::with_capacity(rows * width),
            width,
        })
    }

    fn linear_weight(
        &self,
        weight: HostWeight,
        bias: Option<&[f32]>,
        out: usize,
        inputs: usize,
    ) -> Result<HostLinear, NativeError> {
        let (weight, scales) = match weight {
            HostWeight::Fp16(values) => (values.iter().map(|v| v.to_f32()).collect(), None),
            HostWeight::Bf16(values) => (values.iter().map(|v| v.to_f32()).collect(), None),
            HostWeight::Int8 { values, scales } => (values.iter().map(|&v| f32::from(v)).collect(), Some(scales)),
        };
        Ok(HostLinear {
            weight,
            scales,
            bias: bias.map(<[f32]>::to_vec),
            out,
            inputs,
        })
    }

    fn table(&self, values: &[f32], width: usize) -> Result<HostTensor, NativeError> {
        // Stored FP16 as on the device: values go through half precision.
        let rounded: Vec<f32> = values.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        self.tensor(&rounded, width)
    }

    fn cache(&self, shape: CacheShape) -> Result<HostCache, NativeError> {
        Ok(HostCache {
            shape,
            k: vec![f16::ZERO; shape.len()],
            v: vec![f16::ZERO; shape.len()],
        })
    }

    fn step_inputs(&self, _rows: usize, _logit_rows: usize) -> Result<HostRows, NativeError> {
        Ok(HostRows::default())
    }

    fn write_rows(&self, rows: &StepRows, logits_of: &[u32], into: &mut HostRows) -> Result<(), NativeError> {
        into.step.clone_from(rows);
        into.logits_of = logits_of.to_vec();
        Ok(())
    }

    fn embed(&self, table: &HostTensor, rows: &HostRows, out: &mut HostTensor) -> Result<(), NativeError> {
        let width = table.width;
        out.values.clear();
        out.width = width;
        for &t in &rows.step.tokens {
            let t = t as usize;
            check(t < table.rows(), || {
                format!("token {t} outside a vocabulary of {}", table.rows())
            })?;
            out.values.extend_from_slice(&table.values[t * width..(t + 1) * width]);
        }
        Ok(())
    }

    fn rms_norm(&self, x: &HostTensor, weight: &HostTensor, eps: f32, out: &mut HostTensor) -> Result<(), NativeError> {
        check(weight.values.len() == x.width, || {
            format!("norm of {} for rows of {}", weight.values.len(), x.width)
        })?;
        out.values.clear();
        out.width = x.width;
        for row in x.values.chunks(x.width) {
            let mean = row.iter().map(|v| v * v).sum::<f32>() / x.width as f32;
            let inv = 1.0 / (mean + eps).sqrt();
            out.values
                .extend(row.iter().zip(&weight.values).map(|(v, w)| v * inv * w));
        }
        Ok(())
    }

    fn linear(&self, x: &HostTensor, layer: &HostLinear, y: &mut HostTensor) -> Result<(), NativeError> {
        check(x.width == layer.inputs, || {
            format!("rows of {} into a layer of {} inputs", x.width, layer.inputs)
        })?;
        let (inputs, out) = (layer.inputs, layer.out);
        y.values.clear();
        y.values.resize(x.rows() * out, 0.0);
        y.width = out;
        y.values
            .par_chunks_mut(out)
            .zip(x.values.par_chunks(inputs))
            .for_each(|(y, row)| {
                for (o, y) in y.iter_mut().enumerate() {
                    let weights = &layer.weight[o * inputs..(o + 1) * inputs];
                    let sum = row.iter().zip(weights).map(|(a, b)| a * b).sum::<f32>();
                    let scaled = layer.scales.as_ref().map_or(sum, |s| sum * s[o]);
                    *y = scaled + layer.bias.as_ref().map_or(0.0, |b| b[o]);
                }
            });
        Ok(())
    }

    fn rope(
        &self,
        x: &mut HostTensor,
        rows: &HostRows,
        inv_freq: &HostTensor,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), NativeError> {
        check(x.width == heads * head_dim, || {
            format!("rope of {heads}x{head_dim} on rows of {}", x.width)
        })?;
        let half = head_dim / 2;
        for (r, row) in x.values.chunks_mut(x.width).enumerate() {
            let position = rows.step.positions[r] as f32;
            for head in row.chunks_mut(head_dim) {
                for i in 0..half {
                    let angle = position * inv_freq.values[i];
                    let (s, c) = angle.sin_cos();
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * c - b * s;
                    head[i + half] = b * c + a * s;
                }
            }
        }
        Ok(())
    }

    fn kv_append(
        &self,
        cache: &mut HostCache,
        k: &HostTensor,
        v: &HostTensor,
        rows: &HostRows,
    ) -> Result<(), NativeError> {
        let rows = &rows.step;
        let CacheShape {
            slots,
            kv_heads,
            capacity,
            head_dim,
        } = cache.shape;
        for r in 0..rows.len() {
            let (slot, position) = (rows.slots[r] as usize, rows.positions[r] as usize);
            check(slot < slots && position < capacity, || {
                format!("slot {slot} position {position} outside {slots} slots of {capacity}")
            })?;
            for h in 0..kv_heads {
                let at = ((slot * kv_heads + h) * capacity + position) * head_dim;
                let from = r * k.width + h * head_dim;
                for d in 0..head_dim {
                    cache.k[at + d] = f16::from_f32(k.values[from + d]);
                    cache.v[at + d] = f16::from_f32(v.values[from + d]);
                }
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &HostTensor,
        cache: &HostCache,
        rows: &HostRows,
        heads: usize,
        out: &mut HostTensor,
    ) -> Result<(), NativeError> {
        let rows = &rows.step;
        let CacheShape {
            kv_heads,
            capacity,
            head_dim,
            ..
        } = cache.shape;
        let group = heads / kv_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        out.values.clear();
        out.values.resize(q.values.len(), 0.0);
        out.width = q.width;
        for (r, out) in out.values.chunks_mut(q.width).enumerate() {
            let (slot, last) = (rows.slots[r] as usize, rows.positions[r] as usize);
            for h in 0..heads {
                let query = &q.values[r * q.width + h * head_dim..][..head_dim];
                let base = (slot * kv_heads + h / group) * capacity * head_dim;
                let scores: Vec<f32> = (0..=last)
                    .map(|t| {
                        let key = &cache.k[base + t * head_dim..][..head_dim];
                        query.iter().zip(key).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f32 = weights.iter().sum();
                let head_out = &mut out[h * head_dim..(h + 1) * head_dim];
                for (t, w) in weights.iter().enumerate() {
                    let value = &cache.v[base + t * head_dim..][..head_dim];
                    for (o, v) in head_out.iter_mut().zip(value) {
                        *o += w / total * v.to_f32();
                    }
                }
            }
        }
        Ok(())
    }

    fn silu_mul(&self, gate: &HostTensor, up: &HostTensor, out: &mut HostTensor) -> Result<(), NativeError> {
        check(gate.values.len() == up.values.len(), || {
            "gate and up differ in size".into()
        })?;
        out.values.clear();
        out.width = gate.width;
        out.values.extend(
            gate.values
                .iter()
                .zip(&up.values)
                .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u),
        );
        Ok(())
    }

    fn add(&self, x: &mut HostTensor, y: &HostTensor) -> Result<(), NativeError> {
        check(x.values.len() == y.values.len(), || {
            "adding tensors of different sizes".into()
        })?;
        x.values.iter_mut().zip(&y.values).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn gather(&self, x: &HostTensor, rows: &HostRows, out: &mut HostTensor) -> Result<(), NativeError> {
        out.values.clear();
        out.width = x.width;
        for &r in &rows.logits_of {
            let r = r as usize;
            check(r < x.rows(), || format!("row {r} of {}", x.rows()))?;
            out.values.extend_from_slice(&x.values[r * x.width..(r + 1) * x.width]);
        }
        Ok(())
    }

    fn to_host(&self, x: &HostTensor, rows: usize) -> Result<Vec<f32>, NativeError> {
        check(rows <= x.rows(), || format!("{rows} rows of {}", x.rows()))?;
        Ok(x.values[..rows * x.width].to_vec())
    }

    fn record(
        &self,
        launches: &mut dyn FnMut() -> Result<(), NativeError>,
    ) -> Result<Option<Self::Graph>, NativeError> {
        launches().map(|()| None)
    }

    fn replay(&self, graph: &Self::Graph) -> Result<(), NativeError> {
        match *graph {}
    }
}
