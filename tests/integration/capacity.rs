//! Authorities' tooling over gRPC and the CLI, on a real server: bulk import (all or
//! nothing), slot capacity changes, closures that cancel bookings with a reason.

use crate::common;

use std::process::Command;

use common::*;
use prenota::proto;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use tonic::transport::Channel;
use tonic::Code;

fn row(line: u64, site_id: &str, time_zone: &str, day: &str) -> proto::CapacityRow {
    proto::CapacityRow {
        site: Some(proto::Site {
            site_id: site_id.into(),
            name: format!("Site {site_id}"),
            region_id: "lazio".into(),
            time_zone: time_zone.into(),
        }),
        service_id: "vax".into(),
        first_day: day.into(),
        last_day: day.into(),
        weekdays: (1..=7).collect(),
        opens: "01:00".into(),
        closes: "04:00".into(),
        slot_minutes: 30,
        capacity_per_slot: 2,
        line,
    }
}

async fn import(
    client: &mut CapacityServiceClient<Channel>,
    rows: Vec<proto::CapacityRow>,
    dry_run: bool,
) -> Result<proto::ImportCapacityResponse, tonic::Status> {
    let rows_total = Some(rows.len() as u64);
    let messages: Vec<proto::ImportCapacityRequest> = rows
        .chunks(1_000)
        .map(|chunk| proto::ImportCapacityRequest {
            rows: chunk.to_vec(),
            dry_run,
            request_id: "import".into(),
            rows_total,
        })
        .collect();
    client
        .import_capacity(tokio_stream::iter(messages))
        .await
        .map(|response| response.into_inner())
}

/// An upload the client cancels (or whose deadline passes: the same RST_STREAM CANCEL)
/// before its end applies nothing, though tonic reads such a cancel as the stream's end;
/// the same rows sent to the end are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_cancelled_before_its_end_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let messages = |sites: [&str; 2]| {
        sites.map(|site| proto::ImportCapacityRequest {
            rows: vec![row(2, site, "Europe/Rome", "2027-03-29")],
            ..Default::default()
        })
    };
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    for message in messages(["first", "second"]) {
        sender.send(message).await.unwrap();
    }
    let mut client = server.capacity().await;
    let upload = tokio_stream::wrappers::ReceiverStream::new(receiver);
    let call = tokio::spawn(async move { client.import_capacity(upload).await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    call.abort(); // the rest of the file never comes: the client resets the stream
    assert!(call.await.unwrap_err().is_cancelled());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for site in ["first", "second"] {
        let request = proto::GetSiteStatsRequest {
            site_id: site.into(),
        };
        let status = (server.capacity().await.get_site_stats(request).await).unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{site}: {status:?}");
    }
    let whole = tokio_stream::iter(messages(["first", "second"]));
    let imported = server.capacity().await.import_capacity(whole).await;
    assert_eq!(imported.expect("the whole file").into_inner().rows, 2);
    assert_eq!(site_stats(&server, "second").await.slots, 6);
    drop(sender);
    server.stop().await;
}

/// A stream ended early but cleanly (a client or proxy sending END_STREAM, or
/// RST_STREAM(NO_ERROR), halfway: tonic reads either as the end) carries fewer rows than
/// its `rows_total`: refused, nothing applied. Messages that disagree on it are refused
/// too, and one announcing more than `import_rows_max` before its rows come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_cut_short_of_its_rows_total_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.capacity().await;
    let message = |site: &str, rows_total| proto::ImportCapacityRequest {
        rows: vec![row(2, site, "Europe/Rome", "2027-03-29")],
        rows_total,
        ..Default::default()
    };
    let refusals = [
        (vec![message("cut", Some(2))], "carried 1 rows, not the 2"),
        (
            vec![message("cut", Some(2)), message("cut-b", Some(3))],
            "disagree",
        ),
        (vec![message("cut", Some(20_000_000))], "at most"),
    ];
    for (messages, says) in refusals {
        let status = client
            .import_capacity(tokio_stream::iter(messages))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let bad = tonic_types::StatusExt::get_details_bad_request(&status).unwrap();
        let described = &bad.field_violations[0].description;
        assert!(described.contains(says), "{says}: {status:?}");
    }
    let request = proto::GetSiteStatsRequest {
        site_id: "cut".into(),
    };
    let status = (client.get_site_stats(request).await).unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let whole = vec![message("cut", Some(2)), message("cut-b", None)];
    let imported = client.import_capacity(tokio_stream::iter(whole)).await;
    assert_eq!(imported.expect("the whole file").into_inner().rows, 2);
    server.stop().await;
}

