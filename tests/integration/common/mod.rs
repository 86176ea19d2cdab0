//! Shared helpers: a real prenota server on 127.0.0.1:0 with a temp dir, clients, and
//! readers for the error details of a `Status`.

#![allow(dead_code)] // not every helper is used by every file

pub mod child;
pub mod postgres;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use chrono::{Duration, Utc};
use prenota::config::Config;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::{self, OpeningHours};
use prenota::server::{ServeOptions, Server};
use prenota::service::{Clock, Engine};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

pub struct TestServer {
    pub address: SocketAddr,
    pub data_dir: PathBuf,
    /// Weak, so a graceful stop can still take the engine back and close the store.
    engine: Weak<Engine>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, Config::default()).await
    }

    pub async fn start_with(data_dir: &Path, config: Config) -> Self {
        Self::start_with_clock(data_dir, config, Clock::system()).await
    }

    /// A server whose engine reads `clock` (a manual clock lets a test move time).
    pub async fn start_with_clock(data_dir: &Path, mut config: Config, clock: Clock) -> Self {
        postgres::use_backend_if_asked(data_dir, &mut config);
        let server = Server::open(ServeOptions {
            data_dir: data_dir.to_path_buf(),
            config,
            demo: false,
            clock,
        })
        .await
        .expect("server opens");
        let engine = Arc::downgrade(server.engine());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(listener, async {
                    let _ = stop.await;
                })
                .await
                .expect("server runs");
        });
        Self {
            address,
            data_dir: data_dir.to_path_buf(),
            engine,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// Graceful stop: drains requests and closes the store, like SIGTERM.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task ends cleanly");
        }
    }

    /// Runs one step of the hold sweeper now, as its timer would; returns how many
    /// holds it expired.
    pub async fn sweep_holds(&self) -> usize {
        let engine = self.engine.upgrade().expect("the server is running");
        prenota::server::sweep_holds_once(&engine)
            .await
            .expect("the sweep commits")
    }

    /// Runs one admission step of the queued releases now, as its timer would; returns
    /// how many tickets it admitted.
    pub async fn advance_releases(&self) -> usize {
        let engine = self.engine.upgrade().expect("the server is running");
        prenota::server::advance_releases_once(&engine)
            .await
            .expect("the admission step commits")
    }

    /// Runs one matching step of the campaigns now, as its timer would; returns how many
    /// offers it made.
    pub async fn match_campaigns(&self) -> usize {
        let engine = self.engine.upgrade().expect("the server is running");
        prenota::server::match_campaigns_once(&engine)
            .await
            .expect("the matching step commits")
    }

    /// Runs one retention pass now, as its timer would.
    pub async fn retain(&self) -> prenota::service::Retained {
        let engine = self.engine.upgrade().expect("the server is running");
        prenota::server::retain_once(&engine)
            .await
            .expect("the retention pass commits")
    }

    /// Finished requests the server remembers right now.
    pub fn request_records(&self) -> usize {
        let engine = self.engine.upgrade().expect("the server is running");
        engine.request_record_count()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub async fn channel(&self) -> Channel {
        connect(&self.url()).await
    }

    pub async fn booking(&self) -> BookingServiceClient<Channel> {
        BookingServiceClient::new(self.channel().await)
    }

    pub async fn capacity(&self) -> CapacityServiceClient<Channel> {
        CapacityServiceClient::new(self.channel().await)
    }
}

