//! This replica's side of the stored-session sources (see `stored.rs` for the replicated side):
//! writing the files the state asks for, one at a time in the order asked, reading ahead into
//! the sources whose first session is due (on the leader), removing files nothing refers to any
//! more, and the leader's proposals (spill, merge, ready).
//!
//! A spill's file is encoded from the held sessions in one piece (the memtable bounds it); a
//! merge streams: it reads both inputs and writes its output in `source_io_chunk_bytes` pieces,
//! so its memory does not depend on the sources' sizes. Both write a temporary name, fsync it,
//! rename it and fsync the directory; only then is the source durable here.

use crate::config::EngineConfig;
use crate::error::Fatal;
use crate::io::{DiskError, IoOp, IoReply, Replace};
use crate::op::{Command, Unspilled};
use crate::sessions::StateMachine;
use crate::stored::{
    frame_at, frame_len_announced, push_frame, source_header, source_name, FileJob, Frame, FrameKey, PendingMerge,
    FRAME_HEADER_LEN,
};
use crate::types::{Index, SessionId, SourceId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// One input of a merge: the untaken frames of a source file, read in pieces.
#[derive(Debug)]
struct MergeInput {
    file: String,
    /// File offset of `buf[0]`.
    offset: u64,
    buf: Vec<u8>,
    /// Frames still to copy.
    left: u64,
    /// The file has no more bytes (a read came back short).
    ended: bool,
}

impl MergeInput {
    fn new(file: String, from: (u64, u64), total: u64) -> MergeInput {
        MergeInput { file, offset: from.1, buf: Vec::new(), left: total - from.0, ended: false }
    }

    /// The next frame's key and length, if all of it is buffered.
    fn head(&self) -> Result<Option<FrameHead>, String> {
        if self.left == 0 {
            return Ok(None);
        }
        match frame_at(&self.buf) {
            Ok(Some(f)) => {
                let k: FrameKey = postcard::from_bytes(&f[FRAME_HEADER_LEN as usize..])
                    .map_err(|e| format!("undecodable frame at byte {}: {e}", self.offset))?;
                Ok(Some(((k.due.0, k.stored_at.0, k.id.0), f.len())))
            }
            Ok(None) if self.ended => Err(format!("ends inside a frame at byte {}", self.offset)),
            Ok(None) => Ok(None),
            Err(()) => Err(format!("checksum mismatch at byte {}", self.offset)),
        }
    }

    fn wants_read(&self) -> bool {
        self.left > 0 && !self.ended && frame_at(&self.buf).is_ok_and(|f| f.is_none())
    }

    fn read_op(&self, chunk: u64) -> IoOp {
        let want = frame_len_announced(&self.buf).map_or(0, |n| n as u64).max(chunk);
        let at = self.offset + self.buf.len() as u64;
        IoOp::ReadAt { file: self.file.clone(), offset: at, len: want }
    }
}

/// Read-ahead reads under way at once, over all sources (the rest wait for the next round).
const READS_AHEAD_MAX: usize = 8;

/// A frame's key (due, stored_at, id) and length.
type FrameHead = ((u64, u64, u64), usize);

/// One job runs at a time, so the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Running {
    Spill {
        source: SourceId,
        stage: Replace,
    },
    Merge {
        m: PendingMerge,
        inputs: [MergeInput; 2],
        out: Vec<u8>,
        written: u64,
        stage: Replace,
        reading: Option<usize>,
        read_failures: u32,
    },
}

/// Read-ahead into one source, on the leader: decoded sessions from its `from`-th on.
#[derive(Debug, Default)]
struct ReadAhead {
    from: u64,
    cached: VecDeque<Unspilled>,
    cached_bytes: u64,
    /// Bytes read past the cached frames (part of the next one), starting at `offset`.
    buf: Vec<u8>,
    offset: u64,
    reading: bool,
    generation: u64,
    failures: u32,
}

/// What a finished disk operation meant.
pub(crate) enum FileStep {
    Io(IoOp),
    Idle,
    Fatal(Fatal),
}

