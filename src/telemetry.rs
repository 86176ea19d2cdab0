//! What operators see: the Prometheus metrics (every name, unit and bucket in one
//! place) and the log format.
//!
//! Labels are bounded: gRPC service/method/code, outcome reasons, limiter names and
//! site/region ids (at most `metrics_site_gauges_max` sites). Never a citizen, a token or
//! a booking id.
//!
//! The per-site gauges are rendered here rather than recorded: the recorder can drop no
//! series, so a site past `metrics_site_gauges_max`, or its old `region_id` after it
//! moved, stayed on the page with its last values. [`set_site_gauges`] replaces them
//! at each refresh, and the metrics port appends [`site_gauges`] to the recorder's page.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::domain::catalog::{Site, Totals};

/// Requests answered, by `grpc_service`, `grpc_method`, `grpc_code`.
pub const GRPC_HANDLED: &str = "grpc_server_handled_total";
/// Time from a request's arrival to the end of its response, by `grpc_service`, `grpc_method`.
pub const GRPC_HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
/// Book, CancelBooking and RescheduleBooking by `command` and `outcome` (`OK`, the
/// `ErrorInfo` reason, or `REPLAYED`: answered with an earlier outcome).
pub const BOOKINGS: &str = "prenota_bookings_total";
/// HoldSlot by `outcome` (as above).
pub const HOLDS: &str = "prenota_holds_total";
/// Holds expired by the sweeper.
pub const HOLDS_EXPIRED: &str = "prenota_holds_expired_total";
/// Queue tickets admitted by the admission step (queued releases).
pub const QUEUE_ADMISSIONS: &str = "prenota_queue_admissions_total";
/// Offers made by the campaign matcher.
pub const CAMPAIGN_OFFERS: &str = "prenota_campaign_offers_total";
/// Seconds from the first place returned since the matcher last made offers to the
/// step that makes offers again (how long a freed place waits for its next offer).
pub const CAMPAIGN_REFILL_SECONDS: &str = "prenota_campaign_refill_seconds";
/// Live holds right now.
pub const HOLDS_LIVE: &str = "prenota_holds_live";
/// `CheckIn`s answered `CHECK_IN_CODE_WRONG`.
pub const CHECK_IN_CODES_WRONG: &str = "prenota_check_in_codes_wrong_total";
/// Booking references drawn again because the first draw was in use.
pub const REFERENCE_COLLISIONS: &str = "prenota_reference_collisions_total";
/// Requests refused by a rate limiter, by `limiter` (`citizen`, `citizen_reads`, `token`,
/// `anonymous`, `check_in`, `watch_snapshot`).
pub const RATE_LIMITED: &str = "prenota_rate_limited_total";
/// Keys a rate limiter tracks, by `limiter`.
pub const RATE_LIMITER_KEYS: &str = "prenota_rate_limiter_keys";
/// Requests shed (UNAVAILABLE / OVERLOADED) at the in-flight limit, past the
/// reflection, health watch or import pools (or a peer's or its IPv6 /48's share of the
/// health watches), or past what one-message calls may hold until answered.
pub const SHED: &str = "prenota_shed_total";
/// Calls whose message had not all arrived within `message_receive_timeout_ms` of their
/// headers (answered DEADLINE_EXCEEDED): slow or stalled senders.
pub const MESSAGES_LATE: &str = "prenota_messages_late_total";
/// Connections closed at accept, by `limit`: `connections_max` (that many were open),
/// `connections_per_peer_max` (that many were open from the same peer),
/// `peer_shares_per_ipv6_48_max` (its IPv6 /48's share was open) or `proxy_protocol` (a
/// listed load balancer's connection with a bad PROXY header).
pub const CONNECTIONS_REFUSED: &str = "prenota_connections_refused_total";
/// Connections closed because a reply on them waited unwritten for
/// `reply_write_timeout_ms` (a client that grants no window or reads nothing).
pub const CONNECTIONS_STALLED: &str = "prenota_connections_stalled_total";
/// Writes in one group commit.
pub const COMMIT_BATCH_WRITES: &str = "prenota_commit_batch_writes";
/// Client requests (callers) in one group commit.
pub const COMMIT_BATCH_REQUESTS: &str = "prenota_commit_batch_requests";
/// Ed25519 signatures of citizen assertions verified together in one batch.
pub const ASSERTION_BATCH_SIGNATURES: &str = "prenota_assertion_batch_signatures";
/// sled `apply_batch` time per group commit.
pub const COMMIT_APPLY_SECONDS: &str = "prenota_commit_apply_seconds";
/// sled `flush` time per group commit.
pub const COMMIT_FLUSH_SECONDS: &str = "prenota_commit_flush_seconds";
/// `fdatasync` time per group commit.
pub const COMMIT_FSYNC_SECONDS: &str = "prenota_commit_fsync_seconds";
/// Group commits that failed (the store then refuses every write until restart).
pub const COMMIT_FAILURES: &str = "prenota_commit_failures_total";
/// 1 while the store accepts writes, 0 after a storage error.
pub const STORE_HEALTHY: &str = "prenota_store_healthy";
/// The store's size on disk.
pub const STORE_DISK_BYTES: &str = "prenota_store_disk_bytes";
/// 1 while health says SERVING (recovered, store healthy, not shutting down).
pub const SERVING: &str = "prenota_serving";
/// How long the last start-up recovery took.
pub const RECOVERY_SECONDS: &str = "prenota_recovery_seconds";
/// Records the last recovery rebuilt, by `kind` (`slots`, `confirmed`, `cancelled`,
/// `live_holds`, `request_records`, `confirmed_in_closed_slots`).
pub const RECOVERED_RECORDS: &str = "prenota_recovered_records";
/// Records retention forgot or deleted, by kind.
pub const RETENTION_DELETED: &str = "prenota_retention_deleted_total";
/// How far retention's time is behind the clock (after a start on a clock ahead of the
/// store's newest write, or a clock set ahead: `domain::retention::retention_time`).
pub const RETENTION_BEHIND_CLOCK_SECONDS: &str = "prenota_retention_behind_clock_seconds";
/// The `kind` labels of `RETENTION_DELETED`.
pub const RETENTION_KINDS: [&str; 11] = [
    "request_records",
    "holds",
    "bookings",
    "slots",
    "audit_entries",
    "authority_requests",
    "events",
    "releases",
    "tickets",
    "campaigns",
    "registrations",
];
/// Finished requests remembered for idempotency.
pub const REQUEST_RECORDS: &str = "prenota_request_records";
/// Per site, by `site_id` and `region_id`: slots, closed slots, open capacity,
/// bookings taking a place and live holds (rendered by [`site_gauges`]).
pub const SITE_SLOTS: &str = "prenota_site_slots";
pub const SITE_SLOTS_CLOSED: &str = "prenota_site_slots_closed";
pub const SITE_CAPACITY: &str = "prenota_site_capacity";
pub const SITE_BOOKED: &str = "prenota_site_booked";
pub const SITE_HELD: &str = "prenota_site_held";
/// Sites in the catalog (all of them, also those beyond `metrics_site_gauges_max`).
pub const SITES: &str = "prenota_sites";
pub const TLS_CERTIFICATE_EXPIRY: &str = "prenota_tls_certificate_expiry_timestamp_seconds";

