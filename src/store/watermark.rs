//! How many group commits the embedded store had made durable, kept beside it in the
//! data dir as `commits`, so a damaged store is refused instead of served.
//!
//! sled recovers its log up to the first message it finds damaged and silently drops
//! the rest: a flipped byte, a zeroed page or a truncated `db` file opened as a store
//! that had lost most of its bookings, and served it (an outside test, 2026-12-05).
//! So every group commit on sled also writes its number in the store
//! ([`records::COMMITS_KEY`]), and the number last made durable is written to this
//! file at open, each second while serving (a thread of its own), and at a clean stop.
//! A store whose number is below the file's lost commits that were durable: [`check`]
//! refuses it.
//!
//! The file is only ever behind the store (it is written after the commits it names
//! were synced), so a crash never makes a sound store fail the check. It is not in the
//! store nor in backups: a restore writes into an empty data dir and starts anew.
//! PostgreSQL nodes keep none (their local copy is remade from PostgreSQL at each start).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::store::error::StoreError;
use crate::store::records;

pub const FILE_NAME: &str = "commits";

/// How often the serving store writes the file: what a damage found at the next start
/// can have hidden, at most (the commits of the last interval before a crash).
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The number a store holds (0: written before it was kept).
pub fn stored(db: &sled::Db) -> Result<u64, StoreError> {
    match db.get(records::COMMITS_KEY) {
        Ok(None) => Ok(0),
        Ok(Some(value)) => records::decode_commits(&value),
        Err(e) => Err(StoreError::Io(format!("reading the commit count: {e}"))),
    }
}

/// The number the file says was durable (`None`: no file, as before it was kept).
pub fn read(data_dir: &Path) -> Result<Option<u64>, StoreError> {
    let path = data_dir.join(FILE_NAME);
    match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io(format!("reading {}: {e}", path.display()))),
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            StoreError::Corrupt(format!(
                "{} is not a commit count: remove it if the store is known to be sound",
                path.display()
            ))
        }),
    }
}

/// Refuses a store holding fewer commits than were durable.
pub fn check(data_dir: &Path, stored: u64) -> Result<(), StoreError> {
    match read(data_dir)? {
        Some(durable) if stored < durable => Err(StoreError::Corrupt(format!(
            "the store under {dir} holds {stored} group commits, but {durable} were durable \
             when it was last served: its files are damaged and sled kept only what comes \
             before the damage. Restore the latest backup (`prenota restore`). If these \
             files were put back from a copy on purpose, remove {dir}/{FILE_NAME} first",
            dir = data_dir.display()
        ))),
        None if stored > 0 => {
            tracing::warn!(
                dir = %data_dir.display(),
                "no {FILE_NAME} file beside a store that holds commits (its first start \
                 on this build, or the file removed): this start cannot tell a store cut \
                 short; the count is kept from now on"
            );
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Writes `commits` to the file, whole or not at all (a temporary file synced, renamed,
/// and the directory synced).
pub fn write(data_dir: &Path, commits: u64) -> std::io::Result<()> {
    let path = data_dir.join(FILE_NAME);
    let temporary = data_dir.join(format!("{FILE_NAME}.new"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    writeln!(file, "{commits}")?;
    file.sync_all()?;
    crate::store::files::rename_durably(&temporary, &path)
}

/// Keeps the file of a store being served: checks the store against it at open,
/// writes it each [`INTERVAL`] from a thread of its own, and once more at shutdown.
pub struct Keeper {
    data_dir: PathBuf,
    /// The last commit made durable (the committer's `SledDurability` moves it).
    commits: Arc<AtomicU64>,
    thread: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl Keeper {
    /// Refuses `db` if it holds fewer commits than the file says were durable; then
    /// starts keeping the file.
    pub fn start(data_dir: &Path, db: &sled::Db) -> Result<Self, StoreError> {
        let stored = stored(db)?;
        check(data_dir, stored)?;
        // At once, not a second later: a kill in the first second must not leave a
        // store with commits and no file (the count is durable: `open_db_file`).
        let written = write_logged(data_dir, stored, false).then_some(stored);
        let commits = Arc::new(AtomicU64::new(stored));
        let (stop, stopped) = mpsc::channel();
        let (dir, durable) = (data_dir.to_path_buf(), Arc::clone(&commits));
        let thread = std::thread::Builder::new()
            .name("prenota-watermark".into())
            .spawn(move || keep(&dir, &durable, &stopped, written))
            .map_err(|e| StoreError::Io(format!("starting the commit count's thread: {e}")))?;
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            commits,
            thread: Some((stop, thread)),
        })
    }

    pub fn commits(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.commits)
    }

    /// After the committer stopped: stops the thread and writes the last count.
    pub fn finish(&mut self) {
        let Some((stop, thread)) = self.thread.take() else {
            return;
        };
        drop(stop);
        let _ = thread.join();
        write_logged(&self.data_dir, self.commits.load(Ordering::Acquire), false);
    }
}

/// Writes the file each [`INTERVAL`] while `durable` moves from what was `written`,
/// until `stop` is dropped. A failure is logged once until a write succeeds.
fn keep(data_dir: &Path, durable: &AtomicU64, stop: &mpsc::Receiver<()>, mut written: Option<u64>) {
    let mut failing = written.is_none();
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(INTERVAL) {
        let commits = durable.load(Ordering::Acquire);
        if written != Some(commits) {
            let wrote = write_logged(data_dir, commits, failing);
            (written, failing) = (wrote.then_some(commits).or(written), !wrote);
        }
    }
}

/// [`write`], a failure logged unless `quiet`: the file only guards the next start, so
/// nothing else comes of it. Whether it was written.
fn write_logged(data_dir: &Path, commits: u64, quiet: bool) -> bool {
    match write(data_dir, commits) {
        Ok(()) => true,
        Err(error) => {
            if !quiet {
                tracing::warn!(%error, "could not keep the commit count beside the store");
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_behind_the_file_is_refused_and_one_level_or_ahead_is_not() {
        let dir = tempfile::tempdir().unwrap();
        check(dir.path(), 0).expect("no file: nothing to compare");
        write(dir.path(), 42).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(42));
        check(dir.path(), 42).expect("level");
        check(dir.path(), 50).expect("ahead: commits after the file was written");
        let refused = check(dir.path(), 41).unwrap_err().to_string();
        assert!(
            refused.contains("holds 41 group commits, but 42"),
            "{refused}"
        );
        std::fs::write(dir.path().join(FILE_NAME), "forty-two\n").unwrap();
        assert!(read(dir.path()).is_err());
    }

    #[test]
    fn the_file_is_written_as_soon_as_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        db.insert(records::COMMITS_KEY, &records::encode_commits(7))
            .unwrap();
        let mut kept = Keeper::start(dir.path(), &db).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(7));
        kept.commits().store(9, Ordering::Release);
        kept.finish();
        assert_eq!(read(dir.path()).unwrap(), Some(9));
    }

    #[test]
    fn the_stored_count_has_its_golden_bytes() {
        assert_eq!(records::COMMITS_KEY, b"Kcommits");
        assert_eq!(records::encode_commits(258), [0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(records::decode_commits(&[0, 0, 0, 0, 0, 0, 1, 2]), Ok(258));
        assert!(records::decode_commits(&[1, 2]).is_err());
    }
}
