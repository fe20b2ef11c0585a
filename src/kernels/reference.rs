//! The CPU reference of the sampling kernel: the same algorithm in the same order of
//! floating-point operations (the vocabulary cut into [`THREADS`] contiguous chunks, summed chunk
//! by chunk), so that the device must pick the same tokens. The native engine's CPU backend
//! (`native-cpu`) samples with it; it is slower than `generate::sampling`, which the ONNX Runtime
//! path uses.

use super::philox;
use super::sampling::{RowSampling, Sampled, TOP_N_MAX};

/// Threads of a sampling block: each owns one contiguous chunk of the vocabulary.
pub const THREADS: usize = 256;

/// Order-preserving key of a float (larger float, larger key), as `float_key` in the kernel.
pub fn float_key(x: f32) -> u32 {
    let bits = x.to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// Whether token `i` may be chosen: its bit is set in `mask` (when there is one) and its logit
/// is finite.
pub fn is_allowed(mask: Option<&[u32]>, i: usize, logit: f32) -> bool {
    logit.is_finite() && mask.is_none_or(|m| (m[i >> 5] >> (i & 31)) & 1 == 1)
}

fn fixed_mass(x: f32, max_x: f32) -> u64 {
    ((x - max_x).exp() * 4_294_967_296.0f32).round_ties_even() as u64
}

/// One row as the kernel sees it.
struct Row<'a> {
    logits: &'a [f32],
    mask: Option<&'a [u32]>,
    chunk: usize,
    inv_temperature: f32,
}

impl Row<'_> {
    /// The chunks in thread order, each its token ids in order.
    fn chunks(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let vocab = self.logits.len();
        (0..THREADS).map(move |t| {
            let begin = (t * self.chunk).min(vocab);
            begin..(begin + self.chunk).min(vocab)
        })
    }

    fn allowed(&self, i: usize) -> bool {
        is_allowed(self.mask, i, self.logits[i])
    }

    fn key(&self, i: usize) -> u32 {
        float_key(self.logits[i] * self.inv_temperature)
    }

    /// Allowed ids whose key is at least `floor`, in id order.
    fn at_least(&self, floor: u32) -> impl Iterator<Item = usize> + '_ {
        (0..self.logits.len()).filter(move |&i| self.allowed(i) && self.key(i) >= floor)
    }

    /// The `rank`-th largest allowed key (1-based) and how many allowed keys exceed it.
    fn select_by_count(&self, rank: usize) -> (u32, usize) {
        let mut keys: Vec<u32> = self.at_least(0).map(|i| self.key(i)).collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        let cut = keys[rank - 1];
        (cut, keys.iter().take_while(|&&k| k > cut).count())
    }

    /// The largest key v >= `floor` whose tokens with key >= v carry at least `target` mass.
    fn select_by_mass(&self, floor: u32, max_x: f32, target: u64) -> u32 {
        let mut by_key: Vec<(u32, u64)> = self
            .at_least(floor)
            .map(|i| (self.key(i), fixed_mass(self.logits[i] * self.inv_temperature, max_x)))
            .collect();
        by_key.sort_unstable_by_key(|&(key, _)| std::cmp::Reverse(key));
        let mut mass = 0u64;
        let mut at = 0;
        while at < by_key.len() {
            let key = by_key[at].0;
            while at < by_key.len() && by_key[at].0 == key {
                mass += by_key[at].1;
                at += 1;
            }
            if mass >= target {
                return key;
            }
        }
        by_key.last().map_or(floor, |&(key, _)| key)
    }
}

/// Samples each row of `logits` (`rows x vocab`, row-major) as the `sample_rows` kernel does.
pub fn sample_rows(
    logits: &[f32],
    vocab: usize,
    masks: &[Option<&[u32]>],
    params: &[RowSampling],
    top_n: usize,
) -> Vec<Sampled> {
    params
        .iter()
        .enumerate()
        .map(|(r, p)| {
            let row = Row {
                logits: &logits[r * vocab..(r + 1) * vocab],
                mask: masks[r],
                chunk: vocab.div_ceil(THREADS),
                inv_temperature: 1.0,
            };
            sample_row(row, p, top_n.min(TOP_N_MAX))
        })
        .collect()
}

