//! Refresh jobs: start, follow, cancel. A job runs its stages in order — prepare, teacher,
//! training, export, evaluate, promote — recording each in the store and announcing it to
//! subscribers (the SSE stream). The candidate is built in a staging folder inside the model's
//! folder and renamed into place only when the gate passes, so a crash never leaves a
//! half-written version.

use std::any::Any;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::eval::{EvalContext, evaluate};
use super::finetune::copy_beside_weights;
use super::guards;
use super::job::{RefreshSpec, StudentText, is_held_out};
use super::model::TrainableDecoder;
use super::outbound::OutboundPolicy;
use super::store::{JobRecord, JobState, Prompt, Stage, Store, StoreError, TeacherOutput};
use super::teacher::{StudentVocab, Teacher};
use super::trainer::{StepReport, train};
use super::whitebox::{self, WhiteBox, WhiteBoxSpec};
use crate::audit::{Audit, Entry};
use crate::checkpoint::TokenizerFiles;
use crate::constrain::{Terminologies, token_bytes};
use crate::export::{self, Activations, ExternalData, Int8Format, MODEL_FILE, Precision};
use crate::metrics::Metrics;
use crate::repository::capture::{self, CapturePolicy};
use crate::repository::{CHECKPOINT_DIR, ModelVersion, Repository, RepositoryError};
use crate::tokenize::ChatMessage;

/// How often captured prompts past their retention are deleted.
const CAPTURE_EXPIRY_INTERVAL: Duration = Duration::from_secs(3600);

/// Prefix of the folders candidates are built in, inside the model's folder.
const STAGING_PREFIX: &str = ".staging-";

/// Why a job could not be started or changed.
#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Repository(#[from] RepositoryError),
}

/// A job running in this process.
struct LiveJob {
    model: String,
    /// Who started it and from where, for the audit line of its end.
    started_by: (String, Option<SocketAddr>),
    cancel: AtomicBool,
    events: broadcast::Sender<Value>,
}

/// How a job that did not fail ended.
enum Outcome {
    Promoted,
    Rejected(Vec<String>),
}

/// What the operator allows refresh jobs.
#[derive(Debug, Clone)]
pub struct JobPolicy {
    /// Where teachers may be.
    pub outbound: OutboundPolicy,
    /// Jobs running at once (training takes every core it is given).
    pub max_running: usize,
}

/// Runs refresh jobs against the repository.
pub struct Distiller {
    store: Arc<Store>,
    repository: Arc<Repository>,
    terminologies: Arc<Terminologies>,
    metrics: Arc<Metrics>,
    audit: Audit,
    policy: JobPolicy,
    live: Mutex<HashMap<String, Arc<LiveJob>>>,
}

