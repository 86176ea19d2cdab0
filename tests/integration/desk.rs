//! References, check-in and no-shows (PRODUCT.md part D) on a real server: every
//! booking gets a reference and a check-in code; the citizen finds it by reference; the
//! site's desk lists a slot's roster, checks citizens in with their code (guessing is
//! stopped per reference) and marks no-shows once the slot ended; a site token works
//! its own sites only. All of it survives a restart.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use prenota::config::{token_sha256, Config, ConfigFile};
use prenota::proto;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::site_service_client::SiteServiceClient;
use prenota::service::Clock;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

fn check_in(reference: &str, code: &str) -> proto::CheckInRequest {
    proto::CheckInRequest {
        reference: reference.into(),
        check_in_code: code.into(),
    }
}

fn no_show(reference: &str) -> proto::MarkNoShowRequest {
    proto::MarkNoShowRequest {
        reference: reference.into(),
    }
}

/// Moves the clock to one hour before the slot starts: check-in is open.
fn to_an_hour_before(clock: &Clock, slot_id: &str) {
    let start: i64 = slot_id.rsplit('/').next().unwrap().parse().unwrap();
    let target_ms = (start - 3_600) * 1_000;
    let now_ms = clock.now_unix_ms();
    assert!(target_ms > now_ms, "the slot is ahead");
    clock.advance(Duration::from_millis((target_ms - now_ms) as u64));
}

fn state(booking: &proto::Booking) -> proto::BookingState {
    proto::BookingState::try_from(booking.state).unwrap()
}

/// The slot's roster: (reference, state), sorted by reference.
async fn roster(site: &mut SiteServiceClient<Channel>, slot_id: &str) -> Vec<(String, i32)> {
    let (mut entries, mut page_token) = (Vec::new(), String::new());
    loop {
        let page = site
            .list_slot_bookings(proto::ListSlotBookingsRequest {
                slot_id: slot_id.into(),
                page_size: 2,
                page_token,
            })
            .await
            .expect("the roster")
            .into_inner();
        entries.extend(page.bookings.into_iter().map(|b| (b.reference, b.state)));
        if page.next_page_token.is_empty() {
            return entries;
        }
        page_token = page.next_page_token;
    }
}

