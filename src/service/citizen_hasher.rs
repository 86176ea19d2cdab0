//! Turns a citizen id into the keyed hash that is the only form ever kept.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::ids::CitizenKey;

pub struct CitizenHasher {
    /// Keyed once; cloned per hash so hashing needs no lock.
    mac: Hmac<Sha256>,
}

impl CitizenHasher {
    pub fn new(key: &[u8; 32]) -> Result<Self, hmac::digest::InvalidLength> {
        Ok(Self {
            mac: <Hmac<Sha256> as Mac>::new_from_slice(key)?,
        })
    }

    pub fn hash(&self, citizen_id: &str) -> CitizenKey {
        let mut mac = self.mac.clone();
        mac.update(citizen_id.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        CitizenKey(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_id_same_key_other_key_other_hash() {
        let a = CitizenHasher::new(&[1; 32]).unwrap();
        let b = CitizenHasher::new(&[2; 32]).unwrap();
        assert_eq!(a.hash("RSSMRA80A01H501U"), a.hash("RSSMRA80A01H501U"));
        assert_ne!(a.hash("RSSMRA80A01H501U"), a.hash("RSSMRA80A01H501V"));
        assert_ne!(a.hash("RSSMRA80A01H501U"), b.hash("RSSMRA80A01H501U"));
    }
}
