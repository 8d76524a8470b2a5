//! Log replication: the leader's side (what to send each follower, when an entry is committed)
//! and the follower's (accepting, truncating and acknowledging entries, installing snapshots).
//!
//! - The leader sends a follower entries from its `next` index on, several messages in flight
//!   at once (pipelining) up to a cap on messages and on bytes. After a rejection it probes with
//!   one message at a time until the follower's log matches again. A follower that needs entries
//!   the leader has compacted away gets the leader's state as a snapshot instead.
//! - A follower acknowledges only entries that are durable on its disk and known to match the
//!   leader's log; the leader commits an entry of its own term once a majority (itself
//!   included, counting only its own durable entries) holds it, and with it every earlier one.
//! - A rejection carries a hint (the follower's commit index, or its last index if that is
//!   lower), below which its log matches any leader's, so the leader jumps back at once.

use crate::engine::{Engine, Installing, Role};
use crate::io::IoOp;
use crate::message::Message;

/// Requests for source file pieces that go unanswered or come back damaged, in a row, before an
/// install is given up.
const FETCH_STALLS_MAX: u32 = 20;
/// Piece reads a leader runs at once for followers; more requests go unanswered (and are asked
/// again), so that followers cannot crowd out the leader's own disk work.
const SERVING_PIECES_MAX: usize = 4;
/// The largest piece a leader reads for one request (a frame longer than a piece is asked for
/// whole).
const PIECE_BYTES_MAX: u64 = 64 * 1024 * 1024;
use crate::op::Entry;
use crate::snapshot::decode_state;
use crate::stored::source_name;
use crate::types::{Duration, Index, Instant, ReplicaId, SourceId, Term};
use std::collections::{BTreeSet, VecDeque};

fn entry_bytes(e: &Entry) -> u64 {
    crate::codec::encoded_len(e.at, &e.command) as u64
}

/// What the leader knows about one follower.
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    /// The next entry to send.
    pub next: Index,
    /// The follower's log matches the leader's, durably, through here.
    pub matched: Index,
    /// Appends sent and not yet acknowledged: (last index, entry bytes, sent at).
    inflight: VecDeque<(Index, u64, Instant)>,
    inflight_bytes: u64,
    /// After a rejection (or at first) only one append is in flight until the logs match.
    probing: bool,
    /// A snapshot was sent at this time and is not yet acknowledged.
    snapshot_sent_at: Option<Instant>,
    /// When the follower last answered (check-quorum).
    pub heard_at: Instant,
    /// The highest confirmation round it echoed.
    pub round: u64,
    /// What the follower last reported of its source files (see `Message::AppendReply`).
    pub sources_mark: Index,
    /// The highest commit index sent to the follower (capped, as the follower caps it, by the
    /// last entry of the message that carried it): when it lags the commit through the
    /// follower's matched entries, an empty append tells it (see `tell_commit`).
    commit_told: Index,
}

impl Progress {
    pub fn new(next: Index, now: Instant) -> Progress {
        Progress {
            next,
            matched: Index(0),
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            probing: true,
            snapshot_sent_at: None,
            heard_at: now,
            round: 0,
            sources_mark: Index(0),
            commit_told: Index(0),
        }
    }

    fn restart_from(&mut self, next: Index) {
        self.next = next.max(self.matched.next());
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.probing = true;
    }
}

impl Engine {
    fn progress_mut(&mut self, peer: ReplicaId) -> Option<&mut Progress> {
        match &mut self.role {
            Role::Leader { progress } => progress.get_mut(&peer),
            _ => None,
        }
    }

    pub(crate) fn replicate_all(&mut self) {
        for peer in self.peers() {
            self.replicate(peer);
        }
    }

