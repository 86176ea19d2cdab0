//! A reminder / closure-notice gateway, as small as it gets: follows
//! `CapacityService.WatchEvents` from the sequence stored in a state file, prints the
//! message it would send for each event, and stores each handled sequence with its log's
//! id (write, fsync, rename), so a restart resumes exactly after the last event handled:
//! at least once, in order. Reconnects after a server restart; stops on `EVENTS_PRUNED`
//! (reconcile with `prenota export` first, then store `oldest_sequence - 1`) and on
//! `EVENT_LOG_REPLACED` (the store was restored from a backup: reconcile, then start the
//! new log from 0).
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

/// Where the notifier is: the log's id (empty: none seen yet) and the last sequence
/// handled in it (0: none yet).
#[derive(Clone, Default)]
struct Position {
    log_id: String,
    sequence: u64,
}

fn load(state: &Path) -> Result<Position, String> {
    let text = match std::fs::read_to_string(state) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Position::default()),
        Err(e) => return Err(format!("reading {}: {e}", state.display())),
    };
    let bad = || format!("{} holds no `<log_id> <sequence>`", state.display());
    let (log_id, sequence) = text.trim().split_once(' ').ok_or_else(bad)?;
    Ok(Position {
        log_id: log_id.to_string(),
        sequence: sequence.parse().map_err(|_| bad())?,
    })
}

/// Stores `position` so that a crash leaves the old one or the new one, never neither.
fn store(state: &Path, position: &Position) -> std::io::Result<()> {
    let partial = state.with_extension("partial");
    let mut file = std::fs::File::create(&partial)?;
    let line = format!("{} {}\n", position.log_id, position.sequence);
    std::io::Write::write_all(&mut file, line.as_bytes())?;
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
        EventKind::OfferMade => format!(
            "slot {} offered (hold {}): accept or decline",
            event.slot_id, event.hold_id
        ),
        EventKind::OfferExpired => format!("offer {} ended ({})", event.hold_id, event.reason),
        EventKind::CheckedIn => format!("booking {id} checked in at {}", event.site_id),
        EventKind::NoShow => format!("booking {id} marked a no-show"),
        EventKind::Unspecified => "an event of a kind this notifier does not know".into(),
    }
}

/// Follows the log from `from` until the stream ends.
async fn follow(args: &Args, from: &Position) -> Result<(), tonic::Status> {
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
        after_sequence: from.sequence,
        log_id: from.log_id.clone(),
    };
    let mut events = client.watch_events(request).await?.into_inner();
    while let Some(response) = events.message().await? {
        let Some(event) = response.event else {
            continue;
        };
        println!("[{}] {}", event.sequence, message(&event));
        let handled = Position {
            log_id: response.log_id,
            sequence: event.sequence,
        };
        store(&args.state, &handled)
            .map_err(|e| tonic::Status::internal(format!("storing the sequence: {e}")))?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    loop {
        // What is stored is what was handled: resume right after it.
        let position = load(&args.state)?;
        eprintln!("following events after sequence {}", position.sequence);
        match follow(&args, &position).await {
            Ok(()) => {}
            Err(status) if status.code() == Code::FailedPrecondition => {
                return Err(format!(
                    "{}: reconcile with `prenota export`, then write `<log_id> <sequence>` \
                     to {}",
                    status.message(),
                    args.state.display()
                ));
            }
            Err(status) if status.code() == Code::Unavailable => {
                eprintln!("{}: reconnecting in 1 s", status.message());
            }
            Err(status) => return Err(format!("{:?}: {}", status.code(), status.message())),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
