//! Holds and reschedules over gRPC, on a real server: a hold takes a place until it is
//! confirmed or expires; a reschedule moves a booking atomically.

use crate::common;

use std::time::Duration;

use common::*;
use prenota::config::Config;
use prenota::proto;
use prenota::service::Clock;
use tonic::Code;

fn hold_request(
    slot_id: &str,
    citizen_id: &str,
    request_id: &str,
    ttl: u32,
) -> proto::HoldSlotRequest {
    proto::HoldSlotRequest {
        slot_id: slot_id.into(),
        citizen_id: citizen_id.into(),
        request_id: request_id.into(),
        ttl_seconds: ttl,
    }
}

/// Holds and expects a hold back.
async fn hold_ok(
    client: &mut prenota::proto::booking_service_client::BookingServiceClient<
        tonic::transport::Channel,
    >,
    request: proto::HoldSlotRequest,
) -> proto::Hold {
    client
        .hold_slot(request)
        .await
        .expect("a hold")
        .into_inner()
        .hold
        .expect("the response carries the hold")
}

async fn remaining(server: &TestServer, site_id: &str) -> u32 {
    search_all(&mut server.booking().await, site_id, "vax").await[0].remaining
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_takes_the_place_and_book_confirms_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot = one_slot_site(&server, "hold-site", 1).await;
    let mut client = server.booking().await;

    let hold = hold_ok(&mut client, hold_request(&slot, "alice", "h1", 0)).await;
    assert_eq!(hold.slot_id, slot);
    let expires = hold.expires_at.unwrap().seconds - chrono::Utc::now().timestamp();
    assert!(
        (295..=301).contains(&expires),
        "default ttl is 300 s, got {expires}"
    );
    assert_eq!(remaining(&server, "hold-site").await, 0);
    let stats = site_stats(&server, "hold-site").await;
    assert_eq!((stats.booked, stats.held), (0, 1));

    // A retry returns the same hold; nobody else gets the place; the holder holds once.
    let again = hold_ok(&mut client, hold_request(&slot, "alice", "h1", 0)).await;
    assert_eq!(again.hold_id, hold.hold_id);
    let status = client
        .book(book_request(&slot, "bob", "b1"))
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("SLOT_FULL"));
    let status = client
        .hold_slot(hold_request(&slot, "alice", "h2", 0))
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("CITIZEN_ALREADY_BOOKED"));

    // Only the holder can confirm the hold.
    let mut stolen = book_request(&slot, "bob", "b2");
    stolen.hold_id = Some(hold.hold_id.clone());
    let status = client.book(stolen).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(reason(&status).as_deref(), Some("HOLD_NOT_FOUND"));

    let mut confirm = book_request(&slot, "alice", "a1");
    confirm.hold_id = Some(hold.hold_id.clone());
    let booking = book_ok(&mut client, confirm.clone()).await;
    assert_eq!(
        booking.booking_id, hold.hold_id,
        "the booking keeps the hold's id"
    );
    assert_eq!(booking.state, proto::BookingState::Confirmed as i32);
    assert_eq!(
        book_ok(&mut client, confirm).await.booking_id,
        booking.booking_id
    );
    let stats = site_stats(&server, "hold-site").await;
    assert_eq!((stats.booked, stats.held), (1, 0));
    assert_eq!(remaining(&server, "hold-site").await, 0);
    server.stop().await;
}

/// A config whose timer never sweeps during a test: the test sweeps by hand, on a
/// manual clock, so nothing depends on real time passing.
fn swept_by_hand() -> Config {
    let mut config = Config::default();
    config.limits.hold_sweep_interval_ms = 3_600_000;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_hold_returns_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), swept_by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "expiry-site", 1).await;
    let mut client = server.booking().await;
    let hold = hold_ok(&mut client, hold_request(&slot, "alice", "h1", 1)).await;
    assert_eq!(remaining(&server, "expiry-site").await, 0);

    // Due at exactly its ttl, not a millisecond before.
    clock.advance(Duration::from_millis(999));
    assert_eq!(server.sweep_holds().await, 0);
    assert_eq!(remaining(&server, "expiry-site").await, 0);
    clock.advance(Duration::from_millis(1));
    assert_eq!(server.sweep_holds().await, 1);
    assert_eq!(remaining(&server, "expiry-site").await, 1);
    let stats = site_stats(&server, "expiry-site").await;
    assert_eq!((stats.booked, stats.held), (0, 0));

    let mut late = book_request(&slot, "alice", "a1");
    late.hold_id = Some(hold.hold_id.clone());
    let status = client.book(late).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status).as_deref(), Some("HOLD_EXPIRED"));

    // The place and the citizen's limit are free again.
    book_ok(&mut client, book_request(&slot, "bob", "b1")).await;
    client
        .hold_slot(hold_request(&slot, "alice", "h2", 0))
        .await
        .map(|_| ())
        .expect_err("the slot is full now");
    server.stop().await;
}

