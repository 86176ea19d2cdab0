//! Authorities' writes: sites, schedules, bulk imports, slot capacity, closures; and
//! the statistics they read. All of them hold `authority_writes`, never a booking lock.
//! A write larger than one commit goes in chunks under the `Japply` journal: a crash leaves
//! a prefix applied (recovery warns of it); re-running the idempotent import completes it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeZone;

use crate::domain::booking::{Booking, BookingState};
use crate::domain::catalog::{PublishPlan, Site, SiteStats, Slot, Totals};
use crate::domain::error::{DomainError, Missing};
use crate::domain::event::Event;
use crate::domain::field_violation::FieldViolation;
use crate::domain::hold::{Hold, HoldState};
use crate::domain::ids::{RegionId, RequestFingerprint, RequestKey, ServiceId, SiteId, SlotKey};
use crate::domain::schedule::Schedule;
use crate::domain::text::utc_text;
use crate::service::actor::Actor;
use crate::service::engine::{undo_if_never_written, Engine};
use crate::service::error::ServiceError;
use crate::service::import_check::{ImportCheck, ImportRow};
use crate::store::records::{
    ApplyJournal, AuditEntry, AuthorityOutcome, AuthorityRequest, SiteRecord, SlotRecord, Write,
};
use crate::store::StoreError;

/// What a publish does to slots that already exist at the schedule's starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Existing {
    /// Takes the schedule's length and capacity (an open slot) or length (a closed one).
    Update,
    /// Left as they are.
    Keep,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishOutcome {
    pub sites_upserted: u32,
    pub slots_created: u32,
    pub slots_updated: u32,
    pub total_capacity: u64,
    /// The schedule's slots that had started: neither created nor changed.
    pub slots_past: u32,
}

impl PublishOutcome {
    /// What upserting `sites` sites and applying `plans` does.
    fn of(sites: usize, plans: &[PublishPlan]) -> Self {
        let mut outcome = PublishOutcome {
            sites_upserted: sites as u32,
            ..PublishOutcome::default()
        };
        for plan in plans {
            outcome.slots_created += plan.created.len() as u32;
            outcome.slots_updated += plan.updated.len() as u32;
            outcome.total_capacity += plan.total_capacity;
            outcome.slots_past += plan.past;
        }
        outcome
    }
}

