//! The dose series in memory (`service::series` has the commands).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::domain::ids::SeriesId;
use crate::domain::series::Series;

/// The series in memory (few; read on every series booking, cancel and move of a dose).
#[derive(Default)]
pub struct SeriesBook {
    pub(in crate::service) series: RwLock<HashMap<SeriesId, Arc<Series>>>,
}

impl SeriesBook {
    pub fn get(&self, series_id: &SeriesId) -> Option<Arc<Series>> {
        self.read().get(series_id).cloned()
    }

    pub fn count(&self) -> usize {
        self.read().len()
    }

    pub fn insert(&self, series: Series) {
        let mut all = self.series.write().unwrap_or_else(|p| p.into_inner());
        all.insert(series.series_id.clone(), Arc::new(series));
    }

    pub(in crate::service) fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<SeriesId, Arc<Series>>> {
        self.series.read().unwrap_or_else(|p| p.into_inner())
    }
}