/// A citizen's list, first page (of `service_id` if given).
async fn list_of(
    client: &mut prenota::proto::booking_service_client::BookingServiceClient<
        tonic::transport::Channel,
    >,
    citizen_id: &str,
    service_id: Option<&str>,
) -> proto::ListCitizenBookingsResponse {
    let request = proto::ListCitizenBookingsRequest {
        citizen_id: citizen_id.into(),
        service_id: service_id.map(Into::into),
        page_size: 10,
        page_token: String::new(),
    };
    let listed = client.list_citizen_bookings(request).await;
    listed.expect("a list").into_inner()
}

/// A citizen who left a hold behind (their app closed) could not find it: it counts
/// against their limit (CITIZEN_ALREADY_BOOKED) but their list showed nothing. Now the
/// list's first page carries their live holds, of the service asked for, until they
/// are confirmed or their time is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_citizen_finds_their_live_hold_in_their_list() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), swept_by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "listed-hold", 4).await;
    let mut client = server.booking().await;
    let held = hold_ok(&mut client, hold_request(&slot, "alice", "h1", 60)).await;
    let other = hold_ok(&mut client, hold_request(&slot, "bob", "h2", 60)).await;
    let listed = list_of(&mut client, "alice", None).await;
    assert_eq!(
        (listed.holds, listed.bookings),
        (vec![held.clone()], vec![])
    );
    let listed = list_of(&mut client, "alice", Some("vax")).await;
    assert_eq!(listed.holds, std::slice::from_ref(&held));
    let listed = list_of(&mut client, "alice", Some("other-service")).await;
    assert!(listed.holds.is_empty(), "of the service asked for");
    assert!(list_of(&mut client, "carol", None).await.holds.is_empty());

    let mut confirm = book_request(&slot, "alice", "a1");
    confirm.hold_id = Some(held.hold_id.clone());
    book_ok(&mut client, confirm).await;
    let listed = list_of(&mut client, "alice", None).await;
    assert!(listed.holds.is_empty(), "confirmed: a booking now");
    assert_eq!(listed.bookings[0].booking_id, held.hold_id);

    assert_eq!(list_of(&mut client, "bob", None).await.holds, [other]);
    clock.advance(Duration::from_secs(60));
    let listed = list_of(&mut client, "bob", None).await;
    assert!(listed.holds.is_empty(), "its time is up, swept or not");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_hold_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot = one_slot_site(&server, "durable-hold", 2).await;
    let hold = hold_ok(
        &mut server.booking().await,
        hold_request(&slot, "alice", "h1", 300),
    )
    .await;
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let stats = site_stats(&server, "durable-hold").await;
    assert_eq!((stats.booked, stats.held), (0, 1));
    let mut client = server.booking().await;
    let listed = list_of(&mut client, "alice", None).await;
    assert_eq!(
        listed.holds,
        std::slice::from_ref(&hold),
        "listed after the restart"
    );
    let retried = hold_ok(&mut client, hold_request(&slot, "alice", "h1", 300)).await;
    assert_eq!(
        retried, hold,
        "a retry after the restart returns the same hold"
    );
    let mut confirm = book_request(&slot, "alice", "a1");
    confirm.hold_id = Some(hold.hold_id.clone());
    book_ok(&mut client, confirm).await;
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let stats = site_stats(&server, "durable-hold").await;
    assert_eq!((stats.booked, stats.held), (1, 0));
    server.stop().await;
}

