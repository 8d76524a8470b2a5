//! Membership in the simulator: replicas that start empty and join, an operator who changes the
//! membership while the faults go on, and the checkers of the rules that make changes safe.
//!
//! The operator (`[membership]` in a scenario) asks the replica that leads, as `truba member`
//! would: add a replica that is not a member as a learner, promote a learner, remove a member
//! (never below `voters_min` voters), or transfer leadership. Sometimes it sends a second change
//! right behind the first, or asks a leader the moment it is elected: the leader must refuse
//! both until the rules allow them. Its requests and answers go into the history as lines of
//! their own; the session checkers never see them.
//!
//! Checked as the run goes, for every scenario (without membership changes they hold trivially,
//! except `quorum-commit`, which checks every commit):
//! - `vote-once`: no replica grants its vote in one term to two candidates (standing counts as a
//!   vote for itself), whatever happened to its hard state (crashes, one damaged copy, both
//!   copies lost).
//! - `learner-never-votes`: a replica that is not a voter in the configuration in force on it
//!   never asks for a vote, and every leader was granted votes by a majority of the voters of
//!   its configuration. (A replica that does not yet know it was promoted must still grant a
//!   vote when asked, as Raft requires, so the grant itself is not the violation; being counted
//!   without being a voter in the candidate's configuration is.)
//! - `quorum-commit`: whenever a leader's commit index moves, a majority of the voters of its
//!   configuration acknowledged that entry to it in its term (an acknowledgement says the entry
//!   is durable on the sender; the leader counts its own durable log). A learner's
//!   acknowledgement does not count.
//! - `one-change-in-flight`: a leader proposes a membership change only once every earlier one
//!   in its log is committed.
//! - `own-term-commit`: a leader proposes no membership change before it has committed an entry
//!   of its own term.
//! - `promote-caught-up`: a learner is promoted only if it durably holds what the leader had
//!   committed when it proposed the promotion, but for `promote_lag_entries_max` entries.

use super::{Ev, World};
use crate::history::Event;
use rand::Rng;
use truba_engine::{
    ClientId, Engine, Index, MemberAddrs, MemberChange, MemberRole, Message, Outcome, ReplicaId, Reply, Request,
    RequestError, Seq,
};

/// The operator's client id: far from the agents' and the streamers'.
pub(super) const MEMBER_CLIENT: ClientId = ClientId(u64::MAX - 1);

/// The membership operator's state and the checkers' memory.
#[derive(Default)]
pub(super) struct MemberOps {
    seq: u64,
    /// Per replica: its commit index after its last step, and how far its log is known to be
    /// durable (kept across crashes and repairs: what it once acknowledged).
    commit_seen: Vec<u64>,
    /// The highest index each replica acknowledged to the leader of each term: (term, replica).
    acks: std::collections::BTreeMap<(u64, u32), Index>,
    durable_known: Vec<u64>,
    /// The candidate each replica granted its vote to, by (term, voter).
    votes: std::collections::BTreeMap<(u64, usize), usize>,
    /// Votes granted, by (term, candidate).
    grants: std::collections::BTreeMap<(u64, usize), std::collections::BTreeSet<u32>>,
    /// Membership entries already checked, by (replica, index, term).
    seen_changes: std::collections::BTreeSet<(usize, u64, u64)>,
}

impl MemberOps {
    pub fn new(replicas: usize) -> MemberOps {
        MemberOps { commit_seen: vec![0; replicas], durable_known: vec![0; replicas], ..MemberOps::default() }
    }
}

impl World {
    /// The engine replica `r` starts with: a voter of the initial configuration, or one that
    /// joins (empty until a leader sends it the log).
    pub(super) fn new_engine(&self, r: usize, seed: u64) -> Engine {
        let cfg = self.replica_config(r);
        let initial = self.sc.membership.initial_voters.unwrap_or(self.sc.replicas) as usize;
        if r < initial {
            let voters: Vec<ReplicaId> = (0..initial as u32).map(ReplicaId).collect();
            Engine::replica(cfg, ReplicaId(r as u32), voters, seed)
        } else {
            Engine::joining(cfg, ReplicaId(r as u32), seed)
        }
    }

