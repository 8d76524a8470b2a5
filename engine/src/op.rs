//! What clients ask for, what they are answered, and what the log records.

use crate::config::{AppliedLimits, ClusterConfig, KindConfig, MemberAddrs};
use crate::error::RequestError;
use crate::membership::{MemberChange, Members};
use crate::types::{ClientId, Handle, Index, Kind, ReplicaId, Seq, SessionId, SourceId, Term, UnixMs};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Repeat time of a stored session, in whole seconds of the proposing replica's wall clock.
/// Sessions due in the same second go out in the order they were stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UnixSecs(pub u64);

impl UnixSecs {
    pub fn as_ms(self) -> UnixMs {
        UnixMs(self.0.saturating_mul(1000))
    }
}

impl UnixMs {
    pub fn as_secs(self) -> UnixSecs {
        UnixSecs(self.0 / 1000)
    }
}

/// A mutating request of the session API. Reads go through [`Query`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Open a session of `kind`, optionally with its first record.
    New {
        kind: Kind,
        #[serde(with = "serde_bytes")]
        record: Option<Vec<u8>>,
    },
    /// Add one record at the end.
    Append {
        handle: Handle,
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// Drop all records and keep this one.
    Replace {
        handle: Handle,
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// Finished: never redelivered.
    Delete { handle: Handle },
    /// Unfinished: redeliver after the timeout (plus the kind's jitter).
    Store { handle: Handle, timeout_s: u32 },
    /// Renew the lease without changing anything else.
    KeepAlive { handle: Handle },
    /// Operator: move dead sessions back to the stored set, due at once (the kind's handler
    /// slots pace them), with their failure count cleared.
    Redrive { target: RedriveTarget },
    /// Operator: delete a dead session without delivering it (it is never delivered again).
    DropDead { session: SessionId },
    /// Open the named consumer (creating it with an empty checkpoint if new): the answer's epoch
    /// fences every older one.
    ConsumerOpen { consumer: String },
    /// Record a consumer's progress with the session operations its processing produced, as
    /// one entry: all of it applies, or none (a stale epoch, say).
    ConsumerCommit(ConsumerCommit),
    /// Operator: remove a consumer and its checkpoint.
    ConsumerDrop { consumer: String },
    /// Operator: replace the cluster's kinds and applied limits, if its configuration is still
    /// at `expect_version` (so that two operators cannot overwrite each other's change unseen).
    /// Refused whole if it is invalid or would strand sessions of a removed kind.
    Configure { expect_version: u64, kinds: BTreeMap<Kind, KindConfig>, limits: AppliedLimits },
    /// Operator: change the membership by one member (see `membership.rs`). The leader refuses
    /// it while another change is in flight, before it has committed an entry of its own term,
    /// and (for a promotion) while the learner lacks committed entries.
    /// `addrs`: where a new learner is reached (required when adding one; ignored otherwise).
    ChangeMembers { change: MemberChange, addrs: Option<MemberAddrs> },
    /// Operator: hand leadership to voter `to` once it holds the whole log. Not a log entry: the
    /// leader answers once it has told `to` to stand (or why it could not).
    TransferLeader { to: ReplicaId },
}

/// A consumer's commit (see [`Request::ConsumerCommit`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerCommit {
    pub consumer: String,
    /// The epoch its open returned; a commit of an older one is refused.
    pub epoch: u64,
    /// Every event through this index is processed (never lower than the checkpoint).
    pub through: Index,
    /// Applied in order, each session at most once.
    pub ops: Vec<CommitOp>,
}

/// A session operation a consumer commits with its checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommitOp {
    /// Open a session of `kind` with these records; with `store_s`, store it at once for
    /// delivery to the kind's handler after that many seconds (plus the kind's jitter).
    New {
        kind: Kind,
        #[serde(with = "records_serde")]
        records: Vec<Vec<u8>>,
        store_s: Option<u32>,
    },
    Append {
        handle: Handle,
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    Replace {
        handle: Handle,
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    Delete {
        handle: Handle,
    },
    Store {
        handle: Handle,
        timeout_s: u32,
    },
    KeepAlive {
        handle: Handle,
    },
}

impl CommitOp {
    /// The same operation as a request on an existing session (`None` for a creation).
    pub fn as_request(&self) -> Option<Request> {
        Some(match self {
            CommitOp::New { .. } => return None,
            CommitOp::Append { handle, record } => Request::Append { handle: *handle, record: record.clone() },
            CommitOp::Replace { handle, record } => Request::Replace { handle: *handle, record: record.clone() },
            CommitOp::Delete { handle } => Request::Delete { handle: *handle },
            CommitOp::Store { handle, timeout_s } => Request::Store { handle: *handle, timeout_s: *timeout_s },
            CommitOp::KeepAlive { handle } => Request::KeepAlive { handle: *handle },
        })
    }

    /// The store timeout the leader draws a repeat time for, if the operation stores.
    pub fn store_s(&self) -> Option<u32> {
        match self {
            CommitOp::New { store_s, .. } => *store_s,
            CommitOp::Store { timeout_s, .. } => Some(*timeout_s),
            _ => None,
        }
    }
}

/// What a redrive moves back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RedriveTarget {
    /// This one dead session.
    Session(SessionId),
    /// The oldest dead sessions of this kind, at most `limits.redrive_batch_max` per request.
    Kind(Kind),
}

