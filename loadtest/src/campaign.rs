//! `campaign`: a vaccination campaign's waitlist. `--registrations` citizens pre-register
//! (birth years spread so the three waves hold 10%, 20% and 70% of them) for `--places`
//! places; then each wave opens in turn (the spawned server's clock jumps to it). The
//! citizens of open waves read their registration in rounds; an offered citizen
//! declines (`--decline-percent`), lets the offer expire (`--expire-percent`: the clock
//! then jumps past the offer's time, which may open the next wave early: its citizens
//! are read from then on) or accepts. Reports the registrations per second,
//! the matcher's offers per second when a wave opens, the time a freed place waits for
//! its next offer (p50/p99, from the server's histogram), and verifies every place
//! booked, no slot over capacity, at most one booking per citizen, the stats equal to
//! the export.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::{self, RegistrationState};
use prenota::service::Clock;
use serde_json::json;
use tonic::transport::Channel;

use crate::report::Tally;
use crate::scenario::{self, Ack, Acknowledged, Scenario, Shape, SERVICE_ID};

pub struct Campaign {
    pub registrations: u64,
    pub places: u64,
    pub sites: u32,
    pub days: u32,
    pub decline_percent: u64,
    pub expire_percent: u64,
}

const CAMPAIGN_ID: &str = "loadtest-campaign";
/// Waves open an hour apart (server time, skipped).
const WAVE_GAP_MS: i64 = 3_600_000;
/// An offer's time (server time, skipped when citizens let offers expire).
const OFFER_TTL_SECONDS: u32 = 600;
/// Reading rounds per wave before the harness gives up.
const ROUNDS_MAX: usize = 40;

/// Citizen `n`'s birth year: the first 10% born by 1940 (wave 1), the next 20% by
/// 1960 (wave 2), the rest later (wave 3).
fn birth_year(n: u64) -> i32 {
    match n % 10 {
        0 => 1930,
        1 | 2 => 1955,
        _ => 1980,
    }
}

/// The wave (0-based) of citizen `n`.
fn wave_of(n: u64) -> usize {
    match n % 10 {
        0 => 0,
        1 | 2 => 1,
        _ => 2,
    }
}

/// What citizen `n` does with its offer number `declines`: a hash spreads the choices.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Accept,
    Decline,
    Ignore,
}

fn answer(n: u64, declines: u32, args: &Campaign) -> Answer {
    let roll = (n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ u64::from(declines).wrapping_mul(0xbf58_476d_1ce4_e5b9))
    .rotate_left(17)
        % 100;
    match roll {
        r if r < args.decline_percent => Answer::Decline,
        r if r < args.decline_percent + args.expire_percent => Answer::Ignore,
        _ => Answer::Accept,
    }
}

