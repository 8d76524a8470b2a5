//! Linearizable reads: Raft's read index (section 6.4 of Ongaro's thesis).
//!
//! A leader cannot answer a read from its applied state straight away: a newer leader may have
//! been elected without it knowing, and then its state is stale. So a read waits for two things:
//! a confirmation round started after the read arrived, which a majority (the leader included)
//! answered within the leader's term, proving it still led at some moment after the read
//! arrived; and the leader's applied index reaching its commit index as it was when the read
//! arrived (and at least its own first entry, so that the commit index is its term's). Reads
//! that arrive while a round is in flight share the next one, so a burst of reads costs one round.
//!
//! Check-quorum with leases would save the round, but only as long as clocks keep their rate;
//! the round costs one network round trip and no fsync, so reads stay cheap without that risk.

use crate::engine::Engine;
use crate::error::RequestError;
use crate::io::Output;
use crate::message::Message;
use crate::op::QueryReply;
use crate::types::{Index, Kind, ReplicaId, SessionId, Term};
use std::collections::VecDeque;

/// A query answered from the replicated state, and so only once the leader knows it leads.
#[derive(Clone, Debug)]
pub(crate) enum ReadQuery {
    Session(SessionId),
    Dead {
        kind: Kind,
        after: Option<SessionId>,
        limit: u32,
    },
    Checkpoint(String),
    Config,
    /// A learner's read index request (see `Reads::local`).
    Remote {
        from: ReplicaId,
        ctx: u64,
    },
}

impl ReadQuery {
    fn refused(&self, e: RequestError) -> QueryReply {
        match self {
            ReadQuery::Session(_) => QueryReply::Session(Err(e)),
            ReadQuery::Dead { .. } => QueryReply::Dead(Err(e)),
            ReadQuery::Checkpoint(_) => QueryReply::Checkpoint(Err(e)),
            ReadQuery::Config => QueryReply::Config(Err(e)),
            ReadQuery::Remote { .. } => unreachable!("a remote read is answered with a message"),
        }
    }
}

struct PendingRead {
    id: u64,
    query: ReadQuery,
    index: Index,
    round: u64,
}

/// Reads of spilled sessions' frames for `get` under way at once, at most.
const SESSION_READS_MAX: usize = 16;

#[derive(Default)]
pub(crate) struct Reads {
    /// The newest confirmation round sent to the followers.
    pub round_sent: u64,
    pending: VecDeque<PendingRead>,
    /// A learner's linearizable reads, by context number: the query, when it was asked, and the
    /// read index once the leader gave it. A learner answers `get` from its own state once it has
    /// applied the index the leader confirmed (Raft's read index, section 6.4 of the thesis,
    /// served by a non-leader), so reads scale with learners without stale answers.
    local: std::collections::BTreeMap<u64, LocalRead>,
    next_ctx: u64,
}

struct LocalRead {
    id: u64,
    session: SessionId,
    asked_at: crate::types::Instant,
    index: Option<Index>,
}

impl Reads {
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// A learner's reads waiting for their read index.
    pub fn local_len(&self) -> usize {
        self.local.len()
    }

    /// When the oldest of a learner's reads is given up, if any waits.
    pub fn local_deadline(&self, timeout_ms: u64) -> Option<crate::types::Instant> {
        self.local.values().map(|r| r.asked_at).min().map(|t| t.saturating_add(crate::types::Duration(timeout_ms + 1)))
    }
}

impl Engine {
    /// A state query: answered once the leader has confirmed it still leads (see above).
    pub(crate) fn on_read(&mut self, id: u64, query: ReadQuery) {
        if let (ReadQuery::Session(session), Some(leader)) = (&query, self.learner_reads_from()) {
            self.read_locally(id, *session, leader);
            return;
        }
        if let ReadQuery::Remote { from, ctx } = query {
            let max = self.cfg.limits.pending_requests_max as usize;
            if !self.is_leader() || self.reads.len() >= max {
                self.refuse_read_index(from, ctx);
                return;
            }
        }
        if !self.is_leader() {
            let e = RequestError::NotLeader { leader: self.leader_hint() };
            self.outputs.push_back(Output::QueryReply { id, reply: query.refused(e) });
            return;
        }
        let max = self.cfg.limits.pending_requests_max;
        if self.reads.len() >= max as usize {
            let e = RequestError::Overloaded { max };
            self.outputs.push_back(Output::QueryReply { id, reply: query.refused(e) });
            return;
        }
        let index = self.commit.max(self.term_start);
        let round = self.reads.round_sent + 1;
        self.reads.pending.push_back(PendingRead { id, query, index, round });
        self.serve_reads();
    }

