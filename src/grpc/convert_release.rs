//! Proto ↔ domain conversions of releases and queue tickets (PRODUCT.md part B), with
//! their validation: every field violation of a request at once, like `convert`.

use prost_types::Timestamp;

use crate::config::Limits;
use crate::domain::citizen_id::CitizenIds;
use crate::domain::error::{AllValid, DomainError, FieldViolation};
use crate::domain::ids::{ChannelId, ReleaseId};
use crate::domain::release::{
    Phase, QueueRules, Release, ReleaseScope, Reserve, TicketState, TicketView,
};
use crate::grpc::convert::{
    optional_request_key, region_id, request_key, service_id, site_ids, timestamp, timestamp_ms,
    unix_seconds,
};
use crate::proto;
use crate::service::{JoinCommand, ReleaseStatus};

/// An admission's length when `CreateRelease` gives none.
const ADMISSION_TTL_SECONDS_DEFAULT: u32 = 600;
/// The longest admission.
const ADMISSION_TTL_SECONDS_MAX: u32 = 86_400;

pub fn release_id(field: &str, value: &str, limits: &Limits) -> Result<ReleaseId, FieldViolation> {
    ReleaseId::parse(field, value, limits.id_length_max)
}

/// A wire timestamp in milliseconds (1970..=9999).
fn unix_ms(field: &str, value: &Timestamp) -> Result<i64, FieldViolation> {
    Ok(unix_seconds(field, value)? * 1_000 + i64::from(value.nanos / 1_000_000))
}

fn required_ms(field: &str, value: &Option<Timestamp>) -> Result<i64, FieldViolation> {
    match value {
        Some(value) => unix_ms(field, value),
        None => Err(FieldViolation::new(field, "is required")),
    }
}

/// `region_id` or `site_ids`, exactly one.
fn scope(release: &proto::Release, limits: &Limits) -> Result<ReleaseScope, Vec<FieldViolation>> {
    match (release.region_id.is_empty(), release.site_ids.is_empty()) {
        (false, true) => region_id("release.region_id", &release.region_id, limits)
            .map(ReleaseScope::Region)
            .map_err(|v| vec![v]),
        (true, false) if release.site_ids.len() > limits.release_sites_max => {
            Err(vec![FieldViolation::new(
                "release.site_ids",
                format!(
                    "at most {} sites; name a region instead",
                    limits.release_sites_max
                ),
            )])
        }
        (true, false) => {
            site_ids("release.site_ids", &release.site_ids, limits).map(ReleaseScope::Sites)
        }
        _ => Err(vec![FieldViolation::new(
            "release.region_id",
            "give either region_id or site_ids (one of them)",
        )]),
    }
}

/// `[from, to)` in seconds.
fn range(release: &proto::Release) -> Result<(i64, i64), Vec<FieldViolation>> {
    let second = |field: &str, value: &Option<Timestamp>| match value {
        Some(value) => unix_seconds(field, value),
        None => Err(FieldViolation::new(field, "is required")),
    };
    match (
        second("release.from", &release.from),
        second("release.to", &release.to),
    ) {
        (Ok(from), Ok(to)) if to <= from => Err(vec![FieldViolation::new(
            "release.to",
            "must be after from",
        )]),
        (Ok(from), Ok(to)) => Ok((from, to)),
        (from, to) => Err(from.err().into_iter().chain(to.err()).collect()),
    }
}

/// The queue's rules, when `queue_opens_at` is set (its seed is drawn by the engine).
fn queue(release: &proto::Release) -> Result<Option<QueueRules>, Vec<FieldViolation>> {
    let ttl = match release.admission_ttl_seconds {
        0 => ADMISSION_TTL_SECONDS_DEFAULT,
        ttl if ttl <= ADMISSION_TTL_SECONDS_MAX => ttl,
        _ => {
            return Err(vec![FieldViolation::new(
                "release.admission_ttl_seconds",
                format!("must be at most {ADMISSION_TTL_SECONDS_MAX}"),
            )])
        }
    };
    let Some(opens_at) = &release.queue_opens_at else {
        // The default (600, as PRODUCT.md lists it) is what a client filling defaults
        // sends: accepted, as 0 is; another value would be silently ignored, so refused.
        let ttl_set = ![0, ADMISSION_TTL_SECONDS_DEFAULT].contains(&release.admission_ttl_seconds);
        if release.admissions_per_minute > 0 || ttl_set {
            return Err(vec![FieldViolation::new(
                "release.queue_opens_at",
                "is required for a queue: admissions_per_minute and admission_ttl_seconds \
                 (other than its default) only apply to queued releases",
            )]);
        }
        return Ok(None);
    };
    let opens_at = unix_ms("release.queue_opens_at", opens_at).map_err(|v| vec![v])?;
    Ok(Some(QueueRules {
        opens_at_unix_ms: opens_at,
        admissions_per_minute: release.admissions_per_minute,
        admission_ttl_seconds: ttl,
        seed: [0; 32],
    }))
}

