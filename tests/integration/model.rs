//! Model-based property test: random sequences of book / hold / confirm / retry /
//! cancel / reschedule / set-capacity / close / expire / restart run against the engine
//! (real store, real restarts) and against a plain reference model. After every step
//! the outcome must be the one the model predicts, and the observable state (per-slot
//! counters, site statistics, the export of every booking) must equal the model's.
//!
//! `PRENOTA_MODEL_CASES` sets the number of sequences (default 24, for CI); soak runs
//! use e.g. `PRENOTA_MODEL_CASES=2000 cargo test --release --test integration model::`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use chrono::{Duration, Utc, Weekday};
use prenota::config::Config;
use prenota::domain::catalog::{SearchQuery, SearchScope, Site};
use prenota::domain::error::{DomainError, Missing};
use prenota::domain::ids::{
    BookingId, ChannelId, RegionId, RequestKey, ServiceId, SiteId, SlotKey,
};
use prenota::domain::schedule::{OpeningHours, Schedule};
use prenota::service::{
    Actor, BookCommand, CancelCommand, Clock, CloseCommand, Engine, ExportScope, HoldCommand,
    RescheduleCommand, ServiceError,
};
use proptest::prelude::*;

const SLOTS: usize = 3;
const CITIZENS: u8 = 4;
const INITIAL_CAPACITY: u32 = 2;

#[derive(Clone, Debug)]
enum Op {
    Book {
        citizen: u8,
        slot: usize,
    },
    Hold {
        citizen: u8,
        slot: usize,
    },
    Confirm {
        hold: usize,
        citizen: u8,
    },
    RetryBook {
        request: usize,
    },
    Cancel {
        booking: usize,
        citizen: u8,
    },
    Reschedule {
        booking: usize,
        slot: usize,
    },
    SetCapacity {
        slot: usize,
        capacity: u32,
    },
    /// Publishes the schedule again with another capacity per slot.
    Publish {
        capacity: u32,
    },
    Close {
        slot: usize,
    },
    ExpireHolds,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let citizen = 0..CITIZENS;
    let slot = 0..SLOTS;
    prop_oneof![
        4 => (citizen.clone(), slot.clone()).prop_map(|(citizen, slot)| Op::Book { citizen, slot }),
        2 => (citizen.clone(), slot.clone()).prop_map(|(citizen, slot)| Op::Hold { citizen, slot }),
        2 => (0..8usize, citizen.clone()).prop_map(|(hold, citizen)| Op::Confirm { hold, citizen }),
        1 => (0..8usize).prop_map(|request| Op::RetryBook { request }),
        2 => (0..8usize, citizen).prop_map(|(booking, citizen)| Op::Cancel { booking, citizen }),
        2 => (0..8usize, slot.clone()).prop_map(|(booking, slot)| Op::Reschedule { booking, slot }),
        1 => (slot.clone(), 0..4u32).prop_map(|(slot, capacity)| Op::SetCapacity { slot, capacity }),
        1 => (0..4u32).prop_map(|capacity| Op::Publish { capacity }),
        1 => slot.prop_map(|slot| Op::Close { slot }),
        1 => Just(Op::ExpireHolds),
        1 => Just(Op::Restart),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HoldState {
    Live,
    Confirmed,
    Expired,
}

/// The reference: what a booking service must do, with no concurrency, no store.
#[derive(Default)]
struct Model {
    capacity: [u32; SLOTS],
    closed: [bool; SLOTS],
    /// Booking id → (citizen, slot, confirmed).
    bookings: Vec<(BookingId, u8, usize, bool)>,
    /// Hold id → (citizen, slot, state).
    holds: Vec<(BookingId, u8, usize, HoldState)>,
    /// Plain Book requests: (request id, citizen, slot, the booking it made).
    book_requests: Vec<(String, u8, usize, Option<BookingId>)>,
}

impl Model {
    fn taken(&self, slot: usize) -> u32 {
        let booked = self.bookings.iter().filter(|b| b.2 == slot && b.3).count();
        let held = self
            .holds
            .iter()
            .filter(|h| h.2 == slot && h.3 == HoldState::Live)
            .count();
        (booked + held) as u32
    }

    /// One active booking or live hold per citizen (one service here).
    fn active(&self, citizen: u8) -> bool {
        self.bookings.iter().any(|b| b.1 == citizen && b.3)
            || self
                .holds
                .iter()
                .any(|h| h.1 == citizen && h.3 == HoldState::Live)
    }

    /// The refusal a new booking or hold of `citizen` in `slot` gets, in the engine's
    /// order of checks (citizen limit, closed, full).
    fn admission(&self, citizen: u8, slot: usize) -> Result<(), &'static str> {
        if self.active(citizen) {
            Err("CITIZEN_ALREADY_BOOKED")
        } else if self.closed[slot] {
            Err("SLOT_CLOSED")
        } else if self.taken(slot) >= self.capacity[slot] {
            Err("SLOT_FULL")
        } else {
            Ok(())
        }
    }
}

fn reason(error: &ServiceError) -> &'static str {
    match error {
        ServiceError::Domain(DomainError::SlotFull(_)) => "SLOT_FULL",
        ServiceError::Domain(DomainError::SlotClosed(_)) => "SLOT_CLOSED",
        ServiceError::Domain(DomainError::CitizenAlreadyBooked { .. }) => "CITIZEN_ALREADY_BOOKED",
        ServiceError::Domain(DomainError::HoldExpired) => "HOLD_EXPIRED",
        ServiceError::Domain(DomainError::HoldLimitReached(_)) => "HOLD_LIMIT_REACHED",
        ServiceError::Domain(DomainError::NotFound(Missing::Hold)) => "HOLD_NOT_FOUND",
        ServiceError::Domain(DomainError::NotFound(Missing::Booking)) => "BOOKING_NOT_FOUND",
        ServiceError::Domain(DomainError::BookingNotActive(_)) => "BOOKING_NOT_ACTIVE",
        ServiceError::Domain(DomainError::CapacityBelowBooked { .. }) => "CAPACITY_BELOW_BOOKED",
        ServiceError::Domain(DomainError::Invalid(_)) => "INVALID_ARGUMENT",
        other => panic!("an error the model never expects: {other:?}"),
    }
}

