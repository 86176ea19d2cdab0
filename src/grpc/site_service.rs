//! `prenota.v1.SiteService` handlers: the desk of a site (role `site`).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::config::Role;
use crate::domain::booking::{Booking, Reference};
use crate::domain::error::{AllValid, DomainError, FieldViolation};
use crate::grpc::auth::Caller;
use crate::grpc::convert;
use crate::grpc::detached::detached;
use crate::proto;
use crate::proto::site_service_server::SiteService;
use crate::service::{Desk, Engine};

pub struct SiteApi {
    engine: Arc<Engine>,
}

impl SiteApi {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

/// The desks the caller may work: a site token's sites, everything for an admin or in
/// open mode (the gate lets no other role through).
fn desk_of<T>(request: &Request<T>) -> Result<Desk, Status> {
    Ok(match Caller::of(request)? {
        Caller::Token {
            role: Role::Site,
            sites,
            ..
        } => Desk::Sites(sites),
        _ => Desk::Everywhere,
    })
}

fn reference(value: &str) -> Result<Reference, FieldViolation> {
    Reference::parse("reference", value)
}

/// Exactly 4 digits.
fn check_in_code(value: &str) -> Result<u16, FieldViolation> {
    match value.len() == 4 && value.bytes().all(|b| b.is_ascii_digit()) {
        true => value
            .parse()
            .map_err(|_| FieldViolation::new("check_in_code", "must be 4 digits")),
        false => Err(FieldViolation::new("check_in_code", "must be 4 digits")),
    }
}

fn roster_entry(booking: &Booking) -> proto::RosterEntry {
    let series = booking.series.as_ref();
    proto::RosterEntry {
        reference: booking
            .codes
            .map(|codes| codes.reference.to_string())
            .unwrap_or_default(),
        state: convert::booking_state_to_proto(&booking.state) as i32,
        series_id: series.map(|s| s.series_id.to_string()).unwrap_or_default(),
        dose: series.map_or(0, |s| u32::from(s.dose)),
        created_at: Some(convert::timestamp_ms(booking.created_at_unix_ms)),
        attendance_at: convert::attendance_at(&booking.state),
    }
}

#[tonic::async_trait]
impl SiteService for SiteApi {
    async fn list_slot_bookings(
        &self,
        request: Request<proto::ListSlotBookingsRequest>,
    ) -> Result<Response<proto::ListSlotBookingsResponse>, Status> {
        let desk = desk_of(&request)?;
        let body = request.into_inner();
        let limits = self.engine.limits();
        let after = match body.page_token.as_str() {
            "" => Ok(None),
            token => Reference::parse("page_token", token).map(Some),
        };
        let (slot, page_size, after) = (
            convert::slot_key("slot_id", &body.slot_id, limits),
            convert::page_size(body.page_size, limits),
            after,
        )
            .all_valid()?;
        let page = self
            .engine
            .slot_roster(&desk, &slot, (after, page_size))
            .await?;
        Ok(Response::new(proto::ListSlotBookingsResponse {
            bookings: page.bookings.iter().map(roster_entry).collect(),
            next_page_token: page
                .next_after
                .map(|reference| reference.to_string())
                .unwrap_or_default(),
        }))
    }

    async fn check_in(
        &self,
        request: Request<proto::CheckInRequest>,
    ) -> Result<Response<proto::CheckInResponse>, Status> {
        let desk = desk_of(&request)?;
        let body = request.into_inner();
        let (reference, code) = (
            reference(&body.reference),
            check_in_code(&body.check_in_code),
        )
            .all_valid()?;
        let engine = Arc::clone(&self.engine);
        // The write finishes even if the desk's client goes away.
        let view = detached(async move { engine.check_in(&desk, reference, code).await }).await??;
        Ok(Response::new(proto::CheckInResponse {
            booking: Some(convert::booking_to_proto_without_code(&view)),
        }))
    }

    async fn mark_no_show(
        &self,
        request: Request<proto::MarkNoShowRequest>,
    ) -> Result<Response<proto::MarkNoShowResponse>, Status> {
        let desk = desk_of(&request)?;
        let reference = reference(&request.into_inner().reference).map_err(DomainError::from)?;
        let engine = Arc::clone(&self.engine);
        let view = detached(async move { engine.mark_no_show(&desk, reference).await }).await??;
        Ok(Response::new(proto::MarkNoShowResponse {
            booking: Some(convert::booking_to_proto_without_code(&view)),
        }))
    }
}
