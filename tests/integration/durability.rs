//! The durability barrier, on the real binary: an LD_PRELOAD shim (tests/shim/) takes
//! over `fdatasync`, the call prenota's committer makes after sled's flush.
//!
//! - While fdatasync is held, a booking is not acknowledged; it is once the sync returns.
//! - A failed fdatasync fails the booking, turns health NOT_SERVING, and stops every later
//!   write (no silent retry); after a restart a retry of the failed request books at most
//!   once.
//! - Reads (a citizen's list, an export) do not show a booking whose fdatasync is held.
//!
//! The shim is compiled with the system C compiler (`cc`) when the test runs.

use crate::common;

use std::time::{Duration, Instant};

use common::child::{
    fdatasync_gate, http_get, start_with_shim, start_with_shim_and, wait_for_held_fdatasync,
    ChildServer,
};
use common::*;
use prenota::proto;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::site_service_client::SiteServiceClient;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

async fn health(server: &ChildServer) -> ServingStatus {
    health_of(connect(&server.url).await, "prenota.v1.BookingService").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_booking_is_acknowledged_before_its_fdatasync_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (library, control) = fdatasync_gate(dir.path());
    let server = start_with_shim(&dir.path().join("data"), &library, &control);
    let channel = connect(&server.url).await;
    let slot_id = one_slot_site_on(channel.clone(), "durable", "r", 10).await;

    // Hold the barrier, then book.
    std::fs::write(control.join("gate"), b"").unwrap();
    let mut client = BookingServiceClient::new(channel.clone());
    let booking = tokio::spawn(async move {
        client
            .book(book_request(&slot_id, "citizen-gated", "gated"))
            .await
    });
    wait_for_held_fdatasync(&control).await;
    // The write is applied and flushed, fdatasync is running: no answer yet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !booking.is_finished(),
        "the booking was acknowledged while fdatasync had not returned"
    );
    std::fs::remove_file(control.join("gate")).unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), booking)
        .await
        .expect("answered once fdatasync returned")
        .unwrap();
    assert!(answered.is_ok(), "{answered:?}");
    assert_eq!(health(&server).await, ServingStatus::Serving);
    server.terminate();
}

/// After a failed fdatasync the store refuses every write without trying it: such a
/// refused booking takes no place (later citizens hear STORAGE_FAILED, not SLOT_FULL)
/// and leaves the citizen free (its retry is refused again, not CITIZEN_ALREADY_BOOKED).
/// The failed booking itself may be on disk: its place stays taken. Stopped, the server
/// exits with a failure status: its store failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookings_refused_after_a_storage_failure_take_no_place_and_book_no_citizen() {
    let dir = tempfile::tempdir().unwrap();
    let (library, control) = fdatasync_gate(dir.path());
    let server = start_with_shim(&dir.path().join("data"), &library, &control);
    let channel = connect(&server.url).await;
    let slot_id = one_slot_site_on(channel.clone(), "refused", "r", 3).await;
    let mut client = BookingServiceClient::new(channel.clone());
    book_ok(&mut client, book_request(&slot_id, "c-before", "before")).await;
    std::fs::write(control.join("fail"), b"").unwrap();
    let failed = client
        .book(book_request(&slot_id, "c-failed", "failed"))
        .await
        .unwrap_err();
    assert_eq!(reason(&failed).as_deref(), Some("STORAGE_FAILED"));
    std::fs::remove_file(control.join("fail")).unwrap();
    // The failed booking's retry, and another of its citizen, too: its entry stays
    // taken until the restart (its outcome is unknown), and they met CITIZEN_ALREADY_BOOKED.
    let refused = [("c1", "r1"), ("c2", "r2"), ("c1", "r1"), ("c1", "r3")];
    let retried = [("c-failed", "failed"), ("c-failed", "another")];
    for (citizen, request) in refused.into_iter().chain(retried) {
        let refused = client
            .book(book_request(&slot_id, citizen, request))
            .await
            .unwrap_err();
        assert_eq!(
            reason(&refused).as_deref(),
            Some("STORAGE_FAILED"),
            "{refused:?}"
        );
    }
    let slots = search_all(&mut client, "refused", "vax").await;
    assert_eq!(slots[0].remaining, 1, "{slots:?}");
    assert!(!server.stop().success(), "a failed store closed cleanly");
}

