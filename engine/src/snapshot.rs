//! Snapshots: the applied state written to a file at an index, in the background, while the
//! log keeps taking appends. Once the snapshot is durable (temp file fsynced, renamed, directory
//! fsynced), older snapshots and the segments it covers are removed.
//!
//! The state is encoded in one step when the snapshot starts (straight into the file's buffer);
//! only the disk work overlaps with appends. For very large states this encoding is a pause
//! proportional to the state's size.

use crate::codec::{decode_snapshot, encode_snapshot, seal_snapshot, snapshot_name, SNAPSHOT_HEADER_LEN};
use crate::io::{DiskError, IoOp, IoReply, Replace};
use crate::sessions::StateMachine;
use crate::types::{Index, ReplicaId, SourceId, Term};
use std::collections::BTreeSet;

#[derive(Debug)]
struct Job {
    index: Index,
    stage: Replace,
    /// The source files the snapshot refers to.
    sources: Vec<SourceId>,
    /// The source files a follower installing this snapshot fetches, with their lengths.
    manifest: Vec<(SourceId, u64)>,
    /// A snapshot of this replica's own state (not one a leader sent): it replaces the log, and
    /// with it the only way to rebuild the ledger before it, so it is renamed into place only
    /// once the ledger is durable through its index.
    own: bool,
}

/// The leader reading its newest snapshot file to send it to followers that need an install.
#[derive(Debug)]
struct Serving {
    file: String,
    peers: BTreeSet<ReplicaId>,
}

/// A snapshot file read back for followers: its index and term, its encoded state (the file
/// without its header), the files to fetch with it, and who asked.
pub(crate) struct Served {
    pub index: Index,
    pub term: Term,
    pub payload: Vec<u8>,
    pub manifest: Vec<(SourceId, u64)>,
    pub peers: BTreeSet<ReplicaId>,
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
    last_manifest: Vec<(SourceId, u64)>,
    /// A read of the newest snapshot file for followers, if one is under way.
    serving: Option<Serving>,
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
#[cfg(test)]
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
    state.check_decoded()?;
    state.rebuild_indexes();
    state.invariants();
    Ok(state)
}

fn tmp_name(index: Index) -> String {
    format!("{}.tmp", snapshot_name(index))
}

impl Snapshotter {
    /// `state`: the snapshot's state as recovered (nothing after it applied yet).
    pub fn recovered(last: Index, files: Vec<String>, state: &StateMachine) -> Snapshotter {
        Snapshotter {
            last,
            last_sources: state.sources.referenced().collect(),
            last_manifest: crate::source_files::sizes(state),
            files,
            ..Snapshotter::default()
        }
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
        let manifest = crate::source_files::sizes(state);
        self.job = Some(Job { index, stage: Replace::Write, own: true, sources, manifest });
        IoOp::Write { file: tmp_name(index), offset: 0, data }
    }

    /// Starts writing a snapshot whose state is already encoded (one a leader sent, with the
    /// files that came with it).
    pub fn start_encoded(
        &mut self,
        index: Index,
        term: Term,
        payload: &[u8],
        sources: Vec<SourceId>,
        manifest: Vec<(SourceId, u64)>,
    ) -> IoOp {
        assert!(!self.busy(), "one snapshot at a time");
        let data = encode_snapshot(index, term, payload);
        self.job = Some(Job { index, stage: Replace::Write, own: false, sources, manifest });
        IoOp::Write { file: tmp_name(index), offset: 0, data }
    }

    /// The newest snapshot's index and the files a follower installing it must fetch.
    pub fn newest_manifest(&self) -> Option<(Index, &[(SourceId, u64)])> {
        self.files.last()?;
        Some((self.last, &self.last_manifest))
    }

    /// `peer` needs an install: the newest snapshot file is read back for it through the disk
    /// (a state is never encoded again for a follower, on the thread that runs the engine and
    /// sends heartbeats). Returns the read to issue, unless one is already under way, which
    /// `peer` joins.
    pub fn serve(&mut self, peer: ReplicaId) -> Option<IoOp> {
        let file = self.files.last()?.clone();
        if let Some(serving) = self.serving.as_mut() {
            serving.peers.insert(peer);
            return None;
        }
        self.serving = Some(Serving { file: file.clone(), peers: BTreeSet::from([peer]) });
        Some(IoOp::Read { file })
    }

    /// The read for followers finished: the snapshot to send them, or, if the file could not
    /// be read whole (a newer snapshot replaced it meanwhile, or the disk failed), the peers
    /// that asked, to try again later.
    pub fn served(&mut self, result: Result<IoReply, DiskError>) -> Result<Served, BTreeSet<ReplicaId>> {
        let serving = self.serving.take().expect("a snapshot read for followers is under way");
        let bytes = match result {
            Ok(IoReply::Data(bytes)) if Some(&serving.file) == self.files.last() => bytes,
            _ => return Err(serving.peers),
        };
        let (index, term) = match decode_snapshot(&bytes) {
            Ok((index, term, _)) if index == self.last => (index, term),
            _ => return Err(serving.peers),
        };
        // The file's own buffer becomes the payload: a large state is not held twice.
        let mut payload = bytes;
        payload.drain(..SNAPSHOT_HEADER_LEN);
        Ok(Served { index, term, payload, manifest: self.last_manifest.clone(), peers: serving.peers })
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
            self.last_manifest = job.manifest;
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
