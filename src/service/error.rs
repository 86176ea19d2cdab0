//! The service layer's error type: a domain refusal, a store failure, or a state of
//! the engine itself.

use thiserror::Error;

use crate::domain::error::DomainError;
use crate::store::StoreError;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ServiceError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the stored state breaks an invariant: {0}")]
    Recovery(String),
    #[error("the request was abandoned before it finished")]
    Abandoned,
    #[error("{}: retry in {} ms", .limiter.described(), .retry_after.as_millis())]
    RateLimited {
        limiter: Limiter,
        retry_after: std::time::Duration,
    },
    #[error("the server is at its limit of requests in flight (or of what they may hold)")]
    Shed,
    #[error("the server is starting: it is rebuilding its state from the store")]
    Recovering,
    /// Work this request must wait for did not finish in time (e.g. a closure waiting
    /// for admissions whose writes a stalled disk holds up); nothing was changed.
    #[error("busy: {0}")]
    Busy(&'static str),
    /// Another write overtook the read a plan was made from: it had claimed (or had
    /// changed) the citizen's booking `id` the plan needed. `Engine::replanned` makes
    /// the plan again once that write let go; never a client's answer.
    #[error("another change of the citizen's booking {id} was in flight; retry")]
    Overtaken {
        citizen: crate::domain::ids::CitizenKey,
        id: crate::domain::ids::BookingId,
    },
    /// A plan refused because the slot of another of the citizen's bookings it holds
    /// still or ends with it (a series' other dose) is closed: a closure under way is
    /// cancelling that booking. `Engine::replanned` waits for it once; never a
    /// client's answer.
    #[error("the slot {0} of another of the citizen's bookings is closing; retry")]
    NeighbourClosing(crate::domain::ids::SlotKey),
    /// With what is wrong with the assertion sent (`grpc::assertion::Refusal`).
    #[error("send a valid x-citizen-assertion from a configured identity gateway: {0}")]
    CitizenAssertionInvalid(&'static str),
    #[error("citizen_id names another citizen than the assertion")]
    CitizenMismatch,
    #[error("too many exports in progress (exports_max, or exports_per_token_max for this token)")]
    ExportsInProgress,
    #[error("the export stopped: the client read nothing for export_idle_timeout_ms")]
    ExportIdle,
    #[error("no backup key is configured: make one with `prenota backup-key > FILE` (keep it apart from the backups) and set [server] backup_key_file")]
    BackupKeyMissing,
    /// Checked under the authority lock; names no region, so a refusal tells nothing
    /// of another region's sites.
    #[error(
        "token {actor:?} may act only on the sites registered to its regions (an admin \
         registers new sites)"
    )]
    RegionDenied { actor: String },
    #[error("events before sequence {oldest} were deleted (events_retained_hours): resume from {oldest} - 1 after a full reconciliation (ExportBookings)", oldest = .oldest)]
    EventsPruned { oldest: u64 },
    #[error("after_sequence {after} is beyond the last event ({last}): this store never wrote it (restored from an older backup?)")]
    EventsAhead { after: u64, last: u64 },
    #[error("this store's event log is not the one log_id names (it was restored from a backup, so its sequences may repeat): reconcile (ExportBookings), then follow log {log_id} from 0")]
    EventLogReplaced { log_id: String },
    #[error(
        "too many watch streams open (event_streams_max or event_streams_per_token_max; \
         watch_subscribers_max or watch_subscribers_per_token_max for availability): retry \
         later"
    )]
    WatchersExhausted,
    #[error("this token works the desks of its own sites only")]
    DeskDenied,
}

impl ServiceError {
    /// `RATE_LIMITED` by `limiter` (counted in `prenota_rate_limited_total`), waiting
    /// `wait` rounded up to a whole millisecond: never "retry in 0 ms".
    pub fn rate_limited(limiter: Limiter, wait: std::time::Duration) -> Self {
        let label = limiter.label();
        metrics::counter!(crate::telemetry::RATE_LIMITED, "limiter" => label).increment(1);
        let millis = wait.as_nanos().div_ceil(1_000_000).max(1);
        let retry_after =
            std::time::Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX));
        ServiceError::RateLimited {
            limiter,
            retry_after,
        }
    }
}

/// The rate limiter that refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limiter {
    Citizen,
    CitizenReads,
    Token,
    Anonymous,
    CheckIn,
    WatchSnapshot,
}

impl Limiter {
    /// Its `limiter` label on `prenota_rate_limited_total`.
    pub fn label(self) -> &'static str {
        match self {
            Limiter::Citizen => "citizen",
            Limiter::CitizenReads => "citizen_reads",
            Limiter::Token => "token",
            Limiter::Anonymous => "anonymous",
            Limiter::CheckIn => "check_in",
            Limiter::WatchSnapshot => "watch_snapshot",
        }
    }

    /// What it counts, and the limit that set it (a client told "too many attempts"
    /// for its token's request rate looked for the wrong cause).
    fn described(self) -> &'static str {
        match self {
            Limiter::Citizen => {
                "too many attempts for this citizen (rate_citizen_attempts_per_min)"
            }
            Limiter::CitizenReads => {
                "too many reads of this citizen's bookings (rate_citizen_reads_per_min)"
            }
            Limiter::Token => "too many requests from this token (rate_token_requests_per_s)",
            Limiter::Anonymous => {
                "too many requests without a token (open_data_anonymous_requests_per_s, shared \
                 by every anonymous caller)"
            }
            Limiter::CheckIn => {
                "too many wrong check-in codes for this reference (check_in_tries_max)"
            }
            Limiter::WatchSnapshot => {
                "too many slots in this token's new watches (watch_snapshot_slots_per_token_per_s)"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A wait under a millisecond once answered "retry in 0 ms" with a zero RetryInfo.
    #[test]
    fn a_rate_limit_waits_whole_milliseconds_never_zero() {
        let waited = |wait| match ServiceError::rate_limited(Limiter::Anonymous, wait) {
            ServiceError::RateLimited { retry_after, .. } => retry_after,
            other => panic!("{other:?}"),
        };
        assert_eq!(waited(Duration::ZERO), Duration::from_millis(1));
        assert_eq!(waited(Duration::from_micros(300)), Duration::from_millis(1));
        assert_eq!(
            waited(Duration::from_micros(1_500)),
            Duration::from_millis(2)
        );
        assert_eq!(waited(Duration::from_secs(3)), Duration::from_secs(3));
    }

    /// Each limiter's refusal names what it counts and its limit.
    #[test]
    fn a_rate_limit_says_which_limit() {
        let said = |limiter| ServiceError::rate_limited(limiter, Duration::ZERO).to_string();
        assert!(said(Limiter::Token).starts_with("too many requests from this token"));
        assert!(said(Limiter::Citizen).contains("rate_citizen_attempts_per_min"));
        assert!(said(Limiter::CheckIn).contains("check_in_tries_max"));
    }
}
