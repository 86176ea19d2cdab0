//! Latency histograms, outcome counts, and the final report (table + JSON).

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tonic::Status;
use tonic_types::StatusExt;

/// The latency histogram of shed answers.
pub const SHED: &str = "(shed)";

/// An answer of a server at its in-flight limit.
pub fn is_shed(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && status
            .get_details_error_info()
            .is_some_and(|info| info.reason == "OVERLOADED")
}

/// How long the server asked to wait before retrying (RetryInfo), or 50 ms.
pub fn retry_delay(status: &Status) -> Duration {
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .unwrap_or(Duration::from_millis(50))
}

/// What one worker saw; merged into the phase's totals at the end.
pub struct Tally {
    /// Per RPC name: latency in microseconds.
    pub latency_us: BTreeMap<&'static str, Histogram<u64>>,
    /// "RPC CODE[/REASON]" → count.
    pub outcomes: BTreeMap<String, u64>,
}

impl Tally {
    pub fn new() -> Self {
        Self {
            latency_us: BTreeMap::new(),
            outcomes: BTreeMap::new(),
        }
    }

    pub fn record<T>(&mut self, rpc: &'static str, elapsed: Duration, result: &Result<T, Status>) {
        // Shed answers get their own histogram, so each RPC's is that of admitted requests.
        let key = match result {
            Err(status) if is_shed(status) => SHED,
            _ => rpc,
        };
        let histogram = self
            .latency_us
            .entry(key)
            // 1 µs .. 60 s at 3 significant digits.
            .or_insert_with(|| {
                Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant, valid bounds")
            });
        let _ = histogram.record((elapsed.as_micros() as u64).clamp(1, 60_000_000));
        let outcome = match result {
            Ok(_) => format!("{rpc} OK"),
            Err(status) => match status.get_details_error_info() {
                Some(info) => format!("{rpc} {:?}/{}", status.code(), info.reason),
                None => format!("{rpc} {:?}", status.code()),
            },
        };
        *self.outcomes.entry(outcome).or_default() += 1;
    }

    pub fn merge(&mut self, other: Tally) {
        for (rpc, histogram) in other.latency_us {
            match self.latency_us.get_mut(rpc) {
                Some(mine) => {
                    let _ = mine.add(&histogram);
                }
                None => {
                    self.latency_us.insert(rpc, histogram);
                }
            }
        }
        for (outcome, count) in other.outcomes {
            *self.outcomes.entry(outcome).or_default() += count;
        }
    }

    pub fn requests(&self) -> u64 {
        self.outcomes.values().sum()
    }

    /// Requests the server shed (UNAVAILABLE / OVERLOADED).
    pub fn shed(&self) -> u64 {
        self.outcomes
            .iter()
            .filter(|(outcome, _)| outcome.ends_with("Unavailable/OVERLOADED"))
            .map(|(_, count)| count)
            .sum()
    }

    pub fn count(&self, outcome: &str) -> u64 {
        self.outcomes.get(outcome).copied().unwrap_or(0)
    }
}

/// One phase's numbers.
pub struct Phase {
    pub name: &'static str,
    pub elapsed: Duration,
    pub tally: Tally,
    /// CPU time the spawned server's threads used during the phase (`--spawn` only).
    pub server_cpu: Option<Duration>,
}

/// CPU time (user + system) so far of this process's server threads: those a spawned
/// server runs (every `prenota-*` thread: `prenota-server`, its runtime;
/// `prenota-committer`; `prenota-verify`, the signature checks of asserted citizens;
/// `prenota-lease*` on PostgreSQL) and sled's `sled-*`, read from /proc/self/task
/// (Linux). The load generator's threads are not counted, so the figure does not depend
/// on how much CPU the client eats. With the PostgreSQL backend, every process named
/// `postgres` on the machine too (see `count_postgres_cpu`).
pub fn server_cpu() -> Option<Duration> {
    let ticks_per_s = 100.0; // USER_HZ: 100 on Linux
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let server = ["prenota-", "sled"]
            .iter()
            .any(|prefix| comm.starts_with(prefix));
        if server {
            ticks += cpu_ticks(&path);
        }
    }
    if COUNT_POSTGRES.load(std::sync::atomic::Ordering::Relaxed) {
        for process in std::fs::read_dir("/proc").ok()? {
            let path = process.ok()?.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if comm.trim_end() == "postgres" {
                ticks += cpu_ticks(&path);
            }
        }
    }
    Some(Duration::from_secs_f64(ticks as f64 / ticks_per_s))
}

static COUNT_POSTGRES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on `server_cpu` adds PostgreSQL's processes (the spawned server stores
/// there): on a machine running only a throwaway PostgreSQL, its whole cost.
pub fn count_postgres_cpu() {
    COUNT_POSTGRES.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// utime + stime of a process or thread (its /proc directory), in clock ticks.
fn cpu_ticks(path: &std::path::Path) -> u64 {
    let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
    // After the command in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

impl Phase {
    pub fn requests_per_s(&self) -> f64 {
        self.tally.requests() as f64 / self.elapsed.as_secs_f64().max(1e-6)
    }

    /// The server's CPU per request, in µs, when it was measured.
    pub fn server_cpu_us_per_request(&self) -> Option<f64> {
        let requests = self.tally.requests().max(1) as f64;
        self.server_cpu
            .filter(|cpu| !cpu.is_zero())
            .map(|cpu| cpu.as_secs_f64() * 1e6 / requests)
    }

    pub fn print(&self) {
        println!(
            "\n{}: {} requests in {:.2} s = {:.0} req/s",
            self.name,
            self.tally.requests(),
            self.elapsed.as_secs_f64(),
            self.requests_per_s()
        );
        if let (Some(cpu), Some(per_request)) = (self.server_cpu, self.server_cpu_us_per_request())
        {
            println!(
                "  server CPU: {:.2} s = {per_request:.1} µs per request (its own threads, from /proc)",
                cpu.as_secs_f64()
            );
        }
        println!(
            "  {:<17} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "p50", "p90", "p99", "p99.9", "max"
        );
        for (rpc, histogram) in &self.tally.latency_us {
            let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1_000.0;
            println!(
                "  {:<17} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                rpc,
                ms(0.5),
                ms(0.9),
                ms(0.99),
                ms(0.999),
                histogram.max() as f64 / 1_000.0
            );
        }
        println!("  {:<44} {:>10}", "outcome", "count");
        for (outcome, count) in &self.tally.outcomes {
            println!("  {outcome:<44} {count:>10}");
        }
    }

    pub fn to_json(&self) -> Value {
        let latency: serde_json::Map<String, Value> = self
            .tally
            .latency_us
            .iter()
            .map(|(rpc, h)| {
                let ms = |q: f64| h.value_at_quantile(q) as f64 / 1_000.0;
                (
                    rpc.to_string(),
                    json!({"p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "p99_9_ms": ms(0.999), "max_ms": h.max() as f64 / 1_000.0}),
                )
            })
            .collect();
        json!({
            "requests": self.tally.requests(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "requests_per_s": self.requests_per_s(),
            "latency": latency,
            "outcomes": self.tally.outcomes,
            "server_cpu_s": self.server_cpu.map(|cpu| cpu.as_secs_f64()),
            "server_cpu_us_per_request": self.server_cpu_us_per_request(),
        })
    }
}
