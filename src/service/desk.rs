//! The desk of a site (`SiteService`) and lookups by reference: a slot's roster,
//! check-in with the citizen's code, no-shows after the slot ended.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::booking::{Booking, Reference};
use crate::domain::error::{DomainError, Missing};
use crate::domain::ids::{SiteId, SlotKey};
use crate::domain::plans::{self, DeskChange};
use crate::service::engine::{BookingView, Engine};
use crate::service::error::{Limiter, ServiceError};
use crate::service::references::CodeLimits;

/// The sites whose desk a caller may work.
#[derive(Clone, Debug)]
pub enum Desk {
    /// Admins and open mode.
    Everywhere,
    /// A `site` token's sites.
    Sites(Arc<BTreeSet<SiteId>>),
}

impl Desk {
    pub fn check(&self, site_id: &SiteId) -> Result<(), ServiceError> {
        match self {
            Desk::Everywhere => Ok(()),
            Desk::Sites(sites) if sites.contains(site_id) => Ok(()),
            Desk::Sites(_) => Err(ServiceError::DeskDenied),
        }
    }
}

pub struct RosterPage {
    pub bookings: Vec<Booking>,
    /// The last reference of this page, when more follow.
    pub next_after: Option<Reference>,
}

impl Engine {
    /// The citizen's own booking with this reference; another citizen's is `NOT_FOUND`.
    /// Counted against the citizen's read quota.
    pub async fn booking_by_reference(
        &self,
        reference: Reference,
        citizen_id: &str,
    ) -> Result<BookingView, ServiceError> {
        let view =
            self.own_booking(citizen_id, |store, _| store.booking_by_reference(reference))?;
        self.store.settled().await?;
        Ok(view)
    }

    /// A page of the slot's roster (every state), in reference order after `after`,
    /// answered once what it read is durable.
    pub async fn slot_roster(
        &self,
        desk: &Desk,
        slot: &SlotKey,
        (after, page_size): (Option<Reference>, usize),
    ) -> Result<RosterPage, ServiceError> {
        desk.check(&slot.site_id)?;
        self.slot(slot)?;
        let mut bookings = self.store.slot_roster(slot, after, page_size + 1)?;
        self.store.settled().await?;
        let next_after = match bookings.len() > page_size {
            true => {
                bookings.truncate(page_size);
                bookings.last().and_then(|b| b.codes).map(|c| c.reference)
            }
            false => None,
        };
        Ok(RosterPage {
            bookings,
            next_after,
        })
    }

    /// Checks the booking in with the code the citizen shows. `check_in_tries_max` wrong
    /// codes in a row lock the reference for `check_in_lock_seconds`.
    pub async fn check_in(
        &self,
        desk: &Desk,
        reference: Reference,
        code: u16,
    ) -> Result<BookingView, ServiceError> {
        let window = self.limits.check_in_window_hours;
        let first = match self.check_in_plan(desk, reference, code) {
            Ok(first) => first,
            // Answered once what it read is durable (a cancel still syncing).
            Err(refused) => return self.once_settled(Err(refused)).await,
        };
        self.desk_commit(first, || {
            let booking = self.desk_booking(desk, reference)?;
            Ok(plans::check_in(booking, code, window, self.now_unix_ms())?)
        })
        .await
    }

    /// The check-in as first planned, counting a wrong code against the reference.
    fn check_in_plan(
        &self,
        desk: &Desk,
        reference: Reference,
        code: u16,
    ) -> Result<DeskChange, ServiceError> {
        let booking = self.desk_booking(desk, reference)?;
        let now_ms = self.now_unix_ms();
        let window = self.limits.check_in_window_hours;
        // A closed window or a cancelled booking answers before the code is looked at:
        // not a try.
        let planned = match plans::check_in(booking, code, window, now_ms) {
            Err(error @ (DomainError::CheckInClosed { .. } | DomainError::BookingNotActive(_))) => {
                return Err(error.into())
            }
            planned => planned,
        };
        let wrong = matches!(planned, Err(DomainError::CheckInCodeWrong));
        let limits = CodeLimits {
            tries_max: self.limits.check_in_tries_max,
            lock: Duration::from_secs(self.limits.check_in_lock_seconds),
            // Long after its window (and slot) ended, a reference's tries are moot.
            forget_after: Duration::from_secs((u64::from(window) * 4 + 48) * 3_600),
        };
        match self.references.try_code(reference, wrong, now_ms, limits) {
            Err(Some(wait)) => return Err(ServiceError::rate_limited(Limiter::CheckIn, wait)),
            Err(None) => {
                metrics::counter!(crate::telemetry::CHECK_IN_CODES_WRONG).increment(1);
                return Err(DomainError::CheckInCodeWrong.into());
            }
            Ok(()) => {}
        }
        Ok(planned?)
    }

    /// Marks the booking a no-show, once its slot has ended.
    pub async fn mark_no_show(
        &self,
        desk: &Desk,
        reference: Reference,
    ) -> Result<BookingView, ServiceError> {
        let replan = || {
            let booking = self.desk_booking(desk, reference)?;
            Ok(plans::mark_no_show(booking, self.now_unix_ms())?)
        };
        match replan() {
            Ok(first) => self.desk_commit(first, replan).await,
            Err(refused) => self.once_settled(Err(refused)).await,
        }
    }

    /// Bookings checked in before their slot ended leave their citizens' limits once it
    /// has (at `now_unix_ms`); how many did. The hold sweeper's tick calls it.
    pub fn release_ended_attendances(&self, now_unix_ms: i64) -> usize {
        self.citizens.release_ended(now_unix_ms.div_euclid(1_000))
    }

    /// The booking with this reference, if it is at one of the desk's sites: another
    /// site's is unknown, as if there were none (a desk learns nothing of other sites).
    fn desk_booking(&self, desk: &Desk, reference: Reference) -> Result<Booking, ServiceError> {
        self.store
            .booking_by_reference(reference)?
            .filter(|booking| desk.check(&booking.slot.site_id).is_ok())
            .ok_or(DomainError::NotFound(Missing::Booking).into())
    }

    /// Writes the desk's change (`first`, made from the booking as first read). A
    /// double tap at the desk, or a citizen's cancel or move of this or another dose
    /// in flight, overtakes that read: the change is made again (`replan`) once that
    /// write let go, so the desk sees the booking as it left it (done already:
    /// answered as it is, once durable).
    async fn desk_commit(
        &self,
        first: DeskChange,
        replan: impl Fn() -> Result<DeskChange, ServiceError>,
    ) -> Result<BookingView, ServiceError> {
        let mut first = Some(first);
        self.replanned(|| {
            let change = match first.take() {
                Some(first) => Ok(first),
                None => replan(),
            };
            async move {
                match change? {
                    DeskChange::AlreadyDone(booking) => {
                        self.store.settled().await?; // the change that landed first
                        self.view(booking)
                    }
                    DeskChange::Write(plan) => self.view(self.execute(plan, || {}).await?),
                }
            }
        })
        .await
    }
}