async fn reschedule(
    client: &mut prenota::proto::booking_service_client::BookingServiceClient<
        tonic::transport::Channel,
    >,
    booking_id: &str,
    citizen_id: &str,
    new_slot_id: &str,
    request_id: &str,
) -> Result<proto::Booking, tonic::Status> {
    client
        .reschedule_booking(proto::RescheduleBookingRequest {
            booking_id: booking_id.into(),
            citizen_id: citizen_id.into(),
            new_slot_id: new_slot_id.into(),
            request_id: request_id.into(),
        })
        .await
        .map(|response| response.into_inner().booking.unwrap())
}

async fn citizen_bookings(server: &TestServer, citizen_id: &str) -> Vec<proto::Booking> {
    server
        .booking()
        .await
        .list_citizen_bookings(proto::ListCitizenBookingsRequest {
            citizen_id: citizen_id.into(),
            service_id: Some("vax".into()),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner()
        .bookings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_reschedules_into_one_last_seat_have_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    for round in 0..10 {
        let source = one_slot_site(&server, &format!("from-{round}"), 2).await;
        let target = one_slot_site(&server, &format!("to-{round}"), 1).await;
        let mut client = server.booking().await;
        let citizens = [format!("c{round}-a"), format!("c{round}-b")];
        let mut booked = Vec::new();
        for citizen in &citizens {
            booked.push(
                book_ok(
                    &mut client,
                    book_request(&source, citizen, &format!("{citizen}-book")),
                )
                .await,
            );
        }
        let racers = citizens.iter().zip(&booked).map(|(citizen, booking)| {
            let (mut client, target) = (client.clone(), target.clone());
            let (citizen, booking_id) = (citizen.clone(), booking.booking_id.clone());
            tokio::spawn(async move {
                reschedule(
                    &mut client,
                    &booking_id,
                    &citizen,
                    &target,
                    &format!("{citizen}-move"),
                )
                .await
            })
        });
        let outcomes: Vec<_> = futures::future::join_all(racers)
            .await
            .into_iter()
            .map(|joined| joined.unwrap())
            .collect();
        let winners: Vec<_> = outcomes.iter().filter(|o| o.is_ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        for (index, outcome) in outcomes.iter().enumerate() {
            let old = client
                .get_booking(proto::GetBookingRequest {
                    booking_id: booked[index].booking_id.clone(),
                    citizen_id: citizens[index].clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .booking
                .unwrap();
            let listed = citizen_bookings(&server, &citizens[index]).await;
            let confirmed: Vec<_> = listed
                .iter()
                .filter(|b| b.state == proto::BookingState::Confirmed as i32)
                .collect();
            assert_eq!(
                confirmed.len(),
                1,
                "never zero, never two bookings: {listed:?}"
            );
            match outcome {
                Ok(new) => {
                    assert_eq!(new.slot_id, target);
                    assert_eq!(old.state, proto::BookingState::Cancelled as i32);
                    assert_eq!(old.cancel_reason, "rescheduled", "names no booking");
                    assert_eq!(confirmed[0].booking_id, new.booking_id);
                    assert_eq!(listed.len(), 2);
                }
                Err(status) => {
                    assert_eq!(reason(status).as_deref(), Some("SLOT_FULL"), "{status:?}");
                    assert_eq!(
                        old.state,
                        proto::BookingState::Confirmed as i32,
                        "the loser keeps its booking"
                    );
                    assert_eq!(confirmed[0].booking_id, old.booking_id);
                }
            }
        }
        assert_eq!(
            site_stats(&server, &format!("from-{round}")).await.booked,
            1
        );
        assert_eq!(site_stats(&server, &format!("to-{round}")).await.booked, 1);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reschedule_is_idempotent_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let source = one_slot_site(&server, "old-place", 1).await;
    let target = one_slot_site(&server, "new-place", 1).await;
    let mut client = server.booking().await;
    let booking = book_ok(&mut client, book_request(&source, "alice", "book")).await;

    let status = reschedule(&mut client, &booking.booking_id, "mallory", &target, "m")
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("BOOKING_NOT_FOUND"));
    let status = reschedule(&mut client, &booking.booking_id, "alice", &source, "same")
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["new_slot_id"]);

    let moved = reschedule(&mut client, &booking.booking_id, "alice", &target, "move")
        .await
        .unwrap();
    let retried = reschedule(&mut client, &booking.booking_id, "alice", &target, "move")
        .await
        .unwrap();
    assert_eq!(
        retried.booking_id, moved.booking_id,
        "a retry returns the first outcome"
    );
    let status = reschedule(&mut client, &booking.booking_id, "alice", &target, "again")
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("BOOKING_NOT_ACTIVE"));
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    assert_eq!(site_stats(&server, "old-place").await.booked, 0);
    assert_eq!(site_stats(&server, "new-place").await.booked, 1);
    let listed = citizen_bookings(&server, "alice").await;
    assert_eq!(listed.len(), 2);
    assert!(listed
        .iter()
        .any(|b| b.booking_id == moved.booking_id
            && b.state == proto::BookingState::Confirmed as i32));
    // The freed place can be booked by someone else.
    book_ok(
        &mut server.booking().await,
        book_request(&source, "bob", "b"),
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_that_expires_while_the_server_is_down_is_expired_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let start = || TestServer::start_with_clock(dir.path(), swept_by_hand(), clock.clone());
    let server = start().await;
    let slot = one_slot_site(&server, "down-expiry", 1).await;
    hold_ok(
        &mut server.booking().await,
        hold_request(&slot, "alice", "h1", 1),
    )
    .await;
    server.stop().await;
    clock.advance(Duration::from_millis(1_200));

    let server = start().await;
    assert_eq!(
        remaining(&server, "down-expiry").await,
        0,
        "recovery restores the live hold; the first sweep expires it"
    );
    assert_eq!(server.sweep_holds().await, 1);
    assert_eq!(remaining(&server, "down-expiry").await, 1);
    assert_eq!(site_stats(&server, "down-expiry").await.held, 0);
    // Expired for good: the place stays free after another restart.
    server.stop().await;
    let server = start().await;
    assert_eq!(remaining(&server, "down-expiry").await, 1);
    book_ok(&mut server.booking().await, book_request(&slot, "bob", "b")).await;
    server.stop().await;
}

/// Hoarding with made-up citizen ids (#13): at most half of a slot's places (by
/// default) may be held at once; a citizen who books directly still gets a place, and
/// a confirmed or expired hold frees its share. Holds last at most 600 s by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_citizens_can_hold_only_a_share_of_a_slot() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), swept_by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "hoard", 10).await;
    let mut client = server.booking().await;
    let mut holds = Vec::new();
    for bot in 0..5 {
        let citizen = format!("bot-{bot}");
        holds.push(hold_ok(&mut client, hold_request(&slot, &citizen, &citizen, 60)).await);
    }
    let status = client
        .hold_slot(hold_request(&slot, "bot-5", "bot-5", 60))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status).as_deref(), Some("HOLD_LIMIT_REACHED"));
    assert_eq!(metadata(&status, "slot_id").as_deref(), Some(slot.as_str()));
    assert_eq!(
        remaining(&server, "hoard").await,
        5,
        "the refused hold took nothing"
    );

    // A real citizen books directly; a confirmed hold frees its share.
    book_ok(&mut client, book_request(&slot, "citizen", "c1")).await;
    let mut confirm = book_request(&slot, "bot-0", "bot-0-book");
    confirm.hold_id = Some(holds[0].hold_id.clone());
    book_ok(&mut client, confirm).await;
    hold_ok(&mut client, hold_request(&slot, "bot-6", "bot-6", 60)).await;
    // Expired holds free theirs.
    clock.advance(Duration::from_secs(60));
    assert_eq!(server.sweep_holds().await, 5);
    hold_ok(&mut client, hold_request(&slot, "bot-7", "bot-7", 60)).await;

    let too_long = client
        .hold_slot(hold_request(&slot, "bot-8", "bot-8", 601))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&too_long), ["ttl_seconds"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_of_one_place_can_still_be_held() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot = one_slot_site(&server, "single", 1).await;
    let mut client = server.booking().await;
    hold_ok(&mut client, hold_request(&slot, "alice", "a", 60)).await;
    server.stop().await;
}

/// Racing bots get exactly the held share, and it still holds after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_holds_get_exactly_the_share_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot = one_slot_site(&server, "race-hold", 10).await;
    let client = server.booking().await;
    let racers: Vec<_> = (0..32)
        .map(|bot| {
            let (mut client, slot) = (client.clone(), slot.clone());
            tokio::spawn(async move {
                let citizen = format!("racer-{bot}");
                client
                    .hold_slot(hold_request(&slot, &citizen, &citizen, 300))
                    .await
            })
        })
        .collect();
    let mut held = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(_) => held += 1,
            Err(status) => {
                assert_eq!(reason(&status).as_deref(), Some("HOLD_LIMIT_REACHED"))
            }
        }
    }
    assert_eq!(held, 5);
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let status = server
        .booking()
        .await
        .hold_slot(hold_request(&slot, "late", "late", 300))
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("HOLD_LIMIT_REACHED"));
    server.stop().await;
}

