//! The engine's side of membership (the rules are in `membership.rs`): which configuration is in
//! force on this replica, how quorums are counted from it, how a leader proposes a change, and
//! leadership transfer.
//!
//! Leadership transfer follows Raft's (section 3.10 of Ongaro's thesis): the leader stops taking
//! requests, brings the target's log up to its own, and tells it to stand at once (`TimeoutNow`).
//! The target skips the pre-vote, and its vote requests say they come from a transfer, so that
//! voters that heard from the leader a moment ago do not ignore them as a disruption. If the
//! target has not taken over within an election timeout, the leader takes requests again.

use crate::config::MemberAddrs;
use crate::engine::{Engine, Role};
use crate::error::RequestError;
use crate::io::Output;
use crate::membership::{self, MemberChange, Members};
use crate::message::Message;
use crate::op::{Command, MemberStatus, Reply};
use crate::replication::Progress;
use crate::types::{ClientId, Duration, Index, Instant, ReplicaId, Seq, Term};
use std::collections::BTreeMap;

/// A leadership transfer under way on the leader.
#[derive(Clone, Debug)]
pub(crate) struct Transfer {
    pub to: ReplicaId,
    /// The operator's request, answered once the target is told to stand (or the transfer fails).
    pub asked_by: Option<(ClientId, Seq)>,
    /// The transfer is given up at this time.
    pub deadline: Instant,
    /// When `TimeoutNow` was last sent (it is sent again every heartbeat interval: the
    /// network may lose it).
    pub told_at: Option<Instant>,
}

/// What the simulator's membership checkers see of a replica (see [`Engine::membership`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipView {
    /// The configuration in force here.
    pub members: Members,
    /// Leader: the index of its first entry of this term.
    pub term_start: Index,
    /// The membership entries this replica holds above its commit index: (index, term, change).
    pub uncommitted: Vec<(Index, Term, MemberChange)>,
    /// The log is durable here through this index.
    pub durable: Index,
}

impl Engine {
    /// This replica's membership, for checkers and status.
    pub fn membership(&self) -> MembershipView {
        let uncommitted = self
            .log
            .member_changes_after(self.commit)
            .filter_map(|e| match &e.command {
                Command::Members { change, .. } => Some((e.index, e.term, *change)),
                _ => None,
            })
            .collect();
        MembershipView {
            members: self.members().clone(),
            term_start: self.term_start,
            uncommitted,
            durable: self.durable,
        }
    }

    /// The configuration in force here: the latest membership entry in the log, committed or
    /// not, else the applied configuration's, else (before the bootstrap entry is applied) the
    /// members this replica was started with (none for a replica that joins).
    pub fn members(&self) -> &Members {
        if let Some((_, members)) = self.log.latest_members(self.state.applied()) {
            return members;
        }
        match self.state.config().version {
            0 => &self.initial_members,
            _ => &self.state.config().members,
        }
    }

    /// The leader to send a client to. A replica whose configuration no longer names it (it was
    /// removed) gives none: no leader talks to it any more, so the one it last heard of is
    /// likely stale, and two removed replicas could otherwise send a client back and forth.
    pub(crate) fn leader_hint(&self) -> Option<ReplicaId> {
        let members = self.members();
        if !members.is_empty() && !members.contains_key(&self.me) {
            return None;
        }
        self.leader
    }

    pub(crate) fn is_voter(&self, id: ReplicaId) -> bool {
        membership::is_voter(self.members(), id)
    }

    /// Whether this replica is the only voter (it commits and leads alone).
    pub(crate) fn is_lone_voter(&self) -> bool {
        self.is_voter(self.me) && membership::voter_count(self.members()) == 1
    }

    /// Every other member, voters and learners: the leader replicates to each. A member that a
    /// change not yet applied here removes is still sent entries, so that it receives its own
    /// removal and stops standing for election (its answers no longer count).
    pub(crate) fn peers(&self) -> Vec<ReplicaId> {
        let applied = self.state.config().members.keys().filter(|_| self.state.config().version > 0);
        let mut peers: Vec<ReplicaId> =
            self.members().keys().chain(applied).copied().filter(|r| *r != self.me).collect();
        peers.sort_unstable();
        peers.dedup();
        peers
    }

