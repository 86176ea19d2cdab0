//! Files made durable: a directory's entries synced, a rename that survives a power
//! loss. A leaf, so every store file (and the commands) can use it.

use std::fs::File;
use std::path::Path;

/// Makes the entries of `dir` (files created, renamed or removed in it) survive a
/// power loss.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// Renames `from` to `to` and syncs the directory holding `to`, so the rename itself
/// survives a power loss (the classic write-temp, fsync, rename, fsync-dir sequence).
pub fn rename_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    match to.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => sync_dir(Path::new(".")),
    }
}
