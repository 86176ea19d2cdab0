//! Fair release (PRODUCT.md part B) on a real server: announced openings refuse
//! bookings until `release_at`; a queued release ranks everyone who joined before the
//! opening by a random draw, admits in rank order never beyond the places left, sells
//! out at once, and keeps its draw across a restart and a kill -9.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::child::ChildServer;
use common::*;
use prenota::config::Config;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::{self, QueueTicketState, ReleasePhase};
use prenota::service::Clock;
use prost_types::Timestamp;
use tonic::transport::Channel;
use tonic::Code;

fn at_ms(unix_ms: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: unix_ms.div_euclid(1_000),
        nanos: (unix_ms.rem_euclid(1_000) * 1_000_000) as i32,
    })
}

fn ms_of(at: &Option<Timestamp>) -> i64 {
    let at = at.as_ref().expect("a timestamp");
    at.seconds * 1_000 + i64::from(at.nanos / 1_000_000)
}

/// A release of service `vax` in `region` over the next 60 days, opening at `release_at`;
/// queued (joins from `queue_opens_at`) when that is given.
fn release(id: &str, region: &str, release_at: i64, queue_opens_at: Option<i64>) -> proto::Release {
    let now_s = release_at / 1_000 - 3_600;
    proto::Release {
        release_id: id.into(),
        region_id: region.into(),
        service_id: "vax".into(),
        from: at_ms(now_s * 1_000),
        to: at_ms((now_s + 60 * 86_400) * 1_000),
        release_at: at_ms(release_at),
        queue_opens_at: queue_opens_at.and_then(at_ms),
        ..Default::default()
    }
}