/// `prenota export` from a server whose store failed exits 1 and writes nothing: it
/// left a header-only CSV that read as an empty export (an outside test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_from_a_failed_store_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (library, control) = fdatasync_gate(dir.path());
    let server = start_with_shim(&dir.path().join("data"), &library, &control);
    let channel = connect(&server.url).await;
    let slot_id = one_slot_site_on(channel.clone(), "exported", "r", 3).await;
    let mut client = BookingServiceClient::new(channel);
    book_ok(&mut client, book_request(&slot_id, "c1", "b1")).await;
    std::fs::write(control.join("fail"), b"").unwrap();
    let failed = client
        .book(book_request(&slot_id, "c2", "b2"))
        .await
        .unwrap_err();
    assert_eq!(reason(&failed).as_deref(), Some("STORAGE_FAILED"));
    let url = server.url.clone();
    let export = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_prenota"))
            .args(["export", "--server", &url])
            .output()
            .unwrap()
    });
    let export = export.await.unwrap();
    let stderr = String::from_utf8_lossy(&export.stderr);
    assert_eq!(export.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("STORAGE_FAILED"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&export.stdout), "");
    assert!(!server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fdatasync_stops_writes_and_turns_health_not_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (library, control) = fdatasync_gate(dir.path());
    let data_dir = dir.path().join("data");
    let server = start_with_shim(&data_dir, &library, &control);
    let channel = connect(&server.url).await;
    let slot_id = one_slot_site_on(channel.clone(), "durable", "r", 10).await;
    let mut client = BookingServiceClient::new(channel.clone());
    book_ok(
        &mut client,
        book_request(&slot_id, "citizen-before", "before"),
    )
    .await;

    std::fs::write(control.join("fail"), b"").unwrap();
    let failed = client
        .book(book_request(&slot_id, "citizen-failed", "failed"))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    assert_eq!(reason(&failed).as_deref(), Some("STORAGE_FAILED"));
    // Health follows the store's state through a task: it turns within moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&server).await != ServingStatus::NotServing {
        assert!(
            Instant::now() < deadline,
            "health still SERVING after the failed fdatasync"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The disk is back, but the store stays failed: nothing is retried silently.
    std::fs::remove_file(control.join("fail")).unwrap();
    let refused = client
        .book(book_request(&slot_id, "citizen-after", "after"))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused).as_deref(), Some("STORAGE_FAILED"));
    let metrics = http_get(&server.metrics_url);
    assert!(metrics.contains("prenota_store_healthy 0"), "{metrics}");
    assert!(
        metrics.contains("prenota_commit_failures_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("prenota_serving 0"), "{metrics}");
    server.kill_9();

    // After a restart the disk decides: the failed booking may or may not be there (its
    // flush ran), but its retry books at most once, and the refused one books now.
    let server = start_with_shim(&data_dir, &library, &control);
    assert_eq!(health(&server).await, ServingStatus::Serving);
    let channel = connect(&server.url).await;
    let mut client = BookingServiceClient::new(channel.clone());
    let retried = book_ok(
        &mut client,
        book_request(&slot_id, "citizen-failed", "failed"),
    )
    .await;
    let again = book_ok(
        &mut client,
        book_request(&slot_id, "citizen-failed", "failed"),
    )
    .await;
    assert_eq!(retried.booking_id, again.booking_id);
    book_ok(
        &mut client,
        book_request(&slot_id, "citizen-after", "after"),
    )
    .await;
    let bookings = export_all(channel).await;
    assert_eq!(bookings.len(), 3, "{bookings:?}");
    server.terminate();
}

/// A closure waits for bookings already admitted to its slots, but not without bound:
/// held up by a stalled disk past `close_settle_wait_ms`, it closes nothing, reopens
/// its slots and answers OVERLOADED; once the disk is back it closes and cancels them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closure_stalled_behind_a_held_fdatasync_gives_up_and_closes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (library, control) = fdatasync_gate(dir.path());
    let limit = ("PRENOTA_LIMITS_CLOSE_SETTLE_WAIT_MS".into(), "300".into());
    let server = start_with_shim_and(&dir.path().join("data"), &library, &control, vec![limit]);
    let channel = connect(&server.url).await;
    let slot_id = one_slot_site_on(channel.clone(), "stalled", "r", 10).await;
    let slot = search_all(
        &mut BookingServiceClient::new(channel.clone()),
        "stalled",
        "vax",
    )
    .await
    .remove(0);
    let close = prenota::proto::CloseSlotsRequest {
        site_id: "stalled".into(),
        service_id: None,
        from: slot.start,
        to: slot.end,
        reason: "the nurse is ill".into(),
        request_id: String::new(),
    };

    // A booking admitted, its commit held in fdatasync.
    std::fs::write(control.join("gate"), b"").unwrap();
    let mut client = BookingServiceClient::new(channel.clone());
    let booking = tokio::spawn(async move {
        client
            .book(book_request(&slot_id, "citizen-stalled", "stalled"))
            .await
    });
    wait_for_held_fdatasync(&control).await;
    let mut capacity =
        prenota::proto::capacity_service_client::CapacityServiceClient::new(channel.clone());
    let refused =
        tokio::time::timeout(Duration::from_secs(10), capacity.close_slots(close.clone()))
            .await
            .expect("the closure does not wait on a stalled disk for ever")
            .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason(&refused).as_deref(), Some("OVERLOADED"));
    let retry = refused
        .get_details_retry_info()
        .and_then(|info| info.retry_delay);
    assert!(retry.is_some(), "the refusal says when to retry");

    // The disk is back: the booking is acknowledged, the slot was reopened, and the
    // closure now closes it and cancels the booking.
    std::fs::remove_file(control.join("gate")).unwrap();
    let booked = tokio::time::timeout(Duration::from_secs(10), booking)
        .await
        .expect("answered once fdatasync returned")
        .unwrap();
    assert!(booked.is_ok(), "{booked:?}");
    let after = search_all(
        &mut BookingServiceClient::new(channel.clone()),
        "stalled",
        "vax",
    )
    .await;
    assert!(!after[0].closed, "a refused closure leaves its slot open");
    let closed = capacity.close_slots(close).await.unwrap().into_inner();
    assert_eq!((closed.slots_closed, closed.cancelled_bookings), (1, 1));
    server.terminate();
}

