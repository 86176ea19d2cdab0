//! `watchers`: the same rush twice in one run, on two sets of sites, the second with
//! `--watchers` availability watchers open on its sites (each watching `--watch-slots`
//! consecutive slots of one site, like a frontend showing an hour). Reports both rushes
//! as ratios of the no-op ceiling (what watchers cost), how soon a watcher saw each
//! booking's effect on `remaining` after it was acknowledged, and the messages and
//! bytes each watcher received.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use prenota::proto;
use prenota::proto::booking_service_client::BookingServiceClient;
use prost::Message;
use serde_json::json;
use tonic::transport::Channel;

use crate::scenario::{self, AckLog, Scenario, Shape, SERVICE_ID};

pub struct Watchers {
    pub citizens: u64,
    pub sites: u32,
    pub days: u32,
    pub demand_ratio: u32,
    pub watchers: usize,
    pub watch_slots: usize,
}

/// What one watcher received: each message's slot, remaining and arrival.
struct Seen {
    messages: Vec<(String, u32, Instant)>,
    bytes: usize,
}

/// Opens watcher `index` on `slots[first..first + count]` of its site; returns once its
/// snapshot arrived, with the task that records what follows until `stop`.
async fn open_watcher(
    channel: Channel,
    site_id: &str,
    window: &[proto::Slot],
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<Seen>, String> {
    let (from, last) = (window[0].start, window[window.len() - 1].start);
    let to = last.and_then(|t| scenario::at_s(t.seconds + 1));
    let mut stream = BookingServiceClient::new(channel)
        .watch_availability(proto::WatchAvailabilityRequest {
            scope: Some(proto::watch_availability_request::Scope::SiteId(
                site_id.into(),
            )),
            service_id: SERVICE_ID.into(),
            from,
            to,
        })
        .await
        .map_err(|e| format!("WatchAvailability: {e}"))?
        .into_inner();
    let mut seen = Seen {
        messages: Vec::new(),
        bytes: 0,
    };
    for _ in 0..window.len() {
        let message = stream
            .message()
            .await
            .map_err(|e| format!("watch snapshot: {e}"))?
            .ok_or("the watch ended during its snapshot")?;
        seen.bytes += message.encoded_len();
    }
    let mut stop = stop;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(message)) => {
                        seen.bytes += message.encoded_len();
                        if let Some(slot) = message.slot {
                            seen.messages.push((slot.slot_id, slot.remaining, Instant::now()));
                        }
                    }
                    _ => return seen,
                },
                _ = stop.wait_for(|stop| *stop) => return seen,
            }
        }
    }))
}

/// For every acknowledged booking and every watcher of its slot: how long after the
/// acknowledgement the watcher first saw `remaining` at or below what that booking
/// left (the k-th acknowledgement of a slot of capacity c leaves at most c - k).
/// Returns the latencies (µs) and how many were never seen.
fn update_latencies(
    log: &[(String, Instant)],
    capacity: &HashMap<String, u32>,
    seen: &[Seen],
) -> (hdrhistogram::Histogram<u64>, u64) {
    let mut acks: HashMap<&str, Vec<Instant>> = HashMap::new();
    for (slot, at) in log {
        acks.entry(slot.as_str()).or_default().push(*at);
    }
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let mut missed = 0;
    for watcher in seen {
        let mut by_slot: HashMap<&str, Vec<(u32, Instant)>> = HashMap::new();
        for (slot, remaining, at) in &watcher.messages {
            by_slot
                .entry(slot.as_str())
                .or_default()
                .push((*remaining, *at));
        }
        for (slot, messages) in by_slot {
            let (Some(acked), Some(capacity)) = (acks.get_mut(slot), capacity.get(slot)) else {
                continue;
            };
            acked.sort();
            for (k, ack) in acked.iter().enumerate() {
                let left = capacity.saturating_sub(k as u32 + 1);
                match messages.iter().find(|(remaining, _)| *remaining <= left) {
                    Some((_, at)) => {
                        let latency = at.saturating_duration_since(*ack).as_micros() as u64;
                        let _ = histogram.record(latency.max(1));
                    }
                    None => missed += 1,
                }
            }
        }
    }
    (histogram, missed)
}

