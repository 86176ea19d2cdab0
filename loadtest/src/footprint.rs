//! `footprint`: resident memory of the in-memory state per slot and per booking, and
//! start-up recovery time, measured on the library directly (no network).

use std::path::Path;
use std::time::Instant;

use prenota::config::Config;
use prenota::domain::booking::{Booking, BookingState, RequestRecord};
use prenota::domain::catalog::{Catalog, NewSlot, Site};
use prenota::domain::citizens::{CitizenIndex, Entry};
use prenota::domain::ids::{
    BookingId, CitizenKey, RegionId, RequestFingerprint, RequestKey, ServiceId, SiteId, SlotKey,
};
use prenota::service::requests::RequestRegistry;
use prenota::service::{Actor, Clock, CloseCommand, Engine};
use prenota::store::records::{SiteRecord, SlotRecord, Write};
use prenota::store::size_hint::IndexSizes;
use prenota::store::Store;

/// The recovery store's first slot starts at (2030).
const FIRST_START_UNIX_S: i64 = 1_900_000_000;

/// Slots per site, like a year of a large vaccination hub.
const SLOTS_PER_SITE: u64 = 100_000;
/// Writes per commit while building the recovery store: batches of tens of thousands make
/// sled 0.34 hold gigabytes (3.2 GB for 1M bookings at 20,000), which the server never does.
const BUILD_BATCH: usize = 1_000;

/// Resident set size of this process, from /proc (Linux).
/// This process's resident memory.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1_024
}

fn id<T>(
    parse: fn(&str, &str, usize) -> Result<T, prenota::domain::error::FieldViolation>,
    value: &str,
) -> Result<T, String> {
    parse("id", value, 64).map_err(|v| v.description)
}

fn site(index: u64) -> Result<Site, String> {
    Ok(Site {
        site_id: id(SiteId::parse, &format!("site-{index}"))?,
        name: format!("Site {index}"),
        region_id: id(RegionId::parse, "region")?,
        time_zone: chrono_tz::Europe::Rome,
    })
}

fn booking(booking_id: u128, slot: SlotKey, citizen: [u8; 16]) -> Booking {
    Booking {
        booking_id: BookingId(booking_id),
        end_unix_s: slot.start_unix_s + 600,
        slot,
        citizen: CitizenKey(citizen),
        created_at_unix_ms: 0,
        request: RequestRecord {
            key: RequestKey(citizen),
            fingerprint: RequestFingerprint([0; 16]),
        },
        state: BookingState::Confirmed,
        channel: prenota::domain::ids::ChannelId::web(),
        codes: Some(prenota::domain::booking::BookingCodes {
            reference: prenota::domain::booking::Reference::from_bits(booking_id as u64),
            check_in_code: 1234,
        }),
        series: None,
    }
}

/// Catalog bytes per slot. The catalog is returned so the caller keeps it alive while
/// measuring the next phase: freed memory would be reused and hide that phase's growth.
pub fn slots(count: u64) -> Result<(f64, Catalog), String> {
    let service = id(ServiceId::parse, "covid19-dose1")?;
    let before = rss_bytes();
    let mut catalog = Catalog::default();
    for site_index in 0..count.div_ceil(SLOTS_PER_SITE) {
        let site = site(site_index)?;
        let site_id = site.site_id.clone();
        catalog.upsert_site(site);
        for slot in 0..SLOTS_PER_SITE.min(count - site_index * SLOTS_PER_SITE) {
            let key = SlotKey {
                site_id: site_id.clone(),
                service_id: service.clone(),
                start_unix_s: FIRST_START_UNIX_S + 600 * slot as i64,
            };
            catalog
                .insert_slot(NewSlot {
                    key,
                    end_unix_s: 0,
                    capacity: 100,
                    closed: false,
                })
                .map_err(|e| e.to_string())?;
        }
    }
    let per_slot = (rss_bytes().saturating_sub(before)) as f64 / count as f64;
    Ok((per_slot, catalog))
}

