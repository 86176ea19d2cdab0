//! The pure, synchronous core: identifiers, slots and their counters, citizens'
//! limits, schedules and local-time rules.
//!
//! Must not import tokio, tonic or sled, and never reads the clock: time is passed in.

pub mod booking;
pub mod campaign;
pub mod catalog;
pub mod citizen_id;
pub mod citizens;
pub mod error;
pub mod event;
pub mod field_violation;
pub mod hold;
pub mod ids;
pub mod plans;
pub mod release;
pub mod retention;
pub mod schedule;
pub mod series;
pub mod shards;
pub mod slot_counter;
pub mod text;
