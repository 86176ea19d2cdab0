//! The `prenota.toml` file: the limits it sets (`limits.rs`, re-exported here), the
//! access tokens, the other sections, and flag precedence.
//!
//! Must not import tonic or sled: each layer reads the numbers it needs from here.
//! [`schedule_bounds`] gives `domain::schedule`, which knows no config, its bounds.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hex::FromHex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::citizen_id::{CitizenIds, IdScheme};
use crate::domain::field_violation::FieldViolation;
use crate::domain::ids::{ChannelId, RegionId, SiteId};
use crate::domain::schedule::ScheduleBounds;
pub use crate::limits::{Limits, DEFAULT_LIMITS};

// The limits' ceiling on capacity is the slot counter's field width.
const _: () = assert!(
    crate::limits::CAPACITY_PER_SLOT_CEILING == crate::domain::slot_counter::COUNTER_FIELD_MAX
);

/// How citizen ids are read: the configured scheme and the length bound.
pub fn citizen_ids(config: &Config) -> CitizenIds {
    CitizenIds {
        scheme: config.citizen_id_scheme,
        length_max: config.limits.citizen_id_length_max,
    }
}

/// The bounds `domain::schedule` checks a schedule against.
pub fn schedule_bounds(limits: &Limits) -> ScheduleBounds {
    ScheduleBounds {
        days_max: limits.publish_days_max,
        slot_minutes_max: limits.slot_minutes_max,
        capacity_per_slot_max: limits.capacity_per_slot_max,
        opening_hours_max: limits.opening_hours_per_schedule_max,
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
    /// SiteService (the desk: roster, check-in, no-shows), for its `sites` only.
    Site,
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
    /// Required for `site`, empty otherwise: the sites whose desk it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// How this frontend names citizens; default `asserted` when `[[citizen_issuers]]`
    /// are configured, else `trusted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub citizens: Option<CitizenTrust>,
    /// How this frontend reaches citizens (`web`, `phone`, `desk`, ...; default `web`):
    /// its bookings may take the places a release reserves for its channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

/// How a caller names the citizen it acts for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CitizenTrust {
    /// Every call that names a citizen carries a signed `x-citizen-assertion` from an
    /// identity gateway; the citizen is its `sub`.
    Asserted,
    /// The `citizen_id` sent is taken as is: such a frontend MUST authenticate citizens
    /// itself.
    Trusted,
}

/// How a caller with no `citizens` setting (an open-mode caller too) names citizens:
/// asserted once identity gateways are configured, trusted before.
pub fn default_citizen_trust(issuers_configured: bool) -> CitizenTrust {
    match issuers_configured {
        true => CitizenTrust::Asserted,
        false => CitizenTrust::Trusted,
    }
}

/// `[[citizen_issuers]]` in `prenota.toml`: an identity gateway (SPID, CIE, eIDAS)
/// whose signed assertions name citizens. Several entries with one name: key rotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CitizenIssuerEntry {
    /// The assertions' `iss`.
    pub name: String,
    /// The assertions' `aud` must be this.
    pub audience: String,
    /// An Ed25519 or P-256 public key (SPKI PEM, `-----BEGIN PUBLIC KEY-----`).
    pub public_key_pem: String,
}

/// A checked issuer key: EdDSA for an Ed25519 key, ES256 for a P-256 one.
#[derive(Clone, Debug)]
pub struct CitizenIssuer {
    pub name: String,
    pub audience: String,
    pub algorithm: jsonwebtoken::Algorithm,
    pub key: jsonwebtoken::DecodingKey,
    /// The same key for `ed25519_dalek` (batch verification); `None` for P-256.
    pub ed25519: Option<ed25519_dalek::VerifyingKey>,
}

impl CitizenIssuerEntry {
    fn check(&self, at: &str) -> Result<CitizenIssuer, String> {
        if self.name.trim().is_empty() || self.audience.trim().is_empty() {
            return Err(format!("{at}: name and audience must not be empty"));
        }
        let der = single_public_key(&self.public_key_pem)
            .map_err(|e| format!("{at}: public_key_pem {e}"))?;
        let pem = self.public_key_pem.as_bytes();
        let (algorithm, key) = match jsonwebtoken::DecodingKey::from_ed_pem(pem) {
            Ok(key) => (jsonwebtoken::Algorithm::EdDSA, key),
            Err(_) => match jsonwebtoken::DecodingKey::from_ec_pem(pem) {
                Ok(_) if !is_p256(&der) => {
                    return Err(format!(
                        "{at}: public_key_pem is an elliptic-curve key of another curve than \
                         P-256 (ES256 needs P-256)"
                    ))
                }
                Ok(key) => (jsonwebtoken::Algorithm::ES256, key),
                Err(e) => {
                    return Err(format!(
                        "{at}: public_key_pem is neither an Ed25519 nor a P-256 public key: {e}"
                    ))
                }
            },
        };
        let ed25519 = match algorithm {
            jsonwebtoken::Algorithm::EdDSA => {
                Some(ed25519_key(&key).map_err(|e| format!("{at}: {e}"))?)
            }
            _ => None,
        };
        Ok(CitizenIssuer {
            name: self.name.clone(),
            audience: self.audience.clone(),
            algorithm,
            key,
            ed25519,
        })
    }
}

/// The PEM file `path` that setting `label` names (`--ca`, `sslrootcert`), and the
/// certificates in it; refused, naming both, if it cannot be read, does not parse, or
/// holds none (a CA file without one would leave the server's certificate blamed).
pub fn read_pem_certificates(
    label: &str,
    path: &Path,
) -> Result<(Vec<u8>, Vec<rustls::pki_types::CertificateDer<'static>>), String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("{label} {shown}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{label} {shown}: not PEM certificates: {e}"))?;
    match certs.is_empty() {
        true => Err(format!("{label} {shown}: holds no PEM certificate")),
        false => Ok((pem, certs)),
    }
}

