//! The sequences decoding together, and their shared KV cache.
//!
//! Rows are left-padded so every sequence's newest position is the last column; the attention
//! mask marks padding. A decode step feeds one token per row and the cache grows by one column
//! inside ONNX Runtime (no copy on our side). Only when rows join (after their prefill) or leave
//! (finished or cancelled) is the cache copied out, re-laid and handed back; columns that are
//! padding for every row are trimmed then.

use ndarray::{Array2, Array4, Axis, concatenate, s};
use tokenizers::Tokenizer;

use crate::engine::{DecoderSession, EngineError, KvCache};
use crate::generate::{Advance, GenerateError, Sequence};

/// One decoding row.
pub struct Row<T> {
    pub seq: Sequence,
    /// The caller's bookkeeping (where events go, timings).
    pub meta: T,
    next_token: u32,
    next_position: i64,
}

/// Rows that finished prefill together, ready to join the decode batch.
pub struct Prefilled<T> {
    rows: Vec<Row<T>>,
    mask: Array2<i64>,
    cache: KvCache,
}

/// Runs the prefill of `seqs` as one left-padded batch. Each sequence's first token is chosen
/// at once; `on_advance` receives it (with the row's meta) and sequences that finish there are
/// dropped. Returns the rows still generating.
pub fn prefill<T>(
    session: &mut DecoderSession,
    tokenizer: &Tokenizer,
    seqs: Vec<(Sequence, T)>,
    mut on_advance: impl FnMut(&mut T, Result<Advance, GenerateError>) -> bool,
) -> Result<Option<Prefilled<T>>, EngineError> {
    let longest = seqs.iter().map(|(s, _)| s.prompt().len()).max().unwrap_or(0);
    let n = seqs.len();
    let mut ids = Array2::<i64>::zeros((n, longest));
    let mut mask = Array2::<i64>::zeros((n, longest));
    let mut positions = Array2::<i64>::zeros((n, longest));
    for (b, (seq, _)) in seqs.iter().enumerate() {
        let prompt = seq.prompt();
        let pad = longest - prompt.len();
        for (i, &t) in prompt.iter().enumerate() {
            ids[[b, pad + i]] = i64::from(t);
            mask[[b, pad + i]] = 1;
            positions[[b, pad + i]] = i as i64;
        }
    }
    let (logits, cache) = session.forward(&ids, &mask, &positions, session.empty_cache(n)?)?;
    let mut keep = Vec::new();
    let mut rows = Vec::new();
    for (b, (mut seq, mut meta)) in seqs.into_iter().enumerate() {
        let last = logits.slice(s![b, -1, ..]).to_vec();
        let advance = seq.advance(tokenizer, &last);
        let next = advance.as_ref().ok().and_then(|a| a.next);
        let wanted = on_advance(&mut meta, advance);
        if let (Some(token), true) = (next, wanted) {
            let next_position = seq.prompt().len() as i64;
            rows.push(Row {
                seq,
                meta,
                next_token: token,
                next_position,
            });
            keep.push(b);
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let (mask, cache) = if keep.len() == n {
        (mask, cache)
    } else {
        let arrays = cache
            .into_arrays()?
            .into_iter()
            .map(|a| a.select(Axis(0), &keep))
            .collect();
        (mask.select(Axis(0), &keep), KvCache::from_arrays(arrays)?)
    };
    Ok(Some(Prefilled { rows, mask, cache }))
}

/// The decode batch.
pub struct DecodeBatch<T> {
    rows: Vec<Row<T>>,
    mask: Array2<i64>,
    cache: Option<KvCache>,
}

impl<T> Default for DecodeBatch<T> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            mask: Array2::zeros((0, 0)),
            cache: None,
        }
    }
}

/// Left-pads `[rows, kv, len, dim]` to `len` columns.
fn left_pad4(a: Array4<f32>, len: usize) -> Array4<f32> {
    let (r, h, t, d) = a.dim();
    if t == len {
        return a;
    }
    let mut out = Array4::zeros((r, h, len, d));
    out.slice_mut(s![.., .., len - t.., ..]).assign(&a);
    out
}

