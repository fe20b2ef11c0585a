//! `distill-serve distill ...`: the refresh admin API from the command line, with a progress
//! bar that follows a job's event stream.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::Value;

use super::heldout::{self, HeldOutArgs};
use super::store::JobState;

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Base URL of the server's HTTP listener.
    #[arg(long, env = "DISTILL_SERVE_URL", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// The server's admin token (every subcommand but `eval` needs it).
    #[arg(long, env = "DISTILL_SERVE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

/// The `distill` subcommands.
#[derive(Debug, Subcommand)]
pub enum DistillCommand {
    /// Add the prompts of a JSONL file (`{"prompt": ...}` or `{"messages": [...]}`, optional
    /// `"label"`) to a dataset.
    Upload { dataset: String, file: PathBuf },
    /// Start a refresh of a model with a job file (JSON) and follow it to its end.
    Refresh {
        model: String,
        job: PathBuf,
        /// Print the job id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Follow a running job to its end.
    Watch { id: String },
    /// Print a job's record.
    Status { id: String },
    /// List the newest jobs.
    Jobs,
    /// Ask a running job to stop.
    Cancel { id: String },
    /// Serve the version before the serving one again.
    Rollback { model: String },
    /// Evaluate a served model on a labelled held-out set, without and with the terminology
    /// constraint (exact match, invalid codes, coverage, latency, tokens/s).
    Eval(HeldOutArgs),
}

struct Client {
    http: reqwest::Client,
    args: ServerArgs,
}

impl Client {
    async fn call(&self, method: Method, path: &str, body: Option<reqwest::Body>) -> Result<reqwest::Response> {
        let url = format!("{}{path}", self.args.server.trim_end_matches('/'));
        let token = self
            .args
            .admin_token
            .as_deref()
            .context("the admin API needs --admin-token (or DISTILL_SERVE_ADMIN_TOKEN)")?;
        let mut request = self.http.request(method, &url).bearer_auth(token);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request.send().await.with_context(|| format!("calling {url}"))?;
        if !response.status().is_success() {
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let message = body["error"]["message"].as_str().unwrap_or("no details");
            bail!("{url}: {status}: {message}");
        }
        Ok(response)
    }

    async fn json(&self, method: Method, path: &str, body: Option<reqwest::Body>) -> Result<Value> {
        Ok(self.call(method, path, body).await?.json().await?)
    }

    /// Follows the job's events to `finished`, drawing progress; returns the final record.
    async fn watch(&self, id: &str) -> Result<Value> {
        let mut response = self
            .call(Method::GET, &format!("/admin/v1/jobs/{id}/events"), None)
            .await?;
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:>9} [{bar:30}] {pos}/{len} {msg}")
                .context("progress template")?
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        let mut buffer = String::new();
        while let Some(chunk) = response.chunk().await? {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                    continue;
                };
                let event: Value = serde_json::from_str(data).unwrap_or(Value::Null);
                // The snapshot is the job as it was when the stream opened (it may have passed
                // some stages already); `stage` events follow.
                let kind = if event.get("type").is_none() && event.get("stage").is_some() {
                    Some("stage")
                } else {
                    event["type"].as_str()
                };
                match kind {
                    Some("stage") => {
                        bar.set_prefix(event["stage"].as_str().unwrap_or("").to_string());
                        bar.set_position(0);
                        bar.set_length(0);
                        // Printed even where the bar is hidden (not a terminal): logs keep the stages.
                        bar.suspend(|| eprintln!("stage: {}", event["stage"].as_str().unwrap_or("?")));
                    }
                    Some("teacher") => {
                        let t = &event["teacher"];
                        bar.set_length(t["total"].as_u64().unwrap_or(0));
                        bar.set_position(t["done"].as_u64().unwrap_or(0));
                        bar.set_message(format!("{} cached", t["cached"]));
                    }
                    Some("step") => {
                        let s = &event["step"];
                        bar.set_length(s["steps"].as_u64().unwrap_or(0));
                        bar.set_position(s["step"].as_u64().unwrap_or(0));
                        bar.set_message(format!(
                            "loss {:.4} tau {:.2}",
                            s["loss"]["total"].as_f64().unwrap_or(f64::NAN),
                            s["tau"].as_f64().unwrap_or(f64::NAN)
                        ));
                    }
                    Some("finished") => {
                        bar.finish_and_clear();
                        return self.json(Method::GET, &format!("/admin/v1/jobs/{id}"), None).await;
                    }
                    _ => {}
                }
            }
        }
        bar.finish_and_clear();
        bail!("the server closed the event stream of {id} before the job ended")
    }
}

/// What a finished job says, without its loss history.
fn summary(job: &Value) -> Value {
    let mut s = job.clone();
    if let Some(result) = s.get_mut("result").and_then(Value::as_object_mut) {
        result.remove("losses");
    }
    if let Some(obj) = s.as_object_mut() {
        obj.remove("spec");
    }
    s
}

