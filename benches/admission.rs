//! Slot-counter admission: the compare-and-swap every booking goes through; and a
//! search for free places over a sold-out range, which the per-day free places let
//! skip whole days; and the per-slot hold counts a statistics or open-data call reads
//! under the holds' lock. Run: `cargo bench --bench admission`. Numbers: BENCHMARKS.md.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prenota::domain::booking::RequestRecord;
use prenota::domain::catalog::{Catalog, NewSlot, SearchQuery, SearchScope, Site, Slot};
use prenota::domain::hold::{Hold, HoldState, LiveHolds};
use prenota::domain::ids::{
    BookingId, ChannelId, CitizenKey, RegionId, RequestFingerprint, RequestKey, ServiceId, SiteId,
    SlotKey,
};
use prenota::domain::slot_counter::{Group, SlotCounter};

/// A catalog day's part in a change (`domain::catalog::Day`) while nobody watches:
/// the sum of free places, and a look at the watchers' switch (on the catalog's board,
/// apart from the day).
#[derive(Debug, Default)]
struct UnwatchedDay {
    free: AtomicI64,
    watching: Arc<AtomicBool>,
}

impl Group for UnwatchedDay {
    fn add_free(&self, change: i64) {
        self.free.fetch_add(change, Ordering::AcqRel);
    }

    fn member_changed(&self, flag: &dyn Fn()) {
        if self.watching.load(Ordering::SeqCst) {
            flag();
        }
    }
}

/// Places per slot: large enough that the measured loop never sees a full slot.
const CAPACITY: u32 = prenota::domain::slot_counter::COUNTER_FIELD_MAX;

fn uncontended(c: &mut Criterion) {
    let mut group = c.benchmark_group("admission");
    group.throughput(Throughput::Elements(1));
    let counter = SlotCounter::new(CAPACITY, false);
    group.bench_function("take_release_one_slot_one_thread", |b| {
        b.iter(|| {
            if black_box(counter.try_take()).is_ok() {
                counter.settle();
            }
            let _ = black_box(counter.release());
        })
    });
    // As in the catalog: every change also adds to its day's free places, and asks the
    // day whether anyone watches (nobody here).
    let in_a_day = SlotCounter::in_group(CAPACITY, false, Arc::new(UnwatchedDay::default()));
    group.bench_function("take_release_one_slot_one_thread_in_a_day", |b| {
        b.iter(|| {
            if black_box(in_a_day.try_take()).is_ok() {
                in_a_day.settle();
            }
            let _ = black_box(in_a_day.release());
        })
    });
    let slots: Vec<SlotCounter> = (0..100_000)
        .map(|_| SlotCounter::new(CAPACITY, false))
        .collect();
    let mut index = 0usize;
    group.bench_function("take_release_100k_slots_one_thread", |b| {
        b.iter(|| {
            index = (index + 7_919) % slots.len();
            if black_box(slots[index].try_take()).is_ok() {
                slots[index].settle();
            }
            let _ = black_box(slots[index].release());
        })
    });
    group.finish();
}

/// Two threads hammering one hot slot: the worst case of an opening-morning rush.
fn one_hot_slot_two_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("admission");
    const PER_THREAD: u64 = 100_000;
    group.throughput(Throughput::Elements(2 * PER_THREAD));
    // In a group, as in the catalog (nobody watching).
    let counter = SlotCounter::in_group(CAPACITY, false, Arc::new(UnwatchedDay::default()));
    let counter = Arc::new(counter);
    group.bench_function("take_release_one_slot_two_threads", |b| {
        b.iter(|| {
            std::thread::scope(|scope| {
                for _ in 0..2 {
                    let counter = Arc::clone(&counter);
                    scope.spawn(move || {
                        for _ in 0..PER_THREAD {
                            if black_box(counter.try_take()).is_ok() {
                                counter.settle();
                            }
                            let _ = black_box(counter.release());
                        }
                    });
                }
            })
        })
    });
    group.finish();
}

