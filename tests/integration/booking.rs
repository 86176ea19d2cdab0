//! Booking over a real gRPC server: concurrency, citizen limits, idempotency,
//! cancellation, and a graceful restart.

use crate::common;

use std::collections::HashSet;

use common::*;
use prenota::proto;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_fill_a_hundred_seats_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot_id = one_slot_site(&server, "rush", 100).await;

    const CLIENTS: usize = 64;
    const CITIZENS: usize = 2_000;
    let mut tasks = Vec::new();
    for client_index in 0..CLIENTS {
        // One HTTP/2 connection per client.
        let mut client = server.booking().await;
        let slot_id = slot_id.clone();
        tasks.push(tokio::spawn(async move {
            let mut booked = Vec::new();
            let mut full = 0usize;
            for citizen in (client_index..CITIZENS).step_by(CLIENTS) {
                let request = book_request(
                    &slot_id,
                    &format!("citizen-{citizen}"),
                    &format!("req-{citizen}"),
                );
                match client.book(request).await {
                    Ok(response) => booked.push(response.into_inner().booking.unwrap().booking_id),
                    Err(status) => {
                        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                        assert_eq!(reason(&status).as_deref(), Some("SLOT_FULL"));
                        full += 1;
                    }
                }
            }
            (booked, full)
        }));
    }
    let mut booking_ids = HashSet::new();
    let mut full_total = 0;
    for task in tasks {
        let (booked, full) = task.await.unwrap();
        booking_ids.extend(booked);
        full_total += full;
    }
    assert_eq!(booking_ids.len(), 100);
    assert_eq!(full_total, 1_900);

    let stats = site_stats(&server, "rush").await;
    assert_eq!((stats.capacity, stats.booked), (100, 100));
    let exported = export_all(server.channel().await).await;
    assert_eq!(exported.len(), 100);
    assert!(exported.iter().all(|b| booking_ids.contains(&b.booking_id)));
    let slots = search_all(&mut server.booking().await, "rush", "vax").await;
    assert_eq!(slots[0].remaining, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_citizen_racing_itself_gets_exactly_one_booking() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot_id = one_slot_site(&server, "race", 50).await;

    let mut tasks = Vec::new();
    for attempt in 0..32 {
        let mut client = server.booking().await;
        let request = book_request(&slot_id, "RSSMRA80A01H501U", &format!("attempt-{attempt}"));
        tasks.push(tokio::spawn(async move { client.book(request).await }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(response) => winners.push(response.into_inner().booking.unwrap().booking_id),
            Err(status) => {
                assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
                assert_eq!(reason(&status).as_deref(), Some("CITIZEN_ALREADY_BOOKED"));
                // No oracle: the refusal does not say where the citizen is booked.
                assert_eq!(metadata(&status, "booking_id"), None);
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one attempt books");
    assert_eq!(site_stats(&server, "race").await.booked, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_id_returns_the_first_booking() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot_id = one_slot_site(&server, "retry", 10).await;
    let mut client = server.booking().await;

    let request = book_request(&slot_id, "citizen-a", "retry-1");
    let first = book_ok(&mut client, request.clone()).await;
    let second = book_ok(&mut client, request.clone()).await;
    assert_eq!(first.booking_id, second.booking_id);
    assert_eq!(first, second);

    // Duplicates in flight at the same time also resolve to one booking.
    let racing_request = book_request(&slot_id, "citizen-b", "retry-2");
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut client = server.booking().await;
        let request = racing_request.clone();
        tasks.push(tokio::spawn(async move { client.book(request).await }));
    }
    let mut ids = HashSet::new();
    for task in tasks {
        ids.insert(
            task.await
                .unwrap()
                .expect("duplicates succeed")
                .into_inner()
                .booking
                .unwrap()
                .booking_id,
        );
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(site_stats(&server, "retry").await.booked, 2);

    // The same request_id for a different request of the same citizen is refused and
    // changes nothing.
    let elsewhere = one_slot_site(&server, "retry-elsewhere", 5).await;
    let status = client
        .book(book_request(&elsewhere, "citizen-a", "retry-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason(&status).as_deref(), Some("REQUEST_ID_REUSED"));
    assert_eq!(site_stats(&server, "retry-elsewhere").await.booked, 0);
    // Another citizen's request ids are its own: nobody can squat them (#13).
    book_ok(&mut client, book_request(&slot_id, "citizen-c", "retry-1")).await;
    assert_eq!(site_stats(&server, "retry").await.booked, 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_returns_the_seat() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot_id = one_slot_site(&server, "cancel", 1).await;
    let mut client = server.booking().await;

    let booking = book_ok(&mut client, book_request(&slot_id, "citizen-a", "a-book")).await;
    let full = client
        .book(book_request(&slot_id, "citizen-b", "b-book"))
        .await
        .unwrap_err();
    assert_eq!(reason(&full).as_deref(), Some("SLOT_FULL"));

    // Somebody else cannot cancel it, and learns nothing about it.
    let stranger = client
        .cancel_booking(proto::CancelBookingRequest {
            booking_id: booking.booking_id.clone(),
            citizen_id: "citizen-b".into(),
            request_id: "b-cancel".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(stranger.code(), Code::NotFound);
    assert_eq!(reason(&stranger).as_deref(), Some("BOOKING_NOT_FOUND"));

    let cancel = proto::CancelBookingRequest {
        booking_id: booking.booking_id.clone(),
        citizen_id: "citizen-a".into(),
        request_id: "a-cancel".into(),
    };
    let cancelled = client
        .cancel_booking(cancel.clone())
        .await
        .unwrap()
        .into_inner()
        .booking
        .unwrap();
    assert_eq!(cancelled.state, proto::BookingState::Cancelled as i32);
    assert!(cancelled.cancelled_at.is_some());
    // Retrying the cancel answers the same; cancelling again with a new id is refused.
    let retried = client
        .cancel_booking(cancel)
        .await
        .unwrap()
        .into_inner()
        .booking
        .unwrap();
    assert_eq!(retried.state, proto::BookingState::Cancelled as i32);
    let again = client
        .cancel_booking(proto::CancelBookingRequest {
            booking_id: booking.booking_id.clone(),
            citizen_id: "citizen-a".into(),
            request_id: "a-cancel-2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert_eq!(reason(&again).as_deref(), Some("BOOKING_NOT_ACTIVE"));

    // The seat is free again: the citizen who was refused now gets it.
    assert_eq!(
        search_all(&mut client, "cancel", "vax").await[0].remaining,
        1
    );
    client
        .book(book_request(&slot_id, "citizen-b", "b-book-2"))
        .await
        .unwrap();
    let stats = site_stats(&server, "cancel").await;
    assert_eq!(stats.booked, 1);
    let fetched = client
        .get_booking(proto::GetBookingRequest {
            booking_id: booking.booking_id,
            citizen_id: "citizen-a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .booking
        .unwrap();
    assert_eq!(fetched.state, proto::BookingState::Cancelled as i32);
    assert_eq!(
        export_all(server.channel().await).await.len(),
        2,
        "cancelled bookings stay exported"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_every_booking_and_the_same_stats() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot_id = one_slot_site(&server, "restart", 5).await;
    let mut client = server.booking().await;
    let mut booked = Vec::new();
    for citizen in 0..4 {
        let booking = book_ok(
            &mut client,
            book_request(&slot_id, &format!("c{citizen}"), &format!("r{citizen}")),
        )
        .await;
        booked.push(booking);
    }
    client
        .cancel_booking(proto::CancelBookingRequest {
            booking_id: booked[0].booking_id.clone(),
            citizen_id: "c0".into(),
            request_id: "cancel-c0".into(),
        })
        .await
        .unwrap();
    let stats_before = site_stats(&server, "restart").await;
    let export_before = export_all(server.channel().await).await;
    drop(client);
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    assert_eq!(site_stats(&server, "restart").await, stats_before);
    assert_eq!(export_all(server.channel().await).await, export_before);
    let mut client = server.booking().await;
    // Idempotency and citizen limits survive the restart too.
    let retried = book_ok(&mut client, book_request(&slot_id, "c1", "r1")).await;
    assert_eq!(retried.booking_id, booked[1].booking_id);
    let limited = client
        .book(book_request(&slot_id, "c2", "another"))
        .await
        .unwrap_err();
    assert_eq!(reason(&limited).as_deref(), Some("CITIZEN_ALREADY_BOOKED"));
    // The cancelled seat is free: two more fit (5 - 3 booked), then the slot is full.
    client
        .book(book_request(&slot_id, "c0", "c0-again"))
        .await
        .unwrap();
    client
        .book(book_request(&slot_id, "c9", "c9"))
        .await
        .unwrap();
    let full = client
        .book(book_request(&slot_id, "c10", "c10"))
        .await
        .unwrap_err();
    assert_eq!(reason(&full).as_deref(), Some("SLOT_FULL"));
    server.stop().await;
}

/// A citizen's bookings are listed by start time (not by id), and pages of one follow
/// the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_citizen_lists_its_bookings_in_start_time_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    upsert_site(&mut server.capacity().await, "order", "r", "Etc/UTC").await;
    let day = day_ahead(30);
    let publish = publish_request("order", "vax", (&day, &day), ("09:00", "10:30"), 30, 5);
    server
        .capacity()
        .await
        .publish_schedule(publish)
        .await
        .unwrap();
    let mut client = server.booking().await;
    let slots = search_all(&mut client, "order", "vax").await;
    assert_eq!(slots.len(), 3);
    // Booked latest first: ids grow while starts go back.
    let mut booked = Vec::new();
    for (n, slot) in slots.iter().rev().enumerate() {
        let request_id = format!("b{n}");
        let booking = book_ok(&mut client, book_request(&slot.slot_id, "ann", &request_id)).await;
        if n < 2 {
            client
                .cancel_booking(proto::CancelBookingRequest {
                    booking_id: booking.booking_id.clone(),
                    citizen_id: "ann".into(),
                    request_id: format!("c{n}"),
                })
                .await
                .unwrap();
        }
        booked.push(booking.booking_id);
    }
    booked.reverse();
    let (mut listed, mut page_token) = (Vec::new(), String::new());
    loop {
        let page = client
            .list_citizen_bookings(proto::ListCitizenBookingsRequest {
                citizen_id: "ann".into(),
                page_size: 1,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.bookings.into_iter().map(|b| b.booking_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(listed, booked, "earliest start first, one page at a time");
    server.stop().await;
}

/// A move is seen whole or not at all: while one citizen is moved between two slots
/// again and again (each move a new booking and the old one cancelled, so its records
/// span many of sled's leaves), readers listing its bookings always find exactly one
/// confirmed. A sled range scan is no snapshot: it showed both, or neither, until the
/// list read between two commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_citizen_moved_again_and_again_is_listed_with_exactly_one_confirmed_booking() {
    const MOVES: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let mut config = by_hand();
    config.limits.rate_citizen_attempts_per_min = 10_000;
    config.limits.rate_citizen_reads_per_min = 1_000_000;
    let server = TestServer::start_with(dir.path(), config).await;
    let slots = ten_minute_slots(server.channel().await, ("moves", day_ahead(3)), 2, 5).await;
    let mut client = server.booking().await;
    let first = book_ok(&mut client, book_request(&slots[0], "ann", "b")).await;
    let moving = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (mut client, moving) = (client.clone(), moving.clone());
            tokio::spawn(async move {
                let mut reads = 0;
                while moving.load(std::sync::atomic::Ordering::Relaxed) {
                    let listed = client
                        .list_citizen_bookings(proto::ListCitizenBookingsRequest {
                            citizen_id: "ann".into(),
                            page_size: 500,
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    let confirmed = listed
                        .bookings
                        .iter()
                        .filter(|b| b.state == proto::BookingState::Confirmed as i32)
                        .count();
                    let listed = listed.bookings.len();
                    assert_eq!(confirmed, 1, "read {reads}: of {listed} bookings listed");
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let mut booking_id = first.booking_id;
    for n in 0..MOVES {
        let moved = client
            .reschedule_booking(proto::RescheduleBookingRequest {
                booking_id,
                citizen_id: "ann".into(),
                new_slot_id: slots[(n + 1) % 2].clone(),
                request_id: format!("m{n}"),
            })
            .await
            .unwrap()
            .into_inner();
        booking_id = moved.booking.unwrap().booking_id;
    }
    moving.store(false, std::sync::atomic::Ordering::Relaxed);
    for reader in readers {
        assert!(reader.await.unwrap() > 0, "each reader read");
    }
    server.stop().await;
}

/// A cancel and a move of the same booking sent at once: exactly one of them wins (the
/// other is refused BOOKING_NOT_ACTIVE), never both (a place kept by a cancelled
/// booking's move) nor neither, and every place comes back or stays taken to match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_a_move_of_the_same_booking_lets_exactly_one_win() {
    const ROUNDS: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slots = ten_minute_slots(server.channel().await, ("race", day_ahead(3)), 2, 100).await;
    let client = server.booking().await;
    let mut moved = 0;
    for n in 0..ROUNDS {
        let citizen = format!("racer-{n}");
        let booked = book_ok(
            &mut client.clone(),
            book_request(&slots[0], &citizen, &format!("b{n}")),
        )
        .await;
        let cancel = proto::CancelBookingRequest {
            booking_id: booked.booking_id.clone(),
            citizen_id: citizen.clone(),
            request_id: format!("c{n}"),
        };
        let mv = proto::RescheduleBookingRequest {
            booking_id: booked.booking_id.clone(),
            citizen_id: citizen.clone(),
            new_slot_id: slots[1].clone(),
            request_id: format!("m{n}"),
        };
        let (mut a, mut b) = (client.clone(), client.clone());
        let (cancelled, rescheduled) = tokio::join!(
            tokio::spawn(async move { a.cancel_booking(cancel).await }),
            tokio::spawn(async move { b.reschedule_booking(mv).await })
        );
        let (cancelled, rescheduled) = (cancelled.unwrap(), rescheduled.unwrap());
        let loser = match (&cancelled, &rescheduled) {
            (Ok(_), Err(status)) => status,
            (Err(status), Ok(_)) => {
                moved += 1;
                status
            }
            both => panic!("round {n}: exactly one may win: {both:?}"),
        };
        assert_eq!(
            reason(loser).as_deref(),
            Some("BOOKING_NOT_ACTIVE"),
            "{loser:?}"
        );
        let listed = citizen_bookings(&mut client.clone(), &citizen).await;
        let confirmed: Vec<_> = listed
            .iter()
            .filter(|b| b.state == proto::BookingState::Confirmed as i32)
            .collect();
        match rescheduled.is_ok() {
            true => assert!(confirmed.len() == 1 && confirmed[0].slot_id == slots[1]),
            false => assert!(confirmed.is_empty(), "{listed:?}"),
        }
    }
    let remaining: Vec<u32> = search_all(&mut client.clone(), "race", "vax")
        .await
        .iter()
        .map(|slot| slot.remaining)
        .collect();
    assert_eq!(
        remaining,
        vec![100, 100 - moved],
        "places match the winners"
    );
    eprintln!("the move won {moved} of {ROUNDS} rounds");
    server.stop().await;
}
