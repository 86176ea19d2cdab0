//! The rules of the citizens' commands as pure functions: a snapshot of what a command
//! needs, the command and `now` in; a [`Plan`] out: the places and citizen entries to
//! take before writing, the records to write in one atomic commit, what to free once
//! that commit is durable, and the answer. The engine (`service`) only executes plans:
//! it takes, commits, and frees or undoes. It decides nothing, so every rule here is
//! tested by tables, without a store or a clock.
//!
//! Every plan is balanced: places taken minus places freed equal the places its writes
//! hold, asserted before it runs in debug builds ([`Plan::assert_balanced`]).
//!
//! Pure and synchronous; imports nothing of the crate outside `domain`.

use crate::domain::booking::{Booking, BookingCodes, BookingState, RequestRecord, SeriesDose};
use crate::domain::campaign::{Campaign, Offer, OfferEnd, Registration};
use crate::domain::error::{DomainError, Missing};
use crate::domain::event::{Event, HOLD_TIMED_OUT};
use crate::domain::hold::{held_max, Hold, HoldState, NotConfirmable};
use crate::domain::ids::{BookingId, ChannelId, CitizenKey, ReleaseId, ServiceId, SlotKey};
use crate::domain::release::{self, Gate, Passed, Ticket};
use crate::domain::series::{check_interval, Placed, Series};

/// The cancel reason of a booking moved by a reschedule.
pub const RESCHEDULED: &str = "rescheduled";

/// The reason written on a booking its citizen cancelled.
pub const CANCELLED_BY_CITIZEN: &str = "cancelled by citizen";

/// The reason written on the later doses of a series cancelled with an earlier one.
pub const CANCELLED_WITH_EARLIER_DOSE: &str = "cancelled with an earlier dose";

/// What a command needs to know of a slot: which it is and when it ends. Its places
/// are counters the engine takes; a plan never reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotView {
    pub key: SlotKey,
    pub end_unix_s: i64,
    /// The capacity when the command began (bounds the places that may be held).
    pub capacity: u32,
    /// What a new booking or hold must pass (its release), for the citizen asking.
    pub gate: Gate,
    /// The channel asking: a new booking or hold is made through it (and may take a
    /// place its release reserves for it).
    pub channel: ChannelId,
}

/// Taken before the write, in order; a refusal undoes the ones before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Take {
    /// A new entry `id` under the citizen's limit for the service, counting until
    /// its slot ends (`until_unix_s`).
    Entry {
        citizen: CitizenKey,
        service: ServiceId,
        id: BookingId,
        until_unix_s: i64,
    },
    /// The citizen's active entry `id`, for the write that ends or changes it: exactly
    /// one of cancel, reschedule, closure and the desk wins it. With `unchanged`, the
    /// stored booking `id` must still be in that state once claimed (else the plan was
    /// made from a read another write overtook, and it is refused).
    Claim {
        citizen: CitizenKey,
        service: ServiceId,
        id: BookingId,
        unchanged: Option<BookingState>,
    },
    /// The citizen's entry moves from `from` to `to` in one step: never zero, never two.
    /// `until`: when the slots of `from` and of `to` end (each counts until then).
    Move {
        citizen: CitizenKey,
        service: ServiceId,
        from: BookingId,
        to: BookingId,
        until: (i64, i64),
    },
    /// One place of the slot (one CAS), counted pending until the write settles, for a
    /// booking or hold of this channel (a reserve of another channel may be out of
    /// its reach).
    Place(SlotKey, ChannelId),
    /// One place of the slot out of this channel's own reserve's unused ones (one CAS
    /// under its release's take lock), else `NotAdmitted`: a `Place` that passed a
    /// queued release's gate without a ticket (`Passed::OwnReserve`).
    ReservedPlace(SlotKey, ChannelId),
    /// No place (it is already held), but counted pending until the write settles, so
    /// a closure waits for it.
    Admission(SlotKey),
    /// `Admission` in the slot of another of the citizen's bookings the plan holds
    /// still or ends with it (a series' other dose). Refused there as closed, a closure
    /// is cancelling that booking: the plan is made again (`Engine::replanned`) rather
    /// than answer SLOT_CLOSED for a slot the request never named.
    NeighbourAdmission(SlotKey),
    /// One of the `max` places of the slot that may be held at once (anti-hoarding).
    HeldShare { slot: SlotKey, max: u32 },
    /// The citizen's admitted queue ticket of the release, for this write alone (a
    /// second write sent at once is `NOT_ADMITTED`).
    Ticket {
        release_id: ReleaseId,
        citizen: CitizenKey,
    },
    /// Taken after the claim or move of `booking`: the campaign registration booked
    /// with it is still the one the plan read (`registration`: its id, or none). A
    /// reschedule that made `booking` settles its registration before it unclaims it,
    /// but a plan read before that may claim after: refused (retry) rather than end
    /// the booking and leave its registration booked.
    SameRegistration {
        booking: BookingId,
        registration: Option<BookingId>,
    },
}

/// Done once the write is durable, never before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Free {
    /// The entry leaves the citizen's limit.
    Entry {
        citizen: CitizenKey,
        service: ServiceId,
        id: BookingId,
    },
    /// The entry's claim ends; it leaves the citizen's limit once its slot ended.
    EntryUntil {
        citizen: CitizenKey,
        service: ServiceId,
        id: BookingId,
        end_unix_s: i64,
    },
    /// One place returns to the slot, from a booking or hold of this channel.
    Place(SlotKey, ChannelId),
    /// The hold joins the live set (before its admission settles).
    LiveHold(Hold),
    /// The queue ticket that admitted the booking or hold counts as used.
    TicketUsed(Ticket),
    /// The campaign registration takes its new state in memory.
    Registration(Registration),
    /// The claim on the entry ends (the write it guarded is done).
    Unclaim { citizen: CitizenKey, id: BookingId },
}

/// A command's decision. Invariant (checked by [`Plan::assert_balanced`]): the places a
/// plan takes minus the places it frees equal the change in records that hold a place
/// (confirmed bookings and live holds) among its writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan<T> {
    pub take: Vec<Take>,
    pub writes: Vec<Record>,
    pub free: Vec<Free>,
    pub answer: T,
}

/// A record a plan writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Booking(Booking),
    Hold(Hold),
    /// What changed, for `WatchEvents`; holds no place.
    Event(Event),
    /// A queue ticket (marked used by the booking or hold it admitted); holds no place.
    Ticket(Ticket),
    /// A campaign registration (its offer, booking or end); holds no place (its offer's
    /// hold does).
    Registration(Registration),
}

impl Record {
    /// +1 for a record that holds a place, -1 for one that gave it up. A confirmed
    /// booking that was a hold (same id) is +1 and its confirmed hold -1: the place
    /// carries over.
    fn places_held_delta(&self) -> i64 {
        match self {
            Record::Booking(booking) if booking.is_confirmed() => 1,
            // Written only by the desk, from confirmed: the place stays.
            Record::Booking(Booking {
                state: BookingState::Attended { .. } | BookingState::NoShow { .. },
                ..
            }) => 0,
            Record::Booking(_) => -1,
            Record::Hold(hold) if hold.state == HoldState::Live => 1,
            Record::Hold(_) => -1,
            Record::Event(_) | Record::Ticket(_) | Record::Registration(_) => 0,
        }
    }
}

impl<T> Plan<T> {
    /// Panics if the plan takes or frees a different number of places than its writes
    /// hold: such a plan would overbook or leak places.
    pub fn assert_balanced(&self) {
        let taken = self
            .take
            .iter()
            .filter(|t| matches!(t, Take::Place(..) | Take::ReservedPlace(..)))
            .count() as i64;
        let freed = self
            .free
            .iter()
            .filter(|f| matches!(f, Free::Place(..)))
            .count() as i64;
        let held: i64 = self.writes.iter().map(Record::places_held_delta).sum();
        assert_eq!(taken - freed, held, "a plan's places must match its writes");
    }
}

/// A slot that has started takes no booking, hold or reschedule.
pub fn check_not_started(slot: &SlotKey, now_unix_ms: i64) -> Result<(), DomainError> {
    if slot.start_unix_s.saturating_mul(1_000) <= now_unix_ms {
        return Err(DomainError::SlotStarted(slot.clone()));
    }
    Ok(())
}

