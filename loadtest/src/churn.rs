//! `churn`: the hold-churn soak (issue #13). Bots hold places with made-up citizen ids
//! and let every hold expire, at `holds_per_second` (or as fast as the server takes
//! them), while the spawned
//! server's manual clock runs `hours_per_second` hours per real second, so days of
//! churn pass in minutes with the production retention windows. Samples the finished
//! request records, live holds, store size and resident memory; once the request window
//! has passed they must stay flat. Then the data dir is recovered again, which must load
//! only the requests still retained.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prenota::config::Config;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::{self, search_slots_request::Scope};
use prenota::service::{Clock, Engine};
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::report::{Phase, Tally};
use crate::scenario;
use crate::target::Target;

/// How long and how fast the soak runs.
#[derive(Clone, Copy, Debug)]
pub struct Churn {
    pub seconds: u64,
    pub hours_per_second: u32,
    /// Holds per second over all bots; 0: as fast as the server takes them.
    pub holds_per_second: u32,
}

/// How often retention runs during the soak (real seconds).
const RETENTION_INTERVAL_S: u64 = 5;

/// The server config of the soak: production windows and sweeper (20,000 expiries a
/// second, more than the bots make), retention often enough for the clock.
pub fn config(in_flight: usize) -> Config {
    let mut config = Config::default();
    config.limits.in_flight_requests_max = in_flight.max(1);
    config.limits.retention_interval_ms = RETENTION_INTERVAL_S * 1_000;
    config
}

/// One look at the server's state.
#[derive(Clone, Copy, Debug)]
struct Sample {
    virtual_hours: f64,
    holds_made: u64,
    request_records: u64,
    live_holds: u64,
    store_mib: f64,
    rss_mib: f64,
}

impl Sample {
    fn take(engine: &Engine, started_ms: i64, holds_made: u64) -> Self {
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        Self {
            virtual_hours: (engine.clock().now_unix_ms() - started_ms) as f64 / 3_600_000.0,
            holds_made,
            request_records: engine.request_record_count() as u64,
            live_holds: engine.live_hold_count() as u64,
            store_mib: mib(engine.store_disk_bytes().unwrap_or(0)),
            rss_mib: mib(crate::footprint::rss_bytes()),
        }
    }

    fn print(&self, data_dir: &std::path::Path) {
        println!(
            "  {:>7.1} h  {:>9} holds made  {:>8} request records  {:>5} live  store {:>7.1} MiB  rss {:>7.1} MiB",
            self.virtual_hours,
            self.holds_made,
            self.request_records,
            self.live_holds,
            self.store_mib,
            self.rss_mib
        );
        println!("           files: {}", sled_files(data_dir));
    }

    fn to_json(self) -> Value {
        json!({
            "virtual_hours": self.virtual_hours, "holds_made": self.holds_made,
            "request_records": self.request_records, "live_holds": self.live_holds,
            "store_mib": self.store_mib, "rss_mib": self.rss_mib,
        })
    }
}

