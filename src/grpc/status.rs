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

/// Field violations spelled out in a status message; the details carry every one.
const MESSAGE_VIOLATIONS_MAX: usize = 5;

fn with_reason(
    code: Code,
    message: String,
    reason: &str,
    metadata: HashMap<String, String>,
) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

fn invalid_argument(violations: Vec<crate::domain::error::FieldViolation>) -> Status {
    // The message names the first few; the details carry them all.
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
    let violations: Vec<FieldViolation> = violations
        .into_iter()
        .map(|v| FieldViolation::new(v.field, v.description))
        .collect();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {message}"),
        ErrorDetails::with_bad_request(violations),
    )
}

/// The `ErrorInfo` reason a client gets for this error (`INVALID_ARGUMENT` for field
/// violations, which carry `BadRequest` details instead). Also the `outcome` label of
/// the booking metrics.
pub fn reason(error: &ServiceError) -> &'static str {
    match error {
        ServiceError::Domain(domain) => match domain {
            DomainError::Invalid(_) => "INVALID_ARGUMENT",
            DomainError::SlotFull(_) => "SLOT_FULL",
            DomainError::CitizenAlreadyBooked { .. } => "CITIZEN_ALREADY_BOOKED",
            DomainError::NotFound(Missing::Site) => "SITE_NOT_FOUND",
            DomainError::NotFound(Missing::Slot) => "SLOT_NOT_FOUND",
            DomainError::NotFound(Missing::Booking) => "BOOKING_NOT_FOUND",
            DomainError::NotFound(Missing::Hold) => "HOLD_NOT_FOUND",
            DomainError::SlotClosed(_) => "SLOT_CLOSED",
            DomainError::HoldExpired => "HOLD_EXPIRED",
            DomainError::SlotStarted(_) => "SLOT_STARTED",
            DomainError::BookingNotActive(_) => "BOOKING_NOT_ACTIVE",
            DomainError::CapacityBelowBooked { .. } => "CAPACITY_BELOW_BOOKED",
            DomainError::RequestIdReused => "REQUEST_ID_REUSED",
        },
        ServiceError::Store(store) => match store {
            StoreError::Overloaded => "OVERLOADED",
            StoreError::Failed | StoreError::Io(_) => "STORAGE_FAILED",
            StoreError::Closed => "SHUTTING_DOWN",
            StoreError::Corrupt(_) => "STORAGE_CORRUPT",
        },
        ServiceError::Recovery(_) => "RECOVERY_FAILED",
        ServiceError::Abandoned => "REQUEST_ABANDONED",
        ServiceError::RateLimited { .. } => "RATE_LIMITED",
        ServiceError::Shed => "OVERLOADED",
        ServiceError::Recovering => "RECOVERING",
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        let message = error.to_string();
        let why = reason(&error);
        let none = HashMap::new;
        match error {
            ServiceError::Domain(domain) => match domain {
                DomainError::Invalid(violations) => invalid_argument(violations),
                DomainError::SlotFull(slot) => with_reason(
                    Code::FailedPrecondition,
                    message,
                    why,
                    HashMap::from([("slot_id".to_string(), slot.to_string())]),
                ),
                DomainError::CitizenAlreadyBooked { booking_id } => with_reason(
                    Code::AlreadyExists,
                    message,
                    why,
                    HashMap::from([("booking_id".to_string(), booking_id.to_string())]),
                ),
                DomainError::NotFound(_) => with_reason(Code::NotFound, message, why, none()),
                DomainError::SlotClosed(slot) => with_reason(
                    Code::FailedPrecondition,
                    message,
                    why,
                    HashMap::from([("slot_id".to_string(), slot.to_string())]),
                ),
                DomainError::HoldExpired => {
                    with_reason(Code::FailedPrecondition, message, why, none())
                }
                DomainError::SlotStarted(_) => {
                    with_reason(Code::FailedPrecondition, message, why, none())
                }
                DomainError::BookingNotActive(_) => {
                    with_reason(Code::FailedPrecondition, message, why, none())
                }
                DomainError::CapacityBelowBooked { slot, taken, .. } => with_reason(
                    Code::FailedPrecondition,
                    message,
                    why,
                    HashMap::from([
                        ("slot_id".to_string(), slot.to_string()),
                        ("taken".to_string(), taken.to_string()),
                    ]),
                ),
                DomainError::RequestIdReused => {
                    with_reason(Code::InvalidArgument, message, why, none())
                }
            },
            ServiceError::Store(store) => match store {
                StoreError::Overloaded => {
                    let mut details = ErrorDetails::with_error_info(why, ERROR_DOMAIN, none());
                    details.set_retry_info(Some(OVERLOADED_RETRY_DELAY));
                    Status::with_error_details(Code::Unavailable, message, details)
                }
                StoreError::Failed | StoreError::Io(_) => {
                    with_reason(Code::Unavailable, message, why, none())
                }
                StoreError::Closed => with_reason(Code::Unavailable, message, why, none()),
                StoreError::Corrupt(_) => with_reason(Code::Internal, message, why, none()),
            },
            ServiceError::Recovery(_) => with_reason(Code::Internal, message, why, none()),
            // Safe to retry with the same request_id: at most one booking results.
            ServiceError::Abandoned => with_reason(Code::Aborted, message, why, none()),
            ServiceError::RateLimited { retry_after } => {
                let mut details = ErrorDetails::with_error_info(why, ERROR_DOMAIN, none());
                details.set_retry_info(Some(retry_after));
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            ServiceError::Shed => {
                let mut details = ErrorDetails::with_error_info(why, ERROR_DOMAIN, none());
                details.set_retry_info(Some(OVERLOADED_RETRY_DELAY));
                Status::with_error_details(Code::Unavailable, message, details)
            }
            ServiceError::Recovering => {
                let mut details = ErrorDetails::with_error_info(why, ERROR_DOMAIN, none());
                details.set_retry_info(Some(RECOVERING_RETRY_DELAY));
                Status::with_error_details(Code::Unavailable, message, details)
            }
        }
    }
}

impl From<DomainError> for Status {
    fn from(error: DomainError) -> Self {
        ServiceError::Domain(error).into()
    }
}
