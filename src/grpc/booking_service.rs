//! `prenota.v1.BookingService` handlers: validate → convert → engine → convert back.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::config::{CitizenTrust, Limits};
use crate::domain::booking::Reference;
use crate::domain::citizen_id::CitizenIds;
use crate::domain::error::AllValid;
use crate::domain::error::DomainError;
use crate::domain::ids::BookingId;
use crate::grpc::assertion::{AssertedCitizen, Assertions};
use crate::grpc::auth::Caller;
use crate::grpc::connections;
use crate::grpc::detached::detached;
use crate::grpc::{convert, convert_campaign, convert_release, convert_series, status};
use crate::proto;
use crate::proto::booking_service_server::BookingService;
use crate::service::{requests, Engine, RegistrationCommand, ServiceError};
use crate::telemetry;

/// CITIZEN_ASSERTION_INVALID's message when the `sub` is not an id of the id scheme.
const SUB_NOT_AN_ID: &str = "the assertion's sub is not a citizen id of the server's id scheme";

pub struct BookingApi {
    engine: Arc<Engine>,
    /// Verifies the citizen assertions of `asserted` callers.
    assertions: Assertions,
}

impl BookingApi {
    pub fn new(engine: Arc<Engine>, assertions: Assertions) -> Self {
        Self { engine, assertions }
    }

    /// The caller and the request, its `citizen_id` made the citizen it acts for: as
    /// sent by a trusted caller; for an asserted caller the assertion's `sub` (a
    /// `citizen_id` sent too must name the same citizen).
    async fn acting<T: NamesCitizen>(&self, request: Request<T>) -> Result<(Caller, T), Status> {
        self.acting_asserted(request)
            .await
            .map(|(caller, body, _)| (caller, body))
    }

    /// The verified assertion of an asserted caller; `None` for a trusted one.
    async fn assertion<T>(&self, request: &Request<T>) -> Result<Option<AssertedCitizen>, Status> {
        let trust = request
            .extensions()
            .get::<CitizenTrust>()
            .copied()
            .ok_or_else(|| Status::internal("the request passed no authentication gate"))?;
        if trust == CitizenTrust::Trusted {
            return Ok(None);
        }
        let now_s = self.engine.clock().now_unix_ms().div_euclid(1_000);
        let asserted = self
            .assertions
            .verify(request.metadata(), now_s)
            .await
            .map_err(|why| {
                tracing::debug!(%why, "citizen assertion refused");
                ServiceError::CitizenAssertionInvalid(why)
            })?;
        Ok(Some(asserted))
    }

    /// The citizens an asserted caller may book for (its `sub` and `dependants`,
    /// canonical); `None` for a trusted caller.
    async fn bookable_for<T>(&self, request: &Request<T>) -> Result<Option<Vec<String>>, Status> {
        let Some(asserted) = self.assertion(request).await? else {
            return Ok(None);
        };
        let ids = self.engine.citizen_ids();
        let sub = ids
            .canonical(&asserted.sub)
            .map_err(|_| ServiceError::CitizenAssertionInvalid(SUB_NOT_AN_ID))?;
        let mut allowed = vec![sub];
        allowed.extend(
            asserted
                .dependants
                .iter()
                .filter_map(|id| ids.canonical(id).ok()),
        );
        Ok(Some(allowed))
    }

    /// AcceptOffer, DeclineOffer and WithdrawRegistration: act for the citizen, then
    /// convert its (campaign, citizen, request id).
    async fn registration_command<T: NamesRegistration>(
        &self,
        request: Request<T>,
    ) -> Result<RegistrationCommand, Status> {
        let (caller, body) = self.acting(request).await?;
        Ok(convert_campaign::registration_command(
            body.registration(),
            self.engine.limits(),
            self.engine.citizen_ids(),
            &caller,
        )?)
    }