    fn round_confirmed(&self, round: u64) -> bool {
        if !self.is_leader() {
            return false;
        }
        self.counting_progress().iter().filter(|p| p.round >= round).count() + 1 >= self.majority()
    }

    /// Answers every read whose round is confirmed and whose index is applied, in arrival
    /// order, and starts the next round if reads wait for one.
    pub(crate) fn serve_reads(&mut self) {
        let unconfirmed_ok = self.cfg.mutation(|m| m.read_without_confirmation);
        while let Some(r) = self.reads.pending.front() {
            if !(unconfirmed_ok || self.round_confirmed(r.round)) || self.state.applied() < r.index {
                break;
            }
            let r = self.reads.pending.pop_front().expect("checked");
            let reply = match r.query {
                ReadQuery::Remote { from, ctx } => {
                    let term = self.term();
                    self.send(from, Message::ReadIndexReply { term, ctx, index: Some(r.index) });
                    continue;
                }
                ReadQuery::Session(session) => match self.session_reply(r.id, session) {
                    Some(reply) => reply,
                    None => continue, // answered once the frame is read
                },
                ReadQuery::Dead { kind, after, limit } => QueryReply::Dead(self.state.dead_page(kind, after, limit)),
                ReadQuery::Checkpoint(name) => {
                    QueryReply::Checkpoint(self.state.checkpoint(&name).ok_or(RequestError::UnknownConsumer(name)))
                }
                ReadQuery::Config => match self.state.config().version {
                    0 => QueryReply::Config(Err(RequestError::NotConfigured)),
                    _ => QueryReply::Config(Ok(self.state.config().clone())),
                },
            };
            self.outputs.push_back(Output::QueryReply { id: r.id, reply });
        }
        let next = self.reads.pending.back().map(|r| r.round);
        let in_flight = self.reads.round_sent > 0 && !self.round_confirmed(self.reads.round_sent);
        if next.is_some_and(|n| n > self.reads.round_sent) && !in_flight {
            self.reads.round_sent += 1;
            for peer in self.peers() {
                self.send_heartbeat(peer);
            }
            // Alone, a leader is its own majority: the round is confirmed at once.
            if self.majority() == 1 {
                self.serve_reads();
            }
        }
    }

    /// The answer to query `id` about `session` from this replica's applied state; `None` if a
    /// spilled session's frame is being read first (the answer goes out when it completes).
    pub(crate) fn session_reply(&mut self, id: u64, session: SessionId) -> Option<QueryReply> {
        match self.state.session_view(session) {
            Ok(view) if view.source.is_some() => self.read_spilled(id, view).map(|v| QueryReply::Session(Ok(v))),
            other => Some(QueryReply::Session(other)),
        }
    }

    /// A spilled session's view gets its records: from memory if held here, otherwise from its
    /// source file (`None`: a read was issued, and the answer goes out when it completes). Reads
    /// beyond a few at once, or of a file not durable here, answer without the records (the
    /// view's `source` says where they are).
    fn read_spilled(&mut self, query: u64, mut view: crate::op::SessionView) -> Option<crate::op::SessionView> {
        if let Some(u) = self.state.held_records(view.id) {
            (view.records, view.last_failure) = (u.records, u.last_failure);
            return Some(view);
        }
        let (source, offset, len) = self.state.spilled_frame(view.id)?;
        if self.session_reads.len() >= SESSION_READS_MAX || !self.files.durable.contains(&source) {
            return Some(view);
        }
        let op = crate::io::IoOp::ReadAt { file: crate::stored::source_name(source), offset, len: len as u64 };
        self.session_reads.insert(query, view);
        self.issue(op, crate::engine::Purpose::SessionRead(query));
        None
    }

    /// A spilled session's frame was read for a query: it is answered, with the records if the
    /// frame is whole and the session's (a failed or damaged read answers without them).
    pub(crate) fn spilled_read(&mut self, query: u64, result: Result<crate::io::IoReply, crate::io::DiskError>) {
        let Some(mut view) = self.session_reads.remove(&query) else { return };
        if let Ok(crate::io::IoReply::Data(data)) = result {
            let frame = crate::stored::frame_at(&data).ok().flatten();
            let decoded = frame.and_then(|f| {
                postcard::from_bytes::<crate::stored::Frame>(&f[crate::stored::FRAME_HEADER_LEN as usize..]).ok()
            });
            if let Some(f) = decoded.filter(|f| f.id == view.id) {
                (view.records, view.last_failure) = (f.records, f.last_failure);
            }
        }
        self.outputs.push_back(Output::QueryReply { id: query, reply: QueryReply::Session(Ok(view)) });
    }

