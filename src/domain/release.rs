//! Fair release: an announced opening (`release_at`) of a service's slots at some sites,
//! and, when it is queued, its waiting room: everyone who joined before the opening is
//! ranked by a seeded random draw, later joiners after them in arrival order, and
//! tickets are admitted in rank order, never more admitted-and-unused than places
//! remain. Channel reserves hold back a share of each slot's places per channel until
//! `reserve_released_hours_before_start`; [`ChannelUse`] counts the places of every channel
//! but the default per slot, and recovery recounts it from the stored bookings and holds.
//!
//! Pure and synchronous: the engine keeps one [`Queue`] per queued release behind a
//! mutex, passes `now` in and writes the [`Ticket`]s this module hands it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::error::DomainError;
use crate::domain::ids::{ChannelId, CitizenKey, RegionId, ReleaseId, ServiceId, SiteId, SlotKey};

/// The sites a release covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseScope {
    /// Every site of the region, including sites added later.
    Region(RegionId),
    /// These sites (sorted, no duplicates).
    Sites(Vec<SiteId>),
}

/// The waiting room of a queued release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueRules {
    pub opens_at_unix_ms: i64,
    /// Admissions per minute from `release_at`; 0: as fast as places allow.
    pub admissions_per_minute: u32,
    /// How long an admitted citizen may book.
    pub admission_ttl_seconds: u32,
    /// Seeds the draw; never shown to anyone.
    pub seed: [u8; 32],
}

/// A share of each slot's places held back for one channel (phone, desk) until the
/// release's `reserve_released_hours_before_start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reserve {
    pub channel: ChannelId,
    /// Of each slot's capacity, rounded down.
    pub percent: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub release_id: ReleaseId,
    pub scope: ReleaseScope,
    pub service_id: ServiceId,
    /// Slots starting in `[from, to)` (seconds since the epoch).
    pub from_unix_s: i64,
    pub to_unix_s: i64,
    pub release_at_unix_ms: i64,
    pub queue: Option<QueueRules>,
    pub created_at_unix_ms: i64,
    /// Since when a queued release has no place left (none free, held or being
    /// written): its waiting tickets read `SOLD_OUT`. Cleared if places come back (a
    /// cancel): they go to the next tickets in rank order.
    pub sold_out_at_unix_ms: Option<i64>,
    /// Channel reserves (sorted by channel, percents summing to at most 100).
    pub reserves: Vec<Reserve>,
    /// A slot's reserves join its common places this long before it starts.
    pub reserve_released_hours_before_start: u32,
}

impl Release {
    /// `to` in milliseconds: every slot the release can hold starts before it.
    pub fn to_unix_ms(&self) -> i64 {
        self.to_unix_s.saturating_mul(1_000)
    }

    /// Whether `to` has passed: no one joins its queue (RELEASE_ENDED), and its
    /// tickets no longer count against `queue_tickets_max`.
    pub fn has_ended(&self, now_unix_ms: i64) -> bool {
        now_unix_ms >= self.to_unix_ms()
    }

    /// The places of a slot of `capacity` starting at `start_unix_s` each reserve
    /// holds back at `now` (in `reserves` order); `None` when none does (no reserves,
    /// or released).
    pub fn reserved_places(
        &self,
        capacity: u32,
        start_unix_s: i64,
        now_unix_ms: i64,
    ) -> Option<Vec<u32>> {
        let released_at_s =
            start_unix_s - i64::from(self.reserve_released_hours_before_start) * 3_600;
        if self.reserves.is_empty() || now_unix_ms >= released_at_s.saturating_mul(1_000) {
            return None;
        }
        let share = |percent: u32| (u64::from(capacity) * u64::from(percent) / 100) as u32;
        Some(self.reserves.iter().map(|r| share(r.percent)).collect())
    }

    /// The index of `channel`'s reserve, if it has one.
    pub fn reserve_of(&self, channel: &ChannelId) -> Option<usize> {
        self.reserves.iter().position(|r| r.channel == *channel)
    }
    /// Whether the slot `key` of a site in `region` is one of this release's.
    pub fn covers(&self, region: &RegionId, key: &SlotKey) -> bool {
        key.service_id == self.service_id
            && (self.from_unix_s..self.to_unix_s).contains(&key.start_unix_s)
            && match &self.scope {
                ReleaseScope::Region(id) => id == region,
                ReleaseScope::Sites(sites) => sites.binary_search(&key.site_id).is_ok(),
            }
    }

    /// Whether a slot could be in both releases (`region_of` names a site's region).
    pub fn overlaps(
        &self,
        other: &Release,
        region_of: impl Fn(&SiteId) -> Option<RegionId>,
    ) -> bool {
        let times = self.from_unix_s < other.to_unix_s && other.from_unix_s < self.to_unix_s;
        let sites = match (&self.scope, &other.scope) {
            (ReleaseScope::Region(a), ReleaseScope::Region(b)) => a == b,
            (ReleaseScope::Sites(a), ReleaseScope::Sites(b)) => {
                a.iter().any(|site| b.binary_search(site).is_ok())
            }
            (ReleaseScope::Region(region), ReleaseScope::Sites(sites))
            | (ReleaseScope::Sites(sites), ReleaseScope::Region(region)) => sites
                .iter()
                .any(|site| region_of(site).as_ref() == Some(region)),
        };
        self.service_id == other.service_id && times && sites
    }

    /// Whether `other` asks for the same release (a retry of `CreateRelease`): all but
    /// the seed and the times it was made and sold out.
    pub fn same_definition(&self, other: &Release) -> bool {
        let rules = |release: &Release| {
            release.queue.as_ref().map(|q| {
                (
                    q.opens_at_unix_ms,
                    q.admissions_per_minute,
                    q.admission_ttl_seconds,
                )
            })
        };
        self.release_id == other.release_id
            && self.scope == other.scope
            && self.reserves == other.reserves
            && self.reserve_released_hours_before_start == other.reserve_released_hours_before_start
            && self.service_id == other.service_id
            && (self.from_unix_s, self.to_unix_s, self.release_at_unix_ms)
                == (other.from_unix_s, other.to_unix_s, other.release_at_unix_ms)
            && rules(self) == rules(other)
    }

