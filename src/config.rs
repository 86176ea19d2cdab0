//! Every limit and tunable of prenota in one place, with units in the names, and the
//! `prenota.toml` file that sets them (with the access tokens).
//!
//! Must not import tonic or sled: each layer reads the numbers it needs from here.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::ids::RegionId;

/// Upper bounds on everything a client can make the server hold, scan or write.
/// In `prenota.toml` under `[limits]`; a missing key keeps its default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Length of site, region and service ids (characters of `[A-Za-z0-9_-]`).
    pub id_length_max: usize,
    /// Length of a client `request_id` (printable ASCII).
    pub request_id_length_max: usize,
    /// Length of a citizen id as the frontend sends it (printable ASCII, hashed at once).
    pub citizen_id_length_max: usize,
    /// Length of a site's display name (characters).
    pub site_name_length_max: usize,
    /// `page_size` used when a request gives none.
    pub page_size_default: u32,
    /// Largest `page_size` accepted.
    pub page_size_max: u32,
    /// Span of a search when the request gives no `to`.
    pub search_range_days_default: u32,
    /// Largest span `to - from` of one search.
    pub search_range_days_max: u32,
    /// Largest span `last_day - first_day + 1` of one published schedule.
    pub publish_days_max: u32,
    /// Most slots one `PublishSchedule` may describe.
    pub publish_slots_max: usize,
    /// Most opening-hours entries in one schedule.
    pub opening_hours_per_schedule_max: usize,
    /// Longest slot.
    pub slot_minutes_max: u32,
    /// Largest capacity of one slot.
    pub capacity_per_slot_max: u32,
    /// Active bookings one citizen may hold per service.
    pub max_active_per_citizen: u32,
    /// Most client writes folded into one group commit (one flush + fdatasync).
    pub commit_batch_writes_max: usize,
    /// Writes waiting for the committer before new ones are refused as overload.
    pub commit_queue_depth: usize,
    /// Bookings buffered between the store scan and a slow `ExportBookings` reader.
    pub export_channel_depth: usize,
    /// Largest decoded gRPC request.
    pub message_size_bytes_max: usize,
    /// sled's page cache. sled treats it as a soft hint and its resident memory grows to a
    /// multiple of it under heavy writes, so it is set explicitly (sled's default: 1 GiB).
    pub store_cache_bytes: u64,
    /// A hold's lifetime when the request gives none.
    pub hold_ttl_seconds_default: u32,
    /// Longest hold a client may ask for.
    pub hold_ttl_seconds_max: u32,
    /// How often the sweeper returns the places of expired holds.
    pub hold_sweep_interval_ms: u64,
    /// Most holds one sweep expires (one group commit); the rest wait for the next tick.
    pub hold_sweep_batch_max: usize,
    /// Most rows in one `ImportCapacity` stream.
    pub import_rows_max: usize,
    /// Most slots one import may create or change in total.
    pub import_slots_max: usize,
    /// Most row errors reported for a refused import (the rest are counted).
    pub import_errors_reported_max: usize,
    /// Length of a closure's reason (characters), shown to citizens.
    pub close_reason_length_max: usize,
    /// Booking attempts (Book, HoldSlot, RescheduleBooking) one citizen may make per
    /// minute, in a burst or spread out; 0 turns the limit off.
    pub rate_citizen_attempts_per_min: u32,
    /// Requests one token may make per second (burst the same); 0 turns the limit off.
    pub rate_token_requests_per_s: u32,
    /// How often the per-citizen limiter forgets citizens who are back to a full quota.
    pub rate_limiter_retain_interval_ms: u64,
    /// Requests being served at once, over every connection; beyond it requests are
    /// refused at once with UNAVAILABLE / OVERLOADED (health is never refused).
    pub in_flight_requests_max: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub streams_per_connection_max: u32,
    /// Streams a client may reset before being answered, before the connection is
    /// closed (the "rapid reset" attack).
    pub pending_reset_streams_max: usize,
    /// Longest time a request may take before it is answered DEADLINE_EXCEEDED.
    pub request_timeout_ms: u64,
    /// How often the gauges (per site, live holds, store size) are refreshed.
    pub metrics_refresh_interval_ms: u64,
    /// Sites with their own gauges (in site-id order); bounds the metrics' label set.
    pub metrics_site_gauges_max: usize,
    /// Group commits an online backup may fall behind by while it scans the store; past
    /// it the backup fails (and serving goes on untouched).
    pub backup_changes_buffered_max: usize,
    /// How long start-up waits for the data dir's lock (a previous process, or sled's
    /// I/O threads of a just-closed store, may still hold it) before refusing.
    pub data_dir_lock_wait_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        DEFAULT_LIMITS.clone()
    }
}