/// Rewrites every hold record of the stopped server on `data_dir` as a build before
/// hold ids sealed their second stored it: under `H` + hold id, and made in another
/// second than the one its id seals (those ids were random). Returns how many.
fn store_holds_as_an_older_build(data_dir: &std::path::Path) -> i64 {
    if common::postgres::asked() {
        let url = common::postgres::url_of_dir(data_dir);
        return common::postgres::rewrite_records(&url, b'O', as_an_older_build_stored);
    }
    let db = common::open_stopped_sled(&data_dir.join("sled"));
    let mut moved = 0;
    for record in db.scan_prefix(b"O") {
        let (key, value) = record.unwrap();
        let (old_key, old_value) = as_an_older_build_stored(&key, &value);
        db.insert(old_key, old_value).unwrap();
        db.remove(key).unwrap();
        moved += 1;
    }
    db.flush().unwrap();
    moved
}

fn as_an_older_build_stored(key: &[u8], value: &[u8]) -> (Vec<u8>, Vec<u8>) {
    use prenota::store::records::Record;
    assert_eq!(key.len(), 21, "O + second + hold id");
    let mut hold = prenota::domain::hold::Hold::decode_value(key, value).unwrap();
    hold.created_at_unix_ms -= 1_000;
    (
        [&b"H"[..], &key[5..]].concat(),
        hold.encode_value().unwrap(),
    )
}

