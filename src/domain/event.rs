//! Events: what changed for a booking, a hold or a slot, as reminder and closure-notice
//! gateways read it (`WatchEvents`). Each is written in the same atomic commit as its
//! change (an outbox); the store numbers them in commit order. Never carries who: no
//! citizen id, hash, request or check-in code. A booking's reference and series dose
//! are carried, as the desk's roster and the authority's export show them: what a
//! reminder gateway quotes to the citizen.

use crate::domain::booking::{Booking, BookingState, Reference};
use crate::domain::hold::Hold;
use crate::domain::ids::{BookingId, SeriesId, SlotKey};

/// The reason on a hold that timed out.
pub const HOLD_TIMED_OUT: &str = "hold expired";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    BookingConfirmed,
    BookingCancelled,
    BookingRescheduled,
    HoldExpired,
    SlotClosed,
    CapacityChanged,
    /// A campaign offered the slot's place to a registration (a hold, `hold_id`).
    OfferMade,
    /// An offer gave its place back: declined, expired, withdrawn or its slot closed.
    OfferEnded,
    /// The desk checked the booking in (`SiteService.CheckIn`).
    CheckedIn,
    /// The desk marked the booking a no-show after its slot ended.
    NoShow,
}

/// A booking as an event shows it, at the time of the event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventBooking {
    pub booking_id: BookingId,
    pub end_unix_s: i64,
    pub created_at_unix_ms: i64,
    /// Set when the event cancelled it; the reason is the event's.
    pub cancelled_at_unix_ms: Option<i64>,
    /// `None` for bookings made before references, and in events stored before events
    /// carried it.
    pub reference: Option<Reference>,
    /// The series and dose (from 1) of a `BookSeries` booking; `None` also in events
    /// stored before events carried it.
    pub series: Option<(SeriesId, u8)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub at_unix_ms: i64,
    pub slot: SlotKey,
    /// The booking of a `Booking*` event (for a reschedule: the new one).
    pub booking: Option<EventBooking>,
    /// The hold of a `HoldExpired` event.
    pub hold_id: Option<BookingId>,
    /// The booking a reschedule replaced.
    pub previous_booking_id: Option<BookingId>,
    /// Why: the cancel or closure reason, "rescheduled", "hold expired"; empty otherwise.
    pub reason: String,
    /// The slot's capacity after a `CapacityChanged`.
    pub capacity: Option<u32>,
}

impl Event {
    fn of_slot(kind: EventKind, slot: &SlotKey, at_unix_ms: i64) -> Self {
        Self {
            kind,
            at_unix_ms,
            slot: slot.clone(),
            booking: None,
            hold_id: None,
            previous_booking_id: None,
            reason: String::new(),
            capacity: None,
        }
    }

    /// `BookingConfirmed`, `BookingCancelled`, `CheckedIn` or `NoShow`, as `booking`'s
    /// state says.
    pub fn booking(booking: &Booking, at_unix_ms: i64) -> Self {
        let (kind, cancelled_at, reason) = match &booking.state {
            BookingState::Confirmed => (EventKind::BookingConfirmed, None, String::new()),
            BookingState::Attended { .. } => (EventKind::CheckedIn, None, String::new()),
            BookingState::NoShow { .. } => (EventKind::NoShow, None, String::new()),
            BookingState::Cancelled {
                at_unix_ms, reason, ..
            } => (
                EventKind::BookingCancelled,
                Some(*at_unix_ms),
                reason.clone(),
            ),
        };
        Self {
            booking: Some(EventBooking {
                booking_id: booking.booking_id,
                end_unix_s: booking.end_unix_s,
                created_at_unix_ms: booking.created_at_unix_ms,
                cancelled_at_unix_ms: cancelled_at,
                reference: booking.codes.map(|codes| codes.reference),
                series: (booking.series.as_ref()).map(|s| (s.series_id.clone(), s.dose)),
            }),
            reason,
            ..Self::of_slot(kind, &booking.slot, at_unix_ms)
        }
    }

    /// The booking `previous` moved to `new` (confirmed).
    pub fn rescheduled(previous: BookingId, new: &Booking, reason: &str, at_unix_ms: i64) -> Self {
        Self {
            kind: EventKind::BookingRescheduled,
            previous_booking_id: Some(previous),
            reason: reason.to_string(),
            ..Self::booking(new, at_unix_ms)
        }
    }

    /// The live `hold` gave its place back: timed out, or its slot closed (`reason`).
    pub fn hold_expired(hold: &Hold, reason: &str, at_unix_ms: i64) -> Self {
        Self {
            hold_id: Some(hold.hold_id),
            reason: reason.to_string(),
            ..Self::of_slot(EventKind::HoldExpired, &hold.slot, at_unix_ms)
        }
    }

    /// A campaign offered `hold`'s place to a registration.
    pub fn offer_made(hold: &Hold, at_unix_ms: i64) -> Self {
        Self {
            hold_id: Some(hold.hold_id),
            ..Self::of_slot(EventKind::OfferMade, &hold.slot, at_unix_ms)
        }
    }

    /// The offer `hold` gave its place back (`reason`: declined, expired, withdrawn,
    /// closed).
    pub fn offer_ended(hold: &Hold, reason: &str, at_unix_ms: i64) -> Self {
        Self {
            hold_id: Some(hold.hold_id),
            reason: reason.to_string(),
            ..Self::of_slot(EventKind::OfferEnded, &hold.slot, at_unix_ms)
        }
    }

    pub fn slot_closed(slot: &SlotKey, reason: &str, at_unix_ms: i64) -> Self {
        Self {
            reason: reason.to_string(),
            ..Self::of_slot(EventKind::SlotClosed, slot, at_unix_ms)
        }
    }

    /// The slot's capacity is now `capacity` (set, republished, or a closed slot reopened).
    pub fn capacity_changed(slot: &SlotKey, capacity: u32, at_unix_ms: i64) -> Self {
        Self {
            capacity: Some(capacity),
            ..Self::of_slot(EventKind::CapacityChanged, slot, at_unix_ms)
        }
    }
}

/// An event with its place in the log: sequences start at 1, with no gaps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequencedEvent {
    pub sequence: u64,
    pub event: Event,
}
