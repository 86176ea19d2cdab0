//! The scenarios: `ceiling` (the no-op RPC) and `rush` (an opening morning: every
//! citizen searches, then books, demand well above capacity), and the checks of the
//! invariants after a rush.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::{self, search_slots_request::Scope};
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::assertions::request as asserted;
use crate::report::{Phase, Tally};

pub const SERVICE_ID: &str = "covid19-dose1";
const ZONES: &[&str] = &[
    "Europe/Rome",
    "Europe/Amsterdam",
    "America/New_York",
    "Asia/Tokyo",
];
/// Every day 08:00–20:00 local, 10-minute slots: 72 slots a day per site.
const OPENS: &str = "08:00";
const CLOSES: &str = "20:00";
const SLOT_MINUTES: u32 = 10;
const SLOTS_PER_DAY: u64 = 72;
/// Slots a citizen sees per search.
const SEARCH_PAGE_SIZE: i32 = 20;
/// How far ahead citizens and the verification search: past every scenario slot.
const SEARCH_HORIZON_DAYS: i64 = 300;
/// Search-then-book rounds before a citizen gives up while slots still look free.
const ROUNDS_MAX: usize = 1_000;

#[derive(Clone, Debug)]
pub struct Shape {
    pub citizens: u64,
    pub sites: u32,
    pub days: u32,
    /// Places wanted in all; rounded up to whole places per slot.
    pub places: u64,
    /// Prefix of the scenario's region, sites and citizens: scenarios of one run differ.
    pub tag: &'static str,
}

impl Shape {
    /// At least one site and one day; `places` as given.
    pub fn new(citizens: u64, sites: u32, days: u32, places: u64, tag: &'static str) -> Self {
        Self {
            citizens,
            sites: sites.max(1),
            days: days.max(1),
            places,
            tag,
        }
    }
}

/// What the scenario created, to aim requests at and verify against.
pub struct Scenario {
    pub region_id: String,
    pub site_ids: Vec<String>,
    pub total_capacity: u64,
}

pub async fn publish(channel: Channel, shape: &Shape) -> Result<Scenario, String> {
    let mut capacity = CapacityServiceClient::new(channel);
    let run = std::process::id();
    let region_id = format!("{}-{run}", shape.tag);
    let slots = u64::from(shape.sites) * u64::from(shape.days) * SLOTS_PER_DAY;
    let capacity_per_slot = shape.places.max(1).div_ceil(slots).clamp(1, 10_000) as u32;
    let first = chrono::Utc::now().date_naive() + chrono::Duration::days(2);
    let last = first + chrono::Duration::days(i64::from(shape.days.max(1)) - 1);
    let mut scenario = Scenario {
        region_id: region_id.clone(),
        site_ids: Vec::new(),
        total_capacity: 0,
    };
    for index in 0..shape.sites {
        let site_id = format!("{region_id}-{index}");
        capacity
            .upsert_site(proto::UpsertSiteRequest {
                site: Some(proto::Site {
                    site_id: site_id.clone(),
                    name: format!("Rush site {index}"),
                    region_id: region_id.clone(),
                    time_zone: ZONES[index as usize % ZONES.len()].into(),
                }),
                request_id: format!("{site_id}-site"),
            })
            .await
            .map_err(|e| format!("UpsertSite: {e}"))?;
        let mut schedule = daily_schedule(&site_id, SERVICE_ID, (first, last), capacity_per_slot);
        schedule.request_id = format!("{site_id}-schedule");
        let published = capacity
            .publish_schedule(schedule)
            .await
            .map_err(|e| format!("PublishSchedule: {e}"))?
            .into_inner();
        scenario.total_capacity += published.total_capacity;
        scenario.site_ids.push(site_id);
    }
    Ok(scenario)
}

