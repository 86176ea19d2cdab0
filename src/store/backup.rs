//! Backups: a consistent copy of the whole store, taken while it serves, and its
//! restore into an empty data dir.
//!
//! Consistency without stopping writes: the backup first asks the committer for a copy
//! of every batch it commits from now on (the *tee*), then scans the store, then stops
//! the tee. The scan alone may see a group commit half-applied; replaying the teed
//! batches after it, in commit order, ends every key at its value as of the tee's end.
//! The teed batches carry removals too (retention deletes old records), so the restored
//! store is exactly the store as of one moment between two group commits, which is after
//! every write acknowledged before the backup began.
//!
//! File format (version 4, laid out as version 3): the magic `PRENOTA-BACKUP\0\x04`
//! (`\x03` for version 3), then frames of a 4-byte
//! little-endian length and a postcard-encoded [`Frame`]: one `SealedHeader`, any number
//! of `Records` (the scan) and `Changes` (the teed batches), and a `SealedEnd` carrying
//! the record count and an HMAC-SHA256 of every byte before it, keyed by the backup key
//! (`store::backup_key`), which is not in the file; the header holds the citizen-id hash
//! key sealed (AES-256-GCM) under the same backup key. Versions 1 and 2 (a `Header` with
//! the key in clear, an `End` with a plain SHA-256 anyone could recompute) are read only
//! when the operator accepts an unauthenticated file.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use hmac::{Hmac, Mac};

use crate::store::backup_key::BackupKey;
use crate::store::committer::Tee;
use crate::store::records::Change;
use crate::store::{Store, StoreError};

/// Version 4: version 3's layout, of a store whose records a version-3 reader (the
/// builds of 2026-12-01 and 02) would misread rather than refuse (holds kept in time
/// order, events in runs): that reader refuses this magic. Written by this build.
pub const MAGIC: &[u8; 16] = b"PRENOTA-BACKUP\x00\x04";
/// Version 3: authenticated and sealed with a backup key; read as version 4.
const MAGIC_V3: &[u8; 16] = b"PRENOTA-BACKUP\x00\x03";
/// Version 2: may hold `Changes` frames (removals); a plain checksum.
const MAGIC_V2: &[u8; 16] = b"PRENOTA-BACKUP\x00\x02";
/// Version 1: `Records` frames only; a plain checksum.
const MAGIC_V1: &[u8; 16] = b"PRENOTA-BACKUP\x00\x01";
/// Records per `Records` frame written from the scan.
const RECORDS_PER_FRAME: usize = 4_096;
/// Largest frame a reader accepts: bounds its memory on a damaged file.
const FRAME_BYTES_MAX: usize = 256 * 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
pub enum Frame {
    Header {
        created_at_unix_ms: i64,
        citizen_hash_key: Vec<u8>,
    },
    Records(Vec<(Vec<u8>, Vec<u8>)>),
    End {
        records: u64,
        sha256: [u8; 32],
    },
    /// One group commit made during the scan: puts and removals, replayed in order.
    /// After the variants above, so they keep their encoding.
    Changes(Vec<Change>),
    /// Version 3's header: the citizen hash key sealed under the backup key.
    SealedHeader {
        created_at_unix_ms: i64,
        /// Which backup key (`BackupKey::id`): "another key" is told from "altered".
        backup_key_id: [u8; 8],
        nonce: [u8; 12],
        sealed_citizen_hash_key: Vec<u8>,
    },
    /// Version 3's end: the HMAC of every byte before it.
    SealedEnd {
        records: u64,
        mac: [u8; 32],
    },
}

impl Frame {
    /// The records or changes this frame applies; `None` for the header and the end.
    pub fn into_changes(self) -> Option<Vec<Change>> {
        match self {
            Frame::Records(records) => Some(
                records
                    .into_iter()
                    .map(|(key, value)| (key, Some(value)))
                    .collect(),
            ),
            Frame::Changes(changes) => Some(changes),
            Frame::Header { .. }
            | Frame::End { .. }
            | Frame::SealedHeader { .. }
            | Frame::SealedEnd { .. } => None,
        }
    }

    /// Records (or changes) the frame carries, as counted in `End`.
    pub fn records(&self) -> u64 {
        match self {
            Frame::Records(records) => records.len() as u64,
            Frame::Changes(changes) => changes.len() as u64,
            Frame::Header { .. }
            | Frame::End { .. }
            | Frame::SealedHeader { .. }
            | Frame::SealedEnd { .. } => 0,
        }
    }
}

