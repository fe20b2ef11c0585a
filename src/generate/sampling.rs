//! Choosing the next token from logits: greedy, or temperature with top-k / top-p, seeded; and
//! the log-probabilities clients ask for with `logprobs` / `top_logprobs`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to pick tokens. Temperature 0 (or below a tiny epsilon) means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Seed of the sampler; the same seed and prompt give the same text.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Whether this picks the arg-max.
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }
}

/// One chosen token with its log-probability and, when asked, the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub token: u32,
    /// Natural-log probability of `token` under the model's distribution (before temperature,
    /// top-k and top-p, as OpenAI reports it).
    pub logprob: f32,
    /// The `n` most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// A sampler with its own random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler for `params`; unseeded samplers draw their seed from the OS.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// Picks the next token from `logits`, reporting `top_n` alternatives.
    pub fn choose(&mut self, logits: &[f32], top_n: usize) -> Choice {
        let logprobs = log_softmax(logits);
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.sample(logits)
        };
        let top = if top_n == 0 {
            Vec::new()
        } else {
            top_n_of(&logprobs, top_n)
        };
        Choice {
            token,
            logprob: logprobs[token as usize],
            top,
        }
    }

    fn sample(&mut self, logits: &[f32]) -> u32 {
        let t = self.params.temperature;
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / t)).collect();
        // Sorting a 150k-token vocabulary for every token of every row costs milliseconds: select
        // the top k in linear time, and sort only what the nucleus (top_p) needs in order.
        let k = self.params.top_k;
        if k > 0 && k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            candidates.truncate(k);
        }
        if self.params.top_p < 1.0 {
            candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        }
        let max = candidates.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f32> = candidates.iter().map(|&(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    mass += p;
                    mass >= self.params.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            candidates.truncate(keep);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut draw = self.rng.random::<f32>() * total;
        for (&(token, _), &p) in candidates.iter().zip(&probs) {
            draw -= p;
            if draw <= 0.0 {
                return token;
            }
        }
        candidates[candidates.len() - 1].0
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    values
        .iter()
        .enumerate()
        .fold(
            (0u32, f32::NEG_INFINITY),
            |best, (i, &v)| if v > best.1 { (i as u32, v) } else { best },
        )
        .0
}

/// Natural-log softmax.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln() + max;
    logits.iter().map(|&l| l - log_sum).collect()
}

fn top_n_of(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut indexed: Vec<(u32, f32)> = logprobs.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let n = n.min(indexed.len());
    indexed.select_nth_unstable_by(n.saturating_sub(1), |a, b| b.1.total_cmp(&a.1));
    indexed.truncate(n);
    indexed.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    indexed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax_and_reports_top() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        let c = s.choose(&[0.1, 3.0, 2.0, -1.0], 2);
        assert_eq!(c.token, 1);
        assert_eq!(c.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        let total: f32 = log_softmax(&[0.1, 3.0, 2.0, -1.0]).iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
            seed: Some(7),
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..40).map(|_| s.choose(&logits, 0).token).collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        let mut allowed: Vec<u32> = (0..50).collect();
        allowed.sort_by(|&x, &y| logits[y as usize].total_cmp(&logits[x as usize]));
        assert!(a.iter().all(|t| allowed[..3].contains(t)), "{a:?}");
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: Some(3),
        });
        let logits = [0.2f32.ln(), 0.7f32.ln(), 0.1f32.ln()];
        let mut counts = [0usize; 3];
        for _ in 0..4000 {
            counts[s.choose(&logits, 0).token as usize] += 1;
        }
        for (count, p) in counts.iter().zip([0.2, 0.7, 0.1]) {
            let share = *count as f64 / 4000.0;
            assert!((share - p).abs() < 0.03, "{counts:?}");
        }
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.01,
            seed: Some(1),
        });
        for _ in 0..20 {
            assert_eq!(s.choose(&[1.0, 5.0, 2.0], 0).token, 1);
        }
    }
}
