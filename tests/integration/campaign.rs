//! Campaigns (PRODUCT.md part C) on a real server: pre-registration, waves, offers that
//! are holds (never more offers than places), accept, decline, expiry and cancellation
//! handing each freed place to the next waiting registration, preferences, the
//! last-minute window, and matching cut by a kill -9.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::child::ChildServer;
use common::*;
use futures::StreamExt;
use prenota::config::Config;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::{self, RegistrationState};
use prenota::service::Clock;
use prost_types::Timestamp;
use tonic::transport::Channel;
use tonic::Code;

fn at_ms(unix_ms: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: unix_ms.div_euclid(1_000),
        nanos: 0,
    })
}

fn wave(id: &str, opens_at_ms: i64, groups: &[&str]) -> proto::Wave {
    proto::Wave {
        wave_id: id.into(),
        opens_at: at_ms(opens_at_ms),
        priority_groups: groups.iter().map(|g| g.to_string()).collect(),
        ..Default::default()
    }
}

fn campaign(id: &str, region: &str, waves: Vec<proto::Wave>) -> proto::Campaign {
    proto::Campaign {
        campaign_id: id.into(),
        service_id: "vax".into(),
        region_id: region.into(),
        waves,
        ..Default::default()
    }
}

async fn upsert(
    channel: &Channel,
    campaign: proto::Campaign,
) -> Result<proto::Campaign, tonic::Status> {
    CapacityServiceClient::new(channel.clone())
        .upsert_campaign(proto::UpsertCampaignRequest {
            campaign: Some(campaign),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner().campaign.expect("a campaign"))
}

async fn stats(channel: &Channel, id: &str) -> proto::GetCampaignStatsResponse {
    CapacityServiceClient::new(channel.clone())
        .get_campaign_stats(proto::GetCampaignStatsRequest {
            campaign_id: id.into(),
        })
        .await
        .expect("stats")
        .into_inner()
}

/// The counts, checked to be the same at the top level (PRODUCT.md's shape) and in
/// `counts`.
fn counts(stats: &proto::GetCampaignStatsResponse) -> proto::RegistrationCounts {
    let counts = stats.counts.expect("counts");
    let top = proto::RegistrationCounts {
        registered: stats.registered,
        waiting: stats.waiting,
        offered: stats.offered,
        booked: stats.booked,
        exhausted: stats.exhausted,
        withdrawn: stats.withdrawn,
    };
    assert_eq!(top, counts, "the top-level counts are the same as `counts`");
    counts
}

fn register_request(campaign: &str, citizen: &str, groups: &[&str]) -> proto::PreRegisterRequest {
    proto::PreRegisterRequest {
        campaign_id: campaign.into(),
        citizen_id: citizen.into(),
        priority_groups: groups.iter().map(|g| g.to_string()).collect(),
        request_id: format!("register-{citizen}"),
        ..Default::default()
    }
}

async fn register(channel: &Channel, request: proto::PreRegisterRequest) -> proto::Registration {
    BookingServiceClient::new(channel.clone())
        .pre_register(request)
        .await
        .expect("registered")
        .into_inner()
        .registration
        .expect("a registration")
}

/// Registers every citizen, 32 at a time.
async fn register_all(channel: &Channel, campaign: &str, citizens: &[(String, &str)]) {
    futures::stream::iter(citizens.iter().cloned())
        .for_each_concurrent(32, |(citizen, group)| async move {
            register(channel, register_request(campaign, &citizen, &[group])).await;
        })
        .await;
}

async fn registration(channel: &Channel, campaign: &str, citizen: &str) -> proto::Registration {
    BookingServiceClient::new(channel.clone())
        .get_registration(proto::GetRegistrationRequest {
            campaign_id: campaign.into(),
            citizen_id: citizen.into(),
        })
        .await
        .expect("a registration")
        .into_inner()
        .registration
        .expect("a registration")
}

async fn registrations(
    channel: &Channel,
    campaign: &str,
    citizens: &[String],
) -> Vec<proto::Registration> {
    futures::stream::iter(citizens.iter())
        .map(|citizen| registration(channel, campaign, citizen))
        .buffered(32)
        .collect()
        .await
}

async fn accept(
    channel: &Channel,
    campaign: &str,
    citizen: &str,
) -> Result<proto::Booking, tonic::Status> {
    BookingServiceClient::new(channel.clone())
        .accept_offer(proto::AcceptOfferRequest {
            campaign_id: campaign.into(),
            citizen_id: citizen.into(),
            request_id: format!("accept-{citizen}"),
            hold_id: String::new(),
        })
        .await
        .map(|r| r.into_inner().booking.expect("a booking"))
}

async fn decline(channel: &Channel, campaign: &str, citizen: &str, n: u32) -> proto::Registration {
    BookingServiceClient::new(channel.clone())
        .decline_offer(proto::DeclineOfferRequest {
            campaign_id: campaign.into(),
            citizen_id: citizen.into(),
            request_id: format!("decline-{citizen}-{n}"),
            hold_id: String::new(),
        })
        .await
        .expect("declined")
        .into_inner()
        .registration
        .expect("a registration")
}

/// Polls until `citizen` has an offer; fails after `within`.
async fn offered_within(
    channel: &Channel,
    campaign: &str,
    citizen: &str,
    within: Duration,
) -> proto::Offer {
    let started = Instant::now();
    loop {
        let registration = registration(channel, campaign, citizen).await;
        if registration.state() == RegistrationState::Offered {
            return registration
                .offer
                .expect("an offered registration has its offer");
        }
        assert!(
            started.elapsed() < within,
            "{citizen} had no offer after {within:?}: {registration:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn state_of(registrations: &[proto::Registration]) -> Vec<RegistrationState> {
    registrations.iter().map(|r| r.state()).collect()
}

/// Registering again returns the registration, as a retry (the same request id) or a
/// second tap (another), while offered and while waiting; the server answers on. (A
/// child process: a server that deadlocks cannot take the test's runtime with it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_again_returns_the_registration() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(dir.path());
    let channel = connect(&server.url).await;
    utc_site_on(
        channel.clone(),
        ("again", "liguria"),
        10,
        ("09:00", "09:30"),
        1,
    )
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    let definition = campaign("again", "liguria", vec![wave("all", now - 1_000, &[])]);
    upsert(&channel, definition).await.expect("campaign");
    let offered = register(&channel, register_request("again", "a-0", &[])).await;
    offered_within(&channel, "again", "a-0", Duration::from_secs(2)).await;
    let waiting = register(&channel, register_request("again", "a-1", &[])).await;
    for (citizen, first) in [("a-0", &offered), ("a-1", &waiting)] {
        for request_id in [first_request_id(citizen), "another".to_string()] {
            let request = proto::PreRegisterRequest {
                request_id,
                ..register_request("again", citizen, &[])
            };
            let mut client = BookingServiceClient::new(channel.clone());
            let again = tokio::time::timeout(Duration::from_secs(10), client.pre_register(request))
                .await
                .expect("answered");
            let again = again
                .expect("registered")
                .into_inner()
                .registration
                .unwrap();
            assert_eq!(again.registration_id, first.registration_id);
        }
    }
    let states = [
        registration(&channel, "again", "a-0").await.state(),
        registration(&channel, "again", "a-1").await.state(),
    ];
    assert_eq!(
        states,
        [RegistrationState::Offered, RegistrationState::Waiting]
    );
    server.terminate();
}

/// A withdrawal sent together with a decline of the same offer withdraws the
/// registration whichever lands first (it once answered NO_OFFER and did nothing when
/// the decline had taken the offer's hold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_racing_a_decline_withdraws() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let channel = server.channel().await;
    utc_site_on(
        channel.clone(),
        ("race", "molise"),
        10,
        ("09:00", "09:30"),
        12,
    )
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    let definition = campaign("race", "molise", vec![wave("all", now - 1_000, &[])]);
    upsert(&channel, definition).await.expect("campaign");
    let citizens: Vec<String> = (0..12).map(|i| format!("race-{i}")).collect();
    for citizen in &citizens {
        register(&channel, register_request("race", citizen, &[])).await;
    }
    let mut races = Vec::new();
    for citizen in &citizens {
        offered_within(&channel, "race", citizen, Duration::from_secs(5)).await;
        let declining = {
            let request = proto::DeclineOfferRequest {
                campaign_id: "race".into(),
                citizen_id: citizen.clone(),
                request_id: format!("decline-{citizen}"),
                hold_id: String::new(),
            };
            let mut client = BookingServiceClient::new(channel.clone());
            tokio::spawn(async move { client.decline_offer(request).await })
        };
        let request = proto::WithdrawRegistrationRequest {
            campaign_id: "race".into(),
            citizen_id: citizen.clone(),
            request_id: format!("withdraw-{citizen}"),
        };
        let mut client = BookingServiceClient::new(channel.clone());
        let withdrawing = tokio::spawn(async move { client.withdraw_registration(request).await });
        races.push((declining, withdrawing));
    }
    for (declining, withdrawing) in races {
        let _ = declining.await; // NO_OFFER when the withdrawal came first
        let withdrawn = withdrawing.await.unwrap().expect("withdrawn");
        let state = withdrawn.into_inner().registration.unwrap().state();
        assert_eq!(state, RegistrationState::Withdrawn);
    }
    server.stop().await;
}

fn first_request_id(citizen: &str) -> String {
    register_request("", citizen, &[]).request_id
}

/// 1,000 eligible registrations (200 in the first priority group), 300 places: exactly
/// 300 offers, every one of the first group's, then 100 of the second group's by the
/// draw (not by arrival), none to a late registrant; a later wave is not offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_opening_offers_exactly_its_places_in_rank_order() {
    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let clock = Clock::manual(now);
    let server = TestServer::start_with_clock(dir.path(), Config::default(), clock.clone()).await;
    let channel = server.channel().await;
    utc_site_on(
        channel.clone(),
        ("w-site", "lazio"),
        10,
        ("09:00", "10:00"),
        150,
    )
    .await;
    upsert(
        &channel,
        campaign(
            "wave",
            "lazio",
            vec![
                wave("first", now + 60_000, &["care", "general"]),
                wave("later", now + 3_600_000, &["later"]),
            ],
        ),
    )
    .await
    .expect("campaign");
    let citizens: Vec<(String, &str)> = (0..1_000)
        .map(|i| {
            (
                format!("w-{i:04}"),
                if i % 5 == 0 { "care" } else { "general" },
            )
        })
        .chain((0..10).map(|i| (format!("w-later-{i}"), "later")))
        .collect();
    register_all(&channel, "wave", &citizens).await;
    let before = counts(&stats(&channel, "wave").await);
    assert_eq!(
        (before.registered, before.offered),
        (1_010, 0),
        "no wave is open yet"
    );

    clock.advance(Duration::from_secs(61));
    register(&channel, register_request("wave", "w-late", &["general"])).await;
    while server.match_campaigns().await > 0 {}
    let after = stats(&channel, "wave").await;
    let c = counts(&after);
    assert_eq!((c.offered, c.waiting, c.registered), (300, 701, 10));
    assert_eq!(after.by_wave[0].counts.unwrap().offered, 300);

    let names: Vec<String> = citizens.iter().map(|(c, _)| c.clone()).collect();
    let all = registrations(&channel, "wave", &names[..1_000]).await;
    let offered: Vec<usize> = (0..1_000)
        .filter(|i| all[*i].state() == RegistrationState::Offered)
        .collect();
    assert!(
        offered.iter().filter(|i| *i % 5 == 0).count() == 200,
        "the first group first"
    );
    let general: Vec<usize> = offered.iter().copied().filter(|i| i % 5 != 0).collect();
    assert_eq!(general.len(), 100);
    assert!(
        general.iter().any(|i| *i > 200),
        "drawn, not by arrival: {general:?}"
    );
    assert_eq!(
        registration(&channel, "wave", "w-late").await.state(),
        RegistrationState::Waiting,
        "a late registrant comes after the drawn ones"
    );
    // Offers are holds: the slots have no place left, and each offer holds one.
    let slots = search_all(&mut server.booking().await, "w-site", "vax").await;
    assert!(slots.iter().all(|s| s.remaining == 0));
    let holds: HashSet<String> = offered
        .iter()
        .map(|i| all[*i].offer.clone().unwrap().hold_id)
        .collect();
    assert_eq!(holds.len(), 300);
}

