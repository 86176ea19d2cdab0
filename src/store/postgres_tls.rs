//! TLS to PostgreSQL, as libpq's `sslmode` and `sslrootcert` ask for it.
//!
//! tokio-postgres knows `sslmode` disable, prefer and require only, and leaves checking
//! the server's certificate to the connector. So the two options are taken out of the URL
//! here, and the connector (rustls) checks what the mode asks:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` (default) | if the server offers it | not checked |
//! | `require` | always | not checked; with `sslrootcert`, as `verify-ca` |
//! | `verify-ca` | always | signed by a CA of `sslrootcert` |
//! | `verify-full` | always | signed by a CA of `sslrootcert`, for the host connected to |
//!
//! `sslrootcert` is a PEM file of CA certificates (default `~/.postgresql/root.crt`), or
//! `system` for the machine's CAs (then `sslmode` must be `verify-full`, as in libpq).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use postgres::config::SslMode;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How a node reaches PostgreSQL: the connection settings and the TLS connector.
pub struct Target {
    pub config: postgres::Config,
    pub tls: MakeRustlsConnect,
}

/// libpq's TLS modes, weakest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Where the CA certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Roots {
    /// `sslrootcert` not given: libpq's default file, if the mode needs one.
    Default,
    File(PathBuf),
    System,
}

/// The URL's settings and TLS connector. Errors never quote the URL (it may hold a
/// password).
pub fn target(url: &str) -> Result<Target, String> {
    let (rest, mut mode, roots) = take_tls_options(url)?;
    if mode == Mode::Require && roots == Roots::Default && default_root_file().is_some() {
        mode = Mode::VerifyCa; // as libpq does when ~/.postgresql/root.crt exists
    }
    let mut config: postgres::Config = rest
        .parse()
        .map_err(|e| format!("the PostgreSQL URL does not parse: {e}"))?;
    // An `sslmode` left in (read where this module did not look) would be overridden.
    if config.get_ssl_mode() != SslMode::Prefer {
        return Err(
            "the PostgreSQL URL's sslmode could not be told apart: write it as \
                    `?sslmode=MODE` (a URL) or `sslmode=MODE` (key=value)"
                .into(),
        );
    }
    if mode != Mode::Disable && config.get_hosts().is_empty() {
        return Err(
            "the PostgreSQL URL needs `host` (the name TLS checks) unless \
                    sslmode=disable: hostaddr alone cannot be checked"
                .into(),
        );
    }
    config.ssl_mode(match mode {
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
    });
    let tls = MakeRustlsConnect::new(client_config(mode, &roots)?);
    Ok(Target { config, tls })
}

/// The URL without `sslmode` and `sslrootcert`, and what they said.
fn take_tls_options(url: &str) -> Result<(String, Mode, Roots), String> {
    let (rest, options) = match url.split_once("://") {
        Some((scheme, _)) if scheme == "postgres" || scheme == "postgresql" => split_url_query(url),
        _ => split_key_values(url)?,
    };
    let (mut mode, mut roots) = (None, Roots::Default);
    for (key, value) in options {
        match key.as_str() {
            "sslmode" => mode = Some(parse_mode(&value)?),
            _ => {
                roots = match value.as_str() {
                    "system" => Roots::System,
                    _ => Roots::File(PathBuf::from(value)),
                }
            }
        }
    }
    let mode = match (mode, &roots) {
        (None, Roots::System) => Mode::VerifyFull,
        (None, _) => Mode::Prefer,
        // libpq: a root certificate given makes `require` check the chain.
        (Some(Mode::Require), Roots::File(_)) => Mode::VerifyCa,
        (Some(mode), _) => mode,
    };
    if roots == Roots::System && mode != Mode::VerifyFull {
        return Err(
            "the PostgreSQL URL's sslrootcert=system needs sslmode=verify-full (as in libpq)"
                .into(),
        );
    }
    Ok((rest, mode, roots))
}

fn parse_mode(value: &str) -> Result<Mode, String> {
    Ok(match value {
        "disable" => Mode::Disable,
        "allow" | "prefer" => Mode::Prefer,
        "require" => Mode::Require,
        "verify-ca" => Mode::VerifyCa,
        "verify-full" => Mode::VerifyFull,
        _ => {
            return Err(format!(
                "the PostgreSQL URL's sslmode must be disable, allow, prefer, require, \
                 verify-ca or verify-full, not {value:?}"
            ))
        }
    })
}

