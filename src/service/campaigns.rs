//! Campaigns: authorities define them (`UpsertCampaign`) and read their counts
//! (`GetCampaignStats`); citizens pre-register, read, accept, decline and withdraw; the
//! matcher (run by the server every `campaign_step_interval_ms`) offers free places to
//! waiting registrations in rank order, as holds. The rules are in `domain::campaign`
//! and `domain::plans`; this file keeps the campaigns in memory and runs their plans.
//!
//! Offers are holds. The matcher's offer is a hold written with its registration (and
//! its `OFFER_MADE` event) in one batch; accepting, declining, expiring, withdrawing or
//! a closure take the hold out of the live set first (whoever takes it owns the offer)
//! and write the registration's next state with the hold's. The registration settles in
//! memory before the hold goes live; an accepted offer claims its citizen entry until
//! its registration knows the booking (a reschedule of an offer's booking claims the new
//! one likewise), and a cancel or move that reads the booking meanwhile takes the
//! offered registration as booked. A plan's slot view carries the campaign's gate
//! (`OFFER_REQUIRED` outside the last-minute window), before any release's. An offer the
//! sweeper finds in a closed slot (its accept lost to the closure) ends uncounted. A
//! registration stores the decline and withdraw requests it answered (format 2), so
//! their retries after a restart are answered, not done again. Recovery checks each
//! offer is a live hold of its citizen and slot, and each booked registration's booking
//! is active (or deleted by retention).
//!
//! Must not import tonic.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::service::exports::FedStream;

use crate::domain::booking::RequestRecord;
use crate::domain::campaign::{
    pick, Begin, Campaign, Counts, FreeSlot, OfferEnd, Preferences, Registration,
    RegistrationState, Shown,
};
use crate::domain::catalog::{Site, Slot};
use crate::domain::error::{DomainError, Missing};
use crate::domain::hold::{Hold, HoldId, NotConfirmable};
use crate::domain::ids::{
    BookingId, CampaignId, ChannelId, CitizenKey, RegionId, RequestFingerprint, RequestKey,
    SlotKey, WaveId,
};
use crate::domain::plans::{self, SlotView};
use crate::domain::release::Gate;
use crate::domain::retention::Cutoffs;
use crate::service::actor::Actor;
use crate::service::engine::{undo_if_never_written, Attempt, BookingView, Engine, LANDING_POLL};
use crate::service::error::ServiceError;
use crate::service::exports::OnIdle;
use crate::service::state::campaigns::CampaignState;
pub use crate::service::state::campaigns::{CampaignEntry, Campaigns};
use crate::store::records::Write;
use crate::store::StoreError;

/// A campaign's counts, for `GetCampaignStats`.
#[derive(Clone, Debug)]
pub struct CampaignStats {
    pub campaign: Campaign,
    pub counts: Counts,
}

/// A registration as a citizen reads it.
#[derive(Clone, Debug)]
pub struct RegistrationView {
    pub registration: Registration,
    pub shown: Shown,
    pub wave_id: Option<WaveId>,
    /// The offered slot and its site.
    pub offer_slot: Option<(Arc<Site>, Arc<Slot>)>,
    /// When its campaign ends, if set.
    pub campaign_ends_at_unix_ms: Option<i64>,
}

pub struct PreRegisterCommand {
    pub campaign_id: CampaignId,
    pub citizen_id: String,
    pub birth_year: Option<i32>,
    pub groups: Vec<String>,
    pub preferences: Preferences,
    pub request: RequestKey,
}

/// AcceptOffer, DeclineOffer, WithdrawRegistration.
pub struct RegistrationCommand {
    pub campaign_id: CampaignId,
    pub citizen_id: String,
    pub request: RequestKey,
    /// The caller's channel (an accepted offer keeps its hold's own).
    pub channel: ChannelId,
}

impl Engine {
    fn campaign_entry(&self, id: &CampaignId) -> Result<Arc<CampaignEntry>, DomainError> {
        self.campaigns
            .get(id)
            .ok_or(DomainError::NotFound(Missing::Campaign))
    }

    /// Creates a campaign or changes one (its service and region stay; its seed too).
    /// Changed waves re-rank the waiting registrations; offers already made stand.
    pub async fn upsert_campaign(
        &self,
        mut campaign: Campaign,
        actor: &Actor,
    ) -> Result<Campaign, ServiceError> {
        let _authority = self.authority_writes.lock().await;
        actor.check_region(&campaign.region_id)?;
        let existing = self.campaigns.get(&campaign.campaign_id);
        match &existing {
            Some(entry) => {
                if let Some(unchanged) = self.changed_campaign(entry, &mut campaign)? {
                    return Ok(unchanged);
                }
            }
            None => {
                let now = self.now_unix_ms();
                if campaign.has_ended(now) {
                    let ahead = "must be ahead: a campaign cannot be created ended";
                    return Err(DomainError::invalid("campaign.ends_at", ahead).into());
                }
                self.check_campaign_is_alone(&campaign, now)?;
                if self.campaigns.len() >= self.limits.campaigns_max {
                    return Err(DomainError::CampaignsExhausted.into());
                }
                // Registrations an earlier campaign of this id left (deleted by retention
                // as one was written) must not join the new one.
                self.delete_registrations_of(&campaign.campaign_id).await?;
                campaign.seed = rand::random();
                campaign.created_at_unix_ms = now;
            }
        }
        let advice = "fewer waves, or fewer or shorter priority groups";
        self.check_storable(&Write::Campaign(campaign.clone()), "campaign.waves", advice)?;
        let ended =
            (existing.as_ref()).and_then(|entry| self.end_now_if_asked(entry, &mut campaign));
        let audit = self.audit(&actor.name, "UpsertCampaign", campaign_detail(&campaign));
        let written = (self.store)
            .commit(&[Write::Campaign(campaign.clone()), audit])
            .await;
        undo_if_never_written(written, || {
            if let (Some(entry), Some(before)) = (&existing, ended) {
                let _registering = entry.lock();
                entry.ends_at_unix_ms.store(before, Ordering::Release);
            }
        })?;
        self.settle_campaign(existing, &campaign);
        Ok(campaign)
    }

