//! Proto ↔ domain conversions of campaigns, registrations and offers (PRODUCT.md part
//! C), with their validation: every field violation of a request at once.

use chrono::{NaiveDate, NaiveTime};
use prost_types::Timestamp;

use crate::config::Limits;
use crate::domain::campaign::{Campaign, Preferences, RegistrationState, Shown, Wave};
use crate::domain::citizen_id::CitizenIds;
use crate::domain::error::{AllValid, DomainError, FieldViolation};
use crate::domain::ids::{check_name_id, CampaignId, SiteId, WaveId};
use crate::grpc::auth::Caller;
use crate::grpc::convert::{
    optional_request_key, region_id, request_key, service_id, site_ids, slot_to_proto,
    timestamp_ms, unix_seconds,
};
use crate::proto;
use crate::service::{CampaignStats, PreRegisterCommand, RegistrationCommand, RegistrationView};

/// Defaults of PRODUCT.md part C, taken when a field is 0.
const OFFER_TTL_SECONDS_DEFAULT: u32 = 3_600;
const OFFERS_DECLINED_MAX_DEFAULT: u32 = 3;
const LAST_MINUTE_HOURS_DEFAULT: u32 = 24;
/// Upper bounds: an offer a week, a hundred declines, a year of last minute.
const OFFER_TTL_SECONDS_MAX: u32 = 7 * 86_400;
const OFFERS_DECLINED_MAX_MAX: u32 = 100;
const LAST_MINUTE_HOURS_MAX: u32 = 8_760;
/// Priority groups a wave or a registration may name.
const GROUPS_MAX: usize = 16;
/// Birth years a registration or a wave may name.
const BIRTH_YEARS: std::ops::RangeInclusive<i32> = 1_880..=2_200;

pub fn campaign_id(
    field: &str,
    value: &str,
    limits: &Limits,
) -> Result<CampaignId, FieldViolation> {
    CampaignId::parse(field, value, limits.id_length_max)
}

/// 0 means `default`; otherwise at most `max`.
fn or_default(field: &str, value: u32, default: u32, max: u32) -> Result<u32, FieldViolation> {
    match value {
        0 => Ok(default),
        value if value <= max => Ok(value),
        _ => Err(FieldViolation::new(field, format!("must be at most {max}"))),
    }
}

fn birth_year(field: &str, value: i32) -> Result<Option<i32>, FieldViolation> {
    match value {
        0 => Ok(None),
        year if BIRTH_YEARS.contains(&year) => Ok(Some(year)),
        _ => Err(FieldViolation::new(
            field,
            format!(
                "must be a year from {} to {} (0: not given)",
                BIRTH_YEARS.start(),
                BIRTH_YEARS.end()
            ),
        )),
    }
}

/// Priority group names: like ids, at most `GROUPS_MAX`, duplicates dropped.
fn groups(
    field: &str,
    values: &[String],
    limits: &Limits,
) -> Result<Vec<String>, Vec<FieldViolation>> {
    if values.len() > GROUPS_MAX {
        return Err(vec![FieldViolation::new(
            field,
            format!("at most {GROUPS_MAX} groups"),
        )]);
    }
    let mut violations = Vec::new();
    let mut groups: Vec<String> = Vec::new();
    for (index, value) in values.iter().enumerate() {
        match check_name_id(&format!("{field}[{index}]"), value, limits.id_length_max) {
            Ok(_) if groups.contains(value) => {}
            Ok(_) => groups.push(value.clone()),
            Err(violation) => violations.push(violation),
        }
    }
    match violations.is_empty() {
        true => Ok(groups),
        false => Err(violations),
    }
}

fn unix_ms(field: &str, value: &Option<Timestamp>) -> Result<i64, FieldViolation> {
    let value = value
        .as_ref()
        .ok_or_else(|| FieldViolation::new(field, "is required"))?;
    Ok(unix_seconds(field, value)? * 1_000 + i64::from(value.nanos / 1_000_000))
}

fn wave_from_proto(
    index: usize,
    wave: &proto::Wave,
    limits: &Limits,
) -> Result<Wave, Vec<FieldViolation>> {
    let field = |name: &str| format!("campaign.waves[{index}].{name}");
    let (wave_id, opens_at, min, max, groups) = (
        WaveId::parse(&field("wave_id"), &wave.wave_id, limits.id_length_max),
        unix_ms(&field("opens_at"), &wave.opens_at),
        birth_year(&field("birth_year_min"), wave.birth_year_min),
        birth_year(&field("birth_year_max"), wave.birth_year_max),
        groups(&field("priority_groups"), &wave.priority_groups, limits),
    )
        .checked()?;
    if let (Some(min), Some(max)) = (min, max) {
        if min > max {
            return Err(vec![FieldViolation::new(
                field("birth_year_max"),
                "must not be before birth_year_min",
            )]);
        }
    }
    Ok(Wave {
        wave_id,
        opens_at_unix_ms: opens_at,
        birth_year_min: min,
        birth_year_max: max,
        priority_groups: groups,
    })
}

