//! Retention on a real server and a manual clock: finished requests are forgotten after
//! `request_records_retained_hours` (in memory, on disk and at recovery), and everything
//! about a slot ended more than `records_retained_days` ago is deleted, leaving a store
//! that still recovers and still keeps every invariant.

use crate::common;

use std::time::Duration;

use common::*;
use prenota::config::Config;
use prenota::proto;
use prenota::service::Clock;
use prenota::store::Store;
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3_600);
const DAY: Duration = Duration::from_secs(86_400);

fn hold_request(slot_id: &str, citizen_id: &str, request_id: &str) -> proto::HoldSlotRequest {
    proto::HoldSlotRequest {
        slot_id: slot_id.into(),
        citizen_id: citizen_id.into(),
        request_id: request_id.into(),
        ttl_seconds: 60,
    }
}

/// Hold records on disk, read from a stopped server's data dir.
fn stored_holds(data_dir: &std::path::Path) -> usize {
    if common::postgres::asked() {
        let url = common::postgres::url_of_dir(data_dir);
        // b'H' (holds under their old keys), b'O'
        let sql = "SELECT count(*) FROM prenota_kv WHERE get_byte(k, 0) IN (72, 79)";
        return common::postgres::query_i64(&url, sql) as usize;
    }
    let mut store = Store::open(data_dir, &Config::default().limits).expect("store opens");
    let holds = store.holds().count();
    store.shutdown().expect("a clean shutdown");
    holds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_requests_are_forgotten_after_their_window_and_not_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "churn", 10).await;
    let mut client = server.booking().await;
    let hold = client
        .hold_slot(hold_request(&slot, "alice", "h1"))
        .await
        .expect("a hold")
        .into_inner()
        .hold
        .expect("hold");
    let booked = book_ok(&mut client, book_request(&slot, "bob", "b1")).await;
    clock.advance(Duration::from_secs(61));
    assert_eq!(server.sweep_holds().await, 1);

    // Within the window a retry gets its first outcome back, and nothing is deleted.
    clock.advance(71 * HOUR);
    assert_eq!(server.retain().await.holds, 0);
    let retried = client
        .hold_slot(hold_request(&slot, "alice", "h1"))
        .await
        .expect("the retry")
        .into_inner()
        .hold
        .expect("hold");
    assert_eq!(retried.hold_id, hold.hold_id);
    assert_eq!(server.request_records(), 2);

    // After it, the expired hold's record and both request records are gone.
    clock.advance(2 * HOUR);
    let retained = server.retain().await;
    assert_eq!((retained.request_records, retained.holds), (2, 1));
    assert_eq!(server.request_records(), 0);
    // A retry is now a new request: a new hold, and still one booking for bob.
    let fresh = client
        .hold_slot(hold_request(&slot, "alice", "h1"))
        .await
        .expect("a new hold")
        .into_inner()
        .hold
        .expect("hold");
    assert_ne!(fresh.hold_id, hold.hold_id);
    let again = client
        .book(book_request(&slot, "bob", "b1"))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    assert_eq!(reason(&again).as_deref(), Some("CITIZEN_ALREADY_BOOKED"));
    let stats = site_stats(&server, "churn").await;
    assert_eq!((stats.booked, stats.held), (1, 1));
    server.stop().await;

    // On disk only the live hold is left, and a restart remembers only its request.
    assert_eq!(stored_holds(dir.path()), 1);
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    assert_eq!(server.request_records(), 1);
    let mine = server
        .booking()
        .await
        .get_booking(proto::GetBookingRequest {
            booking_id: booked.booking_id.clone(),
            citizen_id: "bob".into(),
        })
        .await
        .expect("the booking itself is kept");
    assert!(mine.into_inner().booking.is_some());
    server.stop().await;
}

