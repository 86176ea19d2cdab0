//! The transport-free engine: wires the domain (counters, catalog, citizen limits)
//! to the store (group commit) and gives each command its order of steps.
//!
//! Must not import tonic. Reads the clock here and passes `now` into the domain.
//!
//! Order of a booking: idempotency check → citizen limit (sharded index) → slot CAS →
//! durable group commit → acknowledge. Places are taken in memory *before* the write
//! and returned only *after* a durable cancel, so memory never shows more free places
//! than the disk would after a crash.

pub mod citizen_hasher;
pub mod recovery;
pub mod requests;

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, Limits};
use crate::domain::booking::{Booking, BookingState, RequestRecord};
use crate::domain::catalog::{Catalog, SearchPage, SearchQuery, Site, SiteStats};
use crate::domain::citizens::CitizenIndex;
use crate::domain::error::{DomainError, Missing};
use crate::domain::ids::{
    BookingId, RegionId, RequestFingerprint, RequestKey, ServiceId, SiteId, SlotKey,
};
use crate::domain::schedule::Schedule;
use crate::store::records::{SiteRecord, SlotRecord, Write};
use crate::store::{Store, StoreError};
use citizen_hasher::CitizenHasher;
use requests::{Begin, RequestRegistry};

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
}

/// A booking with the site it belongs to (for its time zone).
#[derive(Clone, Debug)]
pub struct BookingView {
    pub booking: Booking,
    pub site: Arc<Site>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishOutcome {
    pub slots_created: u32,
    pub slots_updated: u32,
    pub total_capacity: u64,
}

pub struct BookCommand {
    pub slot: SlotKey,
    pub citizen_id: String,
    pub request: RequestKey,
    pub hold_id: Option<String>,
}

pub struct CancelCommand {
    pub booking_id: BookingId,
    pub citizen_id: String,
    pub request: RequestKey,
}

#[derive(Clone, Debug)]
pub enum ExportScope {
    All,
    Site(SiteId),
    Region(RegionId),
}

pub struct Engine {
    limits: Limits,
    store: Store,
    /// Read on every request; written only by site upserts and schedule publication.
    catalog: RwLock<Catalog>,
    citizens: CitizenIndex,
    requests: RequestRegistry,
    hasher: CitizenHasher,
    /// Serialises authority writes (sites, schedules) so their plan and apply steps
    /// see no other authority write in between. Never taken by bookings.
    authority_writes: tokio::sync::Mutex<()>,
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Engine {
    /// Opens the store in `data_dir` and rebuilds memory from it, checking invariants.
    pub fn open(data_dir: &std::path::Path, config: &Config) -> Result<Self, ServiceError> {
        Self::open_with_store(Store::open(data_dir, &config.limits)?, config)
    }

    /// Rebuilds an engine over an already opened store (benchmarks pass a store with
    /// weaker commits; see `Store::open_unsynced_for_benchmarks`).
    pub fn open_with_store(store: Store, config: &Config) -> Result<Self, ServiceError> {
        let data_dir = store.data_dir().to_path_buf();
        let key = match config.citizen_hash_key {
            Some(key) => key,
            None => crate::store::key_file::load_or_create(&data_dir)?,
        };
        let mut engine = Self {
            limits: config.limits.clone(),
            store,
            catalog: RwLock::new(Catalog::default()),
            citizens: CitizenIndex::default(),
            requests: RequestRegistry::default(),
            hasher: CitizenHasher::new(&key).map_err(|e| {
                ServiceError::Recovery(format!("the citizen hash key is unusable: {e}"))
            })?,
            authority_writes: tokio::sync::Mutex::new(()),
        };
        recovery::rebuild(&mut engine)?;
        Ok(engine)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// `true` while the store accepts writes.
    pub fn store_health(&self) -> watch::Receiver<bool> {
        self.store.health()
    }

    fn catalog(&self) -> RwLockReadGuard<'_, Catalog> {
        // Catalog writes are single map inserts: a poisoned lock still guards sound data.
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    fn catalog_mut(&self) -> RwLockWriteGuard<'_, Catalog> {
        self.catalog.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn site(&self, site_id: &SiteId) -> Option<Arc<Site>> {
        self.catalog().site(site_id).cloned()
    }

    pub async fn upsert_site(&self, site: Site) -> Result<Arc<Site>, ServiceError> {
        let _authority = self.authority_writes.lock().await;
        self.catalog().check_site_upsert(&site)?;
        let record = SiteRecord {
            site_id: site.site_id.clone(),
            name: site.name.clone(),
            region_id: site.region_id.clone(),
            time_zone: site.time_zone.name().to_string(),
        };
        self.store.commit(&[Write::Site(record)]).await?;
        let site_id = site.site_id.clone();
        let mut catalog = self.catalog_mut();
        catalog.upsert_site(site);
        catalog
            .site(&site_id)
            .cloned()
            .ok_or(ServiceError::Domain(DomainError::NotFound(Missing::Site)))
    }

    /// Creates the schedule's missing slots and updates changed ones, all or nothing.
    pub async fn publish_schedule(
        &self,
        site_id: &SiteId,
        service_id: &ServiceId,
        schedule: &Schedule,
    ) -> Result<PublishOutcome, ServiceError> {
        let _authority = self.authority_writes.lock().await;
        let plan = {
            let catalog = self.catalog();
            let site = catalog
                .site(site_id)
                .ok_or(DomainError::NotFound(Missing::Site))?;
            let planned = schedule.plan(site.time_zone, self.limits.publish_slots_max)?;
            catalog.plan_publish(site_id, service_id, &planned, schedule.capacity_per_slot)?
        };
        // Lower capacities first, in memory, where the CAS refuses to go below what is
        // taken; raise them only once durable. Memory never admits more than disk allows.
        let mut lowered = Vec::new();
        for (slot, _, capacity) in &plan.updated {
            let old = slot.counter.snapshot().capacity;
            if *capacity < old {
                match slot.counter.set_capacity(*capacity) {
                    Ok(_) => lowered.push((Arc::clone(slot), old)),
                    Err(below) => {
                        for (slot, old) in lowered {
                            let _ = slot.counter.set_capacity(old);
                        }
                        return Err(DomainError::CapacityBelowBooked {
                            slot: slot.key.clone(),
                            requested: *capacity,
                            taken: below.taken,
                        }
                        .into());
                    }
                }
            }
        }
        let writes: Vec<Write> = plan
            .created
            .iter()
            .map(|slot| {
                (
                    slot.key.clone(),
                    slot.end_unix_s(),
                    slot.counter.snapshot().capacity,
                )
            })
            .chain(
                plan.updated
                    .iter()
                    .map(|(slot, end, capacity)| (slot.key.clone(), *end, *capacity)),
            )
            .map(|(key, end_unix_s, capacity)| {
                Write::Slot(SlotRecord {
                    key,
                    end_unix_s,
                    capacity,
                })
            })
            .collect();
        if !writes.is_empty() {
            if let Err(error) = self.store.commit(&writes).await {
                // Only a write that was never queued is certainly not on disk; after any
                // other error the lower capacity may be stored, so memory keeps it.
                if error == StoreError::Overloaded {
                    for (slot, old) in lowered {
                        let _ = slot.counter.set_capacity(old);
                    }
                }
                return Err(error.into());
            }
        }
        let outcome = PublishOutcome {
            slots_created: plan.created.len() as u32,
            slots_updated: plan.updated.len() as u32,
            total_capacity: plan.total_capacity,
        };
        for (slot, end, capacity) in plan.updated {
            slot.set_end_unix_s(end);
            if capacity > slot.counter.snapshot().capacity {
                // Raising can only fail if someone lowered meanwhile, which the
                // authority lock rules out.
                let _ = slot.counter.set_capacity(capacity);
            }
        }
        let mut catalog = self.catalog_mut();
        for slot in plan.created {
            catalog.insert_slot(slot)?;
        }
        Ok(outcome)
    }

    pub fn search(&self, query: &SearchQuery) -> Result<SearchPage, ServiceError> {
        Ok(self.catalog().search(query)?)
    }

    pub fn site_stats(&self, site_id: &SiteId) -> Result<(Arc<Site>, SiteStats), ServiceError> {
        let catalog = self.catalog();
        let site = catalog
            .site(site_id)
            .cloned()
            .ok_or(DomainError::NotFound(Missing::Site))?;
        Ok((site, catalog.site_stats(site_id)?))
    }

    fn view(&self, booking: Booking) -> Result<BookingView, ServiceError> {
        let site = self.site(&booking.slot.site_id).ok_or_else(|| {
            ServiceError::Store(StoreError::Corrupt(format!(
                "booking {} refers to unknown site {}",
                booking.booking_id, booking.slot.site_id
            )))
        })?;
        Ok(BookingView { booking, site })
    }

    pub fn booking(&self, booking_id: BookingId) -> Result<BookingView, ServiceError> {
        let booking = self
            .store
            .booking(booking_id)?
            .ok_or(DomainError::NotFound(Missing::Booking))?;
        self.view(booking)
    }

    /// Books one place. Run it in its own task: it must finish even if the client goes away.
    pub async fn book(&self, command: BookCommand) -> Result<BookingView, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        let slot_text = command.slot.to_string();
        let fingerprint = RequestFingerprint::of(&[
            b"book",
            slot_text.as_bytes(),
            &citizen.0,
            command.hold_id.as_deref().unwrap_or("").as_bytes(),
        ]);
        self.once_per_request(command.request, fingerprint, |request| {
            self.admit_and_commit(&command, citizen, request)
        })
        .await
    }

    /// Runs `work` once per `request_id`: a retry gets the first booking back, a copy
    /// in flight waits for the first one's outcome, a different request is refused.
    async fn once_per_request<Work>(
        &self,
        request: RequestKey,
        fingerprint: RequestFingerprint,
        work: impl FnOnce(RequestRecord) -> Work,
    ) -> Result<BookingView, ServiceError>
    where
        Work: std::future::Future<Output = Result<Booking, ServiceError>>,
    {
        let guard = match self.requests.begin(request, fingerprint)? {
            Begin::Done(booking_id) => return self.booking(booking_id),
            Begin::Wait(outcome) => return self.booking(requests::wait(outcome).await?),
            Begin::Fresh(guard) => guard,
        };
        let outcome = work(RequestRecord {
            key: request,
            fingerprint,
        })
        .await;
        guard.finish(outcome.as_ref().map(|b| b.booking_id).map_err(Clone::clone))?;
        outcome.and_then(|booking| self.view(booking))
    }

    async fn admit_and_commit(
        &self,
        command: &BookCommand,
        citizen: crate::domain::ids::CitizenKey,
        request: RequestRecord,
    ) -> Result<Booking, ServiceError> {
        if command.hold_id.is_some() {
            // Holds arrive with the holds work; until then no hold id can exist.
            return Err(DomainError::NotFound(Missing::Hold).into());
        }
        let slot = self
            .catalog()
            .slot(&command.slot)
            .map(|(_, slot)| Arc::clone(slot))
            .ok_or(DomainError::NotFound(Missing::Slot))?;
        let now_ms = now_unix_ms();
        if slot.key.start_unix_s.saturating_mul(1_000) <= now_ms {
            return Err(DomainError::SlotStarted(slot.key.clone()).into());
        }
        let booking_id = BookingId(rand::random());
        let service = &slot.key.service_id;
        self.citizens
            .reserve(
                citizen,
                service,
                booking_id,
                self.limits.max_active_per_citizen,
            )
            .map_err(|existing| DomainError::CitizenAlreadyBooked {
                booking_id: existing,
            })?;
        if slot.counter.try_take().is_err() {
            self.citizens.release(citizen, service, booking_id);
            return Err(DomainError::SlotFull(slot.key.clone()).into());
        }
        let booking = Booking {
            booking_id,
            slot: slot.key.clone(),
            end_unix_s: slot.end_unix_s(),
            citizen,
            created_at_unix_ms: now_ms,
            request,
            state: BookingState::Confirmed,
        };
        match self.store.commit(&[Write::Booking(booking.clone())]).await {
            Ok(()) => Ok(booking),
            Err(StoreError::Overloaded) => {
                // Never queued: nothing reached the disk, so the place goes back.
                self.citizens.release(citizen, service, booking_id);
                let _ = slot.counter.release();
                Err(StoreError::Overloaded.into())
            }
            // Anything else may or may not be on disk: keep the place taken (never
            // overbook); the store is failed and a restart rebuilds from the disk.
            Err(error) => Err(error.into()),
        }
    }

    /// Cancels a booking; its place returns to the slot once the cancel is durable.
    pub async fn cancel(&self, command: CancelCommand) -> Result<BookingView, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        let booking_text = command.booking_id.to_string();
        let fingerprint = RequestFingerprint::of(&[b"cancel", booking_text.as_bytes(), &citizen.0]);
        self.once_per_request(command.request, fingerprint, |request| {
            self.cancel_and_commit(&command, citizen, request)
        })
        .await
    }