/// Citizen index + idempotency registry bytes per booking (returned alive, as above).
pub fn bookings(count: u64) -> Result<(f64, CitizenIndex, RequestRegistry), String> {
    let service = id(ServiceId::parse, "covid19-dose1")?;
    let before = rss_bytes();
    let citizens = CitizenIndex::default();
    let requests = RequestRegistry::default();
    for index in 0..count {
        let citizen: [u8; 16] = rand_bytes(index);
        let entry = Entry::new(BookingId(u128::from(index)), i64::MAX);
        citizens.insert(CitizenKey(citizen), &service, entry, 0);
        requests.insert_recovered(
            RequestKey(citizen),
            RequestFingerprint([1; 16]),
            BookingId(u128::from(index)),
            0,
        );
    }
    let per_booking = (rss_bytes().saturating_sub(before)) as f64 / count as f64;
    Ok((per_booking, citizens, requests))
}

/// Distinct, well-spread 16 bytes for `index` (what an HMAC or SHA-256 would give).
fn rand_bytes(index: u64) -> [u8; 16] {
    let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = [0u8; 16];
    for chunk in out.chunks_mut(8) {
        x ^= x >> 33;
        x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        x ^= x >> 29;
        chunk.copy_from_slice(&x.to_be_bytes());
    }
    out
}

/// Marks a store `recovery` built and may reuse: its content is the number of bookings.
const BUILT_MARKER: &str = "footprint-bookings";

/// What `recovery` measured.
pub struct Recovered {
    pub seconds: f64,
    /// The bookings the data dir's size hint (`store::size_hint`) named before the
    /// recovery (0: none, as for a store never recovered; the server logs whether it used
    /// one).
    pub hinted_bookings: u64,
    /// The process's resident MiB afterwards (sled's page cache included).
    pub rss_mib: f64,
    /// One retention pass over the recovered store, whose slots are all kept (they
    /// start in 2030): what a pass costs a server that has nothing to delete.
    pub retention_seconds: f64,
    /// `CloseSlots` of one slot of the recovered store (not on a kept store, which
    /// would then differ from run to run).
    pub closure_seconds: Option<f64>,
}