/// Holds are stored in the order they were made, and every hold made after both
/// windows' cut-offs is kept: a pass reads only the older ones, those it may delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_reads_only_the_holds_old_enough_to_go() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "churn", 10).await;
    let client = server.booking().await;
    let hold = |citizen: &'static str| {
        let request = hold_request(&slot, citizen, citizen);
        let mut client = client.clone();
        async move { client.hold_slot(request).await.expect("a hold") }
    };
    for citizen in ["a", "b", "c"] {
        hold(citizen).await;
    }
    clock.advance(Duration::from_secs(61));
    assert_eq!(server.sweep_holds().await, 3);
    clock.advance(73 * HOUR);
    for citizen in ["d", "e"] {
        hold(citizen).await;
    }

    let retained = server.retain().await;
    assert_eq!(
        (retained.holds, retained.holds_read),
        (3, 3),
        "{retained:?}"
    );
    clock.advance(Duration::from_secs(61));
    assert_eq!(server.sweep_holds().await, 2);
    let retained = server.retain().await;
    assert_eq!(
        (retained.holds, retained.holds_read),
        (0, 0),
        "{retained:?}"
    );
    clock.advance(73 * HOUR);
    let retained = server.retain().await;
    assert_eq!(
        (retained.holds, retained.holds_read),
        (2, 2),
        "{retained:?}"
    );
    let stats = site_stats(&server, "churn").await;
    assert_eq!(stats.held, 0);
    server.stop().await;
    assert_eq!(stored_holds(dir.path()), 0);
}

