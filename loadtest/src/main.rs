//! `prenota-loadtest`: reproduces a national booking rush against a prenota server
//! and measures it against the no-op gRPC ceiling of the same server, in the same run.
//!
//! Scenarios: `ceiling` (no-op health checks: the transport's limit), `rush` (every
//! citizen searches and books), `book` (Book only, slot ids known: one durable booking
//! per request), `mixed` (an ordinary day: searches, holds, books,
//! cancels, reschedules; then households and dose series), `flood` (a calm rush, then many times more requests in flight
//! than the server admits: shedding, not collapsing), `churn` (a hold-churn soak on a
//! fast manual clock: memory, store and recovery stay flat past the retention window),
//! `expiry` (a fleet's holds all expire at once while citizens book: how fast the sweeper
//! gives the places back, and Book latency meanwhile),
//! `release` (a queued opening: a million citizens join a waiting room, the admitted
//! book, the rest are told SOLD_OUT), `campaign` (pre-registration, three waves,
//! offers declined, left to expire or accepted until every place is booked) and `footprint` (memory per slot and booking, recovery time, on the library without
//! gRPC).
//!
//! `--spawn` starts a server on a temp dir in this process; `--server URL` targets a
//! running one (loopback only). With `--spawn` every phase also reports the server's own
//! CPU per request, read from /proc for the server's threads only. After rush, mixed and flood the invariants are verified
//! from `ExportBookings`, `SearchSlots` and `GetSiteStats`; a violation exits non-zero.

mod assertions;
mod campaign;
mod churn;
mod expiry;
mod footprint;
mod lifecycle;
mod release;
mod report;
mod scenario;
mod target;
mod watchers;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use serde_json::json;
use tonic::transport::Channel;

use prenota::service::Clock;
use scenario::Shape;
use target::Target;

#[derive(Parser)]
#[command(
    name = "prenota-loadtest",
    about = "A national booking rush on one machine, measured against the gRPC ceiling"
)]
struct Cli {
    /// A running prenota server (loopback addresses only).
    #[arg(
        long,
        conflicts_with = "spawn",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// Start a server on a temp dir inside this process instead.
    #[arg(long)]
    spawn: bool,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// With --spawn: the server believes no frontend about citizens; every citizen call
    /// carries a signed assertion (EdDSA), signed before the timed phase (rush, mixed).
    #[arg(long, requires = "spawn")]
    asserted: bool,
    /// With --spawn: the spawned server stores on PostgreSQL at this URL (an empty
    /// database or schema) instead of sled; the server CPU then also counts every
    /// process named `postgres` on this machine (a throwaway server's).
    #[arg(
        long,
        requires = "spawn",
        env = "PRENOTA_LOADTEST_POSTGRES_URL",
        hide_env_values = true
    )]
    postgres: Option<String>,
    /// With --spawn: the spawned server opens this data dir (and leaves it) instead of
    /// a temp dir: a run on a store that already holds bookings, e.g. a copy of the
    /// one `footprint --recovery-store` builds (the day after an opening).
    #[arg(long, requires = "spawn", conflicts_with = "postgres")]
    data_dir: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    scenario: ScenarioArgs,
}