    /// Sends `peer` whatever it lacks, within the pipelining caps.
    pub(crate) fn replicate(&mut self, peer: ReplicaId) {
        let (term, commit, now, round) = (self.term(), self.commit, self.now.mono, self.reads.round_sent);
        let c = self.cfg.consensus.clone();
        let snapshot_retry = Duration(c.election_timeout_ms_max * 10);
        let base = self.log.base;
        let mut sends = Vec::new();
        let mut snapshot = false;
        {
            let log = &self.log;
            let Some(p) = (match &mut self.role {
                Role::Leader { progress } => progress.get_mut(&peer),
                _ => None,
            }) else {
                return;
            };
            let snapshot_recent = p.snapshot_sent_at.is_some_and(|t| now.saturating_since(t) < snapshot_retry);
            if p.next <= base && snapshot_recent {
                return;
            }
            if p.next <= base {
                snapshot = true;
            } else {
                while p.next <= log.last_index()
                    && p.inflight.len() < c.inflight_appends_max as usize
                    && p.inflight_bytes < c.inflight_bytes_max
                    && (!p.probing || p.inflight.is_empty())
                {
                    let entries = log.slice(p.next, c.append_bytes_max);
                    let bytes: u64 = entries.iter().map(|e| crate::codec::encoded_len(e.at, &e.command) as u64).sum();
                    let last = entries.last().expect("slice of an existing entry is not empty").index;
                    let prev_index = p.next.prev();
                    let prev_term = log.term_at(prev_index).expect("prev is at or after the base");
                    sends.push(Message::Append { term, prev_index, prev_term, commit, round, entries });
                    p.commit_told = p.commit_told.max(commit.min(last));
                    p.inflight.push_back((last, bytes, now));
                    p.inflight_bytes += bytes;
                    p.next = last.next();
                }
            }
        }
        for m in sends {
            self.send(peer, m);
        }
        if snapshot {
            self.offer_snapshot(peer);
        }
    }

    /// `peer` lacks entries the log no longer holds: it is sent the newest snapshot file, once
    /// read back from the disk (see `Snapshotter::serve`). Nothing is encoded here: at a
    /// million sessions that would take longer than an election timeout on the thread that
    /// sends heartbeats. Until the snapshot leaves, nothing else is sent to `peer` (entries
    /// after the snapshot would be refused), and it is not offered again for a while.
    fn offer_snapshot(&mut self, peer: ReplicaId) {
        let Some((index, manifest)) = self.snapshots.newest_manifest() else { return };
        // The follower fetches the source files the snapshot refers to without their records;
        // it waits while one of them is not durable here.
        if index < self.log.base || !self.files.all_durable(manifest) {
            return;
        }
        let now = self.now.mono;
        let Some(p) = self.progress_mut(peer) else { return };
        p.snapshot_sent_at = Some(now);
        if let Some(op) = self.snapshots.serve(peer) {
            self.issue(op, crate::engine::Purpose::SnapshotServe);
        }
    }

    /// The snapshot file was read back: it goes to every follower that asked and is still
    /// behind the log, with the appends after it pipelined right behind (the follower keeps
    /// taking them while it installs). If it could not be read, they are offered one again.
    pub(crate) fn on_snapshot_served(&mut self, result: Result<crate::io::IoReply, crate::io::DiskError>) {
        let served = match self.snapshots.served(result) {
            Ok(served) => served,
            Err(peers) => {
                for peer in peers {
                    if let Some(p) = self.progress_mut(peer) {
                        p.snapshot_sent_at = None;
                    }
                }
                return;
            }
        };
        let (term, now, base) = (self.term(), self.now.mono, self.log.base);
        let usable = self.log.term_at(served.index) == Some(served.term) && served.index >= base;
        for peer in served.peers {
            let Some(p) = self.progress_mut(peer) else { continue };
            if !usable || p.next > base {
                // Caught up meanwhile, or the snapshot no longer matches the log: start over.
                p.snapshot_sent_at = None;
                continue;
            }
            p.snapshot_sent_at = Some(now);
            p.inflight.clear();
            p.inflight_bytes = 0;
            p.next = served.index.next();
            p.probing = false;
            let state = served.payload.clone();
            let (index, last_term, sources) = (served.index, served.term, served.manifest.clone());
            self.send(peer, Message::Snapshot { term, index, last_term, state, sources });
            self.replicate(peer);
        }
    }

    /// Every heartbeat interval: resend what seems lost, and let every follower hear from the
    /// leader (an empty append at the last index known to match also carries the commit index).
    pub(crate) fn heartbeat(&mut self) {
        let stale = Duration(self.cfg.consensus.election_timeout_ms_max);
        let now = self.now.mono;
        for peer in self.peers() {
            if let Some(p) = self.progress_mut(peer) {
                let oldest = p.inflight.front().map(|f| f.2);
                if oldest.is_some_and(|t| now.saturating_since(t) > stale) {
                    let next = p.matched.next();
                    p.restart_from(next);
                }
            }
            let before = self.outputs.len() + self.held.len();
            self.replicate(peer);
            if self.outputs.len() + self.held.len() == before {
                self.send_heartbeat(peer);
            }
        }
    }