pub async fn run(
    channels: &[Channel],
    in_flight: usize,
    args: &Campaign,
    (clock, metrics): (Clock, impl Fn() -> Option<String>),
    progress: &ProgressBar,
) -> Result<(bool, serde_json::Value), String> {
    let shape = Shape::new(
        args.registrations,
        args.sites,
        args.days,
        args.places,
        "campaign",
    );
    let scenario = scenario::publish(channels[0].clone(), &shape).await?;
    let places = scenario.total_capacity;
    let first_wave_at = clock.now_unix_ms() + WAVE_GAP_MS;
    upsert_campaign(channels[0].clone(), &scenario, first_wave_at).await?;
    println!(
        "campaign: {} registrations over 3 waves for {places} places at {} sites",
        args.registrations,
        scenario.site_ids.len()
    );
    let registering =
        register_all(channels, in_flight, &scenario, args.registrations, progress).await;
    let registrations_per_s =
        registering.tally.count("PreRegister OK") as f64 / registering.elapsed.as_secs_f64();

    let acknowledged = Acknowledged::default();
    let mut tally = Tally::new();
    let mut fills = Vec::new();
    let mut resolved: HashSet<u64> = HashSet::new();
    let mut unfinished = Vec::new();
    for wave in 0..3 {
        let opens_at = first_wave_at + wave as i64 * WAVE_GAP_MS;
        clock.advance(Duration::from_millis(
            (opens_at - clock.now_unix_ms()).max(0) as u64 + 1,
        ));
        fills.push(wait_for_fill(channels[0].clone()).await?);
        let rounds = answer_offers(
            channels,
            (&scenario, args, places),
            (&clock, first_wave_at),
            (&acknowledged, &mut resolved),
            &mut tally,
        )
        .await?;
        println!("wave {}: {rounds} reading rounds", wave + 1);
        if rounds >= ROUNDS_MAX {
            unfinished.push(format!(
                "wave {} still had offers to answer after {ROUNDS_MAX} rounds",
                wave + 1
            ));
        }
    }
    progress.finish_and_clear();
    registering.print();

    let stats = stats(channels[0].clone()).await?;
    let counts = stats.counts.unwrap_or_default();
    let refill = metrics()
        .map(|text| refill_quantiles(&text))
        .unwrap_or_default();
    let first_fill = fills.first().copied().unwrap_or_default();
    println!(
        "\ncampaign: {} registrations at {registrations_per_s:.0}/s; wave 1 opened with {} \
         offers in {:.2} s ({:.0} offers/s); a freed place waited for its next offer p50 \
         {:.0} ms, p99 {:.0} ms; {} booked, {} exhausted, {} waiting",
        args.registrations,
        first_fill.0,
        first_fill.1.as_secs_f64(),
        first_fill.0 as f64 / first_fill.1.as_secs_f64().max(1e-9),
        refill.0 * 1e3,
        refill.1 * 1e3,
        counts.booked,
        counts.exhausted,
        counts.waiting,
    );
    let acknowledged = acknowledged.lock().await;
    let mut violations =
        scenario::verify(channels[0].clone(), &scenario, &acknowledged, Some(places)).await?;
    violations.extend(unfinished);
    if counts.booked != acknowledged.len() as u64 {
        violations.push(format!(
            "GetCampaignStats counts {} booked, the harness was acknowledged {}",
            counts.booked,
            acknowledged.len()
        ));
    }
    if violations.is_empty() {
        println!(
            "invariants: OK (every place booked through an offer; no slot over capacity; at \
             most one booking per citizen; stats equal the export)"
        );
    } else {
        println!("invariants: {} VIOLATIONS", violations.len());
        for violation in violations.iter().take(20) {
            println!("  {violation}");
        }
    }
    let report = json!({
        "scenario": "campaign",
        "registrations": args.registrations,
        "places": places,
        "in_flight": in_flight,
        "register": registering.to_json(),
        "registrations_per_s": registrations_per_s,
        "wave_fills": fills.iter().map(|(offers, took)| json!({"offers": offers, "seconds": took.as_secs_f64()})).collect::<Vec<_>>(),
        "refill_p50_s": refill.0,
        "refill_p99_s": refill.1,
        "booked": counts.booked,
        "exhausted": counts.exhausted,
        "reads": tally.requests(),
        "violations": violations,
    });
    Ok((violations.is_empty(), report))
}

async fn upsert_campaign(
    channel: Channel,
    scenario: &Scenario,
    first_wave_at: i64,
) -> Result<(), String> {
    let wave = |index: i64, id: &str, birth_year_max: i32| proto::Wave {
        wave_id: id.into(),
        opens_at: scenario::at_ms(first_wave_at + index * WAVE_GAP_MS),
        birth_year_max,
        ..Default::default()
    };
    CapacityServiceClient::new(channel)
        .upsert_campaign(proto::UpsertCampaignRequest {
            campaign: Some(proto::Campaign {
                campaign_id: CAMPAIGN_ID.into(),
                service_id: SERVICE_ID.into(),
                region_id: scenario.region_id.clone(),
                offer_ttl_seconds: OFFER_TTL_SECONDS,
                offers_declined_max: 3,
                last_minute_hours: 24,
                waves: vec![
                    wave(0, "born-by-1940", 1940),
                    wave(1, "born-by-1960", 1960),
                    wave(2, "everyone", 0),
                ],
                created_at: None,
                ends_at: None,
            }),
            request_id: String::new(),
        })
        .await
        .map_err(|e| format!("UpsertCampaign: {e}"))?;
    Ok(())
}

