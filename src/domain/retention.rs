//! What retention forgets, and when: pure rules over stored records and the time now.
//!
//! Three windows (PRODUCT.md A): records of finished requests are kept
//! `request_records_retained_hours`, everything about a slot (its bookings, holds, the
//! slot itself) until `records_retained_days` after it ended, and events
//! `events_retained_hours`. 0 keeps for good. A finished hold goes at whichever of its
//! request's and its slot's windows passes first.

use crate::domain::booking::{Booking, BookingState};
use crate::domain::hold::{Hold, HoldState};

const MS_PER_HOUR: i64 = 3_600_000;
const S_PER_DAY: i64 = 86_400;

/// Retention's time runs at most this many times as fast as time passes: a clock set
/// wrong ahead (or one far ahead of the store at a start) deletes nothing at once, and
/// early only by as long as it has run wrong; a gap between the two (a long stop) is
/// caught up in as long as the gap.
pub const RETENTION_TIME_PACE: i64 = 2;

/// The time retention's windows count from (`Cutoffs::at`), `elapsed_ms` of passing time
/// after it was `previous_ms`, on a clock that says `now_ms`: the clock's time, but never
/// more than [`RETENTION_TIME_PACE`] × `elapsed_ms` past `previous_ms`. A clock set back
/// is followed at once (that deletes later, never earlier).
pub fn retention_time(previous_ms: i64, elapsed_ms: i64, now_ms: i64) -> i64 {
    let paced = elapsed_ms.max(0).saturating_mul(RETENTION_TIME_PACE);
    now_ms.min(previous_ms.saturating_add(paced))
}

/// Where retention's time starts when the store opens: at `stored_ms` (the time its
/// last pass stored, else the store's newest write) if the clock says later, so a clock
/// far ahead at a start (or a long stop) deletes nothing at once; at the clock's time
/// otherwise.
pub fn retention_start(now_ms: i64, stored_ms: Option<i64>) -> i64 {
    stored_ms.map_or(now_ms, |stored| stored.min(now_ms))
}

/// The three retention windows as cut-off times, fixed for one pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cutoffs {
    /// Request records made before this are forgotten (`i64::MIN`: none are).
    pub requests_before_unix_ms: i64,
    /// Slots that ended before this are deleted with their records (`i64::MIN`: none).
    pub slots_ended_before_unix_s: i64,
    /// Events written before this are deleted (`i64::MIN`: none are).
    pub events_before_unix_ms: i64,
}

impl Cutoffs {
    pub fn at(
        now_unix_ms: i64,
        (request_hours, record_days, event_hours): (u32, u32, u32),
    ) -> Self {
        let back = |window: i64, now: i64| match window {
            0 => i64::MIN,
            window => now.saturating_sub(window),
        };
        Self {
            requests_before_unix_ms: back(i64::from(request_hours) * MS_PER_HOUR, now_unix_ms),
            slots_ended_before_unix_s: back(
                i64::from(record_days) * S_PER_DAY,
                now_unix_ms.div_euclid(1_000),
            ),
            events_before_unix_ms: back(i64::from(event_hours) * MS_PER_HOUR, now_unix_ms),
        }
    }

    /// An event written at `at_unix_ms` is still kept.
    pub fn keeps_event(&self, at_unix_ms: i64) -> bool {
        at_unix_ms >= self.events_before_unix_ms
    }

    /// A request made at `at_unix_ms` is still remembered.
    pub fn keeps_request(&self, at_unix_ms: i64) -> bool {
        at_unix_ms >= self.requests_before_unix_ms
    }

    /// A campaign that ends at `ends_at_unix_ms` (`None`: not set) is still kept, with
    /// its registrations: like a slot, until `records_retained_days` after its end.
    pub fn keeps_campaign(&self, ends_at_unix_ms: Option<i64>) -> bool {
        ends_at_unix_ms.is_none_or(|ends_at| self.keeps_slot(ends_at.div_euclid(1_000)))
    }

    /// A slot that ends at `end_unix_s` is still kept, with its bookings and holds.
    pub fn keeps_slot(&self, end_unix_s: i64) -> bool {
        end_unix_s >= self.slots_ended_before_unix_s
    }

    /// A hold's record is kept while it is live, while its request is remembered and
    /// while its slot is kept. `slot_end_unix_s` is its slot's end, if the catalog has the
    /// slot (without one, only the request window counts).
    pub fn keeps_hold(&self, hold: &Hold, slot_end_unix_s: Option<i64>) -> bool {
        hold.state == HoldState::Live
            || (self.keeps_request(hold.created_at_unix_ms)
                && slot_end_unix_s.is_none_or(|end| self.keeps_slot(end)))
    }

