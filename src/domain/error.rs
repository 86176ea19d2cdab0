//! The domain's error type: every way a command can be refused, as a value.

use thiserror::Error;

pub use crate::domain::field_violation::FieldViolation;
use crate::domain::ids::{BookingId, SlotKey};

/// What was looked up and not found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    Site,
    Slot,
    Booking,
    Hold,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("invalid request: {}", describe(.0))]
    Invalid(Vec<FieldViolation>),
    #[error("slot {0} has no remaining capacity")]
    SlotFull(SlotKey),
    #[error("the citizen already has the maximum number of active bookings for this service")]
    CitizenAlreadyBooked { booking_id: BookingId },
    #[error("{0:?} not found")]
    NotFound(Missing),
    #[error("slot {0} is closed")]
    SlotClosed(SlotKey),
    #[error("the hold has expired; its place went back to the slot")]
    HoldExpired,
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
    /// Keeps `Ok` values, records `Err` ones.
    pub fn check<T>(&mut self, result: Result<T, FieldViolation>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(violation) => {
                self.0.push(violation);
                None
            }
        }
    }

    pub fn push(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
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
