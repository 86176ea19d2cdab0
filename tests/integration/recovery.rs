//! Start-up refuses a store that breaks an invariant, with a message naming it.

use crate::common;
use prenota::config::Config;
use prenota::domain::booking::{Booking, BookingState, RequestRecord};
use prenota::domain::ids::{
    BookingId, CitizenKey, RegionId, RequestFingerprint, RequestKey, ServiceId, SiteId, SlotKey,
};
use prenota::service::{Actor, Clock, CloseCommand, Engine, ServiceError};
use prenota::store::records::{SiteRecord, SlotRecord, Write};
use prenota::store::Store;

fn slot_key() -> SlotKey {
    SlotKey {
        site_id: SiteId::parse("site_id", "broken", 64).unwrap(),
        service_id: ServiceId::parse("service_id", "vax", 64).unwrap(),
        start_unix_s: 4_102_444_800, // 2100-01-01
    }
}

fn booking(id: u128, citizen: u8) -> Write {
    Write::Booking(Booking {
        booking_id: BookingId(id),
        slot: slot_key(),
        end_unix_s: 4_102_444_800 + 600,
        citizen: CitizenKey([citizen; 16]),
        created_at_unix_ms: 0,
        request: RequestRecord {
            key: RequestKey([id as u8; 16]),
            fingerprint: RequestFingerprint([0; 16]),
        },
        state: BookingState::Confirmed,
        channel: prenota::domain::ids::ChannelId::web(),
        codes: booking_codes(id),
        series: None,
    })
}

fn booking_codes(id: u128) -> Option<prenota::domain::booking::BookingCodes> {
    Some(prenota::domain::booking::BookingCodes {
        reference: prenota::domain::booking::Reference::from_bits(id as u64),
        check_in_code: 1234,
    })
}

/// Writes a site with one slot of `capacity`, plus `bookings`, straight into the store
/// (with a key file: a store without its key refuses to open).
async fn store_with(dir: &std::path::Path, capacity: u32, bookings: Vec<Write>) {
    prenota::store::key_file::create(dir).unwrap();
    let mut store = Store::open(dir, &Config::default().limits).unwrap();
    let mut writes = vec![
        Write::Site(SiteRecord {
            site_id: SiteId::parse("site_id", "broken", 64).unwrap(),
            name: "Broken".into(),
            region_id: RegionId::parse("region_id", "r", 64).unwrap(),
            time_zone: "Europe/Rome".into(),
        }),
        Write::Slot(SlotRecord {
            key: slot_key(),
            end_unix_s: 4_102_444_800 + 600,
            capacity,
            closed: false,
        }),
    ];
    writes.extend(bookings);
    store.commit(&writes).await.unwrap();
    store.shutdown().expect("a clean shutdown");
}

/// The line of the server's log at `log` that contains `needle` (the test fails without).
fn logged_line(log: &std::path::Path, needle: &str) -> String {
    let logged = std::fs::read_to_string(log).unwrap();
    let line = logged.lines().find(|line| line.contains(needle));
    line.unwrap_or_else(|| panic!("no {needle:?} in {logged}"))
        .to_string()
}

/// Closes `slot_key()`, whatever its service.
fn closing_the_slot() -> CloseCommand {
    CloseCommand {
        site_id: slot_key().site_id,
        service_id: None,
        from_unix_s: slot_key().start_unix_s,
        to_unix_s: slot_key().start_unix_s + 1,
        reason: "flooded".into(),
        request: None,
    }
}

fn open(dir: &std::path::Path) -> Result<Engine, ServiceError> {
    Engine::open(dir, &Config::default(), Clock::system())
}

#[tokio::test]
async fn a_consistent_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 1, vec![booking(1, 1)]).await;
    assert!(open(dir.path()).is_ok());
}

