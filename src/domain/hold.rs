//! Holds: a place reserved for a while, as kept on disk, and the live ones in memory.
//!
//! A hold's id is the id its booking gets once confirmed: one id space, so the
//! citizen index counts a hold and the booking it becomes as the same entry.

use std::collections::{BTreeSet, HashMap};

use crate::domain::booking::RequestRecord;
use crate::domain::ids::{BookingId, ChannelId, CitizenKey, SiteId, SlotKey};

/// A hold's id; see the module docs for why it is a booking id.
pub type HoldId = BookingId;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldState {
    /// Counts against the slot's capacity until it is confirmed or expires.
    Live,
    /// Became the booking with the same id.
    Confirmed { at_unix_ms: i64 },
    /// Its place went back to the slot (timed out, or its slot was closed).
    Expired { at_unix_ms: i64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub hold_id: HoldId,
    pub slot: SlotKey,
    pub citizen: CitizenKey,
    pub created_at_unix_ms: i64,
    pub expires_at_unix_ms: i64,
    pub request: RequestRecord,
    pub state: HoldState,
    /// The channel it was made through (the booking it becomes keeps it).
    pub channel: ChannelId,
}

impl Hold {
    /// Whether its time is up at `now_unix_ms`: from then on it cannot be confirmed,
    /// and the sweeper gives its place back.
    pub fn time_is_up(&self, now_unix_ms: i64) -> bool {
        self.expires_at_unix_ms <= now_unix_ms
    }
}

/// Why a hold cannot be confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotConfirmable {
    /// No live hold with this id for this citizen and slot.
    Unknown,
    /// Live, but its time is up; the sweeper returns its place.
    Expired,
}

/// The live holds, by id and by expiry. Whoever removes a hold from here owns it:
/// the confirming booking, the sweeper or a closure, never two of them.
#[derive(Default)]
pub struct LiveHolds {
    by_id: HashMap<HoldId, Hold>,
    by_expiry: BTreeSet<(i64, HoldId)>,
    /// Per slot: live holds plus holds being written (reserved, not yet live). Bounds
    /// how many places of a slot may be held at once (anti-hoarding).
    held_by_slot: HashMap<SlotKey, u32>,
    /// Per citizen, their live holds (a few at most: each counts against their limit),
    /// so a citizen can be shown what they hold.
    by_citizen: HashMap<CitizenKey, Vec<HoldId>>,
}

/// The second a hold made at `created_at_unix_ms` belongs to, modulo 2^32 (wraps in
/// 2106): sealed into its id and the first part of its store key, so holds sit on disk
/// in the order they were made and a hold's key follows from its id.
pub fn hold_second(created_at_unix_ms: i64) -> u32 {
    created_at_unix_ms.div_euclid(1_000) as u32
}

/// At most this many places of a slot of `capacity` may be held at once:
/// max(1, ⌊capacity × percent / 100⌋).
pub fn held_max(capacity: u32, percent: u32) -> u32 {
    let share = u64::from(capacity) * u64::from(percent) / 100;
    u32::try_from(share).unwrap_or(u32::MAX).max(1)
}

impl LiveHolds {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn get(&self, hold_id: HoldId) -> Option<&Hold> {
        self.by_id.get(&hold_id)
    }

    /// A live hold (recovered, or given back after a write that never happened).
    pub fn insert(&mut self, hold: Hold) {
        *self.held_by_slot.entry(hold.slot.clone()).or_insert(0) += 1;
        self.insert_reserved(hold);
    }

    /// A new live hold whose share was reserved (`reserve_share`) before its write.
    pub fn insert_reserved(&mut self, hold: Hold) {
        debug_assert!(self
            .held_by_slot
            .get(&hold.slot)
            .is_some_and(|held| *held >= 1));
        self.by_expiry
            .insert((hold.expires_at_unix_ms, hold.hold_id));
        self.by_citizen
            .entry(hold.citizen)
            .or_default()
            .push(hold.hold_id);
        let replaced = self.by_id.insert(hold.hold_id, hold);
        debug_assert!(replaced.is_none(), "a hold id is live once");
    }

    /// The citizen's live holds, soonest to expire first.
    pub fn of_citizen(&self, citizen: CitizenKey) -> Vec<&Hold> {
        let ids = self.by_citizen.get(&citizen).map_or(&[][..], Vec::as_slice);
        let mut holds: Vec<&Hold> = ids.iter().filter_map(|id| self.by_id.get(id)).collect();
        debug_assert_eq!(holds.len(), ids.len(), "the citizen index lists live holds");
        holds.sort_by_key(|hold| (hold.expires_at_unix_ms, hold.hold_id));
        holds
    }

