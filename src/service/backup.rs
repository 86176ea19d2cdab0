//! Backups of a serving engine, and restores that prove the copy sound before it
//! becomes a data dir: every record is checked against the file's checksum, then the
//! restored store goes through the same recovery as a start-up (every invariant), and
//! only then is it renamed into place.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::service::engine::Engine;
use crate::service::error::ServiceError;
use crate::store::backup::{BackupSummary, Frame, Reader};
use crate::store::key_file::{self, KEY_LENGTH};
use crate::store::Store;

impl Engine {
    /// Writes a consistent backup to `out` while the engine serves (see
    /// `store::backup`). Blocking: run it on a blocking thread.
    pub fn backup(&self, out: impl Write) -> Result<BackupSummary, ServiceError> {
        Ok(self.store.backup(
            &self.citizen_hash_key,
            self.now_unix_ms(),
            out,
            (
                self.limits.backup_changes_buffered_max,
                self.limits.backup_changes_buffered_bytes_max,
            ),
        )?)
    }
}

/// What a restore put back.
#[derive(Clone, Debug)]
pub struct RestoreSummary {
    pub records: u64,
    pub data_dir: PathBuf,
}

fn open_backup(path: &Path) -> Result<Reader<BufReader<File>>, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    Reader::new(BufReader::with_capacity(1 << 20, file))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads the whole backup once: magic, frames, record count and checksum. Returns the
/// citizen hash key and the record count.
pub fn verify_backup(path: &Path) -> Result<([u8; KEY_LENGTH], u64), String> {
    let mut reader = open_backup(path)?;
    let damaged = |e: String| format!("{}: {e}", path.display());
    let key = match reader.next_frame().map_err(damaged)? {
        Some(Frame::Header {
            citizen_hash_key, ..
        }) => citizen_hash_key.try_into().map_err(|_| {
            damaged("the backup is damaged: its citizen hash key has the wrong length".into())
        })?,
        _ => return Err(damaged("the backup is damaged: it has no header".into())),
    };
    let mut records = 0u64;
    while let Some(frame) = reader.next_frame().map_err(damaged)? {
        match frame {
            Frame::Records(_) | Frame::Changes(_) => records += frame.records(),
            _ => return Err(damaged("the backup is damaged: a second header".into())),
        }
    }
    Ok((key, records))
}

/// Restores the backup at `path` into `data_dir`, which must not exist or be empty.
/// The copy is built beside it (`<data_dir>.restoring`), recovered like a start-up
/// (refused if it breaks an invariant), then renamed into place. Nothing is left behind
/// on failure except what was there before.
pub fn restore(path: &Path, data_dir: &Path, config: &Config) -> Result<RestoreSummary, String> {
    let (key, records) = verify_backup(path)?;
    if let Ok(mut entries) = std::fs::read_dir(data_dir) {
        if entries.next().is_some() {
            return Err(format!(
                "{} is not empty: restore only into a new or empty data dir (move the old \
                 one aside first)",
                data_dir.display()
            ));
        }
    }
    let name = data_dir
        .file_name()
        .ok_or_else(|| format!("{} names no directory", data_dir.display()))?;
    let staging = data_dir.with_file_name(format!("{}.restoring", name.to_string_lossy()));
    if staging.exists() {
        return Err(format!(
            "{} exists, left by an interrupted restore: remove it and run the restore again",
            staging.display()
        ));
    }
    let restored = build(path, &staging, &key, config).and_then(|()| {
        if data_dir.exists() {
            std::fs::remove_dir(data_dir)
                .map_err(|e| format!("removing the empty {}: {e}", data_dir.display()))?;
        }
        crate::store::rename_durably(&staging, data_dir).map_err(|e| {
            format!(
                "renaming {} to {}: {e}",
                staging.display(),
                data_dir.display()
            )
        })
    });
    if let Err(error) = restored {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(error);
    }
    Ok(RestoreSummary {
        records,
        data_dir: data_dir.to_path_buf(),
    })
}

/// Writes the key and the records into `staging`, then recovers it once.
fn build(path: &Path, staging: &Path, key: &[u8; 32], config: &Config) -> Result<(), String> {
    std::fs::create_dir_all(staging).map_err(|e| format!("creating {}: {e}", staging.display()))?;
    key_file::write_new(staging, key).map_err(|e| e.to_string())?;
    {
        let mut store = Store::open(staging, &config.limits).map_err(|e| e.to_string())?;
        let mut reader = open_backup(path)?;
        // Verified above; a file that changed since fails its checksum again here.
        while let Some(frame) = reader.next_frame()? {
            if let Some(changes) = frame.into_changes() {
                store.restore_records(changes).map_err(|e| e.to_string())?;
            }
        }
        store.restore_sync().map_err(|e| e.to_string())?;
        store.shutdown();
    }
    let mut engine = Engine::open(staging, config, crate::service::clock::Clock::system())
        .map_err(|e| format!("the restored store fails recovery: {e}"))?;
    engine.shutdown();
    Ok(())
}
