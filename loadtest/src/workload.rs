//! What the simulated clients ask: prompts whose lengths follow a lognormal mix (the shape of
//! real traffic: many short questions, a tail of long documents), or prompts read from a file.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};
use serde::Serialize;

/// Words prompts are made of; clinical, so the default students see text like their own.
pub const WORDS: &[&str] = &[
    "the",
    "patient",
    "reports",
    "chest",
    "pain",
    "with",
    "shortness",
    "of",
    "breath",
    "and",
    "a",
    "history",
    "type",
    "two",
    "diabetes",
    "mellitus",
    "without",
    "complications",
    "acute",
    "bronchitis",
    "left",
    "femur",
    "fracture",
    "initial",
    "encounter",
    "hypertension",
    "chronic",
    "kidney",
    "disease",
    "stage",
    "three",
    "fever",
    "cough",
    "for",
    "days",
    "denies",
    "nausea",
    "vomiting",
    "on",
    "metformin",
    "daily",
    "follow",
    "up",
    "visit",
];

/// One component of a lognormal mix of prompt lengths (in words).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LengthMode {
    /// Share of requests drawn from this component.
    pub weight: f64,
    /// Median length in words.
    pub median: f64,
    /// Standard deviation of the log length.
    pub sigma: f64,
}

/// Parses `weight:median:sigma,...` (e.g. `0.7:12:0.5,0.3:100:0.4`).
pub fn parse_mix(spec: &str) -> Result<Vec<LengthMode>> {
    let modes = spec
        .split(',')
        .map(|part| {
            let fields: Vec<f64> = part
                .split(':')
                .map(|f| f.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("length mix component `{part}`: expected weight:median:sigma"))?;
            let [weight, median, sigma] = fields[..] else {
                bail!("length mix component `{part}`: expected weight:median:sigma");
            };
            if !(weight > 0.0 && median >= 1.0 && sigma >= 0.0) {
                bail!("length mix component `{part}`: need weight > 0, median >= 1, sigma >= 0");
            }
            Ok(LengthMode { weight, median, sigma })
        })
        .collect::<Result<Vec<_>>>()?;
    if modes.is_empty() {
        bail!("empty length mix");
    }
    Ok(modes)
}

/// Where prompts come from.
#[derive(Debug, Clone)]
pub enum Workload {
    /// Generated prompts with lengths drawn from a lognormal mix, capped at `max_words`.
    Lognormal { modes: Vec<LengthMode>, max_words: usize },
    /// Prompts from a file, used in turn.
    File(Vec<String>),
}

impl Workload {
    /// Reads prompts from `path`: JSON lines with a `prompt` field, or one prompt per line.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut prompts = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            if line.trim_start().starts_with('{') {
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
                let prompt = v["prompt"]
                    .as_str()
                    .with_context(|| format!("{}:{}: no string field `prompt`", path.display(), i + 1))?;
                prompts.push(prompt.to_string());
            } else {
                prompts.push(line.to_string());
            }
        }
        if prompts.is_empty() {
            bail!("{}: no prompts", path.display());
        }
        Ok(Self::File(prompts))
    }

    /// The prompt of request number `index` of a run seeded with `seed` (the same every run).
    pub fn prompt(&self, seed: u64, index: u64) -> String {
        match self {
            Self::File(prompts) => prompts[(index % prompts.len() as u64) as usize].clone(),
            Self::Lognormal { modes, max_words } => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let words = sample_length(modes, &mut rng).min(*max_words).max(1);
                (0..words)
                    .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        }
    }

    /// A one-line description for the report.
    pub fn describe(&self) -> String {
        match self {
            Self::File(prompts) => format!("{} prompts from a file", prompts.len()),
            Self::Lognormal { modes, max_words } => {
                let parts: Vec<String> = modes
                    .iter()
                    .map(|m| format!("{:.0}% median {} words (sigma {})", m.weight * 100.0, m.median, m.sigma))
                    .collect();
                format!("lognormal mix: {}; at most {max_words} words", parts.join(", "))
            }
        }
    }
}

fn sample_length(modes: &[LengthMode], rng: &mut ChaCha8Rng) -> usize {
    let total: f64 = modes.iter().map(|m| m.weight).sum();
    let mut pick = rng.random::<f64>() * total;
    let mode = modes
        .iter()
        .find(|m| {
            pick -= m.weight;
            pick <= 0.0
        })
        .unwrap_or(&modes[modes.len() - 1]);
    match LogNormal::new(mode.median.ln(), mode.sigma) {
        Ok(d) => d.sample(rng).round() as usize,
        Err(_) => mode.median.round() as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_parses_and_rejects_nonsense() {
        let modes = parse_mix("0.7:12:0.5, 0.3:100:0.4").unwrap();
        assert_eq!(modes.len(), 2);
        assert_eq!(modes[1].median, 100.0);
        for bad in ["", "1:2", "a:b:c", "0:10:0.5", "1:0.5:0.1"] {
            assert!(parse_mix(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn generated_lengths_follow_the_mix_and_are_reproducible() {
        let w = Workload::Lognormal {
            modes: parse_mix("0.5:10:0.2,0.5:100:0.2").unwrap(),
            max_words: 1000,
        };
        let lengths: Vec<usize> = (0..400).map(|i| w.prompt(7, i).split(' ').count()).collect();
        let short = lengths.iter().filter(|&&n| n < 30).count();
        assert!((150..250).contains(&short), "{short} of 400 short");
        assert!(lengths.iter().all(|&n| n < 300));
        assert_eq!(w.prompt(7, 3), w.prompt(7, 3));
        assert_ne!(w.prompt(7, 3), w.prompt(8, 3));
    }

    #[test]
    fn prompts_files_take_jsonl_or_plain_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, "{\"prompt\": \"first\"}\n\nsecond line\n").unwrap();
        let w = Workload::from_file(&path).unwrap();
        assert_eq!(
            [w.prompt(0, 0), w.prompt(0, 1), w.prompt(0, 2)],
            ["first", "second line", "first"]
        );
        std::fs::write(&path, "{\"text\": 1}\n").unwrap();
        let e = Workload::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("p.jsonl:1"), "{e}");
    }
}
