//! Dose series (PRODUCT.md part D): the services booked together, in order, and the
//! interval each dose keeps from the one before it. Intervals count calendar days in
//! the site's own time zone, both bounds inclusive: dose 2 "28 to 42 days after dose 1"
//! is any slot whose local date is 28 to 42 days after dose 1's local date, whatever
//! the hour and whatever DST change lies between.
//!
//! Pure and synchronous: the engine keeps the series in memory, passes the local dates
//! in, and writes what the plans hand it.

use chrono::{Duration, NaiveDate};

use crate::domain::error::{DomainError, Violations};
use crate::domain::ids::{SeriesId, ServiceId, SiteId};

/// One dose: its service, and its interval from the previous dose (the first dose's
/// interval is unused and 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dose {
    pub service_id: ServiceId,
    pub min_days_after_previous: u32,
    pub max_days_after_previous: u32,
    /// At the previous dose's site.
    pub same_site: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Series {
    pub series_id: SeriesId,
    /// At least one; each dose is its own service (each counts under its service's
    /// citizen limit).
    pub doses: Vec<Dose>,
}

/// Longest interval a dose may ask for (about three years).
pub const INTERVAL_DAYS_MAX: u32 = 1_100;

impl Series {
    /// Checks a series as an authority sends it: 1 to `doses_max` doses, distinct
    /// services, `min <= max <= INTERVAL_DAYS_MAX`, the first dose without an interval.
    pub fn check(&self, doses_max: usize) -> Result<(), DomainError> {
        let mut violations = Violations::default();
        if self.doses.is_empty() || self.doses.len() > doses_max {
            violations.push("series.doses", format!("must list 1 to {doses_max} doses"));
        }
        for (index, dose) in self.doses.iter().enumerate() {
            let field = |name: &str| format!("series.doses[{index}].{name}");
            if self.doses[..index]
                .iter()
                .any(|earlier| earlier.service_id == dose.service_id)
            {
                violations.push(
                    field("service_id"),
                    "each dose is its own service (each counts under its own citizen limit)",
                );
            }
            let first = index == 0;
            if first && (dose.min_days_after_previous, dose.max_days_after_previous) != (0, 0) {
                violations.push(field("min_days_after_previous"), "must be 0 for dose 1");
            }
            if first && dose.same_site {
                violations.push(field("same_site"), "dose 1 has no previous site");
            }
            if dose.min_days_after_previous > dose.max_days_after_previous
                || dose.max_days_after_previous > INTERVAL_DAYS_MAX
            {
                violations.push(
                    field("max_days_after_previous"),
                    format!(
                        "must be at least min_days_after_previous and at most {INTERVAL_DAYS_MAX}"
                    ),
                );
            }
        }
        violations.finish()
    }

    /// The dose (from 1) and its rules.
    pub fn dose(&self, dose: u8) -> Option<&Dose> {
        self.doses.get(usize::from(dose).checked_sub(1)?)
    }
}

/// Where, when and on which local day a dose is (or would be).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub site_id: SiteId,
    pub start_unix_s: i64,
    pub local_date: NaiveDate,
}