/// The DER of the one public key (SPKI PEM) in `text`: anything more is refused, since
/// a second key, or text after the first, would be silently ignored.
fn single_public_key(text: &str) -> Result<Vec<u8>, String> {
    let blocks = pem::parse_many(text).map_err(|e| format!("is not PEM: {e}"))?;
    let trimmed = text.trim();
    let alone = trimmed.starts_with("-----BEGIN PUBLIC KEY-----")
        && trimmed.ends_with("-----END PUBLIC KEY-----");
    match blocks.as_slice() {
        [block] if block.tag() == "PUBLIC KEY" && alone => Ok(block.contents().to_vec()),
        [] | [_] => Err(
            "must hold one public key (-----BEGIN PUBLIC KEY-----) and nothing \
                         else"
                .into(),
        ),
        many => Err(format!(
            "holds {} PEM blocks: give each key an entry of its own (several entries with \
             one name rotate keys)",
            many.len()
        )),
    }
}

/// Whether an SPKI public key is on the P-256 curve (the only one ES256 uses).
fn is_p256(der: &[u8]) -> bool {
    const P256: spki::ObjectIdentifier = spki::ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
    spki::SubjectPublicKeyInfoRef::try_from(der)
        .is_ok_and(|info| info.algorithm.parameters_oid().is_ok_and(|oid| oid == P256))
}

/// The Ed25519 public key inside a `from_ed_pem` key (its 32 raw bytes).
fn ed25519_key(key: &jsonwebtoken::DecodingKey) -> Result<ed25519_dalek::VerifyingKey, String> {
    let bytes: &[u8; 32] = key
        .try_get_as_bytes()
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or("the Ed25519 public key is not 32 bytes")?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(bytes)
        .map_err(|e| format!("the Ed25519 public key is not a curve point: {e}"))?;
    if key.is_weak() {
        return Err("the Ed25519 public key is weak (of small order): anything verifies".into());
    }
    Ok(key)
}

/// A checked token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub name: String,
    pub sha256: [u8; 32],
    pub role: Role,
    pub regions: BTreeSet<RegionId>,
    /// A `site` token's sites.
    pub sites: BTreeSet<SiteId>,
    pub citizens: CitizenTrust,
    pub channel: ChannelId,
}

/// SHA-256 of a bearer token, as kept in the configuration.
pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
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
    /// Accept tokens over plaintext on a non-loopback address (TLS terminated by a
    /// proxy on the same host or a private link).
    pub insecure_plaintext_tokens: bool,
    /// PEM certificate chain and private key: serve TLS only.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: also require a client certificate signed by one (mTLS).
    pub tls_client_ca: Option<PathBuf>,
    /// Serve gRPC reflection. Default: on in open mode, off once tokens are configured;
    /// with tokens it answers only callers with a valid token.
    pub reflection: Option<bool>,
    /// Answer `OpenDataService` (aggregates only, never a person) without a token too;
    /// anonymous callers share one request quota (`open_data_anonymous_requests_per_s`).
    pub open_data: bool,
    /// The backup key (`prenota backup-key > FILE`): backups are authenticated with it
    /// and seal the citizen hash key under it. Keep it apart from the backups.
    pub backup_key_file: Option<PathBuf>,
    /// Addresses or networks (`10.0.0.0/8`) of the load balancers in front: their
    /// connections must start with a PROXY protocol header (v1 or v2), and count under
    /// the per-peer caps for the client it names (`grpc::connections`).
    pub proxy_protocol_from: Vec<String>,
    /// Addresses or networks of health checkers (the nodes' kubelets, a load balancer
    /// that sends no PROXY header): the health checks of connections from them (or
    /// whose PROXY header names them) take a budget of their own, so others filling
    /// `health_receiving_bytes_max` cannot get them shed (`grpc::receiving`).
    pub health_checks_from: Vec<String>,
}

/// One `proxy_protocol_from` or `health_checks_from` entry: an address (IPv4-mapped
/// ones as IPv4) or a network.
fn listed_network(text: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(address) = text.parse::<std::net::IpAddr>() {
        return Ok(address.to_canonical().into());
    }
    let network: ipnet::IpNet = text
        .parse()
        .map_err(|_| "neither an address (10.0.0.5) nor a network (10.0.1.0/24)".to_string())?;
    if network.trunc() != network {
        let (trunc, address) = (network.trunc(), network.addr());
        let one = network.max_prefix_len();
        return Err(format!("host bits set: {trunc} or {address}/{one}?"));
    }
    let narrowest = match network {
        ipnet::IpNet::V4(_) => 8,
        ipnet::IpNet::V6(v6) if v6.addr().to_ipv4_mapped().is_some() => {
            return Err("write an IPv4 network as IPv4".into())
        }
        ipnet::IpNet::V6(_) => 48,
    };
    if network.prefix_len() < narrowest {
        return Err(format!(
            "wider than /{narrowest}: list the machines' own addresses or subnet"
        ));
    }
    Ok(network)
}

/// The `[server]` list `key` (`proxy_protocol_from`, `health_checks_from`) of
/// `entries`, read (an address is a network of one); an entry that is neither, a
/// network with host bits set (a typo would widen it), or one wider than /8 (IPv4) or
/// /48 (IPv6) (any address in a proxy's may name any client) is a problem.
fn networks(key: &str, entries: &[String], problems: &mut Vec<String>) -> Vec<ipnet::IpNet> {
    let mut networks = Vec::new();
    for (index, text) in entries.iter().enumerate() {
        let at = format!("server.{key}[{index}] ({text:?})");
        match listed_network(text.trim()) {
            Ok(network) => networks.push(network),
            Err(problem) => problems.push(format!("{at}: {problem}")),
        }
    }
    networks
}