impl Distiller {
    /// Removes staging folders a previous process left (its jobs are already marked failed by
    /// [`Store::open`]).
    pub fn new(
        store: Arc<Store>,
        repository: Arc<Repository>,
        terminologies: Arc<Terminologies>,
        metrics: Arc<Metrics>,
        audit: Audit,
        policy: JobPolicy,
    ) -> Self {
        for status in repository.statuses() {
            remove_staging(&repository.model_dir(&status.name));
        }
        Self {
            store,
            repository,
            terminologies,
            metrics,
            audit,
            policy,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The dataset store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LiveJob>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates `spec`, records the job and starts it for `actor` (a name and the client's
    /// address, audited when the job ends); returns its id.
    pub fn start(
        self: &Arc<Self>,
        model: &str,
        spec: RefreshSpec,
        actor: (String, Option<SocketAddr>),
    ) -> Result<String, DistillError> {
        spec.validate().map_err(DistillError::Invalid)?;
        self.policy
            .outbound
            .check(&spec.teacher.url)
            .map_err(DistillError::Invalid)?;
        self.repository.get(model)?;
        if let Some(t) = &spec.terminology
            && self.terminologies.get(t).is_none()
        {
            return Err(DistillError::Invalid(format!("terminology `{t}` is not loaded")));
        }
        let mut prompts = Vec::with_capacity(spec.prompts.len());
        for p in spec.prompts.iter().cloned() {
            prompts.push(p.into_messages().map_err(DistillError::Invalid)?);
        }
        let id = format!("job-{:016x}", rand::random::<u64>());
        let live = Arc::new(LiveJob {
            model: model.to_string(),
            started_by: actor,
            cancel: AtomicBool::new(false),
            events: broadcast::channel(1024).0,
        });
        {
            let mut jobs = self.live();
            if jobs.values().any(|j| j.model == model) {
                return Err(DistillError::Conflict(format!(
                    "a refresh of `{model}` is already running"
                )));
            }
            if jobs.len() >= self.policy.max_running {
                return Err(DistillError::Conflict(format!(
                    "{} refresh jobs are running, the server's --max-refresh-jobs; retry when one ends",
                    jobs.len()
                )));
            }
            self.store.add_prompts(&spec.dataset, &prompts)?;
            let spec_json = serde_json::to_value(&spec).map_err(|e| DistillError::Invalid(e.to_string()))?;
            self.store.create_job(&id, model, &spec_json)?;
            jobs.insert(id.clone(), Arc::clone(&live));
        }
        let this = Arc::clone(self);
        let (job_id, model) = (id.clone(), model.to_string());
        tokio::spawn(async move { this.run(job_id, model, spec, live).await });
        Ok(id)
    }

    /// Stores a served prompt of `model` (redacted by `policy`) in its capture dataset, off the
    /// request path; a failure is logged, never the client's problem.
    pub fn capture(&self, model: &str, policy: &CapturePolicy, messages: &[ChatMessage]) {
        let prompt = vec![(policy.redact(messages), None)];
        let (store, dataset) = (Arc::clone(&self.store), capture::dataset_name(model));
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.add_prompts(&dataset, &prompt) {
                tracing::warn!(dataset = %dataset, error = %e, "could not capture a prompt");
            }
        });
    }

    /// Deletes captured prompts older than `keep` now and every hour after, on a blocking
    /// worker.
    pub fn expire_captures(&self, keep: Duration) {
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(CAPTURE_EXPIRY_INTERVAL);
            loop {
                every.tick().await;
                let store = Arc::clone(&store);
                let before = super::store::now().saturating_sub(keep.as_secs());
                let pruned =
                    tokio::task::spawn_blocking(move || store.delete_older(capture::DATASET_PREFIX, before)).await;
                match pruned {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::info!(prompts = n, "captured prompts past their retention deleted"),
                    Ok(Err(e)) => tracing::warn!("could not delete expired captured prompts: {e}"),
                    Err(e) => tracing::warn!("capture expiry stopped: {e}"),
                }
            }
        });
    }

    /// Asks a running job to stop at its next check.
    pub fn cancel(&self, id: &str) -> Result<(), DistillError> {
        if let Some(job) = self.live().get(id) {
            job.cancel.store(true, Ordering::Relaxed);
            return Ok(());
        }
        match self.store.job(id)? {
            Some(_) => Err(DistillError::Conflict(format!("job {id} has already ended"))),
            None => Err(DistillError::NotFound(format!("job {id} not found"))),
        }
    }

    /// Cancels every running job and waits, at most `within`, until each has recorded its end
    /// (state `cancelled`, staging folder removed). Returns how many were still running then.
    pub async fn shutdown(&self, within: Duration) -> usize {
        for job in self.live().values() {
            job.cancel.store(true, Ordering::Relaxed);
        }
        let until = Instant::now() + within;
        loop {
            let running = self.live().len();
            if running == 0 || Instant::now() >= until {
                return running;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Events of a running job (none when it has ended).
    pub fn subscribe(&self, id: &str) -> Option<broadcast::Receiver<Value>> {
        self.live().get(id).map(|j| j.events.subscribe())
    }

    /// A job's record.
    pub fn job(&self, id: &str) -> Result<JobRecord, DistillError> {
        self.store
            .job(id)?
            .ok_or_else(|| DistillError::NotFound(format!("job {id} not found")))
    }

    async fn run(self: Arc<Self>, id: String, model: String, spec: RefreshSpec, live: Arc<LiveJob>) {
        let staging = self.repository.model_dir(&model).join(format!("{STAGING_PREFIX}{id}"));
        // Replicas sharing the repository leave a locked candidate alone when they start.
        let lock = StagingLock::take(&staging);
        if let Err(e) = &lock {
            tracing::warn!(job = %id, error = %e, "could not lock the staging folder");
        }
        let mut p = Progress {
            id: id.clone(),
            store: Arc::clone(&self.store),
            live: Arc::clone(&live),
            stage: Stage::Prepare,
            result: json!({}),
            last_write: Instant::now(),
        };
        // Whatever happens inside — a panic included — the job ends: cleanup runs, its record
        // and subscribers learn the end, and the model is free for the next job.
        let outcome = match AssertUnwindSafe(self.pipeline(&mut p, &model, &spec, &staging))
            .catch_unwind()
            .await
        {
            Ok(outcome) => outcome,
            Err(panic) => Err(anyhow!(
                "the job stopped on an internal error: {}",
                panic_message(&panic)
            )),
        };
        if staging.exists()
            && let Err(e) = std::fs::remove_dir_all(&staging)
        {
            tracing::warn!(job = %id, error = %e, "could not remove the staging folder");
        }
        drop(lock);
        let (state, error) = match outcome {
            Ok(Outcome::Promoted) => (JobState::Succeeded, None),
            Ok(Outcome::Rejected(failures)) => (
                JobState::Rejected,
                Some(format!("gate failed: {}", failures.join("; "))),
            ),
            Err(_) if live.cancel.load(Ordering::Relaxed) => (JobState::Cancelled, Some("cancelled".to_string())),
            Err(e) => (JobState::Failed, Some(format!("{e:#}"))),
        };
        tracing::info!(job = %id, model = %model, state = state.as_str(), error = error.as_deref().unwrap_or(""), "refresh ended");
        {
            // Under the lock: once the record says the job ended, the model is free for the next
            // job and the metric has counted it.
            let mut jobs = self.live();
            self.metrics.refresh_job_ended(&model, state.as_str());
            if let Err(e) = self.store.update_job(&id, state, p.stage, &p.result, error.as_deref()) {
                tracing::error!(job = %id, error = %e, "could not record the job's end");
            }
            jobs.remove(&id);
        }
        let (actor, client) = live.started_by.clone();
        self.audit.record(Entry {
            actor,
            client,
            action: "refresh_finish".into(),
            target: model.clone(),
            outcome: state.as_str().into(),
        });
        let _ = live
            .events
            .send(json!({"type": "finished", "state": state, "stage": p.stage, "error": error, "result": p.result}));
    }

    async fn pipeline(&self, p: &mut Progress, name: &str, spec: &RefreshSpec, staging: &Path) -> Result<Outcome> {
        p.stage(Stage::Prepare);
        let current = self.repository.get(name)?;
        let source = current.checkpoint_dir();
        if !source.join("config.json").is_file() {
            bail!(
                "version {} of `{name}` has no training checkpoint ({}): a refresh fine-tunes the Hugging Face checkpoint kept beside the ONNX files",
                current.version,
                source.display()
            );
        }
        let mut prompts = self.store.prompts(&spec.dataset)?;
        if let Some(max) = spec.max_prompts {
            prompts.truncate(max);
        }
        let held_out = prompts.iter().filter(|q| is_held_out(q.id, spec.eval_fraction)).count();
        if held_out == 0 || held_out == prompts.len() {
            bail!(
                "dataset `{}` has {} prompts, {held_out} held out: a refresh needs at least one to train on and one to evaluate",
                spec.dataset,
                prompts.len()
            );
        }
        p.set(
            "dataset",
            json!({"prompts": prompts.len(), "train": prompts.len() - held_out, "held_out": held_out}),
        );
        let white_box = match &spec.white_box {
            Some(w) => {
                let teacher = self.repository.get(&w.teacher_model)?.checkpoint_dir();
                whitebox::check_pair(&source, &teacher, w)?;
                Some((teacher, w.clone()))
            }
            None => None,
        };
        if let Some(failure) = guards::check_drift(&self.store, p, name, &current.tokenizer, spec, &prompts)? {
            p.set("gate", json!({"passed": false, "failures": [&failure]}));
            return Ok(Outcome::Rejected(vec![failure]));
        }

        p.stage(Stage::Teacher);
        let vocab = Arc::new(StudentVocab::new(
            Arc::clone(&current.tokenizer),
            &token_bytes(&current.tokenizer),
        ));
        let teacher = Teacher::new(spec.teacher.clone(), vocab)?;
        let outputs = self.ask_teacher(p, &teacher, &prompts).await?;
        if let Some(failure) = guards::check_teacher(p, spec, &prompts, &outputs)? {
            p.set("gate", json!({"passed": false, "failures": [&failure]}));
            return Ok(Outcome::Rejected(vec![failure]));
        }

        let files = TokenizerFiles::open(&source)?;
        let text = StudentText {
            tokenizer: &current.tokenizer,
            template: current.chat_template.as_ref(),
            eos: current.stop_token_ids.first().copied(),
            max_len: current.context_length,
        };
        let (mut train_set, mut eval_set) = (Vec::new(), Vec::new());
        for (prompt, out) in prompts.iter().zip(&outputs) {
            if is_held_out(prompt.id, spec.eval_fraction) {
                eval_set.extend(text.eval_example(prompt, out).map_err(|e| anyhow!(e))?);
            } else {
                train_set.extend(text.example(prompt, out).map_err(|e| anyhow!(e))?);
            }
        }
        if train_set.is_empty() || eval_set.is_empty() {
            bail!("the teacher's answers left no usable training or held-out example (empty completions?)");
        }
        let regression = guards::regression_examples(&self.store, name, spec, &text, train_set.len())?;
        if let Some(r) = &regression {
            p.set(
                "regression",
                json!({"dataset": r.dataset, "replayed": r.replay.len(), "held_out": r.scored.len()}),
            );
            train_set.extend(r.replay.iter().cloned());
        }

        p.stage(Stage::Training);
        let checkpoint_out = staging.join(CHECKPOINT_DIR);
        copy_beside_weights(&source, &files, &checkpoint_out)?;
        self.train(p, &source, &checkpoint_out, train_set, spec, white_box)
            .await?;
        self.check_cancel(p)?;

        p.stage(Stage::Export);
        let (ckpt, out, form) = (checkpoint_out.clone(), staging.to_path_buf(), current.form);
        // The candidate keeps the served graph's form; the GPU form's INT8 is weight-only.
        let format = match form.activations {
            Activations::Fp16 => Int8Format::MatMulNBits,
            Activations::Fp32 => spec.int8_format,
        };
        tokio::task::spawn_blocking(move || {
            export::export_form(&ckpt, &out, Precision::Int8(format), ExternalData::Auto, form)
        })
        .await??;
        self.check_cancel(p)?;

        p.stage(Stage::Evaluate);
        let evaluation = self.evaluate(&current, staging, eval_set, spec).await?;
        self.store.add_evaluation(&p.id, "current", &evaluation.0)?;
        self.store.add_evaluation(&p.id, "candidate", &evaluation.1)?;
        let (cur, cand) = (
            serde_json::from_value(evaluation.0.clone())?,
            serde_json::from_value(evaluation.1.clone())?,
        );
        let mut failures = spec.gate.failures(&cur, &cand);
        p.set(
            "evaluation",
            json!({"current": evaluation.0, "candidate": evaluation.1}),
        );
        if let (Some(r), Some(guarded)) = (&spec.regression, regression) {
            let (cur, cand) = self.evaluate(&current, staging, guarded.scored, spec).await?;
            let (before, after) = (cur["exact_match"].as_f64(), cand["exact_match"].as_f64());
            p.set("regression_evaluation", json!({"current": cur, "candidate": cand}));
            if let (Some(before), Some(after)) = (before, after)
                && after < before - r.max_exact_match_drop
            {
                failures.push(format!(
                    "forgetting: exact match on `{}` {after:.4} < current {before:.4} - {}",
                    guarded.dataset, r.max_exact_match_drop
                ));
            }
        }
        p.set("gate", json!({"passed": failures.is_empty(), "failures": failures}));
        if !failures.is_empty() {
            return Ok(Outcome::Rejected(failures));
        }
        self.check_cancel(p)?;

        p.stage(Stage::Promote);
        let (repository, model, dir) = (Arc::clone(&self.repository), name.to_string(), staging.to_path_buf());
        let promoted = tokio::task::spawn_blocking(move || repository.promote(&model, &dir)).await??;
        p.set("previous_version", json!(current.version));
        p.set("version", json!(promoted.version()));
        Ok(Outcome::Promoted)
    }

    fn check_cancel(&self, p: &Progress) -> Result<()> {
        if p.live.cancel.load(Ordering::Relaxed) {
            bail!("cancelled");
        }
        Ok(())
    }

    /// Teacher outputs for every prompt: from the store when a previous job paid for them,
    /// else asked with bounded concurrency; each answer is stored as it arrives.
    async fn ask_teacher(&self, p: &mut Progress, teacher: &Teacher, prompts: &[Prompt]) -> Result<Vec<TeacherOutput>> {
        let key = teacher.spec().cache_key();
        let mut outputs: Vec<Option<TeacherOutput>> = Vec::with_capacity(prompts.len());
        for q in prompts {
            outputs.push(self.store.teacher_output(q.id, &key)?);
        }
        let cached = outputs.iter().filter(|o| o.is_some()).count();
        let total = prompts.len();
        p.set("teacher", json!({"done": cached, "total": total, "cached": cached}));
        let missing: Vec<usize> = (0..total).filter(|&i| outputs[i].is_none()).collect();
        let mut answers = futures::stream::iter(missing)
            .map(|i| async move { (i, teacher.complete(&prompts[i].messages).await) })
            .buffer_unordered(teacher.spec().concurrency);
        let mut done = cached;
        while let Some((i, answer)) = answers.next().await {
            self.check_cancel(p)?;
            let answer = answer.context("asking the teacher")?;
            self.store.put_teacher_output(prompts[i].id, &key, &answer)?;
            outputs[i] = Some(answer);
            done += 1;
            p.set("teacher", json!({"done": done, "total": total, "cached": cached}));
        }
        Ok(outputs.into_iter().flatten().collect())
    }

    async fn train(
        &self,
        p: &mut Progress,
        source: &Path,
        out: &Path,
        examples: Vec<super::trainer::Example>,
        spec: &RefreshSpec,
        white_box: Option<(PathBuf, WhiteBoxSpec)>,
    ) -> Result<()> {
        let (tx, mut rx) = mpsc::unbounded_channel::<StepReport>();
        let (source, out, config, live) = (
            source.to_path_buf(),
            out.to_path_buf(),
            spec.train.clone(),
            Arc::clone(&p.live),
        );
        let mut task = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut model = TrainableDecoder::load(&source)?;
            let white_box = white_box
                .map(|(dir, spec)| WhiteBox::load(&dir, model.config(), spec))
                .transpose()?;
            train(&mut model, &examples, &config, &live.cancel, white_box.as_ref(), |r| {
                let _ = tx.send(*r);
            })?;
            model.save(&out)
        });
        loop {
            tokio::select! {
                Some(report) = rx.recv() => p.step(&report),
                done = &mut task => {
                    while let Ok(report) = rx.try_recv() {
                        p.step(&report);
                    }
                    return done?;
                }
            }
        }
    }

    async fn evaluate(
        &self,
        current: &Arc<ModelVersion>,
        staging: &Path,
        examples: Vec<super::eval::EvalExample>,
        spec: &RefreshSpec,
    ) -> Result<(Value, Value)> {
        let (current, terminologies, spec) = (Arc::clone(current), Arc::clone(&self.terminologies), spec.clone());
        let candidate: PathBuf = staging.join(MODEL_FILE);
        tokio::task::spawn_blocking(move || -> Result<(Value, Value)> {
            let cx = EvalContext {
                tokenizer: &current.tokenizer,
                stop_ids: &current.stop_token_ids,
                max_new_tokens: spec.eval_max_new_tokens,
                terminology: spec.terminology.as_deref().map(|t| (terminologies.as_ref(), t)),
                intra_threads: spec.train.threads,
            };
            let before = evaluate(&current.dir.join(MODEL_FILE), &examples, &cx)?;
            let after = evaluate(&candidate, &examples, &cx)?;
            Ok((serde_json::to_value(before)?, serde_json::to_value(after)?))
        })
        .await?
    }
}

