//! Building blocks shared by the decoder and encoder graphs: linear layers in each precision,
//! embeddings and normalisations, reading weights from the checkpoint as they are needed.

use std::collections::HashMap;

use anyhow::Result;

use super::graph::{Attr, Elem, GraphBuilder, MS_DOMAIN};
use super::quantize::{quantize_blocks, quantize_rows, transpose};
use super::{Int8Format, Precision};
use crate::checkpoint::Weights;

/// Block size of `MatMulNBits` weights (a power of two, at least 16).
const NBITS_BLOCK: usize = 32;

/// The outputs of one `DynamicQuantizeLinear`: codes, scale, zero point.
#[derive(Clone)]
struct Quantized {
    codes: String,
    scale: String,
    zero_point: String,
}

/// A graph under construction plus the weights it reads.
pub struct Emitter<'w> {
    /// The graph being built.
    pub b: GraphBuilder,
    weights: &'w Weights,
    precision: Precision,
    /// Activations already quantised, by value name: q/k/v and gate/up share one quantisation.
    quantized: HashMap<String, Quantized>,
    per_token: HashMap<String, Quantized>,
}

impl<'w> Emitter<'w> {
    /// Starts emitting into `b`.
    pub fn new(b: GraphBuilder, weights: &'w Weights, precision: Precision) -> Self {
        Self {
            b,
            weights,
            precision,
            quantized: HashMap::new(),
            per_token: HashMap::new(),
        }
    }

    /// Reads a tensor as `f32`, with its shape.
    pub fn tensor(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let meta = self.weights.meta(name)?;
        Ok((self.weights.f32(name)?, meta.shape))
    }

    /// Adds a checkpoint tensor as a float initializer (the graph's float type) under its own
    /// name.
    pub fn float_tensor(&mut self, name: &str) -> Result<String> {
        let (values, shape) = self.tensor(name)?;
        self.b.float_init(name, &shape, &values)
    }

    /// `x @ W^T + b` for the checkpoint's `{prefix}.weight` (`[out, in]`) and, when `bias`,
    /// `{prefix}.bias`.
    pub fn linear(&mut self, x: &str, prefix: &str, bias: bool) -> Result<String> {
        let bias_name = format!("{prefix}.bias");
        self.linear_from(x, &format!("{prefix}.weight"), bias.then_some(bias_name.as_str()))
    }

    /// Like [`Self::linear`] with explicit tensor names (a tied output head reads the embedding).
    pub fn linear_from(&mut self, x: &str, weight: &str, bias: Option<&str>) -> Result<String> {
        let (w, shape) = self.tensor(weight)?;
        let [out, inp] = shape[..] else {
            anyhow::bail!("tensor `{weight}` is not a matrix: {shape:?}")
        };
        let y = match self.precision {
            Precision::Fp32 => {
                let wt = self
                    .b
                    .float_init(&format!("{weight}.T"), &[inp, out], &transpose(&w, out, inp))?;
                self.b.op("MatMul", &[x, &wt], vec![])
            }
            Precision::Int8(Int8Format::MatMulInteger) => {
                let q = quantize_rows(&w, inp);
                let codes = transpose(&q.codes, out, inp);
                let wq = self
                    .b
                    .initializer(&format!("{weight}.int8"), Elem::I8, &[inp, out], as_bytes(&codes))?;
                let ws = self.b.float_init(&format!("{weight}.scale"), &[out], &q.scales)?;
                let xq = self.quantize_per_token(x)?;
                let acc = self.b.op("MatMulInteger", &[&xq.codes, &wq, &xq.zero_point], vec![]);
                let to = i64::from(self.b.float().code());
                let acc = self.b.op("Cast", &[&acc], vec![("to", Attr::Int(to))]);
                let acc = self.b.op("Mul", &[&acc, &ws], vec![]);
                self.b.op("Mul", &[&acc, &xq.scale], vec![])
            }
            Precision::Int8(Int8Format::Qdq) => {
                let q = quantize_rows(&w, inp);
                let codes = transpose(&q.codes, out, inp);
                let wq = self
                    .b
                    .initializer(&format!("{weight}.int8"), Elem::I8, &[inp, out], as_bytes(&codes))?;
                let ws = self.b.float_init(&format!("{weight}.scale"), &[out], &q.scales)?;
                let wd = self.b.op("DequantizeLinear", &[&wq, &ws], vec![("axis", Attr::Int(1))]);
                let xq = self.quantize_activation(x);
                let xd = self
                    .b
                    .op("DequantizeLinear", &[&xq.codes, &xq.scale, &xq.zero_point], vec![]);
                self.b.op("MatMul", &[&xd, &wd], vec![])
            }
            Precision::Int8(Int8Format::MatMulNBits) => {
                let q = quantize_blocks(&w, inp, NBITS_BLOCK);
                let wq = self.b.initializer(
                    &format!("{weight}.q8"),
                    Elem::U8,
                    &[out, q.blocks, NBITS_BLOCK],
                    q.codes,
                )?;
                let ws = self
                    .b
                    .float_init(&format!("{weight}.scales"), &[out, q.blocks], &q.scales)?;
                self.b.op_in(
                    MS_DOMAIN,
                    "MatMulNBits",
                    &[x, &wq, &ws],
                    vec![
                        ("K", Attr::Int(inp as i64)),
                        ("N", Attr::Int(out as i64)),
                        ("bits", Attr::Int(8)),
                        ("block_size", Attr::Int(NBITS_BLOCK as i64)),
                        // 4: int8 activations and integer dot products.
                        ("accuracy_level", Attr::Int(4)),
                    ],
                )
            }
        };
        match bias {
            Some(bias) => {
                let bias = self.float_tensor(bias)?;
                Ok(self.b.op("Add", &[&y, &bias], vec![]))
            }
            None => Ok(y),
        }
    }

