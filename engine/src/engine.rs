//! The engine: one replica's whole behaviour behind `handle(now, input)` / `poll()`.
//!
//! Client requests become log entries in a queue. While one batch is being written and fsynced,
//! new entries wait; when it is durable the next batch takes everything waiting (group commit:
//! one write and one fsync per batch, and a batch of one goes out at once under low load).
//! Entries are applied, and their replies released, only after the fsync that covers them.

use crate::config::EngineConfig;
use crate::error::{Fatal, RequestError};
use crate::io::{DiskError, Input, IoId, IoOp, IoReply, Output};
use crate::log::{Log, Placement};
use crate::op::{Command, Entry, Query, QueryReply, Request, StatusView};
use crate::recovery::{Recovery, Step};
use crate::repeater::{draw_due, Repeater};
use crate::sessions::{MutationEnv, StateMachine};
use crate::snapshot::{SnapStep, Snapshotter};
use crate::types::{ClientId, Duration, Handle, Instant, Now, Seq, Term, UnixMs};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, VecDeque};

enum Phase {
    Created,
    Recovering(Box<Recovery>),
    Serving,
    Stopped,
}

/// What a disk operation was issued for, so its completion goes to the right place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Recovery,
    Batch,
    /// Cutting a failed write's leftovers off before the log is written again.
    Repair,
    Snapshot,
    Cleanup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BatchStage {
    Write,
    Sync,
    SyncDir,
}

/// The batch being made durable.
struct Batch {
    entries: Vec<Entry>,
    placement: Placement,
    stage: BatchStage,
    /// Set when entries were applied early (only under the `ack-before-fsync` mutation).
    applied_early: bool,
}

/// An entry waiting for a batch: its index is assigned when the batch is formed.
struct Pending {
    at: UnixMs,
    command: Command,
}

pub struct Engine {
    cfg: EngineConfig,
    rng: ChaCha8Rng,
    now: Now,
    phase: Phase,
    term: Term,
    state: StateMachine,
    log: Log,
    queue: VecDeque<Pending>,
    batch: Option<Batch>,
    /// The latest request of each client that is in the queue or the batch, so that a retry
    /// waits for the original's answer. Clients keep one request outstanding at a time.
    waiting: BTreeMap<ClientId, Seq>,
    /// Client requests in the queue or the batch (a client that pipelines counts each one).
    pending_requests: usize,
    /// Files to remove after a snapshot, issued a few at a time to keep outstanding IO bounded.
    cleanup: VecDeque<String>,
    cleanup_inflight: usize,
    /// A failed write's leftovers are being cut off; nothing is written until that is done.
    repairing: bool,
    repeater: Repeater,
    snapshots: Snapshotter,
    io_next: u64,
    io_pending: BTreeMap<IoId, Purpose>,
    outputs: VecDeque<Output>,
    next_tick: Instant,
}

/// Disk operations outstanding at once: one recovery or batch step, one snapshot step, and a
/// handful of removals.
const IO_PENDING_MAX: usize = 64;
const CLEANUP_INFLIGHT_MAX: usize = 8;

impl Engine {
    /// A replica that has not booted yet. Every random choice it makes comes from `seed`.
    pub fn new(cfg: EngineConfig, seed: u64) -> Engine {
        Engine {
            cfg,
            rng: ChaCha8Rng::seed_from_u64(seed),
            now: Now::default(),
            phase: Phase::Created,
            term: Term(1),
            state: StateMachine::default(),
            log: Log::default(),
            queue: VecDeque::new(),
            batch: None,
            waiting: BTreeMap::new(),
            pending_requests: 0,
            cleanup: VecDeque::new(),
            cleanup_inflight: 0,
            repairing: false,
            repeater: Repeater::default(),
            snapshots: Snapshotter::default(),
            io_next: 0,
            io_pending: BTreeMap::new(),
            outputs: VecDeque::new(),
            next_tick: Instant(0),
        }
    }

    /// Feeds one input. Outputs it causes are collected by [`Engine::poll`].
    pub fn handle(&mut self, now: Now, input: Input) {
        assert!(now.mono >= self.now.mono, "monotonic time never goes backwards");
        self.now = now;
        match input {
            Input::Boot => self.boot(),
            Input::Request { client, seq, request } => self.on_request(client, seq, request),
            Input::Query { id, query } => self.on_query(id, query),
            Input::IoDone { id, result } => self.on_io(id, result),
            Input::DeliveryFailed { handle } => self.on_delivery_failed(handle),
            Input::Tick => self.on_tick(),
        }
        self.invariants();
    }

