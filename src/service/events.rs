//! `WatchEvents`: the event log (outbox) read from a sequence on, then followed live.
//!
//! Events are records of the store, written in the same group commit as their change
//! and numbered by the committer (`store::committer`), which publishes the last durable
//! sequence after each sync. A watch reads the store in pages up to that sequence and
//! waits for the next one: it reads no event that a crash could still take back, and the
//! store is the only copy (no per-watcher buffer beyond one page in its channel).
//!
//! At most `event_streams_max` watches at once; a reader that reads nothing for
//! `export_idle_timeout_ms` is dropped (its task ends and frees its place).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::domain::catalog::Site;
use crate::domain::event::SequencedEvent;
use crate::domain::ids::{RegionId, SiteId};
use crate::service::actor::{Actor, Regions};
use crate::service::engine::Engine;
use crate::service::error::ServiceError;

/// Which events a watch wants (already checked against the caller's regions).
#[derive(Clone, Debug)]
pub enum EventScope {
    /// Every site the actor may see.
    Visible(Regions),
    Site(SiteId),
    Region(RegionId),
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
        match (site, region) {
            (Some(site_id), _) => {
                actor.check_site(engine.site(&site_id).as_ref())?;
                Ok(Self::Site(site_id))
            }
            (None, Some(region)) => {
                actor.check_region(&region)?;
                Ok(Self::Region(region))
            }
            (None, None) => Ok(Self::Visible(actor.regions.clone())),
        }
    }

    fn wants(&self, site: &Site) -> bool {
        match self {
            Self::Visible(Regions::All) => true,
            Self::Visible(Regions::Only(regions)) => regions.contains(&site.region_id),
            Self::Site(site_id) => site.site_id == *site_id,
            Self::Region(region) => site.region_id == *region,
        }
    }
}

impl Engine {
    /// Starts a watch of the events after `after` in `scope`: refused at once if the
    /// log no longer holds them (`EventsPruned`), never held them (`EventsAhead`), or
    /// `event_streams_max` watches are open.
    pub fn watch_events(
        self: &Arc<Self>,
        scope: EventScope,
        after: u64,
    ) -> Result<mpsc::Receiver<Result<EventView, ServiceError>>, ServiceError> {
        let permit = Arc::clone(&self.event_streams)
            .try_acquire_owned()
            .map_err(|_| ServiceError::WatchersExhausted)?;
        self.check_resumable(after)?;
        let (sender, receiver) = mpsc::channel(EVENTS_BUFFERED);
        let engine = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(error) = engine.follow_events(scope, after, &sender).await {
                // A stalled reader's channel is full: its stream just ends.
                let _ = sender.try_send(Err(error));
            }
            drop(permit);
        });
        Ok(receiver)
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
    /// reader goes away (Ok), stalls (`ExportIdle`) or the log moved past it.
    async fn follow_events(
        self: &Arc<Self>,
        scope: EventScope,
        mut after: u64,
        sender: &mpsc::Sender<Result<EventView, ServiceError>>,
    ) -> Result<(), ServiceError> {
        let idle = Duration::from_millis(self.limits.export_idle_timeout_ms);
        let mut durable = self.store.last_event();
        let mut closing = self.closing.subscribe();
        loop {
            let through = *durable.borrow_and_update();
            while after < through {
                let engine = Arc::clone(self);
                let page_max = self.limits.events_page_max;
                let page = tokio::task::spawn_blocking(move || {
                    engine.store.events(after, through, page_max)
                })
                .await
                .map_err(|_| ServiceError::Abandoned)??;
                match page.first() {
                    Some(first) if first.sequence == after + 1 => {}
                    // Retention deleted what this reader had not read yet.
                    _ => {
                        let oldest = self.store.oldest_event()?.unwrap_or(through);
                        return Err(ServiceError::EventsPruned { oldest });
                    }
                }
                for event in page {
                    after = event.sequence;
                    let Some(view) = self.event_view(event, &scope) else {
                        continue;
                    };
                    match tokio::time::timeout(idle, sender.send(Ok(view))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Ok(()), // the reader went away
                        Err(_) => return Err(ServiceError::ExportIdle),
                    }
                }
                tokio::task::yield_now().await;
            }
            tokio::select! {
                changed = durable.changed() => {
                    if changed.is_err() {
                        return Ok(()); // the store shut down
                    }
                }
                () = sender.closed() => return Ok(()),
                // UNAVAILABLE / SHUTTING_DOWN: resume elsewhere or after the restart.
                _ = closing.wait_for(|closing| *closing) => {
                    return Err(crate::store::StoreError::Closed.into());
                }
            }
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