fn left_pad2(a: Array2<i64>, len: usize) -> Array2<i64> {
    let (r, t) = a.dim();
    if t == len {
        return a;
    }
    let mut out = Array2::zeros((r, len));
    out.slice_mut(s![.., len - t..]).assign(&a);
    out
}

impl<T> DecodeBatch<T> {
    /// Number of rows decoding.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row is decoding.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows' bookkeeping.
    pub fn metas(&self) -> impl Iterator<Item = &T> {
        self.rows.iter().map(|r| &r.meta)
    }

    /// Adds freshly prefilled rows.
    pub fn join(&mut self, new: Prefilled<T>) -> Result<(), EngineError> {
        let Some(cache) = self.cache.take() else {
            self.rows = new.rows;
            self.mask = new.mask;
            self.cache = Some(new.cache);
            return Ok(());
        };
        let len = cache.len().max(new.cache.len());
        let old = cache.into_arrays()?;
        let add = new.cache.into_arrays()?;
        let arrays = old
            .into_iter()
            .zip(add)
            .map(|(a, b)| {
                let (a, b) = (left_pad4(a, len), left_pad4(b, len));
                concatenate(Axis(0), &[a.view(), b.view()])
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Layout(format!("joining KV caches: {e}")))?;
        let masks = [left_pad2(std::mem::take(&mut self.mask), len), left_pad2(new.mask, len)];
        self.mask = concatenate(Axis(0), &[masks[0].view(), masks[1].view()])
            .map_err(|e| EngineError::Layout(format!("joining masks: {e}")))?;
        self.cache = Some(KvCache::from_arrays(arrays)?);
        self.rows.extend(new.rows);
        Ok(())
    }

    /// Runs one decode step for every row. `on_advance` gets each row's outcome and returns
    /// whether the row should go on (false: its client is gone); finished rows leave.
    pub fn step(
        &mut self,
        session: &mut DecoderSession,
        tokenizer: &Tokenizer,
        mut on_advance: impl FnMut(&mut T, Result<Advance, GenerateError>) -> bool,
    ) -> Result<(), EngineError> {
        let Some(cache) = self.cache.take() else { return Ok(()) };
        let n = self.rows.len();
        let ids = Array2::from_shape_fn((n, 1), |(b, _)| i64::from(self.rows[b].next_token));
        let positions = Array2::from_shape_fn((n, 1), |(b, _)| self.rows[b].next_position);
        let mask = std::mem::take(&mut self.mask);
        self.mask = concatenate(Axis(1), &[mask.view(), Array2::ones((n, 1)).view()])
            .map_err(|e| EngineError::Layout(format!("growing the mask: {e}")))?;
        let (logits, cache) = session.forward(&ids, &self.mask, &positions, cache)?;
        let mut keep = Vec::with_capacity(n);
        for (b, row) in self.rows.iter_mut().enumerate() {
            let last = logits.slice(s![b, 0, ..]).to_vec();
            let advance = row.seq.advance(tokenizer, &last);
            let next = advance.as_ref().ok().and_then(|a| a.next);
            if on_advance(&mut row.meta, advance)
                && let Some(token) = next
            {
                row.next_token = token;
                row.next_position += 1;
                keep.push(b);
            }
        }
        if keep.len() == n {
            self.cache = Some(cache);
            return Ok(());
        }
        self.retain_rows(&keep, cache)
    }

    /// Keeps the rows at `keep`, trimming columns that became padding for every row.
    fn retain_rows(&mut self, keep: &[usize], cache: KvCache) -> Result<(), EngineError> {
        let mut index = 0;
        self.rows.retain(|_| {
            let kept = keep.contains(&index);
            index += 1;
            kept
        });
        if keep.is_empty() {
            self.mask = Array2::zeros((0, 0));
            return Ok(());
        }
        let mask = self.mask.select(Axis(0), keep);
        let first_used = (0..mask.ncols())
            .find(|&c| mask.column(c).iter().any(|&m| m != 0))
            .unwrap_or(0);
        self.mask = mask.slice(s![.., first_used..]).to_owned();
        let arrays = cache
            .into_arrays()?
            .into_iter()
            .map(|a| a.select(Axis(0), keep).slice(s![.., .., first_used.., ..]).to_owned())
            .collect();
        self.cache = Some(KvCache::from_arrays(arrays)?);
        Ok(())
    }
}
