//! The sequences decoding together, and their shared KV cache.
//!
//! Rows are left-padded so every sequence's newest position is the last column; the attention
//! mask marks padding. A decode step feeds one token per row and the cache grows by one column
//! inside ONNX Runtime (no copy on our side). Only when rows join (after their prefill) or leave
//! (finished or cancelled) is the cache re-laid, in one copy per tensor; columns that are
//! padding for every row are trimmed then.

use ndarray::{Array2, Axis, concatenate, s};
use tokenizers::Tokenizer;

use super::BatchPolicy;
use crate::engine::{CacheRows, DecoderSession, EngineError, KvCache};
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
    let (logits, cache) = session.forward_last(&ids, &mask, &positions, session.empty_cache(n)?)?;
    let mut keep = Vec::new();
    let mut rows = Vec::new();
    for (b, (mut seq, mut meta)) in seqs.into_iter().enumerate() {
        let last = logits.slice(s![b, 0, ..]).to_vec();
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
        let rows = CacheRows {
            cache: &cache,
            rows: &keep,
            from: 0,
        };
        (mask.select(Axis(0), &keep), KvCache::gather(&[rows], longest)?)
    };
    Ok(Some(Prefilled { rows, mask, cache }))
}

/// Runs the largest prefill `policy` allows (the longest bucket, as many rows as the token
/// budget takes) and one decode step after it, and drops the results: ONNX Runtime's arena
/// grows to the peak at load rather than step by step under traffic (so a soak's memory is flat
/// from its first minute, and a model too big for the machine fails to warm up at once). The
/// sequences are `context - 1` tokens at most.
pub fn warm_up(
    session: &mut DecoderSession,
    policy: &BatchPolicy,
    context: usize,
) -> Result<(usize, usize), EngineError> {
    let longest = policy
        .buckets
        .last()
        .copied()
        .unwrap_or(context)
        .min(context.saturating_sub(1))
        .max(1);
    let rows = (policy.max_batch_tokens / longest).clamp(1, policy.max_batch_size.max(1));
    let positions = Array2::from_shape_fn((rows, longest), |(_, i)| i as i64);
    let ids = Array2::<i64>::zeros((rows, longest));
    let mask = Array2::<i64>::ones((rows, longest));
    let (_, cache) = session.forward_last(&ids, &mask, &positions, session.empty_cache(rows)?)?;
    let next = Array2::<i64>::zeros((rows, 1));
    let mask = Array2::<i64>::ones((rows, longest + 1));
    let position = Array2::from_elem((rows, 1), longest as i64);
    session.forward_last(&next, &mask, &position, cache)?;
    Ok((rows, longest))
}

/// Left-pads a mask `[rows, len]` with zeros to `len` columns.
fn left_pad2(a: Array2<i64>, len: usize) -> Array2<i64> {
    let (r, t) = a.dim();
    if t == len {
        return a;
    }
    let mut out = Array2::zeros((r, len));
    out.slice_mut(s![.., len - t..]).assign(&a);
    out
}

/// The decode batch: rows (slots) sharing one left-padded KV cache. A finished row leaves its
/// slot empty instead of re-laying the cache; a joining row is written into an empty slot in
/// place when it fits, so in steady state no step copies the cache on our side. The batch is
/// compacted (one copy) only when empty slots outnumber live rows, or a newcomer does not fit.
pub struct DecodeBatch<T> {
    rows: Vec<Option<Row<T>>>,
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

impl<T> DecodeBatch<T> {
    /// Number of rows decoding.
    pub fn len(&self) -> usize {
        self.rows.iter().flatten().count()
    }

    /// Whether no row is decoding.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows' bookkeeping.
    pub fn metas(&self) -> impl Iterator<Item = &T> {
        self.rows.iter().flatten().map(|r| &r.meta)
    }

    /// Adds freshly prefilled rows.
    pub fn join(&mut self, new: Prefilled<T>) -> Result<(), EngineError> {
        let Some(cache) = &mut self.cache else {
            self.rows = new.rows.into_iter().map(Some).collect();
            self.mask = new.mask;
            self.cache = Some(new.cache);
            return Ok(());
        };
        let free: Vec<usize> = (0..self.rows.len()).filter(|&i| self.rows[i].is_none()).collect();
        if free.len() < new.rows.len() || new.cache.len() > cache.len() {
            return self.relayout(Some(new));
        }
        let pairs: Vec<(usize, usize)> = free.iter().copied().enumerate().take(new.rows.len()).collect();
        cache.write_rows(&new.cache, &pairs)?;
        let start = self.mask.ncols() - new.mask.ncols();
        for ((src, dst), row) in pairs.into_iter().zip(new.rows) {
            self.mask.row_mut(dst).fill(0);
            self.mask.slice_mut(s![dst, start..]).assign(&new.mask.row(src));
            self.rows[dst] = Some(row);
        }
        Ok(())
    }

