//! The buffers a decoder step writes its activations into, allocated once for a number of rows
//! (and of rows whose logits are wanted), so steps allocate nothing and a recorded step's
//! launches stay valid.

use super::NativeError;
use super::backend::Backend;
use crate::checkpoint::DecoderConfig;

/// A step's inputs and activations for up to `rows` rows and `logit_rows` logits.
pub(super) struct Workspace<B: Backend> {
    pub inputs: B::Rows,
    pub x: B::Tensor,
    pub normed: B::Tensor,
    pub q: B::Tensor,
    pub k: B::Tensor,
    pub v: B::Tensor,
    pub attended: B::Tensor,
    /// What a block adds to `x`: the attention's output projection, then the MLP's.
    pub delta: B::Tensor,
    pub gate: B::Tensor,
    pub up: B::Tensor,
    pub mixed: B::Tensor,
    pub gathered: B::Tensor,
    pub last: B::Tensor,
    pub logits: B::Tensor,
    rows: usize,
    logit_rows: usize,
}

/// The widths of a row's activations: hidden, query, key/value and MLP.
fn widths(c: &DecoderConfig) -> (usize, usize, usize, usize) {
    (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    )
}

/// Bytes of a workspace for `rows` rows and `logit_rows` logits.
pub(super) fn bytes(c: &DecoderConfig, rows: usize, logit_rows: usize) -> usize {
    let (h, q, kv, m) = widths(c);
    let per_row = 3 * h + 2 * q + 2 * kv + 3 * m;
    let per_logit_row = 2 * h + c.vocab_size;
    4 * (rows * (per_row + 3) + logit_rows * (per_logit_row + 1))
}

impl<B: Backend> Workspace<B> {
    /// Allocates a workspace on `backend` for steps of up to `rows` rows and `logit_rows` logits.
    pub fn new(backend: &B, c: &DecoderConfig, rows: usize, logit_rows: usize) -> Result<Self, NativeError> {
        let (h, q, kv, m) = widths(c);
        let rows_of = |width| backend.zeros(rows, width);
        Ok(Self {
            inputs: backend.step_inputs(rows, logit_rows)?,
            x: rows_of(h)?,
            normed: rows_of(h)?,
            q: rows_of(q)?,
            k: rows_of(kv)?,
            v: rows_of(kv)?,
            attended: rows_of(q)?,
            delta: rows_of(h)?,
            gate: rows_of(m)?,
            up: rows_of(m)?,
            mixed: rows_of(m)?,
            gathered: backend.zeros(logit_rows, h)?,
            last: backend.zeros(logit_rows, h)?,
            logits: backend.zeros(logit_rows, c.vocab_size)?,
            rows,
            logit_rows,
        })
    }

    /// Whether a step of `rows` rows wanting `logit_rows` logits fits.
    pub fn fits(&self, rows: usize, logit_rows: usize) -> bool {
        rows <= self.rows && logit_rows <= self.logit_rows
    }
}
