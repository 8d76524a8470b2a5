//! Typed errors. A [`RequestError`] answers one client request and means the request changed
//! nothing; a [`Fatal`] stops the engine because continuing could lose or invent data.

use crate::types::{Attempt, Handle, Index, Kind, ReplicaId, SessionId};
use serde::{Deserialize, Serialize};

/// Why a request was refused. Every variant leaves the replicated state exactly as it was
/// (apart from remembering the answer for retries of the same request).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RequestError {
    #[error("unknown kind {0}")]
    UnknownKind(Kind),
    #[error("record of {size} bytes exceeds the kind's limit of {max}")]
    RecordTooLarge { size: u64, max: u32 },
    #[error("session would hold {bytes} bytes, over the kind's limit of {max}")]
    SessionTooLarge { bytes: u64, max: u32 },
    #[error("session would hold more than the kind's limit of {max} records")]
    TooManyRecords { max: u32 },
    #[error("store timeout of {timeout_s} s exceeds the kind's limit of {max_s} s")]
    TimeoutTooLong { timeout_s: u32, max_s: u32 },
    #[error("the cluster holds its limit of {max} sessions")]
    TooManySessions { max: u64 },
    #[error("session {0} does not exist")]
    SessionUnknown(SessionId),
    #[error("session {0} was deleted")]
    SessionDeleted(SessionId),
    #[error("session {0} is stored and waits for redelivery; no one holds it")]
    SessionStored(SessionId),
    #[error("session {0} is in its kind's dead-letter set; an operator may redrive it")]
    SessionDead(SessionId),
    #[error("session {0} is not in a dead-letter set")]
    NotDead(SessionId),
    #[error("handle {handle} is stale: the session is at attempt {}", current.0)]
    StaleAttempt { handle: Handle, current: Attempt },
    #[error("request sequence {seq} is older than the last one seen from this client ({last})")]
    StaleSequence { seq: u64, last: u64 },
    #[error("too many requests are waiting ({max}); retry later")]
    Overloaded { max: u32 },
    #[error("the disk is full; the request was not applied")]
    DiskFull,
    #[error("the replica is recovering; retry shortly")]
    NotReady,
    #[error("the replica has stopped: {0}")]
    Stopped(String),
    /// This replica does not lead the cluster; the request was not applied. `leader` is the
    /// replica this one last heard from as leader, if any: clients retry there.
    #[error("this replica is not the leader{}", leader.map(|l| format!("; try {l}")).unwrap_or_default())]
    NotLeader { leader: Option<ReplicaId> },
    /// The replica stopped leading before the request committed. Unlike every other variant,
    /// the outcome is unknown (the entry may still commit under the next leader): the client
    /// must retry with the same client id and sequence, which the dedup table answers.
    #[error("the leader stepped down before answering; the outcome is unknown, retry with the same sequence")]
    LeaderLost { leader: Option<ReplicaId> },
    #[error("no consumer is named {0:?}")]
    UnknownConsumer(String),
    #[error("epoch {epoch} is stale: the consumer was opened again at epoch {current}")]
    StaleEpoch { epoch: u64, current: u64 },
    #[error("a checkpoint cannot go back: {through} is below the consumer's checkpoint {current}")]
    CheckpointBehind { through: Index, current: Index },
    #[error("a commit through {through} comes before that index was committed (the commit is at {index})")]
    ThroughBeyondLog { through: Index, index: Index },
    #[error("the cluster holds its limit of {max} consumers")]
    TooManyConsumers { max: u32 },
    #[error("invalid consumer name: {0}")]
    InvalidName(String),
    #[error("a commit carries at most {max} operations")]
    TooManyOps { max: u32 },
    #[error("session {0} appears more than once in one commit")]
    SessionTwiceInCommit(SessionId),
    #[error("operation {op} of the commit was refused: {error}")]
    CommitOpFailed { op: u32, error: Box<RequestError> },
    #[error("the checkpoint did not cover the index within {ms} ms")]
    TimedOut { ms: u64 },
    /// An entry that breaks the rules a leader follows when it proposes (a bug, or bytes no
    /// leader wrote): refused whole.
    #[error("malformed entry: {0}")]
    Malformed(String),
    #[error("the configuration is at version {current}, not {expected}: show it again and base the change on it")]
    ConfigVersion { expected: u64, current: u64 },
    #[error(
        "kind {kind} still has {sessions} sessions (active, stored or dead); it cannot be removed until they are gone"
    )]
    KindInUse { kind: Kind, sessions: u64 },
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("the cluster has no configuration yet (its first leader has not committed one); retry shortly")]
    NotConfigured,
    #[error("invalid membership change: {0}")]
    InvalidMemberChange(String),
    /// The leader cannot propose a membership change yet (the previous one is not committed, or
    /// it has not committed an entry of its own term): nothing was proposed; retry shortly.
    #[error("membership change not proposed yet: {0}; retry shortly")]
    MemberChangeBusy(String),
    #[error(
        "learner {member} is behind or silent (it holds the log through {matched}, the cluster has committed \
         {commit}); promote it once it has caught up"
    )]
    LearnerBehind { member: ReplicaId, matched: Index, commit: Index },
    #[error("{0} leads the cluster; transfer leadership to another voter before removing it")]
    RemoveLeader(ReplicaId),
    #[error("leadership was not transferred to {to}: {reason}")]
    TransferFailed { to: ReplicaId, reason: String },
    /// The client's credentials do not grant `verb` on `kind` (`None`: on every kind, or on
    /// the cluster itself).
    #[error("permission denied: {principal} may not {verb}{}", kind.map_or(String::new(), |k| format!(" sessions of kind {}", k.0)))]
    PermissionDenied { principal: String, verb: String, kind: Option<Kind> },
}

