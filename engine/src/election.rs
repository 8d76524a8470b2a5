//! Leader election: Raft's, with pre-vote and check-quorum.
//!
//! Why Raft rather than Viewstamped Replication: the log already carries `(term, index)` in
//! every record and is written by one leader at a time, which is Raft's shape; Raft's rules for
//! what a follower may truncate are stated per entry, which suits a log that is also the
//! session store's history; and the literature on pre-vote, check-quorum and leader stickiness
//! (Ongaro's thesis, etcd's raft) is the most thoroughly tested, so this module follows it
//! instead of inventing variations.
//!
//! - A follower that hears nothing from a leader for a random election timeout first asks for
//!   pre-votes in the next term without raising its own, so a replica that was cut off and
//!   comes back cannot depose a healthy leader by bumping the term.
//! - With a majority of pre-votes it becomes a candidate: it raises its term, votes for
//!   itself, and asks for votes. The vote requests leave only once that term and vote are
//!   durable (`send` holds them), and a voter's grant leaves only once its vote is durable.
//! - Check-quorum: a leader that has not heard from a majority for an election timeout steps
//!   down, and a replica that heard from a leader within the minimum election timeout ignores
//!   vote requests (leader stickiness), so a healthy leader is not interrupted.

use crate::engine::{Engine, Role};
use crate::error::RequestError;
use crate::io::Output;
use crate::message::Message;
use crate::op::Command;
use crate::repeater::Repeater;
use crate::replication::Progress;
use crate::types::{Duration, Index, ReplicaId, Term};
use rand::Rng;
use std::collections::BTreeSet;

impl Engine {
    /// Recovery is done: every replica starts as a follower; a lone voter elects itself at once.
    pub(crate) fn start_following(&mut self) {
        self.role = Role::Follower;
        self.report_role();
        self.reset_election_timer();
        if self.is_lone_voter() {
            self.on_election_timeout();
        }
    }

    pub(crate) fn reset_election_timer(&mut self) {
        let c = &self.cfg.consensus;
        let ms =
            self.rng.gen_range(c.election_timeout_ms_min..=c.election_timeout_ms_max.max(c.election_timeout_ms_min));
        self.election_deadline = self.now.mono.saturating_add(Duration(ms));
    }

    pub(crate) fn consensus_tick(&mut self) {
        if matches!(self.role, Role::Candidate { .. } | Role::PreCandidate { .. }) {
            self.resend_vote_requests();
        }
        if self.is_leader() {
            self.expire_transfer();
            self.advance_transfer();
            if self.now.mono >= self.heartbeat_due {
                self.heartbeat_due = self.now.mono.saturating_add(Duration(self.cfg.consensus.heartbeat_ms));
                self.check_quorum();
                if self.is_leader() {
                    self.heartbeat();
                }
            }
        } else if self.now.mono >= self.election_deadline {
            self.on_election_timeout();
        }
    }

    fn on_election_timeout(&mut self) {
        self.reset_election_timer();
        // A learner, or a replica that is not (or no longer) a member, never stands.
        if self.installing.is_some() || self.abstains() || !self.is_voter(self.me) {
            return;
        }
        if self.cfg.consensus.pre_vote {
            self.pre_campaign();
        } else {
            self.campaign(false);
        }
    }

    fn pre_campaign(&mut self) {
        let granted = BTreeSet::from([self.me]);
        self.role = Role::PreCandidate { granted };
        self.heartbeat_due = self.now.mono.saturating_add(Duration(self.cfg.consensus.heartbeat_ms));
        self.leader = None;
        self.report_role();
        let m = Message::PreVote {
            term: Term(self.term().0 + 1),
            last_index: self.log.last_index(),
            last_term: self.log.last_term(),
        };
        for peer in self.voting_peers() {
            self.send(peer, m.clone());
        }
        self.count_votes();
    }

