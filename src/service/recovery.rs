//! Start-up: rebuilds counters, citizen limits and idempotency records from the
//! stored bookings, and refuses to start if what is stored breaks an invariant.
//! Request records older than `request_records_retained_hours` are not loaded.
//! Refused: a slot over capacity, a citizen over the limit, a booking holding a place or a
//! live hold in an unknown slot, a stored id or text no request could have written, a
//! day's free places that differ from its slots'.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Mutex, RwLock};

use chrono_tz::Tz;

use crate::config::{Config, StoreBackend};
use crate::domain::booking::{Booking, BookingState, RequestRecord};
use crate::domain::catalog::{Catalog, NewSlot, Site, Slot};
use crate::domain::citizens::{CitizenIndex, Entry};
use crate::domain::field_violation::FieldViolation;
use crate::domain::hold::{HoldState, LiveHolds};
use crate::domain::ids::{BookingId, CitizenKey, RegionId, ServiceId, SiteId, SlotKey};
use crate::domain::release::ChannelUse;
use crate::domain::retention::{self, Cutoffs};
use crate::domain::text::display_text;
use crate::limits::STORED_TEXT_LENGTH_MAX;
use crate::service::citizen_hasher::{BookingIds, CitizenHasher};
use crate::service::clock::Clock;
use crate::service::engine::Engine;
use crate::service::error::ServiceError;
use crate::service::exports::Exports;
use crate::service::rate_limits;
use crate::service::requests::RequestRegistry;
use crate::store::booking_index::BookingIndex;
use crate::store::key_file;
use crate::store::postgres::{Lease, Standby, StoreIdentity};
use crate::store::records::{self, Record, SiteRecord};
use crate::store::size_hint::IndexSizes;
use crate::store::{DataDirLock, Store, StoreError};
use crate::telemetry;

/// Said when a citizen has more active entries than `max_active_per_citizen`: the
/// store was valid under the value it was written with.
const LOWERED: &str = "; if max_active_per_citizen was lowered since, start with the \
                       value these were made under until they end (an offline command: \
                       give it the server's configuration, --config)";

impl Engine {
    /// Opens the store in `data_dir` and rebuilds memory from it, checking invariants.
    pub fn open(
        data_dir: &std::path::Path,
        config: &Config,
        clock: Clock,
    ) -> Result<Self, ServiceError> {
        refuse_a_lost_store(data_dir)?;
        Self::open_with_store(Store::open(data_dir, &config.limits)?, config, clock)
    }

    /// What `prenota serve` opens: `open` on sled; with PostgreSQL, once this node
    /// holds the lease (`standby` says it waits meanwhile), recovered from PostgreSQL.
    /// (Offline commands, backups and restores, work on a sled data dir: `open`.)
    pub fn open_configured(
        data_dir: &std::path::Path,
        config: &Config,
        clock: Clock,
        standby: &Standby,
    ) -> Result<Self, ServiceError> {
        let store = match &config.store {
            StoreBackend::Sled => return Self::open(data_dir, config, clock),
            StoreBackend::Postgres(settings) => {
                let key = config.citizen_hash_key.ok_or_else(|| {
                    ServiceError::Recovery(
                        "[store] backend = \"postgres\" needs [citizens] hash_key_file".into(),
                    )
                })?;
                // Before standing by: a second node on this data dir refuses at once.
                let lock = DataDirLock::take(data_dir, &config.limits)?;
                let identity = StoreIdentity {
                    key_check: key_file::check_value(&key).to_vec(),
                    id_scheme: config.citizen_id_scheme.name(),
                };
                let lease = Lease::acquire(settings, standby, &identity)?;
                standby.waiting.store(false, Ordering::Release);
                if standby.giving_up() {
                    return Err(StoreError::Closed.into()); // dropped: the lease goes
                }
                Store::open_postgres(lock, &config.limits, lease)?
            }
        };
        Self::open_with_store(store, config, clock)
    }