    /// Rebuilds the cache with the live rows only (and `new` after them), trimming columns that
    /// are padding for every row: one copy per tensor.
    fn relayout(&mut self, new: Option<Prefilled<T>>) -> Result<(), EngineError> {
        let Some(cache) = self.cache.take() else {
            return Ok(());
        };
        let live: Vec<usize> = (0..self.rows.len()).filter(|&i| self.rows[i].is_some()).collect();
        let first_used = self.unused_columns();
        let mask = self.mask.select(Axis(0), &live);
        let kept = mask.ncols() - first_used;
        let len = kept.max(new.as_ref().map_or(0, |n| n.cache.len()));
        let mut parts = vec![CacheRows {
            cache: &cache,
            rows: &live,
            from: first_used,
        }];
        let new_rows: Vec<usize> = new.as_ref().map_or(Vec::new(), |n| (0..n.rows.len()).collect());
        if let Some(n) = &new {
            parts.push(CacheRows {
                cache: &n.cache,
                rows: &new_rows,
                from: 0,
            });
        }
        let gathered = KvCache::gather(&parts, len)?;
        let mut masks = vec![left_pad2(mask.slice(s![.., first_used..]).to_owned(), len)];
        let mut rows: Vec<Option<Row<T>>> = std::mem::take(&mut self.rows)
            .into_iter()
            .filter(Option::is_some)
            .collect();
        if let Some(n) = new {
            masks.push(left_pad2(n.mask, len));
            rows.extend(n.rows.into_iter().map(Some));
        }
        let views: Vec<_> = masks.iter().map(|m| m.view()).collect();
        self.mask = concatenate(Axis(0), &views).map_err(|e| EngineError::Layout(format!("joining masks: {e}")))?;
        self.rows = rows;
        self.cache = Some(gathered);
        Ok(())
    }

    /// Runs one decode step for every row. `on_advance` gets each row's outcome and returns
    /// whether the row should go on (false: its client is gone); finished rows leave their
    /// slot. Empty slots are computed too (their output is ignored) until compaction.
    pub fn step(
        &mut self,
        session: &mut DecoderSession,
        tokenizer: &Tokenizer,
        mut on_advance: impl FnMut(&mut T, Result<Advance, GenerateError>) -> bool,
    ) -> Result<(), EngineError> {
        let Some(cache) = self.cache.take() else { return Ok(()) };
        let n = self.rows.len();
        let ids = Array2::from_shape_fn((n, 1), |(b, _)| {
            self.rows[b].as_ref().map_or(0, |r| i64::from(r.next_token))
        });
        let positions = Array2::from_shape_fn((n, 1), |(b, _)| self.rows[b].as_ref().map_or(0, |r| r.next_position));
        let mask = std::mem::take(&mut self.mask);
        self.mask = concatenate(Axis(1), &[mask.view(), Array2::ones((n, 1)).view()])
            .map_err(|e| EngineError::Layout(format!("growing the mask: {e}")))?;
        let (logits, cache) = session.forward_last(&ids, &self.mask, &positions, cache)?;
        self.cache = Some(cache);
        for (b, slot) in self.rows.iter_mut().enumerate() {
            let Some(row) = slot else { continue };
            let last = logits.slice(s![b, 0, ..]).to_vec();
            let advance = row.seq.advance(tokenizer, &last);
            let next = advance.as_ref().ok().and_then(|a| a.next);
            if on_advance(&mut row.meta, advance)
                && let Some(token) = next
            {
                row.next_token = token;
                row.next_position += 1;
            } else {
                // Finished or abandoned: the slot (and the request's place) frees at once.
                *slot = None;
            }
        }
        let live = self.len();
        if live == 0 {
            *self = Self::default();
        } else if n - live > live || 2 * self.unused_columns() > self.mask.ncols() {
            // Amortised: a re-layout copies the cache once, and only after the batch has lost
            // half of its rows or half of its columns.
            self.relayout(None)?;
        }
        Ok(())
    }

    /// Leading columns that are padding for every live row (they grow as rows are replaced).
    fn unused_columns(&self) -> usize {
        self.rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_some())
            .map(|(b, _)| {
                self.mask
                    .row(b)
                    .iter()
                    .position(|&m| m != 0)
                    .unwrap_or(self.mask.ncols())
            })
            .min()
            .unwrap_or(0)
    }
}