/// The defaults, as a constant so the checks below run at compile time.
pub const DEFAULT_LIMITS: Limits = Limits {
    id_length_max: 64,
    request_id_length_max: 128,
    citizen_id_length_max: 128,
    site_name_length_max: 200,
    page_size_default: 50,
    page_size_max: 500,
    search_range_days_default: 31,
    search_range_days_max: 366,
    publish_days_max: 366,
    publish_slots_max: 100_000,
    opening_hours_per_schedule_max: 64,
    slot_minutes_max: 1_440,
    capacity_per_slot_max: 10_000,
    max_active_per_citizen: 1,
    commit_batch_writes_max: 4_096,
    commit_queue_depth: 65_536,
    export_channel_depth: 256,
    message_size_bytes_max: 4 * 1024 * 1024,
    hold_ttl_seconds_default: 300,
    hold_ttl_seconds_max: 1_800,
    hold_sweep_interval_ms: 250,
    hold_sweep_batch_max: 4_096,
    import_rows_max: 200_000,
    import_slots_max: 2_000_000,
    import_errors_reported_max: 100,
    close_reason_length_max: 200,
    rate_citizen_attempts_per_min: 120,
    rate_token_requests_per_s: 0,
    rate_limiter_retain_interval_ms: 10_000,
    in_flight_requests_max: 4_096,
    streams_per_connection_max: 1_024,
    pending_reset_streams_max: 64,
    request_timeout_ms: 30_000,
    metrics_refresh_interval_ms: 5_000,
    metrics_site_gauges_max: 10_000,
    backup_changes_buffered_max: 65_536,
    data_dir_lock_wait_ms: 5_000,
    store_cache_bytes: 1024 * 1024 * 1024,
};

const _: () = {
    let l = &DEFAULT_LIMITS;
    assert!(l.page_size_default >= 1 && l.page_size_default <= l.page_size_max);
    assert!(l.search_range_days_default <= l.search_range_days_max);
    assert!(l.max_active_per_citizen >= 1);
    assert!(l.commit_batch_writes_max >= 1 && l.commit_batch_writes_max <= l.commit_queue_depth);
    // Capacity, taken and pending share one 64-bit atomic word, 21 bits each.
    assert!(l.capacity_per_slot_max <= crate::domain::slot_counter::COUNTER_FIELD_MAX);
    assert!(
        l.hold_ttl_seconds_default >= 1 && l.hold_ttl_seconds_default <= l.hold_ttl_seconds_max
    );
    assert!(l.hold_sweep_batch_max >= 1 && l.import_errors_reported_max >= 1);
    assert!(l.slot_minutes_max <= 24 * 60);
    assert!(l.export_channel_depth >= 1);
    assert!(l.metrics_refresh_interval_ms >= 100 && l.backup_changes_buffered_max >= 1);
};

