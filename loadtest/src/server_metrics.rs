//! What the server itself says about a level: counters scraped from its Prometheus endpoint
//! before and after, so batch sizes and padding are those of exactly this level's traffic.

use serde::Serialize;

/// The counters read from one scrape, for one model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    decode_steps: f64,
    decode_rows: f64,
    prefill_batches: f64,
    prefill_positions: f64,
    padding_tokens: f64,
    prompt_tokens: f64,
}

/// Server-side figures of one level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ServerStats {
    /// Mean sequences per decode step.
    pub mean_decode_batch: f64,
    /// Prefill batches run.
    pub prefill_batches: u64,
    /// Mean positions computed per prefill batch (sequences times the longest prompt).
    pub mean_prefill_tokens: f64,
    /// Padded positions over computed positions, over all prefill batches.
    pub padding_ratio: f64,
}

/// Reads `model`'s counters from Prometheus text.
pub fn parse(text: &str, model: &str) -> Counters {
    let label = format!("model=\"{model}\"");
    let mut c = Counters::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        if !labels.contains(&label) {
            continue;
        }
        let slot = match name {
            "distill_serve_batch_size_count" => &mut c.decode_steps,
            "distill_serve_batch_size_sum" => &mut c.decode_rows,
            "distill_serve_batch_tokens_count" => &mut c.prefill_batches,
            "distill_serve_batch_tokens_sum" => &mut c.prefill_positions,
            "distill_serve_padding_tokens_total" => &mut c.padding_tokens,
            "distill_serve_prompt_tokens_total" => &mut c.prompt_tokens,
            _ => continue,
        };
        *slot += value;
    }
    c
}

/// Scrapes `url`; `None` when the server has no such endpoint (any OpenAI server may be the
/// target).
pub async fn scrape(http: &reqwest::Client, url: &str, model: &str) -> Option<Counters> {
    let response = http.get(url).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    Some(parse(&response.text().await.ok()?, model))
}

impl Counters {
    /// The figures of the traffic between `before` and `self`; `None` if nothing ran.
    pub fn since(&self, before: &Counters) -> Option<ServerStats> {
        let steps = self.decode_steps - before.decode_steps;
        let batches = self.prefill_batches - before.prefill_batches;
        if steps <= 0.0 && batches <= 0.0 {
            return None;
        }
        let padding = self.padding_tokens - before.padding_tokens;
        let computed = padding + self.prompt_tokens - before.prompt_tokens;
        Some(ServerStats {
            mean_decode_batch: (self.decode_rows - before.decode_rows) / steps.max(1.0),
            prefill_batches: batches as u64,
            mean_prefill_tokens: (self.prefill_positions - before.prefill_positions) / batches.max(1.0),
            padding_ratio: padding / computed.max(1.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_of_one_model_and_their_difference() {
        let before = "# HELP x\n\
            distill_serve_batch_size_sum{model=\"a\"} 10\n\
            distill_serve_batch_size_count{model=\"a\"} 5\n\
            distill_serve_batch_size_count{model=\"b\"} 99\n\
            distill_serve_padding_tokens_total{model=\"a\"} 0\n\
            distill_serve_prompt_tokens_total{model=\"a\"} 100\n";
        let after = "distill_serve_batch_size_sum{model=\"a\"} 50\n\
            distill_serve_batch_size_count{model=\"a\"} 10\n\
            distill_serve_batch_tokens_count{model=\"a\"} 4\n\
            distill_serve_batch_tokens_sum{model=\"a\"} 400\n\
            distill_serve_padding_tokens_total{model=\"a\"} 30\n\
            distill_serve_prompt_tokens_total{model=\"a\"} 470\n";
        let stats = parse(after, "a").since(&parse(before, "a")).unwrap();
        assert_eq!(stats.mean_decode_batch, 8.0);
        assert_eq!(stats.prefill_batches, 4);
        assert_eq!(stats.mean_prefill_tokens, 100.0);
        assert!((stats.padding_ratio - 30.0 / 400.0).abs() < 1e-12);
        assert!(parse(before, "a").since(&parse(before, "a")).is_none());
    }
}