async fn stats(channel: Channel) -> Result<proto::GetCampaignStatsResponse, String> {
    Ok(CapacityServiceClient::new(channel)
        .get_campaign_stats(proto::GetCampaignStatsRequest {
            campaign_id: CAMPAIGN_ID.into(),
        })
        .await
        .map_err(|e| format!("GetCampaignStats: {e}"))?
        .into_inner())
}

async fn register_all(
    channels: &[Channel],
    in_flight: usize,
    scenario: &Scenario,
    registrations: u64,
    progress: &ProgressBar,
) -> crate::report::Phase {
    let region = Arc::new(scenario.region_id.clone());
    scenario::run_workers(
        "register",
        channels,
        in_flight,
        registrations,
        progress,
        move |channel, citizen, mut tally| {
            let region = Arc::clone(&region);
            async move {
                let request = proto::PreRegisterRequest {
                    campaign_id: CAMPAIGN_ID.into(),
                    citizen_id: scenario::citizen_id(&region, citizen),
                    birth_year: birth_year(citizen),
                    request_id: format!("register-{citizen}"),
                    ..Default::default()
                };
                let _ = scenario::admitted(&mut tally, "PreRegister", || {
                    let mut client = BookingServiceClient::new(channel.clone());
                    let request = request.clone();
                    async move { client.pre_register(request).await }
                })
                .await;
                tally
            }
        },
    )
    .await
}

