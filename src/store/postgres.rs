//! The PostgreSQL backend (PRODUCT.md part F): PostgreSQL holds the durable records,
//! one node at a time writes them, and that node keeps a local copy the engine reads.
//!
//! - Records are the same keys and values as in sled, in one table (`prenota_kv`).
//! - Every group commit is one PostgreSQL transaction (synchronous commit, the server's
//!   default), so PostgreSQL's replication carries every acknowledged write. After it
//!   commits, the batch is applied to the node's local sled, which is only a read copy:
//!   it is never synced, and it is made again from PostgreSQL at every start.
//! - The lease: the active node holds a session advisory lock and bumps the epoch row
//!   (`prenota_lease`) when it takes it; every commit transaction first reads the epoch
//!   `FOR SHARE` and gives up if it changed, so a node that lost the lease can never
//!   write (the row lock orders a takeover after any commit in flight). The holder
//!   renews its own row (`prenota_lease_holder`: who, for which epoch, renewed when;
//!   apart, so a renewal never waits for commits); a standby that finds it not renewed
//!   for `lease_ttl_ms` ends the holder's sessions (found by its `application_name`),
//!   which frees the lock, and takes over.
//! - A node that loses the lease fails stop: every write is refused with NOT_ACTIVE until
//!   a restart, and the keeper stops renewing and closes its session, letting the lock go.
//!
//! Tables live in the connection's `current_schema()` (the first existing schema of its
//! `search_path`, by default `public`);
//! the locks are scoped to it, so several stores can share one database.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Statement};

pub use crate::config::PostgresSettings;
use crate::store::committer::{self, sled_batch, CommitterState, Durability};
use crate::store::error::StoreError;
use crate::store::lease_freshness::LeaseFreshness;
use crate::store::records::{Change, ID_SCHEME_KEY, KEY_CHECK_KEY};

/// Advisory lock classes (the second key is the schema's hash).
const LEASE_LOCK_CLASS: i32 = 0x7072_6e74; // "prnt"
const MIGRATION_LOCK_CLASS: i32 = 0x7072_6e6d; // "prnm"

/// The schema, one step per version; a store records the steps it has taken.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE prenota_kv (k bytea PRIMARY KEY, v bytea NOT NULL);
    CREATE TABLE prenota_lease (
        id int PRIMARY KEY CHECK (id = 1),
        epoch bigint NOT NULL,
        holder text NOT NULL,
        renewed_at timestamptz NOT NULL
    );
    INSERT INTO prenota_lease VALUES (1, 0, '', now());
    ",
    // Renewals in a row of their own: they never wait for a commit's FOR SHARE.
    "
    CREATE TABLE prenota_lease_holder (
        id int PRIMARY KEY CHECK (id = 1),
        epoch bigint NOT NULL,
        holder text NOT NULL,
        renewed_at timestamptz NOT NULL
    );
    INSERT INTO prenota_lease_holder SELECT id, epoch, holder, renewed_at FROM prenota_lease;
    ALTER TABLE prenota_lease DROP COLUMN holder, DROP COLUMN renewed_at;
    ",
    // Events stored in runs (format 2 of events): no change of tables, but a build
    // before it would misread the log and reuse its sequences, so it must refuse.
    "COMMENT ON TABLE prenota_kv IS 'prenota records; events in runs since schema 3'",
    // Holds keyed by the second they were made (`O`): a build before it would not see
    // them (the live holds this build made would stop counting), so it must refuse.
    "COMMENT ON TABLE prenota_kv IS 'prenota records; holds in time order since schema 4'",
    // Events of format 2 (their booking's reference and series dose) and campaigns of
    // format 2 (their end): a build before it would find them corrupt, so it must
    // refuse the schema instead.
    "COMMENT ON TABLE prenota_kv IS 'prenota records; events of format 2 since schema 5'",
];

/// Rows copied into the local store per sled batch at start-up.
const LOAD_CHUNK_ROWS: usize = 10_000;