    pub fn phase(&self, now_unix_ms: i64) -> Phase {
        match &self.queue {
            _ if self.sold_out_at_unix_ms.is_some() => Phase::SoldOut,
            _ if now_unix_ms >= self.release_at_unix_ms => Phase::Open,
            Some(queue) if now_unix_ms >= queue.opens_at_unix_ms => Phase::QueueOpen,
            _ => Phase::Announced,
        }
    }
}

/// The places of a slot out of `channel`'s reach: what the reserves of the other
/// channels hold back (`reserved`, in reserve order) and their own bookings and holds
/// (`used`) have not taken yet.
pub fn held_back(release: &Release, reserved: &[u32], used: &[u32], channel: &ChannelId) -> u32 {
    release
        .reserves
        .iter()
        .zip(reserved.iter().zip(used))
        .filter(|(reserve, _)| reserve.channel != *channel)
        .map(|(_, (reserved, used))| reserved.saturating_sub(*used))
        .sum()
}

/// The unused places of `channel`'s own reserve in a slot (0 if it has none), given
/// what each reserve holds back (`reserved`) and has used (`used`), in reserve order.
pub fn own_unused(release: &Release, reserved: &[u32], used: &[u32], channel: &ChannelId) -> u32 {
    release
        .reserve_of(channel)
        .map_or(0, |index| reserved[index].saturating_sub(used[index]))
}

/// The active bookings and live holds of every channel but the default one, per slot:
/// what channel reserves count against. Kept for every slot, whatever release covers
/// it (now or later); rebuilt by recovery from the stored bookings and holds.
#[derive(Debug, Default)]
pub struct ChannelUse {
    by_slot: HashMap<SlotKey, Vec<(ChannelId, u32)>>,
}

impl ChannelUse {
    /// One more place of `channel` in `slot` (the default channel is not counted).
    pub fn add(&mut self, slot: &SlotKey, channel: &ChannelId) {
        if channel.is_default() {
            return;
        }
        let counts = self.by_slot.entry(slot.clone()).or_default();
        add_places(counts, channel, 1);
    }

    /// Adds `other`'s places (recovery's threads count apart).
    pub fn merge(&mut self, other: ChannelUse) {
        for (slot, counts) in other.by_slot {
            let mine = self.by_slot.entry(slot).or_default();
            for (channel, places) in counts {
                add_places(mine, &channel, places);
            }
        }
    }

    /// One place fewer (a slot with none left is forgotten).
    pub fn remove(&mut self, slot: &SlotKey, channel: &ChannelId) {
        let Some(counts) = self.by_slot.get_mut(slot) else {
            return;
        };
        if let Some((_, count)) = counts.iter_mut().find(|(c, _)| c == channel) {
            *count = count.saturating_sub(1);
        }
        counts.retain(|(_, count)| *count > 0);
        if counts.is_empty() {
            self.by_slot.remove(slot);
        }
    }

    /// The places each reserve's channel holds in `slot`, in `reserves` order.
    pub fn used(&self, slot: &SlotKey, reserves: &[Reserve]) -> Vec<u32> {
        let counts = self.by_slot.get(slot);
        reserves
            .iter()
            .map(|reserve| {
                counts
                    .and_then(|counts| counts.iter().find(|(c, _)| *c == reserve.channel))
                    .map_or(0, |(_, count)| *count)
            })
            .collect()
    }
}

/// `places` more of `channel` in one slot's counts.
fn add_places(counts: &mut Vec<(ChannelId, u32)>, channel: &ChannelId, places: u32) {
    match counts.iter_mut().find(|(c, _)| c == channel) {
        Some((_, count)) => *count += places,
        None => counts.push((channel.clone(), places)),
    }
}

/// Where a release stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before `release_at` (and before `queue_opens_at`, if queued).
    Announced,
    /// Queued: citizens may join; the draw is at `release_at`.
    QueueOpen,
    /// From `release_at`: to admitted citizens if queued, to anyone if not.
    Open,
    /// Queued and out of places (admitted citizens only, as before).
    SoldOut,
}

/// An admission: the ticket's holder may book until `until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub at_unix_ms: i64,
    pub until_unix_ms: i64,
}

/// A citizen's place in a release's waiting room, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub release_id: ReleaseId,
    pub citizen: CitizenKey,
    pub joined_at_unix_ms: i64,
    /// Joined before the draw: ranked by it. Otherwise ranked by `arrival`.
    pub drawn: bool,
    /// The order of joining within the release, from 0.
    pub arrival: u64,
    pub admitted: Option<Admitted>,
    /// Its holder booked or held a place with it.
    pub used: bool,
}

/// What a booking or hold on a slot must pass, for one citizen, now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// In no release, or released to anyone.
    Open,
    /// Nobody before `release_at`.
    NotYet { release_at_unix_ms: i64 },
    /// Queued: admitted citizens only (the citizen's ticket, if it has one), and the
    /// channels the release reserves places for, within their own reserve.
    Queue {
        ticket: Option<Ticket>,
        release_at_unix_ms: i64,
        /// The channel asking has a reserve in the release: without an admitted
        /// ticket it may still take one of its reserve's unused places (the queue
        /// admits to the common places only, so the reserve would otherwise idle).
        channel_reserve: bool,
    },
    /// A campaign's slot outside its last-minute window: booked only through an offer.
    OfferRequired,
}

