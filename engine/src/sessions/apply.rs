//! What applying a committed entry does, and the events it reports.
//!
//! Applying is a pure function of (state, entry): no clock, no randomness. Everything that could
//! vary between replicas (the proposer's wall clock, jitter draws) is inside the entry. Each
//! change to a session is reported as an [`Event`] with the session's state before and after,
//! for the ledger (see `events.rs`): the events are as deterministic as the state.

use super::{Applied, MutationEnv, StateMachine, Status};
use crate::config::{AppliedLimits, ClusterConfig, KindConfig, Mutations, Rules};
use crate::error::RequestError;
use crate::events::{Event, What};
use crate::op::{Command, Entry, Outcome, RedriveTarget, Reply, Request, UnixSecs};
use crate::types::{ClientId, Handle, Index, Kind, Seq, SessionId, SourceId};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The kind a creation names (a refused one shows it in the ledger).
fn new_kind(request: &Request) -> Option<Kind> {
    match request {
        Request::New { kind, .. } => Some(*kind),
        _ => None,
    }
}

impl StateMachine {
    /// Applies one committed entry. Entries must come in index order with no gaps.
    /// `mutations` are the mutation tests' deliberate bugs; `local` stands in for the
    /// replicated configuration only under the `apply-local-config` mutation.
    pub(crate) fn apply(
        &mut self,
        entry: &Entry,
        mutations: &Mutations,
        local: Option<&ClusterConfig>,
        env: MutationEnv<'_>,
    ) -> Applied {
        assert_eq!(entry.index, self.applied.next(), "entries are applied in order without gaps");
        self.applied = entry.index;
        // The configuration is held apart from the state while the entry changes the state; an
        // entry that changes the configuration replaces it, for the entries after it.
        let config = Arc::clone(&self.config);
        let config = local.filter(|_| cfg!(feature = "mutations")).unwrap_or(&config);
        let cfg = &Rules::new(config, mutations);
        let mut out = Applied::default();
        match &entry.command {
            Command::Client { client, seq, request, due, .. } => {
                let about = (request.name(), request.session(), new_kind(request));
                let outcome = self.once(*client, *seq, entry.index, about, cfg, &mut out.events, |s, events| {
                    let due = s.effective_due(*due, request, entry, cfg, env);
                    s.execute(entry, request, due, cfg, events)
                });
                out.reply = Some((*client, *seq, outcome));
            }
            Command::Commit { client, seq, commit, dues, ids_from, .. } => {
                let about = ("consumer-commit", None, None);
                let outcome = self.once(*client, *seq, entry.index, about, cfg, &mut out.events, |s, events| {
                    s.commit(entry, commit, dues, *ids_from, cfg, events)
                });
                out.reply = Some((*client, *seq, outcome));
            }
            Command::Members { client, seq, change, members, addrs, .. } => {
                let about = ("change-members", None, None);
                let outcome = self.once(*client, *seq, entry.index, about, cfg, &mut out.events, |s, events| {
                    let version = s.change_members(*change, members, addrs.as_ref());
                    events.push(Event::pipe(What::MembersChanged { version, change: *change }));
                    Ok(Reply::MembersChanged { version })
                });
                out.reply = Some((*client, *seq, outcome));
            }
            Command::Reserve => out.events.push(Event::pipe(What::Reserved)),
            Command::Take { sessions, unspilled } => {
                for id in sessions {
                    let before = self.brief(*id);
                    if let Some(due) = self.take(*id, entry.at, cfg, unspilled) {
                        let attempt = self.sessions[id].attempt;
                        out.deliveries.push((Handle { session: *id, attempt }, due, entry.at));
                        out.events.push(self.event(*id, What::Taken { due }, before));
                    }
                }
            }
            Command::Expire { sessions } => {
                for (handle, due) in sessions {
                    let before = self.brief(handle.session);
                    if let Some(what) = self.expire(*handle, *due, entry, cfg) {
                        out.events.push(self.event(handle.session, what, before));
                    }
                }
            }
            Command::DeliveryFailed { handle, due, reason } => {
                let delivering = self
                    .check_handle(*handle)
                    .is_ok_and(|s| matches!(s.status, Status::Active { delivering: true, .. }));
                if delivering {
                    let before = self.brief(handle.session);
                    let what = self.fail(handle.session, *due, reason.clone(), entry.index, cfg);
                    out.events.push(self.event(handle.session, what, before));
                }
            }
            Command::Noop => out.events.push(Event::pipe(What::Noop)),
            Command::Bootstrap { config } => {
                let what = self.bootstrap(config);
                out.events.push(Event::pipe(what));
            }
            Command::Spill { kind } => {
                let sessions = self.spill(*kind, SourceId(entry.index.0));
                let what = What::Spilled { source: SourceId(entry.index.0), sessions };
                out.events.push(Event { kind: Some(*kind), ..Event::pipe(what) });
            }
            Command::Merge { kind, older, newer } => {
                let source = SourceId(entry.index.0);
                if self.sources.merge(*kind, *older, *newer, source) {
                    let what = What::Merging { source, older: *older, newer: *newer };
                    out.events.push(Event { kind: Some(*kind), ..Event::pipe(what) });
                }
            }
            Command::SourceReady { source } => {
                if self.sources.ready(*source) {
                    out.events.push(Event::pipe(What::SourceReady { source: *source }));
                }
            }
        }
        if out.events.is_empty() {
            // Every committed entry shows in the ledger, even one of the pipe's own that found
            // nothing left to do (a take of a session stored again meanwhile, say).
            out.events.push(Event::pipe(What::NoEffect { entry: entry.command.name().into() }));
        }
        out
    }