    /// Rebuilds an engine over an already opened store (benchmarks pass a store with
    /// weaker commits; see `Store::open_unsynced_for_benchmarks`).
    pub fn open_with_store(
        store: Store,
        config: &Config,
        clock: Clock,
    ) -> Result<Self, ServiceError> {
        let key = citizen_hash_key(config, &store)?;
        check_id_scheme(config, &store)?;
        let event_log_id = event_log_id(&store)?;
        // New entries sort after the stored ones, even on a clock that is behind now.
        let last_audit = store.last_audit_unix_ms()?.unwrap_or(i64::MIN);
        let retention_time = retention_start(&store, &clock, config)?;
        let catalog = Catalog::default();
        let board = catalog.board();
        let share = |total, share| crate::config::per_token_share(&config.tokens, total, share);
        let mut engine = Self {
            limits: config.limits.clone(),
            store,
            catalog: RwLock::new(catalog),
            citizens: CitizenIndex::default(),
            requests: RequestRegistry::default(),
            holds: Mutex::new(LiveHolds::default()),
            hasher: CitizenHasher::new(&key).map_err(unusable_key)?,
            ids: BookingIds::new(&key).map_err(unusable_key)?,
            references: crate::service::references::References::default(),
            citizen_hash_key: key,
            backup_key: config.backup_key.clone(),
            attempts: rate_limits::CitizenLimiter::new(config.limits.rate_citizen_attempts_per_min),
            exports: Exports::new(
                config.limits.exports_max,
                share(
                    config.limits.exports_max,
                    config.limits.exports_per_token_max,
                ),
            ),
            closing: tokio::sync::watch::channel(false).0,
            event_log_id,
            watchers: crate::service::state::watchers::Watchers::new(
                (
                    config.limits.watch_subscribers_max,
                    share(
                        config.limits.watch_subscribers_max,
                        config.limits.watch_subscribers_per_token_max,
                    ),
                    config.limits.watch_snapshot_slots_per_token_per_s,
                ),
                board,
            ),
            event_streams: Exports::new(
                config.limits.event_streams_max,
                share(
                    config.limits.event_streams_max,
                    config.limits.event_streams_per_token_max,
                ),
            ),
            reads: rate_limits::CitizenLimiter::new(config.limits.rate_citizen_reads_per_min),
            citizen_ids: crate::config::citizen_ids(config),
            authority_writes: tokio::sync::Mutex::new(()),
            releases: crate::service::releases::Releases::default(),
            campaigns: crate::service::state::campaigns::Campaigns::default(),
            series: crate::service::series::SeriesBook::default(),
            opened_at_unix_ms: clock.now_unix_ms(),
            retention_time: Mutex::new(retention_time),
            clock,
            last_audit_unix_ms: std::sync::atomic::AtomicI64::new(last_audit),
        };
        rebuild(&mut engine)?;
        Ok(engine)
    }
}

fn unusable_key(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Recovery(format!("the citizen hash key is unusable: {e}"))
}

/// Where retention's time starts (`domain::retention::retention_start`), with the
/// clock's elapsed ms: at the time a start, a pass or a clean stop last stored, else
/// (none stored one yet) the store's newest write. A clock an hour or more after that beyond
/// `retention_interval_ms` (a long stop, or a clock set ahead), or a minute or more
/// before it (a clock set back), is said in the log: the start takes the clock's time
/// for everything else.
fn retention_start(
    store: &Store,
    clock: &Clock,
    config: &Config,
) -> Result<(i64, i64), ServiceError> {
    let (interval_ms, offline) = (config.limits.retention_interval_ms, config.offline);
    let now = clock.now_unix_ms();
    let stored = store.retention_time_ms()?;
    let from = match stored {
        Some(stored) => Some(stored),
        None => store.newest_write_unix_ms()?,
    };
    let start = retention::retention_start(now, from);
    // Stored now, not only by the first pass: a run shorter than a pass on a clock
    // set ahead must not leave its writes' stamps to the next start.
    if stored != Some(start) && !offline {
        store.put_retention_time(start)?;
    }
    let ahead_ms = from.map_or(0, |from| now.saturating_sub(from));
    let interval_ms = i64::try_from(interval_ms).unwrap_or(i64::MAX);
    if ahead_ms >= interval_ms.saturating_add(3_600_000) {
        tracing::warn!(
            ahead_s = ahead_ms / 1_000,
            "the clock is this far after retention's last time (its last pass, or the \
             store's newest write): retention counts from there and catches up at one \
             second per second (a clock set wrong ahead deletes nothing at once)"
        );
    } else if ahead_ms <= -60_000 {
        tracing::warn!(
            behind_s = -ahead_ms / 1_000,
            "the clock is this far before the store's newest write: if it is wrong, holds \
             last longer and slots that ended look open until it is set right"
        );
    }
    metrics::gauge!(telemetry::RETENTION_BEHIND_CLOCK_SECONDS)
        .set(now.saturating_sub(start) as f64 / 1_000.0);
    Ok((start, clock.elapsed_ms()))
}