/// Every exported booking's (reference, state), sorted; exports never carry a code.
async fn exported_states(server: &TestServer) -> Vec<(String, i32)> {
    let exported = export_all(server.channel().await).await;
    let mut states: Vec<(String, i32)> = exported
        .iter()
        .map(|b| {
            assert!(b.check_in_code.is_empty(), "no code in exports");
            (b.reference.clone(), b.state)
        })
        .collect();
    states.sort();
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_desk_checks_citizens_in_and_marks_no_shows_after_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "desk", 5).await;
    let mut client = server.booking().await;
    let mut site = SiteServiceClient::new(server.channel().await);

    let mut booked = Vec::new();
    for citizen in ["ANNA", "BRUNO", "CARLA"] {
        let booking = book_ok(&mut client, book_request(&slot, citizen, citizen)).await;
        assert_eq!(booking.reference.len(), 8, "{booking:?}");
        assert_eq!(booking.check_in_code.len(), 4, "{booking:?}");
        assert!(booking.check_in_code.bytes().all(|b| b.is_ascii_digit()));
        booked.push(booking);
    }
    let references: HashSet<&str> = booked.iter().map(|b| b.reference.as_str()).collect();
    assert_eq!(references.len(), 3, "references are distinct");
    let (anna, bruno) = (&booked[0], &booked[1]);

    // The citizen finds its booking by reference, read as said over the phone.
    let spoken = format!("{}-{}", &anna.reference[..4], &anna.reference[4..]).to_lowercase();
    let found = client
        .get_booking_by_reference(proto::GetBookingByReferenceRequest {
            reference: spoken,
            citizen_id: "ANNA".into(),
        })
        .await
        .expect("found by reference")
        .into_inner()
        .booking
        .unwrap();
    assert_eq!(found.booking_id, anna.booking_id);
    assert_eq!(found.check_in_code, anna.check_in_code);
    // Another citizen's reference is unknown to this one.
    let status = client
        .get_booking_by_reference(proto::GetBookingByReferenceRequest {
            reference: anna.reference.clone(),
            citizen_id: "BRUNO".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("BOOKING_NOT_FOUND"));

    // The desk's roster: every booking by reference, never a code.
    let mut expected: Vec<(String, i32)> = booked
        .iter()
        .map(|b| (b.reference.clone(), proto::BookingState::Confirmed as i32))
        .collect();
    expected.sort();
    assert_eq!(roster(&mut site, &slot).await, expected);

    // Check-in opens a day before the slot (check_in_window_hours).
    let status = site
        .check_in(check_in(&anna.reference, &anna.check_in_code))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_deref()),
        (Code::FailedPrecondition, Some("CHECK_IN_CLOSED"))
    );
    to_an_hour_before(&clock, &slot);

    // A wrong code is refused; the right one checks in, again and again.
    let wrong = if anna.check_in_code == "0000" {
        "0001"
    } else {
        "0000"
    };
    let status = site
        .check_in(check_in(&anna.reference, wrong))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_deref()),
        (Code::PermissionDenied, Some("CHECK_IN_CODE_WRONG"))
    );
    for _ in 0..2 {
        let attended = site
            .check_in(check_in(&anna.reference, &anna.check_in_code))
            .await
            .expect("checked in")
            .into_inner()
            .booking
            .unwrap();
        assert_eq!(state(&attended), proto::BookingState::Attended);
        assert!(
            attended.check_in_code.is_empty(),
            "the desk never sees a code"
        );
        assert!(attended.attendance_at.is_some());
    }
    // An attended booking can be neither cancelled nor moved.
    let status = client
        .cancel_booking(proto::CancelBookingRequest {
            booking_id: anna.booking_id.clone(),
            citizen_id: "ANNA".into(),
            request_id: "anna-cancel".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("BOOKING_NOT_ACTIVE"));

    // No-shows are marked after the slot ended, not before.
    let status = site
        .mark_no_show(no_show(&bruno.reference))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_deref()),
        (Code::FailedPrecondition, Some("SLOT_NOT_ENDED"))
    );
    clock.advance(Duration::from_secs(31 * 24 * 3600));
    let missed = site
        .mark_no_show(no_show(&bruno.reference))
        .await
        .expect("marked")
        .into_inner()
        .booking
        .unwrap();
    assert_eq!(state(&missed), proto::BookingState::NoShow);
    let status = site
        .mark_no_show(no_show(&anna.reference))
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("BOOKING_NOT_ACTIVE"));

    // Attended and no-show bookings keep their places; exports show the states and the
    // references, never a code; the event log has both.
    let mut expected = vec![
        (anna.reference.clone(), proto::BookingState::Attended as i32),
        (bruno.reference.clone(), proto::BookingState::NoShow as i32),
        (
            booked[2].reference.clone(),
            proto::BookingState::Confirmed as i32,
        ),
    ];
    expected.sort();
    assert_eq!(exported_states(&server).await, expected);
    let stats = site_stats(&server, "desk").await;
    assert_eq!((stats.booked, stats.attended, stats.no_shows), (3, 1, 1));
    assert_eq!((stats.by_day[0].attended, stats.by_day[0].no_shows), (1, 1));
    let events = first_events(&server, 5).await;
    let kinds: Vec<i32> = events.iter().map(|event| event.kind).collect();
    assert_eq!(
        &kinds[3..],
        [
            proto::EventKind::CheckedIn as i32,
            proto::EventKind::NoShow as i32
        ]
    );
    // Events carry the references the citizens were given, never a code.
    let references: Vec<&str> = (events.iter())
        .map(|event| event.booking.as_ref().unwrap().reference.as_str())
        .collect();
    assert_eq!(references[3..], [&anna.reference, &bruno.reference]);
    assert!(events
        .iter()
        .all(|event| event.booking.as_ref().unwrap().check_in_code.is_empty()));

    // After a restart: the same states, places, references and roster.
    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    assert_eq!(exported_states(&server).await, expected);
    assert_eq!(site_stats(&server, "desk").await.booked, 3);
    let mut site = SiteServiceClient::new(server.channel().await);
    let after = roster(&mut site, &slot).await;
    assert_eq!(after.len(), 3);
    assert!(after.contains(&(anna.reference.clone(), proto::BookingState::Attended as i32)));
    // Its window has closed: checking in again answers that, whatever the code.
    let closed = site
        .check_in(check_in(&anna.reference, &anna.check_in_code))
        .await
        .unwrap_err();
    assert_eq!(reason(&closed).as_deref(), Some("CHECK_IN_CLOSED"));
    server.stop().await;
}

