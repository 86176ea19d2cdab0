//! Identifier newtypes and their validation. Pure: no I/O, no clock.
//!
//! Ids chosen by authorities (site, region, service) are 1..=64 characters of
//! `[A-Za-z0-9_-]`, so they can never contain the separators used in slot ids and
//! store keys.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::domain::field_violation::FieldViolation;

/// Checks an authority-chosen id: non-empty, bounded, `[A-Za-z0-9_-]` only.
pub fn check_name_id(
    field: &str,
    value: &str,
    length_max: usize,
) -> Result<Arc<str>, FieldViolation> {
    if value.is_empty() {
        return Err(FieldViolation::new(field, "must not be empty"));
    }
    if value.len() > length_max {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {length_max} characters"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(FieldViolation::new(
            field,
            "may contain only letters A-Z a-z, digits, '_' and '-'",
        ));
    }
    Ok(Arc::from(value))
}

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn parse(field: &str, value: &str, length_max: usize) -> Result<Self, FieldViolation> {
                check_name_id(field, value, length_max).map(Self)
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_id!(
    /// A place where appointments happen.
    SiteId
);
name_id!(
    /// An authority's area; owns sites.
    RegionId
);
name_id!(
    /// What is booked, e.g. `covid19-dose1`.
    ServiceId
);
name_id!(
    /// An announced opening of slots (`CreateRelease`), chosen by the authority.
    ReleaseId
);
name_id!(
    /// A campaign (`UpsertCampaign`): pre-registration, waves and offers of a service.
    CampaignId
);
name_id!(
    /// A wave of a campaign: who becomes eligible when.
    WaveId
);
name_id!(
    /// A dose series (`UpsertSeries`): the services booked together, with their intervals.
    SeriesId
);
name_id!(
    /// How a booking reached prenota (a token's `channel`): `web`, `phone`, `desk`, ...
    ChannelId
);

impl ChannelId {
    /// The channel of callers that name none, and of bookings older than channels.
    pub const DEFAULT: &'static str = "web";

    pub fn web() -> Self {
        Self(Arc::from(Self::DEFAULT))
    }

    pub fn is_default(&self) -> bool {
        &*self.0 == Self::DEFAULT
    }
}

/// Identifies a slot: one start instant at one site for one service.
/// Ordered by site, service, then start, so ranges of a site's schedule are contiguous.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotKey {
    pub site_id: SiteId,
    pub service_id: ServiceId,
    /// Start instant, seconds since the Unix epoch (UTC).
    pub start_unix_s: i64,
}

impl SlotKey {
    /// Parses the wire form `site/service/start_unix_s` (see `text`).
    pub fn parse(field: &str, value: &str, id_length_max: usize) -> Result<Self, FieldViolation> {
        let bad = || FieldViolation::new(field, "is not a slot id returned by SearchSlots");
        if value.is_empty() {
            return Err(FieldViolation::new(field, "must not be empty"));
        }
        let mut parts = value.split('/');
        let (Some(site), Some(service), Some(start), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let start_unix_s: i64 = start.parse().map_err(|_| bad())?;
        Ok(Self {
            site_id: SiteId::parse(field, site, id_length_max).map_err(|_| bad())?,
            service_id: ServiceId::parse(field, service, id_length_max).map_err(|_| bad())?,
            start_unix_s,
        })
    }

    /// Its wire form `site/service/start_unix_s`, in one allocation of the right size (a
    /// search answers twenty; `Display` writes this).
    pub fn text(&self) -> String {
        let mut start = itoa::Buffer::new();
        let start = start.format(self.start_unix_s);
        let (site, service) = (self.site_id.as_str(), self.service_id.as_str());
        let mut text = String::with_capacity(site.len() + service.len() + start.len() + 2);
        for part in [site, "/", service, "/", start] {
            text.push_str(part);
        }
        text
    }
}

impl fmt::Display for SlotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// Server-generated booking (or hold) id: 128 bits that look random to anyone without the
/// key (`service::citizen_hasher::BookingIds`), so ids cannot be guessed or enumerated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BookingId(pub u128);

impl BookingId {
    pub const TEXT_LENGTH: usize = 32;

    pub fn parse(field: &str, value: &str) -> Result<Self, FieldViolation> {
        if value.is_empty() {
            return Err(FieldViolation::new(field, "must not be empty"));
        }
        if value.len() != Self::TEXT_LENGTH || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FieldViolation::new(
                field,
                "must be a booking id: 32 hexadecimal characters",
            ));
        }
        u128::from_str_radix(value, 16)
            .map(Self)
            .map_err(|_| FieldViolation::new(field, "must be 32 hexadecimal characters"))
    }
}

impl fmt::Display for BookingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A keyed hash (HMAC) of a citizen id: the only form in which a citizen is kept.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CitizenKey(pub [u8; 16]);