/// The key file is made after a new store's files (and their directory entries are
/// synced): a key file without sled's log file means the store's files were lost (a
/// disk that dropped them, a copy without them). Opening would create an empty store and
/// serve it as if nothing had been booked; checked before the store is opened, so a
/// second start refuses too. (A first start cut short after the key file leaves an
/// empty store whose files exist: it goes on.)
fn refuse_a_lost_store(data_dir: &std::path::Path) -> Result<(), ServiceError> {
    let key_file = data_dir.join(key_file::KEY_FILE_NAME);
    let log = data_dir.join("sled").join("db");
    let exists = |path: &std::path::Path| {
        path.try_exists()
            .map_err(|e| ServiceError::Recovery(format!("checking {}: {e}", path.display())))
    };
    if exists(&key_file)? && !exists(&log)? {
        return Err(ServiceError::Recovery(format!(
            "{} has a {} but no store ({} is missing): the store's files are lost. \
             Move the data dir aside and `prenota restore` a backup into it; only if this \
             data dir never served, delete the key file and start again",
            data_dir.display(),
            key_file::KEY_FILE_NAME,
            log.display()
        )));
    }
    Ok(())
}

/// The store's event log id in hex, made (and stored) for a store that has none yet.
fn event_log_id(store: &Store) -> Result<String, ServiceError> {
    let id = match store.event_log_id()? {
        Some(id) => id,
        None => {
            let id = rand::random::<[u8; 16]>().to_vec();
            store.put_event_log_id(&id)?;
            id
        }
    };
    Ok(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// Refuses a store whose citizen ids were read under another `[citizens] id_scheme`:
/// the same citizen would hash differently, find none of its bookings and could book
/// again. A store without the record (new, or older than it) takes the configured one
/// when a server opens it (an offline command's may be a default it was not told).
fn check_id_scheme(config: &Config, store: &Store) -> Result<(), ServiceError> {
    let configured = config.citizen_id_scheme.name();
    let fix = match config.offline {
        true => "Give this command the server's configuration (--config)",
        false => "Set id_scheme back; another scheme needs a new data dir",
    };
    match store.id_scheme()? {
        None if config.offline => Ok(()),
        None => Ok(store.put_id_scheme(configured)?),
        Some(stored) if stored == configured.as_bytes() => Ok(()),
        Some(stored) => Err(ServiceError::Recovery(format!(
            "the store in {} was written with [citizens] id_scheme = {:?}, the \
             configuration says {configured:?}: its citizens would no longer find their \
             bookings and could book again. {fix}",
            store.data_dir().display(),
            String::from_utf8_lossy(&stored)
        ))),
    }
}

/// The configured key, or the data dir's key file (created for a new store only),
/// checked against the check value the store was written with.
fn citizen_hash_key(config: &Config, store: &Store) -> Result<[u8; 32], ServiceError> {
    let data_dir = store.data_dir();
    let key = match config.citizen_hash_key {
        Some(key) => key,
        None => match key_file::load(data_dir)? {
            Some(key) => key,
            None if store.is_empty() => key_file::create(data_dir)?,
            None => {
                return Err(ServiceError::Recovery(format!(
                    "{} holds a store but no {}: a new key would make every stored \
                     booking unreachable and let every citizen book again. Put the key \
                     file back (a backup restores it)",
                    data_dir.display(),
                    key_file::KEY_FILE_NAME
                )))
            }
        },
    };
    let check = key_file::check_value(&key);
    match store.key_check()? {
        Some(stored) if stored == check => {}
        Some(_) => {
            let named = match config.citizen_hash_key {
                Some(_) => "the key of [citizens] hash_key_file".to_string(),
                None => key_file::KEY_FILE_NAME.to_string(),
            };
            return Err(ServiceError::Recovery(format!(
                "{named} is not the key the store in {} was written with: with it no \
                 stored booking could be found. Put the store's own key file back",
                data_dir.display()
            )));
        }
        // An offline command given a key (a wrong --config's hash_key_file, perhaps)
        // records nothing: the server's first start records its own. The data dir's
        // own key file is the store's key: recorded (migrate carries it to PostgreSQL).
        None if config.offline && config.citizen_hash_key.is_some() => {}
        // A new store, or one written before check values: this key is its key.
        None => store.put_key_check(&check)?,
    }
    Ok(key)
}

fn rebuild(engine: &mut Engine) -> Result<(), ServiceError> {
    let started = std::time::Instant::now();
    let cutoffs = engine.retention_cutoffs();
    reserve_indexes(engine);
    let catalog = engine.catalog.get_mut().unwrap_or_else(|p| p.into_inner());
    restore_sites(&engine.store, catalog)?;
    for series in engine.store.series() {
        engine.series.insert(series?);
    }
    let slots = restore_slots(&engine.store, catalog)?;
    let max_active = engine.limits.max_active_per_citizen as usize;
    let requests = Requests {
        registry: &engine.requests,
        cutoffs,
    };
    let live = engine.holds.get_mut().unwrap_or_else(|p| p.into_inner());
    let mut channel_use = engine.releases.channel_use();
    let now_unix_s = engine.clock.now_unix_ms().div_euclid(1_000);
    let live_holds = restore_holds(
        &engine.store,
        &requests,
        (&engine.citizens, &mut channel_use),
        live,
        catalog,
        (max_active, now_unix_s + LIMIT_CHECK_CLOCK_SKEW_S),
    )?;
    let (confirmed, cancelled, in_closed_slots, counted_until) = restore_bookings(
        &engine.store,
        &requests,
        (&engine.citizens, &mut channel_use),
        catalog,
        (max_active, now_unix_s),
    )?;
    drop(channel_use);
    keep_counting(&engine.citizens, counted_until, now_unix_s);
    check_capacities(catalog)?;
    live.check_citizen_index().map_err(ServiceError::Recovery)?;
    in_closed_slots.warn(catalog);
    warn_of_ids_over_the_limit(catalog, engine.limits.id_length_max);
    warn_of_interrupted_write(&engine.store)?;
    engine.restore_releases()?;
    engine.restore_campaigns(|request, id, at| requests.restore(request, id, at))?;
    let elapsed = started.elapsed();
    let request_records = engine.keep_size_hint().requests;
    metrics::gauge!(telemetry::RECOVERY_SECONDS).set(elapsed.as_secs_f64());
    for (kind, count) in [
        ("slots", slots),
        ("live_holds", live_holds as u64),
        ("confirmed", confirmed),
        ("cancelled", cancelled),
        ("request_records", request_records),
        ("confirmed_in_closed_slots", in_closed_slots.bookings()),
    ] {
        metrics::gauge!(telemetry::RECOVERED_RECORDS, "kind" => kind).set(count as f64);
    }
    tracing::info!(
        slots,
        live_holds,
        confirmed,
        cancelled,
        request_records,
        elapsed_ms = elapsed.as_millis() as u64,
        "recovered state from the store"
    );
    Ok(())
}

/// Sizes the indexes rebuilt from the bookings once, by the hint the last run kept
/// (memory that cannot be had is only logged: the tables then grow as they fill).
fn reserve_indexes(engine: &Engine) {
    let store_bytes = engine.store.size_on_disk().unwrap_or(0);
    let sizes = IndexSizes::read(engine.store.data_dir(), store_bytes);
    if sizes == IndexSizes::default() {
        return;
    }
    let reserved = engine
        .store
        .booking_index()
        .reserve(sizes.bookings as usize)
        && engine.citizens.reserve_entries(sizes.citizens as usize)
        && engine.requests.reserve(sizes.requests as usize);
    match reserved {
        true => tracing::info!(?sizes, "recovery sized its tables by the size hint"),
        false => tracing::warn!(?sizes, "the memory the size hint asks for could not be had"),
    }
}

/// The request registry being rebuilt, and which records it still remembers.
struct Requests<'a> {
    registry: &'a RequestRegistry,
    cutoffs: Cutoffs,
}

impl Requests<'_> {
    fn restore(&self, request: RequestRecord, id: BookingId, at_unix_ms: i64) {
        if self.cutoffs.keeps_request(at_unix_ms) {
            self.registry
                .insert_recovered(request.key, request.fingerprint, id, at_unix_ms);
        }
    }
}