fn citizen_id(citizen: u8) -> String {
    format!("citizen-{citizen}")
}

fn config() -> Config {
    let mut config = Config::default();
    config.limits.rate_citizen_attempts_per_min = 0; // sequences are short; no limit
    config
}

struct Harness {
    engine: Option<Arc<Engine>>,
    schedule: Schedule,
    dir: tempfile::TempDir,
    slots: Vec<SlotKey>,
    site_id: SiteId,
    requests: usize,
}

impl Harness {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(Engine::open(dir.path(), &config(), Clock::system()).unwrap());
        let site_id = SiteId::parse("site_id", "model", 64).unwrap();
        let service = ServiceId::parse("service_id", "vax", 64).unwrap();
        engine
            .upsert_site(
                Site {
                    site_id: site_id.clone(),
                    name: "Model".into(),
                    region_id: RegionId::parse("region_id", "r", 64).unwrap(),
                    time_zone: chrono_tz::Etc::UTC,
                },
                &Actor::everywhere("model"),
            )
            .await
            .unwrap();
        let day = (Utc::now() + Duration::days(30)).date_naive();
        let minute_of_day = |h: u32, m: u32| h * 60 + m;
        let schedule = Schedule {
            first_day: day,
            last_day: day,
            opening_hours: [
                Weekday::Mon,
                Weekday::Tue,
                Weekday::Wed,
                Weekday::Thu,
                Weekday::Fri,
                Weekday::Sat,
                Weekday::Sun,
            ]
            .into_iter()
            .map(|weekday| OpeningHours {
                weekday,
                opens: minute_of_day(10, 0),
                closes: minute_of_day(11, 30),
            })
            .collect(),
            slot_minutes: 30,
            capacity_per_slot: INITIAL_CAPACITY,
        };
        engine
            .publish_schedule(&site_id, &service, &schedule, &Actor::everywhere("model"))
            .await
            .unwrap();
        let service_id = service.clone();
        let page = engine
            .search(&SearchQuery {
                scope: SearchScope::Site(site_id.clone()),
                service_id,
                from_unix_s: 0,
                to_unix_s: i64::MAX / 2,
                only_available: false,
                after: None,
                page_size: 100,
                scan_max: 10_000,
            })
            .unwrap();
        let slots: Vec<SlotKey> = page.slots.iter().map(|(_, s)| s.key()).collect();
        assert_eq!(slots.len(), SLOTS);
        Self {
            engine: Some(engine),
            schedule,
            dir,
            slots,
            site_id,
            requests: 0,
        }
    }

    fn engine(&self) -> &Arc<Engine> {
        self.engine.as_ref().unwrap()
    }

    fn request(&mut self) -> (String, RequestKey) {
        self.requests += 1;
        let id = format!("request-{}", self.requests);
        let key = RequestKey::parse("request_id", &id, 128).unwrap();
        (id, key)
    }

    fn restart(&mut self) {
        let engine = self.engine.take().unwrap();
        let mut engine = Arc::try_unwrap(engine)
            .unwrap_or_else(|_| panic!("nothing else holds the engine between steps"));
        engine.shutdown().expect("a clean shutdown");
        drop(engine);
        self.engine = Some(Arc::new(reopen(self.dir.path())));
    }
}

