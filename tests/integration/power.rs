//! Power cuts (issue #22). The server runs under `tests/shim/power_cut.c`, which
//! journals every change it makes to its data dir; a kill -9 at a random instant stands
//! for the cut, and the data dir is then replaced by what the disk would hold
//! (`power/image.rs`): only what was synced, or in torn mode also a random part of the
//! rest (some pages of the unsynced writes, some of the unsynced directory changes).
//! A kill -9 alone keeps the page cache and cannot find what this finds.
//!
//! Each cycle the server recovers from the last cut's image, and then: every
//! acknowledged booking, cancel, hold and (chunked) import is there; no slot is over
//! capacity; no citizen holds two confirmed bookings; every request that got no answer,
//! retried, resolves exactly once. Then clients book, cancel, hold and import until
//! the next cut. `PRENOTA_POWER_CUTS` sets the number of cuts (soaks: 1000).
//!
//! Shown to fail (each tried by editing the code, then put back): without the
//! committer's `fdatasync` (an acknowledgement before its sync), "cut 2: acknowledged
//! booking … lost"; without `Store::open`'s directory syncs, the data dir's `sled/db`
//! entry is lost and start-up refuses ("the store's files are lost"); without the
//! mending of sled's torn files, sled refuses the store ("Read corrupted data") after
//! a cut in a start-up.

mod image;

use crate::common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::child::{build_shim, ChildServer};
use common::*;
use image::{Cut, Disk};
use prenota::proto;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use tonic::transport::Channel;
use tonic::Code;

/// Cuts per run (half clean, half torn); `PRENOTA_POWER_CUTS` sets more for soaks.
const CUTS_DEFAULT: usize = 20;
const CAPACITY_PER_SLOT: u32 = 10_000;
/// Slots of the booked service: a cut books at most ~60 places, so they have room
/// for `CUTS_MAX` cuts.
const SLOTS: usize = 8;
const CUTS_MAX: usize = 1_000;
const BOOKERS: usize = 6;
/// Commits of at most this many writes: an import of a day of 5-minute slots spans
/// several, under the apply journal.
const COMMIT_BATCH_WRITES_MAX: &str = "64";
/// The cut comes after a random number of acknowledgements in this range, plus a
/// random pause: anywhere in a commit's life.
const ACKS_BEFORE_CUT: std::ops::Range<usize> = 5..60;
const CUT_JITTER_MS: u64 = 15;
/// Every so many cuts (the first among them), one lands while the server starts.
const CUT_IN_RECOVERY_EVERY: usize = 4;

