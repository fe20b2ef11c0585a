//! The operations a decoder step is made of, as a trait: [`super::reference::CpuBackend`] runs
//! each in plain Rust (the CPU reference of each kernel in `kernels/decoder.cu`), and the CUDA
//! backend launches the kernel. The step itself ([`super::NativeDecoder`]) is written once
//! against this trait, so its logic is tested where no GPU is.

use half::{bf16, f16};

use super::NativeError;

/// How linear-layer weights are stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// INT8, one symmetric scale per output channel (max |w| / 127), quantised at load.
    #[default]
    Int8,
    /// IEEE half precision.
    Fp16,
    /// bfloat16: FP32's range with 8 significant bits, what most students are trained and
    /// shipped in (a BF16 checkpoint's values exactly).
    Bf16,
}

/// A linear layer's weight `[out, in]` in its stored format, on the host.
#[derive(Debug, Clone, PartialEq)]
pub enum HostWeight {
    Fp16(Vec<f16>),
    Bf16(Vec<bf16>),
    Int8 { values: Vec<i8>, scales: Vec<f32> },
}

impl HostWeight {
    /// `weight` (`out` rows of `inputs`) in `format`.
    pub fn new(weight: &[f32], out: usize, inputs: usize, format: WeightFormat) -> Self {
        match format {
            WeightFormat::Fp16 => Self::Fp16(weight.iter().map(|&w| f16::from_f32(w)).collect()),
            WeightFormat::Bf16 => Self::Bf16(weight.iter().map(|&w| bf16::from_f32(w)).collect()),
            WeightFormat::Int8 => {
                let mut values = Vec::with_capacity(out * inputs);
                let mut scales = Vec::with_capacity(out);
                for row in weight.chunks(inputs.max(1)) {
                    let max = row.iter().fold(0.0f32, |m, w| m.max(w.abs()));
                    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                    values.extend(row.iter().map(|&w| (w / scale).round().clamp(-127.0, 127.0) as i8));
                    scales.push(scale);
                }
                Self::Int8 { values, scales }
            }
        }
    }

    /// Bytes the weight takes on the device.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Fp16(values) => values.len() * 2,
            Self::Bf16(values) => values.len() * 2,
            Self::Int8 { values, scales } => values.len() + scales.len() * 4,
        }
    }
}

/// The rows of one step: row r is token `tokens[r]` of the sequence in slot `slots[r]`, at
/// position `positions[r]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepRows {
    pub tokens: Vec<u32>,
    pub slots: Vec<u32>,
    pub positions: Vec<u32>,
}

impl StepRows {
    /// Adds a row: `token` of the sequence in `slot` at `position`; the row's index.
    pub fn push(&mut self, token: u32, slot: u32, position: u32) -> u32 {
        self.tokens.push(token);
        self.slots.push(slot);
        self.positions.push(position);
        self.len() as u32 - 1
    }

