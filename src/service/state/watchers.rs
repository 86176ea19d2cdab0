//! The open watches of `WatchAvailability`, filed for the fan-out
//! (`service::availability` has the watch itself).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, Semaphore};

use crate::domain::catalog::{ChangeBoard, Site, Slot};
use crate::domain::ids::{RegionId, ServiceId, SiteId, SlotKey};

/// A slot with its site, as a watcher is sent it.
pub type SlotView = (Arc<Site>, Arc<Slot>);

/// Changed slots a watcher has not been sent yet, by slot: the latest change wins.
pub(crate) type Pending = BTreeMap<SlotKey, SlotView>;

pub(crate) struct Subscriber {
    pub(crate) from_unix_s: i64,
    pub(crate) to_unix_s: i64,
    pub(crate) pending: Mutex<Pending>,
    pub(crate) notify: Notify,
}

impl Subscriber {
    pub(crate) fn pending(&self) -> MutexGuard<'_, Pending> {
        // Each critical section is one insert or one swap: a poisoned lock is sound.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where a watcher is filed: by its site or its region, and its service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Filed {
    Site(SiteId, ServiceId),
    Region(RegionId, ServiceId),
}

/// Every open watch, filed for the fan-out.
pub struct Watchers {
    pub(crate) permits: Arc<Semaphore>,
    /// Also serialises turning the board on (first watch) and off (last one gone).
    pub(crate) filed: Mutex<HashMap<Filed, Vec<Arc<Subscriber>>>>,
    pub(crate) count: AtomicUsize,
    pub(crate) board: Arc<ChangeBoard>,
}

impl Watchers {
    /// At most `max` watches, of the catalog whose change `board` this is.
    pub fn new(max: usize, board: Arc<ChangeBoard>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            filed: Mutex::default(),
            count: AtomicUsize::new(0),
            board,
        }
    }

    pub(crate) fn filed(&self) -> MutexGuard<'_, HashMap<Filed, Vec<Arc<Subscriber>>>> {
        self.filed.lock().unwrap_or_else(|p| p.into_inner())
    }
}