    /// `acting`, with the verified assertion of an asserted caller (its birth year and
    /// groups decide a campaign's eligibility).
    async fn acting_asserted<T: NamesCitizen>(
        &self,
        request: Request<T>,
    ) -> Result<(Caller, T, Option<AssertedCitizen>), Status> {
        let caller = Caller::of(&request)?;
        let Some(asserted) = self.assertion(&request).await? else {
            return Ok((caller, request.into_inner(), None));
        };
        let ids = self.engine.citizen_ids();
        let sub = ids
            .canonical(&asserted.sub)
            .map_err(|_| ServiceError::CitizenAssertionInvalid(SUB_NOT_AN_ID))?;
        let mut body = request.into_inner();
        let sent = body.citizen_id();
        if !sent.is_empty() {
            // A malformed id is the caller's field error, not another citizen.
            let canonical = ids.canonical(sent).map_err(DomainError::from)?;
            if canonical != sub {
                return Err(ServiceError::CitizenMismatch.into());
            }
        }
        *sent = sub;
        Ok((caller, body, Some(asserted)))
    }
}

/// A request that names the citizen it acts for.
trait NamesCitizen {
    fn citizen_id(&mut self) -> &mut String;
}

/// Every request type with a `citizen_id` field names its citizen there.
macro_rules! names_citizen {
    ($($request:ty),+) => {
        $(impl NamesCitizen for $request {
            fn citizen_id(&mut self) -> &mut String {
                &mut self.citizen_id
            }
        })+
    };
}

names_citizen!(
    proto::BookRequest,
    proto::BookSeriesRequest,
    proto::HoldSlotRequest,
    proto::GetBookingRequest,
    proto::GetBookingByReferenceRequest,
    proto::CancelBookingRequest,
    proto::RescheduleBookingRequest,
    proto::ListCitizenBookingsRequest,
    proto::JoinQueueRequest,
    proto::GetQueueTicketRequest,
    proto::PreRegisterRequest,
    proto::GetRegistrationRequest,
    proto::AcceptOfferRequest,
    proto::DeclineOfferRequest,
    proto::WithdrawRegistrationRequest
);

/// A request that answers a campaign registration: (campaign, citizen, request id).
trait NamesRegistration: NamesCitizen {
    fn registration(&self) -> (&str, &str, &str);
}

macro_rules! names_registration {
    ($($request:ty),+) => {
        $(impl NamesRegistration for $request {
            fn registration(&self) -> (&str, &str, &str) {
                (&self.campaign_id, &self.citizen_id, &self.request_id)
            }
        })+
    };
}

names_registration!(
    proto::AcceptOfferRequest,
    proto::DeclineOfferRequest,
    proto::WithdrawRegistrationRequest
);

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

/// The offer a request names by its `hold_id`, if it names one.
fn named_offer(hold_id: &str) -> Result<Option<BookingId>, Status> {
    match hold_id {
        "" => Ok(None),
        id => Ok(Some(
            BookingId::parse("hold_id", id).map_err(DomainError::from)?,
        )),
    }
}

/// Runs `work` (the engine's `command`) detached, counts its outcome there (also when
/// the call is gone: past its deadline, the work still ends) and passes it on. An
/// outcome answered again (a retry, or a copy of a request in flight) is counted as
/// `REPLAYED`, not as a new booking or refusal.
async fn detached_counted<T: Send + 'static>(
    command: Command,
    work: impl std::future::Future<Output = Result<T, ServiceError>> + Send + 'static,
) -> Result<T, Status> {
    let counted = async move {
        let (result, replayed) = requests::noting_replays(work).await;
        let outcome = match (&result, replayed) {
            (_, true) => "REPLAYED",
            (Ok(_), false) => "OK",
            (Err(error), false) => status::reason(error),
        };
        count_outcome(command, outcome);
        result
    };
    Ok(detached(counted).await??)
}

impl BookingApi {
    /// The steps every citizen write shares: act for the citizen, convert the request
    /// (its request id scoped to the caller), run it detached and count its outcome.
    async fn citizen_write<Body, Cmd, T, F>(
        &self,
        request: Request<Body>,
        (command, convert): (Command, Convert<Body, Cmd>),
        work: impl FnOnce(Arc<Engine>, Cmd) -> F,
    ) -> Result<T, Status>
    where
        Body: NamesCitizen,
        Cmd: Send + 'static,
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, ServiceError>> + Send + 'static,
    {
        let (caller, body) = self.acting(request).await?;
        let ids = self.engine.citizen_ids();
        let converted = convert(body, self.engine.limits(), ids, &caller)?;
        detached_counted(command, work(Arc::clone(&self.engine), converted)).await
    }
}

