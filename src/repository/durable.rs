//! Writes that survive a power cut: a version folder is synced file by file before it is
//! renamed into place, and small records are written beside, synced, renamed, and their folder
//! synced, so after a crash a reader finds the old or the new content, never a torn one.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Syncs every file under `dir`, then every folder (deepest first), then `dir` itself.
pub fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path)?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Syncs a folder's entries (a rename or a new file in it).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(".tmp");
    let tmp = parent.join(tmp_name);
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_sync_and_atomic_writes_replace_whole() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), "x").unwrap();
        sync_tree(dir.path()).unwrap();
        let record = dir.path().join("serving_version");
        write_atomic(&record, b"1\n").unwrap();
        write_atomic(&record, b"22\n").unwrap();
        assert_eq!(std::fs::read_to_string(&record).unwrap(), "22\n");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "no temporary file left: {left:?}");
    }
}