/// Passes the slot's release gate (see `release::pass`); a ticket it uses is written
/// with the command and counted used once durable. Passed without a ticket, the place
/// the plan takes in the slot becomes one of the channel's own reserve.
fn pass_gate<T>(slot: &SlotView, plan: &mut Plan<T>, now_unix_ms: i64) -> Result<(), DomainError> {
    match release::pass(&slot.gate, now_unix_ms)? {
        Passed::Freely => {}
        Passed::Ticket(ticket) => {
            plan.take.push(Take::Ticket {
                release_id: ticket.release_id.clone(),
                citizen: ticket.citizen,
            });
            plan.writes.push(Record::Ticket(ticket.clone()));
            plan.free.push(Free::TicketUsed(ticket));
        }
        Passed::OwnReserve => {
            // The last place taken in the slot is this booking's or hold's (a group
            // passes member by member); a confirmed hold's place is taken already.
            let place = plan.take.iter_mut().rev().find(
                |take| matches!(take, Take::Place(key, channel) if *key == slot.key && *channel == slot.channel),
            );
            let Some(place) = place else {
                return Err(DomainError::NotAdmitted);
            };
            *place = Take::ReservedPlace(slot.key.clone(), slot.channel.clone());
        }
    }
    Ok(())
}

/// The campaign registration a command changes: written with it, taken by memory once
/// durable.
fn record_registration<T>(plan: &mut Plan<T>, registration: Registration) {
    plan.writes.push(Record::Registration(registration.clone()));
    plan.free.push(Free::Registration(registration));
}

/// What a new booking or hold takes, in order: the citizen's entry `id` under its
/// limit, then one place of the slot.
fn admission(slot: &SlotView, citizen: CitizenKey, id: BookingId) -> [Take; 2] {
    [
        Take::Entry {
            citizen,
            service: slot.key.service_id.clone(),
            id,
            until_unix_s: slot.end_unix_s,
        },
        Take::Place(slot.key.clone(), slot.channel.clone()),
    ]
}

/// A new booking `id` (with its `codes`) of a place in `slot`.
pub fn book(
    slot: &SlotView,
    citizen: CitizenKey,
    (id, codes): (BookingId, BookingCodes),
    request: RequestRecord,
    now_unix_ms: i64,
) -> Result<Plan<Booking>, DomainError> {
    check_not_started(&slot.key, now_unix_ms)?;
    let booking = Booking::confirmed(
        (id, codes),
        (slot.key.clone(), slot.end_unix_s),
        (citizen, slot.channel.clone()),
        now_unix_ms,
        request,
    );
    let mut plan = Plan {
        take: admission(slot, citizen, id).to_vec(),
        writes: vec![
            Record::Booking(booking.clone()),
            Record::Event(Event::booking(&booking, now_unix_ms)),
        ],
        free: Vec::new(),
        answer: booking,
    };
    pass_gate(slot, &mut plan, now_unix_ms)?;
    Ok(plan)
}

/// One booking each for `members` in one slot, all or none: every member's entry under
/// its own limit first, then one place per member. `members` pairs each citizen and new
/// booking id (and codes) with the slot as that citizen sees it: each passes the slot's
/// gate for itself (a queue ticket admits its own holder only).
pub fn book_group(
    members: &[(SlotView, CitizenKey, (BookingId, BookingCodes))],
    request: RequestRecord,
    now_unix_ms: i64,
) -> Result<Plan<Vec<Booking>>, DomainError> {
    let Some((first, ..)) = members.first() else {
        return Err(DomainError::invalid("citizen_ids", "must name a citizen"));
    };
    assert!(
        members.iter().all(|(slot, ..)| slot.key == first.key),
        "a group books one slot"
    );
    check_not_started(&first.key, now_unix_ms)?;
    let bookings = members.iter().map(|(slot, citizen, new)| {
        let booking = Booking::confirmed(
            *new,
            (slot.key.clone(), slot.end_unix_s),
            (*citizen, slot.channel.clone()),
            now_unix_ms,
            request,
        );
        (slot, booking)
    });
    book_all(bookings.collect(), now_unix_ms)
}

/// New bookings (each with the slot it is in), all or none in one write: every
/// citizen entry first, then one place each, each passing its slot's gate.
fn book_all(
    bookings: Vec<(&SlotView, Booking)>,
    now_unix_ms: i64,
) -> Result<Plan<Vec<Booking>>, DomainError> {
    let mut plan = Plan {
        take: Vec::with_capacity(2 * bookings.len()),
        writes: Vec::with_capacity(2 * bookings.len()),
        free: Vec::new(),
        answer: Vec::with_capacity(bookings.len()),
    };
    for (slot, booking) in &bookings {
        let [entry, _] = admission(slot, booking.citizen, booking.booking_id);
        plan.take.push(entry);
    }
    for (slot, booking) in bookings {
        plan.take
            .push(Take::Place(slot.key.clone(), slot.channel.clone()));
        plan.writes.push(Record::Booking(booking.clone()));
        plan.writes
            .push(Record::Event(Event::booking(&booking, now_unix_ms)));
        plan.answer.push(booking);
        pass_gate(slot, &mut plan, now_unix_ms)?;
    }
    Ok(plan)
}

/// Every dose of `series` for `citizen` in one write, all or none: `doses` pairs each
/// dose's slot (in dose order) with where and on which local day it is and the new
/// booking's id and codes. Each slot must be of its dose's service, and each dose keep
/// its interval (and site) from the one before it.
pub fn book_series(
    series: &Series,
    doses: &[(SlotView, Placed, (BookingId, BookingCodes))],
    citizen: CitizenKey,
    request: RequestRecord,
    now_unix_ms: i64,
) -> Result<Plan<Vec<Booking>>, DomainError> {
    if doses.len() != series.doses.len() {
        return Err(DomainError::invalid(
            "slot_ids",
            format!("must name one slot per dose ({})", series.doses.len()),
        ));
    }
    for (index, ((slot, placed, _), rules)) in doses.iter().zip(&series.doses).enumerate() {
        if slot.key.service_id != rules.service_id {
            return Err(DomainError::invalid(
                "slot_ids",
                format!("dose {} must be a slot of {}", index + 1, rules.service_id),
            ));
        }
        check_not_started(&slot.key, now_unix_ms)?;
        if index > 0 {
            let dose = u8::try_from(index + 1).expect("series have few doses");
            check_interval(series, dose, (&doses[index - 1].1, placed), "slot_ids")?;
        }
    }
    let first_booking = doses[0].2 .0;
    let bookings = doses.iter().enumerate().map(|(index, (slot, _, new))| {
        let booking = Booking {
            series: Some(SeriesDose {
                series_id: series.series_id.clone(),
                dose: u8::try_from(index + 1).expect("series have few doses"),
                first_booking,
            }),
            ..Booking::confirmed(
                *new,
                (slot.key.clone(), slot.end_unix_s),
                (citizen, slot.channel.clone()),
                now_unix_ms,
                request,
            )
        };
        (slot, booking)
    });
    book_all(bookings.collect(), now_unix_ms)
}

/// A series dose being moved: its series as it is now, the dose, and where its
/// neighbours are (the previous dose, the next one still confirmed).
pub struct Neighbours {
    pub series: std::sync::Arc<Series>,
    pub dose: u8,
    pub previous: Option<Placed>,
    pub next: Option<Placed>,
    /// Where the dose would move to.
    pub new: Placed,
    /// The neighbours still confirmed (slot, booking): claimed while the move is
    /// written, so a neighbour moved or cancelled at the same time refuses one of them.
    pub confirmed: Vec<(SlotKey, BookingId)>,
}

impl Neighbours {
    /// The moved dose keeps its interval from the previous dose, and the next keeps its
    /// own from the moved one, by the series' rules of now (a dose the series no longer
    /// has is not checked).
    fn check(&self) -> Result<(), DomainError> {
        if let Some(previous) = &self.previous {
            if self.series.dose(self.dose).is_some() {
                check_interval(
                    &self.series,
                    self.dose,
                    (previous, &self.new),
                    "new_slot_id",
                )?;
            }
        }
        if let Some(next) = &self.next {
            let next_dose = self.dose + 1;
            if self.series.dose(next_dose).is_some() {
                check_interval(&self.series, next_dose, (&self.new, next), "new_slot_id")?;
            }
        }
        Ok(())
    }
}

