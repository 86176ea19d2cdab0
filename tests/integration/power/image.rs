//! The disk a power cut leaves, from the journal of `tests/shim/power_cut.c`.
//!
//! The model of the page cache: a write reaches the disk only when its file is synced
//! (`fsync`/`fdatasync`); a new, renamed or removed directory entry only when its
//! directory is synced. At the cut, [`Disk::image`] writes the data dir as the disk
//! holds it: what was synced, and in [`Cut::Torn`] mode also a random part of what was
//! not (each changed 4 KiB page old or new, the length old or new, and the directory
//! changes in their order up to a random point), as a disk that had written some of its
//! cache would.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const OP_CREATE: u8 = 1;
const OP_MKDIR: u8 = 2;
const OP_WRITE: u8 = 3;
const OP_TRUNC: u8 = 4;
const OP_SYNC: u8 = 5;
const OP_DIRSYNC: u8 = 6;
const OP_RENAME: u8 = 7;
const OP_UNLINK: u8 = 8;

const PAGE: u64 = 4_096;

/// What the cut leaves of the writes that were not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Nothing: only what was synced.
    Clean,
    /// A random part: some pages of the unsynced writes, a prefix of the unsynced
    /// directory changes.
    Torn,
}

/// A change to a file's bytes not yet synced.
#[derive(Clone, Debug)]
enum Pending {
    Write { offset: u64, bytes: Vec<u8> },
    Truncate(u64),
}

#[derive(Clone, Default)]
struct File {
    durable: Vec<u8>,
    pending: Vec<Pending>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    File(usize),
    Dir,
}

/// A directory change, durable once its directory is synced after it.
#[derive(Clone, Debug)]
enum NameChange {
    Put(PathBuf, Entry),
    Rename(PathBuf, PathBuf),
    Remove(PathBuf),
}

impl NameChange {
    fn dirs(&self) -> Vec<&Path> {
        fn parent(path: &Path) -> &Path {
            path.parent().unwrap_or(Path::new("/"))
        }
        match self {
            Self::Put(path, _) | Self::Remove(path) => vec![parent(path)],
            Self::Rename(from, to) => vec![parent(from), parent(to)],
        }
    }
}

/// The disk under a data dir, as the journal changes it.
#[derive(Clone)]
pub struct Disk {
    root: PathBuf,
    files: Vec<File>,
    by_inode: HashMap<u64, usize>,
    /// Directory entries as the running server sees them, and as the disk holds them.
    current: BTreeMap<PathBuf, Entry>,
    durable: BTreeMap<PathBuf, Entry>,
    /// Directory changes not yet durable, in order.
    unsynced_names: Vec<NameChange>,
    /// Records replayed: (writes, file syncs, directory syncs).
    replayed: (usize, usize, usize),
}

impl Disk {
    /// The disk as `root` holds it now (every byte of it durable: the image of an
    /// earlier cut, or an empty dir).
    pub fn scan(root: &Path) -> Self {
        let mut disk = Self {
            root: root.to_path_buf(),
            files: Vec::new(),
            by_inode: HashMap::new(),
            current: BTreeMap::new(),
            durable: BTreeMap::new(),
            unsynced_names: Vec::new(),
            replayed: (0, 0, 0),
        };
        disk.scan_dir(root);
        disk.durable = disk.current.clone();
        disk
    }

