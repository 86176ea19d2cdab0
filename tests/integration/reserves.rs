//! Channel reserves (PRODUCT.md part B): a release holds back a share of each slot for
//! one channel (the phone line) until shortly before the slot; other channels see and
//! take only the common places; then the reserve joins the common places. The counts
//! survive a restart.

use crate::common;

use std::time::Duration;

use common::*;
use prenota::config::{token_sha256, ConfigFile};
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::open_data_service_client::OpenDataServiceClient;
use prenota::proto::{self, search_slots_request::Scope};
use prenota::service::Clock;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const WEB: &str = "web-portal-token-0123456789";
const PHONE: &str = "phone-line-token-0123456789";
const OPS: &str = "ops-admin-token-0123456789ab";

fn config() -> prenota::config::Config {
    let text = format!(
        r#"
[[tokens]]
name = "web-portal"
sha256 = "{}"
role = "frontend"

[[tokens]]
name = "call-centre"
sha256 = "{}"
role = "frontend"
channel = "phone"

[[tokens]]
name = "ops"
sha256 = "{}"
role = "admin"
"#,
        hex::encode(token_sha256(WEB)),
        hex::encode(token_sha256(PHONE)),
        hex::encode(token_sha256(OPS)),
    );
    toml::from_str::<ConfigFile>(&text)
        .unwrap()
        .check()
        .expect("a valid configuration")
}

type Booking = BookingServiceClient<InterceptedService<Channel, Bearer>>;
type Capacity = CapacityServiceClient<InterceptedService<Channel, Bearer>>;

async fn booking(server: &TestServer, token: &'static str) -> Booking {
    BookingServiceClient::with_interceptor(server.channel().await, Bearer(Some(token)))
}

async fn capacity(server: &TestServer) -> Capacity {
    CapacityServiceClient::with_interceptor(server.channel().await, Bearer(Some(OPS)))
}

/// The ids of `r-site`'s `vax` slots in the 60 days from `now` (unix seconds).
async fn slot_ids(client: &mut Booking, now: i64) -> Vec<String> {
    let slots = client
        .search_slots(proto::SearchSlotsRequest {
            scope: Some(Scope::SiteId("r-site".into())),
            service_id: "vax".into(),
            from: at_s(now),
            to: at_s(now + 60 * 86_400),
            ..Default::default()
        })
        .await
        .expect("search")
        .into_inner()
        .slots;
    slots.into_iter().map(|slot| slot.slot_id).collect()
}

/// The one slot's id.
async fn first_slot(client: &mut Booking) -> String {
    slot_ids(client, chrono::Utc::now().timestamp()).await[0].clone()
}

/// The one slot's `remaining` as `client`'s channel sees it (0 when a search for free
/// slots leaves it out).
async fn remaining(client: &mut Booking, only_available: bool) -> u32 {
    let now = chrono::Utc::now().timestamp();
    let slots = client
        .search_slots(proto::SearchSlotsRequest {
            scope: Some(Scope::SiteId("r-site".into())),
            service_id: "vax".into(),
            from: at_s(now),
            to: at_s(now + 60 * 86_400),
            only_available,
            ..Default::default()
        })
        .await
        .expect("search")
        .into_inner()
        .slots;
    slots.first().map_or(0, |slot| slot.remaining)
}

/// Site `r-site` (region `toscana`, UTC) with one 30-minute `vax` slot of `capacity`
/// places, 10 days ahead.
async fn one_slot_of(ops: &mut Capacity, capacity: u32) {
    ops.upsert_site(proto::UpsertSiteRequest {
        site: Some(proto::Site {
            site_id: "r-site".into(),
            name: "Firenze".into(),
            region_id: "toscana".into(),
            time_zone: "Etc/UTC".into(),
        }),
        request_id: String::new(),
    })
    .await
    .expect("site");
    let day = day_ahead(10);
    ops.publish_schedule(publish_request(
        "r-site",
        "vax",
        (&day, &day),
        ("10:00", "10:30"),
        30,
        capacity,
    ))
    .await
    .expect("publish");
}

/// Places of `r-site` held back for channel reserves now, as site statistics count
/// them; open data's rows add up to as many (their `remaining` counts them in).
async fn reserved(server: &TestServer) -> u64 {
    let reserved = capacity(server)
        .await
        .get_site_stats(proto::GetSiteStatsRequest {
            site_id: "r-site".into(),
        })
        .await
        .expect("stats")
        .into_inner()
        .reserved;
    let today = chrono::Utc::now().date_naive();
    let request = proto::GetAvailabilitySummaryRequest {
        first_day: (today - chrono::Days::new(1)).to_string(),
        last_day: (today + chrono::Days::new(300)).to_string(),
        page_size: 500,
        ..Default::default()
    };
    let open_data =
        OpenDataServiceClient::with_interceptor(server.channel().await, Bearer(Some(WEB)))
            .get_availability_summary(request)
            .await
            .expect("open data")
            .into_inner();
    assert!(open_data.next_page_token.is_empty());
    let rows = open_data.rows.iter();
    assert_eq!(
        rows.map(|row| row.reserved).sum::<u64>(),
        reserved,
        "open data"
    );
    reserved
}