async fn create(
    capacity: &mut CapacityServiceClient<Channel>,
    release: proto::Release,
) -> Result<proto::Release, tonic::Status> {
    capacity
        .create_release(proto::CreateReleaseRequest {
            release: Some(release),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner().release.expect("a release"))
}

async fn get_release(capacity: &mut CapacityServiceClient<Channel>, id: &str) -> proto::Release {
    capacity
        .get_release(proto::GetReleaseRequest {
            release_id: id.into(),
        })
        .await
        .expect("the release")
        .into_inner()
        .release
        .expect("a release")
}

async fn join(
    booking: &mut BookingServiceClient<Channel>,
    release_id: &str,
    citizen: &str,
) -> Result<proto::QueueTicket, tonic::Status> {
    booking
        .join_queue(proto::JoinQueueRequest {
            release_id: release_id.into(),
            citizen_id: citizen.into(),
            request_id: format!("join-{citizen}"),
        })
        .await
        .map(|r| r.into_inner().ticket.expect("a ticket"))
}

async fn ticket(
    booking: &mut BookingServiceClient<Channel>,
    release_id: &str,
    citizen: &str,
) -> proto::QueueTicket {
    booking
        .get_queue_ticket(proto::GetQueueTicketRequest {
            release_id: release_id.into(),
            citizen_id: citizen.into(),
        })
        .await
        .expect("the ticket")
        .into_inner()
        .ticket
        .expect("a ticket")
}

/// Every citizen's ticket, 16 at a time.
async fn tickets(
    channel: &Channel,
    release_id: &str,
    citizens: &[String],
) -> Vec<proto::QueueTicket> {
    let mut all = Vec::with_capacity(citizens.len());
    for chunk in citizens.chunks(16) {
        let reads = chunk.iter().map(|citizen| {
            let mut booking = BookingServiceClient::new(channel.clone());
            let (release_id, citizen) = (release_id.to_string(), citizen.clone());
            async move { ticket(&mut booking, &release_id, &citizen).await }
        });
        all.extend(futures::future::join_all(reads).await);
    }
    all
}

/// Every citizen joins, 16 at a time; each gets a new WAITING ticket.
async fn join_all(channel: &Channel, release_id: &str, citizens: &[String]) {
    for chunk in citizens.chunks(16) {
        let joins = chunk.iter().map(|citizen| {
            let mut booking = BookingServiceClient::new(channel.clone());
            let (release_id, citizen) = (release_id.to_string(), citizen.clone());
            async move { join(&mut booking, &release_id, &citizen).await }
        });
        for joined in futures::future::join_all(joins).await {
            let joined = joined.expect("joined");
            assert_eq!(joined.state(), QueueTicketState::Waiting);
        }
    }
}

fn state_and_position(tickets: &[proto::QueueTicket]) -> Vec<(i32, u64)> {
    tickets.iter().map(|t| (t.state, t.position)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn booking_before_release_at_is_refused_with_the_time_to_retry() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), Config::default(), clock.clone()).await;
    let slot_id = one_slot_site(&server, "announced", 5).await;
    let (mut booking, mut capacity) = (server.booking().await, server.capacity().await);
    let release_at = clock.now_unix_ms() + 90_000;

    // Without a queue the admission TTL applies to nothing: its default (a client
    // filling in PRODUCT.md's defaults) is accepted, another value refused.
    let with_ttl = |admission_ttl_seconds| proto::Release {
        admission_ttl_seconds,
        ..release("r1", "test-region", release_at, None)
    };
    let refused = create(&mut capacity, with_ttl(900)).await.unwrap_err();
    assert_eq!(violated_fields(&refused), ["release.queue_opens_at"]);
    let created = create(&mut capacity, with_ttl(600)).await.expect("created");
    assert_eq!(created.phase(), ReleasePhase::Announced);
    // The slot shows when it opens.
    let slots = search_all(&mut booking, "announced", "vax").await;
    assert_eq!(ms_of(&slots[0].release_at), release_at);

    let status = booking
        .book(book_request(&slot_id, "early-bird", "b1"))
        .await
        .expect_err("not released yet");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status).as_deref(), Some("SLOT_NOT_RELEASED"));
    assert_eq!(retry_delay(&status), Duration::from_secs(90));
    assert!(metadata(&status, "release_at").is_some());
    let hold = booking
        .hold_slot(proto::HoldSlotRequest {
            slot_id: slot_id.clone(),
            citizen_id: "early-bird".into(),
            request_id: "h1".into(),
            ttl_seconds: 0,
        })
        .await
        .expect_err("not released yet");
    assert_eq!(reason(&hold).as_deref(), Some("SLOT_NOT_RELEASED"));

    // Creating it again returns it; another definition under its id, or an overlapping
    // release, is refused; so is an opening in the past.
    let again = create(
        &mut capacity,
        release("r1", "test-region", release_at, None),
    )
    .await;
    let again = again.expect("same release");
    assert_eq!(again.release_id, "r1");
    // Answered with its counts, as GetRelease (places_remaining read 0 here).
    let status = get_release(&mut capacity, "r1").await;
    assert_eq!(again.places_remaining, status.places_remaining);
    assert!(again.places_remaining > 0);
    let changed = create(
        &mut capacity,
        release("r1", "test-region", release_at + 1, None),
    )
    .await
    .expect_err("another definition");
    assert_eq!(reason(&changed).as_deref(), Some("RELEASE_EXISTS"));
    let overlapping = create(
        &mut capacity,
        release("r2", "test-region", release_at, None),
    )
    .await
    .expect_err("overlaps r1");
    assert_eq!(reason(&overlapping).as_deref(), Some("RELEASE_OVERLAPS"));
    let past = create(
        &mut capacity,
        release("r3", "elsewhere", clock.now_unix_ms() - 1, None),
    )
    .await
    .expect_err("in the past");
    assert_eq!(violated_fields(&past), ["release.release_at"]);

    // At release_at anyone books, first come first served (no queue).
    clock.advance(Duration::from_secs(90));
    book_ok(&mut booking, book_request(&slot_id, "early-bird", "b2")).await;
    let open = get_release(&mut capacity, "r1").await;
    assert_eq!(open.phase(), ReleasePhase::Open);
    assert_eq!(open.places_remaining, 4);
    // Not a queued release: there is no queue to join.
    let no_queue = join(&mut booking, "r1", "someone")
        .await
        .expect_err("no queue");
    assert_eq!(reason(&no_queue).as_deref(), Some("RELEASE_NOT_QUEUED"));
    server.stop().await;
}

/// A booking made before a release was announced, in a slot the release then covers,
/// cannot move into the release's other slots before `release_at` (it once could, "a
/// move within the release": picking the best slots before everyone else).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_moves_within_its_release_only_once_it_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), Config::default(), clock.clone()).await;
    let channel = server.channel().await;
    utc_site_on(channel, ("early", "test-region"), 30, ("10:00", "11:00"), 2).await;
    let (mut booking, mut capacity) = (server.booking().await, server.capacity().await);
    let slots = search_all(&mut booking, "early", "vax").await;
    let first = book_ok(&mut booking, book_request(&slots[0].slot_id, "c", "b1")).await;
    let release_at = clock.now_unix_ms() + 90_000;
    create(&mut capacity, release("r", "test-region", release_at, None))
        .await
        .expect("created");
    let move_to_second = |request_id: &str| proto::RescheduleBookingRequest {
        booking_id: first.booking_id.clone(),
        citizen_id: "c".into(),
        new_slot_id: slots[1].slot_id.clone(),
        request_id: request_id.into(),
    };
    let early = booking.reschedule_booking(move_to_second("m1")).await;
    let status = early.expect_err("not released yet");
    assert_eq!(reason(&status).as_deref(), Some("SLOT_NOT_RELEASED"));
    clock.advance(Duration::from_secs(90));
    booking
        .reschedule_booking(move_to_second("m2"))
        .await
        .expect("released: anyone moves in");
    server.stop().await;
}

