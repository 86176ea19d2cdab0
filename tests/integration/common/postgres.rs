//! PostgreSQL for the backend tests: `PRENOTA_TEST_POSTGRES_URL`, or else a throwaway
//! server on loopback that `scripts/postgres-test-server` starts for this test process
//! (and stops once it exits). Every store gets a schema of its own.
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
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres-test-server");
            let started = Command::new(script)
                .args(["--until-pid", &std::process::id().to_string()])
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
        })
        .as_deref()
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