/// A slot ends after it starts, so a pass reads only the bookings of slots that started
/// before its cut-off (from their rosters), not every booking in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_reads_only_the_bookings_of_slots_started_before_the_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let early = one_slot_site(&server, "early", 5).await;
    utc_site_on(
        server.channel().await,
        ("later", "test-region"),
        60,
        ("10:00", "10:30"),
        5,
    )
    .await;
    let mut client = server.booking().await;
    let later = search_all(&mut client, "later", "vax").await;
    book_ok(&mut client, book_request(&early, "alice", "a1")).await;
    book_ok(&mut client, book_request(&early, "bob", "b1")).await;
    book_ok(&mut client, book_request(&later[0].slot_id, "carol", "c1")).await;

    // The early slot (30 days ahead) ended 401 days ago; the later one started 371 days
    // ago, after the cut-off: its booking is not even read.
    clock.advance(431 * DAY);
    let retained = server.retain().await;
    assert_eq!(
        (retained.bookings, retained.bookings_read, retained.slots),
        (2, 2, 1),
        "{retained:?}"
    );
    clock.advance(30 * DAY);
    let retained = server.retain().await;
    assert_eq!(
        (retained.bookings, retained.bookings_read, retained.slots),
        (1, 1, 1),
        "{retained:?}"
    );
    assert!(server.retain().await.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_requests_are_forgotten_after_their_window() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    one_slot_site(&server, "closing", 3).await;
    let mut capacity = server.capacity().await;
    let close = proto::CloseSlotsRequest {
        site_id: "closing".into(),
        reason: "flooded".into(),
        request_id: "close-1".into(),
        from: at_s(clock.now_unix_ms() / 1_000),
        to: at_s(clock.now_unix_ms() / 1_000 + 100 * 86_400),
        ..Default::default()
    };
    let first = capacity.close_slots(close.clone()).await.expect("close");
    assert_eq!(first.into_inner().slots_closed, 1);
    clock.advance(73 * HOUR);
    assert_eq!(server.retain().await.authority_requests, 1);
    // The id is free again: a new closure under it runs afresh (nothing left to close).
    let again = capacity
        .close_slots(proto::CloseSlotsRequest {
            reason: "another closure".into(),
            ..close
        })
        .await
        .expect("a new closure, not REQUEST_ID_REUSED");
    assert_eq!(again.into_inner().slots_closed, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_long_ended_slots_are_deleted_and_the_store_still_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "old-site", 5).await;
    let mut client = server.booking().await;
    let kept = book_ok(&mut client, book_request(&slot, "alice", "a1")).await;
    let cancelled = book_ok(&mut client, book_request(&slot, "bob", "b1")).await;
    client
        .cancel_booking(proto::CancelBookingRequest {
            booking_id: cancelled.booking_id.clone(),
            citizen_id: "bob".into(),
            request_id: "b-cancel".into(),
        })
        .await
        .expect("cancel");

    // The slot is 30 days ahead: 429 days from now it ended 399 days ago. Kept.
    clock.advance(429 * DAY);
    let retained = server.retain().await;
    assert_eq!((retained.bookings, retained.slots), (0, 0));
    assert!(
        retained.audit_entries >= 2,
        "the site and schedule entries are 429 days old: {retained:?}"
    );
    // Two days on, it ended more than 400 days ago: its bookings and itself go.
    clock.advance(2 * DAY);
    let retained = server.retain().await;
    assert_eq!((retained.bookings, retained.slots), (2, 1), "{retained:?}");
    let gone = client
        .get_booking(proto::GetBookingRequest {
            booking_id: kept.booking_id.clone(),
            citizen_id: "alice".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(search_all(&mut client, "old-site", "vax").await.is_empty());
    assert_eq!(site_stats(&server, "old-site").await.booked, 0);
    assert!(
        server.retain().await.is_empty(),
        "a second pass finds nothing"
    );
    server.stop().await;

    // The store recovers without them, and alice may book the service again.
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let day = chrono::DateTime::from_timestamp_millis(clock.now_unix_ms() + 86_400_000)
        .unwrap()
        .format("%Y-%m-%d")
        .to_string();
    server
        .capacity()
        .await
        .publish_schedule(publish_request(
            "old-site",
            "vax",
            (&day, &day),
            ("10:00", "10:30"),
            30,
            5,
        ))
        .await
        .expect("publish");
    let mut client = server.booking().await;
    let now_s = clock.now_unix_ms() / 1_000;
    let slots = search_range(&mut client, "old-site", "vax", now_s, now_s + 3 * 86_400).await;
    assert_eq!(slots.len(), 1);
    book_ok(&mut client, book_request(&slots[0].slot_id, "alice", "a2")).await;
    server.stop().await;
}

/// A start on a clock set far ahead (431 days: a slot 30 days ahead then ended over
/// `records_retained_days` ago) deletes nothing and forgets no request: retention counts
/// from the store's newest write and gains at most one second per second that passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_clock_set_far_ahead_deletes_nothing_early() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "ahead", 5).await;
    let mut client = server.booking().await;
    let booked = book_ok(&mut client, book_request(&slot, "alice", "a1")).await;
    server.stop().await;

    clock.set_wrong_by(431 * 86_400_000);
    let mut server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    assert_eq!(
        server.request_records(),
        1,
        "the booking's request is remembered"
    );
    let mine = proto::GetBookingRequest {
        booking_id: booked.booking_id.clone(),
        citizen_id: "alice".into(),
    };
    // Writes on the wrong clock (a site's audit entry, stamped 431 days on), in a run
    // that ends before any pass, do not move the next start's retention time there:
    // the start stored its own (a review and an outside test: one restart undid the
    // protection). Nor does a run whose pass stored its time.
    for pass in [false, true] {
        let site = format!("later-{pass}");
        upsert_site(&mut server.capacity().await, &site, "r", "Europe/Rome").await;
        if pass {
            let retained = server.retain().await;
            assert!(retained.is_empty(), "{retained:?}");
        }
        server.stop().await;
        server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    }
    let retained = server.retain().await;
    assert!(retained.is_empty(), "{retained:?}");
    let mut client = server.booking().await;
    client.get_booking(mine.clone()).await.expect("still kept");

    // Time passing catches up twice as fast: 214 days on, retention's time is 428 days
    // on and the slot ended less than 400 days before; two days more and it goes.
    clock.advance(214 * DAY);
    let retained = server.retain().await;
    assert_eq!((retained.bookings, retained.slots), (0, 0), "{retained:?}");
    assert_eq!(
        retained.request_records, 1,
        "72 hours passed for retention too"
    );
    clock.advance(2 * DAY);
    let retained = server.retain().await;
    assert_eq!((retained.bookings, retained.slots), (1, 1), "{retained:?}");
    let gone = client.get_booking(mine).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    server.stop().await;
}

/// A clean stop stores retention's time: the next start continues from the stop, not
/// from the start or last pass before it (71 h run, then 2 h: the request made at the
/// start goes after 73 h, where counting from the start would give 4 h).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_keeps_retention_time_for_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "stop-site", 5).await;
    book_ok(
        &mut server.booking().await,
        book_request(&slot, "dan", "d1"),
    )
    .await;
    clock.advance(71 * HOUR);
    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    clock.advance(2 * HOUR);
    let retained = server.retain().await;
    assert_eq!(retained.request_records, 1, "{retained:?}");
    server.stop().await;
}

