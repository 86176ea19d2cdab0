//! Open data: availability added up per site, service and local day, never a person
//! (`OpenDataService.GetAvailabilitySummary`, `prenota open-data`). Read from the same
//! counters as `GetSiteStats`, a page at a time (`page_size_max` rows, so one call's work
//! is bounded however wide the question).

use std::sync::Arc;

use chrono::NaiveDate;

use crate::domain::catalog::{DayTotals, DaysWanted, Site};
use crate::domain::error::DomainError;
use crate::domain::ids::{RegionId, ServiceId, SiteId};
use crate::service::engine::Engine;

/// What a summary covers.
#[derive(Clone, Debug)]
pub struct SummaryQuery {
    pub region_id: Option<RegionId>,
    pub service_id: Option<ServiceId>,
    /// Local days, inclusive.
    pub first_day: NaiveDate,
    pub last_day: NaiveDate,
    /// Resume strictly after this row.
    pub after: Option<RowKey>,
    pub page_size: usize,
}

/// Where a row sits in the summary's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowKey {
    pub site_id: SiteId,
    pub service_id: ServiceId,
    pub day: NaiveDate,
}

pub struct SummaryRow {
    pub site: Arc<Site>,
    pub totals: DayTotals,
}

pub struct SummaryPage {
    pub rows: Vec<SummaryRow>,
    /// When the counts were read.
    pub as_of_unix_ms: i64,
    /// Set when more rows may follow the last one.
    pub next: Option<RowKey>,
}

impl Engine {
    /// One page of the availability summary; a page token of another question (another
    /// region's site, another service) is refused, not read as a wrong place to go on.
    pub fn availability_summary(&self, query: &SummaryQuery) -> Result<SummaryPage, DomainError> {
        let as_of_unix_ms = self.now_unix_ms();
        // Live holds counted once per call (one pass, one short lock).
        let held = self.live_holds().count_by_slot_everywhere();
        let catalog = self.catalog();
        let after_site = query.after.as_ref().map(|after| &after.site_id);
        let mut page = SummaryPage {
            rows: Vec::new(),
            as_of_unix_ms,
            next: None,
        };
        let mut budget = self.limits.search_slots_scanned_max;
        // The last (site, service, day) looked at: where the next page goes on from.
        let mut last: Option<RowKey> = None;
        let sites = catalog.sites_in(query.region_id.as_ref());
        check_page_token(query, &sites)?;
        for site in sites
            .into_iter()
            .filter(|s| after_site.is_none_or(|a| s.site_id >= *a))
        {
            let wanted = DaysWanted {
                service_id: query.service_id.as_ref(),
                first: query.first_day,
                last: query.last_day,
                after: query
                    .after
                    .as_ref()
                    .filter(|after| after.site_id == site.site_id)
                    .map(|after| (&after.service_id, after.day)),
                limit: query.page_size - page.rows.len(),
                budget,
            };
            let found = catalog.day_totals(&site.site_id, &wanted, &held);
            budget -= found.looked;
            if let Some((service_id, day)) = found.last {
                let site_id = site.site_id.clone();
                last = Some(RowKey {
                    site_id,
                    service_id,
                    day,
                });
            }
            page.rows.extend(found.rows.into_iter().map(|mut totals| {
                totals.totals.reserved = self.reserved_on_day(&catalog, &site, &totals);
                SummaryRow {
                    site: Arc::clone(&site),
                    totals,
                }
            }));
            // A full page goes on after its last row; an exhausted budget after the last
            // entry looked at (this site's or, at a site's start, the one before).
            if page.rows.len() == query.page_size {
                page.next = page.rows.last().map(|row| RowKey {
                    site_id: row.site.site_id.clone(),
                    service_id: row.totals.service_id.clone(),
                    day: row.totals.day,
                });
                return Ok(page);
            }
            if found.stopped || budget == 0 {
                page.next = last;
                return Ok(page);
            }
        }
        Ok(page)
    }
}

/// A summary's page token names a row of its own question: one of its region's sites,
/// of its service if it has one (another question's token would be read as a wrong
/// place to go on from).
fn check_page_token(query: &SummaryQuery, sites: &[Arc<Site>]) -> Result<(), DomainError> {
    let Some(after) = &query.after else {
        return Ok(());
    };
    let in_region = sites.iter().any(|site| site.site_id == after.site_id);
    let of_service = query
        .service_id
        .as_ref()
        .is_none_or(|s| *s == after.service_id);
    match in_region && of_service {
        true => Ok(()),
        false => Err(DomainError::invalid(
            "page_token",
            "is not a next_page_token of this summary (its region and service)",
        )),
    }
}
