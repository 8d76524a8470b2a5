//! Messages between replicas: the consensus protocol's wire vocabulary.
//!
//! The protocol is Raft with pre-vote and check-quorum (see `election.rs` and `replication.rs`
//! for the reasons). Every message carries the sender's term; a replica that sees a higher term
//! than its own adopts it before anything else, except for pre-votes, which change nothing.

use crate::op::Entry;
use crate::types::{Index, SourceId, Term};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// "Would you vote for me in `term` if I stood?" Sent before a real election so that a
    /// replica that was cut off does not disrupt a healthy leader by raising the term.
    PreVote {
        term: Term,
        last_index: Index,
        last_term: Term,
    },
    PreVoteReply {
        term: Term,
        granted: bool,
    },
    /// A request for a vote in `term`; the candidate has persisted that term and its own vote.
    /// `transfer`: the leader handed over to the candidate (see `reconfiguration.rs`), so a voter
    /// that heard from that leader a moment ago votes all the same.
    Vote {
        term: Term,
        last_index: Index,
        last_term: Term,
        transfer: bool,
    },
    /// Granted only once the vote is durable on the voter.
    VoteReply {
        term: Term,
        granted: bool,
    },
    /// Entries following `prev_index` (whose term is `prev_term`), and the leader's commit index.
    /// With no entries it is a heartbeat. `round` numbers the leader's confirmation rounds: a
    /// follower echoes the highest it has seen, which proves to the leader that a majority still
    /// followed it after a read arrived (see `reads.rs`).
    Append {
        term: Term,
        prev_index: Index,
        prev_term: Term,
        commit: Index,
        round: u64,
        entries: Vec<Entry>,
    },
    /// `ok`: the follower's log matches the leader's through `matched`, and those entries are
    /// durable on it. Not `ok`: the log did not match at the append's `prev_index`; `hint` is an
    /// index below which the follower's log is known to match any leader's (its commit index) or
    /// its last index, whichever is lower, so the leader can jump back instead of stepping.
    AppendReply {
        term: Term,
        ok: bool,
        matched: Index,
        hint: Index,
        round: u64,
        /// Every source file the follower's state has created through this index is durable
        /// on it: the leader commits a source once a majority reports it (see `stored.rs`).
        sources: Index,
    },
    /// The leader's applied state at `index` (whose entry has `last_term`), for a follower that
    /// needs entries the leader no longer keeps. Acknowledged with an `AppendReply`.
    Snapshot {
        term: Term,
        index: Index,
        last_term: Term,
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
        /// The state's source files whose records it does not carry, with their lengths: the
        /// follower fetches them (`SourceFetch`) before it writes the snapshot. Every replica's
        /// copy of a source is the same bytes.
        sources: Vec<(SourceId, u64)>,
    },
    /// A follower installing a snapshot asks the leader for a piece of a source file.
    SourceFetch {
        term: Term,
        source: SourceId,
        offset: u64,
        len: u64,
    },
    /// The piece asked for (shorter where the file ends).
    SourcePiece {
        term: Term,
        source: SourceId,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The leader hands over: the follower, which holds the leader's whole log, stands for
    /// election at once.
    TimeoutNow {
        term: Term,
    },
    /// A learner asks the leader for a read index (`ctx` numbers the read on the learner).
    ReadIndex {
        term: Term,
        ctx: u64,
    },
    /// The index a read must see, once the leader confirmed it still leads (`None`: it could
    /// not; the learner refuses the read).
    ReadIndexReply {
        term: Term,
        ctx: u64,
        index: Option<Index>,
    },
}

impl Message {
    pub fn term(&self) -> Term {
        match self {
            Message::PreVote { term, .. }
            | Message::PreVoteReply { term, .. }
            | Message::Vote { term, .. }
            | Message::VoteReply { term, .. }
            | Message::Append { term, .. }
            | Message::AppendReply { term, .. }
            | Message::Snapshot { term, .. }
            | Message::SourceFetch { term, .. }
            | Message::SourcePiece { term, .. }
            | Message::TimeoutNow { term }
            | Message::ReadIndex { term, .. }
            | Message::ReadIndexReply { term, .. } => *term,
        }
    }

    /// Pre-votes neither need nor change durable state.
    pub fn is_pre_vote(&self) -> bool {
        matches!(self, Message::PreVote { .. } | Message::PreVoteReply { .. })
    }

    /// A short name for histories and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::PreVote { .. } => "pre-vote",
            Message::PreVoteReply { .. } => "pre-vote-reply",
            Message::Vote { .. } => "vote",
            Message::VoteReply { .. } => "vote-reply",
            Message::Append { .. } => "append",
            Message::AppendReply { .. } => "append-reply",
            Message::Snapshot { .. } => "snapshot",
            Message::SourceFetch { .. } => "source-fetch",
            Message::SourcePiece { .. } => "source-piece",
            Message::TimeoutNow { .. } => "timeout-now",
            Message::ReadIndex { .. } => "read-index",
            Message::ReadIndexReply { .. } => "read-index-reply",
        }
    }
}