#[tokio::test]
async fn an_overbooked_slot_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 1, vec![booking(1, 1), booking(2, 2)]).await;
    match open(dir.path()) {
        Err(ServiceError::Recovery(message)) => {
            assert!(message.contains("broken/vax/4102444800"), "{message}");
            assert!(
                message.contains("2 confirmed bookings and live holds but capacity 1"),
                "{message}"
            );
        }
        other => panic!("expected a recovery refusal, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn a_citizen_over_the_limit_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    // Room for both in the slot: only the citizen limit (one per service) is broken.
    store_with(dir.path(), 10, vec![booking(1, 7), booking(2, 7)]).await;
    match open(dir.path()) {
        Err(ServiceError::Recovery(message)) => {
            assert!(
                message.contains("a citizen holds 2 active bookings for service vax"),
                "{message}"
            );
            // It may be a limit lowered since: the refusal says what to do.
            assert!(
                message.contains("max_active_per_citizen was lowered"),
                "{message}"
            );
        }
        other => panic!("expected a recovery refusal, got {:?}", other.err()),
    }
}

/// Two bookings sharing a reference (a damaged or forged store) refuse to start: the
/// desk would check in the wrong one.
#[tokio::test]
async fn a_shared_reference_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let Write::Booking(mut twin) = booking(2, 2) else {
        unreachable!()
    };
    twin.codes = booking_codes(1);
    store_with(dir.path(), 10, vec![booking(1, 1), Write::Booking(twin)]).await;
    match open(dir.path()) {
        Err(ServiceError::Recovery(message)) => {
            assert!(message.contains("the reference"), "{message}")
        }
        other => panic!("expected a recovery refusal, got {:?}", other.err()),
    }
}

/// A store records its layout at each open; one a newer prenota wrote (a higher
/// format) is refused, not misread, and left as it was.
#[tokio::test]
async fn a_store_of_a_newer_format_is_refused() {
    use prenota::store::records::{STORE_FORMAT, STORE_FORMAT_KEY};
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 10, vec![booking(1, 1)]).await;
    let newer = (STORE_FORMAT + 1).to_be_bytes();
    {
        let db = common::open_stopped_sled(&dir.path().join("sled"));
        let stored = db.get(STORE_FORMAT_KEY).unwrap().expect("recorded at open");
        assert_eq!(stored.as_ref(), STORE_FORMAT.to_be_bytes());
        db.insert(STORE_FORMAT_KEY, &newer[..]).unwrap();
        db.flush().unwrap();
    }
    match open(dir.path()) {
        Err(error) => assert!(
            error.to_string().contains("written by a newer prenota"),
            "{error}"
        ),
        Ok(_) => panic!("a store of a newer format opened"),
    }
    let db = common::open_stopped_sled(&dir.path().join("sled"));
    assert_eq!(db.get(STORE_FORMAT_KEY).unwrap().unwrap().as_ref(), newer);
}

/// The reference and roster indexes are rebuilt from the bookings at every start, and
/// the `N` / `W` index keys of a store written before they moved to memory are removed
/// (the index they held is rebuilt, not read).
#[tokio::test]
async fn the_booking_index_is_rebuilt_and_old_index_keys_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 10, vec![booking(1, 1), booking(2, 2)]).await;
    let old_keys: [&[u8]; 3] = [b"N\x00\x00\x00\x00\x01", b"W-stale-roster", b"N-dangling"];
    {
        let db = common::open_stopped_sled(&dir.path().join("sled"));
        for key in old_keys {
            db.insert(key, &b"old pointer"[..]).unwrap();
        }
        db.flush().unwrap();
    }
    let engine = open(dir.path()).unwrap();
    let desk = prenota::service::desk::Desk::Everywhere;
    let page = engine
        .slot_roster(&desk, &slot_key(), (None, 10))
        .await
        .unwrap();
    let ids: Vec<u128> = page.bookings.iter().map(|b| b.booking_id.0).collect();
    assert_eq!(
        ids,
        [1, 2],
        "both bookings in the roster, in reference order"
    );
    drop(engine);
    let db = common::open_stopped_sled(&dir.path().join("sled"));
    for key in old_keys {
        assert!(db.get(key).unwrap().is_none(), "{key:?} removed");
    }
}