/// A row that makes no slot (a Sunday with weekdays Monday to Friday) was accepted
/// silently: the file's author never learnt the site had nothing that day. It is refused,
/// naming the line, and nothing of the file is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_row_that_makes_no_slot_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.capacity().await;
    let good = row(2, "made", "Europe/Rome", "2027-03-29");
    let mut sunday = row(3, "empty", "Europe/Rome", "2027-03-28");
    sunday.weekdays = (1..=5).collect();
    let status = import(&mut client, vec![good, sunday], false)
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["rows[3].weekdays"]);
    let bad = tonic_types::StatusExt::get_details_bad_request(&status).unwrap();
    let described = &bad.field_violations[0].description;
    assert!(described.contains("makes no slot"), "{described}");
    let request = proto::GetSiteStatsRequest {
        site_id: "made".into(),
    };
    let status = (client.get_site_stats(request).await).unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    server.stop().await;
}

/// 300 bad rows: the answer keeps 4 KiB of violations, and the count of rows with errors
/// came last, so it was cut off (the CLI then said "78 problems"). It comes first now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_with_many_bad_rows_says_first_how_many_have_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let rows = (0..300)
        .map(|n| row(n + 2, &format!("bad-{n}"), "Europe/Atlantis", "2027-03-29"))
        .collect();
    let status = import(&mut server.capacity().await, rows, false)
        .await
        .unwrap_err();
    let fields = violated_fields(&status);
    assert!(fields.len() < 101, "cut at 4 KiB: {}", fields.len());
    let bad = tonic_types::StatusExt::get_details_bad_request(&status).unwrap();
    let first = &bad.field_violations[0];
    assert_eq!(first.field, "rows");
    assert!(
        first.description.starts_with("300 rows have errors"),
        "{first:?}"
    );
    server.stop().await;
}

