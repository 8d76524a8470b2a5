//! The engine: one replica's whole behaviour behind `handle(now, input)` / `poll()`.
//!
//! A replica is a member of a Raft group of one, three or five voters (`election.rs` decides who
//! leads, `replication.rs` moves entries to followers and finds what is committed). This file
//! holds the state they share and the local half of the log's life: the leader appends client
//! requests to its in-memory log, and every replica writes its log to disk in group-commit
//! batches (one write and one fsync per batch; the next batch takes everything that arrived
//! meanwhile, and a batch of one goes out at once under low load). Entries are applied once they
//! are committed (durable on a majority) and durable here; the leader then answers the clients.

use crate::config::{ClusterConfig, EngineConfig, Rules};
use crate::error::{Fatal, RequestError};
use crate::events::{Audit, LedgerEntry, StreamError, StreamId, StreamItem, StreamOpen};
use crate::hardstate::{HardState, HardStateWriter, HsStep};
use crate::io::{DiskError, Input, IoId, IoOp, IoReply, Output, RoleName};
use crate::ledger::{Ledger, LedgerIo, LedgerLimits, Record};
use crate::log::Log;
use crate::log_writer::{BatchStep, CutStart, LogWriter};
use crate::message::Message;
use crate::op::{Command, Entry, FailureReason, Query, QueryReply, Request, StatusView};
use crate::reads::ReadQuery;
use crate::recovery::{Recovery, Step};
use crate::repeater::{draw_due, draw_retry_due, Repeater};
use crate::replication::Progress;
use crate::sessions::{MutationEnv, StateMachine};
use crate::snapshot::{SnapStep, Snapshotter};
use crate::source_files::{FileStep, SourceFiles};
use crate::streams::{Ctx, Streams};
use crate::types::{ClientId, Duration, Handle, Index, Instant, Now, ReplicaId, Seq, SourceId, Term};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub(crate) enum Phase {
    Created,
    Recovering(Box<Recovery>),
    Serving,
    Stopped,
}

/// What a disk operation was issued for, so its completion goes to the right place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    Recovery,
    Batch,
    /// Cutting a failed write's leftovers off before the log is written again.
    Repair,
    /// Cutting off entries a new leader overrode, or removing segments after an install.
    Cut,
    HardState,
    Snapshot,
    Cleanup,
    /// Writing a source file (a spill or a merge).
    SourceJob,
    /// Reading ahead into a source (its id and the read-ahead's generation).
    SourceRead(SourceId, u64),
    /// Reading a piece of a source file a follower asked for (the follower, the source, the
    /// offset).
    SourceServe(ReplicaId, SourceId, u64),
    /// Writing a source file that came with a snapshot, before the snapshot itself.
    InstallSource,
    /// Reading the newest snapshot file back to send it to followers that need an install.
    SnapshotServe,
    /// Reading a spilled session's frame to answer a query (its id).
    SessionRead(u64),
    /// The ledger's writes, fsyncs and repairs (of the ledger generation they were issued in:
    /// an install starts a new one, and the old one's completions are ignored).
    LedgerWrite(u64),
    LedgerSync(u64),
    LedgerRepair(u64),
    /// Reading a piece of a ledger file for a stream (its token).
    StreamRead(StreamId, u64),
}

pub(crate) enum Role {
    Follower,
    PreCandidate {
        granted: BTreeSet<ReplicaId>,
    },
    /// `transfer`: standing because the leader handed over.
    Candidate {
        granted: BTreeSet<ReplicaId>,
        transfer: bool,
    },
    Leader {
        progress: BTreeMap<ReplicaId, Progress>,
    },
}

impl Role {
    pub fn name(&self) -> RoleName {
        match self {
            Role::Follower => RoleName::Follower,
            Role::PreCandidate { .. } => RoleName::PreCandidate,
            Role::Candidate { .. } => RoleName::Candidate,
            Role::Leader { .. } => RoleName::Leader,
        }
    }
}

/// A snapshot sent by the leader, being made durable before it replaces the state.
pub(crate) struct Installing {
    pub index: Index,
    pub term: Term,
    pub state: Box<StateMachine>,
    /// Entries the leader sent meanwhile, following the snapshot's entry without a gap; they
    /// join the log once the snapshot is durable. Bounded by the leader's in-flight byte cap.
    pub pending: Vec<Entry>,
    pub pending_bytes: u64,
    /// The pending entries through this index were checked against the log of the leader of
    /// `pending_term` (what the follower may acknowledge, if the term is still current).
    pub pending_term: Term,
    pub pending_upto: Index,
    /// The highest commit index the leader told meanwhile that covers held entries.
    pub pending_commit: Index,
    /// Fetching the snapshot's source files from `from` (before the snapshot is written).
    pub fetch: crate::fetch::Fetch,
    pub from: ReplicaId,
    /// The source files are durable and the directory is being fsynced.
    pub syncing_dir: bool,
    /// The snapshot as it came, written once the source files are durable.
    pub payload: Vec<u8>,
    /// The source files that came with it, with their lengths (what the snapshot, once this
    /// replica's newest, gives a follower to fetch in turn).
    pub manifest: Vec<(SourceId, u64)>,
}

impl Installing {
    /// The term of the entry at `index` among the snapshot's and the kept ones, if held.
    pub fn term_at(&self, index: Index) -> Option<Term> {
        match index.0.checked_sub(self.index.0)? {
            0 => Some(self.term),
            n => self.pending.get(n as usize - 1).map(|e| e.term),
        }
    }
}