    /// `transfer`: the leader told this replica to stand (see `reconfiguration.rs`).
    pub(crate) fn campaign(&mut self, transfer: bool) {
        let term = Term(self.term().0 + 1);
        self.want_hard_state(self.hard.wanted.with(term, Some(self.me)));
        // A full election timeout for the election itself, as for the pre-vote before it.
        self.reset_election_timer();
        self.role = Role::Candidate { granted: BTreeSet::from([self.me]), transfer };
        self.heartbeat_due = self.now.mono.saturating_add(Duration(self.cfg.consensus.heartbeat_ms));
        self.leader = None;
        self.ack_upto = Index(0);
        self.report_role();
        let m = Message::Vote { term, last_index: self.log.last_index(), last_term: self.log.last_term(), transfer };
        for peer in self.voting_peers() {
            self.send(peer, m.clone());
        }
        self.count_votes();
    }

    /// A candidate asks again, every heartbeat interval, the voters that have not answered:
    /// the network may have lost the request or the answer.
    fn resend_vote_requests(&mut self) {
        if self.now.mono < self.heartbeat_due {
            return;
        }
        self.heartbeat_due = self.now.mono.saturating_add(Duration(self.cfg.consensus.heartbeat_ms));
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        let (granted, m) = match &self.role {
            Role::PreCandidate { granted } => {
                (granted.clone(), Message::PreVote { term: Term(self.term().0 + 1), last_index, last_term })
            }
            Role::Candidate { granted, transfer } => {
                let transfer = *transfer;
                (granted.clone(), Message::Vote { term: self.term(), last_index, last_term, transfer })
            }
            _ => return,
        };
        for peer in self.voting_peers().into_iter().filter(|p| !granted.contains(p)) {
            self.send(peer, m.clone());
        }
    }

    /// Votes count only from voters of the configuration in force (it may have changed since
    /// they were asked).
    fn count_votes(&mut self) {
        let majority = self.majority();
        let enough = |g: &BTreeSet<ReplicaId>| g.iter().filter(|id| self.counts(**id)).count() >= majority;
        match &self.role {
            Role::PreCandidate { granted } if enough(granted) => self.campaign(false),
            Role::Candidate { granted, .. } if enough(granted) => self.become_leader(),
            _ => {}
        }
    }

    fn become_leader(&mut self) {
        let next = self.log.last_index().next();
        let progress = self.peers().into_iter().map(|p| (p, Progress::new(next, self.now.mono))).collect();
        self.role = Role::Leader { progress };
        self.leader = Some(self.me);
        self.transfer = None;
        self.repeater = Repeater::default();
        self.files.forget_proposals();
        self.heartbeat_due = self.now.mono;
        self.report_role();
        self.term_start = self.propose(Command::Noop);
        if self.state.config().version == 0 {
            // A new cluster (or one whose first leader's bootstrap this replica has not applied
            // yet): propose this node's own configuration. It comes before every request of
            // this term, and only the first bootstrap the log applies takes effect.
            self.propose(Command::Bootstrap { config: self.local_config.clone() });
        }
        self.reads = Default::default();
        self.heartbeat();
    }

    /// Adopts `term` (if newer) as a follower. A leader or candidate that steps down forgets the
    /// clients it was answering: their requests may still commit, and their retries find the
    /// answer in the deduplication table wherever they land.
    pub(crate) fn become_follower(&mut self, term: Term, leader: Option<ReplicaId>) {
        let newer = term > self.term();
        if newer {
            self.want_hard_state(self.hard.wanted.with(term, None));
            self.ack_upto = Index(0);
            self.leader_round = 0;
        }
        let changed = newer || !matches!(self.role, Role::Follower) || self.leader != leader;
        if !matches!(self.role, Role::Follower) {
            self.reset_election_timer();
        }
        if self.is_leader() {
            // Their clients learn at once to retry elsewhere, rather than after a timeout.
            for (_, (client, seq)) in std::mem::take(&mut self.proposed) {
                let e = RequestError::LeaderLost { leader };
                self.outputs.push_back(Output::Reply { client, seq, outcome: Err(e) });
            }
            self.waiting.clear();
            self.repeater = Repeater::default();
            self.refuse_reads(leader);
            self.end_transfer(leader);
        }
        self.role = Role::Follower;
        if self.leader != leader {
            self.ack_upto = Index(0);
            self.leader_round = 0;
        }
        self.leader = leader;
        if changed {
            self.report_role();
        }
    }