/// A new hold `id` of a place in `slot` for `ttl_seconds`; at most
/// `held_share_percent` of the slot's places may be held at once (at least one).
pub fn hold(
    slot: &SlotView,
    citizen: CitizenKey,
    id: BookingId,
    request: RequestRecord,
    (ttl_seconds, held_share_percent): (u32, u32),
    now_unix_ms: i64,
) -> Result<Plan<Hold>, DomainError> {
    check_not_started(&slot.key, now_unix_ms)?;
    let hold = Hold {
        hold_id: id,
        slot: slot.key.clone(),
        citizen,
        created_at_unix_ms: now_unix_ms,
        expires_at_unix_ms: now_unix_ms + i64::from(ttl_seconds) * 1_000,
        request,
        state: HoldState::Live,
        channel: slot.channel.clone(),
    };
    let [entry, place] = admission(slot, citizen, id);
    let share = Take::HeldShare {
        slot: slot.key.clone(),
        max: held_max(slot.capacity, held_share_percent),
    };
    let mut plan = Plan {
        take: vec![entry, place, share],
        writes: vec![Record::Hold(hold.clone())],
        free: vec![Free::LiveHold(hold.clone())],
        answer: hold,
    };
    pass_gate(slot, &mut plan, now_unix_ms)?;
    Ok(plan)
}

/// Why a hold taken for confirmation was not live: an expired hold of this citizen on
/// this slot says so; anything else (another citizen's, another slot's, used, never
/// made) is unknown. A hold of theirs stored live but gone from the live set is being
/// ended by another write: a closure of its slot (`slot_closed`: SLOT_CLOSED), the
/// sweeper once its time is up (HOLD_EXPIRED), or a confirm of another request.
pub fn not_confirmable(
    why: NotConfirmable,
    stored: Option<&Hold>,
    (citizen, slot): (CitizenKey, &SlotKey),
    (now_unix_ms, slot_closed): (i64, bool),
) -> DomainError {
    let theirs = stored.filter(|hold| hold.citizen == citizen && hold.slot == *slot);
    let state = theirs.map(|hold| &hold.state);
    let ended = matches!(state, Some(HoldState::Live | HoldState::Expired { .. }));
    // Whether the closure's write landed yet or not, the same answer: holding again
    // would meet the closed slot too.
    if slot_closed && (why == NotConfirmable::Expired || ended) {
        return DomainError::SlotClosed(slot.clone());
    }
    let expired = match (why, state) {
        (NotConfirmable::Expired, _) | (_, Some(HoldState::Expired { .. })) => true,
        (_, Some(HoldState::Live)) => theirs.is_some_and(|hold| hold.time_is_up(now_unix_ms)),
        _ => false,
    };
    if expired {
        DomainError::HoldExpired
    } else {
        DomainError::NotFound(Missing::Hold)
    }
}

/// The live `hold` (already taken from the live set, after [`check_not_started`])
/// becomes the booking with its id; its place and its citizen entry carry over. A hold
/// made before its slot's release opened (so before the release existed) passes the
/// release's gate now. A campaign's offer (`offer_of`: its registration) is accepted:
/// the registration is booked in the same write.
pub fn confirm_hold(
    slot: &SlotView,
    (hold, codes): (&Hold, BookingCodes),
    offer_of: Option<&Registration>,
    request: RequestRecord,
    now_unix_ms: i64,
) -> Result<Plan<Booking>, DomainError> {
    debug_assert!(hold.slot == slot.key && hold.state == HoldState::Live);
    let booking = Booking::confirmed(
        (hold.hold_id, codes),
        (slot.key.clone(), slot.end_unix_s),
        (hold.citizen, hold.channel.clone()),
        now_unix_ms,
        request,
    );
    let confirmed = Hold {
        state: HoldState::Confirmed {
            at_unix_ms: now_unix_ms,
        },
        ..hold.clone()
    };
    let mut plan = Plan {
        take: vec![Take::Admission(slot.key.clone())],
        writes: vec![
            Record::Booking(booking.clone()),
            Record::Hold(confirmed),
            Record::Event(Event::booking(&booking, now_unix_ms)),
        ],
        free: Vec::new(),
        answer: booking,
    };
    match offer_of {
        Some(registration) => {
            debug_assert!(registration
                .offer()
                .is_some_and(|o| o.hold_id == hold.hold_id));
            // Until the registration knows its booking, no cancel or move may end it.
            let (citizen, id) = (hold.citizen, hold.hold_id);
            let service = slot.key.service_id.clone();
            plan.take.push(Take::Claim {
                citizen,
                service,
                id,
                unchanged: None,
            });
            record_registration(&mut plan, registration.booked(id));
            plan.free.push(Free::Unclaim { citizen, id });
        }
        None if slot.gate.bypassed_by(hold.created_at_unix_ms) => {
            pass_gate(slot, &mut plan, now_unix_ms)?;
        }
        None => {}
    }
    Ok(plan)
}

/// What the desk does to a booking: a write, or nothing (it was already done).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeskChange {
    Write(Plan<Booking>),
    AlreadyDone(Booking),
}

/// The desk checks `booking` in with the code the citizen shows, from `window_hours`
/// before its slot starts to `window_hours` after it ends: a confirmed booking (or a
/// no-show: the citizen came late) becomes attended; an attended one stays as it is.
/// The state (which the desk's roster shows anyway) and the window are checked before
/// the code: outside its window a booking (attended or not) answers `CheckInClosed`
/// whatever the code, so guesses can only be made, and counted, while it is open.
pub fn check_in(
    booking: Booking,
    code: u16,
    window_hours: u32,
    now_unix_ms: i64,
) -> Result<DeskChange, DomainError> {
    let window_s = i64::from(window_hours) * 3_600;
    let opens_ms = (booking.slot.start_unix_s - window_s).saturating_mul(1_000);
    let closes_ms = (booking.end_unix_s + window_s).saturating_mul(1_000);
    let open = (opens_ms..=closes_ms).contains(&now_unix_ms);
    match booking.state {
        BookingState::Cancelled { .. } => {
            return Err(DomainError::BookingNotActive(booking.booking_id))
        }
        _ if !open => {
            return Err(DomainError::CheckInClosed {
                opens_unix_ms: opens_ms,
                closes_unix_ms: closes_ms,
            })
        }
        _ => {}
    }
    let expected = booking.codes.map(|codes| codes.check_in_code);
    if expected != Some(code) {
        return Err(DomainError::CheckInCodeWrong);
    }
    match booking.state {
        BookingState::Attended { .. } => Ok(DeskChange::AlreadyDone(booking)),
        BookingState::Cancelled { .. } => Err(DomainError::BookingNotActive(booking.booking_id)),
        BookingState::Confirmed | BookingState::NoShow { .. } => {
            let state = BookingState::Attended {
                at_unix_ms: now_unix_ms,
            };
            Ok(DeskChange::Write(desk_write(booking, state, now_unix_ms)))
        }
    }
}

/// The desk marks a confirmed booking a no-show, once its slot has ended.
pub fn mark_no_show(booking: Booking, now_unix_ms: i64) -> Result<DeskChange, DomainError> {
    match booking.state {
        BookingState::NoShow { .. } => Ok(DeskChange::AlreadyDone(booking)),
        BookingState::Cancelled { .. } | BookingState::Attended { .. } => {
            Err(DomainError::BookingNotActive(booking.booking_id))
        }
        BookingState::Confirmed if booking.end_unix_s.saturating_mul(1_000) > now_unix_ms => {
            Err(DomainError::SlotNotEnded)
        }
        BookingState::Confirmed => {
            let state = BookingState::NoShow {
                at_unix_ms: now_unix_ms,
            };
            Ok(DeskChange::Write(desk_write(booking, state, now_unix_ms)))
        }
    }
}

