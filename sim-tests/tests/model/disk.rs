//! A replica's data directory as the model checker sees it: a page cache over a durable disk.
//!
//! Files are inodes, and the directory maps names to inodes, because that is what makes the
//! engine's atomic replacements (write a temporary file, fsync it, rename it over the old one,
//! fsync the directory) mean what they mean on a real file system: `Sync` makes one inode's
//! bytes durable, `SyncDir` makes the current set of names (creations, renames, removals)
//! durable. A crash keeps exactly the durable names, each with its inode's durably synced bytes
//! (empty if they were never synced), and loses everything else.
//!
//! The model keeps only what the process loses in a crash out of [`Durable`]; stateright stores
//! the durable half as the actor's `Storage`, which survives a crash.

use std::collections::BTreeMap;
use std::fmt;
use truba_engine::{DiskError, IoOp, IoReply};

/// What survives a power loss: the directory as last fsynced and each inode's last fsynced bytes.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Durable {
    pub names: BTreeMap<String, u32>,
    pub data: BTreeMap<u32, Vec<u8>>,
    pub next_inode: u32,
}

/// Counterexample traces print every state; file names and sizes say enough there.
impl fmt::Debug for Durable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let size = |ino: &u32| self.data.get(ino).map_or(0, Vec::len);
        f.debug_map().entries(self.names.iter().map(|(name, ino)| (name, size(ino)))).finish()
    }
}

/// The page cache (what reads see) over the durable state.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    names: BTreeMap<String, u32>,
    data: BTreeMap<u32, Vec<u8>>,
    durable: Durable,
}

impl Disk {
    /// The directory a process finds after a crash that left `durable` on the disk.
    pub fn after_crash(durable: &Durable) -> Disk {
        let data =
            durable.names.values().map(|ino| (*ino, durable.data.get(ino).cloned().unwrap_or_default())).collect();
        let mut disk = Disk { names: durable.names.clone(), data, durable: durable.clone() };
        disk.collect_garbage();
        disk
    }

    pub fn durable(&self) -> &Durable {
        &self.durable
    }

    /// Carries out one disk operation on the page cache (and, for the syncs, on the durable state).
    pub fn exec(&mut self, op: &IoOp) -> Result<IoReply, DiskError> {
        match op {
            IoOp::List => Ok(IoReply::Listed(self.names.keys().cloned().collect())),
            IoOp::Read { file } => self.bytes(file).cloned().map(IoReply::Data),
            IoOp::ReadAt { file, offset, len } => {
                let bytes = self.bytes(file)?;
                let clamp = |at: u64| usize::try_from(at).map_or(bytes.len(), |at| at.min(bytes.len()));
                Ok(IoReply::Data(bytes[clamp(*offset)..clamp(offset.saturating_add(*len))].to_vec()))
            }
            IoOp::Write { file, offset, data } => {
                self.write(file, *offset, data);
                Ok(IoReply::Done)
            }
            IoOp::Sync { file } => self.sync(file),
            IoOp::SyncDir => {
                self.sync_dir();
                Ok(IoReply::Done)
            }
            IoOp::Truncate { file, len } => self.truncate(file, *len),
            IoOp::Rename { from, to } => self.rename(from, to),
            IoOp::Remove { file } => self.names.remove(file).map(|_| IoReply::Done).ok_or(DiskError::NotFound),
        }
    }

    fn bytes(&self, file: &str) -> Result<&Vec<u8>, DiskError> {
        let ino = self.names.get(file).ok_or(DiskError::NotFound)?;
        Ok(self.data.get(ino).expect("a named inode has data"))
    }

    fn write(&mut self, file: &str, offset: u64, bytes: &[u8]) {
        let ino = match self.names.get(file) {
            Some(ino) => *ino,
            None => {
                let ino = self.durable.next_inode;
                self.durable.next_inode += 1;
                self.names.insert(file.to_string(), ino);
                ino
            }
        };
        let f = self.data.entry(ino).or_default();
        let start = offset as usize;
        let end = start + bytes.len();
        if f.len() < end {
            f.resize(end, 0);
        }
        f[start..end].copy_from_slice(bytes);
    }

