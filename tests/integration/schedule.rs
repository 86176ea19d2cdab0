//! Publishing schedules over gRPC: the local-time rules of PRODUCT.md across the
//! 2027 daylight-saving changes in Europe/Rome, idempotent republishing, pagination.

use crate::common;

use chrono::{NaiveDate, TimeZone};
use chrono_tz::Europe::Rome;
use common::*;
use prenota::proto;

fn rome_day_bounds(day: &str) -> (i64, i64) {
    let date = NaiveDate::parse_from_str(day, "%Y-%m-%d").unwrap();
    let start = Rome
        .from_local_datetime(&date.and_hms_opt(0, 0, 0).unwrap())
        .unwrap();
    (start.timestamp(), start.timestamp() + 30 * 3_600)
}

async fn local_starts(server: &TestServer, day: &str) -> Vec<proto::Slot> {
    let (from, to) = rome_day_bounds(day);
    let slots = search_range(&mut server.booking().await, "rome-dst", "vax", from, to).await;
    slots
        .into_iter()
        .filter(|s| s.local_start.starts_with(day))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rome_schedule_across_both_dst_changes_of_2027() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut capacity = server.capacity().await;
    upsert_site(&mut capacity, "rome-dst", "lazio", "Europe/Rome").await;

    // Opening hours 01:00–04:00 every day cross the 02:00–03:00 hour on both Sundays.
    let spring = publish_request(
        "rome-dst",
        "vax",
        ("2027-03-27", "2027-03-29"),
        ("01:00", "04:00"),
        30,
        3,
    );
    let response = capacity
        .publish_schedule(spring.clone())
        .await
        .unwrap()
        .into_inner();
    // 6 slots a day, but 2027-03-28 loses 02:00 and 02:30 to the gap.
    assert_eq!(response.slots_created, 6 + 4 + 6);
    assert_eq!(response.total_capacity, 16 * 3);

    let spring_day: Vec<String> = local_starts(&server, "2027-03-28")
        .await
        .into_iter()
        .map(|s| s.local_start)
        .collect();
    assert_eq!(
        spring_day,
        [
            "2027-03-28T01:00:00+01:00",
            "2027-03-28T01:30:00+01:00",
            "2027-03-28T03:00:00+02:00",
            "2027-03-28T03:30:00+02:00",
        ]
    );

    let autumn = publish_request(
        "rome-dst",
        "vax",
        ("2027-10-31", "2027-10-31"),
        ("01:00", "04:00"),
        30,
        3,
    );
    let response = capacity
        .publish_schedule(autumn.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.slots_created, 6,
        "the repeated hour produces no second slot"
    );
    let autumn_day = local_starts(&server, "2027-10-31").await;
    let starts: Vec<&str> = autumn_day.iter().map(|s| s.local_start.as_str()).collect();
    assert_eq!(
        starts,
        [
            "2027-10-31T01:00:00+02:00",
            "2027-10-31T01:30:00+02:00",
            "2027-10-31T02:00:00+02:00",
            "2027-10-31T02:30:00+02:00",
            "2027-10-31T03:00:00+01:00",
            "2027-10-31T03:30:00+01:00",
        ]
    );
    for slot in &autumn_day {
        assert_eq!(slot.time_zone, "Europe/Rome");
        assert_eq!(slot.capacity, 3);
        // A slot ends slot_minutes of real time after it starts, even across the fold.
        let (start, end) = (slot.start.unwrap().seconds, slot.end.unwrap().seconds);
        assert_eq!(end - start, 30 * 60);
    }
    // 02:30 CEST (the earlier instant) ends at 02:00 CET wall-clock: still 30 real minutes.
    assert_eq!(
        autumn_day[4].start.unwrap().seconds - autumn_day[3].start.unwrap().seconds,
        90 * 60,
        "between 02:30 CEST and 03:00 CET lie 90 real minutes"
    );

    // Republishing creates and updates nothing.
    for request in [spring, autumn] {
        let again = capacity
            .publish_schedule(request)
            .await
            .unwrap()
            .into_inner();
        assert_eq!((again.slots_created, again.slots_updated), (0, 0));
    }
    let stats = site_stats(&server, "rome-dst").await;
    assert_eq!(stats.slots, 22);
    let spring_stats = stats.by_day.iter().find(|d| d.day == "2027-03-28").unwrap();
    assert_eq!((spring_stats.slots, spring_stats.capacity), (4, 12));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republishing_with_more_capacity_updates_slots() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot_id = one_slot_site(&server, "grow", 1).await;
    let mut booking = server.booking().await;
    booking
        .book(book_request(&slot_id, "a", "a"))
        .await
        .unwrap();

    let mut capacity = server.capacity().await;
    let day = day_ahead(30);
    let grown = capacity
        .publish_schedule(publish_request(
            "grow",
            "vax",
            (&day, &day),
            ("10:00", "10:30"),
            30,
            3,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((grown.slots_created, grown.slots_updated), (0, 1));
    assert_eq!(
        search_all(&mut booking, "grow", "vax").await[0].remaining,
        2
    );

    // Lowering below what is booked is refused, whole, and changes nothing.
    capacity
        .publish_schedule(publish_request(
            "grow",
            "vax",
            (&day, &day),
            ("10:00", "10:30"),
            30,
            2,
        ))
        .await
        .unwrap();
    booking
        .book(book_request(&slot_id, "b", "b"))
        .await
        .unwrap();
    let refused = capacity
        .publish_schedule(publish_request(
            "grow",
            "vax",
            (&day, &day),
            ("10:00", "10:30"),
            30,
            1,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&refused).as_deref(), Some("CAPACITY_BELOW_BOOKED"));
    let slot = &search_all(&mut booking, "grow", "vax").await[0];
    assert_eq!((slot.capacity, slot.remaining), (2, 0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_pages_cover_a_region_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut capacity = server.capacity().await;
    let day = day_ahead(10);
    for site in ["north-b", "north-a"] {
        upsert_site(&mut capacity, site, "north", "Europe/Amsterdam").await;
        capacity
            .publish_schedule(publish_request(
                site,
                "vax",
                (&day, &day),
                ("09:00", "12:00"),
                20,
                2,
            ))
            .await
            .unwrap();
    }
    let mut booking = server.booking().await;
    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = booking
            .search_slots(proto::SearchSlotsRequest {
                scope: Some(proto::search_slots_request::Scope::RegionId("north".into())),
                service_id: "vax".into(),
                page_size: 4,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.slots.len() <= 4);
        seen.extend(page.slots.into_iter().map(|s| s.slot_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen.len(), 18);
    assert_eq!(pages, 5);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 18, "no slot twice");
    assert!(seen[0].starts_with("north-a/"), "sites in id order");
    assert!(seen[17].starts_with("north-b/"));
    server.stop().await;
}

/// A schedule republished with another slot length once added its slots beside the old
/// ones (08:30–09:00 beside 08:20–08:40 and 08:40–09:00: an hour's desks offered
/// twice); now it is refused while the old slots are open, and published once they are
/// closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_republished_with_another_slot_length_never_overlaps_open_slots() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut capacity = server.capacity().await;
    upsert_site(&mut capacity, "relength", "lazio", "Europe/Rome").await;
    let day = day_ahead(20);
    let publish = |minutes| {
        publish_request(
            "relength",
            "vax",
            (&day, &day),
            ("09:00", "10:00"),
            minutes,
            2,
        )
    };
    capacity.publish_schedule(publish(30)).await.unwrap();
    let status = capacity.publish_schedule(publish(20)).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["slot_minutes"]);
    let (from, to) = (
        chrono::Utc::now().timestamp(),
        chrono::Utc::now().timestamp() + 40 * 86_400,
    );
    let slots = search_range(&mut server.booking().await, "relength", "vax", from, to).await;
    assert_eq!(slots.len(), 2, "nothing of the refused schedule");
    capacity
        .close_slots(proto::CloseSlotsRequest {
            site_id: "relength".into(),
            service_id: Some("vax".into()),
            from: at_s(from),
            to: at_s(to),
            reason: "new slot length".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    capacity.publish_schedule(publish(20)).await.unwrap();
    let slots = search_range(&mut server.booking().await, "relength", "vax", from, to).await;
    let open: Vec<_> = slots.iter().filter(|slot| !slot.closed).collect();
    assert_eq!(
        open.len(),
        2,
        "09:20 and 09:40; the closed 09:00 stays closed"
    );
    // Starts 09:00, 09:20, 09:30 (the old, closed), 09:40.
    let closed: Vec<bool> = slots.iter().map(|slot| slot.closed).collect();
    assert_eq!(closed, [true, false, true, false]);
    let reopen = |slot: &proto::Slot| proto::SetSlotCapacityRequest {
        slot_id: slot.slot_id.clone(),
        capacity: 2,
        request_id: String::new(),
    };
    // The closed 09:00 took the schedule's 20 minutes: it reopens beside 09:20...
    let reopened = capacity.set_slot_capacity(reopen(&slots[0])).await;
    reopened.expect("09:00 reopened at 20 minutes");
    // ...the closed 30-minute 09:30, no slot of the schedule, would overlap 09:20.
    let status = capacity
        .set_slot_capacity(reopen(&slots[2]))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["slot_id"]);
    server.stop().await;
}
