//! `release`: a queued opening. `--citizens` join the waiting room of a release of
//! `--places` places before it opens; then the spawned server's clock jumps to
//! `release_at` (and runs at real speed from there), every citizen reads its ticket once
//! (the refresh storm of an opening), the admitted book, the waiting keep reading until
//! admitted or sold out. Reports the joins per second, the time from the opening to
//! sold out and the fairness figure (the share of the places that went to the earliest
//! 10% of joiners: 10% in a fair draw); verifies every place booked, no slot over
//! capacity, at most one booking per citizen, and a sample of the rest told SOLD_OUT.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::{self, search_slots_request::Scope, QueueTicketState, ReleasePhase};
use prenota::service::Clock;
use serde_json::json;
use tonic::transport::Channel;

use crate::report::{Phase, Tally};
use crate::scenario::{self, Ack, Acknowledged, Scenario, Shape, SERVICE_ID};

pub struct Release {
    pub citizens: u64,
    pub places: u64,
    pub sites: u32,
    pub days: u32,
    /// 0: as fast as places allow.
    pub admissions_per_minute: u32,
}

const RELEASE_ID: &str = "loadtest-opening";
/// How long the waiting room is open before the opening (server time, skipped).
const QUEUE_OPEN_MS: i64 = 3_600_000;
/// Re-reads of the waiting citizens before the harness gives up on them.
const WAITING_ROUNDS_MAX: usize = 600;
/// One citizen in this many of those never admitted is asked whether it is SOLD_OUT.
const SOLD_OUT_SAMPLE_EVERY: u64 = 50;

/// What happened to the citizens after the opening.
#[derive(Default)]
struct Outcome {
    /// Citizens still waiting after their first read: (citizen, position).
    waiting: Mutex<Vec<u64>>,
    booked: AtomicU64,
    booked_early: AtomicU64,
    sold_out: AtomicU64,
}

pub async fn run(
    channels: &[Channel],
    in_flight: usize,
    args: &Release,
    clock: Clock,
    progress: &ProgressBar,
) -> Result<(bool, serde_json::Value), String> {
    let shape = Shape::new(args.citizens, args.sites, args.days, args.places, "release");
    let scenario = scenario::publish(channels[0].clone(), &shape).await?;
    let places = scenario.total_capacity;
    let release_at = clock.now_unix_ms() + QUEUE_OPEN_MS;
    create_release(channels[0].clone(), &scenario, release_at, args).await?;
    println!(
        "release: {} citizens join a queued release of {places} places at {} sites",
        args.citizens,
        scenario.site_ids.len()
    );

    let joins = join_all(channels, in_flight, &scenario, args.citizens, progress).await;
    // The opening: the clock jumps to release_at, then follows real time.
    clock.advance(Duration::from_millis(
        (release_at - clock.now_unix_ms()).max(0) as u64 + 1,
    ));
    let opened = Instant::now();
    let ticking = tokio::spawn(follow_real_time(clock.clone()));
    let sold_out_after = tokio::spawn(time_to_sold_out(channels[0].clone(), opened));

    let outcome = Arc::new(Outcome::default());
    let acknowledged = Acknowledged::default();
    let early = args.citizens.div_ceil(10);
    let storm = opening_storm(
        channels,
        in_flight,
        &scenario,
        args.citizens,
        (Arc::clone(&outcome), Arc::clone(&acknowledged), early),
        progress,
    )
    .await;
    let mut tally = Tally::new();
    let rounds = read_until_resolved(
        channels,
        &scenario,
        (&outcome, &acknowledged, early),
        &mut tally,
    )
    .await;
    let sold_out_after = sold_out_after.await.map_err(|e| e.to_string())??;
    let not_told =
        sample_sold_out(channels[0].clone(), &scenario, &acknowledged, args.citizens).await?;
    ticking.abort();
    progress.finish_and_clear();

    joins.print();
    storm.print();
    let booked = outcome.booked.load(Ordering::Relaxed);
    let booked_early = outcome.booked_early.load(Ordering::Relaxed);
    let early_share = booked_early as f64 / booked.max(1) as f64;
    let joins_per_s = joins.tally.count("JoinQueue OK") as f64 / joins.elapsed.as_secs_f64();
    println!(
        "\nrelease: {} joins at {joins_per_s:.0}/s; opening to sold out {:.2} s; {booked} places \
         booked; the earliest 10% of joiners got {:.1}% of them (fair: 10% ± 3%); {rounds} \
         re-read rounds of the waiting",
        args.citizens,
        sold_out_after.as_secs_f64(),
        100.0 * early_share
    );
    let acknowledged = acknowledged.lock().await;
    let mut violations =
        scenario::verify(channels[0].clone(), &scenario, &acknowledged, Some(places)).await?;
    if !(0.07..=0.13).contains(&early_share) {
        violations.push(format!(
            "the earliest 10% of joiners got {:.1}% of the places, not 10% ± 3%",
            100.0 * early_share
        ));
    }
    if not_told > 0 {
        violations.push(format!(
            "{not_told} sampled citizens without a booking were not told SOLD_OUT"
        ));
    }
    if violations.is_empty() {
        println!(
            "invariants: OK (every place booked, by admitted citizens only; no slot over \
             capacity; at most one booking per citizen; sampled waiting tickets SOLD_OUT)"
        );
    } else {
        println!("invariants: {} VIOLATIONS", violations.len());
        for violation in violations.iter().take(20) {
            println!("  {violation}");
        }
    }
    let report = json!({
        "scenario": "release",
        "citizens": args.citizens,
        "places": places,
        "in_flight": in_flight,
        "join": joins.to_json(),
        "joins_per_s": joins_per_s,
        "opening": storm.to_json(),
        "opening_to_sold_out_s": sold_out_after.as_secs_f64(),
        "booked": booked,
        "earliest_tenth_share": early_share,
        "violations": violations,
    });
    Ok((violations.is_empty(), report))
}