    /// Schedules the operator's first change, if the scenario has one.
    pub(super) fn start_membership(&mut self) {
        if let Some(range) = self.sc.membership.every_ms {
            let t = self.now_us + self.member_rng.gen_range(range.0..=range.1) * 1000;
            self.at(t, Ev::Membership);
        }
    }

    /// The operator makes one change (and, now and then, a second right behind it).
    pub(super) fn membership_event(&mut self) {
        if !self.liveness {
            self.operate_members();
        }
        self.start_membership();
    }

    fn operate_members(&mut self) {
        let Some(leader) = self.final_leader() else { return };
        let Some(change) = self.draw_change(leader) else { return };
        self.send_member_request(leader, change);
        if self.member_rng.gen_bool(self.sc.membership.burst_share) {
            if let Some(second) = self.draw_change(leader) {
                self.send_member_request(leader, second);
            }
        }
    }

    /// One change that makes sense for the configuration the leader has in force.
    fn draw_change(&mut self, leader: usize) -> Option<Request> {
        let e = self.replicas[leader].engine.as_ref()?;
        let members = e.members().clone();
        let voters: Vec<ReplicaId> =
            members.iter().filter(|(_, r)| **r == MemberRole::Voter).map(|(i, _)| *i).collect();
        if voters.len() > 1 && self.member_rng.gen_bool(self.sc.membership.transfer_share) {
            let others: Vec<ReplicaId> = voters.iter().copied().filter(|v| v.0 as usize != leader).collect();
            let to = others[self.member_rng.gen_range(0..others.len())];
            return Some(Request::TransferLeader { to });
        }
        let mut options = Vec::new();
        for r in 0..self.replicas.len() as u32 {
            let id = ReplicaId(r);
            match members.get(&id) {
                None => options.push(MemberChange::AddLearner(id)),
                Some(MemberRole::Learner) => {
                    options.push(MemberChange::Promote(id));
                    options.push(MemberChange::Remove(id));
                }
                Some(MemberRole::Voter)
                    if r as usize != leader && voters.len() > self.sc.membership.voters_min as usize =>
                {
                    options.push(MemberChange::Remove(id));
                }
                Some(MemberRole::Voter) => {}
            }
        }
        if options.is_empty() {
            return None;
        }
        let change = options[self.member_rng.gen_range(0..options.len())];
        // Addresses mean nothing in the simulator, but they travel and are kept as a server's are.
        let addrs = match change {
            MemberChange::AddLearner(id) => {
                Some(MemberAddrs { peer: format!("replica-{}:7100", id.0), client: format!("replica-{}:7000", id.0) })
            }
            _ => None,
        };
        Some(Request::ChangeMembers { change, addrs })
    }

    fn send_member_request(&mut self, to: usize, request: Request) {
        self.member_ops.seq += 1;
        let seq = Seq(self.member_ops.seq);
        let what = format!("operator asks {to}: {}", crate::history::describe_request(&request));
        self.history.push(self.now_us, Event::Fault { what });
        self.member_pending.insert(seq, request.clone());
        let t = self.net_delay();
        self.at(t, Ev::Request { to, client: MEMBER_CLIENT, seq, request });
    }

    /// The operator's answer goes into the history; it is not retried (the next change is drawn
    /// afresh from the configuration then in force).
    pub(super) fn member_reply(&mut self, seq: Seq, outcome: Outcome) {
        let Some(request) = self.member_pending.remove(&seq) else { return };
        match &outcome {
            Ok(Reply::MembersChanged { .. }) => self.stats.member_changes += 1,
            Ok(Reply::LeaderTransferring { .. }) => self.stats.transfers += 1,
            Err(RequestError::MemberChangeBusy(_) | RequestError::LearnerBehind { .. }) => {
                self.stats.member_refusals += 1
            }
            _ => {}
        }
        let answer = match &outcome {
            Ok(reply) => format!("{reply:?}"),
            Err(e) => format!("refused: {e}"),
        };
        let what = format!("operator: {} -> {answer}", crate::history::describe_request(&request));
        self.history.push(self.now_us, Event::Fault { what });
    }