/// Accept books; decline and expiry give the place to the next waiting registration
/// within a second; a cancelled booking's place too; an exhausted registration gets no
/// more offers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_freed_place_goes_to_the_next_registration_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let clock = Clock::manual(now);
    // Holds are swept by hand: the background sweeper cannot take the offer first.
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let channel = server.channel().await;
    utc_site_on(
        channel.clone(),
        ("f-site", "marche"),
        10,
        ("09:00", "09:30"),
        1,
    )
    .await;
    let mut definition = campaign("free", "marche", vec![wave("all", now - 1_000, &[])]);
    definition.offers_declined_max = 1;
    definition.offer_ttl_seconds = 600;
    upsert(&channel, definition).await.expect("campaign");
    // One place; citizens registered one after the other get it in turn (the draw
    // orders those registered before the wave opened: these all came after).
    let citizens: Vec<String> = (0..5).map(|i| format!("f-{i}")).collect();
    for citizen in &citizens {
        register(&channel, register_request("free", citizen, &[])).await;
    }
    let first = offered_within(&channel, "free", &citizens[0], Duration::from_secs(2)).await;
    assert_eq!(
        registration(&channel, "free", &citizens[1]).await.state(),
        RegistrationState::Waiting,
        "one place, one offer"
    );

    // Decline: exhausted (offers_declined_max = 1), the next one is offered within 1 s.
    let declined = decline(&channel, "free", &citizens[0], 1).await;
    assert_eq!(declined.state(), RegistrationState::Exhausted);
    let second = offered_within(&channel, "free", &citizens[1], Duration::from_secs(1)).await;
    assert_eq!(
        second.slot.as_ref().unwrap().slot_id,
        first.slot.as_ref().unwrap().slot_id
    );

    // Expiry: the sweeper ends the offer, the next one is offered within 1 s.
    clock.advance(Duration::from_secs(601));
    assert_eq!(server.sweep_holds().await, 1);
    let third = offered_within(&channel, "free", &citizens[2], Duration::from_secs(1)).await;
    assert_eq!(
        registration(&channel, "free", &citizens[1]).await.state(),
        RegistrationState::Exhausted
    );

    // Accept: a booking of the offered slot, with the offer's hold id.
    let booking = accept(&channel, "free", &citizens[2])
        .await
        .expect("accepted");
    assert_eq!(booking.booking_id, third.hold_id);
    let booked = registration(&channel, "free", &citizens[2]).await;
    assert_eq!(
        (booked.state(), booked.booking_id.clone()),
        (RegistrationState::Booked, booking.booking_id.clone())
    );
    let again = accept(&channel, "free", &citizens[2])
        .await
        .expect("a retry answers the booking");
    assert_eq!(again.booking_id, booking.booking_id);

    // Cancel: the registration is withdrawn, the place goes to the next one.
    BookingServiceClient::new(channel.clone())
        .cancel_booking(proto::CancelBookingRequest {
            booking_id: booking.booking_id.clone(),
            citizen_id: citizens[2].clone(),
            request_id: "f-cancel".into(),
        })
        .await
        .expect("cancelled");
    offered_within(&channel, "free", &citizens[3], Duration::from_secs(1)).await;
    assert_eq!(
        registration(&channel, "free", &citizens[2]).await.state(),
        RegistrationState::Withdrawn
    );
    let c = counts(&stats(&channel, "free").await);
    assert_eq!(
        (c.exhausted, c.withdrawn, c.offered, c.waiting),
        (2, 1, 1, 1)
    );

    // Withdrawing gives the place on; a withdrawn citizen may register anew, at the end.
    BookingServiceClient::new(channel.clone())
        .withdraw_registration(proto::WithdrawRegistrationRequest {
            campaign_id: "free".into(),
            citizen_id: citizens[3].clone(),
            request_id: "f-withdraw".into(),
        })
        .await
        .expect("withdrawn");
    offered_within(&channel, "free", &citizens[4], Duration::from_secs(1)).await;
    let anew = register(
        &channel,
        proto::PreRegisterRequest {
            request_id: "f-again".into(),
            ..register_request("free", &citizens[3], &[])
        },
    )
    .await;
    assert_eq!(
        (anew.state(), anew.offers_declined),
        (RegistrationState::Exhausted, 1),
        "withdrawing from an offer counts as declining it, and registering anew \
         launders nothing: its one decline (offers_declined_max = 1) is used up"
    );

    // A closure ends the offer; the registration waits again with its rank (no decline).
    let slot = first.slot.clone().unwrap();
    CapacityServiceClient::new(channel.clone())
        .close_slots(proto::CloseSlotsRequest {
            site_id: "f-site".into(),
            service_id: None,
            from: slot.start,
            to: slot.end,
            reason: "site flooded".into(),
            request_id: "f-close".into(),
        })
        .await
        .expect("closed");
    let requeued = registration(&channel, "free", &citizens[4]).await;
    assert_eq!(
        (requeued.state(), requeued.offers_declined),
        (RegistrationState::Waiting, 0)
    );

    // The event log tells each offer and how it ended.
    let events = all_events(&channel).await;
    let offers = events
        .iter()
        .filter(|e| e.kind() == proto::EventKind::OfferMade)
        .count();
    let ended: Vec<&str> = events
        .iter()
        .filter(|e| e.kind() == proto::EventKind::OfferExpired)
        .map(|e| e.reason.as_str())
        .collect();
    assert_eq!(offers, 5);
    assert_eq!(
        ended,
        [
            "offer declined",
            "offer expired",
            "registration withdrawn",
            "site flooded"
        ]
    );

    // The registrations' export shows each as its citizen reads it (the declined and
    // the expired offers counted), and agrees with the stats.
    let key = |r: &proto::Registration| {
        let hold = r.offer.as_ref().map(|o| o.hold_id.clone());
        (
            r.registration_id.clone(),
            r.state,
            r.offers_declined,
            hold,
            r.booking_id.clone(),
        )
    };
    let mut read: Vec<_> = registrations(&channel, "free", &citizens)
        .await
        .iter()
        .map(key)
        .collect();
    let exported = export_registrations(&channel, "free").await;
    let mut listed: Vec<_> = exported.iter().map(key).collect();
    read.sort();
    listed.sort();
    assert_eq!(listed, read);
    assert_eq!(counts_of(&exported), counts(&stats(&channel, "free").await));
}

