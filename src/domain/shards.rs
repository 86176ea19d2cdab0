//! A map split into 64 mutex-guarded shards, chosen by a key's first byte (keys here
//! are digests or random ids, so the byte spreads them evenly): the citizen index and
//! the request registry, whose critical sections are each one map operation.

use std::sync::{Mutex, MutexGuard};

pub const SHARD_COUNT: usize = 64;

pub struct Shards<T> {
    shards: Box<[Mutex<T>]>,
}

impl<T: Default> Default for Shards<T> {
    fn default() -> Self {
        Self {
            shards: (0..SHARD_COUNT).map(|_| Mutex::default()).collect(),
        }
    }
}

impl<T> Shards<T> {
    /// The shard of a key whose first byte is `first_byte`. A poisoned shard still
    /// holds consistent data: every critical section is a single map operation.
    pub fn of(&self, first_byte: u8) -> MutexGuard<'_, T> {
        lock(&self.shards[usize::from(first_byte) % SHARD_COUNT])
    }

    /// Each shard in turn, locked one at a time.
    pub fn each(&self) -> impl Iterator<Item = MutexGuard<'_, T>> {
        self.shards.iter().map(lock)
    }
}

fn lock<T>(shard: &Mutex<T>) -> MutexGuard<'_, T> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
