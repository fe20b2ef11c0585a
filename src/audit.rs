//! The audit log: one JSON line per admin action and per failed authentication — time, actor
//! (key or token name), client address, action, target, outcome, request id — appended to its
//! own file and fsynced. A writer thread does the file work and syncs once per batch, so a
//! flood of bad keys costs one fsync per batch, not per line. Never prompt or answer text.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;

/// Lines waiting for the writer at most; past it, failed-authentication lines are dropped
/// (and counted in the log) rather than letting a flood grow memory.
const QUEUE: usize = 8192;

/// One audited event.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Who: the key's or token's name, `anonymous` when none was given or none matched.
    pub actor: String,
    /// The client's address, when the transport knows it.
    pub client: Option<SocketAddr>,
    /// What: `load`, `unload`, `reload`, `refresh`, `refresh_finish`, `rollback`,
    /// `dataset_upload`, `dataset_read`, `dataset_delete`, `job_cancel`, `terminology_install`,
    /// `authenticate`.
    pub action: String,
    /// On what: a model, job or dataset name, or the path a failed authentication asked for.
    pub target: String,
    /// `success`, or what went wrong.
    pub outcome: String,
}

/// Where audit lines go; cloning shares the writer.
#[derive(Clone)]
pub struct Audit {
    lines: Option<SyncSender<String>>,
}

impl Audit {
    /// An audit log that writes nothing (tests, and `--audit-log ""`).
    pub fn off() -> Self {
        Self { lines: None }
    }

    /// Appends to `path` (created readable by its owner only), from a writer thread.
    pub fn open(path: &Path) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening the audit log {}", path.display()))?;
        let (tx, rx) = sync_channel::<String>(QUEUE);
        let shown: PathBuf = path.to_owned();
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = first;
                    while let Ok(more) = rx.try_recv() {
                        batch.push_str(&more);
                    }
                    if let Err(e) = file.write_all(batch.as_bytes()).and_then(|()| file.sync_data()) {
                        tracing::error!(file = %shown.display(), "audit log write failed: {e}");
                    }
                }
            })
            .context("starting the audit writer")?;
        Ok(Self { lines: Some(tx) })
    }

    /// Records `entry` with the time and the current request's id.
    pub fn record(&self, entry: Entry) {
        let Some(lines) = &self.lines else { return };
        let line = serde_json::json!({
            "time": rfc3339(SystemTime::now()),
            "actor": entry.actor,
            "client": entry.client.map(|c| c.to_string()),
            "action": entry.action,
            "target": entry.target,
            "outcome": entry.outcome,
            "request_id": crate::request_id::current(),
        });
        match lines.try_send(format!("{line}\n")) {
            Ok(()) => {}
            Err(TrySendError::Full(line)) if entry.action != "authenticate" => {
                // Admin actions are few and must be kept: wait for the writer.
                let _ = lines.send(line);
            }
            Err(TrySendError::Full(_)) => {
                tracing::warn!("audit log queue full: a failed authentication was not recorded")
            }
            Err(TrySendError::Disconnected(_)) => tracing::error!("audit writer stopped"),
        }
    }
}

/// `time` as `2026-11-29T04:05:06.789Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_925_106_789);
        assert_eq!(rfc3339(t), "2026-11-29T04:05:06.789Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn entries_are_appended_as_json_lines_readable_by_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit").join("audit.jsonl");
        let audit = Audit::open(&path).unwrap();
        for action in ["load", "unload"] {
            audit.record(Entry {
                actor: "admin".into(),
                client: Some(SocketAddr::from(([127, 0, 0, 1], 9))),
                action: action.into(),
                target: "m".into(),
                outcome: "success".into(),
            });
        }
        drop(audit);
        let mut lines = Vec::new();
        for _ in 0..100 {
            lines = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(String::from)
                .collect();
            if lines.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["action"], "load");
        assert_eq!(first["client"], "127.0.0.1:9");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
