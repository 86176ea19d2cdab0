//! Citizens' bookings: book (a new place or a held one), cancel, reschedule, list.
//!
//! Order of a booking: idempotency check → citizen limit (sharded index) → slot CAS →
//! durable group commit → acknowledge.

use crate::domain::booking::{Booking, BookingState, RequestRecord};
use crate::domain::error::{DomainError, Missing};
use crate::domain::hold::{Hold, HoldId, HoldState, NotConfirmable};
use crate::domain::ids::{
    BookingId, CitizenKey, RequestFingerprint, RequestKey, ServiceId, SlotKey,
};
use crate::service::engine::{
    check_not_started, refused, undo_if_never_queued, BookingView, Engine,
};
use crate::service::error::ServiceError;
use crate::store::records::Write;

pub struct BookCommand {
    pub slot: SlotKey,
    pub citizen_id: String,
    pub request: RequestKey,
    pub hold_id: Option<HoldId>,
}

pub struct CancelCommand {
    pub booking_id: BookingId,
    pub citizen_id: String,
    pub request: RequestKey,
}

pub struct RescheduleCommand {
    pub booking_id: BookingId,
    pub citizen_id: String,
    pub new_slot: SlotKey,
    pub request: RequestKey,
}

pub struct CitizenBookingsQuery {
    pub citizen_id: String,
    pub service_id: Option<ServiceId>,
    /// Resume after this booking (the previous page's last one).
    pub after: Option<BookingId>,
    pub page_size: usize,
}

pub struct CitizenBookingsPage {
    pub bookings: Vec<BookingView>,
    pub next_after: Option<BookingId>,
}

/// The reason written on a booking its citizen cancelled.
pub const CANCELLED_BY_CITIZEN: &str = "cancelled by citizen";