async fn create_release(
    channel: Channel,
    scenario: &Scenario,
    release_at: i64,
    args: &Release,
) -> Result<(), String> {
    let now = release_at - QUEUE_OPEN_MS;
    CapacityServiceClient::new(channel)
        .create_release(proto::CreateReleaseRequest {
            release: Some(proto::Release {
                release_id: RELEASE_ID.into(),
                region_id: scenario.region_id.clone(),
                service_id: SERVICE_ID.into(),
                from: scenario::at_ms(now),
                to: scenario::at_ms(now + 400 * 86_400_000),
                release_at: scenario::at_ms(release_at),
                queue_opens_at: scenario::at_ms(now),
                admissions_per_minute: args.admissions_per_minute,
                admission_ttl_seconds: 600,
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .map_err(|e| format!("CreateRelease: {e}"))?;
    Ok(())
}

/// Moves the manual clock along with real time (after the opening's jump).
async fn follow_real_time(clock: Clock) {
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = Instant::now();
        clock.advance(now - last);
        last = now;
    }
}

/// How long after `opened` the release reads SOLD_OUT (polled every 20 ms; 10 min at most).
async fn time_to_sold_out(channel: Channel, opened: Instant) -> Result<Duration, String> {
    let mut capacity = CapacityServiceClient::new(channel);
    while opened.elapsed() < Duration::from_secs(600) {
        let release = capacity
            .get_release(proto::GetReleaseRequest {
                release_id: RELEASE_ID.into(),
            })
            .await
            .map_err(|e| format!("GetRelease: {e}"))?
            .into_inner()
            .release
            .ok_or("GetRelease without a release")?;
        if release.phase() == ReleasePhase::SoldOut {
            return Ok(opened.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err("the release was not sold out 10 minutes after its opening".into())
}

async fn join_all(
    channels: &[Channel],
    in_flight: usize,
    scenario: &Scenario,
    citizens: u64,
    progress: &ProgressBar,
) -> Phase {
    let region = Arc::new(scenario.region_id.clone());
    scenario::run_workers(
        "join",
        channels,
        in_flight,
        citizens,
        progress,
        move |channel, citizen, mut tally| {
            let region = Arc::clone(&region);
            async move {
                let request = proto::JoinQueueRequest {
                    release_id: RELEASE_ID.into(),
                    citizen_id: scenario::citizen_id(&region, citizen),
                    request_id: format!("join-{citizen}"),
                };
                let _ = scenario::admitted(&mut tally, "JoinQueue", || {
                    let mut client = BookingServiceClient::new(channel.clone());
                    let request = request.clone();
                    async move { client.join_queue(request).await }
                })
                .await;
                tally
            }
        },
    )
    .await
}

/// The citizen's ticket state (shed answers retried), or `None` on an error.
async fn read_ticket(
    channel: Channel,
    region: &str,
    citizen: u64,
    tally: &mut Tally,
) -> Option<QueueTicketState> {
    let request = proto::GetQueueTicketRequest {
        release_id: RELEASE_ID.into(),
        citizen_id: scenario::citizen_id(region, citizen),
    };
    let ticket = scenario::admitted(tally, "GetQueueTicket", || {
        let mut client = BookingServiceClient::new(channel.clone());
        let request = request.clone();
        async move { client.get_queue_ticket(request).await }
    })
    .await
    .ok()?
    .ticket?;
    Some(ticket.state())
}

/// An admitted citizen searches the region's free slots and books one.
async fn book_admitted(
    channel: Channel,
    scenario_region: &str,
    citizen: u64,
    tally: &mut Tally,
) -> Option<proto::Booking> {
    let mut client = BookingServiceClient::new(channel);
    let citizen_id = scenario::citizen_id(scenario_region, citizen);
    for round in 0..20 {
        let search = proto::SearchSlotsRequest {
            scope: Some(Scope::RegionId(scenario_region.to_string())),
            service_id: SERVICE_ID.into(),
            only_available: true,
            page_size: 20,
            to: scenario::at_ms(chrono::Utc::now().timestamp_millis() + 300 * 86_400_000),
            ..Default::default()
        };
        let slots = scenario::admitted(tally, "SearchSlots", || {
            let (mut client, search) = (client.clone(), search.clone());
            async move { client.search_slots(search).await }
        })
        .await
        .ok()?
        .slots;
        let attempt = round.to_string();
        let first = citizen as usize;
        if let Some(booking) = scenario::book_one(
            &mut client,
            &slots,
            first,
            (&citizen_id, &attempt),
            scenario::Via::Book,
            tally,
        )
        .await
        {
            return Some(booking);
        }
    }
    None
}

/// Records an admitted citizen's booking.
async fn booked(
    (outcome, acknowledged, early): (&Outcome, &Acknowledged, u64),
    citizen: u64,
    booking: proto::Booking,
) {
    outcome.booked.fetch_add(1, Ordering::Relaxed);
    if citizen < early {
        outcome.booked_early.fetch_add(1, Ordering::Relaxed);
    }
    let ack = Ack {
        citizen,
        cancelled: false,
    };
    acknowledged.lock().await.insert(booking.booking_id, ack);
}

/// Every citizen reads its ticket once; the admitted book; the waiting are noted.
async fn opening_storm(
    channels: &[Channel],
    in_flight: usize,
    scenario: &Scenario,
    citizens: u64,
    (outcome, acknowledged, early): (Arc<Outcome>, Acknowledged, u64),
    progress: &ProgressBar,
) -> Phase {
    let region = Arc::new(scenario.region_id.clone());
    scenario::run_workers(
        "opening",
        channels,
        in_flight,
        citizens,
        progress,
        move |channel, citizen, mut tally| {
            let (region, outcome) = (Arc::clone(&region), Arc::clone(&outcome));
            let acknowledged = Arc::clone(&acknowledged);
            async move {
                match read_ticket(channel.clone(), &region, citizen, &mut tally).await {
                    Some(QueueTicketState::Admitted) => {
                        if let Some(booking) =
                            book_admitted(channel, &region, citizen, &mut tally).await
                        {
                            booked((&outcome, &acknowledged, early), citizen, booking).await;
                        }
                    }
                    Some(QueueTicketState::Waiting) => {
                        outcome
                            .waiting
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(citizen);
                    }
                    Some(QueueTicketState::SoldOut) => {
                        outcome.sold_out.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                tally
            }
        },
    )
    .await
}

/// The citizens still waiting read their tickets again every 200 ms (64 at a time)
/// until each is admitted (and books) or sold out. Returns the rounds it took.
async fn read_until_resolved(
    channels: &[Channel],
    scenario: &Scenario,
    (outcome, acknowledged, early): (&Arc<Outcome>, &Acknowledged, u64),
    tally: &mut Tally,
) -> usize {
    let mut waiting =
        std::mem::take(&mut *outcome.waiting.lock().unwrap_or_else(|p| p.into_inner()));
    let mut rounds = 0;
    while !waiting.is_empty() && rounds < WAITING_ROUNDS_MAX {
        rounds += 1;
        let mut still = Vec::new();
        for chunk in waiting.chunks(64) {
            let reads = chunk.iter().enumerate().map(|(i, &citizen)| {
                let channel = channels[i % channels.len()].clone();
                let region = scenario.region_id.clone();
                async move {
                    let mut tally = Tally::new();
                    let state = read_ticket(channel.clone(), &region, citizen, &mut tally).await;
                    let booking = match state {
                        Some(QueueTicketState::Admitted) => {
                            book_admitted(channel, &region, citizen, &mut tally).await
                        }
                        _ => None,
                    };
                    (citizen, state, booking, tally)
                }
            });
            for (citizen, state, booking, one) in futures::future::join_all(reads).await {
                tally.merge(one);
                match (state, booking) {
                    (_, Some(booking)) => {
                        booked((outcome, acknowledged, early), citizen, booking).await
                    }
                    (Some(QueueTicketState::Waiting), None) => still.push(citizen),
                    _ => {}
                }
            }
        }
        waiting = still;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    rounds
}

/// Asks one in `SOLD_OUT_SAMPLE_EVERY` citizens without a booking for its ticket: each
/// must be SOLD_OUT. Returns how many were not.
async fn sample_sold_out(
    channel: Channel,
    scenario: &Scenario,
    acknowledged: &Acknowledged,
    citizens: u64,
) -> Result<u64, String> {
    let with_booking: std::collections::HashSet<u64> = acknowledged
        .lock()
        .await
        .values()
        .map(|ack| ack.citizen)
        .collect();
    let mut tally = Tally::new();
    let mut not_told = 0;
    for citizen in (0..citizens).step_by(SOLD_OUT_SAMPLE_EVERY as usize) {
        if with_booking.contains(&citizen) {
            continue;
        }
        let state = read_ticket(channel.clone(), &scenario.region_id, citizen, &mut tally).await;
        if state != Some(QueueTicketState::SoldOut) {
            not_told += 1;
        }
    }
    Ok(not_told)
}
