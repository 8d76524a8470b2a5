//! The data directory: carries out the engine's disk operations on real files (or, in tests, on
//! turmoil's simulated filesystem). It decides nothing: what is torn, corrupt or durable is the
//! engine's call.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use truba_engine::{DiskError, IoOp, IoReply};

/// A flat directory of files, as the engine sees it.
pub trait Fs: Send + Sync + 'static {
    fn list(&self) -> io::Result<Vec<String>>;
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Reads up to `len` bytes from `offset`: fewer (possibly none) where the file ends first.
    fn read_at(&self, name: &str, offset: u64, len: u64) -> io::Result<Vec<u8>>;
    /// Writes at `offset`, creating the file if it does not exist.
    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes the file's data durable (fdatasync).
    fn sync(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and removals in the directory durable.
    fn sync_dir(&self) -> io::Result<()>;
    fn truncate(&self, name: &str, len: u64) -> io::Result<()>;
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Bytes used by the directory's files.
    fn usage(&self) -> u64;
}

/// Carries out one engine disk operation.
pub fn execute(fs: &dyn Fs, op: &IoOp) -> Result<IoReply, DiskError> {
    let r = match op {
        IoOp::List => return fs.list().map(IoReply::Listed).map_err(disk_error),
        IoOp::Read { file } => return fs.read(file).map(IoReply::Data).map_err(disk_error),
        IoOp::ReadAt { file, offset, len } => {
            return fs.read_at(file, *offset, *len).map(IoReply::Data).map_err(disk_error);
        }
        IoOp::Write { file, offset, data } => fs.write_at(file, *offset, data),
        IoOp::Sync { file } => fs.sync(file),
        IoOp::SyncDir => fs.sync_dir(),
        IoOp::Truncate { file, len } => fs.truncate(file, *len),
        IoOp::Rename { from, to } => fs.rename(from, to),
        IoOp::Remove { file } => fs.remove(file),
    };
    r.map(|()| IoReply::Done).map_err(disk_error)
}

/// Carries out the engine's disk operations one after another (the disk thread's loop), with
/// one shortcut: a write to a log segment (or the hard state's in-place write) is followed at
/// once by its fdatasync, because the engine's next request is that fsync. The request is then answered with the result of the
/// fsync already done, which began after the write completed, so nothing is claimed durable
/// that was not fsynced; it saves a round trip between the engine and the disk thread per
/// group-commit batch (and per vote). Any other operation in between discards the early result.
pub struct Executor {
    fs: std::sync::Arc<dyn Fs>,
    /// The file just written and fsynced, and how that fsync went.
    synced: Option<(String, Result<IoReply, DiskError>)>,
}

impl Executor {
    pub fn new(fs: std::sync::Arc<dyn Fs>) -> Executor {
        Executor { fs, synced: None }
    }

    pub fn run(&mut self, op: &IoOp) -> Result<IoReply, DiskError> {
        let early = self.synced.take();
        match op {
            IoOp::Sync { file } => match early {
                Some((f, result)) if f == *file => result,
                _ => execute(self.fs.as_ref(), op),
            },
            IoOp::Write { file, .. } if is_log_segment(file) || file == "hardstate" => {
                let written = execute(self.fs.as_ref(), op);
                if written.is_ok() {
                    let synced = execute(self.fs.as_ref(), &IoOp::Sync { file: file.clone() });
                    self.synced = Some((file.clone(), synced));
                }
                written
            }
            _ => execute(self.fs.as_ref(), op),
        }
    }
}

/// Reads up to `len` bytes of `file` from `offset`, fewer (possibly none) where the file ends
/// first. The buffer starts at 1 MiB at most and grows as the bytes arrive, so a huge `len`
/// over a short file allocates little.
pub fn read_range(file: &impl FileExt, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    const FIRST_BUFFER: u64 = 1 << 20;
    if offset > i64::MAX as u64 {
        // No file reaches that far (and pread refuses such offsets).
        return Ok(Vec::new());
    }
    let mut buf = vec![0; len.min(FIRST_BUFFER) as usize];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if filled as u64 == len {
                break;
            }
            let grown = len.min(filled as u64 * 2) as usize;
            buf.resize(grown, 0);
        }
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

fn is_log_segment(name: &str) -> bool {
    name.starts_with("log-") && name.ends_with(".seg")
}

fn disk_error(e: io::Error) -> DiskError {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::NotFound, _) => DiskError::NotFound,
        (io::ErrorKind::StorageFull, _) | (_, Some(ENOSPC | EDQUOT)) => DiskError::NoSpace,
        _ => DiskError::Io(e.to_string()),
    }
}