fn pg_error(what: &str) -> impl Fn(postgres::Error) -> StoreError + '_ {
    move |e| StoreError::Io(format!("PostgreSQL, {what}: {}", said(&e)))
}

/// An error as PostgreSQL said it: the client's kind ("db error") and the causes under
/// it (the server's own message: a failed password, a missing database or schema).
fn said(error: &postgres::Error) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        text.push_str(&format!(": {inner}"));
        cause = inner.source();
    }
    text
}

/// A new session named `node` (so a standby can end it once its lease lapsed).
pub fn connect(url: &str, node: &str) -> Result<Client, StoreError> {
    let crate::store::postgres_tls::Target { mut config, tls } =
        crate::store::postgres_tls::target(url).map_err(StoreError::Io)?;
    config.application_name(node);
    config.connect_timeout(Duration::from_secs(10));
    // A peer gone silent (a cut cable) is noticed in seconds, not hours.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(5));
    config.keepalives_interval(Duration::from_secs(2));
    config.keepalives_retries(3);
    // A call whose bytes go unacknowledged ends, so a stuck node can exit and restart.
    config.tcp_user_timeout(Duration::from_secs(10));
    let mut client = config.connect(tls).map_err(pg_error("connecting"))?;
    unset_session_timeouts(&mut client).map_err(pg_error("setting up the session"))?;
    Ok(client)
}

/// A role's or database's timeouts are meant for people's sessions, not prenota's:
/// `idle_session_timeout` would end a quiet node's commit session (it would stop being
/// the active node), and a `statement_timeout` cancelling a COMMIT that waits for a
/// synchronous replica leaves it committed on the primary only, yet answered as a
/// success: an acknowledgement the replica may not have (`transaction_timeout`, on
/// PostgreSQL 17, likewise). prenota's own bounds are the TCP timeouts above, the
/// lease's `lock_timeout` and the request timeout; a commit stuck on a replica that is
/// gone holds the write queue (requests then time out or are shed), it never answers.
fn unset_session_timeouts(client: &mut Client) -> Result<(), postgres::Error> {
    client
        .batch_execute("SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0")?;
    let version: String = client.query_one("SHOW server_version_num", &[])?.get(0);
    let version = version.parse::<u32>().unwrap_or(0);
    if version >= 140_000 {
        client.batch_execute("SET idle_session_timeout = 0")?;
    }
    if version >= 170_000 {
        client.batch_execute("SET transaction_timeout = 0")?;
    }
    Ok(())
}

/// Brings the schema up to date (once, under a lock, if several nodes start together).
/// Refuses a schema from a newer prenota.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let error = pg_error("migrating the schema");
    let mut tx = client.transaction().map_err(&error)?;
    migrate_in(&mut tx)?;
    tx.commit().map_err(&error)
}

/// `migrate` inside `tx`: the steps are made (and kept) only if `tx` commits.
fn migrate_in(tx: &mut postgres::Transaction<'_>) -> Result<(), StoreError> {
    let error = pg_error("migrating the schema");
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))",
        &[&MIGRATION_LOCK_CLASS],
    )
    .map_err(&error)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS prenota_schema (version int NOT NULL)")
        .map_err(&error)?;
    let version = known_schema_version(tx).map_err(&error)??;
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql).map_err(&error)?;
        tx.execute(
            "INSERT INTO prenota_schema VALUES ($1)",
            &[&(step as i32 + 1)],
        )
        .map_err(&error)?;
        tracing::info!(version = step + 1, "PostgreSQL schema migrated");
    }
    Ok(())
}

/// Whether the store's tables were made (by a first node or `prenota migrate`) in the
/// schema `migrate` makes them in (`current_schema()`, not any later one of the
/// `search_path`).
fn has_records_table(client: &mut Client) -> Result<bool, postgres::Error> {
    let made = "SELECT to_regclass(quote_ident(current_schema()) || '.prenota_kv') IS NOT NULL";
    Ok(client.query_one(made, &[])?.get(0))
}

