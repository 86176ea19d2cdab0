//! `WatchAvailability`: every slot of a range first, then each slot again whenever its
//! remaining, capacity, closed or release state changes, coalesced per slot.
//!
//! Built on one change notification: a counter's visible change flags the counter and
//! posts its day on the catalog's board (`domain::catalog::ChangeBoard`, only while
//! someone watches); so does a change of what callers are shown around it
//! (`SlotCounter::mark_shown_changed`: a release created over it, its reserve released,
//! from `service::releases`). Every `watch_coalesce_ms` the fan-out reads the posted
//! days' changed slots, never the whole catalog, and puts each into the pending set of
//! every watcher whose range holds it: a map by slot, so a watcher's memory is bounded
//! by its slots (at most `watch_slots_max`) however fast they change, and the state sent
//! is read at send time (the latest wins).
//!
//! Bounds: `watch_subscribers_max` watches at once (`watch_subscribers_per_token_max` of
//! one token), held for the response stream's life;
//! a reader that reads nothing for `export_idle_timeout_ms` is cut off (its connection
//! closed, as for exports).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::domain::catalog::{SearchQuery, SearchScope, Site};
use crate::domain::error::DomainError;
use crate::service::engine::Engine;
use crate::service::error::{Limiter, ServiceError};
use crate::service::exports::{send_within, ExportKind, ExportPermit, OnIdle, Sent};
pub use crate::service::state::watchers::SlotView;
use crate::service::state::watchers::{Filed, Subscriber};

/// Why a watch ended.
enum Stop {
    /// The reader went away.
    Gone,
    /// The reader read nothing for `export_idle_timeout_ms`: its connection is closed.
    Stalled,
    /// The server shuts down: the stream ends with SHUTTING_DOWN.
    ShuttingDown,
}

/// Slots in flight between a watch's task and its reader.
const SLOTS_BUFFERED: usize = 64;

/// Unfiles its subscriber when the watch ends (and stops the board when none is left).
struct Registration {
    engine: Arc<Engine>,
    filed: Filed,
    subscriber: Arc<Subscriber>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let watchers = &self.engine.watchers;
        let mut filed = watchers.filed();
        if let Some(list) = filed.get_mut(&self.filed) {
            list.retain(|s| !Arc::ptr_eq(s, &self.subscriber));
            if list.is_empty() {
                filed.remove(&self.filed);
            }
        }
        // Under the lock: a watch filed meanwhile cannot see the board turned off after
        // it turned it on.
        if watchers.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            watchers.board.set_watching(false);
        }
    }
}

impl Engine {
    /// Starts a watch of the slots `query` covers (its scope, service and range) for
    /// `token`: the slots first, then their changes. Refused at once past
    /// `watch_subscribers_max` or the token's `watch_subscribers_per_token_max`, when
    /// the range holds more than `watch_slots_max` slots, or when the token's snapshots
    /// pass `watch_snapshot_slots_per_token_per_s`. Keep the permit with the stream.
    pub fn watch_availability(
        self: &Arc<Self>,
        (query, token): (&SearchQuery, &str),
        on_idle: Option<OnIdle>,
    ) -> Result<(mpsc::Receiver<Result<SlotView, ServiceError>>, ExportPermit), ServiceError> {
        let permit = (self.watchers.places)
            .admit(token, ExportKind::Records)
            .map_err(|_| ServiceError::WatchersExhausted)?;
        // Filed before the snapshot: a change made meanwhile is sent again, never lost.
        let registration = self.file_watcher(query);
        let snapshot = self.slots_watched(query)?;
        (self.watchers.snapshots)
            .take(token, snapshot.len())
            .map_err(|wait| ServiceError::rate_limited(Limiter::WatchSnapshot, wait))?;
        let (sender, receiver) = mpsc::channel(SLOTS_BUFFERED);
        let engine = Arc::clone(self);
        tokio::spawn(async move {
            match engine.follow_slots(snapshot, &registration, &sender).await {
                Stop::Gone => {}
                Stop::Stalled => {
                    if let Some(on_idle) = on_idle {
                        on_idle();
                    }
                }
                // UNAVAILABLE / SHUTTING_DOWN: watch again after the restart.
                Stop::ShuttingDown => {
                    let _ = sender.try_send(Err(crate::store::StoreError::Closed.into()));
                }
            }
            drop(registration);
        });
        Ok((receiver, permit))
    }