/// An import that moved a site to another region was audited as "1 rows: 1 sites, 0
/// slots created, 0 updated" (UpsertSite says where a site goes): it now says what
/// changed, and what it was: its name, region or time zone (a site with no slot yet
/// may change zone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_that_moves_or_renames_a_site_says_so_in_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.capacity().await;
    let empty = row(2, "zoned", "Europe/Rome", "2027-03-29").site;
    let upsert = proto::UpsertSiteRequest {
        site: empty,
        ..Default::default()
    };
    client.upsert_site(upsert).await.unwrap();
    let zoned = row(2, "zoned", "Europe/Lisbon", "2027-03-29");
    import(&mut client, vec![zoned], false).await.unwrap();
    let first = row(2, "moving", "Europe/Rome", "2027-03-29");
    import(&mut client, vec![first.clone()], false)
        .await
        .unwrap();
    let mut moved = first;
    let site = moved.site.as_mut().unwrap();
    (site.region_id, site.name) = ("veneto".into(), "Moved".into());
    import(&mut client, vec![moved], false).await.unwrap();
    let request = proto::ExportAuditLogRequest {};
    let mut log = client.export_audit_log(request).await.unwrap().into_inner();
    let mut details = Vec::new();
    while let Some(item) = log.message().await.unwrap() {
        details.push(item.entry.unwrap().detail);
    }
    let last = details.last().unwrap();
    let said =
        "sites changed: moving \"Moved\" in region veneto (was \"Site moving\" in region lazio)";
    assert!(last.contains(said), "{details:?}");
    let said = "sites changed: zoned \"Site zoned\" in region lazio, zone Europe/Lisbon (was \
                \"Site zoned\" in region lazio, zone Europe/Rome)";
    assert!(details[1].contains(said), "{details:?}");
    assert!(!details[2].contains("sites changed"), "{details:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_with_one_bad_row_applies_nothing_and_names_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.capacity().await;
    let rows = vec![
        row(2, "good-1", "Europe/Rome", "2027-03-29"),
        row(3, "good-2", "Europe/Rome", "2027-03-29"),
        row(4, "bad", "Europe/Atlantis", "2027-03-29"),
    ];
    let status = import(&mut client, rows, false).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["rows[4].time_zone"]);
    for site in ["good-1", "good-2", "bad"] {
        let status = client
            .get_site_stats(proto::GetSiteStatsRequest {
                site_id: site.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{site} must not exist");
    }
    // Two rows describing the same slot are refused too, naming both lines.
    let status = import(
        &mut client,
        vec![
            row(2, "twice", "Europe/Rome", "2027-03-29"),
            row(3, "twice", "Europe/Rome", "2027-03-29"),
        ],
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(violated_fields(&status), ["rows[3].opens"]);
    assert!(status.message().contains("line 2"), "{}", status.message());
    // So are two rows whose slots overlap (the same hours in another slot length).
    let mut longer = row(3, "overlapping", "Europe/Rome", "2027-03-29");
    (longer.opens, longer.slot_minutes) = ("01:15".into(), 45);
    let rows = vec![row(2, "overlapping", "Europe/Rome", "2027-03-29"), longer];
    let status = import(&mut client, rows, false).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["rows[3].opens"]);
    assert!(
        status.message().contains("overlaps one of line 2"),
        "{}",
        status.message()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_thousand_row_import_creates_every_slot_across_dst_days() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.capacity().await;
    // 01:00–04:00 local, 30-minute slots. Rome's spring-forward day (2027-03-28) skips
    // 02:00 and 02:30: 4 slots. Its fall-back day (2027-10-31) repeats 02:00–02:59,
    // which makes no second slot: 6 slots.
    let rows: Vec<proto::CapacityRow> = (0..10_000u64)
        .map(|index| {
            let mut row = row(
                index + 2,
                &format!("site-{}", index / 2),
                "Europe/Rome",
                if index % 2 == 0 {
                    "2027-03-28"
                } else {
                    "2027-10-31"
                },
            );
            row.capacity_per_slot = 1 + (index % 3) as u32;
            row
        })
        .collect();
    let expected_slots = 5_000 * 4 + 5_000 * 6;
    let expected_capacity: u64 = rows
        .iter()
        .map(|r| u64::from(r.capacity_per_slot) * if r.first_day == "2027-03-28" { 4 } else { 6 })
        .sum();

    let dry = import(&mut client, rows.clone(), true)
        .await
        .expect("dry run");
    assert_eq!(dry.slots_created, expected_slots);
    assert!(
        client
            .get_site_stats(proto::GetSiteStatsRequest {
                site_id: "site-0".into()
            })
            .await
            .is_err(),
        "a dry run applies nothing"
    );

    let summary = import(&mut client, rows.clone(), false)
        .await
        .expect("import");
    assert_eq!(summary.rows, 10_000);
    assert_eq!(summary.sites_upserted, 5_000);
    assert_eq!(summary.slots_created, expected_slots);
    assert_eq!(summary.total_capacity, expected_capacity);
    let stats = site_stats(&server, "site-4999").await;
    assert_eq!(stats.slots, 10);
    let days: Vec<(String, u32)> = stats
        .by_day
        .iter()
        .map(|d| (d.day.clone(), d.slots))
        .collect();
    assert_eq!(
        days,
        [("2027-03-28".to_string(), 4), ("2027-10-31".to_string(), 6)]
    );

    // Importing the same file again changes nothing, also after a restart.
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    let again = import(&mut server.capacity().await, rows, false)
        .await
        .expect("re-import");
    assert_eq!((again.slots_created, again.slots_updated), (0, 0));
    assert_eq!(site_stats(&server, "site-0").await.slots, 10);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_imports_the_example_file_and_exports_bookings_as_csv() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let binary = env!("CARGO_BIN_EXE_prenota");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/capacity.csv");
    let url = server.url();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || Command::new(binary).args(args).output().unwrap())
    };
    let imported = run(vec![
        "import".into(),
        example.into(),
        "--server".into(),
        url.clone(),
    ])
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&imported.stdout);
    assert!(
        imported.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&imported.stderr)
    );
    assert!(stdout.contains("imported 6 rows: 3 sites"), "{stdout}");

    let slots = search_range(
        &mut server.booking().await,
        "rome-termini",
        "identity-card",
        1_800_000_000,
        1_800_000_000 + 366 * 86_400,
    )
    .await;
    book_ok(
        &mut server.booking().await,
        book_request(&slots[0].slot_id, "alice", "r1"),
    )
    .await;

    let exported = run(vec![
        "export".into(),
        "--server".into(),
        url.clone(),
        "--site".into(),
        "rome-termini".into(),
    ])
    .await
    .unwrap();
    assert!(exported.status.success());
    let csv = String::from_utf8(exported.stdout).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(lines[0].starts_with("booking_id,slot_id,site_id"));
    assert!(
        lines[1].contains(&slots[0].slot_id) && lines[1].contains("CONFIRMED"),
        "{csv}"
    );

    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "site_id,name\nx,y\n").unwrap();
    let refused = run(vec![
        "import".into(),
        bad.display().to_string(),
        "--server".into(),
        url,
    ])
    .await
    .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("line 1"));
    server.stop().await;
}

