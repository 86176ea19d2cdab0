//! Turns a citizen id into the keyed hash that is the only form ever kept, and mints
//! booking ids that carry the citizen's tag sealed inside.

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes128;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use std::sync::atomic::{AtomicU32, Ordering};

use crate::domain::hold::{hold_second, HoldId};
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

/// Booking (and hold) ids: AES-128 of (citizen tag ‖ 64 more bits) under a key derived
/// from the citizen hash key. The store keys bookings by tag then id, so a citizen's
/// bookings are one range scan and a booking is found from its id alone (decrypt →
/// tag), with one write per booking and no secondary index. Outsiders see 128
/// random-looking bits: ids cannot be guessed, nor linked to each other.
///
/// A booking's 64 bits are random. A hold's are the second it was made
/// (`domain::hold::hold_second`) then a counter: the store keeps holds in the order they
/// were made (`store::records::hold_key`), so a churn of short-lived holds writes and
/// deletes at the two ends of one range instead of all over the tree, and a hold is
/// still found from its id alone (decrypt → second).
pub struct BookingIds {
    cipher: Aes128,
    /// The low half of a hold id's second half: unique among the holds one process
    /// makes in one second (2^32 of them). Starts at random; an id an earlier process
    /// made in the same second is passed over by `Engine::fresh_hold_id`.
    hold_counter: AtomicU32,
}

impl BookingIds {
    pub fn new(key: &[u8; 32]) -> Result<Self, hmac::digest::InvalidLength> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)?;
        mac.update(b"prenota booking id permutation v1");
        let derived = mac.finalize().into_bytes();
        Ok(Self {
            cipher: Aes128::new(derived[..16].into()),
            hold_counter: AtomicU32::new(rand::random()),
        })
    }

    /// A booking id (of a booking made without a hold, a dose, a registration).
    pub fn mint(&self, citizen: CitizenKey) -> BookingId {
        self.seal(citizen, rand::random())
    }

    /// The id of a hold made at `created_at_unix_ms` (the hold record's own time).
    pub fn mint_hold(&self, citizen: CitizenKey, created_at_unix_ms: i64) -> HoldId {
        let second = hold_second(created_at_unix_ms);
        let count = self.hold_counter.fetch_add(1, Ordering::Relaxed);
        self.seal(citizen, (u64::from(second) << 32) | u64::from(count))
    }

    fn seal(&self, citizen: CitizenKey, low: u64) -> BookingId {
        let mut block = [0u8; 16];
        block[..8].copy_from_slice(&citizen.tag().0);
        block[8..].copy_from_slice(&low.to_be_bytes());
        let mut block = block.into();
        self.cipher.encrypt_block(&mut block);
        BookingId(u128::from_be_bytes(block.into()))
    }

    fn open(&self, id: BookingId) -> [u8; 16] {
        let mut block = id.0.to_be_bytes().into();
        self.cipher.decrypt_block(&mut block);
        block.into()
    }

    /// The tag sealed in an id (any 128 bits decrypt to some tag; a made-up id then
    /// simply finds nothing).
    pub fn tag_of(&self, booking_id: BookingId) -> CitizenTag {
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&self.open(booking_id)[..8]);
        CitizenTag(tag)
    }

    /// The second sealed in a hold id: where the store keeps the hold (any id opens
    /// to some second; a made-up one, or one of a hold made before hold ids carried
    /// it, then finds nothing there).
    pub fn hold_second_of(&self, hold_id: HoldId) -> u32 {
        let mut second = [0u8; 4];
        second.copy_from_slice(&self.open(hold_id)[8..12]);
        u32::from_be_bytes(second)
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
    fn hold_ids_carry_the_tag_and_their_second_and_never_repeat() {
        let ids = BookingIds::new(&[1; 32]).unwrap();
        let citizen = CitizenHasher::new(&[1; 32])
            .unwrap()
            .hash("RSSMRA80A01H501U");
        let at_ms = 1_780_000_000_123;
        let minted: std::collections::HashSet<HoldId> =
            (0..10_000).map(|_| ids.mint_hold(citizen, at_ms)).collect();
        assert_eq!(
            minted.len(),
            10_000,
            "one citizen, one second: all distinct"
        );
        for id in minted.iter().take(10) {
            assert_eq!(ids.tag_of(*id), citizen.tag());
            assert_eq!(ids.hold_second_of(*id), hold_second(at_ms));
        }
        let later = ids.mint_hold(citizen, at_ms + 1_000);
        assert_eq!(ids.hold_second_of(later), hold_second(at_ms) + 1);
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