/// What a backup wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackupSummary {
    /// Records scanned, plus records re-written by group commits during the scan.
    pub records: u64,
    /// Group commits made while the scan ran (replayed on restore).
    pub batches_during_scan: u64,
}

/// What proves a file whole: version 3's MAC, or versions 1 and 2's plain checksum.
#[derive(Clone)]
enum Integrity {
    Mac(Hmac<Sha256>),
    Checksum(Sha256),
}

impl Integrity {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            Integrity::Mac(mac) => mac.update(bytes),
            Integrity::Checksum(hasher) => hasher.update(bytes),
        }
    }
}

struct Writer<W: Write> {
    out: W,
    integrity: Integrity,
    records: u64,
}

impl<W: Write> Writer<W> {
    /// A version 4 file authenticated with `key`.
    fn new(out: W, key: &BackupKey) -> std::io::Result<Self> {
        Self::with_magic(out, MAGIC, Integrity::Mac(key.mac()))
    }

    fn with_magic(mut out: W, magic: &[u8; 16], mut integrity: Integrity) -> std::io::Result<Self> {
        out.write_all(magic)?;
        integrity.update(magic);
        Ok(Self {
            out,
            integrity,
            records: 0,
        })
    }

    fn frame(&mut self, frame: &Frame) -> std::io::Result<()> {
        let bytes = postcard::to_stdvec(frame)
            .map_err(|e| std::io::Error::other(format!("encoding a frame: {e}")))?;
        let length = u32::try_from(bytes.len())
            .map_err(|_| std::io::Error::other("a backup frame over 4 GiB"))?
            .to_le_bytes();
        self.records += frame.records();
        if !matches!(frame, Frame::End { .. } | Frame::SealedEnd { .. }) {
            self.integrity.update(&length);
            self.integrity.update(&bytes);
        }
        self.out.write_all(&length)?;
        self.out.write_all(&bytes)
    }

