//! Checks a capacity file's rows against each other and the catalog before anything is
//! written: every site described the same way by all its rows, valid zones and
//! schedules, no slot described twice, a bounded total. Reports every problem (up to
//! `import_errors_reported_max`), each named `rows[LINE].FIELD`.
//!
//! Must not import tonic or sled.

use std::collections::{BTreeMap, HashMap};

use chrono::NaiveDate;

use crate::config::Limits;
use crate::domain::catalog::{Catalog, Site};
use crate::domain::error::{DomainError, Violations};
use crate::domain::ids::{ServiceId, SiteId};
use crate::domain::schedule::PlannedSlot;
use crate::domain::schedule::Schedule;

/// One validated row of a capacity file: a site and one schedule at it.
#[derive(Clone, Debug)]
pub struct ImportRow {
    /// Line in the source file, named in errors.
    pub line: u64,
    pub site: Site,
    pub service_id: ServiceId,
    pub schedule: Schedule,
}

/// The slots a file describes, grouped by (site, service).
pub type PlannedGroups = BTreeMap<(SiteId, ServiceId), Vec<PlannedSlot>>;

pub struct ImportCheck<'a> {
    limits: &'a Limits,
    /// The last day a schedule may reach (`schedule_days_ahead_max` from today).
    last_day_max: NaiveDate,
    violations: Violations,
    errors: usize,
    /// Each site with the line that first described it.
    sites: BTreeMap<SiteId, (u64, &'a Site)>,
    groups: PlannedGroups,
    /// Each (site, service)'s slots by start, with their end and the line that
    /// described them.
    slots: HashMap<(SiteId, ServiceId), BTreeMap<i64, (i64, u64)>>,
    planned_total: usize,
}

impl<'a> ImportCheck<'a> {
    /// Checks every row; returns the sites to upsert and the slots each (site, service)
    /// should have, or every violation.
    pub fn run(
        rows: &'a [ImportRow],
        catalog: &Catalog,
        limits: &'a Limits,
        last_day_max: NaiveDate,
    ) -> Result<(Vec<Site>, PlannedGroups), DomainError> {
        let mut check = Self {
            limits,
            last_day_max,
            violations: Violations::default(),
            errors: 0,
            sites: BTreeMap::new(),
            groups: BTreeMap::new(),
            slots: HashMap::new(),
            planned_total: 0,
        };
        for row in rows {
            check.site(row, catalog);
            let Some(planned) = check.schedule(row)? else {
                continue;
            };
            if !check.within_total(row, planned.len()) {
                break;
            }
            check.distinct_starts(row, &planned);
            check
                .groups
                .entry((row.site.site_id.clone(), row.service_id.clone()))
                .or_default()
                .extend(planned);
        }
        check.finish()
    }

    fn report(&mut self, line: u64, field: &str, description: String) {
        self.errors += 1;
        if self.errors <= self.limits.import_errors_reported_max {
            self.violations
                .push(format!("rows[{line}].{field}"), description);
        }
    }

    /// Every row of a site must describe it the same way; the first must be valid.
    fn site(&mut self, row: &'a ImportRow, catalog: &Catalog) {
        match self.sites.get(&row.site.site_id) {
            Some((first, site)) if **site != row.site => {
                let description = format!(
                    "describes site {} differently from line {first}",
                    site.site_id
                );
                self.report(row.line, "site", description);
            }
            Some(_) => {}
            None => {
                if let Err(DomainError::Invalid(found)) = catalog.check_site_upsert(&row.site) {
                    for violation in found {
                        self.report(row.line, "time_zone", violation.description);
                    }
                }
                self.sites
                    .insert(row.site.site_id.clone(), (row.line, &row.site));
            }
        }
    }

    /// The row's slots, or `None` with its violations reported.
    fn schedule(&mut self, row: &ImportRow) -> Result<Option<Vec<PlannedSlot>>, DomainError> {
        if let Err(violation) = row.schedule.check_horizon(self.last_day_max) {
            self.report(row.line, &violation.field, violation.description);
            return Ok(None);
        }
        match row
            .schedule
            .plan(row.site.time_zone, self.limits.publish_slots_max)
        {
            // A row that makes nothing is a mistake (weekdays none of its days fall on,
            // hours inside a daylight-saving gap), not an import that did its part.
            Ok(planned) if planned.is_empty() => {
                let description = "the row makes no slot: none of its days from first_day \
                                   to last_day falls on its weekdays, or its hours all fall \
                                   in a daylight-saving gap"
                    .to_string();
                self.report(row.line, "weekdays", description);
                Ok(None)
            }
            Ok(planned) => Ok(Some(planned)),
            Err(DomainError::Invalid(found)) => {
                for violation in found {
                    self.report(row.line, &violation.field, violation.description);
                }
                Ok(None)
            }
            Err(other) => Err(other),
        }
    }

    /// False (reported) once the file describes more than `import_slots_max` slots.
    fn within_total(&mut self, row: &ImportRow, slots: usize) -> bool {
        self.planned_total += slots;
        if self.planned_total <= self.limits.import_slots_max {
            return true;
        }
        let description = format!(
            "the file describes more than {} slots; split it",
            self.limits.import_slots_max
        );
        self.report(row.line, "first_day", description);
        false
    }

    /// No two lines describe one slot, nor slots whose times overlap (another slot
    /// length for the same hours: their desks offered twice).
    fn distinct_starts(&mut self, row: &ImportRow, planned: &[PlannedSlot]) {
        let group = (row.site.site_id.clone(), row.service_id.clone());
        let slots = self.slots.entry(group).or_default();
        for slot in planned {
            let time = (slot.start_unix_s, slot.end_unix_s);
            if let Some(description) = clash(slots, time, row.line) {
                self.report(row.line, "opens", description);
                return;
            }
            slots.insert(time.0, (time.1, row.line));
        }
    }

    fn finish(mut self) -> Result<(Vec<Site>, PlannedGroups), DomainError> {
        let reported_max = self.limits.import_errors_reported_max;
        if self.errors > reported_max {
            let unlisted = self.errors - reported_max;
            self.violations
                .push("rows", format!("{unlisted} more errors not listed"));
        }
        self.violations.finish()?;
        let sites = self
            .sites
            .into_values()
            .map(|(_, site)| site.clone())
            .collect();
        Ok((sites, self.groups))
    }
}

/// Why the slot `start..end` of `line` clashes with those of other lines (`slots`: by
/// start, their end and line), if it does. One line's own slots may overlap (a
/// daylight-saving jump).
fn clash(slots: &BTreeMap<i64, (i64, u64)>, (start, end): (i64, i64), line: u64) -> Option<String> {
    if let Some((_, first)) = slots.get(&start) {
        return Some(format!("describes a slot that line {first} describes too"));
    }
    let reaching = slots
        .range(..start)
        .next_back()
        .filter(|(_, (other_end, _))| *other_end > start);
    let mut overlapping = reaching.into_iter().chain(slots.range(start..end));
    let (_, (_, other)) = overlapping.find(|(_, (_, other))| *other != line)?;
    Some(format!(
        "describes a slot whose time overlaps one of line {other} (another slot_minutes?)"
    ))
}