    /// The event of a change to session `id` (which is of a known kind), from `before`.
    pub(super) fn event(&self, id: SessionId, what: What, before: Option<crate::events::SessionBrief>) -> Event {
        let kind = self.kind_of(id);
        Event { session: Some(id), kind, what, before, after: self.brief(id) }
    }

    /// Applies a client's request once: a retry of one already applied is answered from the
    /// deduplication table. `about` (request name, session, kind of a creation) describes the
    /// request in the events of a retry or a refusal; a refusal changed nothing but the table.
    #[allow(clippy::too_many_arguments)]
    fn once(
        &mut self,
        client: ClientId,
        seq: Seq,
        index: Index,
        about: (&str, Option<SessionId>, Option<Kind>),
        cfg: &Rules<'_>,
        events: &mut Vec<Event>,
        run: impl FnOnce(&mut Self, &mut Vec<Event>) -> Outcome,
    ) -> Outcome {
        let (name, session, created_kind) = about;
        let kind = created_kind.or_else(|| session.and_then(|id| self.kind_of(id)));
        let brief = session.and_then(|id| self.brief(id));
        let unchanged = |what| Event { session, kind, what, before: brief.clone(), after: brief.clone() };
        if let Some(cached) = self.dedup_lookup(client, seq).filter(|_| !cfg.mutation(|m| m.apply_retry_twice)) {
            events.push(unchanged(What::Repeated { request: name.into() }));
            return cached;
        }
        let outcome = run(self, events);
        if let Err(e) = &outcome {
            events.push(unchanged(What::Refused { request: name.into(), error: e.clone() }));
        }
        self.remember(client, seq, outcome.clone(), index, cfg);
        outcome
    }

    /// The repeat time written in the entry (the repeat-index floor is applied by `store`).
    fn effective_due(
        &self,
        due: Option<UnixSecs>,
        request: &Request,
        entry: &Entry,
        cfg: &Rules<'_>,
        env: MutationEnv<'_>,
    ) -> UnixSecs {
        let Request::Store { handle, timeout_s } = request else {
            // A redrive is due when the leader proposed it.
            return due.unwrap_or_else(|| entry.at.as_secs());
        };
        if cfg.mutation(|m| m.recompute_jitter_on_apply) {
            let kind = self.sessions.get(&handle.session).map_or(Kind(0), |s| s.kind);
            crate::repeater::draw_due(env.wall, *timeout_s, cfg.kind(kind), env.rng)
        } else {
            let _ = env;
            due.unwrap_or_else(|| entry.at.as_secs())
        }
    }

