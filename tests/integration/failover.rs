//! Two `prenota serve` nodes on one PostgreSQL (PRODUCT.md part F): one active, one
//! standing by (health NOT_SERVING, RPCs UNAVAILABLE / NOT_ACTIVE). Killed with SIGKILL
//! under load, the active node's place is taken within 10 s and every acknowledged
//! booking is there; paused with SIGSTOP until the standby took over, it can commit
//! nothing once resumed and exits (so a supervisor starts it again, as a standby). `prenota migrate` moves a sled data dir
//! into PostgreSQL.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::child::{serve_until_exit, ChildOptions, ChildServer};
use common::*;
use prenota::proto::booking_service_client::BookingServiceClient;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const LEASE_TTL_MS: u64 = 4_000;
const FAILOVER_MAX: Duration = Duration::from_secs(10);
const CLIENTS: usize = 8;
const CAPACITY: u32 = 10_000;

/// A `prenota.toml` for nodes sharing the store in `schema` (and one hash key file);
/// `None` without a PostgreSQL to test against.
fn shared_config(dir: &Path) -> Option<PathBuf> {
    shared_config_and_url(dir).map(|(config, _)| config)
}

/// `shared_config`, and the store's URL.
fn shared_config_and_url(dir: &Path) -> Option<(PathBuf, String)> {
    let url = common::postgres::schema_url(&common::postgres::fresh_schema())?;
    let key = dir.join("citizen-hash.key");
    std::fs::write(&key, rand::random::<[u8; 32]>()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, PermissionsExt::from_mode(0o600)).unwrap();
    let config = dir.join("prenota.toml");
    let text = format!(
        "[store]\nbackend = \"postgres\"\npostgres_url = \"{url}\"\nlease_ttl_ms = {LEASE_TTL_MS}\n\
         [citizens]\nhash_key_file = \"{}\"\n",
        key.display()
    );
    std::fs::write(&config, text).unwrap();
    Some((config, url))
}

/// Appends `options` (URL-encoded `-c name=value` settings) to the `options` of the
/// config's PostgreSQL URL, as a role's or database's defaults would set them.
fn add_url_options(config: &Path, options: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let changed = text.replace("\"\nlease_ttl_ms", &format!("{options}\"\nlease_ttl_ms"));
    assert_ne!(changed, text);
    std::fs::write(config, changed).unwrap();
}

/// A node with its own data dir (its local copy) under `dir`; answers at once.
fn node(dir: &Path, config: &Path, name: &str) -> ChildServer {
    let options = ChildOptions {
        args: vec!["--config".into(), config.display().to_string()],
        ..ChildOptions::default()
    };
    ChildServer::start_recovering(&dir.join(name), options)
}

/// Node "a", serving, then node "b", standing by.
async fn active_and_standby(dir: &Path, config: &Path) -> (ChildServer, ChildServer) {
    let mut active = node(dir, config, "a");
    active.wait_serving();
    let standby = node(dir, config, "b");
    wait_standing_by(&standby.url).await;
    (active, standby)
}

/// `active_and_standby`, with the standby's log (at info) in `dir/standby.log`.
async fn active_and_logged_standby(
    dir: &Path,
    config: &Path,
) -> (ChildServer, ChildServer, PathBuf) {
    let mut active = node(dir, config, "a");
    active.wait_serving();
    let log = dir.join("standby.log");
    let options = ChildOptions {
        args: vec!["--config".into(), config.display().to_string()],
        stderr: Some(std::fs::File::create(&log).unwrap()),
        rust_log: Some("info".into()),
        ..ChildOptions::default()
    };
    let standby = ChildServer::start_recovering(&dir.join("b"), options);
    wait_standing_by(&standby.url).await;
    (active, standby, log)
}

/// Waits until `url` answers prenota's RPCs with NOT_ACTIVE (it stands by).
async fn wait_standing_by(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut client = BookingServiceClient::new(connect(url).await);
        let refused = client
            .book(book_request("no-slot", "citizen-standby", "standby-1"))
            .await
            .expect_err("a standby books nothing");
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        if reason(&refused).as_deref() == Some("NOT_ACTIVE") {
            break;
        }
        assert!(Instant::now() < deadline, "never NOT_ACTIVE: {refused:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        health_of(connect(url).await, "").await,
        ServingStatus::NotServing
    );
}

