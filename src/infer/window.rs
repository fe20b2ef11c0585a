//! Token classification of inputs longer than the model takes: the input's tokens are split
//! into overlapping windows (each with the input's leading and trailing special tokens), every
//! window runs as its own input, and each token keeps the output of the window in which it
//! sits farthest from an edge (where it saw the most context on both sides).

use crate::scheduler::EncoderOutput;

/// An input's windows: their token ids, and where each starts among the input's tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Windows {
    /// Each window's ids: leading specials, a run of the input's content tokens, trailing
    /// specials.
    pub pieces: Vec<Vec<i64>>,
    /// Content tokens each window starts at.
    starts: Vec<usize>,
    /// Content tokens per window.
    width: usize,
    lead: usize,
    trail: usize,
}

/// Splits `ids` (special tokens flagged in `special`, at the ends) into windows of at most
/// `max_length` tokens that overlap by a quarter.
pub fn split(ids: &[i64], special: &[bool], max_length: usize) -> Windows {
    let lead = special.iter().take_while(|&&s| s).count();
    let trail = special[lead..].iter().rev().take_while(|&&s| s).count();
    let content = &ids[lead..ids.len() - trail];
    let width = max_length.saturating_sub(lead + trail).max(1);
    let step = (width - width / 4).max(1);
    let mut starts = vec![0];
    while starts.last().is_some_and(|&s| s + width < content.len()) {
        let next = (starts[starts.len() - 1] + step).min(content.len().saturating_sub(width));
        starts.push(next);
    }
    let pieces = starts
        .iter()
        .map(|&s| {
            let end = (s + width).min(content.len());
            [&ids[..lead], &content[s..end], &ids[ids.len() - trail..]].concat()
        })
        .collect();
    Windows {
        pieces,
        starts,
        width,
        lead,
        trail,
    }
}

impl Windows {
    /// The output of the whole input (`[tokens, labels]`) from each window's output.
    pub fn merge(&self, outputs: &[EncoderOutput], total: usize) -> EncoderOutput {
        let labels = outputs.first().and_then(|o| o.shape.last().copied()).unwrap_or(0);
        let row = |w: usize, at: usize| &outputs[w].values[at * labels..(at + 1) * labels];
        let mut values = Vec::with_capacity(total * labels);
        for at in 0..self.lead {
            values.extend_from_slice(row(0, at));
        }
        let content = total - self.lead - self.trail;
        for c in 0..content {
            let best = self
                .starts
                .iter()
                .enumerate()
                .filter(|&(_, &s)| c >= s && c < s + self.width)
                .max_by_key(|&(_, &s)| (c - s).min(s + self.width - 1 - c))
                .map_or(0, |(w, _)| w);
            values.extend_from_slice(row(best, self.lead + c - self.starts[best]));
        }
        let last = outputs.len() - 1;
        let last_len = outputs[last].values.len() / labels.max(1);
        for at in last_len - self.trail..last_len {
            values.extend_from_slice(row(last, at));
        }
        EncoderOutput {
            values,
            shape: vec![total, labels],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_overlap_cover_everything_and_merge_from_the_centre() {
        // [CLS] 1..=20 [SEP], at most 10 tokens a window: 8 content tokens, step 6.
        let ids: Vec<i64> = std::iter::once(100).chain(1..=20).chain(std::iter::once(101)).collect();
        let special: Vec<bool> = ids.iter().map(|&i| i >= 100).collect();
        let w = split(&ids, &special, 10);
        assert_eq!(w.starts, vec![0, 6, 12]);
        assert_eq!(w.pieces[0], vec![100, 1, 2, 3, 4, 5, 6, 7, 8, 101]);
        assert_eq!(w.pieces[2], vec![100, 13, 14, 15, 16, 17, 18, 19, 20, 101]);
        assert!(w.pieces.iter().all(|p| p.len() <= 10));
        // Each window's output row names the window and the token: 10 * window + id.
        let outputs: Vec<EncoderOutput> = w
            .pieces
            .iter()
            .enumerate()
            .map(|(k, p)| EncoderOutput {
                values: p.iter().map(|&id| (1000 * k as i64 + id) as f32).collect(),
                shape: vec![p.len(), 1],
            })
            .collect();
        let merged = w.merge(&outputs, ids.len());
        assert_eq!(merged.shape, vec![22, 1]);
        let window_of = |v: f32| (v as i64) / 1000;
        let token_of = |v: f32| (v as i64) % 1000;
        assert_eq!(merged.values.iter().map(|&v| token_of(v)).collect::<Vec<_>>(), ids);
        // Token 7 (content 6) sits at the edge of window 0 and at the start of window 1; token
        // 9 is 3 from both of window 1's edges... each token comes from its most central window.
        assert_eq!(window_of(merged.values[1]), 0);
        assert_eq!(window_of(merged.values[10]), 1);
        assert_eq!(window_of(merged.values[20]), 2);
        assert_eq!(
            window_of(merged.values[21]),
            2,
            "the trailing [SEP] from the last window"
        );
    }

    #[test]
    fn a_short_input_is_one_window() {
        let ids = vec![100, 1, 2, 101];
        let special = vec![true, false, false, true];
        let w = split(&ids, &special, 10);
        assert_eq!(w.pieces, vec![ids]);
    }
}