async fn withdraw(
    channel: &Channel,
    campaign: &str,
    citizen: &str,
    request_id: &str,
) -> proto::Registration {
    BookingServiceClient::new(channel.clone())
        .withdraw_registration(proto::WithdrawRegistrationRequest {
            campaign_id: campaign.into(),
            citizen_id: citizen.into(),
            request_id: request_id.into(),
        })
        .await
        .expect("withdrawn")
        .into_inner()
        .registration
        .expect("a registration")
}

/// A retried DeclineOffer or WithdrawRegistration is answered, not done again, also
/// after a restart (the request is stored with the registration it changed): the
/// retry of a decline leaves the next offer alone, the retry of a withdrawal leaves
/// the registration made anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_declines_and_withdrawals_are_answered_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let clock = Clock::manual(now);
    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let channel = server.channel().await;
    utc_site_on(
        channel.clone(),
        ("r-site", "umbria"),
        10,
        ("09:00", "09:30"),
        1,
    )
    .await;
    upsert(
        &channel,
        campaign("retry", "umbria", vec![wave("all", now - 1_000, &[])]),
    )
    .await
    .expect("campaign");
    register(&channel, register_request("retry", "R-0", &[])).await;
    let first = offered_within(&channel, "retry", "R-0", Duration::from_secs(2)).await;
    let declined = decline(&channel, "retry", "R-0", 1).await;
    assert_eq!(declined.offers_declined, 1);
    // Alone in line, it is offered the place again, as a new hold.
    let second = offered_within(&channel, "retry", "R-0", Duration::from_secs(2)).await;
    assert_ne!(second.hold_id, first.hold_id);
    server.stop().await;

    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let channel = server.channel().await;
    let retried = decline(&channel, "retry", "R-0", 1).await;
    assert_eq!(
        (retried.state(), retried.offers_declined),
        (RegistrationState::Offered, 1),
        "the retried decline declined the new offer"
    );
    assert_eq!(retried.offer.unwrap().hold_id, second.hold_id);
    // A decline naming the first offer, long ended, declines nothing.
    let named = BookingServiceClient::new(channel.clone())
        .decline_offer(proto::DeclineOfferRequest {
            campaign_id: "retry".into(),
            citizen_id: "R-0".into(),
            request_id: "decline-named".into(),
            hold_id: first.hold_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&named).as_deref(), Some("NO_OFFER"));
    // Nor does an accept naming it book the new offer's slot, which it never saw.
    let late = BookingServiceClient::new(channel.clone())
        .accept_offer(proto::AcceptOfferRequest {
            campaign_id: "retry".into(),
            citizen_id: "R-0".into(),
            request_id: "accept-named".into(),
            hold_id: first.hold_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&late).as_deref(), Some("HOLD_EXPIRED"));
    let still = registration(&channel, "retry", "R-0").await;
    assert_eq!(still.offer.unwrap().hold_id, second.hold_id);

    // Withdraw, register anew (offered again), restart, retry the withdrawal.
    let withdrawn = withdraw(&channel, "retry", "R-0", "withdraw-R-0").await;
    assert_eq!(withdrawn.state(), RegistrationState::Withdrawn);
    let anew = proto::PreRegisterRequest {
        request_id: "register-again".into(),
        ..register_request("retry", "R-0", &[])
    };
    register(&channel, anew).await;
    offered_within(&channel, "retry", "R-0", Duration::from_secs(2)).await;
    server.stop().await;

    let server = TestServer::start_with_clock(dir.path(), by_hand(), clock.clone()).await;
    let channel = server.channel().await;
    let retried = withdraw(&channel, "retry", "R-0", "withdraw-R-0").await;
    assert_eq!(
        retried.state(),
        RegistrationState::Offered,
        "the retried withdrawal withdrew the new registration"
    );
    // A new request id does withdraw it.
    let withdrawn = withdraw(&channel, "retry", "R-0", "withdraw-R-0-again").await;
    assert_eq!(withdrawn.state(), RegistrationState::Withdrawn);
    server.stop().await;
}

