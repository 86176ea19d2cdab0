//! What operators see, on the real binary: Prometheus metrics with the right values,
//! health NOT_SERVING while the store recovers, and JSON logs that never carry a token
//! or a citizen id.

use crate::common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::child::{
    fdatasync_gate, http_get, start_with_shim_and, wait_for_held_fdatasync, ChildOptions,
    ChildServer,
};
use common::*;
use prenota::proto;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').expect("closing brace");
                let labels = inner
                    .split("\",")
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (key, value) = pair.split_once("=\"").expect("key=\"value\"");
                        (key.to_string(), value.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        samples.push(Sample {
            name,
            labels,
            value: value.parse().expect("a number"),
        });
    }
    samples
}

/// The value of the one sample named `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert!(
        matching.len() <= 1,
        "{name} {labels:?} matches {matching:?}"
    );
    matching.first().map(|s| s.value)
}

const BOOKING: &str = "prenota.v1.BookingService";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_outcomes_commits_and_sites() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start_recovering(
        dir.path(),
        ChildOptions {
            env: vec![(
                "PRENOTA_LIMITS_METRICS_REFRESH_INTERVAL_MS".into(),
                "100".into(),
            )],
            ..ChildOptions::default()
        },
    );
    server.wait_serving();
    let channel = connect(&server.url).await;
    let slot_id = one_slot_site_on(channel.clone(), "metrics-site", "metrics-region", 3).await;
    let mut booking = BookingServiceClient::new(channel.clone());
    for n in 0..2 {
        book_ok(
            &mut booking,
            book_request(&slot_id, &format!("citizen-{n}"), &format!("book-{n}")),
        )
        .await;
    }
    booking
        .hold_slot(proto::HoldSlotRequest {
            slot_id: slot_id.clone(),
            citizen_id: "citizen-hold".into(),
            request_id: "hold-1".into(),
            ttl_seconds: 600,
        })
        .await
        .expect("a hold");
    let full = booking
        .book(book_request(&slot_id, "citizen-late", "book-late"))
        .await
        .unwrap_err();
    assert_eq!(reason(&full).as_deref(), Some("SLOT_FULL"));
    let bad = booking
        .book(book_request(&slot_id, "", "book-bad"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // Gauges are refreshed every 100 ms here (the process ones too); counters are
    // current at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let text = http_get(&server.metrics_url);
        assert!(!text.contains("citizen-"), "a citizen id in the metrics");
        let samples = parse(&text);
        let site = [("site_id", "metrics-site"), ("region_id", "metrics-region")];
        if value(&samples, "prenota_site_booked", &site) == Some(2.0)
            && value(&samples, "prenota_site_held", &site) == Some(1.0)
        {
            assert_eq!(value(&samples, "prenota_site_capacity", &site), Some(3.0));
            assert_eq!(value(&samples, "prenota_site_slots", &site), Some(1.0));
            let process = |name| value(&samples, name, &[]).unwrap_or(0.0);
            // Whole seconds (a counter): present, not necessarily above 0 yet.
            assert!(value(&samples, "process_cpu_seconds_total", &[]).is_some());
            assert!(process("process_resident_memory_bytes") > 1e6);
            assert!(process("process_open_fds") >= 3.0);
            assert!(process("process_threads") >= 2.0);
            assert_eq!(
                value(&samples, "prenota_site_slots_closed", &site),
                Some(0.0)
            );
            break samples;
        }
        assert!(Instant::now() < deadline, "site gauges never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let handled = |method: &str, code: &str| {
        value(
            &samples,
            "grpc_server_handled_total",
            &[
                ("grpc_service", BOOKING),
                ("grpc_method", method),
                ("grpc_code", code),
            ],
        )
    };
    assert_eq!(handled("Book", "OK"), Some(2.0));
    assert_eq!(handled("Book", "FAILED_PRECONDITION"), Some(1.0));
    assert_eq!(handled("Book", "INVALID_ARGUMENT"), Some(1.0));
    assert_eq!(handled("HoldSlot", "OK"), Some(1.0));
    assert_eq!(handled("Book", "UNAVAILABLE"), None);
    assert_eq!(
        value(
            &samples,
            "grpc_server_handling_seconds_count",
            &[("grpc_service", BOOKING), ("grpc_method", "Book")]
        ),
        Some(4.0)
    );
    let booked = |outcome: &str| {
        value(
            &samples,
            "prenota_bookings_total",
            &[("command", "book"), ("outcome", outcome)],
        )
    };
    assert_eq!(booked("OK"), Some(2.0));
    assert_eq!(booked("SLOT_FULL"), Some(1.0));
    assert_eq!(
        value(&samples, "prenota_holds_total", &[("outcome", "OK")]),
        Some(1.0)
    );
    assert_eq!(value(&samples, "prenota_holds_live", &[]), Some(1.0));
    // Site, schedule, 2 bookings and a hold: at least 5 durable writes, each in a commit.
    let writes = value(&samples, "prenota_commit_batch_writes_sum", &[]).unwrap();
    assert!(writes >= 5.0, "{writes}");
    let fsyncs = value(&samples, "prenota_commit_fsync_seconds_count", &[]).unwrap();
    assert!(fsyncs >= 1.0, "{fsyncs}");
    assert_eq!(value(&samples, "prenota_serving", &[]), Some(1.0));
    assert_eq!(value(&samples, "prenota_store_healthy", &[]), Some(1.0));
    assert_eq!(value(&samples, "prenota_sites", &[]), Some(1.0));
    assert!(value(&samples, "prenota_store_disk_bytes", &[]).unwrap() > 0.0);
    assert!(value(&samples, "prenota_recovery_seconds", &[]).is_some());
    server.terminate();
}

/// A retry (same `request_id`), or a copy racing the first, is answered with the first
/// outcome: counted as `REPLAYED`, not as one more booking or hold (the booking metrics
/// counted each again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_request_is_not_counted_as_a_new_booking() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(dir.path());
    let channel = connect(&server.url).await;
    let slot_id = one_slot_site_on(channel.clone(), "replay-site", "r", 5).await;
    let booking = BookingServiceClient::new(channel.clone());
    let copies = (0..8).map(|_| {
        let mut booking = booking.clone();
        let request = book_request(&slot_id, "citizen-1", "book-once");
        tokio::spawn(async move { booking.book(request).await })
    });
    let mut ids = Vec::new();
    for copy in copies.collect::<Vec<_>>() {
        ids.push(
            copy.await
                .unwrap()
                .expect("booked")
                .into_inner()
                .booking
                .unwrap()
                .booking_id,
        );
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one booking for eight copies");
    let hold = proto::HoldSlotRequest {
        slot_id: slot_id.clone(),
        citizen_id: "citizen-2".into(),
        request_id: "hold-once".into(),
        ttl_seconds: 300,
    };
    for _ in 0..3 {
        booking.clone().hold_slot(hold.clone()).await.expect("held");
    }
    let group = proto::BookGroupRequest {
        slot_id: slot_id.clone(),
        citizen_ids: vec!["citizen-3".into(), "citizen-4".into()],
        request_id: "group-once".into(),
    };
    for _ in 0..2 {
        booking
            .clone()
            .book_group(group.clone())
            .await
            .expect("booked");
    }
    let cancel = proto::CancelBookingRequest {
        booking_id: ids[0].clone(),
        citizen_id: "citizen-1".into(),
        request_id: "cancel-once".into(),
    };
    for _ in 0..2 {
        booking
            .clone()
            .cancel_booking(cancel.clone())
            .await
            .expect("cancelled");
    }

    let samples = parse(&http_get(&server.metrics_url));
    let counted = |command: &str, outcome: &str| {
        let labels = [("command", command), ("outcome", outcome)];
        value(&samples, "prenota_bookings_total", &labels)
    };
    assert_eq!(
        counted("book", "OK"),
        Some(2.0),
        "the Book and the BookGroup"
    );
    assert_eq!(counted("book", "REPLAYED"), Some(8.0));
    assert_eq!(counted("cancel", "OK"), Some(1.0));
    assert_eq!(counted("cancel", "REPLAYED"), Some(1.0));
    let held = |outcome: &str| value(&samples, "prenota_holds_total", &[("outcome", outcome)]);
    assert_eq!(held("OK"), Some(1.0));
    assert_eq!(held("REPLAYED"), Some(2.0));
    server.terminate();
}

/// A Book whose client goes away while its write waits for the disk still books (its
/// work runs on): the call is counted CANCELLED and the booking OK. Neither was counted
/// before (the request's future was dropped before either count). One whose deadline
/// (`request_timeout_ms`, 1 s here) passes meanwhile is answered and counted
/// DEADLINE_EXCEEDED at its deadline, as gRPC asks (tonic's own timeout answered
/// CANCELLED "Timeout expired"), and books too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_abandoned_while_its_write_waits_is_counted_and_so_is_its_booking() {
    let dir = tempfile::tempdir().unwrap();
    let (library, control) = fdatasync_gate(dir.path());
    let limits = ["REQUEST_TIMEOUT_MS", "MESSAGE_RECEIVE_TIMEOUT_MS"]
        .map(|name| (format!("PRENOTA_LIMITS_{name}"), "1000".to_string()));
    let server = start_with_shim_and(&dir.path().join("data"), &library, &control, limits.into());
    let channel = connect(&server.url).await;
    let slot_id = one_slot_site_on(channel.clone(), "gone-site", "r", 5).await;
    std::fs::write(control.join("gate"), b"").unwrap();
    let mut client = BookingServiceClient::new(channel.clone());
    let request = book_request(&slot_id, "citizen-gone", "gone-1");
    let call = tokio::spawn(async move { client.book(request).await });
    wait_for_held_fdatasync(&control).await;
    call.abort(); // the client resets the stream
    let late = book_request(&slot_id, "citizen-late", "late-1");
    let asked = Instant::now();
    let late = BookingServiceClient::new(channel.clone()).book(late).await;
    let late = late.unwrap_err();
    assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");
    assert!(late.message().contains("sent again with it"), "{late:?}");
    let waited = asked.elapsed();
    assert!(
        (Duration::from_millis(990)..Duration::from_secs(5)).contains(&waited),
        "answered at its deadline: {waited:?}"
    );
    std::fs::remove_file(control.join("gate")).unwrap();

    let booked = [("command", "book"), ("outcome", "OK")];
    let cancelled = [
        ("grpc_service", BOOKING),
        ("grpc_method", "Book"),
        ("grpc_code", "CANCELLED"),
    ];
    let past_deadline = [
        ("grpc_service", BOOKING),
        ("grpc_method", "Book"),
        ("grpc_code", "DEADLINE_EXCEEDED"),
    ];
    samples_once(&server, |samples| {
        value(samples, "prenota_bookings_total", &booked) == Some(2.0)
            && value(samples, "grpc_server_handled_total", &cancelled) == Some(1.0)
            && value(samples, "grpc_server_handled_total", &past_deadline) == Some(1.0)
    })
    .await;
    let listed = citizen_bookings(&mut BookingServiceClient::new(channel), "citizen-gone").await;
    assert_eq!(listed.len(), 1, "the booking was made");
    server.terminate();
}