impl Gate {
    /// Whether a hold made at `held_at_unix_ms` never passed this gate: nothing passes
    /// a release's before `release_at`, so such a hold was made before the release
    /// existed, and confirming it must pass the gate now. A campaign's gate is passed
    /// only by its own offers' holds (planned apart): any other hold in a slot that now
    /// needs an offer was made before the campaign (or its window changed), so must
    /// pass it too, and cannot.
    pub fn bypassed_by(&self, held_at_unix_ms: i64) -> bool {
        match self {
            Gate::Open => false,
            Gate::OfferRequired => true,
            Gate::NotYet {
                release_at_unix_ms, ..
            }
            | Gate::Queue {
                release_at_unix_ms, ..
            } => held_at_unix_ms < *release_at_unix_ms,
        }
    }
}

/// How a new booking or hold passed its slot's gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Passed {
    Freely,
    /// With this admitted ticket, marked used: written with the command.
    Ticket(Ticket),
    /// Without a ticket, so only into an unused place of its channel's own reserve
    /// (the engine checks that under the release's take lock).
    OwnReserve,
}

/// Lets a new booking or hold through the gate, or refuses it. An admitted ticket
/// admits one booking or hold, within its window. (Moving a booking within its release
/// is not a new place: the engine opens the gate for it.)
pub fn pass(gate: &Gate, now_unix_ms: i64) -> Result<Passed, DomainError> {
    match gate {
        Gate::Open => Ok(Passed::Freely),
        Gate::NotYet { release_at_unix_ms } => Err(DomainError::SlotNotReleased {
            release_at_unix_ms: *release_at_unix_ms,
            retry_after_ms: release_at_unix_ms.saturating_sub(now_unix_ms).max(1),
        }),
        Gate::Queue {
            ticket: Some(ticket),
            ..
        } if !ticket.used
            && ticket
                .admitted
                .is_some_and(|admitted| now_unix_ms < admitted.until_unix_ms) =>
        {
            Ok(Passed::Ticket(Ticket {
                used: true,
                ..ticket.clone()
            }))
        }
        Gate::Queue {
            channel_reserve: true,
            ..
        } => Ok(Passed::OwnReserve),
        Gate::Queue { .. } => Err(DomainError::NotAdmitted),
        Gate::OfferRequired => Err(DomainError::OfferRequired),
    }
}

/// A ticket's state as a citizen sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketState {
    Waiting,
    Admitted,
    SoldOut,
    /// Its admission ran out.
    Expired,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TicketView {
    pub state: TicketState,
    /// 1 for the next to be admitted; 0 while unknown (before the draw) or not waiting.
    pub position: u64,
    /// When a waiting ticket should be admitted at the release's pace, if places last.
    pub estimated_admission_at_unix_ms: Option<i64>,
    pub admitted_until_unix_ms: Option<i64>,
    pub joined_at_unix_ms: i64,
    /// A booking or hold went through with it: it admits nothing more.
    pub used: bool,
}

/// A ticket in memory: the stored fields but the ids (the map's key and the queue's).
#[derive(Clone, Debug)]
struct Entry {
    joined_at_unix_ms: i64,
    drawn: bool,
    arrival: u64,
    admitted: Option<Admitted>,
    used: bool,
    /// Taken by a booking or hold whose write is in flight (memory only): one ticket
    /// admits one write, however many a citizen sends at once.
    claimed: bool,
    /// Written (durable); until then the join is in flight.
    durable: bool,
    /// Its index in `Queue::order`, once ranked.
    rank: Option<u32>,
}

/// The outcome of a join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Join {
    /// A new ticket, to write; then [`Queue::joined`] (or [`Queue::abandon`]).
    New(Ticket),
    /// The citizen's ticket (joining again returns it).
    Existing(TicketView),
    /// The citizen's first join is still being written.
    InFlight,
}

/// The waiting room of one queued release, in memory; rebuilt from its tickets by
/// recovery. Invariant (checked by [`Queue::check`]): the admitted tickets are exactly
/// `order[..admitted]`.
#[derive(Debug, Default)]
pub struct Queue {
    tickets: HashMap<CitizenKey, Entry>,
    /// Joined before the draw, durable, not ranked yet (in arrival order).
    unranked: Vec<CitizenKey>,
    /// Arrivals whose join is being written.
    in_flight: BTreeSet<u64>,
    /// Of them, joins before the draw (the draw waits for them).
    early_in_flight: usize,
    /// Joined after the draw, durable, waiting for every earlier arrival to be written.
    late: BTreeMap<u64, CitizenKey>,
    /// Ranked tickets: the draw's order, then later joiners in arrival order.
    order: Vec<CitizenKey>,
    drawn: bool,
    /// How many of `order` are admitted (its prefix).
    admitted: usize,
    /// Admissions before this index of `order` are over (or counted as over).
    expired_upto: usize,
    /// Admitted tickets not used whose admission is not over.
    unused: usize,
    next_arrival: u64,
    /// Where the pace counts from once recovery rebuilt a release already opening:
    /// the restart, not `release_at`, so a restart does not admit at once every ticket
    /// the pace would have admitted while the server was down (an outside test).
    pace_from: Option<PaceFrom>,
}

/// The pace's origin: `admitted` tickets were admitted before `at_unix_ms`, and one
/// more may be at it.
#[derive(Clone, Copy, Debug)]
struct PaceFrom {
    at_unix_ms: i64,
    admitted: usize,
}

/// The draw's sort key of a ticket: a keyed hash of the citizen under the release's
/// seed, so the order is a uniformly random permutation that a restart reproduces.
pub fn draw_key(seed: &[u8; 32], citizen: &CitizenKey) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(seed).expect("HMAC takes any key length");
    mac.update(&citizen.0);
    mac.finalize().into_bytes().into()
}

impl Queue {
    pub fn len(&self) -> usize {
        self.tickets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tickets.is_empty()
    }