/// Every event in the log so far (the stream is read until it is idle for 500 ms).
async fn all_events(channel: &Channel) -> Vec<proto::Event> {
    let mut stream = CapacityServiceClient::new(channel.clone())
        .watch_events(proto::WatchEventsRequest {
            scope: None,
            after_sequence: 0,
            log_id: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    let idle = Duration::from_millis(500);
    while let Ok(next) = tokio::time::timeout(idle, stream.message()).await {
        match next.expect("an event") {
            Some(item) => events.extend(item.event),
            None => break,
        }
    }
    events
}

/// Direct Book and HoldSlot need an offer, except within last_minute_hours; an
/// authority can widen the window; preferences choose the site and the day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_bookings_need_an_offer_outside_the_last_minute_and_preferences_hold() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let channel = server.channel().await;
    utc_site_on(
        channel.clone(),
        ("p-near", "puglia"),
        10,
        ("09:00", "09:30"),
        2,
    )
    .await;
    utc_site_on(
        channel.clone(),
        ("p-far", "puglia"),
        12,
        ("09:00", "09:30"),
        2,
    )
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    let future_wave = vec![wave("all", now + 3_600_000, &[])];
    upsert(&channel, campaign("p", "puglia", future_wave.clone()))
        .await
        .expect("campaign");
    let near = search_all(&mut server.booking().await, "p-near", "vax").await;
    let refused = server
        .booking()
        .await
        .book(book_request(&near[0].slot_id, "p-direct", "p-direct-1"))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_deref()),
        (Code::FailedPrecondition, Some("OFFER_REQUIRED"))
    );
    let refused = server
        .booking()
        .await
        .hold_slot(proto::HoldSlotRequest {
            slot_id: near[0].slot_id.clone(),
            citizen_id: "p-direct".into(),
            request_id: "p-direct-2".into(),
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&refused).as_deref(), Some("OFFER_REQUIRED"));
    // The service and region of a campaign never change.
    let moved = upsert(&channel, campaign("p", "lazio", future_wave.clone()))
        .await
        .unwrap_err();
    assert_eq!(moved.code(), Code::InvalidArgument);

    // An eleven-day window: the near slot (10 days ahead) is last-minute now.
    let mut wider = campaign("p", "puglia", future_wave);
    wider.last_minute_hours = 11 * 24;
    upsert(&channel, wider).await.expect("changed");
    book_ok(
        &mut server.booking().await,
        book_request(&near[0].slot_id, "p-direct", "p-direct-3"),
    )
    .await;

    // Preferences: only p-far, only its weekday; the wave opens now.
    let far_day = chrono::NaiveDate::parse_from_str(&day_ahead(12), "%Y-%m-%d").unwrap();
    use chrono::Datelike;
    let weekday = far_day.weekday().number_from_monday();
    let mut picky = register_request("p", "p-picky", &[]);
    picky.preferences = Some(proto::Preferences {
        site_ids: vec!["p-far".into()],
        weekdays: vec![weekday],
        earliest: "08:30".into(),
        latest: "09:00".into(),
        ..Default::default()
    });
    register(&channel, picky).await;
    let mut nowhere = register_request("p", "p-nowhere", &[]);
    nowhere.preferences = Some(proto::Preferences {
        weekdays: vec![weekday % 7 + 1],
        first_day: day_ahead(12),
        ..Default::default()
    });
    register(&channel, nowhere).await;
    let mut bad = register_request("p", "p-bad", &[]);
    bad.preferences = Some(proto::Preferences {
        site_ids: vec!["elsewhere".into()],
        weekdays: vec![8],
        earliest: "25:00".into(),
        ..Default::default()
    });
    let refused = server.booking().await.pre_register(bad).await.unwrap_err();
    assert_eq!(
        violated_fields(&refused),
        ["preferences.weekdays", "preferences.earliest"],
        "every malformed field at once"
    );
    // More sites than `registration_sites_max` (20): each would be kept with it.
    let mut hoarder = register_request("p", "p-hoarder", &[]);
    hoarder.preferences = Some(proto::Preferences {
        site_ids: (0..21).map(|i| format!("site-{i}")).collect(),
        ..Default::default()
    });
    let refused = server
        .booking()
        .await
        .pre_register(hoarder)
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&refused), ["preferences.site_ids"]);
    let mut later = campaign("p", "puglia", vec![wave("all", now - 1_000, &[])]);
    later.last_minute_hours = 11 * 24;
    upsert(&channel, later).await.expect("the wave opens now");
    let offer = offered_within(&channel, "p", "p-picky", Duration::from_secs(2)).await;
    assert_eq!(offer.slot.unwrap().site_id, "p-far");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        registration(&channel, "p", "p-nowhere").await.state(),
        RegistrationState::Waiting,
        "no slot on its days: it waits"
    );
}