/// Why a delivery failed, as kept with the session for operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureReason {
    /// The handler answered with an error.
    Handler(String),
    /// The handler could not be reached (or the connection broke before it answered).
    Unreachable(String),
    /// The handler's lease ran out before it finished, stored or deleted the session.
    LeaseExpired,
}

impl FailureReason {
    /// Cuts a long message at a character boundary, so that a handler cannot make the replicated
    /// state grow without bound.
    pub fn truncated(self, bytes_max: usize) -> FailureReason {
        let cut = |mut s: String| {
            if s.len() > bytes_max {
                let mut end = bytes_max;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s.truncate(end);
            }
            s
        };
        match self {
            FailureReason::Handler(m) => FailureReason::Handler(cut(m)),
            FailureReason::Unreachable(m) => FailureReason::Unreachable(cut(m)),
            FailureReason::LeaseExpired => FailureReason::LeaseExpired,
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureReason::Handler(m) => write!(f, "the handler failed: {m}"),
            FailureReason::Unreachable(m) => write!(f, "the handler could not be reached: {m}"),
            FailureReason::LeaseExpired => write!(f, "the handler's lease ran out"),
        }
    }
}

impl Request {
    pub fn handle(&self) -> Option<Handle> {
        match self {
            Request::New { .. } => None,
            Request::Append { handle, .. }
            | Request::Replace { handle, .. }
            | Request::Delete { handle }
            | Request::Store { handle, .. }
            | Request::KeepAlive { handle } => Some(*handle),
            Request::Redrive { .. }
            | Request::DropDead { .. }
            | Request::ConsumerOpen { .. }
            | Request::ConsumerCommit(_)
            | Request::ConsumerDrop { .. }
            | Request::Configure { .. }
            | Request::ChangeMembers { .. }
            | Request::TransferLeader { .. } => None,
        }
    }

    /// The session the request is about, if it names one.
    pub fn session(&self) -> Option<SessionId> {
        match self {
            Request::Redrive { target: RedriveTarget::Session(id) } | Request::DropDead { session: id } => Some(*id),
            other => other.handle().map(|h| h.session),
        }
    }

    /// A short name for logs and the ledger.
    pub fn name(&self) -> &'static str {
        match self {
            Request::New { .. } => "new",
            Request::Append { .. } => "append",
            Request::Replace { .. } => "replace",
            Request::Delete { .. } => "delete",
            Request::Store { .. } => "store",
            Request::KeepAlive { .. } => "keep-alive",
            Request::Redrive { .. } => "redrive",
            Request::DropDead { .. } => "drop",
            Request::ConsumerOpen { .. } => "consumer-open",
            Request::ConsumerCommit(_) => "consumer-commit",
            Request::ConsumerDrop { .. } => "consumer-drop",
            Request::Configure { .. } => "configure",
            Request::ChangeMembers { .. } => "change-members",
            Request::TransferLeader { .. } => "transfer-leader",
        }
    }

    pub fn record_len(&self) -> usize {
        match self {
            Request::New { record, .. } => record.as_ref().map_or(0, Vec::len),
            Request::Append { record, .. } | Request::Replace { record, .. } => record.len(),
            _ => 0,
        }
    }
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Created {
        handle: Handle,
    },
    Done,
    Stored {
        due: UnixSecs,
    },
    /// A redrive moved `count` dead sessions back; `remaining` are still dead in that kind.
    Redriven {
        count: u32,
        remaining: u64,
    },
    /// A consumer is open at `epoch`; its checkpoint is `through`.
    ConsumerOpened {
        epoch: u64,
        through: Index,
    },
    /// A commit applied: the checkpoint, and each operation's answer in order.
    Committed {
        through: Index,
        results: Vec<Reply>,
    },
    /// The configuration changed to this version.
    Configured {
        version: u64,
    },
    /// The membership change is committed; the configuration is now at `version`.
    MembersChanged {
        version: u64,
    },
    /// The leader told `to` to stand for election at once, with the whole log.
    LeaderTransferring {
        to: ReplicaId,
    },
}

