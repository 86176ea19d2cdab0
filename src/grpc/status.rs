//! The one mapping from engine errors to gRPC statuses, with the `ErrorInfo` reasons
//! of PRODUCT.md. Exhaustive on purpose: a new error variant must choose its code here.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::domain::error::{DomainError, Missing};
use crate::service::ServiceError;
use crate::store::StoreError;

/// `ErrorInfo.domain` of every error prenota raises.
pub const ERROR_DOMAIN: &str = "prenota";

/// How long a client should wait before retrying after the write queue was full.
const OVERLOADED_RETRY_DELAY: Duration = Duration::from_millis(50);

/// How long a client should wait before retrying while the server recovers its store.
const RECOVERING_RETRY_DELAY: Duration = Duration::from_secs(1);

/// How long a client should wait before retrying when its exports are all in progress.
const EXPORTS_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Field violations spelled out in a status message; the details carry every one.
const MESSAGE_VIOLATIONS_MAX: usize = 5;

/// Bytes of field violations (fields and descriptions) the details carry at most: they
/// travel in a trailer (`grpc-status-details-bin`, base64), and clients refuse header
/// lists over 16 KiB (hyper's and grpc-go's default), so a request with hundreds of
/// bad list items once got a broken stream instead of its answer.
const DETAIL_VIOLATION_BYTES_MAX: usize = 4_096;

/// Bytes of one violation's field name or description at most: a field may name a key
/// the client chose (`release.reserved_percent[KEY]`), so even the first violation,
/// always kept, stays small.
const VIOLATION_TEXT_BYTES_MAX: usize = 256;

fn invalid_argument(violations: Vec<crate::domain::error::FieldViolation>) -> Status {
    let violations: Vec<_> = violations
        .into_iter()
        .map(|mut v| {
            v.field = clipped(v.field, VIOLATION_TEXT_BYTES_MAX);
            v.description = clipped(v.description, VIOLATION_TEXT_BYTES_MAX);
            v
        })
        .collect();
    // The message names the first few; the details carry them (up to a bound).
    let mut message = violations
        .iter()
        .take(MESSAGE_VIOLATIONS_MAX)
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    if violations.len() > MESSAGE_VIOLATIONS_MAX {
        message.push_str(&format!(
            "; and {} more (see the BadRequest details)",
            violations.len() - MESSAGE_VIOLATIONS_MAX
        ));
    }
    let violations = bounded(violations, DETAIL_VIOLATION_BYTES_MAX);
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {message}"),
        ErrorDetails::with_bad_request(violations),
    )
}

