//! The dataset store (SQLite): prompts by dataset, teacher outputs, refresh jobs and their
//! evaluations. Every write is one transaction, so a crash leaves the store consistent; a
//! rerun finds the teacher outputs already paid for.

use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tokenize::ChatMessage;

/// Body of one dataset upload (`distill upload` sends bigger files in parts).
pub const MAX_UPLOAD_BYTES: usize = 16 << 20;
/// Prompts in one dataset upload.
pub const MAX_UPLOAD_LINES: usize = 50_000;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("dataset store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("dataset store: malformed row: {0}")]
    Json(#[from] serde_json::Error),
    #[error("dataset store: {0}")]
    Io(String),
}

/// A prompt of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    pub id: i64,
    pub messages: Vec<ChatMessage>,
    /// The expected answer, where the dataset has one (exact-match accuracy).
    pub label: Option<String>,
}

/// What a teacher answered to one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherOutput {
    pub content: String,
    /// The teacher's reasoning (`reasoning_content`), where it returns one.
    pub reasoning: Option<String>,
    /// Whether the teacher ended its answer itself (finish reason `stop`).
    pub stopped: bool,
    /// Token-level KD: the teacher's tokens, in the student's vocabulary.
    pub token_ids: Option<Vec<u32>>,
    /// Token-level KD: top-k `(id, logprob)` per token.
    pub top_logprobs: Option<Vec<Vec<(u32, f32)>>>,
}

/// Where a refresh job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    /// The candidate failed the gate.
    Rejected,
    Failed,
    Cancelled,
}

impl JobState {
    /// The state's name, in the store, the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Rejected => "rejected",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether the job has ended.
    pub fn is_finished(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// The step a refresh job is in, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Queued,
    Prepare,
    Teacher,
    Training,
    Export,
    Evaluate,
    Promote,
}

impl Stage {
    /// The stage's name, in the store and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::Prepare => "prepare",
            Stage::Teacher => "teacher",
            Stage::Training => "training",
            Stage::Export => "export",
            Stage::Evaluate => "evaluate",
            Stage::Promote => "promote",
        }
    }
}

/// A name written by [`JobState::as_str`] or [`Stage::as_str`], read back from a row.
fn named<T: serde::de::DeserializeOwned>(column: usize, name: String) -> rusqlite::Result<T> {
    use serde::de::IntoDeserializer;
    let de: serde::de::value::StringDeserializer<serde::de::value::Error> = name.into_deserializer();
    T::deserialize(de)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e)))
}

/// A refresh job's durable record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRecord {
    pub id: String,
    pub model: String,
    pub state: JobState,
    /// The step it is in (or ended in).
    pub stage: Stage,
    pub spec: Value,
    /// Stage progress, losses, evaluation, outcome.
    pub result: Value,
    pub error: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
}

impl JobRecord {
    /// Whether the job has ended.
    pub fn is_finished(&self) -> bool {
        self.state.is_finished()
    }
}

