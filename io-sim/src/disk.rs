//! A deterministic simulated disk with faults.
//!
//! The model follows what POSIX actually promises, so that crash testing is honest:
//!
//! - File *contents* become durable only through `Sync` of that file. Each inode keeps its
//!   current content (`data`, what reads see), its durable content (as of the last completed
//!   `Sync`) and the ordered list of data operations since then (`pending`).
//! - *Names* become durable only through `SyncDir`. The disk keeps the current directory (what
//!   `List` and name lookups see), the durable directory (as of the last `SyncDir`) and the
//!   ordered list of directory operations since then. A file that was created and synced but
//!   whose directory entry was never synced may vanish on power loss.
//! - On [`SimDisk::crash`], a uniformly random prefix of the directory operations survives, and
//!   for every inode still referenced a uniformly random prefix of its pending data operations
//!   survives; with `torn_writes`, the first lost write may survive as a prefix of its 512-byte
//!   sectors.
//!
//! All randomness comes from the caller's [`ChaCha8Rng`]; all maps are ordered, so the same
//! seed and the same operations give the same results, bit for bit.

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use truba_engine::{DiskError, IoOp, IoReply};

/// Size of the unit a write can be torn at, aligned to absolute file offsets.
pub const SECTOR: u64 = 512;

/// Fault and latency settings of a [`SimDisk`].
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiskFaults {
    /// Per Read: return a copy with one random bit flipped (transient: the stored bytes stay
    /// intact).
    pub read_bitflip_prob: f64,
    /// Per Read: fail with `DiskError::Io("latent sector error ...")` (transient).
    pub read_error_prob: f64,
    /// On crash, the first unsynced write that does not survive may survive as a prefix of its
    /// 512-byte sectors.
    pub torn_writes: bool,
    /// Per op: probability of adding a latency spike.
    pub latency_spike_prob: f64,
    /// Spike size upper bound in milliseconds (uniform in `1..=this`).
    pub latency_spike_ms: u64,
    /// Base latency of a write, read or metadata op in microseconds (uniform in
    /// `[this/2, this]`).
    pub write_latency_us: u64,
    /// Base latency of `Sync`/`SyncDir` in microseconds (uniform in `[this/2, this]`).
    pub fsync_latency_us: u64,
    /// Per crash of a cluster member: one bit of a log segment rots on the medium (persistent:
    /// every later read sees it). The world only lets it happen where a good copy survives on
    /// the other members.
    pub rot_on_crash_prob: f64,
    /// Which files rot may hit, one drawn per rot among those present: `log` (a segment),
    /// `snapshot` (the newest snapshot), `hardstate` (one copy of the hard state) and
    /// `hardstate-all` (every copy: the replica loses its votes for good).
    pub rot_files: Vec<RotFile>,
}

/// A kind of file that rot at rest may hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RotFile {
    Log,
    Snapshot,
    Hardstate,
    HardstateAll,
}

impl Default for DiskFaults {
    fn default() -> Self {
        DiskFaults {
            read_bitflip_prob: 0.0,
            read_error_prob: 0.0,
            torn_writes: false,
            latency_spike_prob: 0.0,
            latency_spike_ms: 0,
            write_latency_us: 50,
            fsync_latency_us: 2000,
            rot_on_crash_prob: 0.0,
            rot_files: vec![RotFile::Log],
        }
    }
}

/// Counters of what the disk did and which faults it injected.
#[derive(Clone, Debug, Default)]
pub struct DiskStats {
    /// Successful writes.
    pub writes: u64,
    /// Successful `Sync` and `SyncDir` operations.
    pub syncs: u64,
    /// Reads of existing files (including the ones that were then faulted).
    pub reads: u64,
    /// Reads answered with one bit flipped.
    pub bitflips: u64,
    /// Reads failed with an injected latent sector error.
    pub read_errors: u64,
    /// Operations refused with `DiskError::NoSpace`.
    pub nospace: u64,
    /// Payload bytes of successful writes.
    pub bytes_written: u64,
}

/// A data operation on one inode, not yet made durable by a `Sync`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DataOp {
    Write { offset: u64, data: Vec<u8> },
    Truncate { len: u64 },
}

/// What a pending data operation replaced, so the durable content can be rebuilt from the
/// current one without keeping a second copy of every file (a `Sync` is then O(1), and a crash
/// costs only the unsynced bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Undo {
    old_len: usize,
    /// Bytes that the operation overwrote or cut off, starting at `at`.
    at: usize,
    old: Vec<u8>,
}

#[derive(Clone, Debug, Default)]
struct File {
    /// Current content (the page cache): what reads see.
    data: Vec<u8>,
    /// Data operations since the last `Sync`, in order, with what each replaced.
    pending: Vec<DataOp>,
    undo: Vec<Undo>,
}

impl File {
    /// Applies `op` to the current content and remembers how to take it back.
    fn push(&mut self, op: DataOp) {
        let old_len = self.data.len();
        let (at, end) = match &op {
            DataOp::Write { offset, data } => (*offset as usize, *offset as usize + data.len()),
            DataOp::Truncate { len } => (*len as usize, old_len),
        };
        let old = self.data[at.min(old_len)..end.min(old_len)].to_vec();
        apply_data_op(&mut self.data, &op);
        self.undo.push(Undo { old_len, at, old });
        self.pending.push(op);
    }

    /// The content as of the last completed `Sync`.
    fn durable(&self) -> Vec<u8> {
        let mut buf = self.data.clone();
        for u in self.undo.iter().rev() {
            undo(&mut buf, u);
        }
        buf
    }

    fn sync(&mut self) {
        self.pending.clear();
        self.undo.clear();
    }
}

fn undo(buf: &mut Vec<u8>, u: &Undo) {
    if buf.len() < u.at + u.old.len() {
        buf.resize(u.at + u.old.len(), 0);
    }
    buf[u.at..u.at + u.old.len()].copy_from_slice(&u.old);
    buf.resize(u.old_len, 0);
}

/// A directory operation, not yet made durable by a `SyncDir`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DirOp {
    Create { name: String, ino: u64 },
    Rename { from: String, to: String },
    Remove { name: String },
}

/// Name -> inode number.
type Dir = BTreeMap<String, u64>;

