//! The local log writer: the disk side of the log. It writes the in-memory log's new entries to
//! segment files in batches (write, fsync, and a directory fsync for a new segment), cuts the
//! written log back when a leader overrides entries, and after a write that failed for want of
//! space cuts off the leftovers and waits a moment before it writes again.
//!
//! It owns only that: which entries are durable is told back to the engine, which decides what
//! durability means (a leader counts it towards a commit, a follower acknowledges it) and what
//! a refused write means to the clients. One batch or one cut is under way at a time, so a cut
//! never races a write to the same segment.

use crate::config::Limits;
use crate::io::{DiskError, IoOp, IoReply};
use crate::log::{Log, Placement};
use crate::types::{Index, Instant};
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug)]
enum BatchStage {
    Write,
    Sync,
    SyncDir,
}

/// The batch being made durable: entries `first..=last` of the log as it was when formed.
struct Batch {
    first: Index,
    last: Index,
    /// Entries after this were cut from the in-memory log while the batch was in flight (a new
    /// leader overrode them), so their bytes on disk are no longer this replica's log.
    valid_upto: Index,
    placement: Placement,
    stage: BatchStage,
}

/// Disk operations run one after another to cut the written log back (or to remove the
/// segments an installed snapshot replaced); nothing is written until they are done.
struct Cut {
    from: Option<Index>,
    ops: VecDeque<IoOp>,
}

/// What a batch's finished disk operation leads to.
pub(crate) enum BatchStep {
    /// Issue `op` next. `early`: the entries through this index count as durable already (only
    /// under the `ack-before-fsync` mutations).
    Next { op: IoOp, early: Option<Index> },
    /// The batch is durable through this index.
    Durable(Index),
    /// The disk was full: `op` cuts a short write's leftovers off (nothing is written until it
    /// completes); the entries from `first` on were not written.
    NoSpace { op: IoOp, first: Index },
    /// A write or fsync failed otherwise: what the disk holds is unknown.
    Failed { file: String, reason: String },
}

/// What starting a pending cut leads to.
pub(crate) enum CutStart {
    /// Nothing to do now (a batch or cut is under way, or no cut is pending).
    Idle,
    /// The entries to cut were never written: nothing to do on disk, writing may go on.
    Unwritten,
    /// The cut has begun: issue its first operation with [`LogWriter::next_cut_op`].
    Begun,
}

#[derive(Default)]
pub(crate) struct LogWriter {
    batch: Option<Batch>,
    /// The written log must be cut back so that this index is written next.
    cut_from: Option<Index>,
    cut: Option<Cut>,
    /// After a failed write in a cluster, the next attempt waits until then.
    retry_at: Option<Instant>,
    /// A failed write's leftovers are being cut off; nothing is written until that is done.
    repairing: bool,
}

impl LogWriter {
    /// A batch, or the repair of a failed one, is under way.
    pub fn is_writing(&self) -> bool {
        self.batch.is_some() || self.repairing
    }

    /// A batch is in flight.
    pub fn has_batch(&self) -> bool {
        self.batch.is_some()
    }

    /// A cut is under way or pending.
    pub fn is_cutting(&self) -> bool {
        self.cut.is_some() || self.cut_from.is_some()
    }

    /// Nothing stops a new batch on the writer's side.
    pub fn ready(&self) -> bool {
        !self.is_writing() && !self.is_cutting() && self.retry_at.is_none()
    }

    /// When a write that failed for want of space is tried again.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Whether the wait after a failed write is over (it is then forgotten).
    pub fn retry_due(&mut self, now: Instant) -> bool {
        let due = self.retry_at.is_some_and(|t| t <= now);
        if due {
            self.retry_at = None;
        }
        due
    }

    /// Forms the next batch from the entries after the written log (at most `limits`' entries
    /// and bytes) and returns its write and the bytes it adds to the log's files.
    pub fn start_batch(&mut self, log: &Log, limits: &Limits) -> (IoOp, u64) {
        assert!(self.ready(), "one batch at a time, and none during a cut or repair");
        let first = log.written.next();
        let mut last = first;
        let mut bytes = 0usize;
        while let Some(e) = log.entry(last.next()) {
            bytes += crate::codec::encoded_len(e.at, &e.command);
            if (last.0 - first.0 + 1) >= limits.batch_entries_max as u64 || bytes > limits.batch_bytes_max as usize {
                break;
            }
            last = last.next();
        }
        let (placement, data) = log.place(last, limits.segment_bytes_max, limits.preallocate_bytes);
        let added = placement.end_offset - placement.offset;
        let op = IoOp::Write { file: placement.file.clone(), offset: placement.offset, data };
        self.batch = Some(Batch { first, last, valid_upto: last, placement, stage: BatchStage::Write });
        (op, added)
    }

