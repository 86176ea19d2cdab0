//! The open watches of `WatchAvailability`, filed for the fan-out
//! (`service::availability` has the watch itself).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::domain::catalog::{ChangeBoard, Site, Slot};
use crate::domain::ids::{RegionId, ServiceId, SiteId, SlotKey};
use crate::service::exports::Exports;
use crate::service::rate_limits::TokenSlots;

/// A slot with its site, as a watcher is sent it.
pub type SlotView = (Arc<Site>, Arc<Slot>);

/// Changed slots a watcher has not been sent yet, by slot: the latest change wins.
pub(in crate::service) type Pending = BTreeMap<SlotKey, SlotView>;

pub(in crate::service) struct Subscriber {
    pub(in crate::service) from_unix_s: i64,
    pub(in crate::service) to_unix_s: i64,
    pub(in crate::service) pending: Mutex<Pending>,
    pub(in crate::service) notify: Notify,
}

impl Subscriber {
    pub(in crate::service) fn pending(&self) -> MutexGuard<'_, Pending> {
        // Each critical section is one insert or one swap: a poisoned lock is sound.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where a watcher is filed: by its site or its region, and its service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(in crate::service) enum Filed {
    Site(SiteId, ServiceId),
    Region(RegionId, ServiceId),
}

/// Every open watch, filed for the fan-out.
pub struct Watchers {
    /// Places: `watch_subscribers_max` in all, `watch_subscribers_per_token_max` per token.
    pub(in crate::service) places: Exports,
    /// The slots each token's new watches may be sent first, per second
    /// (`watch_snapshot_slots_per_token_per_s`).
    pub(in crate::service) snapshots: TokenSlots,
    /// Also serialises turning the board on (first watch) and off (last one gone).
    pub(in crate::service) filed: Mutex<HashMap<Filed, Vec<Arc<Subscriber>>>>,
    pub(in crate::service) count: AtomicUsize,
    pub(in crate::service) board: Arc<ChangeBoard>,
}

impl Watchers {
    /// At most `max` watches, `per_token_max` of one token, their snapshots at most
    /// `snapshot_slots_per_s` slots a second per token, of the catalog whose change
    /// `board` this is.
    pub fn new(
        (max, per_token_max, snapshot_slots_per_s): (usize, usize, u32),
        board: Arc<ChangeBoard>,
    ) -> Self {
        Self {
            places: Exports::new(max, per_token_max),
            snapshots: TokenSlots::new(snapshot_slots_per_s),
            filed: Mutex::default(),
            count: AtomicUsize::new(0),
            board,
        }
    }

    pub(in crate::service) fn filed(&self) -> MutexGuard<'_, HashMap<Filed, Vec<Arc<Subscriber>>>> {
        self.filed.lock().unwrap_or_else(|p| p.into_inner())
    }
}