/// Latency buckets (seconds) of request handling.
const REQUEST_SECONDS_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets (seconds) of a freed place's wait for its next offer (matching runs every
/// `campaign_step_interval_ms`).
const REFILL_SECONDS_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0,
];
/// Buckets (seconds) of the store's apply, flush and fdatasync steps.
const DISK_SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Buckets of group-commit sizes (writes or requests per commit).
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0,
];

fn builder() -> Result<PrometheusBuilder, String> {
    let set = |builder: PrometheusBuilder, name: &str, buckets: &[f64]| {
        builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
            .map_err(|e| e.to_string())
    };
    let mut builder = PrometheusBuilder::new();
    builder = set(builder, GRPC_HANDLING_SECONDS, REQUEST_SECONDS_BUCKETS)?;
    builder = set(builder, CAMPAIGN_REFILL_SECONDS, REFILL_SECONDS_BUCKETS)?;
    for name in [
        COMMIT_APPLY_SECONDS,
        COMMIT_FLUSH_SECONDS,
        COMMIT_FSYNC_SECONDS,
    ] {
        builder = set(builder, name, DISK_SECONDS_BUCKETS)?;
    }
    for name in [
        COMMIT_BATCH_WRITES,
        COMMIT_BATCH_REQUESTS,
        ASSERTION_BATCH_SIGNATURES,
    ] {
        builder = set(builder, name, BATCH_SIZE_BUCKETS)?;
    }
    Ok(builder)
}