    /// Whether the draw has ranked the early joiners.
    pub fn drawn(&self) -> bool {
        self.drawn
    }

    /// Tickets admitted so far (each at most once).
    pub fn admitted_count(&self) -> usize {
        self.admitted
    }

    /// Admitted tickets not yet used whose admission may still run (call
    /// [`Queue::expire`] first to count those over as over).
    pub fn unused(&self) -> usize {
        self.unused
    }

    /// The citizen joins (`release` is the queue's own, sold out or not: a place that
    /// comes back goes to the next in rank order, so a ticket taken while sold out
    /// still counts).
    pub fn join(&mut self, release: &Release, citizen: CitizenKey, now_unix_ms: i64) -> Join {
        if let Some(entry) = self.tickets.get(&citizen) {
            return match entry.durable {
                true => Join::Existing(self.view_of(entry, release, now_unix_ms)),
                false => Join::InFlight,
            };
        }
        let entry = Entry {
            joined_at_unix_ms: now_unix_ms,
            drawn: !self.drawn && now_unix_ms < release.release_at_unix_ms,
            arrival: self.next_arrival,
            admitted: None,
            used: false,
            claimed: false,
            durable: false,
            rank: None,
        };
        self.next_arrival += 1;
        self.in_flight.insert(entry.arrival);
        self.early_in_flight += usize::from(entry.drawn);
        let ticket = ticket_of(&release.release_id, citizen, &entry);
        self.tickets.insert(citizen, entry);
        Join::New(ticket)
    }

    /// The join's ticket is durable: it takes its place.
    pub fn joined(&mut self, citizen: CitizenKey) {
        let Some(entry) = self.tickets.get_mut(&citizen) else {
            return;
        };
        entry.durable = true;
        self.in_flight.remove(&entry.arrival);
        self.early_in_flight -= usize::from(entry.drawn);
        if entry.drawn {
            self.unranked.push(citizen);
        } else {
            self.late.insert(entry.arrival, citizen);
        }
        self.promote();
    }

    /// The join's write never reached the store: it is forgotten.
    pub fn abandon(&mut self, citizen: CitizenKey) {
        debug_assert!(self.tickets.get(&citizen).is_some_and(|e| !e.durable));
        if let Some(entry) = self.tickets.remove(&citizen) {
            self.in_flight.remove(&entry.arrival);
            self.early_in_flight -= usize::from(entry.drawn);
        }
        self.promote();
    }

    /// A stored ticket, at recovery (in any order).
    pub fn restore(&mut self, ticket: &Ticket) {
        let entry = Entry {
            joined_at_unix_ms: ticket.joined_at_unix_ms,
            drawn: ticket.drawn,
            arrival: ticket.arrival,
            admitted: ticket.admitted,
            used: ticket.used,
            claimed: false,
            durable: true,
            rank: None,
        };
        self.next_arrival = self.next_arrival.max(ticket.arrival + 1);
        if entry.drawn {
            self.unranked.push(ticket.citizen);
        } else {
            self.late.insert(ticket.arrival, ticket.citizen);
        }
        self.tickets.insert(ticket.citizen, entry);
    }

    /// Ranks the early joiners by the seeded draw, once, when none of their joins is
    /// still being written. Returns whether the queue is drawn.
    pub fn draw(&mut self, seed: &[u8; 32]) -> bool {
        if self.drawn {
            return true;
        }
        if self.early_in_flight > 0 {
            return false;
        }
        let mut early = std::mem::take(&mut self.unranked);
        let arrival = |citizen: &CitizenKey| self.tickets.get(citizen).map_or(0, |e| e.arrival);
        early.sort_by_cached_key(|citizen| (draw_key(seed, citizen), arrival(citizen)));
        self.drawn = true;
        for citizen in early {
            self.rank(citizen);
        }
        self.promote();
        true
    }

    /// Moves late joiners into the order in arrival order, as far as every earlier
    /// arrival is written (a join in flight keeps its place).
    fn promote(&mut self) {
        if !self.drawn {
            return;
        }
        while let Some((&arrival, &citizen)) = self.late.first_key_value() {
            if self.in_flight.first().is_some_and(|first| *first < arrival) {
                break;
            }
            self.late.remove(&arrival);
            self.rank(citizen);
        }
    }

    fn rank(&mut self, citizen: CitizenKey) {
        let rank = u32::try_from(self.order.len()).unwrap_or(u32::MAX);
        if let Some(entry) = self.tickets.get_mut(&citizen) {
            entry.rank = Some(rank);
        }
        self.order.push(citizen);
    }

    /// Counts admissions that ran out by `before_unix_ms` as over. The engine passes
    /// `now` minus a grace longer than a command takes: a booking that passed the gate
    /// just before `admitted_until` takes its place a little later, and its ticket must
    /// still count until then.
    pub fn expire(&mut self, before_unix_ms: i64) {
        while self.expired_upto < self.admitted {
            let citizen = self.order[self.expired_upto];
            let Some(entry) = self.tickets.get(&citizen) else {
                break;
            };
            match entry.admitted {
                Some(admitted) if admitted.until_unix_ms <= before_unix_ms => {
                    if !entry.used {
                        self.unused -= 1;
                    }
                    self.expired_upto += 1;
                }
                _ => break,
            }
        }
    }

    /// The pace's origin: `release_at`, or the restart that rebuilt the queue after it.
    fn pace_from(&self, release: &Release) -> PaceFrom {
        self.pace_from.unwrap_or(PaceFrom {
            at_unix_ms: release.release_at_unix_ms,
            admitted: 0,
        })
    }

