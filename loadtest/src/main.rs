//! `prenota-loadtest`: measures durable booking throughput against the no-op gRPC
//! ceiling (`grpc.health.v1.Health/Check`) of the same server, in the same run.
//!
//! First cut: one scenario (`ceiling` → `book` → `ceiling`) against a running server.
//! The rush/mixed scenarios, `--spawn`, latency histograms and the invariant checks
//! arrive with the load-generator issue.

use std::time::{Duration, Instant};

use clap::Parser;
use prenota::proto::booking_service_client::BookingServiceClient;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::{self, BookRequest};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Parser)]
#[command(
    name = "prenota-loadtest",
    about = "Durable bookings/s as a ratio of the gRPC ceiling"
)]
struct Args {
    /// A running prenota server; only loopback addresses are accepted.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Requests per phase (ceiling, book, ceiling). Also the number of citizens booked.
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    channels: usize,
}

/// Minutes of one slot of the scenario schedule; 23 hours of 1-minute slots a day.
const SLOTS_PER_DAY: usize = 23 * 60;
const CAPACITY_PER_SLOT: u32 = 10_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let host = args
        .server
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap_or_default();
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        return Err(format!(
            "refusing to load {}: only loopback servers are targets",
            args.server
        )
        .into());
    }
    if args.requests > SLOTS_PER_DAY * CAPACITY_PER_SLOT as usize {
        return Err("at most 13,800,000 requests: the scenario has that many places".into());
    }
    let mut channels = Vec::with_capacity(args.channels.max(1));
    for _ in 0..args.channels.max(1) {
        channels.push(Channel::from_shared(args.server.clone())?.connect().await?);
    }
    let (site_id, first_start) = publish_scenario(channels[0].clone()).await?;
    println!(
        "prenota-loadtest: {} requests per phase, {} in flight, {} connections",
        args.requests,
        args.in_flight,
        channels.len()
    );
    let ceiling_before = run_phase("ceiling", &args, &channels, health_check).await;
    let run = std::process::id();
    let book = run_phase("book", &args, &channels, move |channel, index| {
        let slot_id = format!(
            "{site_id}/vax/{}",
            first_start + 60 * (index % SLOTS_PER_DAY) as i64
        );
        async move {
            BookingServiceClient::new(channel)
                .book(BookRequest {
                    slot_id,
                    citizen_id: format!("citizen-{run}-{index}"),
                    request_id: format!("request-{run}-{index}"),
                    hold_id: None,
                })
                .await
                .is_ok()
        }
    })
    .await;
    let ceiling_after = run_phase("ceiling", &args, &channels, health_check).await;
    let ceiling = (ceiling_before + ceiling_after) / 2.0;
    println!(
        "durable bookings / ceiling = {:.0} / {:.0} = {:.0}%",
        book,
        ceiling,
        100.0 * book / ceiling
    );
    Ok(())
}

/// The no-op RPC whose rate is the ceiling of this server, client and machine.
async fn health_check(channel: Channel, _index: usize) -> bool {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok()
}

/// A UTC site with one day of 1-minute slots, five days ahead; returns the site id and
/// the first slot's start.
async fn publish_scenario(channel: Channel) -> Result<(String, i64), Box<dyn std::error::Error>> {
    let mut capacity = CapacityServiceClient::new(channel);
    let site_id = format!("loadtest-{}", std::process::id());
    capacity
        .upsert_site(proto::UpsertSiteRequest {
            site: Some(proto::Site {
                site_id: site_id.clone(),
                name: "Load test".into(),
                region_id: "loadtest".into(),
                time_zone: "Etc/UTC".into(),
            }),
            request_id: format!("{site_id}-site"),
        })
        .await?;
    let day = (chrono::Utc::now() + chrono::Duration::days(5)).date_naive();
    let day_text = day.format("%Y-%m-%d").to_string();
    capacity
        .publish_schedule(proto::PublishScheduleRequest {
            site_id: site_id.clone(),
            service_id: "vax".into(),
            first_day: day_text.clone(),
            last_day: day_text,
            opening_hours: (1..=7)
                .map(|weekday| proto::OpeningHours {
                    weekday,
                    opens: "00:00".into(),
                    closes: "23:00".into(),
                })
                .collect(),
            slot_minutes: 1,
            capacity_per_slot: CAPACITY_PER_SLOT,
            request_id: format!("{site_id}-schedule"),
        })
        .await?;
    let first_start = day
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc().timestamp())
        .unwrap_or_default();
    Ok((site_id, first_start))
}

/// Sends `args.requests` requests with `args.in_flight` workers; prints and returns req/s.
async fn run_phase<Call, Answer>(name: &str, args: &Args, channels: &[Channel], call: Call) -> f64
where
    Call: Fn(Channel, usize) -> Answer + Clone + Send + 'static,
    Answer: std::future::Future<Output = bool> + Send,
{
    let started = Instant::now();
    let workers: Vec<_> = (0..args.in_flight.max(1))
        .map(|worker| {
            let channel = channels[worker % channels.len()].clone();
            let (requests, stride, call) = (args.requests, args.in_flight.max(1), call.clone());
            tokio::spawn(async move {
                let mut succeeded = 0usize;
                for index in (worker..requests).step_by(stride) {
                    succeeded += usize::from(call(channel.clone(), index).await);
                }
                succeeded
            })
        })
        .collect();
    let mut succeeded = 0;
    for worker in workers {
        succeeded += worker.await.unwrap_or(0);
    }
    let elapsed = started.elapsed().max(Duration::from_micros(1));
    let rate = args.requests as f64 / elapsed.as_secs_f64();
    println!(
        "  {name:<8} {:>8} requests  {:>8} ok  {:>7.2} s  {rate:>8.0} req/s",
        args.requests,
        succeeded,
        elapsed.as_secs_f64()
    );
    rate
}
