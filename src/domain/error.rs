//! The domain's error type: every way a command can be refused, as a value.

use thiserror::Error;

pub use crate::domain::field_violation::FieldViolation;
use crate::domain::ids::{BookingId, ReleaseId, SlotKey};

/// What was looked up and not found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    Site,
    Slot,
    Booking,
    Hold,
    Release,
    /// The citizen has no ticket for the release.
    Ticket,
    Campaign,
    /// The citizen has no registration in the campaign.
    Registration,
    Series,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("invalid request: {}", describe(.0))]
    Invalid(Vec<FieldViolation>),
    #[error("slot {0} has no remaining capacity")]
    SlotFull(SlotKey),
    #[error("the citizen already has the maximum number of active bookings for this service (a live hold counts too, until it is confirmed or expires; a booking checked in counts until its slot ends)")]
    CitizenAlreadyBooked {
        booking_id: BookingId,
        /// In a group, the position of the member already booked (in `citizen_ids`).
        member: Option<usize>,
    },
    #[error("{0:?} not found")]
    NotFound(Missing),
    #[error("slot {0} is closed")]
    SlotClosed(SlotKey),
    #[error("the hold has expired; its place went back to the slot")]
    HoldExpired,
    #[error("slot {0} has as many places held as it allows at once; book it directly")]
    HoldLimitReached(SlotKey),
    #[error("slot {0} has already started")]
    SlotStarted(SlotKey),
    #[error("booking {0} is not active")]
    BookingNotActive(BookingId),
    #[error(
        "capacity {requested} is below the {taken} places already booked or held in slot {slot}"
    )]
    CapacityBelowBooked {
        slot: SlotKey,
        requested: u32,
        taken: u32,
    },
    #[error("request_id was already used for a different request")]
    RequestIdReused,
    #[error("this slot opens for booking at its release_at; retry then")]
    SlotNotReleased {
        release_at_unix_ms: i64,
        retry_after_ms: i64,
    },
    #[error(
        "this slot's release is queued: book it with an admitted ticket (JoinQueue, then \
         GetQueueTicket until ADMITTED), before admitted_until"
    )]
    NotAdmitted,
    #[error("release {0} exists with a different definition")]
    ReleaseExists(ReleaseId),
    #[error("release {0} already covers some of these slots")]
    ReleaseOverlaps(ReleaseId),
    #[error("the release's queue opens at queue_opens_at; join then")]
    QueueNotOpen { retry_after_ms: i64 },
    #[error("the release has no queue: book its slots from release_at")]
    ReleaseNotQueued,
    #[error("every slot of the release has started: its queue is closed")]
    ReleaseEnded,
    #[error(
        "the waiting rooms of the releases not ended hold as many tickets as the server \
         allows together (queue_tickets_max)"
    )]
    QueueFull,
    #[error("the server holds as many releases as it allows (releases_max)")]
    ReleasesExhausted,
    #[error(
        "this slot is booked through its campaign's offers (PreRegister, then AcceptOffer); \
         only slots starting within the campaign's last_minute_hours may be booked directly"
    )]
    OfferRequired,
    #[error("the registration has no offer to answer")]
    NoOffer,
    #[error("the registration is booked: cancel the booking, which withdraws it")]
    RegistrationBooked,
    #[error("the server holds as many campaigns as it allows (campaigns_max)")]
    CampaignsExhausted,
    #[error("the server holds as many registrations as it allows (registrations_max)")]
    RegistrationsFull,
    #[error("the campaign has ended: its slots are booked directly")]
    CampaignEnded,
    #[error("the check-in code is wrong")]
    CheckInCodeWrong,
    #[error("the booking's slot has not ended yet: a no-show is marked after its end")]
    SlotNotEnded,
    #[error("check-in is open from check_in_window_hours before the slot to as long after it")]
    CheckInClosed {
        opens_unix_ms: i64,
        closes_unix_ms: i64,
    },
    #[error("the server holds as many series as it allows (series_max)")]
    SeriesExhausted,
    #[error("dose {dose} must be on a local day from {earliest} to {latest}")]
    SeriesInterval {
        dose: u8,
        earliest: chrono::NaiveDate,
        latest: chrono::NaiveDate,
    },
}

impl From<FieldViolation> for DomainError {
    fn from(violation: FieldViolation) -> Self {
        Self::Invalid(vec![violation])
    }
}

impl DomainError {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, description)])
    }
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Collects every field violation of a request before refusing it, so a client
/// learns about all its mistakes in one round trip.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn push(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// Every violation recorded, in order.
    pub fn into_vec(self) -> Vec<FieldViolation> {
        self.0
    }

    /// `Ok(())` when nothing was recorded.
    pub fn finish(self) -> Result<(), DomainError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DomainError::Invalid(self.0))
        }
    }
}

/// What a failed check yields: one or several field violations.
pub trait IntoViolations {
    fn into_violations(self) -> Vec<FieldViolation>;
}

impl IntoViolations for FieldViolation {
    fn into_violations(self) -> Vec<FieldViolation> {
        vec![self]
    }
}

impl IntoViolations for Vec<FieldViolation> {
    fn into_violations(self) -> Vec<FieldViolation> {
        self
    }
}

/// Checks every field of a request at once: a tuple of per-field results becomes the
/// tuple of values, or `Invalid` with *every* violation, in field order (a client
/// learns all its mistakes in one round trip). No value of a failed check is read.
pub trait AllValid: Sized {
    type Values;

    /// The values, or every violation.
    fn checked(self) -> Result<Self::Values, Vec<FieldViolation>>;

    /// The values, or `Invalid` with every violation.
    fn all_valid(self) -> Result<Self::Values, DomainError> {
        self.checked().map_err(DomainError::Invalid)
    }
}

macro_rules! all_valid_tuple {
    ($($value:ident $error:ident),+) => {
        impl<$($value, $error: IntoViolations),+> AllValid for ($(Result<$value, $error>,)+) {
            type Values = ($($value,)+);

            #[allow(non_snake_case)]
            fn checked(self) -> Result<Self::Values, Vec<FieldViolation>> {
                let ($($value,)+) = self;
                let mut violations = Vec::new();
                $(
                    let $value = $value.map_err(|e| violations.extend(e.into_violations())).ok();
                )+
                match ($($value,)+) {
                    ($(Some($value),)+) => Ok(($($value,)+)),
                    // Some check failed, so `violations` is not empty.
                    _ => Err(violations),
                }
            }
        }
    };
}

all_valid_tuple!(A EA);
all_valid_tuple!(A EA, B EB);
all_valid_tuple!(A EA, B EB, C EC);
all_valid_tuple!(A EA, B EB, C EC, D ED);
all_valid_tuple!(A EA, B EB, C EC, D ED, E EE);
all_valid_tuple!(A EA, B EB, C EC, D ED, E EE, F EF);
all_valid_tuple!(A EA, B EB, C EC, D ED, E EE, F EF, G EG);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_valid_returns_every_value_or_every_violation() {
        let ok: (Result<u8, FieldViolation>, Result<&str, FieldViolation>) = (Ok(1), Ok("a"));
        assert_eq!(ok.all_valid(), Ok((1, "a")));
        let bad: (
            Result<u8, FieldViolation>,
            Result<u8, FieldViolation>,
            Result<u8, FieldViolation>,
        ) = (
            Err(FieldViolation::new("a", "x")),
            Ok(2),
            Err(FieldViolation::new("c", "y")),
        );
        let Err(DomainError::Invalid(found)) = bad.all_valid() else {
            panic!("two violations expected");
        };
        let fields: Vec<&str> = found.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["a", "c"]);
    }
}