/// A double tap at the desk was answered from the store while the first tap's check-in
/// was still in its fdatasync (the store shows a write before it is durable): a crash
/// then could lose a check-in the desk had been told of twice. The second tap now waits
/// for the first to be durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_double_tap_at_the_desk_is_answered_once_the_first_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (library, control) = fdatasync_gate(dir.path());
    let window = ("PRENOTA_LIMITS_CHECK_IN_WINDOW_HOURS".into(), "72".into());
    let data = dir.path().join("data");
    let server = start_with_shim_and(&data, &library, &control, vec![window]);
    let channel = connect(&server.url).await;
    utc_site_on(channel.clone(), ("tapped", "r"), 1, ("10:00", "10:30"), 10).await;
    let mut booking = BookingServiceClient::new(channel.clone());
    let slots = search_all(&mut booking, "tapped", "vax").await;
    let booked = book_ok(&mut booking, book_request(&slots[0].slot_id, "c", "b")).await;
    let tap = |channel: tonic::transport::Channel| {
        let request = proto::CheckInRequest {
            reference: booked.reference.clone(),
            check_in_code: booked.check_in_code.clone(),
        };
        tokio::spawn(async move { SiteServiceClient::new(channel).check_in(request).await })
    };
    std::fs::write(control.join("gate"), b"").unwrap();
    let first = tap(channel.clone());
    wait_for_held_fdatasync(&control).await;
    let second = tap(channel.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second tap was answered while the first was not durable"
    );
    std::fs::remove_file(control.join("gate")).unwrap();
    for tap in [first, second] {
        let answered = tokio::time::timeout(Duration::from_secs(10), tap).await;
        assert!(answered.expect("answered").unwrap().is_ok());
    }
    server.terminate();
}

