//! Consumers in the replicated state: opening one (a new epoch), dropping one, and a commit of
//! a checkpoint with the session operations it carries, all or nothing (see `consumers.rs`).
//!
//! All or nothing without an undo log: a commit names each session at most once, so every
//! operation's checks are independent of the others', and all of them are made before the
//! first one is applied. Applying then cannot fail.

use super::{consumer_digest, StateMachine};
use crate::config::Rules;
use crate::consumers::{check_name, ConsumerState};
use crate::error::RequestError;
use crate::events::{Event, What};
use crate::op::{Checkpoint, CommitOp, ConsumerCommit, Entry, Outcome, Reply, UnixSecs};
use crate::types::{Index, SessionId};
use std::collections::BTreeSet;

impl StateMachine {
    /// A consumer's checkpoint, if it exists.
    pub fn checkpoint(&self, consumer: &str) -> Option<Checkpoint> {
        self.consumers.get(consumer).map(|c| c.checkpoint(consumer))
    }

    fn set_consumer(&mut self, name: &str, state: Option<ConsumerState>) {
        if let Some(old) = self.consumers.remove(name) {
            self.hash.remove(consumer_digest(name, &old));
        }
        if let Some(new) = state {
            self.hash.add(consumer_digest(name, &new));
            self.consumers.insert(name.to_string(), new);
        }
    }

    /// Opens a consumer (created with an empty checkpoint if new) at an epoch that fences every
    /// earlier one: the entry's index.
    pub(super) fn open_consumer(
        &mut self,
        entry: &Entry,
        name: &str,
        cfg: &Rules<'_>,
        events: &mut Vec<Event>,
    ) -> Outcome {
        check_name(name, cfg.limits())?;
        let through = match self.consumers.get(name) {
            Some(c) => c.through,
            None if self.consumers.len() >= cfg.limits().consumers_max as usize => {
                return Err(RequestError::TooManyConsumers { max: cfg.limits().consumers_max })
            }
            None => Index(0),
        };
        let epoch = entry.index.0;
        self.set_consumer(name, Some(ConsumerState { epoch, through }));
        events.push(Event::pipe(What::ConsumerOpened { consumer: name.to_string(), epoch }));
        Ok(Reply::ConsumerOpened { epoch, through })
    }

    pub(super) fn drop_consumer(&mut self, name: &str, events: &mut Vec<Event>) -> Outcome {
        if !self.consumers.contains_key(name) {
            return Err(RequestError::UnknownConsumer(name.to_string()));
        }
        self.set_consumer(name, None);
        events.push(Event::pipe(What::ConsumerDropped { consumer: name.to_string() }));
        Ok(Reply::Done)
    }

    /// A consumer's commit: checked whole, then applied whole.
    pub(super) fn commit(
        &mut self,
        entry: &Entry,
        c: &ConsumerCommit,
        dues: &[Option<UnixSecs>],
        ids_from: Index,
        cfg: &Rules<'_>,
        events: &mut Vec<Event>,
    ) -> Outcome {
        if cfg.mutation(|m| m.commit_not_atomic) {
            return self.commit_piecemeal(entry, c, dues, ids_from, cfg, events);
        }
        let ids = self.check_commit(entry, c, dues, ids_from, cfg)?;
        let mut ids = ids.into_iter();
        let mut results = Vec::with_capacity(c.ops.len());
        // The checkpoint first: the operations' events follow it in the entry.
        self.move_checkpoint(c, events);
        for (op, due) in c.ops.iter().zip(dues) {
            let due = due.unwrap_or_else(|| entry.at.as_secs());
            let reply = match op {
                CommitOp::New { kind, records, store_s } => {
                    let id = ids.next().expect("an id was reserved for every creation");
                    let handle = self.insert_new(id, *kind, records.clone(), entry.at, cfg);
                    events.push(self.event(id, What::Created { records: records.clone() }, None));
                    match store_s {
                        None => Reply::Created { handle },
                        Some(_) => {
                            let before = self.brief(id);
                            let due = self.store(id, due, entry.index);
                            events.push(self.event(id, What::Stored { due }, before));
                            Reply::Created { handle }
                        }
                    }
                }
                other => {
                    let request = other.as_request().expect("not a creation");
                    self.execute(entry, &request, due, cfg, events).expect("checked before anything was applied")
                }
            };
            results.push(reply);
        }
        Ok(Reply::Committed { through: c.through, results })
    }