    /// `UpsertCampaign` of the existing campaign `entry`: `Some(current)` when it
    /// changes nothing (answered as it is; so is asking again for an end in effect, a
    /// retried ending), else `campaign` made ready to store (its seed and creation
    /// kept; an end in the past made now: see `end_now_if_asked`).
    fn changed_campaign(
        &self,
        entry: &CampaignEntry,
        campaign: &mut Campaign,
    ) -> Result<Option<Campaign>, ServiceError> {
        let current = entry.campaign();
        if (&current.service_id, &current.region_id) != (&campaign.service_id, &campaign.region_id)
        {
            let fixed = "a campaign's service and region cannot change: create another campaign";
            return Err(DomainError::invalid("campaign.service_id", fixed).into());
        }
        let now = self.now_unix_ms();
        let asked_end = match (campaign.ends_at_unix_ms, current.ends_at_unix_ms) {
            (Some(asked), Some(ended)) if asked <= ended && current.has_ended(now) => Some(ended),
            (asked, _) => asked,
        };
        let unchanged = Campaign {
            seed: current.seed,
            created_at_unix_ms: current.created_at_unix_ms,
            ends_at_unix_ms: asked_end,
            ..campaign.clone()
        };
        if current == unchanged {
            return Ok(Some(current));
        }
        // Ended for good: another campaign may cover its slots since.
        if current.has_ended(now) {
            return Err(DomainError::CampaignEnded.into());
        }
        campaign.seed = current.seed;
        campaign.created_at_unix_ms = current.created_at_unix_ms;
        campaign.ends_at_unix_ms = campaign.ends_at_unix_ms.map(|at| at.max(now));
        Ok(None)
    }

    /// An update of `entry` that ends it now (`ends_at` not ahead), about to be written
    /// (nothing left to refuse it): the end is set in memory first, under the campaign's
    /// lock, where PreRegister reads the end and its own time, so no registration is
    /// made after the end. Returns the end it replaced, for the undo of a write never
    /// made (otherwise the campaign would read ended, gating nothing, until a restart).
    fn end_now_if_asked(&self, entry: &CampaignEntry, campaign: &mut Campaign) -> Option<i64> {
        if campaign
            .ends_at_unix_ms
            .is_none_or(|at| at > self.now_unix_ms())
        {
            return None;
        }
        let _registering = entry.lock();
        let now = self.now_unix_ms();
        campaign.ends_at_unix_ms = Some(now);
        Some(entry.ends_at_unix_ms.swap(now, Ordering::AcqRel))
    }

    /// The write of `campaign` is durable: memory takes it (`existing`: its entry).
    fn settle_campaign(&self, existing: Option<Arc<CampaignEntry>>, campaign: &Campaign) {
        match existing {
            Some(entry) => {
                let mut state = entry.lock();
                state.campaign = campaign.clone();
                let CampaignState {
                    campaign,
                    registrations,
                } = &mut *state;
                registrations.reindex(campaign);
                entry
                    .last_minute_hours
                    .store(campaign.last_minute_hours, Ordering::Relaxed);
                let ends_at = campaign.ends_at_unix_ms.unwrap_or(i64::MAX);
                entry.ends_at_unix_ms.store(ends_at, Ordering::Release);
                entry.dirty.store(true, Ordering::Release);
            }
            None => self
                .campaigns
                .insert(Arc::new(CampaignEntry::new(campaign.clone()))),
        }
    }

    /// One campaign per service and region at a time (ended ones aside): a slot is
    /// booked through one waitlist.
    fn check_campaign_is_alone(&self, campaign: &Campaign, now: i64) -> Result<(), DomainError> {
        let index = self.campaigns.read();
        let other = index
            .by_service
            .get(&campaign.service_id)
            .and_then(|entries| {
                (entries.iter()).find(|e| e.region_id == campaign.region_id && !e.has_ended(now))
            });
        match other {
            Some(other) => Err(DomainError::invalid(
                "campaign.campaign_id",
                format!(
                    "campaign {} already covers this service in this region",
                    other.campaign_id
                ),
            )),
            None => Ok(()),
        }
    }

