//! The replicated session state machine: what applying a committed entry does.
//!
//! Applying is a pure function of (state, entry): no clock, no randomness. Everything that could
//! vary between replicas (the proposer's wall clock, jitter draws) is inside the entry.
//! Refusals are decided here, at apply time, so every replica refuses the same requests; a
//! refused request changes nothing but the deduplication table, which remembers the answer.

mod apply;
mod commit;

use crate::config::{ClusterConfig, Rules};
use crate::consumers::ConsumerState;
use crate::error::RequestError;
use crate::events::{BriefStatus, Event, SessionBrief, What};
use crate::hash::{digest, StateHash};
use crate::op::{
    DeadPage, DeadView, Entry, FailureReason, Outcome, Reply, SessionState, SessionView, UnixSecs, Unspilled,
};
use crate::stored::{InOrder, Sources, MEMTABLE_SESSION_OVERHEAD_BYTES};
use crate::types::{Attempt, ClientId, Handle, Index, Kind, Seq, SessionId, SourceId, UnixMs};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Status {
    /// Held by whoever has the current handle; stored automatically once the lease runs out.
    Active { lease_until: UnixMs, delivering: bool },
    /// Waiting for redelivery; `stored_at` (the store's index) orders sessions due in one second.
    Stored { due: UnixSecs, stored_at: Index },
    /// In the kind's dead-letter set since the entry at `since`: its deliveries failed the kind's
    /// max attempts in a row. Nothing happens to it until an operator redrives it.
    Dead { since: Index },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Session {
    pub kind: Kind,
    pub attempt: Attempt,
    #[serde(with = "crate::op::records_serde")]
    pub records: Vec<Vec<u8>>,
    pub bytes: u64,
    pub status: Status,
    /// Failed deliveries in a row (cleared when a handler stores the session or it is redriven).
    pub failures: u32,
    pub last_failure: Option<FailureReason>,
    /// Chained hash of the records since the last replace, so the state hash is O(1) to update.
    pub records_hash: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DedupEntry {
    pub seq: Seq,
    pub outcome: Outcome,
    pub last_index: Index,
}

/// What applying an entry produced, for the engine to turn into outputs.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// The answer to a client request, if the entry was one.
    pub reply: Option<(ClientId, Seq, Outcome)>,
    /// Sessions taken for delivery, with the repeat time each was taken for and the clock
    /// reading the take was decided at: the engine pushes them to their handlers.
    pub deliveries: Vec<(Handle, UnixSecs, UnixMs)>,
    /// What the entry did, for the ledger (at least one event per entry).
    pub events: Vec<Event>,
}

/// Values an apply may use only under the `recompute-jitter` mutation, which models a replica
/// that wrongly recomputes a repeat time instead of reading it from the entry.
pub(crate) struct MutationEnv<'a> {
    pub rng: &'a mut rand_chacha::ChaCha8Rng,
    pub wall: UnixMs,
}

/// The state every replica agrees on. Snapshots hold what the indexes and the hash are derived
/// from (see `snapshot_format.rs`); the indexes marked so are rebuilt on load.
#[derive(Clone, Debug, Default)]
pub struct StateMachine {
    pub(crate) applied: Index,
    pub(crate) sessions: BTreeMap<SessionId, Session>,
    pub(crate) dedup: BTreeMap<ClientId, DedupEntry>,
    /// Deleted sessions and the index that deleted them; the oldest deletion is forgotten first.
    pub(crate) tombstones: BTreeMap<SessionId, Index>,
    /// Per kind, (due, stored_at, id) of the last session the repeater took (one entry may
    /// store several sessions, so the id breaks ties). It never goes
    /// backwards, and no session of that kind is stored with an earlier repeat time, so "due
    /// earlier goes first" holds within a kind across clock steps. (Across kinds it cannot: a
    /// kind whose handler slots are all busy waits while other kinds go on.)
    pub(crate) repeat_index: BTreeMap<Kind, (UnixSecs, Index, SessionId)>,
    /// Stored sessions spilled to source files (see `stored.rs`).
    pub(crate) sources: Sources,
    /// Consumers and their checkpoints (see `consumers.rs`).
    pub(crate) consumers: BTreeMap<String, ConsumerState>,
    /// The cluster's configuration: everything applying consults besides the state itself.
    /// Shared so that an apply can hold it while it changes the rest of the state.
    pub(crate) config: Arc<ClusterConfig>,
    /// The configuration's part of the state hash, kept with it (see `set_config`).
    pub(crate) config_digest: u64,
    // ---- derived: indexes and the hash, rebuilt from the fields above on load -------------
    /// Stored sessions held in memory (the memtable) in repeat order within each kind:
    /// (kind, due, stored_at, id). Spilled ones are in `sources`.
    pub(crate) stored: BTreeSet<(Kind, UnixSecs, Index, SessionId)>,
    /// Memory the memtable's sessions count for, per kind (records plus a fixed overhead each).
    pub(crate) memtable_bytes: BTreeMap<Kind, u64>,
    pub(crate) leases: BTreeSet<(UnixMs, SessionId)>,
    /// Dead-letter sets: (kind, since, id), oldest first within a kind.
    pub(crate) dead: BTreeSet<(Kind, Index, SessionId)>,
    pub(crate) dead_counts: BTreeMap<Kind, u64>,
    pub(crate) delivering: BTreeMap<Kind, u32>,
    pub(crate) dedup_lru: BTreeSet<(Index, ClientId)>,
    pub(crate) tombstone_order: BTreeSet<(Index, SessionId)>,
    pub(crate) hash: StateHash,
}