/// 25 slots of 100 places (2,500) on one site of region `lazio`, 30 days ahead.
async fn big_site(server: &TestServer) -> Vec<proto::Slot> {
    let site = ("q-site", "lazio");
    utc_site_on(server.channel().await, site, 30, ("08:00", "20:30"), 100).await;
    let slots = search_all(&mut server.booking().await, "q-site", "vax").await;
    assert_eq!(slots.len(), 25);
    slots
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_release_admits_a_fair_draw_within_its_places_then_sells_out() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), Config::default(), clock.clone()).await;
    let slots = big_site(&server).await;
    let (mut booking, mut capacity) = (server.booking().await, server.capacity().await);
    let now = clock.now_unix_ms();
    let (opens, release_at) = (now + 60_000, now + 600_000);
    create(
        &mut capacity,
        release("q", "lazio", release_at, Some(opens)),
    )
    .await
    .expect("created");

    let early = join(&mut booking, "q", "citizen-0")
        .await
        .expect_err("closed");
    assert_eq!(reason(&early).as_deref(), Some("QUEUE_NOT_OPEN"));
    clock.advance(Duration::from_secs(60));

    // 5,000 citizens join before the opening: the first 500 strictly before the rest.
    let citizens: Vec<String> = (0..5_000).map(|i| format!("citizen-{i}")).collect();
    let channel = server.channel().await;
    join_all(&channel, "q", &citizens[..500]).await;
    join_all(&channel, "q", &citizens[500..]).await;
    let again = join(&mut booking, "q", "citizen-7").await.expect("joined");
    assert_eq!(
        (again.state(), again.position),
        (QueueTicketState::Waiting, 0)
    );
    let unknown = booking
        .get_queue_ticket(proto::GetQueueTicketRequest {
            release_id: "q".into(),
            citizen_id: "never-joined".into(),
        })
        .await
        .expect_err("no ticket");
    assert_eq!(reason(&unknown).as_deref(), Some("TICKET_NOT_FOUND"));

    // The opening: the draw, then admissions within the places (2,000 per step).
    clock.advance(Duration::from_secs(540));
    // (The server's own timer runs steps too.)
    loop {
        let admitted = server.advance_releases().await;
        let status = get_release(&mut capacity, "q").await;
        assert!(
            status.tickets_admitted_unused <= status.places_remaining,
            "{status:?}"
        );
        if admitted == 0 {
            assert_eq!(status.tickets_admitted, 2_500);
            assert_eq!(status.tickets_waiting, 2_500);
            break;
        }
    }

    // Fairness: the earliest 10% of joiners hold 10% ± 3% of the admissions.
    let before = tickets(&channel, "q", &citizens).await;
    let admitted: Vec<usize> = (0..citizens.len())
        .filter(|i| before[*i].state() == QueueTicketState::Admitted)
        .collect();
    assert_eq!(admitted.len(), 2_500);
    let earliest = admitted.iter().filter(|i| **i < 500).count();
    assert!(
        (175..=325).contains(&earliest),
        "{earliest} of 2,500 admissions went to the earliest 500 joiners"
    );
    // Those waiting hold positions 1..=2,500, each once.
    let mut positions: Vec<u64> = before
        .iter()
        .filter(|t| t.state() == QueueTicketState::Waiting)
        .map(|t| t.position)
        .collect();
    positions.sort();
    assert_eq!(positions, (1..=2_500).collect::<Vec<u64>>());

    // The same after a restart: the draw is seeded and stored.
    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), Config::default(), clock.clone()).await;
    let channel = server.channel().await;
    let (mut booking, mut capacity) = (server.booking().await, server.capacity().await);
    let after = tickets(&channel, "q", &citizens).await;
    assert_eq!(state_and_position(&after), state_and_position(&before));

    // Only admitted citizens book; each of them books once.
    let waiting = citizens[(0..5_000)
        .find(|i| before[*i].state() == QueueTicketState::Waiting)
        .unwrap()]
    .clone();
    let refused = booking
        .book(book_request(&slots[0].slot_id, &waiting, "w1"))
        .await
        .expect_err("not admitted");
    assert_eq!(reason(&refused).as_deref(), Some("NOT_ADMITTED"));
    let stranger = booking
        .book(book_request(&slots[0].slot_id, "never-joined", "s1"))
        .await
        .expect_err("no ticket");
    assert_eq!(reason(&stranger).as_deref(), Some("NOT_ADMITTED"));
    let mut by_slot: HashMap<usize, usize> = HashMap::new();
    let mut bookings = Vec::new();
    for (n, i) in admitted.iter().enumerate() {
        *by_slot.entry(n / 100).or_default() += 1;
        bookings.push((slots[n / 100].slot_id.clone(), citizens[*i].clone()));
    }
    let mut made = Vec::new();
    for chunk in bookings.chunks(16) {
        let books = chunk.iter().map(|(slot_id, citizen)| {
            let mut booking = BookingServiceClient::new(channel.clone());
            let request = book_request(slot_id, citizen, &format!("book-{citizen}"));
            async move { book_ok(&mut booking, request).await }
        });
        made.extend(futures::future::join_all(books).await);
    }
    let twice = booking
        .book(book_request(&slots[1].slot_id, &bookings[0].1, "again"))
        .await
        .expect_err("one booking per ticket");
    assert_eq!(reason(&twice).as_deref(), Some("NOT_ADMITTED"));

    // The last place went: the next step sells the release out, every waiting ticket
    // at once.
    assert_eq!(server.advance_releases().await, 0);
    let sold_out = get_release(&mut capacity, "q").await;
    assert_eq!(sold_out.phase(), ReleasePhase::SoldOut);
    assert_eq!(sold_out.places_remaining, 0);
    let last = tickets(&channel, "q", &citizens).await;
    for (i, ticket) in last.iter().enumerate() {
        let expected = match before[i].state() {
            QueueTicketState::Waiting => QueueTicketState::SoldOut,
            other => other,
        };
        assert_eq!(ticket.state(), expected, "citizen {i}");
    }
    let late = join(&mut booking, "q", "late-comer")
        .await
        .expect("answered");
    assert_eq!(late.state(), QueueTicketState::SoldOut);
    let stats = site_stats(&server, "q-site").await;
    assert_eq!((stats.capacity, stats.booked), (2_500, 2_500));

    // A place that comes back (a cancel) goes to the next ticket in rank order, not to
    // whoever books first; a used ticket admits nothing more.
    booking
        .cancel_booking(proto::CancelBookingRequest {
            booking_id: made[0].booking_id.clone(),
            citizen_id: bookings[0].1.clone(),
            request_id: "cancel-1".into(),
        })
        .await
        .expect("cancelled");
    let reused = booking
        .book(book_request(&slots[0].slot_id, &bookings[0].1, "again-2"))
        .await
        .expect_err("a used ticket");
    assert_eq!(reason(&reused).as_deref(), Some("NOT_ADMITTED"));
    let first_come = booking
        .book(book_request(&slots[0].slot_id, "never-joined", "s2"))
        .await
        .expect_err("still queued");
    assert_eq!(reason(&first_come).as_deref(), Some("NOT_ADMITTED"));
    server.advance_releases().await; // (or the server's timer did)
    assert_eq!(
        get_release(&mut capacity, "q").await.tickets_admitted,
        2_501
    );
    let next = (0..5_000)
        .find(|i| before[*i].state() == QueueTicketState::Waiting && before[*i].position == 1)
        .unwrap();
    let next_ticket = ticket(&mut booking, "q", &citizens[next]).await;
    assert_eq!(next_ticket.state(), QueueTicketState::Admitted);
    assert_eq!(
        get_release(&mut capacity, "q").await.phase(),
        ReleasePhase::Open
    );
    book_ok(
        &mut booking,
        book_request(&slots[0].slot_id, &citizens[next], "next-1"),
    )
    .await;
    server.stop().await;
}

