//! The `mixed` day's appointment lifecycle, in a region of its own: households booking
//! together (BookGroup) and citizens booking both doses of a series (BookSeries), all at
//! once. Then the checks: every series complete or absent, read back per citizen and in
//! the authority's export, its dose 2 at dose 1's site within its interval in local
//! days; every household all or none, in one slot; no slot over capacity; every
//! acknowledged booking there.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::NaiveDate;
use indicatif::ProgressBar;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::{self, search_slots_request::Scope};
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::report::Tally;
use crate::scenario::{self, admitted, Scenario, Shape, SERVICE_ID};

pub const DOSE2_SERVICE_ID: &str = "covid19-dose2";
/// Dose 2 comes 21 to 28 local days after dose 1, at the same site.
const MIN_DAYS: u32 = 21;
const MAX_DAYS: u32 = 28;
const GROUP_SIZE: usize = 3;
/// Tries (another dose 1 slot each) before a citizen gives up.
const TRIES: usize = 5;

/// What was tried, and what was acknowledged.
#[derive(Default)]
struct Outcomes {
    /// Series citizen → its acknowledged bookings (dose order), `None` if never acknowledged.
    series: HashMap<String, Option<Vec<String>>>,
    /// Household (members) → its acknowledged slot, `None` if never acknowledged.
    groups: HashMap<Vec<String>, Option<String>>,
}

/// Runs `units` (half series, half households of 3) and checks them; `Ok(true)` when no
/// invariant broke.
pub async fn run(
    channels: &[Channel],
    in_flight: usize,
    units: u64,
    progress: &ProgressBar,
) -> Result<bool, String> {
    let places = units.saturating_mul(4);
    let shape = Shape::new(units, 2, 3, places, "lifecycle");
    let scenario = scenario::publish(channels[0].clone(), &shape).await?;
    let series_id = format!("primary-{}", scenario.region_id);
    publish_dose2(channels[0].clone(), &scenario, &shape, &series_id).await?;
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let region = Arc::new(scenario.region_id.clone());
    let sites = Arc::new(scenario.site_ids.clone());
    let phase = scenario::run_workers("lifecycle", channels, in_flight, units, progress, {
        let outcomes = Arc::clone(&outcomes);
        move |channel, unit, mut tally| {
            let (outcomes, region, sites) = (
                Arc::clone(&outcomes),
                Arc::clone(&region),
                Arc::clone(&sites),
            );
            let series_id = format!("primary-{region}");
            async move {
                let mut client = BookingServiceClient::new(channel);
                let site = &sites[(unit / 2) as usize % sites.len()];
                if unit % 2 == 0 {
                    let citizen = format!("series-{region}-{unit}");
                    let booked =
                        book_series(&mut client, (site, &series_id), &citizen, unit, &mut tally)
                            .await;
                    outcomes.lock().await.series.insert(citizen, booked);
                } else {
                    let members: Vec<String> = (0..GROUP_SIZE)
                        .map(|member| format!("household-{region}-{unit}-{member}"))
                        .collect();
                    let booked = book_group(&mut client, site, &members, unit, &mut tally).await;
                    outcomes.lock().await.groups.insert(members, booked);
                }
                tally
            }
        }
    })
    .await;
    progress.finish_and_clear();
    phase.print();
    let outcomes = outcomes.lock().await;
    let violations = verify(channels[0].clone(), &scenario, &outcomes).await?;
    let series_booked = outcomes.series.values().filter(|b| b.is_some()).count();
    let groups_booked = outcomes.groups.values().filter(|b| b.is_some()).count();
    if violations.is_empty() {
        println!(
            "lifecycle invariants: OK ({series_booked} of {} series and {groups_booked} of {} households booked; \
             each series complete or absent (per citizen and in the export), dose 2 at dose 1's site {MIN_DAYS}–{MAX_DAYS} local days later; \
             each household all or none in one slot; no slot over capacity)",
            outcomes.series.len(),
            outcomes.groups.len()
        );
    } else {
        println!("lifecycle invariants: {} VIOLATIONS", violations.len());
        for violation in violations.iter().take(20) {
            println!("  {violation}");
        }
    }
    // Capacity is four times the demand: most units book; none booking means the
    // phase tested nothing.
    let enough =
        series_booked * 2 >= outcomes.series.len() && groups_booked * 2 >= outcomes.groups.len();
    if !enough {
        println!("lifecycle: too few booked to test anything (a regression?)");
    }
    Ok(violations.is_empty() && enough)
}

