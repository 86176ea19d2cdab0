//! TLS to PostgreSQL (README "Running on PostgreSQL"): the URL's `sslmode` and
//! `sslrootcert` as libpq reads them, on a throwaway server of this test's own that takes
//! TLS with a certificate for `localhost` only.

use crate::common;

use std::path::{Path, PathBuf};

use common::child::{ChildOptions, ChildServer};
use common::*;
use prenota::proto::booking_service_client::BookingServiceClient;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA's certificate file, and the CA itself.
fn ca(dir: &Path, name: &str) -> (PathBuf, CertifiedIssuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, ca.as_ref().pem()).unwrap();
    (path, ca)
}

/// A PostgreSQL taking TLS with a certificate for `localhost` that `ca.pem` signed (and
/// plain connections too); its URL on 127.0.0.1, `ca.pem`, and another CA's file.
fn tls_postgres(dir: &Path) -> Option<(String, PathBuf, PathBuf)> {
    let (ca_file, issuer) = ca(dir, "ca.pem");
    let (other_ca_file, _) = ca(dir, "other-ca.pem");
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    let url = common::postgres::tls_server(dir)?;
    Some((url, ca_file, other_ca_file))
}

/// Whether prenota's session on `url` is encrypted, or why it could not connect.
fn encrypted(url: &str) -> Result<bool, String> {
    let url = url.to_string();
    // The blocking client runs its own runtime: keep it off any test's.
    std::thread::spawn(move || {
        let mut client =
            prenota::store::postgres::connect(&url, "tls-test").map_err(|e| e.to_string())?;
        let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
        Ok(client.query_one(sql, &[]).unwrap().get(0))
    })
    .join()
    .unwrap()
}

#[test]
fn each_sslmode_checks_the_server_certificate_as_libpq_does() {
    let dir = tempfile::tempdir().unwrap();
    let Some((url, ca, other_ca)) = tls_postgres(dir.path()) else {
        return;
    };
    let with = |options: &str| encrypted(&format!("{url}?{options}"));
    let (ca, other_ca) = (ca.display(), other_ca.display());
    assert_eq!(with("sslmode=disable"), Ok(false));
    // prefer (the default) and require encrypt without checking the certificate.
    assert_eq!(encrypted(&url), Ok(true));
    assert_eq!(with("sslmode=require"), Ok(true));
    assert_eq!(
        with(&format!("sslmode=verify-ca&sslrootcert={ca}")),
        Ok(true)
    );
    // The certificate names localhost, not 127.0.0.1: only the chain is checked above.
    let by_ip = with(&format!("sslmode=verify-full&sslrootcert={ca}"));
    assert!(
        by_ip.as_ref().unwrap_err().contains("certificate"),
        "{by_ip:?}"
    );
    let by_name = url.replace("127.0.0.1", "localhost");
    let verified = encrypted(&format!("{by_name}?sslmode=verify-full&sslrootcert={ca}"));
    assert_eq!(verified, Ok(true));
    // Another CA's certificate: refused, also by require once a root certificate is given.
    for mode in ["verify-ca", "verify-full", "require"] {
        let refused = with(&format!("sslmode={mode}&sslrootcert={other_ca}"));
        assert!(
            refused.as_ref().unwrap_err().contains("certificate"),
            "{refused:?}"
        );
    }
    let key_value = format!(
        "host=localhost port={} user=prenota dbname=postgres sslmode=verify-full sslrootcert='{ca}'",
        url.rsplit_once(':').unwrap().1.split('/').next().unwrap()
    );
    assert_eq!(encrypted(&key_value), Ok(true));
}

/// A node on `sslmode=verify-full` serves and books, every session of its encrypted;
/// `config check` stops on a mode it does not know, without printing the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_verify_full_books_over_tls_and_config_check_names_a_bad_mode() {
    let dir = tempfile::tempdir().unwrap();
    let Some((url, ca, _)) = tls_postgres(dir.path()) else {
        return;
    };
    let named = url
        .replace("127.0.0.1", "localhost")
        .replace("prenota@", "prenota:SECRET@");
    let verified = format!("{named}?sslmode=verify-full&sslrootcert={}", ca.display());
    let key = dir.path().join("citizen-hash.key");
    std::fs::write(&key, rand::random::<[u8; 32]>()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, PermissionsExt::from_mode(0o600)).unwrap();
    let config = dir.path().join("prenota.toml");
    let text = format!(
        "[store]\nbackend = \"postgres\"\npostgres_url = \"{verified}\"\n\
         [citizens]\nhash_key_file = \"{}\"\n",
        key.display()
    );
    std::fs::write(&config, &text).unwrap();
    let options = ChildOptions {
        args: vec!["--config".into(), config.display().to_string()],
        ..ChildOptions::default()
    };
    let mut node = ChildServer::start_recovering(&dir.path().join("node"), options);
    node.wait_serving();
    let slots = ten_minute_slots(connect(&node.url).await, ("tl", day_ahead(40)), 1, 5).await;
    let mut client = BookingServiceClient::new(connect(&node.url).await);
    book_ok(&mut client, book_request(&slots[0], "c1", "r1")).await;
    let sessions = |sql: &str| common::postgres::query_i64(&url, sql);
    let of_node = "FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
                   WHERE application_name LIKE 'prenota-%'";
    assert!(sessions(&format!("SELECT count(*) {of_node} AND ssl")) >= 2);
    assert_eq!(
        sessions(&format!("SELECT count(*) {of_node} AND NOT ssl")),
        0
    );

    std::fs::write(&config, text.replace("verify-full", "verify_full")).unwrap();
    let (_, said) = config_check(&config, false);
    assert!(
        said.contains("sslmode") && !said.contains("SECRET"),
        "{said}"
    );
}
