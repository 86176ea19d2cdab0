//! The engine without the network: durable bookings through the group committer at
//! several concurrency levels (the batch size follows the number in flight), on sled
//! and (with `PRENOTA_BENCH_POSTGRES_URL`) on PostgreSQL, and schedule generation with
//! chrono-tz, and a search's answer as the handler builds it.
//! Run: `cargo bench --bench engine`. Numbers: BENCHMARKS.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{Duration as Days, Utc};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use prenota::config::{schedule_bounds, Config, PostgresSettings, StoreBackend, DEFAULT_LIMITS};
use prenota::domain::catalog::{SearchQuery, SearchScope, Site};
use prenota::domain::ids::{ChannelId, RegionId, RequestKey, ServiceId, SiteId, SlotKey};
use prenota::domain::schedule::{Schedule, ScheduleInput};
use prenota::grpc::convert;
use prenota::service::{Actor, BookCommand, Clock, Engine};
use prenota::store::postgres::Standby;
use prenota::store::{Store, UnsyncedForBenchmarks};
use prost::Message;

/// The server binary's allocator, so the engine is measured as it runs there (and, as
/// there, without transparent huge pages: `main`).
#[global_allocator]
static ALLOCATOR: prenota::allocator::Mimalloc = prenota::allocator::Mimalloc;

const BOOKINGS_PER_ITERATION: u64 = 4_096;
const SLOTS: i64 = 23 * 60;

fn schedule(
    first_day: &str,
    last_day: &str,
    opens: &'static str,
    closes: &'static str,
    slot_minutes: u32,
) -> Schedule {
    Schedule::parse(
        &ScheduleInput {
            first_day,
            last_day,
            opening_hours: (1..=7).map(|weekday| (weekday, opens, closes)).collect(),
            slot_minutes,
            capacity_per_slot: 10_000,
        },
        &schedule_bounds(&DEFAULT_LIMITS),
    )
    .expect("a valid schedule")
}

/// An engine on a temp dir with one UTC site and one day of 1-minute slots of 10,000
/// places; `unsynced` weakens its commits (benchmarks only).
fn engine(
    runtime: &tokio::runtime::Runtime,
    unsynced: Option<UnsyncedForBenchmarks>,
) -> (Arc<Engine>, tempfile::TempDir, i64) {
    engine_with(runtime, unsynced, Config::default())
}

fn engine_with(
    runtime: &tokio::runtime::Runtime,
    unsynced: Option<UnsyncedForBenchmarks>,
    config: Config,
) -> (Arc<Engine>, tempfile::TempDir, i64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = match unsynced {
        None => Store::open(dir.path(), &config.limits),
        Some(mode) => Store::open_unsynced_for_benchmarks(dir.path(), &config.limits, mode),
    }
    .expect("store");
    let engine =
        Arc::new(Engine::open_with_store(store, &config, Clock::system()).expect("engine"));
    let first_start = with_schedule(runtime, &engine);
    (engine, dir, first_start)
}

/// The same engine on the PostgreSQL backend (a schema of its own on `url`, the lease
/// taken, a local read copy in the temp dir).
fn postgres_engine(
    runtime: &tokio::runtime::Runtime,
    url: &str,
) -> (Arc<Engine>, tempfile::TempDir, i64, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let schema = format!(
        "prenota_bench_{}_{}",
        std::process::id(),
        Utc::now().timestamp_millis()
    );
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("PostgreSQL");
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .expect("a schema for the bench");
    let join = if url.contains('?') { '&' } else { '?' };
    let config = Config {
        store: StoreBackend::Postgres(PostgresSettings {
            url: format!("{url}{join}options=-csearch_path%3D{schema}"),
            lease_ttl: Duration::from_secs(5),
        }),
        citizen_hash_key: Some([7; 32]),
        ..Config::default()
    };
    let engine = Engine::open_configured(dir.path(), &config, Clock::system(), &Standby::default())
        .expect("an engine on PostgreSQL");
    let engine = Arc::new(engine);
    let first_start = with_schedule(runtime, &engine);
    (engine, dir, first_start, schema)
}