pub struct Engine {
    /// This node's own settings. Applying never reads its kinds or applied limits: those come
    /// from the replicated configuration in the state (see `config.rs`).
    pub(crate) cfg: EngineConfig,
    /// This node's kinds and applied limits as a configuration: what a new cluster's first
    /// leader proposes, and what the replicated one is compared with for the operator.
    pub(crate) local_config: ClusterConfig,
    /// The replicated configuration version last compared with this node's own.
    config_noticed: u64,
    pub(crate) rng: ChaCha8Rng,
    pub(crate) now: Now,
    pub(crate) phase: Phase,
    pub(crate) me: ReplicaId,
    /// The members this replica was started with, in force until the bootstrap entry is applied
    /// (see `Engine::members`); empty for a replica that joins an existing cluster.
    pub(crate) initial_members: crate::membership::Members,
    /// Leader: a leadership transfer under way.
    pub(crate) transfer: Option<crate::reconfiguration::Transfer>,
    pub(crate) hard: HardStateWriter,
    pub(crate) role: Role,
    /// The leader of the current term, once known.
    pub(crate) leader: Option<ReplicaId>,
    /// When this replica last heard from a leader of its current term.
    pub(crate) leader_heard_at: Option<Instant>,
    pub(crate) election_deadline: Instant,
    pub(crate) heartbeat_due: Instant,
    /// Messages waiting for the term or vote they depend on to be durable.
    pub(crate) held: VecDeque<(ReplicaId, Message)>,
    pub(crate) state: StateMachine,
    pub(crate) log: Log,
    /// The local log is durable, and is this replica's log, through here.
    pub(crate) durable: Index,
    /// Entries through here are committed (durable on a majority).
    pub(crate) commit: Index,
    /// Follower: the log is known to match the current leader's through here.
    pub(crate) ack_upto: Index,
    /// Follower: the newest confirmation round the current leader sent (echoed back).
    pub(crate) leader_round: u64,
    /// Leader: the index of its first entry (the no-op) in this term.
    pub(crate) term_start: Index,
    pub(crate) reads: crate::reads::Reads,
    /// The disk side of the log (see `log_writer.rs`).
    pub(crate) writer: LogWriter,
    /// The latest request of each client that this leader has proposed and not yet answered,
    /// so that a retry waits for the original's answer.
    pub(crate) waiting: BTreeMap<ClientId, Seq>,
    /// Client requests this leader proposed, by index, to answer once applied.
    pub(crate) proposed: BTreeMap<Index, (ClientId, Seq)>,
    pub(crate) installing: Option<Installing>,
    /// Files to remove after a snapshot, issued a few at a time to keep outstanding IO bounded.
    cleanup: VecDeque<String>,
    /// Files to remove once no resync reads them.
    deferred: Vec<String>,
    cleanup_inflight: usize,
    pub(crate) repeater: Repeater,
    pub(crate) snapshots: Snapshotter,
    pub(crate) files: SourceFiles,
    /// Every applied entry's events, for readers (see `ledger.rs`).
    pub(crate) ledger: Ledger,
    /// Bumped when the ledger starts over, so completions of the old one's IO are ignored.
    ledger_generation: u64,
    /// After a failed ledger write (disk full), the next attempt waits until then.
    ledger_retry_at: Option<Instant>,
    /// A snapshot of this replica's state waits for the ledger to be durable through its index
    /// before it is renamed into place.
    snapshot_rename: Option<(Index, IoOp)>,
    /// Readers' tails and watches (see `streams.rs`).
    streams: Streams,
    /// Read-throughs waiting for a consumer's checkpoint (see `consumers.rs`).
    read_throughs: crate::consumers::ReadThroughs,
    /// When the streams next get a tick (progress marks, stalled readers).
    streams_tick: Instant,
    /// Reads of source file pieces for followers under way (bounded).
    pub(crate) serving_pieces: usize,
    /// Queries waiting for a spilled session's frame to be read, by query id.
    pub(crate) session_reads: BTreeMap<u64, crate::op::SessionView>,
    io_next: u64,
    io_pending: BTreeMap<IoId, Purpose>,
    pub(crate) outputs: VecDeque<Output>,
    /// Entries were proposed since the last batch started; `poll` starts the next one.
    flush_wanted: bool,
    next_tick: Instant,
}

/// Disk operations outstanding at once: one recovery or batch step, one cut step, one hard
/// state step, one snapshot step, a handful of removals, one source file job or install step,
/// the bounded source reads (8 read-ahead, 4 pieces served, 16 sessions read for queries), one
/// ledger write or repair with its fsyncs (a few files at most), and the readers' bounded reads.
const IO_PENDING_MAX: usize = 96;
const CLEANUP_INFLIGHT_MAX: usize = 8;

impl Engine {
    /// A single-replica cluster. Every random choice it makes comes from `seed`.
    pub fn new(cfg: EngineConfig, seed: u64) -> Engine {
        Engine::replica(cfg, ReplicaId(0), vec![ReplicaId(0)], seed)
    }

    /// Replica `me` of a new cluster whose voters are `voters` (which must include `me`), or of
    /// an existing cluster whose configuration its data directory holds.
    pub fn replica(cfg: EngineConfig, me: ReplicaId, voters: Vec<ReplicaId>, seed: u64) -> Engine {
        assert!(voters.contains(&me), "a replica is one of the cluster's voters");
        Engine::with_members(cfg, me, voters, seed)
    }

    /// Replica `me` joining an existing cluster: it knows no members, never stands, and waits for
    /// a leader to send it the log (or a snapshot) that makes it a learner, then a voter.
    pub fn joining(cfg: EngineConfig, me: ReplicaId, seed: u64) -> Engine {
        Engine::with_members(cfg, me, Vec::new(), seed)
    }

    fn with_members(cfg: EngineConfig, me: ReplicaId, mut voters: Vec<ReplicaId>, seed: u64) -> Engine {
        voters.sort();
        voters.dedup();
        Engine {
            local_config: ClusterConfig::bootstrap(&cfg, &voters),
            initial_members: voters.iter().map(|&v| (v, crate::config::MemberRole::Voter)).collect(),
            transfer: None,
            config_noticed: 0,
            cfg,
            rng: ChaCha8Rng::seed_from_u64(seed),
            now: Now::default(),
            phase: Phase::Created,
            me,
            hard: HardStateWriter::default(),
            role: Role::Follower,
            leader: None,
            leader_heard_at: None,
            election_deadline: Instant(0),
            heartbeat_due: Instant(0),
            held: VecDeque::new(),
            state: StateMachine::default(),
            log: Log::default(),
            durable: Index(0),
            commit: Index(0),
            ack_upto: Index(0),
            leader_round: 0,
            term_start: Index(0),
            reads: Default::default(),
            writer: LogWriter::default(),
            waiting: BTreeMap::new(),
            proposed: BTreeMap::new(),
            installing: None,
            cleanup: VecDeque::new(),
            deferred: Vec::new(),
            cleanup_inflight: 0,
            repeater: Repeater::default(),
            snapshots: Snapshotter::default(),
            files: SourceFiles::default(),
            ledger: Ledger::default(),
            ledger_generation: 0,
            ledger_retry_at: None,
            snapshot_rename: None,
            streams: Streams::default(),
            read_throughs: Default::default(),
            streams_tick: Instant(0),
            serving_pieces: 0,
            session_reads: BTreeMap::new(),
            io_next: 0,
            io_pending: BTreeMap::new(),
            outputs: VecDeque::new(),
            flush_wanted: false,
            next_tick: Instant(0),
        }
    }

    /// Feeds one input. Outputs it causes are collected by [`Engine::poll`].
    pub fn handle(&mut self, now: Now, input: Input) {
        assert!(now.mono >= self.now.mono, "monotonic time never goes backwards");
        self.now = now;
        match input {
            Input::Boot => self.boot(),
            Input::Request { client, seq, request } => self.on_request(client, seq, request, None),
            Input::RequestAs { client, seq, request, principal } => {
                self.on_request(client, seq, request, Some(principal))
            }
            Input::Query { id, query } => self.on_query(id, query),
            Input::IoDone { id, result } => self.on_io(id, result),
            Input::DeliveryFailed { handle, reason } => self.on_delivery_failed(handle, reason),
            Input::Tick => self.on_tick(),
            Input::Message { from, message } => self.on_message(from, message),
            Input::StreamOpen { stream, open } => self.on_stream_open(stream, open),
            Input::StreamAck { stream, seq, error } => self.with_streams(|s, c| s.ack(stream, seq, error, c)),
            Input::StreamClose { stream } => {
                self.streams.close(stream);
                self.clean_up();
            }
        }
        self.persist_hard_state();
        self.invariants();
    }

    /// The next output, until there are none.
    ///
    /// New proposals are written when the driver comes to collect outputs rather than at once:
    /// a driver that hands in every request it has received before polling gets them all in
    /// one group-commit batch, instead of a batch of the first one and another of the rest.
    pub fn poll(&mut self) -> Option<Output> {
        if self.outputs.is_empty() && std::mem::take(&mut self.flush_wanted) {
            self.flush();
            self.invariants();
        }
        self.outputs.pop_front()
    }

