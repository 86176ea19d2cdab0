//! Turns a citizen id into the keyed hash that is the only form ever kept, and mints
//! booking ids that carry the citizen's tag sealed inside.

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes128;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::ids::{BookingId, CitizenKey, CitizenTag};

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

/// Booking (and hold) ids: AES-128 of (citizen tag ‖ 64 random bits) under a key
/// derived from the citizen hash key. The store keys bookings by tag then id, so a
/// citizen's bookings are one range scan and a booking is found from its id alone
/// (decrypt → tag), with one write per booking and no secondary index. Outsiders see
/// 128 random-looking bits: ids cannot be guessed, nor linked to each other.
pub struct BookingIds {
    cipher: Aes128,
}

impl BookingIds {
    pub fn new(key: &[u8; 32]) -> Result<Self, hmac::digest::InvalidLength> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)?;
        mac.update(b"prenota booking id permutation v1");
        let derived = mac.finalize().into_bytes();
        Ok(Self {
            cipher: Aes128::new(derived[..16].into()),
        })
    }

    pub fn mint(&self, citizen: CitizenKey) -> BookingId {
        let mut block = [0u8; 16];
        block[..8].copy_from_slice(&citizen.tag().0);
        block[8..].copy_from_slice(&rand::random::<[u8; 8]>());
        let mut block = block.into();
        self.cipher.encrypt_block(&mut block);
        BookingId(u128::from_be_bytes(block.into()))
    }

    /// The tag sealed in an id (any 128 bits decrypt to some tag; a made-up id then
    /// simply finds nothing).
    pub fn tag_of(&self, booking_id: BookingId) -> CitizenTag {
        let mut block = booking_id.0.to_be_bytes().into();
        self.cipher.decrypt_block(&mut block);
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&block[..8]);
        CitizenTag(tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booking_ids_carry_the_citizen_tag_and_differ_every_time() {
        let ids = BookingIds::new(&[1; 32]).unwrap();
        let citizen = CitizenHasher::new(&[1; 32])
            .unwrap()
            .hash("RSSMRA80A01H501U");
        let (first, second) = (ids.mint(citizen), ids.mint(citizen));
        assert_ne!(first, second);
        assert_eq!(ids.tag_of(first), citizen.tag());
        assert_eq!(ids.tag_of(second), citizen.tag());
        assert_ne!(
            first.0 >> 64,
            second.0 >> 64,
            "no visible common prefix links two ids of one citizen"
        );
        let other_key = BookingIds::new(&[2; 32]).unwrap();
        assert_ne!(other_key.tag_of(first), citizen.tag());
    }

    #[test]
    fn same_id_same_key_other_key_other_hash() {
        let a = CitizenHasher::new(&[1; 32]).unwrap();
        let b = CitizenHasher::new(&[2; 32]).unwrap();
        assert_eq!(a.hash("RSSMRA80A01H501U"), a.hash("RSSMRA80A01H501U"));
        assert_ne!(a.hash("RSSMRA80A01H501U"), a.hash("RSSMRA80A01H501V"));
        assert_ne!(a.hash("RSSMRA80A01H501U"), b.hash("RSSMRA80A01H501U"));
    }
}
