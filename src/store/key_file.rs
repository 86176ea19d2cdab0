//! The citizen-id HMAC key, generated once and kept in the data dir.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use crate::store::error::StoreError;

pub const KEY_FILE_NAME: &str = "citizen-hash.key";
pub const KEY_LENGTH: usize = 32;

/// Reads the key, or creates it (written to a temp file, synced, renamed, dir synced)
/// so a crash never leaves a half-written key that would re-hash every citizen.
pub fn load_or_create(data_dir: &Path) -> Result<[u8; KEY_LENGTH], StoreError> {
    let path = data_dir.join(KEY_FILE_NAME);
    let io =
        |what: &str, e: std::io::Error| StoreError::Io(format!("{what} {}: {e}", path.display()));
    match File::open(&path) {
        Ok(mut file) => {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).map_err(|e| io("reading", e))?;
            bytes.try_into().map_err(|bytes: Vec<u8>| {
                StoreError::Corrupt(format!(
                    "{} holds {} bytes, expected {KEY_LENGTH}",
                    path.display(),
                    bytes.len()
                ))
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; KEY_LENGTH] = rand::random();
            write_new(data_dir, &key)?;
            Ok(key)
        }
        Err(e) => Err(io("opening", e)),
    }
}

/// Writes `key` as the data dir's key file (a restore brings the backup's key back).
pub fn write_new(data_dir: &Path, key: &[u8; KEY_LENGTH]) -> Result<(), StoreError> {
    let path = data_dir.join(KEY_FILE_NAME);
    let io =
        |what: &str, e: std::io::Error| StoreError::Io(format!("{what} {}: {e}", path.display()));
    let temporary = data_dir.join(format!("{KEY_FILE_NAME}.tmp"));
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temporary).map_err(|e| io("creating", e))?;
    file.write_all(key).map_err(|e| io("writing", e))?;
    file.sync_all().map_err(|e| io("syncing", e))?;
    crate::store::rename_durably(&temporary, &path).map_err(|e| io("renaming", e))
}