impl RequestError {
    /// Whether the request certainly did not and never will take effect, so that a client may
    /// report failure instead of retrying. Overload and readiness errors are retried by clients.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RequestError::Overloaded { .. }
                | RequestError::NotReady
                | RequestError::NotLeader { .. }
                | RequestError::LeaderLost { .. }
                | RequestError::MemberChangeBusy(_)
        )
    }
}

/// A condition under which the engine refuses to go on. The driver must stop the replica and
/// report it; restarting will meet the same condition until an operator (or, with replication,
/// a peer) repairs the data.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fatal {
    #[error(
        "log corruption in {file} at byte {offset} (valid records follow it); refusing to truncate acknowledged data"
    )]
    LogCorruption { file: String, offset: u64 },
    #[error("log gap: {file} starts at index {found}, expected {expected}")]
    LogGap { file: String, expected: Index, found: Index },
    #[error("snapshot {file} is corrupt: {reason}")]
    SnapshotCorrupt { file: String, reason: String },
    #[error(
        "both copies of the hard state (in the file hardstate) are damaged: {reason}; a lone replica has no \
         peer to repair from (a cluster member would stop voting and go on)"
    )]
    HardStateLost { reason: String },
    #[error("stored-session source {file} is missing or corrupt: {reason}")]
    SourceCorrupt { file: String, reason: String },
    #[error("disk read of {file} failed {attempts} times")]
    ReadFailed { file: String, attempts: u32 },
    #[error("disk operation on {file} failed: {reason}")]
    DiskFailed { file: String, reason: String },
    #[error(
        "{file} is in log format {found} of an older truba; this version reads format {supported} only \
         (start from an empty data directory)"
    )]
    UnsupportedFormat { file: String, found: u32, supported: u32 },
}

/// Damage recovery found in a cluster member and left for its peers to repair, reported once
/// the replica serves (in `Output::Recovered`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DamageFound {
    /// A log record: the log was cut there and the range is fetched again from the leader.
    Log { file: String, offset: u64 },
    /// The newest snapshot: state and log were dropped and are installed again from the leader.
    Snapshot { file: String, reason: String },
    /// One copy of the hard state (by its slot in the file), restored from the other.
    HardStateCopy { slot: usize },
    /// Both copies of the hard state: the replica never votes or stands again.
    HardStateLost { reason: String },
}

impl std::fmt::Display for DamageFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DamageFound::Log { file, offset } => write!(
                f,
                "{file} is damaged at byte {offset}: the log was cut there (the rest is kept in damaged-*.bin) \
                 and the range is fetched again from the leader; this replica neither votes nor stands until it has it"
            ),
            DamageFound::Snapshot { file, reason } => write!(
                f,
                "snapshot {file} is damaged ({reason}): it was kept as damaged-{file}, the log after it dropped, and \
                 the leader installs a snapshot again; this replica neither votes nor stands until it holds as much"
            ),
            DamageFound::HardStateCopy { slot } => {
                write!(f, "copy {slot} of the hard state was damaged and was restored from the other copy")
            }
            DamageFound::HardStateLost { reason } => write!(
                f,
                "both copies of the hard state are lost ({reason}): this replica cannot know whom it voted for, so it \
                 never votes or stands again; it still replicates and serves. Add a new member in its place and \
                 remove this one"
            ),
        }
    }
}