/// Not its bytes: a printed struct (a log, a panic) names no citizen.
impl std::fmt::Debug for CitizenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CitizenKey(..)")
    }
}

impl CitizenKey {
    /// The first 8 bytes: groups a citizen's bookings in the store and is sealed into
    /// their booking ids (see `service::citizen_hasher::BookingIds`).
    pub fn tag(&self) -> CitizenTag {
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&self.0[..8]);
        CitizenTag(tag)
    }
}

/// A prefix of a `CitizenKey`; several citizens may share one, so readers compare the
/// full key after a lookup by tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CitizenTag(pub [u8; 8]);

/// Checks the printable-ASCII, bounded form shared by citizen ids and request ids.
pub fn check_opaque_text(
    field: &str,
    value: &str,
    length_max: usize,
) -> Result<(), FieldViolation> {
    if value.is_empty() {
        return Err(FieldViolation::new(field, "must not be empty"));
    }
    if value.len() > length_max {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {length_max} characters"),
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FieldViolation::new(
            field,
            "may contain only printable ASCII characters without spaces",
        ));
    }
    Ok(())
}

/// Digest of a client `request_id`; the id itself is not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestKey(pub [u8; 16]);

impl RequestKey {
    pub fn parse(field: &str, value: &str, length_max: usize) -> Result<Self, FieldViolation> {
        check_opaque_text(field, value, length_max)?;
        Ok(Self(digest16(&[value.as_bytes()])))
    }

    /// This request id as the caller `scope` (a token's name) sent it: the same id sent
    /// by another token is another request, so no one can squat a caller's ids.
    pub fn within(self, scope: &str) -> Self {
        Self(digest16(&[b"token", scope.as_bytes(), &self.0]))
    }

    /// This request id as sent for `citizen`: the same id for another citizen is
    /// another request.
    pub fn for_citizen(self, citizen: &CitizenKey) -> Self {
        Self(digest16(&[b"citizen", &citizen.0, &self.0]))
    }
}

/// What a request asked for, so a reused `request_id` with a different request is caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestFingerprint(pub [u8; 16]);

impl RequestFingerprint {
    pub fn of(parts: &[&[u8]]) -> Self {
        Self(digest16(parts))
    }
}

/// SHA-256 of length-prefixed parts, truncated to 128 bits.
fn digest16(parts: &[&[u8]]) -> [u8; 16] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A struct printed in a log or a panic names no citizen and gives no check-in code.
    #[test]
    fn a_citizen_key_and_a_check_in_code_do_not_print() {
        let printed = format!("{:?}", CitizenKey(*b"RSSMRA80A01H501U"));
        assert!(
            !printed.contains("82") && !printed.contains("RSSMRA"),
            "{printed}"
        );
        let codes = crate::domain::booking::BookingCodes {
            reference: crate::domain::booking::Reference::from_bits(42),
            check_in_code: 4_711,
        };
        let printed = format!("{codes:?}");
        assert!(
            printed.contains("reference") && !printed.contains("4711"),
            "{printed}"
        );
    }

    #[test]
    fn name_ids_are_checked() {
        let cases: &[(&str, bool)] = &[
            ("rome-1", true),
            ("A_b-9", true),
            ("", false),
            ("has space", false),
            ("slash/no", false),
            ("ümlaut", false),
            ("nul\0", false),
        ];
        for (value, ok) in cases {
            assert_eq!(
                SiteId::parse("site_id", value, 64).is_ok(),
                *ok,
                "{value:?}"
            );
        }
        assert!(SiteId::parse("site_id", &"a".repeat(65), 64).is_err());
    }

    #[test]
    fn slot_key_round_trips_through_text() {
        let key = SlotKey {
            site_id: SiteId::parse("s", "rome-1", 64).unwrap(),
            service_id: ServiceId::parse("s", "covid19-dose1", 64).unwrap(),
            start_unix_s: 1_806_217_200,
        };
        let text = key.to_string();
        assert_eq!(text, "rome-1/covid19-dose1/1806217200");
        assert_eq!(key.text(), text);
        assert_eq!(SlotKey::parse("slot_id", &text, 64).unwrap(), key);
        for start_unix_s in [0, -1, i64::MIN, i64::MAX] {
            let key = SlotKey {
                start_unix_s,
                ..key.clone()
            };
            let text = key.text();
            assert_eq!(text, format!("rome-1/covid19-dose1/{start_unix_s}"));
            assert_eq!(SlotKey::parse("slot_id", &text, 64).unwrap(), key);
        }
        for bad in ["", "a/b", "a/b/c", "a/b/1/2", "a b/c/1", "/b/1"] {
            assert!(SlotKey::parse("slot_id", bad, 64).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn booking_id_round_trips_through_text() {
        let id = BookingId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(BookingId::parse("b", &id.to_string()).unwrap(), id);
        assert!(BookingId::parse("b", "xyz").is_err());
        assert!(BookingId::parse("b", &"g".repeat(32)).is_err());
    }
}