pub type Outcome = Result<Reply, RequestError>;

/// The replicated operations. Everything an apply needs is in the entry: the proposer's clock
/// reading and any random draw are written here, so replay never consults a clock or generator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A client request. `due` is filled for stores: clock + timeout + jitter, drawn once.
    /// `principal` is who the client proved to be (for the ledger's audit), once credentials
    /// exist; the entry's `at` is when the request arrived at the leader.
    Client { client: ClientId, seq: Seq, request: Request, due: Option<UnixSecs>, principal: Option<String> },
    /// The repeater takes these stored sessions for delivery (each gets a new attempt). For
    /// those kept in a source file, the entry carries what only the file holds (their records),
    /// read by the proposer: applying an entry never reads a file.
    Take { sessions: Vec<SessionId>, unspilled: Vec<Unspilled> },
    /// The kind's stored sessions held in memory become a new source (named by this entry's
    /// index): every replica writes the same file from them. They stay in memory until the
    /// source is ready and the file durable here.
    Spill { kind: Kind },
    /// Two neighbouring sources of a kind are merged into a new one (named by this entry's
    /// index); until it is ready, sessions are still taken from the two.
    Merge { kind: Kind, older: SourceId, newer: SourceId },
    /// A majority holds the file of this source (from a spill or a merge): it is committed.
    SourceReady { source: SourceId },
    /// These sessions' leases ran out; store each with its kind's default delay (due given).
    Expire { sessions: Vec<(Handle, UnixSecs)> },
    /// The handler for this delivery failed or could not be reached: store it again at `due`
    /// (drawn with the kind's backoff), or dead-letter it after the kind's max attempts.
    DeliveryFailed { handle: Handle, due: UnixSecs, reason: FailureReason },
    /// A new leader's first entry. Committing an entry of its own term is how a leader learns
    /// which earlier entries are committed (Raft commits older terms only indirectly).
    Noop,
    /// An index kept for a session the consumer commit right after it creates: session ids are
    /// the indexes of the entries that created them, and one commit may create several.
    Reserve,
    /// A consumer's commit. The leader drew the repeat time of each storing operation (`dues`,
    /// one per operation) and reserved the indexes from `ids_from` up to this entry's for the
    /// sessions it creates, in order.
    Commit {
        client: ClientId,
        seq: Seq,
        principal: Option<String>,
        commit: ConsumerCommit,
        dues: Vec<Option<UnixSecs>>,
        ids_from: Index,
    },
    /// A new cluster's configuration, proposed by a leader whose state has none yet, right
    /// after its no-op (so it comes before every request of the leader's term). Only the first
    /// one applied takes effect; a later one (from a leader that had not yet applied an earlier
    /// one) changes nothing.
    Bootstrap { config: ClusterConfig },
    /// A membership change, carrying the whole membership after it: replicas use it from the
    /// moment it is in their log (see `membership.rs`), before it is applied.
    Members {
        client: ClientId,
        seq: Seq,
        principal: Option<String>,
        change: MemberChange,
        members: Members,
        addrs: Option<MemberAddrs>,
    },
}

impl Command {
    /// A short name for logs and the ledger.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Client { request, .. } => request.name(),
            Command::Take { .. } => "take",
            Command::Spill { .. } => "spill",
            Command::Merge { .. } => "merge",
            Command::SourceReady { .. } => "source-ready",
            Command::Expire { .. } => "expire",
            Command::DeliveryFailed { .. } => "delivery-failed",
            Command::Noop => "noop",
            Command::Reserve => "reserve",
            Command::Commit { .. } => "consumer-commit",
            Command::Bootstrap { .. } => "bootstrap",
            Command::Members { .. } => "members",
        }
    }
}

/// A spilled session's part that lives only in its source file, carried by a `Take` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unspilled {
    pub id: SessionId,
    #[serde(with = "records_serde")]
    pub records: Vec<Vec<u8>>,
    pub last_failure: Option<FailureReason>,
}

/// One log entry: position, proposer's wall clock, command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub term: Term,
    pub index: Index,
    pub at: UnixMs,
    pub command: Command,
}