/// Blocks until the node prints that it serves; how long that took.
async fn serving_after(mut server: ChildServer) -> (ChildServer, Duration) {
    let started = Instant::now();
    let server = tokio::task::spawn_blocking(move || {
        server.wait_serving();
        server
    })
    .await
    .unwrap();
    (server, started.elapsed())
}

fn signal(server: &ChildServer, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A newer prenota migrated the schema (its version row, here) while a node of this
/// build stood by: once the active node dies, the standby refuses to take over a store in
/// a format it does not know, and says why, instead of serving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_never_takes_over_a_store_a_newer_prenota_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let Some((config, url)) = shared_config_and_url(dir.path()) else {
        return;
    };
    let (active, standby, log) = active_and_logged_standby(dir.path(), &config).await;
    let newer = "WITH v AS (INSERT INTO prenota_schema VALUES (99) RETURNING 1) \
                 SELECT count(*) FROM v";
    assert_eq!(common::postgres::query_i64(&url, newer), 1);
    active.kill_9();
    let exit = tokio::task::spawn_blocking(move || standby.wait_exit(Duration::from_secs(20)));
    assert!(!exit.await.unwrap().success(), "the standby took over");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("schema is version 99"), "{said}");
}

/// A URL (or a server default) asking for `synchronous_commit = remote_write` (or `off`): prenota's commits
/// still run at `on`, as a trigger on its table sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_wait_for_the_flush_whatever_the_url_asks() {
    let dir = tempfile::tempdir().unwrap();
    let Some((config, url)) = shared_config_and_url(dir.path()) else {
        return;
    };
    add_url_options(&config, "%20-csynchronous_commit%3Dremote_write");
    let mut active = node(dir.path(), &config, "a");
    active.wait_serving();
    let watch = "CREATE TABLE seen (level text);
        CREATE FUNCTION note_level() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO seen VALUES (current_setting('synchronous_commit')); RETURN NULL; END $$;
        CREATE TRIGGER note_level AFTER INSERT OR UPDATE ON prenota_kv
        FOR EACH STATEMENT EXECUTE FUNCTION note_level();";
    common::postgres::execute(&url, watch);
    let slots = ten_minute_slots(connect(&active.url).await, ("sc", day_ahead(40)), 1, 5).await;
    let mut client = BookingServiceClient::new(connect(&active.url).await);
    book_ok(&mut client, book_request(&slots[0], "c1", "r1")).await;
    let seen = |sql: &str| common::postgres::query_i64(&url, sql);
    assert!(seen("SELECT count(*) FROM seen") > 0);
    assert_eq!(seen("SELECT count(*) FROM seen WHERE level <> 'on'"), 0);
}