    /// When the ticket of `rank` (0-based) should be admitted at the release's pace.
    fn estimate(&self, release: &Release, rank: usize, now_unix_ms: i64) -> i64 {
        let per_minute = release
            .queue
            .as_ref()
            .map_or(0, |q| q.admissions_per_minute);
        let from = self.pace_from(release);
        let paced = match per_minute {
            0 => from.at_unix_ms,
            n => {
                let ahead = rank.saturating_sub(from.admitted) as i64;
                from.at_unix_ms + ahead.saturating_mul(60_000) / i64::from(n)
            }
        };
        paced.max(now_unix_ms)
    }

    /// How many tickets may be admitted now: at the release's pace since `release_at`
    /// (or since the restart that rebuilt the queue after it),
    /// and never more admitted-and-unused than `free_places`; at most `step_max`.
    /// `unused` is [`Queue::unused`] read before `free_places` was counted (a booking
    /// takes its place before its ticket counts as used: that order never overcounts).
    pub fn admissible(
        &self,
        release: &Release,
        free_places: u64,
        unused: usize,
        now_unix_ms: i64,
        step_max: usize,
    ) -> usize {
        let Some(rules) = &release.queue else {
            return 0;
        };
        if now_unix_ms < release.release_at_unix_ms || !self.drawn {
            return 0;
        }
        let paced = match rules.admissions_per_minute {
            0 => u64::MAX,
            per_minute => {
                let from = self.pace_from(release);
                let elapsed_ms = (now_unix_ms - from.at_unix_ms).max(0) as u64;
                from.admitted as u64 + 1 + u64::from(per_minute).saturating_mul(elapsed_ms) / 60_000
            }
        };
        let by_pace = paced.saturating_sub(self.admitted as u64);
        let by_places = free_places.saturating_sub(unused as u64);
        let waiting = (self.order.len() - self.admitted) as u64;
        by_pace.min(by_places).min(waiting).min(step_max as u64) as usize
    }

    /// The next `count` tickets in rank order, admitted from `now`: the records to
    /// write before [`Queue::admit`].
    pub fn next_admissions(
        &self,
        release: &Release,
        count: usize,
        now_unix_ms: i64,
    ) -> Vec<Ticket> {
        let ttl_ms = release
            .queue
            .as_ref()
            .map_or(0, |rules| i64::from(rules.admission_ttl_seconds) * 1_000);
        let admitted = Admitted {
            at_unix_ms: now_unix_ms,
            until_unix_ms: now_unix_ms + ttl_ms,
        };
        let end = (self.admitted + count).min(self.order.len());
        self.order[self.admitted..end]
            .iter()
            .filter_map(|citizen| {
                let entry = self.tickets.get(citizen)?;
                Some(Ticket {
                    admitted: Some(admitted),
                    ..ticket_of(&release.release_id, *citizen, entry)
                })
            })
            .collect()
    }

    /// The admissions of [`Queue::next_admissions`] are durable.
    pub fn admit(&mut self, tickets: &[Ticket]) {
        for ticket in tickets {
            // Not assert_eq: its message would print two citizens' keys.
            assert!(
                self.order.get(self.admitted) == Some(&ticket.citizen),
                "tickets are admitted in rank order"
            );
            if let Some(entry) = self.tickets.get_mut(&ticket.citizen) {
                entry.admitted = ticket.admitted;
            }
            self.admitted += 1;
            self.unused += 1;
        }
    }

    /// The citizen's ticket, as stored now.
    pub fn ticket(&self, release_id: &ReleaseId, citizen: &CitizenKey) -> Option<Ticket> {
        let entry = self.tickets.get(citizen).filter(|entry| entry.durable)?;
        Some(ticket_of(release_id, *citizen, entry))
    }

    /// Takes the citizen's admitted, unused ticket for one write (`Take::Ticket`);
    /// false if another write has it, or it is used or not admitted.
    pub fn claim(&mut self, citizen: &CitizenKey) -> bool {
        match self.tickets.get_mut(citizen) {
            Some(entry) if entry.admitted.is_some() && !entry.used && !entry.claimed => {
                entry.claimed = true;
                true
            }
            _ => false,
        }
    }

    /// Gives back a claim whose write never reached the store.
    pub fn unclaim(&mut self, citizen: &CitizenKey) {
        if let Some(entry) = self.tickets.get_mut(citizen) {
            entry.claimed = false;
        }
    }

    /// The citizen's ticket was used (durably, with the booking or hold it admitted).
    pub fn mark_used(&mut self, citizen: &CitizenKey) {
        let Some(entry) = self.tickets.get_mut(citizen) else {
            return;
        };
        if entry.used || entry.admitted.is_none() {
            return;
        }
        entry.used = true;
        if entry
            .rank
            .is_some_and(|rank| rank as usize >= self.expired_upto)
        {
            self.unused -= 1;
        }
    }

    /// The citizen's ticket as it sees it, if it has a durable one.
    pub fn view(
        &self,
        release: &Release,
        citizen: &CitizenKey,
        now_unix_ms: i64,
    ) -> Option<TicketView> {
        let entry = self.tickets.get(citizen).filter(|entry| entry.durable)?;
        Some(self.view_of(entry, release, now_unix_ms))
    }

    fn view_of(&self, entry: &Entry, release: &Release, now_unix_ms: i64) -> TicketView {
        let mut view = TicketView {
            state: TicketState::Waiting,
            position: 0,
            estimated_admission_at_unix_ms: None,
            admitted_until_unix_ms: entry.admitted.map(|a| a.until_unix_ms),
            joined_at_unix_ms: entry.joined_at_unix_ms,
            used: entry.used,
        };
        if let Some(admitted) = entry.admitted {
            view.state = match now_unix_ms < admitted.until_unix_ms {
                true => TicketState::Admitted,
                false => TicketState::Expired,
            };
            return view;
        }
        if release.sold_out_at_unix_ms.is_some() {
            view.state = TicketState::SoldOut;
            return view;
        }
        // Ranked: its place; a late joiner not ranked yet: after every ranked one.
        let rank = match (entry.rank, self.drawn) {
            (Some(rank), _) => Some(rank as usize),
            (None, true) => Some(self.order.len()),
            (None, false) => None,
        };
        if let Some(rank) = rank {
            view.position = (rank.saturating_sub(self.admitted) + 1) as u64;
            view.estimated_admission_at_unix_ms = Some(self.estimate(release, rank, now_unix_ms));
        }
        view
    }