/// Read-only questions, answered from the applied state without touching the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// A session, linearizable: answered by the leader once it has confirmed it still leads.
    Session(SessionId),
    /// A session as this replica has applied it, answered at once by any serving member, a
    /// learner included: possibly stale (behind the leader by the replication lag), never
    /// ahead of what is committed.
    SessionLocal(SessionId),
    Status,
    /// A kind's dead-letter set, oldest first, starting after `after` (for paging).
    Dead {
        kind: Kind,
        after: Option<SessionId>,
        limit: u32,
    },
    /// A consumer's checkpoint (a linearizable read, answered by the leader).
    Checkpoint {
        consumer: String,
    },
    /// Answered once the consumer's checkpoint covers `index` on this replica (read-your-writes
    /// across a pipeline), or with `TimedOut` after `timeout_ms`. Any replica answers it.
    ReadThrough {
        consumer: String,
        index: Index,
        timeout_ms: u64,
    },
    /// The cluster's replicated configuration (a linearizable read, answered by the leader).
    Config,
}

/// A consumer's checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub consumer: String,
    pub epoch: u64,
    pub through: Index,
}

/// Where a session stands, as a query sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionState {
    Active {
        lease_until: UnixMs,
        delivering: bool,
    },
    Stored {
        due: UnixSecs,
    },
    /// In the kind's dead-letter set since the entry at `since`; only a redrive brings it back.
    Dead {
        since: Index,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    pub id: SessionId,
    pub kind: Kind,
    pub handle: Handle,
    pub state: SessionState,
    /// Times the session was handed to a handler (its attempt number).
    pub deliveries: u32,
    /// Failed deliveries in a row, and why the last one failed.
    pub failures: u32,
    pub last_failure: Option<FailureReason>,
    /// For a session kept in a source file, `source` names the file and gives how many records
    /// it holds there; a query reads them from it (they are empty, with the last failure, only
    /// when the replica could not read them at once: too many such reads under way).
    #[serde(with = "crate::op::records_serde")]
    pub records: Vec<Vec<u8>>,
    pub bytes: u64,
    pub source: Option<(SourceId, u32)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    /// False while the replica is still recovering (or has stopped): the other figures are
    /// not yet its state.
    pub serving: bool,
    pub replica: ReplicaId,
    pub role: crate::io::RoleName,
    pub term: Term,
    /// The leader this replica knows of (itself when it leads).
    pub leader: Option<ReplicaId>,
    pub applied: Index,
    pub commit: Index,
    pub durable: Index,
    pub last_index: Index,
    pub sessions_active: u64,
    pub sessions_stored: u64,
    pub sessions_dead: u64,
    /// Stored sessions kept in source files (of `sessions_stored`), and the source files.
    pub sessions_spilled: u64,
    pub source_files: u64,
    pub state_hash: u64,
    /// The members of the configuration in force on this replica (its own role among them; a
    /// joining replica knows none yet).
    pub members: Vec<MemberStatus>,
}

/// One member as a replica sees it (see [`StatusView::members`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: ReplicaId,
    pub role: crate::config::MemberRole,
    /// The leader's knowledge of how far the member's log matches its own, durably (the leader's
    /// own durable index for itself); unknown on other replicas.
    pub matched: Option<Index>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryReply {
    Session(Result<SessionView, RequestError>),
    Status(StatusView),
    Dead(Result<DeadPage, RequestError>),
    Checkpoint(Result<Checkpoint, RequestError>),
    Config(Result<ClusterConfig, RequestError>),
}

/// One dead session in a listing (records are left out; `Query::Session` shows them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadView {
    pub id: SessionId,
    pub since: Index,
    pub deliveries: u32,
    pub failures: u32,
    pub last_failure: Option<FailureReason>,
    pub records: u32,
    pub bytes: u64,
}

/// A page of a kind's dead-letter set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadPage {
    pub sessions: Vec<DeadView>,
    /// Dead sessions of the kind in all.
    pub total: u64,
}

/// A list of records encoded as byte strings (postcard writes a plain `Vec<u8>` one element at a
/// time, which is several times slower for the payloads this log carries).
pub(crate) mod records_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(records: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(records.iter().map(|r| serde_bytes::Bytes::new(r)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let bufs = Vec::<serde_bytes::ByteBuf>::deserialize(d)?;
        Ok(bufs.into_iter().map(serde_bytes::ByteBuf::into_vec).collect())
    }
}