/// The real data directory. Files stay open between operations; the directory is locked so
/// that two servers never share it.
pub struct DirFs {
    dir: PathBuf,
    open: Mutex<BTreeMap<String, File>>,
    _lock: File,
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot create data directory {dir}: {source}")]
    Create { dir: PathBuf, source: io::Error },
    #[error("data directory {dir} is in use by another truba process")]
    Locked { dir: PathBuf },
    #[error("cannot lock data directory {dir}: {source}")]
    Lock { dir: PathBuf, source: io::Error },
}

impl DirFs {
    pub fn open(dir: &Path) -> Result<DirFs, DataDirError> {
        std::fs::create_dir_all(dir).map_err(|source| DataDirError::Create { dir: dir.into(), source })?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| DataDirError::Lock { dir: dir.into(), source })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(DataDirError::Locked { dir: dir.into() }),
            Err(std::fs::TryLockError::Error(source)) => return Err(DataDirError::Lock { dir: dir.into(), source }),
        }
        Ok(DirFs { dir: dir.to_path_buf(), open: Mutex::new(BTreeMap::new()), _lock: lock })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs `f` on the open file `name`, opening (and, if `create`, creating) it first.
    fn with_file<R>(&self, name: &str, create: bool, f: impl FnOnce(&File) -> io::Result<R>) -> io::Result<R> {
        let mut open = self.open.lock().expect("file table lock");
        if !open.contains_key(name) {
            let file =
                OpenOptions::new().read(true).write(true).create(create).truncate(false).open(self.path(name))?;
            open.insert(name.to_string(), file);
        }
        f(&open[name])
    }

    fn forget(&self, name: &str) {
        self.open.lock().expect("file table lock").remove(name);
    }
}