/// A closure reads its slots' bookings from their rosters, but a booking stored before
/// references existed is in no roster: while one may be stored, the closure scans every
/// booking, so it still cancels it.
#[tokio::test]
async fn a_closure_cancels_a_booking_stored_before_references() {
    let dir = tempfile::tempdir().unwrap();
    let Write::Booking(old) = booking(2, 2) else {
        unreachable!()
    };
    let old = Booking { codes: None, ..old };
    store_with(dir.path(), 10, vec![booking(1, 1), Write::Booking(old)]).await;
    let engine = std::sync::Arc::new(open(dir.path()).unwrap());
    let close = closing_the_slot();
    let outcome = engine
        .close_slots(close, &Actor::everywhere("test"))
        .await
        .unwrap();
    assert_eq!(outcome.cancelled_bookings, 2, "the old booking too");
}

/// Audit entries are stamped after the newest stored one, also after a restart on a
/// clock that is behind (a failover onto another node's clock): the log, oldest first,
/// stays in the order of the changes. The last stamp was not rebuilt before (a review).
#[tokio::test]
async fn audit_entries_after_a_restart_on_a_clock_behind_come_last() {
    let dir = tempfile::tempdir().unwrap();
    let stored_at = 1_800_000_000_000;
    let stored = prenota::store::records::AuditEntry {
        at_unix_ms: stored_at,
        actor: "before".into(),
        action: "UpsertSite".into(),
        detail: "stored before the restart".into(),
    };
    store_with(dir.path(), 10, vec![Write::Audit(stored)]).await;
    let behind = Clock::manual(stored_at - 3_600_000);
    let engine = Engine::open(dir.path(), &Config::default(), behind).unwrap();
    let engine = std::sync::Arc::new(engine);
    let close = closing_the_slot();
    engine
        .close_slots(close, &Actor::everywhere("after"))
        .await
        .unwrap();
    let mut log = engine.audit_log(None);
    let mut actors = Vec::new();
    while let Some(entry) = futures::StreamExt::next(&mut log).await {
        let entry = entry.unwrap();
        actors.push((entry.actor, entry.at_unix_ms));
    }
    assert_eq!(
        actors,
        [
            ("before".to_string(), stored_at),
            ("after".into(), stored_at + 1)
        ]
    );
}

/// Retention reads the rosters of slots that started before its cut-off, but a booking
/// stored before references existed is in no roster: while one may be stored, the pass
/// reads every booking, so it still deletes it with its slot.
#[tokio::test]
async fn retention_deletes_a_booking_stored_before_references() {
    let dir = tempfile::tempdir().unwrap();
    let Write::Booking(old) = booking(2, 2) else {
        unreachable!()
    };
    let old = Booking { codes: None, ..old };
    store_with(dir.path(), 10, vec![booking(1, 1), Write::Booking(old)]).await;
    // 401 days after the slot ended: beyond `records_retained_days` (400).
    let now_s = slot_key().start_unix_s + 600 + 401 * 86_400;
    let clock = Clock::manual(now_s * 1_000);
    let engine = Engine::open(dir.path(), &Config::default(), clock).unwrap();
    let retained = engine.retain().await.unwrap();
    assert_eq!(
        (retained.bookings, retained.bookings_read, retained.slots),
        (2, 2, 1),
        "the old booking too: {retained:?}"
    );
    drop(engine);
    open(dir.path()).expect("the store still recovers");
}

/// Retention reads only the bookings of slots that started before its cut-off, which
/// holds because a slot ends after it starts: a stored slot or booking that does not is
/// refused at start-up.
#[tokio::test]
async fn a_stored_slot_or_booking_that_ends_before_it_starts_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let Write::Booking(booking) = booking(1, 1) else {
        unreachable!()
    };
    let ends_first = Booking {
        end_unix_s: slot_key().start_unix_s,
        ..booking
    };
    store_with(dir.path(), 10, vec![Write::Booking(ends_first)]).await;
    match open(dir.path()) {
        Err(ServiceError::Recovery(message)) => {
            assert!(message.contains("ends at or before its slot"), "{message}")
        }
        other => panic!("expected a recovery refusal, got {:?}", other.err()),
    }

    let dir = tempfile::tempdir().unwrap();
    prenota::store::key_file::create(dir.path()).unwrap();
    let mut store = Store::open(dir.path(), &Config::default().limits).unwrap();
    let site = SiteRecord {
        site_id: slot_key().site_id,
        name: "Broken".into(),
        region_id: RegionId::parse("region_id", "r", 64).unwrap(),
        time_zone: "Europe/Rome".into(),
    };
    let backwards = SlotRecord {
        key: slot_key(),
        end_unix_s: slot_key().start_unix_s - 600,
        capacity: 10,
        closed: false,
    };
    store
        .commit(&[Write::Site(site), Write::Slot(backwards)])
        .await
        .unwrap();
    store.shutdown().expect("a clean shutdown");
    drop(store);
    match open(dir.path()) {
        Err(ServiceError::Recovery(message)) => {
            assert!(message.contains("ends at or before it starts"), "{message}")
        }
        other => panic!("expected a recovery refusal, got {:?}", other.err()),
    }
}

