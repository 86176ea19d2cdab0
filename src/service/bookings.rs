//! Citizens' bookings: book (a new place or a held one), cancel, reschedule, list.
//!
//! Each command: idempotency check → its plan (`domain::plans`) → execute: citizen limit
//! (sharded index) → slot CAS → durable group commit → acknowledge.

use std::sync::Arc;

use crate::domain::booking::{Booking, RequestRecord};
use crate::domain::error::{DomainError, Missing};
use crate::domain::hold::{Hold, HoldId, NotConfirmable};
use crate::domain::ids::{
    BookingId, ChannelId, CitizenKey, RequestFingerprint, RequestKey, ServiceId, SlotKey,
};
use crate::domain::plans;
use crate::domain::release::Gate;
use crate::service::engine::{Attempt, BookingView, Engine};
use crate::service::error::ServiceError;

pub struct BookCommand {
    pub slot: SlotKey,
    pub citizen_id: String,
    pub request: RequestKey,
    pub hold_id: Option<HoldId>,
    /// The caller's channel (a confirmed hold keeps its own).
    pub channel: ChannelId,
}

/// BookGroup: one place each for a household, all or none.
pub struct GroupCommand {
    pub slot: SlotKey,
    /// Canonical, distinct, at least one.
    pub citizen_ids: Vec<String>,
    /// The citizen asking (canonical), whose rate limit and request-id scope the
    /// command takes: the assertion's `sub` (a member or not); `None`: the first member.
    pub asking: Option<String>,
    pub request: RequestKey,
    pub channel: ChannelId,
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
    /// The caller's channel: the new booking is made through it.
    pub channel: ChannelId,
}

pub struct CitizenBookingsQuery {
    pub citizen_id: String,
    pub service_id: Option<ServiceId>,
    /// Resume after this (slot start, booking): the previous page's last one.
    pub after: Option<(i64, BookingId)>,
    pub page_size: usize,
}

pub struct CitizenBookingsPage {
    pub bookings: Vec<BookingView>,
    /// The citizen's live holds (of the service asked for), on the first page only.
    pub holds: Vec<Hold>,
    /// The (slot start, booking) of the last one, when more follow.
    pub next_after: Option<(i64, BookingId)>,
}

/// Bookings of one citizen read (in steps of this many) to sort them by start time: a
/// citizen's bookings are few, and retention deletes those of long-ended slots.
const CITIZEN_BOOKINGS_STEP: usize = 1_000;

