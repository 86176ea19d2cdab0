//! Executes a plan of `domain::plans`: takes its places and citizen entries (undoing
//! them on a refusal), commits its records in one group commit, then frees what it
//! frees. The plan decided everything; this file only carries it out.
//!
//! Must not import tonic.

use crate::domain::booking::BookingState;
use crate::domain::catalog::Admission;
use crate::domain::citizens::Entry;
use crate::domain::error::DomainError;
use crate::domain::hold::{hold_second, HoldState};
use crate::domain::ids::{BookingId, ChannelId, CitizenKey, ServiceId, SlotKey};
use crate::domain::plans::{Free, Plan, SlotView, Take};
use crate::domain::release::Gate;
use crate::domain::slot_counter::Refused;
use crate::service::engine::{undo_if_never_written, Engine, LANDING_POLL};
use crate::service::error::ServiceError;
use crate::store::records::Write;

/// A counter's refusal as the domain error a client sees.
pub(super) fn refused(refused: Refused, slot: &SlotKey) -> DomainError {
    match refused {
        Refused::Full => DomainError::SlotFull(slot.clone()),
        Refused::Closed => DomainError::SlotClosed(slot.clone()),
    }
}

/// What a plan holds until its write settles: the takes done (to undo if the write
/// never reached the queue) and the admissions, counted pending until dropped.
#[derive(Default)]
struct Taken {
    done: Vec<Take>,
    admissions: Vec<Admission>,
}

impl Engine {
    /// What a command of `citizen` through `channel` at `now` needs to know of a slot.
    pub(super) fn slot_view(
        &self,
        key: &SlotKey,
        (citizen, channel): (&CitizenKey, &ChannelId),
        now_unix_ms: i64,
    ) -> Result<SlotView, ServiceError> {
        let (region, slot) = self.slot_in_region(key)?;
        // A campaign's slot is reached through its offers, whatever release covers it.
        let gate = match self.campaign_gate(&region, key, now_unix_ms) {
            Gate::OfferRequired => Gate::OfferRequired,
            _ => self
                .releases
                .gate((&region, key), (citizen, channel), now_unix_ms),
        };
        Ok(SlotView {
            key: slot.key(),
            end_unix_s: slot.end_unix_s(),
            capacity: slot.counter.snapshot().capacity,
            gate,
            channel: channel.clone(),
        })
    }

    /// Carries out `plan`. `restore` gives back what the caller took out of memory to
    /// make the plan (a live hold being confirmed, holds being expired) if the plan is
    /// refused or its write never reaches the queue.
    pub(super) async fn execute<T>(
        &self,
        plan: Plan<T>,
        restore: impl FnOnce(),
    ) -> Result<T, ServiceError> {
        debug_assert!({
            plan.assert_balanced();
            true
        });
        let Plan {
            take,
            writes,
            free,
            answer,
        } = plan;
        // A failed store refuses before anything is taken: the entries and places of its
        // failed batch stay taken until the restart (their outcome is unknown), and a
        // retry meeting them answered CITIZEN_ALREADY_BOOKED, or a cancel waited 15 s
        // for a claim no write would ever settle (an outside test).
        if let Some(refusal) = self.store.refusing() {
            restore();
            return Err(refusal.into());
        }
        let taken = match self.take_all(take) {
            Ok(taken) => taken,
            Err(refusal) => {
                restore();
                return Err(refusal);
            }
        };
        let writes: Vec<Write> = writes.into_iter().map(Write::from).collect();
        debug_assert!(self.new_holds_are_findable(&writes));
        let written = self.store.commit(&writes).await;
        undo_if_never_written(written, || {
            self.undo(&taken.done);
            restore();
        })?;
        for free in free {
            self.free(free);
        }
        // Last: a closure waiting for these admissions sees everything they did.
        drop(taken.admissions);
        Ok(answer)
    }