/// Hold records still under their old keys, on the stopped server's data dir.
fn holds_under_old_keys(data_dir: &std::path::Path) -> i64 {
    if common::postgres::asked() {
        let sql = "SELECT count(*) FROM prenota_kv WHERE get_byte(k, 0) = 72";
        return common::postgres::query_i64(&common::postgres::url_of_dir(data_dir), sql);
    }
    let db = common::open_stopped_sled(&data_dir.join("sled"));
    db.scan_prefix(b"H").count() as i64
}

/// A store written before hold ids sealed their second keeps its holds under their
/// old keys: after the upgrade an expired one still answers HOLD_EXPIRED and a retry of
/// its request still gets it back, a live one is still confirmed (its record written
/// where it was, and found there by a retry), and retention still deletes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_stored_under_their_old_keys_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "old-keys", 5).await;
    let mut client = server.booking().await;
    let expired = hold_ok(&mut client, hold_request(&slot, "bob", "h-bob", 60)).await;
    clock.advance(Duration::from_secs(61));
    assert_eq!(server.sweep_holds().await, 1);
    let live = hold_ok(&mut client, hold_request(&slot, "alice", "h-alice", 600)).await;
    server.stop().await;
    assert_eq!(store_holds_as_an_older_build(dir.path()), 2);

    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let mut client = server.booking().await;
    let retried = hold_ok(&mut client, hold_request(&slot, "bob", "h-bob", 60)).await;
    assert_eq!(
        retried.hold_id, expired.hold_id,
        "the first outcome, read back"
    );
    let mut late = book_request(&slot, "bob", "b1");
    late.hold_id = Some(expired.hold_id.clone());
    let status = client.book(late).await.unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("HOLD_EXPIRED"));
    let mut confirm = book_request(&slot, "alice", "a1");
    confirm.hold_id = Some(live.hold_id.clone());
    let booked = book_ok(&mut client, confirm).await;
    assert_eq!(booked.booking_id, live.hold_id);
    let again = hold_ok(&mut client, hold_request(&slot, "alice", "h-alice", 600)).await;
    assert_eq!(again.hold_id, live.hold_id, "the confirmed hold, read back");
    let stats = site_stats(&server, "old-keys").await;
    assert_eq!((stats.booked, stats.held), (1, 0));
    server.stop().await;
    assert_eq!(
        holds_under_old_keys(dir.path()),
        2,
        "written where they were"
    );

    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    clock.advance(Duration::from_secs(73 * 3_600));
    assert_eq!(server.retain().await.holds, 2);
    server.stop().await;
    assert_eq!(holds_under_old_keys(dir.path()), 0);
}