/// The simulated disk: one flat data directory of files.
#[derive(Clone, Debug)]
pub struct SimDisk {
    faults: DiskFaults,
    capacity: Option<u64>,
    inodes: BTreeMap<u64, File>,
    next_ino: u64,
    /// What `List` and lookups see.
    current: Dir,
    /// As of the last completed `SyncDir`.
    durable: Dir,
    /// Directory operations since the last `SyncDir`, in order. Replaying all of them on
    /// `durable` gives `current`.
    dir_ops: Vec<DirOp>,
    stats: DiskStats,
}

impl SimDisk {
    /// An empty disk of unlimited capacity.
    pub fn new(faults: DiskFaults) -> SimDisk {
        SimDisk {
            faults,
            capacity: None,
            inodes: BTreeMap::new(),
            next_ino: 1,
            current: Dir::new(),
            durable: Dir::new(),
            dir_ops: Vec::new(),
            stats: DiskStats::default(),
        }
    }

    pub fn faults(&self) -> &DiskFaults {
        &self.faults
    }

    pub fn faults_mut(&mut self) -> &mut DiskFaults {
        &mut self.faults
    }

    /// `None` = unlimited. Lowering the capacity below `used_bytes()` deletes nothing; it only
    /// makes every operation that would grow the used bytes fail with `NoSpace`.
    pub fn set_capacity(&mut self, bytes: Option<u64>) {
        self.capacity = bytes;
    }

    /// Sum of the current lengths of all files in the current directory.
    pub fn used_bytes(&self) -> u64 {
        self.current.values().map(|ino| self.inodes[ino].data.len() as u64).sum()
    }

    pub fn stats(&self) -> DiskStats {
        self.stats.clone()
    }

    /// Latency in microseconds that the completion of `op` should be delayed by.
    pub fn latency_us(&self, op: &IoOp, rng: &mut ChaCha8Rng) -> u64 {
        let f = &self.faults;
        let base = match op {
            IoOp::Sync { .. } | IoOp::SyncDir => f.fsync_latency_us,
            _ => f.write_latency_us,
        };
        let mut us = rng.gen_range(base / 2..=base);
        let bytes = match op {
            IoOp::Write { data, .. } => data.len() as u64,
            IoOp::Read { file } => self.read_len(file, 0, u64::MAX),
            IoOp::ReadAt { file, offset, len } => self.read_len(file, *offset, *len),
            _ => 0,
        };
        us = us.saturating_add(bytes / 4096);
        if f.latency_spike_ms > 0 && chance(rng, f.latency_spike_prob) {
            let spike_ms = rng.gen_range(1..=f.latency_spike_ms);
            us = us.saturating_add(spike_ms.saturating_mul(1000));
        }
        us
    }

    /// Carries out `op` now on the current (page-cache) view and returns its result. A failed
    /// operation changes nothing.
    pub fn execute(&mut self, op: &IoOp, rng: &mut ChaCha8Rng) -> Result<IoReply, DiskError> {
        match op {
            IoOp::List => Ok(IoReply::Listed(self.current.keys().cloned().collect())),
            IoOp::Read { file } => self.read(file, 0, u64::MAX, rng),
            IoOp::ReadAt { file, offset, len } => self.read(file, *offset, *len, rng),
            IoOp::Write { file, offset, data } => self.write(file, *offset, data),
            IoOp::Sync { file } => {
                let ino = self.lookup(file)?;
                self.inodes.get_mut(&ino).expect("referenced inode exists").sync();
                self.stats.syncs += 1;
                Ok(IoReply::Done)
            }
            IoOp::SyncDir => {
                self.durable = self.current.clone();
                self.dir_ops.clear();
                self.drop_unreferenced();
                self.stats.syncs += 1;
                Ok(IoReply::Done)
            }
            IoOp::Truncate { file, len } => {
                let ino = self.lookup(file)?;
                let new_len = to_len(*len)?;
                let old_len = self.inodes[&ino].data.len();
                self.check_space(old_len, new_len)?;
                let f = self.inodes.get_mut(&ino).expect("referenced inode exists");
                f.push(DataOp::Truncate { len: new_len as u64 });
                Ok(IoReply::Done)
            }
            IoOp::Rename { from, to } => {
                let ino = self.lookup(from)?;
                if from == to {
                    return Ok(IoReply::Done);
                }
                self.current.remove(from);
                // POSIX: an existing target is replaced atomically.
                self.current.insert(to.clone(), ino);
                self.dir_ops.push(DirOp::Rename { from: from.clone(), to: to.clone() });
                Ok(IoReply::Done)
            }
            IoOp::Remove { file } => {
                self.lookup(file)?;
                self.current.remove(file);
                self.dir_ops.push(DirOp::Remove { name: file.clone() });
                Ok(IoReply::Done)
            }
        }
    }

    /// Power loss: everything not made durable is lost or torn. Returns a short summary for
    /// the history.
    pub fn crash(&mut self, rng: &mut ChaCha8Rng) -> String {
        // The directory: a random prefix of the operations since the last SyncDir survives.
        let n_dir = self.dir_ops.len();
        let kept_dir = if n_dir == 0 { 0 } else { rng.gen_range(0..=n_dir) };
        let mut dir = self.durable.clone();
        for op in &self.dir_ops[..kept_dir] {
            replay_dir_op(&mut dir, op);
        }
        self.current = dir.clone();
        self.durable = dir;
        self.dir_ops.clear();
        let before = self.inodes.len();
        self.drop_unreferenced();
        let dropped = before - self.inodes.len();

        // File contents: a random prefix of each inode's pending data operations survives.
        let names: BTreeMap<u64, &String> = self.current.iter().map(|(name, ino)| (*ino, name)).collect();
        let torn_writes = self.faults.torn_writes;
        let (mut total, mut kept, mut lost) = (0usize, 0usize, 0usize);
        let mut tears = Vec::new();
        for (ino, f) in self.inodes.iter_mut() {
            if f.pending.is_empty() {
                continue;
            }
            let p = f.pending.len();
            total += p;
            let k = rng.gen_range(0..=p);
            let mut buf = f.durable();
            for op in &f.pending[..k] {
                apply_data_op(&mut buf, op);
            }
            kept += k;
            lost += p - k;
            if k < p && torn_writes {
                if let DataOp::Write { offset, data } = &f.pending[k] {
                    let sectors = sector_count(*offset, data.len() as u64);
                    if sectors > 0 {
                        let j = rng.gen_range(0..=sectors);
                        let prefix = prefix_len(*offset, data.len() as u64, j) as usize;
                        if j > 0 {
                            apply_write(&mut buf, *offset, &data[..prefix]);
                            lost -= 1;
                            if j == sectors {
                                kept += 1;
                            } else {
                                tears.push(format!("{} ({j}/{sectors} sectors)", names[ino]));
                            }
                        }
                    }
                }
            }
            f.data = buf;
            f.sync();
        }

        let mut summary = format!(
            "kept {kept_dir}/{n_dir} dir ops, dropped {dropped} inodes; kept {kept}/{total} unsynced data ops, lost {lost}"
        );
        if !tears.is_empty() {
            summary.push_str(&format!(", tore {}: {}", tears.len(), tears.join(", ")));
        }
        summary
    }