/// Makes the store readable by its owner only: a new file is created so, an existing one (and
/// its WAL files, which SQLite creates with the same mode) loses other users' access.
fn owner_only(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let file = Path::new(&name);
        if let Ok(meta) = std::fs::metadata(file)
            && meta.permissions().mode() & 0o077 != 0
        {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| StoreError::Io(format!("{}: {e}", file.display())))?;
            tracing::info!(file = %file.display(), "dataset store made readable by its owner only");
        }
    }
    Ok(())
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY,
    dataset TEXT NOT NULL,
    messages TEXT NOT NULL,
    label TEXT,
    created_at INTEGER NOT NULL,
    UNIQUE (dataset, messages)
);
CREATE TABLE IF NOT EXISTS teacher_outputs (
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    teacher TEXT NOT NULL,
    output TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (prompt_id, teacher)
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    stage TEXT NOT NULL,
    spec TEXT NOT NULL,
    result TEXT NOT NULL,
    error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    candidate TEXT NOT NULL,
    metrics TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
";

/// The store; one connection behind a mutex (every statement is short).
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (or creates) the store at `path`. Jobs a previous process left running are marked
    /// failed: their process is gone.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        owner_only(path)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute(
            "UPDATE jobs SET state = 'failed', updated_at = ?1,
                 error = 'interrupted: the server stopped during stage ' || stage
             WHERE state IN ('queued', 'running')",
            params![now()],
        )?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds prompts to `dataset` in one transaction; a prompt already there is kept once.
    /// Returns how many were new.
    pub fn add_prompts(
        &self,
        dataset: &str,
        prompts: &[(Vec<ChatMessage>, Option<String>)],
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut added = 0;
        {
            let mut insert = tx.prepare(
                "INSERT OR IGNORE INTO prompts (dataset, messages, label, created_at) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (messages, label) in prompts {
                added += insert.execute(params![dataset, serde_json::to_string(messages)?, label, now()])?;
            }
        }
        tx.commit()?;
        Ok(added)
    }

    /// The prompts of `dataset`, oldest first.
    pub fn prompts(&self, dataset: &str) -> Result<Vec<Prompt>, StoreError> {
        let conn = self.conn();
        let mut query = conn.prepare("SELECT id, messages, label FROM prompts WHERE dataset = ?1 ORDER BY id")?;
        let rows = query.query_map(params![dataset], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })?;
        rows.map(|row| {
            let (id, messages, label) = row?;
            Ok(Prompt {
                id,
                messages: serde_json::from_str(&messages)?,
                label,
            })
        })
        .collect()
    }

    /// Up to `limit` prompts of `dataset` from the `offset`-th on (oldest first), and how many
    /// it holds in all.
    pub fn prompts_page(&self, dataset: &str, offset: usize, limit: usize) -> Result<(Vec<Prompt>, usize), StoreError> {
        let conn = self.conn();
        let total: i64 = conn.query_row(
            "SELECT COUNT(*) FROM prompts WHERE dataset = ?1",
            params![dataset],
            |r| r.get(0),
        )?;
        let mut query =
            conn.prepare("SELECT id, messages, label FROM prompts WHERE dataset = ?1 ORDER BY id LIMIT ?2 OFFSET ?3")?;
        let rows = query.query_map(params![dataset, limit as i64, offset as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })?;
        let page = rows
            .map(|row| {
                let (id, messages, label) = row?;
                Ok(Prompt {
                    id,
                    messages: serde_json::from_str(&messages)?,
                    label,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok((page, total as usize))
    }

    /// Deletes `dataset`'s prompts and the teacher outputs kept for them; returns how many
    /// prompts went.
    pub fn delete_dataset(&self, dataset: &str) -> Result<usize, StoreError> {
        self.delete_prompts("dataset = ?1", params![dataset])
    }

    /// Deletes the prompts of datasets named `prefix...` stored before `before` (seconds since
    /// the epoch), with their teacher outputs; returns how many went.
    pub fn delete_older(&self, prefix: &str, before: u64) -> Result<usize, StoreError> {
        let pattern = format!("{}%", prefix.replace('%', "\\%").replace('_', "\\_"));
        self.delete_prompts(
            "dataset LIKE ?1 ESCAPE '\\' AND created_at < ?2",
            params![pattern, before as i64],
        )
    }

    fn delete_prompts(&self, filter: &str, args: &[&dyn rusqlite::ToSql]) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            &format!("DELETE FROM teacher_outputs WHERE prompt_id IN (SELECT id FROM prompts WHERE {filter})"),
            args,
        )?;
        let deleted = tx.execute(&format!("DELETE FROM prompts WHERE {filter}"), args)?;
        tx.commit()?;
        Ok(deleted)
    }

    /// Every dataset with its number of prompts.
    pub fn datasets(&self) -> Result<Vec<(String, usize)>, StoreError> {
        let conn = self.conn();
        let mut query = conn.prepare("SELECT dataset, COUNT(*) FROM prompts GROUP BY dataset ORDER BY dataset")?;
        let rows = query.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A cached teacher output for `prompt_id` from the teacher identified by `teacher`.
    pub fn teacher_output(&self, prompt_id: i64, teacher: &str) -> Result<Option<TeacherOutput>, StoreError> {
        let conn = self.conn();
        let text: Option<String> = conn
            .query_row(
                "SELECT output FROM teacher_outputs WHERE prompt_id = ?1 AND teacher = ?2",
                params![prompt_id, teacher],
                |r| r.get(0),
            )
            .optional()?;
        Ok(text.map(|t| serde_json::from_str(&t)).transpose()?)
    }

    /// Records a teacher output (replacing an older one from the same teacher).
    pub fn put_teacher_output(&self, prompt_id: i64, teacher: &str, output: &TeacherOutput) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO teacher_outputs (prompt_id, teacher, output, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![prompt_id, teacher, serde_json::to_string(output)?, now()],
        )?;
        Ok(())
    }

    /// Records a new job as queued.
    pub fn create_job(&self, id: &str, model: &str, spec: &Value) -> Result<(), StoreError> {
        let t = now();
        self.conn().execute(
            "INSERT INTO jobs (id, model, state, stage, spec, result, created_at, updated_at)
             VALUES (?1, ?2, 'queued', 'queued', ?3, '{}', ?4, ?4)",
            params![id, model, spec.to_string(), t],
        )?;
        Ok(())
    }

    /// Updates a job's state, stage, result and error.
    pub fn update_job(
        &self,
        id: &str,
        state: JobState,
        stage: Stage,
        result: &Value,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE jobs SET state = ?2, stage = ?3, result = ?4, error = ?5, updated_at = ?6 WHERE id = ?1",
            params![id, state.as_str(), stage.as_str(), result.to_string(), error, now()],
        )?;
        Ok(())
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let conn = self.conn();
        let mut query = conn.prepare(&format!("{JOB_COLUMNS} WHERE id = ?1"))?;
        query.query_row(params![id], job_row).optional()?.transpose()
    }

    /// The newest jobs first, at most `limit`.
    pub fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        let conn = self.conn();
        let mut query = conn.prepare(&format!("{JOB_COLUMNS} ORDER BY created_at DESC, rowid DESC LIMIT ?1"))?;
        let rows = query.query_map(params![limit as i64], job_row)?;
        rows.map(|r| r?).collect()
    }

    /// Records the evaluation of one candidate (`current` or `candidate`) of a job.
    pub fn add_evaluation(&self, job_id: &str, candidate: &str, metrics: &Value) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO evaluations (job_id, candidate, metrics, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![job_id, candidate, metrics.to_string(), now()],
        )?;
        Ok(())
    }
}