    /// Every hold made in this second (`hold::hold_second`) or later is kept, whatever
    /// its state: its request is remembered, and its slot, which started after the hold
    /// was made (`plans::check_not_started`), ends after both cut-offs. Holds are stored
    /// in the order they were made, so retention stops reading them there.
    pub fn keeps_holds_from_second(&self) -> u32 {
        let requests_s = self.requests_before_unix_ms.div_euclid(1_000)
            + i64::from(self.requests_before_unix_ms.rem_euclid(1_000) != 0);
        let from = requests_s.max(self.slots_ended_before_unix_s);
        u32::try_from(from.max(0)).unwrap_or(u32::MAX)
    }

    /// Every slot that starts at or after this second is kept, with its bookings: a
    /// slot ends after it starts. Retention reads only the bookings of earlier slots.
    pub fn keeps_slots_started_from(&self) -> i64 {
        self.slots_ended_before_unix_s
    }

    /// A booking's record is kept while its slot is (the slot's end if the slot exists,
    /// else the end the booking was made for), and while the request that cancelled it
    /// is remembered for a while (`keeps_answer_to`): a cancel made after its slot
    /// ended is answered again when retried.
    pub fn keeps_booking(&self, booking: &Booking, slot_end_unix_s: Option<i64>) -> bool {
        self.keeps_slot(slot_end_unix_s.unwrap_or(booking.end_unix_s))
            || cancel_request(booking)
                .is_some_and(|(_, at_unix_ms)| self.keeps_answer_to(at_unix_ms))
    }

    /// Whether a record that answered a request made at `at_unix_ms` must outlive its
    /// own window for the request's retry: while the request is remembered, if requests
    /// are forgotten at all (with `request_records_retained_hours = 0` they never are,
    /// and the records' own window decides).
    pub fn keeps_answer_to(&self, at_unix_ms: i64) -> bool {
        self.requests_before_unix_ms != i64::MIN && self.keeps_request(at_unix_ms)
    }
}

/// The requests a booking record remembers, with their times: the one that made it and,
/// if it was cancelled by a request, the cancel.
pub fn booking_requests(
    booking: &Booking,
) -> impl Iterator<Item = (crate::domain::booking::RequestRecord, i64)> {
    std::iter::once((booking.request, booking.created_at_unix_ms)).chain(cancel_request(booking))
}