fn reopen(dir: &Path) -> Engine {
    Engine::open(dir, &config(), Clock::system()).unwrap()
}

/// Applies one step to the engine and the model; panics when they disagree.
async fn step(h: &mut Harness, m: &mut Model, op: &Op) {
    let engine = Arc::clone(h.engine());
    match *op {
        Op::Book { citizen, slot } => {
            let (id, request) = h.request();
            let expected = m.admission(citizen, slot);
            let got = engine
                .book(BookCommand {
                    slot: h.slots[slot].clone(),
                    citizen_id: citizen_id(citizen),
                    request,
                    hold_id: None,
                    channel: ChannelId::web(),
                })
                .await;
            let made = check(&got.as_ref().map(|_| ()), expected.map(|_| ()), op);
            let booking_id = made.then(|| got.unwrap().booking.booking_id);
            if let Some(booking_id) = booking_id {
                m.bookings.push((booking_id, citizen, slot, true));
            }
            m.book_requests.push((id, citizen, slot, booking_id));
        }
        Op::Hold { citizen, slot } => {
            let (_, request) = h.request();
            let held = m
                .holds
                .iter()
                .filter(|h| h.2 == slot && h.3 == HoldState::Live)
                .count() as u32;
            let share = config().limits.held_share_of_capacity_max_percent;
            let expected = m.admission(citizen, slot).and_then(|()| {
                match held < prenota::domain::hold::held_max(m.capacity[slot], share) {
                    true => Ok(()),
                    false => Err("HOLD_LIMIT_REACHED"),
                }
            });
            let got = engine
                .hold(HoldCommand {
                    slot: h.slots[slot].clone(),
                    citizen_id: citizen_id(citizen),
                    request,
                    ttl_seconds: 600,
                    channel: ChannelId::web(),
                })
                .await;
            if check(&got.as_ref().map(|_| ()), expected, op) {
                m.holds
                    .push((got.unwrap().hold_id, citizen, slot, HoldState::Live));
            }
        }
        Op::Confirm { hold, citizen } => {
            let Some(&(hold_id, owner, slot, state)) = m.holds.get(hold) else {
                return;
            };
            let (_, request) = h.request();
            let expected = match (owner == citizen, state) {
                (true, HoldState::Live) => Ok(()),
                // Holding again would meet the closed slot too.
                (true, HoldState::Expired) if m.closed[slot] => Err("SLOT_CLOSED"),
                (true, HoldState::Expired) => Err("HOLD_EXPIRED"),
                _ => Err("HOLD_NOT_FOUND"),
            };
            let got = engine
                .book(BookCommand {
                    slot: h.slots[slot].clone(),
                    citizen_id: citizen_id(citizen),
                    request,
                    hold_id: Some(hold_id),
                    channel: ChannelId::web(),
                })
                .await;
            if check(&got.as_ref().map(|_| ()), expected, op) {
                assert_eq!(
                    got.unwrap().booking.booking_id,
                    hold_id,
                    "a hold books under its id"
                );
                m.holds[hold].3 = HoldState::Confirmed;
                m.bookings.push((hold_id, citizen, slot, true));
            }
        }
        Op::RetryBook { request } => {
            let Some((id, citizen, slot, made)) = m.book_requests.get(request).cloned() else {
                return;
            };
            let key = RequestKey::parse("request_id", &id, 128).unwrap();
            let got = engine
                .book(BookCommand {
                    slot: h.slots[slot].clone(),
                    citizen_id: citizen_id(citizen),
                    request: key,
                    hold_id: None,
                    channel: ChannelId::web(),
                })
                .await;
            match made {
                // A retry of a booking returns that booking, whatever became of it.
                Some(booking_id) => {
                    let view = got.unwrap_or_else(|e| panic!("{op:?}: retry refused: {e:?}"));
                    assert_eq!(view.booking.booking_id, booking_id, "{op:?}");
                }
                // A refused request is not remembered: it is evaluated again.
                None => {
                    let expected = m.admission(citizen, slot);
                    if check(&got.as_ref().map(|_| ()), expected, op) {
                        let booking_id = got.unwrap().booking.booking_id;
                        m.bookings.push((booking_id, citizen, slot, true));
                        m.book_requests[request].3 = Some(booking_id);
                    }
                }
            }
        }
        Op::Cancel { booking, citizen } => {
            let Some(&(booking_id, owner, _, confirmed)) = m.bookings.get(booking) else {
                return;
            };
            let (_, request) = h.request();
            let expected = match (owner == citizen, confirmed) {
                (false, _) => Err("BOOKING_NOT_FOUND"),
                (true, false) => Err("BOOKING_NOT_ACTIVE"),
                (true, true) => Ok(()),
            };
            let got = engine
                .cancel(CancelCommand {
                    booking_id,
                    citizen_id: citizen_id(citizen),
                    request,
                })
                .await;
            if check(&got.as_ref().map(|_| ()), expected, op) {
                m.bookings[booking].3 = false;
            }
        }
        Op::Reschedule { booking, slot } => {
            let Some(&(booking_id, owner, old_slot, confirmed)) = m.bookings.get(booking) else {
                return;
            };
            let (_, request) = h.request();
            let expected = if !confirmed {
                Err("BOOKING_NOT_ACTIVE")
            } else if slot == old_slot {
                Err("INVALID_ARGUMENT")
            } else if m.closed[slot] {
                Err("SLOT_CLOSED")
            } else if m.taken(slot) >= m.capacity[slot] {
                Err("SLOT_FULL")
            } else {
                Ok(())
            };
            let got = engine
                .reschedule(RescheduleCommand {
                    booking_id,
                    citizen_id: citizen_id(owner),
                    new_slot: h.slots[slot].clone(),
                    request,
                    channel: ChannelId::web(),
                })
                .await;
            if check(&got.as_ref().map(|_| ()), expected, op) {
                m.bookings[booking].3 = false;
                m.bookings
                    .push((got.unwrap().booking.booking_id, owner, slot, true));
            }
        }
        Op::SetCapacity { slot, capacity } => {
            let expected = if capacity < m.taken(slot) {
                Err("CAPACITY_BELOW_BOOKED")
            } else {
                Ok(())
            };
            let got = engine
                .set_slot_capacity(&h.slots[slot], capacity, None, &Actor::everywhere("model"))
                .await;
            if check(&got.as_ref().map(|_| ()), expected, op) {
                m.capacity[slot] = capacity;
                m.closed[slot] = false;
            }
        }
        Op::Publish { capacity } => {
            // Closed slots keep their capacity and stay closed; the others must all fit.
            let expected = if (0..SLOTS).any(|s| !m.closed[s] && m.taken(s) > capacity) {
                Err("CAPACITY_BELOW_BOOKED")
            } else {
                Ok(())
            };
            let schedule = Schedule {
                capacity_per_slot: capacity,
                ..h.schedule.clone()
            };
            let service = ServiceId::parse("service_id", "vax", 64).unwrap();
            let got = engine
                .publish_schedule(&h.site_id, &service, &schedule, &Actor::everywhere("model"))
                .await;
            if check(&got.as_ref().map(|_| ()), expected, op) {
                for s in (0..SLOTS).filter(|&s| !m.closed[s]) {
                    m.capacity[s] = capacity;
                }
            }
        }
        Op::Close { slot } => {
            let start = h.slots[slot].start_unix_s;
            let outcome = engine
                .close_slots(
                    CloseCommand {
                        site_id: h.site_id.clone(),
                        service_id: None,
                        from_unix_s: start,
                        to_unix_s: start + 1,
                        reason: "model closure".into(),
                        request: None,
                    },
                    &Actor::everywhere("model"),
                )
                .await
                .unwrap_or_else(|e| panic!("{op:?}: {e:?}"));
            let cancelled = m.bookings.iter().filter(|b| b.2 == slot && b.3).count();
            let expired = m
                .holds
                .iter()
                .filter(|h| h.2 == slot && h.3 == HoldState::Live)
                .count();
            assert_eq!(outcome.cancelled_bookings as usize, cancelled, "{op:?}");
            assert_eq!(outcome.expired_holds as usize, expired, "{op:?}");
            for booking in m.bookings.iter_mut().filter(|b| b.2 == slot) {
                booking.3 = false;
            }
            for hold in m.holds.iter_mut().filter(|h| h.2 == slot) {
                if hold.3 == HoldState::Live {
                    hold.3 = HoldState::Expired;
                }
            }
            m.closed[slot] = true;
        }
        Op::ExpireHolds => {
            let later = engine.clock().now_unix_ms() + 3_600_000;
            let expired = engine.expire_holds(later).await.unwrap();
            let live = m.holds.iter().filter(|h| h.3 == HoldState::Live).count();
            assert_eq!(expired, live, "{op:?}");
            for hold in m.holds.iter_mut() {
                if hold.3 == HoldState::Live {
                    hold.3 = HoldState::Expired;
                }
            }
        }
        Op::Restart => {
            drop(engine);
            h.restart();
        }
    }
}