/// A job's stage and result, written to the store and sent to subscribers.
pub(super) struct Progress {
    id: String,
    store: Arc<Store>,
    live: Arc<LiveJob>,
    stage: Stage,
    result: Value,
    last_write: Instant,
}

impl Progress {
    fn save(&mut self) {
        self.last_write = Instant::now();
        if let Err(e) = self
            .store
            .update_job(&self.id, JobState::Running, self.stage, &self.result, None)
        {
            tracing::warn!(job = %self.id, error = %e, "could not record progress");
        }
    }

    fn stage(&mut self, stage: Stage) {
        self.stage = stage;
        self.save();
        let _ = self.live.events.send(json!({"type": "stage", "stage": stage}));
    }

    pub(super) fn set(&mut self, key: &str, value: Value) {
        self.result[key] = value.clone();
        if self.last_write.elapsed() > Duration::from_millis(500) || key != "teacher" {
            self.save();
        }
        let _ = self.live.events.send(json!({"type": key, key: value}));
    }

    /// Records a training step: progress, and its losses appended to the job's history.
    fn step(&mut self, r: &StepReport) {
        self.result["training"] = json!({"step": r.step, "steps": r.steps});
        let mut row = json!({"step": r.step, "loss": r.loss.total, "ce": r.loss.ce, "kl": r.loss.kl,
            "tau": r.tau, "lr": r.learning_rate, "grad_norm": r.grad_norm});
        if let (Some(hidden), Some(attention)) = (r.loss.hidden, r.loss.attention) {
            (row["hidden"], row["attention"]) = (json!(hidden), json!(attention));
        }
        match self.result["losses"].as_array_mut() {
            Some(rows) => rows.push(row),
            None => self.result["losses"] = json!([row]),
        }
        if self.last_write.elapsed() > Duration::from_millis(500) || r.step == r.steps {
            self.save();
        }
        let _ = self.live.events.send(json!({"type": "step", "step": r}));
    }
}