    fn finish(mut self) -> std::io::Result<W> {
        let records = self.records;
        let end = match self.integrity.clone() {
            Integrity::Mac(mac) => Frame::SealedEnd {
                records,
                mac: mac.finalize().into_bytes().into(),
            },
            Integrity::Checksum(hasher) => Frame::End {
                records,
                sha256: hasher.finalize().into(),
            },
        };
        self.frame(&end)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// A failed write of the backup file.
fn writing(e: std::io::Error) -> StoreError {
    StoreError::Io(format!("writing the backup: {e}"))
}

impl Store {
    /// Writes a consistent backup of the store to `out` while writes go on (see the
    /// module doc), stamped `created_at_unix_ms`. Fails, leaving serving untouched, if the
    /// store changes by more than `changes_buffered_max` group commits while the scan
    /// runs, or fails itself.
    pub fn backup(
        &self,
        citizen_hash_key: &[u8],
        created_at_unix_ms: i64,
        out: impl Write,
        (changes_buffered_max, bytes_buffered_max): (usize, usize),
        backup_key: &BackupKey,
    ) -> Result<BackupSummary, StoreError> {
        let mut writer = Writer::new(out, backup_key).map_err(writing)?;
        let (nonce, sealed_citizen_hash_key) = backup_key.seal(citizen_hash_key);
        writer
            .frame(&Frame::SealedHeader {
                created_at_unix_ms,
                backup_key_id: backup_key.id(),
                nonce,
                sealed_citizen_hash_key,
            })
            .map_err(writing)?;
        let (batches, teed) = std::sync::mpsc::sync_channel(changes_buffered_max);
        let overflowed = Arc::new(AtomicBool::new(false));
        {
            let mut tee = self.state.tee();
            if tee.is_some() {
                return Err(StoreError::BackupRunning);
            }
            *tee = Some(Tee {
                batches,
                bytes: 0,
                bytes_max: bytes_buffered_max,
                overflowed: Arc::clone(&overflowed),
            });
        }
        // From here on the tee must be removed on every path.
        let scanned = self.write_records(&mut writer);
        // Taken under the lock the committer holds across a commit: every batch applied
        // so far has been copied, and no later one will be.
        self.state.tee().take();
        scanned?;
        if overflowed.load(Ordering::Acquire) {
            return Err(StoreError::BackupFellBehind(format!(
                "the store changed by more than {changes_buffered_max} group commits or \
                 {bytes_buffered_max} bytes while the backup scanned it \
                 (limits.backup_changes_buffered_max, backup_changes_buffered_bytes_max); \
                 retry at a calmer moment or raise the limits"
            )));
        }
        let mut batches_during_scan = 0;
        for batch in teed.try_iter() {
            batches_during_scan += 1;
            writer.frame(&Frame::Changes(batch)).map_err(writing)?;
        }
        if self.state.failed.load(Ordering::Acquire) {
            return Err(StoreError::Failed);
        }
        let records = writer.records;
        writer.finish().map_err(writing)?;
        Ok(BackupSummary {
            records,
            batches_during_scan,
        })
    }

    /// Every record of the store, in frames of `RECORDS_PER_FRAME`.
    fn write_records<W: Write>(&self, writer: &mut Writer<W>) -> Result<(), StoreError> {
        let mut chunk = Vec::with_capacity(RECORDS_PER_FRAME);
        for item in self.db.iter() {
            let (key, value) = item.map_err(|e| StoreError::Io(format!("scanning: {e}")))?;
            chunk.push((key.to_vec(), value.to_vec()));
            if chunk.len() == RECORDS_PER_FRAME {
                writer
                    .frame(&Frame::Records(std::mem::take(&mut chunk)))
                    .map_err(writing)?;
            }
        }
        if !chunk.is_empty() {
            writer.frame(&Frame::Records(chunk)).map_err(writing)?;
        }
        Ok(())
    }

    /// Applies restored records (in file order) and makes them durable. Only for a
    /// store being restored: nothing else writes to it.
    pub(crate) fn restore_records(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (key, value) in changes {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        self.db
            .apply_batch(batch)
            .map_err(|e| StoreError::Io(format!("restoring: {e}")))
    }
}

/// How far a reader trusts a file.
#[derive(Clone, Copy)]
pub struct Trust<'a> {
    /// Checks a version 3 file's MAC (and opens its sealed key); without it a version 3
    /// file is read for its structure only.
    pub key: Option<&'a BackupKey>,
    /// Reads versions 1 and 2, which nothing authenticates.
    pub unauthenticated: bool,
}

/// Reads a backup frame by frame, checking the magic, the frame sizes, each frame's
/// version and, at the end, the record count and the MAC (or checksum).
pub struct Reader<R: Read> {
    input: R,
    /// Whether the file is version 3 (sealed header and end, a MAC).
    sealed: bool,
    /// `None`: a version 3 file read without its key (structure only).
    integrity: Option<Integrity>,
    records: u64,
    ended: bool,
}

impl<R: Read> Reader<R> {
    pub fn new(mut input: R, trust: Trust<'_>) -> Result<Self, String> {
        let mut magic = [0u8; 16];
        input
            .read_exact(&mut magic)
            .map_err(|e| format!("not a prenota backup (reading its header: {e})"))?;
        let sealed = &magic == MAGIC || &magic == MAGIC_V3;
        let mut integrity = if sealed {
            trust.key.map(|key| Integrity::Mac(key.mac()))
        } else if &magic == MAGIC_V2 || &magic == MAGIC_V1 {
            if !trust.unauthenticated {
                return Err(
                    "a backup made before backups were authenticated (format 1 or \
                     2): nothing proves it was not altered. Restore it only if you trust \
                     this file, with --unauthenticated"
                        .into(),
                );
            }
            Some(Integrity::Checksum(Sha256::new()))
        } else {
            return Err("not a prenota backup, or of a newer version (bad magic)".into());
        };
        if let Some(integrity) = &mut integrity {
            integrity.update(&magic);
        }
        Ok(Self {
            input,
            sealed,
            integrity,
            records: 0,
            ended: false,
        })
    }

    /// Whether what was read is proven: a version 3 file checked with its backup key,
    /// or an older one the operator accepted unauthenticated.
    pub fn proven(&self) -> bool {
        self.integrity.is_some()
    }

    /// The next frame before the end; `None` once the end was read and checked.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, String> {
        if self.ended {
            return Ok(None);
        }
        let mut length = [0u8; 4];
        self.input
            .read_exact(&mut length)
            .map_err(|_| "the backup is truncated: it has no end frame".to_string())?;
        let size = u32::from_le_bytes(length) as usize;
        if size > FRAME_BYTES_MAX {
            return Err(format!("the backup is damaged: a frame of {size} bytes"));
        }
        let mut bytes = vec![0u8; size];
        self.input
            .read_exact(&mut bytes)
            .map_err(|_| "the backup is truncated in the middle of a frame".to_string())?;
        let frame: Frame = postcard::from_bytes(&bytes)
            .map_err(|e| format!("the backup is damaged: a frame does not decode: {e}"))?;
        // Each version has its own header and end: a version 3 file with a plain
        // header (a key in clear) or a plain end (a recomputable checksum) is forged.
        let of_version = match &frame {
            Frame::Header { .. } | Frame::End { .. } => !self.sealed,
            Frame::SealedHeader { .. } | Frame::SealedEnd { .. } => self.sealed,
            Frame::Records(_) | Frame::Changes(_) => true,
        };
        if !of_version {
            return Err("the backup is damaged: a frame of another format version".into());
        }
        match &frame {
            Frame::End { records, .. } | Frame::SealedEnd { records, .. } => {
                self.check_end(&frame)?;
                if *records != self.records {
                    return Err(format!(
                        "the backup is damaged: it ends claiming {records} records, it has {}",
                        self.records
                    ));
                }
                let mut rest = [0u8; 1];
                if self.input.read(&mut rest).map_err(|e| e.to_string())? != 0 {
                    return Err("the backup is damaged: bytes after its end".into());
                }
                self.ended = true;
                Ok(None)
            }
            _ => {
                self.records += frame.records();
                if let Some(integrity) = &mut self.integrity {
                    integrity.update(&length);
                    integrity.update(&bytes);
                }
                Ok(Some(frame))
            }
        }
    }

    /// The end's checksum or MAC against every byte before it.
    fn check_end(&self, end: &Frame) -> Result<(), String> {
        match (&self.integrity, end) {
            (None, Frame::SealedEnd { .. }) => Ok(()), // structure only
            (Some(Integrity::Checksum(hasher)), Frame::End { sha256, .. }) => {
                let actual: [u8; 32] = hasher.clone().finalize().into();
                match actual == *sha256 {
                    true => Ok(()),
                    false => Err("the backup is damaged: its checksum does not match".into()),
                }
            }
            (Some(Integrity::Mac(mac)), Frame::SealedEnd { mac: claimed, .. }) => {
                mac.clone().verify_slice(claimed).map_err(|_| {
                    "the backup was altered or damaged: its MAC does not match (or it was \
                     made with another backup key)"
                        .to_string()
                })
            }
            _ => Err("the backup is damaged: its end does not match its version".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Limits;
    use crate::domain::ids::{RegionId, SiteId};
    use crate::store::records::{SiteRecord, Write as Record};

    fn site(id: &str, name: &str) -> Record {
        Record::Site(SiteRecord {
            site_id: SiteId::parse("site_id", id, 64).unwrap(),
            name: name.into(),
            region_id: RegionId::parse("region_id", "r", 64).unwrap(),
            time_zone: "Etc/UTC".into(),
        })
    }

    /// The backup's output, which commits one batch touching the first and the last
    /// site (and deleting the one before the last) while the scan is in the middle of the
    /// store.
    struct CommitsDuringScan<'a> {
        store: &'a Store,
        out: Vec<u8>,
        writes: usize,
    }

    impl Write for CommitsDuringScan<'_> {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.writes += 1;
            // Writes 1-3 are the magic and the header; 4 starts the first records frame.
            if self.writes == 4 {
                let deleted = crate::store::records::site_key(
                    &SiteId::parse("site_id", "s09998", 64).unwrap(),
                );
                futures::executor::block_on(self.store.commit(&[
                    site("s00000", "changed during the scan"),
                    site("s09999", "changed during the scan"),
                    Record::Delete(deleted),
                ]))
                .unwrap();
            }
            self.out.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const TRUSTED: Trust<'static> = Trust {
        key: None,
        unauthenticated: true,
    };

    fn backup_key() -> BackupKey {
        BackupKey::from_secret(&[5; 32])
    }

    /// Every change a whole, valid backup file holds, in order.
    fn changes_read(bytes: &[u8], trust: Trust<'_>) -> Vec<Change> {
        let mut reader = Reader::new(bytes, trust).unwrap();
        let mut changes = Vec::new();
        while let Some(frame) = reader.next_frame().unwrap() {
            changes.extend(frame.into_changes().unwrap_or_default());
        }
        changes
    }

    fn keyed(key: &BackupKey) -> Trust<'_> {
        Trust {
            key: Some(key),
            unauthenticated: false,
        }
    }

    /// A version-1 backup (written before removals were teed) still reads when the
    /// operator accepts an unauthenticated file, and only then.
    #[test]
    fn version_1_backups_read_only_when_accepted() {
        let mut bytes = Vec::new();
        let checksum = Integrity::Checksum(Sha256::new());
        let mut writer = Writer::with_magic(&mut bytes, MAGIC_V1, checksum).unwrap();
        writer
            .frame(&Frame::Header {
                created_at_unix_ms: 1,
                citizen_hash_key: vec![7; 32],
            })
            .unwrap();
        writer
            .frame(&Frame::Records(vec![(b"Sx".to_vec(), b"v".to_vec())]))
            .unwrap();
        writer.finish().unwrap();
        let key = backup_key();
        assert!(Reader::new(bytes.as_slice(), keyed(&key)).is_err());
        assert_eq!(
            changes_read(&bytes, TRUSTED),
            vec![(b"Sx".to_vec(), Some(b"v".to_vec()))]
        );

        let mut current = Vec::new();
        Writer::new(&mut current, &key).unwrap().finish().unwrap();
        assert!(current.starts_with(MAGIC));
        let mut other = current.clone();
        other[15] = 5;
        assert!(
            Reader::new(other.as_slice(), TRUSTED).is_err(),
            "a newer version is refused"
        );
    }

    /// A version-3 file (the same layout under the older magic) still reads, checked
    /// with its backup key.
    #[test]
    fn version_3_backups_read_with_their_key() {
        let key = backup_key();
        let mut bytes = Vec::new();
        let mut writer =
            Writer::with_magic(&mut bytes, MAGIC_V3, Integrity::Mac(key.mac())).unwrap();
        let (nonce, sealed_citizen_hash_key) = key.seal(&[7; 32]);
        writer
            .frame(&Frame::SealedHeader {
                created_at_unix_ms: 1,
                backup_key_id: key.id(),
                nonce,
                sealed_citizen_hash_key,
            })
            .unwrap();
        writer
            .frame(&Frame::Records(vec![(b"Sx".to_vec(), b"v".to_vec())]))
            .unwrap();
        writer.finish().unwrap();
        assert!(bytes.starts_with(MAGIC_V3));
        let changes = changes_read(&bytes, keyed(&key));
        assert_eq!(changes, vec![(b"Sx".to_vec(), Some(b"v".to_vec()))]);
    }

    /// A version 3 file with a plain header (a key in clear, readable without the
    /// backup key) is forged, whatever the reader trusts.
    #[test]
    fn a_sealed_file_with_a_plain_header_is_refused() {
        let key = backup_key();
        let mut bytes = Vec::new();
        let mut writer = Writer::new(&mut bytes, &key).unwrap();
        writer
            .frame(&Frame::Header {
                created_at_unix_ms: 1,
                citizen_hash_key: vec![7; 32],
            })
            .unwrap();
        writer.finish().unwrap();
        let mut reader = Reader::new(bytes.as_slice(), TRUSTED).unwrap();
        let refused = reader.next_frame().unwrap_err();
        assert!(refused.contains("another format version"), "{refused}");
        assert!(!reader.proven(), "read without its key: structure only");
    }

    /// Someone who rewrites a backup, even recomputing every checksum, cannot make it
    /// pass without the backup key; nor does the file give the citizen hash key away.
    #[test]
    fn an_altered_backup_or_another_key_is_refused() {
        let (key, other) = (backup_key(), BackupKey::from_secret(&[6; 32]));
        let mut bytes = Vec::new();
        let mut writer = Writer::new(&mut bytes, &key).unwrap();
        let (nonce, sealed) = key.seal(&[7; 32]);
        writer
            .frame(&Frame::SealedHeader {
                created_at_unix_ms: 1,
                backup_key_id: key.id(),
                nonce,
                sealed_citizen_hash_key: sealed.clone(),
            })
            .unwrap();
        writer
            .frame(&Frame::Records(vec![(b"Sx".to_vec(), b"v".to_vec())]))
            .unwrap();
        writer.finish().unwrap();
        assert!(!bytes.windows(32).any(|window| window == [7; 32]), "sealed");
        let read_all = |bytes: &[u8], trust| -> Result<u64, String> {
            let mut reader = Reader::new(bytes, trust)?;
            let mut frames = 0;
            while reader.next_frame()?.is_some() {
                frames += 1;
            }
            Ok(frames)
        };
        assert_eq!(read_all(&bytes, keyed(&key)), Ok(2));
        assert!(read_all(&bytes, keyed(&other)).is_err(), "another key");
        let mut altered = bytes.clone();
        let at = altered.windows(2).position(|w| w == b"Sx").unwrap();
        altered[at + 1] = b'y';
        let refused = read_all(&altered, keyed(&key)).unwrap_err();
        assert!(refused.contains("MAC"), "{refused}");
    }

    #[test]
    fn a_batch_committed_during_the_scan_is_restored_whole() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits::default();
        let store = Store::open(&dir.path().join("live"), &limits).unwrap();
        let sites: Vec<Record> = (0..10_000)
            .map(|n| site(&format!("s{n:05}"), "before"))
            .collect();
        futures::executor::block_on(store.commit(&sites)).unwrap();
        let mut output = CommitsDuringScan {
            store: &store,
            out: Vec::new(),
            writes: 0,
        };
        let key = backup_key();
        let summary = store
            .backup(&[7; 32], 0, &mut output, (16, usize::MAX), &key)
            .unwrap();
        assert_eq!(summary.batches_during_scan, 1);
        // 9,999 scanned (s09998 was gone before the scan reached it), the commit count
        // (`records::COMMITS_KEY`), the store format (`records::STORE_FORMAT_KEY`) + 3
        // changes.
        assert_eq!(summary.records, 10_004);
        let bytes = output.out;

        let restored = Store::open(&dir.path().join("restored"), &limits).unwrap();
        let mut reader = Reader::new(bytes.as_slice(), keyed(&key)).unwrap();
        let mut citizen_key = None;
        while let Some(frame) = reader.next_frame().unwrap() {
            match frame {
                Frame::SealedHeader {
                    nonce,
                    sealed_citizen_hash_key,
                    ..
                } => citizen_key = key.open(&nonce, &sealed_citizen_hash_key),
                Frame::SealedEnd { .. } => unreachable!("the end is checked, not returned"),
                records => restored
                    .restore_records(records.into_changes().unwrap())
                    .unwrap(),
            }
        }
        assert_eq!(citizen_key, Some(vec![7; 32]));
        let names: HashMap<String, String> = restored
            .sites()
            .map(|record| {
                let record = record.unwrap();
                (record.site_id.to_string(), record.name)
            })
            .collect();
        assert_eq!(names.len(), 9_999, "s09998 was deleted during the scan");
        // The scan had passed s00000 and not reached s09999: without the replay of the
        // teed batch, the restore would hold half of it.
        assert_eq!(names["s00000"], "changed during the scan");
        assert_eq!(names["s09999"], "changed during the scan");
        assert_eq!(names["s05000"], "before");
    }

