//! How large recovery's three big hash tables were when last counted (after a recovery,
//! after each retention pass, at shutdown), kept in the data dir as `recovery-sizes`,
//! so the next recovery sizes them once instead of growing them by doubling: each
//! growth copies the table and has the kernel zero fresh pages, and a 5M-booking
//! recovery took ~15% less time sized (BENCHMARKS.md, "Recovery sizes its tables").
//!
//! Only a hint, never the truth: it is not in the store, not in backups and not synced.
//! A missing, unreadable or implausible file sizes nothing (recovery then grows its
//! tables as before). A hint larger than what is recovered (request records that
//! expired while the server was down, a PostgreSQL node's hint from before a failover)
//! costs memory the previous run had anyway; restore only writes into an empty data
//! dir, so a hint never outlives its store.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub const FILE_NAME: &str = "recovery-sizes";

/// Stored bytes per entry below which a hint is implausible (a booking record with its
/// two index keys is over 150 bytes; a request record lives inside its booking), so a
/// damaged file cannot make recovery reserve more memory than the store could fill.
const STORED_BYTES_PER_ENTRY_MIN: u64 = 32;

/// A hint file is three short lines; more is not one.
const FILE_BYTES_MAX: u64 = 256;

/// Entries in the indexes recovery rebuilds from the bookings.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IndexSizes {
    /// Bookings with a reference (`BookingIndex`).
    pub bookings: u64,
    /// (citizen, service) entries with an active booking (`CitizenIndex`).
    pub citizens: u64,
    /// Remembered finished requests (`RequestRegistry`).
    pub requests: u64,
}

impl IndexSizes {
    fn fields(&self) -> [(&'static str, u64); 3] {
        [
            ("bookings", self.bookings),
            ("citizens", self.citizens),
            ("requests", self.requests),
        ]
    }

    /// The hint in `data_dir`, or all zero if there is none, it does not parse, or an
    /// entry count is more than a store of `store_bytes` could hold.
    pub fn read(data_dir: &Path, store_bytes: u64) -> Self {
        let Some(text) = read_short_file(&data_dir.join(FILE_NAME)) else {
            return Self::default();
        };
        let ceiling = store_bytes / STORED_BYTES_PER_ENTRY_MIN;
        match Self::parse(&text) {
            Some(sizes) if sizes.fields().iter().all(|(_, n)| *n <= ceiling) => sizes,
            _ => Self::default(),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let mut sizes = Self::default();
        for line in text.lines() {
            let (name, count) = line.split_once(' ')?;
            let count = count.parse().ok()?;
            match name {
                "bookings" => sizes.bookings = count,
                "citizens" => sizes.citizens = count,
                "requests" => sizes.requests = count,
                _ => return None,
            }
        }
        Some(sizes)
    }

    /// Replaces the hint in `data_dir` (a new file renamed over the old: a reader never
    /// sees half of one; a link planted in its place is not followed).
    pub fn write(&self, data_dir: &Path) -> std::io::Result<()> {
        let text: String = self
            .fields()
            .iter()
            .map(|(name, count)| format!("{name} {count}\n"))
            .collect();
        let next = data_dir.join(format!("{FILE_NAME}.next"));
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&next)?
            .write_all(text.as_bytes())?;
        std::fs::rename(next, data_dir.join(FILE_NAME))
    }
}

/// A regular file's text, if it is one and short (never a link, a pipe or a device).
fn read_short_file(path: &Path) -> Option<String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(FILE_BYTES_MAX).read_to_string(&mut text).ok()?;
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: IndexSizes = IndexSizes {
        bookings: 5_000_000,
        citizens: 4_000_000,
        requests: 6_000_000,
    };

    #[test]
    fn a_written_hint_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        SIZES.write(dir.path()).unwrap();
        assert_eq!(IndexSizes::read(dir.path(), 1 << 30), SIZES);
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(
            text,
            "bookings 5000000\ncitizens 4000000\nrequests 6000000\n"
        );
    }

    #[test]
    fn links_and_pipes_in_its_place_are_neither_followed_nor_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let next = dir.path().join(format!("{FILE_NAME}.next"));
        std::os::unix::fs::symlink(&victim, &next).unwrap();
        assert!(SIZES.write(dir.path()).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        std::os::unix::fs::symlink(&victim, dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(IndexSizes::read(dir.path(), 1 << 30), IndexSizes::default());
        std::fs::remove_file(dir.path().join(FILE_NAME)).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(dir.path().join(FILE_NAME))
            .status()
            .unwrap();
        assert!(made.success());
        assert_eq!(IndexSizes::read(dir.path(), 1 << 30), IndexSizes::default());
    }

    #[test]
    fn a_missing_damaged_or_implausible_hint_sizes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(IndexSizes::read(dir.path(), 1 << 30), IndexSizes::default());
        let long = "bookings 1\n".repeat(40); // cut at 256 bytes, mid-line
        for damaged in [
            "bookings five\n",
            "bookings 5\nholds 3\n",
            "bookings5\n",
            &long,
        ] {
            std::fs::write(dir.path().join(FILE_NAME), damaged).unwrap();
            assert_eq!(IndexSizes::read(dir.path(), 1 << 30), IndexSizes::default());
        }
        SIZES.write(dir.path()).unwrap();
        // 6M requests need more than 6M × 32 bytes of store.
        assert_eq!(IndexSizes::read(dir.path(), 6_000_000 * 32), SIZES);
        assert_eq!(
            IndexSizes::read(dir.path(), 6_000_000 * 32 - 1),
            IndexSizes::default()
        );
    }
}