#[derive(Debug, Default)]
pub(crate) struct SourceFiles {
    /// Sources whose file is durable here.
    pub durable: BTreeSet<SourceId>,
    queue: VecDeque<FileJob>,
    running: Option<Running>,
    /// Files the state stopped referring to, with the index it did so at: removed once a durable
    /// snapshot at or after it exists (recovery never needs them again) and no merge reads them.
    gone: Vec<(Index, SourceId)>,
    reads: BTreeMap<SourceId, ReadAhead>,
    /// The leader's proposals not yet applied, by the index they were proposed at.
    proposed_spill: Option<Index>,
    proposed_merge: Option<Index>,
    proposed_ready: BTreeMap<SourceId, Index>,
}

impl SourceFiles {
    pub fn recovered(durable: BTreeSet<SourceId>) -> SourceFiles {
        SourceFiles { durable, ..SourceFiles::default() }
    }

    /// Takes the jobs and the unreferenced files the state produced by applying entries.
    pub fn collect(&mut self, state: &mut StateMachine) {
        self.queue.extend(state.sources.jobs.drain(..));
        let applied = state.applied();
        self.gone.extend(state.sources.gone.drain(..).map(|id| (applied, id)));
        self.proposed_spill = self.proposed_spill.filter(|i| *i > applied);
        self.proposed_merge = self.proposed_merge.filter(|i| *i > applied);
        self.proposed_ready.retain(|_, i| *i > applied);
        self.release(state);
    }

    /// Held records go once the source is ready and its file durable here.
    fn release(&self, state: &mut StateMachine) {
        let held: Vec<SourceId> = state.sources.held.keys().copied().collect();
        for id in held.into_iter().filter(|id| self.durable.contains(id)) {
            state.sources.release_held(id);
        }
    }

    /// Whether a snapshot now would be recoverable: every source it refers to has its file
    /// durable here or its records held (a merged source whose file is still being written is
    /// neither, so a snapshot waits for it).
    pub fn snapshot_allowed(&self, state: &StateMachine) -> bool {
        state.sources.referenced().all(|id| self.durable.contains(&id) || state.sources.held.contains_key(&id))
    }

    /// The highest index such that every source the state has created through it is durable
    /// here: what this replica reports to the leader.
    pub fn mark(&self, state: &StateMachine) -> Index {
        let missing = state.sources.needing_files();
        missing.filter(|id| !self.durable.contains(id)).map(|id| Index(id.0 - 1)).min().unwrap_or(state.applied())
    }

    /// Starts the next job if none runs.
    pub fn next_job(&mut self, state: &StateMachine, cfg: &EngineConfig) -> Option<IoOp> {
        if self.running.is_some() {
            return None;
        }
        let job = self.queue.pop_front()?;
        if self.durable.contains(&job_source(&job)) {
            // A replayed entry asks for a file that is already here whole: it has its final
            // name only once its data was fsynced.
            return self.next_job(state, cfg);
        }
        match job {
            FileJob::Spill { kind, source } => {
                let Some(held) = state.sources.held.get(&source) else {
                    // Already released: a durable copy exists (a replay of an old spill).
                    return self.next_job(state, cfg);
                };
                let mut data = Vec::with_capacity(held.iter().map(|(_, s)| s.bytes as usize + 64).sum());
                data.extend_from_slice(&source_header(kind, source));
                for (id, s) in held {
                    push_frame(&mut data, *id, s);
                }
                self.running = Some(Running::Spill { source, stage: Replace::Write });
                Some(IoOp::Write { file: tmp_name(source), offset: 0, data })
            }
            FileJob::Merge(m) => {
                let inputs = [
                    MergeInput::new(source_name(m.older), m.older_from, m.older_len),
                    MergeInput::new(source_name(m.newer), m.newer_from, m.newer_len),
                ];
                let mut out = Vec::new();
                out.extend_from_slice(&source_header(m.kind, m.into));
                self.running = Some(Running::Merge {
                    m,
                    inputs,
                    out,
                    written: 0,
                    stage: Replace::Write,
                    reading: None,
                    read_failures: 0,
                });
                match self.merge_step(cfg) {
                    FileStep::Io(op) => Some(op),
                    _ => unreachable!("a merge starts with a read or a write"),
                }
            }
        }
    }

