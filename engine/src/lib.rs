//! # truba-engine
//!
//! The whole of a truba replica as a deterministic, single-threaded state machine. It does no
//! IO and reads no clock: time arrives with every input, randomness comes from one ChaCha
//! generator seeded at construction, and disk work leaves as [`Output::Io`] requests whose
//! completions come back as [`Input::IoDone`]. Given the same seed and inputs, it produces the
//! same outputs, bit for bit. Two drivers run it: the simulator (`truba-sim`) and, later, the
//! real server.
//!
//! Where things live:
//! - [`types`]: newtype ids and time.
//! - [`op`]: requests, replies, log entries, queries.
//! - [`io`]: the boundary ([`Input`], [`Output`], disk operations).
//! - `sessions`: the replicated state machine: what applying an entry does.
//! - `repeater`: the leader's choice of due sessions and expired leases.
//! - `log` and [`codec`]: where log bytes go and how they are framed and checked.
//! - `recovery`: rebuilding state from disk; torn tails versus corruption.
//! - `snapshot`: background snapshots and log truncation.
//! - `stored` and `source_files`: stored sessions kept LSM-style in source files, so memory does
//!   not grow with the sessions waiting: the replicated side (spill, merge, ready, take) and this
//!   replica's side (writing, reading ahead, removing the files); `fetch`: a follower installing
//!   a snapshot fetches the source files it lacks, piece by piece.
//! - `election` and `replication`: consensus (Raft with pre-vote and check-quorum), and
//!   [`message`]: what replicas say to each other.
//! - [`membership`]: voters and learners, and the rules for changing them one at a time.
//! - `hardstate`: the durable term and vote.
//! - [`mem_dir`]: a perfect in-memory directory, for tests and fuzzing.
//! - `engine`: the state they share, the local log writer with group commit, and apply.

pub mod codec;
pub mod config;
mod consumers;
mod election;
mod engine;
pub mod error;
pub mod events;
mod fetch;
mod hardstate;
mod hash;
pub mod io;
mod ledger;
mod log;
mod log_writer;
pub mod mem_dir;
pub mod membership;
pub mod message;
pub mod op;
mod reads;
mod reconfiguration;
mod recovery;
mod repeater;
mod replication;
mod resync;
mod sessions;
#[cfg(test)]
mod sessions_props;
mod snapshot;
mod snapshot_format;
mod source_files;
mod stored;
mod streams;
pub mod types;

pub use config::{
    AppliedLimits, ClusterConfig, ConfigChange, ConsensusConfig, EngineConfig, InvalidConfig, KindConfig, Limits,
    MemberAddrs, MemberRole, Mutations,
};
pub use engine::Engine;
pub use error::{DamageFound, Fatal, RequestError};
pub use events::{
    Audit, BriefStatus, Event, EventMark, Filter, LedgerEntry, SessionBrief, SessionSnapshot, StreamError, StreamId,
    StreamItem, StreamOpen, TailFrom, What,
};
pub use hardstate::{hard_state_copies_whole, hard_state_copy_ranges};
pub use io::{DiskError, Input, IoId, IoOp, IoReply, Output, RoleName};
pub use membership::{MemberChange, Members};
pub use message::{BadMessage, Message};
pub use op::{
    Checkpoint, Command, CommitOp, ConsumerCommit, DeadPage, DeadView, Entry, FailureReason, MemberStatus, Outcome,
    Query, QueryReply, RedriveTarget, Reply, Request, SessionState, SessionView, StatusView, UnixSecs, Unspilled,
};
pub use reconfiguration::MembershipView;
pub use sessions::StateMachine;
pub use stored::{decode_source_file, source_name};
pub use types::{
    Attempt, ClientId, Duration, Handle, Index, Instant, Kind, Now, ReplicaId, Seq, SessionId, SourceId, Term, UnixMs,
};
