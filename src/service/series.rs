//! Dose series: UpsertSeries, BookSeries (every dose or none, one write), and what a
//! cancel or a reschedule of a dose needs: its later doses, its neighbours.

use chrono::TimeZone;

use crate::domain::booking::{Booking, RequestRecord};
use crate::domain::error::{DomainError, Missing};
use crate::domain::ids::{
    BookingId, ChannelId, CitizenKey, RequestFingerprint, RequestKey, SeriesId, SlotKey,
};
use crate::domain::plans;
use crate::domain::series::{Placed, Series};
use crate::service::actor::Actor;
use crate::service::engine::{Attempt, BookingView, Engine};
use crate::service::error::ServiceError;
pub use crate::service::state::series::SeriesBook;
use crate::store::records::Write;

/// BookSeries: one slot per dose, in dose order, for one citizen.
pub struct SeriesCommand {
    pub series_id: SeriesId,
    pub citizen_id: String,
    /// At least one.
    pub slots: Vec<SlotKey>,
    pub request: RequestKey,
    pub channel: ChannelId,
}

impl Engine {
    /// Creates or changes a series. A change applies to new bookings and reschedules;
    /// booked doses stay valid.
    pub async fn upsert_series(
        &self,
        series: Series,
        actor: &Actor,
    ) -> Result<Series, ServiceError> {
        series.check(self.limits.series_doses_max)?;
        let _authority = self.authority_writes.lock().await;
        let existing = self.series.get(&series.series_id);
        if existing.as_deref() == Some(&series) {
            return Ok(series);
        }
        if existing.is_none() && self.series.count() >= self.limits.series_max {
            return Err(DomainError::SeriesExhausted.into());
        }
        let detail = series
            .doses
            .iter()
            .enumerate()
            .map(|(index, dose)| {
                format!(
                    "dose {} {} {}..{} days{}",
                    index + 1,
                    dose.service_id,
                    dose.min_days_after_previous,
                    dose.max_days_after_previous,
                    if dose.same_site { " same site" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let audit = self.audit(
            &actor.name,
            "UpsertSeries",
            format!("{}: {detail}", series.series_id),
        );
        self.store
            .commit(&[Write::Series(series.clone()), audit])
            .await?;
        self.series.insert(series.clone());
        Ok(series)
    }

    /// Books every dose of a series for one citizen in one write, or none. A retry
    /// returns the same bookings.
    pub async fn book_series(
        &self,
        command: SeriesCommand,
    ) -> Result<Vec<BookingView>, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        let first = command.slots.first().ok_or(DomainError::invalid(
            "slot_ids",
            "must name one slot per dose",
        ))?;
        let slot_texts: Vec<String> = command.slots.iter().map(ToString::to_string).collect();
        let mut parts: Vec<&[u8]> = vec![b"book-series", command.series_id.as_str().as_bytes()];
        parts.push(&citizen.0);
        parts.extend(slot_texts.iter().map(|slot| slot.as_bytes()));
        let fingerprint = RequestFingerprint::of(&parts);
        let bookings = self
            .once_per_request(
                (command.request.for_citizen(&citizen), fingerprint),
                Attempt::On(&citizen, first),
                |request| self.series_and_commit(&command, citizen, request),
                |bookings: &Vec<Booking>| bookings[0].booking_id,
                |id| self.series_bookings(citizen, id),
            )
            .await?;
        bookings
            .into_iter()
            .map(|booking| self.view(booking))
            .collect()
    }

    async fn series_and_commit(
        &self,
        command: &SeriesCommand,
        citizen: CitizenKey,
        request: RequestRecord,
    ) -> Result<Vec<Booking>, ServiceError> {
        let series = self
            .series
            .get(&command.series_id)
            .ok_or(DomainError::NotFound(Missing::Series))?;
        let now_ms = self.now_unix_ms();
        let (mut doses, mut minted) = (Vec::new(), Vec::new());
        for slot in &command.slots {
            let view = self.slot_view(slot, (&citizen, &command.channel), now_ms)?;
            let codes = self.mint_codes()?;
            let placed = self.placed(slot)?;
            doses.push((view, placed, (self.ids.mint(citizen), codes.codes)));
            minted.push(codes);
        }
        let plan = plans::book_series(&series, &doses, citizen, request, now_ms)?;
        let written = self.execute(plan, || {}).await;
        minted.into_iter().for_each(|codes| codes.settle(&written));
        written
    }

    /// The bookings of a finished BookSeries whose outcome (dose 1) is `id`: the
    /// citizen's bookings of the same request and time, in dose order.
    fn series_bookings(
        &self,
        citizen: CitizenKey,
        id: BookingId,
    ) -> Result<Vec<Booking>, ServiceError> {
        let outcome = self.stored_booking(id)?;
        let series_id = outcome
            .series
            .as_ref()
            .map(|s| s.series_id.clone())
            .ok_or(DomainError::NotFound(Missing::Booking))?;
        let mut doses: Vec<Booking> = self
            .citizen_series_bookings(citizen, &series_id)?
            .into_iter()
            .filter(|b| {
                b.request.key == outcome.request.key
                    && b.created_at_unix_ms == outcome.created_at_unix_ms
            })
            .collect();
        doses.sort_by_key(|b| b.series.as_ref().map(|s| s.dose));
        Ok(doses)
    }

    /// Where and on which local day of its site a slot is.
    pub(super) fn placed(&self, slot: &SlotKey) -> Result<Placed, ServiceError> {
        let site = self
            .site(&slot.site_id)
            .ok_or(DomainError::NotFound(Missing::Site))?;
        let local = site
            .time_zone
            .timestamp_opt(slot.start_unix_s, 0)
            .single()
            .ok_or(DomainError::NotFound(Missing::Slot))?;
        Ok(Placed {
            site_id: slot.site_id.clone(),
            start_unix_s: slot.start_unix_s,
            local_date: local.date_naive(),
        })
    }

    /// Every booking (all states) of the citizen in the series (any of its BookSeries).
    fn citizen_series_bookings(
        &self,
        citizen: CitizenKey,
        series_id: &SeriesId,
    ) -> Result<Vec<Booking>, ServiceError> {
        self.citizen_bookings_where(citizen, |b| {
            b.series.as_ref().is_some_and(|s| s.series_id == *series_id)
        })
    }

    /// The citizen's confirmed doses after `booking`'s in its series (none if it is no
    /// dose): a cancel takes them with it.
    pub(super) fn later_doses(&self, booking: &Booking) -> Result<Vec<Booking>, ServiceError> {
        let Some(dose) = &booking.series else {
            return Ok(Vec::new());
        };
        let same_booking = |b: &Booking| {
            b.series
                .as_ref()
                .is_some_and(|s| s.first_booking == dose.first_booking && s.dose > dose.dose)
        };
        Ok(self
            .citizen_series_bookings(booking.citizen, &dose.series_id)?
            .into_iter()
            .filter(|b| b.is_confirmed() && same_booking(b))
            .collect())
    }

    /// What a move of dose `booking` to `new_slot` must keep: its interval from the
    /// previous dose (any state but cancelled) and the next confirmed dose's from it.
    /// `None` when it is no dose (or its series is gone).
    pub(super) fn neighbours_of(
        &self,
        booking: &Booking,
        new_slot: &SlotKey,
    ) -> Result<Option<plans::Neighbours>, ServiceError> {
        let Some(dose) = &booking.series else {
            return Ok(None);
        };
        if self.slot(new_slot).is_err() {
            // The plan answers SLOT_NOT_FOUND.
            return Ok(None);
        }
        let Some(series) = self.series.get(&dose.series_id) else {
            return Ok(None);
        };
        let doses = self.citizen_series_bookings(booking.citizen, &dose.series_id)?;
        let first = dose.first_booking;
        let find = |number: u8, usable: fn(&Booking) -> bool| {
            doses
                .iter()
                .filter(|b| b.series.as_ref().is_some_and(|s| s.first_booking == first))
                .find(|b| usable(b) && b.series.as_ref().is_some_and(|s| s.dose == number))
        };
        let previous = match dose.dose {
            1 => None,
            number => find(number - 1, Booking::holds_place),
        };
        let next = find(dose.dose + 1, Booking::is_confirmed);
        let confirmed = [previous, next]
            .into_iter()
            .flatten()
            .filter(|b| b.is_confirmed())
            .map(|b| (b.slot.clone(), b.booking_id))
            .collect();
        let placed = |b: Option<&Booking>| b.map(|b| self.placed(&b.slot)).transpose();
        Ok(Some(plans::Neighbours {
            series,
            dose: dose.dose,
            previous: placed(previous)?,
            next: placed(next)?,
            new: self.placed(new_slot)?,
            confirmed,
        }))
    }
}