/// Every day `OPENS`–`CLOSES` local in `SLOT_MINUTES` slots of `capacity_per_slot`
/// places, from `first` to `last`.
pub fn daily_schedule(
    site_id: &str,
    service_id: &str,
    (first, last): (chrono::NaiveDate, chrono::NaiveDate),
    capacity_per_slot: u32,
) -> proto::PublishScheduleRequest {
    proto::PublishScheduleRequest {
        site_id: site_id.into(),
        service_id: service_id.into(),
        first_day: first.format("%Y-%m-%d").to_string(),
        last_day: last.format("%Y-%m-%d").to_string(),
        opening_hours: (1..=7)
            .map(|weekday| proto::OpeningHours {
                weekday,
                opens: OPENS.into(),
                closes: CLOSES.into(),
            })
            .collect(),
        slot_minutes: SLOT_MINUTES,
        capacity_per_slot,
        request_id: String::new(),
    }
}

/// Spreads `requests` over `in_flight` workers on the channels; each worker runs
/// `work(channel, index, tally)` for its share of indexes, threading its tally through.
pub async fn run_workers<Work, Done>(
    name: &'static str,
    channels: &[Channel],
    in_flight: usize,
    requests: u64,
    progress: &ProgressBar,
    work: Work,
) -> Phase
where
    Work: Fn(Channel, u64, Tally) -> Done + Clone + Send + Sync + 'static,
    Done: std::future::Future<Output = Tally> + Send,
{
    progress.set_length(requests);
    progress.set_position(0);
    progress.set_message(name);
    let started = Instant::now();
    let cpu_before = crate::report::server_cpu();
    let stride = in_flight.max(1) as u64;
    let workers: Vec<_> = (0..stride)
        .map(|worker| {
            let channel = channels[worker as usize % channels.len()].clone();
            let (work, progress) = (work.clone(), progress.clone());
            tokio::spawn(async move {
                let mut tally = Tally::new();
                let mut index = worker;
                while index < requests {
                    tally = work(channel.clone(), index, tally).await;
                    progress.inc(1);
                    index += stride;
                }
                tally
            })
        })
        .collect();
    let mut tally = Tally::new();
    for worker in workers {
        if let Ok(worker_tally) = worker.await {
            tally.merge(worker_tally);
        }
    }
    let server_cpu = match (cpu_before, crate::report::server_cpu()) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    Phase {
        name,
        elapsed: started.elapsed(),
        tally,
        server_cpu,
    }
}

pub async fn ceiling(
    channels: &[Channel],
    in_flight: usize,
    requests: u64,
    progress: &ProgressBar,
) -> Phase {
    run_workers(
        "ceiling",
        channels,
        in_flight,
        requests,
        progress,
        |channel, _, mut tally| async move {
            let started = Instant::now();
            let result = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            tally.record("Health/Check", started.elapsed(), &result);
            tally
        },
    )
    .await
}

/// What the server acknowledged to the harness about one booking.
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    pub citizen: u64,
    pub cancelled: bool,
}

/// Bookings the harness was told about, by booking id.
pub type Acknowledged = Arc<Mutex<HashMap<String, Ack>>>;

/// When each booking of a rush was acknowledged, and in which slot (the watchers
/// scenario measures how soon watchers see it).
pub type AckLog = Arc<std::sync::Mutex<Vec<(String, Instant)>>>;

/// The citizen ids of a scenario's citizens `0..count` (what `--asserted` signs for).
pub fn citizen_ids(scenario: &Scenario, count: u64) -> impl Iterator<Item = String> + '_ {
    (0..count).map(move |citizen| citizen_id(&scenario.region_id, citizen))
}

pub fn citizen_id(region: &str, citizen: u64) -> String {
    format!("citizen-{region}-{citizen}")
}

/// The `to` of every search: `SEARCH_HORIZON_DAYS` from now.
/// Every slot of a site (all of them, free or not), in start order, following pages.
pub async fn slots_of(channel: Channel, site_id: &str) -> Result<Vec<proto::Slot>, String> {
    slots_of_service(channel, site_id, SERVICE_ID).await
}