    /// A job's disk operation finished.
    pub fn on_job_io(
        &mut self,
        result: Result<IoReply, DiskError>,
        state: &mut StateMachine,
        cfg: &EngineConfig,
    ) -> FileStep {
        let running = self.running.as_mut().expect("job IO completes only with a job running");
        let source = match running {
            Running::Spill { source, .. } => *source,
            Running::Merge { m, .. } => m.into,
        };
        let data = match result {
            Ok(IoReply::Data(d)) => Some(d),
            Ok(_) => None,
            Err(e) => {
                // A merge's failed read is tried again; a failed write or fsync stops the replica
                // (what reached the disk is unknown), as for the log.
                if let Running::Merge { reading: Some(i), inputs, read_failures, .. } = running {
                    *read_failures += 1;
                    if *read_failures <= cfg.limits.read_retries_max {
                        return FileStep::Io(inputs[*i].read_op((cfg.limits.source_io_chunk_bytes as u64).max(64)));
                    }
                    return FileStep::Fatal(Fatal::ReadFailed {
                        file: inputs[*i].file.clone(),
                        attempts: *read_failures,
                    });
                }
                return FileStep::Fatal(Fatal::DiskFailed { file: source_name(source), reason: e.to_string() });
            }
        };
        match running {
            Running::Spill { stage, .. } => match finishing(*stage, source, cfg) {
                Some((next, op)) => {
                    *stage = next;
                    FileStep::Io(op)
                }
                None => self.finished(source, state, cfg),
            },
            Running::Merge { inputs, reading, stage, .. } => {
                if let Some(i) = reading.take() {
                    let d = data.unwrap_or_default();
                    inputs[i].ended = d.is_empty();
                    inputs[i].buf.extend_from_slice(&d);
                    return self.merge_step(cfg);
                }
                if *stage == Replace::Write {
                    return self.merge_step(cfg);
                }
                match finishing(*stage, source, cfg) {
                    Some((next, op)) => {
                        *stage = next;
                        FileStep::Io(op)
                    }
                    None => self.finished(source, state, cfg),
                }
            }
        }
    }

    fn finished(&mut self, source: SourceId, state: &mut StateMachine, cfg: &EngineConfig) -> FileStep {
        self.running = None;
        self.durable.insert(source);
        if !wanted(state).contains(&source) {
            // Written for a state an installed snapshot replaced, which no longer refers to it.
            self.gone.push((state.applied(), source));
        }
        self.release(state);
        match self.next_job(state, cfg) {
            Some(op) => FileStep::Io(op),
            None => FileStep::Idle,
        }
    }