/// A file from yesterday to tomorrow (hourly, UTC): the slots that have started are
/// left out and said so, only the others are created; the same file again (a cumulative
/// file re-imported) creates nothing and brings no started slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_leaves_out_the_slots_that_have_started() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let file = dir.path().join("week.csv");
    let row = |site: &str, first: i64, last: i64| {
        format!(
            "{site},{site},lazio,UTC,vax,{},{},1-7,00:00,23:00,60,3\n",
            day_ahead(first),
            day_ahead(last)
        )
    };
    let header = "site_id,name,region_id,time_zone,service_id,first_day,last_day,weekdays,\
                  opens,closes,slot_minutes,capacity_per_slot\n";
    let csv = format!("{header}{}{}", row("week", -1, 1), row("gone", -3, -2));
    std::fs::write(&file, csv).unwrap();
    let import = || {
        let args = ["import", file.to_str().unwrap(), "--server", &server.url()];
        let output = Command::new(env!("CARGO_BIN_EXE_prenota"))
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(output.status.success(), "{stdout} {output:?}");
        stdout
    };
    let before = chrono::Utc::now().timestamp();
    let first = import();
    let after = chrono::Utc::now().timestamp();
    // 23 slots a day: yesterday's, the hours of today begun, and the other site's two days.
    let begun = |now: i64| 23 + (now.rem_euclid(86_400) / 3_600).min(22) + 1 + 46;
    let past: i64 = (first.split(" (").nth(1).and_then(|s| s.split(' ').next()))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no started slots counted: {first}"));
    assert!((begun(before)..=begun(after)).contains(&past), "{first}");
    assert!(first.contains("slots had started: left out"), "{first}");
    let created = site_stats(&server, "week").await.slots;
    assert_eq!(i64::from(created) + past - 46, 3 * 23, "{first}");
    assert!(
        first.contains(&format!("{created} slots created")),
        "{first}"
    );
    assert_eq!(site_stats(&server, "gone").await.slots, 0);
    let mut booking = server.booking().await;
    let slots = search_range(
        &mut booking,
        "week",
        "vax",
        before - 2 * 86_400,
        after + 2 * 86_400,
    )
    .await;
    assert!(slots
        .iter()
        .all(|slot| slot.start.unwrap().seconds > before));

    let again = import();
    assert!(
        again.contains(" 0 slots created, 0 slots updated"),
        "{again}"
    );
    assert_eq!(site_stats(&server, "week").await.slots, created);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_never_set_below_what_is_booked_and_held() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot = one_slot_site(&server, "shrinking", 4).await;
    let mut booking = server.booking().await;
    book_ok(&mut booking, book_request(&slot, "a", "a")).await;
    book_ok(&mut booking, book_request(&slot, "b", "b")).await;
    booking
        .hold_slot(proto::HoldSlotRequest {
            slot_id: slot.clone(),
            citizen_id: "c".into(),
            request_id: "c".into(),
            ttl_seconds: 300,
        })
        .await
        .expect("hold");
    let mut capacity = server.capacity().await;
    let set = |capacity: u32| proto::SetSlotCapacityRequest {
        slot_id: slot.clone(),
        capacity,
        request_id: String::new(),
    };
    let status = capacity.set_slot_capacity(set(2)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status).as_deref(), Some("CAPACITY_BELOW_BOOKED"));
    assert_eq!(metadata(&status, "taken").as_deref(), Some("3"));
    let slot_now = capacity
        .set_slot_capacity(set(3))
        .await
        .unwrap()
        .into_inner()
        .slot
        .unwrap();
    assert_eq!((slot_now.capacity, slot_now.remaining), (3, 0));
    let slot_now = capacity
        .set_slot_capacity(set(10))
        .await
        .unwrap()
        .into_inner()
        .slot
        .unwrap();
    assert_eq!((slot_now.capacity, slot_now.remaining), (10, 7));
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    let stats = site_stats(&server, "shrinking").await;
    assert_eq!((stats.capacity, stats.booked, stats.held), (10, 2, 1));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_day_cancels_its_bookings_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut capacity = server.capacity().await;
    upsert_site(&mut capacity, "flooded", "lazio", "Etc/UTC").await;
    let (day_one, day_two) = (day_ahead(20), day_ahead(21));
    capacity
        .publish_schedule(publish_request(
            "flooded",
            "vax",
            (&day_one, &day_two),
            ("09:00", "10:00"),
            30,
            2,
        ))
        .await
        .expect("publish");
    let mut booking = server.booking().await;
    let slots = search_all(&mut booking, "flooded", "vax").await;
    assert_eq!(slots.len(), 4);
    let mut on_day_one = Vec::new();
    for (index, citizen) in ["a", "b", "c"].iter().enumerate() {
        on_day_one.push(
            book_ok(
                &mut booking,
                book_request(&slots[index % 2].slot_id, citizen, citizen),
            )
            .await,
        );
    }
    let kept = book_ok(&mut booking, book_request(&slots[2].slot_id, "d", "d")).await;
    let hold_e = proto::HoldSlotRequest {
        slot_id: slots[1].slot_id.clone(),
        citizen_id: "e".into(),
        request_id: "e".into(),
        ttl_seconds: 300,
    };
    booking.hold_slot(hold_e.clone()).await.expect("hold");

    let close = proto::CloseSlotsRequest {
        site_id: "flooded".into(),
        service_id: None,
        from: slots[0].start,
        to: slots[2].start,
        reason: "site flooded".into(),
        request_id: "close".into(),
    };
    let closed = capacity
        .close_slots(close.clone())
        .await
        .expect("close")
        .into_inner();
    assert_eq!(
        (
            closed.slots_closed,
            closed.cancelled_bookings,
            closed.expired_holds
        ),
        (2, 3, 1)
    );
    // A retry returns the first outcome; the same id for another closure is refused.
    let retried = capacity
        .close_slots(close.clone())
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(retried, closed);
    let status = capacity
        .close_slots(proto::CloseSlotsRequest {
            reason: "other".into(),
            ..close.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("REQUEST_ID_REUSED"));
    // The hold's retry answers it as it is now: ended by the closure, not live for
    // five minutes more (an outside test: it showed its first expiry).
    let retried = booking.hold_slot(hold_e).await.expect("a retry");
    let expires_at = retried.into_inner().hold.unwrap().expires_at.unwrap();
    assert!(expires_at.seconds <= chrono::Utc::now().timestamp());

    for (cancelled, citizen) in on_day_one.iter().zip(["a", "b", "c"]) {
        let stored = booking
            .get_booking(proto::GetBookingRequest {
                booking_id: cancelled.booking_id.clone(),
                citizen_id: citizen.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .booking
            .unwrap();
        assert_eq!(stored.state, proto::BookingState::Cancelled as i32);
        assert_eq!(stored.cancel_reason, "site flooded");
    }
    let listed = booking
        .list_citizen_bookings(proto::ListCitizenBookingsRequest {
            citizen_id: "a".into(),
            service_id: None,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .bookings;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].cancel_reason, "site flooded");
    let exported = export_all(server.channel().await).await;
    assert_eq!(
        exported
            .iter()
            .filter(|b| b.cancel_reason == "site flooded")
            .count(),
        3
    );
    assert!(exported.iter().any(
        |b| b.booking_id == kept.booking_id && b.state == proto::BookingState::Confirmed as i32
    ));

    // Closed slots admit nothing, show as closed, and stay closed on republish.
    let status = booking
        .book(book_request(&slots[0].slot_id, "f", "f"))
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("SLOT_CLOSED"));
    capacity
        .publish_schedule(publish_request(
            "flooded",
            "vax",
            (&day_one, &day_two),
            ("09:00", "10:00"),
            30,
            2,
        ))
        .await
        .expect("republish");
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let retried = server
        .capacity()
        .await
        .close_slots(close)
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(retried, closed, "the outcome survives a restart");
    let mut booking = server.booking().await;
    let after = search_all(&mut booking, "flooded", "vax").await;
    assert!(after[0].closed && after[1].closed && !after[2].closed);
    assert_eq!((after[0].remaining, after[2].remaining), (0, 1));
    let stats = site_stats(&server, "flooded").await;
    assert_eq!(
        (stats.slots_closed, stats.booked, stats.held, stats.capacity),
        (2, 1, 0, 4)
    );
    // The cancelled citizens may book again; SetSlotCapacity reopens a closed slot.
    book_ok(
        &mut booking,
        book_request(&slots[3].slot_id, "a", "a-again"),
    )
    .await;
    let reopened = server
        .capacity()
        .await
        .set_slot_capacity(proto::SetSlotCapacityRequest {
            slot_id: slots[0].slot_id.clone(),
            capacity: 2,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .slot
        .unwrap();
    assert!(!reopened.closed);
    book_ok(
        &mut booking,
        book_request(&slots[0].slot_id, "b", "b-again"),
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closure_racing_bookings_leaves_no_confirmed_booking_behind() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    for round in 0..20 {
        let site = format!("racing-{round}");
        let slot = one_slot_site(&server, &site, 2_000).await;
        let mut booking = server.booking().await;
        let start = search_all(&mut booking, &site, "vax").await[0].start;
        let clients: Vec<_> = (0..16)
            .map(|client| {
                let (mut booking, slot) = (booking.clone(), slot.clone());
                tokio::spawn(async move {
                    let mut acknowledged = Vec::new();
                    for n in 0..100 {
                        let citizen = format!("r{round}-c{client}-{n}");
                        match booking.book(book_request(&slot, &citizen, &citizen)).await {
                            Ok(response) => {
                                acknowledged.push(response.into_inner().booking.unwrap())
                            }
                            Err(status) => {
                                assert_eq!(reason(&status).as_deref(), Some("SLOT_CLOSED"));
                                break;
                            }
                        }
                    }
                    acknowledged
                })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let closed = server
            .capacity()
            .await
            .close_slots(proto::CloseSlotsRequest {
                site_id: site.clone(),
                service_id: None,
                from: start,
                to: start.and_then(|t| at_s(t.seconds + 1)),
                reason: "closed mid-rush".into(),
                request_id: String::new(),
            })
            .await
            .expect("close")
            .into_inner();
        let mut acknowledged = 0;
        for client in clients {
            acknowledged += client.await.unwrap().len();
        }
        let exported: Vec<_> = export_all(server.channel().await)
            .await
            .into_iter()
            .filter(|b| b.site_id == site)
            .collect();
        assert!(
            acknowledged > 0 && acknowledged < 1_600,
            "round {round}: the closure must land mid-rush ({acknowledged} booked)"
        );
        assert_eq!(exported.len(), acknowledged, "round {round}");
        assert!(
            exported
                .iter()
                .all(|b| b.state == proto::BookingState::Cancelled as i32
                    && b.cancel_reason == "closed mid-rush"),
            "round {round}: a booking survived the closure"
        );
        assert_eq!(
            closed.cancelled_bookings as usize, acknowledged,
            "round {round}"
        );
        assert_eq!(site_stats(&server, &site).await.booked, 0);
    }
    server.stop().await;
}

/// Slots in the year 9000 are a typo or an attack: a schedule may reach at most
/// `schedule_days_ahead_max` days ahead, in a publication and in every import row.
/// And a region holds at most `slots_per_region_max` slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_future_schedules_and_overfull_regions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = prenota::config::Config::default();
    config.limits.slots_per_region_max = 10;
    let server = TestServer::start_with(dir.path(), config).await;
    let mut capacity = server.capacity().await;
    upsert_site(&mut capacity, "far", "lazio", "Europe/Rome").await;
    let far = "9000-01-01";
    let status = capacity
        .publish_schedule(publish_request(
            "far",
            "vax",
            (far, far),
            ("09:00", "10:00"),
            30,
            1,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["last_day"]);
    let status = import(&mut capacity, vec![row(7, "far", "Europe/Rome", far)], true)
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["rows[7].last_day"]);

    // 01:00-04:00 in 30-minute slots: 6 a day; the region holds at most 10.
    let day = day_ahead(5);
    import(
        &mut capacity,
        vec![row(2, "far", "Europe/Rome", &day)],
        false,
    )
    .await
    .expect("6 slots");
    let next = day_ahead(6);
    let status = import(
        &mut capacity,
        vec![row(2, "far", "Europe/Rome", &next)],
        true,
    )
    .await
    .unwrap_err();
    assert!(
        status.message().contains("slots_per_region_max"),
        "{status:?}"
    );
    // A moved site brings its slots: Veneto holds 6, Lazio's 6 cannot join them.
    let mut other = row(2, "other", "Europe/Rome", &day);
    other.site.as_mut().unwrap().region_id = "veneto".into();
    import(&mut capacity, vec![other], false)
        .await
        .expect("6 slots in Veneto");
    let mut moved = row(2, "far", "Europe/Rome", &day).site;
    moved.as_mut().unwrap().region_id = "veneto".into();
    let status = capacity
        .upsert_site(proto::UpsertSiteRequest {
            site: moved,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        status.message().contains("slots_per_region_max"),
        "{status:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_imports_release_columns_and_announces_the_opening_first() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let binary = env!("CARGO_BIN_EXE_prenota");
    let files = tempfile::tempdir().unwrap();
    let (d1, d2) = (day_ahead(20), day_ahead(21));
    let release_at = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let header = "site_id,name,region_id,time_zone,service_id,first_day,last_day,weekdays,opens,\
                  closes,slot_minutes,capacity_per_slot,release_id,release_at,queue_opens_at,\
                  admissions_per_minute,reserved_percent,reserve_released_hours_before_start";
    let good = format!(
        "{header}\n\
         a-site,A,umbria,Europe/Rome,vax,{d1},{d1},1-7,09:00,10:00,30,4,opening,{release_at},,,phone:25,24\n\
         b-site,B,umbria,Europe/Rome,vax,{d1},{d2},1-7,09:00,10:00,30,4,opening,{release_at},,,phone:25,24\n\
         c-site,C,umbria,Europe/Rome,vax,{d1},{d1},1-7,09:00,10:00,30,4,,,,,,\n"
    );
    let bad = good.replacen(",phone:25,24\nb-site", ",phone:25,24\nx-site", 1).replacen(
        &format!("x-site,B,umbria,Europe/Rome,vax,{d1},{d2},1-7,09:00,10:00,30,4,opening,{release_at},,,phone:25,24"),
        &format!("x-site,B,umbria,Europe/Rome,vax,{d1},{d2},1-7,09:00,10:00,30,4,opening,{release_at},,,phone:30,24"),
        1,
    );
    let (good_path, bad_path) = (files.path().join("good.csv"), files.path().join("bad.csv"));
    std::fs::write(&good_path, &good).unwrap();
    std::fs::write(&bad_path, bad).unwrap();
    let url = server.url();
    let run = |file: std::path::PathBuf| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(binary)
                .args([
                    "import".as_ref(),
                    file.as_os_str(),
                    "--server".as_ref(),
                    url.as_ref(),
                ])
                .output()
                .unwrap()
        })
    };

    // Rows of one release must agree, and every row must be good: nothing is applied
    // otherwise, not even the releases and their sites.
    let bad_row = files.path().join("bad-row.csv");
    std::fs::write(
        &bad_row,
        good.replacen(",30,4,opening", ",30,99999,opening", 1),
    )
    .unwrap();
    for (file, says) in [(bad_path, "differs"), (bad_row, "capacity_per_slot")] {
        let refused = run(file).await.unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success());
        assert!(stderr.contains(says), "{stderr}");
        let missing = server
            .capacity()
            .await
            .get_site_stats(proto::GetSiteStatsRequest {
                site_id: "a-site".into(),
            })
            .await
            .expect_err("nothing imported");
        assert_eq!(missing.code(), Code::NotFound);
        let release = server
            .capacity()
            .await
            .get_release(proto::GetReleaseRequest {
                release_id: "opening".into(),
            })
            .await;
        assert_eq!(release.unwrap_err().code(), Code::NotFound);
    }

    for _ in 0..2 {
        // Sending the same file again changes nothing.
        let imported = run(good_path.clone()).await.unwrap();
        let stdout = String::from_utf8_lossy(&imported.stdout);
        assert!(
            imported.status.success(),
            "{stdout} {}",
            String::from_utf8_lossy(&imported.stderr)
        );
        assert!(stdout.contains("release opening over 2 sites"), "{stdout}");
        assert!(stdout.contains("imported 3 rows"), "{stdout}");
    }
    let release = server
        .capacity()
        .await
        .get_release(proto::GetReleaseRequest {
            release_id: "opening".into(),
        })
        .await
        .expect("announced")
        .into_inner()
        .release
        .unwrap();
    assert_eq!(release.site_ids, ["a-site", "b-site"]);
    assert_eq!(release.reserved_percent["phone"], 25);
    assert_eq!(release.reserve_released_hours_before_start, 24);
    let slots = search_all(&mut server.booking().await, "b-site", "vax").await;
    assert_eq!(slots.len(), 4, "two days of two slots");
    assert!(slots.iter().all(|slot| slot.release_at.is_some()));
    let open = search_all(&mut server.booking().await, "c-site", "vax").await;
    assert!(open.iter().all(|slot| slot.release_at.is_none()));
    let status = server
        .booking()
        .await
        .book(book_request(&slots[0].slot_id, "early", "e1"))
        .await
        .expect_err("not released");
    assert_eq!(reason(&status).as_deref(), Some("SLOT_NOT_RELEASED"));
    server.stop().await;
}
