//! A booking as it is kept: who (hashed), where, when, and how it ended.

use serde::{Deserialize, Serialize};

use crate::domain::ids::{BookingId, CitizenKey, RequestFingerprint, RequestKey, SlotKey};

/// The request that produced a state change, kept so a retry finds its first outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub key: RequestKey,
    pub fingerprint: RequestFingerprint,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BookingState {
    Confirmed,
    Cancelled {
        at_unix_ms: i64,
        reason: String,
        /// The cancel request; `None` when a closure cancelled it.
        request: Option<RequestRecord>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Booking {
    pub booking_id: BookingId,
    pub slot: SlotKey,
    pub end_unix_s: i64,
    pub citizen: CitizenKey,
    pub created_at_unix_ms: i64,
    pub request: RequestRecord,
    pub state: BookingState,
}

impl Booking {
    pub fn is_confirmed(&self) -> bool {
        matches!(self.state, BookingState::Confirmed)
    }
}