    /// Copies frames in key order until a read or a write is needed.
    fn merge_step(&mut self, cfg: &EngineConfig) -> FileStep {
        // A zero would never move a merge on; the server refuses small values, this is defence.
        let chunk = (cfg.limits.source_io_chunk_bytes as u64).max(64);
        let max_failures = cfg.limits.read_retries_max;
        let Some(Running::Merge { m, inputs, out, written, stage, reading, read_failures }) = self.running.as_mut()
        else {
            unreachable!("merging")
        };
        loop {
            if out.len() as u64 >= chunk {
                let data = std::mem::take(out);
                let offset = *written;
                *written += data.len() as u64;
                return FileStep::Io(IoOp::Write { file: tmp_name(m.into), offset, data });
            }
            if let Some(i) = (0..2).find(|i| inputs[*i].wants_read()) {
                *reading = Some(i);
                return FileStep::Io(inputs[i].read_op(chunk));
            }
            let heads = [inputs[0].head(), inputs[1].head()];
            let heads: Vec<Option<FrameHead>> = match heads.into_iter().collect() {
                Ok(h) => h,
                Err(reason) => {
                    // A bit may have flipped on the way from the disk: read it again first.
                    let i = inputs.iter().position(|i| i.head().is_err()).expect("one failed");
                    *read_failures += 1;
                    if *read_failures > max_failures {
                        return FileStep::Fatal(Fatal::SourceCorrupt { file: inputs[i].file.clone(), reason });
                    }
                    inputs[i].buf.clear();
                    inputs[i].ended = false;
                    *reading = Some(i);
                    return FileStep::Io(inputs[i].read_op(chunk));
                }
            };
            let pick = match (heads[0], heads[1]) {
                (Some(a), Some(b)) => Some(if a.0 < b.0 { (0, a.1) } else { (1, b.1) }),
                (Some(a), None) if inputs[1].left == 0 => Some((0, a.1)),
                (None, Some(b)) if inputs[0].left == 0 => Some((1, b.1)),
                _ => None,
            };
            match pick {
                Some((i, len)) => {
                    *read_failures = 0;
                    out.extend_from_slice(&inputs[i].buf[..len]);
                    inputs[i].buf.drain(..len);
                    inputs[i].offset += len as u64;
                    inputs[i].left -= 1;
                }
                None if inputs.iter().all(|i| i.left == 0) => {
                    if !out.is_empty() {
                        let data = std::mem::take(out);
                        let offset = *written;
                        *written += data.len() as u64;
                        return FileStep::Io(IoOp::Write { file: tmp_name(m.into), offset, data });
                    }
                    // The last piece is written: the merge's file is finished like a spill's.
                    let (next, op) = finishing(Replace::Write, m.into, cfg).expect("a written file has a next step");
                    *stage = next;
                    return FileStep::Io(op);
                }
                None => {
                    let i = inputs.iter().position(|i| i.left > 0 && i.ended).unwrap_or(0);
                    let reason = "the file ends before its last session".to_string();
                    return FileStep::Fatal(Fatal::SourceCorrupt { file: inputs[i].file.clone(), reason });
                }
            }
        }
    }

    /// Files to remove now that a snapshot at `index` is durable.
    pub fn removable(&mut self, index: Index) -> Vec<String> {
        let mut inputs: BTreeSet<SourceId> = BTreeSet::new();
        for j in &self.queue {
            if let FileJob::Merge(m) = j {
                inputs.extend([m.older, m.newer]);
            }
        }
        if let Some(Running::Merge { m, .. }) = &self.running {
            inputs.extend([m.older, m.newer]);
        }
        let (now, later): (Vec<_>, Vec<_>) =
            self.gone.drain(..).partition(|(at, id)| *at <= index && !inputs.contains(id));
        self.gone = later;
        now.into_iter()
            .map(|(_, id)| {
                self.durable.remove(&id);
                self.reads.remove(&id);
                source_name(id)
            })
            .collect()
    }

    // ---- snapshots sent and installed -------------------------------------------------------

    /// Whether every file of a manifest is durable here (a follower can fetch them).
    pub fn all_durable(&self, manifest: &[(SourceId, u64)]) -> bool {
        manifest.iter().all(|(id, _)| self.durable.contains(id))
    }

    /// An installed snapshot replaced the state: the files it came with are durable, and the
    /// files it needs written (held records, merges) are queued. Returns the files the new
    /// state does not refer to, to remove (not one a running job is writing).
    pub fn installed(&mut self, state: &mut StateMachine, shipped: &BTreeSet<SourceId>) -> Vec<String> {
        self.durable.extend(shipped.iter().copied());
        let wanted = wanted(state);
        let writing = match &self.running {
            Some(Running::Spill { source, .. }) => Some(*source),
            Some(Running::Merge { m, .. }) => Some(m.into),
            None => None,
        };
        let old = self.durable.iter().copied().chain(self.gone.iter().map(|g| g.1));
        let remove: BTreeSet<SourceId> = old.filter(|id| !wanted.contains(id) && Some(*id) != writing).collect();
        self.durable.retain(|id| wanted.contains(id));
        self.queue.clear();
        self.queue.extend(state.sources.jobs.drain(..).filter(|j| !self.durable.contains(&job_source(j))));
        self.gone.clear();
        self.reads.clear();
        self.forget_proposals();
        self.release(state);
        remove.into_iter().map(source_name).collect()
    }