/// The secondary indexes and the hash: everything a snapshot leaves out and a load rebuilds.
#[derive(Default)]
struct Derived {
    stored: BTreeSet<(Kind, UnixSecs, Index, SessionId)>,
    memtable_bytes: BTreeMap<Kind, u64>,
    leases: BTreeSet<(UnixMs, SessionId)>,
    dead: BTreeSet<(Kind, Index, SessionId)>,
    dead_counts: BTreeMap<Kind, u64>,
    delivering: BTreeMap<Kind, u32>,
    dedup_lru: BTreeSet<(Index, ClientId)>,
    tombstone_order: BTreeSet<(Index, SessionId)>,
    hash: StateHash,
}

impl Session {
    pub(crate) fn digest(&self, id: SessionId) -> u64 {
        let failures = (self.failures, &self.last_failure);
        digest(
            1,
            &(id, self.kind, self.attempt, self.bytes, self.records.len(), self.records_hash, &self.status, failures),
        )
    }

    pub(crate) fn push(&mut self, record: Vec<u8>) {
        self.records_hash = xxhash_rust::xxh3::xxh3_64_with_seed(&record, self.records_hash);
        self.bytes += record.len() as u64;
        self.records.push(record);
    }

    pub(crate) fn brief(&self) -> SessionBrief {
        let status = match self.status {
            Status::Active { delivering, .. } => BriefStatus::Active { delivering },
            Status::Stored { due, .. } => BriefStatus::Stored { due },
            Status::Dead { since } => BriefStatus::Dead { since },
        };
        SessionBrief {
            status,
            attempt: self.attempt,
            failures: self.failures,
            records: self.records.len() as u32,
            bytes: self.bytes,
        }
    }

    fn view(&self, id: SessionId) -> SessionView {
        SessionView {
            id,
            kind: self.kind,
            handle: Handle { session: id, attempt: self.attempt },
            state: match self.status {
                Status::Active { lease_until, delivering } => SessionState::Active { lease_until, delivering },
                Status::Stored { due, .. } => SessionState::Stored { due },
                Status::Dead { since } => SessionState::Dead { since },
            },
            deliveries: self.attempt.0,
            failures: self.failures,
            last_failure: self.last_failure.clone(),
            records: self.records.clone(),
            bytes: self.bytes,
            source: None,
        }
    }
}

pub(crate) fn consumer_digest(name: &str, c: &ConsumerState) -> u64 {
    digest(6, &(name, c.epoch, c.through))
}

/// The configuration's part of the state hash (0 before the bootstrap, so that a state without
/// one hashes as it did before configurations were replicated).
fn config_digest(config: &ClusterConfig) -> u64 {
    match config.version {
        0 => 0,
        _ => digest(7, config),
    }
}

fn dedup_digest(client: ClientId, e: &DedupEntry) -> u64 {
    digest(2, &(client, e.seq, &e.outcome))
}

impl StateMachine {
    pub fn applied(&self) -> Index {
        self.applied
    }

    pub fn state_hash(&self) -> u64 {
        self.hash
            .value(self.applied, &self.repeat_index)
            .wrapping_add(self.sources.summary_digest())
            .wrapping_add(self.config_digest)
    }

    /// Replaces the configuration (a committed change, the bootstrap, or a snapshot's).
    pub(crate) fn set_config(&mut self, config: ClusterConfig) {
        self.config_digest = config_digest(&config);
        self.config = Arc::new(config);
    }

    /// The cluster's replicated configuration (version 0 until the bootstrap entry applied).
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    fn repeat_floor(&self, kind: Kind) -> UnixSecs {
        self.repeat_index.get(&kind).map_or(UnixSecs(0), |r| r.0)
    }

    /// Sessions (active, stored, dead); stored ones in memory and spilled alike.
    pub fn sessions_count(&self) -> (u64, u64, u64) {
        let stored = self.stored.len() as u64 + self.sources.spilled_count();
        (self.leases.len() as u64, stored, self.dead.len() as u64)
    }