/// Matching cut by a kill -9 (a few offers per step, so the kill lands mid-way): after
/// the restart no registration has two offers, every offer seen before is still there,
/// no place is offered twice, matching finishes, and the stats equal the exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_survives_a_kill_9_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let limits = [("CAMPAIGN_OFFERS_PER_STEP_MAX", "10")];
    let server = ChildServer::with_limits(dir.path(), &limits);
    let channel = connect(&server.url).await;
    utc_site_on(
        channel.clone(),
        ("k-site", "umbria"),
        10,
        ("09:00", "11:00"),
        30,
    )
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    upsert(
        &channel,
        campaign("k", "umbria", vec![wave("all", now + 3_600_000, &[])]),
    )
    .await
    .expect("campaign");
    let citizens: Vec<String> = (0..400).map(|i| format!("k-{i}")).collect();
    let pairs: Vec<(String, &str)> = citizens.iter().map(|c| (c.clone(), "x")).collect();
    register_all(&channel, "k", &pairs).await;
    let mut open = campaign("k", "umbria", vec![wave("all", now, &[])]);
    open.offer_ttl_seconds = 3_600;
    upsert(&channel, open).await.expect("the wave opens");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = registrations(&channel, "k", &citizens).await;
    let offered_before: HashMap<String, String> = citizens
        .iter()
        .zip(&before)
        .filter(|(_, r)| r.state() == RegistrationState::Offered)
        .map(|(c, r)| (c.clone(), r.offer.clone().unwrap().hold_id))
        .collect();
    assert!(
        !offered_before.is_empty() && offered_before.len() < 120,
        "mid-way: {}",
        offered_before.len()
    );
    server.kill_9();

    let server = ChildServer::with_limits(dir.path(), &limits);
    let channel = connect(&server.url).await;
    for (citizen, hold_id) in &offered_before {
        let after = registration(&channel, "k", citizen).await;
        assert_eq!(
            after.offer.map(|o| o.hold_id).as_ref(),
            Some(hold_id),
            "{citizen} kept its offer"
        );
    }
    // Matching resumes and ends with every place offered, once.
    let started = Instant::now();
    loop {
        let c = counts(&stats(&channel, "k").await);
        if c.offered == 120 {
            assert_eq!(c.waiting, 280);
            break;
        }
        assert!(c.offered < 120, "more offers than places");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "matching stalled at {}",
            c.offered
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = registrations(&channel, "k", &citizens).await;
    let holds: Vec<String> = after
        .iter()
        .filter_map(|r| r.offer.as_ref().map(|o| o.hold_id.clone()))
        .collect();
    assert_eq!(
        holds.iter().collect::<HashSet<_>>().len(),
        120,
        "no hold offered twice"
    );
    let slots = search_all(
        &mut BookingServiceClient::new(channel.clone()),
        "k-site",
        "vax",
    )
    .await;
    assert!(slots.iter().all(|s| s.remaining == 0));

    // Half accept: the stats count what the export holds.
    let offered: Vec<&String> = citizens
        .iter()
        .zip(&after)
        .filter(|(_, r)| r.state() == RegistrationState::Offered)
        .map(|(c, _)| c)
        .collect();
    for citizen in offered.iter().step_by(2) {
        accept(&channel, "k", citizen).await.expect("accepted");
    }
    let exported = export_all(channel.clone()).await;
    let confirmed = exported
        .iter()
        .filter(|b| b.state() == proto::BookingState::Confirmed)
        .count() as u64;
    let c = counts(&stats(&channel, "k").await);
    assert_eq!((c.booked, c.offered), (confirmed, 60));
    assert_eq!(state_of(&after).len(), 400);
    // The registrations' export agrees with the stats, state by state, and its offers
    // are distinct holds and its bookings the confirmed ones of the bookings' export.
    let registrations = export_registrations(&channel, "k").await;
    assert_eq!(registrations.len(), 400);
    assert_eq!(counts_of(&registrations), c);
    let offers: HashSet<&str> = registrations
        .iter()
        .filter_map(|r| r.offer.as_ref().map(|o| o.hold_id.as_str()))
        .collect();
    assert_eq!(offers.len(), 60);
    let booked: HashSet<&str> = registrations
        .iter()
        .filter(|r| r.state() == RegistrationState::Booked)
        .map(|r| r.booking_id.as_str())
        .collect();
    let confirmed: HashSet<&str> = exported
        .iter()
        .filter(|b| b.state() == proto::BookingState::Confirmed)
        .map(|b| b.booking_id.as_str())
        .collect();
    assert_eq!(booked, confirmed);
    server.kill_9();
}

/// Every registration of `campaign`, from `ExportRegistrations`.
async fn export_registrations(channel: &Channel, campaign: &str) -> Vec<proto::Registration> {
    let mut stream = CapacityServiceClient::new(channel.clone())
        .export_registrations(proto::ExportRegistrationsRequest {
            campaign_id: campaign.into(),
        })
        .await
        .expect("export")
        .into_inner();
    let mut registrations = Vec::new();
    while let Some(item) = stream.message().await.expect("an exported registration") {
        registrations.extend(item.registration);
    }
    registrations
}

/// Registrations per state, as `GetCampaignStats` counts them.
fn counts_of(registrations: &[proto::Registration]) -> proto::RegistrationCounts {
    let mut counts = proto::RegistrationCounts::default();
    for registration in registrations {
        let count = match registration.state() {
            RegistrationState::Registered => &mut counts.registered,
            RegistrationState::Waiting => &mut counts.waiting,
            RegistrationState::Offered => &mut counts.offered,
            RegistrationState::Booked => &mut counts.booked,
            RegistrationState::Exhausted => &mut counts.exhausted,
            RegistrationState::Withdrawn => &mut counts.withdrawn,
            RegistrationState::Unspecified => panic!("{registration:?} has no state"),
        };
        *count += 1;
    }
    counts
}

/// Each preference alone, and all together, decides the offer: with places for all,
/// each registration is offered the earliest slot that fits it (sites, first and last
/// day, weekdays, earliest and latest local start, both inclusive); one that nothing
/// fits waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_preference_chooses_the_offered_slot() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let channel = server.channel().await;
    let mut capacity = server.capacity().await;
    for (site, first, last) in [("q-main", 10, 16), ("q-other", 13, 13)] {
        upsert_site(&mut capacity, site, "molise", "Etc/UTC").await;
        capacity
            .publish_schedule(publish_request(
                site,
                "vax",
                (&day_ahead(first), &day_ahead(last)),
                ("08:00", "12:00"),
                30,
                10,
            ))
            .await
            .expect("published");
    }
    let now = chrono::Utc::now().timestamp_millis();
    upsert(
        &channel,
        campaign("q", "molise", vec![wave("all", now - 1_000, &[])]),
    )
    .await
    .expect("campaign");
    let weekday_of = |days: i64| {
        use chrono::Datelike;
        let day = chrono::NaiveDate::parse_from_str(&day_ahead(days), "%Y-%m-%d").unwrap();
        day.weekday().number_from_monday()
    };
    // (citizen, its preferences, its offer: site, days ahead, local start).
    type Case<'a> = (&'a str, proto::Preferences, Option<(&'a str, i64, &'a str)>);
    let cases: Vec<Case> = vec![
        (
            "q-any",
            proto::Preferences::default(),
            Some(("q-main", 10, "08:00")),
        ),
        (
            "q-site",
            proto::Preferences {
                site_ids: vec!["q-other".into()],
                ..Default::default()
            },
            Some(("q-other", 13, "08:00")),
        ),
        (
            "q-first-day",
            proto::Preferences {
                first_day: day_ahead(12),
                ..Default::default()
            },
            Some(("q-main", 12, "08:00")),
        ),
        (
            "q-weekday",
            proto::Preferences {
                weekdays: vec![weekday_of(14)],
                ..Default::default()
            },
            Some(("q-main", 14, "08:00")),
        ),
        (
            "q-hours",
            proto::Preferences {
                earliest: "10:00".into(),
                latest: "10:00".into(),
                ..Default::default()
            },
            Some(("q-main", 10, "10:00")),
        ),
        (
            "q-all",
            proto::Preferences {
                site_ids: vec!["q-main".into()],
                first_day: day_ahead(11),
                last_day: day_ahead(15),
                weekdays: vec![weekday_of(11), weekday_of(12)],
                earliest: "11:00".into(),
                latest: "11:30".into(),
            },
            Some(("q-main", 11, "11:00")),
        ),
        (
            "q-none",
            proto::Preferences {
                last_day: day_ahead(12),
                weekdays: vec![weekday_of(15)],
                ..Default::default()
            },
            None,
        ),
    ];
    for (citizen, preferences, _) in &cases {
        let mut request = register_request("q", citizen, &[]);
        request.preferences = Some(preferences.clone());
        register(&channel, request).await;
    }
    for (citizen, _, expected) in &cases {
        let Some((site, days, time)) = expected else {
            continue;
        };
        let offer = offered_within(&channel, "q", citizen, Duration::from_secs(2)).await;
        let slot = offer.slot.expect("the offered slot");
        assert_eq!(
            (slot.site_id.as_str(), slot.local_start.as_str()),
            (
                *site,
                format!("{}T{time}:00+00:00", day_ahead(*days)).as_str()
            ),
            "{citizen}"
        );
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        registration(&channel, "q", "q-none").await.state(),
        RegistrationState::Waiting,
        "nothing fits it: it waits"
    );
    server.stop().await;
}