const JOB_COLUMNS: &str = "SELECT id, model, state, stage, spec, result, error, created_at, updated_at FROM jobs";

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<JobRecord, StoreError>> {
    let spec: String = r.get(4)?;
    let result: String = r.get(5)?;
    let parse = |s: &str| serde_json::from_str::<Value>(s).map_err(StoreError::from);
    let (spec, result) = match (parse(&spec), parse(&result)) {
        (Ok(s), Ok(res)) => (s, res),
        (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
    };
    Ok(Ok(JobRecord {
        id: r.get(0)?,
        model: r.get(1)?,
        state: named(2, r.get(2)?)?,
        stage: named(3, r.get(3)?)?,
        spec,
        result,
        error: r.get(6)?,
        created_at: r.get::<_, i64>(7)? as u64,
        updated_at: r.get::<_, i64>(8)? as u64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage {
            role: "user".into(),
            content: text.into(),
        }]
    }

    #[test]
    fn old_captures_expire_with_their_teacher_outputs_and_other_datasets_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.sqlite3")).unwrap();
        store.add_prompts("capture/m", &[(user("captured"), None)]).unwrap();
        store
            .add_prompts("capture_x", &[(user("not a capture"), None)])
            .unwrap();
        store.add_prompts("notes", &[(user("uploaded"), None)]).unwrap();
        let id = store.prompts("capture/m").unwrap()[0].id;
        let output = TeacherOutput {
            content: "A".into(),
            reasoning: None,
            stopped: true,
            token_ids: None,
            top_logprobs: None,
        };
        store.put_teacher_output(id, "t", &output).unwrap();
        assert_eq!(store.delete_older("capture/", now() - 3600).unwrap(), 0, "not old yet");
        assert_eq!(store.delete_older("capture/", now() + 1).unwrap(), 1);
        assert!(store.prompts("capture/m").unwrap().is_empty());
        assert_eq!(store.prompts("capture_x").unwrap().len(), 1, "`_` is no wildcard");
        assert_eq!(store.delete_dataset("notes").unwrap(), 1);
        assert_eq!(store.datasets().unwrap().len(), 1);
        let (page, total) = store.prompts_page("capture_x", 0, 0).unwrap();
        assert_eq!((page.len(), total), (0, 1));
    }

    #[test]
    fn prompts_are_kept_once_and_teacher_outputs_are_cached() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.sqlite")).unwrap();
        let batch = vec![(user("a"), None), (user("b"), Some("B".into())), (user("a"), None)];
        assert_eq!(store.add_prompts("d", &batch).unwrap(), 2);
        assert_eq!(store.add_prompts("d", &batch).unwrap(), 0);
        let prompts = store.prompts("d").unwrap();
        assert_eq!(prompts.len(), 2);
        assert_eq!(prompts[1].label.as_deref(), Some("B"));
        assert_eq!(store.datasets().unwrap(), vec![("d".to_string(), 2)]);
        let out = TeacherOutput {
            content: "x".into(),
            reasoning: None,
            stopped: true,
            token_ids: Some(vec![1, 2]),
            top_logprobs: Some(vec![vec![(1, -0.5)], vec![(2, -0.1)]]),
        };
        store.put_teacher_output(prompts[0].id, "t", &out).unwrap();
        assert_eq!(store.teacher_output(prompts[0].id, "t").unwrap(), Some(out));
        assert_eq!(store.teacher_output(prompts[0].id, "other").unwrap(), None);
    }

    #[test]
    fn jobs_left_running_are_failed_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        {
            let store = Store::open(&path).unwrap();
            store.create_job("j1", "m", &serde_json::json!({"steps": 3})).unwrap();
            store
                .update_job("j1", JobState::Running, Stage::Training, &serde_json::json!({}), None)
                .unwrap();
            store.create_job("j2", "m", &serde_json::json!({})).unwrap();
            store
                .update_job(
                    "j2",
                    JobState::Succeeded,
                    Stage::Promote,
                    &serde_json::json!({"version": 2}),
                    None,
                )
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let j1 = store.job("j1").unwrap().unwrap();
        assert_eq!(j1.state, JobState::Failed);
        assert_eq!(
            j1.error.as_deref(),
            Some("interrupted: the server stopped during stage training")
        );
        assert_eq!(store.job("j2").unwrap().unwrap().state, JobState::Succeeded);
        assert_eq!(store.jobs(10).unwrap().len(), 2);
        assert!(store.job("nope").unwrap().is_none());
    }
}