/// A site with 100,000 one-place slots (274 a day for 365 days), every place taken.
fn sold_out_catalog() -> (Catalog, Vec<Arc<Slot>>, i64, i64) {
    let parse = |text: &str| SiteId::parse("site_id", text, 64).unwrap();
    let mut catalog = Catalog::default();
    catalog.upsert_site(Site {
        site_id: parse("bench"),
        name: "Bench".into(),
        region_id: RegionId::parse("region_id", "bench", 64).unwrap(),
        time_zone: chrono_tz::Europe::Rome,
    });
    let first = 1_893_488_400; // 2030-01-01T09:00:00Z
    let mut slots = Vec::new();
    for index in 0..100_000i64 {
        let start = first + (index / 274) * 86_400 + (index % 274) * 180;
        let key = SlotKey {
            site_id: parse("bench"),
            service_id: ServiceId::parse("service_id", "vax", 64).unwrap(),
            start_unix_s: start,
        };
        catalog
            .insert_slot(NewSlot {
                key: key.clone(),
                end_unix_s: start + 180,
                capacity: 1,
                closed: false,
            })
            .unwrap();
        let slot = Arc::clone(catalog.slot(&key).unwrap().1);
        drop(slot.try_take().unwrap());
        slots.push(slot);
    }
    (catalog, slots, first, first + 366 * 86_400)
}

/// `SearchSlots(only_available)` over 100k sold-out slots, against reading every slot's
/// counter (what the search did before the per-day free places).
fn sold_out_search(c: &mut Criterion) {
    let mut group = c.benchmark_group("search");
    let (catalog, slots, from, to) = sold_out_catalog();
    let query = SearchQuery {
        scope: SearchScope::Site(SiteId::parse("site_id", "bench", 64).unwrap()),
        service_id: ServiceId::parse("service_id", "vax", 64).unwrap(),
        from_unix_s: from,
        to_unix_s: to,
        only_available: true,
        after: None,
        page_size: 20,
        scan_max: usize::MAX,
    };
    group.bench_function("only_available_100k_sold_out_slots", |b| {
        b.iter(|| assert!(black_box(catalog.search(&query).unwrap()).slots.is_empty()))
    });
    let (site, vax) = (
        SiteId::parse("site_id", "bench", 64).unwrap(),
        query.service_id.clone(),
    );
    group.bench_function("slots_with_places_100k_sold_out_slots", |b| {
        b.iter(|| assert!(black_box(catalog.slots_with_places(&site, &vax, from)).is_empty()))
    });
    // What the campaign matcher read before: every slot of the range, then its counter.
    group.bench_function("slots_in_range_100k_then_their_counters", |b| {
        b.iter(|| {
            let slots = catalog.slots_in_range(&site, Some(&vax), from, i64::MAX);
            let free = slots
                .unwrap()
                .iter()
                .filter(|s| s.counter.snapshot().remaining() > 0)
                .count();
            assert_eq!(black_box(free), 0);
        })
    });
    group.bench_function("read_100k_slot_counters", |b| {
        b.iter(|| {
            let free = slots
                .iter()
                .filter(|s| s.counter.snapshot().remaining() > 0)
                .count();
            assert_eq!(black_box(free), 0);
        })
    });
    group.finish();
}

/// 100,000 live holds spread over 1,000 slots of one site (a rush's holds).
fn many_live_holds() -> LiveHolds {
    let site_id = SiteId::parse("site_id", "rome-1", 64).unwrap();
    let service_id = ServiceId::parse("service_id", "vax", 64).unwrap();
    let mut live = LiveHolds::default();
    for id in 0..100_000u32 {
        let slot = SlotKey {
            site_id: site_id.clone(),
            service_id: service_id.clone(),
            start_unix_s: 1_000_000 + i64::from(id % 1_000) * 600,
        };
        live.insert(Hold {
            hold_id: BookingId(u128::from(id)),
            slot,
            citizen: CitizenKey(id.to_le_bytes().repeat(4).try_into().unwrap()),
            created_at_unix_ms: 0,
            expires_at_unix_ms: 600_000,
            request: RequestRecord {
                key: RequestKey([0; 16]),
                fingerprint: RequestFingerprint([0; 16]),
            },
            state: HoldState::Live,
            channel: ChannelId::web(),
        });
    }
    live
}

fn hold_counts(c: &mut Criterion) {
    let mut group = c.benchmark_group("holds");
    let live = many_live_holds();
    group.bench_function("count_by_slot_everywhere_100k_holds_1000_slots", |b| {
        b.iter(|| assert_eq!(black_box(&live).count_by_slot_everywhere().len(), 1_000))
    });
    group.finish();
}

criterion_group!(
    benches,
    uncontended,
    one_hot_slot_two_threads,
    sold_out_search,
    hold_counts
);
criterion_main!(benches);