    /// Runs `attempt` (reads, a plan made from them, its execution) again once the write
    /// that overtook those reads has landed: a cancel of dose 1 racing a move of dose 2
    /// (which claims dose 1 while it checks the interval), a second move or a check-in
    /// racing a move, then answers as if it came just after, never BOOKING_NOT_ACTIVE
    /// for a booking still confirmed.
    /// - `Overtaken`: waits until the booking's claim is let go (every write that
    ///   claims, moves or ends a booking holds its claim until it is durable), then
    ///   plans again; past the landing deadline (half the request timeout), OVERLOADED.
    /// - `NeighbourClosing`: waits for the authority write under way (the closure
    ///   cancelling that booking holds the authority lock until it has), then plans
    ///   again; the same slot refused so after that wait, SLOT_CLOSED (an older store
    ///   may hold a confirmed booking in a closed slot: recovery warns of it); the
    ///   closure still under way at the deadline, OVERLOADED.
    ///
    /// A refusal is answered once what it read is durable (like every read): a cancel
    /// that read a booking another write has ended is not told so before that write
    /// could be lost to a crash.
    pub(super) async fn replanned<T, Attempt>(
        &self,
        mut attempt: impl FnMut() -> Attempt,
    ) -> Result<T, ServiceError>
    where
        Attempt: std::future::Future<Output = Result<T, ServiceError>>,
    {
        let deadline = self.landing_deadline();
        let mut waited_for: Option<SlotKey> = None;
        loop {
            match attempt().await {
                Err(ServiceError::Overtaken { citizen, id }) => {
                    self.until_unclaimed(citizen, id, deadline).await?;
                }
                Err(ServiceError::NeighbourClosing(slot)) if waited_for.as_ref() == Some(&slot) => {
                    return Err(DomainError::SlotClosed(slot).into());
                }
                Err(ServiceError::NeighbourClosing(slot)) => {
                    let closure = self.authority_writes.lock();
                    if tokio::time::timeout_at(deadline, closure).await.is_err() {
                        return Err(ServiceError::Busy(
                            "an authority write (a closure, an import) is under way; retry",
                        ));
                    }
                    waited_for = Some(slot);
                }
                refused @ Err(ServiceError::Domain(_)) => {
                    self.store.settled().await?;
                    return refused;
                }
                answered => return answered,
            }
        }
    }

