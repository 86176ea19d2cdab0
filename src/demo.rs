//! The demo seed of `serve --demo`: a few sites in different zones with two weeks
//! of slots from today, so a newcomer can search and book at once. Idempotent: a
//! restart creates only what is missing (a demo site an authority renamed stays
//! renamed, a slot whose capacity it changed keeps it), and writes nothing, audit rows
//! included, when nothing is missing.

use chrono::{Duration, TimeZone, Utc};
use chrono_tz::Tz;

use crate::domain::catalog::Site;
use crate::domain::error::DomainError;
use crate::domain::ids::{RegionId, ServiceId, SiteId};
use crate::domain::schedule::{Schedule, ScheduleInput};
use crate::service::Actor;
use crate::service::{Engine, ServiceError};

pub const DEMO_DAYS: i64 = 14;

/// `PRENOTA_DEMO_DAYS_AHEAD=N` starts the demo's schedules N days after today (at most
/// 30), so the README's walk-through can be tried, and tested, on a day that is not
/// the day the demo was seeded.
pub const DAYS_AHEAD_VARIABLE: &str = "PRENOTA_DEMO_DAYS_AHEAD";

fn days_ahead() -> Result<i64, ServiceError> {
    match std::env::var(DAYS_AHEAD_VARIABLE) {
        Err(_) => Ok(0),
        Ok(text) => match text.trim().parse::<i64>() {
            Ok(days) if (0..=30).contains(&days) => Ok(days),
            _ => Err(DomainError::invalid(
                DAYS_AHEAD_VARIABLE,
                "must be a number of days from 0 to 30",
            )
            .into()),
        },
    }
}

struct DemoSite {
    site_id: &'static str,
    name: &'static str,
    region_id: &'static str,
    time_zone: Tz,
    /// (service, capacity per slot)
    services: &'static [(&'static str, u32)],
}

const DEMO_SITES: &[DemoSite] = &[
    DemoSite {
        site_id: "rome-termini",
        name: "Roma Termini vaccination hub",
        region_id: "lazio",
        time_zone: chrono_tz::Europe::Rome,
        services: &[("covid19-dose1", 4), ("identity-card", 2)],
    },
    DemoSite {
        site_id: "amsterdam-zuid",
        name: "GGD Amsterdam Zuid",
        region_id: "noord-holland",
        time_zone: chrono_tz::Europe::Amsterdam,
        services: &[("covid19-dose1", 6)],
    },
    DemoSite {
        site_id: "nyc-queens",
        name: "Queens Community Center",
        region_id: "new-york",
        time_zone: chrono_tz::America::New_York,
        services: &[("covid19-dose1", 3)],
    },
];

/// Mondays to Fridays 09:00–13:00 and 14:00–17:00, Saturdays 09:00–12:00.
const DEMO_HOURS: &[(u32, &str, &str)] = &[
    (1, "09:00", "13:00"),
    (1, "14:00", "17:00"),
    (2, "09:00", "13:00"),
    (2, "14:00", "17:00"),
    (3, "09:00", "13:00"),
    (3, "14:00", "17:00"),
    (4, "09:00", "13:00"),
    (4, "14:00", "17:00"),
    (5, "09:00", "13:00"),
    (5, "14:00", "17:00"),
    (6, "09:00", "12:00"),
];

pub async fn seed(engine: &Engine) -> Result<(), ServiceError> {
    let limits = engine.limits().clone();
    let days_ahead = Duration::days(days_ahead()?);
    let mut created = 0u32;
    for demo in DEMO_SITES {
        let site_id = SiteId::parse("site_id", demo.site_id, limits.id_length_max)
            .map_err(DomainError::from)?;
        let region_id = RegionId::parse("region_id", demo.region_id, limits.id_length_max)
            .map_err(DomainError::from)?;
        if engine.site(&site_id).is_none() {
            let site = Site {
                site_id: site_id.clone(),
                name: demo.name.to_string(),
                region_id,
                time_zone: demo.time_zone,
            };
            engine.upsert_site(site, &Actor::everywhere("demo")).await?;
        }
        let now = Utc
            .timestamp_millis_opt(engine.clock().now_unix_ms())
            .single()
            .unwrap_or_else(Utc::now);
        let today = now.with_timezone(&demo.time_zone).date_naive() + days_ahead;
        let first_day = today.format("%Y-%m-%d").to_string();
        let last_day = (today + Duration::days(DEMO_DAYS - 1))
            .format("%Y-%m-%d")
            .to_string();
        for &(service, capacity) in demo.services {
            let service_id = ServiceId::parse("service_id", service, limits.id_length_max)
                .map_err(DomainError::from)?;
            let schedule = Schedule::parse(
                &ScheduleInput {
                    first_day: &first_day,
                    last_day: &last_day,
                    opening_hours: DEMO_HOURS.to_vec(),
                    slot_minutes: 15,
                    capacity_per_slot: capacity,
                },
                &crate::config::schedule_bounds(&limits),
            )
            .map_err(DomainError::Invalid)?;
            created += engine
                .publish_missing_slots(&site_id, &service_id, &schedule, &Actor::everywhere("demo"))
                .await?
                .slots_created;
        }
    }
    tracing::info!(
        sites = DEMO_SITES.len(),
        slots_created = created,
        "demo data seeded"
    );
    Ok(())
}