    /// Symmetric per-token quantisation of `x` (`[.., K]`) to uint8 around 128: one scale per
    /// row, so a sequence's result does not depend on the other sequences in its batch.
    fn quantize_per_token(&mut self, x: &str) -> Result<Quantized> {
        if let Some(q) = self.per_token.get(x) {
            return Ok(q.clone());
        }
        let b = &mut self.b;
        let abs = b.op("Abs", &[x], vec![]);
        let amax = b.op(
            "ReduceMax",
            &[&abs],
            vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
        );
        let (qmax, tiny) = (b.scalar_float(127.0), b.scalar_float(f32::MIN_POSITIVE));
        let scale = b.op("Div", &[&amax, &qmax], vec![]);
        let scale = b.op("Max", &[&scale, &tiny], vec![]);
        let inverse = b.op("Reciprocal", &[&scale], vec![]);
        let scaled = b.op("Mul", &[x, &inverse], vec![]);
        // Cast truncates, so adding 128.5 rounds to nearest and offsets to the zero point at once.
        let offset = b.scalar_float(128.5);
        let shifted = b.op("Add", &[&scaled, &offset], vec![]);
        let codes = b.op("Cast", &[&shifted], vec![("to", Attr::Int(2))]);
        let zp_name = b.fresh("zp128");
        let zero_point = b.initializer(&zp_name, Elem::U8, &[], vec![128])?;
        let q = Quantized {
            codes,
            scale,
            zero_point,
        };
        self.per_token.insert(x.to_string(), q.clone());
        Ok(q)
    }

    fn quantize_activation(&mut self, x: &str) -> Quantized {
        if !self.quantized.contains_key(x) {
            let (codes, scale, zero_point) = (self.b.fresh("xq"), self.b.fresh("xscale"), self.b.fresh("xzero"));
            self.b.node_in(
                "",
                "DynamicQuantizeLinear",
                &[x],
                &[&codes, &scale, &zero_point],
                vec![],
            );
            self.quantized.insert(
                x.to_string(),
                Quantized {
                    codes,
                    scale,
                    zero_point,
                },
            );
        }
        self.quantized[x].clone()
    }

    /// Looks rows of the `[rows, hidden]` table `name` up by `ids`; the table is stored in int8
    /// with one scale per row when `quantize` is set and the precision is INT8.
    pub fn embedding(&mut self, ids: &str, name: &str, quantize: bool) -> Result<String> {
        if !quantize || self.precision == Precision::Fp32 {
            let table = self.float_tensor(name)?;
            return Ok(self.b.op("Gather", &[&table, ids], vec![]));
        }
        let (values, shape) = self.tensor(name)?;
        let q = quantize_rows(&values, shape[1]);
        // Distinct names from the linear layer's: a tied head quantises the same tensor again.
        let table = self
            .b
            .initializer(&format!("{name}.gather.int8"), Elem::I8, &shape, as_bytes(&q.codes))?;
        let scales = self
            .b
            .float_init(&format!("{name}.gather.scale"), &[shape[0]], &q.scales)?;
        let rows = self.b.op("Gather", &[&table, ids], vec![]);
        let to = i64::from(self.b.float().code());
        let rows = self.b.op("Cast", &[&rows], vec![("to", Attr::Int(to))]);
        let row_scales = self.b.op("Gather", &[&scales, ids], vec![]);
        let axes = self.b.i64s(&[-1]);
        let row_scales = self.b.op("Unsqueeze", &[&row_scales, &axes], vec![]);
        Ok(self.b.op("Mul", &[&rows, &row_scales], vec![]))
    }

    /// RMS normalisation over the last axis, in plain ops (ONNX Runtime fuses them into
    /// `SimplifiedLayerNormalization`).
    pub fn rms_norm(&mut self, x: &str, weight: &str, eps: f64) -> Result<String> {
        let w = self.float_tensor(weight)?;
        if self.b.float() == Elem::F16 {
            // Squares of FP16 activations overflow: ONNX Runtime's fused op accumulates in FP32.
            return Ok(self.b.op(
                "SimplifiedLayerNormalization",
                &[x, &w],
                vec![
                    ("axis", Attr::Int(-1)),
                    ("epsilon", Attr::Float(eps as f32)),
                    ("stash_type", Attr::Int(1)),
                ],
            ));
        }
        let sq = self.b.op("Mul", &[x, x], vec![]);
        let mean = self.b.op(
            "ReduceMean",
            &[&sq],
            vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
        );
        let eps = self.b.scalar_float(eps as f32);
        let var = self.b.op("Add", &[&mean, &eps], vec![]);
        let rms = self.b.op("Sqrt", &[&var], vec![]);
        let normed = self.b.op("Div", &[x, &rms], vec![]);
        Ok(self.b.op("Mul", &[&normed, &w], vec![]))
    }

    /// Layer normalisation over the last axis with `{prefix}.weight` and `{prefix}.bias`.
    pub fn layer_norm(&mut self, x: &str, prefix: &str, eps: f64) -> Result<String> {
        let w = self.float_tensor(&format!("{prefix}.weight"))?;
        let b = self.float_tensor(&format!("{prefix}.bias"))?;
        Ok(self.b.op(
            "LayerNormalization",
            &[x, &w, &b],
            vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps as f32))],
        ))
    }
}

fn as_bytes(codes: &[i8]) -> Vec<u8> {
    codes.iter().map(|&c| c as u8).collect()
}