    /// Silent rot at rest: flips one bit of a random file of a kind drawn from `rot_files` (of
    /// every hard state copy for `hardstate-all`). Called right after a crash, when nothing is
    /// pending, so the flip is on the durable medium. `allowed` says which kinds the world lets
    /// rot now. Returns a description, or `None` if there is nothing to rot.
    pub fn rot(&mut self, rng: &mut ChaCha8Rng, allowed: impl Fn(RotFile) -> bool) -> Option<(RotFile, String)> {
        let kinds: Vec<RotFile> = self
            .faults
            .rot_files
            .iter()
            .copied()
            .filter(|k| allowed(*k) && !self.rot_candidates(*k).is_empty())
            .collect();
        let kind = match kinds.len() {
            0 => return None,
            // One kind draws nothing, so scenarios that rot only segments keep their histories.
            1 => kinds[0],
            n => kinds[rng.gen_range(0..n)],
        };
        let candidates = self.rot_candidates(kind);
        let (name, ino) = candidates[rng.gen_range(0..candidates.len())].clone();
        let f = self.inodes.get_mut(&ino).expect("listed above");
        // After a power loss nothing is pending, so the durable view is the content itself.
        assert!(f.pending.is_empty(), "rot is applied right after a power loss");
        let len = f.data.len();
        // The hard state's copies are aimed at (the rest of its file is padding): one of them,
        // or each of them.
        let ranges: Vec<std::ops::Range<usize>> = match kind {
            RotFile::Log | RotFile::Snapshot => std::iter::once(0..len).collect(),
            RotFile::Hardstate => {
                let copies = truba_engine::hard_state_copy_ranges();
                vec![copies[rng.gen_range(0..copies.len())].clone()]
            }
            RotFile::HardstateAll => truba_engine::hard_state_copy_ranges().to_vec(),
        };
        let mut said = Vec::new();
        for range in ranges {
            let range = range.start.min(len - 1)..range.end.min(len);
            let at = rng.gen_range(range);
            let bit = rng.gen_range(0..8);
            f.data[at] ^= 1 << bit;
            said.push(format!("bit {bit} of byte {at}"));
        }
        Some((kind, format!("{} of {name} rotted", said.join(", "))))
    }

    /// The non-empty files of a kind, with their inodes.
    fn rot_candidates(&self, kind: RotFile) -> Vec<(String, u64)> {
        let matches = |name: &str| match kind {
            RotFile::Log => name.starts_with("log-"),
            RotFile::Snapshot => name.starts_with("snap-") && name.ends_with(".snap"),
            RotFile::Hardstate | RotFile::HardstateAll => name == "hardstate",
        };
        let mut found: Vec<(String, u64)> = self
            .current
            .iter()
            .filter(|(name, ino)| matches(name) && !self.inodes[*ino].data.is_empty())
            .map(|(name, ino)| (name.clone(), *ino))
            .collect();
        if kind == RotFile::Snapshot {
            // Older snapshots are leftovers on their way out; the newest is the one recovery reads.
            found = found.split_off(found.len().saturating_sub(1));
        }
        found
    }

    /// Names in the durable directory (as of the last `SyncDir`), sorted: what a crash that
    /// lost everything unsynced would leave.
    pub fn durable_names(&self) -> Vec<String> {
        self.durable.keys().cloned().collect()
    }

    /// Durable content of every file (name -> bytes) as it would be after a crash that lost
    /// everything unsynced.
    pub fn durable_files(&self) -> BTreeMap<String, Vec<u8>> {
        self.durable.iter().map(|(name, ino)| (name.clone(), self.inodes[ino].durable())).collect()
    }

    /// Current (page-cache) content of `name`, without faults, for checkers and debugging.
    pub fn current_file(&self, name: &str) -> Option<&[u8]> {
        self.current.get(name).map(|ino| self.inodes[ino].data.as_slice())
    }

    fn lookup(&self, name: &str) -> Result<u64, DiskError> {
        self.current.get(name).copied().ok_or(DiskError::NotFound)
    }

    /// Bytes a read of `len` bytes from `offset` of `name` would return (0 for a missing file).
    fn read_len(&self, name: &str, offset: u64, len: u64) -> u64 {
        self.current.get(name).map_or(0, |ino| read_range(self.inodes[ino].data.len(), offset, len).len() as u64)
    }

    /// Reads up to `len` bytes of `name` from `offset` (a whole-file `Read` is `0, u64::MAX`),
    /// with the read faults applied to the bytes returned only.
    fn read(&mut self, name: &str, offset: u64, len: u64, rng: &mut ChaCha8Rng) -> Result<IoReply, DiskError> {
        let ino = self.lookup(name)?;
        self.stats.reads += 1;
        let data = &self.inodes[&ino].data;
        if chance(rng, self.faults.read_error_prob) {
            self.stats.read_errors += 1;
            return Err(DiskError::Io(format!("latent sector error reading {name}")));
        }
        let mut copy = data[read_range(data.len(), offset, len)].to_vec();
        if !copy.is_empty() && chance(rng, self.faults.read_bitflip_prob) {
            let bit = rng.gen_range(0..copy.len() * 8);
            copy[bit / 8] ^= 1 << (bit % 8);
            self.stats.bitflips += 1;
        }
        Ok(IoReply::Data(copy))
    }

