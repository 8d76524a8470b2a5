//! The ledger's vocabulary: what applying one committed entry did, as readers see it.
//!
//! Every committed entry is a [`LedgerEntry`] whose revision is its log index. Applying the entry
//! produces its events (a session created, a record appended, a delivery failed, a checkpoint
//! committed, ...), each carrying the session's state before and after, so that a tailer sees
//! what happened and a watcher can keep a copy of the sessions up to date without asking. The
//! events are computed at apply time on every replica, from the replicated state and the entry
//! alone, so every replica's ledger holds the same bytes for the same index.
//!
//! Events depend on the state an entry meets (an append to a session whose handle went stale is
//! refused; a failed delivery dead-letters the session only at its kind's max attempts), so
//! they cannot be read off the log alone: each replica keeps them in its own ledger files
//! (see `ledger.rs`), written as it applies.

use crate::error::RequestError;
use crate::op::{FailureReason, UnixSecs};
use crate::types::{Attempt, ClientId, Index, Kind, Seq, SessionId, SourceId, Term, UnixMs};
use serde::{Deserialize, Serialize};

/// One committed entry and what applying it did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The entry's log index: the revision of every event in it.
    pub index: Index,
    pub term: Term,
    pub audit: Audit,
    /// In the order they happened. An entry's events are never split across responses.
    pub events: Vec<Event>,
}

/// Who asked and when, as the leader wrote it into the entry when it proposed it, so every
/// replica shows the same.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// The proposing leader's wall clock: for a client request, when it arrived at the leader.
    pub at: UnixMs,
    /// The client and sequence number of a client request (none for the pipe's own entries).
    pub client: Option<ClientId>,
    pub seq: Option<Seq>,
    /// The attempt of the handle the request came with.
    pub attempt: Option<Attempt>,
    /// Who the client proved to be, once credentials exist.
    pub principal: Option<String>,
}

/// A session's state as readers see it (what `get` shows, without the records and the lease).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionBrief {
    pub status: BriefStatus,
    /// Times the session was handed to a handler.
    pub attempt: Attempt,
    /// Failed deliveries in a row.
    pub failures: u32,
    pub records: u32,
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BriefStatus {
    /// Held by a client, or by a handler when `delivering`.
    Active { delivering: bool },
    /// Waiting for redelivery at `due`.
    Stored { due: UnixSecs },
    /// In its kind's dead-letter set since the entry at `since`.
    Dead { since: Index },
}