    pub(crate) fn report_role(&mut self) {
        let o = Output::Role { role: self.role.name(), term: self.term(), leader: self.leader };
        self.outputs.push_back(o);
    }

    /// A leader that cannot hear from a majority steps down rather than keep clients waiting
    /// on a term that can no longer commit anything.
    fn check_quorum(&mut self) {
        if !self.cfg.consensus.check_quorum {
            return;
        }
        if !self.is_leader() {
            return;
        }
        let window = Duration(self.cfg.consensus.election_timeout_ms_max);
        let heard = |p: &&crate::replication::Progress| self.now.mono.saturating_since(p.heard_at) <= window;
        let active = self.counting_progress().into_iter().filter(heard).count() + 1;
        if active < self.majority() {
            let term = self.term();
            self.become_follower(term, None);
        }
    }

    /// Whether a leader was heard from recently enough that a vote request must be a
    /// disruption, not a real failure.
    fn leader_is_alive(&self) -> bool {
        if self.is_leader() {
            return true;
        }
        let min = Duration(self.cfg.consensus.election_timeout_ms_min);
        self.cfg.consensus.check_quorum
            && self.leader.is_some()
            && self.leader_heard_at.is_some_and(|t| self.now.mono.saturating_since(t) < min)
    }

    fn log_is_current(&self, last_index: Index, last_term: Term) -> bool {
        (last_term, last_index) >= (self.log.last_term(), self.log.last_index())
    }

    pub(crate) fn on_pre_vote(&mut self, from: ReplicaId, term: Term, last_index: Index, last_term: Term) {
        let granted = term > self.term()
            && !self.leader_is_alive()
            && !self.abstains()
            && self.log_is_current(last_index, last_term);
        let reply_term = if granted { term } else { self.term() };
        self.send(from, Message::PreVoteReply { term: reply_term, granted });
    }

    pub(crate) fn on_pre_vote_reply(&mut self, from: ReplicaId, term: Term, granted: bool) {
        if !granted && term > self.term() {
            self.become_follower(term, None);
            return;
        }
        if let Role::PreCandidate { granted: g } = &mut self.role {
            if granted && term == Term(self.hard.wanted.term.0 + 1) {
                g.insert(from);
                self.count_votes();
            }
        }
    }

    pub(crate) fn on_vote(&mut self, from: ReplicaId, term: Term, last_index: Index, last_term: Term) {
        let vote = self.hard.wanted.vote;
        let free = vote.is_none() || vote == Some(from);
        let granted = term == self.term() && free && !self.abstains() && self.log_is_current(last_index, last_term);
        if granted {
            self.want_hard_state(self.hard.wanted.with(term, Some(from)));
            self.reset_election_timer();
        }
        self.send(from, Message::VoteReply { term: self.term(), granted });
    }

    pub(crate) fn on_vote_reply(&mut self, from: ReplicaId, term: Term, granted: bool) {
        if term != self.term() || !granted {
            return;
        }
        if let Role::Candidate { granted: g, .. } = &mut self.role {
            g.insert(from);
            self.count_votes();
        }
    }

