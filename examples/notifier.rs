//! A reminder / closure-notice gateway, as small as it gets: follows
//! `CapacityService.WatchEvents` from the sequence stored in a state file, prints the
//! message it would send for each event, and stores each handled sequence (write, fsync,
//! rename), so a restart resumes exactly after the last event handled: at least once,
//! in order. Reconnects after a server restart; stops on `EVENTS_PRUNED` (reconcile with
//! `prenota export` first, then store `oldest_sequence - 1`).
//!
//! ```sh
//! cargo run --example notifier -- --server http://127.0.0.1:50051 --state notifier.seq
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use prenota::proto::capacity_service_client::CapacityServiceClient;
use prenota::proto::{self, EventKind};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};

#[derive(Parser)]
struct Args {
    /// The prenota server.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// An authority or admin token (none in open mode).
    #[arg(long, env = "PRENOTA_TOKEN")]
    token: Option<String>,
    /// Only this region's sites.
    #[arg(long)]
    region: Option<String>,
    /// Where the last handled sequence is kept.
    #[arg(long, default_value = "notifier.seq")]
    state: PathBuf,
}

/// The last sequence handled (0: none yet).
fn load(state: &Path) -> Result<u64, String> {
    match std::fs::read_to_string(state) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| format!("{} holds no sequence", state.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("reading {}: {e}", state.display())),
    }
}

/// Stores `sequence` so that a crash leaves the old value or the new one, never neither.
fn store(state: &Path, sequence: u64) -> std::io::Result<()> {
    let partial = state.with_extension("partial");
    let mut file = std::fs::File::create(&partial)?;
    std::io::Write::write_all(&mut file, format!("{sequence}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&partial, state)
}

/// What a gateway would send for this event (to the citizen it keeps for the booking).
fn message(event: &proto::Event) -> String {
    let booking = event.booking.as_ref();
    let id = booking.map_or("", |b| b.booking_id.as_str());
    let when = booking.map_or("", |b| b.local_start.as_str());
    match event.kind() {
        EventKind::BookingConfirmed => {
            format!("booking {id} confirmed: {when} at {}", event.site_id)
        }
        EventKind::BookingCancelled => format!("booking {id} cancelled ({})", event.reason),
        EventKind::BookingRescheduled => format!(
            "booking {} moved to {when} as booking {id}",
            event.previous_booking_id
        ),
        EventKind::HoldExpired => format!("hold {} released ({})", event.hold_id, event.reason),
        EventKind::SlotClosed => format!("slot {} closed: {}", event.slot_id, event.reason),
        EventKind::CapacityChanged => {
            format!("slot {} now has {} places", event.slot_id, event.capacity)
        }
        EventKind::Unspecified => "an event of a kind this notifier does not know".into(),
    }
}

/// Follows the log until the stream ends; returns the last sequence handled.
async fn follow(args: &Args, mut after: u64) -> Result<u64, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(args.server.clone())
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let token = args.token.clone();
    let mut client = CapacityServiceClient::with_interceptor(channel, move |mut r: Request<()>| {
        if let Some(token) = &token {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| tonic::Status::invalid_argument("token"))?;
            r.metadata_mut().insert("authorization", value);
        }
        Ok(r)
    });
    let request = proto::WatchEventsRequest {
        scope: args
            .region
            .clone()
            .map(proto::watch_events_request::Scope::RegionId),
        after_sequence: after,
    };
    let mut events = client.watch_events(request).await?.into_inner();
    while let Some(response) = events.message().await? {
        let Some(event) = response.event else {
            continue;
        };
        println!("[{}] {}", event.sequence, message(&event));
        store(&args.state, event.sequence)
            .map_err(|e| tonic::Status::internal(format!("storing the sequence: {e}")))?;
        after = event.sequence;
    }
    Ok(after)
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let mut after = load(&args.state)?;
    eprintln!("following events after sequence {after}");
    loop {
        match follow(&args, after).await {
            Ok(last) => after = last,
            Err(status) if status.code() == Code::FailedPrecondition => {
                return Err(format!(
                    "{}: reconcile with `prenota export`, then store the oldest_sequence - 1 \
                     in {}",
                    status.message(),
                    args.state.display()
                ));
            }
            Err(status) if status.code() == Code::Unavailable => {
                after = load(&args.state)?;
                eprintln!("{}: reconnecting in 1 s", status.message());
            }
            Err(status) => return Err(format!("{:?}: {}", status.code(), status.message())),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