/// The longest a reserve may be kept before its slot: a year.
const RESERVE_HOURS_MAX: u32 = 8_760;

/// `reserved_percent` (sorted by channel) and `reserve_released_hours_before_start`.
fn reserves(
    release: &proto::Release,
    limits: &Limits,
) -> Result<(Vec<Reserve>, u32), Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let mut reserves = Vec::new();
    for (name, percent) in &release.reserved_percent {
        let field = format!("release.reserved_percent[{name}]");
        match ChannelId::parse(&field, name, limits.id_length_max) {
            Err(violation) => violations.push(violation),
            Ok(channel) if channel.is_default() => violations.push(FieldViolation::new(
                field,
                "web is the default channel, whose common places are the rest: reserve for \
                 other channels",
            )),
            Ok(_) if !(1..=100).contains(percent) => violations.push(FieldViolation::new(
                field,
                "must be a percent of each slot's capacity from 1 to 100",
            )),
            Ok(channel) => reserves.push(Reserve {
                channel,
                percent: *percent,
            }),
        }
    }
    if reserves.iter().map(|r| r.percent).sum::<u32>() > 100 {
        violations.push(FieldViolation::new(
            "release.reserved_percent",
            "the reserves add up to more than 100% of a slot",
        ));
    }
    let hours = release.reserve_released_hours_before_start;
    if hours > RESERVE_HOURS_MAX {
        violations.push(FieldViolation::new(
            "release.reserve_released_hours_before_start",
            format!("must be at most {RESERVE_HOURS_MAX}"),
        ));
    }
    if hours > 0 && reserves.is_empty() {
        violations.push(FieldViolation::new(
            "release.reserve_released_hours_before_start",
            "applies to reserved_percent, which is empty",
        ));
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    reserves.sort_by(|a, b| a.channel.cmp(&b.channel));
    Ok((reserves, hours))
}

/// A `CreateRelease` request: the release (its seed and times the engine's to set).
pub fn create_release_from_proto(
    request: proto::CreateReleaseRequest,
    limits: &Limits,
    caller: &str,
) -> Result<Release, DomainError> {
    let Some(release) = request.release else {
        return Err(DomainError::invalid("release", "is required"));
    };
    let (id, scope, service, (from, to), release_at, (queue, (reserves, reserve_hours)), _request) =
        (
            release_id("release.release_id", &release.release_id, limits),
            scope(&release, limits),
            service_id("release.service_id", &release.service_id, limits),
            range(&release),
            required_ms("release.release_at", &release.release_at),
            (queue(&release), reserves(&release, limits)).checked(),
            optional_request_key(&request.request_id, limits, caller),
        )
            .all_valid()?;
    if let Some(rules) = &queue {
        if rules.opens_at_unix_ms >= release_at {
            return Err(DomainError::invalid(
                "release.queue_opens_at",
                "must be before release_at: the draw at release_at ranks who joined before it",
            ));
        }
    }
    Ok(Release {
        release_id: id,
        scope,
        service_id: service,
        from_unix_s: from,
        to_unix_s: to,
        release_at_unix_ms: release_at,
        queue,
        created_at_unix_ms: 0,
        sold_out_at_unix_ms: None,
        reserves,
        reserve_released_hours_before_start: reserve_hours,
    })
}

