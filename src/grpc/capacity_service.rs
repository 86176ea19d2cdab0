//! `prenota.v1.CapacityService` handlers: validate → convert → engine → convert back.

use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::domain::error::{DomainError, FieldViolation};
use crate::grpc::auth::Caller;
use crate::grpc::connections::{close_on_idle, holding};
use crate::grpc::detached::detached;
use crate::grpc::stream_end::StreamEnd;
use crate::grpc::{convert, convert_campaign, convert_release, convert_series};
use crate::limits::Limits;
use crate::proto;
use crate::proto::capacity_service_server::CapacityService;
use crate::service::exports::{ExportKind, Feed};
use crate::service::{Actor, Engine, EventScope, ExportScope, ImportRow, ServiceError};
use crate::store::StoreError;

pub struct CapacityApi {
    engine: Arc<Engine>,
}

impl CapacityApi {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

impl CapacityApi {
    /// Runs an authority write on the engine, detached, as the caller: the engine
    /// checks its regions under the authority lock.
    async fn write<T, F>(
        &self,
        caller: &Caller,
        work: impl FnOnce(Arc<Engine>, Actor) -> F,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, ServiceError>> + Send + 'static,
    {
        Ok(detached(work(Arc::clone(&self.engine), caller.authority())).await??)
    }
}

/// A client that went away mid-import (killed, its connection reset) is a client's
/// stream error: CANCELLED at debug level, not an UNKNOWN server failure logged as a
/// warning. Nothing was applied.
fn broken_stream(status: Status) -> Status {
    match status.code() {
        tonic::Code::Unknown => Status::cancelled(format!(
            "the import's stream broke before its end (nothing was applied): {}",
            status.message()
        )),
        _ => status,
    }
}

/// An import stream as received: its valid rows, and the violations of the others.
struct ReceivedImport {
    rows: Vec<ImportRow>,
    received: u64,
    /// The rows the client says the whole import carries, if it says.
    rows_total: Option<u64>,
    /// Any message asking for a dry run makes the whole import one.
    dry_run: bool,
    /// Rows with errors, and the violations of the first `import_errors_reported_max`.
    errors: usize,
    violations: Vec<FieldViolation>,
}

impl ReceivedImport {
    /// Reads the whole stream, at most `import_rows_max` rows, checking each row.
    async fn read(
        mut stream: Streaming<proto::ImportCapacityRequest>,
        limits: &Limits,
    ) -> Result<Self, Status> {
        let mut import = Self {
            rows: Vec::new(),
            received: 0,
            rows_total: None,
            dry_run: false,
            errors: 0,
            violations: Vec::new(),
        };
        while let Some(message) = stream.message().await.map_err(broken_stream)? {
            import.dry_run |= message.dry_run;
            if let Some(total) = message.rows_total {
                import.note_total(total, limits)?;
            }
            for row in message.rows {
                import.received += 1;
                if import.received as usize > limits.import_rows_max {
                    return Err(too_many_rows(limits).into());
                }
                match convert::import_row(row, limits) {
                    Ok(row) => import.rows.push(row),
                    Err(found) => {
                        import.errors += 1;
                        if import.errors <= limits.import_errors_reported_max {
                            import.violations.extend(found);
                        }
                    }
                }
            }
        }
        Ok(import)
    }

    /// Keeps the `rows_total` a message announced: every message saying it must agree,
    /// and an import announced past `import_rows_max` is refused before its rows come.
    fn note_total(&mut self, total: u64, limits: &Limits) -> Result<(), DomainError> {
        if *self.rows_total.get_or_insert(total) != total {
            return Err(DomainError::invalid(
                "rows_total",
                format!(
                    "the import's messages disagree: rows_total {} then {total}",
                    self.rows_total.unwrap_or_default()
                ),
            ));
        }
        if total > limits.import_rows_max as u64 {
            return Err(too_many_rows(limits));
        }
        Ok(())
    }

