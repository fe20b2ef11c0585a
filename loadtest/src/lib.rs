//! `loadtest`: a bounded load generator for distill-serve and any OpenAI-compatible server.
//!
//! A run is a list of load levels (closed loop: N clients; open loop: Poisson arrivals at a
//! rate), each bounded by a request count and a time limit, against the OpenAI routes
//! (streamed or not) or the gRPC `Generate` service. Latencies go into HDR histograms; the
//! server's own Prometheus counters are scraped around each level. The result is a [`Report`]
//! (JSON, Markdown, SVG plot).

pub mod client;
pub mod plot;
pub mod report;
pub mod runner;
pub mod server_metrics;
pub mod stats;
pub mod workload;

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

pub use client::{Client, Protocol, Sampling};
pub use report::{LevelReport, Report, TenX};
pub use runner::{Bounds, Load};
pub use stats::Percentiles;
pub use workload::Workload;

/// Everything a run needs.
pub struct Plan {
    pub client: Client,
    /// The target, for the report.
    pub target: String,
    pub protocol: Protocol,
    pub sampling: Sampling,
    pub workload: Arc<Workload>,
    pub seed: u64,
    pub loads: Vec<Load>,
    pub bounds: Bounds,
    /// Requests sent one by one before the first level, not measured.
    pub warmup: u64,
    /// The server's Prometheus endpoint (`None`: do not scrape).
    pub metrics_url: Option<String>,
}

/// Refuses a target that is not on this machine unless `allow_remote` (a load test aimed at
/// someone else's server by a typo is an attack).
pub fn check_loopback(url: &str, allow_remote: bool) -> Result<()> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("invalid URL {url}"))?;
    let host = parsed.host_str().with_context(|| format!("{url} has no host"))?;
    let local = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !local && !allow_remote {
        bail!("{url} is not a loopback address; pass --allow-remote to load-test another machine");
    }
    Ok(())
}

/// Runs every level of `plan` in order and reports them.
pub async fn execute(plan: &Plan) -> Report {
    for i in 0..plan.warmup {
        let _ = plan
            .client
            .send(&plan.workload.prompt(plan.seed, u64::MAX - i), i)
            .await;
    }
    let http = reqwest::Client::new();
    let mut levels = Vec::new();
    let mut first = 0;
    for &load in &plan.loads {
        let before = match &plan.metrics_url {
            Some(url) => server_metrics::scrape(&http, url, &plan.sampling.model).await,
            None => None,
        };
        let result = runner::run_level(&plan.client, &plan.workload, plan.seed, load, plan.bounds, first).await;
        first += result.sent;
        let server = match (&plan.metrics_url, before) {
            (Some(url), Some(before)) => server_metrics::scrape(&http, url, &plan.sampling.model)
                .await
                .and_then(|after| after.since(&before)),
            _ => None,
        };
        levels.push(LevelReport::new(load, &result, server));
    }
    Report {
        target: plan.target.clone(),
        protocol: plan.protocol,
        stream: plan.sampling.stream,
        model: plan.sampling.model.clone(),
        max_tokens: plan.sampling.max_tokens,
        temperature: plan.sampling.temperature,
        workload: plan.workload.describe(),
        seed: plan.seed,
        levels,
        ten_x: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_without_allow_remote() {
        for url in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:8081",
            "http://127.3.4.5",
        ] {
            assert!(check_loopback(url, false).is_ok(), "{url}");
        }
        for url in ["http://10.0.0.1:8080", "https://api.deepseek.com", "not a url"] {
            assert!(check_loopback(url, false).is_err(), "{url}");
        }
        assert!(check_loopback("http://10.0.0.1:8080", true).is_ok());
    }
}