    /// A leader that steps down cannot confirm anything: its waiting reads go to `leader`.
    pub(crate) fn refuse_reads(&mut self, leader: Option<crate::types::ReplicaId>) {
        for r in std::mem::take(&mut self.reads.pending) {
            if let ReadQuery::Remote { from, ctx } = r.query {
                self.refuse_read_index(from, ctx);
                continue;
            }
            let e = RequestError::NotLeader { leader };
            self.outputs.push_back(Output::QueryReply { id: r.id, reply: r.query.refused(e) });
        }
    }
}

impl Engine {
    /// The leader a learner asks for a read index, if this replica is a learner that knows one.
    /// Voters that follow send reads to the leader instead (a client redirects).
    fn learner_reads_from(&self) -> Option<ReplicaId> {
        let learner = self.members().get(&self.me) == Some(&crate::config::MemberRole::Learner);
        (learner && self.is_serving() && !self.is_leader()).then_some(self.leader?)
    }

    fn read_locally(&mut self, id: u64, session: SessionId, leader: ReplicaId) {
        let max = self.cfg.limits.pending_requests_max;
        if self.reads.local.len() >= max as usize {
            let e = RequestError::Overloaded { max };
            self.outputs.push_back(Output::QueryReply { id, reply: QueryReply::Session(Err(e)) });
            return;
        }
        self.reads.next_ctx += 1;
        let ctx = self.reads.next_ctx;
        let read = LocalRead { id, session, asked_at: self.now.mono, index: None };
        self.reads.local.insert(ctx, read);
        let term = self.term();
        self.send(leader, Message::ReadIndex { term, ctx });
    }

    /// The leader: a learner's read index, answered once a confirmation round covers it.
    pub(crate) fn on_read_index(&mut self, from: ReplicaId, term: Term, ctx: u64) {
        if term != self.term() {
            self.refuse_read_index(from, ctx);
            return;
        }
        self.on_read(0, ReadQuery::Remote { from, ctx });
    }

    /// Tells a learner its read cannot be confirmed here (it refuses it to its client).
    fn refuse_read_index(&mut self, from: ReplicaId, ctx: u64) {
        let term = self.term();
        self.send(from, Message::ReadIndexReply { term, ctx, index: None });
    }

    /// The learner: the leader's answer to one of its reads.
    pub(crate) fn on_read_index_reply(&mut self, from: ReplicaId, term: Term, ctx: u64, index: Option<Index>) {
        if term != self.term() || self.leader != Some(from) {
            return; // from an older leader: the read times out or was answered
        }
        match index {
            Some(i) => {
                if let Some(r) = self.reads.local.get_mut(&ctx) {
                    r.index = Some(i);
                }
                self.serve_local_reads();
            }
            None => {
                if let Some(r) = self.reads.local.remove(&ctx) {
                    let e = RequestError::NotLeader { leader: self.leader_hint() };
                    self.outputs.push_back(Output::QueryReply { id: r.id, reply: QueryReply::Session(Err(e)) });
                }
            }
        }
    }

    /// A replica that stops refuses the reads it was serving for its clients.
    pub(crate) fn refuse_local_reads(&mut self, e: RequestError) {
        for (_, r) in std::mem::take(&mut self.reads.local) {
            self.outputs.push_back(Output::QueryReply { id: r.id, reply: QueryReply::Session(Err(e.clone())) });
        }
    }

    /// Answers the learner's reads whose index it has applied, and refuses those the leader did
    /// not answer within an election timeout (the client asks the leader instead).
    pub(crate) fn serve_local_reads(&mut self) {
        if self.reads.local.is_empty() {
            return;
        }
        let (applied, now) = (self.state.applied(), self.now.mono);
        let timeout = crate::types::Duration(self.cfg.consensus.election_timeout_ms_max);
        let ready: Vec<u64> = self
            .reads
            .local
            .iter()
            .filter(|(_, r)| r.index.is_some_and(|i| applied >= i) || now.saturating_since(r.asked_at) > timeout)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in ready {
            let r = self.reads.local.remove(&ctx).expect("listed above");
            if r.index.is_none_or(|i| applied < i) {
                let e = RequestError::NotLeader { leader: self.leader_hint() };
                self.outputs.push_back(Output::QueryReply { id: r.id, reply: QueryReply::Session(Err(e)) });
                continue;
            }
            if let Some(reply) = self.session_reply(r.id, r.session) {
                self.outputs.push_back(Output::QueryReply { id: r.id, reply });
            }
        }
    }
}