/// Dose 2's schedule at every site, covering each dose 1 day's window, and the series.
async fn publish_dose2(
    channel: Channel,
    scenario: &Scenario,
    shape: &Shape,
    series_id: &str,
) -> Result<(), String> {
    let mut capacity = CapacityServiceClient::new(channel);
    let first = chrono::Utc::now().date_naive() + chrono::Duration::days(2 + i64::from(MIN_DAYS));
    let last = first + chrono::Duration::days(i64::from(shape.days + MAX_DAYS - MIN_DAYS));
    for site_id in &scenario.site_ids {
        capacity
            .publish_schedule(scenario::daily_schedule(
                site_id,
                DOSE2_SERVICE_ID,
                (first, last),
                4,
            ))
            .await
            .map_err(|e| format!("PublishSchedule dose 2: {e}"))?;
    }
    let dose = |service: &str, (min, max), same_site| proto::SeriesDose {
        service_id: service.into(),
        min_days_after_previous: min,
        max_days_after_previous: max,
        same_site,
    };
    capacity
        .upsert_series(proto::UpsertSeriesRequest {
            series: Some(proto::Series {
                series_id: series_id.into(),
                doses: vec![
                    dose(SERVICE_ID, (0, 0), false),
                    dose(DOSE2_SERVICE_ID, (MIN_DAYS, MAX_DAYS), true),
                ],
            }),
            request_id: String::new(),
        })
        .await
        .map_err(|e| format!("UpsertSeries: {e}"))?;
    Ok(())
}

/// Free slots of `service` at `site_id` starting from `from` (UTC seconds).
async fn free_slots(
    client: &mut BookingServiceClient<Channel>,
    (site_id, service_id): (&str, &str),
    from: i64,
    tally: &mut Tally,
) -> Vec<proto::Slot> {
    let request = proto::SearchSlotsRequest {
        scope: Some(Scope::SiteId(site_id.to_string())),
        service_id: service_id.into(),
        only_available: true,
        page_size: 50,
        from: scenario::at_s(from),
        to: scenario::at_s(from + 40 * 86_400),
        page_token: String::new(),
    };
    let result = admitted(tally, "SearchSlots", || {
        let (mut client, request) = (client.clone(), request.clone());
        async move { client.search_slots(request).await }
    })
    .await;
    result.map(|page| page.slots).unwrap_or_default()
}

/// The local date of a slot's or booking's `local_start` (RFC 3339 with offset).
fn local_date(local_start: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(local_start.get(..10)?, "%Y-%m-%d").ok()
}

/// Both doses: a free dose 1 slot, then the first free dose 2 slot in its window.
async fn book_series(
    client: &mut BookingServiceClient<Channel>,
    (site_id, series_id): (&str, &str),
    citizen: &str,
    unit: u64,
    tally: &mut Tally,
) -> Option<Vec<String>> {
    let now = chrono::Utc::now().timestamp();
    for attempt in 0..TRIES {
        let firsts = free_slots(client, (site_id, SERVICE_ID), now, tally).await;
        let first = firsts.get((unit as usize + attempt * 7) % firsts.len().max(1))?;
        let day = local_date(&first.local_start)?;
        let window = (
            day + chrono::Duration::days(i64::from(MIN_DAYS)),
            day + chrono::Duration::days(i64::from(MAX_DAYS)),
        );
        // Half a day before the same hour 21 days later: the opening hours (08:00–20:00)
        // put the first slots found on the window's first local day.
        let from = first.start.map_or(now, |t| t.seconds) + i64::from(MIN_DAYS) * 86_400 - 43_200;
        let seconds = free_slots(client, (site_id, DOSE2_SERVICE_ID), from, tally).await;
        let Some(second) = seconds
            .iter()
            .filter(|slot| {
                local_date(&slot.local_start).is_some_and(|d| d >= window.0 && d <= window.1)
            })
            .nth(unit as usize % 5)
        else {
            continue;
        };
        let request = proto::BookSeriesRequest {
            series_id: series_id.into(),
            citizen_id: citizen.into(),
            slot_ids: vec![first.slot_id.clone(), second.slot_id.clone()],
            request_id: format!("{citizen}-{attempt}"),
        };
        let result = admitted(tally, "BookSeries", || {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.book_series(request).await }
        })
        .await;
        match result {
            Ok(booked) => return Some(booked.bookings.into_iter().map(|b| b.booking_id).collect()),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => continue,
            Err(_) => return None,
        }
    }
    None
}