    fn sync(&mut self, file: &str) -> Result<IoReply, DiskError> {
        let ino = *self.names.get(file).ok_or(DiskError::NotFound)?;
        let bytes = self.data.get(&ino).cloned().unwrap_or_default();
        self.durable.data.insert(ino, bytes);
        Ok(IoReply::Done)
    }

    /// Makes the directory durable, and forgets inodes no name refers to any more (in the page
    /// cache or on disk), so that equal directories hash equally however they came about.
    fn sync_dir(&mut self) {
        self.durable.names = self.names.clone();
        self.collect_garbage();
    }

    fn truncate(&mut self, file: &str, len: u64) -> Result<IoReply, DiskError> {
        let ino = self.names.get(file).ok_or(DiskError::NotFound)?;
        self.data.get_mut(ino).expect("a named inode has data").resize(len as usize, 0);
        Ok(IoReply::Done)
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<IoReply, DiskError> {
        let ino = self.names.remove(from).ok_or(DiskError::NotFound)?;
        self.names.insert(to.to_string(), ino);
        Ok(IoReply::Done)
    }

    fn collect_garbage(&mut self) {
        let live = |ino: &u32, names: &BTreeMap<String, u32>| names.values().any(|i| i == ino);
        let (page, durable) = (&self.names, &self.durable.names);
        self.data.retain(|ino, _| live(ino, page) || live(ino, durable));
        self.durable.data.retain(|ino, _| live(ino, page) || live(ino, durable));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(d: &mut Disk, file: &str, bytes: &[u8]) {
        d.exec(&IoOp::Write { file: file.into(), offset: 0, data: bytes.to_vec() }).unwrap();
    }

    fn read(d: &mut Disk, file: &str) -> Option<Vec<u8>> {
        match d.exec(&IoOp::Read { file: file.into() }) {
            Ok(IoReply::Data(b)) => Some(b),
            _ => None,
        }
    }

    #[test]
    fn read_at_returns_the_slice_that_exists() {
        let mut d = Disk::default();
        let at = |d: &mut Disk, offset, len| d.exec(&IoOp::ReadAt { file: "a".into(), offset, len });
        assert_eq!(at(&mut d, 0, 1), Err(DiskError::NotFound));
        write(&mut d, "a", b"hello");
        assert_eq!(at(&mut d, 1, 3), Ok(IoReply::Data(b"ell".to_vec())));
        assert_eq!(at(&mut d, 3, u64::MAX), Ok(IoReply::Data(b"lo".to_vec())));
        assert_eq!(at(&mut d, 9, 1), Ok(IoReply::Data(Vec::new())));
    }

    #[test]
    fn a_crash_keeps_synced_bytes_under_synced_names_only() {
        let mut d = Disk::default();
        write(&mut d, "a", b"one");
        d.exec(&IoOp::Sync { file: "a".into() }).unwrap();
        d.exec(&IoOp::SyncDir).unwrap();
        write(&mut d, "a", b"two");
        write(&mut d, "b", b"new");
        d.exec(&IoOp::Sync { file: "b".into() }).unwrap();
        let mut after = Disk::after_crash(d.durable());
        assert_eq!(read(&mut after, "a"), Some(b"one".to_vec()));
        assert_eq!(read(&mut after, "b"), None, "b's name was never made durable");
    }

    #[test]
    fn a_rename_is_durable_only_after_the_directory_sync() {
        let mut d = Disk::default();
        write(&mut d, "hs", b"old");
        d.exec(&IoOp::Sync { file: "hs".into() }).unwrap();
        d.exec(&IoOp::SyncDir).unwrap();
        write(&mut d, "hs.tmp", b"new");
        d.exec(&IoOp::Sync { file: "hs.tmp".into() }).unwrap();
        d.exec(&IoOp::Rename { from: "hs.tmp".into(), to: "hs".into() }).unwrap();
        assert_eq!(read(&mut Disk::after_crash(d.durable()), "hs"), Some(b"old".to_vec()));
        d.exec(&IoOp::SyncDir).unwrap();
        let mut after = Disk::after_crash(d.durable());
        assert_eq!(read(&mut after, "hs"), Some(b"new".to_vec()));
        assert_eq!(read(&mut after, "hs.tmp"), None);
    }
}
