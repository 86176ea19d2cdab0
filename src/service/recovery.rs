//! Start-up: rebuilds counters, citizen limits and idempotency records from the
//! stored bookings, and refuses to start if what is stored breaks an invariant.

use std::str::FromStr;

use chrono_tz::Tz;

use crate::domain::booking::BookingState;
use crate::domain::catalog::{Site, Slot};
use crate::service::{Engine, ServiceError};

pub fn rebuild(engine: &mut Engine) -> Result<(), ServiceError> {
    let started = std::time::Instant::now();
    let catalog = engine.catalog.get_mut().unwrap_or_else(|p| p.into_inner());
    for record in engine.store.sites() {
        let record = record?;
        let time_zone = Tz::from_str(&record.time_zone).map_err(|_| {
            ServiceError::Recovery(format!(
                "site {} has unknown time zone {:?}",
                record.site_id, record.time_zone
            ))
        })?;
        catalog.upsert_site(Site {
            site_id: record.site_id,
            name: record.name,
            region_id: record.region_id,
            time_zone,
        });
    }
    let mut slot_count = 0u64;
    for record in engine.store.slots() {
        let record = record?;
        let key = record.key.clone();
        catalog
            .insert_slot(Slot::new(record.key, record.end_unix_s, record.capacity))
            .map_err(|_| {
                ServiceError::Recovery(format!("slot {key} belongs to an unknown site"))
            })?;
        slot_count += 1;
    }
    let mut confirmed = 0u64;
    let mut cancelled = 0u64;
    let max_active = engine.limits.max_active_per_citizen as usize;
    for booking in engine.store.bookings() {
        let booking = booking?;
        engine.requests.insert_recovered(
            booking.request.key,
            booking.request.fingerprint,
            booking.booking_id,
        );
        match &booking.state {
            BookingState::Cancelled { request, .. } => {
                cancelled += 1;
                if let Some(request) = request {
                    engine.requests.insert_recovered(
                        request.key,
                        request.fingerprint,
                        booking.booking_id,
                    );
                }
            }
            BookingState::Confirmed => {
                confirmed += 1;
                let (_, slot) = catalog.slot(&booking.slot).ok_or_else(|| {
                    ServiceError::Recovery(format!(
                        "booking {} is in unknown slot {}",
                        booking.booking_id, booking.slot
                    ))
                })?;
                slot.counter.take_unchecked();
                let held = engine.citizens.insert(
                    booking.citizen,
                    &booking.slot.service_id,
                    booking.booking_id,
                );
                if held > max_active {
                    return Err(ServiceError::Recovery(format!(
                        "a citizen holds {held} active bookings for service {} (limit {max_active}), \
                         the latest being {}",
                        booking.slot.service_id, booking.booking_id
                    )));
                }
            }
        }
    }
    for slot in catalog.slots() {
        let counter = slot.counter.snapshot();
        if counter.taken > counter.capacity {
            return Err(ServiceError::Recovery(format!(
                "slot {} has {} confirmed bookings but capacity {}",
                slot.key, counter.taken, counter.capacity
            )));
        }
    }
    tracing::info!(
        slots = slot_count,
        confirmed,
        cancelled,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered state from the store"
    );
    Ok(())
}
