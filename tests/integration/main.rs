//! The integration suite, one test binary: real servers on `127.0.0.1:0` with temp
//! dirs, real restarts and `kill -9`, hostile clients. One binary links the service
//! once instead of once per file (31 files, each its own ~65 MB binary even with line
//! tables only, had filled a CI disk).
//! Run one file's tests with a filter: `cargo test --test integration crash::`.

mod common;

mod admission;
mod assertions;
mod auth;
mod backup;
mod booking;
mod campaign;
mod capacity;
mod crash;
mod desk;
mod durability;
mod events;
mod failover;
mod fuzz;
mod group;
mod hardening;
mod holds;
mod hostile;
mod layers;
mod model;
mod open_data;
mod operations;
mod postgres_tls;
mod power;
mod privacy;
mod readme;
mod recovery;
mod release;
mod reserves;
mod retention;
mod schedule;
mod series;
mod server;
mod tls;
mod validation;
mod watch;
