//! Holds: a place reserved while the citizen completes a form.
//!
//! Holds are durable like bookings: a hold is acknowledged after its record is
//! committed, and its expiry is committed before its place returns. A hold counts
//! against the slot's capacity and against the citizen's limit (as the booking it may
//! become), so one citizen cannot hoard places with holds.

use crate::domain::booking::RequestRecord;
use crate::domain::error::DomainError;
use crate::domain::hold::{hold_second, Hold, HoldId, HoldState};
use crate::domain::ids::{ChannelId, CitizenKey, RequestFingerprint, RequestKey, SlotKey};
use crate::domain::plans;
use crate::service::engine::{Attempt, Engine};
use crate::service::error::ServiceError;

pub struct HoldCommand {
    pub slot: SlotKey,
    pub citizen_id: String,
    pub request: RequestKey,
    /// Already validated against the limits.
    pub ttl_seconds: u32,
    /// The caller's channel: the hold (and the booking it becomes) is made through it.
    pub channel: ChannelId,
}

impl Engine {
    /// Holds one place for `ttl_seconds`. Run it in its own task, like `book`.
    pub async fn hold(&self, command: HoldCommand) -> Result<Hold, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        let slot_text = command.slot.to_string();
        let fingerprint = RequestFingerprint::of(&[
            b"hold",
            slot_text.as_bytes(),
            &citizen.0,
            &command.ttl_seconds.to_be_bytes(),
        ]);
        self.once_per_request(
            (command.request.for_citizen(&citizen), fingerprint),
            Attempt::On(&citizen, &command.slot),
            |request| self.hold_and_commit(&command, citizen, request),
            |hold: &Hold| hold.hold_id,
            |id| self.stored_hold(id),
        )
        .await
    }

    /// A retried HoldSlot's answer: the hold as it is now. One that ended before its
    /// time (its slot closed, or it became a booking) shows when it ended, a time
    /// passed, not a place it no longer holds.
    fn stored_hold(&self, hold_id: HoldId) -> Result<Hold, ServiceError> {
        let mut hold = self
            .hold_record(hold_id)?
            .ok_or(DomainError::NotFound(crate::domain::error::Missing::Hold))?;
        if let HoldState::Expired { at_unix_ms } | HoldState::Confirmed { at_unix_ms } = hold.state
        {
            hold.expires_at_unix_ms = hold.expires_at_unix_ms.min(at_unix_ms);
        }
        Ok(hold)
    }

    /// The id of a hold of `citizen` made at `now_ms`. Within one process hold ids
    /// never repeat (`BookingIds::mint_hold`); one the store already has, as a hold or
    /// as the booking a hold became (made by an earlier process in the same second: a
    /// quick restart, a clock stepped back, a failover to a node whose clock is behind),
    /// is passed over, so no hold or booking is ever overwritten by another.
    pub(super) fn fresh_hold_id(
        &self,
        citizen: CitizenKey,
        now_ms: i64,
    ) -> Result<HoldId, ServiceError> {
        let place = (hold_second(now_ms), citizen.tag());
        loop {
            let id = self.ids.mint_hold(citizen, now_ms);
            if !self.store.id_taken(place, id)? {
                return Ok(id);
            }
            tracing::warn!("a new hold id was already taken; minting another");
        }
    }

    /// The stored record of hold `hold_id`, whatever its state.
    pub(super) fn hold_record(&self, hold_id: HoldId) -> Result<Option<Hold>, ServiceError> {
        let second = self.ids.hold_second_of(hold_id);
        Ok(self.store.hold(second, hold_id)?)
    }

    async fn hold_and_commit(
        &self,
        command: &HoldCommand,
        citizen: CitizenKey,
        request: RequestRecord,
    ) -> Result<Hold, ServiceError> {
        let now_ms = self.now_unix_ms();
        let slot = self.slot_view(&command.slot, (&citizen, &command.channel), now_ms)?;
        let id = self.fresh_hold_id(citizen, now_ms)?;
        let ttl_and_share = (
            command.ttl_seconds,
            self.limits.held_share_of_capacity_max_percent,
        );
        let plan = plans::hold(&slot, citizen, id, request, ttl_and_share, now_ms)?;
        self.execute(plan, || {}).await
    }

    /// The sweeper's step: expires up to `hold_sweep_batch_max` holds whose time is up,
    /// in one durable write, then returns their places. Returns how many expired.
    pub async fn expire_holds(&self, now_unix_ms: i64) -> Result<usize, ServiceError> {
        let due = self
            .live_holds()
            .take_expired(now_unix_ms, self.limits.hold_sweep_batch_max);
        if due.is_empty() {
            return Ok(0);
        }
        let offers: Vec<_> = due
            .iter()
            .filter_map(|hold| {
                // An offer whose accept lost to a closure ends uncounted.
                let closed = self
                    .slot(&hold.slot)
                    .is_ok_and(|slot| slot.counter.snapshot().closed);
                self.campaigns.ending_offer(hold.hold_id, closed)
            })
            .collect();
        let plan = plans::expire(&due, &offers, now_unix_ms);
        self.execute(plan, || {
            let mut live = self.live_holds();
            for hold in &due {
                live.insert(hold.clone());
            }
        })
        .await
    }

    /// Live holds right now (for tests and statistics).
    pub fn live_hold_count(&self) -> usize {
        self.live_holds().len()
    }
}
