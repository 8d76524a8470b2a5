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
        IoOp::Write { file, offset, data } => fs.write_at(file, *offset, data),
        IoOp::Sync { file } => fs.sync(file),
        IoOp::SyncDir => fs.sync_dir(),
        IoOp::Truncate { file, len } => fs.truncate(file, *len),
        IoOp::Rename { from, to } => fs.rename(from, to),
        IoOp::Remove { file } => fs.remove(file),
    };
    r.map(|()| IoReply::Done).map_err(disk_error)
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
}
