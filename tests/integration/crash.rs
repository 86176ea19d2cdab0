//! A real `prenota serve` child process is killed with SIGKILL while clients book.
//! After each restart every acknowledged booking must be in `ExportBookings`, no slot
//! may be over capacity, no citizen over the limit, and retrying the requests that got
//! no answer must never book twice; and the event log (`WatchEvents`) must hold exactly
//! one event per stored change, gapless, the same from wherever it is resumed.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::child::ChildServer;
use common::*;
use prenota::proto;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use tonic::Code;

/// The largest capacity a slot may have; a cycle books at most about 80 places, so
/// each slot has room for this many cycles.
const CAPACITY_PER_SLOT: u32 = 10_000;
const CYCLES_PER_SLOT: usize = 125;
/// Slots of 10 minutes from 08:00 to at most 23:00: room for 11,250 cycles.
const SLOTS_MAX: usize = 90;
const CLIENTS: usize = 16;
/// Kill cycles; `PRENOTA_CRASH_CYCLES` sets more for soak runs.
const CYCLES_DEFAULT: usize = 20;
/// The kill comes after a random number of acknowledgements in this range, plus a
/// random pause of up to `KILL_JITTER_MS`: anywhere in a commit's life.
const ACKS_BEFORE_KILL: std::ops::Range<usize> = 5..80;
const KILL_JITTER_MS: u64 = 15;