    /// A new leader: now and then the operator asks it for a change at once.
    pub(super) fn on_new_leader(&mut self, r: usize) {
        let m = &self.sc.membership;
        if m.changes() && !self.liveness && self.member_rng.gen_bool(m.on_election_share) {
            if let Some(change) = self.draw_change(r) {
                self.send_member_request(r, change);
            }
        }
    }

    /// `learner-never-votes`, for every message a replica sends: only a voter (by the
    /// configuration in force on it) asks for votes; every vote granted is noted for the check
    /// at election.
    pub(super) fn check_vote_sent(&mut self, r: usize, to: usize, message: &Message) {
        match message {
            Message::VoteReply { granted: true, term } => {
                self.member_ops.grants.entry((term.0, to)).or_default().insert(r as u32);
                self.check_vote_once(r, to, term.0);
            }
            Message::AppendReply { term, ok: true, matched, .. } => {
                let acked = self.member_ops.acks.entry((term.0, r as u32)).or_default();
                *acked = (*acked).max(*matched);
                // Only recent terms' leaders can still commit.
                let oldest = term.0.saturating_sub(16);
                if self.member_ops.acks.first_key_value().is_some_and(|((t, _), _)| *t < oldest) {
                    self.member_ops.acks.retain(|(t, _), _| *t >= oldest);
                }
            }
            Message::Vote { term, .. } => {
                // A candidate's requests leave once its vote for itself is durable.
                self.check_vote_once(r, r, term.0);
                self.check_asks_as_voter(r, message);
            }
            Message::PreVote { .. } => self.check_asks_as_voter(r, message),
            _ => {}
        }
    }

    /// `learner-never-votes`: only a voter (by the configuration in force on it) asks for votes.
    fn check_asks_as_voter(&mut self, r: usize, message: &Message) {
        let Some(e) = self.replicas[r].engine.as_ref() else { return };
        let role = e.members().get(&ReplicaId(r as u32)).copied();
        if role != Some(MemberRole::Voter) {
            let detail = format!("replica {r}, {role:?} in its configuration, sent {}", message.name());
            self.violate("learner-never-votes", detail);
        }
    }

    /// `vote-once`: a replica grants its vote in a term to one candidate only, across crashes,
    /// damaged hard state copies and lost ones (a grant repeated to the same candidate is fine).
    fn check_vote_once(&mut self, voter: usize, candidate: usize, term: u64) {
        let votes = &mut self.member_ops.votes;
        let before = votes.insert((term, voter), candidate);
        // Terms far behind the newest vote are done with: nobody still counts votes in them.
        let oldest = term.saturating_sub(64);
        if votes.first_key_value().is_some_and(|((t, _), _)| *t < oldest) {
            votes.retain(|(t, _), _| *t >= oldest);
        }
        if let Some(before) = before.filter(|b| *b != candidate) {
            let detail = format!("replica {voter} voted for {before} and then for {candidate} in term {term}");
            self.violate("vote-once", detail);
        }
    }

    /// `learner-never-votes`, at an election: a majority of the new leader's voters granted it
    /// their vote in its term (itself included); a learner's vote would not be among them.
    pub(super) fn check_elected(&mut self, r: usize, term: u64) {
        let Some(e) = self.replicas[r].engine.as_ref() else { return };
        let members = e.members().clone();
        let voters: Vec<u32> = members.iter().filter(|(_, m)| **m == MemberRole::Voter).map(|(i, _)| i.0).collect();
        let mut granted = self.member_ops.grants.remove(&(term, r)).unwrap_or_default();
        granted.insert(r as u32);
        let counted = voters.iter().filter(|v| granted.contains(v)).count();
        if counted < voters.len() / 2 + 1 {
            let detail = format!(
                "replica {r} leads term {term} with votes from {granted:?}, not a majority of its voters {voters:?}"
            );
            self.violate("learner-never-votes", detail);
        }
        self.member_ops.grants.retain(|(t, _), _| *t > term);
    }