/// A household in one free slot.
async fn book_group(
    client: &mut BookingServiceClient<Channel>,
    site_id: &str,
    members: &[String],
    unit: u64,
    tally: &mut Tally,
) -> Option<String> {
    let now = chrono::Utc::now().timestamp();
    for attempt in 0..TRIES {
        let slots = free_slots(client, (site_id, SERVICE_ID), now, tally).await;
        let slot = slots.get((unit as usize + attempt * 7) % slots.len().max(1))?;
        let request = proto::BookGroupRequest {
            slot_id: slot.slot_id.clone(),
            citizen_ids: members.to_vec(),
            request_id: format!("{}-{attempt}", members[0]),
        };
        let result = admitted(tally, "BookGroup", || {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.book_group(request).await }
        })
        .await;
        match result {
            Ok(_) => return Some(slot.slot_id.clone()),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => continue,
            Err(_) => return None,
        }
    }
    None
}

/// A citizen's confirmed bookings, in dose order.
async fn confirmed_of(
    client: &mut BookingServiceClient<Channel>,
    citizen: &str,
) -> Result<Vec<proto::Booking>, String> {
    let mut bookings: Vec<proto::Booking> = client
        .list_citizen_bookings(proto::ListCitizenBookingsRequest {
            citizen_id: citizen.into(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("ListCitizenBookings: {e}"))?
        .into_inner()
        .bookings
        .into_iter()
        .filter(|b| b.state == proto::BookingState::Confirmed as i32)
        .collect();
    bookings.sort_by_key(|b| b.dose);
    Ok(bookings)
}

async fn verify(
    channel: Channel,
    scenario: &Scenario,
    outcomes: &Outcomes,
) -> Result<Vec<String>, String> {
    let mut violations = Vec::new();
    let mut client = BookingServiceClient::new(channel.clone());
    for (citizen, acknowledged) in &outcomes.series {
        let doses = confirmed_of(&mut client, citizen).await?;
        let ids: Vec<String> = doses.iter().map(|b| b.booking_id.clone()).collect();
        match (doses.as_slice(), acknowledged) {
            ([], None) => {}
            ([first, second], Some(acked)) if *acked == ids => {
                if let Some(broken) = series_broken(first, second) {
                    violations.push(format!("{citizen}'s doses break the series: {broken}"));
                }
            }
            (doses, acked) => violations.push(format!(
                "{citizen} holds {} confirmed doses (acknowledged: {acked:?})",
                doses.len()
            )),
        }
    }
    for (members, acknowledged) in &outcomes.groups {
        let mut slots = Vec::new();
        for member in members {
            let booked = confirmed_of(&mut client, member).await?;
            slots.push(booked.first().map(|b| b.slot_id.clone()));
        }
        let all_in = |slot: &String| slots.iter().all(|s| s.as_ref() == Some(slot));
        let fine = match acknowledged {
            Some(slot) => all_in(slot),
            None => slots.iter().all(Option::is_none),
        };
        if !fine {
            violations.push(format!(
                "household {} is split: {slots:?} (acknowledged {acknowledged:?})",
                members[0]
            ));
        }
    }
    let exported = export_of(channel.clone(), scenario).await?;
    violations.extend(series_in_export(&exported, outcomes));
    violations.extend(over_capacity(channel, scenario, &exported).await?);
    Ok(violations)
}

/// What breaks the series rules in a citizen's two confirmed bookings, if anything:
/// doses 1 and 2 of one series, at one site, dose 2 `MIN_DAYS` to `MAX_DAYS` local days
/// after dose 1.
fn series_broken(first: &proto::Booking, second: &proto::Booking) -> Option<String> {
    let days = match (
        local_date(&first.local_start),
        local_date(&second.local_start),
    ) {
        (Some(a), Some(b)) => (b - a).num_days(),
        _ => -1,
    };
    let kept = (i64::from(MIN_DAYS)..=i64::from(MAX_DAYS)).contains(&days)
        && first.site_id == second.site_id
        && !first.series_id.is_empty()
        && first.series_id == second.series_id
        && (first.dose, second.dose) == (1, 2);
    (!kept).then(|| {
        format!(
            "{days} days, sites {} and {}, doses {} and {} of series {:?} and {:?}",
            first.site_id,
            second.site_id,
            first.dose,
            second.dose,
            first.series_id,
            second.series_id
        )
    })
}

/// The series as the authority's export shows them: each acknowledged series' two
/// bookings confirmed, doses 1 and 2 of the same series at one site, dose 2 within its
/// interval in local days; and no other series booking (complete or absent).
fn series_in_export(exported: &[proto::Booking], outcomes: &Outcomes) -> Vec<String> {
    let by_id: HashMap<&str, &proto::Booking> = exported
        .iter()
        .map(|b| (b.booking_id.as_str(), b))
        .collect();
    let confirmed = |b: &&proto::Booking| b.state == proto::BookingState::Confirmed as i32;
    let mut violations = Vec::new();
    let mut acknowledged = 0;
    for ids in outcomes.series.values().flatten() {
        acknowledged += 1;
        let doses: Vec<&proto::Booking> = ids
            .iter()
            .filter_map(|id| by_id.get(id.as_str()).copied())
            .filter(confirmed)
            .collect();
        let [first, second] = doses.as_slice() else {
            violations.push(format!(
                "series {ids:?}: {} confirmed in the export",
                doses.len()
            ));
            continue;
        };
        if let Some(broken) = series_broken(first, second) {
            violations.push(format!("series {ids:?} in the export: {broken}"));
        }
    }
    for dose in [1, 2] {
        let booked = exported
            .iter()
            .filter(confirmed)
            .filter(|b| !b.series_id.is_empty() && b.dose == dose)
            .count();
        if booked != acknowledged {
            violations.push(format!(
                "the export holds {booked} confirmed doses {dose} for {acknowledged} acknowledged series"
            ));
        }
    }
    violations
}

/// Every booking of the scenario's region, from `ExportBookings`.
async fn export_of(channel: Channel, scenario: &Scenario) -> Result<Vec<proto::Booking>, String> {
    let mut capacity = CapacityServiceClient::new(channel);
    let mut stream = capacity
        .export_bookings(proto::ExportBookingsRequest {
            scope: Some(proto::export_bookings_request::Scope::RegionId(
                scenario.region_id.clone(),
            )),
        })
        .await
        .map_err(|e| format!("ExportBookings: {e}"))?
        .into_inner();
    let mut exported = Vec::new();
    while let Some(item) = stream
        .message()
        .await
        .map_err(|e| format!("ExportBookings: {e}"))?
    {
        exported.extend(item.booking);
    }
    Ok(exported)
}

/// Slots (of both services) with more confirmed bookings in the export than places.
async fn over_capacity(
    channel: Channel,
    scenario: &Scenario,
    exported: &[proto::Booking],
) -> Result<Vec<String>, String> {
    let mut per_slot: HashMap<&str, u32> = HashMap::new();
    for booking in exported {
        if booking.state == proto::BookingState::Confirmed as i32 {
            *per_slot.entry(booking.slot_id.as_str()).or_default() += 1;
        }
    }
    let mut violations = Vec::new();
    for site_id in &scenario.site_ids {
        for service_id in [SERVICE_ID, DOSE2_SERVICE_ID] {
            let slots = scenario::slots_of_service(channel.clone(), site_id, service_id).await?;
            for slot in slots {
                let booked = per_slot.get(slot.slot_id.as_str()).copied().unwrap_or(0);
                if booked > slot.capacity || slot.capacity - slot.remaining != booked {
                    violations.push(format!(
                        "slot {} holds {booked} bookings for {} places ({} remaining)",
                        slot.slot_id, slot.capacity, slot.remaining
                    ));
                }
            }
        }
    }
    Ok(violations)
}