/// One thing that happened to one session (or to the pipe) when an entry was applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub session: Option<SessionId>,
    pub kind: Option<Kind>,
    pub what: What,
    /// The session's state before and after (none where it did not exist: before a creation,
    /// after a deletion). Equal for events that change no session.
    pub before: Option<SessionBrief>,
    pub after: Option<SessionBrief>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum What {
    /// A session was opened (with its first record, if it came with one).
    Created {
        #[serde(with = "crate::op::records_serde")]
        records: Vec<Vec<u8>>,
    },
    Appended {
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// Every record was dropped and this one kept.
    Replaced {
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// Its holder stored it unfinished: it comes due at `due`.
    Stored {
        due: UnixSecs,
    },
    /// The repeater took it for delivery to its kind's handler (a new attempt).
    Taken {
        due: UnixSecs,
    },
    /// A delivery failed (the handler failed, could not be reached, or let its lease run out):
    /// stored again, due at `due`.
    DeliveryFailed {
        reason: FailureReason,
        due: UnixSecs,
    },
    /// Its holder went quiet past its lease: stored automatically, due at `due`.
    LeaseExpired {
        due: UnixSecs,
    },
    /// A delivery failed the kind's max attempts in a row: it went to the dead-letter set.
    DeadLettered {
        reason: FailureReason,
    },
    /// An operator sent a dead session back to the stored set, due at `due`.
    Redriven {
        due: UnixSecs,
    },
    /// An operator deleted a dead session without delivering it.
    Dropped,
    Deleted,
    /// A named consumer was opened: `epoch` fences every older one.
    ConsumerOpened {
        consumer: String,
        epoch: u64,
    },
    /// A consumer recorded that it processed everything through `through` (the entry's other
    /// events are the operations it committed with it).
    CheckpointCommitted {
        consumer: String,
        epoch: u64,
        through: Index,
    },
    /// A consumer and its checkpoint were removed.
    ConsumerDropped {
        consumer: String,
    },
    // ---- internal: shown only when a reader asks for them ----------------------------------
    /// The lease was renewed (a keep-alive).
    Renewed,
    /// A committed client request that changed nothing but the answer remembered for retries.
    Refused {
        request: String,
        error: RequestError,
    },
    /// A retry of a request already applied: answered from the deduplication table.
    Repeated {
        request: String,
    },
    /// An entry of the pipe's own that found nothing left to do (a take of a session that was
    /// stored again meanwhile, an expiry of a lease renewed since).
    NoEffect {
        entry: String,
    },
    /// A new leader's first entry.
    Noop,
    /// An index reserved for a session a consumer commit creates.
    Reserved,
    /// A kind's stored sessions in memory went to a new source file.
    Spilled {
        source: SourceId,
        sessions: u64,
    },
    /// Two neighbouring source files are being merged into a new one.
    Merging {
        source: SourceId,
        older: SourceId,
        newer: SourceId,
    },
    /// A majority holds the source file.
    SourceReady {
        source: SourceId,
    },
    /// The cluster's configuration is now at this version (its bootstrap, or a change).
    Configured {
        version: u64,
    },
    /// The membership changed by `change`; the configuration is now at this version.
    MembersChanged {
        version: u64,
        change: crate::membership::MemberChange,
    },
}

impl What {
    /// Internal events are the pipe's housekeeping and requests that changed nothing; readers
    /// see them only when they ask.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            What::Renewed
                | What::Refused { .. }
                | What::Repeated { .. }
                | What::NoEffect { .. }
                | What::Noop
                | What::Reserved
                | What::Spilled { .. }
                | What::Merging { .. }
                | What::SourceReady { .. }
        )
    }

    /// A short name for logs and the command line.
    pub fn name(&self) -> &'static str {
        match self {
            What::Created { .. } => "created",
            What::Appended { .. } => "appended",
            What::Replaced { .. } => "replaced",
            What::Stored { .. } => "stored",
            What::Taken { .. } => "taken",
            What::DeliveryFailed { .. } => "delivery-failed",
            What::LeaseExpired { .. } => "lease-expired",
            What::DeadLettered { .. } => "dead-lettered",
            What::Redriven { .. } => "redriven",
            What::Dropped => "dropped",
            What::Deleted => "deleted",
            What::ConsumerOpened { .. } => "consumer-opened",
            What::CheckpointCommitted { .. } => "checkpoint-committed",
            What::ConsumerDropped { .. } => "consumer-dropped",
            What::Renewed => "renewed",
            What::Refused { .. } => "refused",
            What::Repeated { .. } => "repeated",
            What::NoEffect { .. } => "no-effect",
            What::Noop => "noop",
            What::Reserved => "reserved",
            What::Spilled { .. } => "spilled",
            What::Merging { .. } => "merging",
            What::SourceReady { .. } => "source-ready",
            What::Configured { .. } => "configured",
            What::MembersChanged { .. } => "members-changed",
        }
    }
}

/// Which events a reader wants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Only events of sessions of these kinds (empty: every event, including those of no kind,
    /// such as checkpoints).
    pub kinds: Vec<Kind>,
    /// Include internal events (see [`What::is_internal`]).
    pub internal: bool,
    /// Only events of sessions (a watch's changes), not the pipe's own (checkpoints, say).
    #[serde(default)]
    pub sessions_only: bool,
}

impl Filter {
    pub fn matches(&self, mark: EventMark) -> bool {
        let kind = match &self.kinds[..] {
            [] => !self.sessions_only || mark.kind.is_some(),
            kinds => mark.kind.is_some_and(|k| kinds.contains(&k)),
        };
        kind && (self.internal || !mark.internal)
    }

    /// Whether the filter lets everything through (so entries need not be looked at).
    pub fn is_everything(&self) -> bool {
        self.kinds.is_empty() && self.internal && !self.sessions_only
    }
}

/// What a filter needs to know of an event, kept beside the encoded entry so that entries can
/// be filtered without decoding them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMark {
    pub kind: Option<Kind>,
    pub internal: bool,
}

impl Event {
    /// An event of the pipe itself, about no session.
    pub fn pipe(what: What) -> Event {
        Event { session: None, kind: None, what, before: None, after: None }
    }

    pub fn mark(&self) -> EventMark {
        EventMark { kind: self.kind, internal: self.what.is_internal() }
    }
}

impl LedgerEntry {
    /// An entry as a stream carries it (the ledger's own encoding).
    pub fn decode(bytes: &[u8]) -> Result<LedgerEntry, String> {
        postcard::from_bytes(bytes).map_err(|e| format!("undecodable ledger entry: {e}"))
    }

