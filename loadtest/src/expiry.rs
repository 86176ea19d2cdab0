//! `expiry`: many holds run out at the same moment (a bot fleet's, or a waiting room's
//! admitted citizens who never book), on the spawned server's manual clock and its
//! production sweeper settings. Measures how fast the sweeper gives their places back
//! and what that costs the citizens booking meanwhile: Book latency and server CPU
//! before the holds expire, while the sweeper works through them, and after.
//!
//! Checked at the end: no live hold is left, and every slot's remaining places are its
//! capacity less its bookings (the places of the expired holds all came back).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prenota::config::Config;
use prenota::proto;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::service::{Clock, Engine};
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::report::{server_cpu, Phase, Tally};
use crate::scenario::run_workers;
use crate::target::Target;

/// What the fleet holds, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct Expiry {
    pub holds: u64,
    pub ttl_seconds: u32,
}

/// Real seconds of bookings measured before the holds expire, and again after.
const CALM_SECONDS: u64 = 3;

/// Longest the sweeper may take to give every place back before the run fails.
const SWEEP_DEADLINE: Duration = Duration::from_secs(120);

/// The stages bookings are counted in.
const STAGES: [&str; 3] = ["before expiry", "while sweeping", "after the sweep"];

/// The server config: production defaults (sweeper included), and the sweeper's batch
/// and period if given (a period under the server's minimum, 10 ms, is raised to it).
pub fn config((batch, period_ms): (Option<usize>, Option<u64>)) -> Config {
    let mut config = Config::default();
    if let Some(batch) = batch {
        config.limits.hold_sweep_batch_max = batch.max(1);
    }
    if let Some(period_ms) = period_ms {
        config.limits.hold_sweep_interval_ms = period_ms.max(10);
    }
    config
}

/// Runs the scenario against a server spawned with `clock` (manual) and [`config`].
pub async fn run(
    channels: &[Channel],
    in_flight: usize,
    target: Target,
    clock: Clock,
    expiry: Expiry,
) -> Result<(bool, Value), String> {
    let engine = target.engine().ok_or("the expiry scenario needs --spawn")?;
    let slots = crate::churn::publish(channels[0].clone(), &clock, "expiry").await?;
    let slots = Arc::new(slots);
    println!(
        "expiry: {} holds of {} s by made-up citizens over {} slots, then {in_flight} \
         citizens book while they expire at once",
        expiry.holds,
        expiry.ttl_seconds,
        slots.len()
    );
    let held = hold_all(channels, in_flight, &slots, expiry).await;
    held.print();
    let live = engine.live_hold_count();
    println!("live holds: {live}");
    let (phases, sweep, booked) =
        book_through_expiry(channels, in_flight, &slots, (&engine, &clock, expiry)).await;
    for phase in &phases {
        phase.print();
    }
    let sweep_s = sweep.map(|d| d.as_secs_f64());
    match sweep_s {
        Some(s) => println!(
            "\nsweep: {live} holds expired in {s:.2} s after their time ran out = {:.0} expiries/s",
            live as f64 / s.max(1e-6)
        ),
        None => println!("\nsweep: NOT DONE within {} s", SWEEP_DEADLINE.as_secs()),
    }
    let checked = check_places(channels[0].clone(), &engine, &clock, (&slots, &booked)).await;
    println!(
        "invariants: {}",
        checked
            .as_ref()
            .map_or_else(|e| e.clone(), |()| "OK".into())
    );
    let ok = sweep_s.is_some() && checked.is_ok() && live as u64 == expiry.holds;
    if live as u64 != expiry.holds {
        println!("NOT EVERY HOLD WAS MADE: {live} of {}", expiry.holds);
    }
    let report = json!({
        "scenario": "expiry",
        "holds": expiry.holds,
        "ttl_seconds": expiry.ttl_seconds,
        "held": held.to_json(),
        "sweep_seconds": sweep_s,
        "stages": STAGES.iter().zip(&phases).map(|(name, p)| (name.to_string(), p.to_json())).collect::<serde_json::Map<_, _>>(),
        "invariants_ok": checked.is_ok(),
    });
    target.stop();
    Ok((ok, report))
}

