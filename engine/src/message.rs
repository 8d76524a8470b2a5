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
    /// The state at `index` (whose entry has `last_term`) as the leader's newest snapshot file
    /// holds it, for a follower that needs entries the leader no longer keeps. Acknowledged
    /// with an `AppendReply`.
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

/// No term or index a replica reaches comes anywhere near this; refusing larger ones from a
/// peer keeps every `+ 1` and sum on them from overflowing.
pub const TERM_OR_INDEX_MAX: u64 = 1 << 62;
/// The most entries one `Append` may carry, and source files one `Snapshot` may name.
pub const ITEMS_MAX: usize = 1 << 20;
/// The largest source file a snapshot may name (far beyond any real one).
pub const SOURCE_BYTES_MAX: u64 = 1 << 48;

/// Why a peer's message was refused before the engine acted on it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadMessage {
    #[error("{field} is {value}, beyond {TERM_OR_INDEX_MAX}")]
    OutOfRange { field: &'static str, value: u64 },
    #[error("{what}: {count}, at most {max}")]
    TooMany { what: &'static str, count: usize, max: usize },
    #[error("entry {position} has index {found}, not {expected} (entries follow prev_index one by one)")]
    NotConsecutive { position: usize, expected: u64, found: u64 },
    #[error(
        "entry {position} has term {found}, outside {low}..={high} (terms never go down, nor above the message's)"
    )]
    TermOutOfOrder { position: usize, found: u64, low: u64, high: u64 },
    #[error("last_term {last_term} is above the message's term {term}")]
    LastTermAhead { last_term: u64, term: u64 },
    #[error("source file {source_id} said to be {len} bytes")]
    SourceTooLong { source_id: u64, len: u64 },
}

fn bounded(field: &'static str, value: u64) -> Result<(), BadMessage> {
    if value > TERM_OR_INDEX_MAX {
        return Err(BadMessage::OutOfRange { field, value });
    }
    Ok(())
}

fn not_ahead(last_term: Term, term: Term) -> Result<(), BadMessage> {
    if last_term > term {
        return Err(BadMessage::LastTermAhead { last_term: last_term.0, term: term.0 });
    }
    Ok(())
}

fn at_most(what: &'static str, count: usize, max: usize) -> Result<(), BadMessage> {
    if count > max {
        return Err(BadMessage::TooMany { what, count, max });
    }
    Ok(())
}

/// An append's entries follow `prev_index` one by one, with terms from `prev_term` up to the
/// message's own, never going down.
fn check_entries(term: Term, prev_index: Index, prev_term: Term, entries: &[Entry]) -> Result<(), BadMessage> {
    at_most("entries", entries.len(), ITEMS_MAX)?;
    let mut low = prev_term.0;
    for (position, e) in entries.iter().enumerate() {
        let expected = prev_index.0 + 1 + position as u64;
        if e.index.0 != expected {
            return Err(BadMessage::NotConsecutive { position, expected, found: e.index.0 });
        }
        if e.term.0 < low || e.term > term {
            return Err(BadMessage::TermOutOfOrder { position, found: e.term.0, low, high: term.0 });
        }
        low = e.term.0;
    }
    Ok(())
}

impl Message {
    /// Checks what a peer sent before the engine acts on it: terms and indexes in range,
    /// entries consecutive with terms that never go down, counts and lengths within limits. A
    /// message that passes cannot make an assertion fail or an addition overflow; one that
    /// fails is dropped (and the driver logs it with the peer named).
    pub fn check(&self) -> Result<(), BadMessage> {
        bounded("term", self.term().0)?;
        match self {
            Message::PreVote { term, last_index, last_term } | Message::Vote { term, last_index, last_term, .. } => {
                bounded("last_index", last_index.0)?;
                not_ahead(*last_term, *term)
            }
            Message::Append { term, prev_index, prev_term, commit, entries, .. } => {
                bounded("prev_index", prev_index.0)?;
                bounded("commit", commit.0)?;
                not_ahead(*prev_term, *term)?;
                check_entries(*term, *prev_index, *prev_term, entries)
            }
            Message::AppendReply { matched, hint, sources, .. } => {
                bounded("matched", matched.0)?;
                bounded("hint", hint.0)?;
                bounded("sources", sources.0)
            }
            Message::Snapshot { term, index, last_term, sources, .. } => {
                bounded("index", index.0)?;
                not_ahead(*last_term, *term)?;
                at_most("source files", sources.len(), ITEMS_MAX)?;
                match sources.iter().find(|(_, len)| *len > SOURCE_BYTES_MAX) {
                    Some((id, len)) => Err(BadMessage::SourceTooLong { source_id: id.0, len: *len }),
                    None => Ok(()),
                }
            }
            Message::SourceFetch { offset, .. } => bounded("offset", *offset),
            Message::SourcePiece { offset, .. } => bounded("offset", *offset),
            Message::ReadIndexReply { index: Some(index), .. } => bounded("index", index.0),
            Message::PreVoteReply { .. }
            | Message::VoteReply { .. }
            | Message::TimeoutNow { .. }
            | Message::ReadIndex { .. }
            | Message::ReadIndexReply { index: None, .. } => Ok(()),
        }
    }

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