    /// Carries out a client request, reporting what it changed in `events`; an error changed
    /// nothing.
    pub(super) fn execute(
        &mut self,
        entry: &Entry,
        request: &Request,
        due: UnixSecs,
        cfg: &Rules<'_>,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let session = request.session();
        let before = session.and_then(|id| self.brief(id));
        let (reply, what) = match request {
            Request::New { kind, record } => {
                let reply = self.create(entry, *kind, record.clone(), cfg)?;
                let id = SessionId(entry.index.0);
                events.push(self.event(id, What::Created { records: record.iter().cloned().collect() }, None));
                return Ok(reply);
            }
            Request::Append { handle, record } => {
                self.check_handle_active(*handle, cfg)?;
                self.check_room(handle.session, record.len() as u64, false, cfg)?;
                self.change(handle.session, |s| s.push(record.clone()));
                self.renew(handle.session, entry.at, cfg);
                (Reply::Done, What::Appended { record: record.clone() })
            }
            Request::Replace { handle, record } => {
                self.check_handle_active(*handle, cfg)?;
                self.check_room(handle.session, record.len() as u64, true, cfg)?;
                self.change(handle.session, |s| {
                    s.records.clear();
                    s.bytes = 0;
                    s.records_hash = 0;
                    s.push(record.clone());
                });
                self.renew(handle.session, entry.at, cfg);
                (Reply::Done, What::Replaced { record: record.clone() })
            }
            Request::Delete { handle } => {
                self.check_handle_active(*handle, cfg)?;
                let kind = self.kind_of(handle.session);
                self.delete(handle.session, entry.index, cfg);
                events.push(Event { session, kind, what: What::Deleted, before, after: None });
                return Ok(Reply::Done);
            }
            Request::Store { handle, timeout_s } => {
                self.check_handle_active(*handle, cfg)?;
                let kind = self.sessions[&handle.session].kind;
                let max_s = cfg.kind(kind).map_or(0, |k| k.store_timeout_s_max);
                if *timeout_s > max_s {
                    return Err(RequestError::TimeoutTooLong { timeout_s: *timeout_s, max_s });
                }
                // A handler that stores the session has handled it (it is unfinished, not failed).
                self.change(handle.session, |s| s.failures = 0);
                let due = self.store(handle.session, due, entry.index);
                (Reply::Stored { due }, What::Stored { due })
            }
            Request::KeepAlive { handle } => {
                self.check_handle_active(*handle, cfg)?;
                if !cfg.mutation(|m| m.ignore_keepalive) {
                    self.renew(handle.session, entry.at, cfg);
                }
                (Reply::Done, What::Renewed)
            }
            Request::Redrive { target } => return self.redrive(*target, due, entry.index, cfg, events),
            Request::ConsumerOpen { consumer } => return self.open_consumer(entry, consumer, cfg, events),
            Request::ConsumerDrop { consumer } => return self.drop_consumer(consumer, events),
            Request::ConsumerCommit(_) => {
                // Commits travel as `Command::Commit`, with what the leader drew for them.
                return Err(RequestError::Malformed("a consumer commit outside a commit entry".into()));
            }
            Request::ChangeMembers { .. } | Request::TransferLeader { .. } => {
                // Membership changes travel as `Command::Members`; transfers are not entries.
                return Err(RequestError::Malformed(format!("{} as a client entry", request.name())));
            }
            Request::Configure { expect_version, kinds, limits } => {
                let version = self.configure(*expect_version, kinds, limits)?;
                events.push(Event::pipe(What::Configured { version }));
                return Ok(Reply::Configured { version });
            }
            Request::DropDead { session: id } => {
                self.dead_session(*id)?;
                let kind = self.kind_of(*id);
                self.delete(*id, entry.index, cfg);
                events.push(Event { session: Some(*id), kind, what: What::Dropped, before, after: None });
                return Ok(Reply::Done);
            }
        };
        let id = session.expect("every other request names its session");
        events.push(self.event(id, what, before));
        Ok(reply)
    }