/// Every slot of a site for `service_id` (free or not), in start order, following pages.
pub async fn slots_of_service(
    channel: Channel,
    site_id: &str,
    service_id: &str,
) -> Result<Vec<proto::Slot>, String> {
    let mut client = BookingServiceClient::new(channel);
    let (mut slots, mut page_token) = (Vec::new(), String::new());
    loop {
        let page = client
            .search_slots(proto::SearchSlotsRequest {
                scope: Some(Scope::SiteId(site_id.to_string())),
                service_id: service_id.into(),
                to: Some(search_horizon()),
                page_size: 500,
                page_token,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("SearchSlots: {e}"))?
            .into_inner();
        slots.extend(page.slots);
        if page.next_page_token.is_empty() {
            return Ok(slots);
        }
        page_token = page.next_page_token;
    }
}

/// The instant `unix_ms` milliseconds after the Unix epoch, as a request field.
pub fn at_ms(unix_ms: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: unix_ms.div_euclid(1_000),
        nanos: (unix_ms.rem_euclid(1_000) * 1_000_000) as i32,
    })
}

/// The instant `seconds` after the Unix epoch, as a request field.
pub fn at_s(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

fn search_horizon() -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + SEARCH_HORIZON_DAYS * 86_400,
        nanos: 0,
    }
}

/// Calls until the server admits the request, waiting the RetryInfo delay after each
/// shed answer, as a well-behaved client does; records every try.
pub async fn admitted<T, Call, Fut>(
    tally: &mut Tally,
    rpc: &'static str,
    call: Call,
) -> Result<T, tonic::Status>
where
    Call: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    loop {
        let started = Instant::now();
        let result = call().await;
        tally.record(rpc, started.elapsed(), &result);
        match result {
            Err(status) if crate::report::is_shed(&status) => {
                tokio::time::sleep(crate::report::retry_delay(&status)).await;
            }
            other => return other.map(tonic::Response::into_inner),
        }
    }
}

/// One search of a site's free slots, recorded in the tally.
async fn search_free(
    client: &mut BookingServiceClient<Channel>,
    site_id: &str,
    tally: &mut Tally,
) -> Option<Vec<proto::Slot>> {
    let request = proto::SearchSlotsRequest {
        scope: Some(Scope::SiteId(site_id.to_string())),
        service_id: SERVICE_ID.into(),
        only_available: true,
        page_size: SEARCH_PAGE_SIZE,
        to: Some(search_horizon()),
        ..Default::default()
    };
    let result = admitted(tally, "SearchSlots", || {
        let (mut client, request) = (client.clone(), request.clone());
        async move { client.search_slots(request).await }
    })
    .await;
    result.ok().map(|page| page.slots)
}

/// How a citizen takes a place.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Book,
    /// HoldSlot, then Book with the hold_id.
    Hold,
}

/// Books one of `slots` for the citizen, starting at `first` and moving on after
/// SLOT_FULL; the booking if any.
pub async fn book_one(
    client: &mut BookingServiceClient<Channel>,
    slots: &[proto::Slot],
    first: usize,
    (citizen_id, attempt): (&str, &str),
    via: Via,
    tally: &mut Tally,
) -> Option<proto::Booking> {
    for slot in slots
        .iter()
        .cycle()
        .skip(first % slots.len().max(1))
        .take(slots.len())
    {
        let hold_id = if via == Via::Hold {
            let started = Instant::now();
            let hold = proto::HoldSlotRequest {
                slot_id: slot.slot_id.clone(),
                citizen_id: citizen_id.to_string(),
                request_id: format!("{citizen_id}-{attempt}-hold-{}", slot.slot_id),
                ttl_seconds: 0,
            };
            let held = client.hold_slot(asserted(citizen_id, hold)).await;
            tally.record("HoldSlot", started.elapsed(), &held);
            match held {
                Ok(response) => Some(response.into_inner().hold?.hold_id),
                Err(status) if status.code() == tonic::Code::FailedPrecondition => continue,
                Err(_) => return None,
            }
        } else {
            None
        };
        let request = proto::BookRequest {
            slot_id: slot.slot_id.clone(),
            citizen_id: citizen_id.to_string(),
            request_id: format!("{citizen_id}-{attempt}-{}", slot.slot_id),
            hold_id,
        };
        let result = admitted(tally, "Book", || {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.book(asserted(citizen_id, request)).await }
        })
        .await;
        match result {
            Ok(response) => return response.booking,
            Err(status) if status.code() == tonic::Code::FailedPrecondition => continue,
            Err(_) => return None,
        }
    }
    None
}

