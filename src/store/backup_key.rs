//! The backup key: 32 random bytes the operator keeps apart from the backups (a file
//! holding them in hex, made by `prenota backup-key`). A backup file is authenticated
//! with a key derived from it (HMAC-SHA256 over every byte), and the citizen hash key
//! inside is sealed with another (AES-256-GCM): a backup file alone can neither be
//! altered undetected nor give away the key that makes citizen ids recognisable.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use hex::FromHex;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the secret.
const SECRET_LENGTH: usize = 32;

/// The keys derived from one backup secret.
pub struct BackupKey {
    mac: [u8; 32],
    seal: [u8; 32],
    /// Names the secret in a backup's header, so "another key" is told from "altered".
    id: [u8; 8],
}

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackupKey({})", hex::encode(self.id))
    }
}

impl BackupKey {
    pub fn from_secret(secret: &[u8; SECRET_LENGTH]) -> Self {
        let derive = Hkdf::<Sha256>::new(None, secret);
        let key = |label: &[u8], out: &mut [u8]| {
            derive
                .expand(label, out)
                .expect("HKDF output lengths are small");
        };
        let (mut mac, mut seal, mut id) = ([0u8; 32], [0u8; 32], [0u8; 8]);
        key(b"prenota backup mac v1", &mut mac);
        key(b"prenota backup seal v1", &mut seal);
        key(b"prenota backup key id v1", &mut id);
        Self { mac, seal, id }
    }

    /// A new random secret, in hex (what a key file holds).
    pub fn generate_hex() -> String {
        let secret: [u8; SECRET_LENGTH] = rand::random();
        hex::encode(secret)
    }

    /// Reads a key file: 64 hex digits on its first line, readable by its owner only.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the backup key {}: {e}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(format!(
                    "the backup key {} may be read by group or others (mode {:04o}): \
                     chmod 600 it",
                    path.display(),
                    mode & 0o777
                ));
            }
        }
        let hex = text.lines().next().unwrap_or("").trim();
        let secret = parse_hex(hex).ok_or_else(|| {
            format!(
                "{} does not hold a backup key (64 hex digits; make one with \
                 `prenota backup-key`)",
                path.display()
            )
        })?;
        Ok(Self::from_secret(&secret))
    }

    pub fn id(&self) -> [u8; 8] {
        self.id
    }

    /// The MAC that authenticates a backup's bytes.
    pub fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.mac).expect("HMAC takes any key length")
    }

    /// Seals `secret` (the citizen hash key): a fresh nonce and the ciphertext.
    pub fn seal(&self, secret: &[u8]) -> ([u8; 12], Vec<u8>) {
        let nonce: [u8; 12] = rand::random();
        let sealed = self
            .cipher()
            .encrypt(Nonce::from_slice(&nonce), secret)
            .expect("AES-GCM seals any length below 64 GiB");
        (nonce, sealed)
    }

    /// Opens what `seal` sealed; `None` if it was altered or sealed with another key.
    pub fn open(&self, nonce: &[u8; 12], sealed: &[u8]) -> Option<Vec<u8>> {
        self.cipher().decrypt(Nonce::from_slice(nonce), sealed).ok()
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(&self.seal).expect("a 32-byte key")
    }
}

fn parse_hex(text: &str) -> Option<[u8; SECRET_LENGTH]> {
    <[u8; SECRET_LENGTH]>::from_hex(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_only_with_its_backup_key_and_unaltered() {
        let key = BackupKey::from_secret(&[1; 32]);
        let other = BackupKey::from_secret(&[2; 32]);
        assert_ne!(key.id(), other.id());
        let (nonce, mut sealed) = key.seal(&[9; 32]);
        assert_eq!(key.open(&nonce, &sealed), Some(vec![9; 32]));
        assert_eq!(other.open(&nonce, &sealed), None);
        sealed[0] ^= 1;
        assert_eq!(key.open(&nonce, &sealed), None);
        assert!(parse_hex(&BackupKey::generate_hex()).is_some());
        assert!(parse_hex("not hex").is_none());
    }
}