/// A queued release on a child process: the draw at `release_at`, then a kill -9: the
/// restarted server shows every ticket as before, and sells out within a second of
/// the last place going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_draw_survives_a_kill_9_and_the_sell_out_is_told_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(dir.path());
    let channel = connect(&server.url).await;
    let mut capacity = CapacityServiceClient::new(channel.clone());
    utc_site_on(
        channel.clone(),
        ("k-site", "umbria"),
        20,
        ("09:00", "10:00"),
        50,
    )
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    let release_at = now + 4_000;
    create(
        &mut capacity,
        release("k", "umbria", release_at, Some(now - 1_000)),
    )
    .await
    .expect("created");
    let citizens: Vec<String> = (0..1_000).map(|i| format!("k-{i}")).collect();
    join_all(&channel, "k", &citizens).await;
    assert!(
        chrono::Utc::now().timestamp_millis() < release_at,
        "the joins took too long to test the draw"
    );
    // After the opening and a few admission steps: 100 admitted, 900 waiting.
    tokio::time::sleep(Duration::from_millis(
        (release_at - chrono::Utc::now().timestamp_millis()).max(0) as u64 + 1_000,
    ))
    .await;
    let before = tickets(&channel, "k", &citizens).await;
    let admitted: Vec<&String> = (0..1_000)
        .filter(|i| before[*i].state() == QueueTicketState::Admitted)
        .map(|i| &citizens[i])
        .collect();
    assert_eq!(admitted.len(), 100);

    server.kill_9();
    let server = ChildServer::start(dir.path());
    let channel = connect(&server.url).await;
    let after = tickets(&channel, "k", &citizens).await;
    assert_eq!(state_and_position(&after), state_and_position(&before));

    // The admitted book every place; the waiting hear SOLD_OUT within a second.
    let slots = search_all(
        &mut BookingServiceClient::new(channel.clone()),
        "k-site",
        "vax",
    )
    .await;
    for (n, citizen) in admitted.iter().enumerate() {
        let slot_id = &slots[n / 50].slot_id;
        let mut booking = BookingServiceClient::new(channel.clone());
        book_ok(&mut booking, book_request(slot_id, citizen, "k-book")).await;
    }
    let last_place_went = std::time::Instant::now();
    let waiting = &citizens[(0..1_000)
        .find(|i| before[*i].state() == QueueTicketState::Waiting)
        .unwrap()];
    let mut booking = BookingServiceClient::new(channel.clone());
    loop {
        let state = ticket(&mut booking, "k", waiting).await.state();
        if state == QueueTicketState::SoldOut {
            break;
        }
        assert_eq!(state, QueueTicketState::Waiting);
        assert!(
            last_place_went.elapsed() < Duration::from_secs(1),
            "still waiting a second after the last place went"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_release_and_its_tickets_go_after_the_retention_window() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), Config::default(), clock.clone()).await;
    one_slot_site(&server, "old", 5).await;
    let (mut booking, mut capacity) = (server.booking().await, server.capacity().await);
    let now = clock.now_unix_ms();
    create(
        &mut capacity,
        release("old", "test-region", now + 60_000, Some(now)),
    )
    .await
    .expect("created");
    for citizen in ["a", "b", "c"] {
        join(&mut booking, "old", citizen).await.expect("joined");
    }
    // Still inside the window: kept.
    clock.advance(Duration::from_secs(30 * 86_400));
    let kept = server.retain().await;
    assert_eq!((kept.releases, kept.tickets), (0, 0));
    let ended = join(&mut booking, "old", "d").await;
    assert_eq!(
        ended.map(|t| t.state()).map_err(|s| reason(&s)),
        Ok(QueueTicketState::Waiting),
        "joins are still taken before `to`"
    );
    // 60 days of slots, then 400 days of retention, then some.
    clock.advance(Duration::from_secs(435 * 86_400));
    let late = join(&mut booking, "old", "e").await.expect_err("ended");
    assert_eq!(reason(&late).as_deref(), Some("RELEASE_ENDED"));
    let gone = server.retain().await;
    assert_eq!((gone.releases, gone.tickets), (1, 4));
    let missing = capacity
        .get_release(proto::GetReleaseRequest {
            release_id: "old".into(),
        })
        .await
        .expect_err("deleted");
    assert_eq!(reason(&missing).as_deref(), Some("RELEASE_NOT_FOUND"));
    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), Config::default(), clock).await;
    let mut capacity = server.capacity().await;
    let still = capacity
        .get_release(proto::GetReleaseRequest {
            release_id: "old".into(),
        })
        .await
        .expect_err("still deleted");
    assert_eq!(reason(&still).as_deref(), Some("RELEASE_NOT_FOUND"));
    server.stop().await;
}