/// Installs the process-wide recorder and serves `GET /metrics` on `listen` (port 0
/// picks a free port) within `bounds` (`metrics_listener`). Returns the address served.
/// Must run inside the tokio runtime.
pub fn serve_metrics(
    listen: SocketAddr,
    bounds: crate::metrics_listener::Bounds,
) -> Result<SocketAddr, String> {
    let cannot = |e: std::io::Error| format!("cannot serve metrics on {listen}: {e}");
    let listener = std::net::TcpListener::bind(listen).map_err(cannot)?;
    listener.set_nonblocking(true).map_err(cannot)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(cannot)?;
    let address = listener.local_addr().map_err(cannot)?;
    let recorder = builder()?.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|_| "a metrics recorder is already installed".to_string())?;
    tokio::spawn(crate::metrics_listener::serve(
        listener,
        (handle.clone(), site_gauges),
        bounds,
    ));
    spawn_upkeep(handle);
    describe();
    register_rare_counters();
    Ok(address)
}

/// Installs the process-wide recorder without a listener (the load generator renders
/// it itself). Must run inside the tokio runtime.
pub fn record_only() -> Result<PrometheusHandle, String> {
    let handle = builder()?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    spawn_upkeep(handle.clone());
    describe();
    register_rare_counters();
    Ok(handle)
}

/// Counters of rare events exist at 0 from the start (with every label they take), so
/// a dashboard or an alert tells "never happened" from "missing".
fn register_rare_counters() {
    for name in [
        HOLDS_EXPIRED,
        SHED,
        MESSAGES_LATE,
        COMMIT_FAILURES,
        QUEUE_ADMISSIONS,
        CAMPAIGN_OFFERS,
        CHECK_IN_CODES_WRONG,
        REFERENCE_COLLISIONS,
        CONNECTIONS_STALLED,
    ] {
        metrics::counter!(name).increment(0);
    }
    for limit in [
        "connections_max",
        "connections_per_peer_max",
        "peer_shares_per_ipv6_48_max",
        "proxy_protocol",
    ] {
        metrics::counter!(CONNECTIONS_REFUSED, "limit" => limit).increment(0);
    }
    for limiter in [
        "token",
        "citizen",
        "citizen_reads",
        "anonymous",
        "check_in",
        "watch_snapshot",
    ] {
        metrics::counter!(RATE_LIMITED, "limiter" => limiter).increment(0);
    }
    for kind in RETENTION_KINDS {
        metrics::counter!(RETENTION_DELETED, "kind" => kind).increment(0);
    }
}

/// Histograms keep raw samples until a scrape or an upkeep folds them into buckets:
/// without a scraper, upkeep keeps their memory bounded.
fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

fn describe() {
    // process_cpu_seconds_total and the other process_* metrics of Prometheus' clients.
    metrics_process::Collector::default().describe();
    describe_requests();
    describe_store();
    describe_sites();
}