/// The sled dir's files and their sizes in MiB, largest first (blobs summed).
fn sled_files(data_dir: &std::path::Path) -> String {
    let mut sizes: std::collections::BTreeMap<String, u64> = Default::default();
    let mut walk = vec![data_dir.join("sled")];
    while let Some(dir) = walk.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                walk.push(path);
                continue;
            }
            let name = path.file_name().map(|n| n.to_string_lossy().to_string());
            let name = match path.parent().and_then(|p| p.file_name()) {
                Some(parent) if parent == "blobs" => "blobs".to_string(),
                _ => name.unwrap_or_default(),
            };
            *sizes.entry(name).or_default() += meta.len();
        }
    }
    sizes
        .iter()
        .map(|(name, bytes)| format!("{name} {:.1}", *bytes as f64 / 1_048_576.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The site [`publish`] makes for a scenario (`tag`): one per process.
pub fn site_id(tag: &str) -> String {
    format!("{tag}-{}", std::process::id())
}

/// Publishes one site ([`site_id`]) of service `tag` with 72 slots of 10,000 places,
/// 60 days after the clock's today; returns their slot ids.
pub async fn publish(channel: Channel, clock: &Clock, tag: &str) -> Result<Vec<String>, String> {
    let site_id = site_id(tag);
    let mut capacity = CapacityServiceClient::new(channel.clone());
    capacity
        .upsert_site(proto::UpsertSiteRequest {
            site: Some(proto::Site {
                site_id: site_id.clone(),
                name: format!("{tag} site"),
                region_id: tag.into(),
                time_zone: "Etc/UTC".into(),
            }),
            request_id: String::new(),
        })
        .await
        .map_err(|e| format!("UpsertSite: {e}"))?;
    let today = chrono::DateTime::from_timestamp_millis(clock.now_unix_ms())
        .ok_or("the clock is out of range")?;
    let day = (today + chrono::Duration::days(60))
        .format("%Y-%m-%d")
        .to_string();
    capacity
        .publish_schedule(proto::PublishScheduleRequest {
            site_id: site_id.clone(),
            service_id: tag.into(),
            first_day: day.clone(),
            last_day: day,
            opening_hours: (1..=7)
                .map(|weekday| proto::OpeningHours {
                    weekday,
                    opens: "08:00".into(),
                    closes: "20:00".into(),
                })
                .collect(),
            slot_minutes: 10,
            capacity_per_slot: 10_000,
            request_id: String::new(),
        })
        .await
        .map_err(|e| format!("PublishSchedule: {e}"))?;
    let slots = site_slots(channel, clock, tag).await?;
    Ok(slots.into_iter().map(|slot| slot.slot_id).collect())
}

/// Every slot [`publish`] made for `tag`, as a search sees it now (one page: a page
/// that is not the whole site is an error).
pub async fn site_slots(
    channel: Channel,
    clock: &Clock,
    tag: &str,
) -> Result<Vec<proto::Slot>, String> {
    let now_s = clock.now_unix_ms() / 1_000;
    let page = BookingServiceClient::new(channel)
        .search_slots(proto::SearchSlotsRequest {
            scope: Some(Scope::SiteId(site_id(tag))),
            service_id: tag.into(),
            from: scenario::at_s(now_s),
            to: scenario::at_s(now_s + 62 * 86_400),
            only_available: false,
            page_size: 500,
            page_token: String::new(),
        })
        .await
        .map_err(|e| format!("SearchSlots: {e}"))?
        .into_inner();
    match page.next_page_token.is_empty() {
        true => Ok(page.slots),
        false => Err(format!("{} has more slots than one page", site_id(tag))),
    }
}

/// One bot: holds a place for a new made-up citizen, again and again, until `stop`.
async fn bot(
    channel: Channel,
    slots: Arc<Vec<String>>,
    worker: usize,
    made: Arc<AtomicU64>,
    (stop, pace): (Arc<AtomicBool>, Option<Duration>),
) -> Tally {
    let mut client = BookingServiceClient::new(channel);
    let mut tally = Tally::new();
    let mut n = 0u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(pace) = pace {
            tokio::time::sleep_until(next.into()).await;
            next += pace;
        }
        let slot_id = slots[(worker + n as usize) % slots.len()].clone();
        let started = Instant::now();
        let result = client
            .hold_slot(proto::HoldSlotRequest {
                slot_id,
                citizen_id: format!("bot-{worker}-{n}"),
                request_id: format!("hold-{worker}-{n}"),
                ttl_seconds: 60,
            })
            .await;
        tally.record("HoldSlot", started.elapsed(), &result);
        if result.is_ok() {
            made.fetch_add(1, Ordering::Relaxed);
        }
        n += 1;
    }
    tally
}

/// Runs the soak against a server spawned with `clock` (manual) and [`config`].
pub async fn run(
    channels: &[Channel],
    in_flight: usize,
    target: Target,
    clock: Clock,
    churn: Churn,
) -> Result<(bool, Value), String> {
    let engine = target.engine().ok_or("the churn soak needs --spawn")?;
    let slots = Arc::new(publish(channels[0].clone(), &clock, "churn").await?);
    let started_ms = clock.now_unix_ms();
    let window_hours = f64::from(engine.limits().request_records_retained_hours);
    println!(
        "churn: {in_flight} bots hold and let expire, {} h of server time per second for {} s \
         (request window {window_hours} h, {} slots)",
        churn.hours_per_second,
        churn.seconds,
        slots.len()
    );
    let (made, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    // Each bot's interval between holds, for the asked rate over all bots.
    let pace = (churn.holds_per_second > 0).then(|| {
        Duration::from_secs_f64(in_flight.max(1) as f64 / f64::from(churn.holds_per_second))
    });
    let bots: Vec<_> = (0..in_flight.max(1))
        .map(|worker| {
            let channel = channels[worker % channels.len()].clone();
            let (slots, made, stop) = (Arc::clone(&slots), Arc::clone(&made), Arc::clone(&stop));
            tokio::spawn(bot(channel, slots, worker, made, (stop, pace)))
        })
        .collect();
    let began = Instant::now();
    let data_dir = target.data_dir().ok_or("the churn soak needs --spawn")?;
    let samples = drive_clock(&engine, &clock, churn, started_ms, &made, data_dir).await;
    stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::new();
    for bot in bots {
        if let Ok(bot_tally) = bot.await {
            tally.merge(bot_tally);
        }
    }
    Phase {
        name: "churn",
        elapsed: began.elapsed(),
        tally,
        server_cpu: None,
    }
    .print();
    // A last pass, as a clean stop's would come: recovery counts from the retention time
    // the last pass stored (up to an interval older than now), so it is judged on this.
    engine
        .retain()
        .await
        .map_err(|e| format!("the last retention pass: {e}"))?;
    let last = Sample::take(&engine, started_ms, made.load(Ordering::Relaxed));
    drop(engine);
    // Records wait up to one retention interval for their pass, and samples come
    // every 2 s: that much server time is slack.
    let slack_hours = (RETENTION_INTERVAL_S as f64 + 2.0 * 2.0) * f64::from(churn.hours_per_second);
    let flat = judge(&samples, window_hours, slack_hours);
    let recovery = recover_again(target, &clock, last.request_records).await?;
    let report = json!({
        "scenario": "churn",
        "hours_per_second": churn.hours_per_second,
        "holds_per_second": churn.holds_per_second,
        "seconds": churn.seconds,
        "samples": samples.iter().map(|s| s.to_json()).collect::<Vec<_>>(),
        "flat": flat.is_ok(),
        "recovery": recovery.1,
    });
    if let Err(problem) = &flat {
        println!("churn: NOT FLAT: {problem}");
    }
    Ok((flat.is_ok() && recovery.0, report))
}

/// Moves the clock `hours_per_second` per real second until the soak ends, sampling
/// every two seconds; returns the samples.
async fn drive_clock(
    engine: &Engine,
    clock: &Clock,
    churn: Churn,
    started_ms: i64,
    made: &AtomicU64,
    data_dir: &std::path::Path,
) -> Vec<Sample> {
    let step = Duration::from_millis(100);
    let per_step = Duration::from_secs(u64::from(churn.hours_per_second) * 360);
    let deadline = Instant::now() + Duration::from_secs(churn.seconds);
    let mut samples = Vec::new();
    let mut next_sample = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(step).await;
        clock.advance(per_step);
        if Instant::now() >= next_sample {
            let sample = Sample::take(engine, started_ms, made.load(Ordering::Relaxed));
            if samples.len() % 5 == 0 {
                sample.print(data_dir);
            }
            samples.push(sample);
            next_sample += Duration::from_secs(2);
        }
    }
    samples
}

/// A measure's name, how to read it from a sample, and its slack beyond 10%.
type Check = (&'static str, fn(&Sample) -> f64, f64);

/// Steady-state spans shorter than this many request windows are not judged for
/// flatness: sled's file grows in steps as it fills its segments, so a short run cannot
/// tell a step from a trend.
const WINDOWS_TO_JUDGE_FLATNESS: f64 = 4.0;

/// Judges the samples taken after the request window passed: request records never
/// exceed the holds of the last window (plus a retention period and two samples of
/// slack), and, on a run long enough, store size and resident memory in the last third
/// stay within a tenth (memory: plus 16 MiB) of their peak in the middle third.
fn judge(samples: &[Sample], window_hours: f64, slack_hours: f64) -> Result<(), String> {
    let steady: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.virtual_hours >= window_hours + slack_hours)
        .collect();
    let (Some(first), Some(last)) = (steady.first(), steady.last()) else {
        return Err("the soak ended before the request window passed: run it longer".into());
    };
    println!(
        "\nsteady state from {:.0} h to {:.0} h of server time: {} holds made in it",
        first.virtual_hours,
        last.virtual_hours,
        last.holds_made - first.holds_made
    );
    let mut problems = Vec::new();
    if last.holds_made <= first.holds_made {
        problems.push("no holds were made in the steady state".into());
    }
    problems.extend(records_within_window(samples, window_hours + slack_hours));
    if last.virtual_hours - first.virtual_hours < WINDOWS_TO_JUDGE_FLATNESS * window_hours {
        println!("  store and memory not judged: the steady state spans fewer than {WINDOWS_TO_JUDGE_FLATNESS} windows");
    } else {
        problems.extend(flat_in_last_third(&steady));
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(problems.join("; ")),
    }
}

/// Every sample's request records are at most the holds made in the `hours` before it.
fn records_within_window(samples: &[Sample], hours: f64) -> Option<String> {
    let mut worst = 0.0f64;
    for sample in samples {
        let before = samples
            .iter()
            .take_while(|s| s.virtual_hours <= sample.virtual_hours - hours)
            .last();
        let Some(before) = before else { continue };
        let made = (sample.holds_made - before.holds_made).max(1) as f64;
        worst = worst.max(sample.request_records as f64 / made);
    }
    let ok = worst <= 1.0;
    println!(
        "  request records        at most {:.0}% of the holds made in the window before: {}",
        100.0 * worst,
        if ok {
            "bounded"
        } else {
            "MORE THAN THE WINDOW"
        }
    );
    (!ok).then(|| "more request records than holds made in the window".to_string())
}

fn flat_in_last_third(steady: &[&Sample]) -> Vec<String> {
    let third = steady.len() / 3;
    let (middle, last) = (&steady[third..2 * third], &steady[2 * third..]);
    let peak = |part: &[&Sample], value: fn(&Sample) -> f64| {
        part.iter().map(|s| value(s)).fold(0.0, f64::max)
    };
    let checks: [Check; 2] = [
        ("store size (MiB)", |s| s.store_mib, 0.0),
        ("resident memory (MiB)", |s| s.rss_mib, 16.0),
    ];
    let mut problems = Vec::new();
    for (name, value, slack) in checks {
        let (before, after) = (peak(middle, value), peak(last, value));
        let flat = after <= before * 1.10 + slack;
        println!(
            "  {name:<22} peak {before:>8.1} in the middle third, {after:>8.1} in the last: {}",
            if flat { "flat" } else { "GROWING" }
        );
        if !flat {
            problems.push(format!("{name} grew from {before:.1} to {after:.1}"));
        }
    }
    problems
}

/// Stops the server, recovers its data dir again at the same time and checks it
/// remembers no more requests than the server did (only what is retained).
async fn recover_again(
    target: Target,
    clock: &Clock,
    remembered: u64,
) -> Result<(bool, Value), String> {
    let data_dir = target
        .stop_keeping_data()
        .ok_or("the churn soak needs --spawn")?;
    let clock = clock.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut engine = Engine::open(data_dir.path(), &config(1), clock)
            .map_err(|e| format!("recovering the soaked store: {e}"))?;
        let seconds = started.elapsed().as_secs_f64();
        let recovered = engine.request_record_count() as u64;
        engine
            .shutdown()
            .map_err(|e| format!("closing the soaked store: {e}"))?;
        let ok = recovered <= remembered;
        println!(
            "recovery after the soak: {seconds:.2} s, {recovered} request records loaded \
             (the server remembered {remembered}): {}",
            if ok {
                "only what is retained"
            } else {
                "MORE THAN RETAINED"
            }
        );
        Ok((
            ok,
            json!({"seconds": seconds, "request_records": recovered, "remembered": remembered}),
        ))
    })
    .await
    .map_err(|e| e.to_string())?
}