    /// The other voters: the replicas a candidate asks for votes.
    pub(crate) fn voting_peers(&self) -> Vec<ReplicaId> {
        membership::voters(self.members()).filter(|r| *r != self.me).collect()
    }

    /// How many make a quorum. Under the `learner-in-quorum` mutation learners count as voters.
    pub(crate) fn majority(&self) -> usize {
        if self.cfg.mutation(|m| m.learner_in_quorum) {
            return self.members().len() / 2 + 1;
        }
        membership::majority(self.members())
    }

    /// Whether `id`'s answers count toward quorums (only voters' do, except under the
    /// `learner-in-quorum` mutation).
    pub(crate) fn counts(&self, id: ReplicaId) -> bool {
        self.is_voter(id) || (self.cfg.mutation(|m| m.learner_in_quorum) && self.members().contains_key(&id))
    }

    /// The leader's view of each counting follower, for quorum decisions.
    pub(crate) fn counting_progress(&self) -> Vec<&Progress> {
        match &self.role {
            Role::Leader { progress } => progress.iter().filter(|(id, _)| self.counts(**id)).map(|(_, p)| p).collect(),
            _ => Vec::new(),
        }
    }

    /// Keeps the leader's progress map to the members in force: a new member is tracked from
    /// the leader's next entry, a removed one is forgotten.
    pub(crate) fn sync_progress(&mut self) {
        let peers = self.peers();
        let (next, now) = (self.log.last_index().next(), self.now.mono);
        let Role::Leader { progress } = &mut self.role else { return };
        progress.retain(|id, _| peers.contains(id));
        for peer in peers {
            progress.entry(peer).or_insert_with(|| Progress::new(next, now));
        }
    }

    /// An operator's membership change: checked against the rules of `membership.rs`, then
    /// proposed with the whole membership after it.
    pub(crate) fn change_members(
        &mut self,
        client: ClientId,
        seq: Seq,
        change: MemberChange,
        addrs: Option<MemberAddrs>,
        principal: Option<String>,
    ) -> Result<Command, RequestError> {
        let members = self.check_member_change(change)?;
        let addrs = match change {
            MemberChange::AddLearner(_) => addrs,
            _ => None,
        };
        if let Some(a) = &addrs {
            a.validate().map_err(RequestError::InvalidMemberChange)?;
        }
        Ok(Command::Members { client, seq, principal, change, members, addrs })
    }

    /// Where this node's file says the cluster's first members are reached: the bootstrap entry
    /// (if this node proposes it) records them in the replicated configuration.
    pub fn set_bootstrap_addrs(&mut self, addrs: BTreeMap<ReplicaId, MemberAddrs>) {
        self.local_config.addrs = addrs;
    }

    fn check_member_change(&self, change: MemberChange) -> Result<Members, RequestError> {
        if self.state.config().version == 0 {
            return Err(RequestError::NotConfigured);
        }
        if self.commit < self.term_start && !self.cfg.mutation(|m| m.skip_own_term_commit) {
            return Err(RequestError::MemberChangeBusy("the new leader has not committed an entry of its term".into()));
        }
        if let Some(index) = self.log.latest_member_change().filter(|i| *i > self.commit) {
            if !self.cfg.mutation(|m| m.two_changes_in_flight) {
                return Err(RequestError::MemberChangeBusy(format!(
                    "the change at index {index} is not committed yet"
                )));
            }
        }
        if change == MemberChange::Remove(self.me) {
            return Err(RequestError::RemoveLeader(self.me));
        }
        let members = membership::changed(self.members(), change)?;
        if let MemberChange::Promote(id) = change {
            let c = &self.cfg.consensus;
            let (matched, heard_at) = match &self.role {
                Role::Leader { progress } => {
                    progress.get(&id).map_or((Index(0), None), |p| (p.matched, Some(p.heard_at)))
                }
                _ => (Index(0), None),
            };
            let heard = heard_at.is_some_and(|t| self.now.mono.saturating_since(t).0 <= c.election_timeout_ms_max);
            // A learner that never acknowledged anything has not shown that it can keep up, however
            // young the log.
            let caught_up =
                matched.0 > 0 && matched.0.saturating_add(c.promote_lag_entries_max) >= self.commit.0 && heard;
            if !caught_up && !self.cfg.mutation(|m| m.promote_behind) {
                return Err(RequestError::LearnerBehind { member: id, matched, commit: self.commit });
            }
        }
        Ok(members)
    }