/// A `convert::*_from_proto` of a citizen write: request, limits, id scheme, caller.
type Convert<Body, Cmd> = fn(Body, &Limits, &CitizenIds, &Caller) -> Result<Cmd, DomainError>;

#[tonic::async_trait]
impl BookingService for BookingApi {
    type WatchAvailabilityStream = std::pin::Pin<
        Box<
            dyn tokio_stream::Stream<Item = Result<proto::WatchAvailabilityResponse, Status>>
                + Send,
        >,
    >;

    async fn watch_availability(
        &self,
        request: Request<proto::WatchAvailabilityRequest>,
    ) -> Result<Response<Self::WatchAvailabilityStream>, Status> {
        use tokio_stream::StreamExt;
        let stalled = connections::close_on_idle(&request);
        let caller = Caller::of(&request)?;
        let channel = caller.channel();
        let now_unix_ms = self.engine.clock().now_unix_ms();
        let query =
            convert::watch_from_proto(request.into_inner(), self.engine.limits(), now_unix_ms)?;
        let token = caller.actor();
        let (slots, permit) = self.engine.watch_availability((&query, &token), stalled)?;
        let engine = Arc::clone(&self.engine);
        let slots = tokio_stream::wrappers::ReceiverStream::new(slots).map(move |item| {
            item.map(|(site, slot)| proto::WatchAvailabilityResponse {
                slot: Some(convert::slot_to_proto(
                    &site,
                    &slot,
                    engine.slot_shown(&site, &slot, Some(&channel)),
                )),
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(connections::holding(slots, permit))))
    }

    async fn search_slots(
        &self,
        request: Request<proto::SearchSlotsRequest>,
    ) -> Result<Response<proto::SearchSlotsResponse>, Status> {
        let now_unix_ms = self.engine.clock().now_unix_ms();
        let channel = Caller::of(&request)?.channel();
        let query =
            convert::search_from_proto(request.into_inner(), self.engine.limits(), now_unix_ms)?;
        let page = self.engine.search(&query)?;
        Ok(Response::new(convert::search_answer(
            &self.engine,
            &page,
            query.only_available,
            &channel,
        )))
    }

    async fn book(
        &self,
        request: Request<proto::BookRequest>,
    ) -> Result<Response<proto::BookResponse>, Status> {
        let book = (Command::Book, convert::book_from_proto as Convert<_, _>);
        let view = self
            .citizen_write(request, book, |engine, command| async move {
                engine.book(command).await
            })
            .await?;
        Ok(Response::new(proto::BookResponse {
            booking: Some(convert::booking_to_proto(&view)),
        }))
    }

    async fn book_series(
        &self,
        request: Request<proto::BookSeriesRequest>,
    ) -> Result<Response<proto::BookSeriesResponse>, Status> {
        let (caller, body) = self.acting(request).await?;
        let engine = Arc::clone(&self.engine);
        let command = convert_series::book_series_from_proto(
            body,
            (engine.limits(), engine.citizen_ids()),
            &caller,
            caller.channel(),
        )?;
        let series = async move { engine.book_series(command).await };
        let bookings = detached_counted(Command::Book, series).await?;
        Ok(Response::new(proto::BookSeriesResponse {
            bookings: bookings.iter().map(convert::booking_to_proto).collect(),
        }))
    }

    async fn book_group(
        &self,
        request: Request<proto::BookGroupRequest>,
    ) -> Result<Response<proto::BookGroupResponse>, Status> {
        let allowed = self.bookable_for(&request).await?;
        let caller = Caller::of(&request)?;
        let engine = Arc::clone(&self.engine);
        let mut command = convert::group_from_proto(
            request.into_inner(),
            engine.limits(),
            engine.citizen_ids(),
            &caller,
        )?;
        if let Some(allowed) = allowed {
            if command.citizen_ids.iter().any(|id| !allowed.contains(id)) {
                return Err(ServiceError::CitizenMismatch.into());
            }
            // The subject asks, for itself or its dependants.
            command.asking = allowed.into_iter().next();
        }
        let group = async move { engine.book_group(command).await };
        let bookings = detached_counted(Command::Book, group).await?;
        Ok(Response::new(proto::BookGroupResponse {
            bookings: bookings.iter().map(convert::booking_to_proto).collect(),
        }))
    }

    async fn hold_slot(
        &self,
        request: Request<proto::HoldSlotRequest>,
    ) -> Result<Response<proto::HoldSlotResponse>, Status> {
        let hold = (Command::Hold, convert::hold_from_proto as Convert<_, _>);
        let hold = self
            .citizen_write(request, hold, |engine, command| async move {
                engine.hold(command).await
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
        let (_, body) = self.acting(request).await?;
        let (booking_id, citizen_id) =
            convert::get_booking_from_proto(body, self.engine.citizen_ids())?;
        let view = self.engine.citizen_booking(booking_id, &citizen_id).await?;
        Ok(Response::new(proto::GetBookingResponse {
            booking: Some(convert::booking_to_proto(&view)),
        }))
    }

    async fn get_booking_by_reference(
        &self,
        request: Request<proto::GetBookingByReferenceRequest>,
    ) -> Result<Response<proto::GetBookingByReferenceResponse>, Status> {
        let (_, body) = self.acting(request).await?;
        let (reference, citizen_id) = (
            Reference::parse("reference", &body.reference),
            self.engine.citizen_ids().canonical(&body.citizen_id),
        )
            .all_valid()?;
        let view = self
            .engine
            .booking_by_reference(reference, &citizen_id)
            .await?;
        Ok(Response::new(proto::GetBookingByReferenceResponse {
            booking: Some(convert::booking_to_proto(&view)),
        }))
    }

    async fn cancel_booking(
        &self,
        request: Request<proto::CancelBookingRequest>,
    ) -> Result<Response<proto::CancelBookingResponse>, Status> {
        let cancel = (Command::Cancel, convert::cancel_from_proto as Convert<_, _>);
        let view = self
            .citizen_write(request, cancel, |engine, command| async move {
                engine.cancel(command).await
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
        let reschedule = (
            Command::Reschedule,
            convert::reschedule_from_proto as Convert<_, _>,
        );
        let view = self
            .citizen_write(request, reschedule, |engine, command| async move {
                engine.reschedule(command).await
            })
            .await?;
        Ok(Response::new(proto::RescheduleBookingResponse {
            booking: Some(convert::booking_to_proto(&view)),
        }))
    }

    async fn join_queue(
        &self,
        request: Request<proto::JoinQueueRequest>,
    ) -> Result<Response<proto::JoinQueueResponse>, Status> {
        let (caller, body) = self.acting(request).await?;
        let limits = self.engine.limits();
        let command = convert_release::join_queue_from_proto(
            body,
            limits,
            self.engine.citizen_ids(),
            &caller.actor(),
        )?;
        let (release_id, ticket) = detached({
            let engine = Arc::clone(&self.engine);
            async move { engine.join_queue(command).await }
        })
        .await??;
        Ok(Response::new(proto::JoinQueueResponse {
            ticket: Some(convert_release::ticket_to_proto(&release_id, &ticket)),
        }))
    }

    async fn get_queue_ticket(
        &self,
        request: Request<proto::GetQueueTicketRequest>,
    ) -> Result<Response<proto::GetQueueTicketResponse>, Status> {
        let (_, body) = self.acting(request).await?;
        let (release_id, citizen_id) = convert_release::get_ticket_from_proto(
            body,
            self.engine.limits(),
            self.engine.citizen_ids(),
        )?;
        let ticket = self.engine.queue_ticket(&release_id, &citizen_id)?;
        Ok(Response::new(proto::GetQueueTicketResponse {
            ticket: Some(convert_release::ticket_to_proto(&release_id, &ticket)),
        }))
    }

    async fn pre_register(
        &self,
        request: Request<proto::PreRegisterRequest>,
    ) -> Result<Response<proto::PreRegisterResponse>, Status> {
        let (caller, body, asserted) = self.acting_asserted(request).await?;
        let limits = self.engine.limits();
        let claims = asserted
            .map(|citizen| convert_campaign::claims(citizen.birth_year, citizen.groups, limits))
            .transpose()
            .map_err(|why| {
                tracing::debug!(%why, "citizen assertion refused");
                ServiceError::CitizenAssertionInvalid(why)
            })?;
        let command = convert_campaign::pre_register_from_proto(
            body,
            self.engine.limits(),
            self.engine.citizen_ids(),
            (&caller, claims),
        )?;
        let view = detached({
            let engine = Arc::clone(&self.engine);
            async move { engine.pre_register(command).await }
        })
        .await??;
        Ok(Response::new(proto::PreRegisterResponse {
            registration: Some(convert_campaign::registration_to_proto(&view)),
        }))
    }

    async fn get_registration(
        &self,
        request: Request<proto::GetRegistrationRequest>,
    ) -> Result<Response<proto::GetRegistrationResponse>, Status> {
        let (_, body) = self.acting(request).await?;
        let (campaign_id, citizen_id) = convert_campaign::get_registration_from_proto(
            body,
            self.engine.limits(),
            self.engine.citizen_ids(),
        )?;
        let view = self.engine.registration_of(&campaign_id, &citizen_id)?;
        Ok(Response::new(proto::GetRegistrationResponse {
            registration: Some(convert_campaign::registration_to_proto(&view)),
        }))
    }

    async fn accept_offer(
        &self,
        request: Request<proto::AcceptOfferRequest>,
    ) -> Result<Response<proto::AcceptOfferResponse>, Status> {
        let offer = named_offer(&request.get_ref().hold_id)?;
        let command = self.registration_command(request).await?;
        let engine = Arc::clone(&self.engine);
        let accept = async move { engine.accept_offer(command, offer).await };
        let booking = detached_counted(Command::Book, accept).await?;
        Ok(Response::new(proto::AcceptOfferResponse {
            booking: Some(convert::booking_to_proto(&booking)),
        }))
    }

    async fn decline_offer(
        &self,
        request: Request<proto::DeclineOfferRequest>,
    ) -> Result<Response<proto::DeclineOfferResponse>, Status> {
        let offer = named_offer(&request.get_ref().hold_id)?;
        let command = self.registration_command(request).await?;
        let view = detached({
            let engine = Arc::clone(&self.engine);
            async move { engine.decline_offer(command, offer).await }
        })
        .await??;
        Ok(Response::new(proto::DeclineOfferResponse {
            registration: Some(convert_campaign::registration_to_proto(&view)),
        }))
    }

    async fn withdraw_registration(
        &self,
        request: Request<proto::WithdrawRegistrationRequest>,
    ) -> Result<Response<proto::WithdrawRegistrationResponse>, Status> {
        let command = self.registration_command(request).await?;
        let view = detached({
            let engine = Arc::clone(&self.engine);
            async move { engine.withdraw_registration(command).await }
        })
        .await??;
        Ok(Response::new(proto::WithdrawRegistrationResponse {
            registration: Some(convert_campaign::registration_to_proto(&view)),
        }))
    }

    async fn list_citizen_bookings(
        &self,
        request: Request<proto::ListCitizenBookingsRequest>,
    ) -> Result<Response<proto::ListCitizenBookingsResponse>, Status> {
        let (_, body) = self.acting(request).await?;
        let query = convert::citizen_bookings_from_proto(
            body,
            self.engine.limits(),
            self.engine.citizen_ids(),
        )?;
        let page = self.engine.citizen_bookings(query).await?;
        Ok(Response::new(proto::ListCitizenBookingsResponse {
            bookings: page
                .bookings
                .iter()
                .map(convert::booking_to_proto)
                .collect(),
            next_page_token: page
                .next_after
                .map(convert::booking_page_token_of)
                .unwrap_or_default(),
            holds: page.holds.iter().map(convert::hold_to_proto).collect(),
        }))
    }
}