fn cycles() -> usize {
    std::env::var("PRENOTA_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CYCLES_DEFAULT)
}

/// Slots enough for `cycles` kill cycles of bookings (at least 4, so clients spread).
fn slots_for(cycles: usize) -> usize {
    let slots = cycles.div_ceil(CYCLES_PER_SLOT).max(4);
    assert!(
        slots <= SLOTS_MAX,
        "at most {} cycles fit one day of slots",
        SLOTS_MAX * CYCLES_PER_SLOT
    );
    slots
}

/// One citizen's booking attempt and what the client learnt about it.
#[derive(Clone)]
struct Attempt {
    citizen: String,
    request_id: String,
    slot_id: String,
}

/// A cancel that got no answer: its booking may be cancelled or not.
#[derive(Clone)]
struct UnansweredCancel {
    booking_id: String,
    citizen: String,
    request_id: String,
}

/// What the clients were told, across cycles.
#[derive(Default)]
struct Told {
    /// booking_id → citizen, for every acknowledged booking.
    booked: HashMap<String, String>,
    /// Bookings whose cancel was acknowledged.
    cancelled: HashSet<String>,
    unanswered_books: Vec<Attempt>,
    unanswered_cancels: Vec<UnansweredCancel>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_booking() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(dir.path());
    let channel = connect(&server.url).await;
    let slots = slots_for(cycles());
    let slot_ids =
        ten_minute_slots(channel, ("crash", day_ahead(40)), slots, CAPACITY_PER_SLOT).await;

    let told: Arc<Mutex<Told>> = Arc::default();
    let mut server = Some(server);
    let mut next_citizen = 0usize;
    let cycles = cycles();

    for cycle in 0..cycles {
        let running = server
            .take()
            .unwrap_or_else(|| ChildServer::start(dir.path()));
        let cycle_acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut clients = Vec::new();
        for client_index in 0..CLIENTS {
            let mut client = BookingServiceClient::new(connect(&running.url).await);
            let told = Arc::clone(&told);
            let cycle_acks = Arc::clone(&cycle_acks);
            let slot_ids = slot_ids.clone();
            let first_citizen = next_citizen + client_index * 1_000;
            clients.push(tokio::spawn(async move {
                let mut previous: Option<(String, String)> = None; // (booking, citizen)
                for n in 0..1_000 {
                    let citizen = first_citizen + n;
                    let attempt = Attempt {
                        citizen: format!("citizen-{citizen}"),
                        request_id: format!("request-{citizen}"),
                        slot_id: slot_ids[citizen % slot_ids.len()].clone(),
                    };
                    let request =
                        book_request(&attempt.slot_id, &attempt.citizen, &attempt.request_id);
                    match client.book(request).await {
                        Ok(response) => {
                            let booking = response.into_inner().booking.unwrap();
                            told.lock()
                                .unwrap()
                                .booked
                                .insert(booking.booking_id.clone(), attempt.citizen.clone());
                            cycle_acks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            previous = Some((booking.booking_id, attempt.citizen));
                        }
                        Err(status) if status.code() == Code::FailedPrecondition => {} // full
                        Err(_) => {
                            // The server died under this request: its outcome is unknown.
                            told.lock().unwrap().unanswered_books.push(attempt);
                            return;
                        }
                    }
                    // Every third citizen cancels right after booking: places come back.
                    if n % 3 == 0 {
                        let Some((booking_id, citizen)) = previous.take() else {
                            continue;
                        };
                        let cancel = UnansweredCancel {
                            request_id: format!("cancel-{booking_id}"),
                            booking_id,
                            citizen,
                        };
                        let sent = client
                            .cancel_booking(proto::CancelBookingRequest {
                                booking_id: cancel.booking_id.clone(),
                                citizen_id: cancel.citizen.clone(),
                                request_id: cancel.request_id.clone(),
                            })
                            .await;
                        match sent {
                            Ok(_) => {
                                told.lock().unwrap().cancelled.insert(cancel.booking_id);
                            }
                            Err(_) => {
                                told.lock().unwrap().unanswered_cancels.push(cancel);
                                return;
                            }
                        }
                    }
                }
            }));
        }
        next_citizen += CLIENTS * 1_000;
        let kill_after = rand::random_range(ACKS_BEFORE_KILL);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while cycle_acks.load(std::sync::atomic::Ordering::SeqCst) < kill_after
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..KILL_JITTER_MS))).await;
        running.kill_9();
        for client in clients {
            client.await.unwrap();
        }
        assert!(
            cycle_acks.load(std::sync::atomic::Ordering::SeqCst) >= kill_after,
            "cycle {cycle}: the clients never got going"
        );

        let restarted = ChildServer::start(dir.path());
        let exported = export_all(connect(&restarted.url).await).await;
        verify(cycle, &exported, &told.lock().unwrap(), &slot_ids);
        verify_events(cycle, &restarted.url, &exported).await;

        // Retry every request that got no answer: each resolves to at most one booking,
        // and a retried cancel leaves its booking cancelled.
        let mut client = BookingServiceClient::new(connect(&restarted.url).await);
        let (books, cancels) = {
            let mut told = told.lock().unwrap();
            (
                std::mem::take(&mut told.unanswered_books),
                std::mem::take(&mut told.unanswered_cancels),
            )
        };
        for attempt in &books {
            let request = book_request(&attempt.slot_id, &attempt.citizen, &attempt.request_id);
            if let Ok(response) = client.book(request.clone()).await {
                let first = response.into_inner().booking.unwrap();
                let again = book_ok(&mut client, request).await;
                assert_eq!(first.booking_id, again.booking_id);
                told.lock()
                    .unwrap()
                    .booked
                    .insert(first.booking_id, attempt.citizen.clone());
            }
        }
        for cancel in &cancels {
            let request = proto::CancelBookingRequest {
                booking_id: cancel.booking_id.clone(),
                citizen_id: cancel.citizen.clone(),
                request_id: cancel.request_id.clone(),
            };
            for _ in 0..2 {
                let cancelled = client
                    .cancel_booking(request.clone())
                    .await
                    .unwrap_or_else(|status| panic!("cycle {cycle}: retried cancel: {status:?}"))
                    .into_inner()
                    .booking
                    .unwrap();
                assert_eq!(cancelled.state(), proto::BookingState::Cancelled);
            }
            told.lock()
                .unwrap()
                .cancelled
                .insert(cancel.booking_id.clone());
        }
        let exported = export_all(connect(&restarted.url).await).await;
        verify(cycle, &exported, &told.lock().unwrap(), &slot_ids);
        server = Some(restarted);
    }
    if let Some(server) = server {
        server.kill_9();
    }
}