/// This node's name in `pg_stat_activity`: unique per process.
fn node_name() -> String {
    format!(
        "prenota-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A node waiting for the lease, seen from outside: the gates read `waiting` (to
/// answer NOT_ACTIVE), shutdown sets `give_up`.
#[derive(Debug, Default)]
pub struct Standby {
    /// Set while another node holds the lease.
    pub waiting: AtomicBool,
    /// Set when the node shuts down: stop waiting, take nothing.
    pub give_up: AtomicBool,
    /// Set by `Lease::acquire` when it stopped because of `give_up`.
    pub gave_up: AtomicBool,
    /// Once the lease is held: whether this node may still answer from memory.
    pub lease: Arc<LeaseFreshness>,
}

impl Standby {
    /// Whether shutdown began; if so, records that the wait was given up.
    pub fn giving_up(&self) -> bool {
        let giving_up = self.give_up.load(Ordering::Acquire);
        if giving_up {
            self.gave_up.store(true, Ordering::Release);
        }
        giving_up
    }
}

/// The lease, held: this node is the active one for `epoch`.
pub struct Lease {
    pub settings: PostgresSettings,
    pub node: String,
    pub epoch: i64,
    /// The session holding the advisory lock; renews the lease row.
    session: Client,
    freshness: Arc<LeaseFreshness>,
}

impl Lease {
    /// Blocks until this node holds the lease (`standby.waiting` set while another node
    /// does), or until `standby.give_up` (`StoreError::Closed`). Migrates the schema
    /// first, once the store is known to be this node's. Lost connections are retried:
    /// a standby outlives a PostgreSQL restart.
    /// A store written with another citizen hash key than the one `identity.key_check`
    /// names, or under another id scheme, is refused at once, before standing by, and
    /// while standing by (the active node may write them after this node started): a
    /// standby that could never take over says so now, not at the failover.
    pub fn acquire(
        settings: &PostgresSettings,
        standby: &Standby,
        identity: &StoreIdentity,
    ) -> Result<Self, StoreError> {
        let node = node_name();
        let mut session: Option<Client> = None;
        let mut last_problem = String::new();
        // A first connection that fails is a configuration to fix, not a wait.
        let mut connected = false;
        while !standby.giving_up() {
            let attempt = match session.as_mut() {
                None => match open_session(&settings.url, &node, identity) {
                    Ok(client) => {
                        connected = true;
                        session = Some(client);
                        Ok(())
                    }
                    Err(first) if !connected => return Err(first),
                    Err(problem) => Err(problem),
                },
                Some(client) => match try_take(client, (&node, settings.lease_ttl), &standby.lease)
                {
                    Ok(Some(epoch)) => {
                        tracing::info!(epoch, node, "took the lease: this node is active");
                        let session = session.expect("a session took the lease");
                        return Ok(Self {
                            settings: settings.clone(),
                            node,
                            epoch,
                            session,
                            freshness: Arc::clone(&standby.lease),
                        });
                    }
                    Ok(None) => {
                        if !standby.waiting.swap(true, Ordering::AcqRel) {
                            tracing::info!("another node holds the lease: standing by");
                        }
                        std::thread::sleep(poll_interval(settings.lease_ttl));
                        identity.refuse_another(client)
                    }
                    Err(problem) => Err(problem),
                },
            };
            match attempt {
                Ok(()) => {}
                // A schema from a newer prenota, another key file: waiting changes nothing.
                Err(fatal @ (StoreError::Corrupt(_) | StoreError::Misconfigured(_))) => {
                    return Err(fatal)
                }
                Err(problem) => {
                    let problem = problem.to_string();
                    if problem != last_problem {
                        tracing::warn!(%problem, "waiting for the lease; retrying");
                        last_problem = problem;
                    }
                    // Closing the session lets go of a lock it may have taken.
                    session = None;
                    std::thread::sleep(poll_interval(settings.lease_ttl));
                }
            }
        }
        Err(StoreError::Closed)
    }

    /// Renews the lease every quarter of its lifetime until `stop` is sent (a clean
    /// shutdown: the lease is then marked let go, `let_go`) or dropped. Stops
    /// renewing once the store failed (a standby then takes over, since a failed store
    /// refuses every write until restart); on a failed renewal (the epoch moved on, the
    /// session was ended) fails the store: health turns NOT_SERVING. A watchdog fails it
    /// too when no renewal succeeded for three quarters of the lease (a renewal stuck on a
    /// silent network), before a standby may take over.
    pub fn keep(
        mut self,
        state: Arc<CommitterState>,
        stop: mpsc::Receiver<()>,
    ) -> std::io::Result<JoinHandle<()>> {
        let (watch_stop, watch_stopped) = mpsc::channel::<()>();
        let watchdog = watch_renewals(
            Arc::clone(&state),
            Arc::clone(&self.freshness),
            self.settings.lease_ttl,
            watch_stopped,
        )?;
        std::thread::Builder::new()
            .name("prenota-lease".into())
            .spawn(move || {
                // Until stopped: closing the session frees the lock. Each renewal is
                // due a quarter of the lease after the last one was sent (freshness
                // counts from there, however long its round trip).
                let shut_down = loop {
                    match stop.recv_timeout(self.until_due()) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        // Sent by `Store::shutdown`, once every answer was given.
                        Ok(()) => break true,
                        // Dropped without it (a start that failed): no promise made.
                        Err(mpsc::RecvTimeoutError::Disconnected) => break false,
                    }
                    if state.failed.load(Ordering::Acquire) {
                        tracing::warn!("the store failed: letting the lease go to a standby");
                        self.freshness.lost();
                        break false;
                    }
                    let sent_ms = self.freshness.now_ms();
                    if let Err(error) = self.renew() {
                        tracing::error!(%error, "lost the lease");
                        committer::fail_stop(&state, &StoreError::NotActive);
                        self.freshness.lost();
                        break false;
                    }
                    self.freshness.renewed(sent_ms);
                };
                drop(watch_stop);
                let _ = watchdog.join();
                if shut_down && !state.failed.load(Ordering::Acquire) && self.freshness.fresh() {
                    self.freshness.lost();
                    self.let_go();
                }
            })
    }

    /// How long until the next renewal is due.
    fn until_due(&self) -> Duration {
        let period = self.settings.lease_ttl / 4;
        let since_sent = self
            .freshness
            .now_ms()
            .saturating_sub(self.freshness.sent_ms());
        period.saturating_sub(Duration::from_millis(since_sent))
    }

    /// Shut down (every answer given, the store closed): says so, so the next node
    /// need not wait out this one's last renewal (`previous_holder`). Best effort: if
    /// it fails, the next node waits.
    fn let_go(&mut self) {
        let let_go = self.session.execute(
            "UPDATE prenota_lease_holder SET holder = '' WHERE id = 1 AND epoch = $1",
            &[&self.epoch],
        );
        if let Err(error) = let_go {
            tracing::debug!(%error, "could not mark the lease let go");
        }
    }

    fn renew(&mut self) -> Result<(), StoreError> {
        let renewed = self
            .session
            .execute(
                "UPDATE prenota_lease_holder SET renewed_at = clock_timestamp() \
                 WHERE id = 1 AND epoch = $1",
                &[&self.epoch],
            )
            .map_err(pg_error("renewing the lease"))?;
        match renewed {
            1 => Ok(()),
            _ => Err(StoreError::NotActive),
        }
    }
}

/// Refuses a store whose key check value is not `key_check` (recovery checks it
/// again; here a node with the wrong key file fails before it stands by).
/// What a node hashes citizens with: the check value of its `[citizens]` key
/// (`key_file::check_value`) and its id scheme's name. The store records both.
pub struct StoreIdentity {
    pub key_check: Vec<u8>,
    pub id_scheme: &'static str,
}

impl StoreIdentity {
    /// Refuses (`Misconfigured`) a store that recorded another key or id scheme.
    fn refuse_another(&self, session: &mut Client) -> Result<(), StoreError> {
        let keys: [&[u8]; 2] = [KEY_CHECK_KEY, ID_SCHEME_KEY];
        let error = pg_error("reading the key check and id scheme");
        if !has_records_table(session).map_err(&error)? {
            return Ok(()); // a new store: the first node writes them
        }
        let rows = session
            .query(
                "SELECT k, v FROM prenota_kv WHERE k = ANY($1)",
                &[&&keys[..]],
            )
            .map_err(&error)?;
        for row in rows {
            let (key, stored): (Vec<u8>, Vec<u8>) = (row.get(0), row.get(1));
            if key == KEY_CHECK_KEY && stored != self.key_check {
                return Err(StoreError::Misconfigured(
                    "[citizens] hash_key_file is not the key this PostgreSQL store was \
                     written with: with it no stored booking could be found. Give every \
                     node the store's own key file"
                        .into(),
                ));
            }
            if key == ID_SCHEME_KEY && stored != self.id_scheme.as_bytes() {
                return Err(StoreError::Misconfigured(format!(
                    "the PostgreSQL store was written with [citizens] id_scheme = {:?}, \
                     this node's configuration says {:?}: its citizens would no longer \
                     find their bookings and could book again. Give every node the \
                     store's id scheme",
                    String::from_utf8_lossy(&stored),
                    self.id_scheme
                )));
            }
        }
        Ok(())
    }
}

/// The store's schema version, refused (`Corrupt`) if a newer prenota wrote it.
fn known_schema_version(
    tx: &mut postgres::Transaction<'_>,
) -> Result<Result<i32, StoreError>, postgres::Error> {
    let version: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM prenota_schema", &[])?
        .get(0);
    let known = MIGRATIONS.len() as i32;
    Ok(match version > known {
        true => Err(StoreError::Corrupt(format!(
            "the PostgreSQL schema is version {version}, this prenota knows {known}: \
             run the newer prenota"
        ))),
        false => Ok(version),
    })
}

/// A session for the lease, with the schema brought up to date once the store is
/// known to be this node's (`identity`): a node refused for another key file or id
/// scheme changes nothing, not even the schema (an older standby could no longer
/// take over a store migrated past it).
fn open_session(url: &str, node: &str, identity: &StoreIdentity) -> Result<Client, StoreError> {
    let mut session = connect(url, node)?;
    identity.refuse_another(&mut session)?;
    migrate(&mut session)?;
    // A takeover waits this long at most for a commit in flight (which holds the
    // epoch row); then it lets go of the lock and tries again.
    session
        .batch_execute("SET lock_timeout = '5s'")
        .map_err(pg_error("taking the lease"))?;
    Ok(session)
}

/// One try: the new epoch if this node now holds the lease (`freshness` then timed
/// from just before the statement that starts the lease's clock). Without the lock,
/// ends the holder's sessions if it stopped renewing, so a later try gets the lock.
fn try_take(
    session: &mut Client,
    (node, lease_ttl): (&str, Duration),
    freshness: &LeaseFreshness,
) -> Result<Option<i64>, StoreError> {
    let error = pg_error("taking the lease");
    let locked: bool = session
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext(current_schema()))",
            &[&LEASE_LOCK_CLASS],
        )
        .map_err(&error)?
        .get(0);
    if !locked {
        end_lapsed_holder(session, lease_ttl)?;
        return Ok(None);
    }
    // The previous holder's lock is gone, but a session of it may remain (paused in a
    // commit, holding the epoch row): end it, so the update below need not wait.
    let (previous, previous_left) = previous_holder(session, lease_ttl)?;
    if !previous.is_empty() && previous != node {
        end_sessions_of(session, &previous)?;
    }
    let mut tx = session.transaction().map_err(&error)?;
    // A newer prenota may have migrated the schema since this session opened: never
    // take over a store written in a format this build does not know.
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))",
        &[&MIGRATION_LOCK_CLASS],
    )
    .map_err(&error)?;
    known_schema_version(&mut tx).map_err(&error)??;
    let epoch: i64 = tx
        .query_one(
            "UPDATE prenota_lease SET epoch = epoch + 1 WHERE id = 1 RETURNING epoch",
            &[],
        )
        .map_err(&error)?
        .get(0);
    let sent_ms = freshness.now_ms();
    tx.execute(
        "UPDATE prenota_lease_holder SET epoch = $1, holder = $2, \
         renewed_at = clock_timestamp() WHERE id = 1",
        &[&epoch, &node],
    )
    .map_err(&error)?;
    tx.commit().map_err(&error)?;
    freshness.held(sent_ms, lease_ttl, previous_left);
    Ok(Some(epoch))
}

