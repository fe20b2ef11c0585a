//! The run's report: JSON for machines, a Markdown table for people, and the comparison of the
//! `10x` scenario.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::client::Protocol;
use crate::runner::{LevelResult, Load};
use crate::server_metrics::ServerStats;
use crate::stats::Percentiles;

/// One load level.
#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    pub load: Load,
    /// Requests sent; always `ok` plus the sum of `errors`.
    pub sent: u64,
    pub ok: u64,
    /// Failed requests by kind (`http_429`, `timeout`, ...).
    pub errors: BTreeMap<String, u64>,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Generated tokens per second.
    pub tokens_per_s: f64,
    /// Latency of successful requests (open loop: from the moment each was due).
    pub latency_ms: Option<Percentiles>,
    /// Open loop: latency from the actual send, without the coordinated-omission correction.
    pub service_ms: Option<Percentiles>,
    /// Streamed requests: time to the first piece of text.
    pub first_token_ms: Option<Percentiles>,
    /// What the server's metrics say about this level, when it exposes them.
    pub server: Option<ServerStats>,
}

impl LevelReport {
    /// Summarises a level.
    pub fn new(load: Load, r: &LevelResult, server: Option<ServerStats>) -> Self {
        let secs = r.wall.as_secs_f64().max(1e-9);
        Self {
            load,
            sent: r.sent,
            ok: r.ok,
            errors: r.errors.clone(),
            duration_s: r.wall.as_secs_f64(),
            requests_per_s: r.ok as f64 / secs,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            tokens_per_s: r.completion_tokens as f64 / secs,
            latency_ms: r.latency.percentiles(),
            service_ms: r.service.percentiles(),
            first_token_ms: r.first_token.percentiles(),
            server,
        }
    }

    /// Failed requests.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The `10x` scenario: the same load at a baseline concurrency and at ten times it.
#[derive(Debug, Clone, Serialize)]
pub struct TenX {
    pub baseline_concurrency: usize,
    /// Throughput (generated tokens/s) at 10x over the baseline's.
    pub throughput_ratio: f64,
    /// p50 latency at 10x over the baseline's.
    pub p50_ratio: f64,
    /// p99 latency at 10x over the baseline's.
    pub p99_ratio: f64,
    /// Failed requests at 10x.
    pub errors_at_10x: u64,
}

impl TenX {
    /// Compares `base` with `ten` (reports of the same run).
    pub fn compare(baseline_concurrency: usize, base: &LevelReport, ten: &LevelReport) -> Self {
        let ratio = |f: fn(&Percentiles) -> f64| match (&base.latency_ms, &ten.latency_ms) {
            (Some(b), Some(t)) if f(b) > 0.0 => f(t) / f(b),
            _ => f64::NAN,
        };
        Self {
            baseline_concurrency,
            throughput_ratio: ten.tokens_per_s / base.tokens_per_s.max(1e-9),
            p50_ratio: ratio(|p| p.p50),
            p99_ratio: ratio(|p| p.p99),
            errors_at_10x: ten.failed(),
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub protocol: Protocol,
    pub stream: bool,
    pub model: String,
    pub max_tokens: u32,
    pub temperature: f32,
    pub workload: String,
    pub seed: u64,
    pub levels: Vec<LevelReport>,
    pub ten_x: Option<TenX>,
}

fn ms(p: &Option<Percentiles>, f: fn(&Percentiles) -> f64) -> String {
    p.as_ref().map_or("-".into(), |p| format!("{:.1}", f(p)))
}

impl Report {
    /// The report as a Markdown section: a title line, a table, and the 10x comparison.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "### loadtest: {} {:?}{}, model `{}`, max_tokens {}, temperature {}\n\n{}\n",
            self.target,
            self.protocol,
            if self.stream { " (streamed)" } else { "" },
            self.model,
            self.max_tokens,
            self.temperature,
            self.workload
        );
        out.push_str(
            "| load | sent | ok | errors | req/s | gen tok/s | p50 ms | p95 ms | p99 ms | max ms | first token p50 ms | \
             decode batch | prefill padding |\n",
        );
        out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for l in &self.levels {
            let load = match l.load {
                Load::Closed { concurrency } => format!("{concurrency} clients"),
                Load::Open { rate } => format!("{rate} req/s"),
            };
            let errors = if l.errors.is_empty() {
                "0".to_string()
            } else {
                l.errors
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let (batch, padding) = l.server.map_or(("-".into(), "-".into()), |s| {
                (
                    format!("{:.1}", s.mean_decode_batch),
                    format!("{:.1}%", s.padding_ratio * 100.0),
                )
            });
            let _ = writeln!(
                out,
                "| {load} | {} | {} | {errors} | {:.1} | {:.0} | {} | {} | {} | {} | {} | {batch} | {padding} |",
                l.sent,
                l.ok,
                l.requests_per_s,
                l.tokens_per_s,
                ms(&l.latency_ms, |p| p.p50),
                ms(&l.latency_ms, |p| p.p95),
                ms(&l.latency_ms, |p| p.p99),
                ms(&l.latency_ms, |p| p.max),
                ms(&l.first_token_ms, |p| p.p50),
            );
        }
        if let Some(t) = &self.ten_x {
            let _ = writeln!(
                out,
                "\n10x ({} -> {} clients): throughput x{:.2}, p50 x{:.2}, p99 x{:.2}, errors at 10x: {}",
                t.baseline_concurrency,
                t.baseline_concurrency * 10,
                t.throughput_ratio,
                t.p50_ratio,
                t.p99_ratio,
                t.errors_at_10x
            );
        }
        out
    }
}
