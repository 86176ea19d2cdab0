//! A booking as it is kept: who (hashed), where, when, and how it ended.

use crate::domain::field_violation::FieldViolation;
use crate::domain::ids::{
    BookingId, ChannelId, CitizenKey, RequestFingerprint, RequestKey, SeriesId, SlotKey,
};

/// The request that produced a state change, kept so a retry finds its first outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub key: RequestKey,
    pub fingerprint: RequestFingerprint,
}

/// A booking's life: confirmed, then cancelled, or at the desk attended or marked no-show.
/// Attended and no-show bookings keep their place and count against the citizen's limit
/// like confirmed ones (the appointment happened, or was missed); they cannot be
/// cancelled or moved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BookingState {
    Confirmed,
    Cancelled {
        at_unix_ms: i64,
        reason: String,
        /// The cancel request; `None` when a closure cancelled it.
        request: Option<RequestRecord>,
    },
    /// Checked in at the desk with its check-in code (`SiteService.CheckIn`).
    Attended {
        at_unix_ms: i64,
    },
    /// Marked by the desk after its slot ended (`SiteService.MarkNoShow`).
    NoShow {
        at_unix_ms: i64,
    },
}

/// A booking's short reference for phone and SMS: 40 random bits, shown as 8 characters
/// of Crockford base32. Unique among stored bookings (the engine checks before using one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference(u64);

impl Reference {
    pub const BITS: u32 = 40;
    /// Characters of its text form.
    pub const LENGTH: usize = 8;

    /// The reference of these 40 bits (higher bits are dropped).
    pub fn from_bits(bits: u64) -> Self {
        Self(bits & ((1 << Self::BITS) - 1))
    }

    pub fn bits(self) -> u64 {
        self.0
    }

    /// Its 5 big-endian bytes, as keys store it.
    pub fn to_bytes(self) -> [u8; 5] {
        let all = self.0.to_be_bytes();
        [all[3], all[4], all[5], all[6], all[7]]
    }

    pub fn from_bytes(bytes: [u8; 5]) -> Self {
        let mut all = [0u8; 8];
        all[3..].copy_from_slice(&bytes);
        Self(u64::from_be_bytes(all))
    }

    /// Reads what a citizen typed or said: case, hyphens and spaces do not matter, and
    /// `O` reads as `0`, `I` and `L` as `1` (Crockford's rules).
    pub fn parse(field: &'static str, text: &str) -> Result<Self, FieldViolation> {
        let bad = || FieldViolation::new(field, "must be 8 characters of Crockford base32");
        let normal: String = text
            .chars()
            .filter(|c| *c != '-' && *c != ' ')
            .map(|c| match c.to_ascii_uppercase() {
                'O' => '0',
                'I' | 'L' => '1',
                other => other,
            })
            .collect();
        if normal.len() != Self::LENGTH {
            return Err(bad());
        }
        let bytes = base32::decode(base32::Alphabet::Crockford, &normal).ok_or_else(bad)?;
        let bytes: [u8; 5] = bytes.try_into().map_err(|_| bad())?;
        Ok(Self::from_bytes(bytes))
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&base32::encode(
            base32::Alphabet::Crockford,
            &self.to_bytes(),
        ))
    }
}

/// What the citizen is given with a booking: the reference, and the 4-digit code (0 to
/// 9999, shown to the citizen only) that proves at the desk it is theirs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BookingCodes {
    pub reference: Reference,
    pub check_in_code: u16,
}

/// Not the code: a printed booking (a log, a panic) cannot be checked in with.
impl std::fmt::Debug for BookingCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BookingCodes")
            .field("reference", &self.reference)
            .finish_non_exhaustive()
    }
}

impl BookingCodes {
    pub const CHECK_IN_CODE_MAX: u16 = 9_999;
}

/// Which dose of which series a booking is (doses count from 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeriesDose {
    pub series_id: SeriesId,
    pub dose: u8,
    /// The id dose 1 was booked with: ties together the doses of one BookSeries (a
    /// citizen may hold the series more than once), kept through moves.
    pub first_booking: BookingId,
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
    /// `None` only for bookings stored before references existed.
    pub codes: Option<BookingCodes>,
    /// Set when it was booked as a dose of a series (`BookSeries`).
    pub series: Option<SeriesDose>,
}

impl Booking {
    /// A new confirmed booking of `slot` (start and end) made by `request` through
    /// `channel` at `now`.
    pub fn confirmed(
        (booking_id, codes): (BookingId, BookingCodes),
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
            codes: Some(codes),
            series: None,
        }
    }

    /// Still ahead: it may be cancelled, moved or checked in.
    pub fn is_confirmed(&self) -> bool {
        matches!(self.state, BookingState::Confirmed)
    }

    /// Holds a place of its slot and counts against its citizen's limit: confirmed,
    /// attended or no-show (everything but cancelled).
    pub fn holds_place(&self) -> bool {
        !matches!(self.state, BookingState::Cancelled { .. })
    }
}