    /// Takes a new cluster's configuration if there is none yet; a later bootstrap (proposed by
    /// a leader that had not yet applied an earlier one) changes nothing.
    fn bootstrap(&mut self, config: &ClusterConfig) -> What {
        if self.config.version != 0 {
            return What::NoEffect { entry: "bootstrap".into() };
        }
        // A bootstrap is the first leader's own file, checked when the server started; one that
        // is not valid anyway (bytes no leader wrote) is taken all the same rather than leave
        // the cluster without a configuration, and shows in `truba config show`.
        let version = 1;
        self.set_config(ClusterConfig { version, ..config.clone() });
        What::Configured { version }
    }

    /// Replaces the kinds and the applied limits, refused whole unless the configuration is
    /// still at `expect_version`, the new one is valid and no removed kind has sessions.
    fn configure(
        &mut self,
        expect_version: u64,
        kinds: &BTreeMap<Kind, KindConfig>,
        limits: &AppliedLimits,
    ) -> Result<u64, RequestError> {
        let current = self.config.version;
        if current == 0 {
            return Err(RequestError::NotConfigured);
        }
        if expect_version != current {
            return Err(RequestError::ConfigVersion { expected: expect_version, current });
        }
        ClusterConfig::validate(kinds, limits).map_err(|e| RequestError::InvalidConfig(e.0))?;
        for kind in self.config.kinds.keys().filter(|k| !kinds.contains_key(k)) {
            let sessions = self.sessions_of_kind(*kind);
            if sessions > 0 {
                return Err(RequestError::KindInUse { kind: *kind, sessions });
            }
        }
        let version = current + 1;
        let (members, addrs) = (self.config.members.clone(), self.config.addrs.clone());
        self.set_config(ClusterConfig { version, members, addrs, kinds: kinds.clone(), limits: *limits });
        Ok(version)
    }

    /// Takes the membership a `Members` entry carries. Consensus has used it since the entry
    /// reached the log (see `membership.rs`); applying records it in the configuration, where
    /// snapshots keep it. The entry's members are taken as they are, whatever the state held
    /// before: the leader derived them from the membership in force, and replicas must apply
    /// exactly what their consensus already uses.
    fn change_members(
        &mut self,
        change: crate::membership::MemberChange,
        members: &crate::membership::Members,
        addrs: Option<&crate::config::MemberAddrs>,
    ) -> u64 {
        let version = self.config.version + 1;
        let mut config = ClusterConfig { version, members: members.clone(), ..(*self.config).clone() };
        match (change, addrs) {
            (crate::membership::MemberChange::AddLearner(id), Some(a)) => {
                config.addrs.insert(id, a.clone());
            }
            (crate::membership::MemberChange::Remove(id), _) => {
                config.addrs.remove(&id);
            }
            _ => {}
        }
        self.set_config(config);
        version
    }

    /// Sessions of `kind` in any state, in memory or spilled (a scan: configuration changes are
    /// rare).
    fn sessions_of_kind(&self, kind: Kind) -> u64 {
        let held = self.sessions.values().filter(|s| s.kind == kind).count() as u64;
        held + self.sources.untaken_of(kind).map(|e| e.len() as u64).sum::<u64>()
    }

    /// Moves dead sessions back to the stored set with their failure count cleared.
    fn redrive(
        &mut self,
        target: RedriveTarget,
        due: UnixSecs,
        at: Index,
        cfg: &Rules<'_>,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let (kind, ids): (Kind, Vec<SessionId>) = match target {
            RedriveTarget::Session(id) => (self.dead_session(id)?.kind, vec![id]),
            RedriveTarget::Kind(kind) => {
                cfg.kind(kind).ok_or(RequestError::UnknownKind(kind))?;
                (kind, self.dead_of(kind).take(cfg.limits().redrive_batch_max as usize).collect())
            }
        };
        for id in &ids {
            let before = self.brief(*id);
            if !cfg.mutation(|m| m.redrive_keeps_count) {
                self.change(*id, |s| s.failures = 0);
            }
            let due = self.store(*id, due, at);
            events.push(self.event(*id, What::Redriven { due }, before));
        }
        let remaining = self.dead_count(kind);
        Ok(Reply::Redriven { count: ids.len() as u32, remaining })
    }
}