/// A roster entry whose booking is not applied yet (entered with its write, before the
/// committer applied it) is skipped and the page filled from the entries after it, so
/// the desk's paging never ends early.
#[tokio::test]
async fn a_roster_page_skips_a_booking_not_yet_written_and_stays_full() {
    let dir = tempfile::tempdir().unwrap();
    prenota::store::key_file::create(dir.path()).unwrap();
    let store = Store::open(dir.path(), &Config::default().limits).unwrap();
    let bookings: Vec<Write> = (1..=4).map(|id| booking(id, id as u8)).collect();
    store.commit(&bookings).await.unwrap();
    let Write::Booking(pending) = booking(2, 9) else {
        unreachable!()
    };
    let pending = Booking {
        booking_id: BookingId(99), // reference 2's twin, never written
        codes: booking_codes(0),
        ..pending
    };
    // Reference 0: first in the roster.
    store.booking_index().insert(&pending).unwrap();
    let page = store.slot_roster(&slot_key(), None, 2).unwrap();
    let ids: Vec<u128> = page.iter().map(|b| b.booking_id.0).collect();
    assert_eq!(ids, [1, 2], "a full page despite the missing booking");
    let all = store.slot_roster(&slot_key(), None, 10).unwrap();
    assert_eq!(all.len(), 4);
}

/// A record a request could never have written (a forged backup, another build, a
/// damaged disk) is refused at start-up, not served: a site name with a text-direction
/// override, shown to citizens, names the site in the refusal.
#[tokio::test]
async fn a_stored_site_a_request_could_not_write_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    prenota::store::key_file::create(dir.path()).unwrap();
    let mut store = Store::open(dir.path(), &Config::default().limits).unwrap();
    let forged = Write::Site(SiteRecord {
        site_id: SiteId::parse("site_id", "forged", 64).unwrap(),
        name: "Pay here \u{202E}lmth.exe".into(),
        region_id: RegionId::parse("region_id", "r", 64).unwrap(),
        time_zone: "Europe/Rome".into(),
    });
    store.commit(&[forged]).await.unwrap();
    store.shutdown().expect("a clean shutdown");
    drop(store);
    match open(dir.path()) {
        Err(ServiceError::Recovery(message)) => {
            assert!(message.contains("stored site \"forged\""), "{message}");
            assert!(message.contains("text-direction"), "{message}");
        }
        other => panic!("expected a recovery refusal, got {:?}", other.err()),
    }
}