    /// Waiting tickets (not admitted; sold out or not).
    pub fn waiting(&self) -> usize {
        self.tickets.len() - self.admitted
    }

    /// Checks the invariant recovery relies on: the admitted tickets are the first ones
    /// in rank order, and the counts agree with the tickets.
    pub fn check(&self) -> Result<(), String> {
        for (rank, citizen) in self.order.iter().enumerate() {
            let admitted = self
                .tickets
                .get(citizen)
                .is_some_and(|e| e.admitted.is_some());
            if admitted != (rank < self.admitted) {
                return Err(format!(
                    "ticket of rank {rank} is {} out of rank order ({} admitted)",
                    if admitted { "admitted" } else { "waiting" },
                    self.admitted
                ));
            }
        }
        let admitted = self
            .tickets
            .values()
            .filter(|e| e.admitted.is_some())
            .count();
        if admitted != self.admitted {
            return Err(format!(
                "{admitted} tickets admitted, {} of them ranked",
                self.admitted
            ));
        }
        Ok(())
    }

    /// After a restart: the draw (again, from the same seed) if the opening has passed,
    /// and the admitted prefix. Then [`Queue::check`].
    pub fn rebuild(&mut self, release: &Release, now_unix_ms: i64) {
        let Some(rules) = &release.queue else {
            return;
        };
        let any_admitted = self.tickets.values().any(|e| e.admitted.is_some());
        if now_unix_ms >= release.release_at_unix_ms || any_admitted {
            self.draw(&rules.seed);
        }
        self.admitted = self
            .order
            .iter()
            .take_while(|c| self.tickets.get(c).is_some_and(|e| e.admitted.is_some()))
            .count();
        self.unused = self.order[..self.admitted]
            .iter()
            .filter(|c| self.tickets.get(c).is_some_and(|e| !e.used))
            .count();
        self.expired_upto = 0;
        self.expire(now_unix_ms);
        // One fewer than admitted: the pace's first admission (at its origin) was made.
        self.pace_from = (now_unix_ms > release.release_at_unix_ms).then_some(PaceFrom {
            at_unix_ms: now_unix_ms,
            admitted: self.admitted.saturating_sub(1),
        });
    }
}