/// Whether dose `dose` (from 2) at `this` keeps its interval from the previous dose at
/// `previous`: `SERIES_INTERVAL` with the dose and its allowed local dates if not, an
/// invalid argument on the request's `field` (its slot) if it must be at the previous
/// dose's site and is not, or does not start after it (doses come in order: with
/// `min_days_after_previous` 0, dose 2 at 09:00 with dose 1 at 15:00 the same day was
/// accepted).
pub fn check_interval(
    series: &Series,
    dose: u8,
    (previous, this): (&Placed, &Placed),
    field: &'static str,
) -> Result<(), DomainError> {
    let rules = series
        .dose(dose)
        .expect("the caller checked the dose exists");
    assert!(dose >= 2, "dose 1 has no previous dose");
    if rules.same_site && this.site_id != previous.site_id {
        return Err(DomainError::invalid(
            field,
            format!("dose {dose} must be at the site of dose {}", dose - 1),
        ));
    }
    if this.start_unix_s <= previous.start_unix_s {
        return Err(DomainError::invalid(
            field,
            format!("dose {dose} must start after dose {}", dose - 1),
        ));
    }
    let days = |n: u32| Duration::days(i64::from(n));
    let earliest = previous.local_date + days(rules.min_days_after_previous);
    let latest = previous.local_date + days(rules.max_days_after_previous);
    if this.local_date < earliest || this.local_date > latest {
        return Err(DomainError::SeriesInterval {
            dose,
            earliest,
            latest,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use chrono_tz::Tz;

    fn id<T>(
        parse: fn(&str, &str, usize) -> Result<T, crate::domain::field_violation::FieldViolation>,
        value: &str,
    ) -> T {
        parse("x", value, 64).unwrap()
    }

    fn two_doses(min: u32, max: u32, same_site: bool) -> Series {
        Series {
            series_id: id(SeriesId::parse, "covid19-primary"),
            doses: vec![
                Dose {
                    service_id: id(ServiceId::parse, "covid19-dose1"),
                    min_days_after_previous: 0,
                    max_days_after_previous: 0,
                    same_site: false,
                },
                Dose {
                    service_id: id(ServiceId::parse, "covid19-dose2"),
                    min_days_after_previous: min,
                    max_days_after_previous: max,
                    same_site,
                },
            ],
        }
    }

    /// The local date, in `zone`, of the instant `utc` (RFC 3339).
    fn local(zone: Tz, site: &str, utc: &str) -> Placed {
        let instant = chrono::DateTime::parse_from_rfc3339(utc).unwrap();
        Placed {
            site_id: id(SiteId::parse, site),
            start_unix_s: instant.timestamp(),
            local_date: zone.from_utc_datetime(&instant.naive_utc()).date_naive(),
        }
    }

    fn date(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn interval_bounds_are_inclusive_calendar_days_in_the_sites_zone() {
        use chrono_tz::{America::New_York, Europe::Rome};
        let series = two_doses(28, 42, false);
        // (zone, dose 1 at (UTC), dose 2 at (UTC), allowed?)
        let cases: &[(Tz, &str, &str, bool)] = &[
            // Rome: dose 1 on 1 March, DST begins on 28 March. 28 days later is 29 March,
            // 42 days later 12 April: 27 × 24 h + 23 h is still the 28th day.
            (Rome, "2027-03-01T08:00:00Z", "2027-03-29T07:00:00Z", true),
            (Rome, "2027-03-01T08:00:00Z", "2027-03-28T21:59:00Z", false),
            (Rome, "2027-03-01T08:00:00Z", "2027-03-28T22:00:00Z", true),
            (Rome, "2027-03-01T08:00:00Z", "2027-04-12T21:59:00Z", true),
            (Rome, "2027-03-01T08:00:00Z", "2027-04-12T22:00:00Z", false),
            // A late-evening dose 1 in New York is on the previous UTC day's local date;
            // DST begins there on 14 March.
            (
                New_York,
                "2027-03-02T03:30:00Z",
                "2027-03-29T04:00:00Z",
                true,
            ),
            (
                New_York,
                "2027-03-02T03:30:00Z",
                "2027-03-29T03:59:00Z",
                false,
            ),
            (
                New_York,
                "2027-03-02T03:30:00Z",
                "2027-04-13T03:59:00Z",
                true,
            ),
            (
                New_York,
                "2027-03-02T03:30:00Z",
                "2027-04-13T04:00:00Z",
                false,
            ),
        ];
        for (zone, first, second, allowed) in cases {
            let previous = local(*zone, "hub", first);
            let this = local(*zone, "hub", second);
            let checked = check_interval(&series, 2, (&previous, &this), "slot_ids");
            assert_eq!(
                checked.is_ok(),
                *allowed,
                "{zone} {first} → {second}: {checked:?}"
            );
        }
    }

    #[test]
    fn a_month_end_counts_days_not_months() {
        let series = two_doses(28, 28, false);
        let previous = Placed {
            site_id: id(SiteId::parse, "hub"),
            start_unix_s: 0,
            local_date: date("2027-01-31"),
        };
        let at = |day: &str| Placed {
            site_id: id(SiteId::parse, "hub"),
            start_unix_s: 1,
            local_date: date(day),
        };
        assert!(check_interval(&series, 2, (&previous, &at("2027-02-28")), "slot_ids").is_ok());
        assert_eq!(
            check_interval(&series, 2, (&previous, &at("2027-03-01")), "slot_ids"),
            Err(DomainError::SeriesInterval {
                dose: 2,
                earliest: date("2027-02-28"),
                latest: date("2027-02-28"),
            })
        );
        // 29 days after 31 January: 1 March, or 29 February in a leap year.
        let series = two_doses(29, 29, false);
        assert!(check_interval(&series, 2, (&previous, &at("2027-03-01")), "slot_ids").is_ok());
        let leap = Placed {
            local_date: date("2028-01-31"),
            ..previous
        };
        assert!(check_interval(&series, 2, (&leap, &at("2028-02-29")), "slot_ids").is_ok());
        assert!(check_interval(&series, 2, (&leap, &at("2028-03-01")), "slot_ids").is_err());
    }

    #[test]
    fn same_site_doses_stay_at_the_previous_site() {
        let series = two_doses(0, 10, true);
        let previous = Placed {
            site_id: id(SiteId::parse, "hub"),
            start_unix_s: 100,
            local_date: date("2027-05-03"),
        };
        let elsewhere = Placed {
            site_id: id(SiteId::parse, "clinic"),
            start_unix_s: 200,
            local_date: date("2027-05-03"),
        };
        assert!(matches!(
            check_interval(&series, 2, (&previous, &elsewhere), "slot_ids"),
            Err(DomainError::Invalid(_))
        ));
        let later = Placed {
            start_unix_s: 200,
            ..previous.clone()
        };
        assert!(check_interval(&series, 2, (&previous, &later), "slot_ids").is_ok());
    }

    /// With min_days_after_previous 0, the same day is allowed, but dose 2 must still
    /// come after dose 1: earlier that day (or in the same slot) is refused.
    #[test]
    fn a_dose_must_start_after_the_previous_one() {
        let series = two_doses(0, 10, false);
        let zone = chrono_tz::Europe::Rome;
        let afternoon = local(zone, "hub", "2027-05-03T13:00:00Z");
        let morning = local(zone, "hub", "2027-05-03T07:00:00Z");
        for this in [&morning, &afternoon] {
            assert!(matches!(
                check_interval(&series, 2, (&afternoon, this), "slot_ids[1]"),
                Err(DomainError::Invalid(_))
            ));
        }
        assert!(check_interval(&series, 2, (&morning, &afternoon), "slot_ids[1]").is_ok());
    }

    #[test]
    fn a_series_is_checked_as_a_whole() {
        assert!(two_doses(21, 49, true).check(6).is_ok());
        let mut bad = two_doses(50, 49, false);
        bad.doses[0].min_days_after_previous = 3;
        bad.doses[0].same_site = true;
        bad.doses[1].service_id = bad.doses[0].service_id.clone();
        let Err(DomainError::Invalid(violations)) = bad.check(6) else {
            panic!("a bad series passed");
        };
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "series.doses[0].min_days_after_previous",
                "series.doses[0].same_site",
                "series.doses[0].max_days_after_previous",
                "series.doses[1].service_id",
                "series.doses[1].max_days_after_previous",
            ]
        );
        assert!(two_doses(1, 2, false).check(1).is_err());
        let empty = Series {
            doses: Vec::new(),
            ..two_doses(1, 2, false)
        };
        assert!(empty.check(6).is_err());
    }
}