/// A cancelled booking's reason is shown to its citizen: one a closure could not have
/// written (a text-direction override) refuses start-up too.
#[tokio::test]
async fn a_stored_cancel_reason_a_closure_could_not_write_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let Write::Booking(mut forged) = booking(1, 1) else {
        unreachable!()
    };
    forged.state = BookingState::Cancelled {
        at_unix_ms: 0,
        reason: "closed \u{202E}".into(),
        request: None,
    };
    store_with(dir.path(), 1, vec![Write::Booking(forged)]).await;
    match open(dir.path()) {
        Err(ServiceError::Recovery(message)) => {
            assert!(message.contains("cancel_reason"), "{message}");
        }
        other => panic!("expected a recovery refusal, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn recovery_keeps_a_size_hint_and_survives_a_damaged_one() {
    use prenota::store::size_hint::{IndexSizes, FILE_NAME};
    let dir = tempfile::tempdir().unwrap();
    store_with(
        dir.path(),
        3,
        vec![booking(1, 1), booking(2, 2), booking(3, 3)],
    )
    .await;
    let mut engine = open(dir.path()).unwrap();
    let kept = IndexSizes::read(dir.path(), u64::MAX);
    assert_eq!((kept.bookings, kept.citizens), (3, 3), "{kept:?}");
    engine.shutdown().expect("a clean shutdown");
    drop(engine);
    // Sized by a damaged hint, recovery would ask for more memory than exists.
    let hint = dir.path().join(FILE_NAME);
    let huge = "bookings 18446744073709551615\ncitizens 1\nrequests 1\n";
    std::fs::write(&hint, huge).unwrap();
    let engine = open(dir.path()).unwrap();
    let kept = IndexSizes::read(dir.path(), u64::MAX);
    assert_eq!((kept.bookings, kept.citizens), (3, 3), "{kept:?}");
    drop(engine);
}

/// A confirmed booking in a closed slot (a closure raced a cancel in an older build)
/// starts, is counted and named in the log with what to do, and that remedy works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_booking_in_a_closed_slot_is_named_and_can_be_cancelled() {
    use common::child::{http_get, ChildOptions, ChildServer};
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2, vec![booking(1, 1)]).await;
    let mut store = Store::open(dir.path(), &Config::default().limits).unwrap();
    let closed = Write::Slot(SlotRecord {
        key: slot_key(),
        end_unix_s: 4_102_444_800 + 600,
        capacity: 2,
        closed: true,
    });
    store.commit(&[closed]).await.unwrap();
    store.shutdown().expect("a clean shutdown");
    drop(store);

    let log = dir.path().join("stderr.log");
    let options = ChildOptions {
        stderr: Some(std::fs::File::create(&log).unwrap()),
        rust_log: Some("warn".into()),
        ..ChildOptions::default()
    };
    let mut server = ChildServer::start_recovering(dir.path(), options);
    server.wait_serving();
    let metrics = http_get(&server.metrics_url);
    let line = "prenota_recovered_records{kind=\"confirmed_in_closed_slots\"} 1";
    assert!(metrics.lines().any(|l| l == line), "{metrics}");
    server.terminate();
    let named = logged_line(&log, "confirmed bookings in closed slots");
    assert!(
        named.contains("broken/vax/4102444800 (1 confirmed; reopen at capacity 1)"),
        "{named}"
    );
    assert!(named.contains("SetSlotCapacity"), "{named}");

    // The remedy the line gives: reopen at the capacity named (no place free
    // meanwhile), close again.
    let engine = std::sync::Arc::new(open(dir.path()).unwrap());
    let admin = Actor::everywhere("test");
    let (_, reopened) = engine
        .set_slot_capacity(&slot_key(), 1, None, &admin)
        .await
        .unwrap();
    assert_eq!(reopened.counter.snapshot().remaining(), 0);
    let close = CloseCommand {
        site_id: slot_key().site_id,
        service_id: Some(slot_key().service_id),
        from_unix_s: slot_key().start_unix_s,
        to_unix_s: slot_key().start_unix_s + 1,
        reason: "flooded".into(),
        request: None,
    };
    let outcome = engine.close_slots(close, &admin).await.unwrap();
    assert_eq!(outcome.cancelled_bookings, 1);
}

/// sled opens a damaged log as the store it held before the damage, without a word
/// (an outside test: 91 of 500 bookings left, served). The commit count kept beside the
/// store (`store::watermark`) refuses such a store, cut short or emptied, by name.
#[tokio::test]
async fn a_store_cut_short_or_emptied_after_a_clean_stop_refuses_to_start() {
    // Emptied, the log no longer holds what sled's snapshot points at: sled refuses it.
    for (kept, refusal) in [(0.5, "its files are damaged"), (0.0, "Read corrupted data")] {
        let dir = tempfile::tempdir().unwrap();
        store_with(dir.path(), 1_000, vec![]).await;
        let mut store = Store::open(dir.path(), &Config::default().limits).unwrap();
        for n in 1..=200u8 {
            let one = booking(u128::from(n) + 1_000, n);
            store.commit(&[one]).await.unwrap();
        }
        store.shutdown().expect("a clean shutdown");
        drop(store);
        // sled writes its log from the start of a segment it made at full length: keep
        // part of what was written (its snapshot, made when it was opened, comes first).
        let db = dir.path().join("sled").join("db");
        let bytes = std::fs::read(&db).unwrap();
        let written = bytes.iter().rposition(|byte| *byte != 0).unwrap() + 1;
        std::fs::write(&db, &bytes[..(written as f64 * kept) as usize]).unwrap();
        let refused = open(dir.path()).err().expect("a damaged store opened");
        let said = refused.to_string();
        assert!(said.contains("stored data is corrupt"), "{said}");
        assert!(said.contains(refusal), "{said}");
    }
}