fn remove_staging(model_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(model_dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(STAGING_PREFIX) {
            continue;
        }
        if name.ends_with(LOCK_SUFFIX) {
            // A lock whose job died before its folder was made.
            let folder = e.path().with_file_name(name.trim_end_matches(LOCK_SUFFIX));
            if !folder.exists() && !StagingLock::is_held(&e.path()) {
                let _ = std::fs::remove_file(e.path());
            }
            continue;
        }
        let lock = StagingLock::path(&e.path());
        if StagingLock::is_held(&lock) {
            tracing::info!(path = %e.path().display(), "a refresh candidate another process is building: left alone");
            continue;
        }
        tracing::info!(path = %e.path().display(), "removing an unfinished refresh candidate");
        let _ = std::fs::remove_dir_all(e.path());
        let _ = std::fs::remove_file(lock);
    }
}

/// Suffix of a staging folder's lock file, beside it (not in it: the folder becomes a version).
const LOCK_SUFFIX: &str = ".lock";

/// An exclusive `flock` on `<staging>.lock`, held while a job builds its candidate, so another
/// process over the same repository (a replica starting) knows the folder is in use.
struct StagingLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl StagingLock {
    fn path(staging: &Path) -> PathBuf {
        let mut name = staging.as_os_str().to_owned();
        name.push(LOCK_SUFFIX);
        PathBuf::from(name)
    }