    /// The first look at every message: a newer term is adopted before anything else (except
    /// for pre-votes, which change nothing, and vote requests that leader stickiness ignores).
    pub(crate) fn on_message(&mut self, from: ReplicaId, message: Message) {
        if !self.is_serving() || from == self.me || !self.accepts(from, &message) {
            return;
        }
        if let Err(bad) = message.check() {
            self.outputs.push_back(Output::PeerMessageRefused {
                from,
                message: message.name(),
                reason: bad.to_string(),
            });
            return;
        }
        let term = message.term();
        if term > self.term() && !message.is_pre_vote() {
            if matches!(message, Message::Vote { transfer: false, .. }) && self.leader_is_alive() {
                return;
            }
            let leader = matches!(message, Message::Append { .. } | Message::Snapshot { .. }).then_some(from);
            self.become_follower(term, leader);
        }
        match message {
            Message::PreVote { term, last_index, last_term } => self.on_pre_vote(from, term, last_index, last_term),
            Message::PreVoteReply { term, granted } => self.on_pre_vote_reply(from, term, granted),
            Message::Vote { term, last_index, last_term, .. } => self.on_vote(from, term, last_index, last_term),
            Message::VoteReply { term, granted } => self.on_vote_reply(from, term, granted),
            Message::Append { term, prev_index, prev_term, commit, round, entries } => {
                self.on_append(from, term, (prev_index, prev_term), commit, round, entries)
            }
            Message::AppendReply { term, ok, matched, hint, round, sources } => {
                self.on_append_reply(from, term, (ok, matched, hint), round, sources)
            }
            Message::Snapshot { term, index, last_term, state, sources } => {
                self.on_snapshot(from, term, index, last_term, state, sources)
            }
            Message::SourceFetch { term, source, offset, len } => self.on_source_fetch(from, term, source, offset, len),
            Message::SourcePiece { term, source, offset, data } => {
                self.on_source_piece(from, term, source, offset, data)
            }
            Message::TimeoutNow { term } if term == self.term() => self.on_timeout_now(from),
            Message::TimeoutNow { .. } => {}
            Message::ReadIndex { term, ctx } => self.on_read_index(from, term, ctx),
            Message::ReadIndexReply { term, ctx, index } => self.on_read_index_reply(from, term, ctx, index),
        }
    }

    /// Whom this replica listens to. Requests (for votes, entries, snapshots) are taken from
    /// anyone, as Raft requires (section 4.1 of Ongaro's thesis): a replica whose log does not
    /// yet hold the entry that made it a voter, or that names the candidate or leader, must
    /// still vote and follow, or a cluster whose latest change reached only some members could
    /// never elect a leader again. Removed members cannot disrupt: they stop standing once
    /// their log holds their removal, and until then pre-vote and leader stickiness keep them
    /// out. Answers are taken only from members, and only voters' count (see `counts`).
    fn accepts(&self, from: ReplicaId, message: &Message) -> bool {
        match message {
            Message::PreVote { .. }
            | Message::Vote { .. }
            | Message::Append { .. }
            | Message::Snapshot { .. }
            | Message::SourcePiece { .. }
            | Message::TimeoutNow { .. } => true,
            _ => self.members().contains_key(&from),
        }
    }

    /// Sends a message once what it depends on is durable: any message carrying a term needs
    /// that term in the hard state, and a granted vote needs the vote there too. Pre-votes
    /// depend on nothing.
    pub(crate) fn send(&mut self, to: ReplicaId, message: Message) {
        if self.sendable(to, &message) {
            self.outputs.push_back(Output::Send { to, message });
            return;
        }
        if self.held.len() >= self.cfg.consensus.held_messages_max as usize {
            // The network may lose any message; dropping the oldest held one is no worse.
            self.held.pop_front();
        }
        self.held.push_back((to, message));
    }

    fn sendable(&self, to: ReplicaId, m: &Message) -> bool {
        if m.is_pre_vote() || self.cfg.mutation(|m| m.vote_before_persist) {
            return true;
        }
        let durable = self.hard.durable;
        match m {
            Message::VoteReply { granted: true, term } => durable.term == *term && durable.vote == Some(to),
            _ => durable.term >= m.term(),
        }
    }

    /// The hard state advanced: send what waited for it; drop what a newer term made stale.
    pub(crate) fn release_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        for (to, m) in held {
            if m.term() < self.term() && !m.is_pre_vote() {
                continue;
            }
            if self.sendable(to, &m) {
                self.outputs.push_back(Output::Send { to, message: m });
            } else {
                self.held.push_back((to, m));
            }
        }
    }
}
