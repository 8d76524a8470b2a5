//! Snapshots: the applied state written to a file at an index, in the background, while the
//! log keeps taking appends. Once the snapshot is durable (temp file fsynced, renamed, directory
//! fsynced), older snapshots and the segments it covers are removed.
//!
//! The state is encoded in one step when the snapshot starts (straight into the file's buffer);
//! only the disk work overlaps with appends. For very large states this encoding is a pause
//! proportional to the state's size.

use crate::codec::{encode_snapshot, seal_snapshot, snapshot_name, SNAPSHOT_HEADER_LEN};
use crate::io::{DiskError, IoOp, IoReply, Replace};
use crate::sessions::StateMachine;
use crate::types::{Index, SourceId, Term};

#[derive(Debug)]
struct Job {
    index: Index,
    stage: Replace,
    /// The source files the snapshot refers to.
    sources: Vec<SourceId>,
    /// A snapshot of this replica's own state (not one a leader sent): it replaces the log, and
    /// with it the only way to rebuild the ledger before it, so it is renamed into place only
    /// once the ledger is durable through its index.
    own: bool,
}

pub(crate) enum SnapStep {
    Io(IoOp),
    /// The snapshot of this replica's own state at `index` is written and fsynced; `op` renames
    /// it into place, to be issued once the ledger is durable through `index`.
    Rename {
        index: Index,
        op: IoOp,
    },
    /// The snapshot at `index` is durable; `obsolete` older snapshot files may go.
    Finished {
        index: Index,
        obsolete: Vec<String>,
    },
    /// The attempt failed (disk full, say); the next trigger tries again.
    Abandoned {
        tmp: String,
    },
}

#[derive(Debug, Default)]
pub(crate) struct Snapshotter {
    /// Index of the newest durable snapshot, and the source files it refers to.
    pub last: Index,
    last_sources: Vec<SourceId>,
    /// File names of durable snapshots still on disk.
    files: Vec<String>,
    job: Option<Job>,
    /// Size of the last snapshot written, and log bytes written since it started: a snapshot
    /// waits until the log has grown by as much as the last one, so that for a large state the
    /// bytes written for snapshots stay in proportion to the log's (not one whole state per
    /// `snapshot_every_entries`, whatever its size).
    pub last_bytes: u64,
    pub log_bytes: u64,
}

/// The state as a snapshot holds it (see `snapshot_format.rs`).
pub(crate) fn encode_state(state: &StateMachine) -> Vec<u8> {
    let mut out = Vec::new();
    crate::snapshot_format::encode(state, &mut out);
    out
}

/// A whole snapshot file: the state is encoded straight after room for the header, which is
/// filled in afterwards, so a large state is held once in memory rather than twice.
fn snapshot_file(state: &StateMachine, term: Term) -> Vec<u8> {
    let mut file = vec![0; SNAPSHOT_HEADER_LEN];
    crate::snapshot_format::encode(state, &mut file);
    seal_snapshot(state.applied(), term, &mut file);
    file
}

/// Decodes a state sent by a leader or read from disk, and checks it before it is trusted.
pub(crate) fn decode_state(payload: &[u8], index: Index) -> Result<StateMachine, String> {
    let mut state = crate::snapshot_format::decode(payload)?;
    if state.applied != index {
        return Err(format!("state is at index {} but the header says {index}", state.applied));
    }
    state.rebuild_indexes();
    state.loaded_invariants();
    Ok(state)
}

fn tmp_name(index: Index) -> String {
    format!("{}.tmp", snapshot_name(index))
}

impl Snapshotter {
    pub fn recovered(last: Index, files: Vec<String>, sources: Vec<SourceId>) -> Snapshotter {
        Snapshotter { last, last_sources: sources, files, job: None, last_bytes: 0, log_bytes: 0 }
    }

    /// The newest durable snapshot: its index, its file and the source files it refers to
    /// (`None` before the first).
    pub fn newest(&self) -> Option<(Index, &str, &[SourceId])> {
        let name = self.files.last()?;
        Some((self.last, name.as_str(), &self.last_sources))
    }

    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    /// A snapshot is due once `every` entries were applied and the log grew by the last
    /// snapshot's size since it, or at once when the log (held in memory) reaches its cap: the
    /// cap bounds memory whatever the entry count (a take carrying records makes few, large
    /// entries).
    pub fn due(&self, applied: Index, every: u64, log_bytes_max: u64) -> bool {
        let grown = self.log_bytes >= self.last_bytes.min(log_bytes_max);
        let full = self.log_bytes >= log_bytes_max;
        !self.busy() && applied > self.last && (applied.0 >= self.last.0 + every && grown || full)
    }

    /// Starts writing a snapshot of `state`; `term` is the term of its last applied entry.
    pub fn start(&mut self, state: &StateMachine, term: Term) -> IoOp {
        assert!(!self.busy(), "one snapshot at a time");
        let index = state.applied();
        let data = snapshot_file(state, term);
        (self.last_bytes, self.log_bytes) = (data.len() as u64, 0);
        let sources = state.sources.referenced().collect();
        self.job = Some(Job { index, stage: Replace::Write, own: true, sources });
        IoOp::Write { file: tmp_name(index), offset: 0, data }
    }

    /// Starts writing a snapshot whose state is already encoded (one a leader sent).
    pub fn start_encoded(&mut self, index: Index, term: Term, payload: &[u8], sources: Vec<SourceId>) -> IoOp {
        assert!(!self.busy(), "one snapshot at a time");
        let data = encode_snapshot(index, term, payload);
        self.job = Some(Job { index, stage: Replace::Write, own: false, sources });
        IoOp::Write { file: tmp_name(index), offset: 0, data }
    }

    pub fn on_io(&mut self, result: Result<IoReply, DiskError>) -> SnapStep {
        let job = self.job.as_mut().expect("a snapshot is in progress");
        let (index, tmp, name) = (job.index, tmp_name(job.index), snapshot_name(job.index));
        if result.is_err() {
            self.job = None;
            return SnapStep::Abandoned { tmp };
        }
        let Some((next, op)) = job.stage.next(&tmp, &name) else {
            let job = self.job.take().expect("checked");
            self.last = index;
            self.last_sources = job.sources;
            let obsolete = std::mem::replace(&mut self.files, vec![name]);
            return SnapStep::Finished { index, obsolete };
        };
        job.stage = next;
        if next == Replace::Rename && job.own {
            return SnapStep::Rename { index, op };
        }
        SnapStep::Io(op)
    }
}
