//! The world's side of the reading: connections between streamers (tailers, watchers,
//! consumers, pipeline readers; see `streamers.rs`) and replicas, and the ground truth of the
//! ledger that the checkers compare what streamers were shown with.
//!
//! A stream travels over a connection like TCP: each direction delivers in order (an item is
//! never overtaken by a later one), with the client network's delay. When a replica crashes or
//! stops, its connections break: the streamer hears of it after the items already on the way.
//!
//! Ground truth: after every step the world takes the ledger records each replica applied in it
//! and checks that every replica's record for an index is the same bytes, and that its term is
//! the term the index was committed in (`ledger-agrees`): an event is what the committed log at
//! its index did, on every replica. The checkers read the ledger from this record.

use super::{Ev, World};
use crate::history::Event;
use crate::streamers::{SAction, Streamer};
use rand::Rng;
use std::collections::VecDeque;
use truba_engine::{
    ClientId, Index, Input, LedgerEntry, Outcome, QueryReply, Request, RequestError, Seq, StreamId, StreamItem,
    StreamOpen,
};

/// One stream's connection.
#[derive(Debug)]
pub(super) struct Link {
    pub streamer: usize,
    pub replica: usize,
    pub boot: u32,
    /// When the last message in each direction arrives (so that none overtakes another).
    pub to_replica_us: u64,
    pub to_streamer_us: u64,
    /// For a watch, its window and the events sent and not yet acknowledged, by item.
    pub window: Option<u64>,
    pub unacked: VecDeque<(u64, u64)>,
    pub broken: bool,
}

impl World {
    pub(super) fn populate_streamers(&mut self) {
        let setup = self.sc.streams.clone();
        let n = self.replicas.len();
        let kinds: Vec<truba_engine::Kind> =
            self.kinds.iter().map(|k| k.0).filter(|k| k.0 != setup.consumer_kind || setup.consumers == 0).collect();
        let seed = self.seed;
        let rng = |i: usize| super::sub_rng(seed, super::STREAM_STREAMERS + 1 + i as u64);
        let mut all = Vec::new();
        for _ in 0..setup.tailers {
            let i = all.len();
            all.push(Streamer::tailer(i as u32, n, &kinds, &setup, rng(i)));
        }
        for _ in 0..setup.watchers {
            let i = all.len();
            all.push(Streamer::watcher(i as u32, n, &kinds, &setup, rng(i)));
        }
        for _ in 0..setup.consumers {
            let i = all.len();
            all.push(Streamer::consumer(i as u32, n, &setup, rng(i)));
        }
        for _ in 0..setup.pipeline_readers {
            let i = all.len();
            all.push(Streamer::pipeline(i as u32, n, &setup, rng(i)));
        }
        self.streamers = all;
    }

    /// Starts every streamer (shortly after the replicas boot) and their crashes.
    pub(super) fn start_streamers(&mut self) {
        for i in 0..self.streamers.len() {
            let t = 50_000 + self.stream_rng.gen_range(0..200_000);
            let actions = self.streamers[i].start(t);
            self.streamer_actions(i, actions);
        }
        if let (Some(range), false) = (self.sc.streams.crash_every_ms, self.streamers.is_empty()) {
            let t = self.now_us + self.stream_rng.gen_range(range.0..=range.1.max(range.0)) * 1000;
            self.at(t, Ev::StreamerCrash);
        }
    }

    /// The client network's delay for a streamer's message, from the streamers' own stream.
    fn stream_delay(&mut self) -> u64 {
        let (a, b) = self.sc.workload.net_delay_us;
        self.stream_rng.gen_range(a..=b.max(a))
    }