    /// A batch's disk operation finished. `early`: the mutation that counts a written batch as
    /// durable before its fsync is on.
    pub fn on_batch_io(&mut self, result: Result<IoReply, DiskError>, early: bool, log: &mut Log) -> BatchStep {
        let batch = self.batch.as_mut().expect("batch IO completes only with a batch in flight");
        let file = batch.placement.file.clone();
        match (batch.stage, result) {
            (BatchStage::Write, Ok(_)) => {
                batch.stage = BatchStage::Sync;
                let early = early.then_some(batch.valid_upto);
                BatchStep::Next { op: IoOp::Sync { file }, early }
            }
            (BatchStage::Write, Err(DiskError::NoSpace)) => self.fail_batch(log),
            (BatchStage::Sync, Ok(_)) if batch.placement.new_segment => {
                batch.stage = BatchStage::SyncDir;
                BatchStep::Next { op: IoOp::SyncDir, early: None }
            }
            (BatchStage::Sync | BatchStage::SyncDir, Ok(_)) => {
                let batch = self.batch.take().expect("a batch in flight");
                debug_assert!(batch.first <= batch.last);
                log.placed(batch.placement);
                BatchStep::Durable(batch.valid_upto)
            }
            (stage, Err(e)) => {
                // After a failed fsync the kernel may have dropped the dirty pages: what is on
                // disk is unknown, so the only safe move is to stop and recover from the disk.
                BatchStep::Failed { file, reason: format!("{stage:?} failed: {e}") }
            }
        }
    }

    /// The disk was full. A short write may have left part of the batch behind; it is cut off
    /// before anything else is written, so that later records never sit after leftovers that
    /// would look like damage.
    fn fail_batch(&mut self, log: &mut Log) -> BatchStep {
        let batch = self.batch.take().expect("a batch in flight");
        let p = &batch.placement;
        let len = if p.new_segment { 0 } else { p.offset };
        if !p.new_segment {
            log.zeroed_to = log.zeroed_to.min(len);
        }
        self.repairing = true;
        BatchStep::NoSpace { op: IoOp::Truncate { file: p.file.clone(), len }, first: batch.first }
    }

    /// After a write that failed for want of space, no batch starts before `at` (a cluster
    /// member tries again; a lone replica refuses the write instead).
    pub fn retry_after(&mut self, at: Instant) {
        self.retry_at = Some(at);
    }

    /// A failed write's leftovers are cut off: writing may go on.
    pub fn repaired(&mut self) {
        self.repairing = false;
    }

    /// Entries from `from` on were dropped from the in-memory log (a new leader overrode them):
    /// a batch in flight no longer makes them durable, and if they were written (or are being),
    /// the disk is cut back once no write is in flight (see [`LogWriter::start_cut`]).
    pub fn truncated(&mut self, from: Index, log: &Log) {
        if let Some(b) = self.batch.as_mut() {
            b.valid_upto = b.valid_upto.min(from.prev());
        }
        let written_or_writing = from <= log.written || self.batch.as_ref().is_some_and(|b| from <= b.last);
        if written_or_writing {
            self.cut_from = Some(self.cut_from.map_or(from, |c| c.min(from)));
        }
    }

    /// Starts a pending cut once no batch is in flight.
    pub fn start_cut(&mut self, log: &Log) -> CutStart {
        if self.batch.is_some() || self.cut.is_some() {
            return CutStart::Idle;
        }
        let Some(from) = self.cut_from.take() else { return CutStart::Idle };
        if from > log.written {
            return CutStart::Unwritten;
        }
        self.cut = Some(Cut { from: Some(from), ops: log.cut_ops(from).into() });
        CutStart::Begun
    }

    /// Replaces whatever cut was pending with removing these files (the segments an installed
    /// snapshot replaced).
    pub fn start_removal(&mut self, ops: VecDeque<IoOp>) {
        self.cut_from = None;
        self.cut = Some(Cut { from: None, ops });
    }

    /// The cut's next operation, or `None` once it is done (the log then knows it is cut).
    pub fn next_cut_op(&mut self, log: &mut Log) -> Option<IoOp> {
        let cut = self.cut.as_mut().expect("a cut is under way");
        if let Some(op) = cut.ops.pop_front() {
            return Some(op);
        }
        let cut = self.cut.take().expect("checked");
        if let Some(from) = cut.from {
            log.cut_done(from);
        }
        None
    }

    pub fn invariants(&self, log: &Log, limits: &Limits) {
        assert!(log.written <= log.last_index() || self.is_cutting(), "written entries are held unless being cut");
        if let Some(b) = &self.batch {
            assert!(b.last.0 - b.first.0 < limits.batch_entries_max as u64);
            assert_eq!(b.first, log.written.next(), "the batch continues the written log");
        }
    }
}