fn cuts() -> usize {
    std::env::var("PRENOTA_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CUTS_DEFAULT)
}

/// A server on `data_dir` whose changes to it are journaled into `journal`.
fn start_journaled(data_dir: &Path, library: &Path, journal: &Path) -> ChildServer {
    let env = vec![
        ("LD_PRELOAD".into(), library.display().to_string()),
        ("PRENOTA_POWER_ROOT".into(), data_dir.display().to_string()),
        ("PRENOTA_POWER_LOG".into(), journal.display().to_string()),
        (
            "PRENOTA_LIMITS_COMMIT_BATCH_WRITES_MAX".into(),
            COMMIT_BATCH_WRITES_MAX.into(),
        ),
    ];
    ChildServer::with_env(data_dir, env)
}

#[derive(Clone)]
struct Attempt {
    citizen: String,
    request_id: String,
    slot_id: String,
}

/// An acknowledged hold: it must still be confirmable after a cut.
#[derive(Clone)]
struct HeldPlace {
    hold_id: String,
    slot_id: String,
    citizen: String,
}

/// What the clients were told, across cuts.
#[derive(Default)]
struct Told {
    /// booking_id → citizen, for every acknowledged booking.
    booked: HashMap<String, String>,
    cancelled: HashSet<String>,
    held: Vec<HeldPlace>,
    /// Holds confirmed after a cut (each acknowledged before it, or retried).
    holds_confirmed: usize,
    /// Import service ids acknowledged, and those sent with no answer.
    imported: Vec<String>,
    unanswered_imports: Vec<String>,
    unanswered_books: Vec<Attempt>,
    /// Holds that got no answer: (slot, citizen, request id).
    unanswered_holds: Vec<(String, String, String)>,
    unanswered_cancels: Vec<(String, String, String)>,
}

struct Setup {
    slot_ids: Vec<String>,
    import_day: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let library = build_shim(dir.path(), "power_cut");
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let cuts = cuts();
    let told = Arc::new(Mutex::new(Told::default()));
    let mut setup = None;
    let mut next_citizen = 0usize;
    for cycle in 0..=cuts {
        let mut disk = Disk::scan(&data_dir);
        let journal = dir.path().join("journal");
        let _ = std::fs::remove_file(&journal);
        let cut = match (cycle / CUT_IN_RECOVERY_EVERY + cycle) % 2 {
            0 => Cut::Clean,
            _ => Cut::Torn,
        };
        if cycle < cuts && cycle % CUT_IN_RECOVERY_EVERY == 0 {
            // The cut lands while the server starts (the first time: sled's conf, its
            // files and the key file; later: sled's recovery and snapshot), at a random
            // record of its start-up's journal: it acknowledges nothing then, so any
            // point of it is one it could have reached. The next cycle checks
            // everything as usual.
            let server = start_journaled(&data_dir, &library, &journal);
            server.kill_9();
            let journal = std::fs::read(&journal).unwrap();
            let at = rand::random_range(0..=Disk::records(&journal));
            disk.replay_first(&journal, at);
            report(
                cycle,
                cut,
                &format!("in recovery, record {at}"),
                disk.image(cut),
            );
            continue;
        }
        let server = start_journaled(&data_dir, &library, &journal);
        let channel = connect(&server.url).await;
        let setup = match &setup {
            Some(setup) => {
                verify(cycle, channel.clone(), setup, &told).await;
                setup
            }
            None => setup.insert(set_up(channel.clone(), cuts).await),
        };
        if cycle == cuts {
            server.terminate();
            let told = told.lock().unwrap();
            eprintln!(
                "{cuts} power cuts: {} bookings acknowledged ({} cancelled, {} from holds), {} imports, all there",
                told.booked.len(),
                told.cancelled.len(),
                told.holds_confirmed,
                told.imported.len()
            );
            break;
        }
        let acks = Arc::new(AtomicUsize::new(0));
        let clients = spawn_clients(&server.url, setup, (cycle, next_citizen), &told, &acks).await;
        next_citizen += BOOKERS * 1_000 + 1_000;
        let cut_after = rand::random_range(ACKS_BEFORE_CUT);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while acks.load(Ordering::SeqCst) < cut_after && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..CUT_JITTER_MS))).await;
        server.kill_9();
        for client in clients {
            client.await.unwrap();
        }
        assert!(
            acks.load(Ordering::SeqCst) >= cut_after,
            "cut {cycle}: the clients never got going"
        );
        disk.replay(&std::fs::read(&journal).unwrap());
        report(cycle, cut, "under load", disk.image(cut));
    }
}

fn report(cycle: usize, cut: Cut, when: &str, kept: image::ImageStats) {
    eprintln!(
        "power cut {cycle} ({cut:?}, {when}): {} writes, {} file and {} directory syncs; \
         unsynced: {} bytes, {} changed pages and {} directory changes kept",
        kept.writes,
        kept.file_syncs,
        kept.dir_syncs,
        kept.unsynced_bytes,
        kept.unsynced_pages_kept,
        kept.unsynced_names_kept
    );
}

/// A site with `SLOTS` slots of 10,000 places for the bookers; imports add services.
async fn set_up(channel: Channel, cuts: usize) -> Setup {
    assert!(cuts <= CUTS_MAX, "at most {CUTS_MAX} cuts fit the slots");
    let slot_ids =
        ten_minute_slots(channel, ("power", day_ahead(40)), SLOTS, CAPACITY_PER_SLOT).await;
    Setup {
        slot_ids,
        import_day: day_ahead(41),
    }
}

/// The bookers (book; every third cancels at once), a holder and one import.
async fn spawn_clients(
    url: &str,
    setup: &Setup,
    (cycle, first_citizen): (usize, usize),
    told: &Arc<Mutex<Told>>,
    acks: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut clients = Vec::new();
    for booker in 0..BOOKERS {
        let client = BookingServiceClient::new(connect(url).await);
        let first = first_citizen + booker * 1_000;
        let work = book_and_cancel(client, setup.slot_ids.clone(), first, told, acks);
        clients.push(tokio::spawn(work));
    }
    let client = BookingServiceClient::new(connect(url).await);
    let first = first_citizen + BOOKERS * 1_000;
    clients.push(tokio::spawn(hold(
        client,
        setup.slot_ids.clone(),
        first,
        told,
        acks,
    )));
    let capacity = CapacityServiceClient::new(connect(url).await);
    let service = format!("import-{cycle}");
    let work = import(
        capacity,
        setup.import_day.clone(),
        service,
        Arc::clone(told),
    );
    clients.push(tokio::spawn(work));
    clients
}