/// Taps at once at the desk (the same check-in sent eight times together): each is
/// answered with the booking attended, none with BOOKING_NOT_ACTIVE (a tap that lost
/// the claim waits for the write that won it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taps_sent_together_are_all_answered_attended() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "taps", 10).await;
    let mut client = server.booking().await;
    let mut booked = Vec::new();
    for citizen in 0..6 {
        let citizen = format!("tap-{citizen}");
        booked.push(book_ok(&mut client, book_request(&slot, &citizen, &citizen)).await);
    }
    to_an_hour_before(&clock, &slot);
    let channel = server.channel().await;
    for booking in &booked {
        let taps = (0..8).map(|_| {
            let request = check_in(&booking.reference, &booking.check_in_code);
            let mut site = SiteServiceClient::new(channel.clone());
            tokio::spawn(async move { site.check_in(request).await })
        });
        for tap in futures::future::join_all(taps).await {
            let answered = tap.unwrap().expect("every tap is answered");
            let attended = answered.into_inner().booking.unwrap();
            assert_eq!(state(&attended), proto::BookingState::Attended);
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_a_check_in_code_is_stopped_per_reference() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "guess", 2).await;
    let mut client = server.booking().await;
    let victim = book_ok(&mut client, book_request(&slot, "VICTIM", "v")).await;
    let other = book_ok(&mut client, book_request(&slot, "OTHER", "o")).await;
    let mut site = SiteServiceClient::new(server.channel().await);
    // Before the window opens, every code answers the same and no try is counted: the
    // closed window is no oracle and guessing can only start when the desk opens.
    for code in (0..20).map(|code| format!("{code:04}")) {
        let status = site
            .check_in(check_in(&victim.reference, &code))
            .await
            .unwrap_err();
        assert_eq!(
            reason(&status).as_deref(),
            Some("CHECK_IN_CLOSED"),
            "{code}"
        );
    }
    to_an_hour_before(&clock, &slot);

    // Every one of the 10,000 codes, the right one last of all but after the first
    // `check_in_tries_max` (5) wrong ones: none gets in.
    let mut codes: Vec<String> = (0..10_000).map(|code| format!("{code:04}")).collect();
    codes.retain(|code| *code != victim.check_in_code);
    codes.insert(5, victim.check_in_code.clone());
    let (mut wrong, mut locked) = (0, 0);
    for code in &codes {
        match site.check_in(check_in(&victim.reference, code)).await {
            Ok(_) => panic!("code {code} got in after {wrong} wrong and {locked} locked tries"),
            Err(status) if reason(&status).as_deref() == Some("CHECK_IN_CODE_WRONG") => wrong += 1,
            Err(status) => {
                assert_eq!(
                    (status.code(), reason(&status).as_deref()),
                    (Code::ResourceExhausted, Some("RATE_LIMITED"))
                );
                assert!(retry_delay(&status) > Duration::ZERO);
                locked += 1;
            }
        }
    }
    assert_eq!((wrong, locked), (5, 9_995));
    // Another reference is not locked by it.
    site.check_in(check_in(&other.reference, &other.check_in_code))
        .await
        .expect("another booking checks in");
    // Once the lock ends, the right code works.
    clock.advance(Duration::from_secs(901));
    let attended = site
        .check_in(check_in(&victim.reference, &victim.check_in_code))
        .await
        .expect("checked in after the lock")
        .into_inner()
        .booking
        .unwrap();
    assert_eq!(state(&attended), proto::BookingState::Attended);
    // Malformed input is named, not guessed at.
    let status = site.check_in(check_in("nope", "12a4")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut fields = violated_fields(&status);
    fields.sort();
    assert_eq!(fields, ["check_in_code", "reference"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescheduled_booking_gets_a_new_reference_and_the_old_one_reads_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    utc_site_on(
        server.channel().await,
        ("move", "r"),
        30,
        ("10:00", "11:00"),
        3,
    )
    .await;
    let mut client = server.booking().await;
    let slots = search_all(&mut client, "move", "vax").await;
    let first = book_ok(&mut client, book_request(&slots[0].slot_id, "MOVER", "m1")).await;
    let moved = client
        .reschedule_booking(proto::RescheduleBookingRequest {
            booking_id: first.booking_id.clone(),
            citizen_id: "MOVER".into(),
            new_slot_id: slots[1].slot_id.clone(),
            request_id: "m2".into(),
        })
        .await
        .expect("moved")
        .into_inner()
        .booking
        .unwrap();
    assert_ne!(moved.reference, first.reference);
    let by_reference = |reference: &str| proto::GetBookingByReferenceRequest {
        reference: reference.into(),
        citizen_id: "MOVER".into(),
    };
    let old = client
        .get_booking_by_reference(by_reference(&first.reference))
        .await
        .unwrap()
        .into_inner()
        .booking
        .unwrap();
    assert_eq!(state(&old), proto::BookingState::Cancelled);
    let new = client
        .get_booking_by_reference(by_reference(&moved.reference))
        .await
        .unwrap()
        .into_inner()
        .booking
        .unwrap();
    assert_eq!(new.booking_id, moved.booking_id);
    server.stop().await;
}

const ADMIN: &str = "admin-token-0123456789abcdef";
const FRONTEND: &str = "frontend-token-0123456789";
const DESK_A: &str = "desk-a-token-0123456789";

fn tokens() -> Config {
    let text = format!(
        r#"
[[tokens]]
name = "ops"
sha256 = "{}"
role = "admin"

[[tokens]]
name = "web"
sha256 = "{}"
role = "frontend"

[[tokens]]
name = "desk-a"
sha256 = "{}"
role = "site"
sites = ["desk-a"]
"#,
        hex::encode(token_sha256(ADMIN)),
        hex::encode(token_sha256(FRONTEND)),
        hex::encode(token_sha256(DESK_A)),
    );
    toml::from_str::<ConfigFile>(&text)
        .unwrap()
        .check()
        .expect("a valid configuration")
}

type Intercepted = InterceptedService<Channel, Bearer>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_token_works_its_own_desk_only() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), tokens(), clock.clone()).await;
    let channel = server.channel().await;
    let mut admin = CapacityServiceClient::with_interceptor(channel.clone(), Bearer(Some(ADMIN)));
    let mut web: BookingServiceClient<Intercepted> =
        BookingServiceClient::with_interceptor(channel.clone(), Bearer(Some(FRONTEND)));
    let mut desk_a = SiteServiceClient::with_interceptor(channel.clone(), Bearer(Some(DESK_A)));
    let day = day_ahead(30);
    let mut bookings = Vec::new();
    for site_id in ["desk-a", "desk-b"] {
        admin
            .upsert_site(proto::UpsertSiteRequest {
                site: Some(proto::Site {
                    site_id: site_id.into(),
                    name: site_id.into(),
                    region_id: "r".into(),
                    time_zone: "Etc/UTC".into(),
                }),
                request_id: String::new(),
            })
            .await
            .expect("site");
        admin
            .publish_schedule(publish_request(
                site_id,
                "vax",
                (&day, &day),
                ("10:00", "10:30"),
                30,
                2,
            ))
            .await
            .expect("schedule");
        let slot_id = only_slot_of(&mut web, site_id).await;
        let booking = web
            .book(book_request(&slot_id, &format!("CIT-{site_id}"), site_id))
            .await
            .expect("booked")
            .into_inner()
            .booking
            .unwrap();
        bookings.push((slot_id, booking));
    }
    let ((slot_a, booking_a), (slot_b, booking_b)) = (&bookings[0], &bookings[1]);

    to_an_hour_before(&clock, slot_a);
    // Another site's desk: its references are unknown here, whatever the code; its
    // slots' rosters are refused.
    let status = desk_a
        .check_in(check_in(&booking_b.reference, &booking_b.check_in_code))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_deref()),
        (Code::NotFound, Some("BOOKING_NOT_FOUND"))
    );
    let status = desk_a
        .list_slot_bookings(proto::ListSlotBookingsRequest {
            slot_id: slot_b.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = desk_a
        .mark_no_show(no_show(&booking_b.reference))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // Its own: the roster and the check-in work.
    let listed = desk_a
        .list_slot_bookings(proto::ListSlotBookingsRequest {
            slot_id: slot_a.clone(),
            ..Default::default()
        })
        .await
        .expect("own roster")
        .into_inner()
        .bookings;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].reference, booking_a.reference);
    desk_a
        .check_in(check_in(&booking_a.reference, &booking_a.check_in_code))
        .await
        .expect("own desk");

    // A site token books nothing; a frontend works no desk.
    let mut desk_as_frontend: BookingServiceClient<Intercepted> =
        BookingServiceClient::with_interceptor(channel.clone(), Bearer(Some(DESK_A)));
    let status = desk_as_frontend
        .book(book_request(slot_a, "X", "x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut web_as_desk = SiteServiceClient::with_interceptor(channel, Bearer(Some(FRONTEND)));
    let status = web_as_desk
        .check_in(check_in(&booking_b.reference, &booking_b.check_in_code))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    server.stop().await;
}

/// The id of the one slot of `site_id`.
async fn only_slot_of(web: &mut BookingServiceClient<Intercepted>, site_id: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let slots = web
        .search_slots(proto::SearchSlotsRequest {
            scope: Some(proto::search_slots_request::Scope::SiteId(site_id.into())),
            service_id: "vax".into(),
            from: at_s(now),
            to: at_s(now + 40 * 24 * 3600),
            only_available: false,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("search")
        .into_inner()
        .slots;
    assert_eq!(slots.len(), 1);
    slots[0].slot_id.clone()
}

/// A booking made from a campaign's offer, checked in and marked no-show: its
/// registration stays booked and recovery accepts it (the desk freed the citizen's
/// entry, the booking is still stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_booking_checked_in_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "offers", 2).await;
    let channel = server.channel().await;
    CapacityServiceClient::new(channel.clone())
        .upsert_campaign(proto::UpsertCampaignRequest {
            campaign: Some(proto::Campaign {
                campaign_id: "vax-campaign".into(),
                service_id: "vax".into(),
                region_id: "test-region".into(),
                waves: vec![proto::Wave {
                    wave_id: "everyone".into(),
                    opens_at: Some(prost_types::Timestamp::default()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect("campaign");
    let mut client = BookingServiceClient::new(channel.clone());
    for citizen in ["OFFERED-1", "OFFERED-2"] {
        client
            .pre_register(proto::PreRegisterRequest {
                campaign_id: "vax-campaign".into(),
                citizen_id: citizen.into(),
                request_id: format!("register-{citizen}"),
                ..Default::default()
            })
            .await
            .expect("registered");
    }
    while server.match_campaigns().await > 0 {}
    let mut booked = Vec::new();
    for citizen in ["OFFERED-1", "OFFERED-2"] {
        let booking = client
            .accept_offer(proto::AcceptOfferRequest {
                campaign_id: "vax-campaign".into(),
                citizen_id: citizen.into(),
                request_id: format!("accept-{citizen}"),
                hold_id: String::new(),
            })
            .await
            .expect("accepted")
            .into_inner()
            .booking
            .unwrap();
        booked.push(booking);
    }
    let mut site = SiteServiceClient::new(channel);
    to_an_hour_before(&clock, &slot);
    site.check_in(check_in(&booked[0].reference, &booked[0].check_in_code))
        .await
        .expect("checked in");
    clock.advance(Duration::from_secs(3 * 3_600));
    site.mark_no_show(no_show(&booked[1].reference))
        .await
        .expect("marked");

    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let registration = BookingServiceClient::new(server.channel().await)
        .get_registration(proto::GetRegistrationRequest {
            campaign_id: "vax-campaign".into(),
            citizen_id: "OFFERED-1".into(),
        })
        .await
        .expect("recovered")
        .into_inner()
        .registration
        .unwrap();
    assert_eq!(registration.state, proto::RegistrationState::Booked as i32);
    let stats = site_stats(&server, "offers").await;
    assert_eq!((stats.booked, stats.attended, stats.no_shows), (2, 1, 1));
    server.stop().await;
}

/// Checked in an hour before the slot, a citizen could book the same service again at
/// once, and again after each early check-in (an outside test). Now the attended
/// booking counts against the citizen's limit until its slot ends, across a restart,
/// and leaves it then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_checked_in_early_counts_against_the_limit_until_its_slot_ends() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "early", 5).await;
    utc_site_on(
        server.channel().await,
        ("later", "r"),
        32,
        ("10:00", "10:30"),
        5,
    )
    .await;
    let later = search_all(&mut server.booking().await, "later", "vax").await[0]
        .slot_id
        .clone();
    let mut client = server.booking().await;
    let anna = book_ok(&mut client, book_request(&slot, "ANNA", "b1")).await;
    to_an_hour_before(&clock, &slot);
    SiteServiceClient::new(server.channel().await)
        .check_in(check_in(&anna.reference, &anna.check_in_code))
        .await
        .expect("checked in");
    server.sweep_holds().await;
    for (slot_id, request_id) in [(&slot, "b2"), (&later, "b3")] {
        let refused = client
            .book(book_request(slot_id, "ANNA", request_id))
            .await
            .unwrap_err();
        assert_eq!(reason(&refused).as_deref(), Some("CITIZEN_ALREADY_BOOKED"));
    }
    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let mut client = server.booking().await;
    let refused = client
        .book(book_request(&later, "ANNA", "b4"))
        .await
        .unwrap_err();
    assert_eq!(
        reason(&refused).as_deref(),
        Some("CITIZEN_ALREADY_BOOKED"),
        "still counted after a restart"
    );
    clock.advance(Duration::from_secs(2 * 3_600));
    server.sweep_holds().await;
    book_ok(&mut client, book_request(&later, "ANNA", "b5")).await;
    assert_eq!(site_stats(&server, "early").await.booked, 1);
    server.stop().await;
}

/// A booking nobody checked in (an office that does not use the desk) counted against
/// its citizen's limit until retention deleted it, 400 days on: the citizen could not
/// book the service again. It counts until its slot ends, a restart agrees, and it stays
/// a confirmed booking the desk may still mark a no-show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_never_checked_in_stops_counting_when_its_slot_ends() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "office", 5).await;
    let hours = ("10:00", "11:00");
    utc_site_on(server.channel().await, ("later", "r"), 32, hours, 5).await;
    let later = search_all(&mut server.booking().await, "later", "vax").await;
    let mut client = server.booking().await;
    let anna = book_ok(&mut client, book_request(&slot, "ANNA", "b1")).await;
    let refused = client
        .book(book_request(&later[0].slot_id, "ANNA", "b2"))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused).as_deref(), Some("CITIZEN_ALREADY_BOOKED"));
    to_an_hour_before(&clock, &slot);
    clock.advance(Duration::from_secs(2 * 3_600)); // the slot ended at 10:30
    book_ok(&mut client, book_request(&later[0].slot_id, "ANNA", "b3")).await;
    // Moved to a slot ahead, the ended booking would count again beside the new one.
    let moved = client
        .reschedule_booking(proto::RescheduleBookingRequest {
            booking_id: anna.booking_id.clone(),
            citizen_id: "ANNA".into(),
            new_slot_id: later[1].slot_id.clone(),
            request_id: "m1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&moved).as_deref(), Some("BOOKING_NOT_ACTIVE"));
    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let refused = (server.booking().await)
        .book(book_request(&later[1].slot_id, "ANNA", "b4"))
        .await
        .unwrap_err();
    assert_eq!(
        reason(&refused).as_deref(),
        Some("CITIZEN_ALREADY_BOOKED"),
        "the new booking counts, after a restart too"
    );
    let marked = SiteServiceClient::new(server.channel().await)
        .mark_no_show(no_show(&anna.reference))
        .await
        .expect("the ended booking is still confirmed")
        .into_inner();
    assert_eq!(state(&marked.booking.unwrap()), proto::BookingState::NoShow);
    server.stop().await;
}