/// `booking` in its new desk `state`, with its event; the place stays. A confirmed
/// booking's citizen entry is claimed while the write is in flight (no cancel or move
/// ends it in between) and leaves the citizen's limit once it is durable and the slot
/// has ended: the appointment is over, so the citizen may book the service again (not
/// before: checked in a day early, a citizen could book again, and again). A no-show
/// being checked in holds no entry any more.
fn desk_write(booking: Booking, state: BookingState, now_unix_ms: i64) -> Plan<Booking> {
    let (citizen, id, end_unix_s) = (booking.citizen, booking.booking_id, booking.end_unix_s);
    let service = booking.slot.service_id.clone();
    let was_confirmed = booking.is_confirmed();
    let changed = Booking { state, ..booking };
    let mut plan = Plan {
        take: Vec::new(),
        writes: vec![
            Record::Booking(changed.clone()),
            Record::Event(Event::booking(&changed, now_unix_ms)),
        ],
        free: Vec::new(),
        answer: changed,
    };
    if was_confirmed {
        // Counted pending in its slot, like every claim below: a closure of the slot
        // waits for this write (or refuses it) rather than skip the booking for a claim
        // that might be given back.
        plan.take.push(Take::Admission(plan.answer.slot.clone()));
        plan.take.push(Take::Claim {
            citizen,
            service: service.clone(),
            id,
            unchanged: Some(BookingState::Confirmed),
        });
        plan.free
            .push(match now_unix_ms < end_unix_s.saturating_mul(1_000) {
                true => Free::EntryUntil {
                    citizen,
                    service,
                    id,
                    end_unix_s,
                },
                false => Free::Entry {
                    citizen,
                    service,
                    id,
                },
            });
    }
    plan
}

/// The citizen's own confirmed booking, or why not (another citizen's booking is
/// reported as unknown: ids are not confirmed to strangers).
fn own_confirmed(stored: Option<Booking>, citizen: CitizenKey) -> Result<Booking, DomainError> {
    let booking = stored
        .filter(|booking| booking.citizen == citizen)
        .ok_or(DomainError::NotFound(Missing::Booking))?;
    if !booking.is_confirmed() {
        return Err(DomainError::BookingNotActive(booking.booking_id));
    }
    Ok(booking)
}

/// The citizen cancels its booking; the place returns once the cancel is durable. A
/// booking made through a campaign offer (`registration`) withdraws its registration.
/// The `later` doses of its series (the citizen's confirmed ones) are cancelled in the
/// same write.
pub fn cancel(
    (stored, later): (Option<Booking>, Vec<Booking>),
    citizen: CitizenKey,
    registration: Option<&Registration>,
    request: RequestRecord,
    now_unix_ms: i64,
) -> Result<Plan<Booking>, DomainError> {
    let booking = own_confirmed(stored, citizen)?;
    let service = booking.slot.service_id.clone();
    let id = booking.booking_id;
    let cancelled = Booking {
        state: BookingState::Cancelled {
            at_unix_ms: now_unix_ms,
            reason: CANCELLED_BY_CITIZEN.to_string(),
            request: Some(request),
        },
        ..booking
    };
    let mut plan = Plan {
        // Counted pending in its slot (see `desk_write`).
        take: vec![
            Take::Admission(cancelled.slot.clone()),
            Take::Claim {
                citizen,
                service: service.clone(),
                id,
                unchanged: Some(BookingState::Confirmed),
            },
        ],
        writes: vec![
            Record::Booking(cancelled.clone()),
            Record::Event(Event::booking(&cancelled, now_unix_ms)),
        ],
        free: vec![
            Free::Entry {
                citizen,
                service,
                id,
            },
            Free::Place(cancelled.slot.clone(), cancelled.channel.clone()),
        ],
        answer: cancelled,
    };
    plan.take.push(Take::SameRegistration {
        booking: id,
        registration: registration.map(|r| r.registration_id),
    });
    if let Some(registration) = registration {
        record_registration(&mut plan, registration.withdrawn(now_unix_ms));
    }
    for dose in later {
        cancel_later_dose(&mut plan, dose, now_unix_ms);
    }
    Ok(plan)
}

/// Adds to a cancel's `plan` the cancel of a later `dose` of the same series.
fn cancel_later_dose(plan: &mut Plan<Booking>, dose: Booking, now_unix_ms: i64) {
    let citizen = plan.answer.citizen;
    debug_assert!(dose.citizen == citizen && dose.is_confirmed());
    let (service, id) = (dose.slot.service_id.clone(), dose.booking_id);
    let cancelled = Booking {
        state: BookingState::Cancelled {
            at_unix_ms: now_unix_ms,
            reason: CANCELLED_WITH_EARLIER_DOSE.to_string(),
            request: None,
        },
        ..dose
    };
    // Counted pending in its slot: a closure of that slot waits for this write
    // rather than skip the dose for a claim that might be given back.
    plan.take
        .push(Take::NeighbourAdmission(cancelled.slot.clone()));
    plan.take.push(Take::Claim {
        citizen,
        service: service.clone(),
        id,
        unchanged: Some(BookingState::Confirmed),
    });
    plan.writes
        .push(Record::Event(Event::booking(&cancelled, now_unix_ms)));
    plan.free.push(Free::Entry {
        citizen,
        service,
        id,
    });
    plan.free.push(Free::Place(
        cancelled.slot.clone(),
        cancelled.channel.clone(),
    ));
    plan.writes.push(Record::Booking(cancelled));
}

/// The citizen's booking moves to `new_slot` (same service) as booking `new_id` (with
/// new codes: the old reference stays with the cancelled booking): the old one
/// cancelled and the new one confirmed in one write, or neither. A campaign
/// registration booked with the old one (`registration`) is booked with the new one;
/// a series dose stays the same dose.
pub fn reschedule(
    (stored, registration, neighbours): (
        Option<Booking>,
        Option<&Registration>,
        Option<Neighbours>,
    ),
    citizen: CitizenKey,
    new_slot: Option<&SlotView>,
    (new_id, codes): (BookingId, BookingCodes),
    request: RequestRecord,
    now_unix_ms: i64,
) -> Result<Plan<Booking>, DomainError> {
    let old = own_confirmed(stored, citizen)?;
    let new_slot = new_slot.ok_or(DomainError::NotFound(Missing::Slot))?;
    check_move(&old, &new_slot.key, now_unix_ms)?;
    let neighbour_claims = match neighbours {
        Some(neighbours) => neighbours.check().map(|()| neighbours.confirmed)?,
        None => Vec::new(),
    };
    let new = moved_booking(&old, new_slot, (new_id, codes), request, now_unix_ms);
    let cancelled = rescheduled(old, now_unix_ms);
    // To another site: the old site's watchers see its booking cancelled (`rescheduled`,
    // naming no booking); the reschedule event is only the new site's.
    let moved_away = (cancelled.slot.site_id != new.slot.site_id)
        .then(|| Record::Event(Event::booking(&cancelled, now_unix_ms)));
    let mut plan = Plan {
        take: vec![
            // The old slot counted pending (see `desk_write`).
            Take::Admission(cancelled.slot.clone()),
            Take::Move {
                citizen,
                service: new_slot.key.service_id.clone(),
                from: cancelled.booking_id,
                to: new_id,
                until: (cancelled.end_unix_s, new_slot.end_unix_s),
            },
            Take::SameRegistration {
                booking: cancelled.booking_id,
                registration: registration.map(|r| r.registration_id),
            },
            Take::Place(new_slot.key.clone(), new_slot.channel.clone()),
        ],
        free: vec![
            Free::Place(cancelled.slot.clone(), cancelled.channel.clone()),
            // `Take::Move` claimed the old booking until now.
            Free::Unclaim {
                citizen,
                id: cancelled.booking_id,
            },
        ],
        writes: vec![
            Record::Event(Event::rescheduled(
                cancelled.booking_id,
                &new,
                RESCHEDULED,
                now_unix_ms,
            )),
            Record::Booking(cancelled),
            Record::Booking(new.clone()),
        ],
        answer: new,
    };
    plan.writes.splice(0..0, moved_away);
    pass_gate(new_slot, &mut plan, now_unix_ms)?;
    claim_neighbours(&mut plan, neighbour_claims);
    if let Some(registration) = registration {
        rebook_registration(&mut plan, registration);
    }
    Ok(plan)
}