fn sample_row(mut row: Row<'_>, params: &RowSampling, top_n: usize) -> Sampled {
    // 1. First largest allowed logit, chunk by chunk.
    let mut best: Option<(usize, f32)> = None;
    let mut allowed = 0;
    for chunk in row.chunks() {
        let mut chunk_best: Option<(usize, f32)> = None;
        for i in chunk {
            if !row.allowed(i) {
                continue;
            }
            allowed += 1;
            if chunk_best.is_none_or(|(_, v)| row.logits[i] > v) {
                chunk_best = Some((i, row.logits[i]));
            }
        }
        if let Some((i, v)) = chunk_best
            && best.is_none_or(|(_, b)| v > b)
        {
            best = Some((i, v));
        }
    }
    let Some((argmax, max_logit)) = best else {
        return Sampled {
            token: None,
            logprob: f32::NEG_INFINITY,
            top: Vec::new(),
        };
    };
    // 2. log-sum-exp: chunk sums, then their sum in chunk order.
    let total: f32 = row
        .chunks()
        .map(|chunk| {
            chunk
                .filter(|&i| row.allowed(i))
                .fold(0.0f32, |sum, i| sum + (row.logits[i] - max_logit).exp())
        })
        .fold(0.0f32, |sum, part| sum + part);
    let log_total = max_logit + total.ln();

    // 3. The token.
    let mut token = argmax;
    if params.temperature >= 1e-5 {
        row.inv_temperature = 1.0 / params.temperature;
        let max_x = max_logit * row.inv_temperature;
        let mut floor = 0u32;
        let k = params.top_k as usize;
        if k > 0 && k < allowed {
            floor = row.select_by_count(k).0;
        }
        if params.top_p < 1.0 {
            let mass: u64 = row
                .at_least(floor)
                .map(|i| fixed_mass(row.logits[i] * row.inv_temperature, max_x))
                .sum();
            let target = ((f64::from(params.top_p) * mass as f64) as u64).max(1);
            floor = row.select_by_mass(floor, max_x, target);
        }
        let p = |i: usize| (row.logits[i] * row.inv_temperature - max_x).exp();
        let sums: Vec<f32> = row
            .chunks()
            .map(|chunk| {
                chunk
                    .filter(|&i| row.allowed(i) && row.key(i) >= floor)
                    .fold(0.0f32, |s, i| s + p(i))
            })
            .collect();
        let total = sums.iter().fold(0.0f32, |s, &x| s + x);
        let mut draw = philox::uniform(params.seed, params.step) * total;
        let mut owner = None;
        let mut last = 0;
        for (c, &sum) in sums.iter().enumerate() {
            if sum <= 0.0 {
                continue;
            }
            last = c;
            if draw <= sum {
                owner = Some(c);
                break;
            }
            draw -= sum;
        }
        let owner = owner.unwrap_or_else(|| {
            draw = sums[last];
            last
        });
        let chunk = row.chunks().nth(owner).unwrap_or(0..0);
        for i in chunk {
            if !row.allowed(i) || row.key(i) < floor {
                continue;
            }
            token = i;
            draw -= p(i);
            if draw <= 0.0 {
                break;
            }
        }
        row.inv_temperature = 1.0;
    }

    // 4. The top_n: by logit, ties in id order.
    let n = top_n.min(allowed);
    let mut top = Vec::new();
    if n > 0 {
        let (cut, above) = row.select_by_count(n);
        let mut ids: Vec<usize> = row.at_least(0).filter(|&i| row.key(i) > cut).collect();
        ids.extend(row.at_least(cut).filter(|&i| row.key(i) == cut).take(n - above));
        // The kernel's stable insertion sort compares with `<`: ties keep id order.
        ids.sort_by(|&a, &b| {
            let (x, y) = (row.logits[a], row.logits[b]);
            y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b))
        });
        top = ids.into_iter().map(|i| (i as u32, row.logits[i] - log_total)).collect();
    }
    Sampled {
        token: Some(token as u32),
        logprob: row.logits[token] - log_total,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::sampling::bitset;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn params(temperature: f32, top_k: u32, top_p: f32, seed: u64, step: u64) -> RowSampling {
        RowSampling {
            temperature,
            top_k,
            top_p,
            seed,
            step,
        }
    }

    fn one(logits: &[f32], mask: Option<&[u32]>, p: RowSampling, top_n: usize) -> Sampled {
        sample_rows(logits, logits.len(), &[mask], &[p], top_n).remove(0)
    }

    fn random_logits(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-4.0f32..4.0)).collect()
    }

    /// Natural-log softmax over the allowed tokens, in f64.
    fn masked_logprobs(logits: &[f32], allowed: &dyn Fn(usize) -> bool) -> Vec<f64> {
        let max = (0..logits.len())
            .filter(|&i| allowed(i))
            .map(|i| logits[i] as f64)
            .fold(f64::MIN, f64::max);
        let sum: f64 = (0..logits.len())
            .filter(|&i| allowed(i))
            .map(|i| (logits[i] as f64 - max).exp())
            .sum();
        logits.iter().map(|&l| l as f64 - max - sum.ln()).collect()
    }

    #[test]
    fn keys_order_like_floats() {
        let values = [f32::NEG_INFINITY, -3.5, -0.0, 0.0, 1e-30, 2.0, f32::INFINITY];
        for pair in values.windows(2) {
            assert!(float_key(pair[0]) < float_key(pair[1]), "{pair:?}");
        }
    }

    #[test]
    fn greedy_takes_the_first_largest_allowed_with_masked_logprobs_and_top_n() {
        let logits = [1.0, 5.0, 3.0, 5.0, 4.0, -1.0, 2.0];
        let s = one(&logits, None, params(0.0, 0, 1.0, 0, 0), 3);
        assert_eq!(s.token, Some(1));
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 4]);
        let mask = bitset(7, [0, 2, 4, 6]);
        let s = one(&logits, Some(&mask), params(0.0, 0, 1.0, 0, 0), 10);
        assert_eq!(s.token, Some(4));
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), [4, 2, 6, 0]);
        let exact = masked_logprobs(&logits, &|i| i % 2 == 0);
        assert!((s.logprob as f64 - exact[4]).abs() < 1e-5);
        for &(id, lp) in &s.top {
            assert!((lp as f64 - exact[id as usize]).abs() < 1e-5);
        }
    }

    #[test]
    fn nothing_allowed_gives_no_token() {
        let s = one(&[1.0, 2.0], Some(&bitset(2, [])), params(1.0, 0, 1.0, 1, 0), 2);
        assert_eq!((s.token, s.top.len()), (None, 0));
        let s = one(&[f32::NAN, f32::NEG_INFINITY], None, params(0.0, 0, 1.0, 1, 0), 2);
        assert_eq!(s.token, None);
    }

    #[test]
    fn masked_tokens_are_never_drawn_and_non_finite_logits_never_chosen() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for vocab in [37, 300, 1000] {
            let mut logits = random_logits(&mut rng, vocab);
            logits[3] = f32::NAN;
            logits[4] = f32::INFINITY;
            let allowed: Vec<u32> = (0..vocab as u32)
                .filter(|_| rng.random_bool(0.2))
                .chain([3, 4])
                .collect();
            let mask = bitset(vocab, allowed.iter().copied());
            for step in 0..200 {
                let p = params(1.5, 0, 1.0, 9, step);
                let token = one(&logits, Some(&mask), p, 0).token.unwrap();
                assert!(allowed.contains(&token) && token != 3 && token != 4, "{vocab}: {token}");
            }
        }
    }

    #[test]
    fn a_seed_and_step_fix_the_draw() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let logits = random_logits(&mut rng, 500);
        let run = |seed| {
            (0..50)
                .map(|step| one(&logits, None, params(1.0, 0, 1.0, seed, step), 0).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }

    #[test]
    fn sampling_follows_the_tempered_distribution() {
        let logits = [0.2f32.ln(), 0.5f32.ln(), 0.3f32.ln()];
        let temperature = 0.7f32;
        let weights: Vec<f64> = logits.iter().map(|&l| (l as f64 / temperature as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut counts = [0usize; 3];
        for step in 0..6000 {
            counts[one(&logits, None, params(temperature, 0, 1.0, 3, step), 0)
                .token
                .unwrap() as usize] += 1;
        }
        for (count, w) in counts.iter().zip(&weights) {
            assert!((*count as f64 / 6000.0 - w / total).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_every_tie_at_the_kth() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let logits = random_logits(&mut rng, 400);
        let mut order: Vec<usize> = (0..400).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let mut seen = std::collections::HashSet::new();
        for step in 0..400 {
            seen.insert(one(&logits, None, params(3.0, 5, 1.0, 4, step), 0).token.unwrap() as usize);
        }
        let top5: std::collections::HashSet<usize> = order[..5].iter().copied().collect();
        assert_eq!(seen, top5);
        let tied = [1.0, 3.0, 2.0, 2.0, 2.0, 0.5];
        let mut seen = std::collections::HashSet::new();
        for step in 0..300 {
            seen.insert(one(&tied, None, params(5.0, 2, 1.0, 4, step), 0).token.unwrap());
        }
        assert_eq!(seen, [1, 2, 3, 4].into_iter().collect());
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus_as_a_sort_finds_it() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (vocab, temperature, top_p, top_k) in [
            (50, 1.0, 0.5, 0),
            (2000, 0.5, 0.8, 0),
            (300, 1.3, 0.3, 20),
            (64, 1.0, 0.95, 10),
        ] {
            let logits: Vec<f32> = (0..vocab).map(|_| rng.random_range(-3.0f32..3.0) * 2.0).collect();
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            if top_k > 0 {
                order.truncate(top_k as usize);
            }
            let weights: Vec<f64> = order
                .iter()
                .map(|&i| ((logits[i] - logits[order[0]]) as f64 / temperature as f64).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            let mut mass = 0.0;
            let size = weights.iter().position(|w| {
                mass += w / total;
                mass >= top_p as f64
            });
            let nucleus: std::collections::HashSet<usize> = order[..=size.unwrap()].iter().copied().collect();
            let mut seen = std::collections::HashSet::new();
            for step in 0..3000 {
                let p = params(temperature, top_k, top_p, 8, step);
                seen.insert(one(&logits, None, p, 0).token.unwrap() as usize);
            }
            assert!(
                seen.is_subset(&nucleus),
                "{vocab}: drew outside the nucleus of {}",
                nucleus.len()
            );
            if nucleus.len() <= 30 {
                assert_eq!(seen, nucleus, "{vocab}");
            }
        }
    }

    #[test]
    fn rows_are_independent_and_small_vocabularies_work() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for vocab in [1, 31, 33, 255, 257, 1500] {
            let rows: Vec<Vec<f32>> = (0..3).map(|_| random_logits(&mut rng, vocab)).collect();
            let flat: Vec<f32> = rows.concat();
            let ps = [
                params(0.0, 0, 1.0, 1, 0),
                params(0.8, 7, 0.9, 2, 5),
                params(1.0, 0, 1.0, 3, 9),
            ];
            let together = sample_rows(&flat, vocab, &[None, None, None], &ps, 4);
            for (r, row) in rows.iter().enumerate() {
                assert_eq!(together[r], one(row, None, ps[r], 4), "vocab {vocab} row {r}");
            }
            assert_eq!(together[0].token, Some(crate::generate::argmax(&rows[0])));
        }
    }
}