/// sled serves a batch's records as soon as it is applied, before its fdatasync: reads
/// wait for it, so none shows a booking a crash could still undo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_do_not_show_a_booking_before_its_fdatasync_returns() {
    use prenota::proto::capacity_service_client::CapacityServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let (library, control) = fdatasync_gate(dir.path());
    let server = start_with_shim(&dir.path().join("data"), &library, &control);
    let channel = connect(&server.url).await;
    let slot_id = one_slot_site_on(channel.clone(), "read", "r", 10).await;
    std::fs::write(control.join("gate"), b"").unwrap();
    let mut client = BookingServiceClient::new(channel.clone());
    let booking =
        tokio::spawn(async move { client.book(book_request(&slot_id, "reader", "b")).await });
    wait_for_held_fdatasync(&control).await;
    let mut client = BookingServiceClient::new(channel.clone());
    let listed = tokio::spawn(async move {
        let request = proto::ListCitizenBookingsRequest {
            citizen_id: "reader".into(),
            ..Default::default()
        };
        client.list_citizen_bookings(request).await
    });
    let mut authority = CapacityServiceClient::new(channel.clone());
    let exported = tokio::spawn(async move {
        let request = proto::ExportBookingsRequest { scope: None };
        let mut stream = authority.export_bookings(request).await?.into_inner();
        stream.message().await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!listed.is_finished(), "listed while fdatasync was held");
    assert!(!exported.is_finished(), "exported while fdatasync was held");
    std::fs::remove_file(control.join("gate")).unwrap();
    let within = Duration::from_secs(10);
    let booked = tokio::time::timeout(within, booking).await.unwrap();
    let listed = tokio::time::timeout(within, listed).await.unwrap();
    let exported = tokio::time::timeout(within, exported).await.unwrap();
    let booked = booked.unwrap().unwrap().into_inner();
    let listed = listed.unwrap().unwrap().into_inner();
    let exported = exported.unwrap().unwrap().unwrap();
    let booking_id = booked.booking.unwrap().booking_id;
    assert_eq!(listed.bookings[0].booking_id, booking_id);
    assert_eq!(exported.booking.unwrap().booking_id, booking_id);
    server.terminate();
}