/// Adds to a reschedule's `plan` a claim on each confirmed neighbouring dose of the
/// series (`Neighbours::confirmed`), so none is cancelled or moved meanwhile.
fn claim_neighbours(plan: &mut Plan<Booking>, neighbours: Vec<(SlotKey, BookingId)>) {
    let citizen = plan.answer.citizen;
    for (slot, id) in neighbours {
        // Counted pending in the neighbour's slot: a closure of it waits for this write
        // (or refuses it), and never skips the neighbour for a claim given back.
        plan.take.push(Take::NeighbourAdmission(slot.clone()));
        plan.take.push(Take::Claim {
            citizen,
            service: slot.service_id,
            id,
            unchanged: Some(BookingState::Confirmed),
        });
        plan.free.push(Free::Unclaim { citizen, id });
    }
}

/// The booking `old` becomes in `new_slot` (the same citizen and series dose, through the
/// channel of the slot view).
fn moved_booking(
    old: &Booking,
    new_slot: &SlotView,
    id_and_codes: (BookingId, BookingCodes),
    request: RequestRecord,
    now_unix_ms: i64,
) -> Booking {
    Booking {
        series: old.series.clone(),
        ..Booking::confirmed(
            id_and_codes,
            (new_slot.key.clone(), new_slot.end_unix_s),
            (old.citizen, new_slot.channel.clone()),
            now_unix_ms,
            request,
        )
    }
}

/// The `old` booking, cancelled by its reschedule at `now`.
fn rescheduled(old: Booking, now_unix_ms: i64) -> Booking {
    Booking {
        state: BookingState::Cancelled {
            at_unix_ms: now_unix_ms,
            // Names no booking: whoever holds the old id must not learn the new one.
            reason: RESCHEDULED.to_string(),
            // The request's outcome is the new booking: only it carries the request.
            request: None,
        },
        ..old
    }
}

/// Booking `old` may move to slot `to`: of the same service, another slot, not started;
/// and `old`'s own slot has not ended. An ended booking no longer counts against its
/// citizen's limit: moved to a slot ahead it would count again beside the booking made
/// since, one more than the limit (and a start would then refuse the store).
fn check_move(old: &Booking, to: &SlotKey, now_unix_ms: i64) -> Result<(), DomainError> {
    let from = &old.slot;
    if old.end_unix_s <= now_unix_ms.div_euclid(1_000) {
        return Err(DomainError::BookingNotActive(old.booking_id));
    }
    if to.service_id != from.service_id {
        return Err(DomainError::invalid(
            "new_slot_id",
            "must be a slot of the booking's own service",
        ));
    }
    if to == from {
        return Err(DomainError::invalid(
            "new_slot_id",
            "is the booking's current slot",
        ));
    }
    check_not_started(to, now_unix_ms)
}

/// Adds to a reschedule's `plan` the campaign registration booked with the old booking,
/// now booked with the new one (the plan's answer).
fn rebook_registration(plan: &mut Plan<Booking>, registration: &Registration) {
    let (citizen, new_id) = (plan.answer.citizen, plan.answer.booking_id);
    // Until the registration knows the new booking, no cancel or move may end it.
    plan.take.push(Take::Claim {
        citizen,
        service: plan.answer.slot.service_id.clone(),
        id: new_id,
        unchanged: None,
    });
    record_registration(plan, registration.booked(new_id));
    plan.free.push(Free::Unclaim {
        citizen,
        id: new_id,
    });
}

/// Holds whose time is up (already taken from the live set) expire; their places and
/// entries return once the expiry is durable. A hold that is a campaign's offer
/// (`offers`: its registration, the campaign's `offers_declined_max` and the
/// registration's next arrival number, or its closed slot) sends its registration back
/// to the line, or exhausts it. Answers how many.
pub fn expire(due: &[Hold], offers: &[(Registration, OfferEnd)], now_unix_ms: i64) -> Plan<usize> {
    let offered: std::collections::HashSet<BookingId> = offers
        .iter()
        .filter_map(|(registration, _)| registration.offer().map(|offer| offer.hold_id))
        .collect();
    let mut plan = Plan {
        take: Vec::new(),
        writes: Vec::with_capacity(2 * due.len()),
        free: Vec::with_capacity(2 * due.len()),
        answer: due.len(),
    };
    for hold in due {
        debug_assert!(hold.time_is_up(now_unix_ms) && hold.state == HoldState::Live);
        plan.writes.push(Record::Hold(Hold {
            state: HoldState::Expired {
                at_unix_ms: now_unix_ms,
            },
            ..hold.clone()
        }));
        plan.writes
            .push(Record::Event(match offered.contains(&hold.hold_id) {
                true => Event::offer_ended(hold, offer_end_reason(offers, hold), now_unix_ms),
                false => Event::hold_expired(hold, HOLD_TIMED_OUT, now_unix_ms),
            }));
        plan.free.push(Free::Entry {
            citizen: hold.citizen,
            service: hold.slot.service_id.clone(),
            id: hold.hold_id,
        });
        plan.free
            .push(Free::Place(hold.slot.clone(), hold.channel.clone()));
    }
    for (registration, end) in offers {
        debug_assert!(registration
            .offer()
            .is_some_and(|offer| due.iter().any(|hold| hold.hold_id == offer.hold_id)));
        record_registration(&mut plan, registration.after_offer(*end));
    }
    plan
}

/// Why an offer `hold` that timed out ended: it expired, or its slot closed.
fn offer_end_reason(offers: &[(Registration, OfferEnd)], hold: &Hold) -> &'static str {
    let end = offers
        .iter()
        .find(|(registration, _)| {
            registration
                .offer()
                .is_some_and(|o| o.hold_id == hold.hold_id)
        })
        .map(|(_, end)| *end);
    match end {
        Some(OfferEnd::SlotClosed) => SLOT_CLOSED,
        _ => OFFER_EXPIRED,
    }
}

/// The reason on an offer that timed out.
pub const OFFER_EXPIRED: &str = "offer expired";
/// The reason on an offer of a slot that closed while it was being accepted.
pub const SLOT_CLOSED: &str = "slot closed";
/// The reason on the hold of a declined offer.
pub const OFFER_DECLINED: &str = "offer declined";
/// The reason on the hold of an offer whose registration was withdrawn.
pub const REGISTRATION_WITHDRAWN: &str = "registration withdrawn";

/// The matcher offers `slot` to an active `registration` of `campaign`: a hold `id`
/// until the offer expires, made through the default channel, written with the
/// registration's offer. An offer counts as held but is not bound by the share of a
/// slot frontends may hold (it is the place itself, not a hoard).
pub fn offer(
    slot: &SlotView,
    (campaign, registration): (&Campaign, &Registration),
    id: BookingId,
    request: RequestRecord,
    now_unix_ms: i64,
) -> Result<Plan<Hold>, DomainError> {
    check_not_started(&slot.key, now_unix_ms)?;
    let expires_at_unix_ms = campaign.offer_expiry(slot.key.start_unix_s, now_unix_ms);
    let citizen = registration.citizen;
    let hold = Hold {
        hold_id: id,
        slot: slot.key.clone(),
        citizen,
        created_at_unix_ms: now_unix_ms,
        expires_at_unix_ms,
        request,
        state: HoldState::Live,
        channel: slot.channel.clone(),
    };
    let [entry, place] = admission(slot, citizen, id);
    let share = Take::HeldShare {
        slot: slot.key.clone(),
        max: u32::MAX,
    };
    let offer = Offer {
        hold_id: id,
        slot: slot.key.clone(),
        offered_at_unix_ms: now_unix_ms,
        expires_at_unix_ms,
    };
    let offered = registration.offered(offer);
    // The registration knows its offer before the hold is live: whoever then takes the
    // hold (the sweeper, a decline) finds the registration it belongs to.
    Ok(Plan {
        take: vec![entry, place, share],
        writes: vec![
            Record::Hold(hold.clone()),
            Record::Event(Event::offer_made(&hold, now_unix_ms)),
            Record::Registration(offered.clone()),
        ],
        free: vec![Free::Registration(offered), Free::LiveHold(hold.clone())],
        answer: hold,
    })
}