fn phase_to_proto(phase: Phase) -> proto::ReleasePhase {
    match phase {
        Phase::Announced => proto::ReleasePhase::Announced,
        Phase::QueueOpen => proto::ReleasePhase::QueueOpen,
        Phase::Open => proto::ReleasePhase::Open,
        Phase::SoldOut => proto::ReleasePhase::SoldOut,
    }
}

/// A release as `CreateRelease` answers it (no counts yet).
pub fn release_to_proto(release: &Release, now_unix_ms: i64) -> proto::Release {
    let (region_id, site_ids) = match &release.scope {
        ReleaseScope::Region(region) => (region.to_string(), Vec::new()),
        ReleaseScope::Sites(sites) => (
            String::new(),
            sites.iter().map(ToString::to_string).collect(),
        ),
    };
    let queue = release.queue.as_ref();
    proto::Release {
        release_id: release.release_id.to_string(),
        region_id,
        site_ids,
        service_id: release.service_id.to_string(),
        from: Some(timestamp(release.from_unix_s)),
        to: Some(timestamp(release.to_unix_s)),
        release_at: Some(timestamp_ms(release.release_at_unix_ms)),
        queue_opens_at: queue.map(|q| timestamp_ms(q.opens_at_unix_ms)),
        admissions_per_minute: queue.map_or(0, |q| q.admissions_per_minute),
        admission_ttl_seconds: queue.map_or(0, |q| q.admission_ttl_seconds),
        phase: phase_to_proto(release.phase(now_unix_ms)).into(),
        sold_out_at: release.sold_out_at_unix_ms.map(timestamp_ms),
        created_at: Some(timestamp_ms(release.created_at_unix_ms)),
        reserved_percent: release
            .reserves
            .iter()
            .map(|r| (r.channel.to_string(), r.percent))
            .collect(),
        reserve_released_hours_before_start: release.reserve_released_hours_before_start,
        ..Default::default()
    }
}

/// A release with its counts (`GetRelease`).
pub fn release_status_to_proto(status: &ReleaseStatus, now_unix_ms: i64) -> proto::Release {
    proto::Release {
        phase: phase_to_proto(status.phase).into(),
        places_remaining: status.places_remaining,
        tickets: status.tickets,
        tickets_waiting: status.tickets_waiting,
        tickets_admitted: status.tickets_admitted,
        tickets_admitted_unused: status.tickets_admitted_unused,
        ..release_to_proto(&status.release, now_unix_ms)
    }
}

pub fn get_release_from_proto(
    request: &proto::GetReleaseRequest,
    limits: &Limits,
) -> Result<ReleaseId, DomainError> {
    Ok(release_id("release_id", &request.release_id, limits)?)
}

pub fn join_queue_from_proto(
    request: proto::JoinQueueRequest,
    limits: &Limits,
    ids: &CitizenIds,
    caller: &str,
) -> Result<JoinCommand, DomainError> {
    let (release_id, citizen_id, request) = (
        release_id("release_id", &request.release_id, limits),
        ids.canonical(&request.citizen_id),
        request_key(&request.request_id, limits, caller),
    )
        .all_valid()?;
    Ok(JoinCommand {
        release_id,
        citizen_id,
        request,
    })
}

pub fn get_ticket_from_proto(
    request: proto::GetQueueTicketRequest,
    limits: &Limits,
    ids: &CitizenIds,
) -> Result<(ReleaseId, String), DomainError> {
    (
        release_id("release_id", &request.release_id, limits),
        ids.canonical(&request.citizen_id),
    )
        .all_valid()
}

pub fn ticket_to_proto(release_id: &ReleaseId, view: &TicketView) -> proto::QueueTicket {
    let state = match view.state {
        TicketState::Waiting => proto::QueueTicketState::Waiting,
        TicketState::Admitted => proto::QueueTicketState::Admitted,
        TicketState::SoldOut => proto::QueueTicketState::SoldOut,
        TicketState::Expired => proto::QueueTicketState::Expired,
    };
    proto::QueueTicket {
        release_id: release_id.to_string(),
        state: state.into(),
        position: view.position,
        estimated_admission_at: view.estimated_admission_at_unix_ms.map(timestamp_ms),
        admitted_until: view.admitted_until_unix_ms.map(timestamp_ms),
        joined_at: Some(timestamp_ms(view.joined_at_unix_ms)),
        used: view.used,
    }
}