/// Removes a bench schema so repeated runs leave nothing behind.
fn drop_schema(url: &str, schema: &str) {
    let dropped = postgres::Client::connect(url, postgres::NoTls)
        .and_then(|mut client| client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")));
    if let Err(error) = dropped {
        eprintln!("could not drop bench schema {schema}: {error}");
    }
}

/// Gives `engine` one UTC site and one day of 1-minute slots of 10,000 places, three
/// days ahead; returns the first slot's start.
fn with_schedule(runtime: &tokio::runtime::Runtime, engine: &Engine) -> i64 {
    let day = Utc::now().date_naive() + Days::days(3);
    let day_text = day.format("%Y-%m-%d").to_string();
    let site_id = SiteId::parse("site_id", "bench", 64).expect("id");
    let service_id = ServiceId::parse("service_id", "vax", 64).expect("id");
    runtime.block_on(async {
        engine
            .upsert_site(
                Site {
                    site_id: site_id.clone(),
                    name: "Bench".into(),
                    region_id: RegionId::parse("region_id", "bench", 64).expect("id"),
                    time_zone: chrono_tz::UTC,
                },
                &Actor::everywhere("bench"),
            )
            .await
            .expect("site");
        engine
            .publish_schedule(
                &site_id,
                &service_id,
                &schedule(&day_text, &day_text, "00:00", "23:00", 1),
                &Actor::everywhere("bench"),
            )
            .await
            .expect("schedule");
    });
    day.and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc().timestamp())
        .unwrap_or_default()
}

/// A runtime and a group counted in bookings, with the sampling every booking bench uses
/// (each iteration writes thousands of durable bookings, so few, long samples).
fn booking_group<'c>(
    c: &'c mut Criterion,
    name: &str,
) -> (
    tokio::runtime::Runtime,
    criterion::BenchmarkGroup<'c, criterion::measurement::WallTime>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(BOOKINGS_PER_ITERATION));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    (runtime, group)
}

fn durable_bookings(c: &mut Criterion) {
    let (runtime, mut group) = booking_group(c, "engine_durable_book");
    for in_flight in [1usize, 16, 256, 1_024] {
        let (engine, _dir, first_start) = engine(&runtime, None);
        let id = BenchmarkId::from_parameter(in_flight);
        bench_bookings(&mut group, id, &runtime, (&engine, first_start), in_flight);
    }
    group.finish();
}

/// The same book path at 256 in flight with weaker commits: what durability costs.
/// `engine_durable_book` on the PostgreSQL backend: every group commit one transaction
/// (`PRENOTA_BENCH_POSTGRES_URL`, e.g. from `scripts/postgres-test-server`; skipped
/// without it). Each run leaves a schema `prenota_bench_*` behind: use a throwaway server.
fn durable_bookings_on_postgres(c: &mut Criterion) {
    let Ok(url) = std::env::var("PRENOTA_BENCH_POSTGRES_URL") else {
        eprintln!("engine_durable_book_postgres skipped: PRENOTA_BENCH_POSTGRES_URL is not set");
        return;
    };
    let (runtime, mut group) = booking_group(c, "engine_durable_book_postgres");
    for in_flight in [256usize, 1_024] {
        let (engine, _dir, first_start, schema) = postgres_engine(&runtime, &url);
        let id = BenchmarkId::from_parameter(in_flight);
        bench_bookings(&mut group, id, &runtime, (&engine, first_start), in_flight);
        drop(engine);
        drop_schema(&url, &schema);
    }
    group.finish();
}

fn book_path_by_commit_mode(c: &mut Criterion) {
    let (runtime, mut group) = booking_group(c, "engine_book_path_256_in_flight");
    let modes = [
        ("fdatasync", None),
        (
            "flush_without_fsync",
            Some(UnsyncedForBenchmarks::FlushWithoutFsync),
        ),
        (
            "apply_only_in_memory",
            Some(UnsyncedForBenchmarks::ApplyOnly),
        ),
    ];
    for (name, mode) in modes {
        let (engine, _dir, first_start) = engine(&runtime, mode);
        let id = BenchmarkId::from_parameter(name);
        bench_bookings(&mut group, id, &runtime, (&engine, first_start), 256);
    }
    group.finish();
}

/// Durable bookings at 1,024 in flight with the group-commit batch bounded to N writes.
fn batch_size_bound(c: &mut Criterion) {
    let (runtime, mut group) = booking_group(c, "engine_commit_batch_writes_max");
    for batch_max in [1usize, 8, 64, 512, 4_096] {
        let mut config = Config::default();
        config.limits.commit_batch_writes_max = batch_max;
        let (engine, _dir, first_start) = engine_with(&runtime, None, config);
        let id = BenchmarkId::from_parameter(batch_max);
        bench_bookings(&mut group, id, &runtime, (&engine, first_start), 1_024);
    }
    group.finish();
}

/// Times `BOOKINGS_PER_ITERATION` fresh citizens booked with `in_flight` tasks per iteration.
fn bench_bookings(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    runtime: &tokio::runtime::Runtime,
    (engine, first_start): (&Arc<Engine>, i64),
    in_flight: usize,
) {
    let next_citizen = AtomicU64::new(0);
    group.bench_function(id, |b| {
        b.iter_custom(|iterations| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iterations {
                let first = next_citizen.fetch_add(BOOKINGS_PER_ITERATION, Ordering::Relaxed);
                let started = Instant::now();
                runtime.block_on(book_all(engine, first, in_flight, first_start));
                elapsed += started.elapsed();
            }
            elapsed
        })
    });
}

