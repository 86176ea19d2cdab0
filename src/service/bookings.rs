//! Citizens' bookings: book (a new place or a held one), cancel, reschedule, list.
//!
//! Each command: idempotency check → its plan (`domain::plans`) → execute: citizen limit
//! (sharded index) → slot CAS → durable group commit → acknowledge.

use crate::domain::booking::{Booking, RequestRecord};
use crate::domain::hold::{HoldId, NotConfirmable};
use crate::domain::ids::{
    BookingId, CitizenKey, RequestFingerprint, RequestKey, ServiceId, SlotKey,
};
use crate::domain::plans;
use crate::service::engine::{BookingView, Engine};
use crate::service::error::ServiceError;

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

impl Engine {
    /// Books one place. Run it in its own task: it must finish even if the client goes away.
    pub async fn book(&self, command: BookCommand) -> Result<BookingView, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        self.count_attempt_on(&citizen, &command.slot)?;
        let slot_text = command.slot.to_string();
        let hold_text = command.hold_id.map(|id| id.to_string()).unwrap_or_default();
        let fingerprint = RequestFingerprint::of(&[
            b"book",
            slot_text.as_bytes(),
            &citizen.0,
            hold_text.as_bytes(),
        ]);
        self.once_per_booking_request(
            command.request.for_citizen(&citizen),
            fingerprint,
            |request| async move {
                match command.hold_id {
                    Some(hold_id) => {
                        self.confirm_hold(&command.slot, citizen, hold_id, request)
                            .await
                    }
                    None => self.admit_and_commit(&command.slot, citizen, request).await,
                }
            },
        )
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
        let slot = self.slot_view(slot_key)?;
        let now_ms = self.now_unix_ms();
        let plan = plans::book(&slot, citizen, self.ids.mint(citizen), request, now_ms)?;
        self.execute(plan, || {}).await
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
        let slot = self.slot_view(slot_key)?;
        let now_ms = self.now_unix_ms();
        plans::check_not_started(&slot.key, now_ms)?;
        let taken = self
            .live_holds()
            .take_for_confirm(hold_id, citizen, &slot.key, now_ms);
        let hold = match taken {
            Ok(hold) => hold,
            Err(why) => {
                let stored = match why {
                    NotConfirmable::Unknown => self.store.hold(hold_id)?,
                    NotConfirmable::Expired => None,
                };
                return Err(
                    plans::not_confirmable(why, stored.as_ref(), citizen, &slot.key).into(),
                );
            }
        };
        let plan = plans::confirm_hold(&slot, &hold, request, now_ms);
        // Refused (closing) or never queued: the hold goes back to the live set, where
        // a closure or the sweeper takes it.
        self.execute(plan, || self.live_holds().insert(hold.clone()))
            .await
    }

    /// Cancels a booking; its place returns to the slot once the cancel is durable.
    pub async fn cancel(&self, command: CancelCommand) -> Result<BookingView, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        let booking_text = command.booking_id.to_string();
        let fingerprint = RequestFingerprint::of(&[b"cancel", booking_text.as_bytes(), &citizen.0]);
        self.once_per_booking_request(
            command.request.for_citizen(&citizen),
            fingerprint,
            |request| self.cancel_and_commit(&command, citizen, request),
        )
        .await
    }

    async fn cancel_and_commit(
        &self,
        command: &CancelCommand,
        citizen: CitizenKey,
        request: RequestRecord,
    ) -> Result<Booking, ServiceError> {
        let stored = self.store.booking(citizen.tag(), command.booking_id)?;
        let plan = plans::cancel(stored, citizen, request, self.now_unix_ms())?;
        self.execute(plan, || {}).await
    }

    /// Moves a booking to another slot of the same service in one atomic write: the
    /// old one is cancelled and the new one confirmed together, or neither.
    pub async fn reschedule(
        &self,
        command: RescheduleCommand,
    ) -> Result<BookingView, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        self.count_attempt_on(&citizen, &command.new_slot)?;
        let booking_text = command.booking_id.to_string();
        let slot_text = command.new_slot.to_string();
        let fingerprint = RequestFingerprint::of(&[
            b"reschedule",
            booking_text.as_bytes(),
            &citizen.0,
            slot_text.as_bytes(),
        ]);
        self.once_per_booking_request(
            command.request.for_citizen(&citizen),
            fingerprint,
            |request| self.reschedule_and_commit(&command, citizen, request),
        )
        .await
    }

    async fn reschedule_and_commit(
        &self,
        command: &RescheduleCommand,
        citizen: CitizenKey,
        request: RequestRecord,
    ) -> Result<Booking, ServiceError> {
        let stored = self.store.booking(citizen.tag(), command.booking_id)?;
        let new_slot = self.slot_view(&command.new_slot).ok();
        let new_id = self.ids.mint(citizen);
        let now_ms = self.now_unix_ms();
        let plan = plans::reschedule(stored, citizen, new_slot.as_ref(), new_id, request, now_ms)?;
        self.execute(plan, || {}).await
    }

    /// A citizen's bookings in every state, in booking-id order, one page at a time.
    pub fn citizen_bookings(
        &self,
        query: &CitizenBookingsQuery,
    ) -> Result<CitizenBookingsPage, ServiceError> {
        let citizen = self.hasher.hash(&query.citizen_id);
        self.count_read(&citizen)?;
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