    pub(crate) fn send_heartbeat(&mut self, peer: ReplicaId) {
        let Some(matched) = self.progress_mut(peer).map(|p| p.matched) else { return };
        let prev_index = matched.max(self.log.base);
        let Some(prev_term) = self.log.term_at(prev_index) else { return };
        let commit = self.commit.min(prev_index);
        let round = self.reads.round_sent;
        if let Some(p) = self.progress_mut(peer) {
            p.commit_told = p.commit_told.max(commit);
        }
        let m = Message::Append { term: self.term(), prev_index, prev_term, commit, round, entries: Vec::new() };
        self.send(peer, m);
    }

    /// The leader's commit index: the highest index of its own term that a majority holds
    /// durably (the leader counting its own durable log).
    pub(crate) fn advance_commit(&mut self) {
        if !self.is_leader() {
            return;
        }
        let mut matched: Vec<Index> = self.counting_progress().iter().map(|p| p.matched).collect();
        if self.counts(self.me) {
            matched.push(self.durable);
        }
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let mut candidate = matched[self.majority() - 1];
        if self.cfg.mutation(|m| m.commit_without_majority) {
            candidate = self.durable;
        }
        if candidate > self.commit && self.log.term_at(candidate) == Some(self.term()) {
            self.commit = candidate;
            self.apply_committed();
            self.announce_commit();
        }
    }

    /// Tells every follower the new commit index at once, as etcd's leader does, riding on the
    /// entries it sends anyway or else in an empty append. Without this a follower learns it
    /// only with the next write or heartbeat, and its readers (tails, watches, stale gets) see a
    /// committed entry up to a heartbeat later than the leader's do when writes are sparse.
    fn announce_commit(&mut self) {
        for peer in self.peers() {
            self.replicate(peer);
            self.tell_commit(peer);
        }
    }

    /// Sends `peer` an empty append if it has not been told the commit index through the
    /// entries it holds. Called after the commit moves and after the peer acknowledges: a peer
    /// whose acknowledgement came after the commit (the slower follower of three) would
    /// otherwise learn it only at the next heartbeat.
    fn tell_commit(&mut self, peer: ReplicaId) {
        let commit = self.commit;
        let Some(p) = self.progress_mut(peer) else { return };
        if p.commit_told < commit.min(p.matched) {
            self.send_heartbeat(peer);
        }
    }

    /// `answer`: (ok, matched, hint) as in [`Message::AppendReply`].
    pub(crate) fn on_append_reply(
        &mut self,
        from: ReplicaId,
        term: Term,
        answer: (bool, Index, Index),
        round: u64,
        sources: Index,
    ) {
        let (ok, matched, hint) = answer;
        if term != self.term() {
            return;
        }
        let now = self.now.mono;
        let last = self.log.last_index();
        let base = self.log.base;
        let resend_after = Duration(self.cfg.consensus.heartbeat_ms * 4);
        let Some(p) = self.progress_mut(from) else { return };
        p.heard_at = now;
        p.sources_mark = sources;
        let confirms = round > p.round;
        p.round = p.round.max(round);
        if ok {
            let matched = matched.min(last);
            if matched > p.matched {
                p.matched = matched;
            }
            p.next = p.next.max(p.matched.next());
            while p.inflight.front().is_some_and(|f| f.0 <= p.matched) {
                let (_, bytes, _) = p.inflight.pop_front().expect("checked");
                p.inflight_bytes -= bytes;
            }
            p.probing = false;
            // Nothing in flight, yet the follower matches only below what was to be sent next:
            // those entries never went out (a member just added starts at the leader's end) or
            // were lost. Send them now rather than wait for new entries to expose the gap.
            if p.inflight.is_empty() && p.snapshot_sent_at.is_none() && p.next > p.matched.next() {
                p.next = p.matched.next();
            }
            p.snapshot_sent_at = None;
            self.advance_commit();
        } else {
            // A follower that still lacks what the leader compacted away, answering well after
            // a snapshot was sent, most likely lost it (it was down, say): send it again now
            // rather than after the long resend interval.
            if hint < base && p.snapshot_sent_at.is_some_and(|t| now.saturating_since(t) > resend_after) {
                p.snapshot_sent_at = None;
            }
            // A follower that repaired a damaged log range has lost entries it once acknowledged:
            // its hint is below what the leader thought it held. Without lowering `matched` the
            // leader would resend from above the follower's end for ever. Lowering it is safe:
            // the commit index never moves back, and a late reply only delays the next commit.
            if hint < p.matched {
                p.matched = hint;
            }
            if hint.next() < p.next || p.inflight.is_empty() {
                p.restart_from(hint.next());
            }
        }
        if confirms {
            self.serve_reads();
        }
        self.replicate(from);
        self.tell_commit(from);
        self.advance_transfer();
    }