    /// A campaign's counts, for an authority of its region.
    pub fn campaign_stats(
        &self,
        id: &CampaignId,
        actor: &Actor,
    ) -> Result<CampaignStats, ServiceError> {
        let entry = self.campaign_for(id, actor)?;
        let now = self.now_unix_ms();
        let state = entry.lock();
        Ok(CampaignStats {
            campaign: state.campaign.clone(),
            counts: state.registrations.counts(&state.campaign, now),
        })
    }

    /// The campaign, if `actor` is an authority of its region (or an admin).
    pub fn campaign_for(
        &self,
        id: &CampaignId,
        actor: &Actor,
    ) -> Result<Arc<CampaignEntry>, ServiceError> {
        let entry = self.campaign_entry(id)?;
        actor.check_region(&entry.region_id)?;
        Ok(entry)
    }

    /// Streams a campaign's stored registrations (like `export_bookings`: a blocking
    /// scan that waits for the reader), as they are shown now.
    pub fn export_registrations(
        self: &Arc<Self>,
        entry: Arc<CampaignEntry>,
        on_idle: Option<OnIdle>,
    ) -> FedStream<RegistrationView> {
        let (sender, receiver) = self.export_feed(self.limits.export_channel_depth, on_idle);
        let engine = Arc::clone(self);
        let (campaign, now) = (entry.campaign(), self.now_unix_ms());
        tokio::task::spawn_blocking(move || {
            for item in engine.store.registrations_of(&entry.campaign_id) {
                let item = item
                    .map(|registration| engine.view_at(&campaign, now, registration))
                    .map_err(ServiceError::from);
                if sender.send(item).is_err() {
                    return; // the client went away or stopped reading
                }
            }
        });
        receiver
    }

    fn registration_view(
        &self,
        entry: &CampaignEntry,
        registration: Registration,
    ) -> RegistrationView {
        self.view_at(&entry.campaign(), self.now_unix_ms(), registration)
    }

    /// `registration` as shown at `now` in `campaign`.
    fn view_at(
        &self,
        campaign: &Campaign,
        now: i64,
        registration: Registration,
    ) -> RegistrationView {
        let (shown, wave) = registration.shown(campaign, now);
        let offer_slot = registration.offer().and_then(|offer| {
            let catalog = self.catalog();
            let (site, slot) = catalog.slot(&offer.slot)?;
            Some((Arc::clone(site), Arc::clone(slot)))
        });
        RegistrationView {
            wave_id: wave.map(|index| campaign.waves[index].wave_id.clone()),
            registration,
            shown,
            offer_slot,
            campaign_ends_at_unix_ms: campaign.ends_at_unix_ms,
        }
    }