    /// When the engine next wants an [`Input::Tick`], if it has timed work at all.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.is_serving() {
            return None;
        }
        let consensus = match self.role {
            Role::Leader { .. } if self.is_lone_voter() && self.peers().is_empty() => None,
            Role::Leader { .. } => Some(self.heartbeat_due),
            Role::Candidate { .. } | Role::PreCandidate { .. } => Some(self.election_deadline.min(self.heartbeat_due)),
            Role::Follower => Some(self.election_deadline),
        };
        // Sessions in memory may expire or come due; sources have sessions to come due, or
        // wait to be made ready or merged.
        let sources = self.state.sources.referenced().next().is_some() || !self.state.sources.merges.is_empty();
        let repeats = self.runs_repeater() && (!self.state.sessions.is_empty() || sources);
        let retry = self.writer.retry_at();
        let streams = (self.streams.len() > 0).then_some(self.streams_tick);
        let waits = self.read_throughs.next_deadline();
        let local_reads = self.reads.local_deadline(self.cfg.consensus.election_timeout_ms_max);
        [consensus, repeats.then_some(self.next_tick), retry, self.ledger_retry_at, streams, waits, local_reads]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn state(&self) -> &StateMachine {
        &self.state
    }

    pub fn is_serving(&self) -> bool {
        matches!(self.phase, Phase::Serving)
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader { .. })
    }

    pub fn id(&self) -> ReplicaId {
        self.me
    }

    /// The leader this replica knows of (itself when it leads), if any.
    pub fn leader(&self) -> Option<ReplicaId> {
        self.leader
    }

    pub fn term(&self) -> Term {
        self.hard.wanted.term
    }

    pub fn commit_index(&self) -> Index {
        self.commit
    }

    /// The replica is fetching back a log range it lost to damage, and until it has it neither
    /// votes nor stands for election.
    pub fn is_repairing(&self) -> bool {
        self.hard.wanted.repair_upto.0 > 0
    }

    /// Whether the repair mark keeps this replica out of elections (always, except under the
    /// `vote-while-repairing` mutation).
    pub(crate) fn abstains(&self) -> bool {
        let repairing = self.is_repairing() && !self.cfg.mutation(|m| m.vote_while_repairing);
        repairing || (self.votes_lost() && !self.cfg.mutation(|m| m.vote_after_losing_votes))
    }

    /// Both copies of the hard state were lost: this replica never votes or stands again.
    pub fn votes_lost(&self) -> bool {
        self.hard.wanted.votes_lost
    }

    /// The term of the entry at `index` in this replica's log, if it holds it (for checkers).
    pub fn log_term(&self, index: Index) -> Option<Term> {
        self.log.term_at(index)
    }

    /// First and last index of the entries this replica holds in memory.
    pub fn log_range(&self) -> (Index, Index) {
        (self.log.base.next(), self.log.last_index())
    }

    /// Nothing proposed and unanswered, nothing being written, no disk operation outstanding:
    /// every request received has been answered. A driver shutting down waits for this.
    pub fn is_idle(&self) -> bool {
        self.proposed.is_empty()
            && !self.writer.has_batch()
            && self.io_pending.is_empty()
            && self.cleanup.is_empty()
            && self.log.written == self.log.last_index()
            && self.hard.is_durable()
    }

    pub(crate) fn is_writing(&self) -> bool {
        self.writer.is_writing()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub(crate) fn issue(&mut self, op: IoOp, purpose: Purpose) {
        let id = IoId(self.io_next);
        self.io_next += 1;
        self.io_pending.insert(id, purpose);
        self.outputs.push_back(Output::Io { id, op });
    }

    fn stop(&mut self, fatal: Fatal) {
        self.with_streams(|s, c| s.stop_all(c));
        let outputs = &mut self.outputs;
        let refused = RequestError::Stopped("see the replica's log".into());
        self.read_throughs.refuse_all(refused.clone(), |id, reply| outputs.push_back(Output::QueryReply { id, reply }));
        self.refuse_local_reads(refused);
        self.phase = Phase::Stopped;
        self.waiting.clear();
        self.proposed.clear();
        self.held.clear();
        self.outputs.push_back(Output::Stopped(fatal));
    }

    /// Whether this replica decides deliveries and lease expiries: only the leader does.
    pub(crate) fn runs_repeater(&self) -> bool {
        self.is_leader() || self.cfg.mutation(|m| m.follower_runs_repeater)
    }

    // ---- recovery -------------------------------------------------------------------------

    fn boot(&mut self) {
        assert!(matches!(self.phase, Phase::Created), "Boot is the first input, and only once");
        let sync_recovered = !self.cfg.mutation(|m| m.skip_recovery_fsync);
        // A lone voter has no peer to repair from; a joining replica has peers it does not know.
        let repair_from_peers = self.initial_members.len() != 1;
        let options = crate::recovery::Options {
            retries_max: self.cfg.limits.read_retries_max,
            sync_recovered,
            repair_from_peers,
            mark_snapshot_damage: !self.cfg.mutation(|m| m.snapshot_damage_unmarked),
        };
        let (recovery, step) = Recovery::start(options);
        self.phase = Phase::Recovering(Box::new(recovery));
        self.recovery_step(step);
    }

    fn recovery_step(&mut self, step: Step) {
        match step {
            Step::Io(op) => self.issue(op, Purpose::Recovery),
            Step::Fatal(f) => self.stop(f),
            Step::Done(r) => {
                self.state = r.state;
                self.log = r.log;
                self.durable = self.log.written;
                self.commit = self.state.applied();
                self.hard = HardStateWriter::recovered(HardState::default(), r.hard_in_place);
                // A term raised from the log is not yet in the hard state file: write it.
                self.want_hard_state(r.hard);
                if r.hard_rewrite {
                    self.hard.rewrite();
                }
                self.snapshots = Snapshotter::recovered(r.snapshot, r.snapshots, &self.state);
                self.ledger = Ledger::recovered(LedgerLimits::of(&self.cfg.limits), r.ledger);
                if let Err(f) = self.recover_sources(&r.sources, r.snapshot) {
                    self.stop(f);
                    return;
                }
                self.phase = Phase::Serving;
                self.next_tick = self.now.mono.saturating_add(self.tick());
                if self.is_lone_voter() {
                    // Alone, every durable entry is on a majority: all of it is committed.
                    self.commit = self.durable;
                    self.apply_committed();
                }
                self.state.full_invariants();
                self.notice_config();
                self.outputs.push_back(Output::Recovered {
                    applied: self.state.applied(),
                    state_hash: self.state.state_hash(),
                    torn_bytes: r.torn_bytes,
                    damage: r.damage_found,
                });
                self.start_following();
            }
        }
    }

    /// Checks that every source file the recovered state needs is there (a source whose records
    /// the snapshot holds is written again), and removes source files nothing refers to. A
    /// source file found under its final name is whole: it is renamed there only once fsynced.
    fn recover_sources(&mut self, found: &[SourceId], snapshot: Index) -> Result<(), Fatal> {
        let mut durable: BTreeSet<SourceId> = found.iter().copied().collect();
        let sources = &self.state.sources;
        if let Some(id) = sources.referenced().find(|id| !sources.held.contains_key(id) && !durable.contains(id)) {
            let file = crate::stored::source_name(id);
            return Err(Fatal::SourceCorrupt { file, reason: "the snapshot refers to it but it is missing".into() });
        }
        let wanted: BTreeSet<SourceId> = sources.needing_files().collect();
        // Files after the snapshot are kept: entries still to be applied refer to them.
        let orphans: Vec<SourceId> =
            durable.iter().copied().filter(|id| !wanted.contains(id) && id.0 <= snapshot.0).collect();
        for id in orphans {
            durable.remove(&id);
            self.cleanup.push_back(crate::stored::source_name(id));
        }
        self.files = SourceFiles::recovered(durable);
        self.files.collect(&mut self.state);
        if let Some(op) = self.files.next_job(&self.state, &self.cfg) {
            self.issue(op, Purpose::SourceJob);
        }
        self.clean_up();
        Ok(())
    }

    fn on_io(&mut self, id: IoId, result: Result<IoReply, DiskError>) {
        let Some(purpose) = self.io_pending.remove(&id) else { return };
        if matches!(self.phase, Phase::Stopped) {
            return;
        }
        match purpose {
            Purpose::Recovery => {
                let Phase::Recovering(mut r) = std::mem::replace(&mut self.phase, Phase::Created) else {
                    unreachable!("recovery IO completes only while recovering")
                };
                let step = r.on_io(result, self.cfg.mutation(|m| m.truncate_mid_log_corruption));
                self.phase = Phase::Recovering(r);
                self.recovery_step(step);
            }
            Purpose::Batch => self.on_batch_io(result),
            Purpose::Repair => match result {
                Ok(_) | Err(DiskError::NotFound) => {
                    self.writer.repaired();
                    self.flush();
                }
                Err(e) => self.stop(Fatal::DiskFailed {
                    file: "(log tail)".into(),
                    reason: format!("cannot cut off a failed write: {e}"),
                }),
            },
            Purpose::Cut => self.on_cut_io(result),
            Purpose::HardState => match self.hard.on_io(result) {
                Ok(step) => {
                    if let HsStep::Io(op) = step {
                        self.issue(op, Purpose::HardState);
                    }
                    self.release_held();
                }
                Err(e) => self.stop(Fatal::DiskFailed { file: "hardstate".into(), reason: e.to_string() }),
            },
            Purpose::Snapshot => self.on_snapshot_io(result),
            Purpose::SnapshotServe => self.on_snapshot_served(result),
            Purpose::SourceJob => match self.files.on_job_io(result, &mut self.state, &self.cfg) {
                FileStep::Io(op) => self.issue(op, Purpose::SourceJob),
                FileStep::Idle => self.maybe_snapshot(),
                FileStep::Fatal(f) => self.stop(f),
            },
            Purpose::SourceServe(peer, source, offset) => {
                self.serving_pieces -= 1;
                // A read that failed is not answered: the follower asks again.
                if let Ok(IoReply::Data(data)) = result {
                    let term = self.term();
                    self.send(peer, Message::SourcePiece { term, source, offset, data });
                }
            }
            Purpose::SessionRead(query) => self.spilled_read(query, result),
            Purpose::LedgerWrite(_) | Purpose::LedgerSync(_) | Purpose::LedgerRepair(_) => {
                self.on_ledger_io(purpose, result)
            }
            Purpose::StreamRead(stream, token) => self.with_streams(|s, c| s.on_read(stream, token, result, c)),
            Purpose::InstallSource => match result {
                Ok(_) if self.installing.is_some() => self.next_install_op(),
                Ok(_) => {}
                // Like a failed snapshot write: abandoned, and the leader's next snapshot
                // starts again (the temporary files are written over, or removed by recovery).
                Err(_) => self.installing = None,
            },
            Purpose::SourceRead(source, generation) => {
                match self.files.on_read(source, generation, result, &self.state, &self.cfg) {
                    Ok(()) => {
                        self.read_ahead();
                        self.take_due();
                    }
                    Err(f) => self.stop(f),
                }
            }
            // A removal that failed leaves a file that the next recovery removes.
            Purpose::Cleanup => {
                self.cleanup_inflight -= 1;
                self.clean_up();
            }
        }
    }

    /// Records a new term or vote. It is written once the current input is handled, so that a
    /// voter that adopts a term and votes in it in one step makes one replacement, not two.
    pub(crate) fn want_hard_state(&mut self, hs: HardState) {
        self.hard.wanted = hs;
    }

    fn persist_hard_state(&mut self) {
        if !self.is_serving() {
            return;
        }
        let mark = self.hard.wanted.repair_upto;
        if mark.0 > 0 && self.durable >= mark {
            // The repaired log holds everything it may once have acknowledged: it votes again.
            self.hard.wanted.repair_upto = Index(0);
        }
        if let HsStep::Io(op) = self.hard.want(self.hard.wanted) {
            self.issue(op, Purpose::HardState);
        }
    }

    // ---- requests -------------------------------------------------------------------------

    fn refusal(&self) -> Option<RequestError> {
        if self.is_stopped() {
            return Some(RequestError::Stopped("see the replica's log".into()));
        }
        if !self.is_serving() {
            return Some(RequestError::NotReady);
        }
        (!self.is_leader()).then_some(RequestError::NotLeader { leader: self.leader_hint() })
    }

    fn on_request(&mut self, client: ClientId, seq: Seq, request: Request, principal: Option<String>) {
        if let Some(e) = self.refusal() {
            self.outputs.push_back(Output::refuse(client, seq, e));
            return;
        }
        if let Some(t) = &self.transfer {
            // Handing over: requests go to the new leader, which holds this leader's whole log.
            let e = RequestError::NotLeader { leader: Some(t.to) };
            self.outputs.push_back(Output::refuse(client, seq, e));
            return;
        }
        if let Request::TransferLeader { to } = request {
            self.start_transfer(client, seq, to);
            return;
        }
        if !self.cfg.mutation(|m| m.apply_retry_twice) {
            if let Some(outcome) = self.state.dedup_lookup(client, seq) {
                self.outputs.push_back(Output::Reply { client, seq, outcome });
                return;
            }
            match self.waiting.get(&client) {
                Some(w) if *w == seq => return, // the original is on its way to the log
                Some(w) if seq < *w => {
                    let e = RequestError::StaleSequence { seq: seq.0, last: w.0 };
                    self.outputs.push_back(Output::refuse(client, seq, e));
                    return;
                }
                _ => {}
            }
        }
        if let Err(e) = self.precheck(&request) {
            self.outputs.push_back(Output::refuse(client, seq, e));
            return;
        }
        let max = self.cfg.limits.pending_requests_max;
        if self.proposed.len() >= max as usize {
            self.outputs.push_back(Output::refuse(client, seq, RequestError::Overloaded { max }));
            return;
        }
        let command = match request {
            Request::ConsumerCommit(commit) => self.commit_command(client, seq, commit, principal),
            Request::ChangeMembers { change, addrs } => {
                match self.change_members(client, seq, change, addrs, principal) {
                    Ok(command) => command,
                    Err(e) => {
                        self.outputs.push_back(Output::refuse(client, seq, e));
                        return;
                    }
                }
            }
            request => {
                let due = match &request {
                    Request::Store { handle, timeout_s } => {
                        let kind = self.state.session(handle.session).map(|s| s.kind);
                        Some(self.draw_due(kind, *timeout_s))
                    }
                    _ => None,
                };
                Command::Client { client, seq, request, due, principal }
            }
        };
        self.waiting.insert(client, seq);
        let changes_members = matches!(command, Command::Members { .. });
        let index = self.propose(command);
        self.proposed.insert(index, (client, seq));
        if changes_members {
            // In force from now on: the new member is replicated to, a removed one is not.
            self.sync_progress();
            self.replicate_all();
        }
    }

    /// A repeat time drawn with the jitter of the kind as the cluster configures it.
    fn draw_due(&mut self, kind: Option<crate::types::Kind>, timeout_s: u32) -> crate::op::UnixSecs {
        let kc = kind.and_then(|k| self.state.config().kind(k));
        draw_due(self.now.wall, timeout_s, kc, &mut self.rng)
    }

    /// A consumer's commit as an entry: the repeat time of each storing operation is drawn
    /// here, and for every session it creates after the first an index is reserved just before
    /// it (proposed now, so the reserved entries and the commit are consecutive in the log).
    fn commit_command(
        &mut self,
        client: ClientId,
        seq: Seq,
        commit: crate::op::ConsumerCommit,
        principal: Option<String>,
    ) -> Command {
        let mut dues = Vec::with_capacity(commit.ops.len());
        for op in &commit.ops {
            let kind = match op {
                crate::op::CommitOp::New { kind, .. } => Some(*kind),
                other => other.as_request().and_then(|r| r.session()).and_then(|id| self.state.kind_of(id)),
            };
            dues.push(op.store_s().map(|t| self.draw_due(kind, t)));
        }
        let news = commit.ops.iter().filter(|op| matches!(op, crate::op::CommitOp::New { .. })).count() as u64;
        let ids_from = self.log.last_index().next();
        for _ in 1..news {
            self.propose(Command::Reserve);
        }
        Command::Commit { client, seq, principal, commit, dues, ids_from }
    }

    /// Refusals that need no log entry, by the replicated configuration as this leader has
    /// applied it. The same checks are made again at apply time, which is what every replica
    /// agrees on (the configuration may change in between).
    fn precheck(&self, request: &Request) -> Result<(), RequestError> {
        let config = self.state.config();
        if config.version == 0 {
            // The bootstrap entry is on its way; applying decides.
            return Ok(());
        }
        if let Request::ConsumerCommit(c) = request {
            let max = config.limits.commit_ops_max;
            if c.ops.len() > max as usize {
                return Err(RequestError::TooManyOps { max });
            }
            crate::consumers::check_name(&c.consumer, &config.limits)?;
            return Ok(());
        }
        if let Request::Configure { kinds, limits, .. } = request {
            return crate::config::ClusterConfig::validate(kinds, limits).map_err(|e| RequestError::InvalidConfig(e.0));
        }
        let kind = match request {
            Request::New { kind, .. } => Some(*kind),
            other => other.handle().and_then(|h| self.state.session(h.session)).map(|s| s.kind),
        };
        let Some(kind) = kind else { return Ok(()) };
        let kc = config.kind(kind).ok_or(RequestError::UnknownKind(kind))?;
        let size = request.record_len() as u64;
        if size > kc.record_bytes_max as u64 {
            return Err(RequestError::RecordTooLarge { size, max: kc.record_bytes_max });
        }
        if let Request::Store { timeout_s, .. } = request {
            if *timeout_s > kc.store_timeout_s_max {
                return Err(RequestError::TimeoutTooLong { timeout_s: *timeout_s, max_s: kc.store_timeout_s_max });
            }
        }
        Ok(())
    }

    fn on_query(&mut self, id: u64, query: Query) {
        let reply = match query {
            // Until recovery is done the state is not the replica's: "unknown" would be a lie.
            Query::Session(_) if !self.is_serving() => {
                let e = if self.is_stopped() {
                    RequestError::Stopped("see the replica's log".into())
                } else {
                    RequestError::NotReady
                };
                QueryReply::Session(Err(e))
            }
            Query::Dead { .. } if !self.is_serving() => QueryReply::Dead(Err(RequestError::NotReady)),
            Query::Session(sid) => return self.on_read(id, ReadQuery::Session(sid)),
            Query::SessionLocal(_) if !self.is_serving() => QueryReply::Session(Err(RequestError::NotReady)),
            Query::SessionLocal(sid) => match self.session_reply(id, sid) {
                Some(reply) => reply,
                None => return, // answered once the frame is read
            },
            Query::Dead { kind, .. } if self.state.config().kind(kind).is_none() => {
                QueryReply::Dead(Err(RequestError::UnknownKind(kind)))
            }
            Query::Dead { kind, after, limit } => {
                let limit = limit.min(self.cfg.limits.list_max);
                return self.on_read(id, ReadQuery::Dead { kind, after, limit });
            }
            Query::Status => QueryReply::Status(self.status()),
            Query::Checkpoint { .. } | Query::ReadThrough { .. } if !self.is_serving() => {
                QueryReply::Checkpoint(Err(RequestError::NotReady))
            }
            Query::Checkpoint { consumer } => return self.on_read(id, ReadQuery::Checkpoint(consumer)),
            Query::Config if !self.is_serving() => QueryReply::Config(Err(RequestError::NotReady)),
            Query::Config => return self.on_read(id, ReadQuery::Config),
            Query::ReadThrough { consumer, index, timeout_ms } => match self.state.checkpoint(&consumer) {
                None => QueryReply::Checkpoint(Err(RequestError::UnknownConsumer(consumer))),
                Some(c) if c.through >= index || self.read_through_early(index) => QueryReply::Checkpoint(Ok(c)),
                Some(_) if self.read_throughs.len() >= self.cfg.limits.pending_requests_max as usize => {
                    QueryReply::Checkpoint(Err(RequestError::Overloaded { max: self.cfg.limits.pending_requests_max }))
                }
                Some(_) => {
                    let timeout_ms = timeout_ms.min(self.cfg.limits.read_through_timeout_ms_max);
                    self.read_throughs.wait(id, consumer, index, self.now.mono, timeout_ms);
                    return;
                }
            },
        };
        self.outputs.push_back(Output::QueryReply { id, reply });
    }

    /// Answers the read-throughs the applied state now covers, and those out of time.
    fn settle_read_throughs(&mut self) {
        if self.read_throughs.len() == 0 {
            return;
        }
        let early = self.cfg.mutation(|m| m.read_through_on_applied).then_some(self.state.applied());
        let (state, outputs) = (&self.state, &mut self.outputs);
        let lookup = |name: &str| state.checkpoint(name);
        let answer = |id, reply| outputs.push_back(Output::QueryReply { id, reply });
        self.read_throughs.settle(self.now.mono, early, lookup, answer);
    }

    /// Only under the `read-through-on-applied` mutation: a read-through of `index` answers once
    /// the replica has applied it, whatever the checkpoint says.
    fn read_through_early(&self, index: Index) -> bool {
        self.cfg.mutation(|m| m.read_through_on_applied) && self.state.applied() >= index
    }

    /// The ledger's records after `after` that are still in memory: every record applied since
    /// the last input at least (for the simulator, which checks that replicas agree on them).
    pub fn ledger_records_after(&self, after: Index) -> impl Iterator<Item = (Index, &bytes::Bytes)> + '_ {
        self.ledger.cached_after(after).map(|r| (r.index, &r.body))
    }

    pub fn status(&self) -> StatusView {
        let (active, stored, dead) = self.state.sessions_count();
        StatusView {
            serving: self.is_serving(),
            replica: self.me,
            role: self.role.name(),
            term: self.term(),
            leader: self.leader,
            applied: self.state.applied(),
            commit: self.commit,
            durable: self.durable,
            last_index: self.log.last_index(),
            sessions_active: active,
            sessions_stored: stored,
            sessions_dead: dead,
            sessions_spilled: self.state.spilled_count().0,
            source_files: self.state.spilled_count().1,
            state_hash: self.state.state_hash(),
            members: self.member_statuses(),
        }
    }

    /// Entries proposed and not yet committed, at most; internal proposals wait beyond it.
    fn uncommitted_full(&self) -> bool {
        self.log.last_index().0 - self.commit.0 >= self.cfg.limits.pending_requests_max as u64
    }

    fn on_delivery_failed(&mut self, handle: Handle, reason: FailureReason) {
        // Off the leader, or with the log full, the report is dropped: the delivery's lease
        // runs out and the session is stored all the same, only later.
        if !self.is_serving() || !self.is_leader() || self.uncommitted_full() {
            return;
        }
        let Some(session) = self.state.session(handle.session).filter(|s| s.attempt == handle.attempt) else {
            return; // a report about a delivery already superseded changes nothing
        };
        let rules = Rules::new(&self.state.config, &self.cfg.mutations);
        let due = draw_retry_due(self.now.wall, session, &rules, &mut self.rng);
        let reason = reason.truncated(self.cfg.limits.failure_reason_bytes_max as usize);
        self.propose(Command::DeliveryFailed { handle, due, reason });
    }

    fn tick(&self) -> Duration {
        Duration(self.cfg.limits.repeater_tick_ms)
    }

    fn on_tick(&mut self) {
        if !self.is_serving() {
            return;
        }
        self.consensus_tick();
        self.serve_local_reads();
        if self.installing.is_some() {
            self.fetch_step();
        }
        if self.writer.retry_due(self.now.mono) {
            self.flush();
        }
        if self.ledger_retry_at.is_some_and(|t| t <= self.now.mono) {
            self.ledger_retry_at = None;
            self.ledger.retry();
            self.ledger_step();
        }
        self.settle_read_throughs();
        if self.streams.len() > 0 && self.now.mono >= self.streams_tick {
            self.streams_tick = self.now.mono.saturating_add(Duration(self.cfg.limits.progress_every_ms));
            self.with_streams(|s, c| s.tick(c));
        }
        if self.now.mono < self.next_tick {
            return;
        }
        self.next_tick = self.now.mono.saturating_add(self.tick());
        // Internal proposals wait while the log is full of client work.
        if !self.runs_repeater() || self.uncommitted_full() {
            return;
        }
        let wall = self.now.wall;
        let rules = Rules::new(&self.state.config, &self.cfg.mutations);
        if let Some(c) = self.repeater.plan_expire(&self.state, wall, &rules, &self.cfg.limits, &mut self.rng) {
            self.propose(c);
        }
        self.plan_sources();
        self.read_ahead();
        self.take_due();
    }

    /// The leader's proposals about source files (see `source_files.rs`).
    fn plan_sources(&mut self) {
        if !self.is_leader() {
            return;
        }
        let marks: Vec<Index> = self.counting_progress().iter().map(|p| p.sources_mark).collect();
        for c in self.files.plan(&self.state, &self.cfg, &marks, self.majority()) {
            let index = self.propose(c.clone());
            self.files.proposed(&c, index);
        }
    }

    /// The leader reads ahead into sources whose first session is due.
    fn read_ahead(&mut self) {
        if !self.is_serving() || !self.runs_repeater() {
            return;
        }
        let now_s = self.now.wall.as_secs().0;
        for (source, generation, op) in self.files.read_ahead(&self.state, &self.cfg, now_s) {
            self.issue(op, Purpose::SourceRead(source, generation));
        }
    }

    /// Collects what applying entries asked of this replica's files, and starts the next job.
    fn after_apply_sources(&mut self) {
        self.files.collect(&mut self.state);
        if let Some(op) = self.files.next_job(&self.state, &self.cfg) {
            self.issue(op, Purpose::SourceJob);
        }
        // Takes consumed what was read ahead: read on at once rather than at the next tick.
        self.read_ahead();
    }

    // ---- the log: group commit -------------------------------------------------------------

    /// Appends a command to the leader's log and starts writing and replicating it.
    pub(crate) fn propose(&mut self, command: Command) -> Index {
        let index = self.log.last_index().next();
        if !self.is_leader() {
            // Only under the follower-runs-repeater mutation: the proposal goes nowhere.
            return index;
        }
        self.log.append(Entry { term: self.term(), index, at: self.now.wall, command });
        self.flush_wanted = true;
        index
    }

    /// Starts writing the next batch if none is in flight.
    pub(crate) fn flush(&mut self) {
        let blocked = !self.writer.ready() || self.installing.is_some() || !self.is_serving();
        if blocked || self.log.written >= self.log.last_index() {
            return;
        }
        let (op, added) = self.writer.start_batch(&self.log, &self.cfg.limits);
        self.snapshots.log_bytes += added;
        self.issue(op, Purpose::Batch);
        // The same entries go to the followers now, so their fsyncs overlap the leader's.
        if self.is_leader() {
            self.replicate_all();
        }
    }

    fn on_batch_io(&mut self, result: Result<IoReply, DiskError>) {
        let early = self.cfg.mutation(|m| m.ack_before_fsync)
            || (!self.is_leader() && self.cfg.mutation(|m| m.follower_ack_before_fsync));
        match self.writer.on_batch_io(result, early, &mut self.log) {
            BatchStep::Next { op, early } => {
                if let Some(valid) = early {
                    self.durable = self.durable.max(valid);
                    self.on_durable();
                }
                self.issue(op, Purpose::Batch);
            }
            BatchStep::Durable(valid) => self.finish_batch(valid),
            BatchStep::NoSpace { op, first } => {
                self.issue(op, Purpose::Repair);
                // Alone, a write that found the disk full is refused; in a cluster the entries
                // may already be on the followers, so it is tried again a little later.
                if self.is_lone_voter() {
                    self.refuse_unwritten(first);
                } else {
                    self.writer.retry_after(self.now.mono.saturating_add(self.tick()));
                }
            }
            BatchStep::Failed { file, reason } => self.stop(Fatal::DiskFailed { file, reason }),
        }
    }

    /// The batch is durable: it counts towards commit, and the next one starts.
    fn finish_batch(&mut self, valid: Index) {
        self.durable = self.durable.max(valid);
        self.start_cut();
        self.on_durable();
        self.maybe_snapshot();
        self.flush();
    }

    /// More of the log is durable here: the leader may commit, a follower acknowledges.
    fn on_durable(&mut self) {
        if self.is_leader() {
            self.advance_commit();
        } else {
            self.acknowledge();
        }
        self.apply_committed();
    }

    /// The disk was full and this replica is alone: it refuses the batch and everything
    /// proposed after it (every request gets `DiskFull`), as nothing else can have seen those
    /// entries. (In a cluster the entries may already be on the followers and may commit
    /// there, so nothing is refused: the writer tries again a little later.)
    fn refuse_unwritten(&mut self, first: Index) {
        let dropped: Vec<Entry> =
            (first.0..=self.log.last_index().0).filter_map(|i| self.log.entry(Index(i)).cloned()).collect();
        self.log.truncate(first);
        for e in &dropped {
            self.repeater.settle(&e.command);
            if let Some((client, seq)) = self.proposed.remove(&e.index) {
                if self.waiting.get(&client) == Some(&seq) {
                    self.waiting.remove(&client);
                }
                self.outputs.push_back(Output::refuse(client, seq, RequestError::DiskFull));
            }
        }
    }

    /// Drops entries from `from` on from the in-memory log (a new leader overrode them) and
    /// arranges for the disk to be cut back once no write is in flight.
    pub(crate) fn truncate_log(&mut self, from: Index) {
        assert!(from > self.commit, "a committed entry is never overridden");
        self.log.truncate(from);
        self.durable = self.durable.min(from.prev());
        self.writer.truncated(from, &self.log);
        self.start_cut();
    }

    /// Starts a pending cut once no batch is in flight.
    fn start_cut(&mut self) {
        match self.writer.start_cut(&self.log) {
            CutStart::Idle => {}
            CutStart::Unwritten => self.flush(),
            CutStart::Begun => self.next_cut_op(),
        }
    }

    pub(crate) fn next_cut_op(&mut self) {
        match self.writer.next_cut_op(&mut self.log) {
            Some(op) => self.issue(op, Purpose::Cut),
            None => {
                self.start_cut();
                self.flush();
            }
        }
    }

    fn on_cut_io(&mut self, result: Result<IoReply, DiskError>) {
        match result {
            Ok(_) | Err(DiskError::NotFound) => self.next_cut_op(),
            Err(e) => self.stop(Fatal::DiskFailed { file: "(log cut)".into(), reason: e.to_string() }),
        }
    }

    /// Applies what is committed and durable here. The leader answers the clients whose
    /// requests it proposed, and pushes taken sessions to their handlers.
    pub(crate) fn apply_committed(&mut self) {
        let upto = self.commit.min(self.durable);
        let mut slots_finished = false;
        let mut members_applied = false;
        // While the ledger's writes lag too far behind, applying waits for them (see `ledger.rs`).
        while self.state.applied() < upto && !self.ledger.backlogged() {
            let index = self.state.applied().next();
            let entry = self.log.entry(index).expect("an uncompacted entry is held");
            // Only the leader that proposed a take pushes its sessions out. A later leader
            // applying an older take must not push them again: its proposer may have, and if
            // not, the delivery lease runs out and the session is stored and taken anew.
            let pushes =
                entry.term == self.term() && self.runs_repeater() || self.cfg.mutation(|m| m.follower_runs_repeater);
            self.repeater.settle(&entry.command);
            let env = MutationEnv { rng: &mut self.rng, wall: self.now.wall };
            let delivering_before = self.state.delivering_total();
            let finished_by_handler = matches!(entry.command, Command::Client { .. } | Command::Commit { .. });
            members_applied |= matches!(entry.command, Command::Members { .. });
            let mut audit = audit_of(entry);
            if self.cfg.mutation(|m| m.ledger_local_clock) {
                audit.at = self.now.wall;
            }
            let (term, entry_index) = (entry.term, entry.index);
            let local = self.cfg.mutation(|m| m.apply_local_config).then_some(&self.local_config);
            let mut applied = self.state.apply(entry, &self.cfg.mutations, local, env);
            let events = std::mem::take(&mut applied.events);
            self.ledger.append(Record::of(&LedgerEntry { index: entry_index, term, audit, events }));
            slots_finished |= finished_by_handler && self.state.delivering_total() < delivering_before;
            if let Some((client, seq, outcome)) = applied.reply {
                if self.proposed.remove(&index) == Some((client, seq)) {
                    if self.waiting.get(&client) == Some(&seq) {
                        self.waiting.remove(&client);
                    }
                    self.outputs.push_back(Output::Reply { client, seq, outcome });
                }
            }
            if !pushes {
                continue;
            }
            for (handle, due, taken_at) in applied.deliveries {
                let s = self.state.session(handle.session).expect("a taken session exists");
                let records = s.records.clone();
                let (kind, take_index) = (s.kind, index);
                self.outputs.push_back(Output::Deliver { kind, handle, due, taken_at, take_index, records });
            }
        }
        self.after_apply_sources();
        if members_applied {
            // A removal applied here: its member is no longer replicated to.
            self.sync_progress();
        }
        self.notice_config();
        self.ledger_step();
        if self.streams.len() > 0 {
            self.with_streams(|s, c| s.pump(c));
        }
        self.settle_read_throughs();
        if self.reads.len() > 0 {
            self.serve_reads();
        }
        self.serve_local_reads();
        // Handlers finished deliveries (deleted or stored their sessions): fill the slots now
        // rather than at the next repeater tick, so that a kind with due sessions waiting keeps
        // its handlers busy. Slots freed by failures wait for the tick: a handler that is down
        // fails in microseconds, and refilling at once would run the whole due queue into
        // backoff (and the dead-letter set) in a burst instead of at the tick's pace.
        if slots_finished {
            self.take_due();
        }
    }

    /// Tells the operator, once per version, where this node's own kinds and applied limits
    /// differ from the replicated configuration it follows.
    pub(crate) fn notice_config(&mut self) {
        let config = self.state.config();
        if config.version == self.config_noticed {
            return;
        }
        self.config_noticed = config.version;
        let differences = config.differences(&self.local_config.kinds, &self.local_config.limits);
        if !differences.is_empty() {
            self.outputs.push_back(Output::ConfigDiffers { version: config.version, differences });
        }
    }

    /// Proposes a take of due sessions for the free handler slots, if this replica leads and
    /// the log has room.
    fn take_due(&mut self) {
        if !self.is_serving() || !self.runs_repeater() || self.uncommitted_full() {
            return;
        }
        let (files, state) = (&self.files, &self.state);
        let records = |id| files.records(state, id);
        let rules = Rules::new(&self.state.config, &self.cfg.mutations);
        let limits = &self.cfg.limits;
        if let Some(c) = self.repeater.plan_take(&self.state, self.now.wall, &rules, limits, &records) {
            self.propose(c);
        }
    }

    // ---- the ledger ----------------------------------------------------------------------------

    /// Hands the ledger's next disk work out, and renames a waiting snapshot into place once the
    /// ledger is durable through it.
    pub(crate) fn ledger_step(&mut self) {
        if !self.is_serving() {
            return;
        }
        if let Some((index, _)) = &self.snapshot_rename {
            if self.ledger.durable() >= *index {
                let (_, op) = self.snapshot_rename.take().expect("checked");
                self.issue(op, Purpose::Snapshot);
            }
        }
        let generation = self.ledger_generation;
        match self.ledger.step(self.now.wall.0) {
            Some(LedgerIo::Write(op)) => self.issue(op, Purpose::LedgerWrite(generation)),
            Some(LedgerIo::Sync(ops)) => ops.into_iter().for_each(|op| self.issue(op, Purpose::LedgerSync(generation))),
            Some(LedgerIo::Repair(op)) => self.issue(op, Purpose::LedgerRepair(generation)),
            None => {}
        }
    }

    /// An installed snapshot at `index` replaced the state: the ledger starts over after it
    /// (the entries before it were never applied here), and its old files go.
    pub(crate) fn restart_ledger(&mut self, index: Index) {
        self.ledger_generation += 1;
        self.ledger_retry_at = None;
        let old = self.ledger.reset(index);
        self.remove_files(old);
        // Readers behind the snapshot learn it was compacted away (watchers resync).
        self.with_streams(|s, c| s.pump(c));
    }

    // ---- streams -----------------------------------------------------------------------------

    fn on_stream_open(&mut self, stream: StreamId, open: StreamOpen) {
        let refusal = if self.is_stopped() {
            Some(StreamError::Stopped)
        } else if !self.is_serving() {
            Some(StreamError::NotReady)
        } else {
            None
        };
        if let Some(error) = refusal {
            self.outputs.push_back(Output::Stream { stream, seq: 1, item: StreamItem::End(error) });
            return;
        }
        if self.streams.len() == 0 {
            self.streams_tick = self.now.mono.saturating_add(Duration(self.cfg.limits.progress_every_ms));
        }
        self.with_streams(|s, c| s.open(stream, open, c));
    }

    /// Runs `f` over the streams with what they need of the engine, and issues the reads they
    /// ask for.
    fn with_streams(&mut self, f: impl FnOnce(&mut Streams, &mut Ctx)) {
        let mut reads = Vec::new();
        // Before the bootstrap applied every kind is let through: the configuration decides.
        let config = self.state.config();
        let known = |k: crate::types::Kind| config.version == 0 || config.kinds.contains_key(&k);
        let mut ctx = Ctx {
            ledger: &self.ledger,
            limits: &self.cfg.limits,
            cfg: &self.cfg,
            now: self.now.mono,
            log_last: self.log.last_index(),
            newest_snapshot: self.snapshots.newest(),
            kinds_known: &known,
            out: &mut self.outputs,
            reads: &mut reads,
        };
        f(&mut self.streams, &mut ctx);
        for (stream, token, op) in reads {
            self.issue(op, Purpose::StreamRead(stream, token));
        }
        if !self.deferred.is_empty() {
            // A resync may have finished with the files it kept from removal.
            self.clean_up();
        }
    }

    fn on_ledger_io(&mut self, purpose: Purpose, result: Result<IoReply, DiskError>) {
        let stale = |g: u64| g != self.ledger_generation;
        let outcome = match purpose {
            Purpose::LedgerWrite(g) if !stale(g) => match self.ledger.on_write(result) {
                Ok(Some(LedgerIo::Repair(op))) => {
                    self.issue(op, Purpose::LedgerRepair(g));
                    // Like the log in a cluster: the write is tried again a little later.
                    self.ledger_retry_at = Some(self.now.mono.saturating_add(self.tick()));
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            },
            Purpose::LedgerSync(g) if !stale(g) => self.ledger.on_sync(result),
            Purpose::LedgerRepair(g) if !stale(g) => self.ledger.on_repair(result),
            _ => return,
        };
        if let Err(e) = outcome {
            // Like a failed log fsync: what the disk holds is unknown, so the replica stops and
            // recovers from what is there.
            self.stop(Fatal::DiskFailed { file: "(ledger)".into(), reason: e.to_string() });
            return;
        }
        self.ledger_step();
        // Applying may have waited for the ledger's writes.
        self.apply_committed();
    }

    // ---- snapshots -------------------------------------------------------------------------

    fn maybe_snapshot(&mut self) {
        let applied = self.state.applied();
        let limits = &self.cfg.limits;
        let due = self.snapshots.due(applied, limits.snapshot_every_entries, limits.snapshot_log_bytes_max);
        let recoverable = self.files.snapshot_allowed(&self.state);
        if due && recoverable && self.installing.is_none() && applied <= self.log.written {
            let term = self.log.term_at(applied).expect("the applied entry is held");
            let op = self.snapshots.start(&self.state, term);
            self.issue(op, Purpose::Snapshot);
        }
    }

    fn on_snapshot_io(&mut self, result: Result<IoReply, DiskError>) {
        match self.snapshots.on_io(result) {
            SnapStep::Io(op) => self.issue(op, Purpose::Snapshot),
            SnapStep::Rename { index, op } => {
                self.ledger.want_durable(index);
                self.snapshot_rename = Some((index, op));
                self.ledger_step();
            }
            SnapStep::Finished { index, obsolete } => {
                self.cleanup.extend(obsolete);
                self.cleanup.extend(self.files.removable(index));
                // The ledger keeps every entry after the newest snapshot, and after the snapshot
                // any watcher's resync reads (its changes follow from there).
                let keep_after = self.streams.oldest_resync().map_or(index, |r| r.min(index));
                let expired = self.ledger.expired(keep_after, self.now.wall.0);
                self.cleanup.extend(expired);
                if self.installing.as_ref().is_some_and(|i| i.index == index) {
                    self.installed();
                } else {
                    let covered = self.log.covered_by(index);
                    self.log.forget(&covered);
                    self.log.compact(index);
                    self.cleanup.extend(covered);
                }
                self.clean_up();
            }
            SnapStep::Abandoned { tmp } => {
                self.installing = None;
                self.cleanup.push_back(tmp);
                self.clean_up();
            }
        }
    }

    pub(crate) fn remove_files(&mut self, files: Vec<String>) {
        self.cleanup.extend(files);
        self.clean_up();
    }

    /// Issues queued removals, a few at a time.
    /// Issues queued removals, a few at a time. A file a watcher's resync reads is kept until it
    /// is done with it (see `resync.rs`).
    fn clean_up(&mut self) {
        let pinned: BTreeSet<String> = self.streams.pinned().map(str::to_string).collect();
        let (kept, free): (Vec<String>, Vec<String>) =
            std::mem::take(&mut self.deferred).into_iter().partition(|f| pinned.contains(f));
        self.deferred = kept;
        self.cleanup.extend(free);
        while self.cleanup_inflight < CLEANUP_INFLIGHT_MAX {
            let Some(file) = self.cleanup.pop_front() else { return };
            if pinned.contains(&file) {
                self.deferred.push(file);
                continue;
            }
            self.cleanup_inflight += 1;
            self.issue(IoOp::Remove { file }, Purpose::Cleanup);
        }
    }

    // ---- invariants ------------------------------------------------------------------------

    /// Checked after every input, in release builds too.
    pub fn invariants(&self) {
        self.state.invariants();
        self.files.invariants(&self.cfg);
        if matches!(self.phase, Phase::Serving) {
            self.files.covers(&self.state);
        }
        self.log.invariants();
        if self.is_serving() {
            self.ledger.invariants();
        }
        let session_bytes_max =
            self.state.config().kinds.values().map(|k| k.session_bytes_max as u64).max().unwrap_or(0);
        self.streams.invariants(&self.cfg.limits, session_bytes_max);
        let early = self.cfg.mutation(|m| m.ack_before_fsync || m.follower_ack_before_fsync);
        if !early {
            assert!(self.durable <= self.log.written, "durable entries are written");
        }
        assert!(self.state.applied() <= self.commit.min(self.durable), "only committed, durable entries are applied");
        assert!(self.durable <= self.log.last_index(), "durable entries are held");
        self.writer.invariants(&self.log, &self.cfg.limits);
        assert!(self.commit <= self.log.last_index() || self.installing.is_some(), "committed entries are held");
        if let Some(i) = &self.installing {
            assert!(i.pending_bytes <= self.cfg.consensus.inflight_bytes_max, "entries kept during an install bounded");
            assert!(
                i.pending.iter().zip(1..).all(|(e, n)| e.index == Index(i.index.0 + n)),
                "kept entries follow the snapshot"
            );
        }
        assert!(self.proposed.len() <= self.cfg.limits.pending_requests_max as usize, "pending requests bounded");
        assert!(self.waiting.len() <= self.proposed.len(), "waiting clients have pending requests");
        assert!(self.io_pending.len() <= IO_PENDING_MAX, "outstanding disk operations bounded");
        assert!(self.held.len() <= self.cfg.consensus.held_messages_max as usize, "held messages bounded");
        assert!(self.reads.local_len() <= self.cfg.limits.pending_requests_max as usize, "a learner's reads bounded");
        if let Role::Leader { progress } = &self.role {
            assert_eq!(self.leader, Some(self.me), "a leader knows it leads");
            assert_eq!(progress.len(), self.peers().len(), "a leader tracks every other member");
            let applied = &self.state.config().members;
            let member = |id: &ReplicaId| self.members().contains_key(id) || applied.contains_key(id);
            assert!(progress.keys().all(member), "a leader tracks members only");
        }
    }
}

/// The audit part of an entry's ledger record: what the leader wrote into it.
fn audit_of(entry: &Entry) -> Audit {
    match &entry.command {
        Command::Client { client, seq, request, principal, .. } => Audit {
            at: entry.at,
            client: Some(*client),
            seq: Some(*seq),
            attempt: request.handle().map(|h| h.attempt),
            principal: principal.clone(),
        },
        Command::Commit { client, seq, principal, .. } | Command::Members { client, seq, principal, .. } => {
            Audit { at: entry.at, client: Some(*client), seq: Some(*seq), attempt: None, principal: principal.clone() }
        }
        _ => Audit { at: entry.at, ..Audit::default() },
    }
}