impl Limits {
    /// The checks of the defaults above, for limits read from a file: every problem.
    pub fn problems(&self) -> Vec<String> {
        let l = self;
        let mut problems = Vec::new();
        let mut need = |ok: bool, what: &str| {
            if !ok {
                problems.push(format!("limits: {what}"));
            }
        };
        need(l.id_length_max >= 1, "id_length_max must be at least 1");
        need(
            l.request_id_length_max >= 1 && l.citizen_id_length_max >= 1,
            "request_id_length_max and citizen_id_length_max must be at least 1",
        );
        need(
            l.page_size_default >= 1 && l.page_size_default <= l.page_size_max,
            "page_size_default must be between 1 and page_size_max",
        );
        need(
            l.search_range_days_default >= 1
                && l.search_range_days_default <= l.search_range_days_max,
            "search_range_days_default must be between 1 and search_range_days_max",
        );
        need(
            l.publish_days_max >= 1,
            "publish_days_max must be at least 1",
        );
        need(
            l.publish_slots_max >= 1,
            "publish_slots_max must be at least 1",
        );
        need(
            l.slot_minutes_max >= 1 && l.slot_minutes_max <= 24 * 60,
            "slot_minutes_max must be between 1 and 1440",
        );
        need(
            l.capacity_per_slot_max >= 1
                && l.capacity_per_slot_max <= crate::domain::slot_counter::COUNTER_FIELD_MAX,
            "capacity_per_slot_max must be between 1 and 2097151 (21 bits)",
        );
        need(
            l.max_active_per_citizen >= 1,
            "max_active_per_citizen must be at least 1",
        );
        need(
            l.commit_batch_writes_max >= 1 && l.commit_batch_writes_max <= l.commit_queue_depth,
            "commit_batch_writes_max must be between 1 and commit_queue_depth",
        );
        need(
            l.export_channel_depth >= 1,
            "export_channel_depth must be at least 1",
        );
        need(
            l.metrics_refresh_interval_ms >= 100,
            "metrics_refresh_interval_ms must be at least 100",
        );
        need(
            l.backup_changes_buffered_max >= 1,
            "backup_changes_buffered_max must be at least 1",
        );
        need(
            l.message_size_bytes_max >= 64 * 1024,
            "message_size_bytes_max must be at least 65536",
        );
        need(
            l.hold_ttl_seconds_default >= 1 && l.hold_ttl_seconds_default <= l.hold_ttl_seconds_max,
            "hold_ttl_seconds_default must be between 1 and hold_ttl_seconds_max",
        );
        need(
            l.hold_sweep_interval_ms >= 10,
            "hold_sweep_interval_ms must be at least 10",
        );
        need(
            l.hold_sweep_batch_max >= 1 && l.import_errors_reported_max >= 1,
            "hold_sweep_batch_max and import_errors_reported_max must be at least 1",
        );
        need(
            l.import_rows_max >= 1 && l.import_slots_max >= 1,
            "import_rows_max and import_slots_max must be at least 1",
        );
        need(
            l.close_reason_length_max >= 1,
            "close_reason_length_max must be at least 1",
        );
        need(
            l.rate_limiter_retain_interval_ms >= 100,
            "rate_limiter_retain_interval_ms must be at least 100",
        );
        need(
            l.in_flight_requests_max >= 1 && l.streams_per_connection_max >= 1,
            "in_flight_requests_max and streams_per_connection_max must be at least 1",
        );
        need(
            l.request_timeout_ms >= 100,
            "request_timeout_ms must be at least 100",
        );
        problems
    }
}

/// What a token may call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// BookingService.
    Frontend,
    /// CapacityService, for the sites of its `regions` only.
    Authority,
    /// Everything.
    Admin,
}

/// A token as written in `prenota.toml`: never the token itself, only its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds it, for logs and the audit trail.
    pub name: String,
    /// Hex SHA-256 of the token (`prenota config hash-token` prints it).
    pub sha256: String,
    pub role: Role,
    /// Required for `authority`, empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
}

/// A checked token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub name: String,
    pub sha256: [u8; 32],
    pub role: Role,
    pub regions: BTreeSet<RegionId>,
}

/// SHA-256 of a bearer token, as kept in the configuration.
pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * index..2 * index + 2], 16).ok()?;
    }
    Some(out)
}

