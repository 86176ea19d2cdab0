//! `WatchEvents` on a real server: one event per change, in commit order, gapless;
//! a resume from any sequence replays the same events; live events follow; retention
//! prunes the oldest and a resume from before them is refused with `oldest_sequence`.

use crate::common;

use std::time::Duration;

use common::*;
use prenota::config::Config;
use prenota::proto;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::EventKind;
use prenota::service::Clock;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

fn watch_request(site_id: Option<&str>, after: u64) -> proto::WatchEventsRequest {
    proto::WatchEventsRequest {
        scope: site_id.map(|id| proto::watch_events_request::Scope::SiteId(id.into())),
        after_sequence: after,
        log_id: String::new(),
    }
}

/// The next `count` events of a watch from `after`, or a panic after 10 s.
async fn next_events(
    client: &mut CapacityServiceClient<Channel>,
    site_id: Option<&str>,
    after: u64,
    count: usize,
) -> Vec<proto::Event> {
    let mut stream = client
        .watch_events(watch_request(site_id, after))
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    while events.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} events came", events.len()));
        events.push(
            next.expect("the stream goes on")
                .expect("an event")
                .event
                .unwrap(),
        );
    }
    events
}

fn kinds(events: &[proto::Event]) -> Vec<EventKind> {
    events.iter().map(|event| event.kind()).collect()
}

fn hold_request(slot_id: &str, citizen_id: &str, request_id: &str) -> proto::HoldSlotRequest {
    proto::HoldSlotRequest {
        slot_id: slot_id.into(),
        citizen_id: citizen_id.into(),
        request_id: request_id.into(),
        ttl_seconds: 1,
    }
}