pub const DEFAULT_DATA_DIR: &str = "prenota-data";
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50051);
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// `metrics_listen`: an address, or `off`.
pub fn metrics_address(text: &str) -> Result<Option<SocketAddr>, String> {
    match text.trim() {
        "off" => Ok(None),
        address => address.parse().map(Some).map_err(|_| {
            format!("metrics_listen {address:?} is neither an address (host:port) nor `off`")
        }),
    }
}

impl ServerSection {
    /// The precedence of `prenota serve`: a flag (or its `PRENOTA_*` variable), given
    /// as `flags`, wins over this file's value, which wins over the default. The
    /// certificate and key come together: both from the flags when `--tls-cert` is
    /// given, else both from the file. The client CA is the flag's, else the file's: a
    /// certificate given by flag (a rotation) never drops the file's demand for client
    /// certificates.
    pub fn overridden_by(&self, flags: &ServerSection) -> ServerSection {
        let tls_from_flags = flags.tls_cert.is_some();
        let pick = |flag: &Option<PathBuf>, file: &Option<PathBuf>| match tls_from_flags {
            true => flag.clone(),
            false => file.clone(),
        };
        ServerSection {
            data_dir: flags.data_dir.clone().or_else(|| self.data_dir.clone()),
            listen: flags.listen.or(self.listen),
            metrics_listen: flags
                .metrics_listen
                .clone()
                .or_else(|| self.metrics_listen.clone()),
            insecure_no_auth: flags.insecure_no_auth || self.insecure_no_auth,
            insecure_plaintext_tokens: flags.insecure_plaintext_tokens
                || self.insecure_plaintext_tokens,
            tls_cert: pick(&flags.tls_cert, &self.tls_cert),
            tls_key: pick(&flags.tls_key, &self.tls_key),
            tls_client_ca: (flags.tls_client_ca.clone()).or_else(|| self.tls_client_ca.clone()),
            reflection: flags.reflection.or(self.reflection),
            open_data: flags.open_data || self.open_data,
            backup_key_file: flags
                .backup_key_file
                .clone()
                .or_else(|| self.backup_key_file.clone()),
            proxy_protocol_from: self.proxy_protocol_from.clone(), // prenota.toml only
            health_checks_from: self.health_checks_from.clone(),   // prenota.toml only
        }
    }

    /// This section with the defaults of the unset data dir, listen and metrics
    /// addresses filled in.
    pub fn with_defaults(&self) -> ServerSection {
        ServerSection {
            data_dir: Some(self.data_dir()),
            listen: Some(self.listen()),
            metrics_listen: Some(
                self.metrics_listen
                    .clone()
                    .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.to_string()),
            ),
            ..self.clone()
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen.unwrap_or(DEFAULT_LISTEN)
    }

    /// Where to serve metrics, or `None` for `off`.
    pub fn metrics_listen(&self) -> Result<Option<SocketAddr>, String> {
        metrics_address(
            self.metrics_listen
                .as_deref()
                .unwrap_or(DEFAULT_METRICS_LISTEN),
        )
    }
}

/// `[citizens] id_scheme`, as written in `prenota.toml`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdSchemeName {
    /// Ids are used exactly as sent.
    #[default]
    Opaque,
    /// Italian fiscal codes, checked and canonicalised.
    ItFiscalCode,
}

/// `[citizens]` in `prenota.toml`: how citizens are identified.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CitizensSection {
    pub id_scheme: IdSchemeName,
    /// The citizen-id hash key (32 raw bytes, mode 0600; the format of
    /// `DATA_DIR/citizen-hash.key`). Default: that file, made for a new store. Required
    /// with PostgreSQL: every node must hash with the same key.
    pub hash_key_file: Option<PathBuf>,
}

/// `[store] backend`, as written in `prenota.toml`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendName {
    /// The embedded sled store in the data dir (one machine).
    #[default]
    Sled,
    /// PostgreSQL: one active node, hot standbys (PRODUCT.md part F).
    Postgres,
}

/// `[store]` in `prenota.toml`: where durable records live. Its `Debug` leaves the
/// PostgreSQL URL out (it may hold a password).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    pub backend: BackendName,
    /// With `postgres`: a libpq-style URL (`postgres://user:pass@host/db`) or key=value
    /// string. Its `search_path` (`options=-csearch_path=NAME`) picks the schema; its
    /// `sslmode` and `sslrootcert` TLS (`store::postgres_tls`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres_url: Option<String>,
    /// With `postgres`: a standby takes over once the active node has not renewed its
    /// lease for this long. Failover takes about this plus recovery.
    pub lease_ttl_ms: u64,
}

pub const DEFAULT_LEASE_TTL_MS: u64 = 5_000;

impl std::fmt::Debug for StoreSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSection")
            .field("backend", &self.backend)
            .field("postgres_url", &self.postgres_url.as_ref().map(|_| "…"))
            .field("lease_ttl_ms", &self.lease_ttl_ms)
            .finish()
    }
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            backend: BackendName::Sled,
            postgres_url: None,
            lease_ttl_ms: DEFAULT_LEASE_TTL_MS,
        }
    }
}

/// Where and how a node reaches PostgreSQL.
#[derive(Clone)]
pub struct PostgresSettings {
    /// Never logged or printed: it may hold a password.
    pub url: String,
    /// How long a holder may go without renewing before a standby takes over.
    pub lease_ttl: std::time::Duration,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &"…")
            .field("lease_ttl", &self.lease_ttl)
            .finish()
    }
}

