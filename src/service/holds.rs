//! Holds: a place reserved while the citizen completes a form.
//!
//! Holds are durable like bookings: a hold is acknowledged after its record is
//! committed, and its expiry is committed before its place returns. A hold counts
//! against the slot's capacity and against the citizen's limit (as the booking it may
//! become), so one citizen cannot hoard places with holds.

use crate::domain::booking::RequestRecord;
use crate::domain::error::DomainError;
use crate::domain::hold::{Hold, HoldId, HoldState};
use crate::domain::ids::{CitizenKey, RequestFingerprint, RequestKey, SlotKey};
use crate::service::{now_unix_ms, refused, Engine, ServiceError};
use crate::store::records::Write;
use crate::store::StoreError;

pub struct HoldCommand {
    pub slot: SlotKey,
    pub citizen_id: String,
    pub request: RequestKey,
    /// Already validated against the limits.
    pub ttl_seconds: u32,
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
            command.request,
            fingerprint,
            |request| self.hold_and_commit(&command, citizen, request),
            |hold: &Hold| hold.hold_id,
            |id| self.stored_hold(id),
        )
        .await
    }

    fn stored_hold(&self, hold_id: HoldId) -> Result<Hold, ServiceError> {
        Ok(self
            .store
            .hold(hold_id)?
            .ok_or(DomainError::NotFound(crate::domain::error::Missing::Hold))?)
    }

    async fn hold_and_commit(
        &self,
        command: &HoldCommand,
        citizen: CitizenKey,
        request: RequestRecord,
    ) -> Result<Hold, ServiceError> {
        let slot = self.slot(&command.slot)?;
        let now_ms = now_unix_ms();
        if slot.key.start_unix_s.saturating_mul(1_000) <= now_ms {
            return Err(DomainError::SlotStarted(slot.key.clone()).into());
        }
        let hold_id = self.ids.mint(citizen);
        let service = &slot.key.service_id;
        self.citizens
            .reserve(
                citizen,
                service,
                hold_id,
                self.limits.max_active_per_citizen,
            )
            .map_err(|existing| DomainError::CitizenAlreadyBooked {
                booking_id: existing,
            })?;
        let pending = match slot.counter.try_take() {
            Ok(pending) => pending,
            Err(refusal) => {
                self.citizens.release(citizen, service, hold_id);
                return Err(refused(refusal, &slot.key).into());
            }
        };
        let hold = Hold {
            hold_id,
            slot: slot.key.clone(),
            citizen,
            created_at_unix_ms: now_ms,
            expires_at_unix_ms: now_ms + i64::from(command.ttl_seconds) * 1_000,
            request,
            state: HoldState::Live,
        };
        let outcome = match self.store.commit(&[Write::Hold(hold.clone())]).await {
            Ok(()) => {
                // Live before the admission settles, so a closure waiting for it sees it.
                self.live_holds().insert(hold.clone());
                Ok(hold)
            }
            Err(StoreError::Overloaded) => {
                self.citizens.release(citizen, service, hold_id);
                let _ = slot.counter.release();
                Err(StoreError::Overloaded.into())
            }
            Err(error) => Err(error.into()),
        };
        drop(pending);
        outcome
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
        let writes: Vec<Write> = due
            .iter()
            .map(|hold| {
                Write::Hold(Hold {
                    state: HoldState::Expired {
                        at_unix_ms: now_unix_ms,
                    },
                    ..hold.clone()
                })
            })
            .collect();
        match self.store.commit(&writes).await {
            Ok(()) => {
                for hold in &due {
                    self.return_hold_place(hold);
                }
                Ok(due.len())
            }
            Err(StoreError::Overloaded) => {
                let mut live = self.live_holds();
                for hold in due {
                    live.insert(hold);
                }
                Err(StoreError::Overloaded.into())
            }
            // The store is failed: the places stay taken, a restart rebuilds them.
            Err(error) => Err(error.into()),
        }
    }

    /// Frees what a durably expired hold occupied: its citizen entry and its place.
    pub(super) fn return_hold_place(&self, hold: &Hold) {
        self.citizens
            .release(hold.citizen, &hold.slot.service_id, hold.hold_id);
        self.return_place(&hold.slot);
    }

    /// Live holds right now (for tests and statistics).
    pub fn live_hold_count(&self) -> usize {
        self.live_holds().len()
    }
}