    // ---- the leader -------------------------------------------------------------------------

    /// The leader's proposals about sources: ready ones (a majority holds the file), a spill
    /// when the memtable is over its limit, a merge when a kind has too many sources.
    /// `marks` are the followers' reported marks.
    pub fn plan(&mut self, state: &StateMachine, cfg: &EngineConfig, marks: &[Index], majority: usize) -> Vec<Command> {
        let mut out = Vec::new();
        let mine = self.mark(state);
        let pending = state
            .sources
            .kinds
            .values()
            .flatten()
            .filter(|s| !s.ready)
            .map(|s| s.id)
            .chain(state.sources.merges.iter().map(|m| m.into));
        for id in pending.collect::<Vec<_>>() {
            let holders = std::iter::once(mine).chain(marks.iter().copied()).filter(|m| m.0 >= id.0).count();
            if holders >= majority && !self.proposed_ready.contains_key(&id) {
                out.push(Command::SourceReady { source: id });
            }
        }
        let spilling = state.sources.kinds.values().flatten().any(|s| !s.ready);
        let total: u64 = state.memtable_bytes().values().sum();
        if self.proposed_spill.is_none() && !spilling && total > cfg.limits.stored_memtable_bytes_max {
            let (kind, _) = state
                .memtable_bytes()
                .iter()
                .max_by_key(|(k, b)| (**b, std::cmp::Reverse(**k)))
                .expect("nonzero total");
            out.push(Command::Spill { kind: *kind });
        }
        if self.proposed_merge.is_none() && state.sources.merges.is_empty() {
            if let Some(c) = plan_merge(state, cfg) {
                out.push(c);
            }
        }
        out
    }

    /// Records that the leader proposed `command` at `index`.
    pub fn proposed(&mut self, command: &Command, index: Index) {
        match command {
            Command::Spill { .. } => self.proposed_spill = Some(index),
            Command::Merge { .. } => self.proposed_merge = Some(index),
            Command::SourceReady { source } => {
                self.proposed_ready.insert(*source, index);
            }
            _ => {}
        }
    }

    /// A new leader's or a truncated log's proposals are void.
    pub fn forget_proposals(&mut self) {
        self.proposed_spill = None;
        self.proposed_merge = None;
        self.proposed_ready.clear();
    }

    /// The records of a spilled session, if held or read ahead here.
    pub fn records(&self, state: &StateMachine, id: SessionId) -> Option<Unspilled> {
        if let Some(u) = state.held_records(id) {
            return Some(u);
        }
        let p = state.sources.locate(id)?;
        self.reads.get(&p.source)?.cached.iter().find(|u| u.id == id).cloned()
    }

    /// Reads to issue so that every source whose first session is due has sessions read ahead.
    /// Returns (source, generation, op) for each read to issue.
    pub fn read_ahead(&mut self, state: &StateMachine, cfg: &EngineConfig, now_s: u64) -> Vec<(SourceId, u64, IoOp)> {
        let mut ops = Vec::new();
        let live: BTreeSet<SourceId> = state.sources.referenced().collect();
        self.reads.retain(|id, _| live.contains(id));
        let mut reading = self.reads.values().filter(|r| r.reading).count();
        for list in state.sources.kinds.values() {
            for s in list {
                let Some(head) = s.head() else { continue };
                if head.due.0 > now_s || state.sources.held.contains_key(&s.id) || !self.durable.contains(&s.id) {
                    continue;
                }
                let fresh = || ReadAhead { from: s.taken, offset: s.taken_offset, ..ReadAhead::default() };
                let r = self.reads.entry(s.id).or_insert_with(fresh);
                if r.from < s.taken && (r.from + r.cached.len() as u64) >= s.taken {
                    for _ in r.from..s.taken {
                        let u = r.cached.pop_front().expect("counted");
                        r.cached_bytes -= u.records.iter().map(|x| x.len() as u64).sum::<u64>();
                    }
                    r.from = s.taken;
                } else if r.from != s.taken {
                    let generation = r.generation + 1;
                    *r = ReadAhead { from: s.taken, offset: s.taken_offset, generation, ..ReadAhead::default() };
                }
                let known = r.from + r.cached.len() as u64;
                if reading >= READS_AHEAD_MAX
                    || r.reading
                    || known >= s.entries.len() as u64
                    || r.cached_bytes >= cfg.limits.source_read_ahead_bytes as u64
                {
                    continue;
                }
                r.reading = true;
                reading += 1;
                let at = r.offset + r.buf.len() as u64;
                let want = frame_len_announced(&r.buf)
                    .map_or(0, |n| n as u64)
                    .max((cfg.limits.source_read_ahead_bytes as u64).max(64));
                ops.push((s.id, r.generation, IoOp::ReadAt { file: source_name(s.id), offset: at, len: want }));
            }
        }
        ops
    }