/// Builds a store with `bookings` confirmed bookings (in `keep`, when given, unless it
/// already holds one `recovery` built with as many), then times `Engine::open`, a
/// retention pass and (on a temporary store) a closure of its first slot.
pub fn recovery(bookings: u64, keep: Option<&Path>) -> Result<Recovered, String> {
    let temporary = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = keep.unwrap_or(temporary.path());
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let marker = dir.join(BUILT_MARKER);
    let built = std::fs::read_to_string(&marker).ok();
    if built.as_deref() == Some(bookings.to_string().as_str()) {
        println!(
            "  reusing the store of {bookings} bookings in {}",
            dir.display()
        );
    } else if let Some(count) = built {
        return Err(format!(
            "{} holds a store of {count} bookings, not {bookings}: give an empty directory",
            dir.display()
        ));
    } else {
        build(dir, bookings)?;
        std::fs::write(&marker, bookings.to_string()).map_err(|e| e.to_string())?;
    }
    let hinted_bookings = IndexSizes::read(dir, u64::MAX).bookings;
    let started = Instant::now();
    let engine =
        Engine::open(dir, &Config::default(), Clock::system()).map_err(|e| e.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    let rss_mib = rss_bytes() as f64 / (1024.0 * 1024.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let engine = std::sync::Arc::new(engine);
    let retention_seconds = retention_pass(&runtime, &engine)?;
    let closure_seconds = match keep {
        None => Some(close_first_slot(&runtime, &engine, bookings.min(100))?),
        Some(_) => None,
    };
    Ok(Recovered {
        seconds,
        hinted_bookings,
        rss_mib,
        retention_seconds,
        closure_seconds,
    })
}

/// Times one retention pass, and checks it deleted nothing (every slot is kept).
fn retention_pass(
    runtime: &tokio::runtime::Runtime,
    engine: &std::sync::Arc<Engine>,
) -> Result<f64, String> {
    let started = Instant::now();
    let retained = runtime
        .block_on(engine.retain())
        .map_err(|e| format!("a retention pass: {e:?}"))?;
    let seconds = started.elapsed().as_secs_f64();
    if retained.bookings != 0 || retained.slots != 0 {
        return Err(format!(
            "a retention pass deleted kept records: {retained:?}"
        ));
    }
    Ok(seconds)
}

/// Times `CloseSlots` of the store's first slot, which has `booked` bookings, and
/// checks it cancelled them all.
fn close_first_slot(
    runtime: &tokio::runtime::Runtime,
    engine: &std::sync::Arc<Engine>,
    booked: u64,
) -> Result<f64, String> {
    let close = CloseCommand {
        site_id: id(SiteId::parse, "site-0")?,
        service_id: None,
        from_unix_s: FIRST_START_UNIX_S,
        to_unix_s: FIRST_START_UNIX_S + 1,
        reason: "footprint".into(),
        request: None,
    };
    let started = Instant::now();
    let outcome = runtime
        .block_on(engine.close_slots(close, &Actor::everywhere("footprint")))
        .map_err(|e| format!("closing a slot: {e:?}"))?;
    let seconds = started.elapsed().as_secs_f64();
    if u64::from(outcome.cancelled_bookings) != booked {
        return Err(format!(
            "closing a slot of {booked} bookings cancelled {}",
            outcome.cancelled_bookings
        ));
    }
    Ok(seconds)
}

/// Writes a store of `bookings` confirmed bookings, 100 to a slot, into `dir`.
fn build(dir: &Path, bookings: u64) -> Result<(), String> {
    // A store without its citizen-hash key is refused at start-up: write the key first,
    // as a new server does.
    prenota::store::key_file::create(dir).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let service = id(ServiceId::parse, "covid19-dose1")?;
    let capacity_per_slot: u32 = 100;
    let slots = bookings.div_ceil(u64::from(capacity_per_slot));
    let build_started = Instant::now();
    runtime.block_on(async {
        let mut store = Store::open(dir, &Config::default().limits).map_err(|e| e.to_string())?;
        let mut writes = Vec::with_capacity(BUILD_BATCH);
        for site_index in 0..slots.div_ceil(SLOTS_PER_SITE) {
            let site = site(site_index)?;
            writes.push(Write::Site(SiteRecord {
                site_id: site.site_id.clone(),
                name: site.name,
                region_id: site.region_id,
                time_zone: "Europe/Rome".into(),
            }));
        }
        for slot in 0..slots {
            let key = SlotKey {
                site_id: id(SiteId::parse, &format!("site-{}", slot / SLOTS_PER_SITE))?,
                service_id: service.clone(),
                start_unix_s: FIRST_START_UNIX_S + 600 * (slot % SLOTS_PER_SITE) as i64,
            };
            writes.push(Write::Slot(SlotRecord {
                key: key.clone(),
                end_unix_s: key.start_unix_s + 600,
                capacity: capacity_per_slot,
                closed: false,
            }));
            for place in 0..u64::from(capacity_per_slot) {
                let index = slot * u64::from(capacity_per_slot) + place;
                if index >= bookings {
                    break;
                }
                writes.push(Write::Booking(booking(
                    u128::from(index) + 1,
                    key.clone(),
                    rand_bytes(index),
                )));
            }
            if writes.len() >= BUILD_BATCH {
                store.commit(&writes).await.map_err(|e| e.to_string())?;
                writes.clear();
            }
        }
        store.commit(&writes).await.map_err(|e| e.to_string())?;
        store.shutdown().map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    })?;
    // What a server that took these bookings leaves at shutdown and after each
    // retention pass (their requests, made in 1970, are past remembering).
    let sizes = IndexSizes {
        bookings,
        citizens: bookings,
        requests: 0,
    };
    sizes.write(dir).map_err(|e| e.to_string())?;
    println!(
        "  built a store of {bookings} bookings in {slots} slots in {:.1} s",
        build_started.elapsed().as_secs_f64()
    );
    Ok(())
}