    pub(super) fn streamer_actions(&mut self, i: usize, actions: Vec<SAction>) {
        for a in actions {
            match a {
                SAction::Open { replica, open } => self.open_stream(i, replica, open),
                SAction::Ack { seq, error } => {
                    let stream = self.streamers[i].stream;
                    self.send_to_replica(stream, |stream| Ev::StreamAck { stream, seq, error: error.clone() });
                }
                SAction::Close => {
                    let stream = self.streamers[i].stream;
                    self.send_to_replica(stream, |stream| Ev::StreamClose { stream });
                }
                SAction::Request { client, seq, request } => {
                    self.streamer_clients.insert(client, i);
                    self.streamer_pending.insert((client, seq), request.clone());
                    let to = self.leader_guess.get(&client).copied().unwrap_or(0);
                    let t = self.now_us + self.stream_delay();
                    self.at(t, Ev::Request { to, client, seq, request });
                }
                SAction::Query { replica, question, query } => {
                    self.next_query += 1;
                    let id = self.next_query;
                    self.streamer_queries.insert(id, (i, question));
                    let t = self.now_us + self.stream_delay();
                    self.at(t, Ev::StreamerQuery { to: replica, id, query });
                }
                SAction::WantsReadThrough => self.pipeline_question(i),
                SAction::Wake { at_us, token } => self.at(at_us, Ev::StreamerWake { streamer: i, token }),
                SAction::Record(e) => self.history.push(self.now_us, e),
            }
        }
    }

    fn open_stream(&mut self, i: usize, replica: usize, open: StreamOpen) {
        self.next_stream += 1;
        let stream = self.next_stream;
        let window = match &open {
            StreamOpen::Watch { window, .. } => {
                let max = self.cfg.limits.watch_window_events_max;
                Some(window.map_or(max, |w| w.clamp(1, max)) as u64)
            }
            StreamOpen::Tail { .. } => None,
        };
        let t = self.now_us + self.stream_delay();
        let boot = self.replicas[replica].boot;
        let link = Link {
            streamer: i,
            replica,
            boot,
            to_replica_us: t,
            to_streamer_us: t,
            window,
            unacked: VecDeque::new(),
            broken: false,
        };
        self.links.insert(stream, link);
        self.streamers[i].opened(stream);
        let e = Event::StreamOpen {
            streamer: self.streamers[i].index,
            stream,
            replica: replica as u32,
            open: open.clone(),
        };
        self.history.push(self.now_us, e);
        self.at(t, Ev::StreamOpen { stream, open });
    }

    /// Sends a streamer's message to its stream's replica, after those already on the way.
    fn send_to_replica(&mut self, stream: u64, ev: impl FnOnce(u64) -> Ev) {
        let delay = self.stream_delay();
        let Some(link) = self.links.get_mut(&stream).filter(|l| !l.broken) else { return };
        let t = (self.now_us + delay).max(link.to_replica_us + 1);
        link.to_replica_us = t;
        self.at(t, ev(stream));
    }

    /// A streamer's message reaches the replica (if the process that had the stream still runs).
    pub(super) fn stream_input(&mut self, stream: u64, input: Input) {
        let Some(link) = self.links.get_mut(&stream) else { return };
        if link.broken {
            return;
        }
        let rep = &self.replicas[link.replica];
        if rep.engine.is_none() || rep.boot != link.boot {
            // The process the stream was opened with is gone (or was never up): the connection
            // is refused or reset, and the streamer hears of it.
            link.broken = true;
            let t = self.now_us.max(link.to_streamer_us) + 1;
            self.at(t, Ev::StreamBroken { stream });
            return;
        }
        if let Input::StreamAck { seq, .. } = &input {
            // The watch's window as the replica counts it: acknowledged items leave it.
            while link.unacked.front().is_some_and(|(n, _)| n <= seq) {
                link.unacked.pop_front();
            }
        }
        let r = link.replica;
        self.feed(r, input);
    }