impl Fs for DirFs {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Ok(name) = entry.file_name().into_string() {
                    if name != "LOCK" {
                        names.push(name);
                    }
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.path(name))
    }

    fn read_at(&self, name: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        self.with_file(name, false, |f| read_range(f, offset, len))
    }

    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with_file(name, true, |f| f.write_all_at(data, offset))
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        self.with_file(name, false, File::sync_data)
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        self.with_file(name, false, |f| f.set_len(len))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.forget(from);
        self.forget(to);
        std::fs::rename(self.path(from), self.path(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.forget(name);
        std::fs::remove_file(self.path(name))
    }

    fn usage(&self) -> u64 {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return 0 };
        entries.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_on_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        let fs = DirFs::open(dir.path()).unwrap();
        assert!(matches!(DirFs::open(dir.path()), Err(DataDirError::Locked { .. })), "a second server is refused");
        let w = |file: &str, offset, data: &[u8]| IoOp::Write { file: file.into(), offset, data: data.to_vec() };
        assert_eq!(execute(&fs, &w("a", 0, b"hello")), Ok(IoReply::Done));
        assert_eq!(execute(&fs, &w("a", 5, b" world")), Ok(IoReply::Done));
        assert_eq!(execute(&fs, &IoOp::Sync { file: "a".into() }), Ok(IoReply::Done));
        assert_eq!(execute(&fs, &IoOp::SyncDir), Ok(IoReply::Done));
        assert_eq!(execute(&fs, &IoOp::Read { file: "a".into() }), Ok(IoReply::Data(b"hello world".to_vec())));
        assert_eq!(execute(&fs, &IoOp::Truncate { file: "a".into(), len: 5 }), Ok(IoReply::Done));
        assert_eq!(execute(&fs, &IoOp::Rename { from: "a".into(), to: "b".into() }), Ok(IoReply::Done));
        assert_eq!(execute(&fs, &IoOp::List), Ok(IoReply::Listed(vec!["b".into()])));
        assert_eq!(execute(&fs, &IoOp::Read { file: "b".into() }), Ok(IoReply::Data(b"hello".to_vec())));
        assert_eq!(execute(&fs, &IoOp::Remove { file: "b".into() }), Ok(IoReply::Done));
        assert_eq!(execute(&fs, &IoOp::Read { file: "b".into() }), Err(DiskError::NotFound));
        assert_eq!(execute(&fs, &IoOp::Sync { file: "b".into() }), Err(DiskError::NotFound));
    }

    #[test]
    fn read_at_returns_the_slice_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        let fs = DirFs::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let w = |file: &str, offset, data: &[u8]| IoOp::Write { file: file.into(), offset, data: data.to_vec() };
        let at = |offset, len| execute(&fs, &IoOp::ReadAt { file: "a".into(), offset, len });
        assert_eq!(at(0, 10), Err(DiskError::NotFound), "a missing file");
        assert_eq!(execute(&fs, &w("a", 0, &data)), Ok(IoReply::Done));
        assert_eq!(execute(&fs, &IoOp::Sync { file: "a".into() }), Ok(IoReply::Done));
        assert_eq!(execute(&fs, &IoOp::SyncDir), Ok(IoReply::Done));
        assert_eq!(at(100, 50), Ok(IoReply::Data(data[100..150].to_vec())));
        assert_eq!(at(0, 3000), Ok(IoReply::Data(data.clone())));
        assert_eq!(at(0, u64::MAX), Ok(IoReply::Data(data.clone())), "a huge len reads to the end");
        assert_eq!(at(2990, 100), Ok(IoReply::Data(data[2990..].to_vec())), "cut where the file ends");
        assert_eq!(at(1234, 0), Ok(IoReply::Data(Vec::new())));
        assert_eq!(at(3000, 10), Ok(IoReply::Data(Vec::new())), "at the end");
        assert_eq!(at(10_000, 10), Ok(IoReply::Data(Vec::new())), "past the end");
        assert_eq!(at(u64::MAX, u64::MAX), Ok(IoReply::Data(Vec::new())), "far past the end");
        // Unsynced bytes are seen too, as by Read.
        assert_eq!(execute(&fs, &w("a", 3000, b"xyz")), Ok(IoReply::Done));
        assert_eq!(at(2999, 10), Ok(IoReply::Data([&data[2999..], b"xyz"].concat())));
        // Across the 1 MiB first buffer.
        let big: Vec<u8> = (0..(3 << 20) + 5u32).map(|i| (i % 253) as u8).collect();
        assert_eq!(execute(&fs, &w("big", 0, &big)), Ok(IoReply::Done));
        let big_at = |offset: u64, len| execute(&fs, &IoOp::ReadAt { file: "big".into(), offset, len });
        assert_eq!(big_at(7, u64::MAX), Ok(IoReply::Data(big[7..].to_vec())));
        assert_eq!(big_at(1, (2 << 20) + 3), Ok(IoReply::Data(big[1..(2 << 20) + 4].to_vec())));
        assert_eq!(execute(&fs, &IoOp::Remove { file: "a".into() }), Ok(IoReply::Done));
        assert_eq!(at(0, 10), Err(DiskError::NotFound), "a removed file");
    }

    /// A file system that counts fsyncs, over a real directory.
    struct Counting(DirFs, std::sync::atomic::AtomicU32);

    impl Fs for Counting {
        fn list(&self) -> io::Result<Vec<String>> {
            self.0.list()
        }
        fn read(&self, name: &str) -> io::Result<Vec<u8>> {
            self.0.read(name)
        }
        fn read_at(&self, name: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
            self.0.read_at(name, offset, len)
        }
        fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
            self.0.write_at(name, offset, data)
        }
        fn sync(&self, name: &str) -> io::Result<()> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.sync(name)
        }
        fn sync_dir(&self) -> io::Result<()> {
            self.0.sync_dir()
        }
        fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
            self.0.truncate(name, len)
        }
        fn rename(&self, from: &str, to: &str) -> io::Result<()> {
            self.0.rename(from, to)
        }
        fn remove(&self, name: &str) -> io::Result<()> {
            self.0.remove(name)
        }
        fn usage(&self) -> u64 {
            self.0.usage()
        }
    }

    #[test]
    fn a_segment_write_is_fsynced_at_once_and_the_fsync_request_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let fs = std::sync::Arc::new(Counting(DirFs::open(dir.path()).unwrap(), Default::default()));
        let syncs = || fs.1.load(std::sync::atomic::Ordering::SeqCst);
        let mut ex = Executor::new(fs.clone());
        let seg = "log-00000000000000000001.seg".to_string();
        let w = |file: &str| IoOp::Write { file: file.into(), offset: 0, data: b"abc".to_vec() };
        assert_eq!(ex.run(&w(&seg)), Ok(IoReply::Done));
        assert_eq!(syncs(), 1, "fsynced right after the write");
        assert_eq!(ex.run(&IoOp::Sync { file: seg.clone() }), Ok(IoReply::Done));
        assert_eq!(syncs(), 1, "the fsync request is answered by the fsync already done");
        assert_eq!(ex.run(&IoOp::Sync { file: seg.clone() }), Ok(IoReply::Done));
        assert_eq!(syncs(), 2, "the early result is used once only");
        // Another operation in between, or another file: a real fsync.
        ex.run(&w(&seg)).unwrap();
        ex.run(&IoOp::SyncDir).unwrap();
        ex.run(&IoOp::Sync { file: seg.clone() }).unwrap();
        assert_eq!(syncs(), 4);
        ex.run(&w("hardstate.tmp")).unwrap();
        ex.run(&IoOp::Sync { file: "hardstate.tmp".into() }).unwrap();
        assert_eq!(syncs(), 5, "other files are not fsynced early");
    }
}