/// A stored id or text must pass the rules a request passes: a record written by a
/// forged backup, another build or a damaged disk is refused, not served. Characters
/// are checked, lengths only against these ceilings: lowering a limit must not make
/// data written under the old one refuse to start.
const STORED_ID_LENGTH_MAX: usize = 1_024;

fn recheck(
    what: std::fmt::Arguments<'_>,
    checked: Result<(), FieldViolation>,
) -> Result<(), ServiceError> {
    checked.map_err(|violation| {
        ServiceError::Recovery(format!(
            "{what}: {} {}",
            violation.field, violation.description
        ))
    })
}

fn recheck_site(record: &SiteRecord) -> Result<(), ServiceError> {
    let what = format_args!("stored site {:?}", record.site_id.as_str());
    let max = STORED_ID_LENGTH_MAX;
    let site_id = SiteId::parse("site_id", record.site_id.as_str(), max);
    recheck(what, site_id.map(drop))?;
    let region_id = RegionId::parse("region_id", record.region_id.as_str(), max);
    recheck(what, region_id.map(drop))?;
    let empty = "must not be empty";
    let name = display_text("name", &record.name, empty, STORED_TEXT_LENGTH_MAX);
    recheck(what, name.map(drop))
}

fn recheck_slot_key(key: &SlotKey) -> Result<(), ServiceError> {
    let what = format_args!("stored slot of site {:?}", key.site_id.as_str());
    let max = STORED_ID_LENGTH_MAX;
    let site_id = SiteId::parse("site_id", key.site_id.as_str(), max);
    recheck(what, site_id.map(drop))?;
    let service_id = ServiceId::parse("service_id", key.service_id.as_str(), max);
    recheck(what, service_id.map(drop))
}