/// The store a server opens.
#[derive(Clone, Debug, Default)]
pub enum StoreBackend {
    #[default]
    Sled,
    Postgres(PostgresSettings),
}

impl StoreSection {
    fn check(&self, citizens: &CitizensSection, problems: &mut Vec<String>) -> StoreBackend {
        if !(500..=600_000).contains(&self.lease_ttl_ms) {
            problems.push("[store] lease_ttl_ms must be between 500 and 600000".into());
        }
        match (self.backend, &self.postgres_url) {
            (BackendName::Sled, None) => StoreBackend::Sled,
            (BackendName::Sled, Some(_)) => {
                problems.push("[store] postgres_url is set but backend is not \"postgres\"".into());
                StoreBackend::Sled
            }
            (BackendName::Postgres, None) => {
                problems.push("[store] backend = \"postgres\" needs postgres_url".into());
                StoreBackend::Sled
            }
            (BackendName::Postgres, Some(url)) => {
                if citizens.hash_key_file.is_none() {
                    problems.push(
                        "[store] backend = \"postgres\" needs [citizens] hash_key_file (the \
                         same key on every node)"
                            .into(),
                    );
                }
                StoreBackend::Postgres(PostgresSettings {
                    url: url.clone(),
                    lease_ttl: std::time::Duration::from_millis(self.lease_ttl_ms),
                })
            }
        }
    }
}

/// The whole `prenota.toml`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    pub server: ServerSection,
    pub limits: Limits,
    pub citizens: CitizensSection,
    pub store: StoreSection,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<TokenEntry>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub citizen_issuers: Vec<CitizenIssuerEntry>,
}

impl ConfigFile {
    /// What `prenota config check` warns of in a valid file: settings that do nothing
    /// or less than they seem to (an outside test).
    pub fn doubts(&self) -> Vec<String> {
        let empty = hex::encode(token_sha256(""));
        let mut doubts = Vec::new();
        for token in &self.tokens {
            if token.sha256.eq_ignore_ascii_case(&empty) {
                doubts.push(format!(
                    "token {:?}: sha256 is that of an empty token, which no caller can send \
                     (hash the token itself with `prenota config hash-token`)",
                    token.name
                ));
            }
            if token.channel.is_some() && matches!(token.role, Role::Authority | Role::Site) {
                doubts.push(format!(
                    "token {:?}: channel does nothing on an authority or site token, which \
                     books nothing",
                    token.name
                ));
            }
        }
        let keys: Vec<(&str, Option<Vec<u8>>)> = (self.citizen_issuers.iter())
            .map(|issuer| {
                (
                    issuer.name.as_str(),
                    single_public_key(&issuer.public_key_pem).ok(),
                )
            })
            .collect();
        for (at, (name, key)) in keys.iter().enumerate() {
            let shared = keys[..at]
                .iter()
                .find(|(_, other)| key.is_some() && other == key);
            if let Some((first, _)) = shared.filter(|(first, _)| first != name) {
                doubts.push(format!(
                    "citizen_issuers {first:?} and {name:?} have the same public key: each \
                     gateway can sign as the other"
                ));
            }
        }
        doubts
    }

    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        // Never toml's own text, which quotes the offending line: it may hold a secret
        // (a PostgreSQL URL's password, under a misspelled key too).
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map_or(0, |span| text[..span.start].matches('\n').count() + 1);
            // A type mismatch quotes the value: not one that may be a URL with a password.
            let said = e.message().trim_end();
            let said = match said.contains("://") || said.contains('@') {
                true => "this value is not valid here (not shown: it may hold a password)",
                false => said,
            };
            format!("{}: line {line}: {said}", path.display())
        })
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

    /// A token's sites: required for a `site` token, refused on any other.
    fn token_sites(
        &self,
        entry: &TokenEntry,
        at: &str,
        problems: &mut Vec<String>,
    ) -> BTreeSet<SiteId> {
        match (entry.role, entry.sites.is_empty()) {
            (Role::Site, true) => problems.push(format!("{at}: a site token needs its sites")),
            (Role::Frontend | Role::Authority | Role::Admin, false) => {
                problems.push(format!("{at}: only site tokens have sites"))
            }
            _ => {}
        }
        let parse = |site: &str| SiteId::parse("sites", site, self.limits.id_length_max);
        id_set(&entry.sites, parse, (at, "site"), problems)
    }

    /// Every issuer key, checked (problems are added to `problems`).
    fn citizen_issuers(&self, problems: &mut Vec<String>) -> Vec<CitizenIssuer> {
        let mut issuers = Vec::new();
        for (index, entry) in self.citizen_issuers.iter().enumerate() {
            match entry.check(&format!("citizen_issuers[{index}] ({:?})", entry.name)) {
                Ok(issuer) => issuers.push(issuer),
                Err(problem) => problems.push(problem),
            }
        }
        issuers
    }

    /// Checks everything and builds the runtime configuration; lists every problem.
    pub fn check(&self) -> Result<Config, Vec<String>> {
        let mut problems = self.limits.problems();
        let citizen_issuers = self.citizen_issuers(&mut problems);
        let store = self.store.check(&self.citizens, &mut problems);
        let server = &self.server;
        let proxies = &server.proxy_protocol_from;
        let proxy_protocol_from = networks("proxy_protocol_from", proxies, &mut problems);
        let checkers = &server.health_checks_from;
        let health_checks_from = networks("health_checks_from", checkers, &mut problems);
        let mut tokens = Vec::new();
        let mut seen = (BTreeSet::new(), BTreeSet::new());
        for (index, entry) in self.tokens.iter().enumerate() {
            tokens.extend(self.token(index, entry, &mut seen, &mut problems));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let scheme = match self.citizens.id_scheme {
            IdSchemeName::Opaque => IdScheme::Opaque,
            IdSchemeName::ItFiscalCode => IdScheme::ItFiscalCode,
        };
        Ok(Config {
            limits: self.limits.clone(),
            citizen_id_scheme: scheme,
            citizen_hash_key: None, // read by `prenota serve` ([citizens] hash_key_file)
            store,
            tokens,
            citizen_issuers,
            tls: None,
            reflection: self.server.reflection,
            open_data: self.server.open_data,
            backup_key: None, // read by `prenota serve`
            proxy_protocol_from,
            health_checks_from,
            offline: false,
        })
    }

    /// `[[tokens]]` entry `index`, checked (its problems added to `problems`); `seen`:
    /// the names and hashes of the entries before it, which it joins.
    fn token(
        &self,
        index: usize,
        entry: &TokenEntry,
        (names, hashes): &mut (BTreeSet<String>, BTreeSet<[u8; 32]>),
        problems: &mut Vec<String>,
    ) -> Option<Token> {
        let default_trust = default_citizen_trust(!self.citizen_issuers.is_empty());
        let at = format!("tokens[{index}] ({:?})", entry.name);
        if entry.name.trim().is_empty() {
            problems.push(format!("{at}: name must not be empty"));
        } else if !names.insert(entry.name.clone()) {
            problems.push(format!("{at}: another token has this name"));
        }
        let sha256 = <[u8; 32]>::from_hex(&entry.sha256).ok();
        match sha256 {
            None => problems.push(format!(
                "{at}: sha256 must be 64 hex digits (prenota config hash-token prints it)"
            )),
            Some(hash) if !hashes.insert(hash) => {
                problems.push(format!("{at}: another token has this sha256"))
            }
            Some(_) => {}
        }
        let parse = |region: &str| RegionId::parse("regions", region, self.limits.id_length_max);
        let regions = id_set(&entry.regions, parse, (&at, "region"), problems);
        match (entry.role, entry.regions.is_empty()) {
            (Role::Authority, true) => {
                problems.push(format!("{at}: an authority token needs its regions"))
            }
            (Role::Frontend | Role::Admin | Role::Site, false) => {
                problems.push(format!("{at}: only authority tokens have regions"))
            }
            _ => {}
        }
        let sites = self.token_sites(entry, &at, problems);
        let channel = match entry.channel.as_deref() {
            None => ChannelId::web(),
            Some(name) => ChannelId::parse("channel", name, self.limits.id_length_max)
                .unwrap_or_else(|violation| {
                    problems.push(format!("{at}: channel {name:?} {}", violation.description));
                    ChannelId::web()
                }),
        };
        let citizens = entry.citizens.unwrap_or(default_trust);
        if citizens == CitizenTrust::Asserted && self.citizen_issuers.is_empty() {
            problems.push(format!(
                "{at}: citizens = \"asserted\" needs [[citizen_issuers]]"
            ));
        }
        Some(Token {
            name: entry.name.clone(),
            sha256: sha256?,
            role: entry.role,
            regions,
            sites,
            citizens,
            channel,
        })
    }
}