    /// After every step of replica `r`: what it now holds durably, and the membership rules if
    /// it leads.
    pub(super) fn check_membership(&mut self, r: usize) {
        let Some(e) = self.replicas[r].engine.as_ref() else { return };
        if !e.is_serving() {
            return;
        }
        let view = e.membership();
        if !e.is_repairing() {
            self.member_ops.durable_known[r] = view.durable.0;
        }
        let commit_before = std::mem::replace(&mut self.member_ops.commit_seen[r], e.commit_index().0);
        if !e.is_leader() {
            return;
        }
        let mut found = Vec::new();
        if e.commit_index().0 > commit_before {
            found.extend(self.quorum_commit(r, e.commit_index()).map(|d| ("quorum-commit", d)));
        }
        let term = e.term();
        for (index, t, change) in &view.uncommitted {
            if *t != term || !self.member_ops.seen_changes.insert((r, index.0, t.0)) {
                continue;
            }
            // A new leader may hold several uncommitted changes of earlier terms (each proposed
            // once the one before was committed, which it may not know yet); what it must not do
            // is propose one of its own behind any it does not know to be committed.
            if let Some((earlier, _, c)) = view.uncommitted.iter().find(|(j, _, _)| j < index) {
                let d = format!(
                    "leader {r} proposed `{change}` at {} while `{c}` at {} was not committed",
                    index.0, earlier.0
                );
                found.push(("one-change-in-flight", d));
            }
            if commit_before < view.term_start.0 && e.commit_index() < view.term_start {
                let d = format!(
                    "leader {r} proposed `{change}` at {} before committing its own first entry {}",
                    index.0, view.term_start.0
                );
                found.push(("own-term-commit", d));
            }
            if let MemberChange::Promote(id) = change {
                let held = self.member_ops.durable_known.get(id.0 as usize).copied().unwrap_or(0);
                if held.saturating_add(self.cfg.consensus.promote_lag_entries_max) < commit_before {
                    let d = format!(
                        "leader {r} promoted {id} at {} while it held only through {held} of {commit_before} committed",
                        index.0
                    );
                    found.push(("promote-caught-up", d));
                }
            }
        }
        for (property, detail) in found {
            self.violate(property, detail);
        }
    }

    /// Whether a majority of leader `r`'s voters acknowledged its commit index in its term (an
    /// acknowledgement says the entries are durable on the sender), the leader counting its own
    /// durable log.
    fn quorum_commit(&self, r: usize, commit: Index) -> Option<String> {
        let e = self.replicas[r].engine.as_ref()?;
        let term = e.term().0;
        let voters: Vec<u32> = e.members().iter().filter(|(_, m)| **m == MemberRole::Voter).map(|(i, _)| i.0).collect();
        let durable = e.membership().durable;
        let acked = |v: u32| {
            if v as usize == r {
                durable
            } else {
                self.member_ops.acks.get(&(term, v)).copied().unwrap_or(Index(0))
            }
        };
        let holders: Vec<u32> = voters.iter().copied().filter(|v| acked(*v) >= commit).collect();
        (holders.len() < voters.len() / 2 + 1).then(|| {
            let seen: Vec<String> = voters.iter().map(|v| format!("{v}: {}", acked(*v).0)).collect();
            format!(
                "leader {r} committed {} in term {term} but only voters {holders:?} of {voters:?} acknowledged it \
                 (durable or acknowledged through: {})",
                commit.0,
                seen.join(", ")
            )
        })
    }

    /// Now and then (`read_learner_share`), a learner of the leader's configuration for a reader
    /// to ask: it answers a linearizable read itself, through the leader's read index. Draws
    /// from the membership stream only when the share is set.
    pub(super) fn learner_to_read_from(&mut self) -> Option<usize> {
        let share = self.sc.workload.read_learner_share;
        if share <= 0.0 || !self.member_rng.gen_bool(share.min(1.0)) {
            return None;
        }
        let leader = self.final_leader()?;
        let members = self.replicas[leader].engine.as_ref()?.members().clone();
        let learners: Vec<usize> =
            members.iter().filter(|(_, r)| **r == MemberRole::Learner).map(|(id, _)| id.0 as usize).collect();
        (!learners.is_empty()).then(|| learners[self.member_rng.gen_range(0..learners.len())])
    }

    /// Replicas the final leader's configuration does not name (never added, or removed) are
    /// not expected to converge.
    pub(super) fn is_final_member(&self, r: usize) -> bool {
        let Some(l) = self.final_leader() else { return true };
        let Some(e) = self.replicas[l].engine.as_ref() else { return true };
        e.members().contains_key(&ReplicaId(r as u32))
    }
}
