//! The server's generic gRPC surface: health and reflection, so grpcurl and any
//! gRPC client work without the proto files.

use crate::common;

use common::*;
use prost::Message;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving_for_every_service() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in [
        "",
        "prenota.v1.BookingService",
        "prenota.v1.CapacityService",
    ] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    server.stop().await;
}

async fn reflect(server: &TestServer, request: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(server.channel().await);
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        }]))
        .await
        .unwrap()
        .into_inner();
    responses
        .message()
        .await
        .unwrap()
        .and_then(|r| r.message_response)
        .expect("a reflection answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_services_and_serves_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let MessageResponse::ListServicesResponse(list) =
        reflect(&server, MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "prenota.v1.BookingService",
        "prenota.v1.CapacityService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    // grpcurl resolves a service's file and then its imports by name.
    for (request, file) in [
        (
            MessageRequest::FileContainingSymbol("prenota.v1.BookingService".into()),
            "prenota/v1/booking_service.proto",
        ),
        (
            MessageRequest::FileByFilename("google/protobuf/timestamp.proto".into()),
            "google/protobuf/timestamp.proto",
        ),
    ] {
        let MessageResponse::FileDescriptorResponse(files) = reflect(&server, request).await else {
            panic!("expected descriptors for {file}");
        };
        let names: Vec<String> = files
            .file_descriptor_proto
            .iter()
            .map(|bytes| {
                prost_types::FileDescriptorProto::decode(bytes.as_slice())
                    .unwrap()
                    .name()
                    .to_string()
            })
            .collect();
        assert!(
            names.iter().any(|n| n == file),
            "{file} missing from {names:?}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_is_refused_clearly() {
    if common::postgres::sled_only("a_second_server_on_the_same_data_dir_is_refused_clearly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut config = prenota::config::Config::default();
    config.limits.data_dir_lock_wait_ms = 200;
    let second = prenota::server::Server::open(prenota::server::ServeOptions {
        data_dir: dir.path().to_path_buf(),
        config,
        demo: false,
        clock: prenota::service::Clock::system(),
    })
    .await;
    let message = second.err().expect("the data dir is locked").to_string();
    assert!(
        message.contains("in use by another prenota process"),
        "{message}"
    );
    server.stop().await;
}

/// `prenota serve` turns transparent huge pages off for itself (mimalloc's huge pages,
/// purged and faulted in again zeroed, were the Book latency's tail: BENCHMARKS.md).
#[test]
fn the_server_runs_without_transparent_huge_pages() {
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    if !own.lines().any(|line| line == "THP_enabled:\t1") {
        // A kernel without THP (or a parent that turned it off, which children inherit):
        // the server would show 0 whatever it did, so there is nothing to check.
        eprintln!("this test process has no transparent huge pages to start with");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = common::child::ChildServer::start(dir.path());
    assert_eq!(server.thp_enabled(), 0, "THP_enabled in /proc/PID/status");
}

/// `--demo` on every restart: the second seeding finds everything there and writes
/// nothing, not even an audit row, and leaves an authority's rename and capacity
/// changes alone (it used to set the slots back, and refuse to start when a raised slot
/// held more bookings than the demo's capacity).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reseeding_the_demo_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = prenota::config::Config::default();
    let clock = prenota::service::Clock::system();
    let audit_rows = |engine: &std::sync::Arc<prenota::service::Engine>| {
        futures::StreamExt::count(engine.audit_log(None))
    };
    let mut engine = std::sync::Arc::new(
        prenota::service::Engine::open(dir.path(), &config, clock.clone()).unwrap(),
    );
    prenota::demo::seed(&engine).await.unwrap();
    let site_id = prenota::domain::ids::SiteId::parse("s", "rome-termini", 64).unwrap();
    let mut renamed = (*engine.site(&site_id).unwrap()).clone();
    renamed.name = "Renamed by the region".into();
    engine
        .upsert_site(
            renamed,
            &prenota::service::Actor::everywhere("lazio-health"),
        )
        .await
        .unwrap();
    let lowered_and_raised = demo_slots(&engine, &site_id);
    let lazio = prenota::service::Actor::everywhere("lazio-health");
    for (slot, capacity) in lowered_and_raised.iter().zip([1, 9]) {
        engine
            .set_slot_capacity(slot, capacity, None, &lazio)
            .await
            .unwrap();
    }
    let before = audit_rows(&engine).await;
    assert!(
        before >= 6,
        "three demo sites, their schedules, the rename and two capacities"
    );

    prenota::demo::seed(&engine).await.unwrap();
    let after = audit_rows(&engine).await;
    assert_eq!(
        after, before,
        "a reseed that changes nothing writes no audit row"
    );
    assert_eq!(engine.site(&site_id).unwrap().name, "Renamed by the region");
    let after_reseed = engine.search(&demo_query(&site_id)).unwrap().slots;
    let capacities: Vec<u32> = (after_reseed.iter())
        .map(|(_, slot)| slot.counter.snapshot().capacity)
        .collect();
    assert_eq!(capacities, [1, 9]);
    std::sync::Arc::get_mut(&mut engine)
        .expect("no other owner")
        .shutdown()
        .expect("a clean shutdown");
}

/// The first two demo slots of `site_id`'s covid19-dose1.
fn demo_slots(
    engine: &prenota::service::Engine,
    site_id: &prenota::domain::ids::SiteId,
) -> Vec<prenota::domain::ids::SlotKey> {
    let page = engine.search(&demo_query(site_id)).unwrap();
    let keys: Vec<_> = page.slots.iter().map(|(_, slot)| slot.key()).collect();
    assert_eq!(keys.len(), 2);
    keys
}

fn demo_query(site_id: &prenota::domain::ids::SiteId) -> prenota::domain::catalog::SearchQuery {
    prenota::domain::catalog::SearchQuery {
        scope: prenota::domain::catalog::SearchScope::Site(site_id.clone()),
        service_id: prenota::domain::ids::ServiceId::parse("s", "covid19-dose1", 64).unwrap(),
        from_unix_s: 0,
        to_unix_s: i64::from(i32::MAX),
        only_available: false,
        after: None,
        page_size: 2,
        scan_max: 10_000,
    }
}

/// SIGTERM with a health watch and a reflection stream open (no token needed for
/// either): they never end by themselves, so the graceful drain used to wait for them
/// until the connection's age limit. Now the watch sees NOT_SERVING and ends with
/// UNAVAILABLE / SHUTTING_DOWN, the reflection stream ends, and the server exits at once,
/// its store closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_health_and_reflection_streams_end_at_shutdown_without_holding_it_up() {
    let dir = tempfile::tempdir().unwrap();
    let (server, log) = logged_child(dir.path());
    let channel = tonic::transport::Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let mut watch = HealthClient::new(channel.clone())
        .watch(request)
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let (_open, requests) = tokio::sync::mpsc::channel::<ServerReflectionRequest>(1);
    let mut reflection = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();

    exits_within_10_s_on_sigterm(server).await;

    let mut seen = Vec::new();
    let ended = loop {
        match watch.message().await {
            Ok(Some(status)) => seen.push(status.status),
            Ok(None) => panic!("the watch ended without a status after {seen:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(seen, [ServingStatus::NotServing as i32]);
    assert_eq!(ended.code(), tonic::Code::Unavailable);
    assert_eq!(reason(&ended).as_deref(), Some("SHUTTING_DOWN"));
    // Its request stream is ended too, so it may end either way.
    match reflection.message().await {
        Ok(None) => {}
        Err(ended) => assert_eq!(ended.code(), tonic::Code::Unavailable),
        Ok(Some(answer)) => panic!("an answer to no request: {answer:?}"),
    }
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("store closed cleanly"), "{logs}");
}

/// SIGTERM while a watcher has stopped reading (its buffer and its HTTP/2 window full,
/// so its stream cannot even be ended): it is cut off after a short grace, and the
/// server exits at once with its store closed, instead of draining until the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_stopped_reading_does_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (server, log) = logged_child(dir.path());
    let channel = connect(&server.url).await;
    let mut capacity =
        prenota::proto::capacity_service_client::CapacityServiceClient::new(channel.clone());
    upsert_site(&mut capacity, "w", "r", "Etc/UTC").await;
    let days = (day_ahead(5), day_ahead(35));
    let schedule = publish_request("w", "vax", (&days.0, &days.1), ("08:00", "20:00"), 10, 5);
    capacity.publish_schedule(schedule).await.unwrap();
    // A small window, so the server fills it soon.
    let narrow = tonic::transport::Channel::from_shared(server.url.clone())
        .unwrap()
        .initial_stream_window_size(Some(16_384))
        .initial_connection_window_size(Some(16_384))
        .connect()
        .await
        .unwrap();
    let mut booking = prenota::proto::booking_service_client::BookingServiceClient::new(narrow);
    // 2,232 slots, never read: far more than the buffer and the stream's window.
    let unread = booking
        .watch_availability(availability_watch_request("w"))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    exits_within_10_s_on_sigterm(server).await;
    drop(unread);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("store closed cleanly"), "{logs}");
}

/// SIGTERM with an idle HTTP/2 connection whose client never answers (it sent its
/// preface and SETTINGS, then nothing): the graceful drain waits for the GOAWAY's ping
/// to be answered, which never comes. Past `request_timeout_ms` the connection is now
/// closed, so its task lets go of the engine and the store closes cleanly; before, the
/// server waited 10 s more and left the store to the OS (an outside test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_http2_client_does_not_keep_the_store_from_closing() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (server, log) = logged_child_with(
        dir.path(),
        vec![
            ("PRENOTA_LIMITS_REQUEST_TIMEOUT_MS".into(), "1000".into()),
            (
                "PRENOTA_LIMITS_MESSAGE_RECEIVE_TIMEOUT_MS".into(),
                "1000".into(),
            ),
        ],
    );
    let address = server.url.trim_start_matches("http://");
    let mut silent = std::net::TcpStream::connect(address).unwrap();
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .unwrap();
    silent.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap(); // an empty SETTINGS frame
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    exits_within_10_s_on_sigterm(server).await;
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("closing them") && logs.contains("closed=1"),
        "{logs}"
    );
    assert!(logs.contains("store closed cleanly"), "{logs}");
    drop(silent);
}

