//! Open data on a real server: `GetAvailabilitySummary` adds up the same counts as
//! `GetSiteStats`, pages through every row, names no person, and answers anonymous
//! callers only when `[server] open_data = true`; `prenota open-data` writes it out.

use crate::common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;
use prenota::config::{token_sha256, ConfigFile};
use prenota::proto;
use prenota::proto::open_data_service_client::OpenDataServiceClient;
use tonic::transport::Channel;
use tonic::Code;

const FRONTEND: &str = "frontend-token-0123456789";
const ADMIN: &str = "admin-token-0123456789abcdef";

fn config(open_data: bool) -> prenota::config::Config {
    let text = format!(
        "[server]\nopen_data = {open_data}\n\n[[tokens]]\nname = \"web\"\nsha256 = \"{}\"\nrole = \"frontend\"\n\n[[tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nrole = \"admin\"\n",
        hex::encode(token_sha256(FRONTEND)),
        hex::encode(token_sha256(ADMIN)),
    );
    toml::from_str::<ConfigFile>(&text)
        .unwrap()
        .check()
        .expect("a valid configuration")
}

fn summary_request(page_size: i32, page_token: String) -> proto::GetAvailabilitySummaryRequest {
    proto::GetAvailabilitySummaryRequest {
        region_id: None,
        service_id: None,
        first_day: day_ahead(29),
        last_day: day_ahead(33),
        page_size,
        page_token,
    }
}