/// Runs one `distill` subcommand; an error when a followed job did not succeed.
pub async fn run(server: ServerArgs, command: DistillCommand) -> Result<()> {
    let client = Client {
        http: reqwest::Client::new(),
        args: server,
    };
    let print = |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    let finish = |job: Value| -> Result<()> {
        print(&summary(&job));
        match job["state"].as_str() {
            Some(state) if state == JobState::Succeeded.as_str() => Ok(()),
            state => bail!(
                "job {} ended {}: {}",
                job["id"].as_str().unwrap_or("?"),
                state.unwrap_or("?"),
                job["error"].as_str().unwrap_or("")
            ),
        }
    };
    match command {
        DistillCommand::Upload { dataset, file } => {
            let text = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut last = None;
            // In parts within the server's per-upload limits; each part appends.
            for part in upload_parts(&text, UPLOAD_PART_BYTES, UPLOAD_PART_LINES) {
                let answer = client
                    .json(
                        Method::POST,
                        &format!("/admin/v1/datasets/{dataset}"),
                        Some(part.to_vec().into()),
                    )
                    .await?;
                let added = last.as_ref().map_or(0, |l: &Value| l["added"].as_u64().unwrap_or(0));
                let mut answer = answer;
                answer["added"] = (added + answer["added"].as_u64().unwrap_or(0)).into();
                last = Some(answer);
            }
            print(&last.context("the file holds no prompts")?);
        }
        DistillCommand::Refresh { model, job, no_wait } => {
            let body = std::fs::read(&job).with_context(|| format!("reading {}", job.display()))?;
            let started = client
                .json(
                    Method::POST,
                    &format!("/admin/v1/models/{model}/refresh"),
                    Some(body.into()),
                )
                .await?;
            let id = started["id"]
                .as_str()
                .context("the server returned no job id")?
                .to_string();
            eprintln!("job {id} started");
            if no_wait {
                print(&started);
            } else {
                finish(client.watch(&id).await?)?;
            }
        }
        DistillCommand::Watch { id } => finish(client.watch(&id).await?)?,
        DistillCommand::Status { id } => print(&client.json(Method::GET, &format!("/admin/v1/jobs/{id}"), None).await?),
        DistillCommand::Jobs => print(&client.json(Method::GET, "/admin/v1/jobs", None).await?),
        DistillCommand::Cancel { id } => {
            print(
                &client
                    .json(Method::POST, &format!("/admin/v1/jobs/{id}/cancel"), None)
                    .await?,
            );
        }
        DistillCommand::Rollback { model } => {
            print(
                &client
                    .json(Method::POST, &format!("/admin/v1/models/{model}/rollback"), None)
                    .await?,
            );
        }
        DistillCommand::Eval(args) => print(&heldout::evaluate(&client.args.server, &args).await?),
    }
    Ok(())
}

/// Bytes of one part `distill upload` sends: half the server's limit, for headroom.
const UPLOAD_PART_BYTES: usize = super::store::MAX_UPLOAD_BYTES / 2;
/// Prompts of one part.
const UPLOAD_PART_LINES: usize = super::store::MAX_UPLOAD_LINES;

/// `text` cut at line ends into parts of at most `max_bytes` (unless one line is longer) and
/// `max_lines` non-empty lines.
fn upload_parts(text: &[u8], max_bytes: usize, max_lines: usize) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let (mut start, mut lines) = (0, 0);
    let mut at = 0;
    while at < text.len() {
        let end = text[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(text.len(), |i| at + i + 1);
        let blank = text[at..end].iter().all(u8::is_ascii_whitespace);
        if !blank && at > start && (end - start > max_bytes || lines == max_lines) {
            parts.push(&text[start..at]);
            (start, lines) = (at, 0);
        }
        lines += usize::from(!blank);
        at = end;
    }
    if lines > 0 {
        parts.push(&text[start..]);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_cut_at_line_ends_within_both_limits() {
        let text = b"a\nbb\n\nccc\nd";
        assert_eq!(upload_parts(text, 100, 100), vec![&text[..]]);
        // Blank lines stay with the part before them.
        assert_eq!(upload_parts(text, 100, 2), vec![&b"a\nbb\n\n"[..], &b"ccc\nd"[..]]);
        assert_eq!(upload_parts(text, 5, 100), vec![&b"a\nbb\n\n"[..], &b"ccc\nd"[..]]);
        assert_eq!(
            upload_parts(text, 4, 100),
            vec![&b"a\n"[..], &b"bb\n\n"[..], &b"ccc\n"[..], &b"d"[..]]
        );
        assert!(upload_parts(b"\n\n", 10, 10).is_empty());
        let joined: Vec<u8> = upload_parts(text, 3, 1).concat();
        assert_eq!(joined, text);
    }
}
