//! A citizen id must not be a password (issue #13, "no oracles"): with a frontend token
//! and a stranger's citizen id, an attacker learns no booking id, cannot read a booking
//! without its citizen, cannot burn the citizen's booking quota on made-up slots, and
//! can read a citizen's bookings only at the per-citizen read rate.

use crate::common;

use common::*;
use prenota::config::Config;
use prenota::proto;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_citizen_id_reveals_no_booking() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot = one_slot_site(&server, "clinic", 5).await;
    let mut client = server.booking().await;
    let booking = book_ok(&mut client, book_request(&slot, "VICTIM", "v1")).await;

    // Booking as the victim says the victim is booked, but not where.
    let status = client
        .book(book_request(&slot, "VICTIM", "attacker-1"))
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("CITIZEN_ALREADY_BOOKED"));
    assert_eq!(metadata(&status, "booking_id"), None);
    assert!(!status.message().contains(&booking.booking_id));

    // The booking id alone reads nothing: it needs its own citizen.
    let get = |citizen_id: &str| proto::GetBookingRequest {
        booking_id: booking.booking_id.clone(),
        citizen_id: citizen_id.into(),
    };
    let missing = client.get_booking(get("")).await.unwrap_err();
    assert_eq!(violated_fields(&missing), ["citizen_id"]);
    let stranger = client.get_booking(get("ATTACKER")).await.unwrap_err();
    assert_eq!(stranger.code(), Code::NotFound);
    assert_eq!(reason(&stranger).as_deref(), Some("BOOKING_NOT_FOUND"));
    let own = client
        .get_booking(get("VICTIM"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.booking.unwrap().booking_id, booking.booking_id);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_slots_do_not_burn_a_citizens_booking_quota() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.limits.rate_citizen_attempts_per_min = 3;
    let server = TestServer::start_with(dir.path(), config).await;
    let slot = one_slot_site(&server, "clinic", 5).await;
    let mut client = server.booking().await;
    for attempt in 0..10 {
        let status = client
            .book(book_request(
                "clinic/vax/1",
                "VICTIM",
                &format!("burn-{attempt}"),
            ))
            .await
            .unwrap_err();
        assert_eq!(reason(&status).as_deref(), Some("SLOT_NOT_FOUND"));
    }
    book_ok(&mut client, book_request(&slot, "VICTIM", "real")).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_citizens_bookings_are_limited_per_citizen() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.limits.rate_citizen_reads_per_min = 2;
    let server = TestServer::start_with(dir.path(), config).await;
    let slot = one_slot_site(&server, "clinic", 5).await;
    let mut client = server.booking().await;
    let booking = book_ok(&mut client, book_request(&slot, "VICTIM", "v1")).await;
    let list = || proto::ListCitizenBookingsRequest {
        citizen_id: "VICTIM".into(),
        ..Default::default()
    };
    client.list_citizen_bookings(list()).await.unwrap();
    client
        .get_booking(proto::GetBookingRequest {
            booking_id: booking.booking_id.clone(),
            citizen_id: "VICTIM".into(),
        })
        .await
        .unwrap();
    let limited = client.list_citizen_bookings(list()).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted);
    assert_eq!(reason(&limited).as_deref(), Some("RATE_LIMITED"));
    // Another citizen's reads are not affected.
    client
        .list_citizen_bookings(proto::ListCitizenBookingsRequest {
            citizen_id: "SOMEONE-ELSE".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fiscal_codes_are_one_citizen_whatever_their_case_and_never_with_a_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        citizen_id_scheme: prenota::domain::citizen_id::IdScheme::ItFiscalCode,
        ..Config::default()
    };
    let server = TestServer::start_with(dir.path(), config).await;
    let slot = one_slot_site(&server, "clinic", 5).await;
    let mut client = server.booking().await;
    book_ok(&mut client, book_request(&slot, "RSSMRA80A01H501U", "r1")).await;
    for variant in ["rssmra80a01h501u", " RSSMRA80A01H501U "] {
        let status = client
            .book(book_request(
                &slot,
                variant,
                &format!("again-{}", variant.trim()),
            ))
            .await
            .unwrap_err();
        assert_eq!(
            reason(&status).as_deref(),
            Some("CITIZEN_ALREADY_BOOKED"),
            "{variant:?}"
        );
    }
    for invalid in ["RSSMRA80A01H501U!", "RSSMRA80A01H501A", "someone"] {
        let status = client
            .book(book_request(&slot, invalid, "bad"))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["citizen_id"], "{invalid:?}");
    }
    // An omocodic code is another person, and so is a temporary code.
    book_ok(&mut client, book_request(&slot, "RSSMRA80A01H50MM", "omo")).await;
    book_ok(&mut client, book_request(&slot, "12345678903", "temp")).await;
    let listed = client
        .list_citizen_bookings(proto::ListCitizenBookingsRequest {
            citizen_id: "rssmra80a01h501u".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.bookings.len(), 1);
    assert_eq!(site_stats(&server, "clinic").await.booked, 3);
    server.stop().await;
}