/// The ids of a token's list (`what`: "site", "region"), each bad one a problem of `at`.
fn id_set<T: Ord>(
    values: &[String],
    parse: impl Fn(&str) -> Result<T, FieldViolation>,
    (at, what): (&str, &str),
    problems: &mut Vec<String>,
) -> BTreeSet<T> {
    let mut ids = BTreeSet::new();
    for value in values {
        match parse(value) {
            Ok(id) => {
                ids.insert(id);
            }
            Err(violation) => {
                problems.push(format!("{at}: {what} {value:?} {}", violation.description))
            }
        }
    }
    ids
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

/// Tokens are bearer secrets: on a non-loopback address without TLS anyone on the path
/// could replay them. Refused unless the operator insists (TLS terminated elsewhere);
/// returns the warning to print, if any.
pub fn check_plaintext_tokens(
    listen: SocketAddr,
    has_tokens: bool,
    tls: bool,
    insecure_plaintext_tokens: bool,
) -> Result<Option<String>, String> {
    if !has_tokens || tls || listen.ip().is_loopback() {
        return Ok(None);
    }
    match insecure_plaintext_tokens {
        true => Ok(Some(format!(
            "PLAINTEXT TOKENS: serving {listen} without TLS (--insecure-plaintext-tokens): \
             tokens cross the network in clear unless TLS ends on this host."
        ))),
        false => Err(format!(
            "refusing to listen on {listen} without TLS: bearer tokens would cross the \
             network in clear. Set tls_cert and tls_key (or --tls-cert / --tls-key), or, if \
             TLS ends in front of prenota on this host or a private link, pass \
             --insecure-plaintext-tokens"
        )),
    }
}

/// TLS material, read from the files `[server]` names. Its `Debug` leaves the
/// private key out.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsPem {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// Client certificates must be signed by one of these (mTLS).
    pub client_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem")
            .field("cert_bytes", &self.cert.len())
            .field("key", &"…")
            .field("client_ca_bytes", &self.client_ca.as_ref().map(Vec::len))
            .finish()
    }
}