/// Books citizens `first..first + BOOKINGS_PER_ITERATION` with `in_flight` tasks.
async fn book_all(engine: &Arc<Engine>, first: u64, in_flight: usize, first_start: i64) {
    let site_id = SiteId::parse("site_id", "bench", 64).expect("id");
    let service_id = ServiceId::parse("service_id", "vax", 64).expect("id");
    let tasks: Vec<_> = (0..in_flight as u64)
        .map(|worker| {
            let (engine, site_id, service_id) =
                (Arc::clone(engine), site_id.clone(), service_id.clone());
            tokio::spawn(async move {
                let mut citizen = first + worker;
                while citizen < first + BOOKINGS_PER_ITERATION {
                    let command = BookCommand {
                        slot: SlotKey {
                            site_id: site_id.clone(),
                            service_id: service_id.clone(),
                            start_unix_s: first_start + 60 * (citizen as i64 % SLOTS),
                        },
                        citizen_id: format!("citizen-{citizen}"),
                        request: RequestKey::parse(
                            "request_id",
                            &format!("request-{citizen}"),
                            128,
                        )
                        .expect("id"),
                        hold_id: None,
                        channel: ChannelId::web(),
                    };
                    engine.book(command).await.expect("a durable booking");
                    citizen += in_flight as u64;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("booking task");
    }
}

/// A `SearchSlots` answer of 20 slots as the handler builds it, in a site in Rome: the
/// catalog's search, each slot's places for the caller's channel and its message (five
/// strings: ids, the local start, the zone), then its encoding.
fn search_answer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (engine, _dir, first_start) = engine(&runtime, None);
    let site_id = SiteId::parse("site_id", "rome", 64).expect("id");
    let service_id = ServiceId::parse("service_id", "vax", 64).expect("id");
    let day = Utc::now().date_naive() + Days::days(3);
    let day_text = day.format("%Y-%m-%d").to_string();
    runtime.block_on(async {
        let rome = Site {
            site_id: site_id.clone(),
            name: "Roma".into(),
            region_id: RegionId::parse("region_id", "lazio", 64).expect("id"),
            time_zone: chrono_tz::Europe::Rome,
        };
        let actor = Actor::everywhere("bench");
        engine.upsert_site(rome, &actor).await.expect("site");
        let day = schedule(&day_text, &day_text, "08:00", "20:00", 10);
        let published = engine.publish_schedule(&site_id, &service_id, &day, &actor);
        published.await.expect("schedule");
    });
    let query = SearchQuery {
        scope: SearchScope::Site(site_id),
        service_id,
        from_unix_s: first_start,
        to_unix_s: first_start + 86_400,
        only_available: true,
        after: None,
        page_size: 20,
        scan_max: 10_000,
    };
    let web = ChannelId::web();
    let mut group = c.benchmark_group("search_answer");
    group.throughput(Throughput::Elements(20));
    group.bench_function("twenty_slots_europe_rome", |b| {
        b.iter(|| {
            let page = engine.search(&query).expect("a search");
            let answer = convert::search_answer(&engine, &page, true, &web);
            assert_eq!(answer.slots.len(), 20);
            answer.encode_to_vec()
        })
    });
    group.finish();
}

fn schedule_generation(c: &mut Criterion) {
    let mut group = c.benchmark_group("schedule");
    // A year of 10-minute slots 08:00-20:00 every day in Rome: 26,352 slots, two DST changes.
    let year = schedule("2027-01-01", "2027-12-31", "08:00", "20:00", 10);
    let slots = year
        .plan(chrono_tz::Europe::Rome, 1_000_000)
        .expect("plan")
        .len() as u64;
    group.throughput(Throughput::Elements(slots));
    group.bench_function("plan_one_year_europe_rome", |b| {
        b.iter(|| year.plan(chrono_tz::Europe::Rome, 1_000_000).expect("plan"))
    });
    group.finish();
}

criterion_group!(
    benches,
    durable_bookings,
    durable_bookings_on_postgres,
    book_path_by_commit_mode,
    batch_size_bound,
    search_answer,
    schedule_generation
);
/// `criterion_main!`, with transparent huge pages off first, as the server's binary runs.
fn main() {
    if let Err(error) = prenota::allocator::turn_off_transparent_huge_pages() {
        eprintln!("transparent huge pages stay on: {error}");
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