/// Citizens book (each of `in_flight` one after another) before the holds expire, while
/// the sweeper gives their places back and after; returns the three stages' phases, how
/// long the sweep took, and how many bookings were acknowledged in each slot.
async fn book_through_expiry(
    channels: &[Channel],
    in_flight: usize,
    slots: &Arc<Vec<String>>,
    (engine, clock, expiry): (&Engine, &Clock, Expiry),
) -> (Vec<Phase>, Option<Duration>, Vec<u64>) {
    let (stage, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let booked: Arc<Vec<AtomicU64>> = Arc::new(slots.iter().map(|_| AtomicU64::new(0)).collect());
    let bookers: Vec<_> = (0..in_flight.max(1))
        .map(|worker| {
            let channel = channels[worker % channels.len()].clone();
            let shared = (Arc::clone(slots), Arc::clone(&stage), Arc::clone(&stop));
            tokio::spawn(booker(channel, worker, shared, Arc::clone(&booked)))
        })
        .collect();
    let stages = drive(engine, clock, expiry, &stage).await;
    stop.store(true, Ordering::Relaxed);
    let mut tallies: Vec<Tally> = STAGES.iter().map(|_| Tally::new()).collect();
    for booker in bookers {
        if let Ok(seen) = booker.await {
            for (mine, theirs) in tallies.iter_mut().zip(seen) {
                mine.merge(theirs);
            }
        }
    }
    let phases = STAGES
        .iter()
        .zip(tallies)
        .zip(&stages.times)
        .map(|((name, tally), (elapsed, cpu))| Phase {
            name,
            elapsed: *elapsed,
            tally,
            server_cpu: *cpu,
        })
        .collect();
    let booked = booked.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    (phases, stages.sweep, booked)
}

/// `expiry.holds` holds, one per made-up citizen, spread over the slots.
async fn hold_all(
    channels: &[Channel],
    in_flight: usize,
    slots: &Arc<Vec<String>>,
    expiry: Expiry,
) -> Phase {
    let progress = crate::scenario::progress_bar();
    let slots = Arc::clone(slots);
    let hold = move |channel: Channel, n: u64, mut tally: Tally| {
        let request = proto::HoldSlotRequest {
            slot_id: slots[n as usize % slots.len()].clone(),
            citizen_id: format!("fleet-{n}"),
            request_id: format!("fleet-hold-{n}"),
            ttl_seconds: expiry.ttl_seconds,
        };
        async move {
            let started = Instant::now();
            let result = BookingServiceClient::new(channel).hold_slot(request).await;
            tally.record("HoldSlot", started.elapsed(), &result);
            tally
        }
    };
    let phase = run_workers(
        "holding",
        channels,
        in_flight,
        expiry.holds,
        &progress,
        hold,
    )
    .await;
    progress.finish_and_clear();
    phase
}

/// One citizen after another books a place, each request counted in the stage it
/// started in, until `stop`.
async fn booker(
    channel: Channel,
    worker: usize,
    (slots, stage, stop): (Arc<Vec<String>>, Arc<AtomicUsize>, Arc<AtomicBool>),
    booked: Arc<Vec<AtomicU64>>,
) -> Vec<Tally> {
    let mut client = BookingServiceClient::new(channel);
    let mut tallies: Vec<Tally> = STAGES.iter().map(|_| Tally::new()).collect();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let now = stage.load(Ordering::Relaxed);
        let slot = (worker * 7 + n) % slots.len();
        let request = proto::BookRequest {
            slot_id: slots[slot].clone(),
            citizen_id: format!("citizen-{worker}-{n}"),
            request_id: format!("book-{worker}-{n}"),
            hold_id: None,
        };
        let started = Instant::now();
        let result = client.book(request).await;
        tallies[now].record("Book", started.elapsed(), &result);
        if result.is_ok() {
            booked[slot].fetch_add(1, Ordering::Relaxed);
        }
        n += 1;
    }
    tallies
}

/// What [`drive`] measured: each stage's length and server CPU, and how long the sweep
/// took after the holds' time ran out (`None`: not within [`SWEEP_DEADLINE`]).
struct Stages {
    times: Vec<(Duration, Option<Duration>)>,
    sweep: Option<Duration>,
}

/// Bookings for [`CALM_SECONDS`]; then the clock moves past the holds' time and the
/// sweeper works while bookings go on; then [`CALM_SECONDS`] more after the last hold.
async fn drive(engine: &Engine, clock: &Clock, expiry: Expiry, stage: &AtomicUsize) -> Stages {
    let mut times = Vec::new();
    let mut mark = (Instant::now(), server_cpu());
    let mut next_stage = |times: &mut Vec<_>, next: usize| {
        let (now, cpu) = (Instant::now(), server_cpu());
        let spent = cpu.zip(mark.1).map(|(to, from)| to.saturating_sub(from));
        times.push((now - mark.0, spent));
        mark = (now, cpu);
        stage.store(next, Ordering::Relaxed);
    };
    tokio::time::sleep(Duration::from_secs(CALM_SECONDS)).await;
    next_stage(&mut times, 1);
    clock.advance(Duration::from_secs(u64::from(expiry.ttl_seconds) + 1));
    let expired_at = Instant::now();
    let mut printed = Instant::now();
    let mut sweep = None;
    while expired_at.elapsed() < SWEEP_DEADLINE {
        let live = engine.live_hold_count();
        if live == 0 {
            sweep = Some(expired_at.elapsed());
            break;
        }
        if printed.elapsed() >= Duration::from_secs(1) {
            println!(
                "  {:>5.1} s: {live} live holds",
                expired_at.elapsed().as_secs_f64()
            );
            printed = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    next_stage(&mut times, 2);
    tokio::time::sleep(Duration::from_secs(CALM_SECONDS)).await;
    next_stage(&mut times, 2);
    Stages { times, sweep }
}

/// No live hold is left, and each slot's remaining places are its capacity less the
/// bookings acknowledged in it (`booked`, by index in `slots`): the expired holds'
/// places all came back, each to its own slot.
async fn check_places(
    channel: Channel,
    engine: &Engine,
    clock: &Clock,
    (slots, booked): (&[String], &[u64]),
) -> Result<(), String> {
    let live = engine.live_hold_count();
    if live != 0 {
        return Err(format!("VIOLATED: {live} holds still live"));
    }
    let seen = crate::churn::site_slots(channel, clock, "expiry").await?;
    if seen.len() != slots.len() {
        return Err(format!(
            "{} slots found, {} published",
            seen.len(),
            slots.len()
        ));
    }
    for slot in &seen {
        let index = slots.iter().position(|id| *id == slot.slot_id);
        let booked = index.map_or(0, |i| booked[i]);
        let taken = slot.capacity.checked_sub(slot.remaining);
        if taken.map(u64::from) != Some(booked) {
            return Err(format!(
                "VIOLATED: slot {} has {} of {} places left, {booked} bookings acknowledged",
                slot.slot_id, slot.remaining, slot.capacity
            ));
        }
    }
    Ok(())
}