/// Up to `count` events after `after`; waits 10 s for each, and 200 ms for one more.
async fn events_after(url: &str, after: u64, count: usize) -> Vec<proto::Event> {
    let mut capacity = CapacityServiceClient::new(connect(url).await);
    let mut stream = capacity
        .watch_events(proto::WatchEventsRequest {
            scope: None,
            after_sequence: after,
            log_id: String::new(),
        })
        .await
        .expect("watch events")
        .into_inner();
    let mut events = Vec::new();
    loop {
        let wait = match events.len() < count {
            true => Duration::from_secs(10),
            false => Duration::from_millis(200),
        };
        match tokio::time::timeout(wait, stream.message()).await {
            Ok(Ok(Some(message))) => events.push(message.event.unwrap()),
            Ok(other) => panic!("the event stream ended: {other:?}"),
            Err(_) => return events,
        }
    }
}

/// One `BOOKING_CONFIRMED` per stored booking and one `BOOKING_CANCELLED` per cancelled
/// one (nothing acknowledged without its event, no event without its change), with
/// sequences 1, 2, 3, ...; a resume from the middle gives the same tail.
async fn verify_events(cycle: usize, url: &str, exported: &[proto::Booking]) {
    let cancelled = exported
        .iter()
        .filter(|b| b.state() == proto::BookingState::Cancelled)
        .count();
    let expected = exported.len() + cancelled;
    let events = events_after(url, 0, expected).await;
    assert_eq!(
        events.len(),
        expected,
        "cycle {cycle}: one event per change"
    );
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.sequence, i as u64 + 1, "cycle {cycle}: gapless");
    }
    let mut seen: HashSet<(i32, &str)> = HashSet::new();
    for event in &events {
        let booking = event.booking.as_ref().expect("a booking event");
        assert!(
            seen.insert((event.kind, booking.booking_id.as_str())),
            "cycle {cycle}: two {:?} events for {}",
            event.kind(),
            booking.booking_id
        );
    }
    for booking in exported {
        let id = booking.booking_id.as_str();
        let confirmed = proto::EventKind::BookingConfirmed as i32;
        assert!(
            seen.contains(&(confirmed, id)),
            "cycle {cycle}: {id} has no event"
        );
        if booking.state() == proto::BookingState::Cancelled {
            let cancelled = proto::EventKind::BookingCancelled as i32;
            assert!(
                seen.contains(&(cancelled, id)),
                "cycle {cycle}: {id}'s cancel has no event"
            );
        }
    }
    let middle = expected / 2;
    let tail = events_after(url, middle as u64, expected - middle).await;
    assert_eq!(
        tail,
        events[middle..],
        "cycle {cycle}: a resume replays the same events"
    );
}

fn verify(cycle: usize, exported: &[proto::Booking], told: &Told, slot_ids: &[String]) {
    check_acknowledged(
        &format!("cycle {cycle}"),
        exported,
        (&told.booked, &told.cancelled),
        (slot_ids, CAPACITY_PER_SLOT),
    );
}