/// `id_length_max` lowered below a stored site id: the start goes on (lowering a
/// limit never makes a store refuse), and the log names the id no request can name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_id_over_a_lowered_id_length_max_is_named_in_the_log() {
    use common::child::{ChildOptions, ChildServer};
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2, vec![]).await;
    let log = dir.path().join("stderr.log");
    let options = ChildOptions {
        env: vec![("PRENOTA_LIMITS_ID_LENGTH_MAX".into(), "4".into())],
        stderr: Some(std::fs::File::create(&log).unwrap()),
        rust_log: Some("warn".into()),
        ..ChildOptions::default()
    };
    let mut server = ChildServer::start_recovering(dir.path(), options);
    server.wait_serving();
    server.terminate();
    let named = logged_line(&log, "longer than limits.id_length_max");
    assert!(named.contains("broken"), "{named}");
}

/// A store written under `id_scheme = "opaque"` opened under `"it-fiscal-code"`: its
/// citizens would hash differently (an outside test: one citizen, two active bookings),
/// so the start is refused, naming both schemes; opened as written, it starts.
#[tokio::test]
async fn a_store_opened_under_another_citizen_id_scheme_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2, vec![booking(1, 1)]).await;
    drop(open(dir.path()).expect("the store's first start records its scheme"));
    let fiscal = Config {
        citizen_id_scheme: prenota::domain::citizen_id::IdScheme::ItFiscalCode,
        ..Config::default()
    };
    let refused = Engine::open(dir.path(), &fiscal, Clock::system()).err();
    let said = refused.expect("opened under another scheme").to_string();
    assert!(said.contains("id_scheme = \"opaque\""), "{said}");
    assert!(said.contains("\"it-fiscal-code\""), "{said}");
    assert!(open(dir.path()).is_ok(), "opened as written");
}

/// An offline command (backup --data-dir, restore, migrate) run without the server's
/// configuration on a store that records no id scheme (older than the record) records
/// none: the server's own scheme (here `it-fiscal-code`) is recorded by its first start,
/// not refused as another.
#[tokio::test]
async fn an_offline_command_records_no_id_scheme() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2, vec![booking(1, 1)]).await;
    let offline = Config {
        offline: true,
        ..Config::default()
    };
    drop(Engine::open(dir.path(), &offline, Clock::system()).expect("opened offline"));
    let fiscal = Config {
        citizen_id_scheme: prenota::domain::citizen_id::IdScheme::ItFiscalCode,
        ..Config::default()
    };
    drop(Engine::open(dir.path(), &fiscal, Clock::system()).expect("the server's scheme"));
    let refused = Engine::open(dir.path(), &offline, Clock::system()).err();
    let said = refused.expect("the recorded scheme is kept").to_string();
    assert!(said.contains("id_scheme = \"it-fiscal-code\""), "{said}");
    assert!(said.contains("(--config)"), "{said}");
}

/// Likewise the key check (a review): an offline command given a wrong key
/// (`hash_key_file` of another configuration) on a store written before check values
/// records nothing, and the server then starts with the store's own key file.
#[tokio::test]
async fn an_offline_command_records_no_key_check() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 2, vec![booking(1, 1)]).await;
    let offline = Config {
        offline: true,
        citizen_hash_key: Some([7; 32]),
        ..Config::default()
    };
    drop(Engine::open(dir.path(), &offline, Clock::system()).expect("opened offline"));
    let server = Engine::open(dir.path(), &Config::default(), Clock::system());
    assert!(server.is_ok(), "refused: {:?}", server.err());
}