    /// A follower's acknowledgement: what is durable here and known to match the leader's log.
    pub(crate) fn acknowledge(&mut self) {
        let Some(leader) = self.leader else { return };
        if leader == self.me || !matches!(self.role, Role::Follower) {
            return;
        }
        let matched = self.durable.min(self.ack_upto);
        let round = self.leader_round;
        let sources = self.files.mark(&self.state);
        let m = Message::AppendReply { term: self.term(), ok: true, matched, hint: Index(0), round, sources };
        self.send(leader, m);
    }

    fn reject(&mut self, to: ReplicaId) {
        let hint = self.commit.min(self.log.last_index());
        let round = self.leader_round;
        let sources = self.files.mark(&self.state);
        let m = Message::AppendReply { term: self.term(), ok: false, matched: Index(0), hint, round, sources };
        self.send(to, m);
    }

    /// `prev`: the index and term of the entry the append follows.
    pub(crate) fn on_append(
        &mut self,
        from: ReplicaId,
        term: Term,
        prev: (Index, Term),
        commit: Index,
        round: u64,
        entries: Vec<Entry>,
    ) {
        let (prev_index, prev_term) = prev;
        if term < self.term() {
            self.reject(from);
            return;
        }
        // A candidate of this term hears the term's leader: it lost.
        self.become_follower(term, Some(from));
        self.leader_round = self.leader_round.max(round);
        self.leader_heard_at = Some(self.now.mono);
        self.reset_election_timer();
        if self.installing.is_some() {
            self.keep_during_install((prev_index, prev_term), commit, entries);
            return;
        }
        let Some((prev_index, prev_term, entries)) = self.skip_compacted(prev_index, prev_term, entries) else {
            self.reject(from);
            return;
        };
        let matches = self.log.term_at(prev_index) == Some(prev_term);
        let mutant = self.cfg.mutation(|m| m.skip_prev_term_check) && prev_index <= self.log.last_index();
        if !matches && !mutant {
            self.reject(from);
            return;
        }
        let last_new = Index(prev_index.0 + entries.len() as u64);
        for e in entries {
            match self.log.term_at(e.index) {
                Some(t) if t == e.term => continue,
                Some(_) => self.truncate_log(e.index),
                None => {}
            }
            self.log.append(e);
        }
        self.ack_upto = self.ack_upto.max(last_new);
        let commit = commit.min(last_new);
        if commit > self.commit {
            self.commit = commit;
        }
        self.flush();
        self.apply_committed();
        // Entries still to be made durable are acknowledged after their fsync; answering now as
        // well would double the replies for nothing. A heartbeat or a repeat is answered at once.
        if self.durable >= last_new {
            self.acknowledge();
        }
    }

    /// While a snapshot install is under way the follower keeps taking the leader's new entries
    /// (those after the snapshot's entry), in memory, so that it is current the moment the
    /// snapshot is durable instead of a round trip behind. A gap or a mismatch is ignored rather
    /// than rejected: the leader resends what stays unacknowledged.
    fn keep_during_install(&mut self, prev: (Index, Term), commit: Index, mut entries: Vec<Entry>) {
        let (term, bytes_max) = (self.term(), self.cfg.consensus.inflight_bytes_max);
        let inst = self.installing.as_mut().expect("an install is under way");
        let (mut prev_index, mut prev_term) = prev;
        if prev_index < inst.index {
            entries.retain(|e| e.index > inst.index);
            (prev_index, prev_term) = (inst.index, inst.term);
        }
        if inst.term_at(prev_index) != Some(prev_term) {
            return;
        }
        let mut last_new = prev_index;
        for e in entries {
            match inst.term_at(e.index) {
                Some(t) if t == e.term => {}
                found => {
                    if found.is_some() {
                        inst.pending.truncate((e.index.0 - inst.index.0 - 1) as usize);
                        inst.pending_bytes = inst.pending.iter().map(entry_bytes).sum();
                        inst.pending_upto = inst.pending_upto.min(e.index.prev());
                    }
                    let bytes = entry_bytes(&e);
                    if inst.pending_bytes + bytes > bytes_max {
                        break;
                    }
                    inst.pending_bytes += bytes;
                    inst.pending.push(e);
                }
            }
            last_new = last_new.next();
        }
        if inst.pending_term != term {
            (inst.pending_term, inst.pending_upto) = (term, inst.index);
        }
        inst.pending_upto = inst.pending_upto.max(last_new);
        inst.pending_commit = inst.pending_commit.max(commit.min(last_new));
    }