fn book_and_cancel(
    mut client: BookingServiceClient<Channel>,
    slot_ids: Vec<String>,
    first_citizen: usize,
    told: &Arc<Mutex<Told>>,
    acks: &Arc<AtomicUsize>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let (told, acks) = (Arc::clone(told), Arc::clone(acks));
    async move {
        for n in 0..1_000 {
            let citizen = first_citizen + n;
            let attempt = Attempt {
                citizen: format!("citizen-{citizen}"),
                request_id: format!("book-{citizen}"),
                slot_id: slot_ids[citizen % slot_ids.len()].clone(),
            };
            let request = book_request(&attempt.slot_id, &attempt.citizen, &attempt.request_id);
            let booking = match client.book(request).await {
                Ok(response) => response.into_inner().booking.unwrap(),
                Err(status) if status.code() == Code::FailedPrecondition => continue,
                Err(_) => {
                    told.lock().unwrap().unanswered_books.push(attempt);
                    return;
                }
            };
            told.lock()
                .unwrap()
                .booked
                .insert(booking.booking_id.clone(), attempt.citizen.clone());
            acks.fetch_add(1, Ordering::SeqCst);
            if n % 3 != 0 {
                continue;
            }
            let request_id = format!("cancel-{}", booking.booking_id);
            let cancel = proto::CancelBookingRequest {
                booking_id: booking.booking_id.clone(),
                citizen_id: attempt.citizen.clone(),
                request_id: request_id.clone(),
            };
            match client.cancel_booking(cancel).await {
                Ok(_) => {
                    told.lock().unwrap().cancelled.insert(booking.booking_id);
                    acks.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) => {
                    let unanswered = (booking.booking_id, attempt.citizen, request_id);
                    told.lock().unwrap().unanswered_cancels.push(unanswered);
                    return;
                }
            }
        }
    }
}

