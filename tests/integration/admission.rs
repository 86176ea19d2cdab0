//! Admission control on a real server: per-citizen attempt limits, per-token request
//! limits, and load shedding that answers at once while health still answers.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use prenota::config::{token_sha256, Config, ConfigFile};
use prenota::proto;
use tonic::Code;

/// A client that got no answer (a timeout, a dropped connection) retries with the same
/// `request_id`: however often, it gets the first outcome back, since a retry answered
/// from the request registry is no new attempt; a new request still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_an_answered_request_get_its_outcome_past_the_attempt_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.limits.rate_citizen_attempts_per_min = 2;
    let server = TestServer::start_with(dir.path(), config).await;
    let slot = one_slot_site(&server, "retried", 10).await;
    let mut client = server.booking().await;
    let booking = book_ok(&mut client, book_request(&slot, "retrier", "r1")).await;
    for _ in 0..5 {
        let again = book_ok(&mut client, book_request(&slot, "retrier", "r1")).await;
        assert_eq!(again.booking_id, booking.booking_id, "the first outcome");
    }
    let second = client.book(book_request(&slot, "retrier", "r2")).await;
    let status = second.unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("CITIZEN_ALREADY_BOOKED"));
    let third = client.book(book_request(&slot, "retrier", "r3")).await;
    let status = third.unwrap_err();
    assert_eq!(
        reason(&status).as_deref(),
        Some("RATE_LIMITED"),
        "a new request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_citizen_bursting_past_the_limit_waits_and_keeps_its_booking() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.limits.rate_citizen_attempts_per_min = 3;
    let server = TestServer::start_with(dir.path(), config).await;
    let slot = one_slot_site(&server, "limited", 10).await;
    let mut client = server.booking().await;
    let booking = book_ok(&mut client, book_request(&slot, "eager", "1")).await;
    for attempt in ["2", "3"] {
        let status = client
            .book(book_request(&slot, "eager", attempt))
            .await
            .unwrap_err();
        assert_eq!(reason(&status).as_deref(), Some("CITIZEN_ALREADY_BOOKED"));
    }
    let status = client
        .book(book_request(&slot, "eager", "4"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status).as_deref(), Some("RATE_LIMITED"));
    let wait = retry_delay(&status);
    assert!(
        wait > Duration::from_secs(1) && wait <= Duration::from_secs(20),
        "{wait:?}"
    );
    // Holds and reschedules count too; other citizens are not affected.
    let status = client
        .hold_slot(proto::HoldSlotRequest {
            slot_id: slot.clone(),
            citizen_id: "eager".into(),
            request_id: "5".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("RATE_LIMITED"));
    book_ok(&mut client, book_request(&slot, "patient", "p1")).await;
    let kept = client
        .get_booking(proto::GetBookingRequest {
            booking_id: booking.booking_id.clone(),
            citizen_id: "eager".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .booking
        .unwrap();
    assert_eq!(kept.state, proto::BookingState::Confirmed as i32);
    assert_eq!(site_stats(&server, "limited").await.booked, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_past_its_rate_is_refused_with_the_wait() {
    const TOKEN: &str = "frontend-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[limits]\nrate_token_requests_per_s = 2\n\n[[tokens]]\nname = \"web\"\nsha256 = \"{}\"\nrole = \"frontend\"\n",
        hex::encode(token_sha256(TOKEN))
    );
    let config = toml::from_str::<ConfigFile>(&text)
        .unwrap()
        .check()
        .unwrap();
    let server = TestServer::start_with(dir.path(), config).await;
    let mut client = prenota::proto::booking_service_client::BookingServiceClient::with_interceptor(
        server.channel().await,
        Bearer(Some(TOKEN)),
    );
    let search = proto::SearchSlotsRequest {
        scope: Some(proto::search_slots_request::Scope::RegionId(
            "nowhere".into(),
        )),
        service_id: "vax".into(),
        ..Default::default()
    };
    let mut refused = None;
    for _ in 0..10 {
        if let Err(status) = client.search_slots(search.clone()).await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.expect("the third request within a second is refused");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status).as_deref(), Some("RATE_LIMITED"));
    assert!(retry_delay(&status) > Duration::ZERO);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_in_flight_limit_requests_are_shed_at_once_and_health_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.limits.in_flight_requests_max = 1;
    let server = TestServer::start_with(dir.path(), config).await;
    let mut capacity = server.capacity().await;
    upsert_site(&mut capacity, "busy", "r", "Etc/UTC").await;

    // An import whose client stream stays open holds the only place in flight.
    let (rows, held) = stalled_import(&server, None).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut booking = server.booking().await;
    let search = proto::SearchSlotsRequest {
        scope: Some(proto::search_slots_request::Scope::SiteId("busy".into())),
        service_id: "vax".into(),
        ..Default::default()
    };
    let mut shed = 0;
    let started = Instant::now();
    for _ in 0..100 {
        let status = booking.search_slots(search.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(reason(&status).as_deref(), Some("OVERLOADED"));
        assert!(retry_delay(&status) > Duration::ZERO);
        shed += 1;
    }
    let per_request = started.elapsed() / shed;
    assert!(
        per_request < Duration::from_millis(100),
        "shedding must be fast: {per_request:?}"
    );
    let health = tonic_health::pb::health_client::HealthClient::new(server.channel().await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "prenota.v1.BookingService".into(),
        })
        .await
        .expect("health answers while shedding")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    drop(rows); // the import ends (with no rows): the place is free again
    let _ = held.await.unwrap();
    booking.search_slots(search).await.expect("served again");
    server.stop().await;
}

/// An import takes its in-flight place from its headers (its rows stream in), so
/// stalled imports could hold every place. Imports have a pool of their own
/// (`imports_max`): past it a new one is shed at once while other calls are served, and
/// an import that ends gives its place back. In open mode every caller is the one
/// token, so `imports_per_token_max` does not apply there (it would only lower the
/// pool; `auth.rs` tests it with two authorities).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_imports_hold_at_most_their_pools_places() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.limits.imports_max = 2;
    config.limits.imports_per_token_max = 1;
    let server = TestServer::start_with(dir.path(), config).await;
    let mut capacity = server.capacity().await;
    upsert_site(&mut capacity, "busy", "r", "Etc/UTC").await;
    let mut imports = Vec::new();
    for _ in 0..3 {
        imports.push(stalled_import(&server, None).await);
    }
    // Whatever order they arrive in, one of the three is shed and two are held.
    let shed = first_finished(&mut imports).await;
    let refused = shed.expect_err("past imports_max");
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(reason(&refused).as_deref(), Some("OVERLOADED"));
    search_all(&mut server.booking().await, "busy", "vax").await; // other calls are served
    assert!(
        imports.iter().all(|(_, call)| !call.is_finished()),
        "two held: the per-token share does not apply in open mode"
    );
    let (first_rows, first) = imports.remove(0);
    drop(first_rows); // the first import ends: its place is free again
    let served = first.await.unwrap().expect_err("an import of no rows");
    assert_eq!(served.code(), Code::InvalidArgument, "served, not shed");
    let (again_rows, again) = stalled_import(&server, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!again.is_finished(), "admitted in the place given back");
    drop(again_rows);
    let served = again.await.unwrap().expect_err("an import of no rows");
    assert_eq!(served.code(), Code::InvalidArgument, "served, not shed");
    for (rows, call) in imports {
        drop(rows);
        call.await.unwrap().expect_err("an import of no rows");
    }
    server.stop().await;
}