    /// Refuses a stream cut short (fewer or more rows than its `rows_total`), an empty
    /// import, or one with any bad row (listing the first ones).
    fn check(&self, limits: &Limits) -> Result<(), DomainError> {
        if let Some(total) = self.rows_total.filter(|total| *total != self.received) {
            return Err(DomainError::invalid(
                "rows_total",
                format!(
                    "the import's stream carried {} rows, not the {total} it announced: \
                     it was cut short (nothing was applied); send the whole file again",
                    self.received
                ),
            ));
        }
        if self.received == 0 {
            return Err(DomainError::invalid("rows", "the import holds no rows"));
        }
        if self.errors == 0 {
            return Ok(());
        }
        let mut violations = Vec::with_capacity(self.violations.len() + 1);
        // First: the answer keeps only its first 4 KiB of violations.
        if self.errors > limits.import_errors_reported_max {
            violations.push(FieldViolation::new(
                "rows",
                format!(
                    "{} rows have errors; only those of the first {} are listed",
                    self.errors, limits.import_errors_reported_max
                ),
            ));
        }
        violations.extend(self.violations.iter().cloned());
        Err(DomainError::Invalid(violations))
    }
}

fn too_many_rows(limits: &Limits) -> DomainError {
    DomainError::invalid(
        "rows",
        format!(
            "an import holds at most {} rows; split the file",
            limits.import_rows_max
        ),
    )
}

type AuditStream =
    Pin<Box<dyn Stream<Item = Result<proto::ExportAuditLogResponse, Status>> + Send>>;
type ExportStream =
    Pin<Box<dyn Stream<Item = Result<proto::ExportBookingsResponse, Status>> + Send>>;
type EventStream = Pin<Box<dyn Stream<Item = Result<proto::WatchEventsResponse, Status>> + Send>>;
type RegistrationStream =
    Pin<Box<dyn Stream<Item = Result<proto::ExportRegistrationsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl CapacityService for CapacityApi {
    async fn upsert_site(
        &self,
        request: Request<proto::UpsertSiteRequest>,
    ) -> Result<Response<proto::UpsertSiteResponse>, Status> {
        let caller = Caller::of(&request)?;
        let site = convert::site_from_proto(request.into_inner().site, self.engine.limits())?;
        let site = self
            .write(&caller, |engine, actor| async move {
                engine.upsert_site(site, &actor).await
            })
            .await?;
        Ok(Response::new(proto::UpsertSiteResponse {
            site: Some(convert::site_to_proto(&site)),
        }))
    }

    async fn publish_schedule(
        &self,
        request: Request<proto::PublishScheduleRequest>,
    ) -> Result<Response<proto::PublishScheduleResponse>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        let limits = self.engine.limits();
        let (site_id, service_id, schedule) = convert::publish_from_proto(&request, limits)?;
        let outcome = self
            .write(&caller, |engine, actor| async move {
                engine
                    .publish_schedule(&site_id, &service_id, &schedule, &actor)
                    .await
            })
            .await?;
        Ok(Response::new(proto::PublishScheduleResponse {
            slots_created: outcome.slots_created,
            slots_updated: outcome.slots_updated,
            total_capacity: outcome.total_capacity,
            slots_past: outcome.slots_past,
        }))
    }

    async fn import_capacity(
        &self,
        request: Request<Streaming<proto::ImportCapacityRequest>>,
    ) -> Result<Response<proto::ImportCapacityResponse>, Status> {
        let caller = Caller::of(&request)?;
        let limits = self.engine.limits();
        let end = StreamEnd::of(&request);
        let import = ReceivedImport::read(request.into_inner(), limits).await?;
        if end.is_some_and(|end| end.broken()) {
            return Err(Status::cancelled(
                "the import's stream was cancelled before its end (nothing was applied)",
            ));
        }
        import.check(limits)?;
        let ReceivedImport {
            rows,
            received,
            dry_run,
            ..
        } = import;
        let outcome = self
            .write(&caller, |engine, actor| async move {
                engine.import_capacity(&rows, dry_run, &actor).await
            })
            .await?;
        Ok(Response::new(proto::ImportCapacityResponse {
            rows: received,
            sites_upserted: outcome.sites_upserted,
            slots_created: outcome.slots_created,
            slots_updated: outcome.slots_updated,
            total_capacity: outcome.total_capacity,
            slots_past: outcome.slots_past,
        }))
    }