pub struct CloseCommand {
    pub site_id: SiteId,
    /// All services when `None`.
    pub service_id: Option<ServiceId>,
    pub from_unix_s: i64,
    pub to_unix_s: i64,
    pub reason: String,
    /// A retry with the same id gets the first outcome back, and closes nothing again.
    pub request: Option<RequestKey>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseOutcome {
    pub slots_closed: u32,
    pub cancelled_bookings: u32,
    pub expired_holds: u32,
}

/// The most characters of an audit entry's detail (a campaign's waves, say): the entry
/// stays far below `records::RECORD_BYTES_MAX`.
const AUDIT_DETAIL_CHARS_MAX: usize = 1_000;

/// `text`, cut to its first `max` characters and an ellipsis if longer.
fn shortened(mut text: String, max: usize) -> String {
    if let Some((cut, _)) = text.char_indices().nth(max) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// How long a chunked authority write's first chunk waits for room in a full write
/// queue, and how many times, before giving up.
const CHUNK_QUEUE_WAIT: Duration = Duration::from_millis(10);
const CHUNK_QUEUE_WAITS_MAX: u32 = 500;

/// How often a closure checks that admissions already under way have settled (each
/// settles once its group commit is durable); it waits `close_settle_wait_ms` at most.
const CLOSE_SETTLE_POLL: Duration = Duration::from_millis(1);

/// What a closure changes: the slots it closes, the bookings it cancels (claimed) and
/// the live holds it expires (taken), all stamped `now_ms`.
struct Closure {
    slots: Vec<Arc<Slot>>,
    cancelled: Vec<Booking>,
    holds: Vec<Hold>,
    /// Campaign registrations whose booking or offer it ends: they wait again.
    requeued: Vec<crate::domain::campaign::Registration>,
    /// Which of `holds` are campaign offers.
    offers: HashSet<crate::domain::hold::HoldId>,
    reason: String,
    now_ms: i64,
}

impl Closure {
    fn outcome(&self) -> CloseOutcome {
        CloseOutcome {
            slots_closed: self.slots.len() as u32,
            cancelled_bookings: self.cancelled.len() as u32,
            expired_holds: self.holds.len() as u32,
        }
    }

    /// The closed slots, the cancelled bookings and the expired holds, as records, each
    /// followed by its event.
    fn writes(&self) -> Vec<Write> {
        let (reason, now_ms) = (self.reason.as_str(), self.now_ms);
        let mut writes = Vec::new();
        for slot in &self.slots {
            let capacity = slot.counter.snapshot().capacity;
            writes.push(slot_record(slot.key(), slot.end_unix_s(), capacity, true));
            writes.push(Write::Event(Event::slot_closed(
                &slot.key(),
                reason,
                now_ms,
            )));
        }
        for booking in &self.cancelled {
            writes.push(Write::Booking(booking.clone()));
            writes.push(Write::Event(Event::booking(booking, now_ms)));
        }
        for hold in &self.holds {
            writes.push(Write::Hold(Hold {
                state: HoldState::Expired { at_unix_ms: now_ms },
                ..hold.clone()
            }));
            let event = match self.offers.contains(&hold.hold_id) {
                true => Event::offer_ended(hold, reason, now_ms),
                false => Event::hold_expired(hold, reason, now_ms),
            };
            writes.push(Write::Event(event));
        }
        for registration in &self.requeued {
            writes.push(Write::Registration(registration.clone()));
        }
        writes
    }
}

/// `writes` in runs of `size` (a few more where needed): a run never ends just before
/// an event, so a change and the event that follows it are committed together.
fn chunked(writes: &[Write], size: usize) -> Vec<&[Write]> {
    let mut chunks = Vec::new();
    let mut rest = writes;
    while !rest.is_empty() {
        let mut end = size.min(rest.len());
        while end < rest.len() && matches!(rest[end], Write::Event(_)) {
            end += 1;
        }
        let (head, tail) = rest.split_at(end);
        chunks.push(head);
        rest = tail;
    }
    chunks
}

/// The error of a chunked write's later chunk: the earlier chunks are on disk, so a
/// refusal by a store that had failed meanwhile must not read as "never written" (its
/// caller would undo, in memory, changes the disk has). A restart finishes the write
/// or tells to re-run it (`ApplyJournal`).
fn written_in_part(error: StoreError) -> StoreError {
    match error.never_written() {
        true => StoreError::Io(format!(
            "{error}, after part of this change was written: restart the server, then \
             send the same change again"
        )),
        false => error,
    }
}

/// Lowers, in memory, the capacities the plans lower (never below what is taken);
/// returns each lowered slot with its old capacity, or undoes them all and refuses.
fn lower_capacities(plans: &[PublishPlan]) -> Result<Vec<(Arc<Slot>, u32)>, ServiceError> {
    let mut lowered: Vec<(Arc<Slot>, u32)> = Vec::new();
    for (slot, _, capacity) in plans.iter().flat_map(|plan| &plan.updated) {
        let old = slot.counter.snapshot().capacity;
        if *capacity >= old {
            continue;
        }
        match slot.counter.set_capacity(*capacity) {
            Ok(_) => lowered.push((Arc::clone(slot), old)),
            Err(below) => {
                restore_capacities(lowered);
                return Err(DomainError::CapacityBelowBooked {
                    slot: slot.key(),
                    requested: *capacity,
                    taken: below.taken,
                }
                .into());
            }
        }
    }
    Ok(lowered)
}

fn restore_capacities(lowered: Vec<(Arc<Slot>, u32)>) {
    for (slot, old) in lowered {
        let _ = slot.counter.set_capacity(old);
    }
}

/// The site and slot records of a publication; each updated slot's is followed by its
/// `CapacityChanged` event (a new capacity or a new length).
fn publish_writes(sites: &[Site], plans: &[PublishPlan], now_ms: i64) -> Vec<Write> {
    let mut writes: Vec<Write> = sites
        .iter()
        .map(|site| Write::Site(site_record(site)))
        .collect();
    for plan in plans {
        for slot in &plan.created {
            let (key, end) = (slot.key.clone(), slot.end_unix_s);
            writes.push(slot_record(key, end, slot.capacity, false));
        }
        for (slot, end, capacity) in &plan.updated {
            // A closed slot's length changes; it stays closed.
            let closed = slot.counter.snapshot().closed;
            writes.push(slot_record(slot.key(), *end, *capacity, closed));
            writes.push(Write::Event(Event::capacity_changed(
                &slot.key(),
                *capacity,
                now_ms,
            )));
        }
    }
    writes
}

/// What an import would change, refusing now what the real import would refuse:
/// capacity below what is taken.
fn dry_run_outcome(sites: usize, plans: &[PublishPlan]) -> Result<PublishOutcome, ServiceError> {
    for plan in plans {
        for (slot, _, capacity) in &plan.updated {
            let taken = slot.counter.snapshot().taken;
            if *capacity < taken {
                return Err(DomainError::CapacityBelowBooked {
                    slot: slot.key(),
                    requested: *capacity,
                    taken,
                }
                .into());
            }
        }
    }
    Ok(PublishOutcome::of(sites, plans))
}

/// A closure's request id with the fingerprint of what it asks, if it has one.
fn close_request(command: &CloseCommand) -> Option<(RequestKey, RequestFingerprint)> {
    let service_text = command
        .service_id
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    command.request.map(|key| {
        let fingerprint = RequestFingerprint::of(&[
            b"close",
            command.site_id.as_str().as_bytes(),
            service_text.as_bytes(),
            &command.from_unix_s.to_be_bytes(),
            &command.to_unix_s.to_be_bytes(),
            command.reason.as_bytes(),
        ]);
        (key, fingerprint)
    })
}

/// The audit detail of a closure.
fn close_detail(command: &CloseCommand, outcome: CloseOutcome) -> String {
    format!(
        "site {} service {} from {} to {}: {} slots closed, {} bookings cancelled, \
         {} holds expired; reason {:?}",
        command.site_id,
        command
            .service_id
            .as_ref()
            .map_or("(all)".to_string(), ToString::to_string),
        utc_text(command.from_unix_s),
        utc_text(command.to_unix_s),
        outcome.slots_closed,
        outcome.cancelled_bookings,
        outcome.expired_holds,
        command.reason
    )
}

/// Waits (bounded) until admissions that passed the counters before they closed have
/// settled: then every booking and hold of these slots is in the store or live.
async fn settle_admissions(slots: &[Arc<Slot>], wait: Duration) -> Result<(), ServiceError> {
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        if slots
            .iter()
            .all(|slot| slot.counter.snapshot().pending == 0)
        {
            return Ok(());
        }
        tokio::time::sleep(CLOSE_SETTLE_POLL).await;
    }
    // Their commits are stuck (a stalled disk): refuse the closure, retry later.
    Err(ServiceError::Busy(
        "bookings of these slots are still being written; retry the closure",
    ))
}

impl From<CloseOutcome> for AuthorityOutcome {
    fn from(outcome: CloseOutcome) -> Self {
        AuthorityOutcome::Closed {
            slots_closed: outcome.slots_closed,
            cancelled_bookings: outcome.cancelled_bookings,
            expired_holds: outcome.expired_holds,
        }
    }
}

/// What a SetSlotCapacity request asks, so a request id reused for another is told.
fn set_capacity_fingerprint(key: &SlotKey, capacity: u32) -> RequestFingerprint {
    let slot = key.to_string();
    RequestFingerprint::of(&[b"set-capacity", slot.as_bytes(), &capacity.to_be_bytes()])
}

/// The record that remembers an authority request's outcome, if it has a `request_id`.
fn authority_request(
    request: Option<(RequestKey, RequestFingerprint)>,
    outcome: AuthorityOutcome,
    at_unix_ms: i64,
) -> impl Iterator<Item = Write> {
    request.into_iter().map(move |(key, fingerprint)| {
        Write::AuthorityRequest(AuthorityRequest {
            key,
            fingerprint,
            outcome,
            at_unix_ms,
        })
    })
}

fn site_record(site: &Site) -> SiteRecord {
    SiteRecord {
        site_id: site.site_id.clone(),
        name: site.name.clone(),
        region_id: site.region_id.clone(),
        time_zone: site.time_zone.name().to_string(),
    }
}

fn slot_record(key: SlotKey, end_unix_s: i64, capacity: u32, closed: bool) -> Write {
    Write::Slot(SlotRecord {
        key,
        end_unix_s,
        capacity,
        closed,
    })
}

impl Engine {
    /// The audit entry of a capacity change, stamped now: strictly after the previous
    /// entry of this engine, so the log's key order is the order of the changes.
    pub(super) fn audit(&self, actor: &str, action: &str, detail: String) -> Write {
        let now = self.now_unix_ms();
        let previous = self
            .last_audit_unix_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                Some(now.max(last.saturating_add(1)))
            })
            .unwrap_or(now);
        Write::Audit(AuditEntry {
            at_unix_ms: now.max(previous.saturating_add(1)),
            actor: actor.to_string(),
            action: action.to_string(),
            detail: shortened(detail, AUDIT_DETAIL_CHARS_MAX),
        })
    }

    pub async fn upsert_site(&self, site: Site, actor: &Actor) -> Result<Arc<Site>, ServiceError> {
        let _authority = self.authority_writes.lock().await;
        actor.check_upsert(&site, self.site(&site.site_id).as_ref())?;
        self.catalog().check_site_upsert(&site)?;
        self.check_region_slots(std::slice::from_ref(&site), &[])?;
        let audit = self.audit(
            &actor.name,
            "UpsertSite",
            format!(
                "site {} {:?} in region {}, zone {}",
                site.site_id,
                site.name,
                site.region_id,
                site.time_zone.name()
            ),
        );
        self.store
            .commit(&[Write::Site(site_record(&site)), audit])
            .await?;
        let site_id = site.site_id.clone();
        let mut catalog = self.catalog_mut();
        catalog.upsert_site(site);
        catalog
            .site(&site_id)
            .cloned()
            .ok_or(ServiceError::Domain(DomainError::NotFound(Missing::Site)))
    }

    /// Creates the schedule's missing slots and updates changed ones, all or nothing
    /// (but see `commit_in_chunks` for a publication larger than one commit).
    pub async fn publish_schedule(
        &self,
        site_id: &SiteId,
        service_id: &ServiceId,
        schedule: &Schedule,
        actor: &Actor,
    ) -> Result<PublishOutcome, ServiceError> {
        let target = (site_id, service_id, schedule);
        self.publish(target, Existing::Update, actor).await
    }

    /// The demo seed's publish: creates the schedule's slots that are missing and leaves
    /// every existing one as it is (an authority's capacity change survives a restart).
    pub async fn publish_missing_slots(
        &self,
        site_id: &SiteId,
        service_id: &ServiceId,
        schedule: &Schedule,
        actor: &Actor,
    ) -> Result<PublishOutcome, ServiceError> {
        let target = (site_id, service_id, schedule);
        self.publish(target, Existing::Keep, actor).await
    }

    async fn publish(
        &self,
        (site_id, service_id, schedule): (&SiteId, &ServiceId, &Schedule),
        existing: Existing,
        actor: &Actor,
    ) -> Result<PublishOutcome, ServiceError> {
        let _authority = self.authority_writes.lock().await;
        let plan = {
            let catalog = self.catalog();
            let site = actor.check_site(catalog.site(site_id))?;
            let horizon = schedule.check_horizon(self.last_day_max());
            horizon.map_err(|violation| DomainError::Invalid(vec![violation]))?;
            let planned = schedule.plan(site.time_zone, self.limits.publish_slots_max)?;
            if planned.is_empty() {
                // A mistake, as an import's row that makes nothing is (`import_check`).
                return Err(DomainError::Invalid(vec![FieldViolation::new(
                    "opening_hours",
                    "the schedule makes no slot: none of its days from first_day to \
                     last_day falls on its weekdays, or its hours all fall in a \
                     daylight-saving gap",
                )])
                .into());
            }
            let now = self.now_unix_s();
            let mut plan = catalog.plan_publish((site_id, service_id), &planned, now)?;
            if existing == Existing::Keep {
                plan.updated.clear();
            }
            plan
        };
        self.check_region_slots(&[], std::slice::from_ref(&plan))?;
        let what = format!(
            "site {site_id} service {service_id}, {} to {}",
            schedule.first_day, schedule.last_day
        );
        self.apply_plans(
            Vec::new(),
            vec![plan],
            (&actor.name, "PublishSchedule", what),
        )
        .await
    }

    /// Validates every row against each other and the catalog, then applies the whole
    /// file, or nothing (in chunks under a journal when it is larger than one commit:
    /// see `commit_in_chunks`). `dry_run` stops after the validation.
    pub async fn import_capacity(
        &self,
        rows: &[ImportRow],
        dry_run: bool,
        actor: &Actor,
    ) -> Result<PublishOutcome, ServiceError> {
        let _authority = self.authority_writes.lock().await;
        for row in rows {
            actor.check_upsert(&row.site, self.site(&row.site.site_id).as_ref())?;
        }
        let last_day_max = self.last_day_max();
        let (sites, groups) = ImportCheck::run(rows, &self.catalog(), &self.limits, last_day_max)?;
        let plans: Vec<PublishPlan> = {
            let (catalog, now) = (self.catalog(), self.now_unix_s());
            (groups.iter())
                .map(|((site, service), planned)| {
                    catalog.plan_publish((site, service), planned, now)
                })
                .collect::<Result<_, _>>()?
        };
        self.check_region_slots(&sites, &plans)?;
        if dry_run {
            return dry_run_outcome(sites.len(), &plans);
        }
        let what = format!("{} rows", rows.len());
        self.apply_plans(sites, plans, (&actor.name, "ImportCapacity", what))
            .await
    }

    /// The last day a schedule may reach: `schedule_days_ahead_max` after today (UTC,
    /// plus one day for the zones ahead of it).
    fn last_day_max(&self) -> chrono::NaiveDate {
        let today = chrono::DateTime::from_timestamp_millis(self.now_unix_ms())
            .map_or(chrono::NaiveDate::MIN, |now| now.date_naive());
        let ahead = u64::from(self.limits.schedule_days_ahead_max) + 1;
        today
            .checked_add_days(chrono::Days::new(ahead))
            .unwrap_or(chrono::NaiveDate::MAX)
    }

    /// Refuses plans that would take a region past `slots_per_region_max` slots.
    /// `sites` are the sites an upsert or import creates or moves (their region as it
    /// will be): a moved site brings its slots along.
    fn check_region_slots(&self, sites: &[Site], plans: &[PublishPlan]) -> Result<(), DomainError> {
        let catalog = self.catalog();
        let mut created: HashMap<RegionId, usize> = HashMap::new();
        for site in sites {
            let moved = catalog
                .site(&site.site_id)
                .is_some_and(|existing| existing.region_id != site.region_id);
            if moved {
                *created.entry(site.region_id.clone()).or_default() +=
                    catalog.site_slots(&site.site_id);
            }
        }
        for slot in plans.iter().flat_map(|plan| &plan.created) {
            let site_id = &slot.key.site_id;
            let region = match sites.iter().find(|site| &site.site_id == site_id) {
                Some(site) => site.region_id.clone(),
                None => match catalog.site(site_id) {
                    Some(site) => site.region_id.clone(),
                    None => continue, // refused elsewhere
                },
            };
            *created.entry(region).or_default() += 1;
        }
        let max = self.limits.slots_per_region_max;
        for (region, new) in created {
            let total = catalog.region_slots(&region) + new;
            if total > max {
                return Err(DomainError::invalid(
                    "first_day",
                    format!("region {region} would hold {total} slots; at most {max} (slots_per_region_max)"),
                ));
            }
        }
        Ok(())
    }

    /// Applies site upserts and schedule plans: in one atomic write, or in journaled
    /// chunks when larger than one commit (`commit_in_chunks`). Capacities are lowered
    /// in memory first (the CAS refuses to go below what is taken) and raised only once
    /// durable: memory never admits more than the disk allows.
    async fn apply_plans(
        &self,
        sites: Vec<Site>,
        plans: Vec<PublishPlan>,
        (actor, action, what): (&str, &str, String),
    ) -> Result<PublishOutcome, ServiceError> {
        let lowered = lower_capacities(&plans)?;
        let changed = self.changed_sites(&sites);
        let outcome = PublishOutcome::of(sites.len(), &plans);
        let mut writes = publish_writes(&sites, &plans, self.now_unix_ms());
        if !writes.is_empty() {
            let (created, updated) = (outcome.slots_created, outcome.slots_updated);
            let mut detail = match sites.len() {
                0 => format!("{what}: {created} slots created, {updated} updated"),
                n => format!("{what}: {n} sites, {created} slots created, {updated} updated"),
            };
            if !changed.is_empty() {
                detail.push_str(&format!("; sites changed: {}", changed.join(", ")));
            }
            // First: a chunked write's first chunk says who asked for it, so every part
            // of it applied (before a crash, or in an online backup) is audited.
            writes.insert(0, self.audit(actor, action, detail));
        }
        undo_if_never_written(self.commit_in_chunks(writes).await, || {
            restore_capacities(lowered)
        })?;
        let published = self.publish_in_memory(sites, plans);
        // After the slots are in memory: a matching step that hears of them finds them.
        self.campaigns.place_returned();
        published.map(|()| outcome)
    }

    /// What `sites` change of the sites already there (name, region, time zone: a site
    /// with no slot may change zone), as the audit says.
    fn changed_sites(&self, sites: &[Site]) -> Vec<String> {
        let catalog = self.catalog();
        let was = |site: &Site| catalog.site(&site.site_id).cloned();
        let described = |site: &Site, zone: bool| match zone {
            true => format!(
                "{:?} in region {}, zone {}",
                site.name, site.region_id, site.time_zone
            ),
            false => format!("{:?} in region {}", site.name, site.region_id),
        };
        (sites.iter())
            .filter_map(|site| Some((site, was(site)?)))
            .filter(|(site, old)| {
                (&site.name, &site.region_id, site.time_zone)
                    != (&old.name, &old.region_id, old.time_zone)
            })
            .map(|(site, old)| {
                let zone = site.time_zone != old.time_zone;
                let (now, then) = (described(site, zone), described(&old, zone));
                format!("{} {now} (was {then})", site.site_id)
            })
            .collect()
    }

    /// After the durable write: the sites, new slots, new ends and raised capacities.
    fn publish_in_memory(
        &self,
        sites: Vec<Site>,
        plans: Vec<PublishPlan>,
    ) -> Result<(), ServiceError> {
        let mut catalog = self.catalog_mut();
        for site in sites {
            catalog.upsert_site(site);
        }
        for plan in plans {
            for (slot, end, capacity) in plan.updated {
                slot.set_end_unix_s(end);
                if capacity > slot.counter.snapshot().capacity {
                    // Raising can only fail if someone lowered meanwhile, which the
                    // authority lock rules out.
                    let _ = slot.counter.set_capacity(capacity);
                }
            }
            catalog.insert_slots(plan.created)?;
        }
        Ok(())
    }

    /// Commits authority writes in chunks of `commit_batch_writes_max`: one huge batch
    /// makes sled hold several times its size in memory. A write that needs more than
    /// one chunk is journaled (see `ApplyJournal`): unfinished in the first chunk's batch
    /// (so a first chunk refused leaves no journal behind, and no false warning of an
    /// interrupted write at the next start), finished in the last. A full queue is waited out: for the
    /// first chunk a bounded while (then `Overloaded`: nothing written, the caller
    /// undoes); for every later one for as long as it takes, in turn, since a prefix is
    /// durable already and memory (capacities lowered for the whole write) must not be
    /// left apart from the disk. Memory is updated by the caller only after the last
    /// chunk is durable.
    async fn commit_in_chunks(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let chunk = self.limits.commit_batch_writes_max;
        if writes.len() <= chunk {
            return match writes.is_empty() {
                true => Ok(()),
                false => self.store.commit(&writes).await,
            };
        }
        let unfinished = ApplyJournal {
            started_at_unix_ms: self.now_unix_ms(),
            writes: writes.len() as u64,
            finished: false,
        };
        let finished = ApplyJournal {
            finished: true,
            ..unfinished.clone()
        };
        let chunks = chunked(&writes, chunk);
        let count = chunks.len();
        assert!(count >= 2, "a write of one chunk needs no journal");
        for (index, part) in chunks.into_iter().enumerate() {
            let mut part = part.to_vec();
            if index == 0 {
                part.insert(0, Write::ApplyJournal(unfinished.clone()));
            }
            if index + 1 == count {
                part.push(Write::ApplyJournal(finished.clone()));
            }
            if index > 0 {
                // The chunks before are written: memory must keep their effects.
                self.store
                    .commit_waiting_for_room(&part)
                    .await
                    .map_err(written_in_part)?;
                continue;
            }
            let mut waited = 0;
            loop {
                match self.store.commit(&part).await {
                    Err(StoreError::Overloaded) if waited < CHUNK_QUEUE_WAITS_MAX => {
                        waited += 1;
                        tokio::time::sleep(CHUNK_QUEUE_WAIT).await;
                    }
                    other => {
                        other?;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Refuses to reopen `key` (ending at `end_unix_s`) beside an open slot it overlaps
    /// (a schedule republished with another slot length after it was closed).
    fn check_reopens_alone(&self, key: &SlotKey, end_unix_s: i64) -> Result<(), DomainError> {
        let overlapping = self.catalog().open_overlapping(key, end_unix_s);
        match overlapping {
            None => Ok(()),
            Some(other) => Err(DomainError::invalid(
                "slot_id",
                format!("reopened, it would overlap the open slot {other}: close that one first"),
            )),
        }
    }

    /// Sets one slot's capacity (never below its bookings and live holds) and opens
    /// it if it was closed (unless it would overlap an open slot).
    pub async fn set_slot_capacity(
        &self,
        key: &SlotKey,
        capacity: u32,
        request: Option<RequestKey>,
        actor: &Actor,
    ) -> Result<(Arc<Site>, Arc<Slot>), ServiceError> {
        let _authority = self.authority_writes.lock().await;
        let site = Arc::clone(actor.check_site(self.site(&key.site_id).as_ref())?);
        let slot = self.slot(key)?;
        let request = request.map(|request| (request, set_capacity_fingerprint(key, capacity)));
        if self.authority_replay(request)?.is_some() {
            return Ok((site, slot)); // already applied: the slot as it is now
        }
        let before = slot.counter.snapshot();
        if !before.closed && capacity == before.capacity {
            // Nothing changes: no event, no audit line.
            self.remember_unchanged(request, AuthorityOutcome::CapacitySet)
                .await?;
            return Ok((site, slot));
        }
        if before.closed {
            self.check_reopens_alone(key, slot.end_unix_s())?;
        }
        let below = |taken| DomainError::CapacityBelowBooked {
            slot: key.clone(),
            requested: capacity,
            taken,
        };
        // Lower (of an open slot) first, in memory; raise or reopen once durable.
        let lowered = !before.closed && capacity < before.capacity;
        if lowered {
            slot.counter
                .set_capacity(capacity)
                .map_err(|b| below(b.taken))?;
        } else if capacity < before.taken {
            return Err(below(before.taken).into());
        }
        let mut writes = vec![
            slot_record(slot.key(), slot.end_unix_s(), capacity, false),
            Write::Event(Event::capacity_changed(key, capacity, self.now_unix_ms())),
        ];
        writes.extend(authority_request(
            request,
            AuthorityOutcome::CapacitySet,
            self.now_unix_ms(),
        ));
        writes.push(self.audit(
            &actor.name,
            "SetSlotCapacity",
            format!(
                "slot {key}: capacity {}{} -> {capacity}",
                before.capacity,
                if before.closed { " (closed)" } else { "" }
            ),
        ));
        undo_if_never_written(self.store.commit(&writes).await, || {
            if lowered {
                let _ = slot.counter.set_capacity(before.capacity);
            }
        })?;
        if let Err(b) = slot.counter.set_capacity(capacity) {
            // Places are only taken while open, and it was closed or is at most lowered.
            tracing::error!(slot = %key, taken = b.taken, "capacity below taken after set");
        }
        self.campaigns.place_returned();
        Ok((site, slot))
    }

    /// Closes the open slots of a site (one service or all) starting in `[from, to)`:
    /// they admit nothing from the first step, and their bookings are cancelled with
    /// `reason` and their live holds expired, together with the closure, in one atomic
    /// write.
    pub async fn close_slots(
        self: &Arc<Self>,
        command: CloseCommand,
        actor: &Actor,
    ) -> Result<CloseOutcome, ServiceError> {
        let _authority = self.authority_writes.lock().await;
        actor.check_site(self.site(&command.site_id).as_ref())?;
        let request = close_request(&command);
        if let Some(AuthorityOutcome::Closed {
            slots_closed,
            cancelled_bookings,
            expired_holds,
        }) = self.authority_replay(request)?
        {
            return Ok(CloseOutcome {
                slots_closed,
                cancelled_bookings,
                expired_holds,
            });
        }
        let slots = self.open_slots_in(&command)?;
        if slots.is_empty() {
            let nothing = CloseOutcome::default();
            self.remember_unchanged(request, nothing.into()).await?;
            return Ok(nothing);
        }
        for slot in &slots {
            slot.counter.close();
        }
        let keys: HashSet<SlotKey> = slots.iter().map(|slot| slot.key()).collect();
        let wait = Duration::from_millis(self.limits.close_settle_wait_ms);
        let settled = match settle_admissions(&slots, wait).await {
            Ok(()) => self.confirmed_bookings_in(keys.clone()).await,
            Err(error) => Err(error),
        };
        let confirmed = match settled {
            Ok(confirmed) => confirmed,
            Err(error) => {
                self.reopen_unwritten(&slots);
                return Err(error);
            }
        };
        let closure = self.claim_closure(slots, confirmed, &keys, &command.reason);
        self.commit_closure(closure, &command, request, &actor.name)
            .await
    }

    /// The open slots the closure names.
    fn open_slots_in(&self, command: &CloseCommand) -> Result<Vec<Arc<Slot>>, ServiceError> {
        Ok(self
            .catalog()
            .slots_in_range(
                &command.site_id,
                command.service_id.as_ref(),
                command.from_unix_s,
                command.to_unix_s,
            )?
            .into_iter()
            .filter(|slot| !slot.counter.snapshot().closed)
            .collect())
    }

    /// Every confirmed booking of these slots, read on a blocking thread: from the
    /// slots' rosters, or by a scan of every booking while a booking without a
    /// reference (in no roster) may be stored.
    async fn confirmed_bookings_in(
        self: &Arc<Self>,
        keys: HashSet<SlotKey>,
    ) -> Result<Vec<Booking>, ServiceError> {
        let engine = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let store = &engine.store;
            let bookings: Box<dyn Iterator<Item = _>> = match store.bookings_of_slots(&keys) {
                Some(rostered) => Box::new(rostered),
                None => Box::new(store.bookings()),
            };
            bookings
                .filter(|item| {
                    item.as_ref()
                        .map_or(true, |b| b.is_confirmed() && keys.contains(&b.slot))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|_| ServiceError::Abandoned)?
        .map_err(ServiceError::from)
    }

    /// Claims each booking as a cancel would (one a citizen is cancelling or
    /// rescheduling right now is theirs to finish) and takes the slots' live holds.
    fn claim_closure(
        &self,
        slots: Vec<Arc<Slot>>,
        confirmed: Vec<Booking>,
        keys: &HashSet<SlotKey>,
        reason: &str,
    ) -> Closure {
        let now_ms = self.now_unix_ms();
        let cancelled: Vec<Booking> = confirmed
            .into_iter()
            .filter(|b| {
                self.citizens
                    .claim(b.citizen, &b.slot.service_id, b.booking_id)
            })
            // Read before the claim: one the desk settled since (attended, no-show)
            // stays as it is.
            .filter(
                |b| match self.store.booking(b.citizen.tag(), b.booking_id) {
                    Ok(Some(stored)) if !stored.is_confirmed() => {
                        self.citizens.unclaim(b.citizen, b.booking_id);
                        false
                    }
                    _ => true,
                },
            )
            .map(|b| Booking {
                state: BookingState::Cancelled {
                    at_unix_ms: now_ms,
                    reason: reason.to_string(),
                    request: None,
                },
                ..b
            })
            .collect();
        let holds = self.live_holds().take_where(|slot| keys.contains(slot));
        let requeued = self.requeued_by_closure(&cancelled, &holds);
        let offers = holds
            .iter()
            .filter(|hold| self.campaigns.offer_of(hold.hold_id).is_some())
            .map(|hold| hold.hold_id)
            .collect();
        Closure {
            offers,
            slots,
            cancelled,
            holds,
            requeued,
            reason: reason.to_string(),
            now_ms,
        }
    }

    /// The campaign registrations booked with `cancelled` or offered `holds`, waiting
    /// again with their rank (a closure is not the citizen's doing).
    fn requeued_by_closure(
        &self,
        cancelled: &[Booking],
        holds: &[Hold],
    ) -> Vec<crate::domain::campaign::Registration> {
        let booked = cancelled
            .iter()
            .filter_map(|booking| self.campaigns.booked_with(booking.booking_id));
        let offered = holds
            .iter()
            .filter_map(|hold| self.campaigns.offer_of(hold.hold_id));
        booked.chain(offered).map(|r| r.requeued()).collect()
    }

    /// A closure that wrote nothing: its slots are open again, as on disk, and the
    /// matcher may offer their places again.
    fn reopen_unwritten(&self, slots: &[Arc<Slot>]) {
        for slot in slots {
            slot.counter.reopen();
        }
        self.campaigns.place_returned();
    }

    /// Writes the closure in one atomic batch, then frees what it cancelled; undoes the
    /// claims if the write never reached the queue.
    async fn commit_closure(
        &self,
        closure: Closure,
        command: &CloseCommand,
        request: Option<(RequestKey, RequestFingerprint)>,
        actor: &str,
    ) -> Result<CloseOutcome, ServiceError> {
        let outcome = closure.outcome();
        let mut writes = closure.writes();
        writes.extend(authority_request(
            request,
            outcome.into(),
            self.now_unix_ms(),
        ));
        writes.push(self.audit(actor, "CloseSlots", close_detail(command, outcome)));
        let Closure {
            slots,
            cancelled,
            holds,
            requeued,
            ..
        } = closure;
        undo_if_never_written(self.store.commit(&writes).await, || {
            for booking in &cancelled {
                self.citizens.unclaim(booking.citizen, booking.booking_id);
            }
            let mut live = self.live_holds();
            for hold in &holds {
                live.insert(hold.clone());
            }
            self.reopen_unwritten(&slots);
        })?;
        for booking in &cancelled {
            let owner = (booking.citizen, &booking.channel);
            self.free_entry_and_place(owner, &booking.slot, booking.booking_id);
        }
        for hold in &holds {
            self.free_entry_and_place((hold.citizen, &hold.channel), &hold.slot, hold.hold_id);
        }
        for registration in requeued {
            self.campaigns.settle(registration);
        }
        Ok(outcome)
    }

    /// An authority request that changed nothing: only its outcome is written, if it
    /// has a request id (a retry answers the same).
    async fn remember_unchanged(
        &self,
        request: Option<(RequestKey, RequestFingerprint)>,
        outcome: AuthorityOutcome,
    ) -> Result<(), StoreError> {
        let record: Vec<Write> = authority_request(request, outcome, self.now_unix_ms()).collect();
        match record.is_empty() {
            true => Ok(()),
            false => self.store.commit(&record).await,
        }
    }

    /// The stored outcome of an authority request already applied under this
    /// `request_id`; refuses an id reused for a different request.
    fn authority_replay(
        &self,
        request: Option<(RequestKey, RequestFingerprint)>,
    ) -> Result<Option<AuthorityOutcome>, ServiceError> {
        let Some((key, fingerprint)) = request else {
            return Ok(None);
        };
        match self.store.authority_request(key)? {
            None => Ok(None),
            Some(stored) if stored.fingerprint == fingerprint => Ok(Some(stored.outcome)),
            Some(_) => Err(DomainError::RequestIdReused.into()),
        }
    }

    /// Gauges' view: how many sites, and the totals of the first `limit` (in id order).
    pub fn site_totals(&self, limit: usize) -> (usize, Vec<(Arc<Site>, Totals)>) {
        let held = self.live_holds().count_by_site();
        let catalog = self.catalog();
        (catalog.site_count(), catalog.site_totals(&held, limit))
    }

    pub fn site_stats(&self, site_id: &SiteId) -> Result<(Arc<Site>, SiteStats), ServiceError> {
        let held = self.live_holds().count_by_slot(site_id);
        let catalog = self.catalog();
        let site = catalog
            .site(site_id)
            .cloned()
            .ok_or(DomainError::NotFound(Missing::Site))?;
        let reserved = self.reserved_by_slot(&site, &catalog);
        let mut stats = catalog.site_stats(site_id, &held, &reserved)?;
        drop(catalog);
        add_attendance(&site, self.store.site_attendance(site_id), &mut stats);
        Ok((site, stats))
    }
}

/// Adds the site's attended and no-show bookings (`by_slot`: per slot with bookings) to
/// its totals and to those of each local day of their slot (`by_day`, in day order).
fn add_attendance(site: &Site, by_slot: Vec<(SlotKey, (u32, u32))>, stats: &mut SiteStats) {
    for (slot, (attended, no_shows)) in by_slot {
        let count = |totals: &mut Totals| {
            totals.attended += u64::from(attended);
            totals.no_shows += u64::from(no_shows);
        };
        count(&mut stats.totals);
        let day = site
            .time_zone
            .timestamp_opt(slot.start_unix_s, 0)
            .single()
            .map(|local| local.date_naive());
        let by_day = &mut stats.by_day;
        if let Some(at) = day.and_then(|day| by_day.binary_search_by_key(&day, |(d, _)| *d).ok()) {
            count(&mut by_day[at].1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::{ServiceId, SiteId};

    #[test]
    fn an_audit_detail_is_cut_at_a_character_not_a_byte() {
        assert_eq!(shortened("abc".into(), 3), "abc");
        assert_eq!(shortened("àèìòù".into(), 2), "àè…");
        assert_eq!(shortened("x".repeat(5_000), 1_000).chars().count(), 1_001);
    }

    fn change() -> Write {
        Write::Delete(b"k".to_vec())
    }

    fn event() -> Write {
        let slot = SlotKey {
            site_id: SiteId::parse("s", "site", 64).unwrap(),
            service_id: ServiceId::parse("s", "vax", 64).unwrap(),
            start_unix_s: 0,
        };
        Write::Event(Event::capacity_changed(&slot, 1, 0))
    }

    #[test]
    fn a_chunk_never_ends_between_a_change_and_its_event() {
        // One site record, then (slot, event) pairs: every even boundary splits a pair.
        let mut writes = vec![change()];
        for _ in 0..10 {
            writes.extend([change(), event()]);
        }
        let chunks = chunked(&writes, 4);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), writes.len());
        for chunk in &chunks {
            assert!(chunk.len() <= 5, "at most one event past the size");
            assert!(
                !matches!(chunk[0], Write::Event(_)),
                "an event left its change"
            );
        }
    }
}