/// A booking cancelled after its slot ended more than `records_retained_days` ago (a
/// cancel has no deadline) is kept while the cancel's request is remembered: its retry
/// is answered as the cancel was, not BOOKING_NOT_FOUND. Once the request is forgotten,
/// the booking and its slot go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_is_kept_while_its_cancel_is_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "late-site", 5).await;
    let mut client = server.booking().await;
    let booked = book_ok(&mut client, book_request(&slot, "carol", "c1")).await;
    // The slot is 30 days ahead: 431 days from now it ended 401 days ago.
    clock.advance(431 * DAY);
    let cancel = proto::CancelBookingRequest {
        booking_id: booked.booking_id.clone(),
        citizen_id: "carol".into(),
        request_id: "c-cancel".into(),
    };
    let cancelled = client
        .cancel_booking(cancel.clone())
        .await
        .expect("a cancel after the slot ended")
        .into_inner();
    let retained = server.retain().await;
    assert_eq!((retained.bookings, retained.slots), (0, 0), "{retained:?}");
    let again = client
        .cancel_booking(cancel.clone())
        .await
        .expect("a retried cancel is answered")
        .into_inner();
    assert_eq!(again, cancelled);
    // request_records_retained_hours (72) later the request is forgotten: both go.
    clock.advance(73 * HOUR);
    let retained = server.retain().await;
    assert_eq!((retained.bookings, retained.slots), (1, 1), "{retained:?}");
    server.stop().await;
}

/// An authority request stored before requests had a time (format 1, read with time 0)
/// counts as answered at the first start that keeps it, and keeps that time: a later
/// start does not move it on, so it goes one window after that first start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undated_authority_request_goes_one_window_after_the_first_start() {
    use prenota::store::records::{AuthorityOutcome, AuthorityRequest, Write};
    if common::postgres::asked() {
        return; // a record put into sled by hand
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let start = || TestServer::start_with_clock(dir.path(), by_hand(), clock.clone());
    start().await.stop().await;
    let mut store = Store::open(dir.path(), &Config::default().limits).expect("store opens");
    let undated = AuthorityRequest {
        key: prenota::domain::ids::RequestKey([9; 16]),
        fingerprint: prenota::domain::ids::RequestFingerprint([1; 16]),
        outcome: AuthorityOutcome::CapacitySet,
        at_unix_ms: 0,
    };
    let write = Write::AuthorityRequest(undated);
    store.commit(&[write]).await.expect("stored");
    store.shutdown().expect("a clean shutdown");
    drop(store);

    let server = start().await;
    assert_eq!(server.retain().await.authority_requests, 0);
    server.stop().await;
    clock.advance(71 * HOUR);
    let server = start().await;
    assert_eq!(server.retain().await.authority_requests, 0);
    // Retention's time starts where the first start's pass left it and gains two hours
    // an hour: 35 h on it is 70 h after the first start, 37 h on 74 h.
    clock.advance(35 * HOUR);
    assert_eq!(server.retain().await.authority_requests, 0);
    clock.advance(2 * HOUR);
    let retained = server.retain().await;
    assert_eq!(retained.authority_requests, 1, "72 h after the first start");
    server.stop().await;
}