/// Every row, following page tokens.
async fn all_rows(
    client: &mut OpenDataServiceClient<
        tonic::service::interceptor::InterceptedService<Channel, Bearer>,
    >,
    page_size: i32,
) -> Vec<proto::AvailabilityRow> {
    let (mut rows, mut token) = (Vec::new(), String::new());
    loop {
        let page = client
            .get_availability_summary(summary_request(page_size, token))
            .await
            .expect("summary")
            .into_inner();
        rows.extend(page.rows);
        if page.next_page_token.is_empty() {
            return rows;
        }
        token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_adds_up_what_site_stats_counts_and_names_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), config(false)).await;
    let channel = server.channel().await;
    let mut capacity = proto::capacity_service_client::CapacityServiceClient::with_interceptor(
        channel.clone(),
        Bearer(Some(ADMIN)),
    );
    let mut booking = proto::booking_service_client::BookingServiceClient::with_interceptor(
        channel.clone(),
        Bearer(Some(FRONTEND)),
    );
    for site in ["od-a", "od-b"] {
        capacity
            .upsert_site(proto::UpsertSiteRequest {
                site: Some(proto::Site {
                    site_id: site.into(),
                    name: format!("Centro {site}"),
                    region_id: "lazio".into(),
                    time_zone: "Europe/Rome".into(),
                }),
                request_id: String::new(),
            })
            .await
            .unwrap();
        for service in ["vax", "card"] {
            let (first, last) = (day_ahead(30), day_ahead(32));
            let request =
                publish_request(site, service, (&first, &last), ("09:00", "11:00"), 30, 3);
            capacity.publish_schedule(request).await.unwrap();
        }
    }
    let now = chrono::Utc::now().timestamp();
    let search = proto::SearchSlotsRequest {
        scope: Some(proto::search_slots_request::Scope::SiteId("od-a".into())),
        service_id: "vax".into(),
        from: at_s(now),
        to: at_s(now + 40 * 86_400),
        page_size: 100,
        ..Default::default()
    };
    let slots = booking
        .search_slots(search)
        .await
        .unwrap()
        .into_inner()
        .slots;
    assert_eq!(slots.len(), 12);
    for (n, slot) in slots.iter().take(5).enumerate() {
        let citizen = format!("citizen-{n}");
        booking
            .book(book_request(&slot.slot_id, &citizen, &citizen))
            .await
            .unwrap();
    }
    booking
        .hold_slot(proto::HoldSlotRequest {
            slot_id: slots[6].slot_id.clone(),
            citizen_id: "holder".into(),
            request_id: "hold".into(),
            ttl_seconds: 300,
        })
        .await
        .unwrap();
    capacity
        .close_slots(proto::CloseSlotsRequest {
            site_id: "od-a".into(),
            service_id: Some("vax".into()),
            from: slots[11].start,
            to: slots[11].end,
            reason: "maintenance".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();

    let mut open_data =
        OpenDataServiceClient::with_interceptor(channel.clone(), Bearer(Some(FRONTEND)));
    let rows = all_rows(&mut open_data, 0).await;
    assert_eq!(rows.len(), 2 * 2 * 3, "sites × services × days with slots");
    // Paging gives the same rows, in the same order (each page read at its own time).
    assert!(rows.iter().all(|row| row.as_of.is_some()));
    let without_time = |rows: Vec<proto::AvailabilityRow>| -> Vec<proto::AvailabilityRow> {
        let timeless = |row| proto::AvailabilityRow { as_of: None, ..row };
        rows.into_iter().map(timeless).collect()
    };
    assert_eq!(
        without_time(all_rows(&mut open_data, 5).await),
        without_time(rows.clone())
    );

    for site in ["od-a", "od-b"] {
        let stats = capacity
            .get_site_stats(proto::GetSiteStatsRequest {
                site_id: site.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut by_day: BTreeMap<String, (u32, u64, u64, u64, u32, u64)> = BTreeMap::new();
        for row in rows.iter().filter(|row| row.site_id == site) {
            assert_eq!(row.site_name, format!("Centro {site}"));
            assert_eq!(row.remaining, row.capacity - row.booked - row.held);
            let day = by_day.entry(row.day.clone()).or_default();
            day.0 += row.slots;
            day.1 += row.capacity;
            day.2 += row.booked;
            day.3 += row.held;
            day.4 += row.slots_closed;
            day.5 += row.remaining;
        }
        let from_stats: BTreeMap<String, (u32, u64, u64, u64, u32, u64)> = stats
            .by_day
            .iter()
            .map(|d| {
                let remaining = d.capacity - d.booked - d.held;
                let totals = (
                    d.slots,
                    d.capacity,
                    d.booked,
                    d.held,
                    d.slots_closed,
                    remaining,
                );
                (d.day.clone(), totals)
            })
            .collect();
        assert_eq!(
            by_day, from_stats,
            "{site}: the summary equals GetSiteStats"
        );
    }
    let booked: u64 = rows.iter().map(|row| row.booked).sum();
    assert_eq!(booked, 5);

    // Never a person: no booking, hold or citizen id anywhere in the answer.
    let text = format!("{rows:?}");
    for secret in ["citizen-", "holder", "hold_id", "booking_id"] {
        assert!(!text.contains(secret), "{secret} leaked into open data");
    }

    // Anonymous callers are refused unless open_data is on.
    let mut anonymous = OpenDataServiceClient::with_interceptor(channel, Bearer(None));
    let status = anonymous
        .get_availability_summary(summary_request(0, String::new()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = open_data
        .get_availability_summary(proto::GetAvailabilitySummaryRequest {
            first_day: "2027-02-30".into(),
            last_day: "2030-01-01".into(),
            page_token: "nonsense".into(),
            ..summary_request(0, String::new())
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["first_day", "page_token"]);
    // A page token of another question (another service, another region) is refused,
    // not read as a place to go on from.
    let first = open_data
        .get_availability_summary(summary_request(1, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert!(first.next_page_token.starts_with("od-a/card/"), "{first:?}");
    for (region_id, service_id) in [(None, Some("vax")), (Some("elsewhere"), None)] {
        let status = open_data
            .get_availability_summary(proto::GetAvailabilitySummaryRequest {
                region_id: region_id.map(String::from),
                service_id: service_id.map(String::from),
                ..summary_request(1, first.next_page_token.clone())
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["page_token"]);
    }

    // The CLI writes the same rows, as CSV and as JSON Lines.
    for (format, lines) in [("csv", rows.len() + 1), ("json", rows.len())] {
        let output = Command::new(env!("CARGO_BIN_EXE_prenota"))
            .args(["open-data", "--server", &server.url(), "--token", FRONTEND])
            .args(["--first-day", &day_ahead(29), "--last-day", &day_ahead(33)])
            .args(["--format", format])
            .output()
            .unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(stdout.lines().count(), lines, "{stdout}");
        if format == "json" {
            let first: serde_json::Value =
                serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
            assert_eq!(first["site_id"], "od-a");
            assert!(first["capacity"].is_u64(), "{first}");
            assert!(first["reserved"].is_u64(), "{first}");
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_open_data_on_anyone_may_read_the_summary_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(true);
    config.limits.open_data_anonymous_requests_per_s = 2;
    let server = TestServer::start_with(dir.path(), config).await;
    let channel = server.channel().await;
    let mut anonymous = OpenDataServiceClient::with_interceptor(channel.clone(), Bearer(None));
    for _ in 0..2 {
        anonymous
            .get_availability_summary(summary_request(0, String::new()))
            .await
            .expect("open data needs no token");
    }
    // All anonymous callers share one quota.
    let status = anonymous
        .get_availability_summary(summary_request(0, String::new()))
        .await
        .expect_err("past open_data_anonymous_requests_per_s");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status).as_deref(), Some("RATE_LIMITED"));
    // A wrong token is still refused, and the other services still need one.
    let mut forged =
        OpenDataServiceClient::with_interceptor(channel.clone(), Bearer(Some("forged")));
    let status = forged
        .get_availability_summary(summary_request(0, String::new()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut booking = proto::booking_service_client::BookingServiceClient::with_interceptor(
        channel,
        Bearer(None),
    );
    let status = booking
        .list_citizen_bookings(proto::ListCitizenBookingsRequest {
            citizen_id: "someone".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    server.stop().await;
}

/// A call looks at a bounded number of site-days: with a tiny budget the pages end
/// early, and following their tokens still gives every row once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_call_ends_its_page_early_and_the_tokens_cover_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(false);
    config.limits.search_slots_scanned_max = 2;
    let server = TestServer::start_with(dir.path(), config).await;
    let channel = server.channel().await;
    let mut capacity = proto::capacity_service_client::CapacityServiceClient::with_interceptor(
        channel.clone(),
        Bearer(Some(ADMIN)),
    );
    for site in ["b-1", "b-2", "b-3"] {
        capacity
            .upsert_site(proto::UpsertSiteRequest {
                site: Some(proto::Site {
                    site_id: site.into(),
                    name: site.into(),
                    region_id: "r".into(),
                    time_zone: "Etc/UTC".into(),
                }),
                request_id: String::new(),
            })
            .await
            .unwrap();
        let (first, last) = (day_ahead(30), day_ahead(32));
        let request = publish_request(site, "vax", (&first, &last), ("09:00", "10:00"), 30, 2);
        capacity.publish_schedule(request).await.unwrap();
    }
    let mut open_data = OpenDataServiceClient::with_interceptor(channel, Bearer(Some(FRONTEND)));
    let rows = all_rows(&mut open_data, 0).await;
    let keys: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.site_id.clone(), r.day.clone()))
        .collect();
    let mut expected = Vec::new();
    for site in ["b-1", "b-2", "b-3"] {
        for days in 30..=32 {
            expected.push((site.to_string(), day_ahead(days)));
        }
    }
    assert_eq!(keys, expected);
    server.stop().await;
}