/// The previous holder (empty if none, or if it let the lease go when it stopped) and
/// how long it may still answer from memory: until three quarters of the lease after
/// its last renewal (which it timed from before sending it, so before PostgreSQL
/// stamped it), plus a twentieth for clocks that run at slightly different rates.
/// Read once the lock is held: no renewal of that holder can land after it.
fn previous_holder(
    session: &mut Client,
    lease_ttl: Duration,
) -> Result<(String, Duration), StoreError> {
    let answers_for = LeaseFreshness::limit(lease_ttl) + lease_ttl / 20;
    let row = session
        .query_one(
            "SELECT holder, greatest(0, extract(epoch FROM renewed_at - clock_timestamp())::float8 \
             * 1000 + $1) FROM prenota_lease_holder WHERE id = 1",
            &[&(answers_for.as_secs_f64() * 1000.0)],
        )
        .map_err(pg_error("taking the lease"))?;
    let (holder, left_ms): (String, f64) = (row.get(0), row.get(1));
    let left = match holder.is_empty() {
        true => Duration::ZERO,
        false => {
            let left_ms = left_ms.clamp(0.0, answers_for.as_secs_f64() * 1000.0);
            Duration::from_secs_f64(left_ms / 1000.0)
        }
    };
    Ok((holder, left))
}