    /// The next output, until there are none.
    pub fn poll(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When the engine next wants an [`Input::Tick`], if it has timed work at all.
    pub fn next_deadline(&self) -> Option<Instant> {
        let has_work = !self.state.sessions.is_empty();
        (matches!(self.phase, Phase::Serving) && has_work).then_some(self.next_tick)
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

    /// Nothing queued, nothing being written, no disk operation outstanding: every request
    /// received has been answered. A driver shutting down waits for this.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.batch.is_none() && self.io_pending.is_empty() && self.cleanup.is_empty()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    fn issue(&mut self, op: IoOp, purpose: Purpose) {
        let id = IoId(self.io_next);
        self.io_next += 1;
        self.io_pending.insert(id, purpose);
        self.outputs.push_back(Output::Io { id, op });
    }

    fn stop(&mut self, fatal: Fatal) {
        self.phase = Phase::Stopped;
        self.queue.clear();
        self.waiting.clear();
        self.pending_requests = 0;
        self.outputs.push_back(Output::Stopped(fatal));
    }

    // ---- recovery -------------------------------------------------------------------------

    fn boot(&mut self) {
        assert!(matches!(self.phase, Phase::Created), "Boot is the first input, and only once");
        let sync_recovered = !self.cfg.mutation(|m| m.skip_recovery_fsync);
        let (recovery, step) = Recovery::start(self.cfg.limits.read_retries_max, sync_recovered);
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
                self.term = r.term;
                self.snapshots = Snapshotter::recovered(r.snapshot, r.snapshots);
                self.phase = Phase::Serving;
                self.next_tick = self.now.mono.saturating_add(self.tick());
                self.state.full_invariants();
                self.outputs.push_back(Output::Recovered {
                    applied: self.state.applied(),
                    state_hash: self.state.state_hash(),
                    torn_bytes: r.torn_bytes,
                });
            }
        }
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
                let cfg = self.cfg.clone();
                let step = r.on_io(result, &cfg, &mut MutationEnv { rng: &mut self.rng, wall: self.now.wall });
                self.phase = Phase::Recovering(r);
                self.recovery_step(step);
            }
            Purpose::Batch => self.on_batch_io(result),
            Purpose::Repair => match result {
                Ok(_) | Err(DiskError::NotFound) => {
                    self.repairing = false;
                    self.flush();
                }
                Err(e) => self.stop(Fatal::DiskFailed {
                    file: "(log tail)".into(),
                    reason: format!("cannot cut off a failed write: {e}"),
                }),
            },
            Purpose::Snapshot => self.on_snapshot_io(result),
            // A removal that failed leaves a file that the next recovery removes.
            Purpose::Cleanup => {
                self.cleanup_inflight -= 1;
                self.clean_up();
            }
        }
    }

    // ---- requests -------------------------------------------------------------------------

    fn on_request(&mut self, client: ClientId, seq: Seq, request: Request) {
        if !self.is_serving() {
            let e = if self.is_stopped() {
                RequestError::Stopped("see the replica's log".into())
            } else {
                RequestError::NotReady
            };
            self.outputs.push_back(Output::refuse(client, seq, e));
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
        if self.pending_requests >= max as usize {
            self.outputs.push_back(Output::refuse(client, seq, RequestError::Overloaded { max }));
            return;
        }
        let due = match &request {
            Request::Store { handle, timeout_s } => {
                let kind = self.state.session(handle.session).map(|s| s.kind);
                let kc = kind.and_then(|k| self.cfg.kind(k)).cloned();
                Some(draw_due(self.now.wall, *timeout_s, kc.as_ref(), &mut self.rng))
            }
            _ => None,
        };
        self.waiting.insert(client, seq);
        self.pending_requests += 1;
        self.propose(Command::Client { client, seq, request, due });
    }

    /// Refusals that need no log entry: limits fixed by configuration. The same checks are made
    /// again at apply time, which is what every replica agrees on.
    fn precheck(&self, request: &Request) -> Result<(), RequestError> {
        let kind = match request {
            Request::New { kind, .. } => Some(*kind),
            other => other.handle().and_then(|h| self.state.session(h.session)).map(|s| s.kind),
        };
        let Some(kind) = kind else { return Ok(()) };
        let kc = self.cfg.kind(kind).ok_or(RequestError::UnknownKind(kind))?;
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
            Query::Session(sid) => QueryReply::Session(self.state.session_view(sid)),
            Query::Status => {
                let (active, stored) = self.state.sessions_count();
                QueryReply::Status(StatusView {
                    serving: self.is_serving(),
                    applied: self.state.applied(),
                    durable: self.log.last_index,
                    sessions_active: active,
                    sessions_stored: stored,
                    state_hash: self.state.state_hash(),
                })
            }
        };
        self.outputs.push_back(Output::QueryReply { id, reply });
    }

    fn on_delivery_failed(&mut self, handle: Handle) {
        // With the queue full the report is dropped: the delivery's lease runs out and the
        // session is stored all the same, only later.
        if !self.is_serving() || self.queue.len() >= self.cfg.limits.pending_requests_max as usize {
            return;
        }
        let Some(session) = self.state.session(handle.session) else { return };
        let kc = self.cfg.kind(session.kind).cloned();
        let delay = kc.as_ref().map_or(60, |k| k.default_delay_s);
        let due = draw_due(self.now.wall, delay, kc.as_ref(), &mut self.rng);
        self.propose(Command::DeliveryFailed { handle, due });
    }

    fn tick(&self) -> Duration {
        Duration(self.cfg.limits.repeater_tick_ms)
    }

    fn on_tick(&mut self) {
        if !self.is_serving() || self.now.mono < self.next_tick {
            return;
        }
        self.next_tick = self.now.mono.saturating_add(self.tick());
        // Internal proposals wait while the queue is full of client work.
        if self.queue.len() >= self.cfg.limits.pending_requests_max as usize {
            return;
        }
        let wall = self.now.wall;
        if let Some(c) = self.repeater.plan_expire(&self.state, wall, &self.cfg, &mut self.rng) {
            self.propose(c);
        }
        if let Some(c) = self.repeater.plan_take(&self.state, wall, &self.cfg) {
            self.propose(c);
        }
    }

    // ---- the log: group commit -------------------------------------------------------------

    fn propose(&mut self, command: Command) {
        self.queue.push_back(Pending { at: self.now.wall, command });
        self.flush();
    }

    /// Starts writing the next batch if none is in flight.
    fn flush(&mut self) {
        if self.batch.is_some() || self.repairing || self.queue.is_empty() || !self.is_serving() {
            return;
        }
        let limits = &self.cfg.limits;
        let mut entries: Vec<Entry> = Vec::new();
        let mut bytes = 0usize;
        let mut index = self.log.last_index;
        while let Some(p) = self.queue.front() {
            let len = crate::codec::encoded_len(p.at, &p.command);
            let full =
                entries.len() >= limits.batch_entries_max as usize || bytes + len > limits.batch_bytes_max as usize;
            if full && !entries.is_empty() {
                break;
            }
            let p = self.queue.pop_front().expect("front exists");
            bytes += len;
            index = index.next();
            entries.push(Entry { term: self.term, index, at: p.at, command: p.command });
        }
        let (placement, data) = self.log.place(&entries, limits.segment_bytes_max);
        let op = IoOp::Write { file: placement.file.clone(), offset: placement.offset, data };
        self.batch = Some(Batch { entries, placement, stage: BatchStage::Write, applied_early: false });
        self.issue(op, Purpose::Batch);
    }

    fn on_batch_io(&mut self, result: Result<IoReply, DiskError>) {
        let batch = self.batch.as_mut().expect("batch IO completes only with a batch in flight");
        let file = batch.placement.file.clone();
        match (batch.stage, result) {
            (BatchStage::Write, Ok(_)) => {
                batch.stage = BatchStage::Sync;
                if self.cfg.mutation(|m| m.ack_before_fsync) {
                    let entries = std::mem::take(&mut batch.entries);
                    batch.applied_early = true;
                    self.apply_entries(&entries);
                    self.batch.as_mut().expect("still in flight").entries = entries;
                }
                self.issue(IoOp::Sync { file }, Purpose::Batch);
            }
            (BatchStage::Write, Err(DiskError::NoSpace)) => self.fail_batch(),
            (BatchStage::Sync, Ok(_)) if batch.placement.new_segment => {
                batch.stage = BatchStage::SyncDir;
                self.issue(IoOp::SyncDir, Purpose::Batch);
            }
            (BatchStage::Sync | BatchStage::SyncDir, Ok(_)) => self.finish_batch(),
            (stage, Err(e)) => {
                // After a failed fsync the kernel may have dropped the dirty pages: what is on
                // disk is unknown, so the only safe move is to stop and recover from the disk.
                let reason = format!("{stage:?} failed: {e}");
                self.stop(Fatal::DiskFailed { file, reason });
            }
        }
    }

    /// The batch is durable: apply it, answer its clients, and start the next one.
    fn finish_batch(&mut self) {
        let batch = self.batch.take().expect("a batch in flight");
        let last = batch.entries.last().expect("batches are never empty").index;
        self.log.commit(&batch.placement, last);
        if !batch.applied_early {
            self.apply_entries(&batch.entries);
        }
        self.maybe_snapshot();
        self.flush();
    }

    /// The disk was full: the batch is refused (every request in it gets `DiskFull`) and the log
    /// stays where it was. A short write may have left part of the batch behind; it is cut off
    /// before anything else is written, so that later records never sit after leftovers that
    /// would look like damage.
    fn fail_batch(&mut self) {
        let batch = self.batch.take().expect("a batch in flight");
        let p = &batch.placement;
        let len = if p.new_segment { 0 } else { p.offset };
        self.repairing = true;
        self.issue(IoOp::Truncate { file: p.file.clone(), len }, Purpose::Repair);
        for e in &batch.entries {
            self.repeater.settle(&e.command);
            if let Command::Client { client, seq, .. } = e.command {
                if self.waiting.get(&client) == Some(&seq) {
                    self.waiting.remove(&client);
                }
                self.pending_requests -= 1;
                self.outputs.push_back(Output::refuse(client, seq, RequestError::DiskFull));
            }
        }
        self.flush();
    }

    fn apply_entries(&mut self, entries: &[Entry]) {
        for e in entries {
            self.repeater.settle(&e.command);
            let env = MutationEnv { rng: &mut self.rng, wall: self.now.wall };
            let applied = self.state.apply(e, &self.cfg, env);
            if let Some((client, seq, outcome)) = applied.reply {
                if self.waiting.get(&client) == Some(&seq) {
                    self.waiting.remove(&client);
                }
                self.pending_requests -= 1;
                self.outputs.push_back(Output::Reply { client, seq, outcome });
            }
            for (handle, due, taken_at) in applied.deliveries {
                let s = self.state.session(handle.session).expect("a taken session exists");
                let records = s.records.clone();
                self.outputs.push_back(Output::Deliver { kind: s.kind, handle, due, taken_at, records });
            }
        }
    }

    // ---- snapshots -------------------------------------------------------------------------

    fn maybe_snapshot(&mut self) {
        let applied = self.state.applied();
        if self.snapshots.due(applied, self.cfg.limits.snapshot_every_entries) && applied <= self.log.last_index {
            let op = self.snapshots.start(&self.state, self.term);
            self.issue(op, Purpose::Snapshot);
        }
    }

    fn on_snapshot_io(&mut self, result: Result<IoReply, DiskError>) {
        match self.snapshots.on_io(result) {
            SnapStep::Io(op) => self.issue(op, Purpose::Snapshot),
            SnapStep::Finished { index, obsolete } => {
                let covered = self.log.covered_by(index);
                self.log.forget(&covered);
                self.cleanup.extend(obsolete.into_iter().chain(covered));
                self.clean_up();
            }
            SnapStep::Abandoned { tmp } => {
                self.cleanup.push_back(tmp);
                self.clean_up();
            }
        }
    }

    /// Issues queued removals, a few at a time.
    fn clean_up(&mut self) {
        while self.cleanup_inflight < CLEANUP_INFLIGHT_MAX {
            let Some(file) = self.cleanup.pop_front() else { return };
            self.cleanup_inflight += 1;
            self.issue(IoOp::Remove { file }, Purpose::Cleanup);
        }
    }

    // ---- invariants ------------------------------------------------------------------------

    /// Checked after every input, in release builds too.
    pub fn invariants(&self) {
        self.state.invariants();
        if !self.cfg.mutation(|m| m.ack_before_fsync) {
            assert!(self.state.applied() <= self.log.last_index, "nothing is applied before it is durable");
        }
        assert!(self.pending_requests <= self.cfg.limits.pending_requests_max as usize, "pending requests bounded");
        assert!(self.waiting.len() <= self.pending_requests, "waiting clients have pending requests");
        assert!(self.queue.len() <= self.cfg.limits.pending_requests_max as usize + 2, "queue bounded");
        assert!(self.io_pending.len() <= IO_PENDING_MAX, "outstanding disk operations bounded");
        if let Some(b) = &self.batch {
            assert!(!b.entries.is_empty() && b.entries.len() <= self.cfg.limits.batch_entries_max as usize);
            assert_eq!(b.entries[0].index, self.log.last_index.next(), "the batch continues the durable log");
        }
    }
}