fn is_tls_option(key: &str) -> bool {
    key == "sslmode" || key == "sslrootcert"
}

/// A `postgres://` URL: its query parameters are `&`-separated and percent-encoded, and
/// start at the first `?` after the user and password (up to the first `@`, which may
/// hold a `?` of their own), as tokio-postgres reads it.
fn split_url_query(url: &str) -> (String, Vec<(String, String)>) {
    let after_credentials = url.find('@').map_or(0, |at| at + 1);
    let Some(mark) = url[after_credentials..].find('?') else {
        return (url.to_string(), Vec::new());
    };
    let (base, query) = (
        &url[..after_credentials + mark],
        &url[after_credentials + mark + 1..],
    );
    let (mut kept, mut taken) = (Vec::new(), Vec::new());
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decoded(key);
        match is_tls_option(&key) {
            true => taken.push((key, percent_decoded(value))),
            false => kept.push(pair),
        }
    }
    let rest = match kept.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", kept.join("&")),
    };
    (rest, taken)
}

/// `%XX` decoded (as tokio-postgres reads URL parameters); invalid escapes kept as they are.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A libpq key=value string (`host=db user=p sslmode=verify-full`): values may be quoted
/// (`'a b'`) and use `\` escapes. The rest comes back with every value quoted.
fn split_key_values(text: &str) -> Result<(String, Vec<(String, String)>), String> {
    let mut chars = text.chars().peekable();
    let (mut kept, mut taken) = (Vec::new(), Vec::new());
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // Not the word itself: it may be a whole URL, password and all.
            return Err(
                "the PostgreSQL URL does not parse: it is neither a postgres:// URL nor \
                 key=value pairs"
                    .into(),
            );
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let value = key_value(&mut chars)?;
        match is_tls_option(&key) {
            true => taken.push((key, value)),
            false => kept.push(format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            )),
        }
    }
    Ok((kept.join(" "), taken))
}

/// One value of a key=value string: quoted, or up to the next blank.
fn key_value(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<String, String> {
    let quoted = chars.next_if_eq(&'\'').is_some();
    let mut value = String::new();
    loop {
        match chars.next() {
            Some('\'') if quoted => return Ok(value),
            Some(c) if !quoted && c.is_whitespace() => return Ok(value),
            Some('\\') => value.extend(chars.next()),
            Some(c) => value.push(c),
            None if quoted => {
                return Err(
                    "the PostgreSQL URL does not parse: a quoted value is not closed".into(),
                )
            }
            None => return Ok(value),
        }
    }
}

/// rustls set to check what `mode` asks (with ring, as the gRPC server's TLS).
fn client_config(mode: Mode, roots: &Roots) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS to PostgreSQL: {e}"))?;
    let roots = match (mode, roots) {
        (Mode::Disable | Mode::Prefer | Mode::Require, _) => None,
        (_, roots) => Some(Arc::new(root_store(mode, roots)?)),
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (Mode::VerifyFull, Some(roots)) => {
            WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| format!("TLS to PostgreSQL: {e}"))?
        }
        (_, roots) => Arc::new(ChainOnly { provider, roots }),
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The CAs `roots` names, with what to do said if there are none.
fn root_store(mode: Mode, roots: &Roots) -> Result<RootCertStore, String> {
    let mode = match mode {
        Mode::VerifyCa => "verify-ca",
        _ => "verify-full",
    };
    let path = match roots {
        Roots::System => return system_roots(),
        Roots::File(path) => path.clone(),
        Roots::Default => default_root_file().ok_or_else(|| {
            format!(
                "the PostgreSQL URL's sslmode={mode} needs the CA certificate: add \
                 sslrootcert=PATH (a PEM file) or sslrootcert=system, or put it in \
                 ~/.postgresql/root.crt"
            )
        })?,
    };
    let mut store = RootCertStore::empty();
    let (_, certs) = crate::config::read_pem_certificates("sslrootcert", &path)?;
    for cert in certs {
        store
            .add(cert)
            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    }
    Ok(store)
}

/// libpq's default `sslrootcert`, if it exists.
fn default_root_file() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql/root.crt");
    path.exists().then_some(path)
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    match added {
        0 => Err(format!(
            "sslrootcert=system: this machine's CA certificates could not be read ({:?})",
            found.errors
        )),
        _ => Ok(store),
    }
}

