//! Proto ↔ domain conversions and request validation. Proto types stop here.
//!
//! Every `*_from_proto` collects all field violations of a request before refusing it.

use std::str::FromStr;

use chrono::{SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;
use prost_types::Timestamp;

use crate::config::Limits;
use crate::domain::booking::BookingState as DomainBookingState;
use crate::domain::catalog::{SearchQuery, SearchScope, Site, Slot};
use crate::domain::error::{DomainError, FieldViolation, Violations};
use crate::domain::hold::Hold;
use crate::domain::ids::{
    check_opaque_text, BookingId, RegionId, RequestKey, ServiceId, SiteId, SlotKey,
};
use crate::domain::schedule::{Schedule, ScheduleInput};
use crate::proto;
use crate::service::{BookingView, CitizenBookingsQuery, CloseCommand, ImportRow};

/// Latest instant accepted on the wire: 9999-12-31T23:59:59Z.
const TIMESTAMP_SECONDS_MAX: i64 = 253_402_300_799;
const SECONDS_PER_DAY: i64 = 86_400;

pub fn timestamp(unix_s: i64) -> Timestamp {
    Timestamp {
        seconds: unix_s,
        nanos: 0,
    }
}

fn timestamp_ms(unix_ms: i64) -> Timestamp {
    Timestamp {
        seconds: unix_ms.div_euclid(1_000),
        nanos: (unix_ms.rem_euclid(1_000) * 1_000_000) as i32,
    }
}

/// Whole seconds of a wire timestamp within 1970..=9999.
fn unix_seconds(field: &str, value: &Timestamp) -> Result<i64, FieldViolation> {
    if !(0..1_000_000_000).contains(&value.nanos)
        || !(0..=TIMESTAMP_SECONDS_MAX).contains(&value.seconds)
    {
        return Err(FieldViolation::new(
            field,
            "must be a timestamp between 1970 and 9999",
        ));
    }
    Ok(value.seconds)
}

/// RFC 3339 local time with offset, e.g. `2027-03-28T09:00:00+02:00`.
pub fn local_rfc3339(unix_s: i64, zone: Tz) -> String {
    Utc.timestamp_opt(unix_s, 0)
        .single()
        .map(|instant| {
            instant
                .with_timezone(&zone)
                .to_rfc3339_opts(SecondsFormat::Secs, false)
        })
        .unwrap_or_default()
}

pub fn time_zone(field: &str, name: &str) -> Result<Tz, FieldViolation> {
    if name.is_empty() {
        return Err(FieldViolation::new(field, "must not be empty"));
    }
    Tz::from_str(name).map_err(|_| {
        FieldViolation::new(field, "is not an IANA time zone name such as Europe/Rome")
    })
}

pub fn request_key(value: &str, limits: &Limits) -> Result<RequestKey, FieldViolation> {
    RequestKey::parse("request_id", value, limits.request_id_length_max)
}

/// An authority request's optional `request_id`: empty means none.
pub fn optional_request_key(
    value: &str,
    limits: &Limits,
) -> Result<Option<RequestKey>, FieldViolation> {
    match value {
        "" => Ok(None),
        value => request_key(value, limits).map(Some),
    }
}

pub fn citizen_id(value: &str, limits: &Limits) -> Result<String, FieldViolation> {
    check_opaque_text("citizen_id", value, limits.citizen_id_length_max).map(|()| value.to_string())
}

pub fn site_id(field: &str, value: &str, limits: &Limits) -> Result<SiteId, FieldViolation> {
    SiteId::parse(field, value, limits.id_length_max)
}

pub fn service_id(field: &str, value: &str, limits: &Limits) -> Result<ServiceId, FieldViolation> {
    ServiceId::parse(field, value, limits.id_length_max)
}

pub fn region_id(field: &str, value: &str, limits: &Limits) -> Result<RegionId, FieldViolation> {
    RegionId::parse(field, value, limits.id_length_max)
}

pub fn slot_key(field: &str, value: &str, limits: &Limits) -> Result<SlotKey, FieldViolation> {
    SlotKey::parse(field, value, limits.id_length_max)
}

pub fn booking_id(value: &str) -> Result<BookingId, FieldViolation> {
    BookingId::parse("booking_id", value)
}

/// A list's page size: 0 means the default.
fn page_size(value: i32, limits: &Limits) -> Result<usize, FieldViolation> {
    match value {
        0 => Ok(limits.page_size_default as usize),
        size if size > 0 && size as u32 <= limits.page_size_max => Ok(size as usize),
        _ => Err(FieldViolation::new(
            "page_size",
            format!("must be between 0 (default) and {}", limits.page_size_max),
        )),
    }
}

/// Characters refused in text shown to citizens (site names, closure reasons): control
/// characters, and the bidirectional overrides and isolates that can make text read
/// differently from what it holds ("Trojan Source").
pub fn unsafe_in_display_text(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

pub fn site_from_proto(site: Option<proto::Site>, limits: &Limits) -> Result<Site, DomainError> {
    let Some(site) = site else {
        return Err(DomainError::invalid("site", "is required"));
    };
    let mut v = Violations::default();
    let id = v.check(site_id("site.site_id", &site.site_id, limits));
    let region = v.check(region_id("site.region_id", &site.region_id, limits));
    let zone = v.check(time_zone("site.time_zone", &site.time_zone));
    let name = site.name.trim();
    if name.is_empty() {
        v.push("site.name", "must not be empty");
    } else if name.chars().count() > limits.site_name_length_max {
        v.push(
            "site.name",
            format!("must be at most {} characters", limits.site_name_length_max),
        );
    } else if name.chars().any(unsafe_in_display_text) {
        v.push(
            "site.name",
            "must not contain control or text-direction characters",
        );
    }
    v.finish()?;
    match (id, region, zone) {
        (Some(site_id), Some(region_id), Some(time_zone)) => Ok(Site {
            site_id,
            name: name.to_string(),
            region_id,
            time_zone,
        }),
        _ => Err(DomainError::invalid("site", "is invalid")),
    }
}

pub fn site_to_proto(site: &Site) -> proto::Site {
    proto::Site {
        site_id: site.site_id.to_string(),
        name: site.name.clone(),
        region_id: site.region_id.to_string(),
        time_zone: site.time_zone.name().to_string(),
    }
}

/// A search without `from` starts at `now_unix_ms`.
pub fn search_from_proto(
    request: proto::SearchSlotsRequest,
    limits: &Limits,
    now_unix_ms: i64,
) -> Result<SearchQuery, DomainError> {
    use proto::search_slots_request::Scope;
    let mut v = Violations::default();
    let scope = match &request.scope {
        Some(Scope::SiteId(id)) => v
            .check(site_id("site_id", id, limits))
            .map(SearchScope::Site),
        Some(Scope::RegionId(id)) => v
            .check(region_id("region_id", id, limits))
            .map(SearchScope::Region),
        None => {
            v.push("site_id", "set site_id or region_id");
            None
        }
    };
    let service = v.check(service_id("service_id", &request.service_id, limits));
    let from = match &request.from {
        Some(from) => v.check(unix_seconds("from", from)),
        None => Some(now_unix_ms.div_euclid(1_000)),
    };
    let to = match (&request.to, from) {
        (Some(to), _) => v.check(unix_seconds("to", to)),
        (None, Some(from)) => {
            Some(from + i64::from(limits.search_range_days_default) * SECONDS_PER_DAY)
        }
        (None, None) => None,
    };
    if let (Some(from), Some(to)) = (from, to) {
        if to <= from {
            v.push("to", "must be after from");
        } else if to - from > i64::from(limits.search_range_days_max) * SECONDS_PER_DAY {
            v.push(
                "to",
                format!(
                    "a search spans at most {} days",
                    limits.search_range_days_max
                ),
            );
        }
    }
    let page_size = v.check(page_size(request.page_size, limits));
    let after = if request.page_token.is_empty() {
        None
    } else {
        v.check(
            slot_key("page_token", &request.page_token, limits).map_err(|_| {
                FieldViolation::new(
                    "page_token",
                    "is not a next_page_token from a previous response",
                )
            }),
        )
    };
    v.finish()?;
    match (scope, service, from, to, page_size) {
        (Some(scope), Some(service_id), Some(from_unix_s), Some(to_unix_s), Some(page_size)) => {
            Ok(SearchQuery {
                scope,
                service_id,
                from_unix_s,
                to_unix_s,
                only_available: request.only_available,
                after,
                page_size,
            })
        }
        _ => Err(DomainError::invalid("request", "is invalid")),
    }
}

pub fn close_from_proto(
    request: proto::CloseSlotsRequest,
    limits: &Limits,
) -> Result<CloseCommand, DomainError> {
    let mut v = Violations::default();
    let site = v.check(site_id("site_id", &request.site_id, limits));
    let service = match &request.service_id {
        Some(id) => v.check(service_id("service_id", id, limits)).map(Some),
        None => Some(None),
    };
    let from = match &request.from {
        Some(from) => v.check(unix_seconds("from", from)),
        None => {
            v.push("from", "is required");
            None
        }
    };
    let to = match &request.to {
        Some(to) => v.check(unix_seconds("to", to)),
        None => {
            v.push("to", "is required");
            None
        }
    };
    if let (Some(from), Some(to)) = (from, to) {
        if to <= from {
            v.push("to", "must be after from");
        }
    }
    let request_key = v.check(optional_request_key(&request.request_id, limits));
    let reason = request.reason.trim();
    if reason.is_empty() {
        v.push(
            "reason",
            "must not be empty: citizens see it on their cancelled bookings",
        );
    } else if reason.chars().count() > limits.close_reason_length_max {
        v.push(
            "reason",
            format!(
                "must be at most {} characters",
                limits.close_reason_length_max
            ),
        );
    } else if reason.chars().any(unsafe_in_display_text) {
        v.push(
            "reason",
            "must not contain control or text-direction characters",
        );
    }
    v.finish()?;
    match (site, service, from, to, request_key) {
        (Some(site_id), Some(service_id), Some(from_unix_s), Some(to_unix_s), Some(request)) => {
            Ok(CloseCommand {
                site_id,
                service_id,
                from_unix_s,
                to_unix_s,
                reason: reason.to_string(),
                request,
            })
        }
        _ => Err(DomainError::invalid("request", "is invalid")),
    }
}

pub fn slot_to_proto(site: &Site, slot: &Slot) -> proto::Slot {
    let counter = slot.counter.snapshot();
    proto::Slot {
        slot_id: slot.key.to_string(),
        site_id: slot.key.site_id.to_string(),
        service_id: slot.key.service_id.to_string(),
        start: Some(timestamp(slot.key.start_unix_s)),
        end: Some(timestamp(slot.end_unix_s())),
        local_start: local_rfc3339(slot.key.start_unix_s, site.time_zone),
        time_zone: site.time_zone.name().to_string(),
        capacity: counter.capacity,
        remaining: counter.remaining(),
        closed: counter.closed,
    }
}

/// The CSV column a schedule field comes from, for a capacity file's errors.
fn row_column(field: &str) -> &str {
    match field.split(['[', '.']).collect::<Vec<_>>().as_slice() {
        ["site", column] => column,
        ["opening_hours", .., "opens"] => "opens",
        ["opening_hours", .., "closes"] => "closes",
        ["opening_hours", ..] => "weekdays",
        _ => field,
    }
}

/// Validates one row of a capacity file. Every violation is named
/// `rows[LINE].COLUMN`, with the row's line in its file and the CSV column.
pub fn import_row(
    row: proto::CapacityRow,
    limits: &Limits,
) -> Result<ImportRow, Vec<FieldViolation>> {
    let mut found: Vec<FieldViolation> = Vec::new();
    let mut note = |violation: FieldViolation| {
        let field = format!("rows[{}].{}", row.line, row_column(&violation.field));
        if !found
            .iter()
            .any(|f| f.field == field && f.description == violation.description)
        {
            found.push(FieldViolation::new(field, violation.description));
        }
    };
    let site = match site_from_proto(row.site.clone(), limits) {
        Ok(site) => Some(site),
        Err(DomainError::Invalid(violations)) => {
            violations.into_iter().for_each(&mut note);
            None
        }
        Err(other) => {
            note(FieldViolation::new("site", other.to_string()));
            None
        }
    };
    let service = service_id("service_id", &row.service_id, limits)
        .map_err(&mut note)
        .ok();
    if row.weekdays.is_empty() {
        note(FieldViolation::new(
            "weekdays",
            "must list at least one ISO weekday 1 (Monday) to 7 (Sunday)",
        ));
    }
    let schedule = Schedule::parse(
        &ScheduleInput {
            first_day: &row.first_day,
            last_day: &row.last_day,
            opening_hours: row
                .weekdays
                .iter()
                .map(|weekday| (*weekday, row.opens.as_str(), row.closes.as_str()))
                .collect(),
            slot_minutes: row.slot_minutes,
            capacity_per_slot: row.capacity_per_slot,
        },
        &crate::config::schedule_bounds(limits),
    );
    let schedule = match schedule {
        Ok(schedule) => Some(schedule),
        Err(DomainError::Invalid(violations)) => {
            violations
                .into_iter()
                .filter(|v| !(row.weekdays.is_empty() && v.field == "opening_hours"))
                .for_each(&mut note);
            None
        }
        Err(other) => {
            note(FieldViolation::new("first_day", other.to_string()));
            None
        }
    };
    match (site, service, schedule) {
        (Some(site), Some(service_id), Some(schedule)) if found.is_empty() => Ok(ImportRow {
            line: row.line,
            site,
            service_id,
            schedule,
        }),
        _ => Err(found),
    }
}

pub fn audit_to_proto(entry: &crate::store::records::AuditEntry) -> proto::AuditEntry {
    proto::AuditEntry {
        at: Some(timestamp_ms(entry.at_unix_ms)),
        actor: entry.actor.clone(),
        action: entry.action.clone(),
        detail: entry.detail.clone(),
    }
}

pub fn hold_to_proto(hold: &Hold) -> proto::Hold {
    proto::Hold {
        hold_id: hold.hold_id.to_string(),
        slot_id: hold.slot.to_string(),
        expires_at: Some(timestamp_ms(hold.expires_at_unix_ms)),
    }
}

pub fn citizen_bookings_from_proto(
    request: proto::ListCitizenBookingsRequest,
    limits: &Limits,
) -> Result<CitizenBookingsQuery, DomainError> {
    let mut v = Violations::default();
    let citizen = v.check(citizen_id(&request.citizen_id, limits));
    let service = match &request.service_id {
        Some(id) => v.check(service_id("service_id", id, limits)).map(Some),
        None => Some(None),
    };
    let page_size = v.check(page_size(request.page_size, limits));
    let after = if request.page_token.is_empty() {
        Some(None)
    } else {
        v.check(
            BookingId::parse("page_token", &request.page_token).map_err(|_| {
                FieldViolation::new(
                    "page_token",
                    "is not a next_page_token from a previous response",
                )
            }),
        )
        .map(Some)
    };
    v.finish()?;
    match (citizen, service, page_size, after) {
        (Some(citizen_id), Some(service_id), Some(page_size), Some(after)) => {
            Ok(CitizenBookingsQuery {
                citizen_id,
                service_id,
                after,
                page_size,
            })
        }
        _ => Err(DomainError::invalid("request", "is invalid")),
    }
}

pub fn booking_to_proto(view: &BookingView) -> proto::Booking {
    let BookingView { booking, site } = view;
    let (state, cancelled_at, cancel_reason) = match &booking.state {
        DomainBookingState::Confirmed => (proto::BookingState::Confirmed, None, String::new()),
        DomainBookingState::Cancelled {
            at_unix_ms, reason, ..
        } => (
            proto::BookingState::Cancelled,
            Some(timestamp_ms(*at_unix_ms)),
            reason.clone(),
        ),
    };
    proto::Booking {
        booking_id: booking.booking_id.to_string(),
        slot_id: booking.slot.to_string(),
        site_id: booking.slot.site_id.to_string(),
        service_id: booking.slot.service_id.to_string(),
        start: Some(timestamp(booking.slot.start_unix_s)),
        end: Some(timestamp(booking.end_unix_s)),
        local_start: local_rfc3339(booking.slot.start_unix_s, site.time_zone),
        state: state as i32,
        created_at: Some(timestamp_ms(booking.created_at_unix_ms)),
        time_zone: site.time_zone.name().to_string(),
        cancelled_at,
        cancel_reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_LIMITS;

    fn fields(error: DomainError) -> Vec<String> {
        match error {
            DomainError::Invalid(violations) => violations.into_iter().map(|v| v.field).collect(),
            other => panic!("expected field violations, got {other:?}"),
        }
    }

    #[test]
    fn search_validation_names_every_bad_field() {
        let request = proto::SearchSlotsRequest {
            scope: None,
            service_id: String::new(),
            from: Some(timestamp(2_000)),
            to: Some(timestamp(1_000)),
            only_available: false,
            page_size: 100_000,
            page_token: "nonsense".into(),
        };
        let fields = fields(search_from_proto(request, &DEFAULT_LIMITS, 0).unwrap_err());
        for field in ["site_id", "service_id", "to", "page_size", "page_token"] {
            assert!(
                fields.iter().any(|f| f == field),
                "{field} missing from {fields:?}"
            );
        }
    }

    #[test]
    fn search_range_is_bounded() {
        let request = proto::SearchSlotsRequest {
            scope: Some(proto::search_slots_request::Scope::SiteId("a".into())),
            service_id: "vax".into(),
            from: Some(timestamp(0)),
            to: Some(timestamp(400 * SECONDS_PER_DAY)),
            ..Default::default()
        };
        assert_eq!(
            fields(search_from_proto(request, &DEFAULT_LIMITS, 0).unwrap_err()),
            ["to"]
        );
    }

    #[test]
    fn local_time_carries_the_offset() {
        // 2027-03-28T07:00:00Z is 09:00 in Rome after the spring-forward.
        assert_eq!(
            local_rfc3339(1_806_217_200, chrono_tz::Europe::Rome),
            "2027-03-28T09:00:00+02:00"
        );
    }

    #[test]
    fn site_validation() {
        let site = proto::Site {
            site_id: "".into(),
            name: " ".into(),
            region_id: "r 1".into(),
            time_zone: "Mars/Olympus".into(),
        };
        let fields = fields(site_from_proto(Some(site), &DEFAULT_LIMITS).unwrap_err());
        assert_eq!(
            fields,
            [
                "site.site_id",
                "site.region_id",
                "site.time_zone",
                "site.name"
            ]
        );
    }
}
