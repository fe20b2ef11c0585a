//! Files the server re-reads while it runs (API keys, the admin token, TLS certificates): a
//! [`Watched`] value is parsed from its file at start, then a task compares the file's bytes
//! every [`RELOAD_INTERVAL`] and swaps in the new value when they change. A file that fails to
//! parse is logged and the old value kept, so a half-written rotation never locks clients out.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};

/// How often watched files are compared with what was loaded.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Turns a file's bytes into its value, given the value it replaces (none at start).
pub type Parser<T> = Arc<dyn Fn(&[u8], Option<&T>) -> Result<T> + Send + Sync>;

/// A value read from files, replaced when they change; cloning shares it.
pub struct Watched<T> {
    current: Arc<RwLock<Arc<T>>>,
}

impl<T> Clone for Watched<T> {
    fn clone(&self) -> Self {
        Self {
            current: Arc::clone(&self.current),
        }
    }
}

impl<T: Send + Sync + 'static> Watched<T> {
    /// A value that never changes.
    pub fn fixed(value: T) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(value))),
        }
    }

    /// Parses `paths` (their bytes, concatenated with a NUL between) now — an error here stops
    /// the server — and, on a tokio runtime, re-reads them every [`RELOAD_INTERVAL`].
    pub fn load(what: &'static str, paths: Vec<PathBuf>, parse: Parser<T>) -> Result<Self> {
        let bytes = read_all(&paths)?;
        let value = parse(&bytes, None).with_context(|| format!("loading the {what} from {}", list(&paths)))?;
        let watched = Self::fixed(value);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let current = Arc::downgrade(&watched.current);
            runtime.spawn(async move {
                let mut loaded = bytes;
                loop {
                    tokio::time::sleep(RELOAD_INTERVAL).await;
                    let Some(current) = current.upgrade() else { return };
                    let Ok(bytes) = read_all(&paths) else { continue };
                    if bytes == loaded {
                        continue;
                    }
                    let previous = Arc::clone(&current.read().unwrap_or_else(|p| p.into_inner()));
                    match parse(&bytes, Some(&previous)) {
                        Ok(value) => {
                            *current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
                            tracing::info!(files = %list(&paths), "{what} reloaded");
                        }
                        Err(e) => {
                            tracing::warn!(files = %list(&paths), "{what} not reloaded, keeping the old one: {e:#}")
                        }
                    }
                    loaded = bytes;
                }
            });
        }
        Ok(watched)
    }

    /// The value now.
    pub fn get(&self) -> Arc<T> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    for path in paths {
        bytes.extend(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
        bytes.push(0);
    }
    Ok(bytes)
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Warns when a file holding secrets can be read by other users (as ssh does for its keys).
pub fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            "this file holds secrets and other users can read it; chmod 600 it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.txt");
        std::fs::write(&path, "1").unwrap();
        let parse: Parser<u32> = Arc::new(|b: &[u8], _: Option<&u32>| {
            let text = std::str::from_utf8(b)?.trim_end_matches('\0');
            Ok(text.parse()?)
        });
        let watched = Watched::load("number", vec![path.clone()], parse).unwrap();
        assert_eq!(*watched.get(), 1);
        std::fs::write(&path, "2").unwrap();
        tokio::time::sleep(RELOAD_INTERVAL * 3).await;
        assert_eq!(*watched.get(), 2);
        std::fs::write(&path, "not a number").unwrap();
        tokio::time::sleep(RELOAD_INTERVAL * 3).await;
        assert_eq!(*watched.get(), 2);
    }
}
