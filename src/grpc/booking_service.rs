//! `prenota.v1.BookingService` handlers: validate → convert → engine → convert back.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::domain::error::{DomainError, Violations};
use crate::domain::ids::BookingId;
use crate::grpc::{convert, status};
use crate::proto;
use crate::proto::booking_service_server::BookingService;
use crate::service::{BookCommand, CancelCommand, Engine, HoldCommand, RescheduleCommand};
use crate::telemetry;

pub struct BookingApi {
    engine: Arc<Engine>,
}

impl BookingApi {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

/// The booking commands whose outcomes are counted (`prenota_bookings_total`,
/// `prenota_holds_total`).
#[derive(Clone, Copy)]
enum Command {
    Book,
    Hold,
    Cancel,
    Reschedule,
}

fn count_outcome(command: Command, outcome: &'static str) {
    let command = match command {
        Command::Hold => {
            metrics::counter!(telemetry::HOLDS, "outcome" => outcome).increment(1);
            return;
        }
        Command::Book => "book",
        Command::Cancel => "cancel",
        Command::Reschedule => "reschedule",
    };
    metrics::counter!(telemetry::BOOKINGS, "command" => command, "outcome" => outcome).increment(1);
}

/// Runs a mutation in its own task: a client that disconnects cannot cancel it
/// half-way between taking a place and making the booking durable. Counts its outcome.
async fn detached<T: Send + 'static>(
    command: Command,
    work: impl std::future::Future<Output = Result<T, crate::service::ServiceError>> + Send + 'static,
) -> Result<T, Status> {
    match tokio::spawn(work).await {
        Ok(result) => {
            count_outcome(
                command,
                match &result {
                    Ok(_) => "OK",
                    Err(error) => status::reason(error),
                },
            );
            result.map_err(Status::from)
        }
        Err(join_error) => {
            tracing::error!(%join_error, "a mutation task failed");
            Err(Status::internal(
                "the request failed inside the server; retry with the same request_id",
            ))
        }
    }
}

#[tonic::async_trait]
impl BookingService for BookingApi {
    async fn search_slots(
        &self,
        request: Request<proto::SearchSlotsRequest>,
    ) -> Result<Response<proto::SearchSlotsResponse>, Status> {
        let now_unix_ms = self.engine.clock().now_unix_ms();
        let query =
            convert::search_from_proto(request.into_inner(), self.engine.limits(), now_unix_ms)?;
        let page = self.engine.search(&query)?;
        Ok(Response::new(proto::SearchSlotsResponse {
            slots: page
                .slots
                .iter()
                .map(|(site, slot)| convert::slot_to_proto(site, slot))
                .collect(),
            next_page_token: page
                .next_after
                .map(|key| key.to_string())
                .unwrap_or_default(),
        }))
    }

    async fn book(
        &self,
        request: Request<proto::BookRequest>,
    ) -> Result<Response<proto::BookResponse>, Status> {
        let proto::BookRequest {
            slot_id,
            citizen_id,
            request_id,
            hold_id,
        } = request.into_inner();
        let limits = self.engine.limits();
        let mut v = Violations::default();
        let slot = v.check(convert::slot_key("slot_id", &slot_id, limits));
        let citizen_id = v.check(convert::citizen_id(&citizen_id, limits));
        let request_key = v.check(convert::request_key(&request_id, limits));
        let hold_id = match hold_id {
            Some(hold_id) => v.check(BookingId::parse("hold_id", &hold_id)).map(Some),
            None => Some(None),
        };
        v.finish()?;
        let (Some(slot), Some(citizen_id), Some(request), Some(hold_id)) =
            (slot, citizen_id, request_key, hold_id)
        else {
            return Err(Status::internal("validation passed without values"));
        };
        let engine = Arc::clone(&self.engine);
        let view = detached(Command::Book, async move {
            engine
                .book(BookCommand {
                    slot,
                    citizen_id,
                    request,
                    hold_id,
                })
                .await
        })
        .await?;
        Ok(Response::new(proto::BookResponse {
            booking: Some(convert::booking_to_proto(&view)),
        }))
    }