    /// A replica emitted an item of a stream: it travels to the streamer in order.
    pub(super) fn on_stream_output(&mut self, stream: StreamId, seq: u64, item: StreamItem) {
        let delay = self.stream_delay();
        let Some(link) = self.links.get_mut(&stream.0) else { return };
        if let Some(window) = link.window {
            link.unacked.push_back((seq, item.events() as u64));
            let out: u64 = link.unacked.iter().map(|(_, e)| e).sum();
            // One entry with more events than the whole window goes alone (an entry is never
            // split); anything else over the window is a violation.
            let items = link.unacked.iter().filter(|(_, e)| *e > 0).count();
            if out > window && items > 1 {
                let detail =
                    format!("stream {} has {out} events unacknowledged, over its window of {window}", stream.0);
                let streamer = link.streamer;
                self.violate("watch-window", detail);
                let _ = streamer;
            }
        }
        let link = self.links.get_mut(&stream.0).expect("checked");
        let t = (self.now_us + delay).max(link.to_streamer_us + 1);
        link.to_streamer_us = t;
        self.at(t, Ev::StreamItem { stream: stream.0, seq, item });
    }

    pub(super) fn stream_item(&mut self, stream: u64, seq: u64, item: StreamItem) {
        let Some(link) = self.links.get(&stream) else { return };
        let i = link.streamer;
        if matches!(item, StreamItem::End(_)) {
            self.links.remove(&stream);
        }
        if self.streamers[i].stream != stream {
            return; // a stream the streamer no longer reads (it closed it, or crashed)
        }
        let e = Event::StreamItem { streamer: self.streamers[i].index, stream, seq, item: item.clone() };
        self.history.push(self.now_us, e);
        let actions = self.streamers[i].on_item(self.now_us, seq, &item);
        self.streamer_actions(i, actions);
    }

    /// Replica `r` crashed or stopped: the connections to it break, after what is on the way.
    pub(super) fn break_streams(&mut self, r: usize) {
        let delay = self.stream_delay();
        let mut broken = Vec::new();
        for (stream, link) in self.links.iter_mut().filter(|(_, l)| l.replica == r && !l.broken) {
            link.broken = true;
            let t = (self.now_us + delay).max(link.to_streamer_us + 1);
            broken.push((t, *stream));
        }
        for (t, stream) in broken {
            self.at(t, Ev::StreamBroken { stream });
        }
    }

    pub(super) fn stream_broken(&mut self, stream: u64) {
        let Some(link) = self.links.remove(&stream) else { return };
        let i = link.streamer;
        if self.streamers[i].stream != stream {
            return;
        }
        self.history.push(self.now_us, Event::StreamBroken { streamer: self.streamers[i].index, stream });
        let actions = self.streamers[i].on_broken(self.now_us);
        self.streamer_actions(i, actions);
    }

    pub(super) fn streamer_wake(&mut self, i: usize, token: u64) {
        let actions = self.streamers[i].on_wake(self.now_us, token);
        self.streamer_actions(i, actions);
    }

    /// A random streamer's process dies (never in the liveness phase).
    pub(super) fn streamer_crash(&mut self) {
        if self.liveness {
            return;
        }
        let i = self.stream_rng.gen_range(0..self.streamers.len());
        let actions = self.streamers[i].crash(self.now_us);
        self.streamer_actions(i, actions);
        if let Some(range) = self.sc.streams.crash_every_ms {
            let t = self.now_us + self.stream_rng.gen_range(range.0..=range.1.max(range.0)) * 1000;
            self.at(t, Ev::StreamerCrash);
        }
    }