impl Engine {
    /// Books one place. Run it in its own task: it must finish even if the client goes away.
    pub async fn book(&self, command: BookCommand) -> Result<BookingView, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        self.count_attempt(&citizen)?;
        let slot_text = command.slot.to_string();
        let hold_text = command.hold_id.map(|id| id.to_string()).unwrap_or_default();
        let fingerprint = RequestFingerprint::of(&[
            b"book",
            slot_text.as_bytes(),
            &citizen.0,
            hold_text.as_bytes(),
        ]);
        self.once_per_booking_request(command.request, fingerprint, |request| async move {
            match command.hold_id {
                Some(hold_id) => {
                    self.confirm_hold(&command.slot, citizen, hold_id, request)
                        .await
                }
                None => self.admit_and_commit(&command.slot, citizen, request).await,
            }
        })
        .await
    }

    /// `once_per_request` for commands whose outcome is a booking.
    async fn once_per_booking_request<Work>(
        &self,
        request: RequestKey,
        fingerprint: RequestFingerprint,
        work: impl FnOnce(RequestRecord) -> Work,
    ) -> Result<BookingView, ServiceError>
    where
        Work: std::future::Future<Output = Result<Booking, ServiceError>>,
    {
        let booking = self
            .once_per_request(
                request,
                fingerprint,
                work,
                |booking: &Booking| booking.booking_id,
                |id| self.stored_booking(id),
            )
            .await?;
        self.view(booking)
    }

    async fn admit_and_commit(
        &self,
        slot_key: &SlotKey,
        citizen: CitizenKey,
        request: RequestRecord,
    ) -> Result<Booking, ServiceError> {
        let (admission, booking_id, now_ms) = self.take_place(slot_key, citizen)?;
        let slot = admission.slot();
        let booking = Booking::confirmed(
            booking_id,
            slot.key.clone(),
            slot.end_unix_s(),
            citizen,
            now_ms,
            request,
        );
        let written = self.store.commit(&[Write::Booking(booking.clone())]).await;
        undo_if_never_queued(written, || {
            self.untake_place(&admission, citizen, booking_id)
        })?;
        Ok(booking)
    }

    /// Turns a live hold into the booking with the same id; the hold's place (and its
    /// entry in the citizen index) carries over.
    async fn confirm_hold(
        &self,
        slot_key: &SlotKey,
        citizen: CitizenKey,
        hold_id: HoldId,
        request: RequestRecord,
    ) -> Result<Booking, ServiceError> {
        let slot = self.slot(slot_key)?;
        let now_ms = self.now_unix_ms();
        check_not_started(&slot, now_ms)?;
        let taken = self
            .live_holds()
            .take_for_confirm(hold_id, citizen, &slot.key, now_ms);
        let hold = match taken {
            Ok(hold) => hold,
            Err(NotConfirmable::Expired) => return Err(DomainError::HoldExpired.into()),
            Err(NotConfirmable::Unknown) => {
                // No longer live: an expired hold of this citizen says so; anything else
                // (another citizen's, another slot's, used, never made) is unknown.
                let expired = self.store.hold(hold_id)?.is_some_and(|stored| {
                    stored.citizen == citizen
                        && stored.slot == slot.key
                        && matches!(stored.state, HoldState::Expired { .. })
                });
                return Err(if expired {
                    DomainError::HoldExpired
                } else {
                    DomainError::NotFound(Missing::Hold)
                }
                .into());
            }
        };
        let _admission = match slot.enter() {
            Ok(admission) => admission,
            Err(refusal) => {
                // Closing: the closure takes the hold back from the live set.
                self.live_holds().insert(hold);
                return Err(refused(refusal, &slot.key).into());
            }
        };
        let booking = Booking::confirmed(
            hold_id,
            slot.key.clone(),
            slot.end_unix_s(),
            citizen,
            now_ms,
            request,
        );
        let confirmed = Hold {
            state: HoldState::Confirmed { at_unix_ms: now_ms },
            ..hold.clone()
        };
        let written = self
            .store
            .commit(&[Write::Booking(booking.clone()), Write::Hold(confirmed)])
            .await;
        undo_if_never_queued(written, || self.live_holds().insert(hold))?;
        Ok(booking)
    }

    /// Cancels a booking; its place returns to the slot once the cancel is durable.
    pub async fn cancel(&self, command: CancelCommand) -> Result<BookingView, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        let booking_text = command.booking_id.to_string();
        let fingerprint = RequestFingerprint::of(&[b"cancel", booking_text.as_bytes(), &citizen.0]);
        self.once_per_booking_request(command.request, fingerprint, |request| {
            self.cancel_and_commit(&command, citizen, request)
        })
        .await
    }

    /// The citizen's confirmed booking, or not found (another citizen's booking is
    /// reported as unknown: ids are not confirmed to strangers).
    fn own_booking(
        &self,
        booking_id: BookingId,
        citizen: CitizenKey,
    ) -> Result<Booking, ServiceError> {
        let booking = self
            .store
            .booking(citizen.tag(), booking_id)?
            .filter(|booking| booking.citizen == citizen)
            .ok_or(DomainError::NotFound(Missing::Booking))?;
        if !booking.is_confirmed() {
            return Err(DomainError::BookingNotActive(booking_id).into());
        }
        Ok(booking)
    }

    async fn cancel_and_commit(
        &self,
        command: &CancelCommand,
        citizen: CitizenKey,
        request: RequestRecord,
    ) -> Result<Booking, ServiceError> {
        let mut booking = self.own_booking(command.booking_id, citizen)?;
        let service = booking.slot.service_id.clone();
        // Exactly one of cancel, reschedule and closure wins the booking. The entry
        // keeps counting against the citizen's limit until the cancel is durable.
        if !self.citizens.claim(citizen, &service, booking.booking_id) {
            return Err(DomainError::BookingNotActive(booking.booking_id).into());
        }
        booking.state = BookingState::Cancelled {
            at_unix_ms: self.now_unix_ms(),
            reason: CANCELLED_BY_CITIZEN.to_string(),
            request: Some(request),
        };
        let written = self.store.commit(&[Write::Booking(booking.clone())]).await;
        // Never queued: the booking is still confirmed on disk and keeps its entry.
        undo_if_never_queued(written, || {
            self.citizens.unclaim(citizen, booking.booking_id)
        })?;
        self.citizens.release(citizen, &service, booking.booking_id);
        self.return_place(&booking.slot);
        Ok(booking)
    }

    /// Moves a booking to another slot of the same service in one atomic write: the
    /// old one is cancelled and the new one confirmed together, or neither.
    pub async fn reschedule(
        &self,
        command: RescheduleCommand,
    ) -> Result<BookingView, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        self.count_attempt(&citizen)?;
        let booking_text = command.booking_id.to_string();
        let slot_text = command.new_slot.to_string();
        let fingerprint = RequestFingerprint::of(&[
            b"reschedule",
            booking_text.as_bytes(),
            &citizen.0,
            slot_text.as_bytes(),
        ]);
        self.once_per_booking_request(command.request, fingerprint, |request| {
            self.reschedule_and_commit(&command, citizen, request)
        })
        .await
    }

    async fn reschedule_and_commit(
        &self,
        command: &RescheduleCommand,
        citizen: CitizenKey,
        request: RequestRecord,
    ) -> Result<Booking, ServiceError> {
        let mut old = self.own_booking(command.booking_id, citizen)?;
        let new_slot = self.slot(&command.new_slot)?;
        if new_slot.key.service_id != old.slot.service_id {
            return Err(DomainError::invalid(
                "new_slot_id",
                "must be a slot of the booking's own service",
            )
            .into());
        }
        if new_slot.key == old.slot {
            return Err(
                DomainError::invalid("new_slot_id", "is the booking's current slot").into(),
            );
        }
        let now_ms = self.now_unix_ms();
        check_not_started(&new_slot, now_ms)?;
        let service = old.slot.service_id.clone();
        let new_id = self.ids.mint(citizen);
        // The citizen's entry moves to the new id in one step: never zero, never two.
        if !self
            .citizens
            .replace(citizen, &service, old.booking_id, new_id)
        {
            return Err(DomainError::BookingNotActive(old.booking_id).into());
        }
        let admission = match new_slot.try_take() {
            Ok(admission) => admission,
            Err(refusal) => {
                self.citizens
                    .replace(citizen, &service, new_id, old.booking_id);
                return Err(refused(refusal, &new_slot.key).into());
            }
        };
        let new = Booking::confirmed(
            new_id,
            new_slot.key.clone(),
            new_slot.end_unix_s(),
            citizen,
            now_ms,
            request,
        );
        old.state = BookingState::Cancelled {
            at_unix_ms: now_ms,
            reason: format!("rescheduled to booking {new_id}"),
            // The request's outcome is the new booking: only it carries the request.
            request: None,
        };
        let written = self
            .store
            .commit(&[Write::Booking(old.clone()), Write::Booking(new.clone())])
            .await;
        undo_if_never_queued(written, || {
            self.citizens
                .replace(citizen, &service, new_id, old.booking_id);
            let _ = admission.slot().counter.release();
        })?;
        self.return_place(&old.slot);
        Ok(new)
    }

    /// A citizen's bookings in every state, in booking-id order, one page at a time.
    pub fn citizen_bookings(
        &self,
        query: &CitizenBookingsQuery,
    ) -> Result<CitizenBookingsPage, ServiceError> {
        let citizen = self.hasher.hash(&query.citizen_id);
        let mut page = CitizenBookingsPage {
            bookings: Vec::new(),
            next_after: None,
        };
        let tag = citizen.tag();
        let mut after = query.after;
        loop {
            let batch = self
                .store
                .bookings_of_tag(tag, after, query.page_size + 1)?;
            let exhausted = batch.len() <= query.page_size;
            for booking in batch {
                after = Some(booking.booking_id);
                // Another citizen may share the tag; a service filter narrows further.
                if booking.citizen != citizen
                    || query
                        .service_id
                        .as_ref()
                        .is_some_and(|service| *service != booking.slot.service_id)
                {
                    continue;
                }
                if page.bookings.len() == query.page_size {
                    page.next_after = page.bookings.last().map(|v| v.booking.booking_id);
                    return Ok(page);
                }
                page.bookings.push(self.view(booking)?);
            }
            if exhausted {
                return Ok(page);
            }
        }
    }
}
