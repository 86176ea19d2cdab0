//! Proto ↔ domain conversions and request validation (proto types stop in `grpc`).
//!
//! Every `*_from_proto` collects all field violations of a request before refusing it.

use std::str::FromStr;

use chrono::{Datelike, NaiveDate, Offset, SecondsFormat, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use prost_types::Timestamp;

use crate::config::Limits;
use crate::domain::booking::BookingState as DomainBookingState;
use crate::domain::catalog::{SearchPage, SearchQuery, SearchScope, Site, Slot};
use crate::domain::citizen_id::CitizenIds;
use crate::domain::error::{AllValid, DomainError, FieldViolation};
use crate::domain::event::{Event, EventBooking};
use crate::domain::hold::Hold;
use crate::domain::ids::{BookingId, ChannelId, RegionId, RequestKey, ServiceId, SiteId, SlotKey};
use crate::domain::schedule::{Schedule, ScheduleInput};
use crate::domain::text::display_text;
use crate::grpc::auth::Caller;
use crate::proto;
use crate::service::{
    BookCommand, BookingView, CancelCommand, CitizenBookingsQuery, CloseCommand, Engine, EventView,
    GroupCommand, HoldCommand, ImportRow, RescheduleCommand, RowKey, SummaryPage, SummaryQuery,
};

/// Latest instant accepted on the wire: 9999-12-31T23:59:59Z.
const TIMESTAMP_SECONDS_MAX: i64 = 253_402_300_799;
const SECONDS_PER_DAY: i64 = 86_400;

pub fn timestamp(unix_s: i64) -> Timestamp {
    Timestamp {
        seconds: unix_s,
        nanos: 0,
    }
}

pub fn timestamp_ms(unix_ms: i64) -> Timestamp {
    Timestamp {
        seconds: unix_ms.div_euclid(1_000),
        nanos: (unix_ms.rem_euclid(1_000) * 1_000_000) as i32,
    }
}

/// Whole seconds of a wire timestamp within 1970..=9999.
pub fn unix_seconds(field: &str, value: &Timestamp) -> Result<i64, FieldViolation> {
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

/// `unix_s` in `zone` as RFC 3339 with the zone's offset then, to the second, e.g.
/// "2027-03-28T09:00:00+02:00": what chrono's `to_rfc3339_opts(Secs, false)` writes,
/// written here digit by digit (a search formats twenty; chrono's formatter was a tenth
/// of a search answer's cost). Years outside 0–9999 and offsets with seconds (historical
/// local mean times, the last until 1972) are left to chrono.
pub fn local_rfc3339(unix_s: i64, zone: Tz) -> String {
    let Some(instant) = Utc.timestamp_opt(unix_s, 0).single() else {
        return String::new();
    };
    let local = instant.with_timezone(&zone);
    let offset_s = local.offset().fix().local_minus_utc();
    let at = local.naive_local();
    if !(0..=9999).contains(&at.year()) || offset_s % 60 != 0 {
        return local.to_rfc3339_opts(SecondsFormat::Secs, false);
    }
    let offset_min = offset_s.unsigned_abs() / 60;
    let mut text = *b"0000-00-00T00:00:00+00:00";
    put_digits(&mut text[0..4], at.year().unsigned_abs());
    put_digits(&mut text[5..7], at.month());
    put_digits(&mut text[8..10], at.day());
    put_digits(&mut text[11..13], at.hour());
    put_digits(&mut text[14..16], at.minute());
    put_digits(&mut text[17..19], at.second());
    text[19] = if offset_s < 0 { b'-' } else { b'+' };
    put_digits(&mut text[20..22], offset_min / 60);
    put_digits(&mut text[23..25], offset_min % 60);
    std::str::from_utf8(&text)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// Writes `value`'s last `out.len()` decimal digits into `out`, zero-padded.
fn put_digits(out: &mut [u8], mut value: u32) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

pub fn time_zone(field: &str, name: &str) -> Result<Tz, FieldViolation> {
    if name.is_empty() {
        return Err(FieldViolation::new(field, "must not be empty"));
    }
    Tz::from_str(name).map_err(|_| {
        // Names are matched as spelled; one that differs only in case gets its spelling.
        let spelled = chrono_tz::TZ_VARIANTS
            .iter()
            .find(|zone| zone.name().eq_ignore_ascii_case(name));
        let description = match spelled {
            Some(zone) => format!("is not an IANA time zone name: spell it {}", zone.name()),
            None => "is not an IANA time zone name such as Europe/Rome".to_string(),
        };
        FieldViolation::new(field, description)
    })
}

/// A `request_id` as the caller `caller` (a token's name) sent it: request ids are
/// scoped to their caller, so nobody can squat another caller's ids.
pub fn request_key(
    value: &str,
    limits: &Limits,
    caller: &str,
) -> Result<RequestKey, FieldViolation> {
    RequestKey::parse("request_id", value, limits.request_id_length_max)
        .map(|key| key.within(caller))
}

/// An authority request's optional `request_id`: empty means none.
pub fn optional_request_key(
    value: &str,
    limits: &Limits,
    caller: &str,
) -> Result<Option<RequestKey>, FieldViolation> {
    match value {
        "" => Ok(None),
        value => request_key(value, limits, caller).map(Some),
    }
}

pub fn site_id(field: &str, value: &str, limits: &Limits) -> Result<SiteId, FieldViolation> {
    SiteId::parse(field, value, limits.id_length_max)
}

/// The site ids of list `field`, sorted, without duplicates; or every bad one.
pub fn site_ids(
    field: &str,
    ids: &[String],
    limits: &Limits,
) -> Result<Vec<SiteId>, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let mut sites = Vec::new();
    for (index, id) in ids.iter().enumerate() {
        match site_id(&format!("{field}[{index}]"), id, limits) {
            Ok(site) => sites.push(site),
            Err(violation) => violations.push(violation),
        }
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    sites.sort();
    sites.dedup();
    Ok(sites)
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
pub fn page_size(value: i32, limits: &Limits) -> Result<usize, FieldViolation> {
    match value {
        0 => Ok(limits.page_size_default as usize),
        size if size > 0 && size as u32 <= limits.page_size_max => Ok(size as usize),
        _ => Err(FieldViolation::new(
            "page_size",
            format!("must be between 0 (default) and {}", limits.page_size_max),
        )),
    }
}

pub fn site_from_proto(site: Option<proto::Site>, limits: &Limits) -> Result<Site, DomainError> {
    let Some(site) = site else {
        return Err(DomainError::invalid("site", "is required"));
    };
    let (site_id, region_id, time_zone, name) = (
        site_id("site.site_id", &site.site_id, limits),
        region_id("site.region_id", &site.region_id, limits),
        time_zone("site.time_zone", &site.time_zone),
        display_text(
            "site.name",
            &site.name,
            "must not be empty",
            limits.site_name_length_max,
        ),
    )
        .all_valid()?;
    Ok(Site {
        site_id,
        name,
        region_id,
        time_zone,
    })
}

pub fn site_to_proto(site: &Site) -> proto::Site {
    proto::Site {
        site_id: site.site_id.to_string(),
        name: site.name.clone(),
        region_id: site.region_id.to_string(),
        time_zone: site.time_zone.name().to_string(),
    }
}

fn search_scope(
    scope: &Option<proto::search_slots_request::Scope>,
    limits: &Limits,
) -> Result<SearchScope, FieldViolation> {
    use proto::search_slots_request::Scope;
    match scope {
        Some(Scope::SiteId(id)) => site_id("site_id", id, limits).map(SearchScope::Site),
        Some(Scope::RegionId(id)) => region_id("region_id", id, limits).map(SearchScope::Region),
        None => Err(FieldViolation::new("site_id", "set site_id or region_id")),
    }
}

/// A search's `[from, to)`: `from` defaults to now, `to` to the default span after it.
fn search_range(
    request: &proto::SearchSlotsRequest,
    limits: &Limits,
    now_unix_ms: i64,
) -> Result<(i64, i64), Vec<FieldViolation>> {
    let from = match &request.from {
        Some(from) => unix_seconds("from", from),
        None => Ok(now_unix_ms.div_euclid(1_000)),
    };
    let to = request.to.as_ref().map(|to| unix_seconds("to", to));
    let default_span_s = i64::from(limits.search_range_days_default) * SECONDS_PER_DAY;
    let (from, to) = match (from, to) {
        (Ok(from), None) => (from, from + default_span_s),
        (Ok(from), Some(Ok(to))) => (from, to),
        (from, to) => {
            let to = to.and_then(Result::err);
            return Err(from.err().into_iter().chain(to).collect());
        }
    };
    if to <= from {
        return Err(vec![FieldViolation::new("to", "must be after from")]);
    }
    if to - from > i64::from(limits.search_range_days_max) * SECONDS_PER_DAY {
        return Err(vec![FieldViolation::new(
            "to",
            format!(
                "a search spans at most {} days",
                limits.search_range_days_max
            ),
        )]);
    }
    Ok((from, to))
}

/// What every list answers to a `page_token` it did not hand out.
fn not_a_page_token() -> FieldViolation {
    FieldViolation::new(
        "page_token",
        "is not a next_page_token from a previous response",
    )
}

/// A `page_token` that must be a slot id from a previous response; empty means none.
fn slot_page_token(token: &str, limits: &Limits) -> Result<Option<SlotKey>, FieldViolation> {
    if token.is_empty() {
        return Ok(None);
    }
    slot_key("page_token", token, limits)
        .map(Some)
        .map_err(|_| not_a_page_token())
}

/// A search without `from` starts at `now_unix_ms`.
pub fn search_from_proto(
    request: proto::SearchSlotsRequest,
    limits: &Limits,
    now_unix_ms: i64,
) -> Result<SearchQuery, DomainError> {
    let (scope, service_id, (from_unix_s, to_unix_s), page_size, after) = (
        search_scope(&request.scope, limits),
        service_id("service_id", &request.service_id, limits),
        search_range(&request, limits, now_unix_ms),
        page_size(request.page_size, limits),
        slot_page_token(&request.page_token, limits),
    )
        .all_valid()?;
    Ok(SearchQuery {
        scope,
        service_id,
        from_unix_s,
        to_unix_s,
        only_available: request.only_available,
        after,
        page_size,
        scan_max: limits.search_slots_scanned_max,
    })
}

/// A watch of availability: the same scope, service and range rules as a search.
pub fn watch_from_proto(
    request: proto::WatchAvailabilityRequest,
    limits: &Limits,
    now_unix_ms: i64,
) -> Result<SearchQuery, DomainError> {
    use proto::watch_availability_request::Scope;
    let scope = request.scope.map(|scope| match scope {
        Scope::SiteId(id) => proto::search_slots_request::Scope::SiteId(id),
        Scope::RegionId(id) => proto::search_slots_request::Scope::RegionId(id),
    });
    let search = proto::SearchSlotsRequest {
        scope,
        service_id: request.service_id,
        from: request.from,
        to: request.to,
        ..Default::default()
    };
    search_from_proto(search, limits, now_unix_ms)
}

/// An optional id: absent means none.
fn optional<T>(
    value: Option<&str>,
    parse: impl FnOnce(&str) -> Result<T, FieldViolation>,
) -> Result<Option<T>, FieldViolation> {
    value.map(parse).transpose()
}

/// A required `[from, to)` of wire timestamps.
fn required_range(
    from: &Option<Timestamp>,
    to: &Option<Timestamp>,
) -> Result<(i64, i64), Vec<FieldViolation>> {
    let required = |field: &str, value: &Option<Timestamp>| match value {
        Some(value) => unix_seconds(field, value),
        None => Err(FieldViolation::new(field, "is required")),
    };
    match (required("from", from), required("to", to)) {
        (Ok(from), Ok(to)) if to <= from => {
            Err(vec![FieldViolation::new("to", "must be after from")])
        }
        (Ok(from), Ok(to)) => Ok((from, to)),
        (from, to) => Err(from.err().into_iter().chain(to.err()).collect()),
    }
}

pub fn close_from_proto(
    request: proto::CloseSlotsRequest,
    limits: &Limits,
    caller: &str,
) -> Result<CloseCommand, DomainError> {
    let (site_id, service_id, (from_unix_s, to_unix_s), request, reason) = (
        site_id("site_id", &request.site_id, limits),
        optional(request.service_id.as_deref(), |id| {
            service_id("service_id", id, limits)
        }),
        required_range(&request.from, &request.to),
        optional_request_key(&request.request_id, limits, caller),
        display_text(
            "reason",
            &request.reason,
            "must not be empty: citizens see it on their cancelled bookings",
            limits.close_reason_length_max,
        ),
    )
        .all_valid()?;
    Ok(CloseCommand {
        site_id,
        service_id,
        from_unix_s,
        to_unix_s,
        reason,
        request,
    })
}

pub fn book_from_proto(
    request: proto::BookRequest,
    limits: &Limits,
    ids: &CitizenIds,
    caller: &Caller,
) -> Result<BookCommand, DomainError> {
    let (slot, citizen_id, request, hold_id) = (
        slot_key("slot_id", &request.slot_id, limits),
        ids.canonical(&request.citizen_id),
        request_key(&request.request_id, limits, &caller.actor()),
        optional(request.hold_id.as_deref(), |id| {
            BookingId::parse("hold_id", id)
        }),
    )
        .all_valid()?;
    Ok(BookCommand {
        slot,
        citizen_id,
        request,
        hold_id,
        channel: caller.channel(),
    })
}

/// A hold's ttl: 0 means the default.
fn hold_ttl_seconds(value: u32, limits: &Limits) -> Result<u32, FieldViolation> {
    match value {
        0 => Ok(limits.hold_ttl_seconds_default),
        ttl if ttl <= limits.hold_ttl_seconds_max => Ok(ttl),
        _ => Err(FieldViolation::new(
            "ttl_seconds",
            format!(
                "must be between 0 (default {}) and {}",
                limits.hold_ttl_seconds_default, limits.hold_ttl_seconds_max
            ),
        )),
    }
}

/// A `BookGroup` request: the slot, the distinct canonical members (1 to
/// `group_size_max`), the request id.
pub fn group_from_proto(
    request: proto::BookGroupRequest,
    limits: &Limits,
    ids: &CitizenIds,
    caller: &Caller,
) -> Result<GroupCommand, DomainError> {
    let members = || -> Result<Vec<String>, Vec<FieldViolation>> {
        let count = request.citizen_ids.len();
        if count == 0 || count > limits.group_size_max {
            return Err(vec![FieldViolation::new(
                "citizen_ids",
                format!("must name 1 to {} citizens", limits.group_size_max),
            )]);
        }
        let mut violations = Vec::new();
        let mut members: Vec<String> = Vec::with_capacity(count);
        for (index, id) in request.citizen_ids.iter().enumerate() {
            let field = format!("citizen_ids[{index}]");
            match ids.canonical(id) {
                Ok(id) if members.contains(&id) => {
                    violations.push(FieldViolation::new(field, "names a citizen twice"))
                }
                Ok(id) => members.push(id),
                Err(violation) => {
                    violations.push(FieldViolation::new(field, violation.description))
                }
            }
        }
        match violations.is_empty() {
            true => Ok(members),
            false => Err(violations),
        }
    };
    let (slot, citizen_ids, request) = (
        slot_key("slot_id", &request.slot_id, limits),
        members(),
        request_key(&request.request_id, limits, &caller.actor()),
    )
        .all_valid()?;
    Ok(GroupCommand {
        slot,
        citizen_ids,
        asking: None,
        request,
        channel: caller.channel(),
    })
}

pub fn hold_from_proto(
    request: proto::HoldSlotRequest,
    limits: &Limits,
    ids: &CitizenIds,
    caller: &Caller,
) -> Result<HoldCommand, DomainError> {
    let (slot, citizen_id, request, ttl_seconds) = (
        slot_key("slot_id", &request.slot_id, limits),
        ids.canonical(&request.citizen_id),
        request_key(&request.request_id, limits, &caller.actor()),
        hold_ttl_seconds(request.ttl_seconds, limits),
    )
        .all_valid()?;
    Ok(HoldCommand {
        slot,
        citizen_id,
        request,
        ttl_seconds,
        channel: caller.channel(),
    })
}

/// What `GetBooking` asks for: the booking and its citizen.
pub fn get_booking_from_proto(
    request: proto::GetBookingRequest,
    ids: &CitizenIds,
) -> Result<(BookingId, String), DomainError> {
    (
        booking_id(&request.booking_id),
        ids.canonical(&request.citizen_id),
    )
        .all_valid()
}

pub fn cancel_from_proto(
    request: proto::CancelBookingRequest,
    limits: &Limits,
    ids: &CitizenIds,
    caller: &Caller,
) -> Result<CancelCommand, DomainError> {
    let (booking_id, citizen_id, request) = (
        booking_id(&request.booking_id),
        ids.canonical(&request.citizen_id),
        request_key(&request.request_id, limits, &caller.actor()),
    )
        .all_valid()?;
    Ok(CancelCommand {
        booking_id,
        citizen_id,
        request,
    })
}

pub fn reschedule_from_proto(
    request: proto::RescheduleBookingRequest,
    limits: &Limits,
    ids: &CitizenIds,
    caller: &Caller,
) -> Result<RescheduleCommand, DomainError> {
    let (booking_id, citizen_id, new_slot, request) = (
        booking_id(&request.booking_id),
        ids.canonical(&request.citizen_id),
        slot_key("new_slot_id", &request.new_slot_id, limits),
        request_key(&request.request_id, limits, &caller.actor()),
    )
        .all_valid()?;
    Ok(RescheduleCommand {
        booking_id,
        citizen_id,
        new_slot,
        request,
        channel: caller.channel(),
    })
}

/// What `PublishSchedule` asks for: a site, a service and the schedule to publish.
pub fn publish_from_proto(
    request: &proto::PublishScheduleRequest,
    limits: &Limits,
) -> Result<(SiteId, ServiceId, Schedule), DomainError> {
    let schedule = Schedule::parse(
        &ScheduleInput {
            first_day: &request.first_day,
            last_day: &request.last_day,
            opening_hours: request
                .opening_hours
                .iter()
                .map(|h| (h.weekday, h.opens.as_str(), h.closes.as_str()))
                .collect(),
            slot_minutes: request.slot_minutes,
            capacity_per_slot: request.capacity_per_slot,
        },
        &crate::config::schedule_bounds(limits),
    );
    (
        site_id("site_id", &request.site_id, limits),
        service_id("service_id", &request.service_id, limits),
        schedule,
    )
        .all_valid()
}

/// What `SetSlotCapacity` asks for: the slot, its new capacity, the optional request id.
pub fn set_capacity_from_proto(
    request: &proto::SetSlotCapacityRequest,
    limits: &Limits,
    caller: &str,
) -> Result<(SlotKey, u32, Option<RequestKey>), DomainError> {
    let capacity = match request.capacity {
        capacity if capacity <= limits.capacity_per_slot_max => Ok(capacity),
        _ => Err(FieldViolation::new(
            "capacity",
            format!("must be at most {}", limits.capacity_per_slot_max),
        )),
    };
    let (slot, request, capacity) = (
        slot_key("slot_id", &request.slot_id, limits),
        optional_request_key(&request.request_id, limits, caller),
        capacity,
    )
        .all_valid()?;
    Ok((slot, capacity, request))
}

/// A slot as a caller sees it: `release_at` is its release's, if it is in one, and
/// `remaining` the free places the caller's channel may take (see
/// `Engine::slot_shown`).
pub fn slot_to_proto(
    site: &Site,
    slot: &Slot,
    (release_at, remaining): (Option<i64>, u32),
) -> proto::Slot {
    let (counter, key) = (slot.counter.snapshot(), slot.key());
    proto::Slot {
        slot_id: key.text(),
        site_id: key.site_id.as_str().to_owned(),
        service_id: key.service_id.as_str().to_owned(),
        start: Some(timestamp(key.start_unix_s)),
        end: Some(timestamp(slot.end_unix_s())),
        local_start: local_rfc3339(key.start_unix_s, site.time_zone),
        time_zone: site.time_zone.name().to_owned(),
        capacity: counter.capacity,
        remaining,
        closed: counter.closed,
        release_at: release_at.map(timestamp_ms),
    }
}

/// A search's page as `SearchSlots` answers it to `channel`: each slot with the places
/// that channel may take (with `only_available`, a slot whose free places are all
/// reserved for other channels is left out: they are not free to this one).
pub fn search_answer(
    engine: &Engine,
    page: &SearchPage,
    only_available: bool,
    channel: &ChannelId,
) -> proto::SearchSlotsResponse {
    proto::SearchSlotsResponse {
        slots: page
            .slots
            .iter()
            .filter_map(|(site, slot)| {
                let shown = engine.slot_shown(site, slot, Some(channel));
                let free_to_caller = !only_available || shown.1 > 0;
                free_to_caller.then(|| slot_to_proto(site, slot, shown))
            })
            .collect(),
        next_page_token: page
            .next_after
            .as_ref()
            .map(SlotKey::text)
            .unwrap_or_default(),
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

/// A capacity row's schedule: its weekdays share one opening interval.
fn row_schedule(
    row: &proto::CapacityRow,
    limits: &Limits,
) -> Result<Schedule, Vec<FieldViolation>> {
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
    if !row.weekdays.is_empty() {
        return schedule;
    }
    // No weekdays: say so once, in the file's own terms.
    let mut violations = vec![FieldViolation::new(
        "weekdays",
        "must list at least one ISO weekday 1 (Monday) to 7 (Sunday)",
    )];
    if let Err(found) = schedule {
        violations.extend(found.into_iter().filter(|v| v.field != "opening_hours"));
    }
    Err(violations)
}

/// Validates one row of a capacity file. Every violation is named
/// `rows[LINE].COLUMN`, with the row's line in its file and the CSV column.
pub fn import_row(
    row: proto::CapacityRow,
    limits: &Limits,
) -> Result<ImportRow, Vec<FieldViolation>> {
    // `site_from_proto` refuses only with field violations; anything else names the site.
    let site = site_from_proto(row.site.clone(), limits).map_err(|error| match error {
        DomainError::Invalid(violations) => violations,
        other => vec![FieldViolation::new("site", other.to_string())],
    });
    let checked = (
        site,
        service_id("service_id", &row.service_id, limits),
        row_schedule(&row, limits),
    )
        .checked();
    match checked {
        Ok((site, service_id, schedule)) => Ok(ImportRow {
            line: row.line,
            site,
            service_id,
            schedule,
        }),
        Err(violations) => {
            let mut found: Vec<FieldViolation> = Vec::new();
            for violation in violations {
                let field = format!("rows[{}].{}", row.line, row_column(&violation.field));
                let renamed = FieldViolation::new(field, violation.description);
                if !found.contains(&renamed) {
                    found.push(renamed);
                }
            }
            Err(found)
        }
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

/// A citizen list's `page_token`: `start/booking_id` of the last booking sent (see
/// [`booking_page_token_of`]); empty means the first page.
fn booking_page_token(token: &str) -> Result<Option<(i64, BookingId)>, FieldViolation> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = not_a_page_token;
    let (start, id) = token.split_once('/').ok_or_else(bad)?;
    let start = start.parse().map_err(|_| bad())?;
    let id = BookingId::parse("page_token", id).map_err(|_| bad())?;
    Ok(Some((start, id)))
}

/// The `next_page_token` of a citizen list that goes on after (start, booking).
pub fn booking_page_token_of((start, id): (i64, BookingId)) -> String {
    format!("{start}/{id}")
}

pub fn citizen_bookings_from_proto(
    request: proto::ListCitizenBookingsRequest,
    limits: &Limits,
    ids: &CitizenIds,
) -> Result<CitizenBookingsQuery, DomainError> {
    let (citizen_id, service_id, page_size, after) = (
        ids.canonical(&request.citizen_id),
        optional(request.service_id.as_deref(), |id| {
            service_id("service_id", id, limits)
        }),
        page_size(request.page_size, limits),
        booking_page_token(&request.page_token),
    )
        .all_valid()?;
    Ok(CitizenBookingsQuery {
        citizen_id,
        service_id,
        after,
        page_size,
    })
}

pub fn event_to_proto(view: &EventView) -> proto::Event {
    use crate::domain::event::EventKind;
    let EventView {
        sequence,
        event,
        site,
    } = view;
    let kind = match event.kind {
        EventKind::BookingConfirmed => proto::EventKind::BookingConfirmed,
        EventKind::BookingCancelled => proto::EventKind::BookingCancelled,
        EventKind::BookingRescheduled => proto::EventKind::BookingRescheduled,
        EventKind::HoldExpired => proto::EventKind::HoldExpired,
        EventKind::SlotClosed => proto::EventKind::SlotClosed,
        EventKind::CapacityChanged => proto::EventKind::CapacityChanged,
        EventKind::OfferMade => proto::EventKind::OfferMade,
        EventKind::OfferEnded => proto::EventKind::OfferExpired,
        EventKind::CheckedIn => proto::EventKind::CheckedIn,
        EventKind::NoShow => proto::EventKind::NoShow,
    };
    let slot = &event.slot;
    let booking =
        (event.booking.as_ref()).map(|booking| event_booking_to_proto(event, booking, site));
    let id = |id: Option<BookingId>| id.map(|id| id.to_string()).unwrap_or_default();
    proto::Event {
        sequence: *sequence,
        at: Some(timestamp_ms(event.at_unix_ms)),
        kind: kind as i32,
        booking,
        slot_id: slot.to_string(),
        reason: event.reason.clone(),
        site_id: slot.site_id.to_string(),
        service_id: slot.service_id.to_string(),
        hold_id: id(event.hold_id),
        previous_booking_id: id(event.previous_booking_id),
        capacity: event.capacity.unwrap_or_default(),
    }
}

/// The booking of a `Booking*`, `CheckedIn` or `NoShow` event, as the event left it.
fn event_booking_to_proto(event: &Event, booking: &EventBooking, site: &Site) -> proto::Booking {
    use crate::domain::event::EventKind;
    let slot = &event.slot;
    let state = match (event.kind, booking.cancelled_at_unix_ms) {
        (EventKind::CheckedIn, _) => proto::BookingState::Attended,
        (EventKind::NoShow, _) => proto::BookingState::NoShow,
        (_, None) => proto::BookingState::Confirmed,
        (_, Some(_)) => proto::BookingState::Cancelled,
    };
    proto::Booking {
        booking_id: booking.booking_id.to_string(),
        slot_id: slot.to_string(),
        site_id: slot.site_id.to_string(),
        service_id: slot.service_id.to_string(),
        start: Some(timestamp(slot.start_unix_s)),
        end: Some(timestamp(booking.end_unix_s)),
        local_start: local_rfc3339(slot.start_unix_s, site.time_zone),
        state: state as i32,
        created_at: Some(timestamp_ms(booking.created_at_unix_ms)),
        time_zone: site.time_zone.name().to_string(),
        cancelled_at: booking.cancelled_at_unix_ms.map(timestamp_ms),
        cancel_reason: match booking.cancelled_at_unix_ms {
            Some(_) => event.reason.clone(),
            None => String::new(),
        },
        attendance_at: matches!(event.kind, EventKind::CheckedIn | EventKind::NoShow)
            .then(|| timestamp_ms(event.at_unix_ms)),
        reference: (booking.reference.map(|r| r.to_string())).unwrap_or_default(),
        series_id: (booking.series.as_ref())
            .map_or_else(String::new, |(series_id, _)| series_id.to_string()),
        dose: booking
            .series
            .as_ref()
            .map_or(0, |(_, dose)| u32::from(*dose)),
        // Events never say who: no citizen id, and never the check-in code.
        ..Default::default()
    }
}

/// The UTC date of an instant.
pub fn utc_date(unix_ms: i64) -> NaiveDate {
    chrono::DateTime::from_timestamp_millis(unix_ms)
        .unwrap_or_default()
        .date_naive()
}

fn day_text(day: NaiveDate) -> String {
    day.format("%Y-%m-%d").to_string()
}

/// A local day `YYYY-MM-DD`; empty means `default`.
fn day_or(field: &str, text: &str, default: NaiveDate) -> Result<NaiveDate, FieldViolation> {
    if text.is_empty() {
        return Ok(default);
    }
    crate::domain::schedule::local_day(field, text)
}

/// A summary's `page_token`: `site_id/service_id/YYYY-MM-DD` of the last row sent
/// (ids never hold a `/`); empty means the first page.
fn row_key_token(token: &str, limits: &Limits) -> Result<Option<RowKey>, FieldViolation> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = not_a_page_token;
    let mut parts = token.split('/');
    let (Some(site), Some(service), Some(day), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    Ok(Some(RowKey {
        site_id: site_id("page_token", site, limits).map_err(|_| bad())?,
        service_id: service_id("page_token", service, limits).map_err(|_| bad())?,
        day: day_or("page_token", day, NaiveDate::MIN).map_err(|_| bad())?,
    }))
}

/// `first_day..=last_day` with the defaults filled in: at most `search_range_days_max`
/// days.
fn day_range(
    (first, last): (&str, &str),
    today: NaiveDate,
    limits: &Limits,
) -> Result<(NaiveDate, NaiveDate), FieldViolation> {
    let first = day_or("first_day", first, today)?;
    let default_days = u64::from(limits.search_range_days_default.max(1) - 1);
    let default_last = (first.checked_add_days(chrono::Days::new(default_days)))
        .ok_or_else(|| FieldViolation::new("first_day", "is too far ahead"))?;
    let last = day_or("last_day", last, default_last)?;
    let days = (last - first).num_days() + 1;
    if days < 1 {
        return Err(FieldViolation::new(
            "last_day",
            "must not be before first_day",
        ));
    }
    if days > i64::from(limits.search_range_days_max) {
        return Err(FieldViolation::new(
            "last_day",
            format!("the range is at most {} days", limits.search_range_days_max),
        ));
    }
    Ok((first, last))
}

pub fn summary_from_proto(
    request: proto::GetAvailabilitySummaryRequest,
    limits: &Limits,
    today: NaiveDate,
) -> Result<SummaryQuery, DomainError> {
    let (region_id, service_id, (first_day, last_day), page_size, after) = (
        optional(request.region_id.as_deref(), |id| {
            region_id("region_id", id, limits)
        }),
        optional(request.service_id.as_deref(), |id| {
            service_id("service_id", id, limits)
        }),
        day_range((&request.first_day, &request.last_day), today, limits),
        page_size(request.page_size, limits),
        row_key_token(&request.page_token, limits),
    )
        .all_valid()?;
    Ok(SummaryQuery {
        region_id,
        service_id,
        first_day,
        last_day,
        after,
        page_size,
    })
}

pub fn summary_to_proto(page: &SummaryPage) -> proto::GetAvailabilitySummaryResponse {
    let as_of = timestamp_ms(page.as_of_unix_ms);
    let rows = page
        .rows
        .iter()
        .map(|row| {
            let totals = &row.totals.totals;
            proto::AvailabilityRow {
                site_id: row.site.site_id.to_string(),
                site_name: row.site.name.clone(),
                region_id: row.site.region_id.to_string(),
                service_id: row.totals.service_id.to_string(),
                day: day_text(row.totals.day),
                slots: totals.slots,
                capacity: totals.capacity,
                booked: totals.booked,
                remaining: row.totals.remaining,
                as_of: Some(as_of),
                held: totals.held,
                slots_closed: totals.slots_closed,
                reserved: totals.reserved,
            }
        })
        .collect();
    let next_page_token = page
        .next
        .as_ref()
        .map(|next| {
            let day = day_text(next.day);
            format!("{}/{}/{day}", next.site_id, next.service_id)
        })
        .unwrap_or_default();
    proto::GetAvailabilitySummaryResponse {
        rows,
        next_page_token,
    }
}

/// A booking as its citizen sees it: with its check-in code.
pub fn booking_to_proto(view: &BookingView) -> proto::Booking {
    let BookingView { booking, site } = view;
    let (state, cancelled_at, cancel_reason) = match &booking.state {
        DomainBookingState::Cancelled {
            at_unix_ms, reason, ..
        } => (
            proto::BookingState::Cancelled,
            Some(timestamp_ms(*at_unix_ms)),
            reason.clone(),
        ),
        other => (booking_state_to_proto(other), None, String::new()),
    };
    let series = booking.series.as_ref();
    proto::Booking {
        booking_id: booking.booking_id.to_string(),
        slot_id: booking.slot.text(),
        site_id: booking.slot.site_id.as_str().to_owned(),
        service_id: booking.slot.service_id.as_str().to_owned(),
        start: Some(timestamp(booking.slot.start_unix_s)),
        end: Some(timestamp(booking.end_unix_s)),
        local_start: local_rfc3339(booking.slot.start_unix_s, site.time_zone),
        state: state as i32,
        created_at: Some(timestamp_ms(booking.created_at_unix_ms)),
        time_zone: site.time_zone.name().to_string(),
        cancelled_at,
        cancel_reason,
        reference: booking
            .codes
            .map(|codes| codes.reference.to_string())
            .unwrap_or_default(),
        check_in_code: booking
            .codes
            .map(|codes| format!("{:04}", codes.check_in_code))
            .unwrap_or_default(),
        series_id: series.map(|s| s.series_id.to_string()).unwrap_or_default(),
        dose: series.map_or(0, |s| u32::from(s.dose)),
        attendance_at: attendance_at(&booking.state),
    }
}

/// A booking as anyone but its citizen sees it (exports, the desk): no check-in code.
pub fn booking_to_proto_without_code(view: &BookingView) -> proto::Booking {
    proto::Booking {
        check_in_code: String::new(),
        ..booking_to_proto(view)
    }
}

pub fn booking_state_to_proto(state: &DomainBookingState) -> proto::BookingState {
    match state {
        DomainBookingState::Confirmed => proto::BookingState::Confirmed,
        DomainBookingState::Cancelled { .. } => proto::BookingState::Cancelled,
        DomainBookingState::Attended { .. } => proto::BookingState::Attended,
        DomainBookingState::NoShow { .. } => proto::BookingState::NoShow,
    }
}

/// When the desk checked the booking in or marked it a no-show.
pub fn attendance_at(state: &DomainBookingState) -> Option<Timestamp> {
    match state {
        DomainBookingState::Attended { at_unix_ms } | DomainBookingState::NoShow { at_unix_ms } => {
            Some(timestamp_ms(*at_unix_ms))
        }
        _ => None,
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

    /// A zone named in the wrong case is refused with its spelling; an unknown one with
    /// an example.
    #[test]
    fn a_miscased_zone_is_told_its_spelling() {
        let refused = |name: &str| time_zone("time_zone", name).unwrap_err().description;
        assert!(refused("europe/rome").ends_with("spell it Europe/Rome"));
        assert!(refused("AMERICA/PORT-AU-PRINCE").ends_with("spell it America/Port-au-Prince"));
        assert!(refused("Europe/Rom").ends_with("such as Europe/Rome"));
        assert_eq!(time_zone("time_zone", "Europe/Rome"), Ok(Tz::Europe__Rome));
    }

    #[test]
    fn local_time_carries_the_offset() {
        // 2027-03-28T07:00:00Z is 09:00 in Rome after the spring-forward.
        assert_eq!(
            local_rfc3339(1_806_217_200, chrono_tz::Europe::Rome),
            "2027-03-28T09:00:00+02:00"
        );
    }

    /// The hand-written local time is chrono's to the byte: in every zone chrono-tz
    /// knows, at instants from 1800 to 2200 (local mean times, DST changes, half hours
    /// both sides of UTC, quarter hours east of it) and at the wire's extremes.
    #[test]
    fn local_time_is_what_chrono_writes_in_every_zone() {
        let chrono = |unix_s: i64, zone: Tz| {
            Utc.timestamp_opt(unix_s, 0)
                .single()
                .map(|t| {
                    t.with_timezone(&zone)
                        .to_rfc3339_opts(SecondsFormat::Secs, false)
                })
                .unwrap_or_default()
        };
        let (from, to) = (-5_364_662_400_i64, 7_258_118_400_i64); // 1800 to 2200
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for zone in chrono_tz::TZ_VARIANTS {
            for _ in 0..300 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let unix_s = from + (state % (to - from) as u64) as i64;
                assert_eq!(
                    local_rfc3339(unix_s, zone),
                    chrono(unix_s, zone),
                    "{zone} {unix_s}"
                );
            }
            for unix_s in [
                0,
                -62_167_219_200,
                TIMESTAMP_SECONDS_MAX,
                i64::MIN,
                i64::MAX,
            ] {
                assert_eq!(
                    local_rfc3339(unix_s, zone),
                    chrono(unix_s, zone),
                    "{zone} {unix_s}"
                );
            }
        }
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