/// `require`'s check (none: the session is encrypted, the server not authenticated), or
/// `verify-ca`'s (the certificate chains to a CA of `roots`, for whatever host). The
/// handshake's signatures are checked either way.
#[derive(Debug)]
struct ChainOnly {
    provider: Arc<CryptoProvider>,
    roots: Option<Arc<RootCertStore>>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(url: &str) -> (String, Mode, Roots) {
        take_tls_options(url).unwrap()
    }

    #[test]
    fn url_options_are_taken_out_and_the_rest_kept_as_written() {
        let (rest, mode, roots) = taken(
            "postgres://u:p%40ss@db/x?application_name=a&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca.pem&options=-csearch_path%3Ds",
        );
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db/x?application_name=a&options=-csearch_path%3Ds"
        );
        assert_eq!(mode, Mode::VerifyFull);
        assert_eq!(roots, Roots::File("/etc/ca.pem".into()));
        assert_eq!(
            taken("postgresql://db/x?sslmode=require").0,
            "postgresql://db/x"
        );
        assert_eq!(taken("postgres://db/x").1, Mode::Prefer);
        // A `?` in the password is the password's (it used to hide sslmode=require).
        let (rest, mode, _) = taken("postgres://u:Xy7?q2@db/x?sslmode=require");
        assert_eq!(
            (rest.as_str(), mode),
            ("postgres://u:Xy7?q2@db/x", Mode::Require)
        );
        let config: postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"Xy7?q2"[..]));
    }

    #[test]
    fn key_value_options_are_taken_out_and_the_rest_quoted() {
        let (rest, mode, roots) =
            taken(r"host=db  password='a b\'c' sslmode = verify-ca sslrootcert='/x y/ca.pem'");
        assert_eq!(rest, r"host='db' password='a b\'c'");
        assert_eq!(mode, Mode::VerifyCa);
        assert_eq!(roots, Roots::File("/x y/ca.pem".into()));
        let config: postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"a b'c"[..]));
        assert!(take_tls_options("host=db password='open").is_err());
        assert!(take_tls_options("host db").is_err());
        let not_a_url = take_tls_options("Postgres://u:SECRET@db/x").unwrap_err();
        assert!(!not_a_url.contains("SECRET"), "{not_a_url}");
    }

    #[test]
    fn modes_follow_libpq() {
        assert_eq!(taken("host=db sslmode=allow").1, Mode::Prefer);
        assert_eq!(taken("host=db sslmode=disable").1, Mode::Disable);
        assert_eq!(taken("host=db sslmode=require").1, Mode::Require);
        // A CA given makes require check the chain; `system` means verify-full.
        assert_eq!(
            taken("host=db sslmode=require sslrootcert=ca.pem").1,
            Mode::VerifyCa
        );
        assert_eq!(taken("host=db sslrootcert=system").1, Mode::VerifyFull);
        let weak = take_tls_options("host=db sslmode=require sslrootcert=system");
        assert!(weak.unwrap_err().contains("verify-full"));
        let unknown = take_tls_options("postgres://u:SECRET@db/x?sslmode=verify_full");
        let said = unknown.unwrap_err();
        assert!(
            said.contains("verify-full") && !said.contains("SECRET"),
            "{said}"
        );
    }

    #[test]
    fn tls_needs_a_host_name() {
        let said = target("hostaddr=10.0.0.5 user=p").err().unwrap();
        assert!(said.contains("needs `host`"), "{said}");
        assert!(target("hostaddr=10.0.0.5 user=p sslmode=disable").is_ok());
        assert!(target("host=db hostaddr=10.0.0.5 user=p").is_ok());
    }

    #[test]
    fn a_missing_or_empty_root_file_is_named() {
        let dir = std::env::temp_dir().join(format!("prenota-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        for (path, says) in [(dir.join("missing.pem"), "No such file"), (empty, "no PEM")] {
            let url = format!("host=db sslmode=verify-full sslrootcert={}", path.display());
            let said = target(&url).err().unwrap();
            assert!(
                said.contains(&*path.to_string_lossy()) && said.contains(says),
                "{said}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
