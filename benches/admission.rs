//! Slot-counter admission: the compare-and-swap every booking goes through.
//! Run: `cargo bench --bench admission`. Numbers: BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prenota::domain::slot_counter::SlotCounter;

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
    let counter = Arc::new(SlotCounter::new(CAPACITY, false));
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

criterion_group!(benches, uncontended, one_hot_slot_two_threads);
criterion_main!(benches);