    /// The entry with only the events `filter` lets through (`None` if there are none).
    pub fn filtered(&self, filter: &Filter) -> Option<LedgerEntry> {
        let events: Vec<Event> = self.events.iter().filter(|e| filter.matches(e.mark())).cloned().collect();
        (!events.is_empty()).then(|| LedgerEntry { events, ..self.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(kind: Option<u32>, internal: bool) -> EventMark {
        EventMark { kind: kind.map(Kind), internal }
    }

    #[test]
    fn filters_by_kind_and_internal() {
        let all = Filter { kinds: vec![], internal: true, sessions_only: false };
        let public = Filter { kinds: vec![], internal: false, sessions_only: false };
        let kind2 = Filter { kinds: vec![Kind(2)], internal: false, sessions_only: false };
        let sessions = Filter { kinds: vec![], internal: false, sessions_only: true };
        assert!(sessions.matches(mark(Some(3), false)) && !sessions.matches(mark(None, false)));
        assert!(all.is_everything() && !public.is_everything());
        assert!(all.matches(mark(None, true)) && all.matches(mark(Some(1), false)));
        assert!(public.matches(mark(None, false)) && !public.matches(mark(Some(1), true)));
        assert!(kind2.matches(mark(Some(2), false)));
        assert!(!kind2.matches(mark(Some(1), false)), "another kind");
        assert!(!kind2.matches(mark(None, false)), "events of no kind only without a kind filter");
        assert!(!kind2.matches(mark(Some(2), true)), "internal ones only when asked");
    }
}

/// Names one reader's stream; the driver picks it (unique among its open streams).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StreamId(pub u64);

/// Where a tail starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TailFrom {
    /// At this index (the first event sent has it, or a later one if it has none that match).
    Index(Index),
    /// At the oldest entry this replica's ledger still holds.
    Oldest,
    /// After the last entry applied here: only what happens from now on.
    Next,
}

/// What a reader asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamOpen {
    /// Every committed entry's events that pass `filter`, in index order, from `from` on; then
    /// new ones as they are applied, with progress marks in between.
    Tail { from: TailFrom, filter: Filter },
    /// The sessions of `kinds` (every kind if empty): a resync of every live one as of one
    /// index, then their changes. `resume_after` (the last index a watcher acknowledged) skips
    /// the resync if the changes after it are still held. `window`: events sent and not yet
    /// acknowledged, at most (the server's limit if larger or absent).
    Watch { kinds: Vec<Kind>, resume_after: Option<Index>, window: Option<u32> },
}

/// A session as a watcher's resync shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSnapshot {
    pub session: SessionId,
    pub kind: Kind,
    pub brief: SessionBrief,
    #[serde(with = "crate::op::records_serde")]
    pub records: Vec<Vec<u8>>,
    pub last_failure: Option<FailureReason>,
}

/// One message of a stream. Items of one stream are numbered from 1 (see [`crate::Output`]),
/// and a reader acknowledges them by number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamItem {
    /// Whole ledger entries (each the postcard encoding of a [`LedgerEntry`] holding only the
    /// events the reader asked for), in index order; `through` is the last index they cover
    /// (entries between with no matching event are covered too).
    Entries { entries: Vec<bytes::Bytes>, events: u32, through: Index },
    /// Every entry through `through` has been looked at: nothing more of the reader's matched.
    /// Never lower than an index already sent.
    Progress { through: Index },
    /// A watch's resync begins: it is consistent at index `at` (a watcher drops what it holds).
    ResyncStart { at: Index },
    /// Sessions of the resync.
    Resync { sessions: Vec<SessionSnapshot> },
    /// The resync is complete; changes after `at` follow (as `Entries`).
    Synced { at: Index },
    /// The stream ended (or was refused) and sends nothing more.
    End(StreamError),
}

impl StreamItem {
    /// What the item counts for in a window: bytes for a tail, events for a watch.
    pub fn events(&self) -> u32 {
        match self {
            StreamItem::Entries { events, .. } => *events,
            StreamItem::Resync { sessions } => sessions.len() as u32,
            _ => 0,
        }
    }
}

/// Why a stream was refused or ended. None of these changes anything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StreamError {
    #[error("index {requested} was compacted away; the oldest held here is {first_available}")]
    Compacted { requested: Index, first_available: Index },
    #[error("index {from} is beyond the head of this replica's log ({head})")]
    BeyondHead { from: Index, head: Index },
    #[error("unknown kind {0}")]
    UnknownKind(Kind),
    #[error("this replica serves its limit of {max} streams")]
    TooManyStreams { max: u32 },
    #[error("a stream with this id is already open")]
    AlreadyOpen,
    #[error("the reader acknowledged nothing for {stalled_ms} ms with its window full; it was cut off")]
    TooSlow { stalled_ms: u64 },
    #[error("the ledger is damaged at index {index} on this replica; read it from another replica")]
    Damaged { index: Index },
    #[error("the replica is recovering; retry shortly")]
    NotReady,
    #[error("the replica has stopped")]
    Stopped,
}