#[derive(Subcommand)]
enum ScenarioArgs {
    /// `grpc.health.v1.Health/Check` only: the no-op ceiling.
    Ceiling {
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
    },
    /// Opening morning: every citizen searches, then books; demand well above capacity.
    /// Runs the ceiling first and reports the rush as a ratio of it.
    Rush {
        /// Distinct citizens, each trying to book once.
        #[arg(long, default_value_t = 1_000_000)]
        citizens: u64,
        /// Sites, in four time zones.
        #[arg(long, default_value_t = 4)]
        sites: u32,
        /// Days of slots (08:00–20:00, 10-minute slots).
        #[arg(long, default_value_t = 5)]
        days: u32,
        /// Citizens per place.
        #[arg(long, default_value_t = 4)]
        demand_ratio: u32,
    },
    /// Book only: every citizen books a slot whose id it already knows (no search),
    /// with twice as many places as citizens: one durable booking per request, to
    /// compare with the no-op ceiling directly. Runs the ceiling first.
    Book {
        #[arg(long, default_value_t = 200_000)]
        citizens: u64,
        #[arg(long, default_value_t = 4)]
        sites: u32,
        #[arg(long, default_value_t = 5)]
        days: u32,
    },
    /// An ordinary busy day: each citizen searches 4 times, books; 1 in 5 cancels and 1 in
    /// 10 books again. Capacity is twice the demand. Runs the ceiling first. Then the
    /// lifecycle in a region of its own: a tenth as many units, half households of 3
    /// (BookGroup), half dose series (BookSeries, dose 2 21–28 local days after dose 1).
    Mixed {
        #[arg(long, default_value_t = 200_000)]
        citizens: u64,
        #[arg(long, default_value_t = 4)]
        sites: u32,
        #[arg(long, default_value_t = 5)]
        days: u32,
    },
    /// Opening morning twice: at `--in-flight` (the server's in-flight limit when
    /// spawned), then flooded with `factor` times as many requests in flight. Clients
    /// honour the RetryInfo of shed answers. Reports the flooded goodput (answers that
    /// were not shed, per second) as a ratio of the unflooded one, and admitted latency.
    Flood {
        #[arg(long, default_value_t = 200_000)]
        citizens: u64,
        /// Requests in flight during the flood, as a multiple of --in-flight.
        #[arg(long, default_value_t = 3)]
        factor: usize,
        #[arg(long, default_value_t = 4)]
        sites: u32,
        #[arg(long, default_value_t = 5)]
        days: u32,
        #[arg(long, default_value_t = 4)]
        demand_ratio: u32,
    },
    /// Bots hold places with made-up citizens and let them expire while the spawned
    /// server's clock runs fast; request records, store size and memory must stay flat
    /// once the request retention window has passed, and a recovery loads only what is
    /// retained. Needs --spawn.
    Churn {
        /// Real seconds the soak runs.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Hours of server time per real second.
        #[arg(long, default_value_t = 1)]
        hours_per_second: u32,
        /// Holds per second over all bots (0: as fast as the server takes them).
        #[arg(long, default_value_t = 2_000)]
        holds_per_second: u32,
    },
    /// A fleet of made-up citizens holds `--holds` places; then, while citizens book,
    /// the spawned server's clock moves past their time and the sweeper gives every
    /// place back. Reports Book latency and server CPU before, during and after the
    /// sweep, and how long it took. Needs --spawn.
    Expiry {
        #[arg(long, default_value_t = 100_000)]
        holds: u64,
        /// The holds' lifetime (the clock jumps past it: no real wait).
        #[arg(long, default_value_t = 60)]
        ttl_seconds: u32,
        /// The server's `hold_sweep_batch_max` (default: its own default).
        #[arg(long)]
        sweep_batch: Option<usize>,
        /// The server's `hold_sweep_interval_ms` (default: its own default; a server's
        /// configuration takes 10 to 1000).
        #[arg(long)]
        sweep_interval_ms: Option<u64>,
    },
    /// Opening morning twice, on two sets of sites: the second with `--watchers`
    /// WatchAvailability streams open on its sites. Reports both rushes as ratios of the
    /// ceiling, how soon watchers saw each booking, and messages and bytes per watcher.
    Watchers {
        #[arg(long, default_value_t = 200_000)]
        citizens: u64,
        #[arg(long, default_value_t = 4)]
        sites: u32,
        #[arg(long, default_value_t = 5)]
        days: u32,
        #[arg(long, default_value_t = 4)]
        demand_ratio: u32,
        /// Availability watchers, on connections of their own.
        #[arg(long, default_value_t = 1_000)]
        watchers: usize,
        /// Consecutive slots of one site each watcher watches (6: an hour).
        #[arg(long, default_value_t = 6)]
        watch_slots: usize,
    },
    /// A queued opening: every citizen joins the waiting room of a release before it
    /// opens; at the opening (the spawned server's clock jumps to it) every citizen reads
    /// its ticket, the admitted book, the rest wait for SOLD_OUT. Reports joins/s, the
    /// time from opening to sold out and the earliest joiners' share. Needs --spawn.
    Release {
        #[arg(long, default_value_t = 1_000_000)]
        citizens: u64,
        /// Places of the release (rounded up to whole places per slot).
        #[arg(long, default_value_t = 50_000)]
        places: u64,
        #[arg(long, default_value_t = 4)]
        sites: u32,
        #[arg(long, default_value_t = 5)]
        days: u32,
        /// Admissions per minute (0: as fast as places allow).
        #[arg(long, default_value_t = 0)]
        admissions_per_minute: u32,
    },
    /// A campaign's waitlist: every citizen pre-registers; three waves open in turn (the
    /// spawned server's clock jumps to each); offered citizens decline, let the offer
    /// expire or accept until every place is booked. Reports registrations/s, the
    /// matcher's offers/s and how long a freed place waits for its next offer. Needs
    /// --spawn.
    Campaign {
        #[arg(long, default_value_t = 500_000)]
        registrations: u64,
        /// Places of the campaign (rounded up to whole places per slot).
        #[arg(long, default_value_t = 100_000)]
        places: u64,
        #[arg(long, default_value_t = 4)]
        sites: u32,
        #[arg(long, default_value_t = 5)]
        days: u32,
        #[arg(long, default_value_t = 20)]
        decline_percent: u64,
        #[arg(long, default_value_t = 10)]
        expire_percent: u64,
    },
    /// Resident memory per slot and per booking, and recovery time (no network, no server).
    Footprint {
        #[arg(long, default_value_t = 10_000_000)]
        slots: u64,
        #[arg(long, default_value_t = 5_000_000)]
        bookings: u64,
        /// Bookings in the store whose recovery is timed.
        #[arg(long, default_value_t = 5_000_000)]
        recovery_bookings: u64,
        /// Build the recovery store in this directory and keep it; a later run given the
        /// same directory and number of bookings reuses it (to time or profile recovery
        /// again without the minutes of building). A temporary directory by default.
        #[arg(long)]
        recovery_store: Option<PathBuf>,
    },
}