/// A role or database whose sessions end after 1 s idle, and whose statements time
/// out: the node's own sessions run with neither (a quiet node stays the active one; a
/// COMMIT waiting for a replica is never cancelled into a false success), as a trigger
/// on its table sees them, and it still books after idling past the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_node_keeps_its_sessions_whatever_timeouts_the_role_sets() {
    let dir = tempfile::tempdir().unwrap();
    let Some((config, url)) = shared_config_and_url(dir.path()) else {
        return;
    };
    add_url_options(
        &config,
        "%20-cidle_session_timeout%3D1000%20-cstatement_timeout%3D30000",
    );
    let mut active = node(dir.path(), &config, "a");
    active.wait_serving();
    let watch = "CREATE TABLE seen (statement text, idle text);
        CREATE FUNCTION note_timeouts() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO seen VALUES (current_setting('statement_timeout'),
            current_setting('idle_session_timeout')); RETURN NULL; END $$;
        CREATE TRIGGER note_timeouts AFTER INSERT OR UPDATE ON prenota_kv
        FOR EACH STATEMENT EXECUTE FUNCTION note_timeouts();";
    common::postgres::execute(&url, watch);
    let slots = ten_minute_slots(connect(&active.url).await, ("qt", day_ahead(40)), 1, 5).await;
    let mut client = BookingServiceClient::new(connect(&active.url).await);
    book_ok(&mut client, book_request(&slots[0], "c1", "r1")).await;
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    book_ok(&mut client, book_request(&slots[0], "c2", "r2")).await;
    let seen = |sql: &str| common::postgres::query_i64(&url, sql);
    assert!(seen("SELECT count(*) FROM seen") > 0);
    let other = "SELECT count(*) FROM seen WHERE statement <> '0' OR idle <> '0'";
    assert_eq!(seen(other), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_active_node_fails_over_within_10_s_losing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = shared_config(dir.path()) else {
        return;
    };
    let (active, standby) = active_and_standby(dir.path(), &config).await;
    let slot_ids = ten_minute_slots(
        connect(&active.url).await,
        ("fo", day_ahead(40)),
        4,
        CAPACITY,
    )
    .await;

    let booked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let acks = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for client_index in 0..CLIENTS {
        let mut client = BookingServiceClient::new(connect(&active.url).await);
        let (booked, acks, stop) = (Arc::clone(&booked), Arc::clone(&acks), Arc::clone(&stop));
        let slot_ids = slot_ids.clone();
        clients.push(tokio::spawn(async move {
            for n in 0.. {
                let citizen = format!("citizen-{client_index}-{n}");
                let slot_id = &slot_ids[n % slot_ids.len()];
                let request = book_request(slot_id, &citizen, &format!("request-{citizen}"));
                match client.book(request).await {
                    Ok(response) => {
                        let booking = response.into_inner().booking.unwrap();
                        booked.lock().unwrap().insert(booking.booking_id, citizen);
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                    // The node died under this request: its outcome is unknown.
                    Err(_) => return,
                }
                if stop.load(Ordering::SeqCst) {
                    return;
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acks.load(Ordering::SeqCst) < 300 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        acks.load(Ordering::SeqCst) >= 300,
        "the clients never got going"
    );
    active.kill_9();
    let (standby, failover) = serving_after(standby).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    eprintln!("failover: the standby served {failover:?} after the active node's SIGKILL");
    assert!(failover < FAILOVER_MAX, "failover took {failover:?}");

    let exported = export_all(connect(&standby.url).await).await;
    let booked = booked.lock().unwrap().clone();
    check_acknowledged(
        "after failover",
        &exported,
        (&booked, &HashSet::new()),
        (&slot_ids, CAPACITY),
    );
    // The new active node books.
    let mut client = BookingServiceClient::new(connect(&standby.url).await);
    book_ok(
        &mut client,
        book_request(&slot_ids[0], "citizen-after", "request-after"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_active_node_cannot_commit_once_a_standby_took_over() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = shared_config(dir.path()) else {
        return;
    };
    let (old, standby) = active_and_standby(dir.path(), &config).await;
    let slot_ids = ten_minute_slots(connect(&old.url).await, ("fence", day_ahead(40)), 1, 10).await;
    let mut on_old = BookingServiceClient::new(connect(&old.url).await);
    let before = book_ok(
        &mut on_old,
        book_request(&slot_ids[0], "citizen-before", "request-before"),
    )
    .await;

    signal(&old, "-STOP");
    let (new, _) = serving_after(standby).await;
    let mut on_new = BookingServiceClient::new(connect(&new.url).await);
    book_ok(
        &mut on_new,
        book_request(&slot_ids[0], "citizen-new", "request-new"),
    )
    .await;
    signal(&old, "-CONT");

    // Resumed, it notices at once that no renewal got through and stands down: the
    // request is refused NOT_ACTIVE, or meets a node already draining or gone.
    let refused = on_old
        .book(book_request(&slot_ids[0], "citizen-late", "request-late"))
        .await
        .expect_err("a node that lost the lease commits nothing");
    if refused.code() == Code::Unavailable && reason(&refused).is_some() {
        assert_eq!(
            reason(&refused).as_deref(),
            Some("NOT_ACTIVE"),
            "{refused:?}"
        );
    }
    assert_exits_no_longer_active(old).await;
    let citizens: HashSet<String> = export_all(connect(&new.url).await)
        .await
        .into_iter()
        .map(|booking| {
            assert_ne!(booking.slot_id, "", "{booking:?}");
            booking.booking_id
        })
        .collect();
    assert!(
        citizens.contains(&before.booking_id),
        "the booking before the pause is lost"
    );
    assert_eq!(
        citizens.len(),
        2,
        "only the bookings made while active are stored"
    );
}

/// Resumed after a pause that cost it the lease, a node answered the calls queued
/// meanwhile from its memory before its watchdog ran: SLOT_FULL for a slot the new
/// active node had freed, CITIZEN_ALREADY_BOOKED for a citizen whose booking it had
/// cancelled (an outside test's Jepsen run). Now a reply computed once the lease is no
/// longer fresh is NOT_ACTIVE instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_node_that_lost_the_lease_refuses_nothing_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = shared_config(dir.path()) else {
        return;
    };
    let (old, standby) = active_and_standby(dir.path(), &config).await;
    let slot_ids = ten_minute_slots(connect(&old.url).await, ("stale", day_ahead(40)), 2, 1).await;
    let mut on_old = BookingServiceClient::new(connect(&old.url).await);
    let booked = book_ok(&mut on_old, book_request(&slot_ids[0], "citizen-x", "x-1")).await;

    signal(&old, "-STOP");
    let (new, _) = serving_after(standby).await;
    let cancel = prenota::proto::CancelBookingRequest {
        booking_id: booked.booking_id,
        citizen_id: "citizen-x".into(),
        request_id: "x-cancel".into(),
    };
    let mut on_new = BookingServiceClient::new(connect(&new.url).await);
    on_new
        .cancel_booking(cancel)
        .await
        .expect("cancelled on the new node");
    // Queued on the paused node: its memory says slot 0 is full and citizen-x booked.
    let queued: Vec<_> = (0..20)
        .map(|n| {
            let mut client = on_old.clone();
            let (slot, citizen) = match n % 2 {
                0 => (&slot_ids[0], format!("citizen-{n}")),
                _ => (&slot_ids[1], "citizen-x".to_string()),
            };
            let request = book_request(slot, &citizen, &format!("late-{n}"));
            tokio::spawn(async move { client.book(request).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&old, "-CONT");
    for answer in queued {
        let refused = answer
            .await
            .unwrap()
            .expect_err("a node that lost the lease commits nothing");
        // NOT_ACTIVE, or the node already draining or gone: never a refusal from memory.
        let reason = reason(&refused);
        assert!(
            matches!(
                reason.as_deref(),
                None | Some("NOT_ACTIVE" | "SHUTTING_DOWN")
            ),
            "{refused:?}"
        );
        assert!(
            ![Code::FailedPrecondition, Code::AlreadyExists].contains(&refused.code()),
            "{refused:?}"
        );
    }
    assert_exits_no_longer_active(old).await;
}

/// The holder's PostgreSQL sessions end while it lives (a dropped connection,
/// `pg_terminate_backend`): the standby gets the lock at once, but the holder may answer
/// from memory until three quarters of the lease after its last renewal. The new node
/// serves only after that (an outside test saw both answer at once), and never while
/// the old one still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_taking_over_a_live_holder_serves_only_once_it_stopped_answering() {
    let dir = tempfile::tempdir().unwrap();
    let Some((config, url)) = shared_config_and_url(dir.path()) else {
        return;
    };
    let (old, standby) = active_and_standby(dir.path(), &config).await;
    let slot_ids = ten_minute_slots(connect(&old.url).await, ("live", day_ahead(40)), 1, 10).await;
    let mut on_old = BookingServiceClient::new(connect(&old.url).await);
    let booked = book_ok(&mut on_old, book_request(&slot_ids[0], "citizen-x", "x-1")).await;
    let mut on_new = BookingServiceClient::new(connect(&standby.url).await);

    let renewal_age_ms = common::postgres::query_i64(
        &url,
        "SELECT (extract(epoch FROM clock_timestamp() - renewed_at) * 1000)::bigint \
         FROM prenota_lease_holder",
    );
    let cut_off = Instant::now();
    let ended = common::postgres::query_i64(
        &url,
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = (SELECT holder FROM prenota_lease_holder)",
    );
    assert!(ended > 0, "no session of the holder ended");
    // The old node's own limit: three quarters of the lease after its last renewal.
    let old_limit = cut_off + Duration::from_millis(LEASE_TTL_MS * 3 / 4)
        - Duration::from_millis(u64::try_from(renewal_age_ms).unwrap());
    let read = prenota::proto::GetBookingRequest {
        booking_id: booked.booking_id,
        citizen_id: "citizen-x".into(),
    };
    let (mut old_last_answer, mut new_first_answer) = (None, None);
    while new_first_answer.is_none() {
        assert!(cut_off.elapsed() < FAILOVER_MAX, "the standby never served");
        if on_old.get_booking(read.clone()).await.is_ok() {
            old_last_answer = Some(Instant::now());
        }
        if on_new.get_booking(read.clone()).await.is_ok() {
            new_first_answer = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let new_first_answer = new_first_answer.unwrap();
    assert!(
        old_last_answer.is_none_or(|last| last < new_first_answer),
        "both nodes answered at once"
    );
    assert!(
        new_first_answer >= old_limit,
        "the new node answered {:?} before the old one's limit",
        old_limit - new_first_answer
    );
    assert_exits_no_longer_active(old).await;
    drop(standby);
}

/// Shut down while it waits out a holder it cut off, a node never serves: no SERVING,
/// no background writes (a review found it opened its services once the wait ended
/// early); it closes its store and exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shut_down_while_it_waits_out_the_previous_holder_never_serves() {
    let dir = tempfile::tempdir().unwrap();
    let Some((config, url)) = shared_config_and_url(dir.path()) else {
        return;
    };
    let (old, mut standby, log) = active_and_logged_standby(dir.path(), &config).await;
    common::postgres::query_i64(
        &url,
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = (SELECT holder FROM prenota_lease_holder)",
    );
    let deadline = Instant::now() + FAILOVER_MAX;
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("waiting for the previous lease holder")
    {
        assert!(Instant::now() < deadline, "never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&standby, "-TERM");
    let said_listening = tokio::task::spawn_blocking(move || {
        let status = standby.child_wait();
        (status, standby.said_listening())
    })
    .await
    .unwrap();
    assert!(said_listening.0.success(), "{}", said_listening.0);
    assert!(!said_listening.1, "it served after shutdown began");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("store closed cleanly"), "{said}");
    drop(old);
}

/// A node shut down cleanly says it let the lease go: the standby need not wait out its
/// last renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_taking_over_a_cleanly_stopped_one_does_not_wait() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = shared_config(dir.path()) else {
        return;
    };
    let (active, standby, log) = active_and_logged_standby(dir.path(), &config).await;
    active.terminate();
    let (standby, _) = serving_after(standby).await;
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("took the lease"), "{said}");
    assert!(
        !said.contains("waiting for the previous lease holder"),
        "{said}"
    );
    drop(standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_after_the_epoch_moved_on_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = shared_config(dir.path()) else {
        return;
    };
    // A long lease: the renewal (every quarter of it) does not notice first, the commit's
    // own fence does.
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(&format!("lease_ttl_ms = {LEASE_TTL_MS}")));
    std::fs::write(
        &config,
        text.replace(
            &format!("lease_ttl_ms = {LEASE_TTL_MS}"),
            "lease_ttl_ms = 60000",
        ),
    )
    .unwrap();
    let url = postgres_url_of(&config);
    let mut server = node(dir.path(), &config, "a");
    server.wait_serving();
    let slot_ids =
        ten_minute_slots(connect(&server.url).await, ("epoch", day_ahead(40)), 1, 10).await;
    let mut client = BookingServiceClient::new(connect(&server.url).await);
    book_ok(
        &mut client,
        book_request(&slot_ids[0], "citizen-1", "request-1"),
    )
    .await;
    let records = common::postgres::query_i64(&url, "SELECT count(*) FROM prenota_kv");
    // Another node took over without this one hearing of it.
    common::postgres::query_i64(
        &url,
        "UPDATE prenota_lease SET epoch = epoch + 1 RETURNING epoch",
    );
    let refused = client
        .book(book_request(&slot_ids[0], "citizen-2", "request-2"))
        .await
        .expect_err("fenced");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(
        reason(&refused).as_deref(),
        Some("NOT_ACTIVE"),
        "{refused:?}"
    );
    assert_eq!(
        common::postgres::query_i64(&url, "SELECT count(*) FROM prenota_kv"),
        records,
        "a fenced commit wrote something"
    );
    assert_exits_no_longer_active(server).await;
}

/// A node that can no longer commit drains and exits with a failure status (within
/// 10 s), so that a supervisor starts it again as a standby.
async fn assert_exits_no_longer_active(server: ChildServer) {
    let status = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(!status.success(), "{status}");
}

/// The `postgres_url` a config file names.
fn postgres_url_of(config: &Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("postgres_url"))
        .unwrap();
    line.split('"').nth(1).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_shuts_down_cleanly_while_it_waits() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = shared_config(dir.path()) else {
        return;
    };
    let (active, standby) = active_and_standby(dir.path(), &config).await;
    let started = Instant::now();
    tokio::task::spawn_blocking(move || standby.terminate())
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}",
        started.elapsed()
    );
    // It took nothing on its way out: the active node still commits.
    let slot_ids =
        ten_minute_slots(connect(&active.url).await, ("bye", day_ahead(40)), 1, 10).await;
    let mut client = BookingServiceClient::new(connect(&active.url).await);
    book_ok(
        &mut client,
        book_request(&slot_ids[0], "citizen-1", "request-1"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_a_sled_data_dir_into_postgres_whole() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = shared_config(dir.path()) else {
        return;
    };
    let url = postgres_url_of(&config);
    let sled_dir = dir.path().join("sled-node");
    let server = ChildServer::start(&sled_dir);
    let slot_ids =
        ten_minute_slots(connect(&server.url).await, ("mig", day_ahead(40)), 2, 10).await;
    let mut client = BookingServiceClient::new(connect(&server.url).await);
    for n in 0..12 {
        let request = book_request(&slot_ids[n % 2], &format!("citizen-{n}"), &format!("r-{n}"));
        book_ok(&mut client, request).await;
    }
    let before = export_all(connect(&server.url).await).await;
    tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();

    let migrate = |to: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_prenota"))
            .args(["migrate", "--from-sled", &sled_dir.display().to_string()])
            .env("PRENOTA_POSTGRES_URL", to)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let output = migrate(&url);
    let said = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{said}");
    assert!(said.contains("records copied and committed"), "{said}");
    // Into a store that has records: refused, nothing changed, not even the schema of
    // a store an older prenota made (here: its last version row taken away).
    roll_schema_back(&url);
    let again = migrate(&url);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds"));
    assert_eq!(schema_version(&url), SCHEMA_ROLLED_BACK);

    // The nodes hash citizens with the data dir's key.
    let key = sled_dir.join("citizen-hash.key");
    let text = std::fs::read_to_string(&config).unwrap();
    let shared_key = dir.path().join("citizen-hash.key");
    std::fs::write(
        &config,
        text.replace(
            &shared_key.display().to_string(),
            &key.display().to_string(),
        ),
    )
    .unwrap();
    let mut active = node(dir.path(), &config, "a");
    active.wait_serving();
    let mut after = export_all(connect(&active.url).await).await;
    let mut before = before;
    before.sort_by(|a, b| a.booking_id.cmp(&b.booking_id));
    after.sort_by(|a, b| a.booking_id.cmp(&b.booking_id));
    assert_eq!(after, before);
    let mut client = BookingServiceClient::new(connect(&active.url).await);
    let twice = client
        .book(book_request(&slot_ids[1], "citizen-0", "r-again"))
        .await
        .expect_err("citizen-0 booked before the move");
    assert_eq!(reason(&twice).as_deref(), Some("CITIZEN_ALREADY_BOOKED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_hash_key_is_refused_before_it_stands_by() {
    let dir = tempfile::tempdir().unwrap();
    let Some((config, url)) = shared_config_and_url(dir.path()) else {
        return;
    };
    let mut active = node(dir.path(), &config, "a");
    active.wait_serving();
    // As if an older prenota ran the store: the refused nodes below must not migrate
    // it (its standbys could no longer take over).
    roll_schema_back(&url);
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, [7u8; 32]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&other_key, PermissionsExt::from_mode(0o600)).unwrap();
    let other_config = dir.path().join("other.toml");
    let shared_key = dir.path().join("citizen-hash.key").display().to_string();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &other_config,
        text.replace(&shared_key, &other_key.display().to_string()),
    )
    .unwrap();
    let started = Instant::now();
    let said = refused_start(other_config.with_extension("data"), other_config).await;
    assert!(said.contains("hash_key_file is not the key"), "{said}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The same key under another id scheme: refused too, not at the failover.
    let scheme_config = dir.path().join("scheme.toml");
    let with_scheme = text.replace(
        "[citizens]\n",
        "[citizens]\nid_scheme = \"it-fiscal-code\"\n",
    );
    assert_ne!(with_scheme, text);
    std::fs::write(&scheme_config, with_scheme).unwrap();
    let started = Instant::now();
    let said = refused_start(scheme_config.with_extension("data"), scheme_config).await;
    assert!(said.contains("id_scheme = \"opaque\""), "{said}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(schema_version(&url), SCHEMA_ROLLED_BACK);
    drop(active);
}

/// The schema version `roll_schema_back` leaves: the one before this build's.
const SCHEMA_ROLLED_BACK: i64 = 4;

/// Takes the store's last schema version row away, as if an older prenota had made it.
fn roll_schema_back(url: &str) {
    let gone = "WITH v AS (DELETE FROM prenota_schema WHERE version > 4 RETURNING 1) \
                SELECT count(*) FROM v";
    assert_eq!(common::postgres::query_i64(url, gone), 1);
    assert_eq!(schema_version(url), SCHEMA_ROLLED_BACK);
}

/// The store's schema version.
fn schema_version(url: &str) -> i64 {
    let version = "SELECT coalesce(max(version), 0)::bigint FROM prenota_schema";
    common::postgres::query_i64(url, version)
}

/// A standby checks the store's key and id scheme at each look at the lease, not only
/// when it connects: one the store no longer matches (here its recorded scheme changed
/// under it) stops now, with the reason, instead of failing at the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_the_store_no_longer_matches_stops_while_standing_by() {
    let dir = tempfile::tempdir().unwrap();
    let Some((config, url)) = shared_config_and_url(dir.path()) else {
        return;
    };
    let (active, standby) = active_and_standby(dir.path(), &config).await;
    common::postgres::execute(
        &url,
        "UPDATE prenota_kv SET v = 'it-fiscal-code'::bytea WHERE k = 'Kscheme'::bytea",
    );
    let status = standby.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "{status:?}");
    drop(active);
}

/// A second node started on the active node's data dir refuses (the data dir's lock)
/// instead of standing by for the lease, where taking over would then fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_on_the_same_data_dir_refuses_instead_of_standing_by() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = shared_config(dir.path()) else {
        return;
    };
    let mut active = node(dir.path(), &config, "a");
    active.wait_serving();
    let said = refused_start(dir.path().join("a"), config).await;
    assert!(said.contains("in use by another prenota process"), "{said}");
    let mut client = BookingServiceClient::new(connect(&active.url).await);
    let still = client
        .book(book_request("no-slot", "citizen-1", "still-1"))
        .await;
    assert_ne!(reason(&still.unwrap_err()).as_deref(), Some("NOT_ACTIVE"));
    drop(active);
}

/// A first connection PostgreSQL refuses stops the start with PostgreSQL's own words
/// (they said only "db error").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_first_connection_says_what_postgres_said() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = shared_config(dir.path()) else {
        return;
    };
    let text = std::fs::read_to_string(&config).unwrap();
    let search_path = schema_of(&text);
    std::fs::write(&config, text.replace(&search_path, "no_such_schema_here")).unwrap();
    let said = refused_start(dir.path().join("a"), config).await;
    assert!(said.contains("no schema has been selected"), "{said}");
}

/// The schema name in a config's `search_path` option.
fn schema_of(config: &str) -> String {
    let from = config.find("search_path%3D").expect("a search_path") + "search_path%3D".len();
    config[from..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The stderr of a `prenota serve` on `data_dir` with `config` that must exit refused
/// within 10 s (not stand by for the lease, nor serve).
async fn refused_start(data_dir: std::path::PathBuf, config: std::path::PathBuf) -> String {
    let (started_ok, said) = tokio::task::spawn_blocking(move || {
        serve_until_exit(&data_dir, Some(&config), Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert!(!started_ok, "{said}");
    said
}