    /// Entries at or below the snapshot are committed and already here (and match any
    /// leader's); drops them from an append, which then follows the snapshot's entry. `None` if
    /// the append starts beyond this log's end (a gap).
    fn skip_compacted(
        &self,
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry>,
    ) -> Option<(Index, Term, Vec<Entry>)> {
        if prev_index > self.log.last_index() {
            return None;
        }
        if prev_index >= self.log.base {
            return Some((prev_index, prev_term, entries));
        }
        let rest: Vec<Entry> = entries.into_iter().filter(|e| e.index > self.log.base).collect();
        Some((self.log.base, self.log.base_term, rest))
    }

    pub(crate) fn on_snapshot(
        &mut self,
        from: ReplicaId,
        term: Term,
        index: Index,
        last_term: Term,
        state: Vec<u8>,
        sources: Vec<(SourceId, u64)>,
    ) {
        if term < self.term() {
            self.reject(from);
            return;
        }
        self.become_follower(term, Some(from));
        self.leader_heard_at = Some(self.now.mono);
        self.reset_election_timer();
        if index <= self.commit || self.log.term_at(index) == Some(last_term) {
            // This replica holds the snapshot's last entry (so the same log up to it), and
            // possibly more it has acknowledged, which an install would throw away: it keeps its
            // log, and the snapshot only tells it that the entry is committed.
            self.ack_upto = self.ack_upto.max(index.min(self.log.last_index()));
            self.commit = self.commit.max(index.min(self.log.last_index()));
            self.apply_committed();
            self.acknowledge();
            return;
        }
        if self.log.last_index() > index && !self.is_writing() && self.installing.is_none() {
            // The entries after the snapshot's are on a branch the leader does not have (its
            // entry at `index` differs), so none of them is committed. They are cut durably
            // before the install: a crash between the snapshot's rename and the removal of the
            // old segments must not leave recovery a log that continues past the snapshot on
            // the wrong branch.
            self.truncate_log(index.next());
        }
        let busy = self.writer.is_cutting() || self.is_writing();
        if self.installing.is_some() || self.snapshots.busy() || busy {
            return; // The leader sends it again later.
        }
        let Ok(decoded) = decode_state(&state, index) else { return };
        let named: BTreeSet<SourceId> = sources.iter().map(|s| s.0).collect();
        let held = |id: &SourceId| decoded.sources.held.contains_key(id);
        if !decoded.sources.referenced().all(|id| named.contains(&id) || held(&id)) {
            return; // A source file is missing from the list: refused, the leader sends again.
        }
        // The source files are fetched and made durable first, then the snapshot is written.
        self.installing = Some(Installing {
            index,
            term: last_term,
            state: Box::new(decoded),
            pending: Vec::new(),
            pending_bytes: 0,
            pending_term: self.term(),
            pending_upto: index,
            pending_commit: index,
            manifest: sources.clone(),
            fetch: {
                let (have, need): (Vec<_>, Vec<_>) =
                    sources.into_iter().partition(|s| self.files.durable.contains(&s.0));
                let mut fetch = crate::fetch::Fetch::new(need);
                fetch.already_held(have.into_iter().map(|s| s.0));
                fetch
            },
            from,
            syncing_dir: false,
            payload: state,
        });
        self.fetch_step();
    }