/// What callers asked and how they were answered, limited or shed.
fn describe_requests() {
    describe_counter!(
        GRPC_HANDLED,
        "gRPC requests answered, by service, method and status code"
    );
    describe_histogram!(
        GRPC_HANDLING_SECONDS,
        Unit::Seconds,
        "time from a request's arrival to the end of its response"
    );
    describe_counter!(
        BOOKINGS,
        "Book, CancelBooking and RescheduleBooking by command and outcome (OK, the error reason, or REPLAYED: a retry answered with the first outcome)"
    );
    describe_counter!(
        HOLDS,
        "HoldSlot by outcome (OK, the error reason, or REPLAYED)"
    );
    describe_counter!(HOLDS_EXPIRED, "holds expired by the sweeper");
    describe_counter!(
        QUEUE_ADMISSIONS,
        "queue tickets admitted to book (queued releases)"
    );
    describe_counter!(CAMPAIGN_OFFERS, "offers made by the campaign matcher");
    describe_histogram!(
        CAMPAIGN_REFILL_SECONDS,
        Unit::Seconds,
        "from the first place returned since the matcher's last offers to its next offers"
    );
    describe_gauge!(HOLDS_LIVE, "live holds");
    describe_counter!(
        CHECK_IN_CODES_WRONG,
        "CheckIn calls answered CHECK_IN_CODE_WRONG"
    );
    describe_counter!(
        REFERENCE_COLLISIONS,
        "booking references drawn again because the first draw was in use"
    );
    describe_counter!(
        RATE_LIMITED,
        "requests refused by a rate limiter, by limiter"
    );
    describe_gauge!(
        RATE_LIMITER_KEYS,
        "keys tracked by a rate limiter, by limiter"
    );
    describe_counter!(
        SHED,
        "requests shed (OVERLOADED) at the in-flight limit, past the reflection, health watch or import pools, or past what one-message calls may hold until answered (receiving_bytes_max, receiving_bytes_per_peer_max, health_receiving_bytes_max)"
    );
    describe_counter!(
        MESSAGES_LATE,
        "calls whose message had not all arrived within message_receive_timeout_ms (answered DEADLINE_EXCEEDED)"
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "connections closed at accept, by the limit that refused them"
    );
    describe_counter!(
        CONNECTIONS_STALLED,
        "connections closed because a reply on them waited unwritten for reply_write_timeout_ms"
    );
    describe_histogram!(
        ASSERTION_BATCH_SIGNATURES,
        "citizen assertion signatures (Ed25519) verified in one batch"
    );
}

/// The store: group commits, health, recovery and retention.
fn describe_store() {
    describe_histogram!(COMMIT_BATCH_WRITES, "writes per group commit");
    describe_histogram!(COMMIT_BATCH_REQUESTS, "client requests per group commit");
    describe_histogram!(
        COMMIT_APPLY_SECONDS,
        Unit::Seconds,
        "sled apply_batch time per group commit"
    );
    describe_histogram!(
        COMMIT_FLUSH_SECONDS,
        Unit::Seconds,
        "sled flush time per group commit"
    );
    describe_histogram!(
        COMMIT_FSYNC_SECONDS,
        Unit::Seconds,
        "fdatasync time per group commit"
    );
    describe_counter!(COMMIT_FAILURES, "group commits that failed");
    describe_gauge!(STORE_HEALTHY, "1 while the store accepts writes");
    describe_gauge!(STORE_DISK_BYTES, Unit::Bytes, "the store's size on disk");
    describe_gauge!(SERVING, "1 while health says SERVING");
    describe_gauge!(
        RECOVERY_SECONDS,
        Unit::Seconds,
        "duration of the last start-up recovery"
    );
    describe_gauge!(
        RECOVERED_RECORDS,
        "records rebuilt by the last recovery, by kind"
    );
    describe_counter!(
        RETENTION_DELETED,
        "records retention forgot (request_records) or deleted, by kind"
    );
    describe_gauge!(
        RETENTION_BEHIND_CLOCK_SECONDS,
        Unit::Seconds,
        "how far retention's time is behind the clock (it runs at most twice as fast as time passes)"
    );
    describe_gauge!(
        REQUEST_RECORDS,
        "finished requests remembered for idempotency (until request_records_retained_hours)"
    );
}