    /// The citizen pre-registers; registering again returns its registration (a
    /// withdrawn one registers anew, at the end).
    pub async fn pre_register(
        &self,
        command: PreRegisterCommand,
    ) -> Result<RegistrationView, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        let entry = self.campaign_entry(&command.campaign_id)?;
        if entry.has_ended(self.now_unix_ms()) {
            return self.registered_before_the_end(&entry, &citizen);
        }
        self.count_attempt(&citizen)?;
        self.check_preferred_sites(&entry, &command.preferences)?;
        // Registering is idempotent by (campaign, citizen): the request id needs no record.
        let _ = command.request;
        // Bound first: the state's lock ends with this block (a `match` on it would hold
        // it through the arms, and `registration_view` locks it again). The end and the
        // registration's time are read under it, as an ending update sets the end.
        let begin = {
            let mut state = entry.lock();
            let now = self.now_unix_ms();
            (!entry.has_ended(now)).then(|| (state.registrations.begin(citizen), now))
        };
        let Some((begin, registered_at)) = begin else {
            return self.registered_before_the_end(&entry, &citizen);
        };
        let (arrival, replaces) = match begin {
            Begin::New { arrival, replaces } => (arrival, replaces),
            Begin::Existing(registration) => {
                return Ok(self.registration_view(&entry, *registration))
            }
            Begin::Busy => {
                return Err(ServiceError::Busy(
                    "this citizen's registration is being written; retry",
                ))
            }
        };
        // A withdrawn registration's place in memory is reused: only new ones count.
        let counted = replaces.is_none();
        if counted && !self.count_registration() {
            self.campaigns.abandon(&entry, &citizen);
            return Err(DomainError::RegistrationsFull.into());
        }
        let declines_max = entry.campaign().offers_declined_max;
        let registration = self.new_registration(
            command,
            citizen,
            (arrival, replaces),
            (registered_at, declines_max),
        );
        if let Err(error) = self
            .store
            .commit(&[Write::Registration(registration.clone())])
            .await
        {
            if counted {
                self.campaigns.registrations.fetch_sub(1, Ordering::AcqRel);
            }
            self.campaigns.abandon(&entry, &citizen);
            return Err(error.into());
        }
        self.campaigns.settle(registration.clone());
        Ok(self.registration_view(&entry, registration))
    }

    /// The registration `command` makes at `registered_at`, `arrival`-th in line, in place
    /// of the withdrawn one it `replaces`, if any. Registering anew resets nothing: a
    /// citizen cannot launder its declines (one that has used up `declines_max` is
    /// exhausted at once), and a retried WithdrawRegistration must not withdraw the new
    /// one (the answered requests are kept).
    fn new_registration(
        &self,
        command: PreRegisterCommand,
        citizen: CitizenKey,
        (arrival, replaces): (u64, Option<Box<Registration>>),
        (registered_at, declines_max): (i64, u32),
    ) -> Registration {
        let declines = replaces.as_ref().map_or(0, |withdrawn| withdrawn.declines);
        let state = match declines >= declines_max {
            true => RegistrationState::Exhausted,
            false => RegistrationState::Active,
        };
        Registration {
            registration_id: self.ids.mint(citizen),
            campaign_id: command.campaign_id,
            citizen,
            birth_year: command.birth_year,
            groups: command.groups,
            preferences: command.preferences,
            registered_at_unix_ms: registered_at,
            arrival,
            declines,
            state,
            requests: replaces
                .map(|withdrawn| withdrawn.requests)
                .unwrap_or_default(),
        }
    }

    /// PreRegister to an ended campaign: a retry is answered with the registration (a
    /// read, counted as one); nobody registers anew.
    fn registered_before_the_end(
        &self,
        entry: &CampaignEntry,
        citizen: &CitizenKey,
    ) -> Result<RegistrationView, ServiceError> {
        self.count_read(citizen)?;
        match entry.registration(citizen) {
            Ok(registration)
                if !matches!(registration.state, RegistrationState::Withdrawn { .. }) =>
            {
                Ok(self.registration_view(entry, registration))
            }
            _ => Err(DomainError::CampaignEnded.into()),
        }
    }

    /// One more registration in all the campaigns, if `registrations_max` allows it.
    fn count_registration(&self) -> bool {
        let counted = self.campaigns.registrations.fetch_add(1, Ordering::AcqRel);
        if counted >= self.limits.registrations_max {
            self.campaigns.registrations.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Preferred sites must be sites of the campaign's region.
    fn check_preferred_sites(
        &self,
        entry: &CampaignEntry,
        preferences: &Preferences,
    ) -> Result<(), DomainError> {
        for (index, site_id) in preferences.site_ids.iter().enumerate() {
            let in_region = self
                .site(site_id)
                .is_some_and(|site| site.region_id == entry.region_id);
            if !in_region {
                return Err(DomainError::invalid(
                    format!("preferences.site_ids[{index}]"),
                    "must be a site of the campaign's region",
                ));
            }
        }
        Ok(())
    }

    /// The citizen's registration. Counted against the citizen's read quota.
    pub fn registration_of(
        &self,
        campaign_id: &CampaignId,
        citizen_id: &str,
    ) -> Result<RegistrationView, ServiceError> {
        let citizen = self.hasher.hash(citizen_id);
        let entry = self.campaign_entry(campaign_id)?;
        self.count_read(&citizen)?;
        let registration = entry.registration(&citizen)?;
        Ok(self.registration_view(&entry, registration))
    }

    /// The citizen accepts its offer: the offer's hold becomes its booking.
    pub async fn accept_offer(
        &self,
        command: RegistrationCommand,
        named: Option<HoldId>,
    ) -> Result<BookingView, ServiceError> {
        let citizen = self.hasher.hash(&command.citizen_id);
        let entry = self.campaign_entry(&command.campaign_id)?;
        let named_bytes = named.map(|id| id.0.to_be_bytes());
        let mut parts: Vec<&[u8]> = vec![
            b"accept-offer",
            command.campaign_id.as_str().as_bytes(),
            &citizen.0,
        ];
        // Unnamed, as before hold_id existed: a retry across the upgrade still matches.
        parts.extend(named_bytes.as_ref().map(|bytes| bytes.as_slice()));
        let fingerprint = RequestFingerprint::of(&parts);
        let command = &command;
        self.once_per_booking_request(
            (command.request.for_citizen(&citizen), fingerprint),
            Attempt::Of(&citizen),
            |request| async move {
                let registration = entry.registration(&citizen)?;
                let current = registration.offer();
                if named.is_some_and(|named| current.map(|o| o.hold_id) != Some(named)) {
                    // The offer the citizen saw ended: another is not what it accepted.
                    return Err(DomainError::HoldExpired.into());
                }
                let offer = current.ok_or(DomainError::NoOffer)?;
                let asking = (citizen, &command.channel);
                self.confirm_hold(&offer.slot, asking, offer.hold_id, request)
                    .await
            },
        )
        .await
    }

    /// The citizen declines its offer (`offer`, when named: only that one): the place
    /// goes to the next registration, and this one waits again at the end of its wave
    /// (or is exhausted).
    pub async fn decline_offer(
        &self,
        command: RegistrationCommand,
        offer: Option<HoldId>,
    ) -> Result<RegistrationView, ServiceError> {
        let what = b"decline-offer";
        self.answer_registration(&command, what, |entry, citizen, request| async move {
            let registration = entry.registration(&citizen)?;
            let current = registration.offer().map(|offer| offer.hold_id);
            if offer.is_some_and(|named| current != Some(named)) {
                return Err(DomainError::NoOffer.into());
            }
            let registration = self.answering(registration, request);
            self.end_offer(&registration, entry.counted_end()).await
        })
        .await
    }

    /// The citizen withdraws: an offer it has goes to the next registration. A booked
    /// registration is withdrawn by cancelling its booking.
    pub async fn withdraw_registration(
        &self,
        command: RegistrationCommand,
    ) -> Result<RegistrationView, ServiceError> {
        let what = b"withdraw-registration";
        self.answer_registration(&command, what, |entry, citizen, request| async move {
            self.withdraw(&entry, &citizen, request).await
        })
        .await
    }

    /// Withdraws the registration as it is. One whose offer is ending right now (a
    /// decline, an accept or the sweeper took its hold first), or that the matcher is
    /// offering a place, is withdrawn as that leaves it, once it has (waited for until
    /// `landing_deadline`).
    async fn withdraw(
        &self,
        entry: &CampaignEntry,
        citizen: &CitizenKey,
        request: RequestRecord,
    ) -> Result<Registration, ServiceError> {
        let deadline = self.landing_deadline();
        loop {
            let registration = entry.registration(citizen)?;
            let ended = match registration.state {
                RegistrationState::Active => self.withdraw_active(entry, citizen, request).await,
                RegistrationState::Offered(_) => {
                    let end = OfferEnd::Withdrawn {
                        at_unix_ms: self.now_unix_ms(),
                    };
                    let registration = self.answering(registration, request);
                    self.end_offer(&registration, end).await
                }
                RegistrationState::Booked { .. } => {
                    return Err(DomainError::RegistrationBooked.into())
                }
                RegistrationState::Exhausted | RegistrationState::Withdrawn { .. } => {
                    return Ok(registration)
                }
            };
            // The offer is ending (or the matcher holds the registration a moment).
            let ending = matches!(
                ended,
                Err(ServiceError::Domain(
                    DomainError::NoOffer | DomainError::HoldExpired
                )) | Err(ServiceError::Busy(_))
            );
            if !ending || tokio::time::Instant::now() >= deadline {
                return ended;
            }
            tokio::time::sleep(LANDING_POLL).await;
        }
    }

    /// `registration`, to be written for `request` now (see [`Registration::answering`]).
    fn answering(&self, registration: Registration, request: RequestRecord) -> Registration {
        let cutoffs = self.retention_cutoffs();
        let keeps = |at| cutoffs.keeps_request(at);
        let kept_max = self.limits.registration_requests_max;
        registration.answering(request, self.now_unix_ms(), (keeps, kept_max))
    }

    /// The steps DeclineOffer and WithdrawRegistration share: `work` runs once per
    /// request id (a retry answers the registration as it is now, also after a restart:
    /// the request is stored with the registration it changes), and the answer is the
    /// registration as it then is.
    async fn answer_registration<Work, Done>(
        &self,
        command: &RegistrationCommand,
        what: &[u8],
        work: Work,
    ) -> Result<RegistrationView, ServiceError>
    where
        Work: FnOnce(Arc<CampaignEntry>, CitizenKey, RequestRecord) -> Done,
        Done: std::future::Future<Output = Result<Registration, ServiceError>>,
    {
        let (entry, citizen, request, fingerprint) = self.registration_request(command, what)?;
        let registration = self
            .once_per_request(
                (request, fingerprint),
                Attempt::Of(&citizen),
                |request| work(Arc::clone(&entry), citizen, request),
                |registration: &Registration| registration.registration_id,
                |_| Ok(entry.registration(&citizen)?),
            )
            .await?;
        Ok(self.registration_view(&entry, registration))
    }

    /// What DeclineOffer and WithdrawRegistration start from: the campaign, the citizen,
    /// and the request's key and fingerprint.
    fn registration_request(
        &self,
        command: &RegistrationCommand,
        what: &[u8],
    ) -> Result<
        (
            Arc<CampaignEntry>,
            CitizenKey,
            RequestKey,
            RequestFingerprint,
        ),
        ServiceError,
    > {
        let citizen = self.hasher.hash(&command.citizen_id);
        let entry = self.campaign_entry(&command.campaign_id)?;
        let fingerprint =
            RequestFingerprint::of(&[what, command.campaign_id.as_str().as_bytes(), &citizen.0]);
        Ok((
            entry,
            citizen,
            command.request.for_citizen(&citizen),
            fingerprint,
        ))
    }

    /// Ends an offer before its time: declined (`declined_max` counts it) or withdrawn.
    async fn end_offer(
        &self,
        registration: &Registration,
        end: OfferEnd,
    ) -> Result<Registration, ServiceError> {
        let offer = registration.offer().ok_or(DomainError::NoOffer)?;
        let now = self.now_unix_ms();
        let taken = self.live_holds().take_for_confirm(
            offer.hold_id,
            registration.citizen,
            &offer.slot,
            now,
        );
        let hold = match taken {
            Ok(hold) => hold,
            // Its time is up: the sweeper ends it (as an expiry) in a moment.
            Err(NotConfirmable::Expired) => return Err(DomainError::HoldExpired.into()),
            // Being accepted or ended right now.
            Err(NotConfirmable::Unknown) => return Err(DomainError::NoOffer.into()),
        };
        let plan = plans::end_offer(&hold, registration, end, now);
        self.execute(plan, || self.live_holds().insert(hold.clone()))
            .await
    }

    async fn withdraw_active(
        &self,
        entry: &CampaignEntry,
        citizen: &CitizenKey,
        request: RequestRecord,
    ) -> Result<Registration, ServiceError> {
        let claimed = {
            let mut state = entry.lock();
            let CampaignState {
                campaign,
                registrations,
            } = &mut *state;
            registrations.claim(campaign, citizen)
        };
        let registration = claimed.ok_or(ServiceError::Busy(
            "this citizen's registration is being written; retry",
        ))?;
        let registration = self.answering(registration, request);
        let plan = plans::withdraw(&registration, self.now_unix_ms());
        self.execute(plan, || self.campaigns.abandon(entry, citizen))
            .await
    }

    /// Whether a booking or hold of the slot `key` (at a site of `region`) needs an
    /// offer now: the gate it must pass.
    pub(super) fn campaign_gate(&self, region: &RegionId, key: &SlotKey, now: i64) -> Gate {
        match self.campaigns.requires_offer(region, key, now) {
            true => Gate::OfferRequired,
            false => Gate::Open,
        }
    }

    /// One matching step at `now` for every campaign with something to look at: each
    /// waiting registration of an open wave, in rank order, is offered the earliest
    /// free slot that fits. A campaign whose step fails is logged and the others go on.
    /// Returns how many offers were made.
    pub async fn match_campaigns(&self, now: i64) -> Result<usize, ServiceError> {
        let _one_step = self.campaigns.step.lock().await;
        let returned = self.campaigns.places_returned.load(Ordering::Acquire);
        let mut made = 0;
        for entry in self.campaigns.all() {
            if entry.has_ended(now) || !entry.due(now, returned) {
                continue;
            }
            match self.match_campaign(&entry, now).await {
                Ok(count) => made += count,
                Err(ServiceError::Store(StoreError::Failed)) => {
                    return Err(StoreError::Failed.into())
                }
                Err(error) => {
                    tracing::warn!(campaign = %entry.campaign_id, %error, "matching step failed")
                }
            }
        }
        Ok(made)
    }

    async fn match_campaign(&self, entry: &CampaignEntry, now: i64) -> Result<usize, ServiceError> {
        let campaign = entry.campaign();
        let mut free = self.campaign_free_slots(&campaign, now);
        if free.is_empty() {
            return Ok(0);
        }
        let picked: Vec<(Registration, SlotKey)> = {
            let mut state = entry.lock();
            let CampaignState {
                campaign,
                registrations,
            } = &mut *state;
            let max = self.limits.campaign_offers_per_step_max;
            let max_active = self.limits.max_active_per_citizen as usize;
            let service = &campaign.service_id;
            // Bounded work under the lock; a citizen who holds a booking or hold of the
            // service already (a last-minute booking) waits without taking a place.
            let now_s = now.div_euclid(1_000);
            let waiting = registrations
                .waiting(campaign, now)
                .take(self.limits.campaign_scan_per_step_max)
                .filter(|r| self.citizens.active_count(r.citizen, service, now_s) < max_active);
            let chosen: Vec<(CitizenKey, usize)> = pick(waiting, &mut free, max)
                .into_iter()
                .map(|(registration, index)| (registration.citizen, index))
                .collect();
            chosen
                .into_iter()
                .filter_map(|(citizen, index)| {
                    let claimed = registrations.claim(campaign, &citizen)?;
                    Some((claimed, free[index].key.clone()))
                })
                .collect()
        };
        let mut offers = Vec::with_capacity(picked.len());
        for (registration, key) in picked {
            match self.offer_plan(&campaign, &registration, &key, now) {
                Ok(plan) => offers.push(plan),
                Err(_) => self.campaigns.abandon(entry, &registration.citizen),
            }
        }
        let full_step = offers.len() >= self.limits.campaign_offers_per_step_max;
        // Ended while this step picked (its end came, or an authority set it): no offer.
        if entry.has_ended(self.now_unix_ms()) {
            for plan in &offers {
                self.campaigns.abandon(entry, &plan.answer.citizen);
            }
            return Ok(0);
        }
        let made = self
            .execute_each(offers, |hold: &Hold| {
                self.campaigns.abandon(entry, &hold.citizen)
            })
            .await?;
        if full_step {
            // More may be waiting for the places left: the next step goes on.
            entry.dirty.store(true, Ordering::Release);
        }
        if made > 0 {
            self.campaigns.offers_made(made);
        }
        Ok(made)
    }

    fn offer_plan(
        &self,
        campaign: &Campaign,
        registration: &Registration,
        key: &SlotKey,
        now: i64,
    ) -> Result<plans::Plan<Hold>, ServiceError> {
        let slot = self.slot(key)?;
        let view = SlotView {
            key: key.clone(),
            end_unix_s: slot.end_unix_s(),
            capacity: slot.counter.snapshot().capacity,
            // The offer is the admission.
            gate: Gate::Open,
            channel: ChannelId::web(),
        };
        let id = self.fresh_hold_id(registration.citizen, now)?;
        // An offer answers no client request: its record names the hold itself.
        let bytes = id.0.to_be_bytes();
        let request = RequestRecord {
            key: RequestKey(bytes),
            fingerprint: RequestFingerprint(bytes),
        };
        Ok(plans::offer(
            &view,
            (campaign, registration),
            id,
            request,
            now,
        )?)
    }

    /// The campaign's slots with places free to the default channel that an offer made
    /// now could be accepted for (starting after a whole offer's time, released, not
    /// a queued release's in the last-minute window: `offerable`),
    /// earliest first, with their local start. Reads the days with free places, not
    /// every slot of the region.
    fn campaign_free_slots(&self, campaign: &Campaign, now: i64) -> Vec<FreeSlot> {
        let catalog = self.catalog();
        let web = ChannelId::web();
        let ttl_ms = i64::from(campaign.offer_ttl_seconds) * 1_000;
        let from_s = (now + ttl_ms).div_euclid(1_000) + 1;
        let mut free = Vec::new();
        for site in catalog.sites_in(Some(&campaign.region_id)) {
            let slots = catalog.slots_with_places(&site.site_id, &campaign.service_id, from_s);
            for slot in slots {
                let places = self.remaining_for(&site, &slot, Some(&web));
                let last_minute = campaign.is_last_minute(slot.key().start_unix_s, now);
                if places == 0 || !self.offerable(&site, &slot.key(), last_minute, now) {
                    continue;
                }
                let Some(local) = chrono::DateTime::from_timestamp(slot.key().start_unix_s, 0)
                else {
                    continue;
                };
                free.push(FreeSlot {
                    local: local.with_timezone(&site.time_zone).naive_local(),
                    key: slot.key(),
                    free: places,
                });
            }
        }
        free.sort_by(|a, b| {
            (a.key.start_unix_s, &a.key.site_id).cmp(&(b.key.start_unix_s, &b.key.site_id))
        });
        free
    }

    /// Recovery: every campaign and its registrations, and the requests they answered
    /// (handed to `restore_request`). An offer must be a live hold of its citizen and
    /// slot, held by no other registration; a booking must be its citizen's active
    /// booking.
    pub(super) fn restore_campaigns(
        &self,
        restore_request: impl Fn(RequestRecord, BookingId, i64),
    ) -> Result<(), ServiceError> {
        for campaign in self.store.campaigns() {
            self.campaigns
                .insert(Arc::new(CampaignEntry::new(campaign?)));
        }
        let mut count = 0;
        for registration in self.store.registrations() {
            let registration = registration?;
            let Some(entry) = self.campaigns.get(&registration.campaign_id) else {
                self.orphaned_at_start(&registration.campaign_id);
                continue;
            };
            self.check_registration(&entry, &registration)?;
            for (request, at_unix_ms) in &registration.requests {
                restore_request(*request, registration.registration_id, *at_unix_ms);
            }
            self.campaigns.settle(registration);
            count += 1;
        }
        self.campaigns.registrations.store(count, Ordering::Release);
        Ok(())
    }

    /// Registrations of campaign `id`, which has no record, found at start-up: left by
    /// retention deleting it (a pass cut short, or a write as it went), not loaded; the
    /// next pass deletes them. With retention off no campaign is deleted: the store
    /// lost the record, and they are kept for a person to look at.
    fn orphaned_at_start(&self, id: &CampaignId) {
        if self.limits.records_retained_days == 0 {
            tracing::warn!(campaign = %id, "registrations of a campaign the store does not have (kept, not loaded)");
        } else if self.campaigns.orphan(id) {
            tracing::warn!(campaign = %id, "registrations of a deleted campaign: retention deletes them");
        }
    }

    /// Retention: each campaign that ended before the records' cut-off, holds no live
    /// offer (those stand until they expire) and answered no request retention must
    /// still answer (a retried WithdrawRegistration finds its answer), with its
    /// registrations; and the registrations of campaigns already gone. Returns
    /// (campaigns, registrations) deleted.
    pub(super) async fn delete_campaigns(
        &self,
        cutoffs: &Cutoffs,
    ) -> Result<(u64, u64), ServiceError> {
        let (mut campaigns, mut registrations) = (0, 0);
        for entry in self.campaigns.all() {
            if self.forget_campaign(&entry, cutoffs).await? {
                tracing::info!(campaign = %entry.campaign_id, "retention deleted an ended campaign");
                campaigns += 1;
            }
        }
        while let Some(id) = self.campaigns.next_orphaned() {
            registrations += self.delete_leftovers(&id).await?;
        }
        Ok((campaigns, registrations))
    }

    /// Whether retention may delete `entry` now (see `delete_campaigns`).
    fn is_done_with(&self, entry: &Arc<CampaignEntry>, cutoffs: &Cutoffs) -> bool {
        !cutoffs.keeps_campaign(entry.campaign().ends_at_unix_ms)
            && !self.campaigns.has_offers(entry)
            && !entry.answers_kept(cutoffs)
    }

    /// Deletes campaign `entry`'s record and forgets it in memory (no gate, no
    /// matching, no registration found from then on), under the authority lock, if
    /// retention is done with it (checked under the lock); its registrations are left
    /// to `delete_leftovers`. The record goes first: a pass cut short after it (a full
    /// write queue, a kill) leaves registrations of no campaign, which a start accepts
    /// and the next pass deletes, whatever was written to them meanwhile (a cancel of a
    /// booking one of them holds no longer updates it).
    async fn forget_campaign(
        &self,
        entry: &Arc<CampaignEntry>,
        cutoffs: &Cutoffs,
    ) -> Result<bool, ServiceError> {
        let _authority = self.authority_writes.lock().await;
        if !self.is_done_with(entry, cutoffs) {
            return Ok(false);
        }
        let id = &entry.campaign_id;
        let key = crate::store::records::campaign_key(id);
        self.store.commit(&[Write::Delete(key)]).await?;
        self.campaigns.remove(id);
        self.campaigns.orphan(id);
        Ok(true)
    }

    /// Deletes the registrations of campaign `id`, whose record is gone:
    /// `retention_batch_records` per commit, each under the authority lock (taken per
    /// batch: other authority writes go on between). Stops if a campaign of that id is
    /// made meanwhile: making it deleted what was left. Cut short by a failed commit,
    /// `id` is left for the next pass.
    async fn delete_leftovers(&self, id: &CampaignId) -> Result<u64, ServiceError> {
        let mut deleted = 0;
        loop {
            let _authority = self.authority_writes.lock().await;
            if self.campaigns.get(id).is_some() {
                return Ok(deleted);
            }
            let batch = match self.registration_batch(id) {
                Ok(batch) if batch.is_empty() => return Ok(deleted),
                Ok(batch) => batch,
                Err(error) => return Err(self.left_for_next_pass(id, error)),
            };
            if let Err(error) = self.store.commit(&batch).await {
                return Err(self.left_for_next_pass(id, error.into()));
            }
            deleted += batch.len() as u64;
        }
    }

    /// `delete_leftovers` of `id` failed with `error`: the next pass goes on.
    fn left_for_next_pass(&self, id: &CampaignId, error: ServiceError) -> ServiceError {
        self.campaigns.orphan(id);
        error
    }

    /// Deletes every stored registration of campaign `id`, `retention_batch_records`
    /// per commit. The caller holds the authority lock.
    async fn delete_registrations_of(&self, id: &CampaignId) -> Result<u64, ServiceError> {
        let mut deleted = 0;
        loop {
            let batch = self.registration_batch(id)?;
            if batch.is_empty() {
                return Ok(deleted);
            }
            deleted += batch.len() as u64;
            self.store.commit(&batch).await?;
        }
    }

    /// The deletions of the next `retention_batch_records` stored registrations of
    /// campaign `id`.
    fn registration_batch(&self, id: &CampaignId) -> Result<Vec<Write>, ServiceError> {
        use crate::store::records::{registration_key, REGISTRATION_PREFIX};
        let from = registration_key(id, &CitizenKey([0; 16]));
        let limit = self.limits.retention_batch_records;
        let batch: Vec<(Vec<u8>, Registration)> =
            self.store.records_from(REGISTRATION_PREFIX, &from, limit)?;
        Ok(batch
            .into_iter()
            .take_while(|(_, registration)| registration.campaign_id == *id)
            .map(|(key, _)| Write::Delete(key))
            .collect())
    }

    fn check_registration(
        &self,
        entry: &CampaignEntry,
        registration: &Registration,
    ) -> Result<(), ServiceError> {
        let id = registration.registration_id;
        let fail = |what: &str| Err(ServiceError::Recovery(format!("registration {id}: {what}")));
        match &registration.state {
            RegistrationState::Offered(offer) => {
                let live = self
                    .live_holds()
                    .get(offer.hold_id)
                    .map(|hold| hold.citizen == registration.citizen && hold.slot == offer.slot);
                if live != Some(true) {
                    return fail("its offer is not a live hold of its citizen and slot");
                }
                if self.campaigns.holders().offers.contains_key(&offer.hold_id) {
                    return fail("its offer's hold is offered to another registration too");
                }
            }
            RegistrationState::Booked { booking_id } => {
                let active =
                    self.citizens
                        .is_active(registration.citizen, &entry.service_id, *booking_id);
                // Retention deletes the bookings of long-ended slots: none is left. The
                // desk settles one (attended, no-show): it no longer counts as active.
                let gone_or_settled = || {
                    let tag = self.ids.tag_of(*booking_id);
                    self.store.booking(tag, *booking_id).map(|stored| {
                        stored.is_none_or(|b| {
                            b.citizen == registration.citizen
                                && b.holds_place()
                                && !b.is_confirmed()
                        })
                    })
                };
                if !active && !gone_or_settled()? {
                    return fail("its booking is not an active booking of its citizen");
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn campaign_detail(campaign: &Campaign) -> String {
    let waves: Vec<String> = campaign
        .waves
        .iter()
        .map(|wave| format!("{} at {} ms", wave.wave_id, wave.opens_at_unix_ms))
        .collect();
    let ends = match campaign.ends_at_unix_ms {
        Some(at) => format!(
            "; ends {}",
            crate::domain::text::utc_text(at.div_euclid(1_000))
        ),
        None => String::new(),
    };
    format!(
        "campaign {} of {} in region {}: offers of {} s, {} declines, last minute {} h; waves {}{ends}",
        campaign.campaign_id,
        campaign.service_id,
        campaign.region_id,
        campaign.offer_ttl_seconds,
        campaign.offers_declined_max,
        campaign.last_minute_hours,
        waves.join(", ")
    )
}