/// `[server]` in `prenota.toml`; flags and `PRENOTA_*` variables override it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    /// Where Prometheus scrapes `GET /metrics` (an address, or `off`).
    pub metrics_listen: Option<String>,
    /// Serve a non-loopback address without tokens. Never do this in production.
    pub insecure_no_auth: bool,
    /// PEM certificate chain and private key: serve TLS only.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: also require a client certificate signed by one (mTLS).
    pub tls_client_ca: Option<PathBuf>,
}

/// The whole `prenota.toml`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    pub server: ServerSection,
    pub limits: Limits,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<TokenEntry>,
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// `PRENOTA_LIMITS_<NAME>=<value>` overrides `[limits] <name>` (e.g.
    /// `PRENOTA_LIMITS_IN_FLIGHT_REQUESTS_MAX=512`); an unknown name or a bad value is an error.
    pub fn apply_env(
        &mut self,
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<(), String> {
        const PREFIX: &str = "PRENOTA_LIMITS_";
        let mut table = toml::Table::try_from(&self.limits).map_err(|e| e.to_string())?;
        let mut changed = false;
        for (name, value) in vars {
            let Some(key) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            if !table.contains_key(&key) {
                return Err(format!("{name}: there is no limit named {key}"));
            }
            let parsed: toml::Value = value
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|_| format!("{name}: {value:?} is not a whole number"))?;
            table.insert(key, parsed);
            changed = true;
        }
        if changed {
            self.limits = table
                .try_into()
                .map_err(|e: toml::de::Error| e.to_string())?;
        }
        Ok(())
    }

    /// Checks everything and builds the runtime configuration; lists every problem.
    pub fn check(&self) -> Result<Config, Vec<String>> {
        let mut problems = self.limits.problems();
        let mut tokens = Vec::new();
        let mut names = BTreeSet::new();
        let mut hashes = BTreeSet::new();
        for (index, entry) in self.tokens.iter().enumerate() {
            let at = format!("tokens[{index}] ({:?})", entry.name);
            if entry.name.trim().is_empty() {
                problems.push(format!("{at}: name must not be empty"));
            } else if !names.insert(entry.name.clone()) {
                problems.push(format!("{at}: another token has this name"));
            }
            let sha256 = parse_sha256(&entry.sha256);
            match sha256 {
                None => problems.push(format!(
                    "{at}: sha256 must be 64 hex digits (prenota config hash-token prints it)"
                )),
                Some(hash) if !hashes.insert(hash) => {
                    problems.push(format!("{at}: another token has this sha256"))
                }
                Some(_) => {}
            }
            let mut regions = BTreeSet::new();
            for region in &entry.regions {
                match RegionId::parse("regions", region, self.limits.id_length_max) {
                    Ok(region) => {
                        regions.insert(region);
                    }
                    Err(violation) => {
                        problems.push(format!("{at}: region {region:?} {}", violation.description))
                    }
                }
            }
            match (entry.role, entry.regions.is_empty()) {
                (Role::Authority, true) => {
                    problems.push(format!("{at}: an authority token needs its regions"))
                }
                (Role::Frontend | Role::Admin, false) => {
                    problems.push(format!("{at}: only authority tokens have regions"))
                }
                _ => {}
            }
            if let Some(sha256) = sha256 {
                tokens.push(Token {
                    name: entry.name.clone(),
                    sha256,
                    role: entry.role,
                    regions,
                });
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Config {
            limits: self.limits.clone(),
            citizen_hash_key: None,
            tokens,
            tls: None,
        })
    }
}

/// Protected mode: without tokens only loopback addresses are served, unless the
/// operator insists. Returns the warning to print loudly, if any.
pub fn check_listen(
    listen: SocketAddr,
    has_tokens: bool,
    insecure_no_auth: bool,
) -> Result<Option<String>, String> {
    match (has_tokens, listen.ip().is_loopback(), insecure_no_auth) {
        (true, _, _) => Ok(None),
        (false, true, _) => Ok(Some(
            "OPEN MODE: no tokens are configured, so anyone who can reach this loopback \
             address may book and change capacity. Configure [[tokens]] in prenota.toml \
             before serving anything else."
                .to_string(),
        )),
        (false, false, true) => Ok(Some(format!(
            "INSECURE: serving {listen} with no tokens (--insecure-no-auth): anyone who can \
             reach it may book and change capacity."
        ))),
        (false, false, false) => Err(format!(
            "refusing to listen on {listen}: no tokens are configured, so prenota runs in \
             open mode and serves loopback addresses only (127.0.0.1, ::1). Configure \
             [[tokens]] in prenota.toml, or pass --insecure-no-auth to override"
        )),
    }
}