fn swept_by_hand() -> Config {
    let mut config = by_hand();
    config.limits.events_retained_hours = 1;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_has_one_event_in_commit_order_and_a_resume_replays_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), swept_by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "ev-site", 4).await;
    let other = one_slot_site_on(server.channel().await, "ev-other", "test-region", 4).await;
    let mut booking = server.booking().await;
    let mut capacity = server.capacity().await;

    let alice = book_ok(&mut booking, book_request(&slot, "alice", "a1")).await;
    booking
        .cancel_booking(proto::CancelBookingRequest {
            booking_id: alice.booking_id.clone(),
            citizen_id: "alice".into(),
            request_id: "a2".into(),
        })
        .await
        .expect("cancel");
    let bob = book_ok(&mut booking, book_request(&slot, "bob", "b1")).await;
    let moved = booking
        .reschedule_booking(proto::RescheduleBookingRequest {
            booking_id: bob.booking_id.clone(),
            citizen_id: "bob".into(),
            new_slot_id: other.clone(),
            request_id: "b2".into(),
        })
        .await
        .expect("reschedule")
        .into_inner()
        .booking
        .unwrap();
    let hold = booking
        .hold_slot(hold_request(&slot, "carol", "c1"))
        .await
        .expect("hold")
        .into_inner()
        .hold
        .unwrap();
    clock.advance(Duration::from_secs(2));
    assert_eq!(server.sweep_holds().await, 1);
    // Sent twice: the second changes nothing, and makes no event.
    for _ in 0..2 {
        capacity
            .set_slot_capacity(proto::SetSlotCapacityRequest {
                slot_id: slot.clone(),
                capacity: 6,
                request_id: String::new(),
            })
            .await
            .expect("capacity");
    }
    let from = chrono::Utc::now().timestamp();
    capacity
        .close_slots(proto::CloseSlotsRequest {
            site_id: "ev-other".into(),
            service_id: None,
            from: at_s(from),
            to: at_s(from + 60 * 86_400),
            reason: "flooded".into(),
            request_id: String::new(),
        })
        .await
        .expect("close");

    let events = next_events(&mut capacity, None, 0, 9).await;
    assert_eq!(
        kinds(&events),
        [
            EventKind::BookingConfirmed,
            EventKind::BookingCancelled,
            EventKind::BookingConfirmed,
            // A move to another site: the old booking cancelled at the old site, then
            // the reschedule at the new one (one commit).
            EventKind::BookingCancelled,
            EventKind::BookingRescheduled,
            EventKind::HoldExpired,
            EventKind::CapacityChanged,
            EventKind::SlotClosed,
            EventKind::BookingCancelled,
        ]
    );
    let sequences: Vec<u64> = events.iter().map(|event| event.sequence).collect();
    assert_eq!(sequences, (1..=9).collect::<Vec<_>>(), "gapless, from 1");
    let booking_of = |i: usize| events[i].booking.clone().unwrap();
    assert_eq!(booking_of(0).booking_id, alice.booking_id);
    assert_eq!(events[1].reason, "cancelled by citizen");
    assert_eq!(booking_of(1).state(), proto::BookingState::Cancelled);
    assert_eq!(booking_of(3).booking_id, bob.booking_id);
    assert_eq!(
        (events[3].slot_id.as_str(), events[3].reason.as_str()),
        (slot.as_str(), "rescheduled")
    );
    assert!(events[3].previous_booking_id.is_empty(), "names no booking");
    assert_eq!(events[4].previous_booking_id, bob.booking_id);
    assert_eq!(booking_of(4).booking_id, moved.booking_id);
    assert_eq!(events[5].hold_id, hold.hold_id);
    assert_eq!(events[5].reason, "hold expired");
    assert_eq!(
        (events[6].slot_id.as_str(), events[6].capacity),
        (slot.as_str(), 6)
    );
    assert_eq!(
        (events[7].slot_id.as_str(), events[7].reason.as_str()),
        (other.as_str(), "flooded")
    );
    assert_eq!(booking_of(8).booking_id, moved.booking_id);
    assert_eq!(booking_of(8).cancel_reason, "flooded");

    // A resume from any sequence gives the same events; a site scope keeps its own (the
    // old site hears its booking moved away, never where to).
    for after in 0..9 {
        let again = next_events(&mut capacity, None, after, 9 - after as usize).await;
        assert_eq!(again, events[after as usize..]);
    }
    let old_site = next_events(&mut capacity, Some("ev-site"), 0, 6).await;
    assert_eq!(old_site, [&events[..4], &events[5..7]].concat());
    let other_site = next_events(&mut capacity, Some("ev-other"), 0, 3).await;
    assert_eq!(
        kinds(&other_site),
        [
            EventKind::BookingRescheduled,
            EventKind::SlotClosed,
            EventKind::BookingCancelled
        ]
    );

    // Events survive a restart, and the sequence goes on after the last one.
    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), swept_by_hand(), clock.clone()).await;
    let mut capacity = server.capacity().await;
    let mut stream = capacity
        .watch_events(watch_request(None, 9))
        .await
        .expect("watch from the end")
        .into_inner();
    book_ok(
        &mut server.booking().await,
        book_request(&slot, "dave", "d1"),
    )
    .await;
    let live = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a live event comes")
        .unwrap()
        .unwrap()
        .event
        .unwrap();
    assert_eq!(
        (live.sequence, live.kind()),
        (10, EventKind::BookingConfirmed)
    );
    assert_eq!(next_events(&mut capacity, None, 0, 9).await, events);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_the_oldest_events_and_a_resume_from_before_them_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), swept_by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "prune-site", 10).await;
    let mut booking = server.booking().await;
    for citizen in ["a", "b", "c"] {
        book_ok(&mut booking, book_request(&slot, citizen, citizen)).await;
    }
    clock.advance(Duration::from_secs(2 * 3_600));
    book_ok(&mut booking, book_request(&slot, "d", "d")).await;
    let retained = server.retain().await;
    assert_eq!(retained.events, 3, "the three events older than an hour");

    let mut capacity = server.capacity().await;
    let status = capacity
        .watch_events(watch_request(None, 0))
        .await
        .expect_err("events 1..3 are gone");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status).as_deref(), Some("EVENTS_PRUNED"));
    assert_eq!(metadata(&status, "oldest_sequence").as_deref(), Some("4"));
    let kept = next_events(&mut capacity, None, 3, 1).await;
    assert_eq!(kept[0].sequence, 4);

    // Everything older than the window goes, but the last event always stays: the
    // sequence carries on across restarts.
    clock.advance(Duration::from_secs(2 * 3_600));
    assert_eq!(server.retain().await.events, 0);
    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), swept_by_hand(), clock.clone()).await;
    book_ok(&mut server.booking().await, book_request(&slot, "e", "e")).await;
    let mut capacity = server.capacity().await;
    let next = next_events(&mut capacity, None, 4, 1).await;
    assert_eq!(next[0].sequence, 5);

    let status = capacity
        .watch_events(watch_request(None, 99))
        .await
        .expect_err("no event 99 was ever written");
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(reason(&status).as_deref(), Some("EVENTS_AHEAD"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_watches_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.limits.event_streams_max = 2;
    let server = TestServer::start_with(dir.path(), config).await;
    let mut capacity = server.capacity().await;
    let first = capacity.watch_events(watch_request(None, 0)).await.unwrap();
    let second = capacity.watch_events(watch_request(None, 0)).await.unwrap();
    let status = capacity
        .watch_events(watch_request(None, 0))
        .await
        .expect_err("a third watch is over event_streams_max");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status).as_deref(), Some("WATCHERS_EXHAUSTED"));
    // A watch that ends gives its place back.
    drop(first);
    let mut reopened = None;
    for _ in 0..100 {
        match capacity.watch_events(watch_request(None, 0)).await {
            Ok(stream) => {
                reopened = Some(stream);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(reopened.is_some(), "the place of a closed watch comes back");
    drop(second);
    server.stop().await;
}

/// The README's example gateway (`examples/notifier.rs`, built by `cargo test`): prints
/// each event, stores its sequence, and a second run resumes after the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_notifier_follows_the_log_and_resumes_where_it_stopped() {
    let notifier = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .map(|debug| debug.join("examples").join("notifier"))
        .unwrap();
    assert!(
        notifier.exists(),
        "cargo test builds {}",
        notifier.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot = one_slot_site(&server, "n-site", 5).await;
    let mut booking = server.booking().await;
    let first = book_ok(&mut booking, book_request(&slot, "ann", "a1")).await;
    let state = dir.path().join("notifier.seq");
    // Runs the notifier until it printed `expected_lines` and stored `stored`.
    let run = |expected_lines: usize, stored: &str| {
        let mut child = std::process::Command::new(&notifier)
            .args(["--server", &server.url(), "--state"])
            .arg(&state)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines: Vec<String> = std::io::BufRead::lines(std::io::BufReader::new(stdout))
            .take(expected_lines)
            .map(Result::unwrap)
            .collect();
        for _ in 0..500 {
            match std::fs::read_to_string(&state) {
                Ok(text) if text.split_whitespace().last() == Some(stored) => break,
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        lines
    };
    let lines = tokio::task::block_in_place(|| run(1, "1"));
    assert_eq!(
        lines,
        [format!(
            "[1] booking {} confirmed: {} at n-site",
            first.booking_id, first.local_start
        )]
    );
    let stored = std::fs::read_to_string(&state).unwrap();
    let (log_id, sequence) = stored.trim().split_once(' ').unwrap();
    assert_eq!((log_id.len(), sequence), (32, "1"), "{stored}");

    booking
        .cancel_booking(proto::CancelBookingRequest {
            booking_id: first.booking_id.clone(),
            citizen_id: "ann".into(),
            request_id: "a2".into(),
        })
        .await
        .unwrap();
    let lines = tokio::task::block_in_place(|| run(1, "2"));
    assert_eq!(
        lines,
        [format!(
            "[2] booking {} cancelled (cancelled by citizen)",
            first.booking_id
        )]
    );
    let stored = std::fs::read_to_string(&state).unwrap();
    assert!(stored.ends_with(" 2\n"), "{stored}");
    server.stop().await;
}

/// A gateway names the log its sequence belongs to: the same id is accepted across
/// restarts, another one is refused with the current id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_is_only_resumed_in_its_own_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot = one_slot_site(&server, "log-site", 5).await;
    book_ok(&mut server.booking().await, book_request(&slot, "a", "a")).await;
    let mut capacity = server.capacity().await;
    let mut stream = capacity
        .watch_events(watch_request(None, 0))
        .await
        .unwrap()
        .into_inner();
    let log_id = stream.message().await.unwrap().unwrap().log_id;
    assert_eq!(log_id.len(), 32);
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let mut capacity = server.capacity().await;
    let same = proto::WatchEventsRequest {
        log_id: log_id.clone(),
        ..watch_request(None, 0)
    };
    let first = capacity
        .watch_events(same)
        .await
        .unwrap()
        .into_inner()
        .message()
        .await;
    assert_eq!(
        first.unwrap().unwrap().log_id,
        log_id,
        "the id survives a restart"
    );
    let other = proto::WatchEventsRequest {
        log_id: "00".repeat(16),
        ..watch_request(None, 0)
    };
    let status = capacity.watch_events(other).await.expect_err("another log");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status).as_deref(), Some("EVENT_LOG_REPLACED"));
    assert_eq!(metadata(&status, "log_id"), Some(log_id));
    server.stop().await;
}