/// The per-site gauges: name, help, and the value of a site's totals.
type SiteGauge = (&'static str, &'static str, fn(&Totals) -> u64);
const SITE_GAUGES: [SiteGauge; 5] = [
    (SITE_SLOTS, "slots per site", |t| u64::from(t.slots)),
    (SITE_SLOTS_CLOSED, "closed slots per site", |t| {
        u64::from(t.slots_closed)
    }),
    (SITE_CAPACITY, "capacity of the open slots per site", |t| {
        t.capacity
    }),
    (SITE_BOOKED, "bookings taking a place per site", |t| {
        t.booked
    }),
    (SITE_HELD, "live holds per site", |t| t.held),
];

/// The per-site gauges' part of the page, as of the last refresh (shared, not copied:
/// 10,000 sites are several MB).
static SITE_GAUGES_TEXT: Mutex<Option<Arc<str>>> = Mutex::new(None);

/// Replaces the per-site gauges with `sites`' (the first `metrics_site_gauges_max`).
pub fn set_site_gauges(sites: &[(Arc<Site>, Totals)]) {
    let text = Arc::from(site_gauges_text(sites));
    *SITE_GAUGES_TEXT
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(text);
}

/// The per-site gauges in Prometheus' text format (nothing before the first refresh).
pub fn site_gauges() -> Arc<str> {
    let text = SITE_GAUGES_TEXT
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    text.clone().unwrap_or_else(|| Arc::from(""))
}

fn site_gauges_text(sites: &[(Arc<Site>, Totals)]) -> String {
    let mut text = String::new();
    if sites.is_empty() {
        return text; // a family without samples is left out, as the recorder does
    }
    for (name, help, value) in SITE_GAUGES {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (site, totals) in sites {
            let (site_id, region_id) = (site.site_id.as_str(), site.region_id.as_str());
            let _ = writeln!(
                text,
                "{name}{{site_id=\"{}\",region_id=\"{}\"}} {}",
                label_value(site_id),
                label_value(region_id),
                value(totals)
            );
        }
        text.push('\n');
    }
    text
}

/// `value` escaped for a label of the text format (ids cannot hold these: a safeguard).
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The catalog.
fn describe_sites() {
    describe_gauge!(SITES, "sites in the catalog");
    describe_gauge!(
        TLS_CERTIFICATE_EXPIRY,
        Unit::Seconds,
        "when the first of the server's TLS certificates (tls_cert's chain) ends, in Unix seconds (absent without TLS)"
    );
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Colour only on a terminal, and never with `NO_COLOR` set (no-color.org).
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
    std::io::stderr().is_terminal() && !no_color
}

/// What is logged when `RUST_LOG` is unset: `info`, but h2's warnings only at `error`
/// (each is one connection's protocol fault, which a hostile client causes at will: one
/// line per connection would let it fill the log).
pub const DEFAULT_LOG_FILTER: &str = "info,h2=error";