/// Fails the store (NOT_ACTIVE) once the last renewal that got through (`freshness`,
/// timed from before it was sent) is older than three quarters of `lease_ttl` (half of
/// it after the next one was due: a margin for a slow round trip on a loaded machine);
/// marks the lease lost as soon as the store failed otherwise (a commit); ends when
/// `stop` is dropped.
fn watch_renewals(
    state: Arc<CommitterState>,
    freshness: Arc<LeaseFreshness>,
    lease_ttl: Duration,
    stop: mpsc::Receiver<()>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("prenota-lease-watch".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                stop.recv_timeout(poll_interval(lease_ttl))
            {
                if state.failed.load(Ordering::Acquire) {
                    // The store failed (a commit): no more answers from memory either,
                    // without waiting for the next renewal to notice.
                    freshness.lost();
                    return;
                }
                let Some(silent_ms) = freshness.overdue_ms() else {
                    continue;
                };
                freshness.lost();
                if !state.failed.load(Ordering::Acquire) {
                    tracing::error!(silent_ms, "no lease renewal got through: standing down");
                    committer::fail_stop(&state, &StoreError::NotActive);
                    return;
                }
            }
        })
}

/// How often a standby looks at the lease.
fn poll_interval(lease_ttl: Duration) -> Duration {
    (lease_ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Ends the sessions of a holder that has not renewed for `lease_ttl` (paused, cut off,
/// dead with its connections half-open), so its advisory lock and any row lock go.
fn end_lapsed_holder(session: &mut Client, lease_ttl: Duration) -> Result<(), StoreError> {
    let row = session
        .query_one(
            "SELECT holder, now() - renewed_at > make_interval(secs => $1) \
             FROM prenota_lease_holder WHERE id = 1",
            &[&lease_ttl.as_secs_f64()],
        )
        .map_err(pg_error("checking the lease"))?;
    let (holder, lapsed): (String, bool) = (row.get(0), row.get(1));
    if lapsed && !holder.is_empty() {
        end_sessions_of(session, &holder)?;
    }
    Ok(())
}

/// Ends every session of the node named `holder` in this database.
fn end_sessions_of(session: &mut Client, holder: &str) -> Result<(), StoreError> {
    let ended: i64 = session
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1 AND datname = current_database()",
            &[&holder],
        )
        .map_err(pg_error("ending a lapsed holder's sessions"))?
        .get(0);
    if ended > 0 {
        tracing::warn!(
            holder,
            ended,
            "ended the sessions of the previous lease holder"
        );
    }
    Ok(())
}

/// Copies every record into the (empty) local store; returns how many.
pub fn load(client: &mut Client, local: &sled::Db) -> Result<u64, StoreError> {
    let error = pg_error("reading the records");
    let mut rows = client
        .query_raw("SELECT k, v FROM prenota_kv", std::iter::empty::<i32>())
        .map_err(&error)?;
    let (mut loaded, mut chunk) = (0u64, Vec::with_capacity(LOAD_CHUNK_ROWS));
    let apply = |chunk: &mut Vec<Change>| {
        local
            .apply_batch(sled_batch(chunk))
            .map_err(|e| StoreError::Io(format!("loading the local copy: {e}")))?;
        chunk.clear();
        Ok::<_, StoreError>(())
    };
    while let Some(row) = rows.next().map_err(&error)? {
        chunk.push((row.get::<_, Vec<u8>>(0), Some(row.get::<_, Vec<u8>>(1))));
        loaded += 1;
        if chunk.len() == LOAD_CHUNK_ROWS {
            apply(&mut chunk)?;
        }
    }
    apply(&mut chunk)?;
    Ok(loaded)
}

/// Copies `records` (a stopped sled store's, every one) into the empty PostgreSQL store
/// at `url`, in one transaction with the schema's migration: all or nothing (a refused
/// or failed copy leaves even the schema as it was). Holds the lease's lock meanwhile,
/// and refuses a store a node holds or one that has records. `progress(copied)` after
/// each chunk.
pub fn copy_into(
    records: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>>,
    url: &str,
    mut progress: impl FnMut(u64),
) -> Result<u64, StoreError> {
    let node = node_name();
    let mut session = connect(url, &node)?;
    let error = pg_error("copying the records");
    let locked: bool = session
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext(current_schema()))",
            &[&LEASE_LOCK_CLASS],
        )
        .map_err(&error)?
        .get(0);
    if !locked {
        return Err(StoreError::Io(
            "a prenota node holds the lease on this PostgreSQL store: stop every node first".into(),
        ));
    }
    let present: i64 = match has_records_table(&mut session).map_err(&error)? {
        true => session
            .query_one("SELECT count(*) FROM prenota_kv", &[])
            .map_err(&error)?
            .get(0),
        false => 0,
    };
    if present > 0 {
        return Err(StoreError::Io(format!(
            "the PostgreSQL store already holds {present} records: migrate into an empty \
             one (a new database or schema), before any node starts on it"
        )));
    }
    pin_synchronous_commit(&mut session).map_err(&error)?;
    let mut tx = session.transaction().map_err(&error)?;
    migrate_in(&mut tx)?;
    let insert = tx
        .prepare("INSERT INTO prenota_kv (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[])")
        .map_err(&error)?;
    let (mut copied, mut keys, mut values) = (0u64, Vec::new(), Vec::new());
    let mut records = records.peekable();
    while records.peek().is_some() {
        keys.clear();
        values.clear();
        for record in records.by_ref().take(LOAD_CHUNK_ROWS) {
            let (key, value) = record?;
            keys.push(key);
            values.push(value);
        }
        tx.execute(&insert, &[&keys, &values]).map_err(&error)?;
        copied += keys.len() as u64;
        progress(copied);
    }
    tx.commit().map_err(&error)?;
    Ok(copied)
}

