//! The sequences decoding together, and their shared KV cache.
//!
//! Rows are left-padded so every sequence's newest position is the last column; the attention
//! mask marks padding. A decode step feeds one token per row and the cache grows by one column
//! inside ONNX Runtime (no copy on our side). Only when rows join (after their prefill) or leave
//! (finished or cancelled) is the cache re-laid, in one copy per tensor; columns that are
//! padding for every row are trimmed then.
//!
//! A fused-attention graph (`--attention gqa`) instead keeps its rows right-aligned in the slots
//! of one [`SlotCache`] that ONNX Runtime extends in place; joins write into free slots, and the
//! buffer is re-laid only to grow, to take more rows than it has free slots, or to compact.

use ndarray::{Array2, Axis, concatenate, s};
use tokenizers::Tokenizer;

use super::BatchPolicy;
use crate::engine::{CacheRows, DecoderSession, EngineError, KvCache, PrefillRows, SlotCache, SlotSource};
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
    state: PrefillState,
}

/// The cache of prefilled rows, in the layout of their graph.
enum PrefillState {
    /// Left-padded rows of a with-past graph, and their mask.
    LeftPadded { mask: Array2<i64>, cache: KvCache },
    /// Rows of a fused-attention graph: `keep[j]` is the prefill row of the `j`th row kept.
    Fused { cache: PrefillRows, keep: Vec<usize> },
}

/// Runs the prefill of `seqs` as one padded batch (left-padded; right-padded for a fused graph).
/// Each sequence's first token is chosen at once; `on_advance` receives it (with the row's meta)
/// and sequences that finish there are dropped. Returns the rows still generating.
pub fn prefill<T>(
    session: &mut DecoderSession,
    tokenizer: &Tokenizer,
    seqs: Vec<(Sequence, T)>,
    mut on_advance: impl FnMut(&mut T, Result<Advance, GenerateError>) -> bool,
) -> Result<Option<Prefilled<T>>, EngineError> {
    if session.fused_attention() {
        let prompts: Vec<&[u32]> = seqs.iter().map(|(s, _)| s.prompt()).collect();
        let (logits, cache) = session.prefill_rows(&prompts)?;
        let (rows, keep) = first_tokens(tokenizer, seqs, &logits, &mut on_advance);
        return Ok((!rows.is_empty()).then_some(Prefilled {
            rows,
            state: PrefillState::Fused { cache, keep },
        }));
    }
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
    let logits = logits.index_axis_move(Axis(1), 0);
    let (rows, keep) = first_tokens(tokenizer, seqs, &logits, &mut on_advance);
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
    Ok(Some(Prefilled {
        rows,
        state: PrefillState::LeftPadded { mask, cache },
    }))
}

/// Chooses each prefilled sequence's first token from its row of `logits` (`[rows, vocab]`);
/// returns the rows still generating and the prefill rows they came from.
fn first_tokens<T>(
    tokenizer: &Tokenizer,
    seqs: Vec<(Sequence, T)>,
    logits: &Array2<f32>,
    on_advance: &mut impl FnMut(&mut T, Result<Advance, GenerateError>) -> bool,
) -> (Vec<Row<T>>, Vec<usize>) {
    let mut keep = Vec::new();
    let mut rows = Vec::new();
    for (b, (mut seq, mut meta)) in seqs.into_iter().enumerate() {
        let last = logits.row(b).to_vec();
        let advance = seq.advance(tokenizer, &last);
        if let Some(token) = deliver_next(&mut meta, advance, on_advance) {
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
    (rows, keep)
}

/// Hands a row's outcome to `on_advance`; the token to feed next when the row goes on (it did
/// not finish, and its client still wants it).
pub(super) fn deliver_next<T>(
    meta: &mut T,
    advance: Result<Advance, GenerateError>,
    on_advance: &mut impl FnMut(&mut T, Result<Advance, GenerateError>) -> bool,
) -> Option<u32> {
    let next = advance.as_ref().ok().and_then(|a| a.next);
    on_advance(meta, advance).then_some(next).flatten()
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

/// The decode batch: rows (slots) sharing one KV cache. A finished row leaves its slot empty
/// instead of re-laying the cache; a joining row is written into an empty slot in place when it
/// fits, so in steady state no step copies the cache on our side. The batch is compacted (one
/// copy) only when empty slots outnumber live rows, or a newcomer does not fit.
pub struct DecodeBatch<T> {
    rows: Vec<Option<Row<T>>>,
    cache: BatchCache,
}

/// The decode batch's cache, in its graph's layout.
enum BatchCache {
    Empty,
    /// With-past graph: left-padded rows, the mask marking padding.
    LeftPadded {
        mask: Array2<i64>,
        cache: KvCache,
    },
    /// Fused-attention graph: right-aligned rows in slots.
    Slots(Box<SlotCache>),
}

impl<T> Default for DecodeBatch<T> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            cache: BatchCache::Empty,
        }
    }
}