/// Logs to stderr, filtered by `RUST_LOG` (default `DEFAULT_LOG_FILTER`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    // A log line that cannot be written (stderr on a full disk, a log shipper gone) is
    // dropped: tracing-subscriber's own report of it is an `eprintln!`, which panics, so
    // the thread logging died (the store's committer, hanging every write unreported).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_on_stderr())
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// Every metric name above (a test checks the dashboard in `deploy/` uses only these).
pub const ALL: &[&str] = &[
    GRPC_HANDLED,
    GRPC_HANDLING_SECONDS,
    BOOKINGS,
    HOLDS,
    HOLDS_EXPIRED,
    QUEUE_ADMISSIONS,
    CAMPAIGN_OFFERS,
    CAMPAIGN_REFILL_SECONDS,
    HOLDS_LIVE,
    CHECK_IN_CODES_WRONG,
    REFERENCE_COLLISIONS,
    RATE_LIMITED,
    RATE_LIMITER_KEYS,
    SHED,
    MESSAGES_LATE,
    CONNECTIONS_REFUSED,
    CONNECTIONS_STALLED,
    COMMIT_BATCH_WRITES,
    COMMIT_BATCH_REQUESTS,
    ASSERTION_BATCH_SIGNATURES,
    COMMIT_APPLY_SECONDS,
    COMMIT_FLUSH_SECONDS,
    COMMIT_FSYNC_SECONDS,
    COMMIT_FAILURES,
    STORE_HEALTHY,
    STORE_DISK_BYTES,
    SERVING,
    RECOVERY_SECONDS,
    RECOVERED_RECORDS,
    RETENTION_DELETED,
    RETENTION_BEHIND_CLOCK_SECONDS,
    REQUEST_RECORDS,
    SITE_SLOTS,
    SITE_SLOTS_CLOSED,
    SITE_CAPACITY,
    SITE_BOOKED,
    SITE_HELD,
    SITES,
    TLS_CERTIFICATE_EXPIRY,
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::{RegionId, SiteId};

    #[test]
    fn site_gauges_are_one_family_each_with_every_site() {
        assert_eq!(site_gauges_text(&[]), "", "no family without samples");
        let site = |id: &str, region: &str| {
            Arc::new(Site {
                site_id: SiteId::parse("s", id, 64).unwrap(),
                name: String::new(),
                region_id: RegionId::parse("r", region, 64).unwrap(),
                time_zone: chrono_tz::UTC,
            })
        };
        let totals = Totals {
            slots: 3,
            capacity: 7,
            ..Totals::default()
        };
        let text = site_gauges_text(&[
            (site("a", "r1"), totals.clone()),
            (site("b", "r2"), Totals::default()),
        ]);
        let capacity = "# HELP prenota_site_capacity capacity of the open slots per site\n\
            # TYPE prenota_site_capacity gauge\n\
            prenota_site_capacity{site_id=\"a\",region_id=\"r1\"} 7\n\
            prenota_site_capacity{site_id=\"b\",region_id=\"r2\"} 0\n\n";
        assert!(text.contains(capacity), "{text}");
        assert_eq!(text.matches("# TYPE").count(), 5);
        assert_eq!(text.lines().filter(|l| l.contains("site_id=")).count(), 10);
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn the_dashboard_and_the_readme_name_only_metrics_that_exist() {
        let histograms = [
            GRPC_HANDLING_SECONDS,
            CAMPAIGN_REFILL_SECONDS,
            COMMIT_BATCH_WRITES,
            COMMIT_BATCH_REQUESTS,
            ASSERTION_BATCH_SIGNATURES,
            COMMIT_APPLY_SECONDS,
            COMMIT_FLUSH_SECONDS,
            COMMIT_FSYNC_SECONDS,
        ];
        // PostgreSQL tables (the README's "Running on PostgreSQL"), not metrics.
        let tables = [
            "prenota_kv",
            "prenota_lease",
            "prenota_lease_holder",
            "prenota_schema",
        ];
        let known = |name: &str| {
            ALL.contains(&name)
                || tables.contains(&name)
                || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                    name.strip_suffix(suffix)
                        .is_some_and(|base| histograms.contains(&base))
                })
        };
        for (file, text) in [
            (
                "deploy/grafana-dashboard.json",
                include_str!("../deploy/grafana-dashboard.json"),
            ),
            ("README.md", include_str!("../README.md")),
        ] {
            let mut used = 0;
            for start in ["prenota_", "grpc_server_"] {
                for (at, _) in text.match_indices(start) {
                    let name: String = text[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                        .collect();
                    assert!(
                        known(&name),
                        "{file} names {name}, which prenota does not export"
                    );
                    used += 1;
                }
            }
            assert!(used > 10, "{file} names only {used} metrics");
        }
    }
}