    /// Stored sessions kept in source files, and how many source files the state refers to.
    pub fn spilled_count(&self) -> (u64, u64) {
        (self.sources.spilled_count(), self.sources.referenced().count() as u64)
    }

    /// Memory the memtable's stored sessions count for, per kind.
    pub(crate) fn memtable_bytes(&self) -> &BTreeMap<Kind, u64> {
        &self.memtable_bytes
    }

    /// A page of a kind's dead-letter set, oldest first, after session `after` if given (which
    /// must still be dead there: a page cannot go on from a session that was redriven meanwhile).
    pub fn dead_page(&self, kind: Kind, after: Option<SessionId>, limit: u32) -> Result<DeadPage, RequestError> {
        let from = match after {
            None => std::ops::Bound::Included((kind, Index(0), SessionId(0))),
            Some(id) => match self.sessions.get(&id) {
                Some(Session { status: Status::Dead { since }, kind: k, .. }) if *k == kind => {
                    std::ops::Bound::Excluded((kind, *since, id))
                }
                Some(_) => return Err(RequestError::NotDead(id)),
                None => return Err(self.missing(id)),
            },
        };
        let to = std::ops::Bound::Included((kind, Index(u64::MAX), SessionId(u64::MAX)));
        let sessions = self
            .dead
            .range((from, to))
            .take(limit as usize)
            .map(|(_, since, id)| {
                let s = &self.sessions[id];
                DeadView {
                    id: *id,
                    since: *since,
                    deliveries: s.attempt.0,
                    failures: s.failures,
                    last_failure: s.last_failure.clone(),
                    records: s.records.len() as u32,
                    bytes: s.bytes,
                }
            })
            .collect();
        Ok(DeadPage { sessions, total: self.dead_count(kind) })
    }

    fn dead_count(&self, kind: Kind) -> u64 {
        self.dead_counts.get(&kind).copied().unwrap_or(0)
    }