/// The capacity a slot buffer gets when it must hold `needed` positions: a quarter more, so a
/// growing batch re-lays its buffer a logarithmic number of times; no more, as ONNX Runtime's
/// CPU attention costs grow with the buffer's length, not only the rows' (measured: a step of
/// 19 rows of 60 positions took 1.4x as long in a buffer of 240 as in one of 61).
fn slot_capacity(needed: usize) -> usize {
    (needed + needed / 4).next_multiple_of(16)
}

impl<T> DecodeBatch<T> {
    /// Number of rows decoding.
    pub fn len(&self) -> usize {
        self.rows.iter().flatten().count()
    }

    /// The rows' bookkeeping.
    pub fn metas(&self) -> impl Iterator<Item = &T> {
        self.rows.iter().flatten().map(|r| &r.meta)
    }

    fn free_slots(&self) -> Vec<usize> {
        (0..self.rows.len()).filter(|&i| self.rows[i].is_none()).collect()
    }

    fn live_slots(&self) -> Vec<usize> {
        (0..self.rows.len()).filter(|&i| self.rows[i].is_some()).collect()
    }

    /// Adds freshly prefilled rows.
    pub fn join(&mut self, session: &DecoderSession, new: Prefilled<T>) -> Result<(), EngineError> {
        let (free, live) = (self.free_slots(), self.live_slots());
        match (&mut self.cache, new.state) {
            (BatchCache::Empty, PrefillState::LeftPadded { mask, cache }) => {
                self.rows = new.rows.into_iter().map(Some).collect();
                self.cache = BatchCache::LeftPadded { mask, cache };
                Ok(())
            }
            (BatchCache::Empty, PrefillState::Fused { cache, keep }) => {
                let needed = keep.iter().map(|&r| cache.lengths()[r]).max().unwrap_or(0) + 1;
                let mut slots = SlotCache::new(session, keep.len(), slot_capacity(needed))?;
                for (slot, &r) in keep.iter().enumerate() {
                    slots.write(slot, &cache, r)?;
                }
                self.rows = new.rows.into_iter().map(Some).collect();
                self.cache = BatchCache::Slots(Box::new(slots));
                Ok(())
            }
            (
                BatchCache::LeftPadded { mask, cache },
                PrefillState::LeftPadded {
                    mask: new_mask,
                    cache: new_cache,
                },
            ) => {
                if free.len() < new.rows.len() || new_cache.len() > cache.len() {
                    return self.relayout(Some((new.rows, new_mask, new_cache)));
                }
                let pairs: Vec<(usize, usize)> = free.iter().copied().enumerate().take(new.rows.len()).collect();
                cache.write_rows(&new_cache, &pairs)?;
                let start = mask.ncols() - new_mask.ncols();
                for ((src, dst), row) in pairs.into_iter().zip(new.rows) {
                    mask.row_mut(dst).fill(0);
                    mask.slice_mut(s![dst, start..]).assign(&new_mask.row(src));
                    self.rows[dst] = Some(row);
                }
                Ok(())
            }
            (BatchCache::Slots(slots), PrefillState::Fused { cache, keep }) => {
                let longest = keep.iter().map(|&r| cache.lengths()[r]).max().unwrap_or(0);
                if free.len() >= new.rows.len() && longest < slots.capacity() {
                    for ((&slot, &r), row) in free.iter().zip(&keep).zip(new.rows) {
                        slots.write(slot, &cache, r)?;
                        self.rows[slot] = Some(row);
                    }
                    return Ok(());
                }
                let mut sources: Vec<SlotSource> = live.into_iter().map(SlotSource::Slot).collect();
                sources.extend(keep.iter().map(|&r| SlotSource::Prefill(r)));
                let needed = slots.step_width().max(longest + 1);
                **slots = slots.relayout(session, &sources, Some(&cache), slot_capacity(needed))?;
                self.rows.retain(Option::is_some);
                self.rows.extend(new.rows.into_iter().map(Some));
                Ok(())
            }
            _ => Err(EngineError::Layout(
                "prefilled rows of another cache layout than the batch's".into(),
            )),
        }
    }

