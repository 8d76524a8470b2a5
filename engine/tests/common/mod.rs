//! What the engine's integration tests share: a perfect in-memory directory that carries out
//! the engine's disk operations at once (the disk is never the interesting part there).

pub mod driver;

use std::collections::BTreeMap;
use truba_engine::{DiskError, IoOp, IoReply};

pub type Dir = BTreeMap<String, Vec<u8>>;

/// Executes one disk operation against an in-memory directory (a disk that never fails).
pub fn exec(dir: &mut Dir, op: &IoOp) -> Result<IoReply, DiskError> {
    match op {
        IoOp::List => Ok(IoReply::Listed(dir.keys().cloned().collect())),
        IoOp::Read { file } => dir.get(file).cloned().map(IoReply::Data).ok_or(DiskError::NotFound),
        IoOp::ReadAt { file, offset, len } => {
            let data = dir.get(file).ok_or(DiskError::NotFound)?;
            let start = (*offset as usize).min(data.len());
            let end = (offset.saturating_add(*len) as usize).min(data.len());
            Ok(IoReply::Data(data[start..end].to_vec()))
        }
        IoOp::Write { file, offset, data } => {
            let f = dir.entry(file.clone()).or_default();
            let start = *offset as usize;
            let end = start + data.len();
            if f.len() < end {
                f.resize(end, 0);
            }
            f[start..end].copy_from_slice(data);
            Ok(IoReply::Done)
        }
        IoOp::Sync { file } => dir.get(file).map(|_| IoReply::Done).ok_or(DiskError::NotFound),
        IoOp::SyncDir => Ok(IoReply::Done),
        IoOp::Truncate { file, len } => match dir.get_mut(file) {
            Some(f) => {
                f.resize(*len as usize, 0);
                Ok(IoReply::Done)
            }
            None => Err(DiskError::NotFound),
        },
        IoOp::Rename { from, to } => match dir.remove(from) {
            Some(d) => {
                dir.insert(to.clone(), d);
                Ok(IoReply::Done)
            }
            None => Err(DiskError::NotFound),
        },
        IoOp::Remove { file } => dir.remove(file).map(|_| IoReply::Done).ok_or(DiskError::NotFound),
    }
}