/// The request that cancelled a booking, with its time, if a request did.
fn cancel_request(booking: &Booking) -> Option<(crate::domain::booking::RequestRecord, i64)> {
    match &booking.state {
        BookingState::Cancelled {
            at_unix_ms,
            request: Some(request),
            ..
        } => Some((*request, *at_unix_ms)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::booking::RequestRecord;
    use crate::domain::ids::{
        BookingId, CitizenKey, RequestFingerprint, RequestKey, ServiceId, SiteId, SlotKey,
    };

    const NOW_MS: i64 = 1_800_000_000_000;
    const HOUR_MS: i64 = 3_600_000;

    fn hold(created_at_unix_ms: i64, state: HoldState) -> Hold {
        Hold {
            hold_id: BookingId(1),
            slot: SlotKey {
                site_id: SiteId::parse("s", "a", 64).unwrap(),
                service_id: ServiceId::parse("s", "b", 64).unwrap(),
                start_unix_s: 0,
            },
            citizen: CitizenKey([1; 16]),
            created_at_unix_ms,
            expires_at_unix_ms: created_at_unix_ms + 60_000,
            request: RequestRecord {
                key: RequestKey([2; 16]),
                fingerprint: RequestFingerprint([3; 16]),
            },
            state,
            channel: crate::domain::ids::ChannelId::web(),
        }
    }

    #[test]
    fn zero_keeps_for_good() {
        let keep_all = Cutoffs::at(NOW_MS, (0, 0, 0));
        assert!(keep_all.keeps_request(i64::MIN + 1));
        assert!(keep_all.keeps_slot(i64::MIN + 1));
    }

    #[test]
    fn requests_are_kept_for_their_window_and_no_longer() {
        let cutoffs = Cutoffs::at(NOW_MS, (72, 400, 168));
        assert!(cutoffs.keeps_request(NOW_MS - 72 * HOUR_MS));
        assert!(!cutoffs.keeps_request(NOW_MS - 72 * HOUR_MS - 1));
        let ended = NOW_MS / 1_000 - 400 * 86_400;
        assert!(cutoffs.keeps_slot(ended));
        assert!(!cutoffs.keeps_slot(ended - 1));
        // A campaign like a slot ending when it does; one without an end, for good.
        assert!(cutoffs.keeps_campaign(Some(ended * 1_000)));
        assert!(!cutoffs.keeps_campaign(Some(ended * 1_000 - 1_000)));
        assert!(cutoffs.keeps_campaign(None));
        assert!(Cutoffs::at(NOW_MS, (0, 0, 0)).keeps_campaign(Some(i64::MIN + 1)));
    }

    /// An answer outlives its record's window only while requests are forgotten at
    /// all: with `request_records_retained_hours = 0` (kept for good) nothing would go.
    #[test]
    fn an_answer_is_kept_for_a_retry_only_while_requests_are_forgotten() {
        let recent = NOW_MS - HOUR_MS;
        assert!(Cutoffs::at(NOW_MS, (72, 400, 168)).keeps_answer_to(recent));
        assert!(!Cutoffs::at(NOW_MS, (72, 400, 168)).keeps_answer_to(NOW_MS - 73 * HOUR_MS));
        assert!(!Cutoffs::at(NOW_MS, (0, 400, 168)).keeps_answer_to(recent));
    }

    #[test]
    fn a_hold_goes_once_finished_and_its_request_or_slot_is_forgotten() {
        let cutoffs = Cutoffs::at(NOW_MS, (72, 400, 168));
        let old = NOW_MS - 73 * HOUR_MS;
        let recent = NOW_MS - HOUR_MS;
        let expired = HoldState::Expired { at_unix_ms: old };
        let slot_end = Some(NOW_MS / 1_000);
        assert!(cutoffs.keeps_hold(&hold(old, HoldState::Live), slot_end));
        assert!(!cutoffs.keeps_hold(&hold(old, expired.clone()), slot_end));
        assert!(cutoffs.keeps_hold(&hold(recent, expired.clone()), slot_end));
        // Its slot is not in the catalog: only the request counts.
        assert!(cutoffs.keeps_hold(&hold(recent, expired.clone()), None));
        assert!(!cutoffs.keeps_hold(&hold(old, expired.clone()), None));
        // Its slot ended beyond the records window.
        let long_ended = Some(NOW_MS / 1_000 - 401 * 86_400);
        assert!(!cutoffs.keeps_hold(&hold(recent, expired), long_ended));
    }

    #[test]
    fn every_hold_made_from_the_kept_second_on_is_kept() {
        for windows in [(72, 400, 168), (1, 1, 1), (72, 0, 168), (0, 400, 168)] {
            let cutoffs = Cutoffs::at(NOW_MS + 1, windows);
            let from_ms = i64::from(cutoffs.keeps_holds_from_second()) * 1_000;
            for made in [from_ms, from_ms + 999, from_ms + 3 * HOUR_MS] {
                let expired = HoldState::Expired { at_unix_ms: made };
                // The earliest end its slot can have: it started after the hold was made.
                let slot_end = Some(made / 1_000 + 1);
                assert!(
                    cutoffs.keeps_hold(&hold(made, expired), slot_end),
                    "{windows:?}"
                );
            }
            // The second before it starts with a hold that goes.
            let made = from_ms - 1_000;
            let before = HoldState::Expired { at_unix_ms: made };
            let gone = !cutoffs.keeps_hold(&hold(made, before), Some(0));
            assert!(gone, "{windows:?}");
        }
        assert_eq!(Cutoffs::at(NOW_MS, (0, 0, 0)).keeps_holds_from_second(), 0);
    }

    #[test]
    fn retention_time_follows_the_clock_but_gains_at_most_the_pace() {
        const YEAR_MS: i64 = 365 * 24 * HOUR_MS;
        // In step with the clock, it is the clock.
        assert_eq!(
            retention_time(NOW_MS, 1_000, NOW_MS + 1_000),
            NOW_MS + 1_000
        );
        // A clock set a year ahead: a second later, retention is two seconds on.
        assert_eq!(
            retention_time(NOW_MS, 1_000, NOW_MS + YEAR_MS),
            NOW_MS + 2_000
        );
        // A clock set back is followed at once; elapsed time never runs backward.
        assert_eq!(
            retention_time(NOW_MS, 1_000, NOW_MS - HOUR_MS),
            NOW_MS - HOUR_MS
        );
        assert_eq!(retention_time(NOW_MS, -5_000, NOW_MS + HOUR_MS), NOW_MS);
        assert_eq!(retention_time(NOW_MS, i64::MAX, i64::MAX), i64::MAX);
        // At a start: from the store's newest write, if the clock is later.
        assert_eq!(retention_start(NOW_MS + YEAR_MS, Some(NOW_MS)), NOW_MS);
        assert_eq!(retention_start(NOW_MS, Some(NOW_MS + HOUR_MS)), NOW_MS);
        assert_eq!(retention_start(NOW_MS, None), NOW_MS);
    }
}
