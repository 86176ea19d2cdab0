//! `prenota backup` and `prenota restore`, with the real binary: a backup taken under
//! load (bookings and two-record reschedules) restores to a store that recovers with
//! every invariant and holds every booking acknowledged before the backup began; damaged
//! files and non-empty data dirs are refused.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use prenota::proto;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::store::backup_key::BackupKey;

const SLOTS: usize = 6;
const CAPACITY: u32 = 1_000;
const CLIENTS: usize = 8;

/// One backup key for every command and server of these tests (a 0600 file).
fn backup_key_file() -> &'static Path {
    static KEY: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = KEY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup.key");
        write_private(&path, &BackupKey::generate_hex());
        (dir, path)
    });
    path
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{text}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A server that can make backups.
fn keyed_config() -> prenota::config::Config {
    let key = BackupKey::read(backup_key_file()).unwrap();
    prenota::config::Config {
        backup_key: Some(Arc::new(key)),
        ..Default::default()
    }
}

fn prenota(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prenota"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env("PRENOTA_BACKUP_KEY_FILE", backup_key_file())
        .env_remove("PRENOTA_CONFIG")
        .output()
        .expect("run prenota")
}

/// The first event of a server's log (with its log id).
async fn first_event(url: &str, log_id: &str) -> proto::WatchEventsResponse {
    let mut stream = CapacityServiceClient::new(connect(url).await)
        .watch_events(proto::WatchEventsRequest {
            log_id: log_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event comes")
        .unwrap()
        .unwrap()
}

/// `prenota restore`, which must succeed.
fn restore_ok(file: &Path, data_dir: &Path) {
    let output = prenota(&[
        "restore",
        "--from",
        path(file),
        "--data-dir",
        path(data_dir),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn site_with_slots(server: &TestServer, site_id: &str) -> Vec<String> {
    let mut capacity = server.capacity().await;
    upsert_site(&mut capacity, site_id, "r", "Etc/UTC").await;
    let day = day_ahead(20);
    capacity
        .publish_schedule(publish_request(
            site_id,
            "vax",
            (&day, &day),
            ("09:00", "12:00"),
            30,
            CAPACITY,
        ))
        .await
        .unwrap();
    let slots: Vec<String> = search_all(&mut server.booking().await, site_id, "vax")
        .await
        .into_iter()
        .map(|s| s.slot_id)
        .collect();
    assert_eq!(slots.len(), SLOTS);
    slots
}

/// What the clients were told: booking id → (citizen, state it was left in).
type Acknowledged = Arc<Mutex<HashMap<String, (String, &'static str)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_every_booking_acknowledged_before_it() {
    if common::postgres::sled_only(
        "a_backup_under_load_restores_every_booking_acknowledged_before_it",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(&dir.path().join("live"), keyed_config()).await;
    let slots = site_with_slots(&server, "backup-site").await;

    let acknowledged: Acknowledged = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client_index in 0..CLIENTS {
        let mut client = server.booking().await;
        let (acknowledged, stop, acks, slots) = (
            Arc::clone(&acknowledged),
            Arc::clone(&stop),
            Arc::clone(&acks),
            slots.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 700 {
                let citizen = format!("citizen-{client_index}-{n}");
                let slot = &slots[n % SLOTS];
                let booked = client
                    .book(book_request(slot, &citizen, &format!("book-{citizen}")))
                    .await
                    .expect("places are plenty")
                    .into_inner()
                    .booking
                    .unwrap();
                acknowledged
                    .lock()
                    .unwrap()
                    .insert(booked.booking_id.clone(), (citizen.clone(), "CONFIRMED"));
                acks.fetch_add(1, Ordering::SeqCst);
                if n % 3 == 0 {
                    // One batch: the old booking CANCELLED, the new one CONFIRMED.
                    let moved = client
                        .reschedule_booking(proto::RescheduleBookingRequest {
                            booking_id: booked.booking_id.clone(),
                            citizen_id: citizen.clone(),
                            new_slot_id: slots[(n + 1) % SLOTS].clone(),
                            request_id: format!("move-{citizen}"),
                        })
                        .await
                        .expect("reschedule")
                        .into_inner()
                        .booking
                        .unwrap();
                    let mut acknowledged = acknowledged.lock().unwrap();
                    acknowledged.insert(booked.booking_id, (citizen.clone(), "CANCELLED"));
                    acknowledged.insert(moved.booking_id, (citizen, "CONFIRMED"));
                }
                n += 1;
            }
        }));
    }
    while acks.load(Ordering::SeqCst) < 300 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before_backup = acknowledged.lock().unwrap().clone();
    let acks_before_backup = acks.load(Ordering::SeqCst);
    let file = dir.path().join("live.backup");
    let (url, file_arg) = (server.url(), path(&file).to_string());
    let output = tokio::task::spawn_blocking(move || {
        prenota(&["backup", "--server", &url, "--to", &file_arg])
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let acks_at_backup_end = acks.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    assert!(
        acks_at_backup_end > acks_before_backup,
        "the load ran during the backup"
    );
    // Never over an existing file, and the CLI says so (it once said only that its
    // writer stopped).
    let (url, file_arg) = (server.url(), path(&file).to_string());
    let again = tokio::task::spawn_blocking(move || {
        prenota(&["backup", "--server", &url, "--to", &file_arg])
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && stderr.contains("exists"),
        "{stderr}"
    );
    let old_log = first_event(&server.url(), "").await.log_id;
    server.stop().await;

    let restored_dir = dir.path().join("restored");
    restore_ok(&file, &restored_dir);
    // Recovery of the restored store refuses overbooking and two confirmed bookings
    // of one citizen: a torn reschedule would stop it here.
    let restored = TestServer::start(&restored_dir).await;
    let exported: HashMap<String, proto::Booking> = export_all(restored.channel().await)
        .await
        .into_iter()
        .map(|b| (b.booking_id.clone(), b))
        .collect();
    for (booking_id, (_, state)) in &before_backup {
        let booking = exported
            .get(booking_id)
            .unwrap_or_else(|| panic!("acknowledged booking {booking_id} is not in the backup"));
        // A booking confirmed before the backup may have been moved during it.
        if *state == "CANCELLED" {
            assert_eq!(booking.state(), proto::BookingState::Cancelled);
        }
    }
    let mut confirmed_citizens = HashSet::new();
    for booking in exported.values() {
        if booking.state() == proto::BookingState::Confirmed {
            let (citizen, _) = &acknowledged.lock().unwrap()[&booking.booking_id];
            assert!(
                confirmed_citizens.insert(citizen.clone()),
                "{citizen} has two confirmed bookings"
            );
        }
    }
    // The citizen hash key came back too: a citizen finds its bookings by its id.
    let (any_id, (citizen, _)) = before_backup.iter().next().unwrap();
    let listed = restored
        .booking()
        .await
        .list_citizen_bookings(proto::ListCitizenBookingsRequest {
            citizen_id: citizen.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .bookings;
    assert!(listed.iter().any(|b| &b.booking_id == any_id));
    // The events came back with their bookings (one per booking made, one per cancel,
    // one per reschedule, which both cancels and makes a booking), in a log with a new id: a gateway holding the old one is told to reconcile, not fed
    // sequences that may repeat.
    let status = CapacityServiceClient::new(restored.channel().await)
        .watch_events(proto::WatchEventsRequest {
            log_id: old_log.clone(),
            ..Default::default()
        })
        .await
        .expect_err("the old log is gone");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&status).as_deref(), Some("EVENT_LOG_REPLACED"));
    let new_log = metadata(&status, "log_id").unwrap();
    assert_ne!(new_log, old_log);
    let cancelled = exported
        .values()
        .filter(|b| b.state() == proto::BookingState::Cancelled)
        .count();
    let rescheduled = exported
        .values()
        .filter(|b| b.cancel_reason == "rescheduled")
        .count();
    let mut events = CapacityServiceClient::new(restored.channel().await)
        .watch_events(proto::WatchEventsRequest {
            log_id: new_log.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for sequence in 1..=(exported.len() + cancelled - rescheduled) as u64 {
        let next = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("every restored event comes")
            .unwrap()
            .unwrap();
        assert_eq!(
            (next.event.unwrap().sequence, next.log_id.as_str()),
            (sequence, new_log.as_str())
        );
    }
    // The restored server takes new bookings.
    book_ok(
        &mut BookingServiceClient::new(restored.channel().await),
        book_request(&slots[0], "after-restore", "after-restore"),
    )
    .await;
    restored.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_damaged_files_and_non_empty_dirs_and_offline_backups_need_a_stopped_server(
) {
    if common::postgres::sled_only("restore_refuses_damaged_files_and_non_empty_dirs_and_offline_backups_need_a_stopped_server") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let server = TestServer::start_with(&live, keyed_config()).await;
    let slots = site_with_slots(&server, "offline-site").await;
    let mut client = server.booking().await;
    for n in 0..20 {
        book_ok(
            &mut client,
            book_request(&slots[n % SLOTS], &format!("c{n}"), &format!("r{n}")),
        )
        .await;
    }
    let file = dir.path().join("offline.backup");
    // The server holds the data dir: an offline backup is refused, pointing at --server.
    let refused = tokio::task::spawn_blocking({
        let (live, file) = (live.clone(), file.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_prenota"))
                .args(["backup", "--data-dir", path(&live), "--to", path(&file)])
                .env("PRENOTA_LIMITS_DATA_DIR_LOCK_WAIT_MS", "200")
                .env("PRENOTA_BACKUP_KEY_FILE", backup_key_file())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--server"));
    assert!(!file.exists());
    let original = export_all(server.channel().await).await;
    server.stop().await;

    let output = prenota(&["backup", "--data-dir", path(&live), "--to", path(&file)]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let again = prenota(&["backup", "--data-dir", path(&live), "--to", path(&file)]);
    assert!(!again.status.success(), "an existing backup is overwritten");
    // A mistyped path, or a PostgreSQL node's data dir: refused, nothing made there.
    let postgres_node = dir.path().join("node");
    std::fs::create_dir_all(postgres_node.join("postgres-copy")).unwrap();
    for (empty, says) in [
        (dir.path().join("typo"), "holds no prenota store"),
        (postgres_node.clone(), "PostgreSQL node's data dir"),
    ] {
        let none = dir.path().join("none.backup");
        let output = prenota(&["backup", "--data-dir", path(&empty), "--to", path(&none)]);
        assert!(!output.status.success(), "a backup of {empty:?}");
        assert!(String::from_utf8_lossy(&output.stderr).contains(says));
        assert!(!none.exists() && !empty.join("sled").exists());
    }

    let bytes = std::fs::read(&file).unwrap();
    let restore_of = |damaged: &[u8], name: &str| {
        let damaged_file = dir.path().join(format!("{name}.backup"));
        std::fs::write(&damaged_file, damaged).unwrap();
        let target = dir.path().join(name);
        let output = prenota(&[
            "restore",
            "--from",
            path(&damaged_file),
            "--data-dir",
            path(&target),
        ]);
        assert!(!output.status.success(), "{name} was restored");
        assert!(!target.exists(), "{name}: a data dir was left");
        assert!(!dir.path().join(format!("{name}.restoring")).exists());
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let message = restore_of(&flipped, "flipped");
    assert!(message.contains("damaged"), "{message}");
    let message = restore_of(&bytes[..bytes.len() - 10], "truncated");
    assert!(
        message.contains("truncated") || message.contains("damaged"),
        "{message}"
    );
    let message = restore_of(b"not a backup at all", "garbage");
    assert!(message.contains("not a prenota backup"), "{message}");

    // Without its backup key, or with another, a backup is not restored.
    let other_key = dir.path().join("other.key");
    write_private(&other_key, &BackupKey::generate_hex());
    for (key, expected) in [
        (None, "--backup-key"),
        (Some(&other_key), "another backup key"),
    ] {
        let target = dir.path().join("wrong-key");
        let mut command = Command::new(env!("CARGO_BIN_EXE_prenota"));
        command.args([
            "restore",
            "--from",
            path(&file),
            "--data-dir",
            path(&target),
        ]);
        match key {
            Some(key) => command.env("PRENOTA_BACKUP_KEY_FILE", key),
            None => command.env_remove("PRENOTA_BACKUP_KEY_FILE"),
        };
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(expected),
            "{stderr}"
        );
        assert!(!target.exists());
    }

    let occupied = dir.path().join("occupied");
    std::fs::create_dir_all(&occupied).unwrap();
    std::fs::write(occupied.join("something"), b"x").unwrap();
    let output = prenota(&[
        "restore",
        "--from",
        path(&file),
        "--data-dir",
        path(&occupied),
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not empty"));

    let restored_dir = dir.path().join("restored");
    restore_ok(&file, &restored_dir);
    let restored = TestServer::start(&restored_dir).await;
    let mut exported = export_all(restored.channel().await).await;
    let mut original = original;
    exported.sort_by(|a, b| a.booking_id.cmp(&b.booking_id));
    original.sort_by(|a, b| a.booking_id.cmp(&b.booking_id));
    assert_eq!(exported, original);
    restored.stop().await;
}

/// A backup is only made with a backup key (it authenticates the file and seals the
/// citizen hash key): a server without one refuses at once, saying how to make one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_backup_key_makes_no_backups() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let status = server
        .capacity()
        .await
        .export_backup(proto::ExportBackupRequest {})
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("BACKUP_KEY_MISSING"));
    assert!(
        status.message().contains("prenota backup-key"),
        "{status:?}"
    );
    server.stop().await;
}

/// A server given its hash key by `[citizens] hash_key_file` keeps none in its data dir:
/// an offline backup reads the key from `--config` (it was refused, "no
/// citizen-hash.key"), a restore checks the configured key against the backup's (a
/// restore with another key passed and the server then refused the store) and writes
/// no key into the data dir, both read `PRENOTA_CONFIG` as `serve` does and the file's
/// `backup_key_file`; a configured key file that is gone (a host rebuilt) is not made
/// anew: the backup's key is restored into the data dir, and the restore says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_hash_key_file_is_backed_up_and_restored_with_its_config() {
    if common::postgres::sled_only(
        "a_server_with_a_hash_key_file_is_backed_up_and_restored_with_its_config",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config_with = |name: &str, key: [u8; 32]| {
        let key_path = dir.path().join(format!("{name}.key"));
        std::fs::write(&key_path, key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = dir.path().join(format!("{name}.toml"));
        let text = format!("[citizens]\nhash_key_file = \"{}\"\n", key_path.display());
        std::fs::write(&config, text).unwrap();
        config
    };
    let (own, other) = (config_with("own", [3; 32]), config_with("other", [4; 32]));
    let live = dir.path().join("live");
    let server = TestServer::start_with(
        &live,
        prenota::config::Config {
            citizen_hash_key: Some([3; 32]),
            ..keyed_config()
        },
    )
    .await;
    let slots = site_with_slots(&server, "keyed-site").await;
    let mut client = server.booking().await;
    for (n, slot) in slots.iter().take(3).enumerate() {
        book_ok(
            &mut client,
            book_request(slot, &format!("k{n}"), &format!("kr{n}")),
        )
        .await;
    }
    let original = export_all(server.channel().await).await;
    server.stop().await;
    assert!(!live.join("citizen-hash.key").exists());

    let file = dir.path().join("keyed.backup");
    let mut text = std::fs::read_to_string(&own).unwrap();
    text.push_str(&format!(
        "[server]\nbackup_key_file = \"{}\"\n",
        backup_key_file().display()
    ));
    std::fs::write(&own, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_prenota"))
        .args(["backup", "--data-dir", path(&live), "--config", path(&own)])
        .args(["--to", path(&file)])
        .env("RUST_LOG", "warn")
        .env_remove("PRENOTA_BACKUP_KEY_FILE")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{said}");
    let target = dir.path().join("other-key");
    let output = prenota(&[
        "restore",
        "--from",
        path(&file),
        "--data-dir",
        path(&target),
        "--config",
        path(&other),
    ]);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && said.contains("hash_key_file"),
        "{said}"
    );
    assert!(!target.exists());

    let restored_dir = dir.path().join("restored");
    let output = Command::new(env!("CARGO_BIN_EXE_prenota"))
        .args([
            "restore",
            "--from",
            path(&file),
            "--data-dir",
            path(&restored_dir),
        ])
        .env("RUST_LOG", "warn")
        .env("PRENOTA_BACKUP_KEY_FILE", backup_key_file())
        .env("PRENOTA_CONFIG", &own)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!restored_dir.join("citizen-hash.key").exists());
    let rebuilt = dir.path().join("rebuilt");
    let gone = dir.path().join("gone.toml");
    std::fs::write(
        &gone,
        "[citizens]\nhash_key_file = \"/nonexistent/hash.key\"\n",
    )
    .unwrap();
    let output = prenota(&[
        "restore",
        "--from",
        path(&file),
        "--data-dir",
        path(&rebuilt),
        "--config",
        path(&gone),
    ]);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && said.contains("does not exist"),
        "{said}"
    );
    assert!(rebuilt.join("citizen-hash.key").exists());
    let restored = TestServer::start_with(
        &restored_dir,
        prenota::config::Config {
            citizen_hash_key: Some([3; 32]),
            ..Default::default()
        },
    )
    .await;
    let mut exported = export_all(restored.channel().await).await;
    let mut original = original;
    exported.sort_by(|a, b| a.booking_id.cmp(&b.booking_id));
    original.sort_by(|a, b| a.booking_id.cmp(&b.booking_id));
    assert_eq!(exported.len(), 3);
    assert_eq!(exported, original);
    restored.stop().await;
}

/// `--config` is read by offline commands only: given on the command line to a backup
/// through the server, it is refused rather than ignored; from `PRENOTA_CONFIG` (set
/// for `serve` in the same environment) it is no obstacle to one.
#[test]
fn a_backup_through_the_server_refuses_a_config_flag_but_not_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("never.backup");
    let server = ["--server", "http://127.0.0.1:1", "--to", path(&to)];
    let flagged = prenota(&[&["backup", "--config", "/dev/null"][..], &server].concat());
    let said = String::from_utf8_lossy(&flagged.stderr);
    assert!(
        !flagged.status.success() && said.contains("only with --data-dir"),
        "{said}"
    );
    let variable = Command::new(env!("CARGO_BIN_EXE_prenota"))
        .arg("backup")
        .args(server)
        .env("PRENOTA_CONFIG", "/dev/null")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&variable.stderr);
    assert!(
        !said.contains("only with --data-dir") && said.contains("127.0.0.1:1"),
        "{said}"
    );
    assert!(!to.exists());
}