    async fn cancel_and_commit(
        &self,
        command: &CancelCommand,
        citizen: crate::domain::ids::CitizenKey,
        request: RequestRecord,
    ) -> Result<Booking, ServiceError> {
        let mut booking = self
            .store
            .booking(command.booking_id)?
            // Another citizen's booking is reported as unknown: ids are not confirmed to strangers.
            .filter(|booking| booking.citizen == citizen)
            .ok_or(DomainError::NotFound(Missing::Booking))?;
        let service = booking.slot.service_id.clone();
        // Exactly one canceller wins this removal; a second concurrent cancel stops here.
        if !booking.is_confirmed() || !self.citizens.release(citizen, &service, booking.booking_id)
        {
            return Err(DomainError::BookingNotActive(booking.booking_id).into());
        }
        booking.state = BookingState::Cancelled {
            at_unix_ms: now_unix_ms(),
            reason: "cancelled by citizen".to_string(),
            request: Some(request),
        };
        match self.store.commit(&[Write::Booking(booking.clone())]).await {
            Ok(()) => {}
            Err(StoreError::Overloaded) => {
                // Never queued: the booking is still confirmed on disk, so it must count
                // against the citizen's limit again.
                self.citizens.insert(citizen, &service, booking.booking_id);
                return Err(StoreError::Overloaded.into());
            }
            Err(error) => return Err(error.into()),
        }
        if let Some((_, slot)) = self.catalog().slot(&booking.slot) {
            if slot.counter.release().is_err() {
                tracing::error!(slot = %booking.slot, "cancel found no taken place to return");
            }
        }
        Ok(booking)
    }

    /// Streams every stored booking in scope; the scan runs on a blocking thread and
    /// waits for the reader (bounded channel), so a slow client holds no memory.
    pub fn export_bookings(
        self: &Arc<Self>,
        scope: ExportScope,
    ) -> mpsc::Receiver<Result<BookingView, ServiceError>> {
        let (sender, receiver) = mpsc::channel(self.limits.export_channel_depth);
        let engine = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            for item in engine.store.bookings() {
                let item = item
                    .map_err(ServiceError::from)
                    .and_then(|booking| engine.view(booking));
                let wanted = match (&item, &scope) {
                    (Err(_), _) | (Ok(_), ExportScope::All) => true,
                    (Ok(view), ExportScope::Site(site_id)) => view.site.site_id == *site_id,
                    (Ok(view), ExportScope::Region(region_id)) => view.site.region_id == *region_id,
                };
                if wanted && sender.blocking_send(item).is_err() {
                    return; // the client went away
                }
            }
        });
        receiver
    }

    /// Lets queued writes finish durably, then stops the committer.
    pub fn shutdown(&mut self) {
        self.store.shutdown();
    }
}