pub async fn rush(
    channels: &[Channel],
    in_flight: usize,
    scenario: &Scenario,
    shape: &Shape,
    (acknowledged, log): (Acknowledged, Option<AckLog>),
    progress: &ProgressBar,
) -> Phase {
    let site_ids = Arc::new(scenario.site_ids.clone());
    let region = Arc::new(scenario.region_id.clone());
    run_workers(
        "rush",
        channels,
        in_flight,
        shape.citizens,
        progress,
        move |channel, citizen, mut tally| {
            let (site_ids, acknowledged) = (Arc::clone(&site_ids), Arc::clone(&acknowledged));
            let (region, log) = (Arc::clone(&region), log.clone());
            async move {
                let mut client = BookingServiceClient::new(channel);
                let site_id = &site_ids[(citizen % site_ids.len() as u64) as usize];
                let citizen_id = citizen_id(&region, citizen);
                for round in 0..ROUNDS_MAX {
                    let Some(slots) = search_free(&mut client, site_id, &mut tally).await else {
                        return tally;
                    };
                    if slots.is_empty() {
                        return tally; // sold out for this citizen's site
                    }
                    // Citizens pick different free slots, like people clicking different times.
                    let first = citizen as usize + round;
                    let attempt = round.to_string();
                    if let Some(booking) = book_one(
                        &mut client,
                        &slots,
                        first,
                        (&citizen_id, &attempt),
                        Via::Book,
                        &mut tally,
                    )
                    .await
                    {
                        if let Some(log) = &log {
                            let acked = (booking.slot_id.clone(), Instant::now());
                            log.lock().unwrap_or_else(|p| p.into_inner()).push(acked);
                        }
                        let ack = Ack {
                            citizen,
                            cancelled: false,
                        };
                        acknowledged.lock().await.insert(booking.booking_id, ack);
                        return tally;
                    }
                }
                tally
            }
        },
    )
    .await
}

/// Book only: every slot id is read before the timed phase; citizen `i` books the
/// `i`-th slot (moving on after SLOT_FULL), one Book per citizen when capacity allows.
pub async fn book(
    channels: &[Channel],
    in_flight: usize,
    scenario: &Scenario,
    shape: &Shape,
    acknowledged: Acknowledged,
    progress: &ProgressBar,
) -> Result<Phase, String> {
    let mut slots = Vec::new();
    for site_id in &scenario.site_ids {
        slots.extend(slots_of(channels[0].clone(), site_id).await?);
    }
    let slots = Arc::new(slots);
    let region = Arc::new(scenario.region_id.clone());
    Ok(run_workers(
        "book",
        channels,
        in_flight,
        shape.citizens,
        progress,
        move |channel, citizen, mut tally| {
            let (slots, acknowledged) = (Arc::clone(&slots), Arc::clone(&acknowledged));
            let region = Arc::clone(&region);
            async move {
                let mut client = BookingServiceClient::new(channel);
                let citizen_id = citizen_id(&region, citizen);
                let first = citizen as usize;
                let booked = book_one(
                    &mut client,
                    &slots,
                    first,
                    (&citizen_id, "book"),
                    Via::Book,
                    &mut tally,
                )
                .await;
                if let Some(booking) = booked {
                    let ack = Ack {
                        citizen,
                        cancelled: false,
                    };
                    acknowledged.lock().await.insert(booking.booking_id, ack);
                }
                tally
            }
        },
    )
    .await)
}

/// Searches per citizen in `mixed`: browsing several sites before choosing.
const MIXED_SEARCHES_PER_CITIZEN: u64 = 4;