/// `text`, cut to at most `bytes_max` bytes (at a character boundary, marked by "…").
fn clipped(text: String, bytes_max: usize) -> String {
    if text.len() <= bytes_max {
        return text;
    }
    let mut end = bytes_max - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The first of `violations` within `bytes_max` (at least one); if some are left out, one
/// more, on the first one left out's field, saying how many.
fn bounded(
    violations: Vec<crate::domain::error::FieldViolation>,
    bytes_max: usize,
) -> Vec<FieldViolation> {
    let total = violations.len();
    let mut kept = Vec::new();
    let mut bytes = 0;
    for violation in violations {
        bytes += violation.field.len() + violation.description.len();
        if bytes > bytes_max && !kept.is_empty() {
            let more = total - kept.len();
            let description = format!(
                "and {more} more violations from here on, not listed: correct those above \
                 and send the request again"
            );
            kept.push(FieldViolation::new(violation.field, description));
            break;
        }
        kept.push(FieldViolation::new(violation.field, violation.description));
    }
    kept
}

/// How an error is answered: code, `ErrorInfo` reason, metadata and retry delay.
struct Answer {
    code: Code,
    reason: &'static str,
    metadata: Vec<(&'static str, String)>,
    retry_after: Option<Duration>,
}

impl Answer {
    fn new(code: Code, reason: &'static str) -> Self {
        Self {
            code,
            reason,
            metadata: Vec::new(),
            retry_after: None,
        }
    }

    fn with(mut self, key: &'static str, value: impl ToString) -> Self {
        self.metadata.push((key, value.to_string()));
        self
    }

    fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }
}

/// The one classification of every error (exhaustive: a new variant must choose here).
/// Long because it is that one match, an arm per error.
fn classify(error: &ServiceError) -> Answer {
    use Code::{
        Aborted, AlreadyExists, FailedPrecondition, Internal, InvalidArgument, NotFound,
        ResourceExhausted, Unavailable,
    };
    match error {
        ServiceError::Domain(domain) => match domain {
            DomainError::Invalid(_) => Answer::new(InvalidArgument, "INVALID_ARGUMENT"),
            DomainError::SlotFull(slot) => {
                Answer::new(FailedPrecondition, "SLOT_FULL").with("slot_id", slot)
            }
            // No booking id: it would tell whoever knows a citizen's id where they are
            // booked (ListCitizenBookings, as the citizen, finds it).
            DomainError::CitizenAlreadyBooked { member, .. } => {
                let answer = Answer::new(AlreadyExists, "CITIZEN_ALREADY_BOOKED");
                match member {
                    Some(index) => answer.with("citizen_index", index),
                    None => answer,
                }
            }
            DomainError::NotFound(Missing::Site) => Answer::new(NotFound, "SITE_NOT_FOUND"),
            DomainError::NotFound(Missing::Slot) => Answer::new(NotFound, "SLOT_NOT_FOUND"),
            DomainError::NotFound(Missing::Booking) => Answer::new(NotFound, "BOOKING_NOT_FOUND"),
            DomainError::NotFound(Missing::Hold) => Answer::new(NotFound, "HOLD_NOT_FOUND"),
            DomainError::SlotClosed(slot) => {
                Answer::new(FailedPrecondition, "SLOT_CLOSED").with("slot_id", slot)
            }
            DomainError::HoldExpired => Answer::new(FailedPrecondition, "HOLD_EXPIRED"),
            DomainError::HoldLimitReached(slot) => {
                Answer::new(FailedPrecondition, "HOLD_LIMIT_REACHED").with("slot_id", slot)
            }
            DomainError::SlotStarted(_) => Answer::new(FailedPrecondition, "SLOT_STARTED"),
            DomainError::BookingNotActive(_) => {
                Answer::new(FailedPrecondition, "BOOKING_NOT_ACTIVE")
            }
            DomainError::CheckInCodeWrong => {
                Answer::new(Code::PermissionDenied, "CHECK_IN_CODE_WRONG")
            }
            DomainError::SlotNotEnded => Answer::new(FailedPrecondition, "SLOT_NOT_ENDED"),
            DomainError::CheckInClosed {
                opens_unix_ms,
                closes_unix_ms,
            } => Answer::new(FailedPrecondition, "CHECK_IN_CLOSED")
                .with("opens_at", rfc3339_utc(*opens_unix_ms))
                .with("closes_at", rfc3339_utc(*closes_unix_ms)),
            DomainError::SeriesInterval {
                dose,
                earliest,
                latest,
            } => Answer::new(FailedPrecondition, "SERIES_INTERVAL")
                .with("dose", dose)
                .with("earliest", earliest)
                .with("latest", latest),
            DomainError::NotFound(Missing::Series) => Answer::new(NotFound, "SERIES_NOT_FOUND"),
            DomainError::SeriesExhausted => Answer::new(ResourceExhausted, "SERIES_EXHAUSTED"),
            DomainError::CapacityBelowBooked { slot, taken, .. } => {
                Answer::new(FailedPrecondition, "CAPACITY_BELOW_BOOKED")
                    .with("slot_id", slot)
                    .with("taken", taken)
            }
            DomainError::RequestIdReused => Answer::new(InvalidArgument, "REQUEST_ID_REUSED"),
            DomainError::NotFound(Missing::Release) => Answer::new(NotFound, "RELEASE_NOT_FOUND"),
            DomainError::NotFound(Missing::Ticket) => Answer::new(NotFound, "TICKET_NOT_FOUND"),
            DomainError::SlotNotReleased {
                release_at_unix_ms,
                retry_after_ms,
            } => Answer::new(FailedPrecondition, "SLOT_NOT_RELEASED")
                .with("release_at", rfc3339_utc(*release_at_unix_ms))
                .retry_after(millis(*retry_after_ms)),
            DomainError::NotAdmitted => Answer::new(FailedPrecondition, "NOT_ADMITTED"),
            DomainError::ReleaseExists(_) => Answer::new(AlreadyExists, "RELEASE_EXISTS"),
            DomainError::ReleaseOverlaps(other) => {
                Answer::new(FailedPrecondition, "RELEASE_OVERLAPS").with("release_id", other)
            }
            DomainError::QueueNotOpen { retry_after_ms } => {
                Answer::new(FailedPrecondition, "QUEUE_NOT_OPEN")
                    .retry_after(millis(*retry_after_ms))
            }
            DomainError::ReleaseNotQueued => Answer::new(FailedPrecondition, "RELEASE_NOT_QUEUED"),
            DomainError::ReleaseEnded => Answer::new(FailedPrecondition, "RELEASE_ENDED"),
            DomainError::QueueFull => {
                Answer::new(ResourceExhausted, "QUEUE_FULL").retry_after(EXPORTS_RETRY_DELAY)
            }
            DomainError::ReleasesExhausted => Answer::new(ResourceExhausted, "RELEASES_EXHAUSTED"),
            DomainError::NotFound(Missing::Campaign) => Answer::new(NotFound, "CAMPAIGN_NOT_FOUND"),
            DomainError::NotFound(Missing::Registration) => {
                Answer::new(NotFound, "REGISTRATION_NOT_FOUND")
            }
            DomainError::OfferRequired => Answer::new(FailedPrecondition, "OFFER_REQUIRED"),
            DomainError::NoOffer => Answer::new(FailedPrecondition, "NO_OFFER"),
            DomainError::RegistrationBooked => {
                Answer::new(FailedPrecondition, "REGISTRATION_BOOKED")
            }
            DomainError::CampaignsExhausted => {
                Answer::new(ResourceExhausted, "CAMPAIGNS_EXHAUSTED")
            }
            // No retry hint: registrations free up only when retention deletes an ended
            // campaign's, days later.
            DomainError::RegistrationsFull => Answer::new(ResourceExhausted, "REGISTRATIONS_FULL"),
            DomainError::CampaignEnded => Answer::new(FailedPrecondition, "CAMPAIGN_ENDED"),
        },
        ServiceError::Store(store) => match store {
            StoreError::Overloaded => {
                Answer::new(Unavailable, "OVERLOADED").retry_after(OVERLOADED_RETRY_DELAY)
            }
            StoreError::Failed | StoreError::Io(_) => Answer::new(Unavailable, "STORAGE_FAILED"),
            StoreError::Closed => Answer::new(Unavailable, "SHUTTING_DOWN"),
            // Another node holds the lease: a load balancer following health moves on.
            StoreError::NotActive => {
                Answer::new(Unavailable, "NOT_ACTIVE").retry_after(RECOVERING_RETRY_DELAY)
            }
            StoreError::BackupRunning => Answer::new(ResourceExhausted, "EXPORTS_IN_PROGRESS")
                .retry_after(EXPORTS_RETRY_DELAY),
            StoreError::BackupFellBehind(_) => {
                Answer::new(Unavailable, "OVERLOADED").retry_after(RECOVERING_RETRY_DELAY)
            }
            StoreError::Corrupt(_) | StoreError::Misconfigured(_) => {
                Answer::new(Internal, "STORAGE_CORRUPT")
            }
        },
        ServiceError::Recovery(_) => Answer::new(Internal, "RECOVERY_FAILED"),
        // Safe to retry with the same request_id: at most one booking results.
        ServiceError::Abandoned => Answer::new(Aborted, "REQUEST_ABANDONED"),
        ServiceError::RateLimited { retry_after, .. } => {
            Answer::new(ResourceExhausted, "RATE_LIMITED").retry_after(*retry_after)
        }
        ServiceError::Shed => {
            Answer::new(Unavailable, "OVERLOADED").retry_after(OVERLOADED_RETRY_DELAY)
        }
        ServiceError::Recovering => {
            Answer::new(Unavailable, "RECOVERING").retry_after(RECOVERING_RETRY_DELAY)
        }
        ServiceError::CitizenAssertionInvalid(_) => {
            Answer::new(Code::Unauthenticated, "CITIZEN_ASSERTION_INVALID")
        }
        ServiceError::CitizenMismatch => Answer::new(Code::PermissionDenied, "CITIZEN_MISMATCH"),
        ServiceError::Busy(_)
        | ServiceError::Overtaken { .. }
        | ServiceError::NeighbourClosing(_) => {
            Answer::new(Unavailable, "OVERLOADED").retry_after(RECOVERING_RETRY_DELAY)
        }
        ServiceError::ExportsInProgress => {
            Answer::new(ResourceExhausted, "EXPORTS_IN_PROGRESS").retry_after(EXPORTS_RETRY_DELAY)
        }
        ServiceError::ExportIdle => Answer::new(Code::DeadlineExceeded, "EXPORT_IDLE"),
        ServiceError::BackupKeyMissing => Answer::new(FailedPrecondition, "BACKUP_KEY_MISSING"),
        ServiceError::RegionDenied { .. } => Answer::new(Code::PermissionDenied, "REGION_DENIED"),
        ServiceError::DeskDenied => Answer::new(Code::PermissionDenied, "SITE_DENIED"),
        ServiceError::EventsPruned { oldest } => {
            Answer::new(FailedPrecondition, "EVENTS_PRUNED").with("oldest_sequence", oldest)
        }
        ServiceError::EventLogReplaced { log_id } => {
            Answer::new(FailedPrecondition, "EVENT_LOG_REPLACED").with("log_id", log_id)
        }
        ServiceError::EventsAhead { last, .. } => {
            Answer::new(Code::OutOfRange, "EVENTS_AHEAD").with("last_sequence", last)
        }
        ServiceError::WatchersExhausted => {
            Answer::new(ResourceExhausted, "WATCHERS_EXHAUSTED").retry_after(EXPORTS_RETRY_DELAY)
        }
    }
}

/// A delay in milliseconds (at least 1) as a RetryInfo delay.
fn millis(ms: i64) -> Duration {
    Duration::from_millis(ms.max(1) as u64)
}

/// An instant as RFC 3339 in UTC, for error metadata.
fn rfc3339_utc(unix_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(unix_ms)
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The `ErrorInfo` reason a client gets for this error (`INVALID_ARGUMENT` for field
/// violations, which carry `BadRequest` details instead). Also the `outcome` label of
/// the booking metrics.
pub fn reason(error: &ServiceError) -> &'static str {
    classify(error).reason
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        if let ServiceError::Domain(DomainError::Invalid(violations)) = error {
            return invalid_argument(violations);
        }
        let answer = classify(&error);
        let metadata: HashMap<String, String> = answer
            .metadata
            .into_iter()
            .map(|(key, value)| (key.to_string(), value))
            .collect();
        let mut details = ErrorDetails::with_error_info(answer.reason, ERROR_DOMAIN, metadata);
        if let Some(delay) = answer.retry_after {
            details.set_retry_info(Some(delay));
        }
        Status::with_error_details(answer.code, client_message(&error), details)
    }
}

/// What a client reads. Storage and recovery errors name files and paths of the
/// server: they go to the server's log (once, where they happen), the client gets a
/// line that says what to do.
fn client_message(error: &ServiceError) -> String {
    match error {
        ServiceError::Store(
            StoreError::Io(_) | StoreError::Corrupt(_) | StoreError::Misconfigured(_),
        )
        | ServiceError::Recovery(_) => {
            tracing::debug!(%error, "storage error answered to a client");
            "the server's storage failed; a change's outcome is unknown: retry it with the \
             same request_id once the server is back (the server's log has the details)"
                .to_string()
        }
        _ => error.to_string(),
    }
}

impl From<DomainError> for Status {
    fn from(error: DomainError) -> Self {
        ServiceError::Domain(error).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_violations_are_bounded_and_say_how_many_more() {
        use crate::domain::error::FieldViolation as Violation;
        let long = Violation::new("first", "x".repeat(5_000));
        let kept = bounded(vec![long.clone()], 4_096);
        assert_eq!(kept.len(), 1, "the first, however long");
        let many: Vec<Violation> = (0..100)
            .map(|i| Violation::new(format!("items[{i}]"), "must be 1 to 7".repeat(4)))
            .collect();
        let kept = bounded(many, 4_096);
        let bytes: usize = kept[..kept.len() - 1]
            .iter()
            .map(|v| v.field.len() + v.description.len())
            .sum();
        assert!(bytes <= 4_096 && kept.len() < 100, "{} kept", kept.len());
        let last = kept.last().unwrap();
        let listed = kept.len() - 1;
        assert_eq!(last.field, format!("items[{listed}]"));
        let more = format!("and {} more", 100 - listed);
        assert!(last.description.starts_with(&more), "{}", last.description);
    }

    #[test]
    fn a_violation_naming_a_megabyte_key_answers_in_a_few_hundred_bytes() {
        use crate::domain::error::FieldViolation as Violation;
        let key = "é".repeat(500_000);
        let field = format!("release.reserved_percent[{key}]");
        let status = invalid_argument(vec![Violation::new(field, "must be an id")]);
        let mut trailers = http::HeaderMap::new();
        status.add_header(&mut trailers).unwrap();
        let bytes: usize = trailers.values().map(|value| value.len()).sum();
        assert!(bytes < 2_048, "{bytes} bytes of trailers");
        assert!(status.message().contains("release.reserved_percent[éé"));
    }

    #[test]
    fn a_storage_error_tells_the_client_what_to_do_but_not_the_servers_paths() {
        let error = ServiceError::Store(StoreError::Io(
            "syncing /var/lib/prenota/sled/db: Input/output error".into(),
        ));
        let status = Status::from(error);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            !status.message().contains("/var/lib"),
            "{}",
            status.message()
        );
        assert!(status.message().contains("request_id"));
    }
}