    /// Only under the `commit-not-atomic` mutation: each operation is checked and applied in
    /// turn, and a refused one leaves those before it applied (the checkpoint does not move).
    fn commit_piecemeal(
        &mut self,
        entry: &Entry,
        c: &ConsumerCommit,
        dues: &[Option<UnixSecs>],
        ids_from: Index,
        cfg: &Rules<'_>,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let first = ConsumerCommit { ops: Vec::new(), ..c.clone() };
        self.check_commit(entry, &first, &[], entry.index, cfg)?;
        let mut next_id = ids_from.0;
        for (n, (op, due)) in c.ops.iter().zip(dues).enumerate() {
            let due = due.unwrap_or_else(|| entry.at.as_secs());
            let failed = |e| RequestError::CommitOpFailed { op: n as u32, error: Box::new(e) };
            self.check_op(op, 1, cfg, &mut BTreeSet::new()).map_err(failed)?;
            match op {
                CommitOp::New { kind, records, .. } => {
                    let id = SessionId(next_id);
                    next_id += 1;
                    self.insert_new(id, *kind, records.clone(), entry.at, cfg);
                    events.push(self.event(id, What::Created { records: records.clone() }, None));
                }
                other => {
                    let request = other.as_request().expect("not a creation");
                    self.execute(entry, &request, due, cfg, events).map_err(failed)?;
                }
            }
        }
        self.move_checkpoint(c, events);
        Ok(Reply::Committed { through: c.through, results: Vec::new() })
    }

    fn move_checkpoint(&mut self, c: &ConsumerCommit, events: &mut Vec<Event>) {
        let (epoch, through) = (c.epoch, c.through);
        self.set_consumer(&c.consumer, Some(ConsumerState { epoch, through }));
        events.push(Event::pipe(What::CheckpointCommitted { consumer: c.consumer.clone(), epoch, through }));
    }

    /// Every check a commit must pass, before anything is applied. Returns the ids of the
    /// sessions it creates.
    fn check_commit(
        &self,
        entry: &Entry,
        c: &ConsumerCommit,
        dues: &[Option<UnixSecs>],
        ids_from: Index,
        cfg: &Rules<'_>,
    ) -> Result<Vec<SessionId>, RequestError> {
        let current =
            self.consumers.get(&c.consumer).ok_or_else(|| RequestError::UnknownConsumer(c.consumer.clone()))?;
        if c.epoch != current.epoch && !cfg.mutation(|m| m.stale_epoch_accepted) {
            return Err(RequestError::StaleEpoch { epoch: c.epoch, current: current.epoch });
        }
        if c.through < current.through {
            return Err(RequestError::CheckpointBehind { through: c.through, current: current.through });
        }
        if c.through >= entry.index {
            return Err(RequestError::ThroughBeyondLog { through: c.through, index: entry.index });
        }
        let max = cfg.limits().commit_ops_max;
        if c.ops.len() > max as usize {
            return Err(RequestError::TooManyOps { max });
        }
        let news = c.ops.iter().filter(|op| matches!(op, CommitOp::New { .. })).count() as u64;
        let ids: Vec<SessionId> = (0..news).map(|n| SessionId(ids_from.0 + n)).collect();
        let reserved = news == 0 && ids_from == entry.index || ids.last() == Some(&SessionId(entry.index.0));
        let unused = ids.iter().all(|id| self.kind_of(*id).is_none() && !self.tombstones.contains_key(id));
        if dues.len() != c.ops.len() || !reserved || !unused {
            // Only a leader that broke its own rules could propose this.
            return Err(RequestError::Malformed("a commit whose reserved ids or repeat times do not match it".into()));
        }
        let mut named = BTreeSet::new();
        for (n, op) in c.ops.iter().enumerate() {
            self.check_op(op, news, cfg, &mut named).map_err(|e| match e {
                RequestError::SessionTwiceInCommit(_) => e,
                e => RequestError::CommitOpFailed { op: n as u32, error: Box::new(e) },
            })?;
        }
        Ok(ids)
    }

    /// One operation's checks (the same an ordinary request gets when it is applied).
    fn check_op(
        &self,
        op: &CommitOp,
        news: u64,
        cfg: &Rules<'_>,
        named: &mut BTreeSet<SessionId>,
    ) -> Result<(), RequestError> {
        let (handle, add, replace) = match op {
            CommitOp::New { kind, records, store_s } => {
                self.check_new(*kind, records, news, cfg)?;
                let max_s = cfg.kind(*kind).map_or(0, |k| k.store_timeout_s_max);
                return match store_s {
                    Some(t) if *t > max_s => Err(RequestError::TimeoutTooLong { timeout_s: *t, max_s }),
                    _ => Ok(()),
                };
            }
            CommitOp::Append { handle, record } => (*handle, Some(record.len() as u64), false),
            CommitOp::Replace { handle, record } => (*handle, Some(record.len() as u64), true),
            CommitOp::Delete { handle } | CommitOp::KeepAlive { handle } => (*handle, None, false),
            CommitOp::Store { handle, .. } => (*handle, None, false),
        };
        if !named.insert(handle.session) {
            return Err(RequestError::SessionTwiceInCommit(handle.session));
        }
        self.check_handle_active(handle, cfg)?;
        if let Some(add) = add {
            self.check_room(handle.session, add, replace, cfg)?;
        }
        if let CommitOp::Store { timeout_s, .. } = op {
            let kind = self.sessions[&handle.session].kind;
            let max_s = cfg.kind(kind).map_or(0, |k| k.store_timeout_s_max);
            if *timeout_s > max_s {
                return Err(RequestError::TimeoutTooLong { timeout_s: *timeout_s, max_s });
            }
        }
        Ok(())
    }
}