/// Deletes release `id`'s record from a stopped server's store, leaving its tickets: what
/// an older version's retention left when it stopped between the two.
async fn delete_release_record(data_dir: &std::path::Path, id: &str) {
    use prenota::domain::ids::ReleaseId;
    use prenota::store::records::{release_key, Write};
    let key = release_key(&ReleaseId::parse("id", id, 64).expect("an id"));
    if common::postgres::asked() {
        let url = common::postgres::url_of_dir(data_dir);
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let sql = format!(
            "WITH d AS (DELETE FROM prenota_kv WHERE k = '\\x{hex}'::bytea RETURNING 1) \
             SELECT count(*) FROM d"
        );
        assert_eq!(common::postgres::query_i64(&url, &sql), 1);
        return;
    }
    let mut store =
        prenota::store::Store::open(data_dir, &Config::default().limits).expect("store opens");
    store.commit(&[Write::Delete(key)]).await.expect("deleted");
    store.shutdown().expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_created_again_under_an_id_whose_old_tickets_linger_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), Config::default(), clock.clone()).await;
    one_slot_site(&server, "old", 5).await;
    let now = clock.now_unix_ms();
    let definition = release("r", "test-region", now + 60_000, Some(now));
    let (mut booking, mut capacity) = (server.booking().await, server.capacity().await);
    create(&mut capacity, definition.clone())
        .await
        .expect("created");
    for citizen in ["a", "b", "c"] {
        join(&mut booking, "r", citizen).await.expect("joined");
    }
    server.stop().await;
    delete_release_record(dir.path(), "r").await;

    let server = TestServer::start_with_clock(dir.path(), Config::default(), clock.clone()).await;
    let (mut booking, mut capacity) = (server.booking().await, server.capacity().await);
    create(&mut capacity, definition)
        .await
        .expect("created again");
    join(&mut booking, "r", "x").await.expect("joined");
    // The pass after it must not take the new release's ticket for an old one.
    server.retain().await;
    server.stop().await;

    let server = TestServer::start_with_clock(dir.path(), Config::default(), clock).await;
    let (mut booking, mut capacity) = (server.booking().await, server.capacity().await);
    assert_eq!(get_release(&mut capacity, "r").await.tickets_waiting, 1);
    assert_eq!(
        ticket(&mut booking, "r", "x").await.state(),
        QueueTicketState::Waiting
    );
    let old = booking
        .get_queue_ticket(proto::GetQueueTicketRequest {
            release_id: "r".into(),
            citizen_id: "a".into(),
        })
        .await
        .expect_err("the old release's ticket is gone");
    assert_eq!(old.code(), Code::NotFound);
    server.stop().await;
}

