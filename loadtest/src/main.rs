//! `loadtest` command line: `loadtest run ...` sweeps load levels, `loadtest 10x ...` compares a
//! baseline concurrency with ten times it. Both print a Markdown table and can write the JSON
//! report and an SVG plot.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use loadtest::{Bounds, Client, Load, Plan, Protocol, Report, Sampling, TenX, Workload, check_loopback, workload};

#[derive(Parser)]
#[command(
    version,
    about = "Bounded load generator for distill-serve and OpenAI-compatible servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs each load level in turn.
    Run {
        #[command(flatten)]
        common: Common,
        /// Closed loop: numbers of concurrent clients, comma-separated.
        #[arg(long, value_delimiter = ',', conflicts_with = "rate", default_value = "1,4,16")]
        concurrency: Vec<usize>,
        /// Open loop: Poisson arrival rates in requests/s, comma-separated.
        #[arg(long, value_delimiter = ',')]
        rate: Option<Vec<f64>>,
    },
    /// Closed loop at a baseline concurrency C, then at 10C, and their comparison.
    #[command(name = "10x")]
    TenX {
        #[command(flatten)]
        common: Common,
        /// The baseline concurrency C.
        #[arg(long, default_value_t = 2)]
        baseline: usize,
    },
}

#[derive(Args)]
struct Common {
    /// Base URL of the server (gRPC: its gRPC address).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Allow a target that is not on this machine.
    #[arg(long)]
    allow_remote: bool,
    /// API to call.
    #[arg(long, value_enum, default_value = "completions")]
    protocol: Protocol,
    /// Stream the answers (time to first token is reported).
    #[arg(long)]
    stream: bool,
    /// Model name sent with each request.
    #[arg(long, default_value = "default")]
    model: String,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Prompt lengths in words as a lognormal mix `weight:median:sigma,...` (the default fits the
    /// 512-token context of the project's tiny students, whose small BPE spends ~3 tokens a word).
    #[arg(long, default_value = "0.6:6:0.5,0.3:24:0.4,0.1:80:0.3")]
    lengths: String,
    /// Longest generated prompt, in words.
    #[arg(long, default_value_t = 130)]
    max_words: usize,
    /// Prompts from a file (JSON lines with `prompt`, or one per line) instead of generated ones.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Most requests per level.
    #[arg(long, default_value_t = 200)]
    requests: u64,
    /// No request of a level starts after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    duration_s: f64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
    /// Open loop: most requests outstanding.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// Unmeasured requests sent before the first level.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prometheus endpoint to scrape around each level ["<url>/metrics" over HTTP; none for gRPC].
    #[arg(long)]
    metrics_url: Option<String>,
    /// Folder for report.json, report.md and report.svg.
    #[arg(long)]
    out: Option<PathBuf>,
}

impl Common {
    fn plan(&self, loads: Vec<Load>) -> Result<Plan> {
        check_loopback(&self.url, self.allow_remote)?;
        if let Some(url) = &self.metrics_url {
            check_loopback(url, self.allow_remote)?;
        }
        if !(self.duration_s > 0.0 && self.timeout_s > 0.0) {
            bail!("--duration-s and --timeout-s must be positive");
        }
        let workload = match &self.prompts {
            Some(path) => Workload::from_file(path)?,
            None => Workload::Lognormal {
                modes: workload::parse_mix(&self.lengths)?,
                max_words: self.max_words,
            },
        };
        let sampling = Sampling {
            model: self.model.clone(),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            stream: self.stream,
        };
        let client = Client::new(
            self.protocol,
            &self.url,
            sampling.clone(),
            Duration::from_secs_f64(self.timeout_s),
        )?;
        let metrics_url = match (&self.metrics_url, self.protocol) {
            (Some(url), _) => Some(url.clone()),
            (None, Protocol::Grpc) => None,
            (None, _) => Some(format!("{}/metrics", self.url.trim_end_matches('/'))),
        };
        Ok(Plan {
            client,
            target: self.url.clone(),
            protocol: self.protocol,
            sampling,
            workload: Arc::new(workload),
            seed: self.seed,
            loads,
            bounds: Bounds {
                requests: self.requests,
                duration: Duration::from_secs_f64(self.duration_s),
                max_in_flight: self.max_in_flight,
            },
            warmup: self.warmup,
            metrics_url,
        })
    }

    fn write(&self, report: &Report) -> Result<()> {
        println!("{}", report.markdown());
        let Some(dir) = &self.out else { return Ok(()) };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(report)?)?;
        std::fs::write(dir.join("report.md"), report.markdown())?;
        loadtest::plot::svg(report, &dir.join("report.svg"))?;
        eprintln!("wrote report.json, report.md and report.svg to {}", dir.display());
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Run {
            common,
            concurrency,
            rate,
        } => {
            let loads = match rate {
                Some(rates) => {
                    if rates.iter().any(|&r| !(r > 0.0 && r.is_finite())) {
                        bail!("--rate values must be positive");
                    }
                    rates.into_iter().map(|rate| Load::Open { rate }).collect()
                }
                None => {
                    if concurrency.contains(&0) {
                        bail!("--concurrency values must be at least 1");
                    }
                    concurrency
                        .into_iter()
                        .map(|concurrency| Load::Closed { concurrency })
                        .collect()
                }
            };
            let report = loadtest::execute(&common.plan(loads)?).await;
            common.write(&report)
        }
        Command::TenX { common, baseline } => {
            if baseline == 0 {
                bail!("--baseline must be at least 1");
            }
            let loads = vec![
                Load::Closed { concurrency: baseline },
                Load::Closed {
                    concurrency: baseline * 10,
                },
            ];
            let mut report = loadtest::execute(&common.plan(loads)?).await;
            report.ten_x = Some(TenX::compare(baseline, &report.levels[0], &report.levels[1]));
            common.write(&report)
        }
    }
}