/// What one citizen's client knows when the server dies mid-reschedule.
struct Mover {
    citizen: String,
    /// The last booking the server acknowledged (booked or rescheduled to).
    acknowledged: String,
    /// A reschedule sent but never answered: (request_id, target slot).
    in_flight: Option<(String, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_reschedule_leaves_every_citizen_exactly_one_booking() {
    const MOVERS: usize = 16;
    const RESCHEDULES_BEFORE_KILL: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start(dir.path());
    let channel = connect(&server.url).await;
    let mut capacity = CapacityServiceClient::new(channel.clone());
    upsert_site(&mut capacity, "moves", "r", "Etc/UTC").await;
    let day = day_ahead(40);
    capacity
        .publish_schedule(publish_request(
            "moves",
            "vax",
            (&day, &day),
            ("10:00", "12:00"),
            30,
            64,
        ))
        .await
        .unwrap();
    let slot_ids: Vec<String> = search_all(
        &mut BookingServiceClient::new(channel.clone()),
        "moves",
        "vax",
    )
    .await
    .into_iter()
    .map(|s| s.slot_id)
    .collect();
    assert_eq!(slot_ids.len(), 4);
    let mut client = BookingServiceClient::new(channel);
    let mut movers = Vec::new();
    for index in 0..MOVERS {
        let citizen = format!("mover-{index}");
        let booking = book_ok(
            &mut client,
            book_request(&slot_ids[index % 4], &citizen, &format!("{citizen}-book")),
        )
        .await;
        movers.push(Mover {
            citizen,
            acknowledged: booking.booking_id,
            in_flight: None,
        });
    }

    for cycle in 0..2 {
        let moves = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = movers
            .drain(..)
            .enumerate()
            .map(|(index, mut mover)| {
                let url = server.url.clone();
                let (slot_ids, moves) = (slot_ids.clone(), Arc::clone(&moves));
                tokio::spawn(async move {
                    let mut client = BookingServiceClient::new(connect(&url).await);
                    for step in 0.. {
                        let target = slot_ids[(index + step + 1 + cycle) % 4].clone();
                        let request_id = format!("{}-move-{cycle}-{step}", mover.citizen);
                        let sent = client
                            .reschedule_booking(proto::RescheduleBookingRequest {
                                booking_id: mover.acknowledged.clone(),
                                citizen_id: mover.citizen.clone(),
                                new_slot_id: target.clone(),
                                request_id: request_id.clone(),
                            })
                            .await;
                        match sent {
                            Ok(response) => {
                                mover.acknowledged =
                                    response.into_inner().booking.unwrap().booking_id;
                                moves.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            Err(status) if status.code() == Code::FailedPrecondition => {} // full
                            Err(_) => {
                                mover.in_flight = Some((request_id, target));
                                return mover;
                            }
                        }
                    }
                    unreachable!()
                })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while moves.load(std::sync::atomic::Ordering::SeqCst) < RESCHEDULES_BEFORE_KILL
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        server.kill_9();
        for task in tasks {
            movers.push(task.await.unwrap());
        }
        assert!(moves.load(std::sync::atomic::Ordering::SeqCst) >= RESCHEDULES_BEFORE_KILL);

        // Recovery refuses a store where a citizen holds two bookings, so starting at all
        // is the first check; then each citizen has exactly one confirmed booking: the
        // acknowledged one, or the one its unanswered reschedule made.
        server = ChildServer::start(dir.path());
        let mut client = BookingServiceClient::new(connect(&server.url).await);
        for mover in &mut movers {
            let listed = client
                .list_citizen_bookings(proto::ListCitizenBookingsRequest {
                    citizen_id: mover.citizen.clone(),
                    service_id: None,
                    page_size: 500,
                    page_token: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(listed.next_page_token.is_empty());
            let confirmed: Vec<&proto::Booking> = listed
                .bookings
                .iter()
                .filter(|b| b.state == proto::BookingState::Confirmed as i32)
                .collect();
            assert_eq!(
                confirmed.len(),
                1,
                "cycle {cycle}: {} has {confirmed:?}",
                mover.citizen
            );
            let current = confirmed[0];
            if current.booking_id != mover.acknowledged {
                let (request_id, target) = mover.in_flight.as_ref().unwrap_or_else(|| {
                    panic!(
                        "cycle {cycle}: {} lost its acknowledged booking",
                        mover.citizen
                    )
                });
                assert_eq!(&current.slot_id, target);
                // Retrying the unanswered reschedule returns the booking it made.
                let retried = client
                    .reschedule_booking(proto::RescheduleBookingRequest {
                        booking_id: mover.acknowledged.clone(),
                        citizen_id: mover.citizen.clone(),
                        new_slot_id: target.clone(),
                        request_id: request_id.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .booking
                    .unwrap();
                assert_eq!(retried.booking_id, current.booking_id);
                mover.acknowledged = current.booking_id.clone();
            }
            mover.in_flight = None;
        }
    }
}
