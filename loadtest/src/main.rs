//! `prenota-loadtest`: reproduces a national booking rush against a prenota server.
//!
//! Skeleton only: the scenarios (`rush`, `mixed`, `ceiling`) are built by the
//! load-generator issue. It links the `prenota` library so the generated gRPC
//! client is shared with the server and cannot drift from it.

fn main() {
    eprintln!(
        "prenota-loadtest {}: no scenarios yet (see BENCHMARKS.md)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