async fn book(client: &mut Booking, slot_id: &str, citizen: &str) -> Result<String, String> {
    client
        .book(book_request(slot_id, citizen, &format!("book-{citizen}")))
        .await
        .map(|r| r.into_inner().booking.expect("a booking").booking_id)
        .map_err(|status| reason(&status).unwrap_or_default())
}

/// A server on a manual clock with `one_slot_of(capacity)`, and an admin's client.
async fn one_slot_on_a_manual_clock(
    data_dir: &std::path::Path,
    capacity_per_slot: u32,
) -> (TestServer, Clock, Capacity) {
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(data_dir, config(), clock.clone()).await;
    let mut ops = capacity(&server).await;
    one_slot_of(&mut ops, capacity_per_slot).await;
    (server, clock, ops)
}

/// Release `phone-half` of toscana's `vax` slots starting within 60 days of `now_s`,
/// open a second later, each channel's `reserved` percent held back until 48 hours
/// before each slot.
fn reserving_release(now_s: i64, reserved: &[(&str, u32)]) -> proto::Release {
    proto::Release {
        release_id: "phone-half".into(),
        region_id: "toscana".into(),
        service_id: "vax".into(),
        from: at_s(now_s),
        to: at_s(now_s + 60 * 86_400),
        release_at: at_s(now_s + 1),
        reserved_percent: reserved.iter().map(|(c, p)| (c.to_string(), *p)).collect(),
        reserve_released_hours_before_start: 48,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_places_go_to_their_channel_until_released_then_to_anyone() {
    let dir = tempfile::tempdir().unwrap();
    let (server, clock, mut ops) = one_slot_on_a_manual_clock(dir.path(), 4).await;
    let now_s = clock.now_unix_ms() / 1_000;
    let mut release = reserving_release(now_s, &[("phone", 70), ("desk", 40)]);
    let create = |release: proto::Release| proto::CreateReleaseRequest {
        release: Some(release),
        request_id: String::new(),
    };
    let too_much = ops
        .create_release(create(release.clone()))
        .await
        .expect_err("110%");
    assert_eq!(violated_fields(&too_much), ["release.reserved_percent"]);
    release.reserved_percent = [("phone".to_string(), 50)].into();
    let created = ops
        .create_release(create(release))
        .await
        .expect("created")
        .into_inner()
        .release
        .unwrap();
    assert_eq!(created.reserved_percent["phone"], 50);
    assert_eq!(created.reserve_released_hours_before_start, 48);
    clock.advance(Duration::from_secs(2));

    let (mut web, mut phone) = (booking(&server, WEB).await, booking(&server, PHONE).await);
    let slot_id = first_slot(&mut phone).await;
    // 4 places, 2 held back for the phone line.
    assert_eq!(remaining(&mut web, false).await, 2);
    assert_eq!(remaining(&mut phone, false).await, 4);
    assert_eq!(reserved(&server).await, 2);
    let w1 = book(&mut web, &slot_id, "w1").await.expect("common place");
    book(&mut web, &slot_id, "w2").await.expect("common place");
    assert_eq!(
        book(&mut web, &slot_id, "w3").await,
        Err("SLOT_FULL".into())
    );
    assert_eq!(remaining(&mut web, true).await, 0, "not free to the web");
    book(&mut phone, &slot_id, "p1")
        .await
        .expect("a reserved place");
    assert_eq!(remaining(&mut phone, false).await, 1);
    assert_eq!(reserved(&server).await, 1);

    // A restart counts the phone line's booking against its reserve again.
    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), config(), clock.clone()).await;
    let (mut web, mut phone) = (booking(&server, WEB).await, booking(&server, PHONE).await);
    assert_eq!(remaining(&mut phone, false).await, 1);
    assert_eq!(remaining(&mut web, false).await, 0);
    assert_eq!(
        book(&mut web, &slot_id, "w3").await,
        Err("SLOT_FULL".into())
    );

    // A cancelled common place is common again.
    web.cancel_booking(proto::CancelBookingRequest {
        booking_id: w1,
        citizen_id: "w1".into(),
        request_id: "cancel-w1".into(),
    })
    .await
    .expect("cancelled");
    book(&mut web, &slot_id, "w3")
        .await
        .expect("the freed common place");
    assert_eq!(
        book(&mut web, &slot_id, "w4").await,
        Err("SLOT_FULL".into())
    );

    // 48 hours before the slot the reserve joins the common places.
    clock.advance(Duration::from_secs(9 * 86_400));
    assert_eq!(reserved(&server).await, 0);
    assert_eq!(remaining(&mut web, false).await, 1);
    book(&mut web, &slot_id, "w4")
        .await
        .expect("the released reserve");
    assert_eq!(remaining(&mut phone, false).await, 0);
    server.stop().await;
}