    /// The data dir it stands for.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn scan_dir(&mut self, dir: &Path) {
        use std::os::unix::fs::MetadataExt;
        for entry in std::fs::read_dir(dir).expect("a readable data dir") {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                self.current.insert(path.clone(), Entry::Dir);
                self.scan_dir(&path);
            } else {
                let id = self.files.len();
                self.files.push(File {
                    durable: std::fs::read(&path).unwrap(),
                    pending: Vec::new(),
                });
                self.by_inode.insert(meta.ino(), id);
                self.current.insert(path, Entry::File(id));
            }
        }
    }

    /// Replays the journal the shim wrote while the server ran on this disk. A record
    /// cut short by the kill is dropped: its call had not returned (the shim records
    /// a call before it returns), so nothing the server acknowledged rests on it.
    pub fn replay(&mut self, journal: &[u8]) {
        self.replay_first(journal, usize::MAX);
    }

    /// Replays the first `count` records only: the cut at that point of the run (for
    /// a run that acknowledged nothing, such as a start-up).
    pub fn replay_first(&mut self, journal: &[u8], count: usize) {
        let mut reader = Reader(journal);
        for _ in 0..count {
            let Some(record) = reader.record() else {
                return;
            };
            self.apply(record);
        }
    }

    /// How many whole records `journal` holds.
    pub fn records(journal: &[u8]) -> usize {
        let mut reader = Reader(journal);
        std::iter::from_fn(|| reader.record()).count()
    }

    fn apply(&mut self, record: Record) {
        match record {
            Record::Create(inode, path) => {
                let id = self.files.len();
                self.files.push(File::default());
                self.by_inode.insert(inode, id);
                self.name_change(NameChange::Put(path, Entry::File(id)));
            }
            Record::Mkdir(path) => self.name_change(NameChange::Put(path, Entry::Dir)),
            Record::Write(inode, offset, bytes) => {
                self.replayed.0 += 1;
                let write = Pending::Write { offset, bytes };
                self.file(inode).pending.push(write);
            }
            Record::Truncate(inode, length) => {
                self.file(inode).pending.push(Pending::Truncate(length));
            }
            Record::Sync(inode) => {
                self.replayed.1 += 1;
                let file = self.file(inode);
                for change in std::mem::take(&mut file.pending) {
                    apply(&mut file.durable, &change);
                }
            }
            Record::SyncDir(dir) => {
                self.replayed.2 += 1;
                self.sync_dir(&dir);
            }
            Record::Rename(from, to) => self.name_change(NameChange::Rename(from, to)),
            Record::Unlink(path) => self.name_change(NameChange::Remove(path)),
        }
    }

    fn file(&mut self, inode: u64) -> &mut File {
        let id = *self
            .by_inode
            .get(&inode)
            .unwrap_or_else(|| panic!("a write to inode {inode}, never created or scanned"));
        &mut self.files[id]
    }

    fn name_change(&mut self, change: NameChange) {
        change_names(&mut self.current, &change);
        self.unsynced_names.push(change);
    }

    /// A synced directory: its entries on disk are the current ones.
    fn sync_dir(&mut self, dir: &Path) {
        let children = |names: &BTreeMap<PathBuf, Entry>| -> Vec<PathBuf> {
            names
                .keys()
                .filter(|path| path.parent() == Some(dir))
                .cloned()
                .collect()
        };
        for path in children(&self.durable) {
            self.durable.remove(&path);
        }
        for path in children(&self.current) {
            self.durable.insert(path.clone(), self.current[&path]);
        }
        self.unsynced_names
            .retain(|change| !change.dirs().iter().all(|d| *d == dir));
    }

    /// Replaces the data dir with what the disk holds after the cut.
    pub fn image(&self, cut: Cut) -> ImageStats {
        let mut names = self.durable.clone();
        let mut stats = ImageStats {
            writes: self.replayed.0,
            file_syncs: self.replayed.1,
            dir_syncs: self.replayed.2,
            ..ImageStats::default()
        };
        if cut == Cut::Torn && !self.unsynced_names.is_empty() {
            let kept = rand::random_range(0..=self.unsynced_names.len());
            for change in &self.unsynced_names[..kept] {
                change_names(&mut names, change);
            }
            stats.unsynced_names_kept = kept;
        }
        std::fs::remove_dir_all(&self.root).unwrap();
        std::fs::create_dir_all(&self.root).unwrap();
        for (path, entry) in &names {
            let parent = path.parent().unwrap();
            let reachable = parent == self.root || names.get(parent) == Some(&Entry::Dir);
            if !reachable || !path.starts_with(&self.root) {
                continue;
            }
            match entry {
                Entry::Dir => {
                    std::fs::create_dir_all(path).unwrap();
                    set_mode(path, 0o700);
                }
                Entry::File(id) => {
                    let file = &self.files[*id];
                    let mut bytes = file.durable.clone();
                    if cut == Cut::Torn {
                        stats.unsynced_pages_kept += tear(&mut bytes, &file.pending);
                    }
                    stats.unsynced_bytes += file
                        .pending
                        .iter()
                        .map(|p| match p {
                            Pending::Write { bytes, .. } => bytes.len(),
                            Pending::Truncate(_) => 0,
                        })
                        .sum::<usize>();
                    std::fs::write(path, bytes).unwrap();
                    set_mode(path, 0o600);
                }
            }
        }
        set_mode(&self.root, 0o700);
        stats
    }
}

