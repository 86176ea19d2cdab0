//! Bad input gets INVALID_ARGUMENT with the offending field named, and changes nothing.

use crate::common;

use common::*;
use prenota::proto;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sites_and_schedules_are_refused_field_by_field() {
    let other_weekday = |day: &str| {
        use chrono::Datelike;
        let date = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").unwrap();
        date.weekday().number_from_monday() % 7 + 1
    };
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut capacity = server.capacity().await;

    let bad_sites = [
        ("Mars/Olympus", "site-x", "site.time_zone"),
        ("", "site-x", "site.time_zone"),
        ("Europe/Rome", "", "site.site_id"),
        ("Europe/Rome", "bad id", "site.site_id"),
    ];
    for (zone, site_id, field) in bad_sites {
        let status = capacity
            .upsert_site(proto::UpsertSiteRequest {
                site: Some(proto::Site {
                    site_id: site_id.into(),
                    name: "x".into(),
                    region_id: "r".into(),
                    time_zone: zone.into(),
                }),
                request_id: "x".into(),
            })
            .await
            .unwrap_err();
        assert!(
            violated_fields(&status).contains(&field.to_string()),
            "{field}: {status:?}"
        );
    }
    let status = capacity
        .upsert_site(proto::UpsertSiteRequest {
            site: None,
            request_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["site"]);
    let missing = capacity
        .get_site_stats(proto::GetSiteStatsRequest {
            site_id: "site-x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "no bad site was stored");
    assert_eq!(reason(&missing).as_deref(), Some("SITE_NOT_FOUND"));

    upsert_site(&mut capacity, "good", "r", "Europe/Rome").await;
    let day = day_ahead(20);
    let good = publish_request("good", "vax", (&day, &day), ("09:00", "12:00"), 30, 2);
    let cases: Vec<(proto::PublishScheduleRequest, &str)> = vec![
        (
            proto::PublishScheduleRequest {
                opening_hours: vec![proto::OpeningHours {
                    weekday: 1,
                    opens: "12:00".into(),
                    closes: "09:00".into(),
                }],
                ..good.clone()
            },
            "opening_hours[0].closes",
        ),
        (
            proto::PublishScheduleRequest {
                slot_minutes: 0,
                ..good.clone()
            },
            "slot_minutes",
        ),
        (
            proto::PublishScheduleRequest {
                service_id: String::new(),
                ..good.clone()
            },
            "service_id",
        ),
        (
            proto::PublishScheduleRequest {
                site_id: String::new(),
                ..good.clone()
            },
            "site_id",
        ),
        (
            proto::PublishScheduleRequest {
                first_day: "2027-02-30".into(),
                ..good.clone()
            },
            "first_day",
        ),
        (
            proto::PublishScheduleRequest {
                first_day: "2027-01-01".into(),
                last_day: "2127-01-01".into(),
                ..good.clone()
            },
            "last_day",
        ),
        (
            proto::PublishScheduleRequest {
                capacity_per_slot: 2_147_483_648,
                ..good.clone()
            },
            "capacity_per_slot",
        ),
        (
            proto::PublishScheduleRequest {
                opening_hours: vec![],
                ..good.clone()
            },
            "opening_hours",
        ),
        // Valid hours that make no slot (the day is not their weekday): a mistake, as
        // an import's row that makes nothing is (an outside test: answered OK before).
        (
            proto::PublishScheduleRequest {
                opening_hours: vec![proto::OpeningHours {
                    weekday: other_weekday(&day),
                    opens: "09:00".into(),
                    closes: "12:00".into(),
                }],
                ..good.clone()
            },
            "opening_hours",
        ),
    ];
    for (request, field) in cases {
        let status = capacity.publish_schedule(request).await.unwrap_err();
        assert!(
            violated_fields(&status).contains(&field.to_string()),
            "{field}: {status:?}"
        );
    }
    let stats = site_stats(&server, "good").await;
    assert_eq!(stats.slots, 0, "no refused schedule created a slot");
    let unknown_site = capacity
        .publish_schedule(proto::PublishScheduleRequest {
            site_id: "nowhere".into(),
            ..good
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&unknown_site).as_deref(), Some("SITE_NOT_FOUND"));
    // Hundreds of bad list items: the first violations, and one saying how many more
    // (all of them once made the answer's trailer too large for the client).
    let hours = proto::OpeningHours {
        weekday: 9,
        opens: "09:00".into(),
        closes: "10:00".into(),
    };
    let status = capacity
        .publish_schedule(proto::PublishScheduleRequest {
            opening_hours: vec![hours; 1_000],
            ..publish_request("good", "vax", (&day, &day), ("09:00", "12:00"), 30, 2)
        })
        .await
        .unwrap_err();
    let violations = tonic_types::StatusExt::get_details_bad_request(&status);
    let violations = violations.unwrap().field_violations;
    assert!((2..200).contains(&violations.len()), "{}", violations.len());
    assert_eq!(violations[0].field, "opening_hours");
    let last = violations.last().unwrap();
    assert!(last.description.contains("more violations"), "{last:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bookings_and_searches_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot_id = one_slot_site(&server, "v", 3).await;
    let mut booking = server.booking().await;

    let cases = [
        (book_request("", "citizen", "r1"), "slot_id"),
        (book_request("no-such-format", "citizen", "r1"), "slot_id"),
        (book_request(&slot_id, "", "r1"), "citizen_id"),
        (book_request(&slot_id, "has space", "r1"), "citizen_id"),
        (book_request(&slot_id, &"x".repeat(129), "r1"), "citizen_id"),
        (book_request(&slot_id, "citizen", ""), "request_id"),
        (book_request(&slot_id, "citizen", "bell\u{7}"), "request_id"),
    ];
    for (request, field) in cases {
        let status = booking.book(request).await.unwrap_err();
        assert!(
            violated_fields(&status).contains(&field.to_string()),
            "{field}: {status:?}"
        );
    }
    let unknown = booking
        .book(book_request("v/vax/1", "citizen", "r1"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(reason(&unknown).as_deref(), Some("SLOT_NOT_FOUND"));

    let search = |page_size: i32, from: i64, to: i64| proto::SearchSlotsRequest {
        scope: Some(proto::search_slots_request::Scope::SiteId("v".into())),
        service_id: "vax".into(),
        from: at_s(from),
        to: at_s(to),
        page_size,
        ..Default::default()
    };
    let now = chrono::Utc::now().timestamp();
    for (request, field) in [
        (search(1_000_000, now, now + 86_400), "page_size"),
        (search(-1, now, now + 86_400), "page_size"),
        (search(10, now, now - 1), "to"),
        (search(10, now, now + 400 * 86_400), "to"),
        (search(10, -5, now), "from"),
        (search(10, now, i64::MAX), "to"),
    ] {
        let status = booking.search_slots(request).await.unwrap_err();
        assert!(
            violated_fields(&status).contains(&field.to_string()),
            "{field}: {status:?}"
        );
    }
    let no_scope = booking
        .search_slots(proto::SearchSlotsRequest {
            service_id: "vax".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&no_scope), ["site_id"]);

    let bad_id = booking
        .get_booking(proto::GetBookingRequest {
            booking_id: "not-hex".into(),
            citizen_id: "someone".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&bad_id), ["booking_id"]);
    let unknown_booking = booking
        .get_booking(proto::GetBookingRequest {
            booking_id: "0".repeat(32),
            citizen_id: "someone".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        reason(&unknown_booking).as_deref(),
        Some("BOOKING_NOT_FOUND")
    );

    assert_eq!(
        site_stats(&server, "v").await.booked,
        0,
        "nothing was booked"
    );
    assert!(export_all(server.channel().await).await.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_reschedules_closures_and_lists_name_every_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut booking = server.booking().await;
    let mut capacity = server.capacity().await;

    let status = booking
        .hold_slot(proto::HoldSlotRequest {
            ttl_seconds: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violated_fields(&status),
        ["slot_id", "citizen_id", "request_id", "ttl_seconds"]
    );

    let status = booking
        .reschedule_booking(proto::RescheduleBookingRequest {
            booking_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["booking_id", "citizen_id", "new_slot_id", "request_id"]
    );

    let status = booking
        .book(proto::BookRequest {
            hold_id: Some("not-a-hold".into()),
            ..book_request("a/b/1", "c", "r")
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["hold_id"]);

    let status = booking
        .list_citizen_bookings(proto::ListCitizenBookingsRequest {
            citizen_id: String::new(),
            service_id: Some("bad id".into()),
            page_size: -1,
            page_token: "zz".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["citizen_id", "service_id", "page_size", "page_token"]
    );

    let status = capacity
        .close_slots(proto::CloseSlotsRequest {
            reason: "\u{7}".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["site_id", "from", "to", "reason"]
    );

    let status = capacity
        .set_slot_capacity(proto::SetSlotCapacityRequest {
            slot_id: "x".into(),
            capacity: 1_000_000,
            request_id: "r".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["slot_id", "capacity"]);
    server.stop().await;
}
