//! PostgreSQL for the backend tests: `PRENOTA_TEST_POSTGRES_URL`, or else a throwaway
//! server on loopback that `scripts/postgres-test-server` starts for this test process
//! (and stops once it exits). Every store gets a schema of its own.
//!
//! `PRENOTA_TEST_BACKEND=postgres` runs every in-process test server (`TestServer`) on
//! PostgreSQL instead of sled: one schema per data dir, so a restart finds its records.
//!
//! Where no PostgreSQL is installed the PostgreSQL tests say so on stderr and pass
//! without running, unless `PRENOTA_REQUIRE_POSTGRES` is set (CI sets it: there they
//! must run).

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

static SERVER: OnceLock<Option<String>> = OnceLock::new();

/// The server's URL, or `None` (said on stderr) where there is none to use.
pub fn base_url() -> Option<&'static str> {
    SERVER
        .get_or_init(|| {
            if let Ok(url) = std::env::var("PRENOTA_TEST_POSTGRES_URL") {
                return Some(url);
            }
            started_server(&[])
        })
        .as_deref()
}

/// A server of this test process's own, which also takes TLS with the certificate and
/// key in `tls_dir` (`server.crt`, `server.key`); `None` (said) without PostgreSQL.
pub fn tls_server(tls_dir: &std::path::Path) -> Option<String> {
    started_server(&["--tls", tls_dir.to_str().unwrap()])
}

/// `scripts/postgres-test-server`'s URL, stopped once this process exits.
fn started_server(args: &[&str]) -> Option<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres-test-server");
    let started = Command::new(script)
        .args(["--until-pid", &std::process::id().to_string()])
        .args(args)
        .stderr(Stdio::inherit())
        .output();
    match started {
        Ok(out) if out.status.success() => {
            Some(String::from_utf8(out.stdout).unwrap().trim().to_string())
        }
        failed => {
            let why = format!("no PostgreSQL to test against ({failed:?})");
            if std::env::var_os("PRENOTA_REQUIRE_POSTGRES").is_some() {
                panic!("{why}, and PRENOTA_REQUIRE_POSTGRES is set");
            }
            eprintln!(
                "SKIPPED: {why}: the PostgreSQL tests pass without running \
                 (apt-get install -y postgresql to run them)"
            );
            None
        }
    }
}

/// A URL whose tables live in `schema` (created if missing); `None` without a server.
pub fn schema_url(schema: &str) -> Option<String> {
    let base = base_url()?;
    let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    let base_owned = base.to_string();
    // The blocking client runs its own runtime: keep it off the test's.
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&base_owned, postgres::NoTls)
            .expect("connect to the test PostgreSQL");
        client.batch_execute(&create).expect("create the schema");
    })
    .join()
    .expect("schema created");
    let join = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{join}options=-csearch_path%3D{schema}"))
}

/// A schema no other store of this test process uses.
pub fn fresh_schema() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "prenota_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `sql` on `url` (for a test's own look at the tables).
pub fn query_i64(url: &str, sql: &str) -> i64 {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        client.query_one(sql.as_str(), &[]).expect("query").get(0)
    })
    .join()
    .expect("query ran")
}

/// Runs the statements of `sql` on `url` (a test's own tables, triggers, settings).
pub fn execute(url: &str, sql: &str) {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        client.batch_execute(&sql).expect("statements");
    })
    .join()
    .expect("statements ran")
}

/// A record's key and value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Replaces every record whose key starts with `prefix` by what `rewrite` makes of it
/// (for a test that builds a store as an older build wrote it). Returns how many.
pub fn rewrite_records(url: &str, prefix: u8, rewrite: fn(&[u8], &[u8]) -> KeyValue) -> i64 {
    let url = url.to_string();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        let mut tx = client.transaction().expect("a transaction");
        let rows = tx
            .query(
                "SELECT k, v FROM prenota_kv WHERE get_byte(k, 0) = $1",
                &[&i32::from(prefix)],
            )
            .expect("read");
        for row in &rows {
            let (key, value): KeyValue = (row.get(0), row.get(1));
            let (new_key, new_value) = rewrite(&key, &value);
            tx.execute("DELETE FROM prenota_kv WHERE k = $1", &[&key])
                .expect("delete");
            tx.execute(
                "INSERT INTO prenota_kv (k, v) VALUES ($1, $2)",
                &[&new_key, &new_value],
            )
            .expect("insert");
        }
        tx.commit().expect("commit");
        rows.len() as i64
    })
    .join()
    .expect("rewrite ran")
}

/// Whether this run puts test servers on PostgreSQL (`PRENOTA_TEST_BACKEND=postgres`).
pub fn asked() -> bool {
    std::env::var("PRENOTA_TEST_BACKEND").is_ok_and(|backend| backend == "postgres")
}

/// With `PRENOTA_TEST_BACKEND=postgres`, points `config` at the schema of `data_dir`,
/// with a hash key of its own (both the same at every restart on that dir).
pub fn use_backend_if_asked(data_dir: &std::path::Path, config: &mut prenota::config::Config) {
    if !asked() {
        return;
    }
    let url = url_of_dir(data_dir);
    config.store = prenota::config::StoreBackend::Postgres(prenota::config::PostgresSettings {
        url,
        lease_ttl: std::time::Duration::from_secs(5),
    });
    config.citizen_hash_key.get_or_insert(dir_digest(data_dir));
}

/// For a test of sled's own data dir (its files, copies, backups restored into one, a
/// child process on it): `true`, said on stderr, when this run is on PostgreSQL.
pub fn sled_only(test: &str) -> bool {
    if asked() {
        eprintln!("{test}: a test of sled's data dir; not run on PostgreSQL");
    }
    asked()
}

/// The URL of the schema a `TestServer` on `data_dir` uses on PostgreSQL.
pub fn url_of_dir(data_dir: &std::path::Path) -> String {
    let digest = dir_digest(data_dir);
    let schema = format!(
        "prenota_dir_{:x}",
        u64::from_be_bytes(digest[..8].try_into().unwrap())
    );
    schema_url(&schema).expect("PRENOTA_TEST_BACKEND=postgres needs a PostgreSQL")
}

fn dir_digest(data_dir: &std::path::Path) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(data_dir.as_os_str().as_encoded_bytes()).into()
}