fn ticket_of(release_id: &ReleaseId, citizen: CitizenKey, entry: &Entry) -> Ticket {
    Ticket {
        release_id: release_id.clone(),
        citizen,
        joined_at_unix_ms: entry.joined_at_unix_ms,
        drawn: entry.drawn,
        arrival: entry.arrival,
        admitted: entry.admitted,
        used: entry.used,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recovery's threads count apart; merged, the counts are those of one count.
    #[test]
    fn merged_channel_use_adds_the_places_of_each_channel_and_slot() {
        let slot = |start| SlotKey {
            site_id: SiteId::parse("s", "s1", 64).unwrap(),
            service_id: ServiceId::parse("s", "covid", 64).unwrap(),
            start_unix_s: start,
        };
        let channel = |name| ChannelId::parse("c", name, 64).unwrap();
        let reserves: Vec<Reserve> = ["phone", "desk"]
            .into_iter()
            .map(|name| Reserve {
                channel: channel(name),
                percent: 10,
            })
            .collect();
        let (mut one, mut other) = (ChannelUse::default(), ChannelUse::default());
        one.add(&slot(0), &channel("phone"));
        one.add(&slot(0), &ChannelId::web()); // the default: not counted
        other.add(&slot(0), &channel("phone"));
        other.add(&slot(0), &channel("desk"));
        other.add(&slot(600), &channel("desk"));
        one.merge(other);
        assert_eq!(one.used(&slot(0), &reserves), [2, 1]);
        assert_eq!(one.used(&slot(600), &reserves), [0, 1]);
    }

    fn release(release_at: i64, per_minute: u32, seed: u8) -> Release {
        Release {
            release_id: ReleaseId::parse("r", "r1", 64).unwrap(),
            scope: ReleaseScope::Region(RegionId::parse("r", "lazio", 64).unwrap()),
            service_id: ServiceId::parse("s", "covid", 64).unwrap(),
            from_unix_s: 0,
            to_unix_s: 1_000_000,
            release_at_unix_ms: release_at,
            queue: Some(QueueRules {
                opens_at_unix_ms: 0,
                admissions_per_minute: per_minute,
                admission_ttl_seconds: 600,
                seed: [seed; 32],
            }),
            created_at_unix_ms: 0,
            sold_out_at_unix_ms: None,
            reserves: Vec::new(),
            reserve_released_hours_before_start: 0,
        }
    }

    fn citizen(n: u32) -> CitizenKey {
        let mut key = [0u8; 16];
        key[..4].copy_from_slice(&n.to_be_bytes());
        CitizenKey(key)
    }

    /// `n` citizens join before the opening, in order 0..n, durably.
    fn joined(release: &Release, n: u32) -> Queue {
        let mut queue = Queue::default();
        for i in 0..n {
            assert!(matches!(
                queue.join(release, citizen(i), i64::from(i)),
                Join::New(_)
            ));
            queue.joined(citizen(i));
        }
        queue
    }

    /// Admits everything admissible at `now` with `free` places; returns the tickets.
    fn admit(queue: &mut Queue, release: &Release, free: u64, now: i64) -> Vec<Ticket> {
        let n = queue.admissible(release, free, queue.unused(), now, usize::MAX);
        let tickets = queue.next_admissions(release, n, now);
        queue.admit(&tickets);
        tickets
    }

    #[test]
    fn the_draw_is_a_uniform_permutation() {
        // For 8 joiners and 4,000 seeds, each joiner lands in each rank about 500 times:
        // a chi-square test over the 64 cells (49 degrees of freedom; 0.1% critical
        // value 85.4).
        let (n, seeds) = (8u32, 4_000u32);
        let mut counts = vec![vec![0u32; n as usize]; n as usize];
        for seed in 0..seeds {
            let mut release = release(1_000, 0, 0);
            release.queue.as_mut().unwrap().seed[..4].copy_from_slice(&seed.to_be_bytes());
            let mut queue = joined(&release, n);
            assert!(queue.draw(&release.queue.as_ref().unwrap().seed));
            for (rank, c) in queue.order.iter().enumerate() {
                let who = u32::from_be_bytes(c.0[..4].try_into().unwrap());
                counts[who as usize][rank] += 1;
            }
        }
        let expected = f64::from(seeds) / f64::from(n);
        let chi2: f64 = counts
            .iter()
            .flatten()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 85.4, "chi-square {chi2} over {counts:?}");
    }

    #[test]
    fn the_draw_is_reproduced_from_the_seed_whatever_the_order_of_restore() {
        let release = release(1_000, 0, 7);
        let seed = release.queue.as_ref().unwrap().seed;
        let mut first = joined(&release, 100);
        first.draw(&seed);
        let mut tickets: Vec<Ticket> = (0..100)
            .map(|i| first.ticket(&release.release_id, &citizen(i)).unwrap())
            .collect();
        tickets.reverse();
        let mut again = Queue::default();
        for ticket in &tickets {
            again.restore(ticket);
        }
        again.rebuild(&release, 1_000);
        assert_eq!(again.order, first.order);
        again.check().unwrap();
    }

    #[test]
    fn late_joiners_follow_the_drawn_ones_in_arrival_order() {
        let release = release(1_000, 0, 1);
        let mut queue = joined(&release, 10);
        queue.draw(&release.queue.as_ref().unwrap().seed);
        // Two late joins; the second is written first: it waits for the first.
        let (a, b) = (citizen(100), citizen(101));
        assert!(matches!(queue.join(&release, a, 2_000), Join::New(_)));
        assert!(matches!(queue.join(&release, b, 2_001), Join::New(_)));
        queue.joined(b);
        assert_eq!(queue.order.len(), 10);
        queue.joined(a);
        assert_eq!(&queue.order[10..], &[a, b]);
        let view = queue.view(&release, &b, 2_000).unwrap();
        assert_eq!(view.position, 12);
    }

    #[test]
    fn admissions_never_exceed_the_free_places_and_follow_rank_order() {
        let release = release(1_000, 0, 2);
        let mut queue = joined(&release, 50);
        queue.draw(&release.queue.as_ref().unwrap().seed);
        let first = admit(&mut queue, &release, 10, 1_000);
        assert_eq!(first.len(), 10);
        // Nobody booked yet: 10 places, 10 admitted and unused: nothing more.
        assert!(admit(&mut queue, &release, 10, 1_100).is_empty());
        // Three use their tickets (3 places fewer): still nothing.
        for ticket in &first[..3] {
            queue.mark_used(&ticket.citizen);
        }
        assert!(admit(&mut queue, &release, 7, 1_200).is_empty());
        // Their admissions run out unused: their places go to the next in line.
        queue.expire(1_000 + 600_000);
        assert_eq!(queue.unused(), 0);
        let next = admit(&mut queue, &release, 7, 601_000);
        assert_eq!(next.len(), 7);
        assert_eq!(next[0].citizen, queue.order[10]);
        queue.check().unwrap();
    }

    #[test]
    fn an_admitted_ticket_is_claimed_by_one_write_at_a_time() {
        let release = release(1_000, 0, 2);
        let mut queue = joined(&release, 3);
        queue.draw(&release.queue.as_ref().unwrap().seed);
        let admitted = admit(&mut queue, &release, 1, 1_000);
        let (holder, waiting) = (admitted[0].citizen, queue.order[1]);
        assert!(!queue.claim(&waiting), "not admitted");
        assert!(queue.claim(&holder));
        assert!(!queue.claim(&holder), "its write is in flight");
        queue.unclaim(&holder); // that write never reached the store
        assert!(queue.claim(&holder));
        queue.mark_used(&holder);
        queue.unclaim(&holder);
        assert!(!queue.claim(&holder), "used");
    }

    #[test]
    fn admissions_keep_the_pace_of_the_release() {
        let release = release(60_000, 60, 3);
        let mut queue = joined(&release, 100);
        queue.draw(&release.queue.as_ref().unwrap().seed);
        assert_eq!(admit(&mut queue, &release, 1_000, 60_000).len(), 1);
        assert_eq!(admit(&mut queue, &release, 1_000, 70_000).len(), 10);
        let view = queue
            .view(&release, &queue.order[50].clone(), 70_000)
            .unwrap();
        assert_eq!(view.position, 40);
        assert_eq!(
            view.estimated_admission_at_unix_ms,
            Some(60_000 + 50 * 1_000)
        );
    }

    /// A restart resumes the pace from where it was: the tickets the pace would have
    /// admitted while the server was down are not admitted at once.
    #[test]
    fn a_restart_resumes_the_pace_without_a_burst() {
        let release = release(60_000, 60, 3);
        let mut first = joined(&release, 100);
        first.draw(&release.queue.as_ref().unwrap().seed);
        assert_eq!(admit(&mut first, &release, 1_000, 70_000).len(), 11);
        let mut again = Queue::default();
        for i in 0..100 {
            again.restore(&first.ticket(&release.release_id, &citizen(i)).unwrap());
        }
        // Down for a minute: the pace alone would now allow 60 more.
        again.rebuild(&release, 130_000);
        again.check().unwrap();
        assert_eq!(admit(&mut again, &release, 1_000, 130_000).len(), 0);
        let waiting = again.order[50];
        let view = again.view(&release, &waiting, 130_000).unwrap();
        assert_eq!(
            view.estimated_admission_at_unix_ms,
            Some(130_000 + (50 - 10) * 1_000)
        );
        assert_eq!(admit(&mut again, &release, 1_000, 140_000).len(), 10);
    }

    #[test]
    fn only_an_admitted_ticket_in_its_window_passes_the_gate() {
        let release = release(1_000, 0, 4);
        let mut queue = joined(&release, 2);
        queue.draw(&release.queue.as_ref().unwrap().seed);
        let tickets = admit(&mut queue, &release, 1, 1_000);
        let admitted = queue.ticket(&release.release_id, &tickets[0].citizen);
        let waiting = queue.order[1];
        let waiting = queue.ticket(&release.release_id, &waiting);
        let gate = |ticket: Option<Ticket>| Gate::Queue {
            ticket,
            release_at_unix_ms: 1_000,
            channel_reserve: false,
        };
        let Ok(Passed::Ticket(used)) = pass(&gate(admitted.clone()), 2_000) else {
            panic!("an admitted ticket passes");
        };
        assert!(used.used);
        // A ticket admits one booking or hold.
        assert_eq!(
            pass(&gate(Some(used)), 2_000),
            Err(DomainError::NotAdmitted)
        );
        assert_eq!(pass(&gate(waiting), 2_000), Err(DomainError::NotAdmitted));
        assert_eq!(pass(&gate(None), 2_000), Err(DomainError::NotAdmitted));
        assert_eq!(
            pass(&gate(admitted.clone()), 1_000 + 600_000),
            Err(DomainError::NotAdmitted)
        );
        // A channel with a reserve passes without a ticket, into its reserve only; a
        // ticket it has is used first.
        let reserving = |ticket: Option<Ticket>| Gate::Queue {
            ticket,
            release_at_unix_ms: 1_000,
            channel_reserve: true,
        };
        assert_eq!(pass(&reserving(None), 2_000), Ok(Passed::OwnReserve));
        assert!(matches!(
            pass(&reserving(admitted), 2_000),
            Ok(Passed::Ticket(_))
        ));
        assert_eq!(
            pass(
                &Gate::NotYet {
                    release_at_unix_ms: 1_000
                },
                400
            ),
            Err(DomainError::SlotNotReleased {
                release_at_unix_ms: 1_000,
                retry_after_ms: 600
            })
        );
    }

    #[test]
    fn a_second_join_returns_the_ticket_and_sold_out_shows_on_waiting_tickets() {
        let mut release = release(1_000, 0, 5);
        let mut queue = joined(&release, 1);
        assert!(matches!(
            queue.join(&release, citizen(0), 5),
            Join::Existing(TicketView {
                state: TicketState::Waiting,
                ..
            })
        ));
        assert!(matches!(queue.join(&release, citizen(1), 6), Join::New(_)));
        assert_eq!(queue.join(&release, citizen(1), 7), Join::InFlight);
        queue.abandon(citizen(1));
        release.sold_out_at_unix_ms = Some(2_000);
        let view = queue.view(&release, &citizen(0), 3_000).unwrap();
        assert_eq!(view.state, TicketState::SoldOut);
    }
}

