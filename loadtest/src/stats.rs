//! Latency histograms (HDR, microsecond resolution, 3 significant digits) and their summary.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Longest latency a histogram holds (longer ones are clamped to it).
const MAX_MICROS: u64 = 3_600_000_000;

/// A latency histogram.
#[derive(Clone)]
pub struct Latencies(Histogram<u64>);

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Default for Latencies {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant histogram bounds are valid"))
    }
}

impl Latencies {
    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
        self.0.saturating_record(micros);
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        // Both share the same bounds, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// Number of values recorded.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The summary, or `None` when empty.
    pub fn percentiles(&self) -> Option<Percentiles> {
        if self.0.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Percentiles {
            count: self.0.len(),
            mean: self.0.mean() / 1000.0,
            p50: ms(self.0.value_at_quantile(0.50)),
            p90: ms(self.0.value_at_quantile(0.90)),
            p95: ms(self.0.value_at_quantile(0.95)),
            p99: ms(self.0.value_at_quantile(0.99)),
            max: ms(self.0.max()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_values() {
        let mut h = Latencies::default();
        assert!(h.percentiles().is_none());
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let p = h.percentiles().unwrap();
        assert_eq!(p.count, 100);
        assert!((p.p50 - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p99 - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max - 100.0).abs() < 0.1, "{p:?}");
        let mut other = Latencies::default();
        other.record(Duration::from_secs(2));
        h.merge(&other);
        assert_eq!(h.len(), 101);
        assert!((h.percentiles().unwrap().max - 2000.0).abs() < 2.0);
    }
}