/// Warns of a stored site or region id longer than `id_length_max` (lowered since it was
/// written): no request can name it until the limit is raised again.
fn warn_of_ids_over_the_limit(catalog: &Catalog, id_length_max: usize) {
    let sites = catalog.sites_in(None);
    let ids = sites
        .iter()
        .flat_map(|site| [site.site_id.as_str(), site.region_id.as_str()]);
    let over: Vec<&str> = ids.filter(|id| id.len() > id_length_max).collect();
    if let Some(first) = over.first() {
        tracing::warn!(
            id = first,
            ids = over.len(),
            id_length_max,
            "stored site or region ids are longer than limits.id_length_max: no request can \
             name them until it is raised back"
        );
    }
}

fn restore_sites(store: &Store, catalog: &mut Catalog) -> Result<(), ServiceError> {
    for record in store.sites() {
        let record = record?;
        recheck_site(&record)?;
        let time_zone = Tz::from_str(&record.time_zone).map_err(|_| {
            ServiceError::Recovery(format!(
                "site {} has unknown time zone {:?}",
                record.site_id, record.time_zone
            ))
        })?;
        catalog.upsert_site(Site {
            site_id: record.site_id,
            name: record.name,
            region_id: record.region_id,
            time_zone,
        });
    }
    Ok(())
}

/// Returns how many slots there are.
fn restore_slots(store: &Store, catalog: &mut Catalog) -> Result<u64, ServiceError> {
    let mut slots = 0u64;
    for record in store.slots() {
        let record = record?;
        recheck_slot_key(&record.key)?;
        let key = record.key.clone();
        // Retention relies on it: a slot that starts after its cut-off is kept whole.
        if record.end_unix_s <= key.start_unix_s {
            return Err(ServiceError::Recovery(format!(
                "slot {key} ends at or before it starts"
            )));
        }
        catalog
            .insert_slot(NewSlot {
                key: record.key,
                end_unix_s: record.end_unix_s,
                capacity: record.capacity,
                closed: record.closed,
            })
            .map_err(|error| ServiceError::Recovery(format!("slot {key}: {error}")))?;
        slots += 1;
    }
    Ok(slots)
}

/// Confirmed bookings found in closed slots. A closure cancels its slots' bookings in
/// the same write, so none should exist; a store written before cancels and
/// reschedules waited for closures (commit f1a3c71) may hold some. Nothing cancels them
/// by itself (no reason was written for them) and their citizens cannot (SLOT_CLOSED),
/// so recovery names them to the operator instead of refusing to start.
#[derive(Default)]
struct InClosedSlots {
    /// Each slot with its confirmed bookings.
    slots: std::collections::BTreeMap<SlotKey, u32>,
}

impl InClosedSlots {
    /// Slots named in the log line, with what to do for each.
    const SLOTS_NAMED_MAX: usize = 10;

    fn note(&mut self, slot: &SlotKey) {
        *self.slots.entry(slot.clone()).or_default() += 1;
    }

    fn add(&mut self, other: InClosedSlots) {
        for (slot, confirmed) in other.slots {
            *self.slots.entry(slot).or_default() += confirmed;
        }
    }

    fn bookings(&self) -> u64 {
        self.slots.values().map(|&n| u64::from(n)).sum()
    }

    /// One line: how many, and for the first slots the capacity to reopen them at (their
    /// places taken: none free, so nobody books between the reopening and the closure).
    fn warn(&self, catalog: &Catalog) {
        if self.slots.is_empty() {
            return;
        }
        let named: Vec<String> = self
            .slots
            .iter()
            .take(Self::SLOTS_NAMED_MAX)
            .map(|(key, confirmed)| {
                let taken = catalog
                    .slot(key)
                    .map_or(0, |(_, s)| s.counter.snapshot().taken);
                format!(
                    "{} ({confirmed} confirmed; reopen at capacity {taken})",
                    key.text()
                )
            })
            .collect();
        tracing::warn!(
            bookings = self.bookings(),
            slots = self.slots.len(),
            first_slots = ?named,
            "confirmed bookings in closed slots (a closure raced a cancel before commit \
             f1a3c71): for each slot, SetSlotCapacity at the capacity named, then CloseSlots \
             with its site_id, service_id, from = its start and to = its start + 1 s; \
             restart to see the next slots"
        );
    }
}

