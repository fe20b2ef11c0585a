//! White-box distillation ablation: one student, one budget, one dataset, three refresh jobs
//! from the same serving version — output-only token KD, + hidden-state transfer, + hidden and
//! attention transfer — from a wider local teacher that is also the black-box teacher (its
//! `/v1` on the same server). The teacher is first fine-tuned on the labelled prompts (the
//! finding's code), so its outputs and internals carry what the student should learn;
//! `--teacher-steps 0` keeps it random. Every job's gate rejects on purpose, so each starts
//! from the same version; the table is the held-out evaluation of each candidate (agreement
//! with the teacher's tokens, KL to its top-k, exact match with the labels) beside the serving
//! version's.
//!
//! ```sh
//! cargo bench --bench whitebox                     # 120 steps, 96 prompts, teacher 300 steps
//! cargo bench --bench whitebox -- --steps 300 --teacher-steps 0
//! cargo bench --bench whitebox -- --steps 40 --hidden-weight 0.1 --attention-weight 0.1
//! ```

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use distill_serve::checkpoint::Family;
use distill_serve::distill::finetune::finetune;
use distill_serve::distill::job::PromptInput;
use distill_serve::distill::trainer::TrainConfig;
use distill_serve::export::{self, ExternalData, Form, Precision};
use distill_serve::tiny::{TinySpec, write_tiny};
use serde_json::{Value, json};

const TOKEN: &str = "bench-admin-token";