/// When a slot's reserve joins the common places, the other channels' watchers are sent
/// the slot again with their new `remaining`, though no counter moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_reserve_is_sent_to_the_other_channels_watchers() {
    let dir = tempfile::tempdir().unwrap();
    let (server, clock, mut ops) = one_slot_on_a_manual_clock(dir.path(), 4).await;
    let now_s = clock.now_unix_ms() / 1_000;
    let release = reserving_release(now_s, &[("phone", 50)]);
    ops.create_release(proto::CreateReleaseRequest {
        release: Some(release),
        request_id: String::new(),
    })
    .await
    .expect("created");
    let mut web = booking(&server, WEB).await;
    let mut stream = web
        .watch_availability(availability_watch_request("r-site"))
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(
        next_watched_slot(&mut stream).await.remaining,
        2,
        "half held back for the phone line"
    );
    clock.advance(Duration::from_secs(9 * 86_400)); // 48 hours before the slot
    let released = next_watched_slot(&mut stream).await;
    assert_eq!(released.remaining, 4, "{released:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rush_of_other_channels_never_takes_a_reserved_place() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config()).await;
    let mut ops = capacity(&server).await;
    one_slot_of(&mut ops, 10).await;
    let now_s = chrono::Utc::now().timestamp();
    ops.create_release(proto::CreateReleaseRequest {
        release: Some(proto::Release {
            release_id: "phone-half".into(),
            site_ids: vec!["r-site".into()],
            service_id: "vax".into(),
            from: at_s(now_s),
            to: at_s(now_s + 60 * 86_400),
            release_at: at_s(now_s + 2),
            reserved_percent: [("phone".to_string(), 50)].into(),
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .expect("created");
    let opens_in_ms = (now_s + 2) * 1_000 + 100 - chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(opens_in_ms.max(0) as u64)).await;
    let slot_id = first_slot(&mut booking(&server, PHONE).await).await;
    // 40 web citizens and 3 phone callers at once, for 10 places, 5 reserved.
    let mut attempts = Vec::new();
    for (token, prefix, count) in [(WEB, "web", 40), (PHONE, "phone", 3)] {
        for n in 0..count {
            let mut client = booking(&server, token).await;
            let slot_id = slot_id.clone();
            attempts.push(tokio::spawn(async move {
                let citizen = format!("{prefix}-{n}");
                (prefix, book(&mut client, &slot_id, &citizen).await)
            }));
        }
    }
    let (mut web_booked, mut phone_booked) = (0, 0);
    for attempt in attempts {
        match attempt.await.unwrap() {
            ("web", Ok(_)) => web_booked += 1,
            (_, Ok(_)) => phone_booked += 1,
            (_, Err(reason)) => assert_eq!(reason, "SLOT_FULL"),
        }
    }
    assert_eq!((web_booked, phone_booked), (5, 3));
    // The phone line still has its last 2 reserved places.
    let mut phone = booking(&server, PHONE).await;
    book(&mut phone, &slot_id, "phone-3")
        .await
        .expect("reserved");
    book(&mut phone, &slot_id, "phone-4")
        .await
        .expect("reserved");
    assert_eq!(
        book(&mut phone, &slot_id, "phone-5").await,
        Err("SLOT_FULL".into())
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_made_before_its_release_counts_against_the_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config()).await;
    let mut ops = capacity(&server).await;
    one_slot_of(&mut ops, 4).await;
    let (mut web, mut phone) = (booking(&server, WEB).await, booking(&server, PHONE).await);
    let slot_id = first_slot(&mut phone).await;
    book(&mut phone, &slot_id, "early-caller")
        .await
        .expect("booked");
    let now_s = chrono::Utc::now().timestamp();
    let web_reserve = proto::Release {
        release_id: "half".into(),
        site_ids: vec!["r-site".into()],
        service_id: "vax".into(),
        from: at_s(now_s),
        to: at_s(now_s + 60 * 86_400),
        // Far enough ahead for the two calls below on a slow store (PostgreSQL).
        release_at: at_s(now_s + 3),
        reserved_percent: [("web".to_string(), 50)].into(),
        ..Default::default()
    };
    let refused = ops
        .create_release(proto::CreateReleaseRequest {
            release: Some(web_reserve.clone()),
            request_id: String::new(),
        })
        .await
        .expect_err("web is the default channel");
    assert_eq!(violated_fields(&refused), ["release.reserved_percent[web]"]);
    ops.create_release(proto::CreateReleaseRequest {
        release: Some(proto::Release {
            reserved_percent: [("phone".to_string(), 50)].into(),
            ..web_reserve
        }),
        request_id: String::new(),
    })
    .await
    .expect("created");
    let opens_in_ms = (now_s + 3) * 1_000 + 100 - chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(opens_in_ms.max(0) as u64)).await;
    // 3 free of 4; the phone's reserve of 2 has 1 used (the early caller's): 1 held back.
    assert_eq!(remaining(&mut web, false).await, 2);
    assert_eq!(remaining(&mut phone, false).await, 3);
    assert_eq!(reserved(&server).await, 1);
    let release = ops
        .get_release(proto::GetReleaseRequest {
            release_id: "half".into(),
        })
        .await
        .expect("release")
        .into_inner()
        .release
        .unwrap();
    assert_eq!(release.places_remaining, 2, "common places only");
    server.stop().await;
}

/// A queued release admits tickets to its common places; a channel's reserve is the
/// channel's to take without a ticket (the phone line books for callers who never
/// joined the web queue), up to the reserve and no further, across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_queued_release_a_reserve_is_taken_without_a_ticket_by_its_channel_only() {
    let dir = tempfile::tempdir().unwrap();
    let (server, clock, mut ops) = one_slot_on_a_manual_clock(dir.path(), 4).await;
    let now_s = clock.now_unix_ms() / 1_000;
    ops.create_release(proto::CreateReleaseRequest {
        release: Some(proto::Release {
            queue_opens_at: at_s(now_s),
            admissions_per_minute: 60,
            ..reserving_release(now_s, &[("phone", 50)])
        }),
        request_id: String::new(),
    })
    .await
    .expect("created");
    clock.advance(Duration::from_secs(2));
    let (mut web, mut phone) = (booking(&server, WEB).await, booking(&server, PHONE).await);
    let slot_id = first_slot(&mut phone).await;
    assert_eq!(
        book(&mut web, &slot_id, "w1").await,
        Err("NOT_ADMITTED".into())
    );
    let caller_1 = book(&mut phone, &slot_id, "caller-1")
        .await
        .expect("the phone line's reserve");
    let held = phone
        .hold_slot(proto::HoldSlotRequest {
            slot_id: slot_id.clone(),
            citizen_id: "caller-2".into(),
            request_id: "hold-caller-2".into(),
            ttl_seconds: 300,
        })
        .await
        .expect("a hold of the reserve's last place");
    assert!(held.into_inner().hold.is_some());
    assert_eq!(
        book(&mut phone, &slot_id, "caller-3").await,
        Err("NOT_ADMITTED".into()),
        "the reserve is used up: the common places are the queue's"
    );
    let places_remaining =
        |release: proto::GetReleaseResponse| release.release.expect("the release").places_remaining;
    let get = proto::GetReleaseRequest {
        release_id: "phone-half".into(),
    };
    let release = ops.get_release(get.clone()).await.expect("release");
    assert_eq!(
        places_remaining(release.into_inner()),
        2,
        "common places kept"
    );

    // A restart counts the reserve's places as used again.
    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), config(), clock.clone()).await;
    let mut phone = booking(&server, PHONE).await;
    assert_eq!(
        book(&mut phone, &slot_id, "caller-3").await,
        Err("NOT_ADMITTED".into())
    );
    let mut ops = capacity(&server).await;
    let release = ops.get_release(get).await.expect("release");
    assert_eq!(places_remaining(release.into_inner()), 2);

    // A booking the reserve let in moves within a reserve only: not through the web
    // (into a common place, freeing the reserve for the next caller).
    let day = day_ahead(11);
    let later = publish_request("r-site", "vax", (&day, &day), ("10:00", "10:30"), 30, 4);
    ops.publish_schedule(later).await.expect("a second slot");
    let now = clock.now_unix_ms() / 1_000;
    let second = slot_ids(&mut phone, now)
        .await
        .into_iter()
        .find(|id| *id != slot_id)
        .expect("the second slot");
    let move_to = |request_id: &str| proto::RescheduleBookingRequest {
        booking_id: caller_1.clone(),
        citizen_id: "caller-1".into(),
        new_slot_id: second.clone(),
        request_id: request_id.into(),
    };
    let mut web = booking(&server, WEB).await;
    let refused = web
        .reschedule_booking(move_to("move-web"))
        .await
        .expect_err("no ticket, no reserve for the web");
    assert_eq!(reason(&refused).as_deref(), Some("NOT_ADMITTED"));
    phone
        .reschedule_booking(move_to("move-phone"))
        .await
        .expect("into the phone line's reserve of the second slot");
    server.stop().await;
}
