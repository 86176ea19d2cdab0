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
use crate::store::backup::{BackupSummary, Frame, Reader, Trust};
use crate::store::key_file::{self, KEY_LENGTH};
use crate::store::Store;

impl Engine {
    /// Whether a backup key is configured (backups need one).
    pub fn makes_backups(&self) -> bool {
        self.backup_key.is_some()
    }

    /// Writes a consistent backup to `out` while the engine serves (see
    /// `store::backup`). Blocking: run it on a blocking thread.
    pub fn backup(&self, out: impl Write) -> Result<BackupSummary, ServiceError> {
        let backup_key = self
            .backup_key
            .as_deref()
            .ok_or(ServiceError::BackupKeyMissing)?;
        Ok(self.store.backup(
            &self.citizen_hash_key,
            self.now_unix_ms(),
            out,
            (
                self.limits.backup_changes_buffered_max,
                self.limits.backup_changes_buffered_bytes_max,
            ),
            backup_key,
        )?)
    }
}

/// What a restore put back.
#[derive(Clone, Debug)]
pub struct RestoreSummary {
    pub records: u64,
    pub data_dir: PathBuf,
}

fn open_backup(path: &Path, trust: Trust<'_>) -> Result<Reader<BufReader<File>>, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    Reader::new(BufReader::with_capacity(1 << 20, file), trust)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The citizen hash key a backup's header holds: in clear (versions 1 and 2), or
/// sealed under the backup key (`None` when read without it).
fn header_key(header: Frame, trust: Trust<'_>) -> Result<Option<Vec<u8>>, String> {
    match header {
        Frame::Header {
            citizen_hash_key, ..
        } => Ok(Some(citizen_hash_key)),
        Frame::SealedHeader {
            backup_key_id,
            nonce,
            sealed_citizen_hash_key,
            ..
        } => {
            let Some(key) = trust.key else {
                return Ok(None);
            };
            if backup_key_id != key.id() {
                return Err("the backup was made with another backup key".into());
            }
            let opened = key.open(&nonce, &sealed_citizen_hash_key);
            let altered = "the backup was altered: its sealed key does not open";
            opened.map(Some).ok_or_else(|| altered.to_string())
        }
        _ => Err("the backup is damaged: it has no header".into()),
    }
}

/// Reads the whole backup once: magic, frames, record count, and its MAC (or, for an
/// accepted unauthenticated file, its checksum). Returns the citizen hash key (`None`
/// for a sealed backup read without its backup key: structure only) and the record
/// count.
pub fn verify_backup(
    path: &Path,
    trust: Trust<'_>,
) -> Result<(Option<[u8; KEY_LENGTH]>, u64), String> {
    let mut reader = open_backup(path, trust)?;
    let damaged = |e: String| format!("{}: {e}", path.display());
    let proven = reader.proven();
    let header = reader.next_frame().map_err(damaged)?;
    let header = header.ok_or_else(|| damaged("the backup has no header".into()))?;
    let key = match header_key(header, trust).map_err(damaged)? {
        // Only a proven file gives a key to restore with.
        Some(key) if proven => Some(key.try_into().map_err(|_| {
            damaged("the backup is damaged: its citizen hash key has the wrong length".into())
        })?),
        _ => None,
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
pub fn restore(
    path: &Path,
    data_dir: &Path,
    config: &Config,
    trust: Trust<'_>,
) -> Result<RestoreSummary, String> {
    let (key, records) = verify_backup(path, trust)?;
    let key = key.ok_or_else(|| {
        format!(
            "{} is sealed with a backup key: give it with --backup-key FILE",
            path.display()
        )
    })?;
    refuse_another_hash_key(config, &key, path)?;
    crate::store::refuse_a_file(data_dir)?;
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
    let restored = build(path, &staging, &key, config, trust).and_then(|()| {
        if data_dir.exists() {
            std::fs::remove_dir(data_dir).map_err(|e| match e.kind() {
                std::io::ErrorKind::DirectoryNotEmpty => format!(
                    "{} is no longer empty (did a server start on it meanwhile?): \
                         nothing was restored into it",
                    data_dir.display()
                ),
                _ => format!("removing the empty {}: {e}", data_dir.display()),
            })?;
        }
        crate::store::files::rename_durably(&staging, data_dir).map_err(|e| {
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

/// A restore for a server whose hash key is `[citizens] hash_key_file` must be of a
/// backup made with that key: compared here, as a restored store that never recorded
/// its key's check (older stores) would take the configured one as its own.
fn refuse_another_hash_key(config: &Config, key: &[u8; 32], path: &Path) -> Result<(), String> {
    use subtle::ConstantTimeEq;
    match &config.citizen_hash_key {
        Some(configured) if !bool::from(configured.ct_eq(key)) => Err(format!(
            "the key of [citizens] hash_key_file is not the citizen-hash key {} was made \
             with: with it no restored booking could be found. Restore with the \
             configuration of the server the backup was taken from",
            path.display()
        )),
        _ => Ok(()),
    }
}

/// Writes the key (unless the server's comes from `hash_key_file`) and the records into
/// `staging`, then recovers it once.
fn build(
    path: &Path,
    staging: &Path,
    key: &[u8; 32],
    config: &Config,
    trust: Trust<'_>,
) -> Result<(), String> {
    std::fs::create_dir_all(staging).map_err(|e| format!("creating {}: {e}", staging.display()))?;
    if config.citizen_hash_key.is_none() {
        key_file::write_new(staging, key).map_err(|e| e.to_string())?;
    }
    {
        let mut store = Store::open(staging, &config.limits).map_err(|e| e.to_string())?;
        let mut reader = open_backup(path, trust)?;
        // Verified above; a file that changed since fails its checksum again here.
        while let Some(frame) = reader.next_frame()? {
            if let Some(changes) = frame.into_changes() {
                store.restore_records(changes).map_err(|e| e.to_string())?;
            }
        }
        store.sync_direct_writes().map_err(|e| e.to_string())?;
        // A restored log may be rewound: gateways must see it is not the one they read.
        store
            .put_event_log_id(&rand::random::<[u8; 16]>())
            .map_err(|e| e.to_string())?;
        store.shutdown().map_err(|e| e.to_string())?;
    }
    let mut engine = Engine::open(staging, config, crate::service::clock::Clock::system())
        .map_err(|e| format!("the restored store fails recovery: {e}"))?;
    engine
        .shutdown()
        .map_err(|e| format!("the restored store fails recovery: {e}"))
}