/// After a wave opens: how many offers the matcher made and how long it took, polled
/// every 10 ms until the count stops growing for 500 ms.
async fn wait_for_fill(channel: Channel) -> Result<(u64, Duration), String> {
    let started = Instant::now();
    let mut last = (0, Duration::ZERO);
    let mut still_since = Instant::now();
    while still_since.elapsed() < Duration::from_millis(500) {
        let offered = stats(channel.clone())
            .await?
            .counts
            .unwrap_or_default()
            .offered;
        if offered != last.0 {
            last = (offered, started.elapsed());
            still_since = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(last)
}

/// Rounds of reading the open waves' registrations: the offered answer. Ends when no
/// offer is left to answer (after letting ignored ones expire). Returns the rounds.
async fn answer_offers(
    channels: &[Channel],
    (scenario, args, places): (&Scenario, &Campaign, u64),
    (clock, first_wave_at): (&Clock, i64),
    (acknowledged, resolved): (&Acknowledged, &mut HashSet<u64>),
    tally: &mut Tally,
) -> Result<usize, String> {
    for round in 1..=ROUNDS_MAX {
        let mut seen_offers = 0;
        let mut ignored = 0;
        // The citizens of every wave open by now (a jump may have opened the next).
        let opened = (clock.now_unix_ms() - first_wave_at).div_euclid(WAVE_GAP_MS);
        let open: Vec<u64> = (0..args.registrations)
            .filter(|n| (wave_of(*n) as i64) <= opened && !resolved.contains(n))
            .collect();
        for chunk in open.chunks(256) {
            let reads = chunk.iter().enumerate().map(|(i, &citizen)| {
                let channel = channels[i % channels.len()].clone();
                let region = scenario.region_id.clone();
                async move {
                    let mut tally = Tally::new();
                    let outcome =
                        read_and_answer(channel, &region, citizen, args, &mut tally).await;
                    (citizen, outcome, tally)
                }
            });
            for (citizen, outcome, one) in futures::future::join_all(reads).await {
                tally.merge(one);
                match outcome {
                    Outcome::Booked(booking_id) => {
                        seen_offers += 1;
                        let ack = Ack {
                            citizen,
                            cancelled: false,
                        };
                        acknowledged.lock().await.insert(booking_id, ack);
                        resolved.insert(citizen);
                    }
                    Outcome::Declined => seen_offers += 1,
                    Outcome::Ignored => {
                        seen_offers += 1;
                        ignored += 1;
                    }
                    Outcome::Done => {
                        resolved.insert(citizen);
                    }
                    Outcome::Waiting => {}
                }
            }
        }
        if seen_offers == 0 && ignored == 0 {
            let counts = stats(channels[0].clone()).await?.counts.unwrap_or_default();
            if counts.offered == 0 && (counts.booked >= places || counts.waiting == 0) {
                return Ok(round);
            }
        }
        if ignored > 0 {
            // The ignored offers run out; the sweeper returns their places.
            clock.advance(Duration::from_secs(u64::from(OFFER_TTL_SECONDS) + 1));
        }
        // Let the matcher (every 200 ms) and the sweeper (every 250 ms) run.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    Ok(ROUNDS_MAX)
}

enum Outcome {
    Booked(String),
    Declined,
    Ignored,
    /// Exhausted (or withdrawn): nothing more will happen to it.
    Done,
    Waiting,
}

async fn read_and_answer(
    channel: Channel,
    region: &str,
    citizen: u64,
    args: &Campaign,
    tally: &mut Tally,
) -> Outcome {
    let client = BookingServiceClient::new(channel);
    let citizen_id = scenario::citizen_id(region, citizen);
    let request = proto::GetRegistrationRequest {
        campaign_id: CAMPAIGN_ID.into(),
        citizen_id: citizen_id.clone(),
    };
    let read = scenario::admitted(tally, "GetRegistration", || {
        let (mut client, request) = (client.clone(), request.clone());
        async move { client.get_registration(request).await }
    })
    .await;
    let Some(registration) = read.ok().and_then(|r| r.registration) else {
        return Outcome::Waiting;
    };
    match registration.state() {
        RegistrationState::Offered => {}
        RegistrationState::Exhausted | RegistrationState::Withdrawn => return Outcome::Done,
        RegistrationState::Booked => return Outcome::Booked(registration.booking_id),
        _ => return Outcome::Waiting,
    }
    let declines = registration.offers_declined;
    let step = format!("{citizen}-{declines}");
    match answer(citizen, declines, args) {
        Answer::Ignore => Outcome::Ignored,
        Answer::Decline => {
            let request = proto::DeclineOfferRequest {
                campaign_id: CAMPAIGN_ID.into(),
                citizen_id,
                request_id: format!("decline-{step}"),
                // Only this offer: a retry must not decline the next one.
                hold_id: registration
                    .offer
                    .as_ref()
                    .map(|offer| offer.hold_id.clone())
                    .unwrap_or_default(),
            };
            let _ = scenario::admitted(tally, "DeclineOffer", || {
                let (mut client, request) = (client.clone(), request.clone());
                async move { client.decline_offer(request).await }
            })
            .await;
            Outcome::Declined
        }
        Answer::Accept => {
            let request = proto::AcceptOfferRequest {
                campaign_id: CAMPAIGN_ID.into(),
                citizen_id,
                request_id: format!("accept-{step}"),
                // Only the offer read: never a later one at another slot.
                hold_id: registration
                    .offer
                    .as_ref()
                    .map(|offer| offer.hold_id.clone())
                    .unwrap_or_default(),
            };
            let accepted = scenario::admitted(tally, "AcceptOffer", || {
                let (mut client, request) = (client.clone(), request.clone());
                async move { client.accept_offer(request).await }
            })
            .await;
            match accepted.ok().and_then(|r| r.booking) {
                Some(booking) => Outcome::Booked(booking.booking_id),
                None => Outcome::Waiting,
            }
        }
    }
}

/// p50 and p99 (seconds: the upper bound of the bucket they fall in) of the server's
/// `prenota_campaign_refill_seconds` histogram.
fn refill_quantiles(metrics: &str) -> (f64, f64) {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("prenota_campaign_refill_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    let quantile = |q: f64| {
        buckets
            .iter()
            .find(|(_, count)| *count >= q * total)
            .map_or(0.0, |(le, _)| *le)
    };
    match total > 0.0 {
        true => (quantile(0.5), quantile(0.99)),
        false => (0.0, 0.0),
    }
}