    /// A read-ahead came back. `Err` if the file is damaged (after retries) or too short.
    pub fn on_read(
        &mut self,
        source: SourceId,
        generation: u64,
        result: Result<IoReply, DiskError>,
        state: &StateMachine,
        cfg: &EngineConfig,
    ) -> Result<(), Fatal> {
        let Some(r) = self.reads.get_mut(&source) else { return Ok(()) };
        if r.generation != generation {
            return Ok(());
        }
        r.reading = false;
        let file = source_name(source);
        let data = match result {
            Ok(IoReply::Data(d)) => d,
            Ok(_) => Vec::new(),
            Err(DiskError::NotFound) => {
                return Err(Fatal::SourceCorrupt { file, reason: "the state refers to it but it is missing".into() })
            }
            Err(e) => {
                // A failed read is tried again (at the next read-ahead) before giving up.
                r.failures += 1;
                if r.failures > cfg.limits.read_retries_max {
                    return Err(Fatal::ReadFailed { file, attempts: r.failures });
                }
                let _ = e;
                return Ok(());
            }
        };
        let Some(src) = state.sources.kinds.values().flatten().find(|s| s.id == source) else { return Ok(()) };
        let expected_more = r.from + (r.cached.len() as u64) < src.entries.len() as u64;
        if data.is_empty() && expected_more {
            let reason = format!(
                "ends at byte {} before its last session (from {} cached {} of {})",
                r.offset + r.buf.len() as u64,
                r.from,
                r.cached.len(),
                src.entries.len()
            );
            return Err(Fatal::SourceCorrupt { file, reason });
        }
        r.buf.extend_from_slice(&data);
        loop {
            let next = r.from + r.cached.len() as u64;
            let Some(expect) = src.entries.get(next as usize) else { break };
            let frame = match frame_at(&r.buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(()) => {
                    // A bit may have flipped on the way from the disk: read the frame again
                    // before calling the file corrupt.
                    r.failures += 1;
                    r.buf.clear();
                    if r.failures > cfg.limits.read_retries_max {
                        return Err(Fatal::SourceCorrupt {
                            file,
                            reason: format!("checksum mismatch at byte {}", r.offset),
                        });
                    }
                    return Ok(());
                }
            };
            let len = frame.len();
            let f: Frame = postcard::from_bytes(&frame[FRAME_HEADER_LEN as usize..])
                .map_err(|e| Fatal::SourceCorrupt { file: file.clone(), reason: format!("undecodable frame: {e}") })?;
            if (f.due, f.stored_at, f.id) != expect.key() {
                let reason = format!("session {} found where {} belongs", f.id.0, expect.id.0);
                return Err(Fatal::SourceCorrupt { file, reason });
            }
            r.failures = 0;
            r.cached_bytes += f.records.iter().map(|x| x.len() as u64).sum::<u64>();
            r.cached.push_back(f.into_unspilled());
            r.buf.drain(..len);
            r.offset += len as u64;
        }
        Ok(())
    }