    fn file_watcher(self: &Arc<Self>, query: &SearchQuery) -> Registration {
        let service = query.service_id.clone();
        let filed = match &query.scope {
            SearchScope::Site(site_id) => Filed::Site(site_id.clone(), service),
            SearchScope::Region(region_id) => Filed::Region(region_id.clone(), service),
        };
        let subscriber = Arc::new(Subscriber {
            from_unix_s: query.from_unix_s,
            to_unix_s: query.to_unix_s,
            pending: Mutex::default(),
            notify: Notify::new(),
        });
        let mut all = self.watchers.filed();
        all.entry(filed.clone())
            .or_default()
            .push(Arc::clone(&subscriber));
        if self.watchers.count.fetch_add(1, Ordering::SeqCst) == 0 {
            self.watchers.board.set_watching(true);
        }
        drop(all);
        Registration {
            engine: Arc::clone(self),
            filed,
            subscriber,
        }
    }

    /// Every slot the watch covers now, refused past `watch_slots_max`.
    fn slots_watched(&self, query: &SearchQuery) -> Result<Vec<SlotView>, ServiceError> {
        let catalog = self.catalog();
        let sites: Vec<Arc<Site>> = match &query.scope {
            SearchScope::Site(site_id) => vec![catalog
                .site(site_id)
                .cloned()
                .ok_or(DomainError::NotFound(crate::domain::error::Missing::Site))?],
            SearchScope::Region(region_id) => catalog.sites_in(Some(region_id)),
        };
        let mut slots = Vec::new();
        for site in sites {
            let range = (query.from_unix_s, query.to_unix_s);
            let found =
                catalog.slots_in_range(&site.site_id, Some(&query.service_id), range.0, range.1)?;
            slots.extend(found.into_iter().map(|slot| (Arc::clone(&site), slot)));
            if slots.len() > self.limits.watch_slots_max {
                return Err(DomainError::invalid(
                    "to",
                    format!(
                        "a watch covers at most {} slots (watch_slots_max): narrow the range \
                         or watch one site",
                        self.limits.watch_slots_max
                    ),
                )
                .into());
            }
        }
        Ok(slots)
    }

    /// Sends the snapshot, then each batch of pending changes, until the reader goes
    /// away or stalls, or the server shuts down.
    async fn follow_slots(
        &self,
        snapshot: Vec<SlotView>,
        registration: &Registration,
        sender: &mpsc::Sender<Result<SlotView, ServiceError>>,
    ) -> Stop {
        let subscriber = &registration.subscriber;
        let mut closing = self.closing.subscribe();
        let mut batch = snapshot;
        loop {
            for view in batch {
                if let Some(stop) = self.send_slot(sender, view, &mut closing).await {
                    return stop;
                }
            }
            tokio::select! {
                () = subscriber.notify.notified() => {}
                () = sender.closed() => return Stop::Gone,
                _ = closing.wait_for(|closing| *closing) => return Stop::ShuttingDown,
            }
            batch = std::mem::take(&mut *subscriber.pending())
                .into_values()
                .collect();
        }
    }

    /// Hands one slot to the reader within `export_idle_timeout_ms`; `Some` when the
    /// watch must end.
    async fn send_slot(
        &self,
        sender: &mpsc::Sender<Result<SlotView, ServiceError>>,
        view: SlotView,
        closing: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Option<Stop> {
        let idle = Duration::from_millis(self.limits.export_idle_timeout_ms);
        match send_within(sender, Ok(view), idle, closing).await {
            Sent::Delivered => None,
            Sent::Gone => Some(Stop::Gone),
            Sent::Stalled => Some(Stop::Stalled),
            Sent::Closing => Some(Stop::ShuttingDown),
        }
    }

    /// One fan-out: the slots changed since the last one go to the pending set of every
    /// watcher whose range holds them. The server runs it every `watch_coalesce_ms`;
    /// returns how many slots changed.
    pub fn fan_out_availability(&self) -> usize {
        if self.watchers.count.load(Ordering::SeqCst) == 0 {
            return 0;
        }
        let changed = self.catalog().changed_slots();
        let filed = self.watchers.filed();
        for (site, slot) in &changed {
            let slot_key = slot.key();
            let service = &slot_key.service_id;
            let by_site = Filed::Site(site.site_id.clone(), service.clone());
            let by_region = Filed::Region(site.region_id.clone(), service.clone());
            for key in [by_site, by_region] {
                for subscriber in filed.get(&key).into_iter().flatten() {
                    let start = slot_key.start_unix_s;
                    if (subscriber.from_unix_s..subscriber.to_unix_s).contains(&start) {
                        let view = (Arc::clone(site), Arc::clone(slot));
                        subscriber.pending().insert(slot_key.clone(), view);
                        subscriber.notify.notify_one();
                    }
                }
            }
        }
        changed.len()
    }
}