impl TlsPem {
    /// Reads the files; both or neither of cert and key, a client CA only with them.
    pub fn read(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Result<Option<Self>, String> {
        match (cert, key) {
            (None, None) if client_ca.is_some() => {
                Err("tls_client_ca needs tls_cert and tls_key".into())
            }
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => {
                let (cert, key) = read_pem_identity(("tls_cert", cert), ("tls_key", key))?;
                let client_ca = client_ca.map(read_client_ca).transpose()?;
                Ok(Some(Self {
                    cert,
                    key,
                    client_ca,
                }))
            }
            _ => Err("tls_cert and tls_key go together".into()),
        }
    }
}

/// A certificate chain and its private key, read and parsed as the TLS stack will
/// use them, so that a bad file is refused at start (and by `config check`) naming the
/// file, not at the first handshake or as "transport error". `(label, path)` each.
pub fn read_pem_identity(
    (cert_label, cert_path): (&str, &Path),
    (key_label, key_path): (&str, &Path),
) -> Result<(Vec<u8>, Vec<u8>), String> {
    use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
    let (cert, chain) = read_pem_certificates(cert_label, cert_path)?;
    let shown = key_path.display();
    let key = std::fs::read(key_path).map_err(|e| format!("{key_label} {shown}: {e}"))?;
    // The key's bytes are never quoted: only the parser's kind of error.
    let private = PrivateKeyDer::from_pem_slice(&key)
        .map_err(|e| format!("{key_label} {shown}: not a PEM private key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, private, &provider).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                "the key is not the (first) certificate's key".to_string()
            }
            other => other.to_string(),
        };
        let cert_shown = cert_path.display();
        format!("{cert_label} {cert_shown} and {key_label} {shown}: {why}")
    })?;
    Ok((cert, key))
}

/// The client CA file of mTLS: certificates that each parse as a trust anchor (the
/// TLS stack would skip one that does not, and refuse every client if none did).
fn read_client_ca(path: &Path) -> Result<Vec<u8>, String> {
    let (pem, certs) = read_pem_certificates("tls_client_ca", path)?;
    let mut roots = rustls::RootCertStore::empty();
    for (number, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            let n = number + 1;
            format!("tls_client_ca {}: certificate {n}: {e}", path.display())
        })?;
    }
    Ok(pem)
}

/// Server configuration, checked: limits, tokens and TLS. Its `Debug` leaves the
/// citizen hash key out (`TlsPem`'s and `StoreBackend`'s leave theirs out too).
#[derive(Clone, Default)]
pub struct Config {
    pub limits: Limits,
    /// How citizen ids are read (`[citizens] id_scheme`).
    pub citizen_id_scheme: IdScheme,
    /// Key of the citizen-id HMAC. `None`: generated once and kept in the data dir.
    pub citizen_hash_key: Option<[u8; 32]>,
    /// `[store]`: sled in the data dir, or PostgreSQL.
    pub store: StoreBackend,
    /// Bearer tokens. None: open mode (loopback only).
    pub tokens: Vec<Token>,
    /// Identity gateways whose signed assertions name citizens (each key checked).
    pub citizen_issuers: Vec<CitizenIssuer>,
    /// Serve TLS (and require client certificates, with a client CA).
    pub tls: Option<TlsPem>,
    /// `[server] reflection`; `None`: on in open mode, off with tokens.
    pub reflection: Option<bool>,
    /// `[server] open_data`: OpenDataService answers callers without a token too.
    pub open_data: bool,
    /// `[server] backup_key_file`, read: backups need it.
    pub backup_key: Option<std::sync::Arc<crate::store::backup_key::BackupKey>>,
    /// `[server] proxy_protocol_from`: connections from these start with a PROXY
    /// protocol header naming their client.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// `[server] health_checks_from`: health checks from these have a budget apart.
    pub health_checks_from: Vec<ipnet::IpNet>,
    /// Set by the commands that open a stopped store to copy or check it (`backup
    /// --data-dir`, `restore`, `migrate`): they record nothing of this configuration in
    /// it. A store without a recorded id scheme keeps none until a server starts on it
    /// (such a command may run without the server's `--config`).
    pub offline: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("limits", &self.limits)
            .field("citizen_id_scheme", &self.citizen_id_scheme)
            .field("citizen_hash_key", &self.citizen_hash_key.map(|_| "…"))
            .field("store", &self.store)
            .field("tokens", &self.tokens)
            .field("citizen_issuers", &self.citizen_issuers)
            .field("tls", &self.tls)
            .field("reflection", &self.reflection)
            .field("open_data", &self.open_data)
            .field("backup_key", &self.backup_key)
            .field("proxy_protocol_from", &self.proxy_protocol_from)
            .field("health_checks_from", &self.health_checks_from)
            .field("offline", &self.offline)
            .finish()
    }
}

impl Config {
    /// Whether gRPC reflection is served.
    pub fn serves_reflection(&self) -> bool {
        self.reflection.unwrap_or(self.tokens.is_empty())
    }
}