    #[test]
    fn a_backup_that_falls_too_far_behind_fails_and_leaves_the_store_serving() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &Limits::default()).unwrap();
        let sites: Vec<Record> = (0..10_000)
            .map(|n| site(&format!("s{n:05}"), "before"))
            .collect();
        futures::executor::block_on(store.commit(&sites)).unwrap();
        struct ThreeCommitsDuringScan<'a>(&'a Store, usize);
        impl Write for ThreeCommitsDuringScan<'_> {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.1 += 1;
                if self.1 == 4 {
                    for n in 0..3 {
                        futures::executor::block_on(
                            self.0.commit(&[site("s00001", &format!("change {n}"))]),
                        )
                        .unwrap();
                    }
                }
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        // Too many commits, or too many bytes of them (each is ~40 bytes here).
        for limits in [(2, usize::MAX), (100, 60)] {
            let failed = store
                .backup(
                    &[0; 32],
                    0,
                    ThreeCommitsDuringScan(&store, 0),
                    limits,
                    &backup_key(),
                )
                .unwrap_err();
            assert!(
                failed.to_string().contains("backup_changes_buffered"),
                "{failed}"
            );
        }
        futures::executor::block_on(store.commit(&[site("s00002", "after")])).unwrap();
        // The tee is gone: a new backup may start.
        store
            .backup(&[0; 32], 0, std::io::sink(), (2, usize::MAX), &backup_key())
            .unwrap();
    }
}
