//! `WatchEvents`: the event log (outbox) read from a sequence on, then followed live.
//!
//! Events are records of the store, written in the same group commit as their change
//! and numbered by the committer (`store::committer`), which publishes the last durable
//! sequence after each sync. A watch reads the store in pages up to that sequence and
//! waits for the next one: it reads no event that a crash could still take back, and the
//! store is the only copy (no per-watcher buffer beyond one page in its channel).
//! A chunked authority write never splits a change from its event (`service::capacity`);
//! retention never deletes the record holding the last event; a restore gives the log a
//! new id (`Kevents`), and a resume naming the old one is told EVENT_LOG_REPLACED.
//!
//! Bounds: `event_streams_max` watches at once and `event_streams_per_token_max` per
//! token, each place held for the life of its response stream; a reader that reads
//! nothing for `export_idle_timeout_ms` is cut off like a stalled export (its task ends
//! and `on_idle` closes its connection, the only way to end a stream whose client keeps
//! its window shut).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::domain::catalog::Site;
use crate::domain::event::SequencedEvent;
use crate::domain::ids::{RegionId, SiteId};
use crate::service::actor::{Actor, Regions};
use crate::service::engine::Engine;
use crate::service::error::ServiceError;
use crate::service::exports::{send_within, ExportKind, ExportPermit, OnIdle, Sent};

/// Which events a watch wants: those of the sites the caller may see *now* (checked at
/// every event, so a site moved to another region stops showing at once), narrowed to
/// one site or one region.
#[derive(Clone, Debug)]
pub struct EventScope {
    regions: Regions,
    site: Option<SiteId>,
    region: Option<RegionId>,
}

/// An event with the site it happened at (for its time zone).
#[derive(Clone, Debug)]
pub struct EventView {
    pub sequence: u64,
    pub event: crate::domain::event::Event,
    pub site: Arc<Site>,
}

/// Events in flight between the store and a slow reader.
const EVENTS_BUFFERED: usize = 64;

impl EventScope {
    /// The scope `site` / `region` (at most one) asks for, if `actor` may see it.
    pub fn of(
        engine: &Engine,
        actor: &Actor,
        site: Option<SiteId>,
        region: Option<RegionId>,
    ) -> Result<Self, ServiceError> {
        if let Some(site_id) = &site {
            actor.check_site(engine.site(site_id).as_ref())?;
        }
        if let Some(region) = &region {
            actor.check_region(region)?;
        }
        Ok(Self {
            regions: actor.regions.clone(),
            site,
            region,
        })
    }

    fn wants(&self, site: &Site) -> bool {
        let visible = match &self.regions {
            Regions::All => true,
            Regions::Only(regions) => regions.contains(&site.region_id),
        };
        visible
            && self.site.as_ref().is_none_or(|id| *id == site.site_id)
            && self.region.as_ref().is_none_or(|id| *id == site.region_id)
    }
}

/// Why a watch stopped sending.
enum Stop {
    /// The reader went away: nothing to tell.
    Gone,
    /// The reader stalled (or took nothing within a grace once shutdown began): its
    /// connection is closed.
    CutOff,
}

impl Engine {
    /// The id of this store's event log: a gateway keeps it with its sequence.
    pub fn event_log_id(&self) -> &str {
        &self.event_log_id
    }

    /// Starts a watch of the events after `after` in `scope` for `token`: refused at
    /// once if the log no longer holds them (`EventsPruned`), never held them
    /// (`EventsAhead`), or too many watches are open. Keep the permit with the stream.
    pub fn watch_events(
        self: &Arc<Self>,
        (scope, after, log_id): (EventScope, u64, &str),
        token: &str,
        on_idle: Option<OnIdle>,
    ) -> Result<
        (
            mpsc::Receiver<Result<EventView, ServiceError>>,
            ExportPermit,
        ),
        ServiceError,
    > {
        if !log_id.is_empty() && log_id != self.event_log_id {
            return Err(ServiceError::EventLogReplaced {
                log_id: self.event_log_id.clone(),
            });
        }
        let permit = self
            .event_streams
            .admit(token, ExportKind::Records)
            .map_err(|_| ServiceError::WatchersExhausted)?;
        self.check_resumable(after)?;
        let (sender, receiver) = mpsc::channel(EVENTS_BUFFERED);
        let engine = Arc::clone(self);
        tokio::spawn(async move {
            match engine.follow_events(&scope, after, &sender).await {
                Ok(Stop::Gone) => {}
                Ok(Stop::CutOff) => {
                    if let Some(on_idle) = on_idle {
                        on_idle();
                    }
                }
                // Shutdown: the reply stream ends with SHUTTING_DOWN by itself
                // (`grpc::shed`); nothing to wait for.
                Err(ServiceError::Store(crate::store::StoreError::Closed)) => {}
                // Waited for room (a full buffer must not swallow why the stream ends:
                // EVENTS_PRUNED), for as long as a reader may stall.
                Err(error) => {
                    let idle = Duration::from_millis(engine.limits.export_idle_timeout_ms);
                    let told = tokio::time::timeout(idle, sender.send(Err(error))).await;
                    if let (Err(_), Some(on_idle)) = (told, on_idle) {
                        on_idle();
                    }
                }
            }
        });
        Ok((receiver, permit))
    }