fn waves(campaign: &proto::Campaign, limits: &Limits) -> Result<Vec<Wave>, Vec<FieldViolation>> {
    if campaign.waves.is_empty() || campaign.waves.len() > limits.campaign_waves_max {
        return Err(vec![FieldViolation::new(
            "campaign.waves",
            format!("from 1 to {} waves", limits.campaign_waves_max),
        )]);
    }
    let mut violations = Vec::new();
    let mut waves: Vec<Wave> = Vec::new();
    for (index, wave) in campaign.waves.iter().enumerate() {
        match wave_from_proto(index, wave, limits) {
            Ok(wave) if waves.iter().any(|w| w.wave_id == wave.wave_id) => violations.push(
                FieldViolation::new(format!("campaign.waves[{index}].wave_id"), "is a duplicate"),
            ),
            Ok(wave) => waves.push(wave),
            Err(found) => violations.extend(found),
        }
    }
    match violations.is_empty() {
        true => Ok(waves),
        false => Err(violations),
    }
}

/// An `UpsertCampaign` request: the campaign (its seed and creation time the engine's).
pub fn upsert_campaign_from_proto(
    request: proto::UpsertCampaignRequest,
    limits: &Limits,
    caller: &str,
) -> Result<Campaign, DomainError> {
    let Some(campaign) = request.campaign else {
        return Err(DomainError::invalid("campaign", "is required"));
    };
    let ends_at =
        (campaign.ends_at.is_some()).then(|| unix_ms("campaign.ends_at", &campaign.ends_at));
    let (id, service, region, (ttl, declined_max, last_minute), (waves, ends_at), _request) = (
        campaign_id("campaign.campaign_id", &campaign.campaign_id, limits),
        service_id("campaign.service_id", &campaign.service_id, limits),
        region_id("campaign.region_id", &campaign.region_id, limits),
        (
            or_default(
                "campaign.offer_ttl_seconds",
                campaign.offer_ttl_seconds,
                OFFER_TTL_SECONDS_DEFAULT,
                OFFER_TTL_SECONDS_MAX,
            ),
            or_default(
                "campaign.offers_declined_max",
                campaign.offers_declined_max,
                OFFERS_DECLINED_MAX_DEFAULT,
                OFFERS_DECLINED_MAX_MAX,
            ),
            or_default(
                "campaign.last_minute_hours",
                campaign.last_minute_hours,
                LAST_MINUTE_HOURS_DEFAULT,
                LAST_MINUTE_HOURS_MAX,
            ),
        )
            .checked(),
        (waves(&campaign, limits), ends_at.transpose()).checked(),
        optional_request_key(&request.request_id, limits, caller),
    )
        .all_valid()?;
    Ok(Campaign {
        campaign_id: id,
        service_id: service,
        region_id: region,
        offer_ttl_seconds: ttl,
        offers_declined_max: declined_max,
        last_minute_hours: last_minute,
        waves,
        seed: [0; 32],
        created_at_unix_ms: 0,
        ends_at_unix_ms: ends_at,
    })
}

pub fn campaign_to_proto(campaign: &Campaign) -> proto::Campaign {
    proto::Campaign {
        campaign_id: campaign.campaign_id.to_string(),
        service_id: campaign.service_id.to_string(),
        region_id: campaign.region_id.to_string(),
        offer_ttl_seconds: campaign.offer_ttl_seconds,
        offers_declined_max: campaign.offers_declined_max,
        last_minute_hours: campaign.last_minute_hours,
        waves: campaign
            .waves
            .iter()
            .map(|wave| proto::Wave {
                wave_id: wave.wave_id.to_string(),
                opens_at: Some(timestamp_ms(wave.opens_at_unix_ms)),
                birth_year_min: wave.birth_year_min.unwrap_or(0),
                birth_year_max: wave.birth_year_max.unwrap_or(0),
                priority_groups: wave.priority_groups.clone(),
            })
            .collect(),
        created_at: Some(timestamp_ms(campaign.created_at_unix_ms)),
        ends_at: campaign.ends_at_unix_ms.map(timestamp_ms),
    }
}