/// mimalloc instead of glibc's malloc, as the server's binary: see BENCHMARKS.md, "Allocator".
#[global_allocator]
static ALLOCATOR: prenota::allocator::Mimalloc = prenota::allocator::Mimalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // As the server's binary does (the `--spawn` servers run in this process).
    if let Err(error) = prenota::allocator::turn_off_transparent_huge_pages() {
        eprintln!("prenota-loadtest: transparent huge pages stay on: {error}");
    }
    let cli = Cli::parse();
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("prenota-loadtest: {message}");
            ExitCode::from(2)
        }
    }
}

/// `Ok(false)` when an invariant was violated.
async fn run(cli: Cli) -> Result<bool, String> {
    if let ScenarioArgs::Footprint {
        slots,
        bookings,
        recovery_bookings,
        recovery_store,
    } = cli.scenario
    {
        return tokio::task::spawn_blocking(move || {
            let recovery = (recovery_bookings, recovery_store.as_deref());
            run_footprint(&cli.json, slots, bookings, recovery)
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    let on_manual_clock = matches!(
        cli.scenario,
        ScenarioArgs::Churn { .. }
            | ScenarioArgs::Expiry { .. }
            | ScenarioArgs::Release { .. }
            | ScenarioArgs::Campaign { .. }
    );
    if on_manual_clock && !cli.spawn {
        return Err(
            "churn, expiry, release and campaign move the server's clock: they need --spawn".into(),
        );
    }
    let clock = match on_manual_clock {
        true => Clock::manual_from_now(),
        false => Clock::system(),
    };
    let (target, gateway) = start_target(&cli, &clock)?;
    let channels = connect(&target.url, cli.channels.max(1)).await?;
    let spawned = match (&cli.data_dir, cli.spawn) {
        (Some(dir), _) => format!(
            " (spawned on {}, recovered in {:.1} s)",
            dir.display(),
            target.opened_in_seconds()
        ),
        (None, true) => " (spawned)".to_string(),
        (None, false) => String::new(),
    };
    println!(
        "prenota-loadtest against {}{spawned}: {} in flight over {} connections",
        target.url,
        cli.in_flight,
        channels.len()
    );
    match on_manual_clock {
        true => run_on_manual_clock(&cli, &channels, target, clock).await,
        false => run_on_system_clock(&cli, &channels, target, gateway.as_ref()).await,
    }
}

/// Churn, expiry, campaign and release: scenarios that move the spawned server's clock.
async fn run_on_manual_clock(
    cli: &Cli,
    channels: &[Channel],
    target: Target,
    clock: Clock,
) -> Result<bool, String> {
    if let ScenarioArgs::Churn {
        seconds,
        hours_per_second,
        holds_per_second,
    } = cli.scenario
    {
        let churn = churn::Churn {
            seconds,
            hours_per_second: hours_per_second.max(1),
            holds_per_second,
        };
        let (ok, report) = churn::run(channels, cli.in_flight, target, clock, churn).await?;
        write_json(&cli.json, report)?;
        return Ok(ok);
    }
    if let ScenarioArgs::Expiry {
        holds, ttl_seconds, ..
    } = cli.scenario
    {
        let expiry = expiry::Expiry { holds, ttl_seconds };
        let (ok, report) = expiry::run(channels, cli.in_flight, target, clock, expiry).await?;
        write_json(&cli.json, report)?;
        return Ok(ok);
    }
    let progress = scenario::progress_bar();
    if let ScenarioArgs::Campaign {
        registrations,
        places,
        sites,
        days,
        decline_percent,
        expire_percent,
    } = cli.scenario
    {
        let args = campaign::Campaign {
            registrations,
            places,
            sites,
            days,
            decline_percent: decline_percent.min(100),
            expire_percent: expire_percent.min(100 - decline_percent.min(100)),
        };
        let metrics = || target.server_metrics();
        let (ok, report) =
            campaign::run(channels, cli.in_flight, &args, (clock, metrics), &progress).await?;
        write_json(&cli.json, report)?;
        if let Some(metrics) = target.server_metrics() {
            print_group_commits(&metrics);
        }
        target.stop();
        return Ok(ok);
    }
    if let ScenarioArgs::Release {
        citizens,
        places,
        sites,
        days,
        admissions_per_minute,
    } = cli.scenario
    {
        let args = release::Release {
            citizens,
            places,
            sites,
            days,
            admissions_per_minute,
        };
        let (ok, report) = release::run(channels, cli.in_flight, &args, clock, &progress).await?;
        write_json(&cli.json, report)?;
        if let Some(metrics) = target.server_metrics() {
            print_group_commits(&metrics);
        }
        target.stop();
        return Ok(ok);
    }
    Err("not a scenario on the manual clock".into())
}

/// The scenarios on the system clock, against a spawned or a running server.
async fn run_on_system_clock(
    cli: &Cli,
    channels: &[Channel],
    target: Target,
    gateway: Option<&assertions::Gateway>,
) -> Result<bool, String> {
    let progress = scenario::progress_bar();
    let result = match cli.scenario {
        ScenarioArgs::Ceiling { requests } => {
            let phase = scenario::ceiling(channels, cli.in_flight, requests, &progress).await;
            progress.finish_and_clear();
            phase.print();
            write_json(
                &cli.json,
                json!({"scenario": "ceiling", "ceiling": phase.to_json()}),
            )?;
            Ok(true)
        }
        // Footprint runs without a server; the others on the manual clock.
        ScenarioArgs::Footprint { .. }
        | ScenarioArgs::Churn { .. }
        | ScenarioArgs::Expiry { .. }
        | ScenarioArgs::Release { .. }
        | ScenarioArgs::Campaign { .. } => Ok(true),
        ScenarioArgs::Rush {
            citizens,
            sites,
            days,
            demand_ratio,
        } => {
            let places = citizens / u64::from(demand_ratio.max(1));
            let shape = Shape::new(citizens, sites, days, places, "rush");
            let run = Run::new(cli, channels, gateway);
            run_scenario(Kind::Rush, &run, &shape, &progress).await
        }
        ScenarioArgs::Book {
            citizens,
            sites,
            days,
        } => {
            let shape = Shape::new(citizens, sites, days, citizens.saturating_mul(2), "book");
            let run = Run::new(cli, channels, gateway);
            run_scenario(Kind::Book, &run, &shape, &progress).await
        }
        ScenarioArgs::Watchers {
            citizens,
            sites,
            days,
            demand_ratio,
            watchers,
            watch_slots,
        } => {
            let args = watchers::Watchers {
                citizens,
                sites,
                days,
                demand_ratio,
                watchers,
                watch_slots: watch_slots.max(1),
            };
            // 200 watches a connection, under the server's 256 streams.
            let watch_channels = connect(&target.url, watchers.div_ceil(200).max(4)).await?;
            let (ok, report) =
                watchers::run(channels, &watch_channels, cli.in_flight, &args, &progress).await?;
            write_json(&cli.json, report)?;
            Ok(ok)
        }
        ScenarioArgs::Flood {
            citizens,
            factor,
            sites,
            days,
            demand_ratio,
        } => {
            let places = citizens / u64::from(demand_ratio.max(1));
            let shape = Shape::new(citizens, sites, days, places, "calm");
            run_flood(cli, channels, &shape, factor.max(1), &progress).await
        }
        ScenarioArgs::Mixed {
            citizens,
            sites,
            days,
        } => {
            let shape = Shape::new(citizens, sites, days, citizens.saturating_mul(2), "mixed");
            let run = Run::new(cli, channels, gateway);
            run_scenario(Kind::Mixed, &run, &shape, &progress).await
        }
    };
    if let Some(metrics) = target.server_metrics() {
        print_group_commits(&metrics);
    }
    target.stop();
    result
}

/// The server to load: spawned (its config for the scenario; with `--asserted`, the
/// gateway that signs the citizens' assertions) or reached at `--server`.
fn start_target(cli: &Cli, clock: &Clock) -> Result<(Target, Option<assertions::Gateway>), String> {
    if !cli.spawn {
        return Ok((Target::connect(&cli.server)?, None));
    }
    let mut gateway = None;
    let mut config = prenota::config::Config::default();
    if let ScenarioArgs::Expiry {
        sweep_batch,
        sweep_interval_ms,
        ..
    } = cli.scenario
    {
        config = expiry::config((sweep_batch, sweep_interval_ms));
    } else if let ScenarioArgs::Churn { .. } = cli.scenario {
        config = churn::config(cli.in_flight);
    } else if cli.asserted {
        let (signer, asserted) = assertions::Gateway::generate()?;
        (gateway, config) = (Some(signer), asserted);
    }
    // The spawned server sheds beyond the clients' normal concurrency.
    config.limits.in_flight_requests_max = cli.in_flight.max(1);
    // Every connection comes from this one host (watchers: one each).
    config.limits.connections_per_peer_max = 0;
    // Its clients are all one address: the ceiling's 256 health checks in flight pass a
    // peer's share of the health budget.
    config.limits.receiving_bytes_per_peer_max = 0;
    if let Some(url) = &cli.postgres {
        let settings = prenota::config::PostgresSettings {
            url: url.clone(),
            lease_ttl: std::time::Duration::from_secs(5),
        };
        config.store = prenota::config::StoreBackend::Postgres(settings);
        // A benchmark store, empty at start: any key serves.
        config.citizen_hash_key = Some([0x5a; 32]);
        report::count_postgres_cpu();
    }
    let target = Target::spawn(config, clock.clone(), cli.data_dir.clone())?;
    Ok((target, gateway))
}

/// `count` connections to `url`.
async fn connect(url: &str, count: usize) -> Result<Vec<Channel>, String> {
    let mut channels = Vec::new();
    for _ in 0..count {
        let channel = Channel::from_shared(url.to_string())
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {url}: {e}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// One line from the spawned server's own metrics: how writes were grouped.
fn print_group_commits(metrics: &str) {
    let sample = |name: &str| {
        metrics.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            value.trim().parse::<f64>().ok()
        })
    };
    if let (Some(commits), Some(writes), Some(fsync_seconds)) = (
        sample("prenota_commit_batch_writes_count"),
        sample("prenota_commit_batch_writes_sum"),
        sample("prenota_commit_fsync_seconds_sum"),
    ) {
        if commits > 0.0 {
            println!(
                "server: {commits} group commits, {:.1} writes per commit, fdatasync {:.2} ms \
                 on average",
                writes / commits,
                fsync_seconds / commits * 1e3
            );
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rush,
    /// Book only, slot ids known in advance.
    Book,
    Mixed,
}

/// What a rush or mixed run needs besides its shape.
struct Run<'a> {
    cli: &'a Cli,
    channels: &'a [Channel],
    /// `--asserted`: signs every citizen's assertion before the timed phase.
    gateway: Option<&'a assertions::Gateway>,
}

impl<'a> Run<'a> {
    fn new(
        cli: &'a Cli,
        channels: &'a [Channel],
        gateway: Option<&'a assertions::Gateway>,
    ) -> Self {
        Self {
            cli,
            channels,
            gateway,
        }
    }
}

async fn run_scenario(
    kind: Kind,
    run: &Run<'_>,
    shape: &Shape,
    progress: &indicatif::ProgressBar,
) -> Result<bool, String> {
    let (cli, channels) = (run.cli, run.channels);
    let name = match kind {
        Kind::Rush => "rush",
        Kind::Book => "book",
        Kind::Mixed => "mixed",
    };
    let scenario = scenario::publish(channels[0].clone(), shape).await?;
    println!(
        "{name}: {} citizens for {} places at {} sites over {} days",
        shape.citizens,
        scenario.total_capacity,
        scenario.site_ids.len(),
        shape.days
    );
    if let Some(gateway) = run.gateway {
        let started = std::time::Instant::now();
        let signed = gateway.sign_all(scenario::citizen_ids(&scenario, shape.citizens))?;
        println!(
            "asserted citizens: {signed} assertions (EdDSA) signed in {:.1} s, before the timed phase",
            started.elapsed().as_secs_f64()
        );
    }
    let ceiling = scenario::ceiling(
        channels,
        cli.in_flight,
        shape.citizens.min(200_000),
        progress,
    )
    .await;
    let acknowledged = scenario::Acknowledged::default();
    let phase = match kind {
        Kind::Rush => {
            scenario::rush(
                channels,
                cli.in_flight,
                &scenario,
                shape,
                (Arc::clone(&acknowledged), None),
                progress,
            )
            .await
        }
        Kind::Book => {
            scenario::book(
                channels,
                cli.in_flight,
                &scenario,
                shape,
                Arc::clone(&acknowledged),
                progress,
            )
            .await?
        }
        Kind::Mixed => {
            scenario::mixed(
                channels,
                cli.in_flight,
                &scenario,
                shape,
                Arc::clone(&acknowledged),
                progress,
            )
            .await
        }
    };
    progress.finish_and_clear();
    ceiling.print();
    phase.print();
    let booked = phase.tally.count("Book OK");
    let bookings_per_s = booked as f64 / phase.elapsed.as_secs_f64().max(1e-6);
    let ratio = phase.requests_per_s() / ceiling.requests_per_s().max(1e-6);
    println!(
        "\n{name} throughput: {:.0} req/s = {:.0}% of the ceiling ({:.0} req/s); {booked} durable bookings at {:.0}/s",
        phase.requests_per_s(),
        100.0 * ratio,
        ceiling.requests_per_s(),
        bookings_per_s
    );
    if let (Some(phase_cpu), Some(noop_cpu)) = (
        phase.server_cpu_us_per_request(),
        ceiling.server_cpu_us_per_request(),
    ) {
        println!(
            "{name} server CPU: {phase_cpu:.1} µs per request = {:.2}× the same run's no-op ({noop_cpu:.1} µs)",
            phase_cpu / noop_cpu.max(1e-6)
        );
    }
    let acknowledged = acknowledged.lock().await;
    // A rush fills every place it can; a mixed day's total depends on the cancels.
    let expected_confirmed =
        (kind != Kind::Mixed).then(|| shape.citizens.min(scenario.total_capacity));
    let violations = scenario::verify(
        channels[0].clone(),
        &scenario,
        &acknowledged,
        expected_confirmed,
    )
    .await?;
    if violations.is_empty() {
        println!(
            "invariants: OK ({} bookings acknowledged; no slot over capacity; at most one confirmed booking per citizen; \
             every acknowledged booking exported in its last state; counters match exports{})",
            acknowledged.len(),
            if kind == Kind::Mixed { "" } else { "; bookings = min(citizens, capacity)" }
        );
    } else {
        println!("invariants: {} VIOLATIONS", violations.len());
        for violation in violations.iter().take(20) {
            println!("  {violation}");
        }
    }
    let lifecycle_ok = match (kind, run.gateway) {
        (Kind::Mixed, None) => {
            let units = (shape.citizens / 10).clamp(100, 20_000);
            lifecycle::run(channels, cli.in_flight, units, progress).await?
        }
        (Kind::Mixed, Some(_)) => {
            println!("lifecycle: skipped (its citizens carry no assertions)");
            true
        }
        (Kind::Rush | Kind::Book, _) => true,
    };
    write_json(
        &cli.json,
        json!({
            "scenario": name,
            "asserted": run.gateway.is_some(),
            "citizens": shape.citizens,
            "capacity": scenario.total_capacity,
            "in_flight": cli.in_flight,
            "ceiling": ceiling.to_json(),
            name: phase.to_json(),
            "ratio_to_ceiling": ratio,
            "bookings": booked,
            "bookings_per_s": bookings_per_s,
            "violations": violations,
            "lifecycle_ok": lifecycle_ok,
        }),
    )?;
    Ok(violations.is_empty() && lifecycle_ok)
}

/// Goodput: answers that were not shed, per second.
fn goodput(phase: &report::Phase) -> f64 {
    (phase.tally.requests() - phase.tally.shed()) as f64 / phase.elapsed.as_secs_f64().max(1e-6)
}

async fn run_flood(
    cli: &Cli,
    channels: &[Channel],
    shape: &Shape,
    factor: usize,
    progress: &indicatif::ProgressBar,
) -> Result<bool, String> {
    let calm = scenario::publish(channels[0].clone(), shape).await?;
    let flooded_shape = Shape {
        tag: "flood",
        ..shape.clone()
    };
    let flooded = scenario::publish(channels[0].clone(), &flooded_shape).await?;
    println!(
        "flood: {} citizens per phase for {} places; {} then {} requests in flight",
        shape.citizens,
        calm.total_capacity,
        cli.in_flight,
        cli.in_flight * factor
    );
    let mut ok = true;
    let mut phases = Vec::new();
    for (scenario, in_flight) in [(&calm, cli.in_flight), (&flooded, cli.in_flight * factor)] {
        let acknowledged = scenario::Acknowledged::default();
        let phase = scenario::rush(
            channels,
            in_flight,
            scenario,
            shape,
            (Arc::clone(&acknowledged), None),
            progress,
        )
        .await;
        let expected = shape.citizens.min(scenario.total_capacity);
        let violations = scenario::verify(
            channels[0].clone(),
            scenario,
            &*acknowledged.lock().await,
            Some(expected),
        )
        .await?;
        if !violations.is_empty() {
            ok = false;
            println!(
                "invariants: {} VIOLATIONS in {}",
                violations.len(),
                scenario.region_id
            );
            for violation in violations.iter().take(20) {
                println!("  {violation}");
            }
        }
        phases.push(phase);
    }
    progress.finish_and_clear();
    for phase in &phases {
        phase.print();
    }
    let (calm_goodput, flood_goodput) = (goodput(&phases[0]), goodput(&phases[1]));
    let ratio = flood_goodput / calm_goodput.max(1e-6);
    println!(
        "\nflood goodput: {flood_goodput:.0} answers/s = {:.0}% of the unflooded {calm_goodput:.0}/s; \
         {} requests shed ({:.0}% of tries)",
        100.0 * ratio,
        phases[1].tally.shed(),
        100.0 * phases[1].tally.shed() as f64 / phases[1].tally.requests().max(1) as f64
    );
    if ok {
        println!("invariants: OK in both phases (bookings = min(citizens, capacity), no slot over capacity, one booking per citizen)");
    }
    write_json(
        &cli.json,
        json!({
            "scenario": "flood",
            "citizens": shape.citizens,
            "in_flight": cli.in_flight,
            "factor": factor,
            "calm": phases[0].to_json(),
            "flood": phases[1].to_json(),
            "calm_goodput": calm_goodput,
            "flood_goodput": flood_goodput,
            "goodput_ratio": ratio,
        }),
    )?;
    Ok(ok)
}

fn run_footprint(
    json_path: &Option<PathBuf>,
    slots: u64,
    bookings: u64,
    (recovery_bookings, recovery_store): (u64, Option<&Path>),
) -> Result<bool, String> {
    println!("footprint: {slots} slots, {bookings} bookings in memory indexes, recovery of {recovery_bookings} bookings");
    let (per_slot, catalog) = footprint::slots(slots.max(1))?;
    println!("  catalog: {per_slot:.0} resident bytes per slot (target <= 64)");
    let (per_booking, citizens, requests) = footprint::bookings(bookings.max(1))?;
    println!("  citizen index + request registry: {per_booking:.0} resident bytes per booking (target <= 200)");
    drop((catalog, citizens, requests));
    let recovered = footprint::recovery(recovery_bookings.max(1), recovery_store)?;
    let (recovery_s, recovery_rss_mib) = (recovered.seconds, recovered.rss_mib);
    println!("  recovery of {recovery_bookings} bookings: {recovery_s:.1} s (target <= 10 s); process resident afterwards: {recovery_rss_mib:.0} MiB");
    println!(
        "    the data dir's size hint named {} bookings (left by the last recovery, retention pass or shutdown; 0: none)",
        recovered.hinted_bookings
    );
    println!(
        "  one retention pass over that store (nothing to delete): {:.1} ms",
        recovered.retention_seconds * 1e3
    );
    if let Some(closure_s) = recovered.closure_seconds {
        println!(
            "  closing one slot of that store: {:.1} ms",
            closure_s * 1e3
        );
    }
    write_json(
        json_path,
        json!({
            "scenario": "footprint",
            "slots": slots,
            "bytes_per_slot": per_slot,
            "bookings": bookings,
            "bytes_per_booking": per_booking,
            "recovery_bookings": recovery_bookings,
            "recovery_s": recovery_s,
            "recovery_rss_mib": recovery_rss_mib,
            "recovery_hinted_bookings": recovered.hinted_bookings,
            "retention_s": recovered.retention_seconds,
            "closure_s": recovered.closure_seconds,
        }),
    )?;
    Ok(true)
}

fn write_json(path: &Option<PathBuf>, report: serde_json::Value) -> Result<(), String> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}