/// Opens the watchers on `scenario`'s sites, spread over `channels`.
async fn open_all(
    channels: &[Channel],
    scenario: &Scenario,
    args: &Watchers,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<(Vec<tokio::task::JoinHandle<Seen>>, HashMap<String, u32>), String> {
    let mut sites = Vec::new();
    let mut capacity = HashMap::new();
    for site_id in &scenario.site_ids {
        let slots = scenario::slots_of(channels[0].clone(), site_id).await?;
        capacity.extend(slots.iter().map(|s| (s.slot_id.clone(), s.capacity)));
        sites.push((site_id.clone(), slots));
    }
    let mut tasks = Vec::new();
    for index in 0..args.watchers {
        let (site_id, slots) = &sites[index % sites.len()];
        let windows = (slots.len() / args.watch_slots.max(1)).max(1);
        let first = (index / sites.len()) % windows * args.watch_slots;
        let window = &slots[first..(first + args.watch_slots).min(slots.len())];
        let channel = channels[index % channels.len()].clone();
        tasks.push(open_watcher(channel, site_id, window, stop.clone()).await?);
    }
    Ok((tasks, capacity))
}

pub async fn run(
    channels: &[Channel],
    watch_channels: &[Channel],
    in_flight: usize,
    args: &Watchers,
    progress: &ProgressBar,
) -> Result<(bool, serde_json::Value), String> {
    let places = args.citizens / u64::from(args.demand_ratio.max(1));
    let plain = Shape::new(args.citizens, args.sites, args.days, places, "plain");
    let watched = Shape::new(args.citizens, args.sites, args.days, places, "watched");
    let plain_scenario = scenario::publish(channels[0].clone(), &plain).await?;
    let watched_scenario = scenario::publish(channels[0].clone(), &watched).await?;
    let ceiling =
        scenario::ceiling(channels, in_flight, args.citizens.min(200_000), progress).await;
    let acknowledged = scenario::Acknowledged::default();
    let unwatched = scenario::rush(
        channels,
        in_flight,
        &plain_scenario,
        &plain,
        (Arc::clone(&acknowledged), None),
        progress,
    )
    .await;

    let (stop, stopping) = tokio::sync::watch::channel(false);
    let opened = Instant::now();
    let (tasks, capacity) = open_all(watch_channels, &watched_scenario, args, &stopping).await?;
    println!(
        "{} watchers open ({} slots each) in {:.1} s",
        tasks.len(),
        args.watch_slots,
        opened.elapsed().as_secs_f64()
    );
    let log = AckLog::default();
    let acknowledged = scenario::Acknowledged::default();
    let with_watchers = scenario::rush(
        channels,
        in_flight,
        &watched_scenario,
        &watched,
        (Arc::clone(&acknowledged), Some(Arc::clone(&log))),
        progress,
    )
    .await;
    // The last changes go out within a coalescing window or two.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send_replace(true);
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(task.await.map_err(|e| e.to_string())?);
    }
    progress.finish_and_clear();

    let expected = Some(args.citizens.min(watched_scenario.total_capacity));
    let acknowledged = acknowledged.lock().await;
    let violations = scenario::verify(
        channels[0].clone(),
        &watched_scenario,
        &acknowledged,
        expected,
    )
    .await?;
    let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (latency, missed) = update_latencies(&log, &capacity, &seen);
    let ratio =
        |phase: &crate::report::Phase| phase.requests_per_s() / ceiling.requests_per_s().max(1e-6);
    let (plain_ratio, watched_ratio) = (ratio(&unwatched), ratio(&with_watchers));
    let messages: Vec<usize> = seen.iter().map(|s| s.messages.len()).collect();
    let bytes: Vec<usize> = seen.iter().map(|s| s.bytes).collect();
    let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1_000.0;
    ceiling.print();
    unwatched.print();
    with_watchers.print();
    println!(
        "\nrush without watchers: {:.0}% of the ceiling; with {} watchers: {:.0}% ({:+.1} points)",
        100.0 * plain_ratio,
        seen.len(),
        100.0 * watched_ratio,
        100.0 * (watched_ratio - plain_ratio)
    );
    println!(
        "update latency (booking acknowledged -> watcher sees it), ms: p50 {:.1}, p99 {:.1}, max {:.1}; {} updates measured, {missed} never seen",
        ms(0.5),
        ms(0.99),
        latency.max() as f64 / 1_000.0,
        latency.len()
    );
    println!(
        "per watcher: {:.0} messages, {:.0} bytes on average ({} bytes at most)",
        mean(&messages),
        mean(&bytes),
        bytes.iter().max().copied().unwrap_or(0)
    );
    match violations.is_empty() {
        true => println!("invariants of the watched rush: OK"),
        false => println!(
            "invariants of the watched rush: {} VIOLATIONS: {violations:?}",
            violations.len()
        ),
    }
    let report = json!({
        "scenario": "watchers",
        "citizens": args.citizens,
        "watchers": seen.len(),
        "watch_slots": args.watch_slots,
        "ceiling": ceiling.to_json(),
        "rush_without_watchers": unwatched.to_json(),
        "rush_with_watchers": with_watchers.to_json(),
        "ratio_without_watchers": plain_ratio,
        "ratio_with_watchers": watched_ratio,
        "update_latency_ms": {"p50": ms(0.5), "p99": ms(0.99), "max": latency.max() as f64 / 1_000.0},
        "updates_measured": latency.len(),
        "updates_never_seen": missed,
        "messages_per_watcher": mean(&messages),
        "bytes_per_watcher": mean(&bytes),
        "bytes_per_watcher_max": bytes.iter().max().copied().unwrap_or(0),
        "violations": violations,
    });
    let ok = missed == 0 && !latency.is_empty() && violations.is_empty();
    Ok((ok, report))
}