    /// Whether the per-citizen index lists exactly the live holds, each under its
    /// citizen (recovery checks what it rebuilt).
    pub fn check_citizen_index(&self) -> Result<(), String> {
        let listed: usize = self.by_citizen.values().map(Vec::len).sum();
        let misplaced = self.by_citizen.iter().find(|(citizen, ids)| {
            ids.iter().any(|id| {
                self.by_id
                    .get(id)
                    .is_none_or(|hold| hold.citizen != **citizen)
            })
        });
        match (listed == self.by_id.len(), misplaced) {
            (true, None) => Ok(()),
            (_, Some((_, ids))) => Err(format!(
                "the citizen index of live holds lists a hold not live or of another \
                 citizen among {ids:?}"
            )),
            (false, None) => Err(format!(
                "the citizen index of live holds lists {listed} holds of {} (a hold id \
                 twice)",
                self.by_id.len()
            )),
        }
    }

    /// Reserves one of the `max` places of `slot` that may be held at once; false when
    /// they are all held (or being written).
    pub fn reserve_share(&mut self, slot: &SlotKey, max: u32) -> bool {
        let held = self.held_by_slot.entry(slot.clone()).or_insert(0);
        if *held >= max {
            return false;
        }
        *held += 1;
        true
    }

    /// Gives back a reservation (or a live hold's share, when it leaves the live set).
    pub fn release_share(&mut self, slot: &SlotKey) {
        if let Some(held) = self.held_by_slot.get_mut(slot) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.held_by_slot.remove(slot);
            }
        }
    }

    fn remove(&mut self, hold_id: HoldId) -> Option<Hold> {
        let hold = self.by_id.remove(&hold_id)?;
        self.by_expiry.remove(&(hold.expires_at_unix_ms, hold_id));
        self.release_share(&hold.slot);
        self.forget_of_citizen(hold.citizen, hold_id);
        Some(hold)
    }

    fn forget_of_citizen(&mut self, citizen: CitizenKey, hold_id: HoldId) {
        let ids = self.by_citizen.get_mut(&citizen);
        debug_assert!(ids.is_some(), "a live hold is listed under its citizen");
        if let Some(ids) = ids {
            ids.retain(|id| *id != hold_id);
            if ids.is_empty() {
                self.by_citizen.remove(&citizen);
            }
        }
    }

    /// Takes the hold for confirmation if it is this citizen's hold on this slot and
    /// still within its time.
    pub fn take_for_confirm(
        &mut self,
        hold_id: HoldId,
        citizen: CitizenKey,
        slot: &SlotKey,
        now_unix_ms: i64,
    ) -> Result<Hold, NotConfirmable> {
        match self.by_id.get(&hold_id) {
            Some(hold) if hold.citizen == citizen && hold.slot == *slot => {
                if hold.time_is_up(now_unix_ms) {
                    return Err(NotConfirmable::Expired);
                }
            }
            _ => return Err(NotConfirmable::Unknown),
        }
        self.remove(hold_id).ok_or(NotConfirmable::Unknown)
    }

    /// Takes up to `max` holds whose time is up, oldest first.
    pub fn take_expired(&mut self, now_unix_ms: i64, max: usize) -> Vec<Hold> {
        let due: Vec<HoldId> = self
            .by_expiry
            .iter()
            .take_while(|(expires, _)| *expires <= now_unix_ms)
            .take(max)
            .map(|(_, id)| *id)
            .collect();
        due.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Takes every hold whose slot matches (a closure).
    pub fn take_where(&mut self, mut wanted: impl FnMut(&SlotKey) -> bool) -> Vec<Hold> {
        let ids: Vec<HoldId> = self
            .by_id
            .values()
            .filter(|hold| wanted(&hold.slot))
            .map(|hold| hold.hold_id)
            .collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    // The counts below read `held_by_slot`: one entry per slot with a hold, so a
    // statistics or open-data call costs the held slots, not every live hold, while it
    // holds the lock that HoldSlot and the sweeper wait for. They count holds being
    // written too: their places are taken from the counter already.

    /// Holds per site, for the gauges.
    pub fn count_by_site(&self) -> HashMap<SiteId, u64> {
        let mut counts = HashMap::new();
        for (slot, held) in &self.held_by_slot {
            *counts.entry(slot.site_id.clone()).or_insert(0) += u64::from(*held);
        }
        counts
    }

    /// Holds per slot, of every site.
    pub fn count_by_slot_everywhere(&self) -> HashMap<SlotKey, u32> {
        self.held_by_slot.clone()
    }

    /// Holds per slot of one site, for its statistics.
    pub fn count_by_slot(&self, site_id: &SiteId) -> HashMap<SlotKey, u32> {
        let of_site = self
            .held_by_slot
            .iter()
            .filter(|(slot, _)| slot.site_id == *site_id);
        of_site.map(|(slot, held)| (slot.clone(), *held)).collect()
    }

    /// Holds of these slots.
    pub fn count_of<'a>(&self, slots: impl IntoIterator<Item = &'a SlotKey>) -> u64 {
        let held = slots
            .into_iter()
            .filter_map(|slot| self.held_by_slot.get(slot));
        held.map(|held| u64::from(*held)).sum()
    }
}