/// A `prenota serve` child logging at info into the returned file, serving.
fn logged_child(dir: &std::path::Path) -> (common::child::ChildServer, std::path::PathBuf) {
    logged_child_with(dir, Vec::new())
}

/// `logged_child` with `env` (`PRENOTA_LIMITS_*`, ...).
fn logged_child_with(
    dir: &std::path::Path,
    env: Vec<(String, String)>,
) -> (common::child::ChildServer, std::path::PathBuf) {
    let log = dir.join("stderr.log");
    let options = common::child::ChildOptions {
        stderr: Some(std::fs::File::create(&log).unwrap()),
        rust_log: Some("info".into()),
        env,
        ..Default::default()
    };
    let mut server = common::child::ChildServer::start_recovering(&dir.join("data"), options);
    server.wait_serving();
    (server, log)
}

/// On SIGTERM with `shutdown_drain_delay_ms` set, health turns NOT_SERVING at once, yet
/// the node still accepts connections and answers for the delay (a balancer watching
/// health moves its clients off meanwhile), then stops and exits, its store closed. It
/// stopped accepting at once before, so a client the balancer had not yet moved met a
/// closed port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_serves_on_through_the_drain_delay_with_health_not_serving() {
    let dir = tempfile::tempdir().unwrap();
    let delay = (
        "PRENOTA_LIMITS_SHUTDOWN_DRAIN_DELAY_MS".into(),
        "3000".into(),
    );
    let (server, log) = logged_child_with(dir.path(), vec![delay]);
    let url = server.url.clone();
    let started = std::time::Instant::now();
    let exit = sigterm(server, std::time::Duration::from_secs(15));
    while health_of(connect(&url).await, "").await != ServingStatus::NotServing {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "NOT_SERVING at once"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut capacity = prenota::proto::capacity_service_client::CapacityServiceClient::new(
        connect(&url).await, // a new connection, accepted
    );
    let request = prenota::proto::GetSiteStatsRequest {
        site_id: "nowhere".into(),
    };
    let answer = capacity.get_site_stats(request).await.unwrap_err();
    assert_eq!(reason(&answer).as_deref(), Some("SITE_NOT_FOUND"), "served");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "within the delay"
    );
    assert!(exit.await.unwrap().success());
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(3),
        "not before it"
    );
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("still serving for shutdown_drain_delay_ms"),
        "{logs}"
    );
    assert!(logs.contains("store closed cleanly"), "{logs}");
}

/// SIGTERM, then the child must exit successfully within 10 s.
async fn exits_within_10_s_on_sigterm(server: common::child::ChildServer) {
    let exit = sigterm(server, std::time::Duration::from_secs(10));
    assert!(exit.await.unwrap().success());
}

/// Sends SIGTERM; the task waiting for the exit (the test fails past `within`).
fn sigterm(
    server: common::child::ChildServer,
    within: std::time::Duration,
) -> tokio::task::JoinHandle<std::process::ExitStatus> {
    let pid = server.pid().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(term.unwrap().success());
    tokio::task::spawn_blocking(move || server.wait_exit(within))
}
