//! `WatchAvailability` on a real server: the slots first, then each change (bookings,
//! closures, capacity, new slots), coalesced per slot with the latest state; bounded
//! watchers and slots per watch; a graceful stop ends open watches.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use prenota::config::Config;
use prenota::proto;
use prenota::proto::booking_service_client::BookingServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

async fn watch(
    client: &mut BookingServiceClient<Channel>,
    site_id: &str,
) -> Streaming<proto::WatchAvailabilityResponse> {
    client
        .watch_availability(availability_watch_request(site_id))
        .await
        .expect("watch")
        .into_inner()
}

/// Reads messages until `slot_id` shows `remaining` (10 s at most); returns how many
/// messages named that slot.
async fn until_remaining(
    stream: &mut Streaming<proto::WatchAvailabilityResponse>,
    slot_id: &str,
    remaining: u32,
) -> usize {
    let mut seen = 0;
    loop {
        let slot = next_watched_slot(stream).await;
        if slot.slot_id == slot_id {
            seen += 1;
            if slot.remaining == remaining {
                return seen;
            }
        }
    }
}

async fn publish(server: &TestServer, site_id: &str, hours: (&str, &str), capacity: u32) {
    let day = day_ahead(30);
    let request = publish_request(site_id, "vax", (&day, &day), hours, 30, capacity);
    server
        .capacity()
        .await
        .publish_schedule(request)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_gets_the_slots_then_every_change_coalesced() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    upsert_site(&mut server.capacity().await, "w-site", "r", "Etc/UTC").await;
    publish(&server, "w-site", ("09:00", "10:30"), 50).await;
    let mut client = server.booking().await;
    let mut stream = watch(&mut client, "w-site").await;
    let mut snapshot = HashMap::new();
    for _ in 0..3 {
        let slot = next_watched_slot(&mut stream).await;
        snapshot.insert(slot.slot_id.clone(), slot);
    }
    assert!(snapshot.values().all(|slot| slot.remaining == 50));
    let mut ids: Vec<String> = snapshot.keys().cloned().collect();
    ids.sort();

    // 20 bookings of one slot within a coalescing window or two: far fewer messages,
    // the last one the latest state.
    for n in 0..20 {
        let citizen = format!("c{n}");
        book_ok(&mut client, book_request(&ids[0], &citizen, &citizen)).await;
    }
    let messages = until_remaining(&mut stream, &ids[0], 30).await;
    assert!(
        messages < 20,
        "{messages} messages for 20 changes: not coalesced"
    );

    // A closure, a capacity change and a new slot in range all show.
    let mut capacity = server.capacity().await;
    let second = snapshot[&ids[1]].clone();
    capacity
        .close_slots(proto::CloseSlotsRequest {
            site_id: "w-site".into(),
            service_id: None,
            from: second.start,
            to: second.end,
            reason: "storm".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    loop {
        let slot = next_watched_slot(&mut stream).await;
        if slot.slot_id == ids[1] && slot.closed {
            assert_eq!(slot.remaining, 0);
            break;
        }
    }
    capacity
        .set_slot_capacity(proto::SetSlotCapacityRequest {
            slot_id: ids[2].clone(),
            capacity: 7,
            request_id: String::new(),
        })
        .await
        .unwrap();
    until_remaining(&mut stream, &ids[2], 7).await;
    // (Republishing also sets the 10:00 slot back to 50 places: that shows too.)
    publish(&server, "w-site", ("09:00", "11:00"), 50).await;
    let new = loop {
        let slot = next_watched_slot(&mut stream).await;
        if !snapshot.contains_key(&slot.slot_id) {
            break slot;
        }
    };
    assert_eq!(new.remaining, 50);

    // A graceful stop ends the open watch (UNAVAILABLE / SHUTTING_DOWN) instead of
    // waiting for it.
    let stopping = tokio::spawn(server.stop());
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the watch ends");
    let status = ended.expect_err("the watch ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status).as_deref(), Some("SHUTTING_DOWN"));
    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("the stop does not wait for open watches")
        .unwrap();
}

/// Watches coming and going (the board turned off and on each time) never leave the
/// last one without updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_opened_as_the_last_one_closes_still_gets_changes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    upsert_site(&mut server.capacity().await, "churn", "r", "Etc/UTC").await;
    publish(&server, "churn", ("09:00", "09:30"), 50).await;
    let mut client = server.booking().await;
    let mut stream = watch(&mut client, "churn").await;
    let slot = next_watched_slot(&mut stream).await;
    for n in 0..50 {
        let mut next = watch(&mut client, "churn").await;
        next_watched_slot(&mut next).await;
        drop(std::mem::replace(&mut stream, next));
        if n % 10 == 0 {
            let citizen = format!("c{n}");
            book_ok(&mut client, book_request(&slot.slot_id, &citizen, &citizen)).await;
        }
    }
    book_ok(&mut client, book_request(&slot.slot_id, "last", "last")).await;
    until_remaining(&mut stream, &slot.slot_id, 44).await;
    server.stop().await;
}

/// A release created over watched slots changes what they show (their `release_at`),
/// not their places: each is sent again, with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_over_watched_slots_sends_them_again_with_its_release_at() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    upsert_site(&mut server.capacity().await, "announced", "r", "Etc/UTC").await;
    publish(&server, "announced", ("09:00", "10:00"), 5).await;
    let mut stream = watch(&mut server.booking().await, "announced").await;
    for _ in 0..2 {
        assert_eq!(next_watched_slot(&mut stream).await.release_at, None);
    }
    let now = chrono::Utc::now().timestamp();
    let release = proto::Release {
        release_id: "spring".into(),
        region_id: "r".into(),
        service_id: "vax".into(),
        from: at_s(now),
        to: at_s(now + 60 * 86_400),
        release_at: at_s(now + 3_600),
        ..Default::default()
    };
    server
        .capacity()
        .await
        .create_release(proto::CreateReleaseRequest {
            release: Some(release),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let mut announced = std::collections::HashSet::new();
    while announced.len() < 2 {
        let slot = next_watched_slot(&mut stream).await;
        assert_eq!(slot.release_at, at_s(now + 3_600), "{slot:?}");
        assert_eq!(slot.remaining, 5);
        announced.insert(slot.slot_id);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_are_bounded_in_number_and_in_slots() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.limits.watch_subscribers_max = 2;
    config.limits.watch_slots_max = 3;
    let server = TestServer::start_with(dir.path(), config).await;
    upsert_site(&mut server.capacity().await, "small", "r", "Etc/UTC").await;
    publish(&server, "small", ("09:00", "10:30"), 5).await;
    upsert_site(&mut server.capacity().await, "big", "r", "Etc/UTC").await;
    publish(&server, "big", ("09:00", "11:00"), 5).await;
    let mut client = server.booking().await;

    let status = client
        .watch_availability(availability_watch_request("big"))
        .await
        .expect_err("4 slots is over watch_slots_max");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["to"]);
    let status = client
        .watch_availability(availability_watch_request("nowhere"))
        .await
        .expect_err("no such site");
    assert_eq!(status.code(), Code::NotFound);

    let first = watch(&mut client, "small").await;
    let _second = watch(&mut client, "small").await;
    let status = client
        .watch_availability(availability_watch_request("small"))
        .await
        .expect_err("a third watch is over watch_subscribers_max");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status).as_deref(), Some("WATCHERS_EXHAUSTED"));
    drop(first);
    let mut reopened = false;
    for _ in 0..100 {
        if client
            .watch_availability(availability_watch_request("small"))
            .await
            .is_ok()
        {
            reopened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reopened, "a closed watch gives its place back");
    server.stop().await;
}

/// Every new watch is first sent every slot of its range: opening and closing
/// thousands of them a second (within a token's watch places) took the CPU the
/// bookings needed (Book p99 250–500 ms on this machine). Now a token's snapshots hold
/// at most `watch_snapshot_slots_per_token_per_s` slots a second: past it RATE_LIMITED
/// with the wait, after which it watches again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_opening_watches_past_its_snapshot_slots_waits() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.limits.watch_slots_max = 3;
    config.limits.watch_snapshot_slots_per_token_per_s = 6;
    let server = TestServer::start_with(dir.path(), config).await;
    upsert_site(&mut server.capacity().await, "small", "r", "Etc/UTC").await;
    publish(&server, "small", ("09:00", "10:30"), 5).await;
    let mut client = server.booking().await;

    let _first = watch(&mut client, "small").await;
    let _second = watch(&mut client, "small").await;
    let status = client
        .watch_availability(availability_watch_request("small"))
        .await
        .expect_err("9 slots in a burst is over 6 a second");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status).as_deref(), Some("RATE_LIMITED"));
    let wait = retry_delay(&status);
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(500),
        "{wait:?}"
    );
    tokio::time::sleep(wait).await;
    let mut third = watch(&mut client, "small").await;
    assert_eq!(next_watched_slot(&mut third).await.site_id, "small");
    server.stop().await;
}

/// A watch streams its reply: what its call holds of the receiving budgets goes back
/// once its first message is taken, so a long watch's messages never add up against its
/// peer's share (a frontend watching a few thousand slots would have had every call
/// after it shed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_watch_holds_nothing_of_its_peers_share() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.limits.message_size_bytes_max = 64 * 1024;
    config.limits.receiving_bytes_per_peer_max = 128 * 1024;
    let server = TestServer::start_with(dir.path(), config).await;
    upsert_site(&mut server.capacity().await, "busy", "r", "Etc/UTC").await;
    let day = day_ahead(30);
    let request = publish_request("busy", "vax", (&day, &day), ("00:00", "23:59"), 1, 5);
    let mut capacity = server.capacity().await;
    capacity.publish_schedule(request).await.unwrap();
    let mut client = server.booking().await;
    let mut stream = watch(&mut client, "busy").await;
    for _ in 0..1_439 {
        next_watched_slot(&mut stream).await; // some 200 KB of messages
    }
    for _ in 0..20 {
        // search_all pages through every slot: 15 calls, each answered (or it panics).
        assert_eq!(search_all(&mut client, "busy", "vax").await.len(), 1_439);
    }
    server.stop().await;
}