    /// Every source the state refers to has its file durable here, its records held, or a job
    /// that will write it.
    pub fn covers(&self, state: &StateMachine) {
        let writing = self.running.as_ref().map(|r| match r {
            Running::Spill { source, .. } => *source,
            Running::Merge { m, .. } => m.into,
        });
        for id in state.sources.referenced() {
            let queued = self.queue.iter().any(|j| job_source(j) == id) || writing == Some(id);
            assert!(
                self.durable.contains(&id) || state.sources.held.contains_key(&id) || queued,
                "source {id:?} has its file durable here, its records held, or a job to write it"
            );
        }
    }

    pub fn invariants(&self, cfg: &EngineConfig) {
        for r in self.reads.values() {
            assert!(
                r.cached_bytes
                    <= cfg.limits.source_read_ahead_bytes as u64
                        + 2 * cfg.limits.source_io_chunk_bytes as u64
                        + 4 * 1024 * 1024,
                "read-ahead bounded"
            );
        }
    }
}

/// Two neighbouring ready sources to merge in a kind with too many. Sources are sorted into
/// tiers by size (powers of two of their untaken sessions), and two neighbours of the same tier
/// are merged first, the smallest tier first: like a binary counter, each session is rewritten
/// about log2(spills) times. Merging the pair with the fewest sessions instead would merge each
/// new spill into one ever growing source, rewriting it every time.
fn plan_merge(state: &StateMachine, cfg: &EngineConfig) -> Option<Command> {
    let max = cfg.limits.sources_per_kind_max as usize;
    let (kind, list) = state.sources.kinds.iter().find(|(_, l)| l.iter().filter(|s| s.ready).count() > max)?;
    let size = |s: &crate::stored::Source| s.untaken().len() as u64;
    let tier = |s: &crate::stored::Source| 64 - size(s).max(1).leading_zeros();
    let pairs = list.windows(2).filter(|w| w[0].ready && w[1].ready);
    let (older, newer) = pairs
        .min_by_key(|w| (tier(&w[0]) != tier(&w[1]), tier(&w[0]).max(tier(&w[1])), size(&w[0]) + size(&w[1])))
        .map(|w| (w[0].id, w[1].id))?;
    Some(Command::Merge { kind: *kind, older, newer })
}

/// Every source the state needs a file for.
fn wanted(state: &StateMachine) -> BTreeSet<SourceId> {
    state.sources.needing_files().collect()
}

fn job_source(j: &FileJob) -> SourceId {
    match j {
        FileJob::Spill { source, .. } => *source,
        FileJob::Merge(m) => m.into,
    }
}

fn tmp_name(source: SourceId) -> String {
    format!("{}.tmp", source_name(source))
}

/// After a file's data is written: fsync it, rename it into place, fsync the directory (as every
/// replaced file is); `None` once it is durable.
fn finishing(stage: Replace, source: SourceId, cfg: &EngineConfig) -> Option<(Replace, IoOp)> {
    let (tmp, name) = (tmp_name(source), source_name(source));
    if cfg.mutation(|m| m.source_rename_before_fsync) {
        // The deliberate bug: the final name before the fsync.
        return match stage {
            Replace::Write => Some((Replace::Rename, IoOp::Rename { from: tmp, to: name })),
            Replace::Rename => Some((Replace::Sync, IoOp::Sync { file: name })),
            Replace::Sync => Some((Replace::SyncDir, IoOp::SyncDir)),
            Replace::SyncDir => None,
        };
    }
    stage.next(&tmp, &name)
}
/// The source files a state refers to without holding their records, with their lengths: what
/// a follower installing a snapshot of it must fetch (a held source's records travel inside the
/// snapshot).
pub(crate) fn sizes(state: &StateMachine) -> Vec<(SourceId, u64)> {
    let files = state.sources.kinds.values().flatten().filter(|s| !state.sources.held.contains_key(&s.id));
    files
        .map(|s| (s.id, crate::stored::SOURCE_HEADER_LEN + s.entries.iter().map(|e| e.frame_len as u64).sum::<u64>()))
        .collect()
}
