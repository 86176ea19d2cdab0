//! Notices the data dir's filesystem turning read-only (a kernel remounts ext4 so after
//! an I/O error, `errors=remount-ro`) while the store writes nothing: a thread of its
//! own reads the mount's flags (`statvfs`, nothing written) each [`INTERVAL`] and fails
//! the store, as a failed write would, so health says `NOT_SERVING` and a balancer
//! moves citizens to another node before one of them meets the failure. An idle server
//! used to say `SERVING` until its next write failed. Only sled's data dir: a
//! PostgreSQL node learns of its store through the lease.
//!
//! A full disk is not looked for here: sled may still write into space it holds.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::store::committer::{self, CommitterState};
use crate::store::error::StoreError;

/// How often the mount's flags are read: how long an idle store may still say
/// `SERVING` on a read-only filesystem.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Whether the filesystem holding `dir` is mounted read-only.
pub fn mounted_read_only(dir: &Path) -> std::io::Result<bool> {
    let flags = rustix::fs::statvfs(dir)?.f_flag;
    Ok(flags.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// The watching thread; stopped when dropped.
pub struct Watch {
    thread: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl Watch {
    /// Watches `dir` with `read_only` (`mounted_read_only`, or a test's) each
    /// `interval`, failing `state` the first time it says so.
    pub fn start(
        dir: &Path,
        state: Arc<CommitterState>,
        read_only: fn(&Path) -> std::io::Result<bool>,
        interval: Duration,
    ) -> Result<Self, StoreError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let dir: PathBuf = dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("prenota-read-only-watch".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    // An error (the dir gone) says nothing of the mount: the next write will.
                    if read_only(&dir).unwrap_or(false) {
                        let error = StoreError::Io(format!(
                            "the filesystem of {} is mounted read-only",
                            dir.display()
                        ));
                        committer::fail_stop(&state, &error);
                        return;
                    }
                }
            })
            .map_err(|e| StoreError::Io(format!("starting the read-only watch: {e}")))?;
        Ok(Self {
            thread: Some((stop, thread)),
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.thread.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    static GONE_READ_ONLY: AtomicBool = AtomicBool::new(false);

    fn as_flagged(_dir: &Path) -> std::io::Result<bool> {
        Ok(GONE_READ_ONLY.load(Ordering::Acquire))
    }

    /// Nothing is written meanwhile: the mount's flag alone fails the store, which
    /// then turns unhealthy and refuses writes (`STORAGE_FAILED`).
    #[test]
    fn a_store_writing_nothing_fails_once_its_filesystem_turns_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(CommitterState::new(0));
        let healthy = state.healthy.subscribe();
        let interval = Duration::from_millis(10);
        let _watch = Watch::start(dir.path(), Arc::clone(&state), as_flagged, interval).unwrap();
        std::thread::sleep(interval * 5);
        assert!(
            !state.failed.load(Ordering::Acquire),
            "writable: still serving"
        );
        GONE_READ_ONLY.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !state.failed.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "never noticed");
            std::thread::sleep(interval);
        }
        assert!(!*healthy.borrow());
        assert_eq!(state.refusal(), StoreError::Failed);
    }

    /// The real reading: a temporary dir is writable; a mount the kernel lists as
    /// read-only (a container's `/sys`, `/proc/sys`), if any, reads so.
    #[test]
    fn the_mount_flags_are_read_as_the_kernel_lists_them() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!mounted_read_only(dir.path()).unwrap());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        for line in mounts.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let (point, options) = (fields[1], fields[3]);
            if options.split(',').any(|option| option == "ro") && !point.contains('\\') {
                let read = mounted_read_only(Path::new(point));
                assert!(read.is_err() || read.unwrap(), "{line}");
            }
        }
    }
}