fn hold(
    mut client: BookingServiceClient<Channel>,
    slot_ids: Vec<String>,
    first_citizen: usize,
    told: &Arc<Mutex<Told>>,
    acks: &Arc<AtomicUsize>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let (told, acks) = (Arc::clone(told), Arc::clone(acks));
    async move {
        for n in 0..1_000 {
            let citizen = format!("holder-{}", first_citizen + n);
            let slot_id = slot_ids[n % slot_ids.len()].clone();
            let request = hold_request(&slot_id, &citizen);
            match client.hold_slot(request).await {
                Ok(response) => {
                    let hold_id = response.into_inner().hold.unwrap().hold_id;
                    let held = HeldPlace {
                        hold_id,
                        slot_id,
                        citizen,
                    };
                    told.lock().unwrap().held.push(held);
                    acks.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) => {
                    let unanswered = (slot_id, citizen.clone(), format!("hold-{citizen}"));
                    told.lock().unwrap().unanswered_holds.push(unanswered);
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A hold of the longest time allowed (it is confirmed after the next cut).
fn hold_request(slot_id: &str, citizen: &str) -> proto::HoldSlotRequest {
    proto::HoldSlotRequest {
        slot_id: slot_id.into(),
        citizen_id: citizen.into(),
        request_id: format!("hold-{citizen}"),
        ttl_seconds: 600,
    }
}

/// The rows of one import: every 5-minute slot of one day for `service`.
fn import_rows(day: &str, service: &str) -> proto::ImportCapacityRequest {
    proto::ImportCapacityRequest {
        rows: vec![proto::CapacityRow {
            site: Some(proto::Site {
                site_id: "power".into(),
                name: "power".into(),
                region_id: "r".into(),
                time_zone: "Etc/UTC".into(),
            }),
            service_id: service.into(),
            first_day: day.into(),
            last_day: day.into(),
            weekdays: (1..=7).collect(),
            opens: "06:00".into(),
            closes: "22:00".into(),
            slot_minutes: 5,
            capacity_per_slot: 3,
            line: 2,
        }],
        dry_run: false,
        request_id: format!("import-{service}"),
        rows_total: Some(1),
    }
}

/// Slots one import creates (06:00 to 22:00 every 5 minutes).
const IMPORTED_SLOTS: usize = 16 * 12;
/// Acknowledged imports checked after a cut: the newest, and about as many older ones.
const IMPORTS_CHECKED: usize = 4;

async fn import(
    mut capacity: CapacityServiceClient<Channel>,
    day: String,
    service: String,
    told: Arc<Mutex<Told>>,
) {
    tokio::time::sleep(Duration::from_millis(rand::random_range(0..40))).await;
    let request = import_rows(&day, &service);
    match capacity
        .import_capacity(tokio_stream::iter(vec![request]))
        .await
    {
        Ok(_) => told.lock().unwrap().imported.push(service),
        Err(_) => told.lock().unwrap().unanswered_imports.push(service),
    }
}

/// After a cut's recovery: everything acknowledged is there and the invariants hold;
/// then every unanswered request is retried and must resolve exactly once.
async fn verify(cycle: usize, channel: Channel, setup: &Setup, told: &Arc<Mutex<Told>>) {
    let exported = export_all(channel.clone()).await;
    check_bookings(cycle, &exported, &told.lock().unwrap(), &setup.slot_ids);
    let mut booking = BookingServiceClient::new(channel.clone());
    let imported = told.lock().unwrap().imported.clone();
    // The newest imports, and a sample of the older (all of them each time would make
    // a soak quadratic).
    let older = imported.len().saturating_sub(IMPORTS_CHECKED);
    let sample = (0..older).filter(|_| rand::random_range(0..older) < IMPORTS_CHECKED);
    for service in sample.chain(older..imported.len()).map(|i| &imported[i]) {
        let slots = search_all(&mut booking, "power", service).await;
        assert_eq!(
            slots.len(),
            IMPORTED_SLOTS,
            "cut {cycle}: acknowledged import {service} is not whole"
        );
    }
    confirm_holds(cycle, &mut booking, told).await;
    retry_unanswered(cycle, channel.clone(), &setup.import_day, told).await;
    let exported = export_all(channel).await;
    let slots_now = search_all(&mut booking, "power", "vax").await;
    let told = told.lock().unwrap();
    check_bookings(cycle, &exported, &told, &setup.slot_ids);
    check_counters(cycle, &exported, &told, slots_now);
}

/// The recovered counters agree with the store: each slot's taken places are its
/// confirmed bookings plus its live holds (the retried unanswered ones: every
/// acknowledged one was confirmed).
fn check_counters(cycle: usize, exported: &[proto::Booking], told: &Told, slots: Vec<proto::Slot>) {
    assert_eq!(slots.len(), SLOTS, "cut {cycle}: a slot is missing");
    for slot in slots {
        let confirmed = exported
            .iter()
            .filter(|b| b.slot_id == slot.slot_id && b.state() == proto::BookingState::Confirmed)
            .count();
        let held = told
            .held
            .iter()
            .filter(|h| h.slot_id == slot.slot_id)
            .count();
        assert_eq!(
            (slot.capacity - slot.remaining) as usize,
            confirmed + held,
            "cut {cycle}: {} counts other places taken than its bookings and holds",
            slot.slot_id
        );
    }
}

/// Every acknowledged hold is still there: confirming it books it, as its own id.
async fn confirm_holds(
    cycle: usize,
    booking: &mut BookingServiceClient<Channel>,
    told: &Arc<Mutex<Told>>,
) {
    let held = std::mem::take(&mut told.lock().unwrap().held);
    for place in held {
        let request = proto::BookRequest {
            hold_id: Some(place.hold_id.clone()),
            ..book_request(
                &place.slot_id,
                &place.citizen,
                &format!("confirm-{}", place.hold_id),
            )
        };
        let confirmed = booking
            .book(request)
            .await
            .unwrap_or_else(|status| {
                panic!(
                    "cut {cycle}: acknowledged hold {} lost: {status:?}",
                    place.hold_id
                )
            })
            .into_inner()
            .booking
            .unwrap();
        assert_eq!(confirmed.booking_id, place.hold_id);
        let mut told = told.lock().unwrap();
        told.booked.insert(place.hold_id, place.citizen);
        told.holds_confirmed += 1;
    }
}

async fn retry_unanswered(
    cycle: usize,
    channel: Channel,
    import_day: &str,
    told: &Arc<Mutex<Told>>,
) {
    let (books, holds, cancels, imports) = {
        let mut told = told.lock().unwrap();
        (
            std::mem::take(&mut told.unanswered_books),
            std::mem::take(&mut told.unanswered_holds),
            std::mem::take(&mut told.unanswered_cancels),
            std::mem::take(&mut told.unanswered_imports),
        )
    };
    let mut client = BookingServiceClient::new(channel.clone());
    for attempt in &books {
        let request = book_request(&attempt.slot_id, &attempt.citizen, &attempt.request_id);
        let first = match client.book(request.clone()).await {
            Ok(response) => response.into_inner().booking.unwrap(),
            Err(status) if status.code() == Code::FailedPrecondition => continue,
            Err(status) => panic!("cut {cycle}: retried booking: {status:?}"),
        };
        let again = book_ok(&mut client, request).await;
        assert_eq!(
            first.booking_id, again.booking_id,
            "cut {cycle}: a retry booked twice"
        );
        let listed = client
            .list_citizen_bookings(proto::ListCitizenBookingsRequest {
                citizen_id: attempt.citizen.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .bookings;
        assert_eq!(
            listed.len(),
            1,
            "cut {cycle}: {} holds {listed:?}",
            attempt.citizen
        );
        told.lock()
            .unwrap()
            .booked
            .insert(first.booking_id, attempt.citizen.clone());
    }
    for (slot_id, citizen, request_id) in holds {
        let request = proto::HoldSlotRequest {
            request_id,
            ..hold_request(&slot_id, &citizen)
        };
        let held = |answer: Result<tonic::Response<proto::HoldSlotResponse>, tonic::Status>| {
            let answer =
                answer.unwrap_or_else(|status| panic!("cut {cycle}: retried hold: {status:?}"));
            answer.into_inner().hold.unwrap().hold_id
        };
        let first = held(client.hold_slot(request.clone()).await);
        let again = held(client.hold_slot(request).await);
        assert_eq!(first, again, "cut {cycle}: a retry held twice");
        let place = HeldPlace {
            hold_id: first,
            slot_id,
            citizen,
        };
        told.lock().unwrap().held.push(place);
    }
    for (booking_id, citizen, request_id) in cancels {
        let request = proto::CancelBookingRequest {
            booking_id: booking_id.clone(),
            citizen_id: citizen,
            request_id,
        };
        for _ in 0..2 {
            let cancelled = client
                .cancel_booking(request.clone())
                .await
                .unwrap_or_else(|status| panic!("cut {cycle}: retried cancel: {status:?}"))
                .into_inner()
                .booking
                .unwrap();
            assert_eq!(cancelled.state(), proto::BookingState::Cancelled);
        }
        told.lock().unwrap().cancelled.insert(booking_id);
    }
    let mut capacity = CapacityServiceClient::new(channel);
    for service in imports {
        let request = import_rows(import_day, &service);
        capacity
            .import_capacity(tokio_stream::iter(vec![request]))
            .await
            .unwrap_or_else(|status| panic!("cut {cycle}: retried import {service}: {status:?}"));
        told.lock().unwrap().imported.push(service);
    }
}

fn check_bookings(cycle: usize, exported: &[proto::Booking], told: &Told, slot_ids: &[String]) {
    check_acknowledged(
        &format!("cut {cycle}"),
        exported,
        (&told.booked, &told.cancelled),
        (slot_ids, CAPACITY_PER_SLOT),
    );
}

/// A cut at every point of a start-up, in both modes: the first start of a new data dir
/// (sled's conf and files, the key file, the key check) and a later one (sled's
/// recovery: the segment tail it zeroes, the snapshot it writes). Each image must start
/// and keep the booking acknowledged before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_at_any_point_of_a_start_leaves_a_store_that_starts() {
    let dir = tempfile::tempdir().unwrap();
    let library = build_shim(dir.path(), "power_cut");
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let journal = dir.path().join("journal");

    // The first start.
    let fresh = Disk::scan(&data_dir);
    let server = start_journaled(&data_dir, &library, &journal);
    server.kill_9();
    let first = std::fs::read(&journal).unwrap();
    starts_at_every_record(&fresh, &first, None).await;

    // A booking, a clean stop, then a later start.
    std::fs::remove_dir_all(&data_dir).unwrap();
    let server = ChildServer::start(&data_dir);
    let channel = connect(&server.url).await;
    let slot_id = one_slot_site_on(channel.clone(), "start", "r", 5).await;
    let mut client = BookingServiceClient::new(channel);
    let booked = book_ok(&mut client, book_request(&slot_id, "citizen-1", "r1")).await;
    server.terminate();
    let stopped = Disk::scan(&data_dir);
    std::fs::remove_file(&journal).unwrap();
    let server = start_journaled(&data_dir, &library, &journal);
    server.kill_9();
    let later = std::fs::read(&journal).unwrap();
    starts_at_every_record(&stopped, &later, Some(&booked.booking_id)).await;
}

/// For every prefix of `journal` and both modes: the image of a cut there starts, and
/// holds `booking_id` when given.
async fn starts_at_every_record(base: &Disk, journal: &[u8], booking_id: Option<&str>) {
    let records = Disk::records(journal);
    assert!(records > 3, "the start-up wrote nothing? {records} records");
    for at in 0..=records {
        for cut in [Cut::Clean, Cut::Torn] {
            let mut disk = base.clone();
            disk.replay_first(journal, at);
            disk.image(cut);
            let server = ChildServer::start(disk.root());
            if let Some(booking_id) = booking_id {
                let exported = export_all(connect(&server.url).await).await;
                assert!(
                    exported.iter().any(|b| b.booking_id == booking_id),
                    "cut at record {at} of {records} ({cut:?}): the booking is lost"
                );
            }
            server.kill_9();
        }
    }
}

const CAMPAIGNS: usize = 12;

/// A campaign of `waves` waves, each naming 16 priority groups of `name` characters:
/// 64 waves of 64 are a record of ~72 KB, 8 waves of 30 one of ~4.5 KB.
fn campaign_of(index: usize, (waves, name): (i64, usize)) -> proto::Campaign {
    let long = |prefix: String| format!("{prefix:x<name$}");
    let waves = (0..waves)
        .map(|wave| proto::Wave {
            wave_id: long(format!("w{wave}-")),
            opens_at: at_s(1_700_000_000 + wave),
            priority_groups: (0..16)
                .map(|group| long(format!("g{wave}-{group}-")))
                .collect(),
            ..Default::default()
        })
        .collect();
    proto::Campaign {
        campaign_id: format!("campaign-{index}"),
        service_id: "vax".into(),
        region_id: format!("r{index}"),
        waves,
        ..Default::default()
    }
}

/// sled 0.34 writes a node over 128 KiB (a leaf of large records) to a blob file it
/// never syncs, and its own flusher may make the log point at one before the committer
/// syncs it (`BlobFiles`). Before records were bounded, this test stored 12 campaigns of
/// ~72 KB: without the blob sync, 6 runs of 6 left an image on which sled's recovery
/// panics ("cannot find pid 3 in view_for_key"). Now such a campaign is refused before
/// anything changes (`records::RECORD_BYTES_MAX`), one of ~4.5 KB is accepted, no blob
/// file is ever written, and every acknowledged campaign survives the power cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_too_large_for_sleds_log_are_refused_and_the_rest_survive_a_power_cut() {
    let dir = tempfile::tempdir().unwrap();
    let library = build_shim(dir.path(), "power_cut");
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let journal = dir.path().join("journal");
    let mut disk = Disk::scan(&data_dir);
    let server = start_journaled(&data_dir, &library, &journal);
    let mut client = CapacityServiceClient::new(connect(&server.url).await);
    let upsert = |campaign: proto::Campaign| proto::UpsertCampaignRequest {
        campaign: Some(campaign),
        request_id: String::new(),
    };
    let mut acknowledged = Vec::new();
    for index in 0..CAMPAIGNS {
        let large = campaign_of(index, (64, 64));
        let refused = client.upsert_campaign(upsert(large)).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert_eq!(violated_fields(&refused), ["campaign.waves"]);
        let storable = campaign_of(index, (8, 30));
        client
            .upsert_campaign(upsert(storable.clone()))
            .await
            .expect("a campaign of ~4.5 KB is accepted");
        acknowledged.push(storable.campaign_id);
    }
    let blobs = std::fs::read_dir(data_dir.join("sled/blobs"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0, "sled wrote a blob file");
    server.kill_9();
    disk.replay(&std::fs::read(&journal).unwrap());
    report(
        0,
        Cut::Clean,
        "after large campaigns",
        disk.image(Cut::Clean),
    );

    let server = ChildServer::start(disk.root());
    let mut client = CapacityServiceClient::new(connect(&server.url).await);
    for campaign_id in &acknowledged {
        let stats = client
            .get_campaign_stats(proto::GetCampaignStatsRequest {
                campaign_id: campaign_id.clone(),
            })
            .await;
        assert!(
            stats.is_ok(),
            "acknowledged campaign {campaign_id} lost: {stats:?}"
        );
    }
    server.kill_9();
}