fn counts_to_proto(counts: &std::collections::HashMap<Shown, u64>) -> proto::RegistrationCounts {
    let count = |shown| counts.get(&shown).copied().unwrap_or(0);
    proto::RegistrationCounts {
        registered: count(Shown::Registered),
        waiting: count(Shown::Waiting),
        offered: count(Shown::Offered),
        booked: count(Shown::Booked),
        exhausted: count(Shown::Exhausted),
        withdrawn: count(Shown::Withdrawn),
    }
}

pub fn campaign_stats_to_proto(
    stats: &CampaignStats,
    now_unix_ms: i64,
) -> proto::GetCampaignStatsResponse {
    let campaign = &stats.campaign;
    let counts = counts_to_proto(&stats.counts.total);
    proto::GetCampaignStatsResponse {
        campaign: Some(campaign_to_proto(campaign)),
        registered: counts.registered,
        waiting: counts.waiting,
        offered: counts.offered,
        booked: counts.booked,
        exhausted: counts.exhausted,
        withdrawn: counts.withdrawn,
        counts: Some(counts),
        by_wave: campaign
            .waves
            .iter()
            .zip(&stats.counts.by_wave)
            .map(|(wave, counts)| proto::WaveStats {
                wave_id: wave.wave_id.to_string(),
                open: wave.is_open(now_unix_ms),
                counts: Some(counts_to_proto(counts)),
            })
            .collect(),
        total: stats.counts.total.values().sum(),
    }
}

fn day(field: &str, text: &str) -> Result<Option<NaiveDate>, FieldViolation> {
    match text {
        "" => Ok(None),
        text => crate::domain::schedule::local_day(field, text).map(Some),
    }
}

fn clock(field: &str, text: &str) -> Result<Option<NaiveTime>, FieldViolation> {
    match text {
        "" => Ok(None),
        text if text.len() == 5 => NaiveTime::parse_from_str(text, "%H:%M")
            .map(Some)
            .map_err(|_| FieldViolation::new(field, "must be a time HH:MM")),
        _ => Err(FieldViolation::new(field, "must be a time HH:MM")),
    }
}

fn preferences(
    preferences: Option<proto::Preferences>,
    limits: &Limits,
) -> Result<Preferences, Vec<FieldViolation>> {
    let p = preferences.unwrap_or_default();
    let (site_ids, first_day, last_day, weekdays, earliest, latest) = (
        preferred_sites(&p.site_ids, limits),
        day("preferences.first_day", &p.first_day),
        day("preferences.last_day", &p.last_day),
        preferred_weekdays(&p.weekdays),
        clock("preferences.earliest", &p.earliest),
        clock("preferences.latest", &p.latest),
    )
        .checked()?;
    if let (Some(first), Some(last)) = (first_day, last_day) {
        if last < first {
            return Err(vec![FieldViolation::new(
                "preferences.last_day",
                "must not be before first_day",
            )]);
        }
    }
    if let (Some(earliest), Some(latest)) = (earliest, latest) {
        if latest < earliest {
            return Err(vec![FieldViolation::new(
                "preferences.latest",
                "must not be before earliest",
            )]);
        }
    }
    Ok(Preferences {
        site_ids,
        first_day,
        last_day,
        weekdays,
        earliest,
        latest,
    })
}

/// `preferences.site_ids`: sorted, without duplicates, at most `registration_sites_max`.
fn preferred_sites(ids: &[String], limits: &Limits) -> Result<Vec<SiteId>, Vec<FieldViolation>> {
    if ids.len() > limits.registration_sites_max {
        return Err(vec![FieldViolation::new(
            "preferences.site_ids",
            format!(
                "at most {} sites (registration_sites_max)",
                limits.registration_sites_max
            ),
        )]);
    }
    site_ids("preferences.site_ids", ids, limits)
}

/// `preferences.weekdays`: ISO weekdays, sorted, without duplicates.
fn preferred_weekdays(weekdays: &[u32]) -> Result<Vec<u8>, FieldViolation> {
    let mut days: Vec<u8> = Vec::new();
    for day in weekdays {
        match u8::try_from(*day) {
            Ok(day) if (1..=7).contains(&day) => days.push(day),
            _ => {
                return Err(FieldViolation::new(
                    "preferences.weekdays",
                    "must be ISO weekdays: 1 (Monday) to 7 (Sunday)",
                ))
            }
        }
    }
    days.sort_unstable();
    days.dedup();
    Ok(days)
}

/// What a verified citizen assertion says of a campaign's eligibility: birth year, groups.
pub type Claims = (Option<i32>, Vec<String>);

