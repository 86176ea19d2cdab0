//! prenota: high-volume appointment booking for public services.
//!
//! # Layout
//! - [`limits`]: every limit in one struct, with units in the names (a leaf).
//! - [`config`]: `prenota.toml`, tokens, flag precedence and defaults.
//! - [`domain`]: pure and synchronous: ids, slot counters (one CAS per admission),
//!   citizen limits, schedules and local-time rules. Knows nothing of tokio, tonic or sled.
//! - [`store`]: records and keys (versioned disk forms), the group committer (flush +
//!   fdatasync per batch), the scans start-up recovery reads, backups, and the
//!   PostgreSQL backend (lease, fencing, migrations).
//! - [`metrics_listener`]: the bounded `/metrics` port; [`open_files`]: the open-file
//!   limit; [`tls_expiry`]: certificates past or near their end.
//! - [`service`]: the transport-free engine wiring domain and store: book, cancel,
//!   publish, with idempotency, and start-up recovery (`service::recovery`). Knows
//!   nothing of tonic.
//! - [`grpc`]: tonic handlers, proto ↔ domain conversions and the one error → `Status` mapping.
//! - [`server`]: builds the gRPC server (health, reflection, shutdown) around the engine.
//! - [`demo`]: the demo sites seeded by `serve --demo`.
//! - [`dev_assertion`]: `prenota dev-assertion`, a citizen assertion signed for trying.
//! - [`allocator`]: the binaries' global allocator (mimalloc, entered for malloc's alignments;
//!   transparent huge pages turned off).
//! - [`capacity_file`]: the CSV capacity file authorities import (shape only).
//! - [`cli`]: the `prenota import` / `export` / `audit` / `open-data` / `backup` /
//!   `restore` / `migrate` commands.
//! - [`cli_call`]: `prenota call`, any RPC with a JSON request, from the built-in protos.
//! - [`telemetry`]: every Prometheus metric name and bucket, and the log format.
//! - [`proto`]: generated `prenota.v1` code; proto types stop at `grpc`, `server` and
//!   the clients (`main.rs`, `cli`, `cli_call`, `capacity_file`).

// A lock taken in a `match` scrutinee lives through every arm: an arm that locks it
// again deadlocks (PreRegister of a registered citizen froze the server that way).
#![warn(clippy::significant_drop_in_scrutinee)]

/// `eprintln!` that never panics: a line stderr cannot take (a full disk, a pipe gone)
/// is dropped, where `eprintln!` panics and turns exit status 1 into 101 (an outside
/// test with stderr on a full disk). Every message the commands print to stderr uses it.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod allocator;
pub mod capacity_file;
pub mod cli;
pub mod cli_call;
pub mod config;
pub mod demo;
pub mod dev_assertion;
pub mod domain;
pub mod grpc;
pub mod limits;
pub mod metrics_listener;
pub mod open_files;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod tls_expiry;

/// Generated from `proto/prenota/v1/*.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("prenota.v1");

    /// Encoded descriptors of every prenota proto, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/prenota_descriptor.bin"));
}