/// An ordinary busy day: every citizen browses (several searches) and books; one in
/// four books through a hold (HoldSlot, then Book with the hold_id). Then one in five
/// cancels (and half of those book another slot), and one in five reschedules to
/// another slot. Capacity exceeds demand, so books succeed unless a slot fills between
/// search and book.
pub async fn mixed(
    channels: &[Channel],
    in_flight: usize,
    scenario: &Scenario,
    shape: &Shape,
    acknowledged: Acknowledged,
    progress: &ProgressBar,
) -> Phase {
    let site_ids = Arc::new(scenario.site_ids.clone());
    let region = Arc::new(scenario.region_id.clone());
    run_workers(
        "mixed",
        channels,
        in_flight,
        shape.citizens,
        progress,
        move |channel, citizen, mut tally| {
            let (site_ids, acknowledged) = (Arc::clone(&site_ids), Arc::clone(&acknowledged));
            let region = Arc::clone(&region);
            async move {
                let mut client = BookingServiceClient::new(channel);
                let citizen_id = citizen_id(&region, citizen);
                let mut slots = Vec::new();
                for search in 0..MIXED_SEARCHES_PER_CITIZEN {
                    let site_id = &site_ids[((citizen + search) % site_ids.len() as u64) as usize];
                    slots = search_free(&mut client, site_id, &mut tally)
                        .await
                        .unwrap_or_default();
                }
                // One in four takes the place through a hold first.
                let via = if citizen % 4 == 3 {
                    Via::Hold
                } else {
                    Via::Book
                };
                let booked = book_one(
                    &mut client,
                    &slots,
                    citizen as usize,
                    (&citizen_id, "first"),
                    via,
                    &mut tally,
                )
                .await;
                let Some(booking) = booked else {
                    return tally;
                };
                let booking_id = booking.booking_id;
                acknowledged.lock().await.insert(
                    booking_id.clone(),
                    Ack {
                        citizen,
                        cancelled: false,
                    },
                );
                if citizen % 5 == 1 {
                    let Some(target) = slots
                        .iter()
                        .cycle()
                        .skip(citizen as usize + 1)
                        .take(slots.len())
                        .find(|slot| slot.slot_id != booking.slot_id)
                    else {
                        return tally;
                    };
                    let started = Instant::now();
                    let reschedule = proto::RescheduleBookingRequest {
                        booking_id: booking_id.clone(),
                        citizen_id: citizen_id.clone(),
                        new_slot_id: target.slot_id.clone(),
                        request_id: format!("{citizen_id}-move"),
                    };
                    let result = client
                        .reschedule_booking(asserted(&citizen_id, reschedule))
                        .await;
                    tally.record("RescheduleBooking", started.elapsed(), &result);
                    if let Some(moved) = result.ok().and_then(|r| r.into_inner().booking) {
                        let mut acknowledged = acknowledged.lock().await;
                        let cancelled = Ack {
                            citizen,
                            cancelled: true,
                        };
                        acknowledged.insert(booking_id, cancelled);
                        let confirmed = Ack {
                            citizen,
                            cancelled: false,
                        };
                        acknowledged.insert(moved.booking_id, confirmed);
                    }
                    return tally;
                }
                if citizen % 5 != 0 {
                    return tally;
                }
                let started = Instant::now();
                let cancel = proto::CancelBookingRequest {
                    booking_id: booking_id.clone(),
                    citizen_id: citizen_id.clone(),
                    request_id: format!("{citizen_id}-cancel"),
                };
                let result = client.cancel_booking(asserted(&citizen_id, cancel)).await;
                tally.record("CancelBooking", started.elapsed(), &result);
                if result.is_err() {
                    return tally;
                }
                acknowledged.lock().await.insert(
                    booking_id,
                    Ack {
                        citizen,
                        cancelled: true,
                    },
                );
                if citizen % 10 == 0 {
                    if let Some(again) = book_one(
                        &mut client,
                        &slots,
                        citizen as usize + 1,
                        (&citizen_id, "second"),
                        Via::Book,
                        &mut tally,
                    )
                    .await
                    {
                        acknowledged.lock().await.insert(
                            again.booking_id,
                            Ack {
                                citizen,
                                cancelled: false,
                            },
                        );
                    }
                }
                tally
            }
        },
    )
    .await
}