    /// An operator asks the leader to hand over to voter `to`.
    pub(crate) fn start_transfer(&mut self, client: ClientId, seq: Seq, to: ReplicaId) {
        let refuse = |e| Output::refuse(client, seq, e);
        let why = if to == self.me {
            Some("it already leads".to_string())
        } else if !self.is_voter(to) {
            Some(format!("{to} is not a voter"))
        } else {
            self.transfer.as_ref().map(|t| format!("a transfer to {} is under way", t.to))
        };
        if let Some(reason) = why {
            self.outputs.push_back(refuse(RequestError::TransferFailed { to, reason }));
            return;
        }
        let deadline = self.now.mono.saturating_add(Duration(self.cfg.consensus.election_timeout_ms_max));
        self.transfer = Some(Transfer { to, asked_by: Some((client, seq)), deadline, told_at: None });
        self.replicate(to);
        self.advance_transfer();
    }

    /// Tells the target to stand once its log is the leader's whole log.
    pub(crate) fn advance_transfer(&mut self) {
        let last = self.log.last_index();
        let Some(t) = &self.transfer else { return };
        let resend = Duration(self.cfg.consensus.heartbeat_ms);
        if t.told_at.is_some_and(|at| self.now.mono.saturating_since(at) < resend) {
            return;
        }
        let to = t.to;
        let caught_up = match &self.role {
            Role::Leader { progress } => progress.get(&to).is_some_and(|p| p.matched == last),
            _ => false,
        };
        if !caught_up {
            return;
        }
        let term = self.term();
        self.send(to, Message::TimeoutNow { term });
        let now = self.now.mono;
        let t = self.transfer.as_mut().expect("checked above");
        t.told_at = Some(now);
        if let Some((client, seq)) = t.asked_by.take() {
            let outcome = Ok(Reply::LeaderTransferring { to });
            self.outputs.push_back(Output::Reply { client, seq, outcome });
        }
    }

    /// A transfer that has not completed by its deadline is given up: the leader serves again.
    pub(crate) fn expire_transfer(&mut self) {
        let Some(t) = &self.transfer else { return };
        if self.now.mono < t.deadline {
            return;
        }
        let t = self.transfer.take().expect("checked above");
        if let Some((client, seq)) = t.asked_by {
            let reason = "it did not catch up within an election timeout".to_string();
            self.outputs.push_back(Output::refuse(client, seq, RequestError::TransferFailed { to: t.to, reason }));
        }
    }

    /// A leader that steps down ends its transfer; an operator still waiting learns the outcome.
    pub(crate) fn end_transfer(&mut self, leader: Option<ReplicaId>) {
        let Some(t) = self.transfer.take() else { return };
        if let Some((client, seq)) = t.asked_by {
            let outcome = if leader == Some(t.to) {
                Ok(Reply::LeaderTransferring { to: t.to })
            } else {
                Err(RequestError::TransferFailed { to: t.to, reason: "the leader stepped down first".into() })
            };
            self.outputs.push_back(Output::Reply { client, seq, outcome });
        }
    }

    /// The leader told this replica to stand at once (a transfer): it does, if it may vote.
    pub(crate) fn on_timeout_now(&mut self, from: ReplicaId) {
        if self.leader != Some(from) || !self.is_voter(self.me) || self.abstains() || self.installing.is_some() {
            return;
        }
        self.campaign(true);
    }

    /// Every member with its role, and on the leader how far each one's log matches.
    pub(crate) fn member_statuses(&self) -> Vec<MemberStatus> {
        let matched = |id: ReplicaId| match &self.role {
            Role::Leader { .. } if id == self.me => Some(self.durable),
            Role::Leader { progress } => progress.get(&id).map(|p| p.matched),
            _ => None,
        };
        self.members().iter().map(|(&id, &role)| MemberStatus { id, role, matched: matched(id) }).collect()
    }
}
