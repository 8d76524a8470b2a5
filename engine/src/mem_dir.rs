//! A perfect in-memory data directory: it carries out the engine's disk operations on a map of
//! file names to bytes, at once and without failing. For the engine's tests and the fuzz
//! targets, which drive an engine where the disk is never the interesting part (the simulator
//! has its own disk, with faults).

use crate::io::{DiskError, IoOp, IoReply};
use std::collections::BTreeMap;

/// File names and their bytes.
pub type MemDir = BTreeMap<String, Vec<u8>>;

/// Carries out one disk operation on `dir`. Offsets that do not fit in memory read as past the
/// end of the file (a crafted input may ask for any).
pub fn exec(dir: &mut MemDir, op: &IoOp) -> Result<IoReply, DiskError> {
    match op {
        IoOp::List => Ok(IoReply::Listed(dir.keys().cloned().collect())),
        IoOp::Read { file } => dir.get(file).cloned().map(IoReply::Data).ok_or(DiskError::NotFound),
        IoOp::ReadAt { file, offset, len } => {
            let data = dir.get(file).ok_or(DiskError::NotFound)?;
            let start = usize::try_from(*offset).unwrap_or(usize::MAX).min(data.len());
            let end = usize::try_from(offset.saturating_add(*len)).unwrap_or(usize::MAX).min(data.len());
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