pub async fn connect(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

/// The default config with the hold sweeper and retention left to the test (their
/// timers run once an hour): with a manual clock, the test sweeps by hand.
pub fn by_hand() -> Config {
    let mut config = Config::default();
    config.limits.hold_sweep_interval_ms = 3_600_000;
    config.limits.retention_interval_ms = 3_600_000;
    config
}

/// A local day `days_ahead` days from now, as `YYYY-MM-DD` (UTC).
pub fn day_ahead(days_ahead: i64) -> String {
    (Utc::now() + Duration::days(days_ahead))
        .format("%Y-%m-%d")
        .to_string()
}

pub async fn upsert_site(
    capacity: &mut CapacityServiceClient<Channel>,
    site_id: &str,
    region_id: &str,
    time_zone: &str,
) {
    capacity
        .upsert_site(proto::UpsertSiteRequest {
            site: Some(proto::Site {
                site_id: site_id.into(),
                name: format!("Site {site_id}"),
                region_id: region_id.into(),
                time_zone: time_zone.into(),
            }),
            request_id: format!("upsert-{site_id}"),
        })
        .await
        .expect("upsert site");
}

/// A schedule open every weekday over `days` (first, last) during `hours` (opens, closes).
pub fn publish_request(
    site_id: &str,
    service_id: &str,
    (first_day, last_day): (&str, &str),
    (opens, closes): (&str, &str),
    slot_minutes: u32,
    capacity_per_slot: u32,
) -> proto::PublishScheduleRequest {
    proto::PublishScheduleRequest {
        site_id: site_id.into(),
        service_id: service_id.into(),
        first_day: first_day.into(),
        last_day: last_day.into(),
        opening_hours: (1..=7)
            .map(|weekday| OpeningHours {
                weekday,
                opens: opens.into(),
                closes: closes.into(),
            })
            .collect(),
        slot_minutes,
        capacity_per_slot,
        request_id: String::new(),
    }
}

/// Creates a UTC site with one slot of `capacity` places, 30 days ahead; returns its slot id.
pub async fn one_slot_site(server: &TestServer, site_id: &str, capacity: u32) -> String {
    one_slot_site_on(server.channel().await, site_id, "test-region", capacity).await
}

/// `one_slot_site` over any channel (a child server's too), in region `region_id`.
pub async fn one_slot_site_on(
    channel: Channel,
    site_id: &str,
    region_id: &str,
    capacity: u32,
) -> String {
    utc_site_on(
        channel.clone(),
        (site_id, region_id),
        30,
        ("10:00", "10:30"),
        capacity,
    )
    .await;
    let slots = search_all(&mut BookingServiceClient::new(channel), site_id, "vax").await;
    assert_eq!(slots.len(), 1);
    slots[0].slot_id.clone()
}

/// Creates a UTC site with 30-minute `vax` slots of `capacity` places between `hours`
/// (opens, closes) on the day `days_ahead` days from now.
pub async fn utc_site_on(
    channel: Channel,
    (site_id, region_id): (&str, &str),
    days_ahead: i64,
    hours: (&str, &str),
    capacity: u32,
) {
    let mut capacity_client = CapacityServiceClient::new(channel);
    upsert_site(&mut capacity_client, site_id, region_id, "Etc/UTC").await;
    let day = day_ahead(days_ahead);
    capacity_client
        .publish_schedule(publish_request(
            site_id,
            "vax",
            (&day, &day),
            hours,
            30,
            capacity,
        ))
        .await
        .expect("publish");
}

/// Every slot of a site and service in the next 366 days, following page tokens.
pub async fn search_all(
    booking: &mut BookingServiceClient<Channel>,
    site_id: &str,
    service_id: &str,
) -> Vec<proto::Slot> {
    let from = Utc::now().timestamp();
    search_range(booking, site_id, service_id, from, from + 366 * 86_400).await
}

pub async fn search_range(
    booking: &mut BookingServiceClient<Channel>,
    site_id: &str,
    service_id: &str,
    from_unix_s: i64,
    to_unix_s: i64,
) -> Vec<proto::Slot> {
    let mut slots = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = booking
            .search_slots(proto::SearchSlotsRequest {
                scope: Some(proto::search_slots_request::Scope::SiteId(site_id.into())),
                service_id: service_id.into(),
                from: at_s(from_unix_s),
                to: at_s(to_unix_s),
                only_available: false,
                page_size: 100,
                page_token,
            })
            .await
            .expect("search")
            .into_inner();
        slots.extend(page.slots);
        if page.next_page_token.is_empty() {
            return slots;
        }
        page_token = page.next_page_token;
    }
}

