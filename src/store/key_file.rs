//! The citizen-id HMAC key, generated once and kept in the data dir (mode 0600), and
//! the check value that ties a store to its key: a store refuses to open with a
//! missing or different key, which would make every stored booking unreachable and let
//! every citizen book again. A citizen id is kept only as its HMAC-SHA-256 under this key,
//! cut to 128 bits (`service::citizen_hasher`); a restore writes the backup's key as the
//! new data dir's key file (`service::backup`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::store::error::StoreError;

pub const KEY_FILE_NAME: &str = "citizen-hash.key";
pub const KEY_LENGTH: usize = 32;
/// Bytes of the key check value.
pub const CHECK_LENGTH: usize = 16;

/// The key's check value: an HMAC of a fixed label, so it names the key without
/// revealing it.
pub fn check_value(key: &[u8; KEY_LENGTH]) -> [u8; CHECK_LENGTH] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"prenota citizen-hash key check v1");
    let digest = mac.finalize().into_bytes();
    digest[..CHECK_LENGTH]
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// Reads the key, `None` if there is no key file. Refuses a key file others may read.
pub fn load(data_dir: &Path) -> Result<Option<[u8; KEY_LENGTH]>, StoreError> {
    read(&data_dir.join(KEY_FILE_NAME))
}

/// Reads the key file at `path`, `None` if there is none. Refuses one others may read.
pub fn read(path: &Path) -> Result<Option<[u8; KEY_LENGTH]>, StoreError> {
    let io =
        |what: &str, e: std::io::Error| StoreError::Io(format!("{what} {}: {e}", path.display()));
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("opening", e)),
    };
    check_private(&file, path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| io("reading", e))?;
    let key = bytes.try_into().map_err(|bytes: Vec<u8>| {
        StoreError::Misconfigured(format!(
            "{} holds {} bytes, expected {KEY_LENGTH}",
            path.display(),
            bytes.len()
        ))
    })?;
    Ok(Some(key))
}

/// A new random key, written to the data dir.
pub fn create(data_dir: &Path) -> Result<[u8; KEY_LENGTH], StoreError> {
    let key: [u8; KEY_LENGTH] = rand::random();
    write_new(data_dir, &key)?;
    Ok(key)
}

/// Like ssh with a private key: a key file group or others may read is refused.
fn check_private(file: &File, path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let metadata = file
            .metadata()
            .map_err(|e| StoreError::Io(format!("reading {}: {e}", path.display())))?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(StoreError::Misconfigured(format!(
                "{} has mode {mode:04o}: group or others may read the citizen hash key. \
                 Run `chmod 600 {}` and start again",
                path.display(),
                path.display()
            )));
        }
    }
    Ok(())
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
    crate::store::files::rename_durably(&temporary, &path).map_err(|e| io("renaming", e))
}