/// An acknowledgement promises durability: a session's commits wait at least for the
/// server's own flush and for its synchronous replicas to have it (`on`), or for them to
/// have applied it (`remote_apply`, kept). Set on the session, so a configuration
/// reload lowering the server's default changes nothing.
fn pin_synchronous_commit(client: &mut Client) -> Result<(), postgres::Error> {
    let level: String = client.query_one("SHOW synchronous_commit", &[])?.get(0);
    let pinned = match level.as_str() {
        "remote_apply" => "remote_apply",
        _ => "on",
    };
    if level != pinned {
        tracing::warn!(
            level,
            "synchronous_commit raised to on for prenota's commits"
        );
    }
    client.batch_execute(&format!("SET synchronous_commit = {pinned}"))
}

/// Opens the node's local read copy under `dir`, empty (whatever a previous run left
/// there is removed: PostgreSQL is the truth).
pub fn open_local_copy(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let io = |e: std::io::Error| StoreError::Io(format!("clearing {}: {e}", dir.display()));
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    sled::Config::new()
        .path(dir)
        .temporary(true)
        .cache_capacity(cache_bytes)
        .open()
        .map_err(|e| StoreError::Io(format!("opening the local copy: {e}")))
}

/// A failed commit. A session that was ended (by a standby taking the lease) or lost
/// can never commit again: this node is no longer the active one.
fn commit_error(e: postgres::Error) -> StoreError {
    if e.is_closed() || e.code() == Some(&postgres::error::SqlState::ADMIN_SHUTDOWN) {
        tracing::error!(error = said(&e), "the commit session ended");
        return StoreError::NotActive;
    }
    StoreError::Io(format!("PostgreSQL, committing: {}", said(&e)))
}