    /// Waits until no write claims the citizen's booking `id`, at least one
    /// `LANDING_POLL` (two writes that overtook each other and let go do not retry in
    /// lockstep); OVERLOADED (retry) if one still does at `deadline`.
    async fn until_unclaimed(
        &self,
        citizen: CitizenKey,
        id: BookingId,
        deadline: tokio::time::Instant,
    ) -> Result<(), ServiceError> {
        loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(ServiceError::Busy(
                    "another change of the citizen's bookings is in flight; retry",
                ));
            }
            tokio::time::sleep(LANDING_POLL).await;
            if !self.citizens.is_claimed(citizen, id) {
                return Ok(());
            }
        }
    }

    /// A hold is written live once, when it is made: its id must seal the second it
    /// was made in, or the store could not find it from its id (`hold_record`).
    fn new_holds_are_findable(&self, writes: &[Write]) -> bool {
        writes.iter().all(|write| match write {
            Write::Hold(hold) if hold.state == HoldState::Live => {
                self.ids.hold_second_of(hold.hold_id) == hold_second(hold.created_at_unix_ms)
            }
            _ => true,
        })
    }

    /// Carries out independent plans in one group commit: each plan's takes are tried
    /// on their own (a refused plan is left out and `dropped` told of its answer), the
    /// others written together and then freed. Returns how many were carried out.
    pub(super) async fn execute_each<T>(
        &self,
        plans: Vec<Plan<T>>,
        dropped: impl Fn(&T),
    ) -> Result<usize, ServiceError> {
        if let Some(refusal) = self.store.refusing() {
            plans.iter().for_each(|plan| dropped(&plan.answer)); // as a failed commit
            return Err(refusal.into()); // as `execute`
        }
        let mut done = Vec::with_capacity(plans.len());
        let mut writes = Vec::new();
        for plan in plans {
            debug_assert!({
                plan.assert_balanced();
                true
            });
            match self.take_all(plan.take.clone()) {
                Ok(taken) => {
                    writes.extend(plan.writes.iter().cloned().map(Write::from));
                    done.push((plan, taken));
                }
                Err(_) => dropped(&plan.answer),
            }
        }
        if done.is_empty() {
            return Ok(0);
        }
        debug_assert!(self.new_holds_are_findable(&writes));
        let written = self.store.commit(&writes).await;
        undo_if_never_written(written, || {
            for (plan, taken) in &done {
                self.undo(&taken.done);
                dropped(&plan.answer);
            }
        })?;
        let count = done.len();
        for (plan, taken) in done {
            for free in plan.free {
                self.free(free);
            }
            drop(taken.admissions);
        }
        Ok(count)
    }

    fn take_all(&self, takes: Vec<Take>) -> Result<Taken, ServiceError> {
        let mut taken = Taken::default();
        for take in takes {
            match self.take_one(&take) {
                Ok(admission) => {
                    taken.admissions.extend(admission);
                    taken.done.push(take);
                }
                Err(refusal) => {
                    self.undo(&taken.done);
                    return Err(refusal);
                }
            }
        }
        Ok(taken)
    }

    fn take_one(&self, take: &Take) -> Result<Option<Admission>, ServiceError> {
        match take {
            Take::Entry {
                citizen,
                service,
                id,
                until_unix_s,
            } => self.take_entry(*citizen, service, Entry::new(*id, *until_unix_s)),
            Take::Claim {
                citizen,
                service,
                id,
                unchanged,
            } => self.claim(*citizen, service, *id, unchanged.as_ref()),
            Take::Move {
                citizen,
                service,
                from,
                to,
                until,
            } => self.move_entry(*citizen, service, (*from, *to), *until),
            Take::Place(key, channel) => self
                .take_place(key, channel, false)
                .map(Some)
                .map_err(ServiceError::from),
            Take::ReservedPlace(key, channel) => self
                .take_place(key, channel, true)
                .map(Some)
                .map_err(ServiceError::from),
            Take::Admission(key) => self.admit(key, false).map(Some),
            Take::NeighbourAdmission(key) => self.admit(key, true).map(Some),
            Take::HeldShare { slot, max } => {
                let reserved = self.live_holds().reserve_share(slot, *max);
                match reserved {
                    true => Ok(None),
                    false => Err(DomainError::HoldLimitReached(slot.clone()).into()),
                }
            }
            Take::SameRegistration {
                booking,
                registration,
            } => {
                let now = self.campaigns.booked_with(*booking);
                match now.map(|r| r.registration_id) == *registration {
                    true => Ok(None),
                    false => Err(ServiceError::Busy(
                        "the booking's campaign registration was being updated; retry",
                    )),
                }
            }
            Take::Ticket {
                release_id,
                citizen,
            } => match self.releases.claim_ticket(release_id, citizen) {
                true => Ok(None),
                false => Err(DomainError::NotAdmitted.into()),
            },
        }
    }

    /// `Take::Admission` / `Take::NeighbourAdmission`: one admission to `key`. A
    /// series neighbour's slot found closing answers `NeighbourClosing`, which the
    /// caller waits out once (the closure may be about to land), not SLOT_CLOSED.
    fn admit(&self, key: &SlotKey, neighbour: bool) -> Result<Admission, ServiceError> {
        self.slot(key)?.enter().map_err(|refusal| match refusal {
            Refused::Closed if neighbour => ServiceError::NeighbourClosing(key.clone()),
            refusal => refused(refusal, key).into(),
        })
    }

    /// `Take::Claim`: claims `citizen`'s entry `id`, whose stored booking must still be
    /// `unchanged` (if given); undone if not. Refused as `Overtaken`: the entry was
    /// claimed by a write in flight, or ended, or its booking changed since the plan's
    /// read.
    fn claim(
        &self,
        citizen: CitizenKey,
        service: &ServiceId,
        id: BookingId,
        unchanged: Option<&BookingState>,
    ) -> Result<Option<Admission>, ServiceError> {
        if !self.citizens.claim(citizen, service, id) {
            return Err(ServiceError::Overtaken { citizen, id });
        }
        let still = match unchanged {
            Some(state) => self.stored_state_is(citizen, id, |s| s == state),
            None => Ok(true),
        };
        unless_changed(still, (citizen, id), || self.citizens.unclaim(citizen, id))
    }

    /// `Take::Entry`: the citizen's new entry, under its limit as it stands now.
    fn take_entry(
        &self,
        citizen: CitizenKey,
        service: &ServiceId,
        entry: Entry,
    ) -> Result<Option<Admission>, ServiceError> {
        let limit = (self.limits.max_active_per_citizen, self.now_unix_s());
        match self.citizens.reserve(citizen, service, entry, limit) {
            Ok(()) => Ok(None),
            Err(existing) => Err(DomainError::CitizenAlreadyBooked {
                booking_id: existing,
                member: None,
            }
            .into()),
        }
    }

    /// `Take::Move`: `citizen`'s entry moves from booking `from` to `to`; undone unless
    /// `from` is still confirmed. Refused as `Overtaken`, as `claim`.
    fn move_entry(
        &self,
        citizen: CitizenKey,
        service: &ServiceId,
        (from, to): (BookingId, BookingId),
        (from_until, to_until): (i64, i64),
    ) -> Result<Option<Admission>, ServiceError> {
        if !self
            .citizens
            .replace(citizen, service, from, Entry::new(to, to_until))
        {
            return Err(ServiceError::Overtaken { citizen, id: from });
        }
        // The moved booking must still be confirmed (a check-in may have overtaken the
        // read the plan was made from).
        let still = self.stored_state_is(citizen, from, |s| matches!(s, BookingState::Confirmed));
        unless_changed(still, (citizen, from), || {
            let from = Entry::new(from, from_until);
            self.citizens.unreplace(citizen, service, from, to);
        })
    }

    /// Whether the stored booking `id` of `citizen` is in a state `expected` accepts,
    /// read after its entry was claimed (no other write can change it from then on).
    fn stored_state_is(
        &self,
        citizen: CitizenKey,
        id: BookingId,
        expected: impl Fn(&BookingState) -> bool,
    ) -> Result<bool, ServiceError> {
        let stored = self.store.booking(citizen.tag(), id)?;
        Ok(stored.is_some_and(|booking| booking.citizen == citizen && expected(&booking.state)))
    }

    /// Gives back what `take_all` took, last first.
    fn undo(&self, done: &[Take]) {
        for take in done.iter().rev() {
            match take {
                Take::Entry {
                    citizen,
                    service,
                    id,
                    ..
                } => {
                    self.citizens.release(*citizen, service, *id);
                }
                Take::Claim { citizen, id, .. } => self.citizens.unclaim(*citizen, *id),
                Take::Move {
                    citizen,
                    service,
                    from,
                    to,
                    until: (from_until, _),
                } => {
                    let from = Entry::new(*from, *from_until);
                    self.citizens.unreplace(*citizen, service, from, *to);
                }
                Take::Place(key, channel) | Take::ReservedPlace(key, channel) => {
                    self.return_place(key, channel)
                }
                // The admission settles when its guard drops; a check takes nothing.
                Take::Admission(_)
                | Take::NeighbourAdmission(_)
                | Take::SameRegistration { .. } => {}
                Take::HeldShare { slot, .. } => self.live_holds().release_share(slot),
                Take::Ticket {
                    release_id,
                    citizen,
                } => self.releases.unclaim_ticket(release_id, citizen),
            }
        }
    }

    fn free(&self, free: Free) {
        match free {
            Free::Entry {
                citizen,
                service,
                id,
            } => {
                self.citizens.release(citizen, &service, id);
            }
            Free::EntryUntil {
                citizen,
                service,
                id,
                end_unix_s,
            } => self.citizens.keep_until(citizen, &service, id, end_unix_s),
            Free::Place(key, channel) => self.return_place(&key, &channel),
            Free::LiveHold(hold) => self.live_holds().insert_reserved(hold),
            Free::TicketUsed(ticket) => {
                self.releases.mark_used(&ticket.release_id, &ticket.citizen)
            }
            Free::Registration(registration) => self.campaigns.settle(registration),
            Free::Unclaim { citizen, id } => self.citizens.unclaim(citizen, id),
        }
    }
}

/// After claiming booking `id`'s entry: nothing more to take if the stored booking is
/// still as the plan read it (`still`); otherwise `undo` gives the claim back and the
/// answer is the store's error or `Overtaken`.
fn unless_changed(
    still: Result<bool, ServiceError>,
    (citizen, id): (CitizenKey, BookingId),
    undo: impl FnOnce(),
) -> Result<Option<Admission>, ServiceError> {
    match still {
        Ok(true) => Ok(None),
        still => {
            undo();
            Err(still
                .err()
                .unwrap_or(ServiceError::Overtaken { citizen, id }))
        }
    }
}
