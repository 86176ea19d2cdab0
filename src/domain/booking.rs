//! A booking as it is kept: who (hashed), where, when, and how it ended.

use crate::domain::ids::{
    BookingId, ChannelId, CitizenKey, RequestFingerprint, RequestKey, SlotKey,
};

/// The request that produced a state change, kept so a retry finds its first outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub key: RequestKey,
    pub fingerprint: RequestFingerprint,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BookingState {
    Confirmed,
    Cancelled {
        at_unix_ms: i64,
        reason: String,
        /// The cancel request; `None` when a closure cancelled it.
        request: Option<RequestRecord>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Booking {
    pub booking_id: BookingId,
    pub slot: SlotKey,
    pub end_unix_s: i64,
    pub citizen: CitizenKey,
    pub created_at_unix_ms: i64,
    pub request: RequestRecord,
    pub state: BookingState,
    /// The channel it was made through (its place may come from that channel's reserve).
    pub channel: ChannelId,
}

impl Booking {
    /// A new confirmed booking of `slot` (start and end) made by `request` through
    /// `channel` at `now`.
    pub fn confirmed(
        booking_id: BookingId,
        (slot, end_unix_s): (SlotKey, i64),
        (citizen, channel): (CitizenKey, ChannelId),
        now_unix_ms: i64,
        request: RequestRecord,
    ) -> Self {
        Self {
            booking_id,
            slot,
            end_unix_s,
            citizen,
            created_at_unix_ms: now_unix_ms,
            request,
            state: BookingState::Confirmed,
            channel,
        }
    }

    pub fn is_confirmed(&self) -> bool {
        matches!(self.state, BookingState::Confirmed)
    }
}