/// A pool's per-token share as it applies with `tokens`: in open mode every caller is
/// the one token, so a share would only lower the pool's `total`; there it is the total.
pub fn per_token_share(tokens: &[Token], total: usize, share: usize) -> usize {
    match tokens.is_empty() {
        true => total,
        false => share,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P256: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEP6xlKa4rRASl1PpyEdRqBZzBTqMM
gz0buUUsRz+GTSYhpqW2G+v+Nm1NldK+gX1jgh0OacP9eyEKlNL2ZY4D8A==
-----END PUBLIC KEY-----";
    const P384: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEkyVemFTKPeiw+bhbs6GVikbvvsh1W4yX
LEU/x1cczwgXwAJihE73jnLZmud9yWphjDn81BfqIfV4B7ZV6jNX8A0ne7AYAYTR
Hg0CRGKCGk7oCVwpmKy7SoC2654ZnbCX
-----END PUBLIC KEY-----";
    const SECP256K1: &str = "-----BEGIN PUBLIC KEY-----
MFYwEAYHKoZIzj0CAQYFK4EEAAoDQgAE6VPN5/43U8yDgsh53Lib42z9YFLJlscU
bl6hJuLx6ASBIJ3JsdLv83UY1mQlS9IwDLkY6NqNnV8XL8uEdV09VQ==
-----END PUBLIC KEY-----";
    const ED25519: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAcUQAsxA3qUdNvniJHjXvIDenTwROqQKjogrIqETMdZU=
-----END PUBLIC KEY-----";
    const ED25519_NEXT: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAf0umR/pzeqPFRU7vcfHAq3dSA3+IzI78PhY6MHOBza8=
-----END PUBLIC KEY-----";

    #[test]
    fn an_issuer_key_is_one_ed25519_or_p256_key_and_nothing_else() {
        let issuer = |pem: &str| CitizenIssuerEntry {
            name: "spid".into(),
            audience: "prenota".into(),
            public_key_pem: pem.into(),
        };
        let algorithm = |pem: &str| issuer(pem).check("k").map(|key| key.algorithm);
        assert_eq!(algorithm(ED25519), Ok(jsonwebtoken::Algorithm::EdDSA));
        assert_eq!(
            algorithm(&format!("\n{P256}\n")),
            Ok(jsonwebtoken::Algorithm::ES256)
        );
        for other_curve in [P384, SECP256K1] {
            let refused = algorithm(other_curve).unwrap_err();
            assert!(refused.contains("P-256"), "{refused}");
        }
        let two = format!("{ED25519}\n{ED25519_NEXT}");
        assert!(algorithm(&two).unwrap_err().contains("2 PEM blocks"));
        for junk in [
            format!("{ED25519}\ntrailing"),
            format!("leading\n{ED25519}"),
        ] {
            let refused = algorithm(&junk).unwrap_err();
            assert!(refused.contains("nothing else"), "{refused}");
        }
    }

    #[test]
    fn the_citizen_id_scheme_is_read_from_the_file() {
        let file: ConfigFile =
            toml::from_str("[citizens]\nid_scheme = \"it-fiscal-code\"\n").unwrap();
        assert_eq!(
            file.check().unwrap().citizen_id_scheme,
            IdScheme::ItFiscalCode
        );
        assert_eq!(
            ConfigFile::default().check().unwrap().citizen_id_scheme,
            IdScheme::Opaque
        );
        assert!(toml::from_str::<ConfigFile>("[citizens]\nid_scheme = \"fiscal\"\n").is_err());
    }

    #[test]
    fn the_postgres_backend_needs_its_url_and_a_shared_hash_key() {
        let problems = |text: &str| match toml::from_str::<ConfigFile>(text).unwrap().check() {
            Ok(config) => (Vec::new(), Some(config.store)),
            Err(problems) => (problems, None),
        };
        let (listed, _) = problems("[store]\nbackend = \"postgres\"\n");
        assert!(
            listed.iter().any(|p| p.contains("needs postgres_url")),
            "{listed:?}"
        );
        let url = "postgres_url = \"postgres://u@127.0.0.1/db\"\n";
        let (listed, _) = problems(&format!("[store]\nbackend = \"postgres\"\n{url}"));
        assert!(
            listed.iter().any(|p| p.contains("hash_key_file")),
            "{listed:?}"
        );
        let (listed, _) = problems(&format!("[store]\n{url}"));
        assert!(
            listed.iter().any(|p| p.contains("not \"postgres\"")),
            "{listed:?}"
        );
        let (listed, _) = problems("[store]\nlease_ttl_ms = 10\n");
        assert!(
            listed.iter().any(|p| p.contains("lease_ttl_ms")),
            "{listed:?}"
        );
        let text = format!(
            "[store]\nbackend = \"postgres\"\n{url}lease_ttl_ms = 3000\n\
             [citizens]\nhash_key_file = \"/k\"\n"
        );
        match problems(&text) {
            (listed, Some(StoreBackend::Postgres(settings))) => {
                assert!(listed.is_empty());
                assert_eq!(settings.lease_ttl, std::time::Duration::from_millis(3000));
                assert!(
                    !format!("{settings:?}").contains("127.0.0.1"),
                    "the URL is never printed"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ConfigFile::default().check().unwrap().store,
            StoreBackend::Sled
        ));
    }

    #[test]
    fn proxies_and_checkers_are_addresses_or_networks_and_anything_else_is_a_problem() {
        let entries = r#"["10.1.2.3", "10.0.0.0/8", "::1", "::ffff:10.2.3.4"]"#;
        for key in ["proxy_protocol_from", "health_checks_from"] {
            listed_networks_are_read(key, entries);
        }
        let text = format!("[server]\nhealth_checks_from = {entries}\n");
        let file: ConfigFile = toml::from_str(&text).unwrap();
        assert!(
            file.check().unwrap().proxy_protocol_from.is_empty(),
            "apart"
        );
    }

    fn listed_networks_are_read(key: &str, entries: &str) {
        let text = format!("[server]\n{key} = {entries}\n");
        let file: ConfigFile = toml::from_str(&text).unwrap();
        let config = file.check().unwrap();
        let networks = match key {
            "proxy_protocol_from" => config.proxy_protocol_from,
            _ => config.health_checks_from,
        };
        let networks: Vec<String> = networks.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            networks,
            ["10.1.2.3/32", "10.0.0.0/8", "::1/128", "10.2.3.4/32"]
        );
        let bad = [
            ("lb.example", "neither"),
            ("10.0.0.0/33", "neither"),
            ("10.9.8.7/8", "host bits"),
            ("0.0.0.0/0", "wider than /8"),
            ("2001::/16", "wider than /48"),
            ("2001:db8::/40", "wider than /48"),
        ];
        for (entry, says) in bad {
            let text = format!("[server]\n{key} = [\"10.0.0.0/8\", \"{entry}\"]\n");
            let file: ConfigFile = toml::from_str(&text).unwrap();
            let problems = file.check().unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains(&format!("{key}[1]")), "{problems:?}");
            assert!(problems[0].contains(says), "{entry}: {problems:?}");
        }
    }

    #[test]
    fn a_file_that_does_not_parse_never_shows_the_postgres_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prenota.toml");
        std::fs::write(&path, "[store]\npostgres_url = postgres://u:SECRET@h/db\n").unwrap();
        let error = ConfigFile::read(&path).unwrap_err();
        assert!(!error.contains("SECRET"), "{error}");
        assert!(error.contains("line 2"), "{error}");
        // A misspelled key: toml's message would quote the line, password and all.
        let misspelled = "[store]\npostgres-url = \"postgres://u:SECRET@h/db\"\n";
        std::fs::write(&path, misspelled).unwrap();
        let error = ConfigFile::read(&path).unwrap_err();
        assert!(!error.contains("SECRET"), "{error}");
        assert!(
            error.contains("line 2") && error.contains("postgres-url"),
            "{error}"
        );
        // A value of the wrong type: toml's message would quote it.
        std::fs::write(
            &path,
            "[store]\nlease_ttl_ms = \"postgres://u:SECRET@h/db\"\n",
        )
        .unwrap();
        let error = ConfigFile::read(&path).unwrap_err();
        assert!(
            !error.contains("SECRET") && error.contains("line 2"),
            "{error}"
        );
    }

    #[test]
    fn a_flag_wins_over_the_file_which_wins_over_the_default() {
        let file = ServerSection {
            data_dir: Some("/file".into()),
            metrics_listen: Some("off".into()),
            tls_cert: Some("file.pem".into()),
            tls_key: Some("file.key".into()),
            tls_client_ca: Some("clients.pem".into()),
            ..ServerSection::default()
        };
        let flags = ServerSection {
            data_dir: Some("/flag".into()),
            tls_cert: Some("flag.pem".into()),
            ..ServerSection::default()
        };
        let server = file.overridden_by(&flags);
        assert_eq!(server.data_dir(), PathBuf::from("/flag"));
        assert_eq!(server.listen(), DEFAULT_LISTEN);
        assert_eq!(server.metrics_listen(), Ok(None));
        // TLS files come together: the flag's certificate never pairs with the file's key.
        assert_eq!(
            (server.tls_cert, server.tls_key),
            (Some("flag.pem".into()), None)
        );
        // A certificate rotated by flag keeps the file's demand for client certificates.
        assert_eq!(server.tls_client_ca, Some("clients.pem".into()));
        let defaults = ServerSection::default().with_defaults();
        assert_eq!(defaults.data_dir, Some(PathBuf::from(DEFAULT_DATA_DIR)));
        assert_eq!(
            defaults.metrics_listen(),
            Ok(Some("127.0.0.1:9464".parse().unwrap()))
        );
    }

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
    fn tokens_cross_a_network_only_over_tls_unless_the_operator_insists() {
        let public: SocketAddr = "10.0.0.5:50051".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        assert!(check_plaintext_tokens(public, true, false, false).is_err());
        assert!(check_plaintext_tokens(public, true, false, true)
            .unwrap()
            .is_some());
        assert_eq!(check_plaintext_tokens(public, true, true, false), Ok(None));
        assert_eq!(
            check_plaintext_tokens(loopback, true, false, false),
            Ok(None)
        );
        assert_eq!(
            check_plaintext_tokens(public, false, false, false),
            Ok(None)
        );
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
            hex::encode(token_sha256("secret"))
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

    /// Every `toml` example of the README is a file `serve` reads (unknown keys are
    /// refused), and an issuer's key string holds its PEM block alone (a comment once sat
    /// inside it, and the example was refused).
    #[test]
    fn the_readmes_toml_examples_are_config_files() {
        let readme = include_str!("../README.md");
        let blocks: Vec<&str> = readme
            .split("```toml\n")
            .skip(1)
            .map(|rest| rest.split("```").next().unwrap())
            .collect();
        assert!(blocks.len() >= 3, "{} toml examples", blocks.len());
        for block in blocks {
            let file: ConfigFile = toml::from_str(block).unwrap_or_else(|e| panic!("{e}"));
            for issuer in &file.citizen_issuers {
                let key = issuer.public_key_pem.trim();
                assert!(key.starts_with("-----BEGIN PUBLIC KEY-----"), "{key}");
                assert!(key.ends_with("-----END PUBLIC KEY-----"), "{key}");
            }
        }
    }

    #[test]
    fn debug_output_leaves_secrets_out() {
        let file: ConfigFile = toml::from_str(
            r#"
[store]
backend = "postgres"
postgres_url = "postgres://prenota:hunter2@db/prenota"
"#,
        )
        .unwrap();
        assert!(!format!("{file:?}").contains("hunter2"));
        let config = Config {
            citizen_hash_key: Some([0xab; 32]),
            store: StoreBackend::Postgres(PostgresSettings {
                url: "postgres://prenota:hunter2@db/prenota".into(),
                lease_ttl: std::time::Duration::from_secs(5),
            }),
            tls: Some(TlsPem {
                cert: b"CERTIFICATE".to_vec(),
                key: b"PRIVATE KEY hunter2".to_vec(),
                client_ca: None,
            }),
            ..Config::default()
        };
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("171, 171"), "the hash key: {printed}");
        assert!(printed.contains("citizen_hash_key: Some"), "{printed}");
    }
}