    /// Rebuilds a left-padded cache with the live rows only (and `new` after them), trimming
    /// columns that are padding for every row: one copy per tensor.
    fn relayout(&mut self, new: Option<(Vec<Row<T>>, Array2<i64>, KvCache)>) -> Result<(), EngineError> {
        let BatchCache::LeftPadded { mask, cache } = std::mem::replace(&mut self.cache, BatchCache::Empty) else {
            return Ok(());
        };
        let live = self.live_slots();
        let first_used = unused_columns(&self.rows, &mask);
        let mask = mask.select(Axis(0), &live);
        let kept = mask.ncols() - first_used;
        let len = kept.max(new.as_ref().map_or(0, |n| n.2.len()));
        let mut parts = vec![CacheRows {
            cache: &cache,
            rows: &live,
            from: first_used,
        }];
        let new_rows: Vec<usize> = new.as_ref().map_or(Vec::new(), |n| (0..n.0.len()).collect());
        if let Some(n) = &new {
            parts.push(CacheRows {
                cache: &n.2,
                rows: &new_rows,
                from: 0,
            });
        }
        let gathered = KvCache::gather(&parts, len)?;
        let mut masks = vec![left_pad2(mask.slice(s![.., first_used..]).to_owned(), len)];
        self.rows.retain(Option::is_some);
        if let Some((rows, new_mask, _)) = new {
            masks.push(left_pad2(new_mask, len));
            self.rows.extend(rows.into_iter().map(Some));
        }
        let views: Vec<_> = masks.iter().map(|m| m.view()).collect();
        let mask = concatenate(Axis(0), &views).map_err(|e| EngineError::Layout(format!("joining masks: {e}")))?;
        self.cache = BatchCache::LeftPadded { mask, cache: gathered };
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
        let n = self.rows.len();
        let token = |b: usize| self.rows[b].as_ref().map_or(0, |r| i64::from(r.next_token));
        let logits = match std::mem::replace(&mut self.cache, BatchCache::Empty) {
            BatchCache::Empty => return Ok(()),
            BatchCache::LeftPadded { mask, cache } => {
                let ids = Array2::from_shape_fn((n, 1), |(b, _)| token(b));
                let positions =
                    Array2::from_shape_fn((n, 1), |(b, _)| self.rows[b].as_ref().map_or(0, |r| r.next_position));
                let mask = concatenate(Axis(1), &[mask.view(), Array2::ones((n, 1)).view()])
                    .map_err(|e| EngineError::Layout(format!("growing the mask: {e}")))?;
                let (logits, cache) = session.forward_last(&ids, &mask, &positions, cache)?;
                self.cache = BatchCache::LeftPadded { mask, cache };
                logits.index_axis_move(Axis(1), 0)
            }
            BatchCache::Slots(mut slots) => {
                if slots.step_width() > slots.capacity() {
                    let sources: Vec<SlotSource> = (0..n).map(SlotSource::Slot).collect();
                    *slots = slots.relayout(session, &sources, None, slot_capacity(slots.step_width()))?;
                }
                let tokens: Vec<i64> = (0..n).map(token).collect();
                let logits = slots.step(session, &tokens)?;
                self.cache = BatchCache::Slots(slots);
                logits
            }
        };
        for (b, slot) in self.rows.iter_mut().enumerate() {
            let Some(row) = slot else { continue };
            let last = logits.row(b).to_vec();
            let advance = row.seq.advance(tokenizer, &last);
            if let Some(token) = deliver_next(&mut row.meta, advance, &mut on_advance) {
                row.next_token = token;
                row.next_position += 1;
            } else {
                // Finished or abandoned: the slot (and the request's place) frees at once.
                *slot = None;
                if let BatchCache::Slots(slots) = &mut self.cache {
                    slots.free(b);
                }
            }
        }
        let live_slots = self.live_slots();
        let live = live_slots.len();
        if live == 0 {
            *self = Self::default();
            return Ok(());
        }
        // Amortised: a re-layout copies the cache once, and only after the batch has lost half
        // of its rows, or half of its columns (slots: of its capacity).
        match &mut self.cache {
            BatchCache::LeftPadded { mask, .. } => {
                if n - live > live || 2 * unused_columns(&self.rows, mask) > mask.ncols() {
                    self.relayout(None)?;
                }
            }
            BatchCache::Slots(slots) => {
                let width = slots.step_width();
                if n - live > live || 2 * slot_capacity(width) < slots.capacity() {
                    let sources: Vec<SlotSource> = live_slots.into_iter().map(SlotSource::Slot).collect();
                    **slots = slots.relayout(session, &sources, None, slot_capacity(width))?;
                    self.rows.retain(Option::is_some);
                }
            }
            BatchCache::Empty => {}
        }
        Ok(())
    }
}

/// Leading columns that are padding for every live row (they grow as rows are replaced).
fn unused_columns<T>(rows: &[Option<Row<T>>], mask: &Array2<i64>) -> usize {
    rows.iter()
        .enumerate()
        .filter(|(_, r)| r.is_some())
        .map(|(b, _)| mask.row(b).iter().position(|&m| m != 0).unwrap_or(mask.ncols()))
        .min()
        .unwrap_or(0)
}