/// An offer's `hold` (already taken from the live set) ends before its time: the
/// citizen declined it (`OfferEnd::Counted`) or withdrew. Its place and entry return
/// once durable. Answers the registration as it now is.
pub fn end_offer(
    hold: &Hold,
    registration: &Registration,
    end: OfferEnd,
    now_unix_ms: i64,
) -> Plan<Registration> {
    debug_assert!(registration
        .offer()
        .is_some_and(|offer| offer.hold_id == hold.hold_id));
    let reason = match end {
        OfferEnd::Counted { .. } => OFFER_DECLINED,
        OfferEnd::Withdrawn { .. } => REGISTRATION_WITHDRAWN,
        OfferEnd::SlotClosed => SLOT_CLOSED,
    };
    let next = registration.after_offer(end);
    let mut plan = Plan {
        take: Vec::new(),
        writes: vec![
            Record::Hold(Hold {
                state: HoldState::Expired {
                    at_unix_ms: now_unix_ms,
                },
                ..hold.clone()
            }),
            Record::Event(Event::offer_ended(hold, reason, now_unix_ms)),
        ],
        free: vec![
            Free::Entry {
                citizen: hold.citizen,
                service: hold.slot.service_id.clone(),
                id: hold.hold_id,
            },
            Free::Place(hold.slot.clone(), hold.channel.clone()),
        ],
        answer: next.clone(),
    };
    record_registration(&mut plan, next);
    plan
}