/// Copies the directory tree `from` into `to` (a stopped server's data dir).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The seeded draw is stored with the campaign, not drawn at start: two servers
/// started from copies of one data dir (after early registrations, before the wave
/// opens) offer the few places to the same registrations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_draw_is_the_same_after_a_restart() {
    if common::postgres::sled_only("the_draw_is_the_same_after_a_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let clock = Clock::manual(now);
    let first = dir.path().join("first");
    let server = TestServer::start_with_clock(&first, by_hand(), clock.clone()).await;
    let channel = server.channel().await;
    utc_site_on(
        channel.clone(),
        ("d-site", "sardegna"),
        10,
        ("09:00", "09:30"),
        5,
    )
    .await;
    let opens = now + 3_600_000;
    upsert(
        &channel,
        campaign("d", "sardegna", vec![wave("all", opens, &[])]),
    )
    .await
    .expect("campaign");
    let names: Vec<String> = (0..40).map(|i| format!("d-{i}")).collect();
    for citizen in &names {
        register(&channel, register_request("d", citizen, &[])).await;
    }
    server.stop().await;
    let second = dir.path().join("second");
    copy_tree(&first, &second);

    let mut offered = Vec::new();
    for data_dir in [&first, &second] {
        let clock = Clock::manual(opens + 1_000);
        let server = TestServer::start_with_clock(data_dir, by_hand(), clock).await;
        let channel = server.channel().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while counts(&stats(&channel, "d").await).offered < 5 {
            assert!(
                Instant::now() < deadline,
                "the wave's 5 places were not offered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let chosen: Vec<String> = names
            .iter()
            .zip(registrations(&channel, "d", &names).await)
            .filter(|(_, r)| r.state() == RegistrationState::Offered)
            .map(|(citizen, _)| citizen.clone())
            .collect();
        assert_eq!(chosen.len(), 5);
        offered.push(chosen);
        server.stop().await;
    }
    assert_eq!(offered[0], offered[1], "the draw changed across a restart");
    // And it is a draw: 5 of 40 in arrival order would be the first five.
    assert_ne!(offered[0], names[..5], "five of forty in arrival order");
}

/// A hold taken before a campaign existed is no way past its offers: confirming it in a
/// slot that now needs an offer is OFFER_REQUIRED (it was confirmed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_taken_before_the_campaign_needs_an_offer_to_be_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let channel = server.channel().await;
    utc_site_on(
        channel.clone(),
        ("h-site", "molise"),
        10,
        ("09:00", "09:30"),
        2,
    )
    .await;
    let slot = search_all(&mut server.booking().await, "h-site", "vax")
        .await
        .remove(0);
    let mut booking = server.booking().await;
    let hold = booking
        .hold_slot(proto::HoldSlotRequest {
            slot_id: slot.slot_id.clone(),
            citizen_id: "H-1".into(),
            request_id: "hold-H-1".into(),
            ..Default::default()
        })
        .await
        .expect("held before any campaign")
        .into_inner()
        .hold
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let later = vec![wave("later", now + 3_600_000, &[])];
    upsert(&channel, campaign("h", "molise", later))
        .await
        .expect("campaign");
    let confirm = proto::BookRequest {
        hold_id: Some(hold.hold_id),
        ..book_request(&slot.slot_id, "H-1", "confirm-H-1")
    };
    let refused = booking.book(confirm).await.unwrap_err();
    assert_eq!(reason(&refused).as_deref(), Some("OFFER_REQUIRED"));
    server.stop().await;
}

/// A queued release admits a ticket only for a place left (`places_remaining`, which
/// counts a campaign's slots in its last-minute window), but the campaign's matcher
/// offered those same places: three admitted citizens found every slot full (an
/// outside test). Now a queued release's places in the last-minute window are never
/// offered; the admitted book them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_never_take_the_places_a_queued_release_admitted_tickets_for() {
    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let clock = Clock::manual(now);
    let server = TestServer::start_with_clock(dir.path(), Config::default(), clock.clone()).await;
    let channel = server.channel().await;
    utc_site_on(
        channel.clone(),
        ("q-site", "umbria"),
        2,
        ("09:00", "10:30"),
        1,
    )
    .await;
    let mut last_minute = campaign("q", "umbria", vec![wave("all", now + 120_000, &[])]);
    (last_minute.last_minute_hours, last_minute.offer_ttl_seconds) = (7 * 24, 600);
    upsert(&channel, last_minute).await.expect("campaign");
    for citizen in ["r1", "r2", "r3"] {
        register(&channel, register_request("q", citizen, &[])).await;
    }
    let window = |s: i64| {
        Some(Timestamp {
            seconds: s,
            nanos: 0,
        })
    };
    let release = proto::Release {
        release_id: "q-release".into(),
        region_id: "umbria".into(),
        service_id: "vax".into(),
        from: window(now / 1_000),
        to: window(now / 1_000 + 30 * 86_400),
        release_at: at_ms(now + 60_000),
        queue_opens_at: at_ms(now),
        ..Default::default()
    };
    let mut capacity = CapacityServiceClient::new(channel.clone());
    capacity
        .create_release(proto::CreateReleaseRequest {
            release: Some(release),
            request_id: String::new(),
        })
        .await
        .expect("release");
    let mut booking = server.booking().await;
    for citizen in ["t1", "t2", "t3"] {
        booking
            .join_queue(proto::JoinQueueRequest {
                release_id: "q-release".into(),
                citizen_id: citizen.into(),
                request_id: format!("join-{citizen}"),
            })
            .await
            .expect("joined");
    }
    clock.advance(Duration::from_secs(61));
    server.advance_releases().await;
    clock.advance(Duration::from_secs(60)); // the wave opens
    assert_eq!(
        server.match_campaigns().await,
        0,
        "no offer of an admitted place"
    );
    let slots = search_all(&mut booking, "q-site", "vax").await;
    assert_eq!(slots.len(), 3);
    for (slot, citizen) in slots.iter().zip(["t1", "t2", "t3"]) {
        let request = book_request(&slot.slot_id, citizen, &format!("book-{citizen}"));
        book_ok(&mut booking, request).await;
    }
}

