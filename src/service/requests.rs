//! Idempotency: a `request_id` maps to the first outcome of its request.
//!
//! Successful mutations are remembered for `request_records_retained_hours` (rebuilt
//! from stored bookings, holds and registrations at start-up, then pruned by retention). A request still in flight makes its duplicates wait for its outcome, so
//! two copies of one request racing each other book once. A refused request (slot full,
//! bad input) is forgotten: retrying it is evaluated afresh and can still book at most once.

use foldhash::HashMap;
use std::cell::Cell;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::sync::MutexGuard;

use tokio::sync::watch;

use crate::domain::error::DomainError;
use crate::domain::ids::{BookingId, RequestFingerprint, RequestKey};
use crate::domain::shards::{Shards, SHARD_COUNT};
use crate::service::error::ServiceError;

pub type Outcome = Result<BookingId, ServiceError>;

/// One shard. Finished requests (millions, kept for the retention window) and requests
/// in flight (bounded by the requests in flight) live apart, so a finished one costs 56
/// bytes.
#[derive(Default)]
struct Shard {
    done: HashMap<RequestKey, Done>,
    pending: HashMap<RequestKey, (RequestFingerprint, watch::Receiver<Option<Outcome>>)>,
}

/// A finished request: what it was, what it made, and when.
struct Done {
    fingerprint: RequestFingerprint,
    booking_id: BookingId,
    at_unix_ms: i64,
}

pub enum Begin<'a> {
    /// First time: run the request, then `finish` the guard.
    Fresh(RequestGuard<'a>),
    /// Already succeeded with this booking.
    Done(BookingId),
    /// A copy is in flight: wait for its outcome.
    Wait(watch::Receiver<Option<Outcome>>),
}

#[derive(Default)]
pub struct RequestRegistry {
    shards: Shards<Shard>,
}

impl RequestRegistry {
    fn shard(&self, key: &RequestKey) -> MutexGuard<'_, Shard> {
        self.shards.of(key.0[0])
    }

    /// Starts request `key` at `now_unix_ms` (the time its record is kept from).
    pub fn begin(
        &self,
        key: RequestKey,
        fingerprint: RequestFingerprint,
        now_unix_ms: i64,
    ) -> Result<Begin<'_>, ServiceError> {
        let mut shard = self.shard(&key);
        if let Some(done) = shard.done.get(&key) {
            return if done.fingerprint == fingerprint {
                Ok(Begin::Done(done.booking_id))
            } else {
                Err(DomainError::RequestIdReused.into())
            };
        }
        if let Some((first, outcome)) = shard.pending.get(&key) {
            return if *first == fingerprint {
                Ok(Begin::Wait(outcome.clone()))
            } else {
                Err(DomainError::RequestIdReused.into())
            };
        }
        let (sender, receiver) = watch::channel(None);
        shard.pending.insert(key, (fingerprint, receiver));
        Ok(Begin::Fresh(RequestGuard {
            registry: self,
            key,
            fingerprint,
            at_unix_ms: now_unix_ms,
            sender: Some(sender),
        }))
    }

    /// The booking a finished request `key` made, if it was this request (`fingerprint`).
    pub fn finished(&self, key: &RequestKey, fingerprint: RequestFingerprint) -> Option<BookingId> {
        let shard = self.shard(key);
        let done = shard.done.get(key)?;
        (done.fingerprint == fingerprint).then_some(done.booking_id)
    }

    /// Recovery only: a stored mutation made at `at_unix_ms`, and its outcome. Of two
    /// records of one key (a key reused after its first use was forgotten; or the
    /// members of one household booking, made at the same time) the later is kept, and
    /// at the same time the greater booking id, whatever order recovery's threads find
    /// them in.
    pub fn insert_recovered(
        &self,
        key: RequestKey,
        fingerprint: RequestFingerprint,
        booking_id: BookingId,
        at_unix_ms: i64,
    ) {
        let done = Done {
            fingerprint,
            booking_id,
            at_unix_ms,
        };
        match self.shard(&key).done.entry(key) {
            Entry::Occupied(mut kept)
                if (kept.get().at_unix_ms, kept.get().booking_id) <= (at_unix_ms, booking_id) =>
            {
                kept.insert(done);
            }
            Entry::Occupied(_) => {}
            Entry::Vacant(vacant) => {
                vacant.insert(done);
            }
        }
    }

    /// Forgets the finished requests made before `cutoff_unix_ms`, one shard at a time;
    /// returns how many. A retry of one of them is then a new request.
    pub fn prune(&self, cutoff_unix_ms: i64) -> usize {
        let mut pruned = 0;
        for mut shard in self.shards.each() {
            let before = shard.done.len();
            shard
                .done
                .retain(|_, done| done.at_unix_ms >= cutoff_unix_ms);
            pruned += before - shard.done.len();
        }
        pruned
    }

    /// Forgets finished request `key` if it made `booking_id` (whose record was
    /// deleted); a newer request that reused the key after the window is kept.
    pub fn forget(&self, key: &RequestKey, booking_id: BookingId) {
        let mut shard = self.shard(key);
        if shard
            .done
            .get(key)
            .is_some_and(|done| done.booking_id == booking_id)
        {
            shard.done.remove(key);
        }
    }

    /// Room for `records` remembered requests in all, made at once (recovery, sized by
    /// `store::size_hint`); `false` if the memory could not be had (nothing reserved
    /// then in the shards left).
    pub fn reserve(&self, records: usize) -> bool {
        self.shards
            .each()
            .all(|mut shard| shard.done.try_reserve(records / SHARD_COUNT + 1).is_ok())
    }

    /// Finished requests remembered.
    pub fn remembered(&self) -> usize {
        self.shards.each().map(|shard| shard.done.len()).sum()
    }
}