/// Rebuilds counters, citizen limits and request records from every booking; returns
/// how many are confirmed, how many cancelled, those found in closed slots, and the
/// attended bookings whose slot has not ended at `now_unix_s` (`keep_counting`). The
/// bookings are read in `REBUILD_THREADS` parts, each by a thread of its own that hands
/// chunks of records to a thread of its own which decodes them and rebuilds; every index
/// the rebuilding threads share is sharded, atomic or entered a chunk per lock, and what
/// each counts is added up after.
fn restore_bookings(
    store: &Store,
    requests: &Requests,
    (citizens, channel_use): (&CitizenIndex, &mut ChannelUse),
    catalog: &Catalog,
    (max_active, now_unix_s): (usize, i64),
) -> Result<(u64, u64, InClosedSlots, Vec<CountedUntil>), ServiceError> {
    let shared = Rebuild {
        index: store.booking_index(),
        catalog,
        citizens,
        requests,
        max_active,
        now_unix_s,
        failed: AtomicBool::new(false),
    };
    let mut total = Rebuilt::default();
    std::thread::scope(|scope| -> Result<(), ServiceError> {
        let shared = &shared;
        let mut threads = Vec::with_capacity(2 * REBUILD_THREADS);
        for part in 0..REBUILD_THREADS {
            let (sender, receiver) = std::sync::mpsc::sync_channel(RECOVERY_CHUNKS_IN_FLIGHT);
            let part = (part, REBUILD_THREADS);
            threads.push(scope.spawn(move || {
                let read = read_booking_chunks(store, part, sender, &shared.failed);
                shared.failed_if(read.map(|()| None).map_err(ServiceError::from))
            }));
            threads.push(scope.spawn(move || shared.failed_if(shared.chunks(receiver).map(Some))));
        }
        // Every thread joined before any error is returned. Which error is reported when
        // both parts have one depends on which thread met its own first.
        let mut first_error = None;
        for thread in threads {
            match thread.join() {
                Ok(Ok(Some(rebuilt))) => total.add(rebuilt),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => first_error = first_error.or(Some(e)),
                Err(_) => {
                    let panicked = ServiceError::Recovery("a recovery thread panicked".into());
                    first_error = first_error.or(Some(panicked));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    })?;
    channel_use.merge(total.channel_use);
    shared.index.sort_rosters();
    let counted = total.counted_until;
    Ok((
        total.confirmed,
        total.cancelled,
        total.in_closed_slots,
        counted,
    ))
}

/// Recovery checks the citizen limit as of this long after its clock's now: entries
/// ending sooner are not counted in the check. A booking made just after another one
/// ended must not refuse a start whose clock is behind (a standby's, or after an NTP
/// step back); admission itself counts at the exact now.
const LIMIT_CHECK_CLOCK_SKEW_S: i64 = 3_600;

/// An attended booking whose slot has not ended: its citizen, service, id and end.
type CountedUntil = (CitizenKey, ServiceId, BookingId, i64);

/// Bookings checked in before their slot ended count against their citizen's limit
/// until it has (`CitizenIndex::keep_until`). Entered after every confirmed booking,
/// without the limit check: a store written before this rule may hold a citizen's
/// booking made after such a check-in.
fn keep_counting(citizens: &CitizenIndex, counted_until: Vec<CountedUntil>, now_unix_s: i64) {
    for (citizen, service, id, end_unix_s) in counted_until {
        citizens.insert(citizen, &service, Entry::new(id, end_unix_s), now_unix_s);
        citizens.keep_until(citizen, &service, id, end_unix_s);
    }
}

/// What the rebuild threads share.
struct Rebuild<'a> {
    index: &'a BookingIndex,
    catalog: &'a Catalog,
    citizens: &'a CitizenIndex,
    requests: &'a Requests<'a>,
    max_active: usize,
    now_unix_s: i64,
    /// Set by a thread that found an error: the readers stop.
    failed: AtomicBool,
}

/// What one rebuild thread counted.
#[derive(Default)]
struct Rebuilt {
    confirmed: u64,
    cancelled: u64,
    in_closed_slots: InClosedSlots,
    /// Places taken per slot by channels other than the default.
    channel_use: ChannelUse,
    counted_until: Vec<CountedUntil>,
}

impl Rebuilt {
    fn add(&mut self, other: Rebuilt) {
        self.confirmed += other.confirmed;
        self.cancelled += other.cancelled;
        self.in_closed_slots.add(other.in_closed_slots);
        self.channel_use.merge(other.channel_use);
        self.counted_until.extend(other.counted_until);
    }
}

impl<'a> Rebuild<'a> {
    /// `outcome`, having told the other threads to stop if it is an error.
    fn failed_if<T>(&self, outcome: Result<T, ServiceError>) -> Result<T, ServiceError> {
        if outcome.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        outcome
    }

    /// One rebuild thread: every chunk it is handed, until the reader is done (or, on
    /// an error, until it stops and the reader finds its channel closed).
    fn chunks(&self, chunks: Receiver<RawRecords>) -> Result<Rebuilt, ServiceError> {
        let mut rebuilt = Rebuilt::default();
        let mut bookings = Vec::with_capacity(RECOVERY_CHUNK_RECORDS);
        for chunk in chunks {
            bookings.clear();
            for (key, value) in chunk {
                bookings.push(self.decode(&key, &value)?);
            }
            self.enter(&bookings)?;
            for (booking, slot) in &bookings {
                self.restore(booking, *slot, &mut rebuilt)?;
            }
        }
        Ok(rebuilt)
    }

    /// A stored booking and its slot, if the catalog has it; the booking then has the
    /// catalog's ids (one copy per site and service, which the indexes keep for every
    /// booking).
    fn decode(
        &self,
        key: &[u8],
        value: &[u8],
    ) -> Result<(Booking, Option<&'a Slot>), ServiceError> {
        let mut booking = Booking::decode_value(key, value)?;
        if booking.end_unix_s <= booking.slot.start_unix_s {
            return Err(ServiceError::Recovery(format!(
                "booking {} ends at or before its slot {} starts",
                booking.booking_id, booking.slot
            )));
        }
        let slot = self
            .catalog
            .slot(&booking.slot)
            .map(|(_, slot)| slot.as_ref());
        if let Some(slot) = slot {
            booking.slot = slot.key();
        }
        Ok((booking, slot))
    }

    /// Enters a chunk into the reference and roster indexes.
    fn enter(&self, bookings: &[(Booking, Option<&Slot>)]) -> Result<(), ServiceError> {
        self.index
            .insert_all_unordered(bookings.iter().map(|(booking, _)| booking))
            .map_err(|(at, other)| {
                let booking = &bookings[at].0;
                ServiceError::Recovery(format!(
                    "booking {} has the reference of booking {}",
                    booking.booking_id,
                    records::booking_id_of_key(&other)
                ))
            })
    }

    /// Counters, citizen limits and request records of one booking.
    fn restore(
        &self,
        booking: &Booking,
        slot: Option<&Slot>,
        rebuilt: &mut Rebuilt,
    ) -> Result<(), ServiceError> {
        let (citizens, requests) = (self.citizens, self.requests);
        let counted = (self.max_active, self.now_unix_s + LIMIT_CHECK_CLOCK_SKEW_S);
        match restore_booking(slot, citizens, requests, booking, counted)? {
            true => {
                rebuilt.channel_use.add(&booking.slot, &booking.channel);
                rebuilt.confirmed += 1;
                let closed = slot.is_some_and(|s| s.counter.snapshot().closed);
                if closed && booking.is_confirmed() {
                    rebuilt.in_closed_slots.note(&booking.slot);
                }
                let attended = matches!(booking.state, BookingState::Attended { .. });
                if attended && booking.end_unix_s > self.now_unix_s {
                    let service = booking.slot.service_id.clone();
                    let (citizen, id) = (booking.citizen, booking.booking_id);
                    rebuilt
                        .counted_until
                        .push((citizen, service, id, booking.end_unix_s));
                }
            }
            false => rebuilt.cancelled += 1,
        }
        Ok(())
    }
}

type RawRecords = Vec<(sled::IVec, sled::IVec)>;

/// A reader's side of `restore_bookings`: the booking records of its part, in chunks,
/// until they are read or a rebuild thread failed.
fn read_booking_chunks(
    store: &Store,
    part: (usize, usize),
    sender: SyncSender<RawRecords>,
    failed: &AtomicBool,
) -> Result<(), StoreError> {
    let mut chunk = Vec::with_capacity(RECOVERY_CHUNK_RECORDS);
    for record in store.booking_records(part) {
        chunk.push(record?);
        if chunk.len() == RECOVERY_CHUNK_RECORDS {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(RECOVERY_CHUNK_RECORDS));
            if failed.load(Ordering::Relaxed) || sender.send(full).is_err() {
                return Ok(()); // a rebuild stopped on an error of its own
            }
        }
    }
    if !chunk.is_empty() {
        let _ = sender.send(chunk);
    }
    Ok(())
}

/// Invariant 1 after the rebuild: no slot holds more than its capacity.
fn check_capacities(catalog: &Catalog) -> Result<(), ServiceError> {
    for slot in catalog.slots() {
        let counter = slot.counter.snapshot();
        if counter.taken > counter.capacity {
            return Err(ServiceError::Recovery(format!(
                "slot {} has {} confirmed bookings and live holds but capacity {}",
                slot.key(),
                counter.taken,
                counter.capacity
            )));
        }
    }
    // Derived like the counters, so checked like them (nothing else runs yet).
    catalog.check_free_places().map_err(ServiceError::Recovery)
}

fn warn_of_interrupted_write(store: &Store) -> Result<(), ServiceError> {
    if let Some(journal) = store.apply_journal()? {
        if !journal.finished {
            tracing::warn!(
                started_at_unix_ms = journal.started_at_unix_ms,
                writes = journal.writes,
                "an import or schedule publication was interrupted (a crash, or a storage \
                 failure such as a full disk): part of it may be applied. Re-run the same \
                 import (imports are idempotent) to complete it"
            );
        }
    }
    Ok(())
}

/// Puts live holds back (they count against capacity and their citizen's limit; the
/// sweeper expires those whose time ran out while the server was down) and remembers
/// the hold requests still retained, for idempotency. Returns how many are live.
fn restore_holds(
    store: &Store,
    requests: &Requests,
    (citizens, channel_use): (&CitizenIndex, &mut ChannelUse),
    live: &mut LiveHolds,
    catalog: &Catalog,
    (max_active, now_unix_s): (usize, i64),
) -> Result<usize, ServiceError> {
    for hold in store.holds() {
        let mut hold = hold?;
        requests.restore(hold.request, hold.hold_id, hold.created_at_unix_ms);
        if hold.state != HoldState::Live {
            continue;
        }
        let (_, slot) = catalog.slot(&hold.slot).ok_or_else(|| {
            ServiceError::Recovery(format!(
                "hold {} is in unknown slot {}",
                hold.hold_id, hold.slot
            ))
        })?;
        slot.counter.take_unchecked().map_err(|_| {
            ServiceError::Recovery(format!("slot {} has too many holds", hold.slot))
        })?;
        hold.slot = slot.key(); // the catalog's ids, as for bookings
        let entry = Entry::new(hold.hold_id, slot.end_unix_s());
        let held = citizens.insert(hold.citizen, &hold.slot.service_id, entry, now_unix_s);
        if held > max_active {
            return Err(ServiceError::Recovery(format!(
                "a citizen holds {held} active bookings and holds for service {} \
                 (limit {max_active}), the latest being hold {}{LOWERED}",
                hold.slot.service_id, hold.hold_id
            )));
        }
        channel_use.add(&hold.slot, &hold.channel);
        live.insert(hold);
    }
    Ok(live.len())
}

/// Records in one chunk handed from a store reader to its rebuild thread.
const RECOVERY_CHUNK_RECORDS: usize = 4_096;
/// Chunks buffered for each rebuild thread: with the one each reader fills and the one
/// each rebuild thread decodes, bounds recovery's extra memory (12 chunks of records,
/// a few MB).
const RECOVERY_CHUNKS_IN_FLIGHT: usize = 4;
/// Parts the bookings are read in, each by a reader and a rebuild thread of its own.
/// Two: one reader and one rebuild thread left a core idle for a fifth of the time on
/// the two cores measured (BENCHMARKS "Recovery in two parts").
const REBUILD_THREADS: usize = 2;

/// Puts one stored booking back into memory (`slot`: its slot, if the catalog has it);
/// `true` when it holds a place (confirmed, attended or no-show).
fn restore_booking(
    slot: Option<&Slot>,
    citizens: &CitizenIndex,
    requests: &Requests,
    booking: &Booking,
    (max_active, now_unix_s): (usize, i64),
) -> Result<bool, ServiceError> {
    for (request, at_unix_ms) in retention::booking_requests(booking) {
        requests.restore(request, booking.booking_id, at_unix_ms);
    }
    match &booking.state {
        BookingState::Cancelled { reason, .. } => {
            // Shown to the citizen: the rule a closure's reason passed.
            let what = format_args!("stored booking {}", booking.booking_id);
            let empty = "must not be empty";
            let checked = display_text("cancel_reason", reason, empty, STORED_TEXT_LENGTH_MAX);
            recheck(what, checked.map(drop))?;
            Ok(false)
        }
        BookingState::Confirmed | BookingState::Attended { .. } | BookingState::NoShow { .. } => {
            let slot = slot.ok_or_else(|| {
                ServiceError::Recovery(format!(
                    "booking {} is in unknown slot {}",
                    booking.booking_id, booking.slot
                ))
            })?;
            slot.counter.take_unchecked().map_err(|_| {
                ServiceError::Recovery(format!("slot {} has too many bookings", booking.slot))
            })?;
            if !booking.is_confirmed() {
                // Attended or no-show: the place stays, the citizen's entry is gone.
                return Ok(true);
            }
            let entry = Entry::new(booking.booking_id, booking.end_unix_s);
            let service = &booking.slot.service_id;
            let held = citizens.insert(booking.citizen, service, entry, now_unix_s);
            if held > max_active {
                return Err(ServiceError::Recovery(format!(
                    "a citizen holds {held} active bookings for service {} (limit {max_active}), \
                     the latest being {}{LOWERED}",
                    booking.slot.service_id, booking.booking_id
                )));
            }
            Ok(true)
        }
    }
}