/// A retried Book is answered from the booking as it is now: not before a cancel of it
/// still waiting for its fdatasync is durable (the cancel could be lost to a crash, and
/// the citizen would skip a kept appointment), and not at all once that write failed
/// (a review: the retry read the applied record and answered CANCELLED at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_shows_a_later_cancel_only_once_it_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (library, control) = fdatasync_gate(dir.path());
    let server = start_with_shim(&dir.path().join("data"), &library, &control);
    let channel = connect(&server.url).await;
    let slot_id = one_slot_site_on(channel.clone(), "retry", "r", 10).await;
    let mut client = BookingServiceClient::new(channel.clone());
    let booked = client
        .book(book_request(&slot_id, "ana", "b"))
        .await
        .unwrap();
    let booked = booked.into_inner().booking.unwrap();
    let booking_id = booked.booking_id.clone();
    let cancel = |citizen: &str, id: &str| proto::CancelBookingRequest {
        booking_id: id.into(),
        citizen_id: citizen.into(),
        request_id: format!("cancel-{citizen}"),
    };

    // Held: the retry waits for the cancel's fdatasync, then shows it.
    std::fs::write(control.join("gate"), b"").unwrap();
    let mut canceller = client.clone();
    let request = cancel("ana", &booking_id);
    let cancelled = tokio::spawn(async move { canceller.cancel_booking(request).await });
    wait_for_held_fdatasync(&control).await;
    let mut retrier = client.clone();
    let slot = slot_id.clone();
    let retried = tokio::spawn(async move { retrier.book(book_request(&slot, "ana", "b")).await });
    // The desk's refusal waits too (the slot is days ahead: CHECK_IN_CLOSED).
    let mut desk = SiteServiceClient::new(channel.clone());
    let check_in = proto::CheckInRequest {
        reference: booked.reference.clone(),
        check_in_code: booked.check_in_code.clone(),
    };
    let checked = tokio::spawn(async move { desk.check_in(check_in).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !retried.is_finished(),
        "answered while the cancel was not durable"
    );
    assert!(
        !checked.is_finished(),
        "the desk was answered before it too"
    );
    std::fs::remove_file(control.join("gate")).unwrap();
    let within = Duration::from_secs(10);
    tokio::time::timeout(within, cancelled)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let retried = tokio::time::timeout(within, retried)
        .await
        .unwrap()
        .unwrap();
    let shown = retried.unwrap().into_inner().booking.unwrap();
    assert_eq!(shown.state(), proto::BookingState::Cancelled);
    let checked = tokio::time::timeout(within, checked)
        .await
        .unwrap()
        .unwrap();
    assert!(checked.is_err());

    // Failed: a retry of a booking whose cancel failed is refused like every read.
    let rebooked = client
        .book(book_request(&slot_id, "bea", "b2"))
        .await
        .unwrap();
    let rebooked_id = rebooked.into_inner().booking.unwrap().booking_id;
    std::fs::write(control.join("fail"), b"").unwrap();
    let failed = client
        .cancel_booking(cancel("bea", &rebooked_id))
        .await
        .unwrap_err();
    assert_eq!(reason(&failed).as_deref(), Some("STORAGE_FAILED"));
    let retried = client
        .book(book_request(&slot_id, "bea", "b2"))
        .await
        .unwrap_err();
    assert_eq!(reason(&retried).as_deref(), Some("STORAGE_FAILED"));
    assert!(!server.stop().success(), "a failed store exits non-zero");
}

/// An `UpsertCampaign` ending a campaign sets its end in memory before the write (so
/// no registration is made after it); a write never made puts the end back. Before,
/// the campaign read ended until a restart: it gated nothing, and another campaign of
/// its service and region could be created beside it (a review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ending_never_written_leaves_the_campaign_running() {
    let dir = tempfile::tempdir().unwrap();
    let (library, control) = fdatasync_gate(dir.path());
    let server = start_with_shim(&dir.path().join("data"), &library, &control);
    let channel = connect(&server.url).await;
    let slot_id = one_slot_site_on(channel.clone(), "durable", "r", 10).await;
    let mut capacity = CapacityServiceClient::new(channel.clone());
    let campaign = |id: &str, ends_at_s: Option<i64>| proto::UpsertCampaignRequest {
        campaign: Some(proto::Campaign {
            ends_at: ends_at_s.map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
            ..open_campaign(id, "elsewhere")
        }),
        request_id: String::new(),
    };
    capacity
        .upsert_campaign(campaign("c1", None))
        .await
        .unwrap();

    // The store fails (a booking's fdatasync); every later write is never made.
    std::fs::write(control.join("fail"), b"").unwrap();
    let mut client = BookingServiceClient::new(channel.clone());
    let failed = client
        .book(book_request(&slot_id, "citizen", "failed"))
        .await
        .unwrap_err();
    assert_eq!(reason(&failed).as_deref(), Some("STORAGE_FAILED"));
    let ending = capacity
        .upsert_campaign(campaign("c1", Some(1)))
        .await
        .unwrap_err();
    assert_eq!(reason(&ending).as_deref(), Some("STORAGE_FAILED"));

    // c1 still covers its service and region: a second campaign is refused for it.
    let second = capacity
        .upsert_campaign(campaign("c2", None))
        .await
        .unwrap_err();
    assert_eq!(second.code(), Code::InvalidArgument, "{second:?}");
    assert!(second.message().contains("c1"), "{second:?}");
    server.kill_9();
}