/// A `vax` campaign of `region_id` with one wave, open to everyone since 1970.
pub fn open_campaign(campaign_id: &str, region_id: &str) -> proto::Campaign {
    proto::Campaign {
        campaign_id: campaign_id.into(),
        service_id: "vax".into(),
        region_id: region_id.into(),
        waves: vec![proto::Wave {
            wave_id: "all".into(),
            opens_at: Some(prost_types::Timestamp::default()),
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn book_request(slot_id: &str, citizen_id: &str, request_id: &str) -> proto::BookRequest {
    proto::BookRequest {
        slot_id: slot_id.into(),
        citizen_id: citizen_id.into(),
        request_id: request_id.into(),
        hold_id: None,
    }
}

/// Books and expects a booking back.
pub async fn book_ok(
    client: &mut BookingServiceClient<Channel>,
    request: proto::BookRequest,
) -> proto::Booking {
    client
        .book(request)
        .await
        .expect("a booking")
        .into_inner()
        .booking
        .expect("the response carries the booking")
}

/// The citizen's bookings in every state (its first page), by series dose, then by
/// when they were made.
pub async fn citizen_bookings(
    client: &mut BookingServiceClient<Channel>,
    citizen: &str,
) -> Vec<proto::Booking> {
    let mut bookings = client
        .list_citizen_bookings(proto::ListCitizenBookingsRequest {
            citizen_id: citizen.into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .bookings;
    bookings.sort_by_key(|b| (b.dose, b.created_at.map(|t| t.seconds)));
    bookings
}

pub async fn site_stats(server: &TestServer, site_id: &str) -> proto::GetSiteStatsResponse {
    server
        .capacity()
        .await
        .get_site_stats(proto::GetSiteStatsRequest {
            site_id: site_id.into(),
        })
        .await
        .expect("stats")
        .into_inner()
}

/// The first `count` events of the whole log (every site), or a panic after 10 s.
pub async fn first_events(server: &TestServer, count: usize) -> Vec<proto::Event> {
    use tokio_stream::StreamExt;
    let request = proto::WatchEventsRequest {
        scope: None,
        after_sequence: 0,
        log_id: String::new(),
    };
    let capacity = server.capacity().await;
    let mut stream = { capacity }
        .watch_events(request)
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while events.len() < count {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} events came", events.len()));
        events.push(next.expect("the stream goes on").unwrap().event.unwrap());
    }
    events
}

pub async fn export_all(channel: Channel) -> Vec<proto::Booking> {
    let mut stream = CapacityServiceClient::new(channel)
        .export_bookings(proto::ExportBookingsRequest { scope: None })
        .await
        .expect("export")
        .into_inner();
    let mut bookings = Vec::new();
    while let Some(item) = stream.message().await.expect("export item") {
        bookings.push(item.booking.expect("booking"));
    }
    bookings
}

/// `ErrorInfo.reason` of a status, if any.
pub fn reason(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

/// The `RetryInfo` delay of a refusal (it must have one).
pub fn retry_delay(status: &Status) -> std::time::Duration {
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("a RetryInfo delay")
}

pub fn metadata(status: &Status, key: &str) -> Option<String> {
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get(key).cloned())
}

/// Fields named by the `BadRequest` details of an INVALID_ARGUMENT status.
pub fn violated_fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// The health status of `service` (`""` for the whole server).
pub async fn health_of(
    channel: Channel,
    service: &str,
) -> tonic_health::pb::health_check_response::ServingStatus {
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status;
    tonic_health::pb::health_check_response::ServingStatus::try_from(status).unwrap()
}

/// Sends `authorization: Bearer <token>` on every request (nothing when `None`).
#[derive(Clone)]
pub struct Bearer(pub Option<&'static str>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = self.0 {
            let value =
                tonic::metadata::MetadataValue::try_from(format!("Bearer {token}")).unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// An import whose rows never come (its stream held open by the returned sender), and
/// its call, with `token` as its bearer if any.
pub async fn stalled_import(
    server: &TestServer,
    token: Option<&'static str>,
) -> (
    tokio::sync::mpsc::Sender<proto::ImportCapacityRequest>,
    JoinHandle<Result<tonic::Response<proto::ImportCapacityResponse>, Status>>,
) {
    let (rows, open_stream) = tokio::sync::mpsc::channel(1);
    let channel = server.channel().await;
    let mut capacity = CapacityServiceClient::with_interceptor(channel, Bearer(token));
    let call = tokio::spawn(async move {
        let rows = tokio_stream::wrappers::ReceiverStream::new(open_stream);
        capacity.import_capacity(rows).await
    });
    (rows, call)
}

/// The instant `seconds` after the Unix epoch, as a request field.
pub fn at_s(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

/// A `WatchAvailability` of `vax` at `site_id`, from now for 40 days.
pub fn availability_watch_request(site_id: &str) -> proto::WatchAvailabilityRequest {
    let now = chrono::Utc::now().timestamp();
    proto::WatchAvailabilityRequest {
        scope: Some(proto::watch_availability_request::Scope::SiteId(
            site_id.into(),
        )),
        service_id: "vax".into(),
        from: at_s(now),
        to: at_s(now + 40 * 86_400),
    }
}

/// The next slot a `WatchAvailability` stream sends, within 10 s.
pub async fn next_watched_slot(
    stream: &mut tonic::Streaming<proto::WatchAvailabilityResponse>,
) -> proto::Slot {
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
        .await
        .expect("a slot message comes")
        .expect("the stream goes on")
        .expect("not ended")
        .slot
        .unwrap()
}

/// The answer of whichever of `calls` finishes first (removed from `calls`), waiting at
/// most 10 s for one.
pub async fn first_finished<R, T>(calls: &mut Vec<(R, JoinHandle<T>)>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(index) = calls.iter().position(|(_, call)| call.is_finished()) {
            return calls.remove(index).1.await.unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "none finished within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// What clients were told, checked against an export after a crash or power cut:
/// every acknowledged booking there (`booked`: booking id → citizen), cancelled if its
/// cancel was acknowledged; no slot of `slot_ids` over `capacity`; no citizen with two
/// confirmed bookings. `when` names the cycle in failures.
pub fn check_acknowledged(
    when: &str,
    exported: &[proto::Booking],
    (booked, cancelled): (&HashMap<String, String>, &HashSet<String>),
    (slot_ids, capacity): (&[String], u32),
) {
    let by_id: HashMap<&str, &proto::Booking> = exported
        .iter()
        .map(|b| (b.booking_id.as_str(), b))
        .collect();
    for booking_id in booked.keys() {
        let booking = by_id
            .get(booking_id.as_str())
            .unwrap_or_else(|| panic!("{when}: acknowledged booking {booking_id} lost"));
        if cancelled.contains(booking_id) {
            assert_eq!(
                booking.state(),
                proto::BookingState::Cancelled,
                "{when}: acknowledged cancel of {booking_id} lost"
            );
        }
    }
    let mut per_slot: HashMap<&str, u32> = HashMap::new();
    let mut citizens = HashSet::new();
    for booking in exported {
        if booking.state() != proto::BookingState::Confirmed {
            continue;
        }
        *per_slot.entry(booking.slot_id.as_str()).or_default() += 1;
        // Bookings of unanswered requests are not in `booked` yet; their citizens are
        // distinct from every other by construction, so those that are must be unique.
        if let Some(citizen) = booked.get(&booking.booking_id) {
            assert!(
                citizens.insert(citizen.clone()),
                "{when}: {citizen} holds two confirmed bookings"
            );
        }
    }
    for slot_id in slot_ids {
        let taken = per_slot.get(slot_id.as_str()).copied().unwrap_or(0);
        assert!(
            taken <= capacity,
            "{when}: {slot_id} holds {taken} > {capacity}"
        );
    }
}

/// A UTC site (region `r`) with `count` 10-minute slots of service `vax` from 08:00 on
/// `day`, of `capacity` places each; their ids, in time order.
pub async fn ten_minute_slots(
    channel: Channel,
    (site_id, day): (&str, String),
    count: usize,
    capacity: u32,
) -> Vec<String> {
    let mut capacity_client = CapacityServiceClient::new(channel.clone());
    upsert_site(&mut capacity_client, site_id, "r", "Etc/UTC").await;
    let minutes = 10 * count as u32;
    let closes = format!("{:02}:{:02}", 8 + minutes / 60, minutes % 60);
    capacity_client
        .publish_schedule(publish_request(
            site_id,
            "vax",
            (&day, &day),
            ("08:00", &closes),
            10,
            capacity,
        ))
        .await
        .expect("published");
    let mut booking = BookingServiceClient::new(channel);
    let slot_ids: Vec<String> = search_all(&mut booking, site_id, "vax")
        .await
        .into_iter()
        .map(|s| s.slot_id)
        .collect();
    assert_eq!(slot_ids.len(), count);
    slot_ids
}

/// Opens a stopped store's sled directly (to plant or inspect records). sled's file lock
/// can outlive the `Db` by a moment: a job on sled's I/O thread pool that wrote the last
/// log buffer still holds the file after the flush it woke has returned (plain sled,
/// dropped and reopened at once on a loaded machine: 12–14 reopens in 200 waited, up to
/// 60 ms). Waits for it, up to 10 s.
pub fn open_stopped_sled(dir: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("opening {}: {e}", dir.display()),
        }
    }
}

/// `prenota config check FILE`, which must pass (`passes`) or not; its output and its
/// stderr. (The listen address's rules only warn: `serve`'s flags may settle them; a
/// file `serve` reads and cannot fails the check.)
pub fn config_check(file: &Path, passes: bool) -> (std::process::Output, String) {
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_prenota"))
        .args(["config", "check"])
        .arg(file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&checked.stderr).into_owned();
    assert_eq!(checked.status.success(), passes, "{stderr}");
    (checked, stderr)
}