/// A campaign that ends (`ends_at`): offers made before stand, no new offer is made,
/// nobody pre-registers (a retry gets its registration), its slots are booked
/// directly, it cannot be changed, and another campaign may cover its service and
/// region. `records_retained_days` after its end, once no offer of it is live,
/// retention deletes it with its registrations, which then no longer count against
/// `registrations_max`; restarts in between and after recover each state. An end sent
/// in the past ends a campaign now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_campaign_books_directly_and_retention_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let mut config = by_hand();
    config.limits.records_retained_days = 2;
    config.limits.request_records_retained_hours = 24;
    config.limits.registrations_max = 4;
    let server = TestServer::start_with_clock(dir.path(), config.clone(), clock.clone()).await;
    let channel = server.channel().await;
    utc_site_on(
        channel.clone(),
        ("e-site", "marche"),
        10,
        ("09:00", "09:30"),
        3,
    )
    .await;
    let slot = search_all(&mut server.booking().await, "e-site", "vax")
        .await
        .remove(0);
    let now = clock.now_unix_ms();
    let ends_at = now + 3_600_000;
    let ending = |ends_at_ms: i64| proto::Campaign {
        offer_ttl_seconds: 7 * 86_400,
        ends_at: at_ms(ends_at_ms),
        ..campaign("e", "marche", vec![wave("all", now - 1_000, &[])])
    };
    let refused = upsert(&channel, ending(now - 1_000)).await.unwrap_err();
    assert_eq!(violated_fields(&refused), ["campaign.ends_at"]);
    upsert(&channel, ending(ends_at)).await.expect("campaign");
    let citizens = ["E-A", "E-B", "E-C", "E-W"];
    for citizen in citizens {
        let registered = register(&channel, register_request("e", citizen, &[])).await;
        assert_eq!(registered.campaign_ends_at, at_ms(ends_at));
    }
    let direct =
        |citizen: &str, n: u32| book_request(&slot.slot_id, citizen, &format!("{citizen}-{n}"));
    let mut booking = server.booking().await;
    let refused = booking.book(direct("E-D", 1)).await.unwrap_err();
    assert_eq!(reason(&refused).as_deref(), Some("OFFER_REQUIRED"));
    server.match_campaigns().await;
    let states = |channel: Channel| async move {
        state_of(&registrations(&channel, "e", &citizens.map(String::from)).await)
    };
    use RegistrationState::{Booked, Offered, Waiting};
    assert_eq!(
        states(channel.clone()).await,
        [Offered, Offered, Offered, Waiting]
    );

    // It ends (a restart in between): offers stand, a declined place is not offered
    // again but booked directly, nobody registers anew.
    clock.advance(Duration::from_secs(7_200));
    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), config.clone(), clock.clone()).await;
    let channel = server.channel().await;
    accept(&channel, "e", "E-A")
        .await
        .expect("an offer made before the end stands");
    decline(&channel, "e", "E-B", 1).await;
    server.match_campaigns().await;
    assert_eq!(
        states(channel.clone()).await,
        [Booked, Waiting, Offered, Waiting]
    );
    let mut booking = server.booking().await;
    book_ok(&mut booking, direct("E-D", 2)).await;
    let refused = booking
        .pre_register(register_request("e", "E-E", &[]))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_deref()),
        (Code::FailedPrecondition, Some("CAMPAIGN_ENDED"))
    );
    let again = register(&channel, register_request("e", "E-W", &[])).await;
    assert_eq!(again.state(), Waiting, "a retry is answered");
    // Unchanged, it is answered; changed, refused: it ended.
    upsert(&channel, ending(ends_at))
        .await
        .expect("the same campaign");
    let refused = upsert(&channel, ending(ends_at + 1_000)).await.unwrap_err();
    assert_eq!(reason(&refused).as_deref(), Some("CAMPAIGN_ENDED"));
    // Another campaign covers the service and region now: it gates the slot again,
    // and the registrations kept for the ended one fill `registrations_max`.
    let next = campaign("e2", "marche", vec![wave("all", now - 1_000, &[])]);
    upsert(&channel, next.clone()).await.expect("a successor");
    let refused = booking.book(direct("E-F", 1)).await.unwrap_err();
    assert_eq!(reason(&refused).as_deref(), Some("OFFER_REQUIRED"));
    let full = booking
        .pre_register(register_request("e2", "E-F", &[]))
        .await
        .unwrap_err();
    assert_eq!(reason(&full).as_deref(), Some("REGISTRATIONS_FULL"));
    let retry = tonic_types::StatusExt::get_details_retry_info(&full);
    assert!(retry.is_none(), "no retry helps: {full:?}");

    // Two days after its end it is kept while E-C's offer is live; once that expired,
    // retention deletes it and its registrations; the booking made through it stays,
    // and a restart recovers without it.
    assert_eq!(server.retain().await.campaigns, 0);
    clock.advance(Duration::from_secs(2 * 86_400));
    assert_eq!(server.retain().await.campaigns, 0, "an offer is live");
    clock.advance(Duration::from_secs(5 * 86_400));
    server.sweep_holds().await;
    let retained = server.retain().await;
    assert_eq!((retained.campaigns, retained.registrations), (1, 4));
    let gone = CapacityServiceClient::new(channel.clone())
        .get_campaign_stats(proto::GetCampaignStatsRequest {
            campaign_id: "e".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&gone).as_deref(), Some("CAMPAIGN_NOT_FOUND"));
    register(&channel, register_request("e2", "E-F", &[])).await;
    assert_eq!(citizen_bookings(&mut booking, "E-A").await.len(), 1);
    // An end sent in the past ends the successor now.
    let ended = upsert(
        &channel,
        proto::Campaign {
            ends_at: at_ms(0),
            ..next.clone()
        },
    )
    .await
    .expect("ended");
    let ended_at = ended.ends_at.expect("an end").seconds;
    assert_eq!(ended_at, clock.now_unix_ms().div_euclid(1_000));
    // Its retry (the answer lost) is answered with the campaign, not CAMPAIGN_ENDED.
    clock.advance(Duration::from_secs(1));
    let again = upsert(
        &channel,
        proto::Campaign {
            ends_at: at_ms(0),
            ..next.clone()
        },
    )
    .await
    .expect("a retried ending is answered");
    assert_eq!(again.ends_at, ended.ends_at);
    server.stop().await;
    let server = TestServer::start_with_clock(dir.path(), config, clock.clone()).await;
    let channel = server.channel().await;
    assert_eq!(counts(&stats(&channel, "e2").await).waiting, 1);
    assert_eq!(site_stats(&server, "e-site").await.booked, 2);
    server.stop().await;
}