/// Compares an outcome with the model's; `true` when both succeeded.
fn check(got: &Result<(), &ServiceError>, expected: Result<(), &str>, op: &Op) -> bool {
    match (got, expected) {
        (Ok(()), Ok(())) => true,
        (Err(error), Err(reason_expected)) => {
            assert_eq!(reason(error), reason_expected, "{op:?}");
            false
        }
        (got, expected) => panic!("{op:?}: the engine answered {got:?}, the model {expected:?}"),
    }
}

/// The observable state must be the model's: counters, statistics and the export.
async fn compare(h: &Harness, m: &Model) {
    let engine = h.engine();
    let page = engine
        .search(&SearchQuery {
            scope: SearchScope::Site(h.site_id.clone()),
            service_id: ServiceId::parse("service_id", "vax", 64).unwrap(),
            from_unix_s: 0,
            to_unix_s: i64::MAX / 2,
            only_available: false,
            after: None,
            page_size: 100,
            scan_max: 10_000,
        })
        .unwrap();
    for (index, (_, slot)) in page.slots.iter().enumerate() {
        let counter = slot.counter.snapshot();
        assert_eq!(counter.capacity, m.capacity[index], "slot {index} capacity");
        assert_eq!(counter.taken, m.taken(index), "slot {index} taken");
        assert_eq!(counter.closed, m.closed[index], "slot {index} closed");
        assert_eq!(
            counter.pending, 0,
            "slot {index}: an admission never settled"
        );
        assert!(m.closed[index] || counter.taken <= counter.capacity);
    }
    let (_, stats) = engine.site_stats(&h.site_id).unwrap();
    let confirmed = m.bookings.iter().filter(|b| b.3).count() as u64;
    let live = m.holds.iter().filter(|h| h.3 == HoldState::Live).count() as u64;
    assert_eq!(stats.totals.booked, confirmed, "booked");
    assert_eq!(stats.totals.held, live, "held");
    let open_capacity: u64 = (0..SLOTS)
        .filter(|&s| !m.closed[s])
        .map(|s| u64::from(m.capacity[s]))
        .sum();
    assert_eq!(stats.totals.capacity, open_capacity, "capacity");
    let mut exported = HashMap::new();
    let mut stream = engine.export_bookings(ExportScope::All, None);
    while let Some(item) = futures::StreamExt::next(&mut stream).await {
        let view = item.unwrap();
        exported.insert(view.booking.booking_id, view.booking.is_confirmed());
    }
    assert_eq!(exported.len(), m.bookings.len(), "exported bookings");
    for (booking_id, _, _, confirmed) in &m.bookings {
        assert_eq!(
            exported.get(booking_id),
            Some(confirmed),
            "booking {booking_id}"
        );
    }
    for citizen in 0..CITIZENS {
        let active = m.bookings.iter().filter(|b| b.1 == citizen && b.3).count()
            + m.holds
                .iter()
                .filter(|h| h.1 == citizen && h.3 == HoldState::Live)
                .count();
        assert!(active <= 1, "citizen {citizen} has {active} active entries");
    }
}

fn cases() -> u32 {
    std::env::var("PRENOTA_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_engine_behaves_like_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut harness = Harness::new().await;
            let mut model = Model {
                capacity: [INITIAL_CAPACITY; SLOTS],
                ..Model::default()
            };
            compare(&harness, &model).await;
            for op in &ops {
                step(&mut harness, &mut model, op).await;
                compare(&harness, &model).await;
            }
            harness.restart();
            compare(&harness, &model).await;
        });
    }
}