/// Modes are not journaled: the image gives every file and directory the modes the
/// server gives its own (0600, 0700).
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What an image kept of the unsynced changes.
#[derive(Debug, Default)]
pub struct ImageStats {
    pub writes: usize,
    pub file_syncs: usize,
    pub dir_syncs: usize,
    pub unsynced_bytes: usize,
    pub unsynced_pages_kept: usize,
    pub unsynced_names_kept: usize,
}

fn change_names(names: &mut BTreeMap<PathBuf, Entry>, change: &NameChange) {
    match change {
        NameChange::Put(path, entry) => {
            names.insert(path.clone(), *entry);
        }
        NameChange::Remove(path) => {
            names.remove(path);
        }
        NameChange::Rename(from, to) => {
            let moved: Vec<(PathBuf, Entry)> = names
                .range(from.clone()..)
                .take_while(|(path, _)| path.starts_with(from))
                .map(|(path, entry)| (path.clone(), *entry))
                .collect();
            for (path, entry) in moved {
                names.remove(&path);
                let under = path.strip_prefix(from).unwrap();
                let target = match under.as_os_str().is_empty() {
                    true => to.clone(),
                    false => to.join(under),
                };
                names.insert(target, entry);
            }
        }
    }
}

fn apply(bytes: &mut Vec<u8>, change: &Pending) {
    match change {
        Pending::Truncate(length) => bytes.resize(*length as usize, 0),
        Pending::Write {
            offset,
            bytes: data,
        } => {
            let start = *offset as usize;
            if bytes.len() < start + data.len() {
                bytes.resize(start + data.len(), 0);
            }
            bytes[start..start + data.len()].copy_from_slice(data);
        }
    }
}

/// A disk that wrote back some of its cache: the file's length is the synced one or
/// the current one, and each 4 KiB page (as a whole: the cache writes pages, not the
/// calls that filled them) holds its synced or its current content, at random. Returns
/// how many changed pages it kept.
fn tear(bytes: &mut Vec<u8>, pending: &[Pending]) -> usize {
    let mut current = bytes.clone();
    for change in pending {
        apply(&mut current, change);
    }
    let length = match rand::random::<bool>() {
        true => current.len(),
        false => bytes.len(),
    };
    let mut torn = vec![0u8; length];
    let mut kept = 0;
    for start in (0..length).step_by(PAGE as usize) {
        let end = (start + PAGE as usize).min(length);
        let page = |from: &[u8]| -> Vec<u8> {
            let mut page = vec![0u8; end - start];
            if from.len() > start {
                let available = from.len().min(end);
                page[..available - start].copy_from_slice(&from[start..available]);
            }
            page
        };
        let (old, new) = (page(bytes), page(&current));
        let chosen = match old != new && rand::random::<bool>() {
            true => {
                kept += 1;
                new
            }
            false => old,
        };
        torn[start..end].copy_from_slice(&chosen);
    }
    *bytes = torn;
    kept
}

/// One journal record (see the shim's header).
enum Record {
    Create(u64, PathBuf),
    Mkdir(PathBuf),
    Write(u64, u64, Vec<u8>),
    Truncate(u64, u64),
    Sync(u64),
    SyncDir(PathBuf),
    Rename(PathBuf, PathBuf),
    Unlink(PathBuf),
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// The next whole record; `None` at the end or at a record cut short.
    fn record(&mut self) -> Option<Record> {
        let record = match self.u8()? {
            OP_CREATE => Record::Create(self.u64()?, self.path()?),
            OP_MKDIR => Record::Mkdir(self.path()?),
            OP_WRITE => {
                let (inode, offset, length) = (self.u64()?, self.u64()?, self.u64()?);
                Record::Write(inode, offset, self.bytes(length as usize)?.to_vec())
            }
            OP_TRUNC => Record::Truncate(self.u64()?, self.u64()?),
            OP_SYNC => Record::Sync(self.u64()?),
            OP_DIRSYNC => Record::SyncDir(self.path()?),
            OP_RENAME => Record::Rename(self.path()?, self.path()?),
            OP_UNLINK => Record::Unlink(self.path()?),
            op => panic!("the journal has an unknown record {op}"),
        };
        Some(record)
    }

    fn bytes(&mut self, length: usize) -> Option<&'a [u8]> {
        if self.0.len() < length {
            self.0 = &[];
            return None;
        }
        let (head, rest) = self.0.split_at(length);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.bytes(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }

    fn path(&mut self) -> Option<PathBuf> {
        let length = self.u32()? as usize;
        Some(PathBuf::from(
            String::from_utf8(self.bytes(length)?.to_vec()).unwrap(),
        ))
    }
}