/// Citizens pre-registering while an authority ends the campaign (an end sent in the
/// past): each is registered before the end or refused, never registered after it (an
/// outside test saw registrations a few ms after the stored end). Four rounds, each a
/// campaign of its own over the same slots (the one before has ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_registration_is_made_after_an_ending_update() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let channel = server.channel().await;
    utc_site_on(
        channel.clone(),
        ("r-site", "liguria"),
        10,
        ("09:00", "09:30"),
        1,
    )
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    let millis = |at: Timestamp| at.seconds * 1_000 + i64::from(at.nanos / 1_000_000);
    for round in 0..4u64 {
        let id = format!("r{round}");
        let open = campaign(&id, "liguria", vec![wave("all", now + 3_600_000, &[])]);
        upsert(&channel, open.clone()).await.expect("campaign");
        // 200 citizens over 20 ms, the ending sent in their midst.
        let registering: Vec<_> = (0..200u64)
            .map(|i| {
                let channel = channel.clone();
                let request = register_request(&id, &format!("R-{round}-{i}"), &[]);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_micros(100 * i)).await;
                    BookingServiceClient::new(channel)
                        .pre_register(request)
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(8 + round)).await;
        let ending = proto::Campaign {
            ends_at: at_ms(0),
            ..open
        };
        let ended = upsert(&channel, ending).await.expect("ended");
        let end_ms = millis(ended.ends_at.expect("an end"));
        for call in registering {
            match call.await.unwrap() {
                Ok(answer) => {
                    let registration = answer.into_inner().registration.unwrap();
                    let at_ms = millis(registration.registered_at.unwrap());
                    assert!(at_ms <= end_ms, "registered at {at_ms}, ended at {end_ms}");
                }
                Err(status) => assert_eq!(reason(&status).as_deref(), Some("CAMPAIGN_ENDED")),
            }
        }
    }
    server.stop().await;
}

/// An update that would end a campaign but is refused (its record too large) ends
/// nothing: the campaign still gates its slots and takes registrations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_ending_update_ends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let channel = server.channel().await;
    utc_site_on(
        channel.clone(),
        ("x-site", "sardegna"),
        10,
        ("09:00", "09:30"),
        1,
    )
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    let open = campaign("x", "sardegna", vec![wave("all", now + 3_600_000, &[])]);
    upsert(&channel, open.clone()).await.expect("campaign");
    let groups: Vec<String> = (0..16).map(|g| format!("{g:0>60}")).collect();
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    let huge = proto::Campaign {
        ends_at: at_ms(0),
        waves: (0..32)
            .map(|w| wave(&format!("w{w}"), now + 3_600_000, &groups))
            .collect(),
        ..open
    };
    let refused = upsert(&channel, huge).await.unwrap_err();
    assert_eq!(violated_fields(&refused), ["campaign.waves"], "{refused:?}");
    let registered = register(&channel, register_request("x", "X-1", &[])).await;
    assert_eq!(registered.campaign_ends_at, None);
    let slot = search_all(&mut server.booking().await, "x-site", "vax")
        .await
        .remove(0);
    let gated = server
        .booking()
        .await
        .book(book_request(&slot.slot_id, "X-2", "x-2"))
        .await
        .unwrap_err();
    assert_eq!(reason(&gated).as_deref(), Some("OFFER_REQUIRED"));
    server.stop().await;
}

/// Registration records on disk, read from a stopped server's data dir.
fn stored_registrations(data_dir: &std::path::Path) -> usize {
    if common::postgres::asked() {
        let url = common::postgres::url_of_dir(data_dir);
        let sql = "SELECT count(*) FROM prenota_kv WHERE get_byte(k, 0) = 71"; // b'G'
        return common::postgres::query_i64(&url, sql) as usize;
    }
    let limits = Config::default().limits;
    let mut store = prenota::store::Store::open(data_dir, &limits).expect("store opens");
    let registrations = store.registrations().count();
    store.shutdown().expect("a clean shutdown");
    registrations
}

/// Retention deleting an ended campaign can be cut short while it deletes the
/// registrations (a full write queue, a kill), and a citizen can cancel the booking
/// their registration holds meanwhile: the campaign's record goes first, so what is
/// left are registrations of no campaign, which the next start accepts and the next
/// pass deletes. (With the record deleted last, the start found a registration naming
/// a cancelled booking beside its campaign, and refused the store.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_deletion_cut_short_leaves_a_store_that_starts() {
    const WAITING: usize = 500;
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual_from_now();
    let mut config = by_hand();
    config.limits.records_retained_days = 2;
    config.limits.retention_batch_records = 1;
    let server = TestServer::start_with_clock(dir.path(), config.clone(), clock.clone()).await;
    let channel = server.channel().await;
    utc_site_on(
        channel.clone(),
        ("cut-site", "marche"),
        10,
        ("09:00", "09:30"),
        1,
    )
    .await;
    let now = clock.now_unix_ms();
    let cut = proto::Campaign {
        ends_at: at_ms(now + 3_600_000),
        ..campaign("cut", "marche", vec![wave("all", now - 1_000, &[])])
    };
    upsert(&channel, cut).await.expect("campaign");
    register(&channel, register_request("cut", "C-A", &[])).await;
    server.match_campaigns().await;
    let booked = accept(&channel, "cut", "C-A").await.expect("C-A books");
    futures::stream::iter(0..WAITING)
        .for_each_concurrent(32, |n| {
            let channel = channel.clone();
            async move {
                let citizen = format!("C-{n}");
                register(&channel, register_request("cut", &citizen, &[])).await;
            }
        })
        .await;

    // Two days after its end the pass deletes it, one registration per commit; as soon
    // as the campaign is gone C-A cancels, and the pass is cut there.
    clock.advance(Duration::from_secs(3 * 86_400));
    let pass = server.retain();
    let cancel_once_gone = async {
        let mut capacity = CapacityServiceClient::new(channel.clone());
        let stats = || proto::GetCampaignStatsRequest {
            campaign_id: "cut".into(),
        };
        while capacity.get_campaign_stats(stats()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let cancel = proto::CancelBookingRequest {
            booking_id: booked.booking_id.clone(),
            citizen_id: "C-A".into(),
            request_id: "cancel-C-A".into(),
        };
        let mut booking = BookingServiceClient::new(channel.clone());
        booking.cancel_booking(cancel).await.expect("cancelled");
    };
    tokio::select! {
        retained = pass => panic!("the pass ended before the cancel: {retained:?}"),
        () = cancel_once_gone => {}
    }
    server.stop().await;
    let left = stored_registrations(dir.path());
    assert!(left > 0, "the pass was cut short with registrations left");

    let server = TestServer::start_with_clock(dir.path(), config.clone(), clock.clone()).await;
    let channel = server.channel().await;
    let gone = BookingServiceClient::new(channel.clone())
        .get_registration(proto::GetRegistrationRequest {
            campaign_id: "cut".into(),
            citizen_id: "C-A".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&gone).as_deref(), Some("CAMPAIGN_NOT_FOUND"));
    assert_eq!(server.retain().await.registrations as usize, left);
    server.stop().await;
    assert_eq!(stored_registrations(dir.path()), 0);
}