    /// A reply for a streamer's request: "not the leader" is followed to the leader, as the
    /// client library does; anything else is the answer. `false` if the client is no streamer's.
    pub(super) fn streamer_reply(&mut self, client: ClientId, seq: Seq, outcome: Outcome) -> bool {
        let Some(&i) = self.streamer_clients.get(&client) else { return false };
        if let Err(RequestError::NotLeader { leader } | RequestError::LeaderLost { leader }) = &outcome {
            let n = self.replicas.len();
            let current = self.leader_guess.get(&client).copied().unwrap_or(0);
            let next = leader.map_or((current + 1) % n, |l| l.0 as usize % n);
            self.leader_guess.insert(client, next);
            let chased = self.redirects.entry((client, seq)).or_default();
            *chased += 1;
            if *chased <= super::REDIRECTS_MAX {
                if let Some(request) = self.streamer_pending.get(&(client, seq)).cloned() {
                    let pause = if leader.is_some() { 0 } else { 20_000 };
                    let t = self.now_us + self.stream_delay() + pause;
                    self.at(t, Ev::Request { to: next, client, seq, request });
                }
            }
            return true;
        }
        self.redirects.remove(&(client, seq));
        self.streamer_pending.remove(&(client, seq));
        let actions = self.streamers[i].on_reply(self.now_us, client, seq, outcome);
        self.streamer_actions(i, actions);
        true
    }

    pub(super) fn streamer_query_reply(&mut self, id: u64, reply: QueryReply) {
        let Some((i, question)) = self.streamer_queries.remove(&id) else { return };
        let QueryReply::Checkpoint(reply) = reply else { return };
        let actions = self.streamers[i].on_read_through(self.now_us, question, reply);
        self.streamer_actions(i, actions);
    }

    /// A pipeline reader asks to read a consumer through the creation of a session of the
    /// consumed kind that some client was told it created.
    fn pipeline_question(&mut self, i: usize) {
        let names: Vec<String> = self.streamers.iter().filter_map(|s| s.consumer_name().map(str::to_string)).collect();
        if names.is_empty() || self.consumed_created.is_empty() || self.liveness {
            return;
        }
        let consumer = names[self.stream_rng.gen_range(0..names.len())].clone();
        let recent = self.consumed_created.len().saturating_sub(8);
        let index = self.consumed_created[self.stream_rng.gen_range(recent..self.consumed_created.len())];
        let actions = self.streamers[i].ask_read_through(self.now_us, consumer, Index(index));
        self.streamer_actions(i, actions);
    }

    /// A client was told it created a session: pipeline readers may ask about it.
    pub(super) fn note_created(&mut self, request: Option<&Request>, id: u64) {
        if let Some(Request::New { kind, .. }) = request {
            if kind.0 == self.sc.streams.consumed_kind && self.sc.streams.pipeline_readers > 0 {
                self.consumed_created.push(id);
            }
        }
    }

    /// The ledger records replica `r` applied since it was last looked at, checked against
    /// what every other replica applied at the same index.
    pub(super) fn check_ledger(&mut self, r: usize) {
        let Some(engine) = self.replicas[r].engine.as_ref() else { return };
        let mut found = Vec::new();
        let mut last = self.ledger_seen[r];
        for (index, bytes) in engine.ledger_records_after(Index(self.ledger_seen[r])) {
            last = last.max(index.0);
            match self.ledger.get(&index.0) {
                Some(truth) if truth != bytes => found.push(format!(
                    "replica {r}'s ledger entry at index {} differs from the one applied elsewhere: {:?} vs {:?}",
                    index.0,
                    LedgerEntry::decode(bytes).map(|e| e.audit),
                    LedgerEntry::decode(truth).map(|e| e.audit),
                )),
                Some(_) => {}
                None => {
                    let entry = LedgerEntry::decode(bytes).expect("a replica's ledger entry decodes");
                    match self.applied_terms.get(&index.0) {
                        Some(&term) if term != entry.term.0 => found.push(format!(
                            "the ledger entry at index {} has term {}, but the index was committed in term {term}",
                            index.0, entry.term.0
                        )),
                        _ => {}
                    }
                    self.ledger.insert(index.0, bytes.clone());
                }
            }
        }
        self.ledger_seen[r] = last;
        for detail in found {
            self.violate("ledger-agrees", detail);
        }
    }
}