impl Engine {
    /// Books one place. Run it in its own task: it must finish even if the client goes away.
    pub async fn book(&self, command: BookCommand) -> Result<BookingView, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        let slot_text = command.slot.to_string();
        let hold_text = command.hold_id.map(|id| id.to_string()).unwrap_or_default();
        let fingerprint = RequestFingerprint::of(&[
            b"book",
            slot_text.as_bytes(),
            &citizen.0,
            hold_text.as_bytes(),
        ]);
        let command = &command;
        self.once_per_booking_request(
            (command.request.for_citizen(&citizen), fingerprint),
            Attempt::On(&citizen, &command.slot),
            |request| async move {
                let asking = (citizen, &command.channel);
                match command.hold_id {
                    Some(hold_id) => {
                        self.confirm_hold(&command.slot, asking, hold_id, request)
                            .await
                    }
                    None => self.admit_and_commit(&command.slot, asking, request).await,
                }
            },
        )
        .await
    }

    /// Books one place for each member of a household in one write: all or none. Each
    /// member's own limit applies; a retry returns the same bookings.
    pub async fn book_group(
        &self,
        command: GroupCommand,
    ) -> Result<Vec<BookingView>, ServiceError> {
        let members: Vec<CitizenKey> = command
            .citizen_ids
            .iter()
            .map(|id| self.hasher.hash(id))
            .collect();
        let first = *members.first().ok_or(DomainError::invalid(
            "citizen_ids",
            "must name at least one citizen",
        ))?;
        let asking = command
            .asking
            .as_ref()
            .map_or(first, |asking| self.hasher.hash(asking));
        let slot_text = command.slot.to_string();
        let mut parts: Vec<&[u8]> = vec![b"book-group", slot_text.as_bytes()];
        parts.extend(members.iter().map(|member| &member.0[..]));
        let fingerprint = RequestFingerprint::of(&parts);
        let earlier = match asking == first {
            true => None,
            // Sent before the subject asked for itself (under its first member's
            // scope): a retry gets that first outcome.
            false => self
                .requests
                .finished(&command.request.for_citizen(&first), fingerprint),
        };
        let bookings = match earlier {
            Some(id) => {
                let read = self.once_settled(self.group_bookings(&members, id)).await;
                super::requests::replayed(read)?
            }
            None => {
                self.once_per_request(
                    (command.request.for_citizen(&asking), fingerprint),
                    // One attempt of the one asking (as the README says), like a Book.
                    Attempt::On(&asking, &command.slot),
                    |request| self.group_and_commit(&command, &members, request),
                    |bookings: &Vec<Booking>| bookings[0].booking_id,
                    |id| self.group_bookings(&members, id),
                )
                .await?
            }
        };
        bookings
            .into_iter()
            .map(|booking| self.view(booking))
            .collect()
    }

    async fn group_and_commit(
        &self,
        command: &GroupCommand,
        members: &[CitizenKey],
        request: RequestRecord,
    ) -> Result<Vec<Booking>, ServiceError> {
        let now_ms = self.now_unix_ms();
        let (mut group, mut minted) = (Vec::new(), Vec::new());
        for member in members {
            let slot = self.slot_view(&command.slot, (member, &command.channel), now_ms)?;
            let codes = self.mint_codes()?;
            group.push((slot, *member, (self.ids.mint(*member), codes.codes)));
            minted.push(codes);
        }
        let plan = plans::book_group(&group, request, now_ms)?;
        let written = self.execute(plan, || {}).await;
        minted.into_iter().for_each(|codes| codes.settle(&written));
        written.map_err(|error| self.naming_the_member(error, members, &command.slot))
    }

    /// A member already booked: named by its position, so the household knows who.
    fn naming_the_member(
        &self,
        error: ServiceError,
        members: &[CitizenKey],
        slot: &SlotKey,
    ) -> ServiceError {
        let ServiceError::Domain(DomainError::CitizenAlreadyBooked { booking_id, .. }) = error
        else {
            return error;
        };
        let service = &slot.service_id;
        let member = members
            .iter()
            .position(|member| self.citizens.is_active(*member, service, booking_id));
        DomainError::CitizenAlreadyBooked { booking_id, member }.into()
    }

    /// The bookings of a finished group request whose outcome (any member's booking)
    /// is `id`: for each member, in order, its booking of the same request, slot and
    /// time. A member's booking missing (retention deleted it) fails the retry.
    fn group_bookings(
        &self,
        members: &[CitizenKey],
        id: BookingId,
    ) -> Result<Vec<Booking>, ServiceError> {
        let outcome = self.stored_booking(id)?;
        let same_write = |booking: &Booking| {
            booking.request.key == outcome.request.key
                && booking.slot == outcome.slot
                && booking.created_at_unix_ms == outcome.created_at_unix_ms
        };
        let mut found = Vec::with_capacity(members.len());
        for member in members {
            let mine = self.citizen_bookings_where(*member, same_write)?;
            let first = mine.into_iter().next();
            found.push(first.ok_or(DomainError::NotFound(Missing::Booking))?);
        }
        Ok(found)
    }

    /// Every booking (all states) of `citizen` that `keep` accepts, read in steps (other
    /// citizens may share its tag: only its own are kept), between two commits: a move
    /// is seen whole (one booking confirmed) or not at all, never half.
    pub(super) fn citizen_bookings_where(
        &self,
        citizen: CitizenKey,
        keep: impl Fn(&Booking) -> bool,
    ) -> Result<Vec<Booking>, ServiceError> {
        self.store
            .between_commits(|| self.citizen_bookings_scan(citizen, keep))
    }

    fn citizen_bookings_scan(
        &self,
        citizen: CitizenKey,
        keep: impl Fn(&Booking) -> bool,
    ) -> Result<Vec<Booking>, ServiceError> {
        let (mut found, mut after) = (Vec::new(), None);
        loop {
            let batch = self
                .store
                .bookings_of_tag(citizen.tag(), after, CITIZEN_BOOKINGS_STEP)?;
            let exhausted = batch.len() < CITIZEN_BOOKINGS_STEP;
            after = batch.last().map(|booking| booking.booking_id);
            found.extend(
                batch
                    .into_iter()
                    .filter(|booking| booking.citizen == citizen && keep(booking)),
            );
            if exhausted {
                return Ok(found);
            }
        }
    }

    /// `once_per_request` for commands whose outcome is a booking.
    pub(super) async fn once_per_booking_request<Work>(
        &self,
        request: (RequestKey, RequestFingerprint),
        attempt: Attempt<'_>,
        work: impl FnOnce(RequestRecord) -> Work,
    ) -> Result<BookingView, ServiceError>
    where
        Work: std::future::Future<Output = Result<Booking, ServiceError>>,
    {
        let booking = self
            .once_per_request(
                request,
                attempt,
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
        (citizen, channel): (CitizenKey, &ChannelId),
        request: RequestRecord,
    ) -> Result<Booking, ServiceError> {
        let now_ms = self.now_unix_ms();
        let slot = self.slot_view(slot_key, (&citizen, channel), now_ms)?;
        let codes = self.mint_codes()?;
        let new = (self.ids.mint(citizen), codes.codes);
        let plan = plans::book(&slot, citizen, new, request, now_ms)?;
        let written = self.execute(plan, || {}).await;
        codes.settle(&written);
        written
    }

    /// Turns a live hold into the booking with the same id; the hold's place (and its
    /// entry in the citizen index) carries over. A campaign's offer is accepted: its
    /// registration is booked in the same write.
    pub(super) async fn confirm_hold(
        &self,
        slot_key: &SlotKey,
        (citizen, channel): (CitizenKey, &ChannelId),
        hold_id: HoldId,
        request: RequestRecord,
    ) -> Result<Booking, ServiceError> {
        let now_ms = self.now_unix_ms();
        let slot = self.slot_view(slot_key, (&citizen, channel), now_ms)?;
        plans::check_not_started(&slot.key, now_ms)?;
        let taken = self
            .live_holds()
            .take_for_confirm(hold_id, citizen, &slot.key, now_ms);
        let hold = match taken {
            Ok(hold) => hold,
            Err(why) => {
                let stored = match why {
                    NotConfirmable::Unknown => self.hold_record(hold_id)?,
                    NotConfirmable::Expired => None,
                };
                let closed = self.slot(slot_key)?.counter.snapshot().closed;
                let on = (citizen, &slot.key);
                let why = plans::not_confirmable(why, stored.as_ref(), on, (now_ms, closed));
                // Read from a hold record perhaps still syncing: answered once durable.
                return self.once_settled(Err(why.into())).await;
            }
        };
        let offer_of = self.campaigns.offer_of(hold_id);
        let codes = match self.mint_codes() {
            Ok(codes) => codes,
            Err(failed) => {
                self.live_holds().insert(hold);
                return Err(failed);
            }
        };
        let held = (&hold, codes.codes);
        let plan = match plans::confirm_hold(&slot, held, offer_of.as_ref(), request, now_ms) {
            Ok(plan) => plan,
            Err(refused) => {
                self.live_holds().insert(hold);
                return Err(refused.into());
            }
        };
        // Refused (closing) or never queued: the hold goes back to the live set, where
        // a closure or the sweeper takes it.
        let written = match self
            .execute(plan, || self.live_holds().insert(hold.clone()))
            .await
        {
            // Its own new entry, claimed by nothing else: not expected.
            Err(ServiceError::Overtaken { id, .. }) => {
                Err(DomainError::BookingNotActive(id).into())
            }
            written => written,
        };
        codes.settle(&written);
        written
    }

    /// Cancels a booking; its place returns to the slot once the cancel is durable.
    pub async fn cancel(&self, command: CancelCommand) -> Result<BookingView, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        let booking_text = command.booking_id.to_string();
        let fingerprint = RequestFingerprint::of(&[b"cancel", booking_text.as_bytes(), &citizen.0]);
        let command = &command;
        self.once_per_booking_request(
            (command.request.for_citizen(&citizen), fingerprint),
            Attempt::No,
            |request| self.replanned(move || self.cancel_and_commit(command, citizen, request)),
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
        // Read only for a cancel that can happen (the plan refuses any other): a refused
        // cancel costs no read of the citizen's other bookings.
        let later = match &stored {
            Some(booking) if booking.citizen == citizen && booking.is_confirmed() => {
                self.later_doses(booking)?
            }
            _ => Vec::new(),
        };
        let registration = self.campaigns.booked_with(command.booking_id);
        let now_ms = self.now_unix_ms();
        let plan = plans::cancel(
            (stored, later),
            citizen,
            registration.as_ref(),
            request,
            now_ms,
        )?;
        self.execute(plan, || {}).await
    }

    /// Moves a booking to another slot of the same service in one atomic write: the
    /// old one is cancelled and the new one confirmed together, or neither.
    pub async fn reschedule(
        &self,
        command: RescheduleCommand,
    ) -> Result<BookingView, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        let booking_text = command.booking_id.to_string();
        let slot_text = command.new_slot.to_string();
        let fingerprint = RequestFingerprint::of(&[
            b"reschedule",
            booking_text.as_bytes(),
            &citizen.0,
            slot_text.as_bytes(),
        ]);
        let command = &command;
        self.once_per_booking_request(
            (command.request.for_citizen(&citizen), fingerprint),
            Attempt::On(&citizen, &command.new_slot),
            |request| self.replanned(move || self.reschedule_and_commit(command, citizen, request)),
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
        let now_ms = self.now_unix_ms();
        let asking = (&citizen, &command.channel);
        let mut new_slot = self.slot_view(&command.new_slot, asking, now_ms).ok();
        if let (Some(view), Some(old)) = (new_slot.as_mut(), stored.as_ref()) {
            // Within one release a move swaps places: it needs no new admission (a
            // campaign's gate stays: its slots are reached through offers). Before
            // `release_at` nobody moves in: a booking made before the release was
            // announced must not pick its slots before everyone else.
            // A booking its channel's reserve let in without a ticket moves within that
            // reserve only (else a move would trade a reserved place for a common one,
            // and free the reserve for the next caller).
            let queued = matches!(view.gate, Gate::Queue { .. });
            let admitted = matches!(&view.gate, Gate::Queue { ticket: Some(t), .. } if t.used);
            if queued
                && self.in_same_release(&old.slot, &view.key)
                && (admitted || !self.reserves_for(&old.slot, &old.channel))
            {
                view.gate = Gate::Open;
            }
        }
        let codes = self.mint_codes()?;
        let new = (self.ids.mint(citizen), codes.codes);
        let registration = self.campaigns.booked_with(command.booking_id);
        let neighbours = match &stored {
            Some(old) if old.citizen == citizen => self.neighbours_of(old, &command.new_slot)?,
            _ => None,
        };
        let plan = plans::reschedule(
            (stored, registration.as_ref(), neighbours),
            citizen,
            new_slot.as_ref(),
            new,
            request,
            now_ms,
        )?;
        let written = self.execute(plan, || {}).await;
        codes.settle(&written);
        written
    }

    /// A citizen's bookings (all states, optionally of one service) in start-time order
    /// (then booking id), a page at a time. Counted against the citizen's read quota.
    /// Read on a blocking thread; answered once what it read is durable.
    pub async fn citizen_bookings(
        self: &Arc<Self>,
        query: CitizenBookingsQuery,
    ) -> Result<CitizenBookingsPage, ServiceError> {
        let engine = Arc::clone(self);
        let page = tokio::task::spawn_blocking(move || engine.citizen_bookings_page(&query))
            .await
            .map_err(|_| ServiceError::Abandoned)??;
        self.store.settled().await?;
        Ok(page)
    }

    fn citizen_bookings_page(
        &self,
        query: &CitizenBookingsQuery,
    ) -> Result<CitizenBookingsPage, ServiceError> {
        let citizen = self.hasher.hash(&query.citizen_id);
        self.count_read(&citizen)?;
        let mut mine = self.citizen_bookings_where(citizen, |booking| {
            query
                .service_id
                .as_ref()
                .is_none_or(|service| *service == booking.slot.service_id)
        })?;
        let order = |booking: &Booking| (booking.slot.start_unix_s, booking.booking_id);
        mine.sort_by_key(order);
        let mut rest = mine
            .into_iter()
            .filter(|booking| query.after.is_none_or(|after| order(booking) > after))
            .peekable();
        let mut page = CitizenBookingsPage {
            bookings: Vec::new(),
            holds: match query.after {
                None => self.live_holds_of(citizen, query.service_id.as_ref()),
                Some(_) => Vec::new(),
            },
            next_after: None,
        };
        while page.bookings.len() < query.page_size {
            let Some(booking) = rest.next() else { break };
            page.bookings.push(self.view(booking)?);
        }
        if rest.peek().is_some() {
            page.next_after = page.bookings.last().map(|view| order(&view.booking));
        }
        Ok(page)
    }

    /// The citizen's live holds (of `service` if given) whose time is not up.
    fn live_holds_of(&self, citizen: CitizenKey, service: Option<&ServiceId>) -> Vec<Hold> {
        let now_unix_ms = self.now_unix_ms();
        let live = self.live_holds();
        let holds = live.of_citizen(citizen).into_iter().filter(|hold| {
            !hold.time_is_up(now_unix_ms)
                && service.is_none_or(|service| *service == hold.slot.service_id)
        });
        holds.cloned().collect()
    }
}