    fn take(staging: &Path) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let path = Self::path(staging);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        // SAFETY: flock on a file descriptor this function owns; no memory is shared.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { path, _file: file })
    }

    /// Whether another open file holds the lock at `path`.
    fn is_held(path: &Path) -> bool {
        use std::os::fd::AsRawFd;
        let Ok(file) = std::fs::File::open(path) else {
            return false;
        };
        // SAFETY: as in `take`; the shared lock, if taken, is released when `file` closes.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
    }
}

impl Drop for StagingLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The text a panic carried, if it was a string.
fn panic_message(panic: &Box<dyn Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_candidate_survives_another_process_starting_and_a_stale_one_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (building, stale) = (dir.path().join(".staging-job-a"), dir.path().join(".staging-job-b"));
        std::fs::create_dir_all(&building).unwrap();
        std::fs::create_dir_all(&stale).unwrap();
        let lock = StagingLock::take(&building).unwrap();
        assert!(StagingLock::is_held(&StagingLock::path(&building)));
        remove_staging(dir.path());
        assert!(building.is_dir(), "a candidate being built was removed");
        assert!(!stale.exists(), "a stale candidate was kept");
        drop(lock);
        assert!(!StagingLock::path(&building).exists());
        remove_staging(dir.path());
        assert!(!building.exists());
        let orphan = dir.path().join(".staging-job-c.lock");
        std::fs::write(&orphan, "").unwrap();
        remove_staging(dir.path());
        assert!(!orphan.exists(), "an orphan lock was kept");
    }
}