tokio::task_local! {
    /// Whether the request this task runs was answered with an earlier outcome (a
    /// retry, or a copy that waited for the first): set by `Engine::once_per_request`,
    /// and read only by [`noting_replays`], which the gRPC handlers run the counted
    /// booking commands in, so that a replay is not counted as a new outcome.
    static REPLAYED: Cell<bool>;
}

/// Runs `work`, and says whether its request was answered with an earlier outcome.
pub async fn noting_replays<F: Future>(work: F) -> (F::Output, bool) {
    let noted = async move {
        let output = work.await;
        (output, REPLAYED.with(Cell::get))
    };
    REPLAYED.scope(Cell::new(false), noted).await
}

/// Notes that the running request is answered with the first outcome again (nothing
/// outside [`noting_replays`]: nobody asks there).
pub(super) fn note_replay() {
    let _ = REPLAYED.try_with(|replayed| replayed.set(true));
}

/// `answer` (an earlier outcome read back), noted as a replay if it could be read: one
/// that failed on its own (the store failed, the record is gone) is not one.
pub(super) fn replayed<T>(answer: Result<T, ServiceError>) -> Result<T, ServiceError> {
    if answer.is_ok() {
        note_replay();
    }
    answer
}

/// Waits for the outcome of a copy of this request that is in flight.
pub async fn wait(mut outcome: watch::Receiver<Option<Outcome>>) -> Outcome {
    match outcome.wait_for(Option::is_some).await {
        Ok(value) => value.clone().unwrap_or(Err(ServiceError::Abandoned)),
        Err(_) => Err(ServiceError::Abandoned),
    }
}

/// Held while a request runs; publishes its outcome to waiting duplicates.
pub struct RequestGuard<'a> {
    registry: &'a RequestRegistry,
    key: RequestKey,
    fingerprint: RequestFingerprint,
    at_unix_ms: i64,
    sender: Option<watch::Sender<Option<Outcome>>>,
}

impl RequestGuard<'_> {
    pub fn finish(mut self, outcome: Outcome) -> Outcome {
        self.publish(outcome.clone());
        outcome
    }

    fn publish(&mut self, outcome: Outcome) {
        let Some(sender) = self.sender.take() else {
            return;
        };
        {
            let mut shard = self.registry.shard(&self.key);
            shard.pending.remove(&self.key);
            if let Ok(booking_id) = &outcome {
                let done = Done {
                    fingerprint: self.fingerprint,
                    booking_id: *booking_id,
                    at_unix_ms: self.at_unix_ms,
                };
                shard.done.insert(self.key, done);
            }
        }
        sender.send_replace(Some(outcome));
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        self.publish(Err(ServiceError::Abandoned));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_goes_by_time_and_forgetting_only_forgets_the_record_it_names() {
        let registry = RequestRegistry::default();
        let (key, fingerprint) = (RequestKey([1; 16]), RequestFingerprint([2; 16]));
        registry.insert_recovered(key, fingerprint, BookingId(10), 1_000);
        registry.insert_recovered(RequestKey([3; 16]), fingerprint, BookingId(11), 5_000);
        assert_eq!(registry.prune(1_000), 0, "made at the cutoff: kept");
        assert_eq!(registry.prune(1_001), 1);
        assert_eq!(registry.remembered(), 1);

        // The key was reused after the window, for booking 12; deleting booking 10's
        // record must not forget booking 12's request.
        registry.insert_recovered(key, fingerprint, BookingId(12), 9_000);
        registry.forget(&key, BookingId(10));
        assert!(matches!(
            registry.begin(key, fingerprint, 9_500),
            Ok(Begin::Done(BookingId(12)))
        ));
        registry.forget(&key, BookingId(12));
        assert!(matches!(
            registry.begin(key, fingerprint, 9_500),
            Ok(Begin::Fresh(_))
        ));
    }

    /// Recovery's threads find the records of a reused key in either order: the later
    /// use is the one remembered (at the same time, the greater booking id).
    #[test]
    fn of_two_recovered_records_of_one_key_the_later_is_kept_whatever_the_order() {
        let (key, fingerprint) = (RequestKey([1; 16]), RequestFingerprint([2; 16]));
        // A reused key; a household's members, booked at once by one request.
        for first_at in [1_000, 9_000] {
            for later_first in [false, true] {
                let registry = RequestRegistry::default();
                let mut records = [(BookingId(10), first_at), (BookingId(12), 9_000)];
                if later_first {
                    records.reverse();
                }
                for (booking_id, at_unix_ms) in records {
                    registry.insert_recovered(key, fingerprint, booking_id, at_unix_ms);
                }
                assert!(matches!(
                    registry.begin(key, fingerprint, 9_500),
                    Ok(Begin::Done(BookingId(12)))
                ));
            }
        }
    }
}