    /// Adds `prompt` as the rows of a sequence starting in `slot` at position 0; the index of
    /// its last row (whose logits choose the first token).
    pub fn push_prompt(&mut self, slot: u32, prompt: &[u32]) -> u32 {
        for (position, &token) in prompt.iter().enumerate() {
            self.push(token, slot, position as u32);
        }
        self.len() as u32 - 1
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// One layer's KV cache shape: `slots x kv_heads x capacity x head_dim` for K and for V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    pub slots: usize,
    pub kv_heads: usize,
    pub capacity: usize,
    pub head_dim: usize,
}

impl CacheShape {
    /// Values in K (and in V).
    pub fn len(&self) -> usize {
        self.slots * self.kv_heads * self.capacity * self.head_dim
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The operations of a decoder step. Tensors are f32 `[rows, width]`, row-major, in buffers
/// allocated once for up to some number of rows: each operation writes its result into an
/// `out` buffer (taking as many rows as its input has), so a step allocates nothing and runs
/// the same launches on the same buffers every time its row count repeats — which is what lets
/// [`Backend::record`] keep a decode step as a CUDA graph.
pub trait Backend {
    /// Activations on the backend.
    type Tensor;
    /// A linear layer (weight and optional bias) on the backend.
    type Linear;
    /// An FP16 embedding table.
    type Table;
    /// One layer's K and V caches (FP16).
    type Cache;
    /// A step's inputs on the backend (its tokens, slots and positions, and the rows whose
    /// logits are wanted), in buffers each step rewrites.
    type Rows;
    /// Launches recorded to be run again (a CUDA graph).
    type Graph;

    /// Free memory of the device, where it is limited (None: the host's).
    fn free_bytes(&self) -> Option<usize> {
        None
    }
    /// Uploads f32 values as a tensor of `width` columns.
    fn tensor(&self, values: &[f32], width: usize) -> Result<Self::Tensor, NativeError>;
    /// A buffer for up to `rows` rows of `width`.
    fn zeros(&self, rows: usize, width: usize) -> Result<Self::Tensor, NativeError>;
    /// Uploads a linear layer `[out, in]`.
    fn linear_weight(
        &self,
        weight: HostWeight,
        bias: Option<&[f32]>,
        out: usize,
        inputs: usize,
    ) -> Result<Self::Linear, NativeError>;
    /// Uploads an embedding table `[rows, width]` (stored FP16).
    fn table(&self, values: &[f32], width: usize) -> Result<Self::Table, NativeError>;
    /// Allocates one layer's caches.
    fn cache(&self, shape: CacheShape) -> Result<Self::Cache, NativeError>;
    /// Buffers for the inputs of steps of up to `rows` rows and `logit_rows` logits.
    fn step_inputs(&self, rows: usize, logit_rows: usize) -> Result<Self::Rows, NativeError>;
    /// Writes a step's rows, and the rows whose logits are wanted, into `into`.
    fn write_rows(&self, rows: &StepRows, logits_of: &[u32], into: &mut Self::Rows) -> Result<(), NativeError>;

    /// `table[token]` for each token of `rows`.
    fn embed(&self, table: &Self::Table, rows: &Self::Rows, out: &mut Self::Tensor) -> Result<(), NativeError>;
    /// Each row divided by its root mean square (plus `eps`), times `weight`.
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        eps: f32,
        out: &mut Self::Tensor,
    ) -> Result<(), NativeError>;
    /// `x W^T + b`.
    fn linear(&self, x: &Self::Tensor, layer: &Self::Linear, out: &mut Self::Tensor) -> Result<(), NativeError>;
    /// Rotary embedding in place of `heads` heads of `head_dim` a row, at the rows' positions.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        rows: &Self::Rows,
        inv_freq: &Self::Tensor,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), NativeError>;
    /// Writes each row's K and V into its slot at its position.
    fn kv_append(
        &self,
        cache: &mut Self::Cache,
        k: &Self::Tensor,
        v: &Self::Tensor,
        rows: &Self::Rows,
    ) -> Result<(), NativeError>;
    /// Causal grouped-query attention of each row over its slot's positions up to its own.
    fn attention(
        &self,
        q: &Self::Tensor,
        cache: &Self::Cache,
        rows: &Self::Rows,
        heads: usize,
        out: &mut Self::Tensor,
    ) -> Result<(), NativeError>;
    /// `silu(gate) * up`.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor, out: &mut Self::Tensor) -> Result<(), NativeError>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<(), NativeError>;
    /// The rows of `x` whose logits `rows` wants, in its order.
    fn gather(&self, x: &Self::Tensor, rows: &Self::Rows, out: &mut Self::Tensor) -> Result<(), NativeError>;
    /// The first `rows` rows of the tensor, on the host.
    fn to_host(&self, x: &Self::Tensor, rows: usize) -> Result<Vec<f32>, NativeError>;

    /// Runs `launches` as a graph to be replayed: Some(graph) when the backend recorded it
    /// (nothing has run yet: replay it), None when it has no graphs and ran `launches` itself.
    fn record(&self, launches: &mut dyn FnMut() -> Result<(), NativeError>)
    -> Result<Option<Self::Graph>, NativeError>;
    /// Runs a recorded graph again, on the buffers it was recorded with.
    fn replay(&self, graph: &Self::Graph) -> Result<(), NativeError>;
}