#[derive(clap::Parser)]
struct Options {
    /// Training steps of each job.
    #[arg(long, default_value_t = 120)]
    steps: usize,
    /// Prompts in the dataset (a quarter held out).
    #[arg(long, default_value_t = 96)]
    prompts: usize,
    /// Weight of the hidden-state term in the white-box rows.
    #[arg(long, default_value_t = 1.0)]
    hidden_weight: f64,
    /// Weight of the attention-map term in the last row.
    #[arg(long, default_value_t = 1.0)]
    attention_weight: f64,
    /// Fine-tuning steps of the teacher on the labelled prompts before the jobs (0: random).
    #[arg(long, default_value_t = 300)]
    teacher_steps: usize,
    /// `cargo bench` passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Version 1 of `name`: a qwen2 student of `hidden` width and `layers` layers, with its
/// training checkpoint; fine-tuned `steps` steps on the labelled `prompts` first.
fn add(
    repo: &Path,
    name: &str,
    seed: u64,
    (hidden, layers): (usize, usize),
    prompts: &[PromptInput],
    steps: usize,
) -> Result<()> {
    let out = repo.join(name).join("1");
    let checkpoint = out.join("checkpoint");
    let mut spec = TinySpec::new(Family::Qwen2, seed);
    (spec.hidden_size, spec.num_layers, spec.init_std) = (Some(hidden), Some(layers), Some(0.3));
    spec.intermediate_size = Some(hidden * 2);
    if steps == 0 {
        write_tiny(&spec, &checkpoint)?;
    } else {
        let random = repo.join(format!("{name}-random"));
        spec.init_std = Some(0.02);
        write_tiny(&spec, &random)?;
        let config = TrainConfig {
            steps,
            batch_size: 8,
            learning_rate: 0.003,
            warmup_steps: 10,
            nice: 0,
            ..TrainConfig::default()
        };
        finetune(&random, prompts.to_vec(), &config, &checkpoint, |_| {})?;
        std::fs::remove_dir_all(&random)?;
    }
    export::export_form(
        &checkpoint,
        &out,
        Precision::DEFAULT_INT8,
        ExternalData::Never,
        Form::default(),
    )?;
    std::fs::write(repo.join(name).join("model.toml"), format!("name = \"{name}\"\n"))?;
    Ok(())
}

/// Runs a job to its end and returns it.
async fn job(server: &common::Server, body: &Value) -> Result<Value> {
    let path = "/admin/v1/models/student/refresh";
    let started = server
        .admin(TOKEN, reqwest::Method::POST, path, Some(body.to_string()))
        .await?;
    let id = started["id"].as_str().context("no job id")?.to_string();
    let start = Instant::now();
    loop {
        let j = server
            .admin(TOKEN, reqwest::Method::GET, &format!("/admin/v1/jobs/{id}"), None)
            .await?;
        if ["succeeded", "rejected", "failed", "cancelled"].contains(&j["state"].as_str().unwrap_or_default()) {
            return Ok(j);
        }
        if start.elapsed() > Duration::from_secs(1800) {
            bail!("job {id} still running after 30 min");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = Options::parse();
    let findings = [
        ("chest pain", "R07.9"),
        ("type 2 diabetes", "E11.9"),
        ("a fractured femur", "S72.90XA"),
        ("asthma", "J45.909"),
        ("hypertension", "I10"),
        ("a migraine", "G43.909"),
    ];
    let prompts: Vec<Value> = (0..o.prompts)
        .map(|i| {
            let (finding, code) = findings[i % findings.len()];
            json!({"prompt": format!("A patient {i} with {finding} needs a code."), "label": code})
        })
        .collect();
    let labelled: Vec<PromptInput> = prompts
        .iter()
        .map(|p| serde_json::from_value(p.clone()))
        .collect::<Result<_, _>>()?;
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("models");
    let started = Instant::now();
    add(&repo, "student", 1, (64, 4), &labelled, 0)?;
    add(&repo, "teacher", 9, (128, 4), &labelled, o.teacher_steps)?;
    let teacher_seconds = started.elapsed().as_secs_f64();
    let folder = repo.to_str().context("repository path is not UTF-8")?;
    let server = common::Server::start(&["--admin-token", TOKEN, "--model-repository", folder], "warn", |_| {})?;
    let base = server.base.clone();
    let dataset: String = prompts.iter().map(|p| format!("{p}\n")).collect();
    server
        .admin(TOKEN, reqwest::Method::POST, "/admin/v1/datasets/notes", Some(dataset))
        .await?;
    let teacher = match o.teacher_steps {
        0 => "random, init std 0.3".to_string(),
        n => format!("fine-tuned {n} steps of 8 on the labelled prompts in {teacher_seconds:.0} s"),
    };
    println!(
        "student 64 wide x 4 layers, teacher 128 wide x 4 layers ({teacher}); {} prompts, {} steps of 8, seed 0; white-box weights: hidden {}, attention {}\n",
        o.prompts, o.steps, o.hidden_weight, o.attention_weight
    );
    println!(
        "| transfer | candidate agreement | candidate KL | candidate exact match | serving agreement | serving KL | seconds |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, white_box) in [
        ("output only (token KD)", Value::Null),
        (
            "+ hidden states (last 2 layers)",
            json!({"teacher_model": "teacher", "layers": 2, "hidden_weight": o.hidden_weight, "attention_weight": 0.0}),
        ),
        (
            "+ hidden states + attention maps (last 2 layers)",
            json!({"teacher_model": "teacher", "layers": 2, "hidden_weight": o.hidden_weight,
                   "attention_weight": o.attention_weight}),
        ),
    ] {
        let body = json!({"dataset": "notes", "eval_fraction": 0.25, "eval_max_new_tokens": 8,
            "teacher": {"url": format!("{base}/v1"), "model": "teacher", "mode": "token", "top_logprobs": 5,
                        "max_tokens": 12, "temperature": 0.0, "concurrency": 4},
            "train": {"steps": o.steps, "batch_size": 8, "learning_rate": 0.003, "warmup_steps": 10, "nice": 0, "seed": 0},
            // Rejected on purpose: every job starts from version 1.
            "gate": {"min_agreement_gain": 10.0},
            "white_box": white_box});
        let started = Instant::now();
        let j = job(&server, &body).await?;
        if j["state"] != "rejected" {
            bail!("{name}: {j}");
        }
        let e = &j["result"]["evaluation"];
        let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.4}"));
        println!(
            "| {name} | {} | {} | {} | {} | {} | {:.0} |",
            f(&e["candidate"]["agreement"]),
            f(&e["candidate"]["kl"]),
            f(&e["candidate"]["exact_match"]),
            f(&e["current"]["agreement"]),
            f(&e["current"]["kl"]),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
