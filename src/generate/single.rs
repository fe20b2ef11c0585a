//! One sequence on a bare [`DecoderSession`], without the scheduler: the loop evaluation, tests
//! and benches use to decode a single prompt.

use ndarray::Array2;

use super::argmax;
use crate::engine::{DecoderSession, EngineError};

/// Prefills `prompt`, then feeds back each token `next` picks from the last position's logits
/// until it picks none; returns the tokens fed back.
pub fn decode_single(
    session: &mut DecoderSession,
    prompt: &[u32],
    mut next: impl FnMut(&[f32]) -> Option<u32>,
) -> Result<Vec<u32>, EngineError> {
    let n = prompt.len();
    let ids = Array2::from_shape_fn((1, n), |(_, i)| i64::from(prompt[i]));
    let positions = Array2::from_shape_fn((1, n), |(_, i)| i as i64);
    let cache = session.empty_cache(1)?;
    let (mut logits, mut cache) = session.forward_last(&ids, &Array2::ones((1, n)), &positions, cache)?;
    let mut out = Vec::new();
    loop {
        let last = logits.slice(ndarray::s![0, -1, ..]).to_vec();
        let Some(token) = next(&last) else {
            return Ok(out);
        };
        out.push(token);
        let total = cache.len() + 1;
        (logits, cache) = session.forward_last(
            &Array2::from_elem((1, 1), i64::from(token)),
            &Array2::ones((1, total)),
            &Array2::from_elem((1, 1), (total - 1) as i64),
            cache,
        )?;
    }
}

/// The greedy continuation of `prompt`: up to `max_new` tokens, ending before any of `stops`.
pub fn greedy(
    session: &mut DecoderSession,
    prompt: &[u32],
    max_new: usize,
    stops: &[u32],
) -> Result<Vec<u32>, EngineError> {
    let mut left = max_new;
    decode_single(session, prompt, |logits| {
        let token = argmax(logits);
        (left > 0 && !stops.contains(&token)).then(|| {
            left -= 1;
            token
        })
    })
}