#[cfg(test)]
mod reserve_tests {
    use super::*;

    #[test]
    fn reserves_hold_back_their_share_from_other_channels_until_released() {
        let channel = |name| ChannelId::parse("c", name, 64).unwrap();
        let release = Release {
            release_id: ReleaseId::parse("r", "r", 64).unwrap(),
            scope: ReleaseScope::Sites(Vec::new()),
            service_id: ServiceId::parse("s", "s", 64).unwrap(),
            from_unix_s: 0,
            to_unix_s: 1,
            release_at_unix_ms: 0,
            queue: None,
            created_at_unix_ms: 0,
            sold_out_at_unix_ms: None,
            reserves: vec![
                Reserve {
                    channel: channel("desk"),
                    percent: 10,
                },
                Reserve {
                    channel: channel("phone"),
                    percent: 35,
                },
            ],
            reserve_released_hours_before_start: 24,
        };
        let start = 10 * 86_400;
        // 20 places: 2 for the desk, 7 for the phone, until a day before the start.
        let reserved = release.reserved_places(20, start, 0).unwrap();
        assert_eq!(reserved, [2, 7]);
        assert_eq!(
            held_back(&release, &reserved, &[0, 0], &ChannelId::web()),
            9
        );
        assert_eq!(
            held_back(&release, &reserved, &[1, 7], &ChannelId::web()),
            1
        );
        assert_eq!(
            held_back(&release, &reserved, &[0, 3], &channel("phone")),
            2
        );
        // More bookings than its reserve hold nothing more back.
        assert_eq!(
            held_back(&release, &reserved, &[5, 0], &channel("phone")),
            0
        );
        // What a channel may still take of its own reserve.
        assert_eq!(
            own_unused(&release, &reserved, &[0, 3], &channel("phone")),
            4
        );
        assert_eq!(
            own_unused(&release, &reserved, &[5, 0], &channel("desk")),
            0
        );
        assert_eq!(
            own_unused(&release, &reserved, &[0, 0], &ChannelId::web()),
            0
        );
        assert_eq!(
            release.reserved_places(20, start, (start - 86_400) * 1_000),
            None
        );
        assert_eq!(release.reserve_of(&channel("phone")), Some(1));
        assert_eq!(release.reserve_of(&ChannelId::web()), None);
    }
}