    fn write(&mut self, name: &str, offset: u64, data: &[u8]) -> Result<IoReply, DiskError> {
        let end = offset.checked_add(data.len() as u64).ok_or_else(too_large)?;
        let end = to_len(end)?;
        let existing = self.current.get(name).copied();
        let old_len = existing.map_or(0, |ino| self.inodes[&ino].data.len());
        self.check_space(old_len, old_len.max(end))?;
        let ino = match existing {
            Some(ino) => ino,
            None => {
                let ino = self.next_ino;
                self.next_ino += 1;
                self.inodes.insert(ino, File::default());
                self.current.insert(name.to_owned(), ino);
                self.dir_ops.push(DirOp::Create { name: name.to_owned(), ino });
                ino
            }
        };
        let f = self.inodes.get_mut(&ino).expect("referenced inode exists");
        f.push(DataOp::Write { offset, data: data.to_vec() });
        self.stats.writes += 1;
        self.stats.bytes_written += data.len() as u64;
        Ok(IoReply::Done)
    }

    /// Refuses growing a file from `old_len` to `new_len` if that would exceed the capacity.
    fn check_space(&mut self, old_len: usize, new_len: usize) -> Result<(), DiskError> {
        if new_len <= old_len {
            return Ok(());
        }
        if let Some(cap) = self.capacity {
            let used = self.used_bytes() - old_len as u64 + new_len as u64;
            if used > cap {
                self.stats.nospace += 1;
                return Err(DiskError::NoSpace);
            }
        }
        Ok(())
    }

    /// Drops inodes that no directory state reachable by a crash can refer to: those in
    /// neither the current nor the durable directory nor created since the last `SyncDir`.
    fn drop_unreferenced(&mut self) {
        let mut live: BTreeSet<u64> = self.current.values().chain(self.durable.values()).copied().collect();
        for op in &self.dir_ops {
            if let DirOp::Create { ino, .. } = op {
                live.insert(*ino);
            }
        }
        self.inodes.retain(|ino, _| live.contains(ino));
    }
}

/// The part `[offset, offset + len)` of a file of `file_len` bytes that a read returns: cut
/// where the file ends, and empty from an offset at or past the end.
pub(crate) fn read_range(file_len: usize, offset: u64, len: u64) -> std::ops::Range<usize> {
    let clamp = |at: u64| usize::try_from(at).map_or(file_len, |at| at.min(file_len));
    clamp(offset)..clamp(offset.saturating_add(len))
}

fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    // No draw at all for a disabled fault, so enabling none perturbs no other random choice.
    p > 0.0 && rng.gen_bool(p.min(1.0))
}

fn too_large() -> DiskError {
    DiskError::Io("file too large".to_owned())
}

fn to_len(len: u64) -> Result<usize, DiskError> {
    usize::try_from(len).map_err(|_| too_large())
}

fn replay_dir_op(dir: &mut Dir, op: &DirOp) {
    match op {
        DirOp::Create { name, ino } => {
            dir.insert(name.clone(), *ino);
        }
        DirOp::Rename { from, to } => {
            let ino = dir.remove(from).expect("dir ops replay in order: rename source exists");
            dir.insert(to.clone(), ino);
        }
        DirOp::Remove { name } => {
            dir.remove(name).expect("dir ops replay in order: removed name exists");
        }
    }
}

fn apply_write(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = offset as usize;
    let end = start + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[start..end].copy_from_slice(data);
}

fn apply_data_op(buf: &mut Vec<u8>, op: &DataOp) {
    match op {
        DataOp::Write { offset, data } => apply_write(buf, *offset, data),
        DataOp::Truncate { len } => buf.resize(*len as usize, 0),
    }
}

/// Number of sector pieces the write `[offset, offset + len)` touches, with sectors aligned to
/// absolute file offsets.
fn sector_count(offset: u64, len: u64) -> u64 {
    if len == 0 {
        0
    } else {
        (offset + len - 1) / SECTOR - offset / SECTOR + 1
    }
}

