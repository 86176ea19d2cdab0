//! The transport-free engine: wires the domain (counters, catalog, citizen limits,
//! holds) to the store (group commit) and gives each command its order of steps.
//!
//! Must not import tonic. This file only names the modules and re-exports their API.
//!
//! - `engine`: the engine's state and the steps commands share; `error`: `ServiceError`;
//!   `clock`: the one source of `now`; `execute`: carries out a command's plan
//!   (`domain::plans`): take, commit, free or undo.
//! - `bookings`: book (also from a hold), cancel, reschedule, list a citizen's bookings.
//! - `holds`: hold a place, expire holds (the sweeper).
//! - `actor`: who makes an authority write, and the regions it may act on.
//! - `capacity`: sites, schedules, imports, slot capacity, closures, statistics;
//!   `import_check`: a capacity file's rows checked before anything is written.
//! - `backup`: online backups, and restores checked by a full recovery.
//! - `exports`: how many exports may stream at once, and a feed that stops a scan
//!   whose client stopped reading.
//! - `availability`: `WatchAvailability`, slot changes fanned out to watchers.
//! - `events`: `WatchEvents`, the event log read from a sequence on and followed live.
//! - `open_data`: availability added up per site, service and day, never a person.
//! - `retention`: forgets old request records and deletes records of long-ended slots.
//! - `releases`: announced openings, their waiting rooms and the admission step.
//! - `campaigns`: campaigns, registrations, offers (holds) and the matcher.
//! - `series`: dose series (UpsertSeries, BookSeries); `desk`: a site's desk (rosters,
//!   check-in, no-shows); `references`: booking references and check-in codes.
//! - `state/`: what the engine keeps in memory per feature (campaigns, releases, series,
//!   watchers), apart from the modules above that implement their commands on it.
//! - `recovery`: start-up, rebuilding memory from the store and checking it;
//!   `requests`: the idempotency registry; `rate_limits`, `citizen_hasher`.

pub mod actor;
pub mod availability;
pub mod backup;
pub mod bookings;
pub mod campaigns;
pub mod capacity;
pub mod citizen_hasher;
pub mod clock;
pub mod desk;
pub mod engine;
pub mod error;
pub mod events;
pub mod execute;
pub mod exports;
pub mod holds;
pub mod import_check;
pub mod open_data;
pub mod rate_limits;
pub mod recovery;
pub mod references;
pub mod releases;
pub mod requests;
pub mod retention;
pub mod series;
pub mod state;

pub use actor::{Actor, Regions};
pub use bookings::{
    BookCommand, CancelCommand, CitizenBookingsQuery, GroupCommand, RescheduleCommand,
};
pub use campaigns::{CampaignStats, PreRegisterCommand, RegistrationCommand, RegistrationView};
pub use capacity::{CloseCommand, CloseOutcome, PublishOutcome};
pub use clock::Clock;
pub use desk::{Desk, RosterPage};
pub use engine::{BookingView, Engine, ExportScope};
pub use error::ServiceError;
pub use events::{EventScope, EventView};
pub use holds::HoldCommand;
pub use import_check::ImportRow;
pub use open_data::{RowKey, SummaryPage, SummaryQuery};
pub use releases::{JoinCommand, ReleaseStatus};
pub use retention::Retained;
pub use series::SeriesCommand;
