//! Snapshots: the applied state written to a file at an index, in the background, while the
//! log keeps taking appends. Once the snapshot is durable (temp file fsynced, renamed, directory
//! fsynced), older snapshots and the segments it covers are removed.
//!
//! The state is encoded in one step when the snapshot starts; only the disk work overlaps with
//! appends. For very large states this encoding is a pause proportional to the state's size.

use crate::codec::{encode_snapshot, snapshot_name};
use crate::io::{DiskError, IoOp, IoReply};
use crate::sessions::StateMachine;
use crate::types::{Index, Term};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Write,
    Sync,
    Rename,
    SyncDir,
}

#[derive(Debug)]
struct Job {
    index: Index,
    stage: Stage,
}

pub(crate) enum SnapStep {
    Io(IoOp),
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
    /// Index of the newest durable snapshot.
    pub last: Index,
    /// File names of durable snapshots still on disk.
    files: Vec<String>,
    job: Option<Job>,
}

fn tmp_name(index: Index) -> String {
    format!("{}.tmp", snapshot_name(index))
}

impl Snapshotter {
    pub fn recovered(last: Index, files: Vec<String>) -> Snapshotter {
        Snapshotter { last, files, job: None }
    }

    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    pub fn due(&self, applied: Index, every: u64) -> bool {
        !self.busy() && applied.0 >= self.last.0 + every
    }

    pub fn start(&mut self, state: &StateMachine, term: Term) -> IoOp {
        assert!(!self.busy(), "one snapshot at a time");
        let index = state.applied();
        let payload = postcard::to_allocvec(state).expect("postcard encoding into memory cannot fail");
        let data = encode_snapshot(index, term, &payload);
        self.job = Some(Job { index, stage: Stage::Write });
        IoOp::Write { file: tmp_name(index), offset: 0, data }
    }

    pub fn on_io(&mut self, result: Result<IoReply, DiskError>) -> SnapStep {
        let job = self.job.as_mut().expect("a snapshot is in progress");
        let (index, tmp, name) = (job.index, tmp_name(job.index), snapshot_name(job.index));
        if result.is_err() {
            self.job = None;
            return SnapStep::Abandoned { tmp };
        }
        let (next, op) = match job.stage {
            Stage::Write => (Stage::Sync, IoOp::Sync { file: tmp }),
            Stage::Sync => (Stage::Rename, IoOp::Rename { from: tmp, to: name }),
            Stage::Rename => (Stage::SyncDir, IoOp::SyncDir),
            Stage::SyncDir => {
                self.job = None;
                self.last = index;
                let obsolete = std::mem::replace(&mut self.files, vec![name]);
                return SnapStep::Finished { index, obsolete };
            }
        };
        job.stage = next;
        SnapStep::Io(op)
    }
}