    fn dead_of(&self, kind: Kind) -> impl Iterator<Item = SessionId> + '_ {
        let from = (kind, Index(0), SessionId(0));
        self.dead.range(from..).take_while(move |k| k.0 == kind).map(|k| k.2)
    }

    pub fn session_view(&self, id: SessionId) -> Result<SessionView, RequestError> {
        match self.sessions.get(&id) {
            Some(s) => Ok(s.view(id)),
            None => self.spilled_view(id).ok_or_else(|| self.missing(id)),
        }
    }

    /// A spilled session as `get` shows it: its records stay in the source file (their count and
    /// bytes are known), and `source` names it.
    fn spilled_view(&self, id: SessionId) -> Option<SessionView> {
        let (p, e) = self.sources.spilled(id)?;
        Some(SessionView {
            id,
            kind: p.kind,
            handle: Handle { session: id, attempt: e.attempt },
            state: SessionState::Stored { due: e.due },
            deliveries: e.attempt.0,
            failures: e.failures,
            last_failure: None,
            records: Vec::new(),
            bytes: e.bytes,
            source: Some((p.source, e.records)),
        })
    }

    /// All sessions held in memory, for checkers and inspection tools (spilled ones: see
    /// [`StateMachine::spilled_views`]).
    pub fn session_views(&self) -> impl Iterator<Item = SessionView> + '_ {
        self.sessions.iter().map(|(id, s)| s.view(*id))
    }

    /// Where a spilled session's frame is in its source file: (source, offset, length).
    pub(crate) fn spilled_frame(&self, id: SessionId) -> Option<(SourceId, u64, u32)> {
        let p = self.sources.locate(id)?;
        let s = self.sources.source(p.kind, p.source)?;
        let before: u64 = s.entries[..p.pos as usize].iter().map(|e| e.frame_len as u64).sum();
        let len = s.entries[p.pos as usize].frame_len;
        Some((p.source, crate::stored::SOURCE_HEADER_LEN + before, len))
    }

    /// Spilled sessions, without their records.
    pub fn spilled_views(&self) -> impl Iterator<Item = SessionView> + '_ {
        self.sources.all_spilled().filter_map(|(_, e)| self.spilled_view(e.id))
    }

    /// The cached answer for a request already applied, if `(client, seq)` is the latest seen.
    pub(crate) fn dedup_lookup(&self, client: ClientId, seq: Seq) -> Option<Outcome> {
        let e = self.dedup.get(&client)?;
        if seq == e.seq {
            Some(e.outcome.clone())
        } else if seq < e.seq {
            Some(Err(RequestError::StaleSequence { seq: seq.0, last: e.seq.0 }))
        } else {
            None
        }
    }

    /// A kind's stored sessions in repeat order, in memory and spilled: (due, stored_at, id).
    pub(crate) fn stored_in_order(
        &self,
        kind: Kind,
        cfg: &Rules<'_>,
    ) -> impl Iterator<Item = (UnixSecs, Index, SessionId)> + '_ {
        let memtable_first = cfg.mutation(|m| m.sources_out_of_order);
        InOrder::new(self.memtable_in_order(kind), self.sources.untaken_of(kind), memtable_first)
    }

    fn memtable_in_order(&self, kind: Kind) -> impl Iterator<Item = (UnixSecs, Index, SessionId)> + '_ {
        let from = (kind, UnixSecs(0), Index(0), SessionId(0));
        self.stored.range(from..).take_while(move |k| k.0 == kind).map(|k| (k.1, k.2, k.3))
    }

    /// The records of a spilled session, if this replica holds them in memory.
    pub fn held_records(&self, id: SessionId) -> Option<Unspilled> {
        self.sources.held_records(id)
    }

    /// Whether a session is spilled (its records are in a source file).
    pub(crate) fn is_spilled(&self, id: SessionId) -> bool {
        !self.sessions.contains_key(&id) && self.sources.locate(id).is_some()
    }

    /// Active sessions in order of lease expiry.
    pub(crate) fn leases_in_order(&self) -> impl Iterator<Item = &(UnixMs, SessionId)> {
        self.leases.iter()
    }

    pub(crate) fn session(&self, id: SessionId) -> Option<&Session> {
        self.sessions.get(&id)
    }

    /// A session's state as readers see it, in memory or spilled; `None` if it does not exist.
    pub(crate) fn brief(&self, id: SessionId) -> Option<SessionBrief> {
        if let Some(s) = self.sessions.get(&id) {
            return Some(s.brief());
        }
        let (_, e) = self.sources.spilled(id)?;
        let status = BriefStatus::Stored { due: e.due };
        Some(SessionBrief { status, attempt: e.attempt, failures: e.failures, records: e.records, bytes: e.bytes })
    }

    /// The kind of a session in memory or spilled (what a driver checks a client's
    /// permissions against).
    pub fn kind_of(&self, id: SessionId) -> Option<Kind> {
        match self.sessions.get(&id) {
            Some(s) => Some(s.kind),
            None => self.sources.locate(id).map(|p| p.kind),
        }
    }

    /// Deliveries out, over all kinds.
    pub(crate) fn delivering_total(&self) -> u32 {
        self.delivering.values().sum()
    }

    pub(crate) fn delivering(&self, kind: Kind) -> u32 {
        self.delivering.get(&kind).copied().unwrap_or(0)
    }

    fn missing(&self, id: SessionId) -> RequestError {
        if self.tombstones.contains_key(&id) {
            RequestError::SessionDeleted(id)
        } else {
            RequestError::SessionUnknown(id)
        }
    }

    /// Moves the kind's memtable to a new source (nothing happens if it is empty); returns how
    /// many sessions it moved.
    fn spill(&mut self, kind: Kind, id: SourceId) -> u64 {
        let keys: Vec<(UnixSecs, Index, SessionId)> = self.memtable_in_order(kind).collect();
        if keys.is_empty() {
            return 0;
        }
        let moved = keys.len() as u64;
        let mut sessions = Vec::with_capacity(keys.len());
        for (due, stored_at, sid) in keys {
            let s = self.sessions.remove(&sid).expect("the stored index holds live sessions");
            self.stored.remove(&(kind, due, stored_at, sid));
            sessions.push((sid, s));
        }
        // The sessions' digests stay in the hash: they are still in the state, only elsewhere.
        self.memtable_bytes.remove(&kind);
        self.sources.spill(kind, id, sessions);
        moved
    }

    /// The session, if it is in a dead-letter set (what a redrive or a drop needs).
    fn dead_session(&self, id: SessionId) -> Result<&Session, RequestError> {
        let s = self.sessions.get(&id).ok_or_else(|| self.missing(id))?;
        match s.status {
            Status::Dead { .. } => Ok(s),
            _ => Err(RequestError::NotDead(id)),
        }
    }

    /// A delivery failed: the session is stored again at `due` (the leader drew it with the
    /// kind's backoff), or goes to the dead-letter set once its failures reach max attempts.
    /// Returns what became of it.
    fn fail(&mut self, id: SessionId, due: UnixSecs, reason: FailureReason, at: Index, cfg: &Rules<'_>) -> What {
        let kind = self.sessions[&id].kind;
        let failures = self.sessions[&id].failures + 1;
        let early = cfg.mutation(|m| m.dead_letter_early) as u32;
        let dead = cfg.kind(kind).is_some_and(|k| k.is_dead_after(failures + early));
        let kept = reason.clone();
        self.change(id, |s| {
            s.failures = failures;
            s.last_failure = Some(kept);
            if dead {
                s.status = Status::Dead { since: at };
            }
        });
        if dead {
            return What::DeadLettered { reason };
        }
        let due = self.store(id, due, at);
        What::DeliveryFailed { reason, due }
    }

    fn create(&mut self, entry: &Entry, kind: Kind, record: Option<Vec<u8>>, cfg: &Rules<'_>) -> Outcome {
        let records: Vec<Vec<u8>> = record.into_iter().collect();
        self.check_new(kind, &records, 1, cfg)?;
        let id = SessionId(entry.index.0);
        Ok(Reply::Created { handle: self.insert_new(id, kind, records, entry.at, cfg) })
    }

    /// Whether `count` new sessions fit, and one of `kind` with these records.
    fn check_new(&self, kind: Kind, records: &[Vec<u8>], count: u64, cfg: &Rules<'_>) -> Result<(), RequestError> {
        let kc = cfg.kind(kind).ok_or(RequestError::UnknownKind(kind))?;
        if self.sessions.len() as u64 + self.sources.spilled_count() + count > cfg.limits().sessions_max {
            return Err(RequestError::TooManySessions { max: cfg.limits().sessions_max });
        }
        let mut bytes = 0;
        for r in records {
            let size = r.len() as u64;
            if size > kc.record_bytes_max as u64 {
                return Err(RequestError::RecordTooLarge { size, max: kc.record_bytes_max });
            }
            bytes += size;
        }
        if bytes > kc.session_bytes_max as u64 {
            return Err(RequestError::SessionTooLarge { bytes, max: kc.session_bytes_max });
        }
        if records.len() as u64 > kc.session_records_max as u64 {
            return Err(RequestError::TooManyRecords { max: kc.session_records_max });
        }
        Ok(())
    }

    /// Opens session `id` (checked with `check_new`), leased from `at`; returns its handle.
    fn insert_new(&mut self, id: SessionId, kind: Kind, records: Vec<Vec<u8>>, at: UnixMs, cfg: &Rules<'_>) -> Handle {
        let lease_until = at.saturating_add_ms(cfg.lease(kind).0);
        let mut s = Session {
            kind,
            attempt: Attempt(0),
            records: Vec::new(),
            bytes: 0,
            status: Status::Active { lease_until, delivering: false },
            records_hash: 0,
            failures: 0,
            last_failure: None,
        };
        for r in records {
            s.push(r);
        }
        self.hash.add(s.digest(id));
        self.leases.insert((lease_until, id));
        self.sessions.insert(id, s);
        Handle { session: id, attempt: Attempt(0) }
    }

    fn check_handle(&self, handle: Handle) -> Result<&Session, RequestError> {
        let s = self.sessions.get(&handle.session).ok_or_else(|| self.missing_for(handle))?;
        if s.attempt != handle.attempt {
            return Err(RequestError::StaleAttempt { handle, current: s.attempt });
        }
        Ok(s)
    }

    /// Why a session not in memory cannot be operated on: spilled (so stored, or the handle is
    /// stale), deleted, or unknown.
    fn missing_for(&self, handle: Handle) -> RequestError {
        match self.sources.spilled(handle.session) {
            Some((_, e)) if e.attempt != handle.attempt => RequestError::StaleAttempt { handle, current: e.attempt },
            Some(_) => RequestError::SessionStored(handle.session),
            None => self.missing(handle.session),
        }
    }

    fn check_handle_active(&self, handle: Handle, cfg: &Rules<'_>) -> Result<(), RequestError> {
        let checked = if cfg.mutation(|m| m.accept_stale_attempt) {
            self.sessions.get(&handle.session).ok_or_else(|| self.missing_for(handle))
        } else {
            self.check_handle(handle)
        };
        match checked?.status {
            Status::Active { .. } => Ok(()),
            Status::Stored { .. } => Err(RequestError::SessionStored(handle.session)),
            Status::Dead { .. } => Err(RequestError::SessionDead(handle.session)),
        }
    }

    fn check_room(&self, id: SessionId, add: u64, replace: bool, cfg: &Rules<'_>) -> Result<(), RequestError> {
        let s = &self.sessions[&id];
        let kc = cfg.kind(s.kind).expect("a session's kind stays configured");
        if add > kc.record_bytes_max as u64 {
            return Err(RequestError::RecordTooLarge { size: add, max: kc.record_bytes_max });
        }
        let (bytes, count) = if replace { (add, 1) } else { (s.bytes + add, s.records.len() as u64 + 1) };
        if bytes > kc.session_bytes_max as u64 {
            return Err(RequestError::SessionTooLarge { bytes, max: kc.session_bytes_max });
        }
        if count > kc.session_records_max as u64 {
            return Err(RequestError::TooManyRecords { max: kc.session_records_max });
        }
        Ok(())
    }

    /// Changes a session through `f`, keeping the state hash and the lease index in step.
    fn change(&mut self, id: SessionId, f: impl FnOnce(&mut Session)) {
        let s = self.sessions.get_mut(&id).expect("changed session exists");
        self.hash.remove(s.digest(id));
        let before = s.status.clone();
        f(s);
        self.hash.add(s.digest(id));
        let after = s.status.clone();
        let (kind, bytes) = (s.kind, s.bytes);
        self.reindex(id, kind, bytes, Some(&before), Some(&after));
    }

    /// Keeps the secondary indexes (stored order, leases, delivering counts) equal to statuses.
    /// `bytes` is the session's record bytes (a stored session's do not change while stored).
    fn reindex(&mut self, id: SessionId, kind: Kind, bytes: u64, before: Option<&Status>, after: Option<&Status>) {
        if before == after {
            return;
        }
        match before {
            None => {}
            Some(Status::Active { lease_until, delivering }) => {
                assert!(self.leases.remove(&(*lease_until, id)), "lease index holds every active session");
                if *delivering {
                    let n = self.delivering.get_mut(&kind).expect("delivering count exists");
                    *n -= 1;
                }
            }
            Some(Status::Stored { due, stored_at }) => {
                assert!(self.stored.remove(&(kind, *due, *stored_at, id)), "stored index holds every stored session");
                let m = self.memtable_bytes.get_mut(&kind).expect("memtable bytes count stored sessions");
                *m -= bytes + MEMTABLE_SESSION_OVERHEAD_BYTES;
                if *m == 0 {
                    self.memtable_bytes.remove(&kind);
                }
            }
            Some(Status::Dead { since }) => {
                assert!(self.dead.remove(&(kind, *since, id)), "dead index holds every dead session");
                *self.dead_counts.get_mut(&kind).expect("dead count exists") -= 1;
            }
        }
        match after {
            Some(Status::Active { lease_until, delivering }) => {
                self.leases.insert((*lease_until, id));
                if *delivering {
                    *self.delivering.entry(kind).or_insert(0) += 1;
                }
            }
            Some(Status::Stored { due, stored_at }) => {
                self.stored.insert((kind, *due, *stored_at, id));
                *self.memtable_bytes.entry(kind).or_insert(0) += bytes + MEMTABLE_SESSION_OVERHEAD_BYTES;
            }
            Some(Status::Dead { since }) => {
                self.dead.insert((kind, *since, id));
                *self.dead_counts.entry(kind).or_insert(0) += 1;
            }
            None => {}
        }
    }

    fn renew(&mut self, id: SessionId, at: UnixMs, cfg: &Rules<'_>) {
        let lease = cfg.lease(self.sessions[&id].kind);
        self.change(id, |s| {
            if let Status::Active { lease_until, .. } = &mut s.status {
                *lease_until = (*lease_until).max(at.saturating_add_ms(lease.0));
            }
        });
    }

    /// Stores a session for redelivery, never before its kind's repeat index, and returns the
    /// repeat time it got.
    fn store(&mut self, id: SessionId, due: UnixSecs, stored_at: Index) -> UnixSecs {
        let due = due.max(self.repeat_floor(self.sessions[&id].kind));
        self.change(id, |s| s.status = Status::Stored { due, stored_at });
        due
    }

    fn delete(&mut self, id: SessionId, at: Index, cfg: &Rules<'_>) {
        let s = self.sessions.remove(&id).expect("deleted session exists");
        self.hash.remove(s.digest(id));
        self.reindex(id, s.kind, s.bytes, Some(&s.status), None);
        self.tombstones.insert(id, at);
        self.tombstone_order.insert((at, id));
        self.hash.add(digest(3, &(id, at)));
        while self.tombstones.len() > cfg.limits().tombstones_max as usize {
            let (at, oldest) = self.tombstone_order.pop_first().expect("order mirrors the tombstones");
            self.tombstones.remove(&oldest);
            self.hash.remove(digest(3, &(oldest, at)));
        }
    }

    /// Moves a stored session to a new attempt held by its handler. Returns the due time it had.
    /// A session not yet due at the take's clock reading is left alone: every replica enforces
    /// "never before the repeat time", whatever the proposer's planning did.
    fn take(&mut self, id: SessionId, at: UnixMs, cfg: &Rules<'_>, carried: &[Unspilled]) -> Option<UnixSecs> {
        let (kind, due, stored_at) = match self.sessions.get(&id) {
            Some(s) => match s.status {
                Status::Stored { due, stored_at } => (s.kind, due, stored_at),
                _ => return None,
            },
            None => {
                let (p, e) = self.sources.spilled(id)?;
                (p.kind, e.due, e.stored_at)
            }
        };
        if due.as_ms() > at && !cfg.mutation(|m| m.redeliver_early) {
            return None;
        }
        // Within a kind, sessions are taken strictly in (due, stored_at, id) order. Planning
        // already does this; checking it here makes it hold on every replica even when an
        // earlier take was lost (say, its write failed on a full disk).
        let first = self.stored_in_order(kind, cfg).next().map(|(_, _, first)| first);
        if first != Some(id) && !cfg.mutation(|m| m.take_out_of_order) {
            return None;
        }
        // A kind never has more deliveries out than handler slots, on every replica, whatever
        // the proposer planned (a new leader may not yet know of its predecessor's last take).
        let slots = cfg.kind(kind).map_or(0, |k| k.handler_slots);
        if self.delivering(kind) >= slots {
            return None;
        }
        if !self.sessions.contains_key(&id) {
            self.unspill(id, kind, carried)?;
        }
        let lease_until = at.saturating_add_ms(cfg.lease(kind).0);
        self.change(id, |s| {
            s.attempt = Attempt(s.attempt.0 + 1);
            s.status = Status::Active { lease_until, delivering: true };
        });
        let key = (due, stored_at, id);
        let r = self.repeat_index.entry(kind).or_insert(key);
        *r = (*r).max(key);
        Some(due)
    }

    /// Brings a spilled session back into memory (stored) with the records the take carried.
    /// A take without them, or with records that do not match the session's digest, is refused.
    fn unspill(&mut self, id: SessionId, kind: Kind, carried: &[Unspilled]) -> Option<()> {
        let records = carried.iter().find(|u| u.id == id)?;
        let s = self.sources.unspill(id, records, kind)?;
        let (status, bytes) = (s.status.clone(), s.bytes);
        self.sessions.insert(id, s);
        self.reindex(id, kind, bytes, None, Some(&status));
        Some(())
    }

    /// A lease ran out. A session its owner left is stored; a delivery whose handler let the
    /// lease run out has failed (the leader drew `due` with the kind's backoff).
    /// Returns what became of the session, if the lease had really run out.
    fn expire(&mut self, handle: Handle, due: UnixSecs, entry: &Entry, cfg: &Rules<'_>) -> Option<What> {
        let s = self.check_handle(handle).ok()?;
        let Status::Active { lease_until, delivering } = s.status else { return None };
        if cfg.lease_end(s.kind, lease_until) > entry.at {
            return None;
        }
        if delivering {
            return Some(self.fail(handle.session, due, FailureReason::LeaseExpired, entry.index, cfg));
        }
        let due = self.store(handle.session, due, entry.index);
        Some(What::LeaseExpired { due })
    }

    fn remember(&mut self, client: ClientId, seq: Seq, outcome: Outcome, index: Index, cfg: &Rules<'_>) {
        let entry = DedupEntry { seq, outcome, last_index: index };
        if let Some(old) = self.dedup.insert(client, entry) {
            self.hash.remove(dedup_digest(client, &old));
            self.dedup_lru.remove(&(old.last_index, client));
        }
        self.hash.add(dedup_digest(client, &self.dedup[&client]));
        self.dedup_lru.insert((index, client));
        while self.dedup.len() > cfg.limits().dedup_clients_max as usize {
            let (_, oldest) = self.dedup_lru.pop_first().expect("lru mirrors the table");
            let old = self.dedup.remove(&oldest).expect("lru mirrors the table");
            self.hash.remove(dedup_digest(oldest, &old));
        }
    }

    /// The indexes and the hash as the sessions, dedup table and tombstones determine them.
    fn derive(&self) -> Derived {
        let mut d = Derived::default();
        for (id, s) in &self.sessions {
            d.hash.add(s.digest(*id));
            match s.status {
                Status::Active { lease_until, delivering } => {
                    d.leases.insert((lease_until, *id));
                    if delivering {
                        *d.delivering.entry(s.kind).or_insert(0) += 1;
                    }
                }
                Status::Stored { due, stored_at } => {
                    d.stored.insert((s.kind, due, stored_at, *id));
                    *d.memtable_bytes.entry(s.kind).or_insert(0) += s.bytes + MEMTABLE_SESSION_OVERHEAD_BYTES;
                }
                Status::Dead { since } => {
                    d.dead.insert((s.kind, since, *id));
                    *d.dead_counts.entry(s.kind).or_insert(0) += 1;
                }
            }
        }
        for list in self.sources.kinds.values() {
            for e in list.iter().flat_map(|s| s.untaken()) {
                d.hash.add(e.digest);
            }
        }
        for (c, e) in &self.dedup {
            d.hash.add(dedup_digest(*c, e));
            d.dedup_lru.insert((e.last_index, *c));
        }
        for (name, c) in &self.consumers {
            d.hash.add(consumer_digest(name, c));
        }
        for (id, at) in &self.tombstones {
            d.hash.add(digest(3, &(*id, *at)));
            d.tombstone_order.insert((*at, *id));
        }
        d
    }

    /// Rebuilds the indexes and the hash after loading a snapshot.
    pub(crate) fn rebuild_indexes(&mut self) {
        let d = self.derive();
        self.stored = d.stored;
        self.memtable_bytes = d.memtable_bytes;
        self.sources.rebuild();
        self.leases = d.leases;
        self.dead = d.dead;
        self.dead_counts = d.dead_counts;
        self.delivering = d.delivering;
        self.dedup_lru = d.dedup_lru;
        self.tombstone_order = d.tombstone_order;
        self.hash = d.hash;
    }

    /// What the invariants assert of a state just decoded from a snapshot, as an error, checked
    /// before its indexes are rebuilt: a snapshot may come from a peer, and bad input is refused,
    /// never a panic. The indexes rebuilt from a state that passes are consistent by
    /// construction, so the cheap invariants then hold.
    pub(crate) fn check_decoded(&self) -> Result<(), String> {
        if let Some((id, _)) = self.sessions.last_key_value().filter(|(id, _)| id.0 > self.applied.0) {
            return Err(format!("session {} is beyond the applied index {}", id.0, self.applied.0));
        }
        self.check_sessions()?;
        for (_, e) in self.sources.all_spilled() {
            if self.sessions.contains_key(&e.id) {
                return Err(format!("session {} is both in memory and spilled", e.id.0));
            }
        }
        self.sources.check_decoded()
    }

    /// Each session's byte count matches its records, and a stored one comes after its kind's
    /// repeat index (what no index rebuild can vouch for).
    fn check_sessions(&self) -> Result<(), String> {
        for (id, s) in &self.sessions {
            if s.bytes != s.records.iter().map(|r| r.len() as u64).sum::<u64>() {
                return Err(format!("session {}'s byte count does not match its records", id.0));
            }
            if let Status::Stored { due, stored_at } = s.status {
                if let Some(r) = self.repeat_index.get(&s.kind).filter(|r| (due, stored_at, *id) <= **r) {
                    return Err(format!(
                        "stored session {} ({due:?}, {stored_at:?}) comes before its kind's repeat index {r:?}",
                        id.0
                    ));
                }
            }
        }
        Ok(())
    }

    /// Cheap structural invariants, checked after every step.
    pub(crate) fn invariants(&self) {
        assert_eq!(
            self.sessions.len(),
            self.stored.len() + self.leases.len() + self.dead.len(),
            "every session is in exactly one index"
        );
        assert_eq!(self.dedup.len(), self.dedup_lru.len(), "dedup lru mirrors the table");
        assert_eq!(self.tombstones.len(), self.tombstone_order.len(), "tombstone order mirrors the tombstones");
        if let Some((_, _, _, id)) = self.stored.first() {
            assert!(self.sessions.contains_key(id), "stored index points at a live session");
        }
        if let Some(last) = self.sessions.last_key_value() {
            assert!(last.0 .0 <= self.applied.0, "no session id beyond the applied index");
        }
        self.sources.invariants(false);
    }

    /// Full invariants: recomputes every index and the hash from scratch. O(state).
    pub fn full_invariants(&self) {
        self.invariants();
        // The indexes are derived afresh (not from a clone of the whole state, which for many
        // stored sessions would double the memory) and compared with the incremental ones.
        let copy = self.derive();
        assert_eq!(copy.stored, self.stored, "stored index matches session statuses");
        assert_eq!(copy.memtable_bytes, self.memtable_bytes, "memtable bytes match the stored sessions in memory");
        self.sources.invariants(true);
        for (_, e) in self.sources.all_spilled() {
            assert!(!self.sessions.contains_key(&e.id), "a session is in memory or spilled, not both");
        }
        assert_eq!(copy.leases, self.leases, "lease index matches session statuses");
        assert_eq!(copy.dead, self.dead, "dead index matches session statuses");
        let nonzero: BTreeMap<_, _> = self.dead_counts.iter().filter(|(_, n)| **n > 0).collect();
        assert_eq!(nonzero, copy.dead_counts.iter().collect(), "dead counts match the dead index");
        let nonzero: BTreeMap<_, _> = self.delivering.iter().filter(|(_, n)| **n > 0).collect();
        let expect: BTreeMap<_, _> = copy.delivering.iter().collect();
        assert_eq!(nonzero, expect, "delivering counts match session statuses");
        assert_eq!(copy.hash, self.hash, "incremental state hash matches a full recomputation");
        if let Err(e) = self.check_sessions() {
            panic!("{e}");
        }
    }
}