/// The page's samples once `ready` holds of them (refreshed every 100 ms here).
async fn samples_once(server: &ChildServer, ready: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = parse(&http_get(&server.metrics_url));
        if ready(&samples) {
            return samples;
        }
        assert!(Instant::now() < deadline, "the gauges never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The regions `site`'s capacity gauge is on the page with.
fn capacity_regions(samples: &[Sample], site: &str) -> Vec<String> {
    let of_site = samples.iter().filter(|s| s.name == "prenota_site_capacity");
    of_site
        .filter(|s| s.labels.get("site_id").map(String::as_str) == Some(site))
        .map(|s| s.labels["region_id"].clone())
        .collect()
}

/// Per-site gauges are the catalog's as of the last refresh: a site that moves to
/// another region, or falls past the first `metrics_site_gauges_max` (2 here), leaves
/// the page. The recorder kept both on it with their last values until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_gauges_follow_a_site_that_moves_or_falls_past_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let limits = [
        ("METRICS_REFRESH_INTERVAL_MS", "100"),
        ("METRICS_SITE_GAUGES_MAX", "2"),
    ];
    let server = ChildServer::with_limits(dir.path(), &limits);
    let channel = connect(&server.url).await;
    one_slot_site_on(channel.clone(), "b-site", "r1", 3).await;
    one_slot_site_on(channel.clone(), "c-site", "r1", 4).await;
    samples_once(&server, |s| capacity_regions(s, "c-site") == ["r1"]).await;

    let moved = proto::UpsertSiteRequest {
        site: Some(proto::Site {
            site_id: "c-site".into(),
            name: "Site c-site".into(),
            region_id: "r2".into(),
            time_zone: "Etc/UTC".into(),
        }),
        request_id: "move-c-site".into(),
    };
    let mut capacity = CapacityServiceClient::new(channel.clone());
    capacity.upsert_site(moved).await.expect("moved");
    let samples = samples_once(&server, |s| capacity_regions(s, "c-site") != ["r1"]).await;
    assert_eq!(
        capacity_regions(&samples, "c-site"),
        ["r2"],
        "only its new region"
    );

    // "a-site" sorts first: the first two are now a-site and b-site.
    one_slot_site_on(channel.clone(), "a-site", "r1", 5).await;
    let samples = samples_once(&server, |s| !capacity_regions(s, "a-site").is_empty()).await;
    assert!(
        capacity_regions(&samples, "c-site").is_empty(),
        "c-site stayed"
    );
    assert_eq!(capacity_regions(&samples, "b-site"), ["r1"]);
    assert_eq!(value(&samples, "prenota_sites", &[]), Some(3.0));
    let site = [("site_id", "a-site"), ("region_id", "r1")];
    assert_eq!(value(&samples, "prenota_site_capacity", &site), Some(5.0));
    assert_eq!(value(&samples, "prenota_site_slots", &site), Some(1.0));
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_while_a_large_store_recovers_then_serving() {
    if common::postgres::sled_only(
        "health_is_not_serving_while_a_large_store_recovers_then_serving",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A store whose recovery takes a while: 2 services × 300 days of 5-minute slots.
    let seeded = TestServer::start(dir.path()).await;
    let mut capacity = seeded.capacity().await;
    upsert_site(&mut capacity, "big", "r", "Etc/UTC").await;
    for service in ["vax", "flu"] {
        capacity
            .publish_schedule(publish_request(
                "big",
                service,
                (&day_ahead(2), &day_ahead(301)),
                ("00:00", "23:55"),
                5,
                10,
            ))
            .await
            .expect("publish");
    }
    let slot_id = search_all(&mut seeded.booking().await, "big", "vax").await[0]
        .slot_id
        .clone();
    drop(capacity);
    seeded.stop().await;

    let mut server = ChildServer::start_recovering(dir.path(), ChildOptions::default());
    let channel = connect(&server.url).await;
    for service in [
        "",
        "prenota.v1.BookingService",
        "prenota.v1.CapacityService",
    ] {
        assert_eq!(
            health_of(channel.clone(), service).await,
            ServingStatus::NotServing,
            "{service:?} while recovering"
        );
    }
    let refused = BookingServiceClient::new(channel.clone())
        .book(book_request(&slot_id, "early-citizen", "early"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason(&refused).as_deref(), Some("RECOVERING"));
    assert!(refused.get_details_retry_info().is_some());

    server.wait_serving();
    for service in [
        "",
        "prenota.v1.BookingService",
        "prenota.v1.CapacityService",
    ] {
        assert_eq!(
            health_of(channel.clone(), service).await,
            ServingStatus::Serving
        );
    }
    // The refused request changed nothing; the same request now books.
    book_ok(
        &mut BookingServiceClient::new(channel),
        book_request(&slot_id, "early-citizen", "early"),
    )
    .await;
    let metrics = parse(&http_get(&server.metrics_url));
    assert_eq!(
        value(&metrics, "prenota_recovered_records", &[("kind", "slots")]),
        Some(2.0 * 300.0 * 287.0) // 00:00 to 23:55: the last slot starts at 23:50
    );
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_method_code_and_latency_but_never_tokens_or_citizens() {
    const TOKEN: &str = "TOKEN-SECRET-9f8e7d6c5b4a3210";
    const CITIZEN: &str = "CITIZEN-SECRET-RSSMRA80A01H501U";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prenota.toml");
    std::fs::write(
        &config,
        format!(
            "[[tokens]]\nname = \"ops-admin\"\nrole = \"admin\"\nsha256 = \"{}\"\n",
            hex::encode(prenota::config::token_sha256(TOKEN))
        ),
    )
    .unwrap();
    let log_path = dir.path().join("stderr.log");
    let data_dir = dir.path().join("data");
    let mut server = ChildServer::start_recovering(
        &data_dir,
        ChildOptions {
            args: vec![
                "--log-format".into(),
                "json".into(),
                "--config".into(),
                config.display().to_string(),
            ],
            stderr: Some(std::fs::File::create(&log_path).unwrap()),
            // Everything prenota logs, down to each request.
            rust_log: Some("debug".into()),
            ..ChildOptions::default()
        },
    );
    server.wait_serving();
    let channel = connect(&server.url).await;
    let mut capacity =
        CapacityServiceClient::with_interceptor(channel.clone(), Bearer(Some(TOKEN)));
    let mut booking = BookingServiceClient::with_interceptor(channel.clone(), Bearer(Some(TOKEN)));
    capacity
        .upsert_site(proto::UpsertSiteRequest {
            site: Some(proto::Site {
                site_id: "logs".into(),
                name: "Logs".into(),
                region_id: "r".into(),
                time_zone: "Etc/UTC".into(),
            }),
            request_id: "u".into(),
        })
        .await
        .unwrap();
    let day = day_ahead(30);
    capacity
        .publish_schedule(publish_request(
            "logs",
            "vax",
            (&day, &day),
            ("10:00", "10:30"),
            30,
            5,
        ))
        .await
        .unwrap();
    let slot_id = booking
        .search_slots(proto::SearchSlotsRequest {
            scope: Some(proto::search_slots_request::Scope::SiteId("logs".into())),
            service_id: "vax".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .slots[0]
        .slot_id
        .clone();
    booking
        .book(book_request(&slot_id, CITIZEN, "logged-booking"))
        .await
        .unwrap();
    let repeated = booking
        .book(book_request(&slot_id, CITIZEN, "second-booking"))
        .await
        .unwrap_err();
    assert_eq!(repeated.code(), Code::AlreadyExists);
    let forged =
        BookingServiceClient::with_interceptor(channel, Bearer(Some("TOKEN-SECRET-forged")))
            .book(book_request(&slot_id, CITIZEN, "forged"))
            .await
            .unwrap_err();
    assert_eq!(forged.code(), Code::Unauthenticated);
    server.terminate();

    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(!logs.contains("TOKEN-SECRET"), "a token in the logs");
    assert!(!logs.contains("CITIZEN-SECRET"), "a citizen id in the logs");
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let answered = |code: &str| {
        lines.iter().any(|line| {
            line["message"] == "request answered"
                && line["span"]["grpc.method"] == "Book"
                && line["grpc.code"] == code
                && line["latency_us"].is_u64()
        })
    };
    assert!(answered("OK"), "no log line for the booking");
    assert!(answered("ALREADY_EXISTS"));
    assert!(answered("UNAUTHENTICATED"));
}

/// Rare events' counters exist at 0 from the start, so a dashboard tells "never happened"
/// from "missing"; text logs written to a file carry no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rare_counters_start_at_zero_and_piped_logs_have_no_colour() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let mut server = ChildServer::start_recovering(
        &dir.path().join("data"),
        ChildOptions {
            stderr: Some(std::fs::File::create(&log_path).unwrap()),
            rust_log: Some("info".into()),
            ..ChildOptions::default()
        },
    );
    server.wait_serving();
    let metrics = parse(&http_get(&server.metrics_url));
    for (name, labels) in [
        ("prenota_holds_expired_total", vec![]),
        ("prenota_shed_total", vec![]),
        ("prenota_commit_failures_total", vec![]),
        ("prenota_rate_limited_total", vec![("limiter", "citizen")]),
        ("prenota_rate_limited_total", vec![("limiter", "token")]),
        (
            "prenota_retention_deleted_total",
            vec![("kind", "bookings")],
        ),
    ] {
        assert_eq!(
            value(&metrics, name, &labels),
            Some(0.0),
            "{name} {labels:?}"
        );
    }
    server.terminate();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(logs.contains("recovered state from the store"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in a log file: {logs:?}"
    );
}

/// A client killed in the middle of an import (its connection reset) made a stream
/// error the server counted and logged as UNKNOWN, the code of a server failure an
/// alert fires on (an outside test). Now it is CANCELLED, and nothing is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_whose_client_dies_midway_is_cancelled_not_a_server_failure() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(&dir.path().join("data"));
    let file = dir.path().join("many.csv");
    let mut csv = String::from(
        "site_id,name,region_id,time_zone,service_id,first_day,last_day,weekdays,opens,\
         closes,slot_minutes,capacity_per_slot\n",
    );
    for n in 0..200_000 {
        csv.push_str(&format!(
            "site-{n},Site {n},r,Etc/UTC,svc,2027-03-01,2027-03-01,1-7,08:00,09:00,60,1\n"
        ));
    }
    std::fs::write(&file, csv).unwrap();
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_prenota"))
        .arg("import")
        .arg(&file)
        .args(["--server", &server.url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first progress line: a tenth of the rows sent, the rest not yet.
    let mut progress = String::new();
    std::io::BufReader::new(cli.stderr.take().unwrap())
        .read_line(&mut progress)
        .unwrap();
    assert!(progress.starts_with("sending rows: "), "{progress}");
    cli.kill().unwrap();
    cli.wait().unwrap();

    let import = |code| {
        let metrics = parse(&http_get(&server.metrics_url));
        let labels = [("grpc_method", "ImportCapacity"), ("grpc_code", code)];
        value(&metrics, "grpc_server_handled_total", &labels)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while import("CANCELLED").is_none() {
        assert!(Instant::now() < deadline, "never counted CANCELLED");
        assert_eq!(import("UNKNOWN"), None);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(import("UNKNOWN"), None);
    let first_site = BookingServiceClient::new(connect(&server.url).await)
        .search_slots(proto::SearchSlotsRequest {
            scope: Some(proto::search_slots_request::Scope::SiteId("site-0".into())),
            service_id: "svc".into(),
            ..Default::default()
        })
        .await
        .expect_err("nothing of the import applied");
    assert_eq!(reason(&first_site).as_deref(), Some("SITE_NOT_FOUND"));
    server.terminate();
}

/// A server whose log cannot be written (stderr on a full disk: `/dev/full`) exited 101
/// at its first log line, and a failing store's committer, logging its error, died
/// there and hung every write unreported (an outside test). It now serves, books and
/// stops cleanly, its log lines dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_log_cannot_be_written_serves_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let options = ChildOptions {
        stderr: Some(full),
        rust_log: Some("debug".into()),
        ..ChildOptions::default()
    };
    let mut server = ChildServer::start_recovering(&dir.path().join("data"), options);
    server.wait_serving();
    let channel = connect(&server.url).await;
    let slot_id = one_slot_site_on(channel.clone(), "logless", "r", 2).await;
    let mut booking = BookingServiceClient::new(channel);
    book_ok(&mut booking, book_request(&slot_id, "citizen", "book-1")).await;
    server.terminate();
}

/// `prenota serve … | head -1`: once the reader of its status lines was gone, the
/// server panicked at its next line (exit 101) before it ever served. It now serves on
/// without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_stdout_reader_is_gone_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_prenota"))
        .args([
            "serve",
            "--listen",
            &address,
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn prenota serve");
    drop(child.stdout.take()); // every status line meets a closed pipe
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let channel = tonic::transport::Channel::from_shared(format!("http://{address}"));
        let channel = channel.unwrap();
        let serving = match channel.connect().await {
            Ok(channel) => health_of(channel, "").await == ServingStatus::Serving,
            Err(_) => false,
        };
        if serving {
            break;
        }
        let exited = child.try_wait().unwrap();
        assert!(exited.is_none(), "the server exited: {exited:?}");
        assert!(Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(child.try_wait().unwrap().is_none(), "still serving");
    child.kill().unwrap();
    child.wait().unwrap();
}