/// The committer's durability on PostgreSQL: one fenced transaction per group commit,
/// then the same changes applied to the local copy.
pub struct PostgresDurability {
    client: Client,
    epoch: i64,
    local: sled::Db,
    gate: crate::store::committer::ApplyGate,
    fence: Statement,
    upsert: Statement,
    delete: Statement,
}

impl PostgresDurability {
    pub fn new(
        mut client: Client,
        epoch: i64,
        (local, gate): (sled::Db, crate::store::committer::ApplyGate),
    ) -> Result<Self, StoreError> {
        let error = pg_error("preparing statements");
        pin_synchronous_commit(&mut client).map_err(&error)?;
        let fence = client
            .prepare("SELECT epoch FROM prenota_lease WHERE id = 1 FOR SHARE")
            .map_err(&error)?;
        let upsert = client
            .prepare(
                "INSERT INTO prenota_kv (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                 ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
            )
            .map_err(&error)?;
        let delete = client
            .prepare("DELETE FROM prenota_kv WHERE k = ANY($1::bytea[])")
            .map_err(&error)?;
        Ok(Self {
            client,
            epoch,
            local,
            gate,
            fence,
            upsert,
            delete,
        })
    }
}

impl Durability for PostgresDurability {
    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let error = commit_error;
        // The last change of each key wins, as in a sled batch.
        let mut latest = BTreeMap::new();
        for (key, value) in changes {
            latest.insert(key.as_slice(), value.as_deref());
        }
        let (mut keys, mut values, mut removed) = (Vec::new(), Vec::new(), Vec::new());
        for (key, value) in latest {
            match value {
                Some(value) => {
                    keys.push(key);
                    values.push(value);
                }
                None => removed.push(key),
            }
        }
        let mut tx = self.client.transaction().map_err(&error)?;
        let epoch: i64 = tx.query_one(&self.fence, &[]).map_err(&error)?.get(0);
        if epoch != self.epoch {
            return Err(StoreError::NotActive);
        }
        if !keys.is_empty() {
            tx.execute(&self.upsert, &[&keys, &values])
                .map_err(&error)?;
        }
        if !removed.is_empty() {
            tx.execute(&self.delete, &[&removed]).map_err(&error)?;
        }
        tx.commit().map_err(&error)?;
        self.gate
            .apply(&self.local, crate::store::committer::sled_batch(changes))
            .map_err(|e| StoreError::Io(format!("applying to the local copy: {e}")))
    }
}
