//! When the TLS certificates `[server]` names stop (or start) being valid. A file that
//! parses may still hold a certificate past its end: every client then refuses the
//! handshake, and nothing said so until the first one failed. `serve` and `config
//! check` warn; `serve` also exports the server certificate's end as a gauge
//! (`prenota_tls_certificate_expiry_timestamp_seconds`) for alerts.

use std::path::Path;
use std::time::{Duration, SystemTime};

use x509_cert::der::Decode;

use crate::config::{read_pem_certificates, ServerSection};

/// From this close to a certificate's end on, `serve` and `config check` warn.
pub const WARN_BEFORE: Duration = Duration::from_secs(14 * 24 * 3600);

/// One certificate's name and validity.
struct Validity {
    subject: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// Why the certificates of `tls_cert` (the chain) and `tls_client_ca` may fail their
/// handshakes at `now`: past their end, not yet valid, or ending within `WARN_BEFORE`.
/// Files that cannot be read or parsed are `TlsPem::read`'s to report: none here.
pub fn doubts(server: &ServerSection, now: SystemTime) -> Vec<String> {
    let files = [
        ("tls_cert", server.tls_cert.as_deref()),
        ("tls_client_ca", server.tls_client_ca.as_deref()),
    ];
    let mut doubts = Vec::new();
    for (label, path) in files {
        let Some(path) = path else { continue };
        for (number, validity) in validities(label, path).iter().enumerate() {
            let named = format!(
                "{label} {}: certificate {} ({})",
                path.display(),
                number + 1,
                validity.subject
            );
            doubts.extend(validity.doubt(now).map(|doubt| format!("{named} {doubt}")));
        }
    }
    doubts
}

/// `serve`: logs each of [`doubts`] now as a warning.
pub fn warn_of_doubts(server: &ServerSection) {
    for doubt in doubts(server, SystemTime::now()) {
        tracing::warn!("{doubt}");
    }
}

/// `serve`, once the metrics recorder is installed: the server certificate's end as
/// the `TLS_CERTIFICATE_EXPIRY` gauge (none without TLS).
pub fn export_end(server: &ServerSection) {
    if let Some(end) = server_certificate_end(server) {
        let end = end
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        metrics::gauge!(crate::telemetry::TLS_CERTIFICATE_EXPIRY).set(end.as_secs_f64());
    }
}

/// The earliest end among the `tls_cert` chain's certificates, if it names one.
pub fn server_certificate_end(server: &ServerSection) -> Option<SystemTime> {
    let path = server.tls_cert.as_deref()?;
    validities("tls_cert", path)
        .iter()
        .map(|validity| validity.not_after)
        .min()
}

/// Each certificate of the PEM file at `path`, in order; none if it does not parse.
fn validities(label: &str, path: &Path) -> Vec<Validity> {
    let Ok((_, certificates)) = read_pem_certificates(label, path) else {
        return Vec::new();
    };
    certificates
        .iter()
        .filter_map(|der| x509_cert::Certificate::from_der(der).ok())
        .map(|certificate| {
            let tbs = certificate.tbs_certificate;
            Validity {
                subject: tbs.subject.to_string(),
                not_before: tbs.validity.not_before.to_system_time(),
                not_after: tbs.validity.not_after.to_system_time(),
            }
        })
        .collect()
}

impl Validity {
    /// What is wrong with it at `now`, if anything.
    fn doubt(&self, now: SystemTime) -> Option<String> {
        let (from, until) = (utc(self.not_before), utc(self.not_after));
        if self.not_after <= now {
            return Some(format!(
                "expired at {until}: clients refuse the handshake; renew it"
            ));
        }
        if self.not_before > now {
            return Some(format!(
                "is not valid before {from}: clients refuse the handshake until then \
                 (or this machine's clock is wrong)"
            ));
        }
        let left = self.not_after.duration_since(now).unwrap_or_default();
        (left < WARN_BEFORE).then(|| {
            let days = left.as_secs() / 86_400;
            format!("expires at {until}, in {days} days: renew it before then")
        })
    }
}

fn utc(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validity(from_days: i64, until_days: i64) -> Validity {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 * 86_400);
        let day = |days: i64| {
            let seconds = Duration::from_secs(days.unsigned_abs() * 86_400);
            if days < 0 {
                now - seconds
            } else {
                now + seconds
            }
        };
        Validity {
            subject: "CN=test".into(),
            not_before: day(from_days),
            not_after: day(until_days),
        }
    }

    #[test]
    fn a_certificate_is_doubted_past_its_end_before_its_start_and_near_its_end() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 * 86_400);
        let doubt = |from, until| validity(from, until).doubt(now);
        assert!(doubt(-30, -1).unwrap().contains("expired at"));
        assert!(doubt(1, 300).unwrap().contains("is not valid before"));
        assert!(doubt(-30, 3).unwrap().contains("in 3 days"));
        assert_eq!(doubt(-30, 15), None);
    }
}