async fn hold(
    booking: &mut BookingServiceClient<Channel>,
    slot_id: &str,
    citizen: &str,
) -> Result<proto::Hold, tonic::Status> {
    booking
        .hold_slot(proto::HoldSlotRequest {
            slot_id: slot_id.into(),
            citizen_id: citizen.into(),
            request_id: format!("hold-{citizen}-{slot_id}"),
            ttl_seconds: 0,
        })
        .await
        .map(|r| r.into_inner().hold.expect("a hold"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_places_keep_a_queue_open_and_moves_within_a_release_need_no_ticket() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let mut config = Config::default();
    config.limits.held_share_of_capacity_max_percent = 100;
    let server = TestServer::start_with_clock(dir.path(), config, clock.clone()).await;
    let mut capacity = server.capacity().await;
    let site = ("h-site", "marche");
    utc_site_on(server.channel().await, site, 10, ("09:00", "10:00"), 2).await;
    let mut booking = server.booking().await;
    let slots = search_all(&mut booking, "h-site", "vax").await;
    let (first, second) = (slots[0].slot_id.clone(), slots[1].slot_id.clone());
    // A hold taken before the release existed passes its gate when confirmed.
    let early = hold(&mut booking, &first, "early").await.expect("held");
    let now = clock.now_unix_ms();
    create(
        &mut capacity,
        release("h", "marche", now + 60_000, Some(now)),
    )
    .await
    .expect("created");
    let mut confirm = book_request(&first, "early", "confirm-early");
    confirm.hold_id = Some(early.hold_id.clone());
    let refused = booking.book(confirm.clone()).await.expect_err("not yet");
    assert_eq!(reason(&refused).as_deref(), Some("SLOT_NOT_RELEASED"));

    // Three join for the 3 places left; the opening admits them.
    for citizen in ["x", "y", "z"] {
        join(&mut booking, "h", citizen).await.expect("joined");
    }
    clock.advance(Duration::from_secs(61));
    server.advance_releases().await;
    assert_eq!(get_release(&mut capacity, "h").await.tickets_admitted, 3);
    // The early hold, without a ticket, still may not be confirmed.
    let refused = booking.book(confirm).await.expect_err("no ticket");
    assert_eq!(reason(&refused).as_deref(), Some("NOT_ADMITTED"));

    // x and y hold, z books: no place free, but two held: not sold out yet.
    let x = hold(&mut booking, &first, "x").await.expect("held");
    hold(&mut booking, &second, "y").await.expect("held");
    let z = book_ok(&mut booking, book_request(&second, "z", "book-z")).await;
    server.advance_releases().await;
    let status = get_release(&mut capacity, "h").await;
    assert_eq!(status.places_remaining, 0);
    assert_ne!(
        status.phase(),
        ReleasePhase::SoldOut,
        "holds may still expire"
    );

    // z moves within the release (its ticket is used: no new admission needed)...
    let moved = booking
        .reschedule_booking(proto::RescheduleBookingRequest {
            booking_id: z.booking_id.clone(),
            citizen_id: "z".into(),
            new_slot_id: first.clone(),
            request_id: "move-z".into(),
        })
        .await;
    // ...but the first slot is full (early's hold and x's): SLOT_FULL, not NOT_ADMITTED.
    assert_eq!(
        reason(&moved.expect_err("full")).as_deref(),
        Some("SLOT_FULL")
    );
    // x confirms its hold; early's hold expires: the last place is the sweep's to free.
    let mut confirm_x = book_request(&first, "x", "confirm-x");
    confirm_x.hold_id = Some(x.hold_id.clone());
    book_ok(&mut booking, confirm_x).await;
    clock.advance(Duration::from_secs(300));
    server.sweep_holds().await;
    // y's hold expired too: two places came back, and nobody waits: not sold out.
    server.advance_releases().await;
    let status = get_release(&mut capacity, "h").await;
    assert_eq!(status.places_remaining, 2);
    assert_ne!(status.phase(), ReleasePhase::SoldOut);
    // z moves to the freed place of the first slot: a move within the release.
    booking
        .reschedule_booking(proto::RescheduleBookingRequest {
            booking_id: z.booking_id.clone(),
            citizen_id: "z".into(),
            new_slot_id: first.clone(),
            request_id: "move-z-2".into(),
        })
        .await
        .expect("moved within the release");
    // y's ticket was used by its hold: it admits nothing more.
    let again = booking
        .hold_slot(proto::HoldSlotRequest {
            slot_id: second.clone(),
            citizen_id: "y".into(),
            request_id: "hold-y-again".into(),
            ttl_seconds: 0,
        })
        .await
        .expect_err("used");
    assert_eq!(reason(&again).as_deref(), Some("NOT_ADMITTED"));
    server.stop().await;
}

/// One admitted ticket admits one booking or hold: a citizen allowed two active
/// bookings (`max_active_per_citizen = 2`) who sends two at once with one ticket gets
/// one, and `NOT_ADMITTED` for the other (the ticket was read unused by both plans and
/// marked used only once durable, so both once passed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ticket_admits_one_write_however_many_are_sent_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let mut config = Config::default();
    config.limits.max_active_per_citizen = 2;
    let server = TestServer::start_with_clock(dir.path(), config, clock.clone()).await;
    let mut capacity = server.capacity().await;
    utc_site_on(
        server.channel().await,
        ("t-site", "umbria"),
        10,
        ("09:00", "10:00"),
        10,
    )
    .await;
    let mut booking = server.booking().await;
    let slots = search_all(&mut booking, "t-site", "vax").await;
    let now = clock.now_unix_ms();
    let queued = release("t", "umbria", now + 60_000, Some(now));
    create(&mut capacity, queued).await.expect("created");
    let citizens = ["a", "b", "c", "d", "e", "f"];
    for citizen in citizens {
        join(&mut booking, "t", citizen).await.expect("joined");
    }
    clock.advance(Duration::from_secs(61));
    server.advance_releases().await;
    assert_eq!(get_release(&mut capacity, "t").await.tickets_admitted, 6);
    for citizen in citizens {
        assert!(!ticket(&mut booking, "t", citizen).await.used);
        let (mut one, mut other) = (booking.clone(), booking.clone());
        let (first, second) = tokio::join!(
            one.book(book_request(&slots[0].slot_id, citizen, "1")),
            other.book(book_request(&slots[1].slot_id, citizen, "2")),
        );
        let refused = match (first, second) {
            (Ok(_), Err(refused)) | (Err(refused), Ok(_)) => refused,
            (first, second) => panic!("{citizen}: {first:?} / {second:?}"),
        };
        assert_eq!(reason(&refused).as_deref(), Some("NOT_ADMITTED"));
        // The ticket says so (it read ADMITTED alone, as if it still admitted).
        let spent = ticket(&mut booking, "t", citizen).await;
        assert!(spent.used && spent.state == proto::QueueTicketState::Admitted as i32);
    }
    server.stop().await;
}

/// `queue_tickets_max` bounds the tickets of releases not ended: a citizen holding a
/// ticket gets it back however full the queues are (it was QUEUE_FULL, even for the
/// same request), and once a release's `to` passed its tickets stop counting (they
/// blocked every later release's joins until retention deleted them, 400 days on),
/// after a restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ticket_cap_counts_live_queues_and_never_refuses_a_ticket_holder() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let mut config = by_hand();
    config.limits.queue_tickets_max = 2;
    let server = TestServer::start_with_clock(dir.path(), config.clone(), clock.clone()).await;
    one_slot_site(&server, "cap", 5).await;
    let (mut booking, mut capacity) = (server.booking().await, server.capacity().await);
    let now = clock.now_unix_ms();
    let first = release("first", "test-region", now + 60_000, Some(now));
    create(&mut capacity, first).await.expect("created");
    let a = join(&mut booking, "first", "a").await.expect("joined");
    join(&mut booking, "first", "b").await.expect("joined");
    let full = join(&mut booking, "first", "c").await.expect_err("full");
    assert_eq!(reason(&full).as_deref(), Some("QUEUE_FULL"));
    let again = join(&mut booking, "first", "a").await.expect("its ticket");
    assert_eq!((again.joined_at, again.state), (a.joined_at, a.state));
    // Past the first release's `to` (60 days of slots): its two tickets stay, uncounted.
    clock.advance(Duration::from_secs(61 * 86_400));
    server.advance_releases().await;
    let now = clock.now_unix_ms();
    let second = release("second", "test-region", now + 60_000, Some(now));
    create(&mut capacity, second).await.expect("created");
    join(&mut booking, "second", "c")
        .await
        .expect("the ended queue's tickets not counted");
    assert_eq!(
        ticket(&mut booking, "first", "a").await.joined_at,
        a.joined_at
    );
    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), config, clock).await;
    let mut booking = server.booking().await;
    join(&mut booking, "second", "d")
        .await
        .expect("recovery counts live queues only");
    let full = join(&mut booking, "second", "e").await.expect_err("full");
    assert_eq!(reason(&full).as_deref(), Some("QUEUE_FULL"));
    server.stop().await;
}