/// TLS material, read from the files `[server]` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPem {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// Client certificates must be signed by one of these (mTLS).
    pub client_ca: Option<Vec<u8>>,
}

impl TlsPem {
    /// Reads the files; both or neither of cert and key, a client CA only with them.
    pub fn read(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Result<Option<Self>, String> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        match (cert, key) {
            (None, None) if client_ca.is_some() => {
                Err("tls_client_ca needs tls_cert and tls_key".into())
            }
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(Self {
                cert: read(cert)?,
                key: read(key)?,
                client_ca: client_ca.map(read).transpose()?,
            })),
            _ => Err("tls_cert and tls_key go together".into()),
        }
    }
}

/// Server configuration, checked: limits, tokens and TLS.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub limits: Limits,
    /// Key of the citizen-id HMAC. `None`: generated once and kept in the data dir.
    pub citizen_hash_key: Option<[u8; 32]>,
    /// Bearer tokens. None: open mode (loopback only).
    pub tokens: Vec<Token>,
    /// Serve TLS (and require client certificates, with a client CA).
    pub tls: Option<TlsPem>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_variables_override_limits() {
        let mut file = ConfigFile::default();
        let vars = [
            ("PRENOTA_LIMITS_IN_FLIGHT_REQUESTS_MAX", "512"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        file.apply_env(vars.into_iter()).unwrap();
        assert_eq!(file.limits.in_flight_requests_max, 512);
        let typo = [("PRENOTA_LIMITS_IN_FLIGHT".to_string(), "1".to_string())];
        assert!(file.apply_env(typo.into_iter()).is_err());
        let bad = [(
            "PRENOTA_LIMITS_PAGE_SIZE_MAX".to_string(),
            "lots".to_string(),
        )];
        assert!(file.apply_env(bad.into_iter()).is_err());
    }

    #[test]
    fn protected_mode_serves_loopback_only_without_tokens() {
        let public: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let loopback: SocketAddr = "[::1]:50051".parse().unwrap();
        assert!(check_listen(public, false, false).is_err());
        assert!(check_listen(public, false, true).unwrap().is_some());
        assert!(check_listen(loopback, false, false).unwrap().is_some());
        assert_eq!(check_listen(public, true, false), Ok(None));
    }

    #[test]
    fn a_file_sets_limits_and_tokens_and_every_problem_is_listed() {
        let good = format!(
            r#"
[server]
listen = "127.0.0.1:6000"

[limits]
page_size_max = 100

[[tokens]]
name = "lazio"
sha256 = "{}"
role = "authority"
regions = ["lazio"]
"#,
            hex(&token_sha256("secret"))
        );
        let file: ConfigFile = toml::from_str(&good).unwrap();
        let config = file.check().unwrap();
        assert_eq!(config.limits.page_size_max, 100);
        assert_eq!(
            config.limits.page_size_default,
            DEFAULT_LIMITS.page_size_default
        );
        assert_eq!(config.tokens[0].sha256, token_sha256("secret"));

        let bad = r#"
[limits]
page_size_default = 900

[[tokens]]
name = "x"
sha256 = "abc"
role = "authority"

[[tokens]]
name = "x"
sha256 = "abc"
role = "frontend"
regions = ["no such"]
"#;
        let problems = toml::from_str::<ConfigFile>(bad)
            .unwrap()
            .check()
            .unwrap_err();
        assert_eq!(problems.len(), 7, "{problems:#?}");
        assert!(toml::from_str::<ConfigFile>("[limits]\nnot_a_limit = 1").is_err());
    }
}