    /// An install's next move: ask for a source file piece, or, once every file is durable,
    /// fsync the directory and then write the snapshot. A transfer that keeps stalling (the
    /// leader gone, or its files removed meanwhile) is abandoned; the leader sends a new one.
    pub(crate) fn fetch_step(&mut self) {
        let (now, piece) = (self.now.mono, self.cfg.limits.source_io_chunk_bytes.max(4096) as u64);
        let timeout = Duration(self.cfg.consensus.election_timeout_ms_max * 2);
        let inst = self.installing.as_mut().expect("an install is under way");
        if inst.syncing_dir {
            return;
        }
        if inst.fetch.finished() {
            inst.syncing_dir = true;
            self.issue(IoOp::SyncDir, crate::engine::Purpose::InstallSource);
            return;
        }
        if inst.fetch.stalls > FETCH_STALLS_MAX {
            self.installing = None;
            return;
        }
        if let Some((source, offset, len)) = inst.fetch.request(now, piece, timeout) {
            let (to, term) = (inst.from, self.term());
            self.send(to, Message::SourceFetch { term, source, offset, len });
        }
    }

    /// An install's disk operation finished: the fetch goes on, or the snapshot is written.
    pub(crate) fn next_install_op(&mut self) {
        let inst = self.installing.as_mut().expect("an install is under way");
        if inst.syncing_dir {
            let payload = std::mem::take(&mut inst.payload);
            let sources = inst.state.sources.referenced().collect();
            let manifest = std::mem::take(&mut inst.manifest);
            let op = self.snapshots.start_encoded(inst.index, inst.term, &payload, sources, manifest);
            self.issue(op, crate::engine::Purpose::Snapshot);
            return;
        }
        match inst.fetch.on_io() {
            Some(op) => self.issue(op, crate::engine::Purpose::InstallSource),
            None => self.fetch_step(),
        }
    }

    /// A follower asks for a piece of a source file (the leader serves a few at a time).
    pub(crate) fn on_source_fetch(&mut self, from: ReplicaId, term: Term, source: SourceId, offset: u64, len: u64) {
        let busy = self.serving_pieces >= SERVING_PIECES_MAX;
        if term != self.term() || !self.is_leader() || busy || !self.files.durable.contains(&source) {
            return; // unanswered: the follower asks again, or gives the install up
        }
        self.serving_pieces += 1;
        let len = len.min(PIECE_BYTES_MAX);
        let op = IoOp::ReadAt { file: source_name(source), offset, len };
        self.issue(op, crate::engine::Purpose::SourceServe(from, source, offset));
    }

    /// A piece of a source file for the install under way.
    pub(crate) fn on_source_piece(
        &mut self,
        from: ReplicaId,
        term: Term,
        source: SourceId,
        offset: u64,
        data: Vec<u8>,
    ) {
        let current = self.term();
        let Some(inst) = self.installing.as_mut() else { return };
        if term != current || from != inst.from || inst.syncing_dir {
            return;
        }
        match inst.fetch.on_piece(source, offset, &data) {
            Some(op) => self.issue(op, crate::engine::Purpose::InstallSource),
            None => self.fetch_step(),
        }
    }

    /// The leader's snapshot is durable: it replaces the state and the whole log.
    pub(crate) fn installed(&mut self) {
        let inst = self.installing.take().expect("an install is under way");
        self.state = *inst.state;
        self.notice_config();
        let unreferenced = self.files.installed(&mut self.state, inst.fetch.shipped());
        self.remove_files(unreferenced);
        if let Some(op) = self.files.next_job(&self.state, &self.cfg) {
            self.issue(op, crate::engine::Purpose::SourceJob);
        }
        self.proposed.clear();
        self.waiting.clear();
        let obsolete = self.log.reset(inst.index, inst.term);
        self.restart_ledger(inst.index);
        self.durable = inst.index;
        for e in inst.pending {
            self.log.append(e);
        }
        let checked = if inst.pending_term == self.term() { inst.pending_upto } else { inst.index };
        self.commit = self.commit.max(inst.index).max(inst.pending_commit.min(self.log.last_index()));
        self.ack_upto = self.ack_upto.max(checked);
        // The old segments must be gone before a new one is written, or recovery would find
        // the old entries after the snapshot and take them for this log.
        let mut ops: VecDeque<_> = obsolete.into_iter().map(|file| crate::io::IoOp::Remove { file }).collect();
        ops.push_back(crate::io::IoOp::SyncDir);
        self.writer.start_removal(ops);
        self.next_cut_op();
        self.acknowledge();
    }
}