/// An active registration (claimed) is withdrawn.
pub fn withdraw(registration: &Registration, now_unix_ms: i64) -> Plan<Registration> {
    let next = registration.withdrawn(now_unix_ms);
    let mut plan = Plan {
        take: Vec::new(),
        writes: Vec::new(),
        free: Vec::new(),
        answer: next.clone(),
    };
    record_registration(&mut plan, next);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::{RequestFingerprint, RequestKey, SiteId};

    const NOW: i64 = 1_000_000_000;
    const ALICE: CitizenKey = CitizenKey([1; 16]);
    const BOB: CitizenKey = CitizenKey([2; 16]);

    fn slot(service: &str, start_unix_s: i64) -> SlotView {
        SlotView {
            key: SlotKey {
                site_id: SiteId::parse("s", "site", 64).unwrap(),
                service_id: ServiceId::parse("s", service, 64).unwrap(),
                start_unix_s,
            },
            end_unix_s: start_unix_s + 900,
            capacity: 10,
            gate: Gate::Open,
            channel: ChannelId::web(),
        }
    }

    fn request(seed: u8) -> RequestRecord {
        RequestRecord {
            key: RequestKey([seed; 16]),
            fingerprint: RequestFingerprint([seed; 16]),
        }
    }

    /// A new booking's id with codes.
    fn new(id: u128) -> (BookingId, BookingCodes) {
        let codes = BookingCodes {
            reference: crate::domain::booking::Reference::from_bits(id as u64),
            check_in_code: 1234,
        };
        (BookingId(id), codes)
    }

    fn booking_of(citizen: CitizenKey, at: &SlotView) -> Booking {
        Booking::confirmed(
            new(7),
            (at.key.clone(), at.end_unix_s),
            (citizen, ChannelId::web()),
            0,
            request(1),
        )
    }

    fn cancelled(booking: Booking) -> Booking {
        Booking {
            state: BookingState::Cancelled {
                at_unix_ms: 1,
                reason: "x".into(),
                request: None,
            },
            ..booking
        }
    }

    fn reason<T: std::fmt::Debug>(result: Result<Plan<T>, DomainError>) -> String {
        match result {
            Ok(plan) => {
                plan.assert_balanced();
                "OK".into()
            }
            Err(DomainError::Invalid(v)) => format!("INVALID {}", v[0].description),
            Err(error) => format!("{error:?}")
                .split(['(', ' '])
                .next()
                .unwrap()
                .to_string(),
        }
    }

    /// Each case's outcome (`reason`) against the one wanted.
    fn check_table(cases: &[(String, &str)]) {
        for (index, (got, want)) in cases.iter().enumerate() {
            assert_eq!(got, want, "case {index}");
        }
    }

    #[test]
    fn booking_and_holding_refuse_a_started_slot_only() {
        let future = slot("vax", NOW / 1_000 + 1);
        let started = slot("vax", NOW / 1_000);
        let cases = [
            (reason(book(&future, ALICE, new(1), request(1), NOW)), "OK"),
            (
                reason(book(&started, ALICE, new(1), request(1), NOW)),
                "SlotStarted",
            ),
            (
                reason(hold(
                    &future,
                    ALICE,
                    BookingId(1),
                    request(1),
                    (60, 50),
                    NOW,
                )),
                "OK",
            ),
            (
                reason(hold(
                    &started,
                    ALICE,
                    BookingId(1),
                    request(1),
                    (60, 50),
                    NOW,
                )),
                "SlotStarted",
            ),
        ];
        check_table(&cases);
    }

    #[test]
    fn a_booking_takes_an_entry_then_a_place_and_writes_one_confirmed_booking() {
        let at = slot("vax", NOW);
        let plan = book(&at, ALICE, new(9), request(1), NOW).unwrap();
        assert_eq!(
            plan.take,
            [
                Take::Entry {
                    citizen: ALICE,
                    service: at.key.service_id.clone(),
                    id: BookingId(9),
                    until_unix_s: at.end_unix_s,
                },
                Take::Place(at.key.clone(), ChannelId::web())
            ]
        );
        assert_eq!(
            plan.writes,
            [
                Record::Booking(plan.answer.clone()),
                Record::Event(Event::booking(&plan.answer, NOW))
            ]
        );
        assert!(plan.answer.is_confirmed() && plan.free.is_empty());
    }

    #[test]
    fn a_hold_expires_after_its_ttl_and_is_live_once_durable() {
        let plan = hold(
            &slot("vax", NOW),
            ALICE,
            BookingId(3),
            request(1),
            (60, 50),
            NOW,
        )
        .unwrap();
        assert_eq!(plan.answer.expires_at_unix_ms, NOW + 60_000);
        assert_eq!(plan.free, [Free::LiveHold(plan.answer.clone())]);
    }

    #[test]
    fn cancelling_needs_the_owners_confirmed_booking() {
        let at = slot("vax", NOW);
        let cases = [
            (
                reason(cancel((None, Vec::new()), ALICE, None, request(2), NOW)),
                "NotFound",
            ),
            (
                reason(cancel(
                    (Some(booking_of(BOB, &at)), Vec::new()),
                    ALICE,
                    None,
                    request(2),
                    NOW,
                )),
                "NotFound",
            ),
            (
                reason(cancel(
                    (Some(cancelled(booking_of(ALICE, &at))), Vec::new()),
                    ALICE,
                    None,
                    request(2),
                    NOW,
                )),
                "BookingNotActive",
            ),
            (
                reason(cancel(
                    (Some(booking_of(ALICE, &at)), Vec::new()),
                    ALICE,
                    None,
                    request(2),
                    NOW,
                )),
                "OK",
            ),
        ];
        check_table(&cases);
    }

    #[test]
    fn the_desk_settles_a_booking_within_its_window_and_frees_the_citizens_entry() {
        let at = slot("vax", NOW);
        let code = booking_of(ALICE, &at).codes.unwrap().check_in_code;
        let start_ms = at.key.start_unix_s * 1_000;
        let hour = 3_600_000;
        let check = |booking: Booking, code: u16, now: i64| check_in(booking, code, 24, now);
        let mine = || booking_of(ALICE, &at);
        assert_eq!(
            check(mine(), code + 1, start_ms),
            Err(DomainError::CheckInCodeWrong)
        );
        assert!(matches!(
            check(mine(), code, start_ms - 25 * hour),
            Err(DomainError::CheckInClosed { .. })
        ));
        // Outside the window a wrong code answers the same: no oracle, no counted try.
        assert!(matches!(
            check(mine(), code + 1, start_ms - 25 * hour),
            Err(DomainError::CheckInClosed { .. })
        ));
        let Ok(DeskChange::Write(plan)) = check(mine(), code, start_ms - hour) else {
            panic!("a check-in an hour before is written");
        };
        plan.assert_balanced();
        assert!(matches!(
            &plan.take[..],
            [
                Take::Admission(slot),
                Take::Claim {
                    unchanged: Some(BookingState::Confirmed),
                    ..
                }
            ] if *slot == plan.answer.slot
        ));
        // Before its slot ended the entry keeps counting until then; after, it leaves.
        let end = plan.answer.end_unix_s;
        assert!(
            matches!(&plan.free[..], [Free::EntryUntil { end_unix_s, .. }] if *end_unix_s == end)
        );
        let Ok(DeskChange::Write(plan)) = check(mine(), code, end * 1_000) else {
            panic!("a check-in as the slot ends is written");
        };
        assert!(matches!(&plan.free[..], [Free::Entry { .. }]));
        // A late arrival after a no-show: no entry left to claim or free.
        let missed = Booking {
            state: BookingState::NoShow {
                at_unix_ms: start_ms,
            },
            ..mine()
        };
        let Ok(DeskChange::Write(plan)) = check(missed, code, start_ms + hour) else {
            panic!("a no-show checks in late");
        };
        assert!(plan.take.is_empty() && plan.free.is_empty());
        // Attended: checking in again returns it within the window; outside it, any
        // code answers CheckInClosed (no oracle for the code).
        let attended = plan.answer;
        assert!(matches!(
            check(attended.clone(), code, start_ms + hour),
            Ok(DeskChange::AlreadyDone(_))
        ));
        for tried in [code, code + 1] {
            assert!(matches!(
                check(attended.clone(), tried, start_ms + 49 * hour),
                Err(DomainError::CheckInClosed { .. })
            ));
        }
        // No-shows only after the end; twice is the same.
        assert_eq!(
            mark_no_show(mine(), start_ms),
            Err(DomainError::SlotNotEnded)
        );
        let ended_ms = at.end_unix_s * 1_000;
        let Ok(DeskChange::Write(plan)) = mark_no_show(mine(), ended_ms) else {
            panic!("a no-show after the end is written");
        };
        assert!(matches!(&plan.free[..], [Free::Entry { .. }]));
        assert!(matches!(
            mark_no_show(plan.answer, ended_ms),
            Ok(DeskChange::AlreadyDone(_))
        ));
    }

    #[test]
    fn a_cancel_claims_first_and_frees_entry_and_place_only_once_durable() {
        let at = slot("vax", NOW);
        let plan = cancel(
            (Some(booking_of(ALICE, &at)), Vec::new()),
            ALICE,
            None,
            request(2),
            NOW,
        )
        .unwrap();
        // Its slot counted pending first: a closure waits for the cancel, never skips
        // the booking for a claim the cancel might give back.
        assert!(matches!(
            &plan.take[..],
            [
                Take::Admission(slot),
                Take::Claim { .. },
                Take::SameRegistration { booking: BookingId(7), registration: None }
            ] if *slot == at.key
        ));
        assert_eq!(plan.free.len(), 2);
        assert!(matches!(
            &plan.answer.state,
            BookingState::Cancelled { reason, request: Some(_), .. } if reason == CANCELLED_BY_CITIZEN
        ));
    }

    #[test]
    fn rescheduling_checks_service_slot_and_start() {
        let at = slot("vax", NOW);
        let mine = || Some(booking_of(ALICE, &at));
        let plan = |to: &SlotView| {
            reason(reschedule(
                (mine(), None, None),
                ALICE,
                Some(to),
                new(8),
                request(3),
                NOW,
            ))
        };
        let cases = [
            (
                plan(&slot("other", NOW)),
                "INVALID must be a slot of the booking's own service",
            ),
            (plan(&at), "INVALID is the booking's current slot"),
            (plan(&slot("vax", NOW / 1_000 - 60)), "SlotStarted"),
            (plan(&slot("vax", NOW + 900)), "OK"),
            (
                // An appointment that is over is not moved (it no longer counts).
                reason(reschedule(
                    (
                        Some(booking_of(ALICE, &slot("vax", NOW / 1_000 - 7_200))),
                        None,
                        None,
                    ),
                    ALICE,
                    Some(&slot("vax", NOW + 900)),
                    new(8),
                    request(3),
                    NOW,
                )),
                "BookingNotActive",
            ),
            (
                reason(reschedule(
                    (None, None, None),
                    ALICE,
                    Some(&slot("vax", NOW + 900)),
                    new(8),
                    request(3),
                    NOW,
                )),
                "NotFound",
            ),
            (
                reason(reschedule(
                    (mine(), None, None),
                    ALICE,
                    None,
                    new(8),
                    request(3),
                    NOW,
                )),
                "NotFound",
            ),
        ];
        check_table(&cases);
    }

    #[test]
    fn a_reschedule_moves_the_entry_takes_the_new_place_and_frees_the_old_once_durable() {
        let at = slot("vax", NOW);
        let to = slot("vax", NOW + 900);
        let plan = reschedule(
            (Some(booking_of(ALICE, &at)), None, None),
            ALICE,
            Some(&to),
            new(8),
            request(3),
            NOW,
        )
        .unwrap();
        assert!(matches!(
            &plan.take[..],
            [
                Take::Admission(old),
                Take::Move {
                    from: BookingId(7),
                    to: BookingId(8),
                    ..
                },
                Take::SameRegistration { booking: BookingId(7), registration: None },
                Take::Place(..)
            ] if *old == at.key
        ));
        assert_eq!(
            plan.free,
            [
                Free::Place(at.key.clone(), ChannelId::web()),
                Free::Unclaim {
                    citizen: ALICE,
                    id: BookingId(7)
                }
            ]
        );
        assert_eq!(plan.writes.len(), 3);
        // One event says both: the new booking, and which one it replaced.
        let Record::Event(event) = &plan.writes[0] else {
            panic!("a reschedule's first write is its event");
        };
        assert_eq!(
            event.kind,
            crate::domain::event::EventKind::BookingRescheduled
        );
        assert_eq!(event.previous_booking_id, Some(BookingId(7)));
        assert_eq!(
            event.booking.as_ref().map(|b| b.booking_id),
            Some(BookingId(8))
        );
        assert_eq!(plan.answer.slot, to.key);
    }

    #[test]
    fn expiry_frees_each_holds_entry_and_place() {
        let at = slot("vax", NOW);
        let due: Vec<Hold> = (0..3)
            .map(|id| {
                hold(&at, ALICE, BookingId(id), request(1), (1, 50), 0)
                    .map(|plan| plan.answer)
                    .unwrap()
            })
            .collect();
        let plan = expire(&due, &[], NOW);
        plan.assert_balanced();
        assert_eq!((plan.answer, plan.writes.len(), plan.free.len()), (3, 6, 6));
    }

    #[test]
    fn a_confirmed_hold_keeps_its_place_and_a_lost_hold_says_why() {
        let at = slot("vax", NOW);
        let live = hold(&at, ALICE, BookingId(5), request(1), (60, 50), 0)
            .unwrap()
            .answer;
        let plan = confirm_hold(&at, (&live, new(90).1), None, request(2), NOW).unwrap();
        plan.assert_balanced();
        assert_eq!(plan.answer.booking_id, live.hold_id);
        let expired = Hold {
            state: HoldState::Expired { at_unix_ms: 1 },
            ..live.clone()
        };
        let unknown = NotConfirmable::Unknown;
        let open = (live.expires_at_unix_ms - 1, false);
        assert_eq!(
            not_confirmable(unknown, Some(&expired), (ALICE, &at.key), open),
            DomainError::HoldExpired
        );
        assert_eq!(
            not_confirmable(unknown, Some(&expired), (BOB, &at.key), open),
            DomainError::NotFound(Missing::Hold)
        );
        assert_eq!(
            not_confirmable(unknown, None, (ALICE, &at.key), open),
            DomainError::NotFound(Missing::Hold)
        );
        assert_eq!(
            not_confirmable(NotConfirmable::Expired, None, (ALICE, &at.key), open),
            DomainError::HoldExpired
        );
        // Stored live, gone from the live set: the sweeper took it once its time was up
        // (it answered NOT_FOUND), a closure took it, or another confirm is using it.
        let due = (live.expires_at_unix_ms, false);
        assert_eq!(
            not_confirmable(unknown, Some(&live), (ALICE, &at.key), due),
            DomainError::HoldExpired
        );
        assert_eq!(
            not_confirmable(unknown, Some(&live), (ALICE, &at.key), (open.0, true)),
            DomainError::SlotClosed(at.key.clone())
        );
        assert_eq!(
            not_confirmable(unknown, Some(&live), (ALICE, &at.key), open),
            DomainError::NotFound(Missing::Hold)
        );
        assert_eq!(
            not_confirmable(unknown, Some(&expired), (ALICE, &at.key), (open.0, true)),
            DomainError::SlotClosed(at.key.clone()),
            "the closure's write landed: the same answer"
        );
        assert_eq!(
            not_confirmable(unknown, Some(&live), (BOB, &at.key), (open.0, true)),
            DomainError::NotFound(Missing::Hold)
        );
    }

    fn campaign_and_registration() -> (Campaign, Registration) {
        use crate::domain::campaign::{Preferences, RegistrationState};
        use crate::domain::ids::{CampaignId, RegionId};
        let campaign = Campaign {
            campaign_id: CampaignId::parse("c", "c", 64).unwrap(),
            service_id: ServiceId::parse("s", "vax", 64).unwrap(),
            region_id: RegionId::parse("r", "r", 64).unwrap(),
            offer_ttl_seconds: 60,
            offers_declined_max: 2,
            last_minute_hours: 24,
            waves: Vec::new(),
            seed: [0; 32],
            created_at_unix_ms: 0,
            ends_at_unix_ms: None,
        };
        let registration = Registration {
            registration_id: BookingId(1),
            campaign_id: campaign.campaign_id.clone(),
            citizen: ALICE,
            birth_year: None,
            groups: Vec::new(),
            preferences: Preferences::default(),
            registered_at_unix_ms: 0,
            arrival: 0,
            declines: 0,
            state: RegistrationState::Active,
            requests: Vec::new(),
        };
        (campaign, registration)
    }

    /// A reschedule that made a campaign booking settles its registration just before
    /// it unclaims the booking: a cancel or move planned from a read before that must
    /// find, once it has claimed, the registration it read, or be refused.
    #[test]
    fn cancels_and_moves_check_the_registration_they_read_once_claimed() {
        let (_, registration) = campaign_and_registration();
        let (at, to) = (slot("vax", NOW), slot("vax", NOW + 900));
        let checks = |plan: &Plan<Booking>| -> Vec<Option<BookingId>> {
            let after_claim = plan
                .take
                .iter()
                .skip_while(|t| !matches!(t, Take::Claim { .. } | Take::Move { .. }))
                .nth(1);
            match after_claim {
                Some(Take::SameRegistration {
                    booking: BookingId(7),
                    registration,
                }) => vec![*registration],
                other => panic!("no registration check after the claim: {other:?}"),
            }
        };
        for read in [None, Some(&registration)] {
            let mine = (Some(booking_of(ALICE, &at)), Vec::new());
            let cancelled = cancel(mine, ALICE, read, request(2), NOW).unwrap();
            let mine = (Some(booking_of(ALICE, &at)), read, None);
            let moved = reschedule(mine, ALICE, Some(&to), new(8), request(3), NOW).unwrap();
            let expected = vec![read.map(|r| r.registration_id)];
            assert_eq!(checks(&cancelled), expected);
            assert_eq!(checks(&moved), expected);
        }
    }

    #[test]
    fn an_offer_is_a_hold_written_with_its_registration_and_ends_balanced() {
        let at = slot("vax", NOW);
        let (campaign, registration) = campaign_and_registration();
        let plan = offer(
            &at,
            (&campaign, &registration),
            BookingId(4),
            request(1),
            NOW,
        )
        .unwrap();
        plan.assert_balanced();
        assert_eq!(plan.answer.expires_at_unix_ms, NOW + 60_000);
        assert!(matches!(
            plan.take[2],
            Take::HeldShare { max: u32::MAX, .. }
        ));
        let Record::Registration(offered) = &plan.writes[2] else {
            panic!("the registration is written with its offer's hold");
        };
        assert_eq!(offered.offer().map(|o| o.hold_id), Some(BookingId(4)));
        let hold = plan.answer.clone();
        let accepted =
            confirm_hold(&at, (&hold, new(91).1), Some(offered), request(2), NOW).unwrap();
        accepted.assert_balanced();
        assert!(accepted.writes.iter().any(|w| matches!(w,
            Record::Registration(r) if r.state == crate::domain::campaign::RegistrationState::Booked { booking_id: BookingId(4) })));
        let counted = OfferEnd::Counted {
            declined_max: 2,
            arrival: 9,
        };
        let declined = end_offer(&hold, offered, counted, NOW);
        declined.assert_balanced();
        assert_eq!(declined.answer.declines, 1);
        let expired = expire(
            std::slice::from_ref(&hold),
            &[(
                offered.clone(),
                OfferEnd::Counted {
                    declined_max: 1,
                    arrival: 10,
                },
            )],
            NOW + 60_000,
        );
        expired.assert_balanced();
        assert!(expired.writes.iter().any(|w| matches!(w,
            Record::Registration(r) if r.state == crate::domain::campaign::RegistrationState::Exhausted)));
    }

    #[test]
    fn a_group_takes_every_entry_before_any_place_and_books_each_member() {
        let at = slot("vax", NOW);
        let members = [(at.clone(), ALICE, new(1)), (at.clone(), BOB, new(2))];
        let plan = book_group(&members, request(1), NOW).unwrap();
        plan.assert_balanced();
        let kinds: Vec<&str> = plan
            .take
            .iter()
            .map(|take| match take {
                Take::Entry { .. } => "entry",
                Take::Place(..) => "place",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["entry", "entry", "place", "place"]);
        let owners: Vec<CitizenKey> = plan.answer.iter().map(|b| b.citizen).collect();
        assert_eq!(owners, [ALICE, BOB]);
        let started = slot("vax", NOW / 1_000);
        let late = [(started, ALICE, new(1))];
        assert_eq!(reason(book_group(&late, request(1), NOW)), "SlotStarted");
        // Each member passes the gate for itself: one admitted ticket admits one.
        let queued = |ticket: Option<Ticket>| SlotView {
            gate: Gate::Queue {
                ticket,
                release_at_unix_ms: 0,
                channel_reserve: false,
            },
            ..at.clone()
        };
        let admitted = |citizen: CitizenKey| Ticket {
            release_id: crate::domain::ids::ReleaseId::parse("r", "r", 64).unwrap(),
            citizen,
            joined_at_unix_ms: 0,
            drawn: true,
            arrival: 0,
            admitted: Some(crate::domain::release::Admitted {
                at_unix_ms: 0,
                until_unix_ms: NOW + 1,
            }),
            used: false,
        };
        let one_ticket = [
            (queued(Some(admitted(ALICE))), ALICE, new(1)),
            (queued(None), BOB, new(2)),
        ];
        assert_eq!(
            reason(book_group(&one_ticket, request(1), NOW)),
            "NotAdmitted"
        );
        let two_tickets = [
            (queued(Some(admitted(ALICE))), ALICE, new(1)),
            (queued(Some(admitted(BOB))), BOB, new(2)),
        ];
        let plan = book_group(&two_tickets, request(1), NOW).unwrap();
        let used = plan
            .free
            .iter()
            .filter(|free| matches!(free, Free::TicketUsed(_)))
            .count();
        assert_eq!(used, 2);
        // Through a channel with a reserve, a member without a ticket takes a place of
        // that reserve; one with a ticket uses it and takes any place.
        let reserving = |ticket: Option<Ticket>| SlotView {
            gate: Gate::Queue {
                ticket,
                release_at_unix_ms: 0,
                channel_reserve: true,
            },
            ..at.clone()
        };
        let members = [
            (reserving(None), ALICE, new(1)),
            (reserving(Some(admitted(BOB))), BOB, new(2)),
        ];
        let plan = book_group(&members, request(1), NOW).unwrap();
        plan.assert_balanced();
        let places: Vec<&Take> = plan
            .take
            .iter()
            .filter(|take| matches!(take, Take::Place(..) | Take::ReservedPlace(..)))
            .collect();
        assert_eq!(
            places,
            [
                &Take::ReservedPlace(at.key.clone(), ChannelId::web()),
                &Take::Place(at.key.clone(), ChannelId::web())
            ]
        );
    }

    #[test]
    #[should_panic(expected = "a plan's places must match its writes")]
    fn an_unbalanced_plan_is_caught() {
        let mut plan = book(&slot("vax", NOW), ALICE, new(1), request(1), 0).unwrap();
        plan.take.pop();
        plan.assert_balanced();
    }
}