/// A queue admits no one to a campaign's slots while they take offers only: tickets
/// were admitted to places their holders could not book (OFFER_REQUIRED). Once the
/// slot is in the campaign's last-minute window, anyone may book it, and the queue
/// admits to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_admits_to_a_campaigns_slots_only_in_their_last_minute_window() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot = one_slot_site(&server, "mixed", 5).await;
    let (mut booking, mut capacity) = (server.booking().await, server.capacity().await);
    let now = clock.now_unix_ms();
    let far = now + 400 * 86_400_000;
    let campaign = proto::Campaign {
        campaign_id: "offers".into(),
        service_id: "vax".into(),
        region_id: "test-region".into(),
        waves: vec![proto::Wave {
            wave_id: "later".into(),
            opens_at: at_ms(far),
            ..Default::default()
        }],
        ..Default::default()
    };
    capacity
        .upsert_campaign(proto::UpsertCampaignRequest {
            campaign: Some(campaign),
            request_id: String::new(),
        })
        .await
        .expect("campaign");
    let both = release("both", "test-region", now + 60_000, Some(now));
    create(&mut capacity, both).await.expect("created");
    join(&mut booking, "both", "a").await.expect("joined");
    clock.advance(Duration::from_secs(61));
    server.advance_releases().await;
    let both = get_release(&mut capacity, "both").await;
    assert_eq!(both.places_remaining, 0, "no place a ticket could book");
    assert_ne!(both.phase(), ReleasePhase::SoldOut, "its places are coming");
    let state = ticket(&mut booking, "both", "a").await.state();
    assert_eq!(state, QueueTicketState::Waiting);
    // 12 hours before the slot (30 days ahead), it is within the last 24 hours (a fixed
    // 29 days on was within them only after 10:00 UTC: the test failed before).
    let start_s: i64 = slot.rsplit('/').next().unwrap().parse().unwrap();
    let until = start_s * 1_000 - 12 * 3_600_000 - clock.now_unix_ms();
    clock.advance(Duration::from_millis(until.try_into().unwrap()));
    server.advance_releases().await;
    assert_eq!(
        ticket(&mut booking, "both", "a").await.state(),
        QueueTicketState::Admitted
    );
    book_ok(&mut booking, book_request(&slot, "a", "a-book")).await;
    server.stop().await;
}