/// An assertion's birth year and groups as a registration keeps them. A group no wave
/// could name (not an id-like name: another system's label) is left out; a birth year
/// out of range, or more than `GROUPS_MAX` groups a wave could name, refuse the
/// assertion (dropping some would silently cost a citizen a wave it is entitled to).
pub fn claims(
    birth_year: Option<i32>,
    asserted_groups: Vec<String>,
    limits: &Limits,
) -> Result<Claims, &'static str> {
    if birth_year.is_some_and(|year| !BIRTH_YEARS.contains(&year)) {
        return Err("the assertion's birth_year is out of range");
    }
    let mut kept: Vec<String> = Vec::new();
    for group in asserted_groups {
        let valid = check_name_id("groups", &group, limits.id_length_max).is_ok();
        if valid && !kept.contains(&group) {
            kept.push(group);
        }
    }
    if kept.len() > GROUPS_MAX {
        const _: () = assert!(GROUPS_MAX == 16, "the message says 16");
        return Err("the assertion names more than 16 groups a wave could name");
    }
    Ok((birth_year, kept))
}

/// A `PreRegister` request. `asserted`: the birth year and groups of a verified citizen
/// assertion, which replace the request's.
pub fn pre_register_from_proto(
    request: proto::PreRegisterRequest,
    limits: &Limits,
    ids: &CitizenIds,
    (caller, asserted): (&Caller, Option<Claims>),
) -> Result<PreRegisterCommand, DomainError> {
    let (sent_year, sent_groups) = match asserted {
        Some((year, groups)) => (Ok(year), Ok(groups)),
        None => (
            birth_year("birth_year", request.birth_year),
            groups("priority_groups", &request.priority_groups, limits),
        ),
    };
    let (campaign_id, citizen_id, request_key, (birth_year, groups), preferences) = (
        campaign_id("campaign_id", &request.campaign_id, limits),
        ids.canonical(&request.citizen_id),
        request_key(&request.request_id, limits, &caller.actor()),
        (sent_year, sent_groups).checked(),
        preferences(request.preferences, limits),
    )
        .all_valid()?;
    Ok(PreRegisterCommand {
        campaign_id,
        citizen_id,
        birth_year,
        groups,
        preferences,
        request: request_key,
    })
}

pub fn get_registration_from_proto(
    request: proto::GetRegistrationRequest,
    limits: &Limits,
    ids: &CitizenIds,
) -> Result<(CampaignId, String), DomainError> {
    (
        campaign_id("campaign_id", &request.campaign_id, limits),
        ids.canonical(&request.citizen_id),
    )
        .all_valid()
}

/// AcceptOffer, DeclineOffer and WithdrawRegistration: (campaign, citizen, request id).
pub fn registration_command(
    (campaign, citizen, request): (&str, &str, &str),
    limits: &Limits,
    ids: &CitizenIds,
    caller: &Caller,
) -> Result<RegistrationCommand, DomainError> {
    let (campaign_id, citizen_id, request) = (
        campaign_id("campaign_id", campaign, limits),
        ids.canonical(citizen),
        request_key(request, limits, &caller.actor()),
    )
        .all_valid()?;
    Ok(RegistrationCommand {
        campaign_id,
        citizen_id,
        request,
        channel: caller.channel(),
    })
}

pub fn registration_to_proto(view: &RegistrationView) -> proto::Registration {
    let registration = &view.registration;
    let state = match view.shown {
        Shown::Registered => proto::RegistrationState::Registered,
        Shown::Waiting => proto::RegistrationState::Waiting,
        Shown::Offered => proto::RegistrationState::Offered,
        Shown::Booked => proto::RegistrationState::Booked,
        Shown::Exhausted => proto::RegistrationState::Exhausted,
        Shown::Withdrawn => proto::RegistrationState::Withdrawn,
    };
    let offer = registration.offer().map(|offer| proto::Offer {
        slot: view.offer_slot.as_ref().map(|(site, slot)| {
            slot_to_proto(site, slot, (None, slot.counter.snapshot().remaining()))
        }),
        hold_id: offer.hold_id.to_string(),
        expires_at: Some(timestamp_ms(offer.expires_at_unix_ms)),
        offered_at: Some(timestamp_ms(offer.offered_at_unix_ms)),
    });
    let booking_id = match &registration.state {
        RegistrationState::Booked { booking_id } => booking_id.to_string(),
        _ => String::new(),
    };
    proto::Registration {
        registration_id: registration.registration_id.to_string(),
        campaign_id: registration.campaign_id.to_string(),
        state: state.into(),
        wave_id: view
            .wave_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        offer,
        booking_id,
        registered_at: Some(timestamp_ms(registration.registered_at_unix_ms)),
        offers_declined: registration.declines,
        campaign_ends_at: view.campaign_ends_at_unix_ms.map(timestamp_ms),
    }
}