/// Checks the invariants from `ExportBookings`, `SearchSlots` and `GetSiteStats`;
/// returns every violation found. `expected_confirmed`: the exact number of confirmed
/// bookings the scenario must end with, when it is known (a rush fills every place).
pub async fn verify(
    channel: Channel,
    scenario: &Scenario,
    acknowledged: &HashMap<String, Ack>,
    expected_confirmed: Option<u64>,
) -> Result<Vec<String>, String> {
    let mut violations = Vec::new();
    let mut capacity = CapacityServiceClient::new(channel.clone());
    let mut stream = capacity
        .export_bookings(proto::ExportBookingsRequest {
            scope: Some(proto::export_bookings_request::Scope::RegionId(
                scenario.region_id.clone(),
            )),
        })
        .await
        .map_err(|e| format!("ExportBookings: {e}"))?
        .into_inner();
    let mut per_slot: HashMap<String, u64> = HashMap::new();
    let mut exported = HashSet::new();
    let mut confirmed = 0u64;
    while let Some(item) = stream
        .message()
        .await
        .map_err(|e| format!("ExportBookings: {e}"))?
    {
        let Some(booking) = item.booking else {
            continue;
        };
        let is_confirmed = booking.state == proto::BookingState::Confirmed as i32;
        if is_confirmed {
            confirmed += 1;
            *per_slot.entry(booking.slot_id.clone()).or_default() += 1;
        }
        match acknowledged.get(&booking.booking_id) {
            None => violations.push(format!(
                "booking {} was exported but never acknowledged",
                booking.booking_id
            )),
            Some(ack) if ack.cancelled == is_confirmed => violations.push(format!(
                "booking {} is exported {} but its last acknowledged state was {}",
                booking.booking_id,
                if is_confirmed {
                    "confirmed"
                } else {
                    "cancelled"
                },
                if ack.cancelled {
                    "cancelled"
                } else {
                    "confirmed"
                }
            )),
            Some(_) => {}
        }
        exported.insert(booking.booking_id);
    }
    let lost = acknowledged
        .keys()
        .filter(|id| !exported.contains(*id))
        .count();
    if lost > 0 {
        violations.push(format!(
            "{lost} acknowledged bookings are missing from ExportBookings"
        ));
    }
    let mut citizens = HashSet::new();
    for ack in acknowledged.values().filter(|ack| !ack.cancelled) {
        if !citizens.insert(ack.citizen) {
            violations.push(format!(
                "citizen {} holds more than one confirmed booking",
                ack.citizen
            ));
        }
    }
    if let Some(expected) = expected_confirmed {
        if confirmed != expected {
            violations.push(format!(
                "{confirmed} confirmed bookings, expected {expected}"
            ));
        }
    }
    let mut stats_booked = 0;
    for site_id in &scenario.site_ids {
        let stats = capacity
            .get_site_stats(proto::GetSiteStatsRequest {
                site_id: site_id.clone(),
            })
            .await
            .map_err(|e| format!("GetSiteStats: {e}"))?
            .into_inner();
        stats_booked += stats.booked;
        for slot in slots_of(channel.clone(), site_id).await? {
            let booked = per_slot.get(&slot.slot_id).copied().unwrap_or(0);
            if booked > u64::from(slot.capacity) {
                violations.push(format!(
                    "slot {} holds {booked} bookings for {} places",
                    slot.slot_id, slot.capacity
                ));
            }
            if u64::from(slot.capacity - slot.remaining) != booked {
                violations.push(format!(
                    "slot {} reports {} taken but {booked} confirmed bookings are exported",
                    slot.slot_id,
                    slot.capacity - slot.remaining
                ));
            }
        }
    }
    if stats_booked != confirmed {
        violations.push(format!(
            "GetSiteStats counts {stats_booked} booked, ExportBookings {confirmed} confirmed"
        ));
    }
    Ok(violations)
}

pub fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}