/// A release sold out by a closure is open again once the slot reopens, though the
/// place goes to the ticket already admitted (it stayed SOLD_OUT, with a free place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_sold_out_by_a_closure_opens_again_when_the_slot_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let slot_id = one_slot_site(&server, "shut", 1).await;
    let (mut booking, mut capacity) = (server.booking().await, server.capacity().await);
    let now = clock.now_unix_ms();
    let shut = release("shut", "test-region", now + 60_000, Some(now));
    create(&mut capacity, shut).await.expect("created");
    join(&mut booking, "shut", "a").await.expect("joined");
    clock.advance(Duration::from_secs(61));
    server.advance_releases().await;
    assert_eq!(
        ticket(&mut booking, "shut", "a").await.state(),
        QueueTicketState::Admitted
    );
    let slot = search_all(&mut booking, "shut", "vax").await.remove(0);
    let close = proto::CloseSlotsRequest {
        site_id: "shut".into(),
        service_id: None,
        from: slot.start,
        to: slot.end,
        reason: "no staff".into(),
        request_id: "close".into(),
    };
    capacity.close_slots(close).await.expect("closed");
    server.advance_releases().await;
    assert_eq!(
        get_release(&mut capacity, "shut").await.phase(),
        ReleasePhase::SoldOut
    );
    capacity
        .set_slot_capacity(proto::SetSlotCapacityRequest {
            slot_id: slot_id.clone(),
            capacity: 1,
            request_id: String::new(),
        })
        .await
        .expect("reopened");
    server.advance_releases().await;
    let open = get_release(&mut capacity, "shut").await;
    assert_eq!(
        (open.phase(), open.places_remaining),
        (ReleasePhase::Open, 1)
    );
    book_ok(&mut booking, book_request(&slot_id, "a", "a-book")).await;
    server.stop().await;
}