/// Bytes of the write `[offset, offset + len)` covered by its first `pieces` sector pieces.
fn prefix_len(offset: u64, len: u64, pieces: u64) -> u64 {
    if pieces == 0 {
        0
    } else if pieces >= sector_count(offset, len) {
        len
    } else {
        (offset / SECTOR + pieces) * SECTOR - offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const SEEDS: u64 = 400;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    fn w(file: &str, offset: u64, data: &[u8]) -> IoOp {
        IoOp::Write { file: file.into(), offset, data: data.to_vec() }
    }

    fn sync(file: &str) -> IoOp {
        IoOp::Sync { file: file.into() }
    }

    fn read(file: &str) -> IoOp {
        IoOp::Read { file: file.into() }
    }

    fn read_at(file: &str, offset: u64, len: u64) -> IoOp {
        IoOp::ReadAt { file: file.into(), offset, len }
    }

    fn rename(from: &str, to: &str) -> IoOp {
        IoOp::Rename { from: from.into(), to: to.into() }
    }

    fn ok(disk: &mut SimDisk, op: IoOp, rng: &mut ChaCha8Rng) -> IoReply {
        disk.execute(&op, rng).unwrap_or_else(|e| panic!("{op:?} failed: {e}"))
    }

    fn names(disk: &mut SimDisk, rng: &mut ChaCha8Rng) -> Vec<String> {
        match ok(disk, IoOp::List, rng) {
            IoReply::Listed(names) => names,
            other => panic!("List returned {other:?}"),
        }
    }

    fn content(disk: &mut SimDisk, file: &str, rng: &mut ChaCha8Rng) -> Option<Vec<u8>> {
        match disk.execute(&read(file), rng) {
            Ok(IoReply::Data(data)) => Some(data),
            Err(DiskError::NotFound) => None,
            other => panic!("Read returned {other:?}"),
        }
    }

    fn pattern(len: usize, salt: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt) | 1).collect()
    }

    #[test]
    fn sector_arithmetic() {
        assert_eq!(sector_count(0, 0), 0);
        assert_eq!(sector_count(0, 512), 1);
        assert_eq!(sector_count(0, 513), 2);
        assert_eq!(sector_count(511, 2), 2);
        assert_eq!(sector_count(100, 1500), 4); // [100,512) [512,1024) [1024,1536) [1536,1600)
        assert_eq!(prefix_len(100, 1500, 1), 412);
        assert_eq!(prefix_len(100, 1500, 2), 924);
        assert_eq!(prefix_len(100, 1500, 3), 1436);
        assert_eq!(prefix_len(100, 1500, 4), 1500);
        assert_eq!(prefix_len(1024, 512, 1), 512);
    }

    #[test]
    fn synced_data_survives_crash() {
        for seed in 0..SEEDS {
            let mut r = rng(seed);
            let mut disk = SimDisk::new(DiskFaults { torn_writes: true, ..DiskFaults::default() });
            let a = pattern(3000, 7);
            ok(&mut disk, w("a", 0, &a), &mut r);
            ok(&mut disk, w("b", 10, b"bee"), &mut r);
            ok(&mut disk, sync("a"), &mut r);
            ok(&mut disk, sync("b"), &mut r);
            ok(&mut disk, IoOp::SyncDir, &mut r);
            let expected: BTreeMap<String, Vec<u8>> =
                [("a".to_owned(), a.clone()), ("b".to_owned(), [&[0u8; 10][..], b"bee"].concat())].into();
            assert_eq!(disk.durable_files(), expected);
            disk.crash(&mut r);
            assert_eq!(names(&mut disk, &mut r), vec!["a", "b"]);
            assert_eq!(content(&mut disk, "a", &mut r).unwrap(), a);
            assert_eq!(content(&mut disk, "b", &mut r).unwrap(), expected["b"]);
            assert_eq!(disk.durable_files(), expected);
            assert_eq!(disk.durable_names(), vec!["a", "b"]);
        }
    }

    /// Classifies the content of a file after a crash that may have lost or torn one unsynced
    /// write of `new` at `offset` over the synced content `old`.
    #[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum Outcome {
        Absent,
        Torn(u64),
        Full,
    }

    fn classify(after: &[u8], old: &[u8], offset: u64, new: &[u8]) -> Outcome {
        let mut full = old.to_vec();
        apply_write(&mut full, offset, new);
        if after == old {
            return Outcome::Absent;
        }
        if after == full.as_slice() {
            return Outcome::Full;
        }
        for j in 1..sector_count(offset, new.len() as u64) {
            let mut torn = old.to_vec();
            apply_write(&mut torn, offset, &new[..prefix_len(offset, new.len() as u64, j) as usize]);
            if after == torn.as_slice() {
                return Outcome::Torn(j);
            }
        }
        panic!("content after crash is neither old, new, nor torn at a sector boundary");
    }

    fn unsynced_write_outcomes(torn_writes: bool, old_len: usize, offset: u64, new_len: usize) -> BTreeSet<Outcome> {
        let mut seen = BTreeSet::new();
        let old = pattern(old_len, 1);
        let new = pattern(new_len, 2);
        for seed in 0..SEEDS {
            let mut r = rng(seed);
            let mut disk = SimDisk::new(DiskFaults { torn_writes, ..DiskFaults::default() });
            ok(&mut disk, w("f", 0, &old), &mut r);
            ok(&mut disk, sync("f"), &mut r);
            ok(&mut disk, IoOp::SyncDir, &mut r);
            ok(&mut disk, w("f", offset, &new), &mut r);
            disk.crash(&mut r);
            let after = content(&mut disk, "f", &mut r).expect("a synced name survives");
            let outcome = classify(&after, &old, offset, &new);
            if let Outcome::Torn(j) = outcome {
                // A torn extending write grows the file only to its last surviving byte.
                let end = offset + prefix_len(offset, new.len() as u64, j);
                assert_eq!(after.len() as u64, end.max(old.len() as u64));
            }
            seen.insert(outcome);
            // The crash result is durable: a second crash changes nothing.
            disk.crash(&mut r);
            assert_eq!(content(&mut disk, "f", &mut r).unwrap(), after);
        }
        seen
    }

    #[test]
    fn unsynced_overwrite_is_full_torn_or_absent() {
        let seen = unsynced_write_outcomes(true, 2048, 100, 1500);
        assert!(seen.contains(&Outcome::Absent), "{seen:?}");
        assert!(seen.contains(&Outcome::Full), "{seen:?}");
        for j in 1..4 {
            assert!(seen.contains(&Outcome::Torn(j)), "{seen:?}");
        }
        let seen = unsynced_write_outcomes(false, 2048, 100, 1500);
        assert_eq!(seen, [Outcome::Absent, Outcome::Full].into());
    }

    #[test]
    fn unsynced_extending_write_is_full_torn_or_absent() {
        // [600, 1600): pieces end at 1024, 1536, 1600.
        let seen = unsynced_write_outcomes(true, 700, 600, 1000);
        assert_eq!(seen, [Outcome::Absent, Outcome::Torn(1), Outcome::Torn(2), Outcome::Full].into());
        let seen = unsynced_write_outcomes(false, 700, 600, 1000);
        assert_eq!(seen, [Outcome::Absent, Outcome::Full].into());
    }

    /// Random unsynced writes and truncates after a sync: the crash result is always the state
    /// after some prefix of them, or that state with a sector prefix of the next write.
    #[test]
    fn crash_result_is_a_prefix_state() {
        for seed in 0..SEEDS {
            let mut r = rng(seed);
            let mut disk = SimDisk::new(DiskFaults { torn_writes: true, ..DiskFaults::default() });
            ok(&mut disk, w("f", 0, &pattern(1000, 3)), &mut r);
            ok(&mut disk, sync("f"), &mut r);
            ok(&mut disk, IoOp::SyncDir, &mut r);
            let mut states = vec![disk.current_file("f").unwrap().to_vec()];
            let mut legal: Vec<Vec<u8>> = states.clone();
            for i in 0..5u8 {
                let before = states.last().unwrap().clone();
                let op = if r.gen_bool(0.25) {
                    IoOp::Truncate { file: "f".into(), len: r.gen_range(0..3000) }
                } else {
                    let offset = r.gen_range(0..3000);
                    let len = r.gen_range(0..1500);
                    let data = pattern(len, 10 + i);
                    for j in 1..sector_count(offset, len as u64) {
                        let mut torn = before.clone();
                        apply_write(&mut torn, offset, &data[..prefix_len(offset, len as u64, j) as usize]);
                        legal.push(torn);
                    }
                    IoOp::Write { file: "f".into(), offset, data }
                };
                ok(&mut disk, op, &mut r);
                states.push(disk.current_file("f").unwrap().to_vec());
                legal.push(states.last().unwrap().clone());
            }
            disk.crash(&mut r);
            let after = disk.current_file("f").unwrap();
            assert!(legal.iter().any(|s| s == after), "seed {seed}: crash result is not a legal state");
        }
    }

    #[test]
    fn unsynced_create_can_vanish_even_after_file_sync() {
        let (mut vanished, mut survived) = (0, 0);
        for seed in 0..SEEDS {
            let mut r = rng(seed);
            let mut disk = SimDisk::new(DiskFaults::default());
            ok(&mut disk, w("old", 0, b"old"), &mut r);
            ok(&mut disk, sync("old"), &mut r);
            ok(&mut disk, IoOp::SyncDir, &mut r);
            ok(&mut disk, w("new", 0, b"synced data"), &mut r);
            ok(&mut disk, sync("new"), &mut r);
            assert_eq!(disk.durable_names(), vec!["old"]);
            disk.crash(&mut r);
            match content(&mut disk, "new", &mut r) {
                None => {
                    vanished += 1;
                    assert_eq!(names(&mut disk, &mut r), vec!["old"]);
                    assert_eq!(disk.inodes.len(), 1, "the unreferenced inode is dropped");
                }
                Some(data) => {
                    survived += 1;
                    assert_eq!(data, b"synced data");
                    assert_eq!(names(&mut disk, &mut r), vec!["new", "old"]);
                }
            }
            assert_eq!(content(&mut disk, "old", &mut r).unwrap(), b"old");
        }
        assert!(vanished > 0 && survived > 0, "vanished {vanished}, survived {survived}");

        // With SyncDir the synced create always survives.
        for seed in 0..50 {
            let mut r = rng(seed);
            let mut disk = SimDisk::new(DiskFaults::default());
            ok(&mut disk, w("new", 0, b"synced data"), &mut r);
            ok(&mut disk, sync("new"), &mut r);
            ok(&mut disk, IoOp::SyncDir, &mut r);
            disk.crash(&mut r);
            assert_eq!(content(&mut disk, "new", &mut r).unwrap(), b"synced data");
        }
    }

    #[test]
    fn rename_without_syncdir_may_be_undone() {
        // Durable: a = v1. Then: create tmp = v2 (synced), rename tmp -> a, no SyncDir.
        let mut seen = BTreeSet::new();
        for seed in 0..SEEDS {
            let mut r = rng(seed);
            let mut disk = SimDisk::new(DiskFaults::default());
            ok(&mut disk, w("a", 0, b"v1"), &mut r);
            ok(&mut disk, sync("a"), &mut r);
            ok(&mut disk, IoOp::SyncDir, &mut r);
            ok(&mut disk, w("tmp", 0, b"v2"), &mut r);
            ok(&mut disk, sync("tmp"), &mut r);
            ok(&mut disk, rename("tmp", "a"), &mut r);
            assert_eq!(names(&mut disk, &mut r), vec!["a"]);
            assert_eq!(content(&mut disk, "a", &mut r).unwrap(), b"v2");
            disk.crash(&mut r);
            let a = content(&mut disk, "a", &mut r);
            let tmp = content(&mut disk, "tmp", &mut r);
            seen.insert((a, tmp));
        }
        let v = |s: &[u8]| Some(s.to_vec());
        let expected: BTreeSet<_> = [
            (v(b"v1"), None),     // nothing kept
            (v(b"v1"), v(b"v2")), // create kept, rename lost
            (v(b"v2"), None),     // both kept
        ]
        .into();
        assert_eq!(seen, expected);

        // After SyncDir the rename is durable.
        for seed in 0..50 {
            let mut r = rng(seed);
            let mut disk = SimDisk::new(DiskFaults::default());
            ok(&mut disk, w("a", 0, b"v1"), &mut r);
            ok(&mut disk, sync("a"), &mut r);
            ok(&mut disk, IoOp::SyncDir, &mut r);
            ok(&mut disk, w("tmp", 0, b"v2"), &mut r);
            ok(&mut disk, sync("tmp"), &mut r);
            ok(&mut disk, rename("tmp", "a"), &mut r);
            ok(&mut disk, IoOp::SyncDir, &mut r);
            assert_eq!(disk.durable_files(), [("a".to_owned(), b"v2".to_vec())].into());
            disk.crash(&mut r);
            assert_eq!(names(&mut disk, &mut r), vec!["a"]);
            assert_eq!(content(&mut disk, "a", &mut r).unwrap(), b"v2");
        }
    }

    #[test]
    fn remove_without_syncdir_may_be_undone() {
        let mut seen = BTreeSet::new();
        for seed in 0..100 {
            let mut r = rng(seed);
            let mut disk = SimDisk::new(DiskFaults::default());
            ok(&mut disk, w("a", 0, b"data"), &mut r);
            ok(&mut disk, sync("a"), &mut r);
            ok(&mut disk, IoOp::SyncDir, &mut r);
            ok(&mut disk, IoOp::Remove { file: "a".into() }, &mut r);
            assert_eq!(content(&mut disk, "a", &mut r), None);
            disk.crash(&mut r);
            seen.insert(content(&mut disk, "a", &mut r));
        }
        assert_eq!(seen, [None, Some(b"data".to_vec())].into());
    }

    #[test]
    fn missing_names_are_not_found() {
        let mut r = rng(0);
        let mut disk = SimDisk::new(DiskFaults::default());
        for op in [
            read("x"),
            read_at("x", 0, 10),
            sync("x"),
            IoOp::Truncate { file: "x".into(), len: 0 },
            IoOp::Remove { file: "x".into() },
            rename("x", "y"),
        ] {
            assert_eq!(disk.execute(&op, &mut r), Err(DiskError::NotFound), "{op:?}");
        }
        assert!(names(&mut disk, &mut r).is_empty());
        assert!(disk.dir_ops.is_empty());
    }

    #[test]
    fn writes_truncates_renames_and_list() {
        let mut r = rng(0);
        let mut disk = SimDisk::new(DiskFaults::default());
        ok(&mut disk, w("b", 4, b"xy"), &mut r);
        assert_eq!(content(&mut disk, "b", &mut r).unwrap(), b"\0\0\0\0xy");
        ok(&mut disk, w("b", 1, b"Q"), &mut r);
        assert_eq!(content(&mut disk, "b", &mut r).unwrap(), b"\0Q\0\0xy");
        ok(&mut disk, IoOp::Truncate { file: "b".into(), len: 2 }, &mut r);
        assert_eq!(content(&mut disk, "b", &mut r).unwrap(), b"\0Q");
        ok(&mut disk, IoOp::Truncate { file: "b".into(), len: 4 }, &mut r);
        assert_eq!(content(&mut disk, "b", &mut r).unwrap(), b"\0Q\0\0");
        ok(&mut disk, w("a", 0, b"aaa"), &mut r);
        ok(&mut disk, w("c", 0, b""), &mut r);
        assert_eq!(names(&mut disk, &mut r), vec!["a", "b", "c"]);
        assert_eq!(disk.used_bytes(), 7);
        ok(&mut disk, rename("a", "b"), &mut r);
        assert_eq!(names(&mut disk, &mut r), vec!["b", "c"]);
        assert_eq!(content(&mut disk, "b", &mut r).unwrap(), b"aaa");
        assert_eq!(disk.used_bytes(), 3);
        ok(&mut disk, rename("b", "b"), &mut r);
        assert_eq!(names(&mut disk, &mut r), vec!["b", "c"]);
        ok(&mut disk, IoOp::Remove { file: "c".into() }, &mut r);
        assert_eq!(names(&mut disk, &mut r), vec!["b"]);
        assert_eq!(disk.durable_names(), Vec::<String>::new());
        ok(&mut disk, IoOp::SyncDir, &mut r);
        assert_eq!(disk.durable_names(), vec!["b"]);
        // Directory durable, contents not: b's inode exists durably but is empty.
        assert_eq!(disk.durable_files(), [("b".to_owned(), Vec::new())].into());
        assert_eq!(disk.inodes.len(), 1);
        let stats = disk.stats();
        assert_eq!(stats.writes, 4);
        assert_eq!(stats.bytes_written, 6);
        assert_eq!(stats.syncs, 1);
    }

    #[test]
    fn capacity_makes_write_return_nospace_and_change_nothing() {
        let mut r = rng(0);
        let mut disk = SimDisk::new(DiskFaults::default());
        disk.set_capacity(Some(1000));
        ok(&mut disk, w("a", 0, &[1; 600]), &mut r);
        let dir_ops = disk.dir_ops.len();
        assert_eq!(disk.execute(&w("b", 0, &[2; 401]), &mut r), Err(DiskError::NoSpace));
        assert_eq!(names(&mut disk, &mut r), vec!["a"], "a refused write creates no file");
        assert_eq!(disk.dir_ops.len(), dir_ops);
        assert_eq!(disk.used_bytes(), 600);
        assert_eq!(disk.execute(&w("a", 500, &[3; 501]), &mut r), Err(DiskError::NoSpace));
        assert_eq!(disk.execute(&IoOp::Truncate { file: "a".into(), len: 1001 }, &mut r), Err(DiskError::NoSpace));
        assert_eq!(content(&mut disk, "a", &mut r).unwrap(), vec![1; 600]);
        assert_eq!(disk.inodes[&disk.current["a"]].pending.len(), 1);
        // Exactly full is fine; overwrites in place need no space.
        ok(&mut disk, w("b", 0, &[2; 400]), &mut r);
        assert_eq!(disk.used_bytes(), 1000);
        ok(&mut disk, w("a", 0, &[4; 600]), &mut r);
        assert_eq!(disk.execute(&w("c", 0, &[5]), &mut r), Err(DiskError::NoSpace));
        // Freeing space (remove) lets writes through again.
        ok(&mut disk, IoOp::Remove { file: "b".into() }, &mut r);
        ok(&mut disk, w("c", 0, &[5; 400]), &mut r);
        disk.set_capacity(None);
        ok(&mut disk, w("d", 0, &[6; 10_000]), &mut r);
        assert_eq!(disk.used_bytes(), 11_000);
        assert_eq!(disk.stats().nospace, 4);
    }

    #[test]
    fn bitflips_change_exactly_one_bit_of_the_copy_only() {
        let data = pattern(777, 9);
        let mut disk = SimDisk::new(DiskFaults { read_bitflip_prob: 1.0, ..DiskFaults::default() });
        let mut r = rng(5);
        ok(&mut disk, w("f", 0, &data), &mut r);
        ok(&mut disk, w("empty", 0, b""), &mut r);
        let mut flipped_positions = BTreeSet::new();
        for _ in 0..200 {
            let got = content(&mut disk, "f", &mut r).unwrap();
            assert_eq!(got.len(), data.len());
            let diff: u32 = got.iter().zip(&data).map(|(a, b)| (a ^ b).count_ones()).sum();
            assert_eq!(diff, 1);
            flipped_positions.insert(got.iter().zip(&data).position(|(a, b)| a != b).unwrap());
            assert_eq!(disk.current_file("f").unwrap(), data.as_slice(), "stored bytes intact");
        }
        assert!(flipped_positions.len() > 50, "flips spread over the file");
        assert_eq!(content(&mut disk, "empty", &mut r).unwrap(), b"");
        assert_eq!(disk.stats().bitflips, 200);
        assert_eq!(disk.stats().reads, 201);

        disk.faults_mut().read_bitflip_prob = 0.0;
        assert_eq!(content(&mut disk, "f", &mut r).unwrap(), data);

        disk.faults_mut().read_error_prob = 1.0;
        match disk.execute(&read("f"), &mut r) {
            Err(DiskError::Io(msg)) => assert!(msg.contains("latent sector error"), "{msg}"),
            other => panic!("expected a latent sector error, got {other:?}"),
        }
        assert_eq!(disk.stats().read_errors, 1);
        disk.faults_mut().read_error_prob = 0.0;
        assert_eq!(content(&mut disk, "f", &mut r).unwrap(), data);
    }

    #[test]
    fn read_at_returns_the_slice_a_whole_read_would_see() {
        let mut r = rng(0);
        let mut disk = SimDisk::new(DiskFaults::default());
        let data = pattern(3000, 4);
        let mut at = |disk: &mut SimDisk, offset, len| disk.execute(&read_at("a", offset, len), &mut r);
        assert_eq!(at(&mut disk, 0, 10), Err(DiskError::NotFound), "a missing file");
        ok(&mut disk, w("a", 0, &data), &mut rng(0));
        ok(&mut disk, sync("a"), &mut rng(0));
        ok(&mut disk, IoOp::SyncDir, &mut rng(0));
        assert_eq!(at(&mut disk, 100, 50), Ok(IoReply::Data(data[100..150].to_vec())));
        assert_eq!(at(&mut disk, 0, u64::MAX), Ok(IoReply::Data(data.clone())));
        assert_eq!(at(&mut disk, 2990, 100), Ok(IoReply::Data(data[2990..].to_vec())), "cut where the file ends");
        assert_eq!(at(&mut disk, 1234, 0), Ok(IoReply::Data(Vec::new())));
        assert_eq!(at(&mut disk, 3000, 10), Ok(IoReply::Data(Vec::new())), "at the end");
        assert_eq!(at(&mut disk, 10_000, 10), Ok(IoReply::Data(Vec::new())), "past the end");
        assert_eq!(at(&mut disk, u64::MAX, u64::MAX), Ok(IoReply::Data(Vec::new())), "far past the end");
        // Like Read, it sees the page cache: unsynced bytes too.
        ok(&mut disk, w("a", 3000, b"xyz"), &mut rng(0));
        assert_eq!(at(&mut disk, 2999, 10), Ok(IoReply::Data([&data[2999..], b"xyz"].concat())));
        assert_eq!(disk.stats().reads, 8, "reads of existing files are counted, as for Read");

        // Read faults hit the slice returned only.
        disk.faults_mut().read_bitflip_prob = 1.0;
        let mut flipped = BTreeSet::new();
        for _ in 0..200 {
            let Ok(IoReply::Data(got)) = at(&mut disk, 1000, 100) else { panic!("ReadAt failed") };
            assert_eq!(got.len(), 100);
            let diff: u32 = got.iter().zip(&data[1000..1100]).map(|(a, b)| (a ^ b).count_ones()).sum();
            assert_eq!(diff, 1);
            flipped.insert(got.iter().zip(&data[1000..1100]).position(|(a, b)| a != b).unwrap());
        }
        assert!(flipped.len() > 50, "flips spread over the slice");
        assert_eq!(at(&mut disk, 5000, 10), Ok(IoReply::Data(Vec::new())), "nothing to flip");
        assert_eq!(disk.stats().bitflips, 200);
        assert_eq!(&disk.current_file("a").unwrap()[..3000], data.as_slice(), "stored bytes intact");
        disk.faults_mut().read_bitflip_prob = 0.0;
        disk.faults_mut().read_error_prob = 1.0;
        match at(&mut disk, 0, 10) {
            Err(DiskError::Io(msg)) => assert!(msg.contains("latent sector error"), "{msg}"),
            other => panic!("expected a latent sector error, got {other:?}"),
        }
        assert_eq!(disk.stats().read_errors, 1);
    }

    #[test]
    fn a_whole_read_at_draws_like_a_read() {
        // Same seed, same faults: ReadAt of the whole file and Read give the same bytes.
        let faults = DiskFaults { read_bitflip_prob: 0.5, read_error_prob: 0.1, ..DiskFaults::default() };
        let data = pattern(500, 6);
        for seed in 0..50 {
            let mut disk = SimDisk::new(faults.clone());
            ok(&mut disk, w("f", 0, &data), &mut rng(0));
            let whole = disk.clone().execute(&read("f"), &mut rng(seed));
            assert_eq!(disk.execute(&read_at("f", 0, u64::MAX), &mut rng(seed)), whole);
        }
    }

    #[test]
    fn latency_bounds() {
        let mut r = rng(1);
        let mut disk = SimDisk::new(DiskFaults::default());
        ok(&mut disk, w("f", 0, &vec![0; 40_960]), &mut r);
        for _ in 0..200 {
            let l = disk.latency_us(&sync("f"), &mut r);
            assert!((1000..=2000).contains(&l), "{l}");
            let l = disk.latency_us(&IoOp::SyncDir, &mut r);
            assert!((1000..=2000).contains(&l), "{l}");
            let l = disk.latency_us(&w("f", 0, &[0; 8192]), &mut r);
            assert!((27..=52).contains(&l), "{l}");
            let l = disk.latency_us(&read("f"), &mut r);
            assert!((35..=60).contains(&l), "{l}");
            let l = disk.latency_us(&read_at("f", 0, u64::MAX), &mut r);
            assert!((35..=60).contains(&l), "{l}");
            let l = disk.latency_us(&read_at("f", 8192, 8192), &mut r);
            assert!((27..=52).contains(&l), "{l}");
            let l = disk.latency_us(&read_at("f", 40_000, 8192), &mut r);
            assert!((25..=50).contains(&l), "only the bytes returned count: {l}");
            let l = disk.latency_us(&IoOp::List, &mut r);
            assert!((25..=50).contains(&l), "{l}");
        }
        disk.faults_mut().latency_spike_prob = 1.0;
        disk.faults_mut().latency_spike_ms = 3;
        let mut spikes = BTreeSet::new();
        for _ in 0..200 {
            let l = disk.latency_us(&IoOp::List, &mut r);
            assert!((1025..=3050).contains(&l), "{l}");
            spikes.insert(l / 1000);
        }
        assert_eq!(spikes, [1, 2, 3].into());
    }

    #[test]
    fn crashes_are_deterministic() {
        let run = |seed: u64| {
            let mut r = rng(seed);
            let mut disk = SimDisk::new(DiskFaults { torn_writes: true, ..DiskFaults::default() });
            for i in 0..20u8 {
                let name = format!("f{}", i % 3);
                ok(&mut disk, w(&name, u64::from(i) * 300, &pattern(700, i)), &mut r);
                if i % 4 == 0 {
                    ok(&mut disk, sync(&name), &mut r);
                }
                if i % 7 == 0 {
                    ok(&mut disk, IoOp::SyncDir, &mut r);
                }
            }
            let summary = disk.crash(&mut r);
            (summary, disk.durable_files())
        };
        for seed in 0..20 {
            assert_eq!(run(seed), run(seed));
        }
    }

    #[test]
    fn faults_config_from_toml() {
        let f: DiskFaults = toml::from_str("torn_writes = true\nread_bitflip_prob = 0.01").unwrap();
        assert_eq!(f, DiskFaults { torn_writes: true, read_bitflip_prob: 0.01, ..DiskFaults::default() });
        assert!(toml::from_str::<DiskFaults>("no_such_fault = 1").is_err());
    }
}
