//! Drift between the prompts a refresh job trains on and the traffic the model serves: the KL
//! divergence of their token distributions (unigrams of the student's tokenizer, and prompt
//! lengths in buckets), checked before any teacher is asked. Identical distributions give 0;
//! prompts that share no token give about the log of the smoothing's inverse.

use std::collections::HashMap;

use serde::Serialize;
use tokenizers::Tokenizer;

use super::store::Prompt;

/// Pseudo-count added to every token (and length bucket) of either side, so a token one side
/// never uses costs a finite, large amount.
const SMOOTHING: f64 = 0.01;

/// Lengths in tokens fall in buckets of this width (the last bucket holds everything longer).
const LENGTH_BUCKET: usize = 8;
const LENGTH_BUCKETS: usize = 64;

/// How far the job's prompts are from the reference (served traffic).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Drift {
    /// KL(job ‖ reference) of the token unigram distributions, in nats.
    pub unigram_kl: f64,
    /// KL(job ‖ reference) of the prompt-length distributions, in nats.
    pub length_kl: f64,
    pub job_prompts: usize,
    pub reference_prompts: usize,
}

/// Token and length counts of a set of prompts.
#[derive(Debug, Default)]
struct Counts {
    tokens: HashMap<u32, f64>,
    lengths: Vec<f64>,
}

fn counts(tokenizer: &Tokenizer, prompts: &[Prompt]) -> Counts {
    let mut c = Counts {
        tokens: HashMap::new(),
        lengths: vec![0.0; LENGTH_BUCKETS],
    };
    for p in prompts {
        let text: Vec<&str> = p.messages.iter().map(|m| m.content.as_str()).collect();
        let Ok(encoding) = tokenizer.encode(text.join("\n"), false) else {
            continue;
        };
        for &id in encoding.get_ids() {
            *c.tokens.entry(id).or_default() += 1.0;
        }
        c.lengths[(encoding.len() / LENGTH_BUCKET).min(LENGTH_BUCKETS - 1)] += 1.0;
    }
    c
}

/// KL(p ‖ q) of two count tables over the union of their keys, each smoothed.
fn kl<'a>(p: impl Fn(&'a u64) -> f64, q: impl Fn(&'a u64) -> f64, keys: &'a [u64]) -> f64 {
    let n = keys.len() as f64 * SMOOTHING;
    let (p_total, q_total) = keys.iter().fold((n, n), |(a, b), k| (a + p(k), b + q(k)));
    keys.iter()
        .map(|k| {
            let pk = (p(k) + SMOOTHING) / p_total;
            let qk = (q(k) + SMOOTHING) / q_total;
            pk * (pk / qk).ln()
        })
        .sum::<f64>()
        .max(0.0)
}

/// The drift of `job` from `reference`, both tokenized with `tokenizer`.
pub fn drift(tokenizer: &Tokenizer, job: &[Prompt], reference: &[Prompt]) -> Drift {
    let (a, b) = (counts(tokenizer, job), counts(tokenizer, reference));
    let mut keys: Vec<u64> = a.tokens.keys().chain(b.tokens.keys()).map(|&k| u64::from(k)).collect();
    keys.sort_unstable();
    keys.dedup();
    let token = |c: &Counts, k: &u64| c.tokens.get(&(*k as u32)).copied().unwrap_or(0.0);
    let unigram_kl = kl(|k| token(&a, k), |k| token(&b, k), &keys);
    let buckets: Vec<u64> = (0..LENGTH_BUCKETS as u64).collect();
    let length_kl = kl(|k| a.lengths[*k as usize], |k| b.lengths[*k as usize], &buckets);
    Drift {
        unigram_kl,
        length_kl,
        job_prompts: job.len(),
        reference_prompts: reference.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::train_tokenizer;
    use crate::tokenize::ChatMessage;

    fn prompts(texts: &[String]) -> Vec<Prompt> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| Prompt {
                id: i as i64,
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: t.clone(),
                }],
                label: None,
            })
            .collect()
    }

    #[test]
    fn identical_prompts_do_not_drift_and_disjoint_ones_drift_far() {
        let tokenizer = train_tokenizer(crate::checkpoint::Family::Qwen2, 400, None)
            .unwrap()
            .tokenizer;
        let clinical: Vec<String> = (0..40)
            .map(|i| format!("A patient {i} with chest pain needs a code."))
            .collect();
        let other: Vec<String> = (0..40).map(|i| format!("{}", 1_000_000 + i * 7919)).collect();
        let same = drift(&tokenizer, &prompts(&clinical), &prompts(&clinical));
        assert!(same.unigram_kl < 1e-9 && same.length_kl < 1e-9, "{same:?}");
        // The same kind of prompt, other numbers: close.
        let similar: Vec<String> = (40..80)
            .map(|i| format!("A patient {i} with chest pain needs a code."))
            .collect();
        let near = drift(&tokenizer, &prompts(&clinical), &prompts(&similar));
        let far = drift(&tokenizer, &prompts(&clinical), &prompts(&other));
        assert!(near.unigram_kl < 0.5, "{near:?}");
        assert!(
            far.unigram_kl > 5.0 && far.unigram_kl > 20.0 * near.unigram_kl,
            "{far:?} vs {near:?}"
        );
        assert!(far.length_kl > 1.0, "{far:?}");
        assert_eq!((far.job_prompts, far.reference_prompts), (40, 40));
    }
}
