//! The engine's boundary: what drivers feed in ([`Input`]) and what they carry out ([`Output`]).
//!
//! The engine performs no IO. It asks for disk operations by emitting [`Output::Io`] with an
//! [`IoId`]; the driver performs them in order per file and reports each completion with
//! [`Input::IoDone`]. File names are flat names inside the replica's data directory.

use crate::error::{DamageFound, Fatal, RequestError};
use crate::events::{StreamId, StreamItem, StreamOpen};
use crate::message::Message;
use crate::op::{Outcome, Query, QueryReply, Request, UnixSecs};
use crate::types::{ClientId, Handle, Index, Kind, ReplicaId, Seq, UnixMs};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IoId(pub u64);

/// A disk operation. Writes extend the file as needed (creating it if missing) but are not
/// durable until a `Sync` of that file completes; a created, renamed or removed name is not
/// durable until a `SyncDir` completes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// List the data directory's file names.
    List,
    /// Read a whole file.
    Read {
        file: String,
    },
    /// Read up to `len` bytes of a file from `offset`: fewer (possibly none) where the file ends
    /// first. Reading a missing file is `NotFound`.
    ReadAt {
        file: String,
        offset: u64,
        len: u64,
    },
    Write {
        file: String,
        offset: u64,
        data: Vec<u8>,
    },
    Sync {
        file: String,
    },
    SyncDir,
    Truncate {
        file: String,
        len: u64,
    },
    Rename {
        from: String,
        to: String,
    },
    Remove {
        file: String,
    },
}

impl IoOp {
    pub fn file(&self) -> &str {
        match self {
            IoOp::List | IoOp::SyncDir => ".",
            IoOp::Read { file }
            | IoOp::ReadAt { file, .. }
            | IoOp::Write { file, .. }
            | IoOp::Sync { file }
            | IoOp::Truncate { file, .. }
            | IoOp::Remove { file } => file,
            IoOp::Rename { from, .. } => from,
        }
    }
}

/// Where the replacement of a file stands: written under a temporary name, then fsynced, renamed
/// to its final name and the directory fsynced, so the final name only ever holds a whole,
/// durable file. Snapshots, the hard state and source files are all written this way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Replace {
    Write,
    Sync,
    Rename,
    SyncDir,
}

impl Replace {
    /// The step after this one (which completed) and its operation; `None` once the file is
    /// durable under `name`.
    pub fn next(self, tmp: &str, name: &str) -> Option<(Replace, IoOp)> {
        match self {
            Replace::Write => Some((Replace::Sync, IoOp::Sync { file: tmp.into() })),
            Replace::Sync => Some((Replace::Rename, IoOp::Rename { from: tmp.into(), to: name.into() })),
            Replace::Rename => Some((Replace::SyncDir, IoOp::SyncDir)),
            Replace::SyncDir => None,
        }
    }
}

/// What a successful disk operation returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoReply {
    Done,
    Listed(Vec<String>),
    Data(Vec<u8>),
}

/// A failed disk operation, as the driver reports it (no `std::io::Error` inside the engine).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    #[error("no space left on device")]
    NoSpace,
    #[error("file not found")]
    NotFound,
    #[error("input/output error: {0}")]
    Io(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Start: recover from whatever the data directory holds. Must be the first input.
    Boot,
    /// A client request; `(client, seq)` names it, and a retry reuses both.
    Request { client: ClientId, seq: Seq, request: Request },
    /// A client request from a client that proved who it is: the driver checked its
    /// permissions, and `principal` is recorded with the entry for the ledger's audit.
    RequestAs { client: ClientId, seq: Seq, request: Request, principal: String },
    /// A read-only query, answered at once from applied state.
    Query { id: u64, query: Query },
    /// A disk operation finished.
    IoDone { id: IoId, result: Result<IoReply, DiskError> },
    /// A delivery could not be completed: the handler is unreachable, failed, or refused it.
    DeliveryFailed { handle: Handle, reason: crate::op::FailureReason },
    /// A deadline given by [`crate::Engine::next_deadline`] has passed.
    Tick,
    /// A message from another replica. The network may lose, repeat, delay or reorder them.
    Message { from: ReplicaId, message: Message },
    /// A reader opens a stream (a tail or a watch) of this replica's ledger.
    StreamOpen { stream: StreamId, open: StreamOpen },
    /// The reader processed every item of the stream through `seq`; `error` is a watcher's
    /// report that its processing failed (the stream goes on).
    StreamAck { stream: StreamId, seq: u64, error: Option<String> },
    /// The reader went away (its connection closed, say).
    StreamClose { stream: StreamId },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Io {
        id: IoId,
        op: IoOp,
    },
    /// The answer to a request. Never emitted before the fsync covering the request completed.
    Reply {
        client: ClientId,
        seq: Seq,
        outcome: Outcome,
    },
    /// The answer to a query.
    QueryReply {
        id: u64,
        reply: QueryReply,
    },
    /// Push this session to its kind's handler. `due` is the repeat time it was taken for and
    /// `taken_at` the proposer's wall clock when it decided the take (never before `due`);
    /// `take_index` is the take's log entry, so deliveries can be put in the order they were taken.
    Deliver {
        kind: Kind,
        handle: Handle,
        due: UnixSecs,
        taken_at: UnixMs,
        take_index: Index,
        records: Vec<Vec<u8>>,
    },
    /// Recovery finished; the engine serves from `applied` on.
    Recovered {
        applied: Index,
        state_hash: u64,
        torn_bytes: u64,
        /// Damage found and left for the peers to repair (empty on a clean start).
        damage: Vec<DamageFound>,
    },
    /// The engine stopped and will emit nothing further.
    Stopped(Fatal),
    /// Send a message to another replica (best effort: the protocol tolerates its loss).
    Send {
        to: ReplicaId,
        message: Message,
    },
    /// Item `seq` (from 1) of a reader's stream. After an `End` the stream sends nothing more.
    Stream {
        stream: StreamId,
        seq: u64,
        item: StreamItem,
    },
    /// The replicated configuration (at `version`) differs from this node's own file in these
    /// settings; the node follows the replicated one. Said once per version, for the log.
    ConfigDiffers {
        version: u64,
        differences: Vec<String>,
    },
    /// A peer's message failed its checks (see `Message::check`) and was dropped unread: for
    /// the log, with the peer named.
    PeerMessageRefused {
        from: ReplicaId,
        message: &'static str,
        reason: String,
    },
    /// This replica's role or term changed (for logs, status and the simulator's checkers).
    Role {
        role: RoleName,
        term: crate::types::Term,
        leader: Option<ReplicaId>,
    },
}

/// A replica's role in consensus, as reported outside the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RoleName {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

impl std::fmt::Display for RoleName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            RoleName::Follower => "follower",
            RoleName::PreCandidate => "pre-candidate",
            RoleName::Candidate => "candidate",
            RoleName::Leader => "leader",
        };
        f.write_str(name)
    }
}

impl Output {
    /// The refusal of a request, for the paths that refuse before the log is involved.
    pub(crate) fn refuse(client: ClientId, seq: Seq, error: RequestError) -> Output {
        Output::Reply { client, seq, outcome: Err(error) }
    }
}