    async fn hold_slot(
        &self,
        request: Request<proto::HoldSlotRequest>,
    ) -> Result<Response<proto::HoldSlotResponse>, Status> {
        let request = request.into_inner();
        let limits = self.engine.limits();
        let mut v = Violations::default();
        let slot = v.check(convert::slot_key("slot_id", &request.slot_id, limits));
        let citizen_id = v.check(convert::citizen_id(&request.citizen_id, limits));
        let request_key = v.check(convert::request_key(&request.request_id, limits));
        let ttl_seconds = match request.ttl_seconds {
            0 => Some(limits.hold_ttl_seconds_default),
            ttl if ttl <= limits.hold_ttl_seconds_max => Some(ttl),
            _ => {
                v.push(
                    "ttl_seconds",
                    format!(
                        "must be between 0 (default {}) and {}",
                        limits.hold_ttl_seconds_default, limits.hold_ttl_seconds_max
                    ),
                );
                None
            }
        };
        v.finish()?;
        let (Some(slot), Some(citizen_id), Some(request), Some(ttl_seconds)) =
            (slot, citizen_id, request_key, ttl_seconds)
        else {
            return Err(Status::internal("validation passed without values"));
        };
        let engine = Arc::clone(&self.engine);
        let hold = detached(Command::Hold, async move {
            engine
                .hold(HoldCommand {
                    slot,
                    citizen_id,
                    request,
                    ttl_seconds,
                })
                .await
        })
        .await?;
        Ok(Response::new(proto::HoldSlotResponse {
            hold: Some(convert::hold_to_proto(&hold)),
        }))
    }

    async fn get_booking(
        &self,
        request: Request<proto::GetBookingRequest>,
    ) -> Result<Response<proto::GetBookingResponse>, Status> {
        let booking_id =
            convert::booking_id(&request.into_inner().booking_id).map_err(DomainError::from)?;
        let view = self.engine.booking(booking_id)?;
        Ok(Response::new(proto::GetBookingResponse {
            booking: Some(convert::booking_to_proto(&view)),
        }))
    }

    async fn cancel_booking(
        &self,
        request: Request<proto::CancelBookingRequest>,
    ) -> Result<Response<proto::CancelBookingResponse>, Status> {
        let request = request.into_inner();
        let limits = self.engine.limits();
        let mut v = Violations::default();
        let booking_id = v.check(convert::booking_id(&request.booking_id));
        let citizen_id = v.check(convert::citizen_id(&request.citizen_id, limits));
        let request_key = v.check(convert::request_key(&request.request_id, limits));
        v.finish()?;
        let (Some(booking_id), Some(citizen_id), Some(request)) =
            (booking_id, citizen_id, request_key)
        else {
            return Err(Status::internal("validation passed without values"));
        };
        let engine = Arc::clone(&self.engine);
        let view = detached(Command::Cancel, async move {
            engine
                .cancel(CancelCommand {
                    booking_id,
                    citizen_id,
                    request,
                })
                .await
        })
        .await?;
        Ok(Response::new(proto::CancelBookingResponse {
            booking: Some(convert::booking_to_proto(&view)),
        }))
    }

    async fn reschedule_booking(
        &self,
        request: Request<proto::RescheduleBookingRequest>,
    ) -> Result<Response<proto::RescheduleBookingResponse>, Status> {
        let request = request.into_inner();
        let limits = self.engine.limits();
        let mut v = Violations::default();
        let booking_id = v.check(convert::booking_id(&request.booking_id));
        let citizen_id = v.check(convert::citizen_id(&request.citizen_id, limits));
        let new_slot = v.check(convert::slot_key(
            "new_slot_id",
            &request.new_slot_id,
            limits,
        ));
        let request_key = v.check(convert::request_key(&request.request_id, limits));
        v.finish()?;
        let (Some(booking_id), Some(citizen_id), Some(new_slot), Some(request)) =
            (booking_id, citizen_id, new_slot, request_key)
        else {
            return Err(Status::internal("validation passed without values"));
        };
        let engine = Arc::clone(&self.engine);
        let view = detached(Command::Reschedule, async move {
            engine
                .reschedule(RescheduleCommand {
                    booking_id,
                    citizen_id,
                    new_slot,
                    request,
                })
                .await
        })
        .await?;
        Ok(Response::new(proto::RescheduleBookingResponse {
            booking: Some(convert::booking_to_proto(&view)),
        }))
    }

    async fn list_citizen_bookings(
        &self,
        request: Request<proto::ListCitizenBookingsRequest>,
    ) -> Result<Response<proto::ListCitizenBookingsResponse>, Status> {
        let query =
            convert::citizen_bookings_from_proto(request.into_inner(), self.engine.limits())?;
        let engine = Arc::clone(&self.engine);
        // Reads the store: keep it off the async workers.
        let page = tokio::task::spawn_blocking(move || engine.citizen_bookings(&query))
            .await
            .map_err(|_| Status::internal("ListCitizenBookings failed inside the server"))??;
        Ok(Response::new(proto::ListCitizenBookingsResponse {
            bookings: page
                .bookings
                .iter()
                .map(convert::booking_to_proto)
                .collect(),
            next_page_token: page.next_after.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }
}