/// A live hold for tests: id `id`, citizen `[citizen; 16]`, made at 0, expiring at
/// `expires`, in a slot of site `a` at 1,000 s.
#[cfg(test)]
pub(crate) fn test_hold(id: u128, citizen: u8, expires: i64) -> Hold {
    use crate::domain::ids::{RequestFingerprint, RequestKey, ServiceId};
    Hold {
        hold_id: BookingId(id),
        slot: SlotKey {
            site_id: SiteId::parse("s", "a", 64).unwrap(),
            service_id: ServiceId::parse("s", "vax", 64).unwrap(),
            start_unix_s: 1_000,
        },
        citizen: CitizenKey([citizen; 16]),
        created_at_unix_ms: 0,
        expires_at_unix_ms: expires,
        request: RequestRecord {
            key: RequestKey([0; 16]),
            fingerprint: RequestFingerprint([0; 16]),
        },
        state: HoldState::Live,
        channel: ChannelId::web(),
    }
}

#[cfg(test)]
mod tests {
    use super::test_hold as hold;
    use super::*;

    #[test]
    fn a_citizens_live_holds_are_listed_until_they_leave() {
        let mut live = LiveHolds::default();
        for (id, citizen, expires) in [(1, 7, 900), (2, 8, 500), (3, 7, 300), (4, 7, 600)] {
            live.insert(hold(id, citizen, expires));
        }
        let ids = |live: &LiveHolds, citizen| -> Vec<u128> {
            let holds = live.of_citizen(CitizenKey([citizen; 16]));
            holds.iter().map(|hold| hold.hold_id.0).collect()
        };
        assert_eq!(ids(&live, 7), [3, 4, 1], "soonest to expire first");
        assert_eq!(ids(&live, 8), [2]);
        assert_eq!(live.take_expired(400, 10).len(), 1);
        let slot = hold(4, 7, 600).slot;
        live.take_for_confirm(BookingId(4), CitizenKey([7; 16]), &slot, 450)
            .unwrap();
        assert_eq!(ids(&live, 7), [1], "expired and confirmed ones leave");
        assert_eq!(live.take_where(|_| true).len(), 2);
        assert!(ids(&live, 7).is_empty() && ids(&live, 8).is_empty());
        assert_eq!(live.check_citizen_index(), Ok(()));
        live.by_citizen
            .insert(CitizenKey([9; 16]), vec![BookingId(1)]);
        assert!(live.check_citizen_index().is_err(), "a hold not live");
    }

    #[test]
    fn only_the_holder_confirms_and_only_in_time() {
        let mut live = LiveHolds::default();
        live.insert(hold(1, 7, 500));
        let slot = hold(1, 7, 500).slot;
        assert_eq!(
            live.take_for_confirm(BookingId(1), CitizenKey([8; 16]), &slot, 100),
            Err(NotConfirmable::Unknown)
        );
        assert_eq!(
            live.take_for_confirm(BookingId(1), CitizenKey([7; 16]), &slot, 500),
            Err(NotConfirmable::Expired)
        );
        assert!(live
            .take_for_confirm(BookingId(1), CitizenKey([7; 16]), &slot, 499)
            .is_ok());
        assert!(live.is_empty());
    }

    #[test]
    fn expiry_takes_the_due_ones_oldest_first_and_bounded() {
        let mut live = LiveHolds::default();
        for (id, expires) in [(1, 300), (2, 100), (3, 200), (4, 900)] {
            live.insert(hold(id, id as u8, expires));
        }
        let taken: Vec<u128> = live
            .take_expired(300, 2)
            .iter()
            .map(|h| h.hold_id.0)
            .collect();
        assert_eq!(taken, [2, 3]);
        assert_eq!(live.take_expired(300, 10).len(), 1);
        assert_eq!(live.len(), 1);
    }

    #[test]
    fn the_counts_are_per_held_slot_with_holds_being_written_and_drop_as_holds_leave() {
        let mut live = LiveHolds::default();
        let (here, mut there) = (hold(1, 1, 500), hold(3, 3, 500));
        there.slot.start_unix_s = 2_000;
        live.insert(here.clone());
        live.insert(hold(2, 2, 600));
        live.insert(there.clone());
        assert!(live.reserve_share(&there.slot, 10), "a hold being written");
        let site = &here.slot.site_id;
        assert_eq!(live.count_by_site()[site], 4);
        assert_eq!(live.count_by_slot(site)[&here.slot], 2);
        assert_eq!(live.count_by_slot_everywhere()[&there.slot], 2);
        assert_eq!(live.count_of([&here.slot, &there.slot]), 4);
        live.take_expired(500, 10);
        live.release_share(&there.slot);
        assert_eq!(live.count_of([&here.slot, &there.slot]), 1);
        assert_eq!(
            live.count_by_slot_everywhere().len(),
            1,
            "no entry for an empty slot"
        );
        assert_eq!(live.count_by_site()[site], 1);
    }
}