    /// The log still holds every event after `after`, and `after` is one it wrote.
    fn check_resumable(&self, after: u64) -> Result<(), ServiceError> {
        let last = *self.store.last_event().borrow();
        if after > last {
            return Err(ServiceError::EventsAhead { after, last });
        }
        match self.store.oldest_event()? {
            Some(oldest) if after + 1 < oldest => Err(ServiceError::EventsPruned { oldest }),
            _ => Ok(()),
        }
    }

    /// Sends every durable event after `after` in `scope`, then each new one, until the
    /// reader goes away or stalls, the server shuts down (`SHUTTING_DOWN`), or
    /// retention deleted events it had not read (`EventsPruned`).
    async fn follow_events(
        self: &Arc<Self>,
        scope: &EventScope,
        mut after: u64,
        sender: &mpsc::Sender<Result<EventView, ServiceError>>,
    ) -> Result<Stop, ServiceError> {
        let mut durable = self.store.last_event();
        let mut closing = self.closing.subscribe();
        loop {
            let through = *durable.borrow_and_update();
            while after < through {
                for event in self.events_page(after, through).await? {
                    after = event.sequence;
                    let Some(view) = self.event_view(event, scope) else {
                        continue;
                    };
                    if let Some(stop) = self.send(sender, view, &mut closing).await {
                        return Ok(stop);
                    }
                }
                tokio::task::yield_now().await;
            }
            tokio::select! {
                changed = durable.changed() => {
                    if changed.is_err() {
                        return Err(crate::store::StoreError::Closed.into());
                    }
                }
                () = sender.closed() => return Ok(Stop::Gone),
                // UNAVAILABLE / SHUTTING_DOWN: resume elsewhere or after the restart.
                _ = closing.wait_for(|closing| *closing) => {
                    return Err(crate::store::StoreError::Closed.into());
                }
            }
        }
    }

    /// The next events after `after` (up to `through`), read on a blocking thread; each
    /// must follow the one before, or retention deleted some the reader had not read.
    async fn events_page(
        self: &Arc<Self>,
        after: u64,
        through: u64,
    ) -> Result<Vec<SequencedEvent>, ServiceError> {
        let engine = Arc::clone(self);
        let page_max = self.limits.events_page_max;
        let page =
            tokio::task::spawn_blocking(move || engine.store.events(after, through, page_max))
                .await
                .map_err(|_| ServiceError::Abandoned)??;
        let contiguous = !page.is_empty()
            && page
                .iter()
                .enumerate()
                .all(|(i, event)| event.sequence == after + 1 + i as u64);
        if !contiguous {
            let oldest = self.store.oldest_event()?.unwrap_or(through);
            return Err(ServiceError::EventsPruned { oldest });
        }
        Ok(page)
    }

    /// Hands one event to the reader, waiting at most `export_idle_timeout_ms`.
    async fn send(
        &self,
        sender: &mpsc::Sender<Result<EventView, ServiceError>>,
        view: EventView,
        closing: &mut watch::Receiver<bool>,
    ) -> Option<Stop> {
        let idle = Duration::from_millis(self.limits.export_idle_timeout_ms);
        match send_within(sender, Ok(view), idle, closing).await {
            Sent::Delivered => None,
            Sent::Gone => Some(Stop::Gone),
            Sent::Stalled => Some(Stop::CutOff),
            // The reply stream ends with SHUTTING_DOWN by itself (`grpc::shed`).
            Sent::Closing => Some(Stop::Gone),
        }
    }

    /// The event as a reader in `scope` sees it, or `None` if it is not in scope.
    fn event_view(&self, event: SequencedEvent, scope: &EventScope) -> Option<EventView> {
        let site = self.site(&event.event.slot.site_id)?;
        scope.wants(&site).then_some(EventView {
            sequence: event.sequence,
            event: event.event,
            site,
        })
    }
}