    async fn set_slot_capacity(
        &self,
        request: Request<proto::SetSlotCapacityRequest>,
    ) -> Result<Response<proto::SetSlotCapacityResponse>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        let limits = self.engine.limits();
        let (slot, capacity, request_key) =
            convert::set_capacity_from_proto(&request, limits, &caller.actor())?;
        let (site, slot) = self
            .write(&caller, |engine, actor| async move {
                engine
                    .set_slot_capacity(&slot, capacity, request_key, &actor)
                    .await
            })
            .await?;
        Ok(Response::new(proto::SetSlotCapacityResponse {
            slot: Some(convert::slot_to_proto(
                &site,
                &slot,
                self.engine.slot_shown(&site, &slot, None),
            )),
        }))
    }

    async fn close_slots(
        &self,
        request: Request<proto::CloseSlotsRequest>,
    ) -> Result<Response<proto::CloseSlotsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let command =
            convert::close_from_proto(request.into_inner(), self.engine.limits(), &caller.actor())?;
        let outcome = self
            .write(&caller, |engine, actor| async move {
                engine.close_slots(command, &actor).await
            })
            .await?;
        Ok(Response::new(proto::CloseSlotsResponse {
            slots_closed: outcome.slots_closed,
            cancelled_bookings: outcome.cancelled_bookings,
            expired_holds: outcome.expired_holds,
        }))
    }

    async fn create_release(
        &self,
        request: Request<proto::CreateReleaseRequest>,
    ) -> Result<Response<proto::CreateReleaseResponse>, Status> {
        let caller = Caller::of(&request)?;
        let release = convert_release::create_release_from_proto(
            request.into_inner(),
            self.engine.limits(),
            &caller.actor(),
        )?;
        let release = self
            .write(&caller, |engine, actor| async move {
                engine.create_release(release, &actor).await
            })
            .await?;
        // With its counts, as GetRelease answers (places_remaining read 0 here); the
        // definition alone only if the release is already gone again.
        let now = self.engine.clock().now_unix_ms();
        let answer = match self
            .engine
            .release_status(&release.release_id, &caller.authority())
        {
            Ok(status) => convert_release::release_status_to_proto(&status, now),
            Err(_) => convert_release::release_to_proto(&release, now),
        };
        Ok(Response::new(proto::CreateReleaseResponse {
            release: Some(answer),
        }))
    }

    async fn get_release(
        &self,
        request: Request<proto::GetReleaseRequest>,
    ) -> Result<Response<proto::GetReleaseResponse>, Status> {
        let caller = Caller::of(&request)?;
        let id = convert_release::get_release_from_proto(request.get_ref(), self.engine.limits())?;
        let status = self.engine.release_status(&id, &caller.authority())?;
        let now = self.engine.clock().now_unix_ms();
        Ok(Response::new(proto::GetReleaseResponse {
            release: Some(convert_release::release_status_to_proto(&status, now)),
        }))
    }

    async fn upsert_campaign(
        &self,
        request: Request<proto::UpsertCampaignRequest>,
    ) -> Result<Response<proto::UpsertCampaignResponse>, Status> {
        let caller = Caller::of(&request)?;
        let campaign = convert_campaign::upsert_campaign_from_proto(
            request.into_inner(),
            self.engine.limits(),
            &caller.actor(),
        )?;
        let campaign = self
            .write(&caller, |engine, actor| async move {
                engine.upsert_campaign(campaign, &actor).await
            })
            .await?;
        Ok(Response::new(proto::UpsertCampaignResponse {
            campaign: Some(convert_campaign::campaign_to_proto(&campaign)),
        }))
    }

    async fn upsert_series(
        &self,
        request: Request<proto::UpsertSeriesRequest>,
    ) -> Result<Response<proto::UpsertSeriesResponse>, Status> {
        let caller = Caller::of(&request)?;
        caller.check_all_regions("a series applies in every region: admins only")?;
        let series = convert_series::series_from_proto(request.into_inner(), self.engine.limits())?;
        let series = self
            .write(&caller, |engine, actor| async move {
                engine.upsert_series(series, &actor).await
            })
            .await?;
        Ok(Response::new(proto::UpsertSeriesResponse {
            series: Some(convert_series::series_to_proto(&series)),
        }))
    }

    async fn get_campaign_stats(
        &self,
        request: Request<proto::GetCampaignStatsRequest>,
    ) -> Result<Response<proto::GetCampaignStatsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let id = convert_campaign::campaign_id(
            "campaign_id",
            &request.get_ref().campaign_id,
            self.engine.limits(),
        )
        .map_err(DomainError::from)?;
        let stats = self.engine.campaign_stats(&id, &caller.authority())?;
        let now = self.engine.clock().now_unix_ms();
        Ok(Response::new(convert_campaign::campaign_stats_to_proto(
            &stats, now,
        )))
    }

    type ExportRegistrationsStream = RegistrationStream;

    async fn export_registrations(
        &self,
        request: Request<proto::ExportRegistrationsRequest>,
    ) -> Result<Response<Self::ExportRegistrationsStream>, Status> {
        let caller = Caller::of(&request)?;
        let stalled = close_on_idle(&request);
        let id = convert_campaign::campaign_id(
            "campaign_id",
            &request.get_ref().campaign_id,
            self.engine.limits(),
        )
        .map_err(DomainError::from)?;
        let campaign = self.engine.campaign_for(&id, &caller.authority())?;
        let permit = self
            .engine
            .admit_export(&caller.actor(), ExportKind::Records)?;
        let receiver = self.engine.export_registrations(campaign, stalled);
        let registrations = receiver.map(|item| {
            item.map(|view| proto::ExportRegistrationsResponse {
                registration: Some(convert_campaign::registration_to_proto(&view)),
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(holding(registrations, permit))))
    }

    async fn get_site_stats(
        &self,
        request: Request<proto::GetSiteStatsRequest>,
    ) -> Result<Response<proto::GetSiteStatsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let site_id = convert::site_id(
            "site_id",
            &request.into_inner().site_id,
            self.engine.limits(),
        )
        .map_err(DomainError::from)?;
        caller.check_site(self.engine.site(&site_id).as_ref())?;
        let (site, stats) = self.engine.site_stats(&site_id)?;
        Ok(Response::new(proto::GetSiteStatsResponse {
            site_id: site.site_id.to_string(),
            slots: stats.totals.slots,
            capacity: stats.totals.capacity,
            booked: stats.totals.booked,
            held: stats.totals.held,
            slots_closed: stats.totals.slots_closed,
            reserved: stats.totals.reserved,
            attended: stats.totals.attended,
            no_shows: stats.totals.no_shows,
            by_day: stats
                .by_day
                .into_iter()
                .map(|(day, totals)| proto::DayStats {
                    day: day.format("%Y-%m-%d").to_string(),
                    slots: totals.slots,
                    capacity: totals.capacity,
                    booked: totals.booked,
                    held: totals.held,
                    slots_closed: totals.slots_closed,
                    reserved: totals.reserved,
                    attended: totals.attended,
                    no_shows: totals.no_shows,
                })
                .collect(),
        }))
    }

    type ExportAuditLogStream = AuditStream;

    async fn export_audit_log(
        &self,
        request: Request<proto::ExportAuditLogRequest>,
    ) -> Result<Response<Self::ExportAuditLogStream>, Status> {
        let caller = Caller::of(&request)?;
        caller.check_all_regions("the audit log spans every region: admins only")?;
        let permit = self
            .engine
            .admit_export(&caller.actor(), ExportKind::Records)?;
        let stalled = close_on_idle(&request);
        let entries = self.engine.audit_log(stalled).map(|item| {
            item.map(|entry| proto::ExportAuditLogResponse {
                entry: Some(convert::audit_to_proto(&entry)),
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(holding(entries, permit))))
    }

    type ExportBackupStream = std::pin::Pin<
        Box<dyn Stream<Item = Result<proto::ExportBackupResponse, Status>> + Send + 'static>,
    >;

    async fn export_backup(
        &self,
        request: Request<proto::ExportBackupRequest>,
    ) -> Result<Response<Self::ExportBackupStream>, Status> {
        let caller = Caller::of(&request)?;
        let what = "a backup holds the whole store and the citizen hash key: admins only";
        caller.check_all_regions(what)?;
        if !self.engine.makes_backups() {
            return Err(ServiceError::BackupKeyMissing.into());
        }
        let permit = self
            .engine
            .admit_export(&caller.actor(), ExportKind::Backup)?;
        let stalled = close_on_idle(&request);
        let (feed, receiver) = self.engine.export_feed(BACKUP_CHUNKS_IN_FLIGHT, stalled);
        let feed = Arc::new(feed);
        let engine = Arc::clone(&self.engine);
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let mut out = std::io::BufWriter::with_capacity(
                BACKUP_CHUNK_BYTES,
                ChunkSender(Arc::clone(&feed)),
            );
            let written = engine.backup(&mut out).and_then(|summary| {
                out.flush().map_err(|e| {
                    ServiceError::Store(StoreError::Io(format!("sending the backup: {e}")))
                })?;
                Ok(summary)
            });
            drop(out);
            match written {
                Ok(summary) => tracing::info!(
                    records = summary.records,
                    batches_during_scan = summary.batches_during_scan,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "backup sent"
                ),
                Err(error) => {
                    tracing::warn!(%error, "backup failed");
                    feed.fail(error);
                }
            }
        });
        let chunks = receiver.map(|chunk| chunk.map_err(Status::from));
        Ok(Response::new(Box::pin(holding(chunks, permit))))
    }

    type ExportBookingsStream = ExportStream;

    async fn export_bookings(
        &self,
        request: Request<proto::ExportBookingsRequest>,
    ) -> Result<Response<Self::ExportBookingsStream>, Status> {
        use proto::export_bookings_request::Scope;
        let caller = Caller::of(&request)?;
        let stalled = close_on_idle(&request);
        let limits = self.engine.limits();
        let scope = match request.into_inner().scope {
            None => ExportScope::All,
            Some(Scope::SiteId(id)) => ExportScope::Site(
                convert::site_id("site_id", &id, limits).map_err(DomainError::from)?,
            ),
            Some(Scope::RegionId(id)) => ExportScope::Region(
                convert::region_id("region_id", &id, limits).map_err(DomainError::from)?,
            ),
        };
        match &scope {
            ExportScope::All => caller
                .check_all_regions("an export without a region_id or site_id spans them all")?,
            ExportScope::Region(region_id) => caller.check_region(region_id)?,
            ExportScope::Site(site_id) => caller.check_site(self.engine.site(site_id).as_ref())?,
        }
        let permit = self
            .engine
            .admit_export(&caller.actor(), ExportKind::Records)?;
        let bookings = self.engine.export_bookings(scope, stalled).map(|item| {
            item.map(|view| proto::ExportBookingsResponse {
                booking: Some(convert::booking_to_proto_without_code(&view)),
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(holding(bookings, permit))))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<proto::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        use proto::watch_events_request::Scope;
        let caller = Caller::of(&request)?;
        let actor = caller.authority();
        let stalled = close_on_idle(&request);
        let limits = self.engine.limits();
        let request = request.into_inner();
        let (site, region) = match request.scope {
            None => (None, None),
            Some(Scope::SiteId(id)) => (
                Some(convert::site_id("site_id", &id, limits).map_err(DomainError::from)?),
                None,
            ),
            Some(Scope::RegionId(id)) => (
                None,
                Some(convert::region_id("region_id", &id, limits).map_err(DomainError::from)?),
            ),
        };
        let scope = EventScope::of(&self.engine, &actor, site, region)?;
        let (events, permit) = self.engine.watch_events(
            (scope, request.after_sequence, &request.log_id),
            &caller.actor(),
            stalled,
        )?;
        let log_id = self.engine.event_log_id().to_string();
        let events = ReceiverStream::new(events).map(move |item| {
            item.map(|view| proto::WatchEventsResponse {
                event: Some(convert::event_to_proto(&view)),
                log_id: log_id.clone(),
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(holding(events, permit))))
    }
}

/// Bytes per `ExportBackupResponse`.
const BACKUP_CHUNK_BYTES: usize = 1 << 20;
/// Chunks buffered for a slow backup client (the scan waits beyond that).
const BACKUP_CHUNKS_IN_FLIGHT: usize = 8;

/// Hands the backup's bytes to the response stream; a client that went away or
/// stopped reading fails the backup's write, which stops it.
struct ChunkSender(Arc<Feed<proto::ExportBackupResponse>>);

impl std::io::Write for ChunkSender {
    /// Sends at most one chunk's worth: messages stay far below clients' size limits.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let sent = bytes.len().min(BACKUP_CHUNK_BYTES);
        let chunk = proto::ExportBackupResponse {
            data: bytes[..sent].to_vec(),
        };
        self.0.send(Ok(chunk)).map_err(std::io::Error::other)?;
        Ok(sent)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
